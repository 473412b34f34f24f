//! `stress max`: steps the offered rate up (× `--factor` per step) until a step fails, then
//! bisects between the last good and the first failed rate. A step is good when nothing was
//! rejected or lost, its p99 (corrected for coordinated omission) is within the limit, and
//! every message was delivered by the end of the step's drain.

use super::{Session, phase_spec};
use crate::Error;
use crate::cli::MaxArgs;
use crate::producer::Schedule;
use crate::report::{PhaseReport, Report};
use crate::workload::Profile;
use serde::Serialize;
use std::time::Duration;

/// One step's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Offered rate, msgs/s.
    pub rate: f64,
    /// Passed.
    pub ok: bool,
    /// Why not.
    pub failed_because: Option<String>,
    /// p99, ms (corrected).
    pub p99_ms: f64,
    /// Accepted rate.
    pub accepted_msgs_per_s: f64,
    /// Delivered rate.
    pub delivered_msgs_per_s: f64,
    /// Relay CPU, average.
    pub relay_cpu_pct_avg: Option<f64>,
    /// Generator CPU, average.
    pub stress_cpu_pct_avg: Option<f64>,
}

/// Judges a step.
pub fn judge(rate: f64, p: &PhaseReport, p99_limit: Duration) -> Step {
    let limit_ms = p99_limit.as_secs_f64() * 1000.0;
    let t = &p.accounting;
    let p99 = p.latency_ms.corrected.all.p99_ms;
    let failed_because = if t.rejected_total() > 0 {
        Some(format!(
            "{} rejected ({:?})",
            t.rejected_total(),
            t.rejected
        ))
    } else if t.lost > 0 {
        Some(format!("{} lost", t.lost))
    } else if !p.run.drained || t.delivered() + t.expired_with_notice < t.sent {
        Some("not everything delivered by the end of the drain".into())
    } else if p99 > limit_ms {
        Some(format!("p99 {p99:.2} ms > {limit_ms:.0} ms"))
    } else if t.sent == 0 {
        Some("nothing sent".into())
    } else {
        None
    };
    Step {
        rate,
        ok: failed_because.is_none(),
        failed_because,
        p99_ms: p99,
        accepted_msgs_per_s: p.throughput.accepted_msgs_per_s,
        delivered_msgs_per_s: p.throughput.delivered_msgs_per_s,
        relay_cpu_pct_avg: p.resources.relay_cpu_pct_avg,
        stress_cpu_pct_avg: p.resources.stress_cpu_pct_avg,
    }
}

/// Runs the scenario.
pub async fn run(a: &MaxArgs) -> Result<Report, Error> {
    if a.start_rate <= 0.0 || a.factor <= 1.0 {
        return Err(Error::Usage(
            "--start-rate must be above 0 and --factor above 1".into(),
        ));
    }
    let mut session = Session::open(&a.target, &a.workload, false, "").await?;
    let mut steps: Vec<Step> = Vec::new();
    let mut good: Option<f64> = None;
    let mut bad: Option<f64> = None;
    let mut rate = a.start_rate;
    let mut index = 0u16;
    let mut try_rate = |rate: f64| {
        let spec = phase_spec(
            index,
            &format!("step {} @ {rate:.0} msgs/s", index + 1),
            Schedule::Open(Profile::constant(rate, a.step)),
            &a.output,
            Duration::from_millis(500),
        );
        index += 1;
        spec
    };
    for _ in 0..a.max_steps {
        if rate > a.max_rate {
            break;
        }
        let spec = try_rate(rate);
        let step = judge(rate, session.phase(&spec).await?, a.p99_limit);
        if !a.output.quiet {
            eprintln!("{}", step_line(&step));
        }
        let ok = step.ok;
        steps.push(step);
        if ok {
            good = Some(rate);
            rate *= a.factor;
        } else {
            bad = Some(rate);
            break;
        }
    }
    for _ in 0..a.refine {
        let (Some(g), Some(b)) = (good, bad) else {
            break;
        };
        let mid = ((g + b) / 2.0).round();
        if (b - g) / g < 0.05 {
            break;
        }
        let spec = try_rate(mid);
        let step = judge(mid, session.phase(&spec).await?, a.p99_limit);
        if !a.output.quiet {
            eprintln!("{}", step_line(&step));
        }
        if step.ok {
            good = Some(mid);
        } else {
            bad = Some(mid);
        }
        steps.push(step);
    }
    let mut text = String::from(
        "\n  offered msgs/s  result   p99 ms   accepted/s  delivered/s  relay cpu  stress cpu\n",
    );
    for s in &steps {
        text.push_str(&step_line(s));
        text.push('\n');
    }
    text.push_str(&match good {
        Some(g) => format!(
            "  highest good rate: {g:.0} msgs/s (p99 ≤ {} ms, nothing rejected){}\n",
            a.p99_limit.as_millis(),
            bad.map_or(" — the limit was not reached".to_string(), |b| format!(
                "; {b:.0} msgs/s failed"
            ))
        ),
        None => "  no good rate: the first step already failed; lower --start-rate\n".into(),
    });
    let result = serde_json::json!({
        "best_rate_msgs_per_s": good,
        "first_failed_rate_msgs_per_s": bad,
        "p99_limit_ms": a.p99_limit.as_secs_f64() * 1000.0,
        "steps": steps,
    });
    let report = session.finish("max", &a.output, result, Vec::new()).await?;
    print!("{text}");
    Ok(report)
}

fn step_line(s: &Step) -> String {
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}%"));
    format!(
        "  {:>14.0}  {:<6} {:>8.2} {:>12.0} {:>12.0} {:>10} {:>11}{}",
        s.rate,
        if s.ok { "ok" } else { "FAIL" },
        s.p99_ms,
        s.accepted_msgs_per_s,
        s.delivered_msgs_per_s,
        pct(s.relay_cpu_pct_avg),
        pct(s.stress_cpu_pct_avg),
        s.failed_because
            .as_ref()
            .map_or(String::new(), |w| format!("  ({w})"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::Tally;
    use crate::fleet::PhaseRun;
    use crate::latency::PhaseLatency;

    fn phase(tally: Tally, p99_ms: f64, drained: bool) -> PhaseReport {
        let mut latency = PhaseLatency::default();
        latency.corrected.all.p99_ms = p99_ms;
        PhaseReport::new(
            "step",
            tally,
            latency,
            PhaseRun {
                drained,
                accept_span_s: 1.0,
                delivery_span_s: 1.0,
                ..PhaseRun::default()
            },
            Some(100.0),
        )
    }

    fn delivered(n: u64) -> Tally {
        Tally {
            sent: n,
            accepted: n,
            delivered_once: n,
            ..Tally::default()
        }
    }

    #[test]
    fn a_step_passes_only_clean_and_fast() {
        let limit = Duration::from_millis(50);
        assert!(judge(100.0, &phase(delivered(100), 12.0, true), limit).ok);
        let slow = judge(100.0, &phase(delivered(100), 51.0, true), limit);
        assert!(!slow.ok && slow.failed_because.unwrap().contains("p99"));
        let mut refused = delivered(99);
        refused.sent = 100;
        refused.rejected.insert("BUSY".into(), 1);
        let r = judge(100.0, &phase(refused, 1.0, true), limit);
        assert!(!r.ok && r.failed_because.unwrap().contains("rejected"));
        assert!(!judge(100.0, &phase(delivered(100), 1.0, false), limit).ok);
        let mut lost = delivered(99);
        lost.sent = 100;
        lost.lost = 1;
        assert!(!judge(100.0, &phase(lost, 1.0, true), limit).ok);
    }
}
