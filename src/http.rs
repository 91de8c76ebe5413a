//! HTTP/1.1 on the WebSocket port: request parsing with limits, routing, responses, and the
//! RFC 6455 opening handshake.
//!
//! Every request gets one response and `Connection: close`, except a valid upgrade on `/ws`,
//! after which the same socket speaks WebSocket. Parsing is httparse's; the limits (header block
//! size, header count) are ours.

use std::fmt::Write as _;

use bytes::Bytes;

use crate::config::Config;
use crate::protocol::{validate_channel, JSON_SUBPROTOCOL};
use crate::ws::deflate::{self, Agreed};

/// Largest request head (request line plus headers) accepted; over it: 431.
pub const MAX_HEAD_BYTES: usize = 8192;
/// Most header lines accepted; over it: 431.
pub const MAX_HEADERS: usize = 64;

/// The parts of a request fanout looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub upgrade: Option<String>,
    pub connection: Option<String>,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    pub ws_protocols: Vec<String>,
    /// Every `Sec-WebSocket-Extensions` header value, in order.
    pub ws_extensions: Vec<String>,
    pub origin: Option<String>,
    /// The credentials of `Authorization: Bearer TOKEN`.
    pub bearer: Option<String>,
    pub has_body: bool,
}

/// A response ready to write, with the status kept for metrics.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub bytes: Bytes,
}

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete, read more.
/// On success also returns how many bytes the head took (anything after it is WebSocket data).
pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, Response> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(error(431, "request head larger than 8 KiB"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(error(431, "more than 64 header lines"))
        }
        Err(e) => return Err(error(400, &format!("malformed HTTP request: {e}"))),
    };
    if consumed > MAX_HEAD_BYTES {
        return Err(error(431, "request head larger than 8 KiB"));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        version: req.version.unwrap_or(1),
        ..Request::default()
    };
    for h in req.headers.iter() {
        let value = || String::from_utf8_lossy(h.value).trim().to_string();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            out.upgrade = Some(value());
        } else if name.eq_ignore_ascii_case("connection") {
            out.connection = Some(value());
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            out.ws_key = Some(value());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            out.ws_version = Some(value());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            out.ws_protocols.extend(
                value()
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty()),
            );
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            out.ws_extensions.push(value());
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value());
        } else if name.eq_ignore_ascii_case("authorization") {
            let v = value();
            if let Some((scheme, token)) = v.split_once(' ') {
                if scheme.eq_ignore_ascii_case("bearer") {
                    out.bearer = Some(token.trim().to_string());
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-length") && value() != "0")
        {
            out.has_body = true;
        }
    }
    Ok(Some((out, consumed)))
}

/// A successful opening handshake: what to answer and how the connection will behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub response: Bytes,
    pub json: bool,
    /// The channel to subscribe at once: `?channel=` or, in raw mode, `chat`.
    pub channel: Option<String>,
    /// permessage-deflate, when enabled and offered acceptably.
    pub deflate: Option<Agreed>,
}

/// Checks a `GET /ws` request against RFC 6455 and fanout's rules.
pub fn upgrade(req: &Request, config: &Config) -> Result<Upgrade, Response> {
    let has_token = |header: &Option<String>, token: &str| {
        header
            .as_deref()
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if req.upgrade.is_none() && req.ws_key.is_none() {
        return Err(upgrade_required(
            "this endpoint speaks WebSocket only; send an Upgrade: websocket request",
        ));
    }
    if req.ws_version.as_deref() != Some("13") {
        return Err(upgrade_required(
            "unsupported Sec-WebSocket-Version; this server speaks 13",
        ));
    }
    if req.version < 1 {
        return Err(error(400, "WebSocket upgrade needs HTTP/1.1"));
    }
    if !has_token(&req.upgrade, "websocket") {
        return Err(error(
            400,
            "missing or wrong Upgrade header; expected websocket",
        ));
    }
    if !has_token(&req.connection, "upgrade") {
        return Err(error(400, "missing Upgrade in the Connection header"));
    }
    let key = match req.ws_key.as_deref() {
        Some(k) if is_valid_key(k) => k,
        Some(_) => return Err(error(400, "Sec-WebSocket-Key is not 16 bytes of base64")),
        None => return Err(error(400, "missing Sec-WebSocket-Key")),
    };
    if !config.allowed_origins.is_empty() {
        if let Some(origin) = &req.origin {
            let origin = origin.trim_end_matches('/');
            if !config
                .allowed_origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin))
            {
                return Err(error(403, "origin not allowed"));
            }
        }
    }
    let json = req.ws_protocols.iter().any(|p| p == JSON_SUBPROTOCOL);
    let requested = query_param(&req.query, "channel");
    let channel = match requested {
        Some(name) => {
            validate_channel(name.as_bytes())
                .map_err(|e| error(400, &format!("?channel=: {e}")))?;
            Some(name)
        }
        None if json => None,
        None => Some("chat".to_string()),
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if json {
        let _ = write!(head, "Sec-WebSocket-Protocol: {JSON_SUBPROTOCOL}\r\n");
    }
    let deflate = if config.compression {
        deflate::negotiate(req.ws_extensions.iter().map(String::as_str))
    } else {
        None
    };
    if let Some(agreed) = &deflate {
        let _ = write!(head, "Sec-WebSocket-Extensions: {}\r\n", agreed.response());
    }
    head.push_str("\r\n");
    Ok(Upgrade {
        response: Bytes::from(head),
        json,
        channel,
        deflate,
    })
}

