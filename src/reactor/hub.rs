//! The node's Redis reactor (reactor 0, with `--redis` or `--redis-cluster`): the node-level
//! table of channels and which reactors want each, the node's Redis link (or shard links) and
//! their events, and the replies that carry publish acks and subscription confirmations back to
//! the reactor that asked.
//!
//! It subscribes a channel in Redis when the first reactor of the node wants it and unsubscribes
//! after the last leaves, so Redis sends the node each message once; a message from Redis is
//! framed once and its `Bytes` shared with every interested reactor, never copied.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use mio::Token;

use super::Reactor;
use crate::broker::bus::{ApiReply, Control, Reply, Request, Ticket};
use crate::broker::control;
use crate::broker::redis::{Ack, AckTo, RedisEvent};
use crate::broker::Message;

/// Where the node's subscription of one channel stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NodeState {
    /// Sent (or to be sent when the link comes up), not confirmed.
    Pending,
    Confirmed,
    Refused(String),
}

/// One channel in the node's table.
struct NodeChannel {
    /// Bit `i` set: reactor `i` has local subscribers.
    reactors: Vec<u64>,
    interested: usize,
    state: NodeState,
    /// Reactors owed a [`Reply::Subscribed`] for this channel, one entry per request.
    waiting: Vec<usize>,
}

impl NodeChannel {
    fn has(&self, reactor: usize) -> bool {
        self.reactors
            .get(reactor / 64)
            .is_some_and(|w| w & (1 << (reactor % 64)) != 0)
    }

    /// Sets or clears reactor's bit; returns whether it changed.
    fn set(&mut self, reactor: usize, on: bool) -> bool {
        let Some(word) = self.reactors.get_mut(reactor / 64) else {
            return false;
        };
        let bit = 1u64 << (reactor % 64);
        let was = *word & bit != 0;
        if on {
            *word |= bit;
        } else {
            *word &= !bit;
        }
        if was != on {
            if on {
                self.interested += 1;
            } else {
                self.interested -= 1;
            }
        }
        was != on
    }
}

/// The node-level state only the Redis reactor keeps.
pub(super) struct Hub {
    channels: HashMap<Bytes, NodeChannel>,
    /// SUBSCRIBEs sent per channel and not yet confirmed or refused, counted apart from the
    /// table: a channel that was unsubscribed and subscribed again has two in flight, and only
    /// the confirmation of the last one means Redis routes it to us.
    in_flight: HashMap<Bytes, u32>,
    words: usize,
    /// Commands sent with a tag, awaiting their replies.
    pub(super) calls: super::calls::Calls,
    /// Channels the node keeps subscribed for itself (the control channel, the census reply
    /// channel), not for clients.
    own: usize,
    pub(super) census: super::census::CensusState,
}

impl Hub {
    /// The table starts with the nodes' control channel ([`control::CHANNEL`]) and, on a node
    /// with the server API, its census reply channel (`reply`): no reactor ever subscribes to
    /// them and they stay for good, subscribed whenever the link comes up, like every channel
    /// in the table.
    pub(super) fn new(reactors: usize, reply: Option<Bytes>) -> Hub {
        let words = reactors.div_ceil(64);
        let own: Vec<Bytes> = std::iter::once(Bytes::from_static(control::CHANNEL))
            .chain(reply.clone())
            .collect();
        let channels: HashMap<Bytes, NodeChannel> = own
            .iter()
            .map(|name| {
                let entry = NodeChannel {
                    reactors: vec![0; words],
                    interested: 0,
                    state: NodeState::Pending,
                    waiting: Vec::new(),
                };
                (name.clone(), entry)
            })
            .collect();
        Hub {
            channels,
            in_flight: HashMap::new(),
            words,
            calls: Default::default(),
            own: own.len(),
            census: super::census::CensusState::new(reply),
        }
    }

    /// Channels subscribed for clients (the node's own are not).
    fn client_channels(&self) -> u64 {
        self.channels.len().saturating_sub(self.own) as u64
    }
}

impl Reactor {
    pub(super) fn send_reply(&self, reactor: usize, reply: Reply) {
        if let Some(r) = self.shared.reactors.get(reactor) {
            r.mailbox.reply(reply);
        }
    }

