//! `origin_fanout`: N daemons fetch one URL from an HTTP origin limited to U_o at once. The
//! time until all hold it against F/U_o (the origin sending one copy at its full rate), and the
//! bytes the origin sent against F; beside it, in the same run, the same N fetches made straight
//! from the origin (`nebula fetch URL` with no daemon and no control plane: N copies), what a
//! fleet without Nebula would do.

use std::{ffi::OsStr, process::Stdio, time::Instant};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

use nebula_testkit::{DaemonOptions, TestCluster};

use crate::{Bench, MIB, cluster, origin_server::Origin, ratio, round, transfer_limit};

pub(crate) async fn origin_fanout(bench: &Bench) -> anyhow::Result<Value> {
    let (n, size, rate) = if bench.quick {
        (8, 64 * MIB, 32 * MIB)
    } else {
        (8, 256 * MIB, 32 * MIB)
    };
    let mut cluster = TestCluster::launch(&bench.bin, "bench", cluster::owned(false, false))?;
    cluster.add_daemons(&vec![DaemonOptions::default(); n])?;
    let (file, id) = cluster.random_blob("origin.bin", size).await?;
    let data = std::fs::read(&file).context("reading the origin's file")?;
    std::fs::remove_file(&file).ok();
    let origin = Origin::start(data).await?;
    origin.set_rate(rate);
    let ideal = size as f64 / rate as f64;
    let limit = transfer_limit(size * 3, rate);

    // Through the swarm: one URL, N daemons at once.
    let url = origin.url("fleet/model.bin");
    let peers: Vec<usize> = (0..n).collect();
    let fetches = cluster.fetch_all(&peers, &url, limit).await?;
    let mut time = 0f64;
    let mut origin_reported = 0;
    for f in &fetches {
        ensure!(f.ok, "peer{}: {}", f.peer, f.error);
        ensure!(f.report["id"] == id.as_str(), "peer{}: another id", f.peer);
        ensure!(
            cluster.verify_copy(f.peer, &id).await?,
            "peer{}: the copy does not hash to the id",
            f.peer
        );
        time = time.max(f.wall.as_secs_f64());
        origin_reported += f.report["origin_bytes"].as_u64().unwrap_or(0);
    }
    let sent = origin.sent();
    ensure!(
        origin_reported == sent,
        "the fetches report {origin_reported} origin bytes, the origin sent {sent}"
    );

    // The reference: the same N fetches, each straight from the origin.
    let direct_url = origin.url("direct/model.bin");
    let before = origin.sent();
    let started = Instant::now();
    let mut running = Vec::new();
    for i in 0..n {
        let store = cluster.dir.path().join(format!("direct-{i}"));
        std::fs::create_dir_all(&store)?;
        let args = [
            OsStr::new("fetch"),
            OsStr::new(&direct_url),
            "--store".as_ref(),
            store.as_os_str(),
            "--json".as_ref(),
            "--progress".as_ref(),
            "none".as_ref(),
        ];
        let mut cmd = cluster::nebula_command(&bench.bin, &args);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().context("cannot start nebula fetch")?;
        running.push(async move {
            let out = tokio::time::timeout(limit * n as u32, child.wait_with_output()).await;
            (started.elapsed(), out)
        });
    }
    let mut direct_time = 0f64;
    for (wall, out) in futures::future::join_all(running).await {
        let out = out.context("a direct fetch timed out")??;
        ensure!(
            out.status.success(),
            "a direct fetch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let report: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(report["id"] == id.as_str(), "a direct fetch got another id");
        direct_time = direct_time.max(wall.as_secs_f64());
    }
    let direct_sent = origin.sent() - before;
    cluster.shutdown();
    Ok(json!({
        "case": "origin_fanout",
        "fetchers": n,
        "size_mib": size / MIB,
        "origin_limit_mib_s": rate / MIB,
        "time_s": round(time, 2),
        "ideal_s": round(ideal, 2),
        "time_vs_ideal": ratio(time, Some(ideal)),
        "origin_copies": ratio(sent as f64, Some(size as f64)),
        "direct_time_s": round(direct_time, 2),
        "direct_origin_copies": ratio(direct_sent as f64, Some(size as f64)),
        "time_vs_direct": ratio(time, Some(direct_time)),
    }))
}
