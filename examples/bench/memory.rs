//! The `memory` case: the peak resident memory (`VmHWM`) of a daemon that adds a blob and serves
//! it to four fetchers, for a small and a large blob (256 MiB and 2 GiB; quick: 32 and 256 MiB).
//! The store streams to and from disk, so the large blob must not need more memory: the ratio
//! of the two peaks should stay near 1.

use anyhow::ensure;
use serde_json::{Value, json};

use crate::{
    Bench, MIB,
    cluster::{Cluster, PeerOptions},
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
    let mut cluster = Cluster::start(&bench.bin, "bench", false).await?;
    cluster
        .add_peers(&[PeerOptions::default(); FETCHERS + 1])
        .await?;
    let (file, id) = cluster.random_blob("blob.bin", size).await?;
    cluster.add(0, &file, &id).await?;
    std::fs::remove_file(&file).ok();
    let after_add = cluster.peak_rss(0)?;
    let reset = cluster.reset_peak_rss(0);
    if let Err(err) = &reset {
        eprintln!("bench: {err:#}; reporting the overall peak only");
    }

    let fetchers: Vec<usize> = (1..=FETCHERS).collect();
    let fetches = cluster
        .fetch_all(&fetchers, &id, transfer_limit(size * 2, 32 * MIB))
        .await?;
    let peak = cluster.peak_rss(0)?;
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
    cluster.shutdown().await;
    Ok(Peaks {
        overall: after_add.max(peak),
        serving: reset.is_ok().then_some(peak),
        uploaded,
    })
}
