//! WebSocket (SPEC.md 2.3): subprotocol `relay-fed.v1`, binary messages each holding one or
//! more whole frames. TLS for `wss://` is done here with tokio-rustls, not by tungstenite, so
//! that the TLS exporter of the connection can bind the handshake.

use super::handshake::{self, FrameIo};
use super::{
    Batch, Link, LinkError, LinkEvent, READ_QUEUE, WRITE_QUEUE, WriterCmd, Writers, batch_limit,
    next_batch,
};
use crate::config::ConnectParams;
use crate::error::ClientError;
use crate::session::effective_limits;
use crate::url::Scheme;
use bytes::Bytes;
use federation_spec::frame::{
    ABSOLUTE_MAX_FRAME, FrameDecoder, HANDSHAKE_MAX_FRAME, LENGTH_PREFIX,
};
use federation_spec::handshake::{ChannelBinding, ClientHandshake};
use federation_spec::proto::{Frame, Welcome};
use federation_spec::{EXPORTER_LABEL, ProtocolError, WS_SUBPROTOCOL};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Message, WebSocketConfig};

fn ws_error(e: impl std::fmt::Display) -> ClientError {
    ClientError::WebSocket(e.to_string())
}

/// Reads the next frame from a stream of WebSocket messages. The decoder keeps frames of a
/// message that came after the one returned (for example after `Welcome`).
async fn next_frame<S>(stream: &mut S, decoder: &mut FrameDecoder) -> Result<Frame, LinkError>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(frame);
        }
        if decoder.buffered() != 0 {
            return Err(LinkError::Protocol(ProtocolError::Malformed(
                "websocket message ended inside a frame".into(),
            )));
        }
        match stream.next().await {
            Some(Ok(Message::Binary(data))) => decoder.extend(&data),
            Some(Ok(Message::Text(_))) => {
                return Err(LinkError::Protocol(ProtocolError::Malformed(
                    "text websocket message".into(),
                )));
            }
            Some(Ok(Message::Close(frame))) => {
                let reason = match frame {
                    Some(f) => format!("relay closed the websocket ({}: {})", f.code, f.reason),
                    None => "relay closed the websocket".into(),
                };
                return Err(LinkError::Closed(reason));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(LinkError::Closed(format!("websocket: {e}"))),
            None => return Err(LinkError::Closed("websocket ended".into())),
        }
    }
}

/// The whole WebSocket during the handshake.
struct Handshaking<S> {
    ws: WebSocketStream<S>,
    decoder: FrameDecoder,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> FrameIo for Handshaking<S> {
    async fn send_frame(&mut self, frame: Bytes) -> Result<(), LinkError> {
        self.ws
            .send(Message::Binary(frame))
            .await
            .map_err(|e| LinkError::Closed(format!("websocket: {e}")))
    }

    async fn recv_frame(&mut self) -> Result<Option<Frame>, LinkError> {
        // A close is reported with its reason rather than as a bare end of stream.
        next_frame(&mut self.ws, &mut self.decoder).await.map(Some)
    }
}

/// Connects over TCP (and TLS for `wss://`), upgrades and runs the handshake.
pub(crate) async fn connect(
    params: &ConnectParams,
    receive_window: u32,
) -> Result<(Link, Welcome), ClientError> {
    let url = &params.url;
    let target = format!("{}:{}", url.host, url.port);
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|source| ClientError::Io {
            target: target.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    match url.scheme {
        Scheme::Wss => {
            let tls = params
                .tls
                .clone()
                .ok_or_else(|| ClientError::Config("no TLS configuration".into()))?;
            let name = super::tls::server_name(&url.host)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| ClientError::Transport(format!("TLS: {e}")))?;
            let binding: [u8; 32] = stream
                .get_ref()
                .1
                .export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
                .map_err(|e| ClientError::Transport(format!("TLS exporter: {e}")))?;
            upgrade(
                params,
                stream,
                ChannelBinding::tls_exporter(binding),
                receive_window,
            )
            .await
        }
        Scheme::Ws | Scheme::Quic => {
            upgrade(params, tcp, ChannelBinding::none(), receive_window).await
        }
    }
}

async fn upgrade<S>(
    params: &ConnectParams,
    stream: S,
    binding: ChannelBinding,
    receive_window: u32,
) -> Result<(Link, Welcome), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut request = params
        .url
        .ws_request_url()
        .into_client_request()
        .map_err(ws_error)?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(WS_SUBPROTOCOL),
    );
    let limit = ABSOLUTE_MAX_FRAME + LENGTH_PREFIX;
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let (ws, response) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(ws_error)?;
    // tungstenite checks that the answer is one we offered; we offered one, so insist on it.
    let selected = response.headers().get("Sec-WebSocket-Protocol");
    if selected.and_then(|v| v.to_str().ok()) != Some(WS_SUBPROTOCOL) {
        return Err(ClientError::WebSocket(format!(
            "the relay did not select subprotocol {WS_SUBPROTOCOL}"
        )));
    }
    let mut io = Handshaking {
        ws,
        decoder: FrameDecoder::new(HANDSHAKE_MAX_FRAME),
    };
    let handshake = ClientHandshake::new(
        params.peer.clone(),
        params.key.clone(),
        params.relay_key,
        binding,
        rand::random(),
    )
    .with_receive_window(receive_window)
    .with_agent(&params.agent);
    let welcome = match handshake::run(&mut io, handshake).await {
        Ok(welcome) => welcome,
        Err(e) => {
            let _ = io.ws.close(None).await;
            return Err(e);
        }
    };
    let max_frame =
        effective_limits(welcome.limits.as_ref(), receive_window).max_frame_bytes as usize;
    io.decoder.set_max_frame(max_frame);
    let (sink, stream) = io.ws.split();
    let (events_tx, events) = mpsc::channel(READ_QUEUE);
    let (writer_tx, writer_rx) = mpsc::channel(WRITE_QUEUE);
    let mut tasks = JoinSet::new();
    tasks.spawn(read_loop(stream, io.decoder, events_tx.clone()));
    tasks.spawn(write_loop(
        sink,
        writer_rx,
        batch_limit(max_frame),
        events_tx.clone(),
    ));
    let link = Link {
        events,
        events_tx,
        writers: Writers::Ws(writer_tx),
        tasks,
        max_frame,
    };
    Ok((link, welcome))
}

