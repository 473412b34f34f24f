//! Bad input over the live network, on both transports (WebSocket and QUIC), before and after
//! the handshake: each case gets the code SPEC.md section 10 gives it, in a Goaway followed by
//! the end of the connection, and is counted in `relay_protocol_errors_total{code}`; after
//! every case a well-behaved pair of peers (the [`Witness`]) still gets a message through.
//!
//! protocol.rs already covers, over WebSocket only: a garbage body after the handshake, a
//! 4 GiB length before it, an Ack before the Hello, and an idle (silent) handshake.

mod common;

use bytes::Bytes;
use common::{InProcess, Target, Transport, Witness, deliver, envelope, key, metric};
use federation_spec::frame::{HANDSHAKE_MAX_FRAME, encode_kind, encode_to_bytes};
use federation_spec::proto::{
    Accepted, Auth, ErrorCode, Frame, Hello, Lane, Ping, Receipt, ReceiptKind, StreamInit,
    frame::Kind,
};
use prost::Message;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long the witness may take for one message while the relay is being abused.
const WITNESS_BOUND: Duration = Duration::from_secs(3);

/// What a case sends.
#[derive(Clone, Debug)]
enum Act {
    /// Raw bytes: one binary WebSocket message, or bytes on the QUIC control stream.
    Raw(Vec<u8>),
    /// A frame, the same way.
    Frame(Frame),
    /// QUIC: bytes on our chat lane stream (opened with its StreamInit).
    OnLane(Vec<u8>),
    /// QUIC: a new unidirectional stream holding exactly these bytes.
    RawUni(Vec<u8>),
    /// QUIC: finish our side of the control stream.
    FinishControl,
    /// QUIC: finish our chat lane stream.
    FinishLane,
    /// WebSocket: a text message.
    Text,
}

struct Case {
    name: &'static str,
    only: Option<Transport>,
    acts: Vec<Act>,
    expect: ErrorCode,
}

fn case(name: &'static str, acts: Vec<Act>, expect: ErrorCode) -> Case {
    Case {
        name,
        only: None,
        acts,
        expect,
    }
}

fn only(transport: Transport, mut c: Case) -> Case {
    c.only = Some(transport);
    c
}

fn frame(kind: Kind) -> Frame {
    Frame { kind: Some(kind) }
}

fn hello(versions: Vec<u32>, peer: &str) -> Frame {
    frame(Kind::Hello(Hello {
        versions,
        peer: peer.into(),
        client_nonce: Bytes::from(vec![7; 32]),
        agent: "abuse-test".into(),
    }))
}

fn ping(nonce: u64) -> Frame {
    frame(Kind::Ping(Ping { nonce }))
}

fn stream_init(lane: i32) -> Frame {
    frame(Kind::StreamInit(StreamInit { lane }))
}

