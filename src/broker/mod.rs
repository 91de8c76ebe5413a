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

use crate::protocol;
use crate::ws::{FrameHeader, OpCode};

/// Hands every local subscriber of `msg`'s channel the frame it should receive: the raw frame, or
/// the JSON envelope, which is built here once for all JSON subscribers. `queue` gets a reference;
/// cloning it is a reference-count increment. Returns how many subscribers were offered the message.
pub fn fanout(
    channels: &channels::Channels,
    msg: &Message,
    scratch: &mut Vec<u8>,
    mut queue: impl FnMut(usize, &Bytes),
) -> usize {
    let Some(channel) = channels.get(&msg.channel) else {
        return 0;
    };
    let envelope = (channel.json_subscribers > 0)
        .then(|| protocol::envelope(&channel.name, msg.payload(), scratch));
    for (_, sub) in channel.subscribers.iter() {
        match (&envelope, sub.json) {
            (Some(envelope), true) => queue(sub.conn, envelope),
            _ => queue(sub.conn, &msg.frame),
        }
    }
    channel.subscribers.len()
}

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
