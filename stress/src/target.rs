//! The relay under test: one that `stress` starts itself (the release binary on a generated
//! set-up in a temp dir), or one already running that `--relay URL` points at.

use crate::probe::{self, RelayHandle};
use crate::setup::{self, Settings};
use federation_spec::keyfile::KeyFile;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The transport the generator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC (TLS 1.3, one stream per lane).
    Quic,
    /// Plain WebSocket on loopback.
    Ws,
}

impl Transport {
    /// The URL scheme.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Ws => "ws",
        }
    }
}

/// How to reach and observe a relay.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL clients connect to.
    pub url: String,
    /// The certificate to trust (QUIC and wss).
    pub ca: Option<PathBuf>,
    /// The platforms the generator may act as.
    pub platforms: Vec<KeyFile>,
    /// Broadcasters it may run campaigns as (known only from the relay's configuration).
    pub broadcasters: Vec<KeyFile>,
    /// Process, admin API, store.
    pub relay: RelayHandle,
    /// For reports: what this relay is.
    pub description: String,
}

/// A relay process this tool started; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct OwnRelay {
    child: Child,
    /// How to reach it.
    pub target: Target,
    /// Its data directory (deleted on drop unless kept).
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// Addresses from the relay's banner.
#[derive(Debug, Clone, Copy)]
struct Banner {
    quic: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

/// Where the relay binary is: `--relay-bin`, else next to this executable.
pub fn relay_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("--relay-bin {}: no such file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    // Test binaries live in target/<profile>/deps.
    for candidate in [dir.join("relay"), dir.join("../relay")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "no relay binary next to {} — build it with `cargo build --release -p relay -p stress` \
         and run target/release/stress, or pass --relay-bin PATH, or --relay URL for a running relay",
        exe.display()
    ))
}

impl OwnRelay {
    /// Writes a set-up into `keep` (or a temp dir) and starts `bin serve` on it.
    pub fn start(
        bin: &Path,
        settings: &Settings,
        transport: Transport,
        keep: Option<&Path>,
    ) -> Result<Self, String> {
        let (temp, dir) = match keep {
            Some(dir) => (None, dir.to_path_buf()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("stress-relay-")
                    .tempdir()
                    .map_err(|e| format!("temp dir: {e}"))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let written =
            setup::write(&dir, settings).map_err(|e| format!("writing the relay set-up: {e}"))?;
        let log = std::fs::File::create(dir.join("relay.log"))
            .map_err(|e| format!("relay log file: {e}"))?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&written.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let banner = match read_banner(&mut child, Duration::from_secs(30)) {
            Ok(b) => b,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.join("relay.log")).unwrap_or_default();
                return Err(format!("{e}\nrelay log:\n{log}"));
            }
        };
        let url = match transport {
            Transport::Quic => banner.quic.map(|a| format!("quic://{a}")),
            Transport::Ws => banner.ws.map(|a| format!("ws://{a}")),
        }
        .ok_or_else(|| format!("the relay does not listen on {transport:?}"))?;
        let pid = child.id();
        Ok(Self {
            child,
            target: Target {
                url,
                ca: Some(written.ca),
                platforms: written.platforms,
                broadcasters: written.broadcasters,
                relay: RelayHandle {
                    pid: Some(pid),
                    admin: banner.admin,
                    store_dir: Some(written.store_dir),
                },
                description: format!(
                    "relay started by stress ({}, verify={}{})",
                    bin.display(),
                    settings.verify.name(),
                    if settings.verify == setup::Verify::Sample {
                        format!(" fraction {}", settings.sample_fraction)
                    } else {
                        String::new()
                    }
                ),
            },
            dir,
            _temp: temp,
        })
    }

    /// Stops the relay: SIGTERM (it drains), then SIGKILL after `grace`.
    pub fn stop(mut self, grace: Duration) {
        self.terminate(grace);
    }

    fn terminate(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
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

impl Drop for OwnRelay {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(15));
    }
}

