//! Pub/sub on one reactor: what clients' messages ask for (publish, subscribe, unsubscribe),
//! delivery to local subscribers, the queues from the other reactors of the node, and (on the
//! node's Redis reactor) the node's one Redis link.
//!
//! Connections are reached only through [`Connections::open`](super::conns::Connections::open):
//! once a connection stopped being open, the rest of the requests it sent in the same read are
//! dropped and nothing can subscribe it again, so a channel never lists a closed connection.
//!
//! With `--redis`, reactor 0 is the node's Redis reactor: it alone holds the Redis link, so the
//! node has one Redis connection and one Redis subscription per channel whatever `--threads` is.
//! Every reactor (reactor 0 included, through its own mailbox, so there is one code path) tells
//! it when a channel gains its first or loses its last local subscriber, and hands it its
//! clients' publishes ([`Request`]). The Redis reactor keeps the node's table [`Hub`]: channel ->
//! which reactors want it; it SUBSCRIBEs on the first interested reactor and UNSUBSCRIBEs after
//! the last. A message from Redis is framed once and the same `Message` (its `Bytes` shared, not
//! copied) goes to its own subscribers and to the mailboxes of the interested reactors only.
//! Publish acks and subscription confirmations travel back as [`Reply`]s to the reactor and
//! connection (key + serial) that asked; a JSON `subscribe` is answered `ok` only once Redis has
//! confirmed the node's subscription, so a message published anywhere after the `ok` reaches it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::Reactor;
use crate::broker::bus::{Control, Reply, Request, MAILBOX_CAPACITY, MAX_AWAITED};
use crate::broker::channels::{Subscriber, Subscription};
use crate::broker::redis::{Ack, RedisEvent};
use crate::broker::{self, Compression, Message};
use crate::connection::{Action, Close};
use crate::protocol;

/// The node's Redis reactor.
const HUB: usize = 0;
/// Most entries of one inbox queue handled per turn before the reactor lets its clients run.
const DRAIN_BATCH: usize = MAILBOX_CAPACITY;

/// Whether a subscription may be answered `ok` now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Subscribed {
    /// The node holds the Redis subscription (or there is no Redis).
    Now,
    /// The node's subscription is not confirmed yet: answer when the Redis reactor says so.
    Pending,
}

/// A JSON client waiting for the `ok` of a subscribe.
struct Waiter {
    conn: usize,
    serial: u64,
    id: Option<Box<str>>,
}

/// A channel whose node subscription this reactor asked for and has not heard back about.
#[derive(Default)]
struct Awaiting {
    /// Subscribe requests sent and not yet answered. Replies come in request order, so the
    /// channel is settled when the last one is answered (and none is still deferred).
    outstanding: u32,
    waiters: Vec<Waiter>,
}

/// Every reactor's side of the node's Redis link (only used with `--redis`).
#[derive(Default)]
pub(super) struct Uplink {
    awaiting: HashMap<Bytes, Awaiting>,
    /// Interest changes the Redis reactor's full queue (or the reply budget) did not take yet,
    /// retried every turn. One entry per channel: the next change of a channel is always the
    /// opposite of the last, so a second change cancels an unsent first one, and this table
    /// never holds more entries than channels.
    deferred: HashMap<Bytes, bool>,
    /// Replies the Redis reactor owes this reactor (see `bus::MAX_AWAITED`).
    awaited: usize,
}

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
}

impl Hub {
    pub(super) fn new(reactors: usize) -> Hub {
        Hub {
            channels: HashMap::new(),
            in_flight: HashMap::new(),
            words: reactors.div_ceil(64),
        }
    }
}

impl Reactor {
    fn redis_mode(&self) -> bool {
        self.shared.config.redis.is_some()
    }

