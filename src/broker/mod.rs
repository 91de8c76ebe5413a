//! Who gets a message: the per-reactor channel table ([`channels`]), the queues between reactors
//! of one node ([`bus`]), and what joins nodes: one Redis ([`redis`], over plain TCP or TLS:
//! [`tls`]) or a Redis Cluster ([`cluster`], [`slots`]), behind one interface ([`upstream`]),
//! with the publisher's identity carried along ([`origin`]) and the nodes' own messages on it
//! ([`control`]).
//!
//! A [`Message`] is framed once, when it enters a reactor, into the exact bytes a raw-mode
//! subscriber receives; every local subscriber gets a clone of that one `Bytes` (a reference-count
//! increment), never a copy.

pub mod bus;
pub mod channels;
pub mod cluster;
pub mod control;
pub mod history;
pub mod origin;
pub mod presence;
pub mod redis;
pub mod scripts;
pub mod slots;
pub mod streams;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use bytes::{BufMut, Bytes};

use crate::auth::Identity;

use crate::protocol;
use crate::ws::deflate::{Compressor, FrameCache};
use crate::ws::{frame, OpCode};

/// permessage-deflate on the send side: the reactor's compressor and the size under which
/// messages go out plain.
pub struct Compression<'a> {
    pub compressor: &'a mut Compressor,
    pub min_bytes: usize,
}

/// Hands every local subscriber of `msg`'s channel the frame it should receive: the raw frame or
/// the JSON envelope, plain or compressed. Each variant is built at most once per message, when
/// the first subscriber that needs it comes up, and shared by all the others: `queue` gets a
/// reference, and cloning it is a reference-count increment. Returns how many subscribers were
/// offered the message.
pub fn fanout(
    channels: &channels::Channels,
    msg: &Message,
    scratch: &mut Vec<u8>,
    mut compression: Option<Compression>,
    mut queue: impl FnMut(usize, &Bytes),
) -> usize {
    let Some(channel) = channels.get(&msg.channel) else {
        return 0;
    };
    if msg.event {
        // A join or leave: one JSON frame, only for the subscribers that asked for them.
        let mut offered = 0;
        for (_, sub) in channel.subscribers.iter() {
            if sub.json && sub.presence_events && !sub.waiting {
                queue(sub.conn, &msg.frame);
                offered += 1;
            }
        }
        return offered;
    }
    let envelope = (channel.json_subscribers > 0).then(|| {
        protocol::envelope_from(
            &channel.name,
            msg.payload(),
            msg.author(),
            msg.offset,
            scratch,
        )
    });
    let text = msg
        .frame
        .first()
        .is_some_and(|b| b & 0x0F == OpCode::Text.bits());
    let (mut raw_deflated, mut json_deflated) = (FrameCache::default(), FrameCache::default());
    for (_, sub) in channel.subscribers.iter() {
        if sub.waiting {
            continue;
        }
        let (plain, payload, text, cache) = match (&envelope, sub.json) {
            (Some(envelope), true) => (envelope, &scratch[..], true, &mut json_deflated),
            _ => (&msg.frame, msg.payload(), text, &mut raw_deflated),
        };
        match (&mut compression, &sub.deflate) {
            (Some(c), Some(agreed)) if payload.len() >= c.min_bytes => {
                queue(sub.conn, cache.get(c.compressor, payload, text, agreed))
            }
            _ => queue(sub.conn, plain),
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
    /// Who published it, when an authenticated client did (JSON deliveries name them).
    pub from: Option<Arc<Identity>>,
    /// Its place in the channel's history (channels with history; 0: none).
    pub offset: u64,
    /// A presence event (join, leave): `frame` is the whole JSON event, delivered only to JSON
    /// subscribers that asked for events (see `reactor::presence`).
    pub event: bool,
}

impl Message {
    /// Frames `payload` once. `text` picks the opcode.
    pub fn new(channel: Bytes, payload: &[u8], text: bool) -> Message {
        let (frame, payload_at) = frame::encode_with(data_opcode(text), payload.len(), |buf| {
            buf.put_slice(payload)
        });
        Message {
            channel,
            frame,
            payload_at,
            from: None,
            offset: 0,
            event: false,
        }
    }

    /// Who published it, as deliveries name them.
    pub fn author(&self) -> Option<protocol::Author<'_>> {
        self.from.as_deref().map(|i| protocol::Author {
            user: &i.user,
            info: i.info.as_deref().map(|raw| raw.get()),
        })
    }

    /// The same message, published by `from`.
    pub fn with_from(mut self, from: Option<Arc<Identity>>) -> Message {
        self.from = from;
        self
    }

    /// Wraps a frame built by [`frame::encode_with`] whose payload starts at `payload_at`.
    pub fn from_frame(channel: Bytes, frame: Bytes, payload_at: usize) -> Message {
        Message {
            channel,
            frame,
            payload_at,
            from: None,
            offset: 0,
            event: false,
        }
    }

    pub fn payload(&self) -> &[u8] {
        &self.frame[self.payload_at..]
    }

    /// The payload as its own `Bytes` (shares the frame's buffer).
    pub fn payload_bytes(&self) -> Bytes {
        self.frame.slice(self.payload_at..)
    }
}

/// The opcode of a data frame: text or binary.
pub fn data_opcode(text: bool) -> OpCode {
    if text {
        OpCode::Text
    } else {
        OpCode::Binary
    }
}
