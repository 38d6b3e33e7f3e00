//! Following a lease holder: its origin download under way, fetched as it
//! arrives from the holder and from the other peers following it.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use nebula_common::ChunkSet;
use nebula_proto::v1::{
    self as pb, exchange_request::Kind as Req, exchange_response::Kind as Resp,
};
use rand::seq::SliceRandom as _;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use super::{Offered, lease::report};
use crate::{
    exchange::dial::{Connection, Reply},
    fetch::{Progress, SourceBytes},
    metrics::Source,
    origin::Origins,
    sessions::{self, Offer, Session},
};

/// A follower asks its holder again this often when it has nothing new.
pub(super) const FOLLOW_POLL: Duration = Duration::from_millis(50);

/// A holder that sends nothing new for this long is stalled: the follower
/// asks the control plane again (the lease may have passed on).
pub(super) const FOLLOW_STALL: Duration = Duration::from_secs(5);

/// Chunks one follower request asks one peer for.
const FOLLOW_BATCH: usize = 16;

/// Chunks one follower request asks the holder for: few, so that the
/// followers spread what the holder sends among themselves.
const FOLLOW_HOLDER_BATCH: usize = 4;

/// Other followers a follower fetches from at once.
const FOLLOW_PEERS: usize = 3;

/// How a follower's turn ended.
pub(super) enum Followed {
    /// Every chunk is here; the bytes each peer sent.
    Complete(Vec<SourceBytes>),
    /// Nothing to follow yet (the holder has not begun, or the blob is one
    /// chunk, which only its id can check): wait for the record.
    Wait,
    /// The holder stopped answering or stopped making progress.
    Stalled,
    /// The holder sent data that fails its own chaining values.
    Lied(String),
}

/// A peer a follower fetches chunks from: the holder, or another follower.
struct Feed {
    peer_id: String,
    address: String,
    conn: Arc<Connection>,
    /// The chunks it holds (the holder's: those it offered).
    held: ChunkSet,
}

