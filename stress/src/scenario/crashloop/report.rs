//! What a crash loop reports: the summary lines, the JSON, and how the gateways of each
//! transport followed the relay's stops.

use super::DRAIN_BOUND;
use super::checker::Verdict;
use super::load::LinkLog;
use crate::Error;
use crate::accounting::Tally;
use crate::target::Transport;
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// How the gateways of one transport noticed the relay's stops and came back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStats {
    /// `quic` or `ws`.
    pub transport: String,
    /// Gateways on it.
    pub gateways: usize,
    /// Relay stops (kills and SIGTERMs) times gateways.
    pub stops: u64,
    /// Sessions that a relay stop ended and the gateway noticed (SDK `Disconnected`).
    pub sessions_broken: u64,
    /// Median time from the stop that ended a session to the gateway noticing, ms.
    pub notice_ms_median: Option<f64>,
    /// Largest.
    pub notice_ms_max: Option<f64>,
    /// Stops that came while the gateway still held a session an earlier stop had ended,
    /// without knowing it.
    pub stops_on_dead_session: u64,
    /// Sessions that ended at the end of the run with a stop not yet noticed.
    pub unnoticed_at_end: u64,
    /// Median time to a new session, from the later of the gateway noticing and the relay
    /// being ready again, ms.
    pub reconnect_ms_median: Option<f64>,
    /// Largest.
    pub reconnect_ms_max: Option<f64>,
}

/// What a crash loop found.
#[derive(Debug, Clone, Serialize)]
pub struct CrashReport {
    /// The command line.
    pub command: String,
    /// When (UTC).
    pub date: String,
    /// The relay binary.
    pub relay_bin: String,
    /// `--kills`.
    pub kills_requested: u32,
    /// SIGKILLs done.
    pub kills: u32,
    /// Time from each restart to readiness, ms.
    pub restart_ready_ms: Vec<f64>,
    /// With `--sigterm`: SIGTERM under load to exit, ms.
    pub sigterm_drain_ms: Option<f64>,
    /// The final SIGTERM (gateways closed) to exit, ms.
    pub final_stop_ms: Option<f64>,
    /// Messages the senders handed to the SDK.
    pub sent: u64,
    /// Length of the load, s.
    pub load_s: f64,
    /// From the end of the load until everything was resolved and the queues were empty, s.
    pub converged_s: Option<f64>,
    /// The checker's classification.
    pub verdict: Verdict,
    /// The stress ledger's tally of the same messages.
    pub accounting: Tally,
    /// How the gateways followed the relay's stops, by transport.
    pub links: Vec<LinkStats>,
    /// Why the run failed besides the verdict (could not complete, checks that disagree).
    pub problems: Vec<String>,
    /// The data dir, when it was kept.
    pub data_dir: Option<String>,
}

impl CrashReport {
    /// Nothing lost or duplicated after dedup, nothing impossible seen, and the run complete.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.verdict.clean()
    }

    /// The verdict line.
    pub fn last_line(&self) -> String {
        // Messages and campaign recipients together: each is one thing a platform must get.
        let v = &self.verdict;
        let c = &v.campaigns;
        format!(
            "kills={} accepted={} delivered={} expired={} lost={} duplicates_after_dedup={}",
            self.kills,
            v.accepted + c.accepted,
            v.delivered + c.delivered,
            v.expired,
            v.lost + c.lost,
            v.duplicates_after_dedup
        )
    }
}

/// For every gateway, from its log of disconnects and reconnects: which relay stop ended
/// each session (the first stop after the session began), how long the gateway took to
/// notice, how many later stops came while it still held that dead session, and how long it
/// took to get a new one once it noticed and the relay was ready.
pub(super) fn link_stats(
    gateways: &[(Transport, LinkLog)],
    stops: &[(Instant, Option<Instant>)],
    load_start: Instant,
) -> Vec<LinkStats> {
    let mut out = Vec::new();
    for transport in [Transport::Quic, Transport::Ws] {
        let mut s = LinkStats {
            transport: transport.name().to_string(),
            ..LinkStats::default()
        };
        let mut notice = Vec::new();
        let mut reconnect = Vec::new();
        for (_, log) in gateways.iter().filter(|(t, _)| *t == transport) {
            s.gateways += 1;
            s.stops += stops.len() as u64;
            let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut up_since = Some(load_start);
            let mut down_at = load_start;
            for &(t, up) in &log {
                if up {
                    let ready = stops
                        .iter()
                        .filter_map(|&(_, r)| r)
                        .filter(|&r| r <= t)
                        .max()
                        .unwrap_or(down_at);
                    reconnect.push(ms(t - down_at.max(ready)));
                    up_since = Some(t);
                    continue;
                }
                if let Some(since) = up_since.take()
                    && let Some(&(ended, _)) = stops.iter().find(|&&(st, _)| st >= since && st <= t)
                {
                    s.sessions_broken += 1;
                    notice.push(ms(t - ended));
                    s.stops_on_dead_session += stops
                        .iter()
                        .filter(|&&(st, _)| st > ended && st <= t)
                        .count() as u64;
                }
                down_at = t;
            }
            if let Some(since) = up_since
                && let Some(&(ended, _)) = stops.iter().find(|&&(st, _)| st >= since)
            {
                s.unnoticed_at_end += 1;
                s.stops_on_dead_session +=
                    stops.iter().filter(|&&(st, _)| st > ended).count() as u64;
            }
        }
        (s.notice_ms_median, s.notice_ms_max) = median_max(&mut notice);
        (s.reconnect_ms_median, s.reconnect_ms_max) = median_max(&mut reconnect);
        if s.gateways > 0 {
            out.push(s);
        }
    }
    out
}

