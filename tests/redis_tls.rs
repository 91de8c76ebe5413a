//! TLS to Redis (`rediss://`) with real processes on loopback: a `redis-server` serving TLS on
//! certificates the `openssl` CLI makes for the test (ops_support's [`TlsRedis`], [`Certs`]), and
//! real `fanout` nodes started with `--redis rediss://127.0.0.1:PORT`, everything stopped by PID.
//!
//! - Two nodes trusting the test CA (`--redis-ca-file`) are ready, hold their links on Redis's
//!   TLS port (CLIENT LIST), and deliver across nodes in raw and JSON mode, bulk traffic
//!   included (megabytes through rustls's capped buffers, both directions).
//! - A certificate that does not verify (a CA the node does not trust, a certificate for another
//!   name, or no TLS at all on the port) fails every attempt with a warn line naming the reason;
//!   the node keeps retrying, stays unready (/readyz 503) and keeps serving its clients.
//! - A `--redis-ca-file` without a certificate stops the node at start, naming the option.
//! - After a Redis restart the TLS link comes back and re-subscribes.
//!
//! As in the other Redis tests, deliveries are counted only after a [`barrier`] shows Redis
//! routes the channel to every client, and no wait bounds how fast anything happens: waits give
//! up after ops_support's PATIENCE.

mod ops_support;

use ops_support::*;
use serde_json::json;

/// A server certificate for what the nodes dial: 127.0.0.1 (and localhost).
const LOOPBACK_SAN: &str = "IP:127.0.0.1,DNS:localhost";

/// Starts a node on `url` trusting the test CA and waits until /readyz says 200.
fn tls_node(url: &str, certs: &Certs, threads: usize) -> Server {
    let threads = threads.to_string();
    let ca = certs.ca.to_str().unwrap();
    let args = ["--threads", &threads, "--redis", url, "--redis-ca-file", ca];
    let server = Server::start(&args);
    assert!(
        wait_status(server.addr, "/readyz", 200, PATIENCE).is_some(),
        "node {args:?} not ready; log:\n{}",
        server.log()
    );
    server
}

/// [`probe_barrier`] with probes PUBLISHed on the plain port.
fn barrier(redis: &Redis, channel: &str, clients: &mut [&mut Ws]) {
    probe_barrier(channel, clients, |p| {
        redis.publish(channel, p);
    });
}

/// Raw clients on two nodes: what each sends reaches both, in order.
fn raw_both_ways(a: &mut Ws, b: &mut Ws, tag: &str) {
    for (from, text) in [
        ("a", format!("{tag} from a")),
        ("b", format!("{tag} from b")),
    ] {
        let sender = if from == "a" { &mut *a } else { &mut *b };
        sender.send_text(&text);
        assert_eq!(a.next_text(&format!("{text} on a")), text);
        assert_eq!(b.next_text(&format!("{text} on b")), text);
    }
}

