//! `relayctl` as a user runs it: the built binary against the SDK's scripted mock relay on
//! 127.0.0.1 (plain ws://), with key files in a temp dir.

#[path = "../../sdk/tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use common::{MockRelay, WAIT, alpha_keyfile, beta_key};
use federation_spec::proto::{
    Accepted, Deliver, Envelope, ErrorCode, Lane, ReceiptKind, Rejected, frame::Kind,
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
