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

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use nebula_common::{Blob, BlobId, BlobRef};
use nebula_proto::v1 as pb;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::{sync::watch, time::Instant};
use url::Url;

use crate::{
    fetch::{FetchError, FetchOutcome, Progress},
    node::Shared,
};
pub(crate) use http::{Counters, OriginClient, Target, Validators};
pub use http::{OriginClientError, OriginError};

/// How often a peer waiting for another's origin download asks again.
const WAIT_POLL: Duration = Duration::from_millis(250);
/// A swarm fetch of a recorded blob gives up this soon when nobody holds it,
/// and the origin is asked instead.
const RECORDED_BLOB_WAIT: Duration = Duration::from_secs(3);
/// How often progress is published during an origin download.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

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
            Url::parse(url.trim()).map_err(|e| UrlFetchError::Url(format!("{url:?}: {e}")))?;
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

fn decode(s: &str) -> String {
    let bytes: Vec<u8> = url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned().into_bytes())
        .unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
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
        if local.is_some_and(|b| b.is_complete()) || shared.control.is_some() {
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
                Err(e @ FetchError::Control(_)) => {
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
                return Err(FetchError::Control(status.message().to_owned()));
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
            hex => Some(hex.parse::<BlobId>().map_err(|_| {
                FetchError::Control(format!(
                    "the control plane recorded a malformed blob id for {shown}"
                ))
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
        if answer.lease {
            let known = recorded.map(|id| {
                let v = answer.validators.clone().unwrap_or_default();
                (
                    id,
                    Validators {
                        size: v.size,
                        etag: v.etag,
                        last_modified: v.last_modified,
                    },
                )
            });
            let renewing = renew_lease(&shared, &key, answer.lease_ttl_ms);
            let result = lease_holder(&shared, &req, known, &progress).await;
            drop(renewing);
            let (outcome, validators) = result?;
            record(&shared, &key, outcome.blob.id(), &validators).await;
            return Ok(outcome);
        }
        // Another peer is at the origin: wait for its record.
        if !std::mem::replace(&mut waited, true) {
            tracing::info!(url = %shown, holder = %answer.holder, "another peer is fetching the URL from the origin; waiting for it");
        }
        let p = Progress {
            providers: 1,
            ..progress.borrow().clone()
        };
        progress.send_replace(p);
        refresh = false;
        tokio::select! {
            () = tokio::time::sleep(WAIT_POLL) => {}
            () = shared.shutdown.cancelled() => return Err(FetchError::Cancelled),
        }
    }
}

/// While the holder downloads, keeps its origin lease alive by asking again.
fn renew_lease(shared: &Arc<Shared>, key: &str, ttl_ms: u64) -> tokio_util::sync::DropGuard {
    let stop = tokio_util::sync::CancellationToken::new();
    let guard = stop.clone().drop_guard();
    let shared = Arc::clone(shared);
    let key = key.to_owned();
    let every = Duration::from_millis((ttl_ms / 3).max(100));
    tokio::spawn(async move {
        let Some(control) = shared.control.clone() else {
            return;
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
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

/// The lease holder's work: revalidate a known blob, or download anew.
async fn lease_holder(
    shared: &Arc<Shared>,
    req: &UrlFetch,
    known: Option<(BlobId, Validators)>,
    progress: &watch::Sender<Progress>,
) -> Result<(FetchOutcome, Validators), FetchError> {
    if let Some((id, validators)) = known {
        match from_origin_checked(shared, req, Some(&validators), progress).await? {
            Fetched::NotModified => match from_swarm(shared, req, id, progress).await {
                Ok(outcome) => return Ok((outcome, validators)),
                Err(FetchError::NoProviders { .. }) => {}
                Err(e) => return Err(e),
            },
            Fetched::Blob(outcome, v) => return Ok((outcome, v)),
        }
    }
    let (outcome, v) = from_origin_unconditional(shared, req, progress).await?;
    Ok((outcome, v))
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

/// A fetch from the origin straight away (no lease, no record).
async fn from_origin(
    shared: &Arc<Shared>,
    req: &UrlFetch,
    progress: &watch::Sender<Progress>,
) -> Result<FetchOutcome, FetchError> {
    Ok(from_origin_unconditional(shared, req, progress).await?.0)
}

async fn from_origin_unconditional(
    shared: &Arc<Shared>,
    req: &UrlFetch,
    progress: &watch::Sender<Progress>,
) -> Result<(FetchOutcome, Validators), FetchError> {
    match from_origin_checked(shared, req, None, progress).await? {
        Fetched::Blob(outcome, v) => Ok((outcome, v)),
        // The client answers NotModified only to a conditional request.
        Fetched::NotModified => Err(FetchError::Origin(OriginError::Transport {
            url: http::redacted(&req.url),
            reason: "answered 304 Not Modified to an unconditional request".into(),
        })),
    }
}

enum Fetched {
    NotModified,
    Blob(FetchOutcome, Validators),
}

/// Downloads from the origin into a scratch file, adds it to the store
/// (which hashes it) and checks `--digest`; a mismatch keeps nothing.
async fn from_origin_checked(
    shared: &Arc<Shared>,
    req: &UrlFetch,
    known: Option<&Validators>,
    progress: &watch::Sender<Progress>,
) -> Result<Fetched, FetchError> {
    let store = Arc::clone(&shared.store);
    let scratch = tokio::task::spawn_blocking(move || store.scratch())
        .await
        .map_err(|_| FetchError::Cancelled)??;
    let counters = Arc::new(Counters::default());
    let ticker = publish_progress(Arc::clone(&counters), progress.clone());
    let target = req.target();
    let downloaded = tokio::select! {
        r = shared.origin.download(&target, known, scratch.file(), &counters) => r,
        () = shared.shutdown.cancelled() => return Err(FetchError::Cancelled),
    };
    ticker.abort();
    let origin_bytes = counters.received.load(Ordering::Relaxed);
    shared.metrics.origin_received(origin_bytes);
    let validators = match downloaded? {
        http::Downloaded::NotModified => return Ok(Fetched::NotModified),
        http::Downloaded::Complete(v) => v,
    };
    let store = Arc::clone(&shared.store);
    let blob = tokio::task::spawn_blocking(move || {
        let blob = store.add_file(scratch.path());
        drop(scratch);
        blob
    })
    .await
    .map_err(|_| FetchError::Cancelled)??;
    if let Err(e) = check_digest(req, &blob).await {
        // Nothing is kept from content the user did not ask for.
        let _ = shared.store.remove(&blob.id());
        return Err(e);
    }
    let size = blob.outboard().size();
    progress.send_replace(Progress {
        id: Some(blob.id()),
        bytes_done: size,
        total: size,
        ..Progress::default()
    });
    Ok(Fetched::Blob(
        FetchOutcome {
            blob,
            resumed_bytes: 0,
            sources: Vec::new(),
            origin_bytes,
            notice: None,
        },
        validators,
    ))
}

/// Checks a blob against the `--digest` the user gave, if any.
async fn check_digest(req: &UrlFetch, blob: &Arc<Blob>) -> Result<(), FetchError> {
    let ok = match req.digest {
        None => true,
        Some(BlobRef::Blake3(id)) => blob.id() == id,
        Some(BlobRef::Sha256(want)) => {
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
        expected: req.digest.map(|d| d.to_string()).unwrap_or_default(),
        got: blob.id(),
    })
}

/// Publishes the download's progress until aborted.
fn publish_progress(
    counters: Arc<Counters>,
    progress: watch::Sender<Progress>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(PROGRESS_TICK).await;
            let done = counters.written.load(Ordering::Relaxed);
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
