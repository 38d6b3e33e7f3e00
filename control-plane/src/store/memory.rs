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

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use dashmap::{DashMap, mapref::entry::Entry};
use nebula_common::{BlobId, Sha256Digest};
use tokio::time::Instant;

use super::{
    Announcement, BlobAnnouncement, BlobMeta, Health, Holding, InventoryCaps, Load, OriginLease,
    PeerId, PeerRegistration, PeerSnapshot, Registered, ReportOutcome, Standing, StateStore,
    StoreError, StoreStats, Swarm, UrlKey, UrlRecord,
};

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

#[derive(Debug)]
struct PeerEntry {
    id: PeerId,
    address: Arc<str>,
    zone: Arc<str>,
    labels: Arc<BTreeMap<String, String>>,
    /// The lease lapses at this instant.
    deadline: Instant,
    last_seen: Instant,
    load: Load,
    health: Health,
    /// Mirrors `sanctions[id]`, so discovery needs no second lookup.
    standing: Standing,
    reason: Arc<str>,
    reports: u32,
    inventory: Arc<Inventory>,
}

/// What one peer announced. The mutex serializes announces of one peer with its
/// removal; `count` stays readable while an announce holds the mutex.
#[derive(Debug, Default)]
struct Inventory {
    count: AtomicU64,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    /// The peer was removed and its entries purged: announces must not add more.
    purged: bool,
    blobs: HashSet<Key>,
    /// The blobs held only in part (announced with a bitmap).
    partial: HashSet<Key>,
}

#[derive(Debug, Clone)]
struct Sanction {
    standing: Standing,
    reason: Arc<str>,
    reporters: Vec<PeerId>,
    /// When reports (and a quarantine they led to) lapse; `None` for an
    /// operator's verdict, which stays.
    lapses: Option<Instant>,
}

impl Default for Sanction {
    fn default() -> Self {
        Self {
            standing: Standing::Active,
            reason: Arc::from(""),
            reporters: Vec::new(),
            lapses: None,
        }
    }
}

#[derive(Debug)]
struct BlobEntry {
    size: u64,
    sha256: Option<Key>,
    holders: Vec<Holder>,
}

/// One provider of a blob: 16 bytes, the bitmap boxed twice so the common
/// complete case costs a null pointer.
#[derive(Debug)]
struct Holder {
    peer: u32,
    chunks: Option<Box<Bitmap>>,
}

#[derive(Debug)]
struct Bitmap(Box<[u8]>);

fn lock(inventory: &Inventory) -> MutexGuard<'_, Held> {
    // A panic while holding the lock leaves a set that is still consistent
    // (every insert and remove is one step), so poisoning is ignored.
    inventory.held.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Records a refused `sha256` claim: `claimed` announced under `sha`, which
