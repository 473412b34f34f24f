//! The scenarios. Each opens a [`Session`] (a relay to test and the connected platforms),
//! runs one or more phases, and closes it into a [`Report`].

pub mod bulk;
pub mod crashloop;
pub mod max;
pub mod outage;
pub mod soak;
pub mod steady;
pub mod surge;

use crate::Error;
use crate::cli::{OutputArgs, TargetArgs, WorkloadArgs};
use crate::fleet::{Fleet, PhaseSpec};
use crate::plot::{self, Track};
use crate::producer::Schedule;
use crate::report::{Machine, PhaseReport, Report, utc_now};
use crate::setup::Settings;
use crate::target::{External, OwnRelay, Target, relay_binary};
use crate::workload::Workload;
use std::time::Duration;

/// The SDK's pending limit in open loop: high, so that the schedule, not the SDK, sets the pace.
const OPEN_LOOP_PENDING: usize = 65_536;

/// A relay to test: started here, or already running.
pub struct Relay {
    /// How to reach it.
    pub target: Target,
    own: Option<OwnRelay>,
}

impl Relay {
    /// Starts a relay with `platforms` platforms (plus `extra_toml`), or resolves `--relay`.
    pub fn open(t: &TargetArgs, platforms: usize, extra_toml: &str) -> Result<Self, Error> {
        if let Some(url) = &t.relay {
            let target = External {
                url: url.clone(),
                data_dir: t.data_dir.clone(),
                keys: t.keys.clone(),
                ca: t.ca.clone(),
                admin: t.admin.clone(),
            }
            .resolve()
            .map_err(Error::Target)?;
            return Ok(Self { target, own: None });
        }
        let bin = relay_binary(t.relay_bin.as_deref()).map_err(Error::Target)?;
        if bin.to_string_lossy().contains("/debug/") {
            eprintln!(
                "warning: {} is a debug build; figures are not representative",
                bin.display()
            );
        }
        let own = OwnRelay::start(
            &bin,
            &Settings {
                platforms,
                verify: t.verify,
                sample_fraction: t.sample_fraction,
                extra_toml: extra_toml.to_string(),
            },
            t.transport,
            t.keep_data.as_deref(),
        )
        .map_err(Error::Target)?;
        Ok(Self {
            target: own.target.clone(),
            own: Some(own),
        })
    }

    /// Stops a relay started here.
    pub fn stop(self) {
        if let Some(own) = self.own {
            own.stop(Duration::from_secs(15));
        }
    }
}

/// Builds the workload from the flags; `names` are the platforms of the target, in order.
pub fn workload(w: &WorkloadArgs, names: &[String], closed: bool) -> Result<Workload, Error> {
    if w.platforms == 0 || w.gateways == 0 || w.users == 0 {
        return Err(Error::Usage(
            "--platforms, --gateways and --users must be at least 1".into(),
        ));
    }
    let mut silent = Vec::new();
    for name in &w.silent {
        let i = names
            .iter()
            .take(w.platforms)
            .position(|n| n == name)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--silent {name}: not one of the platforms in use ({})",
                    names
                        .iter()
                        .take(w.platforms)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        silent.push(i);
    }
    if silent.len() >= w.platforms {
        return Err(Error::Usage(
            "every platform is silent: nobody would send".into(),
        ));
    }
    Ok(Workload {
        platforms: w.platforms,
        gateways: w.gateways,
        users: w.users,
        size: w.size.clone(),
        mix: w.mix,
        window: w.window,
        max_pending: if closed {
            w.concurrency.max(1)
        } else {
            OPEN_LOOP_PENDING
        },
        silent,
        sources: Vec::new(),
        seed: w.seed,
    })
}

/// The workload as the report shows it.
pub fn workload_view(w: &Workload, names: &[String], closed: bool) -> serde_json::Value {
    serde_json::json!({
        "platforms": w.platforms,
        "gateways": w.gateways,
        "users": w.users,
        "size": w.size.to_string(),
        "mix": w.mix.to_string(),
        "window": w.window,
        "loop": if closed { "closed" } else { "open" },
        "concurrency": if closed { Some(w.max_pending) } else { None },
        "silent": w.silent.iter().map(|&i| names[i].clone()).collect::<Vec<_>>(),
        "seed": w.seed,
    })
}

