//! The simulated platforms: every gateway session is a real SDK client speaking the real
//! protocol to the relay, with the tasks of [`crate::gateway`]: a receiver always, and a
//! sender and an answer collector during a phase.
//!
//! A phase ends when its senders are done, then waits (bounded by `drain`) until every
//! message it sent was answered and then delivered or reported expired.

use crate::accounting::Ledger;
use crate::gateway::{SendCtx, collect, receive, send};
use crate::latency::LatencyBook;
use crate::producer::{self, Schedule};
use crate::sampler::{Point, Sampler};
use crate::target::Target;
use crate::workload::Workload;
use relay_client::{
    Ca, Client, ClientConfig, ClientHandle, Events, KeyFile, ReconnectPolicy, unix_now_ms,
};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The run's clock: nanoseconds since the fleet was created, one monotonic clock for
/// senders and receivers alike.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    /// Now, ns.
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// `t` in ns.
    pub fn ns_of(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }
}

/// What receivers saw besides messages.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Frames a silent platform got and never acked.
    pub held_unacked: AtomicU64,
    /// Connections lost (SDK `Disconnected`).
    pub disconnects: AtomicU64,
    /// Sessions re-established by the SDK.
    pub reconnects: AtomicU64,
    /// First deliveries, per destination platform.
    pub delivered_to: Vec<AtomicU64>,
    /// Campaign recipients received (every BulkDeliver's recipients, redeliveries included).
    pub bulk_recipients: AtomicU64,
    /// BulkDeliver frames received.
    pub bulk_frames: AtomicU64,
}

struct Gateway {
    handle: watch::Sender<ClientHandle>,
    receiver: Option<JoinHandle<()>>,
}

struct Platform {
    key: KeyFile,
    silent: bool,
    online: watch::Sender<bool>,
    gateways: Vec<Gateway>,
}

/// One outage: a platform goes offline during a phase and comes back.
#[derive(Debug, Clone, Copy)]
pub struct OutageSpec {
    /// Platform index.
    pub platform: usize,
    /// Offline this long after the phase start.
    pub at: Duration,
    /// For this long.
    pub length: Duration,
}

/// One phase of load.
#[derive(Debug, Clone)]
pub struct PhaseSpec {
    /// Index (phases of one fleet are numbered from 0).
    pub index: u16,
    /// Name for reports.
    pub name: String,
    /// When messages go.
    pub schedule: Schedule,
    /// Closed loop: stop sending after this.
    pub duration_cap: Option<Duration>,
    /// An outage during the phase.
    pub outage: Option<OutageSpec>,
    /// Longest wait after the load for outstanding answers, deliveries and notices.
    pub drain: Duration,
    /// Sampling interval.
    pub sample_every: Duration,
    /// Sign during the phase above this many messages.
    pub presign_limit: u64,
    /// Signing threads.
    pub sign_threads: usize,
    /// Progress lines on stderr this often.
    pub progress: Option<Duration>,
}

/// What a phase measured (the latency and the tally are read from the ledger and the book).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseRun {
    /// From the phase start to the last submission.
    pub load_s: f64,
    /// From the phase start to the last accepted answer.
    pub accept_span_s: f64,
    /// From the phase start to the last first delivery.
    pub delivery_span_s: f64,
    /// The wait after the load until nothing was outstanding (or the drain limit).
    pub drain_s: f64,
    /// Every message resolved before the drain limit.
    pub drained: bool,
    /// Messages planned but not sent (closed loop past its duration).
    pub not_sent: u64,
    /// Sends that failed because the connection closed before the relay answered.
    pub closed_before_answer: u64,
    /// Largest lateness of a submission against its schedule, ms (open loop).
    pub max_send_lag_ms: f64,
    /// The producer.
    pub producer: producer::Stats,
    /// The time series.
    pub series: Vec<Point>,
    /// The outage, if there was one.
    pub outage: Option<OutageRun>,
    /// Frames held and never acked by silent platforms.
    pub held_unacked: u64,
    /// Connections lost and re-established by the SDK.
    pub disconnects: u64,
}

