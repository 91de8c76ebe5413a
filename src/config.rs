//! Command-line flags, their `FANOUT_*` environment-variable equivalents, the configuration
//! file, and validation.
//!
//! Everything a reactor needs at run time is in [`Config`], built once at start by
//! [`Config::load`] and shared read-only. Bad values are refused here, before any socket is
//! opened, with a message that names the option: every message of [`Config::from_args`] starts
//! with `--flag:`, which is how an error about a value from the file is told apart and reported
//! with the file, the line and the key instead.
//!
//! - `file`: `--config PATH`, the TOML file that can set every option (precedence: flag >
//!   environment > file > default), with no code per option; [`LoadError`].
//! - `namespace`: the file's `[[namespace]]` tables, rules per channel-name pattern:
//!   [`Namespace`], [`Config::namespace_for`].

mod file;
mod namespace;
mod words;

pub use file::LoadError;
pub use namespace::{Namespace, PublishRule, SubscribeRule};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

/// Flags as the user types them; [`Config::from_args`] validates them.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "fanout",
    version,
    about = "WebSocket pub/sub and chat server: a mio reactor per core, zero-copy broadcast, Redis Pub/Sub scale-out",
    long_about = None
)]
pub struct Args {
    /// TOML file that sets any of these options under its name in snake_case (max_message =
    /// 65536) and the channel namespaces; a flag or an environment variable wins over it.
    #[arg(long, env = "FANOUT_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Address to listen on (HTTP and WebSocket share it). Port 0 picks a free port.
    #[arg(long, env = "FANOUT_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,

    /// Reactor threads, each with its own SO_REUSEPORT listener. Default: number of CPUs.
    #[arg(long, env = "FANOUT_THREADS")]
    pub threads: Option<usize>,

    /// Share channels with other nodes through Redis Pub/Sub: redis://[user:password@]host:port[/db]
    /// (rediss:// for TLS). Without it (or --redis-cluster) the node brokers in-process.
    #[arg(long, env = "FANOUT_REDIS")]
    pub redis: Option<String>,

    /// Share channels through a Redis Cluster with sharded Pub/Sub (SSUBSCRIBE/SPUBLISH):
    /// redis[s]://[user:password@]host:port[,host:port...], any nodes of the cluster as seeds.
    #[arg(long, env = "FANOUT_REDIS_CLUSTER", conflicts_with = "redis")]
    pub redis_cluster: Option<String>,

    /// PEM file of CA certificates trusted for rediss:// (in addition to the system roots).
    #[arg(long, env = "FANOUT_REDIS_CA_FILE")]
    pub redis_ca_file: Option<String>,

    /// Prefix prepended to channel names on Redis, to share a Redis with other applications.
    #[arg(long, env = "FANOUT_REDIS_PREFIX", default_value = "")]
    pub redis_prefix: String,

    /// Largest WebSocket message accepted, in bytes (reassembled fragments count together). Over it: close 1009.
    #[arg(long, env = "FANOUT_MAX_MESSAGE", default_value = "65536")]
    pub max_message: String,

    /// Largest outgoing queue per connection, in bytes. A client that lets it overflow is closed (1008 "slow consumer").
    #[arg(long, env = "FANOUT_MAX_QUEUE", default_value = "1048576")]
    pub max_queue: String,

    /// Most channels one connection may subscribe to.
    #[arg(long, env = "FANOUT_MAX_SUBSCRIPTIONS", default_value = "128")]
    pub max_subscriptions: String,

    /// Most WebSocket connections this node holds; further upgrades get HTTP 503.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS", default_value = "100000")]
    pub max_connections: String,

    /// Standalone only: most bytes of channel history the node keeps in memory, for every channel together; the oldest messages go first.
    #[arg(long, env = "FANOUT_HISTORY_MAX_BYTES", default_value = "67108864")]
    pub history_max_bytes: String,

    /// Seconds after which a node that stopped refreshing its clients' presence (it died) drops out of it.
    #[arg(long, env = "FANOUT_PRESENCE_TTL", default_value = "30")]
    pub presence_ttl: String,