/// A phase with the output settings.
pub fn phase_spec(
    index: u16,
    name: &str,
    schedule: Schedule,
    o: &OutputArgs,
    default_sample: Duration,
) -> PhaseSpec {
    PhaseSpec {
        index,
        name: name.to_string(),
        schedule,
        duration_cap: None,
        outage: None,
        drain: o.drain,
        sample_every: o.sample_every.unwrap_or(default_sample),
        presign_limit: o.presign_limit,
        sign_threads: o
            .sign_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        progress: (!o.quiet).then_some(Duration::from_secs(5)),
    }
}

/// A relay and the platforms connected to it, running phases.
pub struct Session {
    /// The platforms.
    pub fleet: Fleet,
    relay: Relay,
    names: Vec<String>,
    closed: bool,
    /// Reports of the phases run so far.
    pub phases: Vec<PhaseReport>,
}

impl Session {
    /// Opens the relay and connects the platforms.
    pub async fn open(
        t: &TargetArgs,
        w: &WorkloadArgs,
        closed: bool,
        extra_toml: &str,
    ) -> Result<Self, Error> {
        let relay = Relay::open(t, w.platforms, extra_toml)?;
        let names: Vec<String> = relay
            .target
            .platforms
            .iter()
            .map(|k| k.peer.clone())
            .collect();
        let workload = workload(w, &names, closed)?;
        let fleet = Fleet::connect(relay.target.clone(), workload).await?;
        Ok(Self {
            fleet,
            relay,
            names,
            closed,
            phases: Vec::new(),
        })
    }

    /// Names of the platforms in use.
    pub fn platform_names(&self) -> Vec<String> {
        self.fleet.platform_names()
    }

    /// Runs a phase and keeps its report.
    pub async fn phase(&mut self, spec: &PhaseSpec) -> Result<&PhaseReport, Error> {
        let run = self.fleet.run_phase(spec).await?;
        let offered = match &spec.schedule {
            Schedule::Open(p) => {
                Some(p.expected_count() as f64 / p.duration().as_secs_f64().max(1e-9))
            }
            Schedule::Closed { .. } => None,
        };
        let report = PhaseReport::new(
            &spec.name,
            self.fleet.ledger.tally(Some(spec.index)),
            self.fleet.book.phase(spec.index),
            run,
            offered,
        );
        if report.run.drained {
            self.fleet.ledger.retire(spec.index);
        }
        self.phases.push(report);
        Ok(self.phases.last().expect("just pushed"))
    }

    /// Closes the platforms and the relay, and writes the report (summary, JSON, SVG).
    pub async fn finish(
        self,
        scenario: &str,
        output: &OutputArgs,
        result: serde_json::Value,
        problems: Vec<String>,
    ) -> Result<Report, Error> {
        let accounting = self.fleet.ledger.tally(None);
        let workload = workload_view(&self.fleet.workload, &self.names, self.closed);
        let transport = self
            .fleet
            .target
            .url
            .split("://")
            .next()
            .unwrap_or("")
            .to_string();
        self.fleet.close().await;
        let description = self.relay.target.description.clone();
        self.relay.stop();
        let mut report = Report {
            scenario: scenario.to_string(),
            command: command_line(),
            date: utc_now(),
            machine: Machine::here(),
            relay: description,
            transport,
            workload,
            accounting,
            phases: self.phases,
            result,
            problems,
        };
        report.check_accounting();
        write_outputs(&report, output)?;
        Ok(report)
    }
}

/// Prints the summary and writes the JSON and SVG files asked for.
pub fn write_outputs(report: &Report, output: &OutputArgs) -> Result<(), Error> {
    print!("{}", report.summary());
    if let Some(path) = &output.json {
        report.write_json(path).map_err(|e| Error::Output {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        println!("json: {}", path.display());
    }
    if let Some(path) = &output.svg {
        let mut offset = 0.0;
        let mut tracks = Vec::new();
        for p in &report.phases {
            tracks.push(Track {
                name: &p.name,
                offset_s: offset,
                points: &p.run.series,
            });
            offset += p.run.series.last().map_or(0.0, |s| s.t_s);
        }
        plot::write_svg(
            path,
            &format!("stress {} — {}", report.scenario, report.date),
            &tracks,
        )
        .map_err(|detail| Error::Output {
            path: path.display().to_string(),
            detail,
        })?;
        println!("svg: {}", path.display());
    }
    Ok(())
}

/// This process's command line, for reports.
pub fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}
