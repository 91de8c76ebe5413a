//! Graceful drain on SIGTERM with real clients: /readyz turns 503 before any client is closed
//! while WebSockets keep working through --drain-delay (traffic and even new upgrades), then
//! every client gets close 1001, never before the delay, spread over --drain-time (not all in
//! the same instant), then the process exits 0; a second SIGTERM exits at once, without the
//! drain; SIGINT drains too; a node without clients exits without waiting out the drain time.
//!
//! Nothing here asserts how fast the node reacts, which depends on the machine: the checks are
//! order (503 and the served checks come before the first close; exit comes before a drain
//! that would take far longer than the test waits) and proportion (the closes span a good part
//! of the drain time, and no short window holds most of them).

mod ops_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ops_support::*;

const CLIENTS: usize = 200;
/// Long enough that the checks made during the delay (a few HTTP requests and two echoes, a
/// few ms) cannot run past it unless the machine stalls the test for seconds.
const DRAIN_DELAY: f64 = 2.0;
const DRAIN_TIME: f64 = 2.0;

/// Proves: after SIGTERM /readyz is 503 ("draining") and /healthz, an open WebSocket and a new
/// upgrade all still work, all before any client got its close; each of 200 clients (and the
/// two that talked) then gets close 1001, none before the drain delay; the closes span at least
/// half the drain time and no window of a twentieth of it holds half of them (a node closing
/// everyone at once fails both); the process exits 0 after every client got its close.
#[test]
fn sigterm_drains_clients_spread_over_drain_time_then_exits_zero() {
    let mut server = Server::start(&[
        "--threads",
        "2",
        "--drain-delay",
        &DRAIN_DELAY.to_string(),
        "--drain-time",
        &DRAIN_TIME.to_string(),
    ]);
    // Each client thread reports (index, close code, reason, arrival time) and counts itself.
    let (tx, rx) = mpsc::channel();
    let closed = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for i in 0..CLIENTS {
        let mut ws = server.ws("/ws?channel=drain");
        let tx = tx.clone();
        let closed = closed.clone();
        handles.push(std::thread::spawn(move || {
            let result = ws.recv_close(DRAIN_DELAY_AND_TIME + PATIENCE);
            let at = Instant::now();
            closed.fetch_add(1, Ordering::SeqCst);
            // Finish the closing handshake like a browser would.
            if let Ok((code, _)) = &result {
                let _ = ws.send_close(*code);
            }
            let _ = tx.send((i, result.map_err(|e| e.to_string()), at));
        }));
    }
    drop(tx);
    assert_eq!(
        server.wait_metric("fanout_connections_open", CLIENTS as f64, PATIENCE),
        CLIENTS as f64
    );
    let mut talker = server.ws("/ws?channel=talk");

    let t0 = Instant::now();
    server.signal("TERM");
    wait_status(server.addr, "/readyz", 503, PATIENCE).expect("/readyz 503 after SIGTERM");
    let (_, reason) = server.get("/readyz");
    assert!(reason.contains("draining"), "reason {reason:?}");
    // Still serving during the drain delay: health, traffic and even new upgrades.
    assert_eq!(server.get("/healthz").0, 200);
    talker.send_text("still here");
    assert_eq!(talker.next_text("talker"), "still here");
    let mut late = server.ws("/ws?channel=talk");
    late.send_text("late joiner");
    assert_eq!(late.next_text("late joiner"), "late joiner");
    assert_eq!(
        closed.load(Ordering::SeqCst),
        0,
        "a client was closed before /readyz turned 503 and the checks above were done"
    );

    let mut closes = Vec::new();
    while let Ok((i, result, at)) = rx.recv_timeout(DRAIN_DELAY_AND_TIME + PATIENCE) {
        let (code, reason) = result.unwrap_or_else(|e| panic!("client {i}: no close frame: {e}"));
        assert_eq!(code, 1001, "client {i} close reason {reason:?}");
        closes.push(at.duration_since(t0).as_secs_f64());
    }
    assert_eq!(closes.len(), CLIENTS, "every client got a close frame");
    for (ws, name) in [(&mut talker, "talker"), (&mut late, "late")] {
        let (code, _) = ws
            .recv_close(PATIENCE)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(code, 1001);
    }
    closes.sort_by(f64::total_cmp);
    let (first, last) = (closes[0], closes[CLIENTS - 1]);
    // t0 was taken before the signal was sent, so a close can only come later than this.
    assert!(
        first >= DRAIN_DELAY,
        "first close at {first:.3} s, before the {DRAIN_DELAY} s drain delay"
    );
    assert!(
        last - first >= DRAIN_TIME / 2.0,
        "closes span only {:.3} s of the {DRAIN_TIME} s drain time",
        last - first
    );
    // Uniform would put ~5 % of the clients in each window of DRAIN_TIME / 20.
    let window = DRAIN_TIME / 20.0;
    let mut worst = 0;
    for (i, start) in closes.iter().enumerate() {
        let n = closes[i..]
            .iter()
            .take_while(|t| **t < start + window)
            .count();
        worst = worst.max(n);
    }
    assert!(
        worst <= CLIENTS / 2,
        "{worst} of {CLIENTS} closes within one {window} s window: {closes:?}"
    );

    let status = server
        .wait_exit(PATIENCE)
        .expect("process did not exit after the drain");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after drain; log:\n{}",
        server.log()
    );
    for h in handles {
        h.join().unwrap();
    }
    let log = server.log();
    assert!(log.contains("draining"), "drain start is logged:\n{log}");
    assert!(log.contains("drained"), "drain end is logged:\n{log}");
}

