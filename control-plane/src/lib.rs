//! Nebula Stream's control plane: peers register and hold leases renewed by
//! heartbeats, announce the blobs they hold, and ask who holds a blob; the
//! control plane probes each peer with the standard gRPC health check and
//! ranks providers; operators drain, ban and inspect through the Admin API.
//!
//! Start one in-process on a bound listener:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let control = nebula_control::ControlPlane::spawn(listener, nebula_control::Config::default()).await?;
//! println!("control plane at http://{}", control.local_addr());
//! control.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`config`]: [`Config`], every limit and timer, validated.
//! - [`store`]: the [`StateStore`] trait (shaped for keys with TTLs), [`MemoryStore`]
//!   and [`RedisStore`] (several replicas sharing one Redis).
//! - [`registry`]: [`Registry`], the operations and the checks on their input.
//! - [`discovery`]: provider ranking.
//! - [`health`]: active `grpc.health.v1` probes and the healthy/unhealthy streaks.
//! - [`auth`]: bearer-token interceptors.
//! - [`service`] and [`admin`]: the `ControlPlane` and `Admin` gRPC services.
//! - [`error`]: [`RegistryError`] and its one mapping to gRPC status codes.
//! - [`metrics`]: Prometheus metrics and the gRPC call-counting layer.
//! - [`http`]: `--http-listen`: `/metrics`, `/healthz`, `/readyz`, the live
//!   page at `/` and the JSON it reads.
//! - [`server`]: [`ControlPlane`] (spawn, shutdown) and [`serve`].
//! - [`client`]: what clients of a control plane use: the admin client, and
//!   (re-exported from `nebula_proto::client`) the `--control` list, the
//!   bearer token and dialing a replica.

// The fuzz modules read as clients of the crate.
#[cfg(test)]
extern crate self as nebula_control;

pub mod admin;
pub mod auth;
pub mod client;
pub mod config;
pub mod discovery;
pub mod error;
#[cfg(test)]
mod fuzz_handlers;
#[cfg(test)]
mod fuzz_parsers;
pub mod health;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod service;
pub mod store;
pub mod urls;

pub use config::{Config, ConfigError};
pub use error::RegistryError;
pub use registry::{ProviderQuery, Providers, Registry, Stats};
pub use server::{ControlPlane, ServeError, serve};
pub use store::{
    Health, InventoryCaps, Load, MemoryStore, PeerId, RedisClientCert, RedisConfig,
    RedisSetupError, RedisStore, RedisTls, Standing, StateStore,
};
/// The `grpc.health.v1` implementation the prober speaks, re-exported so
/// peers and tests serve exactly what the control plane checks.
pub use tonic_health;
