//! `stress outage`: one platform goes offline for T seconds while the others keep sending to
//! it. Its queue builds up in the relay; when it comes back the report gives the backlog at
//! its return and how fast it drained: drain rate = (queue at return − queue when back to the
//! pre-outage level) / time to get there, and the delivery rate to it over that time.

use super::{Session, phase_spec};
use crate::Error;
use crate::cli::OutageArgs;
use crate::fleet::OutageSpec;
use crate::producer::Schedule;
use crate::report::Report;
use crate::workload::Profile;
use std::time::Duration;

/// Runs the scenario.
pub async fn run(a: &OutageArgs) -> Result<Report, Error> {
    if a.workload.platforms < 2 {
        return Err(Error::Usage("an outage needs at least 2 platforms".into()));
    }
    if a.offline_at + a.offline_for >= a.duration {
        return Err(Error::Usage(
            "--offline-at + --offline-for must end before --duration (the drain is measured under load)"
                .into(),
        ));
    }
    let mut session = Session::open(&a.target, &a.workload, false, "").await?;
    let names = session.platform_names();
    let platform = match &a.offline {
        Some(name) => names.iter().position(|n| n == name).ok_or_else(|| {
            Error::Usage(format!(
                "--offline {name}: not one of the platforms in use ({})",
                names.join(", ")
            ))
        })?,
        None => 1,
    };
    let mut spec = phase_spec(
        0,
        "outage",
        Schedule::Open(Profile::constant(a.rate, a.duration)),
        &a.output,
        Duration::from_secs(1),
    );
    spec.outage = Some(OutageSpec {
        platform,
        at: a.offline_at,
        length: a.offline_for,
    });
    let phase = session.phase(&spec).await?;
    let o = phase.run.outage.clone().unwrap_or_default();
    let mut problems = Vec::new();
    if o.queue_at_return.is_none() {
        problems.push(
            "queue depth unavailable: the admin API was not reachable (give --admin with --relay)"
                .into(),
        );
    } else if o.drain_time_s.is_none() {
        problems.push(format!(
            "{}'s queue did not get back to its pre-outage level before the drain limit",
            o.platform
        ));
    }
    let result = serde_json::to_value(&o).unwrap_or_default();
    let text = format!(
        "\n  outage of {}: offline {:.1} s; queue before {}, at return {}, peak {}\n  drained in {} → backlog drain rate {} (deliveries to it {})\n",
        o.platform,
        o.offline_s,
        opt_u(o.queue_before),
        opt_u(o.queue_at_return),
        opt_u(o.queue_peak),
        o.drain_time_s.map_or("-".into(), |s| format!("{s:.2} s")),
        o.drain_rate_msgs_per_s
            .map_or("-".into(), |r| format!("{r:.0} msgs/s")),
        o.delivered_rate_during_drain_msgs_per_s
            .map_or("-".into(), |r| format!("{r:.0} msgs/s")),
    );
    let report = session
        .finish("outage", &a.output, result, problems)
        .await?;
    print!("{text}");
    Ok(report)
}

fn opt_u(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}
