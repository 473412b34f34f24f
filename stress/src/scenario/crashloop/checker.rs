//! The checker of a crash loop: a history of what the platforms were told and what they
//! received, classified once the run is over (the way Jepsen checks a database).
//!
//! For every message it keeps the origin and destination platform, the relay's answer
//! (accepted, accepted as a duplicate of an earlier attempt, refused, or none), every copy
//! that reached a platform, and whether the origin got an `Expired` notice. Each platform
//! deduplicates what it receives by (origin platform, id), as SPEC.md 6.6 requires of a
//! destination; a copy that passes that dedup is *admitted*, one that does not is a
//! *redelivery* (at-least-once delivery on the wire, absorbed by the platform). Receipts are
//! followed the same way, deduplicated by their origin by (sending platform, id, kind).
//!
//! At the end every accepted message is in exactly one class: delivered (admitted by its
//! destination), expired with notice (never admitted, its origin was told), or lost, so
//! `lost = accepted − delivered − expired`. A message admitted more than once — possible only
//! if a copy comes back under another dedup key, i.e. to another platform or with another
//! origin — counts in `duplicates_after_dedup`. Anything the protocol rules out (a copy of a
//! refused message, a notice to a platform that did not send the message, an unverified
//! signature) is an anomaly and fails the run.
//!
//! Campaign recipients are followed the same way: a recipient counts as accepted once the
//! relay acknowledged its chunk, and is delivered when its platform admits it, deduplicating
//! by (campaign, recipient) as SPEC.md 9.8 asks of a platform. A recipient admitted by a
//! platform that is not its own is an anomaly.

use crate::accounting::LaneKind;
use relay_client::{MessageId, ReceiptKind};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

/// Examples kept per kind of finding.
const EXAMPLES: usize = 10;

/// What the relay (or the SDK) said about a message or receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Nothing yet.
    Pending,
    /// Durable at the relay; `duplicate` when the relay already had it (a resend).
    Accepted { duplicate: bool },
    /// Refused: the relay keeps nothing.
    Refused,
    /// The SDK stopped trying before an answer came: it was closed, or the message's TTL ran
    /// out by its clock while it waited to resend it (SPEC.md 7.2). The relay may or may not
    /// have it.
    GaveUp,
}

#[derive(Debug)]
struct Receipt {
    answer: Answer,
    copies: u32,
    admitted: u32,
}

#[derive(Debug)]
struct Record {
    origin: usize,
    dest: usize,
    lane: LaneKind,
    answer: Answer,
    copies: u32,
    admitted: u32,
    expired: bool,
    receipt: Option<Receipt>,
}

#[derive(Default)]
struct State {
    messages: HashMap<MessageId, Record>,
    /// Per platform: the (origin, id) pairs it has admitted.
    dedup: Vec<HashSet<(usize, MessageId)>>,
    /// Per platform: the (sender, id, kind) receipts it has admitted.
    receipt_dedup: Vec<HashSet<(usize, MessageId, i32)>>,
    refusals: BTreeMap<String, u64>,
    gave_up: BTreeMap<String, u64>,
    receipt_refusals: BTreeMap<String, u64>,
    anomalies: BTreeMap<&'static str, u64>,
    examples: Vec<String>,
    /// Campaign recipients: (campaign, recipient) -> (chunk acknowledged, copies received).
    recipients: HashMap<([u8; 16], String), (bool, u32)>,
    campaigns_begun: u64,
}

impl State {
    fn anomaly(&mut self, kind: &'static str, detail: impl FnOnce() -> String) {
        *self.anomalies.entry(kind).or_default() += 1;
        if self.examples.len() < EXAMPLES {
            let d = detail();
            self.examples.push(format!("{kind}: {d}"));
        }
    }
}