/// names `holder` (or belongs to no blob while `claimed` has another digest).
fn refused_alias(sha: Key, claimed: Key, holder: Option<Key>) {
    tracing::warn!(
        sha256 = %Sha256Digest(sha),
        claimed = %BlobId::from_bytes(claimed),
        holder = ?holder.map(BlobId::from_bytes),
        "conflicting sha256 alias refused"
    );
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

    /// What the peer's inventory would be after `ann`, against the caps
    /// (counted, in the announce's size: the inventory is not copied).
    fn check_caps(&self, held: &Held, ann: &Announcement) -> Result<(), StoreError> {
        let full = ann.full_inventory;
        let removed: HashSet<&Key> = ann.removed.iter().map(|id| id.as_bytes()).collect();
        // What is left of the inventory before the additions.
        let kept =
            |set: &HashSet<Key>, key: &Key| !full && set.contains(key) && !removed.contains(key);
        let (mut blobs, mut partial) = if full {
            (0, 0)
        } else {
            (
                held.blobs.len() - removed.iter().filter(|k| held.blobs.contains(**k)).count(),
                held.partial.len()
                    - removed
                        .iter()
                        .filter(|k| held.partial.contains(**k))
                        .count(),
            )
        };
        let mut seen = HashSet::with_capacity(ann.blobs.len());
        let mut new_entries = 0u64;
        for b in &ann.blobs {
            let key = b.id.as_bytes();
            if !seen.insert(key) {
                continue;
            }
            if !held.blobs.contains(key) {
                new_entries += 1;
            }
            if !kept(&held.blobs, key) {
                blobs += 1;
            }
            match (b.chunks.is_some(), kept(&held.partial, key)) {
                (true, false) => partial += 1,
                (false, true) => partial -= 1,
                _ => {}
            }
        }
        self.caps.check(
            blobs as u64,
            partial as u64,
            new_entries,
            self.entries.load(Ordering::Relaxed),
        )
    }

    fn live_index(&self, id: &PeerId, now: Instant) -> Option<u32> {
        let idx = *self.index.get(id)?;
        self.peers
            .get(&idx)
            .filter(|p| p.deadline > now)
            .map(|_| idx)
    }

    fn snapshot(&self, idx: u32, now: Instant) -> Option<PeerSnapshot> {
        let p = self.peers.get(&idx)?;
        if p.deadline <= now {
            return None;
        }
        Some(PeerSnapshot {
            id: p.id.clone(),
            address: p.address.clone(),
            zone: p.zone.clone(),
            labels: p.labels.clone(),
            health: p.health,
            standing: p.standing,
            reason: p.reason.clone(),
            reports: p.reports,
            load: p.load,
            last_seen: p.last_seen,
            blob_count: p.inventory.count.load(Ordering::Relaxed),
        })
    }

    /// Removes the peer from `index` and `peers` together (only if its lease
    /// lapsed by `lapsed_at`, when given) and returns its entry.
    fn unlink(&self, id: &PeerId, lapsed_at: Option<Instant>) -> Option<(u32, PeerEntry)> {
        let Entry::Occupied(slot) = self.index.entry(id.clone()) else {
            return None;
        };
        let idx = *slot.get();
        let removed = match lapsed_at {
            Some(now) => self.peers.remove_if(&idx, |_, p| p.deadline <= now),
            None => self.peers.remove(&idx),
        };
        let (_, entry) = removed?;
        slot.remove();
        Some((idx, entry))
    }

    /// Drops every announcement of a removed peer.
    fn purge(&self, idx: u32, inventory: &Inventory) {
        let blobs = {
            let mut held = lock(inventory);
            held.purged = true;
            std::mem::take(&mut held.blobs)
        };
        inventory.count.store(0, Ordering::Relaxed);
        for key in blobs {
            self.drop_holder(key, idx);
        }
    }

    fn drop_holder(&self, key: Key, idx: u32) {
        let now_empty = {
            let Some(mut blob) = self.blobs.get_mut(&key) else {
                return;
            };
            let before = blob.holders.len();
            blob.holders.retain(|h| h.peer != idx);
            let dropped = (before - blob.holders.len()) as u64;
            self.entries.fetch_sub(dropped, Ordering::Relaxed);
            blob.holders.is_empty()
        };
        if now_empty
            && let Some((_, blob)) = self.blobs.remove_if(&key, |_, b| b.holders.is_empty())
            && let Some(sha) = blob.sha256
        {
            self.aliases.remove_if(&sha, |_, target| *target == key);
        }
    }

    fn upsert_holder(&self, blob: &BlobAnnouncement, idx: u32) {
        let key = *blob.id.as_bytes();
        let chunks = blob
            .chunks
            .as_ref()
            .map(|c| Box::new(Bitmap(Box::from(&c[..]))));
        let sha = blob.sha256.map(|d| d.0);
        match self.blobs.entry(key) {
            Entry::Occupied(mut slot) => {
                let entry = slot.get_mut();
                if let Some(h) = entry.holders.iter_mut().find(|h| h.peer == idx) {
                    h.chunks = chunks;
                } else {
                    // Most swarms are small: grow one slot at a time up to a
                    // few providers instead of doubling, then amortize.
                    if entry.holders.len() < 8 {
                        entry.holders.reserve_exact(1);
                    }
                    entry.holders.push(Holder { peer: idx, chunks });
                    self.entries.fetch_add(1, Ordering::Relaxed);
                }
                match (entry.sha256, sha) {
                    (None, Some(sha)) if self.claim_alias(sha, key) => entry.sha256 = Some(sha),
                    // The blob's digest is known: another one is a false claim.
                    (Some(known), Some(sha)) if known != sha => {
                        refused_alias(sha, key, self.aliases.get(&sha).map(|k| *k));
                    }
                    _ => {}
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(BlobEntry {
                    size: blob.size,
                    sha256: sha.filter(|&sha| self.claim_alias(sha, key)),
                    // Exactly one slot: most blobs have few providers.
                    holders: vec![Holder { peer: idx, chunks }],
                });
                self.entries.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Points `sha` at `key` unless it already names another blob: the first
    /// claim stands while that blob has providers, and a conflicting one is
    /// refused (and logged), so an alias is never overwritten.
    fn claim_alias(&self, sha: Key, key: Key) -> bool {
        let holder = *self.aliases.entry(sha).or_insert(key);
        if holder != key {
            refused_alias(sha, key, Some(holder));
        }
        holder == key
    }

    /// Copies a sanction into the peer's entry (called under the sanction's guard).
    fn mirror(&self, id: &PeerId, sanction: &Sanction) {
        let Some(idx) = self.index.get(id).map(|i| *i) else {
            return;
        };
        if let Some(mut p) = self.peers.get_mut(&idx) {
            p.standing = sanction.standing;
            p.reason = sanction.reason.clone();
            p.reports = sanction.reporters.len() as u32;
        }
    }
}

impl StateStore for MemoryStore {
    async fn register(
        &self,
        reg: PeerRegistration,
        lease: Duration,
    ) -> Result<Registered, StoreError> {
        let now = Instant::now();
        let sanction = self
            .sanctions
            .get(&reg.id)
            .map(|s| s.clone())
            .unwrap_or_default();
        let labels = Arc::new(reg.labels);
        match self.index.entry(reg.id.clone()) {
            Entry::Occupied(slot) => {
                // Cannot be missing: `index` and `peers` change together under this guard.
                let mut p = self
                    .peers
                    .get_mut(slot.get())
                    .expect("index and peers agree");
                let alive = p.deadline > now;
                if !alive || *p.address != *reg.address {
                    p.health = Health::Healthy;
                }
                if !alive {
                    p.load = Load::default();
                }
                p.address = reg.address.into();
                p.zone = reg.zone.into();
                p.labels = labels;
                p.deadline = now + lease;
                p.last_seen = now;
                Ok(if alive {
                    Registered::Renewed
                } else {
                    Registered::New
                })
            }
            Entry::Vacant(slot) => {
                let idx = self.next_index.fetch_add(1, Ordering::Relaxed);
                if idx == u32::MAX {
                    return Err(StoreError::Full(
                        "peer indexes exhausted; restart the control plane",
                    ));
                }
                self.peers.insert(
                    idx,
                    PeerEntry {
                        id: reg.id,
                        address: reg.address.into(),
                        zone: reg.zone.into(),
                        labels,
                        deadline: now + lease,
                        last_seen: now,
                        load: Load::default(),
                        health: Health::Healthy,
                        standing: sanction.standing,
                        reason: sanction.reason.clone(),
                        reports: sanction.reporters.len() as u32,
                        inventory: Arc::default(),
                    },
                );
                slot.insert(idx);
                Ok(Registered::New)
            }
        }
    }

    async fn renew(&self, peer: &PeerId, load: Load, lease: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let Some(idx) = self.index.get(peer).map(|i| *i) else {
            return Ok(false);
        };
        let Some(mut p) = self.peers.get_mut(&idx) else {
            return Ok(false);
        };
        // A lapsed lease is not revived by a heartbeat: the peer must register
        // and re-announce, since its announcements may already be swept.
        if p.deadline <= now {
            return Ok(false);
        }
        p.deadline = now + lease;
        p.last_seen = now;
        p.load = load;
        Ok(true)
    }

    async fn deregister(&self, peer: &PeerId) -> Result<bool, StoreError> {
        let Some((idx, entry)) = self.unlink(peer, None) else {
            return Ok(false);
        };
        self.purge(idx, &entry.inventory);
        Ok(true)
    }

    async fn announce(&self, peer: &PeerId, ann: Announcement) -> Result<bool, StoreError> {
        let now = Instant::now();
        let Some(idx) = self.live_index(peer, now) else {
            return Ok(false);
        };
        let Some(inventory) = self.peers.get(&idx).map(|p| p.inventory.clone()) else {
            return Ok(false);
        };
        let mut held = lock(&inventory);
        if held.purged {
            return Ok(false);
        }
        self.check_caps(&held, &ann)?;
        if ann.full_inventory && !held.blobs.is_empty() {
            let keep: HashSet<Key> = ann.blobs.iter().map(|b| *b.id.as_bytes()).collect();
            let stale: Vec<Key> = held
                .blobs
                .iter()
                .filter(|k| !keep.contains(*k))
                .copied()
                .collect();
            for key in stale {
                held.blobs.remove(&key);
                held.partial.remove(&key);
                self.drop_holder(key, idx);
            }
        }
        for id in &ann.removed {
            let key = *id.as_bytes();
            held.partial.remove(&key);
            if held.blobs.remove(&key) {
                self.drop_holder(key, idx);
            }
        }
        for blob in &ann.blobs {
            self.upsert_holder(blob, idx);
            let key = *blob.id.as_bytes();
            held.blobs.insert(key);
            if blob.chunks.is_some() {
                held.partial.insert(key);
            } else {
                held.partial.remove(&key);
            }
        }
        inventory
            .count
            .store(held.blobs.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    async fn swarm(&self, blob: &BlobId) -> Result<Option<Swarm>, StoreError> {
        let now = Instant::now();
        let (meta, holders) = {
            let Some(entry) = self.blobs.get(blob.as_bytes()) else {
                return Ok(None);
            };
            let meta = BlobMeta {
                id: *blob,
                size: entry.size,
                sha256: entry.sha256.map(Sha256Digest),
            };
            let holders: Vec<(u32, Option<Bytes>)> = entry
                .holders
                .iter()
                .map(|h| {
                    (
                        h.peer,
                        h.chunks.as_ref().map(|c| Bytes::copy_from_slice(&c.0)),
                    )
                })
                .collect();
            (meta, holders)
        };
        let holders = holders
            .into_iter()
            .filter_map(|(idx, chunks)| {
                Some(Holding {
                    peer: self.snapshot(idx, now)?,
                    chunks,
                })
            })
            .collect();
        Ok(Some(Swarm { meta, holders }))
    }

    async fn resolve_sha256(&self, digest: &Sha256Digest) -> Result<Option<BlobId>, StoreError> {
        Ok(self.aliases.get(&digest.0).map(|k| BlobId::from_bytes(*k)))
    }

    async fn peer(&self, peer: &PeerId) -> Result<Option<PeerSnapshot>, StoreError> {
        let Some(idx) = self.index.get(peer).map(|i| *i) else {
            return Ok(None);
        };
        Ok(self.snapshot(idx, Instant::now()))
    }

    async fn peers(&self) -> Result<Vec<PeerSnapshot>, StoreError> {
        let now = Instant::now();
        let indexes: Vec<u32> = self.peers.iter().map(|p| *p.key()).collect();
        Ok(indexes
            .into_iter()
            .filter_map(|i| self.snapshot(i, now))
            .collect())
    }

    async fn set_health(&self, peer: &PeerId, health: Health) -> Result<bool, StoreError> {
        let now = Instant::now();
        let Some(idx) = self.index.get(peer).map(|i| *i) else {
            return Ok(false);
        };
        match self.peers.get_mut(&idx) {
            Some(mut p) if p.deadline > now => {
                p.health = health;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn set_standing(
        &self,
        peer: &PeerId,
        standing: Standing,
        reason: &str,
    ) -> Result<Option<PeerSnapshot>, StoreError> {
        let now = Instant::now();
        if self.live_index(peer, now).is_none() {
            return Ok(None);
        }
        if standing == Standing::Active {
            self.sanctions.remove(peer);
            self.mirror(peer, &Sanction::default());
        } else {
            let mut sanction = self.sanctions.entry(peer.clone()).or_default();
            sanction.standing = standing;
            sanction.reason = Arc::from(reason);
            sanction.lapses = None;
            self.mirror(peer, &sanction);
        }
        let Some(idx) = self.live_index(peer, now) else {
            return Ok(None);
        };
        Ok(self.snapshot(idx, now))
    }

    async fn report(
        &self,
        provider: &PeerId,
        reporter: &PeerId,
        reason: &str,
        quarantine_after: u32,
        ttl: Duration,
    ) -> Result<Option<ReportOutcome>, StoreError> {
        let now = Instant::now();
        if self.live_index(provider, now).is_none() {
            return Ok(None);
        }
        let mut sanction = self.sanctions.entry(provider.clone()).or_default();
        if matches!(sanction.standing, Standing::Active | Standing::Quarantined) {
            sanction.lapses = Some(now + ttl);
        }
        if !sanction.reporters.contains(reporter) && sanction.reporters.len() < MAX_REPORTERS {
            sanction.reporters.push(reporter.clone());
        }
        let reports = sanction.reporters.len() as u32;
        if reports >= quarantine_after
            && matches!(sanction.standing, Standing::Active | Standing::Draining)
        {
            sanction.standing = Standing::Quarantined;
        }
        if sanction.standing != Standing::Banned {
            sanction.reason = Arc::from(reason);
        }
        self.mirror(provider, &sanction);
        Ok(Some(ReportOutcome {
            reports,
            quarantined: sanction.standing == Standing::Quarantined,
        }))
    }

    async fn url(&self, url: &UrlKey) -> Result<Option<UrlRecord>, StoreError> {
        let now = Instant::now();
        Ok(self
            .urls
            .get(&url.0)
            .filter(|e| e.1 > now)
            .map(|e| e.0.clone()))
    }

    async fn record_url(
        &self,
        url: &UrlKey,
        record: UrlRecord,
        keep: Duration,
    ) -> Result<(), StoreError> {
        self.urls.insert(url.0, (record, Instant::now() + keep));
        Ok(())
    }

    async fn origin_lease(
        &self,
        url: &UrlKey,
        peer: &PeerId,
        ttl: Duration,
    ) -> Result<OriginLease, StoreError> {
        let now = Instant::now();
        match self.origin_leases.entry(url.0) {
            Entry::Occupied(e) if e.get().1 > now && e.get().0 != *peer => {
                Ok(OriginLease::HeldBy(e.get().0.to_string()))
            }
            Entry::Occupied(mut e) => {
                e.insert((peer.clone(), now + ttl));
                Ok(OriginLease::Granted)
            }
            Entry::Vacant(e) => {
                e.insert((peer.clone(), now + ttl));
                Ok(OriginLease::Granted)
            }
        }
    }

    async fn release_origin_lease(&self, url: &UrlKey, peer: &PeerId) -> Result<(), StoreError> {
        self.origin_leases
            .remove_if(&url.0, |_, (holder, _)| holder == peer);
        Ok(())
    }

    async fn expire(&self) -> Result<Vec<PeerId>, StoreError> {
        let now = Instant::now();
        self.urls.retain(|_, e| e.1 > now);
        self.origin_leases.retain(|_, e| e.1 > now);
        let lifted: Vec<PeerId> = self
            .sanctions
            .iter()
            .filter(|s| s.lapses.is_some_and(|at| at <= now))
            .map(|s| s.key().clone())
            .collect();
        for id in lifted {
            // Checked again under the entry's guard: a report may have renewed it.
            if let Some((id, _)) = self
                .sanctions
                .remove_if(&id, |_, s| s.lapses.is_some_and(|at| at <= now))
            {
                self.mirror(&id, &Sanction::default());
                tracing::info!(peer = %id, "reports lapsed; the peer is active again");
            }
        }
        let lapsed: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|p| p.deadline <= now)
            .map(|p| p.id.clone())
            .collect();
        let mut removed = Vec::with_capacity(lapsed.len());
        for id in lapsed {
            if let Some((idx, entry)) = self.unlink(&id, Some(now)) {
                self.purge(idx, &entry.inventory);
                removed.push(id);
            }
        }
        Ok(removed)
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let now = Instant::now();
        let (mut peers, mut healthy_peers) = (0, 0);
        for p in self.peers.iter().filter(|p| p.deadline > now) {
            peers += 1;
            if p.health == Health::Healthy {
                healthy_peers += 1;
            }
        }
        Ok(StoreStats {
            peers,
            healthy_peers,
            blobs: self.blobs.len() as u64,
            provider_entries: self.entries.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str) -> PeerRegistration {
        PeerRegistration {
            id: id.parse().unwrap(),
            address: format!("127.0.0.1:{}", 1000 + id.len()),
            zone: "z".into(),
            labels: BTreeMap::new(),
        }
    }

    fn blob(n: u8, chunks: Option<&[u8]>) -> BlobAnnouncement {
        BlobAnnouncement {
            id: BlobId::from_bytes([n; 32]),
            size: 10 << 20,
            sha256: Some(Sha256Digest([n ^ 0xff; 32])),
            chunks: chunks.map(Bytes::copy_from_slice),
        }
    }

    const LEASE: Duration = Duration::from_secs(6);

    #[test]
    fn holder_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Holder>(), 16);
    }

    #[tokio::test(start_paused = true)]
    async fn full_inventory_replaces_and_removal_cleans_aliases() {
        let s = MemoryStore::new();
        let a: PeerId = "a".parse().unwrap();
        s.register(reg("a"), LEASE).await.unwrap();
        let ann = Announcement {
            blobs: vec![blob(1, None), blob(2, Some(&[0b101]))],
            ..Announcement::default()
        };
        assert!(s.announce(&a, ann).await.unwrap());
        assert_eq!(s.stats().await.unwrap().provider_entries, 2);
        let sw = s
            .swarm(&BlobId::from_bytes([2; 32]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sw.holders[0].chunks.as_deref(), Some(&[0b101u8][..]));
        assert_eq!(
            s.resolve_sha256(&Sha256Digest([1 ^ 0xff; 32]))
                .await
                .unwrap(),
            Some(BlobId::from_bytes([1; 32]))
        );

        let full = Announcement {
            blobs: vec![blob(2, None)],
            full_inventory: true,
            ..Announcement::default()
        };
        assert!(s.announce(&a, full).await.unwrap());
        assert!(
            s.swarm(&BlobId::from_bytes([1; 32]))
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            s.resolve_sha256(&Sha256Digest([1 ^ 0xff; 32]))
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(s.peer(&a).await.unwrap().unwrap().blob_count, 1);

        assert!(s.deregister(&a).await.unwrap());
        let st = s.stats().await.unwrap();
        assert_eq!((st.peers, st.blobs, st.provider_entries), (0, 0, 0));
        assert!(!s.announce(&a, Announcement::default()).await.unwrap());
    }

    /// Issue 10, row 1: a second blob claiming a live alias never takes it.
    #[tokio::test(start_paused = true)]
    async fn an_alias_is_never_overwritten_by_another_blob() {
        let s = MemoryStore::new();
        let (a, m): (PeerId, PeerId) = ("a".parse().unwrap(), "m".parse().unwrap());
        s.register(reg("a"), LEASE).await.unwrap();
        s.register(reg("m"), LEASE).await.unwrap();
        let honest = blob(1, None);
        let digest = honest.sha256.unwrap();
        let ann = |b: BlobAnnouncement| Announcement {
            blobs: vec![b],
            ..Announcement::default()
        };
        assert!(s.announce(&a, ann(honest)).await.unwrap());
        // The liar announces another blob under the same digest, new and known.
        let mut lie = blob(2, None);
        lie.sha256 = Some(digest);
        assert!(s.announce(&m, ann(lie.clone())).await.unwrap());
        assert!(s.announce(&m, ann(lie)).await.unwrap());
        let mut lie_too = blob(1, None);
        lie_too.id = BlobId::from_bytes([3; 32]);
        lie_too.sha256 = Some(digest);
        assert!(s.announce(&m, ann(lie_too)).await.unwrap());
        assert_eq!(
            s.resolve_sha256(&digest).await.unwrap(),
            Some(BlobId::from_bytes([1; 32]))
        );
        let liar_blob = s
            .swarm(&BlobId::from_bytes([2; 32]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            liar_blob.meta.sha256, None,
            "the refused claim is not shown"
        );
        // Once the honest blob has no provider, the alias is free again.
        assert!(s.deregister(&a).await.unwrap());
        assert_eq!(s.resolve_sha256(&digest).await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn expire_removes_only_lapsed_peers_and_their_entries() {
        let s = MemoryStore::new();
        let (a, b): (PeerId, PeerId) = ("a".parse().unwrap(), "b".parse().unwrap());
        s.register(reg("a"), LEASE).await.unwrap();
        s.register(reg("b"), LEASE).await.unwrap();
        for p in [&a, &b] {
            let ann = Announcement {
                blobs: vec![blob(7, None)],
                ..Announcement::default()
            };
            s.announce(p, ann).await.unwrap();
        }
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(s.renew(&b, Load::default(), LEASE).await.unwrap());
        tokio::time::advance(Duration::from_secs(3)).await;
        // `a` lapsed: gone from answers before any sweep.
        let sw = s
            .swarm(&BlobId::from_bytes([7; 32]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sw.holders.len(), 1);
        assert_eq!(sw.holders[0].peer.id, b);
        assert!(!s.renew(&a, Load::default(), LEASE).await.unwrap());
        assert_eq!(s.expire().await.unwrap(), vec![a.clone()]);
        assert_eq!(s.stats().await.unwrap().provider_entries, 1);
        // Registering again is a new peer.
        assert_eq!(s.register(reg("a"), LEASE).await.unwrap(), Registered::New);
    }

    #[tokio::test(start_paused = true)]
    async fn sanctions_survive_re_registration() {
        let s = MemoryStore::new();
        let a: PeerId = "a".parse().unwrap();
        s.register(reg("a"), LEASE).await.unwrap();
        let snap = s
            .set_standing(&a, Standing::Banned, "flaky")
            .await
            .unwrap()
            .unwrap();
        assert_eq!((snap.standing, &*snap.reason), (Standing::Banned, "flaky"));
        assert!(s.deregister(&a).await.unwrap());
        s.register(reg("a"), LEASE).await.unwrap();
        assert_eq!(
            s.peer(&a).await.unwrap().unwrap().standing,
            Standing::Banned
        );
        let snap = s
            .set_standing(&a, Standing::Active, "")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(snap.standing, Standing::Active);
    }

    #[tokio::test(start_paused = true)]
    async fn quarantines_lapse_unless_renewed_and_bans_stay() {
        let s = MemoryStore::new();
        let (a, b, r1, r2, r3): (PeerId, PeerId, PeerId, PeerId, PeerId) = (
            "a".parse().unwrap(),
            "b".parse().unwrap(),
            "r1".parse().unwrap(),
            "r2".parse().unwrap(),
            "r3".parse().unwrap(),
        );
        let long = Duration::from_secs(3600);
        for id in ["a", "b", "r1", "r2", "r3"] {
            s.register(reg(id), long).await.unwrap();
        }
        let ttl = Duration::from_secs(10);
        s.report(&a, &r1, "bad", 2, ttl).await.unwrap();
        let q = s.report(&a, &r2, "bad", 2, ttl).await.unwrap().unwrap();
        assert!(q.quarantined);
        s.set_standing(&b, Standing::Banned, "op").await.unwrap();
        s.report(&b, &r1, "bad", 2, ttl).await.unwrap();
        // A report 8 s in renews the quarantine.
        tokio::time::advance(Duration::from_secs(8)).await;
        s.report(&a, &r3, "bad", 2, ttl).await.unwrap();
        tokio::time::advance(Duration::from_secs(8)).await;
        s.expire().await.unwrap();
        let standing = |p: &PeerId| {
            let p = p.clone();
            let s = &s;
            async move { s.peer(&p).await.unwrap().unwrap() }
        };
        assert_eq!(standing(&a).await.standing, Standing::Quarantined);
        // 10 s after the last report it lapses, reports and all; the ban stays.
        tokio::time::advance(Duration::from_secs(3)).await;
        s.expire().await.unwrap();
        let lapsed = standing(&a).await;
        assert_eq!((lapsed.standing, lapsed.reports), (Standing::Active, 0));
        assert_eq!(standing(&b).await.standing, Standing::Banned);
    }
}
