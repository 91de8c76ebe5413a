//! What clients say and hear: channel names, the `fanout.json` command protocol and the delivery
//! envelope.
//!
//! Payloads are bytes. A JSON `publish` whose `data` is a string publishes the string's bytes,
//! any other value publishes its JSON text; a JSON subscriber gets a payload as `data` verbatim
//! when it is valid JSON, as a JSON string when it is other UTF-8, and base64 otherwise. So raw
//! and JSON clients share channels.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::ws::frame::encode;
use crate::ws::OpCode;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;

/// The subprotocol a client offers to speak JSON commands.
pub const JSON_SUBPROTOCOL: &str = "fanout.json";

/// Checks a channel name: 1-128 bytes of `[A-Za-z0-9_.:-#{}]` (`#` names an owner, as in
/// `user:#42`; `{tag}` is a Redis Cluster hash tag). None of them needs escaping in JSON.
pub fn validate_channel(name: &[u8]) -> Result<(), String> {
    if name.is_empty() {
        return Err("channel name is empty".into());
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(format!(
            "channel name is {} bytes; the limit is {MAX_CHANNEL_LEN}",
            name.len()
        ));
    }
    match name.iter().find(|&&b| {
        !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-' | b'#' | b'{' | b'}'))
    }) {
        Some(&b) => Err(format!(
            "channel name contains {:?}; allowed are A-Z a-z 0-9 _ . : - # {{ }}",
            b as char
        )),
        None => Ok(()),
    }
}

/// Where a client last was in a channel with history: the offset of the last message it got
/// and the channel's epoch then.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

/// Most messages one `history` command (or the server API's) returns.
pub const MAX_HISTORY_LIMIT: usize = 1000;
/// Messages `history` returns when the command names no `limit`.
pub const DEFAULT_HISTORY_LIMIT: usize = 50;

/// One parsed client command.
#[derive(Debug, PartialEq)]
pub enum Command<'a> {
    Subscribe {
        channel: Cow<'a, str>,
        /// Recover what was published after this position (channels with history).
        since: Option<Position>,
        /// Also deliver the channel's join and leave events (channels with presence).
        presence_events: bool,
    },
    /// The newest `limit` messages of a channel with history.
    History {
        channel: Cow<'a, str>,
        limit: usize,
    },
    /// Who is subscribed to a channel with presence, on every node.
    Presence {
        channel: Cow<'a, str>,
    },
    /// How many clients and users are subscribed to a channel with presence.
    PresenceStats {
        channel: Cow<'a, str>,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
    },
    Publish {
        channel: Cow<'a, str>,
        payload: Cow<'a, [u8]>,
    },
    /// A newer connection token, before the current one expires.
    Refresh {
        token: Cow<'a, str>,
    },
}

/// A command with the `id` the client attached, if any (echoed in the reply verbatim).
#[derive(Debug, PartialEq)]
pub struct Request<'a> {
    pub id: Option<&'a str>,
    pub command: Command<'a>,
}

/// A command that cannot be carried out; `id` is kept so the error reply can echo it.
#[derive(Debug, PartialEq)]
pub struct CommandError<'a> {
    pub id: Option<&'a str>,
    pub message: String,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    since: Option<Position>,
    presence_events: Option<bool>,
    limit: Option<u64>,
}

/// Just the id of a command that does not otherwise parse.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// A field that is present, even as `null`: plain `Option` would turn `"id":null` into "no id"
/// and `"data":null` into "missing data", yet null is a JSON value to echo or publish like any other.
fn present<'de, D>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Parses one text frame of the JSON protocol.
pub fn parse_command(text: &[u8]) -> Result<Request<'_>, CommandError<'_>> {
    let wire: Wire<'_> = serde_json::from_slice(text).map_err(|e| CommandError {
        // A well-formed object with a mistyped field still gets its id back, so the client can
        // tell which request failed.
        id: serde_json::from_slice::<IdOnly<'_>>(text)
            .ok()
            .and_then(|o| o.id)
            .map(RawValue::get),
        message: format!("invalid command: {e}; expected a JSON object like {{\"op\":\"publish\",\"channel\":\"c\",\"data\":\"hi\"}}"),
    })?;
    let id = wire.id.map(RawValue::get);
    let fail = |message: String| CommandError { id, message };
    let op = wire.op.ok_or_else(|| fail("missing \"op\"".into()))?;
    let channel = || -> Result<Cow<'_, str>, CommandError<'_>> {
        let channel = wire
            .channel
            .clone()
            .ok_or_else(|| fail(format!("\"{op}\" needs a \"channel\"")))?;
        validate_channel(channel.as_bytes()).map_err(fail)?;
        Ok(channel)
    };
    let command = match op.as_ref() {
        "subscribe" => Command::Subscribe {
            channel: channel()?,
            since: wire.since.clone(),
            presence_events: wire.presence_events.unwrap_or(false),
        },
        "history" => {
            let channel = channel()?;
            let limit = match wire.limit {
                None => DEFAULT_HISTORY_LIMIT,
                Some(n) if n >= 1 && n <= MAX_HISTORY_LIMIT as u64 => n as usize,
                Some(n) => {
                    return Err(fail(format!(
                        "\"limit\" {n} is out of range: 1 to {MAX_HISTORY_LIMIT}"
                    )))
                }
            };
            Command::History { channel, limit }
        }
        "presence" => Command::Presence {
            channel: channel()?,
        },
        "presence_stats" => Command::PresenceStats {
            channel: channel()?,
        },
        "unsubscribe" => Command::Unsubscribe {
            channel: channel()?,
        },
        "publish" => {
            let channel = channel()?;
            let data = wire
                .data
                .ok_or_else(|| fail("\"publish\" needs \"data\"".into()))?;
            Command::Publish {
                channel,
                payload: payload_of(data),
            }
        }
        "refresh" => Command::Refresh {
            token: wire
                .token
                .ok_or_else(|| fail("\"refresh\" needs a \"token\"".into()))?,
        },
        other => {
            return Err(fail(format!(
                "unknown op {other:?}; expected subscribe, unsubscribe, publish, refresh, history, presence or presence_stats"
            )))
        }
    };
    Ok(Request { id, command })
}

