//! WebSocket transport (tokio-tungstenite), plain or over TLS (tokio-rustls, so that the TLS
//! exporter is at hand for the channel binding). Binary messages only, each holding one or
//! more whole frames; frames queued together leave in one message.

use super::{
    Connection, FrameLimit, INBOUND_QUEUE, Inbound, Outbound, OutboundInner, SendError,
    TransportKind,
};
use bytes::{Bytes, BytesMut};
use federation_spec::frame::decode_message_bytes;
use federation_spec::handshake::ChannelBinding;
use federation_spec::{EXPORTER_LABEL, ProtocolError, WS_SUBPROTOCOL};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tracing::debug;

/// Frames queued for a WebSocket peer before it counts as not reading.
pub const OUT_QUEUE: usize = 32 * 1024;
/// Frames sent together are packed into messages of at most this many bytes.
const MAX_MESSAGE: usize = 256 * 1024;
/// How long a closed connection waits for the peer's WebSocket Close before the socket goes.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Accepts connections until `listener` fails, handing each to `handler`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
    max_message: usize,
    handler: impl Fn(Connection) + Clone + Send + 'static,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "ws accept failed");
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let handler = handler.clone();
        let acceptor = acceptor.clone();
        let accepted_at = tokio::time::Instant::now();
        tokio::spawn(async move {
            let setup = async {
                match acceptor {
                    Some(acceptor) => {
                        let tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
                        let mut binding = [0u8; 32];
                        tls.get_ref()
                            .1
                            .export_keying_material(&mut binding, EXPORTER_LABEL, Some(b""))
                            .map_err(|e| e.to_string())?;
                        upgrade(
                            tls,
                            ChannelBinding::tls_exporter(binding),
                            remote,
                            max_message,
                        )
                        .await
                    }
                    None => upgrade(tcp, ChannelBinding::none(), remote, max_message).await,
                }
            };
            match tokio::time::timeout(handshake_timeout, setup).await {
                Ok(Ok(conn)) => handler(Connection {
                    accepted_at,
                    ..conn
                }),
                Ok(Err(e)) => debug!(%remote, error = %e, "websocket set-up failed"),
                Err(_) => debug!(%remote, "websocket set-up timed out"),
            }
        });
    }
}

/// The HTTP upgrade: the peer must ask for our subprotocol, and we confirm it.
#[allow(clippy::result_large_err)] // the callback's signature is tungstenite's
fn check_subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == WS_SUBPROTOCOL);
    if !offered {
        let mut err = ErrorResponse::new(Some(format!("subprotocol {WS_SUBPROTOCOL} required")));
        *err.status_mut() = StatusCode::BAD_REQUEST;
        return Err(err);
    }
    resp.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(WS_SUBPROTOCOL),
    );
    Ok(resp)
}

async fn upgrade<S>(
    stream: S,
    binding: ChannelBinding,
    remote: SocketAddr,
    max_message: usize,
) -> Result<Connection, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_subprotocol, Some(config))
            .await
            .map_err(|e| e.to_string())?;
    let (sink, stream) = ws.split();
    let limit = FrameLimit::new();
    let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE);
    let reader = tokio::spawn(read(stream, in_tx, limit.clone()));
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let writer = tokio::spawn(write(sink, out_rx));
    Ok(Connection {
        inbound: in_rx,
        outbound: Outbound {
            inner: OutboundInner::Ws(WsOut {
                tx: out_tx,
                tasks: Arc::new(Tasks {
                    reader: reader.abort_handle(),
                    writer: writer.abort_handle(),
                }),
            }),
            limit,
        },
        binding,
        kind: TransportKind::Ws,
        accepted_at: tokio::time::Instant::now(),
        remote,
    })
}

