//! One Redis link and one Redis subscription per node (issue #13, points 1 and 2), against a real
//! redis-server started by the test (stopped by PID) and real `fanout` processes:
//!
//! - with `--threads 4` and 64 clients per node in one channel (SO_REUSEPORT spreads them, so
//!   every reactor holds some), `PUBSUB NUMSUB` is the number of nodes, each node keeps one Redis
//!   connection, messages from clients on every reactor reach every subscriber on both nodes
//!   exactly once and in order per publisher, external `PUBLISH` reaches them, and after a Redis
//!   restart deliveries resume with NUMSUB back at the node count;
//! - a JSON `subscribe` is answered `ok` only once Redis confirmed the node's subscription: a
//!   message published on another node right after the `ok` always arrives, also while the
//!   node's link is busy with a flood of publishes;
//! - a subscribe that Redis refuses (an ACL) is answered with an error naming Redis' reason.

mod ops_support;

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use ops_support::{probe_barrier, wait_status, Flood, Redis, Server, Ws, TEXT};
use serde_json::{json, Value};

const SEC: Duration = Duration::from_secs(1);
/// How long a message that must arrive may take on a loaded 2-core machine.
const ARRIVE: Duration = Duration::from_secs(10);

/// Starts a node on `redis` and waits until it is ready.
fn node(redis: &Redis, threads: usize, extra: &[&str]) -> Server {
    node_on(&redis.url(), threads, extra)
}

fn node_on(url: &str, threads: usize, extra: &[&str]) -> Server {
    let threads = threads.to_string();
    let mut args = vec!["--threads", &threads, "--redis", url];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    assert!(
        wait_status(server.addr, "/readyz", 200, 10 * SEC).is_some(),
        "node {args:?} not ready within 10 s; log:\n{}",
        server.log()
    );
    server
}

/// The integer at the end of a RESP reply (`:N` or the last element of an array).
fn last_int(reply: &[u8]) -> i64 {
    let text = String::from_utf8_lossy(reply);
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(':'))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no integer in Redis reply {text:?}"))
}

fn numsub(redis: &Redis, channel: &str) -> i64 {
    last_int(&redis.command(&["PUBSUB", "NUMSUB", channel]))
}

/// `PUBLISH` from outside; returns how many Redis subscribers (node links) got it.
fn publish(redis: &Redis, channel: &str, payload: &str) -> i64 {
    last_int(&redis.command(&["PUBLISH", channel, payload]))
}

