//! The `control_plane` case: a control plane in this process on `127.0.0.1:0`,
//! loaded through real RPCs with 10,000 peers and 100,000 blobs of 5 providers
//! each (one provider in five partial, with a bitmap), then
//!
//! - resident memory (`VmRSS`, after `malloc_trim`) per (blob, provider)
//!   entry: the growth from before the load to after it, divided by the
//!   entries. It is an upper bound: it also counts what the allocator kept
//!   from the load's gRPC buffers.
//! - `FindProviders` answers per second from concurrent clients over loopback
//!   gRPC, for a fixed number of requests: `find_providers_per_sec`.
//!
//! The clients share this host's two cores with the server, which a real
//! control plane does not (its clients are other hosts). So the server runs
//! on its own runtime threads, whose CPU time is read from `/proc`: that gives
//! `server_cpu_us_per_request` and `server_bound_per_sec`, the rate two cores
//! of server alone would sustain at that cost.
//!
//! Health probes are off (an hour apart): the peers' addresses are made up.
//! Quick mode: 1,000 peers, 10,000 blobs, 50,000 requests.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt as _, stream};
use nebula_control::{Config, ControlPlane};
use nebula_proto::v1::{
    AnnounceRequest, BlobAnnouncement, FindProvidersRequest, RegisterRequest,
    control_plane_client::ControlPlaneClient,
};
use rand::Rng as _;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

use crate::round;

const PROVIDERS: usize = 5;
const AIM_PER_SEC: u64 = 50_000;
const AIM_BYTES_PER_ENTRY: u64 = 200;
/// 256 MiB: 256 chunks, a 32-byte bitmap for partial providers.
const BLOB_SIZE: u64 = 256 << 20;
/// Threads of the server's runtime: one core of two; the clients take the other.
const SERVER_THREADS: usize = 1;
const SERVER_THREAD_NAME: &str = "bench-control";
const CLIENT_THREAD_NAME: &str = "bench-client";

struct Plan {
    peers: usize,
    blobs: usize,
    requests: usize,
    /// HTTP/2 connections the clients spread over.
    connections: usize,
    /// Requests in flight per connection.
    in_flight: usize,
}

pub(crate) async fn run(quick: bool) -> Value {
    let plan = if quick {
        Plan {
            peers: 1_000,
            blobs: 10_000,
            requests: 50_000,
            connections: 4,
            in_flight: 32,
        }
    } else {
        Plan {
            peers: 10_000,
            blobs: 100_000,
            requests: 300_000,
            connections: 4,
            in_flight: 32,
        }
    };
    match measure(&plan, quick).await {
        Ok(v) => v,
        Err(err) => json!({"case": "control_plane", "error": format!("{err:#}")}),
    }
}

/// Resident memory, after handing freed heap pages back to the kernel so the
/// figure counts live data rather than what malloc keeps for later.
fn rss_bytes() -> anyhow::Result<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    Ok(kib * 1024)
}

