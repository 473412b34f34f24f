//! Runs the spec crate's [`ClientHandshake`] over any transport that can send and receive
//! frames. The state machine decides; this only moves its frames.

use super::LinkError;
use crate::error::{ClientError, error_code};
use bytes::Bytes;
use federation_spec::frame::{encode_kind, encode_to_bytes};
use federation_spec::handshake::{ClientHandshake, ClientStep};
use federation_spec::proto::{Frame, Welcome, frame::Kind};
use std::future::Future;

/// A connection during the handshake: one frame at a time, in both directions.
pub(crate) trait FrameIo: Send {
    /// Writes one length-prefixed frame.
    fn send_frame(&mut self, frame: Bytes) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// The next frame; `Ok(None)` when the connection ended.
    fn recv_frame(&mut self) -> impl Future<Output = Result<Option<Frame>, LinkError>> + Send;
}

/// Runs the handshake to `Welcome`. On a protocol error it sends the error's `Goaway` first.
pub(crate) async fn run<I: FrameIo>(
    io: &mut I,
    mut handshake: ClientHandshake,
) -> Result<Welcome, ClientError> {
    io.send_frame(encode_to_bytes(&handshake.hello())).await?;
    loop {
        let frame = match io.recv_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                return Err(ClientError::ClosedDuringHandshake(
                    "the relay ended the stream".into(),
                ));
            }
            Err(LinkError::Protocol(e)) => return Err(refuse(io, e).await),
            Err(e) => return Err(e.into()),
        };
        match handshake.handle(frame) {
            Ok(ClientStep::Reply(reply)) => io.send_frame(encode_to_bytes(&reply)).await?,
            Ok(ClientStep::Established(welcome)) => return Ok(welcome),
            Ok(ClientStep::Refused(goaway)) => {
                return Err(ClientError::Refused {
                    code: error_code(goaway.code),
                    reason: goaway.reason,
                    reconnect_after_ms: goaway.reconnect_after_ms,
                });
            }
            Err(e) => return Err(refuse(io, e).await),
        }
    }
}

async fn refuse<I: FrameIo>(io: &mut I, error: federation_spec::ProtocolError) -> ClientError {
    let _ = io
        .send_frame(encode_kind(Kind::Goaway(error.to_goaway())))
        .await;
    ClientError::Handshake(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::stream::{IoSink, StreamReader};
    use ed25519_dalek::{SigningKey, VerifyingKey};
    use federation_spec::ProtocolError;
    use federation_spec::frame::HANDSHAKE_MAX_FRAME;
    use federation_spec::handshake::{ChannelBinding, PeerDirectory, ServerHandshake, ServerStep};
    use federation_spec::proto::{ErrorCode, Goaway, Role};
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    struct Pipe {
        reader: StreamReader<ReadHalf<DuplexStream>>,
        writer: IoSink<WriteHalf<DuplexStream>>,
    }

    impl Pipe {
        fn new(io: DuplexStream) -> Self {
            let (r, w) = tokio::io::split(io);
            Self {
                reader: StreamReader::new(r, HANDSHAKE_MAX_FRAME),
                writer: IoSink(w),
            }
        }
    }

    impl FrameIo for Pipe {
        async fn send_frame(&mut self, frame: Bytes) -> Result<(), LinkError> {
            use crate::transport::stream::ByteSink;
            Ok(self.writer.write_all(&frame).await?)
        }
        async fn recv_frame(&mut self) -> Result<Option<Frame>, LinkError> {
            self.reader.next_frame().await
        }
    }

    struct Dir(VerifyingKey);
    impl PeerDirectory for Dir {
        fn lookup(&self, peer: &str) -> Option<(Role, Vec<VerifyingKey>)> {
            (peer == "alpha").then(|| (Role::Platform, vec![self.0]))
        }
    }

    /// The relay's side, driven by the spec crate's server machine.
    async fn relay(io: DuplexStream, key: SigningKey, dir: Dir, refuse: bool) -> Option<Frame> {
        let mut pipe = Pipe::new(io);
        let mut hs = ServerHandshake::new(key, "test-relay", ChannelBinding::none(), [5; 32]);
        loop {
            let frame = pipe.recv_frame().await.ok()??;
            let seen = frame.clone();
            match hs.handle(frame, &dir) {
                Ok(ServerStep::Reply(f)) => pipe.send_frame(encode_to_bytes(&f)).await.ok()?,
                Ok(ServerStep::Authenticated(_)) if refuse => {
                    let g = Goaway {
                        code: ErrorCode::AuthFailed as i32,
                        reason: "no".into(),
                        reconnect_after_ms: 0,
                    };
                    pipe.send_frame(encode_kind(Kind::Goaway(g))).await.ok()?;
                    return None;
                }
                Ok(ServerStep::Authenticated(a)) => {
                    let welcome = Welcome {
                        session_id: Bytes::from_static(&[1; 16]),
                        role: a.role as i32,
                        ..Default::default()
                    };
                    pipe.send_frame(encode_kind(Kind::Welcome(welcome)))
                        .await
                        .ok()?;
                    return None;
                }
                // What the client sent instead of what the machine expected.
                Err(_) => return Some(seen),
            }
        }
    }

    fn client(pinned: Option<VerifyingKey>) -> ClientHandshake {
        ClientHandshake::new(
            "alpha",
            SigningKey::from_bytes(&[2; 32]),
            pinned,
            ChannelBinding::none(),
            [3; 32],
        )
        .with_receive_window(64)
    }

    #[tokio::test]
    async fn handshake_over_an_in_memory_pipe() {
        let relay_key = SigningKey::from_bytes(&[1; 32]);
        let dir = Dir(SigningKey::from_bytes(&[2; 32]).verifying_key());
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(relay(b, relay_key.clone(), dir, false));
        let mut pipe = Pipe::new(a);
        let welcome = run(&mut pipe, client(Some(relay_key.verifying_key())))
            .await
            .unwrap();
        assert_eq!(welcome.role, Role::Platform as i32);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn refusal_is_reported_with_its_code() {
        let relay_key = SigningKey::from_bytes(&[1; 32]);
        let dir = Dir(SigningKey::from_bytes(&[2; 32]).verifying_key());
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(relay(b, relay_key, dir, true));
        let err = run(&mut Pipe::new(a), client(None)).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Refused {
                    code: ErrorCode::AuthFailed,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_permanent());
    }

    #[tokio::test]
    async fn wrong_relay_key_is_refused_with_a_goaway() {
        let relay_key = SigningKey::from_bytes(&[1; 32]);
        let pinned = SigningKey::from_bytes(&[9; 32]).verifying_key();
        let dir = Dir(SigningKey::from_bytes(&[2; 32]).verifying_key());
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(relay(b, relay_key, dir, false));
        let err = run(&mut Pipe::new(a), client(Some(pinned)))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ClientError::Handshake(ProtocolError::AuthFailed(_))
        ));
        // The relay sees a Goaway{AUTH_FAILED} where it expected Auth.
        let Some(Frame {
            kind: Some(Kind::Goaway(g)),
        }) = server.await.unwrap()
        else {
            panic!("expected the client's goaway")
        };
        assert_eq!(g.code, ErrorCode::AuthFailed as i32);
    }
}
