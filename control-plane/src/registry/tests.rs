use std::collections::BTreeMap;

use bytes::Bytes;
use nebula_common::{BlobId, Sha256Digest};

use super::*;
use crate::store::{Announcement, BlobAnnouncement, Health, Load, MemoryStore, Standing};

fn registry() -> Registry<MemoryStore> {
    Registry::new(MemoryStore::new(), &Config::default())
}

fn pid(s: &str) -> PeerId {
    s.parse().unwrap()
}

async fn join(r: &Registry<MemoryStore>, id: &str, zone: &str) {
    r.register(PeerRegistration {
        id: pid(id),
        address: format!("127.0.0.1:{}", 2000 + id.len()),
        zone: zone.into(),
        labels: BTreeMap::new(),
    })
    .await
    .unwrap();
}

fn blob(n: u8) -> BlobId {
    BlobId::from_bytes([n; 32])
}

async fn hold(r: &Registry<MemoryStore>, id: &str, n: u8, chunks: Option<&'static [u8]>) {
    let ann = Announcement {
        blobs: vec![BlobAnnouncement {
            id: blob(n),
            size: 64 << 20,
            sha256: Some(Sha256Digest([n; 32])),
            chunks: chunks.map(Bytes::from_static),
        }],
        ..Announcement::default()
    };
    assert!(r.announce(&pid(id), ann).await.unwrap());
}

async fn find(r: &Registry<MemoryStore>, asker: Option<&str>, n: u8) -> Vec<String> {
    let q = ProviderQuery {
        blob: BlobRef::Blake3(blob(n)),
        asker: asker.map(pid),
        zone: String::new(),
        limit: 0,
    };
    let out = r.find_providers(&q).await.unwrap();
    out.providers
        .iter()
        .map(|h| h.peer.id.to_string())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn lease_lapses_without_heartbeats() {
    let r = registry();
    join(&r, "a", "").await;
    join(&r, "b", "").await;
    hold(&r, "a", 1, None).await;
    hold(&r, "b", 1, None).await;
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(r.heartbeat(&pid("b"), Load::default()).await.unwrap());
    }
    // 10 s in: `a` stopped at 0 s, so its 6 s lease lapsed; `b` renewed.
    assert_eq!(find(&r, None, 1).await, ["b"]);
    assert!(
        !r.heartbeat(&pid("a"), Load::default()).await.unwrap(),
        "unknown_peer"
    );
    assert_eq!(r.expire().await.unwrap(), [pid("a")]);
    assert_eq!(r.stats().await.unwrap().store.provider_entries, 1);
}

