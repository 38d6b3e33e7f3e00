//! Ranking the providers of one blob.
//!
//! The rules, in order: only discoverable peers (healthy, not draining, banned
//! or quarantined), never the asker; then complete before partial, lower load
//! (in tenths of busy slots, see [`crate::Load::bucket`]) before higher, the
//! asker's zone before others; then chance, so equal providers share the load.

use rand::Rng;

use crate::store::{Holding, PeerId};

/// Sort key of one provider: smaller is better.
type RankKey = (bool, u32, bool, u32);

fn key<R: Rng>(h: &Holding, zone: &str, rng: &mut R) -> RankKey {
    let partial = h.chunks.is_some();
    let other_zone = zone.is_empty() || *h.peer.zone != *zone;
    (partial, h.peer.load.bucket(), other_zone, rng.random())
}

/// Filters and orders `holders`, best first, keeping at most `limit`.
///
/// `zone` is the asker's zone (empty: no zone preference).
pub fn rank<R: Rng>(
    holders: Vec<Holding>,
    asker: Option<&PeerId>,
    zone: &str,
    limit: usize,
    rng: &mut R,
) -> Vec<Holding> {
    if limit == 0 {
        return Vec::new();
    }
    let mut keyed: Vec<(RankKey, Holding)> = holders
        .into_iter()
        .filter(|h| h.peer.discoverable() && asker != Some(&h.peer.id))
        .map(|h| (key(&h, zone, rng), h))
        .collect();
    if keyed.len() > limit {
        keyed.select_nth_unstable_by_key(limit - 1, |(k, _)| *k);
        keyed.truncate(limit);
    }
    keyed.sort_unstable_by_key(|(k, _)| *k);
    keyed.into_iter().map(|(_, h)| h).collect()
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use bytes::Bytes;
    use rand::{SeedableRng, rngs::StdRng};
    use tokio::time::Instant;

    use super::*;
    use crate::store::{Health, Load, PeerSnapshot, Standing};

    fn holder(id: &str) -> Holding {
        Holding {
            peer: PeerSnapshot {
                id: id.parse().unwrap(),
                address: Arc::from("127.0.0.1:1"),
                zone: Arc::from("a"),
                labels: Arc::new(BTreeMap::new()),
                health: Health::Healthy,
                standing: Standing::Active,
                reason: Arc::from(""),
                reports: 0,
                load: Load::default(),
                last_seen: Instant::now(),
                blob_count: 1,
            },
            chunks: None,
        }
    }

    fn ids(v: &[Holding]) -> Vec<&str> {
        v.iter().map(|h| h.peer.id.as_str()).collect()
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn only_healthy_and_active_peers() {
        let mut sick = holder("sick");
        sick.peer.health = Health::Unhealthy;
        let mut draining = holder("draining");
        draining.peer.standing = Standing::Draining;
        let mut banned = holder("banned");
        banned.peer.standing = Standing::Banned;
        let mut quarantined = holder("quarantined");
        quarantined.peer.standing = Standing::Quarantined;
        let all = vec![sick, holder("ok"), draining, banned, quarantined];
        assert_eq!(ids(&rank(all, None, "", 20, &mut rng())), ["ok"]);
    }

    #[test]
    fn never_the_asker() {
        let asker: PeerId = "me".parse().unwrap();
        let out = rank(
            vec![holder("me"), holder("other")],
            Some(&asker),
            "",
            20,
            &mut rng(),
        );
        assert_eq!(ids(&out), ["other"]);
    }

    #[test]
    fn complete_before_partial() {
        let mut partial = holder("partial");
        partial.chunks = Some(Bytes::from_static(&[0b1]));
        // Even an idle partial provider ranks after a busy complete one.
        let mut busy = holder("busy-complete");
        busy.peer.load = Load {
            active_uploads: 9,
            upload_slots: 10,
            upload_bytes_per_sec: 0,
        };
        for _ in 0..20 {
            let out = rank(
                vec![partial.clone(), busy.clone()],
                None,
                "",
                20,
                &mut rand::rng(),
            );
            assert_eq!(ids(&out), ["busy-complete", "partial"]);
            assert!(out[1].chunks.is_some());
        }
    }

    #[test]
    fn lower_load_first() {
        let mut idle = holder("idle");
        idle.peer.zone = Arc::from("far");
        let mut busy = holder("busy");
        busy.peer.load = Load {
            active_uploads: 5,
            upload_slots: 10,
            upload_bytes_per_sec: 0,
        };
        // Load outranks zone: the busy peer is in the asker's zone.
        for _ in 0..20 {
            let out = rank(
                vec![busy.clone(), idle.clone()],
                None,
                "a",
                20,
                &mut rand::rng(),
            );
            assert_eq!(ids(&out), ["idle", "busy"]);
        }
    }

    #[test]
    fn same_zone_first() {
        let mut far = holder("far");
        far.peer.zone = Arc::from("b");
        for _ in 0..20 {
            let out = rank(
                vec![far.clone(), holder("near")],
                None,
                "a",
                20,
                &mut rand::rng(),
            );
            assert_eq!(ids(&out), ["near", "far"]);
        }
    }

    #[test]
    fn at_most_limit_and_the_best_ones() {
        let mut all: Vec<Holding> = (0..50).map(|i| holder(&format!("p{i}"))).collect();
        for h in &mut all[..45] {
            h.chunks = Some(Bytes::from_static(&[1]));
        }
        let out = rank(all.clone(), None, "", 5, &mut rng());
        assert_eq!(out.len(), 5);
        assert!(
            out.iter().all(|h| h.chunks.is_none()),
            "the 5 complete ones win"
        );
        assert_eq!(rank(all.clone(), None, "", 3, &mut rng()).len(), 3);
        assert_eq!(rank(all, None, "", 0, &mut rng()).len(), 0);
    }

    #[test]
    fn random_among_equals() {
        let all: Vec<Holding> = (0..4).map(|i| holder(&format!("p{i}"))).collect();
        let mut firsts = std::collections::HashSet::new();
        let mut rng = rng();
        for _ in 0..200 {
            let out = rank(all.clone(), None, "a", 20, &mut rng);
            assert_eq!(out.len(), 4);
            firsts.insert(out[0].peer.id.to_string());
        }
        assert_eq!(
            firsts.len(),
            4,
            "every equal provider should come first sometimes"
        );
    }
}
