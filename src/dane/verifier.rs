//! DANE authentication of an SMTP server's certificate chain (RFC 7672 §3) and the
//! rustls verifier built on it; the rules are on [`verify_chain`].

use super::matching;
use super::tlsa::{CertUsage, MatchingType, Selector, TlsaRecord, TlsaSet};
use crate::tls::TlsFailure;
use crate::tlsrpt::ResultType;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use std::fmt;
use std::sync::Arc;

/// Certificates of a presented chain looked at for DANE-TA matches; a server sends a
/// handful, this bounds the work a hostile one can cause.
const MAX_CHAIN: usize = 16;

/// The names a DANE-TA authenticated server certificate must be valid for (RFC 7672
/// §3.2.2): the TLSA base domain (the MX host name after CNAME expansion, when that
/// expansion was secure) and the MX host name, if different.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceNames {
    names: Vec<ServerName<'static>>,
    text: Vec<String>,
}

impl ReferenceNames {
    /// The names for an MX host whose TLSA records were found at `_25._tcp.<tlsa_base>`.
    ///
    /// ```
    /// use stsrelay::dane::ReferenceNames;
    /// let n = ReferenceNames::new("MX1.Example.COM.", "mx1.hosting.example")?;
    /// assert_eq!(n.names(), ["mx1.hosting.example", "mx1.example.com"]);
    /// assert_eq!(ReferenceNames::new("mx.example.com", "mx.example.com")?.names().len(), 1);
    /// # Ok::<(), stsrelay::dane::DaneSetupError>(())
    /// ```
    pub fn new(mx_host: &str, tlsa_base: &str) -> Result<ReferenceNames, DaneSetupError> {
        ReferenceNames::from_names([tlsa_base, mx_host])
    }

    /// Any list of DNS names (at least one), duplicates dropped.
    pub fn from_names<I, S>(names: I) -> Result<ReferenceNames, DaneSetupError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = ReferenceNames {
            names: Vec::new(),
            text: Vec::new(),
        };
        for n in names {
            let n = n.as_ref().trim_end_matches('.').to_ascii_lowercase();
            if out.text.contains(&n) {
                continue;
            }
            let bad = |reason: String| DaneSetupError::InvalidName {
                name: n.clone(),
                reason,
            };
            let sn = ServerName::try_from(n.clone()).map_err(|e| bad(e.to_string()))?;
            if !matches!(sn, ServerName::DnsName(_)) {
                return Err(bad("not a DNS name".into()));
            }
            out.names.push(sn);
            out.text.push(n);
        }
        if out.names.is_empty() {
            return Err(DaneSetupError::NoNames);
        }
        Ok(out)
    }

    /// The names, lower case, without trailing dot, TLSA base domain first.
    pub fn names(&self) -> &[String] {
        &self.text
    }
}

impl fmt::Display for ReferenceNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text.join(", "))
    }
}

/// A [`DaneVerifier`] or [`ReferenceNames`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DaneSetupError {
    /// A reference name is not a DNS name.
    #[error("DANE reference name {name:?} is not usable: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// No reference name given.
    #[error("DANE needs at least one reference name")]
    NoNames,
    /// The TLSA set has no usable record: DANE does not apply (RFC 7672 §2.2).
    #[error("no usable TLSA record: DANE does not apply to this server")]
    NoUsableRecords,
}

/// Which record authenticated the server, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// The matching record.
    pub record: TlsaRecord,
    /// End entity or trust anchor.
    pub kind: MatchKind,
}

/// How a record authenticated the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchKind {
    /// DANE-EE: the server certificate (or its key) itself.
    EndEntity,
    /// DANE-TA: a trust anchor the server certificate chains to.
    TrustAnchor {
        /// Position of the trust anchor in the presented chain (1 = the certificate after
        /// the server's own); `None` when the server did not send it and the record's
        /// full `2 1 0` key served as the anchor.
        depth: Option<usize>,
        /// The reference name the server certificate is valid for.
        name: String,
    },
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.record.abbreviated();
        match &self.kind {
            MatchKind::EndEntity => write!(
                f,
                "DANE-EE record {r} matches the server certificate (no name or date check, RFC 7672 §3.1.1)"
            ),
            MatchKind::TrustAnchor { depth, name } => {
                match depth {
                    Some(d) => write!(
                        f,
                        "DANE-TA record {r} matches certificate #{d} of the chain"
                    )?,
                    None => write!(
                        f,
                        "DANE-TA record {r} is the trust-anchor key (not sent by the server)"
                    )?,
                }
                write!(
                    f,
                    "; the server certificate chains to it and is valid for {name}"
                )
            }
        }
    }
}

