//! Presence on a reactor (see `broker::presence` for the store, the Redis layout and why).
//!
//! - A subscription to a channel of a namespace with `presence = true` makes its connection a
//!   member ([`Reactor::presence_join`], from `subscribe`); releasing it (unsubscribe, close,
//!   a close by the server) ends that ([`Reactor::presence_leave`], from `release`).
//! - Standalone, the node's store is the truth: a join or leave changes it and hands the event
//!   to every reactor's queue under the store's lock, so every reactor sees a channel's events
//!   in one order; `presence` and `presence_stats` read it directly.
//! - With Redis, a change is queued in the store and the Redis reactor is woken (once per
//!   batch); it sends each change as the join or leave script, which updates the channel's
//!   keys and publishes the event on the channel, so every node (this one too) delivers it to
//!   its subscribers that asked. `presence` and `presence_stats` go to the Redis reactor, which
//!   first sends the changes still queued (so a client's own join comes before its read on the
//!   same link) and then the read script. Every `--presence-ttl / 3` it refreshes the channels
//!   the node has members in, and writes a channel's members again when Redis lost them or a
//!   change could not be sent.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use redis_protocol::resp3::types::BytesFrame;

use super::calls::Call;
use super::Reactor;
use crate::broker::bus::{Reply, Request, MAILBOX_CAPACITY, MAX_AWAITED};
use crate::broker::channels::Subscription;
use crate::broker::presence::{self, Answer, Ask, Member, Op, Pending, Scope, MAX_LIST};
use crate::connection::Close;
use crate::protocol;

/// The node's Redis reactor.
const HUB: usize = 0;
/// Shortest refresh period, whatever `--presence-ttl` says.
const MIN_REFRESH_MS: u64 = 100;

impl Reactor {
    /// Whether `channel`'s namespace tracks presence.
    fn presence_on(&self, channel: &[u8]) -> bool {
        std::str::from_utf8(channel)
            .is_ok_and(|name| self.shared.config.namespace_for(name).presence)
    }

    /// The channel of `sub`, when its namespace tracks presence.
    fn presence_channel(&self, sub: Subscription) -> Option<Bytes> {
        let channel = self.channels.channel(sub)?;
        self.presence_on(&channel.name)
            .then(|| channel.name.clone())
    }

    /// A subscription was added: its connection joins the channel's presence, if it has one.
    pub(super) fn presence_join(&mut self, key: usize, sub: Subscription) {
        let Some(name) = self.presence_channel(sub) else {
            return;
        };
        let Some(conn) = self.conns.open(key) else {
            return;
        };
        let client: Arc<str> =
            format!("{}.{}.{}", self.shared.node_id, self.index, conn.serial()).into();
        let member = Member::new(client, conn.identity().map(|i| &**i));
        let json = member.json.clone();
        let shared = self.shared.clone();
        let mut store = shared.presence.lock();
        if !store.join((self.index, sub.channel, sub.slot), &name, member) {
            return;
        }
        self.metrics.presence_joins.inc();
        if self.redis_mode() {
            drop(store);
            self.wake_presence();
        } else {
            // Under the lock: every reactor gets the channel's events in one order.
            self.broadcast_event(Op::Join, &name, &json);
        }
    }

    /// A subscription is about to be released: its member, if it was one, leaves.
    pub(super) fn presence_leave(&mut self, sub: Subscription) {
        let on = self
            .channels
            .channel(sub)
            .is_some_and(|c| self.presence_on(&c.name));
        if !on {
            return;
        }
        let shared = self.shared.clone();
        let mut store = shared.presence.lock();
        let Some((channel, member)) = store.leave((self.index, sub.channel, sub.slot)) else {
            return;
        };
        self.metrics.presence_leaves.inc();
        if self.redis_mode() {
            drop(store);
            self.wake_presence();
        } else {
            self.broadcast_event(Op::Leave, &channel, &member.json);
        }
    }

    /// Standalone: the event to every reactor's queue (this one's too).
    fn broadcast_event(&self, op: Op, channel: &Bytes, member: &[u8]) {
        let msg = presence::event_message(op, channel, member);
        for reactor in &self.shared.reactors {
            reactor.mailbox.deliver(msg.clone());
        }
    }

    /// With Redis: changes wait in the store; the Redis reactor is woken once per batch (it
    /// looks at the flag every turn, so it needs no waking for its own).
    fn wake_presence(&self) {
        if self.shared.presence.raise() && self.index != HUB {
            if let Some(hub) = self.shared.reactors.get(HUB) {
                hub.mailbox.nudge();
            }
        }
    }

