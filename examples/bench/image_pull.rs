//! `image_pull`: N daemons each pull one image (5 layers) through their own registry mirror at
//! once, from a real `docker-registry` behind a proxy limited to U_r. The time until all N hold
//! it against (image size)/U_r (the registry sending one copy at its full rate), and the bytes
//! the registry sent against one copy of the image; beside it, in the same run, the same N pulls
//! made straight from the registry (N copies), what a fleet without Nebula would do.
//!
//! A pull is what a client does: the manifest by tag, then the config and every layer at once,
//! each read to its end and checked against its digest.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use sha2::Digest as _;

use nebula_testkit::{DaemonOptions, TestCluster};

use crate::{
    Bench, MIB, cluster, ratio,
    registry::{OciImage, Proxy, Registry},
    round, transfer_limit,
};

const NAME: &str = "bench/app";

pub(crate) async fn image_pull(bench: &Bench) -> anyhow::Result<Value> {
    let (n, layer, rate) = if bench.quick {
        (8, 8 * MIB as usize, 16 * MIB)
    } else {
        (8, 104 * MIB as usize, 32 * MIB)
    };
    let mut cluster = TestCluster::launch(&bench.bin, "bench", cluster::owned(false, false))?;
    let root = cluster.dir.path().to_owned();
    let (registry, image) = tokio::task::spawn_blocking(move || {
        let registry = Registry::start(&root.join("registry"));
        let image = OciImage::build(&root.join("image"), "v1", &[layer; 5], 13);
        image.push(&format!("{}/{NAME}:v1", registry.addr));
        (registry, image)
    })
    .await?;
    let proxy = Proxy::start(registry.addr, None);
    proxy.set_rate(rate);
    let options = DaemonOptions {
        mirror_upstream: Some(proxy.addr),
        ..DaemonOptions::default()
    };
    cluster.add_daemons(&vec![options; n])?;
    let size = image.blob_bytes();
    let ideal = size as f64 / rate as f64;
    let limit = transfer_limit(size * 3, rate);

    // Through the swarm: each daemon's own mirror, all at once.
    let mirrors: Vec<SocketAddr> = cluster
        .daemons
        .iter()
        .map(|d| d.proc.mirror.context("a peer without its mirror"))
        .collect::<anyhow::Result<_>>()?;
    let before = proxy.registry_sent();
    let time = pull_all(&mirrors, &image, limit).await?;
    let sent = proxy.registry_sent() - before;

    // The reference: the same N pulls straight from the registry, through the same limit.
    let before = proxy.registry_sent();
    let direct_time = pull_all(&vec![proxy.addr; n], &image, limit * n as u32).await?;
    let direct_sent = proxy.registry_sent() - before;
    cluster.shutdown();
    drop(registry);
    Ok(json!({
        "case": "image_pull",
        "pullers": n,
        "layers": image.layers.len(),
        "image_mib": round(size as f64 / MIB as f64, 1),
        "registry_limit_mib_s": rate / MIB,
        "time_s": round(time, 2),
        "ideal_s": round(ideal, 2),
        "time_vs_ideal": ratio(time, Some(ideal)),
        "registry_copies": ratio(sent as f64, Some(size as f64)),
        "direct_time_s": round(direct_time, 2),
        "direct_registry_copies": ratio(direct_sent as f64, Some(size as f64)),
        "time_vs_direct": ratio(time, Some(direct_time)),
    }))
}

/// Pulls the image from every address at once; answers when the last pull ended.
async fn pull_all(from: &[SocketAddr], image: &OciImage, limit: Duration) -> anyhow::Result<f64> {
    let started = Instant::now();
    let pulls = from.iter().map(|&addr| {
        let image = image.clone();
        tokio::task::spawn_blocking(move || pull(addr, &image, limit))
    });
    for r in futures::future::join_all(pulls).await {
        r??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One client's pull: the manifest by tag, then the config and the layers in parallel.
fn pull(addr: SocketAddr, image: &OciImage, limit: Duration) -> anyhow::Result<()> {
    let manifest = get(
        addr,
        &format!("/v2/{NAME}/manifests/{}", image.tag),
        "application/vnd.oci.image.manifest.v1+json",
        limit,
    )?;
    ensure!(manifest.small == image.manifest, "{addr}: another manifest");
    let blobs: Vec<String> = image
        .layers
        .iter()
        .chain([&image.config])
        .map(|b| b.digest.clone())
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = blobs
            .iter()
            .map(|digest| {
                s.spawn(move || {
                    let got = get(addr, &format!("/v2/{NAME}/blobs/{digest}"), "*/*", limit)?;
                    ensure!(
                        got.digest == *digest,
                        "{addr}: blob {digest} has other bytes"
                    );
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a pull thread panicked")))
            .collect::<anyhow::Result<Vec<()>>>()
    })?;
    Ok(())
}

/// What a GET brought: the body's SHA-256 and length, and the body itself when small.
struct Got {
    digest: String,
    small: Vec<u8>,
}

/// Bodies kept whole up to this size (manifests); larger ones are only hashed.
const KEEP: usize = 4 << 20;

/// One GET on a fresh connection, read to its end; an error if the connection ends early.
fn get(addr: SocketAddr, path: &str, accept: &str, limit: Duration) -> anyhow::Result<Got> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(limit))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = vec![0u8; 256 << 10];
    let mut raw = Vec::new();
    let at = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = s
            .read(&mut buf)
            .with_context(|| format!("GET {addr}{path}"))?;
        ensure!(n > 0, "GET {addr}{path}: no answer");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
    ensure!(
        head.starts_with("http/1.1 200"),
        "GET {addr}{path}: {}",
        head.lines().next().unwrap_or_default()
    );
    let length: Option<u64> = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "content-length").then(|| v.trim().parse().ok())?
    });
    let mut hasher = sha2::Sha256::new();
    let mut small = raw.split_off(at + 4);
    hasher.update(&small);
    let mut len = small.len() as u64;
    loop {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("GET {addr}{path}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
        if small.len() < KEEP {
            small.extend_from_slice(&buf[..n]);
        }
    }
    ensure!(
        length.is_none_or(|n| n == len),
        "GET {addr}{path}: {len} of {length:?} bytes"
    );
    Ok(Got {
        digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        small,
    })
}
