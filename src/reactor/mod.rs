//! The event loop of one reactor thread: a mio `Poll`, its own listener, its slab of connections,
//! its channel table and, on reactor 0 with `--redis` or `--redis-cluster`, the node's Redis link
//! (or one link per cluster shard). Nothing here is
//! shared with other threads except the mailbox other reactors post to and the counters they read.
//!
//! One turn of the loop: wait for readiness; accept, read and parse; run what the messages ask
//! (publish, subscribe: [`pubsub`]); then timers ([`timers`]); then flush every connection that
//! got output, with one vectored write each; then free the slots of connections that died during
//! the turn (removal is deferred so a slab key is never reused within one batch of events).
//! HTTP requests and the upgrade are in [`routes`]; what the server API asks of a reactor (close
//! a user's connections, list channels) in [`admin`].

mod admin;
mod calls;
mod conns;
mod history;
mod hub;
mod presence;
mod pubsub;
mod routes;
mod timers;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};

use crate::broker::bus::Inbox;
use crate::broker::channels::Channels;
use crate::broker::cluster::RedisCluster;
use crate::broker::redis::RedisLink;
use crate::broker::upstream::Upstream;
use crate::connection::{AfterFlush, Close, Connection, LeftOpen, Limits, ParseContext, Timeouts};
use crate::metrics::{CloseReason, ReactorMetrics};
use crate::node::Shared;
use crate::ws::deflate::{Compressor, Inflater};
use conns::Connections;
use timers::Drain;

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);
const REDIS: Token = Token(usize::MAX - 3);
/// Shard links of a Redis Cluster take the tokens from here down (`cluster::MAX_LINKS` of them).
const REDIS_SHARDS: Token = Token(usize::MAX - 16);

/// Size of the per-reactor read buffer every connection borrows.
const SCRATCH: usize = 64 * 1024;
/// Most bytes read from one connection per turn, so one busy client cannot starve the rest.
const READ_BUDGET: usize = 256 * 1024;
/// How long a closing connection may take to answer our close frame.
const CLOSE_GRACE_MS: u64 = 2000;
/// Longest poll wait; bounds timer latency (drain batches, pings, Redis retries).
const TICK: Duration = Duration::from_millis(50);

pub struct Reactor {
    index: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Connections,
    channels: Channels,
    inbox: Inbox,
    shared: Arc<Shared>,
    metrics: Arc<ReactorMetrics>,
    /// The node's Redis link (or links, one per shard of a cluster): only on the Redis reactor
    /// (reactor 0), only with `--redis` or `--redis-cluster`.
    redis: Option<Upstream>,
    /// The node's channel table for Redis, kept by the Redis reactor.
    hub: Option<hub::Hub>,
    /// This reactor's side of the node's Redis link (subscriptions awaiting confirmation).
    uplink: pubsub::Uplink,
    scratch: Vec<u8>,
    json_scratch: Vec<u8>,
    /// permessage-deflate: one inflater and one compressor per reactor, reset per message, so
    /// a connection keeps no compression state between messages.
    inflater: Inflater,
    inflated: Vec<u8>,
    compressor: Compressor,
    actions: Vec<crate::connection::Action>,
    dirty: Vec<usize>,
    read_again: Vec<usize>,
    limits: Limits,
    timeouts: Timeouts,
    clock: Clock,
    next_serial: u64,
    timers: timers::Timers,
    drain: Option<Drain>,
    stopped: bool,
}

/// The reactor's notion of now, read once per turn.
struct Clock {
    start: Instant,
    now: Instant,
    /// Milliseconds since `start`, plus one (0 means "never" in per-connection fields).
    now_ms: u64,
}

