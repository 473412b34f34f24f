//! The router: the one owner of queue state (what is queued for whom, what is in flight on
//! which session, quotas), run as a single task that sessions talk to over a bounded channel.
//! No lock is held on the hot path, and every decision about a queue is made in one place.
//!
//! Custody: an ingest is answered only after the store's writer committed it (fsync). Commits
//! are submitted to the writer in order and their completions are processed in that same
//! order, so a queue's items become deliverable in sequence order.
//!
//! Memory: each queue keeps at most [`BUFFER_CAP`] items in memory; beyond that items stay on
//! disk and are read back in batches as sessions have room, so a queue of ten million costs
//! the same memory as a queue of ten thousand.

mod campaigns;

pub use campaigns::{CampaignRequest, CampaignView};
use campaigns::{bulk_info_of, load_campaigns};

use crate::campaign::{self, Campaign, CampaignId, CampaignRecord, ChunkRecord, RecipientBucket};
use crate::config::{Campaigns, Quota};
use crate::metrics::Metrics;
use crate::record::{self, Header, RecordKind};
use crate::registry::RegistryWatch;
use crate::store::{
    DedupKey, Item, NewItem, PushOutcome, QueueKey, Store, StoreError, WriteBatch, Writer,
};
use bytes::Bytes;
use federation_spec::lane::{self, LANES};
use federation_spec::proto::frame::Kind;
use federation_spec::proto::{
    CampaignAck, CampaignStatus, ErrorCode, Expired, Frame, Lane, Rejected,
};
use futures_util::stream::{FuturesOrdered, StreamExt};
use prost::Message;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

/// Items of one queue kept in memory, ready to hand out.
pub const BUFFER_CAP: usize = 4096;
/// Items read from disk at once when a queue's buffer runs dry.
const LOAD_BATCH: usize = 1024;
/// Expired items handled per tick.
const EXPIRE_BATCH: usize = 4096;
/// How long past its expiry a delivered but un-acked item waits for its ack before the relay
/// reports it expired anyway.
const IN_FLIGHT_GRACE_MS: u64 = 10_000;
/// Acked items whose removal is committed together, at the latest after [`ACK_FLUSH`].
const ACK_BATCH: usize = 4096;
/// The longest an acked item waits for its removal commit.
const ACK_FLUSH: Duration = Duration::from_millis(5);
/// How long a peer told "busy" should wait.
pub const BUSY_RETRY_MS: u32 = 1000;
/// Dedup entries pruned per housekeeping round (every 10 s).
const PRUNE_BATCH: usize = 500_000;
/// Compact at most this often, and only with every queue empty.
const COMPACT_EVERY: Duration = Duration::from_secs(60);
/// Over the disk quota, compaction is tried at most this often.
const COMPACT_OVER_QUOTA_EVERY: Duration = Duration::from_secs(10);
/// Compaction is worth it only above this file size.
const COMPACT_ABOVE_BYTES: u64 = 64 << 20;
/// How often destinations held back by their bulk rate are tried again.
const BULK_TICK: Duration = Duration::from_millis(20);
/// The largest receive window a session may have.
pub const MAX_WINDOW: u32 = 65_536;

/// A session's id, unique in this process.
pub type SessionId = u64;

/// One message (or receipt) to store and deliver.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Destination peer id.
    pub dest: String,
    /// Its lane.
    pub lane: Lane,
    /// When it expires.
    pub expires_at_ms: u64,
    /// Its dedup identity.
    pub dedup: Option<DedupKey>,
    /// The stored body (see [`record`]).
    pub body: Bytes,
}

/// What became of one incoming item.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestOutcome {
    /// Durable (or a duplicate of a durable one).
    Accepted {
        /// Its expiry.
        expires_at_ms: u64,
        /// It was already there.
        duplicate: bool,
    },
    /// The destination's quota or the disk is full.
    Busy {
        /// How long to wait.
        retry_after_ms: u32,
    },
    /// The store failed.
    Failed(String),
}

/// A frame for a session to send.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The lane stream to send it on; None for the control stream.
    pub lane: Option<Lane>,
    /// The encoded frame.
    pub frame: Bytes,
}

/// Router state as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueSnapshot {
    /// Destination peer.
    pub dest: String,
    /// Lane name.
    pub lane: &'static str,
    /// Items durable in the store.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Items handed to sessions, not yet acked.
    pub in_flight: usize,
    /// Items held in memory, ready to hand out.
    pub buffered: usize,
}

