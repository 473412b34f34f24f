//! A scripted stand-in for the relay on 127.0.0.1:0, speaking the real protocol (the spec
//! crate's server handshake, real QUIC streams and WebSocket messages) so that the SDK's
//! behaviour can be tested without the relay. The test plays the relay's part: it reads what
//! the client sent and decides what to answer.

#![allow(dead_code)]

use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use federation_spec::frame::{
    FrameDecoder, HANDSHAKE_MAX_FRAME, decode_message, encode_kind, encode_to_bytes,
};
use federation_spec::handshake::{ChannelBinding, PeerDirectory, ServerHandshake, ServerStep};
use federation_spec::keyfile::KeyFile;
use federation_spec::proto::{
    Frame, Lane, LaneTtl, Limits, PeerKeys, Role, StreamInit, Welcome, frame::Kind,
};
use federation_spec::{ALPN, EXPORTER_LABEL, WS_SUBPROTOCOL};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn relay_key() -> SigningKey {
    SigningKey::from_bytes(&[0x11; 32])
}

pub fn alpha_key() -> SigningKey {
    SigningKey::from_bytes(&[0x22; 32])
}

pub fn beta_key() -> SigningKey {
    SigningKey::from_bytes(&[0x33; 32])
}

/// The key file of platform `alpha`, pinning the mock relay's key.
pub fn alpha_keyfile() -> KeyFile {
    KeyFile::new("alpha", alpha_key(), Some(relay_key().verifying_key()))
}

struct Directory;

impl PeerDirectory for Directory {
    fn lookup(&self, peer: &str) -> Option<(Role, Vec<VerifyingKey>)> {
        match peer {
            "alpha" => Some((Role::Platform, vec![alpha_key().verifying_key()])),
            "beta" => Some((Role::Platform, vec![beta_key().verifying_key()])),
            _ => None,
        }
    }
}

pub fn default_limits() -> Limits {
    Limits {
        max_frame_bytes: 1 << 20,
        max_payload_bytes: 65_536,
        max_inflight: 64,
        max_msgs_per_s: 0,
        idle_timeout_ms: 60_000,
        max_chunk_recipients: 1000,
        receive_window: 0,
    }
}

fn welcome(limits: &Limits, receive_window: u32) -> Welcome {
    let keys = |peer: &str, key: SigningKey| PeerKeys {
        peer: peer.into(),
        role: Role::Platform as i32,
        keys: vec![Bytes::copy_from_slice(key.verifying_key().as_bytes())],
    };
    Welcome {
        session_id: Bytes::from(rand::random::<[u8; 16]>().to_vec()),
        role: Role::Platform as i32,
        limits: Some(Limits {
            receive_window: if receive_window == 0 {
                16
            } else {
                receive_window
            },
            ..*limits
        }),
        lanes: vec![LaneTtl {
            lane: Lane::Chat as i32,
            default_ttl_s: 86_400,
            max_ttl_s: 604_800,
        }],
        directory: vec![keys("alpha", alpha_key()), keys("beta", beta_key())],
    }
}

/// Where a frame from the mock relay goes.
#[derive(Debug)]
enum Out {
    Control(Frame),
    Lane(Lane, Frame),
    Drop,
}

/// One accepted session, seen from the relay's side.
pub struct MockSession {
    pub peer: String,
    pub receive_window: u32,
    incoming: mpsc::Receiver<Frame>,
    outgoing: mpsc::Sender<Out>,
}

impl MockSession {
    /// The next frame from the client, skipping its keepalive pings.
    pub async fn recv(&mut self) -> Frame {
        loop {
            let frame = tokio::time::timeout(WAIT, self.incoming.recv())
                .await
                .expect("timed out waiting for a frame from the client")
                .expect("client connection ended");
            if !matches!(frame.kind, Some(Kind::Ping(_))) {
                return frame;
            }
        }
    }

    /// The next frame's kind.
    pub async fn recv_kind(&mut self) -> Kind {
        self.recv().await.kind.expect("frame without a kind")
    }

    /// Whether the client ended the connection (after its Goaway, if any).
    pub async fn closed(&mut self) -> Vec<Frame> {
        let mut rest = Vec::new();
        while let Ok(Some(f)) = tokio::time::timeout(WAIT, self.incoming.recv()).await {
            rest.push(f);
        }
        rest
    }

    /// Sends on the control stream (the only stream on WebSocket).
    pub async fn send(&self, kind: Kind) {
        let _ = self
            .outgoing
            .send(Out::Control(Frame { kind: Some(kind) }))
            .await;
    }

    /// Sends on the relay's stream of `lane` (QUIC), or the WebSocket.
    pub async fn send_lane(&self, lane: Lane, kind: Kind) {
        let _ = self
            .outgoing
            .send(Out::Lane(lane, Frame { kind: Some(kind) }))
            .await;
    }

