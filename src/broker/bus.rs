//! The queues between the reactors of one node.
//!
//! Each reactor has a [`Mailbox`]: an unbounded lock-free MPSC queue plus the mio `Waker` of its
//! `Poll`. Wakeups are coalesced: a sender only writes the eventfd when the flag says the reactor
//! has not been woken since it last drained its queue, so a burst of messages costs one syscall.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Instant;

use mio::Waker;

use super::Message;

/// What one reactor sends another.
#[derive(Debug)]
pub enum Envelope {
    /// Deliver to local subscribers (embedded mode: the message was published on another reactor).
    Deliver(Message),
    /// Stop accepting and close every client with 1001, spread evenly until `deadline`.
    Drain { deadline: Instant },
}

/// The sending side of a reactor's queue, shared with every other thread.
pub struct Mailbox {
    tx: Sender<Envelope>,
    waker: Waker,
    woken: AtomicBool,
}

impl Mailbox {
    pub fn new(waker: Waker) -> (Mailbox, Receiver<Envelope>) {
        let (tx, rx) = mpsc::channel();
        (
            Mailbox {
                tx,
                waker,
                woken: AtomicBool::new(false),
            },
            rx,
        )
    }

    pub fn send(&self, envelope: Envelope) {
        // The receiver lives as long as its reactor; after it stopped, there is nobody to deliver to.
        if self.tx.send(envelope).is_ok() && !self.woken.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                log::error!("cannot wake a reactor: {e}");
            }
        }
    }

    /// Called by the owning reactor before it drains its queue, so later sends wake it again.
    pub fn rearm(&self) {
        self.woken.store(false, Ordering::Release);
    }
}
