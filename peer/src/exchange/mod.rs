//! `PeerExchange`, the peer-to-peer chunk stream, from both ends.
//!
//! # Layout
//!
//! - [`serve`]: the serving side, verified chunks from the store under the
//!   node's upload slots and limit, with have-updates for watched blobs.
//! - [`dial`]: the dialing side, one stream per peer shared by every
//!   download, with answers routed back by request id; and the pool of them.

pub(crate) mod dial;
pub(crate) mod serve;

pub(crate) use dial::{CONNECTION_WINDOW, MAX_FRAME, MAX_MESSAGE, STREAM_WINDOW};
pub(crate) use serve::MAX_PIECE;
