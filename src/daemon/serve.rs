//! `nebula daemon`: flags turned into the peer's `Config`, then the node run until a signal.

use std::{io::Write, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, anyhow};
use nebula_peer::{Config, Credentials, MirrorConfig, Node};

use super::default_store;
use crate::{
    flags::{ServeFlags, check_control_tls, parse_control_url, parse_duration, parse_rate},
    output::{bad_input, shutdown_signal},
};

/// Flags of `nebula daemon`.
#[derive(Debug, clap::Args)]
pub(crate) struct DaemonArgs {
    /// Store directory [default: $XDG_DATA_HOME/nebula or ~/.local/share/nebula].
    #[arg(long, env = "NEBULA_STORE")]
    store: Option<PathBuf>,
    /// Control plane URL; several replicas as `URL,URL,…` (the next one is
    /// used when one stops answering).
    #[arg(long, env = "NEBULA_CONTROL", default_value = "http://127.0.0.1:7700", value_parser = parse_control_url)]
    control: String,
    /// Address to serve peers on, `HOST:PORT` (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "NEBULA_LISTEN", default_value = "127.0.0.1:7701")]
    listen: String,
    /// Address other peers should dial, `HOST:PORT`, resolved once at start
    /// [default: the listening address].
    #[arg(long, env = "NEBULA_ADVERTISE")]
    advertise: Option<String>,
    /// The local API socket [default: <store>/nebula.sock].
    #[arg(long, env = "NEBULA_SOCKET")]
    socket: Option<PathBuf>,
    /// Upload rate limit, e.g. 20MiB/s (0: none).
    #[arg(long, env = "NEBULA_UPLOAD_LIMIT", value_parser = parse_rate)]
    upload_limit: Option<u64>,
    /// Download rate limit, e.g. 50MiB/s (0: none).
    #[arg(long, env = "NEBULA_DOWNLOAD_LIMIT", value_parser = parse_rate)]
    download_limit: Option<u64>,
    /// Zone label, to prefer providers in the same zone.
    #[arg(long, env = "NEBULA_ZONE", default_value = "")]
    zone: String,
    /// Join token the control plane requires.
    #[arg(long, env = "NEBULA_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Chunk requests served at once before answering busy.
    #[arg(long, env = "NEBULA_UPLOAD_SLOTS", default_value_t = 64)]
    upload_slots: u32,
    /// Providers one download uses at once.
    #[arg(long, env = "NEBULA_MAX_PROVIDERS", default_value_t = 8)]
    max_providers: usize,
    /// A fetch fails after this long without any provider.
    #[arg(long, env = "NEBULA_NO_PROVIDER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    no_provider_timeout: Duration,
    #[command(flatten)]
    origin: OriginFlags,
    #[command(flatten)]
    mirror: MirrorFlags,
    #[command(flatten)]
    pub(crate) serve: ServeFlags,
}

/// The registry mirror of `nebula daemon`.
#[derive(Debug, Clone, clap::Args)]
struct MirrorFlags {
    /// Serve a registry mirror (the pull side of the OCI distribution API,
    /// plain HTTP) on `HOST:PORT`, for containerd and Docker.
    #[arg(long, env = "NEBULA_REGISTRY_MIRROR", value_name = "HOST:PORT")]
    registry_mirror: Option<String>,
    /// The registry pulled from when the client does not name one (containerd
    /// names it with `?ns=`).
    #[arg(
        long,
        env = "NEBULA_MIRROR_UPSTREAM",
        value_name = "URL",
        default_value = "https://registry-1.docker.io"
    )]
    mirror_upstream: String,
    /// A Docker `config.json` whose `auths` hold registry credentials (never
    /// sent to peers).
    #[arg(long, env = "NEBULA_MIRROR_AUTH", value_name = "FILE")]
    mirror_auth: Option<PathBuf>,
    /// How long a manifest by tag is reused before the registry is asked
    /// again (0: every time).
    #[arg(long, env = "NEBULA_MIRROR_TAG_TTL", default_value = "0s", value_parser = parse_duration)]
    mirror_tag_ttl: Duration,
}

impl MirrorFlags {
    /// The mirror's settings, when one is asked for; bad input exits 2.
    fn config(&self) -> anyhow::Result<Option<MirrorConfig>> {
        if self.registry_mirror.is_none() {
            return Ok(None);
        }
        let mut config = MirrorConfig::new();
        config.upstream = MirrorConfig::parse_upstream(&self.mirror_upstream)
            .map_err(|e| bad_input(format!("--mirror-upstream: {e}")))?;
        config.tag_ttl = self.mirror_tag_ttl;
        if let Some(path) = &self.mirror_auth {
            let json = std::fs::read(path)
                .map_err(|e| bad_input(format!("--mirror-auth {}: {e}", path.display())))?;
            config.credentials = Credentials::from_docker_config(&json)
                .map_err(|e| bad_input(format!("--mirror-auth {}: {e}", path.display())))?;
        }
        Ok(Some(config))
    }
}

