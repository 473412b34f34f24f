//! Campaign steps against scripted relay frames, with a fake clock: no sockets, no sleeps.

use super::campaigns::{CampaignId, NewStep, Step, StepKey};
use super::tests::{
    accepted, after, drain, events, kind, limits, live_session, message, options, sent_ids, t0,
    welcome,
};
use super::*;
use crate::campaign::{CampaignSpec, CampaignState, ChunkAck, prepare_campaign};
use crate::message::MessageId;
use ed25519_dalek::SigningKey;
use federation_spec::frame::encode_kind;
use federation_spec::proto::{
    self, CampaignAck, CampaignCancel, CampaignChunk, CampaignCounts, CampaignEnd,
    CampaignStatusRequest, Rejected,
};

const A: CampaignId = [0xa; 16];
const B: CampaignId = [0xb; 16];
const C: CampaignId = [0xc; 16];

type Done = Vec<(u32, Result<CampaignAnswer, SendError>)>;

fn news() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

/// The CampaignBegin frame of campaign `id`.
fn begin_frame(id: CampaignId) -> Bytes {
    let spec = CampaignSpec {
        campaign_id: Some(id),
        ..CampaignSpec::text("alerts@news", "storm warning")
    };
    prepare_campaign(&news(), "news", spec, MessageId([id[0]; 16]), 1)
        .unwrap()
        .frame
}

fn begin(id: CampaignId) -> NewStep {
    NewStep {
        key: StepKey {
            campaign: id,
            step: Step::Begin,
        },
        frame: begin_frame(id),
        begin: Some(begin_frame(id)),
        recipients: 0,
    }
}

/// Chunk `seq` of campaign `id` with `n` recipients, as a `Campaign` hands it over.
fn chunk(id: CampaignId, seq: u32, n: usize) -> NewStep {
    let recipients = (0..n).map(|i| format!("u{i}@beta")).collect();
    NewStep {
        key: StepKey {
            campaign: id,
            step: Step::Chunk(seq),
        },
        frame: encode_kind(Kind::CampaignChunk(CampaignChunk {
            campaign_id: Bytes::copy_from_slice(&id),
            seq,
            recipients,
        })),
        begin: Some(begin_frame(id)),
        recipients: n,
    }
}

fn end(id: CampaignId, chunks: u32) -> NewStep {
    NewStep {
        key: StepKey {
            campaign: id,
            step: Step::End(chunks),
        },
        frame: encode_kind(Kind::CampaignEnd(CampaignEnd {
            campaign_id: Bytes::copy_from_slice(&id),
            chunks,
        })),
        begin: Some(begin_frame(id)),
        recipients: 0,
    }
}

/// A status request or cancel by id alone, as `ClientHandle` sends them.
fn query(id: CampaignId, step: Step) -> NewStep {
    let campaign_id = Bytes::copy_from_slice(&id);
    let frame = match step {
        Step::Cancel => encode_kind(Kind::CampaignCancel(CampaignCancel { campaign_id })),
        _ => encode_kind(Kind::CampaignStatusRequest(CampaignStatusRequest {
            campaign_id,
        })),
    };
    NewStep {
        key: StepKey { campaign: id, step },
        frame,
        begin: None,
        recipients: 0,
    }
}

fn ack(id: CampaignId, seq: u32, accepted: u32, duplicate: bool) -> Frame {
    kind(Kind::CampaignAck(CampaignAck {
        campaign_id: Bytes::copy_from_slice(&id),
        seq,
        accepted,
        rejected: 0,
        duplicate,
    }))
}

fn status(id: CampaignId, state: proto::CampaignState, delivered: u64) -> Frame {
    kind(Kind::CampaignStatus(proto::CampaignStatus {
        campaign_id: Bytes::copy_from_slice(&id),
        state: state as i32,
        label: "storm".into(),
        total: Some(CampaignCounts {
            accepted: 10,
            delivered,
            pending: 10 - delivered,
            ..Default::default()
        }),
        platforms: Vec::new(),
    }))
}

fn refused(id: CampaignId, seq: u32, code: ErrorCode, retry_after_ms: u32) -> Frame {
    kind(Kind::Rejected(Rejected {
        code: code as i32,
        retry_after_ms,
        detail: "because".into(),
        campaign_id: Bytes::copy_from_slice(&id),
        seq,
        ..Default::default()
    }))
}

