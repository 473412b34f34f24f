//! `stress bulk`: chat (and call) at a steady rate, first alone, then while a broadcaster's
//! campaign to K recipients spread over every platform is fanned out; the report compares the
//! chat p99 of the two phases and gives the campaign's own figures: recipients/s accepted
//! (chunks durable at the relay) and delivered (acked by the platforms), the relay's peak RSS
//! and store size during the campaign, and whether every recipient reached its platform.
//!
//! The campaign starts [`CAMPAIGN_AFTER`] into the second phase, once chat is steady; besides
//! each phase's overall p99, the report gives the worst one-second p99 of the baseline and of
//! the seconds the campaign was in flight, so that a short campaign is not averaged away.
//!
//! The platforms' gateways ack every `BulkDeliver` as they ack messages, and count the
//! recipients they receive; the broadcaster is an SDK client with the set-up's broadcaster key.

use super::{Session, phase_spec};
use crate::Error;
use crate::cli::BulkArgs;
use crate::producer::Schedule;
use crate::report::{PhaseReport, Report};
use crate::workload::Profile;
use relay_client::{Ca, CampaignSpec, CampaignStatus, Client, ClientConfig, ClientHandle};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Chunks the broadcaster keeps in flight.
const CHUNKS_IN_FLIGHT: usize = 64;
/// How far into the second phase the campaign begins.
const CAMPAIGN_AFTER: Duration = Duration::from_secs(2);

/// What the campaign task measured.
#[derive(Debug, Default)]
struct CampaignRun {
    /// When the Begin was sent, seconds since the phase started.
    began_s: f64,
    /// From Begin sent to the last chunk's ack.
    accept_s: f64,
    /// From Begin sent to state DONE (or the time limit).
    deliver_s: f64,
    /// The final status.
    status: Option<CampaignStatus>,
    /// (seconds since begin, delivered) once a second.
    progress: Vec<(f64, u64)>,
    /// Why it did not finish.
    error: Option<String>,
}

/// Recipient `i` of the campaign: users spread round-robin over the platforms.
fn recipient(i: u64, platforms: &[String]) -> String {
    let p = &platforms[(i % platforms.len() as u64) as usize];
    format!("b{i}@{p}")
}

/// Connects the broadcaster.
async fn broadcaster(session: &Session) -> Result<ClientHandle, Error> {
    let target = &session.fleet.target;
    let key = target.broadcasters.first().cloned().ok_or_else(|| {
        Error::Usage(
            "stress bulk needs a broadcaster: a relay started here has one (b01); for --relay, \
             --data-dir must hold a relay.toml listing a broadcaster and its key file"
                .into(),
        )
    })?;
    let mut cfg = ClientConfig::new(&target.url, key).map_err(|e| Error::Target(e.to_string()))?;
    if let Some(ca) = &target.ca {
        cfg = cfg.with_ca(Ca::PemFile(ca.clone()));
    }
    let client = Client::connect(cfg)
        .await
        .map_err(|e| Error::Target(format!("broadcaster cannot connect: {e}")))?;
    let (handle, mut events) = client.split();
    // Pushed progress reports and anything else the broadcaster gets are not needed here.
    tokio::spawn(async move { while events.next().await.is_some() {} });
    Ok(handle)
}

