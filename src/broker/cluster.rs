//! The node's links to a Redis Cluster (`--redis-cluster`): one sharded [`RedisLink`] per master
//! that owns slots, the map of which master owns each slot, and where each channel the node
//! wants is subscribed.
//!
//! A channel is SSUBSCRIBEd once per node on the master owning its slot, and published with
//! SPUBLISH there, so adding shards adds capacity (a classic PUBLISH is broadcast to every
//! cluster node). The map comes from `CLUSTER SHARDS`, asked over any link that is up, and is
//! asked again when the cluster shows it changed: a `MOVED` reply (the publish is sent again to
//! the master it names), a `sunsubscribe` nobody asked for (a slot migrated), a master's link
//! going down (a replica is being promoted), and every [`REFRESH_EVERY`] in any case (shards
//! added). A channel whose subscription was lost is reported as [`RedisEvent::Lost`] and
//! subscribed again as soon as its slot's owner is reachable. What is published to a shard that
//! cannot be reached is lost (at most once), and the publisher is told.
//!
//! Like the single link, this lives on the node's Redis reactor and never blocks: seed host
//! names are resolved by the supervisor thread, shard addresses are the IPs the cluster announces.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::{Registry, Token};
use slab::Slab;

use super::redis::{is_redirect, Ack, RedisEvent, RedisLink, Refused};
use super::slots::{self, key_slot, SLOTS};
use crate::config::RedisUrl;

/// The map is asked for again this often even when nothing suggests it changed.
const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// While a slot's owner is unreachable or a channel waits for a home, how often to ask.
const REFRESH_SOON: Duration = Duration::from_millis(250);
/// With every link down this long, connect to a seed again (the cluster may have come back
/// on other addresses, as pods do).
const RESEED_AFTER: Duration = Duration::from_secs(3);
/// Most links one node keeps (a cluster has at most about a thousand masters).
pub const MAX_LINKS: usize = 4096;
const NO_OWNER: u32 = u32::MAX;

struct Shard {
    addr: SocketAddr,
    link: RedisLink,
    /// Owns slots in the current map (a seed link used only to learn the map does not).
    owns_slots: bool,
}

pub struct RedisCluster {
    /// Credentials and TLS for every shard; the first seed's.
    template: RedisUrl,
    prefix: Bytes,
    /// Link `k` uses token `token_base - k`.
    token_base: usize,
    reactor: usize,
    /// TLS for `rediss://` seeds: every shard is reached the same way.
    tls: Option<Arc<rustls::ClientConfig>>,
    links: Slab<Shard>,
    /// Slot -> key of the link to its master, or [`NO_OWNER`].
    owner: Vec<u32>,
    /// Channels the node wants (local names) -> the link they were SSUBSCRIBEd on, if any.
    wanted: HashMap<Bytes, Option<usize>>,
    /// Wanted channels not subscribed anywhere at the moment.
    unplaced: usize,
    known: bool,
    /// A map without any slot was logged (once until a real map comes).
    empty_map_logged: bool,
    refresh_at: Option<Instant>,
    next_periodic: Instant,
    /// Since when no link has been up.
    all_down_since: Option<Instant>,
    next_seed: usize,
    /// Reconnects of links that were removed since (the metric never goes backwards).
    removed_reconnects: u64,
    pub moved: u64,
    pub refreshes: u64,
    pub events: VecDeque<RedisEvent>,
}

impl RedisCluster {
    pub fn new(
        seeds: &[RedisUrl],
        prefix: &str,
        token_base: Token,
        reactor: usize,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        let template = seeds.first().cloned().unwrap_or(RedisUrl {
            host: "127.0.0.1".into(),
            port: 6379,
            username: None,
            password: None,
            db: 0,
            tls: false,
        });
        let now = Instant::now();
        RedisCluster {
            template,
            prefix: Bytes::copy_from_slice(prefix.as_bytes()),
            token_base: token_base.0,
            reactor,
            tls,
            links: Slab::new(),
            owner: vec![NO_OWNER; SLOTS],
            wanted: HashMap::new(),
            unplaced: 0,
            known: false,
            empty_map_logged: false,
            refresh_at: Some(now),
            next_periodic: now + REFRESH_EVERY,
            all_down_since: Some(now),
            next_seed: 0,
            removed_reconnects: 0,
            moved: 0,
            refreshes: 0,
            events: VecDeque::new(),
        }
    }

    /// The link key a token belongs to, if it is one of ours.
    fn key_of(&self, token: Token) -> Option<usize> {
        let k = self.token_base.checked_sub(token.0)?;
        (k < MAX_LINKS && self.links.contains(k)).then_some(k)
    }

