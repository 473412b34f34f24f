//! The command line. Scenario names, flags and JSON keys are an interface: scripts and the
//! acceptance checks use them.

use crate::setup::Verify;
use crate::target::Transport;
use crate::workload::{LaneMix, SizeDist, SpecError, parse_duration};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Load and surge simulator and benchmark of the federation relay.
#[derive(Debug, Parser)]
#[command(name = "stress", version, about, long_about = None)]
pub struct Cli {
    /// The scenario.
    #[command(subcommand)]
    pub command: Command,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fixed rate (open loop) for a duration; or, with --closed, a count as fast as the relay answers.
    Steady(SteadyArgs),
    /// Step the rate up until p99 passes the limit or anything is rejected; report the highest good rate.
    Max(MaxArgs),
    /// Pilgrimage-season surge: baseline, ramp to 10x with bursts of call signalling, back down.
    Surge(SurgeArgs),
    /// One platform offline for a while under load: queue build-up, then the drain after it returns.
    Outage(OutageArgs),
    /// Chat alone, then chat while a campaign to K recipients fans out: chat p99 with and
    /// without, campaign recipients/s, relay RSS and store size.
    Bulk(BulkArgs),
    /// A long run watching the relay's memory and store size for growth.
    Soak(SoakArgs),
    /// The same workload against the relay (verify all, verify sample), NATS core and JetStream.
    Compare(CompareArgs),
    /// SIGKILL the relay binary at random moments under mixed load, restart it on the same data, and check that nothing accepted was lost.
    Crashloop(CrashloopArgs),
}

fn duration(s: &str) -> Result<Duration, SpecError> {
    parse_duration(s)
}

/// Which relay.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// A running relay (quic://HOST:PORT or ws://HOST:PORT). Without it, stress starts its own.
    #[arg(long, value_name = "URL")]
    pub relay: Option<String>,
    /// With --relay: the relay's data dir (keys/, tls/cert.pem, relay.toml, store/).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// With --relay: directory of platform key files (instead of --data-dir).
    #[arg(long, value_name = "DIR")]
    pub keys: Option<PathBuf>,
    /// With --relay: certificate to trust (instead of --data-dir).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// With --relay: its admin address (default: from DATA_DIR/relay.toml).
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// The relay binary to start (default: `relay` next to this executable).
    #[arg(long, value_name = "PATH")]
    pub relay_bin: Option<PathBuf>,
    /// Transport of a relay stress starts itself.
    #[arg(long, value_enum, default_value = "quic")]
    pub transport: Transport,
    /// Signature verification of a relay stress starts itself.
    #[arg(long, value_enum, default_value = "all")]
    pub verify: Verify,
    /// With --verify sample.
    #[arg(long, default_value_t = 0.01)]
    pub sample_fraction: f64,
    /// Write the started relay's data dir here and keep it (default: a temp dir, deleted).
    #[arg(long, value_name = "DIR")]
    pub keep_data: Option<PathBuf>,
}

/// Who sends what.
#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    /// Platforms (each sends to the others).
    #[arg(long, default_value_t = 4)]
    pub platforms: usize,
    /// Gateway sessions per platform.
    #[arg(long, default_value_t = 2)]
    pub gateways: usize,
    /// Simulated users per platform.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Payload bytes: N, LO-HI (uniform), or SIZE:WEIGHT,... (e.g. 128:70,1024:25,16384:5).
    #[arg(long, default_value = "256")]
    pub size: SizeDist,
    /// Lane weights, e.g. call=5,chat=95.
    #[arg(long, default_value = "call=5,chat=95")]
    pub mix: LaneMix,
    /// Receive window each gateway asks for (un-acked deliveries).
    #[arg(long, default_value_t = 4096)]
    pub window: u32,
    /// Closed loop: unanswered messages per gateway.
    #[arg(long, default_value_t = 1024)]
    pub concurrency: usize,
    /// Platforms (by name) that receive but never ack; their messages must expire with notice.
    #[arg(long, value_delimiter = ',', value_name = "NAME")]
    pub silent: Vec<String>,
    /// Seed of the generator's choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Outputs and bookkeeping.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Write the report as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Plot throughput, p99 latency and queue depth over time as SVG.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Sampling interval of the time series (default 1s; soak 5s).
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub sample_every: Option<Duration>,
    /// Longest wait after the load for answers, deliveries and expiry notices.
    #[arg(long, value_parser = duration, default_value = "30s", value_name = "DURATION")]
    pub drain: Duration,
    /// Sign every message before the timed part when a phase has at most this many.
    #[arg(long, default_value_t = 2_000_000)]
    pub presign_limit: u64,
    /// Signing threads (default: the number of cores).
    #[arg(long)]
    pub sign_threads: Option<usize>,
}

