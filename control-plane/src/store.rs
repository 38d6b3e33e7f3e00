//! The control plane's state behind [`StateStore`], and the records it holds.
//!
//! The trait is shaped for a key-value engine with expiring keys (Redis, as
//! Kraken's tracker uses): a peer is one key whose TTL is its lease, renewed by
//! [`StateStore::renew`]; a blob's providers and a peer's inventory are sets;
//! the `sha256` aliases are plain keys. Every method is async so a networked
//! backend can await its round trips. [`MemoryStore`] is the embedded default.

use std::{collections::BTreeMap, fmt, future::Future, str::FromStr, sync::Arc, time::Duration};

use bytes::Bytes;
use nebula_common::{BlobId, Sha256Digest};
use tokio::time::Instant;

mod memory;
pub mod redis;

pub use memory::MemoryStore;
pub use redis::{RedisClientCert, RedisConfig, RedisSetupError, RedisStore, RedisTls};

/// Longest peer id accepted.
pub const MAX_PEER_ID_LEN: usize = 128;

/// A peer's stable id, as it registered (the daemon keeps it in its store).
///
/// 1 to [`MAX_PEER_ID_LEN`] characters from `A-Z a-z 0-9 . _ : -`. Cloning is cheap.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(Arc<str>);

/// Why a string is not a [`PeerId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    /// The id is empty.
    #[error("peer id is empty")]
    Empty,
    /// The id is longer than [`MAX_PEER_ID_LEN`].
    #[error("peer id is {len} bytes long (at most {MAX_PEER_ID_LEN})")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The id holds a character outside the allowed set.
    #[error("peer id {input:?} holds {ch:?} (allowed: letters, digits, '.', '_', ':', '-')")]
    BadChar {
        /// What was given.
        input: String,
        /// The first offending character.
        ch: char,
    },
}

impl PeerId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PeerId {
    type Err = PeerIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(PeerIdError::Empty);
        }
        if s.len() > MAX_PEER_ID_LEN {
            return Err(PeerIdError::TooLong { len: s.len() });
        }
        if let Some(ch) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(PeerIdError::BadChar {
                input: s.to_owned(),
                ch,
            });
        }
        Ok(Self(s.into()))
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.0)
    }
}

/// Load figures a peer reports with every heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Chunk uploads in progress.
    pub active_uploads: u32,
    /// Payload bytes per second uploaded over the last heartbeat interval.
    pub upload_bytes_per_sec: u64,
    /// Upload slots the peer offers in total (0: not reported).
    pub upload_slots: u32,
}

impl Load {
    /// Busy upload slots in tenths, 0 (idle) to 10 (every slot busy or more).
    ///
    /// Discovery ranks by this bucket rather than the exact ratio, so peers of
    /// nearly equal load fall through to the zone rule and then to chance.
    /// A peer that reports no slots counts as idle when it uploads nothing and
    /// as full otherwise.
    pub fn bucket(&self) -> u32 {
        let slots = u64::from(self.upload_slots.max(1));
        (u64::from(self.active_uploads) * 10 / slots).min(10) as u32
    }
}

/// The outcome of active health probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Answering probes (a newly registered peer starts here: it just spoke to us).
    Healthy,
    /// Failed enough consecutive probes; out of discovery until it passes again.
    Unhealthy,
}

/// What operators or reports decided about a peer. It outlives the peer's
/// lease: a banned peer that registers again is still banned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Standing {
    /// In discovery when healthy.
    #[default]
    Active,
    /// Out of discovery; it keeps its lease and its open streams.
    Draining,
    /// Out of discovery until unbanned.
    Banned,
    /// Reported by distinct peers; out of discovery until unbanned.
    Quarantined,
}

/// A peer joining (or re-joining) the swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRegistration {
    /// Its stable id.
    pub id: PeerId,
    /// `host:port` other peers dial and the health prober checks.
    pub address: String,
    /// Locality label.
    pub zone: String,
    /// Free-form labels shown to operators.
    pub labels: BTreeMap<String, String>,
}

/// What [`StateStore::register`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// The peer was not known (first start, lapsed lease or restarted control plane).
    New,
    /// The peer was known and alive: its record was refreshed.
    Renewed,
}

/// A registered peer as the store sees it at one instant.
#[derive(Debug, Clone)]
pub struct PeerSnapshot {
    /// Its stable id.
    pub id: PeerId,
    /// `host:port` to dial.
    pub address: Arc<str>,
    /// Locality label.
    pub zone: Arc<str>,
    /// Free-form labels.
    pub labels: Arc<BTreeMap<String, String>>,
    /// Outcome of active probes.
    pub health: Health,
    /// Operators' and reporters' verdict.
    pub standing: Standing,
    /// Why it is banned, draining or quarantined (empty otherwise).
    pub reason: Arc<str>,
    /// Distinct peers that reported it.
    pub reports: u32,
    /// Its last reported load.
    pub load: Load,
    /// When it last registered or heartbeated.
    pub last_seen: Instant,
    /// Blobs it announced, complete or partial.
    pub blob_count: u64,
}

