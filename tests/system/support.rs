//! Real clusters for whole-system tests: a control plane and daemons as
//! separate `nebula` processes on loopback ports chosen at run time, each
//! daemon with its own temporary store. Every process is killed by pid when
//! its handle drops; every wait is bounded.

#![allow(dead_code, missing_docs)]

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nebula_common::BlobId;

/// The `nebula` binary under test.
pub(crate) fn nebula() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nebula"))
}

/// Polls `f` until it returns true or `timeout` passes; returns whether it did.
pub(crate) fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `size` pseudo-random bytes to `path` and returns their blob id.
pub(crate) fn random_file(path: &Path, size: usize, seed: u64) -> BlobId {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(File::create(path).unwrap());
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
    BlobId::from(hasher.finalize())
}

/// The BLAKE3 id of a file's bytes (the `b3sum` reference).
pub(crate) fn file_id(path: &Path) -> BlobId {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(path).unwrap();
    BlobId::from(hasher.finalize())
}

/// A child process, SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    pub(crate) log: PathBuf,
    /// Its `--http-listen` endpoint, when it was started with one.
    pub(crate) http: Option<SocketAddr>,
    /// Its `--registry-mirror` endpoint, when it was started with one.
    pub(crate) mirror: Option<SocketAddr>,
    /// Its `--tls-ca`, `--tls-cert` and `--tls-key`, when it was started
    /// with TLS: its HTTP endpoints then answer HTTPS only (to clients with
    /// a fleet certificate under `--tls-client-auth`).
    pub(crate) tls: Option<TlsFiles>,
}

impl Proc {
    /// Starts `cmd` with stderr to `log`, waits for its `listening on ADDR`
    /// line (and its `http on ADDR` line when given `--http-listen`, and
    /// its `registry mirror on ADDR` line when given `--registry-mirror`).
    pub(crate) fn spawn(mut cmd: Command, log: PathBuf) -> (Self, SocketAddr) {
        let with_http = cmd.get_args().any(|a| a == "--http-listen");
        let with_mirror = cmd.get_args().any(|a| a == "--registry-mirror");
        let tls = {
            let args: Vec<_> = cmd.get_args().collect();
            let flag = |name: &str| {
                args.windows(2)
                    .find(|w| w[0] == name)
                    .map(|w| PathBuf::from(w[1]))
            };
            flag("--tls-ca").map(|ca| TlsFiles {
                ca,
                identity: flag("--tls-cert").zip(flag("--tls-key")),
            })
        };
        let err = File::create(&log).unwrap();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for _ in 0..3 {
                if let Some(Ok(line)) = lines.next() {
                    let _ = tx.send(line);
                }
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let mut proc = Self {
            child,
            log,
            http: None,
            mirror: None,
            tls: None,
        };
        let next = |prefix: &str| {
            let line = match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => line,
                Err(_) => panic!(
                    "process did not report its address; log:\n{}",
                    proc.log_text()
                ),
            };
            line.strip_prefix(prefix)
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                .unwrap_or_else(|| panic!("unexpected line {line:?}, expected {prefix:?}"))
        };
        let addr = next("listening on ");
        let http = with_http.then(|| next("http on "));
        let mirror = with_mirror.then(|| next("registry mirror on "));
        proc.http = http;
        proc.mirror = mirror;
        proc.tls = tls;
        (proc, addr)
    }

    /// Its HTTP endpoint; panics if it was started without `--http-listen`.
    pub(crate) fn http(&self) -> SocketAddr {
        self.http.expect("started without --http-listen")
    }

    /// Scrapes its `/metrics`.
    pub(crate) fn metrics(&self) -> Metrics {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        Metrics::parse(&body)
    }

