//! The store exactly as the daemon drives it (`Store::open`, `begin`,
//! `write_chunk`, `add_file`, `export`), put through what production does to
//! it: a writer killed with SIGKILL mid-download, exports that cannot finish,
//! and a disk that really fills up.
//!
//! Some checks need a process of their own (a crash to survive, a file-size
//! limit that must not touch the other tests): the test binary runs itself
//! again with `--exact store::<child> --ignored`, passing a scratch directory
//! in [`CHILD_DIR_ENV`]. The `#[ignore]`d child tests do nothing without it.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nebula_common::{Outboard, Store, StoreError, WriteOutcome};
use rand::{Rng as _, RngCore as _, seq::SliceRandom as _};

const MIB: usize = 1 << 20;

/// Names the scratch directory of a child process started by a test here.
const CHILD_DIR_ENV: &str = "NEBULA_TEST_STORE_CHILD_DIR";

/// How long any child may live, and any wait on it may last.
const CHILD_LIMIT: Duration = Duration::from_secs(60);

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

fn chunk<'a>(bytes: &'a [u8], outboard: &Outboard, index: u32) -> &'a [u8] {
    let r = outboard.geometry().chunk_range(index);
    &bytes[r.start as usize..r.end as usize]
}

/// The names in a directory, to show that a failed operation left nothing behind.
fn listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// A child process of this test binary, SIGKILLed and reaped however the
/// test ends, with its output delivered line by line on a channel so that
/// every wait on it is bounded.
struct ChildProcess {
    child: Child,
    /// Stdout lines as they are; stderr lines prefixed with `stderr: `.
    lines: mpsc::Receiver<String>,
    /// Everything received so far, to show when the child misbehaves.
    seen: Vec<String>,
}

impl ChildProcess {
    /// Runs the `#[ignore]`d test `name` (e.g. `store::child_writer`) in a new
    /// process with `dir` as its scratch directory.
    fn spawn(name: &str, dir: &Path) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", name, "--nocapture", "--ignored"])
            .env(CHILD_DIR_ENV, dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the test binary");
        let (tx, lines) = mpsc::channel();
        let forward = |pipe: Box<dyn std::io::Read + Send>, prefix: &'static str| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(format!("{prefix}{line}")).is_err() {
                        break;
                    }
                }
            });
        };
        forward(Box::new(child.stdout.take().expect("piped stdout")), "");
        forward(
            Box::new(child.stderr.take().expect("piped stderr")),
            "stderr: ",
        );
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// What the child printed so far, for failure messages.
    fn output(&self) -> String {
        self.seen.join("\n")
    }

    /// The next line of output, or `None` once the child closed both pipes.
    /// Panics if none comes before `deadline`.
    fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("child gave no output in time:\n{}", self.output())
            }
        }
    }

    /// SIGKILLs the child (as `kill -9` would) and reaps it.
    fn kill(&mut self) -> ExitStatus {
        // SAFETY: kill(2) with the pid of our own child, which is not reaped
        // yet, so the pid cannot name another process.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        self.child.wait().expect("reap the child")
    }

    /// Waits for the child to exit on its own (its output is in [`Self::output`]).
    fn finish(&mut self) -> ExitStatus {
        let deadline = Instant::now() + CHILD_LIMIT;
        while self.next_line(deadline).is_some() {}
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                return status;
            }
            assert!(Instant::now() < deadline, "child did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // Only an unreaped child is killed: a reaped pid may belong to anyone.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: as in `kill`; the child is not reaped.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// A size-limited tmpfs mounted for one test, unmounted when dropped.
/// Declare it after the `TempDir` holding its mount point and before any
/// `Store` on it, so that it is unmounted after the store closes and before
/// the directory is deleted.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `8m`) at `dir`, or says why it cannot
    /// (not root, no `CAP_SYS_ADMIN`, no `mount` command).
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // A lazy unmount still detaches it if something holds a file open.
        if !umount(false) && !umount(true) {
            eprintln!("warning: could not unmount {}", self.dir.display());
        }
    }
}

