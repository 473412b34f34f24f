//! TLS 1.3 client configurations for QUIC and `wss://` (SPEC.md 2.1).
//!
//! The relay is authenticated by at least one of (SPEC.md 2.1 rule 5):
//! - its certificate chaining to the configured CA, for the host name dialled; or
//! - its ed25519 key in `Challenge` being the pinned one. The handshake transcripts include
//!   the TLS exporter, so a man in the middle who terminates TLS cannot forward a valid
//!   challenge signature, and the certificate itself proves nothing more. Then any certificate
//!   is accepted, but its TLS 1.3 handshake signature is still checked.
//!
//! Without a CA and without a pinned key nothing would authenticate the relay, and
//! configuration fails. TLS 1.2 and 0-RTT are never used.

use crate::config::Ca;
use crate::error::ClientError;
use federation_spec::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;

fn config_error(what: impl std::fmt::Display) -> ClientError {
    ClientError::Config(what.to_string())
}

/// The certificates of a CA setting.
pub(crate) fn load_ca(ca: &Ca) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let pem = match ca {
        Ca::Der(der) => return Ok(vec![CertificateDer::from(der.clone())]),
        Ca::Pem(pem) => pem.clone(),
        Ca::PemFile(path) => std::fs::read(path)
            .map_err(|e| config_error(format!("reading CA {}: {e}", path.display())))?,
    };
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error(format!("CA is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(config_error("CA holds no certificate"));
    }
    Ok(certs)
}

fn base_config(ca: Option<&Ca>, pinned: bool) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?;
    let config = match ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_ca(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| config_error(format!("CA certificate: {e}")))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None if pinned => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedRelayKey {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        None => {
            return Err(config_error(
                "nothing authenticates the relay: give a CA certificate or pin relay_key in the key file",
            ));
        }
    };
    Ok(config)
}

/// The QUIC client configuration: TLS 1.3, ALPN `relay-fed/1`.
pub(crate) fn quic_config(
    ca: Option<&Ca>,
    pinned: bool,
) -> Result<quinn::ClientConfig, ClientError> {
    let mut tls = base_config(ca, pinned)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(config_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // The relay never opens a bidirectional stream; it opens one unidirectional stream per
    // lane (SPEC.md 2.2.1 asks for at least 3).
    transport.max_concurrent_bidi_streams(0u32.into());
    transport.max_concurrent_uni_streams(8u32.into());
    // Keeps NAT bindings and the QUIC idle timer alive; the protocol's own Ping keeps the
    // relay's idle timer alive.
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(10)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The `wss://` client configuration: TLS 1.3 carrying HTTP/1.1.
pub(crate) fn wss_config(
    ca: Option<&Ca>,
    pinned: bool,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut tls = base_config(ca, pinned)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// The TLS server name for a URL host (a DNS name or an IP address).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, ClientError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| config_error(format!("{host:?} is not a valid TLS server name: {e}")))
}

/// Accepts any certificate: the relay is authenticated by its pinned key (module docs).
#[derive(Debug)]
struct PinnedRelayKey {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedRelayKey {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_is_required() {
        assert!(matches!(
            base_config(None, false),
            Err(ClientError::Config(_))
        ));
        assert!(base_config(None, true).is_ok());
        assert!(matches!(
            load_ca(&Ca::Pem(b"not pem".to_vec())),
            Err(ClientError::Config(_))
        ));
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let pem = cert.cert.pem().into_bytes();
        assert_eq!(load_ca(&Ca::Pem(pem.clone())).unwrap().len(), 1);
        assert!(base_config(Some(&Ca::Pem(pem)), false).is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("localhost").is_ok());
    }
}
