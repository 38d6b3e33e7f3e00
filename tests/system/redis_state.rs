//! How a control plane reaches Redis: over TLS (`rediss://` with
//! `--state-ca`) and through Sentinel (`redis+sentinel://`, followed across a
//! failover). Redis, Sentinel, the control planes and the daemons are real
//! processes on loopback ports chosen at run time.

use std::time::{Duration, Instant};

use crate::support::{
    BIN, Control, Daemon, RedisServer, Sentinel, TestCa, file_id, nebula, random_file, run_bounded,
    wait_output, wait_until,
};

/// `nebula control` with `args` that must stop at once: its exit code and its stderr.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let key = tempfile::tempdir().unwrap();
    let mut cmd = nebula();
    cmd.args(["control", "--listen", "127.0.0.1:0"]).args(args);
    cmd.arg("--signing-key").arg(key.path().join("signing.key"));
    let out = run_bounded(cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    (out.status.code(), err)
}

/// A daemon adds a file and another fetches it through the control plane at
/// `control`: registration, announcements and discovery all work. Returns
/// the blob's id and the two daemons (alive until dropped).
fn add_and_fetch(dir: &std::path::Path, control: &Control, seed: u64) -> (String, Vec<Daemon>) {
    let daemons: Vec<Daemon> = (0..2)
        .map(|i| Daemon::start(BIN, dir, &format!("d{seed}-{i}"), &control.url(), &[], &[]))
        .collect();
    for d in &daemons {
        d.wait_registered();
    }
    let file = dir.join(format!("blob{seed}.bin"));
    let id = random_file(&file, 3 << 20, seed).to_string();
    assert_eq!(daemons[0].add(&file), id);
    let out = dir.join(format!("out{seed}.bin"));
    let fetch = wait_output(daemons[1].spawn_fetch(&id, &out), Duration::from_secs(60));
    assert!(
        fetch.status.success(),
        "fetch failed: {}\ndaemon log:\n{}",
        String::from_utf8_lossy(&fetch.stderr),
        daemons[1].proc.log_text()
    );
    assert_eq!(file_id(&out).to_string(), id);
    assert!(
        wait_until(Duration::from_secs(10), || control.swarm_members(&id) == 2),
        "both holders listed"
    );
    (id, daemons)
}

#[test]
fn bad_state_values_exit_2_before_any_network_call() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let not_pem = not_pem.to_str().unwrap();
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    for (args, says) in [
        (&["--state", "postgres://x"][..], "not a Redis URL"),
        (
            &["--state", "redis://127.0.0.1:notaport"],
            "not a valid Redis URL",
        ),
        (
            &["--state", "redis+sentinel://127.0.0.1:26379"],
            "no service name",
        ),
        (
            &["--state", "redis+sentinel://127.0.0.1:x/main"],
            "bad port",
        ),
        (
            &["--state", "rediss://127.0.0.1:6380", "--state-ca", not_pem],
            "no PEM certificate",
        ),
        (
            &["--state", "rediss://127.0.0.1:6380", "--state-ca", missing],
            "cannot read",
        ),
        (
            &["--state", "redis://127.0.0.1:6379", "--state-ca", not_pem],
            "does not use TLS",
        ),
    ] {
        let (code, err) = refused(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // Replicas must sign peer credentials with one key.
    let mut cmd = nebula();
    cmd.args([
        "control",
        "--listen",
        "127.0.0.1:0",
        "--state",
        "redis://127.0.0.1:6379",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("error:") && err.contains("--signing-key"),
        "{err}"
    );
}

#[test]
fn rediss_with_state_ca_serves_and_a_wrong_ca_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "redis");
    let stranger = TestCa::new(dir.path(), "stranger");
    let redis = RedisServer::start_tls(&ca);
    let url = redis.url();
    assert!(url.starts_with("rediss://127.0.0.1:"), "{url}");
    let ca_file = ca.ca.to_str().unwrap();

    // Two replicas on the TLS Redis: what one learns, the other answers.
    let tls_args = [
        "--state",
        &url,
        "--state-ca",
        ca_file,
        "--state-timeout",
        "500ms",
    ];
    let listen = "127.0.0.1:0".parse().unwrap();
    let first = Control::start_with(BIN, dir.path(), listen, &tls_args);
    let second = Control::start_with(BIN, dir.path(), listen, &tls_args);
    let (id, _daemons) = add_and_fetch(dir.path(), &first, 1);
    assert_eq!(second.swarm_members(&id), 2);
    // Nothing reaches Redis in the clear: its only port speaks TLS.
    let plain = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "PING"])
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout).trim(), "PONG");

    // A CA that did not sign Redis's certificate, or none (the system's
    // roots): refused at start-up in one line, exit 1.
    let stranger_ca = stranger.ca.to_str().unwrap();
    for args in [
        &["--state", &url, "--state-ca", stranger_ca][..],
        &["--state", &url],
    ] {
        let (code, err) = refused(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!("TLS to Redis at {url} failed"))
                && err.contains("UnknownIssuer")
                && err.contains("--state-ca"),
            "{err}"
        );
    }
}

