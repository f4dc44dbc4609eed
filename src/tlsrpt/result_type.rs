//! RFC 8460 §4.3 result types, with their exact wire names.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The result types of RFC 8460 §4.3 (registry in §6.6), as reported in
/// `failure-details[].result-type`.
///
/// ```
/// use stsrelay::ResultType;
/// assert_eq!(ResultType::CertificateHostMismatch.as_str(), "certificate-host-mismatch");
/// assert_eq!("sts-policy-fetch-error".parse::<ResultType>(), Ok(ResultType::StsPolicyFetchError));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultType {
    /// The MX did not offer STARTTLS although the policy requires it.
    StarttlsNotSupported,
    /// The certificate presented is not valid for the MX host name.
    CertificateHostMismatch,
    /// The certificate has expired.
    CertificateExpired,
    /// The certificate does not chain to a trusted root (or is self-signed).
    CertificateNotTrusted,
    /// Any other failure to establish a validated session (also: MX not in policy).
    ValidationFailure,
    /// DANE: no usable TLSA records.
    TlsaInvalid,
    /// DANE: DNSSEC validation failed.
    DnssecInvalid,
    /// DANE: DANE was required but not usable.
    DaneRequired,
    /// MTA-STS policy could not be fetched (DNS, TCP, timeout, non-200, redirect, oversize).
    StsPolicyFetchError,
    /// MTA-STS policy fetched but invalid (syntax, missing fields, wrong content type).
    StsPolicyInvalid,
    /// The policy host's certificate failed WebPKI validation.
    StsWebpkiInvalid,
}

impl ResultType {
    /// Every result type, in registry order.
    pub const ALL: [ResultType; 11] = [
        ResultType::StarttlsNotSupported,
        ResultType::CertificateHostMismatch,
        ResultType::CertificateExpired,
        ResultType::CertificateNotTrusted,
        ResultType::ValidationFailure,
        ResultType::TlsaInvalid,
        ResultType::DnssecInvalid,
        ResultType::DaneRequired,
        ResultType::StsPolicyFetchError,
        ResultType::StsPolicyInvalid,
        ResultType::StsWebpkiInvalid,
    ];

    /// The RFC 8460 wire name, e.g. `"certificate-expired"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ResultType::StarttlsNotSupported => "starttls-not-supported",
            ResultType::CertificateHostMismatch => "certificate-host-mismatch",
            ResultType::CertificateExpired => "certificate-expired",
            ResultType::CertificateNotTrusted => "certificate-not-trusted",
            ResultType::ValidationFailure => "validation-failure",
            ResultType::TlsaInvalid => "tlsa-invalid",
            ResultType::DnssecInvalid => "dnssec-invalid",
            ResultType::DaneRequired => "dane-required",
            ResultType::StsPolicyFetchError => "sts-policy-fetch-error",
            ResultType::StsPolicyInvalid => "sts-policy-invalid",
            ResultType::StsWebpkiInvalid => "sts-webpki-invalid",
        }
    }
}

impl fmt::Display for ResultType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a string that is not an RFC 8460 result type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown RFC 8460 result type {0:?}")]
pub struct UnknownResultType(pub String);

impl std::str::FromStr for ResultType {
    type Err = UnknownResultType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResultType::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownResultType(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_through_serde_and_fromstr() {
        for r in ResultType::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<ResultType>(&json).unwrap(), r);
            assert_eq!(r.as_str().parse::<ResultType>().unwrap(), r);
        }
        assert!("certificate_expired".parse::<ResultType>().is_err());
    }
}
