//! Time-driven work of a reactor: the Redis link's retries (and interest changes a full queue to
//! the Redis reactor did not take), resuming accepts after EMFILE, the
//! sweep that pings silent clients and ends idle or stalled ones (and, standalone, expires
//! channel history), the graceful drain, and log lines that are rate-limited so a flood cannot
//! flood the log.
//!
//! The drain costs what is due: the connections to close are listed once when it starts and each
//! step closes the next batch from that list, rather than scanning every connection per tick.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Reactor, CLOSE_GRACE_MS};
use crate::connection::{Close, Due, Timeouts};
use crate::metrics::CloseReason;
use crate::ws::CloseCode;

/// How often rate-limited log lines may repeat.
const LOG_EVERY_MS: u64 = 10_000;

/// When periodic work is next due.
pub(super) struct Timers {
    next_sweep_ms: u64,
    sweep_every_ms: u64,
    accept_paused_until_ms: Option<u64>,
    /// Refused upgrades already reported in the log, and when.
    refused_logged: (u64, u64),
    /// When an oversized message from Redis was last reported in the log.
    oversized_logged_ms: Option<u64>,
    /// When the Redis reactor next refreshes the node's presence (reactor::presence).
    pub(super) presence_refresh_ms: u64,
    /// Whether the Redis link was up at the last presence tick.
    pub(super) presence_link_up: bool,
}

impl Timers {
    pub(super) fn new(t: &Timeouts) -> Timers {
        let shortest = t.ping_ms.min(t.idle_ms).min(t.handshake_ms);
        let sweep_every_ms = (shortest / 4).clamp(20, 1000);
        Timers {
            next_sweep_ms: sweep_every_ms,
            sweep_every_ms,
            accept_paused_until_ms: None,
            refused_logged: (0, 0),
            oversized_logged_ms: None,
            presence_refresh_ms: 0,
            presence_link_up: false,
        }
    }

    pub(super) fn pause_accepts_until(&mut self, ms: u64) {
        self.accept_paused_until_ms = Some(ms);
    }
}

/// The graceful close of every client, spread between `start` and `deadline`.
pub(super) struct Drain {
    start: Instant,
    deadline: Instant,
    total: usize,
    closed: usize,
    /// Open WebSockets when the drain began, by key and serial, in the order they get closed.
    queue: VecDeque<(usize, u64)>,
}

impl Reactor {
    pub(super) fn run_timers(&mut self) {
        if self.redis.is_some() {
            let shared = self.shared.clone();
            if let Some(redis) = &mut self.redis {
                redis.tick(self.clock.now, self.poll.registry(), || {
                    shared.redis_seed_addrs()
                });
            }
            self.redis_events();
            self.presence_tick();
        }
        self.retry_deferred();
        let now_ms = self.clock.now_ms;
        if self
            .timers
            .accept_paused_until_ms
            .is_some_and(|t| now_ms >= t)
        {
            self.timers.accept_paused_until_ms = None;
            self.accept();
        }
        if self.drain.is_some() {
            self.drain_step();
        }
        if now_ms >= self.timers.next_sweep_ms {
            self.timers.next_sweep_ms = now_ms + self.timers.sweep_every_ms;
            self.sweep();
            if self.index == 0 && !self.redis_mode() {
                // Standalone history: channels past their TTL go (one reactor is enough).
                let mut history = self
                    .shared
                    .history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                history.expire(self.clock.now);
            }
        }
    }

