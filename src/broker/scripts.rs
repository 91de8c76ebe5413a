//! The Lua scripts fanout runs in Redis, loaded on every link at its handshake
//! ([`crate::broker::redis`]) and called by SHA1 (EVALSHA), so a publish sends its payload and
//! a few short arguments, not the script.
//!
//! Each script touches only keys named by [`crate::broker::slots::key_beside`] from one channel,
//! so in a Redis Cluster everything it does (the stream, its meta hash, the SPUBLISH) is in the
//! channel's slot, on the one master that owns it.

use std::sync::LazyLock;

use sha1::{Digest, Sha1};

/// One script: its source and the SHA1 Redis names it by.
pub struct Script {
    pub body: String,
    pub sha: String,
}

impl Script {
    fn new(parts: &[&str]) -> Script {
        let body = parts.concat();
        let sha = sha_hex(&body);
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
epoch_of(meta, stream)
local offset = redis.call('HINCRBY', meta, 's', 1)
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], '0-' .. offset, 'd', ARGV[2])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', stream, ttl)
else
  redis.call('PERSIST', meta)
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

/// Every script, in the order the handshake loads them.
pub static ALL: LazyLock<[&'static Script; 2]> = LazyLock::new(|| [&*PUBLISH, &*READ]);

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
