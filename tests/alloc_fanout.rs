//! Proves broadcast fanout makes no per-recipient allocation: a counting allocator measures the
//! reactor turns that deliver one message to 1 and to 1000 subscribers over real sockets, for a
//! message published by a local client and one arriving from a real redis-server.
//!
//! The reactor is stepped on the test thread, and the allocator counts per thread, so client-side
//! work done between turns and other tests running in parallel are not counted.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

mod alloc_support;
mod ops_support;

use fanout::config::{Args, Config};
use fanout::server::{build, Node};
use ops_support::{client_frame, upgrade_request, Redis, PATIENCE, TEXT};

#[global_allocator]
static GLOBAL: alloc_support::Counting = alloc_support::Counting;

use alloc_support::{allocations, drain_clients};

fn node(extra: &[&str]) -> Node {
    let mut args = vec!["fanout", "--listen", "127.0.0.1:0", "--threads", "1"];
    args.extend_from_slice(extra);
    let config = Config::from_args(<Args as clap::Parser>::parse_from(args)).unwrap();
    build(config).unwrap()
}

/// Steps the reactor until `done`, returning the allocations made inside its turns.
fn pump(node: &mut Node, what: &str, mut done: impl FnMut(&Node) -> bool) -> u64 {
    let mut events = mio::Events::with_capacity(1024);
    let deadline = Instant::now() + PATIENCE;
    let mut counted = 0;
    while !done(node) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        let before = allocations();
        node.reactors[0]
            .turn(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
        counted += allocations() - before;
    }
    counted
}

fn deliveries(node: &Node) -> u64 {
    node.shared.reactors[0].metrics.deliveries.get()
}

/// Connects and writes the upgrade request (with `extra` header lines); the reactor (stepped by
/// the test) answers it.
fn connect(addr: SocketAddr, channel: &str, extra: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&upgrade_request(
        &format!("/ws?channel={channel}"),
        &[],
        extra,
    ))
    .unwrap();
    s
}

/// Opens `n` subscribers plus one publisher on channel `c`; waits until all are upgraded.
fn subscribers(node: &mut Node, n: usize) -> (Vec<TcpStream>, TcpStream) {
    subscribers_with(node, n, "")
}

/// [`subscribers`] whose subscribers send `extra` header lines in their upgrade.
fn subscribers_with(node: &mut Node, n: usize, extra: &str) -> (Vec<TcpStream>, TcpStream) {
    let addr = node.local_addr;
    let subs: Vec<TcpStream> = (0..n).map(|_| connect(addr, "c", extra)).collect();
    let publisher = connect(addr, "c", "");
    pump(node, "upgrades", |node| {
        node.shared.reactors[0].metrics.accepted.get() == n as u64 + 1
    });
    (subs, publisher)
}

/// Fewest allocations inside the reactor turns that deliver one message to `n` subscribers
/// plus its publisher, over several publishes after a warm-up one (so a periodic timer firing
/// inside one measured turn cannot skew the result). `publish` sends one message, outside the
/// counted turns.
fn steady_allocations(
    node: &mut Node,
    subs: &mut [TcpStream],
    publisher: &mut TcpStream,
    n: usize,
    what: &str,
    publish: &mut impl FnMut(&mut TcpStream),
) -> u64 {
    let mut fewest = u64::MAX;
    for round in 0..6 {
        let before = deliveries(node);
        publish(publisher);
        let counted = pump(node, what, |node| deliveries(node) == before + n as u64 + 1);
        if round > 0 {
            fewest = fewest.min(counted);
        }
        drain_clients(subs);
        drain_clients(std::slice::from_mut(publisher));
    }
    fewest
}

fn steady_allocations_local(n: usize) -> u64 {
    let mut node = node(&[]);
    let (mut subs, mut publisher) = subscribers(&mut node, n);
    steady_allocations(
        &mut node,
        &mut subs,
        &mut publisher,
        n,
        "delivery",
        &mut |publisher| publisher.write_all(&client_frame(TEXT, b"hello")).unwrap(),
    )
}

#[test]
fn local_fanout_allocations_do_not_grow_with_subscribers() {
    let one = steady_allocations_local(1);
    let thousand = steady_allocations_local(1000);
    println!("allocations per message: 1 subscriber {one}, 1000 subscribers {thousand}");
    assert_eq!(
        one, thousand,
        "allocations per message grow with subscribers"
    );
    assert!(
        one <= 8,
        "{one} allocations to deliver one message is more than expected"
    );
}

/// With permessage-deflate negotiated by every subscriber, a broadcast is compressed once for
/// all of them: the allocations per message stay what they are for one subscriber.
fn steady_allocations_compressed(n: usize) -> u64 {
    let mut node = node(&["--compression", "on"]);
    let (mut subs, mut publisher) = subscribers_with(
        &mut node,
        n,
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    );
    let message = "a chat line that compresses well, ".repeat(20);
    steady_allocations(
        &mut node,
        &mut subs,
        &mut publisher,
        n,
        "compressed delivery",
        &mut |publisher| {
            publisher
                .write_all(&client_frame(TEXT, message.as_bytes()))
                .unwrap()
        },
    )
}

#[test]
fn compressed_fanout_allocations_do_not_grow_with_subscribers() {
    let one = steady_allocations_compressed(1);
    let thousand = steady_allocations_compressed(1000);
    println!("allocations per compressed message: 1 subscriber {one}, 1000 subscribers {thousand}");
    assert_eq!(
        one, thousand,
        "allocations per compressed message grow with subscribers"
    );
}

fn steady_allocations_from_redis(redis: &Redis, n: usize) -> u64 {
    let mut node = node(&["--redis", &redis.url()]);
    pump(&mut node, "redis link", |node| {
        node.shared.readiness().is_ok()
    });
    let (mut subs, mut publisher) = subscribers(&mut node, n);
    // Wait until Redis has registered this reactor's SUBSCRIBE.
    let deadline = Instant::now() + PATIENCE;
    while redis.numsub("c") != 1 {
        assert!(Instant::now() < deadline, "SUBSCRIBE never reached Redis");
        let mut events = mio::Events::with_capacity(64);
        node.reactors[0]
            .turn(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
    }
    steady_allocations(
        &mut node,
        &mut subs,
        &mut publisher,
        n,
        "delivery from redis",
        &mut |_| {
            redis.publish("c", b"hello from redis");
        },
    )
}

#[test]
fn redis_fanout_allocations_do_not_grow_with_subscribers() {
    // Panics when redis-server is missing: the test command installs it (see README).
    let redis = Redis::start();
    let one = steady_allocations_from_redis(&redis, 1);
    let thousand = steady_allocations_from_redis(&redis, 1000);
    println!("allocations per message from Redis: 1 subscriber {one}, 1000 subscribers {thousand}");
    assert_eq!(
        one, thousand,
        "allocations per message grow with subscribers"
    );
    assert!(
        one <= 12,
        "{one} allocations to deliver one Redis message is more than expected"
    );
}
