//! The session against scripted relay frames, with a fake clock: no sockets, no sleeps.

use super::*;
use crate::message::{MessageId, OutgoingMessage, PreparedMessage, prepare_message};
use ed25519_dalek::SigningKey;
use federation_spec::frame::decode_message;
use federation_spec::proto::{
    Accepted, BulkDeliver, Deliver, Envelope, Expired, Hello, LaneTtl, PeerKeys, Receipt,
    ReceiptKind, Rejected, Role,
};
use federation_spec::signing::sign_envelope;
use prost::Message as _;

const T0_UNIX_MS: u64 = 1_700_000_000_000;

fn alpha() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

fn beta() -> SigningKey {
    SigningKey::from_bytes(&[2; 32])
}

pub(super) fn t0() -> Now {
    Now {
        at: Instant::now(),
        unix_ms: T0_UNIX_MS,
    }
}

pub(super) fn after(now: Now, ms: u64) -> Now {
    Now {
        at: now.at + Duration::from_millis(ms),
        unix_ms: now.unix_ms + ms,
    }
}

fn keys(peer: &str, key: &SigningKey) -> PeerKeys {
    PeerKeys {
        peer: peer.into(),
        role: Role::Platform as i32,
        keys: vec![Bytes::copy_from_slice(key.verifying_key().as_bytes())],
    }
}

pub(super) fn welcome(limits: Limits) -> Welcome {
    Welcome {
        session_id: Bytes::from_static(&[7; 16]),
        role: Role::Platform as i32,
        limits: Some(limits),
        lanes: vec![LaneTtl {
            lane: Lane::Chat as i32,
            default_ttl_s: 100,
            max_ttl_s: 1000,
        }],
        directory: vec![keys("alpha", &alpha()), keys("beta", &beta())],
    }
}

pub(super) fn limits() -> Limits {
    Limits {
        max_inflight: 2,
        idle_timeout_ms: 30_000,
        receive_window: 8,
        ..Default::default()
    }
}

pub(super) fn options() -> SessionOptions {
    SessionOptions {
        receive_window: 8,
        backpressure_retries: 0,
        pace_sends: true,
        verify_signatures: true,
    }
}

pub(super) fn live_session(opts: SessionOptions, limits: Limits, now: Now) -> ClientSession<u32> {
    let mut s = ClientSession::new("alpha", opts);
    s.established(welcome(limits), now);
    s
}

pub(super) fn message(n: u8, created_at_ms: u64, ttl_s: u32) -> PreparedMessage {
    prepare_message(
        &alpha(),
        "alpha",
        OutgoingMessage {
            ttl_s,
            ..OutgoingMessage::text("ali", "bo@beta", "hi")
        },
        MessageId([n; 16]),
        created_at_ms,
    )
    .unwrap()
}

pub(super) fn kind(k: Kind) -> Frame {
    Frame { kind: Some(k) }
}

pub(super) fn accepted(n: u8) -> Frame {
    kind(Kind::Accepted(Accepted {
        id: Bytes::from(vec![n; 16]),
        expires_at_ms: 42,
        ..Default::default()
    }))
}

fn rejected(n: u8, code: ErrorCode, retry_after_ms: u32) -> Frame {
    kind(Kind::Rejected(Rejected {
        id: Bytes::from(vec![n; 16]),
        code: code as i32,
        retry_after_ms,
        detail: "because".into(),
        ..Default::default()
    }))
}

/// Every frame the session wants written now, decoded, with its route.
pub(super) fn drain(s: &mut ClientSession<u32>, now: Now) -> Vec<(Route, Kind)> {
    std::iter::from_fn(|| s.poll_transmit(now))
        .map(|t| {
            let frames = decode_message(&t.bytes, usize::MAX).unwrap();
            assert_eq!(frames.len(), 1);
            (t.route, frames.into_iter().next().unwrap().kind.unwrap())
        })
        .collect()
}

pub(super) fn sent_ids(out: &[(Route, Kind)]) -> Vec<u8> {
    out.iter()
        .filter_map(|(_, k)| match k {
            Kind::Deliver(d) => Some(Envelope::decode(d.envelope.clone()).unwrap().id[0]),
            _ => None,
        })
        .collect()
}

