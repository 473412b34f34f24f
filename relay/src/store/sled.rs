//! The second backend, on sled 0.34 (cargo feature `sled`), in the directory `sled/`.
//!
//! All tables share one sled tree, each under its own one-byte key prefix, because only a
//! batch on a single tree is atomic. A commit reads what it needs, builds one `sled::Batch`,
//! applies it and calls `flush` (fsync) before returning; commits are serialized by a mutex
//! so that what a commit read is still true when its batch lands. Readers may observe a batch
//! half-applied (sled takes no read lock), which the relay tolerates: a new item may show
//! before its queue's counters.
//!
//! sled never returns disk space: after a surge drains, its files stay at their peak size, so
//! [`Store::compact`] returns `Ok(false)`. sled has been unmaintained since 2021.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::layout::{
    self, DedupExpiryKey, DedupKeyBytes, ExpiryKey, ITEM_HEADER_LEN, ItemKey, ItemsBuilder,
    NameCache, Pid, QueueKeyBytes, QueueMeta, Txn,
};
use bytes::Bytes;

use super::{Item, PushOutcome, QueueKey, QueueState, Store, StoreError, WriteBatch, unix_ms};

const PEER: u8 = b'p';
const PEER_NAME: u8 = b'n';
const QUEUE: u8 = b'q';
const ITEM: u8 = b'i';
const EXPIRY: u8 = b'e';
const DEDUP: u8 = b'd';
const DEDUP_EXPIRY: u8 = b'x';
const META: u8 = b'm';
const INFO_FORMAT: &[u8] = b"vformat";

/// Version of the layout in `layout.rs`, checked at open.
const FORMAT_VERSION: u64 = 1;

/// How long an open waits for a lock that sled's own threads may still hold.
const LOCK_GRACE: Duration = Duration::from_secs(2);

/// The store on a sled database.
pub struct SledStore {
    dir: PathBuf,
    db: sled::Db,
    /// Serializes commits and prunes: each reads state its batch then relies on.
    write: Mutex<()>,
}

/// A prefixed key on the stack; the longest is a dedup expiry key.
struct Key {
    buf: [u8; 40],
    len: usize,
}

impl Key {
    fn new(tag: u8, parts: &[&[u8]]) -> Self {
        let mut k = Key {
            buf: [0; 40],
            len: 1,
        };
        k.buf[0] = tag;
        for part in parts {
            k.buf[k.len..k.len + part.len()].copy_from_slice(part);
            k.len += part.len();
        }
        k
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl SledStore {
    /// Opens the sled database in `dir`, creating it if absent, with a cache of `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        if !dir.exists() {
            create_dir(dir, cache_bytes)?;
        }
        let db = open_db_waiting(dir, cache_bytes)?;
        let format = db.get(INFO_FORMAT).map_err(|e| from_sled(dir, e))?;
        match format.as_deref().map(<[u8; 8]>::try_from) {
            Some(Ok(v)) if u64::from_be_bytes(v) == FORMAT_VERSION => {}
            Some(Ok(v)) => {
                return Err(StoreError::Backend(format!(
                    "{} has store format {}; this relay reads format {FORMAT_VERSION}",
                    dir.display(),
                    u64::from_be_bytes(v)
                )));
            }
            // Every store is created with its format record: without one, sled has lost data.
            _ => {
                return Err(StoreError::Corrupt {
                    path: dir.to_owned(),
                    detail: "the store's format record is missing".into(),
                });
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            db,
            write: Mutex::new(()),
        })
    }

    fn err(&self, e: sled::Error) -> StoreError {
        from_sled(&self.dir, e)
    }

    fn corrupt(&self, detail: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.dir.clone(),
            detail: detail.into(),
        }
    }

    fn peer_name(&self, pid: Pid) -> Result<Option<String>, StoreError> {
        let v = self
            .db
            .get(Key::new(PEER_NAME, &[&pid.to_be_bytes()]))
            .map_err(|e| self.err(e))?;
        v.map(|v| {
            String::from_utf8(v.to_vec()).map_err(|_| self.corrupt("a peer name is not UTF-8"))
        })
        .transpose()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Commits are flushed already; this only shortens what sled's threads have left to do
        // before they release the file lock.
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "sled flush at close failed");
        }
    }
}

impl Store for SledStore {
    fn commit(&self, batch: &WriteBatch) -> Result<Vec<PushOutcome>, StoreError> {
        batch.validate()?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let _write = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let mut tx = SledTxn::new(self);
        let outcomes = layout::apply(&mut tx, batch, unix_ms())?;
        self.db.apply_batch(tx.batch).map_err(|e| self.err(e))?;
        self.flush()?;
        Ok(outcomes)
    }

