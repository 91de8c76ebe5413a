//! What the reactors of one node share: the configuration, each reactor's mailbox, counters and
//! flags, and node-wide figures (open WebSockets, the resolved Redis address, whether the node's
//! one Redis link is up, draining).
//!
//! Everything here is read-mostly and touched per connection, per scrape or per reconnect, never
//! per message. It lives apart from both the reactor and the supervisor (`server`) so that
//! neither has to import the other.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::broker::bus::{ApiMailbox, ApiReply, Control, Mailbox};
use crate::broker::history::{History, Keep};
use crate::broker::{control, Message};
use crate::config::Config;
use crate::metrics::{self, ReactorMetrics};

/// What one reactor shares with the rest of the node.
pub struct ReactorShared {
    pub mailbox: Mailbox,
    pub metrics: Arc<ReactorMetrics>,
    pub accepting: AtomicBool,
    /// The Redis link of this reactor is up; only reactor 0, the node's Redis reactor, has one.
    pub redis_up: AtomicBool,
}

/// Node-wide state.
pub struct Shared {
    pub config: Config,
    pub reactors: Vec<ReactorShared>,
    pub draining: AtomicBool,
    /// Open WebSockets on the node, for `--max-connections`.
    pub open_ws: AtomicUsize,
    /// The Redis seed addresses (one with `--redis`), resolved by the supervisor.
    redis_addrs: Mutex<Vec<SocketAddr>>,
    /// Open WebSockets per user (token `sub`), for `--max-connections-per-user`; only kept when
    /// that limit is set, and only touched when a WebSocket opens or closes.
    per_user: Mutex<HashMap<Box<str>, usize>>,
    /// When a failed name resolution was last logged at warn level.
    resolve_warned: Mutex<Option<Instant>>,
    /// TLS client configuration for `rediss://` links (trusted roots: the system's plus
    /// `--redis-ca-file`), built once at start; `None` when no Redis URL uses TLS.
    pub redis_tls: Option<Arc<rustls::ClientConfig>>,
    /// This node's id, random at start: the server API reports it, and a disconnect it sends
    /// through Redis names it so the node does not act on its own message twice.
    pub node_id: String,
    /// When the node started, for the server API's uptime.
    pub started: Instant,
    /// The server API's queue (`--api-listen`): what reactors answer it.
    pub api: Option<ApiMailbox>,
    /// Channel history of a standalone node (with Redis, history lives in Redis).
    pub history: Mutex<History>,
    /// Presence: every member of a standalone node, or this node's members and the changes
    /// its Redis reactor has yet to send (`broker::presence`).
    pub presence: crate::broker::presence::Store,
}

