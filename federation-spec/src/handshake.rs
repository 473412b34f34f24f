//! The handshake (SPEC.md section 5) as two state machines, one per end, with no I/O.
//!
//! ```text
//!   peer                                   relay
//!   Hello{versions, peer, client_nonce} ->
//!                     <- Challenge{version, relay_nonce, relay_key, relay_signature, binding}
//!   Auth{public_key, signature}         ->
//!                     <- Welcome{session_id, role, limits, lanes, directory}   (or Goaway)
//! ```
//!
//! Each side signs a transcript that contains both nonces and the channel binding, so a
//! recorded handshake is useless on another connection. The caller supplies the randomness
//! (nonces) and the binding, which keeps these machines deterministic for tests and vectors;
//! timeouts belong to the I/O shell.

use crate::address::check_peer_id;
use crate::proto::{Auth, Binding, Challenge, Frame, Goaway, Hello, Role, Welcome, frame::Kind};
use crate::signing::{Transcript, parse_public_key, parse_signature};
use crate::{PROTOCOL_VERSION, ProtocolError};
use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

/// Longest Hello.agent, in bytes.
pub const MAX_AGENT_LEN: usize = 64;

/// What the handshake signatures are bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelBinding {
    /// TLS exporter, or none.
    pub kind: Binding,
    /// The 32 bytes that enter the transcripts.
    pub value: [u8; 32],
}

impl ChannelBinding {
    /// No TLS under the connection: 32 zero bytes.
    pub fn none() -> Self {
        Self {
            kind: Binding::None,
            value: [0; 32],
        }
    }

    /// The TLS exporter output of this connection.
    pub fn tls_exporter(value: [u8; 32]) -> Self {
        Self {
            kind: Binding::TlsExporter,
            value,
        }
    }
}

/// The relay's view of who may connect.
pub trait PeerDirectory {
    /// The role and registered keys of `peer`, or `None` if the relay does not know it.
    fn lookup(&self, peer: &str) -> Option<(Role, Vec<VerifyingKey>)>;
}

/// A peer that proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// Its peer id.
    pub peer: String,
    /// What it may do.
    pub role: Role,
    /// The key it proved; revoking this key ends the session.
    pub key: VerifyingKey,
    /// Its receive window (0 = the relay's default).
    pub receive_window: u32,
    /// The negotiated version.
    pub version: u32,
    /// Hello.agent, for logs.
    pub agent: String,
}

/// What the relay does next.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerStep {
    /// Send this frame and wait for the next one.
    Reply(Frame),
    /// The peer is authenticated: send it a Welcome.
    Authenticated(Authenticated),
}

#[derive(Debug)]
enum ServerState {
    AwaitHello,
    AwaitAuth {
        peer: String,
        client_nonce: [u8; 32],
        version: u32,
        agent: String,
    },
    Done,
}

/// The relay's end of the handshake.
#[derive(Debug)]
pub struct ServerHandshake {
    relay_key: SigningKey,
    relay_id: String,
    binding: ChannelBinding,
    relay_nonce: [u8; 32],
    state: ServerState,
}

impl ServerHandshake {
    /// A handshake for one connection, with a fresh random `relay_nonce`.
    pub fn new(
        relay_key: SigningKey,
        relay_id: impl Into<String>,
        binding: ChannelBinding,
        relay_nonce: [u8; 32],
    ) -> Self {
        Self {
            relay_key,
            relay_id: relay_id.into(),
            binding,
            relay_nonce,
            state: ServerState::AwaitHello,
        }
    }

