//! Counters each reactor keeps for itself, summed only when `/metrics` is scraped.
//!
//! A reactor is the only writer of its own [`ReactorMetrics`], so updates are uncontended relaxed
//! atomic adds: nothing on the message path takes a lock or touches another thread's cache line.
//! The Prometheus text format is written by hand: it is a few lines of `name value`, and a
//! registry crate would add a second layer of atomics without saving any code here.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a WebSocket connection ended; each has its own `closed` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame or closed its socket.
    Client,
    /// The client broke the protocol (bad frame, bad UTF-8, message too big).
    Protocol,
    /// Its outgoing queue overflowed `--max-queue`.
    SlowConsumer,
    /// It sent nothing, not even a pong, for `--idle-timeout`.
    IdleTimeout,
    /// It sent more than `--max-message-rate` messages per second.
    RateLimit,
    /// The node is shutting down.
    Shutdown,
    /// The socket failed (reset, broken pipe).
    IoError,
    /// Its token expired (4001) or its token's rules refused what it asked (4003).
    Auth,
    /// The server API disconnected its user (4002).
    Disconnected,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Client,
        CloseReason::Protocol,
        CloseReason::SlowConsumer,
        CloseReason::IdleTimeout,
        CloseReason::RateLimit,
        CloseReason::Shutdown,
        CloseReason::IoError,
        CloseReason::Auth,
        CloseReason::Disconnected,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Client => "client_close",
            CloseReason::Protocol => "protocol_error",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::RateLimit => "rate_limit",
            CloseReason::Shutdown => "shutdown",
            CloseReason::IoError => "io_error",
            CloseReason::Auth => "auth",
            CloseReason::Disconnected => "disconnected",
        }
    }

    fn index(self) -> usize {
        CloseReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(0)
    }
}

/// HTTP statuses fanout answers with; anything else is counted as "other".
const STATUSES: [u16; 14] = [
    101, 200, 400, 401, 403, 404, 405, 408, 413, 426, 429, 431, 500, 503,
];

#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed)
    }
}

/// One reactor's counters.
#[derive(Default, Debug)]
pub struct ReactorMetrics {
    pub accepted: Counter,
    closed: [Counter; CloseReason::ALL.len()],
    pub refused: Counter,
    pub handshake_timeouts: Counter,
    pub messages_in: Counter,
    pub bytes_in: Counter,
    pub messages_out: Counter,
    pub bytes_out: Counter,
    pub deliveries: Counter,
    pub publishes: Counter,
    pub channels: Counter,
    pub redis_messages_in: Counter,
    pub redis_oversized: Counter,
    pub redis_reconnects: Counter,
    /// Redis links of the node that are up (only the node's Redis reactor holds links).
    pub redis_link_up: Counter,
    /// Redis links the node keeps: 1, or one per shard master of a Redis Cluster.
    pub redis_links: Counter,
    pub redis_cluster_shards: Counter,
    pub redis_cluster_moved: Counter,
    pub redis_cluster_refreshes: Counter,
    /// Channels the node is subscribed to in Redis (kept by the Redis reactor).
    pub redis_subscriptions: Counter,
    pub publishes_dropped: Counter,
    /// Messages another reactor could not queue to this one because its mailbox was full.
    pub bus_dropped: Counter,
    // Presence (reactor::presence):
    /// Members that joined / left on this reactor (members now: the difference).
    pub presence_joins: Counter,
    pub presence_leaves: Counter,
    /// Channels whose members the node wrote to Redis again as a whole (the Redis reactor).
    pub presence_resyncs: Counter,
    http: [Counter; STATUSES.len() + 1],
    /// Token refreshes (see the block at the end of this file).
    pub followups: FollowupMetrics,
}

impl ReactorMetrics {
    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].inc();
    }

    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()].get()
    }

    pub fn open(&self) -> u64 {
        let closed: u64 = self.closed.iter().map(Counter::get).sum();
        self.accepted.get().saturating_sub(closed)
    }

    pub fn http_response(&self, status: u16) {
        let i = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        self.http[i].inc();
    }
}

/// Renders the Prometheus text exposition of all reactors' counters, summed.
/// Which Redis the node uses, for which metrics are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisKind {
    None,
    Single,
    Cluster,
}

