//! Real Nebula Stream clusters for the swarm demo and the benchmark: a control plane and peer
//! daemons as child processes of the built `nebula` binary, on loopback ports chosen at run time,
//! each daemon with its own store in one temporary directory.
//!
//! Both example binaries include this file with `#[path]`; each uses a different subset of it,
//! hence the `dead_code` allowance below.
//!
//! # Cleanup
//!
//! Every child is started in its own process group (a Ctrl-C at the terminal reaches only the
//! example, which then stops its children in order) and with `PR_SET_PDEATHSIG`, so even a
//! SIGKILLed example leaves nothing behind. [`Cluster::shutdown`] stops the daemons with SIGTERM
//! and waits for them; dropping a [`Cluster`] instead (an error, a panic, Ctrl-C) sends SIGTERM,
//! waits a bounded time, SIGKILLs what is left, and then removes the temporary directory.
//! [`Cluster::keep`] leaves everything running for the user.

#![allow(dead_code)]

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use nebula_testkit::{TestCa, write_random_file};
use serde_json::Value;
use tokio::process::{Child, Command};

/// How long a process may take to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take from listening to `nebula status` exiting 0 (registered).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a short client command (`status`, `ls`, `rm`) may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long exporting one blob through `nebula fetch -o -` for a hash check may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long stopped processes get to exit after SIGTERM before they are SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long `Drop` waits after SIGTERM: shorter, since it blocks a thread.
const DROP_GRACE: Duration = Duration::from_secs(2);

/// A child process that is stopped when dropped, unless detached.
#[derive(Debug)]
pub(crate) struct Proc {
    /// A short name for messages and log files (`control`, `peer3`).
    name: String,
    child: Child,
    /// Captured at spawn: `Child::id` forgets it once the child is reaped.
    pid: u32,
    /// The file its stderr goes to.
    log: PathBuf,
    /// Set by [`Cluster::keep`]: dropping leaves the process running.
    detached: bool,
}

impl Proc {
    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The file its stderr (the daemon's log) goes to.
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// Whether it has not exited yet.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a signal to this process only (never to a group).
    pub(crate) fn signal(&self, sig: libc::c_int) {
        // `Child::id` is `None` once the child has been reaped; until then its pid (a zombie's,
        // at worst) cannot be reused, and only `&mut self` methods can reap it.
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }

    /// SIGKILLs it at once (a crash as far as the rest of the cluster can tell).
    pub(crate) fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Polls until it has exited, at most until `deadline`; true if it has.
    fn wait_until_blocking(&mut self, deadline: Instant) -> bool {
        for _ in 0..10_000 {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        !self.is_running()
    }

    /// Waits for it to exit, at most `limit`; true if it has.
    async fn wait_for(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.child.wait()).await.is_ok()
    }

    /// The last lines of its log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        self.kill();
        // SIGKILL takes effect at once; reap it so no zombie outlives us.
        self.wait_until_blocking(Instant::now() + Duration::from_secs(2));
    }
}

/// Returns up to the last 15 lines of a log file.
fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(15);
    lines[start..].join("\n")
}

/// Builds a `nebula` command: stdin closed, no `NEBULA_*` variables inherited from the user's
/// shell (an exported `NEBULA_ADVERTISE` or `NEBULA_JSON` would change what the children do),
/// its own process group, and death with this process unless `survive_us`.
pub(crate) fn nebula_command(bin: &Path, args: &[&OsStr], survive_us: bool) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).process_group(0);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NEBULA_") {
            cmd.env_remove(key);
        }
    }
    if !survive_us {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, getppid), allocating nothing. The death signal follows the thread
        // that forks: children are spawned only from async code, on runtime threads that live
        // as long as the example's runtime.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the parent exited during spawn"));
                }
                Ok(())
            });
        }
    }
    cmd
}

