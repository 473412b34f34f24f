//! The message producer: plans every message of a phase (who sends what to whom, when) and
//! signs it before it is due, on its own threads, so that the timed part only moves bytes.
//!
//! Messages are made in blocks (one second of schedule, or a few thousand in closed loop)
//! and handed to each sending gateway over a bounded channel. When the whole phase fits in
//! memory (`presign_limit`), every block is signed before the phase starts; otherwise the
//! producer runs a few blocks ahead of the schedule, and its signing shares the CPU with the
//! relay (the report says so).

use crate::accounting::LaneKind;
use crate::workload::{LaneMix, MIN_PAYLOAD, Profile, Workload};
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};
use relay_client::{MessageId, OutgoingMessage, PreparedMessage, prepare_message, unix_now_ms};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Blocks signed ahead of the schedule when the phase does not fit in memory.
const LOOKAHEAD_BLOCKS: usize = 4;
/// Messages per block in closed loop.
const CLOSED_BLOCK: u64 = 4096;
/// One block of open-loop schedule.
const OPEN_BLOCK_NS: u64 = 1_000_000_000;

/// One signed message, ready to hand to the SDK.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its id.
    pub id: MessageId,
    /// Its lane.
    pub lane: LaneKind,
    /// When it is due, ns after the phase start (0 in closed loop).
    pub due_ns: u64,
    /// The signed frame.
    pub msg: PreparedMessage,
}

/// When messages go.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Open loop: at the profile's rate, whatever the relay does.
    Open(Profile),
    /// Closed loop: this many, as fast as answers come back.
    Closed {
        /// How many.
        count: u64,
    },
}

impl Schedule {
    /// Messages it will produce (about, for open loop).
    pub fn count(&self) -> u64 {
        match self {
            Schedule::Open(p) => p.expected_count(),
            Schedule::Closed { count } => *count,
        }
    }
}

/// A platform as the producer sees it.
#[derive(Clone)]
pub struct Sender {
    /// Peer id.
    pub peer: String,
    /// Its signing key.
    pub key: SigningKey,
}

/// Everything the producer needs for one phase.
#[derive(Clone)]
pub struct Spec {
    /// When messages go.
    pub schedule: Schedule,
    /// Every platform, by index (destinations are drawn among all of them).
    pub platforms: Vec<Sender>,
    /// Sizes, mix, users, gateways, silent platforms, seed.
    pub workload: Workload,
    /// Platforms that do not send during [from, to) ns after the phase start (an outage).
    pub offline: Vec<(usize, u64, u64)>,
    /// The wall clock (ms) the phase is expected to start at: `created_at_ms` is set to it
    /// plus the due time, so that a message's age is right when it goes.
    pub start_unix_ms: u64,
    /// Above this many messages, sign while the phase runs instead of before.
    pub presign_limit: u64,
    /// Signing threads.
    pub threads: usize,
}

/// The producer's report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    /// Messages made.
    pub messages: u64,
    /// Time spent signing (wall clock, all signing threads together).
    pub sign_s: f64,
    /// Every message was signed before the phase started.
    pub presigned: bool,
}

/// A running producer.
pub struct Producer {
    /// One receiver per gateway (index `platform * gateways + gateway`), `None` for gateways
    /// that do not send.
    pub outputs: Vec<Option<mpsc::Receiver<Vec<Item>>>>,
    /// Fires once the phase may start (everything signed, or the look-ahead filled).
    pub ready: oneshot::Receiver<()>,
    /// The thread, returning its statistics.
    pub thread: std::thread::JoinHandle<Result<Stats, String>>,
}

/// What one slot will be, before signing.
struct Planned {
    gateway: usize,
    platform: usize,
    due_ns: u64,
    seq: u64,
    lane: LaneKind,
    size: usize,
    from_user: String,
    to: String,
}

