//! `GET /api/history?channel=C&limit=N`: the newest messages of a channel with history, as the
//! WebSocket `history` command answers them (the same JSON, built by the same code).
//!
//! Standalone the node's store is read at once; with Redis the Redis reactor runs the read
//! script and answers the API thread ([`crate::broker::bus::ApiReply::History`]).

use bytes::Bytes;

use super::http::{self, Response};
use crate::broker::bus::{Purpose, ReadFor, Request, Ticket};
use crate::broker::history::{Page, Range};
use crate::broker::redis::AckTo;
use crate::node::Shared;
use crate::protocol::{self, DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};

/// Largest answer body: what one request can make the node build and hold for its client.
const MAX_ANSWER: usize = 4 << 20;

/// A history request that passed its checks.
pub enum Asked {
    /// Answered at once (standalone).
    Now(Response),
    /// Sent to the Redis reactor: the answer comes as an `ApiReply::History`.
    Sent { channel: Bytes },
}

/// Checks the query and reads the history, or asks the Redis reactor to.
pub fn request(shared: &Shared, ticket: Ticket, query: &str) -> Result<Asked, Response> {
    let name = crate::http::query_param(query, "channel")
        .ok_or_else(|| http::error(400, "channel: missing; ask /api/history?channel=NAME"))?;
    protocol::validate_channel(name.as_bytes())
        .map_err(|e| http::error(400, &format!("channel: {e}")))?;
    let limit = match crate::http::query_param(query, "limit") {
        None => DEFAULT_HISTORY_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_HISTORY_LIMIT).contains(&n) => n,
            _ => {
                return Err(http::error(
                    400,
                    &format!("limit: {text:?}; a whole number from 1 to {MAX_HISTORY_LIMIT}"),
                ))
            }
        },
    };
    let ns = shared.config.namespace_for(&name);
    if ns.history_size == 0 {
        return Err(http::error(
            400,
            &format!(
                "history is off for channel {name:?} (namespace {:?} has no history_size)",
                ns.pattern
            ),
        ));
    }
    let channel = Bytes::copy_from_slice(name.as_bytes());
    let most = limit.min(ns.history_size);
    if !shared.config.uses_redis() {
        let page = shared
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(
                &channel,
                Range::Newest,
                most,
                ns.history_ttl,
                std::time::Instant::now(),
            );
        return Ok(Asked::Now(answer(&channel, &page)));
    }
    let read = ReadFor {
        reply_to: AckTo::Api,
        conn: ticket.conn,
        serial: ticket.serial,
        id: None,
        channel: channel.clone(),
        purpose: Purpose::History { limit },
    };
    let hub = shared.reactors.first().map(|r| &r.mailbox);
    match hub.map(|m| m.request(Request::Read(Box::new(read)))) {
        Some(Ok(())) => Ok(Asked::Sent { channel }),
        _ => Err(http::error(
            429,
            "the node's queue to Redis is full; retry shortly",
        )),
    }
}

/// The 200 answer for a page, or the error of a read that failed.
pub fn response(channel: &Bytes, result: &Result<Page, String>) -> Response {
    match result {
        Ok(page) => answer(channel, page),
        Err(why) => http::error(503, &format!("history unavailable: {why}")),
    }
}

fn answer(channel: &Bytes, page: &Page) -> Response {
    let mut body = Vec::with_capacity(256);
    body.push(b'{');
    let kept = page.messages.iter().map(|m| protocol::Kept {
        offset: m.offset,
        payload: m.payload(),
        from: m.author(),
    });
    protocol::history_body(&mut body, channel, &page.epoch, page.top, kept, MAX_ANSWER);
    body.push(b'}');
    http::json(200, "", &body)
}
