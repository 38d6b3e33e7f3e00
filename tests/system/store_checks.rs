//! The control plane's behaviour, written once over `Registry<S>` and run on
//! every [`StateStore`]: the embedded `MemoryStore` and a `RedisStore` on a
//! `redis-server` of the test's own. Real time, short leases.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use nebula_common::{BlobId, BlobRef, Sha256Digest};
use nebula_control::{
    Config, Health, InventoryCaps, Load, MemoryStore, PeerId, RedisConfig, RedisStore, Registry,
    RegistryError, Standing, StateStore,
    registry::ProviderQuery,
    store::{
        Announcement, BlobAnnouncement, OriginLease, PeerRegistration, Registered, StoreError,
        UrlRecord,
    },
};

use crate::support::RedisServer;

const LEASE: Duration = Duration::from_millis(1500);

fn config() -> Config {
    Config {
        lease_ttl: LEASE,
        heartbeat_interval: Duration::from_millis(200),
        url_ttl: Duration::from_millis(1000),
        origin_lease_ttl: Duration::from_millis(1000),
        url_ignore_query: vec!["sig".into()],
        quarantine_ttl: QUARANTINE_TTL,
        ..Config::default()
    }
}

/// Reports and quarantines lapse this long after the last report.
const QUARANTINE_TTL: Duration = Duration::from_secs(3);

/// Caps small enough for a check to reach.
const CAPS: InventoryCaps = InventoryCaps {
    peer_blobs: 30_000,
    peer_partial: 8,
    entries: 60_000,
};

fn memory() -> Registry<MemoryStore> {
    Registry::new(MemoryStore::with_caps(CAPS), &config())
}

fn redis(server: &RedisServer) -> Registry<RedisStore> {
    let mut redis = RedisConfig::new(&server.url()).unwrap();
    redis.caps = CAPS;
    Registry::new(RedisStore::new(redis).unwrap(), &config())
}

/// Runs each check on a fresh memory store and a fresh Redis store.
macro_rules! on_every_store {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$check(&super::memory()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let server = crate::support::RedisServer::start();
                super::$check(&super::redis(&server)).await;
            }
        }
    )*};
}

on_every_store!(
    check_leases,
    check_expiry,
    check_ranking,
    check_reports_and_quarantine,
    check_quarantines_lapse,
    check_aliases,
    check_bans_and_drains,
    check_partial_bitmaps_and_full_inventory,
    check_large_inventories,
    check_inventory_caps,
    check_urls_and_origin_leases,
);

fn id(s: &str) -> PeerId {
    s.parse().unwrap()
}

fn reg(name: &str, port: u16, zone: &str) -> PeerRegistration {
    let mut labels = BTreeMap::new();
    labels.insert("role".to_owned(), name.to_owned());
    PeerRegistration {
        id: id(name),
        address: format!("127.0.0.1:{port}"),
        zone: zone.into(),
        labels,
    }
}

fn blob(n: u8) -> BlobId {
    BlobId::from(blake3::hash(&[n]))
}

fn sha(n: u8) -> Sha256Digest {
    use sha2::Digest as _;
    Sha256Digest(sha2::Sha256::digest([n]).into())
}

fn complete(n: u8) -> BlobAnnouncement {
    BlobAnnouncement {
        id: blob(n),
        size: 100 << 20,
        sha256: Some(sha(n)),
        chunks: None,
    }
}

fn partial(n: u8, bits: &'static [u8]) -> BlobAnnouncement {
    BlobAnnouncement {
        chunks: Some(Bytes::from_static(bits)),
        ..complete(n)
    }
}

fn adds(blobs: Vec<BlobAnnouncement>) -> Announcement {
    Announcement {
        blobs,
        ..Announcement::default()
    }
}

async fn ranked<S: StateStore>(r: &Registry<S>, asker: Option<&str>, n: u8) -> Vec<String> {
    let q = ProviderQuery {
        blob: BlobRef::Blake3(blob(n)),
        asker: asker.map(id),
        zone: String::new(),
        limit: 0,
    };
    let found = r.find_providers(&q).await.unwrap();
    found
        .providers
        .into_iter()
        .map(|h| h.peer.id.to_string())
        .collect()
}

async fn sorted_providers<S: StateStore>(r: &Registry<S>, n: u8) -> Vec<String> {
    let mut v = ranked(r, None, n).await;
    v.sort();
    v
}

