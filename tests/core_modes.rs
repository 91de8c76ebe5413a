//! The server core end to end, against a real `fanout` process over real sockets: raw mode and
//! the `fanout.json` protocol (replies, ids, payload conversion between the modes, errors,
//! limits), delivery across several reactors and many channels (every message exactly once, only
//! to its own channel), a slow consumer cut off with bounded memory while the others get
//! everything, SIGTERM's close 1001, and configuration errors and `--help`.

mod ops_support;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ops_support::*;
use serde_json::{json, Value};

/// Sends one command and checks the error reply: its id and a phrase of its message.
fn expect_error(ws: &mut Ws, command: &[u8], id: Option<Value>, phrase: &str) {
    ws.send(TEXT, command).unwrap();
    let reply = ws.next_json("error reply");
    assert_eq!(
        reply["op"],
        "error",
        "{}: {reply}",
        String::from_utf8_lossy(command)
    );
    assert_eq!(reply.get("id").cloned(), id, "id echoed in {reply}");
    let message = reply["error"].as_str().expect("error is a string");
    assert!(
        message.contains(phrase),
        "{}: error {message:?} should mention {phrase:?}",
        String::from_utf8_lossy(command)
    );
}

#[test]
fn raw_mode_publishes_verbatim_to_its_own_channel_only() {
    // One reactor, so "nothing leaked" can be checked by ordering against a later marker.
    let server = Server::start(&["--threads", "1"]);
    let mut a = server.ws("/ws?channel=room");
    let mut b = server.ws("/ws?channel=room");
    let mut other = server.ws("/ws?channel=other");
    let mut chat_default = server.ws("/ws");
    let mut chat_named = server.ws("/ws?channel=chat");

    // Each round is received before the next sender starts: the order between two
    // publishers is only defined by time.
    a.send_text("hello");
    for (ws, who) in [(&mut a, "a"), (&mut b, "b")] {
        assert_eq!(ws.next_data(who), (TEXT, b"hello".to_vec()));
    }
    let binary = [0u8, 1, 0x7f, 0xfe, 0xff];
    b.send(BINARY, &binary).unwrap();
    for (ws, who) in [(&mut a, "a"), (&mut b, "b")] {
        assert_eq!(
            ws.next_data(who),
            (BINARY, binary.to_vec()),
            "binary stays binary"
        );
    }
    // A raw client cannot address another channel: JSON-looking text is just a payload.
    let looks_like_a_command = r#"{"op":"publish","channel":"other","data":"x"}"#;
    a.send_text(looks_like_a_command);
    a.send(TEXT, b"").unwrap();
    for (ws, who) in [(&mut a, "a"), (&mut b, "b")] {
        assert_eq!(
            ws.next_data(who),
            (TEXT, looks_like_a_command.as_bytes().to_vec())
        );
        assert_eq!(ws.next_data(who), (TEXT, Vec::new()), "empty message");
    }
    chat_default.send_text("in chat");
    for (ws, who) in [(&mut chat_default, "default"), (&mut chat_named, "chat")] {
        assert_eq!(
            ws.next_text(who),
            "in chat",
            "no ?channel= means channel chat"
        );
    }
    // Everything above was handled before these markers: a leak would arrive first.
    other.send_text("marker");
    assert_eq!(other.next_text("other"), "marker");
    chat_named.send_text("chat marker");
    assert_eq!(chat_default.next_text("default"), "chat marker");
    assert_eq!(chat_named.next_text("chat"), "chat marker");
    a.send_text("room marker");
    assert_eq!(b.next_text("b"), "room marker");
    let m = server.metrics();
    assert_eq!(m.get("fanout_publishes_total"), 8.0);
    assert_eq!(
        m.get("fanout_deliveries_total"),
        (4 * 2 + 2 + 1 + 2 + 2) as f64,
        "no delivery outside the publisher's channel"
    );
}