/// What went out, as (step, campaign's first byte), after checking it went on the control
/// stream.
fn sent(out: &[(Route, Kind)]) -> Vec<(Step, u8)> {
    out.iter()
        .filter_map(|(route, k)| {
            let (step, id) = match k {
                Kind::CampaignBegin(b) => (Step::Begin, &b.campaign_id),
                Kind::CampaignChunk(c) => (Step::Chunk(c.seq), &c.campaign_id),
                Kind::CampaignEnd(e) => (Step::End(e.chunks), &e.campaign_id),
                Kind::CampaignStatusRequest(r) => (Step::Status, &r.campaign_id),
                Kind::CampaignCancel(c) => (Step::Cancel, &c.campaign_id),
                _ => return None,
            };
            assert_eq!(
                *route,
                Route::Control,
                "campaign frames use the control stream"
            );
            Some((step, id[0]))
        })
        .collect()
}

fn done(s: &mut ClientSession<u32>) -> Done {
    std::iter::from_fn(|| s.poll_campaign_completion()).collect()
}

fn acked(seq: u32, accepted: u32, duplicate: bool) -> Result<CampaignAnswer, SendError> {
    Ok(CampaignAnswer::Ack(ChunkAck {
        seq,
        accepted,
        rejected: 0,
        duplicate,
    }))
}

fn broadcaster(limits: Limits, now: Now) -> ClientSession<u32> {
    let mut s = live_session(options(), limits, now);
    s.peer = "news".into();
    s
}

/// A session on which campaign `id` is begun (Begin sent and acked, waiter 0).
fn with_begun(id: CampaignId, limits: Limits, now: Now) -> ClientSession<u32> {
    let mut s = broadcaster(limits, now);
    s.submit_campaign_step(begin(id), 0);
    assert_eq!(sent(&drain(&mut s, now)), [(Step::Begin, id[0])]);
    s.handle_frames([ack(id, 0, 0, false)], now).unwrap();
    assert_eq!(done(&mut s), [(0, acked(0, 0, false))]);
    s
}

fn wide() -> Limits {
    Limits {
        max_inflight: 16,
        ..limits()
    }
}

#[test]
fn answers_are_matched_by_campaign_seq_and_kind_in_any_order() {
    let now = t0();
    let mut s = with_begun(A, wide(), now);
    s.submit_campaign_step(chunk(A, 1, 3), 1);
    s.submit_campaign_step(chunk(A, 2, 3), 2);
    // B was never begun on this session: its Begin goes first, its chunk after the ack.
    s.submit_campaign_step(chunk(B, 1, 1), 3);
    s.submit_campaign_step(query(A, Step::Status), 4);
    s.submit_campaign_step(end(A, 2), 5);
    s.submit_campaign_step(query(C, Step::Status), 6);
    assert_eq!(
        sent(&drain(&mut s, now)),
        [
            (Step::Begin, 0xb),
            (Step::Chunk(1), 0xa),
            (Step::Chunk(2), 0xa),
            (Step::Status, 0xa),
            (Step::End(2), 0xa),
            (Step::Status, 0xc),
        ]
    );
    s.handle_frames(
        [
            ack(A, 3, 6, false), // End(2) is answered with seq 3
            ack(A, 2, 3, false),
            ack(B, 0, 0, true),
            ack(A, 9, 1, false), // nothing of ours: ignored
            refused(C, 0, ErrorCode::UnknownCampaign, 0),
            status(A, proto::CampaignState::Sending, 2),
        ],
        now,
    )
    .unwrap();
    let got = done(&mut s);
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0], (5, acked(3, 6, false)));
    assert_eq!(got[1], (2, acked(2, 3, false)));
    assert_eq!(
        got[2],
        (
            6,
            Err(SendError::Rejected {
                code: ErrorCode::UnknownCampaign,
                retry_after_ms: 0,
                detail: "because".into()
            })
        )
    );
    let (4, Ok(CampaignAnswer::Status(st))) = &got[3] else {
        panic!("{:?}", got[3])
    };
    assert_eq!(
        (st.campaign_id, st.state, st.total.delivered),
        (A, CampaignState::Sending, 2)
    );
    assert!(events(&mut s).is_empty(), "the status answered a request");
    // B's Begin was acked: its chunk goes now.
    assert_eq!(sent(&drain(&mut s, now)), [(Step::Chunk(1), 0xb)]);
    s.handle_frames([ack(B, 1, 1, false), ack(A, 1, 3, true)], now)
        .unwrap();
    assert_eq!(
        done(&mut s),
        [(3, acked(1, 1, false)), (1, acked(1, 3, true))]
    );
    assert_eq!(s.pending_campaign_steps(), 0);
}