/// The chunk index in a `wrote <index>` report from [`child_writer`]. libtest
/// may print its own text on the same line, so only the tail counts.
fn parse_report(line: &str) -> Option<u32> {
    if line.starts_with("stderr: ") {
        return None;
    }
    line.rsplit_once("wrote ")?.1.trim().parse().ok()
}

/// What a killed writer must leave: every chunk it reported, byte for byte;
/// nothing else readable; and an export that refuses the partial blob.
fn check_partial_blob(
    store: &Store,
    outboard: &Outboard,
    source: &[u8],
    reported: &BTreeSet<u32>,
    scratch: &Path,
) -> BTreeSet<u32> {
    let id = outboard.id();
    let count = outboard.geometry().chunk_count();
    let blob = store.get(&id).expect("the partial blob survives the kill");
    assert!(!blob.is_complete(), "only part of the blob was written");
    let held: BTreeSet<u32> = blob.chunks().iter().collect();
    let lost: Vec<_> = reported.difference(&held).collect();
    assert!(
        lost.is_empty(),
        "reported but lost after the kill: {lost:?}"
    );
    for index in 0..count {
        match blob.read_chunk(index) {
            Ok(bytes) => {
                assert!(held.contains(&index), "chunk {index} read but not held");
                assert!(
                    bytes[..] == *chunk(source, outboard, index),
                    "chunk {index} reads back different bytes"
                );
            }
            Err(StoreError::ChunkMissing { index: i, .. }) if i == index => {
                assert!(!held.contains(&index), "held chunk {index} is unreadable");
            }
            Err(e) => panic!("chunk {index}: unexpected error {e:?}"),
        }
    }
    let info = store.list();
    assert_eq!(info.len(), 1);
    assert_eq!(
        (info[0].complete, info[0].chunks, info[0].chunks_verified),
        (false, count, held.len() as u32)
    );

    let before = listing(scratch);
    let dest = scratch.join("exported");
    match store.export(&id, &dest) {
        Err(StoreError::Incomplete { have, total, .. }) => {
            assert_eq!((have, total), (held.len() as u32, count));
        }
        other => panic!("export of a partial blob: {other:?}"),
    }
    assert!(!dest.exists(), "a refused export left {}", dest.display());
    assert_eq!(listing(scratch), before, "a refused export left files");
    held
}

