//! Membership against an in-process control plane on a loopback port.

use std::time::Duration;

use nebula_control::ControlPlane;
use tokio::net::TcpListener;

use super::*;
use crate::Config;

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

/// Shared state of a peer whose membership runs against `control`.
fn member(dir: &tempfile::TempDir, control: &str) -> Arc<Shared> {
    let mut config = Config::new(dir.path().join("store"), Some(control.to_owned()));
    config.control_timeout = Duration::from_secs(2);
    config.register_backoff = Duration::from_millis(20);
    config.max_register_backoff = Duration::from_millis(100);
    let shared = Shared::for_tests(config, None);
    shared.tasks.spawn(run(Arc::clone(&shared)));
    shared
}

async fn stop(shared: &Shared) {
    shared.shutdown.cancel();
    assert_eq!(shared.tasks.wait(Duration::from_secs(5)).await, 0);
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
async fn registered() -> (ControlPlane, tempfile::TempDir, Arc<Shared>) {
    let cp = control_plane().await;
    let dir = tempfile::tempdir().unwrap();
    let shared = member(&dir, &format!("http://{}", cp.local_addr()));
    assert!(eventually(|| shared.registered.load(Ordering::Acquire)).await);
    (cp, dir, shared)
}

#[tokio::test]
async fn registers_and_gets_a_credential() {
    let (cp, _dir, shared) = registered().await;
    assert!(shared.identity.credential().is_some());
    assert!(known(&cp, &shared.peer_id).await);
    stop(&shared).await;
    // Deregistered on the way out.
    assert!(!known(&cp, &shared.peer_id).await);
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn heartbeats_carry_the_upload_load() {
    let (cp, _dir, shared) = registered().await;
    shared.active_uploads.store(3, Ordering::Relaxed);
    let id: nebula_control::PeerId = shared.peer_id.parse().unwrap();
    let reported = until_a_peer(&cp, |p| p.id == id && p.load.active_uploads == 3).await;
    assert!(reported, "a heartbeat reported the uploads in flight");
    stop(&shared).await;
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn registers_again_when_the_control_plane_forgot_it() {
    let (cp, _dir, shared) = registered().await;
    let id: nebula_control::PeerId = shared.peer_id.parse().unwrap();
    assert!(cp.registry().deregister(&id).await.unwrap());
    // The next heartbeat hears "unknown peer" and registers again.
    let back = until_a_peer(&cp, |p| p.id == id).await;
    assert!(back, "the peer registered again");
    stop(&shared).await;
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
    let shared = member(&dir, &format!("http://{addr}"));
    let reported = eventually(|| {
        !shared
            .registration_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    })
    .await;
    assert!(reported, "the failure is kept for `nebula status`");
    assert!(!shared.registered.load(Ordering::Acquire));
    // A control plane that comes up there later is registered with.
    let cp = control_plane_on(TcpListener::bind(addr).await.unwrap()).await;
    assert!(eventually(|| shared.registered.load(Ordering::Acquire)).await);
    stop(&shared).await;
    cp.shutdown().await.unwrap();
}
