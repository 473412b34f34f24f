//! Length-prefixed framing (SPEC.md section 4): a 4-byte big-endian length, then that many
//! bytes of a protobuf `Frame`.
//!
//! [`FrameDecoder`] is the streaming side: feed it whatever bytes arrived, take out whole
//! frames. It checks the announced length against the limit *before* buffering the body, so a
//! peer that announces 4 GiB costs us four bytes, and it tells "wait for more bytes" (`Ok(None)`)
//! apart from "drop this peer" (`Err`).

use crate::ProtocolError;
use crate::proto::{Frame, frame::Kind};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;
/// Largest frame before the handshake completes.
pub const HANDSHAKE_MAX_FRAME: usize = 64 * 1024;
/// The relay's default largest frame after the handshake.
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;
/// No implementation accepts a frame larger than this, whatever it announces.
pub const ABSOLUTE_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Appends the length-prefixed encoding of `frame` to `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    let len = frame.encoded_len();
    dst.reserve(LENGTH_PREFIX + len);
    // A frame we build ourselves is far below 4 GiB: the limits above are enforced on input.
    dst.put_u32(len as u32);
    // Cannot fail: the buffer was reserved above and BytesMut grows anyway.
    let _ = frame.encode(dst);
}

/// The length-prefixed encoding of `frame` as one buffer.
pub fn encode_to_bytes(frame: &Frame) -> Bytes {
    let mut buf = BytesMut::new();
    encode(frame, &mut buf);
    buf.freeze()
}

/// Wraps a frame kind and encodes it, length prefix included.
pub fn encode_kind(kind: Kind) -> Bytes {
    encode_to_bytes(&Frame { kind: Some(kind) })
}

/// Decodes a frame body (without its length prefix). Bytes fields of the result share
/// `body`'s memory instead of copying it.
pub fn decode_body(body: Bytes) -> Result<Frame, ProtocolError> {
    Ok(Frame::decode(body)?)
}

/// Streaming decoder for a byte stream of frames (a QUIC stream, or one WebSocket message).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_frame: max_frame.min(ABSOLUTE_MAX_FRAME),
        }
    }

    /// Changes the limit (after the handshake, to what Welcome announced).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame.min(ABSOLUTE_MAX_FRAME);
    }

    /// The limit in force.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Appends bytes received from the peer.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The buffer to read into directly, for transports that fill a `BufMut`.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame body, `Ok(None)` if more bytes are needed.
    pub fn next_body(&mut self) -> Result<Option<Bytes>, ProtocolError> {
        if self.buf.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; LENGTH_PREFIX];
        prefix.copy_from_slice(&self.buf[..LENGTH_PREFIX]);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max_frame {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if self.buf.len() < LENGTH_PREFIX + len {
            // Reserve what the frame needs (bounded by max_frame) so reads do not regrow.
            self.buf.reserve(LENGTH_PREFIX + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(LENGTH_PREFIX);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// The next whole frame, decoded; `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        match self.next_body()? {
            Some(body) => decode_body(body).map(Some),
            None => Ok(None),
        }
    }

    /// Call when the byte stream ended: an incomplete frame left over is an error.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(format!(
                "stream ended inside a frame ({} bytes left over)",
                self.buf.len()
            )))
        }
    }
}

/// Splits one WebSocket binary message into its frames. A message holds whole frames only.
pub fn decode_message(message: &[u8], max_frame: usize) -> Result<Vec<Frame>, ProtocolError> {
    decode_message_bytes(Bytes::copy_from_slice(message), max_frame)
}

/// [`decode_message`] without copying: the frames' bytes fields share `message`'s memory.
pub fn decode_message_bytes(
    mut message: Bytes,
    max_frame: usize,
) -> Result<Vec<Frame>, ProtocolError> {
    let max_frame = max_frame.min(ABSOLUTE_MAX_FRAME);
    let mut frames = Vec::new();
    while !message.is_empty() {
        if message.len() < LENGTH_PREFIX {
            return Err(ProtocolError::Malformed(
                "message ends inside a length prefix".into(),
            ));
        }
        let len = message.get_u32() as usize;
        if len > max_frame {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: max_frame,
            });
        }
        if message.len() < len {
            return Err(ProtocolError::Malformed(format!(
                "message ends inside a frame ({} of {len} bytes)",
                message.len()
            )));
        }
        frames.push(decode_body(message.split_to(len))?);
    }
    Ok(frames)
}

/// A short name of the frame's kind, for logs and errors.
pub fn kind_name(frame: &Frame) -> &'static str {
    match &frame.kind {
        None => "unknown",
        Some(kind) => match kind {
            Kind::Hello(_) => "hello",
            Kind::Challenge(_) => "challenge",
            Kind::Auth(_) => "auth",
            Kind::Welcome(_) => "welcome",
            Kind::Deliver(_) => "deliver",
            Kind::Accepted(_) => "accepted",
            Kind::Rejected(_) => "rejected",
            Kind::Ack(_) => "ack",
            Kind::Receipt(_) => "receipt",
            Kind::Expired(_) => "expired",
            Kind::Credit(_) => "credit",
            Kind::Ping(_) => "ping",
            Kind::Pong(_) => "pong",
            Kind::Goaway(_) => "goaway",
            Kind::StreamInit(_) => "stream_init",
            Kind::CampaignBegin(_) => "campaign_begin",
            Kind::CampaignChunk(_) => "campaign_chunk",
            Kind::CampaignEnd(_) => "campaign_end",
            Kind::CampaignAck(_) => "campaign_ack",
            Kind::CampaignStatusRequest(_) => "campaign_status_request",
            Kind::CampaignStatus(_) => "campaign_status",
            Kind::CampaignCancel(_) => "campaign_cancel",
            Kind::BulkDeliver(_) => "bulk_deliver",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Ping;

    fn ping(n: u64) -> Frame {
        Frame {
            kind: Some(Kind::Ping(Ping { nonce: n })),
        }
    }

    #[test]
    fn byte_at_a_time() {
        let mut wire = BytesMut::new();
        for n in 0..5 {
            encode(&ping(n), &mut wire);
        }
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        for b in wire.iter() {
            dec.extend(&[*b]);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, (0..5).map(ping).collect::<Vec<_>>());
        dec.finish().unwrap();
    }

    #[test]
    fn oversized_length_refused_before_body_arrives() {
        let mut dec = FrameDecoder::new(1000);
        dec.extend(&u32::MAX.to_be_bytes());
        assert_eq!(
            dec.next_body(),
            Err(ProtocolError::FrameTooLarge {
                len: u32::MAX as usize,
                max: 1000
            })
        );
        assert_eq!(dec.buffered(), 4, "nothing of the body was buffered");
    }

    #[test]
    fn truncated_message_is_malformed() {
        let wire = encode_to_bytes(&ping(7));
        let err = decode_message(&wire[..wire.len() - 1], DEFAULT_MAX_FRAME).unwrap_err();
        assert_eq!(err.code(), crate::proto::ErrorCode::MalformedFrame);
    }

    #[test]
    fn empty_frame_has_no_kind() {
        let frames = decode_message(&[0, 0, 0, 0], DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(frames, vec![Frame { kind: None }]);
    }
}