/// Waits until `sentinel` lists `replica` as a replica of `service` in sync.
fn sentinel_sees_replica(sentinel: &Sentinel, service: &str, replica: &RedisServer) -> bool {
    let listed = sentinel.cli(&["SENTINEL", "replicas", service]);
    let port = replica.port.to_string();
    listed.lines().any(|l| l.trim() == port)
        && replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
}

/// A primary, its replica and a Sentinel (over TLS when `tls` is given); a
/// control plane on `redis+sentinel://` (`rediss+sentinel://`) serves; the
/// primary is SIGKILLed; after Sentinel's failover the control plane serves
/// from the promoted replica.
fn sentinel_failover(tls: Option<&TestCa>) {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = match tls {
        Some(ca) => RedisServer::start_tls(ca),
        None => RedisServer::start(),
    };
    let replica = RedisServer::start_replica_of(&primary);
    let sentinel = Sentinel::start(&primary, "mymaster");
    assert!(
        wait_until(Duration::from_secs(20), || sentinel_sees_replica(
            &sentinel, "mymaster", &replica
        )),
        "the sentinel never saw the replica in sync; sentinel log:\n{}",
        sentinel.log_text()
    );
    let scheme = if tls.is_some() {
        "rediss+sentinel"
    } else {
        "redis+sentinel"
    };
    let url = format!("{scheme}://127.0.0.1:{}/mymaster", sentinel.port);
    let mut args = vec!["--state", &url, "--state-timeout", "500ms"];
    let ca_file = tls.map(|ca| ca.ca.display().to_string());
    if let Some(ca_file) = &ca_file {
        args.extend(["--state-ca", ca_file]);
    }
    let control = Control::start_with(BIN, dir.path(), "127.0.0.1:0".parse().unwrap(), &args);
    let (before, _first_daemons) = add_and_fetch(dir.path(), &control, 2);
    assert_eq!(primary.cli(&["ROLE"]).lines().next(), Some("master"));

    primary.kill();
    let killed = Instant::now();
    // Sentinel promotes the replica (down after 1 s, then an election); the
    // control plane asks again after failed calls and moves to it.
    assert!(
        wait_until(Duration::from_secs(30), || replica
            .cli(&["ROLE"])
            .starts_with("master")),
        "no failover; sentinel log:\n{}",
        sentinel.log_text()
    );
    eprintln!("replica promoted {:?} after the kill", killed.elapsed());
    // Registration and discovery work on the new primary: new daemons join,
    // one adds and the other fetches; the blob known before is listed again
    // (replicated, or re-announced by its holders' next heartbeats).
    let (after, _more_daemons) = add_and_fetch(dir.path(), &control, 3);
    assert!(
        wait_until(Duration::from_secs(10), || control.swarm_members(&before)
            == 2),
        "the blob announced before the failover is listed again"
    );
    eprintln!(
        "control plane serving on the new primary {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(control.swarm_members(&after), 2);
    let log = control.proc.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("Redis primary named by Sentinel")
                && l.contains(&format!("127.0.0.1:{}", replica.port))),
        "control plane did not move to the promoted replica; log:\n{log}"
    );
}

#[test]
fn sentinel_failover_the_control_plane_follows_the_new_primary() {
    sentinel_failover(None);
}

#[test]
fn sentinel_over_tls_failover_the_control_plane_follows_the_new_primary() {
    let dir = tempfile::tempdir().unwrap();
    sentinel_failover(Some(&TestCa::new(dir.path(), "sentinel")));
}

#[test]
fn rediss_client_certificate_for_a_redis_that_asks_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "mutual");
    let redis = RedisServer::start_mutual_tls(&ca);
    let url = redis.url();
    let (ca_file, cert, key) = (
        ca.ca.to_str().unwrap(),
        ca.cert.to_str().unwrap(),
        ca.key.to_str().unwrap(),
    );
    // Without a client certificate, Redis refuses the handshake: exit 1.
    let (code, err) = refused(&["--state", &url, "--state-ca", ca_file]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("TLS to Redis at {url} failed")),
        "{err}"
    );
    // With one (the test CA signed it for client use too), it serves.
    let control = Control::start_with(
        BIN,
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        &[
            "--state",
            &url,
            "--state-ca",
            ca_file,
            "--state-cert",
            cert,
            "--state-key",
            key,
        ],
    );
    let (id, _daemons) = add_and_fetch(dir.path(), &control, 4);
    assert_eq!(control.swarm_members(&id), 2);
    // One of the pair alone is a usage error.
    let mut cmd = nebula();
    cmd.args(["control", "--state", &url, "--state-cert", cert]);
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--state-key"));
}