    /// `{"op":"presence"}` and `{"op":"presence_stats"}`: allowed to clients that may subscribe
    /// to the channel.
    pub(super) fn presence_command(
        &mut self,
        key: usize,
        channel: &str,
        id: Option<Box<str>>,
        stats: bool,
    ) {
        let Some(conn) = self.conns.open(key) else {
            return;
        };
        let ns = self.shared.config.namespace_for(channel);
        if let Err(why) = ns.may_subscribe(conn.identity().map(|i| &**i), channel) {
            return self.reply(key, id.as_deref(), Err(why));
        }
        if !ns.presence {
            let why = format!(
                "presence is off for channel {channel:?} (namespace {:?} has no presence)",
                ns.pattern
            );
            return self.reply(key, id.as_deref(), Err(why));
        }
        let serial = conn.serial();
        let name = channel.as_bytes();
        if !self.redis_mode() {
            let frame = if stats {
                let s = self.shared.presence.lock().stats(name);
                protocol::presence_stats_reply(id.as_deref(), name, s.clients, s.users)
            } else {
                // The lock is held only to copy the list (reference counts), not to write it.
                let (list, truncated) = self.shared.presence.lock().list(name, MAX_LIST);
                let members = list.iter().map(|m| &m[..]);
                protocol::presence_reply(
                    id.as_deref(),
                    name,
                    members,
                    truncated,
                    &mut self.json_scratch,
                )
            };
            self.send_presence(key, frame);
            return;
        }
        if self.uplink.awaited >= MAX_AWAITED {
            let why = "server busy: too many requests wait for Redis";
            return self.reply(key, id.as_deref(), Err(why.into()));
        }
        let ask = Ask {
            reactor: self.index,
            conn: key,
            serial,
            id,
            channel: Bytes::copy_from_slice(name),
            stats,
        };
        let request = Request::Presence(Box::new(ask));
        match self
            .shared
            .reactors
            .get(HUB)
            .map(|h| h.mailbox.request(request))
        {
            Some(Ok(())) => self.uplink.awaited += 1,
            Some(Err(Request::Presence(ask))) => {
                let why = "server busy: the node's queue to Redis is full";
                self.reply(key, ask.id.as_deref(), Err(why.into()));
            }
            _ => {}
        }
    }

    /// Queues a presence reply; one that overflows the queue closes the connection.
    fn send_presence(&mut self, key: usize, frame: Bytes) {
        let Some(conn) = self.conns.open(key) else {
            return;
        };
        self.metrics.messages_out.inc();
        if conn.send(frame, self.limits.max_queue).is_err() {
            return self.close(key, Close::slow_consumer());
        }
        self.mark_dirty(key);
    }

    /// The answer to a presence command this reactor sent the Redis reactor.
    pub(super) fn on_presence_answer(&mut self, answer: Answer) {
        let Answer { ask, frame } = answer;
        if self.conns.open_with_serial(ask.conn, ask.serial).is_some() {
            self.send_presence(ask.conn, frame);
        }
    }

    /// The Redis reactor: what presence needs every turn: the changes queued (when the flag
    /// is up) and, every `--presence-ttl / 3`, the refresh of the node's channels.
    pub(super) fn presence_tick(&mut self) {
        if self.hub.is_none() {
            return;
        }
        // The link (or a shard) came back: refresh now, which finds out whether Redis lost the
        // node's members (a restart), and write again what failed meanwhile.
        let now_ms = self.clock.now_ms;
        let up = self.redis.as_ref().is_some_and(|r| r.ready());
        if up && !self.timers.presence_link_up {
            self.timers.presence_refresh_ms = now_ms;
        }
        self.timers.presence_link_up = up;
        if now_ms >= self.timers.presence_refresh_ms {
            let ttl_ms = self.shared.config.presence_ttl.as_millis() as u64;
            self.timers.presence_refresh_ms = now_ms + (ttl_ms / 3).max(MIN_REFRESH_MS);
            self.presence_refresh();
        }
        self.presence_flush();
    }

    /// The Redis reactor, when the node stops after its drain: the changes still queued, then
    /// every channel the node has members in written as empty (its members leave, with their
    /// events), so a drained node leaves presence at once instead of after `--presence-ttl`.
    /// Best effort: what the link cannot send before the process exits expires with the TTL.
    pub(super) fn presence_farewell(&mut self) {
        if self.hub.is_none() {
            return;
        }
        self.shared.presence.raise();
        self.presence_flush();
        let channels = self.shared.presence.lock().channels();
        self.presence_call_each(
            channels,
            |scope, name| presence::sync_args(scope, name, &[]),
            |channel| Call::PresenceSync { channel },
        );
    }

