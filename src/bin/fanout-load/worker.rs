//! A worker process: one mio event loop driving this process's share of the connections.
//!
//! The parent ([`crate::coordinator`]) starts workers as copies of this binary and talks to them
//! one line at a time. Worker to parent (stdout): `READY {..}` once its connections are open,
//! `PUBLISHED [per-room counts]` when the run's time is up, `RESULT {..}` at the end. Parent to
//! worker (stdin): `GO` to start the run, `EXPECT [per-room totals over all workers]` so the
//! worker knows how many deliveries to wait for before it reports losses.
//!
//! Connection `i` (global index over all workers) belongs to worker `i mod P`, targets URL
//! `i mod U`, joins room `i mod R`, and binds source address 127.0.0.(FIRST + i mod span).
//!
//! With `--compression` every connection offers permessage-deflate; all of a worker's
//! connections share one inflater ([`client::Receiver`]), so compression adds a few bytes per
//! connection to the tool, not a 32 KiB window each.

use std::collections::BTreeMap;
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use fanout::ws::frame::OpCode;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use serde::{Deserialize, Serialize};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use crate::client::{self, Assembly, Handshake, Receiver};
use crate::histogram::{Histogram, SparseHistogram};
use crate::options::{is_ipv4_loopback, Options, Scenario, Target};

/// Environment variable that turns this binary into a worker; its value is a [`WorkerSpec`].
pub const WORKER_ENV: &str = "FANOUT_LOAD_WORKER";

const WAKER: Token = Token(usize::MAX);
/// A publisher whose socket has this much unsent skips messages instead of buffering more: the
/// server is not reading, and an unbounded buffer would only hide that.
const MAX_UNSENT: usize = 1 << 20;
/// A churn cycle (connect, upgrade, close, close echo) that takes longer failed.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct WorkerSpec {
    pub options: Options,
    pub index: usize,
    pub count: usize,
}

/// What the worker reports at `READY`.
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct Ready {
    pub connected: u64,
    pub failed: u64,
}

/// Everything one worker measured; the parent sums these.
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct WorkerResult {
    pub connected: u64,
    pub connect_failed: u64,
    /// Connections open at GO that the server closed or dropped before the end.
    pub dropped: u64,
    pub published: u64,
    /// Messages not sent because the publisher's socket had 1 MiB unsent.
    pub publish_skipped: u64,
    pub received: u64,
    pub expected: u64,
    /// Messages without the load payload (someone else publishing on the channel).
    pub foreign: u64,
    /// Bytes read from the sockets of connections counted in the run, from GO to the end of
    /// the drain: frame headers, compressed or plain payloads, pings, everything on the wire.
    pub wire_bytes: u64,
    /// Payload bytes of the counted deliveries after inflating.
    pub payload_bytes: u64,
    /// Counted deliveries that arrived compressed (RSV1).
    pub compressed_deliveries: u64,
    /// Connections whose upgrade agreed permessage-deflate.
    pub deflate_connections: u64,
    pub latency_ns: SparseHistogram,
    pub handshake_ns: SparseHistogram,
    pub churn_cycles: u64,
    pub churn_failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub cpu_seconds: f64,
    pub run_seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Handshaking,
    Open,
    /// Churn: our close frame is sent, waiting for the echo.
    Closing,
    /// Removed at the end of the poll batch (its key must not be reused within the batch).
    Dead,
}

struct Conn {
    stream: TcpStream,
    index: usize,
    room: usize,
    target: usize,
    phase: Phase,
    started: Instant,
    /// Handshake bytes so far, or the unparsed tail of a frame.
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// permessage-deflate was agreed: RSV1 frames are allowed and inflated.
    deflate: bool,
    /// The data message being received (stamps of a fragmented one, compressed fragments).
    assembly: Assembly,
    /// Own messages sent and not yet received back (closed-loop publishing).
    in_flight: usize,
    publisher: bool,
    /// Open when the run started: its deliveries count towards the expected total.
    counted: bool,
}

#[derive(Default)]
struct Stats {
    result: WorkerResult,
    latency: Histogram,
    handshake: Histogram,
    published_per_room: Vec<u64>,
}

