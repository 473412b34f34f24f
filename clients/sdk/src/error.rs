//! The SDK's errors, one enum per thing a caller does: connecting, preparing a message, and
//! sending it.

use federation_spec::ProtocolError;
use federation_spec::address::AddressError;
use federation_spec::proto::{ErrorCode, Lane};

/// The wire error code of a number, with unknown codes read as `INTERNAL` (SPEC.md 4.4).
pub fn error_code(value: i32) -> ErrorCode {
    ErrorCode::try_from(value).unwrap_or(ErrorCode::Internal)
}

/// The short name of a code, e.g. `BUSY` for `ERROR_CODE_BUSY`.
pub fn error_code_name(code: ErrorCode) -> &'static str {
    let name = code.as_str_name();
    name.strip_prefix("ERROR_CODE_").unwrap_or(name)
}

/// Why a connection to the relay could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot work (bad URL, unreadable CA file, no way to trust the relay).
    #[error("configuration: {0}")]
    Config(String),
    /// The host name did not resolve, or the socket could not be opened.
    #[error("cannot reach {target}: {source}")]
    Io {
        /// `host:port`.
        target: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The QUIC or TLS handshake failed (certificate not trusted, ALPN refused, unreachable).
    #[error("transport: {0}")]
    Transport(String),
    /// The WebSocket upgrade failed (including a missing `relay-fed.v1` subprotocol).
    #[error("websocket: {0}")]
    WebSocket(String),
    /// The relay broke the handshake rules or failed to authenticate itself.
    #[error("handshake: {0}")]
    Handshake(#[from] ProtocolError),
    /// The relay refused the session with a `Goaway`.
    #[error("refused by the relay: {} ({reason})", error_code_name(*.code))]
    Refused {
        /// Why.
        code: ErrorCode,
        /// The relay's text, for logs.
        reason: String,
        /// Suggested wait before trying again.
        reconnect_after_ms: u32,
    },
    /// The connection ended during the handshake.
    #[error("connection closed during the handshake: {0}")]
    ClosedDuringHandshake(String),
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    Timeout,
}

impl ClientError {
    /// True when trying again cannot help until configuration changes (bad key, wrong
    /// version, untrusted certificate): the caller should alert its operator.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Config(_) => true,
            Self::Refused { code, .. } => matches!(
                code,
                ErrorCode::AuthFailed
                    | ErrorCode::UnsupportedVersion
                    | ErrorCode::MalformedFrame
                    | ErrorCode::KeyRevoked
            ),
            Self::Handshake(e) => matches!(
                e,
                ProtocolError::AuthFailed(_) | ProtocolError::UnsupportedVersion(_)
            ),
            _ => false,
        }
    }
}

/// Why a message could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// `from_user` is not a valid user part.
    #[error("sender user: {0}")]
    FromUser(AddressError),
    /// Only the call and chat lanes carry person-to-person messages.
    #[error("lane {0:?} cannot carry a message (use chat or call)")]
    Lane(Lane),
    /// `content_type` is longer than 64 bytes.
    #[error("content_type longer than 64 bytes")]
    ContentType,
    /// The message breaks a protocol rule (bad recipient address, for example; for a
    /// campaign: a `from` that is not an address of our peer, a label over 128 bytes).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A campaign chunk is numbered 0 (chunks start at 1), or an end names `u32::MAX` chunks.
    #[error("campaign step number {0} is out of range (chunks are numbered from 1)")]
    CampaignSeq(u32),
    /// A campaign chunk lists more recipients than the session's `max_chunk_recipients`.
    #[error("chunk of {len} recipients exceeds the relay's limit of {max} per chunk")]
    TooManyRecipients {
        /// Recipients in the chunk.
        len: usize,
        /// `Welcome.limits.max_chunk_recipients`.
        max: usize,
    },
}

/// Why a message (or receipt) was not accepted by the relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The relay refused it and keeps nothing. For `BUSY` and `RATE_LIMITED` the same
    /// prepared message (same id) may be sent again after `retry_after_ms`.
    #[error("rejected: {} ({detail})", error_code_name(*.code))]
    Rejected {
        /// Why.
        code: ErrorCode,
        /// For `BUSY` and `RATE_LIMITED`: how long to wait before resending.
        retry_after_ms: u32,
        /// The relay's text, for logs.
        detail: String,
    },
    /// Refused before sending: it could never be accepted.
    #[error("invalid: {0}")]
    Invalid(#[from] PrepareError),
    /// Its time to live ran out before the relay accepted it (SPEC.md 7.2): not sent again.
    #[error("expired before the relay accepted it")]
    Expired,
    /// A message with this id is already waiting for its answer; for a campaign: a step
    /// that the relay would answer with the same `seq` (the same chunk, a chunk and an end
    /// numbered alike, a second begin of one campaign) is.
    #[error("a message or campaign step with this id is already pending")]
    DuplicateId,
    /// The client is closed, or lost the connection and may not (or gave up trying to)
    /// reconnect. The relay may or may not have accepted the message.
    #[error("client closed: {0}")]
    Closed(String),
}

impl SendError {
    /// True for refusals that a later resend of the same message can overcome.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Rejected { code, .. } => matches!(
                code,
                ErrorCode::Busy
                    | ErrorCode::RateLimited
                    | ErrorCode::FlowControl
                    | ErrorCode::ShuttingDown
                    | ErrorCode::Internal
            ),
            Self::Closed(_) => true,
            _ => false,
        }
    }

    /// The wire code, for rejections.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names() {
        assert_eq!(error_code(11), ErrorCode::Busy);
        assert_eq!(error_code(999), ErrorCode::Internal);
        assert_eq!(
            error_code_name(ErrorCode::UnknownDestination),
            "UNKNOWN_DESTINATION"
        );
        let e = SendError::Rejected {
            code: ErrorCode::Busy,
            retry_after_ms: 5,
            detail: "full".into(),
        };
        assert_eq!(e.to_string(), "rejected: BUSY (full)");
        assert!(e.is_retryable());
        assert_eq!(e.code(), Some(ErrorCode::Busy));
        assert!(!SendError::Expired.is_retryable());
    }
}
