//! Issue 11: the `nebula` command tried as a new user would, with bad input
//! on purpose, and soaked under churn. One regression test per behaviour, on
//! real processes.

use std::{
    fs,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::support::{
    BIN, Control, TestCluster, nebula, random_file, run_bounded, wait_output, wait_until,
};

/// Two daemons: daemon 0 holds a random blob of `size` bytes and uploads at
/// `upload_limit`; returns the cluster and the blob's id once it is announced.
pub(crate) fn seeded_pair(
    upload_limit: &'static str,
    size: usize,
    seed: u64,
) -> (TestCluster, String) {
    let c = TestCluster::start_with(BIN, 2, |i| {
        if i == 0 {
            (vec!["--upload-limit", upload_limit], Vec::new())
        } else {
            (Vec::new(), Vec::new())
        }
    });
    let file = c.path("blob");
    let id = random_file(&file, size, seed).to_string();
    assert_eq!(c.daemons[0].add(&file), id);
    assert!(c.wait_providers(&id, 1));
    (c, id)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd` with its stdout on a pipe whose read end is already closed,
/// as `nebula … | true` does once `true` has exited.
fn run_with_closed_stdout(mut cmd: Command) -> Output {
    let mut fds = [0; 2];
    // SAFETY: `pipe` fills the two descriptors we own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: closing the read end we own; the write end becomes the child's stdout.
    unsafe { libc::close(fds[0]) };
    // SAFETY: `fds[1]` is an open descriptor owned by nobody else.
    let write_end =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    let child = cmd
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(60))
}

fn assert_quiet_end(what: &str, out: &Output) {
    let stderr = text(&out.stderr);
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 141)),
        "{what}: exit {:?}, stderr: {stderr}",
        out.status
    );
    assert!(stderr.is_empty(), "{what}: stderr not quiet: {stderr}");
}

#[test]
fn issue11_closed_stdout_ends_quietly() {
    let c = TestCluster::start(BIN, 1);
    let d = &c.daemons[0];
    let file = c.path("blob");
    random_file(&file, 3 << 20, 11);
    let id = d.add(&file);

    let mut hash = nebula();
    hash.args(["hash", "--json"]).arg(&file);
    assert_quiet_end("hash --json | true", &run_with_closed_stdout(hash));

    for args in [
        vec!["ls", "--json"],
        vec!["ls"],
        vec!["status"],
        vec!["fetch", &id, "-o", "-"],
    ] {
        let mut cmd = nebula();
        cmd.args(&args).arg("--socket").arg(&d.socket);
        assert_quiet_end(&args.join(" "), &run_with_closed_stdout(cmd));
    }
    let mut admin = c.control.admin();
    admin.arg("peers");
    assert_quiet_end("admin peers", &run_with_closed_stdout(admin));
}

#[test]
fn issue11_error_causes_are_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    fs::write(&not_a_dir, b"x").unwrap();
    let mut cmd = nebula();
    cmd.arg("daemon")
        .arg("--store")
        .arg(not_a_dir.join("store"))
        .args(["--listen", "127.0.0.1:0", "--control", "http://127.0.0.1:9"]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert_eq!(
        line.matches("Not a directory").count(),
        1,
        "the cause is repeated: {stderr}"
    );

    // A control plane that refuses connections.
    let mut cmd = nebula();
    cmd.args(["admin", "peers", "--control", "http://127.0.0.1:9"]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.matches("tcp connect error").count() <= 1,
        "the cause is repeated: {stderr}"
    );
    let line = stderr.trim();
    let parts: Vec<&str> = line.split(": ").collect();
    for w in parts.windows(2) {
        assert!(!w[0].contains(w[1]), "repeated cause {:?} in {line}", w[1]);
    }
}

#[test]
fn issue11_help_hides_every_secret_value() {
    let secret = "supersecret-4f1c";
    let commands: &[&[&str]] = &[
        &["control", "--help"],
        &["daemon", "--help"],
        &["fetch", "--help"],
        &["admin", "--help"],
        &["admin", "peers", "--help"],
        &["admin", "swarm", "--help"],
        &["admin", "ban", "--help"],
        &["add", "--help"],
        &["status", "--help"],
        &["help", "daemon"],
        &["help", "fetch"],
    ];
    for args in commands {
        let mut cmd = nebula();
        cmd.args(*args)
            .env("NEBULA_JOIN_TOKEN", secret)
            .env("NEBULA_ADMIN_TOKEN", secret);
        let out = run_bounded(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "{args:?}: {:?}", out.status);
        let all = text(&out.stdout) + &text(&out.stderr);
        assert!(!all.contains(secret), "{args:?} prints a secret:\n{all}");
    }
    // The flags are still documented with their variable.
    let mut cmd = nebula();
    cmd.args(["daemon", "--help"]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(text(&out.stdout).contains("NEBULA_JOIN_TOKEN"));
}

#[test]
fn issue11_malformed_control_url_exits_2_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().to_str().unwrap();
    let id = "0".repeat(64);
    for bad in ["notaurl", "http://[::1", "", "ftp://x", "http://"] {
        let runs: [Vec<&str>; 3] = [
            vec!["fetch", &id, "--store", store, "--control", bad],
            vec![
                "daemon",
                "--store",
                store,
                "--listen",
                "127.0.0.1:0",
                "--control",
                bad,
            ],
            vec!["admin", "peers", "--control", bad],
        ];
        for args in runs {
            let mut cmd = nebula();
            cmd.args(&args).env_remove("NEBULA_CONTROL");
            let started = Instant::now();
            let out = run_bounded(cmd, Duration::from_secs(30));
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{args:?} took {:?}",
                started.elapsed()
            );
            assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn issue11_admin_swarm_of_unknown_blob_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let control = Control::start(BIN, dir.path());
    for json in [false, true] {
        let mut cmd = control.admin();
        cmd.args(["swarm", &"ab".repeat(32)]);
        if json {
            cmd.arg("--json");
        }
        let out = run_bounded(cmd, Duration::from_secs(30));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "json={json}: {stderr}");
        assert!(stderr.contains("not found"), "json={json}: {stderr}");
        assert!(out.stdout.is_empty(), "json={json}: {}", text(&out.stdout));
    }
}

#[test]
fn issue11_boolean_env_spellings_and_host_names_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    fs::write(&file, b"hello").unwrap();
    for (value, json) in [
        ("1", true),
        ("yes", true),
        ("on", true),
        ("true", true),
        ("0", false),
        ("no", false),
        ("off", false),
        ("false", false),
    ] {
        let mut cmd = nebula();
        cmd.arg("hash").arg(&file).env("NEBULA_JSON", value);
        let out = run_bounded(cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "NEBULA_JSON={value}: {}",
            text(&out.stderr)
        );
        assert_eq!(
            text(&out.stdout).starts_with('{'),
            json,
            "NEBULA_JSON={value}: {}",
            text(&out.stdout)
        );
    }

    // Host names in --listen and --advertise, resolved at start.
    let control = Control::start(BIN, dir.path());
    let store = dir.path().join("store");
    let mut cmd = nebula();
    cmd.arg("daemon")
        .arg("--store")
        .arg(&store)
        .args(["--control", &control.url()])
        .args(["--listen", "localhost:0", "--advertise", "localhost:7999"])
        .env("RUST_LOG", "info");
    let (daemon, addr) = crate::support::Proc::spawn(cmd, dir.path().join("d.log"));
    assert!(addr.ip().is_loopback(), "{addr}");
    let status = || {
        let mut cmd = nebula();
        cmd.args(["status", "--json", "--store"]).arg(&store);
        let out = run_bounded(cmd, Duration::from_secs(30));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let ok = wait_until(Duration::from_secs(20), || {
        status()["address"] == "127.0.0.1:7999"
    });
    assert!(ok, "status: {}; log:\n{}", status(), daemon.log_text());
}

#[test]
fn issue11_usage_errors_are_one_line_plus_a_hint() {
    let cases: &[&[&str]] = &[
        &["hash"],
        &["fetch", "--bogus"],
        &["daemon", "--listen"],
        &["frobnicate"],
        &["admin", "peers", "--timeout", "ten"],
        &["fetch", "x", "extra"],
    ];
    for args in cases {
        let mut cmd = nebula();
        cmd.args(*args);
        let out = run_bounded(cmd, Duration::from_secs(30));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(
            (1..=2).contains(&lines.len()),
            "{args:?}: {} lines:\n{stderr}",
            lines.len()
        );
        assert!(lines[0].starts_with("error: "), "{args:?}: {stderr}");
        if let Some(hint) = lines.get(1) {
            assert!(hint.starts_with("hint: "), "{args:?}: {stderr}");
        }
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A private `/dev/null` (character device 1:3) in a temporary directory.
fn private_null(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("null");
    let out = Command::new("mknod")
        .arg(&path)
        .args(["c", "1", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "mknod: {}", text(&out.stderr));
    path
}

#[test]
fn issue11_add_refuses_non_regular_files_before_opening_them() {
    let mut c = TestCluster::start(BIN, 1);
    let fifo = c.path("fifo");
    mkfifo(&fifo);
    let null = private_null(c.dir.path());
    let d = &c.daemons[0];
    for path in [&fifo, &null] {
        let started = Instant::now();
        let out = d.cli(&["add", path.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", path.display());
        assert!(stderr.contains("not a regular file"), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    // The daemon refuses too, when asked directly over its socket.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        let mut client = nebula_peer::connect_local(d.socket.clone()).await.unwrap();
        let call = client.add(nebula_proto::v1::AddRequest {
            path: fifo.to_str().unwrap().to_owned(),
        });
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the daemon hangs on a FIFO")
            .expect_err("the daemon added a FIFO")
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // And it still stops on SIGTERM.
    let stopped = c.daemons[0].proc.terminate();
    assert!(stopped.is_some(), "the daemon did not stop on SIGTERM");
}

#[test]
fn issue11_fetch_json_to_stdout_output_goes_to_stderr_and_timeout_zero_fails_at_once() {
    let c = TestCluster::start(BIN, 2);
    let file = c.path("blob");
    let id = random_file(&file, (2 << 20) + 17, 8).to_string();
    assert_eq!(c.daemons[0].add(&file), id);
    assert!(c.wait_providers(&id, 1));
    let out = c.daemons[1].cli(&["fetch", &id, "-o", "-", "--json"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        out.stdout == fs::read(&file).unwrap(),
        "stdout is not the blob"
    );
    let summary: serde_json::Value = stderr
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON on stderr: {stderr}"));
    assert_eq!(summary["id"], id.as_str());

    let unknown = "cd".repeat(32);
    let started = Instant::now();
    let out = c.daemons[1].cli(&["fetch", &unknown, "--timeout", "0"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no providers"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "--timeout 0 took {:?}",
        started.elapsed()
    );
}

#[test]
fn issue11_fetch_output_devices_fifos_symlinks_read_only_and_umask() {
    let c = TestCluster::start(BIN, 2);
    let file = c.path("blob");
    let id = random_file(&file, (3 << 20) + 5, 9).to_string();
    let bytes = fs::read(&file).unwrap();
    assert_eq!(c.daemons[0].add(&file), id);
    assert!(c.wait_providers(&id, 1));
    let d = &c.daemons[1];
    let out_dir = c.path("out");
    fs::create_dir(&out_dir).unwrap();

    // A character device is written into, never replaced.
    let null = private_null(&out_dir);
    let out = d.cli(&["fetch", &id, "-o", null.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let meta = fs::symlink_metadata(&null).unwrap();
    assert!(
        meta.file_type().is_char_device(),
        "the device node was replaced"
    );

    // A FIFO gets the bytes in order.
    let fifo = out_dir.join("fifo");
    mkfifo(&fifo);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read(fifo).unwrap())
    };
    let out = d.cli(&["fetch", &id, "-o", fifo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(reader.join().unwrap() == bytes, "the FIFO got other bytes");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());

    // A symbolic link: its target is replaced, the link stays.
    let target = out_dir.join("target");
    fs::write(&target, b"old").unwrap();
    let link = out_dir.join("link");
    std::os::unix::fs::symlink("target", &link).unwrap();
    let out = d.cli(&["fetch", &id, "-o", link.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(fs::read(&target).unwrap() == bytes);

    // A read-only file is refused and left alone.
    let ro = out_dir.join("ro");
    fs::write(&ro, b"keep").unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o444)).unwrap();
    let out = d.cli(&["fetch", &id, "-o", ro.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("read-only"), "{stderr}");
    assert_eq!(fs::read(&ro).unwrap(), b"keep");
    assert_eq!(
        fs::metadata(&ro).unwrap().permissions().mode() & 0o777,
        0o444
    );

    // A new file gets the caller's umask; nothing temporary is left.
    let new = out_dir.join("new");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"umask 077 && exec "$0" fetch "$1" -o "$2" --socket "$3""#)
        .arg(env!("CARGO_BIN_EXE_nebula"))
        .arg(&id)
        .arg(&new)
        .arg(&d.socket);
    let out = run_bounded(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(fs::read(&new).unwrap() == bytes);
    assert_eq!(
        fs::metadata(&new).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let leftovers: Vec<_> = fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn issue11_fetch_says_the_daemon_went_away_and_permission_denied() {
    let (c, id) = seeded_pair("1MiB/s", 12 << 20, 10);

    // Permission denied on the socket, as another user.
    let socket = c.daemons[1].socket.clone();
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_nebula"));
        cmd
    } else {
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o000)).unwrap();
        nebula()
    };
    cmd.args(["status", "--socket"]).arg(&socket);
    let out = run_bounded(cmd, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");

    // The daemon dies under a running fetch.
    let fetch = c.daemons[1].spawn_fetch(&id, &c.path("out"));
    std::thread::sleep(Duration::from_secs(2));
    let mut c = c;
    c.daemons[1].proc.kill();
    let out = wait_output(fetch, Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("went away"), "{stderr}");
    assert!(!stderr.contains("h2 protocol"), "{stderr}");
    assert!(!c.path("out").exists(), "a partial output was left");
}

#[test]
fn issue11_fetch_fails_after_timeout_when_no_reachable_peer_holds_missing_chunks() {
    // d0 seeds slowly; d1 gets part of the blob; then d0 dies for good.
    let mut c = TestCluster::start_with(BIN, 3, |i| {
        if i == 0 {
            (vec!["--upload-limit", "2MiB/s"], Vec::new())
        } else {
            (Vec::new(), Vec::new())
        }
    });
    let file = c.path("blob");
    let id = random_file(&file, 24 << 20, 12).to_string();
    assert_eq!(c.daemons[0].add(&file), id);
    assert!(c.wait_providers(&id, 1));
    let first = c.daemons[1].spawn_fetch(&id, &c.path("out1"));
    let partial = wait_until(Duration::from_secs(30), || {
        c.daemons[1].status()["downloaded_bytes"]
            .as_u64()
            .unwrap_or(0)
            >= 4 << 20
    });
    assert!(
        partial,
        "d1 got nothing; log:\n{}",
        c.daemons[1].proc.log_text()
    );
    c.daemons[0].proc.kill();
    let killed = Instant::now();

    // d2 takes what d1 holds, then must give up after its timeout.
    let mut cmd = nebula();
    cmd.args(["fetch", &id, "--timeout", "5s", "--socket"])
        .arg(&c.daemons[2].socket);
    let second = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(second, Duration::from_secs(90));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("chunks are held by no reachable peer; verified chunks kept for a resume"),
        "{stderr}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(45),
        "took {:?} after the seed died",
        killed.elapsed()
    );
    // d1's own fetch (default 30s timeout) ends too.
    let out = wait_output(first, Duration::from_secs(120));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("held by no reachable peer"), "{stderr}");
    // The seed's loss is a WARN line an operator sees.
    let log = c.daemons[1].proc.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("provider lost")),
        "no WARN for the lost provider:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("fetch failed")),
        "no WARN for the failed fetch:\n{log}"
    );
}

#[test]
fn issue11_admin_against_a_peer_port_says_what_was_reached() {
    let c = TestCluster::start(BIN, 1);
    let url = format!("http://{}", c.daemons[0].addr);
    let mut cmd = nebula();
    cmd.args(["admin", "peers", "--control", &url]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{url} is not a Nebula control plane")),
        "{stderr}"
    );
}

#[test]
fn issue11_daemon_listen_variable_does_not_bind_a_one_shot_fetch() {
    let c = TestCluster::start(BIN, 1);
    let file = c.path("blob");
    let id = random_file(&file, 1 << 20, 13).to_string();
    assert_eq!(c.daemons[0].add(&file), id);
    assert!(c.wait_providers(&id, 1));
    let out_path = c.path("copy");
    let mut cmd = nebula();
    cmd.args(["fetch", &id, "--control", &c.control.url(), "-o"])
        .arg(&out_path)
        .arg("--store")
        .arg(c.path("one-shot"))
        // The daemon's variable, naming a port in use: the one-shot ignores it.
        .env("NEBULA_LISTEN", c.daemons[0].addr.to_string());
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(fs::read(&out_path).unwrap() == fs::read(&file).unwrap());
}

/// The README's command block names every subcommand, and every flag it
/// shows for one is in that subcommand's `--help`.
#[test]
fn issue11_readme_command_section_matches_help() {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## The `nebula` command")
        .nth(1)
        .and_then(|s| s.split("```text").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("the README's command block");
    let help = |args: &[&str]| {
        let mut cmd = nebula();
        cmd.args(args).arg("--help");
        let out = run_bounded(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "{args:?} --help");
        text(&out.stdout)
    };
    let top = help(&[]);
    let commands: Vec<&str> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 9, "{commands:?}");
    let words: Vec<&str> = section
        .split(|c: char| c.is_whitespace() || c == '|' || c == '[' || c == ']')
        .collect();
    for c in &commands {
        assert!(words.contains(c), "the README does not show `nebula {c}`");
    }
    // Flags, per group of lines starting with `nebula SUBCOMMAND`.
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for line in section.lines() {
        if let Some(rest) = line.strip_prefix("nebula ") {
            // `nebula mirror containerd …`: the nested command's flags.
            let mut words = rest.split_whitespace();
            let mut sub = words.next().unwrap().to_owned();
            if let Some(nested) = words
                .next()
                .filter(|w| w.chars().all(|c| c.is_ascii_lowercase()))
            {
                sub = format!("{sub} {nested}");
            }
            groups.push((sub, Vec::new()));
        }
        let Some((_, flags)) = groups.last_mut() else {
            continue;
        };
        for token in line.split(|c: char| c.is_whitespace() || "[]|;,()".contains(c)) {
            if token.starts_with("--") || token == "-o" {
                flags.push(token.to_owned());
            }
        }
    }
    assert!(groups.len() >= 7, "{groups:?}");
    for (sub, flags) in &groups {
        // A group's flags may belong to the command or to its nested one.
        let parts: Vec<&str> = sub.split(' ').collect();
        let text = help(&parts[..1]) + &help(&parts);
        for flag in flags {
            assert!(
                text.contains(flag.as_str()),
                "`nebula {sub}` has no {flag} in --help"
            );
        }
    }
    for sub in ["peers", "swarm", "drain", "ban", "unban", "stats"] {
        assert!(words.contains(&sub));
        help(&["admin", sub]);
    }
}

