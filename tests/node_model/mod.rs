//! A stateful model of a whole fanout node, shared by the property test (tests/proptest_node.rs)
//! and the libFuzzer target (fuzz/fuzz_targets/node_ops.rs).
//!
//! A case builds an in-process node (`server::build`, one reactor, small limits), then applies a
//! bounded sequence of client operations ([`Op`]) over real loopback sockets: connect in raw or
//! JSON mode, subscribe, unsubscribe, publish, stop and resume reading, ping floods, invalid
//! JSON, oversized and malformed frames, close, FIN and reset. The client sockets are
//! nonblocking and the reactor is stepped on the calling thread between operations, so nothing
//! can deadlock and every step is followed by `Reactor::audit`.
//!
//! What the checker holds the node to, exactly (it only accepts what the protocol allows, and
//! allows for everything that is legitimately lost):
//! - a client receives a message only of a channel it is subscribed to at that point of its own
//!   stream: raw mode its one channel; JSON mode the channels whose `ok` reply it has read (a
//!   subscribe takes effect with its reply, an unsubscribe ends with its reply), each message at
//!   most once, with the payload and opcode that were published;
//! - per publisher and channel, messages arrive in publish order and without a gap while the
//!   subscriber stays subscribed and open (a slow consumer is closed, never skipped over), and all
//!   subscribers of a channel see its messages in one order;
//! - every JSON request gets exactly one reply, in request order, `ok` or `error` as predicted
//!   from the requests before it (the subscription limit), with its `id`; every ping one pong;
//! - a server close carries the code the client provoked (1009, 1007, 1002, the echo of its own
//!   close), or 1008 `slow consumer` (any client may fall behind) or `rate limit` (when on);
//!   nothing follows a close frame;
//! - at the end, every client still open gets a marker message on each channel it holds, every
//!   outstanding reply arrives, and once all clients are reset the node holds no connection.
//!
//! Every loop is bounded: ops per case, messages and bytes per op, turns per op, and the waits at
//! the end (a deadline; reaching it is a failure, since a correct node finishes in milliseconds).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fanout::config::{Args, Config};
use fanout::server::{build, Node};
use serde_json::Value;

use crate::ops_support::{
    client_frame, client_frame_with, parse_frame, Frame, BINARY, CLOSE, PING, PONG, TEXT,
};

/// The channels clients use; `chat` is also where a raw client without `?channel=` lands.
pub const CHANNELS: [&str; 5] = ["a", "b", "c", "d", "chat"];
const CHAT: usize = 4;
/// Client slots an op can name.
pub const SLOTS: usize = 4;
/// Most ops run per case (longer inputs are cut).
pub const MAX_OPS: usize = 48;
pub const MAX_MESSAGE: usize = 512;
pub const MAX_QUEUE: usize = 2048;
pub const MAX_SUBSCRIPTIONS: usize = 4;
/// `--max-message-rate` when a case turns the rate limit on.
pub const RATE: u32 = 30;
/// Most messages one publish op sends, and the longest padding of one.
pub const MAX_BATCH: u8 = 24;
pub const MAX_PAD: u16 = 380;
pub const MAX_PINGS: u8 = 64;
pub const MAX_IDLE_TURNS: u8 = 16;
/// Close codes a client may send (all valid on the wire, so the server echoes them).
pub const CLOSE_CODES: [u16; 4] = [1000, 1001, 3000, 4999];
/// Kinds of [`Op::InvalidJson`] and [`Op::ProtocolError`].
pub const INVALID_JSON_KINDS: u8 = 7;
pub const PROTOCOL_ERROR_KINDS: u8 = 8;

/// Reactor turns after every op, with a zero poll timeout: enough for loopback bytes to move
/// both ways, few enough that requests pile up and are read in batches as well.
const TURNS_PER_OP: usize = 3;
/// The end-of-case waits: generous, since a correct node needs milliseconds.
const SETTLE: Duration = Duration::from_secs(5);
/// Bytes read from one client socket per pump, so one pump stays bounded.
const READ_CAP: usize = 1 << 20;
const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

const CONTINUATION: u8 = 0;
const FIN: u8 = 0x80;

/// Node configuration of one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// `--max-message-rate RATE` instead of no limit.
    pub rate_limit: bool,
}

/// One client operation. Slots and channels are indices (taken modulo [`SLOTS`] and the number of
/// [`CHANNELS`]); an op on an empty slot, or on a client that already ended its side, does nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Opens a WebSocket in the slot if it is free (or its client is gone): raw mode on `channel`
    /// (none: the default `chat`), or JSON mode, subscribed to `channel` at once if given. `tiny`:
    /// a minimal receive buffer, so the server's queue fills as soon as it stops reading.
    Connect {
        slot: u8,
        json: bool,
        channel: Option<u8>,
        tiny: bool,
    },
    /// JSON mode only (a raw client's text would be a publish).
    Subscribe {
        slot: u8,
        channel: u8,
    },
    Unsubscribe {
        slot: u8,
        channel: u8,
    },
    /// `count` messages back to back (raw mode: to its own channel, as text or `binary`; JSON
    /// mode: to `channel`). `string`: a payload that is not JSON text. `fragmented`: each message
    /// in two frames, cut at `cut`/255 of its length, with a ping of `ping` bytes between the two
    /// frames of the first one. `split`: the bytes are written in two halves with reactor turns
    /// in between, so frames straddle reads.
    Publish {
        slot: u8,
        channel: u8,
        count: u8,
        pad: u16,
        binary: bool,
        string: bool,
        fragmented: bool,
        cut: u8,
        ping: u8,
        split: bool,
    },
    StopReading {
        slot: u8,
    },
    ReadAgain {
        slot: u8,
    },
    /// `count` pings of `size` bytes in one write.
    PingFlood {
        slot: u8,
        count: u8,
        size: u8,
    },
    /// JSON mode: a text frame that is not a valid command (or a binary frame).
    InvalidJson {
        slot: u8,
        kind: u8,
    },
    /// A message over `--max-message` (close 1009), in one frame or two fragments.
    Oversized {
        slot: u8,
        fragmented: bool,
    },
    /// A text message that is not UTF-8 (close 1007).
    BadUtf8 {
        slot: u8,
    },
    /// A frame the protocol forbids (close 1002).
    ProtocolError {
        slot: u8,
        kind: u8,
    },
    /// A close frame with `code` (echoed).
    Close {
        slot: u8,
        code: u16,
    },
    /// Drops the socket: FIN, or a reset (SO_LINGER 0) when `reset`.
    Drop {
        slot: u8,
        reset: bool,
    },
    /// More reactor turns, waiting up to 1 ms each.
    Idle {
        turns: u8,
    },
}

