//! `stress crashloop`: the relay binary as a child process under mixed load, killed with
//! SIGKILL at random moments and restarted on the same data dir and ports, N times; then
//! a check, from the platforms' side, that nothing the relay accepted was lost.
//!
//! The load is three platforms (the demo's `alpha`, `beta`, `gamma`) whose gateways
//! alternate between QUIC and WebSocket, sending chat and call messages to each other and
//! delivery receipts for some of what they receive (`load`). The SDK reconnects with
//! backoff and resends every unanswered message with the same signed envelope, so the
//! relay can deduplicate it. Between kills the relay runs a random time after it is ready
//! (`--min-gap`..`--max-gap`). With `--sigterm` it is also stopped once gracefully under
//! load, and the drain is timed against the relay's bound. After the last restart the load
//! stops, the relay runs until the accounting converges and its queues are empty, and it is
//! stopped with SIGTERM.
//!
//! The checker (`checker`) then puts every accepted message in one class — delivered to its
//! platform (after the platform's dedup), expired with notice to its origin, or lost — and
//! the run fails when anything was lost, passed a platform's dedup twice, or broke a
//! protocol rule, or when the run could not complete. The last line of stdout is the
//! verdict, an interface for scripts:
//! `kills=N accepted=A delivered=D expired=E lost=L duplicates_after_dedup=X`.

mod checker;
mod load;
mod process;
mod report;

pub use checker::{ReceiptVerdict, Verdict};
pub use report::{CrashReport, LinkStats};

