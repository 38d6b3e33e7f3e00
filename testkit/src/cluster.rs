//! [`TestCluster`]: a control plane and `n` daemons in one temporary
//! directory, every daemon registered before `start` returns.
//!
//! The system tests `start` one with the fast timings and let it drop (every
//! process SIGKILLed). The demo and the benchmark [`TestCluster::launch`] one
//! as shipped, under a [`Lifetime`] of their choice, add daemons with
//! [`DaemonOptions`], and end it with [`TestCluster::shutdown`] (SIGTERM,
//! in order), [`TestCluster::keep`] (left running), or by dropping it (an
//! error, a panic, Ctrl-C: SIGTERM to all, a bounded wait, SIGKILL, then the
//! directory goes).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    control::{Control, members},
    daemon::{Daemon, DaemonSetup},
    process::{Lifetime, run_bounded, wait_until},
    tls::TestCa,
};

/// How long stopped processes get to exit after SIGTERM before they are SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a drop waits after SIGTERM: shorter, since it blocks a thread.
const DROP_GRACE: Duration = Duration::from_secs(2);

/// What every process of a launched [`TestCluster`] runs with.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterOptions {
    /// The control plane and every daemon serve `/metrics` on a loopback port of their own.
    pub http: bool,
    /// Every gRPC server and client speaks TLS (a fleet CA made for the cluster).
    pub tls: bool,
    /// How every process relates to this one.
    pub lifetime: Lifetime,
}

/// Per-daemon options of [`TestCluster::add_daemons`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DaemonOptions {
    /// `--upload-limit` in bytes per second.
    pub upload_limit: Option<u64>,
    /// `--download-limit` in bytes per second.
    pub download_limit: Option<u64>,
    /// Serve a registry mirror (on a free port) whose `--mirror-upstream` is this registry.
    pub mirror_upstream: Option<SocketAddr>,
}

