//! RFC 6455 torture tests against a real `fanout` process: hand-built frames that break the
//! protocol must earn the documented close code (README "Close codes"), the offender's socket must
//! be gone afterwards, and a witness client on the same reactor (`--threads 1`) must still be
//! served (and /healthz answered) after each one.
//! The legal-but-unusual cases (fragments, interleaved control frames, odd masks, byte-by-byte
//! delivery, frames pipelined behind the upgrade request) must work exactly.

mod ops_support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ops_support::*;

/// `--max-message` for every server here, so the size boundary is cheap to hit.
const MAX_MESSAGE: usize = 1000;

/// A node with one reactor whose witness must survive every violation below.
fn bench() -> Witnessed {
    Witnessed::start(&["--max-message", &MAX_MESSAGE.to_string()])
}

// The checks every case here makes, on top of the shared witness.
impl Witnessed {
    /// Opens an offender, sends `bytes`, expects close `code` and then the socket's end, and
    /// checks the witness. Returns the close reason.
    fn violation(&mut self, name: &str, bytes: &[u8], code: u16) -> String {
        let mut offender = self.server.ws("/ws?channel=offender");
        offender
            .stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("{name}: write: {e}"));
        let (got, reason) = offender
            .recv_close(PATIENCE)
            .unwrap_or_else(|e| panic!("{name}: no close frame: {e}"));
        assert_eq!(got, code, "{name}: close code (reason {reason:?})");
        assert!(
            offender.wait_eof(PATIENCE),
            "{name}: server kept the offender's socket open after closing it"
        );
        self.still_serving(name);
        reason
    }

    /// Every WebSocket except the witness is closed, as the metrics count them.
    fn only_witness_left(&self) {
        let open = self
            .server
            .wait_metric("fanout_connections_open", 1.0, PATIENCE);
        assert_eq!(open, 1.0, "only the witness should be open");
    }
}

#[test]
fn header_violations_close_1002_and_the_reactor_keeps_serving() {
    let mut b = bench();
    let unmasked = [FIN | 0x1, 0x02, b'h', b'i'];
    let reason = b.violation("unmasked frame", &unmasked, 1002);
    assert!(reason.contains("not masked"), "reason {reason:?}");
    for (bit, name) in [(0x40, "RSV1"), (0x20, "RSV2"), (0x10, "RSV3")] {
        let reason = b.violation(name, &raw_frame(FIN | bit | 0x1, b"hi"), 1002);
        assert!(
            reason.contains("reserved bits"),
            "{name}: reason {reason:?}"
        );
    }
    for op in (3..=7).chain(0xB..=0xF) {
        let reason = b.violation(&format!("opcode {op:#x}"), &raw_frame(FIN | op, b"x"), 1002);
        assert!(
            reason.contains("reserved opcode"),
            "{op}: reason {reason:?}"
        );
    }
    for (op, name) in [(0x8, "close"), (0x9, "ping"), (0xA, "pong")] {
        let reason = b.violation(&format!("fragmented {name}"), &raw_frame(op, b"p"), 1002);
        assert!(reason.contains("fragmented control"), "reason {reason:?}");
    }
    let reason = b.violation(
        "ping of 126 bytes",
        &raw_frame(FIN | 0x9, &[b'p'; 126]),
        1002,
    );
    assert!(reason.contains("125"), "reason {reason:?}");
    b.violation(
        "pong of 126 bytes",
        &raw_frame(FIN | 0xA, &[b'p'; 126]),
        1002,
    );
    // 2^63 and 2^64-1: the high bit of a 64-bit length must be zero.
    for len in [1u64 << 63, u64::MAX] {
        let mut head = vec![FIN | 0x2, 0x80 | 127];
        head.extend_from_slice(&len.to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4]);
        let reason = b.violation(&format!("64-bit length {len:#x}"), &head, 1002);
        assert!(reason.contains("high bit"), "reason {reason:?}");
    }
    // The largest legal 64-bit length is refused for its size before any payload arrives.
    let mut head = vec![FIN | 0x2, 0x80 | 127];
    head.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
    head.extend_from_slice(&[1, 2, 3, 4]);
    b.violation("2^63-1 length", &head, 1009);
    b.only_witness_left();
    let m = b.server.metrics();
    assert_eq!(
        m.closed("protocol_error"),
        22.0,
        "each violation counted once"
    );
}