/// Why a DANE-TA trust anchor matched but the server certificate did not verify to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainFailure {
    /// A certificate of the path has expired.
    Expired,
    /// A certificate of the path is not valid yet.
    NotYetValid,
    /// The server certificate is valid for none of the reference names.
    NameMismatch,
    /// No valid path to the anchor (wrong issuer, bad signature, not a CA, bad DER…).
    NotTrusted,
}

impl ChainFailure {
    fn of(e: &rustls::Error) -> ChainFailure {
        match e {
            rustls::Error::InvalidCertificate(ce) => match ce {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    ChainFailure::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    ChainFailure::NotYetValid
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => ChainFailure::NameMismatch,
                _ => ChainFailure::NotTrusted,
            },
            _ => ChainFailure::NotTrusted,
        }
    }
}

/// DANE did not authenticate the server. Carried inside the rustls error of a failed
/// handshake (see [`dane_failure`]) and mapped to an RFC 8460 result type by
/// [`DaneError::result_type`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DaneError {
    /// The server sent no certificate.
    #[error("DANE: the server presented no certificate")]
    NoCertificate,
    /// Verification was asked for with no usable record.
    #[error("DANE: no usable TLSA record to authenticate the server with")]
    NoUsableRecords,
    /// No usable record matches any presented certificate.
    #[error(
        "DANE: none of the {usable} usable TLSA record(s) matches the {presented} certificate(s) the server presented"
    )]
    NoMatch {
        /// Usable records tried.
        usable: usize,
        /// Certificates presented.
        presented: usize,
    },
    /// A DANE-TA record matched a trust anchor, but the server certificate does not
    /// verify to it (the first such failure when several anchors matched).
    #[error(
        "DANE-TA: record {} matches a trust anchor, but the server certificate does not verify to it for {names}: {reason}",
        record.abbreviated()
    )]
    TrustAnchor {
        /// The DANE-TA record.
        record: TlsaRecord,
        /// What failed.
        failure: ChainFailure,
        /// The reference names, comma-separated.
        names: String,
        /// rustls/webpki's description.
        reason: String,
    },
}

impl DaneError {
    /// The RFC 8460 result type: `tlsa-invalid` when no record authenticates the
    /// presented chain (§4.3.2: "none of the records in the RRset were found to be
    /// valid"); when a DANE-TA anchor matched but its chain failed, the negotiation
    /// failure types of §4.3.1, which name DANE explicitly for host mismatches:
    /// `certificate-host-mismatch`, `certificate-expired`, `certificate-not-trusted`
    /// (not-yet-valid: `validation-failure`, as [`TlsFailure`] maps it elsewhere).
    ///
    /// ```
    /// use stsrelay::dane::DaneError;
    /// use stsrelay::ResultType;
    /// assert_eq!(DaneError::NoMatch { usable: 1, presented: 1 }.result_type(), ResultType::TlsaInvalid);
    /// ```
    pub fn result_type(&self) -> ResultType {
        match self {
            DaneError::NoCertificate | DaneError::NoUsableRecords | DaneError::NoMatch { .. } => {
                ResultType::TlsaInvalid
            }
            DaneError::TrustAnchor { failure, .. } => match failure {
                ChainFailure::Expired => ResultType::CertificateExpired,
                ChainFailure::NameMismatch => ResultType::CertificateHostMismatch,
                ChainFailure::NotTrusted => ResultType::CertificateNotTrusted,
                ChainFailure::NotYetValid => ResultType::ValidationFailure,
            },
        }
    }

    /// Short `failure-reason-code`.
    pub fn reason_code(&self) -> &'static str {
        match self {
            DaneError::NoCertificate => "dane-no-certificate",
            DaneError::NoUsableRecords => "dane-no-usable-tlsa",
            DaneError::NoMatch { .. } => "dane-tlsa-no-match",
            DaneError::TrustAnchor { failure, .. } => match failure {
                ChainFailure::Expired => "dane-ta-certificate-expired",
                ChainFailure::NotYetValid => "dane-ta-certificate-not-yet-valid",
                ChainFailure::NameMismatch => "dane-ta-host-mismatch",
                ChainFailure::NotTrusted => "dane-ta-chain-invalid",
            },
        }
    }
}

impl From<&DaneError> for TlsFailure {
    fn from(e: &DaneError) -> TlsFailure {
        TlsFailure {
            result_type: e.result_type(),
            reason_code: e.reason_code(),
            reason: e.to_string(),
        }
    }
}

impl From<DaneError> for rustls::Error {
    /// `InvalidCertificate(Other(..))` holding the `DaneError`; [`dane_failure`] finds it.
    fn from(e: DaneError) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// The [`DaneError`] inside a rustls error from a [`DaneVerifier`] handshake, if any.
pub fn dane_failure(e: &rustls::Error) -> Option<&DaneError> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<DaneError>()
        }
        _ => None,
    }
}