    /// Tells whoever asked for a PUBLISH how it went: a reactor, or the server API.
    pub(super) fn send_ack(&self, ack: Ack, result: Result<(), String>) {
        match ack.to {
            AckTo::Reactor(r) => self.send_reply(r, Reply::Published { ack, result }),
            AckTo::Api => self.shared.api_reply(ApiReply::Published {
                ticket: Ticket {
                    conn: ack.conn,
                    serial: ack.conn_serial,
                },
                result,
            }),
        }
    }

    /// The Redis reactor: a message on the nodes' control channel, from another node's API.
    fn on_control_message(&mut self, payload: &[u8]) {
        match control::parse(payload, &self.shared.node_id) {
            Ok(None) => {}
            Ok(Some(control::Command::Disconnect { user })) => {
                log::info!("disconnecting user {user:?}, as another node's server API asked");
                let user: std::sync::Arc<str> = user.into();
                for (i, r) in self.shared.reactors.iter().enumerate() {
                    let request = Control::Disconnect {
                        user: user.clone(),
                        reply: None,
                    };
                    if r.mailbox.try_control(request).is_err() {
                        log::warn!(
                            "reactor {i} has too many control requests waiting; user {user:?} stays connected there"
                        );
                    }
                }
            }
            Ok(Some(control::Command::Channels(ask))) => self.on_census_asked(ask),
            Err(why) => log::warn!("ignored a message on the control channel: {why}"),
        }
    }

    /// The Redis reactor: one request from a reactor of the node (itself included).
    pub(super) fn on_request(&mut self, request: Request) {
        match request {
            Request::Interest {
                reactor,
                channel,
                subscribe: true,
            } => self.hub_subscribe(reactor, channel),
            Request::Interest {
                reactor,
                channel,
                subscribe: false,
            } => self.hub_unsubscribe(reactor, channel),
            Request::Read(to) => self.hub_read(to),
            Request::Census(request) => self.on_census_request(request),
            Request::Presence(ask) => self.hub_presence(ask),
            Request::Publish {
                channel,
                payload,
                ack,
            } => {
                if let Some(keep) = self.history_of(&channel) {
                    return self.hub_append(channel, payload, ack, keep);
                }
                let Some(redis) = &mut self.redis else {
                    return;
                };
                let registry = self.poll.registry();
                if let Err((refused, ack)) =
                    redis.publish(&channel, payload, ack, registry, self.clock.now)
                {
                    match ack {
                        Some(ack) => self.send_ack(ack, Err(refused.message().to_string())),
                        None => self.metrics.publishes_dropped.inc(),
                    }
                }
            }
        }
    }

    /// The Redis reactor: `reactor` has its first subscriber of `channel`. SUBSCRIBEs when it
    /// is the node's first; answers at once unless the node's subscription is still unconfirmed.
    fn hub_subscribe(&mut self, reactor: usize, channel: Bytes) {
        let (Some(hub), Some(redis)) = (&mut self.hub, &mut self.redis) else {
            return;
        };
        let up = redis.can_subscribe(&channel);
        let created = !hub.channels.contains_key(&channel);
        let words = hub.words;
        let entry = hub
            .channels
            .entry(channel.clone())
            .or_insert_with(|| NodeChannel {
                reactors: vec![0; words],
                interested: 0,
                state: NodeState::Pending,
                waiting: Vec::new(),
            });
        entry.set(reactor, true);
        let answer = if !up {
            // Made when the link comes up; until then nothing reaches the node anyway.
            Some(Ok(()))
        } else {
            match &entry.state {
                NodeState::Confirmed => Some(Ok(())),
                NodeState::Refused(e) => Some(Err(e.clone())),
                NodeState::Pending => {
                    entry.waiting.push(reactor);
                    None
                }
            }
        };
        if created {
            if up {
                *hub.in_flight.entry(channel.clone()).or_default() += 1;
            }
            // A single link that is down ignores this (it subscribes everything on `Up`); a
            // cluster remembers it for when the shard is reachable.
            redis.set_interest(
                true,
                std::iter::once(&channel),
                self.poll.registry(),
                self.clock.now,
            );
        }
        self.metrics.redis_subscriptions.set(hub.client_channels());
        if let Some(result) = answer {
            self.send_reply(reactor, Reply::Subscribed { channel, result });
        }
    }

