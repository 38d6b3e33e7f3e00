//! `nebula control`: flags turned into the library's `Config` and state
//! store, then the control plane served until a signal.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use nebula_common::credential::{PublicKey, SigningKey};
use nebula_control::{
    Config, ControlPlane, InventoryCaps, RedisClientCert, RedisConfig, RedisSetupError, RedisStore,
    RedisTls, StateStore,
};

use crate::{
    flags::{ServeFlags, parse_duration, parse_rate},
    output::{bad_input, shutdown_signal},
};

/// Flags of `nebula control`. Every timing and limit flag defaults to the
/// library's `Config::default()`.
#[derive(Debug, clap::Args)]
pub(crate) struct ControlArgs {
    /// Address to listen on; `127.0.0.1:0` picks a free port (printed on start).
    #[arg(long, env = "NEBULA_LISTEN", default_value = "127.0.0.1:7700")]
    listen: String,
    /// Token every peer call must carry (`authorization: Bearer <token>`).
    #[arg(long, env = "NEBULA_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Token every admin call over TCP must carry; without it the admin API is
    /// off on TCP and answers only on --admin-socket.
    #[arg(long, env = "NEBULA_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Serve the admin API on a Unix socket at this path, mode 0600 (only
    /// this user may connect; no token is asked there). Removed on exit.
    #[arg(long, env = "NEBULA_ADMIN_SOCKET", value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// A peer's lease lapses this long after its last heartbeat [default: 6s].
    #[arg(long, env = "NEBULA_LEASE_TTL", value_parser = parse_duration)]
    lease_ttl: Option<Duration>,
    /// How often peers are told to heartbeat [default: 2s].
    #[arg(long, env = "NEBULA_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// How often each peer is health-checked [default: 2s].
    #[arg(long, env = "NEBULA_PROBE_INTERVAL", value_parser = parse_duration)]
    probe_interval: Option<Duration>,
    /// Deadline of one health check [default: 1s].
    #[arg(long, env = "NEBULA_PROBE_TIMEOUT", value_parser = parse_duration)]
    probe_timeout: Option<Duration>,
    /// Consecutive failed checks that mark a peer unhealthy [default: 3].
    #[arg(long, env = "NEBULA_UNHEALTHY_AFTER")]
    unhealthy_after: Option<u32>,
    /// Consecutive passed checks that bring it back [default: 2].
    #[arg(long, env = "NEBULA_HEALTHY_AFTER")]
    healthy_after: Option<u32>,
    /// Health checks in flight at once [default: 64].
    #[arg(long, env = "NEBULA_MAX_CONCURRENT_PROBES")]
    max_concurrent_probes: Option<usize>,
    /// Providers returned when a request does not say [default: 20].
    #[arg(long, env = "NEBULA_DISCOVERY_LIMIT")]
    discovery_limit: Option<u32>,
    /// Most providers one request may get [default: 200].
    #[arg(long, env = "NEBULA_MAX_DISCOVERY_LIMIT")]
    max_discovery_limit: Option<u32>,
    /// Distinct reporters that quarantine a provider [default: 2].
    #[arg(long, env = "NEBULA_QUARANTINE_AFTER")]
    quarantine_after: Option<u32>,
    /// Server-side deadline of one call [default: 10s].
    #[arg(long, env = "NEBULA_REQUEST_TIMEOUT", value_parser = parse_duration)]
    request_timeout: Option<Duration>,
    /// Largest message, e.g. 32MiB [default: 32MiB].
    #[arg(long, env = "NEBULA_MAX_MESSAGE_SIZE", value_parser = parse_rate)]
    max_message_size: Option<u64>,
    /// Most blobs one announce may carry [default: 100000].
    #[arg(long, env = "NEBULA_MAX_ANNOUNCE_BLOBS")]
    max_announce_blobs: Option<usize>,
    /// Most blobs one peer may hold in the control plane [default: 100000].
    #[arg(long, env = "NEBULA_MAX_PEER_BLOBS")]
    max_peer_blobs: Option<u64>,
    /// Most blobs one peer may hold in part (each with a chunk bitmap) [default: 1024].
    #[arg(long, env = "NEBULA_MAX_PEER_PARTIAL")]
    max_peer_partial: Option<u64>,
    /// Most (blob, provider) entries in all [default: 20000000].
    #[arg(long, env = "NEBULA_MAX_ENTRIES")]
    max_entries: Option<u64>,
    /// HTTP/2 streams per connection [default: 1024].
    #[arg(long, env = "NEBULA_MAX_CONCURRENT_STREAMS")]
    max_concurrent_streams: Option<u32>,
    /// HTTP/2 and TCP keepalive interval [default: 30s].
    #[arg(long, env = "NEBULA_KEEPALIVE_INTERVAL", value_parser = parse_duration)]
    keepalive_interval: Option<Duration>,
    /// An unanswered keepalive closes the connection after this long [default: 10s].
    #[arg(long, env = "NEBULA_KEEPALIVE_TIMEOUT", value_parser = parse_duration)]
    keepalive_timeout: Option<Duration>,
    /// A fetch by URL uses the blob recorded for it without asking the origin
    /// for this long; later it revalidates with a conditional request [default: 10m].
    #[arg(long, env = "NEBULA_URL_TTL", value_parser = parse_duration)]
    url_ttl: Option<Duration>,
    /// Query parameters left out of a URL's identity, comma-separated, e.g. the
    /// signature of signed URLs: `X-Amz-Signature,X-Amz-Date,X-Amz-Credential`.
    #[arg(long, env = "NEBULA_URL_IGNORE_QUERY", value_delimiter = ',')]
    url_ignore_query: Vec<String>,
    /// The peer fetching a URL from its origin loses the lease this long after
    /// it last renewed it; a waiting peer then takes over [default: 6s].
    #[arg(long, env = "NEBULA_ORIGIN_LEASE_TTL", value_parser = parse_duration)]
    origin_lease_ttl: Option<Duration>,
    /// Key that signs peer credentials, made there (mode 0600) when the file
    /// does not exist; give every replica the same file [default: a key made
    /// at start, so credentials lapse on restart].
    #[arg(long, env = "NEBULA_SIGNING_KEY", value_name = "FILE")]
    signing_key: Option<PathBuf>,
    /// A previous key (its file, or its public key's 64 hex digits in a file)
    /// whose credentials are still accepted during a rotation; repeatable.
    #[arg(
        long = "verify-key",
        env = "NEBULA_VERIFY_KEYS",
        value_name = "FILE",
        value_delimiter = ','
    )]
    verify_keys: Vec<PathBuf>,
    /// How long a peer credential is valid; heartbeats renew it [default: 15m].
    #[arg(long, env = "NEBULA_CREDENTIAL_TTL", value_parser = parse_duration)]
    credential_ttl: Option<Duration>,
    /// Accept registrations whose address is not the caller's own IP (peers
    /// behind NAT or a proxy).
    #[arg(long, env = "NEBULA_ALLOW_FOREIGN_ADDRESSES")]
    allow_foreign_addresses: bool,
    /// Registrations one source IP may make per minute [default: 600].
    #[arg(long, env = "NEBULA_REGISTRATIONS_PER_MINUTE")]
    registrations_per_minute: Option<u32>,
    /// Reports one peer may file per minute [default: 60].
    #[arg(long, env = "NEBULA_REPORTS_PER_MINUTE")]
    reports_per_minute: Option<u32>,
    /// A report counts only from a peer discovery sent to the provider within
    /// this long [default: 10m].
    #[arg(long, env = "NEBULA_REPORT_WINDOW", value_parser = parse_duration)]
    report_window: Option<Duration>,
    /// A quarantine lapses this long after the last report unless renewed by
    /// another [default: 1h].
    #[arg(long, env = "NEBULA_QUARANTINE_TTL", value_parser = parse_duration)]
    quarantine_ttl: Option<Duration>,
    #[command(flatten)]
    pub(crate) serve: ServeFlags,
    /// Where the state lives: `memory` (this process only), or Redis, shared
    /// by every replica given the same URL: `redis://HOST:PORT[/DB]`,
    /// `rediss://HOST:PORT[/DB]` (TLS) or
    /// `redis+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]` (the primary
    /// that Sentinel names, followed across failovers).
    #[arg(
        long,
        env = "NEBULA_STATE",
        default_value = "memory",
        hide_env_values = true
    )]
    state: String,
    /// CA certificates (PEM) trusted for `rediss://` instead of the system's roots.
    #[arg(long, env = "NEBULA_STATE_CA", value_name = "PEM")]
    state_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a Redis that asks for one; with --state-key.
    #[arg(
        long,
        env = "NEBULA_STATE_CERT",
        value_name = "PEM",
        requires = "state_key"
    )]
    state_cert: Option<PathBuf>,
    /// Private key (PEM) of --state-cert.
    #[arg(
        long,
        env = "NEBULA_STATE_KEY",
        value_name = "PEM",
        requires = "state_cert"
    )]
    state_key: Option<PathBuf>,
    /// Deadline of one call to Redis; past it the call answers UNAVAILABLE [default: 1s].
    #[arg(long, env = "NEBULA_STATE_TIMEOUT", value_parser = parse_duration)]
    state_timeout: Option<Duration>,
}

