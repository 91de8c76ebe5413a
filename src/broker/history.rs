//! Channel history of a standalone node (no Redis): the newest messages of each channel with
//! history, in memory, under one node-wide byte cap (`--history-max-bytes`).
//!
//! Every message kept is the same [`Message`] the subscribers got (its `Bytes` shared, not
//! copied). The store evicts the node's oldest messages first when the cap is reached, a
//! channel's own oldest past its namespace's `history_size`, and a whole channel once its
//! `history_ttl` passed since its last publish. A channel's epoch is new whenever its history
//! starts from nothing: a node restarted, or the channel evicted or expired, so a client's
//! offsets of an older epoch are never taken for offsets of this one.
//!
//! One store per node, behind a mutex in `node::Shared`: publishing on a channel with history
//! appends and hands the message to every reactor's queue under the lock, so every reactor
//! sees a channel's messages in offset order, and a subscriber's history read (also under the
//! lock) falls exactly between the messages before it and after it (see `reactor::recovery`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Message;

/// What one channel costs besides its messages' bytes (name, epoch, table entries), so
/// channels with no message left still count against the cap.
const CHANNEL_OVERHEAD: usize = 160;
/// What each kept message costs besides its frame.
const ENTRY_OVERHEAD: usize = 64;

/// What a namespace keeps of each of its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Messages.
    pub size: usize,
    /// After the last publish (zero: no limit).
    pub ttl: Duration,
}

/// A channel's history as one read saw it.
#[derive(Debug, Clone)]
pub struct Page {
    pub epoch: Arc<str>,
    /// The newest offset (0: nothing published in this epoch).
    pub top: u64,
    /// Oldest first.
    pub messages: Vec<Message>,
}

/// Which messages a read wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Those after this offset (at most `most`).
    After(u64),
    /// The newest ones (at most `most`).
    Newest,
}

struct ChannelHistory {
    epoch: Arc<str>,
    top: u64,
    messages: VecDeque<Message>,
    bytes: usize,
    /// Kept until then (None: no age limit).
    expires: Option<Instant>,
}

/// Counters for /metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub bytes: usize,
    pub messages: usize,
    pub channels: usize,
    /// Messages dropped to stay under the node-wide cap.
    pub evicted: u64,
}

pub struct History {
    max_bytes: usize,
    /// Distinguishes this process's epochs from an earlier run's.
    node_epoch: String,
    /// Numbers epochs within this process.
    generation: u64,
    channels: HashMap<Bytes, ChannelHistory>,
    /// Every kept message in publish order, for evicting the node's oldest first. Entries of
    /// messages already gone (trimmed, expired) are skipped when they come up, and compacted
    /// away when they outnumber the live ones, so this never holds more than twice as many.
    order: VecDeque<(Bytes, u64)>,
    stats: Stats,
}

impl History {
    pub fn new(max_bytes: usize) -> History {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        History {
            max_bytes,
            node_epoch: format!("{:x}{:04x}", nanos, std::process::id() & 0xffff),
            generation: 0,
            channels: HashMap::new(),
            order: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            channels: self.channels.len(),
            ..self.stats
        }
    }

    /// Appends `msg` to its channel (keeping at most `size` messages, for `ttl` after this
    /// publish; zero: no age limit) and returns its offset, also set in `msg`.
    pub fn append(&mut self, msg: &mut Message, size: usize, ttl: Duration, now: Instant) -> u64 {
        self.expire_if_due(&msg.channel, now);
        let channel = self.channel_entry(&msg.channel, ttl, now);
        channel.top += 1;
        msg.offset = channel.top;
        let cost = msg.frame.len() + ENTRY_OVERHEAD;
        channel.bytes += cost;
        channel.messages.push_back(msg.clone());
        channel.expires = (!ttl.is_zero()).then(|| now + ttl);
        let (mut trimmed, mut trimmed_bytes) = (0, 0);
        while channel.messages.len() > size.max(1) {
            if let Some(old) = channel.messages.pop_front() {
                trimmed += 1;
                trimmed_bytes += old.frame.len() + ENTRY_OVERHEAD;
            }
        }
        channel.bytes -= trimmed_bytes;
        self.stats.bytes = self.stats.bytes + cost - trimmed_bytes;
        self.stats.messages = self.stats.messages + 1 - trimmed;
        self.order.push_back((msg.channel.clone(), msg.offset));
        self.evict();
        msg.offset
    }

