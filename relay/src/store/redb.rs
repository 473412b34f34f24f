//! The default backend: one redb 4 file, `queue.redb`, in the store directory.
//!
//! Commits use `Durability::Immediate` (one fsync per commit). redb latches the first I/O
//! error of a handle (every later call fails), so after an I/O or disk-full error the store
//! drops its handle and reopens the file on the next call: a relay that turned not-ready on a
//! full disk recovers by itself once space is freed. Reopening after a crash runs redb's
//! repair, which reads the whole file.

use std::fs;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ::redb::{
    Builder, CommitError, CompactionError, Database, DatabaseError, Durability, ReadTransaction,
    ReadableDatabase, ReadableTable, SetDurabilityError, StorageError, Table, TableDefinition,
    TableError, TransactionError, WriteTransaction,
};

use super::layout::{
    self, DedupExpiryKey, DedupKeyBytes, ExpiryKey, ITEM_HEADER_LEN, ItemKey, ItemsBuilder,
    NameCache, Pid, QueueKeyBytes, QueueMeta, Txn,
};
use bytes::Bytes;

use super::{Item, PushOutcome, QueueKey, QueueState, Store, StoreError, WriteBatch, unix_ms};

type MetaBytes = [u8; layout::QUEUE_META_LEN];

const PEERS: TableDefinition<&str, Pid> = TableDefinition::new("peers");
const PEER_NAMES: TableDefinition<Pid, &str> = TableDefinition::new("peer_names");
const QUEUES: TableDefinition<&QueueKeyBytes, &MetaBytes> = TableDefinition::new("queues");
const ITEMS: TableDefinition<&ItemKey, &[u8]> = TableDefinition::new("items");
const EXPIRY: TableDefinition<&ExpiryKey, ()> = TableDefinition::new("expiry");
const DEDUP: TableDefinition<&DedupKeyBytes, u64> = TableDefinition::new("dedup");
const DEDUP_EXPIRY: TableDefinition<&DedupExpiryKey, ()> = TableDefinition::new("dedup_expiry");
const INFO: TableDefinition<&str, u64> = TableDefinition::new("info");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");

/// Version of the layout in `layout.rs`, checked at open.
const FORMAT_VERSION: u64 = 1;

/// The store on one redb file.
pub struct RedbStore {
    file: PathBuf,
    cache_bytes: usize,
    /// Written only to compact or to replace a handle that hit an I/O error.
    db: RwLock<Option<Database>>,
    /// The handle hit an I/O error and must be reopened before further use.
    broken: AtomicBool,
    /// When the last reopen failed, and why: a reopen repairs the whole file, so it is not
    /// retried on every call while, say, the disk stays full.
    failed_reopen: Mutex<Option<(Instant, StoreError)>>,
}

/// Least time between two attempts to reopen a broken handle.
const REOPEN_BACKOFF: Duration = Duration::from_secs(1);

impl RedbStore {
    /// Opens `file`, creating it if absent, with a page cache of `cache_bytes`.
    pub fn open(file: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let db = open_file(file, cache_bytes)?;
        Ok(Self {
            file: file.to_owned(),
            cache_bytes,
            db: RwLock::new(Some(db)),
            broken: AtomicBool::new(false),
            failed_reopen: Mutex::new(None),
        })
    }

    /// Runs `f` on the database handle, reopening it first if an earlier call broke it.
    fn with_db<R>(
        &self,
        f: impl FnOnce(&Database) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if self.broken.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let db = guard.as_ref().ok_or(StoreError::Closed)?;
        let result = f(db);
        if matches!(result, Err(StoreError::Full(_) | StoreError::Io(_))) {
            self.broken.store(true, Ordering::Release);
        }
        result
    }

