//! The dialing side of `PeerExchange`: one long-lived stream per remote peer,
//! shared by every download, with answers routed back by request id.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use dashmap::DashMap;
use nebula_common::{BlobId, credential::METADATA_KEY};
use nebula_proto::tls::{self, EndpointError, TlsConfig};
use nebula_proto::v1::{
    self as pb, ExchangeRequest, ExchangeResponse, exchange_request::Kind as Req,
    exchange_response::Kind as Resp, peer_exchange_client::PeerExchangeClient,
};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};

use crate::{Config, config::DialConfig, identity::Identity, tasks::Tasks};

/// Largest gRPC message accepted: a 1 MiB piece plus framing, with room.
pub(crate) const MAX_MESSAGE: usize = 4 << 20;
/// HTTP/2 windows sized for bulk data: several 1 MiB pieces in flight per
/// stream without waiting for WINDOW_UPDATEs.
pub(crate) const STREAM_WINDOW: u32 = 16 << 20;
pub(crate) const CONNECTION_WINDOW: u32 = 32 << 20;
/// Bigger frames, fewer per-frame costs on the data path.
pub(crate) const MAX_FRAME: u32 = 1 << 20;

/// What a download's worker receives from a connection.
#[derive(Debug)]
pub(crate) enum Reply {
    /// An answer to one of its requests.
    Answer(u64, Resp),
    /// The request was cancelled locally (another provider won the race).
    Cancelled(u64),
    /// The serving peer's chunk bitmap for a blob changed.
    Have(pb::HaveUpdate),
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The address is not a valid URI.
    #[error("invalid peer address {addr:?}: {source}")]
    Address {
        /// The address.
        addr: String,
        /// The cause.
        source: EndpointError,
    },
    /// Dialing failed.
    #[error("cannot reach peer {addr}")]
    Unreachable {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The peer refused the stream.
    #[error("peer {addr} refused the exchange stream: {}", status.message())]
    Refused {
        /// The address.
        addr: String,
        /// Its answer.
        status: tonic::Status,
    },
    /// The stream did not open within the connect timeout.
    #[error("peer {addr} did not open the exchange stream in time")]
    TimedOut {
        /// The address.
        addr: String,
    },
}

/// An open exchange stream to one peer.
#[derive(Debug)]
pub(crate) struct Connection {
    tx: mpsc::Sender<ExchangeRequest>,
    /// Where each outstanding request's answers go.
    routes: DashMap<u64, mpsc::UnboundedSender<Reply>>,
    /// Who wants have-updates for which blob.
    watchers: DashMap<BlobId, Vec<mpsc::UnboundedSender<Reply>>>,
    next_id: AtomicU64,
    closed: CancellationToken,
}

impl Connection {
    /// Dials `addr` (`host:port`), over TLS when `tls` is given, and opens
    /// the exchange stream.
    pub(crate) async fn open(
        addr: &str,
        hello: pb::Hello,
        credential: Option<MetadataValue<Ascii>>,
        dial: &DialConfig,
        tls: Option<&TlsConfig>,
        tasks: &Tasks,
    ) -> Result<Arc<Self>, ConnectError> {
        let endpoint = tls::endpoint(&format!("{}://{addr}", tls::scheme(tls)), tls)
            .map_err(|source| ConnectError::Address {
                addr: addr.into(),
                source,
            })?
            .connect_timeout(dial.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            // A provider that goes silent (stopped, its host gone) stops
            // answering pings: the stream closes within interval + timeout
            // and its requests move at once, whatever its usual latency.
            .http2_keep_alive_interval(dial.keepalive_interval)
            .keep_alive_timeout(dial.keepalive_timeout)
            .keep_alive_while_idle(true)
            .http2_max_local_error_reset_streams(dial.max_local_resets);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ConnectError::Unreachable {
                addr: addr.into(),
                source,
            })?;
        let mut client = PeerExchangeClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        // Requests are small; the bound only paces a flood of cancels.
        let (tx, rx) = mpsc::channel(1024);
        // The receiver is held just below: this cannot fail.
        let _ = tx
            .send(ExchangeRequest {
                request_id: 0,
                kind: Some(Req::Hello(hello)),
            })
            .await;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(credential) = credential {
            request.metadata_mut().insert(METADATA_KEY, credential);
        }
        let response = tokio::time::timeout(dial.connect_timeout, client.exchange(request))
            .await
            .map_err(|_| ConnectError::TimedOut { addr: addr.into() })?
            .map_err(|status| ConnectError::Refused {
                addr: addr.into(),
                status,
            })?;
        let conn = Arc::new(Self {
            tx,
            routes: DashMap::new(),
            watchers: DashMap::new(),
            next_id: AtomicU64::new(1),
            closed: CancellationToken::new(),
        });
        let reader = Arc::clone(&conn);
        let span = tracing::info_span!("exchange", peer = %addr, dialed = true);
        tasks.spawn(tracing::Instrument::instrument(
            async move {
                let mut inbound = response.into_inner();
                loop {
                    let msg = tokio::select! {
                        _ = reader.closed.cancelled() => break,
                        msg = inbound.message() => msg,
                    };
                    match msg {
                        Ok(Some(msg)) => reader.route(msg),
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "exchange stream ended");
                            break;
                        }
                    }
                }
                reader.close();
            },
            span,
        ));
        Ok(conn)
    }

    fn route(&self, msg: ExchangeResponse) {
        let Some(kind) = msg.kind else { return };
        if let Resp::Have(have) = kind {
            if let Ok(id) = have.blob.parse::<BlobId>()
                && let Some(mut list) = self.watchers.get_mut(&id)
            {
                list.retain(|w| w.send(Reply::Have(have.clone())).is_ok());
            }
            return;
        }
        // A chunk's last piece, an error or busy ends a single-chunk request;
        // routes are removed by the worker through `finish`.
        if let Some(route) = self.routes.get(&msg.request_id) {
            let _ = route.send(Reply::Answer(msg.request_id, kind));
        }
    }

    /// Marks the stream dead: every route and watcher sees its channel close.
    pub(crate) fn close(&self) {
        self.closed.cancel();
        self.routes.clear();
        self.watchers.clear();
    }

    /// Resolves once the stream has ended (closed, reset, or refused).
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Whether the stream has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Sends a request whose answers go to `route`; returns its id.
    pub(crate) async fn request(
        &self,
        kind: Req,
        route: &mpsc::UnboundedSender<Reply>,
    ) -> Option<u64> {
        if self.is_closed() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.routes.insert(id, route.clone());
        let sent = self
            .tx
            .send(ExchangeRequest {
                request_id: id,
                kind: Some(kind),
            })
            .await;
        if sent.is_err() {
            self.routes.remove(&id);
            self.close();
            return None;
        }
        Some(id)
    }

    /// Forgets a finished request's route.
    pub(crate) fn finish(&self, id: u64) {
        self.routes.remove(&id);
    }

    /// Cancels a request: tells the serving peer, and tells the waiting
    /// worker at once so it stops counting the request as in flight.
    pub(crate) fn cancel(&self, id: u64) {
        if let Some((_, route)) = self.routes.remove(&id) {
            let _ = route.send(Reply::Cancelled(id));
            let _ = self.tx.try_send(ExchangeRequest {
                request_id: 0,
                kind: Some(Req::Cancel(pb::Cancel { request_id: id })),
            });
        }
    }

    /// Routes have-updates for `blob` to `route`.
    pub(crate) fn watch(&self, blob: BlobId, route: &mpsc::UnboundedSender<Reply>) {
        self.watchers.entry(blob).or_default().push(route.clone());
    }
}

