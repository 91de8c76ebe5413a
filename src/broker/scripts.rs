//! The Lua scripts fanout runs in Redis, loaded on every link at its handshake
//! ([`crate::broker::redis`]) and called by SHA1 (EVALSHA), so a publish sends its payload and
//! a few short arguments, not the script.
//!
//! Each script touches only keys named by [`crate::broker::slots::key_beside`] from one channel,
//! so in a Redis Cluster everything it does (the stream, its meta hash, the SPUBLISH) is in the
//! channel's slot, on the one master that owns it.

use std::sync::LazyLock;

use bytes::Bytes;
use sha1::{Digest, Sha1};

/// One script: its source and the SHA1 Redis names it by.
pub struct Script {
    pub body: String,
    /// Shared, so each EVALSHA takes it with a reference-count increment, not a copy.
    pub sha: Bytes,
}

impl Script {
    fn new(parts: &[&str]) -> Script {
        let body = parts.concat();
        let sha = Bytes::from(sha_hex(&body));
        Script { body, sha }
    }
}

fn sha_hex(body: &str) -> String {
    Sha1::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Creates the channel's epoch when its meta hash is gone (never made, expired, or lost with a
/// Redis restarted without persistence): a new epoch, the offset back to 0 and the stream
/// emptied, since offsets of the old epoch mean nothing in the new one.
const NEW_EPOCH: &str = r#"
local function epoch_of(meta, stream)
  local epoch = redis.call('HGET', meta, 'e')
  if epoch then return epoch, false end
  redis.call('DEL', stream)
  local t = redis.call('TIME')
  epoch = string.format('%x.%x', tonumber(t[1]), tonumber(t[2]))
  redis.call('HSET', meta, 'e', epoch, 's', 0)
  return epoch, true
end
"#;

/// Appends a message to a channel's history and publishes it, atomically, so the live message
/// carries the offset it has in the stream.
/// KEYS: meta hash, stream. ARGV: Redis channel, payload, history size, TTL in ms (0: none),
/// `1` for SPUBLISH (a cluster). Returns the offset.
pub static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&[
        NEW_EPOCH,
        r#"
local meta, stream = KEYS[1], KEYS[2]
local ttl = tonumber(ARGV[4])
-- Offset 1 is the first publish of an epoch: only then can the epoch be missing (the meta hash
-- was gone) or carry a read's provisional expiry. Every redis.call costs a few microseconds of
-- Lua machinery, so the usual publish makes five (PERF.md, "Channel history").
local offset = redis.call('HINCRBY', meta, 's', 1)
if offset == 1 then
  if not redis.call('HGET', meta, 'e') then
    epoch_of(meta, stream)
    offset = redis.call('HINCRBY', meta, 's', 1)
  end
  if ttl <= 0 then redis.call('PERSIST', meta) end
end
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], '0-' .. offset, 'd', ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', stream, ttl)
end
local live = '\0fanout-offset\0' .. offset .. '\n' .. ARGV[2]
if ARGV[5] == '1' then
  redis.call('SPUBLISH', ARGV[1], live)
else
  redis.call('PUBLISH', ARGV[1], live)
end
return offset
"#,
    ])
});

/// Reads a channel's history: its epoch and newest offset, and entries either after an offset
/// (`since`) or the newest ones (`newest`), oldest first. A channel without history gets its
/// epoch here, so a subscriber learns one before the first publish; that meta hash expires
/// after the TTL (a day when the namespace keeps history forever: publishing makes it persist).
/// KEYS: meta hash, stream. ARGV: `since` or `newest`, the offset (for `since`), the most
/// entries, the TTL in ms. Returns {epoch, offset, {{id, {"d", payload}}, ...}}.
pub static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&[
        NEW_EPOCH,
        r#"
local meta, stream = KEYS[1], KEYS[2]
local epoch, fresh = epoch_of(meta, stream)
if fresh then
  local ttl = tonumber(ARGV[4])
  if ttl <= 0 then ttl = 86400000 end
  redis.call('PEXPIRE', meta, ttl)
end
local top = tonumber(redis.call('HGET', meta, 's')) or 0
local most = tonumber(ARGV[3])
local entries = {}
if most > 0 then
  if ARGV[1] == 'since' then
    entries = redis.call('XRANGE', stream, '(0-' .. ARGV[2], '+', 'COUNT', most)
  else
    entries = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', most)
  end
end
return {epoch, top, entries}
"#,
    ])
});

// --- Presence (see `broker::presence` for the key layout) -------------------------------
//
// KEYS: members hash, nodes sorted set, users hash. ARGV: node id, TTL in ms, Redis channel,
// `1` for SPUBLISH (a cluster), then the script's own. Times are the Redis server's (TIME),
// so the nodes' clocks never matter. Every script first drops the nodes that stopped
// refreshing (`clean`), with a leave event for each of their members.

const PRESENCE_COMMON: &str = r#"
local H, Z, U = KEYS[1], KEYS[2], KEYS[3]
local node, ttl, chan, sharded = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function event(op, json)
  local payload = '\0fanout-presence\0' .. op .. '\n' .. json
  if sharded == '1' then
    redis.call('SPUBLISH', chan, payload)
  else
    redis.call('PUBLISH', chan, payload)
  end
