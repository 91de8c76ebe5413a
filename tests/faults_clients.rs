//! Misbehaving clients must hurt nobody else: one client that stops reading while 1000 others
//! keep receiving (they get everything, with low latency; it is closed as a slow consumer), a
//! client that connects and never sends (dropped at the handshake timeout), and sockets reset
//! (SO_LINGER 0) in the middle of a frame, of an HTTP request and of the server's writes.

mod ops_support;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use ops_support::*;

const SEC: Duration = Duration::from_secs(1);
const RECEIVERS: usize = 1000;
const THREADS: usize = 4;
const FAN_MESSAGES: u64 = 200;

/// Aborts a socket with a TCP reset instead of a FIN.
fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

/// Receives on many nonblocking sockets with one poll; returns per-socket counts and latencies
/// (ms) of "seq:micros" text messages, timed against `base`, and the sockets (kept open).
type Received = (Vec<u64>, Vec<f64>, Vec<mio::net::TcpStream>);
fn receive_all(streams: Vec<TcpStream>, base: Instant, want: u64, deadline: Instant) -> Received {
    let mut poll = Poll::new().unwrap();
    let mut conns: Vec<(mio::net::TcpStream, Vec<u8>, u64)> = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        s.set_nonblocking(true).unwrap();
        let mut s = mio::net::TcpStream::from_std(s);
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE)
            .unwrap();
        conns.push((s, Vec::new(), 0));
    }
    let mut latencies = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut done = 0;
    let mut chunk = vec![0u8; 65536];
    while done < conns.len() && Instant::now() < deadline {
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for ev in events.iter() {
            let (s, buf, count) = &mut conns[ev.token().0];
            loop {
                match s.read(&mut chunk) {
                    Ok(0) => panic!("receiver {} disconnected", ev.token().0),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("receiver {}: {e}", ev.token().0),
                }
            }
            let now = base.elapsed().as_micros() as f64;
            let mut at = 0;
            while let Some((f, used)) = parse_frame(&buf[at..]) {
                at += used;
                assert_eq!(f.opcode, TEXT, "receiver got {f:?}");
                let text = f.text();
                let (_, sent) = text.split_once(':').expect("seq:micros");
                latencies.push((now - sent.parse::<f64>().unwrap()) / 1000.0);
                *count += 1;
                if *count == want {
                    done += 1;
                }
            }
            buf.drain(..at);
        }
    }
    let counts = conns.iter().map(|c| c.2).collect();
    (counts, latencies, conns.into_iter().map(|c| c.0).collect())
}

