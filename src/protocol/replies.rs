//! What the server sends a JSON client: `ok` and `error` replies, the delivery envelope, and the
//! answers of the history and presence commands. Each is one WebSocket text frame, built once
//! (a delivery once per message per reactor, never per subscriber).

use bytes::Bytes;

use crate::ws::frame::encode;
use crate::ws::OpCode;

/// `{"op":"ok","id":N}` (or without `id`), as one WebSocket text frame.
pub fn ok_reply(id: Option<&str>) -> Bytes {
    let mut body = Vec::with_capacity(32);
    body.extend_from_slice(b"{\"op\":\"ok\"");
    push_id(&mut body, id);
    body.push(b'}');
    encode(OpCode::Text, &body)
}

/// `{"op":"error","id":N,"error":"..."}`, as one WebSocket text frame.
pub fn error_reply(id: Option<&str>, message: &str) -> Bytes {
    let mut body = Vec::with_capacity(64 + message.len());
    body.extend_from_slice(b"{\"op\":\"error\"");
    push_id(&mut body, id);
    body.extend_from_slice(b",\"error\":");
    serde_json::to_writer(&mut body, message).expect("writing a str to a Vec cannot fail");
    body.push(b'}');
    encode(OpCode::Text, &body)
}

fn push_id(body: &mut Vec<u8>, id: Option<&str>) {
    if let Some(id) = id {
        body.extend_from_slice(b",\"id\":");
        body.extend_from_slice(id.as_bytes());
    }
}

/// Builds the delivery `{"op":"message","channel":C,"data":D}` as one text frame. Called once per
/// message per reactor, never per subscriber. `scratch` is reused between calls.
pub fn envelope(channel: &[u8], payload: &[u8], scratch: &mut Vec<u8>) -> Bytes {
    envelope_from(channel, payload, None, 0, scratch)
}

/// Who published a message, as a delivery names them: the token's `sub` and its `info` claim
/// (verbatim JSON).
#[derive(Debug, Clone, Copy)]
pub struct Author<'a> {
    pub user: &'a str,
    pub info: Option<&'a str>,
}

/// [`envelope`] of a message an authenticated client published: `"user"` (the token's `sub`)
/// and `"info"` (its `info` claim) are set by the server, never taken from the payload.
///
/// `offset` (not 0) is the message's place in the channel's history, sent as `"offset"`.
pub fn envelope_from(
    channel: &[u8],
    payload: &[u8],
    from: Option<Author<'_>>,
    offset: u64,
    scratch: &mut Vec<u8>,
) -> Bytes {
    scratch.clear();
    scratch.extend_from_slice(b"{\"op\":\"message\",\"channel\":\"");
    // Channel names are validated to need no escaping.
    scratch.extend_from_slice(channel);
    scratch.extend_from_slice(b"\",");
    push_message_fields(scratch, payload, from, offset);
    scratch.push(b'}');
    encode(OpCode::Text, scratch)
}

/// `"data":...` (with `"encoding"` for binary), `"user"`, `"info"` and `"offset"` as they apply:
/// what a delivery and a history entry say of one message.
fn push_message_fields(out: &mut Vec<u8>, payload: &[u8], from: Option<Author<'_>>, offset: u64) {
    out.extend_from_slice(b"\"data\":");
    if is_json(payload) {
        out.extend_from_slice(payload);
    } else if let Ok(text) = std::str::from_utf8(payload) {
        serde_json::to_writer(&mut *out, text).expect("writing to a Vec cannot fail");
    } else {
        out.push(b'"');
        base64_encode(payload, out);
        out.extend_from_slice(b"\",\"encoding\":\"base64\"");
    }
    if let Some(from) = from {
        out.extend_from_slice(b",\"user\":");
        serde_json::to_writer(&mut *out, from.user).expect("writing to a Vec cannot fail");
        if let Some(info) = from.info {
            out.extend_from_slice(b",\"info\":");
            out.extend_from_slice(info.as_bytes());
        }
    }
    if offset != 0 {
        out.extend_from_slice(b",\"offset\":");
        out.extend_from_slice(offset.to_string().as_bytes());
    }
}

