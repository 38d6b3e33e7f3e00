//! The serving side of `PeerExchange`: verified chunks from the store, under
//! an upload-slot cap and an optional rate limit, with have-updates volunteered
//! for every blob the dialing peer asked about.

use std::{
    collections::HashSet,
    pin::Pin,
    sync::{Arc, Mutex, atomic::AtomicU32},
    time::Duration,
};

use bytes::Bytes;
use futures::Stream;
use nebula_common::{BlobId, Store, StoreError, credential::Claims};
use nebula_proto::v1::{
    self as pb, ExchangeRequest, ExchangeResponse, exchange_request::Kind as Req,
    exchange_response::Kind as Resp, peer_exchange_server::PeerExchange,
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::{
    Config,
    events::Events,
    metrics::{Metrics, Refusal},
    sessions::Sessions,
    tasks::Tasks,
    uploads::{Slot, Uploads},
};
use refused::Refused;

/// Largest chunk payload in one message. A quarter of a chunk: what a
/// stream holds between its reader and the socket (the piece queued, the one
/// being encoded, the encoder's buffer) comes to about one chunk, and a
/// transfer is as fast as with whole-chunk pieces (`single_stream`).
pub(crate) const MAX_PIECE: usize = 256 << 10;

/// What the serving side is built from.
#[derive(Debug)]
pub(crate) struct Serving {
    pub(crate) config: Arc<Config>,
    pub(crate) store: Arc<Store>,
    pub(crate) uploads: Arc<Uploads>,
    /// Which blobs gain chunks: have-updates for the blobs a stream watches.
    pub(crate) events: Arc<Events>,
    /// Origin downloads under way, served before they are in the store.
    pub(crate) sessions: Sessions,
    pub(crate) metrics: Arc<Metrics>,
    /// Cancelled when the node stops: streams end after the piece they are
    /// sending.
    pub(crate) shutdown: CancellationToken,
    /// Where each stream's reader and server run.
    pub(crate) tasks: Tasks,
}

/// The `PeerExchange` service of a node.
#[derive(Debug, Clone)]
pub(crate) struct ExchangeService {
    serving: Arc<Serving>,
}

impl ExchangeService {
    pub(crate) fn new(serving: Serving) -> Self {
        Self {
            serving: Arc::new(serving),
        }
    }
}

#[derive(Debug)]
enum Work {
    Outboard(u64, BlobId),
    Chunk(u64, BlobId, u32),
    /// A `GetSession`: the state of an origin download under way, and the
    /// asking peer's id and the address it serves on (from its `Hello`).
    Session(u64, String, Option<(String, String)>),
    /// A chunk of an origin download under way.
    SessionChunk(u64, String, u32),
    Answer(ExchangeResponse),
    /// The dialing side sent what cannot be read or is not allowed: end the
    /// stream with this.
    Fail(Refused),
}

fn answer(request_id: u64, kind: Resp) -> ExchangeResponse {
    ExchangeResponse {
        request_id,
        kind: Some(kind),
    }
}

fn busy(request_id: u64, retry_after: Duration) -> ExchangeResponse {
    answer(
        request_id,
        Resp::Busy(pb::Busy {
            retry_after_ms: retry_after.as_millis() as u64,
        }),
    )
}

fn error(request_id: u64, code: pb::error::Code, message: String) -> ExchangeResponse {
    answer(
        request_id,
        Resp::Error(pb::Error {
            code: code as i32,
            message,
        }),
    )
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ExchangeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PeerExchange for ExchangeService {
    type ExchangeStream = ResponseStream;

    async fn exchange(
        &self,
        request: Request<Streaming<ExchangeRequest>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let remote = request.remote_addr();
        // Put there by `ExchangeAuth`, which admits no stream without it.
        let caller = request
            .extensions()
            .get::<Claims>()
            .map(|c| c.sub.clone())
            .ok_or(Refused::NoCredential)?;
        let span = tracing::info_span!("exchange", peer = %caller, ?remote);
        let inbound = request.into_inner();
        // One piece of slack, beside the piece being encoded and about one
        // more in HTTP/2's send buffer: enough to keep the stream busy while
        // the next chunk is read, and a receiver that stops reading holds
        // about 2 MiB here (the chunk being sent and its pieces in flight),
        // for its own stream only.
        let (out_tx, out_rx) = mpsc::channel::<Result<ExchangeResponse, Status>>(1);
        // Bounded: past it, reading waits on serving.
        let (work_tx, work_rx) =
            mpsc::channel::<(Work, Option<Slot>)>(self.serving.config.stream_queue);
        let cancelled = Arc::new(Mutex::new(HashSet::new()));
        let stream = self.serving.uploads.new_stream();
        let watched = Arc::new(Mutex::new(HashSet::new()));
        self.serving.tasks.spawn(
            read_requests(
                Arc::clone(&self.serving),
                caller,
                inbound,
                work_tx,
                Arc::clone(&cancelled),
                Arc::clone(&watched),
            )
            .instrument(span.clone()),
        );
        self.serving.tasks.spawn(
            serve_work(
                Arc::clone(&self.serving),
                stream,
                work_rx,
                out_tx,
                cancelled,
                watched,
            )
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }
}

async fn read_requests(
    serving: Arc<Serving>,
    caller: String,
    mut inbound: Streaming<ExchangeRequest>,
    work: mpsc::Sender<(Work, Option<Slot>)>,
    cancelled: Arc<Mutex<HashSet<u64>>>,
    watched: Arc<Mutex<HashSet<BlobId>>>,
) {
    // Upload slots this stream holds.
    let stream_slots = Arc::new(AtomicU32::new(0));
    // Where the dialing peer serves, once it said (its `Hello`).
    let mut asker: Option<(String, String)> = None;
    let mut greeted = false;
    let watch = |blob: BlobId| {
        let mut watched = watched.lock().unwrap_or_else(|e| e.into_inner());
        if watched.len() < serving.config.max_watched {
            watched.insert(blob);
        }
    };
    loop {
        let msg = tokio::select! {
            _ = serving.shutdown.cancelled() => return,
            msg = inbound.message() => msg,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(%status, "exchange stream ended by the dialing peer");
                if let Some(refused) = Refused::reading(status) {
                    let _ = work.send((Work::Fail(refused), None)).await;
                }
                return;
            }
        };
        // The first message, and only the first, is a Hello naming the peer
        // the credential names.
        let refused = match &msg.kind {
            Some(Req::Hello(_)) if greeted => Some(Refused::HelloTwice),
            Some(Req::Hello(hello)) if hello.peer_id != caller => Some(Refused::HelloMismatch),
            Some(Req::Hello(_)) => None,
            _ if !greeted => Some(Refused::NoHello),
            _ => None,
        };
        if let Some(refused) = refused {
            tracing::debug!(%refused, "exchange stream refused");
            let _ = work.send((Work::Fail(refused), None)).await;
            return;
        }
        let id = msg.request_id;
        let parse = |blob: &str| blob.parse::<BlobId>();
        let items: Vec<(Work, Option<Slot>)> = match msg.kind {
            Some(Req::Hello(hello)) => {
                greeted = true;
                tracing::debug!(address = %hello.address, "exchange stream opened");
                asker = (!hello.address.is_empty()).then_some((hello.peer_id, hello.address));
                continue;
            }
            Some(Req::GetOutboard(get)) => match parse(&get.blob) {
                Ok(blob) => {
                    watch(blob);
                    vec![(Work::Outboard(id, blob), None)]
                }
                Err(e) => vec![(
                    Work::Answer(error(id, pb::error::Code::Invalid, e.to_string())),
                    None,
                )],
            },
            Some(Req::GetChunks(get))
                if get.chunks.len() > serving.config.max_chunks_per_request =>
            {
                let msg = format!(
                    "{} chunks in one request; at most {}",
                    get.chunks.len(),
                    serving.config.max_chunks_per_request
                );
                vec![(Work::Answer(error(id, pb::error::Code::Invalid, msg)), None)]
            }
            Some(Req::GetSession(get)) => vec![(Work::Session(id, get.key, asker.clone()), None)],
            Some(Req::GetChunks(get)) if !get.session.is_empty() => get
                .chunks
                .iter()
                .map(|&chunk| match serving.uploads.take_slot(&stream_slots) {
                    Some(slot) => (
                        Work::SessionChunk(id, get.session.clone(), chunk),
                        Some(slot),
                    ),
                    None => {
                        serving.metrics.refused(Refusal::Busy);
                        (Work::Answer(busy(id, serving.config.busy_retry)), None)
                    }
                })
                .collect(),
            Some(Req::GetChunks(get)) => match parse(&get.blob) {
                Ok(blob) => {
                    watch(blob);
                    get.chunks
                        .iter()
                        .map(|&chunk| match serving.uploads.take_slot(&stream_slots) {
                            Some(slot) => (Work::Chunk(id, blob, chunk), Some(slot)),
                            None => {
                                serving.metrics.refused(Refusal::Busy);
                                (Work::Answer(busy(id, serving.config.busy_retry)), None)
                            }
                        })
                        .collect()
                }
                Err(e) => vec![(
                    Work::Answer(error(id, pb::error::Code::Invalid, e.to_string())),
                    None,
                )],
            },
            Some(Req::Cancel(c)) => {
                let mut cancelled = cancelled.lock().unwrap_or_else(|e| e.into_inner());
                // At most one per queued request is useful; a flood of cancels
                // for requests never made is not remembered.
                if cancelled.len() < serving.config.stream_queue {
                    cancelled.insert(c.request_id);
                }
                continue;
            }
            // The dialing peer's own progress; discovery finds it through the control plane.
            Some(Req::Have(_)) | None => continue,
        };
        for item in items {
            if work.send(item).await.is_err() {
                return;
            }
        }
    }
}

async fn serve_work(
    serving: Arc<Serving>,
    stream: u64,
    mut work: mpsc::Receiver<(Work, Option<Slot>)>,
    out: mpsc::Sender<Result<ExchangeResponse, Status>>,
    cancelled: Arc<Mutex<HashSet<u64>>>,
    watched: Arc<Mutex<HashSet<BlobId>>>,
) {
    let _open = serving.metrics.serving_stream();
    let mut events = serving.events.subscribe();
    let mut dirty: HashSet<BlobId> = HashSet::new();
    let mut flush = tokio::time::interval(serving.config.have_flush);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle = serving.config.idle_stream_timeout;
    let send = |msg: ExchangeResponse| {
        let out = out.clone();
        async move {
            matches!(
                tokio::time::timeout(idle, out.send(Ok(msg))).await,
                Ok(Ok(()))
            )
        }
    };
    loop {
        tokio::select! {
            biased;
            _ = serving.shutdown.cancelled() => return,
            item = work.recv() => {
                let Some((item, slot)) = item else { return };
                let ok = match item {
                    Work::Answer(msg) => send(msg).await,
                    Work::Fail(refused) => {
                        let _ = tokio::time::timeout(idle, out.send(Err(refused.into()))).await;
                        return;
                    }
                    Work::Outboard(id, blob) => send(outboard(&serving, id, blob)).await,
                    Work::Session(id, key, asker) => {
                        let msg = match serving.sessions.get(&key) {
                            Some(s) => answer(id, Resp::Session(s.to_wire_for(asker.as_ref()))),
                            None => error(id, pb::error::Code::NotFound, "no such origin download here".into()),
                        };
                        send(msg).await
                    }
                    Work::SessionChunk(id, key, chunk) => {
                        if cancelled.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                            true
                        } else {
                            serve_session_chunk(&serving, id, &key, chunk, &send).await
                        }
                    }
                    Work::Chunk(id, blob, chunk) => {
                        if cancelled.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                            true
                        } else {
                            serve_chunk(&serving, stream, id, blob, chunk, &send).await
                        }
                    }
                };
                drop(slot);
                if !ok {
                    tracing::debug!("receiver stopped reading; dropping the stream");
                    return;
                }
            }
            event = events.recv() => match event {
                Ok(blob) => {
                    if watched.lock().unwrap_or_else(|e| e.into_inner()).contains(&blob) {
                        dirty.insert(blob);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    dirty.extend(watched.lock().unwrap_or_else(|e| e.into_inner()).iter().copied());
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = flush.tick(), if !dirty.is_empty() => {
                for blob in dirty.drain() {
                    let Some(b) = serving.store.get(&blob) else { continue };
                    let have = pb::HaveUpdate {
                        blob: blob.to_string(),
                        chunks: if b.is_complete() { Bytes::new() } else { Bytes::from(b.chunks().to_bitmap()) },
                        complete: b.is_complete(),
                    };
                    if !send(answer(0, Resp::Have(have))).await {
                        return;
                    }
                }
            }
        }
    }
}

fn outboard(serving: &Serving, id: u64, blob: BlobId) -> ExchangeResponse {
    let Some(b) = serving.store.get(&blob) else {
        return error(
            id,
            pb::error::Code::NotFound,
            format!("blob {blob} is not here"),
        );
    };
    let complete = b.is_complete();
    answer(
        id,
        Resp::Outboard(pb::Outboard {
            size: b.outboard().size(),
            chaining_values: Bytes::from(b.outboard().chaining_values()),
            chunks: if complete {
                Bytes::new()
            } else {
                Bytes::from(b.chunks().to_bitmap())
            },
            complete,
        }),
    )
}

async fn serve_chunk<F, Fut>(
    serving: &Arc<Serving>,
    stream: u64,
    id: u64,
    blob: BlobId,
    chunk: u32,
    send: &F,
) -> bool
where
    F: Fn(ExchangeResponse) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let Some(b) = serving.store.get(&blob) else {
        return send(error(
            id,
            pb::error::Code::NotFound,
            format!("blob {blob} is not here"),
        ))
        .await;
    };
    if !serving.uploads.claim_send(stream, &b, chunk) {
        serving.metrics.refused(Refusal::TryElsewhere);
        let msg = format!("chunk {chunk} was just sent to another peer");
        return send(error(id, pb::error::Code::TryElsewhere, msg)).await;
    }
    let data = match tokio::task::spawn_blocking(move || b.read_chunk(chunk)).await {
        Ok(Ok(data)) => data,
        Ok(Err(StoreError::ChunkMissing { .. })) => {
            return send(error(
                id,
                pb::error::Code::NotFound,
                format!("chunk {chunk} is not here"),
            ))
            .await;
        }
        Ok(Err(e)) => {
            tracing::warn!(%blob, chunk, error = %e, "cannot read a chunk to serve");
            return send(error(id, pb::error::Code::Internal, e.to_string())).await;
        }
        Err(_) => {
            return send(error(
                id,
                pb::error::Code::Internal,
                "read task failed".into(),
            ))
            .await;
        }
    };
    send_chunk(serving, id, chunk, data, send).await
}

/// Serves a chunk of an origin download under way (see `crate::origin`).
async fn serve_session_chunk<F, Fut>(
    serving: &Arc<Serving>,
    id: u64,
    key: &str,
    chunk: u32,
    send: &F,
) -> bool
where
    F: Fn(ExchangeResponse) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let session = serving.sessions.get(key);
    let data = match session {
        Some(s) => tokio::task::spawn_blocking(move || s.read_chunk(chunk))
            .await
            .ok()
            .flatten(),
        None => None,
    };
    match data {
        Some(data) => send_chunk(serving, id, chunk, data, send).await,
        None => {
            send(error(
                id,
                pb::error::Code::NotFound,
                format!("chunk {chunk} of that origin download is not here"),
            ))
            .await
        }
    }
}

/// Sends a chunk's bytes in pieces, within the upload limit.
async fn send_chunk<F, Fut>(
    serving: &Arc<Serving>,
    id: u64,
    chunk: u32,
    data: Bytes,
    send: &F,
) -> bool
where
    F: Fn(ExchangeResponse) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let data = crate::fault::corrupt_served_chunk(data);
    let len = data.len();
    let mut offset = 0;
    loop {
        let end = (offset + MAX_PIECE).min(len);
        let piece = data.slice(offset..end);
        serving.uploads.pace(piece.len() as u64).await;
        let msg = answer(
            id,
            Resp::Piece(pb::ChunkPiece {
                chunk,
                offset: offset as u64,
                data: piece,
                last: end == len,
            }),
        );
        if !send(msg).await {
            return false;
        }
        serving.uploads.sent((end - offset) as u64);
        serving.metrics.served((end - offset) as u64);
        offset = end;
        if offset >= len {
            return true;
        }
    }
}

mod refused;
#[cfg(test)]
mod tests;