/// Where `nebula control` keeps its state.
#[derive(Debug)]
enum State {
    Memory,
    Redis(Box<RedisConfig>),
}

impl ControlArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let d = Config::default();
        let max_message_size = match self.max_message_size {
            Some(n) => {
                usize::try_from(n).map_err(|_| bad_input("--max-message-size is too large"))?
            }
            None => d.max_message_size,
        };
        let config = Config {
            lease_ttl: self.lease_ttl.unwrap_or(d.lease_ttl),
            heartbeat_interval: self.heartbeat_interval.unwrap_or(d.heartbeat_interval),
            probe_interval: self.probe_interval.unwrap_or(d.probe_interval),
            probe_timeout: self.probe_timeout.unwrap_or(d.probe_timeout),
            unhealthy_after: self.unhealthy_after.unwrap_or(d.unhealthy_after),
            healthy_after: self.healthy_after.unwrap_or(d.healthy_after),
            max_concurrent_probes: self
                .max_concurrent_probes
                .unwrap_or(d.max_concurrent_probes),
            default_discovery_limit: self.discovery_limit.unwrap_or(d.default_discovery_limit),
            max_discovery_limit: self.max_discovery_limit.unwrap_or(d.max_discovery_limit),
            quarantine_after: self.quarantine_after.unwrap_or(d.quarantine_after),
            join_token: self.join_token.clone(),
            admin_token: self.admin_token.clone(),
            request_timeout: self.request_timeout.unwrap_or(d.request_timeout),
            max_message_size,
            max_announce_blobs: self.max_announce_blobs.unwrap_or(d.max_announce_blobs),
            inventory_caps: InventoryCaps {
                peer_blobs: self.max_peer_blobs.unwrap_or(d.inventory_caps.peer_blobs),
                peer_partial: self
                    .max_peer_partial
                    .unwrap_or(d.inventory_caps.peer_partial),
                entries: self.max_entries.unwrap_or(d.inventory_caps.entries),
            },
            max_concurrent_streams: self
                .max_concurrent_streams
                .unwrap_or(d.max_concurrent_streams),
            max_local_error_reset_streams: d.max_local_error_reset_streams,
            keepalive_interval: self.keepalive_interval.unwrap_or(d.keepalive_interval),
            keepalive_timeout: self.keepalive_timeout.unwrap_or(d.keepalive_timeout),
            store_check_interval: d.store_check_interval,
            url_ttl: self.url_ttl.unwrap_or(d.url_ttl),
            url_ignore_query: self
                .url_ignore_query
                .iter()
                .map(|q| q.trim().to_owned())
                .filter(|q| !q.is_empty())
                .collect(),
            origin_lease_ttl: self.origin_lease_ttl.unwrap_or(d.origin_lease_ttl),
            handshake_timeout: self.serve.handshake_timeout,
            idle_timeout: self.serve.idle_timeout,
            connections_per_address: self.serve.connections_per_address as usize,
            tls: self.serve.tls.load()?,
            signing_key: match &self.signing_key {
                Some(path) => Some(Arc::new(
                    SigningKey::load_or_create(path)
                        .map_err(|e| bad_input(format!("--signing-key: {e}")))?,
                )),
                None => None,
            },
            verify_keys: self
                .verify_keys
                .iter()
                .map(|path| {
                    PublicKey::read(path).map_err(|e| bad_input(format!("--verify-key: {e}")))
                })
                .collect::<anyhow::Result<_>>()?,
            credential_ttl: self.credential_ttl.unwrap_or(d.credential_ttl),
            allow_foreign_addresses: self.allow_foreign_addresses,
            registrations_per_minute: self
                .registrations_per_minute
                .unwrap_or(d.registrations_per_minute),
            reports_per_minute: self.reports_per_minute.unwrap_or(d.reports_per_minute),
            report_window: self.report_window.unwrap_or(d.report_window),
            quarantine_ttl: self.quarantine_ttl.unwrap_or(d.quarantine_ttl),
        };
        config.validate().map_err(|e| bad_input(e.to_string()))?;
        Ok(config)
    }

    fn state(&self) -> anyhow::Result<State> {
        if self.state == "memory" {
            return Ok(State::Memory);
        }
        let mut redis =
            RedisConfig::new(&self.state).map_err(|e| bad_input(format!("--state: {e}")))?;
        redis.tls = RedisTls {
            ca: self.state_ca.as_deref().map(read_pem).transpose()?,
            client: match (&self.state_cert, &self.state_key) {
                (Some(cert), Some(key)) => Some(RedisClientCert {
                    cert: read_pem(cert)?,
                    key: read_pem(key)?,
                }),
                _ => None,
            },
        };
        redis
            .check()
            .map_err(|e| bad_input(format!("--state: {e}")))?;
        if let Some(t) = self.state_timeout {
            if t.is_zero() {
                return Err(bad_input("--state-timeout must be longer than zero"));
            }
            redis.op_timeout = t;
        }
        Ok(State::Redis(Box::new(redis)))
    }
}

