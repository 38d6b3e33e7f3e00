//! The store's behaviour through its public API.

use std::{
    fs,
    os::unix::fs::FileExt,
    path::Path,
    sync::{Arc, atomic::Ordering},
};

use super::*;

const MIB: usize = 1 << 20;

fn sample(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 ^ seed << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

fn add_bytes(store: &Store, dir: &Path, bytes: &[u8]) -> Arc<Blob> {
    let src = dir.join(format!("src-{}", rand::random::<u32>()));
    fs::write(&src, bytes).unwrap();
    store.add_file(&src).unwrap()
}

#[test]
fn add_list_export_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let bytes = sample(3 * MIB + 17, 1);
    let blob = add_bytes(&store, tmp.path(), &bytes);
    assert_eq!(blob.id().to_hash(), blake3::hash(&bytes));
    assert!(blob.is_complete());
    let info = &store.list()[0];
    assert_eq!(
        (info.size, info.chunks, info.chunks_verified),
        (bytes.len() as u64, 4, 4)
    );
    let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&bytes).into();
    assert_eq!(info.sha256.as_deref(), Some(hex::encode(sha).as_str()));
    assert_eq!(
        store.find_sha256(&Sha256Digest(sha)).unwrap().id(),
        blob.id()
    );
    let out = tmp.path().join("out.bin");
    store.export(&blob.id(), &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), bytes);
    let mut streamed = Vec::new();
    blob.copy_to(&mut streamed).unwrap();
    assert_eq!(streamed, bytes);
    assert_eq!(&blob.read_chunk(3).unwrap()[..], &bytes[3 * MIB..]);
    store.remove(&blob.id()).unwrap();
    assert!(store.list().is_empty());
    assert!(matches!(
        store.remove(&blob.id()),
        Err(StoreError::NotFound { .. })
    ));
    // Reopened, the removal holds and the peer id is stable.
    let peer = store.peer_id().to_owned();
    drop(store);
    let store = Store::open(tmp.path().join("store")).unwrap();
    assert!(store.list().is_empty());
    assert_eq!(store.peer_id(), peer);
}

#[test]
fn a_second_open_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let _a = Store::open(tmp.path()).unwrap();
    assert!(matches!(
        Store::open(tmp.path()),
        Err(StoreError::Locked { .. })
    ));
}

#[test]
fn partial_blobs_keep_verified_chunks_and_refuse_bad_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = sample(5 * MIB + 123, 2);
    let ob = Outboard::compute(&bytes);
    let chunk = |i: u32| {
        let r = ob.geometry().chunk_range(i);
        &bytes[r.start as usize..r.end as usize]
    };
    {
        let store = Store::open(tmp.path()).unwrap();
        let blob = store.begin(&ob).unwrap();
        assert_eq!(blob.write_chunk(1, chunk(1)).unwrap(), WriteOutcome::Stored);
        assert_eq!(
            blob.write_chunk(1, chunk(1)).unwrap(),
            WriteOutcome::AlreadyHad
        );
        let mut bad = chunk(3).to_vec();
        bad[10] ^= 1;
        assert!(matches!(
            blob.write_chunk(3, &bad),
            Err(StoreError::Verify(_))
        ));
        assert_eq!(blob.write_chunk(5, chunk(5)).unwrap(), WriteOutcome::Stored);
        assert!(matches!(
            blob.read_chunk(3),
            Err(StoreError::ChunkMissing { .. })
        ));
        assert!(matches!(
            store.export(&ob.id(), &tmp.path().join("x")),
            Err(StoreError::Incomplete { .. })
        ));
        assert!(!tmp.path().join("x").exists());
    }
    // Corrupt a logged chunk behind the store's back: reopening drops it.
    let data = tmp
        .path()
        .join("blobs")
        .join(ob.id().to_string())
        .join("data");
    let f = OpenOptions::new().write(true).open(&data).unwrap();
    f.write_all_at(b"garbage", 5 * MIB as u64).unwrap();
    drop(f);
    let store = Store::open(tmp.path()).unwrap();
    let blob = store.get(&ob.id()).unwrap();
    assert_eq!(blob.chunks().iter().collect::<Vec<_>>(), vec![1]);
    for i in 0..6 {
        if i != 1 {
            let expect = if i == 5 {
                WriteOutcome::Completed
            } else {
                WriteOutcome::Stored
            };
            assert_eq!(blob.write_chunk(i, chunk(i)).unwrap(), expect);
        }
    }
    assert!(blob.is_complete());
    assert_eq!(
        blob.compute_sha256().unwrap().0,
        <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
    );
    drop(store);
    let store = Store::open(tmp.path()).unwrap();
    let info = &store.list()[0];
    assert!(info.complete && info.sha256.is_some());
    let out = tmp.path().join("out");
    store.export(&ob.id(), &out).unwrap();
    assert_eq!(blake3::hash(&fs::read(&out).unwrap()), ob.id().to_hash());
}