    pub fn owns(&self, token: Token) -> bool {
        self.token_base
            .checked_sub(token.0)
            .is_some_and(|k| k < MAX_LINKS)
    }

    /// The map is known and some master that owns slots is reachable.
    pub fn ready(&self) -> bool {
        self.known
            && self
                .links
                .iter()
                .any(|(_, s)| s.owns_slots && s.link.is_up())
    }

    /// The map is known and the master of every slot in it is reachable.
    pub fn is_up(&self) -> bool {
        self.known
            && self.links.iter().any(|(_, s)| s.owns_slots)
            && self
                .links
                .iter()
                .all(|(_, s)| !s.owns_slots || s.link.is_up())
    }

    /// Links to masters that own slots, and how many of them are up.
    pub fn links(&self) -> (u64, u64) {
        let owning = self.links.iter().filter(|(_, s)| s.owns_slots);
        let up = owning.clone().filter(|(_, s)| s.link.is_up()).count();
        (owning.count() as u64, up as u64)
    }

    pub fn shards(&self) -> u64 {
        self.links().0
    }

    pub fn reconnects(&self) -> u64 {
        self.removed_reconnects
            + self
                .links
                .iter()
                .map(|(_, s)| s.link.reconnects())
                .sum::<u64>()
    }

    pub fn read_again(&self) -> bool {
        self.links.iter().any(|(_, s)| s.link.read_again)
    }

    /// The slot of a channel's Redis name (prefix + name), on every publish: built on the stack
    /// (a prefix is at most 64 bytes, a channel name 128), so routing allocates nothing.
    fn slot_of(&self, channel: &[u8]) -> u16 {
        let len = self.prefix.len() + channel.len();
        let mut stack = [0u8; 256];
        if len > stack.len() {
            return key_slot(&[&self.prefix[..], channel].concat());
        }
        stack[..self.prefix.len()].copy_from_slice(&self.prefix);
        stack[self.prefix.len()..len].copy_from_slice(channel);
        key_slot(&stack[..len])
    }

    fn owner_of(&self, channel: &[u8]) -> Option<usize> {
        let k = self.owner[usize::from(self.slot_of(channel))];
        (k != NO_OWNER).then_some(k as usize)
    }

    /// Whether a SSUBSCRIBE of `channel` can be made now (its slot's master is reachable).
    pub fn can_subscribe(&self, channel: &[u8]) -> bool {
        self.owner_of(channel)
            .and_then(|k| self.links.get(k))
            .is_some_and(|s| s.link.is_up())
    }

    pub fn on_ready(
        &mut self,
        token: Token,
        registry: &Registry,
        now: Instant,
        writable: bool,
        readable: bool,
    ) {
        let Some(k) = self.key_of(token) else { return };
        if let Some(shard) = self.links.get_mut(k) {
            shard.link.on_ready(registry, now, writable, readable);
        }
        self.pump(k, registry, now);
    }

