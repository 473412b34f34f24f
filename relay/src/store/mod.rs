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

/// A batch applied atomically and durably by one commit: pushes in order, then removes.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    pub push: Vec<NewItem>,
    pub remove: Vec<(QueueKey, u64 /*seq*/)>,
}

impl WriteBatch {
    /// Whether the batch has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.push.is_empty() && self.remove.is_empty()
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

/// One test suite, run against every backend by `store_suite!`.
#[cfg(test)]
mod suite {
    use std::collections::HashSet;
    use std::path::Path;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    const HOUR: u64 = 3_600_000;

    pub(super) fn open_at(backend: Backend, dir: &Path) -> Arc<dyn Store> {
        let cfg = StoreConfig {
            path: dir.to_owned(),
            cache_bytes: 4 << 20,
        };
        open(backend, cfg).expect("open store")
    }

    fn q(dest: &str, lane: u8) -> QueueKey {
        QueueKey {
            dest: dest.into(),
            lane,
        }
    }

    fn later() -> u64 {
        unix_ms() + HOUR
    }

    fn item(queue: &QueueKey, seq: u64, expires_at_ms: u64, body: &[u8]) -> NewItem {
        NewItem {
            item: Item {
                queue: queue.clone(),
                seq,
                expires_at_ms,
                body: Bytes::copy_from_slice(body),
            },
            dedup: None,
        }
    }

    fn dedup_item(queue: &QueueKey, seq: u64, exp: u64, origin: &str, id: u8) -> NewItem {
        let mut new = item(queue, seq, exp, format!("{origin}:{id}").as_bytes());
        new.dedup = Some(DedupKey {
            origin: origin.into(),
            id: [id; 16],
        });
        new
    }

    fn pushes(push: Vec<NewItem>) -> WriteBatch {
        WriteBatch {
            push,
            remove: Vec::new(),
        }
    }

    fn removes(queue: &QueueKey, seqs: &[u64]) -> WriteBatch {
        WriteBatch {
            push: Vec::new(),
            remove: seqs.iter().map(|&s| (queue.clone(), s)).collect(),
        }
    }

    fn seqs(items: &[Item]) -> Vec<u64> {
        items.iter().map(|i| i.seq).collect()
    }

    fn state(store: &dyn Store, queue: &QueueKey) -> QueueState {
        store
            .recover()
            .unwrap()
            .into_iter()
            .find(|s| &s.queue == queue)
            .expect("queue in recover()")
    }

    fn stored(n: usize) -> Vec<PushOutcome> {
        vec![PushOutcome::Stored; n]
    }

    pub(super) fn fifo_per_queue_and_queues_independent(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let (a2, a3, b2) = (q("alpha", 2), q("alpha", 3), q("beta-1", 2));
        let exp = later();
        let mut batch = Vec::new();
        for seq in 1..=5 {
            batch.push(item(&a2, seq, exp, format!("a2-{seq}").as_bytes()));
            if seq <= 3 {
                batch.push(item(&b2, seq, exp, format!("b2-{seq}").as_bytes()));
            }
            if seq <= 2 {
                batch.push(item(&a3, seq, exp + seq, format!("a3-{seq}").as_bytes()));
            }
        }
        assert_eq!(store.commit(&pushes(batch)).unwrap(), stored(10));

        let got = store.read(&a2, 0, 100).unwrap();
        assert_eq!(seqs(&got), [1, 2, 3, 4, 5]);
        for it in &got {
            assert_eq!(it.queue, a2);
            assert_eq!(it.expires_at_ms, exp);
            assert_eq!(it.body, format!("a2-{}", it.seq).as_bytes());
        }
        assert_eq!(seqs(&store.read(&b2, 0, 100).unwrap()), [1, 2, 3]);
        let got = store.read(&a3, 0, 100).unwrap();
        assert_eq!(seqs(&got), [1, 2]);
        assert_eq!(got[1].expires_at_ms, exp + 2);
        assert_eq!(got[1].body, &b"a3-2"[..]);
        assert!(store.read(&q("alpha", 1), 0, 100).unwrap().is_empty());
        assert!(store.read(&q("gamma", 2), 0, 100).unwrap().is_empty());

        // Draining one queue leaves the others alone.
        store.commit(&removes(&a2, &[1, 2, 3, 4, 5])).unwrap();
        assert!(store.read(&a2, 0, 100).unwrap().is_empty());
        assert_eq!(seqs(&store.read(&b2, 0, 100).unwrap()), [1, 2, 3]);
        assert_eq!(seqs(&store.read(&a3, 0, 100).unwrap()), [1, 2]);
    }

