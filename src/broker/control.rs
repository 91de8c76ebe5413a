//! Messages between the nodes themselves, through Redis: what one node's server API asks every
//! other node to do (today: close a user's connections).
//!
//! They travel on one reserved channel, `--redis-prefix` + [`CHANNEL`], which every node's Redis
//! reactor subscribes to as soon as its link is up (with `--redis-cluster`, on the shard that
//! owns its slot, like any channel). Its name holds a `/`, which no client channel may contain
//! (see [`crate::protocol::validate_channel`]), so no client can subscribe or publish to it.
//! Anyone who can PUBLISH on the Redis can, as with every channel there.
//!
//! Wire form: one JSON object, `{"op":"disconnect","user":"42","node":"<id of the sender>"}`.
//! The sender closes its own connections directly and skips its own message when Redis echoes
//! it back; an `op` this version does not know is ignored, so newer nodes can add some.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The reserved channel name (before `--redis-prefix`).
pub const CHANNEL: &[u8] = b"__fanout/control";

/// Largest control message acted on; anything longer is not one of ours.
pub const MAX_LEN: usize = 4096;

/// What another node asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Close every WebSocket of `user` (token `sub`) with 4002.
    Disconnect { user: String },
}

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    node: Option<Cow<'a, str>>,
}

/// The message asking every node to close `user`'s connections, sent by node `node`.
pub fn disconnect(user: &str, node: &str) -> Bytes {
    let wire = Wire {
        op: "disconnect".into(),
        user: Some(user.into()),
        node: Some(node.into()),
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
    fn no_client_can_use_the_channel() {
        assert!(crate::protocol::validate_channel(CHANNEL).is_err());
    }
}
