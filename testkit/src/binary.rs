//! The `nebula` binary for the examples: named by `NEBULA_BIN`, or built
//! beside the running example with the same cargo profile. (The system
//! tests pass `env!("CARGO_BIN_EXE_nebula")` instead.)

use std::{
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, bail, ensure};

/// Finds the `nebula` binary, building it first if needed.
///
/// `NEBULA_BIN` names a binary to use as is. Otherwise the binary sits next to this example's
/// own profile directory (`target/release/examples/swarm` → `target/release/nebula`), and
/// `cargo build -p nebula --bin nebula` with the same profile runs first: `cargo run --example` builds
/// only the example, and cargo itself is the only reliable judge of whether the binary is older
/// than its sources and dependencies (a no-op build takes well under a second).
pub fn nebula_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("NEBULA_BIN") {
        let bin = PathBuf::from(bin);
        ensure!(bin.is_file(), "NEBULA_BIN={} is not a file", bin.display());
        return Ok(bin);
    }
    let exe = std::env::current_exe().context("cannot find this example's executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("this example does not sit in a cargo target directory")?;
    let bin = profile_dir.join(format!("nebula{}", std::env::consts::EXE_SUFFIX));
    let profile = profile_dir
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or("release");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from(env!("CARGO")));
    let mut cmd = std::process::Command::new(&cargo);
    // The workspace root: this crate's parent directory.
    cmd.args(["build", "-p", "nebula", "--bin", "nebula"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        // Cargo reports on stderr; keep stdout for the example's own output.
        .stdout(Stdio::null());
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    // A target directory chosen with `--target-dir` is not passed down to us: name it.
    if let Some(target_dir) = profile_dir.parent()
        && target_dir.join("CACHEDIR.TAG").is_file()
    {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let shown = if profile == "release" {
        "cargo build --release --bin nebula".to_owned()
    } else {
        format!("cargo build --profile {profile} --bin nebula")
    };
    eprintln!("building the nebula binary: {shown}");
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => bail!("`{shown}` failed ({status})"),
        Err(err) if bin.is_file() => {
            eprintln!(
                "warning: cannot run cargo ({err}); using {} as it is",
                bin.display()
            );
        }
        Err(err) => bail!(
            "cannot run cargo ({err}) and {} is missing: run `cargo build --release` first \
             or set NEBULA_BIN",
            bin.display()
        ),
    }
    ensure!(
        bin.is_file(),
        "{} is missing after `{shown}`",
        bin.display()
    );
    Ok(bin)
}
