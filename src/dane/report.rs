//! TLS-RPT (RFC 8460) fields for sessions under DANE: policy type `tlsa`, the TLSA
//! records as policy strings, the TLSA base domain as policy domain.

use super::tlsa::TlsaSet;
use crate::tlsrpt::{PolicyType, SessionResult};

/// The applied-policy part of a TLS-RPT record for a DANE session (RFC 8460 §4.4).
///
/// ```
/// use stsrelay::dane::{DanePolicy, TlsaSet};
/// use stsrelay::tlsrpt::PolicyType;
///
/// let set = TlsaSet::from_raw([(3, 1, 1, vec![0xab; 32]), (2, 0, 1, vec![0xcd; 32])]);
/// let p = DanePolicy::new("MX1.Example.NET.", &set);
/// assert_eq!(p.policy_type(), PolicyType::Tlsa);
/// assert_eq!(p.policy_domain, "mx1.example.net");
/// assert!(p.policy_strings[0].starts_with("2 0 1 cdcd"));
/// assert!(p.policy_strings[1].starts_with("3 1 1 abab"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DanePolicy {
    /// `policy-domain` for DANE: the TLSA base domain (RFC 7672 §2.2.3), where the TLSA
    /// policy is defined; lower case, no trailing dot.
    pub policy_domain: String,
    /// `policy-string`: every record of the RRset (usable or not) in presentation form,
    /// sorted so that DNS answer order does not split the report's counters.
    pub policy_strings: Vec<String>,
}

impl DanePolicy {
    /// The policy fields for the TLSA RRset found at `_25._tcp.<tlsa_base_domain>`.
    pub fn new(tlsa_base_domain: &str, set: &TlsaSet) -> DanePolicy {
        DanePolicy {
            policy_domain: tlsa_base_domain.trim_end_matches('.').to_ascii_lowercase(),
            policy_strings: set.presentation(),
        }
    }

    /// `tlsa`.
    pub fn policy_type(&self) -> PolicyType {
        PolicyType::Tlsa
    }

    /// Set a session result's applied policy: type `tlsa`, the records as policy
    /// strings, no `mx-host` patterns. `policy_domain` is left as the caller set it:
    /// in [`SessionResult`] it also chooses which domain's report (and `_smtp._tls`
    /// record) the session is counted in, normally the recipient domain; see
    /// [`DanePolicy::policy_domain`] for the RFC 8460 value.
    pub fn apply(&self, r: &mut SessionResult) {
        r.policy_type = PolicyType::Tlsa;
        r.policy_strings = self.policy_strings.clone();
        r.mx_host_patterns = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dane::TlsaRecord;
    use crate::tlsrpt::{ResultType, SessionFailure};

    #[test]
    fn apply_sets_the_tlsa_policy_and_keeps_the_rest() {
        let set = TlsaSet::new(vec![TlsaRecord::from_raw(3, 1, 1, vec![0x0f; 32])]);
        let mut r = SessionResult {
            at: 1,
            policy_domain: "example.com".into(),
            policy_type: PolicyType::Sts,
            policy_strings: vec!["version: STSv1".into()],
            mx_host_patterns: vec!["*.example.com".into()],
            receiving_mx_hostname: "mx1.example.com".into(),
            receiving_ip: None,
            receiving_mx_helo: None,
            sending_ip: None,
            failure: Some(SessionFailure {
                result_type: ResultType::TlsaInvalid,
                reason_code: "dane-tlsa-no-match".into(),
            }),
        };
        DanePolicy::new("mx1.example.com", &set).apply(&mut r);
        assert_eq!(r.policy_type, PolicyType::Tlsa);
        assert_eq!(r.policy_strings, vec![format!("3 1 1 {}", "0f".repeat(32))]);
        assert!(r.mx_host_patterns.is_empty());
        assert_eq!(r.policy_domain, "example.com");
        assert_eq!(serde_json::to_string(&r.policy_type).unwrap(), "\"tlsa\"");
    }
}