async fn check_leases<S: StateStore>(r: &Registry<S>) {
    let a = id("a");
    let first = r.register(reg("a", 1001, "z1")).await.unwrap();
    assert_eq!(first.registered, Registered::New);
    assert_eq!(first.lease_ttl, LEASE);
    let again = r.register(reg("a", 1001, "z1")).await.unwrap();
    assert_eq!(again.registered, Registered::Renewed);
    let load = Load {
        active_uploads: 3,
        upload_bytes_per_sec: 1234,
        upload_slots: 10,
    };
    assert!(r.heartbeat(&a, load).await.unwrap());
    assert!(!r.heartbeat(&id("nobody"), load).await.unwrap());
    let peers = r.peers().await.unwrap();
    assert_eq!(peers.len(), 1);
    let p = &peers[0];
    assert_eq!((&*p.address, &*p.zone), ("127.0.0.1:1001", "z1"));
    assert_eq!(p.labels.get("role").map(String::as_str), Some("a"));
    assert_eq!(p.load, load);
    assert_eq!((p.health, p.standing), (Health::Healthy, Standing::Active));
    assert!(p.last_seen.elapsed() < Duration::from_secs(2));

    // Health: set, kept across a renewal, reset by an address change.
    assert!(r.set_health(&a, Health::Unhealthy).await.unwrap());
    r.register(reg("a", 1001, "z1")).await.unwrap();
    assert_eq!(
        r.store().peer(&a).await.unwrap().unwrap().health,
        Health::Unhealthy
    );
    r.register(reg("a", 1002, "z1")).await.unwrap();
    assert_eq!(
        r.store().peer(&a).await.unwrap().unwrap().health,
        Health::Healthy
    );
    assert!(!r.set_health(&id("nobody"), Health::Healthy).await.unwrap());

    assert!(r.announce(&a, adds(vec![complete(1)])).await.unwrap());
    assert!(
        !r.announce(&id("nobody"), adds(vec![complete(1)]))
            .await
            .unwrap()
    );
    assert_eq!(r.store().peer(&a).await.unwrap().unwrap().blob_count, 1);
    assert!(r.deregister(&a).await.unwrap());
    assert!(!r.deregister(&a).await.unwrap());
    assert!(r.peers().await.unwrap().is_empty());
    assert!(ranked(r, None, 1).await.is_empty());
    let st = r.stats().await.unwrap().store;
    assert_eq!((st.peers, st.blobs, st.provider_entries), (0, 0, 0));
}

async fn check_expiry<S: StateStore>(r: &Registry<S>) {
    let (a, b) = (id("a"), id("b"));
    r.register(reg("a", 1001, "")).await.unwrap();
    r.register(reg("b", 1002, "")).await.unwrap();
    for p in [&a, &b] {
        assert!(r.announce(p, adds(vec![complete(7)])).await.unwrap());
    }
    assert_eq!(sorted_providers(r, 7).await, ["a", "b"]);
    tokio::time::sleep(LEASE / 2).await;
    assert!(r.heartbeat(&b, Load::default()).await.unwrap());
    tokio::time::sleep(LEASE / 2 + Duration::from_millis(200)).await;
    // `a` lapsed: gone from every answer before any sweep.
    assert_eq!(ranked(r, None, 7).await, ["b"]);
    assert!(r.store().peer(&a).await.unwrap().is_none());
    assert_eq!(r.peers().await.unwrap().len(), 1);
    assert!(!r.heartbeat(&a, Load::default()).await.unwrap());
    assert!(!r.announce(&a, adds(vec![complete(8)])).await.unwrap());
    assert_eq!(r.expire().await.unwrap(), vec![a.clone()]);
    assert!(r.expire().await.unwrap().is_empty());
    let st = r.stats().await.unwrap().store;
    assert_eq!((st.peers, st.blobs, st.provider_entries), (1, 1, 1));
    // Registering again is a new peer, with nothing announced.
    assert_eq!(
        r.register(reg("a", 1001, "")).await.unwrap().registered,
        Registered::New
    );
    assert_eq!(r.store().peer(&a).await.unwrap().unwrap().blob_count, 0);
    assert_eq!(ranked(r, None, 7).await, ["b"]);
}

