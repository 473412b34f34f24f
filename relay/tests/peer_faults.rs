//! Destination gateways that misbehave (issue 6, peer faults), over real WebSockets on
//! 127.0.0.1: a gateway that disconnects mid-batch, one that acks slowly, a reconnect storm of
//! every gateway at once, and a platform offline long enough to fill its quota. In each,
//! every accepted message reaches its platform; nothing is lost.

mod common;

use common::{InProcess, RawPeer, deliver, envelope, key};
use federation_spec::proto::{Ack, Credit, ErrorCode, Frame, frame::Kind};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn frame(kind: Kind) -> Frame {
    Frame { kind: Some(kind) }
}

fn id(i: u32) -> [u8; 16] {
    let mut id = [0x5a; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    id
}

async fn connect(addr: SocketAddr, dir: &std::path::Path, peer: &str) -> RawPeer {
    RawPeer::connect(addr, peer, key(dir, peer).secret)
        .await
        .expect("handshake succeeds")
}

/// Sends messages `ids` from alpha to `to` and returns how each was answered.
async fn send_all(
    alpha: &mut RawPeer,
    dir: &std::path::Path,
    ids: std::ops::Range<u32>,
    to: &str,
) -> HashMap<u32, ErrorCode> {
    let secret = key(dir, "alpha").secret;
    for i in ids.clone() {
        alpha
            .send(&deliver(&envelope(id(i), "ann@alpha", to, "x"), &secret))
            .await;
    }
    let mut answers = HashMap::new();
    while answers.len() < ids.len() {
        match alpha.recv().await.expect("answers").kind {
            Some(Kind::Accepted(a)) => {
                answers.insert(
                    u32::from_be_bytes(a.id[..4].try_into().unwrap()),
                    ErrorCode::Unspecified,
                );
            }
            Some(Kind::Rejected(r)) => {
                let code = ErrorCode::try_from(r.code).unwrap();
                answers.insert(u32::from_be_bytes(r.id[..4].try_into().unwrap()), code);
            }
            _ => {}
        }
    }
    answers
}

/// The message number of a Deliver frame, and its tag.
fn delivered(f: &Frame) -> Option<(u32, u64)> {
    use prost::Message;
    let Some(Kind::Deliver(d)) = &f.kind else {
        return None;
    };
    let e = federation_spec::proto::Envelope::decode(d.envelope.clone()).ok()?;
    Some((u32::from_be_bytes(e.id[..4].try_into().ok()?), d.tag))
}

#[tokio::test]
async fn a_gateway_that_disconnects_mid_batch_gets_the_rest_again() {
    let relay = InProcess::start("").await;
    let (dir, addr) = (relay.dir.path(), relay.relay.ws_addr.unwrap());
    let mut alpha = connect(addr, dir, "alpha").await;
    let answers = send_all(&mut alpha, dir, 0..200, "bo@beta").await;
    assert!(answers.values().all(|c| *c == ErrorCode::Unspecified));

    // Beta takes 100, acks the first 50, and drops the connection.
    let mut beta = connect(addr, dir, "beta").await;
    let mut acked = HashSet::new();
    let mut seen = 0;
    while seen < 100 {
        let f = beta.recv().await.expect("deliveries");
        let Some((n, tag)) = delivered(&f) else {
            continue;
        };
        seen += 1;
        if seen <= 50 {
            beta.send(&frame(Kind::Ack(Ack { tags: vec![tag] }))).await;
            acked.insert(n);
        }
    }
    // Let the acks reach the relay before the connection goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(beta);

    // A new session gets everything not acked, and nothing that was.
    let mut beta = connect(addr, dir, "beta").await;
    let mut again = HashSet::new();
    while again.len() < 150 {
        let f = tokio::time::timeout(Duration::from_secs(10), beta.recv())
            .await
            .expect("the rest comes again")
            .expect("open");
        let Some((n, tag)) = delivered(&f) else {
            continue;
        };
        assert!(
            !acked.contains(&n),
            "message {n} was acked, yet delivered again"
        );
        again.insert(n);
        beta.send(&frame(Kind::Ack(Ack { tags: vec![tag] }))).await;
    }
    let all: HashSet<u32> = acked.union(&again).copied().collect();
    assert_eq!(all.len(), 200, "every message delivered");
}

#[tokio::test]
async fn a_slow_acker_never_has_more_than_its_window_and_gets_everything() {
    let relay = InProcess::start("").await;
    let (dir, addr) = (relay.dir.path(), relay.relay.ws_addr.unwrap());
    let mut beta = connect(addr, dir, "beta").await;
    beta.send(&frame(Kind::Credit(Credit { receive_window: 8 })))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut alpha = connect(addr, dir, "alpha").await;
    send_all(&mut alpha, dir, 0..100, "bo@beta").await;

    let mut outstanding: Vec<u64> = Vec::new();
    let mut got = HashSet::new();
    let mut max_outstanding = 0;
    while got.len() < 100 {
        // Read what is there; when nothing comes for a moment, ack the oldest (slowly).
        match tokio::time::timeout(Duration::from_millis(30), beta.recv()).await {
            Ok(Some(f)) => {
                if let Some((n, tag)) = delivered(&f) {
                    got.insert(n);
                    outstanding.push(tag);
                    max_outstanding = max_outstanding.max(outstanding.len());
                }
            }
            Ok(None) => panic!("connection closed"),
            Err(_) => {
                assert!(
                    !outstanding.is_empty(),
                    "the relay stopped sending with room in the window"
                );
                let tag = outstanding.remove(0);
                beta.send(&frame(Kind::Ack(Ack { tags: vec![tag] }))).await;
            }
        }
    }
    assert!(
        max_outstanding <= 8,
        "{max_outstanding} deliveries outstanding with a window of 8"
    );
    assert_eq!(max_outstanding, 8, "the window was used");
}

#[tokio::test]
async fn a_reconnect_storm_of_every_gateway_loses_nothing() {
    let relay = InProcess::start("").await;
    let (dir, addr) = (relay.dir.path(), relay.relay.ws_addr.unwrap());
    // Beta runs four gateways; they share the deliveries.
    let mut gateways = Vec::new();
    for _ in 0..4 {
        gateways.push(connect(addr, dir, "beta").await);
    }
    let mut alpha = connect(addr, dir, "alpha").await;
    send_all(&mut alpha, dir, 0..400, "bo@beta").await;
    let mut acked = HashSet::new();
    // Each gateway takes and acks a few, then all drop at once.
    for g in gateways.iter_mut() {
        for _ in 0..20 {
            let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(500), g.recv()).await
            else {
                break;
            };
            if let Some((n, tag)) = delivered(&f) {
                g.send(&frame(Kind::Ack(Ack { tags: vec![tag] }))).await;
                acked.insert(n);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(gateways);
    // Meanwhile alpha keeps sending; then every gateway comes back at the same moment.
    send_all(&mut alpha, dir, 400..600, "bo@beta").await;
    let mut back = Vec::new();
    for _ in 0..4 {
        back.push(tokio::spawn({
            let dir = dir.to_path_buf();
            async move { connect(addr, &dir, "beta").await }
        }));
    }
    let mut gateways = Vec::new();
    for b in back {
        gateways.push(b.await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.len() < 600 && Instant::now() < deadline {
        for g in gateways.iter_mut() {
            while let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(20), g.recv()).await
            {
                if let Some((n, tag)) = delivered(&f) {
                    g.send(&frame(Kind::Ack(Ack { tags: vec![tag] }))).await;
                    acked.insert(n);
                }
            }
        }
    }
    assert_eq!(
        acked.len(),
        600,
        "every accepted message reached a gateway of beta"
    );
}

#[tokio::test]
async fn an_offline_platform_fills_its_quota_then_pushes_back_then_drains() {
    // Every destination may hold 300 messages.
    let relay = InProcess::start("[queue]\nmax_messages = 300\n").await;
    let (dir, addr) = (relay.dir.path(), relay.relay.ws_addr.unwrap());
    let mut alpha = connect(addr, dir, "alpha").await;
    // Gamma is offline: the first 300 are stored, the rest pushed back with BUSY.
    let answers = send_all(&mut alpha, dir, 0..400, "cy@gamma").await;
    let accepted: HashSet<u32> = answers
        .iter()
        .filter(|(_, c)| **c == ErrorCode::Unspecified)
        .map(|(n, _)| *n)
        .collect();
    let busy = answers.values().filter(|c| **c == ErrorCode::Busy).count();
    assert_eq!((accepted.len(), busy), (300, 100), "{answers:?}");
    // Other destinations are not affected by gamma's full queue.
    let to_beta = send_all(&mut alpha, dir, 1000..1010, "bo@beta").await;
    assert!(to_beta.values().all(|c| *c == ErrorCode::Unspecified));

    // Gamma returns and drains everything, in order.
    let mut gamma = connect(addr, dir, "gamma").await;
    let mut order = Vec::new();
    while order.len() < 300 {
        let f = tokio::time::timeout(Duration::from_secs(10), gamma.recv())
            .await
            .expect("the queue drains")
            .expect("open");
        if let Some((n, tag)) = delivered(&f) {
            order.push(n);
            gamma.send(&frame(Kind::Ack(Ack { tags: vec![tag] }))).await;
        }
    }
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "FIFO per lane");
    assert_eq!(order.iter().copied().collect::<HashSet<_>>(), accepted);
    // With room again, the pushed-back messages are taken and delivered.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retried = send_all(&mut alpha, dir, 300..400, "cy@gamma").await;
    assert!(
        retried.values().all(|c| *c == ErrorCode::Unspecified),
        "{retried:?}"
    );
    let mut late = HashSet::new();
    while late.len() < 100 {
        let f = tokio::time::timeout(Duration::from_secs(10), gamma.recv())
            .await
            .expect("delivered")
            .expect("open");
        if let Some((n, tag)) = delivered(&f) {
            late.insert(n);
            gamma.send(&frame(Kind::Ack(Ack { tags: vec![tag] }))).await;
        }
    }
}
