//! Outgoing messages and receipts: taking them into custody, putting them on the wire within
//! the session's limits (in-flight, rate, payload and frame size, TTL), and matching the
//! relay's answers to them.

use super::{ClientSession, Live, Now, Route, Transmit};
use crate::error::{PrepareError, SendError, error_code};
use crate::message::{MessageId, PreparedMessage, PreparedReceipt, SendReceipt};
use crate::outbox::{EntryKey, Item, NewEntry, WireKey};
use federation_spec::ProtocolError;
use federation_spec::frame::LENGTH_PREFIX;
use federation_spec::proto::{Accepted, ErrorCode, Lane, Rejected};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Pause before resending a message refused with FLOW_CONTROL.
pub(super) const FLOW_CONTROL_BACKOFF: Duration = Duration::from_millis(100);
/// Least wait after BUSY or RATE_LIMITED without a `retry_after_ms` (SPEC.md 8.5).
pub(super) const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Paces sends to `max_msgs_per_s`, with bursts of one second's worth (SPEC.md 8.5).
#[derive(Debug)]
pub(super) struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(super) fn new(per_second: u32, now: Instant) -> Self {
        let rate = f64::from(per_second);
        Self {
            rate,
            capacity: rate.max(1.0),
            tokens: rate.max(1.0),
            last: now,
        }
    }

    /// Takes a token, or says when one will be there.
    fn take(&mut self, now: Instant) -> Result<(), Instant> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

impl<W, C> ClientSession<W, C> {
    /// Takes a message into custody.
    pub(crate) fn submit_message(&mut self, msg: PreparedMessage, waiter: W) {
        let new = NewEntry {
            key: EntryKey {
                id: msg.id,
                item: Item::Message,
            },
            lane: msg.lane,
            frame: msg.frame,
            expiry: Some((msg.created_at_ms, msg.ttl_s)),
            payload_len: msg.payload_len,
            retries: self.opts.backpressure_retries,
        };
        self.submit(new, waiter);
    }

    /// Takes a receipt into custody.
    pub(crate) fn submit_receipt(&mut self, receipt: PreparedReceipt, waiter: W) {
        let new = NewEntry {
            key: EntryKey {
                id: receipt.id,
                item: Item::Receipt(receipt.kind),
            },
            lane: Lane::Chat,
            frame: receipt.frame,
            expiry: None,
            payload_len: 0,
            retries: self.opts.backpressure_retries,
        };
        self.submit(new, waiter);
    }

    fn submit(&mut self, new: NewEntry, waiter: W) {
        if self.closing.is_some() {
            self.completions
                .push_back((waiter, Err(SendError::Closed("client is closing".into()))));
            return;
        }
        if let Err(waiter) = self.outbox.insert(new, waiter) {
            self.completions
                .push_back((waiter, Err(SendError::DuplicateId)));
        }
    }

    /// The next message or receipt to put on the wire, if the limits allow one.
    pub(super) fn next_message(&mut self, now: Now) -> Option<Transmit> {
        let live = self.live.as_mut()?;
        self.outbox.promote(now.at);
        loop {
            if self.outbox.in_flight_len() >= live.max_inflight {
                return None;
            }
            let entry = self.outbox.peek_ready()?;
            let key = entry.key;
            let refusal = local_refusal(
                live,
                entry.expiry,
                entry.payload_len,
                entry.frame.len(),
                entry.lane,
                now,
            );
            if let Some(error) = refusal {
                if let Some(entry) = self.outbox.remove_ready(key) {
                    warn!(peer = %self.peer, id = %key.id, %error, "not sent");
                    self.completions.push_back((entry.waiter, Err(error)));
                }
                continue;
            }
            if let Some(bucket) = live.tokens.as_mut()
                && let Err(at) = bucket.take(now.at)
            {
                live.paused_until = Some(at);
                return None;
            }
            let (lane, bytes) = (entry.lane, entry.frame.clone());
            self.outbox.mark_in_flight(key);
            live.last_sent = now.at;
            return Some(Transmit {
                route: Route::Lane(lane),
                bytes,
            });
        }
    }