impl Stats {
    fn error(&mut self, what: impl Into<String>) {
        *self.result.errors.entry(what.into()).or_default() += 1;
    }
}

struct Worker {
    options: Options,
    index: usize,
    count: usize,
    targets: Vec<Target>,
    sources: Option<(u8, u8)>,
    poll: Poll,
    conns: Slab<Conn>,
    scratch: Vec<u8>,
    payload: Vec<u8>,
    receiver: Receiver,
    stats: Stats,
    dead: Vec<usize>,
    /// Publishers whose own message came back (closed-loop mode): each may send one more.
    refill: Vec<usize>,
    running: bool,
    /// Connections per room that were open at GO.
    members_at_go: Vec<u64>,
    handshakes_in_flight: usize,
    lines: mpsc::Receiver<String>,
}

pub fn run(spec_json: &str) -> Result<()> {
    let spec: WorkerSpec = serde_json::from_str(spec_json).context("bad worker spec")?;
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, lines) = mpsc::channel();
    // stdin is a pipe mio cannot register without extra features; a thread forwards its lines.
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                return;
            }
            let _ = waker.wake();
        }
        let _ = tx.send("EOF".into());
        let _ = waker.wake();
    });
    let rooms = spec.options.room_count();
    let mut worker = Worker {
        targets: spec.options.targets()?,
        sources: spec.options.source_octets()?,
        stats: Stats {
            published_per_room: vec![0; rooms],
            ..Stats::default()
        },
        options: spec.options,
        index: spec.index,
        count: spec.count,
        poll,
        conns: Slab::new(),
        scratch: vec![0; 64 * 1024],
        payload: Vec::new(),
        receiver: Receiver::default(),
        dead: Vec::new(),
        refill: Vec::new(),
        running: false,
        members_at_go: vec![0; rooms],
        handshakes_in_flight: 0,
        lines,
    };
    worker.main()
}

