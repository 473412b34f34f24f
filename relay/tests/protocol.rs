//! The relay's answers to bad and hostile input, over a real WebSocket on 127.0.0.1 with a
//! bare protocol peer: each refusal carries the spec's error code, and nobody else is hurt.

mod common;

use common::{InProcess, RawPeer, deliver, envelope, http_get, key};
use federation_spec::proto::{ErrorCode, Frame, Lane, frame::Kind};
use std::time::Duration;

fn code_of(frame: &Frame) -> (ErrorCode, bool) {
    match &frame.kind {
        Some(Kind::Rejected(r)) => (
            ErrorCode::try_from(r.code).unwrap_or(ErrorCode::Unspecified),
            false,
        ),
        Some(Kind::Accepted(a)) => (ErrorCode::Unspecified, a.duplicate),
        other => panic!("expected accepted or rejected, got {other:?}"),
    }
}

async fn peer(relay: &InProcess, name: &str) -> RawPeer {
    RawPeer::connect(
        relay.relay.ws_addr.unwrap(),
        name,
        key(relay.dir.path(), name).secret,
    )
    .await
    .expect("handshake succeeds")
}

#[tokio::test]
async fn message_checks_give_the_spec_codes() {
    let relay = InProcess::start("").await;
    let alpha_key = key(relay.dir.path(), "alpha").secret;
    let beta_key = key(relay.dir.path(), "beta").secret;
    let mut alpha = peer(&relay, "alpha").await;

    // Spoofed sender: alpha claims a user of beta.
    alpha
        .send(&deliver(
            &envelope([1; 16], "bo@beta", "ali@alpha", "x"),
            &alpha_key,
        ))
        .await;
    assert_eq!(
        code_of(&alpha.recv().await.unwrap()).0,
        ErrorCode::SpoofedSender
    );
    // Signed with another platform's (valid) key.
    alpha
        .send(&deliver(
            &envelope([2; 16], "ali@alpha", "bo@beta", "x"),
            &beta_key,
        ))
        .await;
    assert_eq!(
        code_of(&alpha.recv().await.unwrap()).0,
        ErrorCode::BadSignature
    );
    // A forged signature with alpha's own key id.
    let mut forged = deliver(&envelope([3; 16], "ali@alpha", "bo@beta", "x"), &alpha_key);
    if let Some(Kind::Deliver(d)) = &mut forged.kind {
        let mut sig = d.signature.to_vec();
        sig[10] ^= 0x40;
        d.signature = sig.into();
    }
    alpha.send(&forged).await;
    assert_eq!(
        code_of(&alpha.recv().await.unwrap()).0,
        ErrorCode::BadSignature
    );
    // Unknown destination platform, and a malformed address.
    alpha
        .send(&deliver(
            &envelope([4; 16], "ali@alpha", "x@zeta", "x"),
            &alpha_key,
        ))
        .await;
    assert_eq!(
        code_of(&alpha.recv().await.unwrap()).0,
        ErrorCode::UnknownDestination
    );
    alpha
        .send(&deliver(
            &envelope([5; 16], "ali@alpha", "no-at-sign", "x"),
            &alpha_key,
        ))
        .await;
    assert_eq!(
        code_of(&alpha.recv().await.unwrap()).0,
        ErrorCode::BadAddress
    );
    // Too large a payload.
    let big = "y".repeat(70_000);
    alpha
        .send(&deliver(
            &envelope([6; 16], "ali@alpha", "bo@beta", &big),
            &alpha_key,
        ))
        .await;
    assert_eq!(
        code_of(&alpha.recv().await.unwrap()).0,
        ErrorCode::PayloadTooLarge
    );
    // A good one is accepted; the same frame again (a resend) is a duplicate.
    let good = deliver(&envelope([7; 16], "ali@alpha", "bo@beta", "hi"), &alpha_key);
    alpha.send(&good).await;
    assert_eq!(
        code_of(&alpha.recv().await.unwrap()),
        (ErrorCode::Unspecified, false)
    );
    alpha.send(&good).await;
    assert_eq!(
        code_of(&alpha.recv().await.unwrap()),
        (ErrorCode::Unspecified, true)
    );

    // beta gets the message once, then nothing more.
    let mut beta = peer(&relay, "beta").await;
    let Some(Kind::Deliver(d)) = beta.recv().await.unwrap().kind else {
        panic!("expected a deliver")
    };
    assert!(d.tag > 0);
    beta.send(&Frame {
        kind: Some(Kind::Ack(federation_spec::proto::Ack { tags: vec![d.tag] })),
    })
    .await;
    beta.send(&Frame {
        kind: Some(Kind::Ping(federation_spec::proto::Ping { nonce: 9 })),
    })
    .await;
    assert!(
        matches!(beta.recv().await.unwrap().kind, Some(Kind::Pong(p)) if p.nonce == 9),
        "no second delivery before the pong"
    );

    // A broadcaster may not send person-to-person.
    let mut news = peer(&relay, "news").await;
    let news_key = key(relay.dir.path(), "news").secret;
    news.send(&deliver(
        &envelope([8; 16], "desk@news", "bo@beta", "x"),
        &news_key,
    ))
    .await;
    assert_eq!(
        code_of(&news.recv().await.unwrap()).0,
        ErrorCode::NotPermitted
    );

    let (_, metrics) = http_get(relay.admin(), "/metrics").await;
    assert!(
        metrics.contains(
            "relay_messages_rejected_total{lane=\"chat\",reason=\"ERROR_CODE_SPOOFED_SENDER\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("relay_messages_accepted_total{lane=\"chat\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn unknown_key_and_peer_are_refused() {
    let relay = InProcess::start("").await;
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let g = RawPeer::connect(relay.relay.ws_addr.unwrap(), "alpha", stranger.clone())
        .await
        .err()
        .expect("refused");
    assert_eq!(g.code, ErrorCode::AuthFailed as i32);
    let g = RawPeer::connect(relay.relay.ws_addr.unwrap(), "zeta", stranger)
        .await
        .err()
        .expect("refused");
    assert_eq!(g.code, ErrorCode::AuthFailed as i32);
    let (_, metrics) = http_get(relay.admin(), "/metrics").await;
    assert!(
        metrics.contains("relay_auth_failures_total{reason=\"unknown peer or key\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn broken_framing_closes_only_that_connection() {
    let relay = InProcess::start("").await;
    let alpha_key = key(relay.dir.path(), "alpha").secret;
    let mut alpha = peer(&relay, "alpha").await;

    // Garbage after the handshake.
    let mut bad = peer(&relay, "gamma").await;
    bad.send_bytes(vec![0, 0, 0, 3, 0xff, 0xff, 0xff]).await;
    assert_eq!(
        bad.goaway().await.map(|g| g.code),
        Some(ErrorCode::MalformedFrame as i32)
    );
    // A huge declared length before the handshake.
    let mut huge = RawPeer::open(relay.relay.ws_addr.unwrap()).await;
    huge.send_bytes(vec![0xff, 0xff, 0xff, 0xff, 0]).await;
    assert_eq!(
        huge.goaway().await.map(|g| g.code),
        Some(ErrorCode::FrameTooLarge as i32)
    );
    // A frame that is not hello as the first frame.
    let mut early = RawPeer::open(relay.relay.ws_addr.unwrap()).await;
    early
        .send(&Frame {
            kind: Some(Kind::Ack(Default::default())),
        })
        .await;
    assert_eq!(
        early.goaway().await.map(|g| g.code),
        Some(ErrorCode::UnexpectedFrame as i32)
    );

    // alpha's session is untouched.
    alpha
        .send(&deliver(
            &envelope([1; 16], "ali@alpha", "bo@beta", "still here"),
            &alpha_key,
        ))
        .await;
    assert_eq!(
        code_of(&alpha.recv().await.unwrap()),
        (ErrorCode::Unspecified, false)
    );
}

#[tokio::test]
async fn slowloris_handshake_times_out() {
    let relay = InProcess::start("[limits]\nhandshake_timeout_ms = 300\n").await;
    let mut idle = RawPeer::open(relay.relay.ws_addr.unwrap()).await;
    let started = std::time::Instant::now();
    assert_eq!(
        idle.goaway().await.map(|g| g.code),
        Some(ErrorCode::HandshakeTimeout as i32)
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn full_queue_answers_busy_and_expiry_is_reported() {
    let relay = InProcess::start("[queue]\nmax_messages = 2\nmax_bytes = 1000000\n[lanes.call]\ndefault_ttl_s = 1\nmax_ttl_s = 1\n").await;
    let alpha_key = key(relay.dir.path(), "alpha").secret;
    let mut alpha = peer(&relay, "alpha").await;
    for i in 0..2u8 {
        let mut env = envelope([i + 1; 16], "ali@alpha", "cy@gamma", "x");
        env.lane = Lane::Call as i32;
        alpha.send(&deliver(&env, &alpha_key)).await;
        assert_eq!(
            code_of(&alpha.recv().await.unwrap()).0,
            ErrorCode::Unspecified
        );
    }
    alpha
        .send(&deliver(
            &envelope([9; 16], "ali@alpha", "cy@gamma", "x"),
            &alpha_key,
        ))
        .await;
    let busy = alpha.recv().await.unwrap();
    let Some(Kind::Rejected(r)) = busy.kind else {
        panic!("expected busy")
    };
    assert_eq!(r.code, ErrorCode::Busy as i32);
    assert!(r.retry_after_ms > 0);

    // gamma never connects: both call messages expire after 1 s and alpha is told, by tag.
    let mut expired = Vec::new();
    while expired.len() < 2 {
        match alpha.recv().await.expect("expiry notice").kind {
            Some(Kind::Expired(e)) => {
                assert_eq!(e.to, "cy@gamma");
                alpha
                    .send(&Frame {
                        kind: Some(Kind::Ack(federation_spec::proto::Ack { tags: vec![e.tag] })),
                    })
                    .await;
                expired.push(e.id[0]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    expired.sort();
    assert_eq!(expired, vec![1, 2]);
    // With the queue drained by expiry, gamma's quota has room again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        alpha
            .send(&deliver(
                &envelope([10 + expired.len() as u8; 16], "ali@alpha", "cy@gamma", "x"),
                &alpha_key,
            ))
            .await;
        let (code, _) = code_of(&alpha.recv().await.unwrap());
        if code == ErrorCode::Unspecified {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "quota never freed");
        expired.push(0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn admin_endpoints() {
    let relay = InProcess::start("").await;
    let _alpha = peer(&relay, "alpha").await;
    assert_eq!(http_get(relay.admin(), "/livez").await.0, 200);
    assert_eq!(http_get(relay.admin(), "/readyz").await.0, 200);
    let (status, peers) = http_get(relay.admin(), "/v1/peers").await;
    assert_eq!(status, 200);
    let peers: serde_json::Value = serde_json::from_str(&peers).unwrap();
    let alpha = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "alpha")
        .unwrap();
    assert_eq!(alpha["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(alpha["sessions"][0]["transport"], "ws");
    let (status, queues) = http_get(relay.admin(), "/v1/queues").await;
    assert_eq!(status, 200);
    assert!(queues.starts_with('['));
    let (_, metrics) = http_get(relay.admin(), "/metrics").await;
    assert!(
        metrics.contains("relay_sessions{peer=\"alpha\",transport=\"ws\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_delivery_never_acked_is_reported_expired_after_the_grace() {
    let relay = InProcess::start("[lanes.call]\ndefault_ttl_s = 1\nmax_ttl_s = 1\n").await;
    let alpha_key = key(relay.dir.path(), "alpha").secret;
    let mut alpha = peer(&relay, "alpha").await;
    let mut beta = peer(&relay, "beta").await;
    let mut env = envelope([0x44; 16], "ali@alpha", "bo@beta", "ring");
    env.lane = Lane::Call as i32;
    alpha.send(&deliver(&env, &alpha_key)).await;
    assert_eq!(
        code_of(&alpha.recv().await.unwrap()).0,
        ErrorCode::Unspecified
    );
    // beta takes the delivery and never acks it.
    assert!(matches!(
        beta.recv().await.unwrap().kind,
        Some(Kind::Deliver(_))
    ));
    // TTL 1 s plus the 10 s grace: alpha hears that its message expired.
    let started = std::time::Instant::now();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), alpha.recv())
            .await
            .expect("notice within 20 s")
            .expect("open");
        if let Some(Kind::Expired(e)) = frame.kind {
            assert_eq!((e.id[0], e.to.as_str()), (0x44, "bo@beta"));
            break;
        }
    }
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "not before the grace"
    );
}
