//! The queues between the reactors of one node.
//!
//! Each reactor has a [`Mailbox`]: a bounded queue of messages to deliver, an unbounded (but
//! rare: one entry per drain) queue of control requests, and the mio `Waker` of its `Poll`.
//! Messages a full queue cannot take are dropped and counted, never buffered without limit: a
//! reactor that falls behind must not grow the node's memory. Wakeups are coalesced: a sender
//! only writes the eventfd when the flag says the reactor has not been woken since it last drained
//! its queues, so a burst of messages costs one syscall.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use mio::Waker;

use super::Message;
use crate::metrics::ReactorMetrics;

/// Messages a reactor's queue holds before further ones are dropped. At the default 64 KiB
/// `--max-message` that bounds one queue to a few GiB in the very worst case, and to a few MiB
/// for chat-sized messages; a reactor that is this far behind is overloaded anyway.
pub const MAILBOX_CAPACITY: usize = 16 * 1024;

/// What one thread asks of a reactor besides delivering messages.
#[derive(Debug)]
pub enum Control {
    /// Stop accepting and close every client with 1001, spread evenly until `deadline`.
    Drain { deadline: Instant },
}

/// The sending side of a reactor's queues, shared with every other thread.
pub struct Mailbox {
    messages: SyncSender<Message>,
    control: Sender<Control>,
    waker: Waker,
    woken: AtomicBool,
    /// The receiving reactor's counters: a full queue counts in its `bus_dropped`.
    metrics: Arc<ReactorMetrics>,
}

/// The receiving side, owned by the reactor.
pub struct Inbox {
    pub messages: Receiver<Message>,
    pub control: Receiver<Control>,
}

impl Mailbox {
    pub fn new(waker: Waker, capacity: usize, metrics: Arc<ReactorMetrics>) -> (Mailbox, Inbox) {
        let (messages, message_rx) = mpsc::sync_channel(capacity);
        let (control, control_rx) = mpsc::channel();
        (
            Mailbox {
                messages,
                control,
                waker,
                woken: AtomicBool::new(false),
                metrics,
            },
            Inbox {
                messages: message_rx,
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
}
