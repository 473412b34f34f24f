//! `stress compare`: one workload — `count` messages of `size` bytes from one producer
//! platform to one consumer platform, closed loop with the same bound on what is outstanding
//! — through (a) the relay verifying every origin signature, (b) the relay verifying 1 %,
//! (c) NATS core pub/sub, (d) NATS JetStream (file stream, publish acks awaited, explicit
//! consumer acks). The relay's messages are all signed before its timed part.
//!
//! Throughput is end to end: messages delivered to the consumer per second, from the first
//! send to the last delivery. Latency is from the send to the delivery.

pub mod nats;

use crate::Error;
use crate::cli::CompareArgs;
use crate::fleet::{Fleet, PhaseSpec};
use crate::producer::Schedule;
use crate::report::{Machine, Resources, utc_now};
use crate::setup::{Settings, Verify};
use crate::target::{OwnRelay, relay_binary};
use crate::workload::{LaneMix, SizeDist, Workload};
use serde::Serialize;
use std::time::Duration;

/// One system's figures. The first three keys are the interface; the rest are for people.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SystemResult {
    /// Delivered messages per second, first send to last delivery.
    pub msgs_per_s: f64,
    /// Median send → delivery, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99.9th percentile, ms.
    pub p99_9_ms: f64,
    /// Messages sent.
    pub count: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Messages not delivered.
    pub lost: u64,
    /// First send to last delivery, s.
    pub elapsed_s: f64,
    /// Every message is on disk (fsync) before it is acknowledged to the producer.
    pub fsync: bool,
    /// How it was measured.
    pub note: String,
    /// Relay: accepted answers per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_msgs_per_s: Option<f64>,
    /// Relay: CPU, average percent of one core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_cpu_pct_avg: Option<f64>,
    /// Relay: highest resident memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_rss_max_bytes: Option<u64>,
    /// Relay: the generator's CPU, average percent of one core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stress_cpu_pct_avg: Option<f64>,
    /// JetStream: publishes whose ack was an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_errors: Option<u64>,
    /// Rejections by reason (relay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<std::collections::BTreeMap<String, u64>>,
    /// JetStream: the same run with the server's default sync (its publish ack is not an
    /// fsync), the basis of the reference figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub without_fsync: Option<Box<SystemResult>>,
}

/// The whole comparison: the four systems under their interface names.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Comparison {
    /// The relay, every signature verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_all: Option<SystemResult>,
    /// The relay, 1 % verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_sample: Option<SystemResult>,
    /// NATS core pub/sub.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_core: Option<SystemResult>,
    /// NATS JetStream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<SystemResult>,
    /// Why entries are missing or the relay failed.
    #[serde(skip)]
    pub problems: Vec<String>,
    /// The relay part failed (an error or a lost message).
    #[serde(skip)]
    pub relay_failed: bool,
}

