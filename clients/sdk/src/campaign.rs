//! Campaigns (SPEC.md 9): one message, signed once, to many recipients, sent by a
//! broadcaster.
//!
//! [`crate::ClientHandle::begin_campaign`] builds and signs the envelope as messages are
//! built, and returns once the relay has stored the campaign. The returned [`Campaign`]
//! streams the recipients in numbered chunks, many in flight at once
//! ([`Campaign::submit_chunk`]), ends the campaign, and asks for its status or cancels it.
//!
//! What the SDK guarantees (the session's campaign book does the work):
//! - every step is kept until the relay answers it; steps refused with `RATE_LIMITED` or
//!   `BUSY` are resent after `retry_after_ms`, and after a reconnect the campaign's Begin is
//!   sent again first, then every unanswered step: the relay treats each as idempotent
//!   (SPEC.md 9.10), so a step acknowledged twice is reported once, with `duplicate` set;
//! - unanswered campaign frames on the wire stay within the session's `max_inflight`, and
//!   chunks held by the SDK within [`crate::ClientConfig::max_pending_chunks`], so a caller
//!   submitting chunks in a loop waits instead of piling recipients up in memory.

use crate::client::ClientHandle;
use crate::error::{PrepareError, SendError};
use crate::message::{MessageId, sign};
use crate::session::campaigns::{NewStep, Step, StepKey};
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use federation_spec::ProtocolError;
use federation_spec::frame::encode_kind;
use federation_spec::message::check_campaign_begin;
use federation_spec::proto::{self, CampaignBegin, Envelope, Lane, frame::Kind};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// What to broadcast, before it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignSpec {
    /// The sender, a full address of our own peer, e.g. `alerts@news`.
    pub from: String,
    /// The body, opaque to the relay.
    pub payload: Bytes,
    /// Optional media type of the payload, at most 64 bytes.
    pub content_type: String,
    /// Requested time to live in seconds; 0 = the bulk lane's default.
    pub ttl_s: u32,
    /// Human label for status and logs, at most 128 bytes.
    pub label: String,
    /// The campaign id; `None` picks a random one. Give the id of an earlier campaign
    /// (with the same signed envelope) only to resume it.
    pub campaign_id: Option<[u8; 16]>,
}

impl CampaignSpec {
    /// A `text/plain` campaign from `from` with the lane's default TTL and no label.
    pub fn text(from: &str, text: &str) -> Self {
        Self {
            from: from.to_string(),
            payload: Bytes::copy_from_slice(text.as_bytes()),
            content_type: "text/plain".into(),
            ttl_s: 0,
            label: String::new(),
            campaign_id: None,
        }
    }
}

/// The relay's `CampaignAck`: a step is durable at the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkAck {
    /// 0 for the Begin, the chunk's seq, or `chunks + 1` for the End.
    pub seq: u32,
    /// Recipients taken on (the chunk's; the campaign's totals for the End).
    pub accepted: u32,
    /// Recipients refused: not an address, or of no registered platform (same scope).
    pub rejected: u32,
    /// The relay had this step already (a resend); the counts are those it recorded then.
    pub duplicate: bool,
}

impl From<&proto::CampaignAck> for ChunkAck {
    fn from(a: &proto::CampaignAck) -> Self {
        Self {
            seq: a.seq,
            accepted: a.accepted,
            rejected: a.rejected,
            duplicate: a.duplicate,
        }
    }
}

/// Where a campaign is in its life (SPEC.md 9.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CampaignState {
    /// A state this SDK does not know (from a newer relay), or none.
    Unspecified,
    /// Begun; chunks are still coming.
    Open,
    /// Ended; delivery under way.
    Sending,
    /// Ended and nothing pending: every recipient delivered, expired or rejected.
    Done,
    /// Cancelled; what was not delivered before never will be.
    Cancelled,
}

