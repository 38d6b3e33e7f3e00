//! A peer daemon as a `nebula daemon` process with its own store, and the
//! client commands run against it on its local socket.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};

use crate::process::{Lifetime, Proc, nebula_command, run_bounded, wait_until};

/// How a daemon is started, beyond its flags.
#[derive(Debug, Clone)]
pub struct DaemonSetup {
    /// Serve `/metrics` on a loopback port of its own (`--http-listen`).
    pub http: bool,
    /// Its `RUST_LOG`; `None` leaves the caller's.
    pub log_filter: Option<&'static str>,
    /// How it relates to this process.
    pub lifetime: Lifetime,
}

impl Default for DaemonSetup {
    /// What the system tests run: HTTP, the peer's debug logs, killed with its handle.
    fn default() -> Self {
        Self {
            http: true,
            log_filter: Some("info,nebula_peer=debug"),
            lifetime: Lifetime::Handle,
        }
    }
}

/// A daemon process with its own store.
#[derive(Debug)]
pub struct Daemon {
    /// The process.
    pub proc: Proc,
    /// The address its peer exchange listens on.
    pub addr: SocketAddr,
    /// Its store directory.
    pub store: PathBuf,
    /// Its local API socket.
    pub socket: PathBuf,
    /// What `restart` starts again: the binary, control URL, flags and environment.
    launch: Launch,
}

#[derive(Debug)]
struct Launch {
    bin: PathBuf,
    control: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    setup: DaemonSetup,
}

impl Daemon {
    /// Starts `bin daemon` in `dir/<name>` against `control`, with extra
    /// flags and environment. Panics if it cannot; see [`Daemon::try_start`].
    pub fn start(
        bin: impl AsRef<Path>,
        dir: &Path,
        name: &str,
        control: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        Self::try_start(bin, dir, name, control, args, envs, DaemonSetup::default())
            .unwrap_or_else(|err| panic!("{err:#}"))
    }

    /// Like [`Daemon::start`], set up as `setup` says, returning what went wrong.
    pub fn try_start(
        bin: impl AsRef<Path>,
        dir: &Path,
        name: &str,
        control: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        setup: DaemonSetup,
    ) -> anyhow::Result<Self> {
        let store = dir.join(name);
        std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
        let launch = Launch {
            bin: bin.as_ref().to_owned(),
            control: control.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            setup,
        };
        let (proc, addr) = launch
            .spawn(&store, ([127, 0, 0, 1], 0).into())
            .with_context(|| format!("daemon {name}"))?;
        Ok(Self {
            proc,
            addr,
            socket: store.join("nebula.sock"),
            store,
            launch,
        })
    }

    /// Kills it (SIGKILL) and starts it again on the same store and port.
    pub fn restart(&mut self) {
        self.restart_on(self.addr);
    }

    /// Kills it (SIGKILL) and starts it again on the same store, listening on `listen`.
    pub fn restart_on(&mut self, listen: SocketAddr) {
        self.proc.kill();
        let (proc, addr) = self
            .launch
            .spawn(&self.store, listen)
            .unwrap_or_else(|err| panic!("{err:#}"));
        self.proc = proc;
        self.addr = addr;
    }

    /// A `nebula` command with the daemon's binary; add the arguments.
    pub fn nebula(&self) -> Command {
        Command::new(&self.launch.bin)
    }

    /// Runs a client command against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.nebula();
        cmd.args(args).arg("--socket").arg(&self.socket);
        run_bounded(cmd, Duration::from_secs(120))
    }

    /// Waits until `nebula status` says it is registered.
    pub fn wait_registered(&self) {
        let ok = wait_until(Duration::from_secs(20), || {
            self.cli(&["status"]).status.success()
        });
        assert!(
            ok,
            "daemon did not register; log:\n{}",
            self.proc.log_text()
        );
    }

    /// Like [`Daemon::wait_registered`] (30 s), returning what went wrong.
    pub fn try_wait_registered(&mut self) -> anyhow::Result<()> {
        let mut last = String::new();
        let mut exited = false;
        let ok = wait_until(Duration::from_secs(30), || {
            if !self.proc.is_running() {
                exited = true;
                return true;
            }
            let out = self.cli(&["status"]);
            last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            out.status.success()
        });
        ensure!(
            ok && !exited,
            "daemon {} did not register (last `nebula status`: {last}); its log:\n{}",
            self.store.display(),
            self.proc.log_tail()
        );
        Ok(())
    }

    /// Its peer id, from `nebula status --json`.
    pub fn peer_id(&self) -> anyhow::Result<String> {
        let status = self.status();
        status["peer_id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no peer_id in `nebula status --json`: {status}"))
    }

    /// `nebula status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// `nebula add FILE`, returning the printed id.
    pub fn add(&self, file: &Path) -> String {
        let out = self.cli(&["add", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Starts `nebula fetch ID -o OUT --json` in the background.
    pub fn spawn_fetch(&self, id: &str, out: &Path) -> Child {
        self.nebula()
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

impl Launch {
    fn spawn(&self, store: &Path, listen: SocketAddr) -> anyhow::Result<(Proc, SocketAddr)> {
        let mut cmd = nebula_command(&self.bin, Lifetime::Handle);
        cmd.arg("daemon")
            .arg("--store")
            .arg(store)
            .arg("--control")
            .arg(&self.control)
            .arg("--listen")
            .arg(listen.to_string());
        if self.setup.http {
            cmd.args(["--http-listen", "127.0.0.1:0"]);
        }
        cmd.args(&self.args);
        if let Some(filter) = self.setup.log_filter {
            cmd.env("RUST_LOG", filter);
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let log = store.with_extension(format!("{}.log", rand::random::<u32>()));
        Proc::try_spawn(cmd, log, self.setup.lifetime)
    }
}
