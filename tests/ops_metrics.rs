//! /metrics after known traffic: exact counts of connections, closes by reason, messages, bytes,
//! deliveries, publishes, channels and HTTP statuses, summed over two reactors; the exposition
//! parses strictly with HELP and TYPE lines; and with --redis, the link gauge, reconnects after a
//! Redis restart and publishes dropped while Redis is down. Counts, never durations: every wait
//! gives up only after ops_support's PATIENCE.

mod ops_support;

use ops_support::*;

/// Every family the README promises; each must have HELP and TYPE (checked by the parser).
const FAMILIES: [(&str, &str); 13] = [
    ("fanout_connections_open", "gauge"),
    ("fanout_connections_accepted_total", "counter"),
    ("fanout_connections_closed_total", "counter"),
    ("fanout_connections_refused_total", "counter"),
    ("fanout_handshake_timeouts_total", "counter"),
    ("fanout_messages_in_total", "counter"),
    ("fanout_bytes_in_total", "counter"),
    ("fanout_messages_out_total", "counter"),
    ("fanout_bytes_out_total", "counter"),
    ("fanout_deliveries_total", "counter"),
    ("fanout_publishes_total", "counter"),
    ("fanout_channels", "gauge"),
    ("fanout_http_responses_total", "counter"),
];

