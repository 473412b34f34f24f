//! The relay's configuration: a TOML file (see `relay config-example`), checked as a whole at
//! start-up and on SIGHUP so that a mistake is reported with the field that holds it and the
//! relay never runs half-configured.

use ed25519_dalek::VerifyingKey;
use federation_spec::address::check_peer_id;
use federation_spec::keyfile::hex32;
use federation_spec::lane::{self, TtlPolicy};
use federation_spec::proto::{Lane, Role};
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or a field of the wrong type or name.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the field and line.
        message: String,
    },
    /// A field has a value the relay cannot use.
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field, e.g. `peers[1].keys[0]`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The relay's name in Challenge and logs.
    #[serde(default = "default_relay_id")]
    pub relay_id: String,
    /// Where the store, keys and TLS files live; relative paths below are relative to it.
    /// Itself relative to the config file's directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The relay's own key file.
    #[serde(default = "default_relay_key")]
    pub relay_key: PathBuf,
    /// Listen addresses.
    #[serde(default)]
    pub listen: Listen,
    /// TLS certificate and key (PEM), for QUIC and for wss.
    #[serde(default)]
    pub tls: Tls,
    /// The store.
    #[serde(default)]
    pub store: StoreSection,
    /// Session limits.
    #[serde(default)]
    pub limits: Limits,
    /// Origin signature verification.
    #[serde(default)]
    pub verify: Verify,
    /// Default per-destination queue quotas.
    #[serde(default)]
    pub queue: Quota,
    /// Lane TTLs.
    #[serde(default)]
    pub lanes: Lanes,
    /// Campaign quotas and reporting.
    #[serde(default)]
    pub campaigns: Campaigns,
    /// Admin API.
    #[serde(default)]
    pub admin: Admin,
    /// Logging.
    #[serde(default)]
    pub log: Log,
    /// The peers allowed to connect.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// QUIC, UDP.
    pub quic: Option<SocketAddr>,
    /// WebSocket, TCP.
    pub ws: Option<SocketAddr>,
    /// Admin HTTP, TCP.
    pub admin: Option<SocketAddr>,
    /// Serve WebSocket over TLS (wss) with the [tls] certificate.
    #[serde(default)]
    pub ws_tls: bool,
    /// Plain ws on a non-loopback address is refused unless a TLS-terminating proxy is in front.
    #[serde(default)]
    pub ws_behind_tls_proxy: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            quic: Some(SocketAddr::from(([127, 0, 0, 1], 7700))),
            ws: Some(SocketAddr::from(([127, 0, 0, 1], 7701))),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 7702))),
            ws_tls: false,
            ws_behind_tls_proxy: false,
        }
    }
}

/// TLS files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            cert: "tls/cert.pem".into(),
            key: "tls/key.pem".into(),
        }
    }
}

/// Store settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `redb` (default) or `sled` (when built with `--features sled`).
    pub backend: String,
    /// The engine's page cache, MiB: bounds the store's memory however deep the queues.
    pub cache_mb: usize,
    /// Refuse new messages (busy) when the store's files reach this size, MiB; 0 = no limit.
    pub max_disk_mb: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            backend: "redb".into(),
            cache_mb: 64,
            max_disk_mb: 0,
        }
    }
}

/// Session limits, announced in Welcome.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame after the handshake.
    pub max_frame_bytes: u32,
    /// Largest payload.
    pub max_payload_bytes: u32,
    /// Unanswered Deliver/Receipt frames a peer may have outstanding.
    pub max_inflight: u32,
    /// Receive window used when the peer announces 0 (a peer may ask for up to 65,536).
    pub receive_window: u32,
    /// Time allowed for the handshake.
    pub handshake_timeout_ms: u64,
    /// A silent session is closed after this.
    pub idle_timeout_ms: u64,
    /// Connections at once, all transports together.
    pub max_connections: usize,
    /// Default per-peer message rate (msgs/s); a peer entry may override it.
    pub max_msgs_per_s: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: federation_spec::frame::DEFAULT_MAX_FRAME as u32,
            max_payload_bytes: federation_spec::message::DEFAULT_MAX_PAYLOAD as u32,
            max_inflight: 4096,
            receive_window: 1024,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 10_000,
            max_msgs_per_s: 1_000_000,
        }
    }
}

/// Which origin signatures the relay verifies.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerifyPolicy {
    /// Every one (the default).
    #[default]
    All,
    /// A random fraction, for extreme load; destinations verify end to end.
    Sample,
    /// None.
    None,
}

