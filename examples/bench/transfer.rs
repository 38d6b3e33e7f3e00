//! Point-to-point cases: `single_stream` (one provider, one fetcher, against a raw TCP copy of
//! the same bytes into a file), `single_stream_tls` (the same with TLS on every gRPC connection,
//! against it in plaintext) and `multi_source` (four rate-limited providers, one fetcher,
//! against the sum of their limits).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use nebula_testkit::{DaemonOptions, Fetch, TestCluster};

use crate::{Bench, MIB, cluster, ratio, round, transfer_limit};

/// Buffer of the raw copy: large, so neither side is held back by system calls.
const RAW_BUF: usize = 1 << 20;

/// Fetches per setting in `single_stream_tls`, the two settings alternating: one transfer
/// takes about a second, which a shared machine makes noisy, so the fastest of each counts.
const TLS_ROUNDS: usize = 2;

/// The `single_stream` blob: 1 GiB (quick: 128 MiB).
fn single_stream_size(bench: &Bench) -> u64 {
    if bench.quick { 128 * MIB } else { 1024 * MIB }
}

/// A cluster of one provider (peer 0) holding a new random blob of `size`, and one fetcher
/// (peer 1); returns it with the blob's file (still there) and id.
async fn provider_and_fetcher(
    bench: &Bench,
    size: u64,
    tls: bool,
) -> anyhow::Result<(TestCluster, PathBuf, String)> {
    let mut cluster = TestCluster::launch(&bench.bin, "bench", cluster::owned(false, tls))?;
    cluster.add_daemons(&[DaemonOptions::default(); 2])?;
    let (file, id) = cluster.random_blob("blob.bin", size).await?;
    cluster.add(0, &file, &id).await?;
    Ok((cluster, file, id))
}

pub(crate) async fn single_stream(bench: &Bench) -> anyhow::Result<Value> {
    let size = single_stream_size(bench);
    let (cluster, file, id) = provider_and_fetcher(bench, size, false).await?;

    let copy = cluster.dir.path().join("raw-copy.bin");
    let raw = raw_tcp_copy(&file, &copy, transfer_limit(size, 64 * MIB)).await?;
    let copied = tokio::task::spawn_blocking({
        let copy = copy.clone();
        move || nebula_testkit::hash_file(&copy)
    })
    .await??;
    ensure!(
        copied.to_hex().as_str() == id,
        "the raw TCP copy does not hash to the blob id"
    );
    std::fs::remove_file(&copy).ok();

    let fetch = one_fetch(&cluster, 1, &id, transfer_limit(size, 16 * MIB)).await?;
    let mib_s = cluster::mib_per_s(size, fetch.wall);
    let raw_mib_s = cluster::mib_per_s(size, raw.written);
    let synced_mib_s = cluster::mib_per_s(size, raw.synced);
    let line = json!({
        "case": "single_stream",
        "bytes": size,
        "elapsed_s": round(fetch.wall.as_secs_f64(), 3),
        "daemon_elapsed_ms": fetch.report["elapsed_ms"],
        "mib_s": round(mib_s, 1),
        "reference": "raw_tcp_copy",
        "reference_s": round(raw.written.as_secs_f64(), 3),
        "reference_mib_s": round(raw_mib_s, 1),
        "ratio": ratio(mib_s, Some(raw_mib_s)),
        "reference_with_fsync_mib_s": round(synced_mib_s, 1),
        "ratio_with_fsync": ratio(mib_s, Some(synced_mib_s)),
    });
    cluster.shutdown();
    Ok(line)
}

/// `single_stream` with TLS on every gRPC connection (a fleet CA made for the run), against the
/// same transfer in plaintext: [`TLS_ROUNDS`] fetches of each, alternating, the fastest of each
/// compared.
pub(crate) async fn single_stream_tls(bench: &Bench) -> anyhow::Result<Value> {
    let size = single_stream_size(bench);
    let mut settings = Vec::new();
    for tls in [false, true] {
        let (cluster, file, id) = provider_and_fetcher(bench, size, tls).await?;
        std::fs::remove_file(&file).ok();
        settings.push((cluster, id, Vec::new()));
    }
    let limit = transfer_limit(size, 16 * MIB);
    for _ in 0..TLS_ROUNDS {
        for (cluster, id, walls) in &mut settings {
            let fetch = one_fetch(cluster, 1, id, limit).await?;
            walls.push(fetch.wall);
            // The next round fetches the whole blob again.
            cluster.remove(1, id).await?;
        }
    }
    let mut walls = Vec::new();
    for (cluster, _, w) in settings {
        cluster.shutdown();
        walls.push(w);
    }
    let best = |w: &[Duration]| w.iter().copied().min().unwrap_or_default();
    let secs = |w: &[Duration]| {
        w.iter()
            .map(|d| round(d.as_secs_f64(), 3))
            .collect::<Vec<_>>()
    };
    let (plain, tls) = (best(&walls[0]), best(&walls[1]));
    let (plain_mib_s, tls_mib_s) = (
        cluster::mib_per_s(size, plain),
        cluster::mib_per_s(size, tls),
    );
    Ok(json!({
        "case": "single_stream_tls",
        "bytes": size,
        "rounds": TLS_ROUNDS,
        "elapsed_s": round(tls.as_secs_f64(), 3),
        "mib_s": round(tls_mib_s, 1),
        "each_s": secs(&walls[1]),
        "reference": "the same transfer without TLS, alternating with it",
        "reference_s": round(plain.as_secs_f64(), 3),
        "reference_mib_s": round(plain_mib_s, 1),
        "reference_each_s": secs(&walls[0]),
        "ratio": ratio(tls_mib_s, Some(plain_mib_s)),
    }))
}