impl PeerSnapshot {
    /// Whether discovery may hand this peer out (the asker rule aside).
    pub fn discoverable(&self) -> bool {
        self.health == Health::Healthy && self.standing == Standing::Active
    }
}

/// One blob a peer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobAnnouncement {
    /// Its BLAKE3 id.
    pub id: BlobId,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, when the peer knows it: `sha256:<hex>` then finds it.
    pub sha256: Option<Sha256Digest>,
    /// `None` when complete; otherwise the bitmap of verified chunks
    /// (already checked against the blob's geometry, not all set).
    pub chunks: Option<Bytes>,
}

/// Changes to a peer's inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announcement {
    /// Blobs added or updated.
    pub blobs: Vec<BlobAnnouncement>,
    /// Blobs the peer no longer holds.
    pub removed: Vec<BlobId>,
    /// `blobs` is the whole inventory: forget anything else.
    pub full_inventory: bool,
}

/// What the store knows about a blob itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobMeta {
    /// Its BLAKE3 id.
    pub id: BlobId,
    /// Its size as first announced.
    pub size: u64,
    /// Its SHA-256 alias, when announced.
    pub sha256: Option<Sha256Digest>,
}

/// One live provider of a blob, unfiltered.
#[derive(Debug, Clone)]
pub struct Holding {
    /// The provider.
    pub peer: PeerSnapshot,
    /// `None` when complete; the verified-chunk bitmap otherwise.
    pub chunks: Option<Bytes>,
}

/// A blob and every provider whose lease is alive, in no particular order.
#[derive(Debug, Clone)]
pub struct Swarm {
    /// The blob.
    pub meta: BlobMeta,
    /// Its providers.
    pub holders: Vec<Holding>,
}

/// What a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportOutcome {
    /// Distinct reporters so far.
    pub reports: u32,
    /// The provider is now quarantined.
    pub quarantined: bool,
}

/// An origin URL's key: the BLAKE3 hash of the URL as the control plane
/// normalized it (userinfo, fragment and ignored query parameters removed).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct UrlKey(pub [u8; 32]);

impl UrlKey {
    /// The key of a normalized URL.
    pub fn of(normalized: &str) -> Self {
        Self(*blake3::hash(normalized.as_bytes()).as_bytes())
    }
}

impl fmt::Display for UrlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for UrlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UrlKey({self})")
    }
}

/// What an origin URL resolved to, with the origin's validators.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UrlRecord {
    /// The blob.
    pub blob: BlobId,
    /// Its size.
    pub size: u64,
    /// The origin's `ETag`, verbatim (empty: none).
    pub etag: String,
    /// The origin's `Last-Modified`, verbatim (empty: none).
    pub last_modified: String,
    /// When the origin last confirmed it, in milliseconds since the Unix epoch.
    pub checked_at_ms: u64,
}

/// Who holds a URL's origin lease after an attempt to take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginLease {
    /// The asker: it was free, lapsed, or the asker's already (now renewed).
    Granted,
    /// Another peer, by id.
    HeldBy(String),
}

/// Cluster-wide figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Peers holding a live lease.
    pub peers: u64,
    /// Of which healthy.
    pub healthy_peers: u64,
    /// Blobs with at least one provider.
    pub blobs: u64,
    /// (blob, provider) pairs.
    pub provider_entries: u64,
}

/// A failure of the storage engine itself (the embedded store never fails).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached, did not answer in time, or answered with an error.
    #[error("state store unavailable: {source}")]
    Unavailable {
        /// What the backend's client reported.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store cannot take more peers.
    #[error("state store is full: {0}")]
    Full(&'static str),
    /// An announce would take an inventory past its cap; nothing of it was applied.
    #[error("{what}: {count} would pass the cap of {max} ({flag})")]
    Cap {
        /// What is capped, e.g. `blobs held by this peer`.
        what: &'static str,
        /// The count the announce would reach.
        count: u64,
        /// The cap.
        max: u64,
        /// The `nebula control` flag that sets it.
        flag: &'static str,
    },
}

/// How much inventory the store accepts, so that no peer (or set of peers)
/// can grow the control plane without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InventoryCaps {
    /// Blobs one peer may hold in the store. Default 100,000.
    pub peer_blobs: u64,
    /// Partly held blobs (entries with a chunk bitmap, up to 1 KiB each) one
    /// peer may have at once. Default 1,024.
    pub peer_partial: u64,
    /// (blob, provider) entries in the whole store. Default 20,000,000.
    pub entries: u64,
}

impl Default for InventoryCaps {
    fn default() -> Self {
        Self {
            peer_blobs: 100_000,
            peer_partial: 1_024,
            entries: 20_000_000,
        }
    }
}