#[test]
fn fragmentation_violations_close_1002() {
    let mut b = bench();
    let reason = b.violation("continuation without start", &raw_frame(FIN, b"x"), 1002);
    assert!(reason.contains("continuation"), "reason {reason:?}");
    let reason = b.violation(
        "unfinished continuation without start",
        &raw_frame(0x0, b"x"),
        1002,
    );
    assert!(reason.contains("continuation"), "reason {reason:?}");
    for (second, name) in [
        (FIN | 0x1, "text"),
        (0x2, "binary"),
        (FIN | 0x2, "final binary"),
    ] {
        let mut bytes = raw_frame(0x1, b"start");
        bytes.extend(raw_frame(second, b"again"));
        let reason = b.violation(&format!("{name} inside a fragmented message"), &bytes, 1002);
        assert!(reason.contains("inside a fragmented"), "reason {reason:?}");
    }
    // A continuation after a finished message is also without a start.
    let mut bytes = raw_frame(0x1, b"a");
    bytes.extend(raw_frame(FIN, b"b"));
    bytes.extend(raw_frame(FIN, b"c"));
    b.violation("continuation after a finished message", &bytes, 1002);
    b.only_witness_left();
}

#[test]
fn utf8_rules_for_text_and_close_reasons() {
    let mut b = bench();
    b.violation(
        "invalid UTF-8 text",
        &raw_frame(FIN | 0x1, &[b'o', b'k', 0xff, 0xfe]),
        1007,
    );
    b.violation(
        "UTF-16 surrogate in text",
        &raw_frame(FIN | 0x1, &[0xed, 0xa0, 0x80]),
        1007,
    );
    b.violation("overlong UTF-8", &raw_frame(FIN | 0x1, &[0xc0, 0xaf]), 1007);
    // Fragments that are fine alone but invalid together: a lead byte, then no continuation.
    let mut split = raw_frame(0x1, &[b'a', 0xe2, 0x82]);
    split.extend(raw_frame(FIN, b"(z"));
    b.violation("invalid UTF-8 across fragments", &split, 1007);
    // And a JSON-mode client is held to the same rule.
    {
        let mut json = b.server.ws_json("/ws");
        json.send(TEXT, &[b'{', 0xff, b'}']).unwrap();
        assert_eq!(json.recv_close(PATIENCE).unwrap().0, 1007);
        assert!(json.wait_eof(PATIENCE));
        b.still_serving("invalid UTF-8 in JSON mode");
    }
    let mut bad_reason = 1000u16.to_be_bytes().to_vec();
    bad_reason.extend_from_slice(&[b'b', 0xff]);
    let reason = b.violation(
        "close reason not UTF-8",
        &raw_frame(FIN | 0x8, &bad_reason),
        1007,
    );
    assert!(reason.contains("UTF-8"), "reason {reason:?}");

    // Valid UTF-8 split in the middle of a code point (a 3-byte euro sign and a 4-byte emoji)
    // is accepted and delivered whole, as one text message.
    let mut ws = b.server.ws("/ws?channel=utf8");
    let whole = "a€b😀c".as_bytes();
    let mut bytes = raw_frame(0x1, &whole[..2]); // "a" + first byte of €
    bytes.extend(raw_frame(0x0, &whole[2..6])); // rest of €, "b", first byte of 😀
    bytes.extend(raw_frame(0x0, &whole[6..8])); // middle of 😀
    bytes.extend(raw_frame(FIN, &whole[8..])); // end of 😀, "c"
    ws.stream.write_all(&bytes).unwrap();
    let got = ws.recv(PATIENCE).expect("reassembled message");
    assert_eq!((got.opcode, got.fin), (TEXT, true));
    assert_eq!(got.payload, whole);
    b.still_serving("split code points");
}

#[test]
fn close_codes_invalid_ones_earn_1002_valid_ones_are_echoed() {
    let mut b = bench();
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        let reason = b.violation(
            &format!("close code {code}"),
            &raw_frame(FIN | 0x8, &code.to_be_bytes()),
            1002,
        );
        assert!(reason.contains("invalid close code"), "{code}: {reason:?}");
    }
    let reason = b.violation("1-byte close body", &raw_frame(FIN | 0x8, &[0x03]), 1002);
    assert!(reason.contains("1-byte"), "reason {reason:?}");
    let protocol_errors = b.server.metrics().closed("protocol_error");
    assert_eq!(protocol_errors, 11.0);

    for code in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4000, 4999] {
        let mut ws = b.server.ws("/ws?channel=closer");
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice("bye ✓".as_bytes());
        ws.send(CLOSE, &body).unwrap();
        let echo = ws.recv(PATIENCE).expect("close echo");
        assert_eq!(echo.opcode, CLOSE);
        assert_eq!(
            echo.close_code().map(|c| c.0),
            Some(code),
            "code {code} echoed"
        );
        assert!(ws.wait_eof(PATIENCE), "socket closed after echoing {code}");
        b.still_serving(&format!("close {code}"));
    }
    // An empty close is answered with an empty close.
    let mut ws = b.server.ws("/ws?channel=closer");
    ws.send(CLOSE, &[]).unwrap();
    let echo = ws.recv(PATIENCE).expect("close echo");
    assert_eq!((echo.opcode, echo.payload.len()), (CLOSE, 0));
    assert!(ws.wait_eof(PATIENCE));
    b.only_witness_left();
    let m = b.server.metrics();
    assert_eq!(m.closed("protocol_error"), protocol_errors);
    assert_eq!(m.closed("client_close"), 10.0);
}

