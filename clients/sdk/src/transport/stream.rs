//! Frames over an ordered byte stream: a QUIC stream, or an in-memory pipe in tests.

use super::{Batch, LinkError, LinkEvent, WriterCmd, next_batch};
use bytes::Bytes;
use federation_spec::ProtocolError;
use federation_spec::frame::FrameDecoder;
use federation_spec::lane;
use federation_spec::proto::{Frame, frame::Kind};
use std::future::Future;
use tokio::io::{AsyncRead, AsyncReadExt};
#[cfg(test)]
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Free space kept in the read buffer, so that reads are not a few bytes at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Reads whole frames from a byte stream.
pub(crate) struct StreamReader<R> {
    io: R,
    decoder: FrameDecoder,
}

impl<R: AsyncRead + Unpin + Send> StreamReader<R> {
    pub(crate) fn new(io: R, max_frame: usize) -> Self {
        Self {
            io,
            decoder: FrameDecoder::new(max_frame),
        }
    }

    /// Switches to the session's frame limit after `Welcome`.
    pub(crate) fn set_max_frame(&mut self, max_frame: usize) {
        self.decoder.set_max_frame(max_frame);
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between frames.
    pub(crate) async fn next_frame(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            let buf = self.decoder.buffer_mut();
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            if self.io.read_buf(buf).await? == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
        }
    }
}

/// The writing half of a byte stream, with a way to end it.
pub(crate) trait ByteSink: Send + 'static {
    /// Writes all of `buf`.
    fn write_all(&mut self, buf: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Ends the stream after what was written, and waits until the peer has it if possible.
    fn finish(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// Any tokio writer (an in-memory pipe in tests).
#[cfg(test)]
pub(crate) struct IoSink<W>(pub(crate) W);

#[cfg(test)]
impl<W: AsyncWrite + Unpin + Send + 'static> ByteSink for IoSink<W> {
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        AsyncWriteExt::write_all(&mut self.0, buf).await?;
        self.0.flush().await
    }

    async fn finish(&mut self) -> std::io::Result<()> {
        self.0.shutdown().await
    }
}

/// Writes batches of frames to `sink` until the link is dropped or finished. `first` is
/// written before anything else (a lane stream's `StreamInit`).
pub(crate) async fn write_loop<S: ByteSink>(
    mut sink: S,
    mut rx: mpsc::Receiver<WriterCmd>,
    first: Option<Bytes>,
    batch_max: usize,
    events: mpsc::Sender<LinkEvent>,
) {
    let mut carry = first;
    loop {
        let result = match next_batch(&mut rx, &mut carry, batch_max).await {
            Batch::Data(data) => sink.write_all(&data).await,
            Batch::Finish(data, _, done) => {
                let result = match sink.write_all(&data).await {
                    Ok(()) => sink.finish().await,
                    Err(e) => Err(e),
                };
                let _ = done.send(());
                if let Err(e) = result {
                    tracing::debug!(error = %e, "finishing the stream failed");
                }
                return;
            }
            Batch::End(data) => {
                let _ = sink.write_all(&data).await;
                return;
            }
        };
        if let Err(e) = result {
            let _ = events
                .send(LinkEvent::Failed(LinkError::Closed(format!("write: {e}"))))
                .await;
            return;
        }
    }
}

/// Forwards the frames of the control stream; its end ends the session (SPEC.md 2.2.2).
pub(crate) async fn read_control<R: AsyncRead + Unpin + Send>(
    mut reader: StreamReader<R>,
    events: mpsc::Sender<LinkEvent>,
) {
    let failure = loop {
        match reader.next_frame().await {
            Ok(Some(frame)) => {
                if events.send(LinkEvent::Frame(frame)).await.is_err() {
                    return;
                }
            }
            Ok(None) => break LinkError::Closed("relay ended the control stream".into()),
            Err(e) => break e,
        }
    };
    let _ = events.send(LinkEvent::Failed(failure)).await;
}

