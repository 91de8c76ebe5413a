//! Frame header parsing and encoding, and payload unmasking.
//!
//! The parser is written for this server's needs rather than taken from tungstenite: it checks
//! every rule a server must enforce (RSV bits, masking, control-frame limits, the message size
//! limit) before a single payload byte is buffered, and never allocates.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    pub fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A parsed frame header; the payload follows it in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1: the message this frame starts is compressed (permessage-deflate, RFC 7692). Only
    /// [`FrameHeader::parse_ext`] with `allow_rsv1` can return it set.
    pub rsv1: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header itself takes (2 to 14).
    pub header_len: usize,
}

/// A frame that breaks the protocol, and the close code it earns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    ReservedBits,
    ReservedOpcode(u8),
    Unmasked,
    FragmentedControl,
    ControlTooLong(u64),
    LengthHighBit,
    TooBig {
        len: u64,
        max: u64,
    },
    /// RSV1 on a control or continuation frame: only a message's first frame says "compressed".
    Rsv1NotFirst(OpCode),
}

impl FrameError {
    pub fn close_code(self) -> super::CloseCode {
        match self {
            FrameError::TooBig { .. } => super::CloseCode::TooBig,
            _ => super::CloseCode::Protocol,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::ReservedBits => write!(f, "reserved bits set without an extension"),
            FrameError::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            FrameError::Unmasked => write!(f, "client frame is not masked"),
            FrameError::FragmentedControl => write!(f, "fragmented control frame"),
            FrameError::ControlTooLong(n) => write!(f, "control frame payload {n} > 125 bytes"),
            FrameError::LengthHighBit => write!(f, "64-bit length with the high bit set"),
            FrameError::TooBig { len, max } => write!(f, "message of {len} bytes > limit {max}"),
            FrameError::Rsv1NotFirst(op) => {
                write!(f, "RSV1 (compressed) set on a {op:?} frame; only a message's first frame may set it")
            }
        }
    }
}

impl std::error::Error for FrameError {}

impl FrameHeader {
    /// Parses a header from the start of `buf`. `Ok(None)`: not enough bytes yet (nothing consumed).
    /// `require_mask` is true for client-to-server frames; data frames longer than `max_payload`
    /// are refused before their payload arrives.
    pub fn parse(
        buf: &[u8],
        require_mask: bool,
        max_payload: u64,
    ) -> Result<Option<FrameHeader>, FrameError> {
        FrameHeader::parse_ext(buf, require_mask, max_payload, false)
    }

    /// [`FrameHeader::parse`], and with `allow_rsv1` (permessage-deflate was negotiated) RSV1 is
    /// accepted on the first frame of a data message (text or binary) and returned in `rsv1`.
    /// RSV2 and RSV3 are always refused, and so is RSV1 on control and continuation frames (RFC
    /// 7692 6.1).
    pub fn parse_ext(
        buf: &[u8],
        require_mask: bool,
        max_payload: u64,
        allow_rsv1: bool,
    ) -> Result<Option<FrameHeader>, FrameError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let rsv1 = b0 & 0x40 != 0;
        if b0 & 0x30 != 0 || (rsv1 && !allow_rsv1) {
            return Err(FrameError::ReservedBits);
        }
        let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::ReservedOpcode(b0 & 0x0F))?;
        if rsv1 && (opcode.is_control() || opcode == OpCode::Continuation) {
            return Err(FrameError::Rsv1NotFirst(opcode));
        }
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        if require_mask && !masked {
            return Err(FrameError::Unmasked);
        }
        if opcode.is_control() && !fin {
            return Err(FrameError::FragmentedControl);
        }
        let (payload_len, mut at) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(FrameError::LengthHighBit);
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        if opcode.is_control() && payload_len > 125 {
            return Err(FrameError::ControlTooLong(payload_len));
        }
        if payload_len > max_payload {
            return Err(FrameError::TooBig {
                len: payload_len,
                max: max_payload,
            });
        }
        let mask = if masked {
            if buf.len() < at + 4 {
                return Ok(None);
            }
            let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
            at += 4;
            Some(m)
        } else {
            None
        };
        Ok(Some(FrameHeader {
            fin,
            rsv1,
            opcode,
            mask,
            payload_len,
            header_len: at,
        }))
    }

    /// Bytes an unmasked header for a payload of `len` bytes takes.
    pub fn encoded_len(len: usize, masked: bool) -> usize {
        let base = match len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        base + if masked { 4 } else { 0 }
    }

    /// Appends a header for a final frame of `opcode` carrying `len` bytes; `mask` is for clients.
    pub fn write(out: &mut impl Extend<u8>, opcode: OpCode, len: usize, mask: Option<[u8; 4]>) {
        let mut head = [0u8; 14];
        head[0] = 0x80 | opcode.bits();
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        let mut n = match len {
            0..=125 => {
                head[1] = mask_bit | len as u8;
                2
            }
            126..=0xFFFF => {
                head[1] = mask_bit | 126;
                head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                4
            }
            _ => {
                head[1] = mask_bit | 127;
                head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
                10
            }
        };
        if let Some(m) = mask {
            head[n..n + 4].copy_from_slice(&m);
            n += 4;
        }
        out.extend(head[..n].iter().copied());
    }
}

