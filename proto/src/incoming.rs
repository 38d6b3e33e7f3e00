//! Accepted connections for the gRPC servers, guarded against the ways a
//! client can tie a server up without sending a request:
//!
//! - while the process is out of file descriptors, accept backs off (tonic's
//!   own loop retries at once and spins a core);
//! - one address holds at most [`IncomingOptions::per_address`] connections;
//!   more are closed as they are accepted;
//! - a connection that has not sent its first bytes (the TLS or HTTP/2
//!   greeting) within the handshake timeout is closed;
//! - a connection with no call open for the idle timeout is closed. HTTP/2
//!   pings do not keep it open: what counts is calls, which the
//!   [`CallsLayer`] that [`incoming`] returns counts. The server must be
//!   built with that layer (`Server::builder().layer(calls)`); without it no
//!   call is ever seen and every connection would look idle.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, task::AtomicWaker};
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
use tonic::{
    codegen::http::{Request, Response},
    transport::server::{Connected, TcpConnectInfo, TlsConnectInfo},
};

/// Bytes a client must send within the handshake timeout: the HTTP/2
/// preface is 24, a TLS ClientHello more.
const GREETING: usize = 24;
/// The longest pause between accepts while descriptors are exhausted.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How accepted connections are set up.
#[derive(Debug, Clone, Copy)]
pub struct IncomingOptions {
    /// Close a connection that has not sent its greeting within this long.
    pub handshake_timeout: Duration,
    /// Close a connection that has had no call open for this long.
    pub idle_timeout: Duration,
    /// Connections one IP address may hold at once; more are closed.
    pub per_address: usize,
    /// TCP keepalive interval of accepted sockets.
    pub keepalive: Duration,
}

/// The connections accepted on `listener`, for `serve_with_incoming`, and the
/// layer that tells them when calls open and close (add it to the server).
pub fn incoming(
    listener: TcpListener,
    options: IncomingOptions,
) -> (
    impl Stream<Item = io::Result<Guarded>> + Send + 'static,
    CallsLayer,
) {
    let table = Arc::new(Table::default());
    let layer = CallsLayer {
        table: Arc::clone(&table),
    };
    let stream = futures::stream::unfold(listener, move |listener| {
        let table = Arc::clone(&table);
        async move {
            let mut backoff = Duration::ZERO;
            loop {
                match listener.accept().await {
                    Ok((stream, remote)) => {
                        if backoff > Duration::ZERO {
                            tracing::info!("accepting connections again");
                            backoff = Duration::ZERO;
                        }
                        let local = stream.local_addr().ok();
                        let Some(entry) = table.admit(local, remote, options.per_address) else {
                            tracing::debug!(%remote, limit = options.per_address, "too many connections from one address; closing");
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let keepalive = socket2::TcpKeepalive::new().with_time(options.keepalive);
                        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                        let guarded = Guarded::new(stream, entry, &options);
                        return Some((Ok(guarded), listener));
                    }
                    Err(e) if out_of_resources(&e) => {
                        if backoff.is_zero() {
                            tracing::warn!(error = %e, "cannot accept connections; backing off until some close");
                        }
                        backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_BACKOFF);
                        tokio::time::sleep(backoff).await;
                    }
                    // A connection reset before it was accepted, and the like.
                    Err(e) => tracing::debug!(error = %e, "accept failed"),
                }
            }
        }
    });
    (stream, layer)
}

fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A connection by its two ends (a listener on several addresses may see
/// one client port twice).
type Ends = (Option<SocketAddr>, SocketAddr);

/// The open connections of one listener: how many per address, and each
/// one's calls by its ends.
#[derive(Debug, Default)]
struct Table {
    per_address: Mutex<HashMap<IpAddr, usize>>,
    calls: Mutex<HashMap<Ends, Arc<Calls>>>,
}

/// What the per-address limit counts: an IPv4 address (IPv4-mapped ones
/// included), or an IPv6 /64, which one host usually has whole.
fn address(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

impl Table {
    /// Counts a new connection from `remote` to `local`, unless its address
    /// is at `limit`.
    fn admit(
        self: &Arc<Self>,
        local: Option<SocketAddr>,
        remote: SocketAddr,
        limit: usize,
    ) -> Option<Entry> {
        {
            let mut counts = lock(&self.per_address);
            let count = counts.entry(address(remote.ip())).or_default();
            if *count >= limit {
                return None;
            }
            *count += 1;
        }
        let calls = Arc::new(Calls::default());
        lock(&self.calls).insert((local, remote), Arc::clone(&calls));
        Some(Entry {
            table: Arc::clone(self),
            ends: (local, remote),
            calls,
        })
    }

    fn calls(&self, ends: Ends) -> Option<Arc<Calls>> {
        lock(&self.calls).get(&ends).cloned()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A connection's place in the [`Table`], given back when it closes.
#[derive(Debug)]
struct Entry {
    table: Arc<Table>,
    ends: Ends,
    calls: Arc<Calls>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        {
            // Its own entry only: a new connection with the same ends may
            // have replaced it while this one was closing.
            let mut calls = lock(&self.table.calls);
            if calls
                .get(&self.ends)
                .is_some_and(|c| Arc::ptr_eq(c, &self.calls))
            {
                calls.remove(&self.ends);
            }
        }
        let key = address(self.ends.1.ip());
        let mut counts = lock(&self.table.per_address);
        if let Some(count) = counts.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&key);
            }
        }
    }
}