    /// Carries out the requests parsed from one read, in order, while the connection stays open.
    pub(super) fn run_actions(&mut self, key: usize) {
        let mut actions = std::mem::take(&mut self.actions);
        for action in actions.drain(..) {
            let Some(conn) = self.conns.open(key) else {
                // An earlier request of the same read closed it (its own delivery overflowed its
                // queue, say): nothing more runs for it.
                break;
            };
            match action {
                Action::Publish {
                    channel,
                    frame,
                    payload_at,
                    reply,
                } => {
                    let channel = match channel {
                        Some(c) => c,
                        None => match conn
                            .first_subscription()
                            .and_then(|s| self.channels.channel(s))
                        {
                            Some(c) => c.name.clone(),
                            None => continue,
                        },
                    };
                    self.publish(key, Message::from_frame(channel, frame, payload_at), reply);
                }
                Action::Subscribe { channel, id } => match self.subscribe(key, &channel) {
                    Ok(Subscribed::Now) => self.reply(key, id.as_deref(), Ok(())),
                    Ok(Subscribed::Pending) => self.await_subscription(key, channel.as_bytes(), id),
                    Err(e) => self.reply(key, id.as_deref(), Err(e)),
                },
                Action::Unsubscribe { channel, id } => {
                    self.unsubscribe(key, channel.as_bytes());
                    self.reply(key, id.as_deref(), Ok(()));
                }
            }
        }
        self.actions = actions;
    }

    /// Queues a JSON `ok` or `error` reply; one that overflows the queue closes the connection.
    pub(super) fn reply(&mut self, key: usize, id: Option<&str>, result: Result<(), String>) {
        let Some(conn) = self.conns.open(key) else {
            return;
        };
        let frame = match result {
            Ok(()) => protocol::ok_reply(id),
            Err(e) => protocol::error_reply(id, &e),
        };
        self.metrics.messages_out.inc();
        if conn.send(frame, self.limits.max_queue).is_err() {
            self.close(key, Close::slow_consumer());
        }
        self.mark_dirty(key);
    }

    /// Subscribes a connection locally (telling the Redis reactor when the channel is new on
    /// this reactor); says whether the node's Redis subscription is already confirmed.
    pub(super) fn subscribe(&mut self, key: usize, name: &str) -> Result<Subscribed, String> {
        let max = self.shared.config.max_subscriptions;
        let Some(conn) = self.conns.open(key) else {
            return Err("connection is closing".into());
        };
        if let Some(id) = self.channels.id(name.as_bytes()) {
            if conn.is_subscribed(id) {
                return Ok(self.confirmation(name.as_bytes()));
            }
        }
        if conn.subscription_count() >= max {
            return Err(format!(
                "subscription limit reached: at most {max} channels per connection"
            ));
        }
        let subscriber = Subscriber {
            conn: key,
            json: conn.is_json(),
            deflate: conn.deflate(),
        };
        let (sub, first) = self.channels.subscribe_as(name.as_bytes(), subscriber);
        if let Err(sub) = conn.add_subscription(sub, max) {
            // Checked above; undo rather than leave the table pointing at it.
            self.release(sub);
            return Err("subscription refused".into());
        }
        if first {
            self.metrics.channels.set(self.channels.len() as u64);
            if self.redis_mode() {
                if let Some(name) = self.channels.channel(sub).map(|c| c.name.clone()) {
                    self.interest(name, true);
                }
            }
        }
        Ok(self.confirmation(name.as_bytes()))
    }

    fn confirmation(&self, name: &[u8]) -> Subscribed {
        if self.uplink.awaiting.contains_key(name) {
            Subscribed::Pending
        } else {
            Subscribed::Now
        }
    }

    /// Holds a JSON subscribe's `ok` until the Redis reactor confirms the node's subscription.
    fn await_subscription(&mut self, key: usize, name: &[u8], id: Option<Box<str>>) {
        let Some(serial) = self.conns.open(key).map(|c| c.serial()) else {
            return;
        };
        match self.uplink.awaiting.get_mut(name) {
            Some(awaiting) => awaiting.waiters.push(Waiter {
                conn: key,
                serial,
                id,
            }),
            None => self.reply(key, id.as_deref(), Ok(())),
        }
    }

