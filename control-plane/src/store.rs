//! The control plane's state behind [`StateStore`], and the records it holds.
//!
//! The trait is shaped for a key-value engine with expiring keys (Redis, as
//! Kraken's tracker uses): a peer is one key whose TTL is its lease, renewed by
//! [`StateStore::renew`]; a blob's providers and a peer's inventory are sets;
//! the `sha256` aliases are plain keys. Every method is async so a networked
//! backend can await its round trips. [`MemoryStore`] is the embedded default.
//!
//! # Layout
//!
//! - `records`: what the store keeps and hands out ([`PeerId`], [`PeerSnapshot`],
//!   [`Swarm`], …), re-exported here.
//! - `memory`: [`MemoryStore`]; [`redis`]: [`RedisStore`].

use std::{future::Future, time::Duration};

use nebula_common::{BlobId, Sha256Digest};

mod memory;
pub mod redis;

pub use memory::MemoryStore;
pub use redis::{RedisClientCert, RedisConfig, RedisSetupError, RedisStore, RedisTls};
mod records;

pub use records::{
    Announcement, BlobAnnouncement, BlobMeta, Health, Holding, Load, MAX_PEER_ID_LEN, OriginLease,
    PeerId, PeerIdError, PeerRegistration, PeerSnapshot, Registered, ReportOutcome, Standing,
    StoreStats, Swarm, UrlKey, UrlRecord,
};

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
