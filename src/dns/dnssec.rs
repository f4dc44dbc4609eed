//! DNSSEC-validated lookups for DANE (RFC 7672 §2.1.1): every answer carries its
//! [`Security`], and the trust anchor comes from `dns.trust_anchor` or hickory's
//! built-in root keys.
//!
//! How hickory 0.26's validating resolver reports outcomes, and what they become here:
//!
//! | hickory | here |
//! |---|---|
//! | answer records with `Proof::Secure` (all of them, CNAMEs included) | `Secure` |
//! | answer records with `Proof::Insecure` / `Indeterminate` | `Insecure` |
//! | `NoRecordsFound` with a secure NSEC/NSEC3 in the authority section | `Secure`, no records |
//! | `NoRecordsFound` otherwise, or `Nsec { proof: Insecure }` | `Insecure`, no records |
//! | `DnssecBogus` (bad or expired signature, DS without matching DNSKEY, missing denial) | `Bogus` |
//! | timeout, SERVFAIL, refused, … | `Err(DnsError)`: the caller defers |
//!
//! A timeout while hickory fetches the DS/DNSKEY chain of an answer it already has is
//! reported by hickory as a bogus proof, so it comes out as `Bogus`: either way DANE
//! delivery defers (RFC 7672 §2.2).

use super::{DnsError, MxAnswer, Resolver};
use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError as WireError, NetError};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors, Verifier};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_resolver::proto::serialize::txt::trust_anchor::{Entry, Parser};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// The DNSSEC status of an answer (RFC 4035 §4.3).
///
/// ```
/// use stsrelay::dns::Security;
/// let worst = Security::Secure.and(Security::Insecure);
/// assert_eq!(worst, Security::Insecure);
/// assert!(matches!(worst.and(Security::Bogus("bad RRSIG".into())), Security::Bogus(_)));
/// assert!(Security::Secure.is_secure());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Security {
    /// Validated from the trust anchor down (records, or their secure denial).
    Secure,
    /// Provably unsigned (an insecure delegation on the way), or DNSSEC is off.
    Insecure,
    /// Should validate and does not; the reason says what failed.
    Bogus(String),
}

impl Security {
    /// `Secure`?
    pub fn is_secure(&self) -> bool {
        matches!(self, Security::Secure)
    }

    /// The weaker of two: `Bogus` (the first reason) before `Insecure` before `Secure`.
    pub fn and(self, other: Security) -> Security {
        match (self, other) {
            (b @ Security::Bogus(_), _) | (_, b @ Security::Bogus(_)) => b,
            (Security::Insecure, _) | (_, Security::Insecure) => Security::Insecure,
            _ => Security::Secure,
        }
    }
}

impl std::fmt::Display for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Secure => f.write_str("secure"),
            Security::Insecure => f.write_str("insecure"),
            Security::Bogus(why) => write!(f, "bogus ({why})"),
        }
    }
}