enum Command {
    Ingest {
        items: Vec<Incoming>,
        reply: oneshot::Sender<Vec<IngestOutcome>>,
    },
    Attach {
        session: SessionId,
        peer: String,
        tx: mpsc::Sender<Delivery>,
        window: u32,
    },
    Detach {
        session: SessionId,
    },
    Ack {
        session: SessionId,
        tags: Vec<u64>,
    },
    Window {
        session: SessionId,
        window: u32,
    },
    Snapshot {
        reply: oneshot::Sender<Vec<QueueSnapshot>>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
    Campaign {
        peer: String,
        request: CampaignRequest,
        reply: oneshot::Sender<Kind>,
    },
    Campaigns {
        id: Option<CampaignId>,
        reply: oneshot::Sender<Vec<CampaignView>>,
    },
}

/// A cheap handle to the router task.
#[derive(Clone)]
pub struct RouterHandle {
    tx: mpsc::Sender<Command>,
}

/// The router is gone (the relay is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("router stopped")]
pub struct RouterGone;

impl RouterHandle {
    /// Stores `items` durably; the answer comes once they are committed.
    pub async fn ingest(
        &self,
        items: Vec<Incoming>,
    ) -> Result<oneshot::Receiver<Vec<IngestOutcome>>, RouterGone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Ingest { items, reply })
            .await
            .map_err(|_| RouterGone)?;
        Ok(rx)
    }

    /// Registers a session of `peer` that can hold `window` un-acked deliveries.
    pub async fn attach(
        &self,
        session: SessionId,
        peer: String,
        tx: mpsc::Sender<Delivery>,
        window: u32,
    ) -> Result<(), RouterGone> {
        self.tx
            .send(Command::Attach {
                session,
                peer,
                tx,
                window,
            })
            .await
            .map_err(|_| RouterGone)
    }

    /// The session ended: what it had in flight is delivered again elsewhere.
    pub async fn detach(&self, session: SessionId) {
        let _ = self.tx.send(Command::Detach { session }).await;
    }

    /// The session's peer took custody of these deliveries.
    pub async fn ack(&self, session: SessionId, tags: Vec<u64>) -> Result<(), RouterGone> {
        self.tx
            .send(Command::Ack { session, tags })
            .await
            .map_err(|_| RouterGone)
    }

    /// The session's receive window changed.
    pub async fn window(&self, session: SessionId, window: u32) -> Result<(), RouterGone> {
        self.tx
            .send(Command::Window { session, window })
            .await
            .map_err(|_| RouterGone)
    }

    /// Every queue's state.
    pub async fn snapshot(&self) -> Result<Vec<QueueSnapshot>, RouterGone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Snapshot { reply })
            .await
            .map_err(|_| RouterGone)?;
        rx.await.map_err(|_| RouterGone)
    }

    /// Hands a broadcaster's campaign frame to the router; the answer is the frame to send back.
    pub async fn campaign(
        &self,
        peer: String,
        request: CampaignRequest,
    ) -> Result<oneshot::Receiver<Kind>, RouterGone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Campaign {
                peer,
                request,
                reply,
            })
            .await
            .map_err(|_| RouterGone)?;
        Ok(rx)
    }

    /// Every campaign (or the one named), for the admin API.
    pub async fn campaigns(&self, id: Option<CampaignId>) -> Result<Vec<CampaignView>, RouterGone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Campaigns { id, reply })
            .await
            .map_err(|_| RouterGone)?;
        rx.await.map_err(|_| RouterGone)
    }

    /// Waits until every commit submitted so far has completed.
    pub async fn flush(&self) -> Result<(), RouterGone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Flush { reply })
            .await
            .map_err(|_| RouterGone)?;
        rx.await.map_err(|_| RouterGone)
    }
}

#[derive(Default)]
struct Queue {
    /// Next seq to assign.
    next_seq: u64,
    /// Highest seq whose commit completed.
    committed_to: u64,
    /// Every seq up to this is in memory (buffer, redeliver, in flight) or gone.
    loaded_to: u64,
    /// Committed items beyond `loaded_to` exist on disk only.
    spilled: bool,
    buffer: VecDeque<Item>,
    redeliver: BTreeMap<u64, Item>,
    /// Seqs handed to a session and not acked: which session, under which tag.
    in_flight: HashMap<u64, (SessionId, u64)>,
    count: u64,
    bytes: u64,
}

#[derive(Default)]
struct Dest {
    /// Items durable or being committed, all lanes: what the quota counts.
    count: u64,
    bytes: u64,
    sessions: Vec<SessionId>,
    next_session: usize,
    picks: u64,
}

struct Session {
    peer: String,
    tx: mpsc::Sender<Delivery>,
    window: u32,
    /// Delivered, not yet acked, by tag (the item names its queue).
    in_flight: HashMap<u64, Item>,
    next_tag: u64,
    /// Campaigns whose envelope this session has been sent (SPEC.md 9.8).
    campaigns_sent: HashSet<CampaignId>,
}

/// Why items are removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    /// The destination acked them.
    Delivered,
    /// Their TTL passed.
    Expired,
    /// Their campaign was cancelled.
    Cancelled,
}

/// What to undo in campaign state when a campaign commit fails.
enum Undo {
    Begin,
    Chunk {
        seq: u32,
        accepted: Vec<(String, u64)>,
        rejected: u64,
    },
    End,
    Cancel,
    Finish,
}

/// What to do when a commit completes.
enum Pending {
    Ingest {
        reply: oneshot::Sender<Vec<IngestOutcome>>,
        outcomes: Vec<IngestOutcome>,
        /// (index in outcomes, the pushed item) in push order.
        pushed: Vec<(usize, Item)>,
    },
    Remove {
        removed: Vec<Item>,
        /// Expiry notices pushed with the removal.
        notices: Vec<Item>,
        why: Removal,
        /// Campaign counters moved by this removal: (campaign, platform, recipients).
        counted: Vec<(CampaignId, String, u64)>,
    },
    Flush(oneshot::Sender<()>),
    /// Nothing waits for this commit (campaign records forgotten after their retention).
    Nothing,
    /// A campaign step: answer once durable, or undo and refuse.
    Campaign {
        id: CampaignId,
        reply: Option<oneshot::Sender<Kind>>,
        answer: Kind,
        pushed: Vec<Item>,
        undo: Undo,
    },
    /// A request that found its step still being committed: handled again after it.
    Retry {
        peer: String,
        request: CampaignRequest,
        reply: oneshot::Sender<Kind>,
    },
}

type CommitResult = Result<Vec<PushOutcome>, StoreError>;