pub(super) fn completions(
    s: &mut ClientSession<u32>,
) -> Vec<(u32, Result<SendReceipt, SendError>)> {
    std::iter::from_fn(|| s.poll_completion()).collect()
}

pub(super) fn events(s: &mut ClientSession<u32>) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// A Deliver as the relay sends it: the origin's signed envelope with a tag.
fn incoming(tag: u64, n: u8, signer: &SigningKey, from: &str) -> Frame {
    let env = Envelope {
        id: Bytes::from(vec![n; 16]),
        from: from.into(),
        to: "ali@alpha".into(),
        lane: Lane::Chat as i32,
        payload: Bytes::from_static(b"hello"),
        ..Default::default()
    };
    let bytes = Bytes::from(env.encode_to_vec());
    kind(Kind::Deliver(Deliver {
        signature: Bytes::copy_from_slice(&sign_envelope(signer, &bytes).to_bytes()),
        signer: Bytes::copy_from_slice(signer.verifying_key().as_bytes()),
        envelope: bytes,
        tag,
    }))
}

#[test]
fn pipelines_up_to_max_inflight_on_the_lane_stream() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    for n in 1..=3 {
        s.submit_message(message(n, now.unix_ms, 0), u32::from(n));
    }
    let out = drain(&mut s, now);
    assert_eq!(sent_ids(&out), vec![1, 2], "max_inflight is 2");
    assert!(out.iter().all(|(r, _)| *r == Route::Lane(Lane::Chat)));
    s.handle_frames([accepted(2)], now).unwrap();
    let done = completions(&mut s);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, 2);
    assert_eq!(
        done[0].1,
        Ok(SendReceipt {
            id: MessageId([2; 16]),
            expires_at_ms: 42,
            duplicate: false
        })
    );
    assert_eq!(sent_ids(&drain(&mut s, now)), vec![3]);
    assert_eq!(s.pending(), 2);
}

#[test]
fn unanswered_messages_are_resent_first_and_unchanged_after_a_reconnect() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    s.submit_message(message(1, now.unix_ms, 0), 1);
    s.submit_message(message(2, now.unix_ms, 0), 2);
    let first = std::iter::from_fn(|| s.poll_transmit(now)).collect::<Vec<_>>();
    assert_eq!(first.len(), 2);
    s.handle_frames([accepted(1)], now).unwrap();
    s.submit_message(message(3, now.unix_ms, 0), 3);
    s.disconnected("test", None);
    assert!(!s.is_live());
    assert!(
        s.poll_transmit(now).is_none(),
        "nothing is written while down"
    );
    let later = after(now, 5000);
    s.established(welcome(limits()), later);
    let ev = events(&mut s);
    assert!(matches!(ev[0], Event::Disconnected { .. }));
    assert!(matches!(&ev[1], Event::Reconnected(info) if info.number == 2));
    let again = std::iter::from_fn(|| s.poll_transmit(later)).collect::<Vec<_>>();
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].bytes, first[1].bytes, "same frame, same id");
    s.handle_frames(
        [kind(Kind::Accepted(Accepted {
            id: Bytes::from(vec![2; 16]),
            duplicate: true,
            ..Default::default()
        }))],
        later,
    )
    .unwrap();
    let done = completions(&mut s);
    assert!(matches!(
        done[..],
        [
            (1, Ok(_)),
            (
                2,
                Ok(SendReceipt {
                    duplicate: true,
                    ..
                })
            )
        ]
    ));
}

