//! HTTP on a reactor: routing the request a connection sent (chat page, browser client, probes,
//! metrics) and the WebSocket upgrade, including the node-wide connection limit.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Reactor;
use crate::auth::{unix_now, Identity, LEEWAY_SECS};
use crate::http;

/// HTTP 401 with the reason, and the challenge RFC 6750 asks for.
fn unauthorized(why: &str) -> http::Response {
    http::response(
        401,
        PLAIN,
        "WWW-Authenticate: Bearer\r\n",
        format!("{why}\n").as_bytes(),
        false,
    )
}

/// When a token's `exp` (plus the leeway) falls, in reactor milliseconds; 0 for never.
pub(super) fn token_deadline(identity: Option<&Identity>, now_ms: u64) -> u64 {
    let Some(exp) = identity.and_then(|i| i.expires_at) else {
        return 0;
    };
    let left = exp.saturating_add(LEEWAY_SECS).saturating_sub(unix_now());
    now_ms.saturating_add(left.saturating_mul(1000)).max(1)
}

/// The chat page served at `/`, embedded so the binary is all a user needs.
pub const CHAT_PAGE: &str = include_str!("../web/index.html");

/// The browser client served at `/fanout.js` (an ES module the chat page imports), embedded so
/// the page and the client it was written against always come from the same binary.
pub const BROWSER_CLIENT: &str = include_str!("../web/fanout.js");

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
            "/ws" | "/healthz" | "/readyz" | "/metrics" | "/" | "/index.html" | "/fanout.js"
        );
        let response = if !known {
            http::error(
                404,
                &format!(
                    "no such path {:?}; try /, /fanout.js, /ws, /healthz, /readyz or /metrics",
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
                // A module script must come with a JavaScript type (browsers refuse others);
                // nosniff makes every browser hold to it. No caching, like the page (every
                // response says no-store), so a page never runs against an older client.
                "/fanout.js" => http::response(
                    200,
                    "text/javascript; charset=utf-8",
                    "X-Content-Type-Options: nosniff\r\n",
                    BROWSER_CLIENT.as_bytes(),
                    head_only,
                ),
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

    /// The identity of the request's token (`?token=` or `Authorization: Bearer`). Without a
    /// token: refused under `--auth required`, anonymous otherwise. A token that is there must
    /// be valid either way, so a client with a broken token learns it at once.
    fn authenticate(&self, req: &http::Request) -> Result<Option<Arc<Identity>>, String> {
        let verifier = &self.shared.config.auth;
        let token = http::query_param(&req.query, "token").or_else(|| req.bearer.clone());
        match token {
            None if verifier.required() => {
                Err("a token is required: ?token=JWT or Authorization: Bearer JWT".into())
            }
            None => Ok(None),
            Some(_) if !verifier.has_keys() => Ok(None),
            Some(token) => verifier
                .verify(&token)
                .map(|identity| Some(Arc::new(identity)))
                .map_err(|why| format!("invalid token: {why}")),
        }
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
        let identity = match self.authenticate(req) {
            Ok(identity) => identity,
            Err(why) => return self.respond(key, unauthorized(&why)),
        };
        if let Some(id) = &identity {
            if !self.shared.admit_user(&id.user) {
                return self.respond(
                    key,
                    http::error(
                        429,
                        &format!(
                            "user {:?} already holds --max-connections-per-user {} connections",
                            id.user, self.shared.config.auth.max_per_user
                        ),
                    ),
                );
            }
        }
        let release = |shared: &crate::node::Shared| {
            if let Some(id) = &identity {
                shared.release_user(&id.user);
            }
        };
        let open = self.shared.open_ws.fetch_add(1, Ordering::AcqRel);
        if open >= self.shared.config.max_connections {
            self.shared.open_ws.fetch_sub(1, Ordering::AcqRel);
            release(&self.shared);
            self.metrics.refused.inc();
            return self.respond(
                key,
                http::error(503, "connection limit reached; try another node"),
            );
        }
        let Some(conn) = self.conns.live(key) else {
            self.shared.open_ws.fetch_sub(1, Ordering::AcqRel);
            release(&self.shared);
            return;
        };
        self.metrics.accepted.inc();
        self.metrics.http_response(101);
        conn.open_websocket(up.json, up.deflate, up.response);
        let deadline = token_deadline(identity.as_deref(), self.clock.now_ms);
        conn.set_identity(identity, deadline);
        if self.shared.config.fault_panic_reactor == Some(self.index) {
            panic!("--fault-panic-reactor {}: injected fault", self.index);
        }
        if let Some(channel) = up.channel {
            // The first subscription of a fresh connection is always within the limit, so a
            // refusal is the namespace's rule: a JSON client is told, a raw one closed (4003).
            if let Err(why) = self.subscribe(key, &channel, false) {
                if up.json {
                    self.reply(key, None, Err(why));
                } else {
                    self.forbidden(key);
                }
            }
        }
        self.mark_dirty(key);
        if !rest.is_empty() {
            self.on_ws_bytes(key, rest);
        }
    }
}
