//! Membership against an in-process control plane on a loopback port, and
//! under paused time against a fake one on a Unix socket (see `fake`).

use std::time::Duration;

use nebula_control::ControlPlane;
use tokio::net::TcpListener;

use super::*;
use crate::Config;

mod fake;

/// Polls `f` every 20 ms for at most 10 s.
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn control_plane() -> ControlPlane {
    control_plane_on(TcpListener::bind("127.0.0.1:0").await.unwrap()).await
}

async fn control_plane_on(listener: TcpListener) -> ControlPlane {
    let config = nebula_control::Config {
        heartbeat_interval: Duration::from_millis(100),
        ..nebula_control::Config::default()
    };
    ControlPlane::spawn(listener, config).await.unwrap()
}

/// A peer's membership running, and the handles its tests read.
struct Member {
    peer_id: String,
    identity: Arc<Identity>,
    uploads: Arc<Uploads>,
    status: Status,
    shutdown: CancellationToken,
    tasks: crate::tasks::Tasks,
}

/// The membership of a peer with a fresh store, against `control`.
fn member(dir: &tempfile::TempDir, control: &str) -> Member {
    let mut config = Config::new(dir.path().join("store"), Some(control.to_owned()));
    config.control_timeout = Duration::from_secs(2);
    config.register_backoff = Duration::from_millis(20);
    config.max_register_backoff = Duration::from_millis(100);
    let (shutdown, tasks) = (CancellationToken::new(), crate::tasks::Tasks::new());
    member_with(config, shutdown, tasks, |identity| {
        ControlClient::new(control, None, identity, Duration::from_secs(2), None)
            .expect("a valid control plane URL")
    })
}

/// The membership of a peer configured by `config`, calling the control
/// plane through the client `connect` builds for its identity.
fn member_with(
    config: Config,
    shutdown: CancellationToken,
    tasks: crate::tasks::Tasks,
    connect: impl FnOnce(Arc<Identity>) -> ControlClient,
) -> Member {
    let store = Arc::new(Store::open(&config.store).expect("a store in a fresh directory opens"));
    let identity = Arc::new(Identity::new(None));
    let uploads = Arc::new(Uploads::new(&config));
    let member = Member {
        peer_id: store.peer_id().to_owned(),
        identity: Arc::clone(&identity),
        uploads: Arc::clone(&uploads),
        status: Status::default(),
        shutdown,
        tasks,
    };
    let membership = Membership {
        config: Arc::new(config),
        store,
        peer_id: member.peer_id.clone(),
        address: "127.0.0.1:1".to_owned(),
        control: connect(Arc::clone(&identity)),
        identity,
        uploads,
        events: Arc::default(),
        status: member.status.clone(),
        shutdown: member.shutdown.clone(),
    };
    member.tasks.spawn(run(membership));
    member
}

async fn stop(peer: &Member) {
    peer.shutdown.cancel();
    assert_eq!(peer.tasks.wait(Duration::from_secs(5)).await, 0);
}

async fn known(cp: &ControlPlane, peer: &str) -> bool {
    let peers = cp.registry().peers().await.unwrap();
    peers.iter().any(|p| p.id.to_string() == peer)
}

/// Polls the control plane's peers every 50 ms, for at most 5 s, until one
/// matches `f`.
async fn until_a_peer(
    cp: &ControlPlane,
    f: impl Fn(&nebula_control::store::PeerSnapshot) -> bool,
) -> bool {
    for _ in 0..100 {
        if cp.registry().peers().await.unwrap().iter().any(&f) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A control plane and a peer registered with it.
async fn registered() -> (ControlPlane, tempfile::TempDir, Member) {
    let cp = control_plane().await;
    let dir = tempfile::tempdir().unwrap();
    let peer = member(&dir, &format!("http://{}", cp.local_addr()));
    assert!(eventually(|| peer.status.is_registered()).await);
    (cp, dir, peer)
}

#[tokio::test]
async fn registers_and_gets_a_credential() {
    let (cp, _dir, peer) = registered().await;
    assert!(peer.identity.credential().is_some());
    assert!(known(&cp, &peer.peer_id).await);
    stop(&peer).await;
    // Deregistered on the way out.
    assert!(!known(&cp, &peer.peer_id).await);
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn heartbeats_carry_the_upload_load() {
    let (cp, _dir, peer) = registered().await;
    peer.uploads.set_active(3);
    let id: nebula_control::PeerId = peer.peer_id.parse().unwrap();
    let reported = until_a_peer(&cp, |p| p.id == id && p.load.active_uploads == 3).await;
    assert!(reported, "a heartbeat reported the uploads in flight");
    stop(&peer).await;
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn registers_again_when_the_control_plane_forgot_it() {
    let (cp, _dir, peer) = registered().await;
    let id: nebula_control::PeerId = peer.peer_id.parse().unwrap();
    assert!(cp.registry().deregister(&id).await.unwrap());
    // The next heartbeat hears "unknown peer" and registers again.
    let back = until_a_peer(&cp, |p| p.id == id).await;
    assert!(back, "the peer registered again");
    stop(&peer).await;
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_control_plane_is_retried_and_reported() {
    // Nothing listens there once the listener is dropped.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let peer = member(&dir, &format!("http://{addr}"));
    let reported = eventually(|| !peer.status.error().is_empty()).await;
    assert!(reported, "the failure is kept for `nebula status`");
    assert!(!peer.status.is_registered());
    // A control plane that comes up there later is registered with.
    let cp = control_plane_on(TcpListener::bind(addr).await.unwrap()).await;
    assert!(eventually(|| peer.status.is_registered()).await);
    stop(&peer).await;
    cp.shutdown().await.unwrap();
}
