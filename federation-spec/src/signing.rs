//! What is signed, and signing and verification with ed25519 (SPEC.md sections 5.4 and 6.2).
//!
//! Every signed byte string starts with a context string and a zero byte, so a signature made
//! for one purpose can never be presented as one for another (a handshake signature as a
//! message signature, say).
//!
//! Verification is RFC 8032 ed25519 as ed25519-dalek's `verify` and `verify_batch` do it, the
//! same rule one by one and in batches, so a relay that batches and a destination that does
//! not always agree.
//!
//! Origin signatures cover the envelope bytes exactly as carried on the wire. Nobody
//! re-encodes an envelope, so there is no canonical-encoding problem across languages.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// Context of an origin signature over an envelope.
pub const MESSAGE_CONTEXT: &[u8] = b"relay-fed/v1 message";
/// Context of the relay's signature in Challenge.
pub const CHALLENGE_CONTEXT: &[u8] = b"relay-fed/v1 challenge";
/// Context of the peer's signature in Auth.
pub const AUTH_CONTEXT: &[u8] = b"relay-fed/v1 auth";

/// Bytes of an ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The bytes an origin signs: `MESSAGE_CONTEXT || 0x00 || envelope`.
pub fn message_tbs(envelope: &[u8]) -> Vec<u8> {
    let mut tbs = Vec::with_capacity(MESSAGE_CONTEXT.len() + 1 + envelope.len());
    tbs.extend_from_slice(MESSAGE_CONTEXT);
    tbs.push(0);
    tbs.extend_from_slice(envelope);
    tbs
}

/// Signs an encoded envelope as its origin.
pub fn sign_envelope(key: &SigningKey, envelope: &[u8]) -> Signature {
    key.sign(&message_tbs(envelope))
}

/// Verifies an origin signature over an encoded envelope.
pub fn verify_envelope(key: &VerifyingKey, envelope: &[u8], signature: &Signature) -> bool {
    key.verify(&message_tbs(envelope), signature).is_ok()
}

/// Parses a 32-byte public key from the wire. Weak (small-order) keys are refused: with them
/// one signature verifies for many messages.
pub fn parse_public_key(bytes: &[u8]) -> Option<VerifyingKey> {
    let array: &[u8; PUBLIC_KEY_LEN] = bytes.try_into().ok()?;
    VerifyingKey::from_bytes(array)
        .ok()
        .filter(|k| !k.is_weak())
}

/// Parses a 64-byte signature from the wire.
pub fn parse_signature(bytes: &[u8]) -> Option<Signature> {
    Signature::from_slice(bytes).ok()
}

/// One envelope signature to check.
#[derive(Debug, Clone, Copy)]
pub struct SignedEnvelope<'a> {
    /// The envelope bytes as carried.
    pub envelope: &'a [u8],
    /// The origin's signature.
    pub signature: Signature,
    /// The key that claims to have signed.
    pub signer: VerifyingKey,
}

/// Verifies many envelope signatures at once and says which are valid.
///
/// Batch verification costs about half of verifying one by one; when the batch fails (at
/// least one bad signature) the halves are retried, so a few forgeries in a large batch cost
/// a few extra batch checks rather than a full one-by-one pass.
pub fn verify_batch(items: &[SignedEnvelope<'_>]) -> Vec<bool> {
    let mut valid = vec![false; items.len()];
    let tbs: Vec<Vec<u8>> = items.iter().map(|i| message_tbs(i.envelope)).collect();
    verify_range(items, &tbs, 0, items.len(), &mut valid);
    valid
}

fn verify_range(
    items: &[SignedEnvelope<'_>],
    tbs: &[Vec<u8>],
    start: usize,
    end: usize,
    valid: &mut [bool],
) {
    let len = end - start;
    if len == 0 {
        return;
    }
    if len <= 2 {
        for i in start..end {
            valid[i] = items[i].signer.verify(&tbs[i], &items[i].signature).is_ok();
        }
        return;
    }
    let messages: Vec<&[u8]> = tbs[start..end].iter().map(Vec::as_slice).collect();
    let signatures: Vec<Signature> = items[start..end].iter().map(|i| i.signature).collect();
    let keys: Vec<VerifyingKey> = items[start..end].iter().map(|i| i.signer).collect();
    if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
        valid[start..end].iter_mut().for_each(|v| *v = true);
        return;
    }
    let mid = start + len / 2;
    verify_range(items, tbs, start, mid, valid);
    verify_range(items, tbs, mid, end, valid);
}

/// The handshake transcript fields shared by both signatures.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    /// The channel binding (TLS exporter output, or zeros without TLS).
    pub binding: &'a [u8; 32],
    /// Hello.client_nonce.
    pub client_nonce: &'a [u8; 32],
    /// Challenge.relay_nonce.
    pub relay_nonce: &'a [u8; 32],
    /// The negotiated version.
    pub version: u32,
    /// The peer id claimed in Hello (at most 32 bytes, checked before this is built).
    pub peer: &'a str,
}

impl Transcript<'_> {
    fn common(&self, context: &[u8], extra: usize) -> Vec<u8> {
        let mut tbs = Vec::with_capacity(context.len() + 1 + 96 + 4 + 1 + self.peer.len() + extra);
        tbs.extend_from_slice(context);
        tbs.push(0);
        tbs.extend_from_slice(self.binding);
        tbs.extend_from_slice(self.client_nonce);
        tbs.extend_from_slice(self.relay_nonce);
        tbs.extend_from_slice(&self.version.to_be_bytes());
        // Peer ids are at most 32 bytes (checked when Hello is read), so one byte holds it.
        tbs.push(self.peer.len() as u8);
        tbs.extend_from_slice(self.peer.as_bytes());
        tbs
    }

    /// What the relay signs in Challenge.
    pub fn challenge_tbs(&self) -> Vec<u8> {
        self.common(CHALLENGE_CONTEXT, 0)
    }

    /// What the peer signs in Auth.
    pub fn auth_tbs(&self, relay_key: &[u8; 32], public_key: &[u8; 32]) -> Vec<u8> {
        let mut tbs = self.common(AUTH_CONTEXT, 64);
        tbs.extend_from_slice(relay_key);
        tbs.extend_from_slice(public_key);
        tbs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn batch_finds_the_forgeries() {
        let envelopes: Vec<Vec<u8>> = (0..37u8).map(|i| vec![i; 40]).collect();
        let mut items: Vec<SignedEnvelope> = envelopes
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let k = key(i as u8 % 3);
                SignedEnvelope {
                    envelope: e,
                    signature: sign_envelope(&k, e),
                    signer: k.verifying_key(),
                }
            })
            .collect();
        assert!(verify_batch(&items).iter().all(|v| *v));
        // Forge 3: a signature by the wrong key, and two signatures moved to other envelopes.
        items[5].signer = key(9).verifying_key();
        items[20].signature = items[21].signature;
        items[36].signature = items[0].signature;
        let valid = verify_batch(&items);
        let bad: Vec<usize> = valid
            .iter()
            .enumerate()
            .filter(|(_, v)| !**v)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(bad, vec![5, 20, 36]);
    }

    #[test]
    fn contexts_separate_purposes() {
        let k = key(1);
        let env = b"abc";
        let sig = sign_envelope(&k, env);
        assert!(verify_envelope(&k.verifying_key(), env, &sig));
        // The same bytes signed without the context do not verify as a message signature.
        let raw = k.sign(env);
        assert!(!verify_envelope(&k.verifying_key(), env, &raw));
    }
}