    fn reopen(&self) -> Result<(), StoreError> {
        let mut failed = self
            .failed_reopen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((at, e)) = failed.as_ref()
            && at.elapsed() < REOPEN_BACKOFF
        {
            return Err(e.clone());
        }
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if !self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        // The file lock belongs to the handle: close the old one before opening again.
        *guard = None;
        match open_file(&self.file, self.cache_bytes) {
            Ok(db) => {
                *guard = Some(db);
                *failed = None;
                self.broken.store(false, Ordering::Release);
                tracing::info!(file = %self.file.display(), "store reopened after an I/O error");
                Ok(())
            }
            Err(e) => {
                *failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    fn corrupt(&self, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.file.clone(),
            detail: detail.into(),
        }
    }

    fn begin_read(&self, db: &Database) -> Result<ReadTransaction, StoreError> {
        db.begin_read().map_err(from_txn)
    }
}

impl Store for RedbStore {
    fn commit(&self, batch: &WriteBatch) -> Result<Vec<PushOutcome>, StoreError> {
        batch.validate()?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.with_db(|db| {
            let mut txn = db.begin_write().map_err(from_txn)?;
            txn.set_durability(Durability::Immediate)
                .map_err(from_durability)?;
            let outcomes = {
                let mut tx = RedbTxn::open(&txn)?;
                layout::apply(&mut tx, batch, unix_ms())?
            };
            txn.commit().map_err(from_commit)?;
            Ok(outcomes)
        })
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
        self.with_db(|db| {
            let txn = self.begin_read(db)?;
            let peers = txn.open_table(PEERS).map_err(from_table)?;
            let Some(pid) = peers.get(queue.dest.as_str()).map_err(from_storage)? else {
                return Ok(Vec::new());
            };
            let pid = pid.value();
            let items = txn.open_table(ITEMS).map_err(from_table)?;
            let start = layout::item_key(pid, queue.lane, first);
            let end = layout::item_key(pid, queue.lane, u64::MAX);
            let mut out = ItemsBuilder::new(limit);
            for entry in items
                .range::<&ItemKey>(&start..=&end)
                .map_err(from_storage)?
                .take(limit)
            {
                let (k, v) = entry.map_err(from_storage)?;
                let (_, _, seq) = layout::split_item_key(k.value());
                let (exp, body) = layout::split_item_value(v.value())
                    .ok_or_else(|| self.corrupt("an item value is too short"))?;
                out.push(queue.clone(), seq, exp, body);
            }
            Ok(out.finish())
        })
    }

    fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<Item>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.with_db(|db| {
            let txn = self.begin_read(db)?;
            let expiry = txn.open_table(EXPIRY).map_err(from_table)?;
            let items = txn.open_table(ITEMS).map_err(from_table)?;
            let names = txn.open_table(PEER_NAMES).map_err(from_table)?;
            let mut cache = NameCache::new();
            let mut out = ItemsBuilder::new(limit);
            let end = layout::expiry_key_max(now_ms);
            for entry in expiry
                .range::<&ExpiryKey>(..=&end)
                .map_err(from_storage)?
                .take(limit)
            {
                let (k, _) = entry.map_err(from_storage)?;
                let (_, item_key) = layout::split_expiry_key(k.value());
                let Some(v) = items.get(&item_key).map_err(from_storage)? else {
                    return Err(self.corrupt("an expiry entry points at no item"));
                };
                let (exp, body) = layout::split_item_value(v.value())
                    .ok_or_else(|| self.corrupt("an item value is too short"))?;
                let (pid, lane, seq) = layout::split_item_key(&item_key);
                let queue = cache.queue(pid, lane, |pid| {
                    Ok(names
                        .get(pid)
                        .map_err(from_storage)?
                        .map(|n| n.value().to_owned()))
                })?;
                out.push(queue, seq, exp, body);
            }
            Ok(out.finish())
        })
    }

    fn prune_dedup(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        self.with_db(|db| {
            let txn = db.begin_write().map_err(from_txn)?;
            let mut pruned = 0;
            {
                let mut dedup = txn.open_table(DEDUP).map_err(from_table)?;
                let mut dedup_expiry = txn.open_table(DEDUP_EXPIRY).map_err(from_table)?;
                let end = layout::dedup_expiry_key_max(now_ms);
                let due: Vec<DedupExpiryKey> = dedup_expiry
                    .range::<&DedupExpiryKey>(..=&end)
                    .map_err(from_storage)?
                    .take(limit)
                    .map(|e| e.map(|(k, _)| *k.value()))
                    .collect::<Result<_, _>>()
                    .map_err(from_storage)?;
                for key in &due {
                    dedup_expiry.remove(key).map_err(from_storage)?;
                    let (_, dedup_key) = layout::split_dedup_expiry_key(key);
                    // A later push may have replaced the entry with a live one: keep that.
                    let current = dedup
                        .get(&dedup_key)
                        .map_err(from_storage)?
                        .map(|g| g.value());
                    if current.is_some_and(|c| c <= now_ms) {
                        dedup.remove(&dedup_key).map_err(from_storage)?;
                        pruned += 1;
                    }
                }
            }
            txn.commit().map_err(from_commit)?;
            Ok(pruned)
        })
    }

    fn recover(&self) -> Result<Vec<QueueState>, StoreError> {
        self.with_db(|db| {
            let txn = self.begin_read(db)?;
            let queues = txn.open_table(QUEUES).map_err(from_table)?;
            let items = txn.open_table(ITEMS).map_err(from_table)?;
            let names = txn.open_table(PEER_NAMES).map_err(from_table)?;
            let mut cache = NameCache::new();
            let mut out = Vec::new();
            for entry in queues.range::<&QueueKeyBytes>(..).map_err(from_storage)? {
                let (k, v) = entry.map_err(from_storage)?;
                let k = k.value();
                let meta = QueueMeta::decode(v.value());
                let (pid, lane) = layout::split_queue_key(k);
                let queue = cache.queue(pid, lane, |pid| {
                    Ok(names
                        .get(pid)
                        .map_err(from_storage)?
                        .map(|n| n.value().to_owned()))
                })?;
                let start = layout::item_key(pid, lane, 0);
                let end = layout::item_key(pid, lane, u64::MAX);
                let head = items
                    .range::<&ItemKey>(&start..=&end)
                    .map_err(from_storage)?
                    .next()
                    .transpose()
                    .map_err(from_storage)?
                    .map(|(k, _)| layout::split_item_key(k.value()).2);
                out.push(QueueState {
                    queue,
                    count: meta.count,
                    bytes: meta.bytes,
                    head_seq: head.unwrap_or(meta.next_seq),
                    next_seq: meta.next_seq,
                });
            }
            Ok(out)
        })
    }

    fn compact(&self) -> Result<bool, StoreError> {
        if self.broken.load(Ordering::Acquire) {
            self.reopen()?;
        }
        // Compaction needs the handle alone: no read or write transaction may be open.
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        let db = guard.as_mut().ok_or(StoreError::Closed)?;
        match db.compact() {
            Ok(_) => Ok(true),
            Err(e) => {
                let e = from_compaction(e);
                if matches!(e, StoreError::Full(_) | StoreError::Io(_)) {
                    self.broken.store(true, Ordering::Release);
                }
                Err(e)
            }
        }
    }

    fn disk_bytes(&self) -> Result<u64, StoreError> {
        Ok(fs::metadata(&self.file).map_err(StoreError::from_io)?.len())
    }

    fn meta_scan(&self, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
        self.with_db(|db| {
            let txn = self.begin_read(db)?;
            let meta = txn.open_table(META).map_err(from_table)?;
            let mut out = Vec::new();
            for entry in meta.range::<&[u8]>(prefix..).map_err(from_storage)? {
                let (k, v) = entry.map_err(from_storage)?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.push((
                    Bytes::copy_from_slice(k.value()),
                    Bytes::copy_from_slice(v.value()),
                ));
            }
            Ok(out)
        })
    }
}

/// The tables of one write transaction.
struct RedbTxn<'t> {
    peers: Table<'t, &'static str, Pid>,
    peer_names: Table<'t, Pid, &'static str>,
    queues: Table<'t, &'static QueueKeyBytes, &'static MetaBytes>,
    items: Table<'t, &'static ItemKey, &'static [u8]>,
    expiry: Table<'t, &'static ExpiryKey, ()>,
    dedup: Table<'t, &'static DedupKeyBytes, u64>,
    dedup_expiry: Table<'t, &'static DedupExpiryKey, ()>,
    meta: Table<'t, &'static [u8], &'static [u8]>,
    /// Reused to lay out item values without an allocation per item.
    scratch: Vec<u8>,
}