    /// Drops the connection without a Goaway, as a crash would.
    pub async fn kill(self) {
        let _ = self.outgoing.send(Out::Drop).await;
    }
}

/// A mock relay listening on one transport.
pub struct MockRelay {
    pub url: String,
    /// The relay's self-signed certificate (quic and wss).
    pub cert_der: Option<Vec<u8>>,
    sessions: mpsc::Receiver<MockSession>,
    limits: Arc<std::sync::Mutex<Limits>>,
}

impl MockRelay {
    /// The next session to complete the handshake.
    pub async fn accept(&mut self) -> MockSession {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("timed out waiting for the client to connect")
            .expect("mock relay stopped")
    }

    /// Limits announced in later Welcomes.
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.lock().unwrap() = limits;
    }

    /// A plain `ws://` relay.
    pub async fn ws() -> Self {
        Self::websocket(false).await
    }

    /// A `wss://` relay with a self-signed certificate for localhost and 127.0.0.1.
    pub async fn wss() -> Self {
        Self::websocket(true).await
    }

    async fn websocket(tls: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, sessions) = mpsc::channel(8);
        let limits = Arc::new(std::sync::Mutex::new(default_limits()));
        let (cert_der, acceptor) = if tls {
            let (cert, config) = server_tls(vec![b"http/1.1".to_vec()]);
            (
                Some(cert),
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            )
        } else {
            (None, None)
        };
        let shared_limits = limits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                let limits = shared_limits.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let binding: [u8; 32] = stream
                                .get_ref()
                                .1
                                .export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
                                .unwrap();
                            serve_ws(stream, ChannelBinding::tls_exporter(binding), tx, limits)
                                .await;
                        }
                        None => serve_ws(tcp, ChannelBinding::none(), tx, limits).await,
                    }
                });
            }
        });
        let scheme = if tls { "wss" } else { "ws" };
        Self {
            url: format!("{scheme}://127.0.0.1:{port}/"),
            cert_der,
            sessions,
            limits,
        }
    }

    /// A QUIC relay with a self-signed certificate for localhost and 127.0.0.1.
    pub async fn quic() -> Self {
        let (cert_der, tls) = server_tls(vec![ALPN.to_vec()]);
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let port = endpoint.local_addr().unwrap().port();
        let (tx, sessions) = mpsc::channel(8);
        let limits = Arc::new(std::sync::Mutex::new(default_limits()));
        let shared_limits = limits.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let tx = tx.clone();
                let limits = shared_limits.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve_quic(conn, tx, limits).await;
                    }
                });
            }
        });
        Self {
            url: format!("quic://127.0.0.1:{port}"),
            cert_der: Some(cert_der),
            sessions,
            limits,
        }
    }
}

fn server_tls(alpn: Vec<Vec<u8>>) -> (Vec<u8>, rustls::ServerConfig) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let der = cert.cert.der().to_vec();
    let key = PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(der.clone())], key.into())
        .unwrap();
    config.alpn_protocols = alpn;
    (der, config)
}

/// Runs the server handshake; returns the Welcome to send and the peer's details.
fn handshake_step(
    hs: &mut ServerHandshake,
    frame: Frame,
    limits: &Arc<std::sync::Mutex<Limits>>,
) -> Result<Result<Frame, (Frame, String, u32)>, Bytes> {
    match hs.handle(frame, &Directory) {
        Ok(ServerStep::Reply(f)) => Ok(Ok(f)),
        Ok(ServerStep::Authenticated(a)) => {
            let limits = *limits.lock().unwrap();
            let w = welcome(&limits, a.receive_window);
            Ok(Err((
                Frame {
                    kind: Some(Kind::Welcome(w)),
                },
                a.peer,
                a.receive_window,
            )))
        }
        Err(e) => Err(encode_kind(Kind::Goaway(e.to_goaway()))),
    }
}

