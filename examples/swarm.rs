//! The swarm demo: a control plane and a handful of peer daemons on loopback, one random blob
//! published on the first peer and fetched by all the others at once.
//!
//! ```text
//! cargo run --release --example swarm [-- --peers 8 --size 256MiB --upload-limit 50MiB/s --keep]
//! ```
//!
//! It builds the `nebula` binary first if needed (see `nebula_testkit::nebula_binary`), runs every node
//! as a separate process of it, fetches into every daemon's store at once (`nebula fetch ID`),
//! prints per peer the time, rate and where the bytes came from, checks the BLAKE3 of every
//! copy as its daemon exports it (`nebula fetch ID -o -`) against the blob id, and removes its
//! processes and temporary directory on exit, Ctrl-C included (unless `--keep`).

#[path = "common/cluster.rs"]
mod cluster;

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::Parser;
use cluster::mib_per_s;
use nebula_common::rate::format_bytes;
use nebula_testkit::{DaemonOptions, Fetch, Lifetime, TestCluster};

/// Runs a local Nebula Stream swarm: one seed, every other peer fetching at once.
#[derive(Debug, Parser)]
#[command(name = "swarm")]
struct Args {
    /// Peer daemons, the seed included (at least 2).
    #[arg(long, default_value_t = 8)]
    peers: usize,
    /// Size of the random blob, e.g. 256MiB or 1GiB.
    #[arg(long, default_value = "256MiB", value_parser = nebula_common::rate::parse_size)]
    size: u64,
    /// Upload limit of every daemon, e.g. 20MiB/s (default: none).
    #[arg(long, value_parser = nebula_common::rate::parse_rate)]
    upload_limit: Option<u64>,
    /// Leave the cluster running afterwards and print how to use it.
    #[arg(long)]
    keep: bool,
    /// Give up on a fetch after this many seconds (default: from the size and the limit).
    #[arg(long)]
    timeout_secs: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.peers < 2 {
        eprintln!("error: --peers must be at least 2 (a seed and a fetcher)");
        return ExitCode::from(2);
    }
    if args.size == 0 {
        eprintln!("error: --size must be at least 1 byte");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Dropping `run` on a signal drops the cluster in it, which stops every child and
        // removes the temporary directory.
        tokio::select! {
            result = run(&args) => result,
            () = cluster::interrupted() => bail!("interrupted; stopped the cluster and removed its files"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            clear_progress();
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let bin = tokio::task::spawn_blocking(nebula_testkit::nebula_binary).await??;
    let size = args.size;
    let fetchers: Vec<usize> = (1..args.peers).collect();

    eprintln!(
        "starting a control plane and {} peer daemons{}",
        args.peers,
        args.upload_limit
            .map(|u| format!(", each uploading at most {}/s", format_bytes(u)))
            .unwrap_or_default()
    );
    // Started from this thread, which lives as long as the example: the death signal of
    // `Lifetime::Owned` follows the thread that forks.
    // Kept processes must survive us: no death signal for them.
    let mut options = cluster::owned(false, false);
    if args.keep {
        options.lifetime = Lifetime::Detachable;
    }
    let mut cluster = TestCluster::launch(&bin, "swarm", options)?;
    let options = DaemonOptions {
        upload_limit: args.upload_limit,
        ..DaemonOptions::default()
    };
    cluster.add_daemons(&vec![options; args.peers])?;

    eprintln!("writing {} of random bytes", format_bytes(size));
    let (source, id) = cluster.random_blob("blob.bin", size).await?;
    cluster.add(0, &source, &id).await?;
    // The seed's copy now lives in its store.
    std::fs::remove_file(&source).ok();
    eprintln!(
        "peer0 holds blob {id}; fetching it on {} peers at once",
        fetchers.len()
    );

    let limit = Duration::from_secs(args.timeout_secs.unwrap_or_else(|| {
        // Generous: a stuck swarm ends with an error instead of hanging.
        let rate = args.upload_limit.unwrap_or(8 << 20).max(1 << 20);
        60 + 4 * size.div_ceil(rate)
    }));
    let start = Instant::now();
    let fetches = {
        let all = cluster.fetch_all(&fetchers, &id, limit);
        let progress = show_progress(&cluster, &fetchers, &id, size, start, limit);
        tokio::pin!(all);
        tokio::select! {
            fetches = &mut all => fetches?,
            () = progress => all.await?,
        }
    };
    let total = start.elapsed();
    clear_progress();

    // Every copy, exported by its daemon, against the id.
    eprintln!("checking every copy's BLAKE3 against the id");
    let mut checks = Vec::new();
    for fetch in &fetches {
        let check = fetch.ok
            && match cluster.verify_copy(fetch.peer, &id).await {
                Ok(good) => good,
                Err(err) => {
                    eprintln!("peer{}: {err:#}", fetch.peer);
                    false
                }
            };
        checks.push(check);
    }
    let uploaded = cluster.uploaded_bytes(0).await?;
    let seed_id = cluster.daemons[0].peer_id()?;
    print_table(&cluster, &seed_id, &fetches, &checks, size);

    let failed: Vec<&Fetch> = fetches.iter().filter(|f| !f.ok).collect();
    let good = checks.iter().filter(|c| **c).count();
    println!();
    println!(
        "total {:.2} s for {} copies of {} ({:.1} MiB/s delivered); \
         the seed uploaded {:.2} copies; hash check: {good}/{} match the id",
        total.as_secs_f64(),
        fetches.len(),
        format_bytes(size),
        mib_per_s(size * good as u64, total),
        uploaded as f64 / size as f64,
        fetches.len(),
    );
    for fetch in &failed {
        eprintln!("peer{} failed: {}", fetch.peer, fetch.error);
    }

    if args.keep {
        print_kept(cluster, &id);
    } else {
        let forced = cluster.shutdown();
        if !forced.is_empty() {
            eprintln!(
                "warning: {} did not stop within 5 s of SIGTERM and were killed",
                forced.join(", ")
            );
        }
    }
    if !failed.is_empty() || good != fetches.len() {
        bail!(
            "{} of {} fetches failed or did not match the id",
            fetches.len() - good,
            fetches.len()
        );
    }
    Ok(())
}

/// Prints one progress line on stderr while the fetches run (redrawn in place on a terminal,
/// every 5 s otherwise); resolves only once `limit` has passed (the fetches end before).
async fn show_progress(
    cluster: &TestCluster,
    fetchers: &[usize],
    id: &str,
    size: u64,
    start: Instant,
    limit: Duration,
) {
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(5)
    };
    let want = size * fetchers.len() as u64;
    while start.elapsed() < limit {
        tokio::time::sleep(every).await;
        let polls = fetchers.iter().map(|&p| cluster.held_bytes(p, id));
        let held = futures::future::join_all(polls).await;
        let done_bytes: u64 = held.iter().map(|h| *h.as_ref().unwrap_or(&0)).sum();
        let done_peers = held
            .iter()
            .filter(|h| matches!(h, Ok(b) if *b >= size))
            .count();
        let elapsed = start.elapsed();
        let line = format!(
            "{:>5.1} s  {}/{} peers done  {} of {} held ({:.0}%)  {:.1} MiB/s",
            elapsed.as_secs_f64(),
            done_peers,
            fetchers.len(),
            format_bytes(done_bytes),
            format_bytes(want),
            100.0 * done_bytes as f64 / want as f64,
            mib_per_s(done_bytes, elapsed),
        );
        if terminal {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

fn clear_progress() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

fn print_table(
    cluster: &TestCluster,
    seed_id: &str,
    fetches: &[Fetch],
    checks: &[bool],
    size: u64,
) {
    let seed_address = cluster.daemons[0].addr.to_string();
    let mut rows = vec![[
        "peer".to_owned(),
        "time".to_owned(),
        "MiB/s".to_owned(),
        "from seed".to_owned(),
        "from peers".to_owned(),
        "hash".to_owned(),
    ]];
    rows.push([
        "peer0 (seed)".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
    ]);
    for (fetch, check) in fetches.iter().zip(checks) {
        let name = format!("peer{}", fetch.peer);
        if !fetch.ok {
            rows.push([
                name,
                format!("{:.2} s", fetch.wall.as_secs_f64()),
                "failed".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
            ]);
            continue;
        }
        let elapsed = fetch.report["elapsed_ms"]
            .as_u64()
            .map_or(fetch.wall, Duration::from_millis);
        let from_seed = fetch.bytes_from(seed_id, &seed_address);
        let from_peers = fetch.bytes_total().saturating_sub(from_seed);
        rows.push([
            name,
            format!("{:.2} s", elapsed.as_secs_f64()),
            format!("{:.1}", mib_per_s(size, elapsed)),
            format_bytes(from_seed),
            format_bytes(from_peers),
            if *check { "ok" } else { "MISMATCH" }.to_owned(),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 0 || i == 5 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn print_kept(cluster: TestCluster, id: &str) {
    let bin = std::fs::canonicalize(&cluster.bin).unwrap_or_else(|_| cluster.bin.clone());
    let control = cluster.control.url();
    let admin_socket = cluster.control.admin_socket.clone();
    let mut pids = vec![cluster.control.proc.pid().to_string()];
    let sockets: Vec<PathBuf> = cluster.daemons.iter().map(|d| d.socket.clone()).collect();
    for daemon in &cluster.daemons {
        pids.push(daemon.proc.pid().to_string());
    }
    let dir = cluster.keep();
    let bin = bin.display();
    println!();
    println!("The cluster keeps running (files in {}):", dir.display());
    println!("  control plane  {control}");
    for (i, socket) in sockets.iter().enumerate() {
        println!("  peer{i}  --socket {}", socket.display());
    }
    println!("Try:");
    println!("  {bin} ls --socket {}", sockets[0].display());
    println!("  {bin} status --socket {} --json", sockets[1].display());
    println!(
        "  {bin} fetch {id} --socket {} -o /tmp/blob.bin",
        sockets[1].display()
    );
    println!(
        "  id=$({bin} add SOME_FILE --socket {}) && {bin} fetch \"$id\" --socket {} -o /tmp/copy",
        sockets[0].display(),
        sockets[sockets.len() - 1].display()
    );
    println!(
        "  {bin} admin peers --admin-socket {}",
        admin_socket.display()
    );
    println!("Stop it with:");
    println!("  kill {} && rm -rf {}", pids.join(" "), dir.display());
}