/// Verification settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Verify {
    /// all, sample or none.
    pub policy: VerifyPolicy,
    /// With `sample`: the fraction verified, in (0, 1].
    pub sample_fraction: f64,
}

impl Default for Verify {
    fn default() -> Self {
        Self {
            policy: VerifyPolicy::All,
            sample_fraction: 0.01,
        }
    }
}

/// Per-destination queue quota.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quota {
    /// Messages queued for one destination, all lanes.
    pub max_messages: u64,
    /// Bytes queued for one destination, all lanes.
    pub max_bytes: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_messages: 20_000_000,
            max_bytes: 8 << 30,
        }
    }
}

/// TTLs of one lane.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneSection {
    /// TTL when a message asks for 0.
    pub default_ttl_s: u32,
    /// Longest TTL granted.
    pub max_ttl_s: u32,
}

impl From<LaneSection> for TtlPolicy {
    fn from(l: LaneSection) -> Self {
        TtlPolicy {
            default_ttl_s: l.default_ttl_s,
            max_ttl_s: l.max_ttl_s,
        }
    }
}

fn lane_default(lane: Lane) -> LaneSection {
    let p = lane::default_policy(lane);
    LaneSection {
        default_ttl_s: p.default_ttl_s,
        max_ttl_s: p.max_ttl_s,
    }
}

/// TTLs of every lane.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lanes {
    /// Call signalling.
    #[serde(default = "call_default")]
    pub call: LaneSection,
    /// Chat.
    #[serde(default = "chat_default")]
    pub chat: LaneSection,
    /// Bulk.
    #[serde(default = "bulk_default")]
    pub bulk: LaneSection,
}

fn call_default() -> LaneSection {
    lane_default(Lane::Call)
}
fn chat_default() -> LaneSection {
    lane_default(Lane::Chat)
}
fn bulk_default() -> LaneSection {
    lane_default(Lane::Bulk)
}

impl Default for Lanes {
    fn default() -> Self {
        Self {
            call: call_default(),
            chat: chat_default(),
            bulk: bulk_default(),
        }
    }
}

impl Lanes {
    /// The policy of a lane.
    pub fn policy(&self, lane: Lane) -> TtlPolicy {
        match lane {
            Lane::Call => self.call.into(),
            Lane::Chat | Lane::Unspecified => self.chat.into(),
            Lane::Bulk => self.bulk.into(),
        }
    }
}

/// Campaign defaults; a peer's own entry overrides its quotas.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Campaigns {
    /// Recipients per second the relay sends a platform on the bulk lane (0: no limit).
    pub max_bulk_rate: u32,
    /// Recipients one campaign may have.
    pub max_campaign_recipients: u64,
    /// Campaigns of one broadcaster not yet finished.
    pub max_campaigns_in_flight: u32,
    /// Recipients per second a broadcaster's chunks may add.
    pub max_recipients_per_s: u32,
    /// Most recipients in one CampaignChunk (announced in Welcome).
    pub max_chunk_recipients: u32,
    /// How often the status of an unfinished campaign is pushed to its broadcaster.
    pub status_interval_ms: u64,
    /// How long a finished campaign's status is kept.
    pub retention_s: u64,
}

impl Default for Campaigns {
    fn default() -> Self {
        Self {
            max_bulk_rate: 100_000,
            max_campaign_recipients: 20_000_000,
            max_campaigns_in_flight: 8,
            max_recipients_per_s: 500_000,
            max_chunk_recipients: 10_000,
            status_interval_ms: 1000,
            retention_s: 86_400,
        }
    }
}

/// A peer's campaign quotas, resolved against [`Campaigns`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkQuota {
    /// As a destination: recipients per second it accepts (0: no limit).
    pub max_bulk_rate: u32,
    /// As a broadcaster: recipients per campaign.
    pub max_campaign_recipients: u64,
    /// As a broadcaster: campaigns not yet finished.
    pub max_campaigns_in_flight: u32,
    /// As a broadcaster: recipients per second.
    pub max_recipients_per_s: u32,
}

/// Admin API settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Bearer token required from non-loopback clients. Without it, only loopback is served.
    pub token: Option<String>,
}

/// Log settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `human` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `relay=debug`; RUST_LOG overrides it.
    pub filter: String,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: "human".into(),
            filter: "info".into(),
        }
    }
}

