//! [`RedisStore`]: the [`StateStore`] on Redis, so several control-plane
//! replicas share one state (as Kraken's trackers do).
//!
//! # Keys
//!
//! Every key starts with a prefix (`nebula` by default). The keys of one
//! logical record share a hash tag, so each record lives in one Redis Cluster
//! slot and every multi-step update of a record is one Lua script on that slot:
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:{p:ID}:peer` | hash, TTL = lease | address, zone, labels, health, load, last seen, epoch |
//! | `P:{p:ID}:gen` | string | the epoch of the peer's current registration (outlives the lease until swept) |
//! | `P:{p:ID}:inv` | set | blob ids the peer announced |
//! | `P:{p:ID}:part` | set | the announced blobs it holds only in part |
//! | `P:{p:ID}:sanction` | hash | standing and reason (outlive the lease) |
//! | `P:{p:ID}:reporters` | set | distinct reporters |
//! | `P:{b:HEX}:meta` | hash | size, sha256 |
//! | `P:{b:HEX}:prov` | sorted set | provider id → expiry (ms, Redis clock) |
//! | `P:{b:HEX}:data` | hash | provider id → `epoch|bitmap` (empty bitmap: complete) |
//! | `P:{a:SHA}` | string | SHA-256 alias → BLAKE3 id |
//! | `P:{index}:peers` | sorted set | peer id → lease deadline, for listing and sweeping |
//! | `P:{stats}` | hash | blob and (blob, provider) counts |
//! | `P:{replicas}` | sorted set | control-plane replica → expiry |
//! | `P:{lock}:NAME` | string, TTL | a lock held by one replica |
//!
//! An update that spans records (an announce touches the peer and each blob)
//! is a sequence of per-record scripts. A provider entry is valid only while
//! its peer's key lives *with the same epoch*, so an entry left behind by a
//! replica that died half-way, or by a peer that lapsed and registered again,
//! is never handed out; the sweeper removes it from the peer's inventory, and
//! its expiry score removes it in any case (trimmed on every read). Live peers
//! push their entries' expiry forward from their heartbeats, once per half
//! [`RedisConfig::entry_horizon`].
//!
//! Times (last seen, expiries) come from the Redis server's clock (`TIME` in
//! the scripts), so replicas with skewed clocks agree.
//!
//! # Connecting
//!
//! [`RedisConfig::url`] names the primary directly (`redis://`, or
//! `rediss://` for TLS with [`RedisConfig::tls`]) or through Sentinel
//! (`redis+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]`), which is asked
//! again after a failed call so a failover moves every replica to the new
//! primary: see `target` and `primary`.
//!
//! # Layout
//!
//! - `connection`: reaching Redis, deadlines, script calls and pipelines.
//! - `scripts`: the Lua scripts, one per update of one record.
//! - `state`: the [`StateStore`] operations, built on the record modules:
//!   `peers` (snapshots, entry expiry), `blobs` (swarms, entries, counters)
//!   and `replicas` (live replicas, locks).
//! - `encoding`: key names, and values as Redis and the scripts hold them.
//! - `cache`: answers read lately, reused for [`RedisConfig::swarm_cache`].
//! - `error`: what can go wrong, and how it reaches callers.
//! - `target`, `primary`: the URL, and finding the primary through Sentinel.
//!
//! [`StateStore`]: crate::store::StateStore

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use nebula_common::BlobId;

mod blobs;
mod cache;
mod connection;
mod encoding;
mod error;
mod peers;
mod primary;
mod replicas;
mod scripts;
mod state;
mod target;
#[cfg(test)]
mod tests;

use cache::Recent;
use error::R;
pub use error::{RedisSetupError, RedisStoreError};
use primary::Primary;
use scripts::Scripts;
pub use target::{RedisClientCert, RedisTls, RedisUrlError};
use target::{Target, redact_url};

use super::{InventoryCaps, PeerSnapshot, Swarm};

/// Reporters remembered per provider, as in the memory store.
const MAX_REPORTERS: u32 = 1024;
/// Commands sent in one pipeline.
const PIPELINE: usize = 512;
/// Lapsed peers one sweep handles at most.
const SWEEP_BATCH: isize = 256;
/// Items of a bulk operation allowed per [`RedisConfig::op_timeout`] of deadline.
const BULK_ITEMS_PER_OP_TIMEOUT: usize = 5_000;
/// Swarms one replica caches at most; past it the cache starts over.
const MAX_CACHED_SWARMS: usize = 65_536;

/// Where the Redis store lives and how long it may take.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]HOST:PORT[/DB]`, `rediss://…` or
    /// `redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT…]/SERVICE[/DB]`.
    pub url: String,
    /// What to trust and show for TLS (`rediss://` only).
    pub tls: RedisTls,
    /// Prefix of every key, so several clusters may share one Redis.
    pub prefix: String,
    /// Deadline of one store operation (all its round trips); past it the call
    /// answers `UNAVAILABLE`. Default 1 s.
    pub op_timeout: Duration,
    /// Deadline of connecting to Redis. Default 500 ms.
    pub connect_timeout: Duration,
    /// How long a provider entry stays valid without a heartbeat from its peer
    /// pushing it forward (a safety net for entries nobody else removes).
    /// Default 10 min.
    pub entry_horizon: Duration,
    /// How long this replica reuses a blob's swarm as read from Redis (hot
    /// blobs stay cheap). This replica's own writes take effect at once;
    /// other replicas' writes, heartbeats' load figures and lapsed leases show
    /// after at most this long. Zero: no cache. Default 500 ms.
    pub swarm_cache: Duration,
    /// How much inventory the store takes (per peer and in all).
    pub caps: InventoryCaps,
}

// The URL may carry a password.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("tls", &self.tls)
            .field("prefix", &self.prefix)
            .field("op_timeout", &self.op_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("entry_horizon", &self.entry_horizon)
            .field("swarm_cache", &self.swarm_cache)
            .field("caps", &self.caps)
            .finish()
    }
}

impl RedisConfig {
    /// Defaults for `url`, checked by [`RedisConfig::parse_url`].
    pub fn new(url: &str) -> Result<Self, RedisUrlError> {
        Self::parse_url(url)?;
        Ok(Self {
            url: url.to_owned(),
            tls: RedisTls::default(),
            prefix: "nebula".into(),
            op_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(500),
            entry_horizon: Duration::from_secs(600),
            swarm_cache: Duration::from_millis(500),
            caps: InventoryCaps::default(),
        })
    }

    /// Checks a URL (see [`RedisConfig::url`]) without TLS material; no network.
    pub fn parse_url(url: &str) -> Result<(), RedisUrlError> {
        Target::parse(url, &RedisTls::default()).map(drop)
    }

    /// Checks the URL with this configuration's TLS material; no network.
    pub fn check(&self) -> Result<(), RedisUrlError> {
        Target::parse(&self.url, &self.tls).map(drop)
    }
}

/// The Redis-backed state store. Cloning is cheap (one shared connection).
#[derive(Clone)]
pub struct RedisStore {
    primary: Arc<Primary>,
    config: Arc<RedisConfig>,
    scripts: Arc<Scripts>,
    /// Redis failed last time: the next failure is not logged again, the next
    /// success is ("once per episode").
    down: Arc<AtomicBool>,
    /// Swarms read lately (see [`RedisConfig::swarm_cache`]).
    cache: Arc<Recent<BlobId, Option<Swarm>>>,
    /// Providers' snapshots (with their epoch) read lately for swarms, under
    /// the same rule: a hot provider is read from Redis once per period.
    peer_cache: Arc<Recent<String, Option<(PeerSnapshot, String)>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