async fn check_ranking<S: StateStore>(r: &Registry<S>) {
    // Complete and idle in zone z1, complete and idle in z2, complete and
    // busy, partial, unhealthy; "asker" holds it too but is never returned.
    for (n, (name, zone)) in [
        ("near", "z1"),
        ("far", "z2"),
        ("busy", "z1"),
        ("part", "z1"),
        ("sick", "z1"),
        ("asker", "z1"),
    ]
    .into_iter()
    .enumerate()
    {
        r.register(reg(name, 2000 + n as u16, zone)).await.unwrap();
        let b = if name == "part" {
            partial(3, &[0b1])
        } else {
            complete(3)
        };
        assert!(r.announce(&id(name), adds(vec![b])).await.unwrap());
    }
    let busy = Load {
        active_uploads: 9,
        upload_bytes_per_sec: 0,
        upload_slots: 10,
    };
    assert!(r.heartbeat(&id("busy"), busy).await.unwrap());
    assert!(r.set_health(&id("sick"), Health::Unhealthy).await.unwrap());
    for _ in 0..5 {
        assert_eq!(
            ranked(r, Some("asker"), 3).await,
            ["near", "far", "busy", "part"]
        );
    }
    let q = ProviderQuery {
        blob: BlobRef::Blake3(blob(3)),
        asker: None,
        zone: "z2".into(),
        limit: 2,
    };
    let found = r.find_providers(&q).await.unwrap();
    let names: Vec<String> = found
        .providers
        .iter()
        .map(|h| h.peer.id.to_string())
        .collect();
    // Without an asker, "asker" is a provider like "near": the zone decides.
    assert_eq!(names.len(), 2);
    assert_eq!(names[0], "far");
    assert_eq!(found.meta.size, 100 << 20);
    assert_eq!(found.meta.sha256, Some(sha(3)));
    // The unhealthy one is still in the unfiltered swarm.
    let swarm = r.swarm(BlobRef::Blake3(blob(3))).await.unwrap();
    assert_eq!(swarm.holders.len(), 6);
    let part = swarm
        .holders
        .iter()
        .find(|h| h.peer.id.as_str() == "part")
        .unwrap();
    assert_eq!(part.chunks.as_deref(), Some(&[0b1u8][..]));
}

async fn check_reports_and_quarantine<S: StateStore>(r: &Registry<S>) {
    for (n, name) in ["bad", "r1", "r2"].into_iter().enumerate() {
        r.register(reg(name, 3000 + n as u16, "")).await.unwrap();
    }
    assert!(
        r.announce(&id("bad"), adds(vec![complete(4)]))
            .await
            .unwrap()
    );
    assert!(matches!(
        r.report(&id("bad"), &id("bad"), None, "").await,
        Err(RegistryError::SelfReport)
    ));
    assert!(matches!(
        r.report(&id("ghost"), &id("bad"), None, "").await,
        Err(RegistryError::UnknownPeer { .. })
    ));
    let one = r
        .report(&id("r1"), &id("bad"), Some(blob(4)), "")
        .await
        .unwrap();
    assert_eq!((one.reports, one.quarantined), (1, false));
    // The same reporter twice counts once.
    let again = r
        .report(&id("r1"), &id("bad"), Some(blob(4)), "")
        .await
        .unwrap();
    assert_eq!((again.reports, again.quarantined), (1, false));
    assert_eq!(ranked(r, None, 4).await, ["bad"]);
    let two = r
        .report(&id("r2"), &id("bad"), None, "flipped bits")
        .await
        .unwrap();
    assert_eq!((two.reports, two.quarantined), (2, true));
    assert!(ranked(r, None, 4).await.is_empty());
    let snap = r.store().peer(&id("bad")).await.unwrap().unwrap();
    assert_eq!(
        (snap.standing, &*snap.reason, snap.reports),
        (Standing::Quarantined, "flipped bits", 2)
    );
    // Unbanning clears the reports.
    let snap = r
        .set_standing(&id("bad"), Standing::Active, "")
        .await
        .unwrap();
    assert_eq!((snap.standing, snap.reports), (Standing::Active, 0));
    assert_eq!(ranked(r, None, 4).await, ["bad"]);
}

