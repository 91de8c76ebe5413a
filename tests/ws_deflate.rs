//! permessage-deflate (RFC 7692) and fail-fast UTF-8 against a real fanout process over raw
//! sockets: what goes on the wire to a compressing and a plain subscriber of the same channel,
//! client-to-server compressed messages, the zip-bomb bound, and invalid UTF-8 caught at the
//! fragment or read that brings it.

mod ops_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use ops_support::{
    client_frame, client_frame_with, read_head, upgrade_request, Server, Ws, SEC, TEXT,
};

/// Opens a raw-mode WebSocket on `path`, offering permessage-deflate when `offer` is set;
/// returns the client and the response head.
fn connect(server: &Server, path: &str, offer: Option<&str>) -> (Ws, String) {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let extra = offer.map_or(String::new(), |o| {
        format!("Sec-WebSocket-Extensions: {o}\r\n")
    });
    stream
        .write_all(&upgrade_request(path, &[], &extra))
        .unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (Ws::from_stream(stream), head)
}

/// Raw DEFLATE of one message with the 4-byte tail removed (RFC 7692 7.2.1).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

fn chat_json(len: usize) -> String {
    let mut s = String::from(r#"{"user":"ada","text":""#);
    while s.len() < len {
        s.push_str("hello everyone in the room, ");
    }
    s.push_str(r#""}"#);
    s
}

/// One broadcast reaches a compressing subscriber as an RSV1 frame whose payload inflates to the
/// message, and a plain subscriber of the same channel as the plain frame; a message under
/// `--compression-min-bytes` goes out plain to both; a compressed message from a client reaches
/// the plain subscriber inflated.
#[test]
fn a_compressing_and_a_plain_subscriber_get_the_same_message() {
    let server = Server::start(&["--threads", "1", "--compression", "on"]);
    let (mut zipped, head) = connect(
        &server,
        "/ws?channel=c",
        Some("permessage-deflate; client_max_window_bits"),
    );
    assert!(
        head.contains("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
        "{head}"
    );
    let (mut plain, head) = connect(&server, "/ws?channel=c", None);
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");

    let message = chat_json(1024);
    plain.send(TEXT, message.as_bytes()).unwrap();
    let got = zipped.recv(10 * SEC).unwrap();
    assert!(got.rsv1, "RSV1 set for the compressing subscriber");
    assert!(
        got.payload.len() < message.len() / 3,
        "{} bytes",
        got.payload.len()
    );
    assert_eq!(inflate(&got.payload), message.as_bytes());
    let echo = plain.recv(10 * SEC).unwrap();
    assert!(!echo.rsv1);
    assert_eq!(echo.payload, message.as_bytes());

    plain.send(TEXT, b"short").unwrap();
    let short = zipped.recv(10 * SEC).unwrap();
    assert!(!short.rsv1, "under --compression-min-bytes: plain");
    assert_eq!(short.payload, b"short");
    assert_eq!(plain.recv(10 * SEC).unwrap().payload, b"short");

    // Client to server: RSV1 | FIN | text, deflated payload.
    let from_client = chat_json(2000);
    zipped
        .stream
        .write_all(&client_frame_with(
            0xC1,
            &deflate(from_client.as_bytes()),
            [9, 8, 7, 6],
        ))
        .unwrap();
    let seen = plain.recv(10 * SEC).unwrap();
    assert_eq!(seen.text(), from_client);
    let back = zipped.recv(10 * SEC).unwrap();
    assert!(back.rsv1);
    assert_eq!(inflate(&back.payload), from_client.as_bytes());
}

/// Without `--compression on` the offer is declined, and an RSV1 frame is a protocol error.
#[test]
fn compression_off_declines_the_offer() {
    let server = Server::start(&["--threads", "1"]);
    let (mut ws, head) = connect(&server, "/ws?channel=c", Some("permessage-deflate"));
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");
    ws.stream
        .write_all(&client_frame_with(0xC1, &deflate(b"hello"), [1, 2, 3, 4]))
        .unwrap();
    assert_eq!(ws.recv_close(10 * SEC).unwrap().0, 1002);
}

/// A compressed message that would inflate past `--max-message` closes 1009 without the server
/// inflating the rest: 64 MiB of zeros deflate to ~64 KiB.
#[test]
fn a_zip_bomb_is_refused_at_the_limit() {
    let server = Server::start(&[
        "--threads",
        "1",
        "--compression",
        "on",
        "--max-message",
        "65536",
    ]);
    let (mut ws, _) = connect(&server, "/ws?channel=bomb", Some("permessage-deflate"));
    let bomb = deflate(&vec![0u8; 64 << 20]);
    assert!(
        bomb.len() < 65536,
        "the bomb fits the frame limit: {}",
        bomb.len()
    );
    ws.stream
        .write_all(&client_frame_with(0xC2, &bomb, [1, 2, 3, 4]))
        .unwrap();
    let (code, reason) = ws.recv_close(10 * SEC).unwrap();
    assert_eq!(code, 1009, "{reason}");
    assert_eq!(server.get("/readyz").0, 200);
}

/// Invalid UTF-8 closes 1007 at the fragment that brings it, and within a frame still arriving,
/// without waiting for the rest of the message.
#[test]
fn invalid_utf8_fails_at_the_fragment_or_read_that_brings_it() {
    let server = Server::start(&["--threads", "1"]);
    // Fragments: a valid first fragment, then one with an impossible byte; no final fragment.
    let mut ws = server.ws("/ws?channel=u");
    ws.stream
        .write_all(&client_frame_with(0x01, "κόσμε".as_bytes(), [1, 2, 3, 4]))
        .unwrap();
    ws.stream
        .write_all(&client_frame_with(0x00, &[b'a', 0xff], [1, 2, 3, 4]))
        .unwrap();
    assert_eq!(ws.recv_close(10 * SEC).unwrap().0, 1007);

    // One frame of 100 bytes of which only the first 10 arrive, with an impossible sequence.
    let mut ws = server.ws("/ws?channel=u");
    let mut payload = vec![b'a'; 100];
    payload[5] = 0xed; // a surrogate: ED A0 80
    payload[6] = 0xa0;
    payload[7] = 0x80;
    let frame = client_frame(TEXT, &payload);
    let cut = frame.len() - 90;
    ws.stream.write_all(&frame[..cut]).unwrap();
    assert_eq!(ws.recv_close(10 * SEC).unwrap().0, 1007);

    // A valid prefix that ends inside a sequence waits for the rest and is accepted.
    let mut ws = server.ws("/ws?channel=u");
    let text = "ab€cd".as_bytes();
    let frame = client_frame(TEXT, text);
    let split = frame.len() - 4; // inside the three bytes of €
    ws.stream.write_all(&frame[..split]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    ws.stream.write_all(&frame[split..]).unwrap();
    assert_eq!(ws.recv_text(10 * SEC), "ab€cd");
    let mut rest = [0u8; 1];
    ws.stream.set_nonblocking(true).unwrap();
    assert!(ws.stream.read(&mut rest).is_err(), "nothing else arrived");
}