fn wait_numsub(redis: &Redis, channel: &str, want: i64) -> i64 {
    let deadline = Instant::now() + 10 * SEC;
    loop {
        let n = numsub(redis, channel);
        if n == want || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Redis connections that call themselves `fanout`.
fn fanout_links(redis: &Redis) -> usize {
    // CLIENT LIST is one bulk string; one line per connection.
    String::from_utf8_lossy(&redis.command(&["CLIENT", "LIST"]))
        .lines()
        .filter(|l| l.contains(" name=fanout "))
        .count()
}

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

/// [`probe_barrier`] over owned clients.
fn barrier(redis: &Redis, channel: &str, clients: &mut [Ws]) {
    let mut clients: Vec<&mut Ws> = clients.iter_mut().collect();
    probe_barrier(channel, &mut clients, |p| {
        redis.publish(channel, p);
    });
}

/// Every client publishes `rounds` numbered messages; every client must get each exactly once,
/// in order per publisher.
fn everyone_publishes(clients: &mut [Ws], rounds: usize, tag: &str) {
    let n = clients.len();
    for round in 0..rounds {
        for (i, ws) in clients.iter_mut().enumerate() {
            ws.send_text(&format!("{tag}:{i}:{round}"));
        }
    }
    for (r, ws) in clients.iter_mut().enumerate() {
        let mut next = vec![0usize; n];
        for _ in 0..n * rounds {
            let text = next_text(ws, &format!("client {r}"));
            let mut parts = text.split(':');
            assert_eq!(parts.next(), Some(tag), "client {r}: unexpected {text:?}");
            let from: usize = parts.next().and_then(|p| p.parse().ok()).unwrap();
            let seq: usize = parts.next().and_then(|p| p.parse().ok()).unwrap();
            assert_eq!(
                seq, next[from],
                "client {r}: message {seq} of publisher {from} where {} was due (lost, duplicated or reordered)",
                next[from]
            );
            next[from] += 1;
        }
        assert!(next.iter().all(|&c| c == rounds), "client {r}: {next:?}");
    }
}

#[test]
fn one_redis_subscription_and_link_per_node_with_four_reactors() {
    const PER_NODE: usize = 64;
    let mut redis = Redis::start();
    let nodes = [node(&redis, 4, &[]), node(&redis, 4, &[])];
    assert_eq!(fanout_links(&redis), 2, "one Redis connection per node");
    for n in &nodes {
        let m = n.metrics();
        assert_eq!(m.get("fanout_reactors"), 4.0);
        assert_eq!(m.get("fanout_redis_links"), 1.0);
        assert_eq!(m.get("fanout_redis_links_up"), 1.0);
    }
    // 64 clients per node over 4 SO_REUSEPORT listeners: the chance that a reactor gets none
    // is about 4 * (3/4)^64, below 1e-7.
    let mut clients: Vec<Ws> = nodes
        .iter()
        .flat_map(|n| (0..PER_NODE).map(move |_| n.ws("/ws?channel=room")))
        .collect();
    assert_eq!(
        wait_numsub(&redis, "room", 2),
        2,
        "one subscription per node"
    );
    barrier(&redis, "room", &mut clients);
    assert_eq!(numsub(&redis, "room"), 2, "one subscription per node");
    assert_eq!(fanout_links(&redis), 2, "clients add no Redis connections");
    for n in &nodes {
        assert_eq!(n.metrics().get("fanout_redis_subscriptions"), 1.0);
    }

    everyone_publishes(&mut clients, 5, "a");
    // Nothing more is coming: a duplicate would arrive before the barrier's probes.
    barrier(&redis, "room", &mut clients);

    // External publishers reach every client; Redis counts one receiver per node.
    assert_eq!(publish(&redis, "room", "from outside"), 2);
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(next_text(ws, &format!("client {i}")), "from outside");
    }

    redis.kill();
    for n in &nodes {
        assert!(
            wait_status(n.addr, "/readyz", 503, 5 * SEC).is_some(),
            "/readyz still 200 with Redis killed"
        );
        assert_eq!(n.wait_metric("fanout_redis_links_up", 0.0, 5 * SEC), 0.0);
    }
    redis.restart();
    for n in &nodes {
        assert!(
            wait_status(n.addr, "/readyz", 200, 5 * SEC).is_some(),
            "not ready again after Redis came back; log:\n{}",
            n.log()
        );
    }
    assert_eq!(
        wait_numsub(&redis, "room", 2),
        2,
        "resubscribed once per node"
    );
    barrier(&redis, "room", &mut clients);
    everyone_publishes(&mut clients, 2, "b");
    barrier(&redis, "room", &mut clients);
    assert_eq!(numsub(&redis, "room"), 2);
    assert_eq!(fanout_links(&redis), 2, "one Redis connection per node");
    for n in &nodes {
        let m = n.metrics();
        assert_eq!(m.get("fanout_redis_links_up"), 1.0);
        assert_eq!(m.get("fanout_redis_reconnects_total"), 1.0);
        assert_eq!(m.get("fanout_connections_open"), PER_NODE as f64);
    }
    // The last client of a node leaving ends the node's subscription.
    drop(clients);
    assert_eq!(wait_numsub(&redis, "room", 0), 0);
}

/// Subscribes on `a`, and the moment the `ok` arrives publishes on `b`, over `channels` fresh
/// channels; every message must reach the subscriber.
fn ok_then_publish_elsewhere(sub: &mut Ws, b: &Server, phase: &str, channels: usize) {
    let mut publisher = b.ws_json("/ws");
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    let note = |v: &Value, got: &mut BTreeMap<String, usize>| {
        assert_eq!(v["op"], "message", "{phase}: unexpected {v}");
        *got.entry(v["data"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    };
    for i in 0..channels {
        let channel = format!("{phase}-{i}");
        sub.send_text(&json!({"op":"subscribe","channel":channel,"id":i}).to_string());
        loop {
            // Messages of earlier channels may still come in before this ok.
            let v = next_json(sub, &format!("{phase}: subscribe {i}"));
            if v["op"] == "ok" {
                assert_eq!(v, json!({"op":"ok","id":i}), "{phase}");
                break;
            }
            note(&v, &mut got);
        }
        let command = json!({"op":"publish","channel":channel,"data":format!("m-{i}"),"id":i});
        publisher.send_text(&command.to_string());
        let reply = next_json(&mut publisher, &format!("{phase}: publish {i}"));
        assert_eq!(
            reply,
            json!({"op":"ok","id":i}),
            "{phase}: Redis acknowledged"
        );
    }
    let deadline = Instant::now() + ARRIVE;
    while got.values().sum::<usize>() < channels && Instant::now() < deadline {
        match sub.recv(Duration::from_millis(200)) {
            Ok(f) => note(&serde_json::from_slice(&f.payload).unwrap(), &mut got),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) => panic!("{phase}: subscriber lost: {e}"),
        }
    }
    let missing: Vec<usize> = (0..channels)
        .filter(|i| !got.contains_key(&format!("m-{i}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{phase}: {} of {channels} messages published after the subscribe's ok never arrived: {missing:?}",
        missing.len()
    );
    assert!(got.values().all(|&c| c == 1), "{phase}: duplicates {got:?}");
}

#[test]
fn ok_to_a_json_subscribe_means_the_node_is_subscribed() {
    let redis = Redis::start();
    // One subscriber joins 400 channels.
    let a = node(&redis, 2, &["--max-subscriptions", "1000"]);
    let b = node(&redis, 2, &[]);
    let mut sub = a.ws_json("/ws");
    ok_then_publish_elsewhere(&mut sub, &b, "idle", 200);
    // With the link of `a` writing a backlog of publishes, a SUBSCRIBE waits behind them: an
    // `ok` given before Redis confirmed would let the message on `b` overtake it.
    let flood = Flood::start(&a, &["flood".to_string()], 32 * 1024);
    // Fewer rounds: each waits behind megabytes of publishes (seconds each in a debug build).
    ok_then_publish_elsewhere(&mut sub, &b, "busy", 25);
    drop(flood);
    // Channels that already have a local subscriber answer at once, and still deliver.
    let mut first = a.ws("/ws?channel=shared");
    barrier(&redis, "shared", std::slice::from_mut(&mut first));
    let mut second = a.ws_json("/ws");
    second.send_text(r#"{"op":"subscribe","channel":"shared","id":"s"}"#);
    assert_eq!(
        next_json(&mut second, "second subscriber"),
        json!({"op":"ok","id":"s"})
    );
    let mut publisher = b.ws_json("/ws");
    publisher.send_text(r#"{"op":"publish","channel":"shared","data":"both","id":1}"#);
    assert_eq!(next_text(&mut first, "raw subscriber"), "both");
    assert_eq!(
        next_json(&mut second, "JSON subscriber"),
        json!({"op":"message","channel":"shared","data":"both"})
    );
}

#[test]
fn a_subscribe_redis_refuses_is_answered_with_an_error() {
    let redis = Redis::start();
    let created = redis.command(&[
        "ACL",
        "SETUSER",
        "limited",
        "on",
        ">pw",
        "resetchannels",
        "&ok*",
        "+@all",
    ]);
    assert!(
        String::from_utf8_lossy(&created).starts_with("+OK"),
        "{created:?}"
    );
    let url = format!("redis://limited:pw@127.0.0.1:{}", redis.port);
    let server = node_on(&url, 2, &[]);
    let mut j = server.ws_json("/ws");
    for round in 0..2 {
        j.send_text(&json!({"op":"subscribe","channel":"forbidden","id":round}).to_string());
        let reply = next_json(&mut j, "refused subscribe");
        assert_eq!(reply["op"], "error", "{reply}");
        assert_eq!(reply["id"], round, "{reply}");
        let why = reply["error"].as_str().unwrap_or_default();
        assert!(
            why.contains("subscribe refused by Redis") && why.contains("NOPERM"),
            "{reply}"
        );
    }
    j.send_text(r#"{"op":"subscribe","channel":"ok1","id":"fine"}"#);
    assert_eq!(
        next_json(&mut j, "allowed subscribe"),
        json!({"op":"ok","id":"fine"})
    );
    assert_eq!(numsub(&redis, "ok1"), 1, "ok means Redis has it");
    assert_eq!(publish(&redis, "ok1", "still works"), 1);
    assert_eq!(
        next_json(&mut j, "allowed channel"),
        json!({"op":"message","channel":"ok1","data":"still works"})
    );
    // Refused, the client was not left subscribed: a publish to it reaches nobody here.
    assert_eq!(publish(&redis, "forbidden", "nobody"), 0);
    let m = server.metrics();
    assert_eq!(m.get("fanout_redis_links_up"), 1.0, "the link stayed up");
    assert_eq!(m.get("fanout_redis_reconnects_total"), 0.0);
    assert_eq!(server.get("/readyz").0, 200);
}