    /// The Redis reactor: one refresh script per channel the node has members in; channels
    /// marked to be written again are, with the next flush.
    fn presence_refresh(&mut self) {
        let channels = self.shared.presence.lock().channels();
        self.shared.presence.raise();
        self.presence_call_each(channels, presence::refresh_args, |channel| {
            Call::PresenceRefresh { channel }
        });
    }

    /// The Redis reactor: one script per channel, its arguments from `args` (given the
    /// channel's Redis name), its reply routed as `call` says. A link that is down refuses it:
    /// the next refresh tries again.
    fn presence_call_each(
        &mut self,
        channels: Vec<Bytes>,
        args: impl Fn(&Scope, &Bytes) -> Vec<Bytes>,
        call: impl Fn(Bytes) -> Call,
    ) {
        let (Some(hub), Some(redis)) = (&mut self.hub, &mut self.redis) else {
            return;
        };
        let scope = Scope {
            node: &self.shared.node_id,
            ttl: self.shared.config.presence_ttl,
            sharded: redis.is_cluster(),
        };
        let registry = self.poll.registry();
        for channel in channels {
            let args = args(&scope, &redis.redis_name(&channel));
            let tag = hub.calls.next_tag();
            if redis
                .call(&channel, args.into_iter(), tag, registry, self.clock.now)
                .is_ok()
            {
                hub.calls.sent(tag, call(channel));
            }
        }
    }

    /// The Redis reactor: sends the changes queued and writes again the channels marked so.
    ///
    /// The requests already waiting in its queue are handled first: a reactor asks for a
    /// channel's node subscription before it queues its client's join, so the SUBSCRIBE goes
    /// out before the join's event is published, and the node's first subscriber of a channel
    /// gets its own join too. The queue holds at most `MAILBOX_CAPACITY` requests, so draining
    /// that many takes every one queued before the changes were taken.
    pub(super) fn presence_flush(&mut self) {
        if !self.shared.presence.take_flag() {
            return;
        }
        let taken = self.take_presence();
        let mut asks = Vec::new();
        let mut left = MAILBOX_CAPACITY;
        while left > 0 {
            let Ok(request) = self.inbox.requests.try_recv() else {
                break;
            };
            match request {
                // Read after the changes, below.
                Request::Presence(ask) => asks.push(ask),
                other => self.on_request(other),
            }
            left -= 1;
        }
        self.send_presence_changes(taken);
        if !asks.is_empty() {
            // Their clients' own changes may have been queued since: those go first.
            if self.shared.presence.take_flag() {
                let taken = self.take_presence();
                self.send_presence_changes(taken);
            }
            for ask in asks {
                self.presence_read(ask);
            }
        }
    }

    /// The changes queued and the channels to write again, with their members.
    fn take_presence(&self) -> (VecDeque<Pending>, Vec<(Bytes, Vec<Member>)>) {
        let mut store = self.shared.presence.lock();
        let ops = store.take_ops();
        let resync = store
            .take_resync()
            .into_iter()
            .map(|c| {
                let members = store.members_of(&c);
                (c, members)
            })
            .collect();
        (ops, resync)
    }

    fn send_presence_changes(&mut self, taken: (VecDeque<Pending>, Vec<(Bytes, Vec<Member>)>)) {
        let (ops, resync) = taken;
        if ops.is_empty() && resync.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let (Some(hub), Some(redis)) = (&mut self.hub, &mut self.redis) else {
            return;
        };
        let scope = Scope {
            node: &shared.node_id,
            ttl: shared.config.presence_ttl,
            sharded: redis.is_cluster(),
        };
        let registry = self.poll.registry();
        let now = self.clock.now;
        let mut failed = Vec::new();
        for op in ops {
            let args = presence::op_args(&scope, &redis.redis_name(&op.channel), &op);
            let tag = hub.calls.next_tag();
            match redis.call(&op.channel, args.into_iter(), tag, registry, now) {
                Ok(()) => hub.calls.sent(
                    tag,
                    Call::PresenceChange {
                        channel: op.channel,
                        join: op.op == Op::Join,
                    },
                ),
                // Its event is lost; the channel's members are written again.
                Err(_) => failed.push(op.channel),
            }
        }
        for (channel, members) in resync {
            self.metrics.presence_resyncs.inc();
            let args = presence::sync_args(&scope, &redis.redis_name(&channel), &members);
            let tag = hub.calls.next_tag();
            match redis.call(&channel, args.into_iter(), tag, registry, now) {
                Ok(()) => hub.calls.sent(tag, Call::PresenceSync { channel }),
                Err(_) => failed.push(channel),
            }
        }
        if !failed.is_empty() {
            // Tried again at the next refresh.
            let mut store = shared.presence.lock();
            for channel in failed {
                store.mark_resync(channel);
            }
        }
    }

