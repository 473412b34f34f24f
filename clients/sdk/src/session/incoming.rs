//! Incoming frames that carry a delivery tag: messages, receipts, expiries and campaign
//! deliveries, turned into [`Event`]s. Message signatures of one batch of frames are verified
//! together before the batch's events are released, in arrival order.

use super::{ClientSession, CloseRequest};
use crate::directory::Claim;
use crate::event::{
    BulkDelivery, BulkMessage, DeliveryTag, Event, ExpiredNotice, IncomingMessage, IncomingReceipt,
};
use crate::message::MessageId;
use federation_spec::proto::{
    BulkDeliver, Deliver, Envelope, ErrorCode, Expired, Goaway, Lane, Receipt, ReceiptKind,
};
use prost::Message as _;
use std::sync::Arc;
use tracing::warn;

/// An incoming frame held until the batch's signatures are verified.
pub(super) enum Staged {
    Ready(Event),
    Message {
        tag: DeliveryTag,
        id: MessageId,
        deliver: Deliver,
        envelope: Envelope,
    },
}

impl<W, C> ClientSession<W, C> {
    /// Registers an incoming tag; `None` without a live session.
    fn take_tag(&mut self, value: u64) -> Option<DeliveryTag> {
        let live = self.live.as_mut()?;
        if !live.unacked.insert(value) {
            warn!(peer = %self.peer, tag = value, "relay reused a delivery tag");
        }
        if live.unacked.len() > live.window as usize && !live.window_warned {
            live.window_warned = true;
            warn!(peer = %self.peer, window = live.window, outstanding = live.unacked.len(), "relay exceeds the receive window");
        }
        Some(DeliveryTag {
            session: live.info.number,
            value,
        })
    }

    /// A frame the application can do nothing with: take it off the relay's hands (as
    /// SPEC.md 6.7 asks for messages that fail verification) and log it.
    fn discard(&mut self, tag: DeliveryTag, why: &str) {
        warn!(peer = %self.peer, tag = tag.value, why, "discarding an unreadable delivery");
        self.ack([tag]);
    }

    pub(super) fn on_deliver(&mut self, d: Deliver, staged: &mut Vec<Staged>) {
        let Some(tag) = self.take_tag(d.tag) else {
            return;
        };
        let envelope = match Envelope::decode(d.envelope.clone()) {
            Ok(e) => e,
            Err(_) => return self.discard(tag, "envelope does not decode"),
        };
        let Some(id) = MessageId::from_slice(&envelope.id) else {
            return self.discard(tag, "envelope id is not 16 bytes");
        };
        staged.push(Staged::Message {
            tag,
            id,
            deliver: d,
            envelope,
        });
    }

    pub(super) fn on_receipt(&mut self, r: Receipt, staged: &mut Vec<Staged>) {
        let Some(tag) = self.take_tag(r.tag) else {
            return;
        };
        let Some(id) = MessageId::from_slice(&r.id) else {
            return self.discard(tag, "receipt id is not 16 bytes");
        };
        staged.push(Staged::Ready(Event::Receipt(IncomingReceipt {
            tag,
            id,
            from: r.from,
            to: r.to,
            kind: ReceiptKind::try_from(r.kind).unwrap_or(ReceiptKind::Unspecified),
            at_ms: r.at_ms,
        })));
    }

    pub(super) fn on_expired(&mut self, e: Expired, staged: &mut Vec<Staged>) {
        let Some(tag) = self.take_tag(e.tag) else {
            return;
        };
        let Some(id) = MessageId::from_slice(&e.id) else {
            return self.discard(tag, "expired id is not 16 bytes");
        };
        staged.push(Staged::Ready(Event::Expired(ExpiredNotice {
            tag,
            id,
            to: e.to,
            expired_at_ms: e.expired_at_ms,
            campaign_id: e.campaign_id,
        })));
    }

