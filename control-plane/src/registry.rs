//! [`Registry`]: the control plane's operations over a [`StateStore`], with
//! the checks that keep bad input out of the store.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nebula_common::{BlobId, BlobRef, ChunkSet, Geometry, credential::Claims};
use tokio::time::Instant;

use crate::{
    config::Config,
    discovery,
    error::RegistryError,
    identity::{Admission, Grants, Identity, IdentityError},
    metrics::Metrics,
    store::{
        Announcement, BlobMeta, Health, Holding, Load, OriginLease, PeerId, PeerRegistration,
        PeerSnapshot, Registered, ReportOutcome, Standing, StateStore, StoreStats, Swarm, UrlKey,
        UrlRecord,
    },
    urls,
};

/// Longest zone label, label key and label value, in bytes.
pub const MAX_ZONE_LEN: usize = 64;
/// Most labels one peer may register.
pub const MAX_LABELS: usize = 32;
/// Longest label value in bytes (keys: [`MAX_ZONE_LEN`]).
pub const MAX_LABEL_VALUE_LEN: usize = 256;
/// Longest address in bytes.
pub const MAX_ADDRESS_LEN: usize = 255;
/// Reasons (reports, bans) are cut to this many bytes.
pub const MAX_REASON_LEN: usize = 512;

/// What a registering peer is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterReply {
    /// Whether the peer was new to the registry.
    pub registered: Registered,
    /// The lease lapses this long after the last heartbeat.
    pub lease_ttl: Duration,
    /// How often to heartbeat.
    pub heartbeat_interval: Duration,
}

/// A `FindProviders` question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderQuery {
    /// The blob, by BLAKE3 id or SHA-256 alias.
    pub blob: BlobRef,
    /// The asking peer, never returned.
    pub asker: Option<PeerId>,
    /// The asker's zone; empty: the zone the asker registered with.
    pub zone: String,
    /// At most this many (0: the default; capped by the config).
    pub limit: u32,
}

/// The answer to a [`ProviderQuery`].
#[derive(Debug, Clone)]
pub struct Providers {
    /// The blob the query resolved to (size 0 when nobody announced it).
    pub meta: BlobMeta,
    /// Best first.
    pub providers: Vec<Holding>,
}

/// Cluster-wide figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// From the store.
    pub store: StoreStats,
    /// `FindProviders` answers served since start.
    pub find_providers_served: u64,
    /// Time since the registry started.
    pub uptime: Duration,
}

/// The registry: leases, inventories, discovery, reports and standings.
#[derive(Debug)]
pub struct Registry<S> {
    store: S,
    lease_ttl: Duration,
    heartbeat_interval: Duration,
    default_limit: u32,
    max_limit: u32,
    quarantine_after: u32,
    quarantine_ttl: Duration,
    identity: Arc<Identity>,
    admission: Admission,
    grants: Grants,
    max_announce_blobs: usize,
    url_ttl: Duration,
    url_ignore_query: Vec<String>,
    origin_lease_ttl: Duration,
    served: AtomicU64,
    started: Instant,
    metrics: Arc<Metrics>,
}

/// What [`Registry::resolve_url`] found.
#[derive(Debug, Clone)]
pub struct UrlAnswer {
    /// The URL's record, fresh or not.
    pub record: Option<UrlRecord>,
    /// The record is younger than the URL TTL: no need to ask the origin.
    pub fresh: bool,
    /// Who holds the origin lease; `None` when the record is fresh.
    pub lease: Option<OriginLease>,
    /// Where the holder serves, when another live peer holds the lease.
    pub holder_address: Option<String>,
    /// The name of the URL's origin download among peers.
    pub session: String,
    /// How long a lease lasts unless renewed.
    pub lease_ttl: Duration,
}

/// How long a URL record outlives its freshness, for revalidation.
const URL_RECORD_GRACE: Duration = Duration::from_secs(24 * 3600);

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Parses a peer id from a request field.
pub fn parse_peer_id(field: &'static str, s: &str) -> Result<PeerId, RegistryError> {
    s.parse()
        .map_err(|source| RegistryError::PeerId { field, source })
}

/// Parses `<hex>`, `blake3:<hex>` or `sha256:<hex>` from a request field.
pub fn parse_blob_ref(field: &'static str, s: &str) -> Result<BlobRef, RegistryError> {
    s.parse()
        .map_err(|source| RegistryError::BlobId { field, source })
}

