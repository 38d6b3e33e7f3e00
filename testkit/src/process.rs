//! Child processes: [`Proc`] (SIGKILLed and reaped by pid when dropped,
//! unless detached), how a child relates to us ([`Lifetime`]), bounded runs
//! of short commands and bounded polling.

use std::{
    fs::File,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

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

/// How long a process may take to print its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How a child relates to this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed when its handle drops (the system tests).
    #[default]
    Handle,
    /// Also in a process group of its own (a Ctrl-C at the terminal reaches
    /// only this process, which then stops its children in order) and
    /// SIGKILLed by the kernel when the thread that started it dies
    /// (`PR_SET_PDEATHSIG`), so even a SIGKILLed example leaves nothing behind.
    /// Start such children only from threads that live as long as they should.
    Owned,
    /// A process group of its own and no death signal: [`Proc::detach`] can
    /// leave it running after this process exits (`swarm --keep`).
    Detachable,
}

/// A `bin` command with stdin closed and no `NEBULA_*` variable inherited
/// from the caller's shell (an exported `NEBULA_ADVERTISE` or `NEBULA_JSON`
/// would change what the children do), set up for `lifetime`. Variables the
/// caller sets on the command afterwards still apply.
pub fn nebula_command(bin: &Path, lifetime: Lifetime) -> Command {
    let mut cmd = Command::new(bin);
    cmd.stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NEBULA_") {
            cmd.env_remove(key);
        }
    }
    set_lifetime(&mut cmd, lifetime);
    cmd
}

/// Process group and death signal of a command about to be spawned.
fn set_lifetime(cmd: &mut Command, lifetime: Lifetime) {
    if lifetime == Lifetime::Handle {
        return;
    }
    cmd.process_group(0);
    if lifetime == Lifetime::Owned {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid), allocating nothing.
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
}

/// A child process, SIGKILLed and reaped when dropped unless detached.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// Captured at spawn: `Child::id` of a reaped child may name another process.
    pid: i32,
    /// Set once the child is reaped: from then on its pid may name another
    /// process, so [`Proc::kill_now`] must not signal it.
    reaped: AtomicBool,
    /// Set by [`Proc::detach`]: dropping leaves the process running.
    detached: bool,
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
            pid: child.id() as i32,
            child,
            reaped: AtomicBool::new(false),
            detached: false,
            log,
            http: None,
            mirror: None,
            tls: None,
        }
    }

    /// Starts `cmd` with stderr to `log`, waits for its `listening on ADDR`
    /// line (and its `http on ADDR` line when given `--http-listen`, and
    /// its `registry mirror on ADDR` line when given `--registry-mirror`).
    /// Panics if it cannot; see [`Proc::try_spawn`].
    pub fn spawn(cmd: Command, log: PathBuf) -> (Self, SocketAddr) {
        Self::try_spawn(cmd, log, Lifetime::Handle).unwrap_or_else(|err| panic!("{err:#}"))
    }

    /// Like [`Proc::spawn`], set up for `lifetime`, returning what went wrong.
    /// Stdout goes to a file beside `log` (`.out`), not a pipe: nothing has to
    /// drain it, and a detached process keeps writing after we exit.
    pub fn try_spawn(
        mut cmd: Command,
        log: PathBuf,
        lifetime: Lifetime,
    ) -> anyhow::Result<(Self, SocketAddr)> {
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
        let out_path = log.with_extension("out");
        let out =
            File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
        let err = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        set_lifetime(&mut cmd, lifetime);
        let child = cmd
            .stdout(out)
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", cmd.get_program().to_string_lossy()))?;
        let mut proc = Self::adopt(child, log);
        let wanted = 1 + usize::from(with_http) + usize::from(with_mirror);
        let deadline = Instant::now() + START_TIMEOUT;
        let lines = loop {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            let lines: Vec<String> = text.split_inclusive('\n').map(str::to_owned).collect();
            if lines.iter().filter(|l| l.ends_with('\n')).count() >= wanted {
                break lines;
            }
            if !proc.is_running() {
                bail!("process exited while starting; log:\n{}", proc.log_tail());
            }
            if Instant::now() >= deadline {
                bail!(
                    "process did not report its address within {START_TIMEOUT:?}; log:\n{}",
                    proc.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut lines = lines.iter();
        let mut next = |prefix: &str| -> anyhow::Result<SocketAddr> {
            let line = lines.next().map(|l| l.trim()).unwrap_or_default();
            line.strip_prefix(prefix)
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                .with_context(|| format!("unexpected line {line:?}, expected {prefix:?}"))
        };
        let addr = next("listening on ")?;
        proc.http = if with_http {
            Some(next("http on ")?)
        } else {
            None
        };
        proc.mirror = if with_mirror {
            Some(next("registry mirror on ")?)
        } else {
            None
        };
        proc.tls = tls;
        Ok((proc, addr))
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
        self.pid
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        let running = matches!(self.child.try_wait(), Ok(None));
        if !running {
            self.reaped.store(true, Ordering::Relaxed);
        }
        running
    }

    /// SIGKILLs it without waiting or reaping, from a shared handle (a crash,
    /// as far as the rest of the cluster can tell, in the middle of a run).
    pub fn kill_now(&self) {
        // Only `&mut self` methods reap, so while we hold `&self` a child not
        // yet reaped keeps its pid (a zombie's, at worst).
        if !self.reaped.load(Ordering::Relaxed) {
            // SAFETY: signalling our own unreaped child by pid.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }

    /// Signals the child, unless it was already reaped (its pid may be reused).
    pub fn signal(&mut self, sig: i32) {
        if self.is_running() {
            // SAFETY: sending a signal to our own, still unreaped child by pid.
            unsafe { libc::kill(self.pid, sig) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped.store(true, Ordering::Relaxed);
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Instant::now() + Duration::from_secs(15));
        if status.is_none() {
            self.kill();
        }
        status
    }

    /// Waits until it has exited, at most until `deadline`; its exit status if it has.
    pub fn wait_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped.store(true, Ordering::Relaxed);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Leaves it running when the handle drops.
    pub fn detach(&mut self) {
        self.detached = true;
    }

    /// Whether [`Proc::detach`] was called.
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 15 lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
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
