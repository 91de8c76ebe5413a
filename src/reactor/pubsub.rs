//! Pub/sub on one reactor: what clients' messages ask for (publish, subscribe, unsubscribe),
//! delivery to local subscribers, the queues from the other reactors of the node, and this
//! reactor's side of the node's Redis link (the link itself is in [`super::hub`]).
//!
//! Connections are reached only through [`Connections::open`](super::conns::Connections::open):
//! once a connection stopped being open, the rest of the requests it sent in the same read are
//! dropped and nothing can subscribe it again, so a channel never lists a closed connection.
//!
//! With `--redis`, reactor 0 is the node's Redis reactor: it alone holds the Redis link, so the
//! node has one Redis connection and one Redis subscription per channel whatever `--threads` is.
//! Every reactor (reactor 0 included, through its own mailbox, so there is one code path) tells
//! it when a channel gains its first or loses its last local subscriber, and hands it its
//! clients' publishes ([`Request`]). The Redis reactor keeps the node's table (`hub::Hub`): channel ->
//! which reactors want it; it SUBSCRIBEs on the first interested reactor and UNSUBSCRIBEs after
//! the last. A message from Redis is framed once and the same `Message` (its `Bytes` shared, not
//! copied) goes to its own subscribers and to the mailboxes of the interested reactors only.
//! Publish acks and subscription confirmations travel back as [`Reply`]s to the reactor and
//! connection (key + serial) that asked; a JSON `subscribe` is answered `ok` only once Redis has
//! confirmed the node's subscription, so a message published anywhere after the `ok` reaches it.

use std::collections::HashMap;

use bytes::Bytes;

use super::Reactor;
use crate::broker::bus::{Delivery, Reply, Request, MAILBOX_CAPACITY, MAX_AWAITED};
use crate::broker::channels::{Subscriber, Subscription};
use crate::broker::redis::{Ack, AckTo};
use crate::broker::{self, Compression, Message};
use crate::connection::{Action, Close};
use crate::metrics::CloseReason;
use crate::protocol;
use crate::ws::CloseCode;

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
    pub(super) awaited: usize,
}

