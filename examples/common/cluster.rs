//! What the swarm demo and the benchmark add to the test kit's
//! [`TestCluster`](nebula_testkit::TestCluster): the throughput figure they
//! print and the signal that stops them. The processes, their cleanup
//! (process groups, the death signal, SIGTERM then SIGKILL, the temporary
//! directory) and `--keep` are the kit's.
//!
//! Both example binaries include this file with `#[path]`.

use std::time::Duration;

/// Mebibytes per second.
pub(crate) fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        Some(()) = async { term.as_mut()?.recv().await } => {}
    }
}

/// A cluster started from this thread and stopped with it: its processes get
/// the death signal of the thread that forks them, and the examples start
/// them only from the thread that runs their whole async body.
pub(crate) fn owned(http: bool, tls: bool) -> nebula_testkit::ClusterOptions {
    nebula_testkit::ClusterOptions {
        http,
        tls,
        lifetime: nebula_testkit::Lifetime::Owned,
    }
}

/// `nebula ARGS` as an async command that dies with this process (see
/// [`nebula_testkit::nebula_command`]).
#[allow(dead_code)] // The demo runs every command through the kit.
pub(crate) fn nebula_command(
    bin: &std::path::Path,
    args: &[&std::ffi::OsStr],
) -> tokio::process::Command {
    let mut cmd = nebula_testkit::nebula_command(bin, nebula_testkit::Lifetime::Owned);
    cmd.args(args);
    tokio::process::Command::from(cmd)
}