/// What an outage measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutageRun {
    /// The platform.
    pub platform: String,
    /// Offline for, s.
    pub offline_s: f64,
    /// Its queue just before it went offline.
    pub queue_before: Option<u64>,
    /// Its queue when it came back.
    pub queue_at_return: Option<u64>,
    /// Largest queue seen.
    pub queue_peak: Option<u64>,
    /// From its return until the queue was back to the pre-outage level (≤ 1.5 × before +
    /// 100), s.
    pub drain_time_s: Option<f64>,
    /// (queue at return − queue when drained) / drain time: the backlog drain rate, msgs/s.
    pub drain_rate_msgs_per_s: Option<f64>,
    /// Deliveries to the platform per second over the drain, new traffic included.
    pub delivered_rate_during_drain_msgs_per_s: Option<f64>,
    /// Time from its return until its gateways were connected again, ms.
    pub reconnect_ms: f64,
}

/// The connected platforms.
pub struct Fleet {
    /// The relay.
    pub target: Target,
    /// The workload.
    pub workload: Workload,
    /// The run's clock.
    pub clock: Clock,
    /// Every message.
    pub ledger: Arc<Ledger>,
    /// Every latency.
    pub book: Arc<LatencyBook>,
    /// Receiver statistics.
    pub stats: Arc<ReceiverStats>,
    platforms: Vec<Platform>,
}

/// Why a fleet could not run.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Not enough platforms in the set-up.
    #[error("{wanted} platforms wanted, the relay set-up has {have}")]
    Platforms {
        /// Asked.
        wanted: usize,
        /// Available.
        have: usize,
    },
    /// A gateway could not connect.
    #[error("{peer} cannot connect to {url}: {detail}")]
    Connect {
        /// The platform.
        peer: String,
        /// The relay.
        url: String,
        /// Why.
        detail: String,
    },
    /// The producer failed.
    #[error("producing messages: {0}")]
    Producer(String),
}

impl Fleet {
    /// Connects `workload.gateways` sessions for each of the first `workload.platforms`
    /// platforms of the target.
    pub async fn connect(target: Target, workload: Workload) -> Result<Self, FleetError> {
        if target.platforms.len() < workload.platforms {
            return Err(FleetError::Platforms {
                wanted: workload.platforms,
                have: target.platforms.len(),
            });
        }
        let stats = Arc::new(ReceiverStats {
            delivered_to: (0..workload.platforms).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        });
        let mut fleet = Self {
            platforms: target.platforms[..workload.platforms]
                .iter()
                .enumerate()
                .map(|(i, key)| Platform {
                    key: key.clone(),
                    silent: workload.silent.contains(&i),
                    online: watch::channel(false).0,
                    gateways: Vec::new(),
                })
                .collect(),
            target,
            workload,
            clock: Clock::new(),
            ledger: Arc::new(Ledger::new()),
            book: Arc::new(LatencyBook::new()),
            stats,
        };
        for p in 0..fleet.platforms.len() {
            fleet.bring_online(p).await?;
        }
        Ok(fleet)
    }

    /// Names of the platforms, by index.
    pub fn platform_names(&self) -> Vec<String> {
        self.platforms.iter().map(|p| p.key.peer.clone()).collect()
    }

