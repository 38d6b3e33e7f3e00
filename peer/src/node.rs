//! A running peer: the store, the exchange server, membership and the local
//! API, under one cancellation token with an ordered shutdown.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use nebula_common::{BlobId, Store, StoreError};
use nebula_proto::v1::{self as pb, peer_exchange_server::PeerExchangeServer};
use tokio::{
    net::TcpListener,
    sync::{Notify, Semaphore, broadcast},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::{service::interceptor::InterceptedService, transport::Server};

use crate::{
    Config,
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
};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener or socket problem.
    #[error("{0}")]
    Io(String),
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
    pub(crate) shutdown: CancellationToken,
}

impl Shared {
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
                Duration::from_secs(3),
                self.config.tls.as_ref(),
            )
            .await
    }
}

/// A running peer node. Shut it down with [`Node::shutdown`].
#[derive(Debug)]
#[must_use = "a node stops when shut down; dropping the handle leaves it running until the runtime ends"]
pub struct Node {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    local_addr: SocketAddr,
}

impl Node {
    /// Opens the store and starts serving peers on `listener`, registering
    /// with the control plane when one is configured.
    pub async fn start(config: Config, listener: TcpListener) -> Result<Self, StartError> {
        config.validate().map_err(StartError::Config)?;
        let store_dir = config.store.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(store_dir))
            .await
            .map_err(|e| StartError::Io(e.to_string()))??;
        let local_addr = listener
            .local_addr()
            .map_err(|e| StartError::Io(e.to_string()))?;
        let advertised = config.advertise.unwrap_or(local_addr);
        let identity = Arc::new(Identity::new(Some(store.root().join("credential"))));
        let control = match &config.control {
            Some(urls) => {
                let token =
                    nebula_proto::client::BearerToken::optional(config.join_token.as_deref())
                        .map_err(|_| {
                            StartError::Config("join token has invalid characters".into())
                        })?;
                Some(
                    ControlClient::new(
                        urls,
                        token,
                        Arc::clone(&identity),
                        config.control_timeout,
                        config.tls.as_ref(),
                    )
                    .map_err(|e| StartError::Config(e.to_string()))?,
                )
            }
            None => None,
        };
        let origin = OriginClient::new(
            config.origin_connections,
            config.origin_timeout,
            config.origin_ca.as_deref(),
        )
        .map_err(|e| StartError::Config(e.to_string()))?;
        let shared = Arc::new(Shared {
            origin,
            sessions: dashmap::DashMap::new(),
            peer_id: store.peer_id().to_owned(),
            store: Arc::new(store),
            address: advertised.to_string(),
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
            pool: Pool::default(),
            metrics: Arc::new(Metrics::default()),
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            config,
        });
        let mut tasks = JoinSet::new();
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
            .build_v1()
            .map_err(|e| StartError::Io(e.to_string()))?;
        let exchange = InterceptedService::new(
            PeerExchangeServer::new(ExchangeService::new(Arc::clone(&shared)))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            ExchangeAuth(Arc::clone(&shared.identity)),
        );
        let mut server = Server::builder();
        if let Some(tls) = &shared.config.tls {
            let tls = tls
                .server_config()
                .map_err(|e| StartError::Config(e.to_string()))?;
            server = server
                .tls_config(tls)
                .map_err(|e| StartError::Config(format!("TLS: {e}")))?;
        }
        // Accepted sockets get TCP_NODELAY there (the builder's flag only
        // reaches listeners tonic binds itself; Nagle plus delayed ACKs would
        // stall every pipelined piece by tens of milliseconds), accept backs
        // off when out of descriptors, one address holds a bounded number of
        // connections, and silent or idle ones are closed.
        let (incoming, calls) = nebula_proto::incoming::incoming(
            listener,
            nebula_proto::incoming::IncomingOptions {
                handshake_timeout: shared.config.handshake_timeout,
                idle_timeout: shared.config.idle_timeout,
                per_address: shared.config.connections_per_address,
                keepalive: Duration::from_secs(30),
            },
        );
        let router = server
            .layer(calls)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(256)
            .http2_max_local_error_reset_streams(Some(1024))
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(exchange);
        let stop = shared.shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "peer server failed");
            }
        });
        if shared.control.is_some() {
            tasks.spawn(membership::run(Arc::clone(&shared)));
        }
        tracing::info!(peer = %shared.peer_id, address = %shared.address, "peer serving");
        Ok(Self {
            shared,
            tasks,
            local_addr,
        })
    }

    /// Serves the local API (the CLI's) on a Unix socket at `path`, mode
    /// 0600 (see [`nebula_proto::unix::bind_private`]). Refuses a path another
    /// live daemon listens on, or that is not a socket; replaces a stale one.
    pub async fn serve_local(&mut self, path: &Path) -> Result<(), StartError> {
        let (listener, socket) = nebula_proto::unix::bind_private(path)
            .await
            .map_err(|e| StartError::Io(format!("binding {}: {e}", path.display())))?;
        let service = LocalService::new(Arc::clone(&self.shared)).into_server();
        let stop = self.shared.shutdown.clone();
        self.tasks.spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            if let Err(e) = Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "local API failed");
            }
            socket.remove();
        });
        Ok(())
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` over HTTP on `listener`
    /// (the daemon's `--http-listen`).
    pub fn serve_http(&mut self, listener: TcpListener) {
        let shared = Arc::clone(&self.shared);
        let stop = self.shared.shutdown.clone();
        self.tasks.spawn(async move {
            if let Err(e) = metrics::serve(listener, shared, stop.clone()).await {
                tracing::error!(error = %e, "metrics endpoint failed");
                stop.cancel();
            }
        });
    }

    /// Serves the registry mirror (`--registry-mirror`) on `listener`.
    pub fn serve_mirror(&mut self, listener: TcpListener, config: crate::MirrorConfig) {
        let shared = Arc::clone(&self.shared);
        let stop = self.shared.shutdown.clone();
        self.tasks.spawn(async move {
            if let Err(e) = crate::mirror::serve(listener, shared, config, stop.clone()).await {
                tracing::error!(error = %e, "registry mirror failed");
                stop.cancel();
            }
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

    /// Fetches a blob into the store (see [`crate::fetch`]).
    pub async fn fetch(
        &self,
        blob: nebula_common::BlobRef,
        progress: tokio::sync::watch::Sender<crate::Progress>,
        no_provider_timeout: Option<Duration>,
    ) -> Result<crate::FetchOutcome, crate::FetchError> {
        let timeout = no_provider_timeout.unwrap_or(self.shared.config.no_provider_timeout);
        let outcome =
            crate::fetch::fetch(Arc::clone(&self.shared), blob, progress, timeout).await?;
        completed(&self.shared, &outcome.blob);
        Ok(outcome)
    }

    /// Fetches a URL into the store, through the swarm when the fleet has it
    /// (see [`crate::origin`]).
    pub async fn fetch_url(
        &self,
        request: crate::UrlFetch,
        progress: tokio::sync::watch::Sender<crate::Progress>,
    ) -> Result<crate::FetchOutcome, crate::FetchError> {
        let outcome = crate::origin::fetch_url(Arc::clone(&self.shared), request, progress).await?;
        completed(&self.shared, &outcome.blob);
        Ok(outcome)
    }

    /// A future that resolves when the node starts shutting down.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.shared.shutdown.clone().cancelled_owned()
    }

    /// Stops in order: stop accepting and cancel fetches, deregister, let
    /// streams end, close the store.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        self.shared.pool.close_all().await;
        let deadline = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = self.tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => {
                    tracing::warn!("tasks did not stop in time; aborting them");
                    self.tasks.abort_all();
                    break;
                }
            }
        }
    }
}

/// After a blob completes: compute its SHA-256 (for the `sha256:` alias) in
/// the background, then tell membership.
pub(crate) fn completed(shared: &Arc<Shared>, blob: &Arc<nebula_common::Blob>) {
    shared.inventory_changed.notify_one();
    if blob.sha256().is_some() {
        return;
    }
    let blob = Arc::clone(blob);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        match tokio::task::spawn_blocking(move || blob.compute_sha256()).await {
            Ok(Ok(_)) => shared.inventory_changed.notify_one(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot compute the SHA-256 of a fetched blob")
            }
            Err(_) => {}
        }
    });
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
