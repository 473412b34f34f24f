//! QUIC transport (quinn): the control stream is the first bidirectional stream the peer
//! opens; each side sends lane traffic on one unidirectional stream per lane, opened on first
//! use and introduced by a StreamInit frame, so bulk never blocks call signalling.

use super::{
    Connection, FrameLimit, INBOUND_QUEUE, Inbound, Outbound, OutboundInner, SendError,
    TransportKind,
};
use bytes::Bytes;
use federation_spec::frame::{FrameDecoder, encode_kind};
use federation_spec::handshake::ChannelBinding;
use federation_spec::proto::{Lane, StreamInit, frame::Kind};
use federation_spec::{EXPORTER_LABEL, ProtocolError, lane};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

/// Frames queued per outbound stream before the peer counts as not reading.
pub const OUT_QUEUE: usize = 16 * 1024;

/// Opens the QUIC endpoint. `reset_secret` (derived from the relay's key) seeds the stateless
/// reset key and the key that connection ids are hashed with: a relay restarted after a crash
/// then recognises its predecessor's connection ids and resets those stale connections at
/// once, where random keys per process would leave its peers waiting for their idle timeout.
pub fn endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    idle_timeout: Duration,
    reset_secret: [u8; 32],
) -> std::io::Result<quinn::Endpoint> {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(std::io::Error::other)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            idle_timeout.try_into().map_err(std::io::Error::other)?,
        ))
        .max_concurrent_uni_streams(8u32.into())
        .max_concurrent_bidi_streams(1u32.into())
        .stream_receive_window((8u32 << 20).into())
        .receive_window((32u32 << 20).into())
        .send_window(32 << 20);
    config.transport_config(Arc::new(transport));
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_secret);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&reset_secret[24..]);
    let cid_key = u64::from_le_bytes(cid_key);
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = std::net::UdpSocket::bind(addr)?;
    quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// The stateless reset secret of a relay: a hash of its private key under its own label, so
/// it is stable across restarts and reveals nothing of the key.
pub fn reset_secret(relay_key: &ed25519_dalek::SigningKey) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"relay-fed/v1 quic stateless reset\0");
    h.update(relay_key.to_bytes());
    h.finalize().into()
}

/// Accepts connections until the endpoint is closed, handing each to `handler`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    handshake_timeout: Duration,
    handler: impl Fn(Connection) + Clone + Send + 'static,
) {
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        let accepted_at = tokio::time::Instant::now();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let setup = async {
                let conn = incoming.await.map_err(|e| e.to_string())?;
                let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((conn, send, recv))
            };
            match tokio::time::timeout(handshake_timeout, setup).await {
                Ok(Ok((conn, send, recv))) => handler(Connection {
                    accepted_at,
                    ..connection(conn, send, recv, remote)
                }),
                Ok(Err(e)) => debug!(%remote, error = %e, "quic connection failed during set-up"),
                Err(_) => debug!(%remote, "quic connection set-up timed out"),
            }
        });
    }
}

fn connection(
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    remote: SocketAddr,
) -> Connection {
    let mut binding = [0u8; 32];
    let binding = match conn.export_keying_material(&mut binding, EXPORTER_LABEL, b"") {
        Ok(()) => ChannelBinding::tls_exporter(binding),
        // Cannot happen with TLS 1.3; a zero binding would then fail the peer's check loudly.
        Err(_) => ChannelBinding::none(),
    };
    let limit = FrameLimit::new();
    let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
    tokio::spawn(read_stream(
        recv,
        tx.clone(),
        limit.clone(),
        false,
        Some(conn.clone()),
    ));
    tokio::spawn(accept_lanes(conn.clone(), tx, limit.clone()));
    let control = spawn_writer(WriterTarget::Ready(send));
    let lanes = lane::LANES.map(|l| spawn_writer(WriterTarget::Lazy(conn.clone(), l)));
    let out = QuicOut {
        control,
        lanes: Arc::new(lanes),
        conn,
    };
    Connection {
        inbound: rx,
        outbound: Outbound {
            inner: OutboundInner::Quic(out),
            limit,
        },
        binding,
        kind: TransportKind::Quic,
        accepted_at: tokio::time::Instant::now(),
        remote,
    }
}

async fn accept_lanes(conn: quinn::Connection, tx: mpsc::Sender<Inbound>, limit: FrameLimit) {
    while let Ok(recv) = conn.accept_uni().await {
        tokio::spawn(read_stream(recv, tx.clone(), limit.clone(), true, None));
    }
}

