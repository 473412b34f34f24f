//! Federation protocol v1, the reference implementation.
//!
//! Everything here is sans-IO: no sockets, no tokio, no clocks or randomness that the caller
//! does not pass in. The relay, the client SDK, the stress tool and the fuzzers all drive the
//! same code, so they cannot disagree on the wire format.
//!
//! - [`proto`]: the frame types generated from `proto/federation.proto`.
//! - [`frame`]: length-prefixed framing, encode and a streaming decoder.
//! - [`address`]: peer ids and `user@platform` addresses.
//! - [`signing`]: what is signed, signing, single and batch verification.
//! - [`handshake`]: the mutual-authentication state machines for both ends.
//! - [`message`]: checks a Deliver, Receipt or campaign frame against the protocol's rules.
//! - [`lane`]: lanes and their TTL policy.
//! - [`keyfile`]: the key file format the tools share.

pub mod address;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod json;
pub mod keyfile;
pub mod lane;
pub mod message;
pub mod signing;

/// The generated protobuf types of `relayfed.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/relayfed.v1.rs"));
}

pub use error::ProtocolError;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// QUIC ALPN identifier of v1.
pub const ALPN: &[u8] = b"relay-fed/1";
/// WebSocket subprotocol name of v1.
pub const WS_SUBPROTOCOL: &str = "relay-fed.v1";
/// TLS exporter label for the channel binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-relay-fed/v1";
