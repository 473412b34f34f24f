//! Test harness: a real relay on 127.0.0.1 with its own temp data dir, either in this process
//! (fast, for behaviour tests) or as a child process of the real binary (for kill -9, SIGHUP,
//! SIGTERM), and SDK clients acting as the demo platforms.
#![allow(dead_code)]

use federation_spec::keyfile::KeyFile;
use relay::server::Relay;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Extra TOML appended to the generated configuration.
pub const FAST_EXPIRY: &str = "";

/// Writes the demo set-up into a temp dir, listening on ephemeral loopback ports, with
/// `extra` TOML sections added (e.g. "[limits]\nmax_inflight = 10\n").
pub fn setup(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    relay::demo::bootstrap(dir.path()).expect("bootstrap");
    let path = relay::demo::config_path(dir.path());
    let text = std::fs::read_to_string(&path).expect("config");
    let text = text
        .replace("quic = \"127.0.0.1:7700\"", "quic = \"127.0.0.1:0\"")
        .replace("ws = \"127.0.0.1:7701\"", "ws = \"127.0.0.1:0\"")
        .replace("admin = \"127.0.0.1:7702\"", "admin = \"127.0.0.1:0\"");
    // Sections must come before the [[peers]] array, so insert extra before the first one.
    let text = match text.find("[[peers]]") {
        Some(at) => format!("{}{}\n{}", &text[..at], extra, &text[at..]),
        None => format!("{text}\n{extra}"),
    };
    std::fs::write(&path, text).expect("write config");
    dir
}

/// A relay running in this process.
pub struct InProcess {
    pub dir: tempfile::TempDir,
    pub relay: Relay,
}

impl InProcess {
    pub async fn start(extra: &str) -> Self {
        let dir = setup(extra);
        let loaded =
            relay::config::load(&relay::demo::config_path(dir.path())).expect("config loads");
        let relay = Relay::start(loaded).await.expect("relay starts");
        Self { dir, relay }
    }

    pub fn quic_url(&self) -> String {
        format!("quic://{}", self.relay.quic_addr.expect("quic"))
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.relay.ws_addr.expect("ws"))
    }

    pub fn admin(&self) -> SocketAddr {
        self.relay.admin_addr.expect("admin")
    }
}

/// The key file of a demo peer.
pub fn key(dir: &Path, peer: &str) -> KeyFile {
    KeyFile::parse(
        &std::fs::read_to_string(dir.join(format!("keys/{peer}.key"))).expect("key file"),
    )
    .expect("key parses")
}

/// The relay binary running as a child process.
pub struct ChildRelay {
    pub dir: PathBuf,
    pub child: Child,
    pub quic: SocketAddr,
    pub ws: SocketAddr,
    pub admin: SocketAddr,
}

impl ChildRelay {
    /// Starts the binary on the config in `dir` and waits for its banner.
    pub fn start(dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .arg("serve")
            .arg("--config")
            .arg(relay::demo::config_path(dir))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("relay binary starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = |prefix: &str| -> SocketAddr {
            for line in lines.by_ref() {
                let line = line.expect("banner line");
                if let Some(rest) = line.trim().strip_prefix(prefix) {
                    let rest = rest.trim();
                    let rest = rest.split("://").nth(1).unwrap_or(rest);
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    return addr.parse().expect("address in banner");
                }
            }
            panic!("relay exited before printing {prefix}");
        };
        let quic = addr("quic ");
        let ws = addr("websocket ");
        let admin = addr("admin ");
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            dir: dir.to_path_buf(),
            child,
            quic,
            ws,
            admin,
        }
    }

    pub fn quic_url(&self) -> String {
        format!("quic://{}", self.quic)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.ws)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the child to exit and returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET over plain HTTP/1.1 on loopback: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A bare protocol peer over plain WebSocket, for tests that must send what the SDK never
/// would (spoofed senders, forged signatures, malformed frames).
pub struct RawPeer {
    pub ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    pub welcome: Option<federation_spec::proto::Welcome>,
    /// Frames of a message not yet returned (the relay batches frames into messages).
    pending: std::collections::VecDeque<federation_spec::proto::Frame>,
}