    /// `GET path` on its HTTP endpoint, over HTTPS when it has TLS.
    pub(crate) fn http_get(&self, path: &str) -> (u16, String) {
        match &self.tls {
            Some(tls) => https_request(self.http(), tls, "GET", path),
            None => http_request(self.http(), "GET", path, None, &[]),
        }
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Signals the child, unless it was already reaped (its pid may be reused).
    pub(crate) fn signal(&mut self, sig: i32) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: sending a signal to our own, still unreaped child by pid.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns the exit status.
    pub(crate) fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly.
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

/// Timings short enough for tests: leases and probes in hundreds of ms.
pub(crate) const FAST_CONTROL: &[&str] = &[
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
pub(crate) const ADMIN_TOKEN: &str = "test-admin-token";

/// A control plane process.
#[derive(Debug)]
pub(crate) struct Control {
    pub(crate) proc: Proc,
    pub(crate) addr: SocketAddr,
    dir: PathBuf,
    /// Started with `--tls-cert`: it serves TLS, its URL is `https://`.
    tls: bool,
    /// Its `--admin-socket` (every test control plane has one).
    pub(crate) admin_socket: PathBuf,
    extra: Vec<String>,
}

impl Control {
    pub(crate) fn start(dir: &Path) -> Self {
        Self::start_on(dir, "127.0.0.1:0".parse().unwrap())
    }

    pub(crate) fn start_on(dir: &Path, listen: SocketAddr) -> Self {
        Self::start_with(dir, listen, &[])
    }

    /// A replica keeping its state in the Redis at `url`, with the admin
    /// token [`ADMIN_TOKEN`] (tests reach replicas by URL, see [`swarm_members`]).
    pub(crate) fn start_redis(dir: &Path, url: &str) -> Self {
        Self::start_with(
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
    pub(crate) fn start_with(dir: &Path, listen: SocketAddr, extra: &[&str]) -> Self {
        let name = format!("control-{}", rand::random::<u32>());
        let admin_socket = match extra.iter().position(|a| *a == "--admin-socket") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => dir.join(format!("{name}.admin.sock")),
        };
        let mut cmd = nebula();
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
            dir: dir.to_owned(),
            tls: extra.contains(&"--tls-cert"),
            admin_socket,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// `nebula admin --admin-socket <its socket>`; add the command and flags.
    pub(crate) fn admin(&self) -> Command {
        let mut cmd = nebula();
        cmd.arg("admin")
            .arg("--admin-socket")
            .arg(&self.admin_socket);
        cmd
    }

    /// Members of a blob's swarm, as `nebula admin swarm` on its admin socket lists them.
    pub(crate) fn swarm_members(&self, id: &str) -> usize {
        let out = self.admin_output(&["swarm", id, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["members"].as_array().map_or(0, Vec::len)
    }

    /// Runs `nebula admin ARGS…` on its admin socket (bounded).
    pub(crate) fn admin_output(&self, args: &[&str]) -> Output {
        let mut cmd = self.admin();
        cmd.args(args);
        run_bounded(cmd, Duration::from_secs(20))
    }

    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Kills it and starts a new one on the same port, admin socket and flags
    /// (the killed one's socket file is stale and is replaced).
    pub(crate) fn restart(&mut self) {
        self.proc.kill();
        let socket = self.admin_socket.to_str().unwrap().to_owned();
        let mut extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        if !extra.contains(&"--admin-socket") {
            extra.extend(["--admin-socket", &socket]);
        }
        let again = Self::start_with(&self.dir, self.addr, &extra);
        *self = again;
    }
}

/// A daemon process with its own store.
#[derive(Debug)]
pub(crate) struct Daemon {
    pub(crate) proc: Proc,
    pub(crate) addr: SocketAddr,
    pub(crate) store: PathBuf,
    pub(crate) socket: PathBuf,
    control: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Daemon {
    /// Starts a daemon in `dir/<name>` against `control`, with extra flags and environment.
    pub(crate) fn start(
        dir: &Path,
        name: &str,
        control: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let store = dir.join(name);
        std::fs::create_dir_all(&store).unwrap();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (proc, addr) = spawn_daemon(
            &store,
            control,
            &args,
            &envs,
            "127.0.0.1:0".parse().unwrap(),
        );
        Self {
            proc,
            addr,
            socket: store.join("nebula.sock"),
            store,
            control: control.to_owned(),
            args,
            envs,
        }
    }

    /// Kills it (SIGKILL) and starts it again on the same store and port.
    pub(crate) fn restart(&mut self) {
        self.restart_on(self.addr);
    }

    /// Kills it (SIGKILL) and starts it again on the same store, listening on `listen`.
    pub(crate) fn restart_on(&mut self, listen: SocketAddr) {
        self.proc.kill();
        let (proc, addr) = spawn_daemon(&self.store, &self.control, &self.args, &self.envs, listen);
        self.proc = proc;
        self.addr = addr;
    }

    /// Runs a client command against this daemon.
    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = nebula();
        cmd.args(args).arg("--socket").arg(&self.socket);
        run_bounded(cmd, Duration::from_secs(120))
    }

    /// Waits until `nebula status` says it is registered.
    pub(crate) fn wait_registered(&self) {
        let ok = wait_until(Duration::from_secs(20), || {
            self.cli(&["status"]).status.success()
        });
        assert!(
            ok,
            "daemon did not register; log:\n{}",
            self.proc.log_text()
        );
    }

    /// `nebula status --json`.
    pub(crate) fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// `nebula add FILE`, returning the printed id.
    pub(crate) fn add(&self, file: &Path) -> String {
        let out = self.cli(&["add", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Starts `nebula fetch ID -o OUT --json` in the background.
    pub(crate) fn spawn_fetch(&self, id: &str, out: &Path) -> Child {
        nebula()
            .args([
                "fetch",
                id,
                "-o",
                out.to_str().unwrap(),
                "--json",
                "--socket",
            ])
            .arg(&self.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

fn spawn_daemon(
    store: &Path,
    control: &str,
    args: &[String],
    envs: &[(String, String)],
    listen: SocketAddr,
) -> (Proc, SocketAddr) {
    let mut cmd = nebula();
    cmd.arg("daemon")
        .arg("--store")
        .arg(store)
        .arg("--control")
        .arg(control)
        .arg("--listen")
        .arg(listen.to_string())
        .args(["--http-listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info,nebula_peer=debug");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let log = store.with_extension(format!("{}.log", rand::random::<u32>()));
    Proc::spawn(cmd, log)
}

/// Runs a command to completion, killing it if it outlives `timeout`.
pub(crate) fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_output(child, timeout)
}

/// Waits for a child's output, killing it if it outlives `timeout`.
pub(crate) fn wait_output(child: Child, timeout: Duration) -> Output {
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: killing our own child by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            rx.recv().unwrap().unwrap()
        }
    }
}

/// A control plane and `n` daemons in one temporary directory.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(crate) daemons: Vec<Daemon>,
    pub(crate) control: Control,
    pub(crate) dir: tempfile::TempDir,
}

impl Cluster {
    pub(crate) fn start(n: usize) -> Self {
        Self::start_with(n, |_| (Vec::new(), Vec::new()))
    }

    /// Like `start`, with per-daemon extra flags and environment.
    pub(crate) fn start_with(
        n: usize,
        per: impl Fn(usize) -> (Vec<&'static str>, Vec<(&'static str, &'static str)>),
    ) -> Self {
        Self::start_flagged(n, &[], per)
    }

    /// Like `start_with`, with extra flags for the control plane too.
    pub(crate) fn start_flagged(
        n: usize,
        control_flags: &[&str],
        per: impl Fn(usize) -> (Vec<&'static str>, Vec<(&'static str, &'static str)>),
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nebula-test")
            .tempdir()
            .unwrap();
        let control =
            Control::start_with(dir.path(), "127.0.0.1:0".parse().unwrap(), control_flags);
        let daemons: Vec<Daemon> = (0..n)
            .map(|i| {
                let (args, envs) = per(i);
                Daemon::start(dir.path(), &format!("d{i}"), &control.url(), &args, &envs)
            })
            .collect();
        for d in &daemons {
            d.wait_registered();
        }
        Self {
            daemons,
            control,
            dir,
        }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits until the control plane lists `n` providers for `id` (via the
    /// admin CLI on its admin socket).
    pub(crate) fn wait_providers(&self, id: &str, n: usize) -> bool {
        wait_until(Duration::from_secs(20), || {
            let mut cmd = self.control.admin();
            cmd.args(["swarm", id, "--json"]);
            let out = run_bounded(cmd, Duration::from_secs(10));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v["members"].as_array().map_or(0, |m| m.len()) >= n
        })
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), bounded
/// in time; returns the status and the body. Enough for `/metrics`, the live
/// page's JSON and a WebDriver session, without an HTTP client crate.
pub(crate) fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut stream = connect(addr);
    exchange(&mut stream, addr, method, path, body, headers)
}

fn connect(addr: SocketAddr) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
}

/// PEM files of a TLS client: the CA it trusts, and the certificate and key
/// it shows when asked.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub(crate) ca: PathBuf,
    pub(crate) identity: Option<(PathBuf, PathBuf)>,
}

/// `method path` over HTTPS to `addr`, trusting only `tls.ca` and checking
/// the certificate against the address's IP: its status and body.
pub(crate) fn https_request(
    addr: SocketAddr,
    tls: &TlsFiles,
    method: &str,
    path: &str,
) -> (u16, String) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&tls.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match &tls.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::from(addr.ip());
    let tls = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut stream = rustls::StreamOwned::new(tls, connect(addr));
    exchange(&mut stream, addr, method, path, None, &[])
}

fn exchange(
    stream: &mut (impl Read + Write),
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let body = body.unwrap_or("");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    // Read the head, then exactly the body: some servers (chromedriver)
    // keep the connection open despite `Connection: close`.
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(n > 0, "{method} {path}: connection closed before the head");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut rest = raw[head_end + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: bad status line in {head:?}"));
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let length: Option<usize> = header("content-length").and_then(|v| v.parse().ok());
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    loop {
        let done = match length {
            Some(len) => rest.len() >= len,
            None if chunked => rest.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&buf[..n]);
    }
    let rest = String::from_utf8_lossy(&rest).into_owned();
    let body = if chunked { dechunk(&rest) } else { rest };
    (status, body)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// A parsed scrape: each series (name with its labels, exactly as printed)
/// and its value.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics(pub(crate) std::collections::BTreeMap<String, f64>);

impl Metrics {
    pub(crate) fn parse(text: &str) -> Self {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self(series)
    }

    /// The value of one series; panics when it is absent.
    pub(crate) fn get(&self, series: &str) -> f64 {
        *self
            .0
            .get(series)
            .unwrap_or_else(|| panic!("{series} not in the scrape: {:?}", self.0.keys()))
    }

    /// Whether any series of metric family `name` is present.
    pub(crate) fn has_family(&self, name: &str) -> bool {
        self.0.keys().any(|k| {
            let base = k.split('{').next().unwrap_or(k);
            base == name
                || base
                    .strip_prefix(name)
                    .is_some_and(|s| ["_bucket", "_count", "_sum", "_total"].contains(&s))
        })
    }
}

/// A free loopback port: taken from the kernel and released, for programs
/// that cannot be given port 0 (Redis, Sentinel).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A certificate authority made for one test (rcgen, ring) and a server
/// certificate it signed for 127.0.0.1, as PEM files in a directory.
#[derive(Debug, Clone)]
pub(crate) struct TestCa {
    /// The CA's certificate: what a client given `--state-ca` trusts.
    pub(crate) ca: PathBuf,
    /// The server's certificate, for 127.0.0.1.
    pub(crate) cert: PathBuf,
    /// The server's private key.
    pub(crate) key: PathBuf,
}

impl TestCa {
    pub(crate) fn new(dir: &Path, name: &str) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        params.use_authority_key_identifier_extension = true;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();

        let files = Self {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}-cert.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&files.ca, ca_cert.pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

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
    Proc {
        child,
        log,
        http: None,
        mirror: None,
        tls: None,
    }
}

/// Waits (bounded) until something listens on 127.0.0.1:`port`.
fn wait_listening(port: u16, what: &str, proc: &Proc) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let up = wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    assert!(
        up,
        "{what} did not listen on {addr}; log:\n{}",
        proc.log_text()
    );
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
pub(crate) struct RedisServer {
    proc: Option<Proc>,
    pub(crate) port: u16,
    dir: tempfile::TempDir,
    /// Arguments beyond the bind address, directory and persistence ones.
    args: Vec<String>,
    /// The CA whose certificate its port presents, when it speaks TLS.
    tls: Option<TestCa>,
}

impl RedisServer {
    /// Starts one; panics (the test fails, never skips) when `redis-server` is missing.
    pub(crate) fn start() -> Self {
        let port = free_port();
        Self::start_with(port, vec!["--port".into(), port.to_string()], None)
    }

    /// One that speaks TLS only (`--port 0 --tls-port PORT`), with the
    /// server certificate of `ca`; clients need no certificate.
    pub(crate) fn start_tls(ca: &TestCa) -> Self {
        let port = free_port();
        Self::start_with(port, tls_args(ca, port, "no"), Some(ca.clone()))
    }

    /// Like [`RedisServer::start_tls`], and clients must show a certificate `ca` signed.
    pub(crate) fn start_mutual_tls(ca: &TestCa) -> Self {
        let port = free_port();
        Self::start_with(port, tls_args(ca, port, "yes"), Some(ca.clone()))
    }

    /// A replica of `primary`, speaking TLS when it does.
    pub(crate) fn start_replica_of(primary: &RedisServer) -> Self {
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

    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `redis-cli ARGS…` against it; its stdout.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, self.tls.as_ref(), args)
    }

    /// Its log so far.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// SIGKILLs it (its data is gone: nothing is persisted).
    pub(crate) fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts it again, empty, on the same port.
    pub(crate) fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }
}

/// A Redis Sentinel of its own (`redis-server CONF --sentinel`, no extra
/// package) watching one primary as `service`: quorum 1, the primary
/// declared down after 1 s without answers; over TLS when the primary is.
#[derive(Debug)]
pub(crate) struct Sentinel {
    proc: Proc,
    pub(crate) port: u16,
    tls: Option<TestCa>,
    dir: tempfile::TempDir,
}

impl Sentinel {
    pub(crate) fn start(primary: &RedisServer, service: &str) -> Self {
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
            dir,
        }
    }

    /// `redis-cli ARGS…` against it; its stdout.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, self.tls.as_ref(), args)
    }

    /// Its log so far.
    pub(crate) fn log_text(&self) -> String {
        self.proc.log_text()
    }
}

/// Members of a blob's swarm, as `nebula admin swarm` through `control` (a
/// URL, or replicas' URLs, of control planes started with [`ADMIN_TOKEN`]) lists them.
pub(crate) fn swarm_members(control: &str, id: &str) -> usize {
    let mut cmd = nebula();
    cmd.args(["admin", "swarm", id, "--json", "--control", control]);
    cmd.args(["--admin-token", ADMIN_TOKEN]);
    let out = run_bounded(cmd, Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["members"].as_array().map_or(0, Vec::len)
}

/// Adds a peer credential (`nebula-credential`) to every call, as a daemon does.
#[derive(Debug, Clone)]
pub(crate) struct Credential(pub(crate) Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Credential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(c) = &self.0 {
            req.metadata_mut().insert("nebula-credential", c.clone());
        }
        Ok(req)
    }
}

/// A control-plane client whose calls carry `credential`.
pub(crate) type SignedClient = nebula_proto::v1::control_plane_client::ControlPlaneClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credential>,
>;

/// A made-up peer playing the attacker (or a bystander) with a raw gRPC
/// client: registered with the control plane like any join-token holder,
/// its later calls carry the credential Register returned.
#[derive(Debug)]
pub(crate) struct RawPeer {
    pub(crate) id: String,
    pub(crate) credential: String,
    pub(crate) client: SignedClient,
}

impl RawPeer {
    /// Registers `id` at `address` with the control plane at `url`.
    pub(crate) async fn register(
        url: &str,
        id: &str,
        address: &str,
    ) -> Result<Self, tonic::Status> {
        let answer = Self::client(url, None)
            .register(nebula_proto::v1::RegisterRequest {
                peer_id: id.into(),
                address: address.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(Self {
            id: id.into(),
            client: Self::client(url, Some(&answer.credential)),
            credential: answer.credential,
        })
    }

    /// A client of `url` presenting `credential`.
    pub(crate) fn client(url: &str, credential: Option<&str>) -> SignedClient {
        let channel = tonic::transport::Channel::from_shared(url.to_owned())
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        nebula_proto::v1::control_plane_client::ControlPlaneClient::with_interceptor(
            channel,
            Credential(credential.map(|c| c.parse().unwrap())),
        )
    }

    /// The Hello that must open its exchange streams.
    pub(crate) fn hello(&self) -> nebula_proto::v1::ExchangeRequest {
        nebula_proto::v1::ExchangeRequest {
            request_id: 0,
            kind: Some(nebula_proto::v1::exchange_request::Kind::Hello(
                nebula_proto::v1::Hello {
                    peer_id: self.id.clone(),
                    address: String::new(),
                },
            )),
        }
    }
}
