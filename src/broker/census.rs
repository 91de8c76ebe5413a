//! The cluster-wide channel census behind `GET /api/channels` on a node with Redis: how one
//! node's server API learns every node's subscriber counts, on demand, over Redis Pub/Sub.
//!
//! 1. The asking node's Redis reactor publishes [`control::ask_channels`] on the nodes' control
//!    channel as a generic call (`PUBLISH`, or `SPUBLISH` on a Redis Cluster), so Redis' reply
//!    says how many subscribers got it: every node, the asker included. That count and the
//!    publish are one atomic step in Redis, so a node that joins or leaves meanwhile cannot make
//!    the asker wait for an answer that will never come, or stop before one that will.
//! 2. Every other node's Redis reactor hands the request to each reactor of its node, and each
//!    reactor lists its own channels and publishes them as one [`Part`] on the asker's reply
//!    channel, [`reply_channel`]. Nothing is merged or remembered on the answering node: one
//!    part per reactor, each stating how many reactors its node has.
//! 3. The asker's Redis reactor subscribes its reply channel (only a node with `--api-listen`
//!    does) and hands the parts to the API thread, which merges them with its own node's
//!    counts until every node that got the request sent all of its parts, or [`WAIT`] passed;
//!    then it answers, saying whether the answer is complete and how many nodes are in it.
//!
//! Everything is bounded, because anyone who can PUBLISH on the Redis can send requests and
//! parts: a node starts at most [`ASKS_PER_SECOND`] censuses (more are ignored: their asker's
//! answer says incomplete), a node's parts together hold at most [`NODE_ANSWER_BYTES`] of
//! names (`truncated` says the rest were left out), the asker accepts parts of at most
//! [`MAX_PART_BYTES`] from at most [`MAX_NODES`] nodes per request, and at most
//! [`QUEUED_PART_BYTES`] of parts wait for the API thread at once (more are dropped). The
//! byte budget per node keeps a census far below what Redis lets a subscriber fall behind
//! (`client-output-buffer-limit pubsub`, 32 MiB by default) even with a hundred nodes.
//!
//! [`control::ask_channels`]: super::control::ask_channels

use std::borrow::Cow;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;

/// Reply channels are this followed by the asking node's id. Like the control channel, the
/// `/` keeps every client out of them.
pub const REPLY_PREFIX: &str = "__fanout/reply/";

/// How long the asker waits for the other nodes' parts before answering with what it has.
pub const WAIT: Duration = Duration::from_secs(2);

/// Most bytes of channel names and counts one node sends for one request, over all of its
/// reactors (each gets an equal share).
pub const NODE_ANSWER_BYTES: usize = 64 * 1024;

/// Largest part the asker accepts: a whole node's budget plus the part's own fields.
pub const MAX_PART_BYTES: usize = NODE_ANSWER_BYTES + 1024;

/// Most nodes one request takes parts from.
pub const MAX_NODES: usize = 1024;

/// Most reactors a part may claim its node has (`--threads` is at most 1024).
pub const MAX_REACTORS: u32 = 1024;

/// Most bytes of parts handed to the API thread and not yet taken by it.
pub const QUEUED_PART_BYTES: usize = 4 << 20;

/// Most censuses one node starts per second (and at once), whoever asks.
pub const ASKS_PER_SECOND: u32 = 10;

/// A node id as a census carries it: what `node::random_id` makes (16 hex digits), with room
/// for other writers, but never anything that could leave the reply channel's name space.
pub fn valid_node(node: &str) -> bool {
    (1..=64).contains(&node.len())
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The reply channel of node `node` (before `--redis-prefix`).
pub fn reply_channel(node: &str) -> Bytes {
    Bytes::from(format!("{REPLY_PREFIX}{node}"))
}

/// One reactor's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub req: u64,
    /// The answering node's id.
    pub node: String,
    /// Which of its node's reactors answers, and how many there are.
    pub reactor: u32,
    pub reactors: u32,
    /// Channel name and local subscribers, at most the reactor's share of the budget.
    pub channels: Vec<(Bytes, usize)>,
    /// The reactor had more channels under the prefix than its share held.
    pub truncated: bool,
}

/// Unknown fields are ignored, so a newer node may add some.
#[derive(Deserialize)]
struct PartWire<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    req: u64,
    #[serde(borrow)]
    node: Cow<'a, str>,
    reactor: u32,
    reactors: u32,
    #[serde(borrow)]
    channels: Vec<(Cow<'a, str>, u64)>,
    truncated: bool,
}

