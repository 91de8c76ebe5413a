//! A connection's outgoing queue: the one place where bytes queued to a client are counted.
//!
//! Every frame a client is sent (a delivery, a pong, a JSON reply, an HTTP response, a close
//! frame) goes through [`Outbox::push`] against the connection's `--max-queue`, so a client that
//! never reads can make the server hold at most that many bytes for it. The close frame alone may
//! use a small headroom above the limit, so a client closed for overflowing still learns why.
//! Frames are shared `Bytes`: queueing a broadcast is a reference-count increment, not a copy.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

/// Room above `--max-queue` reserved for the close frame (2-byte header + 125-byte body).
pub const CLOSE_HEADROOM: usize = 128;

/// Most frames handed to one `writev`.
const MAX_IOVECS: usize = 64;

/// The queue would exceed its limit; nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

#[derive(Debug, Default)]
pub struct Outbox {
    frames: VecDeque<Bytes>,
    /// Bytes of `frames.front()` already written.
    offset: usize,
    /// Bytes queued and not yet written.
    bytes: usize,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes queued and not yet written.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// Queues `frame` if the queue stays within `limit` bytes.
    #[inline]
    pub fn push(&mut self, frame: Bytes, limit: usize) -> Result<(), Overflow> {
        if self.bytes + frame.len() > limit {
            return Err(Overflow);
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        Ok(())
    }

    /// Drops queued output (a slow consumer's backlog) and frees the queue. A frame already
    /// partly written is kept: the peer would otherwise read whatever comes next (the close
    /// frame) as the rest of its payload.
    pub fn discard(&mut self) {
        let started = if self.offset > 0 {
            self.frames.pop_front()
        } else {
            None
        };
        self.frames = VecDeque::new();
        self.bytes = 0;
        match started {
            Some(frame) => {
                self.bytes = frame.len() - self.offset;
                self.frames.push_back(frame);
            }
            None => self.offset = 0,
        }
    }

    /// Releases the queue's memory when it is empty (idle connections hold no buffer).
    pub fn shrink(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
        }
    }

    /// Writes queued frames with vectored writes until done or the socket is full.
    /// Returns bytes written; `Ok` with output left means "wait for WRITABLE".
    pub fn flush(&mut self, stream: &mut impl Write) -> io::Result<usize> {
        let mut written = 0;
        while !self.frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (i, frame) in self.frames.iter().take(MAX_IOVECS).enumerate() {
                let start = if i == 0 { self.offset } else { 0 };
                slices[i] = IoSlice::new(&frame[start..]);
                n += 1;
            }
            match stream.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(wrote) => {
                    written += wrote;
                    self.consume(wrote);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    fn consume(&mut self, mut wrote: usize) {
        self.bytes -= wrote;
        while wrote > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let left = front.len() - self.offset;
            if wrote >= left {
                wrote -= left;
                self.frames.pop_front();
                self.offset = 0;
            } else {
                self.offset += wrote;
                wrote = 0;
            }
        }
    }

    /// Whether a frame is partly on the wire (tests).
    pub fn is_mid_frame(&self) -> bool {
        self.offset > 0
    }

    /// Frames queued (tests).
    pub fn frames(&self) -> usize {
        self.frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_counts_every_byte_and_refuses_without_queueing() {
        let mut out = Outbox::default();
        assert_eq!(out.push(Bytes::from_static(&[0; 60]), 100), Ok(()));
        assert_eq!(out.push(Bytes::from_static(&[0; 41]), 100), Err(Overflow));
        assert_eq!(out.len_bytes(), 60);
        assert_eq!(out.push(Bytes::from_static(&[0; 40]), 100), Ok(()));
        assert_eq!(out.len_bytes(), 100);
    }

    #[test]
    fn partial_writes_are_tracked_across_frames() {
        let mut out = Outbox::default();
        out.push(Bytes::from_static(b"abc"), 100).unwrap();
        out.push(Bytes::from_static(b"defg"), 100).unwrap();
        out.consume(4);
        assert_eq!((out.frames(), out.offset, out.len_bytes()), (1, 1, 3));
        out.discard();
        assert_eq!(
            (out.frames(), out.len_bytes()),
            (1, 3),
            "the started frame stays"
        );
        let mut sink = Vec::new();
        assert_eq!(out.flush(&mut sink).unwrap(), 3);
        assert_eq!(sink, b"efg");
        assert!(out.is_empty());
    }
}
