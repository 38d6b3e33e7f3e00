//! Announcements, discovery of providers, and origin URLs.

use std::{sync::atomic::Ordering, time::Duration};

use nebula_common::{BlobId, BlobRef, ChunkSet, Geometry};

use super::{ProviderQuery, Providers, Registry, UrlAnswer};
use crate::{
    discovery,
    error::RegistryError,
    store::{Announcement, BlobMeta, OriginLease, PeerId, StateStore, Swarm, UrlKey, UrlRecord},
    urls,
};

/// How long a URL record outlives its freshness, for revalidation.
const URL_RECORD_GRACE: Duration = Duration::from_secs(24 * 3600);

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<S: StateStore> Registry<S> {
    /// Applies inventory changes after checking their size and bitmaps;
    /// `Ok(false)` tells the peer to register and re-announce.
    ///
    /// Partial announcements whose bitmap is full become complete; those with
    /// no chunk set are treated as removals.
    pub async fn announce(
        &self,
        id: &PeerId,
        mut ann: Announcement,
    ) -> Result<bool, RegistryError> {
        let count = ann.blobs.len() + ann.removed.len();
        if count > self.max_announce_blobs {
            return Err(RegistryError::AnnounceTooLarge {
                count,
                max: self.max_announce_blobs,
            });
        }
        let mut emptied = Vec::new();
        for blob in &mut ann.blobs {
            let Some(bits) = &blob.chunks else {
                continue;
            };
            let chunks = Geometry::new(blob.size).chunk_count();
            let max_len = (chunks as usize).div_ceil(8);
            if bits.len() > max_len {
                return Err(RegistryError::Field {
                    field: "chunks",
                    reason: format!(
                        "bitmap of blob {} is {} bytes; a blob of {} bytes has {chunks} chunks ({max_len} bytes)",
                        blob.id.short(),
                        bits.len(),
                        blob.size
                    ),
                });
            }
            let set = ChunkSet::from_bitmap(bits, chunks);
            if set.is_full() {
                blob.chunks = None;
            } else if set.is_empty() {
                emptied.push(blob.id);
            } else {
                // Stray bits past the last chunk are dropped and trailing zero
                // bytes trimmed (missing bytes read as zeros on the wire).
                let mut norm = set.to_bitmap();
                let used = norm.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                norm.truncate(used);
                if norm[..] != bits[..] {
                    blob.chunks = Some(norm.into());
                }
            }
        }
        if !emptied.is_empty() {
            ann.blobs.retain(|b| !emptied.contains(&b.id));
            ann.removed.extend(emptied);
        }
        let (added, removed, full) = (ann.blobs.len(), ann.removed.len(), ann.full_inventory);
        let known = self.store.announce(id, ann).await?;
        tracing::debug!(peer = %id, added, removed, full, known, "announce");
        Ok(known)
    }

    /// Ranked providers of a blob. An unknown `sha256:` alias is
    /// [`RegistryError::UnknownAlias`]; an unknown BLAKE3 id has no providers.
    pub async fn find_providers(&self, q: &ProviderQuery) -> Result<Providers, RegistryError> {
        let Swarm { meta, holders } = self.swarm(q.blob).await?;
        let limit = match q.limit {
            0 => self.default_limit,
            n => n.min(self.max_limit),
        };
        let zone = match (&q.asker, q.zone.is_empty()) {
            (Some(asker), true) => self
                .store
                .peer(asker)
                .await?
                .map(|p| p.zone.to_string())
                .unwrap_or_default(),
            _ => q.zone.clone(),
        };
        let providers = discovery::rank(
            holders,
            q.asker.as_ref(),
            &zone,
            limit as usize,
            &mut rand::rng(),
        );
        self.served.fetch_add(1, Ordering::Relaxed);
        Ok(Providers { meta, providers })
    }

    async fn resolve(&self, blob: BlobRef) -> Result<BlobId, RegistryError> {
        match blob {
            BlobRef::Blake3(id) => Ok(id),
            BlobRef::Sha256(digest) => self
                .store
                .resolve_sha256(&digest)
                .await?
                .ok_or(RegistryError::UnknownAlias { digest }),
        }
    }

    /// What `url` resolved to, and whether `asker` should go to the origin:
    /// with no fresh record (or `refresh`, when the swarm lost the blob), the
    /// asker takes the URL's origin lease unless another peer holds it.
    pub async fn resolve_url(
        &self,
        asker: &PeerId,
        url: &str,
        refresh: bool,
    ) -> Result<UrlAnswer, RegistryError> {
        self.live(asker).await?;
        let key = UrlKey::of(&urls::normalize(url, &self.url_ignore_query)?);
        let record = self.store.url(&key).await?;
        let fresh = !refresh
            && record.as_ref().is_some_and(|r| {
                unix_ms().saturating_sub(r.checked_at_ms) < self.url_ttl.as_millis() as u64
            });
        let lease = if fresh {
            None
        } else {
            Some(
                self.store
                    .origin_lease(&key, asker, self.origin_lease_ttl)
                    .await?,
            )
        };
        let holder_address = match &lease {
            Some(OriginLease::HeldBy(holder)) => match holder.parse::<PeerId>() {
                Ok(id) => self.store.peer(&id).await?.map(|p| p.address.to_string()),
                Err(_) => None,
            },
            _ => None,
        };
        Ok(UrlAnswer {
            record,
            fresh,
            lease,
            holder_address,
            session: key.to_string(),
            lease_ttl: self.origin_lease_ttl,
        })
    }

    /// Records that `url` resolved to `record` (the origin confirmed it now).
    pub async fn record_url(
        &self,
        peer: &PeerId,
        url: &str,
        mut record: UrlRecord,
    ) -> Result<(), RegistryError> {
        self.live(peer).await?;
        let key = UrlKey::of(&urls::normalize(url, &self.url_ignore_query)?);
        // Only the peer that went to the origin records what it found (or
        // any peer, once no download is under way).
        if let OriginLease::HeldBy(holder) = self
            .store
            .origin_lease(&key, peer, self.origin_lease_ttl)
            .await?
        {
            return Err(RegistryError::Field {
                field: "url",
                reason: format!(
                    "peer {holder} holds the URL's origin lease; only it records the URL"
                ),
            });
        }
        record.checked_at_ms = unix_ms();
        // Kept well past its freshness, so a later fetch can revalidate it
        // with a conditional request instead of downloading it again.
        let keep = self.url_ttl + URL_RECORD_GRACE;
        self.store.record_url(&key, record, keep).await?;
        // The download is done: the next asker past the TTL revalidates
        // with the origin instead of following a finished download.
        self.store.release_origin_lease(&key, peer).await?;
        Ok(())
    }

    async fn live(&self, peer: &PeerId) -> Result<(), RegistryError> {
        match self.store.peer(peer).await? {
            Some(_) => Ok(()),
            None => Err(RegistryError::UnknownPeer { id: peer.clone() }),
        }
    }

    /// The blob and every live provider, unfiltered; an unknown BLAKE3 id has
    /// none (size 0), an unknown `sha256:` alias is [`RegistryError::UnknownAlias`].
    pub async fn swarm(&self, blob: BlobRef) -> Result<Swarm, RegistryError> {
        let id = self.resolve(blob).await?;
        Ok(self.store.swarm(&id).await?.unwrap_or(Swarm {
            meta: BlobMeta {
                id,
                size: 0,
                sha256: None,
            },
            holders: Vec::new(),
        }))
    }
}
