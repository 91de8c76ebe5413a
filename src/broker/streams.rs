//! Channel history in Redis: the keys of a channel's stream and meta hash, the arguments of the
//! scripts that append and read it ([`crate::broker::scripts`]), and what their replies and the
//! live messages they publish say.
//!
//! A live message published by the append script starts with `OFFSET_MAGIC`, the offset and a
//! newline, before the (origin-wrapped, [`crate::broker::origin`]) payload. Clients cannot forge
//! it: origin wrapping wraps any client payload that starts like a header
//! ([`crate::broker::origin::MAGIC_PREFIX`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp3::types::BytesFrame;

use super::history::{Page, Range};
use super::scripts;
use super::slots::key_beside;
use super::{origin, Message};

/// Starts a live message that carries its history offset.
pub const OFFSET_MAGIC: &[u8] = b"\0fanout-offset\0";

/// The meta hash and stream keys of the Redis channel `redis_channel` (prefix included), in its
/// hash slot.
pub fn keys(redis_channel: &[u8]) -> (Bytes, Bytes) {
    (
        key_beside(redis_channel, ":history-meta").into(),
        key_beside(redis_channel, ":history").into(),
    )
}

fn ms(ttl: Duration) -> Bytes {
    Bytes::from(ttl.as_millis().to_string())
}

/// EVALSHA of the append script: appends `payload` and publishes it on `redis_channel`.
pub fn append_args(
    redis_channel: Bytes,
    payload: Bytes,
    size: usize,
    ttl: Duration,
    sharded: bool,
) -> Vec<Bytes> {
    let (meta, stream) = keys(&redis_channel);
    vec![
        Bytes::from_static(b"EVALSHA"),
        scripts::PUBLISH.sha.clone(),
        Bytes::from_static(b"2"),
        meta,
        stream,
        redis_channel,
        payload,
        Bytes::from(size.max(1).to_string()),
        ms(ttl),
        Bytes::from_static(if sharded { b"1" } else { b"0" }),
    ]
}

/// EVALSHA of the read script.
pub fn read_args(redis_channel: &[u8], range: Range, most: usize, ttl: Duration) -> Vec<Bytes> {
    let (meta, stream) = keys(redis_channel);
    let (mode, offset): (&'static [u8], u64) = match range {
        Range::After(offset) => (b"since", offset),
        Range::Newest => (b"newest", 0),
    };
    vec![
        Bytes::from_static(b"EVALSHA"),
        scripts::READ.sha.clone(),
        Bytes::from_static(b"2"),
        meta,
        stream,
        Bytes::from_static(mode),
        Bytes::from(offset.to_string()),
        Bytes::from(most.to_string()),
        ms(ttl),
    ]
}

/// Splits a live message into its offset (0 when it has none: a channel without history, or
/// another Redis client's PUBLISH) and the rest.
pub fn unwrap_offset(payload: Bytes) -> (u64, Bytes) {
    if !payload.starts_with(OFFSET_MAGIC) {
        return (0, payload);
    }
    let rest = &payload[OFFSET_MAGIC.len()..];
    let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
        return (0, payload);
    };
    match std::str::from_utf8(&rest[..newline])
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(offset) => (offset, payload.slice(OFFSET_MAGIC.len() + newline + 1..)),
        None => (0, payload),
    }
}

fn text(frame: &BytesFrame) -> Option<&[u8]> {
    match frame {
        BytesFrame::BlobString { data, .. } => Some(data),
        BytesFrame::SimpleString { data, .. } => Some(data),
        _ => None,
    }
}

fn number(frame: &BytesFrame) -> Option<u64> {
    match frame {
        BytesFrame::Number { data, .. } => u64::try_from(*data).ok(),
        other => std::str::from_utf8(text(other)?).ok()?.parse().ok(),
    }
}

/// The offset the append script returned.
pub fn parse_offset(reply: &BytesFrame) -> Result<u64, String> {
    number(reply).ok_or_else(|| format!("unexpected reply to the history append: {reply:?}"))
}

/// Reads the read script's reply `{epoch, top, entries}` into a page of `channel` (its local
/// name). `newest` entries come newest first and are turned around. Payloads larger than
/// `max_message` (only another Redis client could have written them) are left out.
pub fn parse_page(
    reply: BytesFrame,
    channel: &Bytes,
    range: Range,
    max_message: usize,
) -> Result<Page, String> {
    let bad = || "unexpected reply to the history read".to_string();
    let BytesFrame::Array { data, .. } = reply else {
        return Err(bad());
    };
    let [epoch, top, entries] = <[BytesFrame; 3]>::try_from(data).map_err(|_| bad())?;
    let epoch: Arc<str> = String::from_utf8_lossy(text(&epoch).ok_or_else(bad)?).into();
    let top = number(&top).ok_or_else(bad)?;
    let BytesFrame::Array { data: entries, .. } = entries else {
        return Err(bad());
    };
    let mut messages = Vec::with_capacity(entries.len());
    for entry in entries {
        let BytesFrame::Array { data: parts, .. } = entry else {
            return Err(bad());
        };
        let [id, fields] = <[BytesFrame; 2]>::try_from(parts).map_err(|_| bad())?;
        let offset = text(&id)
            .and_then(|id| std::str::from_utf8(id).ok())
            .and_then(|id| id.strip_prefix("0-"))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(bad)?;
        let BytesFrame::Array { data: fields, .. } = fields else {
            return Err(bad());
        };
        let Some(payload) = fields.chunks(2).find_map(|kv| match kv {
            [k, BytesFrame::BlobString { data, .. }] if text(k) == Some(b"d") => Some(data.clone()),
            _ => None,
        }) else {
            continue;
        };
        let (from, payload) = origin::unwrap(payload);
        if payload.len() > max_message {
            continue;
        }
        let is_text = std::str::from_utf8(&payload).is_ok();
        let mut msg = Message::new(channel.clone(), &payload, is_text).with_from(from);
        msg.offset = offset;
        messages.push(msg);
    }
    if range == Range::Newest {
        messages.reverse();
    }
    Ok(Page {
        epoch,
        top,
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::slots::key_slot;

    #[test]
    fn keys_share_the_channels_slot() {
        for name in [&b"fanout:room"[..], b"{t}x", b"a}b"] {
            let (meta, stream) = keys(name);
            assert_eq!(key_slot(&meta), key_slot(name));
            assert_eq!(key_slot(&stream), key_slot(name));
            assert_ne!(meta, stream);
        }
    }

    #[test]
    fn offsets_come_off_live_messages() {
        let mut live = OFFSET_MAGIC.to_vec();
        live.extend_from_slice(b"42\nhello");
        let (offset, rest) = unwrap_offset(Bytes::from(live));
        assert_eq!(offset, 42);
        assert_eq!(&rest[..], b"hello");
        let (offset, rest) = unwrap_offset(Bytes::from_static(b"plain"));
        assert_eq!((offset, &rest[..]), (0, &b"plain"[..]));
        let mut broken = OFFSET_MAGIC.to_vec();
        broken.extend_from_slice(b"x\nhello");
        assert_eq!(unwrap_offset(Bytes::from(broken)).0, 0);
    }
}
