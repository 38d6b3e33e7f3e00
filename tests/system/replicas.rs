//! Control planes on Redis (`--state redis://…`): Redis outages answered with
//! UNAVAILABLE and NOT_SERVING, several replicas as one service. The replicas
//! run in this process on `127.0.0.1:0`, Redis as a child process of its own.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use nebula_control::{
    Config, ControlPlane, RedisConfig, RedisStore,
    tonic_health::{
        self,
        pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        },
    },
};
use nebula_proto::v1::{
    AnnounceRequest, BlobAnnouncement, FindProvidersRequest, HeartbeatRequest, RegisterRequest,
    control_plane_client::ControlPlaneClient,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, transport::Channel};

use crate::support::{RedisServer, nebula, run_bounded};

fn fast() -> Config {
    Config {
        lease_ttl: Duration::from_millis(3000),
        heartbeat_interval: Duration::from_millis(500),
        probe_interval: Duration::from_millis(300),
        probe_timeout: Duration::from_millis(300),
        store_check_interval: Duration::from_millis(200),
        ..Config::default()
    }
}

async fn replica(redis: &RedisServer) -> ControlPlane<RedisStore> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut state = RedisConfig::new(&redis.url()).unwrap();
    state.op_timeout = Duration::from_millis(500);
    ControlPlane::spawn_redis(listener, fast(), state)
        .await
        .unwrap()
}

fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// A peer's health server on its own port; aborting the task kills it.
async fn health_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, service) = tonic_health::server::health_reporter();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    (addr, task)
}

fn blob_hex(n: u8) -> String {
    blake3::hash(&[n]).to_hex().to_string()
}

async fn join(addr: SocketAddr, id: &str, peer: SocketAddr, blob: u8) {
    let mut cp = ControlPlaneClient::new(channel(addr));
    cp.register(RegisterRequest {
        peer_id: id.into(),
        address: peer.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    cp.announce(AnnounceRequest {
        peer_id: id.into(),
        blobs: vec![BlobAnnouncement {
            id: blob_hex(blob),
            size: 1 << 20,
            complete: true,
            ..Default::default()
        }],
        removed: Vec::new(),
        full_inventory: true,
    })
    .await
    .unwrap();
}

async fn providers(addr: SocketAddr, blob: u8) -> Result<Vec<String>, tonic::Status> {
    let mut cp = ControlPlaneClient::new(channel(addr));
    let answer = cp
        .find_providers(FindProvidersRequest {
            blob: blob_hex(blob),
            ..Default::default()
        })
        .await?;
    let mut ids: Vec<String> = answer
        .into_inner()
        .providers
        .into_iter()
        .map(|p| p.peer_id)
        .collect();
    ids.sort();
    Ok(ids)
}

async fn serving(addr: SocketAddr) -> Option<ServingStatus> {
    let mut health = HealthClient::new(channel(addr));
    let answer = health
        .check(HealthCheckRequest {
            service: "nebula.v1.ControlPlane".into(),
        })
        .await
        .ok()?;
    Some(answer.into_inner().status())
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {limit:?}");
}

/// Heartbeats `id` through `addr` every 300 ms until aborted.
fn keep_alive(addr: SocketAddr, id: &'static str) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut cp = ControlPlaneClient::new(channel(addr));
        // Bounded: the test aborts it long before.
        for _ in 0..1000 {
            let _ = cp
                .heartbeat(HeartbeatRequest {
                    peer_id: id.into(),
                    load: None,
                })
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[test]
fn redis_state_refuses_tls_and_sentinel_with_exit_2() {
    for (url, says) in [
        ("rediss://127.0.0.1:6380", "rediss://"),
        ("redis+sentinel://127.0.0.1:26379/main", "sentinel"),
        ("postgres://x", "not a Redis URL"),
    ] {
        let mut cmd = nebula();
        cmd.args(["control", "--listen", "127.0.0.1:0", "--state", url]);
        let out = run_bounded(cmd, Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {err}");
        assert!(err.starts_with("error: ") && err.contains(says), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_unavailable_at_once_and_reports_not_serving() {
    let mut redis = RedisServer::start();
    let cp = replica(&redis).await;
    let addr = cp.local_addr();
    let (peer, _server) = health_server().await;
    join(addr, "p1", peer, 1).await;
    assert_eq!(providers(addr, 1).await.unwrap(), ["p1"]);
    assert_eq!(serving(addr).await, Some(ServingStatus::Serving));

    redis.kill();
    let start = Instant::now();
    let err = providers(addr, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let mut cp_client = ControlPlaneClient::new(channel(addr));
    let start = Instant::now();
    let err = cp_client
        .heartbeat(HeartbeatRequest {
            peer_id: "p1".into(),
            load: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(start.elapsed() < Duration::from_secs(2));
    eventually(
        Duration::from_secs(5),
        "NOT_SERVING while Redis is down",
        || async { serving(addr).await == Some(ServingStatus::NotServing) },
    )
    .await;

    // Redis back, empty: serving again, and the peer is told to register again.
    redis.restart_empty();
    eventually(
        Duration::from_secs(10),
        "SERVING once Redis is back",
        || async { serving(addr).await == Some(ServingStatus::Serving) },
    )
    .await;
    let answer = cp_client
        .heartbeat(HeartbeatRequest {
            peer_id: "p1".into(),
            load: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.unknown_peer);
    join(addr, "p1", peer, 1).await;
    assert_eq!(providers(addr, 1).await.unwrap(), ["p1"]);
    cp.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replicas_are_one_service_and_take_over_probing() {
    let redis = RedisServer::start();
    let (r1, r2, r3) = (
        replica(&redis).await,
        replica(&redis).await,
        replica(&redis).await,
    );
    let addrs = [r1.local_addr(), r2.local_addr(), r3.local_addr()];
    // Six peers registered through different replicas; every replica answers
    // for all of them.
    let names = ["p0", "p1", "p2", "p3", "p4", "p5"];
    let mut servers = Vec::new();
    let mut beats = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let (peer, server) = health_server().await;
        join(addrs[i % 3], name, peer, 9).await;
        servers.push(server);
        // Heartbeats through the replica that stays up.
        beats.push(keep_alive(addrs[2], name));
    }
    for addr in addrs {
        assert_eq!(providers(addr, 9).await.unwrap(), names);
    }
    // Replicas 1 and 2 die; then every peer's health server dies too. Whoever
    // probed them before, replica 3 now probes all and takes them out of
    // discovery: 3 failed probes of 300 ms, plus the takeover (a replica is
    // dropped from the list one probe interval and timeout after its last round).
    drop(r1);
    drop(r2);
    for s in &servers {
        s.abort();
    }
    let took = eventually(
        Duration::from_secs(6),
        "dead peers out of discovery after their probers died",
        || async {
            providers(addrs[2], 9)
                .await
                .map(|p| p.is_empty())
                .unwrap_or(false)
        },
    )
    .await;
    eprintln!("dead peers left discovery after {took:?}");
    assert!(took < Duration::from_secs(6));
    // They still hold leases (heartbeats go on): only probing removed them.
    let mut cp = ControlPlaneClient::new(channel(addrs[2]));
    let beat = cp
        .heartbeat(HeartbeatRequest {
            peer_id: "p0".into(),
            load: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!beat.unknown_peer);
    for b in beats {
        b.abort();
    }
    r3.shutdown().await.unwrap();
}
