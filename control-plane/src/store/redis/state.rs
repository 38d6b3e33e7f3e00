//! [`StateStore`] on Redis: each operation as scripts on the records it touches.

use std::time::Duration;

use nebula_common::{BlobId, Sha256Digest};

use super::{
    MAX_REPORTERS, RedisStore, SWEEP_BATCH,
    encoding::{
        as_array, as_int, as_str, blob_keys, byte_list, encode_labels, is_nil, millis,
        refused_alias, reply, standing_name,
    },
    scripts::Call,
};
use crate::store::{
    Announcement, Health, Load, OriginLease, PeerId, PeerRegistration, PeerSnapshot, Registered,
    ReportOutcome, Standing, StateStore, StoreError, StoreStats, Swarm, UrlKey, UrlRecord,
};

impl StateStore for RedisStore {
    async fn register(
        &self,
        reg: PeerRegistration,
        lease: Duration,
    ) -> Result<Registered, StoreError> {
        self.run("register", async {
            let id = reg.id.as_str();
            let keys = self.peer_keys(id, &["peer", "gen"]);
            let lease = millis(lease).to_string();
            let horizon = millis(self.config.entry_horizon).to_string();
            let labels = encode_labels(&reg.labels);
            let v = self
                .eval(
                    &self.scripts.register,
                    &keys,
                    &[
                        reg.address.as_bytes(),
                        reg.zone.as_bytes(),
                        &labels,
                        lease.as_bytes(),
                        horizon.as_bytes(),
                    ],
                )
                .await?;
            let a = as_array(&v).ok_or_else(|| reply("register"))?;
            let alive = a.first().and_then(as_int) == Some(1);
            let deadline = a.get(1).and_then(as_int).ok_or_else(|| reply("register"))?;
            let mut conn = self.primary.conn().await?;
            redis::cmd("ZADD")
                .arg(self.index_key())
                .arg(deadline)
                .arg(id)
                .query_async::<()>(&mut conn)
                .await?;
            Ok(if alive {
                Registered::Renewed
            } else {
                Registered::New
            })
        })
        .await
    }

    async fn renew(&self, peer: &PeerId, load: Load, lease: Duration) -> Result<bool, StoreError> {
        self.run_bulk("renew", 0, async {
            let keys = self.peer_keys(peer.as_str(), &["peer"]);
            let args = [
                load.active_uploads.to_string(),
                load.upload_bytes_per_sec.to_string(),
                load.upload_slots.to_string(),
                millis(lease).to_string(),
                millis(self.config.entry_horizon).to_string(),
            ];
            let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            let v = self.eval(&self.scripts.renew, &keys, &args).await?;
            if is_nil(&v) {
                return Ok(false);
            }
            let a = as_array(&v).ok_or_else(|| reply("renew"))?;
            let deadline = a.first().and_then(as_int).ok_or_else(|| reply("renew"))?;
            let mut conn = self.primary.conn().await?;
            redis::cmd("ZADD")
                .arg(self.index_key())
                .arg(deadline)
                .arg(peer.as_str())
                .query_async::<()>(&mut conn)
                .await?;
            if a.get(2).and_then(as_int) == Some(1) {
                let epoch = a.get(1).and_then(as_str).unwrap_or_default().to_owned();
                self.push_horizon(peer, &epoch).await?;
            }
            Ok(true)
        })
        .await
    }

    async fn deregister(&self, peer: &PeerId) -> Result<bool, StoreError> {
        self.forget_swarms();
        self.run_bulk("deregister", 0, async {
            let keys = self.peer_keys(peer.as_str(), &["peer", "gen", "inv", "part"]);
            let v = self.eval(&self.scripts.deregister, &keys, &[]).await?;
            let a = as_array(&v).ok_or_else(|| reply("deregister"))?;
            let known = a.first().and_then(as_int) == Some(1);
            let blobs = byte_list(a.get(1));
            self.drop_entries(peer.as_str(), None, &blobs).await?;
            let mut conn = self.primary.conn().await?;
            redis::cmd("ZREM")
                .arg(self.index_key())
                .arg(peer.as_str())
                .query_async::<()>(&mut conn)
                .await?;
            Ok(known)
        })
        .await
    }

