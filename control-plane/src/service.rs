//! The `nebula.v1.ControlPlane` gRPC service: parses requests into registry
//! calls and renders the answers. Errors become `Status` through
//! `From<RegistryError>` (see [`crate::error`]), nowhere else.

use std::sync::Arc;

use nebula_common::Sha256Digest;
use nebula_proto::v1::{
    self as pb, AnnounceRequest, AnnounceResponse, DeregisterRequest, DeregisterResponse,
    FindProvidersRequest, FindProvidersResponse, HeartbeatRequest, HeartbeatResponse,
    RecordUrlRequest, RecordUrlResponse, RegisterRequest, RegisterResponse, ReportPeerRequest,
    ReportPeerResponse, ResolveUrlRequest, ResolveUrlResponse, control_plane_server::ControlPlane,
};
use tonic::{Request, Response, Status};

use crate::{
    error::RegistryError,
    identity::{bound, caller},
    registry::{ProviderQuery, Registry, parse_blob_id, parse_blob_ref, parse_peer_id},
    store::{
        Announcement, BlobAnnouncement, Load, OriginLease, PeerRegistration, StateStore, UrlRecord,
    },
};

/// Implements `nebula.v1.ControlPlane` over a [`Registry`].
#[derive(Debug)]
pub struct ControlPlaneService<S> {
    registry: Arc<Registry<S>>,
}

impl<S> ControlPlaneService<S> {
    /// The service over `registry`.
    pub fn new(registry: Arc<Registry<S>>) -> Self {
        Self { registry }
    }
}

pub(crate) fn load_from_wire(load: Option<pb::Load>) -> Load {
    let load = load.unwrap_or_default();
    Load {
        active_uploads: load.active_uploads,
        upload_bytes_per_sec: load.upload_bytes_per_sec,
        upload_slots: load.upload_slots,
    }
}

pub(crate) fn load_to_wire(load: Load) -> pb::Load {
    pb::Load {
        active_uploads: load.active_uploads,
        upload_bytes_per_sec: load.upload_bytes_per_sec,
        upload_slots: load.upload_slots,
    }
}

fn parse_sha256(s: &str) -> Result<Option<Sha256Digest>, RegistryError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let hex = s
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("sha256:"))
        .map_or(s, |_| &s[7..]);
    hex.parse()
        .map(Some)
        .map_err(|source| RegistryError::BlobId {
            field: "blobs.sha256",
            source,
        })
}

fn parse_announcement(max: usize, req: AnnounceRequest) -> Result<Announcement, RegistryError> {
    // Counted before parsing, so a huge announce costs no more than its decoding.
    let count = req.blobs.len() + req.removed.len();
    if count > max {
        return Err(RegistryError::AnnounceTooLarge { count, max });
    }
    let blobs = req
        .blobs
        .into_iter()
        .map(|b| {
            Ok(BlobAnnouncement {
                id: parse_blob_id("blobs.id", &b.id)?,
                size: b.size,
                sha256: parse_sha256(&b.sha256)?,
                chunks: (!b.complete).then_some(b.chunks),
            })
        })
        .collect::<Result<Vec<_>, RegistryError>>()?;
    let removed = req
        .removed
        .iter()
        .map(|id| parse_blob_id("removed", id))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Announcement {
        blobs,
        removed,
        full_inventory: req.full_inventory,
    })
}

