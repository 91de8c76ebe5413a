//! Presence: who is subscribed to the channels of namespaces with `presence = true`.
//!
//! Every subscriber of such a channel is a member (raw-mode ones too, as anonymous members
//! unless their token names a user): a client id unique across nodes
//! (`<node id>.<reactor>.<connection serial>`), the token's `sub` as `user` and its `info`
//! claim. A member is made when the subscription is added and goes when it is released
//! (unsubscribe, close, a server-side close), so members are bounded by subscriptions.
//!
//! [`Presence`] is one store per node (behind a mutex in `node::Shared`, touched on subscribe,
//! unsubscribe, close and the presence commands, never per message):
//! - standalone it is the whole truth: the node's members by channel, with per-user counts so
//!   `presence_stats` costs O(1);
//! - with Redis it holds this node's members (to refresh them and write them again when Redis
//!   lost them) and the changes the Redis reactor has yet to send ([`Presence::take_ops`]).
//!
//! # Redis layout
//!
//! Per channel, three keys in the channel's hash slot ([`keys`], `slots::key_beside` of the
//! prefixed Redis channel), so a Redis Cluster keeps them, and the channel's SPUBLISH, on one
//! master:
//! - `…:presence`, a hash: client id -> member JSON `{"client":..,"user":..,"info":..}`;
//! - `…:presence-users`, a hash: user -> how many of the channel's clients are that user
//!   (anonymous clients are not users), so the distinct-user count is `HLEN`;
//! - `…:presence-nodes`, a sorted set: node id -> when the node last refreshed the channel
//!   (milliseconds of the Redis server's own clock, `TIME`, so nodes' clocks never matter).
//!
//! Each node refreshes the channels it has members in every `--presence-ttl / 3`
//! ([`crate::broker::scripts::PRESENCE_REFRESH`]: ZADD its score, PEXPIRE all three keys to the
//! TTL), and at once when its link comes back. Every presence script first drops the nodes whose score is older than the TTL, with
//! their members (a leave event each): so a node killed with SIGKILL is out of presence within
//! `--presence-ttl` of its last refresh for reads, and within about 4/3 of it for the leave
//! events; a channel whose nodes all died expires as a whole. A refresh that finds the node
//! gone from the set (Redis restarted without persistence, or the node was dropped as stale
//! after a stall) makes the node write its members again ([`crate::broker::scripts::PRESENCE_SYNC`]).
//!
//! # Events across nodes
//!
//! The join and leave scripts publish the event on the channel itself (PUBLISH or SPUBLISH),
//! as `EVENT_MAGIC` + `join` or `leave` + `\n` + the member JSON. Every node subscribed to the
//! channel recognises it ([`parse_event`]) and delivers it only to the subscribers that asked
//! for events. Clients cannot forge one: a client payload that starts like any fanout header
//! (`\0fanout-`) is wrapped by [`crate::broker::origin::wrap`] before it reaches Redis.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp3::types::BytesFrame;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::scripts;
use super::slots::key_beside;
use super::Message;
use crate::auth::Identity;

/// Most members one `presence` reply lists; a bigger channel's reply has `"truncated":true`
/// (and `presence_stats` still counts everyone).
pub const MAX_LIST: usize = 1000;
/// Most changes waiting for the Redis reactor; past that they are dropped and the channel is
/// written again as a whole ([`Presence::take_resync`]), so a stalled link cannot grow memory.
pub const MAX_PENDING: usize = 64 * 1024;
/// Starts an event published on a channel.
pub const EVENT_MAGIC: &[u8] = b"\0fanout-presence\0";

/// A join or a leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Join,
    Leave,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Join => "join",
            Op::Leave => "leave",
        }
    }
}

/// One client in one channel.
#[derive(Debug, Clone)]
pub struct Member {
    pub client: Arc<str>,
    pub user: Option<Box<str>>,
    /// `{"client":..,"user":..,"info":..}`, what `presence` lists and events carry.
    pub json: Bytes,
}

