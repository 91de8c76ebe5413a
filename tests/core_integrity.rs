//! Regression tests for the core-integrity defects a hostile client could trigger, each against a
//! real fanout process over real sockets:
//! - a request parsed in the same read as one that got its connection closed must not run (the
//!   "ghost subscription": a dead connection left in a channel, leaking that channel's messages
//!   to whoever reuses its slot, or panicking the reactor);
//! - every byte queued to a client that never reads counts against `--max-queue`: floods of
//!   pings, invalid JSON or unknown ops close it (1008) instead of growing the node's memory;
//! - `--max-message-rate` counts control frames too;
//! - a reactor that dies ends the process with a non-zero status naming it.

mod ops_support;

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Duration;

use ops_support::{client_frame, rss_kib, tiny_buffer_client, Server, CLOSE, PING, SEC, TEXT};

/// Writes `batch` again and again (never reading) until the server has closed the connection
/// (the write fails) or `max_bytes` went out. Returns the bytes written.
fn flood(stream: &mut TcpStream, batch: &[u8], max_bytes: usize) -> usize {
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut sent = 0;
    while sent < max_bytes {
        match stream.write_all(batch) {
            Ok(()) => sent += batch.len(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    sent
}

fn json_publish(channel: &str, data_len: usize) -> String {
    format!(
        r#"{{"op":"publish","channel":"{channel}","data":"{}"}}"#,
        "x".repeat(data_len)
    )
}

/// The ghost subscription: a JSON client that never reads publishes to its own channel and
/// subscribes to `ghost` in the same write, over and over. Its own deliveries overflow its queue
/// and it is closed as a slow consumer; the `subscribe` parsed after that must not run. Before
/// the fix the dead connection stayed in `ghost`, a later client on its slot got `ghost`'s
/// messages, and a publish to `ghost` with the slot empty panicked the reactor.
#[test]
fn requests_after_the_one_that_closed_a_connection_do_not_run() {
    let server = Server::start(&[
        "--threads",
        "1",
        "--max-queue",
        "1024",
        "--max-message",
        "1024",
    ]);
    let mut attacker = tiny_buffer_client(server.addr, "/ws", Some("fanout.json"));
    attacker.send_text(r#"{"op":"subscribe","channel":"x"}"#);
    let mut batch = client_frame(TEXT, json_publish("x", 900).as_bytes());
    batch.extend(client_frame(
        TEXT,
        br#"{"op":"subscribe","channel":"ghost"}"#,
    ));
    flood(&mut attacker.stream, &batch, 64 << 20);
    assert_eq!(
        server.wait_metric(
            "fanout_connections_closed_total{reason=\"slow_consumer\"}",
            1.0,
            10 * SEC
        ),
        1.0,
        "the attacker is closed as a slow consumer"
    );
    assert_eq!(
        server.wait_metric("fanout_channels", 0.0, 10 * SEC),
        0.0,
        "no channel keeps the closed connection as a subscriber"
    );
    drop(attacker);

    // A newcomer (likely on the freed slot) that joined only `other`, and a publisher to `ghost`.
    let mut newcomer = server.ws("/ws?channel=other");
    let mut publisher = server.ws_json("/ws");
    for i in 0..3 {
        publisher.send_text(&format!(
            r#"{{"op":"publish","channel":"ghost","data":"leak {i}","id":{i}}}"#
        ));
        let reply = publisher.recv_text(10 * SEC);
        assert_eq!(
            reply,
            format!(r#"{{"op":"ok","id":{i}}}"#),
            "the reactor answers"
        );
    }
    match newcomer.recv(SEC / 2) {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        other => panic!("a client that never joined `ghost` received {other:?}"),
    }
    assert_eq!(server.get("/readyz").0, 200);
}

/// A client that never reads floods requests whose answers are queued to it. Each flood must end
/// with the client closed as a slow consumer, and the node's memory must not grow with the flood
/// (before the fix, 4 MB of 7-byte invalid-JSON frames queued 572,000 error replies: +113 MB).
#[test]
fn replies_and_pongs_count_against_the_queue_limit() {
    let server = Server::start(&["--threads", "1", "--max-queue", "65536"]);
    let floods: [(&str, Vec<u8>, Option<&str>); 3] = [
        (
            "invalid JSON",
            client_frame(TEXT, b"{bad}"),
            Some("fanout.json"),
        ),
        (
            "unknown ops",
            client_frame(TEXT, br#"{"op":"nope"}"#),
            Some("fanout.json"),
        ),
        ("pings", client_frame(PING, &[b'p'; 100]), None),
    ];
    let before = rss_kib(server.pid());
    for (i, (what, frame, protocol)) in floods.iter().enumerate() {
        let batch: Vec<u8> = frame.repeat(1000);
        let mut client = tiny_buffer_client(server.addr, "/ws?channel=flood", *protocol);
        let sent = flood(&mut client.stream, &batch, 32 << 20);
        assert!(
            sent < 32 << 20,
            "{what}: the server kept reading {sent} bytes without closing the client"
        );
        assert_eq!(
            server.wait_metric(
                "fanout_connections_closed_total{reason=\"slow_consumer\"}",
                (i + 1) as f64,
                10 * SEC
            ),
            (i + 1) as f64,
            "{what}: closed as a slow consumer"
        );
    }
    let grown_kib = rss_kib(server.pid()).saturating_sub(before);
    // Three floods, each bounded by the 64 KiB queue plus the read buffers: a few MiB at most,
    // where the unbounded queues grew by over 100 MiB.
    assert!(
        grown_kib < 16 * 1024,
        "RSS grew by {grown_kib} KiB over three floods"
    );
    assert_eq!(server.get("/readyz").0, 200);
}

/// `--max-message-rate` counts every frame: a ping flood over the rate is closed 1008.
#[test]
fn the_rate_limit_counts_control_frames() {
    let server = Server::start(&["--threads", "1", "--max-message-rate", "20"]);
    let mut client = server.ws("/ws?channel=r");
    let burst: Vec<u8> = client_frame(PING, b"x").repeat(200);
    client.stream.write_all(&burst).unwrap();
    let (code, reason) = client.recv_close(10 * SEC).expect("a close frame");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("rate limit"), "{reason}");
    // A client within the rate is untouched.
    let mut calm = server.ws("/ws?channel=r");
    for _ in 0..5 {
        calm.send(PING, b"ok").unwrap();
        let pong = calm.recv_frame(10 * SEC).unwrap();
        assert_eq!(pong.payload, b"ok");
    }
    calm.send(CLOSE, &1000u16.to_be_bytes()).unwrap();
}

/// A reactor thread that panics takes the process down with a non-zero status and a log line
/// naming it, so an orchestrator restarts the node instead of it serving half-dead.
#[test]
fn a_dead_reactor_ends_the_process() {
    let mut server = Server::start(&["--threads", "1", "--fault-panic-reactor", "0"]);
    server.panic_expected = true;
    let _ = TcpStream::connect(server.addr)
        .and_then(|mut s| ops_support::handshake(&mut s, "/ws?channel=c", None).map(|_| ()));
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the node exits after its reactor died");
    assert_eq!(
        status.code(),
        Some(70),
        "exit status; log:\n{}",
        server.log()
    );
    let log = server.log();
    assert!(
        log.contains("reactor-0 died"),
        "log names the reactor:\n{log}"
    );
}
