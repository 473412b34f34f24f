//! The SDK against a scripted relay over real sockets on 127.0.0.1 (QUIC, ws and wss).

mod common;

use bytes::Bytes;
use common::{MockRelay, MockSession, WAIT, alpha_keyfile, beta_key};
use ed25519_dalek::SigningKey;
use federation_spec::keyfile::KeyFile;
use federation_spec::proto::{
    Accepted, CampaignAck, CampaignCounts, CampaignState, CampaignStatus as ProtoStatus, Deliver,
    Envelope, ErrorCode, Goaway, Lane, Ping, Pong, Rejected, frame::Kind,
};
use federation_spec::signing::sign_envelope;
use prost::Message as _;
use relay_client::{
    Ca, CampaignSpec, Client, ClientConfig, ClientError, Event, MessageId, OutgoingMessage,
    ReconnectPolicy, SendError,
};
use std::time::Duration;

fn config(relay: &MockRelay) -> ClientConfig {
    let mut cfg = ClientConfig::new(&relay.url, alpha_keyfile())
        .unwrap()
        .with_reconnect(ReconnectPolicy {
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            ..ReconnectPolicy::default()
        })
        .with_receive_window(32);
    if let Some(der) = &relay.cert_der {
        cfg = cfg.with_ca(Ca::Der(der.clone()));
    }
    cfg
}

async fn next_event(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("timed out waiting for an event")
        .expect("event stream ended")
}

/// The next Deliver the client sent, with its decoded envelope.
async fn recv_deliver(session: &mut MockSession) -> (Deliver, Envelope) {
    match session.recv_kind().await {
        Kind::Deliver(d) => {
            let env = Envelope::decode(d.envelope.clone()).unwrap();
            (d, env)
        }
        other => panic!("expected a deliver, got {other:?}"),
    }
}

fn accepted(id: &Bytes, duplicate: bool) -> Kind {
    Kind::Accepted(Accepted {
        id: id.clone(),
        expires_at_ms: 123_456,
        duplicate,
        receipt: false,
    })
}

/// A message from bo@beta to ali@alpha, as the relay delivers it.
fn delivery(tag: u64, signer: &SigningKey) -> Kind {
    let env = Envelope {
        id: Bytes::from(vec![0xab; 16]),
        from: "bo@beta".into(),
        to: "ali@alpha".into(),
        lane: Lane::Chat as i32,
        created_at_ms: 1,
        content_type: "text/plain".into(),
        payload: Bytes::from_static(b"hello ali"),
        ..Default::default()
    };
    let bytes = Bytes::from(env.encode_to_vec());
    Kind::Deliver(Deliver {
        signature: Bytes::copy_from_slice(&sign_envelope(signer, &bytes).to_bytes()),
        signer: Bytes::copy_from_slice(signer.verifying_key().as_bytes()),
        envelope: bytes,
        tag,
    })
}

