//! TLS for policy fetches and MX connections: one trust store (webpki-roots plus
//! `tls.extra_roots`), client configs, and the one mapping from certificate errors to
//! RFC 8460 result types.

use crate::tlsrpt::ResultType;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The trust store could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A `tls.extra_roots` file could not be read or holds no certificate.
    #[error("tls.extra_roots: cannot use {path}: {reason}")]
    ExtraRoot {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration error: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a peer's TLS was not acceptable, as an RFC 8460 result type plus a short
/// `failure-reason-code` and a human reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{result_type} ({reason_code}): {reason}")]
pub struct TlsFailure {
    /// The RFC 8460 result type.
    pub result_type: ResultType,
    /// Short machine-friendly code for `failure-reason-code`.
    pub reason_code: &'static str,
    /// Human-readable detail.
    pub reason: String,
}

impl From<&rustls::Error> for TlsFailure {
    /// The single place where rustls errors become result types. rustls 0.23 reports
    /// many certificate errors as `…Context` variants; both forms are matched.
    fn from(e: &rustls::Error) -> TlsFailure {
        // A DANE verifier's verdict (RFC 7672) keeps its own result type.
        if let Some(d) = crate::dane::dane_failure(e) {
            return d.into();
        }
        let (result_type, reason_code) = match e {
            rustls::Error::InvalidCertificate(ce) => match ce {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    (ResultType::CertificateExpired, "certificate-expired")
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => (
                    ResultType::CertificateHostMismatch,
                    "certificate-host-mismatch",
                ),
                CertificateError::UnknownIssuer => {
                    (ResultType::CertificateNotTrusted, "unknown-issuer")
                }
                CertificateError::BadSignature => {
                    (ResultType::CertificateNotTrusted, "bad-signature")
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    (ResultType::ValidationFailure, "certificate-not-yet-valid")
                }
                CertificateError::Revoked => {
                    (ResultType::CertificateNotTrusted, "certificate-revoked")
                }
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => {
                    (ResultType::CertificateNotTrusted, "invalid-purpose")
                }
                _ => (ResultType::CertificateNotTrusted, "certificate-invalid"),
            },
            rustls::Error::AlertReceived(_) => {
                (ResultType::ValidationFailure, "tls-alert-received")
            }
            rustls::Error::PeerIncompatible(_) => {
                (ResultType::ValidationFailure, "tls-incompatible")
            }
            _ => (ResultType::ValidationFailure, "tls-handshake-failure"),
        };
        TlsFailure {
            result_type,
            reason_code,
            reason: e.to_string(),
        }
    }
}

/// Find a rustls error anywhere in an error's source chain (reqwest and tokio-rustls
/// wrap it in `io::Error`s).
pub fn find_rustls_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    // Bounded walk: error chains are short; 32 guards against a cyclic `source`.
    for _ in 0..32 {
        let err = cur?;
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        // `io::Error::source` skips the wrapped error; descend into it instead.
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// Roots (webpki-roots + `tls.extra_roots`) and the client configs built on them.
#[derive(Clone)]
pub struct TrustStore {
    provider: Arc<CryptoProvider>,
    verifier: Arc<WebPkiServerVerifier>,
    strict: Arc<ClientConfig>,
    lenient: Arc<ClientConfig>,
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrustStore")
    }
}

impl TrustStore {
    /// webpki-roots plus the certificates in each PEM file of `extra_roots`.
    pub fn new<P: AsRef<Path>>(extra_roots: &[P]) -> Result<TrustStore, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for path in extra_roots {
            let path = path.as_ref();
            let bad = |reason: String| TlsSetupError::ExtraRoot {
                path: path.to_path_buf(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no CERTIFICATE block found".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| bad(e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsSetupError::Rustls(rustls::Error::General(e.to_string())))?;
        let strict = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(verifier.clone())
            .with_no_client_auth();
        let lenient = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(RecordOnly {
                provider: provider.clone(),
            }))
            .with_no_client_auth();
        Ok(TrustStore {
            provider,
            verifier,
            strict: Arc::new(strict),
            lenient: Arc::new(lenient),
        })
    }

    /// From `tls.extra_roots` of a config.
    pub fn from_config(cfg: &crate::Config) -> Result<TrustStore, TlsSetupError> {
        TrustStore::new(&cfg.tls.extra_roots)
    }

    /// TLS 1.2+ client config that aborts the handshake unless the certificate is
    /// WebPKI-valid for the server name (SNI). For enforce-mode MX and policy hosts.
    pub fn strict_config(&self) -> Arc<ClientConfig> {
        self.strict.clone()
    }

    /// TLS 1.2+ client config that completes the handshake whatever the certificate,
    /// for opportunistic and testing-mode sessions; check the certificate afterwards
    /// with [`TrustStore::verify`] to classify it.
    pub fn opportunistic_config(&self) -> Arc<ClientConfig> {
        self.lenient.clone()
    }

    /// WebPKI-verify a presented chain for `host` now.
    pub fn verify(&self, chain: &[CertificateDer<'_>], host: &str) -> Result<(), TlsFailure> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| TlsFailure {
            result_type: ResultType::ValidationFailure,
            reason_code: "invalid-server-name",
            reason: e.to_string(),
        })?;
        let (ee, intermediates) = chain.split_first().ok_or_else(|| TlsFailure {
            result_type: ResultType::CertificateNotTrusted,
            reason_code: "no-certificate",
            reason: "peer presented no certificate".into(),
        })?;
        self.verifier
            .verify_server_cert(ee, intermediates, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| TlsFailure::from(&e))
    }

    /// The crypto provider in use (aws-lc-rs).
    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }
}

/// Accepts any certificate (signatures on the handshake are still checked) so the
/// session can be classified afterwards; used only where the policy allows
/// unauthenticated TLS.
#[derive(Debug)]
struct RecordOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for RecordOnly {
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_errors_map_to_result_types() {
        let cases = [
            (CertificateError::Expired, ResultType::CertificateExpired),
            (
                CertificateError::NotValidForName,
                ResultType::CertificateHostMismatch,
            ),
            (
                CertificateError::UnknownIssuer,
                ResultType::CertificateNotTrusted,
            ),
            (
                CertificateError::BadSignature,
                ResultType::CertificateNotTrusted,
            ),
            (CertificateError::NotValidYet, ResultType::ValidationFailure),
        ];
        for (ce, rt) in cases {
            let e = rustls::Error::InvalidCertificate(ce);
            assert_eq!(TlsFailure::from(&e).result_type, rt, "{e}");
        }
        let hs = rustls::Error::General("x".into());
        assert_eq!(
            TlsFailure::from(&hs).result_type,
            ResultType::ValidationFailure
        );
    }

    #[test]
    fn rustls_error_found_inside_io_error() {
        let inner = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner.clone());
        assert_eq!(find_rustls_error(&io), Some(&inner));
        // As hyper-util reports it: an io::Error wrapping an io::Error wrapping rustls'.
        let nested = std::io::Error::other(io);
        assert_eq!(find_rustls_error(&nested), Some(&inner));
    }

    #[test]
    fn missing_extra_root_is_named() {
        let e = TrustStore::new(&["/nonexistent/ca.pem"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls.extra_roots") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
    }
}
