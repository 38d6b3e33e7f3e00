//! Key names, and the encoding of values in Redis and in script replies.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::time::Instant;

use super::{RedisStore, RedisStoreError};
use crate::store::{Health, Load, PeerSnapshot, Standing, UrlKey};

pub(super) fn peer_tag(prefix: &str, id: &str) -> String {
    format!("{prefix}:{{p:{id}}}")
}

pub(super) fn blob_keys(prefix: &str, hex: &str) -> Vec<String> {
    let tag = format!("{prefix}:{{b:{hex}}}");
    vec![
        format!("{tag}:meta"),
        format!("{tag}:prov"),
        format!("{tag}:data"),
    ]
}

pub(super) fn reply(op: &'static str) -> RedisStoreError {
    RedisStoreError::Reply { op }
}

pub(super) fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

pub(super) fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(super) fn as_str(v: &Value) -> Option<&str> {
    std::str::from_utf8(as_bytes(v)?).ok()
}

pub(super) fn as_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

pub(super) fn is_nil(v: &Value) -> bool {
    matches!(v, Value::Nil)
}

pub(super) fn is_noscript(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

pub(super) fn encode_labels(labels: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in labels {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

pub(super) fn decode_labels(mut b: &[u8]) -> Option<BTreeMap<String, String>> {
    let mut next = || -> Option<String> {
        let (len, rest) = b.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        let s = std::str::from_utf8(rest.get(..len)?).ok()?.to_owned();
        b = &rest[len..];
        Some(s)
    };
    let mut labels = BTreeMap::new();
    while let Some(k) = next() {
        labels.insert(k, next()?);
    }
    Some(labels)
}

pub(super) fn standing_name(s: Standing) -> &'static str {
    match s {
        Standing::Active => "active",
        Standing::Draining => "draining",
        Standing::Banned => "banned",
        Standing::Quarantined => "quarantined",
    }
}

pub(super) fn parse_standing(s: Option<&str>) -> Standing {
    match s {
        Some("draining") => Standing::Draining,
        Some("banned") => Standing::Banned,
        Some("quarantined") => Standing::Quarantined,
        _ => Standing::Active,
    }
}

/// The byte strings of a script's array reply (blob ids, say); an absent or
/// malformed element is an empty list.
pub(super) fn byte_list(v: Option<&Value>) -> Vec<Vec<u8>> {
    v.and_then(as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(|b| as_bytes(b).map(<[u8]>::to_vec))
        .collect()
}

/// Records a refused `sha256` claim, as the memory store does.
pub(super) fn refused_alias(sha: &str, claimed: &str, holder: &str) {
    tracing::warn!(
        sha256 = sha,
        claimed,
        holder,
        "conflicting sha256 alias refused"
    );
}

pub(super) fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

impl RedisStore {
    pub(super) fn prefix(&self) -> &str {
        &self.config.prefix
    }

    pub(super) fn peer_keys(&self, id: &str, parts: &[&str]) -> Vec<String> {
        let tag = peer_tag(self.prefix(), id);
        parts.iter().map(|p| format!("{tag}:{p}")).collect()
    }

    pub(super) fn index_key(&self) -> String {
        format!("{}:{{index}}:peers", self.prefix())
    }

    pub(super) fn stats_key(&self) -> String {
        format!("{}:{{stats}}", self.prefix())
    }

    /// An origin URL's record; its lease is this key plus `:lease`, in the same slot.
    pub(super) fn url_key(&self, url: &UrlKey) -> String {
        format!("{}:{{u:{url}}}", self.prefix())
    }

    pub(super) fn alias_key(&self, sha_hex: &str) -> String {
        format!("{}:{{a:{sha_hex}}}", self.prefix())
    }
}

pub(super) fn parse_snapshot(id: &str, v: &Value, now: Instant) -> Option<(PeerSnapshot, String)> {
    let a = as_array(v)?;
    let s = |i: usize| a.get(i).and_then(as_str).unwrap_or_default();
    let n = |i: usize| a.get(i).and_then(as_int).unwrap_or(0);
    let labels = decode_labels(a.get(2).and_then(as_bytes).unwrap_or_default())?;
    let server_now = n(13);
    let age = Duration::from_millis(server_now.saturating_sub(n(7)).max(0) as u64);
    let reason = s(10);
    let snap = PeerSnapshot {
        id: id.parse().ok()?,
        address: Arc::from(s(0)),
        zone: Arc::from(s(1)),
        labels: Arc::new(labels),
        health: if s(3) == "0" {
            Health::Unhealthy
        } else {
            Health::Healthy
        },
        standing: parse_standing(a.get(9).and_then(as_str)),
        reason: Arc::from(reason),
        reports: n(11) as u32,
        load: Load {
            active_uploads: n(4) as u32,
            upload_bytes_per_sec: n(5) as u64,
            upload_slots: n(6) as u32,
        },
        last_seen: now.checked_sub(age).unwrap_or(now),
        blob_count: n(12) as u64,
    };
    Some((snap, s(8).to_owned()))
}
