//! Blobs: from the store when complete here, else one download for the
//! fleet (swarm first, the registry when nobody holds it), streamed to the
//! client while it arrives.
//!
//! The stream sends chunks in order as the download holds them: the store's
//! partial blob (chunks verified against the blob's tree) or the origin
//! download's scratch file. Neither is checked against the digest until the
//! download ends, so the last chunk of every answer waits for that check: a
//! download that fails, or whose bytes are not the digest's, aborts the
//! connection, and the client never sees a clean short or wrong body. The
//! chaining value of every chunk sent before that check is kept, and must be
//! the verified blob's: the download may move between sources midway (another
//! peer's origin download, the swarm), but the bytes sent are the blob's.

use std::{io, ops::RangeInclusive, sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use nebula_common::{Blob, BlobRef, Geometry, Outboard, Sha256Digest};
use tokio::sync::{mpsc, watch};
use url::Url;

use super::{
    DIGEST_HEADER, Mirror, MirrorResult, ask_upstream, bad_gateway, error, lock, upstream_failure,
};
use crate::{FetchError, Progress, UrlFetch, Wanted, origin::OriginError};

/// How often a stream waiting for its next chunk looks again (besides
/// being woken by progress).
const POLL: Duration = Duration::from_millis(100);
/// Chunks read ahead of the client.
const READ_AHEAD: usize = 4;

/// A download of one blob under way, shared by every client streaming it.
#[derive(Debug)]
pub(super) struct Inflight {
    progress: watch::Receiver<Progress>,
    /// `None` until the download ends.
    result: watch::Receiver<Option<Result<Arc<Blob>, Arc<FetchError>>>>,
}

/// `HEAD`: the size, from the store, a download under way, or the
/// registry; never starts a download.
pub(super) async fn head(
    m: &Mirror,
    base: &Url,
    name: &str,
    digest: Sha256Digest,
) -> (Response, MirrorResult) {
    let size = match local(m, digest).await {
        Some(b) => Some(b.outboard().size()),
        None => lock(&m.inflight)
            .get(blob_url(base, name, digest).as_str())
            .map(|f| f.progress.borrow().total)
            .filter(|&n| n > 0),
    };
    let size = match size {
        Some(s) => s,
        None => {
            let url = blob_url(base, name, digest);
            let head = reqwest::Method::HEAD;
            let resp =
                match ask_upstream(m, base, name, head, url, Default::default(), "BLOB_UNKNOWN")
                    .await
                {
                    Ok(r) => r,
                    Err(answer) => return answer,
                };
            // Read from the header: the body of an answer to HEAD is empty.
            let length = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            match length {
                Some(n) => n,
                None => return bad_gateway("the registry did not say the blob's size"),
            }
        }
    };
    let mut resp = Response::new(Body::empty());
    headers(resp.headers_mut(), digest, size);
    (resp, MirrorResult::Ok)
}

/// `GET`, whole or a range of it.
pub(super) async fn get(
    m: &Arc<Mirror>,
    base: &Url,
    name: &str,
    digest: Sha256Digest,
    request: &HeaderMap,
) -> (Response, MirrorResult) {
    let (inflight, size) = match local(m, digest).await {
        Some(b) => {
            let size = b.outboard().size();
            (Source::Complete(b), size)
        }
        None => {
            // Without a token the fleet may still hold the blob (and the
            // registry's refusal is then the download's answer).
            let auth = match m.upstream.authorization(base, name, true).await {
                Ok(a) => a,
                Err(why) => {
                    tracing::debug!(%why, "mirror: no token for the registry");
                    None
                }
            };
            let mut req_headers = reqwest::header::HeaderMap::new();
            if let Some(a) = auth {
                req_headers.insert(reqwest::header::AUTHORIZATION, a);
            }
            let req = UrlFetch {
                url: blob_url(base, name, digest),
                headers: req_headers,
                digest: Some(BlobRef::Sha256(digest)),
            };
            let inflight = start(m, digest, req);
            match size_of(&inflight).await {
                Ok(size) => (Source::Download(inflight), size),
                Err(e) => return failure(&e),
            }
        }
    };
    let range = match request.get(header::RANGE).map(|r| parse_range(r, size)) {
        None | Some(RangeAnswer::Whole) => None,
        Some(RangeAnswer::Part(r)) => Some(r),
        Some(RangeAnswer::Unsatisfiable) => {
            let mut resp = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UNKNOWN",
                "the range is outside the blob",
            );
            if let Ok(v) = HeaderValue::try_from(format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return (resp, MirrorResult::BadRequest);
        }
    };
    let wanted = range.clone().unwrap_or(0..=size.saturating_sub(1));
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    if size > 0 {
        m.tasks
            .spawn(feed(Arc::clone(m), inflight, size, wanted.clone(), tx));
    }
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = Response::new(body);
    headers(resp.headers_mut(), digest, size);
    if let Some(r) = range {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(r.end() - r.start() + 1),
        );
        if let Ok(v) = HeaderValue::try_from(format!("bytes {}-{}/{size}", r.start(), r.end())) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    (resp, MirrorResult::Ok)
}

fn headers(h: &mut HeaderMap, digest: Sha256Digest, size: u64) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::try_from(format!("sha256:{digest}")) {
        h.insert(DIGEST_HEADER, v);
    }
}

