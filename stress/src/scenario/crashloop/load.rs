//! The load of a crash loop: every platform's gateways, alternately over QUIC and
//! WebSocket, as SDK clients that reconnect without giving up and with a short backoff.
//! Each gateway sends chat and call messages at its share of the rate to users of the other
//! platforms (the SDK keeps each one until the relay answers, resending the same signed
//! envelope after every reconnect); receives, deduplicates and acks what comes to its
//! platform; and sends a delivery receipt for every Kth message it takes in. A broadcaster
//! runs campaigns to users of every platform meanwhile (one after the other, each a few
//! chunks), which the SDK resumes after every crash (Begin again, then every chunk not yet
//! acknowledged), and the gateways count the recipients they receive.

use super::checker::{Answer, Checker};
use crate::Error;
use crate::accounting::Ledger;
use crate::target::Transport;
use crate::workload::{LaneMix, SizeDist};
use bytes::Bytes;
use futures_util::FutureExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relay_client::{
    Ca, Client, ClientConfig, ClientHandle, Event, Events, KeyFile, MessageId, OutgoingMessage,
    OutgoingReceipt, PendingSend, ReceiptKind, ReconnectPolicy, SendError, error_code_name,
    prepare_message, unix_now_ms,
};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Events handled before their acks go out together.
const ACK_BATCH: usize = 256;
/// Longest wait for a gateway's first session.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for a gateway's tasks to end once it is closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// BUSY, RATE_LIMITED and INTERNAL refusals of one message the SDK absorbs by resending.
const BACKPRESSURE_RETRIES: u32 = 10;

/// What the gateways send.
#[derive(Debug, Clone)]
pub(super) struct LoadSpec {
    /// Messages per second, all gateways together.
    pub(super) rate: f64,
    /// Gateway sessions per platform.
    pub(super) gateways: usize,
    /// Users per platform.
    pub(super) users: usize,
    /// Payload sizes.
    pub(super) size: SizeDist,
    /// Call and chat weights.
    pub(super) mix: LaneMix,
    /// A receipt for every Kth message a gateway takes in (0: none).
    pub(super) receipt_every: u64,
    /// Seed of the traffic.
    pub(super) seed: u64,
    /// Campaign recipients per second (0: no campaigns).
    pub(super) campaign_rate: f64,
}

/// Where the relay listens.
#[derive(Debug, Clone)]
pub(super) struct Endpoints {
    /// `quic://...`.
    pub(super) quic: String,
    /// `ws://...`.
    pub(super) ws: String,
    /// The certificate to trust.
    pub(super) ca: PathBuf,
}

/// The bookkeeping every task writes to.
#[derive(Clone)]
pub(super) struct Books {
    /// The crash loop's checker.
    pub(super) checker: Arc<Checker>,
    /// The stress ledger (its tally is the standard accounting).
    pub(super) ledger: Arc<Ledger>,
    /// The run's clock.
    pub(super) t0: Instant,
}

impl Books {
    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn answered(&self, id: MessageId, result: Result<bool, &SendError>) {
        match result {
            Ok(duplicate) => {
                self.checker
                    .answered(id, Answer::Accepted { duplicate }, "");
                self.ledger.accepted(id, self.now_ns());
            }
            Err(e) => {
                let (answer, reason) = classify(e);
                self.checker.answered(id, answer, reason);
                // The stress ledger counts the SDK's expiry as a refusal, as gateway.rs does,
                // and a closed client as unconfirmed.
                if !matches!(e, SendError::Closed(_)) {
                    self.ledger.rejected(id, reason);
                }
            }
        }
    }
}

/// A failed send by its reason. Only the relay's refusal and the SDK's checks before sending
/// mean the relay keeps nothing; a closed client, or a message whose TTL ran out while the
/// SDK held it for a resend, may well be at the relay already.
fn classify(e: &SendError) -> (Answer, &'static str) {
    match e {
        SendError::Rejected { code, .. } => (Answer::Refused, error_code_name(*code)),
        SendError::Invalid(_) => (Answer::Refused, "INVALID"),
        SendError::DuplicateId => (Answer::Refused, "DUPLICATE_ID"),
        SendError::Expired => (Answer::GaveUp, "EXPIRED_BEFORE_ACCEPT"),
        SendError::Closed(_) => (Answer::GaveUp, "CLOSED"),
    }
}

/// When a gateway's connection went down (`false`) or came back (`true`).
pub(super) type LinkLog = Arc<Mutex<Vec<(Instant, bool)>>>;

