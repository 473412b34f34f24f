//! Campaign state: what the router knows of each campaign, how it is kept on disk, and the
//! pure rules (SPEC.md section 9) that do not need the router's queues.
//!
//! Storage is O(payload + recipients): the signed envelope is stored once, in the campaign
//! record; each accepted chunk becomes one stored item per destination platform (more if the
//! platform's recipients do not fit one frame) holding a `BulkDeliver` without envelope, so
//! the payload is never copied per recipient. At delivery the router appends the envelope to
//! the first `BulkDeliver` of a campaign on each session.
//!
//! Durable records, in the store's metadata table (written in the same commit as the items
//! and removals that change them, so a crash never leaves counts and queues disagreeing):
//!
//! | key                    | value                                              |
//! |------------------------|----------------------------------------------------|
//! | `c` · id               | [`CampaignRecord`]: owner, envelope, expiry, state |
//! | `n` · id               | [`CountsRecord`]: per-platform accepted, delivered, expired; rejected |
//! | `k` · id · seq (be32)  | [`ChunkRecord`]: the chunk's accepted and rejected counts |

use bytes::{BufMut, Bytes, BytesMut};
use federation_spec::proto::{CampaignCounts, CampaignState, CampaignStatus};
use prost::Message;
use std::collections::{BTreeMap, HashMap};

/// A campaign's id.
pub type CampaignId = [u8; 16];

/// Key prefix of campaign records.
pub const CAMPAIGN_PREFIX: u8 = b'c';
/// Key prefix of counter records.
pub const COUNTS_PREFIX: u8 = b'n';
/// Key prefix of chunk records.
pub const CHUNK_PREFIX: u8 = b'k';

/// The durable description of a campaign.
#[derive(Clone, PartialEq, Message)]
pub struct CampaignRecord {
    /// The broadcaster.
    #[prost(string, tag = "1")]
    pub owner: String,
    /// Its label.
    #[prost(string, tag = "2")]
    pub label: String,
    /// The signed envelope, as received.
    #[prost(bytes = "bytes", tag = "3")]
    pub envelope: Bytes,
    /// Its origin signature.
    #[prost(bytes = "bytes", tag = "4")]
    pub signature: Bytes,
    /// The signer's key.
    #[prost(bytes = "bytes", tag = "5")]
    pub signer: Bytes,
    /// When the relay accepted the Begin.
    #[prost(uint64, tag = "6")]
    pub accepted_at_ms: u64,
    /// When it expires.
    #[prost(uint64, tag = "7")]
    pub expires_at_ms: u64,
    /// `chunks` of the acknowledged CampaignEnd; 0 while open.
    #[prost(uint32, tag = "8")]
    pub end_chunks: u32,
    /// Whether CampaignEnd was acknowledged (`end_chunks` may be 0 for an empty campaign).
    #[prost(bool, tag = "9")]
    pub ended: bool,
    /// When it was cancelled; 0 if not.
    #[prost(uint64, tag = "10")]
    pub cancelled_at_ms: u64,
    /// When it finished (done or cancelled); 0 if not yet. Drives retention.
    #[prost(uint64, tag = "11")]
    pub finished_at_ms: u64,
}

/// Counts of one destination platform.
#[derive(Clone, PartialEq, Message)]
pub struct PlatformRecord {
    #[prost(string, tag = "1")]
    pub platform: String,
    #[prost(uint64, tag = "2")]
    pub accepted: u64,
    #[prost(uint64, tag = "3")]
    pub delivered: u64,
    #[prost(uint64, tag = "4")]
    pub expired: u64,
}

/// The durable counters of a campaign.
#[derive(Clone, PartialEq, Message)]
pub struct CountsRecord {
    #[prost(message, repeated, tag = "1")]
    pub platforms: Vec<PlatformRecord>,
    #[prost(uint64, tag = "2")]
    pub rejected: u64,
}

