//! Redis faults: Redis killed and restarted on the same port under steady publish load through
//! two nodes (deliveries counted before and after, every message numbered so a duplicate is
//! caught, both nodes ready again without client action); a fake Redis that accepts but never
//! answers; a fake Redis that answers with RESP garbage. The node must never hang or crash and
//! must keep serving its WebSocket clients. Phases are delimited by events (Redis killed, both
//! nodes ready, both re-subscribed in PUBSUB NUMSUB), never by how long recovery may take.

mod ops_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ops_support::*;

/// Messages published through a phase that must carry traffic (before the kill, after the
/// recovery): a count, not a duration, so a slow machine publishes as many as a fast one.
const PHASE_MESSAGES: usize = 300;

/// Collects the numbers a subscriber receives into `got` until stopped.
fn collect(ws: Ws, got: Arc<Mutex<Vec<u64>>>) -> Reader<()> {
    Reader::start(ws, "subscriber", (), move |_, f| {
        assert_eq!(f.opcode, TEXT, "subscriber got {f:?}");
        let n: u64 = f
            .text()
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {:?}", f.text()));
        got.lock().unwrap().push(n);
    })
}

/// Redis killed (SIGKILL) and restarted on the same port while a JSON client on node 1 publishes
/// numbered messages and a subscriber on each of two nodes collects them. Proves: every publish
/// is answered (ok, or "redis unavailable" while Redis is down; some are refused); no node
/// delivers a message twice, out of order, or one that was refused; every message published
/// before the kill, and every one published after both nodes are ready and re-subscribed (as
/// PUBSUB NUMSUB shows), reaches both subscribers; both nodes get ready again without any client
/// action, each reactor reconnecting exactly once. How soon they recover is not asserted (it
/// depends on the machine); that they do, within the test's patience, is.
#[test]
fn redis_restart_under_load_loses_nothing_acknowledged_and_duplicates_nothing() {
    let mut redis = Redis::start();
    let url = redis.url();
    let n1 = Server::start(&["--threads", "2", "--redis", &url]);
    let n2 = Server::start(&["--threads", "2", "--redis", &url]);
    for n in [&n1, &n2] {
        assert!(wait_status(n.addr, "/readyz", 200, PATIENCE).is_some());
    }
    let got: [Arc<Mutex<Vec<u64>>>; 2] = Default::default();
    let s1 = collect(n1.ws("/ws?channel=load"), got[0].clone());
    let s2 = collect(n2.ws("/ws?channel=load"), got[1].clone());
    // Both nodes' SUBSCRIBEs are in place before counting.
    assert_eq!(redis.wait_numsub("load", 2, PATIENCE), 2);

    // The publisher (JSON mode, on node 1) numbers every message; the reply says whether
    // Redis acknowledged it. A reader thread matches replies to ids.
    let publisher = n1.ws_json("/ws");
    let mut writer = Ws::from_stream(publisher.stream.try_clone().unwrap());
    let replies: Arc<Mutex<BTreeMap<u64, bool>>> = Default::default();
    let reader = {
        let replies = replies.clone();
        Reader::start(publisher, "publisher", (), move |_, f| {
            let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
            let id = v["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("reply without id: {v}"));
            let ok = v["op"] == "ok";
            assert!(
                ok || v["error"].as_str().unwrap().contains("redis unavailable"),
                "{v}"
            );
            replies.lock().unwrap().insert(id, ok);
        })
    };
    // Numbers in the order sent; the phase each was sent in is what the checks rely on.
    let mut sent: usize = 0;
    let mut publish_one = |sent: &mut usize| {
        let n = *sent;
        *sent += 1;
        writer.send_text(&format!(
            r#"{{"op":"publish","channel":"load","data":"{n}","id":{n}}}"#
        ));
        std::thread::sleep(Duration::from_millis(5));
    };

    let before = 0..{
        for _ in 0..PHASE_MESSAGES {
            publish_one(&mut sent);
        }
        sent
    };
    // Redis acknowledges a PUBLISH to the publisher's node once it queued the message to every
    // subscriber, not once the other node read it: a kill right then may still lose it there.
    // So the kill comes after both nodes have the last message of this phase.
    let last_before = before.end as u64 - 1;
    let deadline = Instant::now() + PATIENCE;
    while got
        .iter()
        .any(|g| !g.lock().unwrap().contains(&last_before))
    {
        assert!(
            Instant::now() < deadline,
            "the last message before the kill never reached both nodes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    redis.kill();
    // Traffic while Redis is down (at least one publish, however slow the machine).
    let down_until = Instant::now() + SEC;
    loop {
        publish_one(&mut sent);
        if Instant::now() >= down_until {
            break;
        }
    }
    redis.restart();
    // Keep publishing while both nodes recover; each must get ready without client action.
    // Give-up points for a node that never recovers (hang detection, not a speed bound).
    let give_up = Instant::now() + PATIENCE;
    let mut ready = [false, false];
    while ready.contains(&false) {
        assert!(
            Instant::now() < give_up,
            "nodes ready after Redis came back: {ready:?}"
        );
        publish_one(&mut sent);
        for (i, n) in [&n1, &n2].into_iter().enumerate() {
            ready[i] = ready[i] || matches!(http_get(n.addr, "/readyz"), Ok((200, _)));
        }
    }
    // Ready means every link is up; the re-SUBSCRIBE may still be on its way: count from when
    // Redis has both.
    while redis.numsub("load") != 2 {
        assert!(
            Instant::now() < give_up + PATIENCE,
            "nodes never re-subscribed"
        );
        publish_one(&mut sent);
    }
    let after = sent..{
        for _ in 0..PHASE_MESSAGES {
            publish_one(&mut sent);
        }
        sent
    };
    // Every publish is answered (ok or error) within the node's 5 s reply timeout.
    let deadline = Instant::now() + PATIENCE;
    while replies.lock().unwrap().len() < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let replies = replies.lock().unwrap().clone();
    assert_eq!(replies.len(), sent, "some publishes were never answered");
    // The last message was acknowledged after recovery; once both subscribers have it, every
    // earlier delivery (same publisher, same channel: in order) has arrived too.
    let last = sent as u64 - 1;
    assert!(
        replies[&last],
        "the last publish, after recovery, was refused"
    );
    let deadline = Instant::now() + PATIENCE;
    while got.iter().any(|g| !g.lock().unwrap().contains(&last)) {
        assert!(
            Instant::now() < deadline,
            "the last message never reached both nodes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    reader.stop();
    s1.stop();
    s2.stop();

    let errors = replies.values().filter(|ok| !**ok).count();
    assert!(
        errors > 0,
        "publishes while Redis was down must get error replies"
    );
    for (i, got) in got.iter().enumerate() {
        let numbers = got.lock().unwrap().clone();
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
                replies[n],
                "node {} delivered {n}, which was refused",
                i + 1
            );
        }
        let b = before
            .clone()
            .filter(|n| unique.contains(&(*n as u64)))
            .count();
        let a = after
            .clone()
            .filter(|n| unique.contains(&(*n as u64)))
            .count();
        eprintln!(
            "node {}: {} delivered ({b} of {} before the kill, {a} of {} after recovery), {errors} refused",
            i + 1,
            numbers.len(),
            before.len(),
            after.len()
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
        assert_eq!(m.get("fanout_redis_links_up"), 1.0, "one link per node");
        assert_eq!(m.get("fanout_redis_reconnects_total"), 1.0);
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

/// Reads and discards everything, never answering, until the node closes the connection.
fn silent(mut s: std::net::TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < 3 * PATIENCE {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if timed_out(&e) => {}
            Err(_) => return,
        }
    }
}

/// Answers the first command with a valid reply, then sends bytes that are not RESP.
fn garbage(mut s: std::net::TcpStream) {
    let _ = s.set_read_timeout(Some(PATIENCE));
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
/// commands, answer pings. A publish gets an error naming one of `reasons`: each names an event
/// (the link is not up, so "not published"; Redis' answer made no sense), never the 5 s reply
/// timeout, so the node answered because of what happened, not after waiting for a Redis that
/// will not answer.
fn still_serves(server: &Server, reasons: &[&str]) {
    assert_eq!(server.get("/healthz").0, 200);
    let mut json = server.ws_json("/ws");
    json.send_text(r#"{"op":"subscribe","channel":"c","id":1}"#);
    assert_eq!(json.next_text("subscribe reply"), r#"{"op":"ok","id":1}"#);
    json.send_text(r#"{"op":"publish","channel":"c","data":1,"id":2}"#);
    let reply = json.next_text("publish reply");
    assert!(
        reply.contains(r#""op":"error""#)
            && reply.contains("redis unavailable")
            && reasons.iter().any(|r| reply.contains(r))
            && reply.contains(r#""id":2"#),
        "{reply}: expected an error naming one of {reasons:?}"
    );
    json.send(PING, b"p").unwrap();
    assert_eq!(
        json.recv_frame(PATIENCE).unwrap(),
        Frame {
            fin: true,
            rsv1: false,
            opcode: PONG,
            payload: b"p".to_vec()
        }
    );
}

/// The link to a Redis that never answers is never up: publishes are refused, not sent.
const SILENT_REASONS: &[&str] = &["not published"];

/// A "Redis" that accepts but never answers: one connection per node, /readyz stays 503
/// naming redis, clients are served (publishes refused at once), and after the unanswered
/// handshake times out the node connects again.
#[test]
fn redis_that_never_answers_leaves_the_node_serving_and_not_ready() {
    let fake = FakeRedis::start(silent);
    let mut server = Server::start(&["--threads", "2", "--redis", &fake.url()]);
    let start = Instant::now();
    while fake.accepted() < 1 && start.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fake.accepted(), 1, "one link per node");
    for _ in 0..3 {
        let (status, body) = server.get("/readyz");
        assert_eq!(status, 503, "ready without a Redis handshake: {body}");
        assert!(body.contains("redis"), "{body}");
        still_serves(&server, SILENT_REASONS);
    }
    assert_eq!(server.metrics().get("fanout_redis_links_up"), 0.0);
    // The unanswered HELLO times out after 5 s: the node must then try again.
    let deadline = Instant::now() + 5 * SEC + PATIENCE;
    while fake.accepted() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fake.accepted() >= 2,
        "no reconnect after the unanswered handshake"
    );
    assert!(server.alive());
    still_serves(&server, SILENT_REASONS);
}

/// A "Redis" that answers with bytes that are not RESP: the node logs it, drops the link and
/// reconnects again and again (6 attempts awaited), keeps serving clients, and does not crash.
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
    // The node's link reconnects again and again after each bad answer: wait for 3
    // attempts, serving clients all along; only a node that gave up never gets there.
    let start = Instant::now();
    while fake.accepted() < 3 {
        assert!(
            start.elapsed() < PATIENCE,
            "only {} connection attempts in {:?}",
            fake.accepted(),
            start.elapsed()
        );
        // The fake answers the first command, so a publish may go out before the garbage
        // comes: then it is lost with the garbage named as the reason.
        still_serves(&server, &["not published", "unparseable"]);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(server.alive(), "node died; log:\n{}", server.log());
    let log = server.log();
    assert!(log.contains("unparseable"), "the garbage is logged:\n{log}");
    let m = server.metrics();
    assert!(m.get("fanout_redis_reconnects_total") >= 1.0);
}
