//! Checks of message-carrying frames against the protocol's rules (SPEC.md sections 6 and 8).
//!
//! These are the checks every receiver makes before it takes custody of anything; they need
//! only the frame and the authenticated peer id. Whether the signer is a registered key of the
//! origin, and the signature itself, are checked by the caller (the relay verifies in batches).

use crate::ProtocolError;
use crate::address::{self, check_peer_id};
use crate::lane;
use crate::proto::{CampaignBegin, Deliver, Envelope, Lane, Receipt, ReceiptKind};
use crate::signing::{PUBLIC_KEY_LEN, SignedEnvelope, parse_signature};
use bytes::Bytes;
use ed25519_dalek::{Signature, VerifyingKey};
use prost::Message;

/// Bytes of a message id.
pub const MESSAGE_ID_LEN: usize = 16;
/// Bytes of a campaign id.
pub const CAMPAIGN_ID_LEN: usize = 16;
/// Longest Envelope.content_type.
pub const MAX_CONTENT_TYPE_LEN: usize = 64;
/// Longest CampaignBegin.label.
pub const MAX_LABEL_LEN: usize = 128;
/// The relay's default largest payload.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;

/// A message id.
pub type MessageId = [u8; MESSAGE_ID_LEN];

/// A frame refused, with the id to put in the Rejected (empty when it could not be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The message or campaign id, as far as it could be read.
    pub id: Bytes,
    /// Why.
    pub error: ProtocolError,
}

/// A signed envelope that passed the frame-level checks.
#[derive(Debug, Clone)]
pub struct CheckedEnvelope {
    /// The decoded envelope (its bytes fields share `bytes`' memory).
    pub envelope: Envelope,
    /// The envelope as carried and signed.
    pub bytes: Bytes,
    /// The origin signature.
    pub signature: Signature,
    /// The key that claims to have signed, as carried. It is not decompressed here: that
    /// costs as much as a third of a verification, and a receiver compares it with the keys
    /// it already holds for the origin, whose parsed form it keeps.
    pub signer: [u8; PUBLIC_KEY_LEN],
    /// Envelope.id as an array.
    pub id: MessageId,
    /// Envelope.lane, known to be a real lane.
    pub lane: Lane,
}

impl CheckedEnvelope {
    /// The signature check input for [`crate::signing::verify_batch`], with `signer` the
    /// receiver's parsed copy of the key whose bytes are [`CheckedEnvelope::signer`].
    pub fn signed(&self, signer: VerifyingKey) -> SignedEnvelope<'_> {
        SignedEnvelope {
            envelope: &self.bytes,
            signature: self.signature,
            signer,
        }
    }

    /// The origin key among `keys` that this envelope names as its signer.
    pub fn signer_in<'k>(&self, keys: &'k [VerifyingKey]) -> Option<&'k VerifyingKey> {
        keys.iter().find(|k| k.as_bytes() == &self.signer)
    }

    /// The platform part of `to` (checked to be a valid address for a Deliver).
    pub fn to_platform(&self) -> &str {
        self.envelope
            .to
            .split_once('@')
            .map(|(_, p)| p)
            .unwrap_or_default()
    }
}

/// Checks a Deliver from the authenticated peer `origin`.
pub fn check_deliver(
    deliver: &Deliver,
    origin: &str,
    max_payload: usize,
) -> Result<CheckedEnvelope, Refusal> {
    let checked = check_signed(
        &deliver.envelope,
        &deliver.signature,
        &deliver.signer,
        origin,
        max_payload,
    )?;
    let refuse = |error| Refusal {
        id: checked.envelope.id.clone(),
        error,
    };
    address::parse(&checked.envelope.to).map_err(|e| refuse(e.into()))?;
    if checked.lane == Lane::Bulk {
        return Err(refuse(ProtocolError::InvalidMessage(
            "bulk messages travel in campaigns",
        )));
    }
    Ok(checked)
}

/// Checks a CampaignBegin from the authenticated broadcaster `origin`.
pub fn check_campaign_begin(
    begin: &CampaignBegin,
    origin: &str,
    max_payload: usize,
) -> Result<CheckedEnvelope, Refusal> {
    let refuse = |error| Refusal {
        id: begin.campaign_id.clone(),
        error,
    };
    if begin.campaign_id.len() != CAMPAIGN_ID_LEN {
        return Err(refuse(ProtocolError::InvalidMessage(
            "campaign_id must be 16 bytes",
        )));
    }
    if begin.label.len() > MAX_LABEL_LEN {
        return Err(refuse(ProtocolError::InvalidMessage(
            "label longer than 128 bytes",
        )));
    }
    let checked = check_signed(
        &begin.envelope,
        &begin.signature,
        &begin.signer,
        origin,
        max_payload,
    )
    .map_err(|r| refuse(r.error))?;
    if !checked.envelope.to.is_empty() {
        return Err(refuse(ProtocolError::InvalidMessage(
            "a campaign envelope has an empty `to`",
        )));
    }
    if checked.lane != Lane::Bulk {
        return Err(refuse(ProtocolError::InvalidMessage(
            "a campaign envelope is on the bulk lane",
        )));
    }
    Ok(checked)
}

/// A receipt that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedReceipt {
    /// The id of the message it is about.
    pub id: MessageId,
    /// The platform of the original sender, where the receipt goes.
    pub to_platform: String,
}

