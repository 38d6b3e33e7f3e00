use std::collections::BTreeMap;

use super::{
    RedisConfig, RedisUrlError,
    encoding::{blob_keys, decode_labels, encode_labels, peer_tag},
};
use crate::store::PeerId;

#[test]
fn urls() {
    RedisConfig::parse_url("rediss://h:6380").unwrap();
    RedisConfig::parse_url("redis+sentinel://h:26379/mymaster").unwrap();
    RedisConfig::parse_url("rediss+sentinel://h:26379,i:26380/mymaster/1").unwrap();
    assert!(matches!(
        RedisConfig::parse_url("http://h"),
        Err(RedisUrlError::NotRedis { .. })
    ));
    RedisConfig::parse_url("redis://127.0.0.1:6379/2").unwrap();
    assert!(matches!(
        RedisConfig::parse_url("redis://127.0.0.1:notaport"),
        Err(RedisUrlError::Invalid { .. })
    ));
}

/// The hash tag of a key: what Redis Cluster hashes to pick its slot.
fn tag(key: &str) -> &str {
    let open = key.find('{').unwrap();
    let close = open + key[open..].find('}').unwrap();
    &key[open + 1..close]
}

#[test]
fn keys_of_one_record_share_one_hash_tag() {
    let blob = blob_keys("nebula", &"ab".repeat(32));
    assert!(blob.iter().all(|k| tag(k) == tag(&blob[0])), "{blob:?}");
    assert!(tag(&blob[0]).starts_with("b:"));
    let peer = peer_tag("nebula", "peer-1");
    let keys: Vec<String> = ["peer", "gen", "inv", "sanction", "reporters"]
        .iter()
        .map(|p| format!("{peer}:{p}"))
        .collect();
    assert!(keys.iter().all(|k| tag(k) == "p:peer-1"), "{keys:?}");
    // Peer ids cannot hold braces, so a tag never ends early.
    assert!("a{b".parse::<PeerId>().is_err());
}

#[test]
fn labels_round_trip_and_urls_are_redacted() {
    let mut labels = BTreeMap::new();
    labels.insert("a".to_owned(), "x\0y".to_owned());
    labels.insert(String::new(), String::new());
    assert_eq!(decode_labels(&encode_labels(&labels)), Some(labels));
    let c = RedisConfig::new("redis://user:s3cret@h:1/0").unwrap();
    assert!(!format!("{c:?}").contains("s3cret"));
}
