//! HTTP on a reactor: routing the request a connection sent (chat page, probes, metrics) and the
//! WebSocket upgrade, including the node-wide connection limit.

use std::sync::atomic::Ordering;

use super::Reactor;
use crate::http;

/// The chat page served at `/`, embedded so the binary is all a user needs.
pub const CHAT_PAGE: &str = include_str!("../web/index.html");

const PLAIN: &str = "text/plain; charset=utf-8";

impl Reactor {
    pub(super) fn on_http_bytes(&mut self, key: usize, data: &[u8]) {
        let Some(head) = self.conns.live(key).and_then(|c| c.http_input(data)) else {
            return;
        };
        let (req, rest) = match http::parse(head) {
            Ok(None) => return,
            Err(response) => return self.respond(key, response),
            Ok(Some((req, used))) => {
                let rest = head[used..].to_vec();
                (req, rest)
            }
        };
        let head_only = req.method == "HEAD";
        let known = matches!(
            req.path.as_str(),
            "/ws" | "/healthz" | "/readyz" | "/metrics" | "/" | "/index.html"
        );
        let response = if !known {
            http::error(
                404,
                &format!(
                    "no such path {:?}; try /, /ws, /healthz, /readyz or /metrics",
                    req.path
                ),
            )
        } else if req.method != "GET" && (!head_only || req.path == "/ws") {
            http::response(
                405,
                PLAIN,
                "Allow: GET, HEAD\r\n",
                b"only GET and HEAD are allowed\n",
                false,
            )
        } else {
            match req.path.as_str() {
                "/ws" => return self.upgrade(key, &req, &rest),
                "/healthz" => http::response(200, PLAIN, "", b"ok\n", head_only),
                "/readyz" => match self.shared.readiness() {
                    Ok(()) => http::response(200, PLAIN, "", b"ready\n", head_only),
                    Err(why) => http::response(
                        503,
                        PLAIN,
                        "",
                        format!("not ready: {why}\n").as_bytes(),
                        head_only,
                    ),
                },
                "/metrics" => {
                    let text = self.shared.render_metrics();
                    http::response(
                        200,
                        "text/plain; version=0.0.4; charset=utf-8",
                        "",
                        text.as_bytes(),
                        head_only,
                    )
                }
                _ => http::response(
                    200,
                    "text/html; charset=utf-8",
                    "",
                    CHAT_PAGE.as_bytes(),
                    head_only,
                ),
            }
        };
        self.respond(key, response);
    }

    fn respond(&mut self, key: usize, response: http::Response) {
        self.metrics.http_response(response.status);
        if let Some(conn) = self.conns.live(key) {
            conn.respond(response.bytes);
        }
        self.mark_dirty(key);
    }

    fn upgrade(&mut self, key: usize, req: &http::Request, rest: &[u8]) {
        if req.has_body {
            return self.respond(
                key,
                http::error(400, "a WebSocket upgrade request has no body"),
            );
        }
        let up = match http::upgrade(req, &self.shared.config) {
            Ok(up) => up,
            Err(response) => return self.respond(key, response),
        };
        if self.drain.is_some() {
            return self.respond(key, http::error(503, "server is shutting down"));
        }
        let open = self.shared.open_ws.fetch_add(1, Ordering::AcqRel);
        if open >= self.shared.config.max_connections {
            self.shared.open_ws.fetch_sub(1, Ordering::AcqRel);
            self.metrics.refused.inc();
            return self.respond(
                key,
                http::error(503, "connection limit reached; try another node"),
            );
        }
        let Some(conn) = self.conns.live(key) else {
            self.shared.open_ws.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        self.metrics.accepted.inc();
        self.metrics.http_response(101);
        conn.open_websocket(up.json, up.deflate, up.response);
        if self.shared.config.fault_panic_reactor == Some(self.index) {
            panic!("--fault-panic-reactor {}: injected fault", self.index);
        }
        if let Some(channel) = up.channel {
            // The first subscription of a fresh connection is always within the limit.
            let _ = self.subscribe(key, &channel);
        }
        self.mark_dirty(key);
        if !rest.is_empty() {
            self.on_ws_bytes(key, rest);
        }
    }
}
