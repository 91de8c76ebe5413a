//! One client connection's state machine: HTTP request, then WebSocket, then closing, then dead.
//!
//! A connection's phase and flags change only through the methods here (its fields are
//! private): every way out of `Open` hands back the connection's subscriptions, so the reactor
//! cannot forget to take a closed connection out of its channels, and nothing it queues is ever
//! uncounted ([`outbox`]). A connection holds no buffer while it is idle: incoming bytes are read
//! into the reactor's scratch buffer and parsed in place ([`parse`]); only a frame split across
//! reads is copied into `partial`, and only an outgoing backlog occupies the outbox. That is what
//! keeps an idle connection to a few hundred bytes. What a message means for other connections
//! (publish, subscribe) is returned to the reactor as an [`Action`]; a connection never touches
//! another connection.

pub mod outbox;
mod parse;

use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use mio::net::TcpStream;
use mio::Registry;

use crate::auth::Identity;
use crate::broker::channels::Subscription;
use crate::metrics::CloseReason;
use crate::ws::deflate::Agreed;
use crate::ws::frame::{close_payload, encode};
use crate::ws::utf8::Utf8Validator;
use crate::ws::{CloseCode, OpCode};
use outbox::{Outbox, Overflow, CLOSE_HEADROOM};
pub use parse::ParseContext;

/// Where the connection is in its life.
#[derive(Debug)]
enum Phase {
    /// Reading the HTTP request head.
    Http { head: Vec<u8> },
    /// Writing an HTTP response; the socket is closed once it is out.
    Responding,
    /// A WebSocket.
    Open,
    /// A close frame is queued or sent; waiting for the peer to finish (or the deadline).
    Closing {
        since_ms: u64,
        drop_after_flush: bool,
    },
    /// Deregistered; removed from the slab at the end of the reactor's turn.
    Dead,
}

/// What a received message asks the reactor to do.
#[derive(Debug)]
pub enum Action {
    Publish {
        /// `None`: the raw-mode connection's own channel.
        channel: Option<Bytes>,
        frame: Bytes,
        payload_at: usize,
        /// JSON mode: the request id to echo in the reply (`Some(None)`: reply without id).
        reply: Option<Option<Box<str>>>,
    },
    Subscribe {
        channel: String,
        id: Option<Box<str>>,
        /// Recover from here (channels with history).
        since: Option<crate::protocol::Position>,
        /// Also deliver join and leave events (channels with presence).
        presence_events: bool,
    },
    History {
        channel: String,
        limit: usize,
        id: Option<Box<str>>,
    },
    Presence {
        channel: String,
        id: Option<Box<str>>,
    },
    PresenceStats {
        channel: String,
        id: Option<Box<str>>,
    },
    Unsubscribe {
        channel: String,
        id: Option<Box<str>>,
    },
    Refresh {
        token: String,
        id: Option<Box<str>>,
    },
}

/// Why and how the server ends a WebSocket.
#[derive(Debug, Clone)]
pub struct Close {
    pub code: CloseCode,
    pub reason: String,
    pub why: CloseReason,
    /// The peer started the close: echo and drop once it is written.
    pub echo: bool,
}

impl Close {
    pub fn new(code: CloseCode, reason: impl Into<String>, why: CloseReason) -> Close {
        Close {
            code,
            reason: reason.into(),
            why,
            echo: false,
        }
    }

    /// The client let its outgoing queue overflow `--max-queue`.
    pub fn slow_consumer() -> Close {
        Close::new(
            CloseCode::Policy,
            "slow consumer",
            CloseReason::SlowConsumer,
        )
    }
}

/// Limits a connection enforces; copied from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message: usize,
    pub max_message_rate: u32,
    pub max_queue: usize,
}

/// The timeouts [`Connection::check_timers`] applies, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub ping_ms: u64,
    pub idle_ms: u64,
    pub handshake_ms: u64,
    /// How long a closing connection may take to answer our close frame.
    pub close_grace_ms: u64,
}