impl CampaignState {
    /// Done or cancelled: nothing about the campaign will change any more.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Done | Self::Cancelled)
    }

    /// Lowercase name, e.g. `sending`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Open => "open",
            Self::Sending => "sending",
            Self::Done => "done",
            Self::Cancelled => "cancelled",
        }
    }
}

impl From<proto::CampaignState> for CampaignState {
    fn from(s: proto::CampaignState) -> Self {
        match s {
            proto::CampaignState::Unspecified => Self::Unspecified,
            proto::CampaignState::Open => Self::Open,
            proto::CampaignState::Sending => Self::Sending,
            proto::CampaignState::Done => Self::Done,
            proto::CampaignState::Cancelled => Self::Cancelled,
        }
    }
}

impl fmt::Display for CampaignState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Recipient counts of a campaign, for one destination platform or for all of them.
/// For each: `accepted = delivered + pending + expired + cancelled`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CampaignCounts {
    /// The destination platform; empty for the whole campaign.
    pub platform: String,
    /// Taken on at chunk time.
    pub accepted: u64,
    /// Acknowledged by the destination platform.
    pub delivered: u64,
    /// Accepted, not yet delivered, expired or cancelled.
    pub pending: u64,
    /// Not delivered before the campaign expired.
    pub expired: u64,
    /// Refused at chunk time.
    pub rejected: u64,
    /// Not delivered because the campaign was cancelled.
    pub cancelled: u64,
}

impl From<proto::CampaignCounts> for CampaignCounts {
    fn from(c: proto::CampaignCounts) -> Self {
        Self {
            platform: c.platform,
            accepted: c.accepted,
            delivered: c.delivered,
            pending: c.pending,
            expired: c.expired,
            rejected: c.rejected,
            cancelled: c.cancelled,
        }
    }
}

/// The relay's report on a campaign: on request, or pushed while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignStatus {
    /// The campaign.
    pub campaign_id: [u8; 16],
    /// Where it is.
    pub state: CampaignState,
    /// Its label.
    pub label: String,
    /// Counts for the whole campaign.
    pub total: CampaignCounts,
    /// Counts per destination platform with recipients.
    pub platforms: Vec<CampaignCounts>,
}

impl TryFrom<proto::CampaignStatus> for CampaignStatus {
    type Error = ProtocolError;

    /// Fails only when `campaign_id` is not 16 bytes; an unknown state reads as
    /// [`CampaignState::Unspecified`] and a missing total as zeros.
    fn try_from(s: proto::CampaignStatus) -> Result<Self, Self::Error> {
        let campaign_id = s
            .campaign_id
            .as_ref()
            .try_into()
            .map_err(|_| ProtocolError::InvalidMessage("campaign_id must be 16 bytes"))?;
        Ok(Self {
            campaign_id,
            state: proto::CampaignState::try_from(s.state)
                .map(CampaignState::from)
                .unwrap_or(CampaignState::Unspecified),
            label: s.label,
            total: s.total.map(CampaignCounts::from).unwrap_or_default(),
            platforms: s.platforms.into_iter().map(CampaignCounts::from).collect(),
        })
    }
}

/// What answers a campaign step: an ack (Begin, Chunk, End) or a status (status request,
/// Cancel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CampaignAnswer {
    Ack(ChunkAck),
    Status(CampaignStatus),
}

pub(crate) type AnswerRx = oneshot::Receiver<Result<CampaignAnswer, SendError>>;

