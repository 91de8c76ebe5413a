//! Helpers shared by every integration test that talks to a real `fanout` process or a real
//! `redis-server` over loopback sockets, written once so every test speaks the protocol the same
//! way: start and stop processes by PID ([`Server`], [`Redis`]), speak plain HTTP ([`exchange`],
//! [`http_get`]) and WebSocket over raw sockets ([`Ws`], with the test side's own frame encoder
//! and parser in `frames.rs`, independent of the server's codec), talk RESP to Redis
//! ([`RedisConn`]), run Redis with TLS on certificates made by the `openssl` CLI
//! ([`TlsRedis`], [`Certs`]), call a node's server API ([`ApiClient`]), and parse the Prometheus
//! exposition strictly ([`Metrics`]). Raw sockets, not
//! a client library, so tests can put exact bytes on the wire (half frames, resets, stalls).
//!
//! Time: no helper asserts how fast anything is. [`PATIENCE`] is how long a helper waits for
//! something that normally takes milliseconds before it gives up, long enough that only a
//! stuck server (never a busy machine) reaches it.
#![allow(dead_code)]

/// A real Redis Cluster ([`RedisCluster`]): slot migration, failover, restart, added shards.
mod api;
mod cluster;
mod frames;
mod http;
mod redis;
mod tls;
mod tokens;

// Not every test file uses every part; the helpers are still one shared set.
#[allow(unused_imports)]
pub use self::api::*;
#[allow(unused_imports)]
pub use self::cluster::*;
#[allow(unused_imports)]
pub use self::frames::*;
#[allow(unused_imports)]
pub use self::http::*;
#[allow(unused_imports)]
pub use self::redis::*;
#[allow(unused_imports)]
pub use self::tls::*;
#[allow(unused_imports)]
pub use self::tokens::*;

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One second, for timeouts and durations written as `5 * SEC`.
pub const SEC: Duration = Duration::from_secs(1);

/// How long to wait for anything that normally takes milliseconds (a reply, a delivery, a
/// close, a metric catching up) before failing: generous, so a loaded 2-core CI machine never
/// trips it, while a real hang still fails the test.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The server binary: `FANOUT_BIN` when set (tests/run's `cargo-test` step points it at the
/// release build, `cargo-test-debug` at the debug one), else the binary cargo built for this test
/// run: the debug build under a plain `cargo test`, so overflow checks and debug assertions run.
pub fn fanout_bin() -> PathBuf {
    match std::env::var("FANOUT_BIN") {
        Ok(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_fanout")),
    }
}

/// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`) to a process we started.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status();
}

