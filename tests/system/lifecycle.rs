//! A daemon's lifecycle: a part that fails stops it with one `error:` line,
//! and SIGTERM in the middle of transfers ends it cleanly, its store free
//! for the next daemon at once.

use std::time::{Duration, Instant};

use crate::{
    cli::seeded_pair,
    support::{wait_output, wait_until},
};

/// A daemon whose peer server stops accepting (its listener made to fail)
/// exits 1 within a second, naming the part that failed.
#[cfg(feature = "fault-injection")]
#[test]
fn a_daemon_whose_peer_server_fails_exits_1() {
    use crate::support::{free_port, nebula};
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // No control plane listens there: membership keeps retrying, which
    // must not keep the daemon alive.
    let control = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let child = nebula()
        .args(["daemon", "--listen", "127.0.0.1:0", "--control", &control])
        .arg("--store")
        .arg(&store)
        .env("NEBULA_FAULT_PEER_LISTENER", "fail")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(10));
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(took < Duration::from_secs(1), "exited after {took:?}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "stderr:\n{stderr}");
    assert!(
        errors[0].contains("peer server failed"),
        "names the part: {}",
        errors[0]
    );
}

/// SIGTERM while one daemon uploads and the other downloads: both exit 0
/// once their streams and tasks have ended, within the grace period, and a
/// new daemon opens each store at once (the lock was released).
#[test]
fn sigterm_during_transfers_exits_0_and_frees_the_store() {
    let (mut c, id) = seeded_pair("4MiB/s", 64 << 20, 31);
    let out = c.path("out.bin");
    let fetch = c.daemons[1].spawn_fetch(&id, &out);
    let uploading = wait_until(Duration::from_secs(30), || {
        c.daemons[0].status()["uploaded_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0)
    });
    assert!(uploading, "the transfer did not start");
    for d in &mut c.daemons {
        d.proc.signal(libc::SIGTERM);
    }
    for d in &mut c.daemons {
        let started = Instant::now();
        let status = d.proc.terminate();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "log:\n{}",
            d.proc.log_text()
        );
        // The default grace period, with room for a loaded machine.
        assert!(started.elapsed() < Duration::from_secs(8));
        let log = d.proc.log_text();
        assert!(log.contains("node stopped"), "log:\n{log}");
        assert!(!log.contains("did not stop in time"), "log:\n{log}");
    }
    // The interrupted fetch ends with an error, not a hang.
    let fetched = wait_output(fetch, Duration::from_secs(30));
    assert!(!fetched.status.success());
    for d in &mut c.daemons {
        // Panics unless the new daemon comes up on the same store.
        d.restart();
        d.wait_registered();
    }
}