    /// The Redis reactor: a join, leave or sync script answered. A change Redis did not take
    /// has its channel written again; a join that found the node missing from the channel's
    /// nodes too (Redis may have lost its other members).
    pub(super) fn on_presence_change_reply(
        &mut self,
        channel: Bytes,
        join: bool,
        result: Result<BytesFrame, String>,
    ) {
        let again = match result {
            Err(e) => {
                // Per change: a link lost with many in flight must not flood the log (the
                // link's own failure is logged).
                log::debug!("redis: a presence change failed: {e}");
                true
            }
            Ok(reply) if join => presence::parse_added(&reply).unwrap_or(true),
            Ok(_) => false,
        };
        if again {
            let mut store = self.shared.presence.lock();
            // The node's first member there adds the node: nothing else can be missing.
            if !join || store.count_of(&channel) > 1 {
                store.mark_resync(channel);
                drop(store);
                self.shared.presence.raise();
            }
        }
    }

    /// The Redis reactor: a refresh answered; a node missing from the channel's nodes writes
    /// its members again (next turn).
    pub(super) fn on_presence_refresh_reply(
        &mut self,
        channel: Bytes,
        result: Result<BytesFrame, String>,
    ) {
        if let Ok(true) = result.and_then(|r| presence::parse_added(&r)) {
            self.shared.presence.lock().mark_resync(channel);
            self.shared.presence.raise();
        }
    }

    /// The Redis reactor: a sync that failed is tried again at the next refresh.
    pub(super) fn on_presence_sync_reply(
        &mut self,
        channel: Bytes,
        result: Result<BytesFrame, String>,
    ) {
        if let Err(e) = result {
            log::warn!("redis: writing the node's presence again failed: {e}");
            self.shared.presence.lock().mark_resync(channel);
        }
    }

    /// The Redis reactor: a reactor's presence command, sent as the read script behind the
    /// changes still queued.
    pub(super) fn hub_presence(&mut self, ask: Box<Ask>) {
        self.presence_flush();
        self.presence_read(ask);
    }

    fn presence_read(&mut self, ask: Box<Ask>) {
        let (Some(hub), Some(redis)) = (&mut self.hub, &mut self.redis) else {
            return;
        };
        let scope = Scope {
            node: &self.shared.node_id,
            ttl: self.shared.config.presence_ttl,
            sharded: redis.is_cluster(),
        };
        let args =
            presence::read_args(&scope, &redis.redis_name(&ask.channel), ask.stats, MAX_LIST);
        let tag = hub.calls.next_tag();
        let registry = self.poll.registry();
        match redis.call(
            &ask.channel,
            args.into_iter(),
            tag,
            registry,
            self.clock.now,
        ) {
            Ok(()) => hub.calls.sent(tag, Call::PresenceRead { ask }),
            Err(refused) => {
                let why = format!("presence unavailable: {}", refused.message());
                let frame = protocol::error_reply(ask.id.as_deref(), &why);
                self.answer_presence(*ask, frame);
            }
        }
    }

    pub(super) fn on_presence_read_reply(&mut self, ask: Ask, result: Result<BytesFrame, String>) {
        let id = ask.id.as_deref();
        let frame = match result.and_then(presence::parse_read) {
            Ok(read) if ask.stats => protocol::presence_stats_reply(
                id,
                &ask.channel,
                read.stats.clients,
                read.stats.users,
            ),
            Ok(read) => protocol::presence_reply(
                id,
                &ask.channel,
                read.members.iter().map(|m| &m[..]),
                read.truncated,
                &mut self.json_scratch,
            ),
            Err(e) => protocol::error_reply(id, &format!("presence unavailable: {e}")),
        };
        self.answer_presence(ask, frame);
    }

    /// The Redis reactor: hands the answer to the reactor that asked (or sends it, when it
    /// asked itself).
    fn answer_presence(&mut self, ask: Ask, frame: Bytes) {
        if ask.reactor == self.index {
            self.uplink.awaited = self.uplink.awaited.saturating_sub(1);
            return self.on_presence_answer(Answer { ask, frame });
        }
        let reactor = ask.reactor;
        self.send_reply(reactor, Reply::Presence(Box::new(Answer { ask, frame })));
    }

    /// The Redis reactor: a presence event from Redis, for the subscribers that asked.
    pub(super) fn presence_event(
        &self,
        channel: &Bytes,
        payload: &[u8],
    ) -> Option<crate::broker::Message> {
        if !self.presence_on(channel) {
            return None;
        }
        let (op, member) = presence::parse_event(payload)?;
        Some(presence::event_message(op, channel, member))
    }
}
