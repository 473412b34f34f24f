//! A bare protocol peer over QUIC, for tests that must send what the SDK never would: raw
//! bytes on the control stream, lane streams without `StreamInit`, frames cut short.
//!
//! Layout (SPEC.md 2.2): one bidirectional control stream opened by the peer, then one
//! unidirectional stream per lane in each direction, each starting with `StreamInit`; every
//! frame is a 4-byte big-endian length and a protobuf `Frame`. The relay's streams are read by
//! tasks into one bounded channel, so a test that stops calling [`QuicPeer::recv`] stops
//! reading: the relay's data then piles up in QUIC flow control, as with a peer that never
//! reads.

use federation_spec::frame::{ABSOLUTE_MAX_FRAME, FrameDecoder, encode_kind, encode_to_bytes};
use federation_spec::handshake::{ChannelBinding, ClientHandshake, ClientStep};
use federation_spec::proto::{Frame, Goaway, Lane, StreamInit, Welcome, frame::Kind};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What the reader tasks report.
enum Event {
    Frame(Frame),
    /// The relay finished its side of the control stream (it ends the session).
    ControlFinished,
    /// The relay sent bytes that are not frames.
    Broken(String),
}

/// A raw QUIC peer.
pub struct QuicPeer {
    pub conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
    /// Our half of the control stream.
    pub control: quinn::SendStream,
    lanes: HashMap<i32, quinn::SendStream>,
    events: mpsc::Receiver<Event>,
    pub welcome: Option<Welcome>,
    /// The TLS exporter of this connection (the handshake's channel binding).
    pub binding: [u8; 32],
}

/// TLS 1.3 with ALPN `relay-fed/1`, trusting the relay's self-signed certificate.
pub fn client_config(cert_pem: &Path) -> quinn::ClientConfig {
    let pem = std::fs::read(cert_pem).expect("relay certificate");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("PEM")).expect("certificate");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![federation_spec::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_uni_streams(8u32.into());
    config.transport_config(Arc::new(transport));
    config
}

impl QuicPeer {
    /// Connects (QUIC and TLS only) and opens the control stream, without the handshake.
    pub async fn open(addr: SocketAddr, data_dir: &Path) -> Self {
        let mut endpoint =
            quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("udp socket");
        endpoint.set_default_client_config(client_config(&data_dir.join("tls/cert.pem")));
        let conn = endpoint
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("QUIC handshake");
        let mut binding = [0u8; 32];
        conn.export_keying_material(&mut binding, federation_spec::EXPORTER_LABEL, b"")
            .expect("TLS exporter");
        let (control, recv) = conn.open_bi().await.expect("control stream");
        let (tx, events) = mpsc::channel(1024);
        tokio::spawn(read_stream(recv, tx.clone(), true));
        let accept = conn.clone();
        tokio::spawn(async move {
            while let Ok(recv) = accept.accept_uni().await {
                tokio::spawn(read_stream(recv, tx.clone(), false));
            }
        });
        Self {
            conn,
            _endpoint: endpoint,
            control,
            lanes: HashMap::new(),
            events,
            welcome: None,
            binding,
        }
    }

    /// Connects and authenticates as `peer` with `secret`, bound to this TLS session.
    pub async fn connect(
        addr: SocketAddr,
        data_dir: &Path,
        peer: &str,
        secret: ed25519_dalek::SigningKey,
    ) -> Result<Self, Goaway> {
        let mut quic = Self::open(addr, data_dir).await;
        let mut hs = ClientHandshake::new(
            peer,
            secret,
            None,
            ChannelBinding::tls_exporter(quic.binding),
            super::rand_nonce(),
        );
        quic.send(&hs.hello()).await;
        loop {
            let frame = quic.recv().await.expect("relay answers the handshake");
            match hs.handle(frame).expect("valid handshake frames") {
                ClientStep::Reply(f) => quic.send(&f).await,
                ClientStep::Established(w) => {
                    quic.welcome = Some(w);
                    return Ok(quic);
                }
                ClientStep::Refused(g) => return Err(g),
            }
        }
    }

    /// Writes a frame on the control stream.
    pub async fn send(&mut self, frame: &Frame) {
        let _ = self.send_bytes(&encode_to_bytes(frame)).await;
    }