/// The `ok` of a subscribe on a channel with history: the channel's newest offset and epoch,
/// and with `since` whether every message after it follows (`recovered`).
pub fn subscribed_reply(
    id: Option<&str>,
    offset: u64,
    epoch: &str,
    recovered: Option<bool>,
) -> Bytes {
    let mut body = Vec::with_capacity(96 + epoch.len());
    body.extend_from_slice(b"{\"op\":\"ok\"");
    push_id(&mut body, id);
    body.extend_from_slice(format!(",\"offset\":{offset},\"epoch\":").as_bytes());
    serde_json::to_writer(&mut body, epoch).expect("writing a str to a Vec cannot fail");
    if let Some(recovered) = recovered {
        body.extend_from_slice(format!(",\"recovered\":{recovered}").as_bytes());
    }
    body.push(b'}');
    encode(OpCode::Text, &body)
}

/// One message of a history answer: its offset, payload and publisher.
pub struct Kept<'a> {
    pub offset: u64,
    pub payload: &'a [u8],
    pub from: Option<Author<'a>>,
}

/// The JSON object `{"channel","epoch","offset","messages":[...]}` of a history answer, oldest
/// message first, without the closing brace (the WebSocket reply and the server API add their
/// own fields). Past `max_bytes` the oldest messages are left out and `"truncated":true` says
/// so: what one command can make the server build is bounded by the client's queue.
pub fn history_body<'a>(
    out: &mut Vec<u8>,
    channel: &[u8],
    epoch: &str,
    top: u64,
    messages: impl DoubleEndedIterator<Item = Kept<'a>>,
    max_bytes: usize,
) {
    out.extend_from_slice(b"\"channel\":\"");
    out.extend_from_slice(channel);
    out.extend_from_slice(b"\",\"epoch\":");
    serde_json::to_writer(&mut *out, epoch).expect("writing a str to a Vec cannot fail");
    out.extend_from_slice(format!(",\"offset\":{top},\"messages\":[").as_bytes());
    // Newest first into a side buffer, so the budget drops the oldest; then turned around.
    let start = out.len();
    let mut items: Vec<std::ops::Range<usize>> = Vec::new();
    let mut truncated = false;
    let mut tail = Vec::new();
    for m in messages.rev() {
        let at = tail.len();
        tail.push(b'{');
        push_message_fields(&mut tail, m.payload, m.from, m.offset);
        tail.push(b'}');
        if start + tail.len() + items.len() > max_bytes {
            tail.truncate(at);
            truncated = true;
            break;
        }
        items.push(at..tail.len());
    }
    for (i, range) in items.into_iter().rev().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&tail[range]);
    }
    out.push(b']');
    if truncated {
        out.extend_from_slice(b",\"truncated\":true");
    }
}

/// `{"op":"history","id":N,"channel":...,"epoch":...,"offset":...,"messages":[...]}`.
pub fn history_reply<'a>(
    id: Option<&str>,
    channel: &[u8],
    epoch: &str,
    top: u64,
    messages: impl DoubleEndedIterator<Item = Kept<'a>>,
    max_bytes: usize,
    scratch: &mut Vec<u8>,
) -> Bytes {
    scratch.clear();
    scratch.extend_from_slice(b"{\"op\":\"history\"");
    push_id(scratch, id);
    scratch.push(b',');
    history_body(scratch, channel, epoch, top, messages, max_bytes);
    scratch.push(b'}');
    encode(OpCode::Text, scratch)
}

// --- Presence replies (reactor::presence) ----------------------------------------------

/// `{"op":"presence","id":N,"channel":"c","clients":[...]}` with `"truncated":true` when the
/// channel has more clients than listed. `members` are member JSON objects
/// (`broker::presence::member_json`).
pub fn presence_reply<'a>(
    id: Option<&str>,
    channel: &[u8],
    members: impl Iterator<Item = &'a [u8]>,
    truncated: bool,
    scratch: &mut Vec<u8>,
) -> Bytes {
    scratch.clear();
    scratch.extend_from_slice(b"{\"op\":\"presence\"");
    push_id(scratch, id);
    scratch.extend_from_slice(b",\"channel\":\"");
    scratch.extend_from_slice(channel);
    scratch.extend_from_slice(b"\",\"clients\":[");
    for (i, m) in members.enumerate() {
        if i > 0 {
            scratch.push(b',');
        }
        scratch.extend_from_slice(m);
    }
    scratch.push(b']');
    if truncated {
        scratch.extend_from_slice(b",\"truncated\":true");
    }
    scratch.push(b'}');
    encode(OpCode::Text, scratch)
}