/// Deterministic noise (xorshift), so a failure can be replayed byte for byte.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A length prefix announcing `len` followed by `body`.
fn prefixed(len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// `encoded` with the first occurrence of `find` replaced by `with` (same length).
fn patch(mut encoded: Vec<u8>, find: &[u8], with: &[u8]) -> Vec<u8> {
    assert_eq!(find.len(), with.len());
    let at = encoded
        .windows(find.len())
        .position(|w| w == find)
        .expect("pattern present");
    encoded[at..at + find.len()].copy_from_slice(with);
    encoded
}

/// A frame body of exactly `n` bytes with no kind: one unknown length-delimited field
/// (number 100), ignored after the handshake (SPEC.md 4.4).
fn unknown_field_frame(n: usize) -> Vec<u8> {
    let mut payload_len = n - 2 - 3;
    // A 3-byte varint holds lengths below 2^21; shrink the payload if the varint is shorter.
    let varint = |mut v: usize| {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    };
    while 2 + varint(payload_len).len() + payload_len != n {
        payload_len += 1;
    }
    let mut body = vec![0xa2, 0x06];
    body.extend(varint(payload_len));
    body.resize(n, b'x');
    prefixed(n as u32, &body)
}

fn before_handshake_cases() -> Vec<Case> {
    use Act::*;
    use ErrorCode::*;
    let random = noise(0x5eed, 200);
    let random_len = u32::from_be_bytes(random[..4].try_into().unwrap());
    assert!(
        random_len as usize > HANDSHAKE_MAX_FRAME,
        "seed gives a huge length"
    );
    let mut garbage = vec![0x07];
    garbage.extend(noise(0xbad, 63));
    let bad_utf8_peer = patch(
        encode_to_bytes(&hello(vec![1], "alpha")).to_vec(),
        b"alpha",
        b"alph\xff",
    );
    let mut short_nonce = hello(vec![1], "alpha");
    if let Some(Kind::Hello(h)) = &mut short_nonce.kind {
        h.client_nonce = Bytes::from(vec![7; 31]);
    }
    let mut long_agent = hello(vec![1], "alpha");
    if let Some(Kind::Hello(h)) = &mut long_agent.kind {
        h.agent = "a".repeat(65);
    }
    let deliver_frame = deliver(
        &envelope([1; 16], "ali@alpha", "bo@beta", "early"),
        &ed25519_dalek::SigningKey::from_bytes(&[3; 32]),
    );
    vec![
        case(
            "random bytes (huge length)",
            vec![Raw(random)],
            FrameTooLarge,
        ),
        case(
            "garbage frame body",
            vec![Raw(prefixed(64, &garbage))],
            MalformedFrame,
        ),
        only(
            Transport::Quic,
            case(
                "2 GiB declared length",
                vec![Raw(prefixed(0x8000_0000, b"x"))],
                FrameTooLarge,
            ),
        ),
        case(
            "one byte over the handshake limit",
            vec![Raw(prefixed(HANDSHAKE_MAX_FRAME as u32 + 1, b"x"))],
            FrameTooLarge,
        ),
        only(
            Transport::Ws,
            case(
                "message ends inside a frame",
                vec![Raw(prefixed(10, &[1, 2, 3]))],
                MalformedFrame,
            ),
        ),
        only(
            Transport::Quic,
            case(
                "control stream ends inside a frame",
                vec![Raw(prefixed(10, &[1, 2, 3])), FinishControl],
                MalformedFrame,
            ),
        ),
        case(
            "deliver before the handshake",
            vec![Frame(deliver_frame)],
            UnexpectedFrame,
        ),
        case(
            "auth before hello",
            vec![Frame(frame(Kind::Auth(Auth::default())))],
            UnexpectedFrame,
        ),
        case(
            "unsupported version",
            vec![Frame(hello(vec![2], "alpha"))],
            UnsupportedVersion,
        ),
        case(
            "no version at all",
            vec![Frame(hello(vec![], "alpha"))],
            UnsupportedVersion,
        ),
        case(
            "a second hello instead of auth",
            vec![
                Frame(hello(vec![1], "alpha")),
                Frame(hello(vec![1], "alpha")),
            ],
            UnexpectedFrame,
        ),
        case(
            "invalid UTF-8 in hello.peer",
            vec![Raw(bad_utf8_peer)],
            MalformedFrame,
        ),
        case(
            "client nonce of 31 bytes",
            vec![Frame(short_nonce)],
            MalformedFrame,
        ),
        case("agent of 65 bytes", vec![Frame(long_agent)], MalformedFrame),
        case(
            "frame with no kind during the handshake",
            vec![Raw(prefixed(0, &[]))],
            UnexpectedFrame,
        ),
        only(
            Transport::Ws,
            case("text message", vec![Text], MalformedFrame),
        ),
        only(
            Transport::Quic,
            case(
                "lane stream before welcome",
                // The relay takes a QUIC connection once its control stream carries bytes.
                vec![
                    Frame(hello(vec![1], "alpha")),
                    OnLane(encode_to_bytes(&ping(1)).to_vec()),
                ],
                UnexpectedFrame,
            ),
        ),
        only(
            Transport::Quic,
            case(
                "unidirectional stream without stream_init",
                vec![
                    Frame(hello(vec![1], "alpha")),
                    RawUni(encode_to_bytes(&ping(1)).to_vec()),
                ],
                UnexpectedFrame,
            ),
        ),
    ]
}

fn after_handshake_cases(max_frame: u32) -> Vec<Case> {
    use Act::*;
    use ErrorCode::*;
    let mut garbage = vec![0x07];
    garbage.extend(noise(0xfeed, 99));
    let bad_receipt = patch(
        encode_kind(Kind::Receipt(Receipt {
            id: Bytes::from(vec![1; 16]),
            from: "bo@alpha".into(),
            to: "al@beta".into(),
            kind: ReceiptKind::Read as i32,
            at_ms: 1,
            tag: 0,
        }))
        .to_vec(),
        b"beta",
        b"bet\xff",
    );
    vec![
        only(
            Transport::Quic,
            case(
                "garbage frame body on the control stream",
                vec![Raw(prefixed(100, &garbage))],
                MalformedFrame,
            ),
        ),
        only(
            Transport::Quic,
            case(
                "garbage frame body on a lane stream",
                vec![OnLane(prefixed(100, &garbage))],
                MalformedFrame,
            ),
        ),
        case(
            "2 GiB declared length",
            vec![Raw(prefixed(0x8000_0000, b"x"))],
            FrameTooLarge,
        ),
        case(
            "one byte over max_frame_bytes",
            vec![Raw(prefixed(max_frame + 1, b"x"))],
            FrameTooLarge,
        ),
        only(
            Transport::Ws,
            case(
                "message ends inside a frame",
                vec![Raw(prefixed(10, &[1, 2, 3]))],
                MalformedFrame,
            ),
        ),
        only(
            Transport::Quic,
            case(
                "lane stream ends inside a frame",
                vec![OnLane(prefixed(10, &[1, 2, 3])), FinishLane],
                MalformedFrame,
            ),
        ),
        case(
            "a second hello",
            vec![Frame(hello(vec![1], "alpha"))],
            UnexpectedFrame,
        ),
        case(
            "auth after welcome",
            vec![Frame(frame(Kind::Auth(Auth::default())))],
            UnexpectedFrame,
        ),
        case(
            "accepted sent by a peer (wrong direction)",
            vec![Frame(frame(Kind::Accepted(Accepted::default())))],
            UnexpectedFrame,
        ),
        case(
            "stream_init on the websocket or the control stream",
            vec![Frame(stream_init(Lane::Chat as i32))],
            UnexpectedFrame,
        ),
        only(
            Transport::Quic,
            case(
                "a second stream_init on a lane stream",
                vec![OnLane(
                    encode_to_bytes(&stream_init(Lane::Chat as i32)).to_vec(),
                )],
                UnexpectedFrame,
            ),
        ),
        only(
            Transport::Quic,
            case(
                "lane stream without stream_init",
                vec![RawUni(encode_to_bytes(&ping(1)).to_vec())],
                UnexpectedFrame,
            ),
        ),
        only(
            Transport::Quic,
            case(
                "stream_init naming LANE_UNSPECIFIED",
                vec![RawUni(encode_to_bytes(&stream_init(0)).to_vec())],
                UnexpectedFrame,
            ),
        ),
        only(
            Transport::Quic,
            case(
                "stream_init naming an unknown lane",
                vec![RawUni(encode_to_bytes(&stream_init(9)).to_vec())],
                UnexpectedFrame,
            ),
        ),
        case(
            "invalid UTF-8 in receipt.to",
            vec![Raw(bad_receipt)],
            MalformedFrame,
        ),
        only(
            Transport::Ws,
            case("text message", vec![Text], MalformedFrame),
        ),
    ]
}

async fn act(wire: &mut common::Wire, a: &Act) {
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    match a {
        Act::Raw(b) => wire.send_bytes(b.clone()).await,
        Act::Frame(f) => wire.send(f).await,
        Act::OnLane(b) => {
            let _ = wire.quic().lane_bytes(Lane::Chat, b).await;
        }
        Act::RawUni(b) => wire.quic().raw_uni(b).await,
        Act::FinishControl => wire.quic().finish_control(),
        Act::FinishLane => wire.quic().finish_lane(Lane::Chat),
        Act::Text => {
            use futures_util::SinkExt;
            let _ = wire.ws().ws.send(WsMessage::text("hello")).await;
        }
    }
}

/// Runs every case for `transport` on a fresh connection (authenticated as alpha when
/// `authenticate`), checks the Goaway's code and the end of the connection, then the
/// witness; finally the protocol-error counters against the codes expected.
async fn run(t: &Target, transport: Transport, authenticate: bool, cases: Vec<Case>) {
    let mut witness = Witness::start(t).await;
    let mut expected: BTreeMap<&str, f64> = BTreeMap::new();
    let mut checked_close_code = false;
    for c in cases
        .iter()
        .filter(|c| c.only.is_none_or(|o| o == transport))
    {
        let mut wire = if authenticate {
            transport.connect(t, "alpha").await
        } else {
            transport.open(t).await
        };
        for a in &c.acts {
            act(&mut wire, a).await;
        }
        // Once per run, check that the QUIC close code repeats the Goaway's (SPEC.md 2.2.5)
        // rather than closing our side first (which costs the relay's 1 s grace).
        let goaway = match (&mut wire, checked_close_code) {
            (common::Wire::Quic(q), false) => {
                checked_close_code = true;
                let mut seen = None;
                while let Some(f) = q.recv().await {
                    if let Some(Kind::Goaway(g)) = f.kind {
                        seen = Some(g);
                    }
                }
                let code = q.close_code(Duration::from_secs(5)).await;
                assert_eq!(
                    code,
                    Some(c.expect as u64),
                    "{transport:?} {}: QUIC close code",
                    c.name
                );
                seen
            }
            _ => wire.goaway().await,
        };
        let goaway = goaway.unwrap_or_else(|| panic!("{transport:?} {}: no goaway", c.name));
        assert_eq!(
            ErrorCode::try_from(goaway.code),
            Ok(c.expect),
            "{transport:?} {}: {goaway:?}",
            c.name
        );
        *expected.entry(c.expect.as_str_name()).or_default() += 1.0;
        witness.check(WITNESS_BOUND).await;
    }
    for (code, count) in &expected {
        let series = format!("relay_protocol_errors_total{{code=\"{code}\"}}");
        assert_eq!(metric(t.admin, &series).await, *count, "{series}");
    }
    eprintln!(
        "{transport:?}: {} cases, witness worst {:?}",
        expected.values().sum::<f64>(),
        witness.worst
    );
}

#[tokio::test]
async fn bad_input_before_the_handshake_over_websocket() {
    let relay = InProcess::start("").await;
    run(
        &relay.target(),
        Transport::Ws,
        false,
        before_handshake_cases(),
    )
    .await;
}

#[tokio::test]
async fn bad_input_before_the_handshake_over_quic() {
    let relay = InProcess::start("").await;
    run(
        &relay.target(),
        Transport::Quic,
        false,
        before_handshake_cases(),
    )
    .await;
}

#[tokio::test]
async fn bad_input_after_the_handshake_over_websocket() {
    let relay = InProcess::start("[limits]\nmax_frame_bytes = 131072\n").await;
    run(
        &relay.target(),
        Transport::Ws,
        true,
        after_handshake_cases(131_072),
    )
    .await;
}

#[tokio::test]
async fn bad_input_after_the_handshake_over_quic() {
    let relay = InProcess::start("[limits]\nmax_frame_bytes = 131072\n").await;
    run(
        &relay.target(),
        Transport::Quic,
        true,
        after_handshake_cases(131_072),
    )
    .await;
}

/// What is not fatal is answered or ignored and the session goes on (SPEC.md 2.3.2, 4.2,
/// 4.4, 6.4): a frame of exactly `max_frame_bytes`, a frame with no kind, an empty
/// WebSocket message, and an envelope whose address is not UTF-8 (Rejected{MALFORMED_FRAME}).
#[tokio::test]
async fn tolerated_input_keeps_the_session() {
    let relay = InProcess::start("[limits]\nmax_frame_bytes = 131072\n").await;
    let t = relay.target();
    let alpha_key = key(&t.dir, "alpha").secret;
    for transport in Transport::BOTH {
        let mut wire = transport.connect(&t, "alpha").await;
        wire.send_bytes(unknown_field_frame(131_072)).await;
        wire.send_bytes(prefixed(0, &[])).await;
        if transport == Transport::Ws {
            wire.send_bytes(Vec::new()).await;
        }
        // An address that is not UTF-8 inside a signed envelope: the envelope cannot be
        // decoded, so the frame is refused (with no id to name) and the session continues.
        let env = envelope([9; 16], "ali@alpha", "bo@beta", "x").encode_to_vec();
        let env = Bytes::from(patch(env, b"bo@beta", b"bo@bet\xff"));
        let sig = federation_spec::signing::sign_envelope(&alpha_key, &env);
        let bad = frame(Kind::Deliver(federation_spec::proto::Deliver {
            envelope: env,
            signature: Bytes::copy_from_slice(&sig.to_bytes()),
            signer: Bytes::copy_from_slice(alpha_key.verifying_key().as_bytes()),
            tag: 0,
        }));
        wire.send(&bad).await;
        let refused = wire.recv().await.expect("an answer");
        let Some(Kind::Rejected(r)) = refused.kind else {
            panic!("{transport:?}: expected a rejection, got {refused:?}")
        };
        assert_eq!(r.code, ErrorCode::MalformedFrame as i32, "{transport:?}");
        assert!(r.id.is_empty());
        let good = deliver(
            &envelope([transport as u8 + 1; 16], "ali@alpha", "cy@gamma", "ok"),
            &alpha_key,
        );
        wire.send(&good).await;
        wire.send(&ping(77)).await;
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match wire.recv().await.expect("session open").kind {
                Some(Kind::Accepted(a)) => seen.push(format!("accepted {}", a.id[0])),
                Some(Kind::Pong(p)) => seen.push(format!("pong {}", p.nonce)),
                other => panic!("{transport:?}: unexpected {other:?}"),
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            vec![
                format!("accepted {}", transport as u8 + 1),
                "pong 77".to_string()
            ],
            "{transport:?}"
        );
    }
    assert_eq!(
        metric(
            t.admin,
            "relay_messages_rejected_total{lane=\"chat\",reason=\"ERROR_CODE_MALFORMED_FRAME\"}"
        )
        .await,
        2.0
    );
    let (_, text) = common::http_get(t.admin, "/metrics").await;
    assert!(!text.contains("relay_protocol_errors_total{"), "{text}");
}

/// Finishing the QUIC control stream ends the session: the relay closes the connection
/// (SPEC.md 2.2.2 rule 4) and the session is gone from the gauges.
#[tokio::test]
async fn finishing_the_quic_control_stream_ends_the_session() {
    let relay = InProcess::start("").await;
    let t = relay.target();
    let mut wire = Transport::Quic.connect(&t, "alpha").await;
    let series = "relay_sessions{peer=\"alpha\",transport=\"quic\"}";
    assert_eq!(metric(t.admin, series).await, 1.0);
    wire.quic().finish_control();
    let code = wire.quic().close_code(Duration::from_secs(5)).await;
    assert_eq!(code, Some(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric(t.admin, series).await != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "session still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Witness::start(&t).await.check(WITNESS_BOUND).await;
}
