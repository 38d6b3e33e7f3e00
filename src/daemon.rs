//! `nebula daemon` and the client commands that talk to it over its socket.

use std::{
    io::{IsTerminal, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use clap::{ArgAction, builder::BoolishValueParser};
use nebula_common::{BlobId, rate::format_bytes};
use nebula_peer::{Config, Credentials, MirrorConfig, Node, UrlFetch, Wanted, connect_local};
use nebula_proto::v1 as pb;
use tonic::Code;

use crate::{
    export::Destination,
    flags::{
        ServeFlags, ServerTlsFlags, check_control_tls, parse_control_url, parse_duration,
        parse_rate, tls_hint,
    },
    output::{
        Interrupted, bad_input, print_json, print_line, print_table, shutdown_signal, stdout_error,
    },
};

/// The default store: `$XDG_DATA_HOME/nebula`, else `~/.local/share/nebula`.
fn default_store() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("nebula");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/nebula")
}

/// Where to find the local daemon.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DaemonLocation {
    /// The daemon's Unix socket [default: <store>/nebula.sock].
    #[arg(long, env = "NEBULA_SOCKET")]
    socket: Option<PathBuf>,
    /// The daemon's store directory [default: $XDG_DATA_HOME/nebula or ~/.local/share/nebula].
    #[arg(long, env = "NEBULA_STORE")]
    store: Option<PathBuf>,
}

impl DaemonLocation {
    fn store(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(default_store)
    }

    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.store().join("nebula.sock"))
    }

    async fn connect(
        &self,
    ) -> anyhow::Result<pb::local_api_client::LocalApiClient<tonic::transport::Channel>> {
        let socket = self.socket();
        if let Err(e) = tokio::net::UnixStream::connect(&socket).await
            && e.kind() == std::io::ErrorKind::PermissionDenied
        {
            return Err(permission_denied(&socket, &e));
        }
        connect_local(socket.clone()).await.map_err(|e| {
            anyhow!(
                "no daemon at {} ({e}); start one with `nebula daemon`, pass --socket, or give `fetch` --control URL to fetch without a daemon",
                socket.display()
            )
        })
    }
}

/// The socket exists but this user may not use it.
fn permission_denied(socket: &Path, e: &std::io::Error) -> anyhow::Error {
    anyhow!(
        "permission denied on the daemon's socket {} ({e}); run as the daemon's user, or ask for access to the socket",
        socket.display()
    )
}

