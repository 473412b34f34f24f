//! Custody of a broadcaster's campaign steps (SPEC.md 9): every Begin, chunk, End, status
//! request and Cancel handed to the SDK stays here, with its encoded frame, until the relay
//! answers it. Like the [`crate::outbox::Outbox`] of messages, and generic over the waiter
//! `C`, so that it is tested without channels.
//!
//! The relay's answers name a campaign and a `seq`, not the kind of step, so the book keeps
//! every answer unambiguous by construction:
//! - a chunk and an End that would be answered with the same `seq` are never held together
//!   (the second is refused as a duplicate);
//! - per campaign, at most one seq-0 step (Begin, status request, Cancel) is in flight, so a
//!   `Rejected{seq 0}` names exactly one step;
//! - a `CampaignStatus` answers every status request held for its campaign, sent or not (a
//!   status the relay pushed is as current as one it was asked for), and the campaign's Cancel
//!   once it shows the campaign finished (the relay answers a Cancel with the final state).
//!
//! A step is *ready* (queued for the wire), *in flight*, *waiting* (refused with a retryable
//! code, until its time) or *parked* behind a step it depends on. After a reconnect the relay
//! may not know a campaign whose Begin it never acknowledged, so a campaign's other steps are
//! parked until its Begin has been acknowledged on the current session; the book queues that
//! Begin again by itself, from the Begin frame the campaign's steps carry.

use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Instant;

/// A campaign id.
pub(crate) type CampaignId = [u8; 16];

/// What a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Step {
    Begin,
    Chunk(u32),
    /// An End saying this many chunks.
    End(u32),
    Status,
    Cancel,
}

impl Step {
    /// The `seq` the relay's answer carries (SPEC.md 9.5, 6.5).
    pub(crate) fn seq(self) -> u32 {
        match self {
            Self::Begin | Self::Status | Self::Cancel => 0,
            Self::Chunk(seq) => seq,
            // As the relay computes it; `Campaign::end` refuses u32::MAX anyway.
            Self::End(chunks) => chunks.saturating_add(1),
        }
    }

    /// Answered by a `CampaignAck` (otherwise by a `CampaignStatus`).
    pub(crate) fn is_acked(self) -> bool {
        !matches!(self, Self::Status | Self::Cancel)
    }

    fn is_seq0(self) -> bool {
        matches!(self, Self::Begin | Self::Status | Self::Cancel)
    }
}

/// Identifies a held step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct StepKey {
    pub(crate) campaign: CampaignId,
    pub(crate) step: Step,
}

/// A step handed to the session.
#[derive(Debug, Clone)]
pub(crate) struct NewStep {
    pub(crate) key: StepKey,
    /// The length-prefixed frame.
    pub(crate) frame: Bytes,
    /// The campaign's `CampaignBegin` frame, when the sender has it: what is resent after a
    /// reconnect before the step. `None` for a status request or cancel by id alone.
    pub(crate) begin: Option<Bytes>,
    /// Recipients of a chunk, checked against the session's limit.
    pub(crate) recipients: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    InFlight,
    Waiting(Instant),
    Parked,
}

/// One held step.
#[derive(Debug)]
pub(crate) struct StepEntry<C> {
    pub(crate) key: StepKey,
    pub(crate) frame: Bytes,
    pub(crate) recipients: usize,
    /// Who waits for the answer: one sender, several for coalesced status requests, none
    /// for a Begin the book queued again by itself.
    pub(crate) waiters: Vec<C>,
    order: u64,
    state: State,
}

/// What the book knows of one campaign with held steps.
#[derive(Debug, Default)]
struct Record {
    begin: Option<Bytes>,
    held: usize,
    seq0_in_flight: Option<Step>,
    parked: Vec<StepKey>,
}

/// Every campaign step the SDK holds.
#[derive(Debug)]
pub(crate) struct CampaignBook<C> {
    entries: HashMap<StepKey, StepEntry<C>>,
    /// Held Begin, chunk and End steps by the `seq` of their answer.
    by_seq: HashMap<(CampaignId, u32), Step>,
    records: HashMap<CampaignId, Record>,
    ready: VecDeque<StepKey>,
    waiting: BTreeMap<(Instant, u64), StepKey>,
    in_flight: usize,
    /// Campaigns whose Begin the relay acknowledged on the current session.
    begun: HashSet<CampaignId>,
    /// RATE_LIMITED: no campaign step goes out before then (SPEC.md 8.5).
    paused_until: Option<Instant>,
    next_order: u64,
}

