//! [`MemoryStore`]: the embedded, in-memory [`StateStore`].
//!
//! Compact by design, since a control plane holds every (blob, provider) pair
//! of the fleet: peers are interned to `u32` indexes, blobs are keyed by their
//! raw 32 bytes, a blob's providers are a small vector of `(index, bitmap)` of
//! 16 bytes each, and only partial providers carry a bitmap.
//!
//! # Locks
//!
//! Maps are sharded (`DashMap`); no guard is held across an `.await` (every
//! method is synchronous inside). Where two guards nest, they are taken in
//! this order, which rules out deadlocks: `sanctions` → `index` → `peers`, and
//! inventory mutex → `blobs` → `aliases`. An inventory mutex is never taken
//! while a map guard is held.
//!
//! # Layout
//!
//! - `records`: what is kept per peer and per blob, and the steps that change
//!   it (interning, purging, provider entries, aliases, sanctions).
//! - `state`: the [`StateStore`] operations, built from those steps.
//!
//! [`StateStore`]: crate::store::StateStore

use std::sync::atomic::{AtomicU32, AtomicU64};

use dashmap::DashMap;
use tokio::time::Instant;

mod records;
mod state;
#[cfg(test)]
mod tests;

use records::{BlobEntry, PeerEntry, Sanction};

use super::{InventoryCaps, PeerId, UrlRecord};

type Key = [u8; 32];

/// Reporters remembered per provider; the count stops growing past this.
const MAX_REPORTERS: usize = 1024;

/// The embedded state store: everything in this process's memory, gone on restart
/// (peers then re-register and re-announce on their next heartbeat).
#[derive(Debug)]
pub struct MemoryStore {
    caps: InventoryCaps,
    /// Peer id → interned index. Invariant: `index[id] = i` exactly when
    /// `peers[i]` exists; both change under the `index` shard lock.
    index: DashMap<PeerId, u32>,
    peers: DashMap<u32, PeerEntry>,
    blobs: DashMap<Key, BlobEntry>,
    /// SHA-256 → BLAKE3, for `sha256:` lookups.
    aliases: DashMap<Key, Key>,
    /// Standing by peer id; it outlives leases so a ban survives re-registration.
    sanctions: DashMap<PeerId, Sanction>,
    /// Next peer index. Indexes are never reused, so a stale provider entry can
    /// never point at a different peer.
    next_index: AtomicU32,
    /// (blob, provider) pairs in `blobs`.
    entries: AtomicU64,
    /// Origin URLs' records, each with the instant it is forgotten.
    urls: DashMap<Key, (UrlRecord, Instant)>,
    /// Origin leases: the holder's peer id and the instant the lease lapses.
    origin_leases: DashMap<Key, (PeerId, Instant)>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::with_caps(InventoryCaps::default())
    }

    /// An empty store that accepts inventories up to `caps`.
    pub fn with_caps(caps: InventoryCaps) -> Self {
        Self {
            caps,
            index: DashMap::new(),
            peers: DashMap::new(),
            blobs: DashMap::new(),
            aliases: DashMap::new(),
            sanctions: DashMap::new(),
            next_index: AtomicU32::new(0),
            entries: AtomicU64::new(0),
            urls: DashMap::new(),
            origin_leases: DashMap::new(),
        }
    }
}
