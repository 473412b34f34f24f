//! Test harness: a real relay on 127.0.0.1 with its own temp data dir, either in this process
//! (fast, for behaviour tests) or as a child process of the real binary (for kill -9, SIGHUP,
//! SIGTERM), and SDK clients acting as the demo platforms.
#![allow(dead_code)]

pub mod quic;

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
    setup_in(dir.path(), extra);
    dir
}

/// [`setup`] into an existing directory (a mount point, say).
pub fn setup_in(dir: &Path, extra: &str) {
    relay::demo::bootstrap(dir).expect("bootstrap");
    let path = relay::demo::config_path(dir);
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

    /// Where its listeners are, for the transport-agnostic helpers.
    pub fn target(&self) -> Target {
        Target {
            ws: self.relay.ws_addr.expect("ws"),
            quic: self.relay.quic_addr.expect("quic"),
            admin: self.admin(),
            dir: self.dir.path().to_path_buf(),
        }
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
    log: Option<PathBuf>,
}

impl ChildRelay {
    /// Starts the binary on the config in `dir` and waits for its banner.
    pub fn start(dir: &Path) -> Self {
        Self::spawn(dir, Stdio::inherit(), "warn")
    }

    /// [`ChildRelay::start`], with its log (warnings and up) written to `dir/relay.log`
    /// instead of the test's stderr, for tests that check what the relay logs.
    pub fn start_logged(dir: &Path) -> Self {
        Self::start_logged_at(dir, &dir.join("relay.log"))
    }

    /// [`ChildRelay::start_logged`] with the log at `log` (appended to).
    pub fn start_logged_at(dir: &Path, log: &Path) -> Self {
        Self::start_filtered(dir, log, "warn")
    }

    /// [`ChildRelay::start_logged`] with the relay's own debug lines too (every refusal of a
    /// message is logged at debug).
    pub fn start_debug_logged(dir: &Path) -> Self {
        Self::start_filtered(dir, &dir.join("relay.log"), "warn,relay=debug")
    }

    fn start_filtered(dir: &Path, log: &Path, filter: &str) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut relay = Self::spawn(dir, Stdio::from(file), filter);
        relay.log = Some(log.to_path_buf());
        relay
    }

    /// What the relay logged so far (with [`ChildRelay::start_logged`]).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    fn spawn(dir: &Path, stderr: Stdio, filter: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .arg("serve")
            .arg("--config")
            .arg(relay::demo::config_path(dir))
            .env("RUST_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(stderr)
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
            log: None,
        }
    }

    pub fn quic_url(&self) -> String {
        format!("quic://{}", self.quic)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.ws)
    }

    /// Where its listeners are, for the transport-agnostic helpers.
    pub fn target(&self) -> Target {
        Target {
            ws: self.ws,
            quic: self.quic,
            admin: self.admin,
            dir: self.dir.clone(),
        }
    }

    /// Its resident memory, KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("relay process status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// Its open file descriptors (sockets included).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .expect("relay process fds")
            .count()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
    http_get_with(addr, path, "").await
}

/// [`http_get`] with extra header lines (each ending in CRLF).
pub async fn http_get_with(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
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

/// The value of one Prometheus series (name with its labels, as rendered) in `text`, 0 when
/// absent (a counter never incremented is not rendered).
pub fn metric_in(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// [`metric_in`] on a fresh scrape of the admin API.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    metric_in(&http_get(admin, "/metrics").await.1, series)
}

/// Where a relay listens, in process or as a child.
#[derive(Clone, Debug)]
pub struct Target {
    pub ws: SocketAddr,
    pub quic: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
}

/// The two transports, for cases that run on both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Quic,
}

impl Transport {
    pub const BOTH: [Transport; 2] = [Transport::Ws, Transport::Quic];

    /// A transport connection, no handshake.
    pub async fn open(self, t: &Target) -> Wire {
        match self {
            Transport::Ws => Wire::Ws(RawPeer::open(t.ws).await),
            Transport::Quic => Wire::Quic(quic::QuicPeer::open(t.quic, &t.dir).await),
        }
    }

    /// An authenticated session as the demo peer `peer`.
    pub async fn connect(self, t: &Target, peer: &str) -> Wire {
        let secret = key(&t.dir, peer).secret;
        match self {
            Transport::Ws => Wire::Ws(
                RawPeer::connect(t.ws, peer, secret)
                    .await
                    .expect("handshake succeeds"),
            ),
            Transport::Quic => Wire::Quic(
                quic::QuicPeer::connect(t.quic, &t.dir, peer, secret)
                    .await
                    .expect("handshake succeeds"),
            ),
        }
    }
}

