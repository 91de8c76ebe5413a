//! HTTP/1.1 for the server API: the request head (httparse, at most [`MAX_HEAD_BYTES`]), the
//! body by `Content-Length` only (at most [`MAX_BODY_BYTES`]; chunked is refused with 411), and
//! JSON responses. Every response closes the connection.

use bytes::Bytes;

/// Largest request head accepted; over it: 431.
pub const MAX_HEAD_BYTES: usize = crate::http::MAX_HEAD_BYTES;
/// Most header lines accepted; over it: 431.
pub const MAX_HEADERS: usize = crate::http::MAX_HEADERS;
/// Largest request body accepted; over it: 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The parts of a request head the API looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_length: usize,
    /// `Content-Type` is `application/json` (parameters such as `charset` allowed).
    pub json: bool,
    pub authorization: Option<Vec<u8>>,
    /// `Expect: 100-continue`: the client waits for an interim answer before its body.
    pub expect_continue: bool,
    /// Bytes the head took; the body follows.
    pub len: usize,
}

/// A response ready to write, with its status for the log.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub bytes: Bytes,
}

/// Parses the head at the start of `buf`. `Ok(None)`: incomplete, read more.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, Response> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD_BYTES => n,
        Ok(httparse::Status::Complete(_)) => {
            return Err(error(431, "request head larger than 8 KiB"))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(error(431, "request head larger than 8 KiB"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(error(431, "more than 64 header lines"))
        }
        Err(e) => return Err(error(400, &format!("malformed HTTP request: {e}"))),
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut head = Head {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        len,
        ..Head::default()
    };
    let mut length: Option<usize> = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(error(
                411,
                "Transfer-Encoding is not accepted; send the body with a Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value).unwrap_or("").trim();
            let n = match value.parse::<u64>() {
                Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(error(400, "Content-Length is not a whole number")),
            };
            if length.is_some_and(|l| l as u64 != n) {
                return Err(error(400, "two different Content-Length headers"));
            }
            if n > MAX_BODY_BYTES as u64 {
                return Err(error(
                    413,
                    &format!("the body is {n} bytes; the limit is {MAX_BODY_BYTES} (1 MiB)"),
                ));
            }
            length = Some(n as usize);
        } else if name.eq_ignore_ascii_case("content-type") {
            head.json = is_json(h.value);
        } else if name.eq_ignore_ascii_case("authorization") {
            head.authorization = Some(h.value.to_vec());
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
    head.content_length = length.unwrap_or(0);
    Ok(Some(head))
}

/// Whether a `Content-Type` value is `application/json`, whatever its parameters.
fn is_json(value: &[u8]) -> bool {
    let media = value.split(|&b| b == b';').next().unwrap_or_default();
    media.trim_ascii().eq_ignore_ascii_case(b"application/json")
}

/// A JSON response; `extra_headers` are whole lines, each ending in CRLF.
pub fn json(status: u16, extra_headers: &str, body: &[u8]) -> Response {
    let r = crate::http::response(status, "application/json", extra_headers, body, false);
    Response {
        status,
        bytes: r.bytes,
    }
}

/// `{"error":"..."}` with `status`.
pub fn error(status: u16, message: &str) -> Response {
    error_with(status, "", message)
}

/// [`error`] with extra header lines.
pub fn error_with(status: u16, extra_headers: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    json(status, extra_headers, body.as_bytes())
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn status(raw: &str) -> u16 {
        match parse_head(raw.as_bytes()) {
            Ok(Some(_)) => 0,
            Ok(None) => 1,
            Err(r) => r.status,
        }
    }

    #[test]
    fn heads() {
        let raw = "POST /api/publish?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: Application/JSON; charset=utf-8\r\nContent-Length: 12\r\nAuthorization: apikey k\r\nExpect: 100-continue\r\n\r\n{}";
        let head = parse_head(raw.as_bytes()).unwrap().unwrap();
        assert_eq!(
            (
                head.method.as_str(),
                head.path.as_str(),
                head.query.as_str()
            ),
            ("POST", "/api/publish", "x=1")
        );
        assert!(head.json && head.expect_continue);
        assert_eq!(head.content_length, 12);
        assert_eq!(head.len, raw.len() - 2);
        assert_eq!(head.authorization.as_deref(), Some(&b"apikey k"[..]));
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\n"), 1, "incomplete");
        assert_eq!(
            status("GET / HTTP/1.1\r\nContent-Type: text/json\r\n\r\n"),
            0
        );
    }

    #[test]
    fn refusals() {
        let post = |headers: &str| status(&format!("POST /api/publish HTTP/1.1\r\n{headers}\r\n"));
        assert_eq!(post("Transfer-Encoding: chunked\r\n"), 411);
        assert_eq!(post("Content-Length: 1048577\r\n"), 413);
        assert_eq!(post("Content-Length: 99999999999999999999999\r\n"), 400);
        assert_eq!(post("Content-Length: -1\r\n"), 400);
        assert_eq!(post("Content-Length: +1\r\n"), 400);
        assert_eq!(post("Content-Length: 1\r\nContent-Length: 2\r\n"), 400);
        assert_eq!(post("Content-Length: 1048576\r\n"), 0);
        let big = format!("X: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(post(&big), 431);
        assert_eq!(status("\0\0\r\n\r\n"), 400);
        let e = error(404, "no \"such\" path");
        let text = std::str::from_utf8(&e.bytes).unwrap();
        assert!(text.ends_with(r#"{"error":"no \"such\" path"}"#), "{text}");
        assert!(text.contains("Content-Type: application/json\r\n"));
    }
}