/// What a chunk added.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct ChunkRecord {
    #[prost(uint32, tag = "1")]
    pub accepted: u32,
    #[prost(uint32, tag = "2")]
    pub rejected: u32,
}

/// Metadata key of a campaign's record of kind `prefix`.
pub fn key(prefix: u8, id: &CampaignId) -> Bytes {
    let mut k = BytesMut::with_capacity(17);
    k.put_u8(prefix);
    k.put_slice(id);
    k.freeze()
}

/// Metadata key of a chunk record.
pub fn chunk_key(id: &CampaignId, seq: u32) -> Bytes {
    let mut k = BytesMut::with_capacity(21);
    k.put_u8(CHUNK_PREFIX);
    k.put_slice(id);
    k.put_u32(seq);
    k.freeze()
}

/// The campaign id (and chunk seq) a metadata key names.
pub fn split_key(k: &[u8]) -> Option<(CampaignId, Option<u32>)> {
    let id: CampaignId = k.get(1..17)?.try_into().ok()?;
    match k.get(17..) {
        Some([]) | None => Some((id, None)),
        Some(seq) => Some((id, Some(u32::from_be_bytes(seq.try_into().ok()?)))),
    }
}

/// Per-platform counters in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Taken on at chunk time.
    pub accepted: u64,
    /// Acknowledged by the platform (removal committed or being committed).
    pub delivered: u64,
    /// Expired before delivery.
    pub expired: u64,
    /// In a BulkDeliver sent on a session and not acked yet.
    pub in_flight: u64,
}

/// One campaign as the router holds it.
#[derive(Clone, Debug)]
pub struct Campaign {
    pub id: CampaignId,
    pub record: CampaignRecord,
    /// Encoded BulkDeliver fields 3-5 (envelope, signature, signer), appended to the first
    /// BulkDeliver of the campaign on each session.
    pub envelope_fields: Bytes,
    pub platforms: BTreeMap<String, Counts>,
    pub rejected: u64,
    /// Chunk seq -> its counts and whether its commit completed.
    pub chunks: HashMap<u32, (ChunkRecord, bool)>,
    /// Whether the Begin's commit completed.
    pub durable: bool,
}

impl Campaign {
    /// A new campaign from its record.
    pub fn new(id: CampaignId, record: CampaignRecord) -> Self {
        let envelope_fields = envelope_fields(&record);
        Self {
            id,
            record,
            envelope_fields,
            platforms: BTreeMap::new(),
            rejected: 0,
            chunks: HashMap::new(),
            durable: false,
        }
    }

    /// Recipients seen so far, accepted or rejected.
    pub fn recipients(&self) -> u64 {
        self.platforms.values().map(|c| c.accepted).sum::<u64>() + self.rejected
    }

    /// Recipients neither delivered nor expired (cancelled ones included).
    pub fn undecided(&self) -> u64 {
        self.platforms
            .values()
            .map(|c| c.accepted.saturating_sub(c.delivered + c.expired))
            .sum()
    }

    pub fn cancelled(&self) -> bool {
        self.record.cancelled_at_ms != 0
    }

    pub fn expired_at(&self, now_ms: u64) -> bool {
        now_ms >= self.record.expires_at_ms
    }

    /// Whether nothing more will change: cancelled, or ended (or expired) with nothing
    /// pending. In flight recipients of a cancelled campaign may still be acked.
    pub fn finished(&self, now_ms: u64) -> bool {
        if self.cancelled() {
            return self.platforms.values().all(|c| c.in_flight == 0);
        }
        (self.record.ended || self.expired_at(now_ms)) && self.undecided() == 0
    }

    pub fn state(&self, now_ms: u64) -> CampaignState {
        if self.cancelled() {
            CampaignState::Cancelled
        } else if self.finished(now_ms) {
            CampaignState::Done
        } else if self.record.ended {
            CampaignState::Sending
        } else {
            CampaignState::Open
        }
    }

