//! The records the store keeps and hands out: peer ids, registrations and
//! snapshots, announcements and swarms, origin URLs, cluster figures.

use std::{collections::BTreeMap, fmt, str::FromStr, sync::Arc};

use bytes::Bytes;
use nebula_common::{BlobId, Sha256Digest};
use tokio::time::Instant;

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

/// What [`StateStore::register`](super::StateStore::register) did.
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
