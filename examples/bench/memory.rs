//! Memory cases.
//!
//! - `memory`: the peak resident memory (`VmHWM`) of a daemon that adds a blob and serves it to
//!   four fetchers, for a small and a large blob (256 MiB and 2 GiB; quick: 32 and 256 MiB). The
//!   store streams to and from disk, so the large blob must not need more memory: the ratio of
//!   the two peaks should stay near 1.
//! - `fleet_memory`: ten daemons each holding one blob and fetching the nine others at once,
//!   against a budget of 128 MiB per daemon; then the same with one daemon flooded.

use std::time::Duration;

use anyhow::ensure;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use nebula_testkit::{DaemonOptions, TestCluster};

use crate::{
    Bench, MIB, cluster,
    flood::{self, Attacker, FloodReport, Target},
    ratio, round, transfer_limit,
};

const FETCHERS: usize = 4;

/// Peaks of the serving daemon, in bytes.
#[derive(Debug)]
struct Peaks {
    /// Over its whole life: start, add, serving.
    overall: u64,
    /// From just after the add (peak reset) until every fetcher holds the blob; `None` where
    /// the kernel does not let us reset the peak.
    serving: Option<u64>,
    /// Chunk bytes it uploaded.
    uploaded: u64,
}

pub(crate) async fn run(bench: &Bench) -> anyhow::Result<Value> {
    let (small, large) = if bench.quick {
        (32 * MIB, 256 * MIB)
    } else {
        (256 * MIB, 2048 * MIB)
    };
    let a = measure(bench, small).await?;
    let b = measure(bench, large).await?;
    let mib = |bytes: u64| round(bytes as f64 / MIB as f64, 1);
    Ok(json!({
        "case": "memory",
        "fetchers": FETCHERS,
        "small_bytes": small,
        "large_bytes": large,
        "small_peak_rss_mib": mib(a.overall),
        "large_peak_rss_mib": mib(b.overall),
        "small_serving_peak_rss_mib": a.serving.map(mib),
        "large_serving_peak_rss_mib": b.serving.map(mib),
        "small_seed_upload_copies": round(a.uploaded as f64 / small as f64, 2),
        "large_seed_upload_copies": round(b.uploaded as f64 / large as f64, 2),
        "reference": "peak with the small blob",
        "ratio": ratio(b.overall as f64, Some(a.overall as f64)),
    }))
}

async fn measure(bench: &Bench, size: u64) -> anyhow::Result<Peaks> {
    let mut cluster = TestCluster::launch(&bench.bin, "bench", cluster::owned(false, false))?;
    cluster.add_daemons(&[DaemonOptions::default(); FETCHERS + 1])?;
    let (file, id) = cluster.random_blob("blob.bin", size).await?;
    cluster.add(0, &file, &id).await?;
    std::fs::remove_file(&file).ok();
    let after_add = cluster.daemons[0].proc.proc_status()?.peak_rss;
    let reset = cluster.daemons[0].proc.reset_peak_rss();
    if let Err(err) = &reset {
        eprintln!("bench: {err:#}; reporting the overall peak only");
    }

    let fetchers: Vec<usize> = (1..=FETCHERS).collect();
    let fetches = cluster
        .fetch_all(&fetchers, &id, transfer_limit(size * 2, 32 * MIB))
        .await?;
    let peak = cluster.daemons[0].proc.proc_status()?.peak_rss;
    for fetch in &fetches {
        ensure!(
            fetch.ok,
            "peer{} failed to fetch {size} bytes: {}",
            fetch.peer,
            fetch.error
        );
        let good = cluster.verify_copy(fetch.peer, &id).await?;
        ensure!(good, "peer{}: the copy does not hash to the id", fetch.peer);
    }
    let uploaded = cluster.uploaded_bytes(0).await?;
    cluster.shutdown();
    Ok(Peaks {
        overall: after_add.max(peak),
        serving: reset.is_ok().then_some(peak),
        uploaded,
    })
}

