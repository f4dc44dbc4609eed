//! DANE for SMTP (RFC 7672): authenticating MX hosts with DNSSEC-signed TLSA records.
//!
//! An SMTP client that finds its MX host's address and the TLSA RRset at
//! `_25._tcp.<host>` DNSSEC-secure must use STARTTLS and accept the server only if its
//! certificate matches one of the usable records: `DANE-EE(3)` pins the server's own
//! certificate or key (no name or date checks), `DANE-TA(2)` names a trust anchor that
//! the server's chain must verify to, for the MX name. PKIX usages are unusable for SMTP;
//! a secure RRset with no usable record means mandatory but unauthenticated TLS. DNSSEC
//! failures make an MX unusable rather than falling back to less security.
//!
//! This module is pure: it parses and classifies TLSA records ([`TlsaRecord`],
//! [`TlsaSet`]), matches certificates ([`matching`]), authenticates chains
//! ([`verify_chain`], [`DaneVerifier`] for rustls), decides between DANE and MTA-STS per
//! MX ([`mx_policy`]) and fills TLS-RPT fields ([`DanePolicy`]). DNS lookups and their
//! DNSSEC status come from elsewhere, as [`Security`] and raw TLSA fields.
//!
//! ```
//! use stsrelay::dane::{TlsaSet, SetStatus};
//! let set = TlsaSet::from_raw([(3, 1, 1, vec![0u8; 32])]);
//! assert_eq!(set.status(), SetStatus::Usable);
//! ```

pub mod matching;
mod precedence;
mod report;
#[cfg(test)]
mod testpki;
mod tlsa;
mod verifier;

pub use precedence::{MxDnssec, MxPolicy, Security, SkipReason, mx_policy};
pub use report::DanePolicy;
pub use tlsa::{
    CertUsage, MatchingType, Selector, SetStatus, TlsaParseError, TlsaRecord, TlsaSet, Unusable,
};
pub use verifier::{
    ChainFailure, DaneError, DaneSetupError, DaneVerifier, Match, MatchKind, ReferenceNames,
    dane_failure, find_dane_failure, verify_chain,
};
