//! The control plane as a real process (`nebula control --listen 127.0.0.1:0`)
//! with fake peers in this process: each fake peer serves only
//! `grpc.health.v1` on its own loopback port and talks to the control plane
//! through the generated `ControlPlaneClient`, as a daemon would.
//!
//! The control plane, the fake peers and the clients come from the test kit
//! (`Control::standalone`, `FakePeer`). Every wait is a poll with a
//! deadline; every process is SIGKILLed by pid when its guard drops.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use nebula_control::tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use nebula_proto::v1::{
    AnnounceRequest, BlobAnnouncement, FindProvidersRequest, FindProvidersResponse,
    ListPeersRequest, PeerRequest, RegisterRequest, ReportPeerRequest,
};
use tonic::{Code, Status};

use crate::support::{
    BIN, Control, ControlClient, FakePeer, admin_cli, admin_client, cp_client, join, lazy_channel,
    start_peers, wait_for,
};

/// Timings short enough for tests: leases and probes in hundreds of ms.
const FAST: &[&str] = &[
    "--lease-ttl",
    "1500ms",
    "--heartbeat-interval",
    "500ms",
    "--probe-interval",
    "300ms",
    "--probe-timeout",
    "300ms",
];

/// The contract: with default timings, a dead peer is out of discovery within this.
const CONTRACT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Announcements and discovery.

fn blob_id(n: u8) -> String {
    blake3::hash(&[n]).to_hex().to_string()
}

fn sha_of(n: u8) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest([n]))
}

fn complete(n: u8) -> BlobAnnouncement {
    BlobAnnouncement {
        id: blob_id(n),
        size: 100 << 20,
        sha256: sha_of(n),
        complete: true,
        chunks: Default::default(),
    }
}

fn partial(n: u8, bitmap: &'static [u8]) -> BlobAnnouncement {
    BlobAnnouncement {
        complete: false,
        chunks: bytes::Bytes::from_static(bitmap),
        ..complete(n)
    }
}

async fn find(
    client: &mut ControlClient,
    asker: &str,
    blob: &str,
) -> Result<FindProvidersResponse, Status> {
    let req = FindProvidersRequest {
        peer_id: asker.into(),
        blob: blob.into(),
        limit: 0,
        zone: String::new(),
    };
    client.find_providers(req).await.map(|r| r.into_inner())
}

