//! What a client needs to know to connect: where the relay is, who we are, how to trust the
//! relay, and how to behave (windows, reconnects, retries).

use crate::error::ClientError;
use crate::transport::tls;
use crate::url::{RelayUrl, Scheme, UrlError};
use ed25519_dalek::{SigningKey, VerifyingKey};
use federation_spec::keyfile::KeyFile;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The certificate (or CA) the relay's TLS certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ca {
    /// A PEM file with one or more certificates (the relay writes `tls/cert.pem`).
    PemFile(PathBuf),
    /// PEM text.
    Pem(Vec<u8>),
    /// One DER-encoded certificate.
    Der(Vec<u8>),
}

/// When and how fast to reconnect after a connection ends (SPEC.md 8.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Reconnect at all. When false, a lost connection fails every unanswered send with
    /// [`crate::SendError::Closed`] and ends the event stream.
    pub enabled: bool,
    /// The first attempt waits a random time up to this.
    pub initial_delay: Duration,
    /// Waits double up to this (with jitter).
    pub max_delay: Duration,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
    /// A session that stayed up this long resets the backoff.
    pub reset_after: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_attempts: None,
            reset_after: Duration::from_secs(60),
        }
    }
}

impl ReconnectPolicy {
    /// No reconnects.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }
}

/// Client configuration. [`ClientConfig::new`] fills in defaults for everything but the
/// URL and the key.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where the relay is.
    pub url: RelayUrl,
    /// Our peer id, secret key, and optionally the relay key to pin.
    pub key: KeyFile,
    /// What the relay's TLS certificate must chain to. Without it (on quic/wss) the relay is
    /// authenticated by the pinned relay key alone, which the key file must then have.
    pub ca: Option<Ca>,
    /// Incoming frames we can hold un-acked (0 = the relay's default).
    pub receive_window: u32,
    /// Reconnect behaviour.
    pub reconnect: ReconnectPolicy,
    /// Software name announced in Hello.
    pub agent: String,
    /// Limit for connecting plus the handshake.
    pub handshake_timeout: Duration,
    /// Most messages and receipts held unanswered at once; `send` waits beyond it.
    pub max_pending: usize,
    /// Most campaign chunks held unanswered at once; `Campaign::submit_chunk` waits beyond
    /// it. Each holds its recipients in memory until the relay acknowledges it.
    pub max_pending_chunks: usize,
    /// How many BUSY / RATE_LIMITED refusals of one message the SDK absorbs by resending after
    /// `retry_after_ms`, before reporting the refusal (0: report the first).
    pub backpressure_retries: u32,
    /// Keep to the session's `max_msgs_per_s` instead of being refused above it.
    pub pace_sends: bool,
    /// Verify origin signatures of incoming messages against the directory.
    pub verify_signatures: bool,
    /// How long [`crate::Client::close`] waits for held messages to be answered.
    pub close_grace: Duration,
}

impl ClientConfig {
    /// A configuration with defaults: reconnects on, relay-default receive window.
    pub fn new(url: &str, key: KeyFile) -> Result<Self, UrlError> {
        Ok(Self {
            url: RelayUrl::parse(url)?,
            key,
            ca: None,
            receive_window: 0,
            reconnect: ReconnectPolicy::default(),
            agent: concat!("relay-client/", env!("CARGO_PKG_VERSION")).into(),
            handshake_timeout: Duration::from_secs(10),
            max_pending: 65_536,
            max_pending_chunks: 64,
            backpressure_retries: 0,
            pace_sends: true,
            verify_signatures: true,
            close_grace: Duration::from_secs(5),
        })
    }

    /// Sets the CA.
    pub fn with_ca(mut self, ca: Ca) -> Self {
        self.ca = Some(ca);
        self
    }

    /// Sets the receive window.
    pub fn with_receive_window(mut self, window: u32) -> Self {
        self.receive_window = window;
        self
    }

    /// Sets the reconnect policy.
    pub fn with_reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }
}

/// What every connection attempt uses, prepared once.
pub(crate) struct ConnectParams {
    pub(crate) url: RelayUrl,
    pub(crate) peer: String,
    pub(crate) key: SigningKey,
    pub(crate) relay_key: Option<VerifyingKey>,
    pub(crate) agent: String,
    pub(crate) handshake_timeout: Duration,
    /// QUIC: the quinn client configuration.
    pub(crate) quic: Option<quinn::ClientConfig>,
    /// wss: the rustls configuration.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("url", &self.url)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl ConnectParams {
    pub(crate) fn new(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let pinned = cfg.key.relay_key.is_some();
        let (quic, tls) = match cfg.url.scheme {
            Scheme::Quic => (Some(tls::quic_config(cfg.ca.as_ref(), pinned)?), None),
            Scheme::Wss => (None, Some(tls::wss_config(cfg.ca.as_ref(), pinned)?)),
            Scheme::Ws => (None, None),
        };
        Ok(Self {
            url: cfg.url.clone(),
            peer: cfg.key.peer.clone(),
            key: cfg.key.secret.clone(),
            relay_key: cfg.key.relay_key,
            agent: cfg.agent.clone(),
            handshake_timeout: cfg.handshake_timeout,
            quic,
            tls,
        })
    }
}
