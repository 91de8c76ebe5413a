//! Fuzzes the server API's request path with arbitrary bytes: the head parser
//! (`api::http::parse_head`), the route, method, key and content-type checks (`routes::check`)
//! and, for a request that passes them with its whole body, the endpoint itself
//! (`routes::handle`) on a standalone node's shared state whose reactor queues are drained after
//! every input.
//!
//! Whatever a backend (or anyone who reaches the port) sends must end in "read more" or in a
//! response with a documented status whose body is JSON (`{"error":...}` for every error), never
//! a panic; a request left waiting for the reactors must still produce a valid answer (the one
//! it would give, and the one it gives at its deadline).
#![no_main]

use std::cell::RefCell;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use fanout::api::http::{self, Response, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use fanout::api::keys::ApiKeys;
use fanout::api::routes::{self, Ctx, Outcome};
use fanout::broker::bus::{Inbox, Mailbox, Ticket};
use fanout::config::Config;
use fanout::metrics::ReactorMetrics;
use fanout::node::{ReactorShared, Shared};
use libfuzzer_sys::fuzz_target;
use mio::{Poll, Token, Waker};

/// The key the seed corpus uses (`Authorization: apikey fuzz-api-key-0123456789`).
const KEY: &str = "fuzz-api-key-0123456789";
/// Small queues, so inputs that fill them reach the 429 paths quickly.
const QUEUE: usize = 16;

struct Node {
    shared: Shared,
    inboxes: Vec<Inbox>,
    keys: ApiKeys,
    awaited: usize,
    /// Keeps the wakers' registries alive (mio allows one waker per poll).
    _polls: Vec<Poll>,
}

thread_local! {
    static NODE: RefCell<Node> = RefCell::new(node());
}

/// A standalone node with two reactors, as far as the API can see it: their mailboxes.
fn node() -> Node {
    let mut polls = Vec::new();
    let mut reactors = Vec::new();
    let mut inboxes = Vec::new();
    for _ in 0..2 {
        let poll = Poll::new().expect("poll");
        let waker = Waker::new(poll.registry(), Token(0)).expect("waker");
        polls.push(poll);
        let metrics = Arc::new(ReactorMetrics::default());
        let (mailbox, inbox) = Mailbox::new(waker, QUEUE, metrics.clone());
        reactors.push(ReactorShared {
            mailbox,
            metrics,
            accepting: AtomicBool::new(true),
            redis_up: AtomicBool::new(false),
        });
        inboxes.push(inbox);
    }
    Node {
        shared: Shared::new(Config::for_tests(), reactors),
        inboxes,
        keys: ApiKeys::new([KEY]).expect("a valid key"),
        awaited: 0,
        _polls: polls,
    }
}

/// A response the API may send: one of its statuses, a complete head, a JSON body, and an
/// `error` string whenever the status is one.
fn check_response(r: &Response) {
    const STATUSES: [u16; 13] = [
        200, 400, 401, 404, 405, 408, 411, 413, 415, 429, 431, 503, 504,
    ];
    assert!(STATUSES.contains(&r.status), "status {}", r.status);
    let text = std::str::from_utf8(&r.bytes).expect("a response is UTF-8");
    assert!(
        text.starts_with(&format!("HTTP/1.1 {} ", r.status)),
        "{text}"
    );
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.contains("Connection: close"), "{head}");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {}\r\n", body.len())),
        "{head}"
    );
    let body: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    if r.status >= 400 {
        assert!(body["error"].is_string(), "{body}");
    }
}

fuzz_target!(|data: &[u8]| {
    NODE.with(|node| {
        let node = &mut *node.borrow_mut();
        let head = match http::parse_head(data) {
            Ok(None) => {
                assert!(data.len() < MAX_HEAD_BYTES);
                return;
            }
            Err(r) => {
                assert!(matches!(r.status, 400 | 411 | 413 | 431), "{}", r.status);
                return check_response(&r);
            }
            Ok(Some(head)) => head,
        };
        assert!(head.len <= data.len() && head.len <= MAX_HEAD_BYTES);
        assert!(head.content_length <= MAX_BODY_BYTES);
        let route = match routes::check(&head, &node.keys) {
            Ok(route) => route,
            Err(r) => {
                assert!(matches!(r.status, 401 | 404 | 405 | 415), "{}", r.status);
                return check_response(&r);
            }
        };
        // The API acts only once the whole body has arrived.
        let Some(body) = data.get(head.len..head.len + head.content_length) else {
            return;
        };
        let mut ctx = Ctx {
            shared: &node.shared,
            ticket: Ticket { conn: 0, serial: 1 },
            awaited: &mut node.awaited,
            censuses: 0,
            now: Instant::now(),
        };
        match routes::handle(route, &head, body, &mut ctx) {
            Outcome::Respond(r) => check_response(&r),
            Outcome::Wait(pending) => {
                check_response(&pending.response());
                check_response(&pending.timed_out());
            }
        }
        // Nothing runs the reactors: empty their queues, as they would, so memory stays flat.
        for (inbox, reactor) in node.inboxes.iter().zip(&node.shared.reactors) {
            while inbox.messages.try_recv().is_ok() {}
            while inbox.control.try_recv().is_ok() {
                reactor.mailbox.control_taken();
            }
            while inbox.requests.try_recv().is_ok() {}
        }
        node.awaited = 0;
    });
});
