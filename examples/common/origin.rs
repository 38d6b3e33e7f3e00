//! An HTTP origin for the tests and the benchmark: serves one blob at any path, with `Range`,
//! `ETag`, `Last-Modified` and conditional requests, counts the body bytes it sends, and can be
//! slowed (one rate for all connections together), fail with a status, drop a connection
//! mid-body, stall, redirect, refuse ranges, or change its content.
//!
//! Paths: `/redirect/N/<rest>` answers 302 to `/redirect/N-1/<rest>` (and `/redirect/0/<rest>`
//! serves the blob); `/elsewhere/<rest>` answers 302 to [`Origin::elsewhere`]'s URL when set.
//! Everything else serves the blob.
//!
//! Included with `#[path]` by the whole-system tests and the benchmark.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};

/// Body bytes sent per write.
const PIECE: usize = 64 << 10;

/// One version of the content.
#[derive(Debug, Clone)]
struct Content {
    data: Bytes,
    etag: String,
    last_modified: String,
}

#[derive(Debug, Default)]
struct Shared {
    content: Mutex<Option<Content>>,
    /// Body bytes sent.
    sent: AtomicU64,
    /// GET requests answered (HEAD included).
    requests: AtomicU64,
    /// Requests that carried `If-None-Match` or `If-Modified-Since`.
    conditional: AtomicU64,
    /// Bytes per second for all connections together; 0: unlimited.
    rate: AtomicU64,
    /// When the paced sender may next send.
    next_send: Mutex<Option<Instant>>,
    /// Answer every request with this status (0: serve normally).
    fail_with: AtomicU16,
    /// Drop the next connection after this many body bytes (u64::MAX: never).
    drop_after: AtomicU64,
    /// Send headers, then no body for a long while.
    stall: AtomicBool,
    /// Answer ranges with the whole body (200), as an origin without range support does.
    no_ranges: AtomicBool,
    /// After this many body bytes in all, switch to the next content (u64::MAX: never).
    change_after: AtomicU64,
    next_content: Mutex<Option<Content>>,
    /// Where `/elsewhere/…` redirects to.
    elsewhere: Mutex<Option<String>>,
    /// `Authorization` and `X-Secret` values received, in order.
    credentials_seen: Mutex<Vec<String>>,
}

/// A running origin; stopped when dropped.
#[derive(Debug)]
pub(crate) struct Origin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn version(data: Bytes, n: u64) -> Content {
    let tag = blake3::hash(&data);
    Content {
        etag: format!("\"{}-{n}\"", &tag.to_hex()[..16]),
        last_modified: format!("Mon, 0{} Nov 2026 10:00:00 GMT", 1 + n % 9),
        data,
    }
}

impl Origin {
    /// Serves `data` on a free loopback port.
    pub(crate) async fn start(data: Vec<u8>) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            drop_after: AtomicU64::new(u64::MAX),
            change_after: AtomicU64::new(u64::MAX),
            ..Shared::default()
        });
        *shared.content.lock().unwrap() = Some(version(data.into(), 0));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/", get(serve_root))
            .route("/{*path}", get(serve))
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// `http://127.0.0.1:PORT/<path>`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// Body bytes sent so far.
    pub(crate) fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Requests answered so far.
    pub(crate) fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Conditional requests received so far.
    pub(crate) fn conditional_requests(&self) -> u64 {
        self.shared.conditional.load(Ordering::Relaxed)
    }

    /// Limits the body bytes of all connections together to `bytes_per_sec` (0: unlimited).
    pub(crate) fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Answers every request with `status` (0: serve normally again).
    pub(crate) fn fail_with(&self, status: u16) {
        self.shared.fail_with.store(status, Ordering::Relaxed);
    }

    /// Drops the next answer's connection after `bytes` of body.
    pub(crate) fn drop_after(&self, bytes: u64) {
        self.shared.drop_after.store(bytes, Ordering::Relaxed);
    }

    /// Sends headers and then nothing (true), or serves normally (false).
    pub(crate) fn stall(&self, on: bool) {
        self.shared.stall.store(on, Ordering::Relaxed);
    }

    /// Ignores `Range` and always sends the whole body.
    pub(crate) fn refuse_ranges(&self, on: bool) {
        self.shared.no_ranges.store(on, Ordering::Relaxed);
    }

    /// Replaces the content now (new `ETag` and `Last-Modified`).
    pub(crate) fn replace(&self, data: Vec<u8>) {
        let mut content = self.shared.content.lock().unwrap();
        let n = 1 + self.shared.requests.load(Ordering::Relaxed);
        *content = Some(version(data.into(), n));
    }

    /// Replaces the content once `after` more body bytes have been sent.
    pub(crate) fn replace_after(&self, after: u64, data: Vec<u8>) {
        *self.shared.next_content.lock().unwrap() = Some(version(data.into(), 99));
        self.shared
            .change_after
            .store(self.sent() + after, Ordering::Relaxed);
    }

    /// Where `/elsewhere/…` redirects to.
    pub(crate) fn redirect_elsewhere(&self, url: &str) {
        *self.shared.elsewhere.lock().unwrap() = Some(url.to_owned());
    }

    /// `Authorization` and `X-Secret` header values received so far.
    pub(crate) fn credentials_seen(&self) -> Vec<String> {
        self.shared.credentials_seen.lock().unwrap().clone()
    }
}

