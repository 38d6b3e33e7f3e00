//! Peer records: snapshots (cached for swarms) and pushing entries' expiry forward.

use tokio::time::Instant;

use super::{
    PIPELINE, R, RedisStore,
    encoding::{blob_keys, is_nil, millis, parse_snapshot, reply},
    scripts::Call,
};
use crate::store::{PeerId, PeerSnapshot};

impl RedisStore {
    /// Forgets every cached swarm and provider (a peer's record changed).
    pub(super) fn forget_swarms(&self) {
        self.cache.clear();
        self.peer_cache.clear();
    }

    /// Like [`RedisStore::snapshots`], reusing snapshots read less than
    /// [`RedisConfig::swarm_cache`](super::RedisConfig::swarm_cache) ago.
    pub(super) async fn snapshots_cached(
        &self,
        ids: &[&str],
    ) -> R<Vec<Option<(PeerSnapshot, String)>>> {
        if !self.peer_cache.enabled() {
            return self.snapshots(ids).await;
        }
        let mut out: Vec<Option<Option<(PeerSnapshot, String)>>> =
            ids.iter().map(|id| self.peer_cache.get(*id)).collect();
        let missing: Vec<&str> = ids
            .iter()
            .zip(&out)
            .filter(|(_, hit)| hit.is_none())
            .map(|(id, _)| *id)
            .collect();
        if !missing.is_empty() {
            let mut fresh = self.snapshots(&missing).await?.into_iter();
            for (slot, id) in out.iter_mut().zip(ids).filter(|(s, _)| s.is_none()) {
                let snap = fresh.next().ok_or_else(|| reply("snapshot"))?;
                self.peer_cache.insert((*id).to_owned(), snap.clone());
                *slot = Some(snap);
            }
        }
        Ok(out.into_iter().map(Option::flatten).collect())
    }

    /// Snapshots of these peers (`None` for those not alive), pipelined.
    pub(super) async fn snapshots(&self, ids: &[&str]) -> R<Vec<Option<(PeerSnapshot, String)>>> {
        let calls: Vec<Call> = ids
            .iter()
            .map(|id| Call {
                keys: self.peer_keys(id, &["peer", "sanction", "reporters", "inv"]),
                args: Vec::new(),
            })
            .collect();
        let answers = self.eval_many(&self.scripts.snapshot, &calls).await?;
        let now = Instant::now();
        ids.iter()
            .zip(&answers)
            .map(|(id, v)| {
                if is_nil(v) {
                    return Ok(None);
                }
                parse_snapshot(id, v, now)
                    .map(Some)
                    .ok_or_else(|| reply("snapshot"))
            })
            .collect()
    }

    /// Pushes the expiry of every entry of a live peer forward.
    pub(super) async fn push_horizon(&self, id: &PeerId, epoch: &str) -> R<()> {
        let horizon = millis(self.config.entry_horizon);
        let keys = self.peer_keys(id.as_str(), &["peer", "inv"]);
        let mut conn = self.primary.conn().await?;
        let blobs: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&keys[1])
            .query_async(&mut conn)
            .await?;
        let t: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let until = t.0 * 1000 + t.1 / 1000 + horizon;
        for batch in blobs.chunks(PIPELINE) {
            let mut pipe = redis::pipe();
            for hex in batch {
                pipe.cmd("ZADD")
                    .arg(&blob_keys(self.prefix(), hex)[1])
                    .arg("XX")
                    .arg("GT")
                    .arg(until)
                    .arg(id.as_str())
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        let h = horizon.to_string();
        self.eval(
            &self.scripts.set_horizon,
            &keys[..1],
            &[epoch.as_bytes(), h.as_bytes()],
        )
        .await?;
        Ok(())
    }
}
