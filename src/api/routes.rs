//! The server API's endpoints: which requests exist and who may make them ([`check`]), what
//! each does ([`handle`]), and the answers some of them wait for from the reactors and Redis
//! ([`Pending`]).
//!
//! A publish goes where a client's would: standalone, straight into every reactor's message
//! queue (answered once every reactor took it); with Redis, to the node's Redis reactor as a
//! PUBLISH whose acknowledgement comes back here. Disconnects and channel lists go to every
//! reactor's control queue, and a disconnect also to Redis, on the nodes' control channel
//! (`broker::control`), for the other nodes. The server publishes to any channel: namespace
//! rules bind clients only.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::census::{Gather, MAX_CENSUSES};
use super::history::Asked;
use super::http::{self, Head, Response};
use super::keys::ApiKeys;
use crate::broker::bus::CensusRequest;
use crate::broker::bus::{ApiReply, Control, Request, Ticket};
use crate::broker::census::Part;
use crate::broker::history::Page;
use crate::broker::redis::{Ack, AckTo, Refused};
use crate::broker::{control, origin, Message};
use crate::node::Shared;
use crate::protocol::{self, validate_channel};
use crate::ws::{frame, OpCode};

/// The OpenAPI 3.1 description of this API, served at `/api/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Most channels one broadcast may name.
pub const MAX_BROADCAST: usize = 1000;
/// Most channels `/api/channels` lists (each reactor sends at most this many, the merge keeps
/// the first by name); `truncated` says there were more, and then which ones are listed is not
/// defined: narrow with `prefix`.
pub const MAX_LISTED: usize = 10_000;
/// Most answers the API thread may be owed by the reactors and Redis at once (see
/// `broker::bus`): past it a request that needs answers gets 429.
pub const MAX_AWAITED: usize = 64 * 1024;
/// Longest user id accepted by `/api/disconnect`, in characters (a token's `sub` has at most
/// 256 bytes).
const MAX_USER_CHARS: usize = 256;

/// The endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Publish,
    Broadcast,
    Disconnect,
    Channels,
    History,
    Info,
    OpenApi,
}

const ROUTES: [(&str, Route, &str); 7] = [
    ("/api/publish", Route::Publish, "POST"),
    ("/api/broadcast", Route::Broadcast, "POST"),
    ("/api/disconnect", Route::Disconnect, "POST"),
    ("/api/channels", Route::Channels, "GET"),
    ("/api/history", Route::History, "GET"),
    ("/api/info", Route::Info, "GET"),
    ("/api/openapi.json", Route::OpenApi, "GET"),
];

impl Route {
    /// Its label in `/metrics` (one of `metrics::API_ROUTES`).
    pub fn label(self) -> &'static str {
        match self {
            Route::Publish => "publish",
            Route::Broadcast => "broadcast",
            Route::Disconnect => "disconnect",
            Route::Channels => "channels",
            Route::History => "history",
            Route::Info => "info",
            Route::OpenApi => "openapi",
        }
    }
}

/// The route a path names, whatever the method or key (for counting the answer).
pub fn route_of(path: &str) -> Option<Route> {
    ROUTES
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|&(_, route, _)| route)
}

/// What a request may be told before its body is read: 404, 405, 401 or 415; else its route.
pub fn check(head: &Head, keys: &ApiKeys) -> Result<Route, Response> {
    let Some(&(_, route, method)) = ROUTES.iter().find(|(path, _, _)| *path == head.path) else {
        let paths: Vec<&str> = ROUTES.iter().map(|(p, _, _)| *p).collect();
        return Err(http::error(
            404,
            &format!(
                "no such path {:?}; the API has {}",
                head.path,
                paths.join(", ")
            ),
        ));
    };
    if head.method != method {
        return Err(http::error_with(
            405,
            &format!("Allow: {method}\r\n"),
            &format!("{} takes {method} only", head.path),
        ));
    }
    // The description of the API is public; everything else needs a key.
    if route != Route::OpenApi && !keys.accepts(head.authorization.as_deref()) {
        let why = if head.authorization.is_some() {
            "wrong API key: expected Authorization: apikey KEY with one of the node's --api-key"
        } else {
            "an API key is required: Authorization: apikey KEY"
        };
        return Err(http::error_with(401, "WWW-Authenticate: apikey\r\n", why));
    }
    if method == "POST" && !head.json {
        return Err(http::error(
            415,
            "the body must be JSON, sent with Content-Type: application/json",
        ));
    }
    Ok(route)
}

