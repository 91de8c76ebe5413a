//! Hostile and malformed input on the HTTP side of a real `fanout` process: truncated and
//! oversized requests, every bad upgrade the README's HTTP error table lists (exact statuses),
//! origin checks, the per-connection message rate limit, channel-name limits, and the absence of
//! any way to address another channel or client. After every hostile request the node must still
//! answer /healthz and an already open WebSocket must still be served.

mod ops_support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use ops_support::*;

/// Sends `request` and reads the whole response (the server closes after it).
fn send_raw(addr: SocketAddr, request: &[u8]) -> HttpReply {
    exchange(addr, request).unwrap_or_else(|e| {
        panic!(
            "reading the response to {:?}: {e}",
            String::from_utf8_lossy(&request[..request.len().min(80)])
        )
    })
}

// The check every hostile request here gets, on top of the shared witness.
impl Witnessed {
    /// Sends `request`, expects `status` and a body containing `phrase`.
    fn expect(&mut self, name: &str, request: &[u8], status: u16, phrase: &str) -> HttpReply {
        let reply = send_raw(self.server.addr, request);
        assert_eq!(reply.status, status, "{name}: {reply:?}");
        assert!(
            reply.body.contains(phrase),
            "{name}: body {:?} should say {phrase:?}",
            reply.body
        );
        assert!(
            reply.head.contains("\r\nConnection: close"),
            "{name}: HTTP responses close the connection: {}",
            reply.head
        );
        self.still_serving(name);
        reply
    }
}

#[test]
fn truncated_and_oversized_requests() {
    let mut f = Witnessed::start(&[]);
    // Half a request, then the client goes away: dropped without an answer, nothing breaks.
    for partial in [
        &b"GET /ws?channel=x HTTP/1.1\r\nHost: t\r\nUpgr"[..],
        b"G",
        b"GET /healthz HTTP/1.1\r\n",
    ] {
        let mut s = TcpStream::connect(f.server.addr).unwrap();
        s.write_all(partial).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            rest.is_empty() || rest.starts_with(b"HTTP/1.1 400"),
            "a truncated request gets no answer or a 400: {:?}",
            String::from_utf8_lossy(&rest)
        );
        f.still_serving("truncated request");
    }
    // A truncated request over a connection that is simply dropped (no FIN first).
    {
        let mut s = TcpStream::connect(f.server.addr).unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nX-Long: aaaa")
            .unwrap();
    }
    f.still_serving("dropped mid-request");

    // The 8 KiB head limit, at the boundary: exactly 8192 bytes is served, one more is 431.
    let head_of = |len: usize| {
        let start = "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: ";
        let pad = len - start.len() - 4;
        format!("{start}{}\r\n\r\n", "a".repeat(pad)).into_bytes()
    };
    assert_eq!(head_of(8192).len(), 8192);
    f.expect("8192-byte head", &head_of(8192), 200, "ok");
    f.expect("8193-byte head", &head_of(8193), 431, "8 KiB");
    f.expect("64 KiB head", &head_of(65536), 431, "8 KiB");
    // An endless head that never finishes is cut at the limit too.
    let mut endless = b"GET /ws HTTP/1.1\r\n".to_vec();
    endless.extend(std::iter::repeat_n(b'x', 9000));
    f.expect("unfinished 9 KB head", &endless, 431, "8 KiB");

    // 64 header lines are fine, 65 are refused.
    let lines = |n: usize| {
        let mut r = "GET /healthz HTTP/1.1\r\nHost: t\r\n".to_string();
        for i in 1..n {
            r.push_str(&format!("X-H{i}: v\r\n"));
        }
        r.push_str("\r\n");
        r.into_bytes()
    };
    f.expect("64 header lines", &lines(64), 200, "ok");
    f.expect("65 header lines", &lines(65), 431, "64 header lines");
    f.expect("1000 header lines", &lines(1000), 431, "");

    f.expect("binary junk", b"\x00\x01\x02junk\r\n\r\n", 400, "malformed");
    f.expect("no method", b" / HTTP/1.1\r\n\r\n", 400, "malformed");
    f.expect("bad version", b"GET / HTTP/9.9\r\n\r\n", 400, "malformed");
    let m = f.server.metrics();
    assert_eq!(m.http("431"), 5.0);
    assert_eq!(m.http("400"), 3.0);
    assert_eq!(m.get("fanout_connections_open"), 1.0, "only the witness");
}