#[test]
fn issue11_fetch_progress_json_prints_one_line_per_update() {
    let (c, id) = seeded_pair("4MiB/s", 6 << 20, 14);
    let out = c.daemons[1].cli(&["fetch", &id, "--progress", "json"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let updates: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l:?}")))
        .collect();
    assert!(updates.len() >= 3, "{stderr}");
    let done: Vec<u64> = updates
        .iter()
        .map(|u| u["bytes_done"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    let last = updates.last().unwrap();
    assert_eq!(last["bytes_done"], 6u64 << 20);
    assert_eq!(last["total"], 6u64 << 20);
    assert!(out.stdout.is_empty());
}

#[test]
fn issue11_rm_of_a_blob_being_fetched_cancels_the_fetch() {
    let (c, id) = seeded_pair("1MiB/s", 16 << 20, 15);
    let d = &c.daemons[1];
    let fetch = d.spawn_fetch(&id, &c.path("out"));
    let started = wait_until(Duration::from_secs(20), || {
        d.status()["downloaded_bytes"].as_u64().unwrap_or(0) > 0
    });
    assert!(started, "the fetch did not start");
    let out = d.cli(&["rm", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let removed_at = Instant::now();
    let out = wait_output(fetch, Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("was removed from the store"), "{stderr}");
    assert!(
        removed_at.elapsed() < Duration::from_secs(5),
        "the fetch went on for {:?}",
        removed_at.elapsed()
    );
    assert!(!c.path("out").exists());
    // The blob stays removed.
    std::thread::sleep(Duration::from_millis(500));
    let ls = d.cli(&["ls", "--json"]);
    assert!(!text(&ls.stdout).contains(&id), "{}", text(&ls.stdout));
}

#[test]
fn issue11_status_says_why_the_daemon_is_not_registered() {
    let c = TestCluster::start(BIN, 1);
    // A second daemon whose --control is the first daemon's peer port.
    let wrong = format!("http://{}", c.daemons[0].addr);
    let d = crate::support::Daemon::start(BIN, c.dir.path(), "lost", &wrong, &[], &[]);
    let mut last = String::new();
    let said = wait_until(Duration::from_secs(20), || {
        let out = d.cli(&["status"]);
        last = text(&out.stderr);
        out.status.code() == Some(1) && last.contains("not a Nebula control plane")
    });
    assert!(said, "{last}");
    assert!(last.contains(&wrong), "{last}");
    let json = d.status();
    assert!(
        json["registration_error"]
            .as_str()
            .is_some_and(|e| e.contains("not a Nebula control plane")),
        "{json}"
    );
}

#[test]
fn issue11_fetch_onto_a_full_disk_names_the_output_and_leaves_it_alone() {
    use std::os::unix::process::CommandExt as _;
    let c = TestCluster::start(BIN, 2);
    let file = c.path("blob");
    let id = random_file(&file, 3 << 20, 16).to_string();
    assert_eq!(c.daemons[0].add(&file), id);
    assert!(c.wait_providers(&id, 1));
    let out_dir = c.path("out");
    fs::create_dir(&out_dir).unwrap();
    let dest = out_dir.join("copy");
    fs::write(&dest, b"old").unwrap();
    let mut cmd = nebula();
    cmd.args(["fetch", &id, "-o"])
        .arg(&dest)
        .arg("--socket")
        .arg(&c.daemons[1].socket);
    // SAFETY: only async-signal-safe calls between fork and exec. A file
    // size limit of 1 MiB (SIGXFSZ ignored, so writes fail with EFBIG) makes
    // the disk full for this command alone, not for the daemons.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: 1 << 20,
            };
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
                || libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run_bounded(cmd, Duration::from_secs(120));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(dest.to_str().unwrap()), "{stderr}");
    assert!(!stderr.contains("store"), "{stderr}");
    assert_eq!(fs::read(&dest).unwrap(), b"old");
    let names: Vec<_> = fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

fn sources_sum(summary: &serde_json::Value) -> u64 {
    summary["sources"]
        .as_array()
        .map(|s| s.iter().map(|p| p["bytes"].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

#[test]
fn issue11_second_client_and_rerun_after_ctrl_c_join_the_running_fetch() {
    let c = TestCluster::start_with(BIN, 2, |i| {
        if i == 1 {
            (vec!["--download-limit", "4MiB/s"], Vec::new())
        } else {
            (Vec::new(), Vec::new())
        }
    });
    let size: u64 = 12 << 20;
    let file = c.path("blob");
    let id = random_file(&file, size as usize, 17).to_string();
    assert_eq!(c.daemons[0].add(&file), id);
    assert!(c.wait_providers(&id, 1));
    let d = &c.daemons[1];

    // The first client is interrupted (Ctrl-C) a second in; a second client
    // and the re-run join the fetch still running in the daemon.
    let mut first = d.spawn_fetch(&id, &c.path("out1"));
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(first.id() as i32, libc::SIGINT) };
    let _ = first.wait();
    let second = d.spawn_fetch(&id, &c.path("out2"));
    let rerun = d.spawn_fetch(&id, &c.path("out1"));
    for (name, child) in [("second", second), ("rerun", rerun)] {
        let out = wait_output(child, Duration::from_secs(120));
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let resumed = summary["resumed_bytes"].as_u64().unwrap();
        assert_eq!(
            resumed + sources_sum(&summary),
            size,
            "{name}: sources do not add up: {summary}"
        );
    }
    assert!(fs::read(c.path("out1")).unwrap() == fs::read(&file).unwrap());
    assert!(fs::read(c.path("out2")).unwrap() == fs::read(&file).unwrap());
    // One download: the seed sent about one copy.
    let uploaded = c.daemons[0].status()["uploaded_bytes"].as_u64().unwrap();
    assert!(
        uploaded <= size + size / 4,
        "the seed uploaded {uploaded} bytes"
    );
}

#[test]
fn issue11_a_silent_provider_is_dropped_within_seconds() {
    let mut c = TestCluster::start_with(BIN, 3, |i| {
        if i == 2 {
            (vec!["--download-limit", "2MiB/s"], Vec::new())
        } else {
            (Vec::new(), Vec::new())
        }
    });
    let size: u64 = 40 << 20;
    let file = c.path("blob");
    let id = random_file(&file, size as usize, 18).to_string();
    assert_eq!(c.daemons[0].add(&file), id);
    assert_eq!(c.daemons[1].add(&file), id);
    assert!(c.wait_providers(&id, 2));
    let fetch = c.daemons[2].spawn_fetch(&id, &c.path("out"));
    let using_both = wait_until(Duration::from_secs(20), || {
        c.daemons[2].status()["downloaded_bytes"]
            .as_u64()
            .unwrap_or(0)
            >= 2 << 20
    });
    assert!(using_both, "the fetch did not start");
    let silent = c.daemons[0].addr.to_string();
    c.daemons[0].proc.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let lost = wait_until(Duration::from_secs(15), || {
        c.daemons[2]
            .proc
            .log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("provider lost") && l.contains(&silent))
    });
    let noticed = stopped.elapsed();
    c.daemons[0].proc.signal(libc::SIGCONT);
    assert!(
        lost && noticed < Duration::from_secs(10),
        "the silent provider was noticed after {noticed:?}; log:\n{}",
        c.daemons[2].proc.log_text()
    );
    let out = wait_output(fetch, Duration::from_secs(120));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(fs::read(c.path("out")).unwrap() == fs::read(&file).unwrap());
}

#[test]
fn issue11_fetch_killed_while_writing_leaves_nothing_beside_the_output() {
    let mut c = TestCluster::start(BIN, 1);
    let file = c.path("blob");
    let id = random_file(&file, 64 << 20, 19).to_string();
    assert_eq!(c.daemons[0].add(&file), id);
    let out_dir = c.path("out");
    fs::create_dir(&out_dir).unwrap();
    let mut cmd = nebula();
    cmd.args(["fetch", &id, "-o"])
        .arg(out_dir.join("copy"))
        .arg("--socket")
        .arg(&c.daemons[0].socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let fds = format!("/proc/{}/fd", child.id());
    // Wait until it holds a file in the output directory, then freeze the
    // daemon it reads from (so the write cannot finish) and kill it.
    let writing = wait_until(Duration::from_secs(30), || {
        fs::read_dir(&fds)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&out_dir)))
    });
    c.daemons[0].proc.signal(libc::SIGSTOP);
    let _ = child.kill();
    let _ = child.wait();
    c.daemons[0].proc.signal(libc::SIGCONT);
    assert!(writing, "the fetch never opened its output");
    let left: Vec<_> = fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