async fn serve_root(state: State<Arc<Shared>>, headers: HeaderMap) -> Response {
    serve(state, Path(String::new()), headers).await
}

async fn serve(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    for name in [header::AUTHORIZATION.as_str(), "x-secret"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            shared.credentials_seen.lock().unwrap().push(v.to_owned());
        }
    }
    if let Some(rest) = path.strip_prefix("redirect/") {
        let (n, tail) = rest.split_once('/').unwrap_or((rest, ""));
        if let Ok(n) = n.parse::<u32>()
            && n > 0
        {
            let to = format!("/redirect/{}/{tail}", n - 1);
            return (StatusCode::FOUND, [(header::LOCATION, to)]).into_response();
        }
    }
    if path.starts_with("elsewhere/")
        && let Some(to) = shared.elsewhere.lock().unwrap().clone()
    {
        return (StatusCode::FOUND, [(header::LOCATION, to)]).into_response();
    }
    let failing = shared.fail_with.load(Ordering::Relaxed);
    if failing != 0 {
        let status = StatusCode::from_u16(failing).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, "failing on purpose\n").into_response();
    }
    let content = shared.content.lock().unwrap().clone().expect("content");
    let conditional = headers.contains_key(header::IF_NONE_MATCH)
        || headers.contains_key(header::IF_MODIFIED_SINCE);
    if conditional {
        shared.conditional.fetch_add(1, Ordering::Relaxed);
        let etag_matches = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == content.etag);
        if etag_matches {
            return (StatusCode::NOT_MODIFIED, [(header::ETAG, content.etag)]).into_response();
        }
    }
    let len = content.data.len() as u64;
    let range = if shared.no_ranges.load(Ordering::Relaxed) {
        None
    } else {
        headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(|v| parse_range(v, len))
    };
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(None) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response();
        }
        Some(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e + 1),
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &content.etag)
        .header(header::LAST_MODIFIED, &content.last_modified)
        .header(header::CONTENT_LENGTH, end - start);
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        );
    }
    let sending = Sending {
        rest: content.data.slice(start as usize..end as usize),
        shared: Arc::clone(&shared),
        then_break: false,
    };
    let stream = futures::stream::unfold(sending, |mut st| async move {
        if st.then_break {
            // An error item makes the server abort the connection mid-body.
            st.then_break = false;
            st.rest = Bytes::new();
            return Some((Err(std::io::Error::other("dropped on purpose")), st));
        }
        if st.rest.is_empty() {
            return None;
        }
        if st.shared.stall.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(120)).await;
            st.rest = Bytes::new();
            return Some((Err(std::io::Error::other("stalled")), st));
        }
        let mut n = st.rest.len().min(PIECE);
        pace(&st.shared, n as u64).await;
        let drop_at = st.shared.drop_after.load(Ordering::Relaxed);
        if drop_at != u64::MAX {
            if drop_at < n as u64 {
                st.shared.drop_after.store(u64::MAX, Ordering::Relaxed);
                st.then_break = true;
                n = drop_at as usize;
            } else {
                st.shared
                    .drop_after
                    .store(drop_at - n as u64, Ordering::Relaxed);
            }
        }
        let sent = st.shared.sent.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if sent >= st.shared.change_after.load(Ordering::Relaxed)
            && let Some(next) = st.shared.next_content.lock().unwrap().take()
        {
            *st.shared.content.lock().unwrap() = Some(next);
            st.shared.change_after.store(u64::MAX, Ordering::Relaxed);
        }
        let piece = st.rest.split_to(n);
        Some((Ok::<_, std::io::Error>(piece), st))
    });
    response
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The rest of one answer's body.
struct Sending {
    rest: Bytes,
    shared: Arc<Shared>,
    /// Break the connection after what was just sent.
    then_break: bool,
}

/// Waits until `n` more bytes fit the origin's rate.
async fn pace(shared: &Shared, n: u64) {
    let rate = shared.rate.load(Ordering::Relaxed);
    if rate == 0 {
        return;
    }
    let at = {
        let mut next = shared.next_send.lock().unwrap();
        let now = Instant::now();
        let start = next.filter(|t| *t > now).unwrap_or(now);
        *next = Some(start + Duration::from_secs_f64(n as f64 / rate as f64));
        start
    };
    tokio::time::sleep_until(at).await;
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` against a body of `len` bytes: the inclusive range,
/// or `None` when unsatisfiable.
fn parse_range(v: &str, len: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (len.saturating_sub(n), len.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?),
        ),
    };
    (start <= end && end < len).then_some((start, end))
}