    /// Pings silent clients, closes idle and stalled ones, frees idle buffers.
    fn sweep(&mut self) {
        let now_ms = self.clock.now_ms;
        let (timeouts, max_queue) = (self.timeouts, self.limits.max_queue);
        let mut ended = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            match conn.check_timers(now_ms, &timeouts, max_queue) {
                Due::Nothing => {}
                Due::Pinged => {
                    if conn.mark_dirty() {
                        self.dirty.push(key);
                    }
                }
                due => ended.push((key, due)),
            }
        }
        for (key, due) in ended {
            match due {
                Due::Idle => self.close(
                    key,
                    Close::new(CloseCode::Away, "idle timeout", CloseReason::IdleTimeout),
                ),
                Due::TokenExpired => self.close(
                    key,
                    Close::new(CloseCode::TokenExpired, "token expired", CloseReason::Auth),
                ),
                Due::HandshakeTimeout => {
                    self.metrics.handshake_timeouts.inc();
                    self.kill(key, CloseReason::IdleTimeout);
                }
                _ => self.kill(key, CloseReason::IdleTimeout),
            }
        }
        self.log_refused();
    }

    pub(super) fn start_drain(&mut self, deadline: Instant) {
        if self.drain.is_some() {
            return;
        }
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.shared.reactors[self.index]
            .accepting
            .store(false, Ordering::Release);
        let mut queue = VecDeque::new();
        let mut requests = Vec::new();
        for (key, conn) in self.conns.iter() {
            if conn.is_open() {
                queue.push_back((key, conn.serial()));
            } else if conn.is_http() {
                requests.push(key);
            }
        }
        // Half-read HTTP requests get no answer: the listener is closed, they can retry elsewhere.
        for key in requests {
            self.kill(key, CloseReason::Shutdown);
        }
        log::info!(
            "reactor {}: draining {} connections",
            self.index,
            queue.len()
        );
        self.drain = Some(Drain {
            start: self.clock.now,
            deadline,
            total: queue.len(),
            closed: 0,
            queue,
        });
        self.drain_step();
    }

    /// Closes the next batch so that closes are spread evenly until the deadline.
    fn drain_step(&mut self) {
        let now = self.clock.now;
        let Some(drain) = &mut self.drain else { return };
        let span = drain.deadline.saturating_duration_since(drain.start);
        let elapsed = now.saturating_duration_since(drain.start);
        let target = if span.is_zero() || elapsed >= span {
            drain.total
        } else {
            let fraction = elapsed.as_secs_f64() / span.as_secs_f64();
            ((drain.total as f64 * fraction).ceil() as usize).min(drain.total)
        };
        let batch = target.saturating_sub(drain.closed);
        let mut due = Vec::with_capacity(batch);
        while due.len() < batch {
            let Some(entry) = drain.queue.pop_front() else {
                break;
            };
            due.push(entry);
        }
        drain.closed += due.len();
        let hard_stop = drain.deadline + Duration::from_millis(CLOSE_GRACE_MS);
        for (key, serial) in due {
            if self.conns.open_with_serial(key, serial).is_some() {
                self.close(
                    key,
                    Close::new(
                        CloseCode::Away,
                        "server shutting down",
                        CloseReason::Shutdown,
                    ),
                );
            }
        }
        // Once every client is gone there is nothing left to spread: exit without waiting out
        // the rest of the drain time (the listener is already closed, so none can arrive).
        if self.conns.live_count() == 0 || now >= hard_stop {
            // The node leaves presence now rather than after --presence-ttl (best effort).
            self.presence_farewell();
            self.stopped = true;
        }
    }

    /// One log line per 10 s at most about oversized messages from Redis.
    pub(super) fn log_oversized(&mut self, len: usize) {
        let now_ms = self.clock.now_ms;
        if self
            .timers
            .oversized_logged_ms
            .is_none_or(|at| now_ms.saturating_sub(at) >= LOG_EVERY_MS)
        {
            log::warn!(
                "reactor {}: dropped a {len}-byte message from Redis: over --max-message {} (fanout_redis_messages_oversized_total counts them)",
                self.index,
                self.limits.max_message
            );
            self.timers.oversized_logged_ms = Some(now_ms);
        }
    }

    /// One log line per 10 s at most summarising upgrades refused by `--max-connections`.
    fn log_refused(&mut self) {
        let refused = self.metrics.refused.get();
        let (logged, at_ms) = self.timers.refused_logged;
        if refused > logged && self.clock.now_ms.saturating_sub(at_ms) >= LOG_EVERY_MS {
            log::warn!(
                "reactor {}: refused {} upgrades since the last report: --max-connections {} reached",
                self.index,
                refused - logged,
                self.shared.config.max_connections
            );
            self.timers.refused_logged = (refused, self.clock.now_ms);
        }
    }
}