    fn unsubscribe(&mut self, key: usize, name: &[u8]) {
        let Some(id) = self.channels.id(name) else {
            return;
        };
        let Some(sub) = self.conns.open(key).and_then(|c| c.remove_subscription(id)) else {
            return;
        };
        self.release(sub);
    }

    /// Takes one subscription out of the channel table (telling the Redis reactor when it was
    /// the last on this reactor).
    pub(super) fn release(&mut self, sub: Subscription) {
        if let Some(name) = self.channels.unsubscribe(sub) {
            self.metrics.channels.set(self.channels.len() as u64);
            if self.redis_mode() {
                self.interest(name, false);
            }
        }
    }

    /// A channel gained its first (`subscribe`) or lost its last local subscriber: tell the
    /// Redis reactor, or keep the change to retry when its queue is full.
    fn interest(&mut self, channel: Bytes, subscribe: bool) {
        let up = &mut self.uplink;
        if up.deferred.remove(&channel).is_some() {
            // The opposite change never left: the Redis reactor already has what we want now.
            if !subscribe
                && up
                    .awaiting
                    .get(&channel)
                    .is_some_and(|a| a.outstanding == 0)
            {
                up.awaiting.remove(&channel);
            }
            return;
        }
        if subscribe {
            up.awaiting.entry(channel.clone()).or_default();
        }
        if !self.send_interest(&channel, subscribe) {
            self.uplink.deferred.insert(channel, subscribe);
        }
    }

    /// Hands one interest change to the Redis reactor; `false` when it cannot take it now.
    fn send_interest(&mut self, channel: &Bytes, subscribe: bool) -> bool {
        // A subscribe is answered: it must fit the replies this reactor may be owed.
        if subscribe && self.uplink.awaited >= MAX_AWAITED {
            return false;
        }
        let request = Request::Interest {
            reactor: self.index,
            channel: channel.clone(),
            subscribe,
        };
        let Some(hub) = self.shared.reactors.get(HUB) else {
            return false;
        };
        if hub.mailbox.request(request).is_err() {
            return false;
        }
        let up = &mut self.uplink;
        if subscribe {
            up.awaited += 1;
            if let Some(awaiting) = up.awaiting.get_mut(channel) {
                awaiting.outstanding += 1;
            }
        } else if up.awaiting.get(channel).is_some_and(|a| a.outstanding == 0) {
            up.awaiting.remove(channel);
        }
        true
    }

    /// Retries the interest changes a full queue did not take (every turn; cheap when none).
    pub(super) fn retry_deferred(&mut self) {
        if self.uplink.deferred.is_empty() {
            return;
        }
        let due: Vec<(Bytes, bool)> = self
            .uplink
            .deferred
            .iter()
            .map(|(c, s)| (c.clone(), *s))
            .collect();
        for (channel, subscribe) in due {
            // Removed first: `send_interest` must not see its own change as still deferred.
            self.uplink.deferred.remove(&channel);
            if !self.send_interest(&channel, subscribe) {
                self.uplink.deferred.insert(channel, subscribe);
                break;
            }
        }
    }

    fn publish(&mut self, key: usize, msg: Message, reply: Option<Option<Box<str>>>) {
        self.metrics.publishes.inc();
        if self.redis_mode() {
            let ack = match (reply, self.conns.open(key)) {
                (Some(id), Some(conn)) => Some(Ack {
                    reactor: self.index,
                    conn: key,
                    conn_serial: conn.serial(),
                    id,
                }),
                _ => None,
            };
            if let Some(ack) = &ack {
                if self.uplink.awaited >= MAX_AWAITED {
                    let why = "redis unavailable: too many publishes of this reactor wait for Redis; message not published";
                    self.reply(key, ack.id.as_deref(), Err(why.into()));
                    return;
                }
            }
            let acked = ack.is_some();
            let payload = msg.payload_bytes();
            let request = Request::Publish {
                channel: msg.channel,
                payload,
                ack,
            };
            match self
                .shared
                .reactors
                .get(HUB)
                .map(|h| h.mailbox.request(request))
            {
                Some(Ok(())) => self.uplink.awaited += acked as usize,
                Some(Err(Request::Publish { ack: Some(ack), .. })) => {
                    let why = "redis unavailable: the node's queue to Redis is full; message not published";
                    self.reply(ack.conn, ack.id.as_deref(), Err(why.into()));
                }
                _ => self.metrics.publishes_dropped.inc(),
            }
            return;
        }
        self.deliver(&msg);
        for (i, peer) in self.shared.reactors.iter().enumerate() {
            if i != self.index {
                peer.mailbox.deliver(msg.clone());
            }
        }
        if let Some(id) = reply {
            self.reply(key, id.as_deref(), Ok(()));
        }
    }

