//! The HTTP endpoints of a process (metrics and health, the control plane's
//! live page, the daemon's registry mirror) served with the same TLS as its
//! gRPC server when the fleet uses TLS, and in plaintext otherwise.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt, stream::FuturesUnordered};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::tls::{HANDSHAKE_TIMEOUT, TlsConfig};

/// Handshakes under way at once at most; past it, accepting waits.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes under way at once from one address at most; past it, that
/// address's new connections are closed (one client cannot fill the rest).
const MAX_HANDSHAKES_PER_ADDRESS: usize = 16;

/// Serves `router` on `listener` until `shutdown` completes: with TLS when
/// `tls` is given (its certificate, and its CA under client auth).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<&TlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    match tls {
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(tls) => {
            let config = tls.http_server_config().map_err(io::Error::other)?;
            axum::serve(TlsListener::new(listener, config), router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// A handshake under way: its client's address, and the connection if it succeeds.
type Handshake =
    Pin<Box<dyn Future<Output = (IpAddr, Option<(TlsStream<TcpStream>, SocketAddr)>)> + Send>>;

/// A TCP listener whose connections come out after their TLS handshake.
/// Handshakes run side by side, each bounded by [`HANDSHAKE_TIMEOUT`], so a
/// client that connects and says nothing holds up no one.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: FuturesUnordered<Handshake>,
    /// Handshakes under way by client address.
    pending: HashMap<IpAddr, usize>,
}

impl TlsListener {
    fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshakes: FuturesUnordered::new(),
            pending: HashMap::new(),
        }
    }

    fn start(&mut self, stream: TcpStream, remote: SocketAddr) {
        let ip = remote.ip().to_canonical();
        let pending = self.pending.entry(ip).or_default();
        if *pending >= MAX_HANDSHAKES_PER_ADDRESS {
            tracing::debug!(%remote, "too many TLS handshakes from one address; closing");
            return;
        }
        *pending += 1;
        let _ = stream.set_nodelay(true);
        let handshake = self.acceptor.accept(stream);
        self.handshakes.push(Box::pin(async move {
            let done = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(tls)) => Some((tls, remote)),
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%remote, "no TLS handshake within the timeout");
                    None
                }
            };
            (ip, done)
        }));
    }

    /// Counts a handshake of `ip` as ended.
    fn ended(&mut self, ip: IpAddr) {
        if let Some(n) = self.pending.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(&ip);
            }
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let room = self.handshakes.len() < MAX_HANDSHAKES;
            tokio::select! {
                accepted = self.tcp.accept(), if room => match accepted {
                    Ok((stream, remote)) => self.start(stream, remote),
                    // Out of descriptors and the like: wait for some to close
                    // rather than spin.
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some((ip, done)) = self.handshakes.next(), if !self.handshakes.is_empty() => {
                    self.ended(ip);
                    if let Some(connection) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
