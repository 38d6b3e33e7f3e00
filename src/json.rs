//! What `--json` prints: one struct per object, whose field names are its
//! keys, built from the answers the commands get back. Scripts read these,
//! so a field is renamed or removed only with the README.

use std::collections::BTreeMap;

use nebula_proto::v1 as pb;
use serde::Serialize;

use crate::control::state_name;

/// An empty string on the wire is an absent value in JSON.
fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// A blob as `nebula hash` and `nebula add` describe it.
#[derive(Debug, Serialize)]
pub(crate) struct BlobSummary {
    pub(crate) id: String,
    pub(crate) size: u64,
    pub(crate) sha256: Option<String>,
    pub(crate) chunk_size: u64,
    pub(crate) chunks: u64,
}

impl From<pb::AddResponse> for BlobSummary {
    fn from(r: pb::AddResponse) -> Self {
        Self {
            id: r.id,
            size: r.size,
            // The daemon always sends it for an add: printed as it came.
            sha256: Some(r.sha256),
            chunk_size: r.chunk_size,
            chunks: r.chunks,
        }
    }
}

/// `nebula ls`: every blob of the daemon's store.
#[derive(Debug, Serialize)]
pub(crate) struct Listing<'a> {
    pub(crate) blobs: Vec<ListedBlob<'a>>,
}

/// One blob of [`Listing`].
#[derive(Debug, Serialize)]
pub(crate) struct ListedBlob<'a> {
    id: &'a str,
    size: u64,
    sha256: Option<&'a str>,
    complete: bool,
    chunks: u64,
    chunks_verified: u64,
    chunk_size: u64,
}

impl<'a> From<&'a pb::ListResponse> for Listing<'a> {
    fn from(list: &'a pb::ListResponse) -> Self {
        let blobs = list
            .blobs
            .iter()
            .map(|b| ListedBlob {
                id: &b.id,
                size: b.size,
                sha256: non_empty(&b.sha256),
                complete: b.complete,
                chunks: b.chunks,
                chunks_verified: b.chunks_verified,
                chunk_size: nebula_common::Geometry::new(b.size).chunk_size(),
            })
            .collect();
        Self { blobs }
    }
}

/// `nebula status`: the daemon's figures.
#[derive(Debug, Serialize)]
pub(crate) struct Status<'a> {
    peer_id: &'a str,
    address: &'a str,
    control: &'a str,
    registered: bool,
    blobs: u64,
    active_uploads: u32,
    uploaded_bytes: u64,
    downloaded_bytes: u64,
    uptime_ms: u64,
    store: &'a str,
    registration_error: Option<&'a str>,
}

impl<'a> From<&'a pb::StatusResponse> for Status<'a> {
    fn from(s: &'a pb::StatusResponse) -> Self {
        Self {
            peer_id: &s.peer_id,
            address: &s.address,
            control: &s.control,
            registered: s.registered,
            blobs: s.blobs,
            active_uploads: s.active_uploads,
            uploaded_bytes: s.uploaded_bytes,
            downloaded_bytes: s.downloaded_bytes,
            uptime_ms: s.uptime_ms,
            store: &s.store,
            registration_error: non_empty(&s.registration_error),
        }
    }
}

/// One line of `nebula fetch --progress json`, on stderr.
#[derive(Debug, Serialize)]
pub(crate) struct FetchProgress {
    pub(crate) bytes_done: u64,
    pub(crate) total: u64,
    pub(crate) providers: u32,
    pub(crate) elapsed_ms: u64,
}

/// What `nebula fetch --json` says of a finished fetch.
#[derive(Debug, Serialize)]
pub(crate) struct FetchSummary<'a> {
    pub(crate) id: String,
    pub(crate) size: u64,
    pub(crate) elapsed_ms: u64,
    pub(crate) resumed_bytes: u64,
    pub(crate) origin_bytes: u64,
    pub(crate) peer_bytes: u64,
    pub(crate) sources: Vec<Source<'a>>,
}

