//! [`RedisStore`]: the [`StateStore`] on Redis, so several control-plane
//! replicas share one state (as Kraken's trackers do).
//!
//! # Keys
//!
//! Every key starts with a prefix (`nebula` by default). The keys of one
//! logical record share a hash tag, so each record lives in one Redis Cluster
//! slot and every multi-step update of a record is one Lua script on that slot:
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:{p:ID}:peer` | hash, TTL = lease | address, zone, labels, health, load, last seen, epoch |
//! | `P:{p:ID}:gen` | string | the epoch of the peer's current registration (outlives the lease until swept) |
//! | `P:{p:ID}:inv` | set | blob ids the peer announced |
//! | `P:{p:ID}:part` | set | the announced blobs it holds only in part |
//! | `P:{p:ID}:sanction` | hash | standing and reason (outlive the lease) |
//! | `P:{p:ID}:reporters` | set | distinct reporters |
//! | `P:{b:HEX}:meta` | hash | size, sha256 |
//! | `P:{b:HEX}:prov` | sorted set | provider id → expiry (ms, Redis clock) |
//! | `P:{b:HEX}:data` | hash | provider id → `epoch|bitmap` (empty bitmap: complete) |
//! | `P:{a:SHA}` | string | SHA-256 alias → BLAKE3 id |
//! | `P:{index}:peers` | sorted set | peer id → lease deadline, for listing and sweeping |
//! | `P:{stats}` | hash | blob and (blob, provider) counts |
//! | `P:{replicas}` | sorted set | control-plane replica → expiry |
//! | `P:{lock}:NAME` | string, TTL | a lock held by one replica |
//!
//! An update that spans records (an announce touches the peer and each blob)
//! is a sequence of per-record scripts. A provider entry is valid only while
//! its peer's key lives *with the same epoch*, so an entry left behind by a
//! replica that died half-way, or by a peer that lapsed and registered again,
//! is never handed out; the sweeper removes it from the peer's inventory, and
//! its expiry score removes it in any case (trimmed on every read). Live peers
//! push their entries' expiry forward from their heartbeats, once per half
//! [`RedisConfig::entry_horizon`].
//!
//! Times (last seen, expiries) come from the Redis server's clock (`TIME` in
//! the scripts), so replicas with skewed clocks agree.
//!
//! # Connecting
//!
//! [`RedisConfig::url`] names the primary directly (`redis://`, or
//! `rediss://` for TLS with [`RedisConfig::tls`]) or through Sentinel
//! (`redis+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]`), which is asked
//! again after a failed call so a failover moves every replica to the new
//! primary: see `target` and `primary`.

use std::{
    collections::{BTreeMap, HashMap},
    error::Error as StdError,
    future::Future,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use nebula_common::{BlobId, Sha256Digest};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind, Value, aio::ConnectionManagerConfig};
use tokio::time::Instant;

mod primary;
mod target;

use primary::Primary;
pub use target::{RedisClientCert, RedisTls, RedisUrlError};
use target::{Target, redact_url};

use super::{
    Announcement, BlobMeta, Health, Holding, InventoryCaps, Load, OriginLease, PeerId,
    PeerRegistration, PeerSnapshot, Registered, ReportOutcome, Standing, StateStore, StoreError,
    StoreStats, Swarm, UrlKey, UrlRecord,
};

/// Reporters remembered per provider, as in the memory store.
const MAX_REPORTERS: u32 = 1024;
/// Commands sent in one pipeline.
const PIPELINE: usize = 512;
/// Lapsed peers one sweep handles at most.
const SWEEP_BATCH: isize = 256;
/// Items of a bulk operation allowed per [`RedisConfig::op_timeout`] of deadline.
const BULK_ITEMS_PER_OP_TIMEOUT: usize = 5_000;
/// Swarms one replica caches at most; past it the cache starts over.
const MAX_CACHED_SWARMS: usize = 65_536;

/// Where the Redis store lives and how long it may take.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]HOST:PORT[/DB]`, `rediss://…` or
    /// `redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT…]/SERVICE[/DB]`.
    pub url: String,
    /// What to trust and show for TLS (`rediss://` only).
    pub tls: RedisTls,
    /// Prefix of every key, so several clusters may share one Redis.
    pub prefix: String,
    /// Deadline of one store operation (all its round trips); past it the call
    /// answers `UNAVAILABLE`. Default 1 s.
    pub op_timeout: Duration,
    /// Deadline of connecting to Redis. Default 500 ms.
    pub connect_timeout: Duration,
    /// How long a provider entry stays valid without a heartbeat from its peer
    /// pushing it forward (a safety net for entries nobody else removes).
    /// Default 10 min.
    pub entry_horizon: Duration,
    /// How long this replica reuses a blob's swarm as read from Redis (hot
    /// blobs stay cheap). This replica's own writes take effect at once;
    /// other replicas' writes, heartbeats' load figures and lapsed leases show
    /// after at most this long. Zero: no cache. Default 500 ms.
    pub swarm_cache: Duration,
    /// How much inventory the store takes (per peer and in all).
    pub caps: InventoryCaps,
}

