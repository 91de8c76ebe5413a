//! Redis Cluster scale-out with sharded Pub/Sub (`--redis-cluster`), with real processes: each
//! test starts its own cluster (ops_support's [`RedisCluster`]: 3 masters with a replica each on
//! free loopback ports, every process stopped by PID) and real `fanout` nodes, and checks the
//! contract of `--redis-cluster`:
//!
//! - a channel `c` (Redis name `prefix + c`) is SSUBSCRIBEd once per node on the master that
//!   owns its slot, over exactly one connection per master per node (none to replicas),
//!   whatever `--threads`; publishes are SPUBLISHed to the owner, external SPUBLISHes reach
//!   the clients, every client on every node gets each message exactly once and in order per
//!   publisher, on channels spread across every shard, in raw and JSON modes;
//! - a JSON `subscribe` is answered `ok` only once the owning master confirmed the SSUBSCRIBE;
//! - a slot migrated to another master, a master SIGKILLed and replaced by its replica, the whole
//!   cluster stopped and restarted, a shard added with slots moved to it: the node follows
//!   (MOVED, `sunsubscribe` pushes, a refreshed slot map), resubscribes on the new owner, keeps
//!   every client connected, and /readyz and the `fanout_redis_*` metrics say where it is.
//!
//! Before counting deliveries every test waits, with [`RedisCluster::barrier`], until the cluster
//! really routes the channel to every client: a subscription made or remade is at most once
//! until it is in place. No test bounds how soon anything happens: waits give up after
//! ops_support's PATIENCE; recovery times are printed (run with `--nocapture` to see them).

mod ops_support;

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use ops_support::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Channels and their clients.

/// One client of a channel: raw or JSON (`fanout.json`, joined by `?channel=`).
struct Sub {
    what: String,
    ws: Ws,
    json: bool,
}

/// A channel and its clients on every node.
struct Group {
    channel: String,
    /// The channel's Redis name (`--redis-prefix` + channel).
    redis: String,
    subs: Vec<Sub>,
}

impl Group {
    /// `raw` raw and `json` JSON clients of `channel` on each of `nodes`.
    fn join(nodes: &[&Server], prefix: &str, channel: &str, raw: usize, json: usize) -> Group {
        let path = format!("/ws?channel={channel}");
        let mut subs = Vec::new();
        for (n, node) in nodes.iter().enumerate() {
            for i in 0..raw {
                subs.push(Sub {
                    what: format!("{channel}: raw client {i} on node {n}"),
                    ws: node.ws(&path),
                    json: false,
                });
            }
            for i in 0..json {
                subs.push(Sub {
                    what: format!("{channel}: JSON client {i} on node {n}"),
                    ws: node.ws_json(&path),
                    json: true,
                });
            }
        }
        Group {
            channel: channel.to_string(),
            redis: format!("{prefix}{channel}"),
            subs,
        }
    }

    fn clients(&mut self) -> Vec<&mut Ws> {
        self.subs.iter_mut().map(|s| &mut s.ws).collect()
    }
}

/// One group per channel, each with `raw` raw and `json` JSON clients on every node.
fn groups(
    nodes: &[&Server],
    prefix: &str,
    channels: &[String],
    raw: usize,
    json: usize,
) -> Vec<Group> {
    channels
        .iter()
        .map(|c| Group::join(nodes, prefix, c, raw, json))
        .collect()
}

/// [`RedisCluster::barrier`] on every group; returns the longest wait (for printing).
fn barrier_all(cluster: &RedisCluster, groups: &mut [Group]) -> Duration {
    groups
        .iter_mut()
        .map(|g| {
            let redis = g.redis.clone();
            cluster.barrier(&redis, &mut g.clients())
        })
        .max()
        .unwrap_or_default()
}

