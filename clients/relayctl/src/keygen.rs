//! `relayctl keygen`: a new ed25519 key in the shared key file format.

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use federation_spec::address::check_peer_id;
use federation_spec::keyfile::{KeyFile, hex32};
use federation_spec::signing::parse_public_key;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the key file (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// The peer id the key belongs to. Default: the file name without extension.
    #[arg(long)]
    peer: Option<String>,
    /// The relay's public key to pin (64 hex digits).
    #[arg(long)]
    relay_key: Option<String>,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
}

/// The peer id: given, or the file stem when that is a valid peer id.
fn peer_id(args: &Args) -> anyhow::Result<String> {
    let peer = match &args.peer {
        Some(peer) => peer.clone(),
        None => args
            .out
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
            .context("give the peer id with --peer")?,
    };
    check_peer_id(&peer).with_context(|| {
        format!("peer id {peer:?} (1-32 of a-z 0-9 -, not starting with -); give it with --peer")
    })?;
    Ok(peer)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let peer = peer_id(&args)?;
    let relay_key = match &args.relay_key {
        None => None,
        Some(text) => Some(
            hex32(text)
                .and_then(|b| parse_public_key(&b))
                .context("--relay-key is not a valid ed25519 public key (64 hex digits)")?,
        ),
    };
    let secret = SigningKey::generate(&mut rand::rngs::OsRng);
    let public = hex::encode(secret.verifying_key().as_bytes());
    let file = KeyFile::new(&peer, secret, relay_key);
    write_secret(&args.out, file.to_text().as_bytes(), args.force)?;
    println!("{public}");
    Ok(ExitCode::SUCCESS)
}

/// Writes a file only its owner can read.
fn write_secret(path: &Path, bytes: &[u8], force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!("{} exists (use --force to overwrite)", path.display());
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(out: &str, peer: Option<&str>) -> Args {
        Args {
            out: out.into(),
            peer: peer.map(str::to_string),
            relay_key: None,
            force: false,
        }
    }

    #[test]
    fn peer_defaults_to_the_file_stem() {
        assert_eq!(peer_id(&args("keys/alpha.key", None)).unwrap(), "alpha");
        assert_eq!(peer_id(&args("x.key", Some("beta-2"))).unwrap(), "beta-2");
        assert!(peer_id(&args("Alpha.key", None)).is_err());
    }

    #[test]
    fn writes_a_parsable_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gamma.key");
        let relay = hex::encode(SigningKey::from_bytes(&[1; 32]).verifying_key().as_bytes());
        let a = Args {
            out: path.clone(),
            peer: None,
            relay_key: Some(relay),
            force: false,
        };
        run(a).unwrap();
        let parsed = KeyFile::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(parsed.peer, "gamma");
        assert!(parsed.relay_key.is_some());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(
            run(args(path.to_str().unwrap(), None)).is_err(),
            "no overwrite"
        );
    }
}
