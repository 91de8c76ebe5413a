//! The WebSocket read path of a connection: frames parsed in place from freshly read bytes,
//! control frames answered, fragments reassembled, complete messages turned into [`Action`]s
//! (raw mode) or JSON commands (JSON mode).
//!
//! Everything this path may cost is bounded here: a message over `--max-message` is refused
//! from its header, before its payload is buffered; every frame, control frames included, takes
//! a `--max-message-rate` token; every pong and reply goes through the connection's outbox limit.

use bytes::{BufMut, Bytes};

use super::{Action, Close, Connection, Fragments, Limits, TextCheck};
use crate::broker::data_opcode;
use crate::metrics::{CloseReason, ReactorMetrics};
use crate::protocol::{self, Command};
use crate::ws::deflate::Inflater;
use crate::ws::frame::{apply_mask, encode_with, FrameError};
use crate::ws::utf8::Utf8Validator;
use crate::ws::{CloseCode, FrameHeader, OpCode};

/// What the parse path needs from the reactor, passed as one value.
pub struct ParseContext<'a> {
    pub limits: Limits,
    pub now_ms: u64,
    pub metrics: &'a ReactorMetrics,
    /// Reused buffer for unmasking JSON commands.
    pub scratch: &'a mut Vec<u8>,
    /// Where complete messages that concern other connections go.
    pub actions: &'a mut Vec<Action>,
    /// The reactor's inflater (reset per message: clients are told `client_no_context_takeover`).
    pub inflater: &'a mut Inflater,
    /// Reused buffer a compressed message is inflated into.
    pub inflated: &'a mut Vec<u8>,
}

impl Close {
    fn protocol(e: impl std::fmt::Display) -> Close {
        Close::new(CloseCode::Protocol, e.to_string(), CloseReason::Protocol)
    }

    fn frame_error(e: FrameError, limits: &Limits) -> Close {
        match e {
            FrameError::TooBig { .. } => Close::new(
                e.close_code(),
                format!("message over {} bytes", limits.max_message),
                CloseReason::Protocol,
            ),
            _ => Close::new(e.close_code(), e.to_string(), CloseReason::Protocol),
        }
    }

    fn invalid_utf8() -> Close {
        Close::new(
            CloseCode::InvalidPayload,
            "text message is not valid UTF-8",
            CloseReason::Protocol,
        )
    }
}

