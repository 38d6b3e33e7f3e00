//! The `nebula` command: parses flags and calls the libraries.
//!
//! # Layout
//!
//! - `output`: exit codes, `error:` lines, JSON and table printing.
//! - `flags`: flag types shared by several commands (durations, rates, daemon location).
//! - `hash`: `nebula hash`.
//! - `control`: `nebula control` and `nebula admin …`.
//! - `daemon`: `nebula daemon` and the client commands (`add`, `fetch`, `ls`, `rm`, `status`).
//! - `mirror`: `nebula mirror containerd` (hosts.toml for the registry mirror).
//! - `export`: writing a fetched blob to `fetch -o PATH` as the calling user.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod control;
mod daemon;
mod export;
mod flags;
mod hash;
mod json;
mod mirror;
mod output;

/// Nebula Stream: a peer-to-peer content delivery network.
#[derive(Debug, Parser)]
#[command(name = "nebula", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane.
    Control(Box<control::ControlArgs>),
    /// Operate the control plane: peers, swarms, drain, ban, stats.
    Admin(control::AdminArgs),
    /// Run the peer daemon.
    Daemon(daemon::DaemonArgs),
    /// Print the blob id of a file (no daemon needed).
    Hash(hash::HashArgs),
    /// Store a file in the local daemon and print its blob id.
    Add(daemon::AddArgs),
    /// Fetch a blob from the swarm.
    Fetch(daemon::FetchArgs),
    /// List the local daemon's blobs.
    Ls(daemon::LsArgs),
    /// Remove a blob from the local daemon.
    Rm(daemon::RmArgs),
    /// Show the local daemon's state; exits 0 once it is up and registered.
    Status(daemon::StatusArgs),
    /// Point containerd at the daemon's registry mirror.
    Mirror(mirror::MirrorArgs),
}

/// A usage error as one `error:` line plus at most one hint line: clap's own
/// rendering spreads it over a usage block, tips and a help pointer. The help
/// shown when no subcommand is given is kept whole.
fn usage_error(err: &clap::Error) -> String {
    use clap::error::ErrorKind;
    let rendered = err.render().to_string();
    if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return rendered;
    }
    let mut paragraphs = rendered.split("\n\n").map(|p| {
        p.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    });
    let first = paragraphs.next().unwrap_or_default();
    let rest: Vec<String> = paragraphs.collect();
    let hint = rest
        .iter()
        .find(|p| p.starts_with("tip:"))
        .or_else(|| rest.iter().find(|p| p.starts_with("For more information")))
        .map(|p| p.strip_prefix("tip: ").unwrap_or(p).to_owned());
    let mut out = if first.starts_with("error:") {
        first
    } else {
        format!("error: {first}")
    };
    out.push('\n');
    if let Some(hint) = hint {
        out.push_str(&format!("hint: {hint}\n"));
    }
    out
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // Help and version go to stdout and exit 0; usage errors exit 2.
            if !err.use_stderr() {
                let _ = err.print();
                return ExitCode::SUCCESS;
            }
            eprint!("{}", usage_error(&err));
            return ExitCode::from(output::EXIT_USAGE);
        }
    };
    let (serving, log_format) = match &cli.command {
        Command::Control(args) => (true, args.serve.log_format),
        Command::Daemon(args) => (true, args.serve.log_format),
        _ => (false, flags::LogFormat::Text),
    };
    output::init_tracing(serving, log_format);
    if serving || matches!(cli.command, Command::Fetch(_)) {
        output::raise_fd_limit();
    }
    // The commands that move chunks: the daemon, and a fetch (a one-shot peer).
    if matches!(cli.command, Command::Daemon(_) | Command::Fetch(_)) {
        output::one_malloc_arena();
    }
    let result = match cli.command {
        Command::Hash(args) => hash::run(args),
        Command::Mirror(args) => mirror::run(args),
        Command::Control(args) => output::block_on(control::run_control(*args)),
        Command::Admin(args) => output::block_on(control::run_admin(args)),
        Command::Daemon(args) => output::block_on(daemon::run_daemon(args)),
        Command::Add(args) => output::block_on(daemon::run_add(args)),
        Command::Fetch(args) => output::block_on(daemon::run_fetch(args)),
        Command::Ls(args) => output::block_on(daemon::run_ls(args)),
        Command::Rm(args) => output::block_on(daemon::run_rm(args)),
        Command::Status(args) => output::block_on(daemon::run_status(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => output::report(&err),
    }
}