// The URL may carry a password.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("tls", &self.tls)
            .field("prefix", &self.prefix)
            .field("op_timeout", &self.op_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("entry_horizon", &self.entry_horizon)
            .field("swarm_cache", &self.swarm_cache)
            .field("caps", &self.caps)
            .finish()
    }
}

impl RedisConfig {
    /// Defaults for `url`, checked by [`RedisConfig::parse_url`].
    pub fn new(url: &str) -> Result<Self, RedisUrlError> {
        Self::parse_url(url)?;
        Ok(Self {
            url: url.to_owned(),
            tls: RedisTls::default(),
            prefix: "nebula".into(),
            op_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(500),
            entry_horizon: Duration::from_secs(600),
            swarm_cache: Duration::from_millis(500),
            caps: InventoryCaps::default(),
        })
    }

    /// Checks a URL (see [`RedisConfig::url`]) without TLS material; no network.
    pub fn parse_url(url: &str) -> Result<(), RedisUrlError> {
        Target::parse(url, &RedisTls::default()).map(drop)
    }

    /// Checks the URL with this configuration's TLS material; no network.
    pub fn check(&self) -> Result<(), RedisUrlError> {
        Target::parse(&self.url, &self.tls).map(drop)
    }
}

/// What went wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// The client or the server reported an error.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// No answer within the operation deadline.
    #[error("Redis did not answer within {timeout:?}")]
    Timeout {
        /// The deadline.
        timeout: Duration,
    },
    /// No sentinel named the primary.
    #[error("Sentinel: {reason}")]
    NoPrimary {
        /// What each sentinel answered.
        reason: String,
    },
    /// An answer of an unexpected shape (another program writing our keys?).
    #[error("unexpected reply from Redis to {op}")]
    Reply {
        /// The operation.
        op: &'static str,
    },
    /// Redis answered, and the answer is a refusal (an inventory cap).
    #[error(transparent)]
    Refused(#[from] StoreError),
}

/// Why Redis, reached at start-up, can never serve as configured.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// The TLS handshake failed: Redis's certificate is not signed by a
    /// trusted CA or not for this host, or Redis refused ours.
    #[error("TLS to Redis at {url} failed: {reason}")]
    Tls {
        /// Where (password redacted).
        url: String,
        /// What rustls said.
        reason: String,
    },
    /// Redis refused the URL's user name or password.
    #[error("Redis at {url} refused the credentials: {reason}")]
    Credentials {
        /// Where (password redacted).
        url: String,
        /// What Redis said.
        reason: String,
    },
}

/// The TLS error behind `err`, if a failed handshake is what it is. The
/// redis crate keeps it as an `io::Error` inside an `Arc`.
fn tls_failure(err: &RedisError) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    // Bounded: error chains are short, and this stops after 16 links.
    for _ in 0..16 {
        let e = next?;
        let inner: &(dyn StdError + 'static) =
            match e.downcast_ref::<Arc<dyn StdError + Send + Sync>>() {
                Some(shared) => &**shared,
                None => e,
            };
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = inner
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = e.source();
    }
    None
}

impl From<RedisStoreError> for StoreError {
    fn from(err: RedisStoreError) -> Self {
        if let RedisStoreError::Refused(refusal) = err {
            return refusal;
        }
        StoreError::Unavailable {
            source: Box::new(err) as Box<dyn StdError + Send + Sync>,
        }
    }
}

type R<T> = Result<T, RedisStoreError>;

const NOW: &str = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// The Lua scripts, each touching the keys of one record only.
#[derive(Debug)]
struct Scripts {
    register: Script,
    renew: Script,
    set_horizon: Script,
    inventory: Script,
    upsert: Script,
    drop: Script,
    read: Script,
    snapshot: Script,
    set_health: Script,
    set_standing: Script,
    report: Script,
    purge_begin: Script,
    purge_end: Script,
    deregister: Script,
    index_forget: Script,
    alias_claim: Script,
    alias_unclaim: Script,
    alias_forget: Script,
    replicas: Script,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{NOW}{body}"))
}

