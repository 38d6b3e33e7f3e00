//! The multi-source downloader: one blob from up to K providers at once.
//!
//! A fetch resolves the blob through the control plane, takes a verified
//! outboard from the first provider that has a good one, then runs one worker
//! per provider. Workers pull chunks from the shared [`Scheduler`] (rarest
//! first), keep a bandwidth-delay window of requests in flight, verify every
//! chunk before it is stored, and give their requests back the moment their
//! provider fails, stalls, answers busy or lies. The coordinator re-asks the
//! control plane as providers come and go, with a per-provider back-off that
//! acts as a circuit breaker (a provider back from back-off gets one trial
//! request before a full window).

mod sched;

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use nebula_common::{Blob, BlobId, BlobRef, ChunkSet, Outboard, StoreError, WriteOutcome};
use nebula_proto::v1::{
    self as pb, exchange_request::Kind as Req, exchange_response::Kind as Resp,
};
use rand::SeedableRng;
use tokio::{
    sync::{AcquireError, Notify, OwnedSemaphorePermit, mpsc, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    connection::{Connection, Reply},
    metrics::{FetchResult, Source},
    node::Shared,
};
use sched::{ProviderIx, Scheduler, Score};

/// Why a fetch failed. Verified chunks stay in the store for a later resume.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No provider could be found or reached in time.
    #[error("no providers for blob {blob} after {waited:?}{detail}")]
    NoProviders {
        /// What was asked for.
        blob: String,
        /// How long the fetch waited.
        waited: Duration,
        /// What is known of the missing data.
        detail: String,
    },
    /// The control plane could not answer (and no provider was known yet).
    #[error("control plane: {0}")]
    Control(String),
    /// No control plane is configured and the blob is not local.
    #[error("blob {0} is not in the store and no control plane is configured")]
    NoControlPlane(String),
    /// Every provider's outboard failed verification.
    #[error("no provider sent a valid outboard for blob {0}")]
    BadOutboard(BlobId),
    /// The control plane answered about another blob than the one asked for.
    #[error("the control plane answered about blob {answered:?} when asked for {asked}")]
    WrongBlob {
        /// What was asked for.
        asked: BlobId,
        /// The id the answer named.
        answered: String,
    },
    /// The blob a `sha256:` digest resolved to has another SHA-256: the
    /// alias was false. The blob stays in the store under its own id only.
    #[error("sha256:{digest} resolved to blob {id}, whose SHA-256 is {actual}: the alias is false")]
    DigestMismatch {
        /// The digest asked for.
        digest: nebula_common::Sha256Digest,
        /// The blob it resolved to.
        id: BlobId,
        /// That blob's real SHA-256.
        actual: nebula_common::Sha256Digest,
    },
    /// The store failed (a full disk, an I/O error).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The origin of a fetch by URL failed.
    #[error(transparent)]
    Origin(#[from] crate::origin::OriginError),
    /// The content at a URL is not what `--digest` names; nothing was kept.
    #[error(
        "the content at {url} is blob {got}, which does not match --digest {expected}; nothing was kept"
    )]
    ContentMismatch {
        /// The URL, without credentials or query values.
        url: String,
        /// The digest asked for.
        expected: String,
        /// The blob the content hashed to.
        got: BlobId,
    },
    /// The daemon is shutting down.
    #[error("fetch cancelled: the daemon is shutting down")]
    Cancelled,
    /// The blob was removed from the store (`nebula rm`) while it was being
    /// fetched: the fetch stops rather than write into a removed blob.
    #[error("fetch cancelled: blob {blob} was removed from the store")]
    Removed {
        /// The blob.
        blob: BlobId,
    },
}

/// Bytes of one fetch received from one provider.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceBytes {
    /// The provider's peer id.
    pub peer_id: String,
    /// Its address.
    pub address: String,
    /// Chunk bytes received from it and stored.
    pub bytes: u64,
}

/// Where a fetch stands.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The blob, once resolved.
    pub id: Option<BlobId>,
    /// Bytes held (including resumed ones).
    pub bytes_done: u64,
    /// The blob's size, once known.
    pub total: u64,
    /// Providers in use.
    pub providers: u32,
    /// Bytes per second over the last second.
    pub rate: u64,
    /// Bytes already in the store when the fetch began.
    pub resumed_bytes: u64,
    /// Finished.
    pub done: bool,
    /// Bytes per provider.
    pub sources: Vec<SourceBytes>,
    /// Bytes received from an origin (a fetch by URL).
    pub origin_bytes: u64,
    /// Something the user should be told once, sent with `done`.
    pub notice: Option<String>,
    /// An origin download under way, readable as it grows (the registry
    /// mirror streams from it); its bytes are checked only at the end.
    pub(crate) scratch: Option<Arc<crate::origin::Session>>,
}