#[test]
fn two_nodes_share_channels_over_tls_in_raw_and_json_mode() {
    let certs = Certs::new();
    let cert = certs.server("redis", LOOPBACK_SAN);
    let redis = TlsRedis::start(&certs, &cert);
    let a = tls_node(&redis.url(), &certs, 2);
    let b = tls_node(&redis.url(), &certs, 2);
    for n in [&a, &b] {
        assert_eq!(n.get("/readyz").0, 200);
        let m = n.metrics();
        assert_eq!(m.get("fanout_redis_links_up"), 1.0);
    }
    let links = redis.fanout_tls_links();
    assert_eq!(
        links.len(),
        2,
        "one link per node, on the TLS port {}: {links:?}",
        redis.tls_port
    );
    assert_eq!(
        redis.redis.fanout_links().len(),
        2,
        "no link on the plain port: {:?}",
        redis.redis.fanout_links()
    );

    // Raw mode.
    let mut ra = a.ws("/ws?channel=room");
    let mut rb = b.ws("/ws?channel=room");
    barrier(&redis.redis, "room", &mut [&mut ra, &mut rb]);
    raw_both_ways(&mut ra, &mut rb, "hello");

    // JSON mode: `ok` to a subscribe means Redis confirmed it (over TLS), `ok` to a publish
    // means Redis acknowledged it.
    let mut ja = a.ws_json("/ws");
    let mut jb = b.ws_json("/ws");
    jb.send_text(r#"{"op":"subscribe","channel":"news","id":1}"#);
    assert_eq!(
        jb.next_json("subscribe over TLS"),
        json!({"op":"ok","id":1})
    );
    ja.send_text(r#"{"op":"publish","channel":"news","data":{"n":1},"id":2}"#);
    assert_eq!(ja.next_json("publish over TLS"), json!({"op":"ok","id":2}));
    assert_eq!(
        jb.next_json("delivery over TLS"),
        json!({"op":"message","channel":"news","data":{"n":1}})
    );

    // Bulk: 3 MiB of publishes written through a's TLS link without waiting for replies (the
    // link's write buffer holds the backlog, rustls takes it 64 KiB at a time), read back
    // through b's.
    const BULK: usize = 96;
    let filler = "x".repeat(32 * 1024);
    let mut bulk = b.ws("/ws?channel=bulk");
    barrier(&redis.redis, "bulk", &mut [&mut bulk]);
    for i in 0..BULK {
        let data = format!("bulk-{i}-{filler}");
        ja.send_text(&json!({"op":"publish","channel":"bulk","data":data,"id":i}).to_string());
    }
    for i in 0..BULK {
        assert_eq!(
            ja.next_json("bulk publish ack"),
            json!({"op":"ok","id":i}),
            "acks come in order"
        );
    }
    for i in 0..BULK {
        let text = bulk.next_text("bulk delivery");
        assert!(
            text.starts_with(&format!("bulk-{i}-"))
                && text.len() == filler.len() + 6 + i.to_string().len(),
            "bulk message {i}: got {} bytes starting {:?}",
            text.len(),
            &text[..text.len().min(20)]
        );
    }
    barrier(&redis.redis, "bulk", &mut [&mut bulk]);
    for n in [&a, &b] {
        let m = n.metrics();
        assert_eq!(m.get("fanout_redis_links_up"), 1.0);
        assert_eq!(m.get("fanout_redis_reconnects_total"), 0.0);
    }
    assert_eq!(redis.fanout_tls_links().len(), 2);
}

/// The node's log has a warn line about `needle`, and a later debug line shows the same reason
/// on another attempt: the failure is retried.
fn fails_and_retries(node: &Server, needle: &str) {
    assert!(
        node.wait_log(needle, PATIENCE),
        "no log line with {needle:?}; log:\n{}",
        node.log()
    );
    let log = node.log();
    let warn = log.lines().find(|l| l.contains(needle)).unwrap();
    assert!(
        warn.contains("WARN") && warn.contains("redis: cannot use 127.0.0.1:"),
        "the first failure is a warn line of the link: {warn}"
    );
    let retried = format!("redis: connection attempt failed ({needle}");
    assert!(
        node.wait_log(&retried, PATIENCE),
        "no retry logged with {retried:?}; log:\n{}",
        node.log()
    );
}

/// A node whose Redis link cannot come up stays unready and keeps serving: /healthz, upgrades,
/// and a JSON publish answered with an error.
fn unready_but_serving(node: &Server, what: &str) {
    let (status, body) = node.get("/readyz");
    assert_eq!(status, 503, "{what}: /readyz {body}");
    assert!(body.contains("redis link is down"), "{what}: {body}");
    assert_eq!(node.get("/healthz").0, 200, "{what}");
    let mut j = node.ws_json("/ws?channel=room");
    j.send_text(r#"{"op":"publish","channel":"room","data":"x","id":1}"#);
    let reply = j.next_json(what);
    assert_eq!(reply["op"], "error", "{what}: {reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("redis unavailable"),
        "{what}: {reply}"
    );
    assert_eq!(node.metrics().get("fanout_redis_links_up"), 0.0, "{what}");
    assert_eq!(
        node.get("/readyz").0,
        503,
        "{what}: still unready after retries"
    );
}

#[test]
fn a_certificate_that_does_not_verify_keeps_the_node_unready() {
    let certs = Certs::new();
    let good = certs.server("redis", LOOPBACK_SAN);
    let redis = TlsRedis::start(&certs, &good);

    // No --redis-ca-file: the system roots do not know the test CA.
    let untrusting = Server::start(&[
        "--threads",
        "1",
        "--log-level",
        "debug",
        "--redis",
        &redis.url(),
    ]);
    fails_and_retries(
        &untrusting,
        &format!(
            "TLS handshake with 127.0.0.1:{} failed: invalid peer certificate: UnknownIssuer",
            redis.tls_port
        ),
    );
    unready_but_serving(&untrusting, "untrusted CA");

    // The CA is trusted, but the certificate names another server.
    let other = certs.server("other", "DNS:other.example");
    let misnamed = TlsRedis::start(&certs, &other);
    let ca = certs.ca.to_str().unwrap();
    let wrong_name = Server::start(&[
        "--threads",
        "1",
        "--log-level",
        "debug",
        "--redis",
        &misnamed.url(),
        "--redis-ca-file",
        ca,
    ]);
    fails_and_retries(
        &wrong_name,
        &format!(
            "TLS handshake with 127.0.0.1:{} failed: invalid peer certificate: certificate not valid for name \"127.0.0.1\"",
            misnamed.tls_port
        ),
    );
    unready_but_serving(&wrong_name, "certificate for another name");

    // rediss:// to a port that speaks no TLS at all.
    let plain_url = format!("rediss://127.0.0.1:{}", redis.redis.port);
    let no_tls = Server::start(&[
        "--threads",
        "1",
        "--log-level",
        "debug",
        "--redis",
        &plain_url,
        "--redis-ca-file",
        ca,
    ]);
    fails_and_retries(
        &no_tls,
        &format!("TLS handshake with 127.0.0.1:{} failed: ", redis.redis.port),
    );
    unready_but_serving(&no_tls, "no TLS on the port");

    // None of them ever got as far as naming itself to Redis.
    assert!(redis.redis.fanout_links().is_empty());
    assert!(misnamed.redis.fanout_links().is_empty());
}

#[test]
fn a_ca_file_without_certificates_stops_the_node_at_start() {
    let certs = Certs::new();
    let bad = certs.file("no-certs.pem", "this is not a certificate\n");
    let bad = bad.to_str().unwrap();
    let (code, stdout, stderr) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--redis",
            "rediss://127.0.0.1:1",
            "--redis-ca-file",
            bad,
        ],
        &[],
    );
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("--redis-ca-file")
            && stderr.contains(bad)
            && stderr.contains("no PEM certificate"),
        "the error names the option, the file and what is wrong: {stderr}"
    );
    assert!(!stdout.contains("listening on"), "started anyway: {stdout}");
}

