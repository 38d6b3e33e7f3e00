//! What the demo and the benchmark do to a launched [`TestCluster`] from
//! async code: client commands that report errors instead of panicking,
//! concurrent `nebula fetch` runs timed from one launch ([`Fetch`]), and
//! copy checks that stream a blob out of a daemon and hash it.

use std::{
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use tokio::io::AsyncReadExt as _;

use crate::{
    cluster::TestCluster,
    files::write_random_file,
    process::{Lifetime, nebula_command},
};

/// How long a short client command (`status`, `ls`, `rm`, `add`) may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long exporting one blob through `nebula fetch -o -` for a hash check may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(300);

/// The outcome of one `nebula fetch … --json` process.
#[derive(Debug, Clone)]
pub struct Fetch {
    /// The index of the fetching daemon.
    pub peer: usize,
    /// From the moment the fetches were launched until this one exited.
    pub wall: Duration,
    /// Whether it exited 0 with a JSON object on stdout.
    pub ok: bool,
    /// Its JSON report (`id`, `size`, `elapsed_ms`, `resumed_bytes`, `sources`).
    pub report: Value,
    /// Its exit status and stderr, when it failed.
    pub error: String,
}

impl Fetch {
    /// Bytes received from the provider with this peer id (or this address).
    pub fn bytes_from(&self, peer_id: &str, address: &str) -> u64 {
        self.sources()
            .filter(|s| s["peer_id"] == peer_id || s["address"] == address)
            .map(|s| s["bytes"].as_u64().unwrap_or(0))
            .sum()
    }

    /// Bytes received from all providers.
    pub fn bytes_total(&self) -> u64 {
        self.sources()
            .map(|s| s["bytes"].as_u64().unwrap_or(0))
            .sum()
    }

    fn sources(&self) -> impl Iterator<Item = &Value> {
        self.report["sources"].as_array().into_iter().flatten()
    }
}

impl TestCluster {
    /// A `nebula ARGS --socket <daemon's socket>` client command, killed if dropped.
    fn client(&self, peer: usize, args: &[&str]) -> tokio::process::Command {
        // Short commands never outlive us, even in a cluster that may be kept.
        let lifetime = match self.options().lifetime {
            Lifetime::Handle => Lifetime::Handle,
            Lifetime::Owned | Lifetime::Detachable => Lifetime::Owned,
        };
        let mut cmd = nebula_command(&self.bin, lifetime);
        cmd.args(args)
            .arg("--socket")
            .arg(&self.daemons[peer].socket);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `nebula ARGS --socket <daemon's socket>`, which must exit 0 within 30 s.
    async fn client_ok(&self, peer: usize, args: &[&str]) -> anyhow::Result<Output> {
        let shown = format!("peer{peer}: nebula {}", args.join(" "));
        let child = self
            .client(peer, args)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let out = tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
            .await
            .with_context(|| format!("`{shown}` took over {CLI_TIMEOUT:?}"))??;
        if !out.status.success() {
            bail!(
                "`{shown}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Runs `nebula ARGS --socket <daemon's socket>`, which must exit 0 and print one JSON value.
    pub async fn peer_json(&self, peer: usize, args: &[&str]) -> anyhow::Result<Value> {
        let out = self.client_ok(peer, args).await?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "peer{peer}: `nebula {}` printed no JSON: {:?}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `nebula rm ID` on a daemon.
    pub async fn remove(&self, peer: usize, id: &str) -> anyhow::Result<()> {
        self.client_ok(peer, &["rm", id]).await.map(drop)
    }

    /// Chunk payload bytes a daemon has served to other peers since it started.
    pub async fn uploaded_bytes(&self, peer: usize) -> anyhow::Result<u64> {
        let status = self.peer_json(peer, &["status", "--json"]).await?;
        status["uploaded_bytes"]
            .as_u64()
            .with_context(|| format!("peer{peer}: no uploaded_bytes in {status}"))
    }

    /// Verified bytes of blob `id` a daemon holds, from `nebula ls --json` (0 when absent).
    pub async fn held_bytes(&self, peer: usize, id: &str) -> anyhow::Result<u64> {
        let ls = self.peer_json(peer, &["ls", "--json"]).await?;
        let held = ls["blobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["id"] == id)
            .map(|b| {
                let size = b["size"].as_u64().unwrap_or(0);
                let verified = b["chunks_verified"].as_u64().unwrap_or(0);
                let chunk = b["chunk_size"].as_u64().unwrap_or(0);
                if b["complete"] == true {
                    size
                } else {
                    (verified * chunk).min(size)
                }
            })
            .max()
            .unwrap_or(0);
        Ok(held)
    }

    /// Writes a file of `size` random bytes in the cluster's directory;
    /// returns its path and its blob id.
    pub async fn random_blob(&self, name: &str, size: u64) -> anyhow::Result<(PathBuf, String)> {
        let path = self.path(name);
        let id = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || write_random_file(&path, size)).await??
        };
        Ok((path, id.to_hex().to_string()))
    }

    /// `nebula add FILE --json` on a daemon, checking the printed id against `expect`.
    pub async fn add(&self, peer: usize, file: &Path, expect: &str) -> anyhow::Result<()> {
        let file = file.to_str().context("temporary paths are UTF-8")?;
        let added = self.peer_json(peer, &["add", file, "--json"]).await?;
        ensure!(
            added["id"] == expect,
            "peer{peer}: nebula add printed id {} for a file whose BLAKE3 is {expect}",
            added["id"]
        );
        Ok(())
    }

    /// Whether the copy of blob `id` a daemon holds hashes to `id`: the bytes
    /// come out through `nebula fetch ID -o -` (the daemon's own export path)
    /// and are hashed as they stream, so checking writes nothing to disk.
    pub async fn verify_copy(&self, peer: usize, id: &str) -> anyhow::Result<bool> {
        let mut child = self
            .client(peer, &["fetch", id, "-o", "-"])
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let mut stdout = child.stdout.take().context("stdout is piped")?;
        let read = async {
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = stdout.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let out = child.wait_with_output().await?;
            anyhow::Ok((hasher.finalize(), out))
        };
        let (hash, out) = tokio::time::timeout(VERIFY_TIMEOUT, read)
            .await
            .with_context(|| {
                format!("peer{peer}: exporting {id} took over {VERIFY_TIMEOUT:?}")
            })??;
        ensure!(
            out.status.success(),
            "peer{peer}: nebula fetch {id} -o - failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(hash.to_hex().as_str() == id)
    }

    /// Runs `nebula fetch ID --json` on each of `peers` at once, each bounded
    /// by `limit`: the blob lands in each daemon's store (no `-o`: an export
    /// is a local copy, not distribution; see [`TestCluster::verify_copy`]).
    /// `Fetch::wall` counts from the launch of them all. Dropping the future kills them.
    pub async fn fetch_all(
        &self,
        peers: &[usize],
        id: &str,
        limit: Duration,
    ) -> anyhow::Result<Vec<Fetch>> {
        let start = Instant::now();
        let mut running = Vec::new();
        for &peer in peers {
            let child = self
                .client(peer, &["fetch", id, "--json"])
                .spawn()
                .with_context(|| format!("cannot start {}", self.bin.display()))?;
            running.push(async move {
                let waited = tokio::time::timeout(limit, child.wait_with_output()).await;
                let mut fetch = Fetch {
                    peer,
                    wall: start.elapsed(),
                    ok: false,
                    report: Value::Null,
                    error: String::new(),
                };
                match waited {
                    Err(_) => fetch.error = format!("timed out after {limit:?}"),
                    Ok(Err(err)) => fetch.error = format!("cannot wait for nebula fetch: {err}"),
                    Ok(Ok(out)) => match serde_json::from_slice::<Value>(&out.stdout) {
                        Ok(report) if out.status.success() && report.is_object() => {
                            fetch.ok = true;
                            fetch.report = report;
                        }
                        _ => {
                            let stderr = String::from_utf8_lossy(&out.stderr);
                            let no_json = if out.status.success() {
                                " (no JSON object on stdout)"
                            } else {
                                ""
                            };
                            fetch.error = format!("{}: {}{no_json}", out.status, stderr.trim());
                        }
                    },
                }
                fetch
            });
        }
        Ok(futures::future::join_all(running).await)
    }
}