    /// The Redis reactor: `reactor` lost its last subscriber of `channel`. UNSUBSCRIBEs when no
    /// reactor of the node wants it any more.
    fn hub_unsubscribe(&mut self, reactor: usize, channel: Bytes) {
        let Some(hub) = &mut self.hub else {
            return;
        };
        if channel == control::CHANNEL {
            // Never a client's (the name is invalid for clients), and it stays subscribed.
            return;
        }
        let Some(entry) = hub.channels.get_mut(&channel) else {
            return;
        };
        entry.set(reactor, false);
        let gone = entry.interested == 0;
        // Its requests still waiting are answered now: it has nobody left to tell, but it counts
        // the replies it is owed.
        let mut owed = Vec::new();
        entry.waiting.retain(|r| {
            let keep = *r != reactor && !gone;
            if !keep {
                owed.push(*r);
            }
            keep
        });
        if gone {
            hub.channels.remove(&channel);
            self.metrics.redis_subscriptions.set(hub.client_channels());
            if let Some(redis) = &mut self.redis {
                redis.set_interest(
                    false,
                    std::iter::once(&channel),
                    self.poll.registry(),
                    self.clock.now,
                );
            }
        }
        for r in owed {
            let result = Ok(());
            let channel = channel.clone();
            self.send_reply(r, Reply::Subscribed { channel, result });
        }
    }

    /// The Redis reactor: Redis confirmed (or refused) one SUBSCRIBE of `channel`.
    fn hub_settled(&mut self, channel: Bytes, result: Result<(), String>) {
        let Some(hub) = &mut self.hub else {
            return;
        };
        match hub.in_flight.get_mut(&channel) {
            Some(n) if *n > 1 => {
                // An older SUBSCRIBE; the one that counts is still on its way.
                *n -= 1;
                return;
            }
            Some(_) => {
                hub.in_flight.remove(&channel);
            }
            None => {}
        }
        let Some(entry) = hub.channels.get_mut(&channel) else {
            return;
        };
        entry.state = match &result {
            Ok(()) => NodeState::Confirmed,
            Err(e) => NodeState::Refused(e.clone()),
        };
        let waiting = std::mem::take(&mut entry.waiting);
        for r in waiting {
            let (channel, result) = (channel.clone(), result.clone());
            self.send_reply(r, Reply::Subscribed { channel, result });
        }
    }

    /// The Redis reactor: a message from Redis, framed once, to every interested reactor.
    fn hub_deliver(&mut self, msg: &Message) {
        let Some(entry) = self
            .hub
            .as_ref()
            .and_then(|h| h.channels.get(&msg.channel[..]))
        else {
            return;
        };
        let mine = entry.has(self.index);
        for (w, word) in entry.reactors.iter().enumerate() {
            let mut bits = *word;
            // Bounded: each pass clears one of at most 64 bits.
            while bits != 0 {
                let r = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if r != self.index {
                    if let Some(peer) = self.shared.reactors.get(r) {
                        peer.mailbox.deliver(msg.clone());
                    }
                }
            }
        }
        if mine {
            self.deliver(msg);
        }
    }

    pub(super) fn on_redis_ready(&mut self, token: Token, writable: bool, readable: bool) {
        let Some(redis) = &mut self.redis else { return };
        redis.on_ready(
            token,
            self.poll.registry(),
            self.clock.now,
            writable,
            readable,
        );
        self.redis_events();
    }

    pub(super) fn continue_redis_reads(&mut self) {
        let Some(redis) = &mut self.redis else { return };
        redis.continue_reads(self.poll.registry(), self.clock.now);
        self.redis_events();
    }