/// Checks a Receipt from the authenticated platform `origin`.
pub fn check_receipt(receipt: &Receipt, origin: &str) -> Result<CheckedReceipt, Refusal> {
    let refuse = |error| Refusal {
        id: receipt.id.clone(),
        error,
    };
    let id: MessageId = receipt
        .id
        .as_ref()
        .try_into()
        .map_err(|_| refuse(ProtocolError::InvalidMessage("id must be 16 bytes")))?;
    let from = address::parse(&receipt.from).map_err(|e| refuse(e.into()))?;
    if from.platform != origin {
        return Err(refuse(ProtocolError::SpoofedSender {
            from: receipt.from.clone(),
            peer: origin.into(),
        }));
    }
    let to = address::parse(&receipt.to).map_err(|e| refuse(e.into()))?;
    match ReceiptKind::try_from(receipt.kind) {
        Ok(ReceiptKind::Delivered | ReceiptKind::Read) => {}
        _ => {
            return Err(refuse(ProtocolError::InvalidMessage(
                "unknown receipt kind",
            )));
        }
    }
    Ok(CheckedReceipt {
        id,
        to_platform: to.platform.to_string(),
    })
}

fn check_signed(
    envelope_bytes: &Bytes,
    signature: &[u8],
    signer: &[u8],
    origin: &str,
    max_payload: usize,
) -> Result<CheckedEnvelope, Refusal> {
    let envelope = Envelope::decode(envelope_bytes.clone()).map_err(|e| Refusal {
        id: Bytes::new(),
        error: ProtocolError::Malformed(format!("envelope: {e}")),
    })?;
    let refuse = |error| Refusal {
        id: envelope.id.clone(),
        error,
    };
    let id: MessageId = envelope
        .id
        .as_ref()
        .try_into()
        .map_err(|_| refuse(ProtocolError::InvalidMessage("id must be 16 bytes")))?;
    let signature =
        parse_signature(signature).ok_or_else(|| refuse(ProtocolError::BadSignature))?;
    let signer: [u8; PUBLIC_KEY_LEN] = signer
        .try_into()
        .map_err(|_| refuse(ProtocolError::BadSignature))?;
    let lane = lane::from_wire(envelope.lane)
        .ok_or_else(|| refuse(ProtocolError::InvalidMessage("unknown lane")))?;
    let from = address::parse(&envelope.from).map_err(|e| refuse(e.into()))?;
    if from.platform != origin {
        return Err(refuse(ProtocolError::SpoofedSender {
            from: envelope.from.clone(),
            peer: origin.into(),
        }));
    }
    if envelope.payload.len() > max_payload {
        return Err(refuse(ProtocolError::PayloadTooLarge {
            len: envelope.payload.len(),
            max: max_payload,
        }));
    }
    if envelope.content_type.len() > MAX_CONTENT_TYPE_LEN {
        return Err(refuse(ProtocolError::InvalidMessage(
            "content_type longer than 64 bytes",
        )));
    }
    Ok(CheckedEnvelope {
        bytes: envelope_bytes.clone(),
        envelope,
        signature,
        signer,
        id,
        lane,
    })
}

/// Checks one campaign recipient and returns its platform.
pub fn recipient_platform(recipient: &str) -> Result<&str, ProtocolError> {
    Ok(address::parse(recipient)?.platform)
}

/// Checks a peer id taken from the network or from config.
pub fn check_peer(peer: &str) -> Result<(), ProtocolError> {
    Ok(check_peer_id(peer)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::sign_envelope;
    use ed25519_dalek::SigningKey;

    fn deliver(env: &Envelope, key: &SigningKey) -> Deliver {
        let bytes = Bytes::from(env.encode_to_vec());
        Deliver {
            signature: Bytes::copy_from_slice(&sign_envelope(key, &bytes).to_bytes()),
            signer: Bytes::copy_from_slice(key.verifying_key().as_bytes()),
            envelope: bytes,
            tag: 0,
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            id: Bytes::from(vec![1; 16]),
            from: "ali@alpha".into(),
            to: "bo@beta".into(),
            lane: Lane::Chat as i32,
            payload: Bytes::from_static(b"hi"),
            ..Default::default()
        }
    }

    #[test]
    fn good_and_bad() {
        let k = SigningKey::from_bytes(&[5; 32]);
        let c = check_deliver(&deliver(&envelope(), &k), "alpha", 100).unwrap();
        assert_eq!(c.to_platform(), "beta");
        assert!(crate::signing::verify_batch(&[c.signed(k.verifying_key())])[0]);
        assert!(c.signer_in(&[k.verifying_key()]).is_some());

        let code = |env: Envelope, origin: &str, max: usize| {
            check_deliver(&deliver(&env, &k), origin, max)
                .unwrap_err()
                .error
                .code()
        };
        use crate::proto::ErrorCode as E;
        assert_eq!(code(envelope(), "gamma", 100), E::SpoofedSender);
        assert_eq!(code(envelope(), "alpha", 1), E::PayloadTooLarge);
        assert_eq!(
            code(
                Envelope {
                    to: "bo".into(),
                    ..envelope()
                },
                "alpha",
                100
            ),
            E::BadAddress
        );
        assert_eq!(
            code(
                Envelope {
                    id: Bytes::from_static(b"short"),
                    ..envelope()
                },
                "alpha",
                100
            ),
            E::InvalidMessage
        );
        assert_eq!(
            code(
                Envelope {
                    lane: 9,
                    ..envelope()
                },
                "alpha",
                100
            ),
            E::InvalidMessage
        );
        let mut d = deliver(&envelope(), &k);
        d.signature = Bytes::from_static(b"x");
        assert_eq!(
            check_deliver(&d, "alpha", 100).unwrap_err().error,
            ProtocolError::BadSignature
        );
        d.envelope = Bytes::from_static(&[0xff, 0xff]);
        assert_eq!(
            check_deliver(&d, "alpha", 100).unwrap_err().error.code(),
            E::MalformedFrame
        );
    }
}