    pub(super) fn read_pages_after_seq(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let queue = q("pager", 3);
        for chunk in (1..=25u64).collect::<Vec<_>>().chunks(9) {
            let batch = chunk
                .iter()
                .map(|&s| item(&queue, s, later(), b"x"))
                .collect();
            store.commit(&pushes(batch)).unwrap();
        }
        let mut after = 0;
        let mut pages = Vec::new();
        loop {
            let page = store.read(&queue, after, 10).unwrap();
            let Some(last) = page.last() else { break };
            after = last.seq;
            pages.push(seqs(&page));
        }
        let expected: Vec<Vec<u64>> =
            vec![(1..=10).collect(), (11..=20).collect(), (21..=25).collect()];
        assert_eq!(pages, expected);
        assert!(store.read(&queue, 0, 0).unwrap().is_empty());
        assert!(store.read(&queue, u64::MAX, 10).unwrap().is_empty());
        assert_eq!(seqs(&store.read(&queue, 24, 10).unwrap()), [25]);
    }

    pub(super) fn remove_then_read_and_idempotent(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let queue = q("acks", 2);
        let batch = (1..=5).map(|s| item(&queue, s, later(), b"0123")).collect();
        store.commit(&pushes(batch)).unwrap();

        store.commit(&removes(&queue, &[1, 2])).unwrap();
        assert_eq!(seqs(&store.read(&queue, 0, 10).unwrap()), [3, 4, 5]);

        // Absent seqs, repeated seqs and unknown queues are no-ops.
        let mut again = removes(&queue, &[2, 2, 9, 0]);
        again.remove.push((q("nobody", 1), 1));
        assert_eq!(store.commit(&again).unwrap(), []);
        let s = state(&*store, &queue);
        assert_eq!((s.count, s.bytes, s.head_seq, s.next_seq), (3, 12, 3, 6));
        assert!(store.read(&q("nobody", 1), 0, 10).unwrap().is_empty());

        // Out-of-order removal (an expiry in the middle) keeps FIFO for the rest.
        store.commit(&removes(&queue, &[4])).unwrap();
        assert_eq!(seqs(&store.read(&queue, 0, 10).unwrap()), [3, 5]);
        assert_eq!(state(&*store, &queue).count, 2);
    }

    pub(super) fn dedup_within_and_across_batches(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let queue = q("dest", 2);
        let exp = later();
        let first = store
            .commit(&pushes(vec![
                dedup_item(&queue, 1, exp, "origin-a", 1),
                dedup_item(&queue, 2, exp + 10, "origin-a", 1),
                dedup_item(&queue, 3, exp, "origin-a", 2),
                // The same id from another origin is another message.
                dedup_item(&queue, 4, exp, "origin-b", 1),
            ]))
            .unwrap();
        let dup = PushOutcome::Duplicate { expires_at_ms: exp };
        use PushOutcome::Stored;
        assert_eq!(first, [Stored, dup, Stored, Stored]);

        let second = store
            .commit(&pushes(vec![
                dedup_item(&queue, 5, exp + 99, "origin-a", 2),
                dedup_item(&queue, 6, exp, "origin-a", 3),
            ]))
            .unwrap();
        assert_eq!(second, [dup, Stored]);
        assert_eq!(seqs(&store.read(&queue, 0, 10).unwrap()), [1, 3, 4, 6]);
        let s = state(&*store, &queue);
        assert_eq!((s.count, s.next_seq), (4, 7));
    }

