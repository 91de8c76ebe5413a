//! Redis Cluster's map of hash slots to shards: which slot a channel name hashes to (CRC16 with
//! hash tags, as Redis computes `CLUSTER KEYSLOT`) and which master owns each slot, read from a
//! `CLUSTER SHARDS` reply.
//!
//! Pure data, no I/O: [`crate::broker::cluster`] asks for the topology and acts on it.

use std::net::{IpAddr, SocketAddr};

use redis_protocol::resp3::types::BytesFrame;

/// Hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the checksum Redis Cluster uses.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of a key or shard channel. Only the part between the first `{` and the next
/// `}` is hashed when it is not empty, so `{room}.chat` and `{room}.typing` share a slot.
pub fn key_slot(name: &[u8]) -> u16 {
    let hashed = match name.iter().position(|&b| b == b'{') {
        Some(open) => match name[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &name[open + 1..open + 1 + len],
            _ => name,
        },
        None => name,
    };
    crc16(hashed) % SLOTS as u16
}

/// A key in the same hash slot as the channel (or key) `name`, named after it: `name` plus
/// `suffix`. Keys a Lua script touches together with a shard channel must share its slot; with
/// one Redis it does not matter, and the same names are used.
///
/// - `name` has a hash tag: appending keeps it (`{room}x` -> `{room}x:suffix`).
/// - otherwise, if `name` holds no `}`, the whole name becomes the tag (`room` -> `{room}:suffix`).
/// - otherwise (a `}` with no tag before it, as in `a}b`) no tag can quote the name, so a short
///   tag with the same slot is searched for (`{1f3}a}b:suffix`).
pub fn key_beside(name: &[u8], suffix: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + suffix.len() + 8);
    if has_tag(name) {
        key.extend_from_slice(name);
    } else if !name.is_empty() && !name.contains(&b'}') {
        key.push(b'{');
        key.extend_from_slice(name);
        key.push(b'}');
    } else {
        key.push(b'{');
        key.extend_from_slice(tag_for_slot(key_slot(name)).as_bytes());
        key.push(b'}');
        key.extend_from_slice(name);
    }
    key.extend_from_slice(suffix.as_bytes());
    key
}

/// Whether `name` has a non-empty hash tag (so only the tag is hashed).
fn has_tag(name: &[u8]) -> bool {
    name.iter().position(|&b| b == b'{').is_some_and(|open| {
        name[open + 1..]
            .iter()
            .position(|&b| b == b'}')
            .is_some_and(|len| len > 0)
    })
}

/// The first hexadecimal number whose CRC16 falls in `slot`. Every slot has one below 2^20
/// (checked by a test); about 16384 tries on average, only for names no tag can quote.
fn tag_for_slot(slot: u16) -> String {
    (0u32..1 << 20)
        .map(|i| format!("{i:x}"))
        .find(|t| key_slot(t.as_bytes()) == slot)
        .unwrap_or_default()
}

/// One shard's master as `CLUSTER SHARDS` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub addr: SocketAddr,
    /// Inclusive slot ranges the shard owns.
    pub slots: Vec<(u16, u16)>,
}