/// How the daemon (or a one-shot fetch) talks to HTTP origins.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct OriginFlags {
    /// Range requests one origin download makes at once.
    #[arg(long, env = "NEBULA_ORIGIN_CONNECTIONS", default_value_t = 4)]
    origin_connections: usize,
    /// An origin that takes longer than this to connect or to send more bytes
    /// fails the request (a broken range is resumed).
    #[arg(long, env = "NEBULA_ORIGIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    origin_timeout: Duration,
    /// CA certificates (PEM) trusted for https origins, beside the system's.
    #[arg(long, env = "NEBULA_ORIGIN_CA")]
    origin_ca: Option<PathBuf>,
}

impl OriginFlags {
    pub(super) fn apply(&self, config: &mut Config) -> anyhow::Result<()> {
        config.origin_connections = self.origin_connections;
        config.origin_timeout = self.origin_timeout;
        config.origin_ca = match &self.origin_ca {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| bad_input(format!("--origin-ca {}: {e}", path.display())))?,
            ),
            None => None,
        };
        Ok(())
    }
}

/// Resolves `HOST:PORT` (a host name or an address) to its first address.
async fn resolve(addr: &str, flag: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    if addr
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        return Err(bad_input(format!("{flag} {addr:?}: expected HOST:PORT")));
    }
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {flag} {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve {flag} {addr}: no address"))
}

/// Binds a listener on `HOST:PORT` (a host name is resolved, its first
/// address that binds is used).
pub(super) async fn bind(addr: &str, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    if addr
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        return Err(bad_input(format!("{flag} {addr:?}: expected HOST:PORT")));
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

pub(crate) async fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let store = args.store.clone().unwrap_or_else(default_store);
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| store.join("nebula.sock"));
    let mut config = Config::new(&store, Some(args.control.clone()));
    config.advertise = match &args.advertise {
        Some(a) => Some(resolve(a, "--advertise").await?),
        None => None,
    };
    config.zone = args.zone;
    config.join_token = args.join_token;
    config.upload_limit = args.upload_limit;
    config.download_limit = args.download_limit;
    config.upload_slots = args.upload_slots;
    config.max_providers = args.max_providers;
    config.no_provider_timeout = args.no_provider_timeout;
    args.origin.apply(&mut config)?;
    config.tls = args.serve.tls.load()?;
    config.handshake_timeout = args.serve.handshake_timeout;
    config.idle_timeout = args.serve.idle_timeout;
    config.connections_per_address = args.serve.connections_per_address as usize;
    check_control_tls(&args.control, config.tls.as_ref())?;
    config.validate().map_err(|e| bad_input(e.to_string()))?;
    let mirror = args.mirror.config()?;
    let listener = bind(&args.listen, "--listen").await?;
    let http = args.serve.bind_http().await?;
    let mirror_listener = match &args.mirror.registry_mirror {
        Some(addr) => Some(bind(addr, "--registry-mirror").await?),
        None => None,
    };
    // Watched before the address is printed: whoever reads it may signal at once.
    let signal = shutdown_signal()?;
    // The store first: a second daemon on it is refused for holding its lock.
    let mut node = Node::start(listener, config).await?;
    let (local, socket_file) = match nebula_proto::unix::bind_private(&socket).await {
        Ok(bound) => bound,
        Err(e) => {
            let _ = node.shutdown().await;
            return Err(e).with_context(|| format!("binding {}", socket.display()));
        }
    };
    node.serve_local(local);
    println!("listening on {}", node.local_addr());
    if let Some(http) = http {
        let addr = http.local_addr().context("--http-listen")?;
        node.serve_http(http);
        // Tests and scripts read the HTTP port from this line.
        println!("http on {addr}");
    }
    if let (Some(listener), Some(config)) = (mirror_listener, mirror) {
        let addr = listener.local_addr().context("--registry-mirror")?;
        node.serve_mirror(listener, config);
        println!("registry mirror on {addr}");
    }
    let _ = std::io::stdout().flush();
    tracing::info!(socket = %socket.display(), store = %store.display(), "daemon ready");
    let stopping = node.stopping();
    tokio::select! {
        () = signal => tracing::info!("shutting down"),
        _ = stopping => {}
    }
    let stopped = node.shutdown().await;
    socket_file.remove();
    Ok(stopped?)
}
