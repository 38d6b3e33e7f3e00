//! Nebula Stream's test kit: real clusters of `nebula` processes on
//! loopback ports chosen at run time, for the whole-system tests, the demo
//! and the benchmark. Every process is killed and reaped by pid when its
//! handle drops; every wait is bounded.
//!
//! The binary is a parameter: the system tests pass
//! `env!("CARGO_BIN_EXE_nebula")`, the examples [`nebula_binary`].
//!
//! # Layout
//!
//! - `binary`: [`nebula_binary`], the binary the examples run
//! - `process`: [`Proc`], bounded command runs and polling, free ports
//! - `control`: [`Control`], a `nebula control` process
//! - `daemon`: [`Daemon`], a `nebula daemon` process and its client commands
//! - `cluster`: [`TestCluster`], a control plane and N daemons
//! - `redis`: [`RedisServer`] and [`Sentinel`] for shared control-plane state
//! - `grpc`: raw gRPC clients with tokens and credentials; [`RawPeer`]
//! - `fake_peer`: [`FakePeer`], a health server that heartbeats like a daemon
//! - `http`: HTTP and HTTPS requests, [`Metrics`] scrapes
//! - `tls`: [`TestCa`], certificates made at test time
//! - `files`: random files and their blob ids

mod binary;
mod cluster;
mod control;
mod daemon;
mod fake_peer;
mod files;
mod grpc;
mod http;
mod process;
mod redis;
mod tls;

pub use binary::nebula_binary;
pub use cluster::{DaemonFlags, TestCluster};
pub use control::{ADMIN_TOKEN, Control, FAST_CONTROL, admin_cli, swarm_members};
pub use daemon::Daemon;
pub use fake_peer::{FakePeer, join, serve_health, start_peers};
pub use files::{file_id, hash_file, random_file, write_random_file};
pub use grpc::{
    AdminApi, Bearer, ControlClient, RawPeer, Slot, admin_client, cp_client, cp_client_with_slot,
    lazy_channel,
};
pub use http::{Metrics, TlsFiles, http_request, https_request};
pub use process::{Proc, free_port, run_bounded, wait_for, wait_output, wait_until};
pub use redis::{RedisServer, Sentinel};
pub use tls::TestCa;
