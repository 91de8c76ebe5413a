//! Redis faults: Redis killed and restarted on the same port under steady publish load through
//! two nodes (deliveries counted before and after, every message numbered so a duplicate is
//! caught, both nodes ready again within 2 s); a fake Redis that accepts but never answers; a
//! fake Redis that answers with RESP garbage. The node must never hang or crash and must keep
//! serving its WebSocket clients.

mod ops_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ops_support::*;

const SEC: Duration = Duration::from_secs(1);

/// Collects the numbers a subscriber receives, with arrival times, until `stop`.
fn collect(mut ws: Ws, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(u64, Instant)>> {
    std::thread::spawn(move || {
        let mut got = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match ws.recv(Duration::from_millis(100)) {
                Ok(f) if f.opcode == TEXT => {
                    let n: u64 = f
                        .text()
                        .parse()
                        .unwrap_or_else(|_| panic!("not a number: {:?}", f.text()));
                    got.push((n, Instant::now()));
                }
                Ok(f) => panic!("subscriber got {f:?}"),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("subscriber lost its connection: {e}"),
            }
        }
        got
    })
}

#[test]
fn redis_restart_under_load_loses_nothing_acknowledged_and_duplicates_nothing() {
    let mut redis = Redis::start();
    let url = redis.url();
    let n1 = Server::start(&["--threads", "2", "--redis", &url]);
    let n2 = Server::start(&["--threads", "2", "--redis", &url]);
    for n in [&n1, &n2] {
        assert!(wait_status(n.addr, "/readyz", 200, 5 * SEC).is_some());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let s1 = collect(n1.ws("/ws?channel=load"), stop.clone());
    let s2 = collect(n2.ws("/ws?channel=load"), stop.clone());
    // Let both nodes' SUBSCRIBEs reach Redis before counting.
    std::thread::sleep(Duration::from_millis(300));

    // The publisher (JSON mode, on node 1) numbers every message; the reply says whether
    // Redis acknowledged it. A reader thread matches replies to ids.
    let publisher = n1.ws_json("/ws");
    let mut writer = Ws::from_stream(publisher.stream.try_clone().unwrap());
    let replies: Arc<Mutex<BTreeMap<u64, (bool, Instant)>>> = Default::default();
    let reader = {
        let replies = replies.clone();
        let stop = stop.clone();
        let mut publisher = publisher;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match publisher.recv(Duration::from_millis(100)) {
                    Ok(f) => {
                        let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
                        let id = v["id"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("reply without id: {v}"));
                        let ok = v["op"] == "ok";
                        assert!(
                            ok || v["error"].as_str().unwrap().contains("redis unavailable"),
                            "{v}"
                        );
                        replies.lock().unwrap().insert(id, (ok, Instant::now()));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => panic!("publisher lost its connection: {e}"),
                }
            }
        })
    };
    let mut sent: Vec<Instant> = Vec::new();
    let mut publish_for = |d: Duration, sent: &mut Vec<Instant>| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            let n = sent.len() as u64;
            sent.push(Instant::now());
            writer.send_text(&format!(
                r#"{{"op":"publish","channel":"load","data":"{n}","id":{n}}}"#
            ));
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    publish_for(Duration::from_millis(1500), &mut sent);
    let killed_at = Instant::now();
    redis.kill();
    publish_for(SEC, &mut sent);
    redis.restart();
    let back_at = Instant::now();
    // Keep publishing while both nodes recover; measure when each is ready again.
    let mut ready: [Option<Duration>; 2] = [None, None];
    while ready.iter().any(Option::is_none) && back_at.elapsed() < 5 * SEC {
        publish_for(Duration::from_millis(20), &mut sent);
        for (i, n) in [&n1, &n2].into_iter().enumerate() {
            if ready[i].is_none() && matches!(http_get(n.addr, "/readyz"), Ok((200, _))) {
                ready[i] = Some(back_at.elapsed());
            }
        }
    }
    for (i, r) in ready.iter().enumerate() {
        let r =
            r.unwrap_or_else(|| panic!("node {} not ready within 5 s of Redis restarting", i + 1));
        assert!(
            r <= 2 * SEC,
            "node {} ready {r:?} after Redis came back; want <= 2 s",
            i + 1
        );
    }
    let all_ready = Instant::now();
    publish_for(Duration::from_millis(1500), &mut sent);
    // Every publish must have been answered (ok or error) within the 5 s reply timeout.
    let deadline = Instant::now() + 6 * SEC;
    while replies.lock().unwrap().len() < sent.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let got = [s1.join().unwrap(), s2.join().unwrap()];
    let replies = replies.lock().unwrap().clone();
    assert_eq!(
        replies.len(),
        sent.len(),
        "some publishes were never answered"
    );

    let before: Vec<u64> = (0..sent.len() as u64)
        .filter(|n| sent[*n as usize] < killed_at)
        .collect();
    let after: Vec<u64> = (0..sent.len() as u64)
        .filter(|n| sent[*n as usize] > all_ready + Duration::from_millis(200))
        .collect();
    let errors = replies.values().filter(|(ok, _)| !ok).count();
    assert!(
        errors > 0,
        "publishes while Redis was down must get error replies"
    );
    for (i, got) in got.iter().enumerate() {
        let numbers: Vec<u64> = got.iter().map(|(n, _)| *n).collect();
        let unique: BTreeSet<u64> = numbers.iter().copied().collect();
        assert_eq!(
            unique.len(),
            numbers.len(),
            "node {} delivered a message twice",
            i + 1
        );
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "node {} reordered messages",
            i + 1
        );
        for n in unique.iter() {
            assert!(
                replies[n].0,
                "node {} delivered {n}, which was refused",
                i + 1
            );
        }
        let b = before.iter().filter(|n| unique.contains(n)).count();
        let a = after.iter().filter(|n| unique.contains(n)).count();
        eprintln!(
            "node {}: {} delivered ({b} of {} before the kill, {a} of {} after recovery), {errors} refused",
            i + 1,
            numbers.len(),
            before.len(),
            after.len()
        );
        assert!(
            before.len() > 100 && after.len() > 100,
            "too little traffic to judge"
        );
        assert_eq!(
            b,
            before.len(),
            "node {}: acknowledged messages before the kill were lost",
            i + 1
        );
        assert_eq!(
            a,
            after.len(),
            "node {}: acknowledged messages after recovery were lost",
            i + 1
        );
    }
    for n in [&n1, &n2] {
        let m = n.metrics();
        assert_eq!(m.get("fanout_redis_links_up"), 2.0);
        assert_eq!(m.get("fanout_redis_reconnects_total"), 2.0);
    }
}

