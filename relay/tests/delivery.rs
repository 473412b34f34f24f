//! End to end through the SDK over real QUIC and WebSocket connections to a relay on
//! 127.0.0.1: delivery across transports both ways, receipts, store-and-forward for an
//! offline platform.

mod common;

use common::{InProcess, key};
use federation_spec::proto::{Lane, ReceiptKind};
use relay_client::{Ca, Client, ClientConfig, Event, OutgoingMessage, OutgoingReceipt};
use std::path::Path;
use std::time::Duration;

async fn client(dir: &Path, peer: &str, url: &str) -> Client {
    let config = ClientConfig::new(url, key(dir, peer))
        .expect("config")
        .with_ca(Ca::PemFile(dir.join("tls/cert.pem")));
    tokio::time::timeout(Duration::from_secs(10), Client::connect(config))
        .await
        .expect("connects in time")
        .expect("connects")
}

/// The next event that carries a tag, acked, within 10 s.
async fn next(client: &mut Client) -> Event {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), client.next_event())
            .await
            .expect("an event within 10 s")
            .expect("client open");
        if let Some(tag) = event.tag() {
            client.ack(tag);
            return event;
        }
    }
}

#[tokio::test]
async fn quic_to_websocket_and_back_with_receipts() {
    let relay = InProcess::start("").await;
    let mut alpha = client(relay.dir.path(), "alpha", &relay.quic_url()).await;
    let mut beta = client(relay.dir.path(), "beta", &relay.ws_url()).await;

    let sent = alpha
        .send(OutgoingMessage::text(
            "alice",
            "bob@beta",
            "salam over quic",
        ))
        .await
        .expect("accepted");
    let Event::Message(m) = next(&mut beta).await else {
        panic!("expected a message")
    };
    assert_eq!(
        (m.from.as_str(), m.to.as_str(), m.lane),
        ("alice@alpha", "bob@beta", Lane::Chat)
    );
    assert_eq!(&m.payload[..], b"salam over quic");
    assert_eq!(m.id, sent.id);
    assert!(
        m.verified,
        "beta verified alpha's signature with the directory from Welcome"
    );

    // beta reads it: the receipt goes back to alpha.
    beta.send_receipt(OutgoingReceipt {
        id: m.id,
        from: "bob@beta".into(),
        to: "alice@alpha".into(),
        kind: ReceiptKind::Read,
        at_ms: 0,
    })
    .await
    .expect("receipt accepted");
    let Event::Receipt(r) = next(&mut alpha).await else {
        panic!("expected a receipt")
    };
    assert_eq!((r.id, r.kind), (sent.id, ReceiptKind::Read));

    // And the other way, call lane, WebSocket to QUIC.
    let mut call = OutgoingMessage::text("bob", "alice@alpha", "v=0");
    call.lane = Lane::Call;
    beta.send(call).await.expect("accepted");
    let Event::Message(m) = next(&mut alpha).await else {
        panic!("expected a message")
    };
    assert_eq!((m.from.as_str(), m.lane), ("bob@beta", Lane::Call));
}

#[tokio::test]
async fn offline_platform_gets_everything_in_order_when_it_returns() {
    let relay = InProcess::start("").await;
    let alpha = client(relay.dir.path(), "alpha", &relay.quic_url()).await;
    const N: usize = 500;
    let mut pending = Vec::new();
    for i in 0..N {
        let p = alpha
            .prepare(OutgoingMessage::text("alice", "cy@gamma", &format!("{i}")))
            .expect("prepare");
        pending.push(alpha.submit(p).await.expect("submitted"));
    }
    for p in pending {
        p.await.expect("accepted");
    }
    let mut gamma = client(relay.dir.path(), "gamma", &relay.ws_url()).await;
    for i in 0..N {
        let Event::Message(m) = next(&mut gamma).await else {
            panic!("expected a message")
        };
        assert_eq!(String::from_utf8_lossy(&m.payload), i.to_string(), "FIFO");
    }
}

#[tokio::test]
async fn a_campaign_through_the_sdk_over_quic_and_websocket() {
    use relay_client::{CampaignSpec, CampaignState};
    let relay = InProcess::start("").await;
    let dir = relay.dir.path();
    let news = client(dir, "news", &relay.quic_url()).await;
    let mut alpha = client(dir, "alpha", &relay.quic_url()).await;
    let mut beta = client(dir, "beta", &relay.ws_url()).await;

    let mut spec = CampaignSpec::text("alerts@news", "flood warning for the coast");
    spec.label = "sdk test".into();
    let campaign = news.handle().begin_campaign(spec).await.expect("begun");
    let mut pending = Vec::new();
    for seq in 1..=5u32 {
        let recipients: Vec<String> = (0..100)
            .map(|i| format!("u{seq}x{i}@{}", if i % 2 == 0 { "alpha" } else { "beta" }))
            .chain(std::iter::once("nobody@nowhere".to_string()))
            .collect();
        pending.push(campaign.submit_chunk(seq, recipients).await.expect("held"));
    }
    for p in pending {
        let ack = p.await.expect("chunk durable");
        assert_eq!((ack.accepted, ack.rejected), (100, 1));
    }
    let totals = campaign.end(5).await.expect("ended");
    assert_eq!((totals.seq, totals.accepted, totals.rejected), (6, 500, 5));

    for (client, want) in [(&mut alpha, "@alpha"), (&mut beta, "@beta")] {
        let mut got = 0;
        while got < 250 {
            let Event::Bulk(b) = next(client).await else {
                continue;
            };
            let m = b.message.expect("the SDK keeps the campaign's envelope");
            assert!(m.verified, "signed by a key of news");
            assert_eq!(m.from, "alerts@news");
            assert_eq!(&m.payload[..], b"flood warning for the coast");
            assert!(b.recipients.iter().all(|r| r.ends_with(want)));
            got += b.recipients.len();
        }
        assert_eq!(got, 250);
    }
    let mut status = campaign.status().await.expect("status");
    for _ in 0..50 {
        if status.state == CampaignState::Done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = campaign.status().await.expect("status");
    }
    assert_eq!(status.state, CampaignState::Done);
    assert_eq!(
        (
            status.total.accepted,
            status.total.delivered,
            status.total.rejected
        ),
        (500, 500, 5)
    );
    // Cancelling a finished campaign reports it done.
    assert_eq!(
        campaign.cancel().await.expect("answered").state,
        CampaignState::Done
    );
}