    /// Reads a channel's history: its epoch, newest offset and the messages `range` asks for.
    /// A channel with no history yet gets its epoch here (it expires like one published now),
    /// so a subscriber learns it before the first message.
    pub fn read(
        &mut self,
        name: &Bytes,
        range: Range,
        most: usize,
        ttl: Duration,
        now: Instant,
    ) -> Page {
        self.expire_if_due(name, now);
        let channel = self.channel_entry(name, ttl, now);
        let messages = match range {
            Range::After(offset) => channel
                .messages
                .iter()
                .filter(|m| m.offset > offset)
                .take(most)
                .cloned()
                .collect(),
            Range::Newest => {
                let skip = channel.messages.len().saturating_sub(most);
                channel.messages.iter().skip(skip).cloned().collect()
            }
        };
        let page = Page {
            epoch: channel.epoch.clone(),
            top: channel.top,
            messages,
        };
        self.evict();
        page
    }

    /// Drops every channel whose TTL passed (called about once a second).
    pub fn expire(&mut self, now: Instant) {
        let due: Vec<Bytes> = self
            .channels
            .iter()
            .filter(|(_, c)| c.expires.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.remove(&name);
        }
        self.compact();
    }

    fn expire_if_due(&mut self, name: &Bytes, now: Instant) {
        if self
            .channels
            .get(name)
            .is_some_and(|c| c.expires.is_some_and(|t| t <= now))
        {
            self.remove(name);
        }
    }

    fn channel_entry(&mut self, name: &Bytes, ttl: Duration, now: Instant) -> &mut ChannelHistory {
        if !self.channels.contains_key(name) {
            self.generation += 1;
            let epoch: Arc<str> = format!("{}.{:x}", self.node_epoch, self.generation).into();
            self.stats.bytes += CHANNEL_OVERHEAD + name.len();
            self.channels.insert(
                name.clone(),
                ChannelHistory {
                    epoch,
                    top: 0,
                    messages: VecDeque::new(),
                    bytes: CHANNEL_OVERHEAD + name.len(),
                    expires: (!ttl.is_zero()).then(|| now + ttl),
                },
            );
        }
        self.channels
            .get_mut(name)
            .expect("inserted above when missing")
    }

    fn remove(&mut self, name: &Bytes) {
        if let Some(c) = self.channels.remove(name) {
            self.stats.bytes -= c.bytes;
            self.stats.messages -= c.messages.len();
        }
    }

    /// Drops the node's oldest messages until the store fits its cap; a channel left with
    /// nothing, and whose overhead alone keeps the store over the cap, goes too.
    fn evict(&mut self) {
        while self.stats.bytes > self.max_bytes {
            let Some((name, offset)) = self.order.pop_front() else {
                // Only empty channels left: drop any (its epoch is lost; a new one starts).
                let Some(name) = self.channels.keys().next().cloned() else {
                    return;
                };
                self.remove(&name);
                continue;
            };
            let Some(channel) = self.channels.get_mut(&name) else {
                continue;
            };
            if channel.messages.front().is_some_and(|m| m.offset == offset) {
                if let Some(old) = channel.messages.pop_front() {
                    let cost = old.frame.len() + ENTRY_OVERHEAD;
                    channel.bytes -= cost;
                    self.stats.bytes -= cost;
                    self.stats.messages -= 1;
                    self.stats.evicted += 1;
                }
            }
        }
        self.compact();
    }