/// A finished fetch.
#[derive(Debug, Clone)]
pub struct FetchOutcome {
    /// The blob.
    pub blob: Arc<Blob>,
    /// Bytes already in the store when the fetch began.
    pub resumed_bytes: u64,
    /// Bytes per provider.
    pub sources: Vec<SourceBytes>,
    /// Bytes received from an origin (a fetch by URL).
    pub origin_bytes: u64,
    /// Something the user should be told once (e.g. the control plane was
    /// down and the origin was asked directly).
    pub notice: Option<String>,
}

#[derive(Debug)]
struct ProviderEntry {
    peer_id: String,
    address: String,
    bytes: AtomicU64,
}

/// A request in flight: the stream it went on and its id there.
type Outstanding = (Arc<Connection>, u64);

/// State shared by the coordinator and the workers of one download.
#[derive(Debug)]
struct Download {
    shared: Arc<Shared>,
    blob: Arc<Blob>,
    sched: Mutex<Scheduler>,
    providers: Mutex<Vec<Arc<ProviderEntry>>>,
    /// Each provider's Peak-EWMA latency, to spot degraded ones.
    latencies: Mutex<Vec<f64>>,
    /// Outstanding requests by (provider, chunk), for cancelling endgame losers.
    requests: Mutex<HashMap<(ProviderIx, u32), Outstanding>>,
    /// Wakes idle workers: a chunk was given back, or a provider gained chunks.
    wake: Notify,
    /// Fires when the blob is complete or the download failed.
    finished: CancellationToken,
    fatal: Mutex<Option<StoreError>>,
    bytes_done: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while these locks are held; recover rather than propagate.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Download {
    fn chunk_size(&self) -> u64 {
        self.blob.geometry().chunk_size()
    }

    /// Bytes of the download buffer one chunk request holds: the chunk's
    /// size, or the whole buffer when a chunk is larger.
    fn chunk_share(&self) -> u32 {
        let whole = self.shared.config.download_buffer;
        u32::try_from(self.chunk_size().min(whole)).unwrap_or(u32::MAX)
    }

    fn id(&self) -> BlobId {
        self.blob.id()
    }

    /// A provider's latency is far worse than the best active one's.
    fn degraded(&self, p: ProviderIx) -> bool {
        let l = lock(&self.latencies);
        let mine = l[p];
        let best = l
            .iter()
            .enumerate()
            .filter(|&(q, &v)| q != p && v > 0.0)
            .map(|(_, &v)| v)
            .fold(f64::INFINITY, f64::min);
        best.is_finite() && mine > 0.0 && mine > 8.0 * best
    }
}

/// Asks the control plane who holds `blob`.
pub(crate) async fn discover(
    shared: &Shared,
    blob: &BlobRef,
) -> Result<pb::FindProvidersResponse, FetchError> {
    let Some(control) = shared.control.clone() else {
        return Err(FetchError::NoControlPlane(blob.to_string()));
    };
    let request = pb::FindProvidersRequest {
        peer_id: shared.peer_id.clone(),
        blob: blob.to_string(),
        limit: shared.config.discovery.limit,
        zone: shared.config.zone.clone(),
    };
    match tokio::time::timeout(control.deadline(), control.find_providers(request)).await {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            // The downloader works only on the id it was asked for: an answer
            // about another blob (a confused or tampered-with relay) is refused.
            if let BlobRef::Blake3(asked) = blob
                && !(r.providers.is_empty() && r.id.is_empty())
                && r.id.parse::<BlobId>().ok() != Some(*asked)
            {
                return Err(FetchError::WrongBlob {
                    asked: *asked,
                    answered: r.id,
                });
            }
            Ok(r)
        }
        Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
            Ok(pb::FindProvidersResponse::default())
        }
        Ok(Err(status)) => Err(FetchError::Control(status.message().to_owned())),
        Err(_) => Err(FetchError::Control("timed out".into())),
    }
}

/// The chunks a peer holds, from the wire's (complete, bitmap) pair.
fn held(count: u32, complete: bool, bitmap: &[u8]) -> ChunkSet {
    if complete {
        ChunkSet::full(count)
    } else {
        ChunkSet::from_bitmap(bitmap, count)
    }
}

/// Fetches `blob` into the store, reporting progress as it goes, in a
/// `fetch` span naming the blob; counted in the daemon's metrics.
pub(crate) async fn fetch(
    shared: Arc<Shared>,
    blob_ref: BlobRef,
    progress: watch::Sender<Progress>,
    no_provider_timeout: Duration,
) -> Result<FetchOutcome, FetchError> {
    let span = tracing::info_span!("fetch", blob = %blob_ref);
    let metrics = Arc::clone(&shared.metrics);
    observed(
        &metrics,
        span,
        download(shared, blob_ref, progress, no_provider_timeout),
    )
    .await
}