/// One peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its peer id.
    pub id: String,
    /// `platform` or `broadcaster`.
    pub role: String,
    /// Its ed25519 public keys, 64 hex digits each; several during a rotation.
    pub keys: Vec<String>,
    /// Messages per second it may send; default `limits.max_msgs_per_s`.
    pub max_msgs_per_s: Option<u32>,
    /// Queue quota for messages to it; default `[queue]`.
    pub max_queue_messages: Option<u64>,
    /// Queue quota in bytes; default `[queue]`.
    pub max_queue_bytes: Option<u64>,
    /// Platform: bulk recipients per second it accepts; default `campaigns.max_bulk_rate`.
    pub max_bulk_rate: Option<u32>,
    /// Broadcaster: recipients per campaign; default `campaigns.max_campaign_recipients`.
    pub max_campaign_recipients: Option<u64>,
    /// Broadcaster: unfinished campaigns; default `campaigns.max_campaigns_in_flight`.
    pub max_campaigns_in_flight: Option<u32>,
    /// Broadcaster: recipients per second; default `campaigns.max_recipients_per_s`.
    pub max_recipients_per_s: Option<u32>,
}

/// A peer as the relay uses it, after checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// Its peer id.
    pub id: String,
    /// What it may do.
    pub role: Role,
    /// Its keys.
    pub keys: Vec<VerifyingKey>,
    /// Messages per second it may send.
    pub max_msgs_per_s: u32,
    /// Quota for messages to it.
    pub quota: Quota,
    /// Campaign quotas.
    pub bulk: BulkQuota,
}

impl PartialEq for Quota {
    fn eq(&self, other: &Self) -> bool {
        self.max_messages == other.max_messages && self.max_bytes == other.max_bytes
    }
}

fn default_relay_id() -> String {
    "relay".into()
}
fn default_data_dir() -> PathBuf {
    ".".into()
}
fn default_relay_key() -> PathBuf {
    "keys/relay.key".into()
}

/// A loaded, checked configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file.
    pub path: PathBuf,
    /// Its contents.
    pub config: Config,
    /// `data_dir`, resolved.
    pub data_dir: PathBuf,
    /// The peers, checked.
    pub peers: Vec<Peer>,
}

impl Loaded {
    /// A path from the config, resolved against the data dir.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.data_dir.join(path)
    }
}