/// `stress steady`.
#[derive(Debug, Clone, Args)]
pub struct SteadyArgs {
    /// Offered rate, msgs/s, all platforms together (open loop).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// How long.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub duration: Duration,
    /// Closed loop: send --count as fast as answers come back (--concurrency per gateway).
    #[arg(long, conflicts_with = "rate")]
    pub closed: bool,
    /// Closed loop: messages to send (the duration still caps the run).
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TargetArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
}

/// `stress max`.
#[derive(Debug, Clone, Args)]
pub struct MaxArgs {
    /// First rate, msgs/s.
    #[arg(long, default_value_t = 2000.0)]
    pub start_rate: f64,
    /// Each step multiplies the rate by this.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// Length of a step.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub step: Duration,
    /// Most steps (not counting refinement).
    #[arg(long, default_value_t = 12)]
    pub max_steps: usize,
    /// Never offer more than this, msgs/s.
    #[arg(long, default_value_t = 1_000_000.0)]
    pub max_rate: f64,
    /// A step fails when its p99 (corrected) is above this.
    #[arg(long, value_parser = duration, default_value = "50ms")]
    pub p99_limit: Duration,
    /// Bisection steps between the last good and the first failed rate.
    #[arg(long, default_value_t = 2)]
    pub refine: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TargetArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
}

/// `stress surge`.
#[derive(Debug, Clone, Args)]
pub struct SurgeArgs {
    /// Baseline rate, msgs/s.
    #[arg(long, default_value_t = 1000.0)]
    pub baseline: f64,
    /// Peak = baseline × this.
    #[arg(long, default_value_t = 10.0)]
    pub factor: f64,
    /// Whole profile: 20% baseline, 15% ramp up, 30% peak with bursts, 15% ramp down, 20% baseline.
    #[arg(long, value_parser = duration, default_value = "60s")]
    pub duration: Duration,
    /// During the peak, a call-signalling burst starts this often.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub burst_every: Duration,
    /// And lasts this long.
    #[arg(long, value_parser = duration, default_value = "1s")]
    pub burst_length: Duration,
    /// Percent of call signalling during a burst.
    #[arg(long, default_value_t = 50)]
    pub burst_call: u32,
    /// Rate multiplier during a burst.
    #[arg(long, default_value_t = 1.2)]
    pub burst_rate_factor: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TargetArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
}

/// `stress outage`.
#[derive(Debug, Clone, Args)]
pub struct OutageArgs {
    /// Offered rate, msgs/s.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Length of the load.
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub duration: Duration,
    /// The platform that goes offline (default: the second).
    #[arg(long, value_name = "NAME")]
    pub offline: Option<String>,
    /// When it goes offline, after the start.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub offline_at: Duration,
    /// For how long (T).
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub offline_for: Duration,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TargetArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
}

/// `stress bulk`.
#[derive(Debug, Clone, Args)]
pub struct BulkArgs {
    /// Campaign recipients, spread evenly over the platforms.
    #[arg(long, default_value_t = 100_000)]
    pub recipients: u64,
    /// Recipients per CampaignChunk.
    #[arg(long, default_value_t = 10_000)]
    pub chunk: u64,
    /// Campaign recipients per second the relay sends each platform (0: no limit); the
    /// relay's default is 100,000.
    #[arg(long, default_value_t = 100_000)]
    pub bulk_rate: u32,
    /// Campaign recipients per second the relay accepts from the broadcaster (0: no limit);
    /// the relay's default is 500,000.
    #[arg(long, default_value_t = 500_000)]
    pub accept_rate: u32,
    /// Chat (and call, per --mix) offered in each phase, msgs/s.
    #[arg(long, default_value_t = 1000.0)]
    pub chat_rate: f64,
    /// Length of each phase (without, then with the campaign).
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub duration: Duration,
    /// Longest wait for the campaign to be done.
    #[arg(long, value_parser = duration, default_value = "10m")]
    pub campaign_limit: Duration,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TargetArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
}

