//! A peer daemon as a `nebula daemon` process with its own store, and the
//! client commands run against it on its local socket.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::process::{Proc, run_bounded, wait_until};

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
}

impl Daemon {
    /// Starts `bin daemon` in `dir/<name>` against `control`, with extra
    /// flags and environment.
    pub fn start(
        bin: impl AsRef<Path>,
        dir: &Path,
        name: &str,
        control: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let store = dir.join(name);
        std::fs::create_dir_all(&store).unwrap();
        let launch = Launch {
            bin: bin.as_ref().to_owned(),
            control: control.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let (proc, addr) = launch.spawn(&store, "127.0.0.1:0".parse().unwrap());
        Self {
            proc,
            addr,
            socket: store.join("nebula.sock"),
            store,
            launch,
        }
    }

    /// Kills it (SIGKILL) and starts it again on the same store and port.
    pub fn restart(&mut self) {
        self.restart_on(self.addr);
    }

    /// Kills it (SIGKILL) and starts it again on the same store, listening on `listen`.
    pub fn restart_on(&mut self, listen: SocketAddr) {
        self.proc.kill();
        let (proc, addr) = self.launch.spawn(&self.store, listen);
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
    fn spawn(&self, store: &Path, listen: SocketAddr) -> (Proc, SocketAddr) {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("daemon")
            .arg("--store")
            .arg(store)
            .arg("--control")
            .arg(&self.control)
            .arg("--listen")
            .arg(listen.to_string())
            .args(["--http-listen", "127.0.0.1:0"])
            .args(&self.args)
            .env("RUST_LOG", "info,nebula_peer=debug");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let log = store.with_extension(format!("{}.log", rand::random::<u32>()));
        Proc::spawn(cmd, log)
    }
}