    /// Feeds the next frame from the peer. An error is final: send its Goaway and close.
    pub fn handle(
        &mut self,
        frame: Frame,
        directory: &impl PeerDirectory,
    ) -> Result<ServerStep, ProtocolError> {
        let state = std::mem::replace(&mut self.state, ServerState::Done);
        match (state, frame.kind) {
            (ServerState::AwaitHello, Some(Kind::Hello(hello))) => self.on_hello(hello),
            (
                ServerState::AwaitAuth {
                    peer,
                    client_nonce,
                    version,
                    agent,
                },
                Some(Kind::Auth(auth)),
            ) => {
                let transcript = Transcript {
                    binding: &self.binding.value,
                    client_nonce: &client_nonce,
                    relay_nonce: &self.relay_nonce,
                    version,
                    peer: &peer,
                };
                let key = parse_public_key(&auth.public_key).ok_or(ProtocolError::AuthFailed(
                    "public_key is not a valid ed25519 key",
                ))?;
                let signature = parse_signature(&auth.signature)
                    .ok_or(ProtocolError::AuthFailed("signature is not 64 bytes"))?;
                // Unknown peer and unregistered key read the same to the peer, so the
                // handshake cannot be used to find out which peers exist.
                let (role, keys) = directory
                    .lookup(&peer)
                    .ok_or(ProtocolError::AuthFailed("unknown peer or key"))?;
                if !keys.contains(&key) {
                    return Err(ProtocolError::AuthFailed("unknown peer or key"));
                }
                let tbs =
                    transcript.auth_tbs(self.relay_key.verifying_key().as_bytes(), key.as_bytes());
                if key.verify_strict(&tbs, &signature).is_err() {
                    return Err(ProtocolError::AuthFailed("auth signature does not verify"));
                }
                Ok(ServerStep::Authenticated(Authenticated {
                    peer,
                    role,
                    key,
                    receive_window: auth.receive_window,
                    version,
                    agent,
                }))
            }
            (ServerState::Done, _) => Err(ProtocolError::UnexpectedFrame("handshake already over")),
            (_, None) => Err(ProtocolError::UnexpectedFrame(
                "unknown frame during the handshake",
            )),
            (ServerState::AwaitHello, Some(_)) => {
                Err(ProtocolError::UnexpectedFrame("expected hello"))
            }
            (ServerState::AwaitAuth { .. }, Some(_)) => {
                Err(ProtocolError::UnexpectedFrame("expected auth"))
            }
        }
    }

    fn on_hello(&mut self, hello: Hello) -> Result<ServerStep, ProtocolError> {
        if !hello.versions.contains(&PROTOCOL_VERSION) {
            return Err(ProtocolError::UnsupportedVersion(hello.versions));
        }
        check_peer_id(&hello.peer)
            .map_err(|_| ProtocolError::AuthFailed("peer id is not valid"))?;
        let client_nonce: [u8; 32] = hello
            .client_nonce
            .as_ref()
            .try_into()
            .map_err(|_| ProtocolError::Malformed("client_nonce must be 32 bytes".into()))?;
        if hello.agent.len() > MAX_AGENT_LEN {
            return Err(ProtocolError::Malformed(
                "agent longer than 64 bytes".into(),
            ));
        }
        let version = PROTOCOL_VERSION;
        let transcript = Transcript {
            binding: &self.binding.value,
            client_nonce: &client_nonce,
            relay_nonce: &self.relay_nonce,
            version,
            peer: &hello.peer,
        };
        let signature = self.relay_key.sign(&transcript.challenge_tbs());
        let challenge = Challenge {
            version,
            relay_id: self.relay_id.clone(),
            relay_nonce: Bytes::copy_from_slice(&self.relay_nonce),
            relay_key: Bytes::copy_from_slice(self.relay_key.verifying_key().as_bytes()),
            relay_signature: Bytes::copy_from_slice(&signature.to_bytes()),
            binding: self.binding.kind as i32,
        };
        self.state = ServerState::AwaitAuth {
            peer: hello.peer,
            client_nonce,
            version,
            agent: hello.agent,
        };
        Ok(ServerStep::Reply(Frame {
            kind: Some(Kind::Challenge(challenge)),
        }))
    }
}

/// What the peer does next.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientStep {
    /// Send this frame and wait for the next one.
    Reply(Frame),
    /// The session is open.
    Established(Welcome),
    /// The relay refused the session.
    Refused(Goaway),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Start,
    AwaitChallenge,
    AwaitWelcome,
    Done,
}

/// The peer's end of the handshake.
#[derive(Debug)]
pub struct ClientHandshake {
    peer: String,
    key: SigningKey,
    relay_key: Option<VerifyingKey>,
    binding: ChannelBinding,
    client_nonce: [u8; 32],
    receive_window: u32,
    agent: String,
    state: ClientState,
}

impl ClientHandshake {
    /// A handshake as `peer` with `key`. With `relay_key` set, a relay presenting another key
    /// is refused (pinning).
    pub fn new(
        peer: impl Into<String>,
        key: SigningKey,
        relay_key: Option<VerifyingKey>,
        binding: ChannelBinding,
        client_nonce: [u8; 32],
    ) -> Self {
        Self {
            peer: peer.into(),
            key,
            relay_key,
            binding,
            client_nonce,
            receive_window: 0,
            agent: String::new(),
            state: ClientState::Start,
        }
    }

    /// Sets the receive window announced in Auth.
    pub fn with_receive_window(mut self, window: u32) -> Self {
        self.receive_window = window;
        self
    }

    /// Sets the software name announced in Hello (cut to 64 bytes).
    pub fn with_agent(mut self, agent: &str) -> Self {
        let mut end = agent.len().min(MAX_AGENT_LEN);
        while !agent.is_char_boundary(end) {
            end -= 1;
        }
        self.agent = agent[..end].to_string();
        self
    }

