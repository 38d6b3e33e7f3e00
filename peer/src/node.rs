//! A running peer, the composition root: builds the parts (the store, the
//! uploads and the serving side, the downloads and the dialing side,
//! membership, the local API, the HTTP endpoint, the registry mirror) from
//! one `Config`, each from the handles it needs, runs them under one
//! cancellation token and stops them in order. No other module imports this
//! one.

use std::{net::SocketAddr, sync::Arc};

use futures::FutureExt as _;
use nebula_common::{Store, StoreError};
use nebula_proto::{incoming::CallsLayer, v1::peer_exchange_server::PeerExchangeServer};
use tokio::{
    net::{TcpListener, UnixListener},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::{service::interceptor::InterceptedService, transport::Server};
use tower::layer::util::Stack;

use crate::{
    Config, ConfigError, Fetcher,
    control::ControlClient,
    endpoint::{self, Endpoint},
    events::Events,
    exchange::{
        CONNECTION_WINDOW, MAX_FRAME, MAX_MESSAGE, STREAM_WINDOW,
        dial::Dialer,
        serve::{ExchangeService, Serving},
    },
    fetch::Downloads,
    identity::{ExchangeAuth, Identity},
    local::LocalService,
    membership::{self, Membership},
    metrics::Metrics,
    origin::{OriginClient, Origins},
    sessions::Sessions,
    tasks::Tasks,
    uploads::Uploads,
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

/// The peer server's routes, behind the layer that counts each connection's calls.
type PeerRouter = tonic::transport::server::Router<Stack<CallsLayer, tower::layer::util::Identity>>;

/// A running peer node. Shut it down with [`Node::shutdown`].
#[derive(Debug)]
#[must_use = "a node stops when shut down; dropping the handle leaves it running until the runtime ends"]
pub struct Node {
    config: Arc<Config>,
    store: Arc<Store>,
    peer_id: String,
    /// The address announced to other peers.
    address: String,
    /// Cancelled when the node stops, told to or because a part failed.
    shutdown: CancellationToken,
    /// Every part's background work, joined at shutdown.
    tasks: Tasks,
    /// The exchange streams to other peers, closed first at shutdown.
    dialer: Dialer,
    metrics: Arc<Metrics>,
    events: Arc<Events>,
    /// The one way to fetch a blob or a URL.
    fetcher: Fetcher,
    uploads: Arc<Uploads>,
    membership: membership::Status,
    started: Instant,
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
        let address = config.advertise.unwrap_or(local_addr).to_string();
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
        let config = Arc::new(config);
        let store = Arc::new(store);
        let peer_id = store.peer_id().to_owned();
        let (shutdown, tasks) = (CancellationToken::new(), Tasks::new());
        let metrics = Arc::new(Metrics::default());
        let events = Arc::new(Events::default());
        let sessions = Sessions::default();
        let uploads = Arc::new(Uploads::new(&config));
        let dialer = Dialer::new(
            &peer_id,
            &address,
            Arc::clone(&identity),
            Arc::clone(&config),
            tasks.clone(),
        );
        let downloads = Arc::new(Downloads::new(
            Arc::clone(&config),
            Arc::clone(&store),
            control.clone(),
            dialer.clone(),
            Arc::clone(&events),
            Arc::clone(&metrics),
            shutdown.clone(),
            tasks.clone(),
        ));
        let origins = Arc::new(Origins::new(
            Arc::clone(&downloads),
            origin,
            sessions.clone(),
            address.clone(),
        ));
        let serving = Serving {
            config: Arc::clone(&config),
            store: Arc::clone(&store),
            uploads: Arc::clone(&uploads),
            events: Arc::clone(&events),
            sessions,
            metrics: Arc::clone(&metrics),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        };
        let mut node = Self {
            config: Arc::clone(&config),
            store: Arc::clone(&store),
            peer_id: peer_id.clone(),
            address: address.clone(),
            shutdown: shutdown.clone(),
            tasks,
            dialer,
            metrics,
            events: Arc::clone(&events),
            fetcher: Fetcher::new(downloads, origins),
            uploads: Arc::clone(&uploads),
            membership: membership::Status::default(),
            started: Instant::now(),
            parts: JoinSet::new(),
            local_addr,
        };
        // Accepted sockets get TCP_NODELAY there (the builder's flag only
        // reaches listeners tonic binds itself; Nagle plus delayed ACKs would
        // stall every pipelined piece by tens of milliseconds), accept backs
        // off when out of descriptors, one address holds a bounded number of
        // connections, and silent or idle ones are closed (the `calls` layer
        // tells them when calls open and close).
        let (incoming, calls) = nebula_proto::incoming::incoming(
            listener,
            nebula_proto::incoming::IncomingOptions {
                handshake_timeout: config.handshake_timeout,
                idle_timeout: config.idle_timeout,
                per_address: config.connections_per_address,
                keepalive: config.tcp_keepalive,
            },
        );
        let router = peer_router(&config, &peer_id, &identity, serving, calls).await?;
        let incoming = crate::fault::peer_incoming(incoming);
        let stop = shutdown.clone();
        node.spawn_part(Part::PeerServer, async move {
            router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
                .map_err(Failure::from)
        });
        if let Some(control) = control {
            let membership = Membership {
                config,
                store,
                peer_id,
                address,
                control,
                identity,
                uploads,
                events,
                status: node.membership.clone(),
                shutdown,
            };
            node.spawn_part(Part::Membership, async move {
                membership::run(membership).await;
                Ok(())
            });
        }
        tracing::info!(peer = %node.peer_id(), address = %node.advertised(), "peer serving");
        Ok(node)
    }

    /// Runs `part` until it ends. A part that fails, panics, or (a server)
    /// stops while the node is not stopping, stops the node.
    fn spawn_part<F>(&mut self, part: Part, run: F)
    where
        F: std::future::Future<Output = Result<(), Failure>> + Send + 'static,
    {
        let stop = self.shutdown.clone();
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
        let service = LocalService::new(
            self.fetcher(),
            Arc::clone(&self.store),
            Arc::clone(&self.events),
            self.tasks.clone(),
            Arc::clone(&self.config),
            self.address.clone(),
            self.membership.clone(),
            Arc::clone(&self.uploads),
            self.started,
        )
        .into_server();
        let stop = self.shutdown.clone();
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
        let endpoint = Endpoint {
            metrics: Arc::clone(&self.metrics),
            store: Arc::clone(&self.store),
            uploads: Arc::clone(&self.uploads),
            dialer: self.dialer.clone(),
            membership: self
                .config
                .control
                .is_some()
                .then(|| self.membership.clone()),
            tls: self.config.tls.clone(),
        };
        let stop = self.shutdown.clone();
        self.spawn_part(Part::Http, async move {
            endpoint::serve(listener, endpoint, stop)
                .await
                .map_err(Failure::from)
        });
    }

    /// Serves the registry mirror (`--registry-mirror`) on `listener`.
    pub fn serve_mirror(&mut self, listener: TcpListener, config: crate::MirrorConfig) {
        let mirror = crate::mirror::Mirror::new(
            self.fetcher(),
            Arc::clone(&self.store),
            Arc::clone(&self.config),
            Arc::clone(&self.metrics),
            self.tasks.clone(),
            config,
        );
        let stop = self.shutdown.clone();
        self.spawn_part(Part::Mirror, async move {
            crate::mirror::serve(listener, mirror?, stop)
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
        &self.address
    }

    /// The stable peer id.
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// The node's store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Whether the control plane has accepted the node's registration.
    pub fn is_registered(&self) -> bool {
        self.membership.is_registered()
    }

    /// The node's downloader: the one way to fetch a blob or a URL.
    pub fn fetcher(&self) -> Fetcher {
        self.fetcher.clone()
    }

    /// A future that resolves when the node starts shutting down, told to
    /// or because a part failed.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.shutdown.clone().cancelled_owned()
    }

    /// Stops in order: stop accepting and cancel fetches, deregister, let
    /// streams finish (within [`Config::shutdown_grace`]), await every task,
    /// then release the store. Returns the failure of the part that stopped
    /// the node, if one did.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        self.shutdown.cancel();
        self.dialer.close_all().await;
        let grace = self.config.shutdown_grace;
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
        let dropped = self.tasks.wait(left).await;
        if dropped > 0 {
            tracing::warn!(
                tasks = dropped,
                "tasks still running after the grace period were dropped"
            );
        }
        tracing::info!(peer = %self.peer_id, "node stopped");
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The peer server: health, reflection and `PeerExchange` (built from
/// `serving`), behind the credential check, with the configured HTTP/2 limits.
async fn peer_router(
    config: &Config,
    peer_id: &str,
    identity: &Arc<Identity>,
    serving: Serving,
    calls: CallsLayer,
) -> Result<PeerRouter, StartError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PeerExchangeServer<ExchangeService>>()
        .await;
    // What the control plane's probe asks: only this peer answers for its id.
    health
        .set_service_status(
            format!("nebula.peer.{peer_id}"),
            tonic_health::ServingStatus::Serving,
        )
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nebula_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let exchange = InterceptedService::new(
        PeerExchangeServer::new(ExchangeService::new(serving))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        ExchangeAuth(Arc::clone(identity)),
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

#[cfg(test)]
impl Node {
    /// Trusts credentials signed by `key`, as if a control plane had handed
    /// it out (for tests of a node without one).
    pub(crate) fn trust(&self, key: &nebula_common::credential::PublicKey) {
        self.dialer
            .identity()
            .update("", &[bytes::Bytes::copy_from_slice(key.as_bytes())]);
    }
}
