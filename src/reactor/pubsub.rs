//! Pub/sub on one reactor: what clients' messages ask for (publish, subscribe, unsubscribe),
//! delivery to local subscribers, the queue from the other reactors of the node, and the events
//! of the Redis link.
//!
//! Connections are reached only through [`Connections::open`](super::conns::Connections::open):
//! once a connection stopped being open, the rest of the requests it sent in the same read are
//! dropped and nothing can subscribe it again, so a channel never lists a closed connection.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::Reactor;
use crate::broker::bus::Control;
use crate::broker::channels::{Subscriber, Subscription};
use crate::broker::redis::{Ack, RedisEvent};
use crate::broker::{self, Compression, Message};
use crate::connection::{Action, Close};
use crate::protocol;

impl Reactor {
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
                Action::Subscribe { channel, id } => {
                    let result = self.subscribe(key, &channel);
                    self.reply(key, id.as_deref(), result);
                }
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

    pub(super) fn subscribe(&mut self, key: usize, name: &str) -> Result<(), String> {
        let max = self.shared.config.max_subscriptions;
        let Some(conn) = self.conns.open(key) else {
            return Err("connection is closing".into());
        };
        if let Some(id) = self.channels.id(name.as_bytes()) {
            if conn.is_subscribed(id) {
                return Ok(());
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
            if let Some(redis) = &mut self.redis {
                let name = Bytes::copy_from_slice(name.as_bytes());
                redis.set_interest(
                    true,
                    std::iter::once(&name),
                    self.poll.registry(),
                    self.clock.now,
                );
            }
        }
        Ok(())
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

    /// Takes one subscription out of the channel table (telling Redis when it was the last).
    pub(super) fn release(&mut self, sub: Subscription) {
        if let Some(name) = self.channels.unsubscribe(sub) {
            self.metrics.channels.set(self.channels.len() as u64);
            if let Some(redis) = &mut self.redis {
                redis.set_interest(
                    false,
                    std::iter::once(&name),
                    self.poll.registry(),
                    self.clock.now,
                );
            }
        }
    }

    fn publish(&mut self, key: usize, msg: Message, reply: Option<Option<Box<str>>>) {
        self.metrics.publishes.inc();
        if let Some(redis) = &mut self.redis {
            let ack = match (reply, self.conns.open(key)) {
                (Some(id), Some(conn)) => Some(Ack {
                    conn: key,
                    conn_serial: conn.serial(),
                    id,
                }),
                _ => None,
            };
            let registry = self.poll.registry();
            if let Err((refused, ack)) = redis.publish(
                &msg.channel,
                msg.payload_bytes(),
                ack,
                registry,
                self.clock.now,
            ) {
                match ack {
                    Some(ack) => {
                        self.reply(key, ack.id.as_deref(), Err(refused.message().to_string()))
                    }
                    None => self.metrics.publishes_dropped.inc(),
                }
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

    /// Everything other threads queued for this reactor since it last looked.
    pub(super) fn drain_inbox(&mut self) {
        self.shared.reactors[self.index].mailbox.rearm();
        while let Ok(Control::Drain { deadline }) = self.inbox.control.try_recv() {
            self.start_drain(deadline);
        }
        // Bounded by the queue's capacity: senders cannot refill it faster than this empties it
        // without their excess being dropped.
        while let Ok(msg) = self.inbox.messages.try_recv() {
            self.deliver(&msg);
        }
    }

    pub(super) fn on_redis_ready(&mut self, writable: bool, readable: bool) {
        let Some(redis) = &mut self.redis else { return };
        redis.on_ready(self.poll.registry(), self.clock.now, writable, readable);
        self.redis_events();
    }

    pub(super) fn redis_events(&mut self) {
        while let Some(event) = self.redis.as_mut().and_then(|r| r.events.pop_front()) {
            match event {
                RedisEvent::Up => {
                    let names: Vec<Bytes> = self.channels.names().cloned().collect();
                    if let Some(redis) = &mut self.redis {
                        redis.set_interest(
                            true,
                            names.iter(),
                            self.poll.registry(),
                            self.clock.now,
                        );
                    }
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
                    self.deliver(&msg);
                }
                RedisEvent::Published { ack, result } => {
                    if self
                        .conns
                        .open_with_serial(ack.conn, ack.conn_serial)
                        .is_some()
                    {
                        self.reply(ack.conn, ack.id.as_deref(), result);
                    }
                }
            }
        }
        if let Some(redis) = &self.redis {
            let up = redis.is_up();
            self.shared.reactors[self.index]
                .redis_up
                .store(up, Ordering::Release);
            self.metrics.redis_link_up.set(up as u64);
            self.metrics.redis_reconnects.set(redis.reconnects());
        }
    }
}