/// Parses a BLAKE3 id from a request field.
pub fn parse_blob_id(field: &'static str, s: &str) -> Result<BlobId, RegistryError> {
    s.parse()
        .map_err(|source| RegistryError::BlobId { field, source })
}

fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Checks that an advertised address is a dialable `host:port`.
pub fn check_address(address: &str) -> Result<(), RegistryError> {
    let bad = |reason| {
        Err(RegistryError::Address {
            address: shorten(address, 80),
            reason,
        })
    };
    if address.is_empty() {
        return bad("empty; advertise the host:port other peers can dial");
    }
    if address.len() > MAX_ADDRESS_LEN {
        return bad("longer than 255 bytes");
    }
    if address.contains("://") {
        return bad("give host:port without a scheme");
    }
    if address
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return bad("holds whitespace, control characters or '/'");
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return bad("no port; expected host:port");
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return bad("port must be a number from 1 to 65535"),
        Ok(_) => {}
    }
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if bracketed.is_none() && host.contains(':') {
        return bad("IPv6 addresses need brackets, e.g. [::1]:7701");
    }
    let host = bracketed.unwrap_or(host);
    if host.is_empty() {
        return bad("no host; expected host:port");
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {
            bad("unspecified IP; advertise an address other peers can reach")
        }
        Ok(_) => Ok(()),
        Err(_) if bracketed.is_some() => bad("not an IPv6 address between the brackets"),
        Err(_) => Ok(()),
    }
}