/// What a timer check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    Nothing,
    /// A ping was queued: flush the connection.
    Pinged,
    /// Silent past `--idle-timeout`: close it (1001).
    Idle,
    /// Its token expired and no `refresh` replaced it: close it (4001).
    TokenExpired,
    /// The HTTP request took longer than `--handshake-timeout`: drop it.
    HandshakeTimeout,
    /// A response or closing handshake did not finish in time: drop it.
    Stalled,
}

/// What to do after a flush emptied (or did not empty) the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFlush {
    Keep,
    /// The response or final close frame is out: drop the connection.
    Drop,
}

/// The subscriptions of a connection that just left `Open`: the caller must release them from
/// its channel table (and count the WebSocket as closed).
#[must_use = "a connection that left Open must be removed from its channels"]
#[derive(Debug)]
pub struct LeftOpen(pub Vec<Subscription>, pub Option<Arc<Identity>>);

/// A data message being reassembled from fragments.
#[derive(Debug)]
struct Fragments {
    text: bool,
    /// RSV1 on its first frame: `data` is deflated and inflated once the message is whole.
    compressed: bool,
    data: Vec<u8>,
}

/// UTF-8 validation of the text message being received, so an impossible sequence closes the
/// connection (1007) at the fragment or read that brings it, not at the end of the message.
#[derive(Debug, Default, Clone, Copy)]
struct TextCheck {
    /// State after every byte of the message validated so far.
    utf8: Utf8Validator,
    /// Payload bytes of the frame still being received that are already validated.
    checked: u32,
}

/// Token bucket for `--max-message-rate`: refilled continuously, bursts up to the rate.
#[derive(Debug, Default)]
struct RateBucket {
    tokens: f32,
    last_ms: u64,
}

pub struct Connection {
    stream: TcpStream,
    /// Distinguishes this connection from a later one that reuses its slab key.
    serial: u64,
    phase: Phase,
    json: bool,
    subs: Vec<Subscription>,
    /// Bytes of a frame that straddles reads (empty, with no allocation, when idle).
    partial: Vec<u8>,
    fragments: Option<Box<Fragments>>,
    text_check: TextCheck,
    /// permessage-deflate parameters, when negotiated.
    deflate: Option<Agreed>,
    out: Outbox,
    last_rx_ms: u64,
    opened_ms: u64,
    ping_outstanding: bool,
    /// In the reactor's flush list.
    dirty: bool,
    /// Write side shut down after the close frame went out.
    shut_down: bool,
    rate: RateBucket,
    /// Who the token said this is (absent without one).
    identity: Option<Arc<Identity>>,
    /// When the token expires, in reactor milliseconds (0: never).
    token_deadline_ms: u64,
}

impl Connection {
    pub fn new(stream: TcpStream, serial: u64, now_ms: u64) -> Connection {
        Connection {
            stream,
            serial,
            phase: Phase::Http { head: Vec::new() },
            json: false,
            subs: Vec::new(),
            partial: Vec::new(),
            fragments: None,
            text_check: TextCheck::default(),
            deflate: None,
            out: Outbox::default(),
            last_rx_ms: now_ms,
            opened_ms: now_ms,
            ping_outstanding: false,
            dirty: false,
            shut_down: false,
            rate: RateBucket::default(),
            identity: None,
            token_deadline_ms: 0,
        }
    }

    pub fn serial(&self) -> u64 {
        self.serial
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    pub fn is_dead(&self) -> bool {
        matches!(self.phase, Phase::Dead)
    }

    /// Whether it still reads its HTTP request (and so has no WebSocket to close).
    pub fn is_http(&self) -> bool {
        matches!(self.phase, Phase::Http { .. })
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// The permessage-deflate parameters, when negotiated.
    pub fn deflate(&self) -> Option<Agreed> {
        self.deflate
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes queued to the client and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.out.len_bytes()
    }

    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subs
    }

    /// Reads from the socket, noting the time (any byte proves the peer alive). Input that
    /// arrives after the WebSocket started closing is read only to notice the end of the stream.
    pub fn read(&mut self, buf: &mut [u8], now_ms: u64) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.last_rx_ms = now_ms;
        Ok(n)
    }