#[test]
fn message_size_limit_is_exact_for_frames_and_fragments() {
    let mut b = bench();
    let mut ws = b.server.ws("/ws?channel=size");
    let exact: Vec<u8> = (0..MAX_MESSAGE).map(|i| (i % 251) as u8).collect();
    ws.send(BINARY, &exact).unwrap();
    let got = ws
        .recv(PATIENCE)
        .expect("a message of exactly --max-message");
    assert_eq!((got.opcode, got.payload.len()), (BINARY, MAX_MESSAGE));
    assert_eq!(got.payload, exact);
    // Exactly the limit in three fragments.
    let mut bytes = raw_frame(0x2, &exact[..400]);
    bytes.extend(raw_frame(0x0, &exact[400..700]));
    bytes.extend(raw_frame(FIN, &exact[700..]));
    ws.stream.write_all(&bytes).unwrap();
    let got = ws.recv(PATIENCE).expect("fragments summing to the limit");
    assert_eq!(got.payload, exact);

    let over = vec![b'x'; MAX_MESSAGE + 1];
    let reason = b.violation("one byte over", &raw_frame(FIN | 0x1, &over), 1009);
    assert!(reason.contains(&MAX_MESSAGE.to_string()), "{reason:?}");
    let mut bytes = raw_frame(0x1, &over[..600]);
    bytes.extend(raw_frame(0x0, &over[600..1000]));
    bytes.extend(raw_frame(FIN, &over[1000..]));
    b.violation("fragments one byte over", &bytes, 1009);
    // The check happens on the header: the oversized payload never needs to arrive.
    let mut head = vec![FIN | 0x2, 0x80 | 126];
    head.extend_from_slice(&((MAX_MESSAGE + 1) as u16).to_be_bytes());
    head.extend_from_slice(&[9, 9, 9, 9]);
    b.violation("oversized header alone", &head, 1009);
    // The sized-checked client is untouched by its neighbours' violations.
    ws.send(TEXT, b"after").unwrap();
    assert_eq!(ws.recv_text(PATIENCE), "after");
}

#[test]
fn ping_pong_and_control_frames_inside_a_fragmented_message() {
    let mut b = bench();
    let mut ws = b.server.ws("/ws?channel=ctl");
    for payload in [&b""[..], b"abc123", &[0xffu8; 125][..]] {
        ws.send(PING, payload).unwrap();
        let pong = ws.recv_frame(PATIENCE).expect("pong");
        assert_eq!((pong.opcode, pong.fin), (PONG, true));
        assert_eq!(pong.payload, payload, "pong echoes the ping payload");
    }
    // text "Hel" + ping + unsolicited pong + "lo" + ping + " world" (final).
    let mut bytes = raw_frame(0x1, b"Hel");
    bytes.extend(raw_frame(FIN | 0x9, b"one"));
    bytes.extend(raw_frame(FIN | 0xA, b"unsolicited"));
    bytes.extend(raw_frame(0x0, b"lo"));
    bytes.extend(raw_frame(FIN | 0x9, b"two"));
    bytes.extend(raw_frame(FIN, b" world"));
    ws.stream.write_all(&bytes).unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let f = ws.recv_frame(PATIENCE).expect("pongs and the message");
        got.push((f.opcode, f.text()));
    }
    assert_eq!(
        got,
        vec![
            (PONG, "one".to_string()),
            (PONG, "two".to_string()),
            (TEXT, "Hello world".to_string())
        ]
    );
    // A binary message in fragments stays binary for every subscriber.
    let mut other = b.server.ws("/ws?channel=ctl");
    let mut bytes = raw_frame(0x2, &[0, 1]);
    bytes.extend(raw_frame(0x0, &[2]));
    bytes.extend(raw_frame(0x0, &[]));
    bytes.extend(raw_frame(FIN, &[3, 255]));
    ws.stream.write_all(&bytes).unwrap();
    for client in [&mut ws, &mut other] {
        let f = client.recv(PATIENCE).expect("fragmented binary");
        assert_eq!(
            (f.opcode, f.fin, f.payload),
            (BINARY, true, vec![0, 1, 2, 3, 255])
        );
    }
    b.still_serving("control frames");
}

