//! Outgoing messages and receipts: building, checking and signing them before they are handed
//! to the connection.
//!
//! A [`PreparedMessage`] holds the complete length-prefixed `Deliver` frame, signed. Preparing
//! is where the CPU goes (protobuf encoding, ed25519); sending a prepared message only moves
//! bytes, which is what a load generator wants to time.

use crate::error::PrepareError;
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use federation_spec::address;
use federation_spec::frame::encode_kind;
use federation_spec::message::{MAX_CONTENT_TYPE_LEN, check_deliver, check_receipt};
use federation_spec::proto::{Deliver, Envelope, Lane, Receipt, ReceiptKind, frame::Kind};
use federation_spec::signing::sign_envelope;
use prost::Message as _;
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// A 16-byte message id (`Envelope.id`), shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// A fresh id from the operating system's secure random generator.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Reads an id from the wire; `None` unless it is exactly 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = hex::FromHexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id)?;
        Ok(Self(id))
    }
}

/// Milliseconds since the Unix epoch by the local wall clock.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A message to send, before it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Recipient, `user@platform`.
    pub to: String,
    /// The sending user of our platform (the part before `@`); the SDK appends `@<peer>`.
    pub from_user: String,
    /// `Lane::Chat` or `Lane::Call`.
    pub lane: Lane,
    /// Requested time to live in seconds; 0 = the lane's default.
    pub ttl_s: u32,
    /// Optional media type of the payload, at most 64 bytes.
    pub content_type: String,
    /// The body, opaque to the relay.
    pub payload: Bytes,
}

impl OutgoingMessage {
    /// A `text/plain` chat message with the lane's default TTL.
    pub fn text(from_user: &str, to: &str, text: &str) -> Self {
        Self {
            to: to.to_string(),
            from_user: from_user.to_string(),
            lane: Lane::Chat,
            ttl_s: 0,
            content_type: "text/plain".into(),
            payload: Bytes::copy_from_slice(text.as_bytes()),
        }
    }
}

/// What the SDK keeps of a message until the relay answers it: the signed frame and what is
/// needed to schedule it. Cloning is cheap (the frame is shared).
#[derive(Debug, Clone)]
pub struct PreparedMessage {
    pub(crate) id: MessageId,
    pub(crate) lane: Lane,
    pub(crate) to: String,
    pub(crate) created_at_ms: u64,
    pub(crate) ttl_s: u32,
    pub(crate) payload_len: usize,
    /// The length-prefixed `Deliver` frame.
    pub(crate) frame: Bytes,
}

impl PreparedMessage {
    /// The message id (`Envelope.id`).
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The lane it travels on.
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// The recipient.
    pub fn to(&self) -> &str {
        &self.to
    }

    /// `Envelope.created_at_ms`.
    pub fn created_at_ms(&self) -> u64 {
        self.created_at_ms
    }

    /// Bytes of the encoded frame, length prefix included.
    pub fn frame_len(&self) -> usize {
        self.frame.len()
    }
}

/// Builds, checks and signs a message as `peer` with `key`. `id` and `created_at_ms` are
/// parameters so that tests and vectors are deterministic; [`crate::Client::prepare`] uses a
/// random id and the wall clock.
pub fn prepare_message(
    key: &SigningKey,
    peer: &str,
    msg: OutgoingMessage,
    id: MessageId,
    created_at_ms: u64,
) -> Result<PreparedMessage, PrepareError> {
    address::check_user(&msg.from_user).map_err(PrepareError::FromUser)?;
    if !matches!(msg.lane, Lane::Chat | Lane::Call) {
        return Err(PrepareError::Lane(msg.lane));
    }
    if msg.content_type.len() > MAX_CONTENT_TYPE_LEN {
        return Err(PrepareError::ContentType);
    }
    let payload_len = msg.payload.len();
    let envelope = Envelope {
        id: Bytes::copy_from_slice(&id.0),
        from: format!("{}@{peer}", msg.from_user),
        to: msg.to,
        lane: msg.lane as i32,
        created_at_ms,
        ttl_s: msg.ttl_s,
        content_type: msg.content_type,
        payload: msg.payload,
    };
    let signed = sign(key, &envelope);
    let deliver = Deliver {
        envelope: signed.envelope,
        signature: signed.signature,
        signer: signed.signer,
        tag: 0,
    };
    // SPEC 6.2: check our own encoding with the relay's rules so that we never send bytes it
    // cannot read. The payload limit is the session's and is checked when it is known.
    let checked = check_deliver(&deliver, peer, usize::MAX).map_err(|r| r.error)?;
    Ok(PreparedMessage {
        id,
        lane: checked.lane,
        to: envelope.to,
        created_at_ms,
        ttl_s: msg.ttl_s,
        payload_len,
        frame: encode_kind(Kind::Deliver(deliver)),
    })
}

/// An envelope encoded once and signed over exactly those bytes (SPEC.md 6.2).
pub(crate) struct SignedEnvelope {
    pub(crate) envelope: Bytes,
    pub(crate) signature: Bytes,
    pub(crate) signer: Bytes,
}

/// Encodes `envelope` and signs it with `key`: how every envelope the SDK sends is made,
/// for a message or a campaign.
pub(crate) fn sign(key: &SigningKey, envelope: &Envelope) -> SignedEnvelope {
    let bytes = Bytes::from(envelope.encode_to_vec());
    let signature = sign_envelope(key, &bytes);
    SignedEnvelope {
        envelope: bytes,
        signature: Bytes::copy_from_slice(&signature.to_bytes()),
        signer: Bytes::copy_from_slice(key.verifying_key().as_bytes()),
    }
}

