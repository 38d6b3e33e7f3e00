//! [`StateStore`] in memory: each operation as steps on the records.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use nebula_common::{BlobId, Sha256Digest};
use tokio::time::Instant;

use super::{
    Key, MAX_REPORTERS, MemoryStore,
    records::{PeerEntry, Sanction, lock},
};
use crate::store::{
    Announcement, BlobMeta, Health, Holding, Load, OriginLease, PeerId, PeerRegistration,
    PeerSnapshot, Registered, ReportOutcome, Standing, StateStore, StoreError, StoreStats, Swarm,
    UrlKey, UrlRecord,
};

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
