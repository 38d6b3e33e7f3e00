//! Nebula Stream's wire protocol, package `nebula.v1`.
//!
//! # Layout
//!
//! - `nebula/v1/control.proto`: `ControlPlane` (peers) and `Admin` (operators).
//! - `nebula/v1/peer.proto`: `PeerExchange`, the peer-to-peer chunk stream.
//! - `nebula/v1/local.proto`: `LocalApi`, the CLI to its own daemon.
//!
//! [`FILE_DESCRIPTOR_SET`] feeds the gRPC reflection service. [`tls`] holds the
//! transport security every server and client of the protocol shares,
//! [`incoming`] the guarded TCP accept loop, [`unix`] the owner-only Unix
//! sockets (the daemon's local API, the control plane's admin socket),
//! [`client`] what every control-plane client shares (the `--control` list,
//! the bearer token, dialing a replica).

/// Generated messages, clients and servers of `nebula.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("nebula.v1");
}

pub mod client;
pub mod https;
pub mod incoming;
pub mod tls;
pub mod unix;

/// The encoded descriptors of every `nebula.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/nebula_descriptor.bin"));
