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
//! - `control`: unbounded but rare (one entry per drain).
//!
//! Wakeups are coalesced: a sender only writes the eventfd when the flag says the reactor has not
//! been woken since it last drained its queues, so a burst of messages costs one syscall.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use mio::Waker;

use bytes::Bytes;

use super::redis::Ack;
use super::Message;
use crate::metrics::ReactorMetrics;

/// Messages a reactor's queue holds before further ones are dropped. At the default 64 KiB
/// `--max-message` that bounds one queue to a few GiB in the very worst case, and to a few MiB
/// for chat-sized messages; a reactor that is this far behind is overloaded anyway.
pub const MAILBOX_CAPACITY: usize = 16 * 1024;

/// Most replies a reactor may be owed by the Redis reactor at once (see the module comment).
pub const MAX_AWAITED: usize = 64 * 1024;

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
    Publish {
        channel: Bytes,
        payload: Bytes,
        ack: Option<Ack>,
    },
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
}

/// What one thread asks of a reactor besides delivering messages.
#[derive(Debug)]
pub enum Control {
    /// Stop accepting and close every client with 1001, spread evenly until `deadline`.
    Drain { deadline: Instant },
}

/// The sending side of a reactor's queues, shared with every other thread.
pub struct Mailbox {
    messages: SyncSender<Message>,
    requests: SyncSender<Request>,
    replies: Sender<Reply>,
    control: Sender<Control>,
    waker: Waker,
    woken: AtomicBool,
    /// The receiving reactor's counters: a full queue counts in its `bus_dropped`.
    metrics: Arc<ReactorMetrics>,
}

/// The receiving side, owned by the reactor.
pub struct Inbox {
    pub messages: Receiver<Message>,
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
        match self.messages.try_send(msg) {
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

    pub fn control(&self, request: Control) {
        if self.control.send(request).is_ok() {
            self.wake();
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
