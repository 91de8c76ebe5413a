//! Starting and stopping a node: binds one SO_REUSEPORT listener per reactor, spawns the reactor
//! threads, and runs the supervisor on the main thread: signals, graceful drain, Redis address
//! resolution (so no reactor ever blocks on DNS), and the exit of a node whose reactor died.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::{Poll, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::broker::bus::{Mailbox, MAILBOX_CAPACITY};
use crate::config::Config;
use crate::metrics::ReactorMetrics;
pub use crate::node::{ReactorShared, Shared};
use crate::reactor::{Reactor, WAKER};

/// How the startup line names the broker: embedded, one Redis, or a cluster's seeds.
fn broker_description(config: &Config) -> String {
    let url = |u: &crate::config::RedisUrl| {
        let scheme = if u.tls { "rediss" } else { "redis" };
        format!("{scheme}://{}:{}", u.host, u.port)
    };
    match (&config.redis, config.redis_cluster.as_slice()) {
        (Some(u), _) => format!("{}/{} prefix={:?}", url(u), u.db, config.redis_prefix),
        (None, []) => "embedded".to_string(),
        (None, seeds) => format!(
            "redis-cluster seeds={} prefix={:?}",
            seeds.iter().map(url).collect::<Vec<_>>().join(","),
            config.redis_prefix
        ),
    }
}

/// Exit status when a reactor thread died: the node is no longer whole, so it stops and lets
/// its supervisor (Kubernetes, systemd) start a fresh one rather than limp on unnoticed.
pub const EXIT_REACTOR_DIED: i32 = 70;

/// A node's reactors, built but not yet running (tests step them by hand).
pub struct Node {
    pub shared: Arc<Shared>,
    pub reactors: Vec<Reactor>,
    pub local_addr: SocketAddr,
    /// The server API's listener (`--api-listen`), bound but not yet serving.
    pub api: Option<crate::api::Listener>,
}

/// Binds the listeners and builds the reactors.
pub fn build(config: Config) -> anyhow::Result<Node> {
    let first = bind(config.listen)
        .with_context(|| format!("--listen: cannot listen on {}", config.listen))?;
    let local_addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..config.threads {
        listeners.push(
            bind(local_addr).with_context(|| format!("cannot add a listener on {local_addr}"))?,
        );
    }
    let mut polls = Vec::new();
    let mut shared_reactors = Vec::new();
    let mut inboxes = Vec::new();
    for _ in 0..config.threads {
        let poll = Poll::new().context("cannot create an event loop")?;
        let waker = Waker::new(poll.registry(), WAKER).context("cannot create a waker")?;
        let metrics = Arc::new(ReactorMetrics::default());
        let (mailbox, inbox) = Mailbox::new(waker, MAILBOX_CAPACITY, metrics.clone());
        shared_reactors.push(ReactorShared {
            mailbox,
            metrics,
            accepting: AtomicBool::new(false),
            redis_up: AtomicBool::new(false),
        });
        polls.push(poll);
        inboxes.push(inbox);
    }
    let redis_tls = redis_tls(&config)?;
    let (api, api_mailbox) = match &config.api {
        Some(api) => {
            let (listener, mailbox) = crate::api::bind(api)?;
            (Some(listener), Some(mailbox))
        }
        None => (None, None),
    };
    let mut shared = Shared::new(config, shared_reactors);
    shared.redis_tls = redis_tls;
    shared.api = api_mailbox;
    let shared = Arc::new(shared);
    let mut reactors = Vec::new();
    for (i, ((poll, listener), inbox)) in polls.into_iter().zip(listeners).zip(inboxes).enumerate()
    {
        reactors.push(Reactor::new(i, poll, listener, inbox, shared.clone())?);
    }
    Ok(Node {
        shared,
        reactors,
        local_addr,
        api,
    })
}

/// A configuration error found only when acting on it (a `--redis-ca-file` that holds no
/// certificate): the binary reports it like a bad flag value (exit status 2).
#[derive(Debug)]
pub struct BadConfig(pub String);

impl std::fmt::Display for BadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadConfig {}