/// Reads a `CLUSTER SHARDS` reply: one [`ShardInfo`] per shard that owns slots and has a master
/// with a usable address. Addresses are IPs (what Redis announces by default); a shard whose
/// master announces only a host name is skipped with the reason, since the reactor cannot
/// block on DNS. A node that does not know its own address (a lone master reports `""`) is
/// the one that answered: `answered_by`, as Redis's documentation tells clients.
pub fn parse_shards(
    reply: &BytesFrame,
    tls: bool,
    answered_by: IpAddr,
) -> Result<Vec<ShardInfo>, String> {
    let BytesFrame::Array { data: shards, .. } = reply else {
        return Err(format!("CLUSTER SHARDS: expected an array, got {reply:?}"));
    };
    let mut out = Vec::new();
    for shard in shards {
        let slots = match field(shard, "slots") {
            Some(BytesFrame::Array { data, .. }) => data,
            _ => return Err("CLUSTER SHARDS: a shard without \"slots\"".into()),
        };
        let numbers: Vec<i64> = slots.iter().filter_map(number).collect();
        if numbers.len() != slots.len() || numbers.len() % 2 != 0 {
            return Err("CLUSTER SHARDS: \"slots\" is not a list of start/end pairs".into());
        }
        let mut ranges = Vec::new();
        for pair in numbers.chunks_exact(2) {
            let (start, end) = (pair[0], pair[1]);
            if !(0..SLOTS as i64).contains(&start) || !(start..SLOTS as i64).contains(&end) {
                return Err(format!("CLUSTER SHARDS: bad slot range {start}-{end}"));
            }
            ranges.push((start as u16, end as u16));
        }
        if ranges.is_empty() {
            // A master that owns nothing (just added, or emptied): nothing to subscribe there.
            continue;
        }
        let nodes = match field(shard, "nodes") {
            Some(BytesFrame::Array { data, .. }) => data,
            _ => return Err("CLUSTER SHARDS: a shard without \"nodes\"".into()),
        };
        let master = nodes.iter().find(|n| {
            text(field(n, "role")).as_deref() == Some("master")
                && text(field(n, "health")).as_deref() != Some("failed")
        });
        let Some(master) = master else {
            log::debug!("redis cluster: a shard has no healthy master yet");
            continue;
        };
        let port_field = if tls { "tls-port" } else { "port" };
        let port = field(master, port_field)
            .and_then(number)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0);
        let announced: Vec<String> = ["endpoint", "ip"]
            .iter()
            .filter_map(|k| text(field(master, k)))
            .collect();
        let ip = if announced.iter().all(|h| h.is_empty()) {
            Some(answered_by)
        } else {
            announced.iter().find_map(|h| h.parse::<IpAddr>().ok())
        };
        match (ip, port) {
            (Some(ip), Some(port)) => out.push(ShardInfo {
                addr: SocketAddr::new(ip, port),
                slots: ranges,
            }),
            _ => log::warn!(
                "redis cluster: a master announces no usable {} address ({:?}); its slots are skipped",
                if tls { "TLS" } else { "IP" },
                text(field(master, "endpoint"))
            ),
        }
    }
    Ok(out)
}

/// A field of a RESP3 map, or of the flat `[key, value, ...]` array RESP2 would give.
fn field<'a>(frame: &'a BytesFrame, name: &str) -> Option<&'a BytesFrame> {
    match frame {
        BytesFrame::Map { data, .. } => data
            .iter()
            .find(|(k, _)| text(Some(k)).as_deref() == Some(name))
            .map(|(_, v)| v),
        BytesFrame::Array { data, .. } => data
            .chunks_exact(2)
            .find(|kv| text(Some(&kv[0])).as_deref() == Some(name))
            .map(|kv| &kv[1]),
        _ => None,
    }
}

fn text(frame: Option<&BytesFrame>) -> Option<String> {
    match frame? {
        BytesFrame::BlobString { data, .. } | BytesFrame::SimpleString { data, .. } => {
            Some(String::from_utf8_lossy(data).into_owned())
        }
        _ => None,
    }
}