/// Counts at one moment, for progress lines and the end of the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Messages handed to the SDK.
    pub sent: u64,
    /// Answered Accepted (durable at the relay).
    pub accepted: u64,
    /// Of those, answered `Accepted{duplicate}`: the relay already had the message when the
    /// SDK resent it after a reconnect (its dedup at work).
    pub accepted_as_duplicate: u64,
    /// Refused by the relay or the SDK, by reason; the relay keeps nothing of these.
    pub refused: BTreeMap<String, u64>,
    /// No answer (yet, or ever: the SDK gave up first). Not counted as accepted.
    pub unanswered: u64,
    /// Of those, the ones the SDK gave up on, by reason: `CLOSED`, or `EXPIRED_BEFORE_ACCEPT`
    /// (its TTL ran out by the SDK's clock before an answer came, so it was not resent).
    pub gave_up: BTreeMap<String, u64>,
    /// Accepted, and admitted by its destination platform.
    pub delivered: u64,
    /// Accepted, never admitted, and its origin got an `Expired` notice.
    pub expired: u64,
    /// Accepted, never admitted, no notice: `accepted − delivered − expired`.
    pub lost: u64,
    /// Admitted although no Accepted came: the relay had it, but its answer was lost with a
    /// killed relay and the SDK gave up before a resend was answered.
    pub delivered_unanswered: u64,
    /// Copies beyond the first that reached a platform (absorbed by its dedup).
    pub redeliveries: u64,
    /// Messages that arrived more than once.
    pub messages_redelivered: u64,
    /// Admissions beyond the first: a message the platforms took in twice despite their
    /// (origin, id) dedup.
    pub duplicates_after_dedup: u64,
    /// The receipts.
    pub receipts: ReceiptVerdict,
    /// The campaign recipients.
    pub campaigns: CampaignVerdict,
    /// What the protocol rules out, by kind.
    pub anomalies: BTreeMap<String, u64>,
    /// The first anomalies and lost messages, described.
    pub examples: Vec<String>,
}

/// What became of the campaign recipients.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CampaignVerdict {
    /// Campaigns begun.
    pub campaigns: u64,
    /// Recipients of chunks the relay acknowledged.
    pub accepted: u64,
    /// Of those, received by their platform.
    pub delivered: u64,
    /// Accepted, never received (campaigns here live far longer than the run).
    pub lost: u64,
    /// Received although their chunk was never acknowledged (the ack was lost with a killed
    /// relay and the run ended before the resend was answered).
    pub delivered_unacknowledged: u64,
    /// Copies beyond the first (absorbed by the platform's dedup).
    pub redeliveries: u64,
}

/// What became of the delivery receipts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReceiptVerdict {
    /// Handed to the SDK by a receiving gateway.
    pub sent: u64,
    /// Answered Accepted.
    pub accepted: u64,
    /// Refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// No answer.
    pub unanswered: u64,
    /// Accepted and admitted by the original sender's platform.
    pub received: u64,
    /// Accepted, never received (receipts do not expire within a run: chat TTL).
    pub lost: u64,
    /// Copies beyond the first.
    pub redeliveries: u64,
    /// Admissions beyond the first.
    pub duplicates_after_dedup: u64,
}

impl Verdict {
    /// Nothing accepted went missing, nothing passed the dedup twice, nothing impossible
    /// happened.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.campaigns.lost == 0
            && self.duplicates_after_dedup == 0
            && self.receipts.lost == 0
            && self.receipts.duplicates_after_dedup == 0
            && self.anomalies.is_empty()
    }
}

/// The history of a run.
pub(super) struct Checker {
    platforms: Vec<String>,
    state: Mutex<State>,
}

