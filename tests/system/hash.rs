//! `nebula hash` as users run it: the real binary against the `b3sum`
//! reference (the `blake3` crate computes exactly what `b3sum` prints).

use std::{
    fs,
    path::Path,
    process::{Command, Output},
};

use rand::RngCore as _;
use sha2::Digest as _;

const MIB: usize = 1 << 20;

/// The sizes where chunking can go wrong: empty, one byte, either side of the
/// first chunk boundary, a short last chunk, and a file of many chunks.
const SIZES: [usize; 7] = [0, 1, MIB - 1, MIB, MIB + 1, 5 * MIB + 123, 20 * MIB + 4321];

/// Runs `nebula hash ARGS…`. Backtraces are switched on so that a panic on
/// bad input would show itself, and `NEBULA_JSON` is cleared so the caller's
/// environment cannot turn on JSON.
fn nebula_hash(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nebula"))
        .arg("hash")
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("NEBULA_JSON")
        .output()
        .expect("run nebula")
}

fn random_file(dir: &Path, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let mut bytes = vec![0u8; len];
    rand::rng().fill_bytes(&mut bytes);
    let path = dir.join(format!("blob-{len}"));
    fs::write(&path, &bytes).expect("write sample");
    (path, bytes)
}

/// The chunk size the design prescribes, computed independently of
/// `nebula_common::Geometry`: 1 MiB, doubled until at most 8192 chunks.
fn expected_geometry(size: u64) -> (u64, u64) {
    let mut chunk_size = 1u64 << 20;
    while size.div_ceil(chunk_size) > 8192 {
        chunk_size *= 2;
    }
    (chunk_size, size.div_ceil(chunk_size).max(1))
}

#[test]
fn hash_prints_what_b3sum_prints() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for len in SIZES {
        let (path, bytes) = random_file(tmp.path(), len);
        let out = nebula_hash(&[path.as_os_str()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "size {len}: {:?}: {stderr}",
            out.status
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{}\n", blake3::hash(&bytes).to_hex()),
            "size {len}"
        );
        assert!(stderr.is_empty(), "size {len}: unexpected stderr: {stderr}");
    }
}

#[test]
fn hash_json_reports_id_size_sha256_and_geometry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for len in SIZES {
        let (path, bytes) = random_file(tmp.path(), len);
        let out = nebula_hash(&[path.as_os_str(), "--json".as_ref()]);
        assert!(
            out.status.success(),
            "size {len}: {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("utf-8 stdout");
        assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
        let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
        let obj = json.as_object().expect("a JSON object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["chunk_size", "chunks", "id", "sha256", "size"]);
        let (chunk_size, chunks) = expected_geometry(len as u64);
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        assert_eq!(
            json,
            serde_json::json!({
                "id": blake3::hash(&bytes).to_hex().as_str(),
                "size": len,
                "sha256": sha256,
                "chunk_size": chunk_size,
                "chunks": chunks,
            }),
            "size {len}"
        );
    }
}

#[test]
fn hash_refuses_a_missing_path_and_a_directory_with_exit_2() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("no-such-file");
    for (what, path) in [
        ("missing path", &missing),
        ("directory", &tmp.path().to_owned()),
    ] {
        for json in [false, true] {
            let mut args = vec![path.as_os_str()];
            if json {
                args.push("--json".as_ref());
            }
            let out = nebula_hash(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
            assert!(stderr.starts_with("error:"), "{what}: {stderr:?}");
            assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr:?}");
            let lower = stderr.to_lowercase();
            assert!(
                !lower.contains("panicked") && !lower.contains("backtrace"),
                "{what}: {stderr}"
            );
            assert!(out.stdout.is_empty(), "{what}: stdout {:?}", out.stdout);
        }
    }
}