/// A trust anchor file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustAnchorError {
    /// The file could not be read.
    #[error("cannot read trust anchor file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a list of DNSKEY records.
    #[error("invalid trust anchor file {origin}: {message}")]
    Invalid {
        /// The file (or `<string>`).
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// The DNSKEYs validation starts from: hickory's built-in root keys, or the DNSKEY
/// records of a file (`dns.trust_anchor`), e.g. for a private signed zone.
///
/// A file holds one DNSKEY record per line, `owner [ttl] IN DNSKEY flags 3 alg key`,
/// as `kdig zone. DNSKEY` or `keymgr zone. dnskey` print them (`;` starts a comment).
/// List every DNSKEY of an anchored zone (KSK and ZSK): hickory trusts that zone's
/// DNSKEY set only when each key in it is an anchor. A file replaces the root keys.
///
/// ```
/// use stsrelay::dns::TrustAnchor;
/// let ta: TrustAnchor = "test. 3600 IN DNSKEY 257 3 13 \
///     mdsswUyr3DPW132mOi8V9xESWE8jTo0dxCjjnopKl+GqJxpVXckHAeF+KkxLbxILfDLUT0rAK9iUzy1L53eKGQ=="
///     .parse()
///     .unwrap();
/// assert_eq!(ta.zones(), ["test."]);
/// let err = "test. 3600 IN DS 2371 13 2 1F98".parse::<TrustAnchor>().unwrap_err();
/// assert!(err.to_string().contains("DNSKEY"), "{err}");
/// ```
#[derive(Clone)]
pub struct TrustAnchor {
    anchors: Arc<TrustAnchors>,
    /// The anchored zones (`"."` for the built-in keys), for logs.
    zones: Vec<String>,
    /// Where the keys came from, for logs.
    origin: String,
}

impl TrustAnchor {
    /// The root zone's KSKs (key tags 20326 and 38696) built into hickory.
    pub fn builtin() -> TrustAnchor {
        TrustAnchor {
            anchors: Arc::new(TrustAnchors::default()),
            zones: vec![".".into()],
            origin: "built-in root keys".into(),
        }
    }

    /// The DNSKEY records in `path`.
    pub fn from_file(path: &Path) -> Result<TrustAnchor, TrustAnchorError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrustAnchorError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_from(&text, &path.display().to_string())
    }

    /// The anchored zones, as written (fully qualified), one per key.
    pub fn zones(&self) -> &[String] {
        &self.zones
    }

    pub(super) fn anchors(&self) -> Arc<TrustAnchors> {
        self.anchors.clone()
    }

    fn parse_from(text: &str, origin: &str) -> Result<TrustAnchor, TrustAnchorError> {
        let invalid = |message: String| TrustAnchorError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let hint = "expected DNSKEY records such as `example. 3600 IN DNSKEY 257 3 13 <base64>` \
                    (not DS records)";
        let entries = Parser::new(text).parse().map_err(|e| {
            let no_class = text.lines().any(|l| {
                let mut tokens = l.split_whitespace();
                tokens.next().is_some_and(|t| !t.starts_with(';'))
                    && tokens
                        .next()
                        .is_some_and(|t| t.eq_ignore_ascii_case("DNSKEY"))
            });
            if no_class {
                invalid(format!(
                    "{e}; each record needs its class, `zone. [ttl] IN DNSKEY …` \
                     (Knot's `keymgr zone. dnskey` prints none)"
                ))
            } else {
                invalid(format!("{e}; {hint}"))
            }
        })?;
        if entries.is_empty() {
            return Err(invalid(format!("no DNSKEY records; {hint}")));
        }
        let mut zones = Vec::with_capacity(entries.len());
        for entry in &entries {
            let Entry::DNSKEY(record) = entry else {
                return Err(invalid(format!("only DNSKEY records are accepted; {hint}")));
            };
            let name = record.name().to_ascii();
            if record.dns_class() != DNSClass::IN {
                return Err(invalid(format!(
                    "the DNSKEY of {name} has class {}, not IN",
                    record.dns_class()
                )));
            }
            if !record.data().zone_key() {
                return Err(invalid(format!(
                    "the DNSKEY of {name} is not a zone key (flags {})",
                    record.data().flags()
                )));
            }
            if !record.data().algorithm().is_supported() {
                return Err(invalid(format!(
                    "the DNSKEY of {name} uses unsupported algorithm {}",
                    record.data().algorithm()
                )));
            }
            zones.push(name);
        }
        let anchors = TrustAnchors::from_str(text).map_err(|e| invalid(e.to_string()))?;
        Ok(TrustAnchor {
            anchors: Arc::new(anchors),
            zones,
            origin: origin.to_string(),
        })
    }
}

impl FromStr for TrustAnchor {
    type Err = TrustAnchorError;

    fn from_str(text: &str) -> Result<TrustAnchor, TrustAnchorError> {
        Self::parse_from(text, "<string>")
    }
}

impl std::fmt::Display for TrustAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut zones = self.zones.clone();
        zones.dedup();
        write!(f, "{} ({})", self.origin, zones.join(", "))
    }
}

impl std::fmt::Debug for TrustAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustAnchor({self})")
    }
}

/// One validated query's outcome.
#[derive(Debug)]
pub(super) struct Checked {
    /// Of the records, or of their denial.
    pub(super) security: Security,
    /// The answer records (CNAMEs included, RRSIGs left out); empty for a denial or
    /// a bogus answer.
    pub(super) answers: Vec<Record>,
    /// The name does not exist (NXDOMAIN).
    pub(super) nx_domain: bool,
}

impl Checked {
    /// No records and no say in the security ([`Security::and`] keeps the other side):
    /// stands in for an address family whose lookup failed.
    fn empty() -> Checked {
        Checked {
            security: Security::Secure,
            answers: vec![],
            nx_domain: false,
        }
    }
}