#[test]
fn any_mask_is_legal_and_unmasked_with_the_given_key() {
    let mut b = bench();
    let mut ws = b.server.ws("/ws?channel=masks");
    let payload: Vec<u8> = (0..=255u8).collect();
    for mask in [
        [0, 0, 0, 0],
        [0xff, 0xff, 0xff, 0xff],
        [0xde, 0xad, 0xbe, 0xef],
        [1, 0, 0, 0],
    ] {
        // Lengths that end on every offset of the 4-byte key.
        for len in [1, 2, 3, 4, 5, 127, 256] {
            ws.stream
                .write_all(&client_frame_with(FIN | 0x2, &payload[..len], mask))
                .unwrap();
            let got = ws.recv(PATIENCE).expect("message");
            assert_eq!(got.payload, &payload[..len], "mask {mask:x?} len {len}");
        }
    }
    // Each fragment carries its own key.
    let mut bytes = client_frame_with(0x1, b"abc", [1, 2, 3, 4]);
    bytes.extend(client_frame_with(FIN, b"defgh", [0xa0, 0xb0, 0xc0, 0xd0]));
    ws.stream.write_all(&bytes).unwrap();
    assert_eq!(ws.recv_text(PATIENCE), "abcdefgh");
    b.still_serving("masks");
}

#[test]
fn requests_and_frames_split_byte_by_byte_still_parse() {
    let b = bench();
    let mut s = TcpStream::connect(b.server.addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let request = upgrade_request("/ws?channel=slow", &[], "");
    let long: Vec<u8> = (0..300).map(|i| b'a' + (i % 26) as u8).collect();
    let mut frames = raw_frame(FIN | 0x1, &long); // 16-bit length form
    frames.extend(raw_frame(0x2, &[7, 8])); // a fragment...
    frames.extend(raw_frame(FIN | 0x9, b"pp")); // ...a ping in between...
    frames.extend(raw_frame(FIN, &[9])); // ...and the end
    let started = Instant::now();
    for byte in request.iter().chain(frames.iter()) {
        s.write_all(&[*byte]).unwrap();
        // A pause between bytes so the server really sees many separate reads (for at most 3 s,
        // which bounds the test's length, not what it asserts).
        if started.elapsed() < 3 * SEC {
            std::thread::sleep(Duration::from_micros(300));
        }
    }
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mut ws = Ws::from_stream(s);
    let (mut pongs, mut data) = (Vec::new(), Vec::new());
    while pongs.len() + data.len() < 3 {
        let f = ws.recv_frame(PATIENCE).expect("pong and two messages");
        match f.opcode {
            PONG => pongs.push(f.payload),
            _ => data.push((f.opcode, f.payload)),
        }
    }
    // A pong may overtake a delivery parsed in the same read; the messages keep their order.
    assert_eq!(pongs, vec![b"pp".to_vec()]);
    assert_eq!(data, vec![(TEXT, long), (BINARY, vec![7, 8, 9])]);
}

/// Writes an upgrade request and `extra` in one write; returns the client after the 101 head.
fn upgrade_with_pipelined(server: &Server, extra: &[u8]) -> Ws {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut bytes = upgrade_request("/ws?channel=pipe", &[], "");
    bytes.extend_from_slice(extra);
    s.write_all(&bytes).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    Ws::from_stream(s)
}

#[test]
fn bytes_pipelined_after_the_upgrade_request_are_websocket_frames() {
    let mut b = bench();
    // Valid frames in the same packet as the request are served.
    let mut frames = raw_frame(FIN | 0x1, b"early bird");
    frames.extend(raw_frame(FIN | 0x9, b"!"));
    let mut ws = upgrade_with_pipelined(&b.server, &frames);
    // The pong is queued while parsing, the delivery after: their order is not specified.
    let mut got: Vec<_> = (0..2)
        .map(|_| {
            let f = ws.recv_frame(PATIENCE).unwrap();
            (f.opcode, f.text())
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![(TEXT, "early bird".to_string()), (PONG, "!".to_string())]
    );
    drop(ws);
    // Junk (here: a second HTTP request) is read as frames and refused with 1002.
    let mut ws = upgrade_with_pipelined(&b.server, b"GET / HTTP/1.1\r\n\r\n");
    let (code, _) = ws.recv_close(PATIENCE).expect("close for junk");
    assert_eq!(code, 1002);
    assert!(ws.wait_eof(PATIENCE));
    let mut ws = upgrade_with_pipelined(&b.server, &[0xff; 32]);
    assert_eq!(ws.recv_close(PATIENCE).expect("close for junk").0, 1002);
    assert!(ws.wait_eof(PATIENCE));
    b.still_serving("pipelined junk");
    b.only_witness_left();
}
