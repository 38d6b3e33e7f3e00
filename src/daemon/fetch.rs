//! `nebula fetch`: through the local daemon, with a progress bar, into a file
//! or stdout; without a daemon, in one shot (`one_shot`).

use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use clap::{ArgAction, builder::BoolishValueParser};
use nebula_common::BlobId;
use nebula_peer::{UrlFetch, Wanted, connect_local};
use nebula_proto::v1 as pb;
use tonic::Code;

use super::{DaemonLocation, permission_denied, serve::OriginFlags, status_error};
use crate::{
    export::Destination,
    flags::{ServerTlsFlags, parse_control_url, parse_duration},
    output::{Interrupted, bad_input, print_json, shutdown_signal, stdout_error},
};

mod one_shot;

use one_shot::fetch_one_shot;

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