#[test]
fn rejections_are_typed_and_retryable_codes_wait() {
    let now = t0();
    let opts = SessionOptions {
        backpressure_retries: 1,
        ..options()
    };
    let wide = Limits {
        max_inflight: 10,
        ..limits()
    };
    let mut s = live_session(opts, wide, now);
    for n in 1..=4 {
        s.submit_message(message(n, now.unix_ms, 0), u32::from(n));
    }
    assert_eq!(sent_ids(&drain(&mut s, now)), vec![1, 2, 3, 4]);
    s.handle_frames(
        [
            rejected(1, ErrorCode::UnknownDestination, 0),
            rejected(2, ErrorCode::Busy, 2000),
            rejected(3, ErrorCode::FlowControl, 0),
            rejected(4, ErrorCode::ShuttingDown, 0),
        ],
        now,
    )
    .unwrap();
    let done = completions(&mut s);
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0],
        (
            1,
            Err(SendError::Rejected {
                code: ErrorCode::UnknownDestination,
                retry_after_ms: 0,
                detail: "because".into()
            })
        )
    );
    // SHUTTING_DOWN stops new sends on this session; the others wait for their time.
    assert!(drain(&mut s, after(now, 3000)).is_empty());
    s.disconnected("relay restart", Some(ErrorCode::ShuttingDown));
    let next = after(now, 50);
    s.established(welcome(wide), next);
    assert_eq!(sent_ids(&drain(&mut s, next)), vec![4]);
    let t = after(now, 150);
    assert_eq!(sent_ids(&drain(&mut s, t)), vec![3], "flow control: 100 ms");
    let t = after(now, 2000);
    assert_eq!(sent_ids(&drain(&mut s, t)), vec![2], "busy: retry_after_ms");
    // The retry budget is spent: the next BUSY is the sender's.
    s.handle_frames([rejected(2, ErrorCode::Busy, 0)], t)
        .unwrap();
    let done = completions(&mut s);
    assert!(matches!(
        done[..],
        [(
            2,
            Err(SendError::Rejected {
                code: ErrorCode::Busy,
                ..
            })
        )]
    ));
    // An unknown code reads as INTERNAL (SPEC.md 4.4), which is retried like BUSY.
    let unknown = kind(Kind::Rejected(Rejected {
        id: Bytes::from(vec![3; 16]),
        code: 999,
        ..Default::default()
    }));
    s.handle_frames([unknown.clone()], t).unwrap();
    assert!(completions(&mut s).is_empty());
    let t = after(t, 1000);
    assert_eq!(sent_ids(&drain(&mut s, t)), vec![3]);
    s.handle_frames([unknown], t).unwrap();
    assert!(matches!(
        completions(&mut s)[..],
        [(
            3,
            Err(SendError::Rejected {
                code: ErrorCode::Internal,
                ..
            })
        )]
    ));
}

#[test]
fn rate_limited_pauses_every_send() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    s.submit_message(message(1, now.unix_ms, 0), 1);
    s.submit_message(message(2, now.unix_ms, 0), 2);
    drain(&mut s, now);
    s.handle_frames([rejected(1, ErrorCode::RateLimited, 0)], now)
        .unwrap();
    s.submit_message(message(3, now.unix_ms, 0), 3);
    assert!(
        drain(&mut s, after(now, 999)).is_empty(),
        "paused at least 1 s"
    );
    assert_eq!(sent_ids(&drain(&mut s, after(now, 1000))), vec![3]);
}

#[test]
fn paces_to_the_announced_rate() {
    let now = t0();
    let mut s = live_session(
        options(),
        Limits {
            max_inflight: 100,
            max_msgs_per_s: 2,
            ..limits()
        },
        now,
    );
    for n in 1..=3 {
        s.submit_message(message(n, now.unix_ms, 0), u32::from(n));
    }
    assert_eq!(
        sent_ids(&drain(&mut s, now)),
        vec![1, 2],
        "a burst of one second's worth"
    );
    let wake = s.poll_timeout().unwrap();
    assert_eq!(wake, now.at + Duration::from_millis(500));
    assert_eq!(sent_ids(&drain(&mut s, after(now, 500))), vec![3]);
}