struct Gateway {
    transport: Transport,
    handle: ClientHandle,
    tasks: Vec<JoinHandle<()>>,
    links: LinkLog,
}

/// The connected gateways of every platform.
pub(super) struct Fleet {
    gateways: Vec<Gateway>,
    stop: watch::Sender<bool>,
    senders: Vec<JoinHandle<u64>>,
    broadcaster: Option<ClientHandle>,
    campaigns: Option<JoinHandle<()>>,
}

impl Fleet {
    /// Connects every gateway and starts the load.
    pub(super) async fn start(
        endpoints: &Endpoints,
        platforms: &[KeyFile],
        broadcaster: &KeyFile,
        spec: &LoadSpec,
        books: &Books,
    ) -> Result<Self, Error> {
        let names: Arc<Vec<String>> = Arc::new(platforms.iter().map(|k| k.peer.clone()).collect());
        let total = platforms.len() * spec.gateways;
        let period =
            Duration::from_secs_f64(total as f64 / spec.rate).max(Duration::from_micros(1));
        let (stop, _) = watch::channel(false);
        let mut fleet = Self {
            gateways: Vec::new(),
            stop,
            senders: Vec::new(),
            broadcaster: None,
            campaigns: None,
        };
        for (p, key) in platforms.iter().enumerate() {
            for g in 0..spec.gateways {
                // Alternate so that every platform has both transports when it has two
                // gateways, and the platforms alternate when they have one.
                let transport = if (p + g) % 2 == 0 {
                    Transport::Quic
                } else {
                    Transport::Ws
                };
                let url = match transport {
                    Transport::Quic => &endpoints.quic,
                    Transport::Ws => &endpoints.ws,
                };
                let (handle, events) = connect(url, &endpoints.ca, key).await?;
                let links: LinkLog = Arc::default();
                let (receipts_tx, receipts_rx) = mpsc::unbounded_channel();
                let tasks = vec![
                    tokio::spawn(receive(
                        events,
                        handle.clone(),
                        p,
                        books.clone(),
                        receipts_tx,
                        spec.receipt_every,
                        links.clone(),
                    )),
                    tokio::spawn(send_receipts(receipts_rx, handle.clone(), books.clone())),
                ];
                let sender = Sender {
                    handle: handle.clone(),
                    platform: p,
                    key: key.clone(),
                    names: names.clone(),
                    period,
                    spec: spec.clone(),
                    rng: StdRng::seed_from_u64(
                        spec.seed
                            .wrapping_mul(1_000_003)
                            .wrapping_add((p * spec.gateways + g) as u64),
                    ),
                    books: books.clone(),
                    stop: fleet.stop.subscribe(),
                };
                fleet.senders.push(tokio::spawn(sender.run()));
                fleet.gateways.push(Gateway {
                    transport,
                    handle,
                    tasks,
                    links,
                });
            }
        }
        if spec.campaign_rate > 0.0 {
            // Over QUIC: the WebSocket gateways already cover that transport's resumption.
            let (handle, mut events) = connect(&endpoints.quic, &endpoints.ca, broadcaster).await?;
            // Progress reports are not needed; the events must still be read.
            tokio::spawn(async move { while events.next().await.is_some() {} });
            let task = tokio::spawn(run_campaigns(
                handle.clone(),
                names.clone(),
                spec.campaign_rate,
                books.clone(),
                fleet.stop.subscribe(),
            ));
            fleet.broadcaster = Some(handle);
            fleet.campaigns = Some(task);
        }
        Ok(fleet)
    }

    /// Stops the senders; returns how many messages they handed to the SDK.
    pub(super) async fn stop_sending(&mut self) -> u64 {
        let _ = self.stop.send(true);
        let mut sent = 0;
        for s in self.senders.drain(..) {
            sent += s.await.unwrap_or(0);
        }
        if let Some(task) = self.campaigns.take() {
            // It finishes the campaign in hand: every chunk it started is answered.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT * 3, task).await;
        }
        sent
    }

    /// The link logs of the gateways, with their transports.
    pub(super) fn links(&self) -> Vec<(Transport, LinkLog)> {
        self.gateways
            .iter()
            .map(|g| (g.transport, g.links.clone()))
            .collect()
    }

    /// Closes every session (the SDK flushes acks) and waits for the gateways' tasks.
    pub(super) async fn close(mut self) {
        self.stop_sending().await;
        // Together: each close waits up to the SDK's grace for unanswered messages.
        futures_util::future::join_all(self.gateways.iter().map(|g| g.handle.close())).await;
        if let Some(handle) = &self.broadcaster {
            handle.close().await;
        }
        for g in self.gateways {
            for t in g.tasks {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, t).await;
            }
        }
    }
}