#[test]
fn empty_and_single_chunk_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("s")).unwrap();
    let empty = add_bytes(&store, tmp.path(), b"");
    assert_eq!(empty.id().to_string(), blake3::hash(b"").to_hex().as_str());
    let one = sample(1000, 3);
    let ob = Outboard::single_chunk(BlobId::of(&one), 1000).unwrap();
    let blob = store.begin(&ob).unwrap();
    assert!(blob.write_chunk(0, &one[..999]).is_err());
    assert_eq!(blob.write_chunk(0, &one).unwrap(), WriteOutcome::Completed);
    let out = tmp.path().join("e");
    store.export(&empty.id(), &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"");
}

#[test]
fn export_failure_leaves_nothing_at_the_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("s")).unwrap();
    let blob = add_bytes(&store, tmp.path(), &sample(MIB + 5, 4));
    let missing_dir = tmp.path().join("no-such-dir").join("out");
    assert!(store.export(&blob.id(), &missing_dir).is_err());
    assert!(!missing_dir.exists());
    // An existing destination survives a failed export untouched.
    let dest = tmp.path().join("keep");
    fs::write(&dest, b"old").unwrap();
    let unknown = BlobId::of(b"unknown");
    assert!(store.export(&unknown, &dest).is_err());
    assert_eq!(fs::read(&dest).unwrap(), b"old");
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("nebula-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn adding_a_partly_fetched_blob_completes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("s")).unwrap();
    let bytes = sample(3 * MIB, 8);
    let ob = Outboard::compute(&bytes);
    let partial = store.begin(&ob).unwrap();
    partial.write_chunk(0, &bytes[..MIB]).unwrap();
    let added = add_bytes(&store, tmp.path(), &bytes);
    assert!(added.is_complete() && partial.is_complete());
    assert!(added.sha256().is_some());
    let out = tmp.path().join("out");
    store.export(&ob.id(), &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), bytes);
    assert!(
        fs::read_dir(tmp.path().join("s/tmp"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn only_regular_files_are_added() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("s")).unwrap();
    assert!(store.add_file(tmp.path()).is_err());
    assert!(store.list().is_empty());
}

#[test]
fn concurrent_writers_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let bytes = sample(8 * MIB, 6);
    let ob = Outboard::compute(&bytes);
    let blob = store.begin(&ob).unwrap();
    let completed = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (blob, bytes, completed) = (&blob, &bytes, &completed);
            s.spawn(move || {
                for k in 0..8u32 {
                    let i = (k + t * 3) % 8;
                    let r = blob.geometry().chunk_range(i);
                    if blob
                        .write_chunk(i, &bytes[r.start as usize..r.end as usize])
                        .unwrap()
                        == WriteOutcome::Completed
                    {
                        completed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(completed.load(Ordering::SeqCst), 1);
    assert!(blob.is_complete());
}

#[test]
fn a_store_others_can_write_to_is_refused_with_the_remedy() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
    let err = Store::open(&root).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Insecure {
                reason: Insecurity::WritableByOthers { mode: 0o777 },
                ..
            }
        ),
        "{err}"
    );
    let remedy = format!(
        "writable by other users (mode 777); run `chmod go-w {}`",
        root.display()
    );
    assert!(err.to_string().ends_with(&remedy), "{err}");
}