    /// Appends request bytes while the HTTP head is being read; the whole head so far, or `None`
    /// once the connection is past that phase.
    pub fn http_input(&mut self, data: &[u8]) -> Option<&[u8]> {
        match &mut self.phase {
            Phase::Http { head } => {
                head.extend_from_slice(data);
                Some(head)
            }
            _ => None,
        }
    }

    /// Queues an HTTP response and closes once it is written. One response per connection,
    /// generated by the server, so it is bounded by its own size rather than by `--max-queue`.
    pub fn respond(&mut self, response: Bytes) {
        if !self.is_http() {
            return;
        }
        let _ = self.out.push(response, usize::MAX);
        self.phase = Phase::Responding;
    }

    /// Completes the upgrade: queues the 101 response and opens the WebSocket.
    pub fn open_websocket(&mut self, json: bool, deflate: Option<Agreed>, response: Bytes) {
        if !self.is_http() {
            return;
        }
        self.json = json;
        self.deflate = deflate;
        let _ = self.out.push(response, usize::MAX);
        self.phase = Phase::Open;
    }

    /// The identity the connection's token gave (set at the upgrade, replaced by `refresh`),
    /// and when it expires in reactor milliseconds (0: never).
    pub fn set_identity(&mut self, identity: Option<Arc<Identity>>, deadline_ms: u64) {
        self.identity = identity;
        self.token_deadline_ms = deadline_ms;
    }

    pub fn identity(&self) -> Option<&Arc<Identity>> {
        self.identity.as_ref()
    }

    /// Queues a frame for an open WebSocket within `max_queue`. On overflow nothing is queued and
    /// the caller closes the connection ([`Close::slow_consumer`]).
    #[inline]
    pub fn send(&mut self, frame: Bytes, max_queue: usize) -> Result<(), Overflow> {
        if !self.is_open() {
            return Ok(());
        }
        self.out.push(frame, max_queue)
    }

    /// Records a subscription; refused past `max` channels.
    pub fn add_subscription(&mut self, sub: Subscription, max: usize) -> Result<(), Subscription> {
        if !self.is_open() || self.subs.len() >= max {
            return Err(sub);
        }
        self.subs.push(sub);
        Ok(())
    }

