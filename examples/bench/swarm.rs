//! Swarm cases: one seed and N fetchers started together, every peer a separate daemon.
//!
//! - `swarm`: every peer limited to U upload; the time until all hold the blob against the lower
//!   bound T* = max(F/U, N·F/(U + N·U)): the seed must send every byte once (F/U), and the N
//!   copies need N·F bytes of upload from the seed and N fetchers together.
//! - `swarm_unlimited`: no limits, a larger blob; aggregate delivered rate against one raw TCP
//!   copy of the same file on the same machine.
//! - `churn`: the `swarm` run with 30% of the fetchers SIGKILLed halfway, against the same run
//!   without faults; the surviving fetchers must complete.
//! - `swarm_observed`: the `swarm` run with `--http-listen` on the control plane and every
//!   daemon, each `/metrics` scraped every second, against the same run without, back to back.
//! - `swarm_tls`: the `swarm` run with TLS on every gRPC connection (a fleet CA made for the
//!   run), against the same run in plaintext, back to back.

use std::{net::SocketAddr, time::Duration};

use anyhow::ensure;
use serde_json::{Value, json};

use nebula_testkit::{DaemonOptions, TestCluster};

use crate::{Bench, MIB, cluster, ratio, round, transfer::RawCopy, transfer_limit};

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
    /// Serve `/metrics` everywhere and scrape it every second meanwhile.
    scraped: bool,
    /// TLS on every gRPC connection.
    tls: bool,
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
    /// Scrapes that returned a metrics page (when scraped).
    scrapes: u64,
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
            scraped: false,
            tls: false,
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
    let options = cluster::owned(spec.scraped, spec.tls);
    let mut cluster = TestCluster::launch(&bench.bin, "bench", options)?;
    let options = vec![
        DaemonOptions {
            upload_limit: spec.upload_limit,
            download_limit: None,
            mirror_upstream: None,
        };
        spec.fetchers + 1
    ];
    cluster.add_daemons(&options)?;
    let (file, id) = cluster.random_blob("blob.bin", spec.size).await?;
    cluster.add(0, &file, &id).await?;
    let raw = if spec.raw_reference {
        let copy = cluster.dir.path().join("raw-copy.bin");
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
                cluster.daemons[victim].proc.kill_now();
            }
        }
    };
    let endpoints = cluster.http_endpoints();
    let scraping = tokio_util::sync::CancellationToken::new();
    let scraper = scrape_every_second(&endpoints, &scraping);
    let fetching = async {
        let (fetches, ()) = tokio::join!(cluster.fetch_all(&fetchers, &id, limit), killer);
        scraping.cancel();
        fetches
    };
    let (fetches, scrapes) = tokio::join!(fetching, scraper);
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
    cluster.shutdown();
    walls.sort();
    Ok(Run {
        time,
        walls,
        failures,
        seed_uploaded,
        raw,
        scrapes,
    })
}

/// Scrapes every endpoint's `/metrics` once a second, as Prometheus would,
/// until `stop`; returns how many scrapes got a page.
async fn scrape_every_second(
    endpoints: &[SocketAddr],
    stop: &tokio_util::sync::CancellationToken,
) -> u64 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if endpoints.is_empty() {
        return 0;
    }
    let mut ok = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Bounded: a swarm run ends within its own limits; this is the backstop.
    for _ in 0..3_600 {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        for addr in endpoints {
            let scrape = async {
                let mut conn = tokio::net::TcpStream::connect(addr).await?;
                conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
                let mut page = Vec::new();
                conn.read_to_end(&mut page).await?;
                Ok::<bool, std::io::Error>(
                    page.starts_with(b"HTTP/1.0 200") || page.starts_with(b"HTTP/1.1 200"),
                )
            };
            if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(2), scrape).await {
                ok += 1;
            }
        }
    }
    ok
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

/// Runs the `swarm` spec as is, then changed by `variant`, back to back: the line of `case`
/// gives the second's time against the first's (`reference` says what the first was), and the
/// second run itself.
async fn beside_plain(
    bench: &Bench,
    case: &str,
    reference: &str,
    variant: impl FnOnce(&mut Spec),
) -> anyhow::Result<(Value, Run)> {
    let plain = limited_spec(bench);
    let mut changed = plain;
    variant(&mut changed);
    let without = run(bench, plain).await?;
    let with = run(bench, changed).await?;
    let mut line = json!({
        "case": case,
        "fetchers": plain.fetchers,
        "bytes": plain.size,
        "upload_limit_mib_s": plain.upload_limit.map(|u| u as f64 / MIB as f64),
        "time_s": round(with.time.as_secs_f64(), 3),
        "reference": reference,
        "reference_s": round(without.time.as_secs_f64(), 3),
        "ratio": ratio(with.time.as_secs_f64(), Some(without.time.as_secs_f64())),
    });
    let failures: Vec<String> = without
        .failures
        .iter()
        .chain(&with.failures)
        .cloned()
        .collect();
    note_failures(&mut line, &failures);
    Ok((line, with))
}

pub(crate) async fn swarm_observed(bench: &Bench) -> anyhow::Result<Value> {
    let reference = "the same swarm without --http-listen, run just before";
    let (mut line, with) = beside_plain(bench, "swarm_observed", reference, |spec| {
        spec.scraped = true
    })
    .await?;
    ensure!(with.scrapes > 0, "no scrape of /metrics succeeded");
    line["scrapes"] = with.scrapes.into();
    Ok(line)
}

/// The `swarm` run with TLS on every gRPC connection, against the same run in plaintext.
pub(crate) async fn swarm_tls(bench: &Bench) -> anyhow::Result<Value> {
    let reference = "the same swarm without TLS, run just before";
    let (line, _) = beside_plain(bench, "swarm_tls", reference, |spec| spec.tls = true).await?;
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
pub(crate) fn note_failures(line: &mut Value, failures: &[String]) {
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
