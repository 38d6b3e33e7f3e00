//! Nebula Stream's test kit: real clusters of `nebula` processes on
//! loopback ports chosen at run time, for the whole-system tests, the demo
//! and the benchmark. Every process is killed and reaped by pid when its
//! handle drops; every wait is bounded.
//!
//! The binary is a parameter: the system tests pass
//! `env!("CARGO_BIN_EXE_nebula")`.
//!
//! # Layout
//!
//! - `process`: [`Proc`], bounded command runs and polling, free ports
//! - `control`: [`Control`], a `nebula control` process
//! - `daemon`: [`Daemon`], a `nebula daemon` process and its client commands
//! - `cluster`: [`TestCluster`], a control plane and N daemons
//! - `redis`: [`RedisServer`] and [`Sentinel`] for shared control-plane state
//! - `grpc`: [`RawPeer`], a peer played by hand with a raw gRPC client
//! - `http`: HTTP and HTTPS requests, [`Metrics`] scrapes
//! - `tls`: [`TestCa`], certificates made at test time
//! - `files`: random files and their blob ids

mod cluster;
mod control;
mod daemon;
mod files;
mod grpc;
mod http;
mod process;
mod redis;
mod tls;

pub use cluster::{DaemonFlags, TestCluster};
pub use control::{ADMIN_TOKEN, Control, FAST_CONTROL, swarm_members};
pub use daemon::Daemon;
pub use files::{file_id, random_file};
pub use grpc::{Credential, RawPeer, SignedClient};
pub use http::{Metrics, TlsFiles, http_request, https_request};
pub use process::{Proc, free_port, run_bounded, wait_output, wait_until};
pub use redis::{RedisServer, Sentinel};
pub use tls::TestCa;