    /// The first frame to send.
    pub fn hello(&mut self) -> Frame {
        self.state = ClientState::AwaitChallenge;
        Frame {
            kind: Some(Kind::Hello(Hello {
                versions: vec![PROTOCOL_VERSION],
                peer: self.peer.clone(),
                client_nonce: Bytes::copy_from_slice(&self.client_nonce),
                agent: self.agent.clone(),
            })),
        }
    }

    /// Feeds the next frame from the relay. An error is final: close the connection.
    pub fn handle(&mut self, frame: Frame) -> Result<ClientStep, ProtocolError> {
        let state = std::mem::replace(&mut self.state, ClientState::Done);
        match (state, frame.kind) {
            (ClientState::AwaitChallenge | ClientState::AwaitWelcome, Some(Kind::Goaway(g))) => {
                Ok(ClientStep::Refused(g))
            }
            (ClientState::AwaitChallenge, Some(Kind::Challenge(c))) => self.on_challenge(c),
            (ClientState::AwaitWelcome, Some(Kind::Welcome(w))) => Ok(ClientStep::Established(w)),
            (ClientState::Start, _) => Err(ProtocolError::UnexpectedFrame("hello not sent yet")),
            (ClientState::Done, _) => Err(ProtocolError::UnexpectedFrame("handshake already over")),
            (_, None) => Err(ProtocolError::UnexpectedFrame(
                "unknown frame during the handshake",
            )),
            (ClientState::AwaitChallenge, Some(_)) => {
                Err(ProtocolError::UnexpectedFrame("expected challenge"))
            }
            (ClientState::AwaitWelcome, Some(_)) => {
                Err(ProtocolError::UnexpectedFrame("expected welcome"))
            }
        }
    }