/// A raw peer on either transport.
pub enum Wire {
    Ws(RawPeer),
    Quic(quic::QuicPeer),
}

impl Wire {
    pub async fn send(&mut self, frame: &federation_spec::proto::Frame) {
        match self {
            Wire::Ws(p) => p.send(frame).await,
            Wire::Quic(p) => p.send(frame).await,
        }
    }

    /// Raw bytes: one binary WebSocket message, or bytes on the QUIC control stream.
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) {
        match self {
            Wire::Ws(p) => p.send_bytes(bytes).await,
            Wire::Quic(p) => {
                let _ = p.send_bytes(&bytes).await;
            }
        }
    }

    pub async fn recv(&mut self) -> Option<federation_spec::proto::Frame> {
        match self {
            Wire::Ws(p) => p.recv().await,
            Wire::Quic(p) => p.recv().await,
        }
    }

    /// Reads until the relay ends the session; the Goaway seen, if any.
    pub async fn goaway(&mut self) -> Option<federation_spec::proto::Goaway> {
        match self {
            Wire::Ws(p) => p.goaway().await,
            Wire::Quic(p) => p.goaway().await,
        }
    }

    pub fn quic(&mut self) -> &mut quic::QuicPeer {
        match self {
            Wire::Quic(p) => p,
            Wire::Ws(_) => panic!("not a QUIC peer"),
        }
    }

    pub fn ws(&mut self) -> &mut RawPeer {
        match self {
            Wire::Ws(p) => p,
            Wire::Quic(_) => panic!("not a WebSocket peer"),
        }
    }
}

/// A well-behaved pair of peers that checks the relay still serves while others abuse it:
/// `gamma` sends over QUIC, `beta` receives over WebSocket, each message end to end with
/// its Accepted, delivery and Ack. Abusers must not use `gamma` or `beta`.
pub struct Witness {
    sender: quic::QuicPeer,
    receiver: RawPeer,
    secret: ed25519_dalek::SigningKey,
    sent: u32,
    /// The slowest round trip seen.
    pub worst: Duration,
}

impl Witness {
    pub async fn start(t: &Target) -> Self {
        let secret = key(&t.dir, "gamma").secret;
        let sender = quic::QuicPeer::connect(t.quic, &t.dir, "gamma", secret.clone())
            .await
            .expect("witness gamma connects");
        let receiver = RawPeer::connect(t.ws, "beta", key(&t.dir, "beta").secret)
            .await
            .expect("witness beta connects");
        Self {
            sender,
            receiver,
            secret,
            sent: 0,
            worst: Duration::ZERO,
        }
    }

    /// One message from gamma to beta: accepted, delivered, acked, all within `bound`.
    pub async fn check(&mut self, bound: Duration) {
        use federation_spec::proto::{Ack, Frame, frame::Kind};
        self.sent += 1;
        let mut id = [0xee; 16];
        id[..4].copy_from_slice(&self.sent.to_be_bytes());
        let started = std::time::Instant::now();
        let frame = deliver(&envelope(id, "w@gamma", "w@beta", "witness"), &self.secret);
        self.sender
            .send_lane(federation_spec::proto::Lane::Chat, &frame)
            .await;
        let accepted = async {
            loop {
                match self.sender.recv().await.expect("witness sender open").kind {
                    Some(Kind::Accepted(a)) if a.id.as_ref() == id => return,
                    // Messages others sent to gamma: taken and acked.
                    Some(Kind::Deliver(d)) => {
                        self.sender
                            .send(&Frame {
                                kind: Some(Kind::Ack(Ack { tags: vec![d.tag] })),
                            })
                            .await
                    }
                    Some(Kind::Pong(_)) => {}
                    other => panic!("witness sender got {other:?}"),
                }
            }
        };
        tokio::time::timeout(bound, accepted)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "witness message {} not accepted within {bound:?}",
                    self.sent
                )
            });
        let delivered = async {
            loop {
                let frame = self.receiver.recv().await.expect("witness receiver open");
                if let Some(Kind::Deliver(d)) = frame.kind {
                    let env: federation_spec::proto::Envelope =
                        prost::Message::decode(d.envelope.clone()).expect("envelope");
                    self.receiver
                        .send(&Frame {
                            kind: Some(Kind::Ack(Ack { tags: vec![d.tag] })),
                        })
                        .await;
                    if env.id.as_ref() == id {
                        return;
                    }
                    // An earlier witness message delivered again: acked above, not the one.
                }
            }
        };
        tokio::time::timeout(bound, delivered)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "witness message {} not delivered within {bound:?}",
                    self.sent
                )
            });
        self.worst = self.worst.max(started.elapsed());
    }
}
