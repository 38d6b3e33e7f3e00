//! A control plane as a `nebula control` process: fast timings, an admin
//! socket of its own, restartable on the same port and flags.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use nebula_proto::v1::admin_client::AdminClient;
use tonic::transport::Channel;

use anyhow::Context as _;

use crate::process::{Lifetime, Proc, nebula_command, run_bounded};

/// How a control plane runs: timings, HTTP endpoint, logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// [`FAST_CONTROL`] timings, an HTTP endpoint, info logs: the system tests.
    Fast,
    /// As shipped, with the control plane's debug logs: [`Control::standalone`].
    Standalone,
    /// As shipped, with the caller's `RUST_LOG`: the demo and the benchmark.
    Shipped,
}

/// Timings short enough for tests: leases and probes in hundreds of ms.
pub const FAST_CONTROL: &[&str] = &[
    "--lease-ttl",
    "3s",
    "--heartbeat-interval",
    "500ms",
    "--probe-interval",
    "500ms",
];

/// The admin token of the control planes that tests reach over TCP with
/// `nebula admin --control URL` (replicas, host names): without a token, the
/// admin API answers only on the admin socket.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A control plane process.
#[derive(Debug)]
pub struct Control {
    /// The process.
    pub proc: Proc,
    /// The address its gRPC server listens on.
    pub addr: SocketAddr,
    bin: PathBuf,
    dir: PathBuf,
    /// Started with `--tls-cert`: it serves TLS, its URL is `https://`.
    tls: bool,
    /// Its `--admin-socket` (every test control plane has one).
    pub admin_socket: PathBuf,
    extra: Vec<String>,
    /// Its timings, HTTP endpoint and logs, kept for `restart`.
    mode: Mode,
    /// The temporary directory of a [`Control::standalone`] one, removed after the process.
    owned_dir: Option<tempfile::TempDir>,
}

impl Control {
    /// Starts `bin control` on a port of its own, logging in `dir`.
    pub fn start(bin: impl AsRef<Path>, dir: &Path) -> Self {
        Self::start_on(bin, dir, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts `bin control --listen LISTEN`, logging in `dir`.
    pub fn start_on(bin: impl AsRef<Path>, dir: &Path, listen: SocketAddr) -> Self {
        Self::start_with(bin, dir, listen, &[])
    }

    /// A replica keeping its state in the Redis at `url`, with the admin
    /// token [`ADMIN_TOKEN`] (tests reach replicas by URL, see [`swarm_members`]).
    pub fn start_redis(bin: impl AsRef<Path>, dir: &Path, url: &str) -> Self {
        Self::start_with(
            bin,
            dir,
            "127.0.0.1:0".parse().unwrap(),
            &[
                "--state",
                url,
                "--state-timeout",
                "500ms",
                "--admin-token",
                ADMIN_TOKEN,
            ],
        )
    }

    /// Starts `nebula control` with the fast timings, an admin socket in
    /// `dir` (unless `extra` names one) and extra flags. Replicas on Redis
    /// started with the same `dir` share one signing key.
    pub fn start_with(
        bin: impl AsRef<Path>,
        dir: &Path,
        listen: SocketAddr,
        extra: &[&str],
    ) -> Self {
        Self::launch(
            bin.as_ref(),
            dir,
            listen,
            extra,
            Mode::Fast,
            Lifetime::Handle,
        )
        .unwrap_or_else(|err| panic!("{err:#}"))
    }

    /// `nebula control ARGS…` as shipped (default timings, no HTTP endpoint
    /// unless `extra` asks, the caller's `RUST_LOG`) in `dir`, with an admin
    /// socket there, set up for `lifetime`: the demo's and the benchmark's.
    pub fn try_start_shipped(
        bin: impl AsRef<Path>,
        dir: &Path,
        extra: &[&str],
        lifetime: Lifetime,
    ) -> anyhow::Result<Self> {
        let listen = ([127, 0, 0, 1], 0).into();
        Self::launch(bin.as_ref(), dir, listen, extra, Mode::Shipped, lifetime)
    }

    /// `nebula control ARGS…` as shipped (default timings, no HTTP endpoint,
    /// the control plane's debug logs) in a temporary directory of its own:
    /// what the control-plane tests measure.
    pub fn standalone(bin: impl AsRef<Path>, args: &[&str]) -> Self {
        Self::standalone_on(bin, "127.0.0.1:0".parse().unwrap(), args)
    }

    /// Like [`Control::standalone`], listening on `listen`.
    pub fn standalone_on(bin: impl AsRef<Path>, listen: SocketAddr, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut control = Self::launch(
            bin.as_ref(),
            dir.path(),
            listen,
            args,
            Mode::Standalone,
            Lifetime::Handle,
        )
        .unwrap_or_else(|err| panic!("{err:#}"));
        control.owned_dir = Some(dir);
        control
    }

    fn launch(
        bin: &Path,
        dir: &Path,
        listen: SocketAddr,
        extra: &[&str],
        mode: Mode,
        lifetime: Lifetime,
    ) -> anyhow::Result<Self> {
        let fast = mode == Mode::Fast;
        let name = format!("control-{}", rand::random::<u32>());
        let admin_socket = match extra.iter().position(|a| *a == "--admin-socket") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => dir.join(format!("{name}.admin.sock")),
        };
        let mut cmd = nebula_command(bin, Lifetime::Handle);
        cmd.arg("control").arg("--listen").arg(listen.to_string());
        if fast {
            cmd.args(["--http-listen", "127.0.0.1:0"])
                .args(FAST_CONTROL);
        }
        cmd.args(extra);
        if extra.contains(&"--state") && !extra.contains(&"--signing-key") {
            cmd.arg("--signing-key").arg(dir.join("signing.key"));
        }
        if !extra.contains(&"--admin-socket") {
            cmd.arg("--admin-socket").arg(&admin_socket);
        }
        match mode {
            Mode::Fast => {
                cmd.env("RUST_LOG", "info");
            }
            Mode::Standalone => {
                cmd.env("RUST_LOG", "nebula_control=debug,info");
            }
            Mode::Shipped => {}
        }
        let log = dir.join(format!("{name}.log"));
        let (proc, addr) = Proc::try_spawn(cmd, log, lifetime).context("control plane")?;
        Ok(Self {
            proc,
            addr,
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            tls: extra.contains(&"--tls-cert"),
            admin_socket,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            mode,
            owned_dir: None,
        })
    }

    /// `nebula admin --admin-socket <its socket>`; add the command and flags.
    pub fn admin(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("admin")
            .arg("--admin-socket")
            .arg(&self.admin_socket);
        cmd
    }

    /// Members of a blob's swarm, as `nebula admin swarm` on its admin socket lists them.
    pub fn swarm_members(&self, id: &str) -> usize {
        let out = self.admin_output(&["swarm", id, "--json"]);
        members(&out)
    }

    /// Runs `nebula admin ARGS…` on its admin socket (bounded).
    pub fn admin_output(&self, args: &[&str]) -> Output {
        let mut cmd = self.admin();
        cmd.args(args);
        run_bounded(cmd, Duration::from_secs(20))
    }

    /// `http://ADDR`, or `https://ADDR` when it serves TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Kills it and starts a new one on the same port, admin socket and flags
    /// (the killed one's socket file is stale and is replaced).
    pub fn restart(&mut self) {
        self.proc.kill();
        let socket = self.admin_socket.to_str().unwrap().to_owned();
        let mut extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        if !extra.contains(&"--admin-socket") {
            extra.extend(["--admin-socket", &socket]);
        }
        let mut again = Self::launch(
            &self.bin,
            &self.dir,
            self.addr,
            &extra,
            self.mode,
            Lifetime::Handle,
        )
        .unwrap_or_else(|err| panic!("{err:#}"));
        again.owned_dir = self.owned_dir.take();
        *self = again;
    }

    /// SIGKILL by pid, then reap.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        self.proc.log_text()
    }