fn blob_url(base: &Url, name: &str, digest: Sha256Digest) -> Url {
    let mut url = base.clone();
    url.set_path(&format!("/v2/{name}/blobs/sha256:{digest}"));
    url.set_query(None);
    url
}

/// A complete blob of that digest in the store.
async fn local(m: &Mirror, digest: Sha256Digest) -> Option<Arc<Blob>> {
    let store = Arc::clone(&m.store);
    tokio::task::spawn_blocking(move || store.find_sha256(&digest))
        .await
        .ok()
        .flatten()
}

/// Joins the download of `req`'s blob under way, or starts it. It runs to its
/// end even when every client leaves: the blob is then in the store for
/// the next pull, here and across the fleet.
fn start(m: &Arc<Mirror>, digest: Sha256Digest, req: UrlFetch) -> Arc<Inflight> {
    let key = req.url.to_string();
    let mut map = lock(&m.inflight);
    if let Some(f) = map.get(&key) {
        return Arc::clone(f);
    }
    let (progress_tx, progress) = watch::channel(Progress::default());
    let (result_tx, result) = watch::channel(None);
    let inflight = Arc::new(Inflight { progress, result });
    map.insert(key.clone(), Arc::clone(&inflight));
    let tasks = m.tasks.clone();
    let m = Arc::clone(m);
    tasks.spawn(async move {
        let outcome = m
            .fetcher
            .run(Wanted::Url(Box::new(req)), progress_tx, None)
            .await;
        let result = match outcome {
            Ok(o) => {
                let peers: u64 = o.sources.iter().map(|s| s.bytes).sum();
                m.metrics.mirror_fetched(peers, o.origin_bytes);
                Ok(o.blob)
            }
            Err(e) => {
                tracing::warn!(digest = %format_args!("sha256:{digest}"), error = %e, "mirror: blob download failed");
                Err(Arc::new(e))
            }
        };
        result_tx.send_replace(Some(result));
        lock(&m.inflight).remove(&key);
    });
    inflight
}

/// Waits until the download knows the blob's size (or fails).
async fn size_of(inflight: &Inflight) -> Result<u64, Arc<FetchError>> {
    let (mut progress, mut result) = (inflight.progress.clone(), inflight.result.clone());
    loop {
        if let Some(r) = &*result.borrow_and_update() {
            return r.as_ref().map(|b| b.outboard().size()).map_err(Arc::clone);
        }
        let total = progress.borrow_and_update().total;
        if total > 0 {
            return Ok(total);
        }
        news(&mut progress, &mut result).await;
    }
}

/// Waits for news of a download: progress, its result, or a poll interval.
async fn news(
    progress: &mut watch::Receiver<Progress>,
    result: &mut watch::Receiver<Option<Result<Arc<Blob>, Arc<FetchError>>>>,
) {
    // Progress ends first (the download consumed its sender); then only
    // the result, which always follows, is news.
    if progress.has_changed().is_err() {
        let _ = tokio::time::timeout(POLL, result.changed()).await;
        return;
    }
    tokio::select! {
        _ = progress.changed() => {}
        _ = result.changed() => {}
        () = tokio::time::sleep(POLL) => {}
    }
}

/// A failed download as the client should see it.
fn failure(e: &FetchError) -> (Response, MirrorResult) {
    match e {
        FetchError::Origin(OriginError::Status { status, .. }) => {
            let code = status
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| reqwest::StatusCode::from_u16(c).ok())
                .unwrap_or(reqwest::StatusCode::BAD_GATEWAY);
            upstream_failure(code, "BLOB_UNKNOWN")
        }
        other => bad_gateway(&other.to_string()),
    }
}