/// Forwards the frames of one of the relay's lane streams, whose first frame must be
/// `StreamInit` naming a real lane (SPEC.md 2.2.3).
pub(crate) async fn read_lane<R: AsyncRead + Unpin + Send>(
    mut reader: StreamReader<R>,
    events: mpsc::Sender<LinkEvent>,
) {
    let failure = match reader.next_frame().await {
        Ok(Some(Frame {
            kind: Some(Kind::StreamInit(init)),
        })) if lane::from_wire(init.lane).is_some() => loop {
            match reader.next_frame().await {
                Ok(Some(frame)) => {
                    if events.send(LinkEvent::Frame(frame)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => break e,
            }
        },
        Ok(None) => return,
        Ok(Some(_)) => LinkError::Protocol(ProtocolError::UnexpectedFrame(
            "a lane stream must start with stream_init naming a lane",
        )),
        Err(e) => e,
    };
    let _ = events.send(LinkEvent::Failed(failure)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use federation_spec::frame::encode_kind;
    use federation_spec::proto::{Lane, Ping, StreamInit};

    fn ping(n: u64) -> Bytes {
        encode_kind(Kind::Ping(Ping { nonce: n }))
    }

    #[tokio::test]
    async fn lane_reader_checks_stream_init_then_forwards() {
        let (mut a, b) = tokio::io::duplex(1024);
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(read_lane(StreamReader::new(b, 1024), tx));
        let init = encode_kind(Kind::StreamInit(StreamInit {
            lane: Lane::Chat as i32,
        }));
        AsyncWriteExt::write_all(&mut a, &init).await.unwrap();
        AsyncWriteExt::write_all(&mut a, &ping(1)).await.unwrap();
        AsyncWriteExt::write_all(&mut a, &ping(2)[..3])
            .await
            .unwrap();
        let Some(LinkEvent::Frame(f)) = rx.recv().await else {
            panic!("expected a frame")
        };
        assert_eq!(f.kind, Some(Kind::Ping(Ping { nonce: 1 })));
        drop(a);
        let Some(LinkEvent::Failed(LinkError::Protocol(e))) = rx.recv().await else {
            panic!("a stream that ends inside a frame is malformed")
        };
        assert_eq!(e.code(), federation_spec::proto::ErrorCode::MalformedFrame);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn lane_reader_refuses_a_stream_without_stream_init() {
        let (mut a, b) = tokio::io::duplex(1024);
        let (tx, mut rx) = mpsc::channel(8);
        tokio::spawn(read_lane(StreamReader::new(b, 1024), tx));
        AsyncWriteExt::write_all(&mut a, &ping(1)).await.unwrap();
        assert!(matches!(
            rx.recv().await,
            Some(LinkEvent::Failed(LinkError::Protocol(
                ProtocolError::UnexpectedFrame(_)
            )))
        ));
    }

    #[tokio::test]
    async fn writer_batches_and_finishes() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (tx, rx) = mpsc::channel(8);
        let (ev_tx, _ev_rx) = mpsc::channel(8);
        tx.send(WriterCmd::Frame(ping(1))).await.unwrap();
        tx.send(WriterCmd::Frame(ping(2))).await.unwrap();
        let (done, finished) = tokio::sync::oneshot::channel();
        tx.send(WriterCmd::Finish {
            close_code: None,
            done,
        })
        .await
        .unwrap();
        let writer = tokio::spawn(write_loop(IoSink(a), rx, Some(ping(0)), 1 << 16, ev_tx));
        finished.await.unwrap();
        writer.await.unwrap();
        let mut reader = StreamReader::new(b, 1024);
        for n in 0..3 {
            let f = reader.next_frame().await.unwrap().unwrap();
            assert_eq!(f.kind, Some(Kind::Ping(Ping { nonce: n })));
        }
        assert_eq!(reader.next_frame().await.unwrap(), None, "finished cleanly");
    }
}