    /// Seconds of silence from a client after which the server sends it a ping.
    #[arg(long, env = "FANOUT_PING_INTERVAL", default_value = "30")]
    pub ping_interval: String,

    /// Seconds without any frame from a client (pongs count) after which it is closed (1001 "idle timeout").
    #[arg(long, env = "FANOUT_IDLE_TIMEOUT", default_value = "75")]
    pub idle_timeout: String,

    /// Seconds a client has to complete its HTTP request; slower ones are dropped.
    #[arg(long, env = "FANOUT_HANDSHAKE_TIMEOUT", default_value = "10")]
    pub handshake_timeout: String,

    /// Seconds to keep serving after SIGTERM with /readyz at 503, so load balancers take the node out.
    #[arg(long, env = "FANOUT_DRAIN_DELAY", default_value = "5")]
    pub drain_delay: String,

    /// Seconds over which clients are closed (1001) in batches after the drain delay; then the process exits.
    #[arg(long, env = "FANOUT_DRAIN_TIME", default_value = "10")]
    pub drain_time: String,

    /// Comma-separated Origin header values allowed to open WebSockets (403 otherwise); the flag
    /// may be repeated. Empty: any origin.
    #[arg(
        long,
        env = "FANOUT_ALLOWED_ORIGINS",
        default_value = "",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Messages per second one connection may send (bursts up to the same number); over it: close 1008 "rate limit". 0: unlimited.
    #[arg(long, env = "FANOUT_MAX_MESSAGE_RATE", default_value = "0")]
    pub max_message_rate: String,

    /// Log level: error, warn, info, debug or trace. RUST_LOG, when set, takes precedence.
    #[arg(long, env = "FANOUT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// permessage-deflate (RFC 7692) for clients that offer it: `on` or `off`. Each broadcast is
    /// compressed once per reactor and shared by every subscriber that negotiated it.
    #[arg(long, env = "FANOUT_COMPRESSION", default_value = "off", value_parser = ["on", "off"])]
    pub compression: String,

    /// Messages shorter than this many bytes are sent uncompressed even to compressing clients.
    #[arg(long, env = "FANOUT_COMPRESSION_MIN_BYTES", default_value = "256")]
    pub compression_min_bytes: String,

    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,

    /// Address of the server API for the application's backend (publish, broadcast, disconnect,
    /// channels, info), on its own listener. Off when unset; needs --api-key.
    #[arg(long, env = "FANOUT_API_LISTEN")]
    pub api_listen: Option<String>,

    /// Key the backend sends to the server API as `Authorization: apikey KEY` (at least 16
    /// bytes of printable ASCII, no commas). Repeat the flag (or separate with commas) to accept
    /// several, e.g. while rotating.
    #[arg(
        long,
        env = "FANOUT_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_key: Vec<String>,

    /// Fault injection for the test suite (like Redis's DEBUG SEGFAULT): reactor N panics when it
    /// completes its first WebSocket upgrade, to prove a dead reactor ends the process.
    #[arg(long, env = "FANOUT_FAULT_PANIC_REACTOR", hide = true)]
    pub fault_panic_reactor: Option<usize>,
}

/// Where and how to reach Redis, parsed from `--redis`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    /// `rediss://`: TLS (rustls) to this server.
    pub tls: bool,
}

/// Validated configuration, shared read-only by every reactor.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub threads: usize,
    pub redis: Option<RedisUrl>,
    /// `--redis-cluster`: the seed nodes (empty without it). Exclusive with `redis`.
    pub redis_cluster: Vec<RedisUrl>,
    pub redis_ca_file: Option<std::path::PathBuf>,
    pub redis_prefix: String,
    pub max_message: usize,
    pub max_queue: usize,
    pub max_subscriptions: usize,
    pub max_connections: usize,
    pub history_max_bytes: usize,
    pub presence_ttl: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub drain_delay: Duration,
    pub drain_time: Duration,
    pub allowed_origins: Vec<String>,
    pub max_message_rate: u32,
    pub log_level: log::LevelFilter,
    pub compression: bool,
    pub compression_min_bytes: usize,
    /// Connection tokens: the keys, whether they are required, the per-user limit.
    pub auth: std::sync::Arc<crate::auth::Verifier>,
    /// Hidden `--fault-panic-reactor`: which reactor panics on its first upgrade (tests only).
    pub fault_panic_reactor: Option<usize>,
    /// The configuration file read at start (`--config`), if any.
    pub config_file: Option<PathBuf>,
    /// The file's `[[namespace]]` tables in file order (empty without any); use
    /// [`Config::namespace_for`].
    pub namespaces: Vec<Namespace>,
    /// The server API (`--api-listen`, `--api-key`), when enabled.
    pub api: Option<crate::api::options::ApiConfig>,
}