/// Open streams by peer address, shared across downloads.
#[derive(Debug)]
struct Pool {
    conns: Mutex<HashMap<String, Arc<Connection>>>,
    /// Where each stream's reader runs.
    tasks: Tasks,
}

impl Pool {
    fn new(tasks: Tasks) -> Self {
        Self {
            conns: Mutex::default(),
            tasks,
        }
    }

    /// The open stream to `addr`, dialing it if needed.
    async fn get(
        &self,
        addr: &str,
        hello: pb::Hello,
        credential: Option<MetadataValue<Ascii>>,
        dial: &DialConfig,
        tls: Option<&TlsConfig>,
    ) -> Result<Arc<Connection>, ConnectError> {
        if let Some(c) = self.conns.lock().await.get(addr)
            && !c.is_closed()
        {
            return Ok(Arc::clone(c));
        }
        // Dial without the lock: a dead peer must not hold up the others.
        let conn = Connection::open(addr, hello, credential, dial, tls, &self.tasks).await?;
        let mut conns = self.conns.lock().await;
        match conns.get(addr) {
            // Another download dialed the same peer meanwhile: keep one stream.
            Some(c) if !c.is_closed() => {
                conn.close();
                Ok(Arc::clone(c))
            }
            _ => {
                conns.insert(addr.to_owned(), Arc::clone(&conn));
                Ok(conn)
            }
        }
    }

    /// Streams open now.
    async fn open_count(&self) -> usize {
        self.conns
            .lock()
            .await
            .values()
            .filter(|c| !c.is_closed())
            .count()
    }

    /// Closes every stream.
    async fn close_all(&self) {
        for (_, c) in self.conns.lock().await.drain() {
            c.close();
        }
    }
}

/// Dials other peers as this node: its `Hello` and its credential on every
/// stream, one pooled stream per peer.
#[derive(Debug, Clone)]
pub(crate) struct Dialer {
    pool: Arc<Pool>,
    hello: pb::Hello,
    identity: Arc<Identity>,
    /// Whether a control plane hands out this peer's credential: a peer that
    /// has just started waits for it before dialing.
    controlled: bool,
    config: Arc<Config>,
}

impl Dialer {
    /// Dials as `peer_id`, serving on `address`, showing `identity`'s
    /// credential; the streams' readers run among `tasks`.
    pub(crate) fn new(
        peer_id: &str,
        address: &str,
        identity: Arc<Identity>,
        config: Arc<Config>,
        tasks: Tasks,
    ) -> Self {
        Self {
            pool: Arc::new(Pool::new(tasks)),
            hello: pb::Hello {
                peer_id: peer_id.to_owned(),
                address: address.to_owned(),
            },
            identity,
            controlled: config.control.is_some(),
            config,
        }
    }

    /// The exchange stream to a peer, dialed if needed.
    pub(crate) async fn connect(&self, addr: &str) -> Result<Arc<Connection>, ConnectError> {
        // A peer that has just started dials once it has a credential to
        // show (or the control plane's deadline passed).
        let credential = if self.controlled {
            self.identity
                .credential_within(self.config.control_timeout)
                .await
        } else {
            self.identity.credential()
        };
        self.pool
            .get(
                addr,
                self.hello.clone(),
                credential,
                &self.config.dial,
                self.config.tls.as_ref(),
            )
            .await
    }

    /// The credential it shows (tests trust keys through it).
    #[cfg(test)]
    pub(crate) fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// Streams open now.
    pub(crate) async fn open_count(&self) -> usize {
        self.pool.open_count().await
    }

    /// Closes every stream.
    pub(crate) async fn close_all(&self) {
        self.pool.close_all().await;
    }
}