/// Send, accept, deliver, ack: the whole round on one transport.
async fn round_trip(mut relay: MockRelay) {
    let mut client = Client::connect(config(&relay)).await.unwrap();
    let mut session = relay.accept().await;
    assert_eq!(
        (session.peer.as_str(), session.receive_window),
        ("alpha", 32)
    );
    assert_eq!(client.session().unwrap().number, 1);

    let handle = client.handle();
    let send = tokio::spawn(async move {
        handle
            .send(OutgoingMessage::text("ali", "bo@beta", "hi bo"))
            .await
    });
    let (deliver, env) = recv_deliver(&mut session).await;
    assert_eq!(
        (env.from.as_str(), env.to.as_str()),
        ("ali@alpha", "bo@beta")
    );
    assert_eq!(&env.payload[..], b"hi bo");
    assert_eq!(deliver.tag, 0);
    session
        .send_lane(Lane::Chat, accepted(&env.id, false))
        .await;
    let receipt = send.await.unwrap().unwrap();
    assert_eq!(receipt.id, MessageId::from_slice(&env.id).unwrap());
    assert_eq!((receipt.expires_at_ms, receipt.duplicate), (123_456, false));

    session
        .send_lane(Lane::Chat, delivery(1, &beta_key()))
        .await;
    session
        .send_lane(Lane::Chat, delivery(2, &impostor_key()))
        .await;
    let Event::Message(good) = next_event(&mut client).await else {
        panic!("expected a message")
    };
    let Event::Message(forged) = next_event(&mut client).await else {
        panic!("expected a message")
    };
    assert!(good.verified && !forged.verified);
    assert_eq!(
        (good.from.as_str(), &good.payload[..], good.tag.value()),
        ("bo@beta", &b"hello ali"[..], 1)
    );
    client.ack_many(&[good.tag, forged.tag]);
    let Kind::Ack(ack) = session.recv_kind().await else {
        panic!("expected an ack")
    };
    assert_eq!(ack.tags, vec![1, 2]);

    session.send(Kind::Ping(Ping { nonce: 9 })).await;
    assert_eq!(session.recv_kind().await, Kind::Pong(Pong { nonce: 9 }));

    client.close().await;
    let rest = session.closed().await;
    assert!(
        rest.iter().any(|f| matches!(
            &f.kind,
            Some(Kind::Goaway(g)) if g.code == ErrorCode::ShuttingDown as i32
        )),
        "a closing client says goaway: {rest:?}"
    );
    assert!(
        tokio::time::timeout(WAIT, client.next_event())
            .await
            .unwrap()
            .is_some_and(|e| matches!(e, Event::Disconnected { .. }))
    );
}

/// A key the directory does not list, signing a message that claims to come from beta.
fn impostor_key() -> SigningKey {
    SigningKey::from_bytes(&[0x44; 32])
}

#[tokio::test]
async fn quic_round_trip() {
    round_trip(MockRelay::quic().await).await;
}

#[tokio::test]
async fn ws_round_trip() {
    round_trip(MockRelay::ws().await).await;
}

#[tokio::test]
async fn wss_round_trip() {
    round_trip(MockRelay::wss().await).await;
}

#[tokio::test]
async fn pinned_relay_key_alone_authenticates_the_relay() {
    let mut relay = MockRelay::quic().await;
    let mut cfg = config(&relay);
    cfg.ca = None;
    let client = Client::connect(cfg).await.unwrap();
    relay.accept().await;
    drop(client);

    // Another relay key than the pinned one is refused, and the relay is told why.
    let impostor = KeyFile::new(
        "alpha",
        common::alpha_key(),
        Some(SigningKey::from_bytes(&[0x99; 32]).verifying_key()),
    );
    let mut cfg = ClientConfig::new(&relay.url, impostor).unwrap();
    cfg.ca = None;
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(matches!(err, ClientError::Handshake(_)), "{err}");
    assert!(err.is_permanent());

    // Neither a CA nor a pinned key: nothing would authenticate the relay.
    let unpinned = KeyFile::new("alpha", common::alpha_key(), None);
    let cfg = ClientConfig::new(&relay.url, unpinned).unwrap();
    assert!(matches!(
        Client::connect(cfg).await.unwrap_err(),
        ClientError::Config(_)
    ));
}

