//! A relay set-up for a run: N platform key files, the relay's key, a self-signed certificate
//! and a `relay.toml` listening on free loopback ports, written into a data directory. The
//! format is the one `relay` writes for its demo (`relay/src/demo.rs`).

use ed25519_dalek::SigningKey;
use federation_spec::keyfile::KeyFile;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Which origin signatures the relay checks (`[verify] policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// Every one.
    All,
    /// A fraction (`--sample-fraction`).
    Sample,
    /// None.
    None,
}

impl Verify {
    /// The name in the relay's configuration.
    pub fn name(self) -> &'static str {
        match self {
            Verify::All => "all",
            Verify::Sample => "sample",
            Verify::None => "none",
        }
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Platforms, named `p01`, `p02`, ...
    pub platforms: usize,
    /// Verification policy.
    pub verify: Verify,
    /// With `sample`.
    pub sample_fraction: f64,
    /// TOML sections added to the configuration (before the peers), e.g. lane TTLs.
    pub extra_toml: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            platforms: 4,
            verify: Verify::All,
            sample_fraction: 0.01,
            extra_toml: String::new(),
        }
    }
}

/// A written set-up.
#[derive(Debug, Clone)]
pub struct Written {
    /// The configuration file.
    pub config: PathBuf,
    /// The certificate clients must trust.
    pub ca: PathBuf,
    /// Platform key files, in order.
    pub platforms: Vec<KeyFile>,
    /// The broadcaster's key file (`b01`), for campaigns.
    pub broadcasters: Vec<KeyFile>,
    /// Where the relay keeps its store.
    pub store_dir: PathBuf,
}

/// The name of platform `i` (0-based).
pub fn platform_name(i: usize) -> String {
    format!("p{:02}", i + 1)
}

/// Writes a set-up into `dir` (created if needed).
pub fn write(dir: &Path, settings: &Settings) -> std::io::Result<Written> {
    std::fs::create_dir_all(dir.join("keys"))?;
    std::fs::create_dir_all(dir.join("tls"))?;
    let mut rng = rand::rngs::OsRng;
    let relay = SigningKey::generate(&mut rng);
    std::fs::write(
        dir.join("keys/relay.key"),
        KeyFile::new("relay", relay.clone(), None).to_text(),
    )?;
    let mut peers = String::new();
    let mut platforms = Vec::new();
    for i in 0..settings.platforms {
        let name = platform_name(i);
        let key = SigningKey::generate(&mut rng);
        let file = KeyFile::new(&name, key.clone(), Some(relay.verifying_key()));
        std::fs::write(dir.join(format!("keys/{name}.key")), file.to_text())?;
        let _ = write!(
            peers,
            "\n[[peers]]\nid = \"{name}\"\nrole = \"platform\"\nkeys = [\"{}\"]\n",
            hex::encode(key.verifying_key().as_bytes())
        );
        platforms.push(file);
    }
    // One broadcaster, for `stress bulk`.
    let key = SigningKey::generate(&mut rng);
    let broadcaster = KeyFile::new(BROADCASTER, key.clone(), Some(relay.verifying_key()));
    std::fs::write(
        dir.join(format!("keys/{BROADCASTER}.key")),
        broadcaster.to_text(),
    )?;
    let _ = write!(
        peers,
        "\n[[peers]]\nid = \"{BROADCASTER}\"\nrole = \"broadcaster\"\nkeys = [\"{}\"]\n",
        hex::encode(key.verifying_key().as_bytes())
    );
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .map_err(std::io::Error::other)?;
    std::fs::write(dir.join("tls/cert.pem"), cert.cert.pem())?;
    std::fs::write(dir.join("tls/key.pem"), cert.signing_key.serialize_pem())?;
    let text = format!(
        "# Written by `stress` for one run.\n\
         relay_id = \"relay-stress\"\n\
         data_dir = \".\"\n\
         relay_key = \"keys/relay.key\"\n\n\
         [listen]\nquic = \"127.0.0.1:0\"\nws = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [tls]\ncert = \"tls/cert.pem\"\nkey = \"tls/key.pem\"\n\n\
         [verify]\npolicy = \"{}\"\nsample_fraction = {}\n\n\
         [log]\nformat = \"human\"\nfilter = \"warn\"\n\n\
         {}\n{peers}",
        settings.verify.name(),
        settings.sample_fraction,
        settings.extra_toml,
    );
    let config = dir.join("relay.toml");
    std::fs::write(&config, text)?;
    Ok(Written {
        config,
        ca: dir.join("tls/cert.pem"),
        platforms,
        broadcasters: vec![broadcaster],
        store_dir: dir.join("store"),
    })
}

/// The peer id of the broadcaster in a set-up written here.
pub const BROADCASTER: &str = "b01";

/// The platforms of an existing set-up: key files in `keys_dir` (not the relay's own), keeping
/// only peers that `config` (if given) lists as platforms; sorted by name.
pub fn read_platforms(keys_dir: &Path, config: Option<&Path>) -> Result<Vec<KeyFile>, String> {
    read_peers(keys_dir, config, "platform")
}

/// The key files in `keys_dir` of peers that `config` lists with `role`; without a
/// configuration, every key file but the relay's (the roles cannot be told apart then).
pub fn read_peers(
    keys_dir: &Path,
    config: Option<&Path>,
    role: &str,
) -> Result<Vec<KeyFile>, String> {
    let roles: Option<Vec<(String, String)>> = match config {
        Some(path) => Some(peer_roles(path)?),
        None => None,
    };
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(keys_dir).map_err(|e| format!("{}: {e}", keys_dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("key") {
            continue;
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let key = KeyFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if key.peer == "relay" {
            continue;
        }
        if let Some(roles) = &roles
            && !roles.iter().any(|(id, r)| *id == key.peer && r == role)
        {
            continue;
        }
        out.push(key);
    }
    out.sort_by(|a, b| a.peer.cmp(&b.peer));
    Ok(out)
}

/// `(id, role)` of every `[[peers]]` entry of a relay configuration.
pub fn peer_roles(config: &Path) -> Result<Vec<(String, String)>, String> {
    let value = read_toml(config)?;
    Ok(value
        .get("peers")
        .and_then(|p| p.as_array())
        .map(|peers| {
            peers
                .iter()
                .filter_map(|p| {
                    Some((
                        p.get("id")?.as_str()?.to_string(),
                        p.get("role")?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The admin address and the data directory a relay configuration names.
pub fn admin_and_data_dir(config: &Path) -> Result<(Option<String>, PathBuf), String> {
    let value = read_toml(config)?;
    let admin = value
        .get("listen")
        .and_then(|l| l.get("admin"))
        .and_then(|a| a.as_str())
        .map(str::to_string);
    let base = config.parent().unwrap_or(Path::new("."));
    let data = value
        .get("data_dir")
        .and_then(|d| d.as_str())
        .map_or_else(|| base.to_path_buf(), |d| base.join(d));
    Ok((admin, data))
}

fn read_toml(config: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
    toml::from_str::<toml::Table>(&text).map_err(|e| format!("{}: {e}", config.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_set_up_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let w = write(
            dir.path(),
            &Settings {
                platforms: 3,
                extra_toml: "[lanes.chat]\ndefault_ttl_s = 1\nmax_ttl_s = 1\n".into(),
                ..Settings::default()
            },
        )
        .unwrap();
        assert_eq!(w.platforms.len(), 3);
        let back = read_platforms(&dir.path().join("keys"), Some(&w.config)).unwrap();
        let names: Vec<_> = back.iter().map(|k| k.peer.as_str()).collect();
        assert_eq!(names, ["p01", "p02", "p03"]);
        let (admin, data) = admin_and_data_dir(&w.config).unwrap();
        assert_eq!(admin.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(data, dir.path().join("."));
    }
}