/// The most a daemon of the `fleet_memory` case may hold resident.
const BUDGET: u64 = 128 * MIB;
/// Daemons of the `fleet_memory` fleet, each holding one blob and fetching the others.
const FLEET: usize = 10;
/// How often the fleet's threads are counted.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// One round of the fleet: every daemon fetches the other daemons' blobs at once.
#[derive(Debug)]
struct Round {
    /// Each daemon's peak resident memory during the round, in bytes (over its whole life
    /// where the peak cannot be reset).
    peaks: Vec<u64>,
    /// Whether `peaks` count from the round's start (the kernel let us reset them).
    reset: bool,
    /// Each daemon's most threads seen.
    threads: Vec<u64>,
    /// From the launch of the fetches until the last ended.
    time: Duration,
    /// Fetches that failed or whose copy does not hash to its id.
    failures: Vec<String>,
    /// What the flood did, when one ran.
    flood: Option<FloodReport>,
}

/// `fleet_memory`: ten daemons each add a blob of its own (100 MiB; quick: 16 MiB), then each
/// fetches the nine others at once while serving its own to nine peers: their peak RSS and
/// threads against the 128 MiB budget, beside an idle daemon of the same run. Then the same
/// round again with daemon 0 flooded (see `flood`): its peak against the budget.
pub(crate) async fn fleet(bench: &Bench) -> anyhow::Result<Value> {
    let size = if bench.quick { 16 * MIB } else { 100 * MIB };
    let mut cluster = TestCluster::launch(&bench.bin, "bench", cluster::owned(false, false))?;
    // The fleet and one daemon that stays idle: the reference.
    cluster.add_daemons(&[DaemonOptions::default(); FLEET + 1])?;
    let idle = FLEET;
    let mut ids = Vec::new();
    for peer in 0..FLEET {
        let (file, id) = cluster
            .random_blob(&format!("blob{peer}.bin"), size)
            .await?;
        cluster.add(peer, &file, &id).await?;
        std::fs::remove_file(&file).ok();
        ids.push(id);
    }

    let honest = fleet_round(&cluster, &ids, size, None).await?;
    ensure!(
        honest.failures.is_empty(),
        "{} fetch(es) failed: {}",
        honest.failures.len(),
        honest.failures.join("; ")
    );
    // Back to one blob each, so the flooded round does the same work.
    for (peer, own) in ids.iter().enumerate() {
        for id in ids.iter().filter(|id| *id != own) {
            cluster.remove(peer, id).await?;
        }
    }
    let target = 0;
    let flooded = fleet_round(&cluster, &ids, size, Some(target)).await?;
    let idle_status = cluster.daemons[idle].proc.proc_status()?;
    cluster.shutdown();

    let mib = |bytes: u64| round(bytes as f64 / MIB as f64, 1);
    let max = honest.peaks.iter().copied().max().unwrap_or(0);
    let flood_peak = flooded.peaks[target];
    let flood = flooded.flood.unwrap_or_default();
    let mut line = json!({
        "case": "fleet_memory",
        "daemons": FLEET,
        "fetches_per_daemon": FLEET - 1,
        "blob_bytes": size,
        "time_s": round(honest.time.as_secs_f64(), 3),
        "peak_rss_mib": mib(max),
        "median_peak_rss_mib": mib(median(&honest.peaks)),
        "per_daemon_peak_rss_mib": honest.peaks.iter().map(|&p| mib(p)).collect::<Vec<_>>(),
        "peaks_from_round_start": honest.reset && flooded.reset,
        "max_threads": honest.threads.iter().max(),
        "idle_rss_mib": mib(idle_status.rss),
        "idle_peak_rss_mib": mib(idle_status.peak_rss),
        "idle_threads": idle_status.threads,
        "budget_mib": BUDGET / MIB,
        "reference": "the budget, 128 MiB (an idle daemon of the same run beside it)",
        "ratio": ratio(max as f64, Some(BUDGET as f64)),
        "flood_time_s": round(flooded.time.as_secs_f64(), 3),
        "flood_target_peak_rss_mib": mib(flood_peak),
        "flood_target_honest_peak_rss_mib": mib(honest.peaks[target]),
        "flood_target_max_threads": flooded.threads[target],
        "flood_fleet_peak_rss_mib": mib(flooded.peaks.iter().copied().max().unwrap_or(0)),
        "flood_ratio": ratio(flood_peak as f64, Some(BUDGET as f64)),
        "flood": {
            "streams": flood.streams,
            "open_failures": flood.open_failures,
            "requests": flood.requests,
            "chunks_asked": flood.chunks_asked,
            "chunks_received": flood.chunks_received,
            "mib_received": mib(flood.bytes_received),
            "busy": flood.busy,
            "errors": flood.errors,
            "over_limit_refused": flood.over_limit_refused,
        },
    });
    crate::swarm::note_failures(&mut line, &flooded.failures);
    Ok(line)
}