impl Reactor {
    pub(super) fn redis_mode(&self) -> bool {
        self.shared.config.uses_redis()
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
                    let from = conn.identity().cloned();
                    let name = String::from_utf8_lossy(&channel);
                    let namespace = self.shared.config.namespace_for(&name);
                    if let Err(why) = namespace.may_publish(from.as_deref(), &name) {
                        match reply {
                            Some(id) => self.reply(key, id.as_deref(), Err(why)),
                            None => self.forbidden(key),
                        }
                        continue;
                    }
                    let msg = Message::from_frame(channel, frame, payload_at).with_from(from);
                    self.publish(key, msg, reply);
                }
                Action::Subscribe {
                    channel,
                    id,
                    since,
                    presence_events,
                } => {
                    let kept = self.history_of(channel.as_bytes());
                    match self.subscribe(key, &channel, presence_events) {
                        // The ok waits for the channel's history position (reactor::history),
                        // which also means the node is subscribed.
                        Ok(_) if kept.is_some() => {
                            if let Some(keep) = kept {
                                self.subscribe_kept(key, &channel, id, since, keep);
                            }
                        }
                        Ok(Subscribed::Now) => self.reply(key, id.as_deref(), Ok(())),
                        Ok(Subscribed::Pending) => {
                            self.await_subscription(key, channel.as_bytes(), id)
                        }
                        Err(e) => self.reply(key, id.as_deref(), Err(e)),
                    }
                }
                Action::History { channel, limit, id } => {
                    self.history_command(key, &channel, id, limit)
                }
                Action::Presence { channel, id } => self.presence_command(key, &channel, id, false),
                Action::PresenceStats { channel, id } => {
                    self.presence_command(key, &channel, id, true)
                }
                Action::Unsubscribe { channel, id } => {
                    self.unsubscribe_channel(key, channel.as_bytes());
                    self.reply(key, id.as_deref(), Ok(()));
                }
                Action::Refresh { token, id } => {
                    let result = self.refresh(key, &token);
                    self.reply(key, id.as_deref(), result);
                }
            }
        }
        self.actions = actions;
    }

    /// `{"op":"refresh"}`: a newer token for the same user replaces the connection's, and with
    /// it the time the connection is closed 4001.
    fn refresh(&mut self, key: usize, token: &str) -> Result<(), String> {
        let verifier = self.shared.config.auth.clone();
        if !verifier.has_keys() {
            return Err("refresh refused: this server has no token keys".into());
        }
        let identity = verifier
            .verify(token)
            .map_err(|why| format!("refresh refused: invalid token: {why}"))?;
        let Some(conn) = self.conns.open(key) else {
            return Ok(());
        };
        match conn.identity() {
            Some(current) if current.user != identity.user => {
                return Err(format!(
                    "refresh refused: the token is for user {:?}, this connection is {:?}",
                    identity.user, current.user
                ))
            }
            // An anonymous connection cannot become a user: per-user limits were counted at connect.
            None => return Err("refresh refused: this connection connected without a token".into()),
            Some(_) => {}
        }
        let deadline = super::routes::token_deadline(Some(&identity), self.clock.now_ms);
        conn.set_identity(Some(std::sync::Arc::new(identity)), deadline);
        Ok(())
    }

    /// Raw mode has no error replies: what its token's rules refuse closes it (4003).
    pub(super) fn forbidden(&mut self, key: usize) {
        self.close(
            key,
            Close::new(CloseCode::Forbidden, "forbidden", CloseReason::Auth),
        );
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
    pub(super) fn subscribe(
        &mut self,
        key: usize,
        name: &str,
        presence_events: bool,
    ) -> Result<Subscribed, String> {
        let max = self.shared.config.max_subscriptions;
        let Some(conn) = self.conns.open(key) else {
            return Err("connection is closing".into());
        };
        let namespace = self.shared.config.namespace_for(name);
        namespace.may_subscribe(conn.identity().map(|i| &**i), name)?;
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
            presence_events: presence_events && conn.is_json(),
            waiting: false,
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
        // After the interest: the node's SUBSCRIBE goes before the join's event.
        self.presence_join(key, sub);
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

    pub(super) fn unsubscribe_channel(&mut self, key: usize, name: &[u8]) {
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
        self.presence_leave(sub);
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
                    to: AckTo::Reactor(self.index),
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
            let payload = crate::broker::origin::wrap(msg.payload_bytes(), msg.from.as_deref());
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
        if let Some(keep) = self.history_of(&msg.channel) {
            self.publish_kept(msg, keep);
        } else {
            self.deliver(&msg);
            for (i, peer) in self.shared.reactors.iter().enumerate() {
                if i != self.index {
                    peer.mailbox.deliver(msg.clone());
                }
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
        // Bounded: at most bus::CONTROL_CAPACITY wait, plus the one drain.
        while let Ok(control) = self.inbox.control.try_recv() {
            if let Some(me) = self.shared.reactors.get(self.index) {
                me.mailbox.control_taken();
            }
            self.on_control(control);
        }
        let mut more = false;
        let mut left = DRAIN_BATCH;
        while left > 0 {
            match self.inbox.messages.try_recv() {
                Ok(Delivery::Message(msg)) => self.deliver(&msg),
                Ok(Delivery::Read(done)) => {
                    if self.redis_mode() {
                        self.uplink.awaited = self.uplink.awaited.saturating_sub(1);
                    }
                    self.on_read_done(*done)
                }
                Err(_) => break,
            }
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
            Reply::ReadFailed(to) => {
                self.read_failed(*to, "server busy: this reactor's queue is full")
            }
            Reply::Presence(answer) => self.on_presence_answer(*answer),
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
                self.unsubscribe_channel(w.conn, &channel);
            }
            self.reply(w.conn, w.id.as_deref(), result.clone());
        }
    }
}
