//! Custody bookkeeping of the origin side (SPEC.md 8.1): every message and receipt handed to
//! the SDK stays here, with its signed frame, until the relay answers it.
//!
//! An entry is *ready* (waiting for a place on the wire), *in flight* (sent on the current
//! session, unanswered), or *waiting* (refused with a retryable code, to be resent at a given
//! time). When a session ends, everything in flight becomes ready again, ahead of newer
//! entries and in the order it was submitted, so it is resent first and under the same id.
//!
//! Answers (`Accepted`/`Rejected`) carry only the id and whether they answer a receipt, so
//! two receipts for one message (DELIVERED, then READ) cannot be in flight together: the
//! second is held back until the first is answered.
//!
//! The outbox is generic over the waiter `W` that is completed with the answer, which keeps it
//! free of channels and testable on its own.

use crate::message::MessageId;
use bytes::Bytes;
use federation_spec::proto::{Lane, ReceiptKind};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

/// Takes out of a retry queue (keyed by when each entry may go again, then a sequence number)
/// every entry whose wait is over, in that order.
pub(crate) fn take_due<K>(waiting: &mut BTreeMap<(Instant, u64), K>, now: Instant) -> Vec<K> {
    let later = waiting.split_off(&(now, u64::MAX));
    std::mem::replace(waiting, later).into_values().collect()
}

/// What an entry is, beyond its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Item {
    /// A `Deliver`.
    Message,
    /// A `Receipt` of this kind.
    Receipt(ReceiptKind),
}

/// Identifies an entry in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct EntryKey {
    pub(crate) id: MessageId,
    pub(crate) item: Item,
}

impl EntryKey {
    /// The key the relay's answer carries.
    pub(crate) fn wire(&self) -> WireKey {
        WireKey {
            id: self.id,
            receipt: matches!(self.item, Item::Receipt(_)),
        }
    }
}

/// What an `Accepted`/`Rejected` names: the id and whether it answers a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct WireKey {
    pub(crate) id: MessageId,
    pub(crate) receipt: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    InFlight,
    Waiting,
    Blocked,
}

/// One message or receipt in custody.
#[derive(Debug)]
pub(crate) struct Entry<W> {
    pub(crate) key: EntryKey,
    /// The lane stream it goes on (receipts: chat).
    pub(crate) lane: Lane,
    /// The length-prefixed frame.
    pub(crate) frame: Bytes,
    /// For messages: `Envelope.created_at_ms` and `ttl_s`, for the local expiry check.
    pub(crate) expiry: Option<(u64, u32)>,
    /// Payload bytes, checked against the session's limit.
    pub(crate) payload_len: usize,
    /// BUSY / RATE_LIMITED refusals the SDK still absorbs by resending.
    pub(crate) retries_left: u32,
    pub(crate) waiter: W,
    seq: u64,
    state: State,
}

/// A new entry, before it is queued.
#[derive(Debug)]
pub(crate) struct NewEntry {
    pub(crate) key: EntryKey,
    pub(crate) lane: Lane,
    pub(crate) frame: Bytes,
    pub(crate) expiry: Option<(u64, u32)>,
    pub(crate) payload_len: usize,
    pub(crate) retries: u32,
}

/// Everything the origin still holds.
#[derive(Debug)]
pub(crate) struct Outbox<W> {
    entries: HashMap<EntryKey, Entry<W>>,
    /// Ready entries per lane: call first, then chat.
    ready: [VecDeque<EntryKey>; 2],
    waiting: BTreeMap<(Instant, u64), EntryKey>,
    in_flight: HashMap<WireKey, EntryKey>,
    blocked: HashMap<WireKey, VecDeque<EntryKey>>,
    next_seq: u64,
}

fn lane_index(lane: Lane) -> usize {
    match lane {
        Lane::Call => 0,
        _ => 1,
    }
}

impl<W> Outbox<W> {
    pub(crate) fn new() -> Self {
        Self {
            entries: HashMap::new(),
            ready: [VecDeque::new(), VecDeque::new()],
            waiting: BTreeMap::new(),
            in_flight: HashMap::new(),
            blocked: HashMap::new(),
            next_seq: 0,
        }
    }

    /// Entries held, in any state.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries sent on the current session and not answered.
    pub(crate) fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    /// Queues a new entry behind the ready ones; gives the waiter back if the key is taken.
    pub(crate) fn insert(&mut self, new: NewEntry, waiter: W) -> Result<(), W> {
        if self.entries.contains_key(&new.key) {
            return Err(waiter);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.ready[lane_index(new.lane)].push_back(new.key);
        self.entries.insert(
            new.key,
            Entry {
                key: new.key,
                lane: new.lane,
                frame: new.frame,
                expiry: new.expiry,
                payload_len: new.payload_len,
                retries_left: new.retries,
                waiter,
                seq,
                state: State::Ready,
            },
        );
        Ok(())
    }

    /// Moves entries whose wait is over back to the front of their lane.
    pub(crate) fn promote(&mut self, now: Instant) {
        let keys = take_due(&mut self.waiting, now);
        self.push_front_in_order(keys);
    }

    /// When the earliest waiting entry becomes ready.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        self.waiting.keys().next().map(|(at, _)| *at)
    }

