//! Back to source: `nebula fetch URL`, with one origin download for the fleet.
//!
//! The control plane remembers which blob a URL resolved to, with the
//! origin's validators. A fetch of the URL asks it first:
//! - a fresh record: the blob is fetched from the swarm like any other (the
//!   origin is not asked at all);
//! - otherwise one peer at a time holds the URL's origin lease: it downloads
//!   from the origin (a conditional request when a stale record exists, so an
//!   unchanged origin sends no body), adds the bytes to its store, and records
//!   the blob; meanwhile every other asker waits for that record and then
//!   fetches the blob from the swarm. A holder that dies stops renewing its
//!   lease, and the next asker takes it over;
//! - with the control plane unreachable, the peer goes to the origin directly
//!   and the fetch says so.
//!
//! Every blob ends verified: the store hashes the downloaded bytes as it adds
//! them, and `--digest` is checked against that before anything is recorded,
//! announced or exported.

pub(crate) mod http;
pub(crate) mod session;

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use nebula_common::{Blob, BlobId, BlobRef, ChunkSet};
use nebula_proto::v1::{
    self as pb, exchange_request::Kind as Req, exchange_response::Kind as Resp,
};
use rand::seq::SliceRandom as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use url::Url;

use crate::{
    connection::{Connection, Reply},
    fetch::{FetchError, FetchOutcome, Progress, SourceBytes},
    metrics::Source,
    node::Shared,
};
pub(crate) use http::{Counters, OriginClient, Target, Validators};
pub use http::{OriginClientError, OriginError};
use session::Offer;
pub(crate) use session::Session;

/// How often a peer waiting for another's origin download asks again.
const WAIT_POLL: Duration = Duration::from_millis(250);
/// A swarm fetch of a recorded blob gives up this soon when nobody holds it,
/// and the origin is asked instead.
const RECORDED_BLOB_WAIT: Duration = Duration::from_secs(3);
/// How often progress is published during an origin download.
const PROGRESS_TICK: Duration = Duration::from_millis(100);
/// A follower asks its holder again this often when it has nothing new.
const FOLLOW_POLL: Duration = Duration::from_millis(50);
/// A holder that sends nothing new for this long is stalled: the follower
/// asks the control plane again (the lease may have passed on).
const FOLLOW_STALL: Duration = Duration::from_secs(5);
/// Chunks one follower request asks one peer for.
const FOLLOW_BATCH: usize = 16;
/// Chunks one follower request asks the holder for: few, so that the
/// followers spread what the holder sends among themselves.
const FOLLOW_HOLDER_BATCH: usize = 4;
/// Other followers a follower fetches from at once.
const FOLLOW_PEERS: usize = 3;
/// A finished download stays available to followers this long.
const SESSION_GRACE: Duration = Duration::from_secs(30);

/// A fetch by URL, as the CLI asked for it.
#[derive(Clone)]
pub struct UrlFetch {
    /// The origin URL (http or https), userinfo included if the user gave it.
    pub url: Url,
    /// Headers for the origin only.
    pub headers: HeaderMap,
    /// The content the user expects, if they said.
    pub digest: Option<BlobRef>,
}

// Headers and userinfo are credentials: never printed.
impl std::fmt::Debug for UrlFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlFetch")
            .field("url", &http::redacted(&self.url))
            .field("headers", &self.headers.len())
            .field("digest", &self.digest)
            .finish()
    }
}

/// Why a fetch request by URL is malformed.
#[derive(Debug, thiserror::Error)]
pub enum UrlFetchError {
    /// The URL does not parse or is not http(s).
    #[error("{0}")]
    Url(String),
    /// A header is not `Name: value`.
    #[error("header {0:?} is not `Name: value`")]
    Header(String),
    /// The digest is not `sha256:<hex>` or `blake3:<hex>`.
    #[error("--digest: {0}")]
    Digest(String),
}