/// Every daemon of the fleet fetches every blob but its own, all at once, with `flood` (a
/// daemon's index) flooded meanwhile; then every copy is checked against its id.
async fn fleet_round(
    cluster: &TestCluster,
    ids: &[String],
    size: u64,
    flood: Option<usize>,
) -> anyhow::Result<Round> {
    let fleet: Vec<usize> = (0..ids.len()).collect();
    let mut reset = true;
    for &peer in &fleet {
        if let Err(err) = cluster.daemons[peer].proc.reset_peak_rss() {
            eprintln!("bench: {err:#}; reporting peaks over the daemons' lives");
            reset = false;
            break;
        }
    }
    let attacker = match flood {
        Some(_) => Some(Attacker::register(&cluster.control.url(), "flood").await?),
        None => None,
    };
    let limit = transfer_limit(size * (ids.len() * ids.len()) as u64, 128 * MIB);
    let done = CancellationToken::new();
    let fetching = async {
        let fetches = ids.iter().enumerate().map(|(owner, id)| {
            let others: Vec<usize> = fleet.iter().copied().filter(|&p| p != owner).collect();
            async move { cluster.fetch_all(&others, id, limit).await }
        });
        let fetches = futures::future::join_all(fetches).await;
        done.cancel();
        fetches
    };
    let flooding = async {
        match (flood, &attacker) {
            (Some(target), Some(attacker)) => {
                let target = Target {
                    address: cluster.daemons[target].addr.to_string(),
                    blob: ids[target].clone(),
                    chunks: nebula_common::Geometry::new(size).chunk_count(),
                };
                Some(flood::run(attacker, &target, &done, limit).await)
            }
            _ => None,
        }
    };
    let sampling = sample_threads(cluster, &fleet, &done);
    let (fetches, flood_report, threads) = tokio::join!(fetching, flooding, sampling);
    let threads = threads?;
    let peaks = fleet
        .iter()
        .map(|&peer| cluster.daemons[peer].proc.proc_status().map(|s| s.peak_rss))
        .collect::<anyhow::Result<Vec<u64>>>()?;

    let mut failures = Vec::new();
    let mut time = Duration::ZERO;
    let mut copies = Vec::new();
    for (fetches, id) in fetches.into_iter().zip(ids) {
        for fetch in fetches? {
            time = time.max(fetch.wall);
            if fetch.ok {
                copies.push((fetch.peer, id));
            } else {
                failures.push(format!("peer{} {id}: {}", fetch.peer, fetch.error));
            }
        }
    }
    // Two at a time: each check streams a whole copy out of its daemon and hashes it here.
    let checks = futures::stream::iter(copies)
        .map(|(peer, id)| async move { (peer, id, cluster.verify_copy(peer, id).await) })
        .buffer_unordered(2)
        .collect::<Vec<_>>()
        .await;
    for (peer, id, good) in checks {
        if !good? {
            failures.push(format!(
                "peer{peer}: the copy of {id} does not hash to its id"
            ));
        }
    }
    Ok(Round {
        peaks,
        reset,
        threads,
        time,
        failures,
        flood: flood_report,
    })
}

/// Counts each daemon's threads every [`SAMPLE_EVERY`] until `done`; returns the most seen.
async fn sample_threads(
    cluster: &TestCluster,
    peers: &[usize],
    done: &CancellationToken,
) -> anyhow::Result<Vec<u64>> {
    let mut most = vec![0; peers.len()];
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    // Bounded: the fetches end within their own limits; this is the backstop (an hour).
    for _ in 0..72_000 {
        for (most, &peer) in most.iter_mut().zip(peers) {
            *most = (*most).max(cluster.daemons[peer].proc.proc_status()?.threads);
        }
        tokio::select! {
            () = done.cancelled() => break,
            _ = tick.tick() => {}
        }
    }
    Ok(most)
}

/// The median of some byte counts (the mean of the middle two for an even count).
fn median(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    match sorted.len() {
        0 => 0,
        n if n % 2 == 0 => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
        n => sorted[n / 2],
    }
}