impl Reactor {
    pub fn new(
        index: usize,
        poll: Poll,
        listener: std::net::TcpListener,
        inbox: Inbox,
        shared: Arc<Shared>,
    ) -> io::Result<Reactor> {
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let config = &shared.config;
        // One link per node, on reactor 0: one Redis connection and one subscription per channel
        // whatever --threads is.
        let mut redis = match (&config.redis, config.redis_cluster.is_empty()) {
            _ if index != 0 => None,
            (Some(url), _) => Some(Upstream::Single(RedisLink::new(
                url.clone(),
                &config.redis_prefix,
                REDIS,
                index,
                shared.redis_tls.clone(),
            ))),
            (None, false) => Some(Upstream::Cluster(RedisCluster::new(
                &config.redis_cluster,
                &config.redis_prefix,
                REDIS_SHARDS,
                index,
                shared.redis_tls.clone(),
            ))),
            (None, true) => None,
        };
        let hub = redis.as_ref().map(|_| hub::Hub::new(config.threads));
        if let Some(redis) = &mut redis {
            // The nodes' control channel is wanted from the start: a single link subscribes it
            // with the rest of the table when it comes up, a cluster as soon as its shard is known.
            let control = bytes::Bytes::from_static(crate::broker::control::CHANNEL);
            redis.set_interest(
                true,
                std::iter::once(&control),
                poll.registry(),
                Instant::now(),
            );
        }
        let limits = Limits {
            max_message: config.max_message,
            max_message_rate: config.max_message_rate,
            max_queue: config.max_queue,
        };
        let millis = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        let timeouts = Timeouts {
            ping_ms: millis(config.ping_interval),
            idle_ms: millis(config.idle_timeout),
            handshake_ms: millis(config.handshake_timeout),
            close_grace_ms: CLOSE_GRACE_MS,
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
            conns: Connections::default(),
            channels: Channels::default(),
            inbox,
            metrics,
            redis,
            hub,
            uplink: pubsub::Uplink::default(),
            scratch: vec![0; SCRATCH],
            json_scratch: Vec::new(),
            inflater: Inflater::new(),
            inflated: Vec::new(),
            compressor: Compressor::default(),
            actions: Vec::new(),
            dirty: Vec::new(),
            read_again: Vec::new(),
            limits,
            timers: timers::Timers::new(&timeouts),
            timeouts,
            clock: Clock {
                start: now,
                now,
                now_ms: 1,
            },
            next_serial: 1,
            drain: None,
            stopped: false,
            shared,
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
        let busy =
            !self.read_again.is_empty() || self.redis.as_ref().is_some_and(|r| r.read_again());
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
        self.clock.now = Instant::now();
        let since = self.clock.now.duration_since(self.clock.start).as_millis();
        self.clock.now_ms = u64::try_from(since).unwrap_or(u64::MAX - 1) + 1;
        for event in events.iter() {
            match event.token() {
                LISTENER => self.accept(),
                WAKER => self.drain_inbox(),
                token if self.redis.as_ref().is_some_and(|r| r.owns(token, REDIS)) => self
                    .on_redis_ready(
                        token,
                        event.is_writable(),
                        event.is_readable() || event.is_read_closed() || event.is_error(),
                    ),
                Token(key) => {
                    if event.is_writable() {
                        self.mark_dirty(key);
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
        if self.redis.as_ref().is_some_and(|r| r.read_again()) {
            self.continue_redis_reads();
        }
        self.run_timers();
        self.flush_dirty();
        self.conns.remove_dead();
        Ok(())
    }

    /// Connections in the slab (for tests and benchmarks).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Checks the invariants the rest of the reactor relies on (the stateful property test calls
    /// it after every step): every channel subscriber is an open connection that knows it is
    /// subscribed there, and no connection holds more output than `--max-queue` allows.
    pub fn audit(&self) -> Result<(), String> {
        for (name, subscribers) in self.channels.audit_view() {
            for (sub, key) in subscribers {
                let Some(conn) = self.conns.get(key) else {
                    return Err(format!(
                        "channel {name:?} lists connection {key}, which is gone"
                    ));
                };
                if !conn.is_open() {
                    return Err(format!(
                        "channel {name:?} lists connection {key}, which is not open"
                    ));
                }
                if !conn.subscriptions().contains(&sub) {
                    return Err(format!(
                        "channel {name:?} lists connection {key}, which does not know it"
                    ));
                }
            }
        }
        let allowed = self.limits.max_queue + self.limits.max_message + 16;
        for (key, conn) in self.conns.iter() {
            if conn.queued_bytes() > allowed {
                return Err(format!(
                    "connection {key} queues {} bytes, over --max-queue {} plus one frame",
                    conn.queued_bytes(),
                    self.limits.max_queue
                ));
            }
        }
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let key = self.conns.vacant_key();
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register a new connection: {e}");
                        continue;
                    }
                    let conn = Connection::new(stream, self.next_serial, self.clock.now_ms);
                    self.conns.insert(conn);
                    self.next_serial += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors (EMFILE) and the like: try again shortly rather than spin.
                    log::warn!("accept failed: {e}; pausing accepts for 100 ms");
                    self.timers.pause_accepts_until(self.clock.now_ms + 100);
                    return;
                }
            }
        }
    }

    fn read(&mut self, key: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget = READ_BUDGET;
        while let Some(conn) = self.conns.live(key) {
            let n = match conn.read(&mut scratch, self.clock.now_ms) {
                Ok(0) => {
                    self.kill(key, CloseReason::Client);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.kill(key, CloseReason::IoError);
                    break;
                }
            };
            let (http, open) = (conn.is_http(), conn.is_open());
            if http {
                self.on_http_bytes(key, &scratch[..n]);
            } else if open {
                self.on_ws_bytes(key, &scratch[..n]);
            }
            // Anything else (closing, responding) is read only to notice its end.
            budget = budget.saturating_sub(n);
            if budget == 0 {
                self.read_again.push(key);
                break;
            }
        }
        self.scratch = scratch;
    }

    fn on_ws_bytes(&mut self, key: usize, data: &[u8]) {
        let Some(conn) = self.conns.open(key) else {
            return;
        };
        let mut ctx = ParseContext {
            limits: self.limits,
            now_ms: self.clock.now_ms,
            metrics: &self.metrics,
            scratch: &mut self.json_scratch,
            actions: &mut self.actions,
            inflater: &mut self.inflater,
            inflated: &mut self.inflated,
        };
        let result = conn.on_frames(data, &mut ctx);
        self.run_actions(key);
        if let Err(close) = result {
            self.close(key, close);
        }
        self.mark_dirty(key);
    }

    /// Puts a connection with output on the end-of-turn flush list.
    fn mark_dirty(&mut self, key: usize) {
        if self.conns.live(key).is_some_and(Connection::mark_dirty) {
            self.dirty.push(key);
        }
    }

    /// Starts the WebSocket closing handshake (or echoes the client's); a no-op unless open.
    fn close(&mut self, key: usize, close: Close) {
        let now_ms = self.clock.now_ms;
        let Some(conn) = self.conns.open(key) else {
            return;
        };
        log::debug!(
            "closing connection {key}: {} {}",
            close.code.code(),
            close.reason
        );
        let left = conn.close(&close, now_ms);
        if close.why == CloseReason::SlowConsumer {
            // It is not reading: the close frame gets one chance to go out now (best effort),
            // then the connection is gone rather than kept reading whatever it still sends.
            let _ = conn.flush();
            if let Some(left) = left {
                self.left_open(left, close.why);
            }
            self.kill(key, close.why);
            return;
        }
        if let Some(left) = left {
            self.left_open(left, close.why);
        }
        self.mark_dirty(key);
    }

    /// Tears a connection down now; the slab slot is freed at the end of the turn.
    fn kill(&mut self, key: usize, why: CloseReason) {
        let Some(conn) = self.conns.live(key) else {
            return;
        };
        let left = conn.kill(self.poll.registry());
        self.conns.buried(key);
        if let Some(left) = left {
            self.left_open(left, why);
        }
    }

    /// The bookkeeping for a WebSocket that stopped being open: out of its channels, counted.
    fn left_open(&mut self, LeftOpen(subs, identity): LeftOpen, why: CloseReason) {
        self.metrics.closed(why);
        self.shared.open_ws.fetch_sub(1, Ordering::AcqRel);
        if let Some(identity) = identity {
            self.shared.release_user(&identity.user);
        }
        for sub in subs {
            self.release(sub);
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            let Some(conn) = self.conns.live(key) else {
                continue;
            };
            conn.clear_dirty();
            match conn.flush() {
                Ok((written, next)) => {
                    self.metrics.bytes_out.add(written as u64);
                    if next == AfterFlush::Drop {
                        self.kill(key, CloseReason::Client);
                    }
                }
                Err(_) => self.kill(key, CloseReason::IoError),
            }
        }
        self.dirty = dirty;
    }
}
