//! Limits that protect a node: --max-connections (the next upgrade gets 503 and is counted),
//! the handshake timeout for a client that sends half a request and stalls (slowloris), and the
//! idle timeout for a WebSocket that goes silent (close 1001 "idle timeout", counted) while one
//! that pings or answers pings is kept. Timeouts are checked by order (never before the timeout,
//! and a client kept alive outlives a silent one connected after it), not by how soon after the
//! timeout the server acts, which depends on the machine's load.

mod ops_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ops_support::*;

#[test]
fn max_connections_refuses_the_sixth_upgrade_with_503() {
    let server = Server::start(&["--threads", "2", "--max-connections", "5"]);
    let mut open: Vec<Ws> = (0..5).map(|_| server.ws("/ws?channel=c")).collect();
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let (status, head, _) = handshake(&mut s, "/ws?channel=c", None).unwrap();
    assert_eq!(status, 503, "sixth upgrade: {head}");
    // And the refused socket is closed by the server.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let m = server.metrics();
    assert_eq!(m.get("fanout_connections_refused_total"), 1.0);
    assert_eq!(m.http("503"), 1.0);
    assert_eq!(m.get("fanout_connections_open"), 5.0);
    assert_eq!(m.get("fanout_connections_accepted_total"), 5.0);
    // Plain HTTP still works at the limit, and the existing clients still talk.
    assert_eq!(server.get("/healthz").0, 200);
    open[0].send_text("hi");
    for ws in open.iter_mut() {
        assert_eq!(ws.next_text("open client"), "hi");
    }
    // Freeing a slot admits the next client.
    let mut gone = open.pop().unwrap();
    gone.send_close(1000).unwrap();
    gone.recv_close(PATIENCE).unwrap();
    server.wait_metric("fanout_connections_open", 4.0, PATIENCE);
    let _again = server.ws("/ws?channel=c");
    let m = server.metrics();
    assert_eq!(m.get("fanout_connections_refused_total"), 1.0);
    assert_eq!(m.get("fanout_connections_open"), 5.0);
}

/// Slowloris: a client that sends half a request and stalls is dropped by the handshake timeout
/// (0.5 s) without an answer, never before the timeout (measured from before its connect, so load
/// can only make it later), and counted once; a client that completes its upgrade afterwards is
/// not timed out even when it then stays quiet for longer than the handshake timeout.
#[test]
fn half_a_request_is_dropped_after_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout", "0.5"]);
    let start = Instant::now();
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.write_all(b"GET /ws?channel=c HTTP/1.1\r\nHost: test\r\nUpgrade: websoc")
        .unwrap();
    let took = wait_dropped(&mut slow) - start;
    assert!(
        took >= Duration::from_millis(450),
        "dropped too early: {took:?}"
    );
    let m = server.metrics();
    assert_eq!(m.get("fanout_handshake_timeouts_total"), 1.0);
    assert_eq!(m.get("fanout_connections_accepted_total"), 0.0);
    // A normal client connecting afterwards is unaffected and is not timed out once upgraded.
    let mut ws = server.ws("/ws?channel=c");
    std::thread::sleep(SEC);
    ws.send_text("alive");
    assert_eq!(ws.next_text("upgraded client"), "alive");
    assert_eq!(server.metrics().get("fanout_handshake_timeouts_total"), 1.0);
}

/// Idle timeout of 2 s for this file's idle tests: 40 times the 50 ms between the pings of the
/// clients that must be kept, so only a 2 s stall of the test process could make them look idle.
const IDLE: &str = "2";
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits (up to PATIENCE beyond the timeout) for the idle close of a client that sends nothing.
fn wait_idle_close(ws: &mut Ws, what: &str) {
    let f = ws
        .recv_frame(IDLE_TIMEOUT + PATIENCE)
        .unwrap_or_else(|e| panic!("{what} was not closed: {e}"));
    assert_eq!(
        f.close_code(),
        Some((1001, "idle timeout".into())),
        "{what}: {f:?}"
    );
}

/// A WebSocket that sends nothing is closed with 1001 "idle timeout", not before the idle
/// timeout (measured from before it connected), and counted once; a client that connected
/// earlier and keeps pinging is still open afterwards and still served. Order, not speed: the
/// pinging client has been connected longer than the silent one when the latter is closed.
#[test]
fn silent_websocket_is_closed_by_the_idle_timeout() {
    let server = Server::start(&["--idle-timeout", IDLE, "--ping-interval", "30"]);
    let mut chatty = server.ws("/ws?channel=busy");
    let pinger = KeepAlive::start(&chatty, PING);
    let start = Instant::now();
    let mut silent = server.ws("/ws?channel=quiet");
    wait_idle_close(&mut silent, "silent client");
    let at = start.elapsed();
    assert!(
        at >= IDLE_TIMEOUT * 9 / 10,
        "closed after {at:?}, before the idle timeout"
    );
    drop(pinger);
    let m = server.metrics();
    assert_eq!(m.closed("idle_timeout"), 1.0);
    assert_eq!(
        m.get("fanout_connections_open"),
        1.0,
        "the chatty client stays"
    );
    // Everything the chatty client got so far is pongs; then its own message.
    chatty.send_text("still open");
    loop {
        let f = chatty.recv_frame(PATIENCE).expect("chatty client served");
        match f.opcode {
            PONG => continue,
            TEXT => {
                assert_eq!(f.text(), "still open");
                break;
            }
            _ => panic!("chatty client got {f:?}"),
        }
    }
}

/// The server pings a silent client after --ping-interval and closes it at --idle-timeout when
/// no pong comes; a client that connected earlier and answers every ping is still open after
/// the unanswering one (connected later) was closed, so pongs count as activity.
#[test]
fn unanswered_pings_lead_to_the_idle_timeout() {
    let server = Server::start(&["--idle-timeout", IDLE, "--ping-interval", "0.2"]);
    // The answering client: a thread answers every ping until told to stop; any message fails.
    let answering = Reader::start(
        server.ws("/ws?channel=p"),
        "answering client",
        (),
        |_, f| panic!("only pings expected, got {f:?}"),
    );
    let mut ws = server.ws("/ws?channel=p");
    let ping = ws.recv_frame(PATIENCE).unwrap();
    assert_eq!(ping.opcode, PING, "{ping:?}");
    wait_idle_close(&mut ws, "client that never answers pings");
    let (mut ok, (), pings) = answering.stop();
    assert!(pings >= 2, "the answering client got {pings} pings");
    let m = server.metrics();
    assert_eq!(m.closed("idle_timeout"), 1.0);
    assert_eq!(
        m.get("fanout_connections_open"),
        1.0,
        "the answering client stays"
    );
    ok.send_text("still open");
    assert_eq!(ok.next_text("answering client"), "still open");
}
