//! The store's on-disk layout and its one commit algorithm, shared by every backend.
//!
//! Every key is fixed-width big-endian bytes, so an engine's plain byte order is the logical
//! order (peer, lane, seq; or expiry first for the two time indexes). Peer ids are interned to
//! a `u32` once, which keeps the per-item keys small (13 bytes instead of up to 41).
//!
//! | table           | key                                   | value                        |
//! |-----------------|---------------------------------------|------------------------------|
//! | peers           | peer id string                        | pid `u32`                    |
//! | peer names      | pid                                   | peer id string               |
//! | queues          | pid · lane                            | count · bytes · next_seq     |
//! | items           | pid · lane · seq                      | expires_at_ms · body         |
//! | expiry          | expires_at_ms · pid · lane · seq      | (empty)                      |
//! | dedup           | origin pid · message id               | expires_at_ms                |
//! | dedup expiry    | expires_at_ms · origin pid · msg id   | (empty)                      |
//! | meta            | caller's key (campaign records)       | caller's value               |
//!
//! A push costs four inserts (item, its expiry entry, the dedup entry and its expiry entry, the
//! last two only with a dedup key); a remove costs two deletes. The queue counters are written
//! once per queue per commit, whatever the number of items.

use std::collections::HashMap;

use bytes::Bytes;

use super::{Item, PushOutcome, QueueKey, StoreError, WriteBatch};

/// Interned peer id.
pub(crate) type Pid = u32;

pub(crate) const QUEUE_KEY_LEN: usize = 5;
pub(crate) const ITEM_KEY_LEN: usize = 13;
pub(crate) const EXPIRY_KEY_LEN: usize = 8 + ITEM_KEY_LEN;
pub(crate) const DEDUP_KEY_LEN: usize = 20;
pub(crate) const DEDUP_EXPIRY_KEY_LEN: usize = 8 + DEDUP_KEY_LEN;
pub(crate) const QUEUE_META_LEN: usize = 24;
/// An item value starts with its expiry; the body follows.
pub(crate) const ITEM_HEADER_LEN: usize = 8;

pub(crate) type QueueKeyBytes = [u8; QUEUE_KEY_LEN];
pub(crate) type ItemKey = [u8; ITEM_KEY_LEN];
pub(crate) type ExpiryKey = [u8; EXPIRY_KEY_LEN];
pub(crate) type DedupKeyBytes = [u8; DEDUP_KEY_LEN];
pub(crate) type DedupExpiryKey = [u8; DEDUP_EXPIRY_KEY_LEN];

pub(crate) fn queue_key(pid: Pid, lane: u8) -> QueueKeyBytes {
    let mut k = [0; QUEUE_KEY_LEN];
    k[..4].copy_from_slice(&pid.to_be_bytes());
    k[4] = lane;
    k
}

