//! Transports: QUIC and WebSocket move bytes between a peer and its session, nothing more.
//!
//! Each accepted connection becomes a [`Connection`]: a bounded channel of decoded inbound
//! frames (from every stream of the connection), and an [`Outbound`] handle that queues encoded
//! frames on the right stream. Both directions are bounded: a peer that floods us is slowed
//! by transport flow control because its reader stops reading, and a peer that never reads
//! fills its outbound queue and is disconnected instead of costing us unbounded memory.

pub mod quic;
pub mod ws;

use bytes::Bytes;
use federation_spec::ProtocolError;
use federation_spec::handshake::ChannelBinding;
use federation_spec::proto::{Frame, Goaway, Lane, frame::Kind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// Frames a connection's readers may queue ahead of the session.
pub const INBOUND_QUEUE: usize = 4096;

/// Which transport a connection came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// QUIC.
    Quic,
    /// WebSocket (plain or TLS).
    Ws,
}

impl TransportKind {
    /// Its name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Ws => "ws",
        }
    }
}

/// Something read from the peer.
#[derive(Debug)]
pub enum Inbound {
    /// A whole frame, and the lane of the QUIC stream it came on (None: control or WebSocket).
    Frame(Frame),
    /// The peer broke the framing; the connection is unusable.
    Error(ProtocolError),
}

/// The outbound queue is full (the peer is not reading) or the connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The peer does not read fast enough.
    #[error("peer is not reading: outbound queue full")]
    Full,
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
}

/// A connection that finished its transport set-up and waits for the protocol handshake.
pub struct Connection {
    /// Frames from the peer, in order per stream. Closed at end of stream.
    pub inbound: mpsc::Receiver<Inbound>,
    /// Sending side.
    pub outbound: Outbound,
    /// The TLS exporter binding, or none.
    pub binding: ChannelBinding,
    /// QUIC or WebSocket.
    pub kind: TransportKind,
    /// The peer's address.
    pub remote: SocketAddr,
    /// When the socket was accepted: the handshake timeout counts from here, transport set-up
    /// (TLS, the WebSocket upgrade, QUIC's control stream) included.
    pub accepted_at: tokio::time::Instant,
}

/// The limit on inbound frame size, shared with the reader tasks so the session can raise it
/// from the handshake limit to the session limit after Welcome.
#[derive(Debug, Clone)]
pub struct FrameLimit(Arc<AtomicUsize>);

impl FrameLimit {
    /// Starts at the handshake limit.
    pub fn new() -> Self {
        Self(Arc::new(AtomicUsize::new(
            federation_spec::frame::HANDSHAKE_MAX_FRAME,
        )))
    }
    /// The current limit.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
    /// Sets the limit.
    pub fn set(&self, max: usize) {
        self.0.store(max, Ordering::Relaxed);
    }
}

impl Default for FrameLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// The sending half of a connection.
#[derive(Clone)]
pub struct Outbound {
    inner: OutboundInner,
    limit: FrameLimit,
}

#[derive(Clone)]
enum OutboundInner {
    Ws(ws::WsOut),
    Quic(quic::QuicOut),
}

impl Outbound {
    /// Queues an encoded frame (length prefix included) for the stream of `lane` (None: the
    /// control stream). Never waits: a full queue means the peer is not reading.
    pub fn send(&self, lane: Option<Lane>, frame: Bytes) -> Result<(), SendError> {
        match &self.inner {
            OutboundInner::Ws(w) => w.send(frame),
            OutboundInner::Quic(q) => q.send(lane, frame),
        }
    }

    /// Sends `goaway` if any, flushes what is queued, and closes the connection with the
    /// Goaway's code as the close code (QUIC: the code; WebSocket: 4000 + the code, SPEC.md
    /// 2.3.3), or a normal close without one.
    pub async fn close(&self, goaway: Option<Goaway>) {
        let code = goaway.as_ref().map(|g| g.code as u32).unwrap_or(0);
        let last = goaway.map(|g| federation_spec::frame::encode_kind(Kind::Goaway(g)));
        self.close_with(last, code).await;
    }

    /// Closes with `code` after a Goaway that was already sent (a drain).
    pub async fn close_after_goaway(&self, code: u32) {
        self.close_with(None, code).await;
    }

    async fn close_with(&self, last: Option<Bytes>, code: u32) {
        match &self.inner {
            OutboundInner::Ws(w) => w.close(last, code).await,
            OutboundInner::Quic(q) => q.close(last, code).await,
        }
    }

    /// Raises or lowers the inbound frame limit.
    pub fn set_max_frame(&self, max: usize) {
        self.limit.set(max);
    }
}
