//! The time series of a phase: once per interval, the rates from the ledger's counters, the
//! p99 of the interval, the relay's queue depth, CPU, memory and store size.

use crate::accounting::Ledger;
use crate::latency::LatencyBook;
use crate::probe::{self, CpuMeter, RelayHandle};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One sample.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Point {
    /// Seconds since the phase started.
    pub t_s: f64,
    /// Messages handed to the SDK per second over the interval.
    pub sent_per_s: f64,
    /// Accepted answers per second.
    pub accepted_per_s: f64,
    /// First deliveries per second.
    pub delivered_per_s: f64,
    /// Rejections per second.
    pub rejected_per_s: f64,
    /// Expiry notices per second.
    pub expired_per_s: f64,
    /// p99 end-to-end latency of the deliveries of the interval (corrected), ms.
    pub p99_ms: Option<f64>,
    /// Items queued in the relay, all destinations (`/v1/queues`).
    pub queue_messages: Option<u64>,
    /// Items queued for the watched destination (the platform of an outage).
    pub queue_watched: Option<u64>,
    /// Relay CPU, percent of one core.
    pub relay_cpu_pct: Option<f64>,
    /// Relay resident memory.
    pub relay_rss_bytes: Option<u64>,
    /// Bytes the store occupies on disk.
    pub store_bytes: Option<u64>,
    /// This generator's own CPU, percent of one core (it shares the machine).
    pub stress_cpu_pct: Option<f64>,
}

/// What the sampler needs.
pub struct Sampler {
    /// Counters to read.
    pub ledger: Arc<Ledger>,
    /// Latencies, for the p99 of each interval.
    pub book: Arc<LatencyBook>,
    /// The relay.
    pub relay: RelayHandle,
    /// Sampling interval.
    pub every: Duration,
    /// A destination whose queue is followed on its own.
    pub watched: Option<String>,
    /// Print a progress line this often (None: quiet).
    pub progress: Option<Duration>,
    /// Phase name for the progress lines.
    pub label: String,
}

impl Sampler {
    /// Samples until `stop` turns true; returns the series.
    pub async fn run(self, start: Instant, mut stop: watch::Receiver<bool>) -> Vec<Point> {
        let mut relay_cpu = self.relay.pid.map(CpuMeter::new);
        let mut own_cpu = CpuMeter::new(std::process::id());
        let c = &self.ledger.counters;
        let read = || {
            [
                c.sent.load(Ordering::Relaxed),
                c.accepted.load(Ordering::Relaxed),
                c.delivered.load(Ordering::Relaxed),
                c.rejected.load(Ordering::Relaxed),
                c.expired.load(Ordering::Relaxed),
            ]
        };
        let mut last = read();
        let mut last_t = Instant::now();
        let mut last_print = Instant::now();
        let _ = self.book.take_window();
        let mut series = Vec::new();
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.every, self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            let now = Instant::now();
            // A last, partial interval: worth a sample unless it is a sliver.
            if stopping && now.duration_since(last_t) < self.every / 5 {
                break;
            }
            let dt = now.duration_since(last_t).as_secs_f64().max(1e-6);
            let cur = read();
            let rate = |i: usize| cur[i].saturating_sub(last[i]) as f64 / dt;
            let window = self.book.take_window();
            let (queue_messages, queue_watched) = match self.relay.admin {
                Some(admin) => match probe::queues(admin).await {
                    Ok(rows) => (
                        Some(rows.iter().map(|r| r.messages).sum()),
                        self.watched.as_ref().map(|w| {
                            rows.iter()
                                .filter(|r| &r.dest == w)
                                .map(|r| r.messages)
                                .sum()
                        }),
                    ),
                    Err(_) => (None, None),
                },
                None => (None, None),
            };
            let point = Point {
                t_s: now.duration_since(start).as_secs_f64(),
                sent_per_s: rate(0),
                accepted_per_s: rate(1),
                delivered_per_s: rate(2),
                rejected_per_s: rate(3),
                expired_per_s: rate(4),
                p99_ms: (window.count > 0).then_some(window.p99_ms),
                queue_messages,
                queue_watched,
                relay_cpu_pct: relay_cpu.as_mut().and_then(CpuMeter::sample),
                relay_rss_bytes: self.relay.pid.and_then(probe::rss_bytes),
                store_bytes: self.relay.store_dir.as_deref().map(probe::disk_bytes),
                stress_cpu_pct: own_cpu.sample(),
            };
            if let Some(every) = self.progress
                && now.duration_since(last_print) >= every
            {
                last_print = now;
                eprintln!("{}", progress_line(&self.label, &point, &cur));
            }
            series.push(point);
            last = cur;
            last_t = now;
            if stopping {
                break;
            }
        }
        series
    }
}

fn progress_line(label: &str, p: &Point, totals: &[u64; 5]) -> String {
    let opt = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.1}{unit}"));
    format!(
        "[{label} {:>6.1}s] sent {:>9} accepted {:>9} delivered {:>9} | {:>8.0}/s in {:>8.0}/s out | p99 {:>8} | queue {:>9} | relay cpu {:>7} rss {:>8}",
        p.t_s,
        totals[0],
        totals[1],
        totals[2],
        p.accepted_per_s,
        p.delivered_per_s,
        opt(p.p99_ms, "ms"),
        p.queue_messages.map_or("-".into(), |q| q.to_string()),
        opt(p.relay_cpu_pct, "%"),
        p.relay_rss_bytes
            .map_or("-".into(), |b| format!("{:.0}MiB", b as f64 / 1048576.0)),
    )
}
