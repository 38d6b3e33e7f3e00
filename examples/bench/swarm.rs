//! Swarm cases: one seed and N fetchers started together, every peer a separate daemon.
//!
//! - `swarm`: every peer limited to U upload; the time until all hold the blob against the lower
//!   bound T* = max(F/U, N·F/(U + N·U)): the seed must send every byte once (F/U), and the N
//!   copies need N·F bytes of upload from the seed and N fetchers together.
//! - `swarm_unlimited`: no limits, a larger blob; aggregate delivered rate against one raw TCP
//!   copy of the same file on the same machine.
//! - `churn`: the `swarm` run with 30% of the fetchers SIGKILLed halfway, against the same run
//!   without faults; the surviving fetchers must complete.

use std::time::Duration;

use anyhow::ensure;
use serde_json::{Value, json};

use crate::{
    Bench, MIB,
    cluster::{self, Cluster, PeerOptions},
    ratio, round,
    transfer::RawCopy,
    transfer_limit,
};

/// One swarm run to measure.
#[derive(Debug, Clone, Copy)]
struct Spec {
    /// Fetchers (N), the seed not included.
    fetchers: usize,
    /// Blob size (F).
    size: u64,
    /// Upload limit of every daemon (U).
    upload_limit: Option<u64>,
    /// How many fetchers to SIGKILL, and when (after the fetches start).
    kill: usize,
    kill_after: Duration,
    /// Also time a raw TCP copy of the blob file.
    raw_reference: bool,
}

/// What a swarm run measured.
#[derive(Debug)]
struct Run {
    /// From the launch of the fetches until the last surviving fetcher held the blob.
    time: Duration,
    /// Per surviving fetcher that succeeded, from launch until it held the blob.
    walls: Vec<Duration>,
    /// Surviving fetchers that failed, with why.
    failures: Vec<String>,
    /// Chunk bytes the seed uploaded.
    seed_uploaded: u64,
    /// The raw TCP copy's times, when asked for.
    raw: Option<RawCopy>,
}

impl Spec {
    fn new(fetchers: usize, size: u64, upload_limit: Option<u64>) -> Self {
        Self {
            fetchers,
            size,
            upload_limit,
            kill: 0,
            kill_after: Duration::ZERO,
            raw_reference: false,
        }
    }

    /// T* = max(F/U, N·F/(U + N·U)), in seconds.
    fn lower_bound(&self) -> Option<f64> {
        let u = self.upload_limit? as f64;
        let (f, n) = (self.size as f64, self.fetchers as f64);
        Some((f / u).max(n * f / (u + n * u)))
    }
}

async fn run(bench: &Bench, spec: Spec) -> anyhow::Result<Run> {
    let mut cluster = Cluster::start(&bench.bin, "bench", false).await?;
    let options = vec![
        PeerOptions {
            upload_limit: spec.upload_limit,
            download_limit: None,
        };
        spec.fetchers + 1
    ];
    cluster.add_peers(&options).await?;
    let (file, id) = cluster.random_blob("blob.bin", spec.size).await?;
    cluster.add(0, &file, &id).await?;
    let raw = if spec.raw_reference {
        let copy = cluster.root().join("raw-copy.bin");
        let limit = transfer_limit(spec.size, 64 * MIB);
        let raw = crate::transfer::raw_tcp_copy(&file, &copy, limit).await?;
        std::fs::remove_file(&copy).ok();
        Some(raw)
    } else {
        None
    };
    std::fs::remove_file(&file).ok();

    let fetchers: Vec<usize> = (1..=spec.fetchers).collect();
    let victims = &fetchers[..spec.kill.min(fetchers.len())];
    // The seed's upload bounds the first copy; allow for a slow swarm, but not forever.
    let per_fetch = spec.upload_limit.unwrap_or(32 * MIB);
    let limit = transfer_limit(spec.size * 2, per_fetch);
    let killer = async {
        if !victims.is_empty() {
            tokio::time::sleep(spec.kill_after).await;
            for &victim in victims {
                cluster.kill_peer(victim);
            }
        }
    };
    let (fetches, ()) = tokio::join!(cluster.fetch_all(&fetchers, &id, limit), killer);
    let fetches = fetches?;

    let mut walls = Vec::new();
    let mut failures = Vec::new();
    let mut time = Duration::ZERO;
    for fetch in fetches.iter().filter(|f| !victims.contains(&f.peer)) {
        time = time.max(fetch.wall);
        if !fetch.ok {
            failures.push(format!("peer{}: {}", fetch.peer, fetch.error));
        } else if !cluster.verify_copy(fetch.peer, &id).await? {
            failures.push(format!(
                "peer{}: the copy does not hash to the id",
                fetch.peer
            ));
        } else {
            walls.push(fetch.wall);
        }
    }
    let seed_uploaded = cluster.uploaded_bytes(0).await?;
    cluster.shutdown().await;
    walls.sort();
    Ok(Run {
        time,
        walls,
        failures,
        seed_uploaded,
        raw,
    })
}

