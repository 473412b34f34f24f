//! What the relay hands to the application: messages, receipts, expiries, campaign
//! deliveries, campaign progress, and changes of the connection.
//!
//! Every frame that needs an `Ack` arrives with a [`DeliveryTag`]. The application acks it
//! (with [`crate::Client::ack`]) once it has taken custody, i.e. stored it durably. A tag is
//! only meaningful on the session that issued it: after a reconnect the relay delivers
//! un-acked frames again with new tags, and acks of old tags are dropped by the SDK (they
//! would otherwise acknowledge whatever the new session numbered the same).

use crate::campaign::CampaignStatus;
use crate::message::MessageId;
use bytes::Bytes;
use federation_spec::proto::{ErrorCode, Lane, LaneTtl, Limits, PeerKeys, ReceiptKind, Role};
use std::sync::Arc;

/// The delivery tag of one incoming frame, tied to the session that issued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryTag {
    pub(crate) session: u32,
    pub(crate) value: u64,
}

impl DeliveryTag {
    /// The tag number on the wire.
    pub fn value(&self) -> u64 {
        self.value
    }

    /// Which session of this client issued it (1 for the first, counting reconnects).
    pub fn session(&self) -> u32 {
        self.session
    }
}

/// Something that happened on the connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A message for one of our users. Ack its tag.
    Message(IncomingMessage),
    /// A delivery or read receipt for a message we sent. Ack its tag.
    Receipt(IncomingReceipt),
    /// A message we sent was not delivered before its TTL ran out. Ack its tag.
    Expired(ExpiredNotice),
    /// A campaign message for some of our users. Ack its tag.
    Bulk(BulkDelivery),
    /// Progress of one of our campaigns, pushed by the relay (periodically and when its
    /// state changes) and not taken as the answer to a status request. No tag.
    CampaignStatus(CampaignStatus),
    /// The connection ended. Un-acked tags are void; the relay will deliver those frames
    /// again. Messages not yet accepted are kept and resent after the reconnect.
    Disconnected {
        /// What happened, for logs.
        reason: String,
        /// The code of the relay's `Goaway`, if it sent one.
        code: Option<ErrorCode>,
    },
    /// A new session is up after a disconnect.
    Reconnected(SessionInfo),
}

impl Event {
    /// The tag to ack, for the events that carry one.
    pub fn tag(&self) -> Option<DeliveryTag> {
        match self {
            Event::Message(m) => Some(m.tag),
            Event::Receipt(r) => Some(r.tag),
            Event::Expired(e) => Some(e.tag),
            Event::Bulk(b) => Some(b.tag),
            Event::CampaignStatus(_) | Event::Disconnected { .. } | Event::Reconnected(_) => None,
        }
    }
}

/// A person-to-person message delivered to us.
///
/// Delivery is at-least-once: the same message can arrive again (new tag) after a reconnect.
/// Deduplicate by (`from` platform, `id`), as SPEC.md 6.6 requires of a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingMessage {
    /// Ack this.
    pub tag: DeliveryTag,
    /// `Envelope.id`.
    pub id: MessageId,
    /// Sender, `user@platform`.
    pub from: String,
    /// Recipient, one of our users.
    pub to: String,
    /// Call or chat.
    pub lane: Lane,
    /// Sender's clock at creation.
    pub created_at_ms: u64,
    /// Requested TTL (0 = lane default).
    pub ttl_s: u32,
    /// Media type, possibly empty.
    pub content_type: String,
    /// The body.
    pub payload: Bytes,
    /// The origin signature verifies with a key that `Welcome.directory` lists for the
    /// platform of `from`. An unverified message must not be shown to users (still ack it).
    pub verified: bool,
    /// The key that claims to have signed (32 bytes).
    pub signer: Bytes,
}

/// A receipt for a message we sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingReceipt {
    /// Ack this.
    pub tag: DeliveryTag,
    /// The id of our message.
    pub id: MessageId,
    /// The recipient of our message.
    pub from: String,
    /// Our user who sent it.
    pub to: String,
    /// Delivered or read (`Unspecified` if the relay sent an unknown kind).
    pub kind: ReceiptKind,
    /// When, by the recipient platform's clock.
    pub at_ms: u64,
}

/// A message we sent expired undelivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredNotice {
    /// Ack this.
    pub tag: DeliveryTag,
    /// The id of our message.
    pub id: MessageId,
    /// The recipient that did not get it.
    pub to: String,
    /// When the relay gave up.
    pub expired_at_ms: u64,
    /// The campaign, when it was a campaign recipient (empty in v1).
    pub campaign_id: Bytes,
}

/// One campaign payload for several of our users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkDelivery {
    /// Ack this (one ack covers every recipient).
    pub tag: DeliveryTag,
    /// The campaign.
    pub campaign_id: Bytes,
    /// The campaign's message. The relay sends the envelope once per session and campaign;
    /// the SDK remembers it and fills it in for later deliveries. `None` if the relay never
    /// sent it on this session.
    pub message: Option<Arc<BulkMessage>>,
    /// Our users it is for.
    pub recipients: Vec<String>,
}

/// The signed content of a campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkMessage {
    /// `Envelope.id`.
    pub id: MessageId,
    /// The broadcaster's sender address.
    pub from: String,
    /// Sender's clock at creation.
    pub created_at_ms: u64,
    /// Requested TTL.
    pub ttl_s: u32,
    /// Media type, possibly empty.
    pub content_type: String,
    /// The body.
    pub payload: Bytes,
    /// The signature verifies with a key of the broadcaster in the directory.
    pub verified: bool,
}

/// What the relay said about the current session in its `Welcome`.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// Which session of this client (1 for the first).
    pub number: u32,
    /// `Welcome.session_id`, hex.
    pub session_id: String,
    /// Our role.
    pub role: Role,
    /// The session's limits, with the protocol defaults filled in for zeros.
    pub limits: Limits,
    /// TTL policy per lane.
    pub lanes: Vec<LaneTtl>,
    /// Every peer's keys.
    pub directory: Vec<PeerKeys>,
}