/// A PEM file named by a flag; unreadable is bad input (exit 2).
fn read_pem(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| bad_input(format!("cannot read {}: {e}", path.display())))
}

pub(crate) async fn run_control(args: ControlArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let state = args.state()?;
    if matches!(state, State::Redis(_)) && args.signing_key.is_none() {
        return Err(bad_input(
            "--state: replicas must sign peer credentials with one key: give each the same --signing-key FILE",
        ));
    }
    // Watched before the address is printed: whoever reads it may signal at once.
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let http = args.serve.bind_http().await?;
    // Bound before the address is printed: whoever reads it may call at once.
    let admin_socket = match &args.admin_socket {
        Some(path) => Some(
            nebula_proto::unix::bind_private(path)
                .await
                .with_context(|| format!("cannot bind --admin-socket {}", path.display()))?,
        ),
        None => None,
    };
    let listeners = Listeners { http, admin_socket };
    match state {
        State::Memory => {
            let control = ControlPlane::spawn(listener, config)
                .await
                .context("cannot start the control plane")?;
            serve_until_signal(control, listeners, shutdown).await
        }
        State::Redis(mut redis) => {
            redis.caps = config.inventory_caps;
            let store = RedisStore::new(*redis).context("cannot use the Redis store")?;
            // A Redis that is down may come up later; one that refuses our
            // TLS or credentials will not: stop now, in one line (exit 1).
            store.check_setup().await.map_err(|e| match e {
                RedisSetupError::Tls { .. } => anyhow::anyhow!(
                    "--state: {e} (is --state-ca the CA that signed Redis's certificate?)"
                ),
                _ => anyhow::anyhow!("--state: {e}"),
            })?;
            let control = ControlPlane::spawn_with_store(listener, config, store)
                .await
                .context("cannot start the control plane")?;
            serve_until_signal(control, listeners, shutdown).await
        }
    }
}

/// The control plane's listeners besides its gRPC port.
#[derive(Debug)]
struct Listeners {
    http: Option<tokio::net::TcpListener>,
    admin_socket: Option<(tokio::net::UnixListener, nebula_proto::unix::SocketFile)>,
}

async fn serve_until_signal<S: StateStore>(
    mut control: ControlPlane<S>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if let Some((listener, socket)) = listeners.admin_socket {
        control.serve_admin_socket(listener, socket);
    }
    // Tests and scripts read the ports from these lines.
    println!("listening on {}", control.local_addr());
    if let Some(http) = listeners.http {
        let addr = http.local_addr().context("--http-listen")?;
        control.serve_http(http);
        println!("http on {addr}");
    }
    let _ = std::io::stdout().flush();
    tokio::select! {
        () = shutdown => tracing::info!("signal received; shutting down"),
        () = control.stopped() => {}
    }
    control.shutdown().await.context("control plane failed")
}