    async fn announce(&self, peer: &PeerId, ann: Announcement) -> Result<bool, StoreError> {
        // A full inventory may drop blobs not named here: forget everything.
        if ann.full_inventory {
            self.forget_swarms();
        } else {
            for id in ann.blobs.iter().map(|b| &b.id).chain(&ann.removed) {
                self.cache.remove(id);
            }
        }
        let items = ann.blobs.len() + ann.removed.len();
        self.run_bulk("announce", items, async {
            let id = peer.as_str();
            let caps = self.config.caps;
            if !ann.blobs.is_empty() {
                // The store-wide cap, read before: concurrent announces may
                // pass it by at most one announce each.
                let mut conn = self.primary.conn().await?;
                let entries: Option<i64> = redis::cmd("HGET")
                    .arg(self.stats_key())
                    .arg("entries")
                    .query_async(&mut conn)
                    .await?;
                caps.check(0, 0, 1, entries.unwrap_or(0).max(0) as u64)?;
            }
            let keys = self.peer_keys(id, &["peer", "inv", "part"]);
            let added: Vec<String> = ann.blobs.iter().map(|b| b.id.to_string()).collect();
            let removed: Vec<String> = ann.removed.iter().map(ToString::to_string).collect();
            let n = added.len().to_string();
            let (most, most_partial) = (caps.peer_blobs.to_string(), caps.peer_partial.to_string());
            let flags: Vec<u8> = ann
                .blobs
                .iter()
                .map(|b| if b.chunks.is_some() { b'1' } else { b'0' })
                .collect();
            let mut args: Vec<&[u8]> = vec![
                if ann.full_inventory { b"1" } else { b"0" },
                n.as_bytes(),
                most.as_bytes(),
                most_partial.as_bytes(),
                &flags,
            ];
            args.extend(added.iter().map(|a| a.as_bytes()));
            args.extend(removed.iter().map(|a| a.as_bytes()));
            let v = self.eval(&self.scripts.inventory, &keys, &args).await?;
            if is_nil(&v) {
                return Ok(false);
            }
            let a = as_array(&v).ok_or_else(|| reply("announce"))?;
            if a.first().and_then(as_str) == Some("cap") {
                let count = a.get(2).and_then(as_int).unwrap_or(0).max(0) as u64;
                let partial = a.get(1).and_then(as_str) == Some("partial");
                let (what, max, flag) = if partial {
                    (
                        "partly held blobs of this peer",
                        caps.peer_partial,
                        "--max-peer-partial",
                    )
                } else {
                    (
                        "blobs held by this peer",
                        caps.peer_blobs,
                        "--max-peer-blobs",
                    )
                };
                return Err(StoreError::Cap {
                    what,
                    count,
                    max,
                    flag,
                }
                .into());
            }
            let epoch = a
                .first()
                .and_then(as_str)
                .ok_or_else(|| reply("announce"))?;
            let dropped = byte_list(a.get(1));
            // Removals first: a blob both removed and added ends up held.
            self.drop_entries(id, None, &dropped).await?;

            let horizon = millis(self.config.entry_horizon).to_string();
            let calls: Vec<Call> = ann
                .blobs
                .iter()
                .zip(&added)
                .map(|(b, hex)| Call {
                    keys: blob_keys(self.prefix(), hex),
                    args: vec![
                        id.into(),
                        epoch.into(),
                        b.size.to_string().into(),
                        b.sha256.map(|d| d.to_string()).unwrap_or_default().into(),
                        b.chunks.as_deref().unwrap_or_default().to_vec(),
                        horizon.clone().into(),
                    ],
                })
                .collect();
            let answers = self.eval_many(&self.scripts.upsert, &calls).await?;
            let (mut new_blobs, mut new_entries) = (0, 0);
            for ((b, hex), answer) in ann.blobs.iter().zip(&added).zip(&answers) {
                let r = as_array(answer).ok_or_else(|| reply("announce"))?;
                new_blobs += r.first().and_then(as_int).unwrap_or(0);
                new_entries += r.get(1).and_then(as_int).unwrap_or(0);
                let Some(sha) = b.sha256 else { continue };
                let sha_hex = sha.to_string();
                match r.get(2).and_then(as_int) {
                    // A new digest for the blob: claim the alias, unless it
                    // names another blob (the first claim stands).
                    Some(1) => {
                        let key = self.alias_key(&sha_hex);
                        let holder = self
                            .eval(&self.scripts.alias_claim, &[key], &[hex.as_bytes()])
                            .await?;
                        let holder = as_str(&holder).unwrap_or_default().to_owned();
                        if holder != *hex {
                            refused_alias(&sha_hex, hex, &holder);
                            let meta = blob_keys(&self.config.prefix, hex).swap_remove(0);
                            self.eval(&self.scripts.alias_unclaim, &[meta], &[sha_hex.as_bytes()])
                                .await?;
                        }
                    }
                    Some(2) => refused_alias(&sha_hex, hex, ""),
                    _ => {}
                }
            }
            self.count(new_blobs, new_entries).await?;
            Ok(true)
        })
        .await
    }

