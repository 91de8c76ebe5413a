//! A client of a node's server API (`--api-listen`): JSON requests over the tests' one HTTP
//! sender ([`exchange`]), with or without the API key, and the arguments that turn the API on.

use std::net::SocketAddr;

use serde_json::Value;

use super::{exchange, Server};

/// The key the tests give `--api-key`.
pub const API_KEY: &str = "fanout-test-api-key-0123456789";

/// `--api-listen 127.0.0.1:0 --api-key API_KEY`.
pub const API_ARGS: [&str; 4] = ["--api-listen", "127.0.0.1:0", "--api-key", API_KEY];

/// An answer of the API.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub head: String,
    /// The body parsed as JSON (`Null` when it is not JSON; `text` has it as sent).
    pub json: Value,
    pub text: String,
}

impl ApiResponse {
    /// The value of response header `name` (any case), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The `error` of an error answer, which must have the status `status`.
    pub fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "expected {status}: {self:?}");
        assert_eq!(
            self.header("content-type").as_deref(),
            Some("application/json"),
            "{self:?}"
        );
        self.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {self:?}"))
            .to_string()
    }
}

/// Calls one node's server API with a key (or none).
#[derive(Debug, Clone)]
pub struct ApiClient {
    pub addr: SocketAddr,
    pub key: Option<String>,
}

impl ApiClient {
    /// The API of `server` (started with [`API_ARGS`]), with [`API_KEY`].
    pub fn of(server: &Server) -> ApiClient {
        ApiClient {
            addr: server.api_addr(),
            key: Some(API_KEY.to_string()),
        }
    }

    /// The same API with another key, or none.
    pub fn with_key(&self, key: Option<&str>) -> ApiClient {
        ApiClient {
            addr: self.addr,
            key: key.map(str::to_string),
        }
    }

    pub fn get(&self, path: &str) -> ApiResponse {
        self.request("GET", path, "", b"")
    }

    /// POSTs `body` as `Content-Type: application/json`.
    pub fn post(&self, path: &str, body: &Value) -> ApiResponse {
        self.post_raw(path, body.to_string().as_bytes())
    }

    /// POSTs `body` as it is, labelled JSON.
    pub fn post_raw(&self, path: &str, body: &[u8]) -> ApiResponse {
        self.request("POST", path, "Content-Type: application/json\r\n", body)
    }

    /// Any request: `headers` are whole lines (each ending in CRLF); `Host`, the key and
    /// `Content-Length` (of `body`) are added.
    pub fn request(&self, method: &str, path: &str, headers: &str, body: &[u8]) -> ApiResponse {
        let key = self
            .key
            .as_ref()
            .map_or(String::new(), |k| format!("Authorization: apikey {k}\r\n"));
        let mut raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: api\r\n{key}{headers}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(body);
        self.raw(&raw)
    }

    /// Sends exact bytes.
    pub fn raw(&self, request: &[u8]) -> ApiResponse {
        let reply = exchange(self.addr, request)
            .unwrap_or_else(|e| panic!("server API at {}: {e}", self.addr));
        ApiResponse {
            status: reply.status,
            json: serde_json::from_str(&reply.body).unwrap_or(Value::Null),
            head: reply.head,
            text: reply.body,
        }
    }
}