/// Where an answer's bytes come from.
enum Source {
    /// A complete blob of the digest, verified.
    Complete(Arc<Blob>),
    Download(Arc<Inflight>),
}

/// Sends the bytes of `wanted` in order, each chunk as soon as it is held;
/// ends with an error (the connection aborts) when the download fails.
async fn feed(
    m: Arc<Mirror>,
    source: Source,
    size: u64,
    wanted: RangeInclusive<u64>,
    tx: mpsc::Sender<io::Result<Bytes>>,
) {
    let geometry = Geometry::new(size);
    let chunk = geometry.chunk_size();
    let (first, last) = (
        (*wanted.start() / chunk) as u32,
        (*wanted.end() / chunk) as u32,
    );
    let (mut complete, inflight) = match source {
        Source::Complete(b) => (Some(b), None),
        Source::Download(f) => (None, Some(f)),
    };
    let (mut progress, mut result) = match &inflight {
        Some(f) => (Some(f.progress.clone()), Some(f.result.clone())),
        None => (None, None),
    };
    let stall = (m.node.origin_timeout + m.node.no_provider_timeout) * 2;
    // The chaining value of each chunk sent from a download under way:
    // checked against the verified blob before the last chunk goes.
    let mut unchecked: Vec<(u32, [u8; 32])> = Vec::new();
    let mut sent = 0u64;
    for i in first..=last {
        let mut waited = tokio::time::Instant::now();
        let data = loop {
            if complete.is_none()
                && let Some(r) = result.as_ref().and_then(|r| r.borrow().clone())
            {
                match r {
                    Ok(b) if sent_match(&b, size, &unchecked) => complete = Some(b),
                    Ok(_) => {
                        return abort(&m, &tx, "the bytes sent are not the verified blob's").await;
                    }
                    Err(e) => return abort(&m, &tx, &format!("the download failed: {e}")).await,
                }
            }
            if let Some(b) = &complete {
                let b = Arc::clone(b);
                match tokio::task::spawn_blocking(move || b.read_verified_chunk(i)).await {
                    Ok(Ok(d)) => break d,
                    _ => return abort(&m, &tx, "reading the store failed").await,
                }
            }
            // The last chunk waits for the digest check.
            if i != last
                && let Some(f) = &inflight
                && let Some((cv, d)) = read_partial(&m, f, size, i).await
            {
                unchecked.push((i, cv));
                break d;
            }
            if waited.elapsed() > stall {
                return abort(&m, &tx, "the download made no progress").await;
            }
            let (Some(p), Some(r)) = (progress.as_mut(), result.as_mut()) else {
                return abort(&m, &tx, "nothing to read from").await;
            };
            let before = p.borrow().bytes_done;
            news(p, r).await;
            if p.borrow().bytes_done != before {
                waited = tokio::time::Instant::now();
            }
        };
        let start = geometry.chunk_range(i).start;
        let lo = wanted.start().saturating_sub(start) as usize;
        let hi = ((wanted.end() + 1).min(start + data.len() as u64) - start) as usize;
        if lo > hi {
            return abort(&m, &tx, "a chunk shorter than the blob's geometry").await;
        }
        let piece = data.slice(lo..hi);
        sent += piece.len() as u64;
        if tx.send(Ok(piece)).await.is_err() {
            // The client left.
            break;
        }
    }
    m.metrics.mirror_served(sent);
}

/// Whether `blob` is the blob whose chunks were sent: its size, and the
/// chaining value of each chunk sent. The download may have moved between
/// sources (another peer's origin download, the swarm) midway; what counts
/// is that every byte sent is the verified blob's.
fn sent_match(blob: &Blob, size: u64, sent: &[(u32, [u8; 32])]) -> bool {
    if blob.outboard().size() != size {
        return false;
    }
    if sent.is_empty() {
        return true;
    }
    let cvs = blob.outboard().chaining_values();
    sent.iter().all(|(i, cv)| {
        let at = *i as usize * 32;
        cvs.get(at..at + 32) == Some(&cv[..])
    })
}