/// The `swarm` and `churn` parameters: N = 8, F = 64 MiB, U = 8 MiB/s (quick: N = 4, 16 MiB).
fn limited_spec(bench: &Bench) -> Spec {
    if bench.quick {
        Spec::new(4, 16 * MIB, Some(8 * MIB))
    } else {
        Spec::new(8, 64 * MIB, Some(8 * MIB))
    }
}

pub(crate) async fn swarm(bench: &Bench) -> anyhow::Result<Value> {
    let spec = limited_spec(bench);
    let run = run(bench, spec).await?;
    let bound = spec.lower_bound();
    let mut line = json!({
        "case": "swarm",
        "fetchers": spec.fetchers,
        "bytes": spec.size,
        "upload_limit_mib_s": spec.upload_limit.map(|u| u as f64 / MIB as f64),
        "time_s": round(run.time.as_secs_f64(), 3),
        "reference": "T* = max(F/U, N*F/(U+N*U))",
        "reference_s": bound.map(|b| round(b, 3)),
        "ratio": ratio(run.time.as_secs_f64(), bound),
        "per_peer_s": spread(&run.walls),
        "seed_upload_copies": round(run.seed_uploaded as f64 / spec.size as f64, 2),
    });
    note_failures(&mut line, &run.failures);
    Ok(line)
}

pub(crate) async fn swarm_unlimited(bench: &Bench) -> anyhow::Result<Value> {
    let mut spec = if bench.quick {
        Spec::new(4, 64 * MIB, None)
    } else {
        Spec::new(8, 512 * MIB, None)
    };
    spec.raw_reference = true;
    let run = run(bench, spec).await?;
    let delivered = spec.size * run.walls.len() as u64;
    let mib_s = cluster::mib_per_s(delivered, run.time);
    let raw_mib_s = run
        .raw
        .map(|raw| cluster::mib_per_s(spec.size, raw.written));
    let mut line = json!({
        "case": "swarm_unlimited",
        "fetchers": spec.fetchers,
        "bytes": spec.size,
        "time_s": round(run.time.as_secs_f64(), 3),
        "delivered_mib_s": round(mib_s, 1),
        "reference": "raw_tcp_copy (one stream, same machine)",
        "reference_mib_s": raw_mib_s.map(|r| round(r, 1)),
        "ratio": ratio(mib_s, raw_mib_s),
        "per_peer_s": spread(&run.walls),
        "seed_upload_copies": round(run.seed_uploaded as f64 / spec.size as f64, 2),
    });
    note_failures(&mut line, &run.failures);
    Ok(line)
}

pub(crate) async fn churn(bench: &Bench) -> anyhow::Result<Value> {
    let calm = limited_spec(bench);
    let baseline = run(bench, calm).await?;
    ensure!(
        baseline.failures.is_empty(),
        "the run without faults failed: {}",
        baseline.failures.join("; ")
    );
    let mut stormy = calm;
    stormy.kill = ((calm.fetchers as f64 * 0.3).round() as usize).max(1);
    stormy.kill_after = baseline.time / 2;
    let churned = run(bench, stormy).await?;
    let survivors = calm.fetchers - stormy.kill;
    let mut line = json!({
        "case": "churn",
        "fetchers": calm.fetchers,
        "killed": stormy.kill,
        "killed_after_s": round(stormy.kill_after.as_secs_f64(), 3),
        "bytes": calm.size,
        "upload_limit_mib_s": calm.upload_limit.map(|u| u as f64 / MIB as f64),
        "time_s": round(churned.time.as_secs_f64(), 3),
        "survivors_completed": churned.walls.len(),
        "survivors": survivors,
        "reference": "the same swarm without faults",
        "reference_s": round(baseline.time.as_secs_f64(), 3),
        "ratio": ratio(churned.time.as_secs_f64(), Some(baseline.time.as_secs_f64())),
        "seed_upload_copies": round(churned.seed_uploaded as f64 / calm.size as f64, 2),
    });
    note_failures(&mut line, &churned.failures);
    Ok(line)
}

/// Min, median and max of sorted durations, in seconds.
fn spread(sorted: &[Duration]) -> Value {
    if sorted.is_empty() {
        return Value::Null;
    }
    let secs = |d: Duration| round(d.as_secs_f64(), 3);
    let mid = sorted.len() / 2;
    let median = if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2
    } else {
        sorted[mid]
    };
    json!({
        "min": secs(sorted[0]),
        "median": secs(median),
        "max": secs(sorted[sorted.len() - 1]),
    })
}

/// A run whose fetchers did not all complete is an error, figures kept beside it.
fn note_failures(line: &mut Value, failures: &[String]) {
    if !failures.is_empty()
        && let Some(obj) = line.as_object_mut()
    {
        obj.insert(
            "error".into(),
            format!(
                "{} fetcher(s) failed: {}",
                failures.len(),
                failures.join("; ")
            )
            .into(),
        );
    }
}