#[tonic::async_trait]
impl<S: StateStore> ControlPlane for ControlPlaneService<S> {
    #[tracing::instrument(level = "debug", skip_all, fields(peer = %req.get_ref().peer_id))]
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let source = req.remote_addr().map(|a| a.ip());
        let presented = caller(&req).cloned();
        let req = req.into_inner();
        let reg = PeerRegistration {
            id: parse_peer_id("peer_id", &req.peer_id)?,
            address: req.address,
            zone: req.zone,
            labels: req.labels.into_iter().collect(),
        };
        self.registry
            .admit_registration(&reg, source, presented.as_ref())
            .await?;
        let (id, address) = (reg.id.clone(), reg.address.clone());
        let reply = self.registry.register(reg).await?;
        let identity = self.registry.identity();
        Ok(Response::new(RegisterResponse {
            lease_ttl_ms: reply.lease_ttl.as_millis() as u64,
            heartbeat_interval_ms: reply.heartbeat_interval.as_millis() as u64,
            credential: identity.issue(&id, &address),
            verify_keys: identity.wire_keys(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(peer = %req.get_ref().peer_id))]
    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let id = parse_peer_id("peer_id", &req.get_ref().peer_id)?;
        let held = bound(&req, &id).map_err(RegistryError::from)?;
        let known = self
            .registry
            .heartbeat(&id, load_from_wire(req.into_inner().load))
            .await?;
        if !known {
            tracing::debug!(peer = %id, "heartbeat from an unknown peer; asking it to register");
            return Ok(Response::new(HeartbeatResponse {
                unknown_peer: true,
                ..Default::default()
            }));
        }
        let identity = self.registry.identity();
        Ok(Response::new(HeartbeatResponse {
            unknown_peer: false,
            credential: identity.renewal(&held).unwrap_or_default(),
            verify_keys: identity.wire_keys(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(peer = %req.get_ref().peer_id))]
    async fn announce(
        &self,
        req: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        let id = parse_peer_id("peer_id", &req.get_ref().peer_id)?;
        bound(&req, &id).map_err(RegistryError::from)?;
        let req = req.into_inner();
        let ann = parse_announcement(self.registry.max_announce_blobs(), req)?;
        let known = self.registry.announce(&id, ann).await?;
        Ok(Response::new(AnnounceResponse {
            unknown_peer: !known,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(blob = %req.get_ref().blob))]
    async fn find_providers(
        &self,
        req: Request<FindProvidersRequest>,
    ) -> Result<Response<FindProvidersResponse>, Status> {
        let asker = caller(&req).and_then(|c| c.sub.parse().ok());
        let req = req.into_inner();
        let query = ProviderQuery {
            blob: parse_blob_ref("blob", &req.blob)?,
            asker: match req.peer_id.as_str() {
                "" => None,
                s => Some(parse_peer_id("peer_id", s)?),
            },
            zone: req.zone,
            limit: req.limit,
        };
        let found = self.registry.find_providers(&query).await?;
        if let Some(asker) = &asker {
            self.registry
                .granted(asker, found.providers.iter().map(|h| &h.peer.id));
        }
        let providers = found
            .providers
            .into_iter()
            .map(|h| pb::Provider {
                peer_id: h.peer.id.to_string(),
                address: h.peer.address.to_string(),
                complete: h.chunks.is_none(),
                chunks: h.chunks.unwrap_or_default(),
                zone: h.peer.zone.to_string(),
                load: Some(load_to_wire(h.peer.load)),
            })
            .collect();
        Ok(Response::new(FindProvidersResponse {
            id: found.meta.id.to_string(),
            size: found.meta.size,
            providers,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(peer = %req.get_ref().peer_id))]
    async fn report_peer(
        &self,
        req: Request<ReportPeerRequest>,
    ) -> Result<Response<ReportPeerResponse>, Status> {
        let reporter = parse_peer_id("reporter_id", &req.get_ref().reporter_id)?;
        bound(&req, &reporter).map_err(RegistryError::from)?;
        let req = req.into_inner();
        let provider = parse_peer_id("peer_id", &req.peer_id)?;
        if reporter != provider {
            self.registry.admit_report(&reporter, &provider)?;
        }
        let blob = match req.blob.as_str() {
            "" => None,
            s => Some(parse_blob_id("blob", s)?),
        };
        let outcome = self
            .registry
            .report(&reporter, &provider, blob, &req.reason)
            .await?;
        Ok(Response::new(ReportPeerResponse {
            quarantined: outcome.quarantined,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(peer = %req.get_ref().peer_id))]
    async fn deregister(
        &self,
        req: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let id = parse_peer_id("peer_id", &req.get_ref().peer_id)?;
        bound(&req, &id).map_err(RegistryError::from)?;
        // Deregistering twice (or after the lease lapsed) is not an error: the
        // peer wants to be gone, and it is.
        self.registry.deregister(&id).await?;
        Ok(Response::new(DeregisterResponse {}))
    }

    // The URL is not a span field: its query may hold a signature.
    #[tracing::instrument(level = "debug", skip_all, fields(peer = %req.get_ref().peer_id))]
    async fn resolve_url(
        &self,
        req: Request<ResolveUrlRequest>,
    ) -> Result<Response<ResolveUrlResponse>, Status> {
        let peer = parse_peer_id("peer_id", &req.get_ref().peer_id)?;
        bound(&req, &peer).map_err(RegistryError::from)?;
        let req = req.into_inner();
        let answer = self
            .registry
            .resolve_url(&peer, &req.url, req.refresh)
            .await?;
        // A follower fetches from the holder: it may report it.
        if let Some(OriginLease::HeldBy(holder)) = &answer.lease
            && let Ok(holder) = holder.parse()
        {
            self.registry.granted(&peer, [&holder]);
        }
        let (lease, holder) = match answer.lease {
            Some(OriginLease::Granted) => (true, String::new()),
            Some(OriginLease::HeldBy(h)) => (false, h),
            None => (false, String::new()),
        };
        let (blob, validators) = match answer.record {
            Some(r) => (
                r.blob.to_string(),
                Some(pb::UrlValidators {
                    size: r.size,
                    etag: r.etag,
                    last_modified: r.last_modified,
                }),
            ),
            None => (String::new(), None),
        };
        Ok(Response::new(ResolveUrlResponse {
            blob,
            validators,
            fresh: answer.fresh,
            lease,
            lease_ttl_ms: answer.lease_ttl.as_millis() as u64,
            holder,
            holder_address: answer.holder_address.unwrap_or_default(),
            session: answer.session,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(peer = %req.get_ref().peer_id))]
    async fn record_url(
        &self,
        req: Request<RecordUrlRequest>,
    ) -> Result<Response<RecordUrlResponse>, Status> {
        let peer = parse_peer_id("peer_id", &req.get_ref().peer_id)?;
        bound(&req, &peer).map_err(RegistryError::from)?;
        let req = req.into_inner();
        let v = req.validators.unwrap_or_default();
        let record = UrlRecord {
            blob: parse_blob_id("blob", &req.blob)?,
            size: v.size,
            etag: unless_too_long(v.etag),
            last_modified: unless_too_long(v.last_modified),
            checked_at_ms: 0,
        };
        self.registry.record_url(&peer, &req.url, record).await?;
        Ok(Response::new(RecordUrlResponse {}))
    }
}

/// Validators longer than this are dropped (an origin never sends such).
const MAX_VALIDATOR_LEN: usize = 1024;

fn unless_too_long(v: String) -> String {
    if v.len() > MAX_VALIDATOR_LEN {
        String::new()
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tonic::Code;

    use super::*;
    use crate::{config::Config, store::MemoryStore};

    fn service() -> ControlPlaneService<MemoryStore> {
        ControlPlaneService::new(Arc::new(Registry::new(
            MemoryStore::new(),
            &Config::default(),
        )))
    }

    fn signed<T>(svc: &ControlPlaneService<MemoryStore>, peer: &str, msg: T) -> Request<T> {
        crate::identity::signed(svc.registry.identity(), peer, msg)
    }

    fn register_req(id: &str, address: &str) -> Request<RegisterRequest> {
        Request::new(RegisterRequest {
            peer_id: id.into(),
            address: address.into(),
            zone: "z".into(),
            labels: Default::default(),
        })
    }

    const BLOB: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    #[tokio::test]
    async fn register_announce_find_over_the_service() {
        let svc = service();
        let reply = svc
            .register(register_req("p1", "127.0.0.1:9"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (reply.lease_ttl_ms, reply.heartbeat_interval_ms),
            (6000, 2000)
        );
        svc.register(register_req("p2", "127.0.0.1:10"))
            .await
            .unwrap();
        for (peer, complete, chunks) in [
            ("p1", true, Bytes::new()),
            ("p2", false, Bytes::from_static(&[1])),
        ] {
            let ann = AnnounceRequest {
                peer_id: peer.into(),
                blobs: vec![pb::BlobAnnouncement {
                    id: BLOB.into(),
                    size: 5 << 20,
                    sha256: format!("sha256:{}", "ab".repeat(32)),
                    complete,
                    chunks,
                }],
                ..Default::default()
            };
            let resp = svc
                .announce(signed(&svc, peer, ann))
                .await
                .unwrap()
                .into_inner();
            assert!(!resp.unknown_peer);
        }
        let find = |blob: String| {
            Request::new(FindProvidersRequest {
                blob,
                ..Default::default()
            })
        };
        let resp = svc
            .find_providers(find(format!("sha256:{}", "AB".repeat(32))))
            .await
            .unwrap();
        let resp = resp.into_inner();
        assert_eq!(resp.id, BLOB);
        assert_eq!(resp.size, 5 << 20);
        let got: Vec<_> = resp
            .providers
            .iter()
            .map(|p| (p.peer_id.as_str(), p.complete))
            .collect();
        assert_eq!(got, [("p1", true), ("p2", false)]);
        assert_eq!(&resp.providers[1].chunks[..], &[1]);
        assert_eq!(resp.providers[0].address, "127.0.0.1:9");

        let status = svc
            .find_providers(find(format!("sha256:{}", "cd".repeat(32))))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let status = svc.find_providers(find("nothex".into())).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let unknown = svc
            .find_providers(find(format!("blake3:{}", "0".repeat(64))))
            .await
            .unwrap();
        let unknown = unknown.into_inner();
        assert_eq!(
            (unknown.id, unknown.size, unknown.providers.len()),
            ("0".repeat(64), 0, 0)
        );
    }

    #[tokio::test]
    async fn unknown_peers_are_told_to_register() {
        let svc = service();
        let hb = HeartbeatRequest {
            peer_id: "ghost".into(),
            load: None,
        };
        assert!(
            svc.heartbeat(signed(&svc, "ghost", hb))
                .await
                .unwrap()
                .into_inner()
                .unknown_peer
        );
        let ann = AnnounceRequest {
            peer_id: "ghost".into(),
            ..Default::default()
        };
        assert!(
            svc.announce(signed(&svc, "ghost", ann))
                .await
                .unwrap()
                .into_inner()
                .unknown_peer
        );
    }

    #[tokio::test]
    async fn bad_input_is_invalid_argument() {
        let svc = service();
        let code = |s: Status| s.code();
        assert_eq!(
            code(
                svc.register(register_req("", "127.0.0.1:1"))
                    .await
                    .unwrap_err()
            ),
            Code::InvalidArgument
        );
        assert_eq!(
            code(svc.register(register_req("p", "")).await.unwrap_err()),
            Code::InvalidArgument
        );
        svc.register(register_req("p", "127.0.0.1:1"))
            .await
            .unwrap();
        let ann = |blobs: Vec<pb::BlobAnnouncement>, removed: Vec<String>| {
            signed(
                &svc,
                "p",
                AnnounceRequest {
                    peer_id: "p".into(),
                    blobs,
                    removed,
                    full_inventory: false,
                },
            )
        };
        let bad_id = pb::BlobAnnouncement {
            id: "zz".into(),
            complete: true,
            ..Default::default()
        };
        assert_eq!(
            code(svc.announce(ann(vec![bad_id], vec![])).await.unwrap_err()),
            Code::InvalidArgument
        );
        let bad_sha = pb::BlobAnnouncement {
            id: BLOB.into(),
            sha256: "sha256:1234".into(),
            complete: true,
            ..Default::default()
        };
        assert_eq!(
            code(svc.announce(ann(vec![bad_sha], vec![])).await.unwrap_err()),
            Code::InvalidArgument
        );
        let huge = vec![String::new(); 100_001];
        let status = svc.announce(ann(vec![], huge)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("100001"), "{}", status.message());
        let report = ReportPeerRequest {
            reporter_id: "p".into(),
            peer_id: "nobody".into(),
            blob: String::new(),
            reason: String::new(),
        };
        // A report about a peer discovery never gave the reporter is refused.
        assert_eq!(
            code(
                svc.report_peer(signed(&svc, "p", report.clone()))
                    .await
                    .unwrap_err()
            ),
            Code::PermissionDenied
        );
        // Without a credential, or with another peer's, nothing counts.
        assert_eq!(
            code(
                svc.report_peer(Request::new(report.clone()))
                    .await
                    .unwrap_err()
            ),
            Code::Unauthenticated
        );
        assert_eq!(
            code(
                svc.report_peer(signed(&svc, "q", report))
                    .await
                    .unwrap_err()
            ),
            Code::PermissionDenied
        );
    }
}
