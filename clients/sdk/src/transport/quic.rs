//! QUIC (SPEC.md 2.2): the handshake on the first bidirectional stream (the control
//! stream), then one unidirectional stream per lane in each direction, opened on first use
//! and starting with `StreamInit`.

use super::handshake::{self, FrameIo};
use super::stream::{ByteSink, StreamReader, read_control, read_lane, write_loop};
use super::{
    CLOSE_FLUSH, Link, LinkError, LinkEvent, READ_QUEUE, WRITE_QUEUE, WriterCmd, Writers,
    batch_limit, lane_slot,
};
use crate::config::ConnectParams;
use crate::error::ClientError;
use crate::session::effective_limits;
use bytes::Bytes;
use federation_spec::frame::{HANDSHAKE_MAX_FRAME, encode_kind};
use federation_spec::handshake::{ChannelBinding, ClientHandshake};
use federation_spec::proto::{ErrorCode, Frame, Lane, StreamInit, Welcome, frame::Kind};
use federation_spec::{ALPN, EXPORTER_LABEL};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Stream priorities: control frames (acks, pongs) first, then call, chat, bulk.
const CONTROL_PRIORITY: i32 = 3;

fn lane_priority(lane: Lane) -> i32 {
    match lane {
        Lane::Call => 2,
        Lane::Chat | Lane::Unspecified => 1,
        Lane::Bulk => 0,
    }
}

fn transport_error(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// A QUIC send stream.
struct QuicSink(quinn::SendStream);

impl ByteSink for QuicSink {
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf).await.map_err(std::io::Error::from)
    }

    async fn finish(&mut self) -> std::io::Result<()> {
        self.0
            .finish()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // Wait until the relay has the data, so that closing the connection next does not
        // discard the Goaway.
        let _ = tokio::time::timeout(CLOSE_FLUSH, self.0.stopped()).await;
        Ok(())
    }
}

/// The control stream during the handshake.
struct Control {
    reader: StreamReader<quinn::RecvStream>,
    sink: QuicSink,
}

impl FrameIo for Control {
    async fn send_frame(&mut self, frame: Bytes) -> Result<(), LinkError> {
        Ok(self.sink.write_all(&frame).await?)
    }

    async fn recv_frame(&mut self) -> Result<Option<Frame>, LinkError> {
        self.reader.next_frame().await
    }
}

/// The writing side of a QUIC link.
pub(crate) struct QuicWriters {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    pub(crate) control: mpsc::Sender<WriterCmd>,
    lanes: [Option<mpsc::Sender<WriterCmd>>; 3],
}

