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

mod follow;
pub(crate) mod http;
mod lease;
mod request;

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use nebula_common::{Blob, BlobId, BlobRef};
use nebula_proto::v1 as pb;
use tokio::{sync::watch, time::Instant};

use crate::fetch::{Downloads, FetchError, FetchOutcome, Progress, SourceBytes};
use crate::sessions::{Session, Sessions};
use follow::{Followed, follow};
pub(crate) use http::{Counters, OriginClient, Target, Validators};
pub use http::{OriginClientError, OriginError};
use lease::{record, renew_lease, report};
pub use request::{UrlFetch, UrlFetchError};

/// How often a peer waiting for another's origin download asks again.
const WAIT_POLL: Duration = Duration::from_millis(250);
/// A swarm fetch of a recorded blob gives up this soon when nobody holds it,
/// and the origin is asked instead.
const RECORDED_BLOB_WAIT: Duration = Duration::from_secs(3);
/// How often progress is published during an origin download.
const PROGRESS_TICK: Duration = Duration::from_millis(100);
/// A finished download stays available to followers this long.
const SESSION_GRACE: Duration = Duration::from_secs(30);

/// Fetches by URL: the origin's HTTP client and the origin downloads this
/// peer offers to others, on top of the swarm downloads.
#[derive(Debug)]
pub(crate) struct Origins {
    /// Swarm downloads of recorded blobs, the store, the control plane.
    downloads: Arc<Downloads>,
    /// The HTTP client of origin downloads.
    client: OriginClient,
    /// Origin downloads under way, offered to other peers.
    sessions: Sessions,
    /// The address other peers dial: a follower never follows itself.
    address: String,
}

impl Origins {
    pub(crate) fn new(
        downloads: Arc<Downloads>,
        client: OriginClient,
        sessions: Sessions,
        address: String,
    ) -> Self {
        Self {
            downloads,
            client,
            sessions,
            address,
        }
    }

    /// Fetches `req` into the store: from the swarm when the fleet already
    /// has the URL's content, else from the origin once for the whole fleet.
    /// In a `fetch` span naming the URL (without credentials or query values).
    pub(crate) async fn fetch_url(
        self: Arc<Self>,
        req: UrlFetch,
        progress: watch::Sender<Progress>,
    ) -> Result<FetchOutcome, FetchError> {
        fetch_url(self, req, progress).await
    }
}

