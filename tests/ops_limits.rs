//! Limits that protect a node: --max-connections (the next upgrade gets 503 and is counted),
//! the handshake timeout for a client that sends half a request and stalls (slowloris), and the
//! idle timeout for a WebSocket that goes silent (close 1001 "idle timeout", counted).

mod ops_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ops_support::*;

const SEC: Duration = Duration::from_secs(1);

#[test]
fn max_connections_refuses_the_sixth_upgrade_with_503() {
    let server = Server::start(&["--threads", "2", "--max-connections", "5"]);
    let mut open: Vec<Ws> = (0..5).map(|_| server.ws("/ws?channel=c")).collect();
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(5 * SEC)).unwrap();
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
        assert_eq!(ws.recv_text(5 * SEC), "hi");
    }
    // Freeing a slot admits the next client.
    let mut gone = open.pop().unwrap();
    gone.send_close(1000).unwrap();
    gone.recv_close(5 * SEC).unwrap();
    server.wait_metric("fanout_connections_open", 4.0, 5 * SEC);
    let _again = server.ws("/ws?channel=c");
    let m = server.metrics();
    assert_eq!(m.get("fanout_connections_refused_total"), 1.0);
    assert_eq!(m.get("fanout_connections_open"), 5.0);
}

#[test]
fn half_a_request_is_dropped_after_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout", "0.5"]);
    let mut slow = TcpStream::connect(server.addr).unwrap();
    let start = Instant::now();
    slow.write_all(b"GET /ws?channel=c HTTP/1.1\r\nHost: test\r\nUpgrade: websoc")
        .unwrap();
    slow.set_read_timeout(Some(5 * SEC)).unwrap();
    let mut buf = [0u8; 1024];
    let ended = match slow.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!(
            "server answered a half request: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    let took = start.elapsed();
    assert!(ended, "stalled request still open after {took:?}");
    assert!(
        took >= Duration::from_millis(450),
        "dropped too early: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(1500),
        "dropped too late: {took:?}"
    );
    let m = server.metrics();
    assert_eq!(m.get("fanout_handshake_timeouts_total"), 1.0);
    assert_eq!(m.get("fanout_connections_accepted_total"), 0.0);
    // A normal client connecting afterwards is unaffected and is not timed out once upgraded.
    let mut ws = server.ws("/ws?channel=c");
    std::thread::sleep(SEC);
    ws.send_text("alive");
    assert_eq!(ws.recv_text(5 * SEC), "alive");
    assert_eq!(server.metrics().get("fanout_handshake_timeouts_total"), 1.0);
}

#[test]
fn silent_websocket_is_closed_by_the_idle_timeout() {
    let server = Server::start(&["--idle-timeout", "0.6", "--ping-interval", "30"]);
    let mut silent = server.ws("/ws?channel=quiet");
    let mut chatty = server.ws("/ws?channel=busy");
    let start = Instant::now();
    // The chatty client keeps sending pings; the silent one sends nothing at all.
    let mut closed_at = None;
    while start.elapsed() < 3 * SEC {
        chatty.send(PING, b"k").unwrap();
        let pong = chatty.recv_frame(SEC).unwrap();
        assert_eq!(pong.opcode, PONG);
        if closed_at.is_none() {
            match silent.recv_frame(Duration::from_millis(100)) {
                Ok(f) => {
                    assert_eq!(f.close_code(), Some((1001, "idle timeout".into())), "{f:?}");
                    closed_at = Some(start.elapsed());
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("silent client: {e}"),
            }
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let at = closed_at.expect("silent client was not closed");
    assert!(
        at >= Duration::from_millis(550) && at <= Duration::from_millis(1600),
        "closed after {at:?}"
    );
    let m = server.metrics();
    assert_eq!(m.closed("idle_timeout"), 1.0);
    assert_eq!(
        m.get("fanout_connections_open"),
        1.0,
        "the chatty client stays"
    );
    chatty.send_text("still open");
    assert_eq!(chatty.recv_text(SEC), "still open");
}

#[test]
fn unanswered_pings_lead_to_the_idle_timeout() {
    // The server pings after 0.2 s of silence; a client that never answers is closed at 0.8 s.
    let server = Server::start(&["--idle-timeout", "0.8", "--ping-interval", "0.2"]);
    let mut ws = server.ws("/ws?channel=p");
    let ping = ws.recv_frame(2 * SEC).unwrap();
    assert_eq!(ping.opcode, PING, "{ping:?}");
    let close = ws.recv_frame(3 * SEC).unwrap();
    assert_eq!(close.close_code(), Some((1001, "idle timeout".into())));
    // A client that answers pings is kept: pongs count as activity.
    let mut ok = server.ws("/ws?channel=p");
    let start = Instant::now();
    while start.elapsed() < 2 * SEC {
        let f = ok.recv_frame(2 * SEC).unwrap();
        assert_eq!(f.opcode, PING, "only pings expected, got {f:?}");
        ok.send(PONG, &f.payload).unwrap();
    }
    assert_eq!(server.metrics().closed("idle_timeout"), 1.0);
}