impl Member {
    pub fn new(client: Arc<str>, identity: Option<&Identity>) -> Member {
        let json = member_json(&client, identity);
        Member {
            client,
            user: identity.map(|i| i.user.clone()),
            json,
        }
    }
}

/// `{"client":"<id>","user":"42","info":{..}}` (`user` and `info` only with a token).
pub fn member_json(client: &str, identity: Option<&Identity>) -> Bytes {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"client\":");
    serde_json::to_writer(&mut out, client).expect("writing to a Vec cannot fail");
    if let Some(identity) = identity {
        out.extend_from_slice(b",\"user\":");
        serde_json::to_writer(&mut out, &*identity.user).expect("writing to a Vec cannot fail");
        if let Some(info) = &identity.info {
            out.extend_from_slice(b",\"info\":");
            out.extend_from_slice(info.get().as_bytes());
        }
    }
    out.push(b'}');
    out.into()
}

/// The event `{"op":"join","channel":"c","client":..,"user":..,"info":..}` (`member` is a
/// member JSON object).
pub fn event_body(op: Op, channel: &[u8], member: &[u8]) -> Vec<u8> {
    let body = member.strip_prefix(b"{").unwrap_or(b"}");
    let mut out = Vec::with_capacity(24 + channel.len() + body.len());
    out.extend_from_slice(b"{\"op\":\"");
    out.extend_from_slice(op.as_str().as_bytes());
    out.extend_from_slice(b"\",\"channel\":\"");
    // Channel names are validated to need no escaping.
    out.extend_from_slice(channel);
    out.push(b'"');
    if body != b"}" {
        out.push(b',');
    }
    out.extend_from_slice(body);
    out
}

/// The event as a [`Message`] for `broker::fanout`: framed once, delivered only to the JSON
/// subscribers that asked for events.
pub fn event_message(op: Op, channel: &Bytes, member: &[u8]) -> Message {
    let mut msg = Message::new(channel.clone(), &event_body(op, channel, member), true);
    msg.event = true;
    msg
}

/// A presence command a client sent, on its way to the Redis reactor and back.
#[derive(Debug)]
pub struct Ask {
    pub reactor: usize,
    pub conn: usize,
    pub serial: u64,
    pub id: Option<Box<str>>,
    pub channel: Bytes,
    /// `presence_stats` (counts only) rather than `presence`.
    pub stats: bool,
}

/// The reply frame to an [`Ask`].
#[derive(Debug)]
pub struct Answer {
    pub ask: Ask,
    pub frame: Bytes,
}

/// A member JSON as fanout writes it; anything else found in Redis is left out.
#[derive(Deserialize)]
#[allow(dead_code)]
struct MemberWire<'a> {
    #[serde(borrow)]
    client: &'a RawValue,
    user: Option<&'a RawValue>,
    info: Option<&'a RawValue>,
}

fn is_member(json: &[u8]) -> bool {
    json.first() == Some(&b'{') && serde_json::from_slice::<MemberWire>(json).is_ok()
}

/// What Redis delivered on a channel, when it is a presence event: the op and the member JSON.
pub fn parse_event(payload: &[u8]) -> Option<(Op, &[u8])> {
    let rest = payload.strip_prefix(EVENT_MAGIC)?;
    let newline = rest.iter().position(|&b| b == b'\n')?;
    let op = match &rest[..newline] {
        b"join" => Op::Join,
        b"leave" => Op::Leave,
        _ => return None,
    };
    let member = &rest[newline + 1..];
    is_member(member).then_some((op, member))
}

/// A change the Redis reactor has to send.
#[derive(Debug, Clone)]
pub struct Pending {
    pub op: Op,
    pub channel: Bytes,
    pub member: Member,
    /// A leave that took the node's last member of the channel.
    pub last: bool,
}

#[derive(Default)]
struct ChannelPresence {
    members: BTreeMap<Arc<str>, Member>,
    users: HashMap<Box<str>, usize>,
}

/// Where a subscription sits on its reactor: (reactor, channel slot, subscriber slot).
pub type SubKey = (usize, u32, u32);

