//! The relay of a crash loop: a data dir with the demo peers (platforms `alpha`, `beta`,
//! `gamma`, broadcaster `news`) listening on fixed loopback ports, so that every restart
//! comes back where the gateways reconnect; and the relay binary as a child process that is
//! started (and waited for until `/readyz` answers 200), killed with SIGKILL, or stopped
//! with SIGTERM and timed.

use crate::probe;
use ed25519_dalek::SigningKey;
use federation_spec::keyfile::KeyFile;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The demo peers: the platforms the load runs between, and a broadcaster for campaigns.
pub(super) const PLATFORMS: [&str; 3] = ["alpha", "beta", "gamma"];
const BROADCASTER: &str = "news";

/// How often readiness is polled while the relay starts.
const READY_POLL: Duration = Duration::from_millis(20);
/// Log lines shown when the relay fails to start.
const LOG_TAIL_LINES: usize = 20;

/// A written data dir.
pub(super) struct SetUp {
    /// The data dir.
    pub(super) dir: PathBuf,
    /// Its `relay.toml`.
    pub(super) config: PathBuf,
    /// The certificate gateways trust.
    pub(super) ca: PathBuf,
    /// Where every incarnation of the relay appends its log (stderr).
    pub(super) log: PathBuf,
    /// Where every incarnation appends its banner (stdout).
    pub(super) out: PathBuf,
    /// QUIC (UDP) address.
    pub(super) quic: SocketAddr,
    /// WebSocket address.
    pub(super) ws: SocketAddr,
    /// Admin API address.
    pub(super) admin: SocketAddr,
    /// The platforms' key files, in [`PLATFORMS`] order.
    pub(super) platforms: Vec<KeyFile>,
    /// The broadcaster's key file.
    pub(super) broadcaster: KeyFile,
    temp: Option<tempfile::TempDir>,
}

impl SetUp {
    /// Writes the set-up into `keep` (which must not hold one already) or a temp dir.
    pub(super) fn write(keep: Option<&Path>) -> Result<Self, String> {
        let (temp, dir) = match keep {
            Some(dir) => {
                if dir.join("relay.toml").exists() {
                    return Err(format!(
                        "--keep-data {}: already holds a relay set-up; a crash loop needs a fresh one",
                        dir.display()
                    ));
                }
                (None, dir.to_path_buf())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("stress-crashloop-")
                    .tempdir()
                    .map_err(|e| format!("temp dir: {e}"))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let io = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
        std::fs::create_dir_all(dir.join("keys")).map_err(|e| io("keys/", e))?;
        std::fs::create_dir_all(dir.join("tls")).map_err(|e| io("tls/", e))?;
        let mut rng = rand::rngs::OsRng;
        let relay = SigningKey::generate(&mut rng);
        std::fs::write(
            dir.join("keys/relay.key"),
            KeyFile::new("relay", relay.clone(), None).to_text(),
        )
        .map_err(|e| io("relay key", e))?;
        let mut peers = String::new();
        let mut platforms = Vec::new();
        let mut broadcaster = None;
        let roles = PLATFORMS
            .iter()
            .map(|p| (*p, "platform"))
            .chain([(BROADCASTER, "broadcaster")]);
        for (name, role) in roles {
            let key = SigningKey::generate(&mut rng);
            let file = KeyFile::new(name, key.clone(), Some(relay.verifying_key()));
            std::fs::write(dir.join(format!("keys/{name}.key")), file.to_text())
                .map_err(|e| io("peer key", e))?;
            let _ = write!(
                peers,
                "\n[[peers]]\nid = \"{name}\"\nrole = \"{role}\"\nkeys = [\"{}\"]\n",
                hex::encode(key.verifying_key().as_bytes())
            );
            if role == "platform" {
                platforms.push(file);
            } else {
                broadcaster = Some(file);
            }
        }
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .map_err(|e| format!("self-signed certificate: {e}"))?;
        std::fs::write(dir.join("tls/cert.pem"), cert.cert.pem()).map_err(|e| io("cert", e))?;
        std::fs::write(dir.join("tls/key.pem"), cert.signing_key.serialize_pem())
            .map_err(|e| io("TLS key", e))?;
        // Fixed ports: a restarted relay must come back where the gateways reconnect.
        let quic = free_udp()?;
        let ws = free_tcp()?;
        let admin = free_tcp()?;
        let text = format!(
            "# Written by `stress crashloop`: the demo peers on fixed loopback ports.\n\
             relay_id = \"relay-crashloop\"\n\
             data_dir = \".\"\n\
             relay_key = \"keys/relay.key\"\n\n\
             [listen]\nquic = \"{quic}\"\nws = \"{ws}\"\nadmin = \"{admin}\"\n\n\
             [tls]\ncert = \"tls/cert.pem\"\nkey = \"tls/key.pem\"\n\n\
             [log]\nformat = \"human\"\nfilter = \"warn\"\n\
             {peers}"
        );
        let config = dir.join("relay.toml");
        std::fs::write(&config, text).map_err(|e| io("relay.toml", e))?;
        Ok(Self {
            ca: dir.join("tls/cert.pem"),
            log: dir.join("relay.log"),
            out: dir.join("relay.out"),
            dir,
            config,
            quic,
            ws,
            admin,
            platforms,
            broadcaster: broadcaster.ok_or("no broadcaster key written")?,
            temp,
        })
    }

    /// Keeps a temp data dir after the run (for a failed run), returning where it is.
    pub(super) fn keep(&mut self) -> PathBuf {
        if let Some(t) = self.temp.take() {
            return t.keep();
        }
        self.dir.clone()
    }
}

/// A free loopback port, as the kernel hands them out (released again at once).
fn free_tcp() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free TCP port: {e}"))
}

fn free_udp() -> Result<SocketAddr, String> {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("finding a free UDP port: {e}"))
}