    /// (accepted, rejected) over every chunk taken so far.
    pub fn totals(&self) -> (u64, u64) {
        let mut a = 0u64;
        let mut r = 0u64;
        for (c, _) in self.chunks.values() {
            a += u64::from(c.accepted);
            r += u64::from(c.rejected);
        }
        (a, r)
    }

    /// The status frame's content (SPEC.md 9.6).
    pub fn status(&self, now_ms: u64) -> CampaignStatus {
        let cancelled = self.cancelled();
        let mut total = CampaignCounts {
            rejected: self.rejected,
            ..Default::default()
        };
        let platforms = self
            .platforms
            .iter()
            .map(|(platform, c)| {
                let undecided = c.accepted.saturating_sub(c.delivered + c.expired);
                // A cancelled campaign's queued recipients are dropped as they come up; the
                // ones in a frame already sent may still be acked, so they stay pending.
                let (pending, cancelled) = if cancelled {
                    let pending = c.in_flight.min(undecided);
                    (pending, undecided - pending)
                } else {
                    (undecided, 0)
                };
                let counts = CampaignCounts {
                    platform: platform.clone(),
                    accepted: c.accepted,
                    delivered: c.delivered,
                    pending,
                    expired: c.expired,
                    rejected: 0,
                    cancelled,
                };
                total.accepted += counts.accepted;
                total.delivered += counts.delivered;
                total.pending += counts.pending;
                total.expired += counts.expired;
                total.cancelled += counts.cancelled;
                counts
            })
            .collect();
        CampaignStatus {
            campaign_id: Bytes::copy_from_slice(&self.id),
            state: self.state(now_ms) as i32,
            label: self.record.label.clone(),
            total: Some(total),
            platforms,
        }
    }

    /// The durable counters record.
    pub fn counts_record(&self) -> Bytes {
        CountsRecord {
            platforms: self
                .platforms
                .iter()
                .map(|(p, c)| PlatformRecord {
                    platform: p.clone(),
                    accepted: c.accepted,
                    delivered: c.delivered,
                    expired: c.expired,
                })
                .collect(),
            rejected: self.rejected,
        }
        .encode_to_vec()
        .into()
    }

    /// Restores the counters from their record.
    pub fn restore_counts(&mut self, record: &CountsRecord) {
        self.rejected = record.rejected;
        for p in &record.platforms {
            self.platforms.insert(
                p.platform.clone(),
                Counts {
                    accepted: p.accepted,
                    delivered: p.delivered,
                    expired: p.expired,
                    in_flight: 0,
                },
            );
        }
    }

    /// The record, encoded.
    pub fn record_bytes(&self) -> Bytes {
        self.record.encode_to_vec().into()
    }
}

/// BulkDeliver fields 3 (envelope), 4 (signature), 5 (signer), encoded.
fn envelope_fields(r: &CampaignRecord) -> Bytes {
    #[derive(Message)]
    struct Fields {
        #[prost(bytes = "bytes", tag = "3")]
        envelope: Bytes,
        #[prost(bytes = "bytes", tag = "4")]
        signature: Bytes,
        #[prost(bytes = "bytes", tag = "5")]
        signer: Bytes,
    }
    Fields {
        envelope: r.envelope.clone(),
        signature: r.signature.clone(),
        signer: r.signer.clone(),
    }
    .encode_to_vec()
    .into()
}

/// Campaign id and recipient count of a stored BulkDeliver's inner bytes. The router asks at
/// every dispatch, ack and expiry of a campaign item, so the fields are walked, not decoded:
/// thousands of recipients are counted without a value being allocated for each.
pub fn bulk_info(inner: Bytes) -> Option<(CampaignId, u64)> {
    use bytes::Buf;
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    let mut buf = inner;
    let mut id = None;
    let mut recipients = 0u64;
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf).ok()?;
        if matches!(tag, 2 | 6) && wire_type != WireType::LengthDelimited {
            return None;
        }
        if tag == 2 {
            // As a decoder would: the last occurrence of a singular field wins.
            let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
            if buf.remaining() < len {
                return None;
            }
            id = Some(buf.split_to(len));
            continue;
        }
        if tag == 6 {
            recipients += 1;
        }
        skip_field(wire_type, tag, &mut buf, DecodeContext::default()).ok()?;
    }
    Some((id?.as_ref().try_into().ok()?, recipients))
}