/// Decodes fuzzer bytes into a case: one byte of setup, then four bytes per op (six for a
/// publish); missing bytes read as zero, and at most [`MAX_OPS`] ops are taken.
pub fn decode(data: &[u8]) -> (Setup, Vec<Op>) {
    let mut bytes = data.iter().copied();
    let setup = Setup {
        rate_limit: bytes.next().is_some_and(|b| b % 4 == 3),
    };
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS {
        let Some(tag) = bytes.next() else { break };
        let mut next = || bytes.next().unwrap_or(0);
        let (a, b, c) = (next(), next(), next());
        let slot = a % SLOTS as u8;
        let flags = a / SLOTS as u8;
        let channel = b % CHANNELS.len() as u8;
        ops.push(match tag % 14 {
            0 => Op::Connect {
                slot,
                json: flags & 1 != 0,
                channel: (b % 8 < CHANNELS.len() as u8).then_some(b % 8),
                tiny: flags & 2 != 0,
            },
            1 => Op::Subscribe { slot, channel },
            2 => Op::Unsubscribe { slot, channel },
            3 => Op::Publish {
                slot,
                channel,
                count: 1 + c % MAX_BATCH,
                pad: ((b / CHANNELS.len() as u8) as u16 * 8).min(MAX_PAD),
                binary: flags & 1 != 0,
                string: flags & 2 != 0,
                fragmented: flags & 4 != 0,
                split: flags & 8 != 0,
                cut: next(),
                ping: next() % 126,
            },
            4 => Op::StopReading { slot },
            5 => Op::ReadAgain { slot },
            6 => Op::PingFlood {
                slot,
                count: 1 + b % MAX_PINGS,
                size: c % 126,
            },
            7 => Op::InvalidJson {
                slot,
                kind: b % INVALID_JSON_KINDS,
            },
            8 => Op::Oversized {
                slot,
                fragmented: b & 1 != 0,
            },
            9 => Op::BadUtf8 { slot },
            10 => Op::ProtocolError {
                slot,
                kind: b % PROTOCOL_ERROR_KINDS,
            },
            11 => Op::Close {
                slot,
                code: CLOSE_CODES[b as usize % CLOSE_CODES.len()],
            },
            12 => Op::Drop {
                slot,
                reset: b & 1 != 0,
            },
            _ => Op::Idle {
                turns: 1 + b % MAX_IDLE_TURNS,
            },
        });
    }
    (setup, ops)
}

/// What a case did, so tests can check that the interesting paths were reached.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub ops: usize,
    pub deliveries: u64,
    pub replies: u64,
    /// Server close frames seen, by code and reason (`1008 slow consumer`, `1009`, ...).
    pub closes: BTreeMap<String, u64>,
    /// Connections the server ended that the client had not asked to end (close frame or EOF).
    pub server_ended: u64,
}

/// Runs one case; `Err` says which property failed and where.
pub fn run(setup: Setup, ops: &[Op]) -> Result<Stats, String> {
    let mut model = Model::new(setup)?;
    for (i, op) in ops.iter().take(MAX_OPS).enumerate() {
        model
            .apply(op)
            .and_then(|()| model.audit())
            .and_then(|()| model.step(TURNS_PER_OP, 0))
            .map_err(|e| format!("op {i} {op:?}: {e}"))?;
        model.stats.ops += 1;
    }
    model
        .finish()
        .map_err(|e| format!("after the last op: {e}"))
}

/// A JSON reply the client expects next.
#[derive(Debug)]
struct Expect {
    /// The `id` the reply must carry (`None`: none).
    id: Option<u64>,
    ok: bool,
    effect: Effect,
}

#[derive(Debug)]
enum Effect {
    None,
    Subscribe(usize),
    Unsubscribe(usize),
}

/// A message as published, found again through the sequence number in its payload.
struct Published {
    publisher: usize,
    channel: usize,
    /// Position among this publisher's messages to this channel.
    index: u32,
    /// The opcode a raw subscriber must receive it with.
    opcode: u8,
    payload: Vec<u8>,
}

struct Client {
    id: usize,
    /// `None` once the test dropped it.
    stream: Option<TcpStream>,
    json: bool,
    /// Raw mode: its channel.
    raw_channel: Option<usize>,
    reading: bool,
    /// The 101 response head was read; frames follow.
    upgraded: bool,
    inbuf: Vec<u8>,
    /// Bytes not yet taken by the socket.
    out: Vec<u8>,
    /// A write failed (the server already closed): the rest of `out` will never be read.
    write_failed: bool,
    /// The subscriptions the server will hold once it ran every request sent so far.
    predicted: BTreeSet<usize>,
    /// The subscriptions in effect at the point of the stream read so far.
    confirmed: BTreeSet<usize>,
    replies: VecDeque<Expect>,
    pongs: VecDeque<Vec<u8>>,
    /// The client sent a frame that ends the connection: the close code it provoked. It sends
    /// nothing after that.
    ending: Option<u16>,
    /// The server's close frame was read: any further frame is a violation.
    closed: Option<(u16, String)>,
    eof: bool,
    /// Per (publisher, channel): index of the last message received.
    last: HashMap<(usize, usize), u32>,
    seen: HashSet<u64>,
    /// Per channel: sequence numbers in the order received.
    received: Vec<Vec<u64>>,
}