    /// Writes raw bytes on the control stream.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), quinn::WriteError> {
        self.control.write_all(bytes).await
    }

    /// Finishes our side of the control stream.
    pub fn finish_control(&mut self) {
        let _ = self.control.finish();
    }

    /// Writes raw bytes on our stream of `lane`, opened (with its `StreamInit`) on first use.
    pub async fn lane_bytes(&mut self, lane: Lane, bytes: &[u8]) -> Result<(), quinn::WriteError> {
        let stream = match self.lanes.entry(lane as i32) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut s = self.conn.open_uni().await.expect("lane stream");
                s.write_all(&encode_kind(Kind::StreamInit(StreamInit {
                    lane: lane as i32,
                })))
                .await?;
                e.insert(s)
            }
        };
        stream.write_all(bytes).await
    }

    /// Writes a frame on our stream of `lane`.
    pub async fn send_lane(&mut self, lane: Lane, frame: &Frame) {
        let _ = self.lane_bytes(lane, &encode_to_bytes(frame)).await;
    }

    /// Finishes our stream of `lane` (if open).
    pub fn finish_lane(&mut self, lane: Lane) {
        if let Some(s) = self.lanes.get_mut(&(lane as i32)) {
            let _ = s.finish();
        }
    }

    /// Opens a unidirectional stream, writes exactly `bytes` (no `StreamInit` added) and
    /// finishes it.
    pub async fn raw_uni(&mut self, bytes: &[u8]) {
        let mut s = self.conn.open_uni().await.expect("uni stream");
        let _ = s.write_all(bytes).await;
        let _ = s.finish();
    }

    /// The next frame from any of the relay's streams (`StreamInit`s are skipped); None once
    /// the connection is closed and everything read. Waits at most 30 s.
    pub async fn recv(&mut self) -> Option<Frame> {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), self.events.recv())
                .await
                .expect("relay answers within 30 s")?;
            match event {
                Event::Frame(f) => return Some(f),
                Event::ControlFinished => continue,
                Event::Broken(e) => panic!("the relay sent bytes that are not frames: {e}"),
            }
        }
    }

    /// Reads until the relay ends the session (its Goaway, then the end of its control
    /// stream, or the connection closing), closes our side as a peer should, and returns
    /// the Goaway seen, if any.
    pub async fn goaway(&mut self) -> Option<Goaway> {
        let mut seen = None;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), self.events.recv())
                .await
                .expect("relay ends the session within 30 s");
            match event {
                Some(Event::Frame(Frame {
                    kind: Some(Kind::Goaway(g)),
                })) => seen = Some(g),
                Some(Event::Frame(_)) => {}
                Some(Event::ControlFinished) if seen.is_some() => break,
                Some(Event::ControlFinished) => {}
                Some(Event::Broken(e)) => panic!("the relay sent bytes that are not frames: {e}"),
                None => break,
            }
        }
        self.conn.close(0u32.into(), b"bye");
        seen
    }

    /// Waits (without reading or closing) for the relay to close the connection and returns
    /// its application close code (SPEC.md 2.2.5: the Goaway's code), None for another end.
    pub async fn close_code(&self, limit: Duration) -> Option<u64> {
        let reason = tokio::time::timeout(limit, self.conn.closed())
            .await
            .expect("relay closes the connection in time");
        match reason {
            quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
            _ => None,
        }
    }
}

/// Reads one of the relay's streams into `tx`: the control stream, or a lane stream whose
/// first frame must be `StreamInit`.
async fn read_stream(mut recv: quinn::RecvStream, tx: mpsc::Sender<Event>, control: bool) {
    let mut decoder = FrameDecoder::new(ABSOLUTE_MAX_FRAME);
    let mut expect_init = !control;
    loop {
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => decoder.extend(&chunk.bytes),
            Ok(None) => {
                let event = if decoder.buffered() > 0 {
                    Event::Broken("stream ended inside a frame".into())
                } else if control {
                    Event::ControlFinished
                } else {
                    return;
                };
                let _ = tx.send(event).await;
                return;
            }
            Err(_) => return,
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    if expect_init {
                        expect_init = false;
                        if matches!(frame.kind, Some(Kind::StreamInit(_))) {
                            continue;
                        }
                        let _ = tx
                            .send(Event::Broken("lane stream without stream_init".into()))
                            .await;
                        return;
                    }
                    if tx.send(Event::Frame(frame)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Event::Broken(e.to_string())).await;
                    return;
                }
            }
        }
    }
}