#[test]
fn the_tls_link_comes_back_and_resubscribes_after_a_redis_restart() {
    let certs = Certs::new();
    let cert = certs.server("redis", LOOPBACK_SAN);
    let mut redis = TlsRedis::start(&certs, &cert);
    let a = tls_node(&redis.url(), &certs, 2);
    let b = tls_node(&redis.url(), &certs, 2);
    let mut ra = a.ws("/ws?channel=room");
    let mut rb = b.ws("/ws?channel=room");
    barrier(&redis.redis, "room", &mut [&mut ra, &mut rb]);
    raw_both_ways(&mut ra, &mut rb, "before");

    redis.redis.kill();
    for n in [&a, &b] {
        assert!(
            wait_status(n.addr, "/readyz", 503, PATIENCE).is_some(),
            "/readyz still 200 with Redis killed"
        );
    }
    redis.redis.restart();
    for n in [&a, &b] {
        assert!(
            wait_status(n.addr, "/readyz", 200, PATIENCE).is_some(),
            "not ready again after Redis came back; log:\n{}",
            n.log()
        );
    }
    assert_eq!(
        redis.redis.wait_numsub("room", 2, PATIENCE),
        2,
        "each node re-subscribed over its new TLS link"
    );
    barrier(&redis.redis, "room", &mut [&mut ra, &mut rb]);
    raw_both_ways(&mut ra, &mut rb, "after");
    assert_eq!(redis.fanout_tls_links().len(), 2);
    for n in [&a, &b] {
        let m = n.metrics();
        assert_eq!(m.get("fanout_redis_links_up"), 1.0);
        assert_eq!(m.get("fanout_redis_reconnects_total"), 1.0);
    }
}
