//! Graceful drain on SIGTERM with real clients: /readyz turns 503 at once while WebSockets keep
//! working for --drain-delay, then every client gets close 1001 spread over --drain-time (not all
//! in the same instant), then the process exits 0; a second SIGTERM exits at once.

mod ops_support;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use ops_support::*;

const SEC: Duration = Duration::from_secs(1);
const CLIENTS: usize = 200;

#[test]
fn sigterm_drains_clients_spread_over_drain_time_then_exits_zero() {
    let mut server = Server::start(&[
        "--threads",
        "2",
        "--drain-delay",
        "0.5",
        "--drain-time",
        "2",
    ]);
    // Each client thread reports (index, close code, reason, arrival time).
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for i in 0..CLIENTS {
        let mut ws = server.ws("/ws?channel=drain");
        let tx = tx.clone();
        handles.push(std::thread::spawn(move || {
            let result = ws.recv_close(20 * SEC);
            let at = Instant::now();
            // Finish the closing handshake like a browser would.
            if let Ok((code, _)) = &result {
                let _ = ws.send_close(*code);
            }
            let _ = tx.send((i, result.map_err(|e| e.to_string()), at));
        }));
    }
    drop(tx);
    assert_eq!(
        server.wait_metric("fanout_connections_open", CLIENTS as f64, 5 * SEC),
        CLIENTS as f64
    );
    let mut talker = server.ws("/ws?channel=talk");

    let t0 = Instant::now();
    server.signal("TERM");
    let not_ready =
        wait_status(server.addr, "/readyz", 503, SEC).expect("/readyz 503 after SIGTERM");
    assert!(
        not_ready < Duration::from_millis(300),
        "/readyz took {not_ready:?} to turn 503"
    );
    let (_, reason) = server.get("/readyz");
    assert!(reason.contains("draining"), "reason {reason:?}");
    // Still serving during the drain delay: health, traffic and even new upgrades.
    assert_eq!(server.get("/healthz").0, 200);
    talker.send_text("still here");
    assert_eq!(talker.recv_text(SEC), "still here");
    let mut late = server.ws("/ws?channel=talk");
    late.send_text("late joiner");
    assert_eq!(late.recv_text(SEC), "late joiner");
    assert!(
        t0.elapsed() < Duration::from_millis(450),
        "checks ran past the drain delay"
    );

    let mut closes = Vec::new();
    while let Ok((i, result, at)) = rx.recv_timeout(10 * SEC) {
        let (code, reason) = result.unwrap_or_else(|e| panic!("client {i}: no close frame: {e}"));
        assert_eq!(code, 1001, "client {i} close reason {reason:?}");
        closes.push(at.duration_since(t0).as_secs_f64());
    }
    assert_eq!(closes.len(), CLIENTS, "every client got a close frame");
    for (ws, name) in [(&mut talker, "talker"), (&mut late, "late")] {
        let (code, _) = ws
            .recv_close(5 * SEC)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(code, 1001);
    }
    closes.sort_by(f64::total_cmp);
    let (first, last) = (closes[0], closes[CLIENTS - 1]);
    assert!(
        first >= 0.45,
        "first close at {first:.3} s, before the 0.5 s drain delay"
    );
    assert!(
        last <= 0.5 + 2.0 + 0.5,
        "last close at {last:.3} s, after the drain time"
    );
    assert!(
        last - first >= 1.2,
        "closes span only {:.3} s of the 2 s drain time",
        last - first
    );
    // No 100 ms window holds more than a quarter of the clients (uniform would be ~5 %).
    let mut worst = 0;
    for (i, start) in closes.iter().enumerate() {
        let n = closes[i..].iter().take_while(|t| **t < start + 0.1).count();
        worst = worst.max(n);
    }
    assert!(
        worst <= CLIENTS / 4,
        "{worst} of {CLIENTS} closes within one 100 ms window: {closes:?}"
    );

    let status = server
        .wait_exit(5 * SEC)
        .expect("process did not exit after the drain");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after drain; log:\n{}",
        server.log()
    );
    assert!(t0.elapsed() <= Duration::from_secs_f64(0.5 + 2.0 + 2.5));
    for h in handles {
        h.join().unwrap();
    }
    let log = server.log();
    assert!(log.contains("draining"), "drain start is logged:\n{log}");
    assert!(log.contains("drained"), "drain end is logged:\n{log}");
}

#[test]
fn second_sigterm_during_drain_exits_at_once() {
    let mut server = Server::start(&["--drain-delay", "5", "--drain-time", "10"]);
    let mut clients: Vec<Ws> = (0..5).map(|_| server.ws("/ws?channel=x")).collect();
    server.signal("TERM");
    assert!(wait_status(server.addr, "/readyz", 503, SEC).is_some());
    let t = Instant::now();
    server.signal("TERM");
    // Any exit status is acceptable here (the contract says 1); only the promptness matters.
    server
        .wait_exit(2 * SEC)
        .expect("second SIGTERM must exit at once");
    assert!(t.elapsed() < SEC, "took {:?}", t.elapsed());
    // The clients see their connection end (no drain closes were due yet).
    for ws in clients.iter_mut() {
        assert!(ws.wait_eof(2 * SEC));
    }
}

#[test]
fn sigint_also_drains() {
    let mut server = Server::start(&["--drain-delay", "0", "--drain-time", "0.2"]);
    let mut ws = server.ws("/ws?channel=x");
    server.signal("INT");
    assert_eq!(ws.recv_close(5 * SEC).unwrap().0, 1001);
    let _ = ws.send_close(1001);
    assert_eq!(server.wait_exit(5 * SEC).and_then(|s| s.code()), Some(0));
}

#[test]
fn a_node_without_clients_exits_as_soon_as_the_drain_starts() {
    let mut server = Server::start(&["--threads", "2", "--drain-delay", "0", "--drain-time", "30"]);
    // A finished HTTP exchange leaves no client behind.
    assert_eq!(server.get("/healthz").0, 200);
    let t = Instant::now();
    server.signal("TERM");
    let status = server
        .wait_exit(10 * SEC)
        .expect("a node with nothing to close must not wait out a 30 s drain time");
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    assert!(t.elapsed() < 5 * SEC, "took {:?}", t.elapsed());
}
