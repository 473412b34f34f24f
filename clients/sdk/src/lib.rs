//! Client SDK for the federation relay: connect as a platform, send messages and receipts,
//! receive deliveries and acknowledge them; or connect as a broadcaster and run campaigns
//! ([`ClientHandle::begin_campaign`], see [`Campaign`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use relay_client::{Ca, Client, ClientConfig, Event, OutgoingMessage};
//! use federation_spec::keyfile::KeyFile;
//!
//! let key = KeyFile::parse(&std::fs::read_to_string("alpha.key")?)?;
//! let config = ClientConfig::new("quic://127.0.0.1:7700", key)?
//!     .with_ca(Ca::PemFile("relay-data/tls/cert.pem".into()));
//! let mut client = Client::connect(config).await?;
//! let accepted = client.send(OutgoingMessage::text("alice", "bob@beta", "hi")).await?;
//! println!("accepted {}", accepted.id);
//! while let Some(event) = client.next_event().await {
//!     if let Event::Message(m) = &event {
//!         println!("{} says {:?}", m.from, m.payload);
//!     }
//!     if let Some(tag) = event.tag() {
//!         client.ack(tag);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! How it is built (see `STYLE.md`): a sans-IO core (`session` and `outbox` hold the
//! protocol state and custody bookkeeping and are tested without sockets), driven by one
//! tokio task per client (`driver`) that owns that state, over QUIC or WebSocket
//! transports (`transport`) whose streams each have their own reader and writer task.
//!
//! Guarantees:
//! - a message is kept from `send` until the relay answers it, and resent under the same id
//!   after every reconnect until then (the relay deduplicates);
//! - `send` fails only when the relay refuses the message, when it cannot be sent at all
//!   (invalid, expired), or when the client stops (closed, reconnects disabled or given up);
//! - acks of tags from an earlier session are dropped rather than sent to a new session;
//! - a campaign step (begin, chunk, end, status, cancel) is kept likewise until the relay
//!   answers it, and after a reconnect the campaign's Begin is resent before its other
//!   unanswered steps (every step is idempotent at the relay).

mod backoff;
mod campaign;
mod client;
mod config;
mod directory;
mod driver;
mod error;
mod event;
mod message;
mod outbox;
mod session;
mod transport;
mod url;

pub use campaign::{
    Campaign, CampaignCounts, CampaignSpec, CampaignState, CampaignStatus, ChunkAck, PendingChunk,
};
pub use client::{Client, ClientHandle, Events, PendingSend};
pub use config::{Ca, ClientConfig, ReconnectPolicy};
pub use error::{ClientError, PrepareError, SendError, error_code, error_code_name};
pub use event::{
    BulkDelivery, BulkMessage, DeliveryTag, Event, ExpiredNotice, IncomingMessage, IncomingReceipt,
    SessionInfo,
};
pub use message::{
    MessageId, OutgoingMessage, OutgoingReceipt, PreparedMessage, SendReceipt, prepare_message,
    unix_now_ms,
};
pub use url::{DEFAULT_QUIC_PORT, DEFAULT_WS_PORT, RelayUrl, Scheme, UrlError};

/// The protocol types the API uses, re-exported for convenience.
pub use federation_spec::keyfile::KeyFile;
pub use federation_spec::proto::{ErrorCode, Lane, ReceiptKind, Role};
