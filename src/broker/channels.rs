//! The channel table of one reactor: channel name to local subscribers.
//!
//! Channels and their subscriber lists are slabs, so subscribing, unsubscribing and closing a
//! connection are O(1) however many subscribers a channel has; a connection remembers where it
//! sits in each channel it joined.

use std::collections::HashMap;

use bytes::Bytes;
use slab::Slab;

use crate::ws::deflate::Agreed;

/// One local subscriber: a connection key in the reactor's slab and how it wants messages.
#[derive(Debug, Clone, Copy)]
pub struct Subscriber {
    pub conn: usize,
    pub json: bool,
    /// permessage-deflate parameters, when the connection negotiated it.
    pub deflate: Option<Agreed>,
    /// Wants the channel's join and leave events (JSON subscribers of channels with presence).
    pub presence_events: bool,
    /// Gets no live messages yet: its `ok` waits for the channel's history position (and, when
    /// it asked, the messages it missed), which arrives in the same stream as the live ones;
    /// everything before it is older than that position. See `reactor::recovery`.
    pub waiting: bool,
}

#[derive(Debug)]
pub struct Channel {
    pub name: Bytes,
    pub subscribers: Slab<Subscriber>,
    /// How many subscribers want the JSON envelope, so it is built only when someone needs it.
    pub json_subscribers: usize,
}

/// Where one subscription sits: the channel's slot and the subscriber's slot in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    pub channel: u32,
    pub slot: u32,
}

#[derive(Debug, Default)]
pub struct Channels {
    by_name: HashMap<Bytes, usize>,
    slots: Slab<Channel>,
}

impl Channels {
    /// Adds a subscriber; `true` when this is the channel's first local subscriber (time to tell
    /// Redis).
    pub fn subscribe(&mut self, name: &[u8], conn: usize, json: bool) -> (Subscription, bool) {
        self.subscribe_as(
            name,
            Subscriber {
                conn,
                json,
                deflate: None,
                presence_events: false,
                waiting: false,
            },
        )
    }

    /// [`Channels::subscribe`] with every property of the subscriber given.
    pub fn subscribe_as(&mut self, name: &[u8], subscriber: Subscriber) -> (Subscription, bool) {
        let (id, first) = match self.by_name.get(name) {
            Some(&id) => (id, false),
            None => {
                let name = Bytes::copy_from_slice(name);
                let id = self.slots.insert(Channel {
                    name: name.clone(),
                    subscribers: Slab::new(),
                    json_subscribers: 0,
                });
                self.by_name.insert(name, id);
                (id, true)
            }
        };
        let channel = &mut self.slots[id];
        let slot = channel.subscribers.insert(subscriber);
        channel.json_subscribers += subscriber.json as usize;
        (
            Subscription {
                channel: id as u32,
                slot: slot as u32,
            },
            first,
        )
    }

    /// Removes a subscriber; returns the channel's name when it was the last one (the channel is
    /// gone and Redis can be told).
    pub fn unsubscribe(&mut self, sub: Subscription) -> Option<Bytes> {
        let id = sub.channel as usize;
        let channel = self.slots.get_mut(id)?;
        let removed = channel.subscribers.try_remove(sub.slot as usize)?;
        channel.json_subscribers -= removed.json as usize;
        if !channel.subscribers.is_empty() {
            return None;
        }
        let channel = self.slots.remove(id);
        self.by_name.remove(&channel.name);
        Some(channel.name)
    }

    /// The slot of a channel, to compare with a connection's subscriptions.
    pub fn id(&self, name: &[u8]) -> Option<u32> {
        self.by_name.get(name).map(|&id| id as u32)
    }

    pub fn get(&self, name: &[u8]) -> Option<&Channel> {
        self.by_name.get(name).map(|&id| &self.slots[id])
    }

    /// One subscriber, to change how it is served (never to move it: see `subscribe_as`).
    pub fn subscriber_mut(&mut self, sub: Subscription) -> Option<&mut Subscriber> {
        self.slots
            .get_mut(sub.channel as usize)?
            .subscribers
            .get_mut(sub.slot as usize)
    }

    pub fn channel(&self, sub: Subscription) -> Option<&Channel> {
        self.slots.get(sub.channel as usize)
    }

    pub fn names(&self) -> impl Iterator<Item = &Bytes> {
        self.slots.iter().map(|(_, c)| &c.name)
    }

    /// Every channel's name with its number of local subscribers.
    pub fn counts(&self) -> impl Iterator<Item = (&Bytes, usize)> {
        self.slots
            .iter()
            .map(|(_, c)| (&c.name, c.subscribers.len()))
    }

    /// Every channel with its subscriptions and their connection keys (for invariant checks).
    pub fn audit_view(
        &self,
    ) -> impl Iterator<Item = (&Bytes, impl Iterator<Item = (Subscription, usize)> + '_)> {
        self.slots.iter().map(|(id, c)| {
            let subs = c.subscribers.iter().map(move |(slot, s)| {
                (
                    Subscription {
                        channel: id as u32,
                        slot: slot as u32,
                    },
                    s.conn,
                )
            });
            (&c.name, subs)
        })
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_subscriber() {
        let mut c = Channels::default();
        let (a, first) = c.subscribe(b"room", 1, false);
        assert!(first);
        let (b, first) = c.subscribe(b"room", 2, true);
        assert!(!first);
        assert_eq!(c.get(b"room").unwrap().json_subscribers, 1);
        assert_eq!(c.unsubscribe(a), None);
        assert_eq!(c.unsubscribe(a), None, "double unsubscribe is harmless");
        assert_eq!(c.unsubscribe(b).as_deref(), Some(&b"room"[..]));
        assert!(c.get(b"room").is_none());
        assert!(c.is_empty());
    }
}