/// Reads frames from one stream. Lane streams must start with StreamInit. The end of the
/// control stream ends the connection.
async fn read_stream(
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<Inbound>,
    limit: FrameLimit,
    mut expect_init: bool,
    control_of: Option<quinn::Connection>,
) {
    let mut decoder = FrameDecoder::new(limit.get());
    let mut buf = vec![0u8; 64 * 1024];
    // Ok(true): the peer ended (finished or reset) the stream; Ok(false): the session is gone.
    let outcome: Result<bool, ProtocolError> = async {
        loop {
            decoder.set_max_frame(limit.get());
            while let Some(frame) = decoder.next_frame()? {
                if expect_init {
                    match frame.kind {
                        Some(Kind::StreamInit(init)) if lane::from_wire(init.lane).is_some() => {
                            expect_init = false
                        }
                        _ => {
                            return Err(ProtocolError::UnexpectedFrame(
                                "a lane stream starts with stream_init",
                            ));
                        }
                    }
                    continue;
                }
                if tx.send(Inbound::Frame(frame)).await.is_err() {
                    return Ok(false);
                }
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.extend(&buf[..n]),
                Ok(None) => return decoder.finish().map(|()| true),
                Err(_) => return Ok(true),
            }
        }
    }
    .await;
    match outcome {
        // The session answers with Goaway{code} and closes the connection with that code
        // (SPEC.md 2.2.5). Closing here as well (code 0, after 200 ms) used to win that race
        // for every framing error on the control stream, and could cut the Goaway short.
        Err(e) => {
            let _ = tx.send(Inbound::Error(e)).await;
        }
        // The session ended and is closing the connection with its own code.
        Ok(false) => {}
        Ok(true) => {
            if let Some(conn) = control_of {
                // Nothing can be said after the control stream ends; give the session a
                // moment to drain what was read, then the connection goes.
                drop(tx);
                tokio::time::sleep(Duration::from_millis(200)).await;
                conn.close(0u32.into(), b"control stream ended");
            }
        }
    }
}

enum WriterTarget {
    Ready(quinn::SendStream),
    Lazy(quinn::Connection, Lane),
}

enum Out {
    Frame(Bytes),
    Finish(oneshot::Sender<()>),
}

fn spawn_writer(target: WriterTarget) -> mpsc::Sender<Out> {
    let (tx, mut rx) = mpsc::channel::<Out>(OUT_QUEUE);
    tokio::spawn(async move {
        let (mut stream, lazy) = match target {
            WriterTarget::Ready(s) => (Some(s), None),
            WriterTarget::Lazy(conn, lane) => (None, Some((conn, lane))),
        };
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            for out in batch.drain(..) {
                match out {
                    Out::Frame(bytes) => {
                        if stream.is_none()
                            && let Some((conn, lane)) = &lazy
                        {
                            let Ok(mut s) = conn.open_uni().await else {
                                return;
                            };
                            let init =
                                encode_kind(Kind::StreamInit(StreamInit { lane: *lane as i32 }));
                            if s.write_all(&init).await.is_err() {
                                return;
                            }
                            stream = Some(s);
                        }
                        let Some(s) = stream.as_mut() else { return };
                        if s.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Out::Finish(done) => {
                        if let Some(s) = stream.as_mut() {
                            let _ = s.finish();
                        }
                        let _ = done.send(());
                        return;
                    }
                }
            }
        }
    });
    tx
}

/// The sending side of a QUIC connection.
#[derive(Clone)]
pub struct QuicOut {
    control: mpsc::Sender<Out>,
    lanes: Arc<[mpsc::Sender<Out>; 3]>,
    conn: quinn::Connection,
}

impl QuicOut {
    fn queue(&self, lane: Option<Lane>) -> &mpsc::Sender<Out> {
        match lane {
            Some(Lane::Call) => &self.lanes[0],
            Some(Lane::Chat) => &self.lanes[1],
            Some(Lane::Bulk) => &self.lanes[2],
            Some(Lane::Unspecified) | None => &self.control,
        }
    }

    pub(super) fn send(&self, lane: Option<Lane>, frame: Bytes) -> Result<(), SendError> {
        self.queue(lane)
            .try_send(Out::Frame(frame))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendError::Full,
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            })
    }

    pub(super) async fn close(&self, last: Option<Bytes>, code: u32) {
        if let Some(frame) = last {
            let _ = self.control.try_send(Out::Frame(frame));
        }
        let mut waits = Vec::new();
        for q in std::iter::once(&self.control).chain(self.lanes.iter()) {
            let (done, wait) = oneshot::channel();
            if q.try_send(Out::Finish(done)).is_ok() {
                waits.push(wait);
            }
        }
        let flush = async {
            for w in waits {
                let _ = w.await;
            }
            // Give the peer a moment to read the Goaway and close first.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.conn.closed()).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), flush).await;
        self.conn.close(code.into(), b"goaway");
    }
}