    async fn swarm(&self, blob: &BlobId) -> Result<Option<Swarm>, StoreError> {
        if let Some(swarm) = self.cache.get(blob) {
            return Ok(swarm);
        }
        let swarm = self.read_swarm(blob).await?;
        self.cache.insert(*blob, swarm.clone());
        Ok(swarm)
    }

    async fn resolve_sha256(&self, digest: &Sha256Digest) -> Result<Option<BlobId>, StoreError> {
        self.run("resolve_sha256", async {
            let mut conn = self.primary.conn().await?;
            let hex: Option<String> = redis::cmd("GET")
                .arg(self.alias_key(&digest.to_string()))
                .query_async(&mut conn)
                .await?;
            Ok(hex.and_then(|h| h.parse().ok()))
        })
        .await
    }

    async fn peer(&self, peer: &PeerId) -> Result<Option<PeerSnapshot>, StoreError> {
        self.run("peer", async {
            let mut snaps = self.snapshots(&[peer.as_str()]).await?;
            Ok(snaps.pop().flatten().map(|(s, _)| s))
        })
        .await
    }

    async fn peers(&self) -> Result<Vec<PeerSnapshot>, StoreError> {
        self.run_bulk("peers", 0, async {
            let mut conn = self.primary.conn().await?;
            let ids: Vec<String> = redis::cmd("ZRANGE")
                .arg(self.index_key())
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await?;
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            Ok(self
                .snapshots(&ids)
                .await?
                .into_iter()
                .flatten()
                .map(|(s, _)| s)
                .collect())
        })
        .await
    }

    async fn set_health(&self, peer: &PeerId, health: Health) -> Result<bool, StoreError> {
        self.forget_swarms();
        self.run("set_health", async {
            let h: &[u8] = if health == Health::Healthy {
                b"1"
            } else {
                b"0"
            };
            let keys = self.peer_keys(peer.as_str(), &["peer"]);
            let v = self.eval(&self.scripts.set_health, &keys, &[h]).await?;
            Ok(as_int(&v) == Some(1))
        })
        .await
    }

    async fn set_standing(
        &self,
        peer: &PeerId,
        standing: Standing,
        reason: &str,
    ) -> Result<Option<PeerSnapshot>, StoreError> {
        self.forget_swarms();
        self.run("set_standing", async {
            let keys = self.peer_keys(peer.as_str(), &["peer", "sanction", "reporters"]);
            let v = self
                .eval(
                    &self.scripts.set_standing,
                    &keys,
                    &[standing_name(standing).as_bytes(), reason.as_bytes()],
                )
                .await?;
            if as_int(&v) != Some(1) {
                return Ok(None);
            }
            let mut snaps = self.snapshots(&[peer.as_str()]).await?;
            Ok(snaps.pop().flatten().map(|(s, _)| s))
        })
        .await
    }

    async fn report(
        &self,
        provider: &PeerId,
        reporter: &PeerId,
        reason: &str,
        quarantine_after: u32,
        ttl: Duration,
    ) -> Result<Option<ReportOutcome>, StoreError> {
        self.forget_swarms();
        self.run("report", async {
            let keys = self.peer_keys(provider.as_str(), &["peer", "sanction", "reporters"]);
            let (q, m) = (quarantine_after.to_string(), MAX_REPORTERS.to_string());
            let ttl = ttl.as_millis().max(1).to_string();
            let v = self
                .eval(
                    &self.scripts.report,
                    &keys,
                    &[
                        reporter.as_str().as_bytes(),
                        reason.as_bytes(),
                        q.as_bytes(),
                        m.as_bytes(),
                        ttl.as_bytes(),
                    ],
                )
                .await?;
            if is_nil(&v) {
                return Ok(None);
            }
            let a = as_array(&v).ok_or_else(|| reply("report"))?;
            Ok(Some(ReportOutcome {
                reports: a.first().and_then(as_int).unwrap_or(0) as u32,
                quarantined: a.get(1).and_then(as_int) == Some(1),
            }))
        })
        .await
    }