impl Shared {
    pub fn new(config: Config, reactors: Vec<ReactorShared>) -> Shared {
        // A literal IP needs no resolution: reactors can connect before the supervisor runs.
        let literal = config
            .redis_urls()
            .filter_map(|u| {
                u.host
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, u.port))
            })
            .collect();
        let history = Mutex::new(History::new(config.history_max_bytes));
        let presence = crate::broker::presence::Store::new(config.uses_redis());
        Shared {
            config,
            reactors,
            draining: AtomicBool::new(false),
            open_ws: AtomicUsize::new(0),
            redis_addrs: Mutex::new(literal),
            per_user: Mutex::new(HashMap::new()),
            resolve_warned: Mutex::new(None),
            redis_tls: None,
            node_id: random_id(),
            started: Instant::now(),
            api: None,
            history,
            presence,
        }
    }

    /// Hands an answer to the server API's thread (dropped when the node has no API).
    pub fn api_reply(&self, reply: ApiReply) {
        if let Some(api) = &self.api {
            api.reply(reply);
        }
    }

    /// "embedded", "redis" or "redis-cluster": how the node shares channels.
    pub fn broker_kind(&self) -> &'static str {
        if !self.config.redis_cluster.is_empty() {
            "redis-cluster"
        } else if self.config.redis.is_some() {
            "redis"
        } else {
            "embedded"
        }
    }

    /// `Ok` when the node should get traffic; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        for (i, r) in self.reactors.iter().enumerate() {
            if !r.accepting.load(Ordering::Acquire) {
                return Err(format!("reactor {i} is not accepting"));
            }
        }
        if !self.redis_link_up() {
            return Err("the node's redis link is down".into());
        }
        Ok(())
    }

    /// What `channel`'s namespace keeps, when it keeps history (never for the nodes' own
    /// channels, whatever a catch-all namespace says: they are plain PUBLISHes).
    pub fn history_of(&self, channel: &[u8]) -> Option<Keep> {
        if control::is_reserved(channel) {
            return None;
        }
        let ns = self
            .config
            .namespace_for(std::str::from_utf8(channel).ok()?);
        (ns.history_size > 0).then_some(Keep {
            size: ns.history_size,
            ttl: ns.history_ttl,
        })
    }

    /// Standalone: appends `msg` to its channel's history and hands it to every reactor under
    /// the store's lock, so every reactor sees the channel's messages in offset order (and a
    /// subscriber's history read falls between two of them: see `reactor::history`). A full
    /// queue drops the message for that reactor and counts it; with `strict` (the server API,
    /// which tells its caller) nothing is counted and the reactors whose queue was full are
    /// returned.
    pub fn publish_kept(
        &self,
        mut msg: Message,
        keep: Keep,
        now: Instant,
        strict: bool,
    ) -> Vec<usize> {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.append(&mut msg, keep.size, keep.ttl, now);
        let mut full = Vec::new();
        for (i, reactor) in self.reactors.iter().enumerate() {
            if !strict {
                reactor.mailbox.deliver(msg.clone());
            } else if reactor.mailbox.try_deliver(msg.clone()).is_err() {
                full.push(i);
            }
        }
        full
    }

    pub fn render_metrics(&self) -> String {
        let all: Vec<&ReactorMetrics> = self.reactors.iter().map(|r| &*r.metrics).collect();
        let mut text = metrics::render(
            &all,
            if !self.config.redis_cluster.is_empty() {
                metrics::RedisKind::Cluster
            } else if self.config.redis.is_some() {
                metrics::RedisKind::Single
            } else {
                metrics::RedisKind::None
            },
            self.draining.load(Ordering::Acquire),
        );
        if let Some(api) = &self.api {
            metrics::render_api(&mut text, &api.metrics);
        }
        if !self.config.uses_redis() {
            let s = self
                .history
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stats();
            text.push_str(&metrics::render_history(
                s.bytes, s.messages, s.channels, s.evicted,
            ));
        }
        text
    }

    /// The Redis addresses the supervisor last resolved, in the order given (a lock taken only
    /// when a link is about to connect).
    pub fn redis_seed_addrs(&self) -> Vec<SocketAddr> {
        self.redis_addrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Resolves the Redis hosts (blocking DNS: only ever called by the supervisor thread). A
    /// host that does not resolve keeps its last address.
    pub fn resolve_redis(&self) {
        let mut resolved = Vec::new();
        for url in self.config.redis_urls() {
            match (url.host.as_str(), url.port).to_socket_addrs() {
                Ok(mut addrs) => resolved.extend(addrs.next()),
                Err(e) => {
                    // Once, then every 30 s while it lasts: the supervisor retries every second.
                    let mut warned = self
                        .resolve_warned
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(30)) {
                        log::warn!("redis: cannot resolve {}: {e}", url.host);
                        *warned = Some(Instant::now());
                    } else {
                        log::debug!("redis: cannot resolve {}: {e}", url.host);
                    }
                }
            }
        }
        if !resolved.is_empty() {
            *self.redis_addrs.lock().unwrap_or_else(|e| e.into_inner()) = resolved;
        }
    }

    /// Whether the node's Redis link is up (always, without `--redis`). Only the Redis reactor,
    /// reactor 0, holds a link and sets its `redis_up`.
    pub fn redis_link_up(&self) -> bool {
        !self.config.uses_redis()
            || self
                .reactors
                .first()
                .is_some_and(|r| r.redis_up.load(Ordering::Acquire))
    }

    /// Whether the node's Redis link is down (the supervisor then re-resolves the address).
    pub fn redis_down(&self) -> bool {
        !self.redis_link_up()
    }

    /// Counts a new WebSocket of `user` against `--max-connections-per-user`; `false` (and not
    /// counted) when the user already holds that many.
    pub fn admit_user(&self, user: &str) -> bool {
        let max = self.config.auth.max_per_user;
        if max == 0 {
            return true;
        }
        let mut users = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let held = users.entry(user.into()).or_default();
        if *held >= max {
            return false;
        }
        *held += 1;
        true
    }

    /// A WebSocket of `user` closed.
    pub fn release_user(&self, user: &str) {
        if self.config.auth.max_per_user == 0 {
            return;
        }
        let mut users = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = users.get_mut(user) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                users.remove(user);
            }
        }
    }

    /// Asks every reactor to stop accepting and close its clients, spread over `drain_time`.
    pub fn drain(&self, drain_time: Duration) {
        self.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + drain_time;
        for r in &self.reactors {
            r.mailbox.control(Control::Drain { deadline });
        }
    }
}

/// 64 random bits as 16 hex digits. The standard library's hasher keys are drawn from the
/// operating system's random source once per process; the time and the process id are mixed in
/// for good measure. Not a secret, only unique per node.
fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}
