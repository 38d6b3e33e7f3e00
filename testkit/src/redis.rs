//! Redis for the control plane's shared state: a `redis-server` of its own
//! per test (plain, TLS or mutual TLS, a replica) and a Sentinel watching
//! one, each on a free loopback port and SIGKILLed by pid when dropped.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    process::{Proc, free_port, run_bounded, wait_listening},
    tls::TestCa,
};

/// Starts `redis-server` with `args` and stderr to `log`; panics (the test
/// fails, never skips) when it is missing.
fn spawn_redis(args: &[String], log: PathBuf) -> Proc {
    let mut cmd = Command::new("redis-server");
    // Redis logs to stdout; both streams go to `log`.
    let out = File::create(&log).unwrap();
    cmd.args(args)
        .stdin(Stdio::null())
        .stderr(out.try_clone().unwrap())
        .stdout(out);
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not installed; run tests/install-deps.sh (apt-get install -y redis-server)"
        ),
        Err(e) => panic!("cannot start redis-server: {e}"),
    };
    Proc::adopt(child, log)
}

/// `redis-server` flags that make its port (`port`) speak TLS only, with
/// the server certificate of `ca`; `auth_clients`: `no`, or `yes` when
/// clients must show a certificate `ca` signed. Replication (and a
/// Sentinel's links) go over TLS too.
fn tls_args(ca: &TestCa, port: u16, auth_clients: &str) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        "--port".into(),
        "0".into(),
        "--tls-port".into(),
        port.to_string(),
        "--tls-cert-file".into(),
        path(&ca.cert),
        "--tls-key-file".into(),
        path(&ca.key),
        "--tls-ca-cert-file".into(),
        path(&ca.ca),
        "--tls-auth-clients".into(),
        auth_clients.into(),
        "--tls-replication".into(),
        "yes".into(),
    ]
}

/// `redis-cli -p PORT ARGS…` (over TLS trusting `tls`'s CA when given), its
/// stdout; bounded.
fn redis_cli(port: u16, tls: Option<&TestCa>, args: &[&str]) -> String {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p"]).arg(port.to_string());
    if let Some(ca) = tls {
        cmd.args(["--tls", "--cacert"]).arg(&ca.ca);
    }
    cmd.arg("--raw").args(args);
    let out = run_bounded(cmd, Duration::from_secs(10));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `redis-server` of its own: a free loopback port, a temporary directory,
/// no persistence; SIGKILLed by pid when dropped.
#[derive(Debug)]
pub struct RedisServer {
    proc: Option<Proc>,
    /// The port it listens on (TLS only, when it speaks TLS).
    pub port: u16,
    /// Its working directory, removed after the process.
    dir: tempfile::TempDir,
    /// Arguments beyond the bind address, directory and persistence ones.
    args: Vec<String>,
    /// The CA whose certificate its port presents, when it speaks TLS.
    tls: Option<TestCa>,
}

impl RedisServer {
    /// Whether `redis-server` can be run here (for callers that report its
    /// absence rather than fail).
    pub fn is_installed() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts one; panics (the test fails, never skips) when `redis-server` is missing.
    pub fn start() -> Self {
        let port = free_port();
        Self::start_with(port, vec!["--port".into(), port.to_string()], None)
    }

    /// One that speaks TLS only (`--port 0 --tls-port PORT`), with the
    /// server certificate of `ca`; clients need no certificate.
    pub fn start_tls(ca: &TestCa) -> Self {
        let port = free_port();
        Self::start_with(port, tls_args(ca, port, "no"), Some(ca.clone()))
    }

    /// Like [`RedisServer::start_tls`], and clients must show a certificate `ca` signed.
    pub fn start_mutual_tls(ca: &TestCa) -> Self {
        let port = free_port();
        Self::start_with(port, tls_args(ca, port, "yes"), Some(ca.clone()))
    }

    /// A replica of `primary`, speaking TLS when it does.
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        let port = free_port();
        let mut args = match &primary.tls {
            Some(ca) => tls_args(ca, port, "no"),
            None => vec!["--port".into(), port.to_string()],
        };
        args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port.to_string(),
        ]);
        Self::start_with(port, args, primary.tls.clone())
    }

    fn start_with(port: u16, args: Vec<String>, tls: Option<TestCa>) -> Self {
        let mut server = Self {
            proc: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            args,
            tls,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut args: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
        ]
        .map(String::from)
        .into();
        args.push(self.dir.path().display().to_string());
        args.extend(self.args.iter().cloned());
        let proc = spawn_redis(&args, self.dir.path().join("redis.log"));
        wait_listening(self.port, "redis-server", &proc);
        self.proc = Some(proc);
    }

    /// Its process id; panics while it is killed.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("redis-server is running").pid() as u32
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` when it speaks TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `redis-cli ARGS…` against it; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, self.tls.as_ref(), args)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// SIGKILLs it (its data is gone: nothing is persisted).
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts it again, empty, on the same port.
    pub fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }
}

/// A Redis Sentinel of its own (`redis-server CONF --sentinel`, no extra
/// package) watching one primary as `service`: quorum 1, the primary
/// declared down after 1 s without answers; over TLS when the primary is.
#[derive(Debug)]
pub struct Sentinel {
    proc: Proc,
    /// The port it listens on.
    pub port: u16,
    tls: Option<TestCa>,
    /// Its directory (the rewritten configuration), removed after the process.
    _dir: tempfile::TempDir,
}

impl Sentinel {
    /// Starts one watching `primary` as `service`.
    pub fn start(primary: &RedisServer, service: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // Sentinel rewrites its configuration file: it lives in its own directory.
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "bind 127.0.0.1\ndir {}\n\
                 sentinel monitor {service} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 5000\n\
                 sentinel parallel-syncs {service} 1\n",
                dir.path().display(),
                primary.port,
            ),
        )
        .unwrap();
        let mut args = vec![conf.display().to_string(), "--sentinel".into()];
        match &primary.tls {
            Some(ca) => args.extend(tls_args(ca, port, "no")),
            None => args.extend(["--port".into(), port.to_string()]),
        }
        let proc = spawn_redis(&args, dir.path().join("sentinel.log"));
        wait_listening(port, "redis sentinel", &proc);
        Self {
            proc,
            port,
            tls: primary.tls.clone(),
            _dir: dir,
        }
    }

    /// `redis-cli ARGS…` against it; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, self.tls.as_ref(), args)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}
