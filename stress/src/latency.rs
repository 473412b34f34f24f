//! End-to-end latency: HdrHistograms per phase and lane, and a rolling one for the p99 over
//! time.
//!
//! Two figures per message. *Corrected* is measured from when the message was due (its slot
//! in the open-loop schedule), so that a generator or SDK that falls behind does not hide
//! the wait it imposed (coordinated omission). *Service* is measured from when it was
//! actually handed to the SDK. In closed loop the two are the same.
//!
//! Receivers record in batches, taking the one lock once per batch.

use crate::accounting::LaneKind;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::Mutex;

/// Lowest value tracked: 1 µs (values are in nanoseconds).
const LOWEST_NS: u64 = 1_000;
/// Highest: one hour; larger values are clamped.
const HIGHEST_NS: u64 = 3_600_000_000_000;

fn histogram(sigfig: u8) -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, sigfig).expect("valid histogram bounds")
}

/// One message's latencies.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// The phase that sent it.
    pub phase: u16,
    /// Its lane.
    pub lane: LaneKind,
    /// From its due time to its delivery.
    pub corrected_ns: u64,
    /// From its submission to its delivery.
    pub service_ns: u64,
}

#[derive(Clone)]
struct PhaseBook {
    corrected: [Histogram<u64>; 2],
    service: [Histogram<u64>; 2],
}

impl PhaseBook {
    fn new() -> Self {
        Self {
            corrected: [histogram(3), histogram(3)],
            service: [histogram(3), histogram(3)],
        }
    }
}

struct Book {
    phases: Vec<PhaseBook>,
    window: Histogram<u64>,
}

/// Every latency of a run.
pub struct LatencyBook {
    inner: Mutex<Book>,
}

impl Default for LatencyBook {
    fn default() -> Self {
        Self::new()
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Messages measured.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p99_9_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Percentiles {
    /// Reads the percentiles of `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |ns: u64| ns as f64 / 1e6;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p99_9_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Latency of one phase: per lane and all lanes together.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseLatency {
    /// From the due time (corrected for coordinated omission).
    pub corrected: LaneTable,
    /// From the actual submission.
    pub service: LaneTable,
}

/// Percentiles per lane.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LaneTable {
    /// Call lane.
    pub call: Percentiles,
    /// Chat lane.
    pub chat: Percentiles,
    /// Both.
    pub all: Percentiles,
}

impl LaneTable {
    fn of(h: &[Histogram<u64>; 2]) -> Self {
        let mut all = histogram(3);
        for one in h {
            // Same bounds, so adding cannot fail.
            let _ = all.add(one);
        }
        Self {
            call: Percentiles::of(&h[LaneKind::Call.index()]),
            chat: Percentiles::of(&h[LaneKind::Chat.index()]),
            all: Percentiles::of(&all),
        }
    }
}

impl LatencyBook {
    /// An empty book.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Book {
                phases: Vec::new(),
                window: histogram(2),
            }),
        }
    }

    /// Records a batch of samples.
    pub fn record(&self, batch: &[Sample]) {
        if batch.is_empty() {
            return;
        }
        let mut book = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for s in batch {
            let phase = s.phase as usize;
            while book.phases.len() <= phase {
                book.phases.push(PhaseBook::new());
            }
            let lane = s.lane.index();
            let p = &mut book.phases[phase];
            p.corrected[lane].saturating_record(s.corrected_ns.max(LOWEST_NS));
            p.service[lane].saturating_record(s.service_ns.max(LOWEST_NS));
            book.window.saturating_record(s.corrected_ns.max(LOWEST_NS));
        }
    }

    /// The corrected latencies recorded since the last call, all lanes: for the p99 over time.
    pub fn take_window(&self) -> Percentiles {
        let mut book = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let p = Percentiles::of(&book.window);
        book.window.reset();
        p
    }

    /// The percentiles of one phase.
    pub fn phase(&self, phase: u16) -> PhaseLatency {
        let book = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match book.phases.get(phase as usize) {
            Some(p) => PhaseLatency {
                corrected: LaneTable::of(&p.corrected),
                service: LaneTable::of(&p.service),
            },
            None => PhaseLatency::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_per_lane_and_phase() {
        let book = LatencyBook::new();
        let mut batch = Vec::new();
        for i in 1..=1000u64 {
            batch.push(Sample {
                phase: 1,
                lane: if i % 10 == 0 {
                    LaneKind::Call
                } else {
                    LaneKind::Chat
                },
                corrected_ns: i * 1_000_000,
                service_ns: i * 500_000,
            });
        }
        book.record(&batch);
        let p = book.phase(1);
        assert_eq!(p.corrected.all.count, 1000);
        assert_eq!(p.corrected.call.count, 100);
        assert!((p.corrected.all.p50_ms - 500.0).abs() < 2.0);
        assert!((p.corrected.all.p99_ms - 990.0).abs() < 2.0);
        assert!((p.service.all.p99_ms - 495.0).abs() < 2.0);
        assert_eq!(book.phase(0).corrected.all.count, 0);
        let w = book.take_window();
        assert_eq!(w.count, 1000);
        assert_eq!(book.take_window().count, 0, "the window restarts");
    }
}
