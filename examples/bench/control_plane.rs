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
use nebula_control::{Config, ControlPlane, RedisConfig};
use nebula_proto::v1::{
    AnnounceRequest, BlobAnnouncement, FindProvidersRequest, RegisterRequest,
    control_plane_client::ControlPlaneClient,
};
use rand::Rng as _;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

use crate::round;

mod procfs;

use nebula_testkit::RedisServer;
use procfs::{
    pid_cpu_seconds, process_cpu_seconds, rss_bytes, stat_cpu_seconds, threads_cpu_seconds,
};

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
/// concurrent workers spread over `urls` (replicas); returns how many answers
/// named providers and every answer's latency in microseconds.
async fn hammer(
    urls: &[String],
    requests: usize,
    connections: usize,
    in_flight: usize,
    blobs: usize,
    peers: usize,
) -> anyhow::Result<(u64, Vec<u32>)> {
    let mut channels = Vec::new();
    for i in 0..connections.max(urls.len()) {
        channels.push(
            Endpoint::from_shared(urls[i % urls.len()].clone())?
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(30))
                .connect()
                .await?,
        );
    }
    let next = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..channels.len() * in_flight {
        let mut c = ControlPlaneClient::new(channels[w % channels.len()].clone());
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
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < requests as u64 {
                let (blob, asker) = &ids[i % ids.len()];
                i += 1;
                let req = FindProvidersRequest {
                    peer_id: asker.clone(),
                    blob: blob.clone(),
                    limit: 0,
                    zone: "zone-1".into(),
                };
                let sent = Instant::now();
                let resp = c.find_providers(req).await?;
                latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if !resp.get_ref().providers.is_empty() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, tonic::Status>(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(requests);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    Ok((answered.load(Ordering::Relaxed), latencies))
}

/// The 99th percentile of `latencies` (µs), in milliseconds.
fn p99_ms(latencies: &mut [u32]) -> f64 {
    if latencies.is_empty() {
        return 0.0;
    }
    latencies.sort_unstable();
    let i = (latencies.len() * 99 / 100).min(latencies.len() - 1);
    round(f64::from(latencies[i]) / 1000.0, 2)
}

/// Runs [`hammer`] on a thread of its own (one core for the clients); also
/// returns that thread's CPU seconds.
async fn hammer_on_thread(urls: Vec<String>, plan: &Plan) -> anyhow::Result<(u64, Vec<u32>, f64)> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (requests, connections, in_flight, blobs, peers) = (
        plan.requests,
        plan.connections,
        plan.in_flight,
        plan.blobs,
        plan.peers,
    );
    std::thread::Builder::new()
        .name(CLIENT_THREAD_NAME.into())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(hammer(
                        &urls,
                        requests,
                        connections,
                        in_flight,
                        blobs,
                        peers,
                    ))
                });
            let cpu = stat_cpu_seconds(std::path::Path::new("/proc/thread-self/stat"))
                .map_or(0.0, |(_, cpu)| cpu);
            let _ = tx.send(outcome.map(|(answered, latencies)| (answered, latencies, cpu)));
        })?;
    rx.await
        .map_err(|_| anyhow::anyhow!("the client thread died"))?
}

