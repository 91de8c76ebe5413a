//! Presence (issue #15, point 3) against the real binary: real `fanout` processes, a real
//! redis-server (and Redis Cluster) started by the test and stopped by PID.
//!
//! - standalone: `presence` lists every subscriber of the channel on the node (users and
//!   `info` from tokens, anonymous and raw-mode clients by client id), `presence_stats` counts
//!   clients and distinct users, join and leave events reach only the subscribers that asked,
//!   and a close or an unsubscribe leaves;
//! - two nodes on one Redis: the same, across nodes;
//! - a node killed with SIGKILL drops out of presence (with leave events) within
//!   `--presence-ttl`;
//! - after a Redis restart (no persistence) the nodes write their members again;
//! - a Redis Cluster: the same across two nodes, keys in the channel's slot.
//!
//! No assertion bounds how fast anything happens: waits are give-up deadlines ([`PATIENCE`]).

mod ops_support;

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use ops_support::{hs256, unix_now, ConfigFile, Redis, RedisCluster, Server, Ws, PATIENCE, SECRET};
use serde_json::{json, Value};

const CONFIG: &str = r#"
[[namespace]]
name = "room:*"
presence = true
"#;

fn start(config: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--config", config, "--token-hmac-secret", SECRET];
    args.extend_from_slice(extra);
    Server::start_ready(&args)
}

fn token(user: &str, name: &str) -> String {
    hs256(&json!({"sub": user, "exp": unix_now() + 3600, "info": {"name": name}}))
}

/// A JSON client that keeps the events (and messages) that come between the replies it waits
/// for.
struct Client {
    ws: Ws,
    next_id: u64,
    inbox: VecDeque<Value>,
}

impl Client {
    fn connect(node: &Server, token: Option<&str>) -> Client {
        let path = match token {
            Some(t) => format!("/ws?token={t}"),
            None => "/ws".to_string(),
        };
        Client {
            ws: node.ws_json(&path),
            next_id: 1,
            inbox: VecDeque::new(),
        }
    }

    /// Sends `command` with a fresh id and returns the reply with that id.
    fn call(&mut self, mut command: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = json!(id);
        self.ws.send_text(&command.to_string());
        loop {
            let v = self.ws.next_json(&format!("the reply to {command}"));
            if v["id"] == json!(id) {
                return v;
            }
            assert!(v.get("id").is_none(), "a reply to another command: {v}");
            self.inbox.push_back(v);
        }
    }

    fn subscribe(&mut self, channel: &str, events: bool) {
        let reply = self.call(json!({"op":"subscribe","channel":channel,"presence_events":events}));
        assert_eq!(reply["op"], "ok", "subscribe {channel}: {reply}");
    }

    fn presence(&mut self, channel: &str) -> Value {
        let reply = self.call(json!({"op":"presence","channel":channel}));
        assert_eq!(reply["op"], "presence", "{reply}");
        assert_eq!(reply["channel"], channel, "{reply}");
        reply
    }

    fn stats(&mut self, channel: &str) -> (u64, u64) {
        let reply = self.call(json!({"op":"presence_stats","channel":channel}));
        assert_eq!(reply["op"], "presence_stats", "{reply}");
        (
            reply["clients"].as_u64().unwrap(),
            reply["users"].as_u64().unwrap(),
        )
    }

    /// The next frame that is not a reply (an event or a message).
    fn next_unsolicited(&mut self, what: &str) -> Value {
        if let Some(v) = self.inbox.pop_front() {
            return v;
        }
        self.ws.next_json(what)
    }

    /// The next event, skipping messages.
    fn next_event(&mut self, what: &str) -> Value {
        loop {
            let v = self.next_unsolicited(what);
            if v["op"] == "join" || v["op"] == "leave" {
                return v;
            }
        }
    }

    /// Waits for an event of `op` about `client`; events about other clients are skipped.
    fn wait_event(&mut self, op: &str, client: &str) -> Value {
        loop {
            let v = self.next_event(&format!("a {op} of {client}"));
            if v["op"] == op && v["client"] == client {
                return v;
            }
        }
    }

    /// Publishes `marker` and reads up to it: fails if an event comes first (a client that did
    /// not ask for events must never get one). Events and messages of a channel travel in one
    /// stream, so an event sent before the marker would arrive before it.
    fn assert_no_events_until(&mut self, channel: &str, marker: &str) {
        let reply = self.call(json!({"op":"publish","channel":channel,"data":marker}));
        assert_eq!(reply["op"], "ok", "{reply}");
        loop {
            let v = self.next_unsolicited("the marker");
            assert_ne!(
                v["op"], "join",
                "an event for a client that did not ask: {v}"
            );
            assert_ne!(
                v["op"], "leave",
                "an event for a client that did not ask: {v}"
            );
            if v["op"] == "message" && v["data"] == marker {
                return;
            }
        }
    }
}