    fn read(
        &self,
        queue: &QueueKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Item>, StoreError> {
        let Some(first) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let pid = self
            .db
            .get(Key::new(PEER, &[queue.dest.as_bytes()]))
            .map_err(|e| self.err(e))?;
        let Some(pid) = pid.as_deref().and_then(|v| <[u8; 4]>::try_from(v).ok()) else {
            return Ok(Vec::new());
        };
        let pid = u32::from_be_bytes(pid);
        let start = Key::new(ITEM, &[&layout::item_key(pid, queue.lane, first)]);
        let end = Key::new(ITEM, &[&layout::item_key(pid, queue.lane, u64::MAX)]);
        let mut out = ItemsBuilder::new(limit);
        for entry in self.db.range(start.as_ref()..=end.as_ref()).take(limit) {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let key = item_key_of(&k).ok_or_else(|| self.corrupt("an item key is malformed"))?;
            let (_, _, seq) = layout::split_item_key(&key);
            let (exp, body) = layout::split_item_value(&v)
                .ok_or_else(|| self.corrupt("an item value is too short"))?;
            out.push(queue.clone(), seq, exp, body);
        }
        Ok(out.finish())
    }

    fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<Item>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let start = Key::new(EXPIRY, &[]);
        let end = Key::new(EXPIRY, &[&layout::expiry_key_max(now_ms)]);
        let mut cache = NameCache::new();
        let mut out = ItemsBuilder::new(limit);
        for entry in self.db.range(start.as_ref()..=end.as_ref()).take(limit) {
            let (k, _) = entry.map_err(|e| self.err(e))?;
            let key = k
                .get(1..)
                .and_then(|k| ExpiryKey::try_from(k).ok())
                .ok_or_else(|| self.corrupt("an expiry key is malformed"))?;
            let (_, item_key) = layout::split_expiry_key(&key);
            // A commit landing concurrently may have removed the item after we read its entry.
            let Some(v) = self
                .db
                .get(Key::new(ITEM, &[&item_key]))
                .map_err(|e| self.err(e))?
            else {
                continue;
            };
            let (exp, body) = layout::split_item_value(&v)
                .ok_or_else(|| self.corrupt("an item value is too short"))?;
            let (pid, lane, seq) = layout::split_item_key(&item_key);
            let queue = cache.queue(pid, lane, |pid| self.peer_name(pid))?;
            out.push(queue, seq, exp, body);
        }
        Ok(out.finish())
    }

    fn prune_dedup(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let _write = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let start = Key::new(DEDUP_EXPIRY, &[]);
        let end = Key::new(DEDUP_EXPIRY, &[&layout::dedup_expiry_key_max(now_ms)]);
        let mut batch = sled::Batch::default();
        let mut pruned = 0;
        for entry in self.db.range(start.as_ref()..=end.as_ref()).take(limit) {
            let (k, _) = entry.map_err(|e| self.err(e))?;
            batch.remove(k.clone());
            let key = k
                .get(1..)
                .and_then(|k| DedupExpiryKey::try_from(k).ok())
                .ok_or_else(|| self.corrupt("a dedup expiry key is malformed"))?;
            let (_, dedup_key) = layout::split_dedup_expiry_key(&key);
            let dedup_key = Key::new(DEDUP, &[&dedup_key]);
            let current = self.db.get(&dedup_key).map_err(|e| self.err(e))?;
            // A later push may have replaced the entry with a live one: keep that.
            if current
                .as_deref()
                .and_then(be_u64)
                .is_some_and(|c| c <= now_ms)
            {
                batch.remove(dedup_key.as_ref());
                pruned += 1;
            }
        }
        self.db.apply_batch(batch).map_err(|e| self.err(e))?;
        self.flush()?;
        Ok(pruned)
    }

    fn recover(&self) -> Result<Vec<QueueState>, StoreError> {
        let mut cache = NameCache::new();
        let mut out = Vec::new();
        for entry in self.db.scan_prefix([QUEUE]) {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let key = k
                .get(1..)
                .and_then(|k| QueueKeyBytes::try_from(k).ok())
                .ok_or_else(|| self.corrupt("a queue key is malformed"))?;
            let meta = <&[u8; layout::QUEUE_META_LEN]>::try_from(v.as_ref())
                .map(QueueMeta::decode)
                .map_err(|_| self.corrupt("a queue record is malformed"))?;
            let (pid, lane) = layout::split_queue_key(&key);
            let queue = cache.queue(pid, lane, |pid| self.peer_name(pid))?;
            let start = Key::new(ITEM, &[&layout::item_key(pid, lane, 0)]);
            let end = Key::new(ITEM, &[&layout::item_key(pid, lane, u64::MAX)]);
            let head = match self.db.range(start.as_ref()..=end.as_ref()).next() {
                Some(entry) => {
                    let (k, _) = entry.map_err(|e| self.err(e))?;
                    item_key_of(&k).map(|k| layout::split_item_key(&k).2)
                }
                None => None,
            };
            out.push(QueueState {
                queue,
                count: meta.count,
                bytes: meta.bytes,
                head_seq: head.unwrap_or(meta.next_seq),
                next_seq: meta.next_seq,
            });
        }
        Ok(out)
    }