    pub(super) fn dedup_survives_removal(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let queue = q("dest", 2);
        let exp = later();
        store
            .commit(&pushes(vec![dedup_item(&queue, 1, exp, "origin", 7)]))
            .unwrap();
        store.commit(&removes(&queue, &[1])).unwrap();
        let again = store
            .commit(&pushes(vec![dedup_item(&queue, 2, exp + 5, "origin", 7)]))
            .unwrap();
        assert_eq!(again, [PushOutcome::Duplicate { expires_at_ms: exp }]);
        assert!(store.read(&queue, 0, 10).unwrap().is_empty());
        // Pruning before the expiry keeps the entry.
        assert_eq!(store.prune_dedup(unix_ms(), 100).unwrap(), 0);
        let third = store
            .commit(&pushes(vec![dedup_item(&queue, 3, exp, "origin", 7)]))
            .unwrap();
        assert_eq!(third, [PushOutcome::Duplicate { expires_at_ms: exp }]);
    }

    pub(super) fn dedup_forgotten_after_expiry_and_prune(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let queue = q("dest", 1);
        let now = unix_ms();
        use PushOutcome::Stored;
        let out = store
            .commit(&pushes(vec![
                dedup_item(&queue, 1, now - 2_000, "origin", 1),
                dedup_item(&queue, 2, now - 1_000, "origin", 2),
                dedup_item(&queue, 3, now + HOUR, "origin", 3),
            ]))
            .unwrap();
        assert_eq!(out, [Stored, Stored, Stored]);
        store.commit(&removes(&queue, &[1, 2, 3])).unwrap();

        assert_eq!(store.prune_dedup(now, 1).unwrap(), 1);
        assert_eq!(store.prune_dedup(now, 100).unwrap(), 1);
        assert_eq!(store.prune_dedup(now, 100).unwrap(), 0);
        let out = store
            .commit(&pushes(vec![
                dedup_item(&queue, 4, now + HOUR, "origin", 1),
                dedup_item(&queue, 5, now + HOUR, "origin", 2),
                dedup_item(&queue, 6, now + HOUR, "origin", 3),
            ]))
            .unwrap();
        let live = PushOutcome::Duplicate {
            expires_at_ms: now + HOUR,
        };
        assert_eq!(out, [Stored, Stored, live]);

        // An entry past its expiry no longer dedups even before a prune, and the prune then
        // must not delete the live entry that replaced it.
        store
            .commit(&pushes(vec![dedup_item(&queue, 7, now - 10, "origin", 9)]))
            .unwrap();
        let out = store
            .commit(&pushes(vec![dedup_item(
                &queue,
                8,
                now + HOUR,
                "origin",
                9,
            )]))
            .unwrap();
        assert_eq!(out, [Stored]);
        assert_eq!(store.prune_dedup(now, 100).unwrap(), 0);
        let out = store
            .commit(&pushes(vec![dedup_item(
                &queue,
                9,
                now + HOUR,
                "origin",
                9,
            )]))
            .unwrap();
        assert_eq!(out, [live]);
    }