/// Starts the producer thread.
pub fn start(spec: Spec) -> Producer {
    let w = &spec.workload;
    let gateways = w.gateways.max(1);
    let total = spec.schedule.count();
    let presigned = total <= spec.presign_limit;
    let blocks = match &spec.schedule {
        Schedule::Open(p) => (p.duration().as_nanos() as u64).div_ceil(OPEN_BLOCK_NS) as usize,
        Schedule::Closed { count } => count.div_ceil(CLOSED_BLOCK) as usize,
    };
    let capacity = if presigned {
        blocks + 1
    } else {
        LOOKAHEAD_BLOCKS
    };
    let mut txs = Vec::new();
    let mut outputs = Vec::new();
    for p in 0..spec.platforms.len() {
        for _ in 0..gateways {
            if !w.sends(p) {
                txs.push(None);
                outputs.push(None);
            } else {
                let (tx, rx) = mpsc::channel(capacity.max(1));
                txs.push(Some(tx));
                outputs.push(Some(rx));
            }
        }
    }
    let (ready_tx, ready) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("stress-producer".into())
        .spawn(move || produce(spec, txs, ready_tx, presigned))
        .expect("spawning the producer thread");
    Producer {
        outputs,
        ready,
        thread,
    }
}

fn produce(
    spec: Spec,
    txs: Vec<Option<mpsc::Sender<Vec<Item>>>>,
    ready: oneshot::Sender<()>,
    presigned: bool,
) -> Result<Stats, String> {
    let mut signing = Duration::ZERO;
    let mut out = Output {
        txs,
        ready: Some(ready),
        presigned,
        blocks: 0,
        made: 0,
    };
    let w = &spec.workload;
    let gateways = w.gateways.max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(w.seed);
    let mut next_gateway = vec![0usize; spec.platforms.len()];
    let mut seq = 0u64;
    let mut block: Vec<Planned> = Vec::new();
    let mut block_end = OPEN_BLOCK_NS;
    let closed = matches!(spec.schedule, Schedule::Closed { .. });
    let slots: Box<dyn Iterator<Item = (u64, Option<LaneMix>)> + '_> = match &spec.schedule {
        Schedule::Open(p) => Box::new(p.slots()),
        Schedule::Closed { count } => Box::new((0..*count).map(|_| (0u64, None))),
    };
    let mut wanted = true;
    for (due_ns, mix) in slots {
        let boundary = if closed {
            block.len() as u64 >= CLOSED_BLOCK
        } else {
            due_ns >= block_end
        };
        if boundary {
            if !block.is_empty() {
                let started = Instant::now();
                let signed = sign_block(&spec, std::mem::take(&mut block))?;
                signing += started.elapsed();
                wanted = out.push(signed);
                if !wanted {
                    break;
                }
            }
            while due_ns >= block_end {
                block_end += OPEN_BLOCK_NS;
            }
        }
        let Some(platform) = pick_source(&spec, &mut rng, due_ns) else {
            continue;
        };
        let dest = pick_dest(spec.platforms.len(), platform, &mut rng);
        let gateway = next_gateway[platform];
        next_gateway[platform] = (gateway + 1) % gateways;
        let lane = mix.unwrap_or(w.mix).pick(&mut rng);
        block.push(Planned {
            gateway: platform * gateways + gateway,
            platform,
            due_ns,
            seq,
            lane,
            size: w.size.sample(&mut rng),
            from_user: format!("u{}", rng.gen_range(0..w.users.max(1))),
            to: format!(
                "u{}@{}",
                rng.gen_range(0..w.users.max(1)),
                spec.platforms[dest].peer
            ),
        });
        seq += 1;
    }
    if wanted && !block.is_empty() {
        let started = Instant::now();
        let signed = sign_block(&spec, block)?;
        signing += started.elapsed();
        out.push(signed);
    }
    out.signal_ready();
    Ok(Stats {
        messages: out.made,
        sign_s: signing.as_secs_f64(),
        presigned,
    })
}

