//! Channel history on a reactor: publishing on channels whose namespace keeps history, the
//! position a subscribe is answered with, recovery of what a client missed, and the `history`
//! command. The store is the node's ([`crate::broker::history`]) when standalone, a Redis stream
//! per channel otherwise ([`crate::broker::streams`]), read and appended by the Redis reactor.
//!
//! Recovery without gap or duplicate: a JSON subscriber of such a channel joins the channel
//! table at once but *waiting* (it gets no live message), and a history read is made whose
//! answer travels in the same ordered stream as the channel's live messages:
//! - standalone, the read and every publish on the channel hold the store's lock while they
//!   queue to the reactors' message queues, so the answer sits exactly between the messages
//!   older than the read and the newer ones;
//! - with Redis, the read script runs on the same connection (the shard's, in a cluster) that
//!   holds the node's subscription, after the SUBSCRIBE, so Redis sends the messages older than
//!   the read before its reply and the newer ones after; the Redis reactor hands the answer on
//!   behind the messages it already queued.
//!
//! Everything a waiting subscriber skipped is therefore at or below the offset the answer
//! reports: the `ok` carries that offset and epoch, the missed messages follow (when the client
//! gave `since` and the history still reaches back), and then live messages resume.

use bytes::Bytes;
use redis_protocol::resp3::types::BytesFrame;

use super::calls::Call;
use super::Reactor;
use crate::broker::bus::{ApiReply, Purpose, ReadDone, ReadFor, Reply, Request, Ticket};
use crate::broker::channels::Subscription;
use crate::broker::history::{Keep, Page, Range};
use crate::broker::redis::{Ack, AckTo};
use crate::broker::{streams, Message};
use crate::connection::Close;
use crate::protocol::{self, Position};

/// Most messages a recovery sends; a client further behind is told `recovered: false`.
pub const MAX_RECOVERY: usize = 1000;

impl Reactor {
    /// What `channel`'s namespace keeps, when it keeps history.
    pub(super) fn history_of(&self, channel: &[u8]) -> Option<Keep> {
        self.shared.history_of(channel)
    }

    /// Standalone: appends the message and hands it to every reactor, this one too (see
    /// [`crate::node::Shared::publish_kept`]).
    pub(super) fn publish_kept(&mut self, msg: Message, keep: Keep) {
        self.shared.publish_kept(msg, keep, self.clock.now, false);
    }

    /// Starts the history read of a JSON `subscribe` on a channel with history: the connection
    /// is subscribed already; it waits for the read's answer (see the module comment).
    pub(super) fn subscribe_kept(
        &mut self,
        key: usize,
        channel: &str,
        id: Option<Box<str>>,
        since: Option<Position>,
        keep: Keep,
    ) {
        let Some(sub) = self.subscription_of(key, channel.as_bytes()) else {
            return;
        };
        if let Some(s) = self.channels.subscriber_mut(sub) {
            s.waiting = true;
        }
        let purpose = Purpose::Subscribe { since };
        self.read_history(key, channel, id, purpose, keep);
    }

    /// `{"op":"history"}`: the newest messages of a channel the client may subscribe to.
    pub(super) fn history_command(
        &mut self,
        key: usize,
        channel: &str,
        id: Option<Box<str>>,
        limit: usize,
    ) {
        let Some(conn) = self.conns.open(key) else {
            return;
        };
        let ns = self.shared.config.namespace_for(channel);
        if let Err(why) = ns.may_subscribe(conn.identity().map(|i| &**i), channel) {
            return self.reply(key, id.as_deref(), Err(why));
        }
        let Some(keep) = self.history_of(channel.as_bytes()) else {
            let why = format!(
                "history is off for channel {channel:?} (namespace {:?} has no history_size)",
                ns.pattern
            );
            return self.reply(key, id.as_deref(), Err(why));
        };
        self.read_history(key, channel, id, Purpose::History { limit }, keep);
    }