fn number(frame: &BytesFrame) -> Option<i64> {
    match frame {
        BytesFrame::Number { data, .. } => Some(*data),
        BytesFrame::BlobString { data, .. } | BytesFrame::SimpleString { data, .. } => {
            std::str::from_utf8(data).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// Parses the `slot host:port` of a `MOVED` error (`MOVED 3999 127.0.0.1:6381`).
pub fn parse_moved(error: &str) -> Option<(u16, SocketAddr)> {
    let mut parts = error.strip_prefix("MOVED ")?.split_whitespace();
    let slot: u16 = parts.next()?.parse().ok()?;
    let target = parts.next()?;
    let (host, port) = target.rsplit_once(':')?;
    let ip: IpAddr = host.trim_matches(['[', ']']).parse().ok()?;
    (usize::from(slot) < SLOTS).then_some((slot, SocketAddr::new(ip, port.parse().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn slots_match_redis() {
        // Values from `redis-cli CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{}x"), crc16(b"{}x") % 16384);
        assert_eq!(key_slot(b"a{b"), crc16(b"a{b") % 16384);
        assert_eq!(key_slot(b""), 0);
    }

    fn blob(s: &str) -> BytesFrame {
        BytesFrame::BlobString {
            data: Bytes::copy_from_slice(s.as_bytes()),
            attributes: None,
        }
    }

    fn num(n: i64) -> BytesFrame {
        BytesFrame::Number {
            data: n,
            attributes: None,
        }
    }

    fn map(kv: Vec<(&str, BytesFrame)>) -> BytesFrame {
        BytesFrame::Map {
            data: kv.into_iter().map(|(k, v)| (blob(k), v)).collect(),
            attributes: None,
        }
    }

    fn array(items: Vec<BytesFrame>) -> BytesFrame {
        BytesFrame::Array {
            data: items,
            attributes: None,
        }
    }

    #[test]
    fn shards_reply() {
        let node = |role: &str, port: i64, health: &str| {
            map(vec![
                ("id", blob("x")),
                ("port", num(port)),
                ("ip", blob("127.0.0.1")),
                ("endpoint", blob("127.0.0.1")),
                ("role", blob(role)),
                ("health", blob(health)),
            ])
        };
        let reply = array(vec![
            map(vec![
                (
                    "slots",
                    array(vec![num(0), num(5460), num(10923), num(10930)]),
                ),
                (
                    "nodes",
                    array(vec![
                        node("replica", 7004, "online"),
                        node("master", 7000, "online"),
                    ]),
                ),
            ]),
            map(vec![
                ("slots", array(vec![])),
                ("nodes", array(vec![node("master", 7009, "online")])),
            ]),
            map(vec![
                ("slots", array(vec![num(5461), num(10922)])),
                ("nodes", array(vec![node("master", 7001, "failed")])),
            ]),
        ]);
        let local: IpAddr = "127.0.0.9".parse().unwrap();
        let shards = parse_shards(&reply, false, local).unwrap();
        assert_eq!(
            shards,
            [ShardInfo {
                addr: "127.0.0.1:7000".parse().unwrap(),
                slots: vec![(0, 5460), (10923, 10930)],
            }]
        );
        assert!(parse_shards(&num(1), false, local).is_err());
        let bad = array(vec![map(vec![("slots", array(vec![num(5), num(1)]))])]);
        assert!(parse_shards(&bad, false, local).is_err());
        // A lone master does not know its address: it is the node that answered.
        let lone = array(vec![map(vec![
            ("slots", array(vec![num(0), num(16383)])),
            (
                "nodes",
                array(vec![map(vec![
                    ("port", num(7000)),
                    ("ip", blob("")),
                    ("endpoint", blob("")),
                    ("role", blob("master")),
                    ("health", blob("online")),
                ])]),
            ),
        ])]);
        let shards = parse_shards(&lone, false, local).unwrap();
        assert_eq!(shards[0].addr, "127.0.0.9:7000".parse().unwrap());
    }

    #[test]
    fn moved_errors() {
        assert_eq!(
            parse_moved("MOVED 3999 127.0.0.1:6381"),
            Some((3999, "127.0.0.1:6381".parse().unwrap()))
        );
        assert_eq!(parse_moved("MOVED 1 [::1]:7000").map(|m| m.0), Some(1));
        assert_eq!(parse_moved("MOVED 99999 127.0.0.1:1"), None);
        assert_eq!(parse_moved("ASK 1 127.0.0.1:1"), None);
        assert_eq!(parse_moved("MOVED x"), None);
    }

    #[test]
    fn a_key_beside_a_channel_shares_its_slot() {
        for name in [
            &b"room"[..],
            b"fanout:room",
            b"{tag}rest",
            b"pre{tag}post{x}",
            b"a}b",
            b"x{}y",
            b"{}",
            b"}",
            b"{",
            b"",
            b"user:#42",
        ] {
            let key = key_beside(name, ":history");
            assert_eq!(
                key_slot(&key),
                key_slot(name),
                "{:?} -> {:?}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(&key)
            );
            assert!(key.ends_with(b":history"));
        }
    }

    #[test]
    fn every_slot_has_a_short_tag() {
        let mut seen = vec![false; SLOTS];
        for i in 0u32..1 << 20 {
            seen[usize::from(key_slot(format!("{i:x}").as_bytes()))] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