/// `{"op":"presence_stats","id":N,"channel":"c","clients":N,"users":M}`.
pub fn presence_stats_reply(id: Option<&str>, channel: &[u8], clients: u64, users: u64) -> Bytes {
    let mut body = Vec::with_capacity(80 + channel.len());
    body.extend_from_slice(b"{\"op\":\"presence_stats\"");
    push_id(&mut body, id);
    body.extend_from_slice(b",\"channel\":\"");
    body.extend_from_slice(channel);
    body.extend_from_slice(format!("\",\"clients\":{clients},\"users\":{users}}}").as_bytes());
    encode(OpCode::Text, &body)
}

// --- End of presence replies ------------------------------------------------------------

fn is_json(payload: &[u8]) -> bool {
    // Skipping into IgnoredAny does not check that string contents are UTF-8, and the envelope
    // goes out as a text frame: invalid UTF-8 in it makes browsers drop the connection (1007).
    // Nor does it decode `\u` escapes, so a lone surrogate (`"\ud800"`) would pass; the rare
    // payload with an escape is checked in full.
    !payload.is_empty()
        && std::str::from_utf8(payload).is_ok()
        && if payload.windows(2).any(|w| w == b"\\u") {
            serde_json::from_slice::<serde_json::Value>(payload).is_ok()
        } else {
            serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
        }
}

fn base64_encode(input: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in input.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]);
            } else {
                out.push(b'=');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::FrameHeader;

    fn body(frame: &Bytes) -> &str {
        let h = FrameHeader::parse(frame, false, u64::MAX >> 1)
            .unwrap()
            .unwrap();
        std::str::from_utf8(&frame[h.header_len..]).unwrap()
    }

    #[test]
    fn replies() {
        assert_eq!(body(&ok_reply(Some("3"))), r#"{"op":"ok","id":3}"#);
        assert_eq!(body(&ok_reply(None)), r#"{"op":"ok"}"#);
        assert_eq!(
            body(&error_reply(Some("\"a\""), "bad \"x\"")),
            r#"{"op":"error","id":"a","error":"bad \"x\""}"#
        );
    }

    #[test]
    fn envelopes_follow_the_payload_rules() {
        let mut s = Vec::new();
        let e = envelope(b"c", b"hello", &mut s);
        assert_eq!(body(&e), r#"{"op":"message","channel":"c","data":"hello"}"#);
        let e = envelope(b"c", br#"{"a":1}"#, &mut s);
        assert_eq!(body(&e), r#"{"op":"message","channel":"c","data":{"a":1}}"#);
        // A lone surrogate is not JSON: it travels as a string.
        let e = envelope(b"c", br#""\ud800""#, &mut s);
        assert_eq!(
            body(&e),
            r#"{"op":"message","channel":"c","data":"\"\\ud800\""}"#
        );
        let e = envelope(b"c", b"", &mut s);
        assert_eq!(body(&e), r#"{"op":"message","channel":"c","data":""}"#);
        let e = envelope(b"c", &[0xff, 0x00, 0x10], &mut s);
        assert_eq!(
            body(&e),
            r#"{"op":"message","channel":"c","data":"/wAQ","encoding":"base64"}"#
        );
    }

    #[test]
    fn a_history_answer_over_its_budget_keeps_the_newest() {
        let payloads: Vec<String> = (1..=100).map(|i| format!("message {i:03}")).collect();
        let kept = || {
            payloads.iter().enumerate().map(|(i, p)| Kept {
                offset: i as u64 + 1,
                payload: p.as_bytes(),
                from: None,
            })
        };
        let mut scratch = Vec::new();
        let whole = history_reply(Some("1"), b"c", "e", 100, kept(), usize::MAX, &mut scratch);
        let v: serde_json::Value = serde_json::from_str(body(&whole)).unwrap();
        assert_eq!(v["messages"].as_array().unwrap().len(), 100);
        assert!(v.get("truncated").is_none());
        let cut = history_reply(Some("1"), b"c", "e", 100, kept(), 600, &mut scratch);
        assert!(body(&cut).len() <= 700, "{}", body(&cut).len());
        let v: serde_json::Value = serde_json::from_str(body(&cut)).unwrap();
        assert_eq!(v["truncated"], true);
        let messages = v["messages"].as_array().unwrap();
        assert!(!messages.is_empty() && messages.len() < 100);
        assert_eq!(messages.last().unwrap()["offset"], 100, "the newest stay");
        assert_eq!(messages.last().unwrap()["data"], "message 100");
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = Vec::new();
            base64_encode(input.as_bytes(), &mut out);
            assert_eq!(out, want.as_bytes());
        }
    }
}