#[test]
fn bad_upgrades_get_the_documented_status() {
    let mut f = Witnessed::start(&[]);
    let ws = "/ws?channel=c";
    f.expect(
        "missing Sec-WebSocket-Key",
        &upgrade_request(ws, &["Sec-WebSocket-Key"], ""),
        400,
        "missing Sec-WebSocket-Key",
    );
    for bad in [
        "short",
        "dGhlIHNhbXBsZSBub25jZQ",       // no padding
        "dGhlIHNhbXBsZSBub25jZQ===",    // 25 bytes
        "dGhlIHNhbXBsZSBub2!jZQ==",     // not base64
        "dGhlIHNhbXBsZSBub25jZSBvaw==", // 20 bytes, not 16
    ] {
        let req = upgrade_request(
            ws,
            &["Sec-WebSocket-Key"],
            &format!("Sec-WebSocket-Key: {bad}\r\n"),
        );
        f.expect(&format!("key {bad:?}"), &req, 400, "not 16 bytes of base64");
    }
    for version in [Some("8"), Some("14"), Some("13, 8"), None] {
        let extra = version.map_or(String::new(), |v| format!("Sec-WebSocket-Version: {v}\r\n"));
        let req = upgrade_request(ws, &["Sec-WebSocket-Version"], &extra);
        let reply = f.expect(&format!("version {version:?}"), &req, 426, "13");
        assert!(
            reply.head.contains("\r\nSec-WebSocket-Version: 13"),
            "426 names the version: {}",
            reply.head
        );
    }
    for (name, drop, extra, phrase) in [
        ("missing Upgrade header", "Upgrade", "", "Upgrade"),
        ("Upgrade: h2c", "Upgrade", "Upgrade: h2c\r\n", "Upgrade"),
        ("missing Connection header", "Connection", "", "Connection"),
        (
            "Connection without the upgrade token",
            "Connection",
            "Connection: keep-alive\r\n",
            "Connection",
        ),
    ] {
        f.expect(name, &upgrade_request(ws, &[drop], extra), 400, phrase);
    }
    let reply = f.expect(
        "plain GET /ws",
        b"GET /ws HTTP/1.1\r\nHost: t\r\n\r\n",
        426,
        "WebSocket",
    );
    assert!(reply.head.contains("\r\nSec-WebSocket-Version: 13"));
    f.expect(
        "HTTP/1.0 upgrade",
        &String::from_utf8(upgrade_request(ws, &[], ""))
            .unwrap()
            .replace("HTTP/1.1", "HTTP/1.0")
            .into_bytes(),
        400,
        "HTTP/1.1",
    );
    f.expect(
        "upgrade with a body",
        &upgrade_request(ws, &[], "Content-Length: 5\r\n"),
        400,
        "body",
    );
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let req = format!("{method} /ws HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
        let reply = f.expect(&format!("{method} /ws"), req.as_bytes(), 405, "GET");
        assert!(
            reply.head.contains("\r\nAllow: GET, HEAD"),
            "{}",
            reply.head
        );
    }
    for path in ["/nope", "/ws/", "/WS", "/healthz/x", "/../etc/passwd"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        f.expect(&format!("GET {path}"), req.as_bytes(), 404, "no such path");
    }
    f.expect(
        "GET /healthz",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
        200,
        "ok",
    );
    let head = send_raw(f.server.addr, b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        (head.status, head.body.as_str()),
        (200, ""),
        "HEAD has no body"
    );
    for channel in [
        "bad%20name",
        "",
        "a/b",
        "%C3%A9",
        "semi;colon",
        &"c".repeat(129),
    ] {
        f.expect(
            &format!("?channel={channel}"),
            &upgrade_request(&format!("/ws?channel={channel}"), &[], ""),
            400,
            "?channel=",
        );
    }
    let m = f.server.metrics();
    assert_eq!(m.http("426"), 5.0);
    assert_eq!(m.http("405"), 5.0);
    assert_eq!(m.http("404"), 5.0);
    assert_eq!(m.http("400"), 6.0 + 4.0 + 2.0 + 6.0);
    assert_eq!(
        m.get("fanout_connections_accepted_total"),
        1.0,
        "nothing but the witness was upgraded"
    );
}

