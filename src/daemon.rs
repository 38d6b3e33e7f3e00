//! `nebula daemon` and the client commands that talk to it over its socket.

use std::{
    io::{IsTerminal, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use nebula_common::{BlobId, BlobRef, rate::format_bytes};
use nebula_peer::{Config, Node, Progress, connect_local};
use nebula_proto::v1 as pb;
use tonic::Code;

use crate::{
    flags::{ServeFlags, parse_duration, parse_rate},
    output::{bad_input, print_json, print_table, shutdown_signal},
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
        connect_local(socket.clone()).await.map_err(|e| {
            anyhow!(
                "no daemon at {} ({e}); start one with `nebula daemon`, pass --socket, or give `fetch` --control URL to fetch without a daemon",
                socket.display()
            )
        })
    }
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
    #[arg(long, env = "NEBULA_CONTROL", default_value = "http://127.0.0.1:7700")]
    control: String,
    /// Address to serve peers on (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "NEBULA_LISTEN", default_value = "127.0.0.1:7701")]
    listen: SocketAddr,
    /// Address other peers should dial [default: the listening address].
    #[arg(long, env = "NEBULA_ADVERTISE")]
    advertise: Option<SocketAddr>,
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
    pub(crate) serve: ServeFlags,
}

/// `host:port` gets `http://` in front, in each entry of a comma-separated list.
fn control_url(raw: &str) -> String {
    raw.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            if u.contains("://") {
                u.to_owned()
            } else {
                format!("http://{u}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) async fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let store = args.store.clone().unwrap_or_else(default_store);
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| store.join("nebula.sock"));
    let mut config = Config::new(&store, Some(control_url(&args.control)));
    config.advertise = args.advertise;
    config.zone = args.zone;
    config.join_token = args.join_token;
    config.upload_limit = args.upload_limit;
    config.download_limit = args.download_limit;
    config.upload_slots = args.upload_slots;
    config.max_providers = args.max_providers;
    config.no_provider_timeout = args.no_provider_timeout;
    config.validate().map_err(bad_input)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let http = args.serve.bind_http().await?;
    // Watched before the address is printed: whoever reads it may signal at once.
    let signal = shutdown_signal()?;
    let mut node = Node::start(config, listener).await?;
    node.serve_local(&socket).await?;
    println!("listening on {}", node.local_addr());
    if let Some(http) = http {
        let addr = http.local_addr().context("--http-listen")?;
        node.serve_http(http);
        // Tests and scripts read the HTTP port from this line.
        println!("http on {addr}");
    }
    let _ = std::io::stdout().flush();
    tracing::info!(socket = %socket.display(), store = %store.display(), "daemon ready");
    let stopping = node.stopping();
    tokio::select! {
        () = signal => tracing::info!("shutting down"),
        _ = stopping => {}
    }
    node.shutdown().await;
    Ok(())
}

/// Flags of `nebula add`.
#[derive(Debug, clap::Args)]
pub(crate) struct AddArgs {
    /// The file to add.
    path: PathBuf,
    #[command(flatten)]
    daemon: DaemonLocation,
    /// Print one JSON object.
    #[arg(long, env = "NEBULA_JSON")]
    json: bool,
}

pub(crate) async fn run_add(args: AddArgs) -> anyhow::Result<()> {
    let path = std::fs::canonicalize(&args.path)
        .map_err(|e| bad_input(format!("cannot read {}: {e}", args.path.display())))?;
    if path.is_dir() {
        return Err(bad_input(format!(
            "cannot add {}: it is a directory",
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
        print_json(&serde_json::json!({
            "id": r.id, "size": r.size, "sha256": r.sha256, "chunk_size": r.chunk_size, "chunks": r.chunks,
        }));
    } else {
        println!("{}", r.id);
    }
    Ok(())
}

/// Flags of `nebula fetch`.
#[derive(Debug, clap::Args)]
pub(crate) struct FetchArgs {
    /// Blob id (`<hex>`, `blake3:<hex>`) or `sha256:<hex>`.
    id: String,
    /// Write the blob here (atomically), or `-` for stdout.
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    daemon: DaemonLocation,
    /// With no daemon running: fetch as a one-shot peer via this control plane
    /// (several replicas: `URL,URL,…`).
    #[arg(long, env = "NEBULA_CONTROL")]
    control: Option<String>,
    /// One-shot mode: address to serve other peers on while downloading.
    #[arg(long, env = "NEBULA_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// One-shot mode: join token for the control plane.
    #[arg(long, env = "NEBULA_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Give up after this long without any provider.
    #[arg(long, env = "NEBULA_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print one JSON object when done.
    #[arg(long, env = "NEBULA_JSON")]
    json: bool,
}

/// Draws a progress bar on a terminal; silent otherwise.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(show: bool) -> Self {
        if !show {
            return Self(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        Self(Some(bar))
    }

    fn update(&self, total: u64, done: u64, providers: u32) {
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
    File(PathBuf),
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
    if abs.is_dir() {
        return Err(bad_input(format!("output {} is a directory", o.display())));
    }
    let parent = abs.parent().unwrap_or(Path::new("/"));
    if !parent.is_dir() {
        return Err(anyhow!(
            "cannot write {}: directory {} does not exist",
            o.display(),
            parent.display()
        ));
    }
    Ok(Output::File(abs))
}

pub(crate) async fn run_fetch(args: FetchArgs) -> anyhow::Result<()> {
    // Refuse a malformed id before any network call.
    let blob: BlobRef = args
        .id
        .parse()
        .map_err(|e: nebula_common::ParseIdError| bad_input(e.to_string()))?;
    let output = resolve_output(args.output.as_deref())?;
    let show_bar = !args.json && std::io::stderr().is_terminal();
    let started = Instant::now();
    let socket = args.daemon.socket();
    let daemon_up = tokio::net::UnixStream::connect(&socket).await.is_ok();
    let (id, size, resumed, sources) = if daemon_up {
        fetch_via_daemon(&args, blob, &output, show_bar).await?
    } else if let Some(control) = &args.control {
        fetch_one_shot(&args, control, blob, &output, show_bar).await?
    } else {
        return Err(anyhow!(
            "no daemon at {}; start one with `nebula daemon`, or pass --control URL to fetch as a one-shot peer",
            socket.display()
        ));
    };
    if args.json {
        print_json(&serde_json::json!({
            "id": id.to_string(),
            "size": size,
            "elapsed_ms": started.elapsed().as_millis() as u64,
            "resumed_bytes": resumed,
            "sources": sources.iter().map(|s| serde_json::json!({
                "peer_id": s.peer_id, "address": s.address, "bytes": s.bytes,
            })).collect::<Vec<_>>(),
        }));
    }
    Ok(())
}

type Fetched = (BlobId, u64, u64, Vec<pb::ProviderBytes>);

async fn fetch_via_daemon(
    args: &FetchArgs,
    blob: BlobRef,
    output: &Output,
    show_bar: bool,
) -> anyhow::Result<Fetched> {
    let mut client = args.daemon.connect().await?;
    let request = pb::FetchRequest {
        blob: blob.to_string(),
        output: match output {
            Output::File(p) => p.display().to_string(),
            _ => String::new(),
        },
        no_provider_timeout_ms: args.timeout.as_millis() as u64,
    };
    let mut stream = client
        .fetch(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = Bar::new(show_bar);
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
                return Err(status_error(status));
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
    if let Output::Stdout = output {
        let mut read = client
            .read(pb::ReadRequest {
                blob: id.to_string(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut out = std::io::stdout().lock();
        while let Some(piece) = read.message().await.map_err(status_error)? {
            out.write_all(&piece.data).context("writing to stdout")?;
        }
        out.flush().context("writing to stdout")?;
    }
    Ok((id, last.total, last.resumed_bytes, last.sources))
}

async fn fetch_one_shot(
    args: &FetchArgs,
    control: &str,
    blob: BlobRef,
    output: &Output,
    show_bar: bool,
) -> anyhow::Result<Fetched> {
    let mut config = Config::new(args.daemon.store(), Some(control_url(control)));
    config.join_token = args.join_token.clone();
    config.no_provider_timeout = args.timeout;
    config.validate().map_err(bad_input)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let node = Node::start(config, listener).await?;
    let (tx, mut rx) = tokio::sync::watch::channel(Progress::default());
    let bar = Bar::new(show_bar);
    let fetched = {
        let fetch = node.fetch(blob, tx, Some(args.timeout));
        tokio::pin!(fetch);
        loop {
            tokio::select! {
                r = &mut fetch => break r,
                _ = rx.changed() => {
                    let p = rx.borrow_and_update().clone();
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
                Output::File(p) => {
                    let (store, id, p) = (std::sync::Arc::clone(node.store()), b.id(), p.clone());
                    tokio::task::spawn_blocking(move || store.export(&id, &p))
                        .await
                        .map_err(|_| anyhow!("export task failed"))
                        .and_then(|r| r.map_err(anyhow::Error::from))
                }
                Output::Stdout => {
                    let b2 = std::sync::Arc::clone(&b);
                    tokio::task::spawn_blocking(move || {
                        let mut out = std::io::stdout().lock();
                        b2.copy_to(&mut out).map_err(anyhow::Error::from)?;
                        out.flush().context("writing to stdout")
                    })
                    .await
                    .map_err(|_| anyhow!("export task failed"))
                    .and_then(|r| r)
                }
            };
            exported.map(|()| {
                let sources = outcome
                    .sources
                    .iter()
                    .map(pb::ProviderBytes::from)
                    .collect();
                (b.id(), b.outboard().size(), outcome.resumed_bytes, sources)
            })
        }
        Err(e) => Err(anyhow::Error::from(e)),
    };
    node.shutdown().await;
    result
}

/// Flags of `nebula ls`.
#[derive(Debug, clap::Args)]
pub(crate) struct LsArgs {
    #[command(flatten)]
    daemon: DaemonLocation,
    /// Print one JSON object.
    #[arg(long, env = "NEBULA_JSON")]
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
        let blobs: Vec<_> = list
            .blobs
            .iter()
            .map(|b| {
                serde_json::json!({
                    "id": b.id, "size": b.size, "sha256": (!b.sha256.is_empty()).then_some(&b.sha256),
                    "complete": b.complete, "chunks": b.chunks, "chunks_verified": b.chunks_verified,
                    "chunk_size": nebula_common::Geometry::new(b.size).chunk_size(),
                })
            })
            .collect();
        print_json(&serde_json::json!({ "blobs": blobs }));
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
    print_table(&["ID", "SIZE", "STATE"], &rows);
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
    #[arg(long, env = "NEBULA_JSON")]
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
        print_json(&serde_json::json!({
            "peer_id": s.peer_id, "address": s.address, "control": s.control, "registered": s.registered,
            "blobs": s.blobs, "active_uploads": s.active_uploads, "uploaded_bytes": s.uploaded_bytes,
            "downloaded_bytes": s.downloaded_bytes, "uptime_ms": s.uptime_ms, "store": s.store,
        }));
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
        print_table(&["", ""], &rows);
    }
    if s.registered {
        Ok(())
    } else {
        Err(anyhow!(
            "the daemon is up but not registered with the control plane at {}",
            s.control
        ))
    }
}
