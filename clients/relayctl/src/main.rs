//! `relayctl`: generate keys, send and receive messages, broadcast campaigns and follow
//! them, and probe a relay's health.

mod broadcast;
mod campaign;
mod connect;
mod health;
mod keygen;
mod listen;
mod progress;
mod recipients;
mod send;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Command-line client of the federation relay.
#[derive(Debug, Parser)]
#[command(name = "relayctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a key file and print its public key (hex).
    Keygen(keygen::Args),
    /// Send one text message and print its id once the relay has accepted it.
    Send(send::Args),
    /// Print incoming messages as JSON lines, acknowledging each after printing it.
    Listen(listen::Args),
    /// Send one text to every recipient of a file as a campaign (broadcaster keys only);
    /// print its id, then a summary per platform once the relay has it all.
    Broadcast(broadcast::Args),
    /// Status or cancellation of one of our campaigns.
    Campaign(campaign::Args),
    /// Check the relay's admin probes (/livez and /readyz).
    Health(health::Args),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(args) => keygen::run(args),
        Command::Send(args) => send::run(args).await,
        Command::Listen(args) => listen::run(args).await,
        Command::Broadcast(args) => broadcast::run(args).await,
        Command::Campaign(args) => campaign::run(args).await,
        Command::Health(args) => health::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("relayctl: {e:#}");
            // A refusal by the relay is an answer, not a failure to get one.
            match e.downcast_ref::<relay_client::SendError>() {
                Some(relay_client::SendError::Rejected { .. }) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