/// A peer daemon of a [`Cluster`].
#[derive(Debug)]
pub(crate) struct Peer {
    /// Its directory: the store, the socket, logs.
    pub(crate) dir: PathBuf,
    /// Its local API socket.
    pub(crate) socket: PathBuf,
    /// The address it listens on (`127.0.0.1:PORT`).
    pub(crate) address: String,
    /// Its peer id, from `nebula status --json`.
    pub(crate) peer_id: String,
    /// Its `--http-listen` address, when the cluster serves HTTP.
    pub(crate) http: Option<String>,
    /// Its `--registry-mirror` address, when started with one.
    pub(crate) mirror: Option<String>,
    proc: Proc,
}

impl Peer {
    /// The daemon's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// Per-daemon options.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PeerOptions {
    /// `--upload-limit` in bytes per second.
    pub(crate) upload_limit: Option<u64>,
    /// `--download-limit` in bytes per second.
    pub(crate) download_limit: Option<u64>,
    /// Serve a registry mirror (on a free port) whose `--mirror-upstream` is this registry.
    pub(crate) mirror_upstream: Option<std::net::SocketAddr>,
}

/// The outcome of one `nebula fetch … --json` process.
#[derive(Debug, Clone)]
pub(crate) struct Fetch {
    /// The index of the fetching peer.
    pub(crate) peer: usize,
    /// From the moment the fetches were launched until this one exited.
    pub(crate) wall: Duration,
    /// Whether it exited 0 with a JSON object on stdout.
    pub(crate) ok: bool,
    /// Its JSON report (`id`, `size`, `elapsed_ms`, `resumed_bytes`, `sources`).
    pub(crate) report: Value,
    /// Its exit status and stderr, when it failed.
    pub(crate) error: String,
}

impl Fetch {
    /// Bytes received from the provider with this peer id (or this address).
    pub(crate) fn bytes_from(&self, peer_id: &str, address: &str) -> u64 {
        self.sources()
            .filter(|s| s["peer_id"] == peer_id || s["address"] == address)
            .map(|s| s["bytes"].as_u64().unwrap_or(0))
            .sum()
    }

    /// Bytes received from all providers.
    pub(crate) fn bytes_total(&self) -> u64 {
        self.sources()
            .map(|s| s["bytes"].as_u64().unwrap_or(0))
            .sum()
    }

    fn sources(&self) -> impl Iterator<Item = &Value> {
        self.report["sources"]
            .as_array()
            .map(|a| a.iter())
            .into_iter()
            .flatten()
    }
}

/// What `/proc/PID/status` says of a process's memory and threads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcStatus {
    /// Resident memory now (`VmRSS`), in bytes.
    pub(crate) rss: u64,
    /// Peak resident memory (`VmHWM`), in bytes: since start, or since the last
    /// [`Cluster::reset_peak_rss`].
    pub(crate) peak_rss: u64,
    /// Threads now.
    pub(crate) threads: u64,
}

impl ProcStatus {
    fn read(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(Self {
            rss: field("VmRSS")? * 1024,
            peak_rss: field("VmHWM")? * 1024,
            threads: field("Threads")?,
        })
    }
}

/// A control plane and peer daemons on loopback, in one temporary directory.
#[derive(Debug)]
pub(crate) struct Cluster {
    bin: PathBuf,
    /// Dropped before `control`: daemons first, so none loses its control plane while stopping.
    peers: Vec<Peer>,
    control: Proc,
    control_url: String,
    /// The control plane's `--admin-socket` (`nebula admin --admin-socket PATH`).
    admin_socket: PathBuf,
    root: PathBuf,
    /// Dropped last, after every process has exited. `None` once kept.
    dir: Option<tempfile::TempDir>,
    /// Whether children survive this process (`--keep`): no death signal.
    survive_us: bool,
    /// Whether every process serves `/metrics` (`--http-listen`).
    http: bool,
    /// The control plane's `--http-listen` address, when it serves HTTP.
    control_http: Option<String>,
    /// The certificate every process serves and the CA they trust, when TLS is on.
    tls: Option<TestCa>,
}