pub(crate) async fn multi_source(bench: &Bench) -> anyhow::Result<Value> {
    const PROVIDERS: usize = 4;
    let limit = 16 * MIB;
    let size = if bench.quick { 64 * MIB } else { 256 * MIB };
    let mut cluster = TestCluster::launch(&bench.bin, "bench", cluster::owned(false, false))?;
    let mut options = vec![
        DaemonOptions {
            upload_limit: Some(limit),
            download_limit: None,
            mirror_upstream: None,
        };
        PROVIDERS
    ];
    options.push(DaemonOptions::default());
    cluster.add_daemons(&options)?;
    let (file, id) = cluster.random_blob("blob.bin", size).await?;
    // Content addressing: the same file added on every provider is the same blob.
    let adds = (0..PROVIDERS).map(|p| cluster.add(p, &file, &id));
    for added in futures::future::join_all(adds).await {
        added?;
    }
    std::fs::remove_file(&file).ok();

    let fetcher = PROVIDERS;
    let fetch = one_fetch(
        &cluster,
        fetcher,
        &id,
        transfer_limit(size, limit * PROVIDERS as u64),
    )
    .await?;
    let mib_s = cluster::mib_per_s(size, fetch.wall);
    let reference = (limit * PROVIDERS as u64) as f64 / MIB as f64;
    let per_provider: Vec<u64> = cluster.daemons[..PROVIDERS]
        .iter()
        .map(|d| Ok(fetch.bytes_from(&d.peer_id()?, &d.addr.to_string())))
        .collect::<anyhow::Result<_>>()?;
    let line = json!({
        "case": "multi_source",
        "providers": PROVIDERS,
        "bytes": size,
        "upload_limit_mib_s": limit / MIB,
        "elapsed_s": round(fetch.wall.as_secs_f64(), 3),
        "mib_s": round(mib_s, 1),
        "bytes_per_provider": per_provider,
        "reference": "4U",
        "reference_mib_s": reference,
        "ratio": ratio(mib_s, Some(reference)),
    });
    cluster.shutdown();
    Ok(line)
}

/// One `nebula fetch` on `peer`, which must succeed with a copy that hashes to `id`.
async fn one_fetch(
    cluster: &TestCluster,
    peer: usize,
    id: &str,
    limit: Duration,
) -> anyhow::Result<Fetch> {
    let fetch = cluster
        .fetch_all(&[peer], id, limit)
        .await?
        .pop()
        .context("one fetch ran")?;
    ensure!(fetch.ok, "peer{peer}: nebula fetch failed: {}", fetch.error);
    let good = cluster.verify_copy(peer, id).await?;
    ensure!(good, "peer{peer}: the fetched copy does not hash to {id}");
    Ok(fetch)
}

/// How long a raw copy took.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawCopy {
    /// From connect until the last byte was written to the file.
    pub(crate) written: Duration,
    /// Until the file was also on disk (`fsync`), as the store makes a completed blob.
    pub(crate) synced: Duration,
}

/// The reference for one stream: a raw TCP copy on loopback of `src` into a new file `dst`.
/// Plain reads and writes with large buffers, no zero-copy tricks: what a simple file server
/// would do, with no verification.
pub(crate) async fn raw_tcp_copy(
    src: &Path,
    dst: &Path,
    limit: Duration,
) -> anyhow::Result<RawCopy> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let src = src.to_path_buf();
    let sender = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        let mut file = tokio::fs::File::open(&src).await?;
        file.set_max_buf_size(RAW_BUF);
        let mut buf = vec![0u8; RAW_BUF];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            sock.write_all(&buf[..n]).await?;
        }
        sock.shutdown().await?;
        anyhow::Ok(())
    });
    let receive = async {
        let start = Instant::now();
        let mut sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let mut out = tokio::fs::File::create(dst).await?;
        out.set_max_buf_size(RAW_BUF);
        let mut buf = vec![0u8; RAW_BUF];
        loop {
            // Fill the buffer before writing: one file write per MiB, not per TCP read.
            let mut filled = 0;
            while filled < buf.len() {
                let n = sock.read(&mut buf[filled..]).await?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            out.write_all(&buf[..filled]).await?;
        }
        out.flush().await?;
        let written = start.elapsed();
        out.sync_all().await?;
        anyhow::Ok(RawCopy {
            written,
            synced: start.elapsed(),
        })
    };
    let received = tokio::time::timeout(limit, receive)
        .await
        .with_context(|| format!("the raw TCP copy took over {limit:?}"));
    let copy = match received {
        Ok(Ok(copy)) => copy,
        Ok(Err(err)) | Err(err) => {
            sender.abort();
            return Err(err);
        }
    };
    sender.await??;
    Ok(copy)
}