/// Where signed blocks go.
struct Output {
    txs: Vec<Option<mpsc::Sender<Vec<Item>>>>,
    ready: Option<oneshot::Sender<()>>,
    presigned: bool,
    blocks: usize,
    made: u64,
}

impl Output {
    /// Hands a block to the gateways; false once the phase no longer wants any.
    fn push(&mut self, per_gateway: Vec<Vec<Item>>) -> bool {
        for (g, items) in per_gateway.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let n = items.len() as u64;
            if let Some(Some(tx)) = self.txs.get(g) {
                if tx.blocking_send(items).is_err() {
                    return false;
                }
                self.made += n;
            }
        }
        self.blocks += 1;
        if !self.presigned && self.blocks >= LOOKAHEAD_BLOCKS - 1 {
            self.signal_ready();
        }
        true
    }

    fn signal_ready(&mut self) {
        if let Some(r) = self.ready.take() {
            let _ = r.send(());
        }
    }
}

/// A sending platform that is online at `due_ns`, uniformly.
fn pick_source(spec: &Spec, rng: &mut impl Rng, due_ns: u64) -> Option<usize> {
    let n = spec.platforms.len();
    let eligible = |p: usize| {
        spec.workload.sends(p)
            && !spec
                .offline
                .iter()
                .any(|&(o, from, to)| o == p && (from..to).contains(&due_ns))
    };
    let count = (0..n).filter(|&p| eligible(p)).count();
    if count == 0 {
        return None;
    }
    let k = rng.gen_range(0..count);
    (0..n).filter(|&p| eligible(p)).nth(k)
}

/// Another platform than `source`, uniformly (itself when it is alone).
fn pick_dest(n: usize, source: usize, rng: &mut impl Rng) -> usize {
    if n < 2 {
        return source;
    }
    let d = rng.gen_range(0..n - 1);
    if d >= source { d + 1 } else { d }
}

/// Signs a block on `spec.threads` threads and sorts the items per gateway, in due order.
fn sign_block(spec: &Spec, block: Vec<Planned>) -> Result<Vec<Vec<Item>>, String> {
    let gateways = spec.platforms.len() * spec.workload.gateways.max(1);
    let threads = spec.threads.clamp(1, 16);
    let chunk = block.len().div_ceil(threads).max(1);
    let signed: Vec<Result<Vec<(usize, Item)>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = block
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|p| sign(spec, p)).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("signing thread panicked".into()))
            })
            .collect()
    });
    let mut out: Vec<Vec<Item>> = (0..gateways).map(|_| Vec::new()).collect();
    for part in signed {
        for (g, item) in part? {
            out[g].push(item);
        }
    }
    Ok(out)
}

fn sign(spec: &Spec, p: &Planned) -> Result<(usize, Item), String> {
    let sender = &spec.platforms[p.platform];
    let mut payload = Vec::with_capacity(p.size.max(MIN_PAYLOAD));
    payload.extend_from_slice(&p.due_ns.to_le_bytes());
    payload.extend_from_slice(&p.seq.to_le_bytes());
    payload.extend((payload.len()..p.size).map(|i| b'a' + (i % 26) as u8));
    let created_at_ms = match spec.schedule {
        Schedule::Open(_) => spec.start_unix_ms + p.due_ns / 1_000_000,
        Schedule::Closed { .. } => unix_now_ms(),
    };
    let id = MessageId::random();
    let msg = prepare_message(
        &sender.key,
        &sender.peer,
        OutgoingMessage {
            to: p.to.clone(),
            from_user: p.from_user.clone(),
            lane: p.lane.lane(),
            ttl_s: 0,
            content_type: String::new(),
            payload: Bytes::from(payload),
        },
        id,
        created_at_ms,
    )
    .map_err(|e| format!("preparing a message from {}: {e}", sender.peer))?;
    Ok((
        p.gateway,
        Item {
            id,
            lane: p.lane,
            due_ns: p.due_ns,
            msg,
        },
    ))
}

