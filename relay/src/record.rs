//! What the relay stores for each queued item, and how it becomes a frame again.
//!
//! A stored body is a small header (what kind of frame, who the origin is, the message id,
//! the recipient, when it was accepted) followed by the protobuf encoding of the inner message
//! (Deliver, Receipt, Expired or BulkDeliver) without its delivery tag. At delivery the relay
//! appends the tag field to the stored bytes instead of decoding and re-encoding: protobuf
//! merges a field appended to a message, so the peer reads exactly the stored message plus
//! its tag, and the origin's signed envelope travels untouched.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// Format version of the header.
const FORMAT: u8 = 1;

/// Which frame a stored item becomes: the `Frame.kind` field number and the inner message's
/// `tag` field number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A message.
    Deliver,
    /// A delivery or read receipt.
    Receipt,
    /// An expiry notice to the origin.
    Expired,
    /// A campaign chunk to a platform.
    Bulk,
}

impl RecordKind {
    fn frame_field(self) -> u32 {
        match self {
            Self::Deliver => 5,
            Self::Receipt => 9,
            Self::Expired => 10,
            Self::Bulk => 27,
        }
    }

    fn tag_field(self) -> u32 {
        match self {
            Self::Deliver | Self::Expired => 4,
            Self::Receipt => 6,
            Self::Bulk => 1,
        }
    }

    fn from_frame_field(field: u8) -> Option<Self> {
        [Self::Deliver, Self::Receipt, Self::Expired, Self::Bulk]
            .into_iter()
            .find(|k| k.frame_field() == field as u32)
    }
}

/// The header of a stored item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// What it becomes.
    pub kind: RecordKind,
    /// The peer that sent it (where an expiry notice goes).
    pub origin: String,
    /// The message id.
    pub id: [u8; 16],
    /// The recipient address (for the expiry notice).
    pub to: String,
    /// When the relay accepted it, ms since the epoch.
    pub accepted_at_ms: u64,
}