#[test]
fn expired_and_oversized_messages_are_not_sent() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    // Chat default TTL in this Welcome is 100 s.
    s.submit_message(message(1, now.unix_ms - 100_000, 0), 1);
    s.submit_message(message(2, now.unix_ms - 99_000, 0), 2);
    let big = prepare_message(
        &alpha(),
        "alpha",
        OutgoingMessage {
            payload: Bytes::from(vec![0; 70_000]),
            ..OutgoingMessage::text("ali", "bo@beta", "")
        },
        MessageId([3; 16]),
        now.unix_ms,
    )
    .unwrap();
    s.submit_message(big, 3);
    s.submit_message(message(2, now.unix_ms, 0), 4);
    assert_eq!(sent_ids(&drain(&mut s, now)), vec![2]);
    let done = completions(&mut s);
    assert!(matches!(
        done[..],
        [
            (4, Err(SendError::DuplicateId)),
            (1, Err(SendError::Expired)),
            (3, Err(SendError::Invalid(_)))
        ]
    ));
}

#[test]
fn incoming_messages_are_verified_and_acks_batched() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    s.handle_frames(
        [
            incoming(1, 1, &beta(), "bo@beta"),
            incoming(2, 2, &alpha(), "bo@beta"), // alpha's key claiming a beta sender
            kind(Kind::Receipt(Receipt {
                id: Bytes::from(vec![9; 16]),
                from: "bo@beta".into(),
                to: "ali@alpha".into(),
                kind: ReceiptKind::Read as i32,
                at_ms: 5,
                tag: 3,
            })),
            kind(Kind::Expired(Expired {
                id: Bytes::from(vec![8; 16]),
                to: "bo@beta".into(),
                expired_at_ms: 6,
                tag: 4,
                ..Default::default()
            })),
        ],
        now,
    )
    .unwrap();
    let ev = events(&mut s);
    let [
        Event::Message(good),
        Event::Message(forged),
        Event::Receipt(receipt),
        Event::Expired(expired),
    ] = &ev[..]
    else {
        panic!("unexpected events {ev:?}")
    };
    assert!(good.verified);
    assert_eq!(
        (good.from.as_str(), &good.payload[..]),
        ("bo@beta", &b"hello"[..])
    );
    assert!(!forged.verified);
    assert_eq!(
        (receipt.kind, receipt.id),
        (ReceiptKind::Read, MessageId([9; 16]))
    );
    assert_eq!((expired.expired_at_ms, expired.id), (6, MessageId([8; 16])));

    s.ack(ev.iter().filter_map(Event::tag));
    let out = drain(&mut s, now);
    assert_eq!(out.len(), 1, "one Ack for all four");
    let (Route::Control, Kind::Ack(ack)) = &out[0] else {
        panic!("expected an ack on the control stream")
    };
    assert_eq!(ack.tags, vec![1, 2, 3, 4]);
    s.ack([good.tag]);
    assert!(drain(&mut s, now).is_empty(), "acked once only");

    // After a reconnect, tags of the old session mean nothing and are not sent.
    s.disconnected("x", None);
    s.established(welcome(limits()), now);
    s.handle_frames([incoming(1, 3, &beta(), "bo@beta")], now)
        .unwrap();
    s.ack([forged.tag]);
    assert!(drain(&mut s, now).is_empty());
}

#[test]
fn unreadable_deliveries_are_acked_and_dropped() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    s.handle_frames(
        [kind(Kind::Deliver(Deliver {
            envelope: Bytes::from_static(&[0xff, 0xff]),
            tag: 5,
            ..Default::default()
        }))],
        now,
    )
    .unwrap();
    assert!(events(&mut s).is_empty());
    assert!(matches!(&drain(&mut s, now)[..], [(Route::Control, Kind::Ack(a))] if a.tags == [5]));
}