/// The node's presence store (see the module comment).
#[derive(Default)]
pub struct Presence {
    channels: HashMap<Bytes, ChannelPresence>,
    by_sub: HashMap<SubKey, (Bytes, Arc<str>)>,
    /// Redis mode: changes to send, oldest first.
    ops: VecDeque<Pending>,
    /// Redis mode: channels to write again as a whole.
    resync: HashSet<Bytes>,
    /// Redis mode: whether changes are queued in `ops`.
    queue_ops: bool,
}

/// Counts of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub clients: u64,
    pub users: u64,
}

impl Presence {
    /// A store; `redis`: queue every change for the Redis reactor.
    pub fn new(redis: bool) -> Presence {
        Presence {
            queue_ops: redis,
            ..Presence::default()
        }
    }

    /// `member` joined `channel` through subscription `sub`. Returns whether it is new (a
    /// subscription joins once).
    pub fn join(&mut self, sub: SubKey, channel: &Bytes, member: Member) -> bool {
        if self.by_sub.contains_key(&sub) {
            return false;
        }
        let entry = self.channels.entry(channel.clone()).or_default();
        if let Some(user) = &member.user {
            *entry.users.entry(user.clone()).or_default() += 1;
        }
        entry.members.insert(member.client.clone(), member.clone());
        self.by_sub
            .insert(sub, (channel.clone(), member.client.clone()));
        self.queue(Pending {
            op: Op::Join,
            channel: channel.clone(),
            member,
            last: false,
        });
        true
    }