/// [`dane_failure`] anywhere in an error's source chain (tokio-rustls wraps the rustls
/// error in an `io::Error`).
pub fn find_dane_failure<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a DaneError> {
    if let Some(d) = e.downcast_ref::<DaneError>() {
        return Some(d);
    }
    crate::tls::find_rustls_error(e).and_then(dane_failure)
}

/// Authenticate a presented chain (server certificate first) with the usable records of
/// `set` (RFC 7672 §3). Any one record passing authenticates the server:
///
/// - **DANE-EE(3)** (§3.1.1): the server certificate, or its key, matches the record. No
///   name check, no date check, no chain: the DNSSEC-signed record is the authority.
/// - **DANE-TA(2)** (§3.1.2): a certificate the server sent (not the server certificate
///   itself) matches the record; it becomes the only trust anchor, and the server
///   certificate must chain to it (webpki: signatures, validity dates, CA constraints)
///   and be valid for one of the reference names (§3.2.2; wildcards as in WebPKI).
///   Servers must send the trust-anchor certificate (§3.1.2 asks them to); only a full
///   `2 1 0` record (the whole SPKI) also works when the server leaves the anchor out —
///   the key then anchors the chain under the issuer names of the certificates sent.
///
/// `now` matters only to DANE-TA. Used by [`DaneVerifier`] during the handshake, and by
/// tools that show whether a server's certificate matches its TLSA records.
///
/// ```
/// use stsrelay::dane::{matching, verify_chain, CertUsage, MatchKind, MatchingType, ReferenceNames, Selector, TlsaSet};
/// use rustls_pki_types::UnixTime;
/// # let cert = rcgen::generate_simple_self_signed(vec!["self-signed.invalid".into()]).unwrap().cert;
/// # let cert = cert.der().clone();
/// // A "3 1 1" record for the server's key: name and dates are not checked.
/// let r = matching::record_for(CertUsage::DaneEe, Selector::Spki, MatchingType::Sha256, &cert).unwrap();
/// let set = TlsaSet::new(vec![r]);
/// let names = ReferenceNames::new("mx.example.com", "mx.example.com")?;
/// let provider = rustls::crypto::aws_lc_rs::default_provider();
/// let m = verify_chain(&set, &[cert], &names, UnixTime::now(), &provider).unwrap();
/// assert_eq!(m.kind, MatchKind::EndEntity);
/// # Ok::<(), stsrelay::dane::DaneSetupError>(())
/// ```
pub fn verify_chain(
    set: &TlsaSet,
    chain: &[CertificateDer<'_>],
    names: &ReferenceNames,
    now: UnixTime,
    provider: &CryptoProvider,
) -> Result<Match, DaneError> {
    let usable: Vec<&TlsaRecord> = set.usable().collect();
    if usable.is_empty() {
        return Err(DaneError::NoUsableRecords);
    }
    let Some(leaf) = chain.first() else {
        return Err(DaneError::NoCertificate);
    };
    // DANE-EE (RFC 7672 §3.1.1): the server certificate only; nothing else is checked.
    if let Some(r) = usable
        .iter()
        .find(|r| r.usage == CertUsage::DaneEe && matching::matches(r, leaf))
    {
        return Ok(Match {
            record: (*r).clone(),
            kind: MatchKind::EndEntity,
        });
    }
    // DANE-TA (RFC 7672 §3.1.2).
    let intermediates = chain.get(1..).unwrap_or_default();
    let mut first_failure: Option<DaneError> = None;
    for r in usable.iter().filter(|r| r.usage == CertUsage::DaneTa) {
        for (depth, anchor) in trust_anchors(r, chain) {
            match verify_to_anchor(leaf, intermediates, anchor, names, now, provider) {
                Ok(name) => {
                    return Ok(Match {
                        record: (*r).clone(),
                        kind: MatchKind::TrustAnchor { depth, name },
                    });
                }
                Err(e) => {
                    let failure = ChainFailure::of(&e);
                    // A `2 1 0` key the server did not send that signs nothing it sent is
                    // simply no match, not a broken chain.
                    let unseen_key = depth.is_none() && failure == ChainFailure::NotTrusted;
                    if first_failure.is_none() && !unseen_key {
                        first_failure = Some(DaneError::TrustAnchor {
                            record: (*r).clone(),
                            failure,
                            names: names.to_string(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
        }
    }
    Err(first_failure.unwrap_or(DaneError::NoMatch {
        usable: usable.len(),
        presented: chain.len(),
    }))
}

/// The trust anchors a DANE-TA record designates in a chain: each presented issuer
/// certificate (not the server's own, position ≥ 1) that matches; failing that, for a
/// full `2 1 0` key, that key under the issuer names the presented certificates carry.
fn trust_anchors(
    record: &TlsaRecord,
    chain: &[CertificateDer<'_>],
) -> Vec<(Option<usize>, TrustAnchor<'static>)> {
    let mut out: Vec<(Option<usize>, TrustAnchor<'static>)> = chain
        .iter()
        .enumerate()
        .take(MAX_CHAIN)
        .skip(1)
        .filter(|(_, c)| matching::matches(record, c))
        .filter_map(|(i, c)| {
            let ta = webpki::anchor_from_trusted_cert(c).ok()?.to_owned();
            Some((Some(i), ta))
        })
        .collect();
    if out.is_empty()
        && record.selector == Selector::Spki
        && record.matching == MatchingType::Full
        && let Some(spki) = sequence_contents(&record.data)
    {
        let mut issuers: Vec<Vec<u8>> = Vec::new();
        for c in chain.iter().take(MAX_CHAIN) {
            if let Ok(ee) = webpki::EndEntityCert::try_from(c) {
                let issuer = ee.issuer().to_vec();
                if !issuers.contains(&issuer) {
                    issuers.push(issuer);
                }
            }
        }
        out.extend(issuers.into_iter().map(|subject| {
            let ta = TrustAnchor {
                subject: subject.into(),
                subject_public_key_info: spki.to_vec().into(),
                name_constraints: None,
            };
            (None, ta)
        }));
    }
    out
}

/// The contents of a DER `SEQUENCE` that spans all of `der` (an SPKI without its outer
/// tag and length, as webpki's trust anchors hold it).
fn sequence_contents(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    (rest.len() == len).then_some(rest)
}

/// webpki path validation of `leaf` to the single `anchor`, then the name check; the
/// reference name that matched.
fn verify_to_anchor(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchor: TrustAnchor<'static>,
    names: &ReferenceNames,
    now: UnixTime,
    provider: &CryptoProvider,
) -> Result<String, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.roots.push(anchor);
    let parsed = ParsedCertificate::try_from(leaf)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    )?;
    let mut last = None;
    for (sn, text) in names.names.iter().zip(&names.text) {
        match rustls::client::verify_server_name(&parsed, sn) {
            Ok(()) => return Ok(text.clone()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(rustls::Error::InvalidCertificate(
        CertificateError::NotValidForName,
    )))
}

/// A rustls verifier that authenticates the server by DANE only (RFC 7672 §3): the SNI
/// name rustls passes is ignored in favour of the [`ReferenceNames`]; WebPKI roots play
/// no part. Handshake signatures are checked by the crypto provider as usual.
///
/// ```
/// use std::sync::Arc;
/// use stsrelay::dane::{DaneVerifier, ReferenceNames, TlsaSet};
///
/// let tlsa = TlsaSet::from_raw([(3, 1, 1, vec![0xab; 32])]);
/// let names = ReferenceNames::new("mx1.example.com", "mx1.example.com")?;
/// let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
/// let config = DaneVerifier::new(&tlsa, names, provider)?.client_config().unwrap();
/// // tokio_rustls::TlsConnector::from(config).connect(ServerName = TLSA base domain, stream)
/// # drop(config);
/// # Ok::<(), stsrelay::dane::DaneSetupError>(())
/// ```
#[derive(Debug)]
pub struct DaneVerifier {
    tlsa: TlsaSet,
    names: ReferenceNames,
    provider: Arc<CryptoProvider>,
}

impl DaneVerifier {
    /// A verifier for the usable records of `tlsa`; an error if there is none (DANE
    /// does not apply then, RFC 7672 §2.2).
    pub fn new(
        tlsa: &TlsaSet,
        names: ReferenceNames,
        provider: Arc<CryptoProvider>,
    ) -> Result<DaneVerifier, DaneSetupError> {
        let tlsa = tlsa.usable_set();
        if tlsa.is_empty() {
            return Err(DaneSetupError::NoUsableRecords);
        }
        Ok(DaneVerifier {
            tlsa,
            names,
            provider,
        })
    }

    /// A TLS 1.2+ client config using this verifier and its provider.
    pub fn client_config(self) -> Result<Arc<ClientConfig>, rustls::Error> {
        let provider = self.provider.clone();
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self))
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// The usable records it authenticates with.
    pub fn tlsa(&self) -> &TlsaSet {
        &self.tlsa
    }

    /// The reference names for DANE-TA.
    pub fn names(&self) -> &ReferenceNames {
        &self.names
    }

    /// [`verify_chain`] with this verifier's records, names and provider.
    pub fn verify(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Result<Match, DaneError> {
        verify_chain(&self.tlsa, chain, &self.names, now, &self.provider)
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len().min(MAX_CHAIN));
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().take(MAX_CHAIN).cloned());
        match self.verify(&chain, now) {
            Ok(m) => {
                tracing::debug!(names = %self.names, "DANE authenticated: {m}");
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => {
                tracing::debug!(names = %self.names, error = %e, "DANE authentication failed");
                Err(e.into())
            }
        }
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
mod tests;
