//! The relay's durable store-and-forward queue.
//!
//! Messages wait here, per destination peer and lane, until the destination acknowledges them
//! or their TTL runs out.
//!
//! # Guarantees
//!
//! - **Accepted means on disk.** [`Store::commit`] returns only after the batch is fsynced
//!   (redb `Durability::Immediate`; sled `apply_batch` then `flush`). A `kill -9` at any moment
//!   loses nothing that a commit returned for; a batch is applied entirely or not at all.
//! - **FIFO per queue.** A queue is a destination peer id and a lane; items are kept and read
//!   in `seq` order. The router assigns the seqs (from 1, seeded by [`Store::recover`]).
//! - **Redelivery.** Reading does not consume: an item stays until a commit removes it, so
//!   whatever a destination did not ack is read again after it reconnects.
//! - **Dedup within the TTL window.** A push with a [`DedupKey`] whose entry exists and whose
//!   expiry has not passed (judged against the system clock at commit, in Unix milliseconds)
//!   is not stored. The entry outlives the item's removal until the item's `expires_at_ms`,
//!   and is deleted by [`Store::prune_dedup`] after that.
//! - **Expiry.** [`Store::expired`] lists queued items whose expiry passed, oldest first; the
//!   relay removes them and pushes the "expired" notice for their origin in the same batch, so
//!   a crash cannot lose the notice.
//! - **Cheap recovery.** Per-queue counters (items, body bytes, next seq) live in a small table
//!   updated inside every commit, so [`Store::recover`] reads one row per queue, never the items.
//! - **Bounded memory.** Items stay on disk; the engine's page cache is capped by
//!   [`StoreConfig::cache_bytes`], reads return at most `limit` items, and the writer caps a
//!   transaction at [`writer::MAX_PUSHES_PER_COMMIT`] pushes.
//! - **Metadata in the same commits.** Small keyed records (campaign state) are written by
//!   the same atomic commits as the items they describe, so counters never disagree with the
//!   queues after a crash; [`Store::meta_scan`] reads them back at start.
//! - **Refuses damaged files.** A corrupt or truncated file at open is
//!   [`StoreError::Corrupt`], never an empty store started over it.
//!
//! # Backends
//!
//! redb 4 is the default. On this project's 2-core machine, 2M x 256-byte messages over 8
//! queues in batches of 1,000 enqueued at ~200k msgs/s and drained at ~450k msgs/s; it is
//! maintained, checksums its pages, and [`Store::compact`] gives the disk space of a drained
//! surge back. sled 0.34 (cargo feature `sled`) passes the same test suite, but it has been
//! unmaintained since 2021, its files never shrink after a drain (`compact` returns
//! `Ok(false)`), and it measured ~53k msgs/s enqueued here against redb's ~250k; keep it for
//! comparison only.
//!
//! Writes go through one [`writer::Writer`] thread that group-commits: every pending request
//! merged into one transaction, one fsync, then every waiter answered.
//!
//! # Cost per message
//!
//! A push is four B-tree inserts (item, expiry index, dedup entry, dedup expiry index) and a
//! removal two deletes; keys are fixed big-endian bytes, so the item and expiry inserts land
//! at the right edge of their trees. The dedup entry cannot: message ids are random, so once
//! the dedup table outgrows a commit, each push dirties about one 4 KiB page of it. Measured
//! here (release build, same 2M x 256-byte shape, 64 MiB cache): ~250k msgs/s enqueued
//! without dedup keys (~570 bytes written per message) but ~26k msgs/s with a random dedup
//! id per message (~5 KB written per message). Keying dedup entries by a time the sender
//! repeats on a resend (the envelope's `created_at_ms`) would make those inserts clustered.

mod layout;
mod redb;
#[cfg(feature = "sled")]
mod sled;
pub mod writer;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

pub use self::redb::RedbStore;
#[cfg(feature = "sled")]
pub use self::sled::SledStore;
pub use self::writer::{Writer, WriterStats};

/// Which queue: a destination peer id (ASCII, 1..=32 bytes, [a-z0-9-]) and a lane (1 call, 2 chat, 3 bulk).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    pub dest: String,
    pub lane: u8,
}

/// Dedup identity of a message: origin peer id + 16-byte message id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub origin: String,
    pub id: [u8; 16],
}

/// One queued item. `body` is opaque to the store (the relay encodes the frame to forward).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub queue: QueueKey,
    pub seq: u64,
    pub expires_at_ms: u64,
    pub body: Bytes,
}

/// An item to push, with the dedup identity it claims (None for relay-made notices).
#[derive(Clone, Debug)]
pub struct NewItem {
    pub item: Item,
    pub dedup: Option<DedupKey>,
}

/// The longest key of a metadata record.
pub const MAX_META_KEY: usize = 128;

/// A batch applied atomically and durably by one commit: pushes in order, then removes, then
/// metadata writes in order.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    pub push: Vec<NewItem>,
    pub remove: Vec<(QueueKey, u64 /*seq*/)>,
    /// Small records kept beside the queues (campaign state): `Some` writes, `None` deletes.
    pub meta: Vec<(Bytes, Option<Bytes>)>,
}

