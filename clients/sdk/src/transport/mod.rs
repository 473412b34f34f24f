//! Moving frames between the session and the relay: QUIC ([`quic`]) or WebSocket ([`ws`]).
//!
//! [`connect`] opens a connection, computes the channel binding, runs the handshake and
//! returns a [`Link`]: a channel of frames read from the relay and a way to write frames to a
//! [`Route`]. Behind a link, one task reads each stream and one task writes each stream, so a
//! slow lane never holds up another and the session task itself never blocks on a socket.
//!
//! Writers batch: every frame queued while the previous write was in progress goes out in the
//! next write (on WebSocket, in one binary message of at most `max_frame_bytes + 4` bytes).

mod handshake;
mod quic;
mod stream;
pub(crate) mod tls;
mod ws;

use crate::config::ConnectParams;
use crate::error::ClientError;
use crate::session::{Route, Transmit};
use bytes::{Bytes, BytesMut};
use federation_spec::ProtocolError;
use federation_spec::frame::{LENGTH_PREFIX, encode_kind};
use federation_spec::proto::frame::Kind;
use federation_spec::proto::{ErrorCode, Frame, Goaway, Lane, Welcome};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// Frames queued from the readers to the session task.
const READ_QUEUE: usize = 1024;
/// Frames queued from the session task to one writer.
const WRITE_QUEUE: usize = 4096;
/// Bytes of small frames written together at most.
const MAX_BATCH: usize = 256 * 1024;
/// How long a close waits for the Goaway to be written and the stream finished.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Why a link stopped.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LinkError {
    /// The relay broke the protocol: answer with a Goaway of this error and close.
    Protocol(ProtocolError),
    /// The connection failed or was closed.
    Closed(String),
}

impl From<ProtocolError> for LinkError {
    fn from(e: ProtocolError) -> Self {
        Self::Protocol(e)
    }
}

impl From<std::io::Error> for LinkError {
    fn from(e: std::io::Error) -> Self {
        Self::Closed(e.to_string())
    }
}

impl From<LinkError> for ClientError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Protocol(e) => ClientError::Handshake(e),
            LinkError::Closed(reason) => ClientError::ClosedDuringHandshake(reason),
        }
    }
}

/// What the reader tasks report.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    Frame(Frame),
    Failed(LinkError),
}

/// A command to a writer task.
#[derive(Debug)]
pub(crate) enum WriterCmd {
    /// Write this length-prefixed frame.
    Frame(Bytes),
    /// Write what is queued, end the stream (WebSocket: Close with this code), then report.
    Finish {
        close_code: Option<ErrorCode>,
        done: oneshot::Sender<()>,
    },
}

/// What a writer does next.
#[derive(Debug)]
pub(crate) enum Batch {
    /// Write these bytes (one or more whole frames).
    Data(Bytes),
    /// Write these bytes (maybe empty), then finish.
    Finish(Bytes, Option<ErrorCode>, oneshot::Sender<()>),
    /// The session dropped the link: write these bytes (maybe empty) and stop.
    End(Bytes),
}

/// Waits for at least one command and collects what else is already queued, up to `max`
/// bytes per batch. `carry` holds a frame that did not fit into the previous batch.
pub(crate) async fn next_batch(
    rx: &mut mpsc::Receiver<WriterCmd>,
    carry: &mut Option<Bytes>,
    max: usize,
) -> Batch {
    let mut buf = BytesMut::new();
    if let Some(frame) = carry.take() {
        buf.extend_from_slice(&frame);
    } else {
        match rx.recv().await {
            Some(WriterCmd::Frame(frame)) => buf.extend_from_slice(&frame),
            Some(WriterCmd::Finish { close_code, done }) => {
                return Batch::Finish(Bytes::new(), close_code, done);
            }
            None => return Batch::End(Bytes::new()),
        }
    }
    loop {
        match rx.try_recv() {
            Ok(WriterCmd::Frame(frame)) if buf.len() + frame.len() <= max => {
                buf.extend_from_slice(&frame)
            }
            Ok(WriterCmd::Frame(frame)) => {
                *carry = Some(frame);
                return Batch::Data(buf.freeze());
            }
            Ok(WriterCmd::Finish { close_code, done }) => {
                return Batch::Finish(buf.freeze(), close_code, done);
            }
            Err(mpsc::error::TryRecvError::Empty) => return Batch::Data(buf.freeze()),
            Err(mpsc::error::TryRecvError::Disconnected) => return Batch::End(buf.freeze()),
        }
    }
}

/// The largest batch a writer builds. A WebSocket message may hold `max_frame + 4` bytes
/// (SPEC.md 2.3.2), but a frame that large goes alone anyway; batches of small frames stay
/// within what WebSocket libraries accept by default, as the relay's do.
pub(crate) fn batch_limit(max_frame: usize) -> usize {
    (max_frame + LENGTH_PREFIX).min(MAX_BATCH)
}