#[test]
fn bulk_envelope_is_remembered_per_campaign() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    let env = Envelope {
        id: Bytes::from(vec![4; 16]),
        from: "news@beta".into(),
        lane: Lane::Bulk as i32,
        payload: Bytes::from_static(b"sale"),
        ..Default::default()
    };
    let bytes = Bytes::from(env.encode_to_vec());
    let first = BulkDeliver {
        tag: 1,
        campaign_id: Bytes::from(vec![1; 16]),
        signature: Bytes::copy_from_slice(&sign_envelope(&beta(), &bytes).to_bytes()),
        signer: Bytes::copy_from_slice(beta().verifying_key().as_bytes()),
        envelope: bytes,
        recipients: vec!["ali@alpha".into()],
    };
    let second = BulkDeliver {
        tag: 2,
        campaign_id: first.campaign_id.clone(),
        recipients: vec!["eve@alpha".into(), "joe@alpha".into()],
        ..Default::default()
    };
    s.handle_frames(
        [
            kind(Kind::BulkDeliver(first)),
            kind(Kind::BulkDeliver(second)),
        ],
        now,
    )
    .unwrap();
    let ev = events(&mut s);
    let [Event::Bulk(a), Event::Bulk(b)] = &ev[..] else {
        panic!("{ev:?}")
    };
    let msg = a.message.as_ref().unwrap();
    assert!(msg.verified);
    assert_eq!(&msg.payload[..], b"sale");
    assert_eq!(b.message.as_ref(), Some(msg));
    assert_eq!(b.recipients.len(), 2);
}

#[test]
fn ping_pong_keepalive_and_dead_relay() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    s.handle_frames([kind(Kind::Ping(Ping { nonce: 77 }))], now)
        .unwrap();
    assert_eq!(
        drain(&mut s, now),
        vec![(Route::Control, Kind::Pong(Pong { nonce: 77 }))]
    );
    // Idle timeout 30 s: ping after 10 s of not sending.
    assert_eq!(s.poll_timeout(), Some(now.at + Duration::from_secs(10)));
    let t = after(now, 10_000);
    s.handle_timeout(t);
    assert!(matches!(
        &drain(&mut s, t)[..],
        [(Route::Control, Kind::Ping(_))]
    ));
    assert!(s.poll_close().is_none());
    let t = after(now, 30_000);
    s.handle_timeout(t);
    let close = s.poll_close().unwrap();
    assert_eq!(
        close.goaway.map(|g| g.code),
        Some(ErrorCode::IdleTimeout as i32)
    );
    assert!(!close.final_close);
}

#[test]
fn goaway_stops_new_sends_then_asks_to_reconnect() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    s.submit_message(message(1, now.unix_ms, 0), 1);
    assert_eq!(sent_ids(&drain(&mut s, now)), vec![1]);
    s.handle_frames(
        [kind(Kind::Goaway(Goaway {
            code: ErrorCode::ShuttingDown as i32,
            reason: "restart".into(),
            reconnect_after_ms: 500,
        }))],
        now,
    )
    .unwrap();
    s.submit_message(message(2, now.unix_ms, 0), 2);
    assert!(drain(&mut s, now).is_empty(), "nothing new after goaway");
    assert!(s.poll_close().is_none(), "waits for the answer in flight");
    s.handle_frames([accepted(1)], now).unwrap();
    let close = s.poll_close().unwrap();
    assert_eq!(close.reconnect_after, Some(Duration::from_millis(500)));
    assert_eq!(close.code, Some(ErrorCode::ShuttingDown));
    assert_eq!(close.goaway, None);
    s.disconnected(&close.reason, close.code);
    s.established(welcome(limits()), now);
    assert_eq!(sent_ids(&drain(&mut s, now)), vec![2]);
}

#[test]
fn goaway_grace_runs_out() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    s.submit_message(message(1, now.unix_ms, 0), 1);
    drain(&mut s, now);
    s.handle_frames([kind(Kind::Goaway(Goaway::default()))], now)
        .unwrap();
    let t = after(now, DRAIN_GRACE.as_millis() as u64);
    s.handle_timeout(t);
    assert!(s.poll_close().is_some());
}

#[test]
fn client_close_sends_what_is_held_then_goaway() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    s.submit_message(message(1, now.unix_ms, 0), 1);
    s.begin_close(now.at + Duration::from_secs(5));
    s.submit_message(message(2, now.unix_ms, 0), 2);
    assert!(matches!(
        completions(&mut s)[..],
        [(2, Err(SendError::Closed(_)))]
    ));
    assert_eq!(sent_ids(&drain(&mut s, now)), vec![1]);
    assert!(s.poll_close().is_none());
    s.handle_frames([accepted(1)], now).unwrap();
    let close = s.poll_close().unwrap();
    assert!(close.final_close);
    assert_eq!(
        close.goaway.map(|g| g.code),
        Some(ErrorCode::ShuttingDown as i32)
    );
}