#[test]
fn duplicate_steps_are_refused_locally() {
    let now = t0();
    let mut s = with_begun(A, wide(), now);
    s.submit_campaign_step(chunk(A, 4, 1), 1);
    s.submit_campaign_step(chunk(A, 4, 1), 2);
    s.submit_campaign_step(end(A, 3), 3); // would be answered with seq 4 too
    assert_eq!(
        done(&mut s),
        [
            (2, Err(SendError::DuplicateId)),
            (3, Err(SendError::DuplicateId))
        ]
    );
    assert_eq!(sent(&drain(&mut s, now)), [(Step::Chunk(4), 0xa)]);
}

#[test]
fn rate_limited_steps_are_resent_after_retry_after_and_hold_back_the_rest() {
    let now = t0();
    let mut s = with_begun(A, wide(), now);
    s.submit_campaign_step(chunk(A, 1, 2), 1);
    s.submit_campaign_step(chunk(A, 2, 2), 2);
    let first = std::iter::from_fn(|| s.poll_transmit(now)).collect::<Vec<_>>();
    assert_eq!(first.len(), 2);
    s.handle_frames([refused(A, 1, ErrorCode::RateLimited, 200)], now)
        .unwrap();
    assert!(done(&mut s).is_empty(), "absorbed by the SDK");
    s.submit_campaign_step(chunk(A, 3, 2), 3);
    assert!(drain(&mut s, after(now, 199)).is_empty(), "paused 200 ms");
    assert_eq!(
        s.poll_timeout(),
        Some(now.at + Duration::from_millis(200)),
        "wakes up when the pause ends"
    );
    let t = after(now, 200);
    s.handle_timeout(t);
    let again = std::iter::from_fn(|| s.poll_transmit(t)).collect::<Vec<_>>();
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].bytes, first[0].bytes, "the same frame again");
    // BUSY without a figure waits a second; a code that cannot be retried fails the step.
    s.handle_frames(
        [
            refused(A, 1, ErrorCode::Busy, 0),
            refused(A, 3, ErrorCode::CampaignQuota, 0),
        ],
        t,
    )
    .unwrap();
    assert!(matches!(
        &done(&mut s)[..],
        [(
            3,
            Err(SendError::Rejected {
                code: ErrorCode::CampaignQuota,
                ..
            })
        )]
    ));
    assert!(drain(&mut s, after(t, 999)).is_empty());
    assert_eq!(
        sent(&drain(&mut s, after(t, 1000))),
        [(Step::Chunk(1), 0xa)]
    );
    s.handle_frames([ack(A, 1, 2, false), ack(A, 2, 2, false)], t)
        .unwrap();
    assert_eq!(
        done(&mut s),
        [(1, acked(1, 2, false)), (2, acked(2, 2, false))]
    );
}

