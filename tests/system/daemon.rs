//! The peer daemon through its CLI: add, fetch, ls, rm, status, the
//! progress feed, bad input, and a receiver that stops reading.

use std::time::Duration;

use nebula_proto::v1 as pb;

use crate::support::{BIN, TestCluster, file_id, nebula, random_file, run_bounded, wait_output};

#[test]
fn add_on_one_fetch_on_another() {
    let c = TestCluster::start(BIN, 2);
    let src = c.path("src.bin");
    let id = random_file(&src, 5 * (1 << 20) + 123, 1);
    assert_eq!(c.daemons[0].add(&src), id.to_string());
    let out = c.path("out.bin");
    let fetched = c.daemons[1].cli(&[
        "fetch",
        &id.to_string(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    assert_eq!(file_id(&out), id);
    let report: serde_json::Value = serde_json::from_slice(&fetched.stdout).unwrap();
    assert_eq!(report["size"], 5 * (1 << 20) + 123);
    let from_seed: u64 = report["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(from_seed, 5 * (1 << 20) + 123);

    // ls on both: complete, with the SHA-256 alias known.
    for d in &c.daemons {
        let ls: serde_json::Value =
            serde_json::from_slice(&d.cli(&["ls", "--json"]).stdout).unwrap();
        let blob = &ls["blobs"][0];
        assert_eq!(blob["id"], id.to_string());
        assert_eq!(blob["complete"], true);
    }
    // Fetch by sha256: digest, from the other daemon's store, to stdout.
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&src).unwrap()))
    };
    let ok = crate::support::wait_until(Duration::from_secs(10), || {
        let out = c.daemons[1].cli(&["fetch", &format!("sha256:{sha}"), "-o", "-"]);
        out.status.success() && blake3::hash(&out.stdout) == id.to_hash()
    });
    assert!(ok, "fetch by sha256 to stdout");

    // rm, then ls is empty and status counts zero blobs.
    let rm = c.daemons[1].cli(&["rm", &id.to_string()]);
    assert!(rm.status.success());
    let ls: serde_json::Value =
        serde_json::from_slice(&c.daemons[1].cli(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(ls["blobs"].as_array().unwrap().len(), 0);
    let status = c.daemons[1].status();
    assert_eq!(status["blobs"], 0);
    assert_eq!(status["registered"], true);
    assert!(c.daemons[0].status()["uploaded_bytes"].as_u64().unwrap() >= 5 << 20);
    // Removing it again is an error.
    assert_eq!(
        c.daemons[1].cli(&["rm", &id.to_string()]).status.code(),
        Some(1)
    );
}

#[test]
fn progress_feed_is_monotonic_to_completion() {
    let c = TestCluster::start_with(BIN, 2, |i| {
        if i == 0 {
            (vec!["--upload-limit", "40MiB/s"], vec![])
        } else {
            (vec![], vec![])
        }
    });
    let src = c.path("src.bin");
    let id = random_file(&src, 48 << 20, 2);
    c.daemons[0].add(&src);
    let socket = c.daemons[1].socket.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let updates = rt.block_on(async move {
        let mut client = nebula_peer::connect_local(socket).await.unwrap();
        let request = pb::FetchRequest {
            blob: id.to_string(),
            output: String::new(),
            no_provider_timeout_ms: 10_000,
            ..pb::FetchRequest::default()
        };
        let mut stream = client.fetch(request).await.unwrap().into_inner();
        let mut seen = Vec::new();
        while let Some(p) = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .unwrap()
            .unwrap()
        {
            seen.push(p);
        }
        seen
    });
    assert!(
        updates.len() >= 3,
        "expected several progress updates, got {}",
        updates.len()
    );
    for pair in updates.windows(2) {
        assert!(
            pair[1].bytes_done >= pair[0].bytes_done,
            "progress went backwards"
        );
    }
    let last = updates.last().unwrap();
    assert!(last.done);
    assert_eq!(last.bytes_done, 48 << 20);
    assert_eq!(last.total, 48 << 20);
    println!("progress updates: {}", updates.len());
}

fn assert_error_line(out: &std::process::Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
}

#[test]
fn bad_input_through_the_cli() {
    let c = TestCluster::start(BIN, 1);
    let d = &c.daemons[0];
    // A malformed id is refused before any network call: even with no daemon.
    let mut cmd = nebula();
    cmd.args([
        "fetch",
        "not-a-hash",
        "--socket",
        "/nonexistent/nebula.sock",
    ]);
    assert_error_line(
        &run_bounded(cmd, Duration::from_secs(10)),
        2,
        "malformed id",
    );
    assert_error_line(&d.cli(&["rm", "abc"]), 2, "malformed id");
    // An unknown id: no providers, exit 1, within the configured bound.
    let unknown = blake3::hash(b"nobody has this").to_hex().to_string();
    let started = std::time::Instant::now();
    assert_error_line(
        &d.cli(&["fetch", &unknown, "--timeout", "2s"]),
        1,
        "no providers",
    );
    println!("unknown id refused after {:?}", started.elapsed());
    // A missing file for add.
    assert_error_line(
        &d.cli(&["add", c.path("missing.bin").to_str().unwrap()]),
        2,
        "cannot read",
    );
    // An unwritable -o path: nothing written.
    let src = c.path("small.bin");
    let id = random_file(&src, 1000, 3);
    d.add(&src);
    let bad_out = c.path("no-such-dir").join("out.bin");
    assert_error_line(
        &d.cli(&["fetch", &id.to_string(), "-o", bad_out.to_str().unwrap()]),
        1,
        "does not exist",
    );
    assert!(!bad_out.exists());
    // No daemon at the socket: a hint.
    let mut cmd = nebula();
    cmd.args(["ls", "--socket", c.path("nobody.sock").to_str().unwrap()]);
    assert_error_line(
        &run_bounded(cmd, Duration::from_secs(10)),
        1,
        "nebula daemon",
    );
    let mut cmd = nebula();
    cmd.args([
        "fetch",
        &id.to_string(),
        "--socket",
        c.path("nobody.sock").to_str().unwrap(),
    ]);
    assert_error_line(&run_bounded(cmd, Duration::from_secs(10)), 1, "--control");
    // A second daemon on the same store is refused.
    let mut cmd = nebula();
    cmd.args([
        "daemon",
        "--store",
        d.store.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control",
        &c.control.url(),
    ]);
    assert_error_line(&run_bounded(cmd, Duration::from_secs(10)), 1, "in use");
}

#[test]
fn one_shot_fetch_without_a_daemon() {
    let c = TestCluster::start(BIN, 1);
    let src = c.path("src.bin");
    let id = random_file(&src, 3 << 20, 4);
    c.daemons[0].add(&src);
    let out = c.path("oneshot.bin");
    let store = c.path("oneshot-store");
    let mut cmd = nebula();
    cmd.args([
        "fetch",
        &id.to_string(),
        "-o",
        out.to_str().unwrap(),
        "--control",
        &c.control.url(),
    ]);
    cmd.args(["--store", store.to_str().unwrap(), "--json"]);
    let done = run_bounded(cmd, Duration::from_secs(60));
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(file_id(&out), id);
}

/// A receiver that asks for many chunks and never reads: the server's memory
/// stays bounded and its other streams keep flowing.
#[test]
fn a_stalled_receiver_does_not_block_others() {
    let c = TestCluster::start(BIN, 2);
    let src = c.path("src.bin");
    let size = 128usize << 20;
    let id = random_file(&src, size, 5);
    c.daemons[0].add(&src);
    let rss = |pid: i32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let seed_pid = c.daemons[0].proc.pid();
    let before = rss(seed_pid);
    let addr = c.daemons[0].addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Open a stream, ask for every chunk, read nothing; keep it open.
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<()>();
    // Told once the seed is serving the stalled stream (its first piece came).
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let url = c.control.url();
    let stalled = rt.spawn(async move {
        // A fleet member (registered with the join token) that stops reading.
        let member = crate::support::RawPeer::register(&url, "staller", "127.0.0.1:9")
            .await
            .unwrap();
        let mut client =
            pb::peer_exchange_client::PeerExchangeClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(member.hello()).await.unwrap();
        tx.send(pb::ExchangeRequest {
            request_id: 1,
            kind: Some(pb::exchange_request::Kind::GetChunks(pb::GetChunks {
                blob: id.to_string(),
                chunks: (0..128).collect(),
                ..pb::GetChunks::default()
            })),
        })
        .await
        .unwrap();
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("nebula-credential", member.credential.parse().unwrap());
        let mut response = client.exchange(request).await.unwrap().into_inner();
        // One piece read, then nothing more.
        assert!(response.message().await.unwrap().is_some());
        let _ = ready_tx.send(());
        let _hold = (response, tx);
        let _ = stalled_rx.await;
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the stalled stream was not served");
    // Another peer fetches the same blob from the same seed meanwhile.
    let out = c.path("out.bin");
    let fetch = wait_output(
        c.daemons[1].spawn_fetch(&id.to_string(), &out),
        Duration::from_secs(120),
    );
    assert!(
        fetch.status.success(),
        "{}",
        String::from_utf8_lossy(&fetch.stderr)
    );
    assert_eq!(file_id(&out), id);
    let after = rss(seed_pid);
    let growth = after.saturating_sub(before);
    println!(
        "seed RSS before {before} after {after}: growth {growth} bytes while a receiver stalled on 128 MiB"
    );
    assert!(growth < 96 << 20, "seed memory grew by {growth} bytes");
    let _ = stalled_tx.send(());
    rt.block_on(stalled).unwrap();
}

pub(crate) fn sum_sources(report: &serde_json::Value) -> u64 {
    report["sources"].as_array().map_or(0, |s| {
        s.iter().map(|x| x["bytes"].as_u64().unwrap_or(0)).sum()
    })
}

pub(crate) fn fetch_report(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// SIGTERM: the daemon deregisters, removes its socket and exits 0; the
/// socket it served on was private to its user.
#[test]
fn sigterm_stops_the_daemon_cleanly() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = TestCluster::start(BIN, 2);
    let mode = std::fs::metadata(&c.daemons[1].socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let peers = |c: &TestCluster| -> usize {
        let mut cmd = c.control.admin();
        cmd.args(["peers", "--json"]);
        let out = run_bounded(cmd, Duration::from_secs(10));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["peers"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(peers(&c), 2);
    let status = c.daemons[1]
        .proc
        .terminate()
        .expect("daemon did not stop on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(!c.daemons[1].socket.exists(), "socket left behind");
    assert_eq!(peers(&c), 1, "the stopped daemon is still registered");
}
