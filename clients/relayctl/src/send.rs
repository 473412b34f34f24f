//! `relayctl send`: one message, printed by id once the relay has it.

use crate::connect::RelayArgs;
use anyhow::Context;
use bytes::Bytes;
use federation_spec::lane;
use relay_client::{Lane, OutgoingMessage, ReconnectPolicy};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    relay: RelayArgs,
    /// Sending user of our platform; `alice` becomes `alice@<peer of the key file>`.
    #[arg(long)]
    from: String,
    /// Recipient, user@platform.
    #[arg(long)]
    to: String,
    /// Lane: chat or call.
    #[arg(long, default_value = "chat", value_parser = parse_lane)]
    lane: Lane,
    /// Time to live in seconds (0: the lane's default).
    #[arg(long, default_value_t = 0)]
    ttl: u32,
    /// Media type of the text.
    #[arg(long, default_value = "text/plain")]
    content_type: String,
    /// Give up (exit non-zero) if the relay has not accepted the message after this many
    /// seconds, reconnecting meanwhile if the connection drops.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// The message text.
    text: String,
}

/// A lane a person-to-person message may use.
pub fn parse_lane(name: &str) -> Result<Lane, String> {
    match lane::from_name(name) {
        Some(l @ (Lane::Chat | Lane::Call)) => Ok(l),
        _ => Err(format!("{name:?} is not a message lane (chat or call)")),
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.relay.connect(ReconnectPolicy::default()).await?;
    let message = OutgoingMessage {
        to: args.to,
        from_user: args.from,
        lane: args.lane,
        ttl_s: args.ttl,
        content_type: args.content_type,
        payload: Bytes::from(args.text.into_bytes()),
    };
    let prepared = client.prepare(message).context("message")?;
    let id = prepared.id();
    let result = tokio::time::timeout(
        Duration::from_secs(args.timeout),
        client.send_prepared(prepared),
    )
    .await;
    client.close().await;
    let receipt = result
        .map_err(|_| anyhow::anyhow!("message {id} not accepted within {}s", args.timeout))?
        .with_context(|| format!("message {id}"))?;
    println!("{}", receipt.id);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes() {
        assert_eq!(parse_lane("chat"), Ok(Lane::Chat));
        assert_eq!(parse_lane("call"), Ok(Lane::Call));
        assert!(parse_lane("bulk").is_err());
        assert!(parse_lane("x").is_err());
    }
}
