//! Accepted connections for the gRPC servers, guarded against two ways of
//! tying a server up: while the process is out of file descriptors, accept
//! backs off (tonic's own loop retries at once and spins a core); and a
//! connection that has not sent its first bytes (the TLS or HTTP/2 greeting)
//! within the handshake timeout is closed, so idle sockets cannot pile up.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Sleep,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

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
    /// TCP keepalive interval of accepted sockets.
    pub keepalive: Duration,
}

/// The connections accepted on `listener`, for `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    options: IncomingOptions,
) -> impl Stream<Item = io::Result<Guarded>> + Send + 'static {
    futures::stream::unfold(listener, move |listener| async move {
        let mut backoff = Duration::ZERO;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if backoff > Duration::ZERO {
                        tracing::info!("accepting connections again");
                    }
                    let _ = stream.set_nodelay(true);
                    let keepalive = socket2::TcpKeepalive::new().with_time(options.keepalive);
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                    let guarded = Guarded::new(stream, options.handshake_timeout);
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
    })
}

fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// An accepted connection that fails its reads once the handshake timeout
/// passes before the greeting arrived (the server then drops it).
#[derive(Debug)]
pub struct Guarded {
    stream: TcpStream,
    /// Until the greeting is in: the deadline and the bytes seen so far.
    pending: Option<(Pin<Box<Sleep>>, usize)>,
}

impl Guarded {
    fn new(stream: TcpStream, timeout: Duration) -> Self {
        Self {
            stream,
            pending: Some((Box::pin(tokio::time::sleep(timeout)), 0)),
        }
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
        let Some((deadline, seen)) = &mut this.pending else {
            return read;
        };
        match read {
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
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_silent_connection_is_closed_and_a_greeting_one_is_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = IncomingOptions {
            handshake_timeout: Duration::from_millis(200),
            keepalive: Duration::from_secs(30),
        };
        let mut accepted = Box::pin(incoming(listener, options));
        use futures::StreamExt;

        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut server = accepted.next().await.unwrap().unwrap();
        let mut buf = [0u8; 64];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut server = accepted.next().await.unwrap().unwrap();
        talker.write_all(&[7; GREETING]).await.unwrap();
        let mut got = 0;
        while got < GREETING {
            got += server.read(&mut buf).await.unwrap();
        }
        // Past the greeting, silence is no longer cut short.
        tokio::time::sleep(Duration::from_millis(300)).await;
        talker.write_all(b"x").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 1);
    }
}