#[test]
fn json_mode_commands_replies_and_payload_rules() {
    let server = Server::start(&["--threads", "1", "--max-subscriptions", "3"]);
    // The subprotocol is echoed when offered (among others), and only then.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let (status, head, _) = handshake(&mut s, "/ws", Some("chat, fanout.json")).unwrap();
    assert_eq!(status, 101, "{head}");
    assert!(
        head.contains("\r\nSec-WebSocket-Protocol: fanout.json\r\n"),
        "{head}"
    );
    let mut j = Ws::from_stream(s);
    let mut s = TcpStream::connect(server.addr).unwrap();
    let (status, head, _) = handshake(&mut s, "/ws?channel=proto", Some("chat")).unwrap();
    assert_eq!(status, 101, "{head}");
    assert!(!head.contains("Sec-WebSocket-Protocol"), "{head}");
    let mut not_json = Ws::from_stream(s);
    not_json.send_text(r#"{"op":"subscribe","channel":"news"}"#);
    assert_eq!(
        not_json.next_text("raw"),
        r#"{"op":"subscribe","channel":"news"}"#,
        "without fanout.json a command is just a raw message"
    );

    // Ids of any JSON type come back verbatim, byte for byte.
    j.send_text(r#"{"op":"subscribe","channel":"news","id":1}"#);
    assert_eq!(j.next_text("j"), r#"{"op":"ok","id":1}"#);
    j.send_text(r#"{"id":"s-2","op":"subscribe","channel":"news"}"#);
    assert_eq!(j.next_text("j"), r#"{"op":"ok","id":"s-2"}"#);
    j.send_text(r#"{"op":"unsubscribe","channel":"never-joined","id":{"k": [1, 2.50, "x"]}}"#);
    assert_eq!(
        j.next_text("j"),
        r#"{"op":"ok","id":{"k": [1, 2.50, "x"]}}"#
    );
    j.send_text(r#"{"op":"subscribe","channel":"side"}"#);
    assert_eq!(j.next_text("j"), r#"{"op":"ok"}"#);
    j.send_text(r#"{"op":"unsubscribe","channel":"x","id":null}"#);
    assert_eq!(j.next_text("j"), r#"{"op":"ok","id":null}"#);

    let mut raw = server.ws("/ws?channel=news");
    // ?channel= on a JSON connection subscribes at once, without a reply.
    let mut j2 = server.ws_json("/ws?channel=news");
    let mut p = server.ws_json("/ws");

    // JSON data is published as its JSON text, verbatim (spacing included).
    p.send_text(r#"{"op":"publish","channel":"news","data":{"any": "JSON value"},"id":3}"#);
    assert_eq!(p.next_text("p"), r#"{"op":"ok","id":3}"#);
    let delivery = r#"{"op":"message","channel":"news","data":{"any": "JSON value"}}"#;
    assert_eq!(j.next_text("j"), delivery);
    assert_eq!(j2.next_text("j2"), delivery);
    assert_eq!(raw.next_text("raw"), r#"{"any": "JSON value"}"#);
    // A string publishes its bytes: raw sees them unquoted and unescaped.
    p.send_text(r#"{"op":"publish","channel":"news","data":"hello","id":4}"#);
    assert_eq!(p.next_text("p"), r#"{"op":"ok","id":4}"#);
    assert_eq!(raw.next_text("raw"), "hello");
    let hello = r#"{"op":"message","channel":"news","data":"hello"}"#;
    assert_eq!(j.next_text("j"), hello);
    p.send_text(r#"{"op":"publish","channel":"news","data":"h\u00e9 \"q\""}"#);
    assert_eq!(p.next_text("p"), r#"{"op":"ok"}"#);
    assert_eq!(raw.next_text("raw"), "hé \"q\"");
    assert_eq!(
        j.next_json("j"),
        json!({"op":"message","channel":"news","data":"hé \"q\""})
    );
    p.send_text(r#"{"op":"publish","channel":"news","data":42}"#);
    assert_eq!(p.next_text("p"), r#"{"op":"ok"}"#);
    assert_eq!(raw.next_text("raw"), "42");
    assert_eq!(
        j.next_text("j"),
        r#"{"op":"message","channel":"news","data":42}"#
    );

    p.send_text(r#"{"op":"publish","channel":"news","data":null,"id":null}"#);
    assert_eq!(p.next_text("p"), r#"{"op":"ok","id":null}"#);
    assert_eq!(raw.next_text("raw"), "null");
    assert_eq!(
        j.next_text("j"),
        r#"{"op":"message","channel":"news","data":null}"#
    );

    // Raw publishes as JSON subscribers see them.
    raw.send_text("hello");
    assert_eq!(j.next_text("j"), hello, "raw hello == JSON \"hello\"");
    raw.send_text(r#"[1, {"b":null}]"#);
    assert_eq!(
        j.next_text("j"),
        r#"{"op":"message","channel":"news","data":[1, {"b":null}]}"#
    );
    raw.send(BINARY, &[0xff, 0x00, 0x10]).unwrap();
    assert_eq!(
        j.next_text("j"),
        r#"{"op":"message","channel":"news","data":"/wAQ","encoding":"base64"}"#
    );
    raw.send(BINARY, b"plain").unwrap();
    assert_eq!(
        j.next_text("j"),
        r#"{"op":"message","channel":"news","data":"plain"}"#
    );
    for want in [
        (TEXT, b"hello".to_vec()),
        (TEXT, br#"[1, {"b":null}]"#.to_vec()),
        (BINARY, vec![0xff, 0x00, 0x10]),
        (BINARY, b"plain".to_vec()),
    ] {
        assert_eq!(
            raw.next_data("raw"),
            want,
            "raw subscriber keeps text/binary"
        );
    }
    for _ in 0..8 {
        j2.next_json("j2");
    }

    // Errors: a reply that says what is wrong; the connection stays open.
    expect_error(
        &mut p,
        br#"{"op":"jump","id":7}"#,
        Some(json!(7)),
        "unknown op",
    );
    expect_error(
        &mut p,
        br#"{"channel":"news","id":8}"#,
        Some(json!(8)),
        "missing \"op\"",
    );
    expect_error(
        &mut p,
        br#"{"op":"subscribe","id":"nine"}"#,
        Some(json!("nine")),
        "needs a \"channel\"",
    );
    expect_error(
        &mut p,
        br#"{"op":"publish","channel":"news","id":10}"#,
        Some(json!(10)),
        "needs \"data\"",
    );
    expect_error(
        &mut p,
        br#"{"op":"subscribe","channel":"a b","id":11}"#,
        Some(json!(11)),
        "channel name",
    );
    let long = format!(
        r#"{{"op":"subscribe","channel":"{}","id":12}}"#,
        "c".repeat(129)
    );
    expect_error(&mut p, long.as_bytes(), Some(json!(12)), "limit is 128");
    expect_error(
        &mut p,
        br#"{"op":"unsubscribe","channel":"","id":13}"#,
        Some(json!(13)),
        "empty",
    );
    expect_error(
        &mut p,
        br#"{"op":"publish","channel":"n/a","data":1,"id":14}"#,
        Some(json!(14)),
        "channel name",
    );
    expect_error(
        &mut p,
        br#"{"op":"publish","channel":5,"data":1,"id":[14]}"#,
        Some(json!([14])),
        "invalid command",
    );
    expect_error(&mut p, b"not json", None, "invalid command");
    expect_error(&mut p, b"[1,2]", None, "invalid command");
    expect_error(&mut p, b"", None, "invalid command");
    p.send(BINARY, br#"{"op":"subscribe","channel":"news"}"#)
        .unwrap();
    let reply = p.next_json("p");
    assert_eq!(reply["op"], "error");
    assert!(
        reply["error"].as_str().unwrap().contains("binary"),
        "{reply}"
    );
    // Nothing was published or subscribed by the failed commands.
    p.send_text(r#"{"op":"publish","channel":"news","data":"still here","id":15}"#);
    assert_eq!(p.next_text("p"), r#"{"op":"ok","id":15}"#);
    assert_eq!(raw.next_text("raw"), "still here");
    assert_eq!(
        j.next_text("j"),
        r#"{"op":"message","channel":"news","data":"still here"}"#
    );

    // After unsubscribe, no more deliveries: the next thing j sees is a later publish elsewhere.
    j.send_text(r#"{"op":"unsubscribe","channel":"news","id":16}"#);
    assert_eq!(j.next_text("j"), r#"{"op":"ok","id":16}"#);
    p.send_text(r#"{"op":"publish","channel":"news","data":"gone"}"#);
    p.send_text(r#"{"op":"publish","channel":"side","data":"marker"}"#);
    assert_eq!(raw.next_text("raw"), "gone");
    assert_eq!(
        j.next_text("j"),
        r#"{"op":"message","channel":"side","data":"marker"}"#
    );

    // --max-subscriptions 3: j holds side; a and b fill it; c is refused until one is left.
    for (ch, id) in [("a", 17), ("b", 18)] {
        j.send_text(&format!(
            r#"{{"op":"subscribe","channel":"{ch}","id":{id}}}"#
        ));
        assert_eq!(j.next_text("j"), format!(r#"{{"op":"ok","id":{id}}}"#));
    }
    expect_error(
        &mut j,
        br#"{"op":"subscribe","channel":"c","id":19}"#,
        Some(json!(19)),
        "subscription limit",
    );
    j.send_text(r#"{"op":"subscribe","channel":"a","id":20}"#);
    assert_eq!(
        j.next_text("j"),
        r#"{"op":"ok","id":20}"#,
        "re-subscribing is not a new channel"
    );
    j.send_text(r#"{"op":"unsubscribe","channel":"a","id":21}"#);
    assert_eq!(j.next_text("j"), r#"{"op":"ok","id":21}"#);
    j.send_text(r#"{"op":"subscribe","channel":"c","id":22}"#);
    assert_eq!(j.next_text("j"), r#"{"op":"ok","id":22}"#);
    p.send_text(r#"{"op":"publish","channel":"c","data":"to c"}"#);
    assert_eq!(
        j.next_text("j"),
        r#"{"op":"message","channel":"c","data":"to c"}"#
    );
    let m = server.metrics();
    assert_eq!(
        m.get("fanout_connections_open"),
        5.0,
        "errors closed no connection"
    );
    assert_eq!(m.closed("protocol_error"), 0.0);
}

/// Messages each client received, grouped by publisher: publisher -> sequence numbers.
type Received = BTreeMap<usize, Vec<usize>>;

#[test]
fn several_reactors_deliver_every_message_exactly_once() {
    const CLIENTS: usize = 40;
    const EACH: usize = 5;
    let server = Server::start(&["--threads", "4"]);
    // Every fourth client speaks JSON, so envelopes are built on every reactor too.
    let is_json = |i: usize| i % 4 == 0;
    let mut clients: Vec<Ws> = (0..CLIENTS)
        .map(|i| {
            if is_json(i) {
                server.ws_json("/ws?channel=all")
            } else {
                server.ws("/ws?channel=all")
            }
        })
        .collect();
    assert_eq!(
        server.wait_metric("fanout_connections_open", CLIENTS as f64, PATIENCE),
        CLIENTS as f64
    );
    // The channel gauge counts the channel once per reactor that has a subscriber to it.
    let reactors_used = server.metrics().get("fanout_channels");
    assert!(
        reactors_used >= 2.0,
        "{CLIENTS} connections all landed on one of 4 reactors ({reactors_used})"
    );
    for k in 0..EACH {
        for (i, ws) in clients.iter_mut().enumerate() {
            let payload = format!("m{i}-{k}");
            if is_json(i) {
                ws.send_text(&format!(
                    r#"{{"op":"publish","channel":"all","data":"{payload}","id":{k}}}"#
                ));
            } else {
                ws.send_text(&payload);
            }
        }
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        let who = format!("client {i}");
        let mut got = Received::new();
        let mut oks = 0;
        while got.values().map(Vec::len).sum::<usize>() < CLIENTS * EACH {
            let t = ws.next_text(&who);
            let payload = if is_json(i) {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["op"] == "ok" {
                    oks += 1;
                    continue;
                }
                assert_eq!(v["op"], "message", "{who}: {t}");
                assert_eq!(v["channel"], "all");
                v["data"].as_str().unwrap().to_string()
            } else {
                t
            };
            let (from, seq) = payload
                .strip_prefix('m')
                .and_then(|p| p.split_once('-'))
                .unwrap_or_else(|| panic!("{who}: unexpected payload {payload:?}"));
            got.entry(from.parse().unwrap())
                .or_default()
                .push(seq.parse().unwrap());
        }
        assert_eq!(got.len(), CLIENTS, "{who}: heard from every client");
        for (from, seqs) in &got {
            assert_eq!(
                seqs,
                &(0..EACH).collect::<Vec<_>>(),
                "{who}: messages of client {from} exactly once and in order"
            );
        }
        if is_json(i) {
            while oks < EACH {
                assert_eq!(ws.next_json(&who)["op"], "ok");
                oks += 1;
            }
        }
    }
    let m = server.metrics();
    assert_eq!(m.get("fanout_publishes_total"), (CLIENTS * EACH) as f64);
    assert_eq!(
        m.get("fanout_deliveries_total"),
        (CLIENTS * CLIENTS * EACH) as f64,
        "no duplicate deliveries"
    );
}

#[test]
fn many_channels_keep_their_messages_to_themselves() {
    const CHANNELS: usize = 200;
    const SUBS: usize = 3;
    let server = Server::start(&["--threads", "2"]);
    let mut subs: Vec<Vec<Ws>> = (0..CHANNELS)
        .map(|c| {
            (0..SUBS)
                .map(|_| server.ws(&format!("/ws?channel=ch.{c}")))
                .collect()
        })
        .collect();
    assert_eq!(
        server.wait_metric(
            "fanout_connections_open",
            (CHANNELS * SUBS) as f64,
            PATIENCE
        ),
        (CHANNELS * SUBS) as f64
    );
    // Two rounds, a different publisher in each channel per round.
    for round in 0..2 {
        for (c, group) in subs.iter_mut().enumerate() {
            group[round].send_text(&format!("round {round} channel {c}"));
        }
        for (c, group) in subs.iter_mut().enumerate() {
            for (s, ws) in group.iter_mut().enumerate() {
                assert_eq!(
                    ws.next_text(&format!("channel {c} subscriber {s}")),
                    format!("round {round} channel {c}")
                );
            }
        }
    }
    let m = server.metrics();
    assert_eq!(m.get("fanout_publishes_total"), (2 * CHANNELS) as f64);
    assert_eq!(
        m.get("fanout_deliveries_total"),
        (2 * CHANNELS * SUBS) as f64,
        "a delivery outside a channel would be counted here"
    );
}

const FLOOD: usize = 8000;
const FLOOD_SIZE: usize = 4096;

/// A flood message: its sequence number, padded.
fn flood_message(seq: usize) -> Vec<u8> {
    let mut m = format!("{seq:08}").into_bytes();
    m.resize(FLOOD_SIZE, b'.');
    m
}

/// Reads until `FLOOD` messages arrived (checking they come in order), publishing its progress.
fn read_flood(mut ws: Ws, progress: Arc<AtomicUsize>) -> io::Result<(usize, Ws)> {
    let mut seq = 0;
    while seq < FLOOD {
        let f = ws.recv(PATIENCE)?;
        if f.opcode == CLOSE {
            panic!(
                "a fast reader was closed at message {seq}: {:?}",
                f.close_code()
            );
        }
        assert_eq!(f.opcode, TEXT, "{f:?}");
        assert_eq!(f.payload, flood_message(seq), "message {seq}");
        seq += 1;
        progress.store(seq, Ordering::Release);
    }
    Ok((seq, ws))
}

/// How far the publisher may run ahead of the slowest fast reader, in messages: well under
/// --max-queue, so a reader descheduled on a busy machine is never mistaken for a slow consumer.
const WINDOW: usize = 32;

#[test]
fn a_slow_consumer_is_closed_others_get_everything_memory_stays_bounded() {
    // The queue limit must hold what one read turn can queue (a few 64 KiB reads of the
    // publisher), or fast readers would be cut too; it is still half the default.
    let server = Server::start(&[
        "--threads",
        "1",
        "--max-queue",
        "524288",
        "--max-message",
        "8192",
    ]);
    let slow = tiny_buffer_client(server.addr, "/ws?channel=flood", None);
    let progress: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let mut readers: Vec<_> = progress[..2]
        .iter()
        .map(|p| {
            let ws = server.ws("/ws?channel=flood");
            let p = p.clone();
            std::thread::spawn(move || read_flood(ws, p))
        })
        .collect();
    let publisher = server.ws("/ws?channel=flood");
    let mut writer = publisher.stream.try_clone().unwrap();
    let own = {
        let p = progress[2].clone();
        std::thread::spawn(move || read_flood(publisher, p))
    };
    readers.push(own);
    assert_eq!(
        server.wait_metric("fanout_connections_open", 4.0, PATIENCE),
        4.0
    );
    let rss_before = rss_kib(server.pid());
    let mut peak = rss_before;
    let deadline = Instant::now() + 60 * SEC;
    for seq in 0..FLOOD {
        while progress
            .iter()
            .any(|p| p.load(Ordering::Acquire) + WINDOW < seq)
        {
            if let Some(gone) = readers.iter().position(|r| r.is_finished()) {
                let ended = readers.remove(gone).join().map(|r| r.map(|(n, _)| n));
                panic!("fast reader {gone} stopped early; it ended with {ended:?}");
            }
            let behind: Vec<usize> = progress.iter().map(|p| p.load(Ordering::Acquire)).collect();
            assert!(
                Instant::now() < deadline,
                "fast readers stalled before {seq}: they are at {behind:?}; server log:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        writer
            .write_all(&client_frame(TEXT, &flood_message(seq)))
            .expect("publisher write");
        if seq % 500 == 0 {
            peak = peak.max(rss_kib(server.pid()));
        }
    }
    let (mut counts, mut fast) = (Vec::new(), Vec::new());
    for r in readers {
        let (count, ws) = r.join().unwrap().expect("fast reader");
        counts.push(count);
        fast.push(ws);
    }
    peak = peak.max(rss_kib(server.pid()));
    assert_eq!(
        counts,
        vec![FLOOD; 3],
        "every fast subscriber got every message"
    );
    let flood_kib = (FLOOD * FLOOD_SIZE / 1024) as u64;
    eprintln!("server RSS {rss_before} KiB before, peak {peak} KiB during a {flood_kib} KiB flood");
    assert!(
        peak - rss_before < flood_kib / 2,
        "server RSS grew {} KiB during a {flood_kib} KiB flood: the slow consumer's backlog is not bounded",
        peak - rss_before
    );
    let m = server.metrics();
    assert_eq!(m.closed("slow_consumer"), 1.0);
    assert_eq!(m.get("fanout_connections_open"), 3.0);
    // What the slow client finds when it reads at last: whole messages in order, then a close
    // 1008 "slow consumer" (if it fit in the socket) and the end of the stream.
    let mut slow = slow;
    let mut seq = 0;
    let mut close = None;
    let give_up = Instant::now() + 3 * PATIENCE;
    loop {
        assert!(Instant::now() < give_up, "slow client's stream never ended");
        match slow.recv(PATIENCE) {
            Ok(f) if f.opcode == CLOSE => {
                close = f.close_code();
                break;
            }
            Ok(f) => {
                assert_eq!(
                    (f.opcode, &f.payload),
                    (TEXT, &flood_message(seq)),
                    "slow client's message {seq} is whole and in order"
                );
                seq += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => panic!("slow client still open"),
            Err(_) => break,
        }
    }
    assert!(seq < FLOOD, "the slow client was cut before the end");
    if let Some((code, reason)) = close {
        assert_eq!((code, reason.as_str()), (1008, "slow consumer"));
    }
    assert!(slow.wait_eof(PATIENCE), "slow client's socket closed");
    // The fast subscribers stayed open until here.
    drop(fast);
}

/// SIGTERM closes raw, JSON and mute clients with 1001 "server shutting down", drops a client
/// still sending its HTTP request, and the process exits 0 even though one client never answers
/// its close; afterwards nothing listens. No bound on how long that takes: only that it ends.
#[test]
fn sigterm_closes_every_client_with_1001_and_exits_zero() {
    let mut server = Server::start(&[
        "--threads",
        "2",
        "--drain-delay",
        "0.2",
        "--drain-time",
        "0.3",
    ]);
    let mut raw = server.ws("/ws?channel=bye");
    let mut json = server.ws_json("/ws?channel=bye");
    // Never answers the close: the server must not wait for it forever.
    let mut mute = server.ws("/ws?channel=bye");
    // Mid-way through its HTTP request when the drain comes.
    let mut half = TcpStream::connect(server.addr).unwrap();
    half.write_all(b"GET /ws?channel=bye HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    assert_eq!(
        server.wait_metric("fanout_connections_open", 3.0, PATIENCE),
        3.0
    );
    server.signal("TERM");
    for (ws, who) in [(&mut raw, "raw"), (&mut json, "json"), (&mut mute, "mute")] {
        let (code, reason) = ws
            .recv_close(PATIENCE)
            .unwrap_or_else(|e| panic!("{who}: no close: {e}"));
        assert_eq!(
            (code, reason.as_str()),
            (1001, "server shutting down"),
            "{who}"
        );
    }
    for ws in [&mut raw, &mut json] {
        ws.send_close(1001).unwrap();
        assert!(ws.wait_eof(PATIENCE), "socket closed after the handshake");
    }
    let mut half_ws = Ws::from_stream(half.try_clone().unwrap());
    assert!(
        half_ws.wait_eof(PATIENCE),
        "half request dropped by the drain"
    );
    // The mute client never answers the close: the node must give up on it (after the 2 s a
    // closing client gets) and exit rather than wait for it. How soon depends on the machine,
    // so what is asserted is that it exits, with 0, and everyone was closed first.
    let status = server
        .wait_exit(PATIENCE)
        .expect("process exits after the drain, mute client or not");
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    assert!(
        TcpStream::connect(server.addr).is_err(),
        "nothing listens after exit"
    );
    assert!(mute.wait_eof(PATIENCE), "mute client's socket is gone");
    let log = server.log();
    assert!(log.contains("drained; exiting"), "{log}");
}

/// Flags, environment, and the option the error message must name.
type BadConfig<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_configuration_exits_2_naming_the_option() {
    let cases: &[BadConfig] = &[
        (&["--max-message", "abc"], &[], "--max-message"),
        (&["--max-message", "1"], &[], "--max-message"),
        (&["--threads", "0"], &[], "--threads"),
        (&["--threads", "many"], &[], "--threads"),
        (&["--listen", "nonsense"], &[], "--listen"),
        (&["--redis", "ftp://x"], &[], "--redis"),
        (&["--redis", "redis://host:notaport"], &[], "--redis"),
        (
            &["--max-queue", "2000", "--max-message", "4000"],
            &[],
            "--max-queue",
        ),
        (&["--ping-interval=-1"], &[], "--ping-interval"),
        (&["--idle-timeout", "soon"], &[], "--idle-timeout"),
        (&["--drain-time", "NaN"], &[], "--drain-time"),
        (&["--max-message-rate=-5"], &[], "--max-message-rate"),
        (&["--log-level", "loud"], &[], "--log-level"),
        (&["--no-such-flag"], &[], "--no-such-flag"),
        (&[], &[("FANOUT_MAX_MESSAGE", "abc")], "--max-message"),
        (&[], &[("FANOUT_THREADS", "0")], "--threads"),
    ];
    for (args, env, option) in cases {
        let mut all = args.to_vec();
        if !args.contains(&"--listen") {
            // Should a bad value be accepted, the node must not grab a real port.
            all.extend(["--listen", "127.0.0.1:0"]);
        }
        let (code, stdout, stderr) = run_to_exit(&all, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: stderr {stderr:?}");
        assert!(
            stderr.contains(option),
            "{args:?} {env:?}: message must name {option}: {stderr:?}"
        );
        assert!(
            !stdout.contains("listening on"),
            "{args:?}: started anyway: {stdout}"
        );
    }
}

#[test]
fn help_lists_every_option_with_its_environment_variable() {
    let (code, stdout, _) = run_to_exit(&["--help"], &[]);
    assert_eq!(code, Some(0));
    // Clap prints one block per option, each starting with its flag.
    let blocks: Vec<&str> = stdout.split("\n      --").skip(1).collect();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut documented = 0;
    for row in readme.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let flag = cells[1]
            .trim_matches('`')
            .split_whitespace()
            .next()
            .unwrap()
            .trim_start_matches("--");
        let env = cells[2].trim_matches('`');
        let block = blocks
            .iter()
            .find(|b| b.starts_with(&format!("{flag} ")))
            .unwrap_or_else(|| panic!("--help does not list --{flag}:\n{stdout}"));
        assert!(
            // A secret's value is hidden: `[env: NAME]` without `=value`.
            block.contains(&format!("[env: {env}=")) || block.contains(&format!("[env: {env}]")),
            "--help entry for --{flag} lacks {env}: {block}"
        );
        documented += 1;
    }
    assert_eq!(documented, 30, "README documents 30 options");
    assert_eq!(
        blocks.len(),
        30,
        "--help lists an option the README does not: {stdout}"
    );
}

/// A burst bigger than `--max-queue` arriving in one read turn must not cut a reader whose
/// socket can take it: the server writes what the reader's socket takes before calling anyone
/// slow. The reader's receive buffer (4 MiB asked) holds most of the burst, so the outcome does
/// not depend on the reader thread being scheduled during the burst on a busy machine: a server
/// that queued the whole read turn before writing would cut it whatever the reader does.
#[test]
fn a_reader_that_keeps_up_survives_a_burst_larger_than_its_queue() {
    const MESSAGES: usize = 1000;
    const SIZE: usize = 512;
    let server = Server::start(&["--threads", "1", "--max-queue", "65536"]);
    let mut reader = client_with_recv_buffer(server.addr, "/ws?channel=burst", None, 4 << 20);
    let receiving = std::thread::spawn(move || {
        for i in 0..MESSAGES {
            let f = reader
                .recv(PATIENCE)
                .unwrap_or_else(|e| panic!("message {i} of {MESSAGES}: {e}"));
            assert_eq!(f.opcode, TEXT, "message {i}: {f:?}");
            assert_eq!(f.payload.len(), SIZE, "message {i}");
            assert_eq!(&f.payload[..6], format!("{i:06}").as_bytes(), "message {i}");
        }
    });
    // The publisher is a JSON client that is not subscribed, so its own queue holds only replies;
    // all publishes go out in one write, so one server read turn holds far more than 64 KiB.
    let mut publisher = server.ws_json("/ws");
    let mut burst = Vec::new();
    for i in 0..MESSAGES {
        let data = format!("{i:06}{}", "x".repeat(SIZE - 6));
        let command = format!(r#"{{"op":"publish","channel":"burst","data":"{data}"}}"#);
        burst.extend_from_slice(&client_frame(0x1, command.as_bytes()));
    }
    publisher.stream.write_all(&burst).unwrap();
    receiving.join().expect("the reader got every message");
    assert_eq!(
        server
            .metrics()
            .get(r#"fanout_connections_closed_total{reason="slow_consumer"}"#),
        0.0
    );
}
