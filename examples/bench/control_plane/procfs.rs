//! Resource figures of this process, its threads and other processes, read
//! from `/proc` and `getrusage`: what the `control_plane` case divides by.

/// Resident memory, after handing freed heap pages back to the kernel so the
/// figure counts live data rather than what malloc keeps for later.
pub(super) fn rss_bytes() -> anyhow::Result<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    Ok(kib * 1024)
}

/// User plus system CPU time of this process, in seconds.
pub(super) fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// User plus system CPU time of this process's threads whose names start
/// with `prefix` (a runtime's threads), in seconds.
pub(super) fn threads_cpu_seconds(prefix: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")? {
        if let Some((comm, cpu)) = stat_cpu_seconds(&task?.path().join("stat"))
            && comm.starts_with(prefix)
        {
            total += cpu;
        }
    }
    Ok(total)
}

/// User plus system CPU time of another process (Redis), in seconds.
pub(super) fn pid_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    stat_cpu_seconds(std::path::Path::new(&format!("/proc/{pid}/stat")))
        .map(|(_, cpu)| cpu)
        .ok_or_else(|| anyhow::anyhow!("no CPU times for process {pid}"))
}

/// The command name and user plus system CPU seconds in a `/proc/…/stat` file.
pub(super) fn stat_cpu_seconds(path: &std::path::Path) -> Option<(String, f64)> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = std::fs::read_to_string(path).ok()?;
    // `pid (comm) state ...`: comm may hold spaces, so split after the last ')'.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    // After the comm: state is field 3, utime 14 and stime 15 (1-based).
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let comm = stat[open + 1..close].to_owned();
    Some((comm, (field(14) + field(15)) as f64 / ticks))
}
