//! The client side of the wire: the upgrade request, the 101 check (with the permessage-deflate
//! answer), masked frames out, server frames in, inflating compressed messages, and the load
//! payloads that carry their send time.
//!
//! Only what a load generator needs: no fragmentation or compression on send, no UTF-8
//! validation on receive (the server under test is the one being checked). Header parsing reuses
//! the server's codec, [`fanout::ws::FrameHeader`], with masking not required, and inflating
//! reuses the server's bounded [`Inflater`].

use clap::ValueEnum;
use fanout::ws::deflate::{Inflater, EXTENSION};
use fanout::ws::frame::{apply_mask, FrameHeader, OpCode};
use serde::{Deserialize, Serialize};

/// A fixed key is fine for load: the server must answer it correctly, which [`check_response`]
/// verifies, and generating random keys would only cost time.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Server frames larger than this are treated as a protocol failure rather than buffered.
const MAX_FRAME: u64 = 16 << 20;
/// A compressed message inflating past this is a failure too (same bound as a plain one).
const MAX_INFLATED: usize = MAX_FRAME as usize;

/// Bytes of the filler payload's prefix: the send time in nanoseconds (20 digits), a space, the
/// publisher's global index (10 digits), a space. ASCII, so the message is valid text in every
/// mode.
pub const PAYLOAD_PREFIX: usize = 32;

/// What a load message looks like. Both carry the send time and the publisher at fixed offsets
/// at the start, so reading them back costs no parsing of the rest.
#[derive(ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PayloadKind {
    /// The stamps, then dots: the cheapest to build, but it compresses to almost nothing.
    #[default]
    Filler,
    /// `{"ts":"…","pub":"…","user":"user-P","room":"room-R","text":"natural words…"}`: a chat
    /// message whose text compresses about as well as real chat text does.
    ChatJson,
}

/// The smallest `--size` a payload kind can be built at.
pub fn min_payload_size(kind: PayloadKind) -> usize {
    match kind {
        PayloadKind::Filler => PAYLOAD_PREFIX,
        // The stamps and the fixed fields with the longest user and room numbers take 118.
        PayloadKind::ChatJson => 128,
    }
}

/// The permessage-deflate offer. `server_no_context_takeover` is what lets one [`Inflater`]
/// serve every connection of a worker (reset per message): a server that kept its LZ77 window
/// between messages would need a 32 KiB window per connection on our side too. Publishers send
/// plain frames, so nothing is offered about the client's own compression.
pub const DEFLATE_OFFER: &str = "permessage-deflate; server_no_context_takeover";

/// The upgrade request for `channel`; `token` (already URL-safe, see `--token`) is appended to
/// the query as `&token=`.
pub fn upgrade_request(
    host: &str,
    path: &str,
    channel: &str,
    token: Option<&str>,
    compression: bool,
) -> Vec<u8> {
    let token = token.map(|t| format!("&token={t}")).unwrap_or_default();
    let extensions = if compression {
        format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")
    } else {
        String::new()
    };
    format!(
        "GET {path}?channel={channel}{token} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
         {extensions}\r\n"
    )
    .into_bytes()
}

/// Outcome of looking at the bytes received so far during the handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The response head is not complete yet.
    Incomplete,
    /// 101 with the right accept key; the head took `head` bytes (frames may follow), and
    /// `deflate` says whether permessage-deflate was agreed.
    Upgraded { head: usize, deflate: bool },
    /// Anything else, with a short description for the error table.
    Refused(String),
}

/// `offered_deflate`: the request offered [`DEFLATE_OFFER`], so the response may accept it.
pub fn check_response(buf: &[u8], offered_deflate: bool) -> Handshake {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 16 * 1024 {
            return Handshake::Refused("response head over 16 KiB".into());
        }
        return Handshake::Incomplete;
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let status_line = head.lines().next().unwrap_or("");
    let status = status_line.split_whitespace().nth(1).unwrap_or("?");
    if status != "101" {
        return Handshake::Refused(format!("http {status}"));
    }
    let accept_ok = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == ACCEPT
        })
    });
    if !accept_ok {
        return Handshake::Refused("101 without the right Sec-WebSocket-Accept".into());
    }
    let extensions: Vec<&str> = (head.lines())
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, value)| value.trim())
        .collect();
    match check_extensions(&extensions, offered_deflate) {
        Ok(deflate) => Handshake::Upgraded {
            head: end + 4,
            deflate,
        },
        Err(why) => Handshake::Refused(why),
    }
}