/// How a SIGTERM stop went.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stopped {
    /// From the signal to the exit of the process.
    pub(super) took: Duration,
    /// The exit was clean (status 0) and came before the limit.
    pub(super) clean: bool,
}

/// The relay binary run on a set-up, one incarnation at a time.
pub(super) struct RelayProcess {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    out: PathBuf,
    admin: SocketAddr,
    child: Option<Child>,
    /// Incarnations started so far.
    pub(super) starts: u32,
}

impl RelayProcess {
    /// A relay not started yet.
    pub(super) fn new(bin: &Path, setup: &SetUp) -> Self {
        Self {
            bin: bin.to_path_buf(),
            config: setup.config.clone(),
            log: setup.log.clone(),
            out: setup.out.clone(),
            admin: setup.admin,
            child: None,
            starts: 0,
        }
    }

    /// Its process id, while it runs.
    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Starts an incarnation and waits until `/readyz` answers 200; returns how long that
    /// took. A relay that exits or is not ready within `timeout` is an error (and killed).
    pub(super) async fn start(&mut self, timeout: Duration) -> Result<Duration, String> {
        if self.child.is_some() {
            return Err("the relay is already running".into());
        }
        let append = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("relay output file {}: {e}", path.display()))
        };
        let started = Instant::now();
        let mut child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(append(&self.out)?))
            .stderr(Stdio::from(append(&self.log)?))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
        self.starts += 1;
        let deadline = started + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the relay (start {}) exited with {status} before it was ready; last lines of {}:\n{}",
                    self.starts,
                    self.log.display(),
                    self.log_tail()
                ));
            }
            if probe::http_get(self.admin, "/readyz", Duration::from_millis(500))
                .await
                .is_ok()
            {
                self.child = Some(child);
                return Ok(started.elapsed());
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(format!(
                    "the relay (start {}) was not ready within {timeout:?}; last lines of {}:\n{}",
                    self.starts,
                    self.log.display(),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// SIGKILL, and reaps the process.
    pub(super) async fn kill9(&mut self) -> Result<(), String> {
        let mut child = self.child.take().ok_or("the relay is not running")?;
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the relay had already exited ({status}) before the kill"
            ));
        }
        child
            .start_kill()
            .map_err(|e| format!("SIGKILL to the relay: {e}"))?;
        child
            .wait()
            .await
            .map_err(|e| format!("waiting for the killed relay: {e}"))?;
        Ok(())
    }

    /// SIGTERM, then waits for the exit; after `limit` the relay is killed and the stop
    /// counts as not clean.
    pub(super) async fn sigterm(&mut self, limit: Duration) -> Result<Stopped, String> {
        let mut child = self.child.take().ok_or("the relay is not running")?;
        let pid = child.id().ok_or("the relay has already exited")?;
        let started = Instant::now();
        // The crate has no libc binding; kill(1) is what target.rs uses as well.
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .map_err(|e| format!("running kill -TERM {pid}: {e}"))?;
        if !sent.success() {
            return Err(format!("kill -TERM {pid} failed ({sent})"));
        }
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(status)) => Ok(Stopped {
                took: started.elapsed(),
                clean: status.success(),
            }),
            Ok(Err(e)) => Err(format!("waiting for the relay to stop: {e}")),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Ok(Stopped {
                    took: started.elapsed(),
                    clean: false,
                })
            }
        }
    }

    /// The last lines of the relay log.
    pub(super) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}
