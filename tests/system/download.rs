//! The multi-source downloader against real daemons: swarming, churn,
//! hanging and lying providers, a control plane that dies, and resume.

use std::{
    process::Child,
    time::{Duration, Instant},
};

use crate::{
    daemon::{fetch_report, sum_sources},
    support::{BIN, TestCluster, file_id, random_file, wait_output, wait_until},
};

const MIB: usize = 1 << 20;

fn finish(child: Child) -> serde_json::Value {
    fetch_report(&wait_output(child, Duration::from_secs(180)))
}

/// Bytes a daemon holds of a blob (from `ls --json`).
fn verified_chunks(d: &crate::support::Daemon, id: &str) -> u64 {
    let ls: serde_json::Value =
        serde_json::from_slice(&d.cli(&["ls", "--json"]).stdout).unwrap_or_default();
    ls["blobs"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["id"] == id))
        .map_or(0, |b| b["chunks_verified"].as_u64().unwrap_or(0))
}

#[test]
fn one_seed_five_fetchers_share_the_load() {
    let c = TestCluster::start_with(BIN, 6, |_| (vec!["--upload-limit", "16MiB/s"], vec![]));
    let size = 48 * MIB;
    let src = c.path("src.bin");
    let id = random_file(&src, size, 10).to_string();
    c.daemons[0].add(&src);
    let started = Instant::now();
    let fetches: Vec<_> = (1..6)
        .map(|i| c.daemons[i].spawn_fetch(&id, &c.path(&format!("out{i}.bin"))))
        .collect();
    let seed_id = c.daemons[0].status()["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut from_seed = 0;
    for (i, f) in fetches.into_iter().enumerate() {
        let report = finish(f);
        assert_eq!(sum_sources(&report), size as u64);
        let seed_part: u64 = report["sources"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["peer_id"] == seed_id.as_str())
            .map(|s| s["bytes"].as_u64().unwrap())
            .sum();
        from_seed += seed_part;
        println!(
            "fetcher {}: {} ms, {} of {} bytes from the seed",
            i + 1,
            report["elapsed_ms"],
            seed_part,
            size
        );
        assert_eq!(
            file_id(&c.path(&format!("out{}.bin", i + 1))).to_string(),
            id
        );
    }
    let uploaded = c.daemons[0].status()["uploaded_bytes"].as_u64().unwrap();
    let copies = uploaded as f64 / size as f64;
    println!(
        "swarm of 5: all done in {:?}; seed uploaded {copies:.2} copies ({from_seed} bytes by the fetchers' count)",
        started.elapsed()
    );
    assert!(
        copies < 4.0,
        "the seed uploaded {copies:.2} copies: fetchers did not serve each other"
    );
}

#[test]
fn churn_killed_and_hanging_providers() {
    // Four complete providers, each limited so the download takes a few seconds.
    let c = TestCluster::start_with(BIN, 5, |i| {
        if i < 4 {
            (vec!["--upload-limit", "12MiB/s"], vec![])
        } else {
            (vec![], vec![])
        }
    });
    let size = 96 * MIB;
    let src = c.path("src.bin");
    let id = random_file(&src, size, 11).to_string();
    for d in &c.daemons[..4] {
        d.add(&src);
    }
    assert!(c.wait_providers(&id, 4), "providers not announced");
    let out = c.path("out.bin");
    let fetcher = &c.daemons[4];
    let started = Instant::now();
    let child = fetcher.spawn_fetch(&id, &out);
    // Once some data is in, kill two providers and freeze a third.
    assert!(wait_until(Duration::from_secs(60), || verified_chunks(
        fetcher, &id
    ) >= 10));
    let mut c = c;
    c.daemons[0].proc.kill();
    c.daemons[1].proc.kill();
    c.daemons[2].proc.signal(libc::SIGSTOP);
    let frozen_at = Instant::now();
    let held = verified_chunks(&c.daemons[4], &id);
    // Work moves to the last provider within seconds.
    let moved = wait_until(Duration::from_secs(20), || {
        verified_chunks(&c.daemons[4], &id) >= held + 8
    });
    println!(
        "after the kills, progress resumed within {:?}",
        frozen_at.elapsed()
    );
    assert!(moved, "no progress after providers died and hung");
    let report = finish(child);
    assert_eq!(file_id(&out).to_string(), id);
    println!(
        "churn: completed in {:?}; sources {}",
        started.elapsed(),
        report["sources"]
    );
    c.daemons[2].proc.signal(libc::SIGCONT);
}

#[cfg(feature = "fault-injection")]
#[test]
fn lying_provider_is_banned_reported_and_quarantined() {
    // Daemon 0 flips bits in everything it serves; 1 and 2 are honest.
    let c = TestCluster::start_with(BIN, 5, |i| {
        let env = if i == 0 {
            vec![("NEBULA_FAULT_CORRUPT", "1")]
        } else {
            vec![]
        };
        (vec!["--upload-limit", "24MiB/s"], env)
    });
    let size = 32 * MIB;
    let src = c.path("src.bin");
    let id = random_file(&src, size, 12).to_string();
    for d in &c.daemons[..3] {
        d.add(&src);
    }
    assert!(c.wait_providers(&id, 3));
    let liar = c.daemons[0].status()["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (n, fetcher) in c.daemons[3..].iter().enumerate() {
        let out = c.path(&format!("out{n}.bin"));
        let report = finish(fetcher.spawn_fetch(&id, &out));
        assert_eq!(
            file_id(&out).to_string(),
            id,
            "corrupt bytes reached the output"
        );
        let log = fetcher.proc.log_text();
        let discarded = log
            .matches("discarding a chunk that failed verification")
            .count();
        println!("fetcher {n}: discarded {discarded} bad chunks");
        assert!(
            discarded >= 1,
            "the liar never lied: is `nebula` built with the fault-injection feature?"
        );
        assert!(
            discarded <= 2,
            "liar not banned after two bad chunks ({discarded})"
        );
        let from_liar: u64 = report["sources"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["peer_id"] == liar.as_str())
            .map(|s| s["bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(from_liar, 0, "a chunk from the liar was stored");
        assert!(log.contains("reported a provider"), "liar not reported");
        // The metrics say the same: every bad chunk rejected, none stored.
        let m = fetcher.proc.metrics();
        assert_eq!(m.get("nebula_chunks_rejected_total"), discarded as f64);
        assert_eq!(
            m.get("nebula_providers_banned_total"),
            if discarded >= 2 { 1.0 } else { 0.0 }
        );
        assert_eq!(
            m.get(r#"nebula_received_bytes_total{source="peer"}"#),
            size as f64
        );
    }
    let m = c.control.proc.metrics();
    assert_eq!(m.get("nebula_control_reports_total"), 2.0);
    assert_eq!(m.get("nebula_control_quarantines_total"), 1.0);
    assert_eq!(m.get(r#"nebula_control_peers{state="quarantined"}"#), 1.0);
    // Two distinct reporters: quarantined. Honest peers untouched.
    let peers = crate::support::run_bounded(
        {
            let mut cmd = c.control.admin();
            cmd.args(["peers", "--json"]);
            cmd
        },
        Duration::from_secs(10),
    );
    let peers: serde_json::Value = serde_json::from_slice(&peers.stdout).unwrap();
    let list = peers["peers"].as_array().unwrap();
    for p in list {
        let state = p["state"].as_str().unwrap_or_default().to_ascii_lowercase();
        if p["peer_id"] == liar.as_str() {
            assert!(state.contains("quarantined"), "liar state {state}");
        } else {
            assert!(state.contains("healthy"), "honest peer in state {state}");
        }
    }
}

#[test]
fn control_plane_killed_mid_download() {
    let c = TestCluster::start_with(BIN, 3, |i| {
        if i < 2 {
            (vec!["--upload-limit", "12MiB/s"], vec![])
        } else {
            (vec![], vec![])
        }
    });
    let size = 64 * MIB;
    let src = c.path("src.bin");
    let id = random_file(&src, size, 13).to_string();
    c.daemons[0].add(&src);
    c.daemons[1].add(&src);
    assert!(c.wait_providers(&id, 2));
    let out = c.path("out.bin");
    let child = c.daemons[2].spawn_fetch(&id, &out);
    assert!(wait_until(Duration::from_secs(60), || verified_chunks(
        &c.daemons[2],
        &id
    ) >= 4));
    let mut c = c;
    c.control.proc.kill();
    let report = finish(child);
    assert_eq!(file_id(&out).to_string(), id);
    println!(
        "finished without the control plane: {}",
        report["elapsed_ms"]
    );
    // Restarted on the same port, it is repopulated by heartbeats.
    c.control.restart();
    let started = Instant::now();
    assert!(c.wait_providers(&id, 3), "control plane not repopulated");
    println!("repopulated {:?} after restart", started.elapsed());
}

#[test]
fn killed_daemon_resumes_its_download() {
    let c = TestCluster::start_with(BIN, 2, |i| {
        if i == 0 {
            (vec!["--upload-limit", "16MiB/s"], vec![])
        } else {
            (vec![], vec![])
        }
    });
    let size = 64 * MIB;
    let src = c.path("src.bin");
    let id = random_file(&src, size, 14).to_string();
    c.daemons[0].add(&src);
    let out = c.path("out.bin");
    let child = c.daemons[1].spawn_fetch(&id, &out);
    assert!(wait_until(Duration::from_secs(60), || verified_chunks(
        &c.daemons[1],
        &id
    ) >= 20));
    let mut c = c;
    c.daemons[1].proc.kill();
    let _ = wait_output(child, Duration::from_secs(30));
    c.daemons[1].restart();
    c.daemons[1].wait_registered();
    let kept = verified_chunks(&c.daemons[1], &id);
    assert!(kept >= 20, "verified chunks lost in the crash: {kept}");
    let report = finish(c.daemons[1].spawn_fetch(&id, &out));
    assert_eq!(file_id(&out).to_string(), id);
    let resumed = report["resumed_bytes"].as_u64().unwrap();
    let fetched = sum_sources(&report);
    println!("resume: {kept} chunks kept, {resumed} bytes resumed, {fetched} fetched again");
    assert_eq!(resumed, kept * MIB as u64);
    assert_eq!(
        resumed + fetched,
        size as u64,
        "re-downloaded more than the missing chunks"
    );
}