/// Chunk `i` from the download under way, with its chaining value, if it
/// holds it (and the blob it holds has the size the answer promised).
async fn read_partial(m: &Mirror, f: &Inflight, size: u64, i: u32) -> Option<([u8; 32], Bytes)> {
    let (scratch, id) = {
        let p = f.progress.borrow();
        (p.scratch.clone(), p.id)
    };
    if let Some(s) = scratch
        && s.validators().is_some_and(|v| v.size == size)
        && s.has(i)
    {
        return tokio::task::spawn_blocking(move || {
            let d = s.read_chunk(i)?;
            Some((
                Outboard::chunk_chaining_value(&Geometry::new(size), i, &d),
                d,
            ))
        })
        .await
        .ok()
        .flatten();
    }
    // A complete blob here is being checked against the digest: wait for it.
    let b = m
        .store
        .get(&id?)
        .filter(|b| !b.is_complete() && b.outboard().size() == size && b.has_chunk(i))?;
    tokio::task::spawn_blocking(move || {
        let d = b.read_verified_chunk(i).ok()?;
        Some((Outboard::chunk_chaining_value(b.geometry(), i, &d), d))
    })
    .await
    .ok()
    .flatten()
}

/// Ends the body with an error: the server aborts the connection.
async fn abort(m: &Mirror, tx: &mpsc::Sender<io::Result<Bytes>>, why: &str) {
    tracing::warn!(%why, "mirror: aborting a blob answer");
    m.metrics.mirror_aborted();
    let _ = tx.send(Err(io::Error::other(why.to_owned()))).await;
}

/// A `Range` header, against a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum RangeAnswer {
    /// Not one byte range we answer: the whole blob is sent (RFC 7233
    /// lets a server ignore it).
    Whole,
    Part(RangeInclusive<u64>),
    Unsatisfiable,
}

fn parse_range(value: &HeaderValue, size: u64) -> RangeAnswer {
    let Some(spec) = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return RangeAnswer::Whole;
    };
    if spec.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.parse::<u64>(), b.parse::<u64>()) {
        // bytes=-N: the last N bytes.
        (Err(_), Ok(n)) if a.is_empty() => {
            if n == 0 || size == 0 {
                return RangeAnswer::Unsatisfiable;
            }
            size.saturating_sub(n)..=size - 1
        }
        (Ok(s), Err(_)) if b.is_empty() => s..=size.saturating_sub(1),
        (Ok(s), Ok(e)) if e >= s => s..=e.min(size.saturating_sub(1)),
        _ => return RangeAnswer::Whole,
    };
    if *range.start() >= size {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Part(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_7233() {
        let r = |s: &str, size| parse_range(&HeaderValue::from_str(s).unwrap(), size);
        assert_eq!(r("bytes=0-", 10), RangeAnswer::Part(0..=9));
        assert_eq!(r("bytes=3-5", 10), RangeAnswer::Part(3..=5));
        assert_eq!(r("bytes=3-50", 10), RangeAnswer::Part(3..=9));
        assert_eq!(r("bytes=-4", 10), RangeAnswer::Part(6..=9));
        assert_eq!(r("bytes=-40", 10), RangeAnswer::Part(0..=9));
        assert_eq!(r("bytes=10-", 10), RangeAnswer::Unsatisfiable);
        assert_eq!(r("bytes=0-", 0), RangeAnswer::Unsatisfiable);
        assert_eq!(r("bytes=5-3", 10), RangeAnswer::Whole);
        assert_eq!(r("bytes=0-1,4-5", 10), RangeAnswer::Whole);
        assert_eq!(r("items=0-1", 10), RangeAnswer::Whole);
    }
}

/// Property tests (issue 10, fuzzing): any `Range` header against any size.
/// `PROPTEST_CASES` sets the cases.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn fuzz_range_headers_answer_inside_the_blob(
            value in prop_oneof![
                "[ -~]{0,40}",
                "(bytes|items)=[ ]?[0-9]{0,21}[ ]?-[ ]?[0-9]{0,21}(|,0-1)",
            ],
            size in prop_oneof![0u64..100, any::<u64>()],
        ) {
            // Header values are visible ASCII; anything else never gets here.
            let Ok(value) = HeaderValue::from_str(&value) else { return Ok(()) };
            match parse_range(&value, size) {
                RangeAnswer::Whole | RangeAnswer::Unsatisfiable => {}
                RangeAnswer::Part(r) => {
                    prop_assert!(r.start() <= r.end() && *r.end() < size, "{:?} of {}", r, size);
                }
            }
        }
    }
}
