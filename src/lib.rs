//! fanout: a WebSocket pub/sub and chat server.
//!
//! The architecture, one module per concept:
//! - [`server`]: starts one [`reactor`] per core, owns signals and the graceful drain (the "App").
//! - [`reactor`]: the per-thread mio event loop; nothing in it is shared with other threads (the "Loop").
//! - [`connection`]: one client's state machine: HTTP request, then WebSocket, then closing.
//! - [`ws`]: the RFC 6455 frame codec and close codes.
//! - [`http`]: request parsing with limits, routing, responses, the upgrade handshake.
//! - [`protocol`]: channel names, the JSON command protocol and the delivery envelope.
//! - [`broker`]: the per-reactor channel table, the cross-reactor bus and the Redis link.
//! - [`metrics`]: per-reactor counters summed at scrape time, Prometheus exposition.
//! - [`config`]: command-line flags and their environment-variable equivalents.

pub mod broker;
pub mod config;
pub mod connection;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod reactor;
pub mod server;
pub mod ws;