async fn read_loop<S>(mut stream: S, mut decoder: FrameDecoder, events: mpsc::Sender<LinkEvent>)
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match next_frame(&mut stream, &mut decoder).await {
            Ok(frame) => {
                if events.send(LinkEvent::Frame(frame)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = events.send(LinkEvent::Failed(e)).await;
                return;
            }
        }
    }
}

/// Writes queued frames, several to a binary message (SPEC.md 2.3.2).
async fn write_loop<S>(
    mut sink: S,
    mut rx: mpsc::Receiver<WriterCmd>,
    batch_max: usize,
    events: mpsc::Sender<LinkEvent>,
) where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let mut carry = None;
    loop {
        let result = match next_batch(&mut rx, &mut carry, batch_max).await {
            Batch::Data(data) => sink.send(Message::Binary(data)).await,
            Batch::Finish(data, code, done) => {
                if !data.is_empty() {
                    let _ = sink.send(Message::Binary(data)).await;
                }
                // SPEC.md 2.3.3: close status 4000 + the Goaway's code.
                let close = code.map(|c| CloseFrame {
                    code: (4000 + c as u16).into(),
                    reason: "".into(),
                });
                let _ = sink.send(Message::Close(close)).await;
                let _ = sink.close().await;
                let _ = done.send(());
                return;
            }
            Batch::End(data) => {
                if !data.is_empty() {
                    let _ = sink.send(Message::Binary(data)).await;
                }
                let _ = sink.close().await;
                return;
            }
        };
        if let Err(e) = result {
            let _ = events
                .send(LinkEvent::Failed(LinkError::Closed(format!(
                    "websocket write: {e}"
                ))))
                .await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use federation_spec::frame::encode_kind;
    use federation_spec::proto::{Ping, frame::Kind};

    fn ping(n: u64) -> Bytes {
        encode_kind(Kind::Ping(Ping { nonce: n }))
    }

    fn messages(list: Vec<Message>) -> impl Stream<Item = Result<Message, WsError>> + Unpin {
        futures_util::stream::iter(list.into_iter().map(Ok))
    }

    #[tokio::test]
    async fn several_frames_per_message_and_whole_frames_only() {
        let two = [ping(1), ping(2)].concat();
        let mut s = messages(vec![
            Message::Binary(two.into()),
            Message::Ping(Bytes::new()),
            Message::Binary(ping(3)),
            Message::Binary(ping(4).slice(..5)),
        ]);
        let mut dec = FrameDecoder::new(1024);
        for n in 1..=3 {
            let f = next_frame(&mut s, &mut dec).await.unwrap();
            assert_eq!(f.kind, Some(Kind::Ping(Ping { nonce: n })));
        }
        assert!(matches!(
            next_frame(&mut s, &mut dec).await,
            Err(LinkError::Protocol(ProtocolError::Malformed(_)))
        ));
    }

    #[tokio::test]
    async fn text_is_malformed_and_close_is_reported() {
        let mut dec = FrameDecoder::new(1024);
        let mut s = messages(vec![Message::text("hi")]);
        assert!(matches!(
            next_frame(&mut s, &mut dec).await,
            Err(LinkError::Protocol(ProtocolError::Malformed(_)))
        ));
        let mut s = messages(vec![Message::Close(Some(CloseFrame {
            code: 4018.into(),
            reason: "bye".into(),
        }))]);
        let Err(LinkError::Closed(reason)) = next_frame(&mut s, &mut dec).await else {
            panic!("expected closed")
        };
        assert!(
            reason.contains("4018") && reason.contains("bye"),
            "{reason}"
        );
    }
}