    /// Queues one message to every local subscriber of its channel: the raw frame and (built
    /// once, if anyone needs it) the JSON envelope are shared, not copied, per subscriber.
    pub fn deliver(&mut self, msg: &Message) {
        let max_queue = self.limits.max_queue;
        let (conns, dirty, metrics) = (&mut self.conns, &mut self.dirty, &self.metrics);
        let mut overflowed = Vec::new();
        let mut delivered = 0;
        let compression = self.shared.config.compression.then(|| Compression {
            compressor: &mut self.compressor,
            min_bytes: self.shared.config.compression_min_bytes,
        });
        broker::fanout(
            &self.channels,
            msg,
            &mut self.json_scratch,
            compression,
            |key, frame| {
                let Some(conn) = conns.open(key) else {
                    debug_assert!(false, "channel lists connection {key}, which is not open");
                    return;
                };
                // A full queue can mean only that this turn queued faster than the flush at its end
                // drains: let the socket take what it can now (a syscall only on this rare path) and
                // call the client slow only if the frame still does not fit.
                let fits = conn.send(frame.clone(), max_queue).is_ok()
                    || match conn.flush() {
                        Ok((written, _)) => {
                            metrics.bytes_out.add(written as u64);
                            conn.send(frame.clone(), max_queue).is_ok()
                        }
                        Err(_) => false,
                    };
                if !fits {
                    // Closed after the fanout, which holds the channel table.
                    overflowed.push(key);
                    return;
                }
                delivered += 1;
                if conn.mark_dirty() {
                    dirty.push(key);
                }
            },
        );
        self.metrics.deliveries.add(delivered);
        self.metrics.messages_out.add(delivered);
        for key in overflowed {
            log::debug!(
                "closing a slow consumer: outgoing queue over {} bytes",
                max_queue
            );
            self.close(key, Close::slow_consumer());
        }
    }

    /// Everything other threads queued for this reactor since it last looked. Each queue is
    /// drained up to a batch per turn; when one has more the reactor wakes itself for the rest.
    pub(super) fn drain_inbox(&mut self) {
        if let Some(me) = self.shared.reactors.get(self.index) {
            me.mailbox.rearm();
        }
        while let Ok(Control::Drain { deadline }) = self.inbox.control.try_recv() {
            self.start_drain(deadline);
        }
        let mut more = false;
        let mut left = DRAIN_BATCH;
        while left > 0 {
            let Ok(msg) = self.inbox.messages.try_recv() else {
                break;
            };
            self.deliver(&msg);
            left -= 1;
        }
        more |= left == 0;
        if self.hub.is_some() {
            let mut left = DRAIN_BATCH;
            while left > 0 {
                let Ok(request) = self.inbox.requests.try_recv() else {
                    break;
                };
                self.on_request(request);
                left -= 1;
            }
            more |= left == 0;
        }
        let mut left = MAX_AWAITED;
        while left > 0 {
            let Ok(reply) = self.inbox.replies.try_recv() else {
                break;
            };
            self.on_reply(reply);
            left -= 1;
        }
        more |= left == 0;
        if more {
            if let Some(me) = self.shared.reactors.get(self.index) {
                me.mailbox.nudge();
            }
        }
    }