pub(crate) fn item_key(pid: Pid, lane: u8, seq: u64) -> ItemKey {
    let mut k = [0; ITEM_KEY_LEN];
    k[..4].copy_from_slice(&pid.to_be_bytes());
    k[4] = lane;
    k[5..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// (pid, lane, seq) of an item key.
pub(crate) fn split_item_key(k: &ItemKey) -> (Pid, u8, u64) {
    let (pid, rest) = k.split_at(4);
    let (lane, seq) = rest.split_at(1);
    (be_u32(pid), lane[0], be_u64(seq))
}

pub(crate) fn expiry_key(expires_at_ms: u64, item: &ItemKey) -> ExpiryKey {
    let mut k = [0; EXPIRY_KEY_LEN];
    k[..8].copy_from_slice(&expires_at_ms.to_be_bytes());
    k[8..].copy_from_slice(item);
    k
}

/// (expires_at_ms, item key) of an expiry key.
pub(crate) fn split_expiry_key(k: &ExpiryKey) -> (u64, ItemKey) {
    let mut item = [0; ITEM_KEY_LEN];
    item.copy_from_slice(&k[8..]);
    (be_u64(&k[..8]), item)
}

/// First expiry key strictly after every key of expiry `ms` (the end of an inclusive scan).
pub(crate) fn expiry_key_max(ms: u64) -> ExpiryKey {
    let mut k = [0xff; EXPIRY_KEY_LEN];
    k[..8].copy_from_slice(&ms.to_be_bytes());
    k
}

pub(crate) fn dedup_key(origin: Pid, id: &[u8; 16]) -> DedupKeyBytes {
    let mut k = [0; DEDUP_KEY_LEN];
    k[..4].copy_from_slice(&origin.to_be_bytes());
    k[4..].copy_from_slice(id);
    k
}

pub(crate) fn dedup_expiry_key(expires_at_ms: u64, dedup: &DedupKeyBytes) -> DedupExpiryKey {
    let mut k = [0; DEDUP_EXPIRY_KEY_LEN];
    k[..8].copy_from_slice(&expires_at_ms.to_be_bytes());
    k[8..].copy_from_slice(dedup);
    k
}

/// (expires_at_ms, dedup key) of a dedup expiry key.
pub(crate) fn split_dedup_expiry_key(k: &DedupExpiryKey) -> (u64, DedupKeyBytes) {
    let mut dedup = [0; DEDUP_KEY_LEN];
    dedup.copy_from_slice(&k[8..]);
    (be_u64(&k[..8]), dedup)
}

pub(crate) fn dedup_expiry_key_max(ms: u64) -> DedupExpiryKey {
    let mut k = [0xff; DEDUP_EXPIRY_KEY_LEN];
    k[..8].copy_from_slice(&ms.to_be_bytes());
    k
}

/// (expires_at_ms, body) of an item value; None if it is too short to be one.
pub(crate) fn split_item_value(v: &[u8]) -> Option<(u64, &[u8])> {
    if v.len() < ITEM_HEADER_LEN {
        return None;
    }
    let (exp, body) = v.split_at(ITEM_HEADER_LEN);
    Some((be_u64(exp), body))
}

/// The per-queue counters kept in the queues table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QueueMeta {
    pub count: u64,
    pub bytes: u64,
    pub next_seq: u64,
}

impl QueueMeta {
    pub(crate) fn encode(&self) -> [u8; QUEUE_META_LEN] {
        let mut v = [0; QUEUE_META_LEN];
        v[..8].copy_from_slice(&self.count.to_be_bytes());
        v[8..16].copy_from_slice(&self.bytes.to_be_bytes());
        v[16..].copy_from_slice(&self.next_seq.to_be_bytes());
        v
    }

    pub(crate) fn decode(v: &[u8; QUEUE_META_LEN]) -> Self {
        Self {
            count: be_u64(&v[..8]),
            bytes: be_u64(&v[8..16]),
            next_seq: be_u64(&v[16..]),
        }
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(b);
    u32::from_be_bytes(a)
}

pub(crate) fn split_queue_key(k: &QueueKeyBytes) -> (Pid, u8) {
    (u32::from_be_bytes([k[0], k[1], k[2], k[3]]), k[4])
}

/// Builds the items of one read with all their bodies in one allocation.
pub(crate) struct ItemsBuilder {
    buf: Vec<u8>,
    spans: Vec<(QueueKey, u64, u64, usize)>,
}

impl ItemsBuilder {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            spans: Vec::with_capacity(limit.min(4096)),
        }
    }

    pub(crate) fn push(&mut self, queue: QueueKey, seq: u64, expires_at_ms: u64, body: &[u8]) {
        self.buf.extend_from_slice(body);
        self.spans.push((queue, seq, expires_at_ms, self.buf.len()));
    }

    pub(crate) fn finish(self) -> Vec<Item> {
        let buf = Bytes::from(self.buf);
        let mut start = 0;
        self.spans
            .into_iter()
            .map(|(queue, seq, expires_at_ms, end)| {
                let body = buf.slice(start..end);
                start = end;
                Item {
                    queue,
                    seq,
                    expires_at_ms,
                    body,
                }
            })
            .collect()
    }
}

/// Whether `s` is a valid peer id: 1..=32 bytes of `[a-z0-9-]`.
pub(crate) fn valid_peer_id(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The primitive operations of one write transaction. A backend implements them on its
/// engine; reads must see the transaction's own earlier writes.
pub(crate) trait Txn {
    fn peer_get(&mut self, name: &str) -> Result<Option<Pid>, StoreError>;
    fn peer_put(&mut self, name: &str, pid: Pid) -> Result<(), StoreError>;
    /// The highest pid ever assigned.
    fn peer_last(&mut self) -> Result<Option<Pid>, StoreError>;
    fn queue_get(&mut self, key: &QueueKeyBytes) -> Result<Option<QueueMeta>, StoreError>;
    fn queue_put(&mut self, key: &QueueKeyBytes, meta: &QueueMeta) -> Result<(), StoreError>;
    /// Stores the item and returns the (expiry, body length) of the one it replaced.
    fn item_put(
        &mut self,
        key: &ItemKey,
        expires_at_ms: u64,
        body: &[u8],
    ) -> Result<Option<(u64, u64)>, StoreError>;
    /// Deletes the item and returns its (expiry, body length).
    fn item_remove(&mut self, key: &ItemKey) -> Result<Option<(u64, u64)>, StoreError>;
    fn expiry_put(&mut self, key: &ExpiryKey) -> Result<(), StoreError>;
    fn expiry_remove(&mut self, key: &ExpiryKey) -> Result<(), StoreError>;
    /// Sets the dedup entry and returns the expiry it had.
    fn dedup_swap(
        &mut self,
        key: &DedupKeyBytes,
        expires_at_ms: u64,
    ) -> Result<Option<u64>, StoreError>;
    fn dedup_expiry_put(&mut self, key: &DedupExpiryKey) -> Result<(), StoreError>;
    fn meta_put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn meta_remove(&mut self, key: &[u8]) -> Result<(), StoreError>;
}

struct QueueSlot {
    pid: Pid,
    lane: u8,
    meta: QueueMeta,
    dirty: bool,
}

/// Peers and queues touched by one commit, each read from the transaction once.
struct Touched<'b> {
    peers: HashMap<&'b str, Pid>,
    /// The pid the next new peer gets, once the transaction was asked for the last one.
    next_pid: Option<u64>,
    queues: Vec<QueueSlot>,
    index: HashMap<(Pid, u8), usize>,
}