impl QuicWriters {
    /// The writer of a lane stream, opening the stream on first use.
    pub(crate) fn lane(
        &mut self,
        lane: Lane,
        tasks: &mut JoinSet<()>,
        events: mpsc::Sender<LinkEvent>,
        max_frame: usize,
    ) -> mpsc::Sender<WriterCmd> {
        let slot = &mut self.lanes[lane_slot(lane)];
        if let Some(tx) = slot {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let conn = self.conn.clone();
        tasks.spawn(async move {
            match conn.open_uni().await {
                Ok(send) => {
                    let _ = send.set_priority(lane_priority(lane));
                    let init = encode_kind(Kind::StreamInit(StreamInit { lane: lane as i32 }));
                    write_loop(
                        QuicSink(send),
                        rx,
                        Some(init),
                        batch_limit(max_frame),
                        events,
                    )
                    .await;
                }
                Err(e) => {
                    let reason = format!("opening the {} stream: {e}", lane.as_str_name());
                    let _ = events
                        .send(LinkEvent::Failed(LinkError::Closed(reason)))
                        .await;
                }
            }
        });
        *slot = Some(tx.clone());
        tx
    }

    /// Closes the connection with the code of the Goaway (informative, SPEC.md 2.2.5).
    pub(crate) async fn close(&self, code: Option<ErrorCode>) {
        let code = code.map_or(0, |c| c as u32);
        self.conn.close(code.into(), b"");
        // Give the endpoint a moment to send the CONNECTION_CLOSE.
        let _ = tokio::time::timeout(Duration::from_millis(200), self.endpoint.wait_idle()).await;
    }
}

/// Connects, checks ALPN, binds the handshake to the TLS exporter and runs it.
pub(crate) async fn connect(
    params: &ConnectParams,
    receive_window: u32,
) -> Result<(Link, Welcome), ClientError> {
    let config = params
        .quic
        .clone()
        .ok_or_else(|| ClientError::Config("no QUIC configuration".into()))?;
    let url = &params.url;
    let target = format!("{}:{}", url.host, url.port);
    let io_error = |source| ClientError::Io {
        target: target.clone(),
        source,
    };
    let addr = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(io_error)?
        .next()
        .ok_or_else(|| io_error(std::io::ErrorKind::NotFound.into()))?;
    let bind: SocketAddr = if addr.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(io_error)?;
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(addr, &url.host)
        .map_err(transport_error)?
        .await
        .map_err(transport_error)?;
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() != Some(ALPN) {
        conn.close(0u32.into(), b"ALPN");
        return Err(ClientError::Transport(
            "the relay did not select ALPN relay-fed/1".into(),
        ));
    }
    let mut binding = [0u8; 32];
    conn.export_keying_material(&mut binding, EXPORTER_LABEL, b"")
        .map_err(|_| ClientError::Transport("TLS exporter unavailable".into()))?;
    let (send, recv) = conn.open_bi().await.map_err(transport_error)?;
    let _ = send.set_priority(CONTROL_PRIORITY);
    let mut control = Control {
        reader: StreamReader::new(recv, HANDSHAKE_MAX_FRAME),
        sink: QuicSink(send),
    };
    let handshake = ClientHandshake::new(
        params.peer.clone(),
        params.key.clone(),
        params.relay_key,
        ChannelBinding::tls_exporter(binding),
        rand::random(),
    )
    .with_receive_window(receive_window)
    .with_agent(&params.agent);
    let welcome = match handshake::run(&mut control, handshake).await {
        Ok(welcome) => welcome,
        Err(e) => {
            let code = match &e {
                ClientError::Handshake(p) => p.code() as u32,
                _ => 0,
            };
            conn.close(code.into(), b"");
            return Err(e);
        }
    };
    let max_frame =
        effective_limits(welcome.limits.as_ref(), receive_window).max_frame_bytes as usize;
    control.reader.set_max_frame(max_frame);

    let (events_tx, events) = mpsc::channel(READ_QUEUE);
    let mut tasks = JoinSet::new();
    tasks.spawn(read_control(control.reader, events_tx.clone()));
    tasks.spawn(accept_lanes(conn.clone(), events_tx.clone(), max_frame));
    let (control_tx, control_rx) = mpsc::channel(WRITE_QUEUE);
    tasks.spawn(write_loop(
        control.sink,
        control_rx,
        None,
        batch_limit(max_frame),
        events_tx.clone(),
    ));
    let link = Link {
        events,
        events_tx,
        writers: Writers::Quic(QuicWriters {
            conn,
            endpoint,
            control: control_tx,
            lanes: Default::default(),
        }),
        tasks,
        max_frame,
    };
    Ok((link, welcome))
}

/// Reads every lane stream the relay opens; reports the connection's end.
async fn accept_lanes(conn: quinn::Connection, events: mpsc::Sender<LinkEvent>, max_frame: usize) {
    let mut readers = JoinSet::new();
    let reason = loop {
        tokio::select! {
            accepted = conn.accept_uni() => match accepted {
                Ok(recv) => {
                    readers.spawn(read_lane(StreamReader::new(recv, max_frame), events.clone()));
                }
                Err(e) => break e,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    };
    let _ = events
        .send(LinkEvent::Failed(LinkError::Closed(format!(
            "connection closed: {reason}"
        ))))
        .await;
}