#[tokio::test(start_paused = true)]
async fn lease_holds_until_its_ttl() {
    let r = registry();
    join(&r, "a", "").await;
    hold(&r, "a", 1, None).await;
    tokio::time::advance(Duration::from_millis(5_900)).await;
    assert_eq!(find(&r, None, 1).await, ["a"]);
    tokio::time::advance(Duration::from_millis(200)).await;
    assert!(find(&r, None, 1).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn deregister_removes_at_once() {
    let r = registry();
    join(&r, "a", "").await;
    hold(&r, "a", 1, None).await;
    assert!(r.deregister(&pid("a")).await.unwrap());
    assert!(find(&r, None, 1).await.is_empty());
    assert!(!r.heartbeat(&pid("a"), Load::default()).await.unwrap());
    assert!(!r.deregister(&pid("a")).await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn unhealthy_peers_leave_discovery() {
    let r = registry();
    join(&r, "a", "").await;
    hold(&r, "a", 1, None).await;
    r.set_health(&pid("a"), Health::Unhealthy).await.unwrap();
    assert!(find(&r, None, 1).await.is_empty());
    r.set_health(&pid("a"), Health::Healthy).await.unwrap();
    assert_eq!(find(&r, None, 1).await, ["a"]);
}

#[tokio::test(start_paused = true)]
async fn ranking_through_the_registry() {
    let r = registry();
    for (id, zone) in [
        ("me", "z1"),
        ("far", "z2"),
        ("near", "z1"),
        ("partial", "z1"),
        ("busy", "z1"),
    ] {
        join(&r, id, zone).await;
    }
    for id in ["me", "far", "near", "busy"] {
        hold(&r, id, 1, None).await;
    }
    hold(&r, "partial", 1, Some(&[0b11])).await;
    let busy = Load {
        active_uploads: 4,
        upload_slots: 4,
        upload_bytes_per_sec: 1,
    };
    r.heartbeat(&pid("busy"), busy).await.unwrap();
    // The asker's zone comes from its registration.
    for _ in 0..10 {
        assert_eq!(
            find(&r, Some("me"), 1).await,
            ["near", "far", "busy", "partial"]
        );
    }
    let q = ProviderQuery {
        blob: BlobRef::Blake3(blob(1)),
        asker: Some(pid("me")),
        zone: "z2".into(),
        limit: 2,
    };
    let out = r.find_providers(&q).await.unwrap();
    let ids: Vec<_> = out.providers.iter().map(|h| h.peer.id.as_str()).collect();
    assert_eq!(ids, ["far", "near"]);
    let partial = r.swarm(BlobRef::Blake3(blob(1))).await.unwrap();
    let p = partial
        .holders
        .iter()
        .find(|h| h.peer.id.as_str() == "partial")
        .unwrap();
    assert_eq!(p.chunks.as_deref(), Some(&[0b11u8][..]));
}

#[tokio::test(start_paused = true)]
async fn limit_defaults_to_20_and_caps_at_200() {
    let r = registry();
    for i in 0..250 {
        let id = format!("p{i}");
        join(&r, &id, "").await;
        hold(&r, &id, 9, None).await;
    }
    assert_eq!(find(&r, None, 9).await.len(), 20);
    let q = |limit| ProviderQuery {
        blob: BlobRef::Blake3(blob(9)),
        asker: None,
        zone: String::new(),
        limit,
    };
    assert_eq!(
        r.find_providers(&q(1000)).await.unwrap().providers.len(),
        200
    );
    assert_eq!(r.find_providers(&q(7)).await.unwrap().providers.len(), 7);
}

#[tokio::test(start_paused = true)]
async fn sha256_aliases_resolve_and_unknown_ones_are_not_found() {
    let r = registry();
    join(&r, "a", "").await;
    hold(&r, "a", 3, None).await;
    let q = |blob| ProviderQuery {
        blob,
        asker: None,
        zone: String::new(),
        limit: 0,
    };
    let out = r
        .find_providers(&q(BlobRef::Sha256(Sha256Digest([3; 32]))))
        .await
        .unwrap();
    assert_eq!(out.meta.id, blob(3));
    assert_eq!(out.meta.size, 64 << 20);
    assert_eq!(out.providers.len(), 1);
    let err = r
        .find_providers(&q(BlobRef::Sha256(Sha256Digest([4; 32]))))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::UnknownAlias { .. }));
    let unknown = r
        .find_providers(&q(BlobRef::Blake3(blob(4))))
        .await
        .unwrap();
    assert_eq!((unknown.meta.id, unknown.meta.size), (blob(4), 0));
    assert!(unknown.providers.is_empty());
}

#[tokio::test(start_paused = true)]
async fn two_distinct_reporters_quarantine() {
    let r = registry();
    for id in ["bad", "r1", "r2"] {
        join(&r, id, "").await;
    }
    hold(&r, "bad", 1, None).await;
    let once = r
        .report(&pid("r1"), &pid("bad"), Some(blob(1)), "bad chunk 3")
        .await
        .unwrap();
    assert!(!once.quarantined);
    // The same reporter again does not count twice.
    let again = r.report(&pid("r1"), &pid("bad"), None, "").await.unwrap();
    assert_eq!((again.reports, again.quarantined), (1, false));
    assert_eq!(find(&r, None, 1).await, ["bad"]);
    let twice = r
        .report(&pid("r2"), &pid("bad"), Some(blob(1)), "bad chunk 4")
        .await
        .unwrap();
    assert_eq!((twice.reports, twice.quarantined), (2, true));
    assert!(find(&r, None, 1).await.is_empty());
    let p = r.store().peer(&pid("bad")).await.unwrap().unwrap();
    assert_eq!(
        (p.standing, p.reports, &*p.reason),
        (Standing::Quarantined, 2, "bad chunk 4")
    );
    r.set_standing(&pid("bad"), Standing::Active, "")
        .await
        .unwrap();
    assert_eq!(find(&r, None, 1).await, ["bad"]);
    assert!(matches!(
        r.report(&pid("bad"), &pid("bad"), None, "").await,
        Err(RegistryError::SelfReport)
    ));
    assert!(matches!(
        r.report(&pid("ghost"), &pid("bad"), None, "").await,
        Err(RegistryError::UnknownPeer { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn drain_and_ban_leave_discovery_and_keep_the_lease() {
    let r = registry();
    join(&r, "a", "").await;
    hold(&r, "a", 1, None).await;
    r.set_standing(&pid("a"), Standing::Draining, "maintenance")
        .await
        .unwrap();
    assert!(find(&r, None, 1).await.is_empty());
    assert!(r.heartbeat(&pid("a"), Load::default()).await.unwrap());
    r.set_standing(&pid("a"), Standing::Banned, "")
        .await
        .unwrap();
    assert!(find(&r, None, 1).await.is_empty());
    r.set_standing(&pid("a"), Standing::Active, "")
        .await
        .unwrap();
    assert_eq!(find(&r, None, 1).await, ["a"]);
    let err = r
        .set_standing(&pid("ghost"), Standing::Banned, "")
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::UnknownPeer { .. }));
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_refused() {
    let r = registry();
    for bad in [
        "",
        "nohost",
        ":80",
        "h:0",
        "h:99999",
        "http://h:1",
        "0.0.0.0:1",
        "::1:80",
        "a b:1",
    ] {
        let reg = PeerRegistration {
            id: pid("a"),
            address: bad.into(),
            zone: String::new(),
            labels: BTreeMap::new(),
        };
        assert!(
            matches!(r.register(reg).await, Err(RegistryError::Address { .. })),
            "{bad:?} should be refused"
        );
    }
    for good in ["[::1]:80", "host.example:7701", "127.0.0.1:1"] {
        check_address(good).unwrap();
    }
    join(&r, "a", "").await;
    let huge = Announcement {
        removed: vec![blob(1); 100_001],
        ..Announcement::default()
    };
    assert!(matches!(
        r.announce(&pid("a"), huge).await,
        Err(RegistryError::AnnounceTooLarge { count: 100_001, .. })
    ));
    let fat_bitmap = Announcement {
        blobs: vec![BlobAnnouncement {
            id: blob(1),
            size: 3 << 20,
            sha256: None,
            chunks: Some(Bytes::from(vec![1u8; 2])),
        }],
        ..Announcement::default()
    };
    assert!(matches!(
        r.announce(&pid("a"), fat_bitmap).await,
        Err(RegistryError::Field {
            field: "chunks",
            ..
        })
    ));
    assert!(parse_peer_id("peer_id", "").is_err());
    assert!(parse_blob_ref("blob", "xyz").is_err());
}

#[tokio::test(start_paused = true)]
async fn full_and_empty_bitmaps_are_normalized() {
    let r = registry();
    join(&r, "a", "").await;
    // 3 MiB: 3 chunks; 0b111 is every chunk.
    let ann = |bits: &'static [u8]| Announcement {
        blobs: vec![BlobAnnouncement {
            id: blob(1),
            size: 3 << 20,
            sha256: None,
            chunks: Some(Bytes::from_static(bits)),
        }],
        ..Announcement::default()
    };
    r.announce(&pid("a"), ann(&[0b1111_0111])).await.unwrap();
    let sw = r.swarm(BlobRef::Blake3(blob(1))).await.unwrap();
    assert!(sw.holders[0].chunks.is_none(), "full bitmap means complete");
    r.announce(&pid("a"), ann(&[0])).await.unwrap();
    assert!(
        r.swarm(BlobRef::Blake3(blob(1)))
            .await
            .unwrap()
            .holders
            .is_empty()
    );
}
