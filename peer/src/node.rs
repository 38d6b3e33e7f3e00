//! A running peer: the store, the exchange server, membership and the local
//! API, under one cancellation token with an ordered shutdown.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
};

use futures::FutureExt as _;
use nebula_common::{BlobId, Store, StoreError};
use nebula_proto::{
    incoming::CallsLayer,
    v1::{self as pb, peer_exchange_server::PeerExchangeServer},
};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::{Notify, Semaphore, broadcast},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::{service::interceptor::InterceptedService, transport::Server};
use tower::layer::util::Stack;

use crate::{
    Config, ConfigError, Fetcher,
    connection::{
        CONNECTION_WINDOW, ConnectError, Connection, MAX_FRAME, MAX_MESSAGE, Pool, STREAM_WINDOW,
    },
    control::ControlClient,
    identity::{ExchangeAuth, Identity},
    limit::RateLimiter,
    local::LocalService,
    membership,
    metrics::{self, Metrics},
    origin::OriginClient,
    server::ExchangeService,
    tasks::Tasks,
};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is inconsistent.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task opening the store panicked.
    #[error("opening the store failed")]
    StoreTask(#[source] tokio::task::JoinError),
    /// The listener's own address could not be read.
    #[error("cannot read the peer listener's address")]
    Listener(#[source] std::io::Error),
    /// The join token cannot be sent in a header.
    #[error("the join token has characters a header cannot carry")]
    JoinToken,
    /// The control plane client could not be built.
    #[error("control plane client")]
    Control(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The HTTP client of origin fetches could not be built.
    #[error(transparent)]
    Origin(#[from] crate::origin::OriginClientError),
    /// The peer server's TLS settings were refused.
    #[error("TLS of the peer server")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The reflection service could not be built.
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A part of a node whose failure stops the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The `PeerExchange` server other peers fetch from.
    PeerServer,
    /// The CLI's Unix-socket API.
    LocalApi,
    /// `/metrics`, `/healthz` and `/readyz`.
    Http,
    /// The registry mirror.
    Mirror,
    /// Registration, heartbeats and announcements.
    Membership,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PeerServer => "peer server",
            Self::LocalApi => "local API",
            Self::Http => "HTTP endpoint",
            Self::Mirror => "registry mirror",
            Self::Membership => "membership",
        })
    }
}

/// What went wrong with a part.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A gRPC server failed.
    #[error(transparent)]
    Serve(#[from] tonic::transport::Error),
    /// An HTTP server failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A server stopped accepting connections while the node was not stopping.
    #[error("it stopped accepting connections")]
    Ended,
    /// The part's task panicked.
    #[error("it panicked")]
    Panicked,
}

/// A part failed, and the node stopped because of it.
#[derive(Debug, thiserror::Error)]
#[error("the {part} failed")]
pub struct NodeError {
    /// Which part.
    pub part: Part,
    /// What happened to it.
    #[source]
    pub failure: Failure,
}

/// What every part of a node shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) store: Arc<Store>,
    pub(crate) peer_id: String,
    /// The address other peers dial.
    pub(crate) address: String,
    pub(crate) control: Option<ControlClient>,
    /// This peer's credential, and the keys that check other peers'.
    pub(crate) identity: Arc<Identity>,
    /// The HTTP client of fetches by URL.
    pub(crate) origin: OriginClient,
    /// Origin downloads under way that other peers may fetch from, by key.
    pub(crate) sessions: dashmap::DashMap<String, Arc<crate::origin::Session>>,
    pub(crate) upload_limiter: Option<RateLimiter>,
    pub(crate) download_limiter: Option<RateLimiter>,
    /// Upload slots in use (chunk requests admitted and not yet answered).
    pub(crate) active_uploads: AtomicU32,
    /// Bytes of [`Config::download_buffer`] not held by a chunk request in
    /// flight.
    pub(crate) download_buffer: Arc<Semaphore>,
    pub(crate) uploaded_bytes: AtomicU64,
    pub(crate) downloaded_bytes: AtomicU64,
    /// A blob gained chunks (feeds have-updates and partial announcements).
    pub(crate) chunk_events: broadcast::Sender<BlobId>,
    /// The inventory changed (add, remove, completion).
    pub(crate) inventory_changed: Notify,
    pub(crate) registered: AtomicBool,
    /// Why the last registration attempt failed (empty once registered),
    /// for `nebula status`.
    pub(crate) registration_error: std::sync::Mutex<String>,
    /// When each chunk was last sent, and on which stream: a rate-limited
    /// peer does not spend its upload on a second copy while the first is
    /// fresh (the receiver will pass it on).
    pub(crate) recent_sends: dashmap::DashMap<(BlobId, u32), (Instant, u64)>,
    /// Numbers serving streams, for `recent_sends`.
    pub(crate) next_stream: AtomicU64,
    pub(crate) pool: Pool,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) started: Instant,
    /// Cancelled when the node starts to stop: servers stop accepting,
    /// fetches end, serving streams end after the piece they are sending.
    pub(crate) shutdown: CancellationToken,
    /// Every background task of the node's parts.
    pub(crate) tasks: Tasks,
}