    /// The next entry to send, call lane first, without taking it off the queue.
    pub(crate) fn peek_ready(&mut self) -> Option<&Entry<W>> {
        for lane in 0..self.ready.len() {
            while let Some(key) = self.ready[lane].front().copied() {
                let wire = key.wire();
                if self.in_flight.contains_key(&wire) {
                    self.ready[lane].pop_front();
                    if let Some(e) = self.entries.get_mut(&key) {
                        e.state = State::Blocked;
                    }
                    self.blocked.entry(wire).or_default().push_back(key);
                    continue;
                }
                return self.entries.get(&key);
            }
        }
        None
    }

    /// Takes the entry [`Self::peek_ready`] returned off its queue and marks it in flight.
    pub(crate) fn mark_in_flight(&mut self, key: EntryKey) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let queue = &mut self.ready[lane_index(entry.lane)];
        if queue.front() == Some(&key) {
            queue.pop_front();
        } else {
            queue.retain(|k| *k != key);
        }
        entry.state = State::InFlight;
        self.in_flight.insert(key.wire(), key);
    }

    /// Removes a ready entry without sending it (it expired or can never be sent).
    pub(crate) fn remove_ready(&mut self, key: EntryKey) -> Option<Entry<W>> {
        let entry = self.entries.remove(&key)?;
        self.ready[lane_index(entry.lane)].retain(|k| *k != key);
        Some(entry)
    }

    /// The in-flight entry an answer names.
    pub(crate) fn in_flight_mut(&mut self, wire: WireKey) -> Option<&mut Entry<W>> {
        let key = self.in_flight.get(&wire)?;
        self.entries.get_mut(key)
    }

    /// Removes the in-flight entry an answer names: the relay accepted it, or refused it for
    /// good. Entries held back behind it become ready.
    pub(crate) fn answer(&mut self, wire: WireKey) -> Option<Entry<W>> {
        let key = self.in_flight.remove(&wire)?;
        self.unblock(wire);
        self.entries.remove(&key)
    }

    /// Puts an in-flight entry back: ready at the front of its lane (`until` = `None`), or
    /// waiting until `until`.
    pub(crate) fn retry(&mut self, wire: WireKey, until: Option<Instant>) -> bool {
        let Some(key) = self.in_flight.remove(&wire) else {
            return false;
        };
        let Some(entry) = self.entries.get_mut(&key) else {
            return false;
        };
        match until {
            None => {
                entry.state = State::Ready;
                self.ready[lane_index(entry.lane)].push_front(key);
            }
            Some(at) => {
                entry.state = State::Waiting;
                self.waiting.insert((at, entry.seq), key);
            }
        }
        self.unblock(wire);
        true
    }

    /// The session ended: everything in flight is to be sent again, before newer entries.
    pub(crate) fn requeue_in_flight(&mut self) {
        let keys: Vec<EntryKey> = self.in_flight.drain().map(|(_, k)| k).collect();
        self.push_front_in_order(keys);
    }

    /// Takes every entry out (the client is closing for good).
    pub(crate) fn drain(&mut self) -> Vec<Entry<W>> {
        self.ready.iter_mut().for_each(VecDeque::clear);
        self.waiting.clear();
        self.in_flight.clear();
        self.blocked.clear();
        let mut all: Vec<Entry<W>> = self.entries.drain().map(|(_, e)| e).collect();
        all.sort_by_key(|e| e.seq);
        all
    }

    fn unblock(&mut self, wire: WireKey) {
        if let Some(held) = self.blocked.remove(&wire) {
            self.push_front_in_order(held.into());
        }
    }

    /// Puts keys at the front of their lanes, oldest first.
    fn push_front_in_order(&mut self, mut keys: Vec<EntryKey>) {
        keys.sort_by_key(|k| std::cmp::Reverse(self.entries.get(k).map_or(0, |e| e.seq)));
        for key in keys {
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.state = State::Ready;
                self.ready[lane_index(entry.lane)].push_front(key);
            }
        }
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let queued: usize = self.ready.iter().map(VecDeque::len).sum::<usize>()
            + self.waiting.len()
            + self.in_flight.len()
            + self.blocked.values().map(VecDeque::len).sum::<usize>();
        assert_eq!(
            queued,
            self.entries.len(),
            "every entry is in exactly one place"
        );
        for (wire, key) in &self.in_flight {
            assert_eq!(key.wire(), *wire);
            assert_eq!(self.entries[key].state, State::InFlight);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn msg(n: u8, lane: Lane) -> NewEntry {
        NewEntry {
            key: EntryKey {
                id: MessageId([n; 16]),
                item: Item::Message,
            },
            lane,
            frame: Bytes::from(vec![n]),
            expiry: None,
            payload_len: 0,
            retries: 0,
        }
    }

    fn receipt(n: u8, kind: ReceiptKind) -> NewEntry {
        NewEntry {
            key: EntryKey {
                id: MessageId([n; 16]),
                item: Item::Receipt(kind),
            },
            lane: Lane::Chat,
            ..msg(n, Lane::Chat)
        }
    }

    fn send_next(o: &mut Outbox<u32>) -> Option<u32> {
        let (key, waiter) = {
            let e = o.peek_ready()?;
            (e.key, e.waiter)
        };
        o.mark_in_flight(key);
        o.check_invariants();
        Some(waiter)
    }

    #[test]
    fn call_lane_first_then_fifo() {
        let mut o = Outbox::new();
        o.insert(msg(1, Lane::Chat), 1).unwrap();
        o.insert(msg(2, Lane::Chat), 2).unwrap();
        o.insert(msg(3, Lane::Call), 3).unwrap();
        assert_eq!(o.insert(msg(1, Lane::Chat), 9), Err(9), "duplicate id");
        let order: Vec<u32> = std::iter::from_fn(|| send_next(&mut o)).collect();
        assert_eq!(order, vec![3, 1, 2]);
        assert_eq!(o.in_flight_len(), 3);
    }

    #[test]
    fn requeue_after_disconnect_keeps_submission_order_and_goes_first() {
        let mut o = Outbox::new();
        for n in 1..=3 {
            o.insert(msg(n, Lane::Chat), n as u32).unwrap();
        }
        send_next(&mut o);
        send_next(&mut o);
        let answered = o
            .answer(WireKey {
                id: MessageId([1; 16]),
                receipt: false,
            })
            .unwrap();
        assert_eq!(answered.waiter, 1);
        o.insert(msg(4, Lane::Chat), 4).unwrap();
        o.requeue_in_flight();
        o.check_invariants();
        assert_eq!(o.in_flight_len(), 0);
        let order: Vec<u32> = std::iter::from_fn(|| send_next(&mut o)).collect();
        assert_eq!(
            order,
            vec![2, 3, 4],
            "unanswered 2 is resent before 3 and 4"
        );
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn retry_waits_until_its_time() {
        let mut o = Outbox::new();
        let t0 = Instant::now();
        o.insert(msg(1, Lane::Chat), 1).unwrap();
        o.insert(msg(2, Lane::Chat), 2).unwrap();
        send_next(&mut o);
        let wire = WireKey {
            id: MessageId([1; 16]),
            receipt: false,
        };
        assert!(o.retry(wire, Some(t0 + Duration::from_secs(1))));
        o.check_invariants();
        assert_eq!(o.next_wakeup(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(send_next(&mut o), Some(2));
        assert_eq!(send_next(&mut o), None);
        o.promote(t0 + Duration::from_millis(999));
        assert_eq!(send_next(&mut o), None);
        o.promote(t0 + Duration::from_secs(1));
        assert_eq!(send_next(&mut o), Some(1));
        assert_eq!(o.in_flight_len(), 2);
    }

    #[test]
    fn two_receipts_for_one_message_are_serialised() {
        let mut o = Outbox::new();
        o.insert(receipt(5, ReceiptKind::Delivered), 1).unwrap();
        o.insert(receipt(5, ReceiptKind::Read), 2).unwrap();
        o.insert(msg(5, Lane::Chat), 3).unwrap();
        assert_eq!(send_next(&mut o), Some(1));
        // The READ receipt answers to the same wire key; the message with that id does not.
        assert_eq!(send_next(&mut o), Some(3));
        assert_eq!(send_next(&mut o), None);
        o.check_invariants();
        let done = o
            .answer(WireKey {
                id: MessageId([5; 16]),
                receipt: true,
            })
            .unwrap();
        assert_eq!(done.waiter, 1);
        assert_eq!(send_next(&mut o), Some(2));
    }

    #[test]
    fn drain_returns_everything_in_order() {
        let mut o = Outbox::new();
        for n in 1..=4 {
            o.insert(msg(n, Lane::Chat), n as u32).unwrap();
        }
        send_next(&mut o);
        let all: Vec<u32> = o.drain().into_iter().map(|e| e.waiter).collect();
        assert_eq!(all, vec![1, 2, 3, 4]);
        assert!(o.is_empty());
        assert!(o.peek_ready().is_none());
    }
}