/// Runs one fetch in `span`: counted by result and duration, logged when it fails.
pub(crate) async fn observed(
    metrics: &crate::metrics::Metrics,
    span: tracing::Span,
    fetch: impl Future<Output = Result<FetchOutcome, FetchError>>,
) -> Result<FetchOutcome, FetchError> {
    let started = Instant::now();
    let result = fetch.instrument(span.clone()).await;
    let kind = match &result {
        Ok(_) => FetchResult::Ok,
        Err(FetchError::NoProviders { .. } | FetchError::NoControlPlane(_)) => {
            FetchResult::NoProviders
        }
        Err(
            FetchError::BadOutboard(_)
            | FetchError::WrongBlob { .. }
            | FetchError::DigestMismatch { .. }
            | FetchError::ContentMismatch { .. },
        ) => FetchResult::Integrity,
        Err(FetchError::Control(_)) => FetchResult::Control,
        Err(FetchError::Store(_)) => FetchResult::Store,
        Err(FetchError::Origin(_)) => FetchResult::Origin,
        Err(FetchError::Cancelled | FetchError::Removed { .. }) => FetchResult::Cancelled,
    };
    metrics.fetch_ended(kind, started.elapsed());
    if let Err(e) = &result {
        span.in_scope(|| tracing::warn!(error = %e, "fetch failed"));
    }
    result
}