impl Client {
    fn gone(&self) -> bool {
        self.closed.is_some() || self.eof || self.stream.is_none()
    }

    /// Still open as far as the client can tell, and not ending: it takes new ops.
    fn active(&self) -> bool {
        !self.gone() && self.ending.is_none() && !self.write_failed
    }
}

struct Model {
    node: Node,
    addr: SocketAddr,
    events: mio::Events,
    setup: Setup,
    clients: Vec<Client>,
    slots: [Option<usize>; SLOTS],
    published: HashMap<u64, Published>,
    /// Messages per (publisher, channel) so far.
    counts: HashMap<(usize, usize), u32>,
    next_seq: u64,
    next_id: u64,
    stats: Stats,
}

fn io_err(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Model {
    fn new(setup: Setup) -> Result<Model, String> {
        let mut args = vec![
            "fanout".to_string(),
            "--listen=127.0.0.1:0".into(),
            "--threads=1".into(),
            format!("--max-queue={MAX_QUEUE}"),
            format!("--max-message={MAX_MESSAGE}"),
            format!("--max-subscriptions={MAX_SUBSCRIPTIONS}"),
        ];
        if setup.rate_limit {
            args.push(format!("--max-message-rate={RATE}"));
        }
        let config = Config::from_args(<Args as clap::Parser>::parse_from(args))
            .map_err(|e| format!("config: {e}"))?;
        let node = build(config).map_err(|e| format!("build: {e}"))?;
        Ok(Model {
            addr: node.local_addr,
            node,
            events: mio::Events::with_capacity(256),
            setup,
            clients: Vec::new(),
            slots: [None; SLOTS],
            published: HashMap::new(),
            counts: HashMap::new(),
            next_seq: 1,
            next_id: 1,
            stats: Stats::default(),
        })
    }

    fn audit(&self) -> Result<(), String> {
        self.node.reactors[0]
            .audit()
            .map_err(|e| format!("audit: {e}"))
    }

    /// `turns` reactor turns, each followed by an audit and a pump of every client.
    fn step(&mut self, turns: usize, wait_ms: u64) -> Result<(), String> {
        for _ in 0..turns {
            self.node.reactors[0]
                .turn(&mut self.events, Some(Duration::from_millis(wait_ms)))
                .map_err(io_err("turn"))?;
            self.audit()?;
            self.pump()?;
        }
        Ok(())
    }

    /// The active client in `slot`.
    fn active(&self, slot: u8) -> Option<usize> {
        let i = self.slots[slot as usize % SLOTS]?;
        self.clients[i].active().then_some(i)
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Connect {
                slot,
                json,
                channel,
                tiny,
            } => {
                let slot = slot as usize % SLOTS;
                if let Some(i) = self.slots[slot] {
                    if !self.clients[i].gone() {
                        return Ok(());
                    }
                }
                let channel = channel.map(|c| c as usize % CHANNELS.len());
                let i = self.connect(json, channel, tiny)?;
                self.slots[slot] = Some(i);
            }
            Op::Subscribe { slot, channel } | Op::Unsubscribe { slot, channel } => {
                let Some(i) = self.active(slot) else {
                    return Ok(());
                };
                if !self.clients[i].json {
                    return Ok(());
                }
                let ch = channel as usize % CHANNELS.len();
                let id = self.id();
                let c = &mut self.clients[i];
                let (verb, expect) = if matches!(op, Op::Subscribe { .. }) {
                    // The server answers from the state its earlier requests left.
                    let ok = c.predicted.contains(&ch) || c.predicted.len() < MAX_SUBSCRIPTIONS;
                    if ok {
                        c.predicted.insert(ch);
                    }
                    let effect = if ok {
                        Effect::Subscribe(ch)
                    } else {
                        Effect::None
                    };
                    ("subscribe", (ok, effect))
                } else {
                    c.predicted.remove(&ch);
                    ("unsubscribe", (true, Effect::Unsubscribe(ch)))
                };
                c.replies.push_back(Expect {
                    id: Some(id),
                    ok: expect.0,
                    effect: expect.1,
                });
                let cmd = format!(
                    "{{\"op\":\"{verb}\",\"channel\":\"{}\",\"id\":{id}}}",
                    CHANNELS[ch]
                );
                self.send(i, &client_frame(TEXT, cmd.as_bytes()))?;
            }
            Op::Publish {
                slot,
                channel,
                count,
                pad,
                binary,
                string,
                fragmented,
                cut,
                ping,
                split,
            } => {
                let Some(i) = self.active(slot) else {
                    return Ok(());
                };
                let ch = match self.clients[i].raw_channel {
                    Some(ch) => ch,
                    None => channel as usize % CHANNELS.len(),
                };
                let count = count.clamp(1, MAX_BATCH);
                let pad = pad.min(MAX_PAD) as usize;
                let mut bytes = Vec::new();
                for n in 0..count {
                    let (opcode, body) = self.publication(i, ch, pad, binary, string);
                    if !fragmented {
                        bytes.extend(client_frame(opcode, &body));
                        continue;
                    }
                    let at = body.len() * cut as usize / 255;
                    bytes.extend(client_frame_with(opcode, &body[..at], MASK));
                    if n == 0 {
                        // Control frames may come between the frames of a message (RFC 6455 5.4).
                        let payload = vec![b'f'; ping.min(125) as usize];
                        bytes.extend(client_frame(PING, &payload));
                        self.clients[i].pongs.push_back(payload);
                    }
                    bytes.extend(client_frame_with(FIN | CONTINUATION, &body[at..], MASK));
                }
                if split {
                    let half = bytes.len() / 2;
                    self.send(i, &bytes[..half])?;
                    self.step(1, 0)?;
                    self.send(i, &bytes[half..])?;
                } else {
                    self.send(i, &bytes)?;
                }
            }
            Op::StopReading { slot } | Op::ReadAgain { slot } => {
                if let Some(i) = self.slots[slot as usize % SLOTS] {
                    self.clients[i].reading = matches!(op, Op::ReadAgain { .. });
                }
            }
            Op::PingFlood { slot, count, size } => {
                let Some(i) = self.active(slot) else {
                    return Ok(());
                };
                let mut bytes = Vec::new();
                for n in 0..count.clamp(1, MAX_PINGS) {
                    let mut payload = vec![b'p'; size.min(125) as usize];
                    if let Some(first) = payload.first_mut() {
                        *first = n;
                    }
                    bytes.extend(client_frame(PING, &payload));
                    self.clients[i].pongs.push_back(payload);
                }
                self.send(i, &bytes)?;
            }
            Op::InvalidJson { slot, kind } => {
                let Some(i) = self.active(slot) else {
                    return Ok(());
                };
                if !self.clients[i].json {
                    return Ok(());
                }
                let id = self.id();
                // (frame, whether the server can read the id back from it)
                let (frame, with_id) = match kind % INVALID_JSON_KINDS {
                    0 => (
                        format!("{{\"op\":\"subscribe\",\"channel\":\"a\",\"id\":{id}"),
                        false,
                    ),
                    1 => (format!("{{\"op\":\"fly\",\"id\":{id}}}"), true),
                    2 => (
                        format!("{{\"op\":\"subscribe\",\"channel\":\"no spaces\",\"id\":{id}}}"),
                        true,
                    ),
                    3 => (
                        format!("{{\"op\":\"publish\",\"channel\":\"a\",\"id\":{id}}}"),
                        true,
                    ),
                    4 => (
                        format!("{{\"op\":\"subscribe\",\"channel\":5,\"id\":{id}}}"),
                        true,
                    ),
                    5 => ("\"just a string\"".to_string(), false),
                    _ => (String::new(), false),
                };
                let bytes = if kind % INVALID_JSON_KINDS == 6 {
                    // A binary frame: JSON mode refuses it with an error reply.
                    client_frame(BINARY, b"{\"op\":\"subscribe\",\"channel\":\"a\"}")
                } else {
                    client_frame(TEXT, frame.as_bytes())
                };
                self.clients[i].replies.push_back(Expect {
                    id: with_id.then_some(id),
                    ok: false,
                    effect: Effect::None,
                });
                self.send(i, &bytes)?;
            }
            Op::Oversized { slot, fragmented } => {
                let Some(i) = self.active(slot) else {
                    return Ok(());
                };
                let bytes = if fragmented {
                    let part = vec![b'o'; MAX_MESSAGE / 2 + 50];
                    let mut b = client_frame_with(TEXT, &part, MASK);
                    b.extend(client_frame_with(FIN | CONTINUATION, &part, MASK));
                    b
                } else {
                    client_frame(TEXT, &vec![b'o'; MAX_MESSAGE + 1])
                };
                self.ending(i, 1009, &bytes)?;
            }
            Op::BadUtf8 { slot } => {
                let Some(i) = self.active(slot) else {
                    return Ok(());
                };
                self.ending(i, 1007, &client_frame(TEXT, &[b'x', 0xC3, 0x28]))?;
            }
            Op::ProtocolError { slot, kind } => {
                let Some(i) = self.active(slot) else {
                    return Ok(());
                };
                let bytes = match kind % PROTOCOL_ERROR_KINDS {
                    0 => client_frame_with(FIN | 0x40 | TEXT, b"rsv1", MASK),
                    1 => client_frame_with(FIN | 0x3, b"", MASK),
                    2 => client_frame_with(FIN | CONTINUATION, b"nothing to continue", MASK),
                    3 => client_frame_with(PING, b"unfinished ping", MASK),
                    4 => client_frame(PING, &[b'l'; 126]),
                    5 => client_frame(CLOSE, &1005u16.to_be_bytes()),
                    6 => client_frame(CLOSE, &[3]),
                    _ => {
                        let mut b = client_frame_with(TEXT, b"first", MASK);
                        b.extend(client_frame(TEXT, b"a new message inside the first"));
                        b
                    }
                };
                self.ending(i, 1002, &bytes)?;
            }
            Op::Close { slot, code } => {
                let Some(i) = self.active(slot) else {
                    return Ok(());
                };
                self.ending(i, code, &client_frame(CLOSE, &code.to_be_bytes()))?;
            }
            Op::Drop { slot, reset } => {
                let slot = slot as usize % SLOTS;
                if let Some(i) = self.slots[slot].take() {
                    let c = &mut self.clients[i];
                    if let Some(stream) = c.stream.take() {
                        if reset {
                            let _ =
                                socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        }
                    }
                }
            }
            Op::Idle { turns } => self.step(turns.clamp(1, MAX_IDLE_TURNS) as usize, 1)?,
        }
        Ok(())
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Registers one message from client `i` to channel `ch` and returns the frame opcode and
    /// body that publish it.
    fn publication(
        &mut self,
        i: usize,
        ch: usize,
        pad: usize,
        binary: bool,
        string: bool,
    ) -> (u8, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let publisher = self.clients[i].id;
        let index = self.counts.entry((publisher, ch)).or_insert(0);
        let this = *index;
        *index += 1;
        let pad: String = (0..pad).map(|k| (b'a' + (k % 26) as u8) as char).collect();
        let name = CHANNELS[ch];
        let payload = if string {
            format!("s:{name}:{seq}:{pad}")
        } else {
            format!("{{\"ch\":\"{name}\",\"seq\":{seq},\"pad\":\"{pad}\"}}")
        };
        let (opcode, body) = if self.clients[i].json {
            let id = self.id();
            let data = if string {
                format!("\"{payload}\"")
            } else {
                payload.clone()
            };
            self.clients[i].replies.push_back(Expect {
                id: Some(id),
                ok: true,
                effect: Effect::None,
            });
            let cmd = format!(
                "{{\"op\":\"publish\",\"channel\":\"{name}\",\"data\":{data},\"id\":{id}}}"
            );
            (TEXT, cmd.into_bytes())
        } else if binary {
            (BINARY, payload.clone().into_bytes())
        } else {
            (TEXT, payload.clone().into_bytes())
        };
        assert!(
            body.len() <= MAX_MESSAGE,
            "the driver built a {}-byte message, over --max-message",
            body.len()
        );
        self.published.insert(
            seq,
            Published {
                publisher,
                channel: ch,
                index: this,
                opcode,
                payload: payload.into_bytes(),
            },
        );
        (opcode, body)
    }

    /// Sends the client's last frames: the server must close with `code`.
    fn ending(&mut self, i: usize, code: u16, bytes: &[u8]) -> Result<(), String> {
        self.clients[i].ending = Some(code);
        self.send(i, bytes)
    }

    fn connect(&mut self, json: bool, channel: Option<usize>, tiny: bool) -> Result<usize, String> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .map_err(io_err("socket"))?;
        if tiny {
            // The kernel rounds this up to its minimum: a window of a couple of KiB. The small
            // segment size matters more: the server socket sizes its send buffer from it, and with
            // loopback's 64 KiB segments that buffer alone holds megabytes; with 536-byte ones a
            // client that stops reading fills the kernel's buffers after ~35 KiB.
            sock.set_recv_buffer_size(1024)
                .map_err(io_err("SO_RCVBUF"))?;
            sock.set_tcp_mss(536).map_err(io_err("TCP_MAXSEG"))?;
        }
        // A loopback connect completes in the kernel's backlog; the reactor accepts it later.
        sock.connect(&self.addr.into()).map_err(io_err("connect"))?;
        let stream: TcpStream = sock.into();
        stream.set_nodelay(true).map_err(io_err("nodelay"))?;
        stream
            .set_nonblocking(true)
            .map_err(io_err("nonblocking"))?;
        let path = match channel {
            Some(ch) => format!("/ws?channel={}", CHANNELS[ch]),
            None => "/ws".to_string(),
        };
        let protocol = if json {
            "Sec-WebSocket-Protocol: fanout.json\r\n"
        } else {
            ""
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
        );
        let (raw_channel, subscribed) = match (json, channel) {
            (false, ch) => (Some(ch.unwrap_or(CHAT)), ch.or(Some(CHAT))),
            (true, ch) => (None, ch),
        };
        let id = self.clients.len();
        self.clients.push(Client {
            id,
            stream: Some(stream),
            json,
            raw_channel,
            reading: true,
            upgraded: false,
            inbuf: Vec::new(),
            out: Vec::new(),
            write_failed: false,
            predicted: subscribed.into_iter().collect(),
            confirmed: subscribed.into_iter().collect(),
            replies: VecDeque::new(),
            pongs: VecDeque::new(),
            ending: None,
            closed: None,
            eof: false,
            last: HashMap::new(),
            seen: HashSet::new(),
            received: vec![Vec::new(); CHANNELS.len()],
        });
        self.send(id, request.as_bytes())?;
        Ok(id)
    }

    /// Queues bytes for client `i` and writes what its socket takes now.
    fn send(&mut self, i: usize, bytes: &[u8]) -> Result<(), String> {
        self.clients[i].out.extend_from_slice(bytes);
        flush(&mut self.clients[i]);
        Ok(())
    }

    /// Writes pending client bytes and reads and checks what reading clients received.
    fn pump(&mut self) -> Result<(), String> {
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            flush(c);
            if !c.reading || c.eof {
                continue;
            }
            let Some(stream) = c.stream.as_mut() else {
                continue;
            };
            let mut chunk = [0u8; 16384];
            let mut total = 0;
            while total < READ_CAP {
                match stream.read(&mut chunk) {
                    Ok(0) => {
                        c.eof = true;
                        break;
                    }
                    Ok(n) => {
                        total += n;
                        c.inbuf.extend_from_slice(&chunk[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // A reset after the server dropped us (it may not wait for our FIN).
                    Err(_) => {
                        c.eof = true;
                        break;
                    }
                }
            }
            self.process(i).map_err(|e| format!("client {i}: {e}"))?;
            let c = &self.clients[i];
            if c.eof && c.closed.is_none() && c.ending.is_none() {
                // Ended by the server without a close frame we read: legitimate only after a
                // close it could not deliver (a slow consumer whose grace ran out).
                self.stats.server_ended += 1;
            }
            if c.eof {
                // Counted once: nothing more is read from it.
                self.clients[i].reading = false;
            }
        }
        Ok(())
    }

    /// Checks every complete frame client `i` has received.
    fn process(&mut self, i: usize) -> Result<(), String> {
        let c = &mut self.clients[i];
        if !c.upgraded {
            let Some(end) = c.inbuf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if c.eof {
                    return Err(format!(
                        "connection ended before the upgrade response: {:?}",
                        String::from_utf8_lossy(&c.inbuf)
                    ));
                }
                return Ok(());
            };
            let head = String::from_utf8_lossy(&c.inbuf[..end]).into_owned();
            c.inbuf.drain(..end + 4);
            if !head.starts_with("HTTP/1.1 101 ") {
                return Err(format!("upgrade refused: {head:?}"));
            }
            let echoed = head
                .split("\r\n")
                .any(|line| line.eq_ignore_ascii_case("Sec-WebSocket-Protocol: fanout.json"));
            if echoed != c.json {
                return Err(format!(
                    "subprotocol answer wrong for json={}: {head:?}",
                    c.json
                ));
            }
            c.upgraded = true;
        }
        let mut at = 0;
        while let Some((frame, used)) = parse_frame(&self.clients[i].inbuf[at..]) {
            at += used;
            self.frame(i, frame)?;
        }
        self.clients[i].inbuf.drain(..at);
        Ok(())
    }

    fn frame(&mut self, i: usize, frame: Frame) -> Result<(), String> {
        let c = &mut self.clients[i];
        if let Some(close) = &c.closed {
            return Err(format!("frame {frame:?} after the close frame {close:?}"));
        }
        if !frame.fin {
            return Err(format!("fragmented server frame {frame:?}"));
        }
        match frame.opcode {
            // The server pings only after --ping-interval of silence; nothing to check.
            PING => Ok(()),
            PONG => match c.pongs.pop_front() {
                Some(want) if want == frame.payload => Ok(()),
                want => Err(format!(
                    "pong {:?}, expected {want:?}",
                    String::from_utf8_lossy(&frame.payload)
                )),
            },
            CLOSE => {
                let (code, reason) = frame.close_code().unwrap_or((1005, String::new()));
                let slow = code == 1008 && reason == "slow consumer";
                let rate =
                    code == 1008 && self.setup.rate_limit && reason.starts_with("rate limit");
                if !(slow || rate || c.ending == Some(code)) {
                    return Err(format!(
                        "close {code} {reason:?}, but the client provoked {:?}",
                        c.ending
                    ));
                }
                if c.ending.is_none() {
                    self.stats.server_ended += 1;
                }
                *self
                    .stats
                    .closes
                    .entry(if code == 1008 {
                        format!("1008 {}", reason.split(':').next().unwrap_or(""))
                    } else {
                        code.to_string()
                    })
                    .or_default() += 1;
                c.closed = Some((code, reason));
                Ok(())
            }
            TEXT | BINARY if c.json => {
                if frame.opcode != TEXT {
                    return Err("binary frame to a JSON-mode client".into());
                }
                let v: Value = serde_json::from_slice(&frame.payload)
                    .map_err(|e| format!("reply is not JSON ({e}): {:?}", frame.text()))?;
                match v.get("op").and_then(Value::as_str) {
                    Some("message") => {
                        let name = v.get("channel").and_then(Value::as_str).unwrap_or("");
                        let Some(ch) = CHANNELS.iter().position(|c| *c == name) else {
                            return Err(format!("delivery on unknown channel: {v}"));
                        };
                        if v.get("encoding").is_some() {
                            return Err(format!("text payload delivered with an encoding: {v}"));
                        }
                        let data = v.get("data").cloned().unwrap_or(Value::Null);
                        let seq = match &data {
                            Value::String(s) => seq_of(s.as_bytes()),
                            Value::Object(o) => o.get("seq").and_then(Value::as_u64),
                            _ => None,
                        }
                        .ok_or_else(|| format!("delivery without a sequence number: {v}"))?;
                        let p = self.lookup(seq)?;
                        let want =
                            serde_json::from_slice::<Value>(&p.payload).unwrap_or_else(|_| {
                                Value::String(String::from_utf8_lossy(&p.payload).into_owned())
                            });
                        if want != data {
                            return Err(format!(
                                "message {seq} delivered as {data}, sent as {want}"
                            ));
                        }
                        self.delivered(i, ch, seq)
                    }
                    Some(op @ ("ok" | "error")) => {
                        self.stats.replies += 1;
                        let c = &mut self.clients[i];
                        let Some(want) = c.replies.pop_front() else {
                            return Err(format!("reply {v} to no request"));
                        };
                        let id = v.get("id").map(Value::to_string);
                        if (op == "ok") != want.ok || id != want.id.map(|n| n.to_string()) {
                            return Err(format!("reply {v}, expected {want:?}"));
                        }
                        if op == "error" && !v.get("error").is_some_and(Value::is_string) {
                            return Err(format!("error reply without a message: {v}"));
                        }
                        if want.ok {
                            match want.effect {
                                Effect::None => {}
                                Effect::Subscribe(ch) => {
                                    c.confirmed.insert(ch);
                                }
                                Effect::Unsubscribe(ch) => {
                                    if c.confirmed.remove(&ch) {
                                        // A later subscription starts afresh: what was published
                                        // in between is legitimately missed.
                                        c.last.retain(|&(_, channel), _| channel != ch);
                                    }
                                }
                            }
                        }
                        Ok(())
                    }
                    _ => Err(format!("unexpected JSON frame {v}")),
                }
            }
            TEXT | BINARY => {
                let seq = seq_of(&frame.payload).ok_or_else(|| {
                    format!("raw delivery without a sequence number: {:?}", frame.text())
                })?;
                let p = self.lookup(seq)?;
                if p.payload != frame.payload || p.opcode != frame.opcode {
                    return Err(format!(
                        "message {seq} delivered as opcode {} {:?}, sent as opcode {} {:?}",
                        frame.opcode,
                        frame.text(),
                        p.opcode,
                        String::from_utf8_lossy(&p.payload)
                    ));
                }
                let ch = self.clients[i]
                    .raw_channel
                    .expect("a raw client has a channel");
                self.delivered(i, ch, seq)
            }
            other => Err(format!("unexpected opcode {other} in {frame:?}")),
        }
    }

    fn lookup(&self, seq: u64) -> Result<&Published, String> {
        self.published
            .get(&seq)
            .ok_or_else(|| format!("message {seq} was never published"))
    }

    /// Checks one delivery of message `seq` on channel `ch` to client `i`.
    fn delivered(&mut self, i: usize, ch: usize, seq: u64) -> Result<(), String> {
        let p = &self.published[&seq];
        let c = &mut self.clients[i];
        if p.channel != ch {
            return Err(format!(
                "message {seq} of channel {} delivered as channel {}",
                CHANNELS[p.channel], CHANNELS[ch]
            ));
        }
        if !c.confirmed.contains(&ch) {
            return Err(format!(
                "message {seq} of channel {} delivered to a client subscribed to {:?}",
                CHANNELS[ch],
                c.confirmed.iter().map(|&c| CHANNELS[c]).collect::<Vec<_>>()
            ));
        }
        if !c.seen.insert(seq) {
            return Err(format!("message {seq} delivered twice"));
        }
        let key = (p.publisher, ch);
        if let Some(&prev) = c.last.get(&key) {
            if p.index <= prev {
                return Err(format!(
                    "message {seq} (#{} of client {} on {}) after #{prev}: out of order",
                    p.index, p.publisher, CHANNELS[ch]
                ));
            }
            if p.index != prev + 1 {
                return Err(format!(
                    "message {seq} (#{} of client {} on {}) after #{prev}: the ones between were lost while subscribed",
                    p.index, p.publisher, CHANNELS[ch]
                ));
            }
        }
        c.last.insert(key, p.index);
        c.received[ch].push(seq);
        self.stats.deliveries += 1;
        Ok(())
    }

    /// Steps the reactor until `done`, failing with `what` at the deadline.
    fn wait(&mut self, what: &str, done: impl Fn(&Model) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE;
        while !done(self) {
            if Instant::now() >= deadline {
                return Err(format!("timed out waiting for {what}"));
            }
            self.step(1, 1)?;
        }
        Ok(())
    }

    /// The end of a case: everything outstanding arrives, open clients get a marker on every
    /// channel they hold, one order per channel, and no connection outlives its client.
    fn finish(mut self) -> Result<Stats, String> {
        for c in &mut self.clients {
            c.reading = c.stream.is_some() && !c.eof;
        }
        self.wait("replies, pongs and closes to arrive", |m| {
            m.clients.iter().all(|c| {
                if c.gone() {
                    return true;
                }
                // One that provoked a close, or that the server already stopped reading, must
                // end: a close frame or the end of the stream.
                c.ending.is_none()
                    && !c.write_failed
                    && c.upgraded
                    && c.out.is_empty()
                    && c.replies.is_empty()
                    && c.pongs.is_empty()
            })
        })
        .map_err(|e| format!("{e}: {}", self.describe()))?;
        // A reader that fell behind may still have deliveries queued; let them drain so the
        // markers below overflow nobody's queue (if one does, its close is still checked).
        for _ in 0..20 {
            let before: usize = self.clients.iter().map(|c| c.seen.len()).sum();
            self.step(1, 1)?;
            let after: usize = self.clients.iter().map(|c| c.seen.len()).sum();
            if before == after {
                break;
            }
        }
        let marker = self.connect(true, None, false)?;
        let mut markers = Vec::new();
        for ch in 0..CHANNELS.len() {
            let (_, body) = self.publication(marker, ch, 0, false, false);
            markers.push(self.next_seq - 1);
            self.send(marker, &client_frame(TEXT, &body))?;
        }
        self.wait("the markers to be published", |m| {
            let c = &m.clients[marker];
            c.gone() || c.replies.is_empty()
        })?;
        if self.clients[marker].gone() {
            return Err("the marker publisher was closed".into());
        }
        self.wait(
            "every open client to get the marker of each channel it holds",
            |m| {
                m.clients.iter().all(|c| {
                    c.gone()
                        || c.ending.is_some()
                        || c.confirmed.iter().all(|&ch| c.seen.contains(&markers[ch]))
                })
            },
        )
        .map_err(|e| format!("{e}: {}", self.describe()))?;
        self.check_orders()?;
        for c in &mut self.clients {
            if let Some(stream) = c.stream.take() {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
        }
        let open = |m: &Model| {
            m.node
                .shared
                .open_ws
                .load(std::sync::atomic::Ordering::Acquire)
        };
        self.wait("the node to drop every connection", |m| {
            m.node.reactors[0].connections() == 0 && open(m) == 0
        })
        .map_err(|e| {
            format!(
                "{e}: {} connections, {} open WebSockets left",
                self.node.reactors[0].connections(),
                open(&self)
            )
        })?;
        Ok(self.stats)
    }

    /// One order per channel: the orders in which clients received a channel's messages, and
    /// each publisher's own order, must fit one sequence (no cycle).
    fn check_orders(&self) -> Result<(), String> {
        for (ch, name) in CHANNELS.iter().enumerate() {
            let mut edges: HashMap<u64, Vec<u64>> = HashMap::new();
            let mut indegree: HashMap<u64, usize> = HashMap::new();
            let mut add = |a: u64, b: u64| {
                edges.entry(a).or_default().push(b);
                *indegree.entry(b).or_default() += 1;
                indegree.entry(a).or_default();
            };
            for c in &self.clients {
                for pair in c.received[ch].windows(2) {
                    add(pair[0], pair[1]);
                }
            }
            let mut chains: BTreeMap<(usize, u32), u64> = BTreeMap::new();
            for (&seq, p) in &self.published {
                if p.channel == ch {
                    chains.insert((p.publisher, p.index), seq);
                }
            }
            let chain: Vec<_> = chains.into_iter().collect();
            for pair in chain.windows(2) {
                if pair[0].0 .0 == pair[1].0 .0 {
                    add(pair[0].1, pair[1].1);
                }
            }
            let mut ready: Vec<u64> = indegree
                .iter()
                .filter(|(_, &d)| d == 0)
                .map(|(&s, _)| s)
                .collect();
            let mut done = 0;
            while let Some(s) = ready.pop() {
                done += 1;
                for &t in edges.get(&s).map(Vec::as_slice).unwrap_or(&[]) {
                    let d = indegree.get_mut(&t).expect("every target has a degree");
                    *d -= 1;
                    if *d == 0 {
                        ready.push(t);
                    }
                }
            }
            if done != indegree.len() {
                return Err(format!(
                    "channel {}: clients saw its messages in orders that no single order fits",
                    name
                ));
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for c in &self.clients {
            out.push_str(&format!(
                "\n  client {} json={} raw={:?} upgraded={} reading={} out={} write_failed={} replies={} pongs={} ending={:?} closed={:?} eof={} dropped={} subscribed={:?} inbuf={}",
                c.id,
                c.json,
                c.raw_channel,
                c.upgraded,
                c.reading,
                c.out.len(),
                c.write_failed,
                c.replies.len(),
                c.pongs.len(),
                c.ending,
                c.closed,
                c.eof,
                c.stream.is_none(),
                c.confirmed,
                c.inbuf.len()
            ));
        }
        out
    }
}

/// Writes what the client's socket takes of its pending bytes.
fn flush(c: &mut Client) {
    let Some(stream) = c.stream.as_mut() else {
        return;
    };
    while !c.out.is_empty() && !c.write_failed {
        match stream.write(&c.out) {
            Ok(0) => c.write_failed = true,
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The server closed first (EPIPE, ECONNRESET): what it did not read is moot.
            Err(_) => c.write_failed = true,
        }
    }
}

/// The sequence number in a payload the driver built: `{"ch":..,"seq":N,..}` or `s:CH:N:PAD`.
fn seq_of(payload: &[u8]) -> Option<u64> {
    if payload.starts_with(b"{") {
        let v: Value = serde_json::from_slice(payload).ok()?;
        return v.get("seq")?.as_u64();
    }
    let text = std::str::from_utf8(payload.strip_prefix(b"s:")?).ok()?;
    text.split(':').nth(1)?.parse().ok()
}

/// The checker itself must reject what a broken node would do: frames forged here stand in for
/// the server (the messages are registered as published but never sent).
#[cfg(test)]
mod checker_rejects {
    use super::*;

    /// A model with an upgraded raw client on `a` and an upgraded JSON client with no
    /// subscription, plus `n` messages of the raw client to `a` as the server would frame them.
    fn model(n: usize) -> (Model, usize, usize, Vec<Frame>) {
        let mut m = Model::new(Setup { rate_limit: false }).unwrap();
        let raw = m.connect(false, Some(0), false).unwrap();
        let json = m.connect(true, None, false).unwrap();
        m.wait("the upgrades", |m| m.clients.iter().all(|c| c.upgraded))
            .unwrap();
        let frames = (0..n)
            .map(|_| {
                let (opcode, payload) = m.publication(raw, 0, 3, false, false);
                Frame {
                    fin: true,
                    rsv1: false,
                    opcode,
                    payload,
                }
            })
            .collect();
        (m, raw, json, frames)
    }

    fn rejected(result: Result<(), String>, what: &str) {
        match result {
            Err(e) => assert!(e.contains(what), "rejected for another reason: {e}"),
            Ok(()) => panic!("accepted; expected a failure about {what:?}"),
        }
    }

    fn text(payload: &str) -> Frame {
        Frame {
            fin: true,
            rsv1: false,
            opcode: TEXT,
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[test]
    fn nothing_when_the_node_behaves() {
        let (mut m, raw, _, frames) = model(3);
        for f in frames {
            m.frame(raw, f).unwrap();
        }
        m.finish().unwrap();
    }

    #[test]
    fn a_duplicate() {
        let (mut m, raw, _, f) = model(1);
        m.frame(raw, f[0].clone()).unwrap();
        rejected(m.frame(raw, f[0].clone()), "delivered twice");
    }

    #[test]
    fn a_reordering_and_a_gap() {
        let (mut m, raw, _, f) = model(3);
        m.frame(raw, f[1].clone()).unwrap();
        rejected(m.frame(raw, f[0].clone()), "out of order");
        let (mut m, raw, _, f) = model(3);
        m.frame(raw, f[0].clone()).unwrap();
        rejected(m.frame(raw, f[2].clone()), "lost while subscribed");
    }

    #[test]
    fn a_message_of_a_channel_not_joined() {
        let (mut m, raw, json, f) = model(1);
        let envelope = format!(
            "{{\"op\":\"message\",\"channel\":\"a\",\"data\":{}}}",
            String::from_utf8_lossy(&f[0].payload)
        );
        rejected(
            m.frame(json, text(&envelope)),
            "delivered to a client subscribed to",
        );
        let (opcode, payload) = m.publication(raw, 1, 0, false, false);
        rejected(
            m.frame(
                raw,
                Frame {
                    fin: true,
                    rsv1: false,
                    opcode,
                    payload,
                },
            ),
            "delivered as channel",
        );
    }

    #[test]
    fn an_altered_payload_or_opcode() {
        let (mut m, raw, _, f) = model(2);
        let mut altered = f[0].clone();
        *altered.payload.last_mut().unwrap() = b' ';
        altered.payload.push(b'}');
        rejected(m.frame(raw, altered), "sent as");
        let mut binary = f[1].clone();
        binary.opcode = BINARY;
        rejected(m.frame(raw, binary), "sent as");
    }

    #[test]
    fn a_reply_to_nothing_and_a_close_nobody_provoked() {
        let (mut m, raw, json, _) = model(0);
        rejected(
            m.frame(json, text("{\"op\":\"ok\",\"id\":7}")),
            "to no request",
        );
        let mut close = 1009u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"message over 512 bytes");
        rejected(
            m.frame(
                raw,
                Frame {
                    fin: true,
                    rsv1: false,
                    opcode: CLOSE,
                    payload: close,
                },
            ),
            "but the client provoked",
        );
    }
}
