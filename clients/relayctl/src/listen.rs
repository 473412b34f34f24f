//! `relayctl listen`: incoming messages, receipts and expiries as JSON lines on stdout, each
//! acknowledged once printed (printing is taking custody, for a command-line tool). A campaign
//! delivery prints one message line per recipient, with the campaign's id.

use crate::connect::RelayArgs;
use federation_spec::lane;
use relay_client::{BulkDelivery, Event, Lane, OutgoingReceipt, ReceiptKind, ReconnectPolicy};
use serde_json::{Value, json};
use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    relay: RelayArgs,
    /// Exit after printing this many message lines (0: never); each recipient of a campaign
    /// delivery is one. A campaign delivery cut short by it is not acknowledged: the relay
    /// delivers it again later, whole.
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

/// The JSON lines for an event: none, one, or one per recipient of a campaign delivery.
pub fn event_lines(event: &Event) -> Vec<Value> {
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
        Event::Bulk(b) => return bulk_lines(b),
        _ => return Vec::new(),
    };
    vec![line]
}

/// A message line per recipient, as if the campaign's message had been sent to each.
fn bulk_lines(b: &BulkDelivery) -> Vec<Value> {
    let m = b.message.as_deref();
    let campaign = hex::encode(&b.campaign_id);
    b.recipients
        .iter()
        .map(|to| {
            json!({
                "type": "message",
                "id": m.map(|m| m.id.to_string()),
                "from": m.map(|m| m.from.as_str()),
                "to": to,
                "lane": lane::name(Lane::Bulk),
                "text": m.map(|m| String::from_utf8_lossy(&m.payload)),
                "content_type": m.map(|m| m.content_type.as_str()),
                "created_at_ms": m.map(|m| m.created_at_ms),
                "verified": m.is_some_and(|m| m.verified),
                "tag": b.tag.value(),
                "campaign": campaign,
            })
        })
        .collect()
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = args
        .relay
        .config(ReconnectPolicy::default())?
        .with_receive_window(args.window);
    let mut client = relay_client::Client::connect(config).await?;
    let mut printed = 0u64;
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = client.next_event().await {
        match &event {
            Event::Disconnected { reason, .. } => tracing::warn!(reason, "disconnected"),
            Event::Reconnected(info) => tracing::info!(session = %info.session_id, "reconnected"),
            _ => {}
        }
        let counted = matches!(event, Event::Message(_) | Event::Bulk(_));
        let lines = event_lines(&event);
        let room = match args.count {
            0 => usize::MAX,
            n if counted => usize::try_from(n - printed).unwrap_or(usize::MAX),
            _ => usize::MAX,
        };
        for line in lines.iter().take(room) {
            writeln!(stdout, "{line}")?;
        }
        stdout.flush()?;
        if counted {
            printed += lines.len().min(room) as u64;
        }
        if lines.len() > room {
            // Cut short by --count: not taken into custody, so not acknowledged.
            break;
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
        if args.count != 0 && printed >= args.count {
            break;
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