/// `stress soak`.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Offered rate, msgs/s.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long.
    #[arg(long, value_parser = duration, default_value = "10m")]
    pub duration: Duration,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TargetArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArgs,
}

/// `stress compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Messages per system.
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    /// Write {"relay_all", "relay_sample", "nats_core", "jetstream"} as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Payload bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Unanswered messages allowed at once (relay: unaccepted; JetStream: unacked publishes;
    /// NATS core: published, not yet received).
    #[arg(long, default_value_t = 4096)]
    pub concurrency: usize,
    /// Receive window of the relay's consumer.
    #[arg(long, default_value_t = 8192)]
    pub window: u32,
    /// Transport to the relay.
    #[arg(long, value_enum, default_value = "quic")]
    pub transport: Transport,
    /// The relay binary (default: `relay` next to this executable).
    #[arg(long, value_name = "PATH")]
    pub relay_bin: Option<PathBuf>,
    /// Fraction verified for relay_sample.
    #[arg(long, default_value_t = 0.01)]
    pub sample_fraction: f64,
    /// nats-server binary (default: `nats-server` on PATH).
    #[arg(long, value_name = "PATH")]
    pub nats_server: Option<PathBuf>,
    /// Only the relay.
    #[arg(long)]
    pub skip_nats: bool,
    /// Longest wait for the last deliveries of each system.
    #[arg(long, value_parser = duration, default_value = "60s")]
    pub drain: Duration,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
}

/// `stress crashloop`.
#[derive(Debug, Clone, Args)]
pub struct CrashloopArgs {
    /// SIGKILLs of the relay, each followed by a restart on the same data dir and ports.
    #[arg(long, default_value_t = 10)]
    pub kills: u32,
    /// Shortest time the relay runs, once ready, before the next kill.
    #[arg(long, value_parser = duration, default_value = "500ms", value_name = "DURATION")]
    pub min_gap: Duration,
    /// Longest time the relay runs before the next kill (uniform between the two).
    #[arg(long, value_parser = duration, default_value = "3s", value_name = "DURATION")]
    pub max_gap: Duration,
    /// After the kills, also stop the relay once with SIGTERM under load, time its drain
    /// (drain_ms) against its 10 s bound, and restart it.
    #[arg(long)]
    pub sigterm: bool,
    /// Offered load, msgs/s, all gateways together (open loop).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Cap on the kill loop; reaching it before the last kill fails the run.
    #[arg(long, value_parser = duration, default_value = "10m", value_name = "DURATION")]
    pub duration: Duration,
    /// Gateway sessions per platform (alpha, beta, gamma); they alternate QUIC and WebSocket.
    #[arg(long, default_value_t = 2)]
    pub gateways: usize,
    /// Users per platform.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Payload bytes: N, LO-HI (uniform), or SIZE:WEIGHT,...
    #[arg(long, default_value = "256")]
    pub size: SizeDist,
    /// Lane weights.
    #[arg(long, default_value = "call=20,chat=80")]
    pub mix: LaneMix,
    /// A receiving gateway sends a delivery receipt for 1 in K messages it takes in (0: none).
    #[arg(long, default_value_t = 4, value_name = "K")]
    pub receipt_every: u64,
    /// Campaign recipients per second from the broadcaster `news` (0: no campaigns).
    #[arg(long, default_value_t = 500.0)]
    pub campaign_rate: f64,
    /// Seed of the kill times and the traffic.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Longest wait after the load for every answer, delivery, notice and receipt, and for
    /// the relay's queues to empty.
    #[arg(long, value_parser = duration, default_value = "90s", value_name = "DURATION")]
    pub drain: Duration,
    /// Longest wait for the relay to be ready after a start.
    #[arg(long, value_parser = duration, default_value = "30s", value_name = "DURATION")]
    pub ready_timeout: Duration,
    /// The relay binary (default: `relay` next to this executable).
    #[arg(long, value_name = "PATH")]
    pub relay_bin: Option<PathBuf>,
    /// Write the relay's data dir here and keep it (default: a temp dir, kept only when the
    /// run fails).
    #[arg(long, value_name = "DIR")]
    pub keep_data: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress lines (the summary is still printed).
    #[arg(long)]
    pub quiet: bool,
}
