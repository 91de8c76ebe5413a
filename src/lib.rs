//! fanout: a WebSocket pub/sub and chat server.
//!
//! The architecture, one module per concept:
//! - [`server`]: starts one [`reactor`] per core, owns signals, the graceful drain and the exit
//!   of a node whose reactor died (the "App").
//! - [`node`]: what the reactors of one node share (configuration, mailboxes, counters, flags).
//! - [`reactor`]: the per-thread mio event loop; nothing in it is shared with other threads (the "Loop").
//! - [`connection`]: one client's state machine (HTTP request, WebSocket, closing, dead) and its
//!   bounded outgoing queue.
//! - [`ws`]: the RFC 6455 frame codec and close codes.
//! - [`http`]: request parsing with limits, routing, responses, the upgrade handshake.
//! - [`protocol`]: channel names, the JSON command protocol and the delivery envelope.
//! - [`broker`]: the per-reactor channel table, the cross-reactor bus, and the links to Redis
//!   (one server or a cluster, over TCP or TLS).
//! - [`metrics`]: per-reactor counters summed at scrape time, Prometheus exposition.
//! - [`config`]: flags, their environment variables and the TOML file; channel namespaces.
//! - [`auth`]: connection tokens (JWT): who a client is and what its token lets it do.
//! - [`api`]: the server API for the application's backend (`--api-listen`), on its own thread.

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod http;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod reactor;
pub mod server;
pub mod ws;