/// [`fetch`] without the span and the metrics (for fetches inside another).
pub(crate) async fn download(
    shared: Arc<Shared>,
    blob_ref: BlobRef,
    progress: watch::Sender<Progress>,
    no_provider_timeout: Duration,
) -> Result<FetchOutcome, FetchError> {
    let started = Instant::now();
    // Already here?
    let local = match blob_ref {
        BlobRef::Blake3(id) => shared.store.get(&id),
        BlobRef::Sha256(d) => shared.store.find_sha256(&d),
    };
    if let Some(b) = local.filter(|b| b.is_complete()) {
        let size = b.outboard().size();
        progress.send_replace(Progress {
            id: Some(b.id()),
            bytes_done: size,
            total: size,
            resumed_bytes: size,
            done: true,
            ..Progress::default()
        });
        return Ok(FetchOutcome {
            blob: b,
            resumed_bytes: size,
            sources: Vec::new(),
            origin_bytes: 0,
            notice: None,
        });
    }

    // Find providers, waiting a bounded time for some to appear.
    let deadline = started + no_provider_timeout;
    let found = loop {
        if shared.shutdown.is_cancelled() {
            return Err(FetchError::Cancelled);
        }
        match discover(&shared, &blob_ref).await {
            Ok(r) if !r.providers.is_empty() => break r,
            Ok(_) => {}
            Err(e @ (FetchError::NoControlPlane(_) | FetchError::WrongBlob { .. })) => {
                return Err(e);
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => tracing::debug!(error = %e, "discovery failed; retrying"),
        }
        if Instant::now() >= deadline {
            return Err(FetchError::NoProviders {
                blob: blob_ref.to_string(),
                waited: started.elapsed(),
                detail: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500).min(deadline - Instant::now())).await;
    };
    let id: BlobId = found.id.parse().map_err(|_| {
        FetchError::Control(format!(
            "control plane answered a malformed id {:?}",
            found.id
        ))
    })?;

    // The outboard: ours if a partial download exists, else a provider's, verified.
    let blob = match shared.store.get(&id) {
        Some(b) => b,
        None => {
            let outboard = fetch_outboard(&shared, id, &found.providers).await?;
            let store = Arc::clone(&shared.store);
            tokio::task::spawn_blocking(move || store.begin(&outboard))
                .await
                .map_err(|_| FetchError::Cancelled)??
        }
    };
    let size = blob.outboard().size();
    let count = blob.geometry().chunk_count();
    let have = blob.chunks();
    let resumed_bytes: u64 = have.iter().map(|i| blob.geometry().chunk_len(i)).sum();
    let dl = Arc::new(Download {
        shared: Arc::clone(&shared),
        blob: Arc::clone(&blob),
        sched: Mutex::new(Scheduler::new(have)),
        providers: Mutex::new(Vec::new()),
        latencies: Mutex::new(Vec::new()),
        requests: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        finished: CancellationToken::new(),
        fatal: Mutex::new(None),
        bytes_done: AtomicU64::new(resumed_bytes),
    });
    if blob.is_complete() {
        dl.finished.cancel();
    }

    let mut known: HashMap<String, ProviderIx> = HashMap::new();
    let mut waiting: Vec<ProviderIx> = Vec::new();
    // Per provider: consecutive failures and when it may be tried again.
    let mut breaker: HashMap<ProviderIx, (u32, Instant)> = HashMap::new();
    let mut banned: Vec<ProviderIx> = Vec::new();
    let mut workers: JoinSet<(ProviderIx, WorkerEnd)> = JoinSet::new();
    let mut running: HashMap<ProviderIx, ()> = HashMap::new();

    let add_providers = |dl: &Arc<Download>,
                         known: &mut HashMap<String, ProviderIx>,
                         waiting: &mut Vec<ProviderIx>,
                         list: &[pb::Provider]| {
        for p in list {
            if p.peer_id == dl.shared.peer_id || p.address.is_empty() {
                continue;
            }
            let set = held(count, p.complete, &p.chunks);
            if let Some(&ix) = known.get(&p.peer_id) {
                if lock(&dl.sched).update_provider(ix, set) {
                    dl.wake.notify_waiters();
                }
                continue;
            }
            let ix = lock(&dl.sched).add_provider(set);
            lock(&dl.providers).push(Arc::new(ProviderEntry {
                peer_id: p.peer_id.clone(),
                address: p.address.clone(),
                bytes: AtomicU64::new(0),
            }));
            lock(&dl.latencies).push(0.0);
            known.insert(p.peer_id.clone(), ix);
            waiting.push(ix);
        }
    };
    add_providers(&dl, &mut known, &mut waiting, &found.providers);

    // `nebula rm` during the fetch takes the blob out of the store.
    let removed = || {
        shared
            .store
            .get(&id)
            .is_none_or(|b| !Arc::ptr_eq(&b, &blob))
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_discovery = Instant::now();
    // The no-progress clock: when a chunk was last stored, and the bytes held then.
    let mut progress_mark: (Instant, u64) = (Instant::now(), resumed_bytes);
    let mut rate_window: (Instant, u64) = (Instant::now(), resumed_bytes);
    let mut rate = 0u64;
    let max = shared.config.max_providers;
    let sources = |dl: &Download| -> Vec<SourceBytes> {
        lock(&dl.providers)
            .iter()
            .filter(|p| p.bytes.load(Ordering::Relaxed) > 0)
            .map(|p| SourceBytes {
                peer_id: p.peer_id.clone(),
                address: p.address.clone(),
                bytes: p.bytes.load(Ordering::Relaxed),
            })
            .collect()
    };

    let result = loop {
        // Start workers for waiting providers whose breaker allows it, up to K.
        let now = Instant::now();
        waiting.retain(|&ix| {
            if banned.contains(&ix) || running.contains_key(&ix) {
                return false;
            }
            if running.len() >= max {
                return true;
            }
            let (failures, until) = breaker.get(&ix).copied().unwrap_or((0, now));
            if now < until {
                return true;
            }
            let entry = Arc::clone(&lock(&dl.providers)[ix]);
            running.insert(ix, ());
            workers.spawn(run_worker(Arc::clone(&dl), ix, entry, failures > 0));
            false
        });
        if dl.finished.is_cancelled() {
            break Ok(());
        }
        // The timeout measures time without progress on the missing chunks,
        // not time without a running worker: retrying dead or empty
        // providers must not restart it. It fails the fetch once chunks are
        // missing that no reachable provider holds (or no provider runs at
        // all) and nothing was stored for that long.
        let held_bytes = dl.bytes_done.load(Ordering::Relaxed);
        if held_bytes != progress_mark.1 {
            progress_mark = (now, held_bytes);
        }
        let (unheld, missing) = {
            let sched = lock(&dl.sched);
            (sched.unavailable(), count - sched.have().count())
        };
        if (unheld > 0 || running.is_empty())
            && now.duration_since(progress_mark.0) >= no_provider_timeout
        {
            let unheld = if unheld > 0 { unheld } else { missing };
            break Err(FetchError::NoProviders {
                blob: id.to_string(),
                waited: now.duration_since(progress_mark.0),
                detail: format!(
                    ": {unheld} of {count} chunks are held by no reachable peer; verified chunks kept for a resume"
                ),
            });
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => break Err(FetchError::Cancelled),
            _ = dl.finished.cancelled() => {}
            ended = workers.join_next(), if !workers.is_empty() => {
                let Some(Ok((ix, end))) = ended else { continue };
                running.remove(&ix);
                match end {
                    WorkerEnd::Done => {}
                    WorkerEnd::Banned => {
                        lock(&dl.sched).deactivate(ix);
                        banned.push(ix);
                        shared.metrics.provider_banned();
                        let entry = Arc::clone(&lock(&dl.providers)[ix]);
                        tracing::warn!(peer = %entry.address, blob = %id.short(), "provider banned from this download: it sent chunks that failed verification");
                        report(&shared, &entry.peer_id, id).await;
                    }
                    WorkerEnd::Failed(why) => {
                        // A worker that never connected did not deactivate it:
                        // its chunks must stop counting as available.
                        lock(&dl.sched).deactivate(ix);
                        let failures = breaker.get(&ix).map_or(0, |f| f.0) + 1;
                        let entry = &lock(&dl.providers)[ix];
                        // The loss is news once; its retries are not.
                        if failures == 1 {
                            tracing::warn!(peer = %entry.address, blob = %id.short(), %why, "provider lost");
                        } else {
                            tracing::debug!(peer = %entry.address, blob = %id.short(), %why, failures, "provider still unreachable");
                        }
                        let backoff = Duration::from_millis(500 * (1 << failures.min(6)));
                        breaker.insert(ix, (failures, Instant::now() + backoff.min(Duration::from_secs(30))));
                        if !waiting.contains(&ix) {
                            waiting.push(ix);
                        }
                    }
                    WorkerEnd::NothingToDo => {
                        // Nothing it holds is missing: try it again when it has more.
                        breaker.insert(ix, (0, Instant::now() + Duration::from_millis(500)));
                        if !waiting.contains(&ix) {
                            waiting.push(ix);
                        }
                    }
                }
            }
            _ = tick.tick() => {
                if removed() {
                    break Err(FetchError::Removed { blob: id });
                }
                let done = dl.bytes_done.load(Ordering::Relaxed);
                let now = Instant::now();
                let span = now.duration_since(rate_window.0);
                if span >= Duration::from_secs(1) {
                    rate = ((done - rate_window.1) as f64 / span.as_secs_f64()) as u64;
                    rate_window = (now, done);
                }
                progress.send_replace(Progress {
                    id: Some(id),
                    bytes_done: done,
                    total: size,
                    providers: running.len() as u32,
                    rate,
                    resumed_bytes,
                    done: false,
                    sources: sources(&dl),
                    ..Progress::default()
                });
                // Early on and when short of providers, ask often: peers that
                // started together find each other within a few hundred ms.
                let short = running.len() < max.min(2)
                    || lock(&dl.sched).unavailable() > 0
                    || now.duration_since(started) < Duration::from_secs(2);
                let every = shared.config.rediscover_interval;
                let due = now.duration_since(last_discovery) >= if short { every / 4 } else { every };
                if due && shared.control.is_some() {
                    last_discovery = now;
                    if let Ok(r) = discover(&shared, &BlobRef::Blake3(id)).await {
                        add_providers(&dl, &mut known, &mut waiting, &r.providers);
                    }
                }
            }
        }
    };
    dl.finished.cancel();
    // Workers see `finished` and give back their requests.
    while workers.join_next().await.is_some() {}
    // A write into the removed blob may have failed first: say why.
    if removed() {
        return Err(FetchError::Removed { blob: id });
    }
    if let Some(err) = lock(&dl.fatal).take() {
        return Err(FetchError::Store(err));
    }
    result?;
    if let BlobRef::Sha256(digest) = blob_ref {
        check_sha256(&blob, digest).await?;
    }
    let sources = sources(&dl);
    progress.send_replace(Progress {
        id: Some(id),
        bytes_done: size,
        total: size,
        providers: 0,
        rate,
        resumed_bytes,
        done: true,
        sources: sources.clone(),
        ..Progress::default()
    });
    Ok(FetchOutcome {
        blob,
        resumed_bytes,
        sources,
        origin_bytes: 0,
        notice: None,
    })
}

/// Checks that a blob fetched by `sha256:` digest has that SHA-256 (its
/// BLAKE3 chunks were verified; the alias that led to it was only a claim).
async fn check_sha256(
    blob: &Arc<Blob>,
    digest: nebula_common::Sha256Digest,
) -> Result<(), FetchError> {
    let hashing = Arc::clone(blob);
    let actual = tokio::task::spawn_blocking(move || hashing.compute_sha256())
        .await
        .map_err(|_| FetchError::Cancelled)??;
    if actual == digest {
        Ok(())
    } else {
        Err(FetchError::DigestMismatch {
            digest,
            id: blob.id(),
            actual,
        })
    }
}

/// Gets the outboard from the first provider whose outboard verifies.
async fn fetch_outboard(
    shared: &Arc<Shared>,
    id: BlobId,
    providers: &[pb::Provider],
) -> Result<Outboard, FetchError> {
    let mut any_reached = false;
    for p in providers.iter().filter(|p| p.peer_id != shared.peer_id) {
        let Ok(conn) = shared.connect(&p.address).await else {
            continue;
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let Some(req) = conn
            .request(
                Req::GetOutboard(pb::GetOutboard {
                    blob: id.to_string(),
                }),
                &tx,
            )
            .await
        else {
            continue;
        };
        let answer =
            tokio::time::timeout(shared.config.discovery.outboard_timeout, rx.recv()).await;
        conn.finish(req);
        any_reached = true;
        match answer {
            Ok(Some(Reply::Answer(_, Resp::Outboard(o)))) => {
                let verified = if o.chaining_values.is_empty() {
                    Outboard::single_chunk(id, o.size).ok_or(())
                } else {
                    Outboard::verified(id, o.size, &o.chaining_values).map_err(|_| ())
                };
                match verified {
                    Ok(ob) => return Ok(ob),
                    Err(()) => {
                        tracing::warn!(peer = %p.address, blob = %id.short(), "outboard failed verification");
                        report(shared, &p.peer_id, id).await;
                    }
                }
            }
            other => tracing::debug!(peer = %p.address, ?other, "no outboard"),
        }
    }
    if any_reached {
        Err(FetchError::BadOutboard(id))
    } else {
        Err(FetchError::NoProviders {
            blob: id.to_string(),
            waited: Duration::ZERO,
            detail: " (no provider reachable)".into(),
        })
    }
}

async fn report(shared: &Shared, peer_id: &str, blob: BlobId) {
    let Some(control) = shared.control.clone() else {
        return;
    };
    let request = pb::ReportPeerRequest {
        reporter_id: shared.peer_id.clone(),
        peer_id: peer_id.to_owned(),
        blob: blob.to_string(),
        reason: "sent chunks that failed verification".into(),
    };
    match tokio::time::timeout(control.deadline(), control.report_peer(request)).await {
        Ok(Ok(_)) => {
            tracing::warn!(peer = peer_id, blob = %blob.short(), "reported a provider for corrupt chunks")
        }
        other => tracing::debug!(?other, "report failed"),
    }
}

/// How a worker ended.
#[derive(Debug)]
enum WorkerEnd {
    /// The blob is complete (or the download ended).
    Done,
    /// The provider broke, stalled or refused; its requests were given back.
    Failed(String),
    /// It sent two bad chunks: banned for this download.
    Banned,
    /// It holds nothing we still miss.
    NothingToDo,
}

#[derive(Debug)]
struct InFlight {
    chunk: u32,
    sent: Instant,
    pieces: Vec<Bytes>,
    /// Its share of the download buffer, given back when it is dropped
    /// (stored, given back, cancelled, or the worker ended).
    _share: OwnedSemaphorePermit,
}

/// A worker's place in the queue for a share of the download buffer.
type ShareWait = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Consecutive failures (errors, busy answers past patience) before a worker gives up.
const MAX_FAILURES: u32 = 3;
/// Floor for the stall timeout.
const STALL_FLOOR: Duration = Duration::from_secs(2);

async fn run_worker(
    dl: Arc<Download>,
    p: ProviderIx,
    entry: Arc<ProviderEntry>,
    trial: bool,
) -> (ProviderIx, WorkerEnd) {
    let end = match dl.shared.connect(&entry.address).await {
        Ok(conn) => {
            Worker {
                dl: Arc::clone(&dl),
                p,
                entry,
                conn,
                inflight: HashMap::new(),
                share: None,
                score: Score::new(Instant::now()),
                trial,
            }
            .run()
            .await
        }
        Err(e) => WorkerEnd::Failed(e.to_string()),
    };
    (p, end)
}

struct Worker {
    dl: Arc<Download>,
    p: ProviderIx,
    entry: Arc<ProviderEntry>,
    conn: Arc<Connection>,
    inflight: HashMap<u64, InFlight>,
    /// A share of the download buffer obtained after waiting, for the next
    /// request.
    share: Option<OwnedSemaphorePermit>,
    score: Score,
    /// Back from a failure: one request at a time until one succeeds.
    trial: bool,
}

impl Worker {
    async fn run(mut self) -> WorkerEnd {
        let dl = Arc::clone(&self.dl);
        let id = dl.id();
        lock(&dl.sched).activate(self.p);
        // Unbounded is safe: what arrives is bounded by this worker's window of
        // requests plus rate-limited have-updates.
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.conn.watch(id, &tx);
        // Fresh bitmap and have-update subscription.
        if self
            .conn
            .request(
                Req::GetOutboard(pb::GetOutboard {
                    blob: id.to_string(),
                }),
                &tx,
            )
            .await
            .is_none()
        {
            return WorkerEnd::Failed("stream closed".into());
        }
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let mut failures = 0u32;
        let mut bad_chunks = 0u32;
        let mut paused_until: Option<Instant> = None;
        let mut last_data = Instant::now();
        let mut idle_rounds = 0u32;
        let mut waiting: Option<ShareWait> = None;
        let end = loop {
            if dl.finished.is_cancelled() {
                break WorkerEnd::Done;
            }
            let now = Instant::now();
            if paused_until.is_none_or(|t| now >= t) {
                paused_until = None;
                let window = if self.trial || dl.degraded(self.p) {
                    1
                } else {
                    self.score.window(dl.chunk_size())
                };
                while self.inflight.len() < window {
                    // What a request brings back waits in memory until it is
                    // stored: each holds a share of the download buffer.
                    let buffer = &dl.shared.download_buffer;
                    let share = match self.share.take() {
                        Some(share) => share,
                        None => match Arc::clone(buffer).try_acquire_many_owned(dl.chunk_share()) {
                            Ok(share) => share,
                            Err(_) => {
                                // Full: with requests in flight, go on with them
                                // (their end frees shares); with none, queue for
                                // one, so every download gets its turn.
                                if self.inflight.is_empty() && waiting.is_none() {
                                    let wait =
                                        Arc::clone(buffer).acquire_many_owned(dl.chunk_share());
                                    waiting = Some(Box::pin(wait));
                                }
                                break;
                            }
                        },
                    };
                    // Degraded providers get no endgame duplicates: they would lose the race.
                    let endgame_ok = !dl.degraded(self.p);
                    let pick = lock(&dl.sched).pick(self.p, endgame_ok, &mut rng);
                    let Some(chunk) = pick else { break };
                    let req = Req::GetChunks(pb::GetChunks {
                        blob: id.to_string(),
                        chunks: vec![chunk],
                        ..pb::GetChunks::default()
                    });
                    let Some(rid) = self.conn.request(req, &tx).await else {
                        lock(&dl.sched).unask(self.p, chunk);
                        break;
                    };
                    if self.inflight.is_empty() {
                        last_data = Instant::now();
                    }
                    self.inflight.insert(
                        rid,
                        InFlight {
                            chunk,
                            sent: Instant::now(),
                            pieces: Vec::new(),
                            _share: share,
                        },
                    );
                    lock(&dl.requests).insert((self.p, chunk), (Arc::clone(&self.conn), rid));
                }
            }
            if self.conn.is_closed() {
                break WorkerEnd::Failed("stream closed".into());
            }
            if self.inflight.is_empty() && paused_until.is_none() && waiting.is_none() {
                idle_rounds += 1;
                // Nothing to ask it for a while: let the coordinator decide.
                if idle_rounds > 20 {
                    break WorkerEnd::NothingToDo;
                }
            } else {
                idle_rounds = 0;
            }
            let stall_at = (!self.inflight.is_empty())
                .then(|| last_data + self.score.stall_timeout(STALL_FLOOR));
            let wake_at = paused_until.unwrap_or_else(|| now + Duration::from_millis(250));
            tokio::select! {
                _ = dl.finished.cancelled() => {}
                // A closed stream (reset, refused, killed) gives its requests back at once.
                () = self.conn.closed() => break WorkerEnd::Failed("stream closed".into()),
                _ = dl.wake.notified(), if self.inflight.is_empty() => {}
                share = async { waiting.as_mut()?.await.ok() }, if waiting.is_some() => {
                    waiting = None;
                    self.share = share;
                }
                _ = tokio::time::sleep_until(wake_at), if self.inflight.is_empty() || paused_until.is_some() => {}
                _ = tokio::time::sleep_until(stall_at.unwrap_or(now)), if stall_at.is_some() => {
                    let timeout = self.score.stall_timeout(STALL_FLOOR);
                    self.score.penalize(Instant::now(), timeout);
                    break WorkerEnd::Failed(format!("stalled: no data for {timeout:?}"));
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { break WorkerEnd::Failed("stream closed".into()) };
                    match msg {
                        Reply::Have(h) => {
                            let count = dl.blob.geometry().chunk_count();
                            let set = held(count, h.complete, &h.chunks);
                            if lock(&dl.sched).update_provider(self.p, set) {
                                dl.wake.notify_waiters();
                            }
                        }
                        Reply::Cancelled(rid) => {
                            self.inflight.remove(&rid);
                        }
                        Reply::Answer(rid, kind) => match kind {
                            Resp::Outboard(o) => {
                                self.conn.finish(rid);
                                let count = dl.blob.geometry().chunk_count();
                                let set = held(count, o.complete, &o.chunks);
                                if lock(&dl.sched).update_provider(self.p, set) {
                                    dl.wake.notify_waiters();
                                }
                            }
                            Resp::Piece(piece) => {
                                last_data = Instant::now();
                                if let Some(limiter) = &dl.shared.download_limiter {
                                    limiter.acquire(piece.data.len() as u64).await;
                                }
                                let Some(f) = self.inflight.get_mut(&rid) else { continue };
                                if piece.chunk != f.chunk {
                                    bad_chunks += 1;
                                }
                                f.pieces.push(piece.data);
                                if !piece.last {
                                    continue;
                                }
                                // Present: looked up just above.
                                let f = self.inflight.remove(&rid).expect("in flight");
                                self.conn.finish(rid);
                                match self.store_chunk(f).await {
                                    Ok(()) => {
                                        failures = 0;
                                        self.trial = false;
                                    }
                                    Err(ChunkFailure::Bad) => {
                                        bad_chunks += 1;
                                        if bad_chunks >= 2 {
                                            break WorkerEnd::Banned;
                                        }
                                    }
                                    Err(ChunkFailure::Fatal(e)) => {
                                        *lock(&dl.fatal) = Some(e);
                                        dl.finished.cancel();
                                        break WorkerEnd::Done;
                                    }
                                }
                            }
                            Resp::Busy(b) => {
                                self.give_back(rid);
                                let wait = Duration::from_millis(b.retry_after_ms.clamp(10, 5_000));
                                paused_until = Some(Instant::now() + wait);
                                dl.wake.notify_waiters();
                            }
                            Resp::Error(e) if e.code == pb::error::Code::TryElsewhere as i32 => {
                                // Not a failure: the provider's next answer
                                // (a have-update or discovery) restores the chunk.
                                if let Some(f) = self.inflight.get(&rid) {
                                    lock(&dl.sched).forget_chunk(self.p, f.chunk);
                                }
                                self.give_back(rid);
                                dl.wake.notify_waiters();
                            }
                            Resp::Error(e) => {
                                if let Some(f) = self.inflight.get(&rid)
                                    && e.code == pb::error::Code::NotFound as i32
                                {
                                    lock(&dl.sched).forget_chunk(self.p, f.chunk);
                                }
                                self.give_back(rid);
                                dl.wake.notify_waiters();
                                failures += 1;
                                if failures >= MAX_FAILURES {
                                    break WorkerEnd::Failed(format!("errors: {}", e.message));
                                }
                            }
                            // Not asked for by a blob download.
                            Resp::Have(_) | Resp::Session(_) => {}
                        },
                    }
                }
            }
        };
        self.give_back_all();
        // A failed provider's chunks stop counting as available until it is
        // tried again; a banned one never comes back in this download.
        if matches!(end, WorkerEnd::Banned | WorkerEnd::Failed(_)) {
            lock(&dl.sched).deactivate(self.p);
        }
        dl.wake.notify_waiters();
        lock(&dl.latencies)[self.p] = self.score.latency();
        end
    }

    /// Verifies and stores a whole chunk.
    async fn store_chunk(&mut self, f: InFlight) -> Result<(), ChunkFailure> {
        let dl = &self.dl;
        lock(&dl.requests).remove(&(self.p, f.chunk));
        let data = if f.pieces.len() == 1 {
            f.pieces.into_iter().next().unwrap_or_default()
        } else {
            let mut buf = BytesMut::with_capacity(f.pieces.iter().map(Bytes::len).sum());
            for piece in &f.pieces {
                buf.extend_from_slice(piece);
            }
            buf.freeze()
        };
        let len = data.len() as u64;
        let blob = Arc::clone(&dl.blob);
        let chunk = f.chunk;
        let written = tokio::task::spawn_blocking(move || blob.write_chunk(chunk, &data))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::ChunkMissing {
                    id: dl.id(),
                    index: chunk,
                })
            });
        match written {
            Ok(outcome) => {
                let now = Instant::now();
                self.score.observe(now, now.duration_since(f.sent), len);
                lock(&dl.latencies)[self.p] = self.score.latency();
                let losers = lock(&dl.sched).complete(self.p, chunk);
                for q in losers {
                    if let Some((conn, rid)) = lock(&dl.requests).remove(&(q, chunk)) {
                        conn.cancel(rid);
                    }
                }
                if outcome != WriteOutcome::AlreadyHad {
                    dl.shared
                        .metrics
                        .chunk_received(Source::Peer, len, now.duration_since(f.sent));
                    dl.bytes_done.fetch_add(len, Ordering::Relaxed);
                    dl.shared.downloaded_bytes.fetch_add(len, Ordering::Relaxed);
                    self.entry.bytes.fetch_add(len, Ordering::Relaxed);
                    let _ = dl.shared.chunk_events.send(dl.id());
                }
                if outcome == WriteOutcome::Completed || lock(&dl.sched).is_done() {
                    dl.finished.cancel();
                }
                Ok(())
            }
            Err(StoreError::Verify(e)) => {
                dl.shared.metrics.chunk_rejected();
                tracing::warn!(peer = %self.entry.address, error = %e, "discarding a chunk that failed verification");
                lock(&dl.sched).unask(self.p, chunk);
                dl.wake.notify_waiters();
                Err(ChunkFailure::Bad)
            }
            Err(e) => Err(ChunkFailure::Fatal(e)),
        }
    }

    /// Gives one request back to the scheduler.
    fn give_back(&mut self, rid: u64) {
        self.conn.finish(rid);
        if let Some(f) = self.inflight.remove(&rid) {
            lock(&self.dl.requests).remove(&(self.p, f.chunk));
            lock(&self.dl.sched).unask(self.p, f.chunk);
        }
    }

    /// Gives every outstanding request back, cancelling it at the provider.
    fn give_back_all(&mut self) {
        let ids: Vec<u64> = self.inflight.keys().copied().collect();
        for rid in ids {
            self.conn.cancel(rid);
            self.give_back(rid);
        }
    }
}

enum ChunkFailure {
    /// Failed verification.
    Bad,
    /// The store failed: the whole download stops.
    Fatal(StoreError),
}
