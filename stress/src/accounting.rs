//! The ledger: what became of every message the generator sent, by id.
//!
//! Senders register a message before handing it to the SDK, then record the relay's answer;
//! receivers record every delivery and every expiry notice. At the end [`Ledger::tally`] puts
//! each message in exactly one class, so the classes add up to what was sent:
//!
//! - delivered exactly once, delivered more than once;
//! - expired with notice (never delivered, and the relay said so);
//! - rejected, by reason (the relay's error code, or the SDK's reason for not sending);
//! - lost: accepted by the relay, never delivered, never reported expired;
//! - unconfirmed: never answered and never seen again (the connection ended first).
//!
//! Nothing here touches a socket, so the rules are tested on their own.

use relay_client::{Lane, MessageId};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Independent locks, so that senders and receivers on different cores rarely meet.
const SHARDS: usize = 16;

/// A lane as an index into per-lane tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LaneKind {
    /// Call signalling.
    Call,
    /// Chat.
    Chat,
}

impl LaneKind {
    /// Both lanes, in table order.
    pub const ALL: [LaneKind; 2] = [LaneKind::Call, LaneKind::Chat];

    /// Index into per-lane tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LaneKind::Call => "call",
            LaneKind::Chat => "chat",
        }
    }

    /// The protocol lane.
    pub fn lane(self) -> Lane {
        match self {
            LaneKind::Call => Lane::Call,
            LaneKind::Chat => Lane::Chat,
        }
    }
}

/// Message ids are random, so their first eight bytes are already a good hash.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
        }
    }
}

type IdMap<V> = HashMap<MessageId, V, BuildHasherDefault<IdHasher>>;

/// The relay's answer to a message, as far as the generator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Pending,
    Accepted,
    /// With the index of the reason in [`Ledger::reasons`].
    Rejected(u16),
}

#[derive(Debug, Clone)]
struct Entry {
    phase: u16,
    lane: LaneKind,
    due_ns: u64,
    submit_ns: u64,
    answer: Answer,
    deliveries: u32,
    expired: bool,
    resolved: bool,
}

impl Entry {
    /// Nothing more is expected for it.
    fn is_resolved(&self) -> bool {
        match self.answer {
            Answer::Rejected(_) => true,
            Answer::Accepted | Answer::Pending => self.deliveries > 0 || self.expired,
        }
    }
}

/// What a receiver learns from recording a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The first copy: its latency counts.
    First {
        /// The phase that sent it.
        phase: u16,
        /// Its lane.
        lane: LaneKind,
        /// When it should have been sent (the schedule, in open loop).
        due_ns: u64,
        /// When it was handed to the SDK.
        submit_ns: u64,
    },
    /// A copy already seen.
    Duplicate,
    /// An id this generator never sent.
    Unknown,
}

/// Live counters, read by the sampler while a run goes on.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages registered.
    pub sent: AtomicU64,
    /// Accepted answers.
    pub accepted: AtomicU64,
    /// Rejections (all reasons).
    pub rejected: AtomicU64,
    /// First deliveries.
    pub delivered: AtomicU64,
    /// Extra copies delivered.
    pub duplicates: AtomicU64,
    /// Expiry notices for messages not delivered.
    pub expired: AtomicU64,
    /// Messages with nothing more to wait for.
    pub resolved: AtomicU64,
    /// When the last accepted answer was recorded (ns on the run clock).
    pub last_accept_ns: AtomicU64,
    /// When the last first delivery was recorded.
    pub last_delivery_ns: AtomicU64,
}

/// The final classification of the messages of one phase (or of all of them).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Messages handed to the SDK.
    pub sent: u64,
    /// Accepted by the relay (whatever happened next).
    pub accepted: u64,
    /// Delivered exactly once.
    pub delivered_once: u64,
    /// Delivered two or more times.
    pub delivered_more_than_once: u64,
    /// Copies beyond the first, over all messages.
    pub duplicate_copies: u64,
    /// Never delivered; the relay sent an expiry notice.
    pub expired_with_notice: u64,
    /// Refused, by reason (wire error code name, or the SDK's reason).
    pub rejected: BTreeMap<String, u64>,
    /// Accepted, never delivered, never reported expired.
    pub lost: u64,
    /// No answer and never seen again (the connection ended before the relay answered).
    pub unconfirmed: u64,
    /// Deliveries and notices of ids this generator never sent.
    pub unknown_ids: u64,
    /// Delivered, and also reported expired (a late ack): counted as delivered.
    pub expired_after_delivery: u64,
}