impl<C> CampaignBook<C> {
    pub(crate) fn new() -> Self {
        Self {
            entries: HashMap::new(),
            by_seq: HashMap::new(),
            records: HashMap::new(),
            ready: VecDeque::new(),
            waiting: BTreeMap::new(),
            in_flight: 0,
            begun: HashSet::new(),
            paused_until: None,
            next_order: 0,
        }
    }

    /// Steps held, in any state.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Steps sent on the current session and not answered.
    pub(crate) fn in_flight_len(&self) -> usize {
        self.in_flight
    }

    pub(crate) fn get(&self, key: StepKey) -> Option<&StepEntry<C>> {
        self.entries.get(&key)
    }

    /// Takes a step into custody. A status request or cancel already held gains a waiter;
    /// any other step already held (or answered with the same `seq` as one held) gives its
    /// waiter back.
    pub(crate) fn insert(&mut self, new: NewStep, waiter: C) -> Result<(), C> {
        let key = new.key;
        if let Some(entry) = self.entries.get_mut(&key) {
            if key.step.is_acked() {
                return Err(waiter);
            }
            entry.waiters.push(waiter);
            return Ok(());
        }
        if key.step.is_acked() && self.by_seq.contains_key(&(key.campaign, key.step.seq())) {
            return Err(waiter);
        }
        let record = self.records.entry(key.campaign).or_default();
        if record.begin.is_none() {
            record.begin = new.begin;
        }
        self.push_new(key, new.frame, new.recipients, vec![waiter], false);
        self.ensure_begin(key.campaign);
        Ok(())
    }

    fn push_new(
        &mut self,
        key: StepKey,
        frame: Bytes,
        recipients: usize,
        waiters: Vec<C>,
        front: bool,
    ) {
        let order = self.next_order;
        self.next_order += 1;
        if key.step.is_acked() {
            self.by_seq.insert((key.campaign, key.step.seq()), key.step);
        }
        self.records.entry(key.campaign).or_default().held += 1;
        if front {
            self.ready.push_front(key);
        } else {
            self.ready.push_back(key);
        }
        self.entries.insert(
            key,
            StepEntry {
                key,
                frame,
                recipients,
                waiters,
                order,
                state: State::Ready,
            },
        );
    }

    /// Queues the campaign's Begin (first) if the current session has not acknowledged it
    /// and none is held.
    fn ensure_begin(&mut self, campaign: CampaignId) {
        let key = StepKey {
            campaign,
            step: Step::Begin,
        };
        if self.begun.contains(&campaign) || self.entries.contains_key(&key) {
            return;
        }
        let Some(frame) = self.records.get(&campaign).and_then(|r| r.begin.clone()) else {
            return;
        };
        self.push_new(key, frame, 0, Vec::new(), true);
    }

    fn gated(&self, key: StepKey) -> bool {
        let Some(record) = self.records.get(&key.campaign) else {
            return false;
        };
        let slot_busy = record.seq0_in_flight.is_some();
        let needs_begin = record.begin.is_some() && !self.begun.contains(&key.campaign);
        match key.step {
            Step::Begin => slot_busy,
            Step::Status | Step::Cancel => slot_busy || needs_begin,
            Step::Chunk(_) | Step::End(_) => needs_begin,
        }
    }

    /// The next step that may go on the wire, without taking it off the queue; parks the
    /// steps ahead of it that must wait for another.
    pub(crate) fn next_ready(&mut self, now: Instant) -> Option<StepKey> {
        self.promote(now);
        if self.paused_until.is_some() {
            return None;
        }
        while let Some(key) = self.ready.front().copied() {
            if !self.entries.contains_key(&key) {
                self.ready.pop_front();
                continue;
            }
            if self.gated(key) {
                self.ready.pop_front();
                if let Some(entry) = self.entries.get_mut(&key) {
                    entry.state = State::Parked;
                }
                if let Some(record) = self.records.get_mut(&key.campaign) {
                    record.parked.push(key);
                }
                continue;
            }
            return Some(key);
        }
        None
    }