#[tokio::test]
async fn unknown_peer_is_refused_with_the_relays_code() {
    let relay = MockRelay::ws().await;
    let stranger = KeyFile::new("gamma", SigningKey::from_bytes(&[5; 32]), None);
    let cfg = ClientConfig::new(&relay.url, stranger).unwrap();
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                code: ErrorCode::AuthFailed,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn pipelined_sends_are_matched_by_id_not_order() {
    let mut relay = MockRelay::ws().await;
    let client = Client::connect(config(&relay)).await.unwrap();
    let mut session = relay.accept().await;
    let mut pending = Vec::new();
    for n in 0..20 {
        let msg = client
            .prepare(OutgoingMessage::text("ali", "bo@beta", &format!("m{n}")))
            .unwrap();
        pending.push(client.submit(msg).await.unwrap());
    }
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(recv_deliver(&mut session).await.1.id);
    }
    for id in ids.iter().rev() {
        session.send(accepted(id, false)).await;
    }
    for (p, id) in pending.into_iter().zip(&ids) {
        assert_eq!(p.id().as_bytes(), &id[..]);
        assert_eq!(p.await.unwrap().id.as_bytes(), &id[..]);
    }
}

#[tokio::test]
async fn rejection_reaches_the_sender_typed() {
    let mut relay = MockRelay::quic().await;
    let client = Client::connect(config(&relay)).await.unwrap();
    let mut session = relay.accept().await;
    let handle = client.handle();
    let send = tokio::spawn(async move {
        handle
            .send(OutgoingMessage::text("ali", "x@nowhere", "?"))
            .await
    });
    let (_, env) = recv_deliver(&mut session).await;
    session
        .send_lane(
            Lane::Chat,
            Kind::Rejected(Rejected {
                id: env.id,
                code: ErrorCode::UnknownDestination as i32,
                detail: "no platform nowhere".into(),
                ..Default::default()
            }),
        )
        .await;
    let err = send.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        SendError::Rejected {
            code: ErrorCode::UnknownDestination,
            retry_after_ms: 0,
            detail: "no platform nowhere".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "rejected: UNKNOWN_DESTINATION (no platform nowhere)"
    );
}

#[tokio::test]
async fn unanswered_message_is_resent_with_the_same_id_after_a_crash() {
    let mut relay = MockRelay::quic().await;
    let mut client = Client::connect(config(&relay)).await.unwrap();
    let mut session = relay.accept().await;
    let handle = client.handle();
    let send = tokio::spawn(async move {
        handle
            .send(OutgoingMessage::text("ali", "bo@beta", "survive"))
            .await
    });
    let (first, _) = recv_deliver(&mut session).await;
    session.kill().await;

    let mut session = relay.accept().await;
    let (again, env) = recv_deliver(&mut session).await;
    assert_eq!(
        again.envelope, first.envelope,
        "same envelope bytes, same id"
    );
    assert_eq!(again.signature, first.signature);
    session.send_lane(Lane::Chat, accepted(&env.id, true)).await;
    let receipt = send.await.unwrap().unwrap();
    assert!(receipt.duplicate);

    assert!(matches!(
        next_event(&mut client).await,
        Event::Disconnected { .. }
    ));
    let Event::Reconnected(info) = next_event(&mut client).await else {
        panic!("expected reconnected")
    };
    assert_eq!(info.number, 2);
}

#[tokio::test]
async fn goaway_leads_to_a_reconnect_and_old_tags_are_void() {
    let mut relay = MockRelay::ws().await;
    let mut client = Client::connect(config(&relay)).await.unwrap();
    let session = relay.accept().await;
    session.send(delivery(1, &beta_key())).await;
    let Event::Message(old) = next_event(&mut client).await else {
        panic!("expected a message")
    };
    session
        .send(Kind::Goaway(Goaway {
            code: ErrorCode::ShuttingDown as i32,
            reason: "restart".into(),
            reconnect_after_ms: 30,
        }))
        .await;
    let mut session = relay.accept().await;
    assert!(matches!(
        next_event(&mut client).await,
        Event::Disconnected {
            code: Some(ErrorCode::ShuttingDown),
            ..
        }
    ));
    assert!(matches!(
        next_event(&mut client).await,
        Event::Reconnected(_)
    ));
    // The relay redelivers with a new tag; the ack of the old tag is not sent.
    session.send(delivery(7, &beta_key())).await;
    let Event::Message(new) = next_event(&mut client).await else {
        panic!("expected the redelivery")
    };
    client.ack(old.tag);
    client.ack(new.tag);
    let Kind::Ack(ack) = session.recv_kind().await else {
        panic!("expected an ack")
    };
    assert_eq!(ack.tags, vec![7]);
}