/// A download that dies: a child process writes the chunks of a 24 MiB blob
/// in random order and is SIGKILLed part-way, twice; each time the reopened
/// store holds every chunk the child reported and serves nothing else. The
/// test then writes only the missing chunks and exports the whole blob.
#[test]
fn resume_after_the_writer_is_killed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A short last chunk, so the tail of the blob is exercised too.
    let source = random_bytes(24 * MIB + 12_345);
    fs::write(tmp.path().join("source"), &source).expect("write source");
    let outboard = Outboard::compute(&source);
    let count = outboard.geometry().chunk_count();
    let scratch = tmp.path().join("out");
    fs::create_dir(&scratch).expect("mkdir");

    let mut reported = BTreeSet::new();
    let mut held = BTreeSet::new();
    // Each round kills a writer after this many new chunks: the second writer
    // resumes from what the first left.
    const PER_ROUND: usize = 8;
    for round in 0..2 {
        let mut child = ChildProcess::spawn("store::child_writer", tmp.path());
        let deadline = Instant::now() + CHILD_LIMIT;
        let mut new = 0;
        while new < PER_ROUND {
            let line = child.next_line(deadline).unwrap_or_else(|| {
                panic!(
                    "round {round}: writer exited after {new} chunks:\n{}",
                    child.output()
                )
            });
            if let Some(index) = parse_report(&line) {
                assert!(!held.contains(&index), "chunk {index} was held already");
                assert!(reported.insert(index), "chunk {index} reported twice");
                new += 1;
            }
        }
        // Land the kill anywhere in the writer's loop, mid-write included.
        std::thread::sleep(Duration::from_micros(rand::rng().random_range(0..4_000)));
        let status = child.kill();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "round {round}: the writer must still be running when killed ({status:?})"
        );
        // Reports already in the pipe name chunks whose write had returned.
        while let Some(line) = child.next_line(Instant::now() + CHILD_LIMIT) {
            if let Some(index) = parse_report(&line) {
                assert!(reported.insert(index), "chunk {index} reported twice");
            }
        }
        drop(child);

        let store = Store::open(tmp.path().join("store")).expect("reopen after the kill");
        held = check_partial_blob(&store, &outboard, &source, &reported, &scratch);
        // Beyond the reports, at most the chunk in flight at each kill.
        assert!(
            held.len() <= reported.len() + round + 1,
            "round {round}: {} held, {} reported",
            held.len(),
            reported.len()
        );
    }

    // Resume as the downloader does: `begin` hands back the partial blob.
    let store = Store::open(tmp.path().join("store")).expect("reopen");
    let blob = store.begin(&outboard).expect("begin resumes");
    assert_eq!(blob.chunks().iter().collect::<BTreeSet<_>>(), held);
    let first = *held.first().expect("chunks were written");
    assert_eq!(
        blob.write_chunk(first, chunk(&source, &outboard, first))
            .expect("rewrite"),
        WriteOutcome::AlreadyHad
    );
    let missing: Vec<u32> = (0..count).filter(|i| !held.contains(i)).collect();
    assert!(!missing.is_empty());
    for (n, &index) in missing.iter().enumerate() {
        let expected = if n + 1 == missing.len() {
            WriteOutcome::Completed
        } else {
            WriteOutcome::Stored
        };
        let outcome = blob
            .write_chunk(index, chunk(&source, &outboard, index))
            .expect("write a missing chunk");
        assert_eq!(outcome, expected, "chunk {index}");
    }
    assert!(blob.is_complete());
    let dest = scratch.join("exported");
    store.export(&outboard.id(), &dest).expect("export");
    let exported = fs::read(&dest).expect("read export");
    assert_eq!(blake3::hash(&exported), blake3::hash(&source));
    assert!(exported == source);

    // And it stays complete across a restart.
    drop(blob);
    drop(store);
    let store = Store::open(tmp.path().join("store")).expect("reopen");
    let info = store.list();
    assert!(info.len() == 1 && info[0].complete, "{info:?}");
}