/// What every process of a [`Cluster`] runs with.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ClusterOptions {
    /// The control plane and every daemon serve `/metrics` on a loopback port of their own.
    pub(crate) http: bool,
    /// Every gRPC server and client speaks TLS (a fleet CA made for the cluster).
    pub(crate) tls: bool,
}

/// `--tls-cert`, `--tls-key` and `--tls-ca` of the fleet CA's certificate for 127.0.0.1, which
/// every process serves and shows (they all run on loopback).
fn tls_flags(ca: &TestCa) -> [OsString; 6] {
    [
        "--tls-cert".into(),
        ca.cert.clone().into(),
        "--tls-key".into(),
        ca.key.clone().into(),
        "--tls-ca".into(),
        ca.ca.clone().into(),
    ]
}

impl Cluster {
    /// Starts a control plane; add daemons with [`Cluster::add_peers`]. With `survive_us`,
    /// the children are started so that [`Cluster::keep`] can leave them running.
    pub(crate) async fn start(bin: &Path, label: &str, survive_us: bool) -> anyhow::Result<Self> {
        Self::start_with(bin, label, survive_us, ClusterOptions::default()).await
    }

    /// Like [`Cluster::start`], with the options of every process.
    pub(crate) async fn start_with(
        bin: &Path,
        label: &str,
        survive_us: bool,
        options: ClusterOptions,
    ) -> anyhow::Result<Self> {
        let ClusterOptions { http, tls } = options;
        let dir = tempfile::Builder::new()
            .prefix(&format!("nebula-{label}-"))
            .tempdir()
            .context("cannot create a temporary directory")?;
        let root = dir.path().to_path_buf();
        let tls = if tls {
            Some(TestCa::new(&root, "tls"))
        } else {
            None
        };
        // Without an admin token the admin API answers only on this socket.
        let admin_socket = root.join("control-admin.sock");
        let mut control_args: Vec<OsString> = vec![
            "control".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin-socket".into(),
            admin_socket.clone().into(),
        ];
        if http {
            control_args.extend(["--http-listen".into(), "127.0.0.1:0".into()]);
        }
        control_args.extend(tls.iter().flat_map(tls_flags));
        let control_args: Vec<&OsStr> = control_args.iter().map(OsString::as_os_str).collect();
        let (control, address) =
            spawn_listening(bin, &root, "control", &control_args, survive_us).await?;
        let control_http = if http {
            Some(printed_address(&root, "control", "http on ")?)
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Self {
            http,
            control_http,
            bin: bin.to_path_buf(),
            peers: Vec::new(),
            control,
            control_url: format!("{scheme}://{address}"),
            admin_socket,
            tls,
            root,
            dir: Some(dir),
            survive_us,
        })
    }

    /// Starts daemons, one per entry of `options`, and waits until every one is registered.
    /// Returns the index of the first.
    pub(crate) async fn add_peers(&mut self, options: &[PeerOptions]) -> anyhow::Result<usize> {
        let first = self.peers.len();
        let starts = options.iter().enumerate().map(|(k, opts)| {
            let index = first + k;
            let dir = self.root.join(format!("peer{index}"));
            self.start_peer(index, dir, *opts)
        });
        let started = futures::future::join_all(starts).await;
        for peer in started {
            self.peers.push(peer?);
        }
        Ok(first)
    }

    async fn start_peer(
        &self,
        index: usize,
        dir: PathBuf,
        opts: PeerOptions,
    ) -> anyhow::Result<Peer> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let store = dir.join("store");
        let socket = dir.join("nebula.sock");
        let mut args: Vec<OsString> = vec![
            "daemon".into(),
            "--store".into(),
            store.into(),
            "--control".into(),
            self.control_url.clone().into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--socket".into(),
            socket.clone().into(),
        ];
        if self.http {
            args.extend(["--http-listen".into(), "127.0.0.1:0".into()]);
        }
        args.extend(self.tls.iter().flat_map(tls_flags));
        if let Some(rate) = opts.upload_limit {
            args.extend(["--upload-limit".into(), rate.to_string().into()]);
        }
        if let Some(rate) = opts.download_limit {
            args.extend(["--download-limit".into(), rate.to_string().into()]);
        }
        if let Some(registry) = opts.mirror_upstream {
            args.extend([
                "--registry-mirror".into(),
                "127.0.0.1:0".into(),
                "--mirror-upstream".into(),
                format!("http://{registry}").into(),
            ]);
        }
        let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
        let name = format!("peer{index}");
        let (mut proc, address) =
            spawn_listening(&self.bin, &dir, &name, &args, self.survive_us).await?;