impl<'t> RedbTxn<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            peers: txn.open_table(PEERS).map_err(from_table)?,
            peer_names: txn.open_table(PEER_NAMES).map_err(from_table)?,
            queues: txn.open_table(QUEUES).map_err(from_table)?,
            items: txn.open_table(ITEMS).map_err(from_table)?,
            expiry: txn.open_table(EXPIRY).map_err(from_table)?,
            dedup: txn.open_table(DEDUP).map_err(from_table)?,
            dedup_expiry: txn.open_table(DEDUP_EXPIRY).map_err(from_table)?,
            meta: txn.open_table(META).map_err(from_table)?,
            scratch: Vec::new(),
        })
    }
}

/// (expiry, body length) of a stored item value.
fn item_summary(v: &[u8]) -> Result<(u64, u64), StoreError> {
    let (exp, body) = layout::split_item_value(v)
        .ok_or_else(|| StoreError::Backend("an item value is too short".into()))?;
    Ok((exp, body.len() as u64))
}

impl Txn for RedbTxn<'_> {
    fn peer_get(&mut self, name: &str) -> Result<Option<Pid>, StoreError> {
        Ok(self
            .peers
            .get(name)
            .map_err(from_storage)?
            .map(|g| g.value()))
    }

    fn peer_put(&mut self, name: &str, pid: Pid) -> Result<(), StoreError> {
        self.peers.insert(name, pid).map_err(from_storage)?;
        self.peer_names.insert(pid, name).map_err(from_storage)?;
        Ok(())
    }

    fn peer_last(&mut self) -> Result<Option<Pid>, StoreError> {
        Ok(self
            .peer_names
            .last()
            .map_err(from_storage)?
            .map(|(k, _)| k.value()))
    }

    fn queue_get(&mut self, key: &QueueKeyBytes) -> Result<Option<QueueMeta>, StoreError> {
        Ok(self
            .queues
            .get(key)
            .map_err(from_storage)?
            .map(|g| QueueMeta::decode(g.value())))
    }

    fn queue_put(&mut self, key: &QueueKeyBytes, meta: &QueueMeta) -> Result<(), StoreError> {
        self.queues
            .insert(key, &meta.encode())
            .map_err(from_storage)?;
        Ok(())
    }

    fn item_put(
        &mut self,
        key: &ItemKey,
        expires_at_ms: u64,
        body: &[u8],
    ) -> Result<Option<(u64, u64)>, StoreError> {
        self.scratch.clear();
        self.scratch.reserve(ITEM_HEADER_LEN + body.len());
        self.scratch.extend_from_slice(&expires_at_ms.to_be_bytes());
        self.scratch.extend_from_slice(body);
        let old = self
            .items
            .insert(key, self.scratch.as_slice())
            .map_err(from_storage)?;
        old.map(|g| item_summary(g.value())).transpose()
    }

    fn item_remove(&mut self, key: &ItemKey) -> Result<Option<(u64, u64)>, StoreError> {
        let old = self.items.remove(key).map_err(from_storage)?;
        old.map(|g| item_summary(g.value())).transpose()
    }

    fn expiry_put(&mut self, key: &ExpiryKey) -> Result<(), StoreError> {
        self.expiry.insert(key, ()).map_err(from_storage)?;
        Ok(())
    }

    fn expiry_remove(&mut self, key: &ExpiryKey) -> Result<(), StoreError> {
        self.expiry.remove(key).map_err(from_storage)?;
        Ok(())
    }

    fn dedup_swap(
        &mut self,
        key: &DedupKeyBytes,
        expires_at_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .dedup
            .insert(key, expires_at_ms)
            .map_err(from_storage)?
            .map(|g| g.value()))
    }

    fn dedup_expiry_put(&mut self, key: &DedupExpiryKey) -> Result<(), StoreError> {
        self.dedup_expiry.insert(key, ()).map_err(from_storage)?;
        Ok(())
    }

    fn meta_put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.meta.insert(key, value).map_err(from_storage)?;
        Ok(())
    }

    fn meta_remove(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.meta.remove(key).map_err(from_storage)?;
        Ok(())
    }
}