/// A TCP listener posing as Redis; `answer` decides what each accepted connection gets.
struct FakeRedis {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeRedis {
    fn start(answer: fn(std::net::TcpStream)) -> FakeRedis {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        stream.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || answer(stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeRedis {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FakeRedis {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads and discards everything for up to 15 s, never answering.
fn silent(mut s: std::net::TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < 15 * SEC {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Answers the first command with a valid reply, then sends bytes that are not RESP.
fn garbage(mut s: std::net::TcpStream) {
    let _ = s.set_read_timeout(Some(2 * SEC));
    let mut buf = [0u8; 4096];
    if !matches!(s.read(&mut buf), Ok(n) if n > 0) {
        return;
    }
    let _ = s.write_all(b"+OK\r\n");
    std::thread::sleep(Duration::from_millis(100));
    let _ = s.write_all(b"\x01\x02\xffthis is not RESP\r\n\x00\x00");
    // Hold the socket until the node gives up on it.
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

/// What a node without a working Redis must still do: answer HTTP, upgrade, reply to JSON
/// commands (publish with an error), answer pings.
fn still_serves(server: &Server) {
    assert_eq!(server.get("/healthz").0, 200);
    let mut json = server.ws_json("/ws");
    json.send_text(r#"{"op":"subscribe","channel":"c","id":1}"#);
    assert_eq!(json.recv_text(2 * SEC), r#"{"op":"ok","id":1}"#);
    let t = Instant::now();
    json.send_text(r#"{"op":"publish","channel":"c","data":1,"id":2}"#);
    let reply = json.recv_text(2 * SEC);
    assert!(t.elapsed() < SEC, "publish reply took {:?}", t.elapsed());
    assert!(
        reply.contains(r#""op":"error""#)
            && reply.contains("redis unavailable")
            && reply.contains(r#""id":2"#),
        "{reply}"
    );
    json.send(PING, b"p").unwrap();
    assert_eq!(
        json.recv_frame(2 * SEC).unwrap(),
        Frame {
            fin: true,
            opcode: PONG,
            payload: b"p".to_vec()
        }
    );
}

#[test]
fn redis_that_never_answers_leaves_the_node_serving_and_not_ready() {
    let fake = FakeRedis::start(silent);
    let mut server = Server::start(&["--threads", "2", "--redis", &fake.url()]);
    let start = Instant::now();
    while fake.accepted() < 2 && start.elapsed() < 5 * SEC {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fake.accepted(), 2, "one link per reactor");
    for _ in 0..3 {
        let (status, body) = server.get("/readyz");
        assert_eq!(status, 503, "ready without a Redis handshake: {body}");
        assert!(body.contains("redis"), "{body}");
        still_serves(&server);
    }
    assert_eq!(server.metrics().get("fanout_redis_links_up"), 0.0);
    // The unanswered HELLO times out after 5 s: the node must then try again.
    let deadline = Instant::now() + 10 * SEC;
    while fake.accepted() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fake.accepted() >= 4,
        "no reconnect after the unanswered handshake"
    );
    assert!(server.alive());
    still_serves(&server);
}

#[test]
fn redis_sending_garbage_makes_the_node_reconnect_not_crash() {
    let fake = FakeRedis::start(garbage);
    let mut server = Server::start(&[
        "--threads",
        "2",
        "--redis",
        &fake.url(),
        "--log-level",
        "info",
    ]);
    let start = Instant::now();
    for _ in 0..10 {
        still_serves(&server);
        std::thread::sleep(Duration::from_millis(200));
    }
    // Backoff is capped at 0.8 s: in ~3 s each of the 2 reactors reconnects several times.
    let n = fake.accepted();
    assert!(
        n >= 6,
        "only {n} connection attempts in {:?}",
        start.elapsed()
    );
    assert!(server.alive(), "node died; log:\n{}", server.log());
    let log = server.log();
    assert!(log.contains("unparseable"), "the garbage is logged:\n{log}");
    let m = server.metrics();
    assert!(m.get("fanout_redis_reconnects_total") >= 2.0);
}