    async fn connect_gateway(&self, p: usize) -> Result<(ClientHandle, Events), FleetError> {
        let platform = &self.platforms[p];
        let err = |detail: String| FleetError::Connect {
            peer: platform.key.peer.clone(),
            url: self.target.url.clone(),
            detail,
        };
        let mut cfg = ClientConfig::new(&self.target.url, platform.key.clone())
            .map_err(|e| err(e.to_string()))?;
        if let Some(ca) = &self.target.ca {
            cfg = cfg.with_ca(Ca::PemFile(ca.clone()));
        }
        cfg.receive_window = self.workload.window;
        cfg.max_pending = self.workload.max_pending.max(1);
        // The relay is under test, not the receivers: they trust it and spend no CPU on
        // checking signatures again.
        cfg.verify_signatures = false;
        // Reconnect quickly, but give up after about half a minute so that a relay that died
        // fails the run (sends end with Closed) instead of hanging it.
        cfg.reconnect = ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_attempts: Some(20),
            ..ReconnectPolicy::default()
        };
        let client = tokio::time::timeout(Duration::from_secs(15), Client::connect(cfg))
            .await
            .map_err(|_| err("connecting timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        Ok(client.split())
    }

    /// Connects the gateways of platform `p` (replacing closed ones) and marks it online.
    async fn bring_online(&mut self, p: usize) -> Result<(), FleetError> {
        let mut fresh = Vec::new();
        for _ in 0..self.workload.gateways.max(1) {
            let (handle, events) = self.connect_gateway(p).await?;
            let receiver = tokio::spawn(receive(
                events,
                handle.clone(),
                self.ledger.clone(),
                self.book.clone(),
                self.stats.clone(),
                self.clock,
                self.platforms[p].silent,
                p,
            ));
            fresh.push((handle, receiver));
        }
        let platform = &mut self.platforms[p];
        if platform.gateways.is_empty() {
            platform.gateways = fresh
                .into_iter()
                .map(|(h, r)| Gateway {
                    handle: watch::channel(h).0,
                    receiver: Some(r),
                })
                .collect();
        } else {
            for (g, (h, r)) in platform.gateways.iter_mut().zip(fresh) {
                g.handle.send_replace(h);
                g.receiver = Some(r);
            }
        }
        platform.online.send_replace(true);
        Ok(())
    }

    /// Closes the gateways of platform `p` (the SDK flushes acks and says Goaway).
    async fn take_offline(&mut self, p: usize) {
        let platform = &mut self.platforms[p];
        platform.online.send_replace(false);
        for g in &mut platform.gateways {
            let handle = g.handle.borrow().clone();
            handle.close().await;
            if let Some(r) = g.receiver.take() {
                let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
            }
        }
    }

    /// Closes every session.
    pub async fn close(mut self) {
        for p in 0..self.platforms.len() {
            self.take_offline(p).await;
        }
    }

    /// Runs one phase.
    pub async fn run_phase(&mut self, spec: &PhaseSpec) -> Result<PhaseRun, FleetError> {
        for p in 0..self.platforms.len() {
            if !*self.platforms[p].online.borrow() {
                self.bring_online(p).await?;
            }
        }
        let open = matches!(spec.schedule, Schedule::Open(_));
        let senders: Vec<producer::Sender> = self
            .platforms
            .iter()
            .map(|p| producer::Sender {
                peer: p.key.peer.clone(),
                key: p.key.secret.clone(),
            })
            .collect();
        let mut pspec = producer::Spec {
            schedule: spec.schedule.clone(),
            platforms: senders,
            workload: Workload {
                seed: self.workload.seed.wrapping_add(spec.index as u64),
                ..self.workload.clone()
            },
            offline: spec
                .outage
                .map(|o| {
                    vec![(
                        o.platform,
                        o.at.as_nanos() as u64,
                        (o.at + o.length).as_nanos() as u64,
                    )]
                })
                .unwrap_or_default(),
            start_unix_ms: 0,
            presign_limit: spec.presign_limit,
            threads: spec.sign_threads,
        };
        // Plan the start so that created_at_ms matches when messages really go.
        let upfront = producer::upfront(&spec.schedule, spec.presign_limit);
        let lead = producer::estimate_signing(&pspec, upfront) + Duration::from_millis(200);
        pspec.start_unix_ms = unix_now_ms() + lead.as_millis() as u64;
        let planned_start = Instant::now() + lead;
        let producer::Producer {
            outputs,
            ready,
            thread: producer_thread,
        } = producer::start(pspec);
        let _ = ready.await;
        if let Some(wait) = planned_start.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }

        let t0 = Instant::now();
        let t0_ns = self.clock.ns_of(t0);
        let base_outstanding = self.ledger.outstanding();
        let (stop_tx, stop_rx) = watch::channel(false);
        let watched = spec
            .outage
            .map(|o| self.platforms[o.platform].key.peer.clone());
        let sampler = tokio::spawn(
            Sampler {
                ledger: self.ledger.clone(),
                book: self.book.clone(),
                relay: self.target.relay.clone(),
                every: spec.sample_every,
                watched,
                progress: spec.progress,
                label: spec.name.clone(),
            }
            .run(t0, stop_rx),
        );

        let deadline = spec.duration_cap.map(|d| t0 + d);
        let gateways = self.workload.gateways.max(1);
        let mut send_tasks = Vec::new();
        let mut collect_tasks = Vec::new();
        let closed_before_answer = Arc::new(AtomicU64::new(0));
        for (g, out) in outputs.into_iter().enumerate() {
            let Some(blocks) = out else { continue };
            let platform = &self.platforms[g / gateways];
            let gateway = &platform.gateways[g % gateways];
            let (answers_tx, answers_rx) = mpsc::channel(1024);
            collect_tasks.push(tokio::spawn(collect(
                answers_rx,
                self.ledger.clone(),
                self.clock,
                closed_before_answer.clone(),
            )));
            let runtime = tokio::runtime::Handle::current();
            let handle = gateway.handle.subscribe();
            let online = platform.online.subscribe();
            let ctx = SendCtx {
                phase: spec.index,
                open,
                t0,
                t0_ns,
                deadline,
                clock: self.clock,
                ledger: self.ledger.clone(),
                closed_before_answer: closed_before_answer.clone(),
            };
            send_tasks.push(tokio::task::spawn_blocking(move || {
                send(ctx, runtime, blocks, handle, online, answers_tx)
            }));
        }

        let mut outage = None;
        if let Some(o) = spec.outage {
            outage = Some(self.outage(o, t0, spec).await?);
        }
        let mut not_sent = 0;
        let mut max_lag_ns = 0u64;
        let mut last_submit = t0;
        for t in send_tasks {
            if let Ok(s) = t.await {
                not_sent += s.not_sent;
                max_lag_ns = max_lag_ns.max(s.max_lag_ns);
                last_submit = last_submit.max(s.last_submit.unwrap_or(t0));
            }
        }
        let producer_stats = match tokio::task::spawn_blocking(move || producer_thread.join()).await
        {
            Ok(Ok(Ok(s))) => s,
            Ok(Ok(Err(e))) => return Err(FleetError::Producer(e)),
            _ => return Err(FleetError::Producer("the producer thread panicked".into())),
        };
        let load_end = Instant::now();
        // A silent platform holds what it was given until its sessions end; closing them
        // hands those messages back to the relay, whose expiry then reports them.
        for p in 0..self.platforms.len() {
            if self.platforms[p].silent {
                self.take_offline(p).await;
            }
        }
        let drain_deadline = load_end + spec.drain;
        let collectors = async {
            for t in collect_tasks {
                let _ = t.await;
            }
        };
        let _ = tokio::time::timeout(spec.drain, collectors).await;
        // Sends cut short by a closing client may never be answered: they do not hold up the
        // end (they count as unconfirmed unless they show up).
        let drained = loop {
            let cut_short = closed_before_answer.load(Ordering::Relaxed);
            if self.ledger.outstanding() <= base_outstanding + cut_short {
                break true;
            }
            if Instant::now() >= drain_deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let drain_s = load_end.elapsed().as_secs_f64();
        let _ = stop_tx.send(true);
        let series = sampler.await.unwrap_or_default();
        let c = &self.ledger.counters;
        let span = |ns: u64| (ns.saturating_sub(t0_ns)) as f64 / 1e9;
        Ok(PhaseRun {
            load_s: last_submit.duration_since(t0).as_secs_f64(),
            accept_span_s: span(c.last_accept_ns.load(Ordering::Relaxed)),
            delivery_span_s: span(c.last_delivery_ns.load(Ordering::Relaxed)),
            drain_s,
            drained,
            not_sent,
            closed_before_answer: closed_before_answer.load(Ordering::Relaxed),
            max_send_lag_ms: max_lag_ns as f64 / 1e6,
            producer: producer_stats,
            series,
            outage,
            held_unacked: self.stats.held_unacked.load(Ordering::Relaxed),
            disconnects: self.stats.disconnects.load(Ordering::Relaxed),
        })
    }

    /// Takes a platform offline at `o.at`, brings it back after `o.length`, and measures
    /// how its backlog drains.
    async fn outage(
        &mut self,
        o: OutageSpec,
        t0: Instant,
        spec: &PhaseSpec,
    ) -> Result<OutageRun, FleetError> {
        let name = self.platforms[o.platform].key.peer.clone();
        let admin = self.target.relay.admin;
        let depth = |name: String| async move {
            let admin = admin?;
            let rows = crate::probe::queues(admin).await.ok()?;
            Some(
                rows.iter()
                    .filter(|r| r.dest == name)
                    .map(|r| r.messages)
                    .sum::<u64>(),
            )
        };
        tokio::time::sleep_until((t0 + o.at).into()).await;
        let queue_before = depth(name.clone()).await;
        self.take_offline(o.platform).await;
        let offline_at = Instant::now();
        let back_at = t0 + o.at + o.length;
        let mut peak = queue_before;
        while Instant::now() < back_at {
            let wait = back_at
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500));
            tokio::time::sleep(wait).await;
            if let Some(d) = depth(name.clone()).await {
                peak = Some(peak.unwrap_or(0).max(d));
            }
        }
        let queue_at_return = depth(name.clone()).await;
        let delivered_before = self.stats.delivered_to[o.platform].load(Ordering::Relaxed);
        let returned = Instant::now();
        self.bring_online(o.platform).await?;
        let reconnect_ms = returned.elapsed().as_secs_f64() * 1000.0;
        let mut run = OutageRun {
            platform: name.clone(),
            offline_s: returned.duration_since(offline_at).as_secs_f64(),
            queue_before,
            queue_at_return,
            queue_peak: peak.max(queue_at_return),
            reconnect_ms,
            ..Default::default()
        };
        let (Some(before), Some(at_return)) = (queue_before, queue_at_return) else {
            return Ok(run);
        };
        // Drained: back to the pre-outage level. Bounded by the phase plus its drain time.
        let threshold = before + before / 2 + 100;
        let limit = t0 + spec.schedule_len() + spec.drain;
        loop {
            let now = Instant::now();
            match depth(name.clone()).await {
                Some(d) if d <= threshold => {
                    let secs = now.duration_since(returned).as_secs_f64().max(1e-3);
                    run.drain_time_s = Some(secs);
                    run.drain_rate_msgs_per_s = Some(at_return.saturating_sub(d) as f64 / secs);
                    let delivered = self.stats.delivered_to[o.platform]
                        .load(Ordering::Relaxed)
                        .saturating_sub(delivered_before);
                    run.delivered_rate_during_drain_msgs_per_s = Some(delivered as f64 / secs);
                    return Ok(run);
                }
                _ if now >= limit => return Ok(run),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl PhaseSpec {
    /// How long the schedule runs (closed loop: its duration cap, or zero).
    pub fn schedule_len(&self) -> Duration {
        match &self.schedule {
            Schedule::Open(p) => p.duration(),
            Schedule::Closed { .. } => self.duration_cap.unwrap_or_default(),
        }
    }
}
