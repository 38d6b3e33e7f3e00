use super::*;

#[test]
fn peer_ids_are_validated() {
    assert_eq!(
        "abc-1.z_:9".parse::<PeerId>().unwrap().as_str(),
        "abc-1.z_:9"
    );
    assert_eq!("".parse::<PeerId>(), Err(PeerIdError::Empty));
    assert!(matches!(
        "a b".parse::<PeerId>(),
        Err(PeerIdError::BadChar { ch: ' ', .. })
    ));
    assert!(matches!(
        "é".parse::<PeerId>(),
        Err(PeerIdError::BadChar { .. })
    ));
    assert!(matches!(
        "x".repeat(MAX_PEER_ID_LEN + 1).parse::<PeerId>(),
        Err(PeerIdError::TooLong { .. })
    ));
}

#[test]
fn load_buckets() {
    let load = |active_uploads, upload_slots| Load {
        active_uploads,
        upload_slots,
        upload_bytes_per_sec: 0,
    };
    assert_eq!(load(0, 0).bucket(), 0);
    assert_eq!(load(3, 0).bucket(), 10);
    assert_eq!(load(1, 10).bucket(), 1);
    assert_eq!(load(5, 10).bucket(), 5);
    assert_eq!(load(99, 10).bucket(), 10);
}