/// A quarantine lapses `QUARANTINE_TTL` after the last report (Redis: the
/// keys expire; memory: the sweep lifts it); an operator's ban stays.
async fn check_quarantines_lapse<S: StateStore>(r: &Registry<S>) {
    for (n, name) in ["bad", "banned", "r1", "r2"].into_iter().enumerate() {
        r.register(reg(name, 3100 + n as u16, "")).await.unwrap();
    }
    r.set_standing(&id("banned"), Standing::Banned, "op")
        .await
        .unwrap();
    for reporter in ["r1", "r2"] {
        r.report(&id(reporter), &id("bad"), None, "bad")
            .await
            .unwrap();
        r.report(&id(reporter), &id("banned"), None, "bad")
            .await
            .unwrap();
    }
    let standing =
        |name: &'static str| async move { r.store().peer(&id(name)).await.unwrap().unwrap() };
    assert_eq!(standing("bad").await.standing, Standing::Quarantined);
    // Bounded: the lapse is due after 3 s; look for 8 s at most.
    let start = std::time::Instant::now();
    loop {
        for name in ["bad", "banned"] {
            assert!(r.heartbeat(&id(name), Default::default()).await.unwrap());
        }
        r.expire().await.unwrap();
        let snap = standing("bad").await;
        if snap.standing == Standing::Active {
            assert_eq!(snap.reports, 0);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "the quarantine did not lapse"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(start.elapsed() >= QUARANTINE_TTL - Duration::from_millis(500));
    assert_eq!(standing("banned").await.standing, Standing::Banned);
}

async fn check_aliases<S: StateStore>(r: &Registry<S>) {
    let (a, b) = (id("a"), id("b"));
    r.register(reg("a", 1001, "")).await.unwrap();
    r.register(reg("b", 1002, "")).await.unwrap();
    let alias = |d| BlobRef::Sha256(d);
    assert!(matches!(
        r.swarm(alias(sha(5))).await,
        Err(RegistryError::UnknownAlias { .. })
    ));
    assert!(r.announce(&a, adds(vec![complete(5)])).await.unwrap());
    let s = r.swarm(alias(sha(5))).await.unwrap();
    assert_eq!((s.meta.id, s.holders.len()), (blob(5), 1));

    // A conflict: blob 6 announced with blob 5's digest. The first claim
    // stands (issue 10, row 1): the alias is never overwritten, and the
    // refused digest is not shown for blob 6.
    let liar = BlobAnnouncement {
        sha256: Some(sha(5)),
        ..complete(6)
    };
    assert!(r.announce(&b, adds(vec![liar.clone()])).await.unwrap());
    assert_eq!(r.swarm(alias(sha(5))).await.unwrap().meta.id, blob(5));
    assert_eq!(
        r.swarm(BlobRef::Blake3(blob(6))).await.unwrap().meta.sha256,
        None
    );
    // When the honest blob goes, the alias goes with it; a later claim may
    // then take it.
    let gone = Announcement {
        removed: vec![blob(5)],
        ..Announcement::default()
    };
    assert!(r.announce(&a, gone).await.unwrap());
    assert!(matches!(
        r.swarm(alias(sha(5))).await,
        Err(RegistryError::UnknownAlias { .. })
    ));
    let seven = BlobAnnouncement {
        sha256: Some(sha(5)),
        ..complete(7)
    };
    assert!(r.announce(&b, adds(vec![seven])).await.unwrap());
    assert_eq!(r.swarm(alias(sha(5))).await.unwrap().meta.id, blob(7));
    // A blob already known keeps its first digest.
    let other = BlobAnnouncement {
        sha256: Some(sha(9)),
        ..complete(7)
    };
    assert!(r.announce(&a, adds(vec![other])).await.unwrap());
    assert_eq!(
        r.swarm(BlobRef::Blake3(blob(7))).await.unwrap().meta.sha256,
        Some(sha(5))
    );
    // The last provider leaving takes the alias with it.
    assert!(r.deregister(&a).await.unwrap());
    assert!(r.deregister(&b).await.unwrap());
    assert!(matches!(
        r.swarm(alias(sha(5))).await,
        Err(RegistryError::UnknownAlias { .. })
    ));
    assert!(r.swarm(alias(sha(9))).await.is_err());
}

async fn check_bans_and_drains<S: StateStore>(r: &Registry<S>) {
    let (a, b) = (id("a"), id("b"));
    r.register(reg("a", 1001, "")).await.unwrap();
    r.register(reg("b", 1002, "")).await.unwrap();
    for p in [&a, &b] {
        assert!(r.announce(p, adds(vec![complete(2)])).await.unwrap());
    }
    let snap = r.set_standing(&a, Standing::Banned, "flaky").await.unwrap();
    assert_eq!((snap.standing, &*snap.reason), (Standing::Banned, "flaky"));
    assert_eq!(ranked(r, None, 2).await, ["b"]);
    // A ban outlives the registration.
    assert!(r.deregister(&a).await.unwrap());
    r.register(reg("a", 1001, "")).await.unwrap();
    assert!(r.announce(&a, adds(vec![complete(2)])).await.unwrap());
    assert_eq!(
        r.store().peer(&a).await.unwrap().unwrap().standing,
        Standing::Banned
    );
    assert_eq!(ranked(r, None, 2).await, ["b"]);
    // A report does not lift or rename a ban.
    r.report(&b, &a, None, "whatever").await.unwrap();
    let snap = r.store().peer(&a).await.unwrap().unwrap();
    assert_eq!((snap.standing, &*snap.reason), (Standing::Banned, "flaky"));
    let snap = r.set_standing(&b, Standing::Draining, "").await.unwrap();
    assert_eq!(snap.standing, Standing::Draining);
    assert!(ranked(r, None, 2).await.is_empty());
    r.set_standing(&a, Standing::Active, "").await.unwrap();
    r.set_standing(&b, Standing::Active, "").await.unwrap();
    assert_eq!(sorted_providers(r, 2).await, ["a", "b"]);
    assert!(matches!(
        r.set_standing(&id("ghost"), Standing::Banned, "").await,
        Err(RegistryError::UnknownPeer { .. })
    ));
}

async fn check_partial_bitmaps_and_full_inventory<S: StateStore>(r: &Registry<S>) {
    let a = id("a");
    r.register(reg("a", 1001, "")).await.unwrap();
    assert!(
        r.announce(&a, adds(vec![complete(1), partial(2, &[0b101])]))
            .await
            .unwrap()
    );
    let st = r.stats().await.unwrap().store;
    assert_eq!((st.blobs, st.provider_entries), (2, 2));
    let s = r.swarm(BlobRef::Blake3(blob(2))).await.unwrap();
    assert_eq!(s.holders[0].chunks.as_deref(), Some(&[0b101u8][..]));
    assert!(r.swarm(BlobRef::Sha256(sha(1))).await.is_ok());
    // The whole inventory replaces what was there.
    let full = Announcement {
        blobs: vec![complete(2)],
        full_inventory: true,
        ..Announcement::default()
    };
    assert!(r.announce(&a, full).await.unwrap());
    assert!(ranked(r, None, 1).await.is_empty());
    assert!(r.swarm(BlobRef::Sha256(sha(1))).await.is_err());
    let s = r.swarm(BlobRef::Blake3(blob(2))).await.unwrap();
    assert_eq!(s.holders[0].chunks, None);
    assert_eq!(r.store().peer(&a).await.unwrap().unwrap().blob_count, 1);
    let st = r.stats().await.unwrap().store;
    assert_eq!(
        (st.peers, st.healthy_peers, st.blobs, st.provider_entries),
        (1, 1, 1, 1)
    );
}

async fn check_large_inventories<S: StateStore>(r: &Registry<S>) {
    let a = id("a");
    r.register(reg("a", 1001, "")).await.unwrap();
    let many = |n: u32| -> Vec<BlobAnnouncement> {
        (0..n)
            .map(|i| BlobAnnouncement {
                id: BlobId::from(blake3::hash(&i.to_le_bytes())),
                size: 1 << 20,
                sha256: None,
                chunks: None,
            })
            .collect()
    };
    assert!(r.announce(&a, adds(many(20_000))).await.unwrap());
    let st = r.stats().await.unwrap().store;
    assert_eq!((st.blobs, st.provider_entries), (20_000, 20_000));
    let half = Announcement {
        blobs: many(10_000),
        full_inventory: true,
        ..Announcement::default()
    };
    assert!(r.announce(&a, half).await.unwrap());
    let st = r.stats().await.unwrap().store;
    assert_eq!((st.blobs, st.provider_entries), (10_000, 10_000));
    assert_eq!(
        r.store().peer(&a).await.unwrap().unwrap().blob_count,
        10_000
    );
    assert!(r.deregister(&a).await.unwrap());
    let st = r.stats().await.unwrap().store;
    assert_eq!((st.blobs, st.provider_entries), (0, 0));
}

/// Blob `i` of peer `p`'s made-up inventory, partly held or not.
fn numbered(p: u32, i: u32, partial: bool) -> BlobAnnouncement {
    BlobAnnouncement {
        id: BlobId::from(blake3::hash(&[p.to_le_bytes(), i.to_le_bytes()].concat())),
        size: 64 << 20,
        sha256: None,
        chunks: partial.then(|| Bytes::from_static(&[0b1010_0001])),
    }
}

/// Whether an announce was refused by the cap that `flag` sets.
fn capped(r: Result<bool, RegistryError>, flag: &str) -> bool {
    matches!(r, Err(RegistryError::Store(StoreError::Cap { flag: f, .. })) if f == flag)
}

async fn check_inventory_caps<S: StateStore>(r: &Registry<S>) {
    // Registered (again) at each step: big announces under load may take
    // longer than a lease.
    let renew = || async {
        for (name, port) in [("a", 1001), ("b", 1002), ("c", 1003)] {
            r.register(reg(name, port, "")).await.unwrap();
        }
    };
    renew().await;
    let (a, b, c) = (id("a"), id("b"), id("c"));
    let range = |p, from, to| {
        (from..to)
            .map(|i| numbered(p, i, false))
            .collect::<Vec<_>>()
    };
    let count = |p: PeerId| async move { r.store().peer(&p).await.unwrap().unwrap().blob_count };
    // Up to the per-peer cap, then not one more, and nothing of the refused
    // announce is applied.
    assert!(r.announce(&a, adds(range(1, 0, 30_000))).await.unwrap());
    let over = adds(vec![numbered(1, 0, false), numbered(1, 30_000, false)]);
    assert!(capped(r.announce(&a, over).await, "--max-peer-blobs"));
    assert_eq!(count(a.clone()).await, 30_000);
    let refused = numbered(1, 30_000, false).id;
    assert!(r.store().swarm(&refused).await.unwrap().is_none());
    // Announcing what it holds, or one out and one in, stays within it.
    renew().await;
    assert!(r.announce(&a, adds(range(1, 0, 10))).await.unwrap());
    let swap = Announcement {
        blobs: vec![numbered(1, 30_000, false)],
        removed: vec![numbered(1, 0, false).id],
        ..Announcement::default()
    };
    assert!(r.announce(&a, swap).await.unwrap());
    assert_eq!(count(a.clone()).await, 30_000);

    // Partly held blobs have a cap of their own; completing one frees a place.
    renew().await;
    let parts = (0..8).map(|i| numbered(2, i, true)).collect();
    assert!(r.announce(&b, adds(parts)).await.unwrap());
    let ninth = || adds(vec![numbered(2, 8, true)]);
    assert!(capped(r.announce(&b, ninth()).await, "--max-peer-partial"));
    assert!(
        r.announce(&b, adds(vec![numbered(2, 0, false)]))
            .await
            .unwrap()
    );
    assert!(r.announce(&b, ninth()).await.unwrap());

    // The store-wide cap: 60,000 entries in all.
    renew().await;
    assert!(
        r.announce(&b, adds(range(2, 100, 100 + 29_991)))
            .await
            .unwrap()
    );
    assert_eq!(r.stats().await.unwrap().store.provider_entries, 60_000);
    renew().await;
    let one = || adds(vec![numbered(3, 0, false)]);
    assert!(capped(r.announce(&c, one()).await, "--max-entries"));
    // A peer leaving frees its entries for others.
    assert!(r.deregister(&a).await.unwrap());
    assert!(r.announce(&c, one()).await.unwrap());
}

/// Two replicas on one Redis: what one writes, the other answers within its
/// swarm cache period (500 ms), and at once for its own writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_swarm_cache_shows_other_replicas_writes_within_its_period() {
    let server = RedisServer::start();
    let (one, two) = (redis(&server), redis(&server));
    one.register(reg("a", 1001, "")).await.unwrap();
    assert!(
        one.announce(&id("a"), adds(vec![complete(1)]))
            .await
            .unwrap()
    );
    assert_eq!(ranked(&two, None, 1).await, ["a"]);
    // Written through `one`: `two` may answer from its cache for a while.
    one.register(reg("b", 1002, "")).await.unwrap();
    assert!(
        one.announce(&id("b"), adds(vec![complete(1)]))
            .await
            .unwrap()
    );
    assert_eq!(sorted_providers(&one, 1).await, ["a", "b"]);
    let start = std::time::Instant::now();
    while sorted_providers(&two, 1).await != ["a", "b"] {
        assert!(
            start.elapsed() < Duration::from_millis(900),
            "other replica's write not visible after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its own writes show at once.
    two.set_standing(&id("b"), Standing::Banned, "")
        .await
        .unwrap();
    assert_eq!(ranked(&two, None, 1).await, ["a"]);
}

/// Provider entries expire a horizon after they were written unless their
/// peer's heartbeats push them forward (the safety net for entries nobody
/// else removes); a lease alone does not keep them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_entries_expire_past_their_horizon_unless_heartbeats_push_them() {
    let server = RedisServer::start();
    let mut state = RedisConfig::new(&server.url()).unwrap();
    state.entry_horizon = Duration::from_millis(1000);
    state.swarm_cache = Duration::ZERO;
    let config = Config {
        lease_ttl: Duration::from_secs(10),
        ..config()
    };
    let r = Registry::new(RedisStore::new(state).unwrap(), &config);
    for name in ["beating", "silent"] {
        r.register(reg(name, 1001, "")).await.unwrap();
        assert!(
            r.announce(&id(name), adds(vec![complete(1)]))
                .await
                .unwrap()
        );
    }
    // 2.5 horizons, with heartbeats from one of them only.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(r.heartbeat(&id("beating"), Load::default()).await.unwrap());
    }
    assert_eq!(ranked(&r, None, 1).await, ["beating"]);
    assert_eq!(r.stats().await.unwrap().store.provider_entries, 1);
    // Both still hold their leases.
    assert_eq!(r.peers().await.unwrap().len(), 2);
}

async fn check_urls_and_origin_leases<S: StateStore>(r: &Registry<S>) {
    let (a, b) = (id("a"), id("b"));
    r.register(reg("a", 1101, "")).await.unwrap();
    r.register(reg("b", 1102, "")).await.unwrap();
    let url = "https://o.example/m.bin?v=1&sig=AAA";
    // Unknown: the first asker takes the lease; the next is told who holds it
    // and where (the ignored `sig` makes both one URL).
    let first = r.resolve_url(&a, url, false).await.unwrap();
    assert!(first.record.is_none() && !first.fresh);
    assert_eq!(first.lease, Some(OriginLease::Granted));
    let second = r
        .resolve_url(&b, "https://o.example/m.bin?v=1&sig=BBB", false)
        .await
        .unwrap();
    assert_eq!(second.lease, Some(OriginLease::HeldBy("a".into())));
    assert_eq!(second.holder_address.as_deref(), Some("127.0.0.1:1101"));
    assert_eq!(second.session, first.session);
    assert_eq!(
        r.resolve_url(&a, url, true).await.unwrap().lease,
        Some(OriginLease::Granted),
        "the holder renews its own lease"
    );
    // Recorded: fresh for everyone, and the holder's lease is given up.
    let record = UrlRecord {
        blob: blob(1),
        size: 10,
        etag: "\"e1\"".into(),
        last_modified: String::new(),
        checked_at_ms: 0,
    };
    let refused = r.record_url(&b, url, record.clone()).await;
    assert!(
        matches!(refused, Err(RegistryError::Field { .. })),
        "only the lease holder records: {refused:?}"
    );
    r.record_url(&a, url, record).await.unwrap();
    let fresh = r.resolve_url(&b, url, false).await.unwrap();
    assert!(fresh.fresh && fresh.lease.is_none());
    assert_eq!(fresh.record.unwrap().blob, blob(1));
    assert_eq!(
        r.resolve_url(&b, url, true).await.unwrap().lease,
        Some(OriginLease::Granted),
        "refresh (the swarm lost the blob) asks for the lease"
    );
    // Past the TTL: stale but kept with its validators; b's unrenewed lease lapsed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stale = r.resolve_url(&a, url, false).await.unwrap();
    assert!(!stale.fresh);
    assert_eq!(stale.record.unwrap().etag, "\"e1\"");
    assert_eq!(stale.lease, Some(OriginLease::Granted));
    // Another query value is another URL; credentials and strangers are refused.
    let other = r.resolve_url(&a, "https://o.example/m.bin?v=2", false);
    assert!(other.await.unwrap().record.is_none());
    let creds = r
        .resolve_url(&a, "https://u:p@o.example/m.bin", false)
        .await;
    assert!(matches!(creds, Err(RegistryError::Url(_))), "{creds:?}");
    let stranger = r.resolve_url(&id("zz"), url, false).await;
    assert!(matches!(stranger, Err(RegistryError::UnknownPeer { .. })));
}