impl InventoryCaps {
    /// Checks a peer's projected inventory against the caps.
    pub fn check(
        &self,
        blobs: u64,
        partial: u64,
        new_entries: u64,
        entries: u64,
    ) -> Result<(), StoreError> {
        let cap = |what, count, max, flag| {
            (count > max).then_some(StoreError::Cap {
                what,
                count,
                max,
                flag,
            })
        };
        match cap(
            "blobs held by this peer",
            blobs,
            self.peer_blobs,
            "--max-peer-blobs",
        )
        .or_else(|| {
            cap(
                "partly held blobs of this peer",
                partial,
                self.peer_partial,
                "--max-peer-partial",
            )
        })
        .or_else(|| {
            (new_entries > 0)
                .then(|| {
                    cap(
                        "provider entries in the store",
                        entries + new_entries,
                        self.entries,
                        "--max-entries",
                    )
                })
                .flatten()
        }) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The control plane's state. Leases are TTLs: a peer whose lease lapsed is
/// absent from every answer even before [`StateStore::expire`] sweeps it.
///
/// Peers are addressed by [`PeerId`]; `None`/`false` answers mean "no such
/// live peer", which callers turn into `NOT_FOUND` or `unknown_peer`.
pub trait StateStore: Send + Sync + 'static {
    /// Creates or refreshes a peer and starts its lease. Its standing (ban,
    /// drain, quarantine) is kept from before; its health restarts as healthy
    /// when it was not alive or its address changed.
    fn register(
        &self,
        peer: PeerRegistration,
        lease: Duration,
    ) -> impl Future<Output = Result<Registered, StoreError>> + Send;

    /// Renews a live peer's lease and records its load; `false` if unknown or lapsed.
    fn renew(
        &self,
        peer: &PeerId,
        load: Load,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Forgets a peer and everything it announced; `false` if it was not known.
    fn deregister(&self, peer: &PeerId) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Applies inventory changes; `false` if the peer is unknown or lapsed.
    fn announce(
        &self,
        peer: &PeerId,
        announcement: Announcement,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The blob and its live providers; `None` when no live peer holds it.
    fn swarm(
        &self,
        blob: &BlobId,
    ) -> impl Future<Output = Result<Option<Swarm>, StoreError>> + Send;

    /// The BLAKE3 id a SHA-256 digest was announced for.
    fn resolve_sha256(
        &self,
        digest: &Sha256Digest,
    ) -> impl Future<Output = Result<Option<BlobId>, StoreError>> + Send;

    /// One live peer.
    fn peer(
        &self,
        peer: &PeerId,
    ) -> impl Future<Output = Result<Option<PeerSnapshot>, StoreError>> + Send;

    /// Every live peer, in no particular order.
    fn peers(&self) -> impl Future<Output = Result<Vec<PeerSnapshot>, StoreError>> + Send;

    /// Records the outcome of health probes; `false` if the peer is not live.
    fn set_health(
        &self,
        peer: &PeerId,
        health: Health,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Sets a live peer's standing; [`Standing::Active`] also clears its reports.
    fn set_standing(
        &self,
        peer: &PeerId,
        standing: Standing,
        reason: &str,
    ) -> impl Future<Output = Result<Option<PeerSnapshot>, StoreError>> + Send;

    /// Records that `reporter` caught `provider` serving bad data; once
    /// `quarantine_after` distinct reporters did, an active or draining provider
    /// becomes quarantined. The reports, and a quarantine, lapse `ttl` after the
    /// last one (an operator's ban or drain stays). `None` if the provider is not live.
    fn report(
        &self,
        provider: &PeerId,
        reporter: &PeerId,
        reason: &str,
        quarantine_after: u32,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<ReportOutcome>, StoreError>> + Send;

    /// Removes peers whose lease lapsed, with their announcements, and returns
    /// their ids. A backend whose keys expire by themselves may do nothing here.
    fn expire(&self) -> impl Future<Output = Result<Vec<PeerId>, StoreError>> + Send;

    /// Cluster-wide figures.
    fn stats(&self) -> impl Future<Output = Result<StoreStats, StoreError>> + Send;

    /// What `url` resolved to, if recorded and not forgotten.
    fn url(
        &self,
        url: &UrlKey,
    ) -> impl Future<Output = Result<Option<UrlRecord>, StoreError>> + Send;

    /// Records what `url` resolved to; forgotten after `keep`.
    fn record_url(
        &self,
        url: &UrlKey,
        record: UrlRecord,
        keep: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes, or renews, `url`'s origin lease for `peer` for `ttl`, unless
    /// another peer holds it.
    fn origin_lease(
        &self,
        url: &UrlKey,
        peer: &PeerId,
        ttl: Duration,
    ) -> impl Future<Output = Result<OriginLease, StoreError>> + Send;

    /// Gives `url`'s origin lease up if `peer` holds it (its download is done).
    fn release_origin_lease(
        &self,
        url: &UrlKey,
        peer: &PeerId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether the backend answers now; the embedded store always does.
    fn ready(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }

    /// Records that control-plane replica `me` is alive for `ttl` and returns
    /// every live replica, sorted. A store that one process owns has one replica.
    fn replicas(
        &self,
        me: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        let _ = ttl;
        let me = me.to_owned();
        async move { Ok(vec![me]) }
    }

    /// Takes, or keeps, the lock `name` for `holder` for `ttl`; `true` when
    /// `holder` holds it. A store that one process owns always grants it.
    fn lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (name, holder, ttl);
        async { Ok(true) }
    }
}

#[cfg(test)]
mod tests;