#[test]
fn a_stalled_reader_is_cut_off_while_a_thousand_others_keep_their_latency() {
    let server = Server::start(&["--threads", "2", "--max-queue", "262144"]);

    // The stalled client: a tiny receive buffer, subscribed to the shared channel and to a bulk
    // channel only it listens to, and it never reads.
    let slow = {
        let mut ws = tiny_buffer_client(server.addr, "/ws", Some("fanout.json"));
        ws.send_text(r#"{"op":"subscribe","channel":"fan","id":1}"#);
        ws.send_text(r#"{"op":"subscribe","channel":"bulk","id":2}"#);
        ws
    };
    let mut groups: Vec<Vec<TcpStream>> = (0..THREADS).map(|_| Vec::new()).collect();
    for i in 0..RECEIVERS {
        let ws = server.ws("/ws?channel=fan");
        groups[i % THREADS].push(ws.stream);
    }
    assert_eq!(
        server.wait_metric("fanout_connections_open", RECEIVERS as f64 + 1.0, 10 * SEC),
        RECEIVERS as f64 + 1.0
    );

    let base = Instant::now();
    let deadline = base + 30 * SEC;
    let receivers: Vec<_> = groups
        .into_iter()
        .map(|g| std::thread::spawn(move || receive_all(g, base, FAN_MESSAGES, deadline)))
        .collect();

    // The publisher is not subscribed to anything; its ok replies are drained by a thread.
    let publisher = server.ws_json("/ws");
    let mut writer = Ws::from_stream(publisher.stream.try_clone().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let drain = {
        let stop = stop.clone();
        let mut p = publisher;
        std::thread::spawn(move || {
            let mut errors = 0;
            while !stop.load(Ordering::Relaxed) {
                match p.recv(Duration::from_millis(100)) {
                    Ok(f) if f.text().contains("error") => errors += 1,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                    Err(e) => panic!("publisher: {e}"),
                }
            }
            errors
        })
    };
    let bulk = "x".repeat(32 * 1024);
    for seq in 0..FAN_MESSAGES {
        let us = base.elapsed().as_micros();
        writer.send_text(&format!(
            r#"{{"op":"publish","channel":"fan","data":"{seq}:{us}"}}"#
        ));
        writer.send_text(&format!(
            r#"{{"op":"publish","channel":"bulk","data":"{bulk}"}}"#
        ));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut counts = Vec::new();
    let mut latencies = Vec::new();
    let mut sockets = Vec::new();
    for r in receivers {
        let (c, l, s) = r.join().unwrap();
        counts.extend(c);
        latencies.extend(l);
        sockets.extend(s);
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(drain.join().unwrap(), 0, "publishes refused");
    let short: Vec<_> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != FAN_MESSAGES)
        .collect();
    assert!(
        short.is_empty(),
        "receivers missing messages (index, count): {short:?}"
    );
    latencies.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
    eprintln!(
        "{} deliveries: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
        latencies.len()
    );
    assert!(p99 < 200.0, "p99 latency {p99:.1} ms of the other clients");

    let m = server.metrics();
    assert_eq!(m.closed("slow_consumer"), 1.0);
    assert_eq!(
        m.get("fanout_connections_open"),
        RECEIVERS as f64 + 1.0,
        "receivers + publisher"
    );
    // When the stalled client reads again it finds its connection closed (with 1008 if the
    // close frame fit in its socket).
    let mut slow = slow;
    let mut closing = None;
    let give_up = Instant::now() + 10 * SEC;
    while Instant::now() < give_up {
        match slow.recv(SEC) {
            Ok(f) if f.opcode == CLOSE => {
                closing = f.close_code();
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => panic!("slow client still open"),
            Err(_) => break,
        }
    }
    if let Some((code, reason)) = closing {
        assert_eq!((code, reason.as_str()), (1008, "slow consumer"));
    }
    drop(sockets);
}

#[test]
fn a_client_that_never_sends_is_dropped_at_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout", "0.5"]);
    let mut busy = server.ws("/ws?channel=c");
    let mut mute = TcpStream::connect(server.addr).unwrap();
    let start = Instant::now();
    mute.set_read_timeout(Some(5 * SEC)).unwrap();
    let mut buf = [0u8; 64];
    let r = mute.read(&mut buf);
    let took = start.elapsed();
    assert!(
        matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert!(
        took >= Duration::from_millis(450) && took <= Duration::from_millis(1500),
        "dropped after {took:?}"
    );
    assert_eq!(server.metrics().get("fanout_handshake_timeouts_total"), 1.0);
    busy.send_text("unaffected");
    assert_eq!(busy.recv_text(SEC), "unaffected");
}

#[test]
fn sockets_reset_mid_frame_mid_request_and_mid_write_leave_the_server_serving() {
    let server = Server::start(&["--threads", "2"]);
    let mut a = server.ws("/ws?channel=pair");
    let mut b = server.ws("/ws?channel=pair");

    // Half a masked frame: the header announces 100 bytes, 10 arrive, then a reset.
    for _ in 0..50 {
        let mut ws = server.ws("/ws?channel=half");
        let frame = client_frame(TEXT, &[b'z'; 100]);
        ws.stream.write_all(&frame[..frame.len() / 2]).unwrap();
        reset(ws.stream);
    }
    // Half an HTTP request, then a reset.
    for _ in 0..20 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(b"GET /ws?channel=x HTTP/1.1\r\nHost: t\r\nUpgr")
            .unwrap();
        reset(s);
    }
    // Subscribers that never read, reset while the server is writing a flood to them.
    let flooded: Vec<Ws> = (0..20).map(|_| server.ws("/ws?channel=flood")).collect();
    let mut publisher = server.ws_json("/ws");
    let chunk = "f".repeat(16 * 1024);
    for i in 0..100 {
        publisher.send_text(&format!(
            r#"{{"op":"publish","channel":"flood","data":"{chunk}","id":{i}}}"#
        ));
        if i == 50 {
            for ws in flooded.iter().take(20) {
                let s = ws.stream.try_clone().unwrap();
                reset(s);
            }
        }
    }
    drop(flooded);
    for i in 0..100 {
        let reply = publisher.recv_text(5 * SEC);
        assert_eq!(reply, format!(r#"{{"op":"ok","id":{i}}}"#));
    }

    // Everyone else is still served.
    a.send_text("after the resets");
    assert_eq!(a.recv_text(SEC), "after the resets");
    assert_eq!(b.recv_text(SEC), "after the resets");
    assert_eq!(server.get("/healthz").0, 200);
    let open = server.wait_metric("fanout_connections_open", 3.0, 5 * SEC);
    assert_eq!(open, 3.0, "a, b and the publisher");
    let m = server.metrics();
    // a, b, 50 half frames, 20 flooded, the publisher; the half HTTP requests never upgraded.
    assert_eq!(m.get("fanout_connections_accepted_total"), 73.0);
    let gone = m.closed("io_error") + m.closed("client_close");
    assert_eq!(gone, 70.0, "every reset WebSocket counted closed once");
    assert_eq!(m.closed("protocol_error"), 0.0);
}
