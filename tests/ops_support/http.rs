//! The one HTTP/1.1 sender of the tests: requests written as raw bytes (so hostile ones can be
//! sent too), responses read to the server's close, upgrade requests and response heads.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::PATIENCE;

/// The key of RFC 6455's example handshake; the server must accept any valid one.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A response as the client saw it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// The status code of a response that starts with `HTTP/1.1 NNN`.
fn status_of(text: &str) -> io::Result<u16> {
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line in {text:?}")))
}

/// Sends `request` and reads the response until the server closes. Write errors are ignored
/// (the server may answer and close before it has read everything), and a reset after some of
/// the response arrived still leaves that response.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<HttpReply> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(PATIENCE))?;
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let deadline = Instant::now() + PATIENCE;
    loop {
        if Instant::now() >= deadline {
            return Err(io::Error::other("no end of the response"));
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // EINTR after the test process was stopped and continued: nothing was read.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if !buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = status_of(&text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok(HttpReply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// One HTTP/1.1 GET; returns status and body (the server closes after each response).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
}

/// Sends raw request bytes; reads the response to EOF and splits status and body.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> io::Result<(u16, String)> {
    exchange(addr, request).map(|r| (r.status, r.body))
}

/// Polls `path` until it answers `status`; returns how long it took, or None on timeout.
pub fn wait_status(
    addr: SocketAddr,
    path: &str,
    status: u16,
    timeout: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if matches!(http_get(addr, path), Ok((s, _)) if s == status) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// An upgrade request for `path` with the standard headers, minus those named in `drop` and
/// plus the raw header lines in `extra` (each ending in CRLF).
pub fn upgrade_request(path: &str, drop: &[&str], extra: &str) -> Vec<u8> {
    let headers = [
        ("Host", "test"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY),
        ("Sec-WebSocket-Version", "13"),
    ];
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    for (name, value) in headers {
        if !drop.contains(&name) {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    req.push_str(extra);
    req.push_str("\r\n");
    req.into_bytes()
}

/// Reads a response head byte by byte, so no WebSocket bytes after it are swallowed.
pub fn try_read_head(s: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => head.push(byte[0]),
            // EINTR after the test process was stopped and continued: nothing was read.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if head.len() > 16384 {
            return Err(io::Error::other("response head too long"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// [`try_read_head`] that fails the test when the head is cut short.
pub fn read_head(s: &mut TcpStream) -> String {
    let head = try_read_head(s).unwrap_or_else(|e| panic!("reading a response head: {e}"));
    assert!(
        head.ends_with("\r\n\r\n"),
        "response head cut short: {head:?}"
    );
    head
}

/// Writes the upgrade request for `path` and returns the response head's status and headers.
pub fn handshake(
    stream: &mut TcpStream,
    path: &str,
    protocol: Option<&str>,
) -> io::Result<(u16, String, Vec<u8>)> {
    handshake_with(stream, path, protocol, "")
}

/// [`handshake`] with extra raw header lines (each ending in CRLF), e.g. `Authorization`.
pub fn handshake_with(
    stream: &mut TcpStream,
    path: &str,
    protocol: Option<&str>,
    headers: &str,
) -> io::Result<(u16, String, Vec<u8>)> {
    let mut extra = protocol.map_or(String::new(), |p| {
        format!("Sec-WebSocket-Protocol: {p}\r\n")
    });
    extra.push_str(headers);
    stream.write_all(&upgrade_request(path, &[], &extra))?;
    let text = try_read_head(stream)?;
    let status = status_of(&text)?;
    Ok((status, text, Vec::new()))
}

/// Reads from a connection whose HTTP request never finished until the server ends it (EOF or
/// reset) and returns when that happened; fails the test if the server answers anything or
/// keeps it open for [`PATIENCE`].
pub fn wait_dropped(s: &mut TcpStream) -> Instant {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Instant::now(),
            Ok(n) => panic!(
                "server answered an unfinished request: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if super::timed_out(&e) => {
                panic!("unfinished request still open after {PATIENCE:?}")
            }
            Err(_) => return Instant::now(),
        }
    }
}