// The handshake callback's error type is tungstenite's, large or not.
#[allow(clippy::result_large_err)]
async fn serve_ws<S>(
    stream: S,
    binding: ChannelBinding,
    sessions: mpsc::Sender<MockSession>,
    limits: Arc<std::sync::Mutex<Limits>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let callback = |req: &Request, mut resp: Response| {
        let offered = req
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(offered.split(',').any(|p| p.trim() == WS_SUBPROTOCOL));
        resp.headers_mut()
            .insert("Sec-WebSocket-Protocol", WS_SUBPROTOCOL.parse().unwrap());
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let mut hs = ServerHandshake::new(relay_key(), "mock-relay", binding, rand::random());
    let (peer, window) = loop {
        let Some(Ok(Message::Binary(data))) = ws.next().await else {
            return;
        };
        let frames = decode_message(&data, HANDSHAKE_MAX_FRAME).unwrap();
        let mut done = None;
        for frame in frames {
            match handshake_step(&mut hs, frame, &limits) {
                Ok(Ok(reply)) => ws
                    .send(Message::Binary(encode_to_bytes(&reply)))
                    .await
                    .unwrap(),
                Ok(Err((welcome, peer, window))) => {
                    ws.send(Message::Binary(encode_to_bytes(&welcome)))
                        .await
                        .unwrap();
                    done = Some((peer, window));
                }
                Err(goaway) => {
                    let _ = ws.send(Message::Binary(goaway)).await;
                    return;
                }
            }
        }
        if let Some(done) = done {
            break done;
        }
    };
    let (in_tx, incoming) = mpsc::channel(1024);
    let (outgoing, mut out_rx) = mpsc::channel(1024);
    let _ = sessions
        .send(MockSession {
            peer,
            receive_window: window,
            incoming,
            outgoing,
        })
        .await;
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(data))) => {
                    for frame in decode_message(&data, 1 << 20).unwrap() {
                        let _ = in_tx.send(frame).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            out = out_rx.recv() => match out {
                Some(Out::Control(f) | Out::Lane(_, f)) => {
                    if ws.send(Message::Binary(encode_to_bytes(&f))).await.is_err() {
                        return;
                    }
                }
                Some(Out::Drop) | None => return,
            },
        }
    }
}

async fn read_frames(
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    tx: mpsc::Sender<Frame>,
    lane_stream: bool,
) {
    let mut first = lane_stream;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while let Ok(Some(frame)) = decoder.next_frame() {
            if first {
                first = false;
                assert!(
                    matches!(frame.kind, Some(Kind::StreamInit(_))),
                    "a lane stream starts with StreamInit"
                );
                continue;
            }
            if tx.send(frame).await.is_err() {
                return;
            }
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.extend(&buf[..n]),
            _ => return,
        }
    }
}

async fn serve_quic(
    conn: quinn::Connection,
    sessions: mpsc::Sender<MockSession>,
    limits: Arc<std::sync::Mutex<Limits>>,
) {
    let mut binding = [0u8; 32];
    conn.export_keying_material(&mut binding, EXPORTER_LABEL, b"")
        .unwrap();
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let mut hs = ServerHandshake::new(
        relay_key(),
        "mock-relay",
        ChannelBinding::tls_exporter(binding),
        rand::random(),
    );
    let mut decoder = FrameDecoder::new(HANDSHAKE_MAX_FRAME);
    let mut buf = vec![0u8; 4096];
    let (peer, window) = 'handshake: loop {
        while let Ok(Some(frame)) = decoder.next_frame() {
            match handshake_step(&mut hs, frame, &limits) {
                Ok(Ok(reply)) => send.write_all(&encode_to_bytes(&reply)).await.unwrap(),
                Ok(Err((welcome, peer, window))) => {
                    send.write_all(&encode_to_bytes(&welcome)).await.unwrap();
                    break 'handshake (peer, window);
                }
                Err(goaway) => {
                    let _ = send.write_all(&goaway).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                    return;
                }
            }
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.extend(&buf[..n]),
            _ => return,
        }
    };
    decoder.set_max_frame(1 << 20);
    let (in_tx, incoming) = mpsc::channel(1024);
    let (outgoing, mut out_rx) = mpsc::channel(1024);
    tokio::spawn(read_frames(recv, decoder, in_tx.clone(), false));
    let accept_conn = conn.clone();
    tokio::spawn(async move {
        while let Ok(uni) = accept_conn.accept_uni().await {
            tokio::spawn(read_frames(
                uni,
                FrameDecoder::new(1 << 20),
                in_tx.clone(),
                true,
            ));
        }
    });
    let _ = sessions
        .send(MockSession {
            peer,
            receive_window: window,
            incoming,
            outgoing,
        })
        .await;
    let mut lanes: HashMap<i32, quinn::SendStream> = HashMap::new();
    while let Some(out) = out_rx.recv().await {
        match out {
            Out::Control(f) => {
                let _ = send.write_all(&encode_to_bytes(&f)).await;
            }
            Out::Lane(lane, f) => {
                let stream = match lanes.entry(lane as i32) {
                    Entry::Occupied(o) => o.into_mut(),
                    Entry::Vacant(v) => {
                        let mut s = conn.open_uni().await.unwrap();
                        let init = encode_kind(Kind::StreamInit(StreamInit { lane: lane as i32 }));
                        s.write_all(&init).await.unwrap();
                        v.insert(s)
                    }
                };
                let _ = stream.write_all(&encode_to_bytes(&f)).await;
            }
            Out::Drop => break,
        }
    }
    conn.close(0u32.into(), b"mock relay dropped the session");
}
