//! `relay`: the federation relay server. This file only parses the command line, sets up
//! logging, and turns signals into reload and drain; the relay itself is in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use relay::{config, demo, server::Relay};
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(version, about = "Federation relay between messaging platforms")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args, Clone, Default)]
struct ServeArgs {
    /// Configuration file. Without it: DATA_DIR/relay.toml, written with a demo set-up on the first start.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory when no --config is given.
    #[arg(long, global = true, default_value = "relay-data")]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve,
    /// Print a commented example configuration.
    ConfigExample,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::ConfigExample) => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
        Some(Command::Serve) | None => serve(cli.serve),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (path, fresh) = match args.config {
        Some(path) => (path, false),
        None => {
            let fresh = demo::bootstrap(&args.data_dir).with_context(|| {
                format!("writing the demo set-up into {}", args.data_dir.display())
            })?;
            (demo::config_path(&args.data_dir), fresh)
        }
    };
    let loaded = config::load(&path)?;
    init_logging(&loaded.config.log);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let relay = Relay::start(loaded.clone()).await?;
        print_banner(&relay, &loaded, fresh);
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    if let Err(e) = relay.reload() {
                        tracing::error!(error = %e, "reload refused; the previous registry stays");
                    }
                }
                _ = relay.router_failed() => {
                    relay.shutdown(Duration::from_secs(10)).await;
                    anyhow::bail!("the router task failed (see the log); the relay stopped so that it can be restarted");
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        relay.shutdown(Duration::from_secs(10)).await;
        Ok(())
    })
}

fn init_logging(log: &config::Log) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.filter));
    // A log line that cannot be written (stderr on a full disk) must not take the relay down:
    // tracing-subscriber reports its own write errors by printing to stderr, which panics
    // when stderr is the full disk.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false);
    if log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn print_banner(relay: &Relay, loaded: &config::Loaded, fresh: bool) {
    let show =
        |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
    if fresh {
        println!(
            "first start: wrote a demo set-up into {} (platforms alpha, beta, gamma; broadcaster news)",
            loaded.data_dir.display()
        );
    }
    println!("relay {} listening", loaded.config.relay_id);
    println!("  quic      quic://{}", show(relay.quic_addr));
    println!("  websocket ws://{}", show(relay.ws_addr));
    println!(
        "  admin     http://{}  (/livez /readyz /metrics /v1/peers /v1/queues)",
        show(relay.admin_addr)
    );
    println!("  config    {}", loaded.path.display());
    let dir = loaded.data_dir.display();
    if let Some(addr) = relay.quic_addr {
        println!("try it, in another terminal:");
        println!(
            "  relayctl listen --relay quic://{addr} --key {dir}/keys/beta.key --ca {dir}/tls/cert.pem --count 1"
        );
        println!(
            "  relayctl send --relay quic://{addr} --key {dir}/keys/alpha.key --ca {dir}/tls/cert.pem --from alice --to bob@beta \"hello from alpha\""
        );
    }
}