/// The TLS client configuration for `rediss://`, built once for every link of the node; `None`
/// when no Redis URL uses TLS.
fn redis_tls(config: &Config) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    let bad = |e: String| anyhow::Error::new(BadConfig(e));
    if !config.redis_urls().any(|u| u.tls) {
        if let Some(path) = &config.redis_ca_file {
            log::warn!(
                "--redis-ca-file {} is unused: no Redis URL is rediss://",
                path.display()
            );
        }
        return Ok(None);
    }
    for url in config.redis_urls().filter(|u| u.tls) {
        let option = if config.redis.is_some() {
            "--redis"
        } else {
            "--redis-cluster"
        };
        crate::broker::tls::server_name(&url.host).map_err(|e| bad(format!("{option}: {e:#}")))?;
    }
    crate::broker::tls::client_config(config.redis_ca_file.as_deref())
        .map(Some)
        .map_err(|e| bad(format!("--redis-ca-file: {e:#}")))
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Every reactor gets its own accept queue on the same port; the kernel spreads connections.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Spawns the reactor threads.
pub fn spawn(node: Node) -> anyhow::Result<(Arc<Shared>, Vec<JoinHandle<()>>, SocketAddr)> {
    let mut threads = Vec::new();
    for (i, reactor) in node.reactors.into_iter().enumerate() {
        threads.push(
            std::thread::Builder::new()
                .name(format!("reactor-{i}"))
                .spawn(move || reactor.run())
                .context("cannot spawn a reactor thread")?,
        );
    }
    Ok((node.shared, threads, node.local_addr))
}

/// Runs a node until it has drained after SIGTERM/SIGINT. A second signal exits at once.
pub fn run(config: Config) -> anyhow::Result<()> {
    let (signal_tx, signals) = mpsc::channel();
    let mut hooks = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in hooks.forever() {
                if signal_tx.send(signal).is_err() {
                    break;
                }
            }
        })?;
    log::info!(
        "fanout {} starting: listen={} threads={} broker={} max-message={} max-queue={} max-subscriptions={} max-connections={} ping-interval={:?} idle-timeout={:?} handshake-timeout={:?} drain-delay={:?} drain-time={:?} allowed-origins={:?} max-message-rate={}",
        env!("CARGO_PKG_VERSION"),
        config.listen,
        config.threads,
        broker_description(&config),
        config.max_message,
        config.max_queue,
        config.max_subscriptions,
        config.max_connections,
        config.ping_interval,
        config.idle_timeout,
        config.handshake_timeout,
        config.drain_delay,
        config.drain_time,
        config.allowed_origins,
        config.max_message_rate,
    );
    let mut node = build(config)?;
    node.shared.resolve_redis();
    let api = node.api.take();
    let (shared, threads, addr) = spawn(node)?;
    let api = match api {
        Some(listener) => {
            let api_addr = listener.local_addr();
            let thread = listener
                .spawn(shared.clone())
                .context("cannot spawn the server API's thread")?;
            Some((thread, api_addr))
        }
        None => None,
    };
    log::info!("listening on {addr}");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        if let Some((_, api_addr)) = &api {
            log::info!("server API listening on {api_addr}");
            let _ = writeln!(out, "api listening on {api_addr}");
        }
        let _ = out.flush();
    }
    let mut drain_at: Option<Instant> = None;
    let mut last_resolve = Instant::now();
    let mut drained = false;
    loop {
        if let Some(i) = threads.iter().position(|t| t.is_finished()) {
            if !drained {
                // A reactor only ends by itself after a drain: anything else (a panic, a failed
                // poll) leaves the node holding a listener nobody accepts on.
                let _ = threads.into_iter().nth(i).map(JoinHandle::join);
                log::error!("reactor-{i} died; exiting (status {EXIT_REACTOR_DIED}) so the node is restarted whole");
                eprintln!("fanout: reactor-{i} died; exiting");
                std::process::exit(EXIT_REACTOR_DIED);
            }
            if threads.iter().all(|t| t.is_finished()) {
                break;
            }
        }
        if api.as_ref().is_some_and(|(t, _)| t.is_finished()) {
            // Like a reactor: a node whose API stopped answering would look healthy to probes.
            log::error!("the server API's thread died; exiting (status {EXIT_REACTOR_DIED}) so the node is restarted whole");
            eprintln!("fanout: the server API's thread died; exiting");
            std::process::exit(EXIT_REACTOR_DIED);
        }
        match signals.recv_timeout(Duration::from_millis(100)) {
            Ok(signal) if drain_at.is_some() => {
                log::warn!("signal {signal} during drain: exiting now");
                std::process::exit(1);
            }
            Ok(signal) => {
                let delay = shared.config.drain_delay;
                log::info!("signal {signal}: draining; /readyz is 503; closing clients in {delay:?} over {:?}", shared.config.drain_time);
                shared
                    .draining
                    .store(true, std::sync::atomic::Ordering::Release);
                drain_at = Some(Instant::now() + delay);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(100)),
        }
        if !drained && drain_at.is_some_and(|t| Instant::now() >= t) {
            drained = true;
            shared.drain(shared.config.drain_time);
        }
        // Blocking DNS, so at most once a second, and only while the link is down.
        if shared.redis_down() && last_resolve.elapsed() >= Duration::from_secs(1) {
            shared.resolve_redis();
            last_resolve = Instant::now();
        }
    }
    let mut panicked = false;
    for t in threads {
        panicked |= t.join().is_err();
    }
    if panicked {
        anyhow::bail!("a reactor thread panicked while draining");
    }
    log::info!("drained; exiting");
    Ok(())
}
