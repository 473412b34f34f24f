//! `stress crashloop` against the real relay binary, CI-sized: three SIGKILLs and one SIGTERM
//! under a light mixed load (QUIC and WebSocket gateways, chat, call, receipts), then the
//! checker must find nothing accepted lost and nothing taken in twice.
//!
//! The relay binary comes from `cargo build -p relay`, run here with the cargo that runs the
//! test, for the profile of this test binary. `env!("CARGO_BIN_EXE_relay")` exists only in
//! the relay crate's own tests, and artifact dependencies (a dev-dependency on a binary) are
//! still unstable; building it here is a no-op when it is up to date, and never tests a
//! stale binary. (The relay library is already a dev-dependency, so only its `main.rs` is
//! compiled and linked on top.)

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use stress::Outcome;
use stress::cli::Cli;

/// Builds the relay binary for this test's profile and returns its path.
fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its executable");
    // target/<profile dir>/deps/crashloop-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--quiet", "-p", "relay", "--bin", "relay"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // Cargo sets these for this test process only. Passed on, they change the fingerprints
    // of build scripts that watch them (ring watches CARGO_MANIFEST_DIR), and the inner and
    // the outer cargo would then rebuild half the graph for each other, every run.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            )
        {
            cargo.env_remove(key);
        }
    }
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cargo.arg("--release");
        }
        Some(other) => {
            cargo.args(["--profile", other]);
        }
        None => panic!("no profile dir above {}", exe.display()),
    }
    let status = cargo.status().expect("cargo runs");
    assert!(status.success(), "cargo build -p relay failed: {status}");
    let bin = profile_dir.join("relay");
    assert!(
        bin.is_file(),
        "cargo built the relay, but not at {}",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_a_sigterm_under_load_lose_nothing() {
    let relay = relay_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("crashloop.json");
    let argv = [
        "stress",
        "crashloop",
        "--kills",
        "3",
        "--sigterm",
        "--rate",
        "60",
        "--min-gap",
        "300ms",
        "--max-gap",
        "800ms",
        "--drain",
        "60s",
        "--seed",
        "7",
        "--quiet",
        "--relay-bin",
        relay.to_str().expect("a UTF-8 path"),
        "--json",
        json.to_str().expect("a UTF-8 path"),
    ];
    let cli = Cli::try_parse_from(argv).expect("valid command line");
    let outcome = tokio::time::timeout(Duration::from_secs(150), stress::run(cli))
        .await
        .expect("the crash loop ends in time")
        .expect("the crash loop runs");
    let exit = outcome.exit_code();
    let Outcome::Crashloop(r) = outcome else {
        panic!("expected a crash loop report, got {outcome:?}");
    };
    let v = &r.verdict;
    assert!(r.ok(), "problems {:?}, verdict {v:?}", r.problems);
    assert_eq!(exit, 0);
    assert_eq!(r.kills, 3);
    assert_eq!(r.restart_ready_ms.len(), 4, "three kills and a SIGTERM");
    let drain = r.sigterm_drain_ms.expect("the SIGTERM was timed");
    assert!(drain <= 10_000.0, "drain_ms={drain}");
    assert!(v.accepted > 0, "{v:?}");
    assert_eq!(v.lost, 0, "{v:?}");
    assert_eq!(v.duplicates_after_dedup, 0, "{v:?}");
    assert_eq!(v.delivered + v.expired, v.accepted, "{v:?}");
    assert!(v.anomalies.is_empty(), "{v:?}");
    assert!(v.receipts.received > 0, "receipts flowed: {v:?}");
    assert!(v.campaigns.accepted > 0, "campaigns ran: {v:?}");
    assert_eq!(v.campaigns.lost, 0, "{v:?}");
    assert_eq!(v.campaigns.delivered, v.campaigns.accepted, "{v:?}");
    assert_eq!(v.receipts.lost, 0, "{v:?}");
    assert_eq!(r.accounting.lost, 0);
    assert!(
        r.links.iter().any(|l| l.transport == "quic")
            && r.links.iter().any(|l| l.transport == "ws"),
        "both transports carried load: {:?}",
        r.links
    );
    // A restarted relay resets its predecessor's QUIC connections (stable stateless-reset and
    // connection-id keys): gateways notice a crash at their next packet, not after the 30 s
    // idle timeout.
    for l in &r.links {
        assert!(
            l.notice_ms_max.is_some_and(|ms| ms < 10_000.0),
            "{} gateways noticed a stop late: {l:?}",
            l.transport
        );
    }
    assert_eq!(
        r.last_line(),
        format!(
            "kills=3 accepted={} delivered={} expired={} lost=0 duplicates_after_dedup=0",
            v.accepted + v.campaigns.accepted,
            v.delivered + v.campaigns.delivered,
            v.expired
        )
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("valid json");
    assert_eq!(written["verdict"]["lost"], 0);
    assert_eq!(written["kills"], 3);
}