#[tokio::test]
async fn without_reconnect_a_lost_connection_fails_what_is_pending() {
    let mut relay = MockRelay::ws().await;
    let cfg = config(&relay).with_reconnect(ReconnectPolicy::disabled());
    let mut client = Client::connect(cfg).await.unwrap();
    let mut session = relay.accept().await;
    let handle = client.handle();
    let send = tokio::spawn(async move {
        handle
            .send(OutgoingMessage::text("ali", "bo@beta", "lost"))
            .await
    });
    recv_deliver(&mut session).await;
    session.kill().await;
    assert!(matches!(send.await.unwrap(), Err(SendError::Closed(_))));
    assert!(matches!(
        next_event(&mut client).await,
        Event::Disconnected { .. }
    ));
    assert!(
        tokio::time::timeout(WAIT, client.next_event())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        client
            .send(OutgoingMessage::text("ali", "bo@beta", "late"))
            .await,
        Err(SendError::Closed(_))
    ));
}

#[tokio::test]
async fn close_sends_pending_acks_before_its_goaway() {
    let mut relay = MockRelay::ws().await;
    let mut client = Client::connect(config(&relay)).await.unwrap();
    let mut session = relay.accept().await;
    session.send(delivery(4, &beta_key())).await;
    let tag = next_event(&mut client).await.tag().unwrap();
    client.ack(tag);
    client.close().await;
    let Kind::Ack(ack) = session.recv_kind().await else {
        panic!("expected the ack first")
    };
    assert_eq!(ack.tags, vec![4]);
    assert!(matches!(session.recv_kind().await, Kind::Goaway(_)));
}

fn campaign_ack(id: &Bytes, seq: u32, accepted: u32, rejected: u32, duplicate: bool) -> Kind {
    Kind::CampaignAck(CampaignAck {
        campaign_id: id.clone(),
        seq,
        accepted,
        rejected,
        duplicate,
    })
}

fn campaign_status(id: &Bytes, state: CampaignState, delivered: u64) -> Kind {
    Kind::CampaignStatus(ProtoStatus {
        campaign_id: id.clone(),
        state: state as i32,
        label: "drill".into(),
        total: Some(CampaignCounts {
            accepted: 2,
            delivered,
            pending: 2 - delivered,
            rejected: 1,
            ..Default::default()
        }),
        platforms: vec![CampaignCounts {
            platform: "beta".into(),
            accepted: 2,
            delivered,
            pending: 2 - delivered,
            ..Default::default()
        }],
    })
}

