//! What the node's Redis reactor talks to: one Redis server (`--redis`, a [`RedisLink`]) or a
//! Redis Cluster (`--redis-cluster`, a [`RedisCluster`] with a link per shard). Both take the
//! same requests and report the same [`RedisEvent`]s, so the node's channel table
//! (`reactor::hub`) does not care which it has.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use mio::{Registry, Token};

use super::cluster::RedisCluster;
use super::redis::{Ack, RedisEvent, RedisLink, Refused};

pub enum Upstream {
    Single(RedisLink),
    Cluster(RedisCluster),
}

/// Gauges the Redis reactor publishes as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkCounts {
    /// Links the node keeps (one, or one per shard master).
    pub wanted: u64,
    pub up: u64,
    pub reconnects: u64,
    /// Cluster only: shards in the map, MOVED replies followed, maps read.
    pub shards: u64,
    pub moved: u64,
    pub refreshes: u64,
}

impl Upstream {
    /// Whether readiness of `token` is for one of the upstream's sockets.
    pub fn owns(&self, token: Token, single: Token) -> bool {
        match self {
            Upstream::Single(_) => token == single,
            Upstream::Cluster(c) => c.owns(token),
        }
    }

    pub fn on_ready(
        &mut self,
        token: Token,
        registry: &Registry,
        now: Instant,
        writable: bool,
        readable: bool,
    ) {
        match self {
            Upstream::Single(link) => link.on_ready(registry, now, writable, readable),
            Upstream::Cluster(c) => c.on_ready(token, registry, now, writable, readable),
        }
    }

    /// A read budget ran out last turn: there is more to read without waiting for readiness.
    pub fn read_again(&self) -> bool {
        match self {
            Upstream::Single(link) => link.read_again,
            Upstream::Cluster(c) => c.read_again(),
        }
    }

    pub fn continue_reads(&mut self, registry: &Registry, now: Instant) {
        match self {
            Upstream::Single(link) => link.on_ready(registry, now, false, false),
            Upstream::Cluster(c) => c.continue_reads(registry, now),
        }
    }

    /// Timers; `seeds` gives the addresses the supervisor resolved (the `--redis` host, or the
    /// `--redis-cluster` seeds), called only when a connection is about to be made.
    pub fn tick(
        &mut self,
        now: Instant,
        registry: &Registry,
        seeds: impl FnOnce() -> Vec<SocketAddr>,
    ) {
        match self {
            Upstream::Single(link) => {
                link.tick(now, registry, || seeds().first().copied());
            }
            Upstream::Cluster(c) => c.tick(now, registry, seeds),
        }
    }

    /// Whether the node is ready as far as Redis goes: its link is up; with a cluster, the map
    /// is known and some shard is reachable. One shard failing over is a partial outage the
    /// metrics show (`fanout_redis_links_up`), not a reason to take every node out of service.
    pub fn ready(&self) -> bool {
        match self {
            Upstream::Single(link) => link.is_up(),
            Upstream::Cluster(c) => c.ready(),
        }
    }

    /// Whether a subscription of `channel` can be made now.
    pub fn can_subscribe(&self, channel: &[u8]) -> bool {
        match self {
            Upstream::Single(link) => link.is_up(),
            Upstream::Cluster(c) => c.can_subscribe(channel),
        }
    }

    pub fn counts(&self) -> LinkCounts {
        match self {
            Upstream::Single(link) => LinkCounts {
                wanted: 1,
                up: link.is_up() as u64,
                reconnects: link.reconnects(),
                ..LinkCounts::default()
            },
            Upstream::Cluster(c) => {
                let (wanted, up) = c.links();
                LinkCounts {
                    wanted,
                    up,
                    reconnects: c.reconnects(),
                    shards: c.shards(),
                    moved: c.moved,
                    refreshes: c.refreshes,
                }
            }
        }
    }

    pub fn publish(
        &mut self,
        channel: &[u8],
        payload: Bytes,
        ack: Option<Ack>,
        registry: &Registry,
        now: Instant,
    ) -> Result<(), (Refused, Option<Ack>)> {
        match self {
            Upstream::Single(link) => link.publish(channel, payload, ack, registry, now),
            Upstream::Cluster(c) => c.publish(channel, payload, ack, registry, now),
        }
    }

    /// Subscribes (or unsubscribes) channels. A single link ignores this while down (it is told
    /// everything again on `Up`); a cluster remembers and subscribes when the shard is reachable.
    pub fn set_interest<'a>(
        &mut self,
        subscribe: bool,
        channels: impl Iterator<Item = &'a Bytes>,
        registry: &Registry,
        now: Instant,
    ) {
        match self {
            Upstream::Single(link) => link.set_interest(subscribe, channels, registry, now),
            Upstream::Cluster(c) => c.set_interest(subscribe, channels, registry, now),
        }
    }

    /// Sends any command; its reply comes back as [`RedisEvent::Reply`] with `tag`. `channel`
    /// routes it in a cluster: every key in `args` must share that channel's slot.
    pub fn call(
        &mut self,
        channel: &[u8],
        args: impl Iterator<Item = Bytes>,
        tag: u64,
        registry: &Registry,
        now: Instant,
    ) -> Result<(), Refused> {
        match self {
            Upstream::Single(link) => link.call(args, tag, registry, now),
            Upstream::Cluster(c) => c.call(channel, args, tag, registry, now),
        }
    }

    /// The Redis name of a fanout channel (the `--redis-prefix` added).
    pub fn redis_name(&self, channel: &[u8]) -> Bytes {
        match self {
            Upstream::Single(link) => link.redis_name(channel),
            Upstream::Cluster(c) => c.redis_name(channel),
        }
    }

    /// Whether this is a Redis Cluster (sharded Pub/Sub: SPUBLISH).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Upstream::Cluster(_))
    }

    pub fn next_event(&mut self) -> Option<RedisEvent> {
        match self {
            Upstream::Single(link) => link.events.pop_front(),
            Upstream::Cluster(c) => c.events.pop_front(),
        }
    }
}
