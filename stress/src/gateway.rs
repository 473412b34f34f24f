//! The three tasks of a gateway session during a run: the sender (hands signed messages to
//! the SDK on schedule, on its own thread), the answer collector (records Accepted and
//! Rejected in the ledger), and the receiver (records deliveries and expiry notices, acks in
//! batches).

use crate::accounting::{Delivery, Ledger};
use crate::fleet::{Clock, ReceiverStats};
use crate::latency::{LatencyBook, Sample};
use crate::producer::Item;
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use relay_client::{
    ClientHandle, Event, Events, MessageId, PendingSend, SendError, SendReceipt, error_code_name,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Events handled before acks and samples are flushed.
const BATCH: usize = 1024;
/// A sender sleeps only when its next message is at least this far ahead; closer ones go at
/// once. At high rates this saves a thread wake-up per message, for an error of at most this
/// much in the send time (the OS timer is late by about as much anyway).
const MIN_SLEEP: Duration = Duration::from_micros(100);

/// What a sender needs to know about its phase.
pub(crate) struct SendCtx {
    pub(crate) phase: u16,
    pub(crate) open: bool,
    pub(crate) t0: Instant,
    pub(crate) t0_ns: u64,
    pub(crate) deadline: Option<Instant>,
    pub(crate) clock: Clock,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) closed_before_answer: Arc<AtomicU64>,
}

/// What a sender did.
#[derive(Default)]
pub(crate) struct SendStats {
    pub(crate) not_sent: u64,
    pub(crate) max_lag_ns: u64,
    pub(crate) last_submit: Option<Instant>,
}

/// Hands one gateway's messages to the SDK: on schedule (open loop), or as fast as the
/// SDK's pending limit lets it (closed loop).
///
/// It runs on its own thread and waits with the OS timer (tens of µs) rather than tokio's
/// (1 ms ticks), so that the generator's own lateness barely shows in the latency measured
/// from the schedule. Handing a message to the SDK only touches channels and a semaphore.
pub(crate) fn send(
    ctx: SendCtx,
    runtime: tokio::runtime::Handle,
    mut blocks: mpsc::Receiver<Vec<Item>>,
    handle: watch::Receiver<ClientHandle>,
    mut online: watch::Receiver<bool>,
    answers: mpsc::Sender<PendingSend>,
) -> SendStats {
    let mut stats = SendStats::default();
    'blocks: while let Some(block) = blocks.blocking_recv() {
        let mut items = block.into_iter();
        while let Some(item) = items.next() {
            if ctx.open {
                let due = ctx.t0 + Duration::from_nanos(item.due_ns);
                if let Some(wait) = due.checked_duration_since(Instant::now())
                    && wait >= MIN_SLEEP
                {
                    std::thread::sleep(wait);
                }
            }
            if ctx.deadline.is_some_and(|d| Instant::now() >= d) {
                stats.not_sent += 1 + items.len() as u64;
                break 'blocks;
            }
            if !*online.borrow() {
                let _ = runtime.block_on(online.wait_for(|o| *o));
            }
            let client = handle.borrow().clone();
            let submit_ns = ctx.clock.now_ns();
            let due_ns = if ctx.open {
                ctx.t0_ns + item.due_ns
            } else {
                submit_ns
            };
            stats.max_lag_ns = stats.max_lag_ns.max(submit_ns.saturating_sub(due_ns));
            ctx.ledger
                .sent(ctx.phase, item.id, item.lane, due_ns, submit_ns);
            match runtime.block_on(client.submit(item.msg)) {
                Ok(pending) => {
                    if answers.blocking_send(pending).is_err() {
                        break 'blocks;
                    }
                }
                Err(e) => record_refusal(&ctx.ledger, item.id, &e, &ctx.closed_before_answer),
            }
            stats.last_submit = Some(Instant::now());
        }
    }
    // Anything still queued for this gateway was never sent.
    blocks.close();
    while let Ok(block) = blocks.try_recv() {
        stats.not_sent += block.len() as u64;
    }
    stats
}