    pub(super) fn on_accepted(&mut self, a: Accepted) {
        let Some(id) = MessageId::from_slice(&a.id) else {
            warn!(peer = %self.peer, "accepted with an id that is not 16 bytes");
            return;
        };
        let wire = WireKey {
            id,
            receipt: a.receipt,
        };
        match self.outbox.answer(wire) {
            Some(entry) => {
                debug!(peer = %self.peer, %id, duplicate = a.duplicate, "accepted");
                self.completions.push_back((
                    entry.waiter,
                    Ok(SendReceipt {
                        id,
                        expires_at_ms: a.expires_at_ms,
                        duplicate: a.duplicate,
                    }),
                ));
            }
            None => debug!(peer = %self.peer, %id, "accepted for nothing in flight"),
        }
    }

    pub(super) fn on_rejected(&mut self, r: Rejected, now: Now) {
        if !r.campaign_id.is_empty() {
            return self.on_campaign_rejected(r, now);
        }
        let code = error_code(r.code);
        let Some(id) = MessageId::from_slice(&r.id) else {
            // SPEC.md 6.4: the relay could not read one of our envelopes. Ours are checked
            // before sending, so this is a bug on one side or the other.
            warn!(peer = %self.peer, ?code, detail = %r.detail, "rejection without a message id");
            return;
        };
        let wire = WireKey {
            id,
            receipt: r.receipt,
        };
        let retry_after = Duration::from_millis(u64::from(r.retry_after_ms)).max(MIN_RETRY_AFTER);
        let Some(entry) = self.outbox.in_flight_mut(wire) else {
            debug!(peer = %self.peer, %id, ?code, "rejected for nothing in flight");
            return;
        };
        let retry = match code {
            ErrorCode::FlowControl => Some(Some(now.at + FLOW_CONTROL_BACKOFF)),
            // Refused after the relay's Goaway: resend on the next session.
            ErrorCode::ShuttingDown => Some(None),
            ErrorCode::Busy | ErrorCode::RateLimited | ErrorCode::Internal
                if entry.retries_left > 0 =>
            {
                entry.retries_left -= 1;
                Some(Some(now.at + retry_after))
            }
            _ => None,
        };
        if code == ErrorCode::RateLimited
            && let Some(live) = self.live.as_mut()
        {
            // SPEC.md 8.5: slow down all traffic of that kind for that time.
            let until = now.at + retry_after;
            live.paused_until = Some(live.paused_until.map_or(until, |p| p.max(until)));
        }
        if code == ErrorCode::ShuttingDown {
            self.stop_sending(None, now);
        }
        match retry {
            Some(until) => {
                debug!(peer = %self.peer, %id, ?code, "rejected, will resend");
                self.outbox.retry(wire, until);
            }
            None => {
                if let Some(entry) = self.outbox.answer(wire) {
                    info!(peer = %self.peer, %id, ?code, detail = %r.detail, "rejected");
                    self.completions.push_back((
                        entry.waiter,
                        Err(SendError::Rejected {
                            code,
                            retry_after_ms: r.retry_after_ms,
                            detail: r.detail,
                        }),
                    ));
                }
            }
        }
    }
}

/// Why an entry must not be sent on this session at all, if it must not.
fn local_refusal(
    live: &Live,
    expiry: Option<(u64, u32)>,
    payload_len: usize,
    frame_len: usize,
    lane: Lane,
    now: Now,
) -> Option<SendError> {
    if let Some((created_at_ms, ttl_s)) = expiry {
        // SPEC.md 7.2: never send or resend what is already past its TTL by our clock.
        let ttl_ms = u64::from(live.policy(lane).effective(ttl_s)) * 1000;
        if created_at_ms.saturating_add(ttl_ms) <= now.unix_ms {
            return Some(SendError::Expired);
        }
    }
    if payload_len > live.max_payload {
        return Some(SendError::Invalid(PrepareError::Protocol(
            ProtocolError::PayloadTooLarge {
                len: payload_len,
                max: live.max_payload,
            },
        )));
    }
    if frame_len.saturating_sub(LENGTH_PREFIX) > live.max_frame {
        return Some(SendError::Invalid(PrepareError::Protocol(
            ProtocolError::FrameTooLarge {
                len: frame_len - LENGTH_PREFIX,
                max: live.max_frame,
            },
        )));
    }
    None
}
