//! One client connection's state machine: HTTP request, then WebSocket, then closing.
//!
//! A connection holds no buffer while it is idle: incoming bytes are read into the reactor's
//! scratch buffer and parsed in place; only a frame split across reads is copied into `partial`,
//! and only an outgoing backlog occupies `out`. That is what keeps an idle connection to a few
//! hundred bytes. What a message means for other connections (publish, subscribe) is returned to
//! the reactor as an [`Action`]; the connection never touches another connection.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::{BufMut, Bytes};
use mio::net::TcpStream;

use crate::broker::channels::Subscription;
use crate::broker::Message;
use crate::metrics::{CloseReason, ReactorMetrics};
use crate::protocol::{self, Command};
use crate::ws::frame::{apply_mask, close_payload, encode, FrameError};
use crate::ws::{CloseCode, FrameHeader, OpCode};

/// Where the connection is in its life.
#[derive(Debug)]
pub enum Phase {
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
    },
    Unsubscribe {
        channel: String,
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

    fn protocol(e: impl std::fmt::Display) -> Close {
        Close::new(CloseCode::Protocol, e.to_string(), CloseReason::Protocol)
    }
}

/// Limits a connection enforces while parsing; copied from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message: usize,
    pub max_message_rate: u32,
}

/// A data message being reassembled from fragments.
#[derive(Debug)]
struct Fragments {
    text: bool,
    data: Vec<u8>,
}

/// Token bucket for `--max-message-rate`: refilled continuously, bursts up to the rate.
#[derive(Debug, Default)]
struct RateBucket {
    tokens: f32,
    last_ms: u64,
}