    pub(super) fn expired_lists_queued_items_oldest_first(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let (a, b) = (q("alpha", 1), q("beta", 3));
        let t = unix_ms();
        store
            .commit(&pushes(vec![
                item(&a, 1, t + 300, b"a1"),
                item(&a, 2, t + 100, b"a2"),
                item(&b, 1, t + 200, b"b1"),
                item(&b, 2, t + HOUR, b"b2"),
            ]))
            .unwrap();
        assert!(store.expired(t + 99, 10).unwrap().is_empty());
        let due = store.expired(t + 300, 10).unwrap();
        let got: Vec<_> = due.iter().map(|i| (i.queue.clone(), i.seq)).collect();
        assert_eq!(got, [(a.clone(), 2), (b.clone(), 1), (a.clone(), 1)]);
        assert_eq!(due[1].body, &b"b1"[..]);
        assert_eq!(due[1].expires_at_ms, t + 200);
        assert_eq!(seqs(&store.expired(t + 300, 2).unwrap()), [2, 1]);
        assert!(store.expired(t + 300, 0).unwrap().is_empty());

        // Removed (acked) items are no longer listed.
        store.commit(&removes(&b, &[1])).unwrap();
        let due = store.expired(t + 300, 10).unwrap();
        let got: Vec<_> = due.iter().map(|i| (i.queue.clone(), i.seq)).collect();
        assert_eq!(got, [(a.clone(), 2), (a.clone(), 1)]);
        assert_eq!(store.expired(u64::MAX, 10).unwrap().len(), 3);
    }

