//! [`TestCluster`]: a control plane and `n` daemons in one temporary
//! directory, every daemon registered before `start` returns.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    control::{Control, members},
    daemon::Daemon,
    process::{run_bounded, wait_until},
};

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
        }
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