#[tokio::test]
async fn campaign_over_quic_resumes_after_a_crash() {
    let mut relay = MockRelay::quic().await;
    let mut client = Client::connect(config(&relay)).await.unwrap();
    let mut session = relay.accept().await;
    let handle = client.handle();
    let begin = tokio::spawn(async move {
        handle
            .begin_campaign(CampaignSpec {
                label: "drill".into(),
                ..CampaignSpec::text("alerts@alpha", "fire drill at noon")
            })
            .await
    });
    let Kind::CampaignBegin(b) = session.recv_kind().await else {
        panic!("expected a campaign begin")
    };
    let env = Envelope::decode(b.envelope.clone()).unwrap();
    assert_eq!((env.from.as_str(), env.to.as_str()), ("alerts@alpha", ""));
    assert_eq!(env.lane, Lane::Bulk as i32);
    let id = b.campaign_id.clone();
    session.send(campaign_ack(&id, 0, 0, 0, false)).await;
    let campaign = begin.await.unwrap().unwrap();
    assert_eq!(&campaign.id()[..], &id[..]);
    assert_eq!(campaign.envelope_id().as_bytes()[..], env.id[..]);

    let one = campaign
        .submit_chunk(1, vec!["ann@beta".into()])
        .await
        .unwrap();
    let two = campaign
        .submit_chunk(2, vec!["bob@beta".into(), "nobody".into()])
        .await
        .unwrap();
    for seq in 1..=2 {
        let Kind::CampaignChunk(c) = session.recv_kind().await else {
            panic!("expected chunk {seq}")
        };
        assert_eq!((c.seq, &c.campaign_id), (seq, &id));
    }
    session.send(campaign_ack(&id, 1, 1, 0, false)).await;
    assert_eq!(one.await.unwrap().accepted, 1);
    session.kill().await;

    // The new session gets the same Begin first, then the chunk nobody acknowledged.
    let mut session = relay.accept().await;
    let Kind::CampaignBegin(again) = session.recv_kind().await else {
        panic!("expected the begin again")
    };
    assert_eq!(again, b, "the same signed begin");
    session.send(campaign_ack(&id, 0, 0, 0, true)).await;
    let Kind::CampaignChunk(c) = session.recv_kind().await else {
        panic!("expected chunk 2 again")
    };
    assert_eq!(c.seq, 2);
    session
        .send(Kind::Rejected(Rejected {
            code: ErrorCode::RateLimited as i32,
            retry_after_ms: 20,
            campaign_id: id.clone(),
            seq: 2,
            ..Default::default()
        }))
        .await;
    let Kind::CampaignChunk(c) = session.recv_kind().await else {
        panic!("expected chunk 2 after the rate limit")
    };
    assert_eq!(c.recipients, ["bob@beta", "nobody"]);
    session.send(campaign_ack(&id, 2, 1, 1, false)).await;
    let ack = two.await.unwrap();
    assert_eq!((ack.seq, ack.accepted, ack.rejected), (2, 1, 1));

    let ending = {
        let campaign = campaign.clone();
        tokio::spawn(async move { campaign.end(2).await })
    };
    let Kind::CampaignEnd(e) = session.recv_kind().await else {
        panic!("expected the end")
    };
    assert_eq!(e.chunks, 2);
    session.send(campaign_ack(&id, 3, 2, 1, false)).await;
    let totals = ending.await.unwrap().unwrap();
    assert_eq!((totals.seq, totals.accepted, totals.rejected), (3, 2, 1));

    // A status nobody asked for is an event; one asked for is the answer.
    session
        .send(campaign_status(&id, CampaignState::Sending, 1))
        .await;
    let pushed = loop {
        if let Event::CampaignStatus(s) = next_event(&mut client).await {
            break s;
        }
    };
    assert_eq!(
        (pushed.state, pushed.total.delivered),
        (relay_client::CampaignState::Sending, 1)
    );
    let asking = tokio::spawn(async move { campaign.status().await });
    let Kind::CampaignStatusRequest(r) = session.recv_kind().await else {
        panic!("expected a status request")
    };
    assert_eq!(r.campaign_id, id);
    session
        .send(campaign_status(&id, CampaignState::Done, 2))
        .await;
    let status = asking.await.unwrap().unwrap();
    assert_eq!(status.state, relay_client::CampaignState::Done);
    assert_eq!(status.platforms[0].platform, "beta");
    assert_eq!(status.total.rejected, 1);

    // Unknown campaign: the refusal reaches the caller.
    let unknown = client.handle();
    let asking = tokio::spawn(async move { unknown.cancel_campaign([7; 16]).await });
    let Kind::CampaignCancel(c) = session.recv_kind().await else {
        panic!("expected a cancel")
    };
    session
        .send(Kind::Rejected(Rejected {
            code: ErrorCode::UnknownCampaign as i32,
            campaign_id: c.campaign_id,
            detail: "not yours".into(),
            ..Default::default()
        }))
        .await;
    let err = asking.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownCampaign));
}