    fn compact(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    fn disk_bytes(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(|e| self.err(e))
    }

    fn meta_scan(&self, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.db.scan_prefix(meta_key(prefix)) {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            out.push((Bytes::copy_from_slice(&k[1..]), Bytes::copy_from_slice(&v)));
        }
        Ok(out)
    }
}

fn item_key_of(k: &[u8]) -> Option<ItemKey> {
    k.get(1..).and_then(|k| ItemKey::try_from(k).ok())
}

fn be_u64(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

/// One commit's batch, with the writes it made so far visible to its own reads.
struct SledTxn<'s> {
    store: &'s SledStore,
    batch: sled::Batch,
    peers: HashMap<String, Pid>,
    peer_last: Option<Pid>,
    queues: HashMap<QueueKeyBytes, QueueMeta>,
    /// None: removed in this batch.
    items: HashMap<ItemKey, Option<(u64, u64)>>,
    dedup: HashMap<DedupKeyBytes, u64>,
}

impl<'s> SledTxn<'s> {
    fn new(store: &'s SledStore) -> Self {
        Self {
            store,
            batch: sled::Batch::default(),
            peers: HashMap::new(),
            peer_last: None,
            queues: HashMap::new(),
            items: HashMap::new(),
            dedup: HashMap::new(),
        }
    }

    fn get(&self, key: Key) -> Result<Option<sled::IVec>, StoreError> {
        self.store.db.get(key).map_err(|e| self.store.err(e))
    }

    fn stored_item(&self, key: &ItemKey) -> Result<Option<(u64, u64)>, StoreError> {
        if let Some(&overlay) = self.items.get(key) {
            return Ok(overlay);
        }
        let Some(v) = self.get(Key::new(ITEM, &[key]))? else {
            return Ok(None);
        };
        let (exp, body) = layout::split_item_value(&v)
            .ok_or_else(|| self.store.corrupt("an item value is too short"))?;
        Ok(Some((exp, body.len() as u64)))
    }
}

impl Txn for SledTxn<'_> {
    fn peer_get(&mut self, name: &str) -> Result<Option<Pid>, StoreError> {
        if let Some(&pid) = self.peers.get(name) {
            return Ok(Some(pid));
        }
        let v = self.get(Key::new(PEER, &[name.as_bytes()]))?;
        v.map(|v| {
            <[u8; 4]>::try_from(v.as_ref())
                .map(u32::from_be_bytes)
                .map_err(|_| self.store.corrupt("a peer record is malformed"))
        })
        .transpose()
    }

    fn peer_put(&mut self, name: &str, pid: Pid) -> Result<(), StoreError> {
        let pid_bytes = pid.to_be_bytes();
        self.batch
            .insert(Key::new(PEER, &[name.as_bytes()]).as_ref(), &pid_bytes);
        self.batch
            .insert(Key::new(PEER_NAME, &[&pid_bytes]).as_ref(), name.as_bytes());
        self.peers.insert(name.to_owned(), pid);
        self.peer_last = self.peer_last.max(Some(pid));
        Ok(())
    }

    fn peer_last(&mut self) -> Result<Option<Pid>, StoreError> {
        let stored = match self.store.db.scan_prefix([PEER_NAME]).next_back() {
            Some(entry) => {
                let (k, _) = entry.map_err(|e| self.store.err(e))?;
                let pid = k
                    .get(1..)
                    .and_then(|k| <[u8; 4]>::try_from(k).ok())
                    .ok_or_else(|| self.store.corrupt("a peer name key is malformed"))?;
                Some(u32::from_be_bytes(pid))
            }
            None => None,
        };
        Ok(stored.max(self.peer_last))
    }

    fn queue_get(&mut self, key: &QueueKeyBytes) -> Result<Option<QueueMeta>, StoreError> {
        if let Some(meta) = self.queues.get(key) {
            return Ok(Some(*meta));
        }
        let v = self.get(Key::new(QUEUE, &[key]))?;
        v.map(|v| {
            <&[u8; layout::QUEUE_META_LEN]>::try_from(v.as_ref())
                .map(QueueMeta::decode)
                .map_err(|_| self.store.corrupt("a queue record is malformed"))
        })
        .transpose()
    }

    fn queue_put(&mut self, key: &QueueKeyBytes, meta: &QueueMeta) -> Result<(), StoreError> {
        self.batch
            .insert(Key::new(QUEUE, &[key]).as_ref(), &meta.encode());
        self.queues.insert(*key, *meta);
        Ok(())
    }