/// Waits for a child to exit, up to `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the fanout binary with `args` (and `env`), expecting it to stop by itself (within [`PATIENCE`])
/// (bad configuration, `--help`); returns (exit code, stdout, stderr).
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut child = Command::new(fanout_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fanout");
    let status = wait_exit(&mut child, PATIENCE);
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    (
        status.and_then(|s| s.code()),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A WebSocket client with a 4 KiB receive buffer, for tests where it stops reading: its socket
/// fills after a few frames, so the server's queue for it is what overflows.
pub fn tiny_buffer_client(addr: SocketAddr, path: &str, protocol: Option<&str>) -> Ws {
    client_with_recv_buffer(addr, path, protocol, 4096)
}

/// A WebSocket client whose socket receive buffer is set to `bytes` (SO_RCVBUF, capped by the
/// kernel's net.core.rmem_max) before it connects.
pub fn client_with_recv_buffer(
    addr: SocketAddr,
    path: &str,
    protocol: Option<&str>,
    bytes: usize,
) -> Ws {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(bytes).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let (status, head, _) = handshake(&mut stream, path, protocol).unwrap();
    assert_eq!(status, 101, "{head}");
    Ws::from_stream(stream)
}

/// True for the error a read with a timeout returns when nothing came in time.
pub fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A running fanout node; killed (by PID) when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything the node wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
    /// The lines the node wrote to stdout after its `listening on` line (`api listening on`).
    pub stdout: Arc<Mutex<Vec<String>>>,
    /// /metrics scrapes made through [`Server::metrics`] (each is one more HTTP 200).
    pub scrapes: std::sync::atomic::AtomicU64,
    /// The thread copying stderr into `log`; it ends when the process is gone.
    log_reader: Option<std::thread::JoinHandle<()>>,
    /// Set by a test that makes the node panic on purpose (fault injection).
    pub panic_expected: bool,
}

impl Server {
    /// Starts `fanout --listen 127.0.0.1:0 ARGS` and waits for its `listening on` line.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    /// [`Server::start`] with environment variables set for the node.
    /// [`Server::start`], then waits until `/readyz` says 200 (with Redis: the link is up).
    pub fn start_ready(args: &[&str]) -> Server {
        let server = Server::start(args);
        assert!(
            wait_status(server.addr, "/readyz", 200, PATIENCE).is_some(),
            "node {args:?} not ready; log:\n{}",
            server.log()
        );
        server
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(fanout_bin())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", fanout_bin()));
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = log.clone();
        let log_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let later_lines = Arc::new(Mutex::new(Vec::new()));
        let sink = later_lines.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the node never blocks on a full stdout pipe.
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(PATIENCE) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "fanout {args:?} printed no `listening on` line; stderr:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"));
        Server {
            child,
            addr,
            log,
            stdout: later_lines,
            scrapes: Default::default(),
            log_reader: Some(log_reader),
            panic_expected: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address of the node's server API (`--api-listen`), from its `api listening on`
    /// line on stdout; fails the test if the line does not come.
    pub fn api_addr(&self) -> SocketAddr {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = self.stdout.lock().unwrap().iter().find_map(|line| {
                line.strip_prefix("api listening on ")
                    .and_then(|a| a.trim().parse().ok())
            });
            if let Some(addr) = found {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "no `api listening on` line; stderr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, timeout)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the node's stderr contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Scrapes and strictly parses /metrics.
    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics");
        self.scrapes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(status, 200, "/metrics status; body {body}");
        Metrics::parse(&body).unwrap_or_else(|e| panic!("bad exposition: {e}\n{body}"))
    }

    /// Polls /metrics until `sample` reaches `want` (or the timeout); returns the last value.
    pub fn wait_metric(&self, sample: &str, want: f64, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metrics().get(sample);
            if v == want || Instant::now() >= deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ws(&self, path: &str) -> Ws {
        Ws::connect(self.addr, path, None).unwrap_or_else(|e| panic!("ws {path}: {e}"))
    }

    pub fn ws_json(&self, path: &str) -> Ws {
        Ws::connect(self.addr, path, Some("fanout.json"))
            .unwrap_or_else(|e| panic!("ws {path}: {e}"))
    }
}

impl Drop for Server {
    /// Kills the node (by PID) and fails the test if any of its threads panicked, even where
    /// the test's own checks did not notice (a reactor that died serving nobody in particular).
    /// That is what makes a run against the debug build catch overflows and debug assertions.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // The process is gone, so its stderr ends: let the reader copy the last lines.
        if let Some(reader) = self.log_reader.take() {
            let deadline = Instant::now() + PATIENCE;
            while !reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let log = self.log();
        if let Some(at) = log.find("panicked at") {
            let panic = &log[log[..at].rfind('\n').map_or(0, |i| i + 1)..];
            let panic: String = panic.lines().take(3).collect::<Vec<_>>().join("\n");
            if std::thread::panicking() || self.panic_expected {
                eprintln!("the fanout node had panicked too: {panic}");
            } else {
                panic!("the fanout node panicked: {panic}\nlog:\n{log}");
            }
        }
    }
}

/// A free loopback port (bound then released; good enough for a test-started Redis).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal blocking WebSocket client over a raw socket.
pub struct Ws {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Ws {
    pub fn connect(addr: SocketAddr, path: &str, protocol: Option<&str>) -> io::Result<Ws> {
        Ws::connect_with(addr, path, protocol, "")
    }

    /// [`Ws::connect`] with extra raw header lines (each ending in CRLF).
    pub fn connect_with(
        addr: SocketAddr,
        path: &str,
        protocol: Option<&str>,
        headers: &str,
    ) -> io::Result<Ws> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(PATIENCE))?;
        let (status, head, _) = http::handshake_with(&mut stream, path, protocol, headers)?;
        if status != 101 {
            return Err(io::Error::other(format!("upgrade refused: {head}")));
        }
        Ok(Ws::from_stream(stream))
    }

    pub fn from_stream(stream: TcpStream) -> Ws {
        Ws {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.stream.write_all(&client_frame(opcode, payload))
    }

    pub fn send_text(&mut self, text: &str) {
        self.send(TEXT, text.as_bytes()).expect("send text");
    }

    pub fn send_close(&mut self, code: u16) -> io::Result<()> {
        self.send(CLOSE, &code.to_be_bytes())
    }

    /// Next frame of any kind, waiting at most `timeout`.
    pub fn recv_frame(&mut self, timeout: Duration) -> io::Result<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                // A stop/continue of the test process (a loaded CI box, a cgroup freeze) makes a
                // read with SO_RCVTIMEO fail with EINTR; nothing was consumed, so just retry.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => return Err(io::ErrorKind::TimedOut.into()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Next data or close frame; answers pings on the way.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            let frame = self.recv_frame(deadline.saturating_duration_since(Instant::now()))?;
            match frame.opcode {
                PING => self.send(PONG, &frame.payload)?,
                PONG => {}
                _ => return Ok(frame),
            }
        }
    }

    pub fn recv_text(&mut self, timeout: Duration) -> String {
        let f = self.recv(timeout).expect("expected a message");
        assert_eq!(f.opcode, TEXT, "expected text, got {f:?}");
        f.text()
    }

    /// The next data or close frame, which must come: fails the test, naming `what`, after
    /// [`PATIENCE`].
    pub fn next(&mut self, what: &str) -> Frame {
        self.recv(PATIENCE)
            .unwrap_or_else(|e| panic!("{what}: expected a message: {e}"))
    }

    /// The next message as (opcode, payload).
    pub fn next_data(&mut self, what: &str) -> (u8, Vec<u8>) {
        let f = self.next(what);
        (f.opcode, f.payload)
    }

    /// The next message, which must be UTF-8 text.
    pub fn next_text(&mut self, what: &str) -> String {
        let f = self.next(what);
        assert_eq!(f.opcode, TEXT, "{what}: expected a text message, got {f:?}");
        String::from_utf8(f.payload).unwrap_or_else(|e| panic!("{what}: not UTF-8: {e}"))
    }

    /// The next message, which must be a JSON text.
    pub fn next_json(&mut self, what: &str) -> serde_json::Value {
        let text = self.next_text(what);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text:?}"))
    }

    /// Reads until a close frame arrives; returns its code and reason.
    pub fn recv_close(&mut self, timeout: Duration) -> io::Result<(u16, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let f = self.recv(deadline.saturating_duration_since(Instant::now()))?;
            if f.opcode == CLOSE {
                return Ok(f.close_code().unwrap_or((1005, String::new())));
            }
        }
    }

    /// Waits for the server to close the TCP connection (EOF or reset), discarding input.
    pub fn wait_eof(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 65536];
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self
                .stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// Keeps a WebSocket active: sends a control frame (PING, or an unsolicited PONG, which the