/// Reads the banner lines (`  quic      quic://ADDR`, `  websocket ws://ADDR`,
/// `  admin     http://ADDR ...`) from the child's stdout, then keeps draining it.
fn read_banner(child: &mut Child, timeout: Duration) -> Result<Banner, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut banner = Banner {
            quic: None,
            ws: None,
            admin: None,
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut sent = false;
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            let line = line.trim();
            let addr = |rest: &str| -> Option<SocketAddr> {
                let rest = rest.trim();
                let rest = rest.split("://").nth(1).unwrap_or(rest);
                rest.split_whitespace().next()?.parse().ok()
            };
            if let Some(rest) = line.strip_prefix("quic ") {
                banner.quic = addr(rest);
            } else if let Some(rest) = line.strip_prefix("websocket ") {
                banner.ws = addr(rest);
            } else if let Some(rest) = line.strip_prefix("admin ") {
                banner.admin = addr(rest);
                let _ = tx.send(banner);
                sent = true;
                break;
            }
        }
        if !sent {
            drop(tx);
            return;
        }
        // Keep reading so the relay never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(timeout) {
        Ok(b) => Ok(b),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            Err("the relay printed no banner in time".into())
        }
        Err(_) => Err("the relay exited before printing its banner".into()),
    }
}

/// How to find the keys and the certificate of a running relay.
#[derive(Debug, Clone, Default)]
pub struct External {
    /// `--relay URL`.
    pub url: String,
    /// `--data-dir DIR`: keys in DIR/keys, CA DIR/tls/cert.pem, config DIR/relay.toml.
    pub data_dir: Option<PathBuf>,
    /// `--keys DIR`.
    pub keys: Option<PathBuf>,
    /// `--ca FILE`.
    pub ca: Option<PathBuf>,
    /// `--admin ADDR`.
    pub admin: Option<String>,
}

impl External {
    /// Resolves keys, CA, admin address, store and process of a running relay.
    pub fn resolve(&self) -> Result<Target, String> {
        let config = self
            .data_dir
            .as_ref()
            .map(|d| d.join("relay.toml"))
            .filter(|c| c.is_file());
        let keys_dir = self
            .keys
            .clone()
            .or_else(|| self.data_dir.as_ref().map(|d| d.join("keys")))
            .ok_or("--relay needs --data-dir DIR (or --keys DIR and --ca FILE) to act as its platforms")?;
        let platforms = setup::read_platforms(&keys_dir, config.as_deref())?;
        let broadcasters = match &config {
            Some(c) => setup::read_peers(&keys_dir, Some(c), "broadcaster")?,
            None => Vec::new(),
        };
        if platforms.is_empty() {
            return Err(format!("no platform key files in {}", keys_dir.display()));
        }
        let ca = self
            .ca
            .clone()
            .or_else(|| self.data_dir.as_ref().map(|d| d.join("tls/cert.pem")))
            .filter(|p| p.is_file());
        let (config_admin, store_dir) = match &config {
            Some(c) => {
                let (admin, data) = setup::admin_and_data_dir(c)?;
                (admin, Some(data.join("store")))
            }
            None => (None, None),
        };
        let admin = self
            .admin
            .clone()
            .or(config_admin)
            .map(|a| {
                let a = a.trim_start_matches("http://").trim_end_matches('/');
                a.parse::<SocketAddr>()
                    .map_err(|e| format!("admin address `{a}`: {e}"))
            })
            .transpose()?
            .filter(|a| a.port() != 0);
        let pid = admin
            .and_then(|a| probe::pid_listening_on(a.port(), false))
            .or_else(|| {
                let (udp, port) = port_of(&self.url)?;
                probe::pid_listening_on(port, udp)
            });
        Ok(Target {
            url: self.url.clone(),
            ca,
            platforms,
            broadcasters,
            relay: RelayHandle {
                pid,
                admin,
                store_dir: store_dir.filter(|d| d.is_dir()),
            },
            description: format!("relay at {}", self.url),
        })
    }
}

/// (is UDP, port) of a relay URL.
fn port_of(url: &str) -> Option<(bool, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let port = rest
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse()
        .ok()?;
    Some((scheme == "quic", port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_of_urls() {
        assert_eq!(port_of("quic://127.0.0.1:7700"), Some((true, 7700)));
        assert_eq!(port_of("ws://127.0.0.1:7701/"), Some((false, 7701)));
        assert_eq!(port_of("nonsense"), None);
    }
}
