//! The client side of the wire: the upgrade request, the 101 check, masked frames out, server
//! frames in, and the load payload that carries its send time.
//!
//! Only what a load generator needs: no fragmentation on send, no UTF-8 validation on receive
//! (the server under test is the one being checked). Header parsing reuses the server's codec,
//! [`fanout::ws::FrameHeader`], with masking not required.

use fanout::ws::frame::{apply_mask, FrameHeader, OpCode};

/// A fixed key is fine for load: the server must answer it correctly, which [`check_response`]
/// verifies, and generating random keys would only cost time.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Server frames larger than this are treated as a protocol failure rather than buffered.
const MAX_FRAME: u64 = 16 << 20;

/// Bytes of payload prefix: the send time in nanoseconds (20 digits), a space, the publisher's
/// global index (10 digits), a space. ASCII, so the message is valid text in every mode.
pub const PAYLOAD_PREFIX: usize = 32;

pub fn upgrade_request(host: &str, path: &str, channel: &str) -> Vec<u8> {
    format!(
        "GET {path}?channel={channel} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Outcome of looking at the bytes received so far during the handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The response head is not complete yet.
    Incomplete,
    /// 101 with the right accept key; the head took this many bytes (frames may follow).
    Upgraded(usize),
    /// Anything else, with a short description for the error table.
    Refused(String),
}

pub fn check_response(buf: &[u8]) -> Handshake {
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
    Handshake::Upgraded(end + 4)
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

/// Builds a load payload of `size` bytes (at least [`PAYLOAD_PREFIX`]).
pub fn load_payload(out: &mut Vec<u8>, sent_ns: u64, publisher: u64, size: usize) {
    use std::io::Write;
    out.clear();
    let _ = write!(out, "{sent_ns:020} {publisher:010} ");
    out.resize(size.max(PAYLOAD_PREFIX), b'.');
}

/// Reads the send time and publisher back from a payload; `None` for a foreign message.
pub fn parse_payload(payload: &[u8]) -> Option<(u64, u64)> {
    if payload.len() < PAYLOAD_PREFIX || payload[20] != b' ' || payload[31] != b' ' {
        return None;
    }
    let sent = std::str::from_utf8(&payload[..20]).ok()?.parse().ok()?;
    let publisher = std::str::from_utf8(&payload[21..31]).ok()?.parse().ok()?;
    Some((sent, publisher))
}

/// One complete server frame found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: &'a [u8],
    /// Header plus payload: how far to advance.
    pub len: usize,
}

/// `Ok(None)`: the frame is not complete yet.
pub fn next_frame(buf: &[u8]) -> Result<Option<Frame<'_>>, String> {
    let header = match FrameHeader::parse(buf, false, MAX_FRAME) {
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
        opcode: header.opcode,
        payload: &buf[header.header_len..len],
        len,
    }))
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

    #[test]
    fn payload_round_trips_at_every_size() {
        let mut buf = Vec::new();
        for size in [0, 32, 64, 4096] {
            load_payload(&mut buf, 1_764_000_000_123_456_789, 42, size);
            assert_eq!(buf.len(), size.max(PAYLOAD_PREFIX));
            assert!(std::str::from_utf8(&buf).is_ok());
            assert_eq!(parse_payload(&buf), Some((1_764_000_000_123_456_789, 42)));
        }
        assert_eq!(parse_payload(b"hello"), None);
        assert_eq!(parse_payload(&[b'x'; 40]), None);
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
            let first = next_frame(&stream[..cut]).unwrap();
            if cut < 304 {
                assert_eq!(first, None, "cut {cut}");
            }
        }
        let f = next_frame(&stream).unwrap().unwrap();
        assert_eq!((f.opcode, f.payload.len(), f.len), (OpCode::Text, 300, 304));
        let g = next_frame(&stream[f.len..]).unwrap().unwrap();
        assert_eq!((g.opcode, g.payload), (OpCode::Ping, &b"p"[..]));
    }

    #[test]
    fn masked_server_frame_is_an_error() {
        let mut out = Vec::new();
        write_masked(&mut out, OpCode::Text, b"x", 1);
        assert!(next_frame(&out).is_err());
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
        assert_eq!(check_response(&with_frame), Handshake::Upgraded(head_len));
        assert_eq!(check_response(&ok.as_bytes()[..20]), Handshake::Incomplete);
        assert_eq!(
            check_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
            Handshake::Refused("http 503".into())
        );
        let wrong = "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n\r\n";
        assert!(matches!(
            check_response(wrong.as_bytes()),
            Handshake::Refused(_)
        ));
    }

    #[test]
    fn close_codes() {
        assert_eq!(close_code(&[0x03, 0xF0, b'x']), 1008);
        assert_eq!(close_code(&[]), 1005);
    }
}
