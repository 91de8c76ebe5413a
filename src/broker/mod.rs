//! Who gets a message: the per-reactor channel table ([`channels`]), the queues between reactors
//! of one node ([`bus`]), and the Redis link that joins nodes ([`redis`]).
//!
//! A [`Message`] is framed once, when it enters a reactor, into the exact bytes a raw-mode
//! subscriber receives; every local subscriber gets a clone of that one `Bytes` (a reference-count
//! increment), never a copy.

pub mod bus;
pub mod channels;
pub mod redis;

use bytes::{BufMut, Bytes, BytesMut};

use crate::ws::{FrameHeader, OpCode};

/// One published message, ready to queue to raw-mode subscribers.
#[derive(Debug, Clone)]
pub struct Message {
    pub channel: Bytes,
    /// The complete server-to-client WebSocket frame (text or binary).
    pub frame: Bytes,
    payload_at: usize,
}

impl Message {
    /// Frames `payload` once. `text` picks the opcode.
    pub fn new(channel: Bytes, payload: &[u8], text: bool) -> Message {
        let (frame, payload_at) =
            Message::frame_with(payload.len(), text, |buf| buf.put_slice(payload));
        Message {
            channel,
            frame,
            payload_at,
        }
    }

    /// Frames a payload of `len` bytes that `fill` appends (used to unmask straight into the frame).
    pub fn frame_with(len: usize, text: bool, fill: impl FnOnce(&mut BytesMut)) -> (Bytes, usize) {
        let opcode = if text { OpCode::Text } else { OpCode::Binary };
        let header = FrameHeader::encoded_len(len, false);
        let mut buf = BytesMut::with_capacity(header + len);
        FrameHeader::write(&mut buf, opcode, len, None);
        fill(&mut buf);
        debug_assert_eq!(buf.len(), header + len);
        (buf.freeze(), header)
    }

    /// Wraps a frame built by [`Message::frame_with`].
    pub fn from_frame(channel: Bytes, frame: Bytes, payload_at: usize) -> Message {
        Message {
            channel,
            frame,
            payload_at,
        }
    }

    pub fn payload(&self) -> &[u8] {
        &self.frame[self.payload_at..]
    }

    /// The payload as its own `Bytes` (shares the frame's buffer).
    pub fn payload_bytes(&self) -> Bytes {
        self.frame.slice(self.payload_at..)
    }

    pub fn is_text(&self) -> bool {
        self.frame[0] & 0x0F == OpCode::Text.bits()
    }
}