#[test]
fn unanswered_steps_are_resent_after_a_reconnect_begin_first() {
    let now = t0();
    let mut s = with_begun(A, wide(), now);
    for seq in 1..=3 {
        s.submit_campaign_step(chunk(A, seq, 1), seq);
    }
    s.submit_campaign_step(end(A, 3), 4);
    s.submit_campaign_step(query(C, Step::Status), 5);
    let first = std::iter::from_fn(|| s.poll_transmit(now)).collect::<Vec<_>>();
    assert_eq!(first.len(), 5);
    s.handle_frames([ack(A, 2, 1, false)], now).unwrap();
    assert_eq!(done(&mut s), [(2, acked(2, 1, false))]);

    s.disconnected("test", None);
    let later = after(now, 3000);
    s.established(welcome(wide()), later);
    // The Begin again (the relay answers it as a duplicate), and what does not depend on it.
    assert_eq!(
        sent(&drain(&mut s, later)),
        [(Step::Begin, 0xa), (Step::Status, 0xc)]
    );
    s.handle_frames([ack(A, 0, 0, true)], later).unwrap();
    assert!(done(&mut s).is_empty(), "nobody waited for that Begin");
    let again = std::iter::from_fn(|| s.poll_transmit(later)).collect::<Vec<_>>();
    assert_eq!(again.len(), 3);
    assert_eq!(again[0].bytes, first[0].bytes, "chunk 1 unchanged");
    assert_eq!(again[1].bytes, first[2].bytes, "chunk 3 unchanged");
    assert_eq!(again[2].bytes, first[3].bytes, "end unchanged");
    s.handle_frames(
        [
            ack(A, 1, 1, true),
            ack(A, 3, 1, false),
            ack(A, 4, 3, false),
            status(C, proto::CampaignState::Done, 10),
        ],
        later,
    )
    .unwrap();
    let got = done(&mut s);
    assert_eq!(
        got.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
        [1, 3, 4, 5]
    );
    assert_eq!(got[2], (4, acked(4, 3, false)));
    assert_eq!(s.pending_campaign_steps(), 0);
}

#[test]
fn a_begin_refused_after_a_reconnect_fails_the_campaign() {
    let now = t0();
    let mut s = with_begun(A, wide(), now);
    s.submit_campaign_step(chunk(A, 1, 1), 1);
    s.submit_campaign_step(chunk(A, 2, 1), 2);
    drain(&mut s, now);
    s.disconnected("test", None);
    s.established(welcome(wide()), now);
    assert_eq!(sent(&drain(&mut s, now)), [(Step::Begin, 0xa)]);
    s.handle_frames([refused(A, 0, ErrorCode::Expired, 0)], now)
        .unwrap();
    let got = done(&mut s);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(_, r)| matches!(
        r,
        Err(SendError::Rejected {
            code: ErrorCode::Expired,
            ..
        })
    )));
    assert!(drain(&mut s, now).is_empty());
    assert_eq!(s.pending_campaign_steps(), 0);
}

#[test]
fn pushed_status_without_a_request_becomes_an_event() {
    let now = t0();
    let mut s = with_begun(A, wide(), now);
    s.handle_frames([status(A, proto::CampaignState::Sending, 4)], now)
        .unwrap();
    let ev = events(&mut s);
    let [Event::CampaignStatus(st)] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!(
        (st.campaign_id, st.state, st.label.as_str()),
        (A, CampaignState::Sending, "storm")
    );
    assert!(ev[0].tag().is_none(), "nothing to ack");

    // A Cancel is answered by the final state only: a push still saying "sending" is news.
    s.submit_campaign_step(query(A, Step::Cancel), 1);
    assert_eq!(sent(&drain(&mut s, now)), [(Step::Cancel, 0xa)]);
    s.handle_frames([status(A, proto::CampaignState::Sending, 5)], now)
        .unwrap();
    assert!(done(&mut s).is_empty());
    assert_eq!(events(&mut s).len(), 1);
    s.handle_frames([status(A, proto::CampaignState::Cancelled, 5)], now)
        .unwrap();
    let got = done(&mut s);
    assert!(matches!(
        &got[..],
        [(1, Ok(CampaignAnswer::Status(st)))] if st.state == CampaignState::Cancelled
    ));
    assert!(events(&mut s).is_empty());
    // A status with a broken id is dropped, not trusted.
    s.handle_frames(
        [kind(Kind::CampaignStatus(proto::CampaignStatus {
            campaign_id: Bytes::from_static(b"short"),
            ..Default::default()
        }))],
        now,
    )
    .unwrap();
    assert!(events(&mut s).is_empty());
}

#[test]
fn status_requests_coalesce_and_take_a_pushed_status_as_their_answer() {
    let now = t0();
    let mut s = broadcaster(wide(), now);
    s.submit_campaign_step(query(A, Step::Status), 1);
    assert_eq!(sent(&drain(&mut s, now)), [(Step::Status, 0xa)]);
    s.submit_campaign_step(query(A, Step::Status), 2);
    assert!(drain(&mut s, now).is_empty(), "one request on the wire");
    s.handle_frames([status(A, proto::CampaignState::Open, 0)], now)
        .unwrap();
    assert_eq!(
        done(&mut s).iter().map(|(w, _)| *w).collect::<Vec<_>>(),
        [1, 2]
    );
    // The relay's own answer to the request comes later: nothing waits, so it is news.
    s.handle_frames([status(A, proto::CampaignState::Open, 0)], now)
        .unwrap();
    assert_eq!(events(&mut s).len(), 1);
}