    /// Runs `nebula admin --admin-socket <its socket> ARGS…` (bounded);
    /// returns (exit code, stdout, stderr).
    pub async fn admin_cli(&self, args: &[&str]) -> (i32, String, String) {
        let socket = self.admin_socket.to_str().unwrap();
        admin_run(&self.bin, &[&["--admin-socket", socket][..], args].concat()).await
    }

    /// A raw Admin client on its admin socket.
    pub async fn admin_client(&self) -> AdminClient<Channel> {
        let channel =
            nebula_proto::unix::connect(nebula_proto::unix::endpoint(), self.admin_socket.clone())
                .await
                .unwrap();
        AdminClient::new(channel)
    }
}

/// Members of a blob's swarm, as `bin admin swarm` through `control` (a
/// URL, or replicas' URLs, of control planes started with [`ADMIN_TOKEN`]) lists them.
pub fn swarm_members(bin: impl AsRef<Path>, control: &str, id: &str) -> usize {
    let mut cmd = Command::new(bin.as_ref());
    cmd.args(["admin", "swarm", id, "--json", "--control", control]);
    cmd.args(["--admin-token", ADMIN_TOKEN]);
    let out = run_bounded(cmd, Duration::from_secs(10));
    members(&out)
}

/// Runs `bin admin --control URL ARGS…` (bounded); returns (exit code,
/// stdout, stderr).
pub async fn admin_cli(bin: impl AsRef<Path>, url: &str, args: &[&str]) -> (i32, String, String) {
    admin_run(bin.as_ref(), &[&["--control", url][..], args].concat()).await
}

/// Runs `bin admin ARGS…` without the caller's admin token or JSON
/// preference, panicking after 30 s; returns (exit code, stdout, stderr).
async fn admin_run(bin: &Path, args: &[&str]) -> (i32, String, String) {
    let child = tokio::process::Command::new(bin)
        .arg("admin")
        .args(args)
        .env_remove("NEBULA_ADMIN_TOKEN")
        .env_remove("NEBULA_JSON")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .expect("nebula admin took over 30 s")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The length of `members` in `nebula admin swarm --json` output (0 when unreadable).
pub(crate) fn members(out: &Output) -> usize {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["members"].as_array().map_or(0, Vec::len)
}
