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
//! (README: at most once). No test bounds how soon a node recovers or a message arrives: waits
//! give up after ops_support's PATIENCE, which only a stuck node reaches.

mod ops_support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use ops_support::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Nodes and clients.

/// Starts a node on `redis` with `--threads threads` and waits until /readyz says 200.
fn node(redis: &Redis, threads: usize, extra: &[&str]) -> Server {
    node_on(&redis.url(), threads, extra, "node")
}

/// Starts a node with `--redis url` and waits until /readyz says 200; `what` names it on failure.
fn node_on(url: &str, threads: usize, extra: &[&str], what: &str) -> Server {
    let threads = threads.to_string();
    let mut args = vec!["--threads", &threads, "--redis", url];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    assert!(
        wait_status(server.addr, "/readyz", 200, PATIENCE).is_some(),
        "{what} ({args:?}) not ready; log:\n{}",
        server.log()
    );
    server
}

fn envelope(channel: &str, data: Value) -> Value {
    json!({"op": "message", "channel": channel, "data": data})
}

/// A JSON publisher subscribed to its own channel gets the `ok` for publish `id` (sent only
/// after Redis acknowledged) and its own `delivery`, in either order.
fn expect_ok_and_own_delivery(ws: &mut Ws, what: &str, id: Value, delivery: Value) {
    let mut own = vec![ws.next_json(what), ws.next_json(what)];
    own.sort_by_key(|v| v["op"].as_str().map(str::to_string));
    assert_eq!(own, vec![delivery, json!({"op":"ok","id":id})], "{what}");
}

/// [`probe_barrier`] with probes PUBLISHed on `redis`.
fn barrier(redis: &Redis, redis_channel: &str, clients: &mut [&mut Ws]) {
    probe_barrier(redis_channel, clients, |p| {
        redis.publish(redis_channel, p);
    });
}

