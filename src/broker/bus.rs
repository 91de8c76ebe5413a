//! The queues between the reactors of one node.
//!
//! Each reactor has a [`Mailbox`] and the mio `Waker` of its `Poll`:
//! - `messages`: bounded; messages to deliver to its local subscribers. A full queue drops and
//!   counts, never buffers without limit: a reactor that falls behind must not grow the node's
//!   memory.
//! - `requests`: bounded; used only on the node's Redis reactor (reactor 0), which alone holds
//!   the Redis link: interest changes (a channel gained its first or lost its last subscriber on
//!   some reactor) and publish requests. A full queue hands the request back to the sender, which
//!   answers a JSON publisher with an error (a raw one is counted as dropped) and keeps an interest
//!   change in a small per-channel table to retry (see `reactor::pubsub`), so nothing is lost
//!   and nothing grows without limit.
//! - `replies`: from the Redis reactor back to a reactor: publish acknowledgements and
//!   subscription confirmations. Not bounded by the channel itself but by its only producer's
//!   protocol: every reply answers one request the receiving reactor counted as awaited, and a
//!   reactor never has more than [`MAX_AWAITED`] replies outstanding (past that a JSON publish
//!   gets an error and a subscription request waits), so this queue never holds more.
//! - `control`: the drain, and what the server API asks of every reactor (close a user's
//!   connections, list channels). Bounded by a count, not by the channel: at most
//!   [`CONTROL_CAPACITY`] entries wait; past that [`Mailbox::try_control`] hands the request
//!   back. Only the drain ([`Mailbox::control`]) always goes in, and there is one per node.
//!
//! The server API's thread (`--api-listen`, [`crate::api`]) has an [`ApiMailbox`] of its own:
//! publish acknowledgements from the Redis reactor and the reactors' answers to its controls.
//! It is bounded the way `replies` is: the API thread never has more than a fixed number of
//! answers outstanding. The one exception, the parts of other nodes' answers to a cluster-wide
//! channel list ([`super::census`]), which anyone on the Redis could send, is bounded by bytes
//! ([`ApiMailbox::census_part`]).
//!
//! Wakeups are coalesced: a sender only writes the eventfd when the flag says the reactor has not
//! been woken since it last drained its queues, so a burst of messages costs one syscall.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use mio::Waker;

use bytes::Bytes;

use super::history::Page;
use super::redis::{Ack, AckTo};
use super::Message;
use crate::metrics::ReactorMetrics;
use crate::protocol::Position;

/// Messages a reactor's queue holds before further ones are dropped. At the default 64 KiB
/// `--max-message` that bounds one queue to a few GiB in the very worst case, and to a few MiB
/// for chat-sized messages; a reactor that is this far behind is overloaded anyway.
pub const MAILBOX_CAPACITY: usize = 16 * 1024;

/// Most replies a reactor may be owed by the Redis reactor at once (see the module comment).
pub const MAX_AWAITED: usize = 64 * 1024;

/// Most control requests waiting in one reactor's queue (see the module comment).
pub const CONTROL_CAPACITY: usize = 1024;

/// What a reactor's `messages` queue carries: messages to deliver, and the answers to history
/// reads, which must come in the same stream as the messages (see `reactor::history`).
#[derive(Debug)]
pub enum Delivery {
    Message(Message),
    Read(Box<ReadDone>),
}

/// Why a history read was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// A JSON subscribe on a channel with history: its `ok` carries the channel's position,
    /// and with `since` the messages after it follow.
    Subscribe { since: Option<Position> },
    /// The `history` command: the newest `limit` messages.
    History { limit: usize },
}

/// A history read a client (or the server API) asked for: who gets the answer.
#[derive(Debug)]
pub struct ReadFor {
    /// The reactor of the client, or the API thread (then `conn` and `serial` are its ticket).
    pub reply_to: AckTo,
    pub conn: usize,
    pub serial: u64,
    pub id: Option<Box<str>>,
    pub channel: Bytes,
    pub purpose: Purpose,
}

/// A history read, answered: the page, or why there is none.
#[derive(Debug)]
pub struct ReadDone {
    pub to: ReadFor,
    pub result: Result<Page, String>,
}