impl Checker {
    /// A checker for these platforms (indices are positions in `platforms`).
    pub(super) fn new(platforms: Vec<String>) -> Self {
        let n = platforms.len();
        Self {
            platforms,
            state: Mutex::new(State {
                dedup: vec![HashSet::new(); n],
                receipt_dedup: vec![HashSet::new(); n],
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere leaves plain data behind; keep checking.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The platform index of an address `user@platform`.
    fn platform_of(&self, address: &str) -> Option<usize> {
        let (_, platform) = address.rsplit_once('@')?;
        self.platforms.iter().position(|p| p == platform)
    }

    /// A message from `origin` to `dest` is about to be handed to the SDK.
    pub(super) fn sent(&self, id: MessageId, origin: usize, dest: usize, lane: LaneKind) {
        self.lock().messages.insert(
            id,
            Record {
                origin,
                dest,
                lane,
                answer: Answer::Pending,
                copies: 0,
                admitted: 0,
                expired: false,
                receipt: None,
            },
        );
    }

    /// The answer to a message; `reason` names a refusal.
    pub(super) fn answered(&self, id: MessageId, answer: Answer, reason: &str) {
        let mut s = self.lock();
        let Some(r) = s.messages.get_mut(&id) else {
            return;
        };
        if r.answer != Answer::Pending {
            return;
        }
        r.answer = answer;
        let delivered = r.copies > 0;
        if answer == Answer::GaveUp {
            *s.gave_up.entry(reason.to_string()).or_default() += 1;
        }
        if answer == Answer::Refused {
            *s.refusals.entry(reason.to_string()).or_default() += 1;
            if delivered {
                s.anomaly("refused_but_delivered", || {
                    format!("{id} was delivered, then refused ({reason})")
                });
            }
        }
    }

    /// `platform` received a copy of a message. True when it passed the platform's dedup
    /// (the first copy under its (origin, id) key), i.e. the platform takes it in.
    pub(super) fn delivered(
        &self,
        platform: usize,
        id: MessageId,
        from: &str,
        to: &str,
        verified: bool,
    ) -> bool {
        let origin = self.platform_of(from);
        let mut s = self.lock();
        if !verified {
            s.anomaly("unverified_signature", || format!("{id} from {from}"));
        }
        let Some(origin) = origin else {
            s.anomaly("unknown_origin", || format!("{id} from {from}"));
            return false;
        };
        let Some(r) = s.messages.get_mut(&id) else {
            s.anomaly("unknown_message", || format!("{id} from {from} to {to}"));
            return false;
        };
        r.copies = r.copies.saturating_add(1);
        let (dest, sent_by, refused) = (r.dest, r.origin, r.answer == Answer::Refused);
        if dest != platform {
            s.anomaly("misrouted", || {
                format!("{id} for {to} (platform #{dest}) reached platform #{platform}")
            });
        }
        if sent_by != origin {
            s.anomaly("origin_changed", || {
                format!("{id} sent by platform #{sent_by} arrived as from {from}")
            });
        }
        if refused {
            s.anomaly("refused_but_delivered", || {
                format!("{id} was refused, then delivered")
            });
        }
        let admitted = s
            .dedup
            .get_mut(platform)
            .is_some_and(|set| set.insert((origin, id)));
        if admitted && let Some(r) = s.messages.get_mut(&id) {
            r.admitted += 1;
        }
        admitted
    }

    /// `platform` got an `Expired` notice for a message.
    pub(super) fn expired(&self, platform: usize, id: MessageId) {
        let mut s = self.lock();
        let Some(r) = s.messages.get_mut(&id) else {
            s.anomaly("unknown_expired", || format!("{id}"));
            return;
        };
        r.expired = true;
        let origin = r.origin;
        if origin != platform {
            s.anomaly("expired_notice_to_non_origin", || {
                format!("{id} from platform #{origin} reported to #{platform}")
            });
        }
    }

    /// A receiving gateway hands a delivery receipt for message `id` to the SDK.
    pub(super) fn receipt_sent(&self, id: MessageId) {
        let mut s = self.lock();
        if let Some(r) = s.messages.get_mut(&id) {
            r.receipt = Some(Receipt {
                answer: Answer::Pending,
                copies: 0,
                admitted: 0,
            });
        }
    }

    /// The answer to a receipt.
    pub(super) fn receipt_answered(&self, id: MessageId, answer: Answer, reason: &str) {
        let mut s = self.lock();
        let Some(rc) = s.messages.get_mut(&id).and_then(|r| r.receipt.as_mut()) else {
            return;
        };
        if rc.answer != Answer::Pending {
            return;
        }
        rc.answer = answer;
        if answer == Answer::Refused {
            *s.receipt_refusals.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// `platform` received a receipt for message `id` from the recipient `from`.
    pub(super) fn receipt_received(
        &self,
        platform: usize,
        id: MessageId,
        from: &str,
        kind: ReceiptKind,
    ) {
        let sender = self.platform_of(from);
        let mut s = self.lock();
        let Some(r) = s.messages.get_mut(&id) else {
            s.anomaly("receipt_for_unknown_message", || {
                format!("{id} from {from}")
            });
            return;
        };
        let (origin, dest) = (r.origin, r.dest);
        let Some(rc) = r.receipt.as_mut() else {
            s.anomaly("receipt_never_sent", || format!("{id} from {from}"));
            return;
        };
        rc.copies = rc.copies.saturating_add(1);
        if origin != platform {
            s.anomaly("receipt_to_non_origin", || {
                format!("{id} from platform #{origin} reached #{platform}")
            });
        }
        let Some(sender) = sender else {
            s.anomaly("receipt_unknown_sender", || format!("{id} from {from}"));
            return;
        };
        if sender != dest {
            s.anomaly("receipt_sender_changed", || {
                format!("{id} receipt from {from}, the message went to platform #{dest}")
            });
        }
        let admitted = s
            .receipt_dedup
            .get_mut(platform)
            .is_some_and(|set| set.insert((sender, id, kind as i32)));
        if admitted && let Some(rc) = s.messages.get_mut(&id).and_then(|r| r.receipt.as_mut()) {
            rc.admitted += 1;
        }
    }

    /// What is still expected: answers to messages and receipts, deliveries or notices of
    /// accepted messages, arrivals of accepted receipts.
    pub(super) fn outstanding(&self) -> u64 {
        let s = self.lock();
        let mut n = s
            .recipients
            .values()
            .filter(|(acked, copies)| *acked && *copies == 0)
            .count() as u64;
        for r in s.messages.values() {
            match r.answer {
                Answer::Pending => n += 1,
                Answer::Accepted { .. } if r.admitted == 0 && !r.expired => n += 1,
                _ => {}
            }
            if let Some(rc) = &r.receipt {
                match rc.answer {
                    Answer::Pending => n += 1,
                    Answer::Accepted { .. } if rc.admitted == 0 => n += 1,
                    _ => {}
                }
            }
        }
        n
    }

    /// Classifies everything seen so far.
    /// A campaign was begun.
    pub(super) fn campaign_begun(&self) {
        self.lock().campaigns_begun += 1;
    }

    /// The relay acknowledged a chunk with these recipients.
    pub(super) fn chunk_accepted(&self, campaign: [u8; 16], recipients: &[String]) {
        let mut s = self.lock();
        for r in recipients {
            s.recipients.entry((campaign, r.clone())).or_default().0 = true;
        }
    }

    /// `platform` received a BulkDeliver of `campaign` for these recipients.
    pub(super) fn bulk_delivered(
        &self,
        platform: usize,
        campaign: [u8; 16],
        recipients: &[String],
    ) {
        let name = self.platforms.get(platform).cloned().unwrap_or_default();
        let mut s = self.lock();
        for r in recipients {
            if !r.ends_with(&format!("@{name}")) {
                s.anomaly("campaign recipient delivered to another platform", || {
                    format!("{r} to {name}")
                });
                continue;
            }
            s.recipients.entry((campaign, r.clone())).or_default().1 += 1;
        }
    }

    pub(super) fn verdict(&self) -> Verdict {
        let s = self.lock();
        let mut v = Verdict {
            refused: s.refusals.clone(),
            gave_up: s.gave_up.clone(),
            anomalies: s
                .anomalies
                .iter()
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
            examples: s.examples.clone(),
            ..Verdict::default()
        };
        v.receipts.refused = s.receipt_refusals.clone();
        v.campaigns.campaigns = s.campaigns_begun;
        for &(acked, copies) in s.recipients.values() {
            let c = &mut v.campaigns;
            c.redeliveries += u64::from(copies.saturating_sub(1));
            match (acked, copies > 0) {
                (true, true) => {
                    c.accepted += 1;
                    c.delivered += 1;
                }
                (true, false) => {
                    c.accepted += 1;
                    c.lost += 1;
                }
                (false, true) => c.delivered_unacknowledged += 1,
                (false, false) => {}
            }
        }
        let mut lost_examples = Vec::new();
        for (id, r) in &s.messages {
            v.sent += 1;
            v.redeliveries += u64::from(r.copies.saturating_sub(1));
            v.messages_redelivered += u64::from(r.copies > 1);
            v.duplicates_after_dedup += u64::from(r.admitted.saturating_sub(1));
            match r.answer {
                Answer::Accepted { duplicate } => {
                    v.accepted += 1;
                    v.accepted_as_duplicate += u64::from(duplicate);
                    if r.admitted > 0 {
                        v.delivered += 1;
                    } else if r.expired {
                        v.expired += 1;
                    } else {
                        v.lost += 1;
                        if lost_examples.len() < EXAMPLES {
                            lost_examples.push(format!(
                                "lost: {id} {} → {} on the {} lane",
                                self.platforms.get(r.origin).map_or("?", String::as_str),
                                self.platforms.get(r.dest).map_or("?", String::as_str),
                                r.lane.name()
                            ));
                        }
                    }
                }
                Answer::Pending | Answer::GaveUp => {
                    v.unanswered += 1;
                    v.delivered_unanswered += u64::from(r.admitted > 0);
                }
                Answer::Refused => {}
            }
            if let Some(rc) = &r.receipt {
                let t = &mut v.receipts;
                t.sent += 1;
                t.redeliveries += u64::from(rc.copies.saturating_sub(1));
                t.duplicates_after_dedup += u64::from(rc.admitted.saturating_sub(1));
                match rc.answer {
                    Answer::Accepted { .. } if rc.admitted > 0 => {
                        t.accepted += 1;
                        t.received += 1;
                    }
                    Answer::Accepted { .. } => {
                        t.accepted += 1;
                        t.lost += 1;
                    }
                    Answer::Pending | Answer::GaveUp => t.unanswered += 1,
                    Answer::Refused => {}
                }
            }
        }
        v.examples.extend(lost_examples);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    fn checker() -> Checker {
        Checker::new(vec!["alpha".into(), "beta".into()])
    }

    const ACCEPTED: Answer = Answer::Accepted { duplicate: false };

    #[test]
    fn accepted_messages_are_delivered_expired_or_lost() {
        let c = checker();
        for n in 1..=4 {
            c.sent(id(n), 0, 1, LaneKind::Chat);
        }
        c.answered(id(1), ACCEPTED, "");
        c.answered(id(2), Answer::Accepted { duplicate: true }, "");
        c.answered(id(3), ACCEPTED, "");
        c.answered(id(4), Answer::Refused, "BUSY");
        assert!(c.delivered(1, id(1), "u1@alpha", "u2@beta", true));
        c.expired(0, id(2));
        let v = c.verdict();
        assert_eq!((v.sent, v.accepted, v.accepted_as_duplicate), (4, 3, 1));
        assert_eq!((v.delivered, v.expired, v.lost), (1, 1, 1));
        assert_eq!(v.refused.get("BUSY"), Some(&1));
        assert!(v.anomalies.is_empty(), "{v:?}");
        assert!(!v.clean());
        assert_eq!(c.outstanding(), 1, "id 3 is still expected");
    }

    #[test]
    fn redeliveries_are_absorbed_by_the_platform_dedup() {
        let c = checker();
        c.sent(id(1), 0, 1, LaneKind::Call);
        assert!(c.delivered(1, id(1), "u1@alpha", "u2@beta", true));
        assert!(!c.delivered(1, id(1), "u1@alpha", "u2@beta", true));
        c.answered(id(1), ACCEPTED, "");
        let v = c.verdict();
        assert_eq!(
            (v.delivered, v.redeliveries, v.messages_redelivered),
            (1, 1, 1)
        );
        assert_eq!(v.duplicates_after_dedup, 0);
        assert!(v.clean(), "{v:?}");
        assert_eq!(c.outstanding(), 0);
    }

    #[test]
    fn a_copy_under_another_key_passes_the_dedup_and_is_flagged() {
        let c = checker();
        c.sent(id(1), 0, 1, LaneKind::Chat);
        c.answered(id(1), ACCEPTED, "");
        assert!(c.delivered(1, id(1), "u1@alpha", "u2@beta", true));
        // The same id again, now claiming another origin.
        assert!(c.delivered(1, id(1), "u1@beta", "u2@beta", true));
        let v = c.verdict();
        assert_eq!(v.duplicates_after_dedup, 1);
        assert_eq!(v.anomalies.get("origin_changed"), Some(&1));
        assert!(!v.clean());
    }

    #[test]
    fn what_the_protocol_rules_out_is_an_anomaly() {
        let c = checker();
        c.sent(id(1), 0, 1, LaneKind::Chat);
        c.answered(id(1), Answer::Refused, "NOT_PERMITTED");
        c.delivered(1, id(1), "u1@alpha", "u2@beta", false);
        c.expired(1, id(1));
        c.delivered(1, id(9), "u1@alpha", "u2@beta", true);
        let v = c.verdict();
        for kind in [
            "refused_but_delivered",
            "unverified_signature",
            "expired_notice_to_non_origin",
            "unknown_message",
        ] {
            assert_eq!(v.anomalies.get(kind), Some(&1), "{kind}: {v:?}");
        }
        assert_eq!(v.examples.len(), 4);
    }

    #[test]
    fn unanswered_messages_are_not_accepted() {
        let c = checker();
        c.sent(id(1), 0, 1, LaneKind::Chat);
        c.sent(id(2), 0, 1, LaneKind::Chat);
        c.answered(id(2), Answer::GaveUp, "EXPIRED_BEFORE_ACCEPT");
        assert!(c.delivered(1, id(2), "u1@alpha", "u2@beta", true));
        let v = c.verdict();
        assert_eq!(
            (v.accepted, v.unanswered, v.delivered_unanswered),
            (0, 2, 1)
        );
        assert_eq!(v.lost, 0);
        assert_eq!(c.outstanding(), 1, "only the pending answer");
    }

    #[test]
    fn receipts_are_followed_to_the_origin() {
        let c = checker();
        c.sent(id(1), 0, 1, LaneKind::Chat);
        c.answered(id(1), ACCEPTED, "");
        assert!(c.delivered(1, id(1), "u1@alpha", "u2@beta", true));
        c.receipt_sent(id(1));
        c.receipt_answered(id(1), ACCEPTED, "");
        assert_eq!(c.outstanding(), 1, "the receipt is expected");
        c.receipt_received(0, id(1), "u2@beta", ReceiptKind::Delivered);
        c.receipt_received(0, id(1), "u2@beta", ReceiptKind::Delivered);
        let v = c.verdict();
        let r = &v.receipts;
        assert_eq!((r.sent, r.accepted, r.received, r.lost), (1, 1, 1, 0));
        assert_eq!((r.redeliveries, r.duplicates_after_dedup), (1, 0));
        assert!(v.clean(), "{v:?}");
        assert_eq!(c.outstanding(), 0);
        c.receipt_received(0, id(7), "u2@beta", ReceiptKind::Delivered);
        assert_eq!(
            c.verdict().anomalies.get("receipt_for_unknown_message"),
            Some(&1)
        );
    }
}
