//! One provider's worker: keeps a window of chunk requests in flight on the
//! provider's stream, verifies and stores what arrives, and gives its
//! requests back the moment the provider fails, stalls, answers busy or lies.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use nebula_common::{StoreError, WriteOutcome};
use nebula_proto::v1::{
    self as pb, exchange_request::Kind as Req, exchange_response::Kind as Resp,
};
use rand::SeedableRng;
use tokio::{
    sync::{AcquireError, OwnedSemaphorePermit, mpsc},
    time::Instant,
};

use super::{
    coordinator::{Download, ProviderEntry, lock},
    discovery::held,
    sched::{ProviderIx, Score},
};
use crate::{
    exchange::dial::{ConnectError, Connection, Reply},
    metrics::Source,
};

/// Why a provider's worker gave up on it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// Its stream could not be opened.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Its stream closed.
    #[error("stream closed")]
    StreamClosed,
    /// It sent nothing for this long with requests in flight.
    #[error("stalled: no data for {0:?}")]
    Stalled(Duration),
    /// It answered errors too many times in a row; the last one.
    #[error("errors: {}", .0.message)]
    Errors(pb::Error),
}

/// How a worker ended.
#[derive(Debug)]
pub(super) enum WorkerEnd {
    /// The blob is complete (or the download ended).
    Done,
    /// The provider broke, stalled or refused; its requests were given back.
    Failed(Failure),
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

pub(super) async fn run_worker(
    dl: Arc<Download>,
    p: ProviderIx,
    entry: Arc<ProviderEntry>,
    trial: bool,
) -> (ProviderIx, WorkerEnd) {
    let end = match dl.downloads.connect(&entry.address).await {
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
        Err(e) => WorkerEnd::Failed(e.into()),
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
            return WorkerEnd::Failed(Failure::StreamClosed);
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
                    let buffer = &dl.downloads.buffer;
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
                break WorkerEnd::Failed(Failure::StreamClosed);
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
            let stall_at = (!self.inflight.is_empty()).then(|| {
                last_data
                    + self
                        .score
                        .stall_timeout(self.dl.downloads.config.discovery.stall_floor)
            });
            let wake_at = paused_until.unwrap_or_else(|| now + Duration::from_millis(250));
            tokio::select! {
                _ = dl.finished.cancelled() => {}
                // A closed stream (reset, refused, killed) gives its requests back at once.
                () = self.conn.closed() => break WorkerEnd::Failed(Failure::StreamClosed),
                _ = dl.wake.notified(), if self.inflight.is_empty() => {}
                share = async { waiting.as_mut()?.await.ok() }, if waiting.is_some() => {
                    waiting = None;
                    self.share = share;
                }
                _ = tokio::time::sleep_until(wake_at), if self.inflight.is_empty() || paused_until.is_some() => {}
                _ = tokio::time::sleep_until(stall_at.unwrap_or(now)), if stall_at.is_some() => {
                    let timeout = self.score.stall_timeout(self.dl.downloads.config.discovery.stall_floor);
                    self.score.penalize(Instant::now(), timeout);
                    break WorkerEnd::Failed(Failure::Stalled(timeout));
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { break WorkerEnd::Failed(Failure::StreamClosed) };
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
                                if let Some(limiter) = &dl.downloads.limiter {
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
                                if failures >= dl.downloads.config.discovery.max_failures {
                                    break WorkerEnd::Failed(Failure::Errors(e));
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
                    dl.downloads.metrics.chunk_received(
                        Source::Peer,
                        len,
                        now.duration_since(f.sent),
                    );
                    dl.bytes_done.fetch_add(len, Ordering::Relaxed);
                    dl.downloads.count_downloaded(len);
                    self.entry.bytes.fetch_add(len, Ordering::Relaxed);
                    dl.downloads.events.chunk_added(dl.id());
                }
                if outcome == WriteOutcome::Completed || lock(&dl.sched).is_done() {
                    dl.finished.cancel();
                }
                Ok(())
            }
            Err(StoreError::Verify(e)) => {
                dl.downloads.metrics.chunk_rejected();
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
