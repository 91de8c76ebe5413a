//! permessage-deflate (RFC 7692): negotiation, compress-once for broadcast, bounded inflate.
//!
//! fanout frames a message once and queues the same bytes to every subscriber. Compression keeps
//! that property only if a compressed message does not depend on what the connection received
//! before, so the server always uses `server_no_context_takeover`: each message is compressed
//! from an empty dictionary by the reactor's one [`Compressor`], and the resulting frame is
//! shared by all subscribers that negotiated the extension. The server also always asks for
//! `client_no_context_takeover`, so nothing survives between a client's messages either: the
//! reactor's one [`Inflater`] is reset per message and no connection carries a 32 KiB window.
//!
//! Inflating is bounded: [`Inflater`] stops as soon as the output passes the message limit
//! (a few KiB of input can expand to gigabytes), having produced at most one byte more.
//!
//! The DEFLATE codec is flate2 with its pure-Rust miniz_oxide backend, whose window is always
//! 32 KiB (15 bits). A client asking `server_max_window_bits=N` (N < 15) is still honoured, by
//! cutting the message into pieces of 2^N bytes, each compressed with a dictionary emptied by a
//! full flush: no back-reference can then reach further than 2^N bytes.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::{CloseCode, FrameHeader, OpCode};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// The 4 bytes a sync flush ends with: stripped from every compressed message, appended back
/// before inflating (RFC 7692 7.2.1, 7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Largest LZ77 window, in bits, that DEFLATE (and miniz_oxide) uses.
pub const MAX_WINDOW_BITS: u8 = 15;
/// Smallest window RFC 7692 lets a peer ask for.
pub const MIN_WINDOW_BITS: u8 = 8;

// ------------------------------------------------------------------------------------------------
// Negotiation

/// One `permessage-deflate` offer of a client (RFC 7692 7.1), as parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offer {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    /// The largest window the client lets the server use, when it limits it.
    pub server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value (the client can take a limit); `Some(Some(n))`: the
    /// client also says it will not use more than n bits.
    pub client_max_window_bits: Option<Option<u8>>,
}

/// Why an offer was declined (RFC 7692 5: the server must decline, not fail the handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferError {
    /// The element is not `token *( ";" param )` with token or quoted-string values.
    Syntax(String),
    /// A parameter given twice.
    Duplicate(String),
    /// A value outside what the parameter allows.
    BadValue { param: String, value: String },
    /// A parameter RFC 7692 does not define for an offer.
    Unknown(String),
}

impl fmt::Display for OfferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OfferError::Syntax(why) => write!(f, "malformed {EXTENSION} offer: {why}"),
            OfferError::Duplicate(p) => write!(f, "{EXTENSION} parameter {p} given twice"),
            OfferError::BadValue { param, value } => {
                write!(
                    f,
                    "{EXTENSION} parameter {param} has invalid value {value:?}"
                )
            }
            OfferError::Unknown(p) => write!(f, "unknown {EXTENSION} parameter {p}"),
        }
    }
}

impl std::error::Error for OfferError {}

