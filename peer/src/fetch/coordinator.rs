//! The coordinator of one download: finds providers, starts a worker per
//! provider (at most K at once, each behind the breaker), re-asks the
//! control plane as providers come and go, and reports progress.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nebula_common::{Blob, BlobId, BlobRef, StoreError};
use nebula_proto::v1::{self as pb};
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    FetchError, FetchOutcome, Progress, Shortfall, SourceBytes,
    breaker::{Breaker, Verdict},
    discovery::{check_sha256, discover, fetch_outboard, held, report},
    sched::{ProviderIx, Scheduler},
    worker::{WorkerEnd, run_worker},
};
use crate::{exchange::dial::Connection, fetch::Downloads};

#[derive(Debug)]
pub(super) struct ProviderEntry {
    pub(super) peer_id: String,
    pub(super) address: String,
    pub(super) bytes: AtomicU64,
}

/// A request in flight: the stream it went on and its id there.
pub(super) type Outstanding = (Arc<Connection>, u64);

/// State shared by the coordinator and the workers of one download.
#[derive(Debug)]
pub(super) struct Download {
    pub(super) downloads: Arc<Downloads>,
    pub(super) blob: Arc<Blob>,
    pub(super) sched: Mutex<Scheduler>,
    pub(super) providers: Mutex<Vec<Arc<ProviderEntry>>>,
    /// Each provider's Peak-EWMA latency, to spot degraded ones.
    pub(super) latencies: Mutex<Vec<f64>>,
    /// Outstanding requests by (provider, chunk), for cancelling endgame losers.
    pub(super) requests: Mutex<HashMap<(ProviderIx, u32), Outstanding>>,
    /// Wakes idle workers: a chunk was given back, or a provider gained chunks.
    pub(super) wake: Notify,
    /// Fires when the blob is complete or the download failed.
    pub(super) finished: CancellationToken,
    pub(super) fatal: Mutex<Option<StoreError>>,
    pub(super) bytes_done: AtomicU64,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while these locks are held; recover rather than propagate.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Download {
    pub(super) fn chunk_size(&self) -> u64 {
        self.blob.geometry().chunk_size()
    }

    /// Bytes of the download buffer one chunk request holds: the chunk's
    /// size, or the whole buffer when a chunk is larger.
    pub(super) fn chunk_share(&self) -> u32 {
        let whole = self.downloads.config.download_buffer;
        u32::try_from(self.chunk_size().min(whole)).unwrap_or(u32::MAX)
    }

    pub(super) fn id(&self) -> BlobId {
        self.blob.id()
    }

    /// A provider's latency is far worse than the best active one's.
    pub(super) fn degraded(&self, p: ProviderIx) -> bool {
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

/// [`super::fetch`] without the span and the metrics (for fetches inside another).
pub(crate) async fn download(
    downloads: Arc<Downloads>,
    blob_ref: BlobRef,
    progress: watch::Sender<Progress>,
    no_provider_timeout: Duration,
) -> Result<FetchOutcome, FetchError> {
    let started = Instant::now();
    // Already here?
    let local = match blob_ref {
        BlobRef::Blake3(id) => downloads.store.get(&id),
        BlobRef::Sha256(d) => downloads.store.find_sha256(&d),
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
        if downloads.shutdown.is_cancelled() {
            return Err(FetchError::Cancelled);
        }
        match discover(&downloads, &blob_ref).await {
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
                blob: blob_ref,
                waited: started.elapsed(),
                shortfall: Shortfall::Unknown,
            });
        }
        tokio::time::sleep(Duration::from_millis(500).min(deadline - Instant::now())).await;
    };
    let id: BlobId = found
        .id
        .parse()
        .map_err(|_| FetchError::MalformedId { answered: found.id })?;

    // The outboard: ours if a partial download exists, else a provider's, verified.
    let blob = match downloads.store.get(&id) {
        Some(b) => b,
        None => {
            let outboard = fetch_outboard(&downloads, id, &found.providers).await?;
            let store = Arc::clone(&downloads.store);
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
        downloads: Arc::clone(&downloads),
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
    let mut breaker = Breaker::new(&downloads.config.discovery);
    let mut banned: Vec<ProviderIx> = Vec::new();
    let mut workers: JoinSet<(ProviderIx, WorkerEnd)> = JoinSet::new();
    let mut running: HashMap<ProviderIx, ()> = HashMap::new();

    let add_providers = |dl: &Arc<Download>,
                         known: &mut HashMap<String, ProviderIx>,
                         waiting: &mut Vec<ProviderIx>,
                         list: &[pb::Provider]| {
        for p in list {
            if p.peer_id == dl.downloads.peer_id || p.address.is_empty() {
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
        downloads
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
    let max = downloads.config.max_providers;
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
            let trial = match breaker.verdict(ix, now) {
                Verdict::Wait => return true,
                Verdict::Closed => false,
                Verdict::Trial => true,
            };
            let entry = Arc::clone(&lock(&dl.providers)[ix]);
            running.insert(ix, ());
            workers.spawn(run_worker(Arc::clone(&dl), ix, entry, trial));
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
                blob: BlobRef::Blake3(id),
                waited: now.duration_since(progress_mark.0),
                shortfall: Shortfall::Unheld { unheld, count },
            });
        }
        tokio::select! {
            _ = downloads.shutdown.cancelled() => break Err(FetchError::Cancelled),
            _ = dl.finished.cancelled() => {}
            ended = workers.join_next(), if !workers.is_empty() => {
                let Some(Ok((ix, end))) = ended else { continue };
                running.remove(&ix);
                match end {
                    WorkerEnd::Done => {}
                    WorkerEnd::Banned => {
                        lock(&dl.sched).deactivate(ix);
                        banned.push(ix);
                        downloads.metrics.provider_banned();
                        let entry = Arc::clone(&lock(&dl.providers)[ix]);
                        tracing::warn!(peer = %entry.address, blob = %id.short(), "provider banned from this download: it sent chunks that failed verification");
                        report(&downloads, &entry.peer_id, id).await;
                    }
                    WorkerEnd::Failed(why) => {
                        // A worker that never connected did not deactivate it:
                        // its chunks must stop counting as available.
                        lock(&dl.sched).deactivate(ix);
                        let failures = breaker.failed(ix, Instant::now());
                        let entry = &lock(&dl.providers)[ix];
                        // The loss is news once; its retries are not.
                        if failures == 1 {
                            tracing::warn!(peer = %entry.address, blob = %id.short(), %why, "provider lost");
                        } else {
                            tracing::debug!(peer = %entry.address, blob = %id.short(), %why, failures, "provider still unreachable");
                        }
                        if !waiting.contains(&ix) {
                            waiting.push(ix);
                        }
                    }
                    WorkerEnd::NothingToDo => {
                        // Nothing it holds is missing: try it again when it has more.
                        breaker.idle(ix, Instant::now());
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
                let every = downloads.config.rediscover_interval;
                let due = now.duration_since(last_discovery) >= if short { every / 4 } else { every };
                if due && downloads.control.is_some() {
                    last_discovery = now;
                    if let Ok(r) = discover(&downloads, &BlobRef::Blake3(id)).await {
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
