//! `stress`: the load and surge simulator and benchmark of the federation relay.
//!
//! The generator acts as real platforms over the real protocol (QUIC or WebSocket, through
//! the `relay-client` SDK): N platforms, G gateway sessions each, M users, a size
//! distribution and a lane mix, open loop (a rate profile) or closed loop (a count as fast as
//! answers come). It starts its own relay (release binary, temp dir, generated set-up) or
//! targets a running one.
//!
//! - [`workload`]: sizes, lane mix, rate profiles; [`producer`]: plans and signs messages
//!   before they are due.
//! - [`fleet`]: the connected gateways, and one phase of load; [`gateway`]: a gateway's
//!   sender, answer collector and receiver; [`accounting`]: what became
//!   of every message; [`latency`]: HdrHistograms; [`sampler`], [`probe`]: the time series
//!   and the relay's CPU, memory, store and queues.
//! - [`target`], [`setup`]: the relay under test.
//! - [`scenario`]: steady, max, surge, outage, bulk, soak, crashloop; [`compare`]: relay against NATS.
//! - [`report`], [`plot`]: summary, JSON, SVG.

pub mod accounting;
pub mod cli;
pub mod compare;
pub mod fleet;
pub mod gateway;
pub mod latency;
pub mod plot;
pub mod probe;
pub mod producer;
pub mod report;
pub mod sampler;
pub mod scenario;
pub mod setup;
pub mod target;
pub mod workload;

use cli::{Cli, Command};

/// Why a run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The relay could not be started or reached.
    #[error("relay: {0}")]
    Target(String),
    /// The platforms could not connect or run.
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
    /// Flags that cannot work together.
    #[error("{0}")]
    Usage(String),
    /// A report file could not be written.
    #[error("writing {path}: {detail}")]
    Output {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
}

/// What a run ended with.
#[derive(Debug)]
pub enum Outcome {
    /// A scenario's report.
    Report(Box<report::Report>),
    /// The comparison.
    Compare(Box<compare::Comparison>),
    /// The crash loop's findings.
    Crashloop(Box<scenario::crashloop::CrashReport>),
}

impl Outcome {
    /// The process exit code: 0 when nothing was lost, 1 when something was (or the relay
    /// part of a comparison failed).
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Report(r) if r.ok() => 0,
            Outcome::Report(_) => 1,
            Outcome::Compare(c) if c.relay_failed => 1,
            Outcome::Compare(_) => 0,
            Outcome::Crashloop(c) if c.ok() => 0,
            Outcome::Crashloop(_) => 1,
        }
    }
}

/// Runs the command.
pub async fn run(cli: Cli) -> Result<Outcome, Error> {
    Ok(match cli.command {
        Command::Steady(a) => Outcome::Report(Box::new(scenario::steady::run(&a, "").await?)),
        Command::Max(a) => Outcome::Report(Box::new(scenario::max::run(&a).await?)),
        Command::Surge(a) => Outcome::Report(Box::new(scenario::surge::run(&a).await?)),
        Command::Outage(a) => Outcome::Report(Box::new(scenario::outage::run(&a).await?)),
        Command::Soak(a) => Outcome::Report(Box::new(scenario::soak::run(&a).await?)),
        Command::Bulk(a) => Outcome::Report(Box::new(scenario::bulk::run(&a).await?)),
        Command::Compare(a) => Outcome::Compare(Box::new(compare::run(&a).await?)),
        Command::Crashloop(a) => Outcome::Crashloop(Box::new(scenario::crashloop::run(&a).await?)),
    })
}