/// What the Redis reactor is asked to send for a census.
#[derive(Debug)]
pub enum CensusRequest {
    /// From the API thread: publish `payload` (a [`super::control::ask_channels`]) on the
    /// control channel; answered with `ApiReply::CensusSent` (how many subscribers got it).
    Ask { ticket: Ticket, payload: Bytes },
    /// From a reactor: publish one [`census::Part`](super::census::Part) on `channel`, an asker's reply channel. Not
    /// acknowledged: a part that is lost makes the asker's answer incomplete, nothing more.
    Answer { channel: Bytes, payload: Bytes },
}

/// What a reactor asks of the node's Redis reactor.
#[derive(Debug)]
pub enum Request {
    /// Channel `channel` gained its first (`subscribe`) or lost its last local subscriber on
    /// reactor `reactor`. A subscribe is answered with [`Reply::Subscribed`] once the node holds
    /// the Redis subscription; an unsubscribe is not answered.
    Interest {
        reactor: usize,
        channel: Bytes,
        subscribe: bool,
    },
    /// PUBLISH `payload` on `channel`; with an `ack`, answered with [`Reply::Published`].
    /// On a channel with history, appended to its stream and published by one script.
    Publish {
        channel: Bytes,
        payload: Bytes,
        ack: Option<Ack>,
    },
    /// Read a channel's history; answered with a [`Delivery::Read`] in the asking reactor's
    /// message queue (or, when that is full, [`Reply::ReadFailed`]).
    Read(Box<ReadFor>),
    /// Send what a channel census needs sent (see [`census`](super::census)).
    Census(CensusRequest),
    /// A `presence` or `presence_stats` command (`reactor::presence`); answered with
    /// [`Reply::Presence`].
    Presence(Box<super::presence::Ask>),
}

/// What the Redis reactor answers.
#[derive(Debug)]
pub enum Reply {
    /// One subscribe request for `channel` was settled: `Ok` once Redis confirmed the node's
    /// subscription (or at once while the link is down: it is made when the link comes up),
    /// `Err` with Redis' reason when Redis refused it.
    Subscribed {
        channel: Bytes,
        result: Result<(), String>,
    },
    /// A PUBLISH with an ack was answered by Redis, refused, or lost with the link.
    Published {
        ack: Ack,
        result: Result<(), String>,
    },
    /// A history read could not be answered in the message queue (it was full).
    ReadFailed(Box<ReadFor>),
    /// The reply frame to a [`Request::Presence`].
    Presence(Box<super::presence::Answer>),
}

/// What one thread asks of a reactor besides delivering messages.
#[derive(Debug)]
pub enum Control {
    /// Stop accepting and close every client with 1001, spread evenly until `deadline`.
    Drain { deadline: Instant },
    /// Close every WebSocket whose token's `sub` is `user` with 4002; answered with
    /// [`ApiReply::Disconnected`] when `reply` names an API request (a disconnect that came
    /// through Redis from another node is not answered).
    Disconnect {
        user: Arc<str>,
        reply: Option<Ticket>,
    },
    /// List the channels with local subscribers whose names start with `prefix`, at most
    /// `limit` of them; answered with [`ApiReply::Channels`].
    Channels {
        prefix: Arc<str>,
        limit: usize,
        reply: Ticket,
    },
    /// Another node asked for every node's channels: publish this reactor's part to it
    /// ([`census`](super::census)). Nobody on this node waits for it.
    Census(Arc<super::control::ChannelsAsk>),
}

/// One request of the server API: its connection's slab key and serial on the API thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub conn: usize,
    pub serial: u64,
}

/// What the reactors answer the server API.
#[derive(Debug)]
pub enum ApiReply {
    /// A PUBLISH the API asked for was answered by Redis, refused, or lost with the link.
    Published {
        ticket: Ticket,
        result: Result<(), String>,
    },
    /// One reactor closed `closed` WebSockets of the user.
    Disconnected { ticket: Ticket, closed: usize },
    /// One reactor's channels (name, local subscribers); `truncated` when it had more than asked.
    Channels {
        ticket: Ticket,
        channels: Vec<(Bytes, usize)>,
        truncated: bool,
    },
    /// A census request was published on the control channel: how many subscribers Redis gave
    /// it to (the asking node included), or why it was not.
    CensusSent {
        ticket: Ticket,
        result: Result<u64, String>,
    },
    /// A part another node sent to this node's reply channel, as it came from Redis. Not an
    /// answer the API thread counted as owed: bounded instead by
    /// [`ApiMailbox::census_part`]'s byte budget, and taken back with
    /// [`ApiMailbox::census_part_taken`].
    CensusPart(Bytes),
    /// A history read the API asked for (`GET /api/history`), with Redis.
    History {
        ticket: Ticket,
        result: Result<Page, String>,
    },
}

