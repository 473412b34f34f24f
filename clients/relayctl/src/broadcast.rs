//! `relayctl broadcast`: one text to every recipient of a file, as a campaign (SPEC.md 9).
//!
//! The file is streamed in chunks with many in flight (the SDK holds at most
//! `max_pending_chunks` of them, so memory stays flat whatever the file's size). The command
//! returns once every chunk and the End are acknowledged, that is once the relay holds the
//! whole campaign durably, and prints a summary per platform; with `--wait` it first follows
//! delivery until the campaign is done or cancelled. It prints `campaign <id>` on stdout as
//! soon as the relay has the campaign, so that a caller can follow or cancel it meanwhile.

use crate::campaign::table;
use crate::connect::RelayArgs;
use crate::progress::{Progress, Tally};
use crate::recipients::{self, Recipients};
use anyhow::{Context, bail};
use bytes::Bytes;
use relay_client::{Campaign, CampaignSpec, ClientHandle, Event, ReconnectPolicy};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// How often `--wait` asks for the campaign's status.
const STATUS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    relay: RelayArgs,
    /// Recipients: one user@platform per line (blank lines and # comments skipped), or a CSV
    /// file whose header has an `address`, `recipient` or `user` column.
    #[arg(long)]
    recipients: PathBuf,
    /// The message text.
    #[arg(long)]
    text: String,
    /// Sender address, one of our peer's (default: broadcast@<peer of the key file>).
    #[arg(long)]
    from: Option<String>,
    /// Label shown in the campaign's status and the relay's logs (at most 128 bytes).
    #[arg(long, default_value = "")]
    label: String,
    /// Time to live in seconds (0: the bulk lane's default).
    #[arg(long, default_value_t = 0)]
    ttl: u32,
    /// Recipients per chunk (lowered to the relay's max_chunk_recipients if above it).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    chunk: u32,
    /// Once the relay has the campaign, follow its delivery until it is done or cancelled.
    #[arg(long)]
    wait: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Read the file's shape before connecting: a bad file is the user's to fix first.
    let total = recipients::count(&args.recipients)?;
    if total == 0 {
        bail!("{}: no recipients", args.recipients.display());
    }
    let reader = recipients::open(&args.recipients)?;
    let client = args.relay.connect(ReconnectPolicy::default()).await?;
    let peer = client.peer().to_string();
    let (handle, mut events) = client.split();
    // Pushed statuses are polled for instead; the events must be read all the same.
    let events = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::Disconnected { reason, .. } => tracing::warn!(reason, "disconnected"),
                Event::Reconnected(info) => {
                    tracing::info!(session = %info.session_id, "reconnected")
                }
                _ => {}
            }
        }
    });
    let result = broadcast(&handle, args, &peer, total, reader).await;
    handle.close().await;
    let _ = events.await;
    result
}

async fn broadcast(
    handle: &ClientHandle,
    args: Args,
    peer: &str,
    total: u64,
    reader: Recipients,
) -> anyhow::Result<ExitCode> {
    let spec = CampaignSpec {
        from: args.from.unwrap_or_else(|| format!("broadcast@{peer}")),
        payload: Bytes::from(args.text.into_bytes()),
        content_type: "text/plain".into(),
        ttl_s: args.ttl,
        label: args.label,
        campaign_id: None,
    };
    let campaign = handle
        .begin_campaign(spec)
        .await
        .context("the relay did not take the campaign")?;
    let id = hex::encode(campaign.id());
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "campaign {id}")?;
    stdout.flush()?;
    drop(stdout);

    let limit = handle
        .session()
        .map_or(args.chunk, |s| s.limits.max_chunk_recipients);
    let size = args.chunk.min(limit.max(1));
    if size < args.chunk {
        eprintln!("chunks of {size} recipients: the relay takes no more per chunk");
    }
    let left_open = || {
        format!(
            "campaign {id} is left open at the relay; `relayctl campaign cancel {id}` stops \
             what it has"
        )
    };
    let progress = Progress::new(total);
    let (chunks, progress) = send_all(&campaign, reader, size as usize, progress)
        .await
        .with_context(left_open)?;
    let totals = campaign
        .end(chunks)
        .await
        .context("ending the campaign")
        .with_context(left_open)?;
    progress.finish();
    eprintln!(
        "the relay has campaign {id}: {chunks} chunks, {} recipients accepted, {} rejected",
        totals.accepted, totals.rejected
    );
    let status = if args.wait {
        follow(&campaign, progress).await?
    } else {
        match campaign.status().await {
            Ok(status) => status,
            Err(e) => {
                // The campaign is durable at the relay: that is what this command promised.
                eprintln!("relayctl: no final status ({e}); the campaign itself is sent");
                return Ok(ExitCode::SUCCESS);
            }
        }
    };
    print!("{}", table(&status));
    Ok(ExitCode::SUCCESS)
}

/// Streams the recipients in chunks, many in flight, until every chunk is acknowledged.
/// Returns the number of chunks and the progress display.
async fn send_all(
    campaign: &Campaign,
    reader: Recipients,
    size: usize,
    mut progress: Progress,
) -> anyhow::Result<(u32, Progress)> {
    let tally = Arc::new(Tally::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let ticker = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(progress.tick());
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = interval.tick() => progress.sending(tally.counts(), false),
                    _ = &mut stopped => break,
                }
            }
            progress.sending(tally.counts(), true);
            progress
        })
    };
    let result = send_chunks(campaign, reader, size, &tally).await;
    let _ = stop.send(());
    let progress = ticker.await.context("progress display")?;
    Ok((result?, progress))
}

async fn send_chunks(
    campaign: &Campaign,
    reader: Recipients,
    size: usize,
    tally: &Arc<Tally>,
) -> anyhow::Result<u32> {
    let mut answers: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let mut seq = 0u32;
    for chunk in recipients::chunks(reader, size) {
        let chunk = chunk?;
        seq = seq
            .checked_add(1)
            .context("more chunks than a campaign can have")?;
        let count = chunk.len();
        // Waits while the SDK holds its maximum of chunks: the file is read no faster than
        // the relay takes it.
        let pending = campaign
            .submit_chunk(seq, chunk)
            .await
            .with_context(|| format!("chunk {seq}"))?;
        tally.sent(count);
        let tally = tally.clone();
        answers.spawn(async move {
            let ack = pending.await.with_context(|| format!("chunk {seq}"))?;
            tally.acked(count, &ack);
            Ok(())
        });
        // A chunk refused for good ends the broadcast at once.
        while let Some(done) = answers.try_join_next() {
            done.context("chunk task")??;
        }
    }
    while let Some(done) = answers.join_next().await {
        done.context("chunk task")??;
    }
    Ok(seq)
}

/// Follows delivery until the campaign is done or cancelled; returns its last status.
async fn follow(
    campaign: &Campaign,
    mut progress: Progress,
) -> anyhow::Result<relay_client::CampaignStatus> {
    loop {
        let status = campaign.status().await.context("campaign status")?;
        progress.delivery(&status);
        if status.state.is_finished() {
            progress.finish();
            return Ok(status);
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
}
