//! The event loop of one reactor thread: a mio `Poll`, its own listener, its slab of connections,
//! its channel table and (with `--redis`) its own Redis link. Nothing here is shared with other
//! threads except the mailbox other reactors post to and the metrics they read.
//!
//! One turn of the loop: wait for readiness; accept, read and parse; run what the messages ask
//! (publish, subscribe); then timers; then flush every connection that got output, with one
//! vectored write each; then remove connections that died during the turn (removal is deferred so
//! a slab key is never reused within one batch of events).

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::broker::bus::Envelope;
use crate::broker::channels::Channels;
use crate::broker::redis::{Ack, RedisEvent, RedisLink};
use crate::broker::{self, Message};
use crate::connection::{Action, Close, Connection, Limits, Phase};
use crate::http;
use crate::metrics::{CloseReason, ReactorMetrics};
use crate::protocol;
use crate::server::Shared;
use crate::ws::CloseCode;

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);
const REDIS: Token = Token(usize::MAX - 3);

/// Size of the per-reactor read buffer every connection borrows.
const SCRATCH: usize = 64 * 1024;
/// Most bytes read from one connection per turn, so one busy client cannot starve the rest.
const READ_BUDGET: usize = 256 * 1024;
/// How long a closing connection may take to answer our close frame.
const CLOSE_GRACE_MS: u64 = 2000;
/// Longest poll wait; bounds timer latency (drain batches, pings, Redis retries).
const TICK: Duration = Duration::from_millis(50);

/// The graceful close of every client, spread between `start` and `deadline`.
struct Drain {
    start: Instant,
    deadline: Instant,
    total: usize,
    closed: usize,
}

pub struct Reactor {
    index: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Connection>,
    channels: Channels,
    inbox: Receiver<Envelope>,
    shared: Arc<Shared>,
    metrics: Arc<ReactorMetrics>,
    redis: Option<RedisLink>,
    scratch: Vec<u8>,
    json_scratch: Vec<u8>,
    actions: Vec<Action>,
    dirty: Vec<usize>,
    dead: Vec<usize>,
    overflowed: Vec<usize>,
    read_again: Vec<usize>,
    limits: Limits,
    start: Instant,
    now: Instant,
    now_ms: u64,
    next_sweep_ms: u64,
    sweep_every_ms: u64,
    next_serial: u64,
    drain: Option<Drain>,
    accept_paused_until_ms: Option<u64>,
    /// Refused upgrades already reported in the log, and when.
    refused_logged: (u64, u64),
    /// When an oversized message from Redis was last reported in the log.
    oversized_logged_ms: u64,
    stopped: bool,
}

impl Reactor {
    pub fn new(
        index: usize,
        poll: Poll,
        listener: std::net::TcpListener,
        inbox: Receiver<Envelope>,
        shared: Arc<Shared>,
    ) -> io::Result<Reactor> {
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let config = &shared.config;
        let redis = config
            .redis
            .clone()
            .map(|url| RedisLink::new(url, &config.redis_prefix, REDIS));
        let shortest = config
            .ping_interval
            .min(config.idle_timeout)
            .min(config.handshake_timeout);
        let sweep_every_ms = (shortest.as_millis() as u64 / 4).clamp(20, 1000);
        let limits = Limits {
            max_message: config.max_message,
            max_message_rate: config.max_message_rate,
        };
        let metrics = shared.reactors[index].metrics.clone();
        shared.reactors[index]
            .accepting
            .store(true, Ordering::Release);
        let now = Instant::now();
        Ok(Reactor {
            index,
            poll,
            listener: Some(listener),
            conns: Slab::new(),
            channels: Channels::default(),
            inbox,
            shared,
            metrics,
            redis,
            scratch: vec![0; SCRATCH],
            json_scratch: Vec::new(),
            actions: Vec::new(),
            dirty: Vec::new(),
            dead: Vec::new(),
            overflowed: Vec::new(),
            read_again: Vec::new(),
            limits,
            start: now,
            now,
            now_ms: 1,
            next_sweep_ms: sweep_every_ms,
            sweep_every_ms,
            next_serial: 1,
            drain: None,
            accept_paused_until_ms: None,
            refused_logged: (0, 0),
            oversized_logged_ms: 0,
            stopped: false,
        })
    }