/// The security of a set of records: all secure, or the weakest proof among them.
fn security_of(records: &[Record], what: &str) -> Security {
    records
        .iter()
        .map(|r| match r.proof {
            Proof::Secure => Security::Secure,
            Proof::Bogus => Security::Bogus(format!("{what}: {} failed validation", r.name)),
            Proof::Insecure | Proof::Indeterminate => Security::Insecure,
        })
        .fold(Security::Secure, Security::and)
}

/// Runs one query on the validating resolver `v` and labels the outcome.
pub(super) async fn checked_lookup(
    v: &TokioResolver,
    name: &str,
    rtype: RecordType,
    label: &'static str,
) -> Result<Checked, DnsError> {
    let what = format!("{label} {name}");
    let checked = match v.lookup(Resolver::fqdn(name), rtype).await {
        Ok(lookup) => {
            let answers: Vec<Record> = lookup
                .answers()
                .iter()
                .filter(|r| r.record_type() != RecordType::RRSIG)
                .cloned()
                .collect();
            Checked {
                security: security_of(&answers, &what),
                answers,
                nx_domain: false,
            }
        }
        Err(NetError::Dns(WireError::NoRecordsFound(nr))) => {
            // A denial is secure only through a validated NSEC/NSEC3 (RFC 4035 §5.4);
            // hickory returns the denial with the proofs on its authority records.
            let secure_denial = nr.authorities.iter().flat_map(|a| a.iter()).any(|r| {
                r.proof == Proof::Secure
                    && matches!(r.record_type(), RecordType::NSEC | RecordType::NSEC3)
            });
            Checked {
                security: if secure_denial {
                    Security::Secure
                } else {
                    Security::Insecure
                },
                answers: vec![],
                nx_domain: nr.response_code == ResponseCode::NXDomain,
            }
        }
        Err(NetError::Dns(WireError::DnssecBogus)) => Checked {
            security: Security::Bogus(format!("{what}: DNSSEC validation failed")),
            answers: vec![],
            nx_domain: false,
        },
        Err(NetError::Dns(WireError::Nsec {
            proof, response, ..
        })) => Checked {
            security: match proof {
                Proof::Bogus => Security::Bogus(format!("{what}: the denial failed validation")),
                _ => Security::Insecure,
            },
            answers: vec![],
            nx_domain: response.response_code == ResponseCode::NXDomain,
        },
        Err(e) => return Err(Resolver::failure(name, label, &e)),
    };
    match &checked.security {
        Security::Bogus(why) => tracing::warn!(%why, "DNSSEC-bogus answer"),
        s => tracing::debug!(query = %what, security = %s, records = checked.answers.len(),
            nx_domain = checked.nx_domain, "validated lookup"),
    }
    Ok(checked)
}

impl Resolver {
    /// Does DNSSEC validation work through the configured nameservers? Validates the
    /// DNSKEY RRset of the trust anchor's zone (the root by default). `None` with
    /// DNSSEC off. Anything but [`Security::Secure`] means every DANE lookup will
    /// come back bogus (the nameservers strip DNSSEC records, or the anchor is
    /// wrong), and every domain will be deferred: the relay says so at start.
    pub async fn dnssec_selfcheck(&self) -> Option<Result<Security, DnsError>> {
        let v = self.validating.as_ref()?;
        let zone = self.anchor_zone.clone().unwrap_or_else(|| ".".into());
        Some(
            checked_lookup(v, &zone, RecordType::DNSKEY, "DNSKEY")
                .await
                .map(|c| c.security),
        )
    }

    /// MX records of `domain` (as [`Resolver::mx`]) with their DNSSEC status
    /// (RFC 7672 §2.2.1: DANE applies only to MX hosts from a secure MX RRset; a
    /// bogus one defers delivery). A bogus answer carries no hosts
    /// (`MxAnswer::Hosts(vec![])`), never an implicit MX. With DNSSEC off the plain
    /// answer comes back as [`Security::Insecure`].
    pub async fn mx_validated(&self, domain: &str) -> Result<(Security, MxAnswer), DnsError> {
        let Some(v) = &self.validating else {
            return Ok((Security::Insecure, self.mx(domain).await?));
        };
        let c = checked_lookup(v, domain, RecordType::MX, "MX").await?;
        let answer = match c.security {
            Security::Bogus(_) => MxAnswer::Hosts(vec![]),
            _ if c.nx_domain => MxAnswer::NxDomain,
            _ => MxAnswer::from_records(&c.answers),
        };
        Ok((c.security, answer))
    }

