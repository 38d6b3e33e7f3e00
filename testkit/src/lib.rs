//! Nebula Stream's test kit: real clusters of `nebula` processes on
//! loopback ports chosen at run time, for the whole-system tests, the demo
//! and the benchmark. Every process is killed and reaped by pid when its
//! handle drops, unless detached (`swarm --keep`); every wait is bounded.
//! The tests' calls panic; the demo's and the benchmark's (`try_*`,
//! [`TestCluster::launch`], the async ones in `fetch`) return errors.
//!
//! The binary is a parameter: the system tests pass
//! `env!("CARGO_BIN_EXE_nebula")`, the examples [`nebula_binary`].
//!
//! # Layout
//!
//! - `binary`: [`nebula_binary`], the binary the examples run
//! - `process`: [`Proc`], [`Lifetime`], bounded command runs and polling, free ports
//! - `procfs`: [`ProcStatus`], a child's memory and threads from `/proc`
//! - `control`: [`Control`], a `nebula control` process
//! - `daemon`: [`Daemon`], a `nebula daemon` process and its client commands
//! - `cluster`: [`TestCluster`], a control plane and N daemons; launched,
//!   kept or shut down by the demo and the benchmark
//! - `fetch`: async client commands on a cluster, concurrent [`Fetch`]es, copy checks
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
mod fetch;
mod files;
mod grpc;
mod http;
mod process;
mod procfs;
mod redis;
mod tls;

pub use binary::nebula_binary;
pub use cluster::{ClusterOptions, DaemonFlags, DaemonOptions, TestCluster};
pub use control::{ADMIN_TOKEN, Control, FAST_CONTROL, admin_cli, swarm_members};
pub use daemon::{Daemon, DaemonSetup};
pub use fake_peer::{FakePeer, join, serve_health, start_peers};
pub use fetch::Fetch;
pub use files::{file_id, hash_file, random_file, write_random_file};
pub use grpc::{
    AdminApi, Bearer, ControlClient, RawPeer, Slot, admin_client, cp_client, cp_client_with_slot,
    lazy_channel,
};
pub use http::{Metrics, TlsFiles, http_request, https_request};
pub use process::{
    Lifetime, Proc, free_port, nebula_command, run_bounded, wait_for, wait_output, wait_until,
};
pub use procfs::ProcStatus;
pub use redis::{RedisServer, Sentinel};
pub use tls::TestCa;
