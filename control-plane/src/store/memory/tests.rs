use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use nebula_common::{BlobId, Sha256Digest};

use super::{MemoryStore, records::Holder};
use crate::store::{
    Announcement, BlobAnnouncement, Load, PeerId, PeerRegistration, Registered, Standing,
    StateStore,
};

fn reg(id: &str) -> PeerRegistration {
    PeerRegistration {
        id: id.parse().unwrap(),
        address: format!("127.0.0.1:{}", 1000 + id.len()),
        zone: "z".into(),
        labels: BTreeMap::new(),
    }
}

fn blob(n: u8, chunks: Option<&[u8]>) -> BlobAnnouncement {
    BlobAnnouncement {
        id: BlobId::from_bytes([n; 32]),
        size: 10 << 20,
        sha256: Some(Sha256Digest([n ^ 0xff; 32])),
        chunks: chunks.map(Bytes::copy_from_slice),
    }
}

const LEASE: Duration = Duration::from_secs(6);

#[test]
fn holder_is_sixteen_bytes() {
    assert_eq!(std::mem::size_of::<Holder>(), 16);
}

#[tokio::test(start_paused = true)]
async fn full_inventory_replaces_and_removal_cleans_aliases() {
    let s = MemoryStore::new();
    let a: PeerId = "a".parse().unwrap();
    s.register(reg("a"), LEASE).await.unwrap();
    let ann = Announcement {
        blobs: vec![blob(1, None), blob(2, Some(&[0b101]))],
        ..Announcement::default()
    };
    assert!(s.announce(&a, ann).await.unwrap());
    assert_eq!(s.stats().await.unwrap().provider_entries, 2);
    let sw = s
        .swarm(&BlobId::from_bytes([2; 32]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sw.holders[0].chunks.as_deref(), Some(&[0b101u8][..]));
    assert_eq!(
        s.resolve_sha256(&Sha256Digest([1 ^ 0xff; 32]))
            .await
            .unwrap(),
        Some(BlobId::from_bytes([1; 32]))
    );

    let full = Announcement {
        blobs: vec![blob(2, None)],
        full_inventory: true,
        ..Announcement::default()
    };
    assert!(s.announce(&a, full).await.unwrap());
    assert!(
        s.swarm(&BlobId::from_bytes([1; 32]))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.resolve_sha256(&Sha256Digest([1 ^ 0xff; 32]))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.peer(&a).await.unwrap().unwrap().blob_count, 1);

    assert!(s.deregister(&a).await.unwrap());
    let st = s.stats().await.unwrap();
    assert_eq!((st.peers, st.blobs, st.provider_entries), (0, 0, 0));
    assert!(!s.announce(&a, Announcement::default()).await.unwrap());
}

/// Issue 10, row 1: a second blob claiming a live alias never takes it.
#[tokio::test(start_paused = true)]
async fn an_alias_is_never_overwritten_by_another_blob() {
    let s = MemoryStore::new();
    let (a, m): (PeerId, PeerId) = ("a".parse().unwrap(), "m".parse().unwrap());
    s.register(reg("a"), LEASE).await.unwrap();
    s.register(reg("m"), LEASE).await.unwrap();
    let honest = blob(1, None);
    let digest = honest.sha256.unwrap();
    let ann = |b: BlobAnnouncement| Announcement {
        blobs: vec![b],
        ..Announcement::default()
    };
    assert!(s.announce(&a, ann(honest)).await.unwrap());
    // The liar announces another blob under the same digest, new and known.
    let mut lie = blob(2, None);
    lie.sha256 = Some(digest);
    assert!(s.announce(&m, ann(lie.clone())).await.unwrap());
    assert!(s.announce(&m, ann(lie)).await.unwrap());
    let mut lie_too = blob(1, None);
    lie_too.id = BlobId::from_bytes([3; 32]);
    lie_too.sha256 = Some(digest);
    assert!(s.announce(&m, ann(lie_too)).await.unwrap());
    assert_eq!(
        s.resolve_sha256(&digest).await.unwrap(),
        Some(BlobId::from_bytes([1; 32]))
    );
    let liar_blob = s
        .swarm(&BlobId::from_bytes([2; 32]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        liar_blob.meta.sha256, None,
        "the refused claim is not shown"
    );
    // Once the honest blob has no provider, the alias is free again.
    assert!(s.deregister(&a).await.unwrap());
    assert_eq!(s.resolve_sha256(&digest).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn expire_removes_only_lapsed_peers_and_their_entries() {
    let s = MemoryStore::new();
    let (a, b): (PeerId, PeerId) = ("a".parse().unwrap(), "b".parse().unwrap());
    s.register(reg("a"), LEASE).await.unwrap();
    s.register(reg("b"), LEASE).await.unwrap();
    for p in [&a, &b] {
        let ann = Announcement {
            blobs: vec![blob(7, None)],
            ..Announcement::default()
        };
        s.announce(p, ann).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(s.renew(&b, Load::default(), LEASE).await.unwrap());
    tokio::time::advance(Duration::from_secs(3)).await;
    // `a` lapsed: gone from answers before any sweep.
    let sw = s
        .swarm(&BlobId::from_bytes([7; 32]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sw.holders.len(), 1);
    assert_eq!(sw.holders[0].peer.id, b);
    assert!(!s.renew(&a, Load::default(), LEASE).await.unwrap());
    assert_eq!(s.expire().await.unwrap(), vec![a.clone()]);
    assert_eq!(s.stats().await.unwrap().provider_entries, 1);
    // Registering again is a new peer.
    assert_eq!(s.register(reg("a"), LEASE).await.unwrap(), Registered::New);
}

#[tokio::test(start_paused = true)]
async fn sanctions_survive_re_registration() {
    let s = MemoryStore::new();
    let a: PeerId = "a".parse().unwrap();
    s.register(reg("a"), LEASE).await.unwrap();
    let snap = s
        .set_standing(&a, Standing::Banned, "flaky")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((snap.standing, &*snap.reason), (Standing::Banned, "flaky"));
    assert!(s.deregister(&a).await.unwrap());
    s.register(reg("a"), LEASE).await.unwrap();
    assert_eq!(
        s.peer(&a).await.unwrap().unwrap().standing,
        Standing::Banned
    );
    let snap = s
        .set_standing(&a, Standing::Active, "")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.standing, Standing::Active);
}

#[tokio::test(start_paused = true)]
async fn quarantines_lapse_unless_renewed_and_bans_stay() {
    let s = MemoryStore::new();
    let (a, b, r1, r2, r3): (PeerId, PeerId, PeerId, PeerId, PeerId) = (
        "a".parse().unwrap(),
        "b".parse().unwrap(),
        "r1".parse().unwrap(),
        "r2".parse().unwrap(),
        "r3".parse().unwrap(),
    );
    let long = Duration::from_secs(3600);
    for id in ["a", "b", "r1", "r2", "r3"] {
        s.register(reg(id), long).await.unwrap();
    }
    let ttl = Duration::from_secs(10);
    s.report(&a, &r1, "bad", 2, ttl).await.unwrap();
    let q = s.report(&a, &r2, "bad", 2, ttl).await.unwrap().unwrap();
    assert!(q.quarantined);
    s.set_standing(&b, Standing::Banned, "op").await.unwrap();
    s.report(&b, &r1, "bad", 2, ttl).await.unwrap();
    // A report 8 s in renews the quarantine.
    tokio::time::advance(Duration::from_secs(8)).await;
    s.report(&a, &r3, "bad", 2, ttl).await.unwrap();
    tokio::time::advance(Duration::from_secs(8)).await;
    s.expire().await.unwrap();
    let standing = |p: &PeerId| {
        let p = p.clone();
        let s = &s;
        async move { s.peer(&p).await.unwrap().unwrap() }
    };
    assert_eq!(standing(&a).await.standing, Standing::Quarantined);
    // 10 s after the last report it lapses, reports and all; the ban stays.
    tokio::time::advance(Duration::from_secs(3)).await;
    s.expire().await.unwrap();
    let lapsed = standing(&a).await;
    assert_eq!((lapsed.standing, lapsed.reports), (Standing::Active, 0));
    assert_eq!(standing(&b).await.standing, Standing::Banned);
}