/// Reads and checks a configuration file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and checks configuration text read from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.into(),
        message: e.to_string(),
    })?;
    let invalid = |field: String, message: String| ConfigError::Invalid {
        path: path.into(),
        field,
        message,
    };
    let base = path.parent().unwrap_or(Path::new("."));
    // Collecting the components drops `.` parts, so paths print as people expect.
    let data_dir: PathBuf = base.join(&config.data_dir).components().collect();

    if config.store.cache_mb == 0 {
        return Err(invalid(
            "store.cache_mb".into(),
            "must be at least 1".into(),
        ));
    }
    let l = &config.limits;
    if !(1024..=federation_spec::frame::ABSOLUTE_MAX_FRAME as u32).contains(&l.max_frame_bytes) {
        return Err(invalid(
            "limits.max_frame_bytes".into(),
            "must be between 1024 and 16777216".into(),
        ));
    }
    if l.max_payload_bytes == 0 || l.max_payload_bytes > l.max_frame_bytes / 2 {
        return Err(invalid(
            "limits.max_payload_bytes".into(),
            "must be at least 1 and at most half of max_frame_bytes".into(),
        ));
    }
    for (field, value) in [
        ("limits.max_inflight", l.max_inflight),
        ("limits.receive_window", l.receive_window),
        ("limits.max_msgs_per_s", l.max_msgs_per_s),
    ] {
        if value == 0 {
            return Err(invalid(field.into(), "must be at least 1".into()));
        }
    }
    if config.verify.policy == VerifyPolicy::Sample
        && !(config.verify.sample_fraction > 0.0 && config.verify.sample_fraction <= 1.0)
    {
        return Err(invalid(
            "verify.sample_fraction".into(),
            "must be in (0, 1]".into(),
        ));
    }
    for (name, l) in [
        ("call", config.lanes.call),
        ("chat", config.lanes.chat),
        ("bulk", config.lanes.bulk),
    ] {
        if l.default_ttl_s == 0 || l.default_ttl_s > l.max_ttl_s {
            return Err(invalid(
                format!("lanes.{name}"),
                "needs 0 < default_ttl_s <= max_ttl_s".into(),
            ));
        }
    }
    if !matches!(config.log.format.as_str(), "human" | "json") {
        return Err(invalid("log.format".into(), "is `human` or `json`".into()));
    }
    if let Some(ws) = config.listen.ws
        && !ws.ip().is_loopback()
        && !config.listen.ws_tls
        && !config.listen.ws_behind_tls_proxy
    {
        return Err(invalid(
            "listen.ws".into(),
            "plain ws on a non-loopback address needs listen.ws_tls = true or listen.ws_behind_tls_proxy = true".into(),
        ));
    }

    let c = config.campaigns;
    if c.max_chunk_recipients == 0 {
        return Err(invalid(
            "campaigns.max_chunk_recipients".into(),
            "must be at least 1".into(),
        ));
    }
    if c.status_interval_ms < 100 {
        return Err(invalid(
            "campaigns.status_interval_ms".into(),
            "must be at least 100".into(),
        ));
    }
    let mut seen = HashSet::new();
    let mut peers = Vec::with_capacity(config.peers.len());
    for (i, p) in config.peers.iter().enumerate() {
        let field = |f: &str| format!("peers[{i}].{f}");
        check_peer_id(&p.id).map_err(|e| invalid(field("id"), e.to_string()))?;
        if !seen.insert(p.id.clone()) {
            return Err(invalid(field("id"), format!("`{}` appears twice", p.id)));
        }
        let role = match p.role.as_str() {
            "platform" => Role::Platform,
            "broadcaster" => Role::Broadcaster,
            _ => {
                return Err(invalid(
                    field("role"),
                    "is `platform` or `broadcaster`".into(),
                ));
            }
        };
        if p.keys.is_empty() {
            return Err(invalid(field("keys"), "needs at least one key".into()));
        }
        let mut keys = Vec::with_capacity(p.keys.len());
        for (k, text) in p.keys.iter().enumerate() {
            let key = hex32(text)
                .and_then(|b| federation_spec::signing::parse_public_key(&b))
                .ok_or_else(|| {
                    invalid(
                        format!("peers[{i}].keys[{k}]"),
                        "is not an ed25519 public key (64 hex digits)".into(),
                    )
                })?;
            keys.push(key);
        }
        peers.push(Peer {
            id: p.id.clone(),
            role,
            keys,
            max_msgs_per_s: p.max_msgs_per_s.unwrap_or(config.limits.max_msgs_per_s),
            quota: Quota {
                max_messages: p.max_queue_messages.unwrap_or(config.queue.max_messages),
                max_bytes: p.max_queue_bytes.unwrap_or(config.queue.max_bytes),
            },
            bulk: BulkQuota {
                max_bulk_rate: p.max_bulk_rate.unwrap_or(c.max_bulk_rate),
                max_campaign_recipients: p
                    .max_campaign_recipients
                    .unwrap_or(c.max_campaign_recipients),
                max_campaigns_in_flight: p
                    .max_campaigns_in_flight
                    .unwrap_or(c.max_campaigns_in_flight),
                max_recipients_per_s: p.max_recipients_per_s.unwrap_or(c.max_recipients_per_s),
            },
        });
    }
    Ok(Loaded {
        path: path.into(),
        config,
        data_dir,
        peers,
    })
}

/// The commented example printed by `relay config-example`.
pub const EXAMPLE: &str = include_str!("config-example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses() {
        let loaded = parse(Path::new("/etc/relay/relay.toml"), EXAMPLE).unwrap();
        assert_eq!(loaded.peers.len(), 2);
        assert_eq!(loaded.data_dir, Path::new("/var/lib/relay"));
    }

    #[test]
    fn sections_may_be_partial() {
        let loaded = parse(
            Path::new("r.toml"),
            "[log]\nfilter = \"debug\"\n[store]\ncache_mb = 8\n",
        )
        .unwrap();
        assert_eq!(loaded.config.log.format, "human");
        assert_eq!(loaded.config.store.backend, "redb");
        assert!(loaded.config.listen.quic.is_some());
    }

    #[test]
    fn errors_name_the_field() {
        let bad_key = "[[peers]]\nid = \"alpha\"\nrole = \"platform\"\nkeys = [\"00\"]\n";
        let e = parse(Path::new("r.toml"), bad_key).unwrap_err().to_string();
        assert!(e.contains("peers[0].keys[0]"), "{e}");
        let unknown = "[limits]\nmax_frame = 5\n";
        let e = parse(Path::new("r.toml"), unknown).unwrap_err().to_string();
        assert!(e.contains("max_frame"), "{e}");
        let role = "[[peers]]\nid = \"alpha\"\nrole = \"king\"\nkeys = []\n";
        let e = parse(Path::new("r.toml"), role).unwrap_err().to_string();
        assert!(e.contains("peers[0].role"), "{e}");
        let ws = "[listen]\nws = \"0.0.0.0:7701\"\n";
        let e = parse(Path::new("r.toml"), ws).unwrap_err().to_string();
        assert!(e.contains("listen.ws"), "{e}");
    }
}