    pub fn is_subscribed(&self, channel: u32) -> bool {
        self.subs.iter().any(|s| s.channel == channel)
    }

    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }

    pub fn first_subscription(&self) -> Option<Subscription> {
        self.subs.first().copied()
    }

    /// Forgets the subscription to `channel`, returning it for the channel table.
    pub fn remove_subscription(&mut self, channel: u32) -> Option<Subscription> {
        let at = self.subs.iter().position(|s| s.channel == channel)?;
        Some(self.subs.swap_remove(at))
    }

    /// Starts the WebSocket closing handshake (or echoes the client's). A slow consumer's backlog
    /// is dropped first: it is not reading, and only the close frame is still worth sending.
    pub fn close(&mut self, close: &Close, now_ms: u64) -> Option<LeftOpen> {
        if !self.is_open() {
            return None;
        }
        if close.why == CloseReason::SlowConsumer {
            self.out.discard();
        }
        self.fragments = None;
        self.partial = Vec::new();
        let client_sent_nothing = close.echo
            && close.code == CloseCode::Normal
            && close.reason.is_empty()
            && close.why == CloseReason::Client;
        let frame = if client_sent_nothing {
            encode(OpCode::Close, &[])
        } else {
            encode(
                OpCode::Close,
                &close_payload(close.code.code(), &close.reason),
            )
        };
        // The headroom guarantees the close frame fits after a slow consumer's discard.
        let limit = self.out.len_bytes() + CLOSE_HEADROOM;
        let _ = self.out.push(frame, limit);
        self.phase = Phase::Closing {
            since_ms: now_ms,
            // Once we echoed the client's close, or told a misbehaving client why, there is
            // nothing more to wait for.
            drop_after_flush: close.echo || close.why == CloseReason::SlowConsumer,
        };
        Some(LeftOpen(
            std::mem::take(&mut self.subs),
            self.identity.take(),
        ))
    }

    /// Tears the connection down now: deregisters the socket and drops its output. Returns its
    /// subscriptions if it was an open WebSocket.
    pub fn kill(&mut self, registry: &Registry) -> Option<LeftOpen> {
        if self.is_dead() {
            return None;
        }
        let was_open = self.is_open();
        let _ = registry.deregister(&mut self.stream);
        self.phase = Phase::Dead;
        self.out = Outbox::default();
        self.partial = Vec::new();
        self.fragments = None;
        let subs = std::mem::take(&mut self.subs);
        let identity = self.identity.take();
        was_open.then_some(LeftOpen(subs, identity))
    }

    /// Whether this connection had completed a WebSocket upgrade (open or closing).
    pub fn is_websocket(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Closing { .. })
    }

    /// Writes what the socket takes; then says whether the connection is finished.
    pub fn flush(&mut self) -> io::Result<(usize, AfterFlush)> {
        if self.is_dead() {
            return Ok((0, AfterFlush::Keep));
        }
        let written = self.out.flush(&mut self.stream)?;
        if self.has_output() {
            return Ok((written, AfterFlush::Keep));
        }
        let next = match self.phase {
            Phase::Responding
            | Phase::Closing {
                drop_after_flush: true,
                ..
            } => AfterFlush::Drop,
            Phase::Closing {
                drop_after_flush: false,
                ..
            } => {
                if !self.shut_down {
                    // Our close frame is out: send FIN and wait for the client to finish.
                    self.shut_down = true;
                    let _ = self.stream.shutdown(std::net::Shutdown::Write);
                }
                AfterFlush::Keep
            }
            _ => AfterFlush::Keep,
        };
        Ok((written, next))
    }

    /// Marks the connection for the end-of-turn flush; `true` when the caller must add it to
    /// its flush list (it has output and was not listed yet).
    pub fn mark_dirty(&mut self) -> bool {
        if self.dirty || !self.has_output() || self.is_dead() {
            return false;
        }
        self.dirty = true;
        true
    }

    /// Taken off the flush list.
    pub fn clear_dirty(&mut self) {
        self.dirty = false;
    }

    /// Pings a silent client, reports what timed out, and frees buffers an idle one no longer
    /// needs.
    pub fn check_timers(&mut self, now_ms: u64, t: &Timeouts, max_queue: usize) -> Due {
        match self.phase {
            Phase::Http { .. } if now_ms.saturating_sub(self.opened_ms) > t.handshake_ms => {
                Due::HandshakeTimeout
            }
            Phase::Responding if now_ms.saturating_sub(self.opened_ms) > t.handshake_ms => {
                Due::Stalled
            }
            Phase::Closing { since_ms, .. }
                if now_ms.saturating_sub(since_ms) > t.close_grace_ms =>
            {
                Due::Stalled
            }
            Phase::Open => {
                let silent = now_ms.saturating_sub(self.last_rx_ms);
                if self.token_deadline_ms != 0 && now_ms >= self.token_deadline_ms {
                    Due::TokenExpired
                } else if silent >= t.idle_ms {
                    Due::Idle
                } else if silent >= t.ping_ms && !self.ping_outstanding {
                    self.ping_outstanding = true;
                    match self.out.push(Bytes::from_static(&[0x89, 0x00]), max_queue) {
                        Ok(()) => Due::Pinged,
                        // A client this far behind is closed by its next delivery; a missing
                        // ping only makes the idle timeout the judge.
                        Err(Overflow) => Due::Nothing,
                    }
                } else {
                    if !self.has_output() {
                        self.shrink_when_idle();
                    }
                    Due::Nothing
                }
            }
            _ => Due::Nothing,
        }
    }

    /// Releases memory an idle connection no longer needs.
    fn shrink_when_idle(&mut self) {
        self.out.shrink();
        if self.partial.is_empty() && self.partial.capacity() > 0 {
            self.partial = Vec::new();
        }
        if self.subs.capacity() > self.subs.len() * 2 + 1 {
            self.subs.shrink_to_fit();
        }
    }

    /// Queues a reply or control frame from the parse path; overflow closes the connection.
    fn send_or_close(&mut self, frame: Bytes, limits: &Limits) -> Result<(), Close> {
        self.send(frame, limits.max_queue)
            .map_err(|Overflow| Close::slow_consumer())
    }

    fn take_rate_token(&mut self, rate: u32, now_ms: u64) -> bool {
        let rate = rate as f32;
        if self.rate.last_ms == 0 {
            self.rate.tokens = rate;
        } else {
            let elapsed = now_ms.saturating_sub(self.rate.last_ms) as f32 / 1000.0;
            self.rate.tokens = (self.rate.tokens + elapsed * rate).min(rate);
        }
        self.rate.last_ms = now_ms.max(1);
        if self.rate.tokens >= 1.0 {
            self.rate.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::FrameHeader;
    use std::io::Read;

    /// A connection whose socket has a tiny send buffer, and the peer's end of it.
    fn pair() -> (Connection, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        server.set_nonblocking(true).unwrap();
        let mut conn = Connection::new(TcpStream::from_std(server), 1, 1);
        conn.open_websocket(false, None, Bytes::new());
        (conn, peer)
    }

    #[test]
    fn a_slow_consumer_close_finishes_the_frame_already_on_the_wire() {
        let (mut conn, mut peer) = pair();
        // Far more than the peer's receive window before it starts reading.
        let payload = vec![b'x'; 1 << 20];
        conn.send(encode(OpCode::Binary, &payload), 4 << 20)
            .unwrap();
        conn.send(encode(OpCode::Binary, b"queued"), 4 << 20)
            .unwrap();
        conn.flush().unwrap();
        assert!(
            conn.out.is_mid_frame(),
            "the first frame is only partly written"
        );
        let left = conn.close(&Close::slow_consumer(), 1);
        assert!(left.is_some(), "leaving Open hands back the subscriptions");
        assert_eq!(
            conn.out.frames(),
            2,
            "the started frame and the close frame"
        );
        // Flush the rest while the peer reads everything.
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).unwrap();
            all
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (_, next) = conn.flush().unwrap();
            if next == AfterFlush::Drop {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "flush stalled");
            std::thread::yield_now();
        }
        assert_eq!(conn.queued_bytes(), 0);
        conn.stream.shutdown(std::net::Shutdown::Both).unwrap();
        let wire = reader.join().unwrap();
        let first = FrameHeader::parse(&wire, false, u64::MAX >> 1)
            .unwrap()
            .unwrap();
        assert_eq!(
            (first.opcode, first.payload_len),
            (OpCode::Binary, payload.len() as u64)
        );
        let rest = &wire[first.header_len + payload.len()..];
        assert_eq!(
            rest,
            &encode(OpCode::Close, &close_payload(1008, "slow consumer"))[..],
            "the close frame follows the whole frame; the queued one is gone"
        );
    }

    #[test]
    fn nothing_is_queued_or_subscribed_once_closed() {
        let (mut conn, _peer) = pair();
        let sub = Subscription {
            channel: 1,
            slot: 0,
        };
        conn.add_subscription(sub, 8).unwrap();
        let LeftOpen(subs, _) = conn
            .close(
                &Close::new(CloseCode::Away, "bye", CloseReason::Shutdown),
                1,
            )
            .unwrap();
        assert_eq!(subs, vec![sub]);
        assert!(conn.add_subscription(sub, 8).is_err());
        let before = conn.queued_bytes();
        conn.send(encode(OpCode::Text, b"late"), 1 << 20).unwrap();
        assert_eq!(
            conn.queued_bytes(),
            before,
            "a closing connection gets no data"
        );
        assert!(
            conn.close(&Close::slow_consumer(), 2).is_none(),
            "closes once"
        );
    }
}
