//! Outgoing campaign steps (SPEC.md 9): taking them into custody, putting them on the control
//! stream within the session's limits, and matching the relay's answers to them (the
//! bookkeeping itself is the [`super::campaigns::CampaignBook`]).
//!
//! Retries follow SPEC.md 9.10 and 8.4–8.5: `RATE_LIMITED` and `BUSY` resend the same frame
//! after `retry_after_ms` (`RATE_LIMITED` also holds back every other campaign step for that
//! time), `FLOW_CONTROL` after a short pause, `SHUTTING_DOWN` on the next session; any other
//! code fails the step, and a refused Begin fails every step of its campaign.

use super::campaigns::{CampaignId, NewStep, Step, StepEntry, StepKey};
use super::outgoing::{FLOW_CONTROL_BACKOFF, MIN_RETRY_AFTER};
use super::{ClientSession, Live, Now, Route, Transmit};
use crate::campaign::{CampaignAnswer, CampaignStatus, ChunkAck};
use crate::error::{PrepareError, SendError, error_code};
use crate::event::Event;
use federation_spec::ProtocolError;
use federation_spec::frame::LENGTH_PREFIX;
use federation_spec::proto::{self, CampaignAck, ErrorCode, Rejected};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Least wait before resending a step refused with `BUSY` or `RATE_LIMITED` that came with
/// a `retry_after_ms`: the relay's figure, but never a busy loop.
const MIN_CAMPAIGN_RETRY: Duration = Duration::from_millis(5);

fn campaign_id(bytes: &[u8]) -> Option<CampaignId> {
    bytes.try_into().ok()
}

impl<W, C> ClientSession<W, C> {
    /// Takes a campaign step into custody.
    pub(crate) fn submit_campaign_step(&mut self, step: NewStep, waiter: C) {
        if self.closing.is_some() {
            self.campaign_completions
                .push_back((waiter, Err(SendError::Closed("client is closing".into()))));
            return;
        }
        if let Err(waiter) = self.campaigns.insert(step, waiter) {
            self.campaign_completions
                .push_back((waiter, Err(SendError::DuplicateId)));
        }
    }

    /// The next campaign step to put on the wire, if the limits allow one.
    pub(super) fn next_campaign_step(&mut self, now: Now) -> Option<Transmit> {
        loop {
            let live = self.live.as_mut()?;
            if self.campaigns.in_flight_len() >= live.max_inflight {
                return None;
            }
            let key = self.campaigns.next_ready(now.at)?;
            let entry = self.campaigns.get(key)?;
            if let Some(error) = local_refusal(live, entry) {
                self.drop_step(key, error);
                continue;
            }
            let bytes = entry.frame.clone();
            self.campaigns.mark_in_flight(key);
            live.last_sent = now.at;
            return Some(Transmit {
                route: Route::Control,
                bytes,
            });
        }
    }

    pub(super) fn on_campaign_ack(&mut self, a: CampaignAck) {
        let Some(campaign) = campaign_id(&a.campaign_id) else {
            warn!(peer = %self.peer, "campaign ack with an id that is not 16 bytes");
            return;
        };
        let Some(entry) = self.campaigns.take_acked(campaign, a.seq) else {
            debug!(peer = %self.peer, campaign = %hex::encode(campaign), seq = a.seq, "campaign ack for nothing held");
            return;
        };
        let ack = ChunkAck::from(&a);
        debug!(peer = %self.peer, campaign = %hex::encode(campaign), seq = a.seq, duplicate = a.duplicate, "campaign step acked");
        for waiter in entry.waiters {
            self.campaign_completions
                .push_back((waiter, Ok(CampaignAnswer::Ack(ack))));
        }
    }