impl RawPeer {
    /// Opens the WebSocket (with the subprotocol) without handshaking.
    pub async fn open(addr: SocketAddr) -> Self {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{addr}/")
            .into_client_request()
            .expect("request");
        req.headers_mut().insert(
            "sec-websocket-protocol",
            federation_spec::WS_SUBPROTOCOL.parse().expect("header"),
        );
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
        let (ws, _) = tokio_tungstenite::client_async(req, tcp)
            .await
            .expect("ws upgrade");
        Self {
            ws,
            welcome: None,
            pending: Default::default(),
        }
    }

    /// Opens and authenticates as `peer` with `secret`.
    pub async fn connect(
        addr: SocketAddr,
        peer: &str,
        secret: ed25519_dalek::SigningKey,
    ) -> Result<Self, federation_spec::proto::Goaway> {
        use federation_spec::handshake::{ChannelBinding, ClientHandshake, ClientStep};
        let mut raw = Self::open(addr).await;
        let mut hs = ClientHandshake::new(peer, secret, None, ChannelBinding::none(), rand_nonce());
        raw.send(&hs.hello()).await;
        loop {
            let frame = raw.recv().await.expect("relay answers the handshake");
            match hs.handle(frame).expect("valid handshake frames") {
                ClientStep::Reply(f) => raw.send(&f).await,
                ClientStep::Established(w) => {
                    raw.welcome = Some(w);
                    return Ok(raw);
                }
                ClientStep::Refused(g) => return Err(g),
            }
        }
    }

    pub async fn send(&mut self, frame: &federation_spec::proto::Frame) {
        self.send_bytes(federation_spec::frame::encode_to_bytes(frame).to_vec())
            .await;
    }

    pub async fn send_bytes(&mut self, bytes: Vec<u8>) {
        use futures_util::SinkExt;
        let _ = self
            .ws
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                bytes.into(),
            ))
            .await;
    }

    /// The next frame, None when the connection closed (waits at most 30 s).
    pub async fn recv(&mut self) -> Option<federation_spec::proto::Frame> {
        use futures_util::StreamExt;
        if let Some(f) = self.pending.pop_front() {
            return Some(f);
        }
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .expect("relay answers within 30 s")?;
            match msg {
                Ok(tokio_tungstenite::tungstenite::Message::Binary(data)) => {
                    let frames = federation_spec::frame::decode_message(&data, 1 << 24)
                        .expect("relay sends valid frames");
                    self.pending.extend(frames);
                    if let Some(f) = self.pending.pop_front() {
                        return Some(f);
                    }
                }
                Ok(tokio_tungstenite::tungstenite::Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Reads frames until the connection closes and returns the Goaway seen, if any.
    pub async fn goaway(&mut self) -> Option<federation_spec::proto::Goaway> {
        let mut seen = None;
        while let Some(f) = self.recv().await {
            if let Some(federation_spec::proto::frame::Kind::Goaway(g)) = f.kind {
                seen = Some(g);
            }
        }
        seen
    }
}

pub fn rand_nonce() -> [u8; 32] {
    use rand::RngCore;
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// A signed Deliver frame from `signer` with this envelope.
pub fn deliver(
    envelope: &federation_spec::proto::Envelope,
    signer: &ed25519_dalek::SigningKey,
) -> federation_spec::proto::Frame {
    use prost::Message;
    let bytes = bytes::Bytes::from(envelope.encode_to_vec());
    let sig = federation_spec::signing::sign_envelope(signer, &bytes);
    federation_spec::proto::Frame {
        kind: Some(federation_spec::proto::frame::Kind::Deliver(
            federation_spec::proto::Deliver {
                envelope: bytes,
                signature: bytes::Bytes::copy_from_slice(&sig.to_bytes()),
                signer: bytes::Bytes::copy_from_slice(signer.verifying_key().as_bytes()),
                tag: 0,
            },
        )),
    }
}

pub fn envelope(
    id: [u8; 16],
    from: &str,
    to: &str,
    text: &str,
) -> federation_spec::proto::Envelope {
    federation_spec::proto::Envelope {
        id: bytes::Bytes::copy_from_slice(&id),
        from: from.into(),
        to: to.into(),
        lane: federation_spec::proto::Lane::Chat as i32,
        created_at_ms: relay::router::unix_ms(),
        ttl_s: 0,
        content_type: "text/plain".into(),
        payload: bytes::Bytes::copy_from_slice(text.as_bytes()),
    }
}
