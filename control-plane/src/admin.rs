//! The `nebula.v1.Admin` gRPC service: what operators see and do. Errors
//! become `Status` through `From<RegistryError>`, nowhere else.

use std::sync::Arc;

use nebula_common::{ChunkSet, Geometry};
use nebula_proto::v1::{
    GetSwarmRequest, GetSwarmResponse, ListPeersRequest, ListPeersResponse, PeerInfo, PeerRequest,
    PeerState, StatsRequest, StatsResponse, SwarmMember, admin_server::Admin,
};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::{
    registry::{Registry, parse_blob_ref, parse_peer_id},
    service::load_to_wire,
    store::{Health, PeerSnapshot, Standing, StateStore},
};

/// Implements `nebula.v1.Admin` over a [`Registry`].
#[derive(Debug)]
pub struct AdminService<S> {
    registry: Arc<Registry<S>>,
}

impl<S> AdminService<S> {
    /// The service over `registry`.
    pub fn new(registry: Arc<Registry<S>>) -> Self {
        Self { registry }
    }
}

/// The one state an operator sees: the sanction when there is one, else health.
pub fn peer_state(peer: &PeerSnapshot) -> PeerState {
    match (peer.standing, peer.health) {
        (Standing::Banned, _) => PeerState::Banned,
        (Standing::Quarantined, _) => PeerState::Quarantined,
        (Standing::Draining, _) => PeerState::Draining,
        (Standing::Active, Health::Healthy) => PeerState::Healthy,
        (Standing::Active, Health::Unhealthy) => PeerState::Unhealthy,
    }
}

