//! What a run reports: a human summary on stdout, the same figures as JSON (`--json`), and
//! the time series as an SVG plot (`--svg`, see [`crate::plot`]).

use crate::accounting::Tally;
use crate::fleet::PhaseRun;
use crate::latency::{Percentiles, PhaseLatency};
use crate::sampler::Point;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// The machine the figures were measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores available (`nproc`).
    pub nproc: usize,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
}

impl Machine {
    /// Reads this machine.
    pub fn here() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb / 1024);
        Self {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_mib,
        }
    }
}

/// Now, as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Throughput of a phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Throughput {
    /// Accepted answers per second, from the phase start to the last one.
    pub accepted_msgs_per_s: f64,
    /// First deliveries per second, from the phase start to the last one.
    pub delivered_msgs_per_s: f64,
    /// What the schedule offered on average (open loop).
    pub offered_msgs_per_s: Option<f64>,
}

/// Resource use over a phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Resources {
    /// Relay CPU, average over the samples, percent of one core.
    pub relay_cpu_pct_avg: Option<f64>,
    /// Relay CPU, highest sample.
    pub relay_cpu_pct_max: Option<f64>,
    /// Relay resident memory, highest sample.
    pub relay_rss_max_bytes: Option<u64>,
    /// Relay resident memory, last sample.
    pub relay_rss_end_bytes: Option<u64>,
    /// Store size on disk, highest sample.
    pub store_max_bytes: Option<u64>,
    /// Store size on disk, last sample.
    pub store_end_bytes: Option<u64>,
    /// Deepest queue (all destinations).
    pub queue_max_messages: Option<u64>,
    /// The generator's own CPU, average.
    pub stress_cpu_pct_avg: Option<f64>,
}

impl Resources {
    /// Summarises a series.
    pub fn of(series: &[Point]) -> Self {
        let avg = |f: fn(&Point) -> Option<f64>| {
            let v: Vec<f64> = series.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let maxf = |f: fn(&Point) -> Option<f64>| series.iter().filter_map(f).reduce(f64::max);
        let maxu = |f: fn(&Point) -> Option<u64>| series.iter().filter_map(f).max();
        let last = |f: fn(&Point) -> Option<u64>| series.iter().rev().find_map(f);
        Self {
            relay_cpu_pct_avg: avg(|p| p.relay_cpu_pct),
            relay_cpu_pct_max: maxf(|p| p.relay_cpu_pct),
            relay_rss_max_bytes: maxu(|p| p.relay_rss_bytes),
            relay_rss_end_bytes: last(|p| p.relay_rss_bytes),
            store_max_bytes: maxu(|p| p.store_bytes),
            store_end_bytes: last(|p| p.store_bytes),
            queue_max_messages: maxu(|p| p.queue_messages),
            stress_cpu_pct_avg: avg(|p| p.stress_cpu_pct),
        }
    }
}

/// One phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// Its name.
    pub name: String,
    /// What became of its messages.
    pub accounting: Tally,
    /// Rates.
    pub throughput: Throughput,
    /// End-to-end latency per lane.
    pub latency_ms: PhaseLatency,
    /// Relay and generator resources.
    pub resources: Resources,
    /// Timings, producer, series, outage.
    pub run: PhaseRun,
}

impl PhaseReport {
    /// Assembles a phase's report.
    pub fn new(
        name: &str,
        tally: Tally,
        latency: PhaseLatency,
        run: PhaseRun,
        offered: Option<f64>,
    ) -> Self {
        let per_s = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        Self {
            name: name.to_string(),
            throughput: Throughput {
                accepted_msgs_per_s: per_s(tally.accepted, run.accept_span_s),
                delivered_msgs_per_s: per_s(tally.delivered(), run.delivery_span_s),
                offered_msgs_per_s: offered,
            },
            resources: Resources::of(&run.series),
            accounting: tally,
            latency_ms: latency,
            run,
        }
    }
}

/// A scenario's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Which scenario.
    pub scenario: String,
    /// The command line.
    pub command: String,
    /// When.
    pub date: String,
    /// Where.
    pub machine: Machine,
    /// Which relay.
    pub relay: String,
    /// QUIC or WebSocket.
    pub transport: String,
    /// The workload, as given.
    pub workload: serde_json::Value,
    /// All phases together.
    pub accounting: Tally,
    /// Each phase.
    pub phases: Vec<PhaseReport>,
    /// What the scenario concluded (its own figures).
    pub result: serde_json::Value,
    /// Problems that make the run fail (lost messages...).
    pub problems: Vec<String>,
}

impl Report {
    /// True when nothing was lost and no problem was found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Notes the problems every scenario fails on.
    pub fn check_accounting(&mut self) {
        let t = &self.accounting;
        if t.lost > 0 {
            self.problems.push(format!(
                "{} message(s) lost: accepted by the relay, never delivered nor reported expired",
                t.lost
            ));
        }
        if !t.is_consistent() {
            self.problems
                .push("accounting classes do not add up to the messages sent".into());
        }
    }