    fn item_put(
        &mut self,
        key: &ItemKey,
        expires_at_ms: u64,
        body: &[u8],
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let old = self.stored_item(key)?;
        let mut value = Vec::with_capacity(ITEM_HEADER_LEN + body.len());
        value.extend_from_slice(&expires_at_ms.to_be_bytes());
        value.extend_from_slice(body);
        self.batch.insert(Key::new(ITEM, &[key]).as_ref(), value);
        self.items
            .insert(*key, Some((expires_at_ms, body.len() as u64)));
        Ok(old)
    }

    fn item_remove(&mut self, key: &ItemKey) -> Result<Option<(u64, u64)>, StoreError> {
        let old = self.stored_item(key)?;
        if old.is_some() {
            self.batch.remove(Key::new(ITEM, &[key]).as_ref());
            self.items.insert(*key, None);
        }
        Ok(old)
    }

    fn expiry_put(&mut self, key: &ExpiryKey) -> Result<(), StoreError> {
        self.batch.insert(Key::new(EXPIRY, &[key]).as_ref(), &[]);
        Ok(())
    }

    fn expiry_remove(&mut self, key: &ExpiryKey) -> Result<(), StoreError> {
        self.batch.remove(Key::new(EXPIRY, &[key]).as_ref());
        Ok(())
    }

    fn dedup_swap(
        &mut self,
        key: &DedupKeyBytes,
        expires_at_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let old = match self.dedup.get(key) {
            Some(&exp) => Some(exp),
            None => match self.get(Key::new(DEDUP, &[key]))? {
                Some(v) => Some(
                    be_u64(&v).ok_or_else(|| self.store.corrupt("a dedup record is malformed"))?,
                ),
                None => None,
            },
        };
        self.batch.insert(
            Key::new(DEDUP, &[key]).as_ref(),
            &expires_at_ms.to_be_bytes(),
        );
        self.dedup.insert(*key, expires_at_ms);
        Ok(old)
    }

    fn dedup_expiry_put(&mut self, key: &DedupExpiryKey) -> Result<(), StoreError> {
        self.batch
            .insert(Key::new(DEDUP_EXPIRY, &[key]).as_ref(), &[]);
        Ok(())
    }

    fn meta_put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.batch.insert(meta_key(key), value);
        Ok(())
    }

    fn meta_remove(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.batch.remove(meta_key(key));
        Ok(())
    }
}

/// Metadata keys are longer than [`Key`] holds: they get a heap key.
fn meta_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(META);
    k.extend_from_slice(key);
    k
}

/// sled's background threads hold the file lock for a moment after the last handle drops,
/// so a reopen by the same process may find it still taken: wait that moment out.
fn open_db_waiting(dir: &Path, cache_bytes: usize) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + LOCK_GRACE;
    loop {
        match open_db(dir, cache_bytes) {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn open_db(dir: &Path, cache_bytes: usize) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes as u64);
    let corrupt = |detail: String| StoreError::Corrupt {
        path: dir.to_owned(),
        detail,
    };
    // sled panics on some damaged files rather than return an error.
    let opened = panic::catch_unwind(AssertUnwindSafe(|| config.open()))
        .map_err(|_| corrupt("the storage engine panicked opening it".into()))?;
    match opened {
        Ok(db) => Ok(db),
        // Every store directory was written by this sled version, so a format sled does not
        // recognise is damage.
        Err(sled::Error::Unsupported(detail) | sled::Error::ReportableBug(detail)) => {
            Err(corrupt(detail))
        }
        Err(e) => Err(from_sled(dir, e)),
    }
}

/// Creates the database under a temporary name with its format record, then renames it into
/// place: a directory at `dir` is always a whole store, and one without the record is damaged.
fn create_dir(dir: &Path, cache_bytes: usize) -> Result<(), StoreError> {
    let tmp = dir.with_extension("new");
    match fs::remove_dir_all(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::from_io(e)),
    }
    let db = open_db(&tmp, cache_bytes)?;
    db.insert(INFO_FORMAT, &FORMAT_VERSION.to_be_bytes())
        .map_err(|e| from_sled(&tmp, e))?;
    db.flush().map_err(|e| from_sled(&tmp, e))?;
    drop(db);
    fs::rename(&tmp, dir).map_err(StoreError::from_io)?;
    if let Some(parent) = dir.parent() {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(StoreError::from_io)?;
    }
    Ok(())
}

fn from_sled(dir: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock") => {
            StoreError::Locked {
                path: dir.to_owned(),
            }
        }
        sled::Error::Io(io) => StoreError::from_io(io),
        sled::Error::Corruption { at, .. } => StoreError::Corrupt {
            path: dir.to_owned(),
            detail: match at {
                Some(at) => format!("sled found corruption at {at:?}"),
                None => "sled found corruption".into(),
            },
        },
        other => StoreError::Backend(other.to_string()),
    }
}
