//! What `/proc` says of a child: [`ProcStatus`] (memory and threads), and
//! resetting its peak resident memory between phases of a measurement.

use anyhow::Context as _;

use crate::process::Proc;

/// What `/proc/PID/status` says of a process's memory and threads.
#[derive(Debug, Clone, Copy)]
pub struct ProcStatus {
    /// Resident memory now (`VmRSS`), in bytes.
    pub rss: u64,
    /// Peak resident memory (`VmHWM`), in bytes: since start, or since the
    /// last [`Proc::reset_peak_rss`].
    pub peak_rss: u64,
    /// Threads now.
    pub threads: u64,
}

impl ProcStatus {
    /// Reads `/proc/PID/status` once.
    pub fn read(pid: i32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(Self {
            rss: field("VmRSS")? * 1024,
            peak_rss: field("VmHWM")? * 1024,
            threads: field("Threads")?,
        })
    }
}

impl Proc {
    /// Its memory and thread count now, from one read of `/proc/PID/status`.
    pub fn proc_status(&self) -> anyhow::Result<ProcStatus> {
        ProcStatus::read(self.pid())
    }

    /// Resets its peak resident memory to its current one (`/proc/PID/clear_refs`).
    pub fn reset_peak_rss(&self) -> anyhow::Result<()> {
        let pid = self.pid();
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
            .with_context(|| format!("resetting VmHWM of pid {pid}"))
    }
}