/// What a request comes to: an answer now, or answers to wait for first.
pub enum Outcome {
    Respond(Response),
    Wait(Pending),
}

/// A request waiting for answers from the reactors or Redis.
pub struct Pending {
    kind: Kind,
    /// Answers still to come.
    left: usize,
    /// The first thing that went wrong: status and reason.
    failure: Option<(u16, String)>,
}

enum Kind {
    /// PUBLISHes to `total` channels (of a broadcast, or the one of a publish), `published` of
    /// them acknowledged so far.
    Publish {
        broadcast: bool,
        total: usize,
        published: usize,
    },
    Disconnect {
        closed: usize,
    },
    Channels {
        merged: BTreeMap<Bytes, usize>,
        truncated: bool,
        /// With Redis: the other nodes' answers (`None` standalone, where this node is all).
        census: Option<Gather>,
    },
    History {
        channel: Bytes,
        result: Option<Result<Page, String>>,
    },
}

/// Who is asking, and the thread's count of answers it is owed.
pub struct Ctx<'a> {
    pub shared: &'a Shared,
    pub ticket: Ticket,
    pub awaited: &'a mut usize,
    /// Cluster-wide channel lists under way (see [`MAX_CENSUSES`]).
    pub censuses: usize,
    pub now: Instant,
}

