//! Channel history and recovery against the real binary: standalone (the node's store), on one
//! real redis-server shared by two nodes, and on a real Redis Cluster. Clients are real
//! WebSockets speaking the JSON protocol.
//!
//! What is checked: deliveries carry increasing offsets; `history` returns the newest messages;
//! a client away while messages are published elsewhere gets exactly those on recovery, in
//! order, none twice, then live ones; recovery while publishing never stops (many rounds) has
//! no gap and no duplicate at the switch from history to live; a lost history (Redis restarted
//! without persistence, a standalone node restarted) changes the epoch and answers
//! `recovered: false`; the standalone store stays under its byte cap, evicting the oldest.

mod ops_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ops_support::*;
use serde_json::{json, Value};

const SEC: Duration = Duration::from_secs(1);

const NAMESPACES: &str = r#"
[[namespace]]
name = "chat:*"
history_size = 1000
history_ttl = 300

[[namespace]]
name = "tiny:*"
history_size = 5
history_ttl = 300
"#;

fn config(test: &str) -> ConfigFile {
    ConfigFile::new(test, NAMESPACES)
}

fn standalone(config: &ConfigFile, extra: &[&str]) -> Server {
    let mut args = vec!["--threads", "2", "--config", config.path()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn on_redis(config: &ConfigFile, url: &str, cluster: bool) -> Server {
    let flag = if cluster {
        "--redis-cluster"
    } else {
        "--redis"
    };
    Server::start_ready(&["--threads", "2", "--config", config.path(), flag, url])
}

fn send(ws: &mut Ws, command: Value) {
    ws.send_text(&command.to_string());
}

/// Sends a command and returns its reply (the next frame: nothing else is subscribed).
fn call(ws: &mut Ws, command: Value) -> Value {
    send(ws, command);
    ws.next_json("a reply")
}

/// Publishes `n` messages `"{tag} {i}"` and waits for each `ok`.
fn publish_acked(ws: &mut Ws, channel: &str, tag: &str, n: usize) {
    for i in 0..n {
        let reply = call(
            ws,
            json!({"op":"publish","channel":channel,"data":format!("{tag} {i}"),"id":i}),
        );
        assert_eq!(reply["op"], "ok", "publish {i}: {reply}");
    }
}

/// Subscribes, returning the `ok` (with its offset and epoch).
fn subscribe(ws: &mut Ws, channel: &str, since: Option<(u64, &str)>) -> Value {
    let mut command = json!({"op":"subscribe","channel":channel,"id":"s"});
    if let Some((offset, epoch)) = since {
        command["since"] = json!({"offset":offset,"epoch":epoch});
    }
    let ok = call(ws, command);
    assert_eq!(ok["op"], "ok", "subscribe: {ok}");
    assert!(ok["offset"].is_u64() && ok["epoch"].is_string(), "{ok}");
    ok
}

/// The next `n` deliveries: their offsets and data.
fn deliveries(ws: &mut Ws, n: usize) -> Vec<(u64, String)> {
    (0..n)
        .map(|i| {
            let m = ws.next_json(&format!("delivery {i} of {n}"));
            assert_eq!(m["op"], "message", "{m}");
            (
                m["offset"].as_u64().expect("an offset"),
                m["data"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn history_and_offsets(publisher_node: &Server, reader_node: &Server) {
    let mut reader = reader_node.ws_json("/ws");
    let ok = subscribe(&mut reader, "chat:h", None);
    let start = ok["offset"].as_u64().unwrap();
    let mut publisher = publisher_node.ws_json("/ws");
    publish_acked(&mut publisher, "chat:h", "m", 8);
    let got = deliveries(&mut reader, 8);
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (start + 1..=start + 8).collect::<Vec<_>>());
    let page = call(
        &mut publisher,
        json!({"op":"history","channel":"chat:h","limit":3,"id":7}),
    );
    assert_eq!(page["op"], "history", "{page}");
    assert_eq!(page["id"], 7);
    assert_eq!(page["offset"], start + 8);
    assert_eq!(page["epoch"], ok["epoch"]);
    let data: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].as_str().unwrap())
        .collect();
    assert_eq!(data, ["m 5", "m 6", "m 7"]);
    // A channel without history says so.
    let refused = call(
        &mut publisher,
        json!({"op":"history","channel":"plain","id":8}),
    );
    assert_eq!(refused["op"], "error", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("history is off"),
        "{refused}"
    );
    // Deliveries on it carry no offset.
    let mut plain = reader_node.ws_json("/ws");
    assert_eq!(
        call(&mut plain, json!({"op":"subscribe","channel":"plain"})),
        json!({"op":"ok"})
    );
    publish_acked(&mut publisher, "plain", "probe", 1);
    let m = plain.next_json("a message on a channel without history");
    assert!(m.get("offset").is_none(), "{m}");
}

#[test]
fn history_and_offsets_standalone() {
    let config = config("history_standalone");
    let node = standalone(&config, &[]);
    history_and_offsets(&node, &node);
}

#[test]
fn history_and_offsets_on_redis_across_nodes() {
    let redis = Redis::start();
    let config = config("history_redis");
    let (a, b) = (
        on_redis(&config, &redis.url(), false),
        on_redis(&config, &redis.url(), false),
    );
    history_and_offsets(&a, &b);
}

/// A client away while `n` messages are published elsewhere comes back with exactly those.
fn away_and_back(home: &Server, elsewhere: &Server, n: usize) {
    let mut client = home.ws_json("/ws");
    let ok = subscribe(&mut client, "chat:away", None);
    let epoch = ok["epoch"].as_str().unwrap().to_string();
    let mut publisher = elsewhere.ws_json("/ws");
    publish_acked(&mut publisher, "chat:away", "before", 3);
    let seen = deliveries(&mut client, 3);
    let last = seen.last().unwrap().0;
    drop(client);
    publish_acked(&mut publisher, "chat:away", "away", n);
    let mut client = home.ws_json("/ws");
    let ok = subscribe(&mut client, "chat:away", Some((last, &epoch)));
    assert_eq!(ok["recovered"], true, "{ok}");
    assert_eq!(ok["epoch"], epoch.as_str());
    assert_eq!(ok["offset"], last + n as u64);
    let missed = deliveries(&mut client, n);
    for (i, (offset, data)) in missed.iter().enumerate() {
        assert_eq!(*offset, last + 1 + i as u64, "message {i} of the recovery");
        assert_eq!(data, &format!("away {i}"));
    }
    // Then live, right after the recovered ones.
    publish_acked(&mut publisher, "chat:away", "live", 1);
    assert_eq!(
        deliveries(&mut client, 1),
        [(last + n as u64 + 1, "live 0".to_string())]
    );
    // From an offset the history no longer reaches (tiny keeps 5), or another epoch: false.
    let mut tiny = home.ws_json("/ws");
    let ok = subscribe(&mut tiny, "tiny:t", None);
    let tiny_epoch = ok["epoch"].as_str().unwrap().to_string();
    publish_acked(&mut publisher, "tiny:t", "t", 200);
    let mut late = home.ws_json("/ws");
    let ok = subscribe(&mut late, "tiny:t", Some((1, &tiny_epoch)));
    assert_eq!(ok["recovered"], false, "{ok}");
    assert_eq!(ok["offset"], 200);
    let ok = subscribe(&mut late, "chat:away", Some((last, "another-epoch")));
    assert_eq!(ok["recovered"], false, "{ok}");
    assert_eq!(
        ok["epoch"],
        epoch.as_str(),
        "the current epoch, to start again from"
    );
}

#[test]
fn a_client_away_gets_exactly_what_it_missed_standalone() {
    let config = config("away_standalone");
    let node = standalone(&config, &[]);
    away_and_back(&node, &node, 100);
}

#[test]
fn a_client_away_gets_exactly_what_another_node_published() {
    let redis = Redis::start();
    let config = config("away_redis");
    let (a, b) = (
        on_redis(&config, &redis.url(), false),
        on_redis(&config, &redis.url(), false),
    );
    away_and_back(&a, &b, 100);
}

/// Publishes on `channel` from its own client, as fast as acks come, until stopped.
struct Publisher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Publisher {
    fn start(node: &Server, channel: &str) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let mut ws = node.ws_json("/ws");
        let (flag, channel) = (stop.clone(), channel.to_string());
        let thread = std::thread::spawn(move || {
            let mut sent = 0;
            // Bounded by the flag, and by a count in case the test died without stopping it.
            while !flag.load(Ordering::Acquire) && sent < 1_000_000 {
                let reply = call(
                    &mut ws,
                    json!({"op":"publish","channel":channel,"data":sent,"id":sent}),
                );
                assert_eq!(reply["op"], "ok", "{reply}");
                sent += 1;
            }
            sent
        });
        Publisher {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Resubscribes with `since` over and over while another client publishes without pause:
/// every offset the subscriber sees is the one after the last, across every switch from
/// history to live and back.
fn recovery_races_live(home: &Server, elsewhere: &Server, rounds: usize) {
    let channel = "chat:race";
    let publisher = Publisher::start(elsewhere, channel);
    let mut client = home.ws_json("/ws");
    let ok = subscribe(&mut client, channel, None);
    let epoch = ok["epoch"].as_str().unwrap().to_string();
    let mut last = ok["offset"].as_u64().unwrap();
    let mut seen = 0;
    let mut recovered_some = 0;
    for round in 0..rounds {
        // Live for a few messages.
        for _ in 0..5 {
            let m = client.next_json("a live message");
            assert_eq!(m["op"], "message", "round {round}: {m}");
            let offset = m["offset"].as_u64().unwrap();
            assert_eq!(
                offset,
                last + 1,
                "round {round}: a gap or duplicate going live"
            );
            last = offset;
            seen += 1;
        }
        send(
            &mut client,
            json!({"op":"unsubscribe","channel":channel,"id":"u"}),
        );
        // Messages already queued before the unsubscribe still arrive, in order.
        loop {
            let m = client.next_json("the unsubscribe's ok");
            if m["op"] == "ok" {
                break;
            }
            let offset = m["offset"].as_u64().unwrap();
            assert_eq!(
                offset,
                last + 1,
                "round {round}: before the unsubscribe's ok"
            );
            last = offset;
            seen += 1;
        }
        // Away for a moment while the publisher goes on.
        std::thread::sleep(Duration::from_millis(20));
        let ok = subscribe(&mut client, channel, Some((last, &epoch)));
        assert_eq!(ok["recovered"], true, "round {round}: {ok}");
        let top = ok["offset"].as_u64().unwrap();
        recovered_some += (top > last) as usize;
        // The recovered messages, then live ones, one sequence.
        while last < top {
            let m = client.next_json("a recovered message");
            let offset = m["offset"].as_u64().unwrap();
            assert_eq!(
                offset,
                last + 1,
                "round {round}: a gap or duplicate in recovery"
            );
            last = offset;
            seen += 1;
        }
    }
    let published = publisher.stop();
    assert!(seen >= rounds * 5, "{seen} seen in {rounds} rounds");
    assert!(
        recovered_some * 2 >= rounds,
        "only {recovered_some} of {rounds} rounds had anything to recover ({published} published)"
    );
}

#[test]
fn recovery_while_publishing_has_no_gap_and_no_duplicate_standalone() {
    let config = config("race_standalone");
    let node = standalone(&config, &[]);
    recovery_races_live(&node, &node, 60);
}

#[test]
fn recovery_while_publishing_has_no_gap_and_no_duplicate_on_redis() {
    let redis = Redis::start();
    let config = config("race_redis");
    let (a, b) = (
        on_redis(&config, &redis.url(), false),
        on_redis(&config, &redis.url(), false),
    );
    recovery_races_live(&a, &b, 60);
}

#[test]
fn a_redis_restarted_without_persistence_changes_the_epoch() {
    let mut redis = Redis::start();
    let config = config("epoch_redis");
    let node = on_redis(&config, &redis.url(), false);
    let mut client = node.ws_json("/ws");
    let ok = subscribe(&mut client, "chat:e", None);
    let epoch = ok["epoch"].as_str().unwrap().to_string();
    let mut publisher = node.ws_json("/ws");
    publish_acked(&mut publisher, "chat:e", "x", 3);
    let seen = deliveries(&mut client, 3);
    drop(client);
    redis.kill();
    redis.restart();
    assert!(
        wait_status(node.addr, "/readyz", 200, 20 * SEC).is_some(),
        "node not ready again; log:\n{}",
        node.log()
    );
    let mut back = node.ws_json("/ws");
    let ok = subscribe(&mut back, "chat:e", Some((seen[2].0, &epoch)));
    assert_eq!(ok["recovered"], false, "{ok}");
    assert_ne!(ok["epoch"], epoch.as_str(), "{ok}");
    assert_eq!(ok["offset"], 0);
}

#[test]
fn a_standalone_node_restarted_changes_the_epoch() {
    let config = config("epoch_standalone");
    let node = standalone(&config, &[]);
    let mut client = node.ws_json("/ws");
    let ok = subscribe(&mut client, "chat:e", None);
    let epoch = ok["epoch"].as_str().unwrap().to_string();
    let mut publisher = node.ws_json("/ws");
    publish_acked(&mut publisher, "chat:e", "x", 2);
    drop((client, publisher));
    drop(node);
    // The same configuration, a new process: its history starts from nothing.
    let node = standalone(&config, &[]);
    let mut back = node.ws_json("/ws");
    let ok = subscribe(&mut back, "chat:e", Some((2, &epoch)));
    assert_eq!(ok["recovered"], false, "{ok}");
    assert_ne!(ok["epoch"], epoch.as_str());
}

#[test]
fn the_standalone_store_stays_under_its_cap_evicting_the_oldest() {
    let config = config("evict");
    let cap = 200_000;
    let node = standalone(&config, &["--history-max-bytes", &cap.to_string()]);
    let mut publisher = node.ws_json("/ws");
    let body = "x".repeat(1000);
    for i in 0..400 {
        let channel = format!("chat:evict{}", i % 4);
        let reply = call(
            &mut publisher,
            json!({"op":"publish","channel":channel,"data":format!("{i:04} {body}"),"id":i}),
        );
        assert_eq!(reply["op"], "ok", "{reply}");
    }
    let m = node.metrics();
    let bytes = m.get("fanout_history_bytes");
    assert!(bytes > 0.0 && bytes <= cap as f64, "history bytes {bytes}");
    assert!(m.get("fanout_history_evicted_total") > 0.0);
    let kept = m.get("fanout_history_messages");
    assert!((100.0..400.0).contains(&kept), "{kept} kept");
    // What is left of each channel is its newest messages.
    for c in 0..4 {
        let page = call(
            &mut publisher,
            json!({"op":"history","channel":format!("chat:evict{c}"),"limit":1000}),
        );
        let messages = page["messages"].as_array().unwrap();
        assert!(!messages.is_empty(), "{page}");
        assert_eq!(messages.last().unwrap()["offset"], 100);
        let offsets: Vec<u64> = messages
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        let first = offsets[0];
        assert_eq!(offsets, (first..=100).collect::<Vec<_>>());
        // The oldest are gone: recovery from the start is refused.
        let mut late = node.ws_json("/ws");
        let epoch = page["epoch"].as_str().unwrap();
        let ok = subscribe(&mut late, &format!("chat:evict{c}"), Some((0, epoch)));
        assert_eq!(ok["recovered"], false, "{ok}");
    }
}

#[test]
fn history_on_a_redis_cluster_for_channels_on_every_shard() {
    let cluster = RedisCluster::start(3, 0);
    let config = config("history_cluster");
    let (a, b) = (
        on_redis(&config, &cluster.seeds(), true),
        on_redis(&config, &cluster.seeds(), true),
    );
    // Enough channels that every master owns some.
    let mut masters = std::collections::BTreeSet::new();
    for i in 0..12 {
        let channel = format!("chat:c{i}");
        masters.insert(cluster.master_of(&channel));
        let mut client = a.ws_json("/ws");
        let ok = subscribe(&mut client, &channel, None);
        let epoch = ok["epoch"].as_str().unwrap().to_string();
        let mut publisher = b.ws_json("/ws");
        publish_acked(&mut publisher, &channel, "m", 4);
        let got = deliveries(&mut client, 4);
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        drop(client);
        publish_acked(&mut publisher, &channel, "away", 3);
        let mut back = a.ws_json("/ws");
        let ok = subscribe(&mut back, &channel, Some((4, &epoch)));
        assert_eq!(ok["recovered"], true, "{channel}: {ok}");
        let missed = deliveries(&mut back, 3);
        assert_eq!(
            missed.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            [5, 6, 7]
        );
    }
    assert_eq!(masters.len(), 3, "channels on every master: {masters:?}");
}

#[test]
fn a_catch_all_namespace_with_history_leaves_the_nodes_own_messages_alone() {
    // The nodes' control channel (a disconnect from the server API) is a plain PUBLISH even
    // when `*` keeps history: another node must still understand it.
    let redis = Redis::start();
    let config = ConfigFile::new(
        "catch_all",
        "[[namespace]]\nname = \"*\"\nhistory_size = 10\nhistory_ttl = 60\n",
    );
    let url = redis.url();
    let node = |api: bool| {
        let mut args = vec!["--threads", "2", "--config", config.path(), "--redis", &url];
        args.extend(["--token-hmac-secret", SECRET]);
        if api {
            args.extend_from_slice(&API_ARGS);
        }
        Server::start_ready(&args)
    };
    let (a, b) = (node(true), node(false));
    let token = hs256(&json!({"sub": "42", "exp": unix_now() + 600}));
    let mut user = Ws::connect(b.addr, &format!("/ws?token={token}"), Some("fanout.json")).unwrap();
    let ok = subscribe(&mut user, "room", None);
    assert!(
        ok["epoch"].is_string(),
        "history applies to client channels: {ok}"
    );
    let api = ApiClient::of(&a);
    let answer = api.post("/api/disconnect", &json!({"user":"42"}));
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        user.recv_close(20 * SEC).expect("closed by the other node"),
        (4002, "disconnected by the server".to_string())
    );
}