    /// The subscription `sub` was released: its member, if it was one, leaves.
    pub fn leave(&mut self, sub: SubKey) -> Option<(Bytes, Member)> {
        let (channel, client) = self.by_sub.remove(&sub)?;
        let entry = self.channels.get_mut(&channel)?;
        let member = entry.members.remove(&client)?;
        if let Some(user) = &member.user {
            if let Some(n) = entry.users.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    entry.users.remove(user);
                }
            }
        }
        let last = entry.members.is_empty();
        if last {
            self.channels.remove(&channel);
        }
        self.queue(Pending {
            op: Op::Leave,
            channel: channel.clone(),
            member: member.clone(),
            last,
        });
        Some((channel, member))
    }

    fn queue(&mut self, pending: Pending) {
        if !self.queue_ops {
            return;
        }
        if self.ops.len() >= MAX_PENDING {
            // Dropped (its event too); the channel's members are written again as a whole.
            self.resync.insert(pending.channel);
            return;
        }
        self.ops.push_back(pending);
    }

    /// At most `max` members of `channel` (by client id), and whether there were more.
    pub fn list(&self, channel: &[u8], max: usize) -> (Vec<Bytes>, bool) {
        let Some(entry) = self.channels.get(channel) else {
            return (Vec::new(), false);
        };
        let list = entry
            .members
            .values()
            .take(max)
            .map(|m| m.json.clone())
            .collect();
        (list, entry.members.len() > max)
    }

    pub fn stats(&self, channel: &[u8]) -> Stats {
        self.channels
            .get(channel)
            .map_or(Stats::default(), |c| Stats {
                clients: c.members.len() as u64,
                users: c.users.len() as u64,
            })
    }

    /// Members on the node, over every channel.
    pub fn members(&self) -> usize {
        self.by_sub.len()
    }

    /// The channels the node has members in.
    pub fn channels(&self) -> Vec<Bytes> {
        self.channels.keys().cloned().collect()
    }

    /// How many members `channel` has on the node.
    pub fn count_of(&self, channel: &[u8]) -> usize {
        self.channels.get(channel).map_or(0, |c| c.members.len())
    }

    /// Every member of `channel` on the node (for writing them again).
    pub fn members_of(&self, channel: &[u8]) -> Vec<Member> {
        self.channels
            .get(channel)
            .map(|c| c.members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The changes to send, oldest first.
    pub fn take_ops(&mut self) -> VecDeque<Pending> {
        std::mem::take(&mut self.ops)
    }

    /// Marks `channel` to be written again as a whole.
    pub fn mark_resync(&mut self, channel: Bytes) {
        self.resync.insert(channel);
    }

    pub fn take_resync(&mut self) -> Vec<Bytes> {
        self.resync.drain().collect()
    }
}

/// The store and a flag that says changes wait for the Redis reactor (checked every turn
/// without the lock).
pub struct Store {
    inner: Mutex<Presence>,
    pending: AtomicBool,
}

impl Store {
    pub fn new(redis: bool) -> Store {
        Store {
            inner: Mutex::new(Presence::new(redis)),
            pending: AtomicBool::new(false),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Presence> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Raises the flag; `true` when it was down (the Redis reactor needs waking).
    pub fn raise(&self) -> bool {
        !self.pending.swap(true, Ordering::AcqRel)
    }

    /// Takes the flag down; whether it was up.
    pub fn take_flag(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }
}

/// The three keys of a channel's presence: (members hash, nodes sorted set, users hash).
pub fn keys(redis_channel: &[u8]) -> [Bytes; 3] {
    [
        key_beside(redis_channel, ":presence").into(),
        key_beside(redis_channel, ":presence-nodes").into(),
        key_beside(redis_channel, ":presence-users").into(),
    ]
}

/// What every presence script is called with: EVALSHA, the keys, then node id, TTL in ms, the
/// Redis channel and `1` for SPUBLISH (events of dropped nodes are published too).
fn args(
    script: &scripts::Script,
    redis_channel: &Bytes,
    node: &str,
    ttl: Duration,
    sharded: bool,
) -> Vec<Bytes> {
    let [members, nodes, users] = keys(redis_channel);
    vec![
        Bytes::from_static(b"EVALSHA"),
        script.sha.clone(),
        Bytes::from_static(b"3"),
        members,
        nodes,
        users,
        Bytes::copy_from_slice(node.as_bytes()),
        Bytes::from(ttl.as_millis().max(1).to_string()),
        redis_channel.clone(),
        Bytes::from_static(if sharded { b"1" } else { b"0" }),
    ]
}

/// How a node talks to Redis about presence.
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    pub node: &'a str,
    pub ttl: Duration,
    pub sharded: bool,
}

/// The join or leave script of one change.
pub fn op_args(scope: &Scope, redis_channel: &Bytes, pending: &Pending) -> Vec<Bytes> {
    let mut a = match pending.op {
        Op::Join => args(
            &scripts::PRESENCE_JOIN,
            redis_channel,
            scope.node,
            scope.ttl,
            scope.sharded,
        ),
        Op::Leave => args(
            &scripts::PRESENCE_LEAVE,
            redis_channel,
            scope.node,
            scope.ttl,
            scope.sharded,
        ),
    };
    a.push(Bytes::copy_from_slice(pending.member.client.as_bytes()));
    match pending.op {
        Op::Join => a.push(pending.member.json.clone()),
        Op::Leave => a.push(Bytes::from_static(if pending.last { b"1" } else { b"0" })),
    }
    a
}

/// The refresh script of one channel.
pub fn refresh_args(scope: &Scope, redis_channel: &Bytes) -> Vec<Bytes> {
    args(
        &scripts::PRESENCE_REFRESH,
        redis_channel,
        scope.node,
        scope.ttl,
        scope.sharded,
    )
}

/// The script that writes the node's members of a channel again, as a whole.
pub fn sync_args(scope: &Scope, redis_channel: &Bytes, members: &[Member]) -> Vec<Bytes> {
    let mut a = args(
        &scripts::PRESENCE_SYNC,
        redis_channel,
        scope.node,
        scope.ttl,
        scope.sharded,
    );
    for m in members {
        a.push(Bytes::copy_from_slice(m.client.as_bytes()));
        a.push(m.json.clone());
    }
    a
}

/// The read script: `stats` only, or also at most `max` members.
pub fn read_args(scope: &Scope, redis_channel: &Bytes, stats: bool, max: usize) -> Vec<Bytes> {
    let mut a = args(
        &scripts::PRESENCE_READ,
        redis_channel,
        scope.node,
        scope.ttl,
        scope.sharded,
    );
    a.push(Bytes::from(if stats {
        "0".to_string()
    } else {
        max.to_string()
    }));
    a
}

fn number(frame: &BytesFrame) -> Option<u64> {
    match frame {
        BytesFrame::Number { data, .. } => u64::try_from(*data).ok(),
        BytesFrame::BlobString { data, .. } | BytesFrame::SimpleString { data, .. } => {
            std::str::from_utf8(data).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// Whether a join or refresh found the node missing from the channel's nodes (`1`): its other
/// members may be gone from Redis too.
pub fn parse_added(reply: &BytesFrame) -> Result<bool, String> {
    number(reply)
        .map(|n| n == 1)
        .ok_or_else(|| format!("unexpected reply to a presence script: {reply:?}"))
}

/// A read: the counts and up to `max` members (sorted by client id), with whether the
/// channel had more than listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Read {
    pub stats: Stats,
    pub members: Vec<Bytes>,
    pub truncated: bool,
}

/// Reads the read script's reply `{clients, users, {member JSON, ...}}`.
pub fn parse_read(reply: BytesFrame) -> Result<Read, String> {
    let bad = || "unexpected reply to the presence read".to_string();
    let BytesFrame::Array { data, .. } = reply else {
        return Err(bad());
    };
    let [clients, users, list] = <[BytesFrame; 3]>::try_from(data).map_err(|_| bad())?;
    let stats = Stats {
        clients: number(&clients).ok_or_else(bad)?,
        users: number(&users).ok_or_else(bad)?,
    };
    let BytesFrame::Array { data: list, .. } = list else {
        return Err(bad());
    };
    let listed = list.len() as u64;
    let mut members: Vec<Bytes> = list
        .into_iter()
        .filter_map(|f| match f {
            BytesFrame::BlobString { data, .. } if is_member(&data) => Some(data),
            _ => None,
        })
        .collect();
    members.sort();
    let truncated = stats.clients > listed;
    Ok(Read {
        stats,
        members,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::slots::key_slot;

    fn identity(user: &str, info: Option<&str>) -> Identity {
        Identity {
            user: user.into(),
            channels: None,
            publish: None,
            info: info.map(|i| RawValue::from_string(i.to_string()).unwrap()),
            expires_at: None,
        }
    }

    #[test]
    fn member_and_event_json() {
        let ann = identity("4\"2", Some(r#"{"name":"Ann"}"#));
        let m = member_json("n.0.1", Some(&ann));
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"client":"n.0.1","user":"4\"2","info":{"name":"Ann"}})
        );
        let anon = member_json("n.0.2", None);
        assert_eq!(&anon[..], br#"{"client":"n.0.2"}"#);
        let e = event_message(Op::Join, &Bytes::from_static(b"room"), &m);
        assert!(e.event);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(e.payload()).unwrap(),
            serde_json::json!({"op":"join","channel":"room","client":"n.0.1","user":"4\"2","info":{"name":"Ann"}})
        );
        let e = event_body(Op::Leave, b"room", &anon);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&e).unwrap(),
            serde_json::json!({"op":"leave","channel":"room","client":"n.0.2"})
        );
    }

    #[test]
    fn events_parse_and_forgeries_do_not() {
        let mut wire = EVENT_MAGIC.to_vec();
        wire.extend_from_slice(b"leave\n{\"client\":\"a.0.1\",\"user\":\"7\"}");
        let (op, member) = parse_event(&wire).unwrap();
        assert_eq!(op, Op::Leave);
        assert_eq!(member, br#"{"client":"a.0.1","user":"7"}"#);
        let mut bad = EVENT_MAGIC.to_vec();
        bad.extend_from_slice(b"join\n{\"user\":\"7\"}");
        assert!(parse_event(&bad).is_none(), "no client id");
        let mut bad = EVENT_MAGIC.to_vec();
        bad.extend_from_slice(b"kick\n{\"client\":\"x\"}");
        assert!(parse_event(&bad).is_none());
        assert!(parse_event(b"join\n{\"client\":\"x\"}").is_none());
        // What a client sends that looks like an event is wrapped before it reaches Redis.
        let wrapped = crate::broker::origin::wrap(Bytes::from(wire), None);
        assert!(parse_event(&wrapped).is_none());
    }

    #[test]
    fn the_store_counts_clients_and_users() {
        let mut p = Presence::new(false);
        let room = Bytes::from_static(b"room");
        let ann = identity("ann", None);
        assert!(p.join((0, 1, 1), &room, Member::new("n.0.1".into(), Some(&ann))));
        assert!(!p.join((0, 1, 1), &room, Member::new("n.0.1".into(), Some(&ann))));
        assert!(p.join((1, 1, 1), &room, Member::new("n.1.1".into(), Some(&ann))));
        assert!(p.join((1, 1, 2), &room, Member::new("n.1.2".into(), None)));
        assert_eq!(
            p.stats(b"room"),
            Stats {
                clients: 3,
                users: 1
            }
        );
        let (list, truncated) = p.list(b"room", 2);
        assert_eq!(list.len(), 2);
        assert!(truncated);
        assert_eq!(&list[0][..], br#"{"client":"n.0.1","user":"ann"}"#);
        assert!(p.take_ops().is_empty(), "standalone queues nothing");
        let (channel, m) = p.leave((0, 1, 1)).unwrap();
        assert_eq!((&channel[..], &*m.client), (&b"room"[..], "n.0.1"));
        assert!(p.leave((0, 1, 1)).is_none());
        assert_eq!(
            p.stats(b"room"),
            Stats {
                clients: 2,
                users: 1
            }
        );
        p.leave((1, 1, 1));
        assert_eq!(
            p.stats(b"room"),
            Stats {
                clients: 1,
                users: 0
            }
        );
        p.leave((1, 1, 2));
        assert_eq!(p.stats(b"room"), Stats::default());
        assert!(p.channels().is_empty());
        assert_eq!(p.members(), 0);
    }

    #[test]
    fn redis_mode_queues_changes_within_a_bound() {
        let mut p = Presence::new(true);
        let room = Bytes::from_static(b"room");
        p.join((0, 0, 0), &room, Member::new("n.0.1".into(), None));
        p.leave((0, 0, 0));
        let ops = p.take_ops();
        assert_eq!(ops.len(), 2);
        assert_eq!(
            (ops[0].op, ops[1].op, ops[1].last),
            (Op::Join, Op::Leave, true)
        );
        for i in 0..MAX_PENDING as u32 + 10 {
            p.join(
                (0, 0, i),
                &room,
                Member::new(format!("n.0.{i}").into(), None),
            );
        }
        assert_eq!(p.take_ops().len(), MAX_PENDING);
        assert_eq!(p.take_resync(), vec![room]);
    }

    #[test]
    fn keys_share_the_channels_slot() {
        for name in [&b"fanout:room"[..], b"{t}x", b"a}b"] {
            for key in keys(name) {
                assert_eq!(key_slot(&key), key_slot(name));
            }
        }
    }

    #[test]
    fn read_replies_parse() {
        let blob = |s: &str| BytesFrame::BlobString {
            data: Bytes::copy_from_slice(s.as_bytes()),
            attributes: None,
        };
        let num = |n: i64| BytesFrame::Number {
            data: n,
            attributes: None,
        };
        let reply = BytesFrame::Array {
            data: vec![
                num(3),
                num(1),
                BytesFrame::Array {
                    data: vec![
                        blob(r#"{"client":"b.0.1","user":"7"}"#),
                        blob("not json"),
                        blob(r#"{"client":"a.0.1"}"#),
                    ],
                    attributes: None,
                },
            ],
            attributes: None,
        };
        let read = parse_read(reply).unwrap();
        assert_eq!(
            read.stats,
            Stats {
                clients: 3,
                users: 1
            }
        );
        assert_eq!(read.members.len(), 2);
        assert_eq!(&read.members[0][..], br#"{"client":"a.0.1"}"#);
        assert!(!read.truncated, "all three were listed (one was no member)");
        assert!(parse_read(num(1)).is_err());
        assert_eq!(parse_added(&num(1)), Ok(true));
        assert_eq!(parse_added(&num(0)), Ok(false));
    }
}
