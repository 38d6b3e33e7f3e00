//! [`FakePeer`]: a peer in the test process that serves only
//! `grpc.health.v1` on its own loopback port and registers, announces and
//! heartbeats like a daemon, for control-plane tests without daemons.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use nebula_proto::v1::{
    AnnounceRequest, BlobAnnouncement, HeartbeatRequest, Load, RegisterRequest,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Status, transport::Server};

use crate::grpc::{ControlClient, Slot, cp_client_with_slot};

/// A peer that serves only `grpc.health.v1` and registers, announces and
/// heartbeats like a daemon: on `unknown_peer` it registers again and
/// re-announces its whole inventory.
#[derive(Debug)]
pub struct FakePeer {
    /// Its peer id.
    pub id: String,
    /// The address its health server listens on (and it registers).
    pub addr: SocketAddr,
    /// Its control-plane client, presenting its credential.
    pub client: ControlClient,
    /// Where its credential goes.
    pub slot: Slot,
    inventory: Vec<BlobAnnouncement>,
    health_stop: Option<oneshot::Sender<()>>,
    health_task: Option<JoinHandle<()>>,
    beats: Option<JoinHandle<()>>,
    /// Times the heartbeat loop had to register again.
    pub reregistered: Arc<AtomicU32>,
}

impl FakePeer {
    /// Serves health, then registers with the control plane at `url` (with
    /// `token`) in `zone` and announces `inventory`.
    pub async fn start(
        url: &str,
        token: Option<&str>,
        id: &str,
        zone: &str,
        inventory: Vec<BlobAnnouncement>,
    ) -> Self {
        let (tx, rx) = oneshot::channel::<()>();
        let (addr, health_task) = serve_health(id, async {
            let _ = rx.await;
        })
        .await;
        let (client, slot) = cp_client_with_slot(url, token);
        let mut peer = Self {
            id: id.into(),
            addr,
            client,
            slot,
            inventory,
            health_stop: Some(tx),
            health_task: Some(health_task),
            beats: None,
            reregistered: Arc::default(),
        };
        join(
            &mut peer.client,
            &peer.slot,
            &peer.id,
            addr,
            zone,
            &peer.inventory,
        )
        .await
        .unwrap();
        peer
    }

    /// Heartbeats every `every` until stopped.
    pub fn start_heartbeats(&mut self, every: Duration, zone: &str) {
        let (mut client, slot, id, addr, zone) = (
            self.client.clone(),
            Arc::clone(&self.slot),
            self.id.clone(),
            self.addr,
            zone.to_owned(),
        );
        let inventory = self.inventory.clone();
        let reregistered = self.reregistered.clone();
        self.beats = Some(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                let beat = HeartbeatRequest {
                    peer_id: id.clone(),
                    load: Some(Load::default()),
                };
                // The control plane may be down for a while: try again next
                // tick. One that forgot this peer, or restarted with another
                // signing key, is joined again.
                let forgotten = match client.heartbeat(beat).await {
                    Ok(resp) => resp.get_ref().unknown_peer,
                    Err(status) => status.code() == Code::Unauthenticated,
                };
                if forgotten
                    && join(&mut client, &slot, &id, addr, &zone, &inventory)
                        .await
                        .is_ok()
                {
                    reregistered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    /// Stops the heartbeat loop.
    pub fn stop_heartbeats(&mut self) {
        if let Some(task) = self.beats.take() {
            task.abort();
        }
    }

    /// Shuts the health server down (the peer's "process" stops answering).
    pub async fn stop_health(&mut self) {
        if let Some(tx) = self.health_stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.health_task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// One heartbeat without load figures; returns its `unknown_peer`.
    pub async fn heartbeat(&mut self) -> bool {
        let beat = HeartbeatRequest {
            peer_id: self.id.clone(),
            load: None,
        };
        self.client
            .heartbeat(beat)
            .await
            .unwrap()
            .into_inner()
            .unknown_peer
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop_heartbeats();
        if let Some(task) = self.health_task.take() {
            task.abort();
        }
    }
}

/// Serves `grpc.health.v1` on a loopback port of its own, answering SERVING
/// for `nebula.peer.ID` (what the control plane's probe asks) until
/// `shutdown` resolves or the task is aborted.
pub async fn serve_health(
    id: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(
            format!("nebula.peer.{id}"),
            tonic_health::ServingStatus::Serving,
        )
        .await;
    let task = tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await;
    });
    (addr, task)
}

/// Registers and announces the whole inventory, as a daemon does on start and
/// after `unknown_peer`; the credential goes in `slot`.
pub async fn join(
    client: &mut ControlClient,
    slot: &Slot,
    id: &str,
    addr: SocketAddr,
    zone: &str,
    inventory: &[BlobAnnouncement],
) -> Result<(), Status> {
    let reg = RegisterRequest {
        peer_id: id.into(),
        address: addr.to_string(),
        zone: zone.into(),
        labels: [("role".to_owned(), "test".to_owned())].into(),
    };
    let registered = client.register(reg).await?.into_inner();
    *slot.lock().unwrap() = Some(registered.credential.parse().unwrap());
    let ann = AnnounceRequest {
        peer_id: id.into(),
        blobs: inventory.to_vec(),
        removed: Vec::new(),
        full_inventory: true,
    };
    let resp = client.announce(ann).await?;
    assert!(!resp.get_ref().unknown_peer);
    Ok(())
}

/// Starts one [`FakePeer`] per id, all in zone `z1` with `inventory`.
pub async fn start_peers(
    url: &str,
    token: Option<&str>,
    ids: &[&str],
    inventory: Vec<BlobAnnouncement>,
) -> Vec<FakePeer> {
    let mut peers = Vec::new();
    for id in ids {
        peers.push(FakePeer::start(url, token, id, "z1", inventory.clone()).await);
    }
    peers
}
