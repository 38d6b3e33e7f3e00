//! Serving: [`ControlPlane::spawn`] starts the gRPC server, the lease sweeper
//! and the health prober under one [`CancellationToken`]; [`serve`] runs one
//! until a shutdown future resolves. [`ControlPlane::serve_admin_socket`] adds
//! the admin API on a Unix socket, [`ControlPlane::serve_http`] the HTTP side.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use nebula_proto::v1::{admin_server::AdminServer, control_plane_server::ControlPlaneServer};
use tokio::{
    net::{TcpListener, UnixListener},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tonic::{service::interceptor::InterceptedService, transport::Server};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    admin::AdminService,
    auth::{AdminAuth, JoinAuth},
    config::{Config, ConfigError},
    health::{GrpcHealthCheck, Prober},
    identity::PeerAuth,
    metrics::RpcMetricsLayer,
    registry::Registry,
    service::ControlPlaneService,
    store::{MemoryStore, RedisConfig, RedisStore, StateStore, StoreError},
};

/// Why the control plane could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The listener's address cannot be read.
    #[error("listener: {0}")]
    Listener(#[source] io::Error),
    /// The reflection service could not be built from the descriptors.
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS settings cannot serve.
    #[error("TLS: {0}")]
    Tls(#[from] nebula_proto::tls::TlsError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The HTTP endpoint (`--http-listen`) failed.
    #[error("HTTP endpoint: {0}")]
    Http(#[source] io::Error),
    /// The state store cannot be set up.
    #[error("state store: {0}")]
    Store(#[source] StoreError),
    /// A background task panicked.
    #[error("control-plane task panicked: {0}")]
    Panicked(String),
}

/// The gRPC service names this server reports in `grpc.health.v1`.
const SERVICES: [&str; 2] = ["nebula.v1.ControlPlane", "nebula.v1.Admin"];

/// A running control plane. Dropping it aborts every task at once; call
/// [`ControlPlane::shutdown`] to stop in order.
#[must_use = "dropping the handle aborts the control plane; call shutdown()"]
#[derive(Debug)]
pub struct ControlPlane<S = MemoryStore> {
    local_addr: SocketAddr,
    registry: Arc<Registry<S>>,
    health: HealthReporter,
    cancel: CancellationToken,
    tasks: JoinSet<Result<(), ServeError>>,
    grace: Duration,
    /// Guards the HTTP endpoint's JSON as the admin API is guarded on TCP.
    admin_auth: AdminAuth,
    /// Message size limit and call deadline, for the services added after spawn.
    max_message_size: usize,
    request_timeout: Duration,
    /// The gRPC server's TLS, which the HTTP endpoint serves with too.
    tls: Option<nebula_proto::tls::TlsConfig>,
}

impl ControlPlane<RedisStore> {
    /// Starts a control plane whose state lives in Redis, so several replicas
    /// on the same Redis are one service.
    pub async fn spawn_redis(
        listener: TcpListener,
        config: Config,
        mut redis: RedisConfig,
    ) -> Result<Self, ServeError> {
        redis.caps = config.inventory_caps;
        let store = RedisStore::new(redis).map_err(ServeError::Store)?;
        Self::spawn_with_store(listener, config, store).await
    }
}

impl ControlPlane<MemoryStore> {
    /// Starts a control plane with the in-memory store on an already-bound
    /// listener. Must be called inside a Tokio runtime.
    pub async fn spawn(listener: TcpListener, config: Config) -> Result<Self, ServeError> {
        let store = MemoryStore::with_caps(config.inventory_caps);
        Self::spawn_with_store(listener, config, store).await
    }
}

impl<S: StateStore> ControlPlane<S> {
    /// Starts a control plane over `store` on an already-bound listener.
    pub async fn spawn_with_store(
        listener: TcpListener,
        config: Config,
        store: S,
    ) -> Result<Self, ServeError> {
        config.validate()?;
        let local_addr = listener.local_addr().map_err(ServeError::Listener)?;
        let registry = Arc::new(Registry::new(store, &config));

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in SERVICES {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(nebula_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // The descriptor set also holds the peers' services; list only ours.
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection");
        let reflection = SERVICES
            .into_iter()
            .fold(reflection, |b, name| b.with_service_name(name))
            .build_v1()?;
        let max = config.max_message_size;
        let control = InterceptedService::new(
            ControlPlaneServer::new(ControlPlaneService::new(registry.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            PeerAuth::new(
                JoinAuth::new(config.join_token.as_deref()),
                Arc::clone(registry.identity()),
            ),
        );
        let admin = InterceptedService::new(
            AdminServer::new(AdminService::new(registry.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            AdminAuth::new(config.admin_token.as_deref()),
        );
        let mut server = Server::builder();
        if let Some(tls) = &config.tls {
            server = server.tls_config(tls.server_config()?)?;
        }
        // The builder's `tcp_nodelay`/`tcp_keepalive` apply only to listeners
        // tonic binds itself; accepted sockets get them here (without NODELAY,
        // Nagle and delayed ACKs hold small answers back for milliseconds),
        // accept backs off when out of descriptors, and a connection silent
        // past the handshake timeout, or without a call past the idle timeout, is
        // closed (the `calls` layer tells it when calls open and close).
        let (incoming, calls) = nebula_proto::incoming::incoming(
            listener,
            nebula_proto::incoming::IncomingOptions {
                handshake_timeout: config.handshake_timeout,
                idle_timeout: config.idle_timeout,
                per_address: config.connections_per_address,
                keepalive: config.keepalive_interval,
            },
        );
        let router = server
            .layer(calls)
            .layer(RpcMetricsLayer(Arc::clone(registry.metrics())))
            .timeout(config.request_timeout)
            .max_concurrent_streams(config.max_concurrent_streams)
            .http2_max_local_error_reset_streams(Some(config.max_local_error_reset_streams))
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(control)
            .add_service(admin);

        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let stop = cancel.clone();
        tasks.spawn(async move {
            // However the server ends, the sweeper and prober end with it.
            let _stop_siblings = stop.clone().drop_guard();
            router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await?;
            Ok(())
        });
        // Replicas sharing a store tell themselves apart by address and a
        // random suffix (a restarted replica is a new one).
        let replica: Arc<str> =
            Arc::from(format!("{local_addr}/{:08x}", rand::random::<u32>()).as_str());
        tasks.spawn(sweep(
            registry.clone(),
            config.lease_ttl / 4,
            replica.clone(),
            cancel.clone(),
        ));
        tasks.spawn(watch_store(
            registry.clone(),
            health.clone(),
            config.store_check_interval,
            cancel.clone(),
        ));
        let prober = Prober::new(
            registry.clone(),
            GrpcHealthCheck::new(config.probe_timeout).with_tls(config.tls.clone()),
            &config,
        )
        .with_replica(replica.clone());
        let stop = cancel.clone();
        tasks.spawn(async move {
            prober.run(stop).await;
            Ok(())
        });
        tracing::info!(%local_addr, %replica, ?config, "control plane serving");
        if config.join_token.is_none() {
            tracing::warn!(
                "open cluster: no join token is set, so anyone who reaches this control plane can join the fleet and fetch its blobs (set --join-token)"
            );
        }
        Ok(Self {
            local_addr,
            registry,
            health,
            cancel,
            tasks,
            grace: config.request_timeout + Duration::from_secs(1),
            admin_auth: AdminAuth::new(config.admin_token.as_deref()),
            max_message_size: config.max_message_size,
            request_timeout: config.request_timeout,
            tls: config.tls.clone(),
        })
    }

    /// Serves the `Admin` service on a Unix socket (`--admin-socket`), with no
    /// token check: bind `listener` with [`nebula_proto::unix::bind_private`],
    /// whose mode 0600 lets only this user in. The socket file is removed
    /// when the control plane stops.
    pub fn serve_admin_socket(
        &mut self,
        listener: UnixListener,
        socket: nebula_proto::unix::SocketFile,
    ) {
        let max = self.max_message_size;
        let admin = AdminServer::new(AdminService::new(Arc::clone(&self.registry)))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let router = Server::builder()
            .layer(RpcMetricsLayer(Arc::clone(self.registry.metrics())))
            .timeout(self.request_timeout)
            .add_service(admin);
        let stop = self.cancel.clone();
        tracing::info!(path = %socket.path().display(), "admin API on its socket");
        self.tasks.spawn(async move {
            // However the socket's server ends, the control plane ends with it.
            let _stop_siblings = stop.clone().drop_guard();
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let served = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
            socket.remove();
            served?;
            Ok(())
        });
    }

    /// Serves `/metrics`, `/healthz`, `/readyz` and the live page over HTTP
    /// on `listener` (the control plane's `--http-listen`), guarded by the
    /// admin token as the admin API is; HTTPS when the gRPC server has TLS.
    pub fn serve_http(&mut self, listener: TcpListener) {
        let router = crate::http::router(Arc::clone(&self.registry), self.admin_auth.clone());
        let stop = self.cancel.clone();
        let tls = self.tls.clone();
        self.tasks.spawn(async move {
            // However the endpoint ends, the control plane ends with it.
            let _stop_siblings = stop.clone().drop_guard();
            crate::http::serve(listener, router, tls.as_ref(), stop)
                .await
                .map_err(ServeError::Http)
        });
    }

    /// The address it listens on (the port chosen when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The registry, for in-process callers (tests, the demo, stats).
    pub fn registry(&self) -> &Arc<Registry<S>> {
        &self.registry
    }

    /// Resolves when the control plane stopped by itself (its server failed)
    /// or was told to stop.
    pub async fn stopped(&self) {
        self.cancel.cancelled().await;
    }

    /// Stops in order: reports NOT_SERVING, stops accepting, lets calls in
    /// flight finish (at most the request timeout), then stops the sweeper
    /// and prober. Returns the server's error, if it failed.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        for name in SERVICES.into_iter().chain([""]) {
            self.health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        self.cancel.cancel();
        let mut result = Ok(());
        let joined = tokio::time::timeout(self.grace, async {
            while let Some(joined) = self.tasks.join_next().await {
                let outcome = joined.unwrap_or_else(|e| Err(ServeError::Panicked(e.to_string())));
                if let Err(err) = outcome
                    && result.is_ok()
                {
                    result = Err(err);
                }
            }
        })
        .await;
        if joined.is_err() {
            tracing::warn!("calls still in flight after the grace period; aborting them");
            self.tasks.shutdown().await;
        }
        tracing::info!(local_addr = %self.local_addr, "control plane stopped");
        result
    }
}

/// Removes lapsed peers and their announcements. Answers never depend on it
/// (a lapsed lease is filtered out at once); it reclaims the memory. Among
/// replicas sharing a store, the one holding the `sweep` lock sweeps.
async fn sweep<S: StateStore>(
    registry: Arc<Registry<S>>,
    every: Duration,
    replica: Arc<str>,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let every = every.max(Duration::from_millis(50));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        // Held for three rounds: another replica takes over that soon after
        // this one dies.
        match registry.store().lock("sweep", &replica, every * 3).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(err) => {
                tracing::debug!(error = %err, "cannot take the sweep lock");
                continue;
            }
        }
        if let Err(err) = registry.expire().await {
            tracing::debug!(error = %err, "lease sweep failed");
        }
    }
}

/// Reports NOT_SERVING on the gRPC health service while the store does not
/// answer, SERVING again once it does.
async fn watch_store<S: StateStore>(
    registry: Arc<Registry<S>>,
    health: HealthReporter,
    every: Duration,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(50)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = true;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let ready = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = registry.store().ready() => r,
        };
        if ready.is_ok() == serving {
            continue;
        }
        serving = ready.is_ok();
        let status = if serving {
            tracing::info!("state store answers; serving");
            ServingStatus::Serving
        } else {
            tracing::warn!("state store unavailable; reporting NOT_SERVING");
            ServingStatus::NotServing
        };
        for name in SERVICES.into_iter().chain([""]) {
            health.set_service_status(name, status).await;
        }
    }
}

/// Runs a control plane with the in-memory store on `listener` until
/// `shutdown` resolves (or the server fails), then stops it in order.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let control = ControlPlane::spawn(listener, config).await?;
    tokio::select! {
        () = shutdown => tracing::info!("shutdown requested"),
        () = control.stopped() => {}
    }
    control.shutdown().await
}

#[cfg(test)]
mod tests;