const DRAIN_DELAY_AND_TIME: Duration = Duration::from_secs(4);

/// A second SIGTERM during the drain delay exits at once: with a 60 s delay and 10 s drain
/// time, the process is gone well before the delay could end, and its clients see their
/// connection end without any close frame (the drain never started).
#[test]
fn second_sigterm_during_drain_exits_at_once() {
    let mut server = Server::start(&["--drain-delay", "60", "--drain-time", "10"]);
    let mut clients: Vec<Ws> = (0..5).map(|_| server.ws("/ws?channel=x")).collect();
    server.signal("TERM");
    assert!(wait_status(server.addr, "/readyz", 503, PATIENCE).is_some());
    server.signal("TERM");
    // Any exit status is acceptable here (the contract says 1); only that it did not drain.
    server
        .wait_exit(PATIENCE)
        .expect("second SIGTERM must exit at once, not after the 60 s drain delay");
    for (i, ws) in clients.iter_mut().enumerate() {
        match ws.recv_frame(PATIENCE) {
            Ok(f) => panic!("client {i} got {f:?}; the drain should never have started"),
            Err(e) => assert_ne!(
                e.kind(),
                std::io::ErrorKind::TimedOut,
                "client {i} still open"
            ),
        }
    }
}

/// SIGINT drains like SIGTERM: close 1001, then exit 0.
#[test]
fn sigint_also_drains() {
    let mut server = Server::start(&["--drain-delay", "0", "--drain-time", "0.2"]);
    let mut ws = server.ws("/ws?channel=x");
    server.signal("INT");
    assert_eq!(ws.recv_close(PATIENCE).unwrap().0, 1001);
    let _ = ws.send_close(1001);
    assert_eq!(server.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0));
}

/// A node with nothing to close exits 0 as soon as the drain starts: with a 60 s drain time it
/// is gone within the test's patience, so it did not wait the drain time out.
#[test]
fn a_node_without_clients_exits_as_soon_as_the_drain_starts() {
    let mut server = Server::start(&["--threads", "2", "--drain-delay", "0", "--drain-time", "60"]);
    // A finished HTTP exchange leaves no client behind.
    assert_eq!(server.get("/healthz").0, 200);
    server.signal("TERM");
    let status = server
        .wait_exit(PATIENCE)
        .expect("a node with nothing to close must not wait out a 60 s drain time");
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
}
