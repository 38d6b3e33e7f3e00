//! How the CLI ends: exit codes, one-line `error:` messages, tracing set-up.

use std::{
    fmt::Display,
    future::Future,
    io::{ErrorKind, Write as _},
    process::ExitCode,
};

use crate::flags::LogFormat;

/// Bad usage or bad input (a malformed id, a missing file to read).
pub(crate) const EXIT_USAGE: u8 = 2;
/// The operation failed (no providers, timeout, integrity, I/O).
pub(crate) const EXIT_FAILED: u8 = 1;

/// Marks an error as the user's input being wrong: exit code 2 instead of 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadInput(pub(crate) String);

/// Builds an error that exits with code 2.
pub(crate) fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into()).into()
}

/// What a shell reports for a process ended by SIGINT (128 + 2).
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

/// The command was stopped by SIGINT or SIGTERM after it had caught them
/// (to remove what it was writing): it exits as if killed by SIGINT.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub(crate) struct Interrupted;

/// What a shell reports for a process ended by SIGPIPE (128 + 13): a closed
/// stdout ends the command with it, quietly, as `cat` does.
pub(crate) const EXIT_STDOUT_CLOSED: u8 = 141;

/// Stdout was closed by its reader (`nebula ls | head -c 1`): not an error to
/// print, the command just ends.
#[derive(Debug, thiserror::Error)]
#[error("stdout is closed")]
pub(crate) struct StdoutClosed;

/// Turns a failed write to stdout into an error: [`StdoutClosed`] when the
/// reader went away, else the I/O error with context.
pub(crate) fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// Writes one line on stdout; a closed stdout is [`StdoutClosed`], never a panic.
pub(crate) fn print_line(line: impl Display) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

/// The context chain on one line, each cause said once: a cause whose text
/// the previous one already contains (an `io::Error` shown by its wrapper,
/// then again as its source) is dropped.
pub(crate) fn chain_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        let text = text.trim();
        if text.is_empty() || parts.last().is_some_and(|prev| prev.contains(text)) {
            continue;
        }
        parts.push(text.to_owned());
    }
    parts.join(": ")
}

/// Prints `error: …` (the whole context chain on one line) and picks the exit code.
pub(crate) fn report(err: &anyhow::Error) -> ExitCode {
    // A store copy wraps the write error in its own type: look for the pipe anywhere.
    let closed = err.chain().any(|e| {
        e.is::<StdoutClosed>()
            || e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == ErrorKind::BrokenPipe)
    });
    if closed {
        return ExitCode::from(EXIT_STDOUT_CLOSED);
    }
    let line = chain_line(err);
    eprintln!("error: {line}");
    if err.chain().any(|e| e.is::<Interrupted>()) {
        return ExitCode::from(EXIT_INTERRUPTED);
    }
    if err.chain().any(|e| e.is::<BadInput>()) {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// Logs go to stderr, filtered by `RUST_LOG`; servers default to `info`,
/// client commands to `warn` so their stdout and stderr stay clean.
pub(crate) fn init_tracing(serving: bool, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let default = if serving { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Watches SIGINT and SIGTERM from the moment it is called (so a signal that
/// arrives before the returned future is first polled still counts); the
/// future resolves on the first of them.
pub(crate) fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let watch = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| anyhow::anyhow!("cannot watch {name}: {e}"))
    };
    let mut int = watch(SignalKind::interrupt(), "SIGINT")?;
    let mut term = watch(SignalKind::terminate(), "SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Threads the runtime may start for blocking work, rather than tokio's 512.
///
/// The daemon's blocking work is the disk and hashing: a chunk read or write
/// (each holding a chunk buffer while it runs) and whole-blob tasks (an add,
/// an export, the SHA-256 of a completed blob). Past what the disk and the
/// cores can serve, more threads only hold more stacks and buffers, and tasks
/// may as well queue: a daemon fetching 9 blobs while serving 9 peers ran
/// 140 threads. 64 still leaves room for long whole-blob tasks beside the
/// chunk reads and writes.
const MAX_BLOCKING_THREADS: usize = 64;

/// Runs an async command on a multi-threaded runtime.
pub(crate) fn block_on<F: Future<Output = anyhow::Result<()>>>(fut: F) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    rt.block_on(fut)
}

/// A value as one line of JSON.
pub(crate) fn json_line(value: &impl serde::Serialize) -> String {
    // Cannot fail: every `--json` shape is plain structs, strings and numbers.
    serde_json::to_string(value).expect("JSON output serializes")
}

/// Prints a value as one line of JSON on stdout.
pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    print_line(json_line(value))
}

/// Prints rows as an aligned table with a header.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> anyhow::Result<()> {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        print_line(out.trim_end())
    };
    line(header.to_vec())?;
    for row in rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: a daemon holds a
/// descriptor per stored blob and per peer stream, far past the usual 1024.
pub(crate) fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Asks glibc for one malloc arena, unless `MALLOC_ARENA_MAX` says otherwise.
///
/// A peer's bulk buffers (its chunks, 1 MiB or more) are allocated on one
/// thread and freed on another: read on a blocking thread and freed once sent,
/// received on a runtime thread and freed once written. glibc gives threads
/// arenas of their own (up to 8 per core) and a freed block goes back to the
/// arena it came from, so each arena keeps its own high-water mark of chunk
/// buffers and the process holds their sum, not what is live: 15 arenas held
/// 168 MiB of a fetching daemon's 188. With one arena any thread reuses any
/// freed buffer. Small allocations mostly come from glibc's per-thread caches,
/// so the one arena's lock costs little (the fleet benchmark ran no slower).
pub(crate) fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes the allocator's settings; it runs
        // before the runtime starts any other thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
