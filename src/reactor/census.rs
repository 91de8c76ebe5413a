//! A reactor's side of the cluster-wide channel census ([`crate::broker::census`] has the
//! whole exchange): on the Redis reactor, sending an asking node's request and handing its
//! count back, starting a census another node asked for, and passing the parts that arrive on
//! this node's reply channel to the API thread; on every reactor, writing its own part.
//!
//! Kept out of `hub.rs`, which only routes to these functions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis_protocol::resp3::types::BytesFrame;

use super::calls::Call;
use super::Reactor;
use crate::broker::bus::CensusRequest;
use crate::broker::bus::{ApiReply, Control, Request, Ticket};
use crate::broker::census::{self, AskBudget};
use crate::broker::control::{self, ChannelsAsk};
use crate::node::Shared;

/// The node's Redis reactor is reactor 0.
const HUB: usize = 0;

/// How often a census refused or dropped is logged at warn level (each is at debug level).
const WARN_EVERY: Duration = Duration::from_secs(30);

/// What the Redis reactor keeps for censuses.
#[derive(Default)]
pub(super) struct CensusState {
    /// This node's reply channel, when it runs the server API (and so asks).
    pub(super) reply: Option<Bytes>,
    budget: AskBudget,
    warned: Option<Instant>,
}

impl CensusState {
    pub(super) fn new(reply: Option<Bytes>) -> CensusState {
        CensusState {
            reply,
            ..CensusState::default()
        }
    }
}

/// The reply channel this node subscribes, if any: only a node with `--api-listen` asks.
pub(super) fn reply_channel(shared: &Shared) -> Option<Bytes> {
    shared
        .config
        .api
        .as_ref()
        .map(|_| census::reply_channel(&shared.node_id))
}

impl Reactor {
    /// The Redis reactor: whether `channel` is this node's reply channel.
    pub(super) fn is_census_reply(&self, channel: &[u8]) -> bool {
        self.hub
            .as_ref()
            .and_then(|h| h.census.reply.as_deref())
            .is_some_and(|reply| reply == channel)
    }

    /// The Redis reactor: something a census needs sent.
    pub(super) fn on_census_request(&mut self, request: CensusRequest) {
        let (Some(hub), Some(redis)) = (&mut self.hub, &mut self.redis) else {
            if let CensusRequest::Ask { ticket, .. } = request {
                let result = Err("the node has no Redis link".to_string());
                self.shared
                    .api_reply(ApiReply::CensusSent { ticket, result });
            }
            return;
        };
        let registry = self.poll.registry();
        match request {
            CensusRequest::Ask { ticket, payload } => {
                // A call rather than a publish: its reply is the number of subscribers that got
                // the request, which is how many nodes the asker waits for.
                let verb: &'static [u8] = if redis.is_cluster() {
                    b"SPUBLISH"
                } else {
                    b"PUBLISH"
                };
                let args = [
                    Bytes::from_static(verb),
                    redis.redis_name(control::CHANNEL),
                    payload,
                ];
                let tag = hub.calls.next_tag();
                match redis.call(
                    control::CHANNEL,
                    args.into_iter(),
                    tag,
                    registry,
                    self.clock.now,
                ) {
                    Ok(()) => hub.calls.sent(tag, Call::Census { ticket }),
                    Err(refused) => {
                        let result = Err(refused.message().to_string());
                        self.shared
                            .api_reply(ApiReply::CensusSent { ticket, result });
                    }
                }
            }
            CensusRequest::Answer { channel, payload } => {
                if let Err((refused, _)) =
                    redis.publish(&channel, payload, None, registry, self.clock.now)
                {
                    log::debug!("census: a part was not sent: {}", refused.message());
                }
            }
        }
    }

    /// The Redis reactor: Redis answered the publish of this node's census request.
    pub(super) fn on_census_sent(&mut self, ticket: Ticket, result: Result<BytesFrame, String>) {
        let result = result.and_then(|frame| match frame {
            BytesFrame::Number { data, .. } => {
                u64::try_from(data).map_err(|_| format!("PUBLISH answered {data}"))
            }
            other => Err(format!("PUBLISH answered {other:?}")),
        });
        self.shared
            .api_reply(ApiReply::CensusSent { ticket, result });
    }

    /// The Redis reactor: another node asks for this node's channels. Each reactor answers for
    /// itself; at most `census::ASKS_PER_SECOND` censuses start here per second.
    pub(super) fn on_census_asked(&mut self, ask: ChannelsAsk) {
        let now = self.clock.now;
        let Some(hub) = &mut self.hub else {
            return;
        };
        if !hub.census.budget.take(now) {
            let warn = hub
                .census
                .warned
                .is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
            if warn {
                hub.census.warned = Some(now);
                log::warn!(
                    "census: more than {} channel lists asked per second; node {:?}'s request {} is not answered",
                    census::ASKS_PER_SECOND,
                    ask.node,
                    ask.req
                );
            } else {
                log::debug!("census: request {} of node {:?} ignored", ask.req, ask.node);
            }
            return;
        }
        let ask = Arc::new(ask);
        for (i, r) in self.shared.reactors.iter().enumerate() {
            if r.mailbox.try_control(Control::Census(ask.clone())).is_err() {
                log::debug!("census: reactor {i}'s control queue is full; it does not answer");
            }
        }
    }

    /// Any reactor: lists its channels under the request's prefix as one part and hands it
    /// to the Redis reactor for the asker's reply channel.
    pub(super) fn census_part(&mut self, ask: &ChannelsAsk) {
        let prefix = ask.prefix.as_bytes();
        let payload = census::encode_part(
            ask.req,
            &self.shared.node_id,
            self.index,
            self.shared.reactors.len(),
            self.channels
                .counts()
                .filter(|(name, _)| name.starts_with(prefix)),
        );
        let request = Request::Census(CensusRequest::Answer {
            channel: census::reply_channel(&ask.node),
            payload,
        });
        let sent = self
            .shared
            .reactors
            .get(HUB)
            .is_some_and(|hub| hub.mailbox.request(request).is_ok());
        if !sent {
            log::debug!("census: the queue to the Redis reactor is full; this part is lost");
        }
    }

    /// The Redis reactor of a node with the server API: a part on its reply channel.
    pub(super) fn on_census_part(&mut self, payload: Bytes) {
        if payload.len() > census::MAX_PART_BYTES {
            log::debug!("census: a {} byte part ignored", payload.len());
            return;
        }
        let queued = self
            .shared
            .api
            .as_ref()
            .is_some_and(|api| api.census_part(payload));
        if !queued {
            log::debug!("census: a part dropped: the API thread has too many waiting");
        }
    }
}