/// The sending side of the server API's queue, shared with every reactor.
pub struct ApiMailbox {
    replies: Sender<ApiReply>,
    waker: Waker,
    woken: AtomicBool,
    /// Bytes of [`ApiReply::CensusPart`]s queued and not yet taken.
    census_bytes: AtomicUsize,
    /// The API thread's counters, here because this is the API's part of the node's state.
    pub metrics: crate::metrics::ApiMetrics,
}

impl ApiMailbox {
    pub fn new(waker: Waker) -> (ApiMailbox, Receiver<ApiReply>) {
        let (replies, inbox) = mpsc::channel();
        let mailbox = ApiMailbox {
            replies,
            waker,
            woken: AtomicBool::new(false),
            census_bytes: AtomicUsize::new(0),
            metrics: Default::default(),
        };
        (mailbox, inbox)
    }

    /// Queues an answer for the API thread (bounded by what it has outstanding, see the module
    /// comment) and wakes it.
    pub fn reply(&self, reply: ApiReply) {
        if self.replies.send(reply).is_ok() && !self.woken.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                log::error!("cannot wake the API thread: {e}");
            }
        }
    }

    /// Called by the API thread before it drains its queue, so later answers wake it again.
    pub fn rearm(&self) {
        self.woken.store(false, Ordering::Release);
    }

    /// Queues a census part from Redis unless [`census::QUEUED_PART_BYTES`] of them already
    /// wait; `false` when it was dropped.
    ///
    /// [`census::QUEUED_PART_BYTES`]: super::census::QUEUED_PART_BYTES
    pub fn census_part(&self, part: Bytes) -> bool {
        let len = part.len();
        let before = self.census_bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > super::census::QUEUED_PART_BYTES {
            self.census_bytes.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        self.reply(ApiReply::CensusPart(part));
        true
    }

    /// Called by the API thread for every census part it takes, with its length.
    pub fn census_part_taken(&self, len: usize) {
        self.census_bytes.fetch_sub(len, Ordering::AcqRel);
    }
}

/// The sending side of a reactor's queues, shared with every other thread.
pub struct Mailbox {
    messages: SyncSender<Delivery>,
    requests: SyncSender<Request>,
    replies: Sender<Reply>,
    control: Sender<Control>,
    /// Control requests sent and not yet taken by the reactor (at most [`CONTROL_CAPACITY`]
    /// through [`Mailbox::try_control`]).
    controls: AtomicUsize,
    waker: Waker,
    woken: AtomicBool,
    /// The receiving reactor's counters: a full queue counts in its `bus_dropped`.
    metrics: Arc<ReactorMetrics>,
}

/// The receiving side, owned by the reactor.
pub struct Inbox {
    pub messages: Receiver<Delivery>,
    pub requests: Receiver<Request>,
    pub replies: Receiver<Reply>,
    pub control: Receiver<Control>,
}

impl Mailbox {
    pub fn new(waker: Waker, capacity: usize, metrics: Arc<ReactorMetrics>) -> (Mailbox, Inbox) {
        let (messages, message_rx) = mpsc::sync_channel(capacity);
        let (requests, request_rx) = mpsc::sync_channel(capacity);
        let (replies, reply_rx) = mpsc::channel();
        let (control, control_rx) = mpsc::channel();
        (
            Mailbox {
                messages,
                requests,
                replies,
                control,
                controls: AtomicUsize::new(0),
                waker,
                woken: AtomicBool::new(false),
                metrics,
            },
            Inbox {
                messages: message_rx,
                requests: request_rx,
                replies: reply_rx,
                control: control_rx,
            },
        )
    }

