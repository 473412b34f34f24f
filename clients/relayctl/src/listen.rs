//! `relayctl listen`: incoming messages, receipts and expiries as JSON lines on stdout, each
//! acknowledged once printed (printing is taking custody, for a command-line tool).

use crate::connect::RelayArgs;
use federation_spec::lane;
use relay_client::{Event, OutgoingReceipt, ReceiptKind, ReconnectPolicy};
use serde_json::{Value, json};
use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    relay: RelayArgs,
    /// Exit after this many messages (0: never).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Send a receipt of this kind (delivered or read) for each message.
    #[arg(long, value_parser = parse_receipt_kind)]
    receipt: Option<ReceiptKind>,
    /// Receive window: how many un-acked deliveries the relay may send at once.
    #[arg(long, default_value_t = 64)]
    window: u32,
}

fn parse_receipt_kind(name: &str) -> Result<ReceiptKind, String> {
    match name {
        "delivered" => Ok(ReceiptKind::Delivered),
        "read" => Ok(ReceiptKind::Read),
        _ => Err(format!("{name:?}: expected delivered or read")),
    }
}

fn receipt_kind_name(kind: ReceiptKind) -> &'static str {
    match kind {
        ReceiptKind::Delivered => "delivered",
        ReceiptKind::Read => "read",
        ReceiptKind::Unspecified => "unspecified",
    }
}

/// The JSON line for an event, if it is one that is printed.
pub fn event_json(event: &Event) -> Option<Value> {
    let line = match event {
        Event::Message(m) => json!({
            "type": "message",
            "id": m.id.to_string(),
            "from": m.from,
            "to": m.to,
            "lane": lane::name(m.lane),
            "text": String::from_utf8_lossy(&m.payload),
            "content_type": m.content_type,
            "created_at_ms": m.created_at_ms,
            "verified": m.verified,
            "tag": m.tag.value(),
        }),
        Event::Receipt(r) => json!({
            "type": "receipt",
            "id": r.id.to_string(),
            "from": r.from,
            "to": r.to,
            "kind": receipt_kind_name(r.kind),
            "at_ms": r.at_ms,
            "tag": r.tag.value(),
        }),
        Event::Expired(e) => json!({
            "type": "expired",
            "id": e.id.to_string(),
            "to": e.to,
            "expired_at_ms": e.expired_at_ms,
            "tag": e.tag.value(),
        }),
        Event::Bulk(b) => json!({
            "type": "bulk",
            "campaign_id": hex::encode(&b.campaign_id),
            "id": b.message.as_ref().map(|m| m.id.to_string()),
            "from": b.message.as_ref().map(|m| m.from.clone()),
            "text": b.message.as_ref().map(|m| String::from_utf8_lossy(&m.payload).into_owned()),
            "verified": b.message.as_ref().is_some_and(|m| m.verified),
            "recipients": b.recipients,
            "tag": b.tag.value(),
        }),
        _ => return None,
    };
    Some(line)
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = args
        .relay
        .config(ReconnectPolicy::default())?
        .with_receive_window(args.window);
    let mut client = relay_client::Client::connect(config).await?;
    let mut messages = 0u64;
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = client.next_event().await {
        match &event {
            Event::Disconnected { reason, .. } => tracing::warn!(reason, "disconnected"),
            Event::Reconnected(info) => tracing::info!(session = %info.session_id, "reconnected"),
            _ => {}
        }
        if let Some(line) = event_json(&event) {
            writeln!(stdout, "{line}")?;
            stdout.flush()?;
        }
        if let (Event::Message(m), Some(kind)) = (&event, args.receipt) {
            let receipt = OutgoingReceipt {
                id: m.id,
                from: m.to.clone(),
                to: m.from.clone(),
                kind,
                at_ms: 0,
            };
            match client.submit_receipt(receipt).await {
                Ok(pending) => {
                    tokio::spawn(async move {
                        if let Err(e) = pending.await {
                            tracing::warn!(error = %e, "receipt not accepted");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "receipt not sent"),
            }
        }
        if let Some(tag) = event.tag() {
            client.ack(tag);
        }
        if matches!(event, Event::Message(_)) {
            messages += 1;
            if args.count != 0 && messages >= args.count {
                break;
            }
        }
    }
    client.close().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_kinds() {
        assert_eq!(parse_receipt_kind("read"), Ok(ReceiptKind::Read));
        assert_eq!(receipt_kind_name(ReceiptKind::Delivered), "delivered");
        assert!(parse_receipt_kind("seen").is_err());
    }
}