/// Checks the `Sec-WebSocket-Extensions` values of a 101 against what we offered: nothing, or
/// permessage-deflate with `server_no_context_takeover` (RFC 7692 7.1). Returns whether the
/// extension is in use. No answer is fine (the server declined); a wrong answer is refused,
/// since inflating against a server that keeps context would fail in confusing ways later.
pub fn check_extensions(values: &[&str], offered_deflate: bool) -> Result<bool, String> {
    let elements: Vec<&str> = (values.iter())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if elements.is_empty() {
        return Ok(false);
    }
    let refuse = |why: &str| Err(format!("bad Sec-WebSocket-Extensions answer: {why}"));
    if !offered_deflate {
        return refuse("an extension that was not offered");
    }
    if elements.len() > 1 {
        return refuse("more than the one extension offered");
    }
    let mut params = elements[0].split(';').map(str::trim);
    if !params
        .next()
        .is_some_and(|n| n.eq_ignore_ascii_case(EXTENSION))
    {
        return refuse("an extension that was not offered");
    }
    let mut seen: Vec<String> = Vec::new();
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return refuse(&format!("{name} given twice"));
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            // The server may limit its own window unasked (RFC 7692 7.1.2.1); any window
            // inflates.
            ("server_max_window_bits", Some(v))
                if v.parse::<u8>().is_ok_and(|b| (8..=15).contains(&b)) => {}
            // Not offered, so the server must not send it (RFC 7692 7.1.2.2).
            _ => return refuse(&format!("parameter {param:?}")),
        }
        seen.push(name);
    }
    if !seen.iter().any(|p| p == "server_no_context_takeover") {
        return refuse("server_no_context_takeover missing (it was asked for)");
    }
    Ok(true)
}

/// Inflates one whole compressed message into `out` (cleared first). The inflater is reset
/// per message, which the `server_no_context_takeover` we insist on allows, so one per worker
/// serves every connection.
pub fn inflate_message(
    inflater: &mut Inflater,
    compressed: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), String> {
    out.clear();
    (inflater.inflate(compressed, out, MAX_INFLATED)).map_err(|e| format!("inflate: {e}"))
}

/// Appends one masked client frame. The mask only has to be unpredictable to intermediaries
/// that do not exist here, so a cheap counter-derived mask is used.
pub fn write_masked(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], mask_seed: u32) {
    let mask = mask_seed.wrapping_mul(0x9E37_79B9).to_be_bytes();
    FrameHeader::write(out, opcode, payload.len(), Some(mask));
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}