    async fn expire(&self) -> Result<Vec<PeerId>, StoreError> {
        self.run_bulk("expire", 0, async {
            let mut conn = self.primary.conn().await?;
            let t: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
            let now = t.0 * 1000 + t.1 / 1000;
            let lapsed: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.index_key())
                .arg("-inf")
                .arg(now)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH)
                .query_async(&mut conn)
                .await?;
            let mut removed = Vec::new();
            for id in lapsed {
                let keys = self.peer_keys(&id, &["peer", "gen", "inv", "part"]);
                let v = self
                    .eval(&self.scripts.purge_begin, &keys[..3], &[])
                    .await?;
                let a = as_array(&v).ok_or_else(|| reply("expire"))?;
                if a.first().and_then(as_int) == Some(1) {
                    // Renewed, but the index missed it (a replica died between
                    // the two steps): repair the index.
                    let deadline = a.get(1).and_then(as_int).unwrap_or(0);
                    redis::cmd("ZADD")
                        .arg(self.index_key())
                        .arg(deadline)
                        .arg(&id)
                        .query_async::<()>(&mut conn)
                        .await?;
                    continue;
                }
                let epoch = a.get(1).and_then(as_str).unwrap_or_default().to_owned();
                let blobs = byte_list(a.get(2));
                self.drop_entries(&id, Some(&epoch), &blobs).await?;
                let done = self
                    .eval(&self.scripts.purge_end, &keys, &[epoch.as_bytes()])
                    .await?;
                self.eval(
                    &self.scripts.index_forget,
                    &[self.index_key()],
                    &[id.as_bytes()],
                )
                .await?;
                if as_int(&done) == Some(1)
                    && let Ok(id) = id.parse()
                {
                    removed.push(id);
                }
            }
            if !removed.is_empty() {
                self.forget_swarms();
            }
            Ok(removed)
        })
        .await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let peers = self.peers().await?;
        self.run("stats", async {
            let mut conn = self.primary.conn().await?;
            let (blobs, entries): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
                .arg(self.stats_key())
                .arg("blobs")
                .arg("entries")
                .query_async(&mut conn)
                .await?;
            Ok(StoreStats {
                peers: peers.len() as u64,
                healthy_peers: peers.iter().filter(|p| p.health == Health::Healthy).count() as u64,
                blobs: blobs.unwrap_or(0).max(0) as u64,
                provider_entries: entries.unwrap_or(0).max(0) as u64,
            })
        })
        .await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.ping().await
    }

    async fn replicas(&self, me: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        self.live_replicas(me, ttl).await
    }

    async fn lock(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.try_lock(name, holder, ttl).await
    }

    async fn url(&self, url: &UrlKey) -> Result<Option<UrlRecord>, StoreError> {
        self.run("url", async {
            let mut conn = self.primary.conn().await?;
            let json: Option<String> = redis::cmd("GET")
                .arg(self.url_key(url))
                .query_async(&mut conn)
                .await?;
            // A record this build cannot read is treated as unknown: the URL
            // is fetched again and recorded afresh.
            Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
        })
        .await
    }

    async fn record_url(
        &self,
        url: &UrlKey,
        record: UrlRecord,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(&record).unwrap_or_default();
        self.run("record_url", async {
            let mut conn = self.primary.conn().await?;
            let () = redis::cmd("SET")
                .arg(self.url_key(url))
                .arg(json)
                .arg("PX")
                .arg(millis(keep))
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    async fn origin_lease(
        &self,
        url: &UrlKey,
        peer: &PeerId,
        ttl: Duration,
    ) -> Result<OriginLease, StoreError> {
        self.run("origin_lease", async {
            let mut conn = self.primary.conn().await?;
            // Take it when free or ours (renewing it), in one step.
            let holder: String = redis::Script::new(
                "local cur = redis.call('GET', KEYS[1]) \
                 if not cur or cur == ARGV[1] then \
                   redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return '' end \
                 return cur",
            )
            .key(format!("{}:lease", self.url_key(url)))
            .arg(peer.as_str())
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await?;
            Ok(if holder.is_empty() {
                OriginLease::Granted
            } else {
                OriginLease::HeldBy(holder)
            })
        })
        .await
    }

    async fn release_origin_lease(&self, url: &UrlKey, peer: &PeerId) -> Result<(), StoreError> {
        self.run("release_origin_lease", async {
            let mut conn = self.primary.conn().await?;
            let _: i64 = redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            )
            .key(format!("{}:lease", self.url_key(url)))
            .arg(peer.as_str())
            .invoke_async(&mut conn)
            .await?;
            Ok(())
        })
        .await
    }
}
