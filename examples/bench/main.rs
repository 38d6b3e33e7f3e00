//! The benchmark: one JSON object per line on stdout, each figure beside the reference it is
//! compared with, measured in the same run, and their `ratio`.
//!
//! ```text
//! cargo run --release --example bench [-- --quick] [-- --case swarm,churn]
//! ```
//!
//! Every figure comes from real transfers between real daemons (separate processes of the
//! built `nebula` binary, see `cluster`) on loopback. Progress notes go to stderr.
//!
//! # Layout
//!
//! - `hash`: `nebula hash` against `b3sum`.
//! - `transfer`: `single_stream` (against a raw TCP copy), `single_stream_tls` (TLS on every
//!   gRPC connection, against the same run in plaintext) and `multi_source` (against 4U).
//! - `swarm`: `swarm` (against the lower bound T*), `swarm_observed` (scraped every second,
//!   against the same run unscraped), `swarm_tls` (TLS everywhere, against the same run in
//!   plaintext), `swarm_unlimited`, `churn` (against the same run without faults).
//! - `memory`: `memory`, peak resident memory of a daemon serving a small and a large blob;
//!   `fleet_memory`, ten daemons each fetching nine blobs at once while serving nine peers
//!   (against a budget of 128 MiB each, an idle daemon beside it), then the same with one
//!   daemon flooded by an attacker.
//! - `flood`: the attacker of `fleet_memory`, a raw `PeerExchange` client.
//! - `origin`: `origin_fanout`, N daemons fetching one URL from a rate-limited HTTP origin
//!   (against F/U_o and one copy), beside the same N fetches straight from the origin.
//! - `image_pull`: N daemons pulling one 5-layer image through their registry mirrors from a
//!   rate-limited `docker-registry` (against size/U_r and one copy), beside the same N pulls
//!   straight from the registry.
//! - `control_plane`: discovery throughput and memory per entry, in process.

#[path = "../common/cluster.rs"]
mod cluster;
mod control_plane;
mod flood;
mod hash;
mod image_pull;
mod memory;
mod origin;
#[path = "../common/origin.rs"]
mod origin_server;
#[path = "../common/registry.rs"]
mod registry;
mod swarm;
mod transfer;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use serde_json::{Value, json};

/// Every case, in the order they run.
const CASES: [&str; 14] = [
    "hash",
    "single_stream",
    "single_stream_tls",
    "multi_source",
    "swarm",
    "swarm_observed",
    "swarm_tls",
    "swarm_unlimited",
    "churn",
    "control_plane",
    "memory",
    "fleet_memory",
    "origin_fanout",
    "image_pull",
];

/// Measures Nebula Stream against references taken in the same run; prints JSON lines.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// A small version of every case: the whole set in under two minutes.
    #[arg(long)]
    quick: bool,
    /// Run only these cases (comma-separated or repeated): hash, single_stream,
    /// single_stream_tls, multi_source, swarm, swarm_observed, swarm_tls, swarm_unlimited, churn,
    /// control_plane, memory, fleet_memory, origin_fanout, image_pull.
    #[arg(long = "case", value_delimiter = ',')]
    cases: Vec<String>,
}

/// What every case gets.
#[derive(Debug)]
pub(crate) struct Bench {
    /// The `nebula` binary.
    pub(crate) bin: PathBuf,
    /// `--quick`: small sizes.
    pub(crate) quick: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cases: Vec<&str> = if args.cases.is_empty() {
        CASES.to_vec()
    } else {
        let mut chosen = Vec::new();
        for name in &args.cases {
            match CASES.iter().find(|c| **c == name.as_str()) {
                Some(case) => chosen.push(*case),
                None => {
                    eprintln!("error: unknown case {name:?}; cases: {}", CASES.join(", "));
                    return ExitCode::from(2);
                }
            }
        }
        chosen
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            failures = run(&cases, args.quick) => Ok(failures),
            () = cluster::interrupted() => Err(()),
        }
    });
    match outcome {
        Ok(Ok(0)) => ExitCode::SUCCESS,
        Ok(Ok(failures)) => {
            eprintln!("error: {failures} case(s) reported an error");
            ExitCode::FAILURE
        }
        Ok(Err(err)) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
        Err(()) => {
            eprintln!("error: interrupted; stopped every process and removed the files");
            ExitCode::FAILURE
        }
    }
}