end
local function user_of(json)
  local ok, m = pcall(cjson.decode, json)
  if ok and type(m) == 'table' and type(m.user) == 'string' then return m.user end
  return nil
end
local function add(field, json)
  if redis.call('HSET', H, field, json) == 1 then
    local user = user_of(json)
    if user then redis.call('HINCRBY', U, user, 1) end
    return true
  end
  return false
end
local function del(field)
  local json = redis.call('HGET', H, field)
  if not json then return nil end
  redis.call('HDEL', H, field)
  local user = user_of(json)
  if user and redis.call('HINCRBY', U, user, -1) <= 0 then redis.call('HDEL', U, user) end
  return json
end
local function node_of(field)
  return string.match(field, '^[^.]*')
end
local function clean(now)
  local stale = redis.call('ZRANGEBYSCORE', Z, '-inf', '(' .. string.format('%d', now - ttl))
  if #stale == 0 then return end
  local dead = {}
  for _, n in ipairs(stale) do
    dead[n] = true
    redis.call('ZREM', Z, n)
  end
  for _, f in ipairs(redis.call('HKEYS', H)) do
    if dead[node_of(f)] then
      local json = del(f)
      if json then event('leave', json) end
    end
  end
end
local function keep(now)
  local added = redis.call('ZADD', Z, string.format('%d', now), node)
  redis.call('PEXPIRE', H, ttl)
  redis.call('PEXPIRE', Z, ttl)
  redis.call('PEXPIRE', U, ttl)
  return added
end
local now = now_ms()
clean(now)
"#;

/// A member joins. ARGV 5, 6: client id, member JSON. Returns 1 when the node was not among
/// the channel's nodes (its other members may be gone: the node writes them again).
pub static PRESENCE_JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&[
        PRESENCE_COMMON,
        r#"
local fresh = add(ARGV[5], ARGV[6])
local added = keep(now)
if fresh then event('join', ARGV[6]) end
return added
"#,
    ])
});

/// A member leaves. ARGV 5, 6: client id, `1` when it was the node's last in the channel.
pub static PRESENCE_LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&[
        PRESENCE_COMMON,
        r#"
local json = del(ARGV[5])
if json then event('leave', json) end
if ARGV[6] == '1' then
  redis.call('ZREM', Z, node)
else
  keep(now)
end
return 0
"#,
    ])
});

/// The node is alive and still has members here. Returns 1 when it was not among the
/// channel's nodes (Redis lost the keys, or the node was dropped as stale).
pub static PRESENCE_REFRESH: LazyLock<Script> =
    LazyLock::new(|| Script::new(&[PRESENCE_COMMON, "return keep(now)\n"]));

/// Writes the node's members again as a whole. ARGV 5...: client id, member JSON pairs.
/// Members added get a join event, the node's members Redis had and the node does not a
/// leave event.
pub static PRESENCE_SYNC: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&[
        PRESENCE_COMMON,
        r#"
local want = {}
local any = false
for i = 5, #ARGV - 1, 2 do
  want[ARGV[i]] = ARGV[i + 1]
  any = true
end
for _, f in ipairs(redis.call('HKEYS', H)) do
  if node_of(f) == node and not want[f] then
    local json = del(f)
    if json then event('leave', json) end
  end
end
for f, json in pairs(want) do
  if add(f, json) then event('join', json) end
end
if not any then
  redis.call('ZREM', Z, node)
  return 0
end
keep(now)
return 0
"#,
    ])
});

/// Reads a channel's presence. ARGV 5: the most members to list (0: counts only). Returns
/// {clients, users, {member JSON, ...}}; a channel with more clients than listed gets a random
/// sample of them (HRANDFIELD: the cost stays O(listed), not O(clients)).
pub static PRESENCE_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&[
        PRESENCE_COMMON,
        r#"
local max = tonumber(ARGV[5])
local clients = redis.call('HLEN', H)
local users = redis.call('HLEN', U)
local list = {}
if max > 0 then
  if clients <= max then
    list = redis.call('HVALS', H)
  else
    local kv = redis.call('HRANDFIELD', H, max, 'WITHVALUES')
    for i = 2, #kv, 2 do list[#list + 1] = kv[i] end
  end
end
return {clients, users, list}
"#,
    ])
});

/// Every script, in the order the handshake loads them.
pub static ALL: LazyLock<[&'static Script; 7]> = LazyLock::new(|| {
    [
        &*PUBLISH,
        &*READ,
        &*PRESENCE_JOIN,
        &*PRESENCE_LEAVE,
        &*PRESENCE_REFRESH,
        &*PRESENCE_SYNC,
        &*PRESENCE_READ,
    ]
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sha_is_what_redis_computes() {
        // `redis-cli SCRIPT LOAD "return 1"` answers this.
        assert_eq!(
            sha_hex("return 1"),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
        assert_eq!(PUBLISH.sha.len(), 40);
        assert_ne!(PUBLISH.sha, READ.sha);
    }
}