        // `nebula status` exits 0 once the daemon is up and registered.
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::new();
        for _ in 0..3_000 {
            if !proc.is_running() {
                bail!("{name} exited while starting:\n{}", proc.log_tail());
            }
            let out = run_with_timeout(
                &self.bin,
                &["status".as_ref(), "--socket".as_ref(), socket.as_os_str()],
                CLI_TIMEOUT,
            )
            .await?;
            if out.status.success() {
                last_error.clear();
                break;
            }
            last_error = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            last_error.is_empty(),
            "{name} did not become ready within {READY_TIMEOUT:?} (last `nebula status`: \
             {last_error}); its log:\n{}",
            proc.log_tail()
        );
        let status = cli_json(
            &self.bin,
            &[
                "status".as_ref(),
                "--socket".as_ref(),
                socket.as_os_str(),
                "--json".as_ref(),
            ],
        )
        .await
        .with_context(|| format!("{name}: nebula status --json"))?;
        let peer_id = status["peer_id"]
            .as_str()
            .with_context(|| format!("{name}: no peer_id in `nebula status --json`: {status}"))?
            .to_owned();
        let http = if self.http {
            Some(printed_address(&dir, &name, "http on ")?)
        } else {
            None
        };
        let mirror = match opts.mirror_upstream {
            Some(_) => Some(printed_address(&dir, &name, "registry mirror on ")?),
            None => None,
        };
        Ok(Peer {
            dir,
            socket,
            address,
            peer_id,
            http,
            mirror,
            proc,
        })
    }

    /// Every `/metrics` endpoint: the control plane's, then each daemon's
    /// (empty unless started with HTTP).
    pub(crate) fn http_endpoints(&self) -> Vec<String> {
        self.control_http
            .iter()
            .chain(self.peers.iter().filter_map(|p| p.http.as_ref()))
            .cloned()
            .collect()
    }

    /// The control plane's URL (`http://127.0.0.1:PORT`, `https://` with TLS).
    pub(crate) fn control_url(&self) -> &str {
        &self.control_url
    }

    /// The control plane's admin socket, for `nebula admin --admin-socket PATH`.
    pub(crate) fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The control plane's process id.
    pub(crate) fn control_pid(&self) -> u32 {
        self.control.pid()
    }

    /// The temporary directory holding every store, socket and log.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The binary the cluster runs.
    pub(crate) fn bin(&self) -> &Path {
        &self.bin
    }

    /// The daemons, in start order.
    pub(crate) fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// `ARGS --socket <peer's socket>`.
    fn peer_args<'a>(&'a self, peer: usize, args: &[&'a str]) -> Vec<&'a OsStr> {
        let socket = self.peers[peer].socket.as_os_str();
        let mut all: Vec<&OsStr> = args.iter().map(|a| OsStr::new(*a)).collect();
        all.extend([OsStr::new("--socket"), socket]);
        all
    }

    /// Runs `nebula ARGS --socket <peer's socket>`, which must exit 0 and print one JSON value.
    pub(crate) async fn peer_json(&self, peer: usize, args: &[&str]) -> anyhow::Result<Value> {
        cli_json(&self.bin, &self.peer_args(peer, args))
            .await
            .with_context(|| format!("peer{peer}: nebula {}", args.join(" ")))
    }

    /// `nebula rm ID` on a daemon.
    pub(crate) async fn remove(&self, peer: usize, id: &str) -> anyhow::Result<()> {
        cli_ok(&self.bin, &self.peer_args(peer, &["rm", id]))
            .await
            .with_context(|| format!("peer{peer}: nebula rm {id}"))?;
        Ok(())
    }

    /// `nebula status --json` of a daemon.
    pub(crate) async fn status(&self, peer: usize) -> anyhow::Result<Value> {
        self.peer_json(peer, &["status", "--json"]).await
    }

    /// Chunk payload bytes a daemon has served to other peers since it started.
    pub(crate) async fn uploaded_bytes(&self, peer: usize) -> anyhow::Result<u64> {
        let status = self.status(peer).await?;
        status["uploaded_bytes"]
            .as_u64()
            .with_context(|| format!("peer{peer}: no uploaded_bytes in {status}"))
    }

    /// Verified bytes of blob `id` a daemon holds, from `nebula ls --json` (0 when absent).
    pub(crate) async fn held_bytes(&self, peer: usize, id: &str) -> anyhow::Result<u64> {
        let ls = self.peer_json(peer, &["ls", "--json"]).await?;
        let held = ls["blobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["id"] == id)
            .map(|b| {
                let size = b["size"].as_u64().unwrap_or(0);
                let verified = b["chunks_verified"].as_u64().unwrap_or(0);
                let chunk = b["chunk_size"].as_u64().unwrap_or(0);
                if b["complete"] == true {
                    size
                } else {
                    (verified * chunk).min(size)
                }
            })
            .max()
            .unwrap_or(0);
        Ok(held)
    }

    /// Writes a file of `size` random bytes in the cluster's directory; returns its path and
    /// its blob id.
    pub(crate) async fn random_blob(
        &self,
        name: &str,
        size: u64,
    ) -> anyhow::Result<(PathBuf, String)> {
        let path = self.root.join(name);
        let id = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || write_random_file(&path, size)).await??
        };
        Ok((path, id.to_hex().to_string()))
    }

    /// Whether the copy of blob `id` a daemon holds hashes to `id`: the bytes come out through
    /// `nebula fetch ID -o -` (the daemon's own export path) and are hashed as they stream, so
    /// checking writes nothing to disk.
    pub(crate) async fn verify_copy(&self, peer: usize, id: &str) -> anyhow::Result<bool> {
        use tokio::io::AsyncReadExt as _;
        let socket = self.peers[peer].socket.as_os_str();
        let args = [
            OsStr::new("fetch"),
            OsStr::new(id),
            "--socket".as_ref(),
            socket,
            "-o".as_ref(),
            "-".as_ref(),
        ];
        let mut cmd = nebula_command(&self.bin, &args, false);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let mut stdout = child.stdout.take().context("stdout is piped")?;
        let read = async {
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = stdout.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let out = child.wait_with_output().await?;
            anyhow::Ok((hasher.finalize(), out))
        };
        let (hash, out) = tokio::time::timeout(VERIFY_TIMEOUT, read)
            .await
            .with_context(|| {
                format!("peer{peer}: exporting {id} took over {VERIFY_TIMEOUT:?}")
            })??;
        ensure!(
            out.status.success(),
            "peer{peer}: nebula fetch {id} -o - failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(hash.to_hex().as_str() == id)
    }

    /// `nebula add FILE --json` on a daemon; returns the blob id, checked against `expect`.
    pub(crate) async fn add(&self, peer: usize, file: &Path, expect: &str) -> anyhow::Result<()> {
        let file = file.to_str().context("temporary paths are UTF-8")?;
        let added = self.peer_json(peer, &["add", file, "--json"]).await?;
        ensure!(
            added["id"] == expect,
            "peer{peer}: nebula add printed id {} for a file whose BLAKE3 is {expect}",
            added["id"]
        );
        Ok(())
    }

    /// Runs `nebula fetch ID --json` on each of `peers` at once, each bounded by `limit`: the
    /// blob lands in each daemon's store (no `-o`: an export is a local copy, not distribution;
    /// see [`Cluster::verify_copy`]). `Fetch::wall` counts from the launch of them all.
    /// Dropping the future kills them.
    pub(crate) async fn fetch_all(
        &self,
        peers: &[usize],
        id: &str,
        limit: Duration,
    ) -> anyhow::Result<Vec<Fetch>> {
        let start = Instant::now();
        let mut running = Vec::new();
        for &peer in peers {
            let socket = self.peers[peer].socket.as_os_str();
            let args = [
                OsStr::new("fetch"),
                OsStr::new(id),
                "--socket".as_ref(),
                socket,
                "--json".as_ref(),
            ];
            let mut cmd = nebula_command(&self.bin, &args, false);
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let child = cmd
                .spawn()
                .with_context(|| format!("cannot start {}", self.bin.display()))?;
            running.push(async move {
                let waited = tokio::time::timeout(limit, child.wait_with_output()).await;
                let wall = start.elapsed();
                let mut fetch = Fetch {
                    peer,
                    wall,
                    ok: false,
                    report: Value::Null,
                    error: String::new(),
                };
                match waited {
                    Err(_) => fetch.error = format!("timed out after {limit:?}"),
                    Ok(Err(err)) => fetch.error = format!("cannot wait for nebula fetch: {err}"),
                    Ok(Ok(out)) => {
                        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                        match serde_json::from_slice::<Value>(&out.stdout) {
                            Ok(report) if out.status.success() && report.is_object() => {
                                fetch.ok = true;
                                fetch.report = report;
                            }
                            _ => {
                                fetch.error = format!(
                                    "{}: {stderr}{}",
                                    out.status,
                                    if out.status.success() {
                                        " (no JSON object on stdout)"
                                    } else {
                                        ""
                                    }
                                );
                            }
                        }
                    }
                }
                fetch
            });
        }
        Ok(futures::future::join_all(running).await)
    }

    /// SIGKILLs a daemon (a crash, as far as the rest of the cluster can tell).
    pub(crate) fn kill_peer(&self, peer: usize) {
        self.peers[peer].proc.kill();
    }

    /// Whether a daemon is still running.
    pub(crate) fn peer_running(&mut self, peer: usize) -> bool {
        self.peers[peer].proc.is_running()
    }

    /// Peak resident memory (`VmHWM`) of a daemon, in bytes.
    pub(crate) fn peak_rss(&self, peer: usize) -> anyhow::Result<u64> {
        Ok(self.proc_status(peer)?.peak_rss)
    }

    /// A daemon's memory and thread count now, from one read of `/proc/PID/status`.
    pub(crate) fn proc_status(&self, peer: usize) -> anyhow::Result<ProcStatus> {
        ProcStatus::read(self.peers[peer].pid())
    }

    /// Resets a daemon's peak resident memory to its current one (`/proc/PID/clear_refs`).
    pub(crate) fn reset_peak_rss(&self, peer: usize) -> anyhow::Result<()> {
        let pid = self.peers[peer].pid();
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
            .with_context(|| format!("resetting VmHWM of pid {pid}"))
    }

    /// Stops every daemon, then the control plane, with SIGTERM (SIGKILL after a grace period),
    /// then removes the directory. Returns the names of processes that needed SIGKILL.
    pub(crate) async fn shutdown(mut self) -> Vec<String> {
        let mut forced = Vec::new();
        for peer in &mut self.peers {
            peer.proc.signal(libc::SIGTERM);
        }
        for peer in &mut self.peers {
            if !peer.proc.wait_for(STOP_GRACE).await {
                forced.push(peer.proc.name.clone());
                peer.proc.kill();
            }
        }
        self.control.signal(libc::SIGTERM);
        if !self.control.wait_for(STOP_GRACE).await {
            forced.push(self.control.name.clone());
            self.control.kill();
        }
        forced
    }

    /// Leaves every process and the directory in place; returns the directory.
    pub(crate) fn keep(mut self) -> PathBuf {
        self.control.detached = true;
        for peer in &mut self.peers {
            peer.proc.detached = true;
        }
        match self.dir.take() {
            Some(dir) => dir.keep(),
            None => self.root.clone(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.dir.is_none() {
            return; // kept
        }
        // Graceful first, all at once, so the grace periods overlap; each `Proc`'s own drop
        // then SIGKILLs whatever is left, before the directory goes.
        let deadline = Instant::now() + DROP_GRACE;
        for peer in &mut self.peers {
            peer.proc.signal(libc::SIGTERM);
        }
        self.control.signal(libc::SIGTERM);
        for peer in &mut self.peers {
            peer.proc.wait_until_blocking(deadline);
        }
        self.control.wait_until_blocking(deadline);
    }
}

/// Spawns a server (`nebula control` or `nebula daemon`) with stdout and stderr in files under
/// `dir`, and waits for its `listening on ADDR` line.
/// The address a process printed after its `listening on` line, on the line
/// starting with `prefix` (`http on `, `registry mirror on `; stdout goes to
/// `<name>.out`).
fn printed_address(dir: &Path, name: &str, prefix: &str) -> anyhow::Result<String> {
    let out = dir.join(format!("{name}.out"));
    let deadline = Instant::now() + START_TIMEOUT;
    for _ in 0..10_000 {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(addr) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
            return Ok(addr.trim().to_owned());
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(anyhow!(
        "{name} printed no `{prefix}ADDR` within {START_TIMEOUT:?}"
    ))
}

async fn spawn_listening(
    bin: &Path,
    dir: &Path,
    name: &str,
    args: &[&OsStr],
    survive_us: bool,
) -> anyhow::Result<(Proc, String)> {
    // Files rather than pipes: nothing has to drain them, and kept processes outlive us.
    let out_path = dir.join(format!("{name}.out"));
    let log = dir.join(format!("{name}.log"));
    let stdout =
        File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let stderr = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = nebula_command(bin, args, survive_us);
    cmd.stdout(stdout).stderr(stderr);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id().context("a child just spawned has a pid")?;
    let mut proc = Proc {
        name: name.to_owned(),
        child,
        pid,
        log,
        detached: false,
    };
    let deadline = Instant::now() + START_TIMEOUT;
    for _ in 0..10_000 {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if let Some(line) = text.lines().next()
            && text.contains('\n')
        {
            let address = line
                .strip_prefix("listening on ")
                .with_context(|| {
                    format!("{name}: expected `listening on ADDR` first on stdout, got {line:?}")
                })?
                .trim()
                .to_owned();
            return Ok((proc, address));
        }
        if !proc.is_running() {
            bail!("{name} exited while starting:\n{}", proc.log_tail());
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(anyhow!(
        "{name} printed no `listening on ADDR` within {START_TIMEOUT:?}; its log:\n{}",
        proc.log_tail()
    ))
}

/// Runs a short `nebula` command, killed if it outlives `limit`.
async fn run_with_timeout(bin: &Path, args: &[&OsStr], limit: Duration) -> anyhow::Result<Output> {
    let mut cmd = nebula_command(bin, args, false);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => Ok(out?),
        Err(_) => bail!("`nebula {}` took over {limit:?}", show_args(args)),
    }
}

/// Runs a short `nebula` command that must exit 0.
async fn cli_ok(bin: &Path, args: &[&OsStr]) -> anyhow::Result<Output> {
    let out = run_with_timeout(bin, args, CLI_TIMEOUT).await?;
    if !out.status.success() {
        bail!(
            "`nebula {}` failed ({}): {}",
            show_args(args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs a `nebula` command that must exit 0 and print one JSON value.
async fn cli_json(bin: &Path, args: &[&OsStr]) -> anyhow::Result<Value> {
    let out = cli_ok(bin, args).await?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "`nebula {}` printed no JSON: {:?}",
            show_args(args),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn show_args(args: &[&OsStr]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Mebibytes per second.
pub(crate) fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        Some(()) = async { term.as_mut()?.recv().await } => {}
    }
}