/// The ack a step's waiter got. The session answers ack steps with acks only, so the other
/// arm is a bug; it is reported rather than trusted.
pub(crate) fn into_ack(
    answer: Result<Result<CampaignAnswer, SendError>, oneshot::error::RecvError>,
) -> Result<ChunkAck, SendError> {
    match answer {
        Ok(Ok(CampaignAnswer::Ack(ack))) => Ok(ack),
        Ok(Ok(CampaignAnswer::Status(_))) => Err(SendError::Closed(
            "internal error: a status answered a campaign step".into(),
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SendError::Closed("client stopped".into())),
    }
}

/// The status a status request's or cancel's waiter got.
pub(crate) fn into_status(
    answer: Result<Result<CampaignAnswer, SendError>, oneshot::error::RecvError>,
) -> Result<CampaignStatus, SendError> {
    match answer {
        Ok(Ok(CampaignAnswer::Status(status))) => Ok(status),
        Ok(Ok(CampaignAnswer::Ack(_))) => Err(SendError::Closed(
            "internal error: an ack answered a status request".into(),
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SendError::Closed("client stopped".into())),
    }
}

/// A campaign's Begin, built, checked and signed.
#[derive(Debug, Clone)]
pub(crate) struct PreparedCampaign {
    pub(crate) id: [u8; 16],
    pub(crate) envelope_id: MessageId,
    /// The length-prefixed `CampaignBegin` frame.
    pub(crate) frame: Bytes,
}

/// Builds and signs the campaign's envelope as `peer` with `key`: the envelope of a message
/// with an empty `to` on the bulk lane (SPEC.md 9.2), checked with the relay's rules.
pub(crate) fn prepare_campaign(
    key: &SigningKey,
    peer: &str,
    spec: CampaignSpec,
    envelope_id: MessageId,
    created_at_ms: u64,
) -> Result<PreparedCampaign, PrepareError> {
    let id = spec.campaign_id.unwrap_or_else(rand::random);
    let envelope = Envelope {
        id: Bytes::copy_from_slice(&envelope_id.0),
        from: spec.from,
        to: String::new(),
        lane: Lane::Bulk as i32,
        created_at_ms,
        ttl_s: spec.ttl_s,
        content_type: spec.content_type,
        payload: spec.payload,
    };
    let signed = sign(key, &envelope);
    let begin = CampaignBegin {
        campaign_id: Bytes::copy_from_slice(&id),
        envelope: signed.envelope,
        signature: signed.signature,
        signer: signed.signer,
        label: spec.label,
    };
    // As for messages (SPEC.md 6.2): never send what the relay cannot take. The payload limit
    // is the session's, checked by the relay.
    check_campaign_begin(&begin, peer, usize::MAX).map_err(|r| r.error)?;
    Ok(PreparedCampaign {
        id,
        envelope_id,
        frame: encode_kind(Kind::CampaignBegin(begin)),
    })
}

/// A campaign the relay has stored: stream its recipients, end it, follow it. Clone it
/// freely; every clone talks to the same client.
///
/// ```no_run
/// # async fn demo(client: relay_client::Client) -> Result<(), relay_client::SendError> {
/// use relay_client::CampaignSpec;
///
/// let campaign = client
///     .begin_campaign(CampaignSpec::text("alerts@news", "storm warning"))
///     .await?;
/// let chunks = [vec!["ann@beta".to_string()], vec!["bob@gamma".to_string()]];
/// let mut answers = Vec::new();
/// for (seq, recipients) in (1..).zip(chunks) {
///     // Returns as soon as the SDK holds the chunk: many are in flight at once.
///     answers.push(campaign.submit_chunk(seq, recipients).await?);
/// }
/// for answer in answers {
///     answer.await?;
/// }
/// let totals = campaign.end(2).await?;
/// println!("{} accepted, {} rejected", totals.accepted, totals.rejected);
/// let status = campaign.status().await?;
/// println!("{}: {} delivered", status.state, status.total.delivered);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Campaign {
    pub(crate) id: [u8; 16],
    pub(crate) envelope_id: MessageId,
    pub(crate) begin_ack: ChunkAck,
    /// The `CampaignBegin` frame, resent by the SDK after a reconnect.
    pub(crate) begin: Bytes,
    pub(crate) handle: ClientHandle,
}

impl fmt::Debug for Campaign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Campaign")
            .field("id", &hex::encode(self.id))
            .field("envelope_id", &self.envelope_id)
            .finish_non_exhaustive()
    }
}