/// A chunk's recipients, checked, grouped by destination platform and encoded as the stored
/// BulkDeliver bodies, by the broadcaster's session: the router only has to store them.
#[derive(Debug, Clone, Default)]
pub struct PreparedChunk {
    /// Recipients offered.
    pub offered: u64,
    /// Recipients refused: not an address, or of no registered platform.
    pub rejected: u64,
    /// Per destination platform: its recipients and their stored bodies.
    pub platforms: Vec<(String, u64, Vec<Bytes>)>,
}

impl PreparedChunk {
    /// Recipients taken on.
    pub fn accepted(&self) -> u64 {
        self.offered - self.rejected
    }
}

/// Prepares a chunk of campaign `id` of `owner`: recipients that are addresses of a platform
/// (`is_platform`) are grouped by platform, in groups whose recipient fields fit `budget`
/// bytes, each encoded as a stored BulkDeliver record accepted at `now_ms`.
pub fn prepare_chunk(
    owner: &str,
    id: &CampaignId,
    recipients: Vec<String>,
    is_platform: impl Fn(&str) -> bool,
    budget: usize,
    now_ms: u64,
) -> PreparedChunk {
    let offered = recipients.len() as u64;
    let mut by_platform: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut rejected = 0;
    for r in recipients {
        match federation_spec::address::parse(&r) {
            Ok(a) if is_platform(a.platform) => {
                let platform = a.platform.to_string();
                by_platform.entry(platform).or_default().push(r);
            }
            _ => rejected += 1,
        }
    }
    let header = crate::record::Header {
        kind: crate::record::RecordKind::Bulk,
        origin: owner.to_string(),
        id: *id,
        to: String::new(),
        accepted_at_ms: now_ms,
    };
    let platforms = by_platform
        .into_iter()
        .map(|(platform, list)| {
            let n = list.len() as u64;
            let bodies = split_recipients(list, budget)
                .into_iter()
                .map(|group| {
                    let inner = federation_spec::proto::BulkDeliver {
                        campaign_id: Bytes::copy_from_slice(id),
                        recipients: group,
                        ..Default::default()
                    };
                    crate::record::encode(&header, &inner.encode_to_vec())
                })
                .collect();
            (platform, n, bodies)
        })
        .collect();
    PreparedChunk {
        offered,
        rejected,
        platforms,
    }
}