/// The writer killed by [`resume_after_the_writer_is_killed`]: opens the store
/// in `$NEBULA_TEST_STORE_CHILD_DIR/store`, begins the blob of `…/source`,
/// writes the chunks it lacks in random order and prints `wrote <index>`
/// after each `write_chunk` returns. Stops by itself after 60 s.
#[test]
#[ignore = "run as a child process by resume_after_the_writer_is_killed"]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    let deadline = Instant::now() + CHILD_LIMIT;
    let source = fs::read(dir.join("source")).expect("read source");
    let outboard = Outboard::compute(&source);
    let store = Store::open(dir.join("store")).expect("open store");
    let blob = store.begin(&outboard).expect("begin");
    let mut todo: Vec<u32> = (0..outboard.geometry().chunk_count())
        .filter(|&i| !blob.has_chunk(i))
        .collect();
    todo.shuffle(&mut rand::rng());
    let mut stdout = std::io::stdout().lock();
    for index in todo {
        if Instant::now() > deadline {
            return;
        }
        let outcome = blob
            .write_chunk(index, chunk(&source, &outboard, index))
            .expect("write_chunk");
        assert_ne!(outcome, WriteOutcome::AlreadyHad, "chunk {index}");
        writeln!(stdout, "wrote {index}")
            .and_then(|()| stdout.flush())
            .expect("report to the parent");
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// Exports that fail at the end (the rename) or midway (the destination's
/// file system fills up) leave no file at the destination, no temporary file
/// beside it, and an existing destination file untouched.
#[test]
fn export_that_fails_leaves_nothing_at_the_destination() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path().join("store")).expect("open");
    let source = random_bytes(4 * MIB + 7);
    let src = tmp.path().join("source");
    fs::write(&src, &source).expect("write source");
    let id = store.add_file(&src).expect("add").id();
    let out = tmp.path().join("out");
    fs::create_dir(&out).expect("mkdir");

    // The copy completes but the final rename fails: the destination is a
    // non-empty directory.
    let dir_dest = out.join("a-directory");
    fs::create_dir(&dir_dest).expect("mkdir");
    fs::write(dir_dest.join("inside"), b"keep").expect("write");
    let before = listing(&out);
    let err = store
        .export(&id, &dir_dest)
        .expect_err("cannot rename over a directory");
    eprintln!("export over a directory: {err}");
    assert_eq!(listing(&out), before, "a temporary file was left beside it");
    assert!(dir_dest.is_dir());
    assert_eq!(listing(&dir_dest), BTreeSet::from(["inside".to_owned()]));

    // Nothing can be created: the destination's parent is a file.
    let file = out.join("a-file");
    fs::write(&file, b"old").expect("write");
    let before = listing(&out);
    let err = store
        .export(&id, &file.join("dest"))
        .expect_err("a file is no directory");
    eprintln!("export under a file: {err}");
    assert_eq!(fs::read(&file).expect("read"), b"old");
    assert_eq!(listing(&out), before);

    // The write fails midway: a 4 MiB blob on a 1 MiB file system.
    let small_dir = tmp.path().join("small");
    match Tmpfs::mount(&small_dir, "1m") {
        Ok(_small) => {
            let dest = small_dir.join("dest");
            let err = store
                .export(&id, &dest)
                .expect_err("4 MiB cannot fit in 1 MiB");
            assert!(err.is_disk_full(), "{err:?}");
            assert!(!dest.exists());
            assert!(listing(&small_dir).is_empty(), "{:?}", listing(&small_dir));
            let keep = small_dir.join("keep");
            fs::write(&keep, b"old contents").expect("write");
            let err = store
                .export(&id, &keep)
                .expect_err("4 MiB cannot fit in 1 MiB");
            assert!(err.is_disk_full(), "{err:?}");
            assert_eq!(fs::read(&keep).expect("read"), b"old contents");
            assert_eq!(listing(&small_dir), BTreeSet::from(["keep".to_owned()]));
        }
        Err(why) => eprintln!("skipping the full-destination export: {why}"),
    }

    // The store is unharmed, and a good export replaces an old file whole.
    let dest = out.join("a-file");
    store.export(&id, &dest).expect("export");
    assert!(fs::read(&dest).expect("read") == source);
    assert_eq!(listing(&out), before);
}

/// A full disk, for real: adds and begins that cannot fit fail with
/// [`StoreError::DiskFull`] and leave the store as it was. The store lives in
/// `store_dir` on a file system (or under a file-size limit) of 8 MiB; the
/// sources `small` (2 MiB) and `big` (16 MiB) lie outside it, in `scratch`.
fn check_disk_full(scratch: &Path, store_dir: &Path) {
    let small = fs::read(scratch.join("small")).expect("read small");
    let store = Store::open(store_dir).expect("open");
    let first = store
        .add_file(&scratch.join("small"))
        .expect("2 MiB fits in 8 MiB");

    let err = store
        .add_file(&scratch.join("big"))
        .expect_err("16 MiB cannot fit in 8 MiB");
    assert!(
        matches!(err, StoreError::DiskFull { .. }) && err.is_disk_full(),
        "{err:?}"
    );
    eprintln!("add of 16 MiB: {err}");

    // Space for a download is reserved up front, so it fails at `begin`.
    let huge = Outboard::compute(&random_bytes(32 * MIB));
    let err = store.begin(&huge).expect_err("32 MiB cannot be reserved");
    assert!(
        matches!(err, StoreError::DiskFull { .. }) && err.is_disk_full(),
        "{err:?}"
    );
    eprintln!("begin of 32 MiB: {err}");
    assert!(store.get(&huge.id()).is_none());

    let intact = |store: &Store, ids: &[nebula_common::BlobId]| {
        let listed: Vec<_> = store
            .list()
            .into_iter()
            .map(|b| (b.id, b.complete))
            .collect();
        let mut want: Vec<_> = ids.iter().map(|&id| (id, true)).collect();
        want.sort_by_key(|&(id, _)| id);
        assert_eq!(listed, want);
        let on_disk = listing(&store_dir.join("blobs"));
        let want: BTreeSet<String> = ids.iter().map(ToString::to_string).collect();
        assert_eq!(on_disk, want, "blob directories");
        assert!(
            listing(&store_dir.join("tmp")).is_empty(),
            "staging holds {:?}",
            listing(&store_dir.join("tmp"))
        );
    };
    intact(&store, &[first.id()]);
    let dest = scratch.join("exported");
    store
        .export(&first.id(), &dest)
        .expect("export after a full disk");
    assert!(fs::read(&dest).expect("read") == small);
    fs::remove_file(&dest).expect("rm");

    // The failures released their space: a small add fits again.
    let tiny = scratch.join("tiny");
    fs::write(&tiny, random_bytes(64 * 1024)).expect("write");
    let second = store
        .add_file(&tiny)
        .expect("a small add once space allows");
    intact(&store, &[first.id(), second.id()]);

    drop((first, second));
    let ids: Vec<_> = store.list().into_iter().map(|b| b.id).collect();
    drop(store);
    let store = Store::open(store_dir).expect("reopen");
    intact(&store, &ids);
}

