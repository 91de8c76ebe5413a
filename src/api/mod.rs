//! The server API for the application's backend (`--api-listen ADDR`, `--api-key KEY`): publish,
//! broadcast, disconnect a user, list channels, describe the node. JSON over HTTP/1.1 on its own
//! listener, served by its own thread with its own small mio loop, so a busy API never delays a
//! reactor and a busy reactor never blocks the API's accept.
//!
//! It shares nothing with the reactors but what [`node::Shared`](crate::node::Shared) offers:
//! their mailboxes (messages, requests to the Redis reactor, control requests) one way, and
//! [`ApiMailbox`](crate::broker::bus::ApiMailbox) with a mio `Waker` the other way, for the
//! answers it waits for (publish acknowledgements, closed connections, channel lists).
//!
//! - [`keys`]: the API keys and their constant-time check.
//! - [`http`]: request heads and bodies with limits, JSON responses.
//! - [`routes`]: the endpoints.
//! - [`census`]: the other nodes' answers to a cluster-wide channel list, with Redis.
//! - `openapi.json`: the OpenAPI 3.1 description, served at `/api/openapi.json`.
//!
//! Everything a caller can make it spend is bounded: [`MAX_CONNECTIONS`] connections (a few
//! more are answered 503 and closed; the rest wait in the kernel's accept queue), a head of 8 KiB and a body of 1 MiB each, [`DEADLINE`] per
//! connection from accept to the end of the response, and at most `routes::MAX_AWAITED` answers
//! owed to it (more requests get 429). Each connection carries one request; every response says
//! `Connection: close`.

pub mod census;
pub mod history;
pub mod http;
pub mod keys;
pub mod options;
pub mod routes;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::broker::bus::{ApiMailbox, ApiReply, Ticket};
use crate::node::Shared;
use http::{Head, Response};
use keys::ApiKeys;
pub use options::ApiConfig;
use routes::{Ctx, Outcome, Pending, Route};

/// Most API connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections past [`MAX_CONNECTIONS`] answered 503 (and closed after lingering, so the answer
/// arrives); past these too, connections wait in the kernel's accept queue.
const MAX_REFUSING: usize = 16;
/// How long one connection may take, from accept to the end of its response.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// After the response, how long input is still read and discarded before the socket is closed
/// (so a client still sending a refused body gets the response rather than a reset).
const LINGER: Duration = Duration::from_secs(2);
/// Longest poll wait: deadlines are checked at least this often.
const TICK: Duration = Duration::from_millis(100);

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

/// The API's listener and loop, bound but not yet running.
pub struct Listener {
    poll: Poll,
    listener: TcpListener,
    inbox: Receiver<ApiReply>,
    addr: SocketAddr,
    keys: ApiKeys,
}

/// Binds `--api-listen`; the mailbox goes into the node's `Shared` for the reactors to answer.
pub fn bind(config: &ApiConfig) -> anyhow::Result<(Listener, ApiMailbox)> {
    let listen = config.listen;
    let std_listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("--api-listen: cannot listen on {listen}"))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let poll = Poll::new().context("cannot create the API's event loop")?;
    let mut listener = TcpListener::from_std(std_listener);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let waker = Waker::new(poll.registry(), WAKER).context("cannot create the API's waker")?;
    let (mailbox, inbox) = ApiMailbox::new(waker);
    let listener = Listener {
        poll,
        listener,
        inbox,
        addr,
        keys: config.keys.clone(),
    };
    Ok((listener, mailbox))
}

impl Listener {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the API's thread.
    pub fn spawn(self, shared: Arc<Shared>) -> io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || Api::new(self, shared).run())
    }
}

/// Where one connection stands.
enum Phase {
    /// Reading the request head.
    Head,
    /// Reading `head.content_length` bytes of body.
    Body { head: Head, route: Route },
    /// Waiting for the reactors or Redis.
    Waiting(Pending),
    /// Writing the response.
    Writing,
    /// Response written and write side shut: input is read and dropped until EOF or `until`.
    Lingering { until: Instant },
    /// To be removed at the end of the turn.
    Done,
}