/// The bytes one provider sent, in [`FetchSummary`].
#[derive(Debug, Serialize)]
pub(crate) struct Source<'a> {
    peer_id: &'a str,
    address: &'a str,
    bytes: u64,
}

impl<'a> Source<'a> {
    /// Every provider of a fetch, and the bytes they sent in all.
    pub(crate) fn all(sources: &'a [pb::ProviderBytes]) -> (Vec<Self>, u64) {
        let listed = sources
            .iter()
            .map(|s| Source {
                peer_id: &s.peer_id,
                address: &s.address,
                bytes: s.bytes,
            })
            .collect();
        (listed, sources.iter().map(|s| s.bytes).sum())
    }
}

/// `nebula admin peers`.
#[derive(Debug, Serialize)]
pub(crate) struct Peers<'a> {
    pub(crate) peers: Vec<Peer<'a>>,
}

/// A peer as the control plane lists it.
#[derive(Debug, Serialize)]
pub(crate) struct Peer<'a> {
    peer_id: &'a str,
    address: &'a str,
    zone: &'a str,
    state: &'static str,
    last_seen_ms_ago: u64,
    load: Load,
    blob_count: u64,
    reason: &'a str,
    reports: u32,
    labels: BTreeMap<&'a str, &'a str>,
}

/// A peer's upload load, in [`Peer`].
#[derive(Debug, Serialize)]
struct Load {
    active_uploads: u32,
    upload_slots: u32,
    upload_bytes_per_sec: u64,
}

impl<'a> Peer<'a> {
    /// `p`, its state named as the tables name it.
    pub(crate) fn new(p: &'a pb::PeerInfo) -> Self {
        let load = p.load.unwrap_or_default();
        Self {
            peer_id: &p.peer_id,
            address: &p.address,
            zone: &p.zone,
            state: state_name(p),
            last_seen_ms_ago: p.last_seen_ms_ago,
            load: Load {
                active_uploads: load.active_uploads,
                upload_slots: load.upload_slots,
                upload_bytes_per_sec: load.upload_bytes_per_sec,
            },
            blob_count: p.blob_count,
            reason: &p.reason,
            reports: p.reports,
            labels: p
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        }
    }
}

/// `nebula admin swarm`: one blob's providers.
#[derive(Debug, Serialize)]
pub(crate) struct Swarm<'a> {
    id: &'a str,
    size: u64,
    sha256: Option<&'a str>,
    members: Vec<SwarmMember<'a>>,
}

/// One provider of [`Swarm`].
#[derive(Debug, Serialize)]
pub(crate) struct SwarmMember<'a> {
    peer: Option<Peer<'a>>,
    complete: bool,
    chunks_held: u64,
}

impl<'a> Swarm<'a> {
    pub(crate) fn new(swarm: &'a pb::GetSwarmResponse) -> Self {
        Self {
            id: &swarm.id,
            size: swarm.size,
            sha256: non_empty(&swarm.sha256),
            members: swarm
                .members
                .iter()
                .map(|m| SwarmMember {
                    peer: m.peer.as_ref().map(Peer::new),
                    complete: m.complete,
                    chunks_held: m.chunks_held,
                })
                .collect(),
        }
    }
}

/// `nebula admin stats`: cluster-wide figures.
#[derive(Debug, Serialize)]
pub(crate) struct Stats {
    peers: u64,
    healthy_peers: u64,
    blobs: u64,
    provider_entries: u64,
    find_providers_served: u64,
    uptime_ms: u64,
}

impl From<&pb::StatsResponse> for Stats {
    fn from(s: &pb::StatsResponse) -> Self {
        Self {
            peers: s.peers,
            healthy_peers: s.healthy_peers,
            blobs: s.blobs,
            provider_entries: s.provider_entries,
            find_providers_served: s.find_providers_served,
            uptime_ms: s.uptime_ms,
        }
    }
}