/// server answers with nothing and counts nowhere) every 50 ms from its own thread, so nothing
/// else the test waits for can delay it, until dropped.
pub struct KeepAlive {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeepAlive {
    pub fn start(ws: &Ws, opcode: u8) -> KeepAlive {
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut writer = Ws::from_stream(ws.stream.try_clone().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if writer.send(opcode, b"k").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        KeepAlive {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A JSON client on a node that publishes `size`-byte messages to `channels` in turn, as fast
/// as the node takes them, from its own thread (another one drains the replies) until dropped:
/// the node's Redis link(s) always have a backlog of publishes to write, so a SUBSCRIBE sent
/// meanwhile waits behind them.
pub struct Flood {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Flood {
    pub fn start(node: &Server, channels: &[String], size: usize) -> Flood {
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut reader = node.ws_json("/ws");
        let mut writer = Ws::from_stream(reader.stream.try_clone().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let data = "x".repeat(size);
        let commands: Vec<String> = channels
            .iter()
            .map(|c| format!(r#"{{"op":"publish","channel":"{c}","data":"{data}"}}"#))
            .collect();
        let write = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for command in commands.iter().cycle() {
                    if stop.load(Ordering::Relaxed)
                        || writer.send(TEXT, command.as_bytes()).is_err()
                    {
                        break;
                    }
                }
            })
        };
        let read = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match reader.recv(Duration::from_millis(100)) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
            })
        };
        Flood {
            stop,
            threads: vec![write, read],
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Waits until Redis routes a channel to every one of `clients`: `publish` sends a probe from
/// outside (PUBLISH, or SPUBLISH on a cluster) until every client saw one, then an end marker
/// every client reads up to, so nothing of the barrier is left in their streams. Any other
/// message meanwhile fails the test (a duplicate, a replay). A node subscribes when its first
/// client joins and does not wait, so a test counts deliveries only after this. Returns how
/// long it took (for printing, never for asserting).
pub fn probe_barrier(
    channel: &str,
    clients: &mut [&mut Ws],
    mut publish: impl FnMut(&[u8]),
) -> Duration {
    let started = Instant::now();
    let deadline = started + PATIENCE;
    let mut seen = vec![false; clients.len()];
    let mut round = 0;
    while seen.contains(&false) {
        assert!(
            Instant::now() < deadline,
            "{channel}: only {} of {} clients got a probe within {PATIENCE:?}",
            seen.iter().filter(|s| **s).count(),
            clients.len()
        );
        publish(format!("probe-{round}").as_bytes());
        round += 1;
        for (ws, seen) in clients.iter_mut().zip(&mut seen) {
            if *seen {
                continue;
            }
            match ws.recv(Duration::from_millis(50)) {
                Ok(f) if f.opcode == TEXT && f.text().contains("probe-") => *seen = true,
                Ok(f) => panic!("{channel}: unexpected frame before the barrier: {f:?}"),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => panic!("{channel}: client lost during the barrier: {e}"),
            }
        }
    }
    let took = started.elapsed();
    publish(b"probe-end");
    for ws in clients.iter_mut() {
        loop {
            let text = ws.next_text("barrier end marker");
            assert!(
                text.contains("probe-"),
                "{channel}: unexpected message {text:?}"
            );
            if text.contains("probe-end") {
                break;
            }
        }
    }
    took
}

/// Reads a WebSocket on its own thread until stopped, so a test can keep a client's input
/// drained (or collect it) while its main thread does something else. It answers pings itself
/// (counting them), passes every other frame to `on_frame` with the test's `state`, and fails
/// the test naming `what` if the connection is lost.
pub struct Reader<T> {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Ws, T, usize)>,
}

impl<T: Send + 'static> Reader<T> {
    pub fn start(
        mut ws: Ws,
        what: &str,
        mut state: T,
        mut on_frame: impl FnMut(&mut T, Frame) + Send + 'static,
    ) -> Reader<T> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let what = what.to_string();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut pings = 0;
                while !stop.load(Ordering::Relaxed) {
                    // A short wait, so a stop is noticed soon; nothing is timed here.
                    match ws.recv_frame(Duration::from_millis(100)) {
                        Ok(f) if f.opcode == PING => {
                            ws.send(PONG, &f.payload)
                                .unwrap_or_else(|e| panic!("{what}: answering a ping: {e}"));
                            pings += 1;
                        }
                        Ok(f) => on_frame(&mut state, f),
                        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                        Err(e) => panic!("{what} lost its connection: {e}"),
                    }
                }
                (ws, state, pings)
            })
        };
        Reader { stop, thread }
    }

