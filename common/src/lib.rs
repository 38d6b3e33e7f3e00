//! Content addressing, chunk verification and the chunk store of Nebula
//! Stream. No sockets and no gRPC live here.
//!
//! # Layout
//!
//! - [`id`]: [`BlobId`] (BLAKE3, printed like `b3sum`) and [`BlobRef`] (an id or a `sha256:` digest).
//! - [`chunks`]: chunk geometry (a pure function of blob size) and [`ChunkSet`] bitmaps.
//! - [`outboard`]: chaining values, chunk verification, file hashing.
//! - [`store`]: the crash-safe, resumable, content-addressed store of a daemon
//!   ([`Store`], a [`Blob`], and the on-disk format).
//! - [`rate`]: byte rates such as `20MiB/s` and sizes such as `256MiB`.
//! - [`private_file`]: keys, credentials and ids, mode 0600, never through a symbolic link.

pub mod chunks;
pub mod credential;
pub mod id;
pub mod outboard;
pub mod private_file;
pub mod rate;
pub mod store;

pub use chunks::{ChunkSet, Geometry};
pub use id::{BlobId, BlobRef, ParseIdError, Sha256Digest};
pub use outboard::{Outboard, VerifyError};
pub use store::{Blob, BlobInfo, Insecurity, Scratch, Store, StoreError, WriteOutcome};
