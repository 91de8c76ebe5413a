//! Redis scale-out with real processes: each test starts its own `redis-server` (ephemeral port,
//! no persistence, stopped by PID) and real `fanout` nodes with `--redis`, and talks to them over
//! real sockets. It checks what README "Scale out with Redis" promises: every client on every node
//! gets each message exactly once and in order, external `PUBLISH`es arrive, the prefix is applied,
//! a node's Redis interest follows its local clients, the link survives Redis restarts and a Redis
//! that is down at start, bad `--redis` URLs, passwords and databases are reported, and a channel
//! that a Redis ACL denies breaks neither the link nor the other channels.
//!
//! Before counting deliveries every test waits, with [`barrier`], until Redis really routes the
//! channel to every client: a node sends its `SUBSCRIBE` when the client joins and does not wait
//! for it, so a message published right after a client connects may legitimately miss it
//! (README: at most once).

mod ops_support;

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ops_support::{free_port, wait_status, Redis, Server, Ws, BINARY, TEXT};
use serde_json::{json, Value};

const SEC: Duration = Duration::from_secs(1);
/// How long a message that must arrive may take on a loaded 2-core machine.
const ARRIVE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// A minimal RESP2 client for the test's own view of Redis (PUBLISH, PUBSUB, CLIENT LIST).