impl Ctx<'_> {
    fn ack(&self) -> Ack {
        Ack {
            to: AckTo::Api,
            conn: self.ticket.conn,
            conn_serial: self.ticket.serial,
            id: None,
        }
    }

    /// 429 unless `n` more answers fit [`MAX_AWAITED`].
    fn room_for(&self, n: usize) -> Result<(), Response> {
        if self.awaited.saturating_add(n) > MAX_AWAITED {
            return Err(http::error(
                429,
                "too many API requests wait for the node's reactors or Redis; retry shortly",
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody<'a> {
    #[serde(borrow)]
    channels: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
}

fn bad_body(e: serde_json::Error) -> Response {
    http::error(400, &format!("invalid JSON body: {e}"))
}

fn ok(body: Value) -> Response {
    http::json(200, "", body.to_string().as_bytes())
}

/// Carries out a request whose head passed [`check`] and whose body has arrived.
pub fn handle(route: Route, head: &Head, body: &[u8], ctx: &mut Ctx) -> Outcome {
    let posted = matches!(route, Route::Publish | Route::Broadcast | Route::Disconnect);
    if posted && body.trim_ascii_start().first() != Some(&b'{') {
        // serde would take an array for a struct, field by field in order: not what we document.
        return Outcome::Respond(http::error(
            400,
            "invalid JSON body: expected a JSON object",
        ));
    }
    let result = match route {
        Route::Publish => serde_json::from_slice::<PublishBody>(body)
            .map_err(bad_body)
            .and_then(|b| {
                let channel = channel_name(&b.channel, "channel")?;
                publish(ctx, false, vec![channel], &protocol::payload_of(b.data))
            }),
        Route::Broadcast => serde_json::from_slice::<BroadcastBody>(body)
            .map_err(bad_body)
            .and_then(|b| {
                if b.channels.is_empty() || b.channels.len() > MAX_BROADCAST {
                    return Err(http::error(
                        400,
                        &format!(
                            "channels: {} names; a broadcast names 1 to {MAX_BROADCAST}",
                            b.channels.len()
                        ),
                    ));
                }
                let channels = b
                    .channels
                    .iter()
                    .enumerate()
                    .map(|(i, c)| channel_name(c, &format!("channels[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                publish(ctx, true, channels, &protocol::payload_of(b.data))
            }),
        Route::Disconnect => serde_json::from_slice::<DisconnectBody>(body)
            .map_err(bad_body)
            .and_then(|b| {
                let chars = b.user.chars().count();
                if chars == 0 || chars > MAX_USER_CHARS {
                    return Err(http::error(
                        400,
                        &format!("user: {chars} characters; a user id has 1 to {MAX_USER_CHARS}"),
                    ));
                }
                disconnect(ctx, b.user.into())
            }),
        Route::Channels => channels(ctx, &head.query),
        Route::History => history(ctx, &head.query),
        Route::Info => Ok(Outcome::Respond(info(ctx.shared))),
        Route::OpenApi => Ok(Outcome::Respond(http::json(200, "", OPENAPI.as_bytes()))),
    };
    result.unwrap_or_else(Outcome::Respond)
}

fn history(ctx: &mut Ctx, query: &str) -> Result<Outcome, Response> {
    ctx.room_for(1)?;
    match super::history::request(ctx.shared, ctx.ticket, query)? {
        Asked::Now(response) => Ok(Outcome::Respond(response)),
        Asked::Sent { channel } => {
            *ctx.awaited += 1;
            Ok(Outcome::Wait(Pending {
                kind: Kind::History {
                    channel,
                    result: None,
                },
                left: 1,
                failure: None,
            }))
        }
    }
}

fn channel_name(name: &str, field: &str) -> Result<Bytes, Response> {
    validate_channel(name.as_bytes()).map_err(|e| http::error(400, &format!("{field}: {e}")))?;
    Ok(Bytes::copy_from_slice(name.as_bytes()))
}

/// Publishes `payload` to every channel, as a JSON client's publish would (a text message);
/// `broadcast` says which endpoint asked, for the answer.
fn publish(
    ctx: &mut Ctx,
    broadcast: bool,
    channels: Vec<Bytes>,
    payload: &[u8],
) -> Result<Outcome, Response> {
    let shared = ctx.shared;
    let max = shared.config.max_message;
    if payload.len() > max {
        return Err(http::error(
            413,
            &format!(
                "data publishes {} bytes; the node's --max-message is {max}",
                payload.len()
            ),
        ));
    }
    let total = channels.len();
    let summary = |done: usize| {
        if broadcast {
            format!("; {done} of {total} channels published")
        } else {
            String::new()
        }
    };
    if !shared.config.uses_redis() {
        // Framed once; every channel's message and every reactor's copy share the buffer.
        let (frame, payload_at) =
            frame::encode_with(OpCode::Text, payload.len(), |buf| buf.put_slice(payload));
        let mut full = Vec::new();
        for channel in channels {
            let keep = shared.history_of(&channel);
            let msg = Message::from_frame(channel, frame.clone(), payload_at);
            let missed = match keep {
                Some(keep) => shared.publish_kept(msg, keep, ctx.now, true),
                None => (shared.reactors.iter().enumerate())
                    .filter(|(_, r)| r.mailbox.try_deliver(msg.clone()).is_err())
                    .map(|(i, _)| i)
                    .collect(),
            };
            for i in missed {
                if !full.contains(&i) {
                    full.push(i);
                }
            }
        }
        if !full.is_empty() {
            let list: Vec<String> = full.iter().map(usize::to_string).collect();
            return Err(http::error(
                429,
                &format!(
                    "the queue of reactor {} of this node is full: its subscribers did not get the message (the other reactors' did)",
                    list.join(", ")
                ),
            ));
        }
        return Ok(Outcome::Respond(if broadcast {
            ok(json!({"ok": true, "channels": total}))
        } else {
            ok(json!({"ok": true}))
        }));
    }
    ctx.room_for(total)?;
    let payload = origin::wrap(Bytes::copy_from_slice(payload), None);
    let Some(hub) = shared.reactors.first() else {
        return Err(http::error(503, "the node has no Redis reactor"));
    };
    let mut sent = 0;
    let mut failure = None;
    for channel in channels {
        let request = Request::Publish {
            channel,
            payload: payload.clone(),
            ack: Some(ctx.ack()),
        };
        if hub.mailbox.request(request).is_err() {
            failure = Some((
                429,
                format!(
                    "the node's queue to Redis is full; message not published{}",
                    summary(sent)
                ),
            ));
            break;
        }
        sent += 1;
    }
    *ctx.awaited += sent;
    let pending = Pending {
        kind: Kind::Publish {
            broadcast,
            total,
            published: 0,
        },
        left: sent,
        failure,
    };
    Ok(pending.settled_or_wait())
}

/// Closes every WebSocket of `user` on this node, and asks the other nodes to through Redis.
fn disconnect(ctx: &mut Ctx, user: Arc<str>) -> Result<Outcome, Response> {
    let shared = ctx.shared;
    let redis = shared.config.uses_redis();
    ctx.room_for(shared.reactors.len() + usize::from(redis))?;
    let mut pending = Pending {
        kind: Kind::Disconnect { closed: 0 },
        left: 0,
        failure: None,
    };
    for (i, r) in shared.reactors.iter().enumerate() {
        let request = Control::Disconnect {
            user: user.clone(),
            reply: Some(ctx.ticket),
        };
        match r.mailbox.try_control(request) {
            Ok(()) => pending.left += 1,
            Err(_) => pending.fail(
                429,
                format!("reactor {i} of this node has too many requests waiting; retry shortly"),
            ),
        }
    }
    if redis {
        let request = Request::Publish {
            channel: Bytes::from_static(control::CHANNEL),
            payload: control::disconnect(&user, &shared.node_id),
            ack: Some(ctx.ack()),
        };
        match shared
            .reactors
            .first()
            .map(|hub| hub.mailbox.request(request))
        {
            Some(Ok(())) => pending.left += 1,
            _ => pending.fail(
                429,
                "the node's queue to Redis is full; the other nodes were not told".into(),
            ),
        }
    }
    *ctx.awaited += pending.left;
    Ok(pending.settled_or_wait())
}

/// Lists the channels with their subscribers: this node's, summed over its reactors, and with
/// Redis every other node's too, through a census over the control channel (see
/// [`crate::broker::census`]).
fn channels(ctx: &mut Ctx, query: &str) -> Result<Outcome, Response> {
    let prefix = crate::http::query_param(query, "prefix").unwrap_or_default();
    // Counted in characters, as the schema's maxLength is; a prefix no channel can have
    // matches nothing.
    let chars = prefix.chars().count();
    if chars > protocol::MAX_CHANNEL_LEN {
        return Err(http::error(
            400,
            &format!(
                "prefix: {chars} characters; a channel name has at most {}",
                protocol::MAX_CHANNEL_LEN
            ),
        ));
    }
    let shared = ctx.shared;
    let redis = shared.config.uses_redis();
    if redis && ctx.censuses >= MAX_CENSUSES {
        return Err(http::error(
            429,
            &format!(
                "{MAX_CENSUSES} cluster-wide channel lists are under way on this node already; retry shortly"
            ),
        ));
    }
    ctx.room_for(shared.reactors.len() + usize::from(redis))?;
    let prefix: Arc<str> = prefix.into();
    let mut pending = Pending {
        kind: Kind::Channels {
            merged: BTreeMap::new(),
            truncated: false,
            census: redis.then(|| Gather::new(ctx.now)),
        },
        left: 0,
        failure: None,
    };
    for (i, r) in shared.reactors.iter().enumerate() {
        let request = Control::Channels {
            prefix: prefix.clone(),
            limit: MAX_LISTED,
            reply: ctx.ticket,
        };
        match r.mailbox.try_control(request) {
            Ok(()) => pending.left += 1,
            Err(_) => pending.fail(
                429,
                format!("reactor {i} of this node has too many requests waiting; retry shortly"),
            ),
        }
    }
    *ctx.awaited += pending.left;
    if redis && pending.failure.is_none() {
        // The request names this API request by its serial, unique on this node: the other
        // nodes' parts carry it back.
        let request = Request::Census(CensusRequest::Ask {
            ticket: ctx.ticket,
            payload: control::ask_channels(&shared.node_id, ctx.ticket.serial, &prefix),
        });
        let sent = shared
            .reactors
            .first()
            .is_some_and(|hub| hub.mailbox.request(request).is_ok());
        if sent {
            // Owed to the thread, but not to this request's `left`: the answer goes out at
            // the census deadline with or without Redis' count.
            *ctx.awaited += 1;
        } else if let Kind::Channels {
            census: Some(g), ..
        } = &mut pending.kind
        {
            g.sent(Err(
                "the node's queue to Redis is full; the other nodes were not asked".into(),
            ));
        }
    }
    Ok(pending.settled_or_wait())
}

fn info(shared: &Shared) -> Response {
    use std::sync::atomic::Ordering;
    ok(json!({
        "node": shared.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "broker": shared.broker_kind(),
        "connections": shared.open_ws.load(Ordering::Acquire),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "ready": shared.readiness().is_ok(),
    }))
}

/// Adds one reactor's (or node's) counts to a channel list, keeping it to [`MAX_LISTED`]
/// names (the first by name) so the merge stays bounded.
fn merge(merged: &mut BTreeMap<Bytes, usize>, truncated: &mut bool, channels: Vec<(Bytes, usize)>) {
    // A count of 0 (only another Redis client could send one) would list a channel nobody is in.
    for (name, n) in channels.into_iter().filter(|(_, n)| *n > 0) {
        let count = merged.entry(name).or_default();
        *count = count.saturating_add(n);
    }
    if merged.len() > MAX_LISTED {
        while merged.len() > MAX_LISTED {
            merged.pop_last();
        }
        *truncated = true;
    }
}

/// The status a failed acknowledgement of Redis gets: 429 for a full queue, 503 otherwise.
fn ack_failure(why: &str) -> u16 {
    if why == Refused::Backlog.message() {
        429
    } else {
        503
    }
}

impl Pending {
    fn fail(&mut self, status: u16, why: String) {
        self.failure.get_or_insert((status, why));
    }

    /// Answers now if nothing is awaited (everything was refused at once), else waits.
    fn settled_or_wait(self) -> Outcome {
        if self.settled() {
            Outcome::Respond(self.response())
        } else {
            Outcome::Wait(self)
        }
    }

    /// Nothing more to wait for: every answer of this node came, and with a census, every
    /// other node's (or the request failed here already).
    fn settled(&self) -> bool {
        match &self.kind {
            _ if self.failure.is_some() && self.left == 0 => true,
            Kind::Channels {
                census: Some(g), ..
            } => self.left == 0 && g.settled(),
            _ => self.left == 0,
        }
    }

    /// Whether this request is a cluster-wide channel list (counted against [`MAX_CENSUSES`]).
    pub fn is_census(&self) -> bool {
        matches!(
            self.kind,
            Kind::Channels {
                census: Some(_),
                ..
            }
        )
    }

    /// When a census stops waiting for the other nodes and answers with what it has.
    pub fn census_until(&self) -> Option<Instant> {
        match &self.kind {
            Kind::Channels {
                census: Some(g), ..
            } => Some(g.until),
            _ => None,
        }
    }

    /// A census whose wait is over (this node's own answers all in): answer now, incomplete.
    pub fn census_due(&self, now: Instant) -> bool {
        self.left == 0 && self.census_until().is_some_and(|until| now >= until)
    }

    /// One part of another node's answer to this census; the response once nothing more is
    /// awaited.
    pub fn on_part(&mut self, part: Part) -> Option<Response> {
        let Kind::Channels {
            merged,
            truncated,
            census: Some(g),
        } = &mut self.kind
        else {
            return None;
        };
        if !g.take(&part) {
            return None;
        }
        *truncated |= part.truncated;
        merge(merged, truncated, part.channels);
        self.settled().then(|| self.response())
    }

    /// Takes one answer; returns the response once the last has come.
    pub fn on_reply(&mut self, reply: ApiReply) -> Option<Response> {
        if let ApiReply::CensusSent { result, .. } = reply {
            // Not one of `left`: the census deadline answers without it if need be.
            if let Kind::Channels {
                census: Some(g), ..
            } = &mut self.kind
            {
                g.sent(result);
            }
            return self.settled().then(|| self.response());
        }
        self.left = self.left.saturating_sub(1);
        match (reply, &mut self.kind) {
            (ApiReply::Published { result, .. }, kind) => match result {
                Ok(()) => {
                    if let Kind::Publish { published, .. } = kind {
                        *published += 1;
                    }
                }
                Err(why) => {
                    let status = ack_failure(&why);
                    self.fail(status, why);
                }
            },
            (ApiReply::Disconnected { closed: n, .. }, Kind::Disconnect { closed }) => {
                *closed += n;
            }
            (
                ApiReply::Channels {
                    channels,
                    truncated: more,
                    ..
                },
                Kind::Channels {
                    merged, truncated, ..
                },
            ) => {
                *truncated |= more;
                merge(merged, truncated, channels);
            }
            (ApiReply::History { result, .. }, Kind::History { result: slot, .. }) => {
                *slot = Some(result);
            }
            // An answer of another kind cannot be for this request; it is only counted.
            _ => {}
        }
        self.settled().then(|| self.response())
    }

    /// The answer once nothing more is awaited; a request that waited past its deadline gets
    /// the same, from what arrived (see the API loop).
    pub fn response(&self) -> Response {
        match (&self.kind, &self.failure) {
            (
                Kind::Publish {
                    broadcast,
                    total,
                    published,
                },
                Some((status, why)),
            ) => {
                let why = if *broadcast {
                    format!("{why}; {published} of {total} channels published")
                } else {
                    why.clone()
                };
                http::error(*status, &why)
            }
            (
                Kind::Publish {
                    broadcast: true,
                    total,
                    ..
                },
                None,
            ) => ok(json!({"ok": true, "channels": total})),
            (Kind::Publish { .. }, None) => ok(json!({"ok": true})),
            (Kind::Disconnect { closed }, Some((status, why))) => http::error(
                *status,
                &format!("{why}; {closed} connections closed on this node"),
            ),
            (Kind::Disconnect { closed }, None) => ok(json!({"ok": true, "closed": closed})),
            (Kind::Channels { .. }, Some((status, why))) => http::error(*status, why),
            (Kind::History { channel, result }, _) => match result {
                Some(result) => super::history::response(channel, result),
                None => self.timed_out(),
            },
            (
                Kind::Channels {
                    merged,
                    truncated,
                    census,
                },
                None,
            ) => {
                let list: Vec<Value> = merged
                    .iter()
                    .map(|(name, n)| json!({"name": String::from_utf8_lossy(name), "subscribers": n}))
                    .collect();
                // Standalone this node is the whole cluster.
                let (complete, nodes, expected) =
                    census.as_ref().map_or((true, 1, Some(1)), Gather::summary);
                let mut body = json!({
                    "channels": list,
                    "truncated": truncated,
                    "complete": complete,
                    "nodes": nodes,
                    "nodes_expected": expected,
                });
                if let Some(why) = census.as_ref().and_then(Gather::failure) {
                    body["reason"] = Value::from(why);
                }
                ok(body)
            }
        }
    }

    /// A request whose deadline passed before every answer came.
    pub fn timed_out(&self) -> Response {
        http::error(
            504,
            &format!(
                "no answer from the node within the API's deadline ({} answers missing)",
                self.left
            ),
        )
    }
}