impl Config {
    /// Parses the command line (`argv`, program name first), the environment and the
    /// configuration file it names, and validates them all. `main` calls
    /// [`LoadError::exit`] on an error.
    pub fn load<I, T>(argv: I) -> Result<Config, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        file::load(argv)
    }

    /// Validates parsed flags; the error names the offending option. Flags only: the
    /// configuration file (`args.config`) is read by [`Config::load`].
    pub fn from_args(args: Args) -> anyhow::Result<Config> {
        let listen: SocketAddr = args.listen.parse().with_context(|| {
            format!(
                "--listen: {:?} is not an IP:PORT address (e.g. 0.0.0.0:8080)",
                args.listen
            )
        })?;
        let threads = match args.threads {
            Some(0) => bail!("--threads: must be at least 1"),
            Some(n) if n > 1024 => bail!("--threads: {n} is more than 1024"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let redis = match &args.redis {
            Some(url) if !url.is_empty() => Some(
                RedisUrl::parse(url).with_context(|| format!("--redis: {:?}", redacted(url)))?,
            ),
            _ => None,
        };
        let redis_cluster = match &args.redis_cluster {
            Some(seeds) if !seeds.is_empty() => RedisUrl::parse_seeds(seeds)
                .with_context(|| format!("--redis-cluster: {:?}", redacted(seeds)))?,
            _ => Vec::new(),
        };
        if redis.is_some() && !redis_cluster.is_empty() {
            bail!("--redis-cluster: give either --redis or --redis-cluster, not both");
        }
        let redis_ca_file = match &args.redis_ca_file {
            Some(path) if !path.is_empty() => {
                let path = std::path::PathBuf::from(path);
                if !path.is_file() {
                    bail!("--redis-ca-file: {} is not a readable file", path.display());
                }
                Some(path)
            }
            _ => None,
        };
        if args.redis_prefix.len() > 64 {
            bail!("--redis-prefix: longer than 64 bytes");
        }
        let max_message = size("--max-message", &args.max_message, 16, 64 << 20)?;
        let max_queue = size("--max-queue", &args.max_queue, 1024, 1 << 30)?;
        if max_queue < max_message {
            bail!("--max-queue: {max_queue} is smaller than --max-message {max_message}; one message must fit");
        }
        let allowed_origins = args
            .allowed_origins
            .iter()
            .flat_map(|list| list.split(','))
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let log_level = args.log_level.parse().map_err(|_| {
            anyhow::anyhow!(
                "--log-level: {:?} is not one of error, warn, info, debug, trace, off",
                args.log_level
            )
        })?;
        Ok(Config {
            listen,
            threads,
            redis,
            redis_cluster,
            redis_ca_file,
            redis_prefix: args.redis_prefix,
            max_message,
            max_queue,
            max_subscriptions: size("--max-subscriptions", &args.max_subscriptions, 1, 65536)?,
            max_connections: size("--max-connections", &args.max_connections, 1, 100_000_000)?,
            history_max_bytes: size(
                "--history-max-bytes",
                &args.history_max_bytes,
                0,
                usize::MAX >> 1,
            )?,
            presence_ttl: seconds("--presence-ttl", &args.presence_ttl, 1.0)?,
            ping_interval: seconds("--ping-interval", &args.ping_interval, 0.05)?,
            idle_timeout: seconds("--idle-timeout", &args.idle_timeout, 0.1)?,
            handshake_timeout: seconds("--handshake-timeout", &args.handshake_timeout, 0.05)?,
            drain_delay: seconds("--drain-delay", &args.drain_delay, 0.0)?,
            drain_time: seconds("--drain-time", &args.drain_time, 0.0)?,
            allowed_origins,
            max_message_rate: size("--max-message-rate", &args.max_message_rate, 0, 10_000_000)?
                as u32,
            log_level,
            compression: match args.compression.trim() {
                "on" => true,
                "off" => false,
                other => bail!("--compression: {other:?} is neither on nor off"),
            },
            compression_min_bytes: size(
                "--compression-min-bytes",
                &args.compression_min_bytes,
                0,
                1 << 30,
            )?,
            auth: crate::auth::Verifier::from_args(&args.auth)?,
            fault_panic_reactor: args.fault_panic_reactor,
            config_file: None,
            namespaces: Vec::new(),
            api: crate::api::options::ApiConfig::from_args(
                args.api_listen.as_deref(),
                &args.api_key,
            )?,
        })
    }

    /// The namespace whose rules apply to `channel`: the first configured one that matches,
    /// else the open default (anyone subscribes, clients publish), as with no namespaces at all.
    pub fn namespace_for(&self, channel: &str) -> &Namespace {
        namespace::find(&self.namespaces, channel)
    }

    /// The Redis URLs the node connects to first: `--redis`, or the `--redis-cluster` seeds.
    pub fn redis_urls(&self) -> impl Iterator<Item = &RedisUrl> {
        self.redis.iter().chain(self.redis_cluster.iter())
    }

    /// Whether the node shares channels through Redis (one server or a cluster).
    pub fn uses_redis(&self) -> bool {
        self.redis.is_some() || !self.redis_cluster.is_empty()
    }

    /// A configuration for tests and benchmarks: loopback, one thread, defaults elsewhere.
    pub fn for_tests() -> Config {
        let args = Args::parse_from(["fanout", "--listen", "127.0.0.1:0", "--threads", "1"]);
        Config::from_args(args).expect("default test configuration is valid")
    }
}

fn size(option: &str, value: &str, min: usize, max: usize) -> anyhow::Result<usize> {
    let n: usize = value
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{option}: {value:?} is not a whole number"))?;
    if n < min || n > max {
        bail!("{option}: {n} is outside {min}..={max}");
    }
    Ok(n)
}

fn seconds(option: &str, value: &str, min: f64) -> anyhow::Result<Duration> {
    let s: f64 = value
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{option}: {value:?} is not a number of seconds"))?;
    if !s.is_finite() || s < min || s > 86_400.0 {
        bail!("{option}: {value} is outside {min}..=86400 seconds");
    }
    Ok(Duration::from_secs_f64(s))
}

impl RedisUrl {
    /// Parses `redis[s]://[user:password@]host:port[/db]`.
    pub fn parse(url: &str) -> anyhow::Result<RedisUrl> {
        let (rest, tls) = match url.split_once("://") {
            Some(("redis", rest)) => (rest, false),
            Some(("rediss", rest)) => (rest, true),
            Some((scheme, _)) => bail!("unknown scheme {scheme:?}; expected redis:// or rediss://"),
            None => bail!("expected redis://host:port"),
        };
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((auth, host)) => (Some(auth), host),
            None => (None, rest),
        };
        let (hostport, db) = match hostpart.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (
                hp,
                db.parse()
                    .map_err(|_| anyhow::anyhow!("database {db:?} is not a number"))?,
            ),
            None => (hostpart, 0),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| anyhow::anyhow!("unclosed '[' in host"))?;
            (h, p.strip_prefix(':').unwrap_or(""))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, p),
                None => (hostport, ""),
            }
        };
        if host.is_empty() {
            bail!("no host");
        }
        let port = if port.is_empty() {
            6379
        } else {
            match port.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => bail!("bad port {port:?}"),
            }
        };
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
                // Clients disagree on whether `redis://x@host` names a user or a password;
                // guessing wrong fails later as a confusing WRONGPASS, so ask for the clear form.
                None => bail!(
                    "the part before '@' has no ':': write redis://:PASSWORD@host for a password, or redis://USER:PASSWORD@host"
                ),
            },
        };
        Ok(RedisUrl {
            host: host.to_string(),
            port,
            username,
            password,
            db,
            tls,
        })
    }

    /// Parses `--redis-cluster`: `redis[s]://[auth@]host:port[,host:port...]`. Later seeds
    /// without a scheme share the first one's scheme and credentials. A cluster has only
    /// database 0.
    pub fn parse_seeds(seeds: &str) -> anyhow::Result<Vec<RedisUrl>> {
        let mut parts = seeds.split(',').map(str::trim).filter(|s| !s.is_empty());
        let first = RedisUrl::parse(parts.next().unwrap_or(""))?;
        let mut all = vec![first.clone()];
        for part in parts {
            let url = if part.contains("://") {
                RedisUrl::parse(part)?
            } else {
                let scheme = if first.tls { "rediss" } else { "redis" };
                let mut url = RedisUrl::parse(&format!("{scheme}://{part}"))?;
                url.username.clone_from(&first.username);
                url.password.clone_from(&first.password);
                url
            };
            all.push(url);
        }
        if all.iter().any(|u| u.db != 0) {
            bail!("a Redis Cluster has only database 0");
        }
        Ok(all)
    }
}

