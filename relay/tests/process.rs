//! The relay binary as a child process: kill -9 under load, restart with queued messages,
//! SIGHUP key revocation, SIGTERM drain.

mod common;

use common::{ChildRelay, RawPeer, deliver, envelope, key, setup};
use federation_spec::proto::{Ack, ErrorCode, Frame, frame::Kind};
use std::collections::HashSet;
use std::time::Duration;

async fn peer(relay: &ChildRelay, name: &str) -> RawPeer {
    RawPeer::connect(relay.ws, name, key(&relay.dir, name).secret)
        .await
        .expect("handshake succeeds")
}

/// Receives deliveries until `want` distinct ids arrived (acking each), returning them in order.
async fn receive_all(peer: &mut RawPeer, want: usize) -> Vec<[u8; 16]> {
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    while seen.len() < want {
        let frame = peer.recv().await.expect("a delivery");
        let Some(Kind::Deliver(d)) = frame.kind else {
            continue;
        };
        let env: federation_spec::proto::Envelope =
            prost::Message::decode(d.envelope.clone()).expect("envelope");
        let id: [u8; 16] = env.id.as_ref().try_into().expect("16-byte id");
        if seen.insert(id) {
            order.push(id);
        }
        peer.send(&Frame {
            kind: Some(Kind::Ack(Ack { tags: vec![d.tag] })),
        })
        .await;
    }
    order
}

fn id(n: u32) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    id
}

#[tokio::test]
async fn kill_9_under_load_loses_nothing_accepted() {
    let dir = setup("");
    let mut relay = ChildRelay::start(dir.path());
    let alpha_key = key(dir.path(), "alpha").secret;
    let mut alpha = peer(&relay, "alpha").await;
    const N: u32 = 3000;
    for n in 0..N {
        alpha
            .send(&deliver(
                &envelope(id(n), "ali@alpha", "bo@beta", "x"),
                &alpha_key,
            ))
            .await;
    }
    // Kill the relay while answers are still coming.
    let mut accepted = HashSet::new();
    while accepted.len() < 500 {
        if let Some(Kind::Accepted(a)) = alpha.recv().await.expect("answers").kind {
            accepted.insert(<[u8; 16]>::try_from(a.id.as_ref()).unwrap());
        }
    }
    relay.kill9();
    while let Some(f) = alpha.recv().await {
        if let Some(Kind::Accepted(a)) = f.kind {
            accepted.insert(<[u8; 16]>::try_from(a.id.as_ref()).unwrap());
        }
    }
    let relay = ChildRelay::start(dir.path());
    let mut beta = peer(&relay, "beta").await;
    // Everything accepted is there (maybe a few more that were durable but unanswered).
    let queued: u64 = {
        let (_, q) = common::http_get(relay.admin, "/v1/queues").await;
        let q: serde_json::Value = serde_json::from_str(&q).unwrap();
        q.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["dest"] == "beta")
            .map(|e| e["messages"].as_u64().unwrap())
            .sum()
    };
    assert!(
        queued as usize >= accepted.len(),
        "{queued} queued < {} accepted",
        accepted.len()
    );
    let got: HashSet<[u8; 16]> = receive_all(&mut beta, queued as usize)
        .await
        .into_iter()
        .collect();
    let lost: Vec<_> = accepted.difference(&got).collect();
    assert!(lost.is_empty(), "{} accepted messages lost", lost.len());
}

#[tokio::test]
async fn restart_delivers_queued_messages_in_order() {
    let dir = setup("");
    let mut relay = ChildRelay::start(dir.path());
    let alpha_key = key(dir.path(), "alpha").secret;
    let mut alpha = peer(&relay, "alpha").await;
    for n in 0..200 {
        alpha
            .send(&deliver(
                &envelope(id(n), "ali@alpha", "bo@beta", "queued"),
                &alpha_key,
            ))
            .await;
    }
    let mut answered = 0;
    while answered < 200 {
        if let Some(Kind::Accepted(_)) = alpha.recv().await.expect("answers").kind {
            answered += 1;
        }
    }
    relay.signal("TERM");
    assert_eq!(
        relay.wait(Duration::from_secs(15)),
        Some(0),
        "drains and exits 0"
    );
    let relay = ChildRelay::start(dir.path());
    let mut beta = peer(&relay, "beta").await;
    let order = receive_all(&mut beta, 200).await;
    assert_eq!(
        order,
        (0..200).map(id).collect::<Vec<_>>(),
        "per-lane FIFO across a restart"
    );
}

#[tokio::test]
async fn sighup_revokes_a_removed_key() {
    let dir = setup("");
    let relay = ChildRelay::start(dir.path());
    let old = key(dir.path(), "beta").secret;
    let mut beta = peer(&relay, "beta").await;
    // Rotate: replace beta's key in the registry, then reload.
    let new = ed25519_dalek::SigningKey::from_bytes(&[77; 32]);
    let path = relay::demo::config_path(dir.path());
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace(
        &hex::encode(old.verifying_key().as_bytes()),
        &hex::encode(new.verifying_key().as_bytes()),
    );
    std::fs::write(&path, text).unwrap();
    relay.signal("HUP");
    assert_eq!(
        beta.goaway().await.map(|g| g.code),
        Some(ErrorCode::KeyRevoked as i32)
    );
    let refused = RawPeer::connect(relay.ws, "beta", old)
        .await
        .err()
        .expect("old key refused");
    assert_eq!(refused.code, ErrorCode::AuthFailed as i32);
    RawPeer::connect(relay.ws, "beta", new)
        .await
        .expect("new key accepted");
}

#[tokio::test]
async fn sigterm_sends_goaway_and_exits_zero() {
    let dir = setup("");
    let mut relay = ChildRelay::start(dir.path());
    let mut alpha = peer(&relay, "alpha").await;
    relay.signal("TERM");
    assert_eq!(
        alpha.goaway().await.map(|g| g.code),
        Some(ErrorCode::ShuttingDown as i32)
    );
    assert_eq!(relay.wait(Duration::from_secs(15)), Some(0));
}

#[test]
fn bad_config_names_the_field_and_exits_non_zero() {
    let dir = setup("[limits]\nmax_payload_bytes = 0\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["serve", "--config"])
        .arg(relay::demo::config_path(dir.path()))
        .output()
        .expect("relay runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("limits.max_payload_bytes"), "{stderr}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("config-example")
        .output()
        .expect("relay runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("[[peers]]"));
}