/// Messages signed before the phase may start: all of them, or the look-ahead.
pub fn upfront(schedule: &Schedule, presign_limit: u64) -> u64 {
    let count = schedule.count();
    if count <= presign_limit {
        return count;
    }
    let blocks = (LOOKAHEAD_BLOCKS - 1) as u64;
    match schedule {
        Schedule::Open(p) => p
            .slots()
            .take_while(|(due, _)| *due < blocks * OPEN_BLOCK_NS)
            .count() as u64,
        Schedule::Closed { .. } => blocks * CLOSED_BLOCK,
    }
}

/// About how long signing `count` messages takes here, measured on a few.
pub fn estimate_signing(spec: &Spec, count: u64) -> Duration {
    let Some(sender) = spec.platforms.first() else {
        return Duration::ZERO;
    };
    let probe = 200u32;
    let started = Instant::now();
    for _ in 0..probe {
        let _ = prepare_message(
            &sender.key,
            &sender.peer,
            OutgoingMessage::text("u0", &format!("u0@{}", sender.peer), "probe"),
            MessageId::random(),
            0,
        );
    }
    let per = started.elapsed() / probe;
    per.mul_f64(count as f64 / spec.threads.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::SizeDist;

    fn spec(schedule: Schedule, silent: Vec<usize>) -> Spec {
        let platforms = (0..3)
            .map(|i| Sender {
                peer: format!("p{i}"),
                key: SigningKey::from_bytes(&[i as u8 + 1; 32]),
            })
            .collect();
        Spec {
            schedule,
            platforms,
            workload: Workload {
                platforms: 3,
                gateways: 2,
                users: 10,
                size: SizeDist::Fixed(64),
                mix: LaneMix { call: 1, chat: 1 },
                window: 64,
                max_pending: 64,
                silent,
                sources: Vec::new(),
                seed: 7,
            },
            offline: vec![(1, 0, 500_000_000)],
            start_unix_ms: unix_now_ms(),
            presign_limit: 1_000_000,
            threads: 2,
        }
    }

    fn drain(mut p: Producer) -> Vec<(usize, Item)> {
        let stats = p.thread.join().unwrap().unwrap();
        assert!(stats.presigned);
        let mut all = Vec::new();
        for (g, rx) in p.outputs.iter_mut().enumerate() {
            if let Some(rx) = rx {
                while let Ok(block) = rx.try_recv() {
                    all.extend(block.into_iter().map(|i| (g, i)));
                }
            }
        }
        all
    }

    #[test]
    fn open_loop_items_follow_the_schedule_per_gateway() {
        let p = start(spec(
            Schedule::Open(Profile::constant(1000.0, Duration::from_secs(2))),
            vec![2],
        ));
        let all = drain(p);
        assert_eq!(all.len(), 2000);
        for g in 0..6 {
            let dues: Vec<u64> = all
                .iter()
                .filter(|(gw, _)| *gw == g)
                .map(|(_, i)| i.due_ns)
                .collect();
            assert!(
                dues.windows(2).all(|w| w[0] <= w[1]),
                "gateway {g} in order"
            );
            if g >= 4 {
                assert!(dues.is_empty(), "silent platform 2 sends nothing");
            }
        }
        // Platform 1 is offline for the first half second.
        assert!(
            all.iter()
                .filter(|(g, _)| *g / 2 == 1)
                .all(|(_, i)| i.due_ns >= 500_000_000)
        );
        assert!(all.iter().all(|(_, i)| i.msg.frame_len() > 64));
    }

    #[test]
    fn closed_loop_makes_the_count() {
        let all = drain(start(spec(Schedule::Closed { count: 5000 }, vec![])));
        assert_eq!(all.len(), 5000);
        assert!(all.iter().all(|(_, i)| i.due_ns == 0));
    }
}
