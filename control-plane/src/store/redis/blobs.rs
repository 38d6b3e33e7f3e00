//! Blob records: reading a swarm, dropping entries, the cluster-wide counters.

use bytes::Bytes;
use nebula_common::{BlobId, Sha256Digest};

use super::{
    R, RedisStore,
    encoding::{as_array, as_bytes, as_int, as_str, blob_keys, reply},
    scripts::Call,
};
use crate::store::{BlobMeta, Holding, StoreError, Swarm};

impl RedisStore {
    /// Adjusts the cluster-wide counters (best effort: a replica dying between
    /// a script and this leaves them off by its share).
    pub(super) async fn count(&self, blobs: i64, entries: i64) -> R<()> {
        if blobs == 0 && entries == 0 {
            return Ok(());
        }
        let mut conn = self.primary.conn().await?;
        redis::pipe()
            .hincr(self.stats_key(), "blobs", blobs)
            .ignore()
            .hincr(self.stats_key(), "entries", entries)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Removes `peer`'s entries from `blobs` (only those of registration
    /// `epoch`, when given) and the aliases of blobs left without providers.
    pub(super) async fn drop_entries(
        &self,
        peer: &str,
        epoch: Option<&str>,
        blobs: &[Vec<u8>],
    ) -> R<()> {
        let calls: Vec<Call> = blobs
            .iter()
            .filter_map(|b| std::str::from_utf8(b).ok())
            .map(|hex| Call {
                keys: blob_keys(self.prefix(), hex),
                args: vec![peer.into(), epoch.unwrap_or("").into()],
            })
            .collect();
        let answers = self.eval_many(&self.scripts.drop, &calls).await?;
        let (mut gone_blobs, mut gone_entries) = (0, 0);
        let mut aliases = Vec::new();
        for (call, a) in calls.iter().zip(&answers) {
            let a = as_array(a).ok_or_else(|| reply("drop"))?;
            gone_entries += a.first().and_then(as_int).unwrap_or(0);
            if a.get(1).and_then(as_int) == Some(1) {
                gone_blobs += 1;
                if let Some(sha) = a.get(2).and_then(as_str) {
                    let hex = call.keys[0]
                        .split("{b:")
                        .nth(1)
                        .and_then(|s| s.split('}').next());
                    if let Some(hex) = hex {
                        aliases.push(Call {
                            keys: vec![self.alias_key(sha)],
                            args: vec![hex.into()],
                        });
                    }
                }
            }
        }
        self.eval_many(&self.scripts.alias_forget, &aliases).await?;
        self.count(-gone_blobs, -gone_entries).await
    }

    /// A blob's swarm as Redis holds it now (entries of lapsed or earlier
    /// registrations left out; expired entries trimmed).
    pub(super) async fn read_swarm(&self, blob: &BlobId) -> Result<Option<Swarm>, StoreError> {
        self.run("swarm", async {
            let hex = blob.to_string();
            let v = self
                .eval(&self.scripts.read, &blob_keys(self.prefix(), &hex), &[])
                .await?;
            let a = as_array(&v).ok_or_else(|| reply("swarm"))?;
            let trimmed = a.first().and_then(as_int).unwrap_or(0);
            let gone = a.get(1).and_then(as_int).unwrap_or(0);
            let sha = a
                .get(2)
                .and_then(as_str)
                .and_then(|s| s.parse::<Sha256Digest>().ok());
            if trimmed > 0 || gone > 0 {
                self.count(-gone, -trimmed).await?;
                if gone > 0
                    && let Some(sha) = sha
                {
                    let key = self.alias_key(&sha.to_string());
                    self.eval(&self.scripts.alias_forget, &[key], &[hex.as_bytes()])
                        .await?;
                }
            }
            let Some(size) = a.get(3).and_then(as_int) else {
                return Ok(None);
            };
            let data = a.get(4).and_then(as_array).ok_or_else(|| reply("swarm"))?;
            let mut entries = Vec::with_capacity(data.len() / 2);
            for pair in data.chunks_exact(2) {
                let (Some(peer), Some(value)) = (as_str(&pair[0]), as_bytes(&pair[1])) else {
                    continue;
                };
                let Some(bar) = value.iter().position(|&c| c == b'|') else {
                    continue;
                };
                entries.push((peer, &value[..bar], &value[bar + 1..]));
            }
            let ids: Vec<&str> = entries.iter().map(|e| e.0).collect();
            let snaps = self.snapshots_cached(&ids).await?;
            let holders = entries
                .iter()
                .zip(snaps)
                .filter_map(|((_, epoch, bits), snap)| {
                    let (peer, current) = snap?;
                    // An entry of an earlier registration is stale.
                    (current.as_bytes() == *epoch).then(|| Holding {
                        peer,
                        chunks: (!bits.is_empty()).then(|| Bytes::copy_from_slice(bits)),
                    })
                })
                .collect();
            Ok(Some(Swarm {
                meta: BlobMeta {
                    id: *blob,
                    size: size as u64,
                    sha256: sha,
                },
                holders,
            }))
        })
        .await
    }
}
