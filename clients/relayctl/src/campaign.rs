//! `relayctl campaign status|cancel ID`: ask the relay about one of our campaigns, or stop it,
//! and print its status as a table (or JSON). `broadcast` ends with the same table.

use crate::connect::RelayArgs;
use anyhow::Context;
use relay_client::{CampaignCounts, CampaignStatus, ReconnectPolicy};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a campaign's status: its state and recipient counts per platform.
    Status(QueryArgs),
    /// Cancel a campaign (what is not delivered yet never will be) and print its status.
    Cancel(QueryArgs),
}

#[derive(Debug, clap::Args)]
struct QueryArgs {
    /// The campaign id: 32 hex digits, as `relayctl broadcast` prints it.
    #[arg(value_parser = parse_campaign_id)]
    id: [u8; 16],
    #[command(flatten)]
    relay: RelayArgs,
    /// Print the status as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Give up (exit non-zero) without an answer after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// A campaign id from its hex form.
pub fn parse_campaign_id(text: &str) -> Result<[u8; 16], String> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(text.trim(), &mut id)
        .map_err(|e| format!("{text:?} is not a campaign id (32 hex digits): {e}"))?;
    Ok(id)
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (q, cancel) = match args.command {
        Command::Status(q) => (q, false),
        Command::Cancel(q) => (q, true),
    };
    let client = q.relay.connect(ReconnectPolicy::default()).await?;
    let id = hex::encode(q.id);
    let query = async {
        if cancel {
            client.cancel_campaign(q.id).await
        } else {
            client.campaign_status(q.id).await
        }
    };
    let result = tokio::time::timeout(Duration::from_secs(q.timeout), query).await;
    client.close().await;
    let status = result
        .map_err(|_| anyhow::anyhow!("no answer about campaign {id} within {}s", q.timeout))?
        .with_context(|| format!("campaign {id}"))?;
    if q.json {
        println!("{}", status_json(&status));
    } else {
        print!("{}", table(&status));
    }
    Ok(ExitCode::SUCCESS)
}

fn counts_json(c: &CampaignCounts) -> Value {
    json!({
        "accepted": c.accepted,
        "delivered": c.delivered,
        "pending": c.pending,
        "expired": c.expired,
        "rejected": c.rejected,
        "cancelled": c.cancelled,
    })
}

/// The status as one JSON object.
pub fn status_json(status: &CampaignStatus) -> Value {
    let platforms: Vec<Value> = status
        .platforms
        .iter()
        .map(|p| {
            let mut v = counts_json(p);
            v["platform"] = json!(p.platform);
            v
        })
        .collect();
    json!({
        "campaign": hex::encode(status.campaign_id),
        "state": status.state.name(),
        "label": status.label,
        "total": counts_json(&status.total),
        "platforms": platforms,
    })
}

/// The status as a headline and a table, one row per platform and one for the total.
pub fn table(status: &CampaignStatus) -> String {
    const HEADERS: [&str; 7] = [
        "platform",
        "accepted",
        "delivered",
        "pending",
        "expired",
        "rejected",
        "cancelled",
    ];
    let row = |name: &str, c: &CampaignCounts| {
        [
            name.to_string(),
            c.accepted.to_string(),
            c.delivered.to_string(),
            c.pending.to_string(),
            c.expired.to_string(),
            c.rejected.to_string(),
            c.cancelled.to_string(),
        ]
    };
    let mut rows = vec![HEADERS.map(str::to_string)];
    rows.extend(status.platforms.iter().map(|p| row(&p.platform, p)));
    rows.push(row("total", &status.total));
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = format!(
        "campaign {} state {}",
        hex::encode(status.campaign_id),
        status.state
    );
    if !status.label.is_empty() {
        let _ = write!(out, " label {:?}", status.label);
    }
    out.push('\n');
    for r in &rows {
        let mut line = format!("{:<w$}", r[0], w = widths[0]);
        for (cell, w) in r.iter().zip(widths).skip(1) {
            let _ = write!(line, "  {cell:>w$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_client::CampaignState;

    fn status() -> CampaignStatus {
        let beta = CampaignCounts {
            platform: "beta".into(),
            accepted: 1200,
            delivered: 1000,
            pending: 200,
            ..Default::default()
        };
        CampaignStatus {
            campaign_id: [0xab; 16],
            state: CampaignState::Sending,
            label: "storm".into(),
            total: CampaignCounts {
                platform: String::new(),
                rejected: 3,
                ..beta.clone()
            },
            platforms: vec![beta],
        }
    }

    #[test]
    fn table_lines_up() {
        let t = table(&status());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            format!("campaign {} state sending label \"storm\"", "ab".repeat(16))
        );
        assert_eq!(
            lines[1],
            "platform  accepted  delivered  pending  expired  rejected  cancelled"
        );
        assert_eq!(
            lines[2],
            "beta          1200       1000      200        0         0          0"
        );
        assert_eq!(
            lines[3],
            "total         1200       1000      200        0         3          0"
        );
    }

    #[test]
    fn json_and_ids() {
        let v = status_json(&status());
        assert_eq!(v["campaign"], "ab".repeat(16));
        assert_eq!(v["state"], "sending");
        assert_eq!(v["total"]["rejected"], 3);
        assert_eq!(v["platforms"][0]["platform"], "beta");
        assert_eq!(v["platforms"][0]["delivered"], 1000);
        assert_eq!(parse_campaign_id(&"0f".repeat(16)), Ok([0x0f; 16]));
        assert!(parse_campaign_id("0f0f").is_err());
    }
}
