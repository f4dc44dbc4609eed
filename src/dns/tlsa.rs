//! TLSA lookups for DANE SMTP (RFC 7672 §2.2.3), DNSSEC-validated.

use super::dnssec::checked_lookup;
use super::{DnsError, Resolver, Security};
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::{RData, RecordType};
use std::collections::HashSet;

/// Longest CNAME chain followed from an MX host name.
const MAX_CNAME_HOPS: usize = 8;

/// One TLSA record: (certificate usage, selector, matching type, association data),
/// RFC 6698 §2.1.
pub type TlsaRecord = (u8, u8, u8, Vec<u8>);

/// The TLSA records that apply to one MX host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsaAnswer {
    /// DNSSEC status of the TLSA RRset or of its denial. `Secure` with no records is
    /// a validated "no TLSA here": DANE is not required for this host.
    pub security: Security,
    /// The records (all of them: which usages are usable is the DANE verifier's call).
    pub records: Vec<TlsaRecord>,
    /// The TLSA base domain (RFC 7671 §7, RFC 7672 §2.2.3): the CNAME-expanded MX
    /// host when its alias chain is secure and TLSA records were found there, else
    /// the MX host itself. Lowercase, no trailing dot; a reference identifier for
    /// the certificate name checks of DANE-TA(2).
    pub base_domain: String,
}

impl TlsaAnswer {
    fn none(security: Security, base_domain: &str) -> TlsaAnswer {
        TlsaAnswer {
            security,
            records: vec![],
            base_domain: base_domain.to_string(),
        }
    }
}

fn normalise(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl Resolver {
    /// The TLSA records at `_port._tcp.host` (RFC 7672 §2.2.3), validated.
    ///
    /// When `host` is an alias (CNAME) with a secure chain, the fully expanded name is
    /// tried first and the original name only if that finds no secure TLSA records.
    /// NXDOMAIN or NODATA with a secure denial is `Secure` with no records; an insecure
    /// answer is `Insecure`; a validation failure is `Bogus`. A network failure is an
    /// error (the caller defers). With DNSSEC off nothing is asked: `Insecure`.
    pub async fn tlsa(&self, port: u16, host: &str) -> Result<TlsaAnswer, DnsError> {
        let host = normalise(host);
        let Some(v) = &self.validating else {
            return Ok(TlsaAnswer::none(Security::Insecure, &host));
        };
        match expand_cname(v, &host).await? {
            (Security::Bogus(why), _) => return Ok(TlsaAnswer::none(Security::Bogus(why), &host)),
            (Security::Secure, Some(target)) => {
                let at_target = tlsa_at(v, port, &target).await?;
                let found = at_target.security.is_secure() && !at_target.records.is_empty();
                if found || matches!(at_target.security, Security::Bogus(_)) {
                    return Ok(at_target);
                }
                tracing::debug!(%host, %target, security = %at_target.security,
                    "no secure TLSA at the expanded name; trying the MX host name");
            }
            _ => {}
        }
        tlsa_at(v, port, &host).await
    }
}

/// TLSA records at `_port._tcp.base`.
async fn tlsa_at(v: &TokioResolver, port: u16, base: &str) -> Result<TlsaAnswer, DnsError> {
    let name = format!("_{port}._tcp.{base}");
    let c = checked_lookup(v, &name, RecordType::TLSA, "TLSA").await?;
    let records = match c.security {
        Security::Bogus(_) => vec![],
        _ => c
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::TLSA(t) => Some((
                    u8::from(t.cert_usage),
                    u8::from(t.selector),
                    u8::from(t.matching),
                    t.cert_data.clone(),
                )),
                _ => None,
            })
            .collect(),
    };
    Ok(TlsaAnswer {
        security: c.security,
        records,
        base_domain: base.to_string(),
    })
}

/// Follows the CNAME chain from `host`: the chain's security (the weakest of its
/// CNAME RRsets; `Secure` for no alias) and the final target if `host` is an alias.
async fn expand_cname(
    v: &TokioResolver,
    host: &str,
) -> Result<(Security, Option<String>), DnsError> {
    let mut security = Security::Secure;
    let mut current = host.to_string();
    let mut seen = HashSet::from([current.clone()]);
    for _ in 0..MAX_CNAME_HOPS {
        let c = checked_lookup(v, &current, RecordType::CNAME, "CNAME").await?;
        let target = c.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(t) => Some(normalise(&t.0.to_ascii())),
            _ => None,
        });
        let Some(target) = target else {
            // Not an alias (whatever the denial's status: the TLSA lookup judges that zone).
            return Ok((security, (current != host).then_some(current)));
        };
        security = security.and(c.security);
        if !seen.insert(target.clone()) {
            return Err(DnsError {
                name: host.to_string(),
                rtype: "CNAME",
                reason: format!("CNAME loop at {target}"),
            });
        }
        current = target;
    }
    Err(DnsError {
        name: host.to_string(),
        rtype: "CNAME",
        reason: format!("CNAME chain longer than {MAX_CNAME_HOPS}"),
    })
}