#[test]
fn channel_names_of_128_bytes_are_accepted_and_129_refused() {
    let mut f = Witnessed::start(&[]);
    let longest = "L".repeat(128);
    let mut a = f.server.ws(&format!("/ws?channel={longest}"));
    let mut b = f.server.ws_json("/ws");
    b.send_text(&format!(
        r#"{{"op":"subscribe","channel":"{longest}","id":1}}"#
    ));
    assert_eq!(b.recv_text(PATIENCE), r#"{"op":"ok","id":1}"#);
    a.send_text("max");
    assert_eq!(a.recv_text(PATIENCE), "max");
    assert_eq!(
        b.recv_text(PATIENCE),
        format!(r#"{{"op":"message","channel":"{longest}","data":"max"}}"#)
    );
    let too_long = "L".repeat(129);
    f.expect(
        "129-byte ?channel=",
        &upgrade_request(&format!("/ws?channel={too_long}"), &[], ""),
        400,
        "129 bytes",
    );
    b.send_text(&format!(
        r#"{{"op":"subscribe","channel":"{too_long}","id":2}}"#
    ));
    let reply = b.recv_text(PATIENCE);
    assert!(
        reply.starts_with(r#"{"op":"error","id":2,"error":"channel name is 129 bytes"#),
        "{reply}"
    );
    b.send_text(&format!(
        r#"{{"op":"publish","channel":"{too_long}","data":1,"id":3}}"#
    ));
    assert!(b.recv_text(PATIENCE).starts_with(r#"{"op":"error","id":3"#));
    f.still_serving("129-byte channel names");
}

#[test]
fn allowed_origins_are_enforced() {
    let mut f = Witnessed::start(&[
        "--allowed-origins",
        "https://chat.example, http://localhost:8080",
    ]);
    for origin in [
        "https://evil.example",
        "https://chat.example.evil",
        "http://chat.example",
        "null",
    ] {
        f.expect(
            &format!("Origin {origin}"),
            &upgrade_request("/ws", &[], &format!("Origin: {origin}\r\n")),
            403,
            "origin",
        );
    }
    for origin in [
        "https://chat.example",
        "https://chat.example/",
        "HTTPS://CHAT.EXAMPLE",
        "http://localhost:8080",
    ] {
        let mut s = TcpStream::connect(f.server.addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(&upgrade_request(
            "/ws?channel=origin",
            &[],
            &format!("Origin: {origin}\r\n"),
        ))
        .unwrap();
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 101 "), "Origin {origin}: {head}");
        let mut ws = Ws::from_stream(s);
        ws.send_text(origin);
        assert_eq!(ws.recv_text(PATIENCE), origin);
    }
    // The witness connected without an Origin header: non-browser clients send none, and the
    // check only guards against other sites' pages.
    f.still_serving("origins");
    assert_eq!(f.server.metrics().http("403"), 4.0);
}

#[test]
fn message_rate_limit_closes_with_1008() {
    let mut f = Witnessed::start(&["--max-message-rate", "5"]);
    let mut flooder = f.server.ws("/ws?channel=rate");
    let mut listener = f.server.ws("/ws?channel=rate");
    // Twenty messages in one write: parsed in the same instant, so exactly the burst of 5 passes.
    let mut burst = Vec::new();
    for i in 0..20 {
        burst.extend(client_frame(TEXT, format!("m{i}").as_bytes()));
    }
    flooder.stream.write_all(&burst).unwrap();
    for i in 0..5 {
        assert_eq!(listener.recv_text(PATIENCE), format!("m{i}"));
        assert_eq!(flooder.recv_text(PATIENCE), format!("m{i}"));
    }
    let (code, reason) = flooder.recv_close(PATIENCE).expect("close for the flood");
    assert_eq!(code, 1008);
    assert!(reason.starts_with("rate limit"), "reason {reason:?}");
    assert!(flooder.wait_eof(PATIENCE));
    // Nothing past the burst was published: the listener's next message is a later one.
    let mut other = f.server.ws("/ws?channel=rate");
    other.send_text("after");
    assert_eq!(listener.recv_text(PATIENCE), "after");
    assert_eq!(f.server.metrics().closed("rate_limit"), 1.0);
    f.still_serving("rate limit");
}

#[test]
fn no_client_can_address_another_channel_or_client() {
    let f = Witnessed::start(&[]);
    let mut in_a = f.server.ws("/ws?channel=a");
    let mut in_b = f.server.ws("/ws?channel=b");
    let mut json_b = f.server.ws_json("/ws?channel=b");
    // A repeated ?channel= subscribes to the first only; unknown parameters change nothing.
    let mut sneaky = f
        .server
        .ws("/ws?channel=a&channel=b&userId=someone&to=b&channels=b");
    // A JSON publish reaches the channel it names and nowhere else, whatever else it says.
    let mut json = f.server.ws_json("/ws?channel=a");
    json.send_text(
        r#"{"op":"publish","channel":"a","data":"for a","to":"b","userId":"x","channels":["b"],"id":1}"#,
    );
    assert_eq!(
        json.recv_text(PATIENCE),
        r#"{"op":"message","channel":"a","data":"for a"}"#
    );
    assert_eq!(json.recv_text(PATIENCE), r#"{"op":"ok","id":1}"#);
    assert_eq!(in_a.recv_text(PATIENCE), "for a");
    assert_eq!(sneaky.recv_text(PATIENCE), "for a");
    // Raw text shaped like a command, from the sneaky client: still only channel a.
    sneaky.send_text(r#"{"op":"publish","channel":"b","data":"leak"}"#);
    for ws in [&mut in_a, &mut sneaky] {
        assert_eq!(
            ws.recv_text(PATIENCE),
            r#"{"op":"publish","channel":"b","data":"leak"}"#
        );
    }
    assert_eq!(
        json.recv_text(PATIENCE),
        r#"{"op":"message","channel":"a","data":{"op":"publish","channel":"b","data":"leak"}}"#
    );
    // One reactor: had anything above reached channel b, it would arrive before this marker.
    in_b.send_text("b marker");
    assert_eq!(in_b.recv_text(PATIENCE), "b marker");
    assert_eq!(
        json_b.recv_text(PATIENCE),
        r#"{"op":"message","channel":"b","data":"b marker"}"#
    );
    let m = f.server.metrics();
    assert_eq!(
        m.get("fanout_deliveries_total"),
        (3 + 3 + 2) as f64,
        "three to channel a twice, two to channel b"
    );
}
