//! Origin-signature checks of incoming messages against `Welcome.directory` (SPEC.md 6.7).
//!
//! A message is verified when its `signer` is a key the directory lists for the platform of
//! `Envelope.from`, and the signature over the envelope bytes verifies with it. Signatures
//! of a batch of frames read together are verified with one batch check.

use ed25519_dalek::VerifyingKey;
use federation_spec::proto::PeerKeys;
use federation_spec::signing::{SignedEnvelope, parse_public_key, parse_signature, verify_batch};
use std::collections::HashMap;

/// Which peer owns which key, from the session's `Welcome`. Keys are parsed once here:
/// decompressing a key per message would cost a third of a verification.
#[derive(Debug, Default, Clone)]
pub(crate) struct Directory {
    owners: HashMap<[u8; 32], (String, VerifyingKey)>,
}

/// One envelope to verify.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim<'a> {
    /// `Envelope.from`.
    pub(crate) from: &'a str,
    /// The envelope bytes as carried.
    pub(crate) envelope: &'a [u8],
    /// `signature` field.
    pub(crate) signature: &'a [u8],
    /// `signer` field.
    pub(crate) signer: &'a [u8],
}

impl Directory {
    pub(crate) fn new(peers: &[PeerKeys]) -> Self {
        let mut owners = HashMap::new();
        for peer in peers {
            for key in &peer.keys {
                if let (Ok(bytes), Some(parsed)) =
                    (<[u8; 32]>::try_from(key.as_ref()), parse_public_key(key))
                {
                    owners.insert(bytes, (peer.peer.clone(), parsed));
                }
            }
        }
        Self { owners }
    }

    /// The peer that owns `key`, if the directory lists it.
    pub(crate) fn owner(&self, key: &[u8]) -> Option<&str> {
        let key: [u8; 32] = key.try_into().ok()?;
        self.owners.get(&key).map(|(owner, _)| owner.as_str())
    }

    fn parsed(&self, key: &[u8]) -> Option<VerifyingKey> {
        let key: [u8; 32] = key.try_into().ok()?;
        self.owners.get(&key).map(|(_, parsed)| *parsed)
    }

    /// Which of the claims verify.
    pub(crate) fn verify(&self, claims: &[Claim<'_>]) -> Vec<bool> {
        let mut result = vec![false; claims.len()];
        let mut batch = Vec::with_capacity(claims.len());
        let mut index = Vec::with_capacity(claims.len());
        for (i, claim) in claims.iter().enumerate() {
            let platform = claim.from.rsplit_once('@').map(|(_, p)| p);
            let owned = platform.is_some() && self.owner(claim.signer) == platform;
            let signer = self.parsed(claim.signer);
            let signature = parse_signature(claim.signature);
            if let (true, Some(signer), Some(signature)) = (owned, signer, signature) {
                batch.push(SignedEnvelope {
                    envelope: claim.envelope,
                    signature,
                    signer,
                });
                index.push(i);
            }
        }
        for (i, ok) in index.into_iter().zip(verify_batch(&batch)) {
            result[i] = ok;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ed25519_dalek::SigningKey;
    use federation_spec::proto::Role;
    use federation_spec::signing::sign_envelope;

    #[test]
    fn verifies_owner_and_signature() {
        let alpha = SigningKey::from_bytes(&[1; 32]);
        let beta = SigningKey::from_bytes(&[2; 32]);
        let dir = Directory::new(&[
            PeerKeys {
                peer: "alpha".into(),
                role: Role::Platform as i32,
                keys: vec![Bytes::copy_from_slice(alpha.verifying_key().as_bytes())],
            },
            PeerKeys {
                peer: "beta".into(),
                role: Role::Platform as i32,
                keys: vec![Bytes::copy_from_slice(beta.verifying_key().as_bytes())],
            },
        ]);
        let env = b"envelope";
        let sig_a = sign_envelope(&alpha, env).to_bytes();
        let sig_b = sign_envelope(&beta, env).to_bytes();
        let ka = alpha.verifying_key().to_bytes();
        let kb = beta.verifying_key().to_bytes();
        fn claim<'a>(from: &'a str, signature: &'a [u8], signer: &'a [u8]) -> Claim<'a> {
            Claim {
                from,
                envelope: b"envelope",
                signature,
                signer,
            }
        }
        let result = dir.verify(&[
            claim("ali@alpha", &sig_a, &ka),
            claim("ali@alpha", &sig_b, &kb), // beta's key claiming to be alpha
            claim("bo@beta", &sig_a, &kb),   // wrong signature
            claim("bo@beta", &sig_b, &kb),
            claim("nobody", &sig_b, &kb),
        ]);
        assert_eq!(result, vec![true, false, false, true, false]);
        assert_eq!(dir.owner(&ka), Some("alpha"));
        assert_eq!(dir.owner(&[0; 31]), None);
    }
}