    /// Takes the step [`Self::next_ready`] returned off the queue and marks it in flight.
    pub(crate) fn mark_in_flight(&mut self, key: StepKey) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        if entry.state != State::Ready {
            return;
        }
        if self.ready.front() == Some(&key) {
            self.ready.pop_front();
        } else {
            self.ready.retain(|k| *k != key);
        }
        entry.state = State::InFlight;
        self.in_flight += 1;
        if key.step.is_seq0()
            && let Some(record) = self.records.get_mut(&key.campaign)
        {
            record.seq0_in_flight = Some(key.step);
        }
    }

    /// Removes a step in any state: answered, refused for good, or never sendable.
    pub(crate) fn remove(&mut self, key: StepKey) -> Option<StepEntry<C>> {
        let entry = self.entries.remove(&key)?;
        match entry.state {
            State::Ready => {
                if self.ready.front() == Some(&key) {
                    self.ready.pop_front();
                } else {
                    self.ready.retain(|k| *k != key);
                }
            }
            State::Waiting(at) => {
                self.waiting.remove(&(at, entry.order));
            }
            State::Parked => {
                if let Some(record) = self.records.get_mut(&key.campaign) {
                    record.parked.retain(|k| *k != key);
                }
            }
            State::InFlight => self.in_flight -= 1,
        }
        if key.step.is_acked() {
            self.by_seq.remove(&(key.campaign, key.step.seq()));
        }
        // Whatever waited for the Begin or for the seq-0 slot may go now (or be parked
        // again, or fail with the campaign).
        let mut unpark = key.step == Step::Begin;
        if let Some(record) = self.records.get_mut(&key.campaign) {
            record.held -= 1;
            if entry.state == State::InFlight && record.seq0_in_flight == Some(key.step) {
                record.seq0_in_flight = None;
                unpark = true;
            }
        }
        if unpark {
            self.unpark(key.campaign);
        }
        if self.records.get(&key.campaign).is_some_and(|r| r.held == 0) {
            self.records.remove(&key.campaign);
        }
        Some(entry)
    }

    /// The step a `CampaignAck{campaign, seq}` answers, taken out. An ack of seq 0 also
    /// says that the relay has the campaign, whichever step of ours it answers.
    pub(crate) fn take_acked(&mut self, campaign: CampaignId, seq: u32) -> Option<StepEntry<C>> {
        let step = if seq == 0 {
            if self.records.contains_key(&campaign) && self.begun.insert(campaign) {
                self.unpark(campaign);
            }
            Step::Begin
        } else {
            *self.by_seq.get(&(campaign, seq))?
        };
        self.remove(StepKey { campaign, step })
    }

    /// The steps a `CampaignStatus` answers, taken out: every status request of the
    /// campaign, and its Cancel when the status is final.
    pub(crate) fn take_status(
        &mut self,
        campaign: CampaignId,
        finished: bool,
    ) -> Vec<StepEntry<C>> {
        let mut steps = vec![Step::Status];
        if finished {
            steps.push(Step::Cancel);
        }
        steps
            .into_iter()
            .filter_map(|step| self.remove(StepKey { campaign, step }))
            .collect()
    }

    /// The in-flight step a `Rejected{campaign, seq}` refers to.
    pub(crate) fn rejected(&self, campaign: CampaignId, seq: u32) -> Option<StepKey> {
        let step = if seq == 0 {
            self.records.get(&campaign)?.seq0_in_flight?
        } else {
            *self.by_seq.get(&(campaign, seq))?
        };
        let key = StepKey { campaign, step };
        (self.entries.get(&key)?.state == State::InFlight).then_some(key)
    }

    /// Puts an in-flight step back: ready at once (`None`) or waiting until `until`.
    pub(crate) fn retry(&mut self, key: StepKey, until: Option<Instant>) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        if entry.state != State::InFlight {
            return;
        }
        self.in_flight -= 1;
        match until {
            None => {
                entry.state = State::Ready;
                self.ready.push_front(key);
            }
            Some(at) => {
                entry.state = State::Waiting(at);
                self.waiting.insert((at, entry.order), key);
            }
        }
        if let Some(record) = self.records.get_mut(&key.campaign)
            && record.seq0_in_flight == Some(key.step)
        {
            record.seq0_in_flight = None;
            self.unpark(key.campaign);
        }
    }

    /// Sends no step before `until`.
    pub(crate) fn pause(&mut self, until: Instant) {
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
    }

    /// Ends a pause that is over and moves steps whose wait is over to the front.
    pub(crate) fn promote(&mut self, now: Instant) {
        if self.paused_until.is_some_and(|p| p <= now) {
            self.paused_until = None;
        }
        let keys = crate::outbox::take_due(&mut self.waiting, now);
        self.push_front_in_order(keys);
    }

    /// When a waiting step or a pause is due.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        let waiting = self.waiting.keys().next().map(|(at, _)| *at);
        // A pause matters only to what is ready to go.
        let pause = self.paused_until.filter(|_| !self.ready.is_empty());
        match (waiting, pause) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The session ended: what was in flight or parked goes again on the next one, in the
    /// order it was handed over, each campaign's Begin first.
    pub(crate) fn requeue(&mut self) {
        let keys: Vec<StepKey> = self
            .entries
            .values()
            .filter(|e| matches!(e.state, State::InFlight | State::Parked))
            .map(|e| e.key)
            .collect();
        for record in self.records.values_mut() {
            record.parked.clear();
            record.seq0_in_flight = None;
        }
        self.in_flight = 0;
        self.begun.clear();
        self.paused_until = None;
        self.push_front_in_order(keys);
        let campaigns: Vec<CampaignId> = self.records.keys().copied().collect();
        for campaign in campaigns {
            self.ensure_begin(campaign);
        }
    }

    /// Every step of `campaign`, taken out in the order they were handed over (its Begin was
    /// refused: nothing of it can succeed).
    pub(crate) fn remove_campaign(&mut self, campaign: CampaignId) -> Vec<StepEntry<C>> {
        let mut keys: Vec<(u64, StepKey)> = self
            .entries
            .values()
            .filter(|e| e.key.campaign == campaign)
            .map(|e| (e.order, e.key))
            .collect();
        keys.sort_unstable_by_key(|(order, _)| *order);
        keys.into_iter()
            .filter_map(|(_, k)| self.remove(k))
            .collect()
    }

    /// Takes every step out (the client is closing for good).
    pub(crate) fn drain(&mut self) -> Vec<StepEntry<C>> {
        self.by_seq.clear();
        self.records.clear();
        self.ready.clear();
        self.waiting.clear();
        self.in_flight = 0;
        let mut all: Vec<StepEntry<C>> = self.entries.drain().map(|(_, e)| e).collect();
        all.sort_by_key(|e| e.order);
        all
    }

    fn unpark(&mut self, campaign: CampaignId) {
        if let Some(record) = self.records.get_mut(&campaign) {
            let parked = std::mem::take(&mut record.parked);
            self.push_front_in_order(parked);
        }
    }

    /// Puts keys at the front of the ready queue, oldest first.
    fn push_front_in_order(&mut self, mut keys: Vec<StepKey>) {
        keys.sort_by_key(|k| Reverse(self.entries.get(k).map_or(0, |e| e.order)));
        for key in keys {
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.state = State::Ready;
                self.ready.push_front(key);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let parked: usize = self.records.values().map(|r| r.parked.len()).sum();
        let in_flight = self
            .entries
            .values()
            .filter(|e| e.state == State::InFlight)
            .count();
        assert_eq!(in_flight, self.in_flight);
        assert_eq!(
            self.ready.len() + self.waiting.len() + parked + in_flight,
            self.entries.len(),
            "every step is in exactly one place"
        );
        let held: usize = self.records.values().map(|r| r.held).sum();
        assert_eq!(held, self.entries.len());
        for record in self.records.values() {
            assert!(record.held > 0, "idle records are forgotten");
        }
        for e in self.entries.values() {
            if e.key.step.is_acked() {
                assert_eq!(
                    self.by_seq.get(&(e.key.campaign, e.key.step.seq())),
                    Some(&e.key.step)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const A: CampaignId = [1; 16];
    const B: CampaignId = [2; 16];

    fn step(campaign: CampaignId, step: Step) -> NewStep {
        NewStep {
            key: StepKey { campaign, step },
            frame: Bytes::from(format!("{step:?}")),
            begin: Some(Bytes::from_static(b"begin")),
            recipients: 0,
        }
    }

    /// Sends everything that may go now; returns the steps in wire order.
    fn send_all(book: &mut CampaignBook<u32>, now: Instant) -> Vec<StepKey> {
        let sent: Vec<StepKey> = std::iter::from_fn(|| {
            let key = book.next_ready(now)?;
            book.mark_in_flight(key);
            Some(key)
        })
        .collect();
        book.check_invariants();
        sent
    }

    fn steps(keys: &[StepKey]) -> Vec<Step> {
        keys.iter().map(|k| k.step).collect()
    }

    fn begun(book: &mut CampaignBook<u32>, campaign: CampaignId, now: Instant) {
        book.insert(step(campaign, Step::Begin), 0).unwrap();
        assert_eq!(steps(&send_all(book, now)), [Step::Begin]);
        assert!(book.take_acked(campaign, 0).is_some());
    }

    #[test]
    fn conflicting_steps_are_refused_and_status_requests_coalesce() {
        let now = Instant::now();
        let mut book = CampaignBook::new();
        begun(&mut book, A, now);
        book.insert(step(A, Step::Chunk(3)), 1).unwrap();
        assert_eq!(book.insert(step(A, Step::Chunk(3)), 2), Err(2));
        assert_eq!(book.insert(step(A, Step::End(2)), 3), Err(3), "seq 3 too");
        book.insert(step(A, Step::End(3)), 4).unwrap();
        book.insert(step(A, Step::Status), 5).unwrap();
        book.insert(step(A, Step::Status), 6).unwrap();
        book.insert(step(B, Step::Chunk(3)), 7).unwrap();
        book.check_invariants();
        assert_eq!(
            book.len(),
            5,
            "chunk 3, end 3, status, B's begin and chunk 3"
        );
        let answered = book.take_status(A, false);
        assert_eq!(answered.len(), 1);
        assert_eq!(answered[0].waiters, vec![5, 6]);
        book.check_invariants();
    }

    #[test]
    fn one_seq0_step_in_flight_per_campaign() {
        let now = Instant::now();
        let mut book = CampaignBook::new();
        begun(&mut book, A, now);
        book.insert(step(A, Step::Status), 1).unwrap();
        book.insert(step(A, Step::Cancel), 2).unwrap();
        book.insert(step(A, Step::Chunk(1)), 3).unwrap();
        assert_eq!(
            steps(&send_all(&mut book, now)),
            [Step::Status, Step::Chunk(1)]
        );
        assert_eq!(
            book.rejected(A, 0).map(|k| k.step),
            Some(Step::Status),
            "seq 0 names the one seq-0 step in flight"
        );
        assert_eq!(book.take_status(A, false).len(), 1);
        assert_eq!(steps(&send_all(&mut book, now)), [Step::Cancel]);
        assert!(
            book.take_status(A, false).is_empty(),
            "not final: not the cancel's"
        );
        assert_eq!(book.take_status(A, true).len(), 1);
        book.check_invariants();
    }

    #[test]
    fn after_a_reconnect_begin_goes_first_and_the_rest_waits_for_its_ack() {
        let now = Instant::now();
        let mut book = CampaignBook::new();
        begun(&mut book, A, now);
        for seq in 1..=3 {
            book.insert(step(A, Step::Chunk(seq)), seq).unwrap();
        }
        assert_eq!(send_all(&mut book, now).len(), 3);
        assert!(book.take_acked(A, 2).is_some());
        book.requeue();
        book.check_invariants();
        assert_eq!(book.in_flight_len(), 0);
        assert_eq!(steps(&send_all(&mut book, now)), [Step::Begin]);
        assert!(
            book.next_ready(now).is_none(),
            "chunks parked behind the begin"
        );
        let begin = book.take_acked(A, 0).unwrap();
        assert!(begin.waiters.is_empty(), "queued by the book itself");
        assert_eq!(
            steps(&send_all(&mut book, now)),
            [Step::Chunk(1), Step::Chunk(3)]
        );
    }

    #[test]
    fn retry_waits_and_pause_holds_everything() {
        let now = Instant::now();
        let mut book = CampaignBook::new();
        begun(&mut book, A, now);
        book.insert(step(A, Step::Chunk(1)), 1).unwrap();
        book.insert(step(A, Step::Chunk(2)), 2).unwrap();
        send_all(&mut book, now);
        let key = book.rejected(A, 1).unwrap();
        book.retry(key, Some(now + Duration::from_millis(50)));
        book.pause(now + Duration::from_millis(50));
        book.insert(step(A, Step::Chunk(3)), 3).unwrap();
        assert!(send_all(&mut book, now + Duration::from_millis(49)).is_empty());
        assert_eq!(book.next_wakeup(), Some(now + Duration::from_millis(50)));
        assert_eq!(
            steps(&send_all(&mut book, now + Duration::from_millis(50))),
            [Step::Chunk(1), Step::Chunk(3)]
        );
        assert!(book.rejected(A, 7).is_none());
    }

    #[test]
    fn a_refused_campaign_takes_its_steps_along() {
        let now = Instant::now();
        let mut book = CampaignBook::new();
        book.insert(step(A, Step::Begin), 1).unwrap();
        book.insert(step(A, Step::Status), 2).unwrap();
        let by_id = NewStep {
            begin: None,
            ..step(B, Step::Status)
        };
        book.insert(by_id, 3).unwrap();
        send_all(&mut book, now);
        let failed: Vec<u32> = book
            .remove_campaign(A)
            .into_iter()
            .flat_map(|e| e.waiters)
            .collect();
        assert_eq!(failed, vec![1, 2]);
        book.check_invariants();
        assert_eq!(book.len(), 1);
        assert_eq!(book.drain().len(), 1);
        assert!(book.is_empty());
    }
}
