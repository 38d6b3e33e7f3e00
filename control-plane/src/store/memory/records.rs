//! What the store keeps per peer and per blob, and the steps that change it
//! consistently (taking locks in the order the parent module gives).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use dashmap::mapref::entry::Entry;
use nebula_common::{BlobId, Sha256Digest};
use tokio::time::Instant;

use super::{Key, MemoryStore};
use crate::store::{
    Announcement, BlobAnnouncement, Health, Load, PeerId, PeerSnapshot, Standing, StoreError,
};

#[derive(Debug)]
pub(super) struct PeerEntry {
    pub(super) id: PeerId,
    pub(super) address: Arc<str>,
    pub(super) zone: Arc<str>,
    pub(super) labels: Arc<BTreeMap<String, String>>,
    /// The lease lapses at this instant.
    pub(super) deadline: Instant,
    pub(super) last_seen: Instant,
    pub(super) load: Load,
    pub(super) health: Health,
    /// Mirrors `sanctions[id]`, so discovery needs no second lookup.
    pub(super) standing: Standing,
    pub(super) reason: Arc<str>,
    pub(super) reports: u32,
    pub(super) inventory: Arc<Inventory>,
}

/// What one peer announced. The mutex serializes announces of one peer with its
/// removal; `count` stays readable while an announce holds the mutex.
#[derive(Debug, Default)]
pub(super) struct Inventory {
    pub(super) count: AtomicU64,
    pub(super) held: Mutex<Held>,
}

#[derive(Debug, Default)]
pub(super) struct Held {
    /// The peer was removed and its entries purged: announces must not add more.
    pub(super) purged: bool,
    pub(super) blobs: HashSet<Key>,
    /// The blobs held only in part (announced with a bitmap).
    pub(super) partial: HashSet<Key>,
}

#[derive(Debug, Clone)]
pub(super) struct Sanction {
    pub(super) standing: Standing,
    pub(super) reason: Arc<str>,
    pub(super) reporters: Vec<PeerId>,
    /// When reports (and a quarantine they led to) lapse; `None` for an
    /// operator's verdict, which stays.
    pub(super) lapses: Option<Instant>,
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
pub(super) struct BlobEntry {
    pub(super) size: u64,
    pub(super) sha256: Option<Key>,
    pub(super) holders: Vec<Holder>,
}

/// One provider of a blob: 16 bytes, the bitmap boxed twice so the common
/// complete case costs a null pointer.
#[derive(Debug)]
pub(super) struct Holder {
    pub(super) peer: u32,
    pub(super) chunks: Option<Box<Bitmap>>,
}

#[derive(Debug)]
pub(super) struct Bitmap(pub(super) Box<[u8]>);

pub(super) fn lock(inventory: &Inventory) -> MutexGuard<'_, Held> {
    // A panic while holding the lock leaves a set that is still consistent
    // (every insert and remove is one step), so poisoning is ignored.
    inventory.held.lock().unwrap_or_else(|p| p.into_inner())
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
    /// What the peer's inventory would be after `ann`, against the caps
    /// (counted, in the announce's size: the inventory is not copied).
    pub(super) fn check_caps(&self, held: &Held, ann: &Announcement) -> Result<(), StoreError> {
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

    pub(super) fn live_index(&self, id: &PeerId, now: Instant) -> Option<u32> {
        let idx = *self.index.get(id)?;
        self.peers
            .get(&idx)
            .filter(|p| p.deadline > now)
            .map(|_| idx)
    }

    pub(super) fn snapshot(&self, idx: u32, now: Instant) -> Option<PeerSnapshot> {
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
    pub(super) fn unlink(
        &self,
        id: &PeerId,
        lapsed_at: Option<Instant>,
    ) -> Option<(u32, PeerEntry)> {
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
    pub(super) fn purge(&self, idx: u32, inventory: &Inventory) {
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

    pub(super) fn drop_holder(&self, key: Key, idx: u32) {
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

    pub(super) fn upsert_holder(&self, blob: &BlobAnnouncement, idx: u32) {
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
    pub(super) fn claim_alias(&self, sha: Key, key: Key) -> bool {
        let holder = *self.aliases.entry(sha).or_insert(key);
        if holder != key {
            refused_alias(sha, key, Some(holder));
        }
        holder == key
    }

    /// Copies a sanction into the peer's entry (called under the sanction's guard).
    pub(super) fn mirror(&self, id: &PeerId, sanction: &Sanction) {
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