    fn on_challenge(&mut self, c: Challenge) -> Result<ClientStep, ProtocolError> {
        if c.version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(vec![c.version]));
        }
        if c.binding != self.binding.kind as i32 {
            return Err(ProtocolError::AuthFailed(
                "channel binding differs from this connection's",
            ));
        }
        let relay_key = parse_public_key(&c.relay_key)
            .ok_or(ProtocolError::AuthFailed("relay_key is not valid"))?;
        if self.relay_key.is_some_and(|pinned| pinned != relay_key) {
            return Err(ProtocolError::AuthFailed("relay key is not the pinned one"));
        }
        let relay_nonce: [u8; 32] = c
            .relay_nonce
            .as_ref()
            .try_into()
            .map_err(|_| ProtocolError::Malformed("relay_nonce must be 32 bytes".into()))?;
        let signature = parse_signature(&c.relay_signature)
            .ok_or(ProtocolError::AuthFailed("relay_signature is not 64 bytes"))?;
        let transcript = Transcript {
            binding: &self.binding.value,
            client_nonce: &self.client_nonce,
            relay_nonce: &relay_nonce,
            version: c.version,
            peer: &self.peer,
        };
        if relay_key
            .verify_strict(&transcript.challenge_tbs(), &signature)
            .is_err()
        {
            return Err(ProtocolError::AuthFailed("relay signature does not verify"));
        }
        let public_key = self.key.verifying_key();
        let tbs = transcript.auth_tbs(relay_key.as_bytes(), public_key.as_bytes());
        let signature = self.key.sign(&tbs);
        self.state = ClientState::AwaitWelcome;
        Ok(ClientStep::Reply(Frame {
            kind: Some(Kind::Auth(Auth {
                public_key: Bytes::copy_from_slice(public_key.as_bytes()),
                signature: Bytes::copy_from_slice(&signature.to_bytes()),
                receive_window: self.receive_window,
            })),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Dir(HashMap<String, (Role, Vec<VerifyingKey>)>);
    impl PeerDirectory for Dir {
        fn lookup(&self, peer: &str) -> Option<(Role, Vec<VerifyingKey>)> {
            self.0.get(peer).cloned()
        }
    }

    fn setup() -> (SigningKey, SigningKey, Dir) {
        let relay = SigningKey::from_bytes(&[1; 32]);
        let alpha = SigningKey::from_bytes(&[2; 32]);
        let dir = Dir(HashMap::from([(
            "alpha".to_string(),
            (Role::Platform, vec![alpha.verifying_key()]),
        )]));
        (relay, alpha, dir)
    }

    /// Runs both machines against each other, as quinn-proto's Pair does for QUIC.
    fn run(
        client: &mut ClientHandshake,
        server: &mut ServerHandshake,
        dir: &Dir,
    ) -> Result<Authenticated, ProtocolError> {
        let hello = client.hello();
        let ServerStep::Reply(challenge) = server.handle(hello, dir)? else {
            panic!("expected challenge")
        };
        let ClientStep::Reply(auth) = client.handle(challenge)? else {
            panic!("expected auth")
        };
        match server.handle(auth, dir)? {
            ServerStep::Authenticated(a) => Ok(a),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn both_ends_agree() {
        let (relay, alpha, dir) = setup();
        let binding = ChannelBinding::tls_exporter([9; 32]);
        let mut c = ClientHandshake::new(
            "alpha",
            alpha.clone(),
            Some(relay.verifying_key()),
            binding,
            [3; 32],
        );
        let mut s = ServerHandshake::new(relay, "relay-1", binding, [4; 32]);
        let a = run(&mut c, &mut s, &dir).unwrap();
        assert_eq!(a.peer, "alpha");
        assert_eq!(a.key, alpha.verifying_key());
        let welcome = Frame {
            kind: Some(Kind::Welcome(Welcome::default())),
        };
        assert!(matches!(c.handle(welcome), Ok(ClientStep::Established(_))));
    }

    #[test]
    fn auth_replayed_on_another_connection_fails() {
        let (relay, alpha, dir) = setup();
        let binding = ChannelBinding::tls_exporter([9; 32]);
        let mut c = ClientHandshake::new("alpha", alpha.clone(), None, binding, [3; 32]);
        let mut s = ServerHandshake::new(relay.clone(), "r", binding, [4; 32]);
        let hello = c.hello();
        let ServerStep::Reply(ch) = s.handle(hello.clone(), &dir).unwrap() else {
            panic!()
        };
        let ClientStep::Reply(auth) = c.handle(ch).unwrap() else {
            panic!()
        };
        // Same TLS binding but a fresh relay nonce: the recorded Auth no longer verifies.
        let mut s2 = ServerHandshake::new(relay.clone(), "r", binding, [5; 32]);
        s2.handle(hello.clone(), &dir).unwrap();
        assert_eq!(
            s2.handle(auth.clone(), &dir),
            Err(ProtocolError::AuthFailed("auth signature does not verify"))
        );
        // Same nonce but another TLS session (a man in the middle): fails too.
        let mut s3 =
            ServerHandshake::new(relay, "r", ChannelBinding::tls_exporter([8; 32]), [4; 32]);
        s3.handle(hello, &dir).unwrap();
        assert_eq!(
            s3.handle(auth, &dir),
            Err(ProtocolError::AuthFailed("auth signature does not verify"))
        );
    }

    #[test]
    fn wrong_key_unknown_peer_and_pinning() {
        let (relay, _alpha, dir) = setup();
        let b = ChannelBinding::none();
        let mallory = SigningKey::from_bytes(&[7; 32]);
        let mut c = ClientHandshake::new("alpha", mallory.clone(), None, b, [3; 32]);
        let mut s = ServerHandshake::new(relay.clone(), "r", b, [4; 32]);
        assert_eq!(
            run(&mut c, &mut s, &dir),
            Err(ProtocolError::AuthFailed("unknown peer or key"))
        );
        let mut c = ClientHandshake::new("zeta", mallory.clone(), None, b, [3; 32]);
        let mut s = ServerHandshake::new(relay.clone(), "r", b, [4; 32]);
        assert_eq!(
            run(&mut c, &mut s, &dir),
            Err(ProtocolError::AuthFailed("unknown peer or key"))
        );
        // A relay with another key than the pinned one is refused by the client.
        let mut c = ClientHandshake::new("alpha", mallory, Some(relay.verifying_key()), b, [3; 32]);
        let mut s = ServerHandshake::new(SigningKey::from_bytes(&[8; 32]), "r", b, [4; 32]);
        let ServerStep::Reply(ch) = s.handle(c.hello(), &dir).unwrap() else {
            panic!()
        };
        assert_eq!(
            c.handle(ch),
            Err(ProtocolError::AuthFailed("relay key is not the pinned one"))
        );
    }

    #[test]
    fn version_and_order() {
        let (relay, _, dir) = setup();
        let mut s = ServerHandshake::new(relay.clone(), "r", ChannelBinding::none(), [4; 32]);
        let hello = Frame {
            kind: Some(Kind::Hello(Hello {
                versions: vec![2, 3],
                peer: "alpha".into(),
                client_nonce: Bytes::from(vec![0; 32]),
                agent: String::new(),
            })),
        };
        assert_eq!(
            s.handle(hello, &dir),
            Err(ProtocolError::UnsupportedVersion(vec![2, 3]))
        );
        let mut s = ServerHandshake::new(relay, "r", ChannelBinding::none(), [4; 32]);
        let auth = Frame {
            kind: Some(Kind::Auth(Auth::default())),
        };
        assert_eq!(
            s.handle(auth, &dir),
            Err(ProtocolError::UnexpectedFrame("expected hello"))
        );
        assert!(
            s.handle(Frame::default(), &dir).is_err(),
            "failed handshake stays failed"
        );
    }
}