/// A delivery or read receipt to send to the original sender of a message we received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingReceipt {
    /// The id of the message the receipt is about.
    pub id: MessageId,
    /// The recipient of that message: one of our users, `user@<our peer>`.
    pub from: String,
    /// The original sender, `user@platform`.
    pub to: String,
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// When it happened, ms since the Unix epoch; 0 = now.
    pub at_ms: u64,
}

impl OutgoingReceipt {
    /// A receipt of `kind` for message `id`, from our user `from` to its sender `to`, dated
    /// now.
    pub fn new(id: MessageId, from: &str, to: &str, kind: ReceiptKind) -> Self {
        Self {
            id,
            from: from.to_string(),
            to: to.to_string(),
            kind,
            at_ms: 0,
        }
    }
}

/// A receipt checked and encoded, ready to send.
#[derive(Debug, Clone)]
pub(crate) struct PreparedReceipt {
    pub(crate) id: MessageId,
    pub(crate) kind: ReceiptKind,
    pub(crate) frame: Bytes,
}

/// Checks and encodes a receipt from `peer`.
pub(crate) fn prepare_receipt(
    peer: &str,
    receipt: OutgoingReceipt,
    now_ms: u64,
) -> Result<PreparedReceipt, PrepareError> {
    let frame = Receipt {
        id: Bytes::copy_from_slice(&receipt.id.0),
        from: receipt.from,
        to: receipt.to,
        kind: receipt.kind as i32,
        at_ms: if receipt.at_ms == 0 {
            now_ms
        } else {
            receipt.at_ms
        },
        tag: 0,
    };
    check_receipt(&frame, peer).map_err(|r| r.error)?;
    Ok(PreparedReceipt {
        id: receipt.id,
        kind: receipt.kind,
        frame: encode_kind(Kind::Receipt(frame)),
    })
}

/// The relay's `Accepted`: it has the message durably and the SDK has forgotten it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    /// The message (or receipt) id.
    pub id: MessageId,
    /// When the relay will report the message expired if it is not delivered by then.
    pub expires_at_ms: u64,
    /// The relay had already accepted this id (a resend after a reconnect, usually).
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use federation_spec::frame::decode_message;
    use federation_spec::signing::{parse_public_key, parse_signature, verify_envelope};

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    #[test]
    fn prepared_frame_is_a_signed_deliver() {
        let id = MessageId([9; 16]);
        let p = prepare_message(
            &key(),
            "alpha",
            OutgoingMessage::text("ali", "bo@beta", "hi"),
            id,
            1234,
        )
        .unwrap();
        assert_eq!((p.id(), p.lane(), p.to()), (id, Lane::Chat, "bo@beta"));
        let frames = decode_message(&p.frame, usize::MAX).unwrap();
        let Some(Kind::Deliver(d)) = frames.into_iter().next().and_then(|f| f.kind) else {
            panic!("not a deliver")
        };
        let env = Envelope::decode(d.envelope.clone()).unwrap();
        assert_eq!(env.from, "ali@alpha");
        assert_eq!(env.created_at_ms, 1234);
        assert_eq!(&env.payload[..], b"hi");
        let signer = parse_public_key(&d.signer).unwrap();
        let sig = parse_signature(&d.signature).unwrap();
        assert_eq!(signer, key().verifying_key());
        assert!(verify_envelope(&signer, &d.envelope, &sig));
    }

    #[test]
    fn refuses_what_the_relay_would_refuse() {
        let prep = |m: OutgoingMessage| prepare_message(&key(), "alpha", m, MessageId([1; 16]), 0);
        let base = OutgoingMessage::text("ali", "bo@beta", "x");
        assert!(matches!(
            prep(OutgoingMessage {
                from_user: "a b".into(),
                ..base.clone()
            }),
            Err(PrepareError::FromUser(_))
        ));
        assert!(matches!(
            prep(OutgoingMessage {
                to: "nobody".into(),
                ..base.clone()
            }),
            Err(PrepareError::Protocol(_))
        ));
        assert!(matches!(
            prep(OutgoingMessage {
                lane: Lane::Bulk,
                ..base.clone()
            }),
            Err(PrepareError::Lane(Lane::Bulk))
        ));
        assert!(matches!(
            prep(OutgoingMessage {
                content_type: "x".repeat(65),
                ..base
            }),
            Err(PrepareError::ContentType)
        ));
    }

    #[test]
    fn receipts_are_checked() {
        let r = OutgoingReceipt {
            id: MessageId([2; 16]),
            from: "bo@beta".into(),
            to: "ali@alpha".into(),
            kind: ReceiptKind::Read,
            at_ms: 0,
        };
        let p = prepare_receipt("beta", r.clone(), 99).unwrap();
        assert_eq!(p.kind, ReceiptKind::Read);
        let Some(Kind::Receipt(wire)) = decode_message(&p.frame, usize::MAX).unwrap()[0]
            .kind
            .clone()
        else {
            panic!("not a receipt")
        };
        assert_eq!(wire.at_ms, 99, "0 means now");
        assert!(prepare_receipt("gamma", r, 99).is_err(), "spoofed sender");
    }

    #[test]
    fn id_text_round_trip() {
        let id = MessageId::random();
        assert_eq!(id.to_string().len(), 32);
        assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id);
        assert!("zz".parse::<MessageId>().is_err());
        assert_eq!(MessageId::from_slice(&[1; 15]), None);
    }
}