    /// Reads the store (standalone) or asks the Redis reactor to; the answer comes to
    /// [`Reactor::on_read_done`].
    fn read_history(
        &mut self,
        key: usize,
        channel: &str,
        id: Option<Box<str>>,
        purpose: Purpose,
        keep: Keep,
    ) {
        let Some(serial) = self.conns.open(key).map(|c| c.serial()) else {
            return;
        };
        let to = ReadFor {
            reply_to: AckTo::Reactor(self.index),
            conn: key,
            serial,
            id,
            channel: Bytes::copy_from_slice(channel.as_bytes()),
            purpose,
        };
        if self.redis_mode() {
            if self.uplink.awaited >= crate::broker::bus::MAX_AWAITED {
                return self.read_failed(to, "server busy: too many requests wait for Redis");
            }
            let hub = self.shared.reactors.first();
            match hub.map(|h| h.mailbox.request(Request::Read(Box::new(to)))) {
                Some(Ok(())) => self.uplink.awaited += 1,
                Some(Err(Request::Read(to))) => {
                    self.read_failed(*to, "server busy: the node's queue to Redis is full")
                }
                _ => {}
            }
            return;
        }
        let (range, most) = range_of(&to.purpose, keep);
        let mut history = self
            .shared
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let page = history.read(&to.channel, range, most, keep.ttl, self.clock.now);
        let done = Box::new(ReadDone {
            to,
            result: Ok(page),
        });
        if matches!(done.to.purpose, Purpose::History { .. }) {
            // Nothing to order against live messages: answered now.
            drop(history);
            return self.on_read_done(*done);
        }
        let queued = match self.shared.reactors.get(self.index) {
            Some(me) => me.mailbox.deliver_read(done),
            None => Err(done),
        };
        drop(history);
        if let Err(done) = queued {
            self.read_failed(done.to, "server busy: this reactor's queue is full");
        }
    }

    /// A read that cannot be answered: the client is told, and a subscribe is undone.
    pub(super) fn read_failed(&mut self, to: ReadFor, why: &str) {
        self.on_read_done(ReadDone {
            to,
            result: Err(why.to_string()),
        });
    }

    /// The answer to a history read, in the connection's stream of deliveries.
    pub(super) fn on_read_done(&mut self, done: ReadDone) {
        let ReadDone { to, result } = done;
        if self.conns.open_with_serial(to.conn, to.serial).is_none() {
            return;
        }
        let id = to.id.as_deref();
        match to.purpose {
            Purpose::History { .. } => match result {
                Ok(page) => {
                    let kept = page.messages.iter().map(|m| protocol::Kept {
                        offset: m.offset,
                        payload: m.payload(),
                        from: m.author(),
                    });
                    let frame = protocol::history_reply(
                        id,
                        &to.channel,
                        &page.epoch,
                        page.top,
                        kept,
                        // Half the queue: the reply fits a client that keeps up.
                        self.limits.max_queue / 2,
                        &mut self.scratch,
                    );
                    self.send_frame(to.conn, frame);
                }
                Err(why) => self.reply(to.conn, id, Err(format!("history unavailable: {why}"))),
            },
            Purpose::Subscribe { since } => {
                let Some(sub) = self.subscription_of(to.conn, &to.channel) else {
                    let why = "subscribe cancelled: the channel was unsubscribed before its history position came";
                    return self.reply(to.conn, id, Err(why.into()));
                };
                let page = match result {
                    Ok(page) => page,
                    Err(why) => {
                        self.unsubscribe_channel(to.conn, &to.channel);
                        let why = format!("subscribe failed: history unavailable: {why}");
                        return self.reply(to.conn, id, Err(why));
                    }
                };
                let recovered = since.as_ref().map(|s| reaches(s, &page));
                let frame = protocol::subscribed_reply(id, page.top, &page.epoch, recovered);
                self.send_frame(to.conn, frame);
                if recovered == Some(true) {
                    let after = since.map_or(0, |s| s.offset);
                    for msg in page.messages.iter().filter(|m| m.offset > after) {
                        let frame = protocol::envelope_from(
                            &to.channel,
                            msg.payload(),
                            msg.author(),
                            msg.offset,
                            &mut self.json_scratch,
                        );
                        if !self.send_frame(to.conn, frame) {
                            return;
                        }
                    }
                }
                if let Some(s) = self.channels.subscriber_mut(sub) {
                    s.waiting = false;
                }
            }
        }
    }

    /// Queues one frame; one that overflows the queue closes the connection (`false`).
    fn send_frame(&mut self, key: usize, frame: Bytes) -> bool {
        let Some(conn) = self.conns.open(key) else {
            return false;
        };
        self.metrics.messages_out.inc();
        if conn.send(frame, self.limits.max_queue).is_err() {
            self.close(key, Close::slow_consumer());
            return false;
        }
        self.mark_dirty(key);
        true
    }

    /// Where `key` sits in `channel`, if it is subscribed.
    fn subscription_of(&mut self, key: usize, channel: &[u8]) -> Option<Subscription> {
        let id = self.channels.id(channel)?;
        self.conns
            .open(key)?
            .subscriptions()
            .iter()
            .copied()
            .find(|s| s.channel == id)
    }