fn say(line: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Worker {
    fn main(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        if self.options.scenario != Scenario::Churn {
            self.connect_all(&mut events)?;
        }
        let ready = Ready {
            connected: self.stats.result.connected,
            failed: self.stats.result.connect_failed,
        };
        say(&format!("READY {}", serde_json::to_string(&ready)?))?;
        self.wait_for("GO", &mut events)?;
        self.run_phase(&mut events)?;
        let published = serde_json::to_string(&self.stats.published_per_room)?;
        say(&format!("PUBLISHED {published}"))?;
        let totals: Vec<u64> = serde_json::from_str(&self.wait_for("EXPECT", &mut events)?)
            .context("bad EXPECT line")?;
        self.drain(&totals, &mut events)?;
        let mut result = std::mem::take(&mut self.stats.result);
        result.latency_ns = self.stats.latency.to_sparse();
        result.handshake_ns = self.stats.handshake.to_sparse();
        result.cpu_seconds = crate::procfs::own_cpu_seconds();
        say(&format!("RESULT {}", serde_json::to_string(&result)?))?;
        Ok(())
    }

    /// Global indices of this worker's connections.
    fn my_indices(&self) -> impl Iterator<Item = usize> {
        (self.index..self.options.connections).step_by(self.count)
    }

    fn connect_all(&mut self, events: &mut Events) -> Result<()> {
        let mut pending: Vec<usize> = self.my_indices().collect();
        pending.reverse();
        let total = pending.len() as u64;
        let deadline = Instant::now() + Duration::from_secs_f64(self.options.connect_timeout);
        loop {
            while self.handshakes_in_flight < self.options.connect_concurrency {
                let Some(index) = pending.pop() else { break };
                self.start_connection(index);
            }
            let done = self.stats.result.connected + self.stats.result.connect_failed;
            if done >= total {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let stuck: Vec<usize> = (self.conns.iter())
                    .filter(|(_, c)| matches!(c.phase, Phase::Connecting | Phase::Handshaking))
                    .map(|(k, _)| k)
                    .collect();
                for key in stuck {
                    self.fail(key, "connect timeout");
                }
                self.stats.result.connect_failed += pending.len() as u64;
                if !pending.is_empty() {
                    *self
                        .stats
                        .result
                        .errors
                        .entry("connect timeout".into())
                        .or_default() += pending.len() as u64;
                }
                self.reap();
                return Ok(());
            }
            self.turn(events, Some(Duration::from_millis(50)))?;
            self.check_lines_during_setup()?;
        }
    }

    /// Before GO, the parent says nothing; EOF means it died, and we should not linger.
    fn check_lines_during_setup(&mut self) -> Result<()> {
        if let Ok(line) = self.lines.try_recv() {
            bail!("unexpected line from the parent before READY: {line}");
        }
        Ok(())
    }

    /// Keeps serving sockets until the parent sends a line starting with `word`; returns the rest.
    fn wait_for(&mut self, word: &str, events: &mut Events) -> Result<String> {
        loop {
            match self.lines.try_recv() {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(word) {
                        return Ok(rest.trim().to_string());
                    }
                    bail!("expected {word} from the parent, got {line:?}");
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => bail!("parent went away"),
            }
            self.turn(events, Some(Duration::from_millis(100)))?;
        }
    }

    fn start_connection(&mut self, index: usize) {
        let target_index = index % self.targets.len();
        let target = &self.targets[target_index];
        let source = match self.sources {
            Some((first, last)) if is_ipv4_loopback(&target.addr) => {
                let span = (last - first) as usize + 1;
                let octet = first + (index % span) as u8;
                Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet)),
                    0,
                ))
            }
            _ => None,
        };
        let stream = match open_socket(target.addr, source) {
            Ok(s) => s,
            Err(e) => {
                self.stats.error(format!("connect: {}", e.kind()));
                self.count_setup_failure();
                return;
            }
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let mut conn = Conn {
            stream,
            index,
            room: self.options.room_of(index),
            target: target_index,
            phase: Phase::Connecting,
            started: Instant::now(),
            inbuf: Vec::new(),
            out: Vec::new(),
            deflate: false,
            assembly: Assembly::default(),
            in_flight: 0,
            publisher: self.options.is_publisher(index),
            counted: false,
        };
        let registered = self.poll.registry().register(
            &mut conn.stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = registered {
            self.stats.error(format!("register: {}", e.kind()));
            self.count_setup_failure();
            return;
        }
        entry.insert(conn);
        self.handshakes_in_flight += 1;
    }

    fn count_setup_failure(&mut self) {
        if self.options.scenario == Scenario::Churn {
            self.stats.result.churn_failed += 1;
        } else {
            self.stats.result.connect_failed += 1;
        }
    }

    /// One poll and the handling of every event it returned.
    fn turn(&mut self, events: &mut Events, timeout: Option<Duration>) -> Result<()> {
        if let Err(e) = self.poll.poll(events, timeout) {
            if e.kind() != ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        for event in events.iter() {
            if event.token() == WAKER {
                continue;
            }
            let key = event.token().0;
            if !self.conns.contains(key) || self.conns[key].phase == Phase::Dead {
                continue;
            }
            if self.conns[key].phase == Phase::Connecting {
                self.finish_connect(key);
            }
            if event.is_writable() {
                self.flush(key);
            }
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                self.read(key);
            }
        }
        self.send_refills();
        self.reap();
        Ok(())
    }

    fn finish_connect(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        match conn.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                self.fail(key, &format!("connect: {}", e.kind()));
                return;
            }
        }
        match conn.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotConnected => return,
            Err(e) => {
                self.fail(key, &format!("connect: {}", e.kind()));
                return;
            }
        }
        let target = &self.targets[conn.target];
        let channel = self.options.channel_of(conn.index);
        conn.out = client::upgrade_request(
            &target.host,
            &target.path,
            &channel,
            self.options.token.as_deref(),
            self.options.compression,
        );
        conn.phase = Phase::Handshaking;
        self.flush(key);
    }

    fn flush(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.phase == Phase::Connecting {
            return;
        }
        let mut written = 0;
        let result = loop {
            if written == conn.out.len() {
                break Ok(());
            }
            match conn.stream.write(&conn.out[written..]) {
                Ok(0) => break Err("write: wrote zero bytes".to_string()),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(format!("write: {}", e.kind())),
            }
        };
        conn.out.drain(..written);
        if conn.out.is_empty() && conn.out.capacity() > 4096 {
            conn.out = Vec::new();
        }
        if let Err(reason) = result {
            self.fail(key, &reason);
        }
    }

    fn read(&mut self, key: usize) {
        // The scratch buffer is moved out so the handlers can borrow `self` mutably.
        let mut scratch = std::mem::take(&mut self.scratch);
        self.read_with(key, &mut scratch);
        self.scratch = scratch;
    }

    fn read_with(&mut self, key: usize, scratch: &mut [u8]) {
        loop {
            let conn = &mut self.conns[key];
            if conn.phase == Phase::Dead {
                return;
            }
            match conn.stream.read(scratch) {
                Ok(0) => {
                    let reason = match conn.phase {
                        Phase::Closing => "eof before close echo",
                        Phase::Handshaking | Phase::Connecting => "eof during handshake",
                        _ => "eof",
                    };
                    self.fail(key, reason);
                    return;
                }
                Ok(n) => {
                    if conn.counted {
                        self.stats.result.wire_bytes += n as u64;
                    }
                    let mut pending = std::mem::take(&mut conn.inbuf);
                    let (tail, outcome) = if pending.is_empty() {
                        let (consumed, outcome) = self.process(key, &scratch[..n]);
                        (scratch[consumed..n].to_vec(), outcome)
                    } else {
                        pending.extend_from_slice(&scratch[..n]);
                        let (consumed, outcome) = self.process(key, &pending);
                        pending.drain(..consumed);
                        (pending, outcome)
                    };
                    if let Err(reason) = outcome {
                        self.fail(key, &reason);
                        return;
                    }
                    let conn = &mut self.conns[key];
                    if conn.phase == Phase::Dead {
                        return;
                    }
                    conn.inbuf = tail;
                    if !conn.out.is_empty() {
                        self.flush(key);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(key, &format!("read: {}", e.kind()));
                    return;
                }
            }
        }
    }

    /// Handles received bytes; returns how many were consumed (the rest is an incomplete
    /// response head or frame).
    fn process(&mut self, key: usize, data: &[u8]) -> (usize, Result<(), String>) {
        let mut at = 0;
        if self.conns[key].phase == Phase::Handshaking {
            match client::check_response(data, self.options.compression) {
                Handshake::Incomplete => return (0, Ok(())),
                Handshake::Refused(why) => return (0, Err(why)),
                Handshake::Upgraded { head, deflate } => {
                    at = head;
                    self.upgraded(key, deflate);
                }
            }
        }
        let received_ns = now_ns();
        while at < data.len() {
            if self.conns[key].phase == Phase::Dead {
                break;
            }
            let frame = match client::next_frame(&data[at..], self.conns[key].deflate) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(why) => return (at, Err(why)),
            };
            at += frame.len;
            if let Err(why) = self.on_frame(key, frame, received_ns) {
                return (at, Err(why));
            }
        }
        (at, Ok(()))
    }

    fn upgraded(&mut self, key: usize, deflate: bool) {
        self.handshakes_in_flight -= 1;
        let conn = &mut self.conns[key];
        conn.deflate = deflate;
        self.stats
            .handshake
            .record(conn.started.elapsed().as_nanos() as u64);
        conn.inbuf = Vec::new();
        if self.options.scenario == Scenario::Churn {
            client::write_masked(
                &mut conn.out,
                OpCode::Close,
                &1000u16.to_be_bytes(),
                key as u32,
            );
            conn.phase = Phase::Closing;
        } else {
            conn.phase = Phase::Open;
            self.stats.result.connected += 1;
            self.stats.result.deflate_connections += u64::from(deflate);
        }
    }

    fn on_frame(
        &mut self,
        key: usize,
        frame: client::Frame<'_>,
        received_ns: u64,
    ) -> Result<(), String> {
        let conn = &mut self.conns[key];
        match frame.opcode {
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                let Some(message) = self.receiver.data_frame(&mut conn.assembly, &frame)? else {
                    return Ok(());
                };
                let Some((sent_ns, publisher)) = message.stamps else {
                    self.stats.result.foreign += 1;
                    return Ok(());
                };
                if !self.running && !conn.counted {
                    return Ok(());
                }
                if message.len != self.options.size {
                    // Every publisher builds --size bytes: anything else is a truncated or
                    // mis-inflated message (the stamps alone would not show it).
                    self.stats.error(format!(
                        "delivery of {} bytes, not --size {}",
                        message.len, self.options.size
                    ));
                }
                self.stats.result.received += 1;
                self.stats.result.payload_bytes += message.len as u64;
                self.stats.result.compressed_deliveries += u64::from(message.compressed);
                self.stats
                    .latency
                    .record(received_ns.saturating_sub(sent_ns));
                if conn.publisher && publisher == conn.index as u64 && conn.in_flight > 0 {
                    conn.in_flight -= 1;
                    if self.options.rate == 0.0 && self.running {
                        self.refill.push(key);
                    }
                }
            }
            OpCode::Ping => {
                client::write_masked(&mut conn.out, OpCode::Pong, frame.payload, key as u32);
            }
            OpCode::Pong => {}
            OpCode::Close => {
                let code = client::close_code(frame.payload);
                if conn.phase == Phase::Closing && code == 1000 {
                    self.stats.result.churn_cycles += 1;
                    self.remove(key);
                    return Ok(());
                }
                return Err(format!("closed by server: {code}"));
            }
        }
        Ok(())
    }

    /// Counts a failure according to the phase the connection was in, and removes it.
    fn fail(&mut self, key: usize, reason: &str) {
        let conn = &self.conns[key];
        if conn.phase == Phase::Dead {
            return;
        }
        let was = conn.phase;
        let counted = conn.counted;
        self.stats.error(reason);
        match (was, self.options.scenario) {
            (Phase::Connecting | Phase::Handshaking, Scenario::Churn) => {
                self.handshakes_in_flight -= 1;
                self.stats.result.churn_failed += 1;
            }
            (Phase::Connecting | Phase::Handshaking, _) => {
                self.handshakes_in_flight -= 1;
                self.stats.result.connect_failed += 1;
            }
            (Phase::Closing, _) => self.stats.result.churn_failed += 1,
            (Phase::Open, _) if counted || !self.running => {
                if counted {
                    self.stats.result.dropped += 1;
                } else {
                    // Lost after the upgrade but before GO: it never took part.
                    self.stats.result.connected -= 1;
                    self.stats.result.connect_failed += 1;
                }
            }
            _ => {}
        }
        self.remove(key);
    }

    fn remove(&mut self, key: usize) {
        self.conns[key].phase = Phase::Dead;
        self.dead.push(key);
    }

    /// Frees removed connections once no event of the current batch can refer to them.
    fn reap(&mut self) {
        for key in self.dead.drain(..) {
            if self.conns.contains(key) {
                let mut conn = self.conns.remove(key);
                let _ = self.poll.registry().deregister(&mut conn.stream);
            }
        }
    }

    fn send_refills(&mut self) {
        let refill = std::mem::take(&mut self.refill);
        for &key in &refill {
            if self.running && self.conns.contains(key) && self.conns[key].phase == Phase::Open {
                self.publish(key);
            }
        }
        self.refill = refill;
        self.refill.clear();
    }

    /// Queues one load message on a publisher and tries to write it at once.
    fn publish(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.out.len() >= MAX_UNSENT {
            self.stats.result.publish_skipped += 1;
            return;
        }
        client::load_payload(
            &mut self.payload,
            self.options.payload_kind,
            now_ns(),
            conn.index as u64,
            conn.room,
            self.options.size,
        );
        client::write_masked(
            &mut conn.out,
            OpCode::Text,
            &self.payload,
            conn.index as u32,
        );
        conn.in_flight += 1;
        self.stats.result.published += 1;
        self.stats.published_per_room[conn.room] += 1;
        self.flush(key);
    }

    fn run_phase(&mut self, events: &mut Events) -> Result<()> {
        let mut publishers = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            if conn.phase == Phase::Open {
                conn.counted = true;
                self.members_at_go[conn.room] += 1;
                if conn.publisher {
                    publishers.push(key);
                }
            }
        }
        self.running = true;
        let start = Instant::now();
        let duration = Duration::from_secs_f64(self.options.duration);
        let scenario = self.options.scenario;
        let publishing = matches!(scenario, Scenario::Broadcast | Scenario::Rooms);
        let total_publishers = self.options.total_publishers().max(1) as f64;
        let local_rate = self.options.rate * publishers.len() as f64 / total_publishers;
        let churn_slots = self.churn_slots();
        let mut sent: u64 = 0;
        let mut churn_started: u64 = 0;
        if publishing && self.options.rate == 0.0 {
            for _ in 0..self.options.window {
                for &key in &publishers {
                    if self.conns.contains(key) && self.conns[key].phase == Phase::Open {
                        self.publish(key);
                    }
                }
            }
        }
        loop {
            let elapsed = start.elapsed();
            if elapsed >= duration {
                break;
            }
            let mut timeout = (duration - elapsed).min(Duration::from_millis(100));
            if publishing && self.options.rate > 0.0 && !publishers.is_empty() {
                let due = (elapsed.as_secs_f64() * local_rate) as u64;
                // Bounded burst per turn, so a stall cannot turn into an unbounded catch-up.
                let mut burst = 0;
                while sent < due && burst < 10_000 {
                    let key = publishers[(sent % publishers.len() as u64) as usize];
                    if self.conns.contains(key) && self.conns[key].phase == Phase::Open {
                        self.publish(key);
                    }
                    sent += 1;
                    burst += 1;
                }
                let next = Duration::from_secs_f64((sent + 1) as f64 / local_rate);
                timeout = timeout.min(next.saturating_sub(start.elapsed()));
            }
            if scenario == Scenario::Churn {
                let due = if self.options.rate > 0.0 {
                    (elapsed.as_secs_f64() * self.options.rate / self.count as f64) as u64
                } else {
                    u64::MAX
                };
                // Every live connection in churn is a cycle in flight.
                while churn_started < due && self.conns.len() < churn_slots {
                    let index = self.index + (churn_started as usize) * self.count;
                    self.start_connection(index);
                    churn_started += 1;
                }
                self.expire_cycles();
                if self.options.rate > 0.0 {
                    let per_worker = self.options.rate / self.count as f64;
                    let next = Duration::from_secs_f64((churn_started + 1) as f64 / per_worker);
                    timeout = timeout.min(next.saturating_sub(start.elapsed()));
                }
            }
            self.turn(events, Some(timeout))?;
        }
        self.running = false;
        self.stats.result.run_seconds = start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Churn handshakes this worker may have in flight: its share of `--connections`.
    fn churn_slots(&self) -> usize {
        let (n, p) = (self.options.connections, self.count);
        (n / p + usize::from(self.index < n % p)).max(1)
    }

    fn expire_cycles(&mut self) {
        let expired: Vec<usize> = (self.conns.iter())
            .filter(|(_, c)| c.phase != Phase::Dead && c.started.elapsed() > CYCLE_TIMEOUT)
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            self.fail(key, "churn cycle timeout");
        }
        self.reap();
    }

    /// Waits until every expected delivery arrived (or the drain time is up), then records
    /// losses. For churn, lets the cycles in flight finish.
    fn drain(&mut self, totals: &[u64], events: &mut Events) -> Result<()> {
        // Connections dropped during the run still count: what they missed is lost.
        let expected: u64 = (self.members_at_go.iter().zip(totals))
            .map(|(members, total)| members * total)
            .sum();
        self.stats.result.expected = expected;
        let deadline = Instant::now() + Duration::from_secs_f64(self.options.drain);
        // Deliveries keep counting while draining.
        self.running = false;
        loop {
            let done = match self.options.scenario {
                Scenario::Churn => self.conns.is_empty(),
                _ => self.stats.result.received >= expected,
            };
            if done || Instant::now() >= deadline {
                break;
            }
            self.turn(events, Some(Duration::from_millis(20)))?;
        }
        if self.options.scenario == Scenario::Churn {
            let left: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
            for key in left {
                self.fail(key, "churn cycle unfinished at the end");
            }
            self.reap();
        }
        Ok(())
    }
}

fn open_socket(addr: SocketAddr, source: Option<SocketAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(source) = source {
        socket.bind(&source.into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(115) || e.kind() == ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}