impl Connection {
    /// Parses WebSocket frames from `input` (freshly read bytes). Complete messages become
    /// actions or replies; a protocol violation or an overflowing reply returns the close to
    /// perform. Actions pushed before the error are still valid requests.
    pub fn on_frames(&mut self, input: &[u8], ctx: &mut ParseContext) -> Result<(), Close> {
        if !self.is_open() {
            return Ok(());
        }
        if self.partial.is_empty() {
            let used = self.parse_frames(input, ctx)?;
            if used < input.len() && self.is_open() {
                self.partial.extend_from_slice(&input[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(input);
            let used = self.parse_frames(&buf, ctx)?;
            buf.drain(..used);
            if !buf.is_empty() && self.is_open() {
                self.partial = buf;
            }
        }
        Ok(())
    }

    fn parse_frames(&mut self, buf: &[u8], ctx: &mut ParseContext) -> Result<usize, Close> {
        let limits = ctx.limits;
        let mut at = 0;
        while self.is_open() {
            let max = limits.max_message as u64;
            let deflate = self.deflate.is_some();
            let head = match FrameHeader::parse_ext(&buf[at..], true, max, deflate) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(Close::frame_error(e, &limits)),
            };
            // The fragments received so far count against the message, refused from the header
            // before its payload is buffered; control frames between fragments are not part of
            // the message (RFC 6455 5.4) and are bounded at 125 bytes anyway.
            let already = self.fragments.as_ref().map_or(0, |f| f.data.len()) as u64;
            if !head.opcode.is_control() && already + head.payload_len > max {
                let e = FrameError::TooBig {
                    len: already + head.payload_len,
                    max,
                };
                return Err(Close::frame_error(e, &limits));
            }
            let total = head.header_len + head.payload_len as usize;
            if buf.len() - at < total {
                // Validate what has arrived of a text frame, so invalid UTF-8 fails now.
                let available = &buf[at + head.header_len..];
                self.check_partial_text(&head, available, ctx.scratch)?;
                break;
            }
            let payload = &buf[at + head.header_len..at + total];
            at += total;
            if limits.max_message_rate > 0
                && !self.take_rate_token(limits.max_message_rate, ctx.now_ms)
            {
                return Err(Close::new(
                    CloseCode::Policy,
                    format!(
                        "rate limit: more than {} frames per second",
                        limits.max_message_rate
                    ),
                    CloseReason::RateLimit,
                ));
            }
            self.on_frame(head, payload, ctx)?;
        }
        Ok(at)
    }

    fn on_frame(
        &mut self,
        head: FrameHeader,
        masked: &[u8],
        ctx: &mut ParseContext,
    ) -> Result<(), Close> {
        let mask = head.mask.unwrap_or([0; 4]);
        match head.opcode {
            OpCode::Ping => {
                let (pong, at) = encode_with(OpCode::Pong, masked.len(), |buf| {
                    let at = buf.len();
                    buf.put_slice(masked);
                    apply_mask(&mut buf[at..], mask, 0);
                });
                debug_assert!(at <= 2);
                ctx.metrics.messages_out.inc();
                self.send_or_close(pong, &ctx.limits)
            }
            OpCode::Pong => {
                self.ping_outstanding = false;
                Ok(())
            }
            OpCode::Close => Err(on_close_frame(masked, mask)),
            OpCode::Text | OpCode::Binary => {
                if self.fragments.is_some() {
                    return Err(Close::protocol(
                        "new data frame inside a fragmented message",
                    ));
                }
                let text = head.opcode == OpCode::Text;
                if head.rsv1 {
                    let mut data = masked.to_vec();
                    apply_mask(&mut data, mask, 0);
                    if head.fin {
                        return self.on_compressed(text, &data, ctx);
                    }
                    self.fragments = Some(Box::new(Fragments {
                        text,
                        compressed: true,
                        data,
                    }));
                    return Ok(());
                }
                if head.fin {
                    self.on_message(text, masked, Some(mask), ctx)
                } else {
                    let mut data = masked.to_vec();
                    apply_mask(&mut data, mask, 0);
                    if text {
                        self.check_text(&data, false)?;
                    }
                    self.fragments = Some(Box::new(Fragments {
                        text,
                        compressed: false,
                        data,
                    }));
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
                if fragments.text && !fragments.compressed {
                    let checked = self.text_check.checked as usize;
                    let mut check = self.text_check;
                    let result = check.utf8.feed(&fragments.data[at + checked..]);
                    self.text_check = TextCheck {
                        utf8: check.utf8,
                        checked: 0,
                    };
                    result.map_err(|_| Close::invalid_utf8())?;
                    if head.fin {
                        self.text_check
                            .utf8
                            .finish()
                            .map_err(|_| Close::invalid_utf8())?;
                    }
                }
                if !head.fin {
                    return Ok(());
                }
                match self.fragments.take() {
                    Some(done) => {
                        let Fragments {
                            text,
                            compressed,
                            data,
                        } = *done;
                        if compressed {
                            self.on_compressed(text, &data, ctx)
                        } else {
                            self.on_message(text, &data, None, ctx)
                        }
                    }
                    None => Ok(()),
                }
            }
        }
    }

    /// A complete data message. `mask` is set when `data` is still masked (single-frame message).
    fn on_message(
        &mut self,
        text: bool,
        data: &[u8],
        mask: Option<[u8; 4]>,
        ctx: &mut ParseContext,
    ) -> Result<(), Close> {
        ctx.metrics.messages_in.inc();
        ctx.metrics.bytes_in.add(data.len() as u64);
        if !self.json {
            // Raw mode: unmask straight into the outgoing frame; this is the only copy.
            let (frame, payload_at) = encode_with(data_opcode(text), data.len(), |buf| {
                let at = buf.len();
                buf.put_slice(data);
                if let Some(mask) = mask {
                    apply_mask(&mut buf[at..], mask, 0);
                }
            });
            if text && mask.is_some() {
                self.check_text(&frame[payload_at..], true)?;
            }
            ctx.actions.push(Action::Publish {
                channel: None,
                frame,
                payload_at,
                reply: None,
            });
            return Ok(());
        }
        let scratch = &mut *ctx.scratch;
        scratch.clear();
        scratch.extend_from_slice(data);
        if let Some(mask) = mask {
            apply_mask(scratch, mask, 0);
        }
        if !text {
            let reply = protocol::error_reply(
                None,
                "binary frames are not accepted in fanout.json mode; send JSON text",
            );
            return self.reply(reply, ctx);
        }
        if mask.is_some() {
            // A single-frame message: validate what the partial-frame check has not (a
            // reassembled or inflated message was validated on the way).
            let checked = (self.text_check.checked as usize).min(scratch.len());
            let mut utf8 = self.text_check.utf8;
            self.text_check = TextCheck::default();
            if utf8
                .feed(&scratch[checked..])
                .and_then(|()| utf8.finish())
                .is_err()
            {
                return Err(Close::invalid_utf8());
            }
        }
        let action = match protocol::parse_command(scratch) {
            Err(e) => Err(protocol::error_reply(e.id, &e.message)),
            Ok(req) => {
                let id = req.id.map(Box::from);
                Ok(match req.command {
                    Command::Subscribe {
                        channel,
                        since,
                        presence_events,
                    } => Action::Subscribe {
                        channel: channel.into_owned(),
                        id,
                        since,
                        presence_events,
                    },
                    Command::History { channel, limit } => Action::History {
                        channel: channel.into_owned(),
                        limit,
                        id,
                    },
                    Command::Presence { channel } => Action::Presence {
                        channel: channel.into_owned(),
                        id,
                    },
                    Command::PresenceStats { channel } => Action::PresenceStats {
                        channel: channel.into_owned(),
                        id,
                    },
                    Command::Unsubscribe { channel } => Action::Unsubscribe {
                        channel: channel.into_owned(),
                        id,
                    },
                    Command::Refresh { token } => Action::Refresh {
                        token: token.into_owned(),
                        id,
                    },
                    Command::Publish { channel, payload } => {
                        let (frame, payload_at) =
                            encode_with(OpCode::Text, payload.len(), |buf| buf.put_slice(&payload));
                        Action::Publish {
                            channel: Some(Bytes::copy_from_slice(channel.as_bytes())),
                            frame,
                            payload_at,
                            reply: Some(id),
                        }
                    }
                })
            }
        };
        match action {
            Ok(action) => {
                ctx.actions.push(action);
                Ok(())
            }
            Err(reply) => self.reply(reply, ctx),
        }
    }

    /// A whole compressed message: inflated (at most `--max-message` bytes, or 1009) with the
    /// reactor's inflater, validated if it is text, then handled as if it had arrived plain.
    fn on_compressed(
        &mut self,
        text: bool,
        deflated: &[u8],
        ctx: &mut ParseContext,
    ) -> Result<(), Close> {
        let mut out = std::mem::take(ctx.inflated);
        out.clear();
        let result = ctx
            .inflater
            .inflate(deflated, &mut out, ctx.limits.max_message)
            .map_err(|e| Close::new(e.close_code(), e.to_string(), CloseReason::Protocol))
            .and_then(|()| {
                if text && std::str::from_utf8(&out).is_err() {
                    Err(Close::invalid_utf8())
                } else {
                    Ok(())
                }
            })
            .and_then(|()| self.on_message(text, &out, None, ctx));
        // Keep the buffer for the next message unless it grew large (a burst must not pin it).
        if out.capacity() <= 64 * 1024 {
            *ctx.inflated = out;
        }
        result
    }

    /// Validates the unmasked payload of a complete text frame, continuing from what the partial
    /// check already covered; `fin` ends the message.
    fn check_text(&mut self, payload: &[u8], fin: bool) -> Result<(), Close> {
        let checked = (self.text_check.checked as usize).min(payload.len());
        let mut utf8 = self.text_check.utf8;
        let result =
            utf8.feed(&payload[checked..])
                .and_then(|()| if fin { utf8.finish() } else { Ok(()) });
        self.text_check = TextCheck {
            utf8: if fin { Utf8Validator::new() } else { utf8 },
            checked: 0,
        };
        result.map_err(|_| Close::invalid_utf8())
    }

    /// Validates the newly arrived payload bytes of a text frame that is not complete yet.
    fn check_partial_text(
        &mut self,
        head: &FrameHeader,
        available: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<(), Close> {
        let text = match head.opcode {
            OpCode::Text => !head.rsv1,
            OpCode::Continuation => self
                .fragments
                .as_ref()
                .is_some_and(|f| f.text && !f.compressed),
            _ => false,
        };
        if !text {
            return Ok(());
        }
        if head.opcode == OpCode::Text && self.text_check.checked == 0 {
            // The first bytes of a new message.
            self.text_check.utf8 = Utf8Validator::new();
        }
        let checked = self.text_check.checked as usize;
        let available = &available[..available.len().min(head.payload_len as usize)];
        if available.len() <= checked {
            return Ok(());
        }
        scratch.clear();
        scratch.extend_from_slice(&available[checked..]);
        apply_mask(scratch, head.mask.unwrap_or([0; 4]), checked);
        let result = self.text_check.utf8.feed(scratch);
        self.text_check.checked = available.len() as u32;
        result.map_err(|_| Close::invalid_utf8())
    }

    fn reply(&mut self, frame: Bytes, ctx: &mut ParseContext) -> Result<(), Close> {
        ctx.metrics.messages_out.inc();
        self.send_or_close(frame, &ctx.limits)
    }
}

/// What a client's close frame asks for: echo its code, or close with 1002/1007 if it is bad.
fn on_close_frame(masked: &[u8], mask: [u8; 4]) -> Close {
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
