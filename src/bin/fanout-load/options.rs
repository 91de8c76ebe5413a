//! Command-line options, shared verbatim with the worker processes (serialized as JSON).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::client::{min_payload_size, PayloadKind};

/// Connections one worker process opens at most, below the 20000 open-file limit with room for
/// the process's own descriptors.
pub const CONNECTIONS_PER_PROC: usize = 15000;

#[derive(ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Hold N connections; report the server's RSS per connection.
    Idle,
    /// N subscribers on one channel, the first K of them also publish.
    Broadcast,
    /// N clients in R channels (client i in room i mod R), every client publishes.
    Rooms,
    /// Connect, upgrade and close as many times per second as --rate allows.
    Churn,
}

/// Drives a running fanout-compatible server (raw mode) over real sockets and reports
/// throughput, latency, losses and the server's CPU and memory.
///
/// Output: a human-readable table, then one line `RESULT {json}` with every figure.
#[derive(Parser, Serialize, Deserialize, Clone, Debug)]
#[command(name = "fanout-load", version)]
pub struct Options {
    /// What to run.
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// Server base URL `ws://HOST:PORT[/PATH]` (default path /ws); `?channel=` is added. Repeat
    /// to spread connections round-robin over several nodes.
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/ws")]
    pub urls: Vec<String>,

    /// Connections to open (for churn: connections in flight at most, over all processes).
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: usize,

    /// Worker processes; 0 picks ceil(connections / 15000).
    #[arg(long, default_value_t = 0)]
    pub procs: usize,

    /// Seconds of publishing (broadcast, rooms), holding (idle) or churning.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// broadcast: how many of the N connections publish.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,

    /// Total messages per second over all publishers (churn: connections per second). 0 means
    /// as fast as possible: each publisher keeps --window messages in flight (it waits for its own
    /// message to come back), churn keeps -n handshakes in flight.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// With --rate 0, messages each publisher may have in flight.
    #[arg(long, default_value_t = 16)]
    pub window: usize,

    /// Payload bytes per message (filler: at least 32, the send time and publisher id;
    /// chat-json: at least 128).
    #[arg(long, default_value_t = 64)]
    pub size: usize,

    /// What a message looks like: `filler` (the send time and publisher id, then dots) or
    /// `chat-json` (a chat message as JSON: the same stamps, a user, a room and a text of natural
    /// words; compresses like real chat, where filler would compress absurdly well).
    #[arg(long, value_enum, default_value_t = PayloadKind::Filler)]
    pub payload_kind: PayloadKind,

    /// Offer permessage-deflate (RFC 7692) in every upgrade and inflate compressed (RSV1)
    /// messages. Only receiving is compressed: publishers send plain frames. A server that
    /// declines leaves the connection uncompressed (the report counts how many negotiated it).
    #[arg(long)]
    pub compression: bool,

    /// A token (a JWT) sent with every connection's upgrade as `&token=TOKEN` in the query, for a
    /// server started with `--auth required`. URL-safe characters only (a JWT is).
    #[arg(long)]
    pub token: Option<String>,

    /// rooms: number of channels.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,

    /// Channel name (rooms: prefix, room r is NAME-r).
    #[arg(long, default_value = "load")]
    pub channel: String,

    /// PID of a server process to measure (RSS, CPU); repeat for several nodes.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,

    /// PID of a Redis server whose CPU time is reported separately; repeat for the shards of a
    /// Redis Cluster (each reported, and their sum).
    #[arg(long = "redis-pid")]
    pub redis_pids: Vec<u32>,

    /// Seconds to wait after the last upgrade before measuring RSS and starting.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,

    /// Seconds to wait for outstanding deliveries after publishing stops.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,

    /// Seconds allowed for opening all connections.
    #[arg(long, default_value_t = 120.0)]
    pub connect_timeout: f64,

    /// Handshakes in flight per worker process while connecting.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Source addresses 127.0.0.FIRST-LAST to bind before connecting to a loopback server
    /// (spreads ephemeral ports), or `none`.
    #[arg(long, default_value = "2-250")]
    pub source_range: String,
}

/// Where one URL points.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

impl Options {
    pub fn validate(&self) -> Result<()> {
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if !(self.duration > 0.0 && self.duration.is_finite()) {
            bail!("--duration must be a positive number of seconds");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("--rate must be 0 (as fast as possible) or a positive number");
        }
        let min = min_payload_size(self.payload_kind);
        if self.size < min {
            bail!(
                "--size {} is below the {min} bytes a {:?} payload needs for its stamps",
                self.size,
                self.payload_kind
            );
        }
        if self.scenario == Scenario::Broadcast
            && (self.publishers == 0 || self.publishers > self.connections)
        {
            bail!("--publishers must be between 1 and --connections");
        }
        if self.rooms == 0 {
            bail!("--rooms must be at least 1");
        }
        if self.window == 0 || self.connect_concurrency == 0 {
            bail!("--window and --connect-concurrency must be at least 1");
        }
        let channel_ok = |c: &str| {
            (1..=128).contains(&c.len())
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        };
        if !channel_ok(&self.channel) {
            bail!(
                "--channel {:?}: 1-128 bytes of A-Z a-z 0-9 _ . : -",
                self.channel
            );
        }
        if let Some(token) = &self.token {
            let url_safe = |b: u8| b.is_ascii_alphanumeric() || b"-_.~".contains(&b);
            if token.is_empty() || !token.bytes().all(url_safe) {
                bail!("--token: want URL-safe characters only (A-Z a-z 0-9 - _ . ~), as a JWT");
            }
        }
        self.targets()?;
        self.source_octets()?;
        Ok(())
    }