/// Provider ids of `blob`, best first (empty on error, e.g. while restarting).
async fn providers(client: &mut ControlClient, blob: &str) -> Vec<String> {
    match find(client, "", blob).await {
        Ok(resp) => resp.providers.into_iter().map(|p| p.peer_id).collect(),
        Err(_) => Vec::new(),
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_peers_register_and_are_discovered() {
    let control = Control::standalone(BIN, FAST);
    let url = control.url();
    let mut a = FakePeer::start(&url, None, "peer-a", "z1", vec![complete(1)]).await;
    let _b = FakePeer::start(&url, None, "peer-b", "z2", vec![complete(1)]).await;
    let _c = FakePeer::start(&url, None, "peer-c", "z1", vec![partial(1, &[0b0000_0101])]).await;

    // The control plane itself answers the standard health check.
    let mut health = HealthClient::new(lazy_channel(&url));
    let h = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(h.get_ref().status(), ServingStatus::Serving);

    // Asked by peer-a: never itself; complete before partial.
    let resp = find(&mut a.client, "peer-a", &blob_id(1)).await.unwrap();
    assert_eq!(resp.id, blob_id(1));
    assert_eq!(resp.size, 100 << 20);
    let got: Vec<_> = resp
        .providers
        .iter()
        .map(|p| (p.peer_id.as_str(), p.complete))
        .collect();
    assert_eq!(got, [("peer-b", true), ("peer-c", false)]);
    assert_eq!(&resp.providers[1].chunks[..], &[0b101]);
    assert_eq!(resp.providers[0].address, _b.addr.to_string());

    // By SHA-256 alias, with and without the prefix forms.
    let by_sha = find(&mut a.client, "", &format!("sha256:{}", sha_of(1)))
        .await
        .unwrap();
    assert_eq!(by_sha.id, blob_id(1));
    assert_eq!(by_sha.providers.len(), 3);
    let by_b3 = find(&mut a.client, "", &format!("blake3:{}", blob_id(1)))
        .await
        .unwrap();
    assert_eq!(by_b3.providers.len(), 3);
    // Unknown alias: NOT_FOUND. Unknown BLAKE3 id: OK, nobody has it.
    let err = find(&mut a.client, "", &format!("sha256:{}", sha_of(9)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let none = find(&mut a.client, "", &blob_id(9)).await.unwrap();
    assert_eq!(
        (none.id, none.size, none.providers.len()),
        (blob_id(9), 0, 0)
    );

    // The operator's view.
    let (code, out, err) = control.admin_cli(&["peers", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let peers = v["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 3);
    assert!(
        peers
            .iter()
            .all(|p| p["state"] == "HEALTHY" && p["blob_count"] == 1)
    );
    assert_eq!(peers[0]["labels"]["role"], "test");
    let (code, out, _) = control.admin_cli(&["peers"]).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("PEER") && out.contains("peer-b") && out.contains("HEALTHY"),
        "{out}"
    );
    let (code, out, _) = control
        .admin_cli(&["swarm", &format!("sha256:{}", sha_of(1)), "--json"])
        .await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"], blob_id(1));
    assert_eq!(v["sha256"], sha_of(1));
    let held: Vec<_> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["chunks_held"].as_u64().unwrap())
        .collect();
    assert_eq!(held, [100, 100, 2]);
    let (code, out, _) = control.admin_cli(&["stats", "--json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            v["peers"].as_u64(),
            v["blobs"].as_u64(),
            v["provider_entries"].as_u64()
        ),
        (Some(3), Some(1), Some(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_peer_that_stops_heartbeating_leaves_discovery_in_time() {
    // Default timings: the contract is measured as shipped.
    let control = Control::standalone(BIN, &[]);
    let url = control.url();
    let mut peers = start_peers(&url, None, &["quiet", "steady"], vec![complete(2)]).await;
    for p in &mut peers {
        p.start_heartbeats(Duration::from_secs(2), "z1");
    }
    let mut client = cp_client(&url, None);
    assert_eq!(
        sorted(providers(&mut client, &blob_id(2)).await),
        ["quiet", "steady"]
    );

    // `quiet` stops heartbeating but keeps answering health checks.
    peers[0].stop_heartbeats();
    let took = wait_for(
        CONTRACT + Duration::from_secs(5),
        "the silent peer to leave discovery",
        || {
            let mut c = client.clone();
            async move { providers(&mut c, &blob_id(2)).await == ["steady"] }
        },
    )
    .await;
    eprintln!("the silent peer left discovery {took:?} after its last heartbeat");
    assert!(
        took <= CONTRACT,
        "left after {took:?}; logs:\n{}",
        control.logs()
    );
    // Its next heartbeat is told to register again.
    assert!(
        peers[0].heartbeat().await,
        "a lapsed peer gets unknown_peer"
    );
    assert!(!peers[1].heartbeat().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_peer_whose_server_dies_leaves_discovery_in_time() {
    let control = Control::standalone(BIN, &[]);
    let url = control.url();
    let mut peers = start_peers(&url, None, &["dying", "fine"], vec![complete(3)]).await;
    for p in &mut peers {
        p.start_heartbeats(Duration::from_secs(2), "z1");
    }
    let mut client = cp_client(&url, None);
    assert_eq!(
        sorted(providers(&mut client, &blob_id(3)).await),
        ["dying", "fine"]
    );

    // Its heartbeats keep flowing, so only the health checks can catch it.
    peers[0].stop_health().await;
    let took = wait_for(
        CONTRACT + Duration::from_secs(5),
        "the dead peer to leave discovery",
        || {
            let mut c = client.clone();
            async move { providers(&mut c, &blob_id(3)).await == ["fine"] }
        },
    )
    .await;
    eprintln!("the dead peer left discovery {took:?} after its server stopped");
    assert!(
        took <= CONTRACT,
        "left after {took:?}; logs:\n{}",
        control.logs()
    );
    assert!(!peers[0].heartbeat().await, "its lease is still alive");
    let (code, out, _) = control.admin_cli(&["peers", "--json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dying = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == "dying")
        .unwrap()
        .clone();
    assert_eq!(dying["state"], "UNHEALTHY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_restarted_control_plane_is_repopulated() {
    let mut control = Control::standalone(BIN, FAST);
    let url = control.url();
    let inventory = vec![complete(4), partial(5, &[0b11])];
    let mut peers = start_peers(&url, None, &["r1", "r2", "r3"], inventory).await;
    for p in &mut peers {
        p.start_heartbeats(Duration::from_millis(500), "z1");
    }
    let mut client = cp_client(&url, None);
    assert_eq!(
        sorted(providers(&mut client, &blob_id(4)).await),
        ["r1", "r2", "r3"]
    );

    control.kill();
    let port = control.addr.port();
    let again = Control::standalone_on(BIN, format!("127.0.0.1:{port}").parse().unwrap(), FAST);
    assert_eq!(again.addr.port(), port);
    control = again;
    // Fresh memory: nothing known until the peers' next heartbeats.
    let took = wait_for(
        Duration::from_secs(10),
        "the restarted control plane to be repopulated",
        || {
            let mut c = client.clone();
            async move {
                sorted(providers(&mut c, &blob_id(4)).await) == ["r1", "r2", "r3"]
                    && providers(&mut c, &format!("sha256:{}", sha_of(5)))
                        .await
                        .len()
                        == 3
            }
        },
    )
    .await;
    eprintln!("repopulated {took:?} after the restart");
    for p in &peers {
        assert!(
            p.reregistered.load(Ordering::Relaxed) >= 1,
            "{} registered again",
            p.id
        );
    }
    let resp = find(&mut client, "r1", &blob_id(5)).await.unwrap();
    assert!(
        resp.providers
            .iter()
            .all(|p| !p.complete && p.chunks[..] == [0b11])
    );
    drop(control);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_wrong_join_token_is_refused() {
    let control = Control::standalone(BIN, &["--join-token", "let-me-in"]);
    let url = control.url();
    let reg = || RegisterRequest {
        peer_id: "intruder".into(),
        address: "127.0.0.1:9".into(),
        ..Default::default()
    };
    for token in [None, Some("wrong")] {
        let err = cp_client(&url, token).register(reg()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
        assert!(err.message().contains("join token"), "{}", err.message());
        let err = find(&mut cp_client(&url, token), "", &blob_id(1))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unauthenticated,
            "every peer RPC needs the token"
        );
    }
    cp_client(&url, Some("let-me-in"))
        .register(reg())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_wrong_admin_token_is_refused() {
    let control = Control::standalone(BIN, &["--admin-token", "ops-secret"]);
    let url = control.url();
    for args in [
        &["--admin-token", "wrong", "peers"][..],
        &["peers"],
        &["stats", "--admin-token", "nope"],
    ] {
        let (code, out, err) = admin_cli(BIN, &url, args).await;
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.starts_with("error:"), "{err}");
        assert!(err.contains("admin token"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(out.is_empty());
    }
    let err = admin_client(&url, Some("wrong"))
        .list_peers(ListPeersRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let (code, _, err) = admin_cli(BIN, &url, &["--admin-token", "ops-secret", "peers"]).await;
    assert_eq!(code, 0, "{err}");
    // The token also comes from the environment.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nebula"))
        .args(["admin", "stats", "--json"])
        .env("NEBULA_CONTROL", control.addr.to_string())
        .env("NEBULA_ADMIN_TOKEN", "ops-secret")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_drain_and_ban_change_discovery() {
    let control = Control::standalone(BIN, &["--admin-token", "adm"]);
    let url = control.url();
    let mut peers = start_peers(&url, None, &["d1", "d2", "d3"], vec![complete(6)]).await;
    let mut client = cp_client(&url, None);
    let blob = blob_id(6);
    assert_eq!(
        sorted(providers(&mut client, &blob).await),
        ["d1", "d2", "d3"]
    );

    let (code, out, err) = admin_cli(
        BIN,
        &url,
        &[
            "--admin-token",
            "adm",
            "drain",
            "d1",
            "--reason",
            "maintenance",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("DRAINING"), "{out}");
    assert_eq!(sorted(providers(&mut client, &blob).await), ["d2", "d3"]);
    // A draining peer keeps its lease.
    assert!(!peers[0].heartbeat().await);

    let (code, _, err) = admin_cli(
        BIN,
        &url,
        &[
            "--admin-token",
            "adm",
            "ban",
            "d2",
            "--reason",
            "flaky disk",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(providers(&mut client, &blob).await, ["d3"]);

    let (_, out, _) = admin_cli(BIN, &url, &["--admin-token", "adm", "peers", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let state = |id: &str| {
        let p = v["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["peer_id"] == id)
            .unwrap();
        (
            p["state"].as_str().unwrap().to_owned(),
            p["reason"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(state("d1"), ("DRAINING".into(), "maintenance".into()));
    assert_eq!(state("d2"), ("BANNED".into(), "flaky disk".into()));
    assert_eq!(state("d3").0, "HEALTHY");

    // A ban survives re-registration.
    let d2_addr = peers[1].addr;
    let slot = Arc::clone(&peers[1].slot);
    join(
        &mut peers[1].client,
        &slot,
        "d2",
        d2_addr,
        "z1",
        &[complete(6)],
    )
    .await
    .unwrap();
    assert_eq!(providers(&mut client, &blob).await, ["d3"]);

    for id in ["d1", "d2"] {
        let (code, _, err) = admin_cli(BIN, &url, &["--admin-token", "adm", "unban", id]).await;
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(
        sorted(providers(&mut client, &blob).await),
        ["d1", "d2", "d3"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_two_reports_quarantine_one_does_not() {
    let control = Control::standalone(BIN, &[]);
    let url = control.url();
    let peers = start_peers(
        &url,
        None,
        &["liar", "rep1", "rep2", "honest"],
        vec![complete(7)],
    )
    .await;
    let mut client = peers[1].client.clone();
    let mut rep2 = peers[2].client.clone();
    let blob = blob_id(7);
    let report = |reporter: &str| ReportPeerRequest {
        reporter_id: reporter.into(),
        peer_id: "liar".into(),
        blob: blob_id(7),
        reason: "chunk 3 failed verification".into(),
    };
    // A report counts only once discovery sent the reporter to the provider.
    let status = client.report_peer(report("rep1")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // And a peer reports only as itself.
    let status = client.report_peer(report("rep2")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    find(&mut client, "rep1", &blob).await.unwrap();
    find(&mut rep2, "rep2", &blob).await.unwrap();
    assert!(
        !client
            .report_peer(report("rep1"))
            .await
            .unwrap()
            .into_inner()
            .quarantined
    );
    // The same reporter twice is still one reporter.
    assert!(
        !client
            .report_peer(report("rep1"))
            .await
            .unwrap()
            .into_inner()
            .quarantined
    );
    assert!(
        providers(&mut client, &blob)
            .await
            .contains(&"liar".to_owned())
    );

    assert!(
        rep2.report_peer(report("rep2"))
            .await
            .unwrap()
            .into_inner()
            .quarantined
    );
    assert_eq!(
        sorted(providers(&mut client, &blob).await),
        ["honest", "rep1", "rep2"]
    );

    let (code, out, err) = control.admin_cli(&["peers", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let liar = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == "liar")
        .unwrap()
        .clone();
    assert_eq!(liar["state"], "QUARANTINED");
    assert_eq!(liar["reports"], 2);
    assert_eq!(liar["reason"], "chunk 3 failed verification");

    let (code, _, err) = control.admin_cli(&["unban", "liar"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(providers(&mut client, &blob).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_bad_input_is_refused_without_harm() {
    let control = Control::standalone(BIN, &[]);
    let url = control.url();
    let peer = FakePeer::start(&url, None, "good", "z1", vec![complete(8)]).await;
    let mut client = peer.client.clone();

    let reg = |id: &str, address: &str| RegisterRequest {
        peer_id: id.into(),
        address: address.into(),
        ..Default::default()
    };
    for (id, address) in [
        ("bad id", "127.0.0.1:1"),
        ("", "127.0.0.1:1"),
        ("ok", ""),
        ("ok", "no-port"),
        ("ok", "0.0.0.0:5"),
    ] {
        let err = client.register(reg(id, address)).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{id:?} {address:?}: {}",
            err.message()
        );
    }
    for blob in ["xyz", "sha256:12", "md5:00", &"g".repeat(64)] {
        let err = find(&mut client, "", blob).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{blob:?}");
    }
    let ann = |blobs: Vec<BlobAnnouncement>, removed: Vec<String>| AnnounceRequest {
        peer_id: "good".into(),
        blobs,
        removed,
        full_inventory: false,
    };
    let bad_blob = BlobAnnouncement {
        id: "not-hex".into(),
        ..complete(1)
    };
    let err = client
        .announce(ann(vec![bad_blob], vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A bitmap larger than the blob's geometry allows (100 MiB: 100 chunks, 13 bytes).
    let fat = BlobAnnouncement {
        complete: false,
        chunks: vec![0xff; 14].into(),
        ..complete(1)
    };
    let err = client.announce(ann(vec![fat], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A huge announce: over the 100,000-blob cap.
    let huge: Vec<String> = (0..100_001).map(|_| blob_id(1)).collect();
    let err = client.announce(ann(vec![], huge)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("100001"), "{}", err.message());

    // Admin calls about unknown or malformed peers.
    let mut admin = control.admin_client().await;
    let ghost = PeerRequest {
        peer_id: "ghost".into(),
        reason: String::new(),
    };
    assert_eq!(
        admin.ban_peer(ghost.clone()).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        admin.drain_peer(ghost.clone()).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        admin.unban_peer(ghost).await.unwrap_err().code(),
        Code::NotFound
    );
    let malformed = PeerRequest {
        peer_id: "no spaces".into(),
        reason: String::new(),
    };
    assert_eq!(
        admin.ban_peer(malformed).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let (code, _, err) = control.admin_cli(&["ban", "ghost"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("error:") && err.contains("not registered"),
        "{err}"
    );
    // Malformed ids are refused by the CLI before any network call: exit 2.
    let (code, _, err) = admin_cli(BIN, "127.0.0.1:1", &["swarm", "not-a-blob"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with("error:"), "{err}");
    let (code, _, err) = admin_cli(BIN, "127.0.0.1:1", &["drain", "bad id"]).await;
    assert_eq!(code, 2, "{err}");

    // Still serving, and nothing changed.
    assert_eq!(providers(&mut client, &blob_id(8)).await, ["good"]);
    assert!(!control.logs().contains("panicked"), "{}", control.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_sigterm_stops_cleanly() {
    let mut control = Control::standalone(BIN, FAST);
    let _peer = FakePeer::start(&control.url(), None, "p", "z1", vec![complete(1)]).await;
    let status = tokio::task::block_in_place(|| control.proc.terminate())
        .expect("no exit 15 s after SIGTERM");
    assert!(status.success(), "{status:?}; logs:\n{}", control.logs());
    assert!(control.logs().contains("control plane stopped"));
}
