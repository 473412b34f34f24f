//! `stress` against a real relay started in this process on 127.0.0.1 (ephemeral ports, a
//! temp data dir written by `stress::setup`), through the same `--relay URL` path an
//! operator uses for a running relay.

use clap::Parser;
use relay::server::Relay;
use std::time::Duration;
use stress::Outcome;
use stress::cli::Cli;
use stress::setup::{self, Settings};

struct InProcess {
    dir: tempfile::TempDir,
    relay: Relay,
}

impl InProcess {
    async fn start(platforms: usize, extra_toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let written = setup::write(
            dir.path(),
            &Settings {
                platforms,
                extra_toml: extra_toml.to_string(),
                ..Settings::default()
            },
        )
        .expect("set-up written");
        let loaded = relay::config::load(&written.config).expect("config loads");
        let relay = Relay::start(loaded).await.expect("relay starts");
        Self { dir, relay }
    }

    /// `stress <scenario> --relay ... <args>`, returning the outcome.
    async fn stress(&self, scenario: &str, args: &[&str]) -> Outcome {
        let url = format!("quic://{}", self.relay.quic_addr.expect("quic"));
        let admin = self.relay.admin_addr.expect("admin").to_string();
        let data_dir = self.dir.path().display().to_string();
        let mut argv = vec![
            "stress",
            scenario,
            "--relay",
            &url,
            "--data-dir",
            &data_dir,
            "--admin",
            &admin,
            "--quiet",
        ];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).expect("valid command line");
        tokio::time::timeout(Duration::from_secs(120), stress::run(cli))
            .await
            .expect("the run ends in time")
            .expect("the run works")
    }
}

fn report(outcome: &Outcome) -> &stress::report::Report {
    match outcome {
        Outcome::Report(r) => r,
        other => panic!("expected a report, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_steady_run_loses_nothing() {
    let relay = InProcess::start(3, "").await;
    let json = relay.dir.path().join("steady.json");
    let json_arg = json.display().to_string();
    let outcome = relay
        .stress(
            "steady",
            &[
                "--platforms",
                "3",
                "--gateways",
                "2",
                "--rate",
                "300",
                "--duration",
                "2s",
                "--drain",
                "20s",
                "--json",
                &json_arg,
            ],
        )
        .await;
    let r = report(&outcome);
    let t = &r.accounting;
    assert_eq!(t.lost, 0, "{t:?}");
    assert!(t.delivered_once > 0, "{t:?}");
    assert_eq!(t.delivered(), t.sent, "everything delivered: {t:?}");
    assert_eq!(t.unconfirmed, 0);
    assert!(r.phases[0].latency_ms.corrected.all.count > 0);
    assert!(
        r.phases[0]
            .run
            .series
            .iter()
            .any(|p| p.queue_messages.is_some())
    );
    assert_eq!(outcome.exit_code(), 0);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(written["accounting"]["lost"], 0);
    assert_eq!(written["scenario"], "steady");
    relay.relay.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_that_never_acks_gets_expiries_not_losses() {
    // Messages live 1 s (the lane default); the relay gives its expiry notices the lane's
    // maximum TTL, kept at 5 s so that a slow test machine still gets every notice.
    let relay = InProcess::start(2, "[lanes.chat]\ndefault_ttl_s = 1\nmax_ttl_s = 5\n").await;
    let outcome = relay
        .stress(
            "steady",
            &[
                "--platforms",
                "2",
                "--gateways",
                "1",
                "--silent",
                "p02",
                "--mix",
                "chat=1",
                "--window",
                "16",
                "--rate",
                "50",
                "--duration",
                "2s",
                "--drain",
                "30s",
            ],
        )
        .await;
    let r = report(&outcome);
    let t = &r.accounting;
    assert!(t.sent > 0);
    assert_eq!(t.lost, 0, "{t:?}");
    assert_eq!(
        t.delivered(),
        0,
        "the silent platform records nothing: {t:?}"
    );
    assert_eq!(
        t.expired_with_notice, t.sent,
        "every message expired with notice: {t:?}"
    );
    assert!(
        r.phases[0].run.held_unacked > 0,
        "it was given messages and kept them"
    );
    assert_eq!(outcome.exit_code(), 0);
    relay.relay.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_bulk_run_delivers_every_recipient() {
    let relay = InProcess::start(3, "").await;
    let outcome = relay
        .stress(
            "bulk",
            &[
                "--platforms",
                "3",
                "--recipients",
                "20000",
                "--chunk",
                "2000",
                "--chat-rate",
                "100",
                "--duration",
                "4s",
            ],
        )
        .await;
    let r = report(&outcome);
    let res = &r.result;
    assert_eq!(res["status"]["accepted"], 20000, "{res}");
    assert_eq!(res["status"]["delivered"], 20000, "{res}");
    assert_eq!(res["state"], "done", "{res}");
    assert!(res["recipients_received_by_platforms"].as_u64().unwrap() >= 20000);
    assert_eq!(r.accounting.lost, 0);
    assert_eq!(r.phases.len(), 2);
    relay.relay.shutdown(Duration::from_secs(5)).await;
}
