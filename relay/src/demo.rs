//! The first-start set-up: with no configuration, `relay` writes one into its data dir with
//! three demo platforms (`alpha`, `beta`, `gamma`), one broadcaster (`news`), their key
//! files, the relay's key and a self-signed certificate, so that a newcomer sees messages
//! flow with two commands.

use ed25519_dalek::SigningKey;
use federation_spec::keyfile::KeyFile;
use std::path::{Path, PathBuf};

/// The demo peers and their roles.
pub const DEMO_PEERS: [(&str, &str); 4] = [
    ("alpha", "platform"),
    ("beta", "platform"),
    ("gamma", "platform"),
    ("news", "broadcaster"),
];

/// Where the configuration of `data_dir` lives.
pub fn config_path(data_dir: &Path) -> PathBuf {
    data_dir.join("relay.toml")
}

/// Writes the demo set-up into `data_dir` unless a configuration is already there.
/// Returns true if it wrote one.
pub fn bootstrap(data_dir: &Path) -> std::io::Result<bool> {
    let config = config_path(data_dir);
    if config.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(data_dir.join("keys"))?;
    std::fs::create_dir_all(data_dir.join("tls"))?;
    let mut rng = rand::rngs::OsRng;
    let relay = SigningKey::generate(&mut rng);
    write_secret(
        &data_dir.join("keys/relay.key"),
        &KeyFile::new("relay", relay.clone(), None).to_text(),
    )?;

    let mut peers = String::new();
    for (name, role) in DEMO_PEERS {
        let key = SigningKey::generate(&mut rng);
        let file = KeyFile::new(name, key.clone(), Some(relay.verifying_key()));
        write_secret(&data_dir.join(format!("keys/{name}.key")), &file.to_text())?;
        peers.push_str(&format!(
            "\n[[peers]]\nid = \"{name}\"\nrole = \"{role}\"\nkeys = [\"{}\"]\n",
            hex::encode(key.verifying_key().as_bytes())
        ));
    }

    let (cert, key) = crate::tls::self_signed().map_err(std::io::Error::other)?;
    std::fs::write(data_dir.join("tls/cert.pem"), cert)?;
    write_secret(&data_dir.join("tls/key.pem"), &key)?;

    let text = format!(
        "# Written by the relay on its first start: a demo set-up on loopback.\n\
         # `relay config-example` prints every setting with its meaning.\n\
         relay_id = \"relay-demo\"\n\
         data_dir = \".\"\n\
         relay_key = \"keys/relay.key\"\n\n\
         [listen]\nquic = \"127.0.0.1:7700\"\nws = \"127.0.0.1:7701\"\nadmin = \"127.0.0.1:7702\"\n\n\
         [tls]\ncert = \"tls/cert.pem\"\nkey = \"tls/key.pem\"\n{peers}"
    );
    std::fs::write(&config, text)?;
    Ok(true)
}

fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_writes_a_loadable_config_once() {
        let dir = tempfile::tempdir().unwrap();
        assert!(bootstrap(dir.path()).unwrap());
        assert!(
            !bootstrap(dir.path()).unwrap(),
            "second start keeps the existing set-up"
        );
        let loaded = crate::config::load(&config_path(dir.path())).unwrap();
        assert_eq!(loaded.peers.len(), 4);
        let alpha =
            KeyFile::parse(&std::fs::read_to_string(dir.path().join("keys/alpha.key")).unwrap())
                .unwrap();
        assert_eq!(loaded.peers[0].keys, vec![alpha.secret.verifying_key()]);
        assert!(alpha.relay_key.is_some());
        crate::tls::server_config(
            &dir.path().join("tls/cert.pem"),
            &dir.path().join("tls/key.pem"),
            &[b"x"],
        )
        .unwrap();
    }
}
