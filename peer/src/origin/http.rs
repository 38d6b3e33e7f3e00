//! One download from an HTTP origin into a scratch file.
//!
//! The first request asks for the first piece with `Range`. An origin that
//! answers `206` supports ranges: the rest is fetched in pieces by
//! `connections` requests at once, each piece resumed from where it broke
//! when a connection drops. An origin that answers `200` sends the whole body
//! on that one connection. Every `206` must carry the validators of the first
//! (`ETag`, `Last-Modified`, total size): if the content changed between two
//! ranges, the download starts over once and never mixes versions.
//!
//! Redirects are followed here (at most [`MAX_REDIRECTS`]) rather than by the
//! client, so that the caller's headers and URL credentials go to the origin
//! the caller named and never to another host.

use std::{
    fs::File,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use reqwest::{
    StatusCode,
    header::{self, HeaderMap, HeaderValue},
};
use url::Url;

pub use crate::origin_error::OriginError;
use crate::sessions::Session;
pub(crate) use crate::sessions::{MAX_SIZE, Validators};
use body::{Piece, stream_into};

mod body;
#[cfg(test)]
mod tests;

/// Redirects followed before giving up.
pub(crate) const MAX_REDIRECTS: usize = 10;
/// Attempts at one piece (the first plus resumes) before the download fails.
const PIECE_ATTEMPTS: u32 = 5;
/// Buffered before one positioned write.
const WRITE_BUFFER: usize = 1 << 20;

/// How a download ended.
#[derive(Debug)]
pub(crate) enum Downloaded {
    /// A conditional request found the content unchanged; nothing was written.
    NotModified,
    /// The file holds the content these validators name.
    Complete(Validators),
}

/// A URL for display: scheme, host, port and path; query values hidden
/// (signed URLs carry their credentials there); never userinfo.
pub(crate) fn redacted(url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    if url.query().is_some() {
        shown.push_str("?…");
    }
    shown
}

/// Where a request goes, with what it may carry there.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The URL the user gave, without userinfo.
    pub(crate) url: Url,
    /// The user's headers; sent only to `url`'s own scheme, host and port.
    pub(crate) headers: HeaderMap,
    /// Userinfo from the URL the user gave, as basic credentials.
    pub(crate) basic: Option<(String, Option<String>)>,
}

impl Target {
    fn same_origin(&self, other: &Url) -> bool {
        self.url.origin() == other.origin()
    }
}

/// Byte counters a download feeds as it goes.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Body bytes received from the origin (including any that were redone).
    pub(crate) received: AtomicU64,
    /// Bytes written to the file at their final place.
    pub(crate) written: AtomicU64,
    /// The total size, once the origin said it.
    pub(crate) total: AtomicU64,
    /// Shares the download with other peers as it arrives.
    pub(crate) session: Option<Arc<Session>>,
    /// Bumped when a download starts over: writes of the abandoned attempt
    /// still on their way to the file (already handed to a blocking thread)
    /// find it changed and are dropped, under its read lock.
    pub(crate) epoch: Arc<std::sync::RwLock<u64>>,
}

/// The HTTP client of origin downloads.
#[derive(Debug, Clone)]
pub(crate) struct OriginClient {
    client: reqwest::Client,
    connections: usize,
    piece: u64,
    /// Attempts at one piece before giving up.
    attempts: u32,
}

/// Why the origin client cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("origin client: {0}")]
pub struct OriginClientError(String);