/// Runs the relay twice and NATS (if installed), prints the table and the ratios, writes JSON.
pub async fn run(a: &CompareArgs) -> Result<Comparison, Error> {
    if a.size < crate::workload::MIN_PAYLOAD {
        return Err(Error::Usage(format!(
            "--size must be at least {} bytes",
            crate::workload::MIN_PAYLOAD
        )));
    }
    let mut out = Comparison::default();
    for (verify, key) in [(Verify::All, "relay_all"), (Verify::Sample, "relay_sample")] {
        if !a.quiet {
            eprintln!("compare: {key} ({} messages)…", a.count);
        }
        match relay(a, verify).await {
            Ok(r) => {
                if r.lost > 0 {
                    out.relay_failed = true;
                    out.problems
                        .push(format!("{key}: {} message(s) lost", r.lost));
                }
                match verify {
                    Verify::All => out.relay_all = Some(r),
                    _ => out.relay_sample = Some(r),
                }
            }
            Err(e) => {
                out.relay_failed = true;
                out.problems.push(format!("{key}: {e}"));
            }
        }
    }
    if a.skip_nats {
        out.problems.push("NATS skipped (--skip-nats)".into());
    } else {
        match nats::find(a.nats_server.as_deref()) {
            None => {
                eprintln!("{}", nats::INSTALL_HINT);
                out.problems.push(nats::INSTALL_HINT.into());
            }
            Some(bin) => run_nats(a, &bin, &mut out).await,
        }
    }
    print!("{}", table(a, &out));
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&out).map_err(|e| Error::Output {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        std::fs::write(path, text + "\n").map_err(|e| Error::Output {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        println!("json: {}", path.display());
    }
    Ok(out)
}

async fn run_nats(a: &CompareArgs, bin: &std::path::Path, out: &mut Comparison) {
    let load = nats::Load {
        count: a.count,
        size: a.size,
        concurrency: a.concurrency.max(1),
        idle_limit: a.drain,
    };
    let fsync_server = {
        let server = match nats::Server::start(bin, true).await {
            Ok(s) => s,
            Err(e) => {
                out.problems.push(format!("nats-server: {e}"));
                return;
            }
        };
        if !a.quiet {
            eprintln!("compare: nats_core (nats-server {})…", server.version);
        }
        match nats::core(&server, load).await {
            Ok(r) => out.nats_core = Some(r),
            Err(e) => out.problems.push(format!("nats_core: {e}")),
        }
        if !a.quiet {
            eprintln!(
                "compare: jetstream (fsync per message: {})…",
                if server.fsync { "yes" } else { "no" }
            );
        }
        match nats::jetstream(&server, load).await {
            Ok(r) => out.jetstream = Some(r),
            Err(e) => out.problems.push(format!("jetstream: {e}")),
        }
        if !server.fsync {
            out.problems.push(format!(
                "nats-server {} cannot fsync every JetStream write (sync_interval: always needs 2.10+): \
                 jetstream is reported with \"fsync\": false",
                server.version
            ));
        }
        server.fsync
    };
    // The same JetStream run with the default sync, as the reference figures were.
    if fsync_server && let Some(js) = out.jetstream.as_mut() {
        if !a.quiet {
            eprintln!("compare: jetstream without fsync per message (default sync_interval)…");
        }
        match nats::Server::start(bin, false).await {
            Ok(server) => match nats::jetstream(&server, load).await {
                Ok(r) => js.without_fsync = Some(Box::new(r)),
                Err(e) => out.problems.push(format!("jetstream without fsync: {e}")),
            },
            Err(e) => out.problems.push(format!("nats-server: {e}")),
        }
    }
}

/// One relay run: a fresh relay with `verify`, producer p01 → consumer p02.
async fn relay(a: &CompareArgs, verify: Verify) -> Result<SystemResult, Error> {
    let bin = relay_binary(a.relay_bin.as_deref()).map_err(Error::Target)?;
    let own = OwnRelay::start(
        &bin,
        &Settings {
            platforms: 2,
            verify,
            sample_fraction: a.sample_fraction,
            extra_toml: String::new(),
        },
        a.transport,
        None,
    )
    .map_err(Error::Target)?;
    let workload = Workload {
        platforms: 2,
        gateways: 1,
        users: 100,
        size: SizeDist::Fixed(a.size),
        mix: LaneMix::CHAT,
        window: a.window,
        max_pending: a.concurrency.max(1),
        silent: Vec::new(),
        sources: vec![0],
        seed: 1,
    };
    let mut fleet = Fleet::connect(own.target.clone(), workload).await?;
    let spec = PhaseSpec {
        index: 0,
        name: format!("relay verify={}", verify.name()),
        schedule: Schedule::Closed { count: a.count },
        duration_cap: None,
        outage: None,
        drain: a.drain,
        sample_every: Duration::from_secs(1),
        presign_limit: u64::MAX,
        sign_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        progress: (!a.quiet).then_some(Duration::from_secs(5)),
    };
    let run = fleet.run_phase(&spec).await;
    let tally = fleet.ledger.tally(Some(0));
    let latency = fleet.book.phase(0).corrected.all;
    fleet.close().await;
    own.stop(Duration::from_secs(15));
    let run = run?;
    let resources = Resources::of(&run.series);
    let delivered = tally.delivered();
    Ok(SystemResult {
        msgs_per_s: if run.delivery_span_s > 0.0 {
            delivered as f64 / run.delivery_span_s
        } else {
            0.0
        },
        p50_ms: latency.p50_ms,
        p99_ms: latency.p99_ms,
        p90_ms: latency.p90_ms,
        p99_9_ms: latency.p99_9_ms,
        count: tally.sent,
        delivered,
        lost: tally.lost,
        elapsed_s: run.delivery_span_s,
        fsync: true,
        note: format!(
            "relay over {}, verify={}{}, accepted after the store's fsync, delivered and acked; \
             all messages signed before the timed part ({:.1} s)",
            a.transport.name(),
            verify.name(),
            if verify == Verify::Sample {
                format!(" (fraction {})", a.sample_fraction)
            } else {
                String::new()
            },
            run.producer.sign_s
        ),
        accepted_msgs_per_s: Some(if run.accept_span_s > 0.0 {
            tally.accepted as f64 / run.accept_span_s
        } else {
            0.0
        }),
        relay_cpu_pct_avg: resources.relay_cpu_pct_avg,
        relay_rss_max_bytes: resources.relay_rss_max_bytes,
        stress_cpu_pct_avg: resources.stress_cpu_pct_avg,
        publish_errors: None,
        rejected: (!tally.rejected.is_empty()).then_some(tally.rejected),
        without_fsync: None,
    })
}

/// The table and the ratios.
fn table(a: &CompareArgs, c: &Comparison) -> String {
    let m = Machine::here();
    let mut s = format!(
        "\nstress compare — {} — {} cores, {} — {} messages of {} bytes, {} outstanding\n\n  system          msgs/s     p50 ms     p99 ms   delivered   fsync  notes\n",
        utc_now(),
        m.nproc,
        m.cpu_model,
        a.count,
        a.size,
        a.concurrency
    );
    let without_fsync = c
        .jetstream
        .as_ref()
        .and_then(|j| j.without_fsync.as_deref().cloned());
    let rows = [
        ("relay_all", &c.relay_all),
        ("relay_sample", &c.relay_sample),
        ("nats_core", &c.nats_core),
        ("jetstream", &c.jetstream),
        ("  (no fsync)", &without_fsync),
    ];
    for (name, r) in rows {
        match r {
            Some(r) => s.push_str(&format!(
                "  {name:<13} {:>9.0} {:>10.3} {:>10.3} {:>11} {:>7}  {}\n",
                r.msgs_per_s,
                r.p50_ms,
                r.p99_ms,
                format!("{}/{}", r.delivered, r.count),
                if r.fsync { "yes" } else { "no" },
                r.note
            )),
            None if name.starts_with(' ') => {}
            None => s.push_str(&format!("  {name:<13} (not run)\n")),
        }
    }
    let ratio = |x: &Option<SystemResult>, y: &Option<SystemResult>| match (x, y) {
        (Some(x), Some(y)) if y.msgs_per_s > 0.0 => Some(x.msgs_per_s / y.msgs_per_s),
        _ => None,
    };
    s.push_str("\n  throughput ratios (relay / NATS):\n");
    for (label, x, y) in [
        ("relay_all / nats_core", &c.relay_all, &c.nats_core),
        ("relay_all / jetstream", &c.relay_all, &c.jetstream),
        ("relay_sample / nats_core", &c.relay_sample, &c.nats_core),
        ("relay_sample / jetstream", &c.relay_sample, &c.jetstream),
        (
            "relay_sample / jetstream without fsync (target ≥ 1.5)",
            &c.relay_sample,
            &without_fsync,
        ),
    ] {
        s.push_str(&format!(
            "    {label:<54} {}\n",
            ratio(x, y).map_or("-".into(), |r| format!("{r:.3}×"))
        ));
    }
    if let Some(r) = &c.relay_all {
        s.push_str(&format!(
            "    relay_all vs the 40,000 msgs/s target: {:.0} msgs/s ({:.0}%)\n",
            r.msgs_per_s,
            r.msgs_per_s / 40_000.0 * 100.0
        ));
    }
    for p in &c.problems {
        s.push_str(&format!("  note: {p}\n"));
    }
    s
}