/// Registers every peer and announces every inventory through `channels`.
async fn load(channels: &[Channel], plan: &Plan) -> anyhow::Result<()> {
    let client = |i: usize| ControlPlaneClient::new(channels[i % channels.len()].clone());
    let results: Vec<Result<(usize, String), tonic::Status>> = stream::iter(0..plan.peers)
        .map(|i| {
            let mut c = client(i);
            async move {
                let req = RegisterRequest {
                    peer_id: peer_id(i),
                    address: format!("127.0.{}.{}:7701", i / 250 % 250, 1 + i % 250),
                    zone: format!("zone-{}", i % 4),
                    labels: Default::default(),
                };
                c.register(req)
                    .await
                    .map(|r| (i, r.into_inner().credential))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    // Each peer's later calls carry the credential it was given.
    let mut credentials = vec![String::new(); plan.peers];
    for result in results {
        let (i, credential) = result?;
        credentials[i] = credential;
    }

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
                let credential = std::mem::take(&mut credentials[i]);
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
                    let mut req = tonic::Request::new(req);
                    req.metadata_mut().insert(
                        "nebula-credential",
                        credential.parse().map_err(|_| {
                            tonic::Status::internal("the control plane sent an unusable credential")
                        })?,
                    );
                    c.announce(req).await.map(|r| r.into_inner().unknown_peer)
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
    for unknown in results {
        anyhow::ensure!(!unknown?, "a registered peer was unknown at announce");
    }
    Ok(())
}

/// Checks one answer before anything is timed.
async fn check_sample(channel: Channel) -> anyhow::Result<()> {
    let sample = ControlPlaneClient::new(channel)
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
    Ok(())
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
        credential_ttl: Duration::from_secs(4 * 3600),
        // Made-up peers at made-up loopback addresses, all from here.
        allow_foreign_addresses: true,
        registrations_per_minute: u32::MAX,
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
    // Warm the connections up so the baseline holds their buffers.
    for ch in &channels {
        let req = FindProvidersRequest {
            blob: blob_id(0),
            ..Default::default()
        };
        ControlPlaneClient::new(ch.clone())
            .find_providers(req)
            .await?;
    }
    let before = rss_bytes()?;
    let load_started = Instant::now();

    load(&channels, plan).await?;
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
    check_sample(channels[0].clone()).await?;

    // Throughput, with the clients on a thread of their own: one core for
    // them, one for the server.
    let (cpu_before, server_before) = (
        process_cpu_seconds(),
        threads_cpu_seconds(SERVER_THREAD_NAME)?,
    );
    let started = Instant::now();
    let (answered, mut latencies, _) = hammer_on_thread(vec![url.clone()], plan).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu_before;
    let server_cpu = threads_cpu_seconds(SERVER_THREAD_NAME)? - server_before;
    anyhow::ensure!(
        answered == plan.requests as u64,
        "only {answered} of {} answers had providers",
        plan.requests
    );
    let workers = plan.connections * plan.in_flight;
    server_rt.spawn(control.shutdown()).await??;
    let redis = measure_redis(plan).await;

    let requests = plan.requests as f64;
    let per_sec = requests / elapsed;
    let bytes_per_entry = after.saturating_sub(before) as f64 / entries as f64;
    let server_us = server_cpu * 1e6 / requests;
    let mib = |b: u64| round(b as f64 / (1 << 20) as f64, 1);
    Ok(json!({
        "case": "control_plane",
        "find_providers_per_sec": per_sec.round(),
        "p99_ms": p99_ms(&mut latencies),
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
        // The same load and requests on the Redis store, with 1 and 2 replicas.
        "redis_two_replicas_vs_memory": redis
            .pointer("/replicas_2/find_providers_per_sec")
            .and_then(Value::as_f64)
            .map_or(Value::Null, |r| round(r / per_sec, 3).into()),
        "redis": redis,
        "quick": quick,
    }))
}

/// The Redis store's figures, or an error object.
async fn measure_redis(plan: &Plan) -> Value {
    match measure_redis_inner(plan).await {
        Ok(v) => v,
        Err(err) => json!({"error": format!("{err:#}")}),
    }
}

async fn measure_redis_inner(plan: &Plan) -> anyhow::Result<Value> {
    anyhow::ensure!(
        RedisServer::is_installed(),
        "cannot start redis-server; install it: apt-get install -y redis-server"
    );
    let redis = tokio::task::spawn_blocking(RedisServer::start).await?;
    let runtimes = [runtime()?, runtime()?];
    let result = redis_on(plan, &redis.url(), redis.pid(), &runtimes).await;
    for rt in runtimes {
        rt.shutdown_background();
    }
    result
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(SERVER_THREADS)
        .thread_name(SERVER_THREAD_NAME)
        .enable_all()
        .build()?)
}

async fn redis_on(
    plan: &Plan,
    url: &str,
    redis_pid: u32,
    runtimes: &[tokio::runtime::Runtime; 2],
) -> anyhow::Result<Value> {
    // The replicas sign credentials with one key.
    let key = Arc::new(nebula_common::credential::SigningKey::generate());
    let spawn = |rt: &tokio::runtime::Runtime| {
        let config = Config {
            lease_ttl: Duration::from_secs(3600),
            heartbeat_interval: Duration::from_secs(600),
            probe_interval: Duration::from_secs(3600),
            max_concurrent_streams: 4096,
            credential_ttl: Duration::from_secs(4 * 3600),
            // Made-up peers at made-up loopback addresses, all from here.
            allow_foreign_addresses: true,
            registrations_per_minute: u32::MAX,
            signing_key: Some(Arc::clone(&key)),
            ..Config::default()
        };
        let mut state = RedisConfig::new(url);
        if let Ok(state) = &mut state {
            // Whole inventories are announced at once while loading.
            state.op_timeout = Duration::from_secs(10);
        }
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            anyhow::Ok(ControlPlane::spawn_redis(listener, config, state?).await?)
        })
    };
    let first = spawn(&runtimes[0]).await??;
    let first_url = format!("http://{}", first.local_addr());
    let mut channels = Vec::new();
    for _ in 0..plan.connections {
        channels.push(
            Endpoint::from_shared(first_url.clone())?
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(60))
                .connect()
                .await?,
        );
    }
    let store = first.registry().store().clone();
    let before = store.used_memory().await?;
    let load_started = Instant::now();
    load(&channels, plan).await?;
    let load_s = load_started.elapsed().as_secs_f64();
    let after = store.used_memory().await?;
    let entries = first.registry().stats().await?.store.provider_entries;
    anyhow::ensure!(
        entries == (plan.blobs * PROVIDERS) as u64,
        "expected {} entries, Redis holds {entries}",
        plan.blobs * PROVIDERS
    );
    check_sample(channels[0].clone()).await?;

    let mut figures = serde_json::Map::new();
    let mut urls = vec![first_url];
    let mut replicas = vec![first];
    for n in 1..=2 {
        if n == 2 {
            let second = spawn(&runtimes[1]).await??;
            urls.push(format!("http://{}", second.local_addr()));
            replicas.push(second);
        }
        let server_before = threads_cpu_seconds(SERVER_THREAD_NAME)?;
        let redis_before = pid_cpu_seconds(redis_pid)?;
        let started = Instant::now();
        let (answered, mut latencies, client_cpu) = hammer_on_thread(urls.clone(), plan).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let server_cpu = threads_cpu_seconds(SERVER_THREAD_NAME)? - server_before;
        let redis_cpu = pid_cpu_seconds(redis_pid)? - redis_before;
        anyhow::ensure!(
            answered == plan.requests as u64,
            "only {answered} of {} answers had providers",
            plan.requests
        );
        let requests = plan.requests as f64;
        figures.insert(
            format!("replicas_{n}"),
            json!({
                "find_providers_per_sec": (requests / elapsed).round(),
                "p99_ms": p99_ms(&mut latencies),
                "server_cpu_us_per_request": round(server_cpu * 1e6 / requests, 1),
                // Where the 2 cores went: the replicas, redis-server, the client.
                "redis_cpu_us_per_request": round(redis_cpu * 1e6 / requests, 1),
                "client_cpu_us_per_request": round(client_cpu * 1e6 / requests, 1),
                "cores_busy": round((server_cpu + redis_cpu + client_cpu) / elapsed, 2),
            }),
        );
    }
    for (rt, replica) in runtimes.iter().zip(replicas) {
        rt.spawn(replica.shutdown()).await??;
    }
    figures.insert(
        "bytes_per_entry".into(),
        round(after.saturating_sub(before) as f64 / entries as f64, 1).into(),
    );
    figures.insert(
        "used_memory_mib".into(),
        round(after as f64 / (1 << 20) as f64, 1).into(),
    );
    figures.insert("load_s".into(), round(load_s, 2).into());
    Ok(Value::Object(figures))
}