#[test]
fn frames_only_a_peer_sends_are_fatal_unknown_kinds_are_not() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    assert_eq!(s.handle_frames([Frame { kind: None }], now), Ok(()));
    assert_eq!(
        s.handle_frames([kind(Kind::Hello(Hello::default()))], now),
        Err(ProtocolError::UnexpectedFrame("hello"))
    );
    assert_eq!(
        s.handle_frames([kind(Kind::StreamInit(Default::default()))], now),
        Err(ProtocolError::UnexpectedFrame("stream_init")),
        "StreamInit only opens a lane stream (SPEC.md 2.2.3)"
    );
}

#[test]
fn credit_goes_on_the_control_stream() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    s.set_receive_window(0);
    assert_eq!(
        drain(&mut s, now),
        vec![(Route::Control, Kind::Credit(Credit { receive_window: 0 }))]
    );
    assert_eq!(
        s.receive_window(),
        0,
        "and is announced on the next handshake"
    );
}

#[test]
fn zero_limits_read_as_the_defaults() {
    let l = effective_limits(
        Some(&Limits {
            max_frame_bytes: u32::MAX,
            ..Default::default()
        }),
        0,
    );
    assert_eq!(l.max_frame_bytes as usize, ABSOLUTE_MAX_FRAME);
    assert_eq!(l.max_inflight, DEFAULT_MAX_INFLIGHT);
    assert_eq!(l.idle_timeout_ms, DEFAULT_IDLE_TIMEOUT_MS);
    assert_eq!(l.max_payload_bytes as usize, DEFAULT_MAX_PAYLOAD);
    assert_eq!(l.receive_window, DEFAULT_RECEIVE_WINDOW);
    assert_eq!(effective_limits(None, 5).receive_window, 5);
}

#[test]
fn relay_goaway_survives_an_early_close_and_timers_do_not_spin() {
    let now = t0();
    let opts = SessionOptions {
        backpressure_retries: 1,
        ..options()
    };
    let mut s = live_session(opts, limits(), now);
    s.submit_message(message(1, now.unix_ms, 0), 1);
    s.submit_message(message(2, now.unix_ms, 0), 2);
    drain(&mut s, now);
    s.handle_frames([rejected(1, ErrorCode::Busy, 100)], now)
        .unwrap();
    s.handle_frames(
        [kind(Kind::Goaway(Goaway {
            code: ErrorCode::ShuttingDown as i32,
            reason: "bye".into(),
            reconnect_after_ms: 700,
        }))],
        now,
    )
    .unwrap();
    // Long after the retry time: while draining, only the drain deadline and keepalives
    // wake the session, never an instant already past.
    let t = after(now, 5000);
    s.handle_timeout(t);
    let next = s.poll_timeout().unwrap();
    assert!(next > t.at, "{next:?} is not after {:?}", t.at);
    // The relay closes before answering message 2.
    assert_eq!(
        s.disconnected("connection closed", None),
        Some(Duration::from_millis(700))
    );
    let ev = events(&mut s);
    assert!(matches!(
        ev.last(),
        Some(Event::Disconnected {
            code: Some(ErrorCode::ShuttingDown),
            ..
        })
    ));
}

#[test]
fn bulk_delivery_of_an_unknown_campaign_is_not_acked_but_refused() {
    let now = t0();
    let mut s = live_session(options(), limits(), now);
    s.handle_frames(
        [kind(Kind::BulkDeliver(BulkDeliver {
            tag: 9,
            campaign_id: Bytes::from(vec![3; 16]),
            recipients: vec!["ali@alpha".into()],
            ..Default::default()
        }))],
        now,
    )
    .unwrap();
    assert!(events(&mut s).is_empty());
    assert!(drain(&mut s, now).is_empty(), "not acked");
    let close = s.poll_close().unwrap();
    assert_eq!(
        close.goaway.map(|g| g.code),
        Some(ErrorCode::UnknownCampaign as i32)
    );
    assert!(!close.final_close, "reconnects to get the envelope again");
}