/// What publishing `data` publishes: a JSON string's bytes (unescaped), any other value's JSON
/// text as written. The server API publishes the same way.
pub fn payload_of(data: &RawValue) -> Cow<'_, [u8]> {
    match serde_json::from_str::<Cow<'_, str>>(data.get()) {
        Ok(Cow::Borrowed(s)) => Cow::Borrowed(s.as_bytes()),
        Ok(Cow::Owned(s)) => Cow::Owned(s.into_bytes()),
        Err(_) => Cow::Borrowed(data.get().as_bytes()),
    }
}

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
    fn channel_names() {
        assert!(validate_channel(b"room-1.a:b_c").is_ok());
        assert!(validate_channel(&[b'a'; 128]).is_ok());
        assert!(validate_channel(&[b'a'; 129]).is_err());
        assert!(validate_channel(b"").is_err());
        assert!(validate_channel(b"a b").is_err());
        assert!(validate_channel("é".as_bytes()).is_err());
    }

    #[test]
    fn commands() {
        let r = parse_command(br#"{"op":"subscribe","channel":"c","id":1}"#).unwrap();
        assert_eq!(r.id, Some("1"));
        assert_eq!(
            r.command,
            Command::Subscribe {
                channel: "c".into(),
                since: None,
                presence_events: false,
            }
        );
        let r = parse_command(
            br#"{"op":"subscribe","channel":"c","since":{"offset":7,"epoch":"e1"},"presence_events":true}"#,
        )
        .unwrap();
        assert_eq!(
            r.command,
            Command::Subscribe {
                channel: "c".into(),
                since: Some(Position {
                    offset: 7,
                    epoch: "e1".into()
                }),
                presence_events: true,
            }
        );
        let r = parse_command(br#"{"op":"history","channel":"c"}"#).unwrap();
        assert_eq!(
            r.command,
            Command::History {
                channel: "c".into(),
                limit: DEFAULT_HISTORY_LIMIT
            }
        );
        for bad in [
            &br#"{"op":"history","channel":"c","limit":0}"#[..],
            br#"{"op":"history","channel":"c","limit":1001}"#,
            br#"{"op":"subscribe","channel":"c","since":{"offset":-1,"epoch":"e"}}"#,
            br#"{"op":"subscribe","channel":"c","since":{"offset":1}}"#,
        ] {
            assert!(
                parse_command(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let r = parse_command(br#"{"op":"publish","channel":"c","data":"h\u00e9"}"#).unwrap();
        assert_eq!(
            r.command,
            Command::Publish {
                channel: "c".into(),
                payload: Cow::Owned("hé".as_bytes().to_vec())
            }
        );
        let r = parse_command(br#"{"op":"publish","channel":"c","data":{"a":[1, 2]},"id":"x"}"#)
            .unwrap();
        assert_eq!(r.id, Some("\"x\""));
        assert_eq!(
            r.command,
            Command::Publish {
                channel: "c".into(),
                payload: Cow::Borrowed(br#"{"a":[1, 2]}"#)
            }
        );
        let e = parse_command(br#"{"op":"jump","id":7}"#).unwrap_err();
        assert_eq!(e.id, Some("7"));
        assert!(e.message.contains("unknown op"));
        assert!(parse_command(b"not json")
            .unwrap_err()
            .message
            .contains("invalid command"));
        assert!(
            parse_command(br#"{"op":"subscribe","channel":"a b","id":2}"#)
                .unwrap_err()
                .message
                .contains("channel name")
        );
        assert!(parse_command(br#"{"op":"publish","channel":"c"}"#).is_err());
        assert!(parse_command(br#"[1,2]"#).is_err());
        // null is a value like any other: echoed as an id, published as data.
        let r = parse_command(br#"{"op":"publish","channel":"c","data":null,"id":null}"#).unwrap();
        assert_eq!(r.id, Some("null"));
        assert_eq!(
            r.command,
            Command::Publish {
                channel: "c".into(),
                payload: Cow::Borrowed(b"null")
            }
        );
        assert_eq!(
            parse_command(br#"{"op":"subscribe","channel":"c"}"#)
                .unwrap()
                .id,
            None
        );
        let e = parse_command(br#"{"op":"publish","channel":5,"data":1,"id":"x"}"#).unwrap_err();
        assert_eq!(e.id, Some("\"x\""));
        assert!(e.message.contains("invalid command"), "{}", e.message);
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