pub struct Connection {
    pub stream: TcpStream,
    /// Distinguishes this connection from a later one that reuses its slab key.
    pub serial: u64,
    pub phase: Phase,
    pub json: bool,
    pub subs: Vec<Subscription>,
    /// Bytes of a frame that straddles reads (empty, with no allocation, when idle).
    partial: Vec<u8>,
    fragments: Option<Box<Fragments>>,
    out: VecDeque<Bytes>,
    /// Bytes of `out.front()` already written.
    out_offset: usize,
    pub out_bytes: usize,
    pub last_rx_ms: u64,
    pub opened_ms: u64,
    pub ping_outstanding: bool,
    /// In the reactor's flush list.
    pub dirty: bool,
    /// Counted in metrics as closed (each WebSocket is counted once).
    pub counted_closed: bool,
    /// Write side shut down after the close frame went out.
    pub shut_down: bool,
    rate: RateBucket,
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
            out: VecDeque::new(),
            out_offset: 0,
            out_bytes: 0,
            last_rx_ms: now_ms,
            opened_ms: now_ms,
            ping_outstanding: false,
            dirty: false,
            counted_closed: false,
            shut_down: false,
            rate: RateBucket::default(),
        }
    }

    pub fn is_websocket(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Closing { .. })
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Queues a frame; returns false when the queue would exceed `max_queue` (nothing queued).
    #[inline]
    pub fn enqueue(&mut self, frame: Bytes, max_queue: usize) -> bool {
        if self.out_bytes + frame.len() > max_queue {
            return false;
        }
        self.out_bytes += frame.len();
        self.out.push_back(frame);
        true
    }

    /// Queues a frame regardless of the limit (control frames and replies are small and rare).
    pub fn enqueue_control(&mut self, frame: Bytes) {
        self.out_bytes += frame.len();
        self.out.push_back(frame);
    }

    /// Drops queued output (a slow consumer's backlog) and frees the queue. A frame already
    /// partly written is kept: the peer would otherwise read whatever comes next (the close
    /// frame) as the rest of its payload.
    pub fn discard_output(&mut self) {
        let started = if self.out_offset > 0 {
            self.out.pop_front()
        } else {
            None
        };
        self.out = VecDeque::new();
        self.out_bytes = 0;
        match started {
            Some(frame) => {
                self.out_bytes = frame.len() - self.out_offset;
                self.out.push_back(frame);
            }
            None => self.out_offset = 0,
        }
    }

    /// Releases memory an idle connection no longer needs.
    pub fn shrink_when_idle(&mut self) {
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = VecDeque::new();
        }
        if self.partial.is_empty() && self.partial.capacity() > 0 {
            self.partial = Vec::new();
        }
        if self.subs.capacity() > self.subs.len() * 2 + 1 {
            self.subs.shrink_to_fit();
        }
    }

    /// Writes queued frames with vectored writes until done or the socket is full.
    /// Returns bytes written; `Ok` with output left means "wait for WRITABLE".
    pub fn flush(&mut self) -> io::Result<usize> {
        let mut written = 0;
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); 64];
            let mut n = 0;
            for (i, frame) in self.out.iter().take(slices.len()).enumerate() {
                let start = if i == 0 { self.out_offset } else { 0 };
                slices[i] = IoSlice::new(&frame[start..]);
                n += 1;
            }
            match self.stream.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut wrote) => {
                    written += wrote;
                    self.out_bytes -= wrote;
                    while wrote > 0 {
                        let left = self.out[0].len() - self.out_offset;
                        if wrote >= left {
                            wrote -= left;
                            self.out.pop_front();
                            self.out_offset = 0;
                        } else {
                            self.out_offset += wrote;
                            wrote = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// Parses WebSocket frames from `input` (freshly read bytes). Complete messages become
    /// actions or replies; a protocol violation returns the close to perform.
    pub fn on_frames(
        &mut self,
        input: &[u8],
        limits: Limits,
        now_ms: u64,
        metrics: &ReactorMetrics,
        scratch: &mut Vec<u8>,
        actions: &mut Vec<Action>,
    ) -> Result<(), Close> {
        if self.partial.is_empty() {
            let used = self.parse_frames(input, limits, now_ms, metrics, scratch, actions)?;
            if used < input.len() && self.is_open() {
                self.partial.extend_from_slice(&input[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(input);
            let used = self.parse_frames(&buf, limits, now_ms, metrics, scratch, actions)?;
            buf.drain(..used);
            if !buf.is_empty() && self.is_open() {
                self.partial = buf;
            }
        }
        Ok(())
    }

    fn parse_frames(
        &mut self,
        buf: &[u8],
        limits: Limits,
        now_ms: u64,
        metrics: &ReactorMetrics,
        scratch: &mut Vec<u8>,
        actions: &mut Vec<Action>,
    ) -> Result<usize, Close> {
        let mut at = 0;
        while self.is_open() {
            let already = self.fragments.as_ref().map_or(0, |f| f.data.len());
            let room = limits.max_message.saturating_sub(already) as u64;
            let head = match FrameHeader::parse(&buf[at..], true, room) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(FrameError::TooBig { .. }) => {
                    return Err(Close::new(
                        CloseCode::TooBig,
                        format!("message over {} bytes", limits.max_message),
                        CloseReason::Protocol,
                    ))
                }
                Err(e) => return Err(Close::protocol(e)),
            };
            let total = head.header_len + head.payload_len as usize;
            if buf.len() - at < total {
                break;
            }
            let payload = &buf[at + head.header_len..at + total];
            at += total;
            self.on_frame(head, payload, limits, now_ms, metrics, scratch, actions)?;
        }
        Ok(at)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_frame(
        &mut self,
        head: FrameHeader,
        masked: &[u8],
        limits: Limits,
        now_ms: u64,
        metrics: &ReactorMetrics,
        scratch: &mut Vec<u8>,
        actions: &mut Vec<Action>,
    ) -> Result<(), Close> {
        let mask = head.mask.unwrap_or([0; 4]);
        match head.opcode {
            OpCode::Ping => {
                let mut pong = encode(OpCode::Pong, masked);
                let at = pong.len() - masked.len();
                apply_mask(&mut pong[at..], mask, 0);
                self.enqueue_control(Bytes::from(pong));
                metrics.messages_out.inc();
                Ok(())
            }
            OpCode::Pong => {
                self.ping_outstanding = false;
                Ok(())
            }
            OpCode::Close => Err(self.on_close_frame(masked, mask)),
            OpCode::Text | OpCode::Binary => {
                if self.fragments.is_some() {
                    return Err(Close::protocol(
                        "new data frame inside a fragmented message",
                    ));
                }
                let text = head.opcode == OpCode::Text;
                if head.fin {
                    self.on_message(
                        text,
                        masked,
                        Some(mask),
                        limits,
                        now_ms,
                        metrics,
                        scratch,
                        actions,
                    )
                } else {
                    let mut data = masked.to_vec();
                    apply_mask(&mut data, mask, 0);
                    self.fragments = Some(Box::new(Fragments { text, data }));
                    Ok(())
                }
            }
            OpCode::Continuation => {
                let Some(fragments) = self.fragments.as_mut() else {
                    return Err(Close::protocol(
                        "continuation frame without a message to continue",
                    ));
                };
                let at = fragments.data.len();
                fragments.data.extend_from_slice(masked);
                apply_mask(&mut fragments.data[at..], mask, 0);
                if head.fin {
                    let Fragments { text, data } = *self.fragments.take().expect("checked above");
                    self.on_message(text, &data, None, limits, now_ms, metrics, scratch, actions)
                } else {
                    Ok(())
                }
            }
        }
    }

    fn on_close_frame(&mut self, masked: &[u8], mask: [u8; 4]) -> Close {
        let mut body = masked.to_vec();
        apply_mask(&mut body, mask, 0);
        let mut close = match body.len() {
            0 => Close::new(CloseCode::Normal, "", CloseReason::Client),
            1 => Close::protocol("close frame with a 1-byte body"),
            _ => {
                let code = u16::from_be_bytes([body[0], body[1]]);
                if !CloseCode::is_valid_on_wire(code) {
                    Close::protocol(format!("invalid close code {code}"))
                } else if std::str::from_utf8(&body[2..]).is_err() {
                    Close::new(
                        CloseCode::InvalidPayload,
                        "close reason is not UTF-8",
                        CloseReason::Protocol,
                    )
                } else {
                    Close::new(CloseCode::Other(code), "", CloseReason::Client)
                }
            }
        };
        close.echo = true;
        close
    }

    /// A complete data message. `mask` is set when `data` is still masked (single-frame message).
    #[allow(clippy::too_many_arguments)]
    fn on_message(
        &mut self,
        text: bool,
        data: &[u8],
        mask: Option<[u8; 4]>,
        limits: Limits,
        now_ms: u64,
        metrics: &ReactorMetrics,
        scratch: &mut Vec<u8>,
        actions: &mut Vec<Action>,
    ) -> Result<(), Close> {
        metrics.messages_in.inc();
        metrics.bytes_in.add(data.len() as u64);
        if limits.max_message_rate > 0 && !self.take_rate_token(limits.max_message_rate, now_ms) {
            return Err(Close::new(
                CloseCode::Policy,
                format!(
                    "rate limit: more than {} messages per second",
                    limits.max_message_rate
                ),
                CloseReason::RateLimit,
            ));
        }
        let invalid_utf8 = || {
            Close::new(
                CloseCode::InvalidPayload,
                "text message is not valid UTF-8",
                CloseReason::Protocol,
            )
        };
        if !self.json {
            // Raw mode: unmask straight into the outgoing frame; this is the only copy.
            let (frame, payload_at) = Message::frame_with(data.len(), text, |buf| {
                let at = buf.len();
                buf.put_slice(data);
                if let Some(mask) = mask {
                    apply_mask(&mut buf[at..], mask, 0);
                }
            });
            if text && std::str::from_utf8(&frame[payload_at..]).is_err() {
                return Err(invalid_utf8());
            }
            actions.push(Action::Publish {
                channel: None,
                frame,
                payload_at,
                reply: None,
            });
            return Ok(());
        }
        scratch.clear();
        scratch.extend_from_slice(data);
        if let Some(mask) = mask {
            apply_mask(scratch, mask, 0);
        }
        if !text {
            self.reply(
                protocol::error_reply(
                    None,
                    "binary frames are not accepted in fanout.json mode; send JSON text",
                ),
                metrics,
            );
            return Ok(());
        }
        if std::str::from_utf8(scratch).is_err() {
            return Err(invalid_utf8());
        }
        match protocol::parse_command(scratch) {
            Err(e) => {
                let reply = protocol::error_reply(e.id, &e.message);
                self.reply(reply, metrics);
            }
            Ok(req) => {
                let id = req.id.map(Box::from);
                actions.push(match req.command {
                    Command::Subscribe { channel } => Action::Subscribe {
                        channel: channel.into_owned(),
                        id,
                    },
                    Command::Unsubscribe { channel } => Action::Unsubscribe {
                        channel: channel.into_owned(),
                        id,
                    },
                    Command::Publish { channel, payload } => {
                        let (frame, payload_at) =
                            Message::frame_with(payload.len(), true, |buf| buf.put_slice(&payload));
                        Action::Publish {
                            channel: Some(Bytes::copy_from_slice(channel.as_bytes())),
                            frame,
                            payload_at,
                            reply: Some(id),
                        }
                    }
                });
            }
        }
        Ok(())
    }

    pub fn reply(&mut self, frame: Bytes, metrics: &ReactorMetrics) {
        metrics.messages_out.inc();
        self.enqueue_control(frame);
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

    /// Queues a close frame and moves to `Closing`.
    pub fn start_close(
        &mut self,
        code: CloseCode,
        reason: &str,
        now_ms: u64,
        drop_after_flush: bool,
    ) {
        self.fragments = None;
        self.partial = Vec::new();
        self.enqueue_control(Bytes::from(encode(
            OpCode::Close,
            &close_payload(code.code(), reason),
        )));
        self.phase = Phase::Closing {
            since_ms: now_ms,
            drop_after_flush,
        };
    }

    /// The echo of a client's close: an empty close frame if it sent no code.
    pub fn echo_close(&mut self, close: &Close, now_ms: u64) {
        if close.code == CloseCode::Normal
            && close.reason.is_empty()
            && close.why == CloseReason::Client
        {
            self.fragments = None;
            self.partial = Vec::new();
            self.enqueue_control(Bytes::from(encode(OpCode::Close, &[])));
            self.phase = Phase::Closing {
                since_ms: now_ms,
                drop_after_flush: true,
            };
        } else {
            self.start_close(close.code, &close.reason, now_ms, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let conn = Connection::new(TcpStream::from_std(server), 1, 1);
        (conn, peer)
    }

    #[test]
    fn discarding_a_backlog_finishes_the_frame_already_on_the_wire() {
        let (mut conn, mut peer) = pair();
        // Far more than the peer's receive window before it starts reading.
        let payload = vec![b'x'; 1 << 20];
        assert!(conn.enqueue(Bytes::from(encode(OpCode::Binary, &payload)), 4 << 20));
        assert!(conn.enqueue(Bytes::from(encode(OpCode::Binary, b"queued")), 4 << 20));
        conn.flush().unwrap();
        assert!(
            conn.out_offset > 0,
            "the first frame is only partly written"
        );
        conn.discard_output();
        assert_eq!(conn.out.len(), 1, "only the started frame is kept");
        conn.enqueue_control(Bytes::from(encode(
            OpCode::Close,
            &close_payload(1008, "slow consumer"),
        )));
        // Flush the rest while the peer reads everything.
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).unwrap();
            all
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while conn.has_output() {
            assert!(std::time::Instant::now() < deadline, "flush stalled");
            conn.flush().unwrap();
            std::thread::yield_now();
        }
        assert_eq!(conn.out_bytes, 0);
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
}
