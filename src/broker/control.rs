//! Messages between the nodes themselves, through Redis: what one node's server API asks every
//! other node to do (close a user's connections; report its channels for a cluster-wide
//! `GET /api/channels`, answered as [`census`](super::census) describes).
//!
//! They travel on one reserved channel, `--redis-prefix` + [`CHANNEL`], which every node's Redis
//! reactor subscribes to as soon as its link is up (with `--redis-cluster`, on the shard that
//! owns its slot, like any channel). Its name holds a `/`, which no client channel may contain
//! (see [`crate::protocol::validate_channel`]), so no client can subscribe or publish to it.
//! Anyone who can PUBLISH on the Redis can, as with every channel there.
//!
//! Wire form: one JSON object, `{"op":"disconnect","user":"42","node":"<id of the sender>"}` or
//! `{"op":"channels","node":"<id of the sender>","req":7,"prefix":"room:"}`. The sender acts on
//! its own node directly and skips its own message when Redis echoes it back; an `op` this
//! version does not know is ignored, so newer nodes can add some (and an older node asked for
//! its channels does not answer: the asker's answer then says it is incomplete).

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The reserved channel name (before `--redis-prefix`).
pub const CHANNEL: &[u8] = b"__fanout/control";

/// How the nodes' own channels start (this one, the census replies): no client channel can,
/// since client names have no `/`, and no namespace applies to them (no history, no presence).
pub const RESERVED_PREFIX: &[u8] = b"__fanout/";

/// Whether `channel` is one of the nodes' own.
pub fn is_reserved(channel: &[u8]) -> bool {
    channel.starts_with(RESERVED_PREFIX)
}

/// Largest control message acted on; anything longer is not one of ours.
pub const MAX_LEN: usize = 4096;

/// What another node asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Close every WebSocket of `user` (token `sub`) with 4002.
    Disconnect { user: String },
    /// Report this node's channels whose names start with `prefix` to node `node`, naming
    /// its request `req` (see [`census`](super::census)).
    Channels(ChannelsAsk),
}

/// A node's request for every other node's channel counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelsAsk {
    /// The asking node's id: the answers go to its reply channel.
    pub node: String,
    /// The asker's name for the request, echoed in every answer.
    pub req: u64,
    pub prefix: String,
}

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    node: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    req: Option<u64>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    prefix: Option<Cow<'a, str>>,
}

/// The message asking every node to close `user`'s connections, sent by node `node`.
pub fn disconnect(user: &str, node: &str) -> Bytes {
    let wire = Wire {
        op: "disconnect".into(),
        user: Some(user.into()),
        node: Some(node.into()),
        req: None,
        prefix: None,
    };
    Bytes::from(serde_json::to_vec(&wire).expect("serializing strings cannot fail"))
}

/// The message asking every other node for its channels under `prefix`, sent by node `node`
/// as its request `req`. A prefix is at most a channel name long (128 characters, at most 6
/// bytes each once escaped), so this stays under [`MAX_LEN`].
pub fn ask_channels(node: &str, req: u64, prefix: &str) -> Bytes {
    let wire = Wire {
        op: "channels".into(),
        user: None,
        node: Some(node.into()),
        req: Some(req),
        prefix: Some(prefix.into()),
    };
    Bytes::from(serde_json::to_vec(&wire).expect("serializing strings cannot fail"))
}

/// Reads a control message. `Ok(None)`: one to ignore (sent by node `me`, or an op this version
/// does not know); `Err`: not a control message at all.
pub fn parse(payload: &[u8], me: &str) -> Result<Option<Command>, String> {
    if payload.len() > MAX_LEN {
        return Err(format!("{} bytes, over {MAX_LEN}", payload.len()));
    }
    let wire: Wire<'_> = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    if wire.node.as_deref() == Some(me) {
        return Ok(None);
    }
    match wire.op.as_ref() {
        "disconnect" => match wire.user {
            Some(user) if !user.is_empty() => Ok(Some(Command::Disconnect {
                user: user.into_owned(),
            })),
            _ => Err("disconnect without a user".into()),
        },
        "channels" => match (wire.node, wire.req) {
            (Some(node), Some(req)) if super::census::valid_node(&node) => {
                let prefix = wire.prefix.unwrap_or_default();
                // Counted in characters, as the API counts it.
                if prefix.chars().count() > crate::protocol::MAX_CHANNEL_LEN {
                    return Err("channels: a prefix longer than a channel name".into());
                }
                Ok(Some(Command::Channels(ChannelsAsk {
                    node: node.into_owned(),
                    req,
                    prefix: prefix.into_owned(),
                })))
            }
            _ => Err("channels without a valid node or req".into()),
        },
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_own_messages() {
        let msg = disconnect("4\"2", "node-a");
        assert_eq!(
            parse(&msg, "node-b"),
            Ok(Some(Command::Disconnect {
                user: "4\"2".into()
            }))
        );
        assert_eq!(parse(&msg, "node-a"), Ok(None), "a node skips its own");
        assert_eq!(parse(br#"{"op":"later","node":"x"}"#, "a"), Ok(None));
        assert!(parse(b"hello", "a").is_err());
        assert!(parse(br#"{"op":"disconnect","node":"x"}"#, "a").is_err());
        assert!(parse(&vec![b' '; MAX_LEN + 1], "a").is_err());
    }

    #[test]
    fn a_channels_request_round_trips() {
        let long = "p".repeat(crate::protocol::MAX_CHANNEL_LEN);
        let msg = ask_channels("abcdef0123456789", 7, &long);
        let worst = ask_channels("abcdef0123456789", u64::MAX, &"\u{1}".repeat(128));
        assert!(worst.len() <= MAX_LEN, "{}", worst.len());
        assert_eq!(
            parse(&msg, "other"),
            Ok(Some(Command::Channels(ChannelsAsk {
                node: "abcdef0123456789".into(),
                req: 7,
                prefix: long.clone()
            })))
        );
        assert_eq!(parse(&msg, "abcdef0123456789"), Ok(None));
        assert!(
            parse(br#"{"op":"channels","node":"a"}"#, "b").is_err(),
            "no req"
        );
        assert!(parse(br#"{"op":"channels","node":"a/b","req":1}"#, "b").is_err());
        let too_long = ask_channels("a", 1, &format!("{long}p"));
        assert!(parse(&too_long, "b").is_err());
        // Without a prefix: every channel.
        assert_eq!(
            parse(br#"{"op":"channels","node":"a","req":1}"#, "b"),
            Ok(Some(Command::Channels(ChannelsAsk {
                node: "a".into(),
                req: 1,
                prefix: String::new()
            })))
        );
    }

    #[test]
    fn no_client_can_use_the_channel() {
        assert!(crate::protocol::validate_channel(CHANNEL).is_err());
    }
}
