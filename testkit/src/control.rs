//! A control plane as a `nebula control` process: fast timings, an admin
//! socket of its own, restartable on the same port and flags.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use crate::process::{Proc, run_bounded};

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
        let bin = bin.as_ref();
        let name = format!("control-{}", rand::random::<u32>());
        let admin_socket = match extra.iter().position(|a| *a == "--admin-socket") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => dir.join(format!("{name}.admin.sock")),
        };
        let mut cmd = Command::new(bin);
        cmd.arg("control")
            .arg("--listen")
            .arg(listen.to_string())
            .args(["--http-listen", "127.0.0.1:0"])
            .args(FAST_CONTROL)
            .args(extra);
        if extra.contains(&"--state") && !extra.contains(&"--signing-key") {
            cmd.arg("--signing-key").arg(dir.join("signing.key"));
        }
        if !extra.contains(&"--admin-socket") {
            cmd.arg("--admin-socket").arg(&admin_socket);
        }
        cmd.env("RUST_LOG", "info");
        let log = dir.join(format!("{name}.log"));
        let (proc, addr) = Proc::spawn(cmd, log);
        Self {
            proc,
            addr,
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            tls: extra.contains(&"--tls-cert"),
            admin_socket,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        }
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
        let again = Self::start_with(&self.bin, &self.dir, self.addr, &extra);
        *self = again;
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

/// The length of `members` in `nebula admin swarm --json` output (0 when unreadable).
pub(crate) fn members(out: &Output) -> usize {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["members"].as_array().map_or(0, Vec::len)
}