fn median_max(v: &mut [f64]) -> (Option<f64>, Option<f64>) {
    v.sort_by(f64::total_cmp);
    (v.get(v.len() / 2).copied(), v.last().copied())
}

pub(super) fn print_summary(r: &CrashReport) {
    let v = &r.verdict;
    let t = &r.accounting;
    let mut ready = r.restart_ready_ms.clone();
    let (median, max) = median_max(&mut ready);
    println!(
        "crashloop: {} of {} SIGKILLs{}; {} restarts, ready in median {} / max {} ms",
        r.kills,
        r.kills_requested,
        r.sigterm_drain_ms.map_or(String::new(), |d| format!(
            " and one SIGTERM under load (drain_ms={d:.0}, bound {} ms)",
            DRAIN_BOUND.as_millis()
        )),
        r.restart_ready_ms.len(),
        opt_ms(median),
        opt_ms(max)
    );
    println!(
        "load: {} messages over {:.1} s; converged {}",
        r.sent,
        r.load_s,
        r.converged_s.map_or("never".to_string(), |s| format!(
            "{s:.1} s after it stopped"
        ))
    );
    for l in &r.links {
        println!(
            "links {}: {} gateways, {} relay stops each: {} sessions ended by a stop, noticed in median {} / \
             max {} ms; {} more stops came while a gateway still held a dead session{}; new session \
             median {} / max {} ms after noticing and the relay being ready",
            l.transport,
            l.gateways,
            l.stops / l.gateways.max(1) as u64,
            l.sessions_broken,
            opt_ms(l.notice_ms_median),
            opt_ms(l.notice_ms_max),
            l.stops_on_dead_session,
            if l.unnoticed_at_end > 0 {
                format!(
                    " ({} dead sessions still unnoticed at the end)",
                    l.unnoticed_at_end
                )
            } else {
                String::new()
            },
            opt_ms(l.reconnect_ms_median),
            opt_ms(l.reconnect_ms_max)
        );
    }
    println!(
        "accounting (stress ledger): sent={} accepted={} delivered_once={} delivered_more_than_once={} \
         duplicate_copies={} expired_with_notice={} rejected={} lost={} unconfirmed={} unknown_ids={}",
        t.sent,
        t.accepted,
        t.delivered_once,
        t.delivered_more_than_once,
        t.duplicate_copies,
        t.expired_with_notice,
        t.rejected_total(),
        t.lost,
        t.unconfirmed,
        t.unknown_ids
    );
    println!(
        "answers: accepted={} (accepted_as_duplicate={}: resends the relay already had) refused={} {:?} \
         unanswered={} (the SDK gave up: {:?}; of the unanswered, delivered all the same: {})",
        v.accepted,
        v.accepted_as_duplicate,
        v.refused.values().sum::<u64>(),
        v.refused,
        v.unanswered,
        v.gave_up,
        v.delivered_unanswered
    );
    println!(
        "redeliveries={} (copies beyond the first, of {} messages, all absorbed by the destination's \
         (origin, id) dedup); duplicates_after_dedup counts a message admitted twice, i.e. a copy under \
         another platform or origin",
        v.redeliveries, v.messages_redelivered
    );
    let rc = &v.receipts;
    println!(
        "receipts: sent={} accepted={} refused={} unanswered={} received={} lost={} redeliveries={} \
         duplicates_after_dedup={}",
        rc.sent,
        rc.accepted,
        rc.refused.values().sum::<u64>(),
        rc.unanswered,
        rc.received,
        rc.lost,
        rc.redeliveries,
        rc.duplicates_after_dedup
    );
    let c = &v.campaigns;
    println!(
        "campaigns: {} begun; recipients accepted={} delivered={} lost={} redeliveries={} \
         delivered_unacknowledged={} (the last line counts messages and campaign recipients \
         together)",
        c.campaigns, c.accepted, c.delivered, c.lost, c.redeliveries, c.delivered_unacknowledged
    );
    for (kind, n) in &v.anomalies {
        println!("anomaly: {kind} × {n}");
    }
    for e in &v.examples {
        println!("  {e}");
    }
    for p in &r.problems {
        println!("problem: {p}");
    }
    if let Some(dir) = &r.data_dir {
        println!("data dir kept: {dir} (relay.log: every incarnation's log)");
    }
    println!("result: {}", if r.ok() { "ok" } else { "FAILED" });
}

pub(super) fn write_json(r: &CrashReport, path: &Path) -> Result<(), Error> {
    let err = |detail: String| Error::Output {
        path: path.display().to_string(),
        detail,
    };
    let text = serde_json::to_string_pretty(r).map_err(|e| err(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| err(e.to_string()))
}

/// The live counts on a progress line.
pub(super) fn live(v: &Verdict) -> String {
    format!(
        "sent {} accepted {} delivered {} expired {} unanswered {} refused {} redeliveries {}",
        v.sent,
        v.accepted,
        v.delivered,
        v.expired,
        v.unanswered,
        v.refused.values().sum::<u64>(),
        v.redeliveries
    )
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}