    /// Runs until the drain finished (or the poll itself fails).
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.stopped {
            if let Err(e) = self.turn(&mut events, None) {
                log::error!("reactor {}: poll failed: {e}; stopping", self.index);
                break;
            }
        }
        log::debug!("reactor {} stopped", self.index);
    }

    /// One pass of the loop. `timeout` overrides the normal tick (tests step reactors by hand).
    pub fn turn(&mut self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        let busy = !self.read_again.is_empty() || self.redis.as_ref().is_some_and(|r| r.read_again);
        let wait = if busy {
            Duration::ZERO
        } else {
            timeout.unwrap_or(TICK)
        };
        match self.poll.poll(events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        self.now = Instant::now();
        self.now_ms = self.now.duration_since(self.start).as_millis() as u64 + 1;
        for event in events.iter() {
            match event.token() {
                LISTENER => self.accept(),
                WAKER => self.drain_inbox(),
                REDIS => self.on_redis_ready(
                    event.is_writable(),
                    event.is_readable() || event.is_read_closed() || event.is_error(),
                ),
                Token(key) => {
                    let Some(conn) = self.conns.get_mut(key) else {
                        continue;
                    };
                    if event.is_writable() && conn.has_output() && !conn.dirty {
                        conn.dirty = true;
                        self.dirty.push(key);
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        self.read(key);
                    }
                }
            }
        }
        for key in std::mem::take(&mut self.read_again) {
            self.read(key);
        }
        if self.redis.as_ref().is_some_and(|r| r.read_again) {
            self.on_redis_ready(false, false);
        }
        self.timers();
        self.flush_dirty();
        for key in self.dead.drain(..) {
            self.conns.remove(key);
        }
        Ok(())
    }

    /// Connections in the slab (for tests and benchmarks).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register a new connection: {e}");
                        continue;
                    }
                    entry.insert(Connection::new(stream, self.next_serial, self.now_ms));
                    self.next_serial += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors (EMFILE) and the like: try again shortly rather than spin.
                    log::warn!("accept failed: {e}; pausing accepts for 100 ms");
                    self.accept_paused_until_ms = Some(self.now_ms + 100);
                    return;
                }
            }
        }
    }

    fn read(&mut self, key: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget = READ_BUDGET;
        while let Some(conn) = self.conns.get_mut(key) {
            if matches!(conn.phase, Phase::Dead) {
                break;
            }
            let n = match conn.stream.read(&mut scratch) {
                Ok(0) => {
                    self.drop_conn(key, CloseReason::Client);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_conn(key, CloseReason::IoError);
                    break;
                }
            };
            conn.last_rx_ms = self.now_ms;
            match conn.phase {
                Phase::Http { .. } => self.on_http_bytes(key, &scratch[..n]),
                Phase::Open => self.on_ws_bytes(key, &scratch[..n]),
                // A closing connection's input is read only to notice its end.
                Phase::Closing { .. } | Phase::Responding | Phase::Dead => {}
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                self.read_again.push(key);
                break;
            }
        }
        self.scratch = scratch;
    }

    fn on_ws_bytes(&mut self, key: usize, data: &[u8]) {
        let conn = &mut self.conns[key];
        let result = conn.on_frames(
            data,
            self.limits,
            self.now_ms,
            &self.metrics,
            &mut self.json_scratch,
            &mut self.actions,
        );
        self.run_actions(key);
        if let Err(close) = result {
            self.close_ws(key, close);
        }
        self.mark_dirty(key);
    }

    fn on_http_bytes(&mut self, key: usize, data: &[u8]) {
        let conn = &mut self.conns[key];
        let Phase::Http { head } = &mut conn.phase else {
            return;
        };
        head.extend_from_slice(data);
        let parsed = http::parse(head);
        let (req, used) = match parsed {
            Ok(None) => return,
            Err(response) => return self.respond(key, response),
            Ok(Some(parsed)) => parsed,
        };
        let rest = head[used..].to_vec();
        let head_only = req.method == "HEAD";
        let known = matches!(
            req.path.as_str(),
            "/ws" | "/healthz" | "/readyz" | "/metrics" | "/" | "/index.html"
        );
        let response = if !known {
            http::error(
                404,
                &format!(
                    "no such path {:?}; try /, /ws, /healthz, /readyz or /metrics",
                    req.path
                ),
            )
        } else if req.method != "GET" && (!head_only || req.path == "/ws") {
            http::response(
                405,
                "text/plain; charset=utf-8",
                "Allow: GET, HEAD\r\n",
                b"only GET and HEAD are allowed\n",
                false,
            )
        } else {
            match req.path.as_str() {
                "/ws" => return self.upgrade(key, &req, &rest),
                "/healthz" => {
                    http::response(200, "text/plain; charset=utf-8", "", b"ok\n", head_only)
                }
                "/readyz" => match self.shared.readiness() {
                    Ok(()) => {
                        http::response(200, "text/plain; charset=utf-8", "", b"ready\n", head_only)
                    }
                    Err(why) => http::response(
                        503,
                        "text/plain; charset=utf-8",
                        "",
                        format!("not ready: {why}\n").as_bytes(),
                        head_only,
                    ),
                },
                "/metrics" => {
                    let text = self.shared.render_metrics();
                    http::response(
                        200,
                        "text/plain; version=0.0.4; charset=utf-8",
                        "",
                        text.as_bytes(),
                        head_only,
                    )
                }
                _ => http::response(
                    200,
                    "text/html; charset=utf-8",
                    "",
                    crate::server::CHAT_PAGE.as_bytes(),
                    head_only,
                ),
            }
        };
        self.respond(key, response);
    }

    fn respond(&mut self, key: usize, response: http::Response) {
        self.metrics.http_response(response.status);
        let conn = &mut self.conns[key];
        conn.enqueue_control(response.bytes);
        conn.phase = Phase::Responding;
        self.mark_dirty(key);
    }

    fn upgrade(&mut self, key: usize, req: &http::Request, rest: &[u8]) {
        if req.has_body {
            return self.respond(
                key,
                http::error(400, "a WebSocket upgrade request has no body"),
            );
        }
        let up = match http::upgrade(req, &self.shared.config) {
            Ok(up) => up,
            Err(response) => return self.respond(key, response),
        };
        if self.drain.is_some() {
            return self.respond(key, http::error(503, "server is shutting down"));
        }
        let open = self.shared.open_ws.fetch_add(1, Ordering::AcqRel);
        if open >= self.shared.config.max_connections {
            self.shared.open_ws.fetch_sub(1, Ordering::AcqRel);
            self.metrics.refused.inc();
            return self.respond(
                key,
                http::error(503, "connection limit reached; try another node"),
            );
        }
        self.metrics.accepted.inc();
        self.metrics.http_response(101);
        let conn = &mut self.conns[key];
        conn.json = up.json;
        conn.phase = Phase::Open;
        conn.enqueue_control(up.response);
        if let Some(channel) = up.channel {
            // The first subscription of a fresh connection is always within the limit.
            let _ = self.subscribe(key, &channel);
        }
        self.mark_dirty(key);
        if !rest.is_empty() {
            self.on_ws_bytes(key, rest);
        }
    }

    fn run_actions(&mut self, key: usize) {
        let mut actions = std::mem::take(&mut self.actions);
        for action in actions.drain(..) {
            match action {
                Action::Publish {
                    channel,
                    frame,
                    payload_at,
                    reply,
                } => {
                    let channel = match channel {
                        Some(c) => c,
                        None => match self.conns[key]
                            .subs
                            .first()
                            .and_then(|s| self.channels.channel(*s))
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

    fn reply(&mut self, key: usize, id: Option<&str>, result: Result<(), String>) {
        let frame = match result {
            Ok(()) => protocol::ok_reply(id),
            Err(e) => protocol::error_reply(id, &e),
        };
        if let Some(conn) = self.conns.get_mut(key).filter(|c| c.is_open()) {
            conn.reply(frame, &self.metrics);
            self.mark_dirty(key);
        }
    }

    fn publish(&mut self, key: usize, msg: Message, reply: Option<Option<Box<str>>>) {
        self.metrics.publishes.inc();
        let registry = self.poll.registry();
        if let Some(redis) = &mut self.redis {
            let ack = reply.map(|id| Ack {
                conn: key,
                conn_serial: self.conns[key].serial,
                id,
            });
            if let Err((refused, ack)) =
                redis.publish(&msg.channel, msg.payload_bytes(), ack, registry, self.now)
            {
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
                peer.mailbox.send(Envelope::Deliver(msg.clone()));
            }
        }
        if let Some(id) = reply {
            self.reply(key, id.as_deref(), Ok(()));
        }
    }

    /// Queues one message to every local subscriber of its channel: the raw frame and (built
    /// once, if anyone needs it) the JSON envelope are shared, not copied, per subscriber.
    pub fn deliver(&mut self, msg: &Message) {
        let max_queue = self.shared.config.max_queue;
        let now_ms = self.now_ms;
        let (conns, dirty, overflowed) = (&mut self.conns, &mut self.dirty, &mut self.overflowed);
        let metrics = &self.metrics;
        let mut delivered = 0;
        broker::fanout(&self.channels, msg, &mut self.json_scratch, |key, frame| {
            let conn = &mut conns[key];
            if !conn.is_open() {
                return;
            }
            // A full queue can mean only that this turn queued faster than the flush at its end
            // drains: let the socket take what it can now (a syscall only on this rare path) and
            // call the client slow only if the frame still does not fit.
            let fits = conn.enqueue(frame.clone(), max_queue)
                || match conn.flush() {
                    Ok(written) => {
                        metrics.bytes_out.add(written as u64);
                        conn.enqueue(frame.clone(), max_queue)
                    }
                    Err(_) => false,
                };
            if !fits {
                // Its backlog is dropped now; it is unsubscribed and closed after the fanout.
                conn.discard_output();
                conn.phase = Phase::Closing {
                    since_ms: now_ms,
                    drop_after_flush: true,
                };
                overflowed.push(key);
                return;
            }
            delivered += 1;
            if !conn.dirty {
                conn.dirty = true;
                dirty.push(key);
            }
        });
        self.metrics.deliveries.add(delivered);
        self.metrics.messages_out.add(delivered);
        for key in std::mem::take(&mut self.overflowed) {
            self.slow_consumer(key);
        }
    }

    fn slow_consumer(&mut self, key: usize) {
        log::debug!(
            "closing a slow consumer: outgoing queue over {} bytes",
            self.shared.config.max_queue
        );
        self.count_closed(key, CloseReason::SlowConsumer);
        self.unsubscribe_all(key);
        let conn = &mut self.conns[key];
        // Best effort: the client is not reading, so the close frame may not fit in its socket.
        conn.start_close(CloseCode::Policy, "slow consumer", self.now_ms, true);
        let _ = conn.flush();
        self.drop_conn(key, CloseReason::SlowConsumer);
    }

    fn subscribe(&mut self, key: usize, name: &str) -> Result<(), String> {
        let conn = &self.conns[key];
        if let Some(id) = self.channels.id(name.as_bytes()) {
            if conn.subs.iter().any(|s| s.channel == id) {
                return Ok(());
            }
        }
        if conn.subs.len() >= self.shared.config.max_subscriptions {
            return Err(format!(
                "subscription limit reached: at most {} channels per connection",
                self.shared.config.max_subscriptions
            ));
        }
        let (sub, first) = self.channels.subscribe(name.as_bytes(), key, conn.json);
        self.conns[key].subs.push(sub);
        if first {
            self.metrics.channels.set(self.channels.len() as u64);
            if let Some(redis) = &mut self.redis {
                let name = Bytes::copy_from_slice(name.as_bytes());
                redis.set_interest(true, std::iter::once(&name), self.poll.registry(), self.now);
            }
        }
        Ok(())
    }

    fn unsubscribe(&mut self, key: usize, name: &[u8]) {
        let Some(id) = self.channels.id(name) else {
            return;
        };
        let conn = &mut self.conns[key];
        let Some(at) = conn.subs.iter().position(|s| s.channel == id) else {
            return;
        };
        let sub = conn.subs.swap_remove(at);
        self.release(sub);
    }

    fn unsubscribe_all(&mut self, key: usize) {
        for sub in std::mem::take(&mut self.conns[key].subs) {
            self.release(sub);
        }
    }

    fn release(&mut self, sub: crate::broker::channels::Subscription) {
        if let Some(name) = self.channels.unsubscribe(sub) {
            self.metrics.channels.set(self.channels.len() as u64);
            if let Some(redis) = &mut self.redis {
                redis.set_interest(
                    false,
                    std::iter::once(&name),
                    self.poll.registry(),
                    self.now,
                );
            }
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if conn.has_output() && !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    fn count_closed(&mut self, key: usize, why: CloseReason) {
        let conn = &mut self.conns[key];
        if conn.is_websocket() && !conn.counted_closed {
            conn.counted_closed = true;
            self.metrics.closed(why);
            self.shared.open_ws.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Starts the WebSocket closing handshake (or echoes the client's).
    fn close_ws(&mut self, key: usize, close: Close) {
        if !self.conns[key].is_open() {
            return;
        }
        log::debug!(
            "closing connection {key}: {} {}",
            close.code.code(),
            close.reason
        );
        self.count_closed(key, close.why);
        self.unsubscribe_all(key);
        let conn = &mut self.conns[key];
        if close.echo {
            conn.echo_close(&close, self.now_ms);
        } else {
            conn.start_close(close.code, &close.reason, self.now_ms, false);
        }
        self.mark_dirty(key);
    }

    /// Tears a connection down now; the slab slot is freed at the end of the turn.
    fn drop_conn(&mut self, key: usize, why: CloseReason) {
        if matches!(self.conns[key].phase, Phase::Dead) {
            return;
        }
        self.count_closed(key, why);
        self.unsubscribe_all(key);
        let conn = &mut self.conns[key];
        let _ = self.poll.registry().deregister(&mut conn.stream);
        conn.phase = Phase::Dead;
        conn.discard_output();
        self.dead.push(key);
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            if matches!(conn.phase, Phase::Dead) {
                continue;
            }
            match conn.flush() {
                Ok(n) => {
                    self.metrics.bytes_out.add(n as u64);
                    if conn.has_output() {
                        continue;
                    }
                    match conn.phase {
                        Phase::Responding
                        | Phase::Closing {
                            drop_after_flush: true,
                            ..
                        } => self.drop_conn(key, CloseReason::Client),
                        Phase::Closing {
                            drop_after_flush: false,
                            ..
                        } if !conn.shut_down => {
                            // Our close frame is out: send FIN and wait for the client to finish.
                            conn.shut_down = true;
                            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                        }
                        _ => {}
                    }
                }
                Err(_) => self.drop_conn(key, CloseReason::IoError),
            }
        }
        self.dirty = dirty;
    }

    fn drain_inbox(&mut self) {
        self.shared.reactors[self.index].mailbox.rearm();
        while let Ok(envelope) = self.inbox.try_recv() {
            match envelope {
                Envelope::Deliver(msg) => self.deliver(&msg),
                Envelope::Drain { deadline } => self.start_drain(deadline),
            }
        }
    }

    fn on_redis_ready(&mut self, writable: bool, readable: bool) {
        let Some(redis) = &mut self.redis else { return };
        redis.on_ready(self.poll.registry(), self.now, writable, readable);
        self.redis_events();
    }

    fn redis_events(&mut self) {
        while let Some(event) = self.redis.as_mut().and_then(|r| r.events.pop_front()) {
            match event {
                RedisEvent::Up => {
                    let names: Vec<Bytes> = self.channels.names().cloned().collect();
                    if let Some(redis) = &mut self.redis {
                        redis.set_interest(true, names.iter(), self.poll.registry(), self.now);
                    }
                }
                RedisEvent::Message { channel, payload } => {
                    self.metrics.redis_messages_in.inc();
                    if payload.len() > self.shared.config.max_message {
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
                        .get(ack.conn)
                        .is_some_and(|c| c.serial == ack.conn_serial)
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

    fn timers(&mut self) {
        if self.redis.is_some() {
            let shared = self.shared.clone();
            if let Some(redis) = &mut self.redis {
                redis.tick(self.now, self.poll.registry(), || shared.redis_addr());
            }
            self.redis_events();
        }
        if self
            .accept_paused_until_ms
            .is_some_and(|t| self.now_ms >= t)
        {
            self.accept_paused_until_ms = None;
            self.accept();
        }
        if self.drain.is_some() {
            self.drain_step();
        }
        if self.now_ms >= self.next_sweep_ms {
            self.next_sweep_ms = self.now_ms + self.sweep_every_ms;
            self.sweep();
        }
    }

    /// Pings silent clients, closes idle and stalled ones, frees idle buffers.
    fn sweep(&mut self) {
        let config = &self.shared.config;
        let ping_ms = config.ping_interval.as_millis() as u64;
        let idle_ms = config.idle_timeout.as_millis() as u64;
        let handshake_ms = config.handshake_timeout.as_millis() as u64;
        let now = self.now_ms;
        let mut idle = Vec::new();
        let mut stalled = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            match conn.phase {
                Phase::Http { .. } | Phase::Responding if now - conn.opened_ms > handshake_ms => {
                    stalled.push(key)
                }
                Phase::Open => {
                    let silent = now.saturating_sub(conn.last_rx_ms);
                    if silent >= idle_ms {
                        idle.push(key);
                    } else if silent >= ping_ms && !conn.ping_outstanding {
                        conn.ping_outstanding = true;
                        conn.enqueue_control(Bytes::from_static(&[0x89, 0x00]));
                        if !conn.dirty {
                            conn.dirty = true;
                            self.dirty.push(key);
                        }
                    } else if !conn.has_output() {
                        conn.shrink_when_idle();
                    }
                }
                Phase::Closing { since_ms, .. } if now - since_ms > CLOSE_GRACE_MS => {
                    stalled.push(key)
                }
                _ => {}
            }
        }
        for key in stalled {
            if matches!(self.conns[key].phase, Phase::Http { .. }) {
                self.metrics.handshake_timeouts.inc();
            }
            self.drop_conn(key, CloseReason::IdleTimeout);
        }
        for key in idle {
            self.close_ws(
                key,
                Close::new(CloseCode::Away, "idle timeout", CloseReason::IdleTimeout),
            );
        }
        self.log_refused();
    }

    /// One log line per 10 s at most about oversized messages from Redis.
    fn log_oversized(&mut self, len: usize) {
        if self.oversized_logged_ms == 0 || self.now_ms - self.oversized_logged_ms >= 10_000 {
            log::warn!(
                "reactor {}: dropped a {len}-byte message from Redis: over --max-message {} (fanout_redis_messages_oversized_total counts them)",
                self.index,
                self.shared.config.max_message
            );
            self.oversized_logged_ms = self.now_ms;
        }
    }

    /// One log line per 10 s at most summarising upgrades refused by `--max-connections`.
    fn log_refused(&mut self) {
        let refused = self.metrics.refused.get();
        let (logged, at_ms) = self.refused_logged;
        if refused > logged && self.now_ms.saturating_sub(at_ms) >= 10_000 {
            log::warn!(
                "reactor {}: refused {} upgrades since the last report: --max-connections {} reached",
                self.index,
                refused - logged,
                self.shared.config.max_connections
            );
            self.refused_logged = (refused, self.now_ms);
        }
    }

    fn start_drain(&mut self, deadline: Instant) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.shared.reactors[self.index]
            .accepting
            .store(false, Ordering::Release);
        let total = self.conns.iter().filter(|(_, c)| c.is_open()).count();
        log::info!("reactor {}: draining {total} connections", self.index);
        self.drain = Some(Drain {
            start: self.now,
            deadline,
            total,
            closed: 0,
        });
        self.drain_step();
    }

    /// Closes the next batch so that closes are spread evenly until the deadline.
    fn drain_step(&mut self) {
        let Some(drain) = &self.drain else { return };
        let span = drain
            .deadline
            .saturating_duration_since(drain.start)
            .as_secs_f64();
        let elapsed = self
            .now
            .saturating_duration_since(drain.start)
            .as_secs_f64();
        let fraction = if span <= 0.0 {
            1.0
        } else {
            (elapsed / span).min(1.0)
        };
        let target = ((drain.total as f64 * fraction).ceil() as usize).max(drain.closed);
        let mut batch = target - drain.closed;
        let mut to_close = Vec::new();
        let mut to_drop = Vec::new();
        for (key, conn) in self.conns.iter() {
            match conn.phase {
                Phase::Open if batch > 0 || self.now >= drain.deadline => {
                    to_close.push(key);
                    batch = batch.saturating_sub(1);
                }
                Phase::Http { .. } => to_drop.push(key),
                _ => {}
            }
        }
        let hard_stop = drain.deadline + Duration::from_millis(CLOSE_GRACE_MS);
        if let Some(drain) = &mut self.drain {
            drain.closed += to_close.len();
        }
        for key in to_close {
            self.close_ws(
                key,
                Close::new(
                    CloseCode::Away,
                    "server shutting down",
                    CloseReason::Shutdown,
                ),
            );
        }
        for key in to_drop {
            self.drop_conn(key, CloseReason::Shutdown);
        }
        let all_gone = self
            .conns
            .iter()
            .all(|(_, c)| matches!(c.phase, Phase::Dead));
        // Once every client is gone there is nothing left to spread: exit without waiting out
        // the rest of the drain time (the listener is already closed, so none can arrive).
        if all_gone || self.now >= hard_stop {
            self.stopped = true;
        }
    }
}
