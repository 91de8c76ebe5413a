//! What the server API (`--api-listen`, [`crate::api`]) asks of a reactor through its control
//! queue: close every connection of one user, and list the channels with local subscribers.
//! A disconnect can also come from another node, through Redis (`broker::control`); then
//! nobody waits for the answer. So can a census (`broker::census`): each reactor sends its
//! own part of the answer (`reactor::census`).

use std::sync::Arc;

use super::Reactor;
use crate::broker::bus::{ApiReply, Control, Ticket};
use crate::connection::Close;
use crate::metrics::CloseReason;
use crate::ws::CloseCode;

impl Reactor {
    /// One request from the control queue (the drain, or the server API's).
    pub(super) fn on_control(&mut self, control: Control) {
        match control {
            Control::Drain { deadline } => self.start_drain(deadline),
            Control::Disconnect { user, reply } => {
                let closed = self.disconnect_user(&user);
                if let Some(ticket) = reply {
                    self.shared
                        .api_reply(ApiReply::Disconnected { ticket, closed });
                }
            }
            Control::Channels {
                prefix,
                limit,
                reply,
            } => self.list_channels(&prefix, limit, reply),
            Control::Census(ask) => self.census_part(&ask),
        }
    }

    /// Closes every open WebSocket whose token's `sub` is `user` with 4002; returns how many.
    fn disconnect_user(&mut self, user: &Arc<str>) -> usize {
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_open() && c.identity().is_some_and(|i| *i.user == **user))
            .map(|(key, _)| key)
            .collect();
        for &key in &keys {
            self.close(
                key,
                Close::new(
                    CloseCode::Disconnected,
                    "disconnected by the server",
                    CloseReason::Disconnected,
                ),
            );
        }
        if !keys.is_empty() {
            log::debug!(
                "reactor {}: closed {} connections of user {user:?} (server API)",
                self.index,
                keys.len()
            );
        }
        keys.len()
    }

    fn list_channels(&mut self, prefix: &str, limit: usize, ticket: Ticket) {
        let mut channels = Vec::new();
        let mut truncated = false;
        for (name, subscribers) in self.channels.counts() {
            if !name.starts_with(prefix.as_bytes()) {
                continue;
            }
            if channels.len() == limit {
                truncated = true;
                break;
            }
            channels.push((name.clone(), subscribers));
        }
        self.shared.api_reply(ApiReply::Channels {
            ticket,
            channels,
            truncated,
        });
    }
}
