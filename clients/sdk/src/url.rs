//! Relay URLs: `quic://host:port`, `ws://host:port` and `wss://host:port`.
//!
//! The path of a WebSocket URL is kept (the operator publishes it with host and port, SPEC.md
//! 2.3.1) and defaults to `/`; a QUIC URL has no path. The host is also the name the relay's
//! TLS certificate is checked against.

use std::fmt;
use std::str::FromStr;

/// Default UDP port of the relay's QUIC listener.
pub const DEFAULT_QUIC_PORT: u16 = 7700;
/// Default TCP port of the relay's WebSocket listener.
pub const DEFAULT_WS_PORT: u16 = 7701;

/// How to reach the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// QUIC with TLS 1.3 (`quic://`).
    Quic,
    /// WebSocket without TLS (`ws://`): loopback or behind a TLS-terminating proxy only.
    Ws,
    /// WebSocket over TLS 1.3 (`wss://`).
    Wss,
}

impl Scheme {
    /// True when this transport runs TLS, so the handshake is bound to the TLS exporter.
    pub fn uses_tls(self) -> bool {
        !matches!(self, Scheme::Ws)
    }

    fn as_str(self) -> &'static str {
        match self {
            Scheme::Quic => "quic",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        }
    }
}

/// A parsed relay URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelayUrl {
    /// The transport.
    pub scheme: Scheme,
    /// Host name or IP address, without brackets for IPv6.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Request path for WebSocket (`/` when absent); `/` for QUIC.
    pub path: String,
}

/// Why a relay URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// No `scheme://`, or a scheme other than quic, ws and wss.
    #[error("unsupported scheme in {0:?}: expected quic://, ws:// or wss://")]
    Scheme(String),
    /// The host part is empty or malformed.
    #[error("missing or malformed host in {0:?}")]
    Host(String),
    /// The port is not a number from 1 to 65535.
    #[error("bad port in {0:?}")]
    Port(String),
    /// A QUIC URL with a path, query or user info.
    #[error("a quic:// URL is only host and port: {0:?}")]
    QuicPath(String),
}

impl RelayUrl {
    /// Parses `scheme://host[:port][/path]`; the port defaults to 7700 (quic) or 7701 (ws, wss).
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| UrlError::Scheme(text.to_string()))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "quic" => Scheme::Quic,
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            _ => return Err(UrlError::Scheme(text.to_string())),
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(UrlError::Host(text.to_string()));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| UrlError::Host(text.into()))?;
        let port = match port {
            None => match scheme {
                Scheme::Quic => DEFAULT_QUIC_PORT,
                Scheme::Ws | Scheme::Wss => DEFAULT_WS_PORT,
            },
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(UrlError::Port(text.to_string())),
            },
        };
        let path = match scheme {
            Scheme::Quic if !path.is_empty() && path != "/" => {
                return Err(UrlError::QuicPath(text.to_string()));
            }
            Scheme::Quic => "/".to_string(),
            Scheme::Ws | Scheme::Wss if path.is_empty() => "/".to_string(),
            Scheme::Ws | Scheme::Wss if path.starts_with('/') => path.to_string(),
            // "?query" without a path.
            Scheme::Ws | Scheme::Wss => format!("/{path}"),
        };
        Ok(Self {
            scheme,
            host: host.to_string(),
            port,
            path,
        })
    }

    /// The URL of the WebSocket upgrade request.
    pub fn ws_request_url(&self) -> String {
        format!(
            "{}://{}:{}{}",
            self.scheme.as_str(),
            self.host_for_url(),
            self.port,
            self.path
        )
    }

    fn host_for_url(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// Splits `host[:port]` or `[v6][:port]`.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        if host.is_empty() {
            return None;
        }
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    valid.then_some((host, port))
}

impl FromStr for RelayUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::Quic => write!(f, "quic://{}:{}", self.host_for_url(), self.port),
            Scheme::Ws | Scheme::Wss => f.write_str(&self.ws_request_url()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_schemes() {
        let u = RelayUrl::parse("quic://127.0.0.1:7700").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.path.as_str()),
            (Scheme::Quic, "127.0.0.1", 7700, "/")
        );
        let u = RelayUrl::parse("ws://localhost:9000/fed").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.path.as_str()),
            (Scheme::Ws, "localhost", 9000, "/fed")
        );
        assert_eq!(u.ws_request_url(), "ws://localhost:9000/fed");
        let u = RelayUrl::parse("WSS://relay.example").unwrap();
        assert_eq!(
            (u.scheme, u.port, u.path.as_str()),
            (Scheme::Wss, 7701, "/")
        );
        let u = RelayUrl::parse("quic://[::1]:7").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 7));
        assert_eq!(u.to_string(), "quic://[::1]:7");
        assert_eq!(RelayUrl::parse("quic://h:1/").unwrap().path, "/");
        assert_eq!(RelayUrl::parse("ws://h:1?x=1").unwrap().path, "/?x=1");
        assert!(Scheme::Quic.uses_tls() && Scheme::Wss.uses_tls() && !Scheme::Ws.uses_tls());
    }

    #[test]
    fn refuses_the_rest() {
        assert!(matches!(
            RelayUrl::parse("http://h:1"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(RelayUrl::parse("h:1"), Err(UrlError::Scheme(_))));
        assert!(matches!(
            RelayUrl::parse("quic://:1"),
            Err(UrlError::Host(_))
        ));
        assert!(matches!(
            RelayUrl::parse("quic://u@h:1"),
            Err(UrlError::Host(_))
        ));
        assert!(matches!(
            RelayUrl::parse("quic://[]:1"),
            Err(UrlError::Host(_))
        ));
        assert!(matches!(
            RelayUrl::parse("ws://h:0"),
            Err(UrlError::Port(_))
        ));
        assert!(matches!(
            RelayUrl::parse("ws://h:99999"),
            Err(UrlError::Port(_))
        ));
        assert!(matches!(
            RelayUrl::parse("quic://h:1/path"),
            Err(UrlError::QuicPath(_))
        ));
    }
}