/// Runs the campaign: begin, every chunk with many in flight, end, then follow the status
/// until done or `limit`.
async fn campaign(
    handle: ClientHandle,
    recipients: u64,
    chunk: u64,
    platforms: Vec<String>,
    limit: Duration,
    phase_start: Instant,
) -> CampaignRun {
    tokio::time::sleep(CAMPAIGN_AFTER).await;
    let mut run = CampaignRun::default();
    let started = Instant::now();
    run.began_s = started.duration_since(phase_start).as_secs_f64();
    let mut spec = CampaignSpec::text(
        &format!("alerts@{}", handle.peer()),
        "stress bulk: one payload, many recipients",
    );
    spec.label = format!("stress bulk {recipients}");
    let c = match handle.begin_campaign(spec).await {
        Ok(c) => c,
        Err(e) => {
            run.error = Some(format!("begin: {e}"));
            return run;
        }
    };
    let mut pending = std::collections::VecDeque::new();
    let mut seq = 0u32;
    let mut next = 0u64;
    while next < recipients {
        let n = chunk.min(recipients - next);
        let list: Vec<String> = (next..next + n).map(|i| recipient(i, &platforms)).collect();
        next += n;
        seq += 1;
        match c.submit_chunk(seq, list).await {
            Ok(p) => pending.push_back(p),
            Err(e) => {
                run.error = Some(format!("chunk {seq}: {e}"));
                return run;
            }
        }
        while pending.len() >= CHUNKS_IN_FLIGHT {
            if let Some(p) = pending.pop_front()
                && let Err(e) = p.await
            {
                run.error = Some(format!("chunk: {e}"));
                return run;
            }
        }
    }
    for p in pending {
        if let Err(e) = p.await {
            run.error = Some(format!("chunk: {e}"));
            return run;
        }
    }
    if let Err(e) = c.end(seq).await {
        run.error = Some(format!("end: {e}"));
        return run;
    }
    run.accept_s = started.elapsed().as_secs_f64();
    let deadline = started + limit;
    loop {
        match c.status().await {
            Ok(s) => {
                run.progress
                    .push((started.elapsed().as_secs_f64(), s.total.delivered));
                let done = s.state.is_finished();
                run.status = Some(s);
                if done {
                    break;
                }
            }
            Err(e) => {
                run.error = Some(format!("status: {e}"));
                break;
            }
        }
        if Instant::now() > deadline {
            run.error = Some(format!("not done within {limit:?}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    run.deliver_s = started.elapsed().as_secs_f64();
    run
}

/// The highest one-second p99 (all lanes) of the samples in `(from_s, to_s]`.
fn worst_interval_p99(series: &[crate::sampler::Point], from_s: f64, to_s: f64) -> Option<f64> {
    series
        .iter()
        .filter(|p| p.t_s > from_s && p.t_s <= to_s)
        .filter_map(|p| p.p99_ms)
        .reduce(f64::max)
}

fn p99(phase: &PhaseReport) -> serde_json::Value {
    let c = &phase.latency_ms.corrected;
    serde_json::json!({
        "chat_p99_ms": c.chat.p99_ms,
        "call_p99_ms": c.call.p99_ms,
        "all_p99_ms": c.all.p99_ms,
        "chat_p50_ms": c.chat.p50_ms,
        "messages": c.all.count,
    })
}

/// Runs the scenario.
pub async fn run(a: &BulkArgs) -> Result<Report, Error> {
    if a.chat_rate <= 0.0 || a.recipients == 0 || a.chunk == 0 {
        return Err(Error::Usage(
            "--chat-rate, --recipients and --chunk must be above 0".into(),
        ));
    }
    let extra = format!(
        "[campaigns]\nmax_bulk_rate = {}\nmax_campaign_recipients = {}\n\
         max_recipients_per_s = {}\nmax_chunk_recipients = {}\n",
        a.bulk_rate,
        a.recipients.max(1),
        a.accept_rate,
        a.chunk
    );
    let mut session = Session::open(&a.target, &a.workload, false, &extra).await?;
    let platforms = session.platform_names();
    let handle = broadcaster(&session).await?;

    // Phase 0: chat alone.
    let spec = phase_spec(
        0,
        "without campaign",
        Schedule::Open(Profile::constant(a.chat_rate, a.duration)),
        &a.output,
        Duration::from_secs(1),
    );
    let base = p99(session.phase(&spec).await?);

    // Phase 1: the same chat while the campaign runs.
    let base_worst = worst_interval_p99(&session.phases[0].run.series, 0.0, f64::MAX);
    let received_before = session.fleet.stats.bulk_recipients.load(Ordering::Relaxed);
    let task: JoinHandle<CampaignRun> = tokio::spawn(campaign(
        handle.clone(),
        a.recipients,
        a.chunk,
        platforms.clone(),
        a.campaign_limit,
        Instant::now(),
    ));
    let spec = phase_spec(
        1,
        "with campaign",
        Schedule::Open(Profile::constant(a.chat_rate, a.duration)),
        &a.output,
        Duration::from_secs(1),
    );
    let phase = session.phase(&spec).await?;
    let during = p99(phase);
    let resources = phase.resources.clone();
    let series = phase.run.series.clone();
    let finished_inside_phase = task.is_finished();
    let camp = task
        .await
        .map_err(|e| Error::Target(format!("campaign task failed: {e}")))?;
    let received = session.fleet.stats.bulk_recipients.load(Ordering::Relaxed) - received_before;
    let frames = session.fleet.stats.bulk_frames.load(Ordering::Relaxed);
    handle.close().await;

    let mut problems = Vec::new();
    if let Some(e) = &camp.error {
        problems.push(format!("campaign: {e}"));
    }
    let total = camp.status.as_ref().map(|s| s.total.clone());
    if let Some(t) = &total {
        if t.accepted != a.recipients || t.delivered != t.accepted {
            problems.push(format!(
                "campaign: {} recipients, {} accepted, {} delivered, {} expired, {} rejected",
                a.recipients, t.accepted, t.delivered, t.expired, t.rejected
            ));
        }
        if received < t.delivered {
            problems.push(format!(
                "the platforms received {received} recipients, the relay counts {} delivered",
                t.delivered
            ));
        }
    }
    let ratio = |k: &str| {
        let b = base[k].as_f64().unwrap_or(0.0);
        let d = during[k].as_f64().unwrap_or(0.0);
        (b > 0.0).then(|| d / b)
    };
    if !finished_inside_phase {
        problems.push(
            "the campaign outlasted the chat phase: raise --duration so that the p99 with \
             campaign covers all of it"
                .into(),
        );
    }
    let delivered = total.as_ref().map_or(0, |t| t.delivered);
    // A sample covers the second before it: the campaign's seconds end one after it does.
    let window_worst =
        worst_interval_p99(&series, camp.began_s, camp.began_s + camp.deliver_s + 1.0);
    let result = serde_json::json!({
        "recipients": a.recipients,
        "platforms": platforms,
        "chunk": a.chunk,
        "bulk_rate_per_platform": a.bulk_rate,
        "accept_rate": a.accept_rate,
        "accepted_recipients_per_s": a.recipients as f64 / camp.accept_s.max(1e-9),
        "delivered_recipients_per_s": delivered as f64 / camp.deliver_s.max(1e-9),
        "accept_s": camp.accept_s,
        "deliver_s": camp.deliver_s,
        "recipients_received_by_platforms": received,
        "bulk_frames_received": frames,
        "status": total.map(|t| serde_json::json!({
            "accepted": t.accepted, "delivered": t.delivered, "pending": t.pending,
            "expired": t.expired, "rejected": t.rejected, "cancelled": t.cancelled,
        })),
        "state": camp.status.as_ref().map(|s| s.state.name()),
        "relay_rss_max_bytes_with_campaign": resources.relay_rss_max_bytes,
        "store_max_bytes_with_campaign": resources.store_max_bytes,
        "chat_without_campaign": base,
        "chat_with_campaign": during,
        "worst_1s_p99_ms_without_campaign": base_worst,
        "worst_1s_p99_ms_while_campaign_in_flight": window_worst,
        "campaign_began_s_into_phase": camp.began_s,
        "chat_p99_ratio": ratio("chat_p99_ms"),
        "call_p99_ratio": ratio("call_p99_ms"),
        "delivered_over_time": camp.progress,
    });
    if let Some(r) = ratio("chat_p99_ms")
        && r > 2.0
    {
        problems.push(format!(
            "chat p99 with the campaign is {r:.2}x its value without (goal: at most 2x)"
        ));
    }
    if let (Some(w), Some(b)) = (window_worst, base_worst)
        && w > 2.0 * b
    {
        problems.push(format!(
            "worst one-second p99 while the campaign was in flight is {w:.1} ms, {:.2}x the \
             worst second without it ({b:.1} ms; goal: at most 2x)",
            w / b
        ));
    }
    session.finish("bulk", &a.output, result, problems).await
}