/// Writes the sources [`check_disk_full`] reads.
fn disk_full_sources(scratch: &Path) {
    fs::write(scratch.join("small"), random_bytes(2 * MIB)).expect("write small");
    fs::write(scratch.join("big"), random_bytes(16 * MIB)).expect("write big");
}

/// Runs [`check_disk_full`] in a child process whose file-size limit
/// (`RLIMIT_FSIZE`, SIGXFSZ ignored) is 8 MiB: writes past it fail with EFBIG.
fn disk_full_under_rlimit(scratch: &Path) {
    let mut child = ChildProcess::spawn("store::child_disk_full", scratch);
    let status = child.finish();
    assert!(
        status.success(),
        "child failed: {status:?}\n{}",
        child.output()
    );
    assert!(
        child
            .seen
            .iter()
            .any(|l| l.ends_with("disk-full checks passed")),
        "the child did not run the checks:\n{}",
        child.output()
    );
}

/// A full disk on a real 8 MiB tmpfs (as root), else under a file-size limit.
#[test]
fn disk_full_is_typed_and_leaves_the_store_intact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    disk_full_sources(tmp.path());
    let mount_dir = tmp.path().join("mnt");
    match Tmpfs::mount(&mount_dir, "8m") {
        Ok(_tmpfs) => {
            eprintln!("disk full: an 8 MiB tmpfs at {}", mount_dir.display());
            check_disk_full(tmp.path(), &mount_dir.join("store"));
        }
        Err(why) => {
            eprintln!("disk full: RLIMIT_FSIZE of 8 MiB in a child ({why})");
            disk_full_under_rlimit(tmp.path());
        }
    }
}

/// The same through the file-size limit, which fails with EFBIG rather than
/// ENOSPC: the store must call that a full disk too.
#[test]
fn disk_full_under_a_file_size_limit_is_typed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    disk_full_sources(tmp.path());
    disk_full_under_rlimit(tmp.path());
}

/// The child of [`disk_full_under_rlimit`].
#[test]
#[ignore = "run as a child process by the disk-full tests"]
fn child_disk_full() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    let limit = libc::rlimit {
        rlim_cur: 8 << 20,
        rlim_max: 8 << 20,
    };
    // SAFETY: plain syscalls on this process; ignoring SIGXFSZ turns the
    // signal a write past the limit would raise into an EFBIG error.
    unsafe {
        assert_ne!(libc::signal(libc::SIGXFSZ, libc::SIG_IGN), libc::SIG_ERR);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    check_disk_full(&dir, &dir.join("store"));
    println!("disk-full checks passed");
}