    /// A publish ack or subscription confirmation from the Redis reactor.
    fn on_reply(&mut self, reply: Reply) {
        self.uplink.awaited = self.uplink.awaited.saturating_sub(1);
        match reply {
            Reply::Published { ack, result } => {
                if self
                    .conns
                    .open_with_serial(ack.conn, ack.conn_serial)
                    .is_some()
                {
                    self.reply(ack.conn, ack.id.as_deref(), result);
                }
            }
            Reply::Subscribed { channel, result } => self.settle(channel, result),
        }
    }

    /// One subscribe request for `channel` was answered; once the last one is, the waiting
    /// JSON clients get their `ok` (or the refusal, and are unsubscribed).
    fn settle(&mut self, channel: Bytes, result: Result<(), String>) {
        let up = &mut self.uplink;
        let Some(awaiting) = up.awaiting.get_mut(&channel) else {
            return;
        };
        awaiting.outstanding = awaiting.outstanding.saturating_sub(1);
        if awaiting.outstanding > 0 || up.deferred.get(&channel) == Some(&true) {
            return;
        }
        let Some(awaiting) = up.awaiting.remove(&channel) else {
            return;
        };
        let result = result.map_err(|e| format!("subscribe refused by Redis: {e}"));
        for w in awaiting.waiters {
            if self.conns.open_with_serial(w.conn, w.serial).is_none() {
                continue;
            }
            if result.is_err() {
                self.unsubscribe(w.conn, &channel);
            }
            self.reply(w.conn, w.id.as_deref(), result.clone());
        }
    }

    fn send_reply(&self, reactor: usize, reply: Reply) {
        if let Some(r) = self.shared.reactors.get(reactor) {
            r.mailbox.reply(reply);
        }
    }

    /// The Redis reactor: one request from a reactor of the node (itself included).
    fn on_request(&mut self, request: Request) {
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
            Request::Publish {
                channel,
                payload,
                ack,
            } => {
                let Some(redis) = &mut self.redis else {
                    return;
                };
                let registry = self.poll.registry();
                if let Err((refused, ack)) =
                    redis.publish(&channel, payload, ack, registry, self.clock.now)
                {
                    match ack {
                        Some(ack) => {
                            let result = Err(refused.message().to_string());
                            self.send_reply(ack.reactor, Reply::Published { ack, result });
                        }
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
        let up = redis.is_up();
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
        if created && up {
            *hub.in_flight.entry(channel.clone()).or_default() += 1;
            redis.set_interest(
                true,
                std::iter::once(&channel),
                self.poll.registry(),
                self.clock.now,
            );
        }
        self.metrics
            .redis_subscriptions
            .set(hub.channels.len() as u64);
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
            self.metrics
                .redis_subscriptions
                .set(hub.channels.len() as u64);
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

    pub(super) fn on_redis_ready(&mut self, writable: bool, readable: bool) {
        let Some(redis) = &mut self.redis else { return };
        redis.on_ready(self.poll.registry(), self.clock.now, writable, readable);
        self.redis_events();
    }

    /// The Redis reactor: what its link reported.
    pub(super) fn redis_events(&mut self) {
        while let Some(event) = self.redis.as_mut().and_then(|r| r.events.pop_front()) {
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
                RedisEvent::Message { channel, payload } => {
                    self.metrics.redis_messages_in.inc();
                    if payload.len() > self.limits.max_message {
                        // Another Redis client published what no fanout client may send; passing it
                        // on could overflow every subscriber's queue and cut the whole channel.
                        self.metrics.redis_oversized.inc();
                        self.log_oversized(payload.len());
                        continue;
                    }
                    let text = std::str::from_utf8(&payload).is_ok();
                    let msg = Message::new(channel, &payload, text);
                    self.hub_deliver(&msg);
                }
                RedisEvent::Published { ack, result } => {
                    self.send_reply(ack.reactor, Reply::Published { ack, result })
                }
            }
        }
        if let Some(redis) = &self.redis {
            let up = redis.is_up();
            if let Some(me) = self.shared.reactors.get(self.index) {
                me.redis_up.store(up, Ordering::Release);
            }
            self.metrics.redis_link_up.set(up as u64);
            self.metrics.redis_reconnects.set(redis.reconnects());
        }
    }
}
