//! The federation relay: sessions with platforms and broadcasters over QUIC and WebSocket,
//! routing, and the durable store-and-forward queue between them.
//!
//! - [`config`], [`demo`], [`tls`]: start-up.
//! - [`transport`]: QUIC and WebSocket, bytes in and out.
//! - [`session`]: one peer's handshake and frame loop.
//! - [`router`]: the owner of queue state; [`record`]: what is stored per item.
//! - [`store`]: the durable queue (redb, or sled behind a feature) and its group-commit writer.
//! - [`admin`], [`metrics`]: probes, Prometheus, the /v1 API.
//! - [`server`]: assembles it all; [`registry`]: who may connect.

pub mod admin;
pub mod campaign;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod record;
pub mod registry;
pub mod router;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
pub mod transport;