impl WriteBatch {
    /// Whether the batch has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.push.is_empty() && self.remove.is_empty() && self.meta.is_empty()
    }

    /// Checks every key, so that a bad request fails alone before reaching a transaction.
    pub fn validate(&self) -> Result<(), StoreError> {
        for new in &self.push {
            check_queue(&new.item.queue)?;
            if new.item.seq == 0 {
                return Err(StoreError::Invalid(format!(
                    "seq 0 pushed to {}/{} (seqs start at 1)",
                    new.item.queue.dest, new.item.queue.lane
                )));
            }
            if let Some(d) = &new.dedup
                && !layout::valid_peer_id(&d.origin)
            {
                return Err(StoreError::Invalid(format!(
                    "origin {:?} is not a peer id",
                    d.origin
                )));
            }
        }
        for (queue, _) in &self.remove {
            check_queue(queue)?;
        }
        for (key, _) in &self.meta {
            if key.is_empty() || key.len() > MAX_META_KEY {
                return Err(StoreError::Invalid(format!(
                    "metadata key of {} bytes (1..={MAX_META_KEY})",
                    key.len()
                )));
            }
        }
        Ok(())
    }
}

fn check_queue(q: &QueueKey) -> Result<(), StoreError> {
    if layout::valid_peer_id(&q.dest) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "destination {:?} is not a peer id",
            q.dest
        )))
    }
}

/// What became of one push.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PushOutcome {
    /// On disk, queued.
    Stored,
    /// Already accepted within its window; nothing stored. `expires_at_ms` is the first one's.
    Duplicate { expires_at_ms: u64 },
}

/// Counters of one queue, for start-up recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueState {
    pub queue: QueueKey,
    /// Items queued.
    pub count: u64,
    /// Sum of their body lengths.
    pub bytes: u64,
    /// Lowest seq present, or `next_seq` if empty.
    pub head_seq: u64,
    /// One past the highest seq ever pushed.
    pub next_seq: u64,
}

/// Errors of the store, one variant per thing a caller does about it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// Disk or file-system quota full: answer busy and turn not-ready until space returns.
    /// The store reopens its file by itself on the next call.
    #[error("store is out of disk space: {0}")]
    Full(String),
    /// The store's file is damaged; the relay must not start on it.
    #[error(
        "store file {} is corrupt or truncated: {detail}. The relay must not run on it, since \
         starting empty would drop every queued message. To recover: stop the relay, move the \
         file (or directory) aside and keep it for analysis, restore it from a backup if there \
         is one, then start again; an absent store starts empty.",
        .path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    /// Another process has the store open.
    #[error("store {} is in use by another process (is another relay running?)", .path.display())]
    Locked { path: PathBuf },
    /// The request is malformed (a caller bug); nothing was written.
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The writer thread has stopped; nothing more can be committed.
    #[error("store writer has stopped")]
    Closed,
    /// Any other I/O failure; the store reopens its file on the next call.
    #[error("store I/O error: {0}")]
    Io(Arc<io::Error>),
    /// The storage engine failed in a way not listed above.
    #[error("storage engine error: {0}")]
    Backend(String),
}

impl StoreError {
    /// Classifies an I/O error: ENOSPC and EDQUOT are [`StoreError::Full`].
    pub fn from_io(e: io::Error) -> Self {
        const ENOSPC: i32 = 28;
        const EDQUOT: i32 = 122;
        if e.kind() == io::ErrorKind::StorageFull
            || e.kind() == io::ErrorKind::QuotaExceeded
            || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
        {
            StoreError::Full(e.to_string())
        } else {
            StoreError::Io(Arc::new(e))
        }
    }

    /// Whether the caller should report busy and retry later rather than fail hard.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full(_))
    }
}

/// The durable queue. Backends: [`RedbStore`] (default) and, under feature `sled`, `SledStore`.
pub trait Store: Send + Sync + 'static {
    /// Applies the batch in one transaction and returns after it is durable (fsync).
    /// Each push with a dedup key whose entry exists and has not passed its expiry is NOT stored
    /// and gets Duplicate (also a duplicate of an earlier push in the same batch). A stored push
    /// records its dedup key with the item's expires_at_ms; the dedup entry outlives the item's
    /// removal (ack) until expires_at_ms. Removing a seq that is absent is not an error (idempotent).
    fn commit(&self, batch: &WriteBatch) -> Result<Vec<PushOutcome>, StoreError>;
    /// Up to `limit` items of `queue` with seq > after_seq, in seq order (after_seq = 0 for the head; seqs start at 1).
    fn read(&self, queue: &QueueKey, after_seq: u64, limit: usize)
    -> Result<Vec<Item>, StoreError>;
    /// Items whose expires_at_ms <= now_ms that are still queued, oldest expiry first, at most `limit`. Read-only.
    fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<Item>, StoreError>;
    /// Deletes dedup entries whose expiry passed; returns how many. Run periodically by the relay.
    fn prune_dedup(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError>;
    /// State of every non-empty or ever-used queue, for start-up recovery; one row per queue.
    fn recover(&self) -> Result<Vec<QueueState>, StoreError>;
    /// Gives disk space back after a drain where the engine can (redb compact); Ok(false) where it cannot.
    fn compact(&self) -> Result<bool, StoreError>;
    /// Bytes the store occupies on disk.
    fn disk_bytes(&self) -> Result<u64, StoreError>;
    /// Every metadata record whose key starts with `prefix`, in key order.
    fn meta_scan(&self, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, StoreError>;
}

/// Where and how to open a store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// A directory; created if absent. Each backend keeps its own file(s) inside.
    pub path: PathBuf,
    /// Cap of the engine's page cache, the bulk of the store's memory.
    pub cache_bytes: usize,
}