    /// Forgets order entries of messages no longer kept once they outnumber the kept ones.
    fn compact(&mut self) {
        if self.order.len() <= 2 * self.stats.messages + 64 {
            return;
        }
        let channels = &self.channels;
        self.order.retain(|(name, offset)| {
            channels.get(name).is_some_and(|c| {
                c.messages
                    .front()
                    .is_some_and(|first| first.offset <= *offset)
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(channel: &'static str, text: &str) -> Message {
        Message::new(
            Bytes::from_static(channel.as_bytes()),
            text.as_bytes(),
            true,
        )
    }

    fn payloads(page: &Page) -> Vec<String> {
        page.messages
            .iter()
            .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
            .collect()
    }

    #[test]
    fn offsets_increase_and_reads_see_what_was_kept() {
        let mut h = History::new(1 << 20);
        let now = Instant::now();
        let ttl = Duration::ZERO;
        for i in 1..=5 {
            let mut m = msg("c", &format!("m{i}"));
            assert_eq!(h.append(&mut m, 3, ttl, now), i);
            assert_eq!(m.offset, i);
        }
        let c = Bytes::from_static(b"c");
        let page = h.read(&c, Range::After(0), 100, ttl, now);
        assert_eq!(page.top, 5);
        assert_eq!(
            payloads(&page),
            ["m3", "m4", "m5"],
            "only history_size kept"
        );
        let page = h.read(&c, Range::After(3), 100, ttl, now);
        assert_eq!(payloads(&page), ["m4", "m5"]);
        let page = h.read(&c, Range::Newest, 2, ttl, now);
        assert_eq!(payloads(&page), ["m4", "m5"]);
        assert_eq!(h.stats().messages, 3);
    }

    #[test]
    fn a_channel_read_before_any_publish_keeps_its_epoch() {
        let mut h = History::new(1 << 20);
        let now = Instant::now();
        let c = Bytes::from_static(b"c");
        let before = h.read(&c, Range::Newest, 10, Duration::ZERO, now);
        assert_eq!(before.top, 0);
        let mut m = msg("c", "x");
        h.append(&mut m, 10, Duration::ZERO, now);
        let after = h.read(&c, Range::After(0), 10, Duration::ZERO, now);
        assert_eq!(after.epoch, before.epoch);
        assert_eq!(after.top, 1);
    }

    #[test]
    fn the_cap_evicts_the_nodes_oldest_first() {
        let now = Instant::now();
        let ttl = Duration::ZERO;
        let mut probe = History::new(usize::MAX);
        let mut m = msg("a", &"x".repeat(1000));
        probe.append(&mut m, 100, ttl, now);
        let one = probe.stats().bytes;
        // Room for about ten such messages in two channels.
        let mut h = History::new(one * 10);
        for i in 0..30 {
            let channel = if i % 2 == 0 { "a" } else { "b" };
            let mut m = msg(channel, &format!("{i:04}{}", "x".repeat(996)));
            h.append(&mut m, 100, ttl, now);
            assert!(h.stats().bytes <= one * 10, "over the cap after {i}");
        }
        let stats = h.stats();
        assert!(stats.evicted >= 15, "{stats:?}");
        let a = h.read(&Bytes::from_static(b"a"), Range::After(0), 100, ttl, now);
        let b = h.read(&Bytes::from_static(b"b"), Range::After(0), 100, ttl, now);
        // What is left is the newest of both channels, oldest gone first.
        assert_eq!(a.messages.last().unwrap().offset, 15);
        assert_eq!(b.messages.last().unwrap().offset, 15);
        let oldest_a = a.messages.first().unwrap().offset;
        let oldest_b = b.messages.first().unwrap().offset;
        assert!(oldest_a.abs_diff(oldest_b) <= 1, "{oldest_a} {oldest_b}");
        assert!(h.order.len() <= 2 * h.stats().messages + 64);
    }

    #[test]
    fn an_expired_channel_starts_a_new_epoch() {
        let mut h = History::new(1 << 20);
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        let c = Bytes::from_static(b"c");
        let mut m = msg("c", "x");
        h.append(&mut m, 10, ttl, now);
        let first = h.read(&c, Range::After(0), 10, ttl, now);
        h.expire(now + Duration::from_secs(11));
        assert_eq!(h.stats().channels, 0);
        assert_eq!(h.stats().bytes, 0);
        let second = h.read(&c, Range::After(0), 10, ttl, now + Duration::from_secs(11));
        assert_ne!(first.epoch, second.epoch);
        assert_eq!(second.top, 0);
    }
}
