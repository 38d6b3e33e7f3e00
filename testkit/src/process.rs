//! Child processes for tests: [`Proc`] (SIGKILLed and reaped by pid when
//! dropped), bounded runs of short commands and bounded polling.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::http::{Metrics, TlsFiles, http_request, https_request};

/// Polls `f` until it returns true or `timeout` passes; returns whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
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

/// Polls `check` every 100 ms until it holds, panicking once `limit`
/// passes; returns the time it took.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A free loopback port: taken from the kernel and released, for programs
/// that cannot be given port 0 (Redis, Sentinel).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (bounded) until something listens on 127.0.0.1:`port`.
pub(crate) fn wait_listening(port: u16, what: &str, proc: &Proc) {
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

/// A child process, SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// The file its stderr goes to.
    pub log: PathBuf,
    /// Its `--http-listen` endpoint, when it was started with one.
    pub http: Option<SocketAddr>,
    /// Its `--registry-mirror` endpoint, when it was started with one.
    pub mirror: Option<SocketAddr>,
    /// Its `--tls-ca`, `--tls-cert` and `--tls-key`, when it was started
    /// with TLS: its HTTP endpoints then answer HTTPS only (to clients with
    /// a fleet certificate under `--tls-client-auth`).
    pub tls: Option<TlsFiles>,
}

impl Proc {
    /// Takes charge of a child already started with its output going to `log`.
    pub(crate) fn adopt(child: Child, log: PathBuf) -> Self {
        Self {
            child,
            log,
            http: None,
            mirror: None,
            tls: None,
        }
    }

    /// Starts `cmd` with stderr to `log`, waits for its `listening on ADDR`
    /// line (and its `http on ADDR` line when given `--http-listen`, and
    /// its `registry mirror on ADDR` line when given `--registry-mirror`).
    pub fn spawn(mut cmd: Command, log: PathBuf) -> (Self, SocketAddr) {
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
        let mut proc = Self::adopt(child, log);
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
    pub fn http(&self) -> SocketAddr {
        self.http.expect("started without --http-listen")
    }

    /// Scrapes its `/metrics`.
    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        Metrics::parse(&body)
    }

    /// `GET path` on its HTTP endpoint, over HTTPS when it has TLS.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        match &self.tls {
            Some(tls) => https_request(self.http(), tls, "GET", path),
            None => http_request(self.http(), "GET", path, None, &[]),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Signals the child, unless it was already reaped (its pid may be reused).
    pub fn signal(&mut self, sig: i32) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: sending a signal to our own, still unreaped child by pid.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
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

    /// Its log so far.
    pub fn log_text(&self) -> String {
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

/// Runs a command to completion, killing it if it outlives `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_output(child, timeout)
}

/// Waits for a child's output, killing it if it outlives `timeout`.
pub fn wait_output(child: Child, timeout: Duration) -> Output {
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