fn peer_info(peer: &PeerSnapshot, now: Instant) -> PeerInfo {
    PeerInfo {
        peer_id: peer.id.to_string(),
        address: peer.address.to_string(),
        zone: peer.zone.to_string(),
        state: peer_state(peer).into(),
        last_seen_ms_ago: now.saturating_duration_since(peer.last_seen).as_millis() as u64,
        load: Some(load_to_wire(peer.load)),
        blob_count: peer.blob_count,
        reason: peer.reason.to_string(),
        reports: peer.reports,
        labels: peer
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

impl<S: StateStore> AdminService<S> {
    async fn set_standing(&self, req: PeerRequest, standing: Standing) -> Result<PeerInfo, Status> {
        let id = parse_peer_id("peer_id", &req.peer_id)?;
        let peer = self
            .registry
            .set_standing(&id, standing, &req.reason)
            .await?;
        Ok(peer_info(&peer, Instant::now()))
    }
}

#[tonic::async_trait]
impl<S: StateStore> Admin for AdminService<S> {
    async fn list_peers(
        &self,
        _req: Request<ListPeersRequest>,
    ) -> Result<Response<ListPeersResponse>, Status> {
        let peers = self.registry.peers().await?;
        let now = Instant::now();
        Ok(Response::new(ListPeersResponse {
            peers: peers.iter().map(|p| peer_info(p, now)).collect(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(blob = %req.get_ref().blob))]
    async fn get_swarm(
        &self,
        req: Request<GetSwarmRequest>,
    ) -> Result<Response<GetSwarmResponse>, Status> {
        let blob = parse_blob_ref("blob", &req.get_ref().blob)?;
        let swarm = self.registry.swarm(blob).await?;
        let chunks = Geometry::new(swarm.meta.size).chunk_count();
        let now = Instant::now();
        let mut members: Vec<SwarmMember> = swarm
            .holders
            .iter()
            .map(|h| SwarmMember {
                peer: Some(peer_info(&h.peer, now)),
                complete: h.chunks.is_none(),
                chunks_held: match &h.chunks {
                    None => u64::from(chunks),
                    Some(bits) => u64::from(ChunkSet::from_bitmap(bits, chunks).count()),
                },
            })
            .collect();
        members.sort_by(|a, b| {
            let id = |m: &SwarmMember| {
                m.peer
                    .as_ref()
                    .map(|p| p.peer_id.clone())
                    .unwrap_or_default()
            };
            b.complete.cmp(&a.complete).then_with(|| id(a).cmp(&id(b)))
        });
        Ok(Response::new(GetSwarmResponse {
            id: swarm.meta.id.to_string(),
            size: swarm.meta.size,
            sha256: swarm.meta.sha256.map(|d| d.to_string()).unwrap_or_default(),
            members,
        }))
    }

    async fn drain_peer(&self, req: Request<PeerRequest>) -> Result<Response<PeerInfo>, Status> {
        self.set_standing(req.into_inner(), Standing::Draining)
            .await
            .map(Response::new)
    }

    async fn ban_peer(&self, req: Request<PeerRequest>) -> Result<Response<PeerInfo>, Status> {
        self.set_standing(req.into_inner(), Standing::Banned)
            .await
            .map(Response::new)
    }

    async fn unban_peer(&self, req: Request<PeerRequest>) -> Result<Response<PeerInfo>, Status> {
        self.set_standing(req.into_inner(), Standing::Active)
            .await
            .map(Response::new)
    }

    async fn stats(&self, _req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let stats = self.registry.stats().await?;
        Ok(Response::new(StatsResponse {
            peers: stats.store.peers,
            healthy_peers: stats.store.healthy_peers,
            blobs: stats.store.blobs,
            provider_entries: stats.store.provider_entries,
            find_providers_served: stats.find_providers_served,
            uptime_ms: stats.uptime.as_millis() as u64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use nebula_proto::v1::{
        AnnounceRequest, BlobAnnouncement, RegisterRequest, control_plane_server::ControlPlane,
    };
    use tonic::Code;

    use super::*;
    use crate::{config::Config, service::ControlPlaneService, store::MemoryStore};

    const BLOB: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    async fn setup() -> AdminService<MemoryStore> {
        let registry = Arc::new(Registry::new(MemoryStore::new(), &Config::default()));
        let cp = ControlPlaneService::new(registry.clone());
        for (id, complete) in [("a", true), ("b", false)] {
            let reg = RegisterRequest {
                peer_id: id.into(),
                address: "127.0.0.1:7".into(),
                ..Default::default()
            };
            cp.register(Request::new(reg)).await.unwrap();
            let ann = AnnounceRequest {
                peer_id: id.into(),
                blobs: vec![BlobAnnouncement {
                    id: BLOB.into(),
                    size: 10 << 20,
                    complete,
                    chunks: if complete {
                        Default::default()
                    } else {
                        vec![0b1011].into()
                    },
                    ..Default::default()
                }],
                ..Default::default()
            };
            cp.announce(crate::identity::signed(registry.identity(), id, ann))
                .await
                .unwrap();
        }
        AdminService::new(registry)
    }

    fn peer_req(id: &str) -> Request<PeerRequest> {
        Request::new(PeerRequest {
            peer_id: id.into(),
            reason: "test".into(),
        })
    }

    #[tokio::test]
    async fn list_swarm_ban_stats() {
        let admin = setup().await;
        let peers = admin
            .list_peers(Request::new(ListPeersRequest {}))
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<_> = peers
            .peers
            .iter()
            .map(|p| (p.peer_id.as_str(), p.state(), p.blob_count))
            .collect();
        assert_eq!(
            ids,
            [("a", PeerState::Healthy, 1), ("b", PeerState::Healthy, 1)]
        );

        let swarm = admin
            .get_swarm(Request::new(GetSwarmRequest { blob: BLOB.into() }))
            .await
            .unwrap()
            .into_inner();
        let members: Vec<_> = swarm
            .members
            .iter()
            .map(|m| {
                (
                    m.peer.as_ref().unwrap().peer_id.as_str(),
                    m.complete,
                    m.chunks_held,
                )
            })
            .collect();
        assert_eq!(members, [("a", true, 10), ("b", false, 3)]);

        let banned = admin.ban_peer(peer_req("a")).await.unwrap().into_inner();
        assert_eq!(
            (banned.state(), banned.reason.as_str()),
            (PeerState::Banned, "test")
        );
        let drained = admin.drain_peer(peer_req("b")).await.unwrap().into_inner();
        assert_eq!(drained.state(), PeerState::Draining);
        let back = admin.unban_peer(peer_req("a")).await.unwrap().into_inner();
        assert_eq!(
            (back.state(), back.reason.as_str()),
            (PeerState::Healthy, "")
        );

        let stats = admin
            .stats(Request::new(StatsRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (stats.peers, stats.blobs, stats.provider_entries),
            (2, 1, 2)
        );
    }

    #[tokio::test]
    async fn unknown_and_malformed_peers() {
        let admin = setup().await;
        assert_eq!(
            admin.ban_peer(peer_req("ghost")).await.unwrap_err().code(),
            Code::NotFound
        );
        assert_eq!(
            admin
                .drain_peer(peer_req("bad id"))
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        assert_eq!(
            admin.unban_peer(peer_req("")).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let bad_blob = Request::new(GetSwarmRequest { blob: "xyz".into() });
        assert_eq!(
            admin.get_swarm(bad_blob).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