async fn read<S>(mut stream: S, tx: mpsc::Sender<Inbound>, limit: FrameLimit)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(message) = stream.next().await {
        let frames = match message {
            Ok(Message::Binary(data)) => decode_message_bytes(data, limit.get()),
            Ok(Message::Text(_)) => Err(ProtocolError::Malformed(
                "text websocket message; frames are binary".into(),
            )),
            Ok(Message::Close(_)) => return,
            // Pings are answered by tungstenite itself.
            Ok(_) => continue,
            Err(tokio_tungstenite::tungstenite::Error::Capacity(e)) => {
                debug!(error = %e, "websocket message over the size limit");
                Err(ProtocolError::FrameTooLarge {
                    len: usize::MAX,
                    max: limit.get(),
                })
            }
            Err(_) => return,
        };
        match frames {
            Ok(frames) => {
                for frame in frames {
                    if tx.send(Inbound::Frame(frame)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = tx.send(Inbound::Error(e)).await;
                return;
            }
        }
    }
}

enum Out {
    Frame(Bytes),
    /// Close with this code (0: normal closure) and report when done.
    Finish(u32, oneshot::Sender<()>),
}

async fn write<S>(mut sink: S, mut rx: mpsc::Receiver<Out>)
where
    S: futures_util::Sink<Message> + Unpin,
{
    let mut batch = Vec::with_capacity(512);
    while rx.recv_many(&mut batch, 512).await > 0 {
        let mut message = BytesMut::new();
        let mut finish = None;
        for out in batch.drain(..) {
            match out {
                Out::Frame(frame) => {
                    // A message holds at most one maximum frame's worth (SPEC.md 2.3), so a
                    // peer with a standard WebSocket size limit can read it.
                    if !message.is_empty()
                        && message.len() + frame.len() > MAX_MESSAGE
                        && sink
                            .send(Message::Binary(message.split().freeze()))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    message.extend_from_slice(&frame);
                }
                Out::Finish(code, done) => finish = Some((code, done)),
            }
        }
        if !message.is_empty() && sink.send(Message::Binary(message.freeze())).await.is_err() {
            return;
        }
        if let Some((code, done)) = finish {
            let close = match code {
                0 => CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                },
                code => CloseFrame {
                    code: CloseCode::from(4000 + code as u16),
                    reason: "goaway".into(),
                },
            };
            let _ = sink.send(Message::Close(Some(close))).await;
            let _ = sink.close().await;
            let _ = done.send(());
            return;
        }
    }
}

/// The sending side of a WebSocket connection.
#[derive(Clone)]
pub struct WsOut {
    tx: mpsc::Sender<Out>,
    tasks: Arc<Tasks>,
}

/// The connection's reader and writer tasks. Each holds half of the socket, so the socket is
/// gone only when both have ended.
struct Tasks {
    reader: tokio::task::AbortHandle,
    writer: tokio::task::AbortHandle,
}

impl WsOut {
    pub(super) fn send(&self, frame: Bytes) -> Result<(), SendError> {
        self.tx.try_send(Out::Frame(frame)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Sends what is queued, `last` and a Close, then lets the socket go. The socket is
    /// released even when the peer does not cooperate (SPEC.md 11.5): a peer that does not
    /// read leaves the writer stuck on a full socket with its queue, and a peer that neither
    /// answers the Close nor sends anything leaves the reader waiting; either used to keep
    /// the socket (and the queue) for as long as the peer kept the connection open.
    pub(super) async fn close(&self, last: Option<Bytes>, code: u32) {
        if let Some(frame) = last {
            let _ = self.tx.try_send(Out::Frame(frame));
        }
        let (done, wait) = oneshot::channel();
        let sent = self.tx.try_send(Out::Finish(code, done)).is_ok()
            && matches!(
                tokio::time::timeout(Duration::from_secs(3), wait).await,
                Ok(Ok(()))
            );
        if sent {
            let reader = self.tasks.reader.clone();
            tokio::spawn(async move {
                tokio::time::sleep(CLOSE_GRACE).await;
                reader.abort();
            });
        } else {
            self.tasks.writer.abort();
            self.tasks.reader.abort();
        }
    }
}