impl StoreConfig {
    /// Default page cache: enough for the hot heads and tails of the queues.
    pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

    /// A config for `path` with the default cache.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_bytes: Self::DEFAULT_CACHE_BYTES,
        }
    }
}

/// The storage engine behind a store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    #[default]
    Redb,
    #[cfg(feature = "sled")]
    Sled,
}

impl Backend {
    /// The name used in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Redb => "redb",
            #[cfg(feature = "sled")]
            Backend::Sled => "sled",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend name that is not known or not compiled in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseBackendError {
    #[error("unknown storage backend {0:?}; expected \"redb\" or \"sled\"")]
    Unknown(String),
    #[error(
        "storage backend \"sled\" is not compiled in; rebuild the relay with `--features sled`"
    )]
    NotCompiled,
}

impl FromStr for Backend {
    type Err = ParseBackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redb" => Ok(Backend::Redb),
            #[cfg(feature = "sled")]
            "sled" => Ok(Backend::Sled),
            #[cfg(not(feature = "sled"))]
            "sled" => Err(ParseBackendError::NotCompiled),
            other => Err(ParseBackendError::Unknown(other.to_owned())),
        }
    }
}

/// The file redb keeps in the store directory.
const REDB_FILE: &str = "queue.redb";
/// The directory sled keeps in the store directory.
const SLED_DIR: &str = "sled";

/// Opens (or creates) the store of `backend` in directory `cfg.path`.
pub fn open(backend: Backend, cfg: StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    std::fs::create_dir_all(&cfg.path).map_err(StoreError::from_io)?;
    // A directory holding the other backend's data would otherwise open as an empty store.
    let (theirs, other) = match backend {
        Backend::Redb => (SLED_DIR, "sled"),
        #[cfg(feature = "sled")]
        Backend::Sled => (REDB_FILE, "redb"),
    };
    let found = cfg.path.join(theirs);
    if found.exists() {
        return Err(StoreError::Backend(format!(
            "{} holds a {other} store but the relay is configured for {backend}; configure \
             {other} or point the relay at another directory",
            found.display()
        )));
    }
    match backend {
        Backend::Redb => Ok(Arc::new(RedbStore::open(
            &cfg.path.join(REDB_FILE),
            cfg.cache_bytes,
        )?)),
        #[cfg(feature = "sled")]
        Backend::Sled => Ok(Arc::new(SledStore::open(
            &cfg.path.join(SLED_DIR),
            cfg.cache_bytes,
        )?)),
    }
}

/// Milliseconds since the Unix epoch by the system clock: the time base of expiries.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_errors_are_full() {
        assert!(StoreError::from_io(io::Error::from_raw_os_error(28)).is_full());
        assert!(StoreError::from_io(io::Error::from_raw_os_error(122)).is_full());
        assert!(StoreError::from_io(io::ErrorKind::StorageFull.into()).is_full());
        let other = StoreError::from_io(io::ErrorKind::PermissionDenied.into());
        assert!(matches!(other, StoreError::Io(_)));
    }

    #[test]
    fn corrupt_error_says_how_to_recover() {
        let e = StoreError::Corrupt {
            path: "/var/lib/relay/queue.redb".into(),
            detail: "bad checksum".into(),
        };
        let text = e.to_string();
        assert!(text.contains("/var/lib/relay/queue.redb"), "{text}");
        assert!(text.contains("bad checksum"), "{text}");
        assert!(text.contains("move the file"), "{text}");
    }

    #[test]
    fn backend_names_parse() {
        assert_eq!("redb".parse::<Backend>(), Ok(Backend::Redb));
        assert_eq!(Backend::default(), Backend::Redb);
        assert!(matches!(
            "rocksdb".parse::<Backend>(),
            Err(ParseBackendError::Unknown(_))
        ));
        #[cfg(feature = "sled")]
        assert_eq!("sled".parse::<Backend>(), Ok(Backend::Sled));
        #[cfg(not(feature = "sled"))]
        {
            let e = "sled".parse::<Backend>().unwrap_err();
            assert_eq!(e, ParseBackendError::NotCompiled);
            assert!(e.to_string().contains("--features sled"));
        }
    }

    #[test]
    fn a_directory_of_the_other_backend_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(SLED_DIR)).unwrap();
        let e = open(Backend::Redb, StoreConfig::new(dir.path()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("holds a sled store"), "{e}");
    }
}

/// One test suite, run against every backend (`suite.rs`).
#[cfg(test)]
mod suite;
