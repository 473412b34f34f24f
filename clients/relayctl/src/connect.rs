//! The options every command that talks to the relay shares, and turning them into a
//! connected client.

use anyhow::Context;
use relay_client::{Ca, Client, ClientConfig, KeyFile, ReconnectPolicy, RelayUrl, Scheme};
use std::path::{Path, PathBuf};

/// Where the relay writes its self-signed certificate by default.
pub const DEFAULT_CA: &str = "relay-data/tls/cert.pem";

/// How to reach and trust the relay, and who we are.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Relay URL: quic://host:port, ws://host:port or wss://host:port.
    #[arg(long, default_value = "quic://127.0.0.1:7700")]
    pub relay: String,
    /// Key file (see `relayctl keygen`); it names our peer.
    #[arg(long)]
    pub key: PathBuf,
    /// The relay's certificate (PEM). Default for quic/wss: relay-data/tls/cert.pem if it
    /// exists, else the relay is trusted by the relay_key pinned in the key file.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

impl RelayArgs {
    /// The client configuration these options describe.
    pub fn config(&self, reconnect: ReconnectPolicy) -> anyhow::Result<ClientConfig> {
        let key = read_key(&self.key)?;
        let url: RelayUrl = self.relay.parse().context("--relay")?;
        let mut config = ClientConfig::new(&self.relay, key)
            .context("--relay")?
            .with_reconnect(reconnect);
        let ca = match (&self.ca, url.scheme) {
            (Some(path), _) => Some(path.clone()),
            (None, Scheme::Quic | Scheme::Wss) => {
                Some(PathBuf::from(DEFAULT_CA)).filter(|p| p.exists())
            }
            (None, Scheme::Ws) => None,
        };
        if let Some(path) = ca {
            config = config.with_ca(Ca::PemFile(path));
        }
        Ok(config)
    }

    /// Connects.
    pub async fn connect(&self, reconnect: ReconnectPolicy) -> anyhow::Result<Client> {
        let config = self.config(reconnect)?;
        Client::connect(config)
            .await
            .with_context(|| format!("connecting to {}", self.relay))
    }
}

/// Reads and parses a key file.
pub fn read_key(path: &Path) -> anyhow::Result<KeyFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading key file {}", path.display()))?;
    KeyFile::parse(&text).with_context(|| format!("key file {}", path.display()))
}