/// The calls open on one connection, and since when it has had none.
#[derive(Debug)]
struct Calls {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// The connection's reader, woken when its last call closes so that it
    /// starts the idle clock.
    reader: AtomicWaker,
}

impl Default for Calls {
    fn default() -> Self {
        Self {
            open: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            reader: AtomicWaker::new(),
        }
    }
}

/// A call open on a connection, until its answer's body is dropped.
#[derive(Debug)]
struct OpenCall(Arc<Calls>);

impl OpenCall {
    fn new(calls: Arc<Calls>) -> Self {
        calls.open.fetch_add(1, Ordering::SeqCst);
        Self(calls)
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        // The idle time is set before the count drops, so that a reader that
        // sees no call also sees when the last one closed.
        *lock(&self.0.idle_since) = Instant::now();
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.reader.wake();
        }
    }
}

/// Tells the connections of one [`incoming`] when calls open and close.
#[derive(Debug, Clone)]
pub struct CallsLayer {
    table: Arc<Table>,
}

impl<S> tower::Layer<S> for CallsLayer {
    type Service = CountCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountCalls {
            inner,
            table: Arc::clone(&self.table),
        }
    }
}

/// The service [`CallsLayer`] builds.
#[derive(Debug, Clone)]
pub struct CountCalls<S> {
    inner: S,
    table: Arc<Table>,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for CountCalls<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = Response<Counted<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let extensions = req.extensions();
        let info = extensions.get::<TcpConnectInfo>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        });
        // Calls anyone may make without a credential and hold open (a health
        // watch, reflection) do not keep a connection from being idle.
        let path = req.uri().path();
        let counted = !(path.starts_with("/grpc.health.v1.Health/Watch")
            || path.starts_with("/grpc.reflection."));
        let open = info
            .filter(|_| counted)
            .and_then(|i| Some((i.local_addr(), i.remote_addr()?)))
            .and_then(|ends| self.table.calls(ends))
            .map(OpenCall::new);
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| Counted { inner, _open: open }))
        })
    }
}

/// An answer's body, whose call stays open until it is dropped.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    _open: Option<OpenCall>,
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An accepted connection whose reads fail (and the server then drops it)
/// once the handshake timeout passes before the greeting arrived, or once it
/// has had no call open for the idle timeout.
#[derive(Debug)]
pub struct Guarded {
    stream: TcpStream,
    entry: Entry,
    /// Until the greeting is in: the deadline and the bytes seen so far.
    pending: Option<(Pin<Box<Sleep>>, usize)>,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    /// When bytes last came in, past the greeting.
    read_at: Instant,
    /// The grace this idle spell had (see [`GRACE`]): when the spell began
    /// and until when the grace runs.
    grace: Option<(Instant, Instant)>,
}

/// How long a connection whose idle time is up is kept when bytes have
/// just come in: a request may be on its way to the service, not counted
/// yet. Once per idle spell, so that pings cannot keep a connection open.
const GRACE: Duration = Duration::from_secs(1);

impl Guarded {
    fn new(stream: TcpStream, entry: Entry, options: &IncomingOptions) -> Self {
        let handshake = Box::pin(tokio::time::sleep(options.handshake_timeout));
        Self {
            stream,
            entry,
            pending: Some((handshake, 0)),
            idle_timeout: options.idle_timeout,
            idle: Box::pin(tokio::time::sleep(options.idle_timeout)),
            read_at: Instant::now(),
            grace: None,
        }
    }

    /// Whether the connection has been without a call for the idle timeout;
    /// otherwise arranges to be woken when it could be.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let calls = &self.entry.calls;
        calls.reader.register(cx.waker());
        if calls.open.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let since = *lock(&calls.idle_since);
        let mut deadline = since + self.idle_timeout;
        match self.grace {
            Some((spell, until)) if spell == since => deadline = deadline.max(until),
            _ => {
                let now = Instant::now();
                if deadline <= now && now.duration_since(self.read_at) < GRACE {
                    deadline = now + GRACE;
                    self.grace = Some((since, deadline));
                }
            }
        }
        if self.idle.deadline() != deadline {
            self.idle.as_mut().reset(deadline);
        }
        self.idle.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some((deadline, seen)) = &mut this.pending {
            return match read {
                Poll::Ready(Ok(())) => {
                    *seen += buf.filled().len() - before;
                    if *seen >= GREETING {
                        this.pending = None;
                    }
                    Poll::Ready(Ok(()))
                }
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => Poll::Ready(Err(
                    io::Error::new(io::ErrorKind::TimedOut, "no handshake within the timeout"),
                )),
                other => other,
            };
        }
        if let Poll::Ready(Ok(())) = read
            && buf.filled().len() > before
        {
            this.read_at = Instant::now();
        }
        match read {
            Poll::Pending if this.idle_expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no call within the idle timeout",
            ))),
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests;