    /// IPv4 and IPv6 addresses of `host` (as [`Resolver::ips`]) with the weaker
    /// DNSSEC status of the A and AAAA answers (RFC 7672 §2.2.2: TLSA records are
    /// looked up only for hosts whose addresses are secure). Bogus carries no addresses.
    pub async fn ips_validated(&self, host: &str) -> Result<(Security, Vec<IpAddr>), DnsError> {
        let Some(v) = &self.validating else {
            return Ok((Security::Insecure, self.ips(host).await?));
        };
        let (a, aaaa) = tokio::join!(
            checked_lookup(v, host, RecordType::A, "A"),
            checked_lookup(v, host, RecordType::AAAA, "AAAA"),
        );
        // One family failing (an AAAA SERVFAIL, say) leaves the other's addresses, as
        // the plain lookup does; both failing is the error.
        let (a, aaaa) = match (a, aaaa) {
            (Ok(a), Ok(aaaa)) => (a, aaaa),
            (Ok(one), Err(e)) | (Err(e), Ok(one)) => {
                tracing::debug!(%host, error = %e, "one address family failed; using the other");
                (one, Checked::empty())
            }
            (Err(e), Err(_)) => return Err(e),
        };
        let security = a.security.and(aaaa.security);
        if let Security::Bogus(_) = security {
            return Ok((security, vec![])); // none of the addresses is to be used
        }
        let ips = a
            .answers
            .iter()
            .chain(&aaaa.answers)
            .filter_map(|r| match &r.data {
                RData::A(ip) => Some(IpAddr::V4(ip.0)),
                RData::AAAA(ip) => Some(IpAddr::V6(ip.0)),
                _ => None,
            })
            .collect();
        Ok((security, ips))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "mdsswUyr3DPW132mOi8V9xESWE8jTo0dxCjjnopKl+GqJxpVXckHAeF+KkxLbxILfDLUT0rAK9iUzy1L53eKGQ==";

    #[test]
    fn security_and_is_the_weaker() {
        use Security::*;
        assert_eq!(Secure.and(Secure), Secure);
        assert_eq!(Secure.and(Insecure), Insecure);
        assert_eq!(Insecure.and(Secure), Insecure);
        assert_eq!(Insecure.and(Bogus("x".into())), Bogus("x".into()));
        assert_eq!(Bogus("a".into()).and(Bogus("b".into())), Bogus("a".into()));
        assert_eq!(Bogus("a".into()).to_string(), "bogus (a)");
    }

    #[test]
    fn trust_anchor_accepts_dnskey_lines_with_comments() {
        let text = format!(
            "; exported with kdig\ntest.\t3600\tIN\tDNSKEY\t257 3 13 {KEY}\nsub.test. IN DNSKEY 256 3 13 {KEY}\n"
        );
        let ta: TrustAnchor = text.parse().unwrap();
        assert_eq!(ta.zones(), ["test.", "sub.test."]);
        assert_eq!(ta.to_string(), "<string> (test., sub.test.)");
        assert_eq!(TrustAnchor::builtin().zones(), ["."]);
    }

    #[test]
    fn trust_anchor_errors_say_what_is_wrong() {
        let e = |t: &str| t.parse::<TrustAnchor>().unwrap_err().to_string();
        assert!(e("").contains("no DNSKEY records"), "{}", e(""));
        let ds = e("test. 3600 IN DS 2371 13 2 1F987CC6583E92DF0890718C42");
        assert!(ds.contains("DS") && ds.contains("not DS records"), "{ds}");
        let not_zone = e(&format!("test. 3600 IN DNSKEY 0 3 13 {KEY}"));
        assert!(not_zone.contains("not a zone key"), "{not_zone}");
        let class = e(&format!("test. 3600 CH DNSKEY 257 3 13 {KEY}"));
        assert!(class.contains("class CH"), "{class}");
        let no_class = e(&format!("test. DNSKEY 257 3 13 {KEY}"));
        assert!(no_class.contains("needs its class"), "{no_class}");
        let garbage = e("test. 3600 IN DNSKEY 257 3 13 !!!notbase64");
        assert!(
            garbage.starts_with("invalid trust anchor file <string>"),
            "{garbage}"
        );
        let missing = TrustAnchor::from_file(Path::new("/nonexistent/anchor.keys"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/anchor.keys"), "{missing}");
    }
}