/// See [`Origins::fetch_url`].
async fn fetch_url(
    origins: Arc<Origins>,
    req: UrlFetch,
    progress: watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    let span = tracing::info_span!("fetch", url = %http::redacted(&req.url));
    let metrics = Arc::clone(origins.downloads.metrics());
    let outcome =
        crate::fetch::observed(&metrics, span, by_url(origins, req, progress.clone())).await?;
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
    origins: Arc<Origins>,
    req: UrlFetch,
    progress: watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    let shown = http::redacted(&req.url);
    // A digest names the content: the store or the swarm may have it already.
    if let Some(digest) = req.digest {
        let local = match digest {
            BlobRef::Blake3(id) => origins.downloads.store().get(&id),
            BlobRef::Sha256(d) => origins.downloads.store().find_sha256(&d),
        };
        let held = local.is_some_and(|b| b.is_complete());
        // Nobody in the fleet holds it: straight on to the URL (whose origin
        // download another peer may have started), without waiting for
        // providers that are not there.
        let in_fleet = !held
            && origins.downloads.control().is_some()
            && crate::fetch::discover(&origins.downloads, &digest)
                .await
                .map_or(true, |r| !r.providers.is_empty());
        if held || in_fleet {
            match crate::fetch::download(
                Arc::clone(&origins.downloads),
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
    let Some(control) = origins.downloads.control().clone() else {
        return from_origin(&origins, &req, &progress).await;
    };
    let key = req.key();
    let mut refresh = false;
    let mut waited = false;
    // What this peer got of the URL's origin download under way; kept when
    // the holder changes, and carried on from if the lease comes here.
    let mut mine: Option<Arc<Session>> = None;
    loop {
        if origins.downloads.shutdown().is_cancelled() {
            return Err(FetchError::Cancelled);
        }
        let ask = pb::ResolveUrlRequest {
            peer_id: origins.downloads.peer_id().to_owned(),
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
                let mut outcome = from_origin(&origins, &req, &progress).await?;
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
            match from_swarm(&origins, &req, id, &progress).await {
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
                None => new_session(&origins, &answer.session).await?,
            };
            let counters = Arc::new(Counters {
                session: Some(Arc::clone(&session)),
                ..Counters::default()
            });
            let _offered = Offered::start(&origins, &session);
            let renewing = renew_lease(&origins, &key, answer.lease_ttl_ms, &counters);
            let (outcome, validators) =
                lease_holder(&origins, &req, known, &session, &counters, &progress).await?;
            drop(renewing);
            record(&origins, &key, outcome.blob.id(), &validators).await;
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
                    let s = new_session(&origins, &answer.session).await?;
                    mine = Some(Arc::clone(&s));
                    s
                }
            };
            let holder = (answer.holder.as_str(), answer.holder_address.as_str());
            match follow(&origins, &session, holder, &progress).await {
                Followed::Complete(sources) => {
                    return finish(&origins, &req, &session, 0, sources, &progress).await;
                }
                Followed::Wait | Followed::Stalled => {}
                Followed::Lied(why) => {
                    tracing::warn!(peer = %answer.holder, %why, "the peer fetching from the origin sent bad data; reporting it and asking the origin directly");
                    report(&origins, &answer.holder, &why).await;
                    return from_origin(&origins, &req, &progress).await;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(WAIT_POLL) => {}
            () = origins.downloads.shutdown().cancelled() => return Err(FetchError::Cancelled),
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

async fn new_session(origins: &Arc<Origins>, key: &str) -> Result<Arc<Session>, FetchError> {
    let store = Arc::clone(origins.downloads.store());
    let scratch = tokio::task::spawn_blocking(move || store.scratch())
        .await
        .map_err(|_| FetchError::Cancelled)??;
    Ok(Session::new(key.to_owned(), scratch))
}

/// Offers a session to other peers while it lives, and for a while after
/// (followers finishing their last chunks).
pub(super) struct Offered {
    origins: Arc<Origins>,
    session: Arc<Session>,
}

impl Offered {
    pub(super) fn start(origins: &Arc<Origins>, session: &Arc<Session>) -> Self {
        session.serving.fetch_add(1, Ordering::AcqRel);
        origins.sessions.offer(session);
        Self {
            origins: Arc::clone(origins),
            session: Arc::clone(session),
        }
    }
}

impl Drop for Offered {
    fn drop(&mut self) {
        let (origins, session) = (Arc::clone(&self.origins), Arc::clone(&self.session));
        self.origins.downloads.tasks().spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(SESSION_GRACE) => {}
                () = origins.downloads.shutdown().cancelled() => {}
            }
            // Unless it is offered again meanwhile (a follower taking the lease over).
            if session.serving.fetch_sub(1, Ordering::AcqRel) == 1 {
                origins.sessions.withdraw(&session);
            }
        });
    }
}

/// The lease holder's work: revalidate a known blob, carry on from the
/// chunks already here, or download anew.
async fn lease_holder(
    origins: &Arc<Origins>,
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
        match origins
            .client
            .resume(&target, &v, &session.missing(), session.file(), counters)
            .await
        {
            Ok(v) => validators = Some(v),
            Err(OriginError::Changed { .. }) => session.reset(),
            Err(e) => return Err(e.into()),
        }
    } else if let Some((id, v)) = known {
        match origins
            .client
            .download(&target, Some(&v), session.file(), counters)
            .await?
        {
            http::Downloaded::NotModified => match from_swarm(origins, req, id, progress).await {
                Ok(outcome) => return Ok((outcome, v)),
                Err(FetchError::NoProviders { .. }) => {}
                Err(e) => return Err(e),
            },
            http::Downloaded::Complete(v) => validators = Some(v),
        }
    }
    let validators = match validators {
        Some(v) => v,
        None => match origins
            .client
            .download(&target, None, session.file(), counters)
            .await?
        {
            http::Downloaded::Complete(v) => v,
            http::Downloaded::NotModified => return Err(not_modified(req)),
        },
    };
    let origin_bytes = counters.received.load(Ordering::Relaxed);
    origins.downloads.metrics().origin_received(origin_bytes);
    let outcome = finish(origins, req, session, origin_bytes, Vec::new(), progress).await?;
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
    origins: &Arc<Origins>,
    req: &UrlFetch,
    session: &Arc<Session>,
    origin_bytes: u64,
    sources: Vec<SourceBytes>,
    progress: &watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    let (store, s) = (Arc::clone(origins.downloads.store()), Arc::clone(session));
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
        let _ = origins.downloads.store().remove(&blob.id());
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
    origins: &Arc<Origins>,
    req: &UrlFetch,
    id: BlobId,
    progress: &watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    let outcome = crate::fetch::download(
        Arc::clone(&origins.downloads),
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
    origins: &Arc<Origins>,
    req: &UrlFetch,
    progress: &watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    let session = new_session(origins, "").await?;
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
    match origins
        .client
        .download(&target, None, session.file(), &counters)
        .await?
    {
        http::Downloaded::Complete(_) => {}
        http::Downloaded::NotModified => return Err(not_modified(req)),
    }
    let origin_bytes = counters.received.load(Ordering::Relaxed);
    origins.downloads.metrics().origin_received(origin_bytes);
    finish(origins, req, &session, origin_bytes, Vec::new(), progress).await
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
mod tests;