impl Campaign {
    /// The campaign id.
    pub fn id(&self) -> [u8; 16] {
        self.id
    }

    /// The id of the campaign's envelope: what recipients' receipts name.
    pub fn envelope_id(&self) -> MessageId {
        self.envelope_id
    }

    /// The relay's answer to the Begin; `duplicate` when the relay already had the campaign
    /// (a resumed campaign).
    pub fn begin_ack(&self) -> ChunkAck {
        self.begin_ack
    }

    /// Hands chunk `seq` (1, 2, …) to the SDK without waiting for the relay's answer, so that
    /// many chunks can be in flight. Waits only while `max_pending_chunks` chunks are held.
    pub async fn submit_chunk(
        &self,
        seq: u32,
        recipients: Vec<String>,
    ) -> Result<PendingChunk, SendError> {
        if seq == 0 {
            return Err(PrepareError::CampaignSeq(0).into());
        }
        let count = recipients.len();
        let frame = encode_kind(Kind::CampaignChunk(proto::CampaignChunk {
            campaign_id: Bytes::copy_from_slice(&self.id),
            seq,
            recipients,
        }));
        let rx = self
            .handle
            .submit_campaign_step(self.step(Step::Chunk(seq), frame, count), true)
            .await?;
        Ok(PendingChunk { seq, rx })
    }

    /// Sends chunk `seq` and waits until the relay has it durably.
    pub async fn send_chunk(
        &self,
        seq: u32,
        recipients: Vec<String>,
    ) -> Result<ChunkAck, SendError> {
        self.submit_chunk(seq, recipients).await?.await
    }

    /// Says that chunks `1..=chunks` are all the chunks, and waits for the relay's totals.
    /// Refused with `INVALID_MESSAGE` if one of them is missing at the relay.
    pub async fn end(&self, chunks: u32) -> Result<ChunkAck, SendError> {
        if chunks == u32::MAX {
            return Err(PrepareError::CampaignSeq(chunks).into());
        }
        let frame = encode_kind(Kind::CampaignEnd(proto::CampaignEnd {
            campaign_id: Bytes::copy_from_slice(&self.id),
            chunks,
        }));
        let rx = self
            .handle
            .submit_campaign_step(self.step(Step::End(chunks), frame, 0), false)
            .await?;
        into_ack(rx.await)
    }

    /// The campaign's current status.
    pub async fn status(&self) -> Result<CampaignStatus, SendError> {
        self.handle.campaign_status(self.id).await
    }

    /// Cancels the campaign: what is not delivered yet never will be. Returns the status
    /// (cancelled, or done if it had finished before).
    pub async fn cancel(&self) -> Result<CampaignStatus, SendError> {
        self.handle.cancel_campaign(self.id).await
    }

    fn step(&self, step: Step, frame: Bytes, recipients: usize) -> NewStep {
        NewStep {
            key: StepKey {
                campaign: self.id,
                step,
            },
            frame,
            begin: Some(self.begin.clone()),
            recipients,
        }
    }
}

/// The answer to one chunk, to await. Dropping it does not cancel anything: the SDK keeps
/// the chunk until the relay answers it.
#[derive(Debug)]
pub struct PendingChunk {
    seq: u32,
    rx: AnswerRx,
}

impl PendingChunk {
    /// The chunk's seq.
    pub fn seq(&self) -> u32 {
        self.seq
    }
}

