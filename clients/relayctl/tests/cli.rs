//! `relayctl` as a user runs it: the built binary against the SDK's scripted mock relay on
//! 127.0.0.1 (plain ws://), with key files in a temp dir.

#[path = "../../sdk/tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use common::{MockRelay, WAIT, alpha_keyfile, beta_key};
use federation_spec::proto::{
    Accepted, BulkDeliver, CampaignAck, CampaignCounts, CampaignState, CampaignStatus, Deliver,
    Envelope, ErrorCode, Lane, ReceiptKind, Rejected, frame::Kind,
};
use federation_spec::signing::sign_envelope;
use prost::Message as _;
use std::path::PathBuf;
use std::process::Stdio;
use tokio::process::Command;

struct Setup {
    _dir: tempfile::TempDir,
    key: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("alpha.key");
    std::fs::write(&key, alpha_keyfile().to_text()).unwrap();
    Setup { _dir: dir, key }
}

fn relayctl() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayctl"));
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn finish(child: tokio::process::Child) -> Output {
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("relayctl did not exit")
        .unwrap();
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn send_args(relay: &MockRelay, s: &Setup, to: &str) -> Vec<String> {
    [
        "send",
        "--relay",
        &relay.url,
        "--key",
        s.key.to_str().unwrap(),
        "--from",
        "alice",
        "--to",
        to,
        "--lane",
        "call",
        "--ttl",
        "30",
        "ring ring",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

#[tokio::test]
async fn send_prints_the_id_once_accepted() {
    let s = setup();
    let mut relay = MockRelay::ws().await;
    let child = relayctl()
        .args(send_args(&relay, &s, "bob@beta"))
        .spawn()
        .unwrap();
    let mut session = relay.accept().await;
    let Kind::Deliver(d) = session.recv_kind().await else {
        panic!("expected a deliver")
    };
    let env = Envelope::decode(d.envelope).unwrap();
    assert_eq!(
        (env.from.as_str(), env.to.as_str()),
        ("alice@alpha", "bob@beta")
    );
    assert_eq!((env.lane, env.ttl_s), (Lane::Call as i32, 30));
    assert_eq!(&env.payload[..], b"ring ring");
    session
        .send(Kind::Accepted(Accepted {
            id: env.id.clone(),
            expires_at_ms: 1,
            ..Default::default()
        }))
        .await;
    let out = finish(child).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), hex::encode(&env.id));
}

#[tokio::test]
async fn send_exits_non_zero_with_the_reason_when_rejected() {
    let s = setup();
    let mut relay = MockRelay::ws().await;
    let child = relayctl()
        .args(send_args(&relay, &s, "bob@nowhere"))
        .spawn()
        .unwrap();
    let mut session = relay.accept().await;
    let Kind::Deliver(d) = session.recv_kind().await else {
        panic!("expected a deliver")
    };
    let env = Envelope::decode(d.envelope).unwrap();
    session
        .send(Kind::Rejected(Rejected {
            id: env.id,
            code: ErrorCode::UnknownDestination as i32,
            detail: "no such platform".into(),
            ..Default::default()
        }))
        .await;
    let out = finish(child).await;
    assert_eq!(out.code, Some(2));
    assert!(out.stdout.is_empty());
    assert!(
        out.stderr.contains("UNKNOWN_DESTINATION") && out.stderr.contains("no such platform"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn listen_prints_json_lines_acks_and_sends_receipts() {
    let s = setup();
    let mut relay = MockRelay::ws().await;
    let child = relayctl()
        .args([
            "listen",
            "--relay",
            &relay.url,
            "--key",
            s.key.to_str().unwrap(),
            "--count",
            "1",
            "--receipt",
            "read",
        ])
        .spawn()
        .unwrap();
    let mut session = relay.accept().await;
    let env = Envelope {
        id: Bytes::from(vec![0x5a; 16]),
        from: "bob@beta".into(),
        to: "alice@alpha".into(),
        lane: Lane::Chat as i32,
        payload: Bytes::from_static(b"hi \xff alice"),
        ..Default::default()
    };
    let bytes = Bytes::from(env.encode_to_vec());
    session
        .send(Kind::Deliver(Deliver {
            signature: Bytes::copy_from_slice(&sign_envelope(&beta_key(), &bytes).to_bytes()),
            signer: Bytes::copy_from_slice(beta_key().verifying_key().as_bytes()),
            envelope: bytes,
            tag: 3,
        }))
        .await;
    let mut got_ack = false;
    let mut got_receipt = false;
    while !(got_ack && got_receipt) {
        match session.recv_kind().await {
            Kind::Ack(a) => {
                assert_eq!(a.tags, vec![3]);
                got_ack = true;
            }
            Kind::Receipt(r) => {
                assert_eq!(
                    (r.from.as_str(), r.to.as_str()),
                    ("alice@alpha", "bob@beta")
                );
                assert_eq!(r.kind, ReceiptKind::Read as i32);
                session
                    .send(Kind::Accepted(Accepted {
                        id: r.id,
                        receipt: true,
                        ..Default::default()
                    }))
                    .await;
                got_receipt = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let out = finish(child).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let line: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(line["type"], "message");
    assert_eq!(line["id"], "5a".repeat(16));
    assert_eq!(line["from"], "bob@beta");
    assert_eq!(line["lane"], "chat");
    assert_eq!(line["text"], "hi \u{fffd} alice");
    assert_eq!(line["tag"], 3);
    assert_eq!(line["verified"], true);
}

#[tokio::test]
async fn keygen_and_unreachable_relay() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("delta.key");
    let out = finish(
        relayctl()
            .args(["keygen", "--out", key.to_str().unwrap()])
            .spawn()
            .unwrap(),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.trim().len(), 64);
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.contains("peer = delta") && text.contains(out.stdout.trim()));

    // Nothing listens there; the first connection is not retried.
    let out = finish(
        relayctl()
            .args([
                "send",
                "--relay",
                "ws://127.0.0.1:9/",
                "--key",
                key.to_str().unwrap(),
                "--from",
                "d",
                "--to",
                "x@beta",
                "x",
            ])
            .spawn()
            .unwrap(),
    )
    .await;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("connecting to ws://127.0.0.1:9/"),
        "{}",
        out.stderr
    );
}

fn relay_args(relay: &MockRelay, s: &Setup) -> Vec<String> {
    vec![
        "--relay".into(),
        relay.url.clone(),
        "--key".into(),
        s.key.to_str().unwrap().into(),
    ]
}

fn status_frame(id: &Bytes, state: CampaignState) -> Kind {
    let counts = |platform: &str| CampaignCounts {
        platform: platform.into(),
        accepted: 4,
        delivered: 4,
        ..Default::default()
    };
    Kind::CampaignStatus(CampaignStatus {
        campaign_id: id.clone(),
        state: state as i32,
        label: "drill".into(),
        total: Some(CampaignCounts {
            rejected: 1,
            ..counts("")
        }),
        platforms: vec![counts("beta")],
    })
}

#[tokio::test]
async fn broadcast_streams_chunks_then_prints_the_summary() {
    let s = setup();
    let list = s._dir.path().join("list.csv");
    std::fs::write(
        &list,
        "name,address\nAnn,ann@beta\n\"Bob, Jr\",bob@beta\nCy,cy@beta\nDi,di@beta\nEd,nobody\n",
    )
    .unwrap();
    let mut relay = MockRelay::ws().await;
    let mut args = vec!["broadcast".to_string()];
    args.extend(relay_args(&relay, &s));
    args.extend(
        [
            "--recipients",
            list.to_str().unwrap(),
            "--text",
            "fire drill",
            "--label",
            "drill",
            "--chunk",
            "2",
        ]
        .map(String::from),
    );
    let child = relayctl().args(args).spawn().unwrap();
    let mut session = relay.accept().await;
    let Kind::CampaignBegin(b) = session.recv_kind().await else {
        panic!("expected a campaign begin")
    };
    let env = Envelope::decode(b.envelope.clone()).unwrap();
    assert_eq!(env.from, "broadcast@alpha", "the default sender");
    assert_eq!(
        (env.lane, &env.payload[..]),
        (Lane::Bulk as i32, &b"fire drill"[..])
    );
    assert_eq!(b.label, "drill");
    let id = b.campaign_id.clone();
    let ack = |seq, accepted, rejected| {
        Kind::CampaignAck(CampaignAck {
            campaign_id: id.clone(),
            seq,
            accepted,
            rejected,
            duplicate: false,
        })
    };
    session.send(ack(0, 0, 0)).await;
    let mut seen = Vec::new();
    for seq in 1..=3 {
        let Kind::CampaignChunk(c) = session.recv_kind().await else {
            panic!("expected chunk {seq}")
        };
        assert_eq!(c.seq, seq);
        let rejected = c.recipients.iter().filter(|r| !r.contains('@')).count() as u32;
        session
            .send(ack(seq, c.recipients.len() as u32 - rejected, rejected))
            .await;
        seen.extend(c.recipients);
    }
    assert_eq!(
        seen,
        ["ann@beta", "bob@beta", "cy@beta", "di@beta", "nobody"]
    );
    let Kind::CampaignEnd(e) = session.recv_kind().await else {
        panic!("expected the end")
    };
    assert_eq!(e.chunks, 3);
    session.send(ack(4, 4, 1)).await;
    let Kind::CampaignStatusRequest(_) = session.recv_kind().await else {
        panic!("expected the final status request")
    };
    session
        .send(status_frame(&id, CampaignState::Sending))
        .await;
    let out = finish(child).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], format!("campaign {}", hex::encode(&id)));
    assert!(
        lines[1].ends_with("state sending label \"drill\""),
        "{}",
        out.stdout
    );
    assert!(
        lines[2].starts_with("platform  accepted  delivered"),
        "{}",
        out.stdout
    );
    assert!(lines[3].starts_with("beta "), "{}", out.stdout);
    assert!(lines[4].starts_with("total "), "{}", out.stdout);
    assert!(out.stderr.contains("sent 5/5 recipients"), "{}", out.stderr);
    assert!(
        out.stderr.contains("4 recipients accepted, 1 rejected"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn broadcast_refused_by_the_relay_exits_2() {
    let s = setup();
    let list = s._dir.path().join("list.txt");
    std::fs::write(&list, "# one\nann@beta\n").unwrap();
    let mut relay = MockRelay::ws().await;
    let mut args = vec!["broadcast".to_string()];
    args.extend(relay_args(&relay, &s));
    args.extend(["--recipients", list.to_str().unwrap(), "--text", "x"].map(String::from));
    let child = relayctl().args(args).spawn().unwrap();
    let mut session = relay.accept().await;
    let Kind::CampaignBegin(b) = session.recv_kind().await else {
        panic!("expected a campaign begin")
    };
    session
        .send(Kind::Rejected(Rejected {
            code: ErrorCode::NotPermitted as i32,
            detail: "platforms do not broadcast".into(),
            campaign_id: b.campaign_id,
            ..Default::default()
        }))
        .await;
    let out = finish(child).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    assert!(out.stderr.contains("NOT_PERMITTED"), "{}", out.stderr);
}

#[tokio::test]
async fn campaign_status_prints_json() {
    let s = setup();
    let mut relay = MockRelay::ws().await;
    let id = Bytes::from(vec![0x3c; 16]);
    let mut args = vec!["campaign".to_string(), "status".into(), hex::encode(&id)];
    args.extend(relay_args(&relay, &s));
    args.push("--json".into());
    let child = relayctl().args(args).spawn().unwrap();
    let mut session = relay.accept().await;
    let Kind::CampaignStatusRequest(r) = session.recv_kind().await else {
        panic!("expected a status request")
    };
    assert_eq!(r.campaign_id, id);
    session.send(status_frame(&id, CampaignState::Done)).await;
    let out = finish(child).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["campaign"], hex::encode(&id));
    assert_eq!(v["state"], "done");
    assert_eq!(v["total"]["rejected"], 1);
    assert_eq!(v["platforms"][0]["platform"], "beta");
    assert_eq!(v["platforms"][0]["delivered"], 4);
}

#[tokio::test]
async fn listen_prints_a_line_per_campaign_recipient_and_counts_them() {
    let s = setup();
    let mut relay = MockRelay::ws().await;
    let mut args = vec!["listen".to_string()];
    args.extend(relay_args(&relay, &s));
    args.extend(["--count", "3"].map(String::from));
    let child = relayctl().args(args).spawn().unwrap();
    let mut session = relay.accept().await;
    let env = Envelope {
        id: Bytes::from(vec![0x77; 16]),
        from: "news@beta".into(),
        lane: Lane::Bulk as i32,
        created_at_ms: 5,
        content_type: "text/plain".into(),
        payload: Bytes::from_static(b"sale"),
        ..Default::default()
    };
    let bytes = Bytes::from(env.encode_to_vec());
    let campaign = Bytes::from(vec![0xcc; 16]);
    session
        .send(Kind::BulkDeliver(BulkDeliver {
            tag: 1,
            campaign_id: campaign.clone(),
            signature: Bytes::copy_from_slice(&sign_envelope(&beta_key(), &bytes).to_bytes()),
            signer: Bytes::copy_from_slice(beta_key().verifying_key().as_bytes()),
            envelope: bytes,
            recipients: vec!["ann@alpha".into(), "bob@alpha".into()],
        }))
        .await;
    // Only one of these two fits in --count 3: the frame is not acknowledged.
    session
        .send(Kind::BulkDeliver(BulkDeliver {
            tag: 2,
            campaign_id: campaign.clone(),
            recipients: vec!["cy@alpha".into(), "di@alpha".into()],
            ..Default::default()
        }))
        .await;
    let Kind::Ack(a) = session.recv_kind().await else {
        panic!("expected an ack")
    };
    assert_eq!(a.tags, vec![1]);
    let rest = session.closed().await;
    assert!(
        !rest
            .iter()
            .any(|f| matches!(&f.kind, Some(Kind::Ack(a)) if a.tags.contains(&2))),
        "{rest:?}"
    );
    let out = finish(child).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let to: Vec<&str> = lines.iter().map(|l| l["to"].as_str().unwrap()).collect();
    assert_eq!(to, ["ann@alpha", "bob@alpha", "cy@alpha"]);
    for (line, tag) in lines.iter().zip([1, 1, 2]) {
        assert_eq!(line["type"], "message");
        assert_eq!(line["id"], "77".repeat(16));
        assert_eq!(line["from"], "news@beta");
        assert_eq!(line["lane"], "bulk");
        assert_eq!(line["text"], "sale");
        assert_eq!(line["campaign"], "cc".repeat(16));
        assert_eq!(line["verified"], true);
        assert_eq!(line["tag"], tag);
    }
}