/// Opens the file, creating it first if absent; a damaged file is `Corrupt`.
fn open_file(file: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let mut builder = Builder::new();
    builder.set_cache_size(cache_bytes);
    match fs::metadata(file) {
        Ok(meta) if meta.len() == 0 => {
            // redb would format an empty file as a new database: a file truncated to nothing
            // must not silently become an empty store.
            return Err(StoreError::Corrupt {
                path: file.to_owned(),
                detail: "the file is empty".into(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_file(file, &builder)?,
        Err(e) => return Err(StoreError::from_io(e)),
    }
    // redb may panic on some damaged files rather than return an error.
    let opened = panic::catch_unwind(AssertUnwindSafe(|| builder.open(file))).map_err(|p| {
        StoreError::Corrupt {
            path: file.to_owned(),
            detail: format!("the storage engine panicked opening it: {}", panic_text(&p)),
        }
    })?;
    let db = opened.map_err(|e| from_open(file, e))?;
    init_tables(&db, file, false)?;
    Ok(db)
}

/// Creates a new database under a temporary name and renames it into place, so that a file
/// at `file` is always a whole database and an empty one can be refused.
fn create_file(file: &Path, builder: &Builder) -> Result<(), StoreError> {
    let tmp = file.with_extension("redb.new");
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::from_io(e)),
    }
    let db = builder.create(&tmp).map_err(|e| from_open(&tmp, e))?;
    init_tables(&db, &tmp, true)?;
    drop(db);
    fs::rename(&tmp, file).map_err(StoreError::from_io)?;
    if let Some(dir) = file.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(StoreError::from_io)?;
    }
    Ok(())
}

/// Creates every table and records (`fresh`) or checks the layout version.
fn init_tables(db: &Database, file: &Path, fresh: bool) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(from_txn)?;
    {
        drop(RedbTxn::open(&txn)?);
        let mut info = txn.open_table(INFO).map_err(from_table)?;
        let version = info.get("format").map_err(from_storage)?.map(|g| g.value());
        match version {
            None if fresh => {
                info.insert("format", FORMAT_VERSION)
                    .map_err(from_storage)?;
            }
            // Every store is created with its format record: without one, data was lost.
            None => {
                return Err(StoreError::Corrupt {
                    path: file.to_owned(),
                    detail: "the store's format record is missing".into(),
                });
            }
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Backend(format!(
                    "{} has store format {other}; this relay reads format {FORMAT_VERSION}",
                    file.display()
                )));
            }
        }
    }
    txn.commit().map_err(from_commit)
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn from_open(file: &Path, e: DatabaseError) -> StoreError {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: file.to_owned(),
        detail,
    };
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Locked {
                path: file.to_owned(),
            }
        }
        DatabaseError::RepairAborted => corrupt("the repair after a crash was aborted".into()),
        DatabaseError::UpgradeRequired(v) => StoreError::Backend(format!(
            "{} uses redb file format {v}, which this redb cannot open without an upgrade",
            file.display()
        )),
        DatabaseError::Storage(StorageError::Corrupted(detail)) => corrupt(detail),
        DatabaseError::Storage(StorageError::Io(io))
            if matches!(
                io.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
            ) =>
        {
            corrupt(io.to_string())
        }
        DatabaseError::Storage(e) => from_storage(e),
        other => StoreError::Backend(other.to_string()),
    }
}

pub(super) fn from_storage(e: StorageError) -> StoreError {
    match e {
        StorageError::Io(io) => StoreError::from_io(io),
        StorageError::PreviousIo => StoreError::Io(Arc::new(io::Error::other(
            "an earlier I/O error disabled the database handle",
        ))),
        other => StoreError::Backend(other.to_string()),
    }
}

fn from_txn(e: TransactionError) -> StoreError {
    match e {
        TransactionError::Storage(s) => from_storage(s),
        other => StoreError::Backend(other.to_string()),
    }
}

fn from_table(e: TableError) -> StoreError {
    match e {
        TableError::Storage(s) => from_storage(s),
        other => StoreError::Backend(other.to_string()),
    }
}

fn from_commit(e: CommitError) -> StoreError {
    match e {
        CommitError::Storage(s) => from_storage(s),
        other => StoreError::Backend(other.to_string()),
    }
}

fn from_compaction(e: CompactionError) -> StoreError {
    match e {
        CompactionError::Storage(s) => from_storage(s),
        other => StoreError::Backend(other.to_string()),
    }
}

fn from_durability(e: SetDurabilityError) -> StoreError {
    StoreError::Backend(e.to_string())
}
