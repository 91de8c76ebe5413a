//! The Redis reactor's commands in flight: what each [`Upstream::call`] was for, so its reply
//! (which names only a tag) reaches the code that sent it.
//!
//! Bounded by the links themselves: every command sent is answered, or failed when its link
//! goes down, and each answer takes its entry out.
//!
//! [`Upstream::call`]: crate::broker::upstream::Upstream::call

use std::collections::HashMap;

use bytes::Bytes;
use redis_protocol::resp3::types::BytesFrame;

use super::Reactor;
use crate::broker::bus::ReadFor;
use crate::broker::history::Range;
use crate::broker::presence::Ask;
use crate::broker::redis::Ack;

/// What one command in flight was for.
#[derive(Debug)]
pub(super) enum Call {
    /// The append script of a publish on a channel with history.
    Append { ack: Option<Ack> },
    /// The read script, for a client.
    Read { to: Box<ReadFor>, range: Range },
    // Presence (reactor::presence):
    /// A join or leave script.
    PresenceChange { channel: Bytes, join: bool },
    /// A channel's refresh.
    PresenceRefresh { channel: Bytes },
    /// The node's members of a channel, written again.
    PresenceSync { channel: Bytes },
    /// The read script of a `presence` or `presence_stats` command.
    PresenceRead { ask: Box<Ask> },
}

#[derive(Default)]
pub(super) struct Calls {
    next: u64,
    waiting: HashMap<u64, Call>,
}

impl Calls {
    /// The tag the next command is sent with.
    pub(super) fn next_tag(&mut self) -> u64 {
        self.next = self.next.wrapping_add(1);
        self.next
    }

    /// Remembers what the command sent with `tag` is for.
    pub(super) fn sent(&mut self, tag: u64, call: Call) {
        self.waiting.insert(tag, call);
    }
}

impl Reactor {
    /// The Redis reactor: the reply to a command sent with a tag.
    pub(super) fn on_call_reply(&mut self, tag: u64, result: Result<BytesFrame, String>) {
        let Some(call) = self.hub.as_mut().and_then(|h| h.calls.waiting.remove(&tag)) else {
            log::debug!("redis: a reply to a command nobody waits for (tag {tag})");
            return;
        };
        match call {
            Call::Append { ack } => self.on_append_reply(ack, result),
            Call::Read { to, range } => self.on_read_reply(*to, range, result),
            Call::PresenceChange { channel, join } => {
                self.on_presence_change_reply(channel, join, result)
            }
            Call::PresenceRefresh { channel } => self.on_presence_refresh_reply(channel, result),
            Call::PresenceSync { channel } => self.on_presence_sync_reply(channel, result),
            Call::PresenceRead { ask } => self.on_presence_read_reply(*ask, result),
        }
    }
}