/// Builds a load payload of exactly `size` bytes (at least [`min_payload_size`]).
pub fn load_payload(
    out: &mut Vec<u8>,
    kind: PayloadKind,
    sent_ns: u64,
    publisher: u64,
    room: usize,
    size: usize,
) {
    use std::io::Write;
    out.clear();
    match kind {
        PayloadKind::Filler => {
            let _ = write!(out, "{sent_ns:020} {publisher:010} ");
            out.resize(size.max(PAYLOAD_PREFIX), b'.');
        }
        PayloadKind::ChatJson => {
            // Fixed-width quoted stamps (JSON numbers may not have leading zeros) at fixed
            // offsets, so parse_payload reads them without a JSON parser.
            let _ = write!(
                out,
                r#"{{"ts":"{sent_ns:020}","pub":"{publisher:010}","user":"user-{publisher}","room":"room-{room}","text":""#
            );
            let size = size.max(min_payload_size(kind));
            let text_end = size - 2;
            let mut rng = sent_ns ^ publisher.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
            while out.len() < text_end {
                // xorshift64: varied text per message; no word list lookup beats this for cost.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let word = WORDS[(rng % WORDS.len() as u64) as usize];
                out.extend_from_slice(word.as_bytes());
                out.push(if rng >> 60 == 0 { b'.' } else { b' ' });
            }
            // The last word is cut to land on the exact size.
            out.truncate(text_end);
            out.extend_from_slice(br#""}"#);
        }
    }
}

/// Words for chat-json text: common English, JSON-safe (no quotes or backslashes).
const WORDS: [&str; 64] = [
    "the", "be", "to", "of", "and", "a", "in", "that", "have", "it", "for", "not", "on", "with",
    "he", "as", "you", "do", "at", "this", "but", "his", "by", "from", "they", "we", "say", "her",
    "she", "or", "an", "will", "my", "one", "all", "would", "there", "their", "what", "so", "up",
    "out", "if", "about", "who", "get", "which", "go", "me", "when", "make", "can", "like", "time",
    "no", "just", "him", "know", "take", "people", "into", "year", "your", "good",
];

/// The chat-json payload's start up to the publisher digits: `{"ts":"` (7 bytes), 20 digits,
/// `","pub":"` (9 bytes), 10 digits, then `"`.
const CHAT_TS: usize = 7;
const CHAT_PUB: usize = 36;

/// Reads the send time and publisher back from a payload of either kind; `None` for a foreign
/// message.
pub fn parse_payload(payload: &[u8]) -> Option<(u64, u64)> {
    let digits = |at: usize, n: usize| -> Option<u64> {
        let s = payload.get(at..at + n)?;
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    if payload.starts_with(br#"{"ts":""#) {
        if payload.get(CHAT_TS + 20..CHAT_PUB)? != br#"","pub":""# {
            return None;
        }
        if payload.get(CHAT_PUB + 10) != Some(&b'"') {
            return None;
        }
        return Some((digits(CHAT_TS, 20)?, digits(CHAT_PUB, 10)?));
    }
    if payload.len() < PAYLOAD_PREFIX || payload[20] != b' ' || payload[31] != b' ' {
        return None;
    }
    Some((digits(0, 20)?, digits(21, 10)?))
}

/// One complete server frame found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    /// permessage-deflate: the message this frame starts is compressed.
    pub rsv1: bool,
    pub opcode: OpCode,
    pub payload: &'a [u8],
    /// Header plus payload: how far to advance.
    pub len: usize,
}

/// `Ok(None)`: the frame is not complete yet. `deflate`: permessage-deflate was agreed, so
/// RSV1 is allowed on a message's first frame.
pub fn next_frame(buf: &[u8], deflate: bool) -> Result<Option<Frame<'_>>, String> {
    let header = match FrameHeader::parse_ext(buf, false, MAX_FRAME, deflate) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(e) => return Err(format!("bad server frame: {e}")),
    };
    if header.mask.is_some() {
        return Err("bad server frame: masked".into());
    }
    let len = header.header_len + header.payload_len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Frame {
        fin: header.fin,
        rsv1: header.rsv1,
        opcode: header.opcode,
        payload: &buf[header.header_len..len],
        len,
    }))
}

/// Per-connection state of the data message being received (a few words: the load tool holds
/// tens of thousands of these).
#[derive(Debug, Default)]
pub struct Assembly {
    /// The message's first frame had RSV1 set.
    compressed: bool,
    /// A plain message's stamps, read from its first frame.
    stamps: Option<(u64, u64)>,
    /// A plain message's bytes so far.
    len: usize,
    /// A compressed message split over several frames, gathered until the last one; empty
    /// (no allocation) otherwise, because a single-frame message is inflated straight from the
    /// read buffer.
    fragments: Vec<u8>,
}

/// One whole data message, as the receiver saw it.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    /// Send time and publisher, `None` for a message this tool did not build.
    pub stamps: Option<(u64, u64)>,
    /// Payload bytes after inflating.
    pub len: usize,
    /// It arrived compressed (RSV1).
    pub compressed: bool,
}

/// What every connection of a worker shares for receiving: one inflater, reset per message,
/// and one buffer for the inflated message (rather than a 32 KiB window and a buffer per
/// connection, which would make the tool's memory grow with -n).
#[derive(Debug, Default)]
pub struct Receiver {
    inflater: Inflater,
    inflated: Vec<u8>,
}