async fn connect(
    url: &str,
    ca: &std::path::Path,
    key: &KeyFile,
) -> Result<(ClientHandle, Events), Error> {
    let err =
        |detail: String| Error::Target(format!("{} cannot connect to {url}: {detail}", key.peer));
    let mut cfg = ClientConfig::new(url, key.clone())
        .map_err(|e| err(e.to_string()))?
        .with_ca(Ca::PemFile(ca.to_path_buf()));
    // Reconnect for as long as the run lasts, quickly: the relay is back within a second.
    cfg.reconnect = ReconnectPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        max_attempts: None,
        reset_after: Duration::from_secs(5),
        ..ReconnectPolicy::default()
    };
    cfg.backpressure_retries = BACKPRESSURE_RETRIES;
    cfg.verify_signatures = true;
    let client = tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(cfg))
        .await
        .map_err(|_| err("connecting timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
    Ok(client.split())
}

/// One gateway's sender.
struct Sender {
    handle: ClientHandle,
    platform: usize,
    key: KeyFile,
    names: Arc<Vec<String>>,
    period: Duration,
    spec: LoadSpec,
    rng: StdRng,
    books: Books,
    stop: watch::Receiver<bool>,
}

impl Sender {
    /// Sends at its share of the rate until stopped; returns how many it handed to the SDK.
    async fn run(mut self) -> u64 {
        let mut tick = tokio::time::interval(self.period);
        let mut sent = 0;
        loop {
            if *self.stop.borrow() {
                break;
            }
            tokio::select! {
                biased;
                changed = self.stop.changed() => if changed.is_err() { break } else { continue },
                _ = tick.tick() => {}
            }
            self.send_one().await;
            sent += 1;
        }
        sent
    }

    async fn send_one(&mut self) {
        let n = self.names.len();
        let dest = if n < 2 {
            self.platform
        } else {
            let d = self.rng.gen_range(0..n - 1);
            if d >= self.platform { d + 1 } else { d }
        };
        let lane = self.spec.mix.pick(&mut self.rng);
        let size = self.spec.size.sample(&mut self.rng);
        let users = self.spec.users.max(1);
        let msg = OutgoingMessage {
            to: format!("u{}@{}", self.rng.gen_range(0..users), self.names[dest]),
            from_user: format!("u{}", self.rng.gen_range(0..users)),
            lane: lane.lane(),
            ttl_s: 0,
            content_type: String::new(),
            payload: Bytes::from(
                (0..size)
                    .map(|i| b'a' + (i % 26) as u8)
                    .collect::<Vec<u8>>(),
            ),
        };
        let id = MessageId::random();
        self.books.checker.sent(id, self.platform, dest, lane);
        let now = self.books.now_ns();
        self.books.ledger.sent(0, id, lane, now, now);
        let prepared =
            match prepare_message(&self.key.secret, &self.key.peer, msg, id, unix_now_ms()) {
                Ok(p) => p,
                Err(e) => {
                    self.books.answered(id, Err(&SendError::Invalid(e)));
                    return;
                }
            };
        match self.handle.submit(prepared).await {
            Ok(pending) => {
                tokio::spawn(await_answer(pending, self.books.clone()));
            }
            Err(e) => self.books.answered(id, Err(&e)),
        }
    }
}

async fn await_answer(pending: PendingSend, books: Books) {
    let id = pending.id();
    match pending.await {
        Ok(r) => books.answered(id, Ok(r.duplicate)),
        Err(e) => books.answered(id, Err(&e)),
    }
}

/// Reads one gateway's events: records deliveries (through the platform's dedup), receipts
/// and expiry notices, queues receipts for what it takes in, and acks in batches.
async fn receive(
    mut events: Events,
    handle: ClientHandle,
    platform: usize,
    books: Books,
    receipts: mpsc::UnboundedSender<OutgoingReceipt>,
    receipt_every: u64,
    links: LinkLog,
) {
    let mut taken_in = 0u64;
    let mut tags = Vec::with_capacity(ACK_BATCH);
    while let Some(first) = events.next().await {
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(event) = next.take() {
            handled += 1;
            match &event {
                Event::Message(m) => {
                    books.ledger.delivered(m.id, books.now_ns());
                    if books
                        .checker
                        .delivered(platform, m.id, &m.from, &m.to, m.verified)
                    {
                        taken_in += 1;
                        if receipt_every > 0 && taken_in.is_multiple_of(receipt_every) {
                            let _ = receipts.send(OutgoingReceipt::new(
                                m.id,
                                &m.to,
                                &m.from,
                                ReceiptKind::Delivered,
                            ));
                        }
                    }
                }
                Event::Receipt(r) => books
                    .checker
                    .receipt_received(platform, r.id, &r.from, r.kind),
                Event::Expired(e) => {
                    books.ledger.expired(e.id);
                    books.checker.expired(platform, e.id);
                }
                Event::Disconnected { .. } => push_link(&links, false),
                Event::Reconnected(_) => push_link(&links, true),
                Event::Bulk(b) => {
                    if let Ok(campaign) = <[u8; 16]>::try_from(b.campaign_id.as_ref()) {
                        books
                            .checker
                            .bulk_delivered(platform, campaign, &b.recipients);
                    }
                }
                _ => {}
            }
            if let Some(tag) = event.tag() {
                tags.push(tag);
            }
            if handled < ACK_BATCH {
                next = events.next().now_or_never().flatten();
            }
        }
        handle.ack_many(&tags);
        tags.clear();
    }
}

/// Recipients per campaign chunk.
const CAMPAIGN_CHUNK: usize = 250;
/// Chunks per campaign.
const CAMPAIGN_CHUNKS: u32 = 4;

/// The broadcaster: one campaign after another until stopped, each of [`CAMPAIGN_CHUNKS`]
/// chunks to users spread over the platforms, paced at `rate` recipients per second. A chunk
/// is counted in the checker once the relay acknowledges it; the SDK resends whatever is not
/// acknowledged after a reconnect, so every chunk started is answered unless the relay stays
/// down past the end of the run.
async fn run_campaigns(
    handle: ClientHandle,
    names: Arc<Vec<String>>,
    rate: f64,
    books: Books,
    mut stop: watch::Receiver<bool>,
) {
    let period = Duration::from_secs_f64(CAMPAIGN_CHUNK as f64 / rate);
    let mut tick = tokio::time::interval(period);
    let mut n = 0u64;
    'campaigns: while !*stop.borrow() {
        let spec = relay_client::CampaignSpec::text(
            &format!("alerts@{}", handle.peer()),
            "crash loop campaign",
        );
        let Ok(campaign) = handle.begin_campaign(spec).await else {
            // Refused or closed: try a new campaign after a pause.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        books.checker.campaign_begun();
        let id = campaign.id();
        let mut pending = Vec::new();
        for seq in 1..=CAMPAIGN_CHUNKS {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = tick.tick() => {}
            }
            let recipients: Vec<String> = (0..CAMPAIGN_CHUNK)
                .map(|_| {
                    n += 1;
                    format!("c{n}@{}", names[(n % names.len() as u64) as usize])
                })
                .collect();
            let Ok(p) = campaign.submit_chunk(seq, recipients.clone()).await else {
                break 'campaigns;
            };
            let checker = books.checker.clone();
            pending.push(tokio::spawn(async move {
                if let Ok(ack) = p.await
                    && ack.accepted as usize == recipients.len()
                {
                    checker.chunk_accepted(id, &recipients);
                }
            }));
        }
        for p in pending {
            let _ = p.await;
        }
        let chunks = CAMPAIGN_CHUNKS;
        if *stop.borrow() {
            break;
        }
        let _ = campaign.end(chunks).await;
    }
}

fn push_link(links: &LinkLog, up: bool) {
    links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((Instant::now(), up));
}

/// Hands a gateway's receipts to the SDK, apart from its receiver so that a full pending
/// limit never holds up the acks.
async fn send_receipts(
    mut rx: mpsc::UnboundedReceiver<OutgoingReceipt>,
    handle: ClientHandle,
    books: Books,
) {
    while let Some(receipt) = rx.recv().await {
        let id = receipt.id;
        books.checker.receipt_sent(id);
        match handle.submit_receipt(receipt).await {
            Ok(pending) => {
                let checker = books.checker.clone();
                tokio::spawn(async move {
                    let (answer, reason) = match pending.await {
                        Ok(_) => (Answer::Accepted { duplicate: false }, ""),
                        Err(e) => classify(&e),
                    };
                    checker.receipt_answered(id, answer, reason);
                });
            }
            Err(e) => {
                let (answer, reason) = classify(&e);
                books.checker.receipt_answered(id, answer, reason);
            }
        }
    }
}