impl UrlFetch {
    /// Parses the CLI's URL, `Name: value` headers and optional digest.
    pub fn parse(url: &str, headers: &[String], digest: &str) -> Result<Self, UrlFetchError> {
        let url =
            // The URL itself is not repeated: it may carry credentials.
            Url::parse(url.trim()).map_err(|e| UrlFetchError::Url(format!("not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(UrlFetchError::Url(
                "only http:// and https:// URLs with a host can be fetched".into(),
            ));
        }
        let mut map = HeaderMap::new();
        for h in headers {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| UrlFetchError::Header(shown_header(h)))?;
            let name: HeaderName = name
                .trim()
                .parse()
                .map_err(|_| UrlFetchError::Header(shown_header(h)))?;
            let mut value: HeaderValue = value
                .trim()
                .parse()
                .map_err(|_| UrlFetchError::Header(shown_header(h)))?;
            value.set_sensitive(true);
            map.append(name, value);
        }
        let digest = match digest.trim() {
            "" => None,
            d if d.starts_with("sha256:") || d.starts_with("blake3:") => Some(
                d.parse::<BlobRef>()
                    .map_err(|e| UrlFetchError::Digest(e.to_string()))?,
            ),
            _ => {
                return Err(UrlFetchError::Digest(
                    "give sha256:<64 hex digits> or blake3:<64 hex digits>".into(),
                ));
            }
        };
        Ok(Self {
            url,
            headers: map,
            digest,
        })
    }

    /// The URL the control plane knows it by: no userinfo, no fragment.
    pub fn key(&self) -> String {
        let mut url = self.url.clone();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_fragment(None);
        url.into()
    }

    fn target(&self) -> Target {
        let basic = (!self.url.username().is_empty() || self.url.password().is_some())
            .then(|| (decode(self.url.username()), self.url.password().map(decode)));
        let mut url = self.url.clone();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_fragment(None);
        Target {
            url,
            headers: self.headers.clone(),
            basic,
        }
    }
}

/// A header for an error message: its name only (its value may be a secret).
fn shown_header(h: &str) -> String {
    match h.split_once(':') {
        Some((name, _)) => format!("{}: …", name.trim()),
        None => "…".into(),
    }
}

/// Userinfo as the user meant it (`%40` is `@`; `+` stays `+`).
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Fetches `req` into the store: from the swarm when the fleet already has
/// the URL's content, else from the origin once for the whole fleet. In a
/// `fetch` span naming the URL (without credentials or query values).
pub(crate) async fn fetch_url(
    shared: Arc<Shared>,
    req: UrlFetch,
    progress: watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    let span = tracing::info_span!("fetch", url = %http::redacted(&req.url));
    let metrics = Arc::clone(&shared.metrics);
    let outcome =
        crate::fetch::observed(&metrics, span, by_url(shared, req, progress.clone())).await?;
    let size = outcome.blob.outboard().size();
    progress.send_replace(Progress {
        id: Some(outcome.blob.id()),
        bytes_done: size,
        total: size,
        resumed_bytes: outcome.resumed_bytes,
        done: true,
        sources: outcome.sources.clone(),
        origin_bytes: outcome.origin_bytes,
        notice: outcome.notice.clone(),
        ..Progress::default()
    });
    Ok(outcome)
}