    /// The Redis reactor: a publish on a channel with history goes through the append script.
    pub(super) fn hub_append(
        &mut self,
        channel: Bytes,
        payload: Bytes,
        ack: Option<Ack>,
        keep: Keep,
    ) {
        let (Some(hub), Some(redis)) = (&mut self.hub, &mut self.redis) else {
            return;
        };
        let tag = hub.calls.next_tag();
        let args = streams::append_args(
            redis.redis_name(&channel),
            payload,
            keep.size,
            keep.ttl,
            redis.is_cluster(),
        );
        let registry = self.poll.registry();
        match redis.call(&channel, args.into_iter(), tag, registry, self.clock.now) {
            Ok(()) => hub.calls.sent(tag, Call::Append { ack }),
            Err(refused) => match ack {
                Some(ack) => self.send_ack(ack, Err(refused.message().to_string())),
                None => self.metrics.publishes_dropped.inc(),
            },
        }
    }

    pub(super) fn on_append_reply(&mut self, ack: Option<Ack>, result: Result<BytesFrame, String>) {
        let result = result
            .and_then(|reply| streams::parse_offset(&reply).map(|_| ()))
            .map_err(|e| format!("redis refused the history append: {e}; message not published"));
        match ack {
            Some(ack) => self.send_ack(ack, result),
            None => {
                if let Err(e) = result {
                    self.metrics.publishes_dropped.inc();
                    log::warn!("{e}");
                }
            }
        }
    }

    /// The Redis reactor: a reactor's history read, sent as the read script.
    pub(super) fn hub_read(&mut self, to: Box<ReadFor>) {
        let Some(keep) = self.history_of(&to.channel) else {
            return self.answer_read(Box::new(ReadDone {
                to: *to,
                result: Err("the channel has no history".into()),
            }));
        };
        let (range, most) = range_of(&to.purpose, keep);
        let (Some(hub), Some(redis)) = (&mut self.hub, &mut self.redis) else {
            return;
        };
        let tag = hub.calls.next_tag();
        let args = streams::read_args(&redis.redis_name(&to.channel), range, most, keep.ttl);
        let registry = self.poll.registry();
        match redis.call(&to.channel, args.into_iter(), tag, registry, self.clock.now) {
            Ok(()) => hub.calls.sent(tag, Call::Read { to, range }),
            Err(refused) => self.answer_read(Box::new(ReadDone {
                to: *to,
                result: Err(refused.message().to_string()),
            })),
        }
    }

    pub(super) fn on_read_reply(
        &mut self,
        to: ReadFor,
        range: Range,
        result: Result<BytesFrame, String>,
    ) {
        let max = self.limits.max_message;
        let result = result.and_then(|reply| streams::parse_page(reply, &to.channel, range, max));
        self.answer_read(Box::new(ReadDone { to, result }));
    }

    /// The Redis reactor: hands a read's answer to the reactor that asked, behind the messages
    /// already queued to it (or runs it here, in event order, when it asked itself).
    fn answer_read(&mut self, done: Box<ReadDone>) {
        let index = match done.to.reply_to {
            AckTo::Api => {
                let ticket = Ticket {
                    conn: done.to.conn,
                    serial: done.to.serial,
                };
                let result = done.result;
                return self.shared.api_reply(ApiReply::History { ticket, result });
            }
            AckTo::Reactor(index) => index,
        };
        if index == self.index {
            self.uplink.awaited = self.uplink.awaited.saturating_sub(1);
            return self.on_read_done(*done);
        }
        let Some(reactor) = self.shared.reactors.get(index) else {
            return;
        };
        if let Err(done) = reactor.mailbox.deliver_read(done) {
            reactor.mailbox.reply(Reply::ReadFailed(Box::new(done.to)));
        }
    }
}

/// Which messages a read of `purpose` wants, and at most how many.
pub(super) fn range_of(purpose: &Purpose, keep: Keep) -> (Range, usize) {
    match purpose {
        Purpose::Subscribe { since: None } => (Range::Newest, 0),
        Purpose::Subscribe { since: Some(p) } => {
            (Range::After(p.offset), keep.size.min(MAX_RECOVERY))
        }
        Purpose::History { limit } => (Range::Newest, (*limit).min(keep.size)),
    }
}

/// Whether `page` holds every message after `since`, in the same epoch.
fn reaches(since: &Position, page: &Page) -> bool {
    if *since.epoch != *page.epoch || since.offset > page.top {
        return false;
    }
    if since.offset == page.top {
        return true;
    }
    let mut next = since.offset + 1;
    for msg in page.messages.iter().filter(|m| m.offset > since.offset) {
        if msg.offset != next {
            return false;
        }
        next += 1;
    }
    next == page.top + 1
}