impl Receiver {
    /// Takes the next data frame (text, binary or continuation) of a connection; returns the
    /// message once its last frame is in.
    pub fn data_frame(
        &mut self,
        assembly: &mut Assembly,
        frame: &Frame<'_>,
    ) -> Result<Option<Message>, String> {
        let first = frame.opcode != OpCode::Continuation;
        if first {
            assembly.compressed = frame.rsv1;
            assembly.len = 0;
            assembly.fragments = Vec::new();
            assembly.stamps = if frame.rsv1 {
                None
            } else {
                parse_payload(frame.payload)
            };
        }
        if !assembly.compressed {
            assembly.len += frame.payload.len();
            if !frame.fin {
                return Ok(None);
            }
            return Ok(Some(Message {
                stamps: assembly.stamps.take(),
                len: std::mem::take(&mut assembly.len),
                compressed: false,
            }));
        }
        if first && frame.fin {
            inflate_message(&mut self.inflater, frame.payload, &mut self.inflated)?;
        } else {
            if assembly.fragments.len() + frame.payload.len() > MAX_FRAME as usize {
                return Err("compressed message over 16 MiB".into());
            }
            assembly.fragments.extend_from_slice(frame.payload);
            if !frame.fin {
                return Ok(None);
            }
            let fragments = std::mem::take(&mut assembly.fragments);
            inflate_message(&mut self.inflater, &fragments, &mut self.inflated)?;
        }
        assembly.compressed = false;
        // Stamps come from the inflated bytes: the compressed ones mean nothing.
        Ok(Some(Message {
            stamps: parse_payload(&self.inflated),
            len: self.inflated.len(),
            compressed: true,
        }))
    }
}

