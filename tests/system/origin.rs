//! Fetches by URL: a real HTTP origin started by the test (it serves `Range`
//! and `ETag`, counts what it sends, and can be slowed, fail, drop a
//! connection, stall, redirect or change its content), real daemons, bytes
//! checked by hash, and the origin's byte count against one copy.

use std::{
    path::Path,
    process::{Child, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::support::{
    BIN, Daemon, TestCluster, nebula, random_file, run_bounded, wait_output, wait_until,
};

#[path = "../../examples/common/origin.rs"]
mod origin_server;

const MIB: usize = 1 << 20;

/// An origin on its own small runtime (the tests themselves are synchronous).
struct TestOrigin {
    origin: origin_server::Origin,
    // Dropped after `origin`, whose drop aborts the server task on it.
    _rt: tokio::runtime::Runtime,
}

impl TestOrigin {
    fn start(data: Vec<u8>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let origin = rt.block_on(origin_server::Origin::start(data)).unwrap();
        Self { origin, _rt: rt }
    }
}

impl TestOrigin {
    /// An `https://` front for this origin on another loopback port: TLS with
    /// `cert`/`key` (PEM files), the plain HTTP behind it. Answers its URL base.
    fn https_front(&self, cert: &str, key: &str) -> String {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let backend = self
            .origin
            .url("")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = self
            ._rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let front = listener.local_addr().unwrap();
        self._rt.spawn(async move {
            // Bounded by the runtime: it ends with the test's origin.
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, backend) = (acceptor.clone(), backend.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut up) = tokio::net::TcpStream::connect(&backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        format!("https://localhost:{}", front.port())
    }
}

impl std::ops::Deref for TestOrigin {
    type Target = origin_server::Origin;
    fn deref(&self) -> &Self::Target {
        &self.origin
    }
}

/// A control plane with `control_flags` and `n` daemons with `daemon_flags`.
fn fleet(n: usize, control_flags: &[&str], daemon_flags: &'static [&'static str]) -> TestCluster {
    TestCluster::start_flagged(BIN, n, control_flags, |_| {
        (daemon_flags.to_vec(), Vec::new())
    })
}

fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    random_file(&p, size, seed);
    std::fs::read(p).unwrap()
}

/// `nebula fetch URL -o OUT --json` on a daemon, in the background.
fn spawn_url_fetch(d: &Daemon, url: &str, out: &Path, extra: &[&str]) -> Child {
    nebula()
        .args([
            "fetch",
            url,
            "-o",
            out.to_str().unwrap(),
            "--json",
            "--progress",
            "none",
        ])
        .args(extra)
        .arg("--socket")
        .arg(&d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "fetch failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn eight_daemons_fetch_one_url_and_the_origin_sends_one_copy() {
    let size = 24 * MIB;
    let data = random_bytes(size, 120);
    let id = blake3::hash(&data).to_hex().to_string();
    let origin = TestOrigin::start(data);
    origin.set_rate(32 << 20);
    let fleet = fleet(8, &[], &[]);
    let url = origin.url("models/m.bin");
    let fetches: Vec<_> = fleet
        .daemons
        .iter()
        .enumerate()
        .map(|(i, d)| spawn_url_fetch(d, &url, &fleet.path(&format!("out{i}")), &[]))
        .collect();
    let (mut origin_total, mut peer_total) = (0, 0);
    for (i, f) in fetches.into_iter().enumerate() {
        let r = report(&wait_output(f, Duration::from_secs(120)));
        assert_eq!(r["id"], id.as_str(), "daemon {i} printed another id");
        let out = std::fs::read(fleet.path(&format!("out{i}"))).unwrap();
        assert_eq!(
            blake3::hash(&out).to_hex().as_str(),
            id,
            "daemon {i}: wrong bytes"
        );
        origin_total += r["origin_bytes"].as_u64().unwrap();
        peer_total += r["peer_bytes"].as_u64().unwrap();
    }
    let sent = origin.sent();
    println!(
        "origin sent {sent} bytes for {size}; fetch reports: {origin_total} from the origin, {peer_total} from peers"
    );
    assert!(
        sent as f64 <= 1.05 * size as f64,
        "the origin sent {:.2} copies",
        sent as f64 / size as f64
    );
    assert_eq!(
        origin_total, sent,
        "the reports account for every origin byte"
    );
    assert!(
        peer_total >= 7 * size as u64,
        "the other seven got it from peers"
    );
}

#[test]
fn a_recorded_url_is_a_swarm_fetch_and_revalidates_after_its_ttl() {
    let size = 4 * MIB;
    let data = random_bytes(size, 121);
    let origin = TestOrigin::start(data.clone());
    let fleet = fleet(3, &["--url-ttl", "2s"], &[]);
    let url = origin.url("a.bin");
    let first = report(&wait_output(
        spawn_url_fetch(&fleet.daemons[0], &url, &fleet.path("o0"), &[]),
        Duration::from_secs(60),
    ));
    assert_eq!(first["origin_bytes"], size as u64);
    // Within the TTL: no request reaches the origin.
    let requests = origin.requests();
    let second = report(&wait_output(
        spawn_url_fetch(&fleet.daemons[1], &url, &fleet.path("o1"), &[]),
        Duration::from_secs(60),
    ));
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["origin_bytes"], 0);
    assert_eq!(second["peer_bytes"], size as u64);
    assert_eq!(
        origin.requests(),
        requests,
        "a fresh record must not ask the origin"
    );
    // Past the TTL: a conditional request, answered 304; still a swarm fetch.
    std::thread::sleep(Duration::from_millis(2500));
    let third = report(&wait_output(
        spawn_url_fetch(&fleet.daemons[2], &url, &fleet.path("o2"), &[]),
        Duration::from_secs(60),
    ));
    assert_eq!(third["id"], first["id"]);
    assert_eq!(third["origin_bytes"], 0);
    assert_eq!(origin.conditional_requests(), 1);
    // Changed at the origin: after the TTL, the new content is the new blob.
    let changed = random_bytes(size, 122);
    let new_id = blake3::hash(&changed).to_hex().to_string();
    origin.replace(changed);
    std::thread::sleep(Duration::from_millis(2500));
    let fourth = report(&wait_output(
        spawn_url_fetch(&fleet.daemons[1], &url, &fleet.path("o3"), &[]),
        Duration::from_secs(60),
    ));
    assert_eq!(fourth["id"], new_id.as_str());
    let out = std::fs::read(fleet.path("o3")).unwrap();
    assert_eq!(blake3::hash(&out).to_hex().as_str(), new_id);
}

#[test]
fn origin_failures_give_clear_errors_and_leave_nothing_at_the_output() {
    let size = 3 * MIB;
    let data = random_bytes(size, 123);
    let sha = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&data))
    };
    let origin = TestOrigin::start(data);
    let fleet = fleet(1, &[], &["--origin-timeout", "2s"]);
    let d = &fleet.daemons[0];
    let fetch = |url: &str, extra: &[&str]| -> (Output, bool) {
        let out = fleet.path("out.bin");
        let _ = std::fs::remove_file(&out);
        let o = wait_output(
            spawn_url_fetch(d, url, &out, extra),
            Duration::from_secs(60),
        );
        (o, out.exists())
    };

    origin.fail_with(404);
    let (o, left) = fetch(&origin.url("missing.bin?sig=SECRET"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let want = format!(
        "error: origin answered 404 Not Found for {}",
        origin.url("missing.bin?…")
    );
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    assert!(!stderr(&o).contains("SECRET"));
    assert!(!left);

    origin.fail_with(500);
    let (o, left) = fetch(&origin.url("a.bin"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("500 Internal Server Error"),
        "{}",
        stderr(&o)
    );
    assert!(!left);
    origin.fail_with(0);

    // Too many redirects.
    let (o, left) = fetch(&origin.url("redirect/11/a.bin"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("more than 10 redirects"),
        "{}",
        stderr(&o)
    );
    assert!(!left);

    // A stalled origin times out.
    origin.stall(true);
    let (o, left) = fetch(&origin.url("stall.bin"), &[]);
    origin.stall(false);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));
    assert!(!left);

    // A digest mismatch keeps nothing, and the blob is not in the store.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let (o, left) = fetch(&origin.url("a.bin"), &["--digest", &wrong]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("does not match --digest"),
        "{}",
        stderr(&o)
    );
    assert!(!left);
    let ls = String::from_utf8_lossy(&d.cli(&["ls", "--json"]).stdout).into_owned();
    assert!(
        !ls.contains(&blake3::hash(&random_bytes(size, 123)).to_hex().to_string()),
        "{ls}"
    );

    // Redirects followed (at most 10), with the right digest.
    let (o, left) = fetch(
        &origin.url("redirect/10/a.bin"),
        &["--digest", &format!("sha256:{sha}")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(left);

    // Bad input: exit 2 before any network call.
    for args in [
        vec!["fetch", "ftp://o.example/a"],
        vec!["fetch", "http://o.example/a", "--digest", "md5:abc"],
        vec!["fetch", "http://o.example/a", "--header", "no colon"],
        vec!["fetch", &"a".repeat(64), "--digest", &wrong],
    ] {
        let mut cmd = nebula();
        cmd.args(&args).arg("--socket").arg(&d.socket);
        let o = run_bounded(cmd, Duration::from_secs(20));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
    }
}

#[test]
fn broken_connections_resume_and_changed_content_is_never_mixed() {
    let size = 40 * MIB;
    let data = random_bytes(size, 124);
    let id = blake3::hash(&data).to_hex().to_string();
    let origin = TestOrigin::start(data);
    let fleet = fleet(1, &[], &["--origin-connections", "2"]);
    let d = &fleet.daemons[0];
    // Dropped mid-body: the broken range resumes where it stopped.
    origin.drop_after(5 * MIB as u64 + 123);
    let r = report(&wait_output(
        spawn_url_fetch(d, &origin.url("big.bin"), &fleet.path("a"), &[]),
        Duration::from_secs(60),
    ));
    assert_eq!(r["id"], id.as_str());
    let sent = origin.sent();
    assert!(
        sent < size as u64 + 2 * MIB as u64,
        "resumed, not restarted: {sent}"
    );
    assert_eq!(d.cli(&["rm", &id]).status.code(), Some(0));

    // Changed between ranges: the download starts over once and yields the
    // new content whole.
    let changed = random_bytes(size, 125);
    let new_id = blake3::hash(&changed).to_hex().to_string();
    origin.set_rate(64 << 20);
    origin.replace_after(10 * MIB as u64, changed);
    let r = report(&wait_output(
        spawn_url_fetch(d, &origin.url("big2.bin"), &fleet.path("b"), &[]),
        Duration::from_secs(60),
    ));
    assert_eq!(r["id"], new_id.as_str());
    let out = std::fs::read(fleet.path("b")).unwrap();
    assert_eq!(blake3::hash(&out).to_hex().as_str(), new_id);
}

#[test]
fn credentials_stay_with_the_origin_and_out_of_logs() {
    // Several 8 MiB ranges: the later ones go straight to the redirect target.
    let data = random_bytes(20 * MIB, 126);
    let origin = TestOrigin::start(data.clone());
    let other = TestOrigin::start(data);
    origin.redirect_elsewhere(&other.url("x.bin"));
    let fleet = fleet(1, &[], &[]);
    let d = &fleet.daemons[0];
    let url = origin
        .url("elsewhere/x.bin?X-Amz-Signature=SIGSECRET")
        .replace("http://", "http://user:PWSECRET@");
    let o = wait_output(
        spawn_url_fetch(
            d,
            &url,
            &fleet.path("c"),
            &["--header", "X-Secret: HDRSECRET"],
        ),
        Duration::from_secs(60),
    );
    report(&o);
    // The origin got the header and the basic credentials; the host it
    // redirected to got neither.
    let seen = origin.credentials_seen();
    assert!(seen.iter().any(|v| v == "HDRSECRET"), "{seen:?}");
    assert!(seen.iter().any(|v| v.starts_with("Basic ")), "{seen:?}");
    assert!(
        other.credentials_seen().is_empty(),
        "{:?}",
        other.credentials_seen()
    );
    // Nothing secret in the daemon's or the control plane's log.
    for log in [d.proc.log_text(), fleet.control.proc.log_text()] {
        for secret in ["HDRSECRET", "PWSECRET", "SIGSECRET"] {
            assert!(!log.contains(secret), "{secret} in a log:\n{log}");
        }
    }
}

#[test]
fn with_the_control_plane_down_a_url_fetch_goes_to_the_origin_and_says_so() {
    let data = random_bytes(2 * MIB, 127);
    let id = blake3::hash(&data).to_hex().to_string();
    let origin = TestOrigin::start(data);
    let mut fleet = fleet(1, &[], &[]);
    fleet.control.proc.kill();
    let o = wait_output(
        spawn_url_fetch(
            &fleet.daemons[0],
            &origin.url("d.bin"),
            &fleet.path("d"),
            &[],
        ),
        Duration::from_secs(60),
    );
    let r = report(&o);
    assert_eq!(r["id"], id.as_str());
    let err = stderr(&o);
    assert_eq!(err.matches("warning:").count(), 1, "{err}");
    assert!(err.contains("straight from the origin"), "{err}");

    // One-shot mode, with no daemon and no control plane: the origin directly.
    let store = fleet.path("oneshot");
    let mut cmd = nebula();
    cmd.args(["fetch", &origin.url("d.bin"), "-o"])
        .arg(fleet.path("e"))
        .arg("--store")
        .arg(&store);
    let o = run_bounded(cmd, Duration::from_secs(60));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = std::fs::read(fleet.path("e")).unwrap();
    assert_eq!(blake3::hash(&out).to_hex().as_str(), id);
}

#[test]
fn a_dead_leaseholder_is_replaced_and_the_survivors_carry_on_from_the_fleets_chunks() {
    let size = 32 * MIB;
    let data = random_bytes(size, 128);
    let id = blake3::hash(&data).to_hex().to_string();
    let origin = TestOrigin::start(data);
    origin.set_rate(8 << 20);
    let mut fleet = fleet(4, &["--origin-lease-ttl", "2s"], &[]);
    let url = origin.url("lease.bin");
    // d0 takes the lease; the others follow it while its download runs.
    let first = spawn_url_fetch(&fleet.daemons[0], &url, &fleet.path("l0"), &[]);
    assert!(wait_until(Duration::from_secs(20), || origin.sent() > MIB as u64));
    let others: Vec<_> = (1..4)
        .map(|i| spawn_url_fetch(&fleet.daemons[i], &url, &fleet.path(&format!("l{i}")), &[]))
        .collect();
    assert!(wait_until(Duration::from_secs(30), || origin.sent() > size as u64 / 2));
    let killed_at = origin.sent();
    fleet.daemons[0].proc.kill();
    let started = Instant::now();
    let _ = wait_output(first, Duration::from_secs(20));
    for (i, f) in others.into_iter().enumerate() {
        let r = report(&wait_output(f, Duration::from_secs(120)));
        assert_eq!(r["id"], id.as_str(), "survivor {}", i + 1);
        let out = std::fs::read(fleet.path(&format!("l{}", i + 1))).unwrap();
        assert_eq!(blake3::hash(&out).to_hex().as_str(), id);
    }
    let sent = origin.sent();
    println!(
        "killed the holder at {:.2} copies; survivors done {:?} later; origin sent {:.2} copies",
        killed_at as f64 / size as f64,
        started.elapsed(),
        sent as f64 / size as f64
    );
    assert!(sent as f64 <= 1.5 * size as f64, "origin sent {sent}");
}

#[test]
fn a_leaseholder_that_lies_is_caught_reported_and_the_bytes_are_right() {
    let size = 16 * MIB;
    let data = random_bytes(size, 129);
    let id = blake3::hash(&data).to_hex().to_string();
    let origin = TestOrigin::start(data);
    origin.set_rate(8 << 20);
    // d0 flips a bit in every chunk it serves (the fault-injection feature).
    let fleet = TestCluster::start_flagged(BIN, 3, &[], |i| {
        let env = if i == 0 {
            vec![("NEBULA_FAULT_CORRUPT", "1")]
        } else {
            vec![]
        };
        (vec![], env)
    });
    let url = origin.url("liar.bin");
    let first = spawn_url_fetch(&fleet.daemons[0], &url, &fleet.path("x0"), &[]);
    assert!(wait_until(Duration::from_secs(20), || origin.sent() > 2 * MIB as u64));
    let others: Vec<_> = (1..3)
        .map(|i| spawn_url_fetch(&fleet.daemons[i], &url, &fleet.path(&format!("x{i}")), &[]))
        .collect();
    report(&wait_output(first, Duration::from_secs(60)));
    for (i, f) in others.into_iter().enumerate() {
        let r = report(&wait_output(f, Duration::from_secs(60)));
        assert_eq!(r["id"], id.as_str());
        let out = std::fs::read(fleet.path(&format!("x{}", i + 1))).unwrap();
        assert_eq!(
            blake3::hash(&out).to_hex().as_str(),
            id,
            "follower {}",
            i + 1
        );
        assert_eq!(r["peer_bytes"], 0, "nothing from the liar was kept");
    }
    let liar = fleet.daemons[0].status()["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut cmd = fleet.control.admin();
    cmd.args(["peers", "--json"]);
    let peers: serde_json::Value =
        serde_json::from_slice(&run_bounded(cmd, Duration::from_secs(20)).stdout).unwrap();
    let reports = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == liar.as_str())
        .map(|p| p["reports"].as_u64().unwrap_or(0));
    assert_eq!(
        reports,
        Some(2),
        "both followers reported the liar: {peers}"
    );
    assert!(
        fleet.daemons[1]
            .proc
            .metrics()
            .get("nebula_chunks_rejected_total")
            >= 1.0
    );
}

#[test]
fn an_https_origin_is_trusted_through_origin_ca_and_refused_without() {
    let data = random_bytes(3 * MIB, 130);
    let id = blake3::hash(&data).to_hex().to_string();
    let origin = TestOrigin::start(data);
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::tls::Pki::new(dir.path(), "origin");
    let (cert, key) = pki.issue("origin");
    let base = origin.https_front(&cert, &key);
    let ca: &'static str = Box::leak(pki.ca().into_boxed_str());
    let fleet = TestCluster::start_flagged(BIN, 2, &[], move |i| {
        let flags = if i == 0 {
            vec!["--origin-ca", ca]
        } else {
            vec![]
        };
        (flags, vec![])
    });
    let url = format!("{base}/secure.bin");
    // Trusted through --origin-ca: the bytes arrive over TLS.
    let r = report(&wait_output(
        spawn_url_fetch(&fleet.daemons[0], &url, &fleet.path("s0"), &[]),
        Duration::from_secs(60),
    ));
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["origin_bytes"], 3 * MIB as u64);
    // Without it, the certificate is refused, and nothing is written.
    let o = wait_output(
        spawn_url_fetch(
            &fleet.daemons[1],
            &format!("{base}/other.bin"),
            &fleet.path("s1"),
            &[],
        ),
        Duration::from_secs(60),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("certificate"), "{}", stderr(&o));
    assert!(!fleet.path("s1").exists());
}

#[test]
fn followers_fetch_from_each_other_when_the_holders_upload_is_limited() {
    let size = 32 * MIB;
    let data = random_bytes(size, 131);
    let id = blake3::hash(&data).to_hex().to_string();
    let origin = TestOrigin::start(data);
    origin.set_rate(16 << 20);
    let fleet = fleet(6, &[], &["--upload-limit", "8MiB/s"]);
    let url = origin.url("mesh.bin");
    let fetches: Vec<_> = fleet
        .daemons
        .iter()
        .enumerate()
        .map(|(i, d)| spawn_url_fetch(d, &url, &fleet.path(&format!("m{i}")), &[]))
        .collect();
    let reports: Vec<serde_json::Value> = fetches
        .into_iter()
        .map(|f| report(&wait_output(f, Duration::from_secs(120))))
        .collect();
    let ids: Vec<String> = fleet
        .daemons
        .iter()
        .map(|d| d.status()["peer_id"].as_str().unwrap().to_owned())
        .collect();
    let holder = reports
        .iter()
        .position(|r| r["origin_bytes"].as_u64().unwrap() > 0)
        .expect("one daemon went to the origin");
    let (mut from_holder, mut from_followers) = (0, 0);
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r["id"], id.as_str());
        let out = std::fs::read(fleet.path(&format!("m{i}"))).unwrap();
        assert_eq!(blake3::hash(&out).to_hex().as_str(), id, "daemon {i}");
        for s in r["sources"].as_array().unwrap() {
            let bytes = s["bytes"].as_u64().unwrap();
            if s["peer_id"] == ids[holder].as_str() {
                from_holder += bytes;
            } else {
                from_followers += bytes;
            }
        }
    }
    println!(
        "origin sent {:.2} copies; followers got {:.2} copies from the holder, {:.2} from each other",
        origin.sent() as f64 / size as f64,
        from_holder as f64 / size as f64,
        from_followers as f64 / size as f64
    );
    assert!(origin.sent() as f64 <= 1.05 * size as f64);
    assert_eq!(from_holder + from_followers, 5 * size as u64);
    assert!(
        from_followers >= size as u64,
        "followers should carry at least one copy among themselves"
    );
}
