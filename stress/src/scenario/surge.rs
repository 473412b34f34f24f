//! `stress surge`: a pilgrimage-season profile. Baseline, a ramp to 10× with bursts of call
//! signalling at the peak, a ramp back down, baseline again; the report gives the p99 and
//! queue depth of each part of the profile.

use super::{Session, phase_spec};
use crate::Error;
use crate::cli::SurgeArgs;
use crate::producer::Schedule;
use crate::report::Report;
use crate::sampler::Point;
use crate::workload::{Bursts, Profile};
use std::time::Duration;

/// Per part of the profile: the worst interval p99 and queue, and the delivered rate.
fn parts(profile: &Profile, series: &[Point]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut start = 0.0;
    for seg in &profile.segments {
        let end = start + seg.duration.as_secs_f64();
        // A sample covers the interval before it.
        let inside: Vec<&Point> = series
            .iter()
            .filter(|p| p.t_s > start && p.t_s <= end + 1e-9)
            .collect();
        let max_p99 = inside.iter().filter_map(|p| p.p99_ms).reduce(f64::max);
        let max_queue = inside.iter().filter_map(|p| p.queue_messages).max();
        let delivered = if inside.is_empty() {
            None
        } else {
            Some(inside.iter().map(|p| p.delivered_per_s).sum::<f64>() / inside.len() as f64)
        };
        out.push(serde_json::json!({
            "part": seg.label,
            "from_s": start,
            "to_s": end,
            "offered_from_msgs_per_s": seg.from,
            "offered_to_msgs_per_s": seg.to,
            "call_percent": seg.mix.map(|m| m.call * 100 / (m.call + m.chat).max(1)),
            "max_interval_p99_ms": max_p99,
            "max_queue_messages": max_queue,
            "avg_delivered_msgs_per_s": delivered,
        }));
        start = end;
    }
    out
}

/// Runs the scenario.
pub async fn run(a: &SurgeArgs) -> Result<Report, Error> {
    if a.baseline <= 0.0 || a.factor < 1.0 {
        return Err(Error::Usage(
            "--baseline must be above 0 and --factor at least 1".into(),
        ));
    }
    let profile = Profile::surge(
        a.baseline,
        a.factor,
        a.duration,
        Bursts {
            every: a.burst_every,
            length: a.burst_length,
            call_percent: a.burst_call.min(100),
            rate_factor: a.burst_rate_factor,
        },
    );
    let mut session = Session::open(&a.target, &a.workload, false, "").await?;
    let spec = phase_spec(
        0,
        "surge",
        Schedule::Open(profile.clone()),
        &a.output,
        Duration::from_secs(1),
    );
    let phase = session.phase(&spec).await?;
    let c = &phase.latency_ms.corrected;
    let result = serde_json::json!({
        "baseline_msgs_per_s": a.baseline,
        "peak_msgs_per_s": profile.peak_rate(),
        "messages_offered": profile.expected_count(),
        "p99_ms": {"call": c.call.p99_ms, "chat": c.chat.p99_ms, "all": c.all.p99_ms},
        "parts": parts(&profile, &phase.run.series),
    });
    let mut text = String::from(
        "\n  part          from    to   offered msgs/s     worst p99   deepest queue\n",
    );
    for p in result["parts"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "  {:<11} {:>5.0}s {:>5.0}s {:>8.0}→{:<8.0} {:>10} {:>14}\n",
            p["part"].as_str().unwrap_or(""),
            p["from_s"].as_f64().unwrap_or(0.0),
            p["to_s"].as_f64().unwrap_or(0.0),
            p["offered_from_msgs_per_s"].as_f64().unwrap_or(0.0),
            p["offered_to_msgs_per_s"].as_f64().unwrap_or(0.0),
            p["max_interval_p99_ms"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.2} ms")),
            p["max_queue_messages"]
                .as_u64()
                .map_or("-".into(), |v| v.to_string()),
        ));
    }
    let report = session
        .finish("surge", &a.output, result, Vec::new())
        .await?;
    print!("{text}");
    Ok(report)
}