/// Turns a status from the daemon into a one-line error.
fn status_error(status: tonic::Status) -> anyhow::Error {
    let msg = status.message().to_owned();
    match status.code() {
        Code::InvalidArgument => bad_input(msg),
        Code::Unavailable if msg.is_empty() => anyhow!("the daemon is unavailable"),
        _ => anyhow!(msg),
    }
}

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
struct OriginFlags {
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
    fn apply(&self, config: &mut Config) -> anyhow::Result<()> {
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
async fn bind(addr: &str, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
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

/// Flags of `nebula add`.
#[derive(Debug, clap::Args)]
pub(crate) struct AddArgs {
    /// The file to add.
    path: PathBuf,
    #[command(flatten)]
    daemon: DaemonLocation,
    /// Print one JSON object.
    #[arg(long, env = "NEBULA_JSON", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    json: bool,
}

pub(crate) async fn run_add(args: AddArgs) -> anyhow::Result<()> {
    let path = std::fs::canonicalize(&args.path)
        .map_err(|e| bad_input(format!("cannot read {}: {e}", args.path.display())))?;
    // Checked with stat, before any open: opening a FIFO blocks until a writer comes.
    let meta = std::fs::metadata(&path)
        .map_err(|e| bad_input(format!("cannot read {}: {e}", args.path.display())))?;
    if meta.is_dir() {
        return Err(bad_input(format!(
            "cannot add {}: it is a directory",
            args.path.display()
        )));
    }
    if !meta.is_file() {
        return Err(bad_input(format!(
            "cannot add {}: not a regular file",
            args.path.display()
        )));
    }
    std::fs::File::open(&path)
        .map_err(|e| bad_input(format!("cannot read {}: {e}", args.path.display())))?;
    let mut client = args.daemon.connect().await?;
    let r = client
        .add(pb::AddRequest {
            path: path.display().to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        print_json(&crate::json::BlobSummary::from(r))?;
    } else {
        print_line(&r.id)?;
    }
    Ok(())
}

/// Flags of `nebula fetch`.
#[derive(Debug, clap::Args)]
pub(crate) struct FetchArgs {
    /// Blob id (`<hex>`, `blake3:<hex>`), `sha256:<hex>`, or an http(s) URL
    /// (fetched through the swarm, with one origin download for the fleet).
    id: String,
    /// With a URL: the content must have this digest (`sha256:<hex>` or
    /// `blake3:<hex>`), else the fetch fails and nothing is kept.
    #[arg(long)]
    digest: Option<String>,
    /// With a URL: a header for the origin only, `Name: value` (repeatable).
    /// Never sent to another host on a redirect, never logged.
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    headers: Vec<String>,
    #[command(flatten)]
    origin: OriginFlags,
    /// Write the blob here, or `-` for stdout. A regular file is replaced
    /// atomically (a symlink's target, keeping the link); a device or FIFO is
    /// written into; a read-only file is refused.
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    daemon: DaemonLocation,
    /// With no daemon running: fetch as a one-shot peer via this control plane
    /// (several replicas: `URL,URL,…`).
    #[arg(long, env = "NEBULA_CONTROL", value_parser = parse_control_url)]
    control: Option<String>,
    /// One-shot mode: address to serve other peers on while downloading
    /// (`HOST:PORT`). Its own variable: `NEBULA_LISTEN` is the daemon's, and
    /// a one-shot fetch beside a daemon must not bind the daemon's port.
    #[arg(long, env = "NEBULA_FETCH_LISTEN", default_value = "127.0.0.1:0")]
    listen: String,
    /// One-shot mode: join token for the control plane.
    #[arg(long, env = "NEBULA_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// One-shot mode: TLS, as for `nebula daemon`.
    #[command(flatten)]
    tls: ServerTlsFlags,
    /// Give up after this long with missing chunks that no reachable peer
    /// holds (0: at once).
    #[arg(long, env = "NEBULA_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print one JSON object when done (on stderr with `-o -`).
    #[arg(long, env = "NEBULA_JSON", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    json: bool,
    /// Progress on stderr: `auto` (a bar on a terminal, unless --json), `bar`,
    /// `json` (one object per update, for scripts) or `none`.
    #[arg(long, env = "NEBULA_PROGRESS", value_enum, default_value = "auto")]
    progress: ProgressMode,
}

/// How `fetch` shows its progress on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ProgressMode {
    /// A bar when stderr is a terminal and --json is off; nothing otherwise.
    Auto,
    /// A progress bar.
    Bar,
    /// One JSON object per update: `bytes_done`, `total`, `providers`, `elapsed_ms`.
    Json,
    /// Nothing.
    None,
}

/// Draws a progress bar, or prints one JSON line per update, on stderr.
struct Bar(Option<indicatif::ProgressBar>, Option<Instant>);

impl Bar {
    fn new(mode: ProgressMode) -> Self {
        match mode {
            ProgressMode::Json => return Self(None, Some(Instant::now())),
            ProgressMode::Bar => {}
            ProgressMode::Auto | ProgressMode::None => return Self(None, None),
        }
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        Self(Some(bar), None)
    }

    fn update(&self, total: u64, done: u64, providers: u32) {
        if let Some(started) = self.1 {
            // Best effort, like a bar: a closed stderr must not fail the fetch.
            let line = crate::output::json_line(&crate::json::FetchProgress {
                bytes_done: done,
                total,
                providers,
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
            let _ = writeln!(std::io::stderr(), "{line}");
        }
        if let Some(b) = &self.0 {
            b.set_length(total);
            b.set_position(done);
            b.set_message(format!("{providers} peers"));
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// The destination of `fetch -o`.
enum Output {
    None,
    Stdout,
    File(Destination),
}

fn resolve_output(o: Option<&Path>) -> anyhow::Result<Output> {
    let Some(o) = o else { return Ok(Output::None) };
    if o == Path::new("-") {
        return Ok(Output::Stdout);
    }
    let abs = if o.is_absolute() {
        o.to_owned()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(o)
    };
    Ok(Output::File(Destination::plan(&abs)?))
}

/// What `nebula fetch` was asked for; bad input exits 2.
fn parse_wanted(args: &FetchArgs) -> anyhow::Result<Wanted> {
    let id = args.id.trim();
    if id.starts_with("http://") || id.starts_with("https://") {
        let req = UrlFetch::parse(id, &args.headers, args.digest.as_deref().unwrap_or(""))
            .map_err(|e| bad_input(e.to_string()))?;
        return Ok(Wanted::Url(Box::new(req)));
    }
    if args.digest.is_some() || !args.headers.is_empty() {
        return Err(bad_input(
            "--digest and --header go with a URL, not a blob id",
        ));
    }
    let blob = id
        .parse()
        .map_err(|e: nebula_common::ParseIdError| bad_input(e.to_string()))?;
    Ok(Wanted::Blob(blob))
}

pub(crate) async fn run_fetch(args: FetchArgs) -> anyhow::Result<()> {
    // Refuse a malformed id or URL before any network call.
    let wanted = parse_wanted(&args)?;
    let output = resolve_output(args.output.as_deref())?;
    let progress_mode = match args.progress {
        ProgressMode::Auto if !args.json && std::io::stderr().is_terminal() => ProgressMode::Bar,
        mode => mode,
    };
    let started = Instant::now();
    let socket = args.daemon.socket();
    let daemon_up = match tokio::net::UnixStream::connect(&socket).await {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(permission_denied(&socket, &e));
        }
        Err(_) => false,
    };
    let fetched = if daemon_up {
        fetch_via_daemon(&args, &wanted, &output, progress_mode).await?
    } else if args.control.is_some() || matches!(wanted, Wanted::Url(_)) {
        // A URL needs no control plane: without one, the origin is asked directly.
        fetch_one_shot(&args, &wanted, &output, progress_mode).await?
    } else {
        return Err(anyhow!(
            "no daemon at {}; start one with `nebula daemon`, or pass --control URL to fetch as a one-shot peer",
            socket.display()
        ));
    };
    if let Some(notice) = &fetched.notice {
        eprintln!("warning: {notice}");
    }
    if args.json {
        let (sources, peer_bytes) = crate::json::Source::all(&fetched.sources);
        let summary = crate::json::FetchSummary {
            id: fetched.id.to_string(),
            size: fetched.size,
            elapsed_ms: started.elapsed().as_millis() as u64,
            resumed_bytes: fetched.resumed,
            origin_bytes: fetched.origin_bytes,
            peer_bytes,
            sources,
        };
        if let Output::Stdout = output {
            // Stdout carries the blob: the summary must not be appended to it.
            eprintln!("{}", crate::output::json_line(&summary));
        } else {
            print_json(&summary)?;
        }
    }
    Ok(())
}

/// A finished fetch, as the CLI reports it.
struct Fetched {
    id: BlobId,
    size: u64,
    resumed: u64,
    sources: Vec<pb::ProviderBytes>,
    origin_bytes: u64,
    notice: Option<String>,
}

/// `--timeout` as the daemon's API takes it: 0 on the wire means "the
/// daemon's default", so `--timeout 0` (fail at once) is sent as 1 ms.
fn wire_timeout_ms(timeout: Duration) -> u64 {
    (timeout.as_millis() as u64).max(1)
}

/// An error from the daemon's stream during a fetch: when the daemon no
/// longer answers on its socket, it went away (a crash, a kill, a restart),
/// and the transport's own words (`h2 protocol error`) would not say so.
async fn fetch_stream_error(socket: &Path, status: tonic::Status) -> anyhow::Error {
    let transport = matches!(
        status.code(),
        Code::Unknown | Code::Unavailable | Code::Internal | Code::Cancelled
    );
    if !transport {
        return status_error(status);
    }
    // A dying daemon may still accept a connection on its socket for a
    // moment: only an answered call shows it is alive.
    let alive = async {
        let mut client = connect_local(socket.to_owned()).await.ok()?;
        client.status(pb::StatusRequest {}).await.ok()
    };
    let alive = tokio::time::timeout(Duration::from_secs(2), alive)
        .await
        .ok()
        .flatten()
        .is_some();
    let broken = status.message().contains("h2 protocol error");
    if !alive || broken {
        return anyhow!(
            "the daemon at {} went away during the fetch; its verified chunks are kept, and running the same fetch again once it is back resumes it",
            socket.display()
        );
    }
    status_error(status)
}

async fn fetch_via_daemon(
    args: &FetchArgs,
    wanted: &Wanted,
    output: &Output,
    progress_mode: ProgressMode,
) -> anyhow::Result<Fetched> {
    let socket = args.daemon.socket();
    let mut client = args.daemon.connect().await?;
    // The daemon fetches into its store; the bytes are then read back over
    // the socket and written here, as the user who runs this command.
    let mut request = pb::FetchRequest {
        no_provider_timeout_ms: wire_timeout_ms(args.timeout),
        ..pb::FetchRequest::default()
    };
    match wanted {
        Wanted::Blob(blob) => request.blob = blob.to_string(),
        Wanted::Url(_) => {
            // Sent as the user typed them; the daemon parses them the same way.
            request.url = args.id.trim().to_owned();
            request.headers = args.headers.clone();
            request.digest = args.digest.clone().unwrap_or_default();
        }
    }
    let mut stream = match client.fetch(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Err(fetch_stream_error(&socket, status).await),
    };
    let bar = Bar::new(progress_mode);
    let mut last = None;
    loop {
        match stream.message().await {
            Ok(Some(p)) => {
                bar.update(p.total, p.bytes_done, p.providers);
                let done = p.done;
                last = Some(p);
                if done {
                    break;
                }
            }
            Ok(None) => break,
            Err(status) => {
                bar.finish();
                return Err(fetch_stream_error(&socket, status).await);
            }
        }
    }
    bar.finish();
    let last = last
        .filter(|p| p.done)
        .ok_or_else(|| anyhow!("the daemon ended the fetch without finishing it"))?;
    let id: BlobId = last
        .id
        .parse()
        .map_err(|_| anyhow!("the daemon answered a malformed id"))?;
    match output {
        Output::None => {}
        Output::Stdout => {
            let mut out = std::io::stdout();
            read_into(&mut client, &socket, id, |data| {
                out.write_all(data).map_err(stdout_error)
            })
            .await?;
            out.flush().map_err(stdout_error)?;
        }
        Output::File(dest) => {
            // On any failure the sink is dropped unfinished: its temporary
            // file goes, the destination is untouched.
            let mut sink = dest.open()?;
            read_into(&mut client, &socket, id, |data| sink.append(data)).await?;
            sink.finish()?;
        }
    }
    Ok(Fetched {
        id,
        size: last.total,
        resumed: last.resumed_bytes,
        sources: last.sources,
        origin_bytes: last.origin_bytes,
        notice: (!last.notice.is_empty()).then_some(last.notice),
    })
}

/// Streams a complete blob from the daemon into `write`; SIGINT or SIGTERM
/// stops it (the caller's sink then removes its temporary file).
async fn read_into(
    client: &mut pb::local_api_client::LocalApiClient<tonic::transport::Channel>,
    socket: &Path,
    id: BlobId,
    mut write: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let signal = shutdown_signal()?;
    tokio::pin!(signal);
    let mut read = match client
        .read(pb::ReadRequest {
            blob: id.to_string(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Err(fetch_stream_error(socket, status).await),
    };
    loop {
        let piece = tokio::select! {
            () = &mut signal => {
                return Err(anyhow::Error::new(Interrupted).context("nothing was written"));
            }
            piece = read.message() => piece,
        };
        match piece {
            Ok(Some(piece)) => write(&piece.data)?,
            Ok(None) => return Ok(()),
            Err(status) => return Err(fetch_stream_error(socket, status).await),
        }
    }
}

async fn fetch_one_shot(
    args: &FetchArgs,
    wanted: &Wanted,
    output: &Output,
    progress_mode: ProgressMode,
) -> anyhow::Result<Fetched> {
    let mut config = Config::new(args.daemon.store(), args.control.clone());
    config.join_token = args.join_token.clone();
    config.no_provider_timeout = args.timeout;
    args.origin.apply(&mut config)?;
    config.tls = args.tls.load()?;
    if let Some(control) = &args.control {
        check_control_tls(control, config.tls.as_ref())?;
    }
    config.validate().map_err(|e| bad_input(e.to_string()))?;
    let listener = bind(&args.listen, "--listen").await?;
    let node = Node::start(listener, config).await?;
    let fetch = node.fetcher().start(wanted.clone(), Some(args.timeout));
    let mut progress = fetch.progress();
    let bar = Bar::new(progress_mode);
    let fetched = {
        let result = fetch.result();
        tokio::pin!(result);
        loop {
            tokio::select! {
                r = &mut result => break r,
                Ok(()) = progress.changed() => {
                    let p = progress.borrow_and_update().clone();
                    bar.update(p.total, p.bytes_done, p.providers);
                }
            }
        }
    };
    bar.finish();
    let result = match fetched {
        Ok(outcome) => {
            let b = outcome.blob;
            let exported = match output {
                Output::None => Ok(()),
                Output::File(dest) => {
                    let (b2, dest) = (std::sync::Arc::clone(&b), dest.clone());
                    tokio::task::spawn_blocking(move || {
                        // Chunk by chunk through the sink, so that a write
                        // error names the output, not the store.
                        let mut sink = dest.open()?;
                        for i in 0..b2.geometry().chunk_count() {
                            sink.append(&b2.read_chunk(i)?)?;
                        }
                        sink.finish()
                    })
                    .await
                    .map_err(|_| anyhow!("export task failed"))
                    .and_then(|r| r)
                }
                Output::Stdout => {
                    let b2 = std::sync::Arc::clone(&b);
                    tokio::task::spawn_blocking(move || {
                        let mut out = std::io::stdout().lock();
                        b2.copy_to(&mut out).map_err(anyhow::Error::from)?;
                        out.flush().map_err(stdout_error)
                    })
                    .await
                    .map_err(|_| anyhow!("export task failed"))
                    .and_then(|r| r)
                }
            };
            exported.map(|()| Fetched {
                id: b.id(),
                size: b.outboard().size(),
                resumed: outcome.resumed_bytes,
                sources: outcome
                    .sources
                    .iter()
                    .map(pb::ProviderBytes::from)
                    .collect(),
                origin_bytes: outcome.origin_bytes,
                notice: outcome.notice.clone(),
            })
        }
        Err(e) => Err(anyhow::Error::from(e)),
    };
    let stopped = node.shutdown().await;
    let fetched = result?;
    stopped?;
    Ok(fetched)
}

/// Flags of `nebula ls`.
#[derive(Debug, clap::Args)]
pub(crate) struct LsArgs {
    #[command(flatten)]
    daemon: DaemonLocation,
    /// Print one JSON object.
    #[arg(long, env = "NEBULA_JSON", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    json: bool,
}

pub(crate) async fn run_ls(args: LsArgs) -> anyhow::Result<()> {
    let mut client = args.daemon.connect().await?;
    let list = client
        .list(pb::ListRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        print_json(&crate::json::Listing::from(&list))?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .blobs
        .iter()
        .map(|b| {
            let state = if b.complete {
                "complete".to_owned()
            } else {
                format!("partial {}/{}", b.chunks_verified, b.chunks)
            };
            vec![b.id.clone(), format_bytes(b.size), state]
        })
        .collect();
    print_table(&["ID", "SIZE", "STATE"], &rows)?;
    Ok(())
}

/// Flags of `nebula rm`.
#[derive(Debug, clap::Args)]
pub(crate) struct RmArgs {
    /// The blob to remove.
    id: String,
    #[command(flatten)]
    daemon: DaemonLocation,
}

pub(crate) async fn run_rm(args: RmArgs) -> anyhow::Result<()> {
    let id: BlobId = args
        .id
        .parse()
        .map_err(|e: nebula_common::ParseIdError| bad_input(e.to_string()))?;
    let mut client = args.daemon.connect().await?;
    client
        .remove(pb::RemoveRequest {
            blob: id.to_string(),
        })
        .await
        .map_err(status_error)?;
    Ok(())
}

/// Flags of `nebula status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    daemon: DaemonLocation,
    /// Print one JSON object.
    #[arg(long, env = "NEBULA_JSON", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    json: bool,
}

pub(crate) async fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = args.daemon.connect().await?;
    let s = client
        .status(pb::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        print_json(&crate::json::Status::from(&s))?;
    } else {
        let rows = vec![
            vec!["peer".into(), s.peer_id.clone()],
            vec!["address".into(), s.address.clone()],
            vec!["control".into(), s.control.clone()],
            vec!["registered".into(), s.registered.to_string()],
            vec!["store".into(), s.store.clone()],
            vec!["blobs".into(), s.blobs.to_string()],
            vec!["uploads".into(), s.active_uploads.to_string()],
            vec!["uploaded".into(), format_bytes(s.uploaded_bytes)],
            vec!["downloaded".into(), format_bytes(s.downloaded_bytes)],
        ];
        print_table(&["", ""], &rows)?;
    }
    if s.registered {
        Ok(())
    } else if s.registration_error.is_empty() {
        Err(anyhow!(
            "the daemon is up but not registered with the control plane at {}",
            s.control
        ))
    } else {
        let hint = tls_hint(&s.registration_error, None)
            .map(|h| format!("; {h}"))
            .unwrap_or_default();
        Err(anyhow!(
            "the daemon is up but not registered with the control plane at {}: {}{hint}",
            s.control,
            s.registration_error
        ))
    }
}