/// The client ids a presence reply lists, with their `user` (or none).
fn members(reply: &Value) -> BTreeSet<(String, Option<String>)> {
    reply["clients"]
        .as_array()
        .unwrap_or_else(|| panic!("no clients in {reply}"))
        .iter()
        .map(|c| {
            (
                c["client"].as_str().unwrap().to_string(),
                c["user"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// The users a presence reply lists (anonymous clients left out).
fn users(reply: &Value) -> Vec<String> {
    let mut users: Vec<String> = members(reply).into_iter().filter_map(|(_, u)| u).collect();
    users.sort();
    users
}

/// Asks `client` for the presence of `channel` until `done` holds (eventually-true, with a
/// give-up deadline); returns the last reply.
fn wait_presence(
    client: &mut Client,
    channel: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        // While Redis is away (a restart) the command fails: ask again.
        let reply = client.call(json!({"op":"presence","channel":channel}));
        if reply["op"] == "presence" && done(&reply) {
            return reply;
        }
        assert!(Instant::now() < deadline, "{what}: presence still {reply}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The id a client has in presence: its own `join` event tells it.
fn own_id(client: &mut Client) -> String {
    let v = client.next_event("its own join");
    assert_eq!(v["op"], "join", "{v}");
    v["client"].as_str().unwrap().to_string()
}

#[test]
fn standalone_presence_lists_counts_and_sends_events() {
    let file = ConfigFile::new("presence-standalone", CONFIG);
    let config = file.path().to_string();
    let node = start(&config, &["--threads", "2"]);
    let ch = "room:lobby";

    let mut ann = Client::connect(&node, Some(&token("ann", "Ann")));
    ann.subscribe(ch, true);
    let ann_id = own_id(&mut ann);
    assert!(ann_id.ends_with(|c: char| c.is_ascii_digit()), "{ann_id}");

    let mut bob = Client::connect(&node, None);
    bob.subscribe(ch, false);
    let bob_join = ann.next_event("bob's join");
    assert_eq!(bob_join["op"], "join");
    assert_eq!(bob_join["channel"], ch);
    assert!(
        bob_join.get("user").is_none(),
        "bob is anonymous: {bob_join}"
    );
    let bob_id = bob_join["client"].as_str().unwrap().to_string();

    let mut carl = Client::connect(&node, Some(&token("carl", "Carl")));
    carl.subscribe(ch, false);
    let carl_join = ann.next_event("carl's join");
    assert_eq!(carl_join["user"], "carl");
    assert_eq!(carl_join["info"], json!({"name":"Carl"}));

    // A second connection of ann, and a raw-mode client: both members.
    let mut ann2 = Client::connect(&node, Some(&token("ann", "Ann")));
    ann2.subscribe(ch, false);
    let ann2_id = ann.next_event("ann's second join")["client"]
        .as_str()
        .unwrap()
        .to_string();
    let mut raw = node.ws(&format!("/ws?channel={ch}"));
    let raw_join = ann.next_event("the raw client's join");
    assert!(raw_join.get("user").is_none(), "{raw_join}");
    let raw_id = raw_join["client"].as_str().unwrap().to_string();

    let reply = bob.presence(ch);
    assert_eq!(reply.get("truncated"), None, "{reply}");
    let listed = members(&reply);
    assert_eq!(listed.len(), 5, "{reply}");
    for id in [&ann_id, &bob_id, &ann2_id, &raw_id] {
        assert!(
            listed.iter().any(|(c, _)| c == id),
            "{id} missing from {reply}"
        );
    }
    assert_eq!(users(&reply), ["ann", "ann", "carl"]);
    let ann_entry = reply["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client"] == ann_id.as_str())
        .unwrap();
    assert_eq!(
        ann_entry,
        &json!({"client": ann_id, "user": "ann", "info": {"name": "Ann"}})
    );
    assert_eq!(carl.stats(ch), (5, 2));

    // Leaving: an unsubscribe, a close, a raw client's disconnect.
    let reply = carl.call(json!({"op":"unsubscribe","channel":ch}));
    assert_eq!(reply["op"], "ok");
    assert_eq!(ann.next_event("carl's leave")["op"], "leave");
    drop(ann2);
    ann.wait_event("leave", &ann2_id);
    raw.send_close(1000).unwrap();
    let left = ann.wait_event("leave", &raw_id);
    assert_eq!(left["channel"], ch);
    assert_eq!(bob.stats(ch), (2, 1));
    let reply = bob.presence(ch);
    assert_eq!(
        members(&reply),
        BTreeSet::from([(ann_id.clone(), Some("ann".into())), (bob_id.clone(), None)])
    );

    // Bob never asked for events, and got none.
    bob.assert_no_events_until(ch, "marker-1");

    // A channel without presence, and one the client may not see.
    let reply = bob.call(json!({"op":"presence","channel":"plain"}));
    assert_eq!(reply["op"], "error", "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("presence is off"),
        "{reply}"
    );
    let reply = bob.call(json!({"op":"presence_stats","channel":"plain"}));
    assert_eq!(reply["op"], "error", "{reply}");
    // Nobody there: an empty list, zero counts.
    let reply = bob.presence("room:empty");
    assert_eq!(reply["clients"], json!([]), "{reply}");
    assert_eq!(bob.stats("room:empty"), (0, 0));
}

fn redis_nodes(redis: &Redis, config: &str, extra: &[&str]) -> (Server, Server) {
    let url = redis.url();
    let mut args = vec!["--redis", &url, "--threads", "2"];
    args.extend_from_slice(extra);
    (start(config, &args), start(config, &args))
}

#[test]
fn presence_spans_two_nodes_on_redis() {
    let file = ConfigFile::new("presence-redis", CONFIG);
    let config = file.path().to_string();
    let redis = Redis::start();
    let (a, b) = redis_nodes(&redis, &config, &[]);
    let ch = "room:two";

    // A watcher on each node; only the one on B asked for events.
    let mut watch_b = Client::connect(&b, None);
    watch_b.subscribe(ch, true);
    let watch_b_id = own_id(&mut watch_b);
    let mut quiet_a = Client::connect(&a, None);
    quiet_a.subscribe(ch, false);
    let quiet_a_id = watch_b.next_event("quiet_a's join")["client"]
        .as_str()
        .unwrap()
        .to_string();

    let mut ann = Client::connect(&a, Some(&token("ann", "Ann")));
    ann.subscribe(ch, false);
    let join = watch_b.next_event("ann's join, from node A");
    assert_eq!(join["op"], "join");
    assert_eq!(join["user"], "ann");
    assert_eq!(join["info"], json!({"name":"Ann"}));
    let ann_id = join["client"].as_str().unwrap().to_string();
    let mut bob = Client::connect(&b, Some(&token("bob", "Bob")));
    bob.subscribe(ch, false);
    let join = watch_b.next_event("bob's join");
    assert_eq!(join["user"], "bob", "{join}");
    let expected = BTreeSet::from([
        (watch_b_id.clone(), None),
        (quiet_a_id.clone(), None),
        (ann_id.clone(), Some("ann".to_string())),
    ]);
    // Both nodes answer with every node's clients.
    for client in [&mut quiet_a, &mut bob] {
        let reply = wait_presence(client, ch, "four members", |r| members(r).len() == 4);
        let listed = members(&reply);
        assert!(expected.is_subset(&listed), "{reply}");
        assert_eq!(users(&reply), ["ann", "bob"]);
        assert_eq!(client.stats(ch), (4, 2));
    }
    assert_ne!(
        ann_id.split('.').next(),
        watch_b_id.split('.').next(),
        "client ids name their node"
    );

    // A close on A is a leave on B.
    drop(ann);
    let left = watch_b.wait_event("leave", &ann_id);
    assert_eq!(left["user"], "ann");
    let reply = wait_presence(&mut bob, ch, "ann gone", |r| members(r).len() == 3);
    assert!(
        !members(&reply).iter().any(|(c, _)| *c == ann_id),
        "{reply}"
    );
    assert_eq!(bob.stats(ch), (3, 1));

    // quiet_a (on the node the leave came from) asked for no events and got none.
    quiet_a.assert_no_events_until(ch, "marker-2");
}

#[test]
fn a_node_killed_with_sigkill_drops_out_within_the_ttl() {
    let file = ConfigFile::new("presence-sigkill", CONFIG);
    let config = file.path().to_string();
    let redis = Redis::start();
    let (mut a, b) = redis_nodes(&redis, &config, &["--presence-ttl", "2"]);
    let ch = "room:kill";

    let mut watch = Client::connect(&b, None);
    watch.subscribe(ch, true);
    let watch_id = own_id(&mut watch);
    let mut doomed = Vec::new();
    let mut doomed_ids = BTreeSet::new();
    for user in ["ann", "bob"] {
        let mut c = Client::connect(&a, Some(&token(user, user)));
        c.subscribe(ch, false);
        let join = watch.next_event("a join from node A");
        assert_eq!(join["user"], user);
        doomed_ids.insert(join["client"].as_str().unwrap().to_string());
        doomed.push(c);
    }
    // Longer than the TTL: node A's refreshes keep its members in.
    std::thread::sleep(Duration::from_secs(3));
    let reply = watch.presence(ch);
    assert_eq!(
        members(&reply).len(),
        3,
        "A's members are refreshed: {reply}"
    );

    a.signal("KILL");
    a.wait_exit(PATIENCE).expect("node A exits on SIGKILL");
    let reply = wait_presence(&mut watch, ch, "node A dropped", |r| members(r).len() == 1);
    assert_eq!(members(&reply), BTreeSet::from([(watch_id.clone(), None)]));
    assert_eq!(watch.stats(ch), (1, 0));
    // And B's subscriber that asked for events was told.
    let mut left = BTreeSet::new();
    while left != doomed_ids {
        let v = watch.next_event("the leaves of node A's clients");
        if v["op"] == "leave" {
            left.insert(v["client"].as_str().unwrap().to_string());
        }
    }
    drop(doomed);
}

#[test]
fn members_are_written_again_after_a_redis_restart() {
    let file = ConfigFile::new("presence-restart", CONFIG);
    let config = file.path().to_string();
    let mut redis = Redis::start();
    // A TTL far beyond the test's patience: the periodic refresh never comes; the refresh a
    // node makes when its link comes back finds the members gone.
    let (a, b) = redis_nodes(&redis, &config, &["--presence-ttl", "3600"]);
    let ch = "room:restart";
    let mut ann = Client::connect(&a, Some(&token("ann", "Ann")));
    ann.subscribe(ch, false);
    let mut bob = Client::connect(&b, Some(&token("bob", "Bob")));
    bob.subscribe(ch, false);
    wait_presence(&mut ann, ch, "both", |r| members(r).len() == 2);

    redis.kill();
    redis.restart();
    // Nothing persisted: the nodes find their members gone and write them again.
    let reply = wait_presence(&mut ann, ch, "both again", |r| members(r).len() == 2);
    assert_eq!(users(&reply), ["ann", "bob"]);
    assert_eq!(bob.stats(ch), (2, 2));
}

#[test]
fn presence_spans_two_nodes_on_a_redis_cluster() {
    let file = ConfigFile::new("presence-cluster", CONFIG);
    let config = file.path().to_string();
    let cluster = RedisCluster::start(3, 0);
    let extra = ["--config", config.as_str(), "--token-hmac-secret", SECRET];
    let a = cluster.node(2, &extra);
    let b = cluster.node(2, &extra);
    let ch = "room:cluster";

    let mut watch = Client::connect(&b, None);
    watch.subscribe(ch, true);
    let watch_id = own_id(&mut watch);
    let mut ann = Client::connect(&a, Some(&token("ann", "Ann")));
    ann.subscribe(ch, false);
    let join = watch.next_event("ann's join from node A");
    assert_eq!(join["user"], "ann");
    let ann_id = join["client"].as_str().unwrap().to_string();
    let reply = wait_presence(&mut ann, ch, "both", |r| members(r).len() == 2);
    assert_eq!(
        members(&reply),
        BTreeSet::from([(watch_id, None), (ann_id.clone(), Some("ann".into()))])
    );
    assert_eq!(watch.stats(ch), (2, 1));
    // The keys live on the master that owns the channel's slot.
    let owner = cluster.master_of(ch);
    let key = format!("{{{ch}}}:presence");
    let len = cluster.call(owner, &[b"HLEN", key.as_bytes()]).int();
    assert_eq!(len, 2, "HLEN {key} on its master");
    drop(ann);
    watch.wait_event("leave", &ann_id);
}

/// The Redis server's clock in milliseconds (what the scripts score nodes with).
fn redis_ms(redis: &Redis) -> i64 {
    let t = redis.call(&[b"TIME"]);
    let items = t.items();
    let secs: i64 = items[0].text().parse().unwrap();
    let micros: i64 = items[1].text().parse().unwrap();
    secs * 1000 + micros / 1000
}

#[test]
fn a_big_channel_lists_a_capped_sample_and_counts_everyone() {
    let file = ConfigFile::new("presence-big", CONFIG);
    let config = file.path().to_string();
    let redis = Redis::start();
    let (a, _b) = redis_nodes(&redis, &config, &[]);
    let ch = "room:big";
    let mut ann = Client::connect(&a, Some(&token("ann", "Ann")));
    ann.subscribe(ch, false);
    wait_presence(&mut ann, ch, "ann", |r| members(r).len() == 1);

    // 1500 members of another node ("fake", alive as far as its score says), written the way
    // the join script writes them; 500 of them are user "u<i % 500>".
    let (hash, nodes, users_key) = (
        format!("{{{ch}}}:presence"),
        format!("{{{ch}}}:presence-nodes"),
        format!("{{{ch}}}:presence-users"),
    );
    let mut hset: Vec<Vec<u8>> = vec![b"HSET".to_vec(), hash.clone().into_bytes()];
    let mut per_user = std::collections::BTreeMap::new();
    for i in 0..1500 {
        let user = format!("u{}", i % 500);
        hset.push(format!("fake.0.{i}").into_bytes());
        hset.push(
            json!({"client": format!("fake.0.{i}"), "user": user})
                .to_string()
                .into_bytes(),
        );
        *per_user.entry(user).or_insert(0) += 1;
    }
    let args: Vec<&[u8]> = hset.iter().map(Vec::as_slice).collect();
    assert_eq!(redis.call(&args).int(), 1500);
    for (user, n) in &per_user {
        redis.call(&[
            b"HSET",
            users_key.as_bytes(),
            user.as_bytes(),
            n.to_string().as_bytes(),
        ]);
    }
    let now = redis_ms(&redis).to_string();
    redis.call(&[b"ZADD", nodes.as_bytes(), now.as_bytes(), b"fake"]);

    let reply = ann.presence(ch);
    assert_eq!(reply["truncated"], true, "1501 members, 1000 listed");
    assert_eq!(members(&reply).len(), 1000);
    assert_eq!(ann.stats(ch), (1501, 501));

    // The fake node stops refreshing (its score is now older than the TTL): the next read drops
    // its 1500 members and their user counts.
    let old = (redis_ms(&redis) - 60_000).to_string();
    redis.call(&[b"ZADD", nodes.as_bytes(), old.as_bytes(), b"fake"]);
    let reply = ann.presence(ch);
    assert_eq!(members(&reply).len(), 1, "{reply}");
    assert_eq!(reply.get("truncated"), None);
    assert_eq!(ann.stats(ch), (1, 1));
}

#[test]
fn a_drained_node_leaves_presence_at_once() {
    let file = ConfigFile::new("presence-drain", CONFIG);
    let config = file.path().to_string();
    let redis = Redis::start();
    // A TTL far beyond the test's patience: only the node's own farewell can remove its members.
    let extra = [
        "--presence-ttl",
        "3600",
        "--drain-delay",
        "0",
        "--drain-time",
        "1",
    ];
    let (mut a, b) = redis_nodes(&redis, &config, &extra);
    let ch = "room:drain";
    let mut watch = Client::connect(&b, None);
    watch.subscribe(ch, true);
    let watch_id = own_id(&mut watch);
    let mut ann = Client::connect(&a, Some(&token("ann", "Ann")));
    ann.subscribe(ch, false);
    let ann_id = watch.next_event("ann's join")["client"]
        .as_str()
        .unwrap()
        .to_string();

    a.signal("TERM");
    watch.wait_event("leave", &ann_id);
    a.wait_exit(PATIENCE).expect("node A exits after its drain");
    let reply = wait_presence(&mut watch, ch, "only the watcher", |r| {
        members(r).len() == 1
    });
    assert_eq!(members(&reply), BTreeSet::from([(watch_id, None)]));
    drop(ann);
}

#[test]
fn presence_metrics_count_members() {
    let file = ConfigFile::new("presence-metrics", CONFIG);
    let config = file.path().to_string();
    let node = start(&config, &["--threads", "2"]);
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(&node, None)).collect();
    for c in &mut clients {
        c.subscribe("room:m", false);
        // Not a presence channel: no member.
        c.subscribe("plain", false);
    }
    assert_eq!(
        node.wait_metric("fanout_presence_members", 3.0, PATIENCE),
        3.0
    );
    clients.pop();
    assert_eq!(
        node.wait_metric("fanout_presence_members", 2.0, PATIENCE),
        2.0
    );
    let m = node.metrics();
    assert_eq!(m.get("fanout_presence_joins_total"), 3.0);
    assert_eq!(m.get("fanout_presence_leaves_total"), 1.0);
}
