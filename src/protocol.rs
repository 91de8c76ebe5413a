//! What clients say and hear: channel names and the `fanout.json` command protocol; what the
//! server answers and delivers is in [`replies`].
//!
//! Payloads are bytes. A JSON `publish` whose `data` is a string publishes the string's bytes,
//! any other value publishes its JSON text; a JSON subscriber gets a payload as `data` verbatim
//! when it is valid JSON, as a JSON string when it is other UTF-8, and base64 otherwise. So raw
//! and JSON clients share channels.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

mod replies;

pub use replies::*;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