/// Splits one platform's recipients into groups whose BulkDeliver fits `budget` bytes of
/// recipient fields (each costs its length, a length varint and a key byte).
pub fn split_recipients(recipients: Vec<String>, budget: usize) -> Vec<Vec<String>> {
    let mut groups = Vec::new();
    let mut current = Vec::new();
    let mut used = 0usize;
    for r in recipients {
        let cost = 1 + prost::encoding::encoded_len_varint(r.len() as u64) + r.len();
        if !current.is_empty() && used + cost > budget {
            groups.push(std::mem::take(&mut current));
            used = 0;
        }
        used += cost;
        current.push(r);
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// What a [`RecipientBucket`] holds, in seconds of its rate.
const BURST_S: f64 = 0.1;

/// A token bucket of recipients that may run into debt: a chunk larger than the bucket still
/// passes when the bucket is not in debt, and the debt delays what comes after, so the average
/// rate holds whatever the chunk size. The bucket holds a tenth of a second's worth: a campaign
/// is spread evenly over time instead of arriving in one-second bursts that would crowd out
/// chat and calls on the same cores.
#[derive(Debug, Clone)]
pub struct RecipientBucket {
    rate: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl RecipientBucket {
    /// A full bucket of `rate` per second.
    pub fn new(rate: u32, now: std::time::Instant) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate) * BURST_S,
            last: now,
        }
    }

    fn refill(&mut self, rate: u32, now: std::time::Instant) {
        self.rate = f64::from(rate);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate * BURST_S);
        self.last = now;
    }

    /// Whether something may be sent now (the bucket is not in debt).
    pub fn ready(&mut self, rate: u32, now: std::time::Instant) -> bool {
        self.refill(rate, now);
        self.tokens > 0.0
    }

    /// Takes `n`, possibly into debt.
    pub fn spend(&mut self, n: u64) {
        self.tokens -= n as f64;
    }

    /// Takes `n` if the bucket is not in debt; otherwise how many ms until it is not.
    pub fn take(&mut self, rate: u32, n: u64, now: std::time::Instant) -> Result<(), u32> {
        if self.ready(rate, now) {
            self.spend(n);
            Ok(())
        } else {
            Err(((-self.tokens + 1.0) / self.rate.max(1.0) * 1000.0).ceil() as u32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn campaign() -> Campaign {
        Campaign::new(
            [1; 16],
            CampaignRecord {
                owner: "news".into(),
                expires_at_ms: 1_000,
                ..Default::default()
            },
        )
    }

    #[test]
    fn keys_round_trip() {
        let id = [7; 16];
        assert_eq!(split_key(&key(CAMPAIGN_PREFIX, &id)), Some((id, None)));
        assert_eq!(split_key(&chunk_key(&id, 513)), Some((id, Some(513))));
        assert_eq!(split_key(b"c123"), None);
    }

    #[test]
    fn status_keeps_the_invariant_through_cancel() {
        let mut c = campaign();
        c.platforms.insert(
            "alpha".into(),
            Counts {
                accepted: 100,
                delivered: 40,
                expired: 10,
                in_flight: 20,
            },
        );
        c.rejected = 3;
        let s = c.status(0);
        assert_eq!(s.state, CampaignState::Open as i32);
        let t = s.total.unwrap();
        assert_eq!((t.pending, t.cancelled, t.rejected), (50, 0, 3));
        c.record.cancelled_at_ms = 5;
        let s = c.status(0);
        let t = s.total.unwrap();
        assert_eq!(s.state, CampaignState::Cancelled as i32);
        assert_eq!((t.pending, t.cancelled), (20, 30));
        assert_eq!(
            t.accepted,
            t.delivered + t.pending + t.expired + t.cancelled
        );
        assert!(!c.finished(0));
        c.platforms.get_mut("alpha").unwrap().in_flight = 0;
        assert!(c.finished(0));
    }

    #[test]
    fn done_when_ended_or_expired_with_nothing_pending() {
        let mut c = campaign();
        c.platforms.insert(
            "beta".into(),
            Counts {
                accepted: 5,
                delivered: 5,
                ..Default::default()
            },
        );
        assert_eq!(c.state(10), CampaignState::Open);
        assert_eq!(c.state(1_000), CampaignState::Done);
        c.record.ended = true;
        assert_eq!(c.state(10), CampaignState::Done);
        c.platforms.get_mut("beta").unwrap().accepted = 6;
        assert_eq!(c.state(10), CampaignState::Sending);
    }

    #[test]
    fn counters_survive_their_record() {
        let mut c = campaign();
        c.platforms.insert(
            "gamma".into(),
            Counts {
                accepted: 9,
                delivered: 4,
                expired: 1,
                in_flight: 3,
            },
        );
        c.rejected = 2;
        let record = CountsRecord::decode(c.counts_record()).unwrap();
        let mut back = campaign();
        back.restore_counts(&record);
        assert_eq!(back.rejected, 2);
        assert_eq!(
            back.platforms["gamma"],
            Counts {
                in_flight: 0,
                ..c.platforms["gamma"]
            }
        );
    }

    #[test]
    fn recipients_split_within_budget() {
        let rs: Vec<String> = (0..100).map(|i| format!("user{i:03}@alpha")).collect();
        // Each costs 1 + 1 + 13 = 15 bytes.
        let groups = split_recipients(rs.clone(), 150);
        assert_eq!(groups.len(), 10);
        assert!(groups.iter().all(|g| g.len() == 10));
        assert_eq!(groups.concat(), rs);
        // One recipient larger than the budget still goes, alone.
        assert_eq!(split_recipients(rs[..2].to_vec(), 1).len(), 2);
    }

    #[test]
    fn chunks_are_grouped_by_platform_and_bad_recipients_counted() {
        let recipients = vec![
            "a@alpha".to_string(),
            "b@beta".into(),
            "c@alpha".into(),
            "not an address".into(),
            "d@nowhere".into(),
        ];
        let known = |p: &str| p == "alpha" || p == "beta";
        let c = prepare_chunk("news", &[3; 16], recipients, known, 1 << 20, 7);
        assert_eq!((c.offered, c.rejected, c.accepted()), (5, 2, 3));
        let names: Vec<(&str, u64, usize)> = c
            .platforms
            .iter()
            .map(|(p, n, b)| (p.as_str(), *n, b.len()))
            .collect();
        assert_eq!(names, vec![("alpha", 2, 1), ("beta", 1, 1)]);
        let (h, inner) = crate::record::decode(&c.platforms[0].2[0]).unwrap();
        assert_eq!(
            (h.kind, h.origin.as_str(), h.id, h.accepted_at_ms),
            (crate::record::RecordKind::Bulk, "news", [3; 16], 7)
        );
        assert_eq!(bulk_info(inner), Some(([3; 16], 2)));
    }

    fn inner_with_two() -> Vec<u8> {
        federation_spec::proto::BulkDeliver {
            campaign_id: Bytes::from_static(&[9; 16]),
            recipients: vec!["a@b".into(), "c@d".into()],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn bulk_info_reads_id_and_count() {
        let inner = federation_spec::proto::BulkDeliver {
            campaign_id: Bytes::from_static(&[9; 16]),
            recipients: vec!["a@b".into(), "c@d".into()],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(bulk_info(inner.into()), Some(([9; 16], 2)));
        assert_eq!(bulk_info(Bytes::from_static(&[0xff])), None);
        // Field 6 with another wire type is malformed, as for a decoder; a truncated id too.
        assert_eq!(bulk_info(Bytes::from_static(&[0x30, 0x01])), None);
        assert_eq!(bulk_info(Bytes::from_static(&[0x12, 0x10, 0x01])), None);
        // The tag field appended at delivery and unknown fields are skipped.
        let mut with_tag = inner_with_two();
        with_tag.extend_from_slice(&[0x08, 0x2a, 0x78, 0x05]);
        assert_eq!(bulk_info(with_tag.into()), Some(([9; 16], 2)));
    }

    #[test]
    fn bucket_allows_a_large_chunk_then_holds_the_rate() {
        let t0 = Instant::now();
        // 100 in the bucket; 5,000 taken: 4,900 of debt at 1,000/s.
        let mut b = RecipientBucket::new(1000, t0);
        assert!(b.take(1000, 5000, t0).is_ok());
        let wait = b.take(1000, 1, t0).unwrap_err();
        assert!((4900..=4902).contains(&wait), "{wait}");
        assert!(b.take(1000, 1, t0 + Duration::from_millis(4902)).is_ok());
        // It never holds more than a tenth of a second's worth.
        let mut b = RecipientBucket::new(1000, t0);
        assert!(b.take(1000, 100, t0 + Duration::from_secs(60)).is_ok());
        assert!(b.take(1000, 1, t0 + Duration::from_secs(60)).is_err());
    }
}
