//! The node's link to Redis: a nonblocking RESP3 connection on the `Poll` of the node's Redis
//! reactor (reactor 0), the only one that holds a link.
//!
//! The link speaks `HELLO 3`, so Pub/Sub pushes and command replies share one connection: the
//! Redis reactor SUBSCRIBEs there for the channels the node's clients want and PUBLISHes there for
//! every reactor's clients.
//! Replies are matched to commands in order through `pending`. Frames are decoded by
//! redis-protocol straight out of the read buffer: a message payload is a `Bytes` slice of it.
//!
//! Failures never panic and never block: the link goes down, fails what was waiting on it, and
//! reconnects with capped exponential backoff; the reactor re-subscribes when it is up again.
//!
//! A *sharded* link ([`RedisLink::sharded`]) is one connection to one master of a Redis Cluster
//! ([`crate::broker::cluster`] holds one per shard): it speaks SSUBSCRIBE/SPUBLISH, one channel
//! per command (channels of one command must share a slot), reports `MOVED` publishes with what
//! is needed to resend them, and takes a `sunsubscribe` it did not ask for as a slot migration.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use redis_protocol::resp3::decode::complete::decode_bytes_mut;
use redis_protocol::resp3::encode::complete::extend_encode;
use redis_protocol::resp3::types::BytesFrame;

use super::scripts;
use super::tls::Stream;
use crate::config::RedisUrl;

/// Most bytes of unsent commands; past it publishes are refused rather than buffered.
const MAX_BACKLOG: usize = 8 << 20;
/// A command unanswered this long means Redis is gone even if the socket is open.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const PING_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Capped so a reconnect happens well within 2 s of Redis coming back.
const BACKOFF_MAX: Duration = Duration::from_millis(800);
/// Most bytes read per readiness event, so a flood from Redis cannot starve clients.
const READ_BUDGET: usize = 4 << 20;
/// While Redis stays unreachable, how often the reason is repeated at warn level (every failed
/// attempt is logged at debug level; one warn line per retry would flood the log).
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Who to tell when a PUBLISH is acknowledged: a JSON-mode client waiting for `ok` on a reactor,
/// or a request of the server API, named by slab key and serial on that thread (the key may be
/// reused by the time the ack arrives).
#[derive(Debug, Clone)]
pub struct Ack {
    pub to: AckTo,
    pub conn: usize,
    pub conn_serial: u64,
    /// The JSON command's `id`, echoed in the reply (always `None` for the API).
    pub id: Option<Box<str>>,
}

/// The thread an [`Ack`] goes back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckTo {
    /// Reactor `n` of the node.
    Reactor(usize),
    /// The server API's thread (`--api-listen`).
    Api,
}

#[derive(Debug)]
enum Pending {
    Hello,
    Select,
    Ping,
    /// `resend` (sharded links only): the channel and payload, to publish again on the shard a
    /// `MOVED` reply names.
    Publish {
        ack: Option<Ack>,
        resend: Option<(Bytes, Bytes)>,
    },
    /// CLUSTER SHARDS: its reply is handed over whole as [`RedisEvent::Topology`].
    Topology,
    /// A command sent with [`RedisLink::call`]: its reply is handed over whole as
    /// [`RedisEvent::Reply`] with the caller's `tag`.
    Call {
        tag: u64,
    },
    /// SCRIPT LOAD of one of [`scripts::ALL`] at the handshake.
    ScriptLoad,
    /// A SUBSCRIBE or UNSUBSCRIBE: answered by one push confirmation per channel, or by one
    /// error for the whole command (an ACL that denies one channel refuses them all). Tracked
    /// so such an error is not taken for the reply to the next command.
    Interest {
        subscribe: bool,
        channels: Vec<Bytes>,
        confirmed: usize,
    },
}