fn is_valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// The first value of `name` in a query string, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A complete `Connection: close` response.
pub fn response(
    status: u16,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
    head_only: bool,
) -> Response {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n{extra_headers}\r\n",
        reason(status),
        body.len()
    );
    let mut bytes = std::mem::take(&mut head).into_bytes();
    if !head_only {
        bytes.extend_from_slice(body);
    }
    Response {
        status,
        bytes: Bytes::from(bytes),
    }
}

/// A plain-text error response that says what went wrong.
pub fn error(status: u16, message: &str) -> Response {
    response(
        status,
        "text/plain; charset=utf-8",
        "",
        format!("{message}\n").as_bytes(),
        false,
    )
}

fn upgrade_required(message: &str) -> Response {
    response(
        426,
        "text/plain; charset=utf-8",
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        format!("{message}\n").as_bytes(),
        false,
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws?channel=room1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, fanout.json\r\n\r\n";

    fn status(r: &Response) -> u16 {
        r.status
    }

    #[test]
    fn parses_and_upgrades() {
        let (req, n) = parse(GOOD.as_bytes()).unwrap().unwrap();
        assert_eq!(n, GOOD.len());
        assert_eq!(req.path, "/ws");
        let up = upgrade(&req, &Config::for_tests()).unwrap();
        assert!(up.json);
        assert_eq!(up.channel.as_deref(), Some("room1"));
        let text = std::str::from_utf8(&up.response).unwrap();
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: fanout.json\r\n"));
    }

    #[test]
    fn partial_and_oversized_heads() {
        assert!(parse(&GOOD.as_bytes()[..30]).unwrap().is_none());
        let mut flood = b"GET / HTTP/1.1\r\n".to_vec();
        while flood.len() < MAX_HEAD_BYTES + 10 {
            flood.extend_from_slice(
                b"X-A: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n",
            );
        }
        assert_eq!(status(&parse(&flood).unwrap_err()), 431);
        assert_eq!(status(&parse(b"\x00\x01garbage\r\n\r\n").unwrap_err()), 400);
    }

    #[test]
    fn bad_upgrades() {
        let cfg = Config::for_tests();
        let check = |raw: &str| {
            let (req, _) = parse(raw.as_bytes()).unwrap().unwrap();
            upgrade(&req, &cfg).map(|_| ()).map_err(|r| r.status)
        };
        assert_eq!(check(&GOOD.replace("Version: 13", "Version: 8")), Err(426));
        assert_eq!(check("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"), Err(426));
        assert_eq!(
            check(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")),
            Err(400)
        );
        assert_eq!(
            check(&GOOD.replace("Upgrade: websocket", "Upgrade: h2c")),
            Err(400)
        );
        assert_eq!(
            check(&GOOD.replace("keep-alive, Upgrade", "keep-alive")),
            Err(400)
        );
        assert_eq!(check(&GOOD.replace("room1", "bad%20name")), Err(400));
        assert_eq!(check(GOOD), Ok(()));
    }

    #[test]
    fn origins() {
        let mut cfg = Config::for_tests();
        cfg.allowed_origins = vec!["https://chat.example".into()];
        let with = |origin: &str| {
            let raw = GOOD.replace("Host: x\r\n", &format!("Host: x\r\nOrigin: {origin}\r\n"));
            let (req, _) = parse(raw.as_bytes()).unwrap().unwrap();
            upgrade(&req, &cfg).map(|_| ()).map_err(|r| r.status)
        };
        assert_eq!(with("https://chat.example"), Ok(()));
        assert_eq!(with("https://evil.example"), Err(403));
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            query_param("a=1&channel=x%2Dy", "channel").as_deref(),
            Some("x-y")
        );
        assert_eq!(
            query_param("channel=%zz%", "channel").as_deref(),
            Some("%zz%")
        );
        assert_eq!(query_param("a=1", "channel"), None);
    }
}