/// Fails if any of `clients` still has a message coming: a second copy delivered by another
/// path (say, locally and again through Redis) may come after the last expected message, so
/// the test's end marker alone cannot show there is none. Redis executes these probes after
/// every PUBLISH the nodes sent before the clients read their last message, so a duplicate
/// arrives before the probes and [`barrier`] fails on it.
fn assert_nothing_more(redis: &Redis, redis_channel: &str, clients: &mut [&mut Ws]) {
    barrier(redis, redis_channel, clients);
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
        &redis,
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
            let text = ws.next_text(&format!("client {i} on node {n}"));
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
        &redis,
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
        publisher.next_json("subscribe reply"),
        json!({"op":"ok","id":1})
    );
    let mut json2 = n2.ws_json("/ws?channel=news");
    let mut raw2 = n2.ws("/ws?channel=news");
    barrier(&redis, "news", &mut [&mut publisher, &mut json2, &mut raw2]);

    let data = json!({"headline": "nodes agree", "n": [1, 2, 3]});
    let command = json!({"op": "publish", "channel": "news", "data": data, "id": "p-1"});
    publisher.send_text(&command.to_string());
    // The sender gets its `ok` (after Redis acknowledged) and its own delivery, in either order.
    expect_ok_and_own_delivery(
        &mut publisher,
        "node 1 publisher",
        json!("p-1"),
        envelope("news", data.clone()),
    );
    assert_eq!(
        json2.next_json("node 2 JSON client"),
        envelope("news", data.clone())
    );
    let raw: Value = serde_json::from_str(&raw2.next_text("node 2 raw client")).unwrap();
    assert_eq!(raw, data, "a raw client gets the JSON text of `data`");
    assert_nothing_more(&redis, "news", &mut [&mut publisher, &mut json2, &mut raw2]);
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
        barrier(&redis, "seq", &mut all);
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
            let got = ws.next_text(&who);
            assert_eq!(got, want.to_string(), "{who}: message {want} out of order");
        }
    }
    for want in 0..COUNT {
        let got = json_sub.next_json("JSON subscriber on node 2");
        assert_eq!(
            got,
            envelope("seq", json!(want)),
            "JSON subscriber, message {want}"
        );
    }
    let mut all: Vec<&mut Ws> = raw.iter_mut().collect();
    all.push(&mut sender);
    all.push(&mut json_sub);
    assert_nothing_more(&redis, "seq", &mut all);
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
        barrier(&redis, "ext", &mut [r1, r2, j1, j2]);
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
        assert_eq!(ws.next_text("raw client"), "hello from redis-cli");
    }
    for ws in &mut jsons {
        assert_eq!(
            ws.next_json("JSON client"),
            envelope("ext", json!("hello from redis-cli"))
        );
    }

    // A JSON payload is `data` verbatim for JSON clients; raw clients get the bytes.
    redis.publish("ext", br#"{"k":[1,2]}"#);
    for ws in &mut raw {
        assert_eq!(ws.next_text("raw client"), r#"{"k":[1,2]}"#);
    }
    for ws in &mut jsons {
        assert_eq!(
            ws.next_json("JSON client"),
            envelope("ext", json!({"k":[1,2]}))
        );
    }

    // Bytes that are not UTF-8: binary for raw clients, base64 for JSON clients.
    redis.publish("ext", &[0xff, 0x00, 0x80]);
    for ws in &mut raw {
        let f = ws.recv(PATIENCE).expect("binary payload");
        assert_eq!((f.opcode, f.payload), (BINARY, vec![0xff, 0x00, 0x80]));
    }
    for ws in &mut jsons {
        assert_eq!(
            ws.next_json("JSON client"),
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
    barrier(&redis, "big", &mut [&mut a, &mut b]);

    assert_eq!(redis.publish("big", &vec![b'x'; 256 * 1024]), 1);
    // Exactly at the limit still passes; then a small message proves nobody was cut.
    assert_eq!(redis.publish("big", &vec![b'y'; 65536]), 1);
    redis.publish("big", b"after");
    assert_eq!(a.next_text("raw client"), "y".repeat(65536));
    assert_eq!(a.next_text("raw client"), "after");
    assert_eq!(
        b.next_json("JSON client"),
        envelope("big", json!("y".repeat(65536)))
    );
    assert_eq!(b.next_json("JSON client"), envelope("big", json!("after")));
    assert_eq!(
        server
            .metrics()
            .get("fanout_redis_messages_oversized_total"),
        1.0
    );
    assert_eq!(server.metrics().get("fanout_connections_open"), 2.0);
    assert!(
        server.wait_log("dropped a 262144-byte message from Redis", PATIENCE),
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
    barrier(&redis, "app1:chan", &mut [&mut raw, &mut json_client]);

    assert_eq!(
        redis.wait_numsub("app1:chan", 1, PATIENCE),
        1,
        "one reactor link subscribed to app1:chan"
    );
    let channels = redis.pubsub_channels();
    assert!(
        channels.contains(&"app1:chan".to_string()) && !channels.contains(&"chan".to_string()),
        "PUBSUB CHANNELS: {channels:?}"
    );
    assert_eq!(
        redis.publish("chan", b"unprefixed"),
        0,
        "nobody may listen on the unprefixed name"
    );
    assert_eq!(redis.publish("app1:chan", b"prefixed"), 1);
    assert_eq!(raw.next_text("raw client"), "prefixed");
    assert_eq!(
        json_client.next_json("JSON client"),
        envelope("chan", json!("prefixed")),
        "the JSON envelope names the channel without the prefix"
    );

    // The other way: a client's publish travels as app1:chan.
    let mut watcher = redis.conn();
    watcher
        .send(&[b"SUBSCRIBE", b"app1:chan", b"chan"])
        .expect("SUBSCRIBE");
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
    assert_eq!(raw.next_text("sender's echo"), "from a client");
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
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut args: Vec<&[u8]> = vec![b"PUBSUB", b"NUMSUB"];
        args.extend(names.iter().map(|n| n.as_bytes()));
        let reply = redis.call(&args);
        let counts: Vec<i64> = reply.items().chunks(2).map(|p| p[1].int()).collect();
        if counts.iter().all(|&c| c == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "NUMSUB per channel: {counts:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut listed = redis.pubsub_channels();
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
        assert_eq!(a.next_text(&format!("c{i} a")), format!("m-{i}"));
        assert_eq!(b.next_text(&format!("c{i} b")), format!("m-{i}"));
    }
    // Every m-j was processed by Redis before any end marker, so a message leaked to another
    // channel's client would arrive before that client's end marker.
    for (i, (a, _)) in pairs.iter_mut().enumerate() {
        a.send_text(&format!("end-{i}"));
    }
    for (i, (a, b)) in pairs.iter_mut().enumerate() {
        for (who, ws) in [("a", a), ("b", b)] {
            assert_eq!(
                ws.next_text(&format!("c{i} {who}")),
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
        redis.fanout_links().len(),
        2,
        "one Redis connection per node, none per reactor or client"
    );

    let mut clients: Vec<Ws> = (0..50).map(|_| one.ws("/ws?channel=lobby")).collect();
    assert_eq!(
        redis.wait_numsub("lobby", 1, PATIENCE),
        1,
        "50 clients on a 1-thread node are one Redis subscriber"
    );
    assert_eq!(redis.fanout_links().len(), 2, "clients add no links");
    {
        let mut all: Vec<&mut Ws> = clients.iter_mut().collect();
        barrier(&redis, "lobby", &mut all);
    }
    assert_eq!(redis.numsub("lobby"), 1);

    // 49 leave with a close handshake: the channel must stay subscribed for the last one.
    let mut last = clients.pop().unwrap();
    for mut ws in clients {
        ws.send_close(1000).unwrap();
        let (code, _) = ws.recv_close(PATIENCE).expect("close echo");
        assert_eq!(code, 1000);
    }
    barrier(&redis, "lobby", &mut [&mut last]);
    assert_eq!(redis.numsub("lobby"), 1);
    // The last one just disappears (TCP closed, no close frame).
    drop(last);
    assert_eq!(
        redis.wait_numsub("lobby", 0, PATIENCE),
        0,
        "UNSUBSCRIBE after the last local client left"
    );
    assert!(!redis.pubsub_channels().contains(&"lobby".to_string()));

    // JSON subscribe/unsubscribe on the 2-thread node.
    let mut j = two.ws_json("/ws");
    for (id, channel) in [(1, "alpha"), (2, "beta")] {
        j.send_text(&json!({"op":"subscribe","channel":channel,"id":id}).to_string());
        assert_eq!(j.next_json("subscribe"), json!({"op":"ok","id":id}));
    }
    assert_eq!(redis.wait_numsub("alpha", 1, PATIENCE), 1);
    assert_eq!(redis.wait_numsub("beta", 1, PATIENCE), 1);
    j.send_text(r#"{"op":"unsubscribe","channel":"alpha","id":3}"#);
    assert_eq!(j.next_json("unsubscribe"), json!({"op":"ok","id":3}));
    assert_eq!(
        redis.wait_numsub("alpha", 0, PATIENCE),
        0,
        "JSON unsubscribe of the last local client"
    );
    barrier(&redis, "beta", &mut [&mut j]);
    assert_eq!(redis.numsub("beta"), 1, "beta is still wanted");
    j.send_close(1000).unwrap();
    j.recv_close(PATIENCE).expect("close echo");
    assert_eq!(redis.wait_numsub("beta", 0, PATIENCE), 0);
    let left = redis.pubsub_channels();
    assert!(left.is_empty(), "channels left subscribed: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. Redis killed and restarted.

#[test]
fn redis_restart_keeps_clients_and_resubscribes_both_modes() {
    let mut redis = Redis::start();
    let (n1, n2) = (node(&redis, 2, &[]), node(&redis, 2, &[]));
    let mut r1 = n1.ws("/ws?channel=a");
    let mut r2 = n2.ws("/ws?channel=a");
    let mut j1 = n1.ws_json("/ws?channel=b");
    let mut j2 = n2.ws_json("/ws");
    j2.send_text(r#"{"op":"subscribe","channel":"b","id":1}"#);
    assert_eq!(j2.next_json("subscribe"), json!({"op":"ok","id":1}));
    barrier(&redis, "a", &mut [&mut r1, &mut r2]);
    barrier(&redis, "b", &mut [&mut j1, &mut j2]);

    redis.kill();
    for server in [&n1, &n2] {
        assert!(
            wait_status(server.addr, "/readyz", 503, PATIENCE).is_some(),
            "/readyz still 200 with Redis killed"
        );
        let (_, body) = server.get("/readyz");
        assert!(body.contains("redis"), "503 reason names redis: {body:?}");
        assert_eq!(
            server.wait_metric("fanout_redis_links_up", 0.0, PATIENCE),
            0.0,
            "every link noticed"
        );
    }
    j1.send_text(r#"{"op":"publish","channel":"b","data":"while down","id":7}"#);
    let reply = j1.next_json("publish reply while down");
    assert_eq!(reply["op"], "error", "{reply}");
    assert_eq!(reply["id"], 7, "{reply}");
    let why = reply["error"].as_str().unwrap_or_default();
    assert!(why.contains("redis unavailable"), "{reply}");
    let dropped = n1.metrics().get("fanout_publishes_dropped_total");
    r1.send_text("lost while down");
    assert_eq!(
        n1.wait_metric("fanout_publishes_dropped_total", dropped + 1.0, PATIENCE),
        dropped + 1.0,
        "a raw publish while Redis is down is dropped and counted"
    );

    redis.restart();
    // Ready again without any client action; how soon depends on the machine, not asserted.
    for (i, server) in [&n1, &n2].into_iter().enumerate() {
        assert!(
            wait_status(server.addr, "/readyz", 200, PATIENCE).is_some(),
            "node {} not ready after Redis came back; log:\n{}",
            i + 1,
            server.log()
        );
    }

    // No client action: the nodes re-subscribe a (raw, from ?channel=) and b (JSON, by query
    // and by subscribe command) themselves. The dropped messages must not be replayed: the
    // barrier fails on any message that is not a probe.
    barrier(&redis, "a", &mut [&mut r1, &mut r2]);
    barrier(&redis, "b", &mut [&mut j1, &mut j2]);
    r2.send_text("after restart");
    assert_eq!(r1.next_text("node 1 raw"), "after restart");
    assert_eq!(r2.next_text("node 2 raw (own echo)"), "after restart");
    j2.send_text(r#"{"op":"publish","channel":"b","data":{"back":true},"id":8}"#);
    expect_ok_and_own_delivery(
        &mut j2,
        "node 2 JSON",
        json!(8),
        envelope("b", json!({"back":true})),
    );
    assert_eq!(
        j1.next_json("node 1 JSON"),
        envelope("b", json!({"back":true}))
    );
    for server in [&n1, &n2] {
        let m = server.metrics();
        assert_eq!(m.get("fanout_redis_links_up"), 1.0);
        assert!(m.get("fanout_redis_reconnects_total") >= 1.0);
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
        server.wait_log(&format!("redis: cannot use 127.0.0.1:{port}"), PATIENCE),
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
        j.next_json("subscribe while down"),
        json!({"op":"ok","id":1})
    );

    let redis = Redis::start_on(port);
    assert!(
        wait_status(server.addr, "/readyz", 200, PATIENCE).is_some(),
        "not ready after Redis appeared; log:\n{}",
        server.log()
    );
    assert!(server.log().contains("redis: link up"));
    barrier(&redis, "late", &mut [&mut raw]);
    barrier(&redis, "late2", &mut [&mut j]);
    raw.send_text("hi");
    assert_eq!(raw.next_text("own echo through Redis"), "hi");
    j.send_text(r#"{"op":"publish","channel":"late","data":"from json","id":2}"#);
    assert_eq!(j.next_json("publish reply"), json!({"op":"ok","id":2}));
    assert_eq!(raw.next_text("raw client"), "from json");
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

#[test]
fn bad_redis_cluster_options_are_refused_at_start() {
    for (args, why) in [
        (
            &["--redis-cluster", "redis://127.0.0.1:7000/2"][..],
            "database 0",
        ),
        (&["--redis-cluster", "redis://127.0.0.1:7000,h:0"], "port"),
        (
            &[
                "--redis-cluster",
                "redis://127.0.0.1:7000",
                "--redis",
                "redis://127.0.0.1:6379",
            ],
            "--redis",
        ),
    ] {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let (code, _, stderr) = ops_support::run_to_exit(&all, &[]);
        assert_eq!(code, Some(2), "{args:?}: exit status; stderr {stderr:?}");
        assert!(
            stderr.contains("--redis-cluster") && stderr.contains(why),
            "{args:?}: stderr should name --redis-cluster and say {why:?}: {stderr:?}"
        );
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
    let redis = Redis::start_with_password("s3cret");
    let good = node_on(&redis.url_with(":s3cret", 3), 1, &[], "right password");
    let with_user = node_on(
        &redis.url_with("default:s3cret", 0),
        1,
        &[],
        "user:password",
    );
    let links = redis.fanout_links();
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(
        links.iter().any(|l| l.contains(" db=3 ")) && links.iter().any(|l| l.contains(" db=0 ")),
        "/3 selects database 3: {links:?}"
    );
    // Pub/Sub works over the authenticated link (and across databases: Pub/Sub ignores them).
    let mut a = good.ws("/ws?channel=auth");
    let mut b = with_user.ws("/ws?channel=auth");
    assert_eq!(redis.wait_numsub("auth", 2, PATIENCE), 2);
    a.send_text("authenticated");
    assert_eq!(a.next_text("own echo"), "authenticated");
    assert_eq!(b.next_text("other node"), "authenticated");

    let wrong = refused_link(
        &redis.url_with(":wrong", 0),
        "WRONGPASS",
        "a wrong password",
    );
    let mut ws = wrong.ws_json("/ws");
    ws.send_text(r#"{"op":"publish","channel":"auth","data":1,"id":1}"#);
    let reply = ws.next_json("publish without a working link");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("redis unavailable"),
        "{reply}"
    );

    refused_link(
        &redis.url_with(":s3cret", 99),
        "SELECT 99 refused",
        "an out-of-range database",
    );
}

/// Starts a node whose Redis link Redis refuses (`what`): the log gives Redis' reason
/// (`logged`), and the node stays not ready for a while after that (sampled over 1.5 s: a node
/// that became ready anyway would be caught, whatever the machine's speed).
fn refused_link(url: &str, logged: &str, what: &str) -> Server {
    let server = Server::start(&["--threads", "1", "--redis", url]);
    assert!(
        server.wait_log(logged, PATIENCE),
        "{what} is logged with Redis' reason; log:\n{}",
        server.log()
    );
    stays_not_ready(&server, Duration::from_millis(1500));
    server
}

#[test]
fn a_channel_denied_by_redis_acl_does_not_break_the_others() {
    let redis = Redis::start_with_password("s3cret");
    let mut admin = redis.conn();
    let created = admin.call(&[
        b"ACL", b"SETUSER", b"limited", b"on", b">pw", b"&ok*", b"+@all",
    ]);
    assert_eq!(created, Reply::Simple("OK".into()));
    let server = node_on(&redis.url_with("limited:pw", 0), 1, &[], "ACL user");
    let mut allowed = server.ws("/ws?channel=ok1");
    let denied = server.ws("/ws?channel=forbidden");
    assert!(
        server.wait_log("SUBSCRIBE forbidden refused: NOPERM", PATIENCE),
        "the refused channel is logged; log:\n{}",
        server.log()
    );
    let mut later = server.ws("/ws?channel=ok2");
    let deadline = Instant::now() + PATIENCE;
    while redis.numsub("ok1") != 1 || redis.numsub("ok2") != 1 {
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
        server.wait_metric("fanout_redis_reconnects_total", 1.0, PATIENCE),
        1.0
    );
    let deadline = Instant::now() + PATIENCE;
    while redis.numsub("ok1") != 1 || redis.numsub("ok2") != 1 {
        assert!(
            Instant::now() < deadline,
            "ok1/ok2 not re-subscribed; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    allowed.send_text("still works");
    assert_eq!(allowed.next_text("allowed channel"), "still works");
    later.send_text("also works");
    assert_eq!(later.next_text("channel joined later"), "also works");
    // A publish to the denied channel is refused by Redis; a JSON client is told why.
    let mut j = server.ws_json("/ws");
    j.send_text(r#"{"op":"publish","channel":"forbidden","data":1,"id":1}"#);
    let reply = j.next_json("publish to a denied channel");
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