/// A refusal goes to the ledger by reason. A closed client is not a refusal: the relay may
/// have accepted the message, so it stays unconfirmed unless it shows up.
fn record_refusal(ledger: &Ledger, id: MessageId, e: &SendError, closed: &AtomicU64) {
    let reason = match e {
        SendError::Rejected { code, .. } => error_code_name(*code),
        SendError::Invalid(_) => "INVALID",
        SendError::Expired => "EXPIRED_BEFORE_ACCEPT",
        SendError::DuplicateId => "DUPLICATE_ID",
        SendError::Closed(_) => {
            closed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    ledger.rejected(id, reason);
}

/// Records the relay's answers as they come.
pub(crate) async fn collect(
    mut rx: mpsc::Receiver<PendingSend>,
    ledger: Arc<Ledger>,
    clock: Clock,
    closed: Arc<AtomicU64>,
) {
    let mut pending = FuturesUnordered::new();
    let record = |(id, result): (MessageId, Result<SendReceipt, SendError>)| match result {
        Ok(_) => ledger.accepted(id, clock.now_ns()),
        Err(e) => record_refusal(&ledger, id, &e, &closed),
    };
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some(p) => pending.push(Answer(p)),
                None => break,
            },
            Some(done) = pending.next(), if !pending.is_empty() => record(done),
        }
    }
    while let Some(done) = pending.next().await {
        record(done);
    }
}

/// An answer paired with its message id.
struct Answer(PendingSend);

impl std::future::Future for Answer {
    type Output = (MessageId, Result<SendReceipt, SendError>);

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let id = self.0.id();
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| (id, r))
    }
}

/// Reads one gateway's events: records deliveries and notices, acks in batches. A silent
/// platform never acks and records nothing.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn receive(
    mut events: Events,
    handle: ClientHandle,
    ledger: Arc<Ledger>,
    book: Arc<LatencyBook>,
    stats: Arc<ReceiverStats>,
    clock: Clock,
    silent: bool,
    platform: usize,
) {
    let mut tags = Vec::with_capacity(BATCH);
    let mut samples = Vec::with_capacity(BATCH);
    let mut delivered = 0u64;
    while let Some(first) = events.next().await {
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(event) = next.take() {
            handled += 1;
            let now_ns = clock.now_ns();
            match &event {
                Event::Message(_) if silent => {
                    stats.held_unacked.fetch_add(1, Ordering::Relaxed);
                }
                Event::Message(m) => {
                    if let Delivery::First {
                        phase,
                        lane,
                        due_ns,
                        submit_ns,
                    } = ledger.delivered(m.id, now_ns)
                    {
                        delivered += 1;
                        samples.push(Sample {
                            phase,
                            lane,
                            corrected_ns: now_ns.saturating_sub(due_ns),
                            service_ns: now_ns.saturating_sub(submit_ns),
                        });
                    }
                }
                Event::Expired(e) if !silent => ledger.expired(e.id),
                Event::Bulk(b) if !silent => {
                    let n = b.recipients.len() as u64;
                    stats.bulk_recipients.fetch_add(n, Ordering::Relaxed);
                    stats.bulk_frames.fetch_add(1, Ordering::Relaxed);
                }
                Event::Disconnected { .. } => {
                    stats.disconnects.fetch_add(1, Ordering::Relaxed);
                }
                Event::Reconnected(_) => {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            if !silent && let Some(tag) = event.tag() {
                tags.push(tag);
            }
            if handled < BATCH {
                next = events.next().now_or_never().flatten();
            }
        }
        handle.ack_many(&tags);
        tags.clear();
        book.record(&samples);
        samples.clear();
        if let Some(c) = stats.delivered_to.get(platform) {
            c.fetch_add(delivered, Ordering::Relaxed);
        }
        delivered = 0;
    }
}
