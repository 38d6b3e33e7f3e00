//! The Nebula Stream peer: serves verified chunks to other peers, downloads
//! blobs from many peers at once, keeps its membership with the control
//! plane, and answers its own CLI.
//!
//! # Layout
//!
//! - [`node`]: a running peer ([`Node`]): builds the parts below, runs them
//!   and stops them in order. Nothing else imports it.
//! - `exchange`: `PeerExchange`, serving (`exchange::serve`) and dialing
//!   (`exchange::dial`, one stream per peer).
//! - `uploads`: the upload slots, the upload limit and the bytes sent.
//! - `events`: a blob gained chunks; the inventory changed.
//! - `fetcher`: [`Fetcher`], the one way in to a fetch, above `fetch` and
//!   `origin`: blobs go to the swarm, URLs to their origin.
//! - [`fetch`]: the multi-source downloader and its scheduler.
//! - [`origin`]: fetches by URL, one origin download for the fleet; built on
//!   `fetch`.
//! - `origin_error`: why an origin download failed, carried by the fetch's
//!   errors.
//! - `sessions`: origin downloads under way, offered to other peers; filled
//!   by `origin`, read by `exchange::serve`.
//! - [`mirror`]: the registry mirror (OCI distribution, pull side).
//! - `membership`: registration, heartbeats, announcements.
//! - `control`: the control-plane client, failing over between replicas.
//! - `metrics`: Prometheus metrics; `endpoint`: the daemon's HTTP endpoint.
//! - [`local`]: `LocalApi`, the CLI's Unix-socket API.
//! - [`limit`]: the token bucket behind upload and download limits.
//! - `tasks`: the node's background tasks, joined at shutdown.
//! - `fault`: test-only fault switches (feature `fault-injection`).

// The fuzz module reads as a client of the crate.
#[cfg(test)]
extern crate self as nebula_peer;

mod config;
mod control;
mod endpoint;
mod events;
mod exchange;
mod fault;
pub mod fetch;
mod fetcher;
#[cfg(test)]
mod fuzz_services;
mod identity;
pub mod limit;
pub mod local;
mod membership;
mod metrics;
pub mod mirror;
pub mod node;
pub mod origin;
mod origin_error;
mod sessions;
mod tasks;
mod uploads;

pub use config::{Config, ConfigError, DialConfig, DiscoveryConfig};
pub use fetch::{FetchError, FetchOutcome, Progress, Shortfall, SourceBytes};
pub use fetcher::{FetchHandle, Fetcher, Wanted};
pub use local::connect_local;
pub use mirror::{Credentials, MirrorConfig};
pub use node::{Failure, Node, NodeError, Part, StartError};
pub use origin::{UrlFetch, UrlFetchError};
