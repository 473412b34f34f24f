//! `stress`: parses the command line, runs the scenario, and turns its outcome into the exit
//! code (non-zero when a message was lost).

use clap::Parser;
use std::process::ExitCode;
use stress::Outcome;
use stress::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(e) => {
            eprintln!("stress: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Runtime::new()?;
    Ok(runtime.block_on(stress::run(cli))?)
}