    /// A status answers the campaign's held status requests (and its Cancel once final);
    /// one that nothing waits for is the relay's news, for the application.
    pub(super) fn on_campaign_status(&mut self, s: proto::CampaignStatus) {
        let status = match CampaignStatus::try_from(s) {
            Ok(status) => status,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "campaign status ignored");
                return;
            }
        };
        let waiters: Vec<C> = self
            .campaigns
            .take_status(status.campaign_id, status.state.is_finished())
            .into_iter()
            .flat_map(|entry| entry.waiters)
            .collect();
        if waiters.is_empty() {
            self.events.push_back(Event::CampaignStatus(status));
            return;
        }
        for waiter in waiters {
            self.campaign_completions
                .push_back((waiter, Ok(CampaignAnswer::Status(status.clone()))));
        }
    }

    pub(super) fn on_campaign_rejected(&mut self, r: Rejected, now: Now) {
        let code = error_code(r.code);
        let Some(campaign) = campaign_id(&r.campaign_id) else {
            warn!(peer = %self.peer, ?code, detail = %r.detail, "campaign rejection with an id that is not 16 bytes");
            return;
        };
        let Some(key) = self.campaigns.rejected(campaign, r.seq) else {
            debug!(peer = %self.peer, campaign = %hex::encode(campaign), seq = r.seq, ?code, "campaign rejection for nothing in flight");
            return;
        };
        // SPEC.md 8.5: without a figure, at least a second.
        let wait = match r.retry_after_ms {
            0 => MIN_RETRY_AFTER,
            ms => Duration::from_millis(u64::from(ms)).max(MIN_CAMPAIGN_RETRY),
        };
        let retry = match code {
            ErrorCode::RateLimited | ErrorCode::Busy => Some(Some(now.at + wait)),
            ErrorCode::FlowControl => Some(Some(now.at + FLOW_CONTROL_BACKOFF)),
            // Refused after the relay's Goaway: resend on the next session.
            ErrorCode::ShuttingDown => Some(None),
            _ => None,
        };
        if code == ErrorCode::RateLimited {
            // The broadcaster's recipients-per-second quota: slow every step down.
            self.campaigns.pause(now.at + wait);
        }
        if code == ErrorCode::ShuttingDown {
            self.stop_sending(None, now);
        }
        match retry {
            Some(until) => {
                debug!(peer = %self.peer, campaign = %hex::encode(campaign), seq = r.seq, ?code, "campaign step refused, will resend");
                self.campaigns.retry(key, until);
            }
            None => {
                info!(peer = %self.peer, campaign = %hex::encode(campaign), seq = r.seq, ?code, detail = %r.detail, "campaign step rejected");
                self.drop_step(
                    key,
                    SendError::Rejected {
                        code,
                        retry_after_ms: r.retry_after_ms,
                        detail: r.detail,
                    },
                );
            }
        }
    }

    /// Fails a step for good. A campaign whose Begin fails can do nothing more: its other
    /// steps fail with it.
    fn drop_step(&mut self, key: StepKey, error: SendError) {
        let Some(entry) = self.campaigns.remove(key) else {
            return;
        };
        self.fail_step(entry, &error);
        if key.step == Step::Begin {
            for entry in self.campaigns.remove_campaign(key.campaign) {
                self.fail_step(entry, &error);
            }
        }
    }

    pub(super) fn fail_step(&mut self, entry: StepEntry<C>, error: &SendError) {
        for waiter in entry.waiters {
            self.campaign_completions
                .push_back((waiter, Err(error.clone())));
        }
    }
}

/// Why a step must not be sent on this session at all, if it must not.
fn local_refusal<C>(live: &Live, entry: &StepEntry<C>) -> Option<SendError> {
    if entry.recipients > live.max_chunk_recipients {
        return Some(SendError::Invalid(PrepareError::TooManyRecipients {
            len: entry.recipients,
            max: live.max_chunk_recipients,
        }));
    }
    let len = entry.frame.len().saturating_sub(LENGTH_PREFIX);
    if len > live.max_frame {
        return Some(SendError::Invalid(PrepareError::Protocol(
            ProtocolError::FrameTooLarge {
                len,
                max: live.max_frame,
            },
        )));
    }
    None
}