/// What a client got next: `Ok(text)` for a message of its channel, `Err(id)` for the `ok` to
/// one of its own JSON publishes.
fn next_of(sub: &mut Sub, channel: &str) -> Result<String, Value> {
    if !sub.json {
        let f = sub.ws.next(&sub.what);
        assert_eq!(f.opcode, TEXT, "{}: {f:?}", sub.what);
        return Ok(f.text());
    }
    let v = sub.ws.next_json(&sub.what);
    match v["op"].as_str() {
        Some("ok") => Err(v["id"].clone()),
        Some("message") => {
            assert_eq!(v["channel"], channel, "{}: {v}", sub.what);
            Ok(v["data"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: data is not a string: {v}", sub.what))
                .to_string())
        }
        _ => panic!("{}: unexpected {v}", sub.what),
    }
}

/// Every client of every group publishes `rounds` numbered messages to its channel (a JSON
/// client with a `publish` command, which must be answered `ok`); every client must get each
/// message of its channel exactly once, in order per publisher, and nothing of other channels.
/// Then a barrier on every channel shows nothing more is coming (a duplicate would arrive
/// before the probes).
fn everyone_publishes(cluster: &RedisCluster, groups: &mut [Group], rounds: usize, tag: &str) {
    for round in 0..rounds {
        for g in groups.iter_mut() {
            for (k, s) in g.subs.iter_mut().enumerate() {
                let text = format!("{tag}:{k}:{round}");
                if s.json {
                    let cmd = json!({"op":"publish","channel":g.channel,"data":text,"id":round});
                    s.ws.send_text(&cmd.to_string());
                } else {
                    s.ws.send_text(&text);
                }
            }
        }
    }
    for g in groups.iter_mut() {
        let n = g.subs.len();
        for s in g.subs.iter_mut() {
            let mut next = vec![0usize; n];
            let mut oks = Vec::new();
            while next.iter().sum::<usize>() < n * rounds || (s.json && oks.len() < rounds) {
                let text = match next_of(s, &g.channel) {
                    Ok(text) => text,
                    Err(id) => {
                        oks.push(id);
                        assert!(oks.len() <= rounds, "{}: extra oks {oks:?}", s.what);
                        continue;
                    }
                };
                let mut parts = text.split(':');
                assert_eq!(parts.next(), Some(tag), "{}: unexpected {text:?}", s.what);
                let from: usize = parts.next().and_then(|p| p.parse().ok()).unwrap();
                let seq: usize = parts.next().and_then(|p| p.parse().ok()).unwrap();
                assert!(
                    from < n && seq == next[from],
                    "{}: message {seq} of publisher {from} where {} was due (lost, duplicated or reordered)",
                    s.what,
                    next.get(from).copied().unwrap_or_default()
                );
                next[from] += 1;
            }
            if s.json {
                let mut ids: Vec<u64> = oks.iter().filter_map(Value::as_u64).collect();
                ids.sort_unstable();
                let want: Vec<u64> = (0..rounds as u64).collect();
                assert_eq!(ids, want, "{}: the oks of its publishes", s.what);
            }
        }
    }
    barrier_all(cluster, groups);
}

/// An external SPUBLISH of `payload` to every group's channel reaches one subscriber per node
/// on the owner, and every client (JSON clients get the text as `data`).
fn external_spublish_reaches_everyone(cluster: &RedisCluster, groups: &mut [Group], nodes: i64) {
    for g in groups.iter_mut() {
        let payload = format!("external to {}", g.channel);
        assert_eq!(
            cluster.spublish(&g.redis, payload.as_bytes()),
            nodes,
            "{}: SPUBLISH on the owner reaches one subscription per node",
            g.redis
        );
        for s in g.subs.iter_mut() {
            assert_eq!(next_of(s, &g.channel), Ok(payload.clone()), "{}", s.what);
        }
    }
}

fn open_connections(node: &Server) -> f64 {
    node.metrics().get("fanout_connections_open")
}

/// Waits until the node's /readyz answers `status`; fails naming `what`.
fn wait_ready(node: &Server, status: u16, what: &str) -> Duration {
    wait_status(node.addr, "/readyz", status, PATIENCE).unwrap_or_else(|| {
        panic!(
            "{what}: /readyz never answered {status}; log:\n{}",
            node.log()
        )
    })
}

/// The node's Redis metrics agree with a cluster of `shards` shards, all linked.
fn assert_linked(node: &Server, shards: f64, what: &str) {
    for sample in [
        "fanout_redis_cluster_shards",
        "fanout_redis_links",
        "fanout_redis_links_up",
    ] {
        assert_eq!(
            node.wait_metric(sample, shards, PATIENCE),
            shards,
            "{what}: {sample}; log:\n{}",
            node.log()
        );
    }
}

/// Every serving master has exactly `nodes` fanout connections; replicas have none.
fn assert_one_link_per_master_per_node(cluster: &RedisCluster, nodes: usize, what: &str) {
    let counts = cluster.wait_fanout_links(nodes);
    let masters = cluster.masters();
    for (port, n) in &counts {
        let want = if masters.contains(port) { nodes } else { 0 };
        assert_eq!(
            *n, want,
            "{what}: fanout connections on {port} (masters {masters:?}): {counts:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// a. Delivery across nodes over every shard.

#[test]
fn every_client_gets_each_message_once_in_order_over_every_shard() {
    let cluster = RedisCluster::start(3, 1);
    let (a, b) = (cluster.node(2, &[]), cluster.node(2, &[]));
    for n in [&a, &b] {
        assert_linked(n, 3.0, "at start");
    }
    // Two channels per shard, each with a raw and a JSON client on both nodes.
    let channels = cluster.channels_on_every_shard("", 6);
    let mut groups = groups(&[&a, &b], "", &channels, 1, 1);
    barrier_all(&cluster, &mut groups);
    for g in &groups {
        assert_eq!(
            cluster.shardnumsub(&g.redis),
            2,
            "{}: one per node",
            g.redis
        );
    }
    everyone_publishes(&cluster, &mut groups, 20, "m");
    external_spublish_reaches_everyone(&cluster, &mut groups, 2);

    // A JSON payload is `data` verbatim for JSON clients; raw clients get the bytes.
    for g in groups.iter_mut() {
        assert_eq!(cluster.spublish(&g.redis, br#"{"k":[1,2]}"#), 2);
        for s in g.subs.iter_mut() {
            if s.json {
                assert_eq!(
                    s.ws.next_json(&s.what),
                    json!({"op":"message","channel":g.channel,"data":{"k":[1,2]}})
                );
            } else {
                assert_eq!(s.ws.next_text(&s.what), r#"{"k":[1,2]}"#);
            }
        }
    }
    for n in [&a, &b] {
        let m = n.metrics();
        assert_eq!(m.get("fanout_redis_subscriptions"), 6.0);
        assert_eq!(m.get("fanout_connections_open"), 12.0);
    }
}

#[test]
fn redis_prefix_applies_both_ways_on_every_shard() {
    let cluster = RedisCluster::start(3, 1);
    let prefix = "app1:";
    let nodes = [
        cluster.node(2, &["--redis-prefix", prefix]),
        cluster.node(2, &["--redis-prefix", prefix]),
    ];
    let channels = cluster.channels_on_every_shard(prefix, 3);
    let mut groups = groups(&[&nodes[0], &nodes[1]], prefix, &channels, 1, 1);
    barrier_all(&cluster, &mut groups);
    for g in groups.iter_mut() {
        // Subscribed as app1:c on the owner of app1:c's slot, and not as c anywhere.
        assert_eq!(cluster.shardnumsub(&g.redis), 2, "{}", g.redis);
        for m in cluster.masters() {
            assert_eq!(
                cluster.shardnumsub_on(m, &g.channel),
                0,
                "{} unprefixed on {m}",
                g.channel
            );
        }
        assert_eq!(
            cluster.spublish(&g.channel, b"unprefixed"),
            0,
            "nobody may listen on the unprefixed name"
        );
        assert_eq!(cluster.spublish(&g.redis, b"prefixed"), 2);
        for s in g.subs.iter_mut() {
            // The JSON envelope names the channel without the prefix.
            assert_eq!(next_of(s, &g.channel), Ok("prefixed".into()), "{}", s.what);
        }

        // The other way: a client's publish is an SPUBLISH of app1:c on the owner.
        let owner = cluster.master_of(&g.redis);
        let mut watcher = RedisConn::open(owner, None);
        watcher
            .send(&[b"SSUBSCRIBE", g.redis.as_bytes()])
            .expect("SSUBSCRIBE");
        let confirm = watcher.read().expect("ssubscribe confirmation");
        assert_eq!(confirm.items()[0].text(), "ssubscribe", "{confirm:?}");
        g.subs[0].ws.send_text("from a client");
        assert_eq!(
            watcher.read().expect("the client's message on Redis"),
            Reply::Array(vec![
                Reply::Bulk(Some(b"smessage".to_vec())),
                Reply::Bulk(Some(g.redis.as_bytes().to_vec())),
                Reply::Bulk(Some(b"from a client".to_vec())),
            ])
        );
        let channel = g.channel.clone();
        for s in g.subs.iter_mut() {
            assert_eq!(
                next_of(s, &channel),
                Ok("from a client".into()),
                "{}",
                s.what
            );
        }
    }
    everyone_publishes(&cluster, &mut groups, 5, "p");
}

// ---------------------------------------------------------------------------------------------
// b. One SSUBSCRIBE per node per channel, one connection per master per node.

#[test]
fn one_subscription_per_node_and_one_link_per_master_with_four_reactors() {
    const PER_NODE: usize = 16;
    let cluster = RedisCluster::start(3, 1);
    // Nodes one after the other, so each one's connections are counted by themselves.
    let a = cluster.node(4, &[]);
    assert_one_link_per_master_per_node(&cluster, 1, "node A alone");
    let b = cluster.node(4, &[]);
    assert_one_link_per_master_per_node(&cluster, 2, "nodes A and B");
    for n in [&a, &b] {
        assert_eq!(n.metrics().get("fanout_reactors"), 4.0);
        assert_linked(n, 3.0, "with four reactors");
    }
    // One channel per shard, PER_NODE raw clients on each node (SO_REUSEPORT spreads them
    // over the reactors).
    let channels = cluster.channels_on_every_shard("", 3);
    let mut groups = groups(&[&a, &b], "", &channels, PER_NODE, 0);
    for g in &groups {
        assert_eq!(
            cluster.wait_shardnumsub(&g.redis, 2),
            2,
            "{}: one SSUBSCRIBE per node on its owner",
            g.redis
        );
    }
    barrier_all(&cluster, &mut groups);
    for g in &groups {
        assert_eq!(cluster.shardnumsub(&g.redis), 2, "{}", g.redis);
        // Nobody subscribes on a master that does not own it, nor on a replica.
        for port in cluster.running() {
            if port != cluster.master_of(&g.redis) {
                assert_eq!(
                    cluster.shardnumsub_on(port, &g.redis),
                    0,
                    "{} on {port}",
                    g.redis
                );
            }
        }
    }
    assert_one_link_per_master_per_node(&cluster, 2, "with clients");
    for n in [&a, &b] {
        assert_eq!(n.metrics().get("fanout_redis_subscriptions"), 3.0);
    }
    everyone_publishes(&cluster, &mut groups, 3, "r");
    external_spublish_reaches_everyone(&cluster, &mut groups, 2);

    // Node A's clients leave: its subscriptions end; B's remain.
    for g in groups.iter_mut() {
        g.subs.drain(..PER_NODE);
    }
    for g in groups.iter_mut() {
        assert_eq!(cluster.wait_shardnumsub(&g.redis, 1), 1, "{}", g.redis);
    }
    assert_eq!(
        a.wait_metric("fanout_redis_subscriptions", 0.0, PATIENCE),
        0.0
    );
    barrier_all(&cluster, &mut groups);
    assert_one_link_per_master_per_node(&cluster, 2, "links stay without subscriptions");
    drop(groups);
    for c in &channels {
        assert_eq!(cluster.wait_shardnumsub(c, 0), 0, "{c}");
    }
}

// ---------------------------------------------------------------------------------------------
// c. `ok` to a JSON subscribe means the owning master has the SSUBSCRIBE.

/// Subscribes `sub` (on node A) to each of `channels` and, the moment the `ok` arrives,
/// publishes one message to it: on even channels through `publisher` (node B's own link to the
/// owner), on odd ones with an SPUBLISH from outside straight to the owner, which must count
/// node A's subscription. Every message must reach `sub`, once.
fn ok_then_publish(
    cluster: &RedisCluster,
    sub: &mut Ws,
    publisher: &mut Ws,
    channels: &[String],
    phase: &str,
) {
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    let note = |v: &Value, got: &mut BTreeMap<String, usize>| {
        assert_eq!(v["op"], "message", "{phase}: unexpected {v}");
        *got.entry(v["data"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    };
    for (i, channel) in channels.iter().enumerate() {
        sub.send_text(&json!({"op":"subscribe","channel":channel,"id":i}).to_string());
        loop {
            // Messages of earlier channels may still come in before this ok.
            let v = sub.next_json(&format!("{phase}: subscribe {i}"));
            if v["op"] == "ok" {
                assert_eq!(v, json!({"op":"ok","id":i}), "{phase}");
                break;
            }
            note(&v, &mut got);
        }
        let data = format!("m-{i}");
        if i % 2 == 0 {
            let cmd = json!({"op":"publish","channel":channel,"data":data,"id":i});
            publisher.send_text(&cmd.to_string());
            assert_eq!(
                publisher.next_json(&format!("{phase}: publish {i}")),
                json!({"op":"ok","id":i}),
                "{phase}: the owner acknowledged"
            );
        } else {
            assert_eq!(
                cluster.spublish(channel, data.as_bytes()),
                1,
                "{phase}: {channel}: the owner did not have the SSUBSCRIBE when `ok` was sent"
            );
        }
    }
    let deadline = Instant::now() + PATIENCE;
    while got.values().sum::<usize>() < channels.len() && Instant::now() < deadline {
        match sub.recv(Duration::from_millis(200)) {
            Ok(f) => note(&serde_json::from_slice(&f.payload).unwrap(), &mut got),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) => panic!("{phase}: subscriber lost: {e}"),
        }
    }
    let missing: Vec<usize> = (0..channels.len())
        .filter(|i| !got.contains_key(&format!("m-{i}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{phase}: {} of {} messages published after the subscribe's ok never arrived: {missing:?}",
        missing.len(),
        channels.len()
    );
    assert!(got.values().all(|&c| c == 1), "{phase}: duplicates {got:?}");
    for c in channels {
        assert_eq!(cluster.shardnumsub(c), 1, "{phase}: {c}: node A only");
    }
}

#[test]
fn ok_to_a_json_subscribe_means_the_owning_shard_has_it() {
    let cluster = RedisCluster::start(3, 1);
    let a = cluster.node(2, &[]);
    let b = cluster.node(2, &[]);
    let mut publisher = b.ws_json("/ws");
    let mut sub = a.ws_json("/ws");
    ok_then_publish(
        &cluster,
        &mut sub,
        &mut publisher,
        &cluster.channels_on_every_shard("", 60),
        "idle",
    );
    // With node A's links writing a backlog of 32 KiB publishes (to channels nobody wants, on
    // every shard), an SSUBSCRIBE waits behind them: an `ok` given before the owner confirmed
    // would let the message overtake it. Fewer rounds: each waits behind megabytes.
    let flood = Flood::start(&a, &cluster.channels_on_every_shard("", 3), 32 * 1024);
    let mut sub = a.ws_json("/ws");
    ok_then_publish(
        &cluster,
        &mut sub,
        &mut publisher,
        &cluster.channels_on_every_shard("", 24),
        "busy",
    );
    drop(flood);
    assert_eq!(a.metrics().get("fanout_redis_subscriptions"), 84.0);
    assert_one_link_per_master_per_node(&cluster, 2, "after many subscribes");
}

// ---------------------------------------------------------------------------------------------
// d. Slot migration.

#[test]
fn a_migrated_slot_moves_live_channels_to_the_new_owner() {
    let cluster = RedisCluster::start(3, 1);
    let (a, b) = (cluster.node(2, &[]), cluster.node(2, &[]));
    let nodes = [&a, &b];
    // Channel 0 moves with live subscribers; channel 1 (another shard) must not notice;
    // channel 2 (no subscribers) moves too, to see a publish follow MOVED.
    let channels = cluster.channels_on_every_shard("", 3);
    let mut groups = groups(&nodes, "", &channels[..2], 1, 1);
    barrier_all(&cluster, &mut groups);
    let learned = |n: &Server| {
        let m = n.metrics();
        m.get("fanout_redis_cluster_moved_total") + m.get("fanout_redis_cluster_refreshes_total")
    };

    // A publish to a slot that moved behind the node's back follows the MOVED.
    let quiet = &channels[2];
    let (quiet_from, slot) = (cluster.master_of(quiet), cluster.keyslot(quiet));
    let quiet_to = cluster
        .masters()
        .into_iter()
        .find(|&m| m != quiet_from)
        .unwrap();
    let before: Vec<f64> = nodes.iter().map(|n| learned(n)).collect();
    cluster.migrate_slot(slot, quiet_to);
    let mut publishers: Vec<Ws> = nodes.iter().map(|n| n.ws_json("/ws")).collect();
    for (i, (n, j)) in nodes.iter().zip(&mut publishers).enumerate() {
        let cmd = json!({"op":"publish","channel":quiet,"data":"after the move","id":i});
        j.send_text(&cmd.to_string());
        assert_eq!(
            j.next_json("publish to a moved slot"),
            json!({"op":"ok","id":i}),
            "node {i}: a publish to a moved slot must follow MOVED; log:\n{}",
            n.log()
        );
        let deadline = Instant::now() + PATIENCE;
        while learned(n) <= before[i] {
            assert!(
                Instant::now() < deadline,
                "node {i}: neither fanout_redis_cluster_moved_total nor _refreshes_total grew"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let open: Vec<f64> = nodes.iter().map(|n| open_connections(n)).collect();

    // The live channel's slot moves.
    let live = groups[0].redis.clone();
    let (from, slot) = (cluster.master_of(&live), cluster.keyslot(&live));
    let to = cluster
        .masters()
        .into_iter()
        .find(|&m| m != from && m != cluster.master_of(&groups[1].redis))
        .unwrap();
    let moved = Instant::now();
    cluster.migrate_slot(slot, to);
    let took = cluster.barrier(&live, &mut groups[0].clients());
    eprintln!(
        "deliveries on {live} resumed from the new owner {:?} after the slot moved (barrier {took:?})",
        moved.elapsed()
    );
    assert_eq!(cluster.master_of(&live), to);
    assert_eq!(
        cluster.wait_shardnumsub(&live, 2),
        2,
        "{live}: one SSUBSCRIBE per node on the new owner"
    );
    assert_eq!(
        cluster.shardnumsub_on(from, &live),
        0,
        "{live} on the old owner"
    );
    // The other shard's channel delivered all along and still does; nobody was closed.
    everyone_publishes(&cluster, &mut groups, 10, "after");
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            open_connections(n),
            open[i],
            "node {i}: no client was closed"
        );
        wait_ready(n, 200, "after the migration");
        assert_linked(n, 3.0, "after the migration");
        let m = n.metrics();
        eprintln!(
            "node {i}: moved_total {} refreshes_total {}",
            m.get("fanout_redis_cluster_moved_total"),
            m.get("fanout_redis_cluster_refreshes_total")
        );
    }
    assert_one_link_per_master_per_node(&cluster, 2, "after the migration");
}

// ---------------------------------------------------------------------------------------------
// e. A master fails over to its replica.

#[test]
fn a_killed_master_fails_over_and_deliveries_resume() {
    let mut cluster = RedisCluster::start(3, 1);
    let (a, b) = (cluster.node(2, &[]), cluster.node(2, &[]));
    let nodes = [&a, &b];
    let channels = cluster.channels_on_every_shard("", 3);
    let mut groups = groups(&nodes, "", &channels, 1, 1);
    barrier_all(&cluster, &mut groups);
    let open: Vec<f64> = nodes.iter().map(|n| open_connections(n)).collect();

    let victim = cluster.master_of(&groups[0].redis);
    let killed = Instant::now();
    cluster.kill_master(victim);
    for (i, n) in nodes.iter().enumerate() {
        // One shard down is a partial outage: the link count says so, and the node stays ready
        // (a 503 would take every node out of the load balancer for the whole failover).
        assert_eq!(
            n.wait_metric("fanout_redis_links_up", 2.0, PATIENCE),
            2.0,
            "node {i} noticed master {victim} is gone"
        );
        assert_eq!(
            n.get("/readyz").0,
            200,
            "node {i} stays ready with two of three shards"
        );
    }
    let new = cluster.wait_failover(victim);
    eprintln!(
        "replica {new} replaced master {victim} {:?} after the kill",
        killed.elapsed()
    );
    for (i, n) in nodes.iter().enumerate() {
        let back = wait_ready(n, 200, &format!("node {i} after the failover"));
        eprintln!("node {i} ready again {back:?} after the failover");
    }
    let took = barrier_all(&cluster, &mut groups);
    eprintln!(
        "deliveries resumed on every channel {:?} after the kill (last barrier {took:?})",
        killed.elapsed()
    );
    assert_eq!(cluster.master_of(&groups[0].redis), new);
    for g in &groups {
        assert_eq!(cluster.wait_shardnumsub(&g.redis, 2), 2, "{}", g.redis);
    }
    everyone_publishes(&cluster, &mut groups, 10, "after");
    external_spublish_reaches_everyone(&cluster, &mut groups, 2);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(open_connections(n), open[i], "node {i}: clients kept");
        assert_linked(n, 3.0, "after the failover");
    }
    assert_one_link_per_master_per_node(&cluster, 2, "after the failover");
}

// ---------------------------------------------------------------------------------------------
// f. The whole cluster down and back.

#[test]
fn whole_cluster_down_and_back_keeps_clients_and_resumes() {
    let mut cluster = RedisCluster::start(3, 1);
    let (a, b) = (cluster.node(2, &[]), cluster.node(2, &[]));
    let nodes = [&a, &b];
    let channels = cluster.channels_on_every_shard("", 3);
    let mut groups = groups(&nodes, "", &channels, 1, 1);
    barrier_all(&cluster, &mut groups);
    let open: Vec<f64> = nodes.iter().map(|n| open_connections(n)).collect();

    cluster.stop_all();
    let stopped = Instant::now();
    for (i, n) in nodes.iter().enumerate() {
        wait_ready(n, 503, &format!("node {i} with the cluster down"));
        let (_, body) = n.get("/readyz");
        assert!(body.contains("redis"), "503 reason names redis: {body:?}");
        assert_eq!(
            n.wait_metric("fanout_redis_links_up", 0.0, PATIENCE),
            0.0,
            "node {i}: every shard link noticed"
        );
        assert_eq!(
            open_connections(n),
            open[i],
            "node {i}: clients stay while Redis is down"
        );
    }
    // Nothing comes, and nobody is closed, while Redis is away.
    for g in groups.iter_mut() {
        for s in g.subs.iter_mut() {
            match s.ws.recv(Duration::from_millis(100)) {
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                other => panic!("{} while the cluster is down: {other:?}", s.what),
            }
        }
    }

    cluster.restart_all();
    for (i, n) in nodes.iter().enumerate() {
        let back = wait_ready(n, 200, &format!("node {i} after the restart"));
        eprintln!(
            "node {i} ready {back:?} after the cluster was settled again ({:?} after the stop)",
            stopped.elapsed()
        );
    }
    let took = barrier_all(&cluster, &mut groups);
    eprintln!(
        "deliveries resumed {:?} after the stop (last barrier {took:?})",
        stopped.elapsed()
    );
    for g in &groups {
        assert_eq!(cluster.wait_shardnumsub(&g.redis, 2), 2, "{}", g.redis);
    }
    everyone_publishes(&cluster, &mut groups, 10, "back");
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(open_connections(n), open[i], "node {i}: clients kept");
        assert_linked(n, 3.0, "after the restart");
    }
    assert_one_link_per_master_per_node(&cluster, 2, "after the restart");
}

// ---------------------------------------------------------------------------------------------
// g. A shard added.

#[test]
fn an_added_shard_takes_slots_and_live_channels_keep_delivering() {
    let mut cluster = RedisCluster::start(3, 1);
    let (a, b) = (cluster.node(2, &[]), cluster.node(2, &[]));
    let nodes = [&a, &b];
    let channels = cluster.channels_on_every_shard("", 3);
    let mut groups = groups(&nodes, "", &channels, 1, 1);
    barrier_all(&cluster, &mut groups);
    let open: Vec<f64> = nodes.iter().map(|n| open_connections(n)).collect();
    for n in nodes {
        assert_linked(n, 3.0, "before the new shard");
    }

    // The slots of channels 0 and 1 (two different shards) move to the new master.
    let slots = [
        cluster.keyslot(&groups[0].redis),
        cluster.keyslot(&groups[1].redis),
    ];
    let added = Instant::now();
    let new = cluster.add_shard(&slots);
    let took = barrier_all(&cluster, &mut groups);
    eprintln!(
        "deliveries resumed {:?} after the new shard was started (last barrier {took:?})",
        added.elapsed()
    );
    for g in &groups[..2] {
        assert_eq!(cluster.master_of(&g.redis), new);
    }
    for g in &groups {
        assert_eq!(cluster.wait_shardnumsub(&g.redis, 2), 2, "{}", g.redis);
    }
    for (i, n) in nodes.iter().enumerate() {
        assert_linked(n, 4.0, &format!("node {i} with the new shard"));
        wait_ready(n, 200, "with the new shard");
        assert_eq!(open_connections(n), open[i], "node {i}: clients kept");
    }
    assert_one_link_per_master_per_node(&cluster, 2, "with the new shard");

    // A channel that was never subscribed before, on the new shard.
    let fresh = cluster
        .channels_on_every_shard("", cluster.masters().len())
        .into_iter()
        .find(|c| cluster.master_of(c) == new)
        .unwrap();
    groups.push(Group::join(&nodes, "", &fresh, 1, 1));
    barrier_all(&cluster, &mut groups);
    everyone_publishes(&cluster, &mut groups, 10, "grown");
    external_spublish_reaches_everyone(&cluster, &mut groups, 2);
}

#[test]
fn a_tls_cluster_is_reached_over_tls_on_every_shard() {
    let certs = Certs::new();
    let cert = certs.server("cluster", "IP:127.0.0.1,DNS:localhost");
    let tls = ClusterTls {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        ca: certs.ca.clone(),
    };
    let cluster = RedisCluster::start_tls(3, 0, tls);
    let seeds = cluster.tls_seeds();
    let ca = certs.ca.to_string_lossy().into_owned();
    let start = || {
        let args = [
            "--threads",
            "2",
            "--redis-cluster",
            &seeds,
            "--redis-ca-file",
            &ca,
        ];
        let node = Server::start(&args);
        assert!(
            wait_status(node.addr, "/readyz", 200, PATIENCE).is_some(),
            "TLS cluster node not ready; log:\n{}",
            node.log()
        );
        node
    };
    let (a, b) = (start(), start());
    for n in [&a, &b] {
        assert_linked(n, 3.0, "over TLS");
        assert!(n.log().contains("rediss://"), "{}", n.log());
    }
    // One link per node on every master, each on its TLS port.
    for m in cluster.masters() {
        let tls_port = cluster.tls_port_of(m).expect("a TLS port");
        let links = cluster.fanout_links(m);
        let laddr = format!(" laddr=127.0.0.1:{tls_port} ");
        assert_eq!(links.len(), 2, "master {m}: {links:?}");
        assert!(
            links.iter().all(|l| l.contains(&laddr)),
            "master {m}: a link not on TLS port {tls_port}: {links:?}"
        );
    }
    let channels = cluster.channels_on_every_shard("", 3);
    let mut groups = groups(&[&a, &b], "", &channels, 1, 1);
    barrier_all(&cluster, &mut groups);
    everyone_publishes(&cluster, &mut groups, 5, "tls");
    external_spublish_reaches_everyone(&cluster, &mut groups, 2);
}

#[test]
fn a_node_started_before_the_cluster_is_formed_becomes_ready_when_it_is() {
    // As in the Kubernetes overlay: fanout pods may start before the Job forms the cluster.
    let mut cluster = RedisCluster::start_unformed(3);
    let list: Vec<String> = cluster
        .running()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let seeds = format!("redis://{}", list.join(","));
    let node = Server::start(&["--threads", "2", "--redis-cluster", &seeds]);
    assert!(
        node.wait_log("no master serves any slot yet", PATIENCE),
        "{}",
        node.log()
    );
    let received = |c: &RedisCluster| -> i64 {
        c.running()
            .iter()
            .map(|&p| {
                let info = c.call(p, &[b"INFO", b"stats"]).text();
                info.lines()
                    .find_map(|l| l.strip_prefix("total_connections_received:"))
                    .and_then(|n| n.trim().parse::<i64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    // While nothing is served the node keeps its seed link and asks again; it does not drop and
    // redial the seeds. (Each sample is also one connection of the test's own per server.)
    let before = received(&cluster);
    for _ in 0..50 {
        assert_eq!(node.get("/readyz").0, 503, "ready with no slot served");
        std::thread::sleep(Duration::from_millis(20));
    }
    let redials = received(&cluster) - before - cluster.running().len() as i64;
    assert!(
        redials <= 1,
        "the node redialled the seeds {redials} times while the cluster was unformed"
    );
    cluster.form(3, 0);
    wait_ready(&node, 200, "after the cluster was formed");
    assert_linked(&node, 3.0, "after the cluster was formed");
    assert_eq!(
        node.log().matches("no master serves any slot yet").count(),
        1,
        "logged once"
    );
    let channels = cluster.channels_on_every_shard("", 3);
    let mut groups = groups(&[&node], "", &channels, 1, 1);
    barrier_all(&cluster, &mut groups);
    everyone_publishes(&cluster, &mut groups, 3, "formed");
}