impl Future for PendingChunk {
    type Output = Result<ChunkAck, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(into_ack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use federation_spec::frame::decode_message;
    use federation_spec::signing::{parse_public_key, parse_signature, verify_envelope};
    use prost::Message as _;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn begin_of(frame: &Bytes) -> CampaignBegin {
        match decode_message(frame, usize::MAX)
            .unwrap()
            .into_iter()
            .next()
            .and_then(|f| f.kind)
        {
            Some(Kind::CampaignBegin(b)) => b,
            other => panic!("not a begin: {other:?}"),
        }
    }

    #[test]
    fn begin_carries_a_signed_bulk_envelope_without_recipient() {
        let spec = CampaignSpec {
            label: "spring sale".into(),
            campaign_id: Some([3; 16]),
            ttl_s: 600,
            ..CampaignSpec::text("alerts@news", "50% off")
        };
        let p = prepare_campaign(&key(), "news", spec, MessageId([9; 16]), 1234).unwrap();
        assert_eq!((p.id, p.envelope_id), ([3; 16], MessageId([9; 16])));
        let b = begin_of(&p.frame);
        assert_eq!(&b.campaign_id[..], &[3; 16]);
        assert_eq!(b.label, "spring sale");
        let env = Envelope::decode(b.envelope.clone()).unwrap();
        assert_eq!(env.from, "alerts@news");
        assert!(env.to.is_empty());
        assert_eq!(env.lane, Lane::Bulk as i32);
        assert_eq!((env.created_at_ms, env.ttl_s), (1234, 600));
        assert_eq!(&env.payload[..], b"50% off");
        let signer = parse_public_key(&b.signer).unwrap();
        assert_eq!(signer, key().verifying_key());
        assert!(verify_envelope(
            &signer,
            &b.envelope,
            &parse_signature(&b.signature).unwrap()
        ));
    }

    #[test]
    fn random_ids_and_local_refusals() {
        let prep = |spec| prepare_campaign(&key(), "news", spec, MessageId([1; 16]), 0);
        let a = prep(CampaignSpec::text("a@news", "x")).unwrap();
        let b = prep(CampaignSpec::text("a@news", "x")).unwrap();
        assert_ne!(a.id, b.id, "None means a fresh random id");
        assert!(matches!(
            prep(CampaignSpec::text("a@alpha", "x")),
            Err(PrepareError::Protocol(ProtocolError::SpoofedSender { .. }))
        ));
        assert!(matches!(
            prep(CampaignSpec::text("news", "x")),
            Err(PrepareError::Protocol(ProtocolError::BadAddress(_)))
        ));
        assert!(matches!(
            prep(CampaignSpec {
                label: "l".repeat(129),
                ..CampaignSpec::text("a@news", "x")
            }),
            Err(PrepareError::Protocol(ProtocolError::InvalidMessage(_)))
        ));
    }

    #[test]
    fn status_from_the_wire() {
        let wire = proto::CampaignStatus {
            campaign_id: Bytes::from(vec![7; 16]),
            state: proto::CampaignState::Sending as i32,
            label: "l".into(),
            total: Some(proto::CampaignCounts {
                accepted: 10,
                delivered: 4,
                pending: 6,
                ..Default::default()
            }),
            platforms: vec![proto::CampaignCounts {
                platform: "beta".into(),
                accepted: 10,
                delivered: 4,
                pending: 6,
                ..Default::default()
            }],
        };
        let s = CampaignStatus::try_from(wire.clone()).unwrap();
        assert_eq!(s.campaign_id, [7; 16]);
        assert_eq!(s.state, CampaignState::Sending);
        assert!(!s.state.is_finished());
        assert_eq!((s.total.accepted, s.total.pending), (10, 6));
        assert_eq!(s.platforms[0].platform, "beta");
        let odd = proto::CampaignStatus {
            state: 99,
            total: None,
            ..wire.clone()
        };
        let s = CampaignStatus::try_from(odd).unwrap();
        assert_eq!(s.state, CampaignState::Unspecified);
        assert_eq!(s.total, CampaignCounts::default());
        let short = proto::CampaignStatus {
            campaign_id: Bytes::from_static(&[1; 15]),
            ..wire
        };
        assert!(CampaignStatus::try_from(short).is_err());
    }
}
