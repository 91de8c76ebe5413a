//! Proves the cross-reactor delivery path of Redis mode makes no per-subscriber allocation: a
//! message from a real redis-server reaches the node's Redis reactor (reactor 0), which frames it
//! once and hands the same `Message` to reactor 1 through its mailbox; reactor 1 queues it to its
//! subscribers. Both reactors are stepped on the test thread and the allocations of each one's
//! turns are counted apart, for few and for many subscribers on reactor 1: the counts must match.

mod alloc_support;
mod ops_support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fanout::config::{Args, Config};
use fanout::server::{build, Node};
use ops_support::Redis;

#[global_allocator]
static GLOBAL: alloc_support::Counting = alloc_support::Counting;
use alloc_support::drain_clients;

fn node(redis: &Redis) -> Node {
    let url = redis.url();
    let args = [
        "fanout",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "2",
        "--redis",
        &url,
    ];
    let config = Config::from_args(<Args as clap::Parser>::parse_from(args)).unwrap();
    build(config).unwrap()
}

/// Allocations made inside the turns of reactor 0 and of reactor 1.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counted {
    hub: u64,
    peer: u64,
}

/// Steps both reactors until `done`; returns the allocations of each one's turns.
fn pump(node: &mut Node, what: &str, mut done: impl FnMut(&Node) -> bool) -> Counted {
    let mut events = mio::Events::with_capacity(1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut counted = Counted::default();
    while !done(node) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        for (i, reactor) in node.reactors.iter_mut().enumerate() {
            let before = alloc_support::allocations();
            reactor
                .turn(&mut events, Some(Duration::from_millis(2)))
                .unwrap();
            let n = alloc_support::allocations() - before;
            if i == 0 {
                counted.hub += n;
            } else {
                counted.peer += n;
            }
        }
    }
    counted
}

fn deliveries(node: &Node, reactor: usize) -> u64 {
    node.shared.reactors[reactor].metrics.deliveries.get()
}

fn accepted(node: &Node, reactor: usize) -> u64 {
    node.shared.reactors[reactor].metrics.accepted.get()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /ws?channel=c HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    s
}

/// Connects subscribers until reactor 1 holds at least `on_peer` and reactor 0 at least one
/// (SO_REUSEPORT picks the reactor), then measures the fewest allocations per message over several Redis publishes.
fn steady(redis: &Redis, on_peer: u64) -> (Counted, u64) {
    let mut node = node(redis);
    pump(&mut node, "redis link", |n| n.shared.readiness().is_ok());
    let addr = node.local_addr;
    let mut clients = Vec::new();
    // Reactor 0 gets subscribers too, so both counts include its own local delivery.
    while accepted(&node, 1) < on_peer || accepted(&node, 0) == 0 {
        assert!(
            clients.len() < 20 * on_peer as usize + 100,
            "reactor 1 gets no clients"
        );
        clients.push(connect(addr));
        let want = clients.len() as u64;
        pump(&mut node, "upgrade", |n| {
            accepted(n, 0) + accepted(n, 1) == want
        });
    }
    let (local, peer) = (accepted(&node, 0), accepted(&node, 1));
    // Let every interest change reach the Redis reactor and the SUBSCRIBE reach Redis.
    let settle = Instant::now() + Duration::from_millis(300);
    pump(&mut node, "settling", |_| Instant::now() >= settle);
    let mut fewest: Option<Counted> = None;
    for round in 0..6 {
        let before = (deliveries(&node, 0), deliveries(&node, 1));
        redis.command(&["PUBLISH", "c", "hello from redis"]);
        let counted = pump(&mut node, "delivery from redis", |n| {
            deliveries(n, 0) == before.0 + local && deliveries(n, 1) == before.1 + peer
        });
        if round > 0 {
            let f = fewest.get_or_insert(counted);
            f.hub = f.hub.min(counted.hub);
            f.peer = f.peer.min(counted.peer);
        }
        drain_clients(&mut clients);
    }
    (fewest.unwrap_or_default(), peer)
}

#[test]
fn cross_reactor_delivery_allocations_do_not_grow_with_subscribers() {
    // Panics when redis-server is missing: the test command installs it (see README).
    let redis = Redis::start();
    let (few, few_peer) = steady(&redis, 1);
    let (many, many_peer) = steady(&redis, 400);
    println!(
        "allocations per Redis message: {few_peer} subscribers on reactor 1: {few:?}; {many_peer}: {many:?}"
    );
    assert!(many_peer >= 400 && few_peer < many_peer);
    assert_eq!(
        few.peer, many.peer,
        "reactor 1's allocations per message grow with its subscribers"
    );
    assert_eq!(
        few.hub, many.hub,
        "the Redis reactor's allocations per message grow with subscribers"
    );
    assert!(
        few.peer <= 4 && few.hub <= 12,
        "{few:?} allocations to pass one Redis message on is more than expected"
    );
}