/// The router task's state.
pub struct Router {
    store: Arc<dyn Store>,
    writer: Writer,
    registry: RegistryWatch,
    default_quota: Quota,
    max_disk_bytes: u64,
    notice_ttl_ms: u64,
    metrics: Arc<Metrics>,
    /// False while the store cannot write (disk full, I/O errors): /readyz reports it.
    store_ok: Arc<AtomicBool>,
    /// False while the store is over `max_disk_bytes`: /readyz reports it.
    quota_ok: Arc<AtomicBool>,
    disk_full: bool,
    queues: HashMap<QueueKey, Queue>,
    dests: HashMap<String, Dest>,
    sessions: HashMap<SessionId, Session>,
    pending: VecDeque<Pending>,
    completions: FuturesOrdered<oneshot::Receiver<CommitResult>>,
    removing: HashSet<(QueueKey, u64)>,
    /// Acked items whose removal is not yet submitted.
    acked: Vec<Item>,
    housekeeping: Arc<AtomicBool>,
    last_compaction: std::time::Instant,
    campaigns: HashMap<CampaignId, Campaign>,
    campaign_config: Campaigns,
    /// Campaigns whose counters changed since they were last written.
    dirty: HashSet<CampaignId>,
    /// Recipients per second sent to each destination on the bulk lane.
    bulk_rates: HashMap<String, RecipientBucket>,
    /// Destinations with bulk items held back by their rate.
    bulk_held: HashSet<String>,
    /// Items of cancelled campaigns taken out of their queue, to remove on disk.
    discarded: Vec<Item>,
    /// Requests to handle again once the commits before them completed.
    retries: Vec<(String, CampaignRequest, oneshot::Sender<Kind>)>,
}

/// Settings of the router.
pub struct RouterConfig {
    /// Quota of destinations without their own.
    pub default_quota: Quota,
    /// Busy past this many bytes on disk (0: no limit).
    pub max_disk_bytes: u64,
    /// TTL of expiry notices.
    pub notice_ttl_ms: u64,
    /// Campaign defaults.
    pub campaigns: Campaigns,
}

