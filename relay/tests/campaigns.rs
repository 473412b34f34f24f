//! Campaigns end to end (SPEC.md section 9), over real WebSockets on 127.0.0.1 with bare
//! protocol peers: the broadcaster `news` and the demo platforms `alpha`, `beta`, `gamma`.

mod common;

use bytes::Bytes;
use common::{ChildRelay, InProcess, RawPeer, envelope, http_get, key};
use federation_spec::proto::{
    Ack, BulkDeliver, CampaignAck, CampaignBegin, CampaignCancel, CampaignChunk, CampaignEnd,
    CampaignState, CampaignStatus, CampaignStatusRequest, ErrorCode, Frame, Lane, Rejected,
    frame::Kind,
};
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const PLATFORMS: [&str; 3] = ["alpha", "beta", "gamma"];

fn frame(kind: Kind) -> Frame {
    Frame { kind: Some(kind) }
}

/// A CampaignBegin signed by `news` with a 16-byte id of `id`.
fn begin(dir: &std::path::Path, id: u8, text: &str) -> Frame {
    let secret = key(dir, "news").secret;
    let mut env = envelope([id; 16], "alerts@news", "", text);
    env.lane = Lane::Bulk as i32;
    // A resent Begin must carry the identical envelope: one creation time per test binary.
    static CREATED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    env.created_at_ms = *CREATED.get_or_init(relay::router::unix_ms);
    let bytes = Bytes::from(env.encode_to_vec());
    let sig = federation_spec::signing::sign_envelope(&secret, &bytes);
    frame(Kind::CampaignBegin(CampaignBegin {
        campaign_id: Bytes::from(vec![id; 16]),
        envelope: bytes,
        signature: Bytes::copy_from_slice(&sig.to_bytes()),
        signer: Bytes::copy_from_slice(secret.verifying_key().as_bytes()),
        label: format!("test campaign {id}"),
    }))
}

fn chunk(id: u8, seq: u32, recipients: Vec<String>) -> Frame {
    frame(Kind::CampaignChunk(CampaignChunk {
        campaign_id: Bytes::from(vec![id; 16]),
        seq,
        recipients,
    }))
}

fn end(id: u8, chunks: u32) -> Frame {
    frame(Kind::CampaignEnd(CampaignEnd {
        campaign_id: Bytes::from(vec![id; 16]),
        chunks,
    }))
}

fn status_request(id: u8) -> Frame {
    frame(Kind::CampaignStatusRequest(CampaignStatusRequest {
        campaign_id: Bytes::from(vec![id; 16]),
    }))
}

/// `n` recipients spread round-robin over the three platforms: `u{i}@{platform}`.
fn recipients(from: usize, n: usize) -> Vec<String> {
    (from..from + n)
        .map(|i| format!("u{i}@{}", PLATFORMS[i % 3]))
        .collect()
}

async fn connect(addr: SocketAddr, dir: &std::path::Path, peer: &str) -> RawPeer {
    RawPeer::connect(addr, peer, key(dir, peer).secret)
        .await
        .expect("handshake succeeds")
}

/// The broadcaster's side: answers to its frames, skipping pushed progress reports.
enum Answer {
    Ack(CampaignAck),
    Status(CampaignStatus),
    Rejected(Rejected),
}