/// Exact counters and gauges after known traffic on two reactors, including one close of each
/// reason and an idle timeout at the end; the client that must reach the idle timeout only at
/// the end is kept active until then by unsolicited pongs, so the counts cannot depend on how
/// long the steps before take.
#[test]
fn metrics_count_known_traffic_exactly() {
    let server = Server::start(&[
        "--threads",
        "2",
        "--idle-timeout",
        "3",
        "--ping-interval",
        "30",
    ]);

    let m0 = server.metrics();
    for (name, kind) in FAMILIES {
        assert_eq!(
            m0.types.get(name).map(String::as_str),
            Some(kind),
            "TYPE of {name}"
        );
        assert!(m0.helps.contains_key(name), "HELP of {name}");
    }
    assert_eq!(m0.get("fanout_reactors"), 2.0);
    for (key, v) in &m0.samples {
        if key.ends_with("_total") || key.contains("_total{") {
            assert_eq!(*v, 0.0, "{key} on a fresh node");
        }
    }
    assert_eq!(m0.get("fanout_connections_open"), 0.0);
    assert!(
        !m0.samples.keys().any(|k| k.contains("redis")),
        "no redis metrics without --redis"
    );

    // HTTP: 200, 200, 404, 426 (plain GET /ws without Upgrade).
    assert_eq!(server.get("/healthz").0, 200);
    assert_eq!(server.get("/readyz").0, 200);
    assert_eq!(server.get("/no-such-page").0, 404);
    assert_eq!(server.get("/ws").0, 426);

    // Raw mode: A and B share channel m; A publishes 3 messages of 5, 6 and 7 bytes.
    let mut a = server.ws("/ws?channel=m");
    let mut b = server.ws("/ws?channel=m");
    for text in ["aaaaa", "bbbbbb", "ccccccc"] {
        a.send_text(text);
    }
    for ws in [&mut a, &mut b] {
        for text in ["aaaaa", "bbbbbb", "ccccccc"] {
            assert_eq!(ws.recv_text(PATIENCE), text);
        }
    }
    // JSON mode: C subscribes x1 and x2, publishes once to x1 and gets it back.
    let mut c = server.ws_json("/ws");
    // C must not reach the idle timeout before the end, however long the steps below take on a
    // busy machine: unsolicited pongs keep it active without adding to any counter.
    let keep_c = KeepAlive::start(&c, PONG);
    let cmds = [
        r#"{"op":"subscribe","channel":"x1","id":1}"#,
        r#"{"op":"subscribe","channel":"x2","id":2}"#,
        r#"{"op":"publish","channel":"x1","data":"hello","id":3}"#,
    ];
    for cmd in cmds {
        c.send_text(cmd);
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(c.recv_text(PATIENCE));
    }
    let oks = got.iter().filter(|t| t.contains(r#""op":"ok""#)).count();
    let msgs = got
        .iter()
        .filter(|t| t.contains(r#""op":"message""#))
        .count();
    assert_eq!((oks, msgs), (3, 1), "replies {got:?}");

    let json_bytes: usize = cmds.iter().map(|c| c.len()).sum();
    let m1 = server.metrics();
    assert_eq!(m1.get("fanout_connections_open"), 3.0);
    assert_eq!(m1.get("fanout_connections_accepted_total"), 3.0);
    assert_eq!(m1.get("fanout_messages_in_total"), 6.0);
    assert_eq!(m1.get("fanout_bytes_in_total"), (18 + json_bytes) as f64);
    assert_eq!(m1.get("fanout_publishes_total"), 4.0);
    assert_eq!(
        m1.get("fanout_deliveries_total"),
        7.0,
        "3 to A, 3 to B, 1 to C"
    );
    assert_eq!(
        m1.get("fanout_messages_out_total"),
        10.0,
        "7 deliveries + 3 replies"
    );
    assert!(m1.get("fanout_bytes_out_total") >= (2 * 18 + 7 * 2) as f64);
    // m may count once per reactor (A and B can sit on different reactors).
    let channels = m1.get("fanout_channels");
    assert!((3.0..=4.0).contains(&channels), "channels {channels}");
    assert_eq!(m1.http("101"), 3.0);
    assert_eq!(m1.http("200"), 3.0, "healthz, readyz and the first scrape");
    assert_eq!(m1.http("404"), 1.0);
    assert_eq!(m1.http("426"), 1.0);
    assert_eq!(m1.http("other"), 0.0);

    // Closes: A and B with a close frame, G by dropping its socket, D by breaking the protocol.
    for ws in [&mut a, &mut b] {
        ws.send_close(1000).unwrap();
        let (code, _) = ws.recv_close(PATIENCE).unwrap();
        assert_eq!(code, 1000);
    }
    let g = server.ws("/ws?channel=g");
    drop(g);
    let mut d = server.ws("/ws?channel=d");
    // An unmasked client frame is a protocol error (RFC 6455 5.1).
    use std::io::Write as _;
    d.stream.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(d.recv_close(PATIENCE).unwrap().0, 1002);
    drop(d);
    server.wait_metric("fanout_connections_open", 1.0, PATIENCE);

    let m2 = server.metrics();
    assert_eq!(m2.get("fanout_connections_accepted_total"), 5.0);
    assert_eq!(m2.get("fanout_connections_open"), 1.0);
    assert_eq!(m2.closed("client_close"), 3.0);
    assert_eq!(m2.closed("protocol_error"), 1.0);
    assert_eq!(m2.closed("idle_timeout"), 0.0);
    assert_eq!(m2.closed("slow_consumer"), 0.0);
    assert_eq!(m2.closed("shutdown"), 0.0);
    assert_eq!(
        m2.get("fanout_channels"),
        2.0,
        "only C's x1 and x2 are left"
    );
    assert_eq!(
        m2.get("fanout_messages_in_total"),
        6.0,
        "close frames and bad frames are not messages"
    );

    // C goes silent: the idle timeout closes it with 1001.
    drop(keep_c);
    let (code, reason) = c.recv_close(3 * SEC + PATIENCE).unwrap();
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    drop(c);
    server.wait_metric("fanout_connections_open", 0.0, PATIENCE);
    let m3 = server.metrics();
    assert_eq!(m3.closed("idle_timeout"), 1.0);
    assert_eq!(m3.get("fanout_channels"), 0.0);
    let closed: f64 = m3
        .samples
        .iter()
        .filter(|(k, _)| k.starts_with("fanout_connections_closed_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(closed, 5.0, "every accepted connection closed exactly once");
    // A scrape counts its own 200 only after rendering, so m3 sees every scrape but itself.
    let scrapes = server.scrapes.load(std::sync::atomic::Ordering::Relaxed) as f64;
    assert_eq!(
        m3.http("200"),
        2.0 + scrapes - 1.0,
        "healthz, readyz and earlier scrapes"
    );
}

/// With --redis: links_up follows Redis being killed and restarted, /readyz says 503 naming
/// redis meanwhile, raw publishes while it is down are dropped and counted (and not replayed),
/// each reactor reconnects exactly once, and the log has one line per link event, not per
/// message. Recovery is awaited, never timed.
#[test]
fn redis_metrics_track_link_state_reconnects_and_drops() {
    let mut redis = Redis::start();
    let server = Server::start(&["--threads", "2", "--redis", &redis.url()]);
    assert!(
        wait_status(server.addr, "/readyz", 200, PATIENCE).is_some(),
        "/readyz not 200 with Redis up"
    );
    let m = server.metrics();
    for (name, kind) in [
        ("fanout_redis_links_up", "gauge"),
        ("fanout_redis_reconnects_total", "counter"),
        ("fanout_publishes_dropped_total", "counter"),
    ] {
        assert_eq!(
            m.types.get(name).map(String::as_str),
            Some(kind),
            "TYPE of {name}"
        );
    }
    assert_eq!(m.get("fanout_redis_links_up"), 1.0, "one link per node");
    assert_eq!(m.get("fanout_redis_reconnects_total"), 0.0);
    assert_eq!(m.get("fanout_publishes_dropped_total"), 0.0);

    let mut raw = server.ws("/ws?channel=r");
    let mut json = server.ws_json("/ws");
    raw.send_text("while up");
    assert_eq!(raw.recv_text(PATIENCE), "while up");

    redis.kill();
    let (status, body) = {
        let took = wait_status(server.addr, "/readyz", 503, PATIENCE);
        assert!(took.is_some(), "/readyz stayed 200 with Redis down");
        server.get("/readyz")
    };
    assert_eq!(status, 503);
    assert!(body.contains("redis"), "reason should name redis: {body:?}");
    assert_eq!(
        server.wait_metric("fanout_redis_links_up", 0.0, PATIENCE),
        0.0
    );

    for i in 0..3 {
        raw.send_text(&format!("dropped {i}"));
    }
    json.send_text(r#"{"op":"publish","channel":"r","data":"x","id":9}"#);
    let reply = json.recv_text(PATIENCE);
    assert!(
        reply.contains(r#""op":"error""#)
            && reply.contains("redis unavailable")
            && reply.contains(r#""id":9"#),
        "JSON publish with Redis down: {reply}"
    );
    assert_eq!(
        server.wait_metric("fanout_publishes_dropped_total", 3.0, PATIENCE),
        3.0
    );

    redis.restart();
    // Back to ready without any client action. How soon is not asserted (it depends on the
    // machine): that each reactor reconnected exactly once is, below.
    wait_status(server.addr, "/readyz", 200, PATIENCE).expect("/readyz back to 200");
    let m = server.metrics();
    assert_eq!(m.get("fanout_redis_links_up"), 1.0);
    assert_eq!(
        m.get("fanout_redis_reconnects_total"),
        1.0,
        "one link per node"
    );
    assert_eq!(m.get("fanout_publishes_dropped_total"), 3.0);
    // The dropped messages were not delivered later, and traffic flows again.
    raw.send_text("after");
    assert_eq!(raw.recv_text(PATIENCE), "after");
    // One log line per link event, not per message.
    let log = server.log();
    assert!(
        log.contains("starting") && log.contains("redis://"),
        "effective configuration is logged:\n{log}"
    );
    assert!(
        log.contains("link down"),
        "Redis link down is logged:\n{log}"
    );
    assert_eq!(
        log.matches("link up").count(),
        2,
        "the node's link: first connect + reconnect:\n{log}"
    );
    let lines = log.lines().count();
    assert!(
        lines < 40,
        "{lines} log lines for a handful of events:\n{log}"
    );
}

/// The parser used above must itself reject malformed expositions, or the format checks are void.
#[test]
fn exposition_parser_rejects_bad_input() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total 3\n# HELP g G.\n# TYPE g gauge\ng{x=\"1\",y=\"a,}b\"} 2.5\n";
    let m = Metrics::parse(good).unwrap();
    assert_eq!(m.get("a_total"), 3.0);
    assert_eq!(m.get("g{x=\"1\",y=\"a,}b\"}"), 2.5);
    for bad in [
        "a 1\n",                                   // no TYPE/HELP
        "# TYPE a gauge\na 1\n",                   // no HELP
        "# HELP a A.\n# TYPE a gauge\na one\n",    // bad value
        "# HELP a A.\n# TYPE a counter\na 1\n",    // counter without _total
        "# HELP a A.\n# TYPE a gauge\na{x=1} 1\n", // unquoted label
        "# HELP a A.\n# TYPE a gauge\na 1\na 2\n", // duplicate
        "# HELP a A.\n# TYPE a bogus\na 1\n",      // bad type
        "# HELP a A.\n# TYPE a gauge\na 1",        // no final newline
    ] {
        assert!(Metrics::parse(bad).is_err(), "accepted {bad:?}");
    }
}