use crate::Error;
use crate::accounting::{Ledger, Tally};
use crate::cli::CrashloopArgs;
use crate::probe;
use crate::report::utc_now;
use crate::target::relay_binary;
use checker::Checker;
use load::{Books, Endpoints, Fleet, LoadSpec};
use process::{PLATFORMS, RelayProcess, SetUp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use report::{link_stats, live, ms, print_summary, write_json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The relay's own bound on a SIGTERM drain (`relay/src/main.rs`:
/// `relay.shutdown(Duration::from_secs(10))`, and README "Operations").
pub const DRAIN_BOUND: Duration = Duration::from_secs(10);
/// Longest wait for a SIGTERM stop before the relay is killed (and the stop fails).
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// How often the drain checks the accounting and the relay's queues.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// Progress lines during the drain this often.
const DRAIN_PROGRESS: Duration = Duration::from_secs(2);

/// Progress lines go to stdout, unless `quiet`.
struct Out {
    quiet: bool,
    t0: Instant,
}

impl Out {
    fn progress(&self, line: impl AsRef<str>) {
        if !self.quiet {
            println!(
                "[{:7.1}s] {}",
                self.t0.elapsed().as_secs_f64(),
                line.as_ref()
            );
        }
    }
}

/// The relay through the run: its stops and restarts, and what went wrong with them.
struct Life {
    relay: RelayProcess,
    ready_timeout: Duration,
    /// A relay is running (false once a stop or restart failed).
    up: bool,
    /// (when the relay was stopped, when it was ready again), for the link statistics.
    stops: Vec<(Instant, Option<Instant>)>,
    restart_ready_ms: Vec<f64>,
    problems: Vec<String>,
}

impl Life {
    /// Starts the relay again after the stop at `stopped_at`; the time to readiness.
    async fn restart(&mut self, stopped_at: Instant, after: &str) -> Option<Duration> {
        match self.relay.start(self.ready_timeout).await {
            Ok(ready) => {
                self.stops.push((stopped_at, Some(Instant::now())));
                self.restart_ready_ms.push(ms(ready));
                Some(ready)
            }
            Err(e) => {
                self.stops.push((stopped_at, None));
                self.problems.push(format!("restart after {after}: {e}"));
                self.up = false;
                None
            }
        }
    }

    /// SIGKILLs and restarts the relay `a.kills` times, each after it ran a random gap;
    /// returns how many kills were done.
    async fn kill_loop(
        &mut self,
        a: &CrashloopArgs,
        rng: &mut StdRng,
        out: &Out,
        checker: &Checker,
    ) -> u32 {
        let cap = out.t0 + a.duration;
        let mut kills = 0;
        for k in 1..=a.kills {
            let gap = rng.gen_range(a.min_gap..=a.max_gap);
            if Instant::now() + gap > cap {
                self.problems.push(format!(
                    "--duration {:?} reached after {kills} of {} kills",
                    a.duration, a.kills
                ));
                break;
            }
            tokio::time::sleep(gap).await;
            let killed_at = Instant::now();
            if let Err(e) = self.relay.kill9().await {
                self.problems.push(format!("kill {k}: {e}"));
                self.up = false;
                break;
            }
            kills += 1;
            let Some(ready) = self.restart(killed_at, &format!("kill {k}")).await else {
                break;
            };
            out.progress(format!(
                "kill {k}/{} after {:.2} s up; ready again in {:.0} ms | {}",
                a.kills,
                gap.as_secs_f64(),
                ms(ready),
                live(&checker.verdict())
            ));
        }
        kills
    }

    /// Stops the relay with SIGTERM under load after a random gap, times the drain against
    /// the relay's bound, and restarts it; returns the drain time, ms.
    async fn graceful_stop(
        &mut self,
        a: &CrashloopArgs,
        rng: &mut StdRng,
        out: &Out,
        checker: &Checker,
    ) -> Option<f64> {
        let gap = rng.gen_range(a.min_gap..=a.max_gap);
        tokio::time::sleep(gap).await;
        let stopped_at = Instant::now();
        let stop = match self.relay.sigterm(STOP_LIMIT).await {
            Ok(stop) => stop,
            Err(e) => {
                self.problems.push(format!("SIGTERM under load: {e}"));
                self.up = false;
                return None;
            }
        };
        let drain_ms = ms(stop.took);
        if !stop.clean {
            self.problems.push(format!(
                "SIGTERM under load: the relay did not exit cleanly (after {drain_ms:.0} ms)"
            ));
        }
        if stop.took > DRAIN_BOUND {
            self.problems.push(format!(
                "SIGTERM under load: drain took {drain_ms:.0} ms, over the relay's {} ms bound",
                DRAIN_BOUND.as_millis()
            ));
        }
        let ready = self.restart(stopped_at, "the SIGTERM").await;
        out.progress(format!(
            "SIGTERM after {:.2} s up: drain_ms={drain_ms:.0} ({}; the relay bounds its drain at {} ms: \
             relay/src/main.rs shutdown(10 s)); {} | {}",
            gap.as_secs_f64(),
            if stop.clean { "exit 0" } else { "NOT a clean exit" },
            DRAIN_BOUND.as_millis(),
            ready.map_or("no restart".into(), |r| format!("ready again in {:.0} ms", ms(r))),
            live(&checker.verdict())
        ));
        Some(drain_ms)
    }

    /// The last stop, SIGTERM with no gateway left; its time, ms.
    async fn final_stop(&mut self, out: &Out) -> Option<f64> {
        match self.relay.sigterm(STOP_LIMIT).await {
            Ok(stop) => {
                let took = ms(stop.took);
                out.progress(format!(
                    "final stop: SIGTERM, {} after {took:.0} ms",
                    if stop.clean {
                        "exit 0"
                    } else {
                        "NOT a clean exit"
                    }
                ));
                if !stop.clean {
                    self.problems.push(format!(
                        "final SIGTERM: the relay did not exit cleanly within {STOP_LIMIT:?}"
                    ));
                }
                Some(took)
            }
            Err(e) => {
                self.problems.push(format!("final SIGTERM: {e}"));
                None
            }
        }
    }
}

/// Runs the scenario.
pub async fn run(a: &CrashloopArgs) -> Result<CrashReport, Error> {
    check_args(a)?;
    let bin = relay_binary(a.relay_bin.as_deref()).map_err(Error::Target)?;
    if bin.to_string_lossy().contains("/debug/") {
        eprintln!(
            "warning: {} is a debug build; restart and drain times are not representative",
            bin.display()
        );
    }
    let mut setup = SetUp::write(a.keep_data.as_deref()).map_err(Error::Target)?;
    let out = Out {
        quiet: a.quiet,
        t0: Instant::now(),
    };
    let mut relay = RelayProcess::new(&bin, &setup);
    let first = relay.start(a.ready_timeout).await.map_err(Error::Target)?;
    out.progress(format!(
        "relay {} (pid {}) ready in {:.0} ms; data {}; quic {} ws {} admin {}",
        bin.display(),
        relay.pid().unwrap_or(0),
        ms(first),
        setup.dir.display(),
        setup.quic,
        setup.ws,
        setup.admin
    ));

    let books = Books {
        checker: Arc::new(Checker::new(
            PLATFORMS.iter().map(|p| p.to_string()).collect(),
        )),
        ledger: Arc::new(Ledger::new()),
        t0: out.t0,
    };
    let spec = LoadSpec {
        rate: a.rate,
        gateways: a.gateways,
        users: a.users,
        size: a.size.clone(),
        mix: a.mix,
        receipt_every: a.receipt_every,
        seed: a.seed,
        campaign_rate: a.campaign_rate,
    };
    let endpoints = Endpoints {
        quic: format!("quic://{}", setup.quic),
        ws: format!("ws://{}", setup.ws),
        ca: setup.ca.clone(),
    };
    let mut fleet = Fleet::start(
        &endpoints,
        &setup.platforms,
        &setup.broadcaster,
        &spec,
        &books,
    )
    .await?;
    let load_start = Instant::now();
    out.progress(format!(
        "load: {} × {} gateways (QUIC and WebSocket alternating), {} msgs/s, {}, {}-byte payloads, \
         {}; seed {}",
        PLATFORMS.join(", "),
        a.gateways,
        a.rate,
        a.mix,
        a.size,
        match a.receipt_every {
            0 => "no receipts".to_string(),
            n => format!("a delivery receipt for 1 in {n} messages taken in"),
        },
        a.seed
    ));

    let mut life = Life {
        relay,
        ready_timeout: a.ready_timeout,
        up: true,
        stops: Vec::new(),
        restart_ready_ms: Vec::new(),
        problems: Vec::new(),
    };
    let mut rng = StdRng::seed_from_u64(a.seed);
    let kills = life.kill_loop(a, &mut rng, &out, &books.checker).await;
    let mut sigterm_drain_ms = None;
    if a.sigterm && life.up && life.problems.is_empty() {
        sigterm_drain_ms = life.graceful_stop(a, &mut rng, &out, &books.checker).await;
    }
    if life.up {
        // The last incarnation takes load too before the load stops.
        tokio::time::sleep(rng.gen_range(a.min_gap..=a.max_gap)).await;
    }
    let sent = fleet.stop_sending().await;
    let load_s = load_start.elapsed().as_secs_f64();
    out.progress(format!("load stopped: {sent} messages handed to the SDK"));

    let mut converged_s = None;
    if life.up {
        match drain(&books.checker, setup.admin, a.drain, &out).await {
            Ok(s) => converged_s = Some(s),
            Err(e) => life.problems.push(e),
        }
    }
    let links = link_stats(&fleet.links(), &life.stops, load_start);
    fleet.close().await;
    let final_stop_ms = if life.up {
        life.final_stop(&out).await
    } else {
        None
    };

    let verdict = books.checker.verdict();
    let accounting = books.ledger.tally(None);
    cross_check(&verdict, &accounting, &mut life.problems);
    let mut report = CrashReport {
        command: super::command_line(),
        date: utc_now(),
        relay_bin: bin.display().to_string(),
        kills_requested: a.kills,
        kills,
        restart_ready_ms: life.restart_ready_ms,
        sigterm_drain_ms,
        final_stop_ms,
        sent,
        load_s,
        converged_s,
        verdict,
        accounting,
        links,
        problems: life.problems,
        data_dir: a.keep_data.as_ref().map(|d| d.display().to_string()),
    };
    if !report.ok() && report.data_dir.is_none() {
        report.data_dir = Some(setup.keep().display().to_string());
    }
    print_summary(&report);
    if let Some(path) = &a.json {
        write_json(&report, path)?;
        println!("json: {}", path.display());
    }
    println!("{}", report.last_line());
    Ok(report)
}

fn check_args(a: &CrashloopArgs) -> Result<(), Error> {
    let usage = |s: &str| Err(Error::Usage(s.to_string()));
    if !(a.rate.is_finite() && a.rate > 0.0) {
        return usage("--rate must be above 0");
    }
    if a.min_gap.is_zero() || a.min_gap > a.max_gap {
        return usage("--min-gap must be above 0 and at most --max-gap");
    }
    if !(a.campaign_rate.is_finite() && a.campaign_rate >= 0.0) {
        return usage("--campaign-rate must be 0 or more");
    }
    if a.gateways == 0 || a.users == 0 {
        return usage("--gateways and --users must be at least 1");
    }
    Ok(())
}

/// Waits until every answer is in, every accepted message and receipt is resolved, and the
/// relay's queues are empty; returns how long that took, or why it did not happen in time.
async fn drain(
    checker: &Checker,
    admin: SocketAddr,
    limit: Duration,
    out: &Out,
) -> Result<f64, String> {
    let started = Instant::now();
    let mut last_progress = started;
    loop {
        let outstanding = checker.outstanding();
        let queued = queue_depth(admin).await;
        if outstanding == 0 && queued.as_ref().is_ok_and(|&(m, f)| m == 0 && f == 0) {
            let took = started.elapsed().as_secs_f64();
            out.progress(format!(
                "converged {took:.1} s after the load: every answer in, every accepted message \
                 and receipt resolved, relay queues empty"
            ));
            return Ok(took);
        }
        let queues = match &queued {
            Ok((m, f)) => format!("{m} queued ({f} in flight)"),
            Err(e) => format!("queues unknown ({e})"),
        };
        if started.elapsed() >= limit {
            return Err(format!(
                "not converged within --drain {limit:?}: {outstanding} still expected by the \
                 checker, relay: {queues}"
            ));
        }
        if last_progress.elapsed() >= DRAIN_PROGRESS {
            last_progress = Instant::now();
            out.progress(format!(
                "draining: {outstanding} still expected; relay: {queues}"
            ));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// (messages, in flight) over every queue of the relay.
async fn queue_depth(admin: SocketAddr) -> Result<(u64, u64), String> {
    let rows = probe::queues(admin).await?;
    Ok(rows
        .iter()
        .fold((0, 0), |(m, f), r| (m + r.messages, f + r.in_flight)))
}

/// The checker and the stress ledger followed the same messages; they must agree.
fn cross_check(v: &Verdict, t: &Tally, problems: &mut Vec<String>) {
    let pairs = [
        ("sent", v.sent, t.sent),
        ("accepted", v.accepted, t.accepted),
        (
            "redeliveries / duplicate_copies",
            v.redeliveries,
            t.duplicate_copies,
        ),
    ];
    for (what, checker, ledger) in pairs {
        if checker != ledger {
            problems.push(format!(
                "the checker and the stress ledger disagree on {what}: {checker} against {ledger}"
            ));
        }
    }
    // The ledger counts any copy as a delivery, the checker only what a platform admitted,
    // so the ledger can find fewer lost, never more.
    if t.lost > v.lost {
        problems.push(format!(
            "the stress ledger counts {} lost, the checker {}",
            t.lost, v.lost
        ));
    }
    if !t.is_consistent() {
        problems.push(format!("the stress ledger's classes do not add up: {t:?}"));
    }
}
