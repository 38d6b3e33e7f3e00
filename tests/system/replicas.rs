//! Control planes on Redis (`--state redis://…`): Redis outages answered with
//! UNAVAILABLE and NOT_SERVING, several replicas as one service. The replicas
//! run in this process on `127.0.0.1:0`, Redis as a child process of its own.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use nebula_common::credential::SigningKey;
use nebula_control::{
    Config, ControlPlane, RedisConfig, RedisStore,
    tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    },
};
use nebula_proto::v1::{
    AnnounceRequest, BlobAnnouncement, FindProvidersRequest, HeartbeatRequest, RegisterRequest,
    control_plane_client::ControlPlaneClient,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::{Code, transport::Channel};

use crate::support::{
    BIN, Control, Daemon, RedisServer, file_id, random_file, serve_health, swarm_members,
    wait_output, wait_until,
};

/// Every replica of a test signs with this one key.
fn fleet_key() -> Option<Arc<SigningKey>> {
    static KEY: std::sync::OnceLock<Arc<SigningKey>> = std::sync::OnceLock::new();
    Some(Arc::clone(
        KEY.get_or_init(|| Arc::new(SigningKey::generate())),
    ))
}

fn fast() -> Config {
    Config {
        signing_key: fleet_key(),
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
async fn health_server(id: &str) -> (SocketAddr, JoinHandle<()>) {
    serve_health(id, std::future::pending()).await
}

fn blob_hex(n: u8) -> String {
    blake3::hash(&[n]).to_hex().to_string()
}

/// `msg` with `id`'s credential, signed with the replicas' key.
fn as_peer<T>(id: &str, msg: T) -> tonic::Request<T> {
    let credential = fleet_key()
        .unwrap()
        .issue(id, "127.0.0.1:1", Duration::from_secs(600));
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("nebula-credential", credential.parse().unwrap());
    req
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
    cp.announce(as_peer(
        id,
        AnnounceRequest {
            peer_id: id.into(),
            blobs: vec![BlobAnnouncement {
                id: blob_hex(blob),
                size: 1 << 20,
                complete: true,
                ..Default::default()
            }],
            removed: Vec::new(),
            full_inventory: true,
        },
    ))
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
                .heartbeat(as_peer(
                    id,
                    HeartbeatRequest {
                        peer_id: id.into(),
                        load: None,
                    },
                ))
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_unavailable_at_once_and_reports_not_serving() {
    let mut redis = RedisServer::start();
    let cp = replica(&redis).await;
    let addr = cp.local_addr();
    let (peer, _server) = health_server("p1").await;
    join(addr, "p1", peer, 1).await;
    assert_eq!(providers(addr, 1).await.unwrap(), ["p1"]);
    assert_eq!(serving(addr).await, Some(ServingStatus::Serving));

    redis.kill();
    // Past the replica's swarm cache (500 ms), which may answer meanwhile.
    tokio::time::sleep(Duration::from_millis(600)).await;
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
        .heartbeat(as_peer(
            "p1",
            HeartbeatRequest {
                peer_id: "p1".into(),
                load: None,
            },
        ))
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
        .heartbeat(as_peer(
            "p1",
            HeartbeatRequest {
                peer_id: "p1".into(),
                load: None,
            },
        ))
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
        let (peer, server) = health_server(name).await;
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
        .heartbeat(as_peer(
            "p0",
            HeartbeatRequest {
                peer_id: "p0".into(),
                load: None,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!beat.unknown_peer);
    for b in beats {
        b.abort();
    }
    r3.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------
// Whole system: replica processes on one Redis, daemons given every URL.

fn all_urls(replicas: &[Control]) -> String {
    replicas
        .iter()
        .map(Control::url)
        .collect::<Vec<_>>()
        .join(",")
}

/// Waits for a fetch and checks it succeeded with the right bytes.
fn fetched(child: std::process::Child, out: &std::path::Path, id: &str, who: &Daemon) {
    let output = wait_output(child, Duration::from_secs(180));
    assert!(
        output.status.success(),
        "fetch failed: {}\ndaemon log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        who.proc.log_text()
    );
    assert_eq!(file_id(out).to_string(), id);
}

#[test]
fn redis_replica_killed_mid_swarm_fetch_every_fetch_completes() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut replicas: Vec<Control> = (0..3)
        .map(|_| Control::start_redis(BIN, dir.path(), &redis.url()))
        .collect();
    let urls = all_urls(&replicas);
    // Every daemon lists replica 0 first: that is the one they all talk to.
    let limit = ["--upload-limit", "16MiB/s"];
    let daemons: Vec<Daemon> = (0..4)
        .map(|i| Daemon::start(BIN, dir.path(), &format!("d{i}"), &urls, &limit, &[]))
        .collect();
    for d in &daemons {
        d.wait_registered();
    }
    let file = dir.path().join("blob.bin");
    let id = random_file(&file, 48 << 20, 14).to_string();
    assert_eq!(daemons[0].add(&file), id);
    assert!(
        wait_until(Duration::from_secs(10), || swarm_members(
            BIN,
            &replicas[1].url(),
            &id
        ) == 1),
        "the seed's announcement is visible through another replica"
    );
    let mut fetches: Vec<_> = (1..4)
        .map(|i| {
            let out = dir.path().join(format!("out{i}.bin"));
            (daemons[i].spawn_fetch(&id, &out), out)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    for (child, _) in &mut fetches {
        assert!(child.try_wait().unwrap().is_none(), "fetch still running");
    }
    replicas[0].proc.kill();
    for (i, (child, out)) in fetches.into_iter().enumerate() {
        fetched(child, &out, &id, &daemons[i + 1]);
    }
    // Every daemon moved on (its heartbeats go to the next replica).
    for d in &daemons {
        assert!(
            wait_until(Duration::from_secs(5), || d
                .proc
                .log_text()
                .contains("moved to another replica")),
            "daemon did not fail over; log:\n{}",
            d.proc.log_text()
        );
    }
    // Discovery through the survivors knows every copy.
    for r in &replicas[1..] {
        assert!(
            wait_until(Duration::from_secs(10), || swarm_members(
                BIN,
                &r.url(),
                &id
            ) == 4),
            "every holder listed by {}",
            r.url()
        );
    }
    // `nebula admin` given every URL, the dead one first, uses the next.
    assert_eq!(swarm_members(BIN, &urls, &id), 4);
    // A replica started afresh answers from Redis at once.
    replicas[0] = Control::start_redis(BIN, dir.path(), &redis.url());
    assert_eq!(swarm_members(BIN, &replicas[0].url(), &id), 4);
    for d in &daemons {
        assert!(d.status()["registered"].as_bool().unwrap_or(false));
    }
}

#[test]
fn redis_restarted_empty_mid_fetch_the_fetch_completes_and_discovery_is_repopulated() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Control> = (0..3)
        .map(|_| Control::start_redis(BIN, dir.path(), &redis.url()))
        .collect();
    let urls = all_urls(&replicas);
    let limit = ["--upload-limit", "16MiB/s"];
    let daemons: Vec<Daemon> = (0..3)
        .map(|i| Daemon::start(BIN, dir.path(), &format!("d{i}"), &urls, &limit, &[]))
        .collect();
    for d in &daemons {
        d.wait_registered();
    }
    let file = dir.path().join("blob.bin");
    let id = random_file(&file, 48 << 20, 15).to_string();
    assert_eq!(daemons[0].add(&file), id);
    assert!(wait_until(Duration::from_secs(10), || {
        swarm_members(BIN, &replicas[0].url(), &id) == 1
    }));
    let mut fetches: Vec<_> = (1..3)
        .map(|i| {
            let out = dir.path().join(format!("out{i}.bin"));
            (daemons[i].spawn_fetch(&id, &out), out)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(600));
    redis.kill();
    for (child, _) in &mut fetches {
        assert!(child.try_wait().unwrap().is_none(), "fetch still running");
    }
    std::thread::sleep(Duration::from_millis(500));
    redis.restart_empty();
    let restarted = Instant::now();
    // Heartbeats (every 500 ms) meet an empty Redis: the daemons register
    // again and re-announce their whole inventory.
    assert!(
        wait_until(Duration::from_secs(10), || {
            swarm_members(BIN, &replicas[1].url(), &id) >= 1
        }),
        "discovery not repopulated"
    );
    let took = restarted.elapsed();
    eprintln!("discovery repopulated {took:?} after Redis came back empty");
    // One heartbeat interval (500 ms) plus the poll and the admin call.
    assert!(took < Duration::from_millis(2500), "{took:?}");
    for (i, (child, out)) in fetches.into_iter().enumerate() {
        fetched(child, &out, &id, &daemons[i + 1]);
    }
    assert!(
        wait_until(Duration::from_secs(10), || swarm_members(
            BIN,
            &replicas[2].url(),
            &id
        ) == 3),
        "every holder listed after the fetches"
    );
}

#[test]
fn control_urls_may_name_hosts_daemon_and_admin_resolve_them() {
    // `localhost` resolves to 127.0.0.1 here (a name with several addresses
    // counts once per address: see nebula-peer's `replicas` and `control`
    // unit tests, which hand such names to the resolver seam).
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let control = Control::start_redis(BIN, dir.path(), &redis.url());
    let by_name = format!("http://localhost:{}", control.addr.port());
    let daemon = Daemon::start(BIN, dir.path(), "d0", &by_name, &[], &[]);
    daemon.wait_registered();
    let file = dir.path().join("blob.bin");
    let id = random_file(&file, 1 << 20, 16).to_string();
    assert_eq!(daemon.add(&file), id);
    assert!(wait_until(Duration::from_secs(10), || swarm_members(
        BIN, &by_name, &id
    ) == 1));
}