/// The close code of a close frame's payload (1005 when it carries none).
pub fn close_code(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use fanout::ws::deflate::Compressor;

    const SENT: u64 = 1_764_000_000_123_456_789;

    #[test]
    fn payload_round_trips_at_every_size() {
        let mut buf = Vec::new();
        for size in [0, 32, 64, 4096] {
            load_payload(&mut buf, PayloadKind::Filler, SENT, 42, 0, size);
            assert_eq!(buf.len(), size.max(PAYLOAD_PREFIX));
            assert!(std::str::from_utf8(&buf).is_ok());
            assert_eq!(parse_payload(&buf), Some((SENT, 42)));
        }
        assert_eq!(parse_payload(b"hello"), None);
        assert_eq!(parse_payload(&[b'x'; 40]), None);
        assert_eq!(parse_payload(br#"{"ts":"12"}"#), None);
    }

    #[test]
    fn chat_json_is_json_of_the_exact_size_with_the_stamps() {
        let mut buf = Vec::new();
        let big = u64::from(u32::MAX);
        for (publisher, room, size) in [(0, 0, 128), (42, 3, 1024), (big, usize::MAX, 128)] {
            load_payload(&mut buf, PayloadKind::ChatJson, SENT, publisher, room, size);
            assert_eq!(buf.len(), size);
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(v["user"], format!("user-{publisher}"));
            assert_eq!(v["room"], format!("room-{room}"));
            assert!(v["text"].as_str().unwrap().contains(' '));
            assert_eq!(parse_payload(&buf), Some((SENT, publisher)));
        }
        // Natural words, not noise: DEFLATE should at least halve a 1 KiB message.
        load_payload(&mut buf, PayloadKind::ChatJson, SENT, 7, 1, 1024);
        let frame = Compressor::default().frame(&buf, true, 15);
        assert!(frame.len() < 512, "compressed to {} bytes", frame.len());
    }

    /// A frame the server's compressor builds goes through the same receive path as in the
    /// worker: parsed with RSV1 allowed, inflated by the shared inflater, stamps read from the
    /// inflated payload. Whole, fragmented, and interleaved with other connections' messages.
    #[test]
    fn compressed_frames_inflate_and_yield_the_stamps() {
        let mut payload = Vec::new();
        load_payload(&mut payload, PayloadKind::ChatJson, SENT, 9, 0, 1024);
        let mut compressor = Compressor::default();
        let wire = compressor.frame(&payload, true, 15);
        let mut receiver = Receiver::default();
        let (mut a, mut b) = (Assembly::default(), Assembly::default());

        // Without the extension agreed, RSV1 is a protocol error.
        assert!(next_frame(&wire, false).is_err());
        let frame = next_frame(&wire, true).unwrap().unwrap();
        assert!(frame.rsv1 && frame.fin && frame.len == wire.len());
        let got = receiver.data_frame(&mut a, &frame).unwrap().unwrap();
        assert_eq!(
            got,
            Message {
                stamps: Some((SENT, 9)),
                len: 1024,
                compressed: true
            }
        );

        // The same message in two frames on connection a, with a whole compressed message of
        // connection b in between: the inflater is shared, so it must not carry a's state.
        let compressed = &wire[2 + usize::from(wire[1] & 0x7F == 126) * 2..];
        let (head, tail) = compressed.split_at(compressed.len() / 2);
        let mut first = Vec::new();
        FrameHeader::write(&mut first, OpCode::Text, head.len(), None);
        first[0] = (first[0] & !0x80) | 0x40; // not FIN, RSV1
        first.extend_from_slice(head);
        let last = fanout::ws::frame::encode(OpCode::Continuation, tail);
        let f = next_frame(&first, true).unwrap().unwrap();
        assert!(f.rsv1 && !f.fin);
        assert_eq!(receiver.data_frame(&mut a, &f).unwrap(), None);
        let mut other = Vec::new();
        load_payload(&mut other, PayloadKind::ChatJson, SENT + 1, 5, 0, 300);
        let other_wire = compressor.frame(&other, true, 15);
        let g = next_frame(&other_wire, true).unwrap().unwrap();
        let got_b = receiver.data_frame(&mut b, &g).unwrap().unwrap();
        assert_eq!((got_b.stamps, got_b.len), (Some((SENT + 1, 5)), 300));
        let h = next_frame(&last, true).unwrap().unwrap();
        let got = receiver.data_frame(&mut a, &h).unwrap().unwrap();
        assert_eq!(
            (got.stamps, got.len, got.compressed),
            (Some((SENT, 9)), 1024, true)
        );

        // A plain message on the same connection afterwards is read as plain.
        let plain = fanout::ws::frame::encode(OpCode::Text, &payload);
        let p = next_frame(&plain, true).unwrap().unwrap();
        let got = receiver.data_frame(&mut a, &p).unwrap().unwrap();
        assert_eq!(
            (got.stamps, got.len, got.compressed),
            (Some((SENT, 9)), 1024, false)
        );

        // Not DEFLATE (block type 11 is reserved) with RSV1: an error, not a foreign message.
        let bad = [0xC1, 0x03, 0xFF, 0xFF, 0xFF]; // FIN, RSV1, text
        let bad = next_frame(&bad, true).unwrap().unwrap();
        assert!(receiver.data_frame(&mut a, &bad).is_err());
    }

    #[test]
    fn plain_fragmented_message_keeps_the_first_frames_stamps() {
        let mut payload = Vec::new();
        load_payload(&mut payload, PayloadKind::Filler, SENT, 3, 0, 100);
        let mut first = Vec::new();
        FrameHeader::write(&mut first, OpCode::Text, 60, None);
        first[0] &= !0x80;
        first.extend_from_slice(&payload[..60]);
        let last = fanout::ws::frame::encode(OpCode::Continuation, &payload[60..]);
        let (mut receiver, mut a) = (Receiver::default(), Assembly::default());
        let f = next_frame(&first, false).unwrap().unwrap();
        assert_eq!(receiver.data_frame(&mut a, &f).unwrap(), None);
        let l = next_frame(&last, false).unwrap().unwrap();
        let got = receiver.data_frame(&mut a, &l).unwrap().unwrap();
        assert_eq!(
            (got.stamps, got.len, got.compressed),
            (Some((SENT, 3)), 100, false)
        );
    }

    #[test]
    fn deflate_answers_are_checked() {
        let ours = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        assert_eq!(check_extensions(&[ours], true), Ok(true));
        assert_eq!(check_extensions(&[], true), Ok(false));
        assert_eq!(check_extensions(&[], false), Ok(false));
        assert_eq!(
            check_extensions(
                &["permessage-deflate;server_no_context_takeover;server_max_window_bits=\"10\""],
                true
            ),
            Ok(true)
        );
        for bad in [
            "permessage-deflate",
            "permessage-deflate; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=15",
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover, x-webkit-deflate-frame",
            "x-webkit-deflate-frame",
        ] {
            assert!(check_extensions(&[bad], true).is_err(), "{bad}");
        }
        assert!(check_extensions(&[ours], false).is_err());
    }

    #[test]
    fn masked_frame_parses_back_with_the_server_codec() {
        let mut out = Vec::new();
        write_masked(&mut out, OpCode::Text, b"hello world", 7);
        let h = FrameHeader::parse(&out, true, 1 << 20).unwrap().unwrap();
        assert_eq!(h.opcode, OpCode::Text);
        assert!(h.fin);
        let mut payload = out[h.header_len..].to_vec();
        apply_mask(&mut payload, h.mask.unwrap(), 0);
        assert_eq!(payload, b"hello world");
    }

    #[test]
    fn server_frames_split_anywhere() {
        let mut stream = fanout::ws::frame::encode(OpCode::Text, &[b'a'; 300]).to_vec();
        stream.extend(fanout::ws::frame::encode(OpCode::Ping, b"p"));
        for cut in 0..stream.len() {
            let first = next_frame(&stream[..cut], false).unwrap();
            if cut < 304 {
                assert_eq!(first, None, "cut {cut}");
            }
        }
        let f = next_frame(&stream, false).unwrap().unwrap();
        assert_eq!((f.opcode, f.payload.len(), f.len), (OpCode::Text, 300, 304));
        let g = next_frame(&stream[f.len..], false).unwrap().unwrap();
        assert_eq!((g.opcode, g.payload), (OpCode::Ping, &b"p"[..]));
    }

    #[test]
    fn masked_server_frame_is_an_error() {
        let mut out = Vec::new();
        write_masked(&mut out, OpCode::Text, b"x", 1);
        assert!(next_frame(&out, false).is_err());
    }

    #[test]
    fn handshake_response_checks() {
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        );
        let head_len = ok.len();
        let mut with_frame = ok.clone().into_bytes();
        with_frame.extend_from_slice(&[0x81, 0x00]);
        let upgraded = |deflate| Handshake::Upgraded {
            head: head_len,
            deflate,
        };
        assert_eq!(check_response(&with_frame, false), upgraded(false));
        // Offered and declined: a plain connection.
        assert_eq!(check_response(&with_frame, true), upgraded(false));
        assert_eq!(
            check_response(&ok.as_bytes()[..20], false),
            Handshake::Incomplete
        );
        assert_eq!(
            check_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", false),
            Handshake::Refused("http 503".into())
        );
        let wrong = "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n\r\n";
        assert!(matches!(
            check_response(wrong.as_bytes(), false),
            Handshake::Refused(_)
        ));
        let agreed = format!(
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\
             sec-websocket-extensions: permessage-deflate; server_no_context_takeover; \
             client_no_context_takeover\r\n\r\n"
        );
        let deflated = Handshake::Upgraded {
            head: agreed.len(),
            deflate: true,
        };
        assert_eq!(check_response(agreed.as_bytes(), true), deflated);
        assert!(matches!(
            check_response(agreed.as_bytes(), false),
            Handshake::Refused(_)
        ));
        let request = String::from_utf8(upgrade_request("h", "/ws", "c", None, true)).unwrap();
        assert!(request.contains(&format!(
            "\r\nSec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n"
        )));
        assert!(request.ends_with("\r\n\r\n"));
        let plain = String::from_utf8(upgrade_request("h", "/ws", "c", None, false)).unwrap();
        assert!(!plain.contains("Extensions") && plain.ends_with("13\r\n\r\n"));
        assert!(plain.starts_with("GET /ws?channel=c HTTP/1.1\r\n"));
        let signed = String::from_utf8(upgrade_request("h", "/ws", "c", Some("a.b-c_d"), false));
        assert!(signed
            .unwrap()
            .starts_with("GET /ws?channel=c&token=a.b-c_d HTTP/1.1\r\n"));
    }

    #[test]
    fn close_codes() {
        assert_eq!(close_code(&[0x03, 0xF0, b'x']), 1008);
        assert_eq!(close_code(&[]), 1005);
    }
}