/// Runs the cases and prints their lines; returns how many reported an error.
async fn run(cases: &[&str], quick: bool) -> anyhow::Result<usize> {
    let bin = if cases.iter().any(|c| *c != "control_plane") {
        tokio::task::spawn_blocking(nebula_testkit::nebula_binary).await??
    } else {
        PathBuf::new()
    };
    let bench = Bench { bin, quick };
    // Each case bounds its own steps; this is the backstop.
    let limit = Duration::from_secs(if quick { 300 } else { 1200 });
    let mut failures = 0;
    for &case in cases {
        eprintln!("bench: {case}{}", if quick { " (quick)" } else { "" });
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(limit, run_case(&bench, case)).await;
        let mut line = match result {
            Ok(Ok(value)) => value,
            Ok(Err(err)) => json!({"case": case, "error": format!("{err:#}")}),
            Err(_) => json!({"case": case, "error": format!("took over {limit:?}")}),
        };
        if line.get("error").is_some() {
            failures += 1;
        }
        if let Some(obj) = line.as_object_mut()
            && case != "control_plane"
        {
            obj.insert("quick".into(), quick.into());
            obj.insert(
                "case_s".into(),
                round(started.elapsed().as_secs_f64(), 1).into(),
            );
        }
        println!("{}", case_first(&line));
    }
    Ok(failures)
}

/// One JSON line with `case` first (serde_json sorts the other keys), so a reader scanning the
/// output sees which case each line is.
fn case_first(line: &Value) -> String {
    let Some(obj) = line.as_object() else {
        return line.to_string();
    };
    let mut fields: Vec<String> = obj
        .get("case")
        .map(|case| format!("\"case\":{case}"))
        .into_iter()
        .collect();
    fields.extend(
        obj.iter()
            .filter(|(key, _)| *key != "case")
            .map(|(key, value)| format!("{}:{value}", Value::from(key.as_str()))),
    );
    format!("{{{}}}", fields.join(","))
}

async fn run_case(bench: &Bench, case: &str) -> anyhow::Result<Value> {
    match case {
        "hash" => hash::run(bench).await,
        "single_stream" => transfer::single_stream(bench).await,
        "single_stream_tls" => transfer::single_stream_tls(bench).await,
        "multi_source" => transfer::multi_source(bench).await,
        "swarm" => swarm::swarm(bench).await,
        "swarm_observed" => swarm::swarm_observed(bench).await,
        "swarm_tls" => swarm::swarm_tls(bench).await,
        "swarm_unlimited" => swarm::swarm_unlimited(bench).await,
        "churn" => swarm::churn(bench).await,
        "control_plane" => Ok(control_plane::run(bench.quick).await),
        "origin_fanout" => origin::origin_fanout(bench).await,
        "image_pull" => image_pull::image_pull(bench).await,
        "memory" => memory::run(bench).await,
        "fleet_memory" => memory::fleet(bench).await,
        other => anyhow::bail!("unknown case {other}"),
    }
}

/// Rounds for printing: figures are not that precise.
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// The ratio `a / b` rounded, or null when `b` is not a positive number.
pub(crate) fn ratio(a: f64, b: Option<f64>) -> Value {
    match b {
        Some(b) if b > 0.0 && a.is_finite() => round(a / b, 3).into(),
        _ => Value::Null,
    }
}

/// MiB.
pub(crate) const MIB: u64 = 1 << 20;

/// A bound for a transfer of `bytes` expected at `rate` bytes per second or faster: generous,
/// so a stuck transfer fails instead of hanging, never a measurement threshold.
pub(crate) fn transfer_limit(bytes: u64, rate: u64) -> Duration {
    Duration::from_secs(60 + 5 * bytes.div_ceil(rate.max(MIB)))
}