#[test]
fn campaign_frames_in_flight_are_bounded_by_max_inflight_apart_from_messages() {
    let now = t0();
    let mut s = with_begun(A, limits(), now); // max_inflight 2
    for seq in 1..=5 {
        s.submit_campaign_step(chunk(A, seq, 1), seq);
    }
    s.submit_message(message(1, now.unix_ms, 0), 100);
    s.submit_message(message(2, now.unix_ms, 0), 101);
    let out = drain(&mut s, now);
    assert_eq!(sent_ids(&out), [1, 2], "messages have their own count");
    assert_eq!(sent(&out), [(Step::Chunk(1), 0xa), (Step::Chunk(2), 0xa)]);
    s.handle_frames([ack(A, 2, 1, false), accepted(1)], now)
        .unwrap();
    assert_eq!(sent(&drain(&mut s, now)), [(Step::Chunk(3), 0xa)]);
    // FLOW_CONTROL: the relay counted more than we did; resent after a short pause.
    s.handle_frames([refused(A, 3, ErrorCode::FlowControl, 0)], now)
        .unwrap();
    assert_eq!(sent(&drain(&mut s, now)), [(Step::Chunk(4), 0xa)]);
    let t = after(now, 100);
    s.handle_timeout(t);
    s.handle_frames([ack(A, 1, 1, false)], t).unwrap();
    assert_eq!(sent(&drain(&mut s, t)), [(Step::Chunk(3), 0xa)]);
}

#[test]
fn chunks_over_the_session_limits_are_refused_locally() {
    let now = t0();
    let mut s = with_begun(
        A,
        Limits {
            max_chunk_recipients: 2,
            ..wide()
        },
        now,
    );
    s.submit_campaign_step(chunk(A, 1, 3), 1);
    s.submit_campaign_step(chunk(A, 2, 2), 2);
    assert_eq!(sent(&drain(&mut s, now)), [(Step::Chunk(2), 0xa)]);
    assert_eq!(
        done(&mut s),
        [(
            1,
            Err(SendError::Invalid(
                crate::error::PrepareError::TooManyRecipients { len: 3, max: 2 }
            ))
        )]
    );
}

#[test]
fn goaway_and_close_wait_for_campaign_answers() {
    let now = t0();
    let mut s = with_begun(A, wide(), now);
    s.submit_campaign_step(chunk(A, 1, 1), 1);
    drain(&mut s, now);
    s.handle_frames(
        [
            kind(Kind::Goaway(Goaway {
                code: ErrorCode::ShuttingDown as i32,
                reason: "restart".into(),
                reconnect_after_ms: 10,
            })),
            refused(A, 1, ErrorCode::ShuttingDown, 0),
        ],
        now,
    )
    .unwrap();
    s.submit_campaign_step(chunk(A, 2, 1), 2);
    assert!(drain(&mut s, now).is_empty(), "nothing new after goaway");
    let close = s.poll_close().expect("nothing in flight any more");
    s.disconnected(&close.reason, close.code);
    s.established(welcome(wide()), now);
    assert_eq!(sent(&drain(&mut s, now)), [(Step::Begin, 0xa)]);
    s.handle_frames([ack(A, 0, 0, true)], now).unwrap();
    assert_eq!(
        sent(&drain(&mut s, now)),
        [(Step::Chunk(1), 0xa), (Step::Chunk(2), 0xa)]
    );

    s.begin_close(now.at + Duration::from_secs(5));
    s.submit_campaign_step(chunk(A, 3, 1), 3);
    assert!(matches!(
        &done(&mut s)[..],
        [(3, Err(SendError::Closed(_)))]
    ));
    assert!(s.poll_close().is_none(), "chunks 1 and 2 are unanswered");
    s.fail_all(SendError::Closed("gave up".into()));
    assert_eq!(done(&mut s).len(), 2);
    assert!(s.poll_close().is_some());
}