/// What the link tells its reactor.
#[derive(Debug)]
pub enum RedisEvent {
    /// Handshake done: subscribe every channel that has local subscribers.
    Up,
    /// The link that was up went down: Redis holds none of its subscriptions any more.
    Down,
    /// Redis confirmed the subscription of `channel` (prefix removed).
    Subscribed { channel: Bytes },
    /// Redis refused to SUBSCRIBE `channel` (prefix removed), typically an ACL.
    SubscribeRefused { channel: Bytes, error: String },
    /// A Pub/Sub message for a channel (prefix removed).
    Message { channel: Bytes, payload: Bytes },
    /// A PUBLISH this reactor sent was answered (or lost with the link).
    Published {
        ack: Ack,
        result: Result<(), String>,
    },
    /// The reply to a CLUSTER SHARDS (sharded links).
    Topology(Result<BytesFrame, String>),
    /// Redis dropped our subscription of `channel` by itself (sharded links: its slot moved).
    Migrated { channel: Bytes },
    /// An SPUBLISH was answered `MOVED`: `slot` now lives at `addr`; publish there again.
    Moved {
        slot: u16,
        addr: SocketAddr,
        channel: Bytes,
        payload: Bytes,
        ack: Option<Ack>,
    },
    /// The node is no longer subscribed to these channels (a shard's link went down, or the
    /// channels' slots are moving); the cluster subscribes them again where they live now.
    Lost { channels: Vec<Bytes> },
    /// The reply to a [`RedisLink::call`] (an error reply, or the link lost before the reply,
    /// is `Err`).
    Reply {
        tag: u64,
        result: Result<BytesFrame, String>,
    },
}

/// Why a publish was not sent.
#[derive(Debug)]
pub enum Refused {
    Down,
    Backlog,
}

impl Refused {
    pub fn message(&self) -> &'static str {
        match self {
            Refused::Down => "redis unavailable: the link to Redis is down; message not published",
            Refused::Backlog => {
                "redis unavailable: too many unsent commands; message not published"
            }
        }
    }
}

enum State {
    /// Waiting `until` before the next attempt.
    Down {
        until: Instant,
    },
    Connecting {
        stream: Stream,
        since: Instant,
    },
    /// TCP up (the TLS handshake, with `rediss://`, may still be under way); `ready` once HELLO
    /// (and SELECT) were answered.
    Connected {
        stream: Stream,
        ready: bool,
    },
}