/// The HTTP client set-up every outbound request shares (origins and
/// registries): `timeout` for connecting and for each read, no proxy, and
/// `extra_ca` (PEM, `--origin-ca`) trusted beside the system's roots. The
/// caller picks the redirect policy.
pub(crate) fn client_builder(
    timeout: Duration,
    extra_ca: Option<&[u8]>,
) -> Result<reqwest::ClientBuilder, OriginClientError> {
    // One crypto provider in the whole tree; installing it twice is harmless.
    nebula_proto::tls::install_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .no_proxy()
        .user_agent(concat!("nebula/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = extra_ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| OriginClientError(format!("--origin-ca: {e}")))?;
        if certs.is_empty() {
            return Err(OriginClientError(
                "--origin-ca: no certificate in the file".into(),
            ));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

impl OriginClient {
    /// A client with `connections` range requests at once per download,
    /// `timeout` for connecting and for each read, and `extra_ca` (PEM)
    /// trusted beside the system's roots.
    pub(crate) fn new(
        connections: usize,
        timeout: Duration,
        extra_ca: Option<&[u8]>,
    ) -> Result<Self, OriginClientError> {
        let builder =
            client_builder(timeout, extra_ca)?.redirect(reqwest::redirect::Policy::none());
        let client = builder
            .build()
            .map_err(|e| OriginClientError(describe(&e)))?;
        Ok(Self {
            client,
            connections: connections.max(1),
            piece: 8 << 20,
            attempts: PIECE_ATTEMPTS,
        })
    }

    /// Downloads `target` into `file`. With `known`, the request is
    /// conditional and may end [`Downloaded::NotModified`]. Content that
    /// changes midway starts the download over once.
    pub(crate) async fn download(
        &self,
        target: &Target,
        known: Option<&Validators>,
        file: &Arc<File>,
        counters: &Counters,
    ) -> Result<Downloaded, OriginError> {
        match self.attempt(target, known, file, counters).await {
            Err(OriginError::Changed { .. }) => {
                tracing::info!(url = %redacted(&target.url), "origin content changed midway; starting over");
                *counters.epoch.write().unwrap_or_else(|e| e.into_inner()) += 1;
                counters.written.store(0, Ordering::Relaxed);
                if let Some(s) = &counters.session {
                    s.reset();
                }
                self.attempt(target, known, file, counters).await
            }
            other => other,
        }
    }

    /// Fetches only `ranges` (inclusive byte ranges) of the version `v`, into
    /// a file that holds the rest: a download carried on from chunks other
    /// peers already had. Content that changed meanwhile is
    /// [`OriginError::Changed`]; the caller then starts over.
    pub(crate) async fn resume(
        &self,
        target: &Target,
        v: &Validators,
        ranges: &[(u64, u64)],
        file: &Arc<File>,
        counters: &Counters,
    ) -> Result<Validators, OriginError> {
        if v.size > MAX_SIZE {
            return Err(too_large(&redacted(&target.url), v.size));
        }
        counters.total.store(v.size, Ordering::Relaxed);
        file_len(file, v.size)?;
        let mut pieces = Vec::new();
        for &(start, end) in ranges {
            let mut at = start;
            while at <= end {
                let stop = (at + self.piece - 1).min(end);
                pieces.push((at, stop));
                at = stop + 1;
            }
        }
        let piece = Piece {
            client: self,
            target,
            url: &target.url,
            validators: v,
            file,
            counters,
        };
        piece.run_all(pieces, self.connections).await?;
        Ok(v.clone())
    }

    async fn attempt(
        &self,
        target: &Target,
        known: Option<&Validators>,
        file: &Arc<File>,
        counters: &Counters,
    ) -> Result<Downloaded, OriginError> {
        let first_end = self.piece - 1;
        let (url, resp) = self
            .get(target, &target.url, Some((0, Some(first_end))), known)
            .await?;
        let shown = redacted(&url);
        match resp.status() {
            StatusCode::NOT_MODIFIED if known.is_some() => Ok(Downloaded::NotModified),
            StatusCode::OK => {
                let validators = Validators {
                    size: resp.content_length().unwrap_or(0),
                    ..validators_of(resp.headers())
                };
                let end = resp.content_length();
                if let Some(n) = end.filter(|&n| n > MAX_SIZE) {
                    return Err(too_large(&shown, n));
                }
                counters.total.store(end.unwrap_or(0), Ordering::Relaxed);
                if let (Some(s), Some(_)) = (&counters.session, end) {
                    s.begin(&validators);
                }
                let written = stream_into(resp, file, 0, end, counters)
                    .await
                    .map_err(|(_, e)| e.at(&shown))?;
                let validators = Validators {
                    size: written,
                    ..validators
                };
                file_len(file, written)?;
                Ok(Downloaded::Complete(validators))
            }
            StatusCode::PARTIAL_CONTENT => {
                let Some((start, _, total)) = content_range(resp.headers()) else {
                    return Err(OriginError::Transport {
                        url: shown,
                        reason: "a 206 answer without a valid Content-Range".into(),
                    });
                };
                if start != 0 {
                    return Err(OriginError::Transport {
                        url: shown,
                        reason: format!("asked for bytes from 0, got them from {start}"),
                    });
                }
                if total > MAX_SIZE {
                    return Err(too_large(&shown, total));
                }
                let validators = Validators {
                    size: total,
                    ..validators_of(resp.headers())
                };
                counters.total.store(total, Ordering::Relaxed);
                file_len(file, total)?;
                if let Some(s) = &counters.session {
                    s.begin(&validators);
                }
                let first = (0, first_end.min(total.saturating_sub(1)));
                let piece = Piece {
                    client: self,
                    target,
                    url: &url,
                    validators: &validators,
                    file,
                    counters,
                };
                // Without a strong validator a change between two ranges
                // would go unseen: the rest comes in one range.
                let strong = (!validators.etag.is_empty() && !validators.etag.starts_with("W/"))
                    || !validators.last_modified.is_empty();
                let (piece_len, connections) = if strong {
                    (self.piece, self.connections)
                } else {
                    (total, 1)
                };
                let mut pieces = Vec::new();
                let mut start = first.1 + 1;
                while start < total {
                    let end = start.saturating_add(piece_len - 1).min(total - 1);
                    pieces.push((start, end));
                    start = end + 1;
                }
                // The first answer streams while the other connections fetch
                // the rest; where it broke, it is resumed like any piece.
                let first_body = async {
                    match stream_into(resp, file, 0, Some(first.1 + 1), counters).await {
                        Ok(n) => n,
                        Err((n, e)) => {
                            tracing::debug!(error = %e.at(&shown), "origin piece broke; resuming");
                            n
                        }
                    }
                };
                // One connection, or no strong validator: one range after
                // the other.
                let (parallel, serial) = if strong && connections > 1 {
                    (pieces, Vec::new())
                } else {
                    (Vec::new(), pieces)
                };
                let rest = piece.run_all(parallel, connections.saturating_sub(1).max(1));
                let (reached, rest) = tokio::join!(first_body, rest);
                rest?;
                let mut after = Vec::new();
                if reached <= first.1 {
                    after.push((reached, first.1));
                }
                after.extend(serial);
                piece.run_all(after, 1).await?;
                Ok(Downloaded::Complete(validators))
            }
            StatusCode::RANGE_NOT_SATISFIABLE if content_range_total(resp.headers()) == Some(0) => {
                // An empty file: no range of it exists.
                file_len(file, 0)?;
                Ok(Downloaded::Complete(Validators {
                    size: 0,
                    ..validators_of(resp.headers())
                }))
            }
            status => Err(OriginError::Status {
                status: status_line(status),
                url: shown,
            }),
        }
    }

    /// Sends a GET for `range` (`(start, Some(end))` inclusive, or open-ended),
    /// following redirects; answers the final URL and its response.
    async fn get(
        &self,
        target: &Target,
        from: &Url,
        range: Option<(u64, Option<u64>)>,
        known: Option<&Validators>,
    ) -> Result<(Url, reqwest::Response), OriginError> {
        let mut url = from.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.client.get(url.clone());
            if target.same_origin(&url) {
                req = req.headers(target.headers.clone());
                if let Some((user, pass)) = &target.basic {
                    req = req.basic_auth(user, pass.as_ref());
                }
            }
            if let Some((start, end)) = range {
                let spec = match end {
                    Some(end) => format!("bytes={start}-{end}"),
                    None => format!("bytes={start}-"),
                };
                req = req.header(header::RANGE, spec);
            }
            if let Some(v) = known {
                if !v.etag.is_empty() {
                    req = req.header(header::IF_NONE_MATCH, &v.etag);
                }
                if !v.last_modified.is_empty() {
                    req = req.header(header::IF_MODIFIED_SINCE, &v.last_modified);
                }
            }
            let resp = req.send().await.map_err(|e| OriginError::Transport {
                url: redacted(&url),
                reason: describe(&e),
            })?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok((url, resp));
            }
            let next = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .filter(|u| matches!(u.scheme(), "http" | "https"));
            let Some(mut next) = next else {
                return Err(OriginError::Redirect {
                    url: redacted(&url),
                    reason: format!(
                        "answered {} without a usable Location",
                        status_line(resp.status())
                    ),
                });
            };
            // Credentials in a Location are not the user's to send on.
            let _ = next.set_username("");
            let _ = next.set_password(None);
            url = next;
        }
        Err(OriginError::Redirect {
            url: redacted(&target.url),
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }
}
fn too_large(url: &str, size: u64) -> OriginError {
    OriginError::Transport {
        url: url.to_owned(),
        reason: format!("{size} bytes announced, more than the {MAX_SIZE} this daemon fetches"),
    }
}

fn file_len(file: &File, len: u64) -> Result<(), OriginError> {
    file.set_len(len)
        .map_err(|e| OriginError::Io(e.to_string()))
}

fn validators_of(headers: &HeaderMap) -> Validators {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    Validators {
        size: 0,
        etag: text(header::ETAG),
        last_modified: text(header::LAST_MODIFIED),
    }
}

/// `Content-Range: bytes START-END/TOTAL` (RFC 9110 §14.4).
fn content_range(headers: &HeaderMap) -> Option<(u64, u64, u64)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (start <= end && end < total).then_some((start, end, total))
}

/// The total of `Content-Range: bytes */TOTAL`, sent with a 416.
fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    v.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

fn status_line(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// A client error in words, without the URL it carries (its query may hold
/// credentials).
pub(crate) fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    let root = cause.to_string();
    if e.is_connect() {
        format!("cannot connect: {root}")
    } else if e.is_body() || e.is_decode() {
        format!("the connection broke mid-body: {root}")
    } else {
        root
    }
}