/// What the server agreed to; everything else is fixed (see the module comment): the server
/// never takes over context (`server_no_context_takeover`) and neither may the client
/// (`client_no_context_takeover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The window our compressed messages stay within: what the client asked for, or 15.
    /// Pass it to [`Compressor::compress_window`] / [`Compressor::frame`].
    pub server_max_window_bits: u8,
    /// The client asked for a server window, so the response must state it.
    pub server_window_requested: bool,
    /// The window the client said it will not exceed (15 when it did not say): informational,
    /// the inflater handles any window.
    pub client_max_window_bits: u8,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` response header value. `client_max_window_bits` is never
    /// sent: the server inflates any window, and the response may not carry it unless offered.
    /// `client_no_context_takeover` may be sent whether or not offered (RFC 7692 7.1.1.2).
    pub fn response(&self) -> String {
        let mut s = format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
        if self.server_window_requested {
            s.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        s
    }
}

/// Picks the first acceptable `permessage-deflate` offer in the request's
/// `Sec-WebSocket-Extensions` header values (one per header line, each possibly listing several
/// extensions) and returns what was agreed; `None` declines the extension. Other extensions are
/// ignored; an invalid offer is skipped.
pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>) -> Option<Agreed> {
    header_values
        .into_iter()
        .flat_map(parse_offers)
        .find_map(|offer| offer.ok().and_then(accept))
}

/// The server's answer to one valid offer. Every combination of the four parameters is
/// supported, so today this always accepts; it is the one place to decline a configuration.
fn accept(offer: Offer) -> Option<Agreed> {
    Some(Agreed {
        server_max_window_bits: offer.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
        server_window_requested: offer.server_max_window_bits.is_some(),
        client_max_window_bits: offer
            .client_max_window_bits
            .flatten()
            .unwrap_or(MAX_WINDOW_BITS),
    })
}

/// Every `permessage-deflate` element of one header value, in order, each parsed or with the
/// reason it is invalid. Other extensions and empty list elements are left out.
pub fn parse_offers(header_value: &str) -> Vec<Result<Offer, OfferError>> {
    let mut out = Vec::new();
    for element in split_outside_quotes(header_value, b',') {
        let mut parts = split_outside_quotes(element, b';').into_iter();
        let name = parts.next().unwrap_or("").trim();
        if name.is_empty() && element.trim().is_empty() {
            continue; // `a, , b`: empty elements are allowed by the #rule
        }
        if !name.eq_ignore_ascii_case(EXTENSION) {
            continue;
        }
        out.push(parse_params(parts));
    }
    out
}

fn parse_params<'a>(params: impl Iterator<Item = &'a str>) -> Result<Offer, OfferError> {
    let mut offer = Offer::default();
    let mut seen = [false; 4];
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (param.trim(), None),
        };
        if !is_token(name) {
            return Err(OfferError::Syntax(format!(
                "parameter name {name:?} is not a token"
            )));
        }
        let slot = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return Err(OfferError::Unknown(name.to_string())),
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err(OfferError::Duplicate(name.to_string()));
        }
        let bad = |value: &str| OfferError::BadValue {
            param: name.to_string(),
            value: value.to_string(),
        };
        match (slot, value.as_deref()) {
            (0, None) => offer.server_no_context_takeover = true,
            (1, None) => offer.client_no_context_takeover = true,
            (0 | 1, Some(v)) => return Err(bad(v)),
            (2, Some(v)) => offer.server_max_window_bits = Some(window_bits(v).ok_or(bad(v))?),
            // server_max_window_bits needs a value (RFC 7692 7.1.2.1).
            (2, None) => return Err(bad("")),
            (_, Some(v)) => {
                offer.client_max_window_bits = Some(Some(window_bits(v).ok_or(bad(v))?))
            }
            (_, None) => offer.client_max_window_bits = Some(None),
        }
    }
    Ok(offer)
}

/// 8 to 15, in decimal without leading zeros (RFC 7692 7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u8 = v.parse().ok()?;
    (MIN_WINDOW_BITS..=MAX_WINDOW_BITS)
        .contains(&n)
        .then_some(n)
}

/// A parameter value: a token, or a quoted-string whose content is a token (RFC 6455 9.1).
fn unquote(v: &str) -> Result<String, OfferError> {
    let value = if let Some(inner) = v.strip_prefix('"') {
        let Some(inner) = inner.strip_suffix('"') else {
            return Err(OfferError::Syntax(format!(
                "unterminated quoted value {v:?}"
            )));
        };
        let mut s = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(e) => s.push(e),
                    None => return Err(OfferError::Syntax(format!("dangling escape in {v:?}"))),
                },
                '"' => return Err(OfferError::Syntax(format!("stray quote in {v:?}"))),
                c => s.push(c),
            }
        }
        s
    } else {
        v.to_string()
    };
    if is_token(&value) {
        Ok(value)
    } else {
        Err(OfferError::Syntax(format!("value {v:?} is not a token")))
    }
}

/// RFC 7230 token: visible ASCII except separators.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// Splits on `sep` except inside quoted strings (where `\` escapes the next character).
fn split_outside_quotes(s: &str, sep: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in s.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

// ------------------------------------------------------------------------------------------------
// Compress once

/// Compresses whole messages, each independently of the others (no context takeover): one per
/// reactor, and one compressed frame per message shared by every subscriber.
pub struct Compressor {
    deflate: Compress,
    /// Kept to tell compressors apart in logs (Compress does not say its level).
    level: Compression,
}

/// The compression level used by [`Compressor::default`]: zlib's default. Chat-sized messages
/// compress in microseconds at this level, and the cost is paid once per message.
pub const DEFAULT_LEVEL: u32 = 6;

impl Default for Compressor {
    fn default() -> Compressor {
        Compressor::new(DEFAULT_LEVEL)
    }
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor")
            .field("level", &self.level.level())
            .finish_non_exhaustive()
    }
}

impl Compressor {
    /// `level` is DEFLATE's 0 (store) to 9 (smallest); above 9 counts as 9.
    pub fn new(level: u32) -> Compressor {
        let level = Compression::new(level.min(9));
        Compressor {
            deflate: Compress::new(level, false),
            level,
        }
    }

    /// Appends the compressed form of one whole message to `out`: raw DEFLATE, with the final
    /// `00 00 ff ff` removed (RFC 7692 7.2.1), referring to nothing outside this message, with
    /// the 15-bit window every client accepts when it did not limit it.
    pub fn compress(&mut self, payload: &[u8], out: &mut BytesMut) {
        self.compress_window(payload, MAX_WINDOW_BITS, out)
    }

    /// [`Compressor::compress`] for a client that limited the server's window to `window_bits`
    /// (clamped to 8..=15): no back-reference reaches further than 2^window_bits bytes.
    pub fn compress_window(&mut self, payload: &[u8], window_bits: u8, out: &mut BytesMut) {
        let start = out.len();
        if self.try_compress(payload, window_bits, out).is_err() {
            // Not expected from a raw stream in memory, but never send a broken message:
            // forget the stream and fall back to stored (uncompressed) DEFLATE blocks.
            log::warn!("permessage-deflate: compressor failed; sending stored blocks");
            self.deflate.reset();
            out.truncate(start);
            write_stored(payload, out);
        }
    }

    fn try_compress(
        &mut self,
        payload: &[u8],
        window_bits: u8,
        out: &mut BytesMut,
    ) -> Result<(), ()> {
        let bits = window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
        // miniz_oxide's own window is 2^15: only smaller windows need pieces.
        let piece = if bits >= MAX_WINDOW_BITS {
            payload.len().max(1)
        } else {
            1usize << bits
        };
        let start = out.len();
        // A full flush ends every piece (and the message): it byte-aligns the output with an
        // empty stored block (`00 00 ff ff`) and empties the dictionary, so the next piece or
        // message starts from nothing (no context takeover, and the window limit).
        if payload.is_empty() {
            self.deflate_all(&[], out)?;
        }
        for chunk in payload.chunks(piece) {
            self.deflate_all(chunk, out)?;
        }
        if out.len() < start + TAIL.len() || out[out.len() - TAIL.len()..] != TAIL {
            return Err(());
        }
        out.truncate(out.len() - TAIL.len());
        Ok(())
    }

    /// Feeds `input` and a full flush, growing `out` until the compressor has written it all.
    fn deflate_all(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), ()> {
        // Worst case for DEFLATE is stored blocks: 5 bytes per 16 KiB or so, plus the flush.
        let mut room = input.len() + input.len() / 8 + 64;
        // Every round either consumes input or writes output (checked), and the output of a
        // finite input is finite: the loop ends. The cap is a second guard.
        for _ in 0..64 + input.len() / 64 {
            let at = out.len();
            out.resize(at + room, 0);
            let (in0, out0) = (self.deflate.total_in(), self.deflate.total_out());
            let status = self
                .deflate
                .compress(input, &mut out[at..], FlushCompress::Full);
            let used = (self.deflate.total_in() - in0) as usize;
            let wrote = (self.deflate.total_out() - out0) as usize;
            out.truncate(at + wrote);
            input = &input[used.min(input.len())..];
            match status {
                Ok(Status::Ok | Status::BufError) => {}
                Ok(Status::StreamEnd) | Err(_) => return Err(()),
            }
            // Output room left over means the flush is complete.
            if input.is_empty() && wrote < room {
                return Ok(());
            }
            if used == 0 && wrote == 0 {
                room *= 2;
            }
        }
        Err(())
    }

    /// One complete server frame of a compressed message: FIN, RSV1, the text or binary opcode
    /// and the compressed payload, in a single buffer (share it with `clone`).
    pub fn frame(&mut self, payload: &[u8], text: bool, window_bits: u8) -> Bytes {
        // Leave room for the longest header, compress behind it, then write the real header
        // right before the payload and drop the unused front: no copy of the payload.
        const MAX_HEAD: usize = 10;
        let mut buf = BytesMut::with_capacity(MAX_HEAD + payload.len() / 2 + 64);
        buf.resize(MAX_HEAD, 0);
        self.compress_window(payload, window_bits, &mut buf);
        let len = buf.len() - MAX_HEAD;
        let opcode = if text { OpCode::Text } else { OpCode::Binary };
        let mut head = Head::default();
        FrameHeader::write(&mut head, opcode, len, None);
        head.bytes[0] |= 0x40; // RSV1: "this message is compressed"
        let skip = MAX_HEAD - head.len;
        buf[skip..MAX_HEAD].copy_from_slice(&head.bytes[..head.len]);
        buf.advance(skip);
        buf.freeze()
    }

    /// [`Compressor::frame`] when compressing makes the message smaller, else `None`: send the
    /// uncompressed frame (RSV1 clear), which RFC 7692 6 allows on a deflate connection and which
    /// is the one the subscribers without the extension get anyway.
    pub fn frame_if_smaller(
        &mut self,
        payload: &[u8],
        text: bool,
        window_bits: u8,
    ) -> Option<Bytes> {
        let frame = self.frame(payload, text, window_bits);
        let plain = FrameHeader::encoded_len(payload.len(), false) + payload.len();
        (frame.len() < plain).then_some(frame)
    }
}

/// A frame header being built on the stack (FrameHeader::write appends to any `Extend<u8>`).
#[derive(Default)]
struct Head {
    bytes: [u8; 14],
    len: usize,
}

impl Extend<u8> for Head {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        for b in iter {
            if let Some(slot) = self.bytes.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }
}

/// `payload` as stored DEFLATE blocks (no compression, no back-references) followed by the
/// header byte of an empty stored block, whose rest is the `00 00 ff ff` the receiver appends.
fn write_stored(payload: &[u8], out: &mut BytesMut) {
    for block in payload.chunks(0xFFFF) {
        let len = block.len() as u16;
        out.extend_from_slice(&[0x00]); // BFINAL 0, BTYPE 00, padded to the byte
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&[0x00]);
}

/// The compressed frames of one message, made on demand for each window some subscriber
/// negotiated (almost always only 15): still one compression per message and window, however
/// many subscribers share it.
#[derive(Debug, Default)]
pub struct FrameCache {
    frames: [Option<Bytes>; (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize],
}

impl FrameCache {
    /// The compressed frame of `payload` for a subscriber that agreed `agreed`.
    pub fn get(
        &mut self,
        compressor: &mut Compressor,
        payload: &[u8],
        text: bool,
        agreed: &Agreed,
    ) -> &Bytes {
        let bits = agreed
            .server_max_window_bits
            .clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
        let slot = &mut self.frames[(bits - MIN_WINDOW_BITS) as usize];
        slot.get_or_insert_with(|| compressor.frame(payload, text, bits))
    }
}

// ------------------------------------------------------------------------------------------------
// Bounded inflate

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InflateError {
    /// The message inflates to more than `max` bytes (checked while inflating: nothing past
    /// the limit is produced).
    TooBig { max: usize },
    /// The payload is not a valid DEFLATE stream.
    Corrupt(String),
}

impl InflateError {
    /// The close code the connection gets: 1009 over the limit, 1007 for a payload that is not
    /// what its RSV1 bit claims.
    pub fn close_code(&self) -> CloseCode {
        match self {
            InflateError::TooBig { .. } => CloseCode::TooBig,
            InflateError::Corrupt(_) => CloseCode::InvalidPayload,
        }
    }
}

impl fmt::Display for InflateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InflateError::TooBig { max } => {
                write!(f, "compressed message inflates to more than {max} bytes")
            }
            InflateError::Corrupt(why) => write!(f, "compressed message is corrupt: {why}"),
        }
    }
}

impl std::error::Error for InflateError {}

/// Most output produced per inflate step (then the limit is checked). Each step is also cut to
/// the room left under the limit plus one byte, so a message never overshoots by more than 1.
const INFLATE_STEP: usize = 16 * 1024;

/// Inflates client messages one at a time (one per reactor; reset per message, since the client
/// was told `client_no_context_takeover`).
pub struct Inflater {
    inflate: Decompress,
    /// Bytes produced for the current message.
    produced: usize,
    /// The stream had a final block (BFINAL): what follows in the message is ignored, as RFC
    /// 7692 7.2.3.5 shows a sender may put an empty stored block's header after it.
    ended: bool,
}

impl Default for Inflater {
    fn default() -> Inflater {
        Inflater::new()
    }
}

impl fmt::Debug for Inflater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inflater")
            .field("produced", &self.produced)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Inflater {
    pub fn new() -> Inflater {
        Inflater {
            inflate: Decompress::new(false),
            produced: 0,
            ended: false,
        }
    }

    /// Starts a new message.
    pub fn reset(&mut self) {
        self.inflate.reset(false);
        self.produced = 0;
        self.ended = false;
    }

    /// Inflates the next piece of the current message's payload (e.g. one fragment) onto `out`.
    /// Fails once the message's output passes `max` bytes, without inflating the rest.
    pub fn feed(
        &mut self,
        compressed: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), InflateError> {
        let mut input = compressed;
        while !self.ended {
            // Never more room than the limit allows plus one byte: the byte that proves excess.
            // Start near the size the input suggests (small messages stay small in memory).
            let guess = input.len().saturating_mul(3).saturating_add(256);
            let room = INFLATE_STEP
                .min(guess)
                .min(max.saturating_sub(self.produced).saturating_add(1));
            let at = out.len();
            out.resize(at + room, 0);
            let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
            let status = self
                .inflate
                .decompress(input, &mut out[at..], FlushDecompress::None);
            let used = (self.inflate.total_in() - in0) as usize;
            let wrote = (self.inflate.total_out() - out0) as usize;
            out.truncate(at + wrote);
            self.produced += wrote;
            input = &input[used.min(input.len())..];
            match status {
                Ok(Status::StreamEnd) => self.ended = true,
                Ok(Status::Ok | Status::BufError) => {}
                Err(e) => return Err(InflateError::Corrupt(e.to_string())),
            }
            if self.produced > max {
                return Err(InflateError::TooBig { max });
            }
            if self.ended {
                break;
            }
            // Room left over with all input taken: everything inflatable so far is out.
            if input.is_empty() && wrote < room {
                return Ok(());
            }
            // Room and input but no progress: the decoder is stuck on bad data. (Every other
            // round consumes input or produces output under the limit: the loop ends.)
            if used == 0 && wrote == 0 {
                return Err(InflateError::Corrupt("inflate made no progress".into()));
            }
        }
        Ok(())
    }

    /// Ends the current message: appends `00 00 ff ff` (RFC 7692 7.2.2) and inflates what it
    /// releases.
    pub fn finish(&mut self, out: &mut Vec<u8>, max: usize) -> Result<(), InflateError> {
        // After a final block (BFINAL) feed ignores it: the stream is already complete.
        self.feed(&TAIL, out, max)
    }

    /// A whole compressed message: reset, feed, finish.
    pub fn inflate(
        &mut self,
        compressed: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), InflateError> {
        self.reset();
        self.feed(compressed, out, max)?;
        self.finish(out, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn offer(header: &str) -> Option<String> {
        negotiate([header]).map(|a| a.response())
    }

    const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    /// The offers Autobahn|Testsuite 0.8.2 / 25.10.1 makes (autobahn 0.10.9's
    /// PerMessageDeflateOffer: accept_no_context_takeover and accept_max_window_bits are on by
    /// default), and the answer to each.
    #[test]
    fn autobahn_section_12_and_13_offers() {
        let base = "permessage-deflate; client_no_context_takeover; client_max_window_bits";
        let cases: Vec<(String, String)> = vec![
            // 12.* and 13.1: the default offer.
            (base.into(), BOTH.into()),
            // 13.2: (requestNoContextTakeover, requestMaxWindowBits) = (True, 0)
            (format!("{base}; server_no_context_takeover"), BOTH.into()),
            // 13.3: (False, 9)
            (
                format!("{base}; server_max_window_bits=9"),
                format!("{BOTH}; server_max_window_bits=9"),
            ),
            // 13.4: (False, 15)
            (
                format!("{base}; server_max_window_bits=15"),
                format!("{BOTH}; server_max_window_bits=15"),
            ),
            // 13.5: (True, 9)
            (
                format!("{base}; server_no_context_takeover; server_max_window_bits=9"),
                format!("{BOTH}; server_max_window_bits=9"),
            ),
            // 13.6: (True, 15)
            (
                format!("{base}; server_no_context_takeover; server_max_window_bits=15"),
                format!("{BOTH}; server_max_window_bits=15"),
            ),
            // 13.7: three offers, (True, 9), (True, 0), (False, 0): the first is taken.
            (
                format!(
                    "{base}; server_no_context_takeover; server_max_window_bits=9, \
                     {base}; server_no_context_takeover, {base}"
                ),
                format!("{BOTH}; server_max_window_bits=9"),
            ),
        ];
        for (header, response) in cases {
            assert_eq!(offer(&header), Some(response), "{header}");
        }
        let a = negotiate([format!("{base}; server_max_window_bits=9").as_str()]).unwrap();
        assert_eq!(
            a,
            Agreed {
                server_max_window_bits: 9,
                server_window_requested: true,
                client_max_window_bits: 15,
            }
        );
    }

    #[test]
    fn browser_offers() {
        // Chrome and Firefox send this one.
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits"),
            Some(BOTH.into())
        );
        assert_eq!(offer("permessage-deflate"), Some(BOTH.into()));
        let a = negotiate(["permessage-deflate; client_max_window_bits=10"]).unwrap();
        assert_eq!(a.client_max_window_bits, 10);
        assert_eq!(a.server_max_window_bits, 15);
        // client_max_window_bits is never in the response, offered or not.
        assert!(!a.response().contains("client_max_window_bits"));
    }

    #[test]
    fn invalid_offers_are_skipped_for_the_next_one() {
        for bad in [
            "permessage-deflate; server_max_window_bits", // needs a value
            "permessage-deflate; server_max_window_bits=7", // below 8
            "permessage-deflate; server_max_window_bits=16", // above 15
            "permessage-deflate; server_max_window_bits=09", // leading zero
            "permessage-deflate; server_max_window_bits=+9", //
            "permessage-deflate; server_max_window_bits=1e1", //
            "permessage-deflate; client_max_window_bits=0", //
            "permessage-deflate; client_max_window_bits=100", //
            "permessage-deflate; server_no_context_takeover=1", // no value allowed
            "permessage-deflate; client_no_context_takeover=x", //
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
            "permessage-deflate; x_unknown", // undefined parameter
            "permessage-deflate; mux=1",     //
            "permessage-deflate; =9",        // syntax
            "permessage-deflate; server_max_window_bits=\"1 0\"",
        ] {
            assert_eq!(offer(bad), None, "{bad}");
            assert_eq!(
                offer(&format!(
                    "{bad}, permessage-deflate; server_max_window_bits=10"
                )),
                Some(format!("{BOTH}; server_max_window_bits=10")),
                "{bad}"
            );
        }
        let parsed = parse_offers(
            "permessage-deflate; a, permessage-deflate; server_max_window_bits=99, \
             permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        );
        assert_eq!(
            parsed,
            vec![
                Err(OfferError::Unknown("a".into())),
                Err(OfferError::BadValue {
                    param: "server_max_window_bits".into(),
                    value: "99".into()
                }),
                Err(OfferError::Duplicate("client_no_context_takeover".into())),
            ]
        );
        assert!(parsed[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("unknown"));
        // An unterminated quote runs to the end of the header: nothing after it is an offer.
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=\"9, permessage-deflate"),
            None
        );
    }

    #[test]
    fn header_syntax() {
        // Quoted values (RFC 6455 9.1), spaces, case, other extensions, several header lines.
        assert_eq!(
            offer("permessage-deflate;server_max_window_bits=\"12\""),
            Some(format!("{BOTH}; server_max_window_bits=12"))
        );
        assert_eq!(
            offer("  Permessage-Deflate ;  Server_Max_Window_Bits = 8 ;client_max_window_bits"),
            Some(format!("{BOTH}; server_max_window_bits=8"))
        );
        assert_eq!(
            offer("x-webkit-deflate-frame, foo; bar=\"a,b;c\", permessage-deflate"),
            Some(BOTH.into())
        );
        assert_eq!(offer("x-webkit-deflate-frame"), None);
        assert_eq!(offer(""), None);
        assert_eq!(offer(" , ,"), None);
        assert_eq!(offer("permessage-deflate-x"), None);
        assert_eq!(
            negotiate([
                "foo",
                "permessage-deflate; x",
                "permessage-deflate; server_max_window_bits=11"
            ])
            .map(|a| a.server_max_window_bits),
            Some(11)
        );
        assert_eq!(negotiate(std::iter::empty::<&str>()), None);
        // Garbage never panics.
        for junk in [
            "\"",
            "\\",
            ";;;",
            "=,=",
            "permessage-deflate;\"",
            "permessage-deflate; a=\"\\",
        ] {
            let _ = parse_offers(junk);
        }
    }

    fn inflate_all(compressed: &[u8]) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::new();
        Inflater::new().inflate(compressed, &mut out, usize::MAX)?;
        Ok(out)
    }

    #[test]
    fn rfc7692_examples_inflate() {
        // 7.2.3.1: "Hello" in one compressed block.
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(inflate_all(&hello).unwrap(), b"Hello");
        // 7.2.3.2: "Hello" in a stored block (note the trailing header byte).
        let stored = [
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        assert_eq!(inflate_all(&stored).unwrap(), b"Hello");
        // 7.2.3.4: two DEFLATE blocks in one message.
        let two = [
            0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
        ];
        assert_eq!(inflate_all(&two).unwrap(), b"Hello");
        // 7.2.3.5: a block with BFINAL set, then an empty stored block's header.
        let fin = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        assert_eq!(inflate_all(&fin).unwrap(), b"Hello");
        // 7.2.3.6-like: the empty message.
        assert_eq!(inflate_all(&[0x00]).unwrap(), b"");
        // Fed in pieces, the same.
        let mut inf = Inflater::new();
        let mut out = Vec::new();
        inf.reset();
        for piece in two.chunks(3) {
            inf.feed(piece, &mut out, 100).unwrap();
        }
        inf.finish(&mut out, 100).unwrap();
        assert_eq!(out, b"Hello");
    }

    #[test]
    fn hello_compresses_to_the_rfc_bytes() {
        let mut c = Compressor::default();
        let mut out = BytesMut::new();
        c.compress(b"Hello", &mut out);
        assert_eq!(&out[..], &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
        // Again: no context is taken over, so the second message is identical (RFC 7692 7.2.3.3
        // shows the shorter form context takeover would give).
        let mut again = BytesMut::new();
        c.compress(b"Hello", &mut again);
        assert_eq!(out, again);
    }

    fn sample(len: usize) -> Vec<u8> {
        let words = [
            "fanout ",
            "chat ",
            "{\"user\":\"ana\",",
            "\"text\":\"hi\"} ",
            "é😀 ",
        ];
        let mut v = Vec::with_capacity(len + 16);
        let mut i = 0usize;
        while v.len() < len {
            v.extend_from_slice(words[i % words.len()].as_bytes());
            v.push((i * 31 % 251) as u8);
            i += 1;
        }
        v.truncate(len);
        v
    }

    #[test]
    fn round_trip_every_window_and_size() {
        let mut c = Compressor::default();
        let mut inf = Inflater::new();
        for len in [
            0usize, 1, 5, 255, 256, 257, 1000, 4096, 40_000, 70_000, 300_000,
        ] {
            let payload = sample(len);
            for bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS {
                let mut z = BytesMut::new();
                c.compress_window(&payload, bits, &mut z);
                assert!(!z.is_empty(), "even the empty message is one byte");
                let mut out = Vec::new();
                inf.inflate(&z, &mut out, len).unwrap();
                assert_eq!(out, payload, "len {len} bits {bits}");
            }
        }
    }

    /// The longest back-reference in a compressed message, found by a straightforward DEFLATE
    /// decoder written for the test (flate2 cannot tell, nor inflate with a window under 15
    /// bits). `usize::MAX` if a reference reaches before the message's first byte: that would be
    /// context taken over from an earlier message. Proves what compress_window promises.
    fn max_distance(stream: &[u8]) -> usize {
        struct Bits<'a> {
            data: &'a [u8],
            pos: usize,
        }
        impl Bits<'_> {
            fn bit(&mut self) -> usize {
                let b = (self.data[self.pos / 8] >> (self.pos % 8)) & 1;
                self.pos += 1;
                b as usize
            }
            fn bits(&mut self, n: usize) -> usize {
                (0..n).fold(0, |acc, i| acc | (self.bit() << i))
            }
        }
        fn table(lengths: &[usize]) -> Vec<(usize, usize, usize)> {
            // (length, code, symbol), canonical Huffman.
            let mut v = Vec::new();
            let mut code = 0;
            for len in 1..=15 {
                for (sym, &l) in lengths.iter().enumerate() {
                    if l == len {
                        v.push((len, code, sym));
                        code += 1;
                    }
                }
                code <<= 1;
            }
            v
        }
        fn decode(b: &mut Bits, t: &[(usize, usize, usize)]) -> usize {
            let (mut code, mut len) = (0, 0);
            loop {
                code = (code << 1) | b.bit();
                len += 1;
                if let Some(&(_, _, s)) = t.iter().find(|&&(l, c, _)| l == len && c == code) {
                    return s;
                }
            }
        }
        const LBASE: [usize; 29] = [
            3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
            115, 131, 163, 195, 227, 258,
        ];
        const LEXTRA: [usize; 29] = [
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
        ];
        const DBASE: [usize; 30] = [
            1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
            1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
        ];
        const DEXTRA: [usize; 30] = [
            0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
            12, 13, 13,
        ];
        let mut b = Bits {
            data: stream,
            pos: 0,
        };
        let mut far = 0;
        let mut produced = 0;
        while b.pos + 3 <= stream.len() * 8 {
            let _final = b.bit();
            let kind = b.bits(2);
            let (lit, dist) = match kind {
                0 => {
                    b.pos = b.pos.div_ceil(8) * 8;
                    if b.pos / 8 + 4 > stream.len() {
                        break; // the stripped 00 00 ff ff of the last (empty) block
                    }
                    let len = b.bits(16);
                    b.bits(16);
                    b.pos += len * 8;
                    produced += len;
                    continue;
                }
                1 => {
                    let mut l = vec![8; 144];
                    l.extend([9; 112]);
                    l.extend([7; 24]);
                    l.extend([8; 8]);
                    (table(&l), table(&[5; 30]))
                }
                2 => {
                    let hlit = b.bits(5) + 257;
                    let hdist = b.bits(5) + 1;
                    let hclen = b.bits(4) + 4;
                    const ORDER: [usize; 19] = [
                        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
                    ];
                    let mut cl = [0; 19];
                    for &o in ORDER.iter().take(hclen) {
                        cl[o] = b.bits(3);
                    }
                    let ct = table(&cl);
                    let mut lens = Vec::new();
                    while lens.len() < hlit + hdist {
                        match decode(&mut b, &ct) {
                            s @ 0..=15 => lens.push(s),
                            16 => {
                                let p = *lens.last().unwrap();
                                let n = 3 + b.bits(2);
                                lens.extend(std::iter::repeat_n(p, n));
                            }
                            17 => {
                                let n = 3 + b.bits(3);
                                lens.extend(std::iter::repeat_n(0, n));
                            }
                            _ => {
                                let n = 11 + b.bits(7);
                                lens.extend(std::iter::repeat_n(0, n));
                            }
                        }
                    }
                    (table(&lens[..hlit]), table(&lens[hlit..]))
                }
                _ => panic!("reserved block type"),
            };
            loop {
                let sym = decode(&mut b, &lit);
                if sym < 256 {
                    produced += 1;
                    continue;
                }
                if sym == 256 {
                    break;
                }
                let i = sym - 257;
                let len = LBASE[i] + b.bits(LEXTRA[i]);
                let d = decode(&mut b, &dist);
                let d = DBASE[d] + b.bits(DEXTRA[d]);
                if d > produced {
                    return usize::MAX;
                }
                far = far.max(d);
                produced += len;
            }
        }
        far
    }

    #[test]
    fn small_windows_are_honoured() {
        let mut c = Compressor::default();
        // Repetitive text far longer than any window: a 15-bit stream has long distances.
        let payload = sample(100_000);
        let mut z = BytesMut::new();
        c.compress(&payload, &mut z);
        let full = max_distance(&z);
        assert!(full > 512, "the test text has long-range matches ({full})");
        for bits in MIN_WINDOW_BITS..MAX_WINDOW_BITS {
            let mut z = BytesMut::new();
            c.compress_window(&payload, bits, &mut z);
            let far = max_distance(&z);
            assert!(far <= 1 << bits, "window {bits}: distance {far}");
        }
        // The decoder itself is right: no match in the RFC's "Hello", distance 3 in "abcabc...".
        assert_eq!(max_distance(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]), 0);
        let mut z = BytesMut::new();
        c.compress(b"abcabcabcabcabcabc", &mut z);
        assert_eq!(max_distance(&z), 3);
    }

    #[test]
    fn messages_do_not_refer_to_earlier_ones() {
        // With context takeover the second identical message would be a few bytes referring to
        // the first; here it must inflate on a fresh inflater and be as long as the first.
        let mut c = Compressor::default();
        let payload = sample(3000);
        let mut first = BytesMut::new();
        c.compress(&payload, &mut first);
        assert!(max_distance(&first) < usize::MAX);
        for bits in [15, 15, 9, 15, 8, 12] {
            let mut next = BytesMut::new();
            c.compress_window(&payload, bits, &mut next);
            assert_eq!(inflate_all(&next).unwrap(), payload);
            // Not necessarily the same bytes (miniz_oxide's block choices depend on its
            // history), but never a reference before the message's own first byte.
            let far = max_distance(&next);
            assert!(far <= 1 << bits, "window {bits}: {far}");
            assert!(next.len() > 100, "not a reference to the previous message");
        }
    }

    #[test]
    fn inflates_what_flate2_compresses_without_context_takeover() {
        // A client's way: one raw deflate stream per message, sync flush, tail stripped.
        for level in [0, 1, 6, 9] {
            let payload = sample(50_000);
            let mut z = Compress::new(Compression::new(level), false);
            let mut out = Vec::with_capacity(payload.len() + 1024);
            z.compress_vec(&payload, &mut out, FlushCompress::Sync)
                .unwrap();
            assert_eq!(z.total_in() as usize, payload.len());
            assert_eq!(&out[out.len() - 4..], &TAIL);
            out.truncate(out.len() - 4);
            let mut inf = Inflater::new();
            let mut got = Vec::new();
            // Fragmented on the wire: fed in pieces.
            inf.reset();
            for piece in out.chunks(777) {
                inf.feed(piece, &mut got, payload.len()).unwrap();
            }
            inf.finish(&mut got, payload.len()).unwrap();
            assert_eq!(got, payload, "level {level}");
        }
    }

    #[test]
    fn zip_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 10 << 20];
        let mut c = Compressor::new(9);
        let mut bomb = BytesMut::new();
        c.compress(&zeros, &mut bomb);
        assert!(
            bomb.len() < 20 << 10,
            "10 MiB of zeros is {} bytes",
            bomb.len()
        );
        let max = 1 << 20;
        let mut inf = Inflater::new();
        let mut out = Vec::new();
        assert_eq!(
            inf.inflate(&bomb, &mut out, max),
            Err(InflateError::TooBig { max })
        );
        assert!(out.len() <= max + 1, "produced {}", out.len());
        // (Vec doubles its capacity: the memory is bounded by twice the limit.)
        assert!(
            out.capacity() <= 2 * (max + 1),
            "grew to {}",
            out.capacity()
        );
        assert_eq!(InflateError::TooBig { max }.close_code().code(), 1009);
        // Fed in pieces the limit holds across feeds, and the exact limit passes.
        inf.reset();
        let mut out = Vec::new();
        let mut verdict = Ok(());
        for piece in bomb.chunks(100) {
            verdict = inf.feed(piece, &mut out, max);
            if verdict.is_err() {
                break;
            }
        }
        assert_eq!(verdict, Err(InflateError::TooBig { max }));
        assert!(out.len() <= max + 1);
        let mut out = Vec::new();
        inf.inflate(&bomb, &mut out, zeros.len()).unwrap();
        assert_eq!(out.len(), zeros.len());
        let mut out = Vec::new();
        assert!(inf.inflate(&bomb, &mut out, zeros.len() - 1).is_err());
    }

    #[test]
    fn corrupt_input_is_its_own_error() {
        let mut inf = Inflater::new();
        // BTYPE 11 is reserved.
        for bad in [
            &[0xffu8, 0xff, 0xff][..],
            &[0x07],
            &[0x00, 0x05, 0x00, 0x00, 0x00, b'x'],
        ] {
            let mut out = Vec::new();
            match inf.inflate(bad, &mut out, 1000) {
                Err(e @ InflateError::Corrupt(_)) => {
                    assert_eq!(e.close_code().code(), 1007);
                    assert!(e.to_string().contains("corrupt"));
                }
                other => panic!("{bad:02x?}: {other:?}"),
            }
        }
        // The inflater is usable again after an error.
        let mut out = Vec::new();
        inf.inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], &mut out, 10)
            .unwrap();
        assert_eq!(out, b"Hello");
    }

    #[test]
    fn frames_carry_rsv1_and_parse_back() {
        let mut c = Compressor::default();
        for (len, text) in [(0usize, true), (5, true), (2000, false), (300_000, true)] {
            let payload = sample(len);
            let frame = c.frame(&payload, text, MAX_WINDOW_BITS);
            let h = FrameHeader::parse_ext(&frame, false, u64::MAX >> 1, true)
                .unwrap()
                .unwrap();
            assert!(h.fin && h.rsv1 && h.mask.is_none());
            assert_eq!(h.opcode, if text { OpCode::Text } else { OpCode::Binary });
            assert_eq!(h.header_len + h.payload_len as usize, frame.len());
            assert_eq!(inflate_all(&frame[h.header_len..]).unwrap(), payload);
            // Without the extension the same frame is refused.
            assert!(FrameHeader::parse(&frame, false, u64::MAX >> 1).is_err());
        }
        // Compressing "hi" does not pay; 2000 bytes of chat text does.
        assert_eq!(c.frame_if_smaller(b"hi", true, 15), None);
        assert!(c.frame_if_smaller(&sample(2000), true, 15).is_some());
    }

    #[test]
    fn frame_cache_compresses_once_per_window() {
        let mut c = Compressor::default();
        let mut cache = FrameCache::default();
        let payload = sample(5000);
        let a15 = negotiate(["permessage-deflate"]).unwrap();
        let a9 = negotiate(["permessage-deflate; server_max_window_bits=9"]).unwrap();
        let f1 = cache.get(&mut c, &payload, true, &a15).clone();
        let f2 = cache.get(&mut c, &payload, true, &a15).clone();
        assert_eq!(
            f1.as_ptr(),
            f2.as_ptr(),
            "the same buffer, not a second compression"
        );
        let f3 = cache.get(&mut c, &payload, true, &a9).clone();
        assert_ne!(f1.as_ptr(), f3.as_ptr());
        for f in [f1, f3] {
            let h = FrameHeader::parse_ext(&f, false, u64::MAX >> 1, true)
                .unwrap()
                .unwrap();
            assert_eq!(inflate_all(&f[h.header_len..]).unwrap(), payload);
        }
    }

    #[test]
    fn stored_fallback_is_valid_deflate() {
        for len in [0usize, 1, 65535, 65536, 140_000] {
            let payload = sample(len);
            let mut out = BytesMut::new();
            write_stored(&payload, &mut out);
            assert_eq!(inflate_all(&out).unwrap(), payload, "len {len}");
            assert!(max_distance(&out) == 0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn any_payload_round_trips(
            payload in prop::collection::vec(any::<u8>(), 0..3000),
            bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS,
            level in 0u32..=9,
            piece in 1usize..500,
        ) {
            let mut c = Compressor::new(level);
            let mut z = BytesMut::new();
            c.compress_window(&payload, bits, &mut z);
            let mut inf = Inflater::new();
            let mut out = Vec::new();
            inf.reset();
            for p in z.chunks(piece) {
                inf.feed(p, &mut out, payload.len()).unwrap();
            }
            inf.finish(&mut out, payload.len()).unwrap();
            prop_assert_eq!(out, payload);
        }

        #[test]
        fn consecutive_messages_stay_within_themselves(
            messages in prop::collection::vec(
                (prop::collection::vec(0u8..4, 0..3000), MIN_WINDOW_BITS..=MAX_WINDOW_BITS),
                1..6,
            ),
        ) {
            // Small alphabet: many matches, and every message resembles the one before it.
            let mut c = Compressor::default();
            for (payload, bits) in messages {
                let mut z = BytesMut::new();
                c.compress_window(&payload, bits, &mut z);
                let far = max_distance(&z);
                prop_assert!(far <= 1usize << bits, "window {}: distance {}", bits, far);
                prop_assert_eq!(inflate_all(&z).unwrap(), payload);
            }
        }

        #[test]
        fn garbage_never_panics_and_respects_the_limit(
            data in prop::collection::vec(any::<u8>(), 0..2000),
            max in 0usize..5000,
        ) {
            let mut inf = Inflater::new();
            let mut out = Vec::new();
            let _ = inf.inflate(&data, &mut out, max);
            prop_assert!(out.len() <= max + 1);
        }

        #[test]
        fn header_parsing_never_panics(s in "[ -~]{0,80}") {
            let _ = negotiate([s.as_str()]);
        }
    }
}