impl<S: StateStore> Registry<S> {
    /// A registry over `store`, with the limits and timers of `config`.
    pub fn new(store: S, config: &Config) -> Self {
        Self {
            store,
            lease_ttl: config.lease_ttl,
            heartbeat_interval: config.heartbeat_interval,
            default_limit: config.default_discovery_limit,
            max_limit: config.max_discovery_limit,
            quarantine_after: config.quarantine_after,
            quarantine_ttl: config.quarantine_ttl,
            identity: Arc::new(Identity::new(config)),
            admission: Admission::new(config),
            grants: Grants::new(config.report_window),
            max_announce_blobs: config.max_announce_blobs,
            url_ttl: config.url_ttl,
            url_ignore_query: config.url_ignore_query.clone(),
            origin_lease_ttl: config.origin_lease_ttl,
            served: AtomicU64::new(0),
            started: Instant::now(),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The metrics its operations feed.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Signs and checks peer credentials.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// Admits a registration of `reg` from `caller` (its source IP; `None`
    /// in process), presenting `credential`: the address must be the
    /// caller's own (unless allowed otherwise), registrations from one source
    /// are rate-limited, and a live peer id moves to another address only
    /// with that peer's credential.
    pub async fn admit_registration(
        &self,
        reg: &PeerRegistration,
        caller: Option<std::net::IpAddr>,
        credential: Option<&Claims>,
    ) -> Result<(), RegistryError> {
        check_address(&reg.address)?;
        self.admission.register(caller, &reg.address)?;
        let own = credential.is_some_and(|c| c.sub == reg.id.as_str());
        if !own
            && let Some(live) = self.store.peer(&reg.id).await?
            && *live.address != *reg.address
        {
            tracing::warn!(peer = %reg.id, address = %live.address, claimed = %shorten(&reg.address, 80), ?caller, "refused to move a peer id without its credential");
            return Err(IdentityError::Taken { id: reg.id.clone() }.into());
        }
        Ok(())
    }

    /// Records that discovery gave `providers` to `asker`.
    pub fn granted<'a>(&self, asker: &PeerId, providers: impl IntoIterator<Item = &'a PeerId>) {
        self.grants.give(asker, providers);
    }

    /// Admits a report: `reporter` may file it (rate) and was recently sent
    /// to `provider` by discovery.
    pub fn admit_report(&self, reporter: &PeerId, provider: &PeerId) -> Result<(), RegistryError> {
        self.admission.report(reporter)?;
        if !self.grants.given(reporter, provider) {
            self.metrics.report_refused();
            tracing::warn!(peer = %provider, %reporter, "report refused: discovery did not send the reporter to this peer");
            return Err(IdentityError::NotGranted {
                reporter: reporter.clone(),
                provider: provider.clone(),
            }
            .into());
        }
        Ok(())
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Blobs (added plus removed) one announce may carry.
    pub fn max_announce_blobs(&self) -> usize {
        self.max_announce_blobs
    }

    /// Registers (or re-registers) a peer and starts its lease.
    pub async fn register(&self, reg: PeerRegistration) -> Result<RegisterReply, RegistryError> {
        check_address(&reg.address)?;
        if reg.zone.len() > MAX_ZONE_LEN {
            return Err(RegistryError::Field {
                field: "zone",
                reason: format!("longer than {MAX_ZONE_LEN} bytes"),
            });
        }
        if reg.labels.len() > MAX_LABELS {
            return Err(RegistryError::Field {
                field: "labels",
                reason: format!("{} labels, at most {MAX_LABELS}", reg.labels.len()),
            });
        }
        if let Some((k, _)) = reg
            .labels
            .iter()
            .find(|(k, v)| k.is_empty() || k.len() > MAX_ZONE_LEN || v.len() > MAX_LABEL_VALUE_LEN)
        {
            return Err(RegistryError::Field {
                field: "labels",
                reason: format!(
                    "label {:?}: keys are 1 to {MAX_ZONE_LEN} bytes, values at most {MAX_LABEL_VALUE_LEN}",
                    shorten(k, 80)
                ),
            });
        }
        let id = reg.id.clone();
        let registered = self.store.register(reg, self.lease_ttl).await?;
        match registered {
            Registered::New => tracing::info!(peer = %id, "peer registered"),
            Registered::Renewed => tracing::debug!(peer = %id, "peer registered again"),
        }
        Ok(RegisterReply {
            registered,
            lease_ttl: self.lease_ttl,
            heartbeat_interval: self.heartbeat_interval,
        })
    }

    /// Renews a lease; `Ok(false)` tells the peer to register and re-announce.
    pub async fn heartbeat(&self, id: &PeerId, load: Load) -> Result<bool, RegistryError> {
        Ok(self.store.renew(id, load, self.lease_ttl).await?)
    }

    /// Removes a peer at once; `Ok(false)` if it was not registered.
    pub async fn deregister(&self, id: &PeerId) -> Result<bool, RegistryError> {
        let known = self.store.deregister(id).await?;
        if known {
            tracing::info!(peer = %id, "peer deregistered");
        }
        Ok(known)
    }

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

    /// Records that `reporter` received bad data from `provider`.
    pub async fn report(
        &self,
        reporter: &PeerId,
        provider: &PeerId,
        blob: Option<BlobId>,
        reason: &str,
    ) -> Result<ReportOutcome, RegistryError> {
        if reporter == provider {
            return Err(RegistryError::SelfReport);
        }
        if self.store.peer(reporter).await?.is_none() {
            return Err(RegistryError::UnknownPeer {
                id: reporter.clone(),
            });
        }
        let reason = match (reason.trim(), blob) {
            ("", Some(b)) => format!("sent bad data for blob {b}"),
            ("", None) => "sent bad data".to_owned(),
            (r, _) => shorten(r, MAX_REASON_LEN),
        };
        let outcome = self
            .store
            .report(
                provider,
                reporter,
                &reason,
                self.quarantine_after,
                self.quarantine_ttl,
            )
            .await?
            .ok_or_else(|| RegistryError::UnknownPeer {
                id: provider.clone(),
            })?;
        self.metrics.reported(outcome.quarantined);
        let blob = blob.map(|b| b.short()).unwrap_or_default();
        if outcome.quarantined {
            tracing::warn!(peer = %provider, %reporter, %blob, reports = outcome.reports, %reason, "peer quarantined");
        } else {
            tracing::info!(peer = %provider, %reporter, %blob, reports = outcome.reports, %reason, "peer reported");
        }
        Ok(outcome)
    }

    /// Every live peer, sorted by id.
    pub async fn peers(&self) -> Result<Vec<PeerSnapshot>, RegistryError> {
        let mut peers = self.store.peers().await?;
        peers.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(peers)
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

    /// Drains, bans or (with [`Standing::Active`]) unbans a live peer.
    pub async fn set_standing(
        &self,
        id: &PeerId,
        standing: Standing,
        reason: &str,
    ) -> Result<PeerSnapshot, RegistryError> {
        let reason = shorten(reason.trim(), MAX_REASON_LEN);
        let peer = self
            .store
            .set_standing(id, standing, &reason)
            .await?
            .ok_or_else(|| RegistryError::UnknownPeer { id: id.clone() })?;
        tracing::info!(peer = %id, ?standing, %reason, "standing changed by an operator");
        Ok(peer)
    }

    /// Records the verdict of the health prober.
    pub async fn set_health(&self, id: &PeerId, health: Health) -> Result<bool, RegistryError> {
        Ok(self.store.set_health(id, health).await?)
    }

    /// Sweeps lapsed leases; returns the peers removed.
    pub async fn expire(&self) -> Result<Vec<PeerId>, RegistryError> {
        let gone = self.store.expire().await?;
        self.metrics.leases_expired(gone.len());
        for id in &gone {
            tracing::info!(peer = %id, "lease lapsed; peer removed");
        }
        Ok(gone)
    }

    /// Cluster-wide figures.
    pub async fn stats(&self) -> Result<Stats, RegistryError> {
        Ok(Stats {
            store: self.store.stats().await?,
            find_providers_served: self.served.load(Ordering::Relaxed),
            uptime: self.started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use nebula_common::Sha256Digest;

    use super::*;
    use crate::store::{BlobAnnouncement, MemoryStore};

    fn registry() -> Registry<MemoryStore> {
        Registry::new(MemoryStore::new(), &Config::default())
    }

    fn pid(s: &str) -> PeerId {
        s.parse().unwrap()
    }

    async fn join(r: &Registry<MemoryStore>, id: &str, zone: &str) {
        r.register(PeerRegistration {
            id: pid(id),
            address: format!("127.0.0.1:{}", 2000 + id.len()),
            zone: zone.into(),
            labels: BTreeMap::new(),
        })
        .await
        .unwrap();
    }

    fn blob(n: u8) -> BlobId {
        BlobId::from_bytes([n; 32])
    }

    async fn hold(r: &Registry<MemoryStore>, id: &str, n: u8, chunks: Option<&'static [u8]>) {
        let ann = Announcement {
            blobs: vec![BlobAnnouncement {
                id: blob(n),
                size: 64 << 20,
                sha256: Some(Sha256Digest([n; 32])),
                chunks: chunks.map(Bytes::from_static),
            }],
            ..Announcement::default()
        };
        assert!(r.announce(&pid(id), ann).await.unwrap());
    }

    async fn find(r: &Registry<MemoryStore>, asker: Option<&str>, n: u8) -> Vec<String> {
        let q = ProviderQuery {
            blob: BlobRef::Blake3(blob(n)),
            asker: asker.map(pid),
            zone: String::new(),
            limit: 0,
        };
        let out = r.find_providers(&q).await.unwrap();
        out.providers
            .iter()
            .map(|h| h.peer.id.to_string())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn lease_lapses_without_heartbeats() {
        let r = registry();
        join(&r, "a", "").await;
        join(&r, "b", "").await;
        hold(&r, "a", 1, None).await;
        hold(&r, "b", 1, None).await;
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(2)).await;
            assert!(r.heartbeat(&pid("b"), Load::default()).await.unwrap());
        }
        // 10 s in: `a` stopped at 0 s, so its 6 s lease lapsed; `b` renewed.
        assert_eq!(find(&r, None, 1).await, ["b"]);
        assert!(
            !r.heartbeat(&pid("a"), Load::default()).await.unwrap(),
            "unknown_peer"
        );
        assert_eq!(r.expire().await.unwrap(), [pid("a")]);
        assert_eq!(r.stats().await.unwrap().store.provider_entries, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn lease_holds_until_its_ttl() {
        let r = registry();
        join(&r, "a", "").await;
        hold(&r, "a", 1, None).await;
        tokio::time::advance(Duration::from_millis(5_900)).await;
        assert_eq!(find(&r, None, 1).await, ["a"]);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(find(&r, None, 1).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn deregister_removes_at_once() {
        let r = registry();
        join(&r, "a", "").await;
        hold(&r, "a", 1, None).await;
        assert!(r.deregister(&pid("a")).await.unwrap());
        assert!(find(&r, None, 1).await.is_empty());
        assert!(!r.heartbeat(&pid("a"), Load::default()).await.unwrap());
        assert!(!r.deregister(&pid("a")).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn unhealthy_peers_leave_discovery() {
        let r = registry();
        join(&r, "a", "").await;
        hold(&r, "a", 1, None).await;
        r.set_health(&pid("a"), Health::Unhealthy).await.unwrap();
        assert!(find(&r, None, 1).await.is_empty());
        r.set_health(&pid("a"), Health::Healthy).await.unwrap();
        assert_eq!(find(&r, None, 1).await, ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn ranking_through_the_registry() {
        let r = registry();
        for (id, zone) in [
            ("me", "z1"),
            ("far", "z2"),
            ("near", "z1"),
            ("partial", "z1"),
            ("busy", "z1"),
        ] {
            join(&r, id, zone).await;
        }
        for id in ["me", "far", "near", "busy"] {
            hold(&r, id, 1, None).await;
        }
        hold(&r, "partial", 1, Some(&[0b11])).await;
        let busy = Load {
            active_uploads: 4,
            upload_slots: 4,
            upload_bytes_per_sec: 1,
        };
        r.heartbeat(&pid("busy"), busy).await.unwrap();
        // The asker's zone comes from its registration.
        for _ in 0..10 {
            assert_eq!(
                find(&r, Some("me"), 1).await,
                ["near", "far", "busy", "partial"]
            );
        }
        let q = ProviderQuery {
            blob: BlobRef::Blake3(blob(1)),
            asker: Some(pid("me")),
            zone: "z2".into(),
            limit: 2,
        };
        let out = r.find_providers(&q).await.unwrap();
        let ids: Vec<_> = out.providers.iter().map(|h| h.peer.id.as_str()).collect();
        assert_eq!(ids, ["far", "near"]);
        let partial = r.swarm(BlobRef::Blake3(blob(1))).await.unwrap();
        let p = partial
            .holders
            .iter()
            .find(|h| h.peer.id.as_str() == "partial")
            .unwrap();
        assert_eq!(p.chunks.as_deref(), Some(&[0b11u8][..]));
    }

    #[tokio::test(start_paused = true)]
    async fn limit_defaults_to_20_and_caps_at_200() {
        let r = registry();
        for i in 0..250 {
            let id = format!("p{i}");
            join(&r, &id, "").await;
            hold(&r, &id, 9, None).await;
        }
        assert_eq!(find(&r, None, 9).await.len(), 20);
        let q = |limit| ProviderQuery {
            blob: BlobRef::Blake3(blob(9)),
            asker: None,
            zone: String::new(),
            limit,
        };
        assert_eq!(
            r.find_providers(&q(1000)).await.unwrap().providers.len(),
            200
        );
        assert_eq!(r.find_providers(&q(7)).await.unwrap().providers.len(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn sha256_aliases_resolve_and_unknown_ones_are_not_found() {
        let r = registry();
        join(&r, "a", "").await;
        hold(&r, "a", 3, None).await;
        let q = |blob| ProviderQuery {
            blob,
            asker: None,
            zone: String::new(),
            limit: 0,
        };
        let out = r
            .find_providers(&q(BlobRef::Sha256(Sha256Digest([3; 32]))))
            .await
            .unwrap();
        assert_eq!(out.meta.id, blob(3));
        assert_eq!(out.meta.size, 64 << 20);
        assert_eq!(out.providers.len(), 1);
        let err = r
            .find_providers(&q(BlobRef::Sha256(Sha256Digest([4; 32]))))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::UnknownAlias { .. }));
        let unknown = r
            .find_providers(&q(BlobRef::Blake3(blob(4))))
            .await
            .unwrap();
        assert_eq!((unknown.meta.id, unknown.meta.size), (blob(4), 0));
        assert!(unknown.providers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn two_distinct_reporters_quarantine() {
        let r = registry();
        for id in ["bad", "r1", "r2"] {
            join(&r, id, "").await;
        }
        hold(&r, "bad", 1, None).await;
        let once = r
            .report(&pid("r1"), &pid("bad"), Some(blob(1)), "bad chunk 3")
            .await
            .unwrap();
        assert!(!once.quarantined);
        // The same reporter again does not count twice.
        let again = r.report(&pid("r1"), &pid("bad"), None, "").await.unwrap();
        assert_eq!((again.reports, again.quarantined), (1, false));
        assert_eq!(find(&r, None, 1).await, ["bad"]);
        let twice = r
            .report(&pid("r2"), &pid("bad"), Some(blob(1)), "bad chunk 4")
            .await
            .unwrap();
        assert_eq!((twice.reports, twice.quarantined), (2, true));
        assert!(find(&r, None, 1).await.is_empty());
        let p = r.store().peer(&pid("bad")).await.unwrap().unwrap();
        assert_eq!(
            (p.standing, p.reports, &*p.reason),
            (Standing::Quarantined, 2, "bad chunk 4")
        );
        r.set_standing(&pid("bad"), Standing::Active, "")
            .await
            .unwrap();
        assert_eq!(find(&r, None, 1).await, ["bad"]);
        assert!(matches!(
            r.report(&pid("bad"), &pid("bad"), None, "").await,
            Err(RegistryError::SelfReport)
        ));
        assert!(matches!(
            r.report(&pid("ghost"), &pid("bad"), None, "").await,
            Err(RegistryError::UnknownPeer { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_and_ban_leave_discovery_and_keep_the_lease() {
        let r = registry();
        join(&r, "a", "").await;
        hold(&r, "a", 1, None).await;
        r.set_standing(&pid("a"), Standing::Draining, "maintenance")
            .await
            .unwrap();
        assert!(find(&r, None, 1).await.is_empty());
        assert!(r.heartbeat(&pid("a"), Load::default()).await.unwrap());
        r.set_standing(&pid("a"), Standing::Banned, "")
            .await
            .unwrap();
        assert!(find(&r, None, 1).await.is_empty());
        r.set_standing(&pid("a"), Standing::Active, "")
            .await
            .unwrap();
        assert_eq!(find(&r, None, 1).await, ["a"]);
        let err = r
            .set_standing(&pid("ghost"), Standing::Banned, "")
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::UnknownPeer { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn bad_input_is_refused() {
        let r = registry();
        for bad in [
            "",
            "nohost",
            ":80",
            "h:0",
            "h:99999",
            "http://h:1",
            "0.0.0.0:1",
            "::1:80",
            "a b:1",
        ] {
            let reg = PeerRegistration {
                id: pid("a"),
                address: bad.into(),
                zone: String::new(),
                labels: BTreeMap::new(),
            };
            assert!(
                matches!(r.register(reg).await, Err(RegistryError::Address { .. })),
                "{bad:?} should be refused"
            );
        }
        for good in ["[::1]:80", "host.example:7701", "127.0.0.1:1"] {
            check_address(good).unwrap();
        }
        join(&r, "a", "").await;
        let huge = Announcement {
            removed: vec![blob(1); 100_001],
            ..Announcement::default()
        };
        assert!(matches!(
            r.announce(&pid("a"), huge).await,
            Err(RegistryError::AnnounceTooLarge { count: 100_001, .. })
        ));
        let fat_bitmap = Announcement {
            blobs: vec![BlobAnnouncement {
                id: blob(1),
                size: 3 << 20,
                sha256: None,
                chunks: Some(Bytes::from(vec![1u8; 2])),
            }],
            ..Announcement::default()
        };
        assert!(matches!(
            r.announce(&pid("a"), fat_bitmap).await,
            Err(RegistryError::Field {
                field: "chunks",
                ..
            })
        ));
        assert!(parse_peer_id("peer_id", "").is_err());
        assert!(parse_blob_ref("blob", "xyz").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn full_and_empty_bitmaps_are_normalized() {
        let r = registry();
        join(&r, "a", "").await;
        // 3 MiB: 3 chunks; 0b111 is every chunk.
        let ann = |bits: &'static [u8]| Announcement {
            blobs: vec![BlobAnnouncement {
                id: blob(1),
                size: 3 << 20,
                sha256: None,
                chunks: Some(Bytes::from_static(bits)),
            }],
            ..Announcement::default()
        };
        r.announce(&pid("a"), ann(&[0b1111_0111])).await.unwrap();
        let sw = r.swarm(BlobRef::Blake3(blob(1))).await.unwrap();
        assert!(sw.holders[0].chunks.is_none(), "full bitmap means complete");
        r.announce(&pid("a"), ann(&[0])).await.unwrap();
        assert!(
            r.swarm(BlobRef::Blake3(blob(1)))
                .await
                .unwrap()
                .holders
                .is_empty()
        );
    }
}