/// XORs `data` with the mask, where `data` starts `offset` bytes into the frame's payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = [0u8; 4];
    for (i, b) in m.iter_mut().enumerate() {
        *b = mask[(offset + i) % 4];
    }
    let word = u32::from_ne_bytes(m);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i];
    }
}

/// The one builder of server frames: a final unmasked frame of `opcode` whose `len`-byte payload
/// `fill` appends (so a payload can be unmasked or serialised straight into place, with no
/// intermediate copy). Returns the frame and the offset of its payload.
pub fn encode_with(opcode: OpCode, len: usize, fill: impl FnOnce(&mut BytesMut)) -> (Bytes, usize) {
    let header = FrameHeader::encoded_len(len, false);
    let mut buf = BytesMut::with_capacity(header + len);
    FrameHeader::write(&mut buf, opcode, len, None);
    fill(&mut buf);
    debug_assert_eq!(
        buf.len(),
        header + len,
        "fill appended the wrong number of bytes"
    );
    (buf.freeze(), header)
}

/// A complete unmasked server frame carrying `payload` (control frames, replies, tests).
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    encode_with(opcode, payload.len(), |buf| buf.put_slice(payload)).0
}

/// A close frame's payload: the code and a reason, truncated to fit the 125-byte control limit.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut reason = reason;
    while reason.len() > 123 {
        let mut end = 123;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason = &reason[..end];
    }
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: OpCode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        FrameHeader::write(&mut out, opcode, payload.len(), Some(mask));
        let at = out.len();
        out.extend_from_slice(payload);
        apply_mask(&mut out[at..], mask, 0);
        out
    }

    #[test]
    fn parses_every_length_form() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 200_000] {
            let payload = vec![b'x'; len];
            let bytes = masked(OpCode::Binary, &payload, [1, 2, 3, 4]);
            let h = FrameHeader::parse(&bytes, true, u64::MAX >> 1)
                .unwrap()
                .unwrap();
            assert_eq!(h.payload_len, len as u64);
            assert_eq!(h.header_len + len, bytes.len());
            let mut body = bytes[h.header_len..].to_vec();
            apply_mask(&mut body, h.mask.unwrap(), 0);
            assert_eq!(body, payload);
            // Every strict prefix of the header is "need more", never an error.
            for cut in 0..h.header_len {
                assert_eq!(
                    FrameHeader::parse(&bytes[..cut], true, u64::MAX >> 1),
                    Ok(None)
                );
            }
        }
    }

    #[test]
    fn rejects_what_a_server_must() {
        let ok = masked(OpCode::Text, b"hi", [9, 9, 9, 9]);
        let mut rsv = ok.clone();
        rsv[0] |= 0x40;
        assert_eq!(
            FrameHeader::parse(&rsv, true, 100),
            Err(FrameError::ReservedBits)
        );
        let mut op = ok.clone();
        op[0] = 0x83;
        assert_eq!(
            FrameHeader::parse(&op, true, 100),
            Err(FrameError::ReservedOpcode(3))
        );
        let unmasked = encode(OpCode::Text, b"hi");
        assert_eq!(
            FrameHeader::parse(&unmasked, true, 100),
            Err(FrameError::Unmasked)
        );
        let mut frag_ping = masked(OpCode::Ping, b"", [0; 4]);
        frag_ping[0] &= 0x7F;
        assert_eq!(
            FrameHeader::parse(&frag_ping, true, 100),
            Err(FrameError::FragmentedControl)
        );
        let long_ping = masked(OpCode::Ping, &[0; 126], [0; 4]);
        assert_eq!(
            FrameHeader::parse(&long_ping, true, 1000),
            Err(FrameError::ControlTooLong(126))
        );
        let huge = [0x82u8, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            FrameHeader::parse(&huge, true, 100),
            Err(FrameError::LengthHighBit)
        );
        let big = masked(OpCode::Binary, &[0; 101], [0; 4]);
        assert_eq!(
            FrameHeader::parse(&big, true, 100),
            Err(FrameError::TooBig { len: 101, max: 100 })
        );
    }

    #[test]
    fn rsv1_only_on_the_first_frame_of_a_data_message_when_negotiated() {
        let mut text = masked(OpCode::Text, b"hi", [1, 2, 3, 4]);
        text[0] |= 0x40;
        assert_eq!(
            FrameHeader::parse(&text, true, 100),
            Err(FrameError::ReservedBits)
        );
        assert_eq!(
            FrameHeader::parse_ext(&text, true, 100, false),
            Err(FrameError::ReservedBits)
        );
        let h = FrameHeader::parse_ext(&text, true, 100, true)
            .unwrap()
            .unwrap();
        assert!(h.rsv1 && h.fin);
        assert_eq!(
            (h.opcode, h.payload_len, h.header_len),
            (OpCode::Text, 2, 6)
        );
        // A first fragment may be compressed; it is the whole message that is.
        let mut first = masked(OpCode::Binary, b"x", [0; 4]);
        first[0] = 0x40 | OpCode::Binary.bits();
        let h = FrameHeader::parse_ext(&first, true, 100, true)
            .unwrap()
            .unwrap();
        assert!(h.rsv1 && !h.fin);
        // Without RSV1 nothing changes, with or without the extension.
        let plain = masked(OpCode::Text, b"hi", [1, 2, 3, 4]);
        let a = FrameHeader::parse(&plain, true, 100).unwrap().unwrap();
        let b = FrameHeader::parse_ext(&plain, true, 100, true)
            .unwrap()
            .unwrap();
        assert_eq!(a, b);
        assert!(!a.rsv1);
        // RSV1 on continuation and control frames, RSV2, RSV3: refused even when negotiated.
        for op in [
            OpCode::Continuation,
            OpCode::Ping,
            OpCode::Pong,
            OpCode::Close,
        ] {
            let mut f = masked(op, b"", [0; 4]);
            f[0] |= 0x40;
            assert_eq!(
                FrameHeader::parse_ext(&f, true, 100, true),
                Err(FrameError::Rsv1NotFirst(op)),
                "{op:?}"
            );
        }
        for bits in [0x20u8, 0x10, 0x60, 0x70] {
            let mut f = masked(OpCode::Text, b"hi", [0; 4]);
            f[0] |= bits;
            assert_eq!(
                FrameHeader::parse_ext(&f, true, 100, true),
                Err(FrameError::ReservedBits),
                "{bits:#x}"
            );
        }
        // A partial header is still "need more", never an error.
        assert_eq!(
            FrameHeader::parse_ext(&text[..1], true, 100, true),
            Ok(None)
        );
    }

    #[test]
    fn mask_is_an_involution_at_any_offset() {
        let data: Vec<u8> = (0..=255).collect();
        for offset in 0..8 {
            let mut d = data.clone();
            apply_mask(&mut d, [0xA1, 0xB2, 0xC3, 0xD4], offset);
            assert_ne!(d, data);
            apply_mask(&mut d, [0xA1, 0xB2, 0xC3, 0xD4], offset);
            assert_eq!(d, data);
        }
        // Unmasking in two pieces equals unmasking at once.
        let mut whole = data.clone();
        apply_mask(&mut whole, [1, 2, 3, 4], 0);
        let mut split = data.clone();
        let (a, b) = split.split_at_mut(7);
        apply_mask(a, [1, 2, 3, 4], 0);
        apply_mask(b, [1, 2, 3, 4], 7);
        assert_eq!(whole, split);
    }

    #[test]
    fn close_reason_is_truncated_on_a_char_boundary() {
        let p = close_payload(1000, &"é".repeat(100));
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }
}