    /// Queues a message for delivery; a full queue drops it (counted). The receiver lives as
    /// long as its reactor: after it stopped there is nobody to deliver to.
    pub fn deliver(&self, msg: Message) {
        match self.messages.try_send(Delivery::Message(msg)) {
            Ok(()) => self.wake(),
            Err(TrySendError::Full(_)) => {
                self.metrics.bus_dropped.inc();
                // Wake anyway: the reactor may be asleep with a full queue it has not seen yet.
                self.wake();
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Queues a request for the Redis reactor; a full queue hands it back (see the module
    /// comment for what the sender then does). A stopped reactor takes nothing either.
    pub fn request(&self, request: Request) -> Result<(), Request> {
        match self.requests.try_send(request) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(r) | TrySendError::Disconnected(r)) => Err(r),
        }
    }

    /// Queues a reply from the Redis reactor (bounded by [`MAX_AWAITED`] on the sending side).
    pub fn reply(&self, reply: Reply) {
        if self.replies.send(reply).is_ok() {
            self.wake();
        }
    }

    /// Makes the reactor's next poll return at once, even if it was woken already: it stopped
    /// draining a queue before the end to keep its turn short.
    pub fn nudge(&self) {
        self.woken.store(true, Ordering::Release);
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake a reactor: {e}");
        }
    }

    /// Queues a control request whatever the queue holds: only for the drain, once per node.
    pub fn control(&self, request: Control) {
        self.controls.fetch_add(1, Ordering::AcqRel);
        if self.control.send(request).is_ok() {
            self.wake();
        } else {
            self.controls.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Queues a control request unless [`CONTROL_CAPACITY`] of them already wait (or the
    /// reactor stopped); then it is handed back.
    pub fn try_control(&self, request: Control) -> Result<(), Control> {
        if self.controls.fetch_add(1, Ordering::AcqRel) >= CONTROL_CAPACITY {
            self.controls.fetch_sub(1, Ordering::AcqRel);
            return Err(request);
        }
        match self.control.send(request) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(mpsc::SendError(request)) => {
                self.controls.fetch_sub(1, Ordering::AcqRel);
                Err(request)
            }
        }
    }

    /// Called by the owning reactor for every control request it takes.
    pub fn control_taken(&self) {
        self.controls.fetch_sub(1, Ordering::AcqRel);
    }

    /// Queues a message for delivery unless the queue is full; then it is handed back (not
    /// counted as dropped: the server API tells its caller instead).
    pub fn try_deliver(&self, msg: Message) -> Result<(), Message> {
        match self.try_send(Delivery::Message(msg)) {
            Ok(()) => Ok(()),
            Err(Delivery::Message(msg)) => Err(msg),
            Err(Delivery::Read(_)) => unreachable!("a message was sent"),
        }
    }

    /// Queues the answer to a history read behind the messages already queued; a full queue
    /// hands it back.
    pub fn deliver_read(&self, done: Box<ReadDone>) -> Result<(), Box<ReadDone>> {
        match self.try_send(Delivery::Read(done)) {
            Ok(()) => Ok(()),
            Err(Delivery::Read(done)) => Err(done),
            Err(Delivery::Message(_)) => unreachable!("a read was sent"),
        }
    }

    fn try_send(&self, delivery: Delivery) -> Result<(), Delivery> {
        match self.messages.try_send(delivery) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(d)) => {
                self.wake();
                Err(d)
            }
            Err(TrySendError::Disconnected(d)) => Err(d),
        }
    }

    fn wake(&self) {
        if !self.woken.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                log::error!("cannot wake a reactor: {e}");
            }
        }
    }

    /// Called by the owning reactor before it drains its queues, so later sends wake it again.
    pub fn rearm(&self) {
        self.woken.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mio::{Poll, Token};

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_growing() {
        let poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), Token(0)).unwrap();
        let metrics = Arc::new(ReactorMetrics::default());
        let (mailbox, inbox) = Mailbox::new(waker, 4, metrics.clone());
        let msg = Message::new(Bytes::from_static(b"c"), b"x", true);
        for _ in 0..10 {
            mailbox.deliver(msg.clone());
        }
        assert_eq!(metrics.bus_dropped.get(), 6);
        assert_eq!(inbox.messages.try_iter().count(), 4);
        mailbox.control(Control::Drain {
            deadline: Instant::now(),
        });
        assert_eq!(
            inbox.control.try_iter().count(),
            1,
            "control is never dropped"
        );
    }

    #[test]
    fn a_full_request_queue_hands_the_request_back() {
        let poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), Token(0)).unwrap();
        let (mailbox, inbox) = Mailbox::new(waker, 2, Arc::new(ReactorMetrics::default()));
        let publish = || Request::Publish {
            channel: Bytes::from_static(b"c"),
            payload: Bytes::from_static(b"x"),
            ack: None,
        };
        assert!(mailbox.request(publish()).is_ok());
        assert!(mailbox.request(publish()).is_ok());
        assert!(matches!(
            mailbox.request(publish()),
            Err(Request::Publish { .. })
        ));
        assert_eq!(inbox.requests.try_iter().count(), 2);
    }
}