struct Conn {
    stream: TcpStream,
    serial: u64,
    phase: Phase,
    input: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    deadline: Instant,
    /// The client sent EOF: nothing more to read (it may still read our answer).
    read_closed: bool,
    /// Accepted past [`MAX_CONNECTIONS`], only to be answered 503.
    refused: bool,
    /// The route its path names, once the head is read (for `/metrics`).
    route: Option<Route>,
}

struct Api {
    poll: Poll,
    listener: TcpListener,
    inbox: Receiver<ApiReply>,
    keys: ApiKeys,
    shared: Arc<Shared>,
    conns: Slab<Conn>,
    next_serial: u64,
    /// Answers owed by the reactors and Redis, for requests still open or not.
    awaited: usize,
    /// An accept failed (out of file descriptors): try again next turn, not only on readiness.
    accept_again: bool,
}

impl Api {
    fn new(listener: Listener, shared: Arc<Shared>) -> Api {
        Api {
            poll: listener.poll,
            listener: listener.listener,
            inbox: listener.inbox,
            keys: listener.keys,
            shared,
            conns: Slab::new(),
            next_serial: 1,
            awaited: 0,
            accept_again: false,
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let now = Instant::now();
            let next = self
                .conns
                .iter()
                .map(|(_, c)| c.wake_at())
                .min()
                .map_or(TICK, |t| t.saturating_duration_since(now).min(TICK));
            match self.poll.poll(&mut events, Some(next)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("api: poll failed: {e}; the server API stops");
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => self.drain_inbox(),
                    Token(key) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read(key);
                        }
                        if event.is_writable() {
                            self.write(key);
                        }
                    }
                }
            }
            if std::mem::take(&mut self.accept_again) {
                self.accept();
            }
            self.check_deadlines();
            self.remove_done();
            self.publish_gauges();
        }
    }

    fn accept(&mut self) {
        loop {
            if self.conns.len() >= MAX_CONNECTIONS + MAX_REFUSING {
                // The rest wait in the accept queue until a connection ends.
                return;
            }
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let serving = self.conns.iter().filter(|(_, c)| !c.refused).count();
                    let refused = serving >= MAX_CONNECTIONS;
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("api: cannot register a connection: {e}");
                        continue;
                    }
                    entry.insert(Conn {
                        stream,
                        serial: self.next_serial,
                        phase: Phase::Head,
                        input: Vec::new(),
                        out: Vec::new(),
                        written: 0,
                        deadline: Instant::now() + DEADLINE,
                        read_closed: false,
                        refused,
                        route: None,
                    });
                    self.next_serial += 1;
                    if refused {
                        let refusal = http::error(
                            503,
                            &format!(
                                "the server API serves {MAX_CONNECTIONS} connections already; retry shortly"
                            ),
                        );
                        self.respond(key, refusal);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors and the like: the next turn retries.
                    log::warn!("api: accept failed: {e}");
                    self.accept_again = true;
                    return;
                }
            }
        }
    }

    /// Reads what the socket has, then acts on the request once its head (and body) are in.
    fn read(&mut self, key: usize) {
        // On the stack, not shared: answering a request may read again (to linger), and
        // the buffer must not be in use then.
        let mut buf = [0u8; 16 * 1024];
        while let Some(conn) = self.conns.get_mut(key) {
            if conn.read_closed || matches!(conn.phase, Phase::Done) {
                break;
            }
            // Keep no more than the request needs (a head, then its body); after that read
            // only to notice the client's EOF, discarding what it sends.
            let wanted = conn.wanted();
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    conn.read_closed = true;
                    match conn.phase {
                        // The request can no longer complete, or the answer is out: done.
                        Phase::Head | Phase::Body { .. } | Phase::Lingering { .. } => {
                            conn.phase = Phase::Done
                        }
                        // A half-close: the client may still read the answer.
                        Phase::Waiting(_) | Phase::Writing | Phase::Done => {}
                    }
                    break;
                }
                Ok(n) => {
                    let take = n.min(wanted);
                    if let Some(bytes) = buf.get(..take) {
                        conn.input.extend_from_slice(bytes);
                    }
                    if take > 0 {
                        self.advance(key);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    conn.phase = Phase::Done;
                    break;
                }
            }
        }
    }

    /// Moves a connection on with the input it has: parses the head, checks it, waits for the
    /// body, carries the request out.
    fn advance(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if matches!(conn.phase, Phase::Head) {
            match http::parse_head(&conn.input) {
                Ok(None) => return,
                Err(response) => return self.respond(key, response),
                Ok(Some(head)) => {
                    // Known before the checks, so a refusal is counted under its route too.
                    conn.route = routes::route_of(&head.path);
                    match routes::check(&head, &self.keys) {
                        Err(response) => return self.respond(key, response),
                        Ok(route) => {
                            if head.expect_continue
                                && conn.input.len() < head.len + head.content_length
                            {
                                conn.out.extend_from_slice(http::CONTINUE);
                            }
                            conn.phase = Phase::Body { head, route };
                        }
                    }
                }
            }
        }
        let Phase::Body { head, .. } = &conn.phase else {
            return;
        };
        if conn.input.len() < head.len + head.content_length {
            self.write(key);
            return;
        }
        let Phase::Body { head, route } = std::mem::replace(&mut conn.phase, Phase::Writing) else {
            return;
        };
        let censuses = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(&c.phase, Phase::Waiting(p) if p.is_census()))
            .count();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let body = conn
            .input
            .get(head.len..head.len + head.content_length)
            .unwrap_or_default();
        let mut ctx = Ctx {
            shared: &self.shared,
            ticket: Ticket {
                conn: key,
                serial: conn.serial,
            },
            awaited: &mut self.awaited,
            censuses,
            now: Instant::now(),
        };
        match routes::handle(route, &head, body, &mut ctx) {
            Outcome::Respond(response) => self.respond(key, response),
            Outcome::Wait(pending) => {
                conn.phase = Phase::Waiting(pending);
                conn.input = Vec::new();
            }
        }
    }

    /// Queues the response and starts writing it.
    fn respond(&mut self, key: usize, response: Response) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if response.status >= 500 {
            log::debug!("api: answered {}", response.status);
        }
        if let Some(api) = &self.shared.api {
            let route = conn.route.map_or("none", Route::label);
            api.metrics.response(route, response.status);
        }
        conn.out.extend_from_slice(&response.bytes);
        conn.input = Vec::new();
        conn.phase = Phase::Writing;
        self.write(key);
    }

    /// Writes what the socket takes; once the response is out, shuts the write side and lingers.
    fn write(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        while conn.written < conn.out.len() {
            let Some(rest) = conn.out.get(conn.written..) else {
                break;
            };
            match conn.stream.write(rest) {
                Ok(0) => {
                    conn.phase = Phase::Done;
                    return;
                }
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    conn.phase = Phase::Done;
                    return;
                }
            }
        }
        if matches!(conn.phase, Phase::Writing) {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            conn.out = Vec::new();
            conn.written = 0;
            if conn.read_closed {
                conn.phase = Phase::Done;
            } else {
                conn.phase = Phase::Lingering {
                    until: (Instant::now() + LINGER).min(conn.deadline + LINGER),
                };
                // Edge-triggered: what already arrived must be read now to see the EOF.
                self.read(key);
            }
        }
    }

    /// Answers from the reactors and Redis.
    fn drain_inbox(&mut self) {
        if let Some(api) = &self.shared.api {
            api.rearm();
        }
        // Bounded: every answer was counted in `awaited` when its request was sent; census
        // parts, which nobody here asked for one by one, by the mailbox's byte budget.
        while let Ok(reply) = self.inbox.try_recv() {
            let ticket = match &reply {
                ApiReply::CensusPart(part) => {
                    self.on_census_part(part);
                    continue;
                }
                ApiReply::Published { ticket, .. }
                | ApiReply::Disconnected { ticket, .. }
                | ApiReply::Channels { ticket, .. }
                | ApiReply::CensusSent { ticket, .. }
                | ApiReply::History { ticket, .. } => *ticket,
            };
            self.awaited = self.awaited.saturating_sub(1);
            let Some(conn) = self
                .conns
                .get_mut(ticket.conn)
                .filter(|c| c.serial == ticket.serial)
            else {
                // Its connection is gone (deadline, client left): only counted.
                continue;
            };
            let Phase::Waiting(pending) = &mut conn.phase else {
                continue;
            };
            if let Some(response) = pending.on_reply(reply) {
                self.respond(ticket.conn, response);
            }
        }
    }

    /// A part of another node's answer to a census: to the request it names, if it still waits.
    fn on_census_part(&mut self, payload: &bytes::Bytes) {
        if let Some(api) = &self.shared.api {
            api.census_part_taken(payload.len());
        }
        let part = match crate::broker::census::parse_part(payload) {
            Ok(part) => part,
            Err(why) => {
                log::debug!("api: ignored a census part: {why}");
                return;
            }
        };
        // The request's id is its connection's serial (see `routes::channels`).
        let Some((key, conn)) = self.conns.iter_mut().find(|(_, c)| c.serial == part.req) else {
            return;
        };
        let Phase::Waiting(pending) = &mut conn.phase else {
            return;
        };
        if let Some(response) = pending.on_part(part) {
            self.respond(key, response);
        }
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let mut late = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            match &conn.phase {
                // The other nodes had their time: answer with what came (it says incomplete).
                Phase::Waiting(pending) if pending.census_due(now) => {
                    late.push((key, pending.response()))
                }
                Phase::Lingering { until } if now >= *until => conn.phase = Phase::Done,
                Phase::Head | Phase::Body { .. } if now >= conn.deadline => {
                    late.push((key, http::error(408, "the request did not arrive in time")))
                }
                Phase::Waiting(pending) if now >= conn.deadline => {
                    late.push((key, pending.timed_out()))
                }
                Phase::Writing if now >= conn.deadline + LINGER => conn.phase = Phase::Done,
                _ => {}
            }
        }
        for (key, response) in late {
            self.respond(key, response);
        }
    }

    /// What `/metrics` shows of the requests under way, as of the end of this turn.
    fn publish_gauges(&self) {
        if let Some(api) = &self.shared.api {
            let waiting = self
                .conns
                .iter()
                .filter(|(_, c)| matches!(c.phase, Phase::Waiting(_)))
                .count();
            api.metrics.waiting.set(waiting as u64);
            api.metrics.awaited.set(self.awaited as u64);
        }
    }

    fn remove_done(&mut self) {
        let done: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Done))
            .map(|(k, _)| k)
            .collect();
        for key in done {
            if let Some(mut conn) = self.conns.try_remove(key) {
                let _ = self.poll.registry().deregister(&mut conn.stream);
                // A slot is free: connections may wait in the accept queue.
                self.accept_again = true;
            }
        }
    }
}

impl Conn {
    /// How many more input bytes the request needs (0 once it has all it needs).
    fn wanted(&self) -> usize {
        match &self.phase {
            // Whatever one read brings until the head is 8 KiB: a body may come with it.
            Phase::Head if self.input.len() < http::MAX_HEAD_BYTES => usize::MAX,
            Phase::Head => 0,
            Phase::Body { head, .. } => {
                (head.len + head.content_length).saturating_sub(self.input.len())
            }
            _ => 0,
        }
    }

    /// When the loop must look at this connection even without readiness.
    fn wake_at(&self) -> Instant {
        match &self.phase {
            Phase::Lingering { until } => *until,
            Phase::Writing => self.deadline + LINGER,
            Phase::Waiting(pending) => pending
                .census_until()
                .map_or(self.deadline, |until| until.min(self.deadline)),
            _ => self.deadline,
        }
    }
}