impl Scripts {
    fn new() -> Self {
        Self {
            // KEYS: peer, gen. ARGV: address, zone, labels, lease ms, horizon ms.
            // Returns {1 if it was alive, deadline ms}.
            register: script(
                r#"
local alive = redis.call('EXISTS', KEYS[1]) == 1
if alive then
  if redis.call('HGET', KEYS[1], 'addr') ~= ARGV[1] then
    redis.call('HSET', KEYS[1], 'health', '1')
  end
else
  local epoch = tostring(tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('SET', KEYS[2], epoch)
  -- Entries announced from now on expire a horizon from their announce.
  redis.call('HSET', KEYS[1], 'health', '1', 'au', 0, 'ubps', 0, 'us', 0, 'epoch', epoch,
             'hz', now + tonumber(ARGV[5]))
end
redis.call('HSET', KEYS[1], 'addr', ARGV[1], 'zone', ARGV[2], 'labels', ARGV[3], 'seen', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {alive and 1 or 0, now + tonumber(ARGV[4])}
"#,
            ),
            // KEYS: peer. ARGV: active uploads, bytes/s, slots, lease ms, horizon ms.
            // Returns false if not alive, else {deadline, epoch, 1 if the
            // entries' expiry is due to be pushed forward}.
            renew: script(
                r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'au', ARGV[1], 'ubps', ARGV[2], 'us', ARGV[3], 'seen', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local hz = tonumber(redis.call('HGET', KEYS[1], 'hz') or '0')
local due = hz < now + tonumber(ARGV[5]) / 2
return {now + tonumber(ARGV[4]), redis.call('HGET', KEYS[1], 'epoch'), due and 1 or 0}
"#,
            ),
            // KEYS: peer. ARGV: epoch, horizon ms. Records that the entries
            // were pushed forward.
            set_horizon: script(
                r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'hz', now + tonumber(ARGV[2]))
return 1
"#,
            ),
            // KEYS: peer, inv, part. ARGV: full (0/1), number added, most
            // blobs, most partial, a partial flag ('1'/'0') per added blob,
            // added..., removed... Returns false if not alive, {'cap', what,
            // count} (nothing changed) when the inventory would pass a cap,
            // else {epoch, {dropped blobs}}.
            inventory: script(
                r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local full = ARGV[1] == '1'
local n = tonumber(ARGV[2])
local flags = ARGV[5]
local first = 6
local removed = {}
for i = first + n, #ARGV do removed[ARGV[i]] = true end
-- The inventory after the announce, counted before anything changes.
local blobs, partial = 0, 0
if not full then
  blobs = redis.call('SCARD', KEYS[2])
  partial = redis.call('SCARD', KEYS[3])
  for b, _ in pairs(removed) do
    blobs = blobs - redis.call('SISMEMBER', KEYS[2], b)
    partial = partial - redis.call('SISMEMBER', KEYS[3], b)
  end
end
local seen = {}
for i = first, first + n - 1 do
  local b = ARGV[i]
  if not seen[b] then
    seen[b] = true
    local kept = (not full) and (not removed[b])
    if not (kept and redis.call('SISMEMBER', KEYS[2], b) == 1) then blobs = blobs + 1 end
    local was = kept and redis.call('SISMEMBER', KEYS[3], b) == 1
    local is = string.sub(flags, i - first + 1, i - first + 1) == '1'
    if is and not was then partial = partial + 1 elseif was and not is then partial = partial - 1 end
  end
end
if blobs > tonumber(ARGV[3]) then return {'cap', 'blobs', blobs} end
if partial > tonumber(ARGV[4]) then return {'cap', 'partial', partial} end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local dropped = {}
if full then
  for _, b in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if not seen[b] then table.insert(dropped, b) end
  end
end
for i = first + n, #ARGV do
  if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 1 then table.insert(dropped, ARGV[i]) end
end
for _, b in ipairs(dropped) do
  redis.call('SREM', KEYS[2], b)
  redis.call('SREM', KEYS[3], b)
end
for i = first, first + n - 1 do
  redis.call('SADD', KEYS[2], ARGV[i])
  if string.sub(flags, i - first + 1, i - first + 1) == '1' then
    redis.call('SADD', KEYS[3], ARGV[i])
  else
    redis.call('SREM', KEYS[3], ARGV[i])
  end
end
return {epoch, dropped}
"#,
            ),
            // KEYS: meta, prov, data. ARGV: peer, epoch, size, sha hex or '',
            // bitmap or '', horizon ms.
            // Returns {blob created, entry added, alias: 0 none, 1 to claim,
            // 2 a digest other than the blob's known one (refused)}.
            upsert: script(
                r#"
local created = redis.call('EXISTS', KEYS[1]) == 0
local alias = 0
if created then
  redis.call('HSET', KEYS[1], 'size', ARGV[3])
end
if ARGV[4] ~= '' then
  local known = redis.call('HGET', KEYS[1], 'sha')
  if not known then
    redis.call('HSET', KEYS[1], 'sha', ARGV[4])
    alias = 1
  elseif known ~= ARGV[4] then
    alias = 2
  end
end
local added = redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. '|' .. ARGV[5])
return {created and 1 or 0, added, alias}
"#,
            ),
            // KEYS: meta, prov, data. ARGV: peer, epoch ('' for any).
            // Returns {entry removed, blob removed, its sha or false}.
            drop: script(
                r#"
if ARGV[2] ~= '' then
  local v = redis.call('HGET', KEYS[3], ARGV[1])
  if not v or string.sub(v, 1, #ARGV[2] + 1) ~= ARGV[2] .. '|' then return {0, 0, false} end
end
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then
  local sha = redis.call('HGET', KEYS[1], 'sha')
  local gone = redis.call('DEL', KEYS[1], KEYS[3])
  return {removed, gone > 0 and 1 or 0, sha}
end
return {removed, 0, false}
"#,
            ),
            // KEYS: meta, prov, data. Trims expired entries, then returns
            // {trimmed, blob removed, sha, size, {peer, value, ...}}.
            read: script(
                r#"
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, m in ipairs(old) do
  redis.call('ZREM', KEYS[2], m)
  redis.call('HDEL', KEYS[3], m)
end
if redis.call('ZCARD', KEYS[2]) == 0 then
  local sha = redis.call('HGET', KEYS[1], 'sha')
  local gone = redis.call('DEL', KEYS[1], KEYS[3])
  return {#old, gone > 0 and 1 or 0, sha, false, {}}
end
local meta = redis.call('HMGET', KEYS[1], 'size', 'sha')
return {#old, 0, meta[2], meta[1], redis.call('HGETALL', KEYS[3])}
"#,
            ),
            // KEYS: peer, sanction, reporters, inv. Returns false if not alive.
            snapshot: script(
                r#"
local p = redis.call('HMGET', KEYS[1], 'addr', 'zone', 'labels', 'health', 'au', 'ubps', 'us', 'seen', 'epoch')
if not p[1] then return false end
local s = redis.call('HMGET', KEYS[2], 'standing', 'reason')
return {p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], s[1], s[2],
        redis.call('SCARD', KEYS[3]), redis.call('SCARD', KEYS[4]), now}
"#,
            ),
            // KEYS: peer. ARGV: '1' healthy, '0' unhealthy.
            set_health: script(
                r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'health', ARGV[1])
return 1
"#,
            ),
            // KEYS: peer, sanction, reporters. ARGV: standing, reason.
            set_standing: script(
                r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == 'active' then
  redis.call('DEL', KEYS[2], KEYS[3])
else
  redis.call('HSET', KEYS[2], 'standing', ARGV[1], 'reason', ARGV[2])
  redis.call('PERSIST', KEYS[2])
end
return 1
"#,
            ),
            // KEYS: peer, sanction, reporters. ARGV: reporter, reason,
            // quarantine after, max reporters, ttl ms. Returns false or {reports, quarantined}.
            report: script(
                r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if redis.call('SCARD', KEYS[3]) < tonumber(ARGV[4]) then
  redis.call('SADD', KEYS[3], ARGV[1])
end
local reports = redis.call('SCARD', KEYS[3])
local standing = redis.call('HGET', KEYS[2], 'standing') or 'active'
if reports >= tonumber(ARGV[3]) and (standing == 'active' or standing == 'draining') then
  standing = 'quarantined'
  redis.call('HSET', KEYS[2], 'standing', standing)
end
if standing ~= 'banned' then redis.call('HSET', KEYS[2], 'reason', ARGV[2]) end
-- Reports lapse ARGV[5] ms after the last one, and with them a quarantine
-- (the sanction key); an operator's ban or drain stays.
redis.call('PEXPIRE', KEYS[3], ARGV[5])
if standing == 'active' or standing == 'quarantined' then
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return {reports, standing == 'quarantined' and 1 or 0}
"#,
            ),
            // KEYS: peer, gen, inv. Returns {1, deadline} if alive, else
            // {0, epoch or false, {blobs}}.
            purge_begin: script(
                r#"
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then return {1, now + ttl} end
return {0, redis.call('GET', KEYS[2]), redis.call('SMEMBERS', KEYS[3])}
"#,
            ),
            // KEYS: peer, gen, inv, part. ARGV: epoch. Forgets the lapsed
            // registration unless the peer registered again meanwhile.
            purge_end: script(
                r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local g = redis.call('GET', KEYS[2])
if g and g ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return 1
"#,
            ),
            // KEYS: peer, gen, inv, part. Returns {known, {blobs}}.
            deregister: script(
                r#"
local known = redis.call('EXISTS', KEYS[1]) + redis.call('EXISTS', KEYS[2])
local blobs = redis.call('SMEMBERS', KEYS[3])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return {known > 0 and 1 or 0, blobs}
"#,
            ),
            // KEYS: index. ARGV: peer. Removes it unless its deadline moved on.
            index_forget: script(
                r#"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= now then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
"#,
            ),
            // KEYS: alias. ARGV: blob hex. Points the alias at the blob unless
            // it names another one; returns the blob it names now.
            alias_claim: script(
                r#"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"#,
            ),
            // KEYS: meta. ARGV: sha hex. Drops a refused digest from the blob.
            alias_unclaim: script(
                r#"
if redis.call('HGET', KEYS[1], 'sha') == ARGV[1] then redis.call('HDEL', KEYS[1], 'sha') end
return 1
"#,
            ),
            // KEYS: alias. ARGV: blob hex. Removes it if it still names that blob.
            alias_forget: script(
                r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#,
            ),
            // KEYS: replicas. ARGV: me, ttl ms. Returns the live replicas.
            replicas: script(
                r#"
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#,
            ),
        }
    }
}

/// One script call in a pipeline.
struct Call {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

/// The Redis-backed state store. Cloning is cheap (one shared connection).
#[derive(Clone)]
pub struct RedisStore {
    primary: Arc<Primary>,
    config: Arc<RedisConfig>,
    scripts: Arc<Scripts>,
    /// Redis failed last time: the next failure is not logged again, the next
    /// success is ("once per episode").
    down: Arc<AtomicBool>,
    /// Swarms read lately (see [`RedisConfig::swarm_cache`]).
    cache: Arc<Recent<BlobId, Option<Swarm>>>,
    /// Providers' snapshots (with their epoch) read lately for swarms, under
    /// the same rule: a hot provider is read from Redis once per period.
    peer_cache: Arc<Recent<String, Option<(PeerSnapshot, String)>>>,
}

/// Values read from Redis lately, each usable for `ttl` after it was read;
/// bounded by [`MAX_CACHED_SWARMS`] (past it, it starts over).
#[derive(Debug)]
struct Recent<K, V> {
    ttl: Duration,
    map: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Recent<K, V> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, (Instant, V)>> {
        // The map holds only copies of answers; a panic mid-insert leaves it usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        if !self.enabled() {
            return None;
        }
        let map = self.lock();
        let (read, value) = map.get(key)?;
        (read.elapsed() < self.ttl).then(|| value.clone())
    }