    pub(super) fn expiry_removal_and_notice_commit_together(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let (dest, origin) = (q("dest", 2), q("origin", 1));
        let t = unix_ms();
        let batch = (1..=3)
            .map(|s| dedup_item(&dest, s, t + 10, "origin", s as u8))
            .collect();
        store.commit(&pushes(batch)).unwrap();
        let due = store.expired(t + 10, 100).unwrap();
        assert_eq!(due.len(), 3);

        let expire = |notice_dest: &str| WriteBatch {
            push: vec![item(&q(notice_dest, 1), 1, t + HOUR, b"expired 1,2,3")],
            remove: due.iter().map(|i| (i.queue.clone(), i.seq)).collect(),
        };
        // A batch that fails applies none of it: the items stay due.
        assert!(matches!(
            store.commit(&expire("NOT VALID")),
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(store.expired(t + 10, 100).unwrap().len(), 3);

        assert_eq!(store.commit(&expire("origin")).unwrap(), stored(1));
        let check = |store: &dyn Store| {
            assert!(store.expired(t + 10, 100).unwrap().is_empty());
            assert!(store.read(&dest, 0, 10).unwrap().is_empty());
            let notice = store.read(&origin, 0, 10).unwrap();
            assert_eq!(notice.len(), 1);
            assert_eq!(notice[0].body, &b"expired 1,2,3"[..]);
            assert_eq!(state(store, &dest).count, 0);
            assert_eq!(state(store, &origin).count, 1);
        };
        check(&*store);
        drop(store);
        check(&*open_at(backend, dir.path()));
    }

    pub(super) fn recover_counts_and_survives_reopen(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        assert!(store.recover().unwrap().is_empty());
        let (a, b) = (q("alpha", 2), q("beta", 2));
        let mut batch: Vec<_> = (1..=4).map(|s| item(&a, s, later(), &[7; 10])).collect();
        batch.extend((1..=2).map(|s| item(&b, s, later(), b"abc")));
        store.commit(&pushes(batch)).unwrap();
        store.commit(&removes(&a, &[1, 3])).unwrap();
        store.commit(&removes(&b, &[1, 2])).unwrap();

        let expected = vec![
            QueueState {
                queue: a.clone(),
                count: 2,
                bytes: 20,
                head_seq: 2,
                next_seq: 5,
            },
            QueueState {
                queue: b.clone(),
                count: 0,
                bytes: 0,
                head_seq: 3,
                next_seq: 3,
            },
        ];
        let sorted = |store: &dyn Store| {
            let mut states = store.recover().unwrap();
            states.sort_by(|x, y| x.queue.cmp(&y.queue));
            states
        };
        assert_eq!(sorted(&*store), expected);

        // Dropped without any close, as after a crash of the process.
        drop(store);
        let store = open_at(backend, dir.path());
        assert_eq!(sorted(&*store), expected);
        assert_eq!(seqs(&store.read(&a, 0, 10).unwrap()), [2, 4]);
        store
            .commit(&pushes(vec![item(&a, 5, later(), b"fifth")]))
            .unwrap();
        let s = state(&*store, &a);
        assert_eq!((s.count, s.bytes, s.head_seq, s.next_seq), (3, 25, 2, 6));
    }

    pub(super) fn every_commit_survives_reopen(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let queue = q("durable", 3);
        {
            let store = open_at(backend, dir.path());
            for seq in 1..=50u64 {
                let mut batch = pushes(vec![dedup_item(&queue, seq, later(), "o", seq as u8)]);
                if seq % 2 == 0 {
                    batch.remove.push((queue.clone(), seq - 1));
                }
                store.commit(&batch).unwrap();
            }
        }
        let store = open_at(backend, dir.path());
        let expected: Vec<u64> = (2..=50).step_by(2).collect();
        assert_eq!(seqs(&store.read(&queue, 0, 100).unwrap()), expected);
        let out = store
            .commit(&pushes(vec![dedup_item(&queue, 51, later(), "o", 1)]))
            .unwrap();
        assert!(matches!(out[..], [PushOutcome::Duplicate { .. }]));
        // One process at a time: a second open of the same store is refused.
        assert!(matches!(
            open(backend, StoreConfig::new(dir.path())),
            Err(StoreError::Locked { .. })
        ));
    }

    pub(super) fn compact_keeps_items_and_returns_space(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let (surge, kept) = (q("surge", 3), q("kept", 2));
        store
            .commit(&pushes(vec![item(&kept, 1, later(), b"survivor")]))
            .unwrap();
        let body = vec![0x5a; 4096];
        for chunk in (1..=3000u64).collect::<Vec<_>>().chunks(500) {
            let batch = chunk
                .iter()
                .map(|&s| item(&surge, s, later(), &body))
                .collect();
            store.commit(&pushes(batch)).unwrap();
        }
        let full = store.disk_bytes().unwrap();
        assert!(full > 3000 * 4096, "disk_bytes {full}");
        for chunk in (1..=3000u64).collect::<Vec<_>>().chunks(500) {
            store.commit(&removes(&surge, chunk)).unwrap();
        }
        let compacted = store.compact().unwrap();
        if compacted {
            let after = store.disk_bytes().unwrap();
            assert!(
                after < full / 4,
                "{after} bytes after compaction, {full} before"
            );
        }
        assert_eq!(store.read(&kept, 0, 10).unwrap()[0].body, &b"survivor"[..]);
        assert!(store.read(&surge, 0, 10).unwrap().is_empty());
        let s = state(&*store, &surge);
        assert_eq!((s.count, s.bytes, s.next_seq), (0, 0, 3001));
        store
            .commit(&pushes(vec![item(&kept, 2, later(), b"after")]))
            .unwrap();
        drop(store);
        let store = open_at(backend, dir.path());
        assert_eq!(seqs(&store.read(&kept, 0, 10).unwrap()), [1, 2]);
    }

    pub(super) fn compact_supported(backend: Backend) -> bool {
        let dir = tempfile::tempdir().unwrap();
        open_at(backend, dir.path()).compact().unwrap()
    }

    /// Every regular file under `path` (or `path` itself).
    fn files_under(path: &Path) -> Vec<std::path::PathBuf> {
        if path.is_file() {
            return vec![path.to_owned()];
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(path).unwrap() {
            out.extend(files_under(&entry.unwrap().path()));
        }
        out
    }

    fn store_with_data(backend: Backend, dir: &Path) -> std::path::PathBuf {
        let store = open_at(backend, dir);
        let queue = q("dest", 2);
        let batch = (1..=100)
            .map(|s| item(&queue, s, later(), &[1; 300]))
            .collect();
        store.commit(&pushes(batch)).unwrap();
        drop(store);
        let entries: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
        assert_eq!(entries.len(), 1, "one data file or directory per store");
        entries.into_iter().next().unwrap().unwrap().path()
    }

    fn assert_corrupt(backend: Backend, dir: &Path, case: &str) {
        match open(backend, StoreConfig::new(dir)) {
            Err(e @ StoreError::Corrupt { .. }) => {
                assert!(e.to_string().contains("move the file"), "{case}: {e}");
            }
            Err(e) => panic!("{case}: expected Corrupt, got {e:?}"),
            Ok(_) => panic!("{case}: a damaged store opened"),
        }
    }

    pub(super) fn corrupt_files_are_refused(backend: Backend) {
        // Garbage over every byte.
        let dir = tempfile::tempdir().unwrap();
        let data = store_with_data(backend, dir.path());
        for file in files_under(&data) {
            let len = std::fs::metadata(&file).unwrap().len() as usize;
            let garbage: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
            std::fs::write(&file, garbage).unwrap();
        }
        assert_corrupt(backend, dir.path(), "garbage");

        // Truncated to nothing.
        let dir = tempfile::tempdir().unwrap();
        let data = store_with_data(backend, dir.path());
        for file in files_under(&data) {
            std::fs::File::options()
                .write(true)
                .open(&file)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
        assert_corrupt(backend, dir.path(), "emptied");
    }

    pub(super) fn truncated_file_is_refused_or_intact(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let data = store_with_data(backend, dir.path());
        let file = files_under(&data)
            .into_iter()
            .max_by_key(|f| std::fs::metadata(f).unwrap().len())
            .unwrap();
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        match open(backend, StoreConfig::new(dir.path())) {
            Err(StoreError::Corrupt { .. }) => {}
            Err(e) => panic!("expected Corrupt, got {e:?}"),
            // Opening is acceptable only if nothing was lost.
            Ok(store) => {
                assert_eq!(store.read(&q("dest", 2), 0, 1000).unwrap().len(), 100)
            }
        }
    }

    pub(super) fn invalid_requests_change_nothing(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let good = q("good", 1);
        let bad_batches = [
            pushes(vec![
                item(&good, 1, later(), b"ok"),
                item(&q("", 1), 1, later(), b""),
            ]),
            pushes(vec![item(&q("Upper", 1), 1, later(), b"")]),
            pushes(vec![item(&q(&"x".repeat(33), 1), 1, later(), b"")]),
            pushes(vec![item(&q("a_b", 1), 1, later(), b"")]),
            pushes(vec![item(&good, 0, later(), b"seq 0")]),
            pushes(vec![dedup_item(&good, 1, later(), "Bad Origin", 1)]),
            removes(&q("bad/dest", 1), &[1]),
        ];
        for batch in &bad_batches {
            assert!(
                matches!(store.commit(batch), Err(StoreError::Invalid(_))),
                "{batch:?}"
            );
        }
        assert!(store.recover().unwrap().is_empty());
        assert_eq!(store.commit(&WriteBatch::default()).unwrap(), []);
        let longest = q(&"z".repeat(32), 255);
        store
            .commit(&pushes(vec![item(
                &longest,
                u64::MAX - 1,
                u64::MAX,
                b"edge",
            )]))
            .unwrap();
        assert_eq!(seqs(&store.read(&longest, 0, 10).unwrap()), [u64::MAX - 1]);
        assert_eq!(state(&*store, &longest).next_seq, u64::MAX);
    }

    /// Holds the first commit until released, so that requests pile up behind it.
    struct GatedStore {
        inner: Arc<dyn Store>,
        gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        entered: tokio::sync::mpsc::UnboundedSender<()>,
    }

    impl Store for GatedStore {
        fn commit(&self, batch: &WriteBatch) -> Result<Vec<PushOutcome>, StoreError> {
            let gate = self.gate.lock().unwrap().take();
            if let Some(gate) = gate {
                self.entered.send(()).unwrap();
                gate.recv().unwrap();
            }
            self.inner.commit(batch)
        }
        fn read(&self, q: &QueueKey, after: u64, limit: usize) -> Result<Vec<Item>, StoreError> {
            self.inner.read(q, after, limit)
        }
        fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<Item>, StoreError> {
            self.inner.expired(now_ms, limit)
        }
        fn prune_dedup(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
            self.inner.prune_dedup(now_ms, limit)
        }
        fn recover(&self) -> Result<Vec<QueueState>, StoreError> {
            self.inner.recover()
        }
        fn compact(&self) -> Result<bool, StoreError> {
            self.inner.compact()
        }
        fn disk_bytes(&self) -> Result<u64, StoreError> {
            self.inner.disk_bytes()
        }
    }

    const WAIT: Duration = Duration::from_secs(20);

    pub(super) async fn writer_merges_pending_requests(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let inner = open_at(backend, dir.path());
        let (release, gate) = std::sync::mpsc::channel();
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let store = Arc::new(GatedStore {
            inner: inner.clone(),
            gate: Mutex::new(Some(gate)),
            entered: entered_tx,
        });
        let (writer, thread) = Writer::spawn(store, 64);

        // Each request: a push, a duplicate of it, another push.
        let request = |i: usize| {
            let queue = q(&format!("peer-{i}"), 2);
            pushes(vec![
                dedup_item(&queue, 1, later(), "origin", i as u8),
                dedup_item(&queue, 2, later(), "origin", i as u8),
                item(&queue, 3, later(), b"plain"),
            ])
        };
        let first = tokio::spawn({
            let writer = writer.clone();
            let batch = request(0);
            async move { writer.commit(batch).await }
        });
        tokio::time::timeout(WAIT, entered.recv())
            .await
            .expect("first commit started");
        const REQUESTS: usize = 40;
        let mut tasks = vec![first];
        for i in 1..REQUESTS {
            let writer = writer.clone();
            let batch = request(i);
            tasks.push(tokio::spawn(async move { writer.commit(batch).await }));
        }
        tokio::time::timeout(WAIT, async {
            while writer.queued() < REQUESTS - 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("requests queued behind the first commit");
        release.send(()).unwrap();

        let dup_of_first = |outcome: &PushOutcome| matches!(outcome, PushOutcome::Duplicate { .. });
        for task in tasks {
            let outcomes = task.await.unwrap().unwrap();
            assert_eq!(outcomes.len(), 3);
            assert_eq!(outcomes[0], PushOutcome::Stored);
            assert!(dup_of_first(&outcomes[1]), "{outcomes:?}");
            assert_eq!(outcomes[2], PushOutcome::Stored);
        }
        let stats = writer.stats();
        assert_eq!(stats.commits, 2, "{stats:?}");
        assert_eq!(stats.requests, REQUESTS as u64);
        assert_eq!(stats.items, 3 * REQUESTS as u64);
        assert_eq!(stats.last_commit_items, 3 * (REQUESTS as u64 - 1));
        for i in 0..REQUESTS {
            let got = inner.read(&q(&format!("peer-{i}"), 2), 0, 10).unwrap();
            assert_eq!(seqs(&got), [1, 3]);
        }
        drop(writer);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    pub(super) async fn writer_serves_concurrent_tasks(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(backend, dir.path());
        let (writer, thread) = Writer::spawn(store.clone(), 8);
        const TASKS: usize = 6;
        const COMMITS: u64 = 40;
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let writer = writer.clone();
            tasks.push(tokio::spawn(async move {
                let queue = q(&format!("task-{t}"), 1);
                let mut seen = HashSet::new();
                for seq in 1..=COMMITS {
                    // Every task pushes one item per commit, acks the previous one and
                    // repeats one dedup id per task, so outcomes are per request.
                    let mut batch = pushes(vec![
                        dedup_item(&queue, seq, later(), &format!("o{t}"), seq as u8),
                        dedup_item(&queue, seq + 1000, later(), &format!("o{t}"), 0),
                    ]);
                    batch.remove.push((queue.clone(), seq - 1));
                    let out = writer.commit(batch).await.unwrap();
                    assert_eq!(out[0], PushOutcome::Stored);
                    seen.insert(out[1]);
                }
                seen
            }));
        }
        for task in tasks {
            let seen = task.await.unwrap();
            // The id-0 push is stored once per task, a duplicate afterwards.
            assert_eq!(seen.len(), 2, "{seen:?}");
        }
        for t in 0..TASKS {
            let got = store.read(&q(&format!("task-{t}"), 1), 0, 10).unwrap();
            assert_eq!(seqs(&got), [COMMITS, 1001]);
        }
        let stats = writer.stats();
        assert_eq!(stats.requests, TASKS as u64 * COMMITS);
        assert!(stats.commits <= stats.requests, "{stats:?}");
        assert_eq!(stats.failed_commits, 0);
        drop(writer);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }
}

/// Runs the whole suite against one backend: `store_suite!(module_name, Backend::X)`.
#[cfg(test)]
macro_rules! store_suite {
    ($name:ident, $backend:expr) => {
        mod $name {
            use super::suite;

            #[test]
            fn fifo_per_queue_and_queues_independent() {
                suite::fifo_per_queue_and_queues_independent($backend);
            }
            #[test]
            fn read_pages_after_seq() {
                suite::read_pages_after_seq($backend);
            }
            #[test]
            fn remove_then_read_and_idempotent() {
                suite::remove_then_read_and_idempotent($backend);
            }
            #[test]
            fn dedup_within_and_across_batches() {
                suite::dedup_within_and_across_batches($backend);
            }
            #[test]
            fn dedup_survives_removal() {
                suite::dedup_survives_removal($backend);
            }
            #[test]
            fn dedup_forgotten_after_expiry_and_prune() {
                suite::dedup_forgotten_after_expiry_and_prune($backend);
            }
            #[test]
            fn expired_lists_queued_items_oldest_first() {
                suite::expired_lists_queued_items_oldest_first($backend);
            }
            #[test]
            fn expiry_removal_and_notice_commit_together() {
                suite::expiry_removal_and_notice_commit_together($backend);
            }
            #[test]
            fn recover_counts_and_survives_reopen() {
                suite::recover_counts_and_survives_reopen($backend);
            }
            #[test]
            fn every_commit_survives_reopen() {
                suite::every_commit_survives_reopen($backend);
            }
            #[test]
            fn compact_keeps_items_and_returns_space() {
                suite::compact_keeps_items_and_returns_space($backend);
            }
            #[test]
            fn corrupt_files_are_refused() {
                suite::corrupt_files_are_refused($backend);
            }
            #[test]
            fn truncated_file_is_refused_or_intact() {
                suite::truncated_file_is_refused_or_intact($backend);
            }
            #[test]
            fn invalid_requests_change_nothing() {
                suite::invalid_requests_change_nothing($backend);
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn writer_merges_pending_requests() {
                suite::writer_merges_pending_requests($backend).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn writer_serves_concurrent_tasks() {
                suite::writer_serves_concurrent_tasks($backend).await;
            }
        }
    };
}

#[cfg(test)]
store_suite!(redb_suite, super::Backend::Redb);

#[cfg(test)]
#[test]
fn redb_compacts() {
    assert!(suite::compact_supported(Backend::Redb));
}

#[cfg(all(test, feature = "sled"))]
store_suite!(sled_suite, super::Backend::Sled);

#[cfg(all(test, feature = "sled"))]
#[test]
fn sled_cannot_compact() {
    assert!(!suite::compact_supported(Backend::Sled));
}