impl<'b> Touched<'b> {
    fn new() -> Self {
        Self {
            peers: HashMap::new(),
            next_pid: None,
            queues: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn lookup_peer<T: Txn>(
        &mut self,
        tx: &mut T,
        name: &'b str,
    ) -> Result<Option<Pid>, StoreError> {
        if let Some(&pid) = self.peers.get(name) {
            return Ok(Some(pid));
        }
        let found = tx.peer_get(name)?;
        if let Some(pid) = found {
            self.peers.insert(name, pid);
        }
        Ok(found)
    }

    fn intern_peer<T: Txn>(&mut self, tx: &mut T, name: &'b str) -> Result<Pid, StoreError> {
        if let Some(pid) = self.lookup_peer(tx, name)? {
            return Ok(pid);
        }
        let next = match self.next_pid {
            Some(next) => next,
            None => tx.peer_last()?.map_or(1, |last| u64::from(last) + 1),
        };
        let pid = Pid::try_from(next)
            .map_err(|_| StoreError::Backend("peer id space exhausted".into()))?;
        self.next_pid = Some(next + 1);
        tx.peer_put(name, pid)?;
        self.peers.insert(name, pid);
        Ok(pid)
    }

    /// The slot of queue (pid, lane); with `create`, one is made for a queue never used.
    fn slot<T: Txn>(
        &mut self,
        tx: &mut T,
        pid: Pid,
        lane: u8,
        create: bool,
    ) -> Result<Option<&mut QueueSlot>, StoreError> {
        // Consecutive items usually go to the same queue: skip the hash.
        let last = self.queues.len().checked_sub(1);
        let hit = match last {
            Some(i) if self.queues[i].pid == pid && self.queues[i].lane == lane => Some(i),
            _ => self.index.get(&(pid, lane)).copied(),
        };
        let i = match hit {
            Some(i) => i,
            None => {
                let meta = match tx.queue_get(&queue_key(pid, lane))? {
                    Some(meta) => meta,
                    None if create => QueueMeta::default(),
                    None => return Ok(None),
                };
                self.queues.push(QueueSlot {
                    pid,
                    lane,
                    meta,
                    dirty: false,
                });
                let i = self.queues.len() - 1;
                self.index.insert((pid, lane), i);
                i
            }
        };
        Ok(self.queues.get_mut(i))
    }
}

/// Applies `batch` (validated) inside `tx`: pushes in order, then removes. `now_ms` decides
/// whether an existing dedup entry is still live.
pub(crate) fn apply<T: Txn>(
    tx: &mut T,
    batch: &WriteBatch,
    now_ms: u64,
) -> Result<Vec<PushOutcome>, StoreError> {
    let mut touched = Touched::new();
    let mut outcomes = Vec::with_capacity(batch.push.len());
    for new in &batch.push {
        let item = &new.item;
        if let Some(dedup) = &new.dedup {
            let origin = touched.intern_peer(tx, &dedup.origin)?;
            let key = dedup_key(origin, &dedup.id);
            match tx.dedup_swap(&key, item.expires_at_ms)? {
                Some(live) if live > now_ms => {
                    // Put the live entry back: the duplicate must not extend the window.
                    tx.dedup_swap(&key, live)?;
                    outcomes.push(PushOutcome::Duplicate {
                        expires_at_ms: live,
                    });
                    continue;
                }
                // A stale expiry entry of a replaced dedup entry is left to prune_dedup,
                // which checks the entry before deleting it.
                _ => tx.dedup_expiry_put(&dedup_expiry_key(item.expires_at_ms, &key))?,
            }
        }
        let pid = touched.intern_peer(tx, &item.queue.dest)?;
        let lane = item.queue.lane;
        let key = item_key(pid, lane, item.seq);
        let replaced = tx.item_put(&key, item.expires_at_ms, &item.body)?;
        if let Some((old_exp, _)) = replaced {
            tx.expiry_remove(&expiry_key(old_exp, &key))?;
        }
        tx.expiry_put(&expiry_key(item.expires_at_ms, &key))?;
        let Some(slot) = touched.slot(tx, pid, lane, true)? else {
            return Err(StoreError::Backend("queue slot vanished".into()));
        };
        let meta = &mut slot.meta;
        if let Some((_, old_len)) = replaced {
            meta.count = meta.count.saturating_sub(1);
            meta.bytes = meta.bytes.saturating_sub(old_len);
        }
        meta.count += 1;
        meta.bytes += item.body.len() as u64;
        meta.next_seq = meta.next_seq.max(item.seq.saturating_add(1));
        slot.dirty = true;
        outcomes.push(PushOutcome::Stored);
    }
    for (queue, seq) in &batch.remove {
        let Some(pid) = touched.lookup_peer(tx, &queue.dest)? else {
            continue;
        };
        let key = item_key(pid, queue.lane, *seq);
        let Some((exp, len)) = tx.item_remove(&key)? else {
            continue;
        };
        tx.expiry_remove(&expiry_key(exp, &key))?;
        if let Some(slot) = touched.slot(tx, pid, queue.lane, true)? {
            slot.meta.count = slot.meta.count.saturating_sub(1);
            slot.meta.bytes = slot.meta.bytes.saturating_sub(len);
            slot.dirty = true;
        }
    }
    for slot in touched.queues.iter().filter(|s| s.dirty) {
        tx.queue_put(&queue_key(slot.pid, slot.lane), &slot.meta)?;
    }
    for (key, value) in &batch.meta {
        match value {
            Some(v) => tx.meta_put(key, v)?,
            None => tx.meta_remove(key)?,
        }
    }
    Ok(outcomes)
}

/// Looks up the QueueKey of a pid, caching names for the length of one scan.
pub(crate) struct NameCache {
    names: HashMap<Pid, String>,
}

impl NameCache {
    pub(crate) fn new() -> Self {
        Self {
            names: HashMap::new(),
        }
    }

    pub(crate) fn queue(
        &mut self,
        pid: Pid,
        lane: u8,
        load: impl FnOnce(Pid) -> Result<Option<String>, StoreError>,
    ) -> Result<QueueKey, StoreError> {
        if let Some(name) = self.names.get(&pid) {
            return Ok(QueueKey {
                dest: name.clone(),
                lane,
            });
        }
        let name = load(pid)?
            .ok_or_else(|| StoreError::Backend(format!("queue of unknown peer #{pid}")))?;
        self.names.insert(pid, name.clone());
        Ok(QueueKey { dest: name, lane })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_as_their_fields() {
        assert!(item_key(1, 2, 255) < item_key(1, 2, 256));
        assert!(item_key(1, 2, u64::MAX) < item_key(1, 3, 0));
        assert!(item_key(1, 3, 0) < item_key(2, 0, 0));
        assert!(expiry_key(9, &item_key(7, 1, 1)) < expiry_key(10, &item_key(1, 1, 1)));
        assert!(expiry_key(10, &item_key(u32::MAX, 3, u64::MAX)) < expiry_key_max(10));
        assert!(expiry_key_max(10) < expiry_key(11, &item_key(0, 0, 0)));
        let d = dedup_key(3, &[0xff; 16]);
        assert!(dedup_expiry_key(5, &d) < dedup_expiry_key_max(5));
    }

    #[test]
    fn keys_round_trip() {
        let k = item_key(0x0102_0304, 3, 0x0506_0708_090a_0b0c);
        assert_eq!(split_item_key(&k), (0x0102_0304, 3, 0x0506_0708_090a_0b0c));
        assert_eq!(split_expiry_key(&expiry_key(42, &k)), (42, k));
        let d = dedup_key(7, &[9; 16]);
        assert_eq!(split_dedup_expiry_key(&dedup_expiry_key(5, &d)), (5, d));
        let m = QueueMeta {
            count: 1,
            bytes: 2,
            next_seq: 3,
        };
        assert_eq!(QueueMeta::decode(&m.encode()), m);
        assert_eq!(
            split_item_value(&[0, 0, 0, 0, 0, 0, 0, 7, b'x']),
            Some((7, &b"x"[..]))
        );
        assert_eq!(split_item_value(&[1, 2]), None);
    }

    #[test]
    fn peer_ids() {
        assert!(valid_peer_id("a"));
        assert!(valid_peer_id("acme-chat-01"));
        assert!(valid_peer_id(&"z".repeat(32)));
        assert!(!valid_peer_id(""));
        assert!(!valid_peer_id(&"z".repeat(33)));
        assert!(!valid_peer_id("Acme"));
        assert!(!valid_peer_id("a_b"));
        assert!(!valid_peer_id("a\0"));
    }
}
