//! `stress steady`: one rate for a duration (open loop), or a fixed count as fast as the
//! relay answers (closed loop, `--closed`).

use super::{Session, phase_spec};
use crate::Error;
use crate::cli::SteadyArgs;
use crate::producer::Schedule;
use crate::report::Report;
use crate::workload::Profile;
use std::time::Duration;

/// Runs the scenario. `extra_toml` goes into the configuration of a relay started here.
pub async fn run(a: &SteadyArgs, extra_toml: &str) -> Result<Report, Error> {
    if !a.closed && a.rate <= 0.0 {
        return Err(Error::Usage(
            "--rate must be above 0 (or use --closed)".into(),
        ));
    }
    let mut session = Session::open(&a.target, &a.workload, a.closed, extra_toml).await?;
    let schedule = if a.closed {
        Schedule::Closed { count: a.count }
    } else {
        Schedule::Open(Profile::constant(a.rate, a.duration))
    };
    let mut spec = phase_spec(0, "steady", schedule, &a.output, Duration::from_secs(1));
    if a.closed {
        spec.duration_cap = Some(a.duration);
    }
    let phase = session.phase(&spec).await?;
    let result = serde_json::json!({
        "accepted_msgs_per_s": phase.throughput.accepted_msgs_per_s,
        "delivered_msgs_per_s": phase.throughput.delivered_msgs_per_s,
        "p50_ms": phase.latency_ms.corrected.all.p50_ms,
        "p99_ms": phase.latency_ms.corrected.all.p99_ms,
        "p99_9_ms": phase.latency_ms.corrected.all.p99_9_ms,
    });
    session
        .finish("steady", &a.output, result, Vec::new())
        .await
}