/// Extra flags and environment of one daemon.
pub type DaemonFlags = (Vec<&'static str>, Vec<(&'static str, &'static str)>);

/// A control plane and `n` daemons in one temporary directory.
#[derive(Debug)]
pub struct TestCluster {
    /// The daemons, in start order (`d0`, `d1`, …).
    pub daemons: Vec<Daemon>,
    /// The control plane.
    pub control: Control,
    /// Holds every store, socket and log; removed when dropped, after the
    /// processes (fields drop in order).
    pub dir: tempfile::TempDir,
    /// The binary every process runs.
    pub bin: PathBuf,
    /// The certificate every process serves and the CA they trust, when
    /// launched with TLS.
    pub tls: Option<TestCa>,
    /// What [`TestCluster::launch`] was given (the default for `start`).
    options: ClusterOptions,
}

impl TestCluster {
    /// A control plane and `n` daemons of `bin`, with no extra flags.
    pub fn start(bin: impl AsRef<Path>, n: usize) -> Self {
        Self::start_with(bin, n, |_| (Vec::new(), Vec::new()))
    }

    /// Like `start`, with per-daemon extra flags and environment.
    pub fn start_with(bin: impl AsRef<Path>, n: usize, per: impl Fn(usize) -> DaemonFlags) -> Self {
        Self::start_flagged(bin, n, &[], per)
    }

    /// Like `start_with`, with extra flags for the control plane too.
    pub fn start_flagged(
        bin: impl AsRef<Path>,
        n: usize,
        control_flags: &[&str],
        per: impl Fn(usize) -> DaemonFlags,
    ) -> Self {
        let bin = bin.as_ref();
        let dir = tempfile::Builder::new()
            .prefix("nebula-test")
            .tempdir()
            .unwrap();
        let control = Control::start_with(
            bin,
            dir.path(),
            "127.0.0.1:0".parse().unwrap(),
            control_flags,
        );
        let daemons: Vec<Daemon> = (0..n)
            .map(|i| {
                let (args, envs) = per(i);
                Daemon::start(
                    bin,
                    dir.path(),
                    &format!("d{i}"),
                    &control.url(),
                    &args,
                    &envs,
                )
            })
            .collect();
        for d in &daemons {
            d.wait_registered();
        }
        Self {
            daemons,
            control,
            dir,
            bin: bin.to_owned(),
            tls: None,
            options: ClusterOptions::default(),
        }
    }

    /// A control plane as shipped (no daemons yet: [`TestCluster::add_daemons`])
    /// in a temporary directory named after `label`.
    pub fn launch(
        bin: impl AsRef<Path>,
        label: &str,
        options: ClusterOptions,
    ) -> anyhow::Result<Self> {
        let bin = bin.as_ref();
        let dir = tempfile::Builder::new()
            .prefix(&format!("nebula-{label}-"))
            .tempdir()
            .context("cannot create a temporary directory")?;
        let tls = options.tls.then(|| TestCa::new(dir.path(), "tls"));
        let mut extra: Vec<String> = Vec::new();
        if options.http {
            extra.extend(["--http-listen".into(), "127.0.0.1:0".into()]);
        }
        extra.extend(tls.iter().flat_map(tls_flags));
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let control = Control::try_start_shipped(bin, dir.path(), &extra, options.lifetime)?;
        Ok(Self {
            daemons: Vec::new(),
            control,
            dir,
            bin: bin.to_owned(),
            tls,
            options,
        })
    }

    /// Starts daemons as shipped, one per entry of `each`, with the cluster's
    /// options, and waits until every one is registered. Returns the index of the first.
    pub fn add_daemons(&mut self, each: &[DaemonOptions]) -> anyhow::Result<usize> {
        let first = self.daemons.len();
        let setup = DaemonSetup {
            http: self.options.http,
            log_filter: None,
            lifetime: self.options.lifetime,
        };
        let url = self.control.url();
        for (k, opts) in each.iter().enumerate() {
            let mut args: Vec<String> = self.tls.iter().flat_map(tls_flags).collect();
            if let Some(rate) = opts.upload_limit {
                args.extend(["--upload-limit".into(), rate.to_string()]);
            }
            if let Some(rate) = opts.download_limit {
                args.extend(["--download-limit".into(), rate.to_string()]);
            }
            if let Some(registry) = opts.mirror_upstream {
                args.extend([
                    "--registry-mirror".into(),
                    "127.0.0.1:0".into(),
                    "--mirror-upstream".into(),
                    format!("http://{registry}"),
                ]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let name = format!("peer{}", first + k);
            let daemon = Daemon::try_start(
                &self.bin,
                self.dir.path(),
                &name,
                &url,
                &args,
                &[],
                setup.clone(),
            )?;
            self.daemons.push(daemon);
        }
        for daemon in &mut self.daemons[first..] {
            daemon.try_wait_registered()?;
        }
        Ok(first)
    }

    /// Every `/metrics` endpoint: the control plane's, then each daemon's.
    pub fn http_endpoints(&self) -> Vec<SocketAddr> {
        self.control
            .proc
            .http
            .iter()
            .chain(self.daemons.iter().filter_map(|d| d.proc.http.as_ref()))
            .copied()
            .collect()
    }

    /// Stops every daemon, then the control plane, with SIGTERM (SIGKILL after
    /// a grace period), then removes the directory. Returns the names of the
    /// processes that needed SIGKILL.
    pub fn shutdown(mut self) -> Vec<String> {
        let mut forced = Vec::new();
        for d in &mut self.daemons {
            d.proc.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        for (i, d) in self.daemons.iter_mut().enumerate() {
            if d.proc.wait_exit(deadline).is_none() {
                forced.push(format!("peer{i}"));
                d.proc.kill();
            }
        }
        self.control.proc.signal(libc::SIGTERM);
        if self
            .control
            .proc
            .wait_exit(Instant::now() + STOP_GRACE)
            .is_none()
        {
            forced.push("control".to_owned());
            self.control.proc.kill();
        }
        forced
    }

    /// Leaves every process and the directory in place (launch it with
    /// [`Lifetime::Detachable`]); returns the directory.
    pub fn keep(mut self) -> PathBuf {
        self.control.proc.detach();
        for d in &mut self.daemons {
            d.proc.detach();
        }
        self.dir.disable_cleanup(true);
        self.dir.path().to_owned()
    }

    /// What it was launched with (the defaults for `start`).
    pub fn options(&self) -> ClusterOptions {
        self.options
    }

    /// A path in the cluster's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits until the control plane lists `n` providers for `id` (via the
    /// admin CLI on its admin socket).
    pub fn wait_providers(&self, id: &str, n: usize) -> bool {
        wait_until(Duration::from_secs(20), || {
            let mut cmd = self.control.admin();
            cmd.args(["swarm", id, "--json"]);
            members(&run_bounded(cmd, Duration::from_secs(10))) >= n
        })
    }
}

/// `--tls-cert`, `--tls-key` and `--tls-ca` of the fleet CA's certificate for
/// 127.0.0.1, which every process serves and shows (they all run on loopback).
fn tls_flags(ca: &TestCa) -> [String; 6] {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    [
        "--tls-cert".into(),
        path(&ca.cert),
        "--tls-key".into(),
        path(&ca.key),
        "--tls-ca".into(),
        path(&ca.ca),
    ]
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // The tests' clusters are SIGKILLed by their handles. A launched one
        // is stopped gracefully first, all at once so the grace periods
        // overlap; each `Proc`'s own drop then SIGKILLs what is left, before
        // the directory goes. A kept one's processes are detached: no signal.
        if self.options.lifetime == Lifetime::Handle || self.control.proc.is_detached() {
            return;
        }
        let deadline = Instant::now() + DROP_GRACE;
        for d in &mut self.daemons {
            d.proc.signal(libc::SIGTERM);
        }
        self.control.proc.signal(libc::SIGTERM);
        for d in &mut self.daemons {
            d.proc.wait_exit(deadline);
        }
        self.control.proc.wait_exit(deadline);
    }
}