pub fn render(reactors: &[&ReactorMetrics], redis: RedisKind, draining: bool) -> String {
    let redis_enabled = redis != RedisKind::None;
    let mut out = String::with_capacity(4096);
    let sum = |f: &dyn Fn(&ReactorMetrics) -> u64| -> u64 { reactors.iter().map(|m| f(m)).sum() };
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "fanout_connections_open",
        "gauge",
        "WebSocket connections currently open.",
        sum(&|m| m.open()),
    );
    metric(
        "fanout_connections_accepted_total",
        "counter",
        "WebSocket upgrades completed.",
        sum(&|m| m.accepted.get()),
    );
    metric(
        "fanout_connections_refused_total",
        "counter",
        "Upgrades refused because --max-connections was reached.",
        sum(&|m| m.refused.get()),
    );
    metric(
        "fanout_handshake_timeouts_total",
        "counter",
        "Connections dropped for not completing their HTTP request within --handshake-timeout.",
        sum(&|m| m.handshake_timeouts.get()),
    );
    metric(
        "fanout_messages_in_total",
        "counter",
        "WebSocket data messages received from clients.",
        sum(&|m| m.messages_in.get()),
    );
    metric(
        "fanout_bytes_in_total",
        "counter",
        "Payload bytes of WebSocket data messages received from clients.",
        sum(&|m| m.bytes_in.get()),
    );
    metric(
        "fanout_messages_out_total",
        "counter",
        "WebSocket frames queued to clients (deliveries, replies, control frames).",
        sum(&|m| m.messages_out.get()),
    );
    metric(
        "fanout_bytes_out_total",
        "counter",
        "Bytes written to client sockets.",
        sum(&|m| m.bytes_out.get()),
    );
    metric(
        "fanout_deliveries_total",
        "counter",
        "Messages queued to a subscriber (one per subscriber per message).",
        sum(&|m| m.deliveries.get()),
    );
    metric(
        "fanout_publishes_total",
        "counter",
        "Messages clients published (accepted for delivery).",
        sum(&|m| m.publishes.get()),
    );
    metric("fanout_channels", "gauge", "Channels with local subscribers, summed over reactors (a channel with subscribers on two reactors counts twice).", sum(&|m| m.channels.get()));
    metric("fanout_publishes_dropped_total", "counter", "Raw-mode publishes dropped because Redis was unreachable or backlogged (JSON publishes get an error reply instead).", sum(&|m| m.publishes_dropped.get()));
    metric(
        "fanout_bus_dropped_total",
        "counter",
        "Messages dropped between reactors of this node because a reactor's queue was full.",
        sum(&|m| m.bus_dropped.get()),
    );
    if redis_enabled {
        metric(
            "fanout_redis_messages_in_total",
            "counter",
            "Pub/Sub messages received from Redis.",
            sum(&|m| m.redis_messages_in.get()),
        );
        metric(
            "fanout_redis_messages_oversized_total",
            "counter",
            "Pub/Sub messages from Redis dropped for being over --max-message.",
            sum(&|m| m.redis_oversized.get()),
        );
        metric(
            "fanout_redis_reconnects_total",
            "counter",
            "Times the node's Redis link was re-established after a failure.",
            sum(&|m| m.redis_reconnects.get()),
        );
        metric(
            "fanout_redis_links_up",
            "gauge",
            "Redis links of this node that are up.",
            sum(&|m| m.redis_link_up.get()),
        );
        metric(
            "fanout_redis_links",
            "gauge",
            "Redis links this node keeps, all on reactor 0 whatever the number of reactors: one, or one per master of a Redis Cluster.",
            sum(&|m| m.redis_links.get()),
        );
        metric(
            "fanout_redis_subscriptions",
            "gauge",
            "Channels this node is subscribed to in Redis (one subscription per channel per node).",
            sum(&|m| m.redis_subscriptions.get()),
        );
    }
    if redis == RedisKind::Cluster {
        metric(
            "fanout_redis_cluster_shards",
            "gauge",
            "Shards (masters owning slots) in the node's map of the Redis Cluster.",
            sum(&|m| m.redis_cluster_shards.get()),
        );
        metric(
            "fanout_redis_cluster_moved_total",
            "counter",
            "Publishes answered MOVED and sent again to the master named.",
            sum(&|m| m.redis_cluster_moved.get()),
        );
        metric(
            "fanout_redis_cluster_refreshes_total",
            "counter",
            "Maps of the cluster read (CLUSTER SHARDS).",
            sum(&|m| m.redis_cluster_refreshes.get()),
        );
    }
    // Presence (reactor::presence).
    let (joins, leaves) = (
        sum(&|m| m.presence_joins.get()),
        sum(&|m| m.presence_leaves.get()),
    );
    metric(
        "fanout_presence_members",
        "gauge",
        "Presence members on this node: subscriptions to channels of namespaces with presence.",
        joins.saturating_sub(leaves),
    );
    metric(
        "fanout_presence_joins_total",
        "counter",
        "Presence members that joined on this node.",
        joins,
    );
    metric(
        "fanout_presence_leaves_total",
        "counter",
        "Presence members that left on this node.",
        leaves,
    );
    if redis_enabled {
        metric(
            "fanout_presence_resyncs_total",
            "counter",
            "Channels whose presence members this node wrote to Redis again as a whole (Redis lost them, the node was dropped as stale, or a change could not be sent).",
            sum(&|m| m.presence_resyncs.get()),
        );
    }
    // End of presence.
    metric(
        "fanout_draining",
        "gauge",
        "1 while the node drains after SIGTERM.",
        draining as u64,
    );
    metric(
        "fanout_reactors",
        "gauge",
        "Reactor threads.",
        reactors.len() as u64,
    );

    render_followups(&mut out, reactors);
    out.push_str("# HELP fanout_connections_closed_total WebSocket connections closed, by reason.\n# TYPE fanout_connections_closed_total counter\n");
    for reason in CloseReason::ALL {
        let v = sum(&|m| m.closed_count(reason));
        let _ = writeln!(
            out,
            "fanout_connections_closed_total{{reason=\"{}\"}} {v}",
            reason.label()
        );
    }
    out.push_str("# HELP fanout_http_responses_total HTTP responses sent, by status (101 is a WebSocket upgrade).\n# TYPE fanout_http_responses_total counter\n");
    for (i, status) in STATUSES
        .iter()
        .map(|s| s.to_string())
        .chain(["other".to_string()])
        .enumerate()
    {
        let v = sum(&|m| m.http[i].get());
        let _ = writeln!(
            out,
            "fanout_http_responses_total{{status=\"{status}\"}} {v}"
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Token refreshes and the server API (issue #14's last items), kept in this one block so the
// counters above stay as they were.

/// A reactor's counts of `{"op":"refresh"}` by outcome.
#[derive(Default, Debug)]
pub struct RefreshCounters {
    /// Verified and applied.
    pub accepted: Counter,
    /// Answered with an error: no keys, no token at connect, an invalid token, another user.
    pub refused: Counter,
    /// Answered with an error without verifying: over one per second on the connection.
    pub limited: Counter,
}

/// What each reactor adds to its counters for this block.
#[derive(Default, Debug)]
pub struct FollowupMetrics {
    pub refreshes: RefreshCounters,
}

/// Routes of the server API as `/metrics` labels them; `none` is a request that named no route
/// (a malformed head, an unknown path, a connection refused at accept).
pub const API_ROUTES: [&str; 8] = [
    "publish",
    "broadcast",
    "disconnect",
    "channels",
    "history",
    "info",
    "openapi",
    "none",
];

/// Statuses the server API answers with; anything else is counted as "other".
const API_STATUSES: [u16; 13] = [
    200, 400, 401, 404, 405, 408, 411, 413, 415, 429, 431, 503, 504,
];

/// The server API's counters. Only its thread writes them; `/metrics` reads them.
#[derive(Default, Debug)]
pub struct ApiMetrics {
    responses: [[Counter; API_STATUSES.len() + 1]; API_ROUTES.len()],
    /// Requests waiting for answers from the reactors, Redis or other nodes (a gauge).
    pub waiting: Counter,
    /// Answers the API thread is owed by the reactors and Redis (a gauge).
    pub awaited: Counter,
}

impl ApiMetrics {
    /// Counts one response; `route` is one of [`API_ROUTES`] (anything else counts as `none`).
    pub fn response(&self, route: &str, status: u16) {
        let r = API_ROUTES
            .iter()
            .position(|x| *x == route)
            .unwrap_or(API_ROUTES.len() - 1);
        let s = API_STATUSES
            .iter()
            .position(|x| *x == status)
            .unwrap_or(API_STATUSES.len());
        if let Some(c) = self.responses.get(r).and_then(|row| row.get(s)) {
            c.inc();
        }
    }
}

/// The server API's part of `/metrics` (a node with `--api-listen`). Route and status pairs
/// appear once they were answered at least once, as labelled counters usually do: the full
/// product would be ~100 lines of zeros.
pub fn render_api(out: &mut String, api: &ApiMetrics) {
    out.push_str("# HELP fanout_api_requests_total Server API requests answered, by route and status (route none: no route was named, e.g. an unknown path).\n# TYPE fanout_api_requests_total counter\n");
    for (route, row) in API_ROUTES.iter().zip(&api.responses) {
        let statuses = API_STATUSES
            .iter()
            .map(u16::to_string)
            .chain(["other".to_string()]);
        for (status, c) in statuses.zip(row) {
            let v = c.get();
            if v > 0 {
                let _ = writeln!(
                    out,
                    "fanout_api_requests_total{{route=\"{route}\",status=\"{status}\"}} {v}"
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP fanout_api_requests_waiting Server API requests waiting for answers from the node's reactors, Redis or other nodes.\n# TYPE fanout_api_requests_waiting gauge\nfanout_api_requests_waiting {}",
        api.waiting.get()
    );
    let _ = writeln!(
        out,
        "# HELP fanout_api_answers_pending Answers the server API is owed by the node's reactors and Redis (past 65536, requests that need answers get 429).\n# TYPE fanout_api_answers_pending gauge\nfanout_api_answers_pending {}",
        api.awaited.get()
    );
}

fn render_followups(out: &mut String, reactors: &[&ReactorMetrics]) {
    let sum = |f: &dyn Fn(&RefreshCounters) -> u64| -> u64 {
        reactors.iter().map(|m| f(&m.followups.refreshes)).sum()
    };
    out.push_str("# HELP fanout_token_refreshes_total Token refreshes clients asked for (op refresh), by result: accepted; refused (an error reply); limited (more than one per second on the connection: refused without verifying the token).\n# TYPE fanout_token_refreshes_total counter\n");
    for (result, v) in [
        ("accepted", sum(&|r| r.accepted.get())),
        ("refused", sum(&|r| r.refused.get())),
        ("limited", sum(&|r| r.limited.get())),
    ] {
        let _ = writeln!(
            out,
            "fanout_token_refreshes_total{{result=\"{result}\"}} {v}"
        );
    }
}

/// The standalone history store's gauges and its eviction counter (`--history-max-bytes`).
pub fn render_history(bytes: usize, messages: usize, channels: usize, evicted: u64) -> String {
    format!(
        "# HELP fanout_history_bytes Bytes of channel history kept in memory (standalone), against --history-max-bytes.\n\
         # TYPE fanout_history_bytes gauge\nfanout_history_bytes {bytes}\n\
         # HELP fanout_history_messages Messages of channel history kept in memory (standalone).\n\
         # TYPE fanout_history_messages gauge\nfanout_history_messages {messages}\n\
         # HELP fanout_history_channels Channels with history kept in memory (standalone).\n\
         # TYPE fanout_history_channels gauge\nfanout_history_channels {channels}\n\
         # HELP fanout_history_evicted_total Messages dropped from history to stay under --history-max-bytes.\n\
         # TYPE fanout_history_evicted_total counter\nfanout_history_evicted_total {evicted}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_over_reactors() {
        let (a, b) = (ReactorMetrics::default(), ReactorMetrics::default());
        a.accepted.add(3);
        b.accepted.add(2);
        a.closed(CloseReason::SlowConsumer);
        b.http_response(404);
        b.http_response(999);
        let text = render(&[&a, &b], RedisKind::None, false);
        assert!(text.contains("fanout_connections_open 4\n"));
        assert!(text.contains("fanout_connections_closed_total{reason=\"slow_consumer\"} 1\n"));
        assert!(text.contains("fanout_http_responses_total{status=\"404\"} 1\n"));
        assert!(text.contains("fanout_http_responses_total{status=\"other\"} 1\n"));
        assert!(!text.contains("redis"));
        assert!(text.contains("fanout_token_refreshes_total{result=\"limited\"} 0\n"));
    }

    #[test]
    fn api_responses_by_route_and_status() {
        let api = ApiMetrics::default();
        api.response("publish", 200);
        api.response("publish", 200);
        api.response("channels", 429);
        api.response("nonsense", 599);
        api.waiting.set(2);
        let mut text = String::new();
        render_api(&mut text, &api);
        assert!(text.contains("fanout_api_requests_total{route=\"publish\",status=\"200\"} 2\n"));
        assert!(text.contains("fanout_api_requests_total{route=\"channels\",status=\"429\"} 1\n"));
        assert!(text.contains("fanout_api_requests_total{route=\"none\",status=\"other\"} 1\n"));
        assert!(!text.contains("status=\"404\""), "only what was answered");
        assert!(text.contains("fanout_api_requests_waiting 2\n"));
        assert!(text.contains("fanout_api_answers_pending 0\n"));
    }
}
