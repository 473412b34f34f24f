//! The key file the tools share: which peer it is, its secret key, and optionally the
//! relay's public key to pin. One `key = value` a line, `#` starts a comment:
//!
//! ```text
//! # relay federation key file
//! peer = alpha
//! secret_key = <64 hex digits: the 32-byte ed25519 seed>
//! public_key = <64 hex digits>
//! relay_key = <64 hex digits>
//! ```
//!
//! `public_key` is written for the reader's convenience and checked against the secret key.

use ed25519_dalek::{SigningKey, VerifyingKey};

/// A parsed key file.
#[derive(Clone)]
pub struct KeyFile {
    /// The peer this key belongs to.
    pub peer: String,
    /// The peer's secret key.
    pub secret: SigningKey,
    /// The relay key to pin, if known.
    pub relay_key: Option<VerifyingKey>,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("peer", &self.peer)
            .field(
                "public_key",
                &hex::encode(self.secret.verifying_key().as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

/// Why a key file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// A required line is absent.
    #[error("missing `{0}`")]
    Missing(&'static str),
    /// A line is not `key = value`, or names an unknown key.
    #[error("line {line}: {detail}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// A key is not 64 hex digits of a valid key.
    #[error("`{field}` is not a valid ed25519 key (64 hex digits)")]
    BadKey {
        /// The field.
        field: &'static str,
    },
    /// `public_key` does not belong to `secret_key`.
    #[error("public_key does not match secret_key")]
    Mismatch,
    /// The peer id is not valid.
    #[error("peer: {0}")]
    BadPeer(#[from] crate::address::AddressError),
}

impl KeyFile {
    /// A key file for `peer` with this secret.
    pub fn new(peer: &str, secret: SigningKey, relay_key: Option<VerifyingKey>) -> Self {
        Self {
            peer: peer.to_string(),
            secret,
            relay_key,
        }
    }

    /// Parses the text of a key file.
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let (mut peer, mut secret, mut public, mut relay) = (None, None, None, None);
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| KeyFileError::Syntax {
                line: i + 1,
                detail: "expected `key = value`".into(),
            })?;
            let value = value.trim().to_string();
            match key.trim() {
                "peer" => peer = Some(value),
                "secret_key" => secret = Some(value),
                "public_key" => public = Some(value),
                "relay_key" => relay = Some(value),
                other => {
                    return Err(KeyFileError::Syntax {
                        line: i + 1,
                        detail: format!("unknown key `{other}`"),
                    });
                }
            }
        }
        let peer = peer.ok_or(KeyFileError::Missing("peer"))?;
        crate::address::check_peer_id(&peer)?;
        let seed = hex32(&secret.ok_or(KeyFileError::Missing("secret_key"))?).ok_or(
            KeyFileError::BadKey {
                field: "secret_key",
            },
        )?;
        let secret = SigningKey::from_bytes(&seed);
        if let Some(public) = public {
            let public = hex32(&public).ok_or(KeyFileError::BadKey {
                field: "public_key",
            })?;
            if public != secret.verifying_key().to_bytes() {
                return Err(KeyFileError::Mismatch);
            }
        }
        let relay_key = match relay {
            None => None,
            Some(text) => Some(
                hex32(&text)
                    .and_then(|b| crate::signing::parse_public_key(&b))
                    .ok_or(KeyFileError::BadKey { field: "relay_key" })?,
            ),
        };
        Ok(Self {
            peer,
            secret,
            relay_key,
        })
    }

    /// The text of the key file.
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "# relay federation key file: keep it secret\npeer = {}\nsecret_key = {}\npublic_key = {}\n",
            self.peer,
            hex::encode(self.secret.to_bytes()),
            hex::encode(self.secret.verifying_key().to_bytes()),
        );
        if let Some(relay) = &self.relay_key {
            text.push_str(&format!("relay_key = {}\n", hex::encode(relay.to_bytes())));
        }
        text
    }
}

/// Parses 64 hex digits into 32 bytes.
pub fn hex32(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let kf = KeyFile::new(
            "alpha",
            SigningKey::from_bytes(&[3; 32]),
            Some(SigningKey::from_bytes(&[4; 32]).verifying_key()),
        );
        let parsed = KeyFile::parse(&kf.to_text()).unwrap();
        assert_eq!(parsed.peer, "alpha");
        assert_eq!(parsed.secret.to_bytes(), [3; 32]);
        assert_eq!(parsed.relay_key, kf.relay_key);
        assert_eq!(
            KeyFile::parse("peer = alpha").unwrap_err(),
            KeyFileError::Missing("secret_key")
        );
        let bad = kf.to_text().replace("public_key = ", "public_key = 00");
        assert_eq!(
            KeyFile::parse(&bad).unwrap_err(),
            KeyFileError::BadKey {
                field: "public_key"
            }
        );
        assert!(matches!(
            KeyFile::parse("nonsense"),
            Err(KeyFileError::Syntax { line: 1, .. })
        ));
    }
}
