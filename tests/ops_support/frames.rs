//! The test side's own WebSocket framing, written from RFC 6455 and independent of the server's
//! codec in src/ws (so a bug there cannot cancel out in a round trip): the one masked client
//! frame encoder every test uses, and the one parser of unmasked server frames.

/// A server-to-client WebSocket frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// RSV1: the message is compressed (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

pub const CONTINUATION: u8 = 0;
pub const TEXT: u8 = 1;
pub const BINARY: u8 = 2;
pub const CLOSE: u8 = 8;
pub const PING: u8 = 9;
pub const PONG: u8 = 10;
/// The FIN bit of a frame's first byte.
pub const FIN: u8 = 0x80;

impl Frame {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// Code and reason of a close frame.
    pub fn close_code(&self) -> Option<(u16, String)> {
        if self.opcode != CLOSE || self.payload.len() < 2 {
            return None;
        }
        Some((
            u16::from_be_bytes([self.payload[0], self.payload[1]]),
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        ))
    }
}

/// The mask every test frame uses unless a test picks its own.
pub const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

/// Encodes a final, masked client frame.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    client_frame_with(FIN | opcode, payload, MASK)
}

/// A masked client frame whose first byte (FIN, RSV bits, opcode) is given whole, so tests can
/// build fragments and protocol violations with the usual mask.
pub fn raw_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    client_frame_with(b0, payload, MASK)
}

/// A client frame with full control of the first byte (FIN, RSV bits, opcode) and the mask.
pub fn client_frame_with(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = client_frame_header(b0, payload.len() as u64, mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Only the header of a masked client frame (first byte, MASK bit + the shortest length form,
/// mask key) for a payload of `len` bytes: lets a test announce lengths it never sends.
pub fn client_frame_header(b0: u8, len: u64, mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![b0];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out
}

/// Parses one unmasked server frame from the front of `buf`: (frame, bytes used), or None.
pub fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let rsv1 = buf[0] & 0x40 != 0;
    let opcode = buf[0] & 0x0f;
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    if buf.len() < at + len {
        return None;
    }
    Some((
        Frame {
            fin,
            rsv1,
            opcode,
            payload: buf[at..at + len].to_vec(),
        },
        at + len,
    ))
}