/// Writes reactor `reactor` of `reactors`' part: the channels `channels` yields, as many as
/// fit its share of [`NODE_ANSWER_BYTES`]. Channel names are valid channel names (ASCII, no
/// quote or backslash), so they are written as they are.
pub fn encode_part<'a>(
    req: u64,
    node: &str,
    reactor: usize,
    reactors: usize,
    channels: impl Iterator<Item = (&'a Bytes, usize)>,
) -> Bytes {
    use std::fmt::Write as _;
    let budget = NODE_ANSWER_BYTES / reactors.max(1);
    let mut out = String::with_capacity(256);
    let _ = write!(
        out,
        r#"{{"op":"channels","req":{req},"node":"{node}","reactor":{reactor},"reactors":{reactors},"channels":["#
    );
    let start = out.len();
    let mut truncated = false;
    for (name, n) in channels {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        if out.len() - start + name.len() + 24 > budget {
            truncated = true;
            break;
        }
        if out.len() > start {
            out.push(',');
        }
        let _ = write!(out, r#"["{name}",{n}]"#);
    }
    let _ = write!(out, r#"],"truncated":{truncated}}}"#);
    Bytes::from(out)
}

/// Reads a part from a reply channel; anything malformed, oversized or naming what no client
/// could have subscribed to is refused whole.
pub fn parse_part(payload: &[u8]) -> Result<Part, String> {
    if payload.len() > MAX_PART_BYTES {
        return Err(format!("{} bytes, over {MAX_PART_BYTES}", payload.len()));
    }
    let wire: PartWire<'_> = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    if wire.op != "channels" {
        return Err(format!("op {:?} on a reply channel", wire.op));
    }
    if !valid_node(&wire.node) {
        return Err("an invalid node id".into());
    }
    if wire.reactors == 0 || wire.reactors > MAX_REACTORS || wire.reactor >= wire.reactors {
        return Err(format!(
            "reactor {} of {}: not a reactor of a node",
            wire.reactor, wire.reactors
        ));
    }
    let mut channels = Vec::with_capacity(wire.channels.len());
    for (name, n) in wire.channels {
        crate::protocol::validate_channel(name.as_bytes())
            .map_err(|e| format!("channel {name:?}: {e}"))?;
        let n = usize::try_from(n).map_err(|_| "a count over usize".to_string())?;
        channels.push((Bytes::copy_from_slice(name.as_bytes()), n));
    }
    Ok(Part {
        req: wire.req,
        node: wire.node.into_owned(),
        reactor: wire.reactor,
        reactors: wire.reactors,
        channels,
        truncated: wire.truncated,
    })
}

/// The token bucket of [`ASKS_PER_SECOND`]: refilled continuously, bursts up to the rate.
#[derive(Debug, Default)]
pub struct AskBudget {
    tokens: f64,
    last: Option<Instant>,
}

impl AskBudget {
    /// Takes one census; `false` when the node started its share already.
    pub fn take(&mut self, now: Instant) -> bool {
        let rate = f64::from(ASKS_PER_SECOND);
        self.tokens = match self.last {
            None => rate,
            Some(last) => (self.tokens + now.duration_since(last).as_secs_f64() * rate).min(rate),
        };
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_round_trips_and_stays_in_its_share() {
        let names: Vec<Bytes> = (0..10_000)
            .map(|i| Bytes::from(format!("room:{i:06}")))
            .collect();
        let payload = encode_part(9, "abc", 1, 2, names.iter().map(|n| (n, 3)));
        assert!(
            payload.len() <= NODE_ANSWER_BYTES / 2 + 200,
            "{}",
            payload.len()
        );
        let part = parse_part(&payload).unwrap();
        assert_eq!((part.req, part.node.as_str()), (9, "abc"));
        assert_eq!((part.reactor, part.reactors), (1, 2));
        assert!(part.truncated);
        assert!(part.channels.len() > 1000, "{}", part.channels.len());
        assert_eq!(part.channels[0], (names[0].clone(), 3));

        let few = encode_part(1, "n", 0, 1, names.iter().take(2).map(|n| (n, 1)));
        let part = parse_part(&few).unwrap();
        assert!(!part.truncated);
        assert_eq!(part.channels.len(), 2);
        let none = encode_part(1, "n", 0, 1, std::iter::empty());
        assert_eq!(parse_part(&none).unwrap().channels, vec![]);
    }

    #[test]
    fn hostile_parts_are_refused() {
        let ok = r#"{"op":"channels","req":1,"node":"n","reactor":0,"reactors":1,"channels":[["a",1]],"truncated":false}"#;
        assert!(parse_part(ok.as_bytes()).is_ok());
        for bad in [
            ok.replace(r#""node":"n""#, r#""node":"n/../x""#),
            ok.replace(r#""reactor":0"#, r#""reactor":1"#),
            ok.replace(r#""reactors":1"#, r#""reactors":0"#),
            ok.replace(r#""reactors":1"#, r#""reactors":5000"#),
            ok.replace(r#"["a",1]"#, r#"["a b",1]"#),
            ok.replace(r#"["a",1]"#, r#"["a",-1]"#),
            ok.replace(r#""op":"channels""#, r#""op":"other""#),
            "not json".to_string(),
        ] {
            assert!(parse_part(bad.as_bytes()).is_err(), "{bad}");
        }
        // Valid JSON (trailing spaces) that is only too long.
        let huge = format!("{ok}{}", " ".repeat(MAX_PART_BYTES));
        assert!(parse_part(huge.as_bytes()).is_err());
    }

    #[test]
    fn node_ids_and_reply_channels() {
        assert!(valid_node("0123456789abcdef"));
        assert!(!valid_node(""));
        assert!(!valid_node("a/b"));
        assert!(!valid_node(&"a".repeat(65)));
        let channel = reply_channel("0123456789abcdef");
        assert_eq!(&channel[..], b"__fanout/reply/0123456789abcdef");
        assert!(
            crate::protocol::validate_channel(&channel).is_err(),
            "no client can use it"
        );
    }

    #[test]
    fn asks_are_limited_per_second() {
        let mut budget = AskBudget::default();
        let t = Instant::now();
        let taken = (0..50).filter(|_| budget.take(t)).count();
        assert_eq!(taken, ASKS_PER_SECOND as usize);
        assert!(budget.take(t + Duration::from_millis(150)), "refilled");
    }
}