/// The URL with any credentials replaced by `***`, for error messages and logs.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls() {
        let u = RedisUrl::parse("redis://user:pw@db.local:6380/2").unwrap();
        assert_eq!(
            u,
            RedisUrl {
                host: "db.local".into(),
                port: 6380,
                username: Some("user".into()),
                password: Some("pw".into()),
                db: 2,
                tls: false,
            }
        );
        assert_eq!(RedisUrl::parse("redis://h").unwrap().port, 6379);
        assert_eq!(
            RedisUrl::parse("redis://:secret@h:1")
                .unwrap()
                .password
                .as_deref(),
            Some("secret")
        );
        assert_eq!(RedisUrl::parse("redis://[::1]:7000").unwrap().host, "::1");
        assert!(RedisUrl::parse("rediss://h:1").unwrap().tls);
        assert_eq!(redacted("redis://u:secret@h:1/2"), "redis://***@h:1/2");
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
        for bad in [
            "redis://secret@h:1",
            "http://h:1",
            "redis://h:0",
            "redis://h:99999",
            "redis://:1",
            "h:1",
            "redis://h:1/x",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn cluster_seeds() {
        let seeds = RedisUrl::parse_seeds("rediss://:pw@a:7000, b:7001,redis://c:7002").unwrap();
        let hosts: Vec<_> = seeds
            .iter()
            .map(|u| (u.host.as_str(), u.port, u.tls))
            .collect();
        assert_eq!(
            hosts,
            [("a", 7000, true), ("b", 7001, true), ("c", 7002, false)]
        );
        assert_eq!(seeds[1].password.as_deref(), Some("pw"));
        assert_eq!(seeds[2].password, None);
        assert!(RedisUrl::parse_seeds("redis://a:1/3").is_err());
        assert!(RedisUrl::parse_seeds("a:1").is_err());
        let args = Args::parse_from(["fanout", "--redis-cluster", "redis://a:1,b:2"]);
        assert_eq!(Config::from_args(args).unwrap().redis_cluster.len(), 2);
        let both = Args::try_parse_from([
            "fanout",
            "--redis",
            "redis://a:1",
            "--redis-cluster",
            "redis://b:2",
        ]);
        assert!(both.is_err(), "--redis and --redis-cluster together");
    }

    #[test]
    fn bad_options_are_named() {
        for (flag, value) in [
            ("--threads", "0"),
            ("--max-message", "abc"),
            ("--listen", "nope"),
            ("--ping-interval", "-1"),
            ("--redis", "http://x:1"),
            ("--redis-cluster", "redis://x:1/2"),
            ("--redis-ca-file", "/nonexistent/ca.pem"),
            ("--log-level", "loud"),
            ("--api-listen", "nowhere"),
            ("--api-key", "short"),
        ] {
            let args = Args::parse_from(["fanout".to_string(), format!("{flag}={value}")]);
            let err = format!("{:#}", Config::from_args(args).unwrap_err());
            assert!(err.contains(flag), "{err} does not name {flag}");
        }
    }
}