pub struct RedisLink {
    url: RedisUrl,
    /// A shard link of a Redis Cluster: SSUBSCRIBE/SPUBLISH, see the module comment.
    sharded: bool,
    prefix: Bytes,
    token: Token,
    state: State,
    backoff: Duration,
    read_buf: BytesMut,
    write_buf: BytesMut,
    pending: VecDeque<(Pending, Instant)>,
    last_ping: Instant,
    pub events: VecDeque<RedisEvent>,
    /// Set when the read budget ran out with data left: read again on the next turn.
    pub read_again: bool,
    ever_up: bool,
    reconnects: u64,
    /// Connection attempts that failed since the link was last up.
    failed_attempts: u64,
    /// When a failed attempt was last logged at warn level, and why it failed.
    last_warning: Option<(Instant, String)>,
    /// State of the generator that spreads reconnect attempts (differs per reactor and node).
    jitter: u64,
    /// The node's TLS client configuration; every `rediss://` connection starts a session of it.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// splitmix64: a well-mixed 64-bit sequence from any seed, enough to spread retries.
fn next_jitter(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl RedisLink {
    /// `reactor` (the reactor's index) and the process id seed the reconnect jitter, so the
    /// reactors and nodes that lost the same Redis do not all come back at the same instant.
    /// `tls` is the node's TLS configuration (`node::Shared::redis_tls`), required by a
    /// `rediss://` URL: without it every attempt fails, saying so.
    pub fn new(
        url: RedisUrl,
        prefix: &str,
        token: Token,
        reactor: usize,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> RedisLink {
        if url.tls && tls.is_none() {
            log::error!(
                "redis: BUG: a link to rediss://{}:{} was made without a TLS configuration; it will never connect",
                url.host,
                url.port
            );
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = nanos ^ ((std::process::id() as u64) << 32) ^ (reactor as u64).rotate_left(17);
        RedisLink {
            url,
            sharded: false,
            prefix: Bytes::copy_from_slice(prefix.as_bytes()),
            token,
            state: State::Down {
                until: Instant::now(),
            },
            backoff: BACKOFF_MIN,
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            pending: VecDeque::new(),
            last_ping: Instant::now(),
            events: VecDeque::new(),
            read_again: false,
            ever_up: false,
            reconnects: 0,
            failed_attempts: 0,
            last_warning: None,
            jitter: seed,
            tls,
        }
    }

    /// Makes this a shard link of a Redis Cluster (see the module comment).
    pub fn sharded(mut self) -> RedisLink {
        self.sharded = true;
        self
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Connected { ready: true, .. })
    }

    /// Reconnections after the first successful handshake.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Timers: start a connection attempt when due, ping, and notice a Redis that stopped answering.
    pub fn tick(
        &mut self,
        now: Instant,
        registry: &Registry,
        resolve: impl FnOnce() -> Option<SocketAddr>,
    ) {
        match &self.state {
            State::Down { until } if now >= *until => match resolve() {
                Some(addr) => self.connect(addr, now, registry),
                None => {
                    self.attempt_failed(now, "host name not resolved yet");
                    self.retry_later(now);
                }
            },
            State::Connecting { since, .. } if now.duration_since(*since) > CONNECT_TIMEOUT => {
                self.fail(registry, now, "connect timed out");
            }
            State::Connected { ready, .. } => {
                if let Some((_, sent)) = self.pending.front() {
                    if now.duration_since(*sent) > REPLY_TIMEOUT {
                        self.fail(registry, now, "no reply for 5 s");
                        return;
                    }
                }
                if *ready && now.duration_since(self.last_ping) >= PING_EVERY {
                    self.last_ping = now;
                    self.command(&[b"PING"], Pending::Ping, now);
                    self.flush(registry, now);
                }
            }
            _ => {}
        }
    }

    fn connect(&mut self, addr: SocketAddr, now: Instant, registry: &Registry) {
        let tls = match (self.url.tls, &self.tls) {
            (false, _) => None,
            (true, Some(config)) => Some(config.clone()),
            (true, None) => {
                self.attempt_failed(now, "rediss:// without a TLS configuration (a bug)");
                return self.retry_later(now);
            }
        };
        let stream = TcpStream::connect(addr).and_then(|tcp| match tls {
            None => Ok(Stream::plain(tcp)),
            Some(config) => Stream::tls(tcp, addr, config, &self.url.host),
        });
        match stream {
            Ok(mut stream) => {
                if let Err(e) = registry.register(
                    &mut stream,
                    self.token,
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    log::error!("redis: cannot register socket: {e}");
                    self.retry_later(now);
                    return;
                }
                self.state = State::Connecting { stream, since: now };
            }
            Err(e) => {
                self.attempt_failed(now, &format!("connect to {addr} failed: {e}"));
                self.retry_later(now);
            }
        }
    }

    fn retry_later(&mut self, now: Instant) {
        // Jitter spreads reconnects of many reactors and nodes after a Redis restart.
        let jitter = Duration::from_micros(next_jitter(&mut self.jitter) % 100_000);
        self.state = State::Down {
            until: now + self.backoff + jitter,
        };
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Takes the link down: fails waiting publishes, drops buffers, schedules a reconnect.
    fn fail(&mut self, registry: &Registry, now: Instant, why: &str) {
        let was_up = self.is_up();
        let mut why = why.to_string();
        match std::mem::replace(&mut self.state, State::Down { until: now }) {
            State::Connecting { mut stream, .. } => {
                let _ = registry.deregister(&mut stream);
            }
            State::Connected { mut stream, .. } => {
                // During a TLS handshake, say so: "TLS handshake with ADDR failed: REASON".
                why = stream.explain(&why);
                let _ = registry.deregister(&mut stream);
            }
            State::Down { .. } => {}
        }
        let why = why.as_str();
        if was_up {
            log::warn!("redis: link down ({why}); reconnecting");
            self.events.push_back(RedisEvent::Down);
        } else {
            self.attempt_failed(now, why);
        }
        for (pending, _) in self.pending.drain(..) {
            match pending {
                Pending::Publish { ack: Some(ack), .. } => {
                    self.events.push_back(RedisEvent::Published {
                        ack,
                        result: Err(format!(
                            "redis unavailable: link lost before Redis acknowledged ({why})"
                        )),
                    })
                }
                Pending::Call { tag } => self.events.push_back(RedisEvent::Reply {
                    tag,
                    result: Err(format!(
                        "redis unavailable: link lost before Redis answered ({why})"
                    )),
                }),
                _ => {}
            }
        }
        self.read_buf = BytesMut::new();
        self.write_buf = BytesMut::new();
        self.read_again = false;
        self.retry_later(now);
    }

    /// Logs a failed connection attempt at warn level the first time, whenever the reason changes
    /// and every `WARN_EVERY` while it lasts; an unreachable Redis or a wrong password must be
    /// visible in the log without one line per retry.
    fn attempt_failed(&mut self, now: Instant, why: &str) {
        self.failed_attempts += 1;
        let due = match &self.last_warning {
            None => true,
            Some((at, last_why)) => last_why != why || now.duration_since(*at) >= WARN_EVERY,
        };
        if due {
            log::warn!(
                "redis: cannot use {}:{} ({why}); retrying, /readyz stays 503 meanwhile ({} failed attempts)",
                self.url.host,
                self.url.port,
                self.failed_attempts
            );
            self.last_warning = Some((now, why.to_string()));
        } else {
            log::debug!("redis: connection attempt failed ({why})");
        }
    }

    /// Handles readiness of the Redis socket. Decoded events land in `self.events`.
    pub fn on_ready(&mut self, registry: &Registry, now: Instant, writable: bool, readable: bool) {
        if let State::Connecting { stream, .. } = &mut self.state {
            if !writable && !readable {
                return;
            }
            match stream.connect_done() {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => return self.fail(registry, now, &e.to_string()),
            }
            let State::Connecting { stream, .. } =
                std::mem::replace(&mut self.state, State::Down { until: now })
            else {
                unreachable!("state checked above")
            };
            let _ = stream.set_nodelay(true);
            self.state = State::Connected {
                stream,
                ready: false,
            };
            self.handshake(now);
        }
        if readable || self.read_again {
            self.read(registry, now);
        }
        self.flush(registry, now);
    }

    fn handshake(&mut self, now: Instant) {
        let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
        let user = self
            .url
            .username
            .clone()
            .unwrap_or_else(|| "default".into());
        let password = self.url.password.clone();
        if let Some(pw) = &password {
            hello.extend([&b"AUTH"[..], user.as_bytes(), pw.as_bytes()]);
        }
        hello.extend([&b"SETNAME"[..], b"fanout"]);
        self.command(&hello, Pending::Hello, now);
        // Loaded before anything else is sent on this connection, so every EVALSHA after the
        // handshake finds its script, on a Redis restarted empty too.
        for script in scripts::ALL.iter() {
            self.command(
                &[b"SCRIPT", b"LOAD", script.body.as_bytes()],
                Pending::ScriptLoad,
                now,
            );
        }
        if self.url.db != 0 {
            let db = self.url.db.to_string();
            self.command(&[b"SELECT", db.as_bytes()], Pending::Select, now);
        }
    }

    fn read(&mut self, registry: &Registry, now: Instant) {
        self.read_again = false;
        let State::Connected { stream, .. } = &mut self.state else {
            return;
        };
        let mut total = 0;
        let error = loop {
            let len = self.read_buf.len();
            self.read_buf.resize(len + 64 * 1024, 0);
            match stream.read(&mut self.read_buf[len..]) {
                Ok(0) => {
                    self.read_buf.truncate(len);
                    break Some("connection closed by Redis".to_string());
                }
                Ok(n) => {
                    self.read_buf.truncate(len + n);
                    total += n;
                    if total >= READ_BUDGET {
                        self.read_again = true;
                        break None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_buf.truncate(len);
                    break None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.read_buf.truncate(len),
                Err(e) => {
                    self.read_buf.truncate(len);
                    break Some(e.to_string());
                }
            }
        };
        // Decode what arrived before reacting to an error, so nothing received is lost.
        loop {
            match decode_bytes_mut(&mut self.read_buf) {
                Ok(Some((frame, _, _))) => {
                    if let Err(why) = self.on_frame(frame, now) {
                        return self.fail(registry, now, &why);
                    }
                }
                Ok(None) => break,
                Err(e) => return self.fail(registry, now, &format!("unparseable reply: {e}")),
            }
        }
        if let Some(why) = error {
            self.fail(registry, now, &why);
        }
    }

    fn on_frame(&mut self, frame: BytesFrame, now: Instant) -> Result<(), String> {
        let is_push = matches!(frame, BytesFrame::Push { .. });
        if !is_push
            && matches!(
                self.pending.front(),
                Some((Pending::Topology | Pending::Call { .. }, _))
            )
        {
            let Some((pending, _)) = self.pending.pop_front() else {
                unreachable!("front checked above");
            };
            let reply = match frame {
                BytesFrame::SimpleError { data, .. } => Err(data.to_string()),
                BytesFrame::BlobError { data, .. } => {
                    Err(String::from_utf8_lossy(&data).into_owned())
                }
                other => Ok(other),
            };
            self.events.push_back(match pending {
                Pending::Call { tag } => RedisEvent::Reply { tag, result: reply },
                _ => RedisEvent::Topology(reply),
            });
            return Ok(());
        }
        match frame {
            BytesFrame::Push { data, .. } => self.on_push(data),
            BytesFrame::SimpleError { data, .. } => self.on_reply(Err(data.to_string()), now),
            BytesFrame::BlobError { data, .. } => {
                self.on_reply(Err(String::from_utf8_lossy(&data).into_owned()), now)
            }
            _ => self.on_reply(Ok(()), now),
        }
    }

    fn on_push(&mut self, data: Vec<BytesFrame>) -> Result<(), String> {
        match classify_push(data, &self.prefix) {
            Push::Message { channel, payload } => {
                self.events
                    .push_back(RedisEvent::Message { channel, payload });
                Ok(())
            }
            Push::Confirmation { subscribe, channel } => {
                let ours = matches!(
                    self.pending.front(),
                    Some((Pending::Interest { subscribe: s, .. }, _)) if *s == subscribe
                );
                if self.sharded && !subscribe && !ours {
                    // Nobody asked: Redis moved the channel's slot to another shard.
                    if let Some(channel) = self.local_name(&channel) {
                        self.events.push_back(RedisEvent::Migrated { channel });
                    }
                    return Ok(());
                }
                self.on_confirmation(subscribe, channel)
            }
            Push::Other => Ok(()),
        }
    }

    /// One channel of the oldest SUBSCRIBE/UNSUBSCRIBE was confirmed.
    fn on_confirmation(&mut self, subscribe: bool, channel: Bytes) -> Result<(), String> {
        let done = match self.pending.front_mut() {
            Some((
                Pending::Interest {
                    subscribe: waiting,
                    channels,
                    confirmed,
                },
                _,
            )) if *waiting == subscribe => {
                *confirmed += 1;
                *confirmed >= channels.len()
            }
            other => {
                return Err(format!(
                    "unexpected {} confirmation while waiting for {other:?}",
                    if subscribe {
                        "subscribe"
                    } else {
                        "unsubscribe"
                    }
                ))
            }
        };
        if done {
            self.pending.pop_front();
        }
        if subscribe {
            if let Some(channel) = self.local_name(&channel) {
                self.events.push_back(RedisEvent::Subscribed { channel });
            }
        }
        Ok(())
    }

    /// The fanout channel name of a Redis channel name: the prefix removed (`None` if it lacks it).
    fn local_name(&self, redis_name: &Bytes) -> Option<Bytes> {
        redis_name
            .starts_with(&self.prefix)
            .then(|| redis_name.slice(self.prefix.len()..))
    }

    /// A SUBSCRIBE was refused (typically an ACL denying a channel). Redis refuses the whole
    /// command, so a batch is retried one channel at a time: only the denied channels stay
    /// unsubscribed, and the link stays up for every other channel.
    fn interest_refused(
        &mut self,
        subscribe: bool,
        channels: Vec<Bytes>,
        error: &str,
        now: Instant,
    ) {
        if subscribe && channels.len() > 1 {
            log::debug!(
                "redis: SUBSCRIBE of {} channels refused ({error}); retrying one by one",
                channels.len()
            );
            for name in channels {
                self.interest_command(true, vec![name], now);
            }
            return;
        }
        let names: Vec<String> = channels
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        if subscribe {
            for name in &channels {
                if let Some(channel) = self.local_name(name) {
                    self.events.push_back(RedisEvent::SubscribeRefused {
                        channel,
                        error: error.to_string(),
                    });
                }
            }
        }
        let verb = match (self.sharded, subscribe) {
            (false, true) => "SUBSCRIBE",
            (false, false) => "UNSUBSCRIBE",
            (true, true) => "SSUBSCRIBE",
            (true, false) => "SUNSUBSCRIBE",
        };
        if self.sharded && is_redirect(error) {
            // The cluster is moving or failing over: the cluster layer routes it again.
            log::debug!("redis: {verb} {} answered {error}", names.join(" "));
        } else {
            log::warn!(
                "redis: {verb} {} refused: {error}; this node gets no messages from Redis for it",
                names.join(" ")
            );
        }
    }

    fn on_reply(&mut self, result: Result<(), String>, now: Instant) -> Result<(), String> {
        let Some((pending, _)) = self.pending.pop_front() else {
            return Err(format!(
                "unexpected reply {result:?} with no command waiting"
            ));
        };
        match (pending, result) {
            (
                Pending::Publish {
                    ack,
                    resend: Some((channel, payload)),
                },
                Err(e),
            ) if e.starts_with("MOVED ") => match crate::broker::slots::parse_moved(&e) {
                Some((slot, addr)) => self.events.push_back(RedisEvent::Moved {
                    slot,
                    addr,
                    channel,
                    payload,
                    ack,
                }),
                None => return Err(format!("unparseable redirect {e:?}")),
            },
            (Pending::Publish { ack, .. }, result) => {
                if let Some(ack) = ack {
                    self.events.push_back(RedisEvent::Published { ack, result });
                } else if let Err(e) = result {
                    log::warn!("redis: PUBLISH refused: {e}");
                }
            }
            (Pending::Hello, Err(e)) => {
                return Err(format!(
                    "HELLO 3 refused (fanout needs Redis 6 or newer, and valid credentials): {e}"
                ))
            }
            (Pending::Select, Err(e)) => {
                return Err(format!("SELECT {} refused: {e}", self.url.db))
            }
            (
                Pending::Interest {
                    subscribe,
                    channels,
                    ..
                },
                Err(e),
            ) => self.interest_refused(subscribe, channels, &e, now),
            (Pending::Interest { subscribe, .. }, Ok(())) => {
                return Err(format!(
                    "a reply where {} confirmations were due",
                    if subscribe {
                        "SUBSCRIBE"
                    } else {
                        "UNSUBSCRIBE"
                    }
                ))
            }
            (Pending::Ping, Err(e)) => return Err(format!("PING refused: {e}")),
            (Pending::Topology | Pending::Call { .. }, _) => {
                unreachable!("topology and call replies are taken in on_frame")
            }
            (Pending::ScriptLoad, Err(e)) => log::warn!(
                "redis: SCRIPT LOAD refused ({e}); channels with history cannot be published or read"
            ),
            (Pending::ScriptLoad, Ok(())) => {}
            (Pending::Ping, Ok(())) => {}
            (Pending::Hello | Pending::Select, Ok(())) => {
                let waiting_handshake = self
                    .pending
                    .iter()
                    .any(|(p, _)| matches!(p, Pending::Hello | Pending::Select));
                if !waiting_handshake {
                    if let State::Connected { ready, .. } = &mut self.state {
                        *ready = true;
                    }
                    if self.ever_up {
                        self.reconnects += 1;
                    }
                    self.ever_up = true;
                    self.backoff = BACKOFF_MIN;
                    log::info!(
                        "redis: link up ({}:{}) after {} failed attempts",
                        self.url.host,
                        self.url.port,
                        self.failed_attempts
                    );
                    self.failed_attempts = 0;
                    self.last_warning = None;
                    self.events.push_back(RedisEvent::Up);
                }
            }
        }
        Ok(())
    }

    fn command(&mut self, args: &[&[u8]], pending: Pending, now: Instant) {
        encode_command(
            &mut self.write_buf,
            args.iter().map(|a| Bytes::copy_from_slice(a)),
        );
        self.pending.push_back((pending, now));
    }

    /// Publishes `payload` on `channel` (the prefix is added here).
    /// On refusal the ack is handed back so the client can be told.
    pub fn publish(
        &mut self,
        channel: &[u8],
        payload: Bytes,
        ack: Option<Ack>,
        registry: &Registry,
        now: Instant,
    ) -> Result<(), (Refused, Option<Ack>)> {
        if !self.is_up() {
            return Err((Refused::Down, ack));
        }
        if self.write_buf.len() > MAX_BACKLOG {
            return Err((Refused::Backlog, ack));
        }
        let name = self.redis_name(channel);
        let (verb, resend): (&'static [u8], _) = if self.sharded {
            (
                b"SPUBLISH",
                Some((Bytes::copy_from_slice(channel), payload.clone())),
            )
        } else {
            (b"PUBLISH", None)
        };
        encode_command(
            &mut self.write_buf,
            [Bytes::from_static(verb), name, payload].into_iter(),
        );
        self.pending
            .push_back((Pending::Publish { ack, resend }, now));
        self.flush(registry, now);
        Ok(())
    }

    /// Sends any command (`args`, keys and channels already prefixed by the caller: see
    /// [`RedisLink::redis_name`]); its reply comes back as [`RedisEvent::Reply`] with `tag`.
    /// Refused while the link is down or its backlog is full, like a publish.
    pub fn call(
        &mut self,
        args: impl Iterator<Item = Bytes>,
        tag: u64,
        registry: &Registry,
        now: Instant,
    ) -> Result<(), Refused> {
        if !self.is_up() {
            return Err(Refused::Down);
        }
        if self.write_buf.len() > MAX_BACKLOG {
            return Err(Refused::Backlog);
        }
        encode_command(&mut self.write_buf, args);
        self.pending.push_back((Pending::Call { tag }, now));
        self.flush(registry, now);
        Ok(())
    }

    /// Asks for the cluster's shards (CLUSTER SHARDS); the answer comes as
    /// [`RedisEvent::Topology`]. `false` if the link is not up.
    pub fn request_topology(&mut self, registry: &Registry, now: Instant) -> bool {
        if !self.is_up() {
            return false;
        }
        self.command(&[b"CLUSTER", b"SHARDS"], Pending::Topology, now);
        self.flush(registry, now);
        true
    }

    /// Whether a CLUSTER SHARDS sent on this link is still unanswered.
    pub fn topology_pending(&self) -> bool {
        self.pending
            .iter()
            .any(|(p, _)| matches!(p, Pending::Topology))
    }

    /// Closes the link for good (the shard is gone): what was waiting fails as if the link broke.
    pub fn close(&mut self, registry: &Registry, now: Instant, why: &str) {
        self.fail(registry, now, why);
    }

    /// SUBSCRIBE (or UNSUBSCRIBE) for channels; a no-op while down (the reactor re-subscribes on `Up`).
    pub fn set_interest<'a>(
        &mut self,
        subscribe: bool,
        channels: impl Iterator<Item = &'a Bytes>,
        registry: &Registry,
        now: Instant,
    ) {
        if !self.is_up() {
            return;
        }
        // Channels of one SSUBSCRIBE must share a slot: a sharded link sends one per channel.
        let most = if self.sharded { 1 } else { 1000 };
        let mut batch: Vec<Bytes> = Vec::new();
        for name in channels {
            batch.push(self.redis_name(name));
            if batch.len() == most {
                self.interest_command(subscribe, std::mem::take(&mut batch), now);
            }
        }
        if !batch.is_empty() {
            self.interest_command(subscribe, batch, now);
        }
        self.flush(registry, now);
    }

    /// Queues one SUBSCRIBE or UNSUBSCRIBE for `channels` (Redis names, prefix included).
    fn interest_command(&mut self, subscribe: bool, channels: Vec<Bytes>, now: Instant) {
        let verb: &'static [u8] = match (self.sharded, subscribe) {
            (false, true) => b"SUBSCRIBE",
            (false, false) => b"UNSUBSCRIBE",
            (true, true) => b"SSUBSCRIBE",
            (true, false) => b"SUNSUBSCRIBE",
        };
        encode_command(
            &mut self.write_buf,
            std::iter::once(Bytes::from_static(verb)).chain(channels.iter().cloned()),
        );
        self.pending.push_back((
            Pending::Interest {
                subscribe,
                channels,
                confirmed: 0,
            },
            now,
        ));
    }

    /// The Redis name of a fanout channel: the `--redis-prefix` added.
    pub fn redis_name(&self, channel: &[u8]) -> Bytes {
        prefixed(&self.prefix, channel)
    }

    fn flush(&mut self, registry: &Registry, now: Instant) {
        let State::Connected { stream, .. } = &mut self.state else {
            return;
        };
        while !self.write_buf.is_empty() {
            match stream.write(&self.write_buf) {
                Ok(0) => return self.fail(registry, now, "write returned 0"),
                Ok(n) => {
                    let _ = self.write_buf.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(registry, now, &e.to_string()),
            }
        }
        // TLS records still pending (the handshake's, or ones the socket did not take): they
        // must go out on a writable event even when there is nothing new to write.
        match stream.flush() {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => self.fail(registry, now, &e.to_string()),
        }
    }
}

/// What a RESP3 push frame from Redis means to a link.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// A Pub/Sub message on one of our channels (the prefix removed; both slices share the read
    /// buffer, nothing is copied).
    Message { channel: Bytes, payload: Bytes },
    /// Redis confirmed one channel of a SUBSCRIBE (`true`) or UNSUBSCRIBE (`false`); `channel`
    /// is the Redis name, prefix included (empty when the frame did not carry one).
    Confirmation { subscribe: bool, channel: Bytes },
    /// Anything else: another prefix's channel, pattern messages, shapes fanout does not use.
    Other,
}

/// Reads a push frame's parts: `["message", channel, payload]` or
/// `["subscribe" | "unsubscribe", channel, count]`. Public so property tests can feed it
/// arbitrary frames; it never panics.
pub fn classify_push(mut data: Vec<BytesFrame>, prefix: &[u8]) -> Push {
    let kind = match data.first() {
        Some(
            BytesFrame::BlobString { data: kind, .. } | BytesFrame::SimpleString { data: kind, .. },
        ) => kind.clone(),
        _ => return Push::Other,
    };
    let confirmed = |subscribe: bool| {
        let channel = match data.get(1) {
            Some(BytesFrame::BlobString { data, .. } | BytesFrame::SimpleString { data, .. }) => {
                data.clone()
            }
            _ => Bytes::new(),
        };
        Push::Confirmation { subscribe, channel }
    };
    match &kind[..] {
        b"message" | b"smessage" if data.len() == 3 => {}
        b"subscribe" | b"ssubscribe" => return confirmed(true),
        b"unsubscribe" | b"sunsubscribe" => return confirmed(false),
        _ => return Push::Other,
    }
    let (
        Some(BytesFrame::BlobString { data: payload, .. }),
        Some(BytesFrame::BlobString { data: channel, .. }),
    ) = (data.pop(), data.pop())
    else {
        return Push::Other;
    };
    if !channel.starts_with(prefix) {
        return Push::Other;
    }
    Push::Message {
        channel: channel.slice(prefix.len()..),
        payload,
    }
}

/// Errors a cluster answers while it moves or fails over: routed again, not reported.
pub fn is_redirect(error: &str) -> bool {
    ["MOVED ", "ASK ", "CLUSTERDOWN", "TRYAGAIN"]
        .iter()
        .any(|p| error.starts_with(p))
}

/// `prefix` + `channel`: a channel's name on Redis.
pub fn prefixed(prefix: &[u8], channel: &[u8]) -> Bytes {
    let mut name = BytesMut::with_capacity(prefix.len() + channel.len());
    name.extend_from_slice(prefix);
    name.extend_from_slice(channel);
    name.freeze()
}

fn encode_command(buf: &mut BytesMut, args: impl Iterator<Item = Bytes>) {
    let frame = BytesFrame::Array {
        data: args
            .map(|data| BytesFrame::BlobString {
                data,
                attributes: None,
            })
            .collect(),
        attributes: None,
    };
    if let Err(e) = extend_encode(buf, &frame, false) {
        // Encoding a flat array of blob strings cannot fail; log rather than panic if it ever does.
        log::error!("redis: cannot encode command: {e}");
    }
}