    /// The Redis reactor: these channels are no longer subscribed in Redis (a shard went down
    /// or the slot moved); the cluster subscribes them again. Until then a subscribe waits for
    /// nothing, as with a link that is down.
    fn hub_lost(&mut self, channels: Vec<Bytes>) {
        let Some(hub) = &mut self.hub else { return };
        let mut owed = Vec::new();
        for channel in channels {
            hub.in_flight.remove(&channel);
            if let Some(entry) = hub.channels.get_mut(&channel) {
                entry.state = NodeState::Pending;
                for r in entry.waiting.drain(..) {
                    owed.push((r, channel.clone()));
                }
            }
        }
        for (r, channel) in owed {
            let result = Ok(());
            self.send_reply(r, Reply::Subscribed { channel, result });
        }
    }

    /// The Redis reactor: what its link reported.
    pub(super) fn redis_events(&mut self) {
        while let Some(event) = self.redis.as_mut().and_then(|r| r.next_event()) {
            match event {
                RedisEvent::Up => {
                    let (Some(hub), Some(redis)) = (&mut self.hub, &mut self.redis) else {
                        continue;
                    };
                    let names: Vec<Bytes> = hub.channels.keys().cloned().collect();
                    for name in &names {
                        *hub.in_flight.entry(name.clone()).or_default() += 1;
                    }
                    redis.set_interest(true, names.iter(), self.poll.registry(), self.clock.now);
                }
                RedisEvent::Down => {
                    let Some(hub) = &mut self.hub else { continue };
                    hub.in_flight.clear();
                    let mut owed = Vec::new();
                    for (name, entry) in hub.channels.iter_mut() {
                        entry.state = NodeState::Pending;
                        for r in entry.waiting.drain(..) {
                            owed.push((r, name.clone()));
                        }
                    }
                    // Subscribed again when the link is back; nothing reaches the node meanwhile.
                    for (r, channel) in owed {
                        let result = Ok(());
                        self.send_reply(r, Reply::Subscribed { channel, result });
                    }
                }
                RedisEvent::Subscribed { channel } => self.hub_settled(channel, Ok(())),
                RedisEvent::SubscribeRefused { channel, error } => {
                    self.hub_settled(channel, Err(error))
                }
                RedisEvent::Message { channel, payload } if channel == control::CHANNEL => {
                    self.on_control_message(&payload)
                }
                RedisEvent::Message { channel, payload } if self.is_census_reply(&channel) => {
                    self.on_census_part(payload)
                }
                RedisEvent::Message { channel, payload }
                    if payload.starts_with(crate::broker::presence::EVENT_MAGIC) =>
                {
                    // A join or leave (reactor::presence).
                    if let Some(msg) = self.presence_event(&channel, &payload) {
                        self.hub_deliver(&msg);
                    }
                }
                RedisEvent::Message { channel, payload } => {
                    self.metrics.redis_messages_in.inc();
                    let (offset, payload) = crate::broker::streams::unwrap_offset(payload);
                    let (from, payload) = crate::broker::origin::unwrap(payload);
                    if payload.len() > self.limits.max_message {
                        // Another Redis client published what no fanout client may send; passing it
                        // on could overflow every subscriber's queue and cut the whole channel.
                        self.metrics.redis_oversized.inc();
                        self.log_oversized(payload.len());
                        continue;
                    }
                    let text = std::str::from_utf8(&payload).is_ok();
                    let mut msg = Message::new(channel, &payload, text).with_from(from);
                    msg.offset = offset;
                    self.hub_deliver(&msg);
                }
                RedisEvent::Published { ack, result } => self.send_ack(ack, result),
                RedisEvent::Reply { tag, result } => self.on_call_reply(tag, result),
                RedisEvent::Lost { channels } => self.hub_lost(channels),
                // Handled inside the cluster's own links.
                RedisEvent::Topology(_)
                | RedisEvent::Migrated { .. }
                | RedisEvent::Moved { .. } => {}
            }
        }
        if let Some(redis) = &self.redis {
            let up = redis.ready();
            if let Some(me) = self.shared.reactors.get(self.index) {
                me.redis_up.store(up, Ordering::Release);
            }
            let counts = redis.counts();
            let m = &self.metrics;
            m.redis_link_up.set(counts.up);
            m.redis_links.set(counts.wanted);
            m.redis_reconnects.set(counts.reconnects);
            m.redis_cluster_shards.set(counts.shards);
            m.redis_cluster_moved.set(counts.moved);
            m.redis_cluster_refreshes.set(counts.refreshes);
        }
    }
}