    /// Writes the JSON file.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nstress {} — {} — {} ({} cores, {})",
            self.scenario, self.date, self.relay, self.machine.nproc, self.machine.cpu_model
        );
        let w = &self.workload;
        let silent = match w["silent"].as_array() {
            Some(s) if !s.is_empty() => format!(
                ", silent: {}",
                s.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{} platforms × {} gateways over {}, {} users each, payload {} bytes, mix {}, window {}, {} loop{}{silent}",
            w["platforms"],
            w["gateways"],
            self.transport,
            w["users"],
            w["size"].as_str().unwrap_or("?"),
            w["mix"].as_str().unwrap_or("?"),
            w["window"],
            w["loop"].as_str().unwrap_or("?"),
            w["concurrency"]
                .as_u64()
                .map_or(String::new(), |c| format!(" ({c} unanswered per gateway)")),
        );
        for p in &self.phases {
            out.push_str(&phase_summary(p));
        }
        if self.phases.len() > 1 {
            let _ = writeln!(out, "\nall phases");
            out.push_str(&tally_lines(&self.accounting));
        }
        if self.problems.is_empty() {
            let _ = writeln!(out, "\nresult: OK (nothing lost)");
        } else {
            let _ = writeln!(out, "\nresult: FAILED");
            for p in &self.problems {
                let _ = writeln!(out, "  - {p}");
            }
        }
        out
    }
}

fn mib(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}%"))
}

/// The accounting lines.
pub fn tally_lines(t: &Tally) -> String {
    let rejected = if t.rejected.is_empty() {
        "0".to_string()
    } else {
        t.rejected
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "  sent {}  accepted {}\n  delivered exactly once {}  more than once {} ({} extra copies)\n  expired with notice {}  rejected {}  lost {}  unconfirmed {}{}\n",
        t.sent,
        t.accepted,
        t.delivered_once,
        t.delivered_more_than_once,
        t.duplicate_copies,
        t.expired_with_notice,
        rejected,
        t.lost,
        t.unconfirmed,
        if t.unknown_ids > 0 {
            format!("  unknown ids {}", t.unknown_ids)
        } else {
            String::new()
        }
    )
}

fn latency_row(name: &str, p: &Percentiles) -> String {
    if p.count == 0 {
        return format!("  {name:<6} {:>9}\n", 0);
    }
    format!(
        "  {name:<6} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\n",
        p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.p99_9_ms, p.max_ms
    )
}

/// One phase as text.
pub fn phase_summary(p: &PhaseReport) -> String {
    let mut out = String::new();
    let offered = p
        .throughput
        .offered_msgs_per_s
        .map_or("closed loop".to_string(), |r| {
            format!("open loop, {r:.0} msgs/s offered")
        });
    let _ = writeln!(
        out,
        "\n== {} — {} messages over {:.1} s ({offered}) ==",
        p.name, p.accounting.sent, p.run.load_s
    );
    out.push_str(&tally_lines(&p.accounting));
    let _ = writeln!(
        out,
        "  throughput: accepted {:.0} msgs/s, delivered {:.0} msgs/s",
        p.throughput.accepted_msgs_per_s, p.throughput.delivered_msgs_per_s
    );
    let _ = writeln!(
        out,
        "  latency, ms, {}:\n  lane       count       p50       p90       p99     p99.9       max",
        if p.throughput.offered_msgs_per_s.is_some() {
            "due time → delivery (corrected for coordinated omission)"
        } else {
            "submission → delivery"
        }
    );
    let c = &p.latency_ms.corrected;
    out.push_str(&latency_row("call", &c.call));
    out.push_str(&latency_row("chat", &c.chat));
    out.push_str(&latency_row("all", &c.all));
    if p.throughput.offered_msgs_per_s.is_some() {
        let s = &p.latency_ms.service.all;
        let _ = writeln!(
            out,
            "  from actual submission: p50 {:.3}  p99 {:.3}  p99.9 {:.3} ms",
            s.p50_ms, s.p99_ms, s.p99_9_ms
        );
    }
    let r = &p.resources;
    let _ = writeln!(
        out,
        "  relay: cpu avg {} max {}  rss max {}  store {} (max {})  deepest queue {}",
        pct(r.relay_cpu_pct_avg),
        pct(r.relay_cpu_pct_max),
        mib(r.relay_rss_max_bytes),
        mib(r.store_end_bytes),
        mib(r.store_max_bytes),
        r.queue_max_messages.map_or("-".into(), |q| q.to_string()),
    );
    let _ = writeln!(
        out,
        "  generator: cpu avg {}  {} ({:.1} s signing)  max send lag {:.1} ms  drain {:.1} s{}",
        pct(r.stress_cpu_pct_avg),
        if p.run.producer.presigned {
            "all signed before the timed part"
        } else {
            "signed during the run"
        },
        p.run.producer.sign_s,
        p.run.max_send_lag_ms,
        p.run.drain_s,
        if p.run.drained {
            ""
        } else {
            " (drain limit reached)"
        }
    );
    if p.run.not_sent > 0 || p.run.closed_before_answer > 0 || p.run.held_unacked > 0 {
        let _ = writeln!(
            out,
            "  not sent (time cap) {}  closed before answer {}  held unacked by silent platforms {}",
            p.run.not_sent, p.run.closed_before_answer, p.run.held_unacked
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_date_is_well_formed() {
        let d = utc_now();
        assert_eq!(d.len(), "2025-01-01 00:00:00 UTC".len());
        assert!(d.starts_with("20"));
    }

    #[test]
    fn lost_messages_fail_the_report() {
        let mut r = Report {
            scenario: "steady".into(),
            command: String::new(),
            date: utc_now(),
            machine: Machine::here(),
            relay: String::new(),
            transport: "quic".into(),
            workload: serde_json::Value::Null,
            accounting: Tally {
                sent: 3,
                accepted: 3,
                delivered_once: 2,
                lost: 1,
                ..Tally::default()
            },
            phases: Vec::new(),
            result: serde_json::Value::Null,
            problems: Vec::new(),
        };
        r.check_accounting();
        assert!(!r.ok());
        assert!(r.summary().contains("1 message(s) lost"));
    }
}