impl Shared {
    fn new(
        config: Config,
        store: Store,
        address: String,
        control: Option<ControlClient>,
        identity: Arc<Identity>,
        origin: OriginClient,
    ) -> Self {
        let tasks = Tasks::new();
        Self {
            origin,
            sessions: dashmap::DashMap::new(),
            peer_id: store.peer_id().to_owned(),
            store: Arc::new(store),
            address,
            control,
            identity,
            upload_limiter: RateLimiter::optional(config.upload_limit),
            download_limiter: RateLimiter::optional(config.download_limit),
            active_uploads: AtomicU32::new(0),
            // Validated: at least 1 MiB; capped at what a semaphore can count.
            download_buffer: Arc::new(Semaphore::new(
                usize::try_from(config.download_buffer)
                    .unwrap_or(usize::MAX)
                    .min(Semaphore::MAX_PERMITS),
            )),
            uploaded_bytes: AtomicU64::new(0),
            downloaded_bytes: AtomicU64::new(0),
            chunk_events: broadcast::channel(1024).0,
            inventory_changed: Notify::new(),
            registered: AtomicBool::new(false),
            registration_error: std::sync::Mutex::new(String::new()),
            recent_sends: dashmap::DashMap::new(),
            next_stream: AtomicU64::new(1),
            pool: Pool::new(tasks.clone()),
            metrics: Arc::new(Metrics::default()),
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            tasks,
            config,
        }
    }

    /// A node's shared state without its servers, on the store
    /// `config` names, trusting credentials signed by `fleet` when given,
    /// with a control-plane client when `config` names one (for tests of
    /// one part).
    #[cfg(test)]
    pub(crate) fn for_tests(
        config: Config,
        fleet: Option<&nebula_common::credential::PublicKey>,
    ) -> Arc<Self> {
        let store = Store::open(&config.store).expect("a store in a fresh directory opens");
        let identity = Arc::new(Identity::new(None));
        if let Some(fleet) = fleet {
            identity.update("", &[bytes::Bytes::copy_from_slice(fleet.as_bytes())]);
        }
        let control = config.control.as_ref().map(|urls| {
            ControlClient::new(
                urls,
                None,
                Arc::clone(&identity),
                config.control_timeout,
                None,
            )
            .expect("a valid control plane URL")
        });
        // Built without extra CAs: cannot fail.
        let origin = OriginClient::new(1, config.origin_timeout, None).expect("a plain client");
        let address = "127.0.0.1:1".to_owned();
        Arc::new(Self::new(config, store, address, control, identity, origin))
    }

    /// The exchange stream to a peer, dialed if needed.
    pub(crate) async fn connect(&self, addr: &str) -> Result<Arc<Connection>, ConnectError> {
        let hello = pb::Hello {
            peer_id: self.peer_id.clone(),
            address: self.address.clone(),
        };
        // A peer that has just started dials once it has a credential to
        // show (or the control plane's deadline passed).
        let credential = match &self.control {
            Some(_) => {
                self.identity
                    .credential_within(self.config.control_timeout)
                    .await
            }
            None => self.identity.credential(),
        };
        self.pool
            .get(
                addr,
                hello,
                credential,
                &self.config.dial,
                self.config.tls.as_ref(),
            )
            .await
    }
}

/// The peer server's routes, behind the layer that counts each connection's calls.
type PeerRouter = tonic::transport::server::Router<Stack<CallsLayer, tower::layer::util::Identity>>;

/// A running peer node. Shut it down with [`Node::shutdown`].
#[derive(Debug)]
#[must_use = "a node stops when shut down; dropping the handle leaves it running until the runtime ends"]
pub struct Node {
    shared: Arc<Shared>,
    /// The parts whose failure stops the node; each returns what ended it.
    parts: JoinSet<(Part, Result<(), Failure>)>,
    local_addr: SocketAddr,
}