    /// Reads the links whose read budget ran out last turn.
    pub fn continue_reads(&mut self, registry: &Registry, now: Instant) {
        let keys: Vec<usize> = self
            .links
            .iter()
            .filter(|(_, s)| s.link.read_again)
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            if let Some(shard) = self.links.get_mut(k) {
                shard.link.on_ready(registry, now, false, false);
            }
            self.pump(k, registry, now);
        }
    }

    /// Timers: every link's own (connect, ping, reply timeout), a seed link when there is
    /// nothing else to learn the map from, and asking for the map when due.
    pub fn tick(
        &mut self,
        now: Instant,
        registry: &Registry,
        seeds: impl FnOnce() -> Vec<SocketAddr>,
    ) {
        let any_up = self.links.iter().any(|(_, s)| s.link.is_up());
        if any_up {
            self.all_down_since = None;
        } else {
            let since = *self.all_down_since.get_or_insert(now);
            let seeding = self.links.iter().any(|(_, s)| !s.owns_slots);
            if self.links.is_empty() || (!seeding && now.duration_since(since) >= RESEED_AFTER) {
                let seeds = seeds();
                if !seeds.is_empty() {
                    let addr = seeds[self.next_seed % seeds.len()];
                    self.next_seed = self.next_seed.wrapping_add(1);
                    if self.link_for(addr).is_none() {
                        log::debug!("redis cluster: learning the shards from seed {addr}");
                        self.add_link(addr, false);
                    }
                    self.all_down_since = Some(now);
                }
            }
        }
        let keys: Vec<usize> = self.links.iter().map(|(k, _)| k).collect();
        for k in keys {
            if let Some(shard) = self.links.get_mut(k) {
                let addr = shard.addr;
                shard.link.tick(now, registry, || Some(addr));
            }
            self.pump(k, registry, now);
        }
        if now >= self.next_periodic {
            self.refresh_at.get_or_insert(now);
        }
        if self.refresh_at.is_some_and(|t| now >= t) {
            self.request_topology(registry, now);
        }
    }

    fn request_topology(&mut self, registry: &Registry, now: Instant) {
        if self.links.iter().any(|(_, s)| s.link.topology_pending()) {
            return;
        }
        // Prefer a master that owns slots: a seed may be a replica that lags behind.
        let mut candidates: Vec<(bool, usize)> = self
            .links
            .iter()
            .filter(|(_, s)| s.link.is_up())
            .map(|(k, s)| (!s.owns_slots, k))
            .collect();
        candidates.sort_unstable();
        for (_, k) in candidates {
            let asked = self
                .links
                .get_mut(k)
                .is_some_and(|s| s.link.request_topology(registry, now));
            if asked {
                self.refresh_at = None;
                self.next_periodic = now + REFRESH_EVERY;
                return;
            }
        }
    }

    fn refresh_soon(&mut self, now: Instant) {
        let at = now + REFRESH_SOON;
        if self.refresh_at.is_none_or(|t| t > at) {
            self.refresh_at = Some(at);
        }
    }

    fn link_for(&self, addr: SocketAddr) -> Option<usize> {
        self.links
            .iter()
            .find(|(_, s)| s.addr == addr)
            .map(|(k, _)| k)
    }

    fn add_link(&mut self, addr: SocketAddr, owns_slots: bool) -> Option<usize> {
        if self.links.len() >= MAX_LINKS {
            log::warn!("redis cluster: more than {MAX_LINKS} shards; not connecting to {addr}");
            return None;
        }
        let mut url = self.template.clone();
        url.host = addr.ip().to_string();
        url.port = addr.port();
        let entry = self.links.vacant_entry();
        let token = Token(self.token_base - entry.key());
        let prefix = String::from_utf8_lossy(&self.prefix);
        let link = RedisLink::new(url, &prefix, token, self.reactor, self.tls.clone()).sharded();
        let key = entry.key();
        entry.insert(Shard {
            addr,
            link,
            owns_slots,
        });
        Some(key)
    }

    /// Handles what link `k` reported.
    fn pump(&mut self, k: usize, registry: &Registry, now: Instant) {
        // Bounded: a link's events come from what it read this turn.
        while let Some(event) = self
            .links
            .get_mut(k)
            .and_then(|s| s.link.events.pop_front())
        {
            match event {
                RedisEvent::Up => {
                    self.all_down_since = None;
                    let seed = self.links.get(k).is_some_and(|s| !s.owns_slots);
                    if !self.known || seed {
                        self.refresh_at = Some(now);
                        self.request_topology(registry, now);
                    }
                    self.place_unplaced(registry, now);
                }
                RedisEvent::Down => {
                    self.unplace_link(k);
                    // A master gone: its replica takes over within the cluster's node timeout.
                    self.refresh_soon(now);
                }
                RedisEvent::Subscribed { channel } => {
                    if self.wanted.get(&channel) == Some(&Some(k)) {
                        self.events.push_back(RedisEvent::Subscribed { channel });
                    }
                }
                RedisEvent::SubscribeRefused { channel, error } if is_redirect(&error) => {
                    if let Some((slot, addr)) = slots::parse_moved(&error) {
                        self.redirect(slot, addr);
                    }
                    self.unplace(&channel, k);
                    self.place_unplaced(registry, now);
                    self.refresh_soon(now);
                }
                RedisEvent::SubscribeRefused { channel, error } => {
                    if self.wanted.get(&channel) == Some(&Some(k)) {
                        self.events
                            .push_back(RedisEvent::SubscribeRefused { channel, error });
                    }
                }
                RedisEvent::Migrated { channel } => {
                    // Subscribing again on the same master is answered MOVED with the new
                    // owner: the fastest way to learn it.
                    self.unplace(&channel, k);
                    if self.wanted.contains_key(&channel) {
                        self.place(&channel, Some(k), registry, now);
                    }
                    self.refresh_soon(now);
                }
                RedisEvent::Moved {
                    slot,
                    addr,
                    channel,
                    payload,
                    ack,
                } => {
                    self.moved += 1;
                    self.redirect(slot, addr);
                    self.refresh_soon(now);
                    if let Err((refused, ack)) = self.publish(&channel, payload, ack, registry, now)
                    {
                        self.refused(refused, ack);
                    }
                }
                RedisEvent::Topology(Ok(reply)) => {
                    let Some(answered_by) = self.links.get(k).map(|s| s.addr.ip()) else {
                        continue;
                    };
                    match slots::parse_shards(&reply, self.template.tls, answered_by) {
                        Ok(shards) => self.apply(shards, registry, now),
                        Err(e) => {
                            log::warn!("redis cluster: {e}");
                            self.refresh_soon(now);
                        }
                    }
                }
                RedisEvent::Topology(Err(e)) => {
                    log::warn!("redis cluster: CLUSTER SHARDS refused: {e}");
                    self.refresh_soon(now);
                }
                RedisEvent::Reply {
                    tag,
                    result: Err(e),
                } if is_redirect(&e) => {
                    // A call is not resent (its caller holds no copy to resend): it fails, and
                    // the map is mended so the next one goes to the right master.
                    if let Some((slot, addr)) = slots::parse_moved(&e) {
                        self.moved += 1;
                        self.redirect(slot, addr);
                    }
                    self.refresh_soon(now);
                    let result = Err(format!("the slot is moving, try again ({e})"));
                    self.events.push_back(RedisEvent::Reply { tag, result });
                }
                other @ (RedisEvent::Message { .. }
                | RedisEvent::Published { .. }
                | RedisEvent::Reply { .. }) => self.events.push_back(other),
                RedisEvent::Lost { .. } => {}
            }
        }
    }

    /// A publish that could not be resent after a redirect: tell the publisher, as a link does.
    fn refused(&mut self, refused: Refused, ack: Option<Ack>) {
        if let Some(ack) = ack {
            let result = Err(refused.message().to_string());
            self.events.push_back(RedisEvent::Published { ack, result });
        }
    }

    /// `MOVED slot addr`: the slot's master is `addr` from now on (until the next map).
    fn redirect(&mut self, slot: u16, addr: SocketAddr) {
        let k = match self.link_for(addr) {
            Some(k) => Some(k),
            None => self.add_link(addr, true),
        };
        if let Some((k, shard)) = k.and_then(|k| Some((k, self.links.get_mut(k)?))) {
            shard.owns_slots = true;
            self.owner[usize::from(slot)] = k as u32;
        }
    }

    /// A new map of the cluster: links to new masters, none to old ones, every wanted channel
    /// subscribed where its slot lives now.
    fn apply(&mut self, shards: Vec<slots::ShardInfo>, registry: &Registry, now: Instant) {
        self.refreshes += 1;
        if shards.is_empty() {
            // A cluster not formed yet (or every master failed): keep the links and ask again,
            // rather than drop them and reconnect to the seeds in a loop.
            if !self.empty_map_logged {
                log::warn!("redis cluster: no master serves any slot yet; asking again");
                self.empty_map_logged = true;
            }
            self.refresh_soon(now);
            return;
        }
        self.empty_map_logged = false;
        self.known = true;
        let mut owner = vec![NO_OWNER; SLOTS];
        let mut keep = Vec::new();
        for shard in &shards {
            let k = match self.link_for(shard.addr) {
                Some(k) => Some(k),
                None => {
                    log::info!("redis cluster: new shard master {}", shard.addr);
                    self.add_link(shard.addr, true)
                }
            };
            let Some(k) = k else { continue };
            keep.push(k);
            for &(start, end) in &shard.slots {
                owner[usize::from(start)..=usize::from(end)].fill(k as u32);
            }
        }
        self.owner = owner;
        let gone: Vec<usize> = self
            .links
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !keep.contains(k))
            .collect();
        for (k, shard) in self.links.iter_mut() {
            shard.owns_slots = keep.contains(&k);
        }
        // Channels whose slot now lives elsewhere leave their old master.
        let moved: Vec<(Bytes, usize)> = self
            .wanted
            .iter()
            .filter_map(|(c, at)| at.map(|k| (c.clone(), k)))
            .filter(|(c, k)| self.owner_of(c) != Some(*k))
            .collect();
        for (channel, k) in moved {
            if let Some(shard) = self.links.get_mut(k) {
                shard
                    .link
                    .set_interest(false, std::iter::once(&channel), registry, now);
            }
            self.unplace(&channel, k);
        }
        for k in gone {
            let Some(shard) = self.links.get_mut(k) else {
                continue;
            };
            log::info!(
                "redis cluster: {} no longer owns slots; closing its link",
                shard.addr
            );
            shard
                .link
                .close(registry, now, "no longer a master owning slots");
            self.pump(k, registry, now);
            if let Some(shard) = self.links.try_remove(k) {
                self.removed_reconnects += shard.link.reconnects();
            }
        }
        self.place_unplaced(registry, now);
        if self.unplaced > 0 || !self.is_up() {
            self.refresh_soon(now);
        }
    }

    /// Every channel placed on link `k` lost its subscription (the link went down).
    fn unplace_link(&mut self, k: usize) {
        let mut lost = Vec::new();
        for (channel, at) in self.wanted.iter_mut() {
            if *at == Some(k) {
                *at = None;
                lost.push(channel.clone());
            }
        }
        self.unplaced += lost.len();
        if !lost.is_empty() {
            self.events.push_back(RedisEvent::Lost { channels: lost });
        }
    }

    fn unplace(&mut self, channel: &Bytes, k: usize) {
        if let Some(at) = self.wanted.get_mut(channel) {
            if *at == Some(k) {
                *at = None;
                self.unplaced += 1;
                self.events.push_back(RedisEvent::Lost {
                    channels: vec![channel.clone()],
                });
            }
        }
    }

    /// SSUBSCRIBEs a wanted, unplaced channel on `at` (or its slot's owner), if that link is up.
    fn place(&mut self, channel: &Bytes, at: Option<usize>, registry: &Registry, now: Instant) {
        let Some(k) = at.or_else(|| self.owner_of(channel)) else {
            return;
        };
        let Some(shard) = self.links.get_mut(k) else {
            return;
        };
        if !shard.link.is_up() {
            return;
        }
        if let Some(slot @ None) = self.wanted.get_mut(channel) {
            *slot = Some(k);
            self.unplaced -= 1;
            shard
                .link
                .set_interest(true, std::iter::once(channel), registry, now);
        }
    }

    fn place_unplaced(&mut self, registry: &Registry, now: Instant) {
        if self.unplaced == 0 {
            return;
        }
        let waiting: Vec<Bytes> = self
            .wanted
            .iter()
            .filter(|(_, at)| at.is_none())
            .map(|(c, _)| c.clone())
            .collect();
        for channel in waiting {
            self.place(&channel, None, registry, now);
        }
    }

    /// SSUBSCRIBE (or SUNSUBSCRIBE) channels on the masters owning them. A channel whose master
    /// is not reachable yet is subscribed when it is.
    pub fn set_interest<'a>(
        &mut self,
        subscribe: bool,
        channels: impl Iterator<Item = &'a Bytes>,
        registry: &Registry,
        now: Instant,
    ) {
        for channel in channels {
            if subscribe {
                if self.wanted.contains_key(channel) {
                    continue;
                }
                self.wanted.insert(channel.clone(), None);
                self.unplaced += 1;
                self.place(channel, None, registry, now);
            } else {
                match self.wanted.remove(channel) {
                    Some(Some(k)) => {
                        if let Some(shard) = self.links.get_mut(k) {
                            shard
                                .link
                                .set_interest(false, std::iter::once(channel), registry, now);
                        }
                    }
                    Some(None) => self.unplaced -= 1,
                    None => {}
                }
            }
        }
        if self.unplaced > 0 {
            self.refresh_soon(now);
        }
    }

    /// SPUBLISH on the master owning the channel's slot.
    pub fn publish(
        &mut self,
        channel: &[u8],
        payload: Bytes,
        ack: Option<Ack>,
        registry: &Registry,
        now: Instant,
    ) -> Result<(), (Refused, Option<Ack>)> {
        let Some(shard) = self.owner_of(channel).and_then(|k| self.links.get_mut(k)) else {
            return Err((Refused::Down, ack));
        };
        shard.link.publish(channel, payload, ack, registry, now)
    }

    /// Sends a command to the master owning `channel`'s slot (its keys must share that slot:
    /// [`crate::broker::slots::key_beside`]); see [`RedisLink::call`]. A `MOVED` comes back as
    /// the reply's error and makes the map be read again.
    pub fn call(
        &mut self,
        channel: &[u8],
        args: impl Iterator<Item = Bytes>,
        tag: u64,
        registry: &Registry,
        now: Instant,
    ) -> Result<(), Refused> {
        let Some(shard) = self.owner_of(channel).and_then(|k| self.links.get_mut(k)) else {
            self.refresh_soon(now);
            return Err(Refused::Down);
        };
        shard.link.call(args, tag, registry, now)
    }

    /// The Redis name of a fanout channel (the prefix added).
    pub fn redis_name(&self, channel: &[u8]) -> Bytes {
        super::redis::prefixed(&self.prefix, channel)
    }
}