/// Fetches the holder's download under way into `session` as it arrives,
/// from the holder and from the other peers following it (sparing the
/// holder's upload), each chunk checked against the holder's chaining value.
pub(super) async fn follow(
    origins: &Arc<Origins>,
    session: &Arc<Session>,
    holder: (&str, &str),
    progress: &watch::Sender<Progress>,
) -> Followed {
    let Ok(conn) = origins.downloads.connect(holder.1).await else {
        return Followed::Stalled;
    };
    let _offered = Offered::start(origins, session);
    progress.send_modify(|p| p.scratch = Some(Arc::clone(session)));
    let mut last_progress = Instant::now();
    // Every peer that sent something, by address; the holder first.
    let mut sent: Vec<(String, String, u64)> = vec![(holder.0.to_owned(), holder.1.to_owned(), 0)];
    let mut banned: HashSet<String> = HashSet::new();
    let mut round = 0usize;
    loop {
        if origins.downloads.shutdown().is_cancelled() {
            return Followed::Stalled;
        }
        round += 1;
        let get = Req::GetSession(pb::GetSession {
            key: session.key.clone(),
        });
        let Some(Resp::Session(state)) = ask(&conn, get).await else {
            return Followed::Stalled;
        };
        let Some(offer) = Offer::read(&state) else {
            return Followed::Lied("a malformed session answer".into());
        };
        let size = offer.validators.size;
        if size == 0 && offer.chunks.is_empty() {
            if last_progress.elapsed() > FOLLOW_STALL {
                return Followed::Stalled;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
            continue;
        }
        let count = nebula_common::Geometry::new(size).chunk_count();
        if count <= 1 {
            return Followed::Wait;
        }
        session.begin(&offer.validators);
        let cvs: HashMap<u32, [u8; 32]> = offer
            .chunks
            .iter()
            .copied()
            .filter(|(i, _)| !session.has(*i))
            .collect();
        if cvs.is_empty() {
            if session.is_complete() {
                let sources = sent
                    .into_iter()
                    .filter(|s| s.2 > 0)
                    .map(|(peer_id, address, bytes)| SourceBytes {
                        peer_id,
                        address,
                        bytes,
                    })
                    .collect();
                return Followed::Complete(sources);
            }
            if last_progress.elapsed() > FOLLOW_STALL {
                return Followed::Stalled;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
            continue;
        }
        // The other followers, and what they hold of this version.
        let mut sources = Vec::new();
        for (peer_id, address) in offer
            .peers
            .iter()
            .filter(|(_, a)| !banned.contains(a) && *a != origins.address)
            .take(FOLLOW_PEERS)
        {
            let Ok(Ok(c)) =
                tokio::time::timeout(FOLLOW_POLL * 20, origins.downloads.connect(address)).await
            else {
                continue;
            };
            let get = Req::GetSession(pb::GetSession {
                key: session.key.clone(),
            });
            if let Some(Resp::Session(theirs)) = ask(&c, get).await
                && theirs.etag == offer.validators.etag
                && theirs.last_modified == offer.validators.last_modified
            {
                sources.push(Feed {
                    peer_id: peer_id.clone(),
                    address: address.clone(),
                    conn: c,
                    held: Session::held(&theirs, size),
                });
            }
        }
        let mut all = ChunkSet::new(count);
        for &i in cvs.keys() {
            all.insert(i);
        }
        sources.push(Feed {
            peer_id: holder.0.to_owned(),
            address: holder.1.to_owned(),
            conn: Arc::clone(&conn),
            held: all,
        });
        // Each chunk to a follower that holds it, in turn, else to the holder.
        let holder_ix = sources.len() - 1;
        let mut batches: Vec<Vec<(u32, [u8; 32])>> = vec![Vec::new(); sources.len()];
        // In random order: followers then ask the holder for different
        // chunks and pass them on to each other (as rarest-first does).
        let mut wanted: Vec<(u32, [u8; 32])> = cvs.into_iter().collect();
        wanted.shuffle(&mut rand::rng());
        for (k, (i, cv)) in wanted.into_iter().enumerate() {
            let with: Vec<usize> = (0..holder_ix)
                .filter(|&j| sources[j].held.contains(i))
                .collect();
            let (j, cap) = match with.len() {
                0 => (holder_ix, FOLLOW_HOLDER_BATCH),
                n => (with[(k + round) % n], FOLLOW_BATCH),
            };
            if batches[j].len() < cap {
                batches[j].push((i, cv));
            }
        }
        let jobs = sources
            .iter()
            .zip(&batches)
            .filter(|(_, b)| !b.is_empty())
            .map(|(source, batch)| async move {
                (
                    source.address.clone(),
                    fetch_batch(origins, &source.conn, session, batch, size, progress).await,
                )
            });
        for (address, (bytes, end)) in futures::future::join_all(jobs).await {
            if bytes > 0 {
                last_progress = Instant::now();
            }
            let peer_id = sources
                .iter()
                .find(|s| s.address == address)
                .map(|s| s.peer_id.clone())
                .unwrap_or_default();
            match sent.iter_mut().find(|s| s.1 == address) {
                Some(s) => s.2 += bytes,
                None => sent.push((peer_id.clone(), address.clone(), bytes)),
            }
            match end {
                BatchEnd::Done => {}
                BatchEnd::Broken if address == holder.1 => return Followed::Stalled,
                BatchEnd::Broken => {}
                BatchEnd::Lied(why) if address == holder.1 => return Followed::Lied(why),
                BatchEnd::Lied(why) => {
                    tracing::warn!(peer = %peer_id, %why, "a peer following the same origin download sent bad data; reporting it");
                    report(origins, &peer_id, &why).await;
                    banned.insert(address);
                }
            }
        }
        if last_progress.elapsed() > FOLLOW_STALL {
            return Followed::Stalled;
        }
    }
}

/// How one batch of chunk requests ended.
enum BatchEnd {
    Done,
    /// The peer stopped answering, was busy, or lacked a chunk after all.
    Broken,
    /// A chunk failed its chaining value.
    Lied(String),
}

/// Fetches `batch` from one peer into `session`, each chunk checked against
/// its chaining value; answers the bytes stored and how it ended.
async fn fetch_batch(
    origins: &Arc<Origins>,
    conn: &Connection,
    session: &Arc<Session>,
    batch: &[(u32, [u8; 32])],
    size: u64,
    progress: &watch::Sender<Progress>,
) -> (u64, BatchEnd) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let get = Req::GetChunks(pb::GetChunks {
        chunks: batch.iter().map(|(i, _)| *i).collect(),
        session: session.key.clone(),
        ..pb::GetChunks::default()
    });
    let Some(rid) = conn.request(get, &tx).await else {
        return (0, BatchEnd::Broken);
    };
    let started = Instant::now();
    let mut pieces: Vec<Bytes> = Vec::new();
    let mut stored = 0u64;
    let mut next = 0;
    let end = loop {
        if next == batch.len() {
            break BatchEnd::Done;
        }
        match tokio::time::timeout(FOLLOW_STALL, rx.recv()).await {
            Ok(Some(Reply::Answer(id, Resp::Piece(p)))) if id == rid => {
                let (index, cv) = batch[next];
                let so_far: usize = pieces.iter().map(Bytes::len).sum();
                if p.chunk != index
                    || p.offset != so_far as u64
                    || (so_far + p.data.len()) as u64 > session.chunk_len(index)
                {
                    break BatchEnd::Lied(format!("chunk {index} sent out of shape"));
                }
                pieces.push(p.data);
                if !p.last {
                    continue;
                }
                let data = std::mem::take(&mut pieces).concat();
                let len = data.len() as u64;
                let s = Arc::clone(session);
                let accepted = tokio::task::spawn_blocking(move || s.accept(index, &data, cv))
                    .await
                    .unwrap_or(Err(sessions::Refused::Malformed));
                if let Err(why) = accepted {
                    origins.downloads.metrics().chunk_rejected();
                    break BatchEnd::Lied(format!("chunk {index}: {why:?}"));
                }
                origins
                    .downloads
                    .metrics()
                    .chunk_received(Source::Peer, len, started.elapsed());
                origins.downloads.count_downloaded(len);
                stored += len;
                next += 1;
                progress.send_modify(|p| {
                    p.bytes_done = session.bytes_held();
                    p.total = size;
                    p.providers = 1;
                });
            }
            // Busy, or not there after all: asked again next round.
            Ok(Some(Reply::Answer(id, _))) if id == rid => break BatchEnd::Broken,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break BatchEnd::Broken,
        }
    };
    conn.finish(rid);
    (stored, end)
}

/// One request and its first answer.
async fn ask(conn: &Connection, req: Req) -> Option<Resp> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let rid = conn.request(req, &tx).await?;
    let deadline = Instant::now() + FOLLOW_STALL;
    let answer = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Reply::Answer(id, resp))) if id == rid => break Some(resp),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break None,
        }
    };
    conn.finish(rid);
    answer
}