impl Node {
    /// Opens the store and starts serving peers on `listener`, registering
    /// with the control plane when one is configured.
    pub async fn start(listener: TcpListener, config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let store_dir = config.store.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(store_dir))
            .await
            .map_err(StartError::StoreTask)??;
        let local_addr = listener.local_addr().map_err(StartError::Listener)?;
        let advertised = config.advertise.unwrap_or(local_addr);
        let identity = Arc::new(Identity::new(Some(store.root().join("credential"))));
        let control = match &config.control {
            Some(urls) => {
                let token =
                    nebula_proto::client::BearerToken::optional(config.join_token.as_deref())
                        .map_err(|_| StartError::JoinToken)?;
                Some(
                    ControlClient::new(
                        urls,
                        token,
                        Arc::clone(&identity),
                        config.control_timeout,
                        config.tls.as_ref(),
                    )
                    .map_err(|e| StartError::Control(Box::new(e)))?,
                )
            }
            None => None,
        };
        let origin = OriginClient::new(
            config.origin_connections,
            config.origin_timeout,
            config.origin_ca.as_deref(),
        )?;
        let shared = Arc::new(Shared::new(
            config,
            store,
            advertised.to_string(),
            control,
            identity,
            origin,
        ));
        let mut node = Self {
            shared,
            parts: JoinSet::new(),
            local_addr,
        };
        // Accepted sockets get TCP_NODELAY there (the builder's flag only
        // reaches listeners tonic binds itself; Nagle plus delayed ACKs would
        // stall every pipelined piece by tens of milliseconds), accept backs
        // off when out of descriptors, one address holds a bounded number of
        // connections, and silent or idle ones are closed (the `calls` layer
        // tells them when calls open and close).
        let config = &node.shared.config;
        let (incoming, calls) = nebula_proto::incoming::incoming(
            listener,
            nebula_proto::incoming::IncomingOptions {
                handshake_timeout: config.handshake_timeout,
                idle_timeout: config.idle_timeout,
                per_address: config.connections_per_address,
                keepalive: config.tcp_keepalive,
            },
        );
        let router = node.peer_router(calls).await?;
        let incoming = crate::fault::peer_incoming(incoming);
        let stop = node.shared.shutdown.clone();
        node.spawn_part(Part::PeerServer, async move {
            router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
                .map_err(Failure::from)
        });
        if node.shared.control.is_some() {
            let shared = Arc::clone(&node.shared);
            node.spawn_part(Part::Membership, async move {
                membership::run(shared).await;
                Ok(())
            });
        }
        tracing::info!(peer = %node.shared.peer_id, address = %node.shared.address, "peer serving");
        Ok(node)
    }

    /// The peer server: health, reflection and `PeerExchange`, behind the
    /// credential check, with the configured HTTP/2 limits.
    async fn peer_router(&self, calls: CallsLayer) -> Result<PeerRouter, StartError> {
        let shared = &self.shared;
        let config = &shared.config;
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<PeerExchangeServer<ExchangeService>>()
            .await;
        // What the control plane's probe asks: only this peer answers for its id.
        health
            .set_service_status(
                format!("nebula.peer.{}", shared.peer_id),
                tonic_health::ServingStatus::Serving,
            )
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(nebula_proto::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let exchange = InterceptedService::new(
            PeerExchangeServer::new(ExchangeService::new(Arc::clone(shared)))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            ExchangeAuth(Arc::clone(&shared.identity)),
        );
        let mut server = Server::builder();
        if let Some(tls) = &config.tls {
            let tls = tls
                .server_config()
                .map_err(|e| StartError::Tls(Box::new(e)))?;
            server = server
                .tls_config(tls)
                .map_err(|e| StartError::Tls(Box::new(e)))?;
        }
        Ok(server
            .layer(calls)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(config.max_concurrent_streams)
            .http2_max_local_error_reset_streams(Some(config.max_local_resets))
            .http2_keepalive_interval(Some(config.server_keepalive_interval))
            .http2_keepalive_timeout(Some(config.server_keepalive_timeout))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(exchange))
    }

    /// Runs `part` until it ends. A part that fails, panics, or (a server)
    /// stops while the node is not stopping, stops the node.
    fn spawn_part<F>(&mut self, part: Part, run: F)
    where
        F: std::future::Future<Output = Result<(), Failure>> + Send + 'static,
    {
        let stop = self.shared.shutdown.clone();
        let serves = part != Part::Membership;
        self.parts.spawn(async move {
            let ended = std::panic::AssertUnwindSafe(run).catch_unwind().await;
            let result = match ended {
                Ok(Ok(())) if serves && !stop.is_cancelled() => Err(Failure::Ended),
                Ok(result) => result,
                Err(_) => Err(Failure::Panicked),
            };
            if let Err(failure) = &result {
                tracing::error!(%part, error = %failure, "a part of the node failed; stopping");
                stop.cancel();
            }
            (part, result)
        });
    }

    /// Serves the local API (the CLI's) on `listener`, a Unix socket the
    /// caller bound (see [`nebula_proto::unix::bind_private`]) and removes
    /// after [`Node::shutdown`].
    pub fn serve_local(&mut self, listener: UnixListener) {
        let service = LocalService::new(Arc::clone(&self.shared)).into_server();
        let stop = self.shared.shutdown.clone();
        self.spawn_part(Part::LocalApi, async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
                .map_err(Failure::from)
        });
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` over HTTP on `listener`
    /// (the daemon's `--http-listen`).
    pub fn serve_http(&mut self, listener: TcpListener) {
        let shared = Arc::clone(&self.shared);
        let stop = self.shared.shutdown.clone();
        self.spawn_part(Part::Http, async move {
            metrics::serve(listener, shared, stop)
                .await
                .map_err(Failure::from)
        });
    }

    /// Serves the registry mirror (`--registry-mirror`) on `listener`.
    pub fn serve_mirror(&mut self, listener: TcpListener, config: crate::MirrorConfig) {
        let shared = Arc::clone(&self.shared);
        let stop = self.shared.shutdown.clone();
        self.spawn_part(Part::Mirror, async move {
            crate::mirror::serve(listener, shared, config, stop)
                .await
                .map_err(Failure::from)
        });
    }

    /// The address the peer server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address announced to other peers.
    pub fn advertised(&self) -> &str {
        &self.shared.address
    }

    /// The stable peer id.
    pub fn peer_id(&self) -> &str {
        &self.shared.peer_id
    }

    /// The node's store.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// Whether the control plane has accepted the node's registration.
    pub fn is_registered(&self) -> bool {
        self.shared.registered.load(Ordering::Acquire)
    }

    /// The node's downloader: the one way to fetch a blob or a URL.
    pub fn fetcher(&self) -> Fetcher {
        Fetcher::new(Arc::clone(&self.shared))
    }

    /// A future that resolves when the node starts shutting down, told to
    /// or because a part failed.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.shared.shutdown.clone().cancelled_owned()
    }

    /// Stops in order: stop accepting and cancel fetches, deregister, let
    /// streams finish (within [`Config::shutdown_grace`]), await every task,
    /// then release the store. Returns the failure of the part that stopped
    /// the node, if one did.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        self.shared.shutdown.cancel();
        self.shared.pool.close_all().await;
        let grace = self.shared.config.shutdown_grace;
        let deadline = Instant::now() + grace;
        let mut failed: Option<NodeError> = None;
        let mut aborted = false;
        loop {
            let joined = tokio::select! {
                joined = self.parts.join_next() => joined,
                () = tokio::time::sleep_until(deadline), if !aborted => {
                    tracing::warn!("parts of the node did not stop in time; dropping them");
                    self.parts.abort_all();
                    aborted = true;
                    continue;
                }
            };
            match joined {
                None => break,
                Some(Ok((part, Err(failure)))) => {
                    failed.get_or_insert(NodeError { part, failure });
                }
                Some(Ok((_, Ok(())))) => {}
                // Aborted past the grace period (`spawn_part` catches panics).
                Some(Err(_)) => {}
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let dropped = self.shared.tasks.wait(left).await;
        if dropped > 0 {
            tracing::warn!(
                tasks = dropped,
                "tasks still running after the grace period were dropped"
            );
        }
        tracing::info!(peer = %self.shared.peer_id, "node stopped");
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
impl Node {
    /// Trusts credentials signed by `key`, as if a control plane had handed
    /// it out (for tests of a node without one).
    pub(crate) fn trust(&self, key: &nebula_common::credential::PublicKey) {
        self.shared
            .identity
            .update("", &[bytes::Bytes::copy_from_slice(key.as_bytes())]);
    }
}