impl Router {
    /// Recovers queue state from the store and starts the router task.
    pub fn start(
        store: Arc<dyn Store>,
        writer: Writer,
        registry: RegistryWatch,
        config: RouterConfig,
        metrics: Arc<Metrics>,
        health: &crate::admin::Health,
    ) -> Result<(RouterHandle, tokio::task::JoinHandle<()>), StoreError> {
        let mut router = Router {
            store,
            writer,
            registry,
            default_quota: config.default_quota,
            max_disk_bytes: config.max_disk_bytes,
            notice_ttl_ms: config.notice_ttl_ms,
            metrics,
            store_ok: health.store_ok.clone(),
            quota_ok: health.disk_quota_ok.clone(),
            disk_full: false,
            queues: HashMap::new(),
            dests: HashMap::new(),
            sessions: HashMap::new(),
            pending: VecDeque::new(),
            completions: FuturesOrdered::new(),
            removing: HashSet::new(),
            acked: Vec::new(),
            housekeeping: Arc::new(AtomicBool::new(false)),
            last_compaction: std::time::Instant::now(),
            campaigns: HashMap::new(),
            campaign_config: config.campaigns,
            dirty: HashSet::new(),
            bulk_rates: HashMap::new(),
            bulk_held: HashSet::new(),
            discarded: Vec::new(),
            retries: Vec::new(),
        };
        router.campaigns = load_campaigns(&*router.store)?;
        for state in router.store.recover()? {
            let dest = router.dests.entry(state.queue.dest.clone()).or_default();
            dest.count += state.count;
            dest.bytes += state.bytes;
            let q = Queue {
                next_seq: state.next_seq.max(1),
                committed_to: state.next_seq.saturating_sub(1),
                loaded_to: state.head_seq.saturating_sub(1),
                spilled: state.count > 0,
                count: state.count,
                bytes: state.bytes,
                ..Default::default()
            };
            router.queues.insert(state.queue, q);
        }
        let recovered: u64 = router.queues.values().map(|q| q.count).sum();
        tracing::info!(
            queues = router.queues.len(),
            messages = recovered,
            campaigns = router.campaigns.len(),
            "store recovered"
        );
        let (tx, rx) = mpsc::channel(4096);
        let task = tokio::spawn(router.run(rx));
        Ok((RouterHandle { tx }, task))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        let mut ack_flush = tokio::time::interval(ACK_FLUSH);
        ack_flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut bulk_tick = tokio::time::interval(BULK_TICK);
        bulk_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_tick = tokio::time::interval(Duration::from_millis(
            self.campaign_config.status_interval_ms,
        ));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some(result) = self.completions.next(), if !self.completions.is_empty() => {
                    let result = result.unwrap_or_else(|_| Err(StoreError::Backend("store writer stopped".into())));
                    if let Some(p) = self.pending.pop_front() {
                        self.on_commit(p, result);
                    }
                    for (peer, request, reply) in std::mem::take(&mut self.retries) {
                        self.campaign(peer, request, reply).await;
                    }
                }
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                _ = ack_flush.tick(), if !self.acked.is_empty() || !self.discarded.is_empty() => self.flush_acks().await,
                _ = bulk_tick.tick(), if !self.bulk_held.is_empty() => {
                    for dest in std::mem::take(&mut self.bulk_held) {
                        self.dispatch(&dest);
                    }
                }
                _ = status_tick.tick(), if !self.campaigns.is_empty() => self.push_statuses(),
                _ = tick.tick() => {
                    ticks += 1;
                    self.on_tick(ticks).await;
                }
            }
        }
        // Every sender is gone: finish what was submitted so no waiter is left hanging.
        self.flush_acks().await;
        while let Some(result) = self.completions.next().await {
            let result =
                result.unwrap_or_else(|_| Err(StoreError::Backend("store writer stopped".into())));
            if let Some(p) = self.pending.pop_front() {
                self.on_commit(p, result);
            }
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Ingest { items, reply } => self.ingest(items, reply).await,
            Command::Attach {
                session,
                peer,
                tx,
                window,
            } => {
                self.dests
                    .entry(peer.clone())
                    .or_default()
                    .sessions
                    .push(session);
                self.sessions.insert(
                    session,
                    Session {
                        peer: peer.clone(),
                        tx,
                        window: window.min(MAX_WINDOW),
                        in_flight: HashMap::new(),
                        // A random start, so an ack meant for an earlier session of the peer
                        // matches nothing here instead of acknowledging the wrong frame.
                        next_tag: rand::random::<u32>() as u64 + 1,
                        campaigns_sent: HashSet::new(),
                    },
                );
                self.dispatch(&peer);
            }
            Command::Detach { session } => {
                let Some(s) = self.sessions.remove(&session) else {
                    return;
                };
                if let Some(d) = self.dests.get_mut(&s.peer) {
                    d.sessions.retain(|id| *id != session);
                }
                for (_, item) in s.in_flight {
                    if let Some((id, n)) = self.bulk_item(&item) {
                        self.campaign_counts(&id, &item.queue.dest, |c| {
                            c.in_flight = c.in_flight.saturating_sub(n)
                        });
                    }
                    if let Some(q) = self.queues.get_mut(&item.queue) {
                        q.in_flight.remove(&item.seq);
                        q.redeliver.insert(item.seq, item);
                    }
                }
                self.dispatch(&s.peer);
            }
            Command::Ack { session, tags } => self.ack(session, tags).await,
            Command::Window { session, window } => {
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.window = window.min(MAX_WINDOW);
                    let peer = s.peer.clone();
                    self.dispatch(&peer);
                }
            }
            Command::Snapshot { reply } => {
                let mut all: Vec<QueueSnapshot> = self
                    .queues
                    .iter()
                    .map(|(k, q)| QueueSnapshot {
                        dest: k.dest.clone(),
                        lane: lane_name(k.lane),
                        messages: q.count,
                        bytes: q.bytes,
                        in_flight: q.in_flight.len(),
                        buffered: q.buffer.len() + q.redeliver.len(),
                    })
                    .collect();
                all.sort_by(|a, b| (&a.dest, a.lane).cmp(&(&b.dest, b.lane)));
                let _ = reply.send(all);
            }
            Command::Campaign {
                peer,
                request,
                reply,
            } => self.campaign(peer, request, reply).await,
            Command::Campaigns { id, reply } => {
                let now = unix_ms();
                let mut views: Vec<CampaignView> = self
                    .campaigns
                    .values()
                    .filter(|c| id.is_none_or(|id| id == c.id))
                    .map(|c| CampaignView {
                        broadcaster: c.record.owner.clone(),
                        accepted_at_ms: c.record.accepted_at_ms,
                        expires_at_ms: c.record.expires_at_ms,
                        chunks: c.chunks.len(),
                        status: c.status(now),
                    })
                    .collect();
                views.sort_by_key(|v| std::cmp::Reverse(v.accepted_at_ms));
                let _ = reply.send(views);
            }
            Command::Flush { reply } => {
                self.flush_acks().await;
                if self.pending.is_empty() {
                    let _ = reply.send(());
                } else {
                    // Answered when everything before it has completed.
                    let (tx, rx) = oneshot::channel();
                    let _ = tx.send(Ok(Vec::new()));
                    self.completions.push_back(rx);
                    self.pending.push_back(Pending::Flush(reply));
                }
            }
        }
    }

    fn quota(&self, dest: &str) -> Quota {
        self.registry
            .borrow()
            .get(dest)
            .map(|p| p.quota)
            .unwrap_or(self.default_quota)
    }

    async fn ingest(&mut self, items: Vec<Incoming>, reply: oneshot::Sender<Vec<IngestOutcome>>) {
        let mut outcomes = Vec::with_capacity(items.len());
        let mut pushed = Vec::with_capacity(items.len());
        let mut batch = WriteBatch::default();
        for (i, incoming) in items.into_iter().enumerate() {
            let Some(item) = self.reserve(
                incoming.dest,
                incoming.lane,
                incoming.expires_at_ms,
                incoming.body,
            ) else {
                outcomes.push(IngestOutcome::Busy {
                    retry_after_ms: BUSY_RETRY_MS,
                });
                continue;
            };
            outcomes.push(IngestOutcome::Accepted {
                expires_at_ms: incoming.expires_at_ms,
                duplicate: false,
            });
            pushed.push((i, item.clone()));
            batch.push.push(NewItem {
                item,
                dedup: incoming.dedup,
            });
        }
        if batch.is_empty() {
            let _ = reply.send(outcomes);
            return;
        }
        self.submit(
            batch,
            Pending::Ingest {
                reply,
                outcomes,
                pushed,
            },
        )
        .await;
    }

    /// Takes a place in `dest`'s queue for an item: counted against the quota and given the
    /// next seq, or None when the quota or the disk is full.
    fn reserve(
        &mut self,
        dest: String,
        lane: Lane,
        expires_at_ms: u64,
        body: Bytes,
    ) -> Option<Item> {
        if !self.room(&dest, 1, body.len() as u64) {
            return None;
        }
        Some(self.reserve_unchecked(dest, lane, expires_at_ms, body))
    }

    /// Whether `dest`'s quota and the disk have room for `count` more items of `bytes`.
    fn room(&self, dest: &str, count: u64, bytes: u64) -> bool {
        let quota = self.quota(dest);
        let (held, held_bytes) = self.dests.get(dest).map_or((0, 0), |d| (d.count, d.bytes));
        !self.disk_full
            && held + count <= quota.max_messages
            && held_bytes + bytes <= quota.max_bytes
    }

    /// [`Router::reserve`] after [`Router::room`] said yes.
    fn reserve_unchecked(
        &mut self,
        dest: String,
        lane: Lane,
        expires_at_ms: u64,
        body: Bytes,
    ) -> Item {
        let size = body.len() as u64;
        let d = self.dests.entry(dest.clone()).or_default();
        d.count += 1;
        d.bytes += size;
        let qk = QueueKey {
            dest,
            lane: lane as u8,
        };
        let q = self.queues.entry(qk.clone()).or_insert_with(new_queue);
        let item = Item {
            queue: qk,
            seq: q.next_seq,
            expires_at_ms,
            body,
        };
        q.next_seq += 1;
        item
    }

    async fn submit(&mut self, batch: WriteBatch, pending: Pending) {
        match self.writer.submit(batch).await {
            Ok(rx) => {
                self.completions.push_back(rx);
                self.pending.push_back(pending);
            }
            Err(e) => {
                // The writer is gone: fail this commit in order with the others.
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Err(e));
                self.completions.push_back(rx);
                self.pending.push_back(pending);
            }
        }
    }

    fn on_commit(&mut self, pending: Pending, result: CommitResult) {
        match &result {
            Ok(_) => self.store_ok.store(true, Ordering::Relaxed),
            Err(e) => {
                error!(error = %e, "store commit failed");
                self.store_ok.store(false, Ordering::Relaxed);
            }
        }
        match pending {
            Pending::Ingest {
                reply,
                mut outcomes,
                pushed,
            } => {
                let mut touched = HashSet::new();
                match result {
                    Ok(push_outcomes) => {
                        for ((i, item), outcome) in pushed.into_iter().zip(push_outcomes) {
                            match outcome {
                                PushOutcome::Stored => {
                                    touched.insert(item.queue.dest.clone());
                                    self.on_stored(item);
                                }
                                PushOutcome::Duplicate { expires_at_ms } => {
                                    self.on_not_stored(&item);
                                    outcomes[i] = IngestOutcome::Accepted {
                                        expires_at_ms,
                                        duplicate: true,
                                    };
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let busy = matches!(e, StoreError::Full(_));
                        for (i, item) in pushed {
                            self.on_not_stored(&item);
                            outcomes[i] = if busy {
                                IngestOutcome::Busy {
                                    retry_after_ms: BUSY_RETRY_MS,
                                }
                            } else {
                                IngestOutcome::Failed(e.to_string())
                            };
                        }
                    }
                }
                let _ = reply.send(outcomes);
                for dest in touched {
                    self.dispatch(&dest);
                }
            }
            Pending::Remove {
                removed,
                notices,
                why,
                counted,
            } => {
                let ok = result.is_ok();
                if !ok {
                    // The items are still on disk and will be counted when they go again.
                    for (id, platform, n) in counted {
                        self.campaign_counts(&id, &platform, |c| match why {
                            Removal::Delivered => c.delivered = c.delivered.saturating_sub(n),
                            Removal::Expired => c.expired = c.expired.saturating_sub(n),
                            Removal::Cancelled => {}
                        });
                    }
                }
                for item in removed {
                    self.removing.remove(&(item.queue.clone(), item.seq));
                    if !ok {
                        // Still on disk: the next expiry scan or a redelivery handles it.
                        continue;
                    }
                    let size = item.body.len() as u64;
                    if let Some(q) = self.queues.get_mut(&item.queue) {
                        q.count = q.count.saturating_sub(1);
                        q.bytes = q.bytes.saturating_sub(size);
                    }
                    if let Some(d) = self.dests.get_mut(&item.queue.dest) {
                        d.count = d.count.saturating_sub(1);
                        d.bytes = d.bytes.saturating_sub(size);
                    }
                    let lane = lane_name(item.queue.lane);
                    if why == Removal::Cancelled {
                        continue;
                    }
                    if why == Removal::Delivered {
                        self.metrics.delivered.with_label_values(&[lane]).inc();
                        if let Ok(accepted_at) = record::accepted_at_ms(&item.body) {
                            let secs = unix_ms().saturating_sub(accepted_at) as f64 / 1000.0;
                            self.metrics
                                .delivery_latency
                                .with_label_values(&[lane])
                                .observe(secs);
                        }
                    } else {
                        self.metrics.expired.with_label_values(&[lane]).inc();
                    }
                }
                let mut touched = HashSet::new();
                for notice in notices {
                    if ok {
                        touched.insert(notice.queue.dest.clone());
                        self.on_stored(notice);
                    } else {
                        self.on_not_stored(&notice);
                    }
                }
                for dest in touched {
                    self.dispatch(&dest);
                }
            }
            Pending::Flush(reply) => {
                let _ = reply.send(());
            }
            Pending::Nothing => {}
            Pending::Retry {
                peer,
                request,
                reply,
            } => self.retries.push((peer, request, reply)),
            Pending::Campaign {
                id,
                reply,
                answer,
                pushed,
                undo,
            } => match result {
                Ok(_) => {
                    let mut touched = HashSet::new();
                    for item in pushed {
                        touched.insert(item.queue.dest.clone());
                        self.on_stored(item);
                    }
                    if let Some(c) = self.campaigns.get_mut(&id) {
                        match &undo {
                            Undo::Begin => c.durable = true,
                            Undo::Chunk {
                                seq,
                                accepted,
                                rejected,
                            } => {
                                if let Some(chunk) = c.chunks.get_mut(seq) {
                                    chunk.1 = true;
                                }
                                let accepted: u64 = accepted.iter().map(|(_, n)| n).sum();
                                let m = &self.metrics.campaign_recipients;
                                m.with_label_values(&["accepted"]).inc_by(accepted);
                                m.with_label_values(&["rejected"]).inc_by(*rejected);
                            }
                            _ => {}
                        }
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(answer);
                    }
                    for dest in touched {
                        self.dispatch(&dest);
                    }
                    if matches!(undo, Undo::End | Undo::Cancel | Undo::Finish) {
                        self.push_status(&id);
                    }
                }
                Err(e) => {
                    for item in &pushed {
                        self.on_not_stored(item);
                    }
                    self.undo(&id, undo);
                    let (code, retry) = if e.is_full() {
                        (ErrorCode::Busy, BUSY_RETRY_MS)
                    } else {
                        (ErrorCode::Internal, BUSY_RETRY_MS)
                    };
                    let seq = match &answer {
                        Kind::CampaignAck(a) => a.seq,
                        _ => 0,
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(Kind::Rejected(Rejected {
                            code: code as i32,
                            retry_after_ms: retry,
                            detail: format!("campaign step not stored: {e}"),
                            campaign_id: Bytes::copy_from_slice(&id),
                            seq,
                            ..Default::default()
                        }));
                    }
                }
            },
        }
    }

    /// A pushed item is durable: it counts in its queue and may go into the buffer.
    fn on_stored(&mut self, item: Item) {
        let q = self
            .queues
            .entry(item.queue.clone())
            .or_insert_with(new_queue);
        q.count += 1;
        q.bytes += item.body.len() as u64;
        q.committed_to = q.committed_to.max(item.seq);
        if item.seq <= q.loaded_to {
            // A disk read got to it before this completion was processed: already in memory.
        } else if !q.spilled && q.buffer.len() < BUFFER_CAP {
            q.loaded_to = item.seq;
            q.buffer.push_back(item);
        } else {
            q.spilled = true;
        }
    }

    /// A reserved item was not stored (duplicate or failure): release its reservation.
    fn on_not_stored(&mut self, item: &Item) {
        let size = item.body.len() as u64;
        if let Some(d) = self.dests.get_mut(&item.queue.dest) {
            d.count = d.count.saturating_sub(1);
            d.bytes = d.bytes.saturating_sub(size);
        }
        if let Some(q) = self.queues.get_mut(&item.queue) {
            q.committed_to = q.committed_to.max(item.seq);
            if !q.spilled {
                q.loaded_to = q.loaded_to.max(item.seq);
            }
        }
    }

    /// Hands out queued items to the sessions of `dest` that have room, round-robin, lanes
    /// by priority: call, then chat, then bulk, except that every eighth pick tries bulk first
    /// so a busy chat lane cannot starve a campaign.
    fn dispatch(&mut self, dest: &str) {
        let now = unix_ms();
        let now_instant = std::time::Instant::now();
        let bulk_rate = self
            .registry
            .borrow()
            .get(dest)
            .map_or(self.campaign_config.max_bulk_rate, |p| p.bulk.max_bulk_rate);
        let Some(d) = self.dests.get_mut(dest) else {
            return;
        };
        if d.sessions.is_empty() {
            return;
        }
        // Indexed by lane - 1; built once per call, not per pick.
        let keys = LANES.map(|lane| QueueKey {
            dest: dest.to_string(),
            lane: lane as u8,
        });
        let mut idle_rounds = 0;
        while idle_rounds < d.sessions.len() {
            let idx = d.next_session % d.sessions.len();
            d.next_session = d.next_session.wrapping_add(1);
            let sid = d.sessions[idx];
            let Some(s) = self.sessions.get_mut(&sid) else {
                idle_rounds += 1;
                continue;
            };
            if s.in_flight.len() >= s.window as usize {
                idle_rounds += 1;
                continue;
            }
            d.picks += 1;
            let order = if d.picks % 8 == 0 {
                [Lane::Bulk, Lane::Call, Lane::Chat]
            } else {
                LANES
            };
            let mut sent = false;
            for lane in order {
                let qk = &keys[lane as usize - 1];
                let Some(q) = self.queues.get_mut(qk) else {
                    continue;
                };
                let bulk = lane == Lane::Bulk;
                if bulk && bulk_rate > 0 {
                    let bucket = self
                        .bulk_rates
                        .entry(dest.to_string())
                        .or_insert_with(|| RecipientBucket::new(bulk_rate, now_instant));
                    if !bucket.ready(bulk_rate, now_instant) {
                        // Over the destination's bulk rate: the bulk tick tries again.
                        if q.count > 0 {
                            self.bulk_held.insert(dest.to_string());
                        }
                        continue;
                    }
                }
                // A campaign item: its campaign, recipients, and the envelope if this session
                // has not had it. Items of cancelled (or forgotten) campaigns are dropped here.
                let mut campaign_item = None;
                let item = loop {
                    let Some(item) = next_item(qk, q, &*self.store, now) else {
                        break None;
                    };
                    if !bulk {
                        break Some(item);
                    }
                    match bulk_info_of(&item)
                        .and_then(|(id, n)| self.campaigns.get(&id).map(|c| (c, n)))
                    {
                        Some((c, n)) if !c.cancelled() => {
                            let envelope = (!s.campaigns_sent.contains(&c.id))
                                .then(|| c.envelope_fields.clone());
                            campaign_item = Some((c.id, n, envelope));
                            break Some(item);
                        }
                        _ => {
                            self.removing.insert((item.queue.clone(), item.seq));
                            self.discarded.push(item);
                        }
                    }
                };
                let Some(item) = item else {
                    continue;
                };
                let tag = s.next_tag;
                let extra = campaign_item
                    .as_ref()
                    .and_then(|(_, _, e)| e.clone())
                    .unwrap_or_default();
                let frame = match record::to_frame_with(&item.body, tag, &extra) {
                    Ok(frame) => frame,
                    Err(e) => {
                        // Never deliver a damaged record; it stays on disk for an operator.
                        error!(dest, seq = item.seq, error = %e, "unreadable stored record skipped");
                        continue;
                    }
                };
                match s.tx.try_send(Delivery {
                    lane: Some(lane),
                    frame,
                }) {
                    Ok(()) => {
                        s.next_tag += 1;
                        if let Some((id, n, _)) = campaign_item {
                            s.campaigns_sent.insert(id);
                            if let Some(counts) = self
                                .campaigns
                                .get_mut(&id)
                                .and_then(|c| c.platforms.get_mut(dest))
                            {
                                counts.in_flight += n;
                            }
                            if let Some(bucket) = self.bulk_rates.get_mut(dest) {
                                bucket.spend(n);
                            }
                        }
                        q.in_flight.insert(item.seq, (sid, tag));
                        s.in_flight.insert(tag, item);
                        sent = true;
                    }
                    Err(_) => {
                        // The session is going away or its queue is full: keep the item.
                        q.redeliver.insert(item.seq, item);
                    }
                }
                break;
            }
            if sent {
                idle_rounds = 0;
            } else {
                idle_rounds += 1;
            }
        }
    }

    /// Acked items leave memory at once; their removal from disk is batched (see
    /// [`ACK_FLUSH`]): a crash before it only means a redelivery, which the destination's
    /// dedup absorbs, and one commit for many acks halves the commits at low rates.
    async fn ack(&mut self, session: SessionId, tags: Vec<u64>) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let peer = s.peer.clone();
        let acked_before = self.acked.len();
        for tag in tags {
            let Some(item) = s.in_flight.remove(&tag) else {
                debug!(peer, tag, "ack of an unknown delivery tag ignored");
                continue;
            };
            if let Some(q) = self.queues.get_mut(&item.queue) {
                q.in_flight.remove(&item.seq);
            }
            self.removing.insert((item.queue.clone(), item.seq));
            self.acked.push(item);
        }
        // Campaign recipients count as delivered from their platform's ack.
        let campaign_acks: Vec<(CampaignId, String, u64)> = self.acked[acked_before..]
            .iter()
            .filter_map(|i| {
                self.bulk_item(i)
                    .map(|(id, n)| (id, i.queue.dest.clone(), n))
            })
            .collect();
        for (id, dest, n) in campaign_acks {
            let counted = self.campaign_counts(&id, &dest, |c| {
                c.in_flight = c.in_flight.saturating_sub(n);
                c.delivered += n;
            });
            if counted {
                self.metrics
                    .campaign_recipients
                    .with_label_values(&["delivered"])
                    .inc_by(n);
            }
        }
        if self.acked.len() >= ACK_BATCH {
            self.flush_acks().await;
        }
        self.dispatch(&peer);
    }

    /// Commits the removal of every acked item not yet removed on disk.
    async fn flush_acks(&mut self) {
        if !self.discarded.is_empty() {
            let removed = std::mem::take(&mut self.discarded);
            let batch = WriteBatch {
                remove: removed.iter().map(|i| (i.queue.clone(), i.seq)).collect(),
                ..Default::default()
            };
            debug!(
                items = removed.len(),
                "removing items of cancelled campaigns"
            );
            self.submit(
                batch,
                Pending::Remove {
                    removed,
                    notices: Vec::new(),
                    why: Removal::Cancelled,
                    counted: Vec::new(),
                },
            )
            .await;
        }
        if self.acked.is_empty() {
            return;
        }
        let removed = std::mem::take(&mut self.acked);
        let counted = removed
            .iter()
            .filter_map(|i| {
                self.bulk_item(i)
                    .map(|(id, n)| (id, i.queue.dest.clone(), n))
            })
            .collect();
        let mut batch = WriteBatch {
            remove: removed.iter().map(|i| (i.queue.clone(), i.seq)).collect(),
            ..Default::default()
        };
        self.write_dirty(&mut batch);
        self.submit(
            batch,
            Pending::Remove {
                removed,
                notices: Vec::new(),
                why: Removal::Delivered,
                counted,
            },
        )
        .await;
    }

    async fn on_tick(&mut self, ticks: u64) {
        let now = unix_ms();
        self.expire(now).await;
        self.campaign_tick(now).await;
        if ticks.is_multiple_of(10) && !self.housekeeping.swap(true, Ordering::AcqRel) {
            self.spawn_housekeeping(now);
        }
        if self.max_disk_bytes > 0 {
            // Every second (a file-size lookup), so a fast writer overshoots by at most a
            // second's worth.
            match self.store.disk_bytes() {
                Ok(bytes) => {
                    let full = bytes >= self.max_disk_bytes;
                    if full != self.disk_full {
                        if full {
                            warn!(
                                bytes,
                                quota = self.max_disk_bytes,
                                "store over its disk quota: answering busy"
                            );
                        } else {
                            tracing::info!(
                                bytes,
                                quota = self.max_disk_bytes,
                                "store back under its disk quota"
                            );
                        }
                    }
                    self.disk_full = full;
                    self.quota_ok.store(!full, Ordering::Relaxed);
                }
                Err(e) => warn!(error = %e, "cannot read the store's size"),
            }
        }
        for (dest, d) in &self.dests {
            self.metrics
                .queue_depth
                .with_label_values(&[dest])
                .set(d.count as i64);
            self.metrics
                .queue_bytes
                .with_label_values(&[dest])
                .set(d.bytes as i64);
        }
    }

    /// Dedup pruning, the disk-size check and compaction run on the blocking pool: they can
    /// take seconds on a large store and must not stall routing. One at a time.
    fn spawn_housekeeping(&mut self, now: u64) {
        let store = self.store.clone();
        let running = self.housekeeping.clone();
        let drained = self.dests.values().all(|d| d.count == 0) && self.pending.is_empty();
        // Over the disk quota, the file only shrinks by compaction: try once what is queued
        // has fallen well below the quota (so that there is space to win back).
        let queued: u64 = self.dests.values().map(|d| d.bytes).sum();
        let reclaim = self.disk_full && queued < self.max_disk_bytes / 2;
        let compact = (drained || reclaim) && self.last_compaction.elapsed() > COMPACT_EVERY
            || reclaim && self.last_compaction.elapsed() > COMPACT_OVER_QUOTA_EVERY;
        if compact {
            self.last_compaction = std::time::Instant::now();
        }
        tokio::task::spawn_blocking(move || {
            match store.prune_dedup(now, PRUNE_BATCH) {
                Ok(n) if n > 0 => debug!(pruned = n, "dedup entries pruned"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "dedup prune failed"),
            }
            match store.disk_bytes() {
                Ok(bytes) => {
                    // After a surge has drained, give the space back to the file system.
                    if compact && (bytes > COMPACT_ABOVE_BYTES || reclaim) {
                        match store.compact() {
                            Ok(true) => tracing::info!(
                                before = bytes,
                                after = store.disk_bytes().unwrap_or(0),
                                over_quota = reclaim,
                                "store compacted"
                            ),
                            Ok(false) => {}
                            Err(e) => warn!(error = %e, "compaction failed"),
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the store's size"),
            }
            running.store(false, Ordering::Release);
        });
    }

    /// Removes items whose TTL passed and, in the same commit, queues an Expired notice for
    /// each to its origin. Items in flight are left alone: the destination may still ack them.
    async fn expire(&mut self, now: u64) {
        let expired = match self.store.expired(now, EXPIRE_BATCH) {
            Ok(items) => items,
            Err(e) => {
                warn!(error = %e, "expiry scan failed");
                return;
            }
        };
        let mut batch = WriteBatch::default();
        let mut removed = Vec::new();
        let mut notices = Vec::new();
        let mut freed = HashSet::new();
        let mut counted = Vec::new();
        for item in expired {
            let key = (item.queue.clone(), item.seq);
            if self.removing.contains(&key) {
                continue;
            }
            let Some(q) = self.queues.get_mut(&item.queue) else {
                continue;
            };
            let was_in_flight = q.in_flight.contains_key(&item.seq);
            if let Some(&(sid, tag)) = q.in_flight.get(&item.seq) {
                // The destination may still ack it; a destination that holds a message well
                // past its expiry without acking loses it: it is reported expired, and a late
                // ack of its tag matches nothing.
                if now < item.expires_at_ms.saturating_add(IN_FLIGHT_GRACE_MS) {
                    continue;
                }
                q.in_flight.remove(&item.seq);
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.in_flight.remove(&tag);
                }
                freed.insert(item.queue.dest.clone());
                warn!(
                    dest = item.queue.dest,
                    seq = item.seq,
                    "delivered but never acked before expiry: reported expired"
                );
            }
            q.buffer.retain(|i| i.seq != item.seq);
            q.redeliver.remove(&item.seq);
            self.removing.insert(key);
            batch.remove.push((item.queue.clone(), item.seq));
            match record::decode(&item.body) {
                // Campaign recipients are reported through the campaign's counts, not by
                // Expired frames (SPEC.md 9.9).
                Ok((h, inner)) if h.kind == RecordKind::Bulk => {
                    if let Some((id, n)) = campaign::bulk_info(inner) {
                        let live = self.campaigns.get(&id).is_some_and(|c| !c.cancelled());
                        self.campaign_counts(&id, &item.queue.dest, |c| {
                            if was_in_flight {
                                c.in_flight = c.in_flight.saturating_sub(n);
                            }
                            if live {
                                c.expired += n;
                            }
                        });
                        if live {
                            self.metrics
                                .campaign_recipients
                                .with_label_values(&["expired"])
                                .inc_by(n);
                            counted.push((id, item.queue.dest.clone(), n));
                        }
                    }
                }
                Ok((h, _))
                    if h.kind == RecordKind::Deliver
                        && self.registry.borrow().get(&h.origin).is_some() =>
                {
                    let notice = self.notice(&h, item.queue.lane, now);
                    batch.push.push(NewItem {
                        item: notice.clone(),
                        dedup: None,
                    });
                    notices.push(notice);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(seq = item.seq, error = %e, "expired record unreadable; removed without notice")
                }
            }
            removed.push(item);
        }
        for dest in freed {
            self.dispatch(&dest);
        }
        if !batch.is_empty() {
            debug!(expired = removed.len(), "expiring");
            self.write_dirty(&mut batch);
            self.submit(
                batch,
                Pending::Remove {
                    removed,
                    notices,
                    why: Removal::Expired,
                    counted,
                },
            )
            .await;
        }
    }

    fn notice(&mut self, h: &Header, lane: u8, now: u64) -> Item {
        let expired = Expired {
            id: Bytes::copy_from_slice(&h.id),
            to: h.to.clone(),
            expired_at_ms: now,
            tag: 0,
            campaign_id: Bytes::new(),
        };
        let header = Header {
            kind: RecordKind::Expired,
            origin: h.origin.clone(),
            id: h.id,
            to: h.to.clone(),
            accepted_at_ms: now,
        };
        let body = record::encode(&header, &expired.encode_to_vec());
        let qk = QueueKey {
            dest: h.origin.clone(),
            lane,
        };
        // Notices bypass the quota: losing one would lose the only word the origin gets.
        let d = self.dests.entry(h.origin.clone()).or_default();
        d.count += 1;
        d.bytes += body.len() as u64;
        let q = self.queues.entry(qk.clone()).or_insert_with(new_queue);
        let seq = q.next_seq;
        q.next_seq += 1;
        Item {
            queue: qk,
            seq,
            expires_at_ms: now + self.notice_ttl_ms,
            body,
        }
    }
}

fn new_queue() -> Queue {
    Queue {
        next_seq: 1,
        ..Default::default()
    }
}

/// The next item of a queue to hand out: redeliveries first, then the buffer, refilled from
/// disk when it runs dry. Expired items are skipped (the expiry scan reports them).
fn next_item(qk: &QueueKey, q: &mut Queue, store: &dyn Store, now: u64) -> Option<Item> {
    loop {
        let item = if let Some((_, item)) = q.redeliver.pop_first() {
            item
        } else if let Some(item) = q.buffer.pop_front() {
            item
        } else if q.spilled {
            match store.read(qk, q.loaded_to, LOAD_BATCH) {
                Ok(items) => {
                    let full = items.len() == LOAD_BATCH;
                    if let Some(last) = items.last() {
                        q.loaded_to = last.seq;
                    }
                    q.buffer.extend(
                        items
                            .into_iter()
                            .filter(|i| !q.in_flight.contains_key(&i.seq)),
                    );
                    if !full {
                        q.spilled = false;
                        q.loaded_to = q.loaded_to.max(q.committed_to);
                    }
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "queue read failed");
                    return None;
                }
            }
        } else {
            return None;
        };
        if item.expires_at_ms > now {
            return Some(item);
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    crate::store::unix_ms()
}

fn lane_name(lane: u8) -> &'static str {
    lane::from_wire(lane as i32)
        .map(lane::name)
        .unwrap_or("unknown")
}