async fn by_url(
    shared: Arc<Shared>,
    req: UrlFetch,
    progress: watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    let shown = http::redacted(&req.url);
    // A digest names the content: the store or the swarm may have it already.
    if let Some(digest) = req.digest {
        let local = match digest {
            BlobRef::Blake3(id) => shared.store.get(&id),
            BlobRef::Sha256(d) => shared.store.find_sha256(&d),
        };
        let held = local.is_some_and(|b| b.is_complete());
        // Nobody in the fleet holds it: straight on to the URL (whose origin
        // download another peer may have started), without waiting for
        // providers that are not there.
        let in_fleet = !held
            && shared.control.is_some()
            && crate::fetch::discover(&shared, &digest)
                .await
                .map_or(true, |r| !r.providers.is_empty());
        if held || in_fleet {
            match crate::fetch::download(
                Arc::clone(&shared),
                digest,
                progress.clone(),
                RECORDED_BLOB_WAIT,
            )
            .await
            {
                Ok(outcome) => return Ok(outcome),
                Err(FetchError::NoProviders { .. } | FetchError::NoControlPlane(_)) => {}
                // A false alias in the fleet: the URL still names the content.
                Err(e @ FetchError::DigestMismatch { .. }) => {
                    tracing::warn!(error = %e, "the fleet's blob for the digest is another; asking the origin");
                }
                Err(
                    e @ (FetchError::Control(_)
                    | FetchError::ControlTimedOut
                    | FetchError::MalformedId { .. }),
                ) => {
                    tracing::debug!(error = %e, "digest not found through the control plane")
                }
                Err(e) => return Err(e),
            }
        }
    }
    let Some(control) = shared.control.clone() else {
        return from_origin(&shared, &req, &progress).await;
    };
    let key = req.key();
    let mut refresh = false;
    let mut waited = false;
    // What this peer got of the URL's origin download under way; kept when
    // the holder changes, and carried on from if the lease comes here.
    let mut mine: Option<Arc<Session>> = None;
    loop {
        if shared.shutdown.is_cancelled() {
            return Err(FetchError::Cancelled);
        }
        let ask = pb::ResolveUrlRequest {
            peer_id: shared.peer_id.clone(),
            url: key.clone(),
            refresh,
        };
        let answer = match tokio::time::timeout(control.deadline(), control.resolve_url(ask)).await
        {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                return Err(FetchError::Control(status));
            }
            failed => {
                let why = match failed {
                    Ok(Err(status)) => status.message().to_owned(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(url = %shown, error = %why, "control plane unreachable; fetching from the origin directly");
                let mut outcome = from_origin(&shared, &req, &progress).await?;
                outcome.notice = Some(format!(
                    "the control plane did not answer ({why}); fetched straight from the origin"
                ));
                return Ok(outcome);
            }
        };
        let recorded = match answer.blob.as_str() {
            "" => None,
            hex => Some(hex.parse::<BlobId>().map_err(|_| FetchError::MalformedId {
                answered: hex.to_owned(),
            })?),
        };
        if answer.fresh
            && let Some(id) = recorded
        {
            match from_swarm(&shared, &req, id, &progress).await {
                Ok(outcome) => return Ok(outcome),
                Err(FetchError::NoProviders { .. }) => {
                    tracing::info!(url = %shown, blob = %id.short(), "nobody holds the URL's recorded blob; asking the origin");
                    refresh = true;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        refresh = false;
        if answer.lease {
            let known = recorded.map(|id| (id, validators_from(answer.validators.clone())));
            let session = match mine.take() {
                Some(s) => s,
                None => new_session(&shared, &answer.session).await?,
            };
            let counters = Arc::new(Counters {
                session: Some(Arc::clone(&session)),
                ..Counters::default()
            });
            let _serving = Serving::start(&shared, &session);
            let renewing = renew_lease(&shared, &key, answer.lease_ttl_ms, &counters);
            let (outcome, validators) =
                lease_holder(&shared, &req, known, &session, &counters, &progress).await?;
            drop(renewing);
            record(&shared, &key, outcome.blob.id(), &validators).await;
            return Ok(outcome);
        }
        // Another peer is at the origin: fetch what it has as it arrives.
        if !waited {
            waited = true;
            tracing::info!(url = %shown, holder = %answer.holder, "another peer is fetching the URL from the origin; following it");
        }
        if !answer.holder_address.is_empty() && !answer.session.is_empty() {
            let session = match &mine {
                Some(s) => Arc::clone(s),
                None => {
                    let s = new_session(&shared, &answer.session).await?;
                    mine = Some(Arc::clone(&s));
                    s
                }
            };
            let holder = (answer.holder.as_str(), answer.holder_address.as_str());
            match follow(&shared, &session, holder, &progress).await {
                Followed::Complete(sources) => {
                    return finish(&shared, &req, &session, 0, sources, &progress).await;
                }
                Followed::Wait | Followed::Stalled => {}
                Followed::Lied(why) => {
                    tracing::warn!(peer = %answer.holder, %why, "the peer fetching from the origin sent bad data; reporting it and asking the origin directly");
                    report(&shared, &answer.holder, &why).await;
                    return from_origin(&shared, &req, &progress).await;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(WAIT_POLL) => {}
            () = shared.shutdown.cancelled() => return Err(FetchError::Cancelled),
        }
    }
}

fn validators_from(v: Option<pb::UrlValidators>) -> Validators {
    let v = v.unwrap_or_default();
    Validators {
        size: v.size,
        etag: v.etag,
        last_modified: v.last_modified,
    }
}

async fn new_session(shared: &Arc<Shared>, key: &str) -> Result<Arc<Session>, FetchError> {
    let store = Arc::clone(&shared.store);
    let scratch = tokio::task::spawn_blocking(move || store.scratch())
        .await
        .map_err(|_| FetchError::Cancelled)??;
    Ok(Session::new(key.to_owned(), scratch))
}

/// Offers a session to other peers while it lives, and for a while after
/// (followers finishing their last chunks).
struct Serving {
    shared: Arc<Shared>,
    session: Arc<Session>,
}

impl Serving {
    fn start(shared: &Arc<Shared>, session: &Arc<Session>) -> Self {
        session.serving.fetch_add(1, Ordering::AcqRel);
        shared
            .sessions
            .insert(session.key.clone(), Arc::clone(session));
        Self {
            shared: Arc::clone(shared),
            session: Arc::clone(session),
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let (shared, session) = (Arc::clone(&self.shared), Arc::clone(&self.session));
        self.shared.tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(SESSION_GRACE) => {}
                () = shared.shutdown.cancelled() => {}
            }
            // Unless it is offered again meanwhile (a follower taking the lease over).
            if session.serving.fetch_sub(1, Ordering::AcqRel) == 1 {
                shared.sessions.remove_if(&session.key, |_, s| {
                    Arc::ptr_eq(s, &session) && s.serving.load(Ordering::Acquire) == 0
                });
            }
        });
    }
}

/// How a follower's turn ended.
enum Followed {
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
async fn follow(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    holder: (&str, &str),
    progress: &watch::Sender<Progress>,
) -> Followed {
    let Ok(conn) = shared.connect(holder.1).await else {
        return Followed::Stalled;
    };
    let _serving = Serving::start(shared, session);
    progress.send_modify(|p| p.scratch = Some(Arc::clone(session)));
    let mut last_progress = Instant::now();
    // Every peer that sent something, by address; the holder first.
    let mut sent: Vec<(String, String, u64)> = vec![(holder.0.to_owned(), holder.1.to_owned(), 0)];
    let mut banned: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut round = 0usize;
    loop {
        if shared.shutdown.is_cancelled() {
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
            .filter(|(_, a)| !banned.contains(a) && *a != shared.address)
            .take(FOLLOW_PEERS)
        {
            let Ok(Ok(c)) = tokio::time::timeout(FOLLOW_POLL * 20, shared.connect(address)).await
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
                    fetch_batch(shared, &source.conn, session, batch, size, progress).await,
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
                    report(shared, &peer_id, &why).await;
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
    shared: &Arc<Shared>,
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
                    .unwrap_or(Err(session::Refused::Malformed));
                if let Err(why) = accepted {
                    shared.metrics.chunk_rejected();
                    break BatchEnd::Lied(format!("chunk {index}: {why:?}"));
                }
                shared
                    .metrics
                    .chunk_received(Source::Peer, len, started.elapsed());
                shared.downloaded_bytes.fetch_add(len, Ordering::Relaxed);
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

async fn report(shared: &Shared, peer_id: &str, why: &str) {
    let Some(control) = shared.control.clone() else {
        return;
    };
    let request = pb::ReportPeerRequest {
        reporter_id: shared.peer_id.clone(),
        peer_id: peer_id.to_owned(),
        blob: String::new(),
        reason: format!("origin download: {why}"),
    };
    if let Err(e) = control.report_peer(request).await {
        tracing::debug!(error = %e.message(), "report failed");
    }
}

/// While the holder makes progress, keeps its origin lease alive by asking
/// again; a holder whose origin has sent nothing for the origin timeout
/// stops renewing, so a waiting peer takes over.
fn renew_lease(
    shared: &Arc<Shared>,
    key: &str,
    ttl_ms: u64,
    counters: &Arc<Counters>,
) -> tokio_util::sync::DropGuard {
    let stop = tokio_util::sync::CancellationToken::new();
    let guard = stop.clone().drop_guard();
    let tasks = shared.tasks.clone();
    let shared = Arc::clone(shared);
    let counters = Arc::clone(counters);
    let key = key.to_owned();
    let every = Duration::from_millis((ttl_ms / 3).max(100));
    tasks.spawn(async move {
        let Some(control) = shared.control.clone() else {
            return;
        };
        let mut last = (0, Instant::now());
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let received = counters.received.load(Ordering::Relaxed);
            if received != last.0 {
                last = (received, Instant::now());
            } else if last.1.elapsed() > shared.config.origin_timeout {
                tracing::warn!("the origin has sent nothing for a while; letting the lease go");
                continue;
            }
            let ask = pb::ResolveUrlRequest {
                peer_id: shared.peer_id.clone(),
                url: key.clone(),
                refresh: true,
            };
            if let Err(e) = control.resolve_url(ask).await {
                tracing::debug!(error = %e.message(), "renewing the origin lease failed");
            }
        }
    });
    guard
}

/// Tells the control plane what the URL resolved to; a failure only costs
/// the next fetch of the URL an origin request.
async fn record(shared: &Shared, key: &str, blob: BlobId, v: &Validators) {
    let Some(control) = shared.control.clone() else {
        return;
    };
    let request = pb::RecordUrlRequest {
        peer_id: shared.peer_id.clone(),
        url: key.to_owned(),
        blob: blob.to_string(),
        validators: Some(pb::UrlValidators {
            size: v.size,
            etag: v.etag.clone(),
            last_modified: v.last_modified.clone(),
        }),
    };
    if let Err(e) = control.record_url(request).await {
        tracing::warn!(error = %e.message(), "cannot record the URL's blob with the control plane");
    }
}

/// The lease holder's work: revalidate a known blob, carry on from the
/// chunks already here, or download anew.
async fn lease_holder(
    shared: &Arc<Shared>,
    req: &UrlFetch,
    known: Option<(BlobId, Validators)>,
    session: &Arc<Session>,
    counters: &Arc<Counters>,
    progress: &watch::Sender<Progress>,
) -> Result<(FetchOutcome, Validators), FetchError> {
    let target = req.target();
    let ticker = publish_progress(Arc::clone(session), Arc::clone(counters), progress.clone());
    let _ticker = AbortOnDrop(ticker);
    let held = session.validators().filter(|_| session.bytes_held() > 0);
    let mut validators = None;
    if let Some(v) = held {
        tracing::info!(
            held = session.bytes_held(),
            "taking over the origin download; fetching only what the fleet lacks"
        );
        match shared
            .origin
            .resume(&target, &v, &session.missing(), session.file(), counters)
            .await
        {
            Ok(v) => validators = Some(v),
            Err(OriginError::Changed { .. }) => session.reset(),
            Err(e) => return Err(e.into()),
        }
    } else if let Some((id, v)) = known {
        match shared
            .origin
            .download(&target, Some(&v), session.file(), counters)
            .await?
        {
            http::Downloaded::NotModified => match from_swarm(shared, req, id, progress).await {
                Ok(outcome) => return Ok((outcome, v)),
                Err(FetchError::NoProviders { .. }) => {}
                Err(e) => return Err(e),
            },
            http::Downloaded::Complete(v) => validators = Some(v),
        }
    }
    let validators = match validators {
        Some(v) => v,
        None => match shared
            .origin
            .download(&target, None, session.file(), counters)
            .await?
        {
            http::Downloaded::Complete(v) => v,
            http::Downloaded::NotModified => return Err(not_modified(req)),
        },
    };
    let origin_bytes = counters.received.load(Ordering::Relaxed);
    shared.metrics.origin_received(origin_bytes);
    let outcome = finish(shared, req, session, origin_bytes, Vec::new(), progress).await?;
    Ok((outcome, validators))
}

fn not_modified(req: &UrlFetch) -> FetchError {
    FetchError::Origin(OriginError::Transport {
        url: http::redacted(&req.url),
        reason: "answered 304 Not Modified to an unconditional request".into(),
    })
}

/// Adds a whole download to the store and checks `--digest`; a mismatch
/// keeps nothing.
async fn finish(
    shared: &Arc<Shared>,
    req: &UrlFetch,
    session: &Arc<Session>,
    origin_bytes: u64,
    sources: Vec<SourceBytes>,
    progress: &watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    let (store, s) = (Arc::clone(&shared.store), Arc::clone(session));
    // Every chunk was hashed as it arrived: the store takes the file as it
    // is. A blob of one chunk is hashed whole (its id is that hash).
    let blob = tokio::task::spawn_blocking(move || match s.outboard() {
        Some(outboard) => store.adopt(s.scratch(), outboard),
        None => store.add_file(s.path()),
    })
    .await
    .map_err(|_| FetchError::Cancelled)??;
    if let Err(e) = check_digest(req, &blob).await {
        // Nothing is kept from content the user did not ask for.
        let _ = shared.store.remove(&blob.id());
        session.reset();
        return Err(e);
    }
    let size = blob.outboard().size();
    progress.send_replace(Progress {
        id: Some(blob.id()),
        bytes_done: size,
        total: size,
        ..Progress::default()
    });
    Ok(FetchOutcome {
        blob,
        resumed_bytes: 0,
        sources,
        origin_bytes,
        notice: None,
    })
}

/// A recorded blob, from the store or the swarm; checked against `--digest`.
async fn from_swarm(
    shared: &Arc<Shared>,
    req: &UrlFetch,
    id: BlobId,
    progress: &watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    let outcome = crate::fetch::download(
        Arc::clone(shared),
        BlobRef::Blake3(id),
        progress.clone(),
        RECORDED_BLOB_WAIT,
    )
    .await?;
    check_digest(req, &outcome.blob).await?;
    Ok(outcome)
}

/// A fetch from the origin straight away (no lease, no record, no sharing).
async fn from_origin(
    shared: &Arc<Shared>,
    req: &UrlFetch,
    progress: &watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    let session = new_session(shared, "").await?;
    // The session tracks whole chunks, for the registry mirror's stream.
    let counters = Arc::new(Counters {
        session: Some(Arc::clone(&session)),
        ..Counters::default()
    });
    let ticker = publish_progress(
        Arc::clone(&session),
        Arc::clone(&counters),
        progress.clone(),
    );
    let _ticker = AbortOnDrop(ticker);
    let target = req.target();
    match shared
        .origin
        .download(&target, None, session.file(), &counters)
        .await?
    {
        http::Downloaded::Complete(_) => {}
        http::Downloaded::NotModified => return Err(not_modified(req)),
    }
    let origin_bytes = counters.received.load(Ordering::Relaxed);
    shared.metrics.origin_received(origin_bytes);
    finish(shared, req, &session, origin_bytes, Vec::new(), progress).await
}

/// Checks a blob against the `--digest` the user gave, if any.
async fn check_digest(req: &UrlFetch, blob: &Arc<Blob>) -> Result<(), FetchError> {
    let Some(expected) = req.digest else {
        return Ok(());
    };
    let ok = match expected {
        BlobRef::Blake3(id) => blob.id() == id,
        BlobRef::Sha256(want) => {
            let blob = Arc::clone(blob);
            let got = match blob.sha256() {
                Some(d) => d,
                None => tokio::task::spawn_blocking(move || blob.compute_sha256())
                    .await
                    .map_err(|_| FetchError::Cancelled)??,
            };
            got == want
        }
    };
    if ok {
        return Ok(());
    }
    Err(FetchError::ContentMismatch {
        url: http::redacted(&req.url),
        expected,
        got: blob.id(),
    })
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes an origin download's progress until aborted.
fn publish_progress(
    session: Arc<Session>,
    counters: Arc<Counters>,
    progress: watch::Sender<Progress>,
) -> tokio::task::JoinHandle<()> {
    progress.send_modify(|p| p.scratch = Some(Arc::clone(&session)));
    tokio::spawn(async move {
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(PROGRESS_TICK).await;
            let done = counters
                .written
                .load(Ordering::Relaxed)
                .max(session.bytes_held());
            let secs = last.0.elapsed().as_secs_f64().max(1e-3);
            let rate = (done.saturating_sub(last.1) as f64 / secs) as u64;
            last = (Instant::now(), done);
            progress.send_modify(|p| {
                p.bytes_done = done;
                p.total = counters.total.load(Ordering::Relaxed);
                p.rate = rate;
                p.providers = 1;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_keep_credentials_out_of_the_key() {
        let r = UrlFetch::parse(
            "https://user:p%40ss@o.example/a?x=1#frag",
            &["Authorization: Bearer s3cret".into()],
            "sha256:".to_owned().as_str(),
        );
        assert!(matches!(r, Err(UrlFetchError::Digest(_))));
        let r = UrlFetch::parse(
            "https://user:p%40ss@o.example/a?x=1#frag",
            &["Authorization: Bearer s3cret".into()],
            "",
        )
        .unwrap();
        assert_eq!(r.key(), "https://o.example/a?x=1");
        let t = r.target();
        assert_eq!(t.basic, Some(("user".into(), Some("p@ss".into()))));
        assert_eq!(t.url.as_str(), "https://o.example/a?x=1");
        assert!(!format!("{r:?}").contains("s3cret"));
        assert!(!format!("{r:?}").contains("p%40ss"));
        let bad = UrlFetch::parse("https://o.example/a", &["Bearer s3cret".into()], "");
        let msg = bad.unwrap_err().to_string();
        assert!(!msg.contains("s3cret"), "{msg}");
        assert!(UrlFetch::parse("ftp://o.example/a", &[], "").is_err());
    }
}

/// Property tests (fuzzing): what `nebula fetch URL` is given.
/// `PROPTEST_CASES` sets the cases.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn fuzz_url_fetches_parse_or_refuse_without_echoing_secrets(
            url in prop_oneof![
                any::<String>(),
                "(http|https|ftp|file|)://(|u:p@|us%40er:pa%3Ass@)[a-z0-9.:\\[\\]]{0,20}(|/[a-z/]{0,10})(|\\?a=b)(|#frag)",
            ],
            header in prop_oneof!["[ -~]{0,30}", "[A-Za-z-]{1,10}: ?[ -~]{0,20}"],
            digest in prop_oneof!["[ -~]{0,10}", "(sha256|blake3|md5):[0-9a-f]{62,65}"],
        ) {
            match UrlFetch::parse(&url, std::slice::from_ref(&header), &digest) {
                Ok(fetch) => {
                    let key = fetch.key();
                    let parsed = Url::parse(&key).unwrap();
                    prop_assert!(parsed.username().is_empty() && parsed.password().is_none());
                    prop_assert!(parsed.fragment().is_none());
                    prop_assert!(matches!(parsed.scheme(), "http" | "https"));
                    let shown = format!("{fetch:?}");
                    prop_assert!(!shown.contains("pa%3Ass"), "{}", shown);
                }
                Err(e) => {
                    let msg = e.to_string();
                    // A header's value may be a token: only its name is shown.
                    if let Some((_, value)) = header.split_once(':')
                        && value.trim().len() > 3
                    {
                        prop_assert!(!msg.contains(value.trim()), "{}", msg);
                    }
                    prop_assert!(!msg.contains('\n'));
                }
            }
        }
    }
}