#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl Reply {
    fn int(&self) -> i64 {
        match self {
            Reply::Int(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    fn text(&self) -> String {
        match self {
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Simple(s) => s.clone(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(items) => items,
            other => panic!("expected an array reply, got {other:?}"),
        }
    }
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(io::Error::other(format!("truncated reply line {line:?}")));
    }
    let line = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
    let (kind, rest) = line.split_at(1);
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| io::Error::other(format!("bad length in {line:?}")))
    };
    Ok(match kind {
        "+" => Reply::Simple(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Int(number()?),
        "$" => match number()? {
            n if n < 0 => Reply::Bulk(None),
            n => {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Reply::Bulk(Some(buf))
            }
        },
        "*" => {
            let n = number()?.max(0);
            let mut items = Vec::new();
            for _ in 0..n {
                items.push(read_reply(r)?);
            }
            Reply::Array(items)
        }
        _ => return Err(io::Error::other(format!("unknown reply {line:?}"))),
    })
}

/// One connection to the test's Redis; `AUTH`s first when a password is given.
struct RedisConn {
    reader: BufReader<TcpStream>,
}

impl RedisConn {
    fn open(port: u16, password: Option<&str>) -> RedisConn {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to test redis");
        stream.set_read_timeout(Some(5 * SEC)).unwrap();
        let mut conn = RedisConn {
            reader: BufReader::new(stream),
        };
        if let Some(pw) = password {
            let reply = conn.call(&[b"AUTH", pw.as_bytes()]);
            assert_eq!(reply, Reply::Simple("OK".into()), "AUTH to test redis");
        }
        conn
    }

    fn send(&mut self, args: &[&[u8]]) {
        self.reader
            .get_mut()
            .write_all(&encode(args))
            .expect("write to redis");
    }

    fn read(&mut self) -> io::Result<Reply> {
        read_reply(&mut self.reader)
    }

    fn call(&mut self, args: &[&[u8]]) -> Reply {
        self.send(args);
        self.read().expect("redis reply")
    }
}

fn call(port: u16, args: &[&[u8]]) -> Reply {
    RedisConn::open(port, None).call(args)
}

/// `PUBLISH`; returns how many Redis subscribers (node reactor links) received it.
fn publish(port: u16, channel: &str, payload: &[u8]) -> i64 {
    call(port, &[b"PUBLISH", channel.as_bytes(), payload]).int()
}

fn numsub(port: u16, channel: &str) -> i64 {
    call(port, &[b"PUBSUB", b"NUMSUB", channel.as_bytes()]).items()[1].int()
}

/// Polls `PUBSUB NUMSUB` until it equals `want`; returns the last value seen.
fn wait_numsub(port: u16, channel: &str, want: i64, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let n = numsub(port, channel);
        if n == want || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pubsub_channels(port: u16) -> Vec<String> {
    call(port, &[b"PUBSUB", b"CHANNELS"])
        .items()
        .iter()
        .map(Reply::text)
        .collect()
}

/// Lines of `CLIENT LIST` for connections named `fanout` (what every reactor link calls itself).
fn fanout_links(port: u16, password: Option<&str>) -> Vec<String> {
    RedisConn::open(port, password)
        .call(&[b"CLIENT", b"LIST"])
        .text()
        .lines()
        .filter(|l| l.contains(" name=fanout "))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Nodes and clients.

/// Starts a node on `redis` with `--threads threads` and waits until /readyz says 200.
fn node(redis: &Redis, threads: usize, extra: &[&str]) -> Server {
    let url = redis.url();
    let threads = threads.to_string();
    let mut args = vec!["--threads", &threads, "--redis", &url];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    assert!(
        wait_status(server.addr, "/readyz", 200, 10 * SEC).is_some(),
        "node {args:?} not ready within 10 s; log:\n{}",
        server.log()
    );
    server
}

fn wait_log(server: &Server, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if server.log().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The next text message; fails on timeout, close or a binary frame.
fn next_text(ws: &mut Ws, what: &str) -> String {
    match ws.recv(ARRIVE) {
        Ok(f) if f.opcode == TEXT => f.text(),
        other => panic!("{what}: expected a text message, got {other:?}"),
    }
}

fn next_json(ws: &mut Ws, what: &str) -> Value {
    let text = next_text(ws, what);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text:?}"))
}

fn envelope(channel: &str, data: Value) -> Value {
    json!({"op": "message", "channel": channel, "data": data})
}

/// Waits until Redis routes `redis_channel` to every one of `clients` (each one's node has its
/// SUBSCRIBE in place): publishes probes from outside until every client saw one, then an end
/// marker every client reads up to, so nothing of the barrier is left in their streams. Any
/// other message arriving meanwhile fails the test (nothing else is being published).
fn barrier(port: u16, redis_channel: &str, clients: &mut [&mut Ws]) {
    let deadline = Instant::now() + 15 * SEC;
    let mut seen = vec![false; clients.len()];
    let mut round = 0;
    while seen.contains(&false) {
        assert!(
            Instant::now() < deadline,
            "{redis_channel}: only {} of {} clients got a probe within 15 s",
            seen.iter().filter(|s| **s).count(),
            clients.len()
        );
        publish(port, redis_channel, format!("probe-{round}").as_bytes());
        round += 1;
        for (ws, seen) in clients.iter_mut().zip(&mut seen) {
            if *seen {
                continue;
            }
            match ws.recv(Duration::from_millis(50)) {
                Ok(f) if f.opcode == TEXT && f.text().contains("probe-") => *seen = true,
                Ok(f) => panic!("{redis_channel}: unexpected frame before the barrier: {f:?}"),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => panic!("{redis_channel}: client lost during the barrier: {e}"),
            }
        }
    }
    publish(port, redis_channel, b"probe-end");
    for ws in clients.iter_mut() {
        loop {
            let text = next_text(ws, "barrier end marker");
            assert!(text.contains("probe-"), "unexpected message {text:?}");
            if text.contains("probe-end") {
                break;
            }
        }
    }
}

/// Fails if any of `clients` still has a message coming: a second copy delivered by another
/// path (say, locally and again through Redis) may come after the last expected message, so
/// the test's end marker alone cannot show there is none. Redis executes these probes after
/// every PUBLISH the nodes sent before the clients read their last message, so a duplicate
/// arrives before the probes and [`barrier`] fails on it.
fn assert_nothing_more(port: u16, redis_channel: &str, clients: &mut [&mut Ws]) {
    barrier(port, redis_channel, clients);
}

// ---------------------------------------------------------------------------------------------
// 1. Exactly once across two and three nodes.

fn every_client_on_every_node_gets_each_message_once(nodes: usize) {
    let redis = Redis::start();
    let servers: Vec<Server> = (0..nodes).map(|_| node(&redis, 2, &[])).collect();
    // Four clients per node, so both reactors of a node are likely to hold some; whichever
    // reactor holds them, every client must see each message exactly once.
    let mut clients: Vec<(usize, Ws)> = Vec::new();
    for (n, server) in servers.iter().enumerate() {
        for _ in 0..4 {
            clients.push((n, server.ws("/ws?channel=room")));
        }
    }
    barrier(
        redis.port,
        "room",
        &mut clients.iter_mut().map(|(_, ws)| ws).collect::<Vec<_>>(),
    );
    const MESSAGES: usize = 20;
    let sender = &mut clients[0].1;
    for i in 0..MESSAGES {
        sender.send_text(&format!("msg-{i}"));
    }
    sender.send_text("end");
    for (i, (n, ws)) in clients.iter_mut().enumerate() {
        let mut got: BTreeMap<String, usize> = BTreeMap::new();
        let mut order = Vec::new();
        loop {
            let text = next_text(ws, &format!("client {i} on node {n}"));
            if text == "end" {
                break;
            }
            *got.entry(text.clone()).or_default() += 1;
            order.push(text);
        }
        let want: Vec<String> = (0..MESSAGES).map(|m| format!("msg-{m}")).collect();
        assert!(
            got.values().all(|&c| c == 1),
            "client {i} on node {n} (sender is client 0 on node 0) got duplicates: {got:?}"
        );
        assert_eq!(order, want, "client {i} on node {n}: missing or reordered");
    }
    assert_nothing_more(
        redis.port,
        "room",
        &mut clients.iter_mut().map(|(_, ws)| ws).collect::<Vec<_>>(),
    );
}

#[test]
fn two_nodes_every_client_gets_each_message_exactly_once() {
    every_client_on_every_node_gets_each_message_once(2);
}

#[test]
fn three_nodes_every_client_gets_each_message_exactly_once() {
    every_client_on_every_node_gets_each_message_once(3);
}

// ---------------------------------------------------------------------------------------------
// 2. JSON mode across nodes.

#[test]
fn json_publish_is_acknowledged_and_delivered_on_both_nodes() {
    let redis = Redis::start();
    let (n1, n2) = (node(&redis, 2, &[]), node(&redis, 2, &[]));
    let mut publisher = n1.ws_json("/ws");
    publisher.send_text(r#"{"op":"subscribe","channel":"news","id":1}"#);
    assert_eq!(
        next_json(&mut publisher, "subscribe reply"),
        json!({"op":"ok","id":1})
    );
    let mut json2 = n2.ws_json("/ws?channel=news");
    let mut raw2 = n2.ws("/ws?channel=news");
    barrier(
        redis.port,
        "news",
        &mut [&mut publisher, &mut json2, &mut raw2],
    );

    let data = json!({"headline": "nodes agree", "n": [1, 2, 3]});
    let command = json!({"op": "publish", "channel": "news", "data": data, "id": "p-1"});
    publisher.send_text(&command.to_string());
    // The sender gets its `ok` (after Redis acknowledged) and its own delivery, in either order.
    let mut own = vec![
        next_json(&mut publisher, "node 1 publisher"),
        next_json(&mut publisher, "node 1 publisher"),
    ];
    own.sort_by_key(|v| v["op"].as_str().map(str::to_string));
    assert_eq!(
        own,
        vec![
            envelope("news", data.clone()),
            json!({"op":"ok","id":"p-1"})
        ]
    );
    assert_eq!(
        next_json(&mut json2, "node 2 JSON client"),
        envelope("news", data.clone())
    );
    let raw: Value = serde_json::from_str(&next_text(&mut raw2, "node 2 raw client")).unwrap();
    assert_eq!(raw, data, "a raw client gets the JSON text of `data`");
    assert_nothing_more(
        redis.port,
        "news",
        &mut [&mut publisher, &mut json2, &mut raw2],
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Order per publisher.

#[test]
fn five_hundred_messages_arrive_in_order_on_every_node() {
    let redis = Redis::start();
    let (n1, n2) = (node(&redis, 2, &[]), node(&redis, 2, &[]));
    let mut sender = n1.ws("/ws?channel=seq");
    let mut raw: Vec<Ws> = (0..3)
        .flat_map(|_| [n1.ws("/ws?channel=seq"), n2.ws("/ws?channel=seq")])
        .collect();
    let mut json_sub = n2.ws_json("/ws?channel=seq");
    {
        let mut all: Vec<&mut Ws> = raw.iter_mut().collect();
        all.push(&mut sender);
        all.push(&mut json_sub);
        barrier(redis.port, "seq", &mut all);
    }
    const COUNT: u64 = 500;
    // One write per message, as fast as the socket takes them.
    for i in 0..COUNT {
        sender.send_text(&i.to_string());
    }
    let mut raw_clients: Vec<(String, &mut Ws)> = vec![("sender".into(), &mut sender)];
    for (i, ws) in raw.iter_mut().enumerate() {
        raw_clients.push((format!("raw subscriber {i} on node {}", i % 2 + 1), ws));
    }
    for (who, ws) in raw_clients {
        for want in 0..COUNT {
            let got = next_text(ws, &who);
            assert_eq!(got, want.to_string(), "{who}: message {want} out of order");
        }
    }
    for want in 0..COUNT {
        let got = next_json(&mut json_sub, "JSON subscriber on node 2");
        assert_eq!(
            got,
            envelope("seq", json!(want)),
            "JSON subscriber, message {want}"
        );
    }
    let mut all: Vec<&mut Ws> = raw.iter_mut().collect();
    all.push(&mut sender);
    all.push(&mut json_sub);
    assert_nothing_more(redis.port, "seq", &mut all);
}

// ---------------------------------------------------------------------------------------------
// 4. External publishers and the prefix.

#[test]
fn external_publish_reaches_raw_and_json_clients_on_every_node() {
    let redis = Redis::start();
    let (n1, n2) = (node(&redis, 2, &[]), node(&redis, 2, &[]));
    let mut raw = [n1.ws("/ws?channel=ext"), n2.ws("/ws?channel=ext")];
    let mut jsons = [n1.ws_json("/ws?channel=ext"), n2.ws_json("/ws?channel=ext")];
    {
        let [r1, r2] = &mut raw;
        let [j1, j2] = &mut jsons;
        barrier(redis.port, "ext", &mut [r1, r2, j1, j2]);
    }

    // The real redis-cli, as an operator would use it.
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "PUBLISH",
            "ext",
            "hello from redis-cli",
        ])
        .output()
        .expect("redis-cli is installed with redis-server");
    assert!(out.status.success(), "redis-cli failed: {out:?}");
    for ws in &mut raw {
        assert_eq!(next_text(ws, "raw client"), "hello from redis-cli");
    }
    for ws in &mut jsons {
        assert_eq!(
            next_json(ws, "JSON client"),
            envelope("ext", json!("hello from redis-cli"))
        );
    }

    // A JSON payload is `data` verbatim for JSON clients; raw clients get the bytes.
    publish(redis.port, "ext", br#"{"k":[1,2]}"#);
    for ws in &mut raw {
        assert_eq!(next_text(ws, "raw client"), r#"{"k":[1,2]}"#);
    }
    for ws in &mut jsons {
        assert_eq!(
            next_json(ws, "JSON client"),
            envelope("ext", json!({"k":[1,2]}))
        );
    }

    // Bytes that are not UTF-8: binary for raw clients, base64 for JSON clients.
    publish(redis.port, "ext", &[0xff, 0x00, 0x80]);
    for ws in &mut raw {
        let f = ws.recv(ARRIVE).expect("binary payload");
        assert_eq!((f.opcode, f.payload), (BINARY, vec![0xff, 0x00, 0x80]));
    }
    for ws in &mut jsons {
        assert_eq!(
            next_json(ws, "JSON client"),
            json!({"op":"message","channel":"ext","data":"/wCA","encoding":"base64"})
        );
    }
}

#[test]
fn an_external_publish_over_max_message_is_dropped_and_the_channel_keeps_its_clients() {
    let redis = Redis::start();
    // --max-queue below the payload: passing the message on would cut every subscriber as slow.
    let server = node(
        &redis,
        1,
        &["--max-message", "65536", "--max-queue", "131072"],
    );
    let mut a = server.ws("/ws?channel=big");
    let mut b = server.ws_json("/ws?channel=big");
    barrier(redis.port, "big", &mut [&mut a, &mut b]);

    assert_eq!(publish(redis.port, "big", &vec![b'x'; 256 * 1024]), 1);
    // Exactly at the limit still passes; then a small message proves nobody was cut.
    assert_eq!(publish(redis.port, "big", &vec![b'y'; 65536]), 1);
    publish(redis.port, "big", b"after");
    assert_eq!(next_text(&mut a, "raw client"), "y".repeat(65536));
    assert_eq!(next_text(&mut a, "raw client"), "after");
    assert_eq!(
        next_json(&mut b, "JSON client"),
        envelope("big", json!("y".repeat(65536)))
    );
    assert_eq!(
        next_json(&mut b, "JSON client"),
        envelope("big", json!("after"))
    );
    assert_eq!(
        metric(&server, "fanout_redis_messages_oversized_total"),
        1.0
    );
    assert_eq!(metric(&server, "fanout_connections_open"), 2.0);
    assert!(
        wait_log(&server, "dropped a 262144-byte message from Redis", 5 * SEC),
        "no log line about the oversized message; log:\n{}",
        server.log()
    );
}

#[test]
fn redis_prefix_is_applied_both_ways() {
    let redis = Redis::start();
    let n1 = node(&redis, 1, &["--redis-prefix", "app1:"]);
    let mut raw = n1.ws("/ws?channel=chan");
    let mut json_client = n1.ws_json("/ws?channel=chan");
    barrier(redis.port, "app1:chan", &mut [&mut raw, &mut json_client]);

    assert_eq!(
        wait_numsub(redis.port, "app1:chan", 1, 5 * SEC),
        1,
        "one reactor link subscribed to app1:chan"
    );
    let channels = pubsub_channels(redis.port);
    assert!(
        channels.contains(&"app1:chan".to_string()) && !channels.contains(&"chan".to_string()),
        "PUBSUB CHANNELS: {channels:?}"
    );
    assert_eq!(
        publish(redis.port, "chan", b"unprefixed"),
        0,
        "nobody may listen on the unprefixed name"
    );
    assert_eq!(publish(redis.port, "app1:chan", b"prefixed"), 1);
    assert_eq!(next_text(&mut raw, "raw client"), "prefixed");
    assert_eq!(
        next_json(&mut json_client, "JSON client"),
        envelope("chan", json!("prefixed")),
        "the JSON envelope names the channel without the prefix"
    );

    // The other way: a client's publish travels as app1:chan.
    let mut watcher = RedisConn::open(redis.port, None);
    watcher.send(&[b"SUBSCRIBE", b"app1:chan", b"chan"]);
    for _ in 0..2 {
        let confirm = watcher.read().expect("subscribe confirmation");
        assert_eq!(confirm.items()[0].text(), "subscribe");
    }
    raw.send_text("from a client");
    let msg = watcher.read().expect("the client's message on Redis");
    assert_eq!(
        msg,
        Reply::Array(vec![
            Reply::Bulk(Some(b"message".to_vec())),
            Reply::Bulk(Some(b"app1:chan".to_vec())),
            Reply::Bulk(Some(b"from a client".to_vec())),
        ])
    );
    assert_eq!(next_text(&mut raw, "sender's echo"), "from a client");
}

// ---------------------------------------------------------------------------------------------
// 5. Many channels across nodes.

#[test]
fn hundred_channels_across_two_nodes_do_not_leak() {
    const CHANNELS: usize = 100;
    let redis = Redis::start();
    let nodes = [node(&redis, 1, &[]), node(&redis, 1, &[])];
    // Channel i: client `a` on node i % 2 (it publishes), client `b` on the other node.
    let mut pairs: Vec<(Ws, Ws)> = (0..CHANNELS)
        .map(|i| {
            let path = format!("/ws?channel=c{i}");
            (nodes[i % 2].ws(&path), nodes[(i + 1) % 2].ws(&path))
        })
        .collect();
    // One reactor per node: every channel must have exactly two Redis subscribers.
    let names: Vec<String> = (0..CHANNELS).map(|i| format!("c{i}")).collect();
    let deadline = Instant::now() + 15 * SEC;
    loop {
        let mut args: Vec<&[u8]> = vec![b"PUBSUB", b"NUMSUB"];
        args.extend(names.iter().map(|n| n.as_bytes()));
        let reply = call(redis.port, &args);
        let counts: Vec<i64> = reply.items().chunks(2).map(|p| p[1].int()).collect();
        if counts.iter().all(|&c| c == 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "NUMSUB per channel after 15 s: {counts:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut listed = pubsub_channels(redis.port);
    listed.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(
        listed, want,
        "PUBSUB CHANNELS lists exactly the clients' channels"
    );

    for (i, (a, _)) in pairs.iter_mut().enumerate() {
        a.send_text(&format!("m-{i}"));
    }
    for (i, (a, b)) in pairs.iter_mut().enumerate() {
        assert_eq!(next_text(a, &format!("c{i} a")), format!("m-{i}"));
        assert_eq!(next_text(b, &format!("c{i} b")), format!("m-{i}"));
    }
    // Every m-j was processed by Redis before any end marker, so a message leaked to another
    // channel's client would arrive before that client's end marker.
    for (i, (a, _)) in pairs.iter_mut().enumerate() {
        a.send_text(&format!("end-{i}"));
    }
    for (i, (a, b)) in pairs.iter_mut().enumerate() {
        for (who, ws) in [("a", a), ("b", b)] {
            assert_eq!(
                next_text(ws, &format!("c{i} {who}")),
                format!("end-{i}"),
                "c{i} {who}: a message of another channel arrived"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Redis interest follows local clients.

#[test]
fn redis_subscriptions_follow_local_clients_not_connections() {
    let redis = Redis::start();
    let one = node(&redis, 1, &[]);
    let two = node(&redis, 2, &[]);
    assert_eq!(
        fanout_links(redis.port, None).len(),
        3,
        "one Redis connection per reactor (1 + 2), none per client"
    );

    let mut clients: Vec<Ws> = (0..50).map(|_| one.ws("/ws?channel=lobby")).collect();
    assert_eq!(
        wait_numsub(redis.port, "lobby", 1, 5 * SEC),
        1,
        "50 clients on a 1-thread node are one Redis subscriber"
    );
    assert_eq!(
        fanout_links(redis.port, None).len(),
        3,
        "clients add no links"
    );
    {
        let mut all: Vec<&mut Ws> = clients.iter_mut().collect();
        barrier(redis.port, "lobby", &mut all);
    }
    assert_eq!(numsub(redis.port, "lobby"), 1);

    // 49 leave with a close handshake: the channel must stay subscribed for the last one.
    let mut last = clients.pop().unwrap();
    for mut ws in clients {
        ws.send_close(1000).unwrap();
        let (code, _) = ws.recv_close(ARRIVE).expect("close echo");
        assert_eq!(code, 1000);
    }
    barrier(redis.port, "lobby", &mut [&mut last]);
    assert_eq!(numsub(redis.port, "lobby"), 1);
    // The last one just disappears (TCP closed, no close frame).
    drop(last);
    assert_eq!(
        wait_numsub(redis.port, "lobby", 0, 5 * SEC),
        0,
        "UNSUBSCRIBE after the last local client left"
    );
    assert!(!pubsub_channels(redis.port).contains(&"lobby".to_string()));

    // JSON subscribe/unsubscribe on the 2-thread node.
    let mut j = two.ws_json("/ws");
    for (id, channel) in [(1, "alpha"), (2, "beta")] {
        j.send_text(&json!({"op":"subscribe","channel":channel,"id":id}).to_string());
        assert_eq!(next_json(&mut j, "subscribe"), json!({"op":"ok","id":id}));
    }
    assert_eq!(wait_numsub(redis.port, "alpha", 1, 5 * SEC), 1);
    assert_eq!(wait_numsub(redis.port, "beta", 1, 5 * SEC), 1);
    j.send_text(r#"{"op":"unsubscribe","channel":"alpha","id":3}"#);
    assert_eq!(next_json(&mut j, "unsubscribe"), json!({"op":"ok","id":3}));
    assert_eq!(
        wait_numsub(redis.port, "alpha", 0, 5 * SEC),
        0,
        "JSON unsubscribe of the last local client"
    );
    barrier(redis.port, "beta", &mut [&mut j]);
    assert_eq!(numsub(redis.port, "beta"), 1, "beta is still wanted");
    j.send_close(1000).unwrap();
    j.recv_close(ARRIVE).expect("close echo");
    assert_eq!(wait_numsub(redis.port, "beta", 0, 5 * SEC), 0);
    let left = pubsub_channels(redis.port);
    assert!(left.is_empty(), "channels left subscribed: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. Redis killed and restarted.

fn metric(server: &Server, name: &str) -> f64 {
    server.metrics().get(name)
}

#[test]
fn redis_restart_keeps_clients_and_resubscribes_both_modes() {
    let mut redis = Redis::start();
    let (n1, n2) = (node(&redis, 2, &[]), node(&redis, 2, &[]));
    let mut r1 = n1.ws("/ws?channel=a");
    let mut r2 = n2.ws("/ws?channel=a");
    let mut j1 = n1.ws_json("/ws?channel=b");
    let mut j2 = n2.ws_json("/ws");
    j2.send_text(r#"{"op":"subscribe","channel":"b","id":1}"#);
    assert_eq!(next_json(&mut j2, "subscribe"), json!({"op":"ok","id":1}));
    barrier(redis.port, "a", &mut [&mut r1, &mut r2]);
    barrier(redis.port, "b", &mut [&mut j1, &mut j2]);

    redis.kill();
    for server in [&n1, &n2] {
        assert!(
            wait_status(server.addr, "/readyz", 503, 5 * SEC).is_some(),
            "/readyz still 200 with Redis killed"
        );
        let (_, body) = server.get("/readyz");
        assert!(body.contains("redis"), "503 reason names redis: {body:?}");
        assert_eq!(
            server.wait_metric("fanout_redis_links_up", 0.0, 5 * SEC),
            0.0,
            "every link noticed"
        );
    }
    j1.send_text(r#"{"op":"publish","channel":"b","data":"while down","id":7}"#);
    let reply = next_json(&mut j1, "publish reply while down");
    assert_eq!(reply["op"], "error", "{reply}");
    assert_eq!(reply["id"], 7, "{reply}");
    let why = reply["error"].as_str().unwrap_or_default();
    assert!(why.contains("redis unavailable"), "{reply}");
    let dropped = metric(&n1, "fanout_publishes_dropped_total");
    r1.send_text("lost while down");
    assert_eq!(
        n1.wait_metric("fanout_publishes_dropped_total", dropped + 1.0, 5 * SEC),
        dropped + 1.0,
        "a raw publish while Redis is down is dropped and counted"
    );

    redis.restart();
    let back = Instant::now();
    let mut ready = [None, None];
    while ready.contains(&None) && back.elapsed() < 10 * SEC {
        for (server, ready) in [&n1, &n2].into_iter().zip(&mut ready) {
            if ready.is_none() && matches!(server.get("/readyz"), (200, _)) {
                *ready = Some(back.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, took) in ready.iter().enumerate() {
        let took =
            took.unwrap_or_else(|| panic!("node {} not ready 10 s after Redis came back", i + 1));
        assert!(
            took <= 2 * SEC,
            "node {} ready {took:?} after Redis came back; want <= 2 s",
            i + 1
        );
    }

    // No client action: the nodes re-subscribe a (raw, from ?channel=) and b (JSON, by query
    // and by subscribe command) themselves. The dropped messages must not be replayed: the
    // barrier fails on any message that is not a probe.
    barrier(redis.port, "a", &mut [&mut r1, &mut r2]);
    barrier(redis.port, "b", &mut [&mut j1, &mut j2]);
    r2.send_text("after restart");
    assert_eq!(next_text(&mut r1, "node 1 raw"), "after restart");
    assert_eq!(next_text(&mut r2, "node 2 raw (own echo)"), "after restart");
    j2.send_text(r#"{"op":"publish","channel":"b","data":{"back":true},"id":8}"#);
    let mut own = vec![
        next_json(&mut j2, "node 2 JSON"),
        next_json(&mut j2, "node 2 JSON"),
    ];
    own.sort_by_key(|v| v["op"].as_str().map(str::to_string));
    assert_eq!(
        own,
        vec![
            envelope("b", json!({"back":true})),
            json!({"op":"ok","id":8})
        ]
    );
    assert_eq!(
        next_json(&mut j1, "node 1 JSON"),
        envelope("b", json!({"back":true}))
    );
    for server in [&n1, &n2] {
        let m = server.metrics();
        assert_eq!(m.get("fanout_redis_links_up"), 2.0);
        assert!(m.get("fanout_redis_reconnects_total") >= 2.0);
        assert_eq!(
            m.get("fanout_connections_open"),
            2.0,
            "no client was dropped"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Redis down at start.

#[test]
fn node_started_before_redis_becomes_ready_when_redis_appears() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let server = Server::start(&["--threads", "2", "--redis", &url]);
    assert!(
        wait_log(
            &server,
            &format!("redis: cannot use 127.0.0.1:{port}"),
            5 * SEC
        ),
        "no log line says Redis is unreachable; log:\n{}",
        server.log()
    );
    assert!(
        server.log().contains("Connection refused"),
        "the log says why; log:\n{}",
        server.log()
    );
    let (status, body) = server.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("redis"), "{body}");
    // Clients may connect and subscribe while Redis is missing.
    let mut raw = server.ws("/ws?channel=late");
    let mut j = server.ws_json("/ws");
    j.send_text(r#"{"op":"subscribe","channel":"late2","id":1}"#);
    assert_eq!(
        next_json(&mut j, "subscribe while down"),
        json!({"op":"ok","id":1})
    );

    let redis = Redis::start_on(port);
    assert!(
        wait_status(server.addr, "/readyz", 200, 5 * SEC).is_some(),
        "not ready 5 s after Redis appeared; log:\n{}",
        server.log()
    );
    assert!(server.log().contains("redis: link up"));
    barrier(redis.port, "late", &mut [&mut raw]);
    barrier(redis.port, "late2", &mut [&mut j]);
    raw.send_text("hi");
    assert_eq!(next_text(&mut raw, "own echo through Redis"), "hi");
    j.send_text(r#"{"op":"publish","channel":"late","data":"from json","id":2}"#);
    assert_eq!(
        next_json(&mut j, "publish reply"),
        json!({"op":"ok","id":2})
    );
    assert_eq!(next_text(&mut raw, "raw client"), "from json");
}

// ---------------------------------------------------------------------------------------------
// 9. Bad URLs, passwords and databases.

/// Runs `fanout --redis URL`, expecting a refusal; returns (exit code, stderr).
fn refused(url: &str) -> (Option<i32>, String) {
    let (code, _, stderr) =
        ops_support::run_to_exit(&["--listen", "127.0.0.1:0", "--redis", url], &[]);
    (code, stderr)
}

#[test]
fn bad_redis_urls_are_refused_at_start() {
    for (url, why) in [
        ("rediss://127.0.0.1:6379", "TLS"),
        ("http://x", "scheme"),
        ("redis://127.0.0.1:99999", "port"),
        ("redis://127.0.0.1:0", "port"),
        ("redis://127.0.0.1:abc", "port"),
        ("redis://:6379", "host"),
        ("redis://127.0.0.1:6379/x", "database"),
        ("redis://hunter2@127.0.0.1:6379", ":PASSWORD@"),
        ("redis://user:hunter2@127.0.0.1:0", "port"),
    ] {
        let (code, stderr) = refused(url);
        assert_eq!(code, Some(2), "{url}: exit status; stderr {stderr:?}");
        assert!(
            stderr.contains("--redis") && stderr.contains(why),
            "{url}: stderr should name --redis and say {why:?}: {stderr:?}"
        );
        assert!(
            !stderr.contains("hunter2"),
            "{url}: a password must not be echoed: {stderr:?}"
        );
    }
}

/// A redis-server with `--requirepass`; killed by PID when dropped.
struct PasswordRedis {
    port: u16,
    child: Child,
}

impl PasswordRedis {
    fn start(password: &str) -> PasswordRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                password,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let redis = PasswordRedis { port, child };
        let deadline = Instant::now() + 10 * SEC;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self, auth: &str, db: u32) -> String {
        format!("redis://{auth}@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PasswordRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks /readyz stays 503 for `span` (sampled every 100 ms).
fn stays_not_ready(server: &Server, span: Duration) {
    let until = Instant::now() + span;
    while Instant::now() < until {
        let (status, body) = server.get("/readyz");
        assert_eq!(status, 503, "became ready: {body}; log:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn password_and_database_from_the_url_are_used() {
    let redis = PasswordRedis::start("s3cret");
    let good = Server::start(&["--threads", "1", "--redis", &redis.url(":s3cret", 3)]);
    assert!(
        wait_status(good.addr, "/readyz", 200, 10 * SEC).is_some(),
        "right password not accepted; log:\n{}",
        good.log()
    );
    let with_user = Server::start(&["--threads", "1", "--redis", &redis.url("default:s3cret", 0)]);
    assert!(
        wait_status(with_user.addr, "/readyz", 200, 10 * SEC).is_some(),
        "user:password not accepted; log:\n{}",
        with_user.log()
    );
    let links = fanout_links(redis.port, Some("s3cret"));
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(
        links.iter().any(|l| l.contains(" db=3 ")) && links.iter().any(|l| l.contains(" db=0 ")),
        "/3 selects database 3: {links:?}"
    );
    // Pub/Sub works over the authenticated link (and across databases: Pub/Sub ignores them).
    let mut a = good.ws("/ws?channel=auth");
    let mut b = with_user.ws("/ws?channel=auth");
    let deadline = Instant::now() + 10 * SEC;
    loop {
        let mut watcher = RedisConn::open(redis.port, Some("s3cret"));
        let n = watcher.call(&[b"PUBSUB", b"NUMSUB", b"auth"]).items()[1].int();
        if n == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "NUMSUB auth = {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.send_text("authenticated");
    assert_eq!(next_text(&mut a, "own echo"), "authenticated");
    assert_eq!(next_text(&mut b, "other node"), "authenticated");

    let wrong = Server::start(&["--threads", "1", "--redis", &redis.url(":wrong", 0)]);
    assert!(
        wait_log(&wrong, "WRONGPASS", 5 * SEC),
        "a wrong password is logged with Redis' reason; log:\n{}",
        wrong.log()
    );
    stays_not_ready(&wrong, Duration::from_millis(1500));
    let mut ws = wrong.ws_json("/ws");
    ws.send_text(r#"{"op":"publish","channel":"auth","data":1,"id":1}"#);
    let reply = next_json(&mut ws, "publish without a working link");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("redis unavailable"),
        "{reply}"
    );

    let bad_db = Server::start(&["--threads", "1", "--redis", &redis.url(":s3cret", 99)]);
    assert!(
        wait_log(&bad_db, "SELECT 99 refused", 5 * SEC),
        "an out-of-range database is logged; log:\n{}",
        bad_db.log()
    );
    stays_not_ready(&bad_db, Duration::from_millis(500));
}

#[test]
fn a_channel_denied_by_redis_acl_does_not_break_the_others() {
    let redis = PasswordRedis::start("s3cret");
    let mut admin = RedisConn::open(redis.port, Some("s3cret"));
    let created = admin.call(&[
        b"ACL", b"SETUSER", b"limited", b"on", b">pw", b"&ok*", b"+@all",
    ]);
    assert_eq!(created, Reply::Simple("OK".into()));
    let server = Server::start(&["--threads", "1", "--redis", &redis.url("limited:pw", 0)]);
    assert!(
        wait_status(server.addr, "/readyz", 200, 10 * SEC).is_some(),
        "log:\n{}",
        server.log()
    );
    let mut allowed = server.ws("/ws?channel=ok1");
    let denied = server.ws("/ws?channel=forbidden");
    assert!(
        wait_log(&server, "SUBSCRIBE forbidden refused: NOPERM", 5 * SEC),
        "the refused channel is logged; log:\n{}",
        server.log()
    );
    let mut later = server.ws("/ws?channel=ok2");
    let numsub = |channel: &[u8]| {
        RedisConn::open(redis.port, Some("s3cret"))
            .call(&[b"PUBSUB", b"NUMSUB", channel])
            .items()[1]
            .int()
    };
    let deadline = Instant::now() + 10 * SEC;
    while numsub(b"ok1") != 1 || numsub(b"ok2") != 1 {
        assert!(Instant::now() < deadline, "ok1/ok2 not subscribed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        server.metrics().get("fanout_redis_links_up"),
        1.0,
        "the link stayed up"
    );
    // Redis drops the link: the re-subscription sends all three channels in one SUBSCRIBE,
    // which Redis refuses as a whole; the allowed ones must still end up subscribed.
    let killed = admin.call(&[b"CLIENT", b"KILL", b"USER", b"limited"]);
    assert_eq!(killed, Reply::Int(1), "one link to kill");
    assert_eq!(
        server.wait_metric("fanout_redis_reconnects_total", 1.0, 10 * SEC),
        1.0
    );
    let deadline = Instant::now() + 10 * SEC;
    while numsub(b"ok1") != 1 || numsub(b"ok2") != 1 {
        assert!(
            Instant::now() < deadline,
            "ok1/ok2 not re-subscribed; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    allowed.send_text("still works");
    assert_eq!(next_text(&mut allowed, "allowed channel"), "still works");
    later.send_text("also works");
    assert_eq!(next_text(&mut later, "channel joined later"), "also works");
    // A publish to the denied channel is refused by Redis; a JSON client is told why.
    let mut j = server.ws_json("/ws");
    j.send_text(r#"{"op":"publish","channel":"forbidden","data":1,"id":1}"#);
    let reply = next_json(&mut j, "publish to a denied channel");
    assert_eq!(reply["op"], "error", "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("NOPERM"),
        "{reply}"
    );
    let m = server.metrics();
    assert_eq!(m.get("fanout_redis_links_up"), 1.0);
    assert_eq!(
        m.get("fanout_redis_reconnects_total"),
        1.0,
        "only the reconnect Redis forced; no reconnect loop"
    );
    assert_eq!(
        m.get("fanout_connections_open"),
        4.0,
        "nobody was disconnected"
    );
    drop(denied);
}
