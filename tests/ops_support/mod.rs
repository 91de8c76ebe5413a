//! Helpers shared by the operations (`ops_*`) and fault (`faults_*`) integration tests: spawn a
//! real `fanout` process or `redis-server`, speak plain HTTP and WebSocket over raw sockets, and
//! parse the Prometheus exposition strictly. Kept apart from tests/common so these tests can
//! check bytes on the wire (half frames, resets, stalls) without depending on a client library.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The server binary: `FANOUT_BIN` (tests/run points it at the release build), else the
/// binary cargo built for this test run.
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

/// Runs the fanout binary with `args` (and `env`), expecting it to stop by itself within 10 s
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
    let status = wait_exit(&mut child, Duration::from_secs(10));
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
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut stream: TcpStream = sock.into();
    let (status, head, _) = handshake(&mut stream, path, protocol).unwrap();
    assert_eq!(status, 101, "{head}");
    Ws::from_stream(stream)
}

/// A running fanout node; killed (by PID) when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything the node wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
    /// /metrics scrapes made through [`Server::metrics`] (each is one more HTTP 200).
    pub scrapes: std::sync::atomic::AtomicU64,
}

impl Server {
    /// Starts `fanout --listen 127.0.0.1:0 ARGS` and waits for its `listening on` line.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(fanout_bin())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", fanout_bin()));
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the node never blocks on a full stdout pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(10)) {
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
            scrapes: Default::default(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
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

/// A throwaway redis-server on a loopback port; killed (by PID) when dropped.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        let mut r = Redis { port, child: None };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = Command::new("redis-server")
                .args([
                    "--port",
                    &self.port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (tests/setup installs it)");
            let up_by = Instant::now() + Duration::from_secs(3);
            while Instant::now() < up_by {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                if self.ping() {
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills Redis hard (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    /// Sends one command and returns the raw reply bytes.
    pub fn command(&self, args: &[&str]) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("redis connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(cmd.as_bytes()).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        buf.truncate(n);
        buf
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 GET; returns status and body (the server closes after each response).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
}

/// Sends raw request bytes; reads the response to EOF and splits status and body.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line in {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `path` until it answers `status`; returns how long it took, or None on timeout.
pub fn wait_status(
    addr: SocketAddr,
    path: &str,
    status: u16,
    timeout: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if matches!(http_get(addr, path), Ok((s, _)) if s == status) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A server-to-client WebSocket frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

pub const TEXT: u8 = 1;
pub const BINARY: u8 = 2;
pub const CLOSE: u8 = 8;
pub const PING: u8 = 9;
pub const PONG: u8 = 10;

impl Frame {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// Code and reason of a close frame.
    pub fn close_code(&self) -> Option<(u16, String)> {
        if self.opcode != CLOSE || self.payload.len() < 2 {
            return None;
        }
        Some((
            u16::from_be_bytes([self.payload[0], self.payload[1]]),
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        ))
    }
}

/// Encodes a masked client frame.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    client_frame_with(0x80 | opcode, payload, [0x12, 0x34, 0x56, 0x78])
}

/// A client frame with full control of the first byte (FIN, RSV bits, opcode) and the mask.
pub fn client_frame_with(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![b0];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads a response head byte by byte (so no WebSocket bytes after it are swallowed).
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            // EINTR after the test process was stopped and continued: nothing was read.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => panic!("response head cut short: {other:?} after {head:?}"),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Parses one unmasked server frame from the front of `buf`: (frame, bytes used), or None.
pub fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    if buf.len() < at + len {
        return None;
    }
    Some((
        Frame {
            fin,
            opcode,
            payload: buf[at..at + len].to_vec(),
        },
        at + len,
    ))
}

/// Writes the upgrade request for `path` and returns the response head's status and headers.
pub fn handshake(
    stream: &mut TcpStream,
    path: &str,
    protocol: Option<&str>,
) -> io::Result<(u16, String, Vec<u8>)> {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(p) = protocol {
        req.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte at a time so no frame bytes after the head are swallowed.
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {}
            // EINTR after the test process was stopped and continued: nothing was read.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        head.push(byte[0]);
        if head.len() > 16384 {
            return Err(io::Error::other("response head too long"));
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad response {text:?}")))?;
    Ok((status, text, Vec::new()))
}

/// A minimal blocking WebSocket client over a raw socket.
pub struct Ws {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Ws {
    pub fn connect(addr: SocketAddr, path: &str, protocol: Option<&str>) -> io::Result<Ws> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let (status, head, _) = handshake(&mut stream, path, protocol)?;
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
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(io::ErrorKind::TimedOut.into())
                }
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
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
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