impl Tally {
    /// All rejections.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Delivered at least once.
    pub fn delivered(&self) -> u64 {
        self.delivered_once + self.delivered_more_than_once
    }

    /// Adds another tally's counts to this one.
    pub fn add(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.accepted += o.accepted;
        self.delivered_once += o.delivered_once;
        self.delivered_more_than_once += o.delivered_more_than_once;
        self.duplicate_copies += o.duplicate_copies;
        self.expired_with_notice += o.expired_with_notice;
        for (r, n) in &o.rejected {
            *self.rejected.entry(r.clone()).or_default() += n;
        }
        self.lost += o.lost;
        self.unconfirmed += o.unconfirmed;
        self.unknown_ids += o.unknown_ids;
        self.expired_after_delivery += o.expired_after_delivery;
    }

    /// The classes add up to what was sent.
    pub fn is_consistent(&self) -> bool {
        self.delivered()
            + self.expired_with_notice
            + self.rejected_total()
            + self.lost
            + self.unconfirmed
            == self.sent
    }
}

/// Every message of a run and what became of it.
pub struct Ledger {
    shards: Vec<Mutex<IdMap<Entry>>>,
    /// Rejection reasons, interned: refusals are rare and their names few.
    reasons: Mutex<Vec<String>>,
    unknown: AtomicU64,
    /// Tallies of phases whose entries were dropped (see [`Ledger::retire`]).
    retired: Mutex<Tally>,
    /// Live counters.
    pub counters: Counters,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(IdMap::default())).collect(),
            reasons: Mutex::new(Vec::new()),
            unknown: AtomicU64::new(0),
            retired: Mutex::new(Tally::default()),
            counters: Counters::default(),
        }
    }

    fn shard(&self, id: &MessageId) -> std::sync::MutexGuard<'_, IdMap<Entry>> {
        let i = id.0[15] as usize % SHARDS;
        // A panic while holding a shard leaves plain data behind; keep counting.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a message about to be handed to the SDK. `due_ns` is when it should have
    /// gone (its schedule slot in open loop), `submit_ns` when it actually goes.
    pub fn sent(&self, phase: u16, id: MessageId, lane: LaneKind, due_ns: u64, submit_ns: u64) {
        self.shard(&id).insert(
            id,
            Entry {
                phase,
                lane,
                due_ns,
                submit_ns,
                answer: Answer::Pending,
                deliveries: 0,
                expired: false,
                resolved: false,
            },
        );
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// The relay accepted it.
    pub fn accepted(&self, id: MessageId, now_ns: u64) {
        let mut shard = self.shard(&id);
        if let Some(e) = shard.get_mut(&id)
            && e.answer == Answer::Pending
        {
            e.answer = Answer::Accepted;
            self.counters.accepted.fetch_add(1, Ordering::Relaxed);
            self.counters
                .last_accept_ns
                .fetch_max(now_ns, Ordering::Relaxed);
            self.settle(e);
        }
    }

    /// The relay (or the SDK) refused it, for `reason`.
    pub fn rejected(&self, id: MessageId, reason: &str) {
        let reason = self.intern(reason);
        let mut shard = self.shard(&id);
        if let Some(e) = shard.get_mut(&id)
            && e.answer == Answer::Pending
        {
            e.answer = Answer::Rejected(reason);
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            self.settle(e);
        }
    }

    fn intern(&self, reason: &str) -> u16 {
        let mut reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = reasons.iter().position(|r| r == reason) {
            return i as u16;
        }
        reasons.push(reason.to_string());
        (reasons.len() - 1) as u16
    }

    /// A receiver got a copy of it.
    pub fn delivered(&self, id: MessageId, now_ns: u64) -> Delivery {
        let mut shard = self.shard(&id);
        let Some(e) = shard.get_mut(&id) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return Delivery::Unknown;
        };
        e.deliveries = e.deliveries.saturating_add(1);
        if e.deliveries > 1 {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return Delivery::Duplicate;
        }
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        self.counters
            .last_delivery_ns
            .fetch_max(now_ns, Ordering::Relaxed);
        self.settle(e);
        Delivery::First {
            phase: e.phase,
            lane: e.lane,
            due_ns: e.due_ns,
            submit_ns: e.submit_ns,
        }
    }

    /// The relay reported it expired undelivered.
    pub fn expired(&self, id: MessageId) {
        let mut shard = self.shard(&id);
        let Some(e) = shard.get_mut(&id) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !e.expired {
            e.expired = true;
            if e.deliveries == 0 {
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
            }
            self.settle(e);
        }
    }

    fn settle(&self, e: &mut Entry) {
        if !e.resolved && e.is_resolved() {
            e.resolved = true;
            self.counters.resolved.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Messages still waiting for an answer, a delivery or an expiry.
    pub fn outstanding(&self) -> u64 {
        let sent = self.counters.sent.load(Ordering::Relaxed);
        sent.saturating_sub(self.counters.resolved.load(Ordering::Relaxed))
    }

    /// Messages registered.
    pub fn sent_count(&self) -> u64 {
        self.counters.sent.load(Ordering::Relaxed)
    }

    /// Freezes the tally of a finished, fully resolved phase and drops its entries, so that
    /// a run of many phases does not keep every message in memory. A copy that still arrives
    /// later counts as an unknown id.
    pub fn retire(&self, phase: u16) {
        let tally = self.tally(Some(phase));
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, e| e.phase != phase);
        }
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.add(&tally);
    }

    /// Classifies the messages of `phase` (`None`: all phases, retired ones included).
    pub fn tally(&self, phase: Option<u16>) -> Tally {
        let mut t = self.live_tally(phase);
        if phase.is_none() {
            let retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            t.add(&retired);
        }
        t
    }

    fn live_tally(&self, phase: Option<u16>) -> Tally {
        let reasons = self
            .reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut t = Tally::default();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for e in shard.values() {
                if phase.is_some_and(|p| p != e.phase) {
                    continue;
                }
                t.sent += 1;
                if e.answer == Answer::Accepted {
                    t.accepted += 1;
                }
                // A delivered message counts as delivered whatever the answer said, so that
                // the classes still add up if the relay ever refused and delivered one.
                match (e.answer, e.deliveries, e.expired) {
                    (_, 1, expired) => {
                        t.delivered_once += 1;
                        t.expired_after_delivery += u64::from(expired);
                    }
                    (_, n, expired) if n > 1 => {
                        t.delivered_more_than_once += 1;
                        t.duplicate_copies += u64::from(n - 1);
                        t.expired_after_delivery += u64::from(expired);
                    }
                    (_, _, true) => t.expired_with_notice += 1,
                    (Answer::Rejected(r), _, false) => {
                        let name = reasons.get(r as usize).map_or("?", String::as_str);
                        *t.rejected.entry(name.to_string()).or_default() += 1;
                    }
                    (Answer::Accepted, _, false) => t.lost += 1,
                    (Answer::Pending, _, false) => t.unconfirmed += 1,
                }
            }
        }
        if phase.is_none() {
            t.unknown_ids = self.unknown.load(Ordering::Relaxed);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> MessageId {
        let mut b = [0u8; 16];
        b[0] = n;
        b[15] = n;
        MessageId(b)
    }

    fn send(l: &Ledger, n: u8) {
        l.sent(0, id(n), LaneKind::Chat, 10, 20);
    }

    #[test]
    fn every_message_lands_in_one_class() {
        let l = Ledger::new();
        for n in 0..6 {
            send(&l, n);
        }
        // 0: delivered once; 1: twice; 2: expired; 3: rejected; 4: lost; 5: unconfirmed.
        for n in 0..5 {
            if n != 3 {
                l.accepted(id(n), 30);
            }
        }
        l.rejected(id(3), "BUSY");
        assert!(matches!(l.delivered(id(0), 40), Delivery::First { .. }));
        assert!(matches!(l.delivered(id(1), 40), Delivery::First { .. }));
        assert_eq!(l.delivered(id(1), 50), Delivery::Duplicate);
        l.expired(id(2));
        let t = l.tally(None);
        assert_eq!(t.sent, 6);
        assert_eq!(t.accepted, 4);
        assert_eq!(t.delivered_once, 1);
        assert_eq!(t.delivered_more_than_once, 1);
        assert_eq!(t.duplicate_copies, 1);
        assert_eq!(t.expired_with_notice, 1);
        assert_eq!(t.rejected.get("BUSY"), Some(&1));
        assert_eq!(t.lost, 1);
        assert_eq!(t.unconfirmed, 1);
        assert!(t.is_consistent());
        assert_eq!(l.outstanding(), 2, "the lost and the unconfirmed one");
    }

    #[test]
    fn an_injected_loss_is_caught() {
        let l = Ledger::new();
        for n in 0..100 {
            send(&l, n);
            l.accepted(id(n), 1);
        }
        for n in 0..100 {
            if n != 42 {
                l.delivered(id(n), 2);
            }
        }
        let t = l.tally(None);
        assert_eq!(t.lost, 1);
        assert_eq!(t.delivered_once, 99);
        assert_eq!(l.outstanding(), 1);
    }

    #[test]
    fn a_duplicate_is_counted_not_lost() {
        let l = Ledger::new();
        send(&l, 1);
        l.accepted(id(1), 1);
        for _ in 0..3 {
            l.delivered(id(1), 2);
        }
        let t = l.tally(None);
        assert_eq!(
            (t.delivered_more_than_once, t.duplicate_copies, t.lost),
            (1, 2, 0)
        );
        assert_eq!(l.counters.duplicates.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn expired_is_not_lost() {
        let l = Ledger::new();
        send(&l, 7);
        l.accepted(id(7), 1);
        assert_eq!(l.outstanding(), 1);
        l.expired(id(7));
        let t = l.tally(None);
        assert_eq!((t.expired_with_notice, t.lost), (1, 0));
        assert_eq!(l.outstanding(), 0);
    }

    #[test]
    fn a_delivery_before_the_answer_still_counts() {
        let l = Ledger::new();
        send(&l, 3);
        assert!(matches!(l.delivered(id(3), 5), Delivery::First { .. }));
        l.accepted(id(3), 6);
        let t = l.tally(None);
        assert_eq!((t.delivered_once, t.accepted, t.unconfirmed), (1, 1, 0));
    }

    #[test]
    fn late_expiry_after_delivery_counts_as_delivered() {
        let l = Ledger::new();
        send(&l, 4);
        l.accepted(id(4), 1);
        l.delivered(id(4), 2);
        l.expired(id(4));
        let t = l.tally(None);
        assert_eq!(
            (
                t.delivered_once,
                t.expired_with_notice,
                t.expired_after_delivery
            ),
            (1, 0, 1)
        );
        assert!(t.is_consistent());
    }

    #[test]
    fn unknown_ids_are_reported() {
        let l = Ledger::new();
        assert_eq!(l.delivered(id(9), 1), Delivery::Unknown);
        l.expired(id(8));
        assert_eq!(l.tally(None).unknown_ids, 2);
    }

    #[test]
    fn phases_are_tallied_apart() {
        let l = Ledger::new();
        l.sent(0, id(1), LaneKind::Call, 0, 0);
        l.sent(1, id(2), LaneKind::Chat, 0, 0);
        l.rejected(id(2), "RATE_LIMITED");
        assert_eq!(l.tally(Some(0)).sent, 1);
        assert_eq!(l.tally(Some(0)).rejected_total(), 0);
        assert_eq!(l.tally(Some(1)).rejected.get("RATE_LIMITED"), Some(&1));
    }

    #[test]
    fn retired_phases_still_count_in_the_total() {
        let l = Ledger::new();
        l.sent(0, id(1), LaneKind::Chat, 0, 0);
        l.accepted(id(1), 1);
        l.delivered(id(1), 2);
        l.sent(1, id(2), LaneKind::Chat, 0, 0);
        l.accepted(id(2), 1);
        l.retire(0);
        let all = l.tally(None);
        assert_eq!((all.sent, all.delivered_once, all.lost), (2, 1, 1));
        assert_eq!(l.tally(Some(0)).sent, 0, "its entries are gone");
        assert_eq!(l.delivered(id(1), 3), Delivery::Unknown);
        assert_eq!(l.tally(None).unknown_ids, 1);
    }
}