    /// Stops reading; returns the client, the state and how many pings were answered. A panic
    /// of the reading thread (a failed check in `on_frame`) fails the test here.
    pub fn stop(self) -> (Ws, T, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

/// A node with one reactor and one WebSocket (the witness, on channel `witness`) that must
/// keep being served whatever other clients do to the node.
pub struct Witnessed {
    pub server: Server,
    pub witness: Ws,
    checks: usize,
}

impl Witnessed {
    /// `fanout --threads 1 ARGS`: one reactor, so the witness shares it with every offender.
    pub fn start(args: &[&str]) -> Witnessed {
        let mut all = vec!["--threads", "1"];
        all.extend_from_slice(args);
        let server = Server::start(&all);
        let witness = server.ws("/ws?channel=witness");
        Witnessed {
            server,
            witness,
            checks: 0,
        }
    }

    /// /healthz still answers and the witness still publishes and receives its own message.
    pub fn still_serving(&mut self, after: &str) {
        self.checks += 1;
        let (status, body) = self.server.get("/healthz");
        assert_eq!(
            (status, body.as_str()),
            (200, "ok\n"),
            "/healthz after {after}"
        );
        let text = format!("alive after {after} #{}", self.checks);
        self.witness.send_text(&text);
        let got = self.witness.next(&format!("witness after {after}"));
        assert_eq!(
            (got.opcode, got.text()),
            (TEXT, text),
            "witness after {after}"
        );
    }
}

/// A strictly parsed Prometheus text exposition: sample key (`name` or `name{labels}` as
/// written) -> value, plus the declared TYPE of each family.
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples: BTreeMap<String, f64>,
    pub types: BTreeMap<String, String>,
    pub helps: BTreeMap<String, String>,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

impl Metrics {
    /// Parses text format 0.0.4; every sample's family must have HELP and TYPE before it.
    pub fn parse(text: &str) -> Result<Metrics, String> {
        let mut m = Metrics::default();
        if !text.ends_with('\n') {
            return Err("exposition must end with a newline".into());
        }
        for (no, line) in text.lines().enumerate() {
            let no = no + 1;
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let kind = parts.next().unwrap_or("");
                let name = parts.next().unwrap_or("");
                let value = parts.next().unwrap_or("");
                if !valid_name(name) {
                    return Err(format!("line {no}: bad metric name {name:?}"));
                }
                match kind {
                    "HELP" => {
                        if value.trim().is_empty() {
                            return Err(format!("line {no}: empty HELP for {name}"));
                        }
                        if m.helps.insert(name.into(), value.into()).is_some() {
                            return Err(format!("line {no}: second HELP for {name}"));
                        }
                    }
                    "TYPE" => {
                        if !matches!(
                            value,
                            "counter" | "gauge" | "histogram" | "summary" | "untyped"
                        ) {
                            return Err(format!("line {no}: bad TYPE {value:?}"));
                        }
                        if m.samples.keys().any(|k| family(k) == name) {
                            return Err(format!("line {no}: TYPE for {name} after its samples"));
                        }
                        if m.types.insert(name.into(), value.into()).is_some() {
                            return Err(format!("line {no}: second TYPE for {name}"));
                        }
                    }
                    _ => {}
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (key, value) =
                split_sample(line).map_err(|e| format!("line {no}: {e}: {line:?}"))?;
            let name = family(&key);
            if !valid_name(name) {
                return Err(format!("line {no}: bad metric name {name:?}"));
            }
            let Some(kind) = m.types.get(name) else {
                return Err(format!("line {no}: sample of {name} without a TYPE line"));
            };
            if !m.helps.contains_key(name) {
                return Err(format!("line {no}: sample of {name} without a HELP line"));
            }
            if kind == "counter" && (value < 0.0 || !name.ends_with("_total")) {
                return Err(format!(
                    "line {no}: counter {name} must end in _total and be >= 0"
                ));
            }
            if m.samples.insert(key.clone(), value).is_some() {
                return Err(format!("line {no}: duplicate sample {key}"));
            }
        }
        Ok(m)
    }

    /// A sample's value; panics when it is missing, so a renamed metric fails loudly.
    pub fn get(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("metric {key} missing; have {:?}", self.samples.keys()))
    }

    pub fn closed(&self, reason: &str) -> f64 {
        self.get(&format!(
            "fanout_connections_closed_total{{reason=\"{reason}\"}}"
        ))
    }

    pub fn http(&self, status: &str) -> f64 {
        self.get(&format!(
            "fanout_http_responses_total{{status=\"{status}\"}}"
        ))
    }
}

fn family(key: &str) -> &str {
    key.split('{').next().unwrap_or(key)
}

/// Splits `name{a="b",c="d"} value [timestamp]` into a canonical key and the value.
fn split_sample(line: &str) -> Result<(String, f64), String> {
    let (key, rest) = if let Some(open) = line.find('{') {
        let mut i = open + 1;
        let bytes = line.as_bytes();
        let mut in_str = false;
        let mut close = None;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if in_str => i += 1,
                b'"' => in_str = !in_str,
                b'}' if !in_str => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        let close = close.ok_or("unterminated label set")?;
        let labels = &line[open + 1..close];
        for pair in split_labels(labels)? {
            let (k, v) = pair.split_once('=').ok_or("label without =")?;
            if !valid_name(k) || k.contains(':') {
                return Err(format!("bad label name {k:?}"));
            }
            if !(v.len() >= 2 && v.starts_with('"') && v.ends_with('"')) {
                return Err(format!("label value {v:?} not quoted"));
            }
        }
        (line[..close + 1].to_string(), &line[close + 1..])
    } else {
        let (k, r) = line.split_once(' ').ok_or("no value")?;
        let _ = r;
        (k.to_string(), &line[k.len()..])
    };
    let mut parts = rest.split_whitespace();
    let value = parts.next().ok_or("no value")?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok((key, value))
}

fn split_labels(labels: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let bytes = labels.as_bytes();
    let (mut start, mut in_str, mut i) = (0, false, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b',' if !in_str => {
                out.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if in_str {
        return Err("unterminated label value".into());
    }
    if start < labels.len() {
        out.push(&labels[start..]);
    }
    Ok(out)
}

/// The `p` quantile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A configuration file (`--config`) written for one test, removed when dropped.
pub struct ConfigFile(PathBuf);

impl ConfigFile {
    /// Writes `toml` to a file named after the test and the process.
    pub fn new(test: &str, toml: &str) -> ConfigFile {
        let path =
            std::env::temp_dir().join(format!("fanout-test-{}-{test}.toml", std::process::id()));
        std::fs::write(&path, toml).expect("writing a configuration file");
        ConfigFile(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("temporary paths are UTF-8 here")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
