//! The store's one writer: a dedicated thread that group-commits.
//!
//! Tasks send write requests over a bounded channel and await the answer. The thread takes
//! every request pending, merges them into one [`WriteBatch`], commits it (one transaction,
//! one fsync) and answers each waiter with its own outcomes. The more requests arrive during
//! an fsync, the more the next commit carries, so throughput grows with load while a lone
//! request still commits at once. A full channel is the backpressure: `commit` waits.
//!
//! Dropping a `commit` future does not cancel its write: once sent, the request is committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{PushOutcome, Store, StoreError, WriteBatch};

/// Most pushes merged into one transaction, which bounds the memory a commit holds.
pub const MAX_PUSHES_PER_COMMIT: usize = 8192;

type Reply = oneshot::Sender<Result<Vec<PushOutcome>, StoreError>>;

struct Request {
    batch: WriteBatch,
    /// `batch.push.len()` before the merge took the pushes: how many outcomes are ours.
    pushes: usize,
    reply: Reply,
}

/// Handle to the writer thread; clone it freely. The thread ends when every handle is dropped.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    failed_commits: AtomicU64,
    requests: AtomicU64,
    items: AtomicU64,
    last_commit_items: AtomicU64,
    last_commit_micros: AtomicU64,
}

/// Counters of the writer since it started, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed, successfully or not.
    pub commits: u64,
    /// Of those, the ones that failed.
    pub failed_commits: u64,
    /// Requests answered.
    pub requests: u64,
    /// Pushes and removes committed; `items / commits` is the mean group size.
    pub items: u64,
    /// Pushes and removes of the last commit.
    pub last_commit_items: u64,
    /// How long the last commit took, fsync included.
    pub last_commit: Duration,
}

impl Writer {
    /// Starts the writer thread over `store`, with room for `queue_capacity` waiting requests.
    pub fn spawn(store: Arc<dyn Store>, queue_capacity: usize) -> (Writer, JoinHandle<()>) {
        Self::spawn_with_limit(store, queue_capacity, MAX_PUSHES_PER_COMMIT)
    }

    /// Like [`Writer::spawn`], merging at most `max_pushes` pushes per transaction.
    pub fn spawn_with_limit(
        store: Arc<dyn Store>,
        queue_capacity: usize,
        max_pushes: usize,
    ) -> (Writer, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let thread_counters = counters.clone();
        let handle = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(&*store, rx, &thread_counters, max_pushes.max(1)))
            .expect("spawning the store writer thread");
        (Writer { tx, counters }, handle)
    }

    /// Commits `batch` durably, grouped with whatever else is pending; one outcome per push.
    pub async fn commit(&self, batch: WriteBatch) -> Result<Vec<PushOutcome>, StoreError> {
        self.submit(batch)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Queues `batch` and returns at once with the receiver of its outcome; waits only while
    /// the channel is full. Batches submitted one after another by one task commit in that
    /// order, which lets the router make items deliverable in sequence order.
    pub async fn submit(
        &self,
        batch: WriteBatch,
    ) -> Result<oneshot::Receiver<Result<Vec<PushOutcome>, StoreError>>, StoreError> {
        batch.validate()?;
        let (reply, answer) = oneshot::channel();
        if batch.is_empty() {
            let _ = reply.send(Ok(Vec::new()));
            return Ok(answer);
        }
        let pushes = batch.push.len();
        self.tx
            .send(Request {
                batch,
                pushes,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(answer)
    }

    /// Requests waiting in the channel for the writer.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> WriterStats {
        let c = &self.counters;
        WriterStats {
            commits: c.commits.load(Ordering::Relaxed),
            failed_commits: c.failed_commits.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            items: c.items.load(Ordering::Relaxed),
            last_commit_items: c.last_commit_items.load(Ordering::Relaxed),
            last_commit: Duration::from_micros(c.last_commit_micros.load(Ordering::Relaxed)),
        }
    }
}

fn run(store: &dyn Store, mut rx: mpsc::Receiver<Request>, counters: &Counters, max_pushes: usize) {
    // A request that would have overflowed the previous group opens the next one.
    let mut carried: Option<Request> = None;
    let mut group = Vec::new();
    loop {
        let first = match carried.take() {
            Some(request) => request,
            None => match rx.blocking_recv() {
                Some(request) => request,
                None => return,
            },
        };
        let mut pushes = first.pushes;
        group.push(first);
        while pushes < max_pushes {
            match rx.try_recv() {
                Ok(request) if pushes + request.pushes > max_pushes => {
                    carried = Some(request);
                    break;
                }
                Ok(request) => {
                    pushes += request.pushes;
                    group.push(request);
                }
                Err(_) => break,
            }
        }
        commit_group(store, &mut group, counters);
    }
}

/// Commits the requests of `group` as one batch and answers each; leaves `group` empty.
fn commit_group(store: &dyn Store, group: &mut Vec<Request>, counters: &Counters) {
    let mut merged;
    let batch = if let [only] = group.as_slice() {
        &only.batch
    } else {
        merged = WriteBatch::default();
        merged.push.reserve(group.iter().map(|r| r.pushes).sum());
        for request in group.iter_mut() {
            merged.push.append(&mut request.batch.push);
            merged.remove.append(&mut request.batch.remove);
        }
        &merged
    };
    let items = (batch.push.len() + batch.remove.len()) as u64;
    let started = Instant::now();
    let result = store.commit(batch);
    counters
        .last_commit_micros
        .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    counters.commits.fetch_add(1, Ordering::Relaxed);
    counters.last_commit_items.store(items, Ordering::Relaxed);
    match result {
        Ok(outcomes) => {
            counters.items.fetch_add(items, Ordering::Relaxed);
            let mut outcomes = outcomes.into_iter();
            for request in group.drain(..) {
                let mine = outcomes.by_ref().take(request.pushes).collect();
                answer(counters, request.reply, Ok(mine));
            }
        }
        Err(e) => {
            counters.failed_commits.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, requests = group.len(), "store commit failed");
            for request in group.drain(..) {
                answer(counters, request.reply, Err(e.clone()));
            }
        }
    }
}

fn answer(counters: &Counters, reply: Reply, result: Result<Vec<PushOutcome>, StoreError>) {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    // A waiter that gave up has nothing to hear; its write stands.
    let _ = reply.send(result);
}
