//! The protocol's error type: every way a peer's input can break the rules, each mapped to
//! the wire [`ErrorCode`] that tells the peer what happened.

use crate::proto::{ErrorCode, Goaway, Rejected};
use bytes::Bytes;

/// A violation of the protocol by the other side, or a frame that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The length prefix announces more than the current limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The bytes are not a valid frame (bad protobuf, invalid UTF-8, truncated, text message).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// No protocol version in common.
    #[error("no supported protocol version in {0:?}")]
    UnsupportedVersion(Vec<u32>),
    /// A frame that is not allowed in the current state.
    #[error("unexpected frame: {0}")]
    UnexpectedFrame(&'static str),
    /// Authentication failed (unknown peer, unregistered key, bad signature, bad relay key).
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
    /// An address or peer id does not follow the grammar.
    #[error("bad address: {0}")]
    BadAddress(#[from] crate::address::AddressError),
    /// `from` is not a user of the authenticated peer.
    #[error("sender {from} is not a user of the authenticated peer {peer}")]
    SpoofedSender {
        /// The claimed sender.
        from: String,
        /// The authenticated peer.
        peer: String,
    },
    /// The origin signature does not verify, or the signer is not a key of the origin.
    #[error("bad signature")]
    BadSignature,
    /// A field is missing or out of range.
    #[error("invalid message: {0}")]
    InvalidMessage(&'static str),
    /// The payload exceeds the announced maximum.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The peer's role does not allow this frame.
    #[error("not permitted: {0}")]
    NotPermitted(&'static str),
}

impl ProtocolError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::Malformed(_) => ErrorCode::MalformedFrame,
            Self::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Self::UnexpectedFrame(_) => ErrorCode::UnexpectedFrame,
            Self::AuthFailed(_) => ErrorCode::AuthFailed,
            Self::BadAddress(_) => ErrorCode::BadAddress,
            Self::SpoofedSender { .. } => ErrorCode::SpoofedSender,
            Self::BadSignature => ErrorCode::BadSignature,
            Self::InvalidMessage(_) => ErrorCode::InvalidMessage,
            Self::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Self::NotPermitted(_) => ErrorCode::NotPermitted,
        }
    }

    /// True when the connection cannot continue (framing is lost or trust is broken): send
    /// [`Goaway`] and close. Otherwise the error concerns one message: answer [`Rejected`].
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::FrameTooLarge { .. }
                | Self::Malformed(_)
                | Self::UnsupportedVersion(_)
                | Self::UnexpectedFrame(_)
                | Self::AuthFailed(_)
        )
    }

    /// The Goaway that announces this error before closing.
    pub fn to_goaway(&self) -> Goaway {
        Goaway {
            code: self.code() as i32,
            reason: self.to_string(),
            reconnect_after_ms: 0,
        }
    }

    /// The Rejected answering the message `id` with this error.
    pub fn to_rejected(&self, id: Bytes) -> Rejected {
        Rejected {
            id,
            code: self.code() as i32,
            detail: self.to_string(),
            ..Default::default()
        }
    }
}

impl From<prost::DecodeError> for ProtocolError {
    fn from(e: prost::DecodeError) -> Self {
        Self::Malformed(e.to_string())
    }
}
