//! The peer registry: who may connect, with which keys, in which role, with which limits.
//!
//! It is immutable once built; SIGHUP builds a new one and publishes it through a `watch`
//! channel, so sessions see a consistent registry and notice revocations at once.

use crate::config::Peer;
use bytes::Bytes;
use ed25519_dalek::VerifyingKey;
use federation_spec::handshake::PeerDirectory;
use federation_spec::proto::{PeerKeys, Role};
use std::collections::HashMap;
use std::sync::Arc;

/// The peers known to the relay.
#[derive(Debug, Default)]
pub struct Registry {
    peers: HashMap<String, Peer>,
}

/// Receives each new registry.
pub type RegistryWatch = tokio::sync::watch::Receiver<Arc<Registry>>;

impl Registry {
    /// A registry of these (already checked) peers.
    pub fn new(peers: Vec<Peer>) -> Self {
        Self {
            peers: peers.into_iter().map(|p| (p.id.clone(), p)).collect(),
        }
    }

    /// The peer with that id.
    pub fn get(&self, id: &str) -> Option<&Peer> {
        self.peers.get(id)
    }

    /// Every peer, sorted by id.
    pub fn peers(&self) -> Vec<&Peer> {
        let mut all: Vec<&Peer> = self.peers.values().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// True while `key` is a registered key of `peer`.
    pub fn key_valid(&self, peer: &str, key: &VerifyingKey) -> bool {
        self.peers.get(peer).is_some_and(|p| p.keys.contains(key))
    }

    /// True if `id` is a platform (a destination for messages).
    pub fn is_platform(&self, id: &str) -> bool {
        self.peers.get(id).is_some_and(|p| p.role == Role::Platform)
    }

    /// Every peer's keys, for Welcome.directory.
    pub fn directory(&self) -> Vec<PeerKeys> {
        self.peers()
            .into_iter()
            .map(|p| PeerKeys {
                peer: p.id.clone(),
                role: p.role as i32,
                keys: p
                    .keys
                    .iter()
                    .map(|k| Bytes::copy_from_slice(k.as_bytes()))
                    .collect(),
            })
            .collect()
    }
}

impl PeerDirectory for Registry {
    fn lookup(&self, peer: &str) -> Option<(Role, Vec<VerifyingKey>)> {
        self.peers.get(peer).map(|p| (p.role, p.keys.clone()))
    }
}
