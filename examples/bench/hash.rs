//! The `hash` case: `nebula hash` of one file against `b3sum` of the same file, best of a few
//! alternating runs each (the file is in the page cache for both).

use std::{
    os::fd::AsFd as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use tokio::process::Command;

use crate::{Bench, MIB, cluster, ratio, round};

/// One run of either program may take this long.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Installing `b3sum` may take this long.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

pub(crate) async fn run(bench: &Bench) -> anyhow::Result<Value> {
    let (size, rounds) = if bench.quick {
        (128 * MIB, 2)
    } else {
        (1024 * MIB, 3)
    };
    let reference = ensure_b3sum().await;

    let dir = tempfile::Builder::new()
        .prefix("nebula-bench-hash-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let file = dir.path().join("blob.bin");
    let id = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || nebula_testkit::write_random_file(&file, size))
            .await??
    }
    .to_hex()
    .to_string();

    let mut nebula_best = Duration::MAX;
    let mut b3sum_best = Duration::MAX;
    for _ in 0..rounds {
        let mut cmd = cluster::nebula_command(&bench.bin, &["hash".as_ref(), file.as_ref()]);
        let (elapsed, out) = timed(&mut cmd).await?;
        ensure!(
            out.trim() == id,
            "nebula hash printed {out:?}, the file's BLAKE3 is {id}"
        );
        nebula_best = nebula_best.min(elapsed);
        if reference.is_ok() {
            let (elapsed, out) = timed(Command::new("b3sum").arg(&file)).await?;
            ensure!(
                out.get(..64) == Some(id.as_str()),
                "b3sum printed {out:?}, the file's BLAKE3 is {id}"
            );
            b3sum_best = b3sum_best.min(elapsed);
        }
    }
    let nebula_mib_s = cluster::mib_per_s(size, nebula_best);
    let mut line = json!({
        "case": "hash",
        "bytes": size,
        "nebula_s": round(nebula_best.as_secs_f64(), 3),
        "nebula_mib_s": round(nebula_mib_s, 1),
        "reference": "b3sum",
    });
    let obj = line.as_object_mut().context("a JSON object")?;
    match reference {
        Ok(version) => {
            let b3sum_mib_s = cluster::mib_per_s(size, b3sum_best);
            obj.insert("reference_version".into(), version.into());
            obj.insert(
                "reference_s".into(),
                round(b3sum_best.as_secs_f64(), 3).into(),
            );
            obj.insert("reference_mib_s".into(), round(b3sum_mib_s, 1).into());
            obj.insert("ratio".into(), ratio(nebula_mib_s, Some(b3sum_mib_s)));
        }
        Err(why) => {
            obj.insert("reference_mib_s".into(), Value::Null);
            obj.insert("ratio".into(), Value::Null);
            obj.insert("reference_missing".into(), why.into());
        }
    }
    Ok(line)
}

/// Runs a command to completion, bounded; returns its wall time and stdout.
async fn timed(cmd: &mut Command) -> anyhow::Result<(Duration, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let start = Instant::now();
    let child = cmd.spawn().context("cannot start the hasher")?;
    let out = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("a hash run took over {RUN_TIMEOUT:?}"))??;
    let elapsed = start.elapsed();
    if !out.status.success() {
        bail!(
            "hashing failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((elapsed, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Makes sure `b3sum` runs: as root, installs it with apt-get when missing. Returns its version,
/// or why the reference is missing.
async fn ensure_b3sum() -> Result<String, String> {
    if let Some(version) = b3sum_version().await {
        return Ok(version);
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        return Err(
            "b3sum is not installed and the bench is not running as root to \
                    install it (apt-get install b3sum)"
                .into(),
        );
    }
    eprintln!("bench: b3sum is missing; installing it with apt-get");
    // The package lists of a fresh machine may be empty or stale: update once if needed.
    if !apt_get(&["install", "-y", "b3sum"]).await {
        let _ = apt_get(&["update"]).await;
        apt_get(&["install", "-y", "b3sum"]).await;
    }
    b3sum_version()
        .await
        .ok_or_else(|| "b3sum is not installed and `apt-get install -y b3sum` failed".into())
}

async fn b3sum_version() -> Option<String> {
    let out = Command::new("b3sum")
        .arg("--version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(RUN_TIMEOUT, out).await {
        Ok(Ok(out)) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        _ => None,
    }
}

/// Runs apt-get with its output on our stderr (stdout carries only JSON lines).
async fn apt_get(args: &[&str]) -> bool {
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let child = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr))
        .kill_on_drop(true)
        .status();
    matches!(
        tokio::time::timeout(INSTALL_TIMEOUT, child).await,
        Ok(Ok(status)) if status.success()
    )
}