/// Why a stored body could not be read (a store written by an incompatible version, or damage).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored record is unreadable: {0}")]
pub struct RecordError(&'static str);

/// Builds a stored body.
pub fn encode(header: &Header, inner: &[u8]) -> Bytes {
    let mut out =
        BytesMut::with_capacity(4 + header.origin.len() + 16 + header.to.len() + 8 + inner.len());
    out.put_u8(FORMAT);
    out.put_u8(header.kind.frame_field() as u8);
    // Peer ids are at most 32 bytes and addresses at most 97: both fit a length byte.
    out.put_u8(header.origin.len() as u8);
    out.put_slice(header.origin.as_bytes());
    out.put_slice(&header.id);
    out.put_u8(header.to.len() as u8);
    out.put_slice(header.to.as_bytes());
    out.put_u64(header.accepted_at_ms);
    out.put_slice(inner);
    out.freeze()
}

/// Splits a stored body into its header and inner message bytes.
pub fn decode(body: &Bytes) -> Result<(Header, Bytes), RecordError> {
    let mut buf = body.clone();
    let take_u8 = |buf: &mut Bytes| {
        if buf.has_remaining() {
            Ok(buf.get_u8())
        } else {
            Err(RecordError("truncated"))
        }
    };
    if take_u8(&mut buf)? != FORMAT {
        return Err(RecordError("unknown format"));
    }
    let kind =
        RecordKind::from_frame_field(take_u8(&mut buf)?).ok_or(RecordError("unknown kind"))?;
    let origin = take_str(&mut buf)?;
    if buf.remaining() < 16 {
        return Err(RecordError("truncated"));
    }
    let mut id = [0u8; 16];
    buf.copy_to_slice(&mut id);
    let to = take_str(&mut buf)?;
    if buf.remaining() < 8 {
        return Err(RecordError("truncated"));
    }
    let accepted_at_ms = buf.get_u64();
    Ok((
        Header {
            kind,
            origin,
            id,
            to,
            accepted_at_ms,
        },
        buf,
    ))
}

fn take_str(buf: &mut Bytes) -> Result<String, RecordError> {
    if !buf.has_remaining() {
        return Err(RecordError("truncated"));
    }
    let len = buf.get_u8() as usize;
    if buf.remaining() < len {
        return Err(RecordError("truncated"));
    }
    String::from_utf8(buf.split_to(len).to_vec()).map_err(|_| RecordError("not utf-8"))
}

/// Where the parts of a stored body are, found without allocating.
struct Layout {
    kind: RecordKind,
    accepted_at_ms: u64,
    inner_start: usize,
}

fn layout(body: &[u8]) -> Result<Layout, RecordError> {
    let truncated = RecordError("truncated");
    let byte = |at: usize| body.get(at).copied().ok_or(truncated.clone());
    if byte(0)? != FORMAT {
        return Err(RecordError("unknown format"));
    }
    let kind = RecordKind::from_frame_field(byte(1)?).ok_or(RecordError("unknown kind"))?;
    let to_len_at = 3 + byte(2)? as usize + 16;
    let accepted_at = to_len_at + 1 + byte(to_len_at)? as usize;
    let stamp: [u8; 8] = body
        .get(accepted_at..accepted_at + 8)
        .and_then(|b| b.try_into().ok())
        .ok_or(truncated)?;
    Ok(Layout {
        kind,
        accepted_at_ms: u64::from_be_bytes(stamp),
        inner_start: accepted_at + 8,
    })
}

/// When the relay accepted the stored item.
pub fn accepted_at_ms(body: &[u8]) -> Result<u64, RecordError> {
    Ok(layout(body)?.accepted_at_ms)
}

/// The wire frame (length prefix included) of a stored body, with delivery tag `tag`.
pub fn to_frame(body: &Bytes, tag: u64) -> Result<Bytes, RecordError> {
    to_frame_with(body, tag, &[])
}

/// [`to_frame`] with `extra` encoded fields appended to the inner message (a campaign's
/// envelope on the first BulkDeliver of a session).
pub fn to_frame_with(body: &Bytes, tag: u64, extra: &[u8]) -> Result<Bytes, RecordError> {
    let Layout {
        kind, inner_start, ..
    } = layout(body)?;
    let inner = &body[inner_start..];
    let tag_len = key_len(kind.tag_field()) + encoded_len_varint(tag);
    let message_len = inner.len() + extra.len() + tag_len;
    let frame_len =
        key_len(kind.frame_field()) + encoded_len_varint(message_len as u64) + message_len;
    let mut out = BytesMut::with_capacity(4 + frame_len);
    out.put_u32(frame_len as u32);
    encode_key(kind.frame_field(), WireType::LengthDelimited, &mut out);
    encode_varint(message_len as u64, &mut out);
    out.put_slice(inner);
    out.put_slice(extra);
    encode_key(kind.tag_field(), WireType::Varint, &mut out);
    encode_varint(tag, &mut out);
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use federation_spec::frame::decode_message;
    use federation_spec::proto::{Deliver, Expired, frame::Kind};
    use prost::Message;

    #[test]
    fn appended_tag_decodes_as_the_stored_message_with_its_tag() {
        let deliver = Deliver {
            envelope: Bytes::from_static(b"env"),
            signature: Bytes::from_static(&[1; 64]),
            signer: Bytes::from_static(&[2; 32]),
            tag: 0,
        };
        let header = Header {
            kind: RecordKind::Deliver,
            origin: "alpha".into(),
            id: [7; 16],
            to: "bo@beta".into(),
            accepted_at_ms: 42,
        };
        let body = encode(&header, &deliver.encode_to_vec());
        let frame = to_frame(&body, 300).unwrap();
        assert_eq!(decode(&body).unwrap().0, header);
        assert_eq!(accepted_at_ms(&body).unwrap(), 42);
        let frames = decode_message(&frame, 1 << 20).unwrap();
        assert_eq!(
            frames[0].kind,
            Some(Kind::Deliver(Deliver {
                tag: 300,
                ..deliver
            }))
        );

        let expired = Expired {
            id: Bytes::from_static(&[7; 16]),
            to: "bo@beta".into(),
            expired_at_ms: 9,
            tag: 0,
            campaign_id: Bytes::new(),
        };
        let body = encode(
            &Header {
                kind: RecordKind::Expired,
                ..header
            },
            &expired.encode_to_vec(),
        );
        let frame = to_frame(&body, u64::MAX).unwrap();
        assert_eq!(
            decode_message(&frame, 1 << 20).unwrap()[0].kind,
            Some(Kind::Expired(Expired {
                tag: u64::MAX,
                ..expired
            }))
        );
        assert!(decode(&Bytes::from_static(&[1, 5, 40])).is_err());
        for cut in 0..body.len() - 1 {
            let _ = to_frame(&body.slice(..cut), 1);
        }
        assert!(to_frame(&body.slice(..20), 1).is_err());
    }
}