    /// SPEC.md 9.8: the envelope comes with a campaign's first delivery on a session and is
    /// kept for the later ones. A later one for a campaign we do not hold is not acked: we
    /// say Goaway{UNKNOWN_CAMPAIGN} and reconnect, and the relay sends the envelope again.
    pub(super) fn on_bulk(&mut self, b: BulkDeliver, staged: &mut Vec<Staged>) {
        let verify = self.opts.verify_signatures;
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if b.envelope.is_empty() && !live.bulk.contains_key(&b.campaign_id) {
            warn!(peer = %self.peer, campaign = %hex::encode(&b.campaign_id), "campaign delivery without its envelope");
            self.close.get_or_insert(CloseRequest {
                goaway: Some(Goaway {
                    code: ErrorCode::UnknownCampaign as i32,
                    reason: "bulk delivery for a campaign whose envelope this session lacks".into(),
                    reconnect_after_ms: 0,
                }),
                reason: "bulk delivery of an unknown campaign".into(),
                code: None,
                reconnect_after: None,
                final_close: false,
            });
            return;
        }
        if !b.envelope.is_empty() {
            let message = Envelope::decode(b.envelope.clone()).ok().and_then(|env| {
                let verified = verify
                    && live.directory.verify(&[Claim {
                        from: &env.from,
                        envelope: &b.envelope,
                        signature: &b.signature,
                        signer: &b.signer,
                    }]) == [true];
                let id = MessageId::from_slice(&env.id)?;
                Some(Arc::new(BulkMessage {
                    id,
                    from: env.from,
                    created_at_ms: env.created_at_ms,
                    ttl_s: env.ttl_s,
                    content_type: env.content_type,
                    payload: env.payload,
                    verified,
                }))
            });
            if message.is_none() {
                warn!(peer = %self.peer, tag = b.tag, "campaign envelope does not decode");
            }
            // Kept even when unreadable, so that its later deliveries are not "unknown".
            live.bulk.insert(b.campaign_id.clone(), message);
        }
        let message = live.bulk.get(&b.campaign_id).cloned().flatten();
        let Some(tag) = self.take_tag(b.tag) else {
            return;
        };
        staged.push(Staged::Ready(Event::Bulk(BulkDelivery {
            tag,
            campaign_id: b.campaign_id,
            message,
            recipients: b.recipients,
        })));
    }

    /// Verifies the batch's message signatures and queues the events in arrival order.
    pub(super) fn release(&mut self, staged: Vec<Staged>) {
        if staged.is_empty() {
            return;
        }
        let verified = match (&self.live, self.opts.verify_signatures) {
            (Some(live), true) => {
                let claims: Vec<Claim<'_>> = staged
                    .iter()
                    .filter_map(|s| match s {
                        Staged::Message {
                            deliver, envelope, ..
                        } => Some(Claim {
                            from: &envelope.from,
                            envelope: &deliver.envelope,
                            signature: &deliver.signature,
                            signer: &deliver.signer,
                        }),
                        Staged::Ready(_) => None,
                    })
                    .collect();
                live.directory.verify(&claims)
            }
            _ => Vec::new(),
        };
        let mut verified = verified.into_iter();
        for s in staged {
            let event = match s {
                Staged::Ready(event) => event,
                Staged::Message {
                    tag,
                    id,
                    deliver,
                    envelope,
                } => {
                    let verified = verified.next().unwrap_or(false);
                    if !verified && self.opts.verify_signatures {
                        warn!(peer = %self.peer, %id, from = %envelope.from, "origin signature does not verify");
                    }
                    Event::Message(IncomingMessage {
                        tag,
                        id,
                        from: envelope.from,
                        to: envelope.to,
                        lane: Lane::try_from(envelope.lane).unwrap_or(Lane::Unspecified),
                        created_at_ms: envelope.created_at_ms,
                        ttl_s: envelope.ttl_s,
                        content_type: envelope.content_type,
                        payload: envelope.payload,
                        verified,
                        signer: deliver.signer,
                    })
                }
            };
            self.events.push_back(event);
        }
    }
}