/// Opens a connection to the relay and runs the handshake, within the handshake timeout.
pub(crate) async fn connect(
    params: Arc<ConnectParams>,
    receive_window: u32,
) -> Result<(Link, Welcome), ClientError> {
    let timeout = params.handshake_timeout;
    let attempt = async {
        match params.url.scheme {
            crate::url::Scheme::Quic => quic::connect(&params, receive_window).await,
            crate::url::Scheme::Ws | crate::url::Scheme::Wss => {
                ws::connect(&params, receive_window).await
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ClientError::Timeout)?
}

/// How frames reach the relay.
enum Writers {
    Quic(quic::QuicWriters),
    Ws(mpsc::Sender<WriterCmd>),
}

/// An established connection: frames in, frames out.
pub(crate) struct Link {
    events: mpsc::Receiver<LinkEvent>,
    /// For writer tasks spawned later (QUIC lanes) to report failures.
    events_tx: mpsc::Sender<LinkEvent>,
    writers: Writers,
    /// Every reader and writer task; dropping the link aborts them.
    tasks: JoinSet<()>,
    max_frame: usize,
}

impl Link {
    /// The next frame or failure. A link whose tasks are all gone reports it as closed.
    pub(crate) async fn recv(&mut self) -> LinkEvent {
        self.events.recv().await.unwrap_or_else(|| {
            LinkEvent::Failed(LinkError::Closed("connection tasks ended".into()))
        })
    }

    /// What else has arrived already, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<LinkEvent> {
        self.events.try_recv().ok()
    }

    /// Queues a frame for its stream. Waits only when the writer is far behind; an error
    /// means the connection is going away (a reader will report why).
    pub(crate) async fn send(&mut self, transmit: Transmit) -> Result<(), LinkError> {
        let sender = match &mut self.writers {
            Writers::Ws(tx) => tx.clone(),
            Writers::Quic(q) => match transmit.route {
                Route::Control => q.control.clone(),
                Route::Lane(lane) => q.lane(
                    lane,
                    &mut self.tasks,
                    self.events_tx.clone(),
                    self.max_frame,
                ),
            },
        };
        sender
            .send(WriterCmd::Frame(transmit.bytes))
            .await
            .map_err(|_| LinkError::Closed("writer stopped".into()))
    }

    /// Ends the connection: writes `goaway` if given, finishes the control stream (or sends
    /// the WebSocket Close), then closes. Bounded by a short timeout.
    pub(crate) async fn close(mut self, goaway: Option<Goaway>) {
        let code = goaway.as_ref().map(|g| crate::error::error_code(g.code));
        let control = match &self.writers {
            Writers::Ws(tx) => tx.clone(),
            Writers::Quic(q) => q.control.clone(),
        };
        let (done, finished) = oneshot::channel();
        let flush = async {
            if let Some(g) = goaway {
                let _ = control
                    .send(WriterCmd::Frame(encode_kind(Kind::Goaway(g))))
                    .await;
            }
            let _ = control
                .send(WriterCmd::Finish {
                    close_code: code,
                    done,
                })
                .await;
            let _ = finished.await;
        };
        let _ = tokio::time::timeout(CLOSE_FLUSH, flush).await;
        if let Writers::Quic(q) = &self.writers {
            q.close(code).await;
        }
        self.tasks.abort_all();
    }
}

/// The lanes a QUIC client may open a stream for.
pub(crate) fn lane_slot(lane: Lane) -> usize {
    match lane {
        Lane::Call => 0,
        Lane::Chat | Lane::Unspecified => 1,
        Lane::Bulk => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_what_is_queued_up_to_the_limit() {
        let (tx, mut rx) = mpsc::channel(16);
        for n in 0..5u8 {
            tx.send(WriterCmd::Frame(Bytes::from(vec![n; 4])))
                .await
                .unwrap();
        }
        let mut carry = None;
        let Batch::Data(first) = next_batch(&mut rx, &mut carry, 10).await else {
            panic!("expected data")
        };
        assert_eq!(&first[..], &[0, 0, 0, 0, 1, 1, 1, 1]);
        assert!(carry.is_some(), "the third frame did not fit");
        let Batch::Data(second) = next_batch(&mut rx, &mut carry, 10).await else {
            panic!("expected data")
        };
        assert_eq!(&second[..], &[2, 2, 2, 2, 3, 3, 3, 3]);
        let (done, _wait) = oneshot::channel();
        tx.send(WriterCmd::Finish {
            close_code: None,
            done,
        })
        .await
        .unwrap();
        let Batch::Finish(last, None, _) = next_batch(&mut rx, &mut carry, 10).await else {
            panic!("expected finish")
        };
        assert_eq!(&last[..], &[4, 4, 4, 4]);
        drop(tx);
        assert!(matches!(
            next_batch(&mut rx, &mut carry, 10).await,
            Batch::End(b) if b.is_empty()
        ));
    }
}
