//! The Lua scripts: every multi-step update of one record is one script
//! on that record's slot.

use redis::Script;

const NOW: &str = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// The Lua scripts, each touching the keys of one record only.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) register: Script,
    pub(super) renew: Script,
    pub(super) set_horizon: Script,
    pub(super) inventory: Script,
    pub(super) upsert: Script,
    pub(super) drop: Script,
    pub(super) read: Script,
    pub(super) snapshot: Script,
    pub(super) set_health: Script,
    pub(super) set_standing: Script,
    pub(super) report: Script,
    pub(super) purge_begin: Script,
    pub(super) purge_end: Script,
    pub(super) deregister: Script,
    pub(super) index_forget: Script,
    pub(super) alias_claim: Script,
    pub(super) alias_unclaim: Script,
    pub(super) alias_forget: Script,
    pub(super) replicas: Script,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{NOW}{body}"))
}

impl Scripts {
    pub(super) fn new() -> Self {
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
pub(super) struct Call {
    pub(super) keys: Vec<String>,
    pub(super) args: Vec<Vec<u8>>,
}
