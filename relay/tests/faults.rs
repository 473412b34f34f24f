//! Resource faults at the process level, with the real binary: the store's disk fills up
//! (a real ENOSPC on a small tmpfs, and the `store.max_disk_mb` quota), and the store file
//! is corrupt or truncated at start.
//!
//! Disk full (SPEC.md 8.5, README "Operations"): the relay turns not-ready, answers
//! Rejected{BUSY, retry_after_ms}, loses nothing it accepted, and recovers by itself when
//! space returns. A damaged store: the relay exits non-zero naming the file and the recovery
//! path, and never starts empty over it.

mod common;

use common::{ChildRelay, RawPeer, deliver, envelope, http_get, key, metric, setup, setup_in};
use federation_spec::proto::{Ack, ErrorCode, Frame, frame::Kind};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Bytes of payload per message: large, so that a few megabytes fill up quickly.
const PAYLOAD: usize = 16 * 1024;

fn id(n: u32) -> [u8; 16] {
    let mut id = [0x5a; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    id
}

/// A small tmpfs mounted on a temp dir for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// None when this process may not mount (not root, or no CAP_SYS_ADMIN).
    fn mount(size_mib: u32) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system of `dir` with a ballast file, then gives `keep` bytes back.
fn fill(dir: &Path, keep: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).expect("ballast");
    let chunk = vec![0u8; 256 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.flush();
    let len = f.metadata().expect("ballast size").len();
    f.set_len(len.saturating_sub(keep)).expect("shrink ballast");
    f.sync_all().ok();
    path
}

/// Sends message `n` (alpha to bob@beta) and returns its answer: Ok(()) when accepted,
/// Err(rejection) otherwise.
async fn offer(
    alpha: &mut RawPeer,
    secret: &ed25519_dalek::SigningKey,
    n: u32,
) -> Result<(), federation_spec::proto::Rejected> {
    let payload = "p".repeat(PAYLOAD);
    alpha
        .send(&deliver(
            &envelope(id(n), "ali@alpha", "bob@beta", &payload),
            secret,
        ))
        .await;
    match alpha.recv().await.expect("session open").kind {
        Some(Kind::Accepted(a)) => {
            assert_eq!(a.id.as_ref(), id(n));
            Ok(())
        }
        Some(Kind::Rejected(r)) => {
            assert_eq!(r.id.as_ref(), id(n));
            Err(r)
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Offers messages from `first` on until one is refused; returns the ids accepted and the
/// refusal.
async fn offer_until_refused(
    alpha: &mut RawPeer,
    secret: &ed25519_dalek::SigningKey,
    first: u32,
    limit: Duration,
) -> (Vec<u32>, u32, federation_spec::proto::Rejected) {
    let deadline = Instant::now() + limit;
    let mut accepted = Vec::new();
    for n in first.. {
        match offer(alpha, secret, n).await {
            Ok(()) => accepted.push(n),
            Err(r) => return (accepted, n, r),
        }
        assert!(Instant::now() < deadline, "never refused");
    }
    unreachable!()
}

/// Offers message `n` again and again, honouring retry_after_ms, until it is accepted.
async fn offer_until_accepted(
    alpha: &mut RawPeer,
    secret: &ed25519_dalek::SigningKey,
    n: u32,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        match offer(alpha, secret, n).await {
            Ok(()) => return started.elapsed(),
            Err(r) => {
                assert_eq!(r.code, ErrorCode::Busy as i32, "{r:?}");
                assert!(
                    started.elapsed() < limit,
                    "still busy after {:?}",
                    started.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(r.retry_after_ms.into())).await;
            }
        }
    }
}

/// beta takes every message queued for it, acking each; returns the ids.
async fn drain_beta(ws: std::net::SocketAddr, dir: &Path, want: usize) -> BTreeSet<u32> {
    let mut beta = RawPeer::connect(ws, "beta", key(dir, "beta").secret)
        .await
        .expect("beta connects");
    let mut got = BTreeSet::new();
    while got.len() < want {
        let frame = tokio::time::timeout(Duration::from_secs(10), beta.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {want} delivered", got.len()))
            .expect("beta open");
        let Some(Kind::Deliver(d)) = frame.kind else {
            continue;
        };
        let env: federation_spec::proto::Envelope =
            prost::Message::decode(d.envelope.clone()).expect("envelope");
        got.insert(u32::from_be_bytes(env.id[..4].try_into().unwrap()));
        beta.send(&Frame {
            kind: Some(Kind::Ack(Ack { tags: vec![d.tag] })),
        })
        .await;
    }
    got
}

async fn wait_ready(admin: std::net::SocketAddr, want: u16, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = http_get(admin, "/readyz").await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz is {status} ({body}), want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real full disk: the data dir is a 16 MiB tmpfs, filled with a ballast file but for
/// about 1 MiB. Messages are accepted until the store's commit hits ENOSPC; then BUSY with
/// retry_after_ms and /readyz 503 "store cannot write"; nothing accepted is lost, not even
/// across a kill -9; freeing the ballast makes the relay ready and accepting again by itself.
#[tokio::test]
async fn a_full_disk_answers_busy_and_recovers_when_space_returns() {
    let Some(fs) = Tmpfs::mount(16) else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); \
             the quota test below covers the busy path"
        );
        return;
    };
    setup_in(fs.path(), "");
    // The log lives off the full file system.
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut relay = ChildRelay::start_logged_at(fs.path(), log.path());
    let secret = key(fs.path(), "alpha").secret;
    let mut alpha = RawPeer::connect(relay.ws, "alpha", secret.clone())
        .await
        .expect("alpha connects");
    assert_eq!(http_get(relay.admin, "/readyz").await.0, 200);
    let ballast = fill(fs.path(), 1 << 20);

    let (mut accepted, refused, busy) =
        offer_until_refused(&mut alpha, &secret, 0, Duration::from_secs(30)).await;
    assert!(!accepted.is_empty(), "nothing fitted in the space left");
    assert_eq!(
        busy.code,
        ErrorCode::Busy as i32,
        "{busy:?}\n{}",
        relay.log()
    );
    assert!(busy.retry_after_ms > 0, "{busy:?}");
    let body = wait_ready(relay.admin, 503, Duration::from_secs(5)).await;
    assert!(body.contains("store cannot write"), "{body}");
    // Still full: still busy, and the process is still serving.
    assert_eq!(
        offer(&mut alpha, &secret, refused)
            .await
            .map_err(|r| r.code),
        Err(ErrorCode::Busy as i32)
    );
    assert!(relay.alive());
    assert!(
        metric(
            relay.admin,
            "relay_messages_rejected_total{lane=\"chat\",reason=\"ERROR_CODE_BUSY\"}"
        )
        .await
            >= 2.0
    );
    assert!(
        relay.log().contains("store commit failed"),
        "{}",
        relay.log()
    );

    // Space returns: the same message goes through after its retry_after_ms, and the relay
    // is ready again, without any operator action.
    std::fs::remove_file(&ballast).expect("remove ballast");
    let took = offer_until_accepted(&mut alpha, &secret, refused, Duration::from_secs(15)).await;
    accepted.push(refused);
    wait_ready(relay.admin, 200, Duration::from_secs(5)).await;
    eprintln!(
        "{} accepted before ENOSPC; accepted again {took:?} after space returned",
        accepted.len() - 1
    );

    // Everything accepted is on disk: kill -9, restart, and beta gets all of it.
    relay.kill9();
    drop(alpha);
    let relay = ChildRelay::start_logged_at(fs.path(), log.path());
    let got = drain_beta(relay.ws, fs.path(), accepted.len()).await;
    let want: BTreeSet<u32> = accepted.into_iter().collect();
    assert_eq!(got, want, "accepted and delivered differ");
}

/// The same full disk when the relay's stderr is a file on that disk too (`relay 2>>log`
/// with the log beside the data): log lines that cannot be written are dropped, and the relay
/// still answers BUSY and turns not-ready. (It used to panic inside tracing-subscriber, whose
/// report of its own write error went to the same full stderr, and lose its router.)
#[tokio::test]
async fn a_full_disk_that_also_holds_the_log_still_answers_busy() {
    let Some(fs) = Tmpfs::mount(16) else {
        return;
    };
    setup_in(fs.path(), "");
    let relay = ChildRelay::start_logged(fs.path());
    let secret = key(fs.path(), "alpha").secret;
    let mut alpha = RawPeer::connect(relay.ws, "alpha", secret.clone())
        .await
        .expect("alpha connects");
    fill(fs.path(), 1 << 20);
    let (_, _, refusal) =
        offer_until_refused(&mut alpha, &secret, 0, Duration::from_secs(30)).await;
    assert_eq!(refusal.code, ErrorCode::Busy as i32, "{refusal:?}");
    wait_ready(relay.admin, 503, Duration::from_secs(5)).await;
}

/// The disk quota `store.max_disk_mb`: once the store's file reaches it (checked by the
/// relay every second), new messages get BUSY with retry_after_ms while the
/// session and everything accepted stay; beta then receives every accepted message.
#[tokio::test]
async fn the_disk_quota_answers_busy_and_loses_nothing() {
    let dir = setup("[store]\nmax_disk_mb = 1\n");
    let relay = ChildRelay::start_logged(dir.path());
    let secret = key(dir.path(), "alpha").secret;
    let mut alpha = RawPeer::connect(relay.ws, "alpha", secret.clone())
        .await
        .expect("alpha connects");
    let (accepted, refused, busy) =
        offer_until_refused(&mut alpha, &secret, 0, Duration::from_secs(25)).await;
    assert_eq!(busy.code, ErrorCode::Busy as i32, "{busy:?}");
    assert!(busy.retry_after_ms > 0);
    let file = dir.path().join("store/queue.redb");
    let size = std::fs::metadata(&file).expect("store file").len();
    assert!(size >= 1 << 20, "busy with a store of only {size} bytes");
    assert_eq!(
        offer(&mut alpha, &secret, refused)
            .await
            .map_err(|r| r.code),
        Err(ErrorCode::Busy as i32)
    );
    let got = drain_beta(relay.ws, dir.path(), accepted.len()).await;
    assert_eq!(got, accepted.iter().copied().collect::<BTreeSet<u32>>());
    eprintln!(
        "{} accepted, then busy at {size} bytes; readyz {:?}",
        accepted.len(),
        http_get(relay.admin, "/readyz").await
    );
}

/// While the store is over `store.max_disk_mb` the relay is not ready, and once the queued
/// messages are delivered (and the file compacted) it accepts again by itself.
#[tokio::test]
async fn the_disk_quota_turns_not_ready_and_recovers_after_a_drain() {
    let dir = setup("[store]\nmax_disk_mb = 1\n");
    let relay = ChildRelay::start_logged(dir.path());
    let secret = key(dir.path(), "alpha").secret;
    let mut alpha = RawPeer::connect(relay.ws, "alpha", secret.clone())
        .await
        .expect("alpha connects");
    let (accepted, refused, _) =
        offer_until_refused(&mut alpha, &secret, 0, Duration::from_secs(25)).await;
    wait_ready(relay.admin, 503, Duration::from_secs(2)).await;
    drain_beta(relay.ws, dir.path(), accepted.len()).await;
    offer_until_accepted(&mut alpha, &secret, refused, Duration::from_secs(30)).await;
    wait_ready(relay.admin, 200, Duration::from_secs(2)).await;
}

/// Runs the binary on `dir` and returns (exit code, stderr); fails if it starts serving.
fn start_expecting_failure(dir: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["serve", "--config"])
        .arg(relay::demo::config_path(dir))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("relay runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the relay kept running on a damaged store");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("listening"),
        "it started serving: {stdout}"
    );
    (
        status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A store file that is damaged at start (its header overwritten, cut in half, or cut to
/// nothing): the real binary exits non-zero, the message names the file, says it is corrupt
/// or truncated and how to recover, and the file is left exactly as it was: the relay never
/// starts empty over it.
#[tokio::test]
async fn a_corrupt_or_truncated_store_stops_the_start() {
    // A store with messages in it, written by a relay that then stopped cleanly.
    let dir = setup("");
    let mut relay = ChildRelay::start_logged(dir.path());
    let secret = key(dir.path(), "alpha").secret;
    let mut alpha = RawPeer::connect(relay.ws, "alpha", secret.clone())
        .await
        .expect("alpha connects");
    for n in 0..20 {
        offer(&mut alpha, &secret, n).await.expect("accepted");
    }
    relay.signal("TERM");
    assert_eq!(relay.wait(Duration::from_secs(15)), Some(0));
    let file = dir.path().join("store/queue.redb");
    let good = std::fs::read(&file).expect("store file");
    assert!(good.len() > 64 * 1024, "{} bytes", good.len());

    let mut header = good.clone();
    header[..512].fill(0xa5);
    let damages = [
        ("header overwritten", header),
        ("cut in half", good[..good.len() / 2].to_vec()),
        ("cut to nothing", Vec::new()),
    ];
    for (what, bad) in damages {
        std::fs::write(&file, &bad).expect("damage the store");
        let (code, stderr) = start_expecting_failure(dir.path());
        assert!(matches!(code, Some(c) if c != 0), "{what}: exit {code:?}");
        for needle in [
            file.display().to_string().as_str(),
            "is corrupt or truncated",
            "must not run on it",
            "move the file",
            "restore it from a backup",
        ] {
            assert!(stderr.contains(needle), "{what}: no {needle:?} in {stderr}");
        }
        assert_eq!(
            std::fs::read(&file).expect("store file"),
            bad,
            "{what}: the relay changed the damaged file"
        );
        eprintln!("{what}: exit {code:?}: {}", stderr.trim());
    }

    // The good file back: the relay starts and every message is still there.
    std::fs::write(&file, &good).expect("restore");
    let relay = ChildRelay::start_logged(dir.path());
    let got = drain_beta(relay.ws, dir.path(), 20).await;
    assert_eq!(got, (0..20).collect::<BTreeSet<u32>>());
}