    fn insert(&self, key: K, value: V) {
        if !self.enabled() {
            return;
        }
        let mut map = self.lock();
        if map.len() >= MAX_CACHED_SWARMS {
            map.clear();
        }
        map.insert(key, (Instant::now(), value));
    }

    fn remove(&self, key: &K) {
        if self.enabled() {
            self.lock().remove(key);
        }
    }

    fn clear(&self) {
        if self.enabled() {
            self.lock().clear();
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn peer_tag(prefix: &str, id: &str) -> String {
    format!("{prefix}:{{p:{id}}}")
}

fn blob_keys(prefix: &str, hex: &str) -> Vec<String> {
    let tag = format!("{prefix}:{{b:{hex}}}");
    vec![
        format!("{tag}:meta"),
        format!("{tag}:prov"),
        format!("{tag}:data"),
    ]
}

fn reply(op: &'static str) -> RedisStoreError {
    RedisStoreError::Reply { op }
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_str(v: &Value) -> Option<&str> {
    std::str::from_utf8(as_bytes(v)?).ok()
}

fn as_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

fn is_nil(v: &Value) -> bool {
    matches!(v, Value::Nil)
}

fn is_noscript(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

fn encode_labels(labels: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in labels {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

fn decode_labels(mut b: &[u8]) -> Option<BTreeMap<String, String>> {
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

fn standing_name(s: Standing) -> &'static str {
    match s {
        Standing::Active => "active",
        Standing::Draining => "draining",
        Standing::Banned => "banned",
        Standing::Quarantined => "quarantined",
    }
}

fn parse_standing(s: Option<&str>) -> Standing {
    match s {
        Some("draining") => Standing::Draining,
        Some("banned") => Standing::Banned,
        Some("quarantined") => Standing::Quarantined,
        _ => Standing::Active,
    }
}

/// The byte strings of a script's array reply (blob ids, say); an absent or
/// malformed element is an empty list.
fn byte_list(v: Option<&Value>) -> Vec<Vec<u8>> {
    v.and_then(as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(|b| as_bytes(b).map(<[u8]>::to_vec))
        .collect()
}

/// Records a refused `sha256` claim, as the memory store does.
fn refused_alias(sha: &str, claimed: &str, holder: &str) {
    tracing::warn!(
        sha256 = sha,
        claimed,
        holder,
        "conflicting sha256 alias refused"
    );
}

fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

impl RedisStore {
    /// A store on the Redis at `config.url`. Connects lazily: a Redis that is
    /// down now makes calls fail with [`StoreError::Unavailable`] until it is up.
    pub fn new(config: RedisConfig) -> Result<Self, StoreError> {
        let target =
            Target::parse(&config.url, &config.tls).map_err(|e| StoreError::Unavailable {
                source: Box::new(e),
            })?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.op_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let primary = Primary::new(target, manager, config.connect_timeout)?;
        Ok(Self {
            primary: Arc::new(primary),
            cache: Arc::new(Recent::new(config.swarm_cache)),
            peer_cache: Arc::new(Recent::new(config.swarm_cache)),
            config: Arc::new(config),
            scripts: Arc::new(Scripts::new()),
            down: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Forgets every cached swarm and provider (a peer's record changed).
    fn forget_swarms(&self) {
        self.cache.clear();
        self.peer_cache.clear();
    }

    /// Like [`RedisStore::snapshots`], reusing snapshots read less than
    /// [`RedisConfig::swarm_cache`] ago.
    async fn snapshots_cached(&self, ids: &[&str]) -> R<Vec<Option<(PeerSnapshot, String)>>> {
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

    /// The configuration it runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    fn prefix(&self) -> &str {
        &self.config.prefix
    }

    fn peer_keys(&self, id: &str, parts: &[&str]) -> Vec<String> {
        let tag = peer_tag(self.prefix(), id);
        parts.iter().map(|p| format!("{tag}:{p}")).collect()
    }

    fn index_key(&self) -> String {
        format!("{}:{{index}}:peers", self.prefix())
    }

    fn stats_key(&self) -> String {
        format!("{}:{{stats}}", self.prefix())
    }

    /// An origin URL's record; its lease is this key plus `:lease`, in the same slot.
    fn url_key(&self, url: &UrlKey) -> String {
        format!("{}:{{u:{url}}}", self.prefix())
    }

    fn alias_key(&self, sha_hex: &str) -> String {
        format!("{}:{{a:{sha_hex}}}", self.prefix())
    }

    /// Runs one operation under the deadline, and logs the first failure and
    /// the recovery of an outage once each.
    async fn run<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = R<T>>,
    ) -> Result<T, StoreError> {
        self.run_within(op, self.config.op_timeout, fut).await
    }

    /// [`RedisStore::run`] for an operation of many round trips (an announce
    /// of `items` blobs, a sweep, a purge): a longer deadline for the whole,
    /// while each round trip keeps [`RedisConfig::op_timeout`], so a Redis
    /// that is down still fails the call at once.
    async fn run_bulk<T>(
        &self,
        op: &'static str,
        items: usize,
        fut: impl Future<Output = R<T>>,
    ) -> Result<T, StoreError> {
        let rounds = 10 + (items / BULK_ITEMS_PER_OP_TIMEOUT) as u32;
        self.run_within(op, self.config.op_timeout * rounds, fut)
            .await
    }

    async fn run_within<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        fut: impl Future<Output = R<T>>,
    ) -> Result<T, StoreError> {
        let outcome = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(RedisStoreError::Timeout { timeout }),
        };
        match &outcome {
            Ok(_) | Err(RedisStoreError::Refused(_)) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("Redis answers again");
                }
            }
            Err(err) => {
                self.primary.failed();
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(op, error = %err, "Redis unavailable; answering UNAVAILABLE until it is back");
                }
            }
        }
        Ok(outcome?)
    }

    async fn eval(&self, script: &Script, keys: &[String], args: &[&[u8]]) -> R<Value> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.primary.conn().await?;
        Ok(inv.invoke_async(&mut conn).await?)
    }

    /// Runs many calls of one script, pipelined; loads the script when Redis
    /// lost it (after a restart) and retries those calls once.
    async fn eval_many(&self, script: &Script, calls: &[Call]) -> R<Vec<Value>> {
        let mut out = Vec::with_capacity(calls.len());
        let mut conn = self.primary.conn().await?;
        for batch in calls.chunks(PIPELINE) {
            let mut loaded = false;
            let mut results: Vec<Option<Value>> = vec![None; batch.len()];
            // At most two rounds: the second only after loading the script.
            for _round in 0..2 {
                let pending: Vec<usize> =
                    (0..batch.len()).filter(|&i| results[i].is_none()).collect();
                if pending.is_empty() {
                    break;
                }
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for &i in &pending {
                    let call = &batch[i];
                    let cmd = pipe
                        .cmd("EVALSHA")
                        .arg(script.get_hash())
                        .arg(call.keys.len())
                        .arg(&call.keys);
                    for a in &call.args {
                        cmd.arg(&a[..]);
                    }
                }
                let answers: Vec<redis::RedisResult<Value>> = pipe.query_async(&mut conn).await?;
                let mut missing = false;
                for (&i, answer) in pending.iter().zip(answers) {
                    match answer {
                        Ok(v) => results[i] = Some(v),
                        Err(e) if is_noscript(&e) && !loaded => missing = true,
                        Err(e) => return Err(e.into()),
                    }
                }
                if !missing {
                    break;
                }
                script.prepare_invoke().load_async(&mut conn).await?;
                loaded = true;
            }
            for r in results {
                out.push(r.ok_or_else(|| reply("a pipelined script"))?);
            }
        }
        Ok(out)
    }

    /// Adjusts the cluster-wide counters (best effort: a replica dying between
    /// a script and this leaves them off by its share).
    async fn count(&self, blobs: i64, entries: i64) -> R<()> {
        if blobs == 0 && entries == 0 {
            return Ok(());
        }
        let mut conn = self.primary.conn().await?;
        redis::pipe()
            .hincr(self.stats_key(), "blobs", blobs)
            .ignore()
            .hincr(self.stats_key(), "entries", entries)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Removes `peer`'s entries from `blobs` (only those of registration
    /// `epoch`, when given) and the aliases of blobs left without providers.
    async fn drop_entries(&self, peer: &str, epoch: Option<&str>, blobs: &[Vec<u8>]) -> R<()> {
        let calls: Vec<Call> = blobs
            .iter()
            .filter_map(|b| std::str::from_utf8(b).ok())
            .map(|hex| Call {
                keys: blob_keys(self.prefix(), hex),
                args: vec![peer.into(), epoch.unwrap_or("").into()],
            })
            .collect();
        let answers = self.eval_many(&self.scripts.drop, &calls).await?;
        let (mut gone_blobs, mut gone_entries) = (0, 0);
        let mut aliases = Vec::new();
        for (call, a) in calls.iter().zip(&answers) {
            let a = as_array(a).ok_or_else(|| reply("drop"))?;
            gone_entries += a.first().and_then(as_int).unwrap_or(0);
            if a.get(1).and_then(as_int) == Some(1) {
                gone_blobs += 1;
                if let Some(sha) = a.get(2).and_then(as_str) {
                    let hex = call.keys[0]
                        .split("{b:")
                        .nth(1)
                        .and_then(|s| s.split('}').next());
                    if let Some(hex) = hex {
                        aliases.push(Call {
                            keys: vec![self.alias_key(sha)],
                            args: vec![hex.into()],
                        });
                    }
                }
            }
        }
        self.eval_many(&self.scripts.alias_forget, &aliases).await?;
        self.count(-gone_blobs, -gone_entries).await
    }

    /// Snapshots of these peers (`None` for those not alive), pipelined.
    async fn snapshots(&self, ids: &[&str]) -> R<Vec<Option<(PeerSnapshot, String)>>> {
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
    async fn push_horizon(&self, id: &PeerId, epoch: &str) -> R<()> {
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

    /// Registers `me` as a live replica for `ttl` and returns every live
    /// replica, sorted.
    pub async fn live_replicas(&self, me: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        self.run("replicas", async {
            let key = format!("{}:{{replicas}}", self.prefix());
            let ttl = millis(ttl).to_string();
            let v = self
                .eval(
                    &self.scripts.replicas,
                    &[key],
                    &[me.as_bytes(), ttl.as_bytes()],
                )
                .await?;
            let mut names: Vec<String> = as_array(&v)
                .ok_or_else(|| reply("replicas"))?
                .iter()
                .filter_map(|v| as_str(v).map(str::to_owned))
                .collect();
            names.sort();
            Ok(names)
        })
        .await
    }

    /// Takes (or keeps) the lock `name` for `holder` for `ttl`; `true` when
    /// `holder` holds it now.
    pub async fn try_lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.run("lock", async {
            let key = format!("{}:{{lock}}:{name}", self.prefix());
            let mut conn = self.primary.conn().await?;
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(holder)
                .arg("NX")
                .arg("PX")
                .arg(millis(ttl))
                .query_async(&mut conn)
                .await?;
            if set.is_some() {
                return Ok(true);
            }
            // Ours already: extend it (compare and extend in one step).
            let extended: i64 = redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
            )
            .key(&key)
            .arg(holder)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await?;
            Ok(extended == 1)
        })
        .await
    }

    /// Bytes Redis uses for its data set and overhead (`used_memory` of `INFO memory`).
    pub async fn used_memory(&self) -> Result<u64, StoreError> {
        self.run("info", async {
            let mut conn = self.primary.conn().await?;
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut conn)
                .await?;
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| reply("INFO memory"))
        })
        .await
    }

    /// Reaches Redis once, at start-up: `Ok` when it answers, and also when
    /// it cannot be reached now (calls answer `UNAVAILABLE` until it can); an
    /// error when it was reached but can never serve as configured (a TLS
    /// certificate refused either way, credentials refused).
    pub async fn check_setup(&self) -> Result<(), RedisSetupError> {
        let url = redact_url(&self.config.url);
        let attempt = tokio::time::timeout(self.config.op_timeout, async {
            let mut conn = self.primary.conn().await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            Ok::<_, RedisStoreError>(())
        })
        .await;
        let Ok(Err(RedisStoreError::Redis(err))) = attempt else {
            return Ok(());
        };
        if let Some(tls) = tls_failure(&err) {
            return Err(RedisSetupError::Tls {
                url,
                reason: tls.to_string(),
            });
        }
        if err.kind() == ErrorKind::AuthenticationFailed
            || err
                .code()
                .is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH")
        {
            return Err(RedisSetupError::Credentials {
                url,
                reason: err.to_string(),
            });
        }
        tracing::warn!(%url, error = %err, "Redis not reachable at start-up; answering UNAVAILABLE until it is");
        Ok(())
    }

    /// Whether Redis answers (a `PING`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", async {
            let mut conn = self.primary.conn().await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            Ok(())
        })
        .await
    }
}

impl RedisStore {
    /// A blob's swarm as Redis holds it now (entries of lapsed or earlier
    /// registrations left out; expired entries trimmed).
    async fn read_swarm(&self, blob: &BlobId) -> Result<Option<Swarm>, StoreError> {
        self.run("swarm", async {
            let hex = blob.to_string();
            let v = self
                .eval(&self.scripts.read, &blob_keys(self.prefix(), &hex), &[])
                .await?;
            let a = as_array(&v).ok_or_else(|| reply("swarm"))?;
            let trimmed = a.first().and_then(as_int).unwrap_or(0);
            let gone = a.get(1).and_then(as_int).unwrap_or(0);
            let sha = a
                .get(2)
                .and_then(as_str)
                .and_then(|s| s.parse::<Sha256Digest>().ok());
            if trimmed > 0 || gone > 0 {
                self.count(-gone, -trimmed).await?;
                if gone > 0
                    && let Some(sha) = sha
                {
                    let key = self.alias_key(&sha.to_string());
                    self.eval(&self.scripts.alias_forget, &[key], &[hex.as_bytes()])
                        .await?;
                }
            }
            let Some(size) = a.get(3).and_then(as_int) else {
                return Ok(None);
            };
            let data = a.get(4).and_then(as_array).ok_or_else(|| reply("swarm"))?;
            let mut entries = Vec::with_capacity(data.len() / 2);
            for pair in data.chunks_exact(2) {
                let (Some(peer), Some(value)) = (as_str(&pair[0]), as_bytes(&pair[1])) else {
                    continue;
                };
                let Some(bar) = value.iter().position(|&c| c == b'|') else {
                    continue;
                };
                entries.push((peer, &value[..bar], &value[bar + 1..]));
            }
            let ids: Vec<&str> = entries.iter().map(|e| e.0).collect();
            let snaps = self.snapshots_cached(&ids).await?;
            let holders = entries
                .iter()
                .zip(snaps)
                .filter_map(|((_, epoch, bits), snap)| {
                    let (peer, current) = snap?;
                    // An entry of an earlier registration is stale.
                    (current.as_bytes() == *epoch).then(|| Holding {
                        peer,
                        chunks: (!bits.is_empty()).then(|| Bytes::copy_from_slice(bits)),
                    })
                })
                .collect();
            Ok(Some(Swarm {
                meta: BlobMeta {
                    id: *blob,
                    size: size as u64,
                    sha256: sha,
                },
                holders,
            }))
        })
        .await
    }
}

fn parse_snapshot(id: &str, v: &Value, now: Instant) -> Option<(PeerSnapshot, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