/// User plus system CPU time of this process, in seconds.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// User plus system CPU time of the server's runtime threads, in seconds.
fn server_cpu_seconds() -> anyhow::Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task")? {
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ...`: comm may hold spaces, so split after the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(SERVER_THREAD_NAME) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // After the comm: state is field 3, utime 14 and stime 15 (1-based).
        let field = |n: usize| {
            fields
                .get(n - 3)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total += field(14) + field(15);
    }
    Ok(total as f64 / ticks)
}

fn peer_id(i: usize) -> String {
    format!("bench-peer-{i:05}")
}

fn blob_id(b: usize) -> String {
    blake3::hash(&(b as u64).to_le_bytes()).to_hex().to_string()
}

/// Provider `k` of blob `b`: consecutive blobs land on consecutive peers, so
/// every peer holds `blobs * 5 / peers` of them.
fn provider(b: usize, k: usize, peers: usize) -> usize {
    (b * PROVIDERS + k) % peers
}

/// What a peer announces for blob `b`.
fn announcement(b: usize, partial: bool) -> BlobAnnouncement {
    use sha2::Digest as _;
    BlobAnnouncement {
        id: blob_id(b),
        size: BLOB_SIZE,
        sha256: hex::encode(sha2::Sha256::digest((b as u64).to_le_bytes())),
        complete: !partial,
        // Every other chunk.
        chunks: if partial {
            vec![0x55; 32].into()
        } else {
            Default::default()
        },
    }
}

/// Sends `requests` find-providers requests from `connections × in_flight`
/// concurrent workers; returns how many answers named providers.
async fn hammer(
    url: &str,
    requests: usize,
    connections: usize,
    in_flight: usize,
    blobs: usize,
    peers: usize,
) -> anyhow::Result<u64> {
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(
            Endpoint::from_shared(url.to_owned())?
                .timeout(Duration::from_secs(30))
                .connect()
                .await?,
        );
    }
    let next = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..connections * in_flight {
        let mut c = ControlPlaneClient::new(channels[w % connections].clone());
        let (next, answered) = (next.clone(), answered.clone());
        let ids: Vec<(String, String)> = {
            let mut rng = rand::rng();
            (0..64)
                .map(|_| {
                    (
                        blob_id(rng.random_range(0..blobs)),
                        peer_id(rng.random_range(0..peers)),
                    )
                })
                .collect()
        };
        tasks.spawn(async move {
            let mut i = 0;
            while next.fetch_add(1, Ordering::Relaxed) < requests as u64 {
                let (blob, asker) = &ids[i % ids.len()];
                i += 1;
                let req = FindProvidersRequest {
                    peer_id: asker.clone(),
                    blob: blob.clone(),
                    limit: 0,
                    zone: "zone-1".into(),
                };
                let resp = c.find_providers(req).await?;
                if !resp.get_ref().providers.is_empty() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(answered.load(Ordering::Relaxed))
}

async fn measure(plan: &Plan, quick: bool) -> anyhow::Result<Value> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(SERVER_THREADS)
        .thread_name(SERVER_THREAD_NAME)
        .enable_all()
        .build()?;
    let result = measure_on(plan, quick, &server_rt).await;
    // A runtime cannot be dropped from async code; its threads are idle by now.
    server_rt.shutdown_background();
    result
}

async fn measure_on(
    plan: &Plan,
    quick: bool,
    server_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Value> {
    let config = Config {
        lease_ttl: Duration::from_secs(3600),
        heartbeat_interval: Duration::from_secs(600),
        probe_interval: Duration::from_secs(3600),
        max_concurrent_streams: 4096,
        ..Config::default()
    };
    // Spawned from the server runtime, so every server task runs on its threads.
    let control = server_rt
        .spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            anyhow::Ok(ControlPlane::spawn(listener, config).await?)
        })
        .await??;
    let url = format!("http://{}", control.local_addr());
    let mut channels: Vec<Channel> = Vec::new();
    for _ in 0..plan.connections {
        let ch = Endpoint::from_shared(url.clone())?
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .connect()
            .await?;
        channels.push(ch);
    }
    let client = |i: usize| ControlPlaneClient::new(channels[i % channels.len()].clone());

    // Warm the connections up so the baseline holds their buffers.
    for i in 0..plan.connections {
        let req = FindProvidersRequest {
            blob: blob_id(0),
            ..Default::default()
        };
        client(i).find_providers(req).await?;
    }
    let before = rss_bytes()?;
    let load_started = Instant::now();

    // Register every peer.
    let results: Vec<Result<(), tonic::Status>> = stream::iter(0..plan.peers)
        .map(|i| {
            let mut c = client(i);
            async move {
                let req = RegisterRequest {
                    peer_id: peer_id(i),
                    address: format!("127.0.{}.{}:7701", i / 250 % 250, 1 + i % 250),
                    zone: format!("zone-{}", i % 4),
                    labels: Default::default(),
                };
                c.register(req).await.map(|_| ())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>, _>>()?;

    // Each peer announces all its blobs in one batch, built just before it is
    // sent so the load's own buffers stay small next to what is measured.
    let mut inventories: Vec<Vec<(u32, bool)>> = vec![Vec::new(); plan.peers];
    for b in 0..plan.blobs {
        for k in 0..PROVIDERS {
            inventories[provider(b, k, plan.peers)].push((b as u32, k == PROVIDERS - 1));
        }
    }
    let results: Vec<Result<bool, tonic::Status>> =
        stream::iter(inventories.into_iter().enumerate())
            .map(|(i, held)| {
                let mut c = client(i);
                async move {
                    let blobs = held
                        .into_iter()
                        .map(|(b, partial)| announcement(b as usize, partial))
                        .collect();
                    let req = AnnounceRequest {
                        peer_id: peer_id(i),
                        blobs,
                        removed: Vec::new(),
                        full_inventory: true,
                    };
                    c.announce(req).await.map(|r| r.into_inner().unknown_peer)
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
    for unknown in results {
        anyhow::ensure!(!unknown?, "a registered peer was unknown at announce");
    }
    let load_s = load_started.elapsed().as_secs_f64();
    let after = rss_bytes()?;
    let stats = control.registry().stats().await?;
    let entries = stats.store.provider_entries;
    anyhow::ensure!(
        entries == (plan.blobs * PROVIDERS) as u64,
        "expected {} entries, the control plane holds {entries}",
        plan.blobs * PROVIDERS
    );

    // A sample answer must be right before it is timed.
    let sample = client(0)
        .find_providers(FindProvidersRequest {
            blob: blob_id(7),
            peer_id: peer_id(0),
            ..Default::default()
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        sample.providers.len() == PROVIDERS,
        "sample answer: {} providers",
        sample.providers.len()
    );
    anyhow::ensure!(
        sample.providers[..PROVIDERS - 1].iter().all(|p| p.complete)
            && !sample.providers[PROVIDERS - 1].complete,
        "complete providers must rank before the partial one"
    );

    // Throughput, with the clients on a thread of their own: one core for
    // them, one for the server.
    let (cpu_before, server_before) = (process_cpu_seconds(), server_cpu_seconds()?);
    let started = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (hammer_url, requests) = (url.clone(), plan.requests);
    let (connections, in_flight, blobs, peers) =
        (plan.connections, plan.in_flight, plan.blobs, plan.peers);
    std::thread::Builder::new()
        .name(CLIENT_THREAD_NAME.into())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(hammer(
                        &hammer_url,
                        requests,
                        connections,
                        in_flight,
                        blobs,
                        peers,
                    ))
                });
            let _ = tx.send(outcome);
        })?;
    let answered = rx
        .await
        .map_err(|_| anyhow::anyhow!("the client thread died"))??;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu_before;
    let server_cpu = server_cpu_seconds()? - server_before;
    anyhow::ensure!(
        answered == plan.requests as u64,
        "only {answered} of {} answers had providers",
        plan.requests
    );
    let workers = plan.connections * plan.in_flight;
    server_rt.spawn(control.shutdown()).await??;

    let requests = plan.requests as f64;
    let per_sec = requests / elapsed;
    let bytes_per_entry = after.saturating_sub(before) as f64 / entries as f64;
    let server_us = server_cpu * 1e6 / requests;
    let mib = |b: u64| round(b as f64 / (1 << 20) as f64, 1);
    Ok(json!({
        "case": "control_plane",
        "find_providers_per_sec": per_sec.round(),
        "bytes_per_entry": round(bytes_per_entry, 1),
        "peers": plan.peers,
        "blobs": plan.blobs,
        "entries": entries,
        "aim_per_sec": AIM_PER_SEC,
        "aim_bytes_per_entry": AIM_BYTES_PER_ENTRY,
        "per_sec_ratio": round(per_sec / AIM_PER_SEC as f64, 3),
        "bytes_ratio": round(bytes_per_entry / AIM_BYTES_PER_ENTRY as f64, 3),
        "requests": plan.requests,
        "concurrent_clients": workers,
        "connections": plan.connections,
        // CPU per answer: the whole process (clients and server), and the
        // server's threads alone with the rate two cores of it would give.
        "cpu_us_per_request": round(cpu * 1e6 / requests, 1),
        "server_cpu_us_per_request": round(server_us, 1),
        "server_bound_per_sec": if server_us > 0.0 { (2e6 / server_us).round() } else { 0.0 },
        "rss_before_mib": mib(before),
        "rss_after_mib": mib(after),
        "load_s": round(load_s, 2),
        "quick": quick,
    }))
}