async fn answer(news: &mut RawPeer, want_status: bool) -> Answer {
    loop {
        match news.recv().await.expect("relay answers").kind {
            Some(Kind::CampaignAck(a)) => return Answer::Ack(a),
            Some(Kind::Rejected(r)) => return Answer::Rejected(r),
            Some(Kind::CampaignStatus(s)) if want_status => return Answer::Status(s),
            // Progress reports, and deliveries when the peer is a platform.
            Some(
                Kind::CampaignStatus(_) | Kind::Pong(_) | Kind::BulkDeliver(_) | Kind::Deliver(_),
            ) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn ack_of(news: &mut RawPeer, f: Frame) -> CampaignAck {
    news.send(&f).await;
    match answer(news, false).await {
        Answer::Ack(a) => a,
        Answer::Rejected(r) => panic!("refused: {r:?}"),
        Answer::Status(_) => unreachable!(),
    }
}

async fn refusal_of(news: &mut RawPeer, f: Frame) -> Rejected {
    news.send(&f).await;
    match answer(news, false).await {
        Answer::Rejected(r) => r,
        Answer::Ack(a) => panic!("expected a refusal, got {a:?}"),
        Answer::Status(_) => unreachable!(),
    }
}

async fn status_of(news: &mut RawPeer, id: u8) -> CampaignStatus {
    news.send(&status_request(id)).await;
    match answer(news, true).await {
        Answer::Status(s) => s,
        Answer::Rejected(r) => panic!("refused: {r:?}"),
        Answer::Ack(a) => panic!("unexpected ack {a:?}"),
    }
}

/// Waits until the campaign's status satisfies `done`, polling.
async fn wait_status(
    news: &mut RawPeer,
    id: u8,
    limit: Duration,
    done: impl Fn(&CampaignStatus) -> bool,
) -> CampaignStatus {
    let deadline = Instant::now() + limit;
    loop {
        let s = status_of(news, id).await;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "campaign status never got there: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn check_invariant(s: &CampaignStatus) {
    let t = s.total.clone().expect("total");
    assert_eq!(
        t.accepted,
        t.delivered + t.pending + t.expired + t.cancelled,
        "accepted = delivered + pending + expired + cancelled: {s:?}"
    );
    for p in &s.platforms {
        assert_eq!(
            p.accepted,
            p.delivered + p.pending + p.expired + p.cancelled,
            "{p:?}"
        );
    }
}

/// What a platform gateway received: recipients by campaign, BulkDelivers with an envelope.
#[derive(Default, Debug)]
struct Received {
    recipients: HashMap<String, u32>,
    frames: usize,
    with_envelope: usize,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    chat: Vec<Instant>,
}

/// Reads a platform's frames and acks them until `want` recipients arrived or `limit` passes.
async fn receive(peer: &mut RawPeer, want: usize, limit: Duration, got: &mut Received) {
    let deadline = Instant::now() + limit;
    while got.recipients.values().map(|&n| n as usize).sum::<usize>() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(f)) = tokio::time::timeout(left, peer.recv()).await else {
            break;
        };
        match f.kind {
            Some(Kind::BulkDeliver(b)) => on_bulk(peer, b, got).await,
            Some(Kind::Deliver(d)) => {
                got.chat.push(Instant::now());
                peer.send(&frame(Kind::Ack(Ack { tags: vec![d.tag] })))
                    .await;
            }
            _ => {}
        }
    }
}

async fn on_bulk(peer: &mut RawPeer, b: BulkDeliver, got: &mut Received) {
    let now = Instant::now();
    got.first_at.get_or_insert(now);
    got.last_at = Some(now);
    got.frames += 1;
    if !b.envelope.is_empty() {
        got.with_envelope += 1;
        assert_eq!(b.signature.len(), 64);
        assert_eq!(b.signer.len(), 32);
    }
    for r in b.recipients {
        *got.recipients.entry(r).or_default() += 1;
    }
    peer.send(&frame(Kind::Ack(Ack { tags: vec![b.tag] })))
        .await;
}

#[tokio::test]
async fn a_campaign_reaches_every_platform_including_one_that_comes_back() {
    let relay = InProcess::start("").await;
    let (dir, addr) = (relay.dir.path(), relay.relay.ws_addr.unwrap());
    let mut news = connect(addr, dir, "news").await;
    let mut alpha = connect(addr, dir, "alpha").await;
    let mut beta = connect(addr, dir, "beta").await;

    let a = ack_of(&mut news, begin(dir, 1, "storm warning")).await;
    assert_eq!((a.seq, a.duplicate), (0, false));
    // A repeated Begin is a duplicate; another envelope under the same id is refused.
    assert!(
        ack_of(&mut news, begin(dir, 1, "storm warning"))
            .await
            .duplicate
    );
    let r = refusal_of(&mut news, begin(dir, 1, "something else")).await;
    assert_eq!(r.code, ErrorCode::InvalidMessage as i32);

    // Two chunks while gamma is offline, with bad recipients mixed in.
    let mut first = recipients(0, 300);
    first.push("not an address".into());
    first.push("someone@nowhere".into());
    first.push("alerts@news".into()); // a broadcaster is not a platform
    let c1 = ack_of(&mut news, chunk(1, 1, first)).await;
    assert_eq!((c1.seq, c1.accepted, c1.rejected), (1, 300, 3));
    let c2 = ack_of(&mut news, chunk(1, 2, recipients(300, 300))).await;
    assert_eq!((c2.accepted, c2.rejected), (300, 0));
    // A resent chunk changes nothing and gets its first counts.
    let again = ack_of(&mut news, chunk(1, 2, recipients(300, 300))).await;
    assert!(again.duplicate);
    assert_eq!(again.accepted, 300);

    let mut got_alpha = Received::default();
    let mut got_beta = Received::default();
    receive(&mut alpha, 200, Duration::from_secs(20), &mut got_alpha).await;
    receive(&mut beta, 200, Duration::from_secs(20), &mut got_beta).await;
    let mid = status_of(&mut news, 1).await;
    check_invariant(&mid);
    assert_eq!(mid.state, CampaignState::Open as i32);
    let gamma_mid = mid
        .platforms
        .iter()
        .find(|p| p.platform == "gamma")
        .unwrap();
    assert_eq!((gamma_mid.accepted, gamma_mid.delivered), (200, 0));

    // Gamma comes back in the middle; two more chunks, then the end.
    let mut gamma = connect(addr, dir, "gamma").await;
    ack_of(&mut news, chunk(1, 3, recipients(600, 300))).await;
    // End with a chunk missing is refused; the broadcaster sends it and ends again.
    let r = refusal_of(&mut news, end(1, 4)).await;
    assert_eq!((r.code, r.seq), (ErrorCode::InvalidMessage as i32, 5));
    ack_of(&mut news, chunk(1, 4, recipients(900, 300))).await;
    let e = ack_of(&mut news, end(1, 4)).await;
    assert_eq!((e.seq, e.accepted, e.rejected), (5, 1200, 3));
    assert!(ack_of(&mut news, end(1, 4)).await.duplicate);
    // After the end, a new chunk is refused.
    let r = refusal_of(&mut news, chunk(1, 5, recipients(0, 1))).await;
    assert_eq!(r.code, ErrorCode::InvalidMessage as i32);

    let mut got_gamma = Received::default();
    receive(&mut alpha, 400, Duration::from_secs(20), &mut got_alpha).await;
    receive(&mut beta, 400, Duration::from_secs(20), &mut got_beta).await;
    receive(&mut gamma, 400, Duration::from_secs(20), &mut got_gamma).await;
    for (name, got) in [
        ("alpha", &got_alpha),
        ("beta", &got_beta),
        ("gamma", &got_gamma),
    ] {
        assert_eq!(
            got.recipients.len(),
            400,
            "{name} got every one of its recipients"
        );
        assert!(
            got.recipients.values().all(|&n| n == 1),
            "{name}: none twice"
        );
        assert!(
            got.recipients
                .keys()
                .all(|r| r.ends_with(&format!("@{name}"))),
            "{name} got only its own users"
        );
        // The envelope travels once per session, then by reference.
        assert_eq!(got.with_envelope, 1, "{name}: {got:?}");
    }

    let done = wait_status(&mut news, 1, Duration::from_secs(10), |s| {
        s.state == CampaignState::Done as i32
    })
    .await;
    check_invariant(&done);
    let t = done.total.unwrap();
    assert_eq!(
        (t.accepted, t.delivered, t.pending, t.rejected),
        (1200, 1200, 0, 3)
    );

    // The admin API shows it too.
    let id_hex = hex::encode([1u8; 16]);
    let (code, body) = http_get(relay.admin(), &format!("/v1/campaigns/{id_hex}")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("CAMPAIGN_STATE_DONE"), "{body}");
    let (code, body) = http_get(relay.admin(), "/v1/campaigns").await;
    assert_eq!(code, 200);
    assert!(body.contains(&id_hex), "{body}");
    let (_, metrics) = http_get(relay.admin(), "/metrics").await;
    assert!(
        metrics.contains("relay_campaign_recipients_total{outcome=\"delivered\"} 1200"),
        "{metrics}"
    );
}

#[tokio::test]
async fn cancel_stops_what_is_not_delivered() {
    // alpha takes 100 recipients a second: most of the campaign is still queued at cancel.
    let relay = InProcess::start("[campaigns]\nmax_bulk_rate = 100\n").await;
    let (dir, addr) = (relay.dir.path(), relay.relay.ws_addr.unwrap());
    let mut news = connect(addr, dir, "news").await;
    let mut alpha = connect(addr, dir, "alpha").await;
    ack_of(&mut news, begin(dir, 2, "sale")).await;
    let only_alpha: Vec<String> = (0..1000).map(|i| format!("u{i}@alpha")).collect();
    for (i, part) in only_alpha.chunks(100).enumerate() {
        ack_of(&mut news, chunk(2, i as u32 + 1, part.to_vec())).await;
    }
    ack_of(&mut news, end(2, 10)).await;
    let mut got = Received::default();
    receive(&mut alpha, 150, Duration::from_secs(10), &mut got).await;

    news.send(&frame(Kind::CampaignCancel(CampaignCancel {
        campaign_id: Bytes::from(vec![2; 16]),
    })))
    .await;
    // The answer is a status in state cancelled (pushed progress reports may come first).
    let s = loop {
        match answer(&mut news, true).await {
            Answer::Status(s) if s.state == CampaignState::Cancelled as i32 => break s,
            Answer::Status(_) => continue,
            _ => panic!("cancel is answered with a status"),
        }
    };
    check_invariant(&s);
    // Whatever alpha still gets was already sent; nothing more is sent after that.
    receive(&mut alpha, 1000, Duration::from_secs(3), &mut got).await;
    let delivered_by_alpha = got.recipients.len() as u64;
    assert!(
        delivered_by_alpha < 600,
        "cancel stopped delivery: {delivered_by_alpha}"
    );
    let s = wait_status(&mut news, 2, Duration::from_secs(5), |s| {
        s.total.as_ref().is_some_and(|t| t.pending == 0)
    })
    .await;
    check_invariant(&s);
    let t = s.total.unwrap();
    assert_eq!(t.delivered, delivered_by_alpha);
    assert_eq!(t.cancelled, 1000 - delivered_by_alpha);
    // Chunks after a cancel are refused; cancelling again reports the same state.
    let r = refusal_of(&mut news, chunk(2, 11, vec!["x@alpha".into()])).await;
    assert_eq!(r.code, ErrorCode::InvalidMessage as i32);
}

#[tokio::test]
async fn quotas_and_roles_are_enforced() {
    let relay =
        InProcess::start("[campaigns]\nmax_campaigns_in_flight = 1\nmax_campaign_recipients = 5\n")
            .await;
    let (dir, addr) = (relay.dir.path(), relay.relay.ws_addr.unwrap());
    let mut news = connect(addr, dir, "news").await;
    ack_of(&mut news, begin(dir, 3, "one")).await;
    // A second campaign in flight is over the quota.
    let r = refusal_of(&mut news, begin(dir, 4, "two")).await;
    assert_eq!((r.code, r.seq), (ErrorCode::CampaignQuota as i32, 0));
    assert_eq!(r.campaign_id.as_ref(), &[4u8; 16]);
    // Six recipients in a campaign of at most five.
    let r = refusal_of(&mut news, chunk(3, 1, recipients(0, 6))).await;
    assert_eq!((r.code, r.seq), (ErrorCode::CampaignQuota as i32, 1));
    assert_eq!(
        ack_of(&mut news, chunk(3, 1, recipients(0, 5)))
            .await
            .accepted,
        5
    );
    // Chunk seq 0 and unknown campaigns.
    let r = refusal_of(&mut news, chunk(3, 0, recipients(0, 1))).await;
    assert_eq!(r.code, ErrorCode::InvalidMessage as i32);
    let r = refusal_of(&mut news, chunk(9, 1, recipients(0, 1))).await;
    assert_eq!(r.code, ErrorCode::UnknownCampaign as i32);

    // A platform may not run campaigns, nor see another's.
    let mut alpha = connect(addr, dir, "alpha").await;
    let r = refusal_of(&mut alpha, status_request(3)).await;
    assert_eq!(r.code, ErrorCode::NotPermitted as i32);
    // A broadcaster may not send person-to-person messages.
    let news_key = key(dir, "news").secret;
    news.send(&common::deliver(
        &envelope([7; 16], "alerts@news", "u1@alpha", "hi"),
        &news_key,
    ))
    .await;
    loop {
        match news.recv().await.unwrap().kind {
            Some(Kind::Rejected(r)) => {
                assert_eq!(r.code, ErrorCode::NotPermitted as i32);
                break;
            }
            Some(Kind::CampaignStatus(_)) => continue,
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn the_bulk_rate_of_a_platform_is_obeyed_and_chat_keeps_flowing() {
    // alpha accepts 500 campaign recipients a second.
    let relay = InProcess::start("[campaigns]\nmax_bulk_rate = 500\n").await;
    let (dir, addr) = (relay.dir.path(), relay.relay.ws_addr.unwrap());
    let mut news = connect(addr, dir, "news").await;
    let mut alpha = connect(addr, dir, "alpha").await;
    let mut beta = connect(addr, dir, "beta").await;
    ack_of(&mut news, begin(dir, 5, "news flash")).await;
    let only_alpha: Vec<String> = (0..2500).map(|i| format!("u{i}@alpha")).collect();
    for (i, part) in only_alpha.chunks(250).enumerate() {
        ack_of(&mut news, chunk(5, i as u32 + 1, part.to_vec())).await;
    }
    ack_of(&mut news, end(5, 10)).await;

    // Beta writes to alpha while the campaign drains.
    let beta_key = key(dir, "beta").secret;
    let mut sent = Vec::new();
    let mut got = Received::default();
    let started = Instant::now();
    for i in 0..10u8 {
        beta.send(&common::deliver(
            &envelope([100 + i; 16], "bo@beta", "ali@alpha", "still here?"),
            &beta_key,
        ))
        .await;
        sent.push(Instant::now());
        receive(
            &mut alpha,
            250 * (i as usize + 1) / 2,
            Duration::from_millis(300),
            &mut got,
        )
        .await;
    }
    receive(&mut alpha, 2500, Duration::from_secs(20), &mut got).await;
    assert_eq!(got.recipients.len(), 2500);
    // 2,500 recipients at 500/s: after the bucket's tenth of a second (50) the rest go at the
    // rate, the last frame (250) as soon as the bucket is out of debt: (2500 - 50 - 250) / 500
    // = 4.4 s between first and last, less the time this test took to read the first frame.
    let spread = got.last_at.unwrap() - got.first_at.unwrap();
    assert!(
        spread >= Duration::from_millis(3000),
        "bulk rate not obeyed: {spread:?}"
    );
    // Every chat message arrived while the campaign was still being delivered.
    assert_eq!(got.chat.len(), 10, "chat delivered during the campaign");
    assert!(
        got.chat.iter().all(|&t| t < got.last_at.unwrap()),
        "chat was not held behind the campaign"
    );
    for (s, r) in sent.iter().zip(&got.chat) {
        assert!(
            *r - *s < Duration::from_secs(1),
            "chat waited {:?}",
            *r - *s
        );
    }
    let _ = started;
}

#[tokio::test]
async fn a_campaign_survives_kill_9_without_resending_what_was_acked() {
    let dir = common::setup("");
    let mut relay = ChildRelay::start(dir.path());
    let addr: SocketAddr = relay.ws_url().trim_start_matches("ws://").parse().unwrap();
    let mut news = connect(addr, dir.path(), "news").await;
    let mut alpha = connect(addr, dir.path(), "alpha").await;
    ack_of(&mut news, begin(dir.path(), 6, "before the crash")).await;
    ack_of(&mut news, chunk(6, 1, recipients(0, 300))).await;
    ack_of(&mut news, chunk(6, 2, recipients(300, 300))).await;
    let mut got_alpha = Received::default();
    receive(&mut alpha, 200, Duration::from_secs(20), &mut got_alpha).await;
    assert_eq!(got_alpha.recipients.len(), 200);
    // Let the acks' removal reach the disk, then crash.
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.kill9();
    drop((news, alpha));

    let mut relay = ChildRelay::start(dir.path());
    let addr: SocketAddr = relay.ws_url().trim_start_matches("ws://").parse().unwrap();
    let mut news = connect(addr, dir.path(), "news").await;
    // The broadcaster resumes: Begin and chunk 2 again are duplicates, then the rest.
    assert!(
        ack_of(&mut news, begin(dir.path(), 6, "before the crash"))
            .await
            .duplicate
    );
    assert!(
        ack_of(&mut news, chunk(6, 2, recipients(300, 300)))
            .await
            .duplicate
    );
    ack_of(&mut news, chunk(6, 3, recipients(600, 300))).await;
    ack_of(&mut news, end(6, 3)).await;
    let mut alpha = connect(addr, dir.path(), "alpha").await;
    let mut beta = connect(addr, dir.path(), "beta").await;
    let mut gamma = connect(addr, dir.path(), "gamma").await;
    let mut after = Received::default();
    receive(&mut alpha, 100, Duration::from_secs(20), &mut after).await;
    // Nothing alpha acked before the crash comes again.
    assert_eq!(after.recipients.len(), 100);
    assert!(
        after
            .recipients
            .keys()
            .all(|r| !got_alpha.recipients.contains_key(r))
    );
    let mut got_beta = Received::default();
    let mut got_gamma = Received::default();
    receive(&mut beta, 300, Duration::from_secs(20), &mut got_beta).await;
    receive(&mut gamma, 300, Duration::from_secs(20), &mut got_gamma).await;
    assert_eq!(
        (got_beta.recipients.len(), got_gamma.recipients.len()),
        (300, 300)
    );
    let s = wait_status(&mut news, 6, Duration::from_secs(10), |s| {
        s.state == CampaignState::Done as i32
    })
    .await;
    check_invariant(&s);
    let by_platform: BTreeMap<_, _> = s
        .platforms
        .iter()
        .map(|p| (p.platform.as_str(), p.delivered))
        .collect();
    assert_eq!(
        by_platform,
        BTreeMap::from([("alpha", 300), ("beta", 300), ("gamma", 300)])
    );
    relay.kill9();
}

#[tokio::test]
async fn an_expired_campaign_counts_its_recipients_expired() {
    let relay = InProcess::start("[lanes.bulk]\ndefault_ttl_s = 1\nmax_ttl_s = 1\n").await;
    let (dir, addr) = (relay.dir.path(), relay.relay.ws_addr.unwrap());
    let mut news = connect(addr, dir, "news").await;
    ack_of(&mut news, begin(dir, 8, "short-lived")).await;
    let only_beta: Vec<String> = (0..50).map(|i| format!("u{i}@beta")).collect();
    ack_of(&mut news, chunk(8, 1, only_beta)).await;
    // Beta never connects: at expiry every recipient is counted expired and the campaign is
    // finished; later chunks are refused as expired.
    let s = wait_status(&mut news, 8, Duration::from_secs(10), |s| {
        s.state == CampaignState::Done as i32
    })
    .await;
    check_invariant(&s);
    let t = s.total.unwrap();
    assert_eq!((t.accepted, t.expired, t.pending), (50, 50, 0));
    let r = refusal_of(&mut news, chunk(8, 2, vec!["u1@beta".into()])).await;
    assert_eq!(r.code, ErrorCode::Expired as i32);
    // No Expired frame is sent for campaign recipients (SPEC.md 9.9).
    news.send(&status_request(8)).await;
    loop {
        match news.recv().await.unwrap().kind {
            Some(Kind::Expired(e)) => panic!("campaign expiry sent an Expired frame: {e:?}"),
            Some(Kind::CampaignStatus(s)) if s.campaign_id.as_ref() == [8u8; 16] => break,
            _ => continue,
        }
    }
}