    pub fn procs(&self) -> usize {
        let wanted = if self.procs == 0 {
            self.connections.div_ceil(CONNECTIONS_PER_PROC)
        } else {
            self.procs
        };
        wanted.clamp(1, self.connections)
    }

    pub fn targets(&self) -> Result<Vec<Target>> {
        self.urls.iter().map(|u| parse_url(u)).collect()
    }

    /// Inclusive range of last octets, or `None` for no explicit bind.
    pub fn source_octets(&self) -> Result<Option<(u8, u8)>> {
        if self.source_range == "none" {
            return Ok(None);
        }
        let parsed = self.source_range.split_once('-').and_then(|(a, b)| {
            let (a, b) = (a.parse::<u8>().ok()?, b.parse::<u8>().ok()?);
            (1 <= a && a <= b && b < 255).then_some((a, b))
        });
        match parsed {
            Some(r) => Ok(Some(r)),
            None => bail!(
                "--source-range {:?}: want FIRST-LAST within 1-254, or none",
                self.source_range
            ),
        }
    }

    /// The channel connection `index` joins.
    pub fn channel_of(&self, index: usize) -> String {
        match self.scenario {
            Scenario::Rooms => format!("{}-{}", self.channel, self.room_of(index)),
            _ => self.channel.clone(),
        }
    }

    pub fn room_of(&self, index: usize) -> usize {
        match self.scenario {
            Scenario::Rooms => index % self.rooms,
            _ => 0,
        }
    }

    pub fn room_count(&self) -> usize {
        match self.scenario {
            Scenario::Rooms => self.rooms,
            _ => 1,
        }
    }

    pub fn is_publisher(&self, index: usize) -> bool {
        match self.scenario {
            Scenario::Broadcast => index < self.publishers,
            Scenario::Rooms => true,
            _ => false,
        }
    }

    /// Publishers over all processes.
    pub fn total_publishers(&self) -> usize {
        match self.scenario {
            Scenario::Broadcast => self.publishers,
            Scenario::Rooms => self.connections,
            _ => 0,
        }
    }
}

fn parse_url(url: &str) -> Result<Target> {
    let rest = url
        .strip_prefix("ws://")
        .with_context(|| format!("--url {url:?}: only ws:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/ws"),
    };
    if path.contains('?') || path.contains('#') {
        bail!("--url {url:?}: leave out the query; the tool adds ?channel=");
    }
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("--url {url:?}: cannot resolve {authority:?}"))?
        .next()
        .with_context(|| format!("--url {url:?}: {authority:?} has no address"))?;
    Ok(Target {
        addr,
        host: authority.to_string(),
        path: path.to_string(),
    })
}

/// Whether binding a 127.0.0.X source address makes sense for this destination.
pub fn is_ipv4_loopback(addr: &SocketAddr) -> bool {
    matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> Options {
        Options::try_parse_from(std::iter::once("fanout-load").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn urls_parse_with_and_without_path() {
        let t = parse_url("ws://127.0.0.1:9000").unwrap();
        assert_eq!((t.addr.port(), t.path.as_str()), (9000, "/ws"));
        let t = parse_url("ws://127.0.0.1:9000/socket").unwrap();
        assert_eq!(t.path, "/socket");
        assert!(parse_url("http://127.0.0.1:1").is_err());
        assert!(parse_url("ws://127.0.0.1:1/ws?channel=x").is_err());
    }

    #[test]
    fn procs_auto_sizes_under_the_fd_limit() {
        assert_eq!(opts(&["idle", "-n", "200"]).procs(), 1);
        assert_eq!(opts(&["idle", "-n", "15001"]).procs(), 2);
        assert_eq!(opts(&["idle", "-n", "200000"]).procs(), 14);
        assert_eq!(opts(&["idle", "-n", "3", "--procs", "8"]).procs(), 3);
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let err = opts(&["broadcast", "--size", "8"]).validate().unwrap_err();
        assert!(err.to_string().contains("--size"), "{err}");
        let err = opts(&["broadcast", "--payload-kind", "chat-json", "--size", "64"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--size"), "{err}");
        let chat = opts(&["broadcast", "--payload-kind", "chat-json", "--size", "1024"]);
        assert!(chat.validate().is_ok());
        assert!(!chat.compression);
        assert!(opts(&["idle", "--compression"]).compression);
        let err = opts(&["broadcast", "-n", "2", "--publishers", "3"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--publishers"), "{err}");
        let err = opts(&["idle", "--source-range", "9-3"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--source-range"), "{err}");
        assert!(opts(&["rooms", "--channel", "a b"]).validate().is_err());
        assert!(opts(&["rooms"]).validate().is_ok());
        assert!(opts(&["churn", "--token", "a b"]).validate().is_err());
        assert!(opts(&["churn", "--token", "eyJh.eyJz.c2ln-_"])
            .validate()
            .is_ok());
    }

    #[test]
    fn rooms_assign_clients_round_robin() {
        let o = opts(&["rooms", "--rooms", "3", "--channel", "chat"]);
        assert_eq!(o.channel_of(4), "chat-1");
        assert!(o.is_publisher(4));
        let b = opts(&["broadcast", "--publishers", "2"]);
        assert!(b.is_publisher(1) && !b.is_publisher(2));
        assert_eq!(b.channel_of(7), "load");
    }
}
