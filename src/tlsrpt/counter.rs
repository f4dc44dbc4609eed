//! Durable counters: each session result adds one to the counter of its (policy domain,
//! UTC day, applied policy, outcome). Reports are built from these counters, so storage
//! grows with the number of distinct outcomes, not with the number of sessions.

use super::{Day, PolicyType, ResultType, SessionResult};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;

/// The applied policy, as RFC 8460 §4.4 describes it (`policy-type`, `policy-string`,
/// `mx-host`); one `policies[]` element of a report per distinct value (R68).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyKey {
    /// `sts`, `tlsa` or `no-policy-found`.
    pub policy_type: PolicyType,
    /// The policy lines (empty when nothing was fetched).
    pub policy_strings: Vec<String>,
    /// The policy's `mx` patterns.
    pub mx_host: Vec<String>,
}

/// One kind of failure (one `failure-details[]` element, without its count).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FailureDetail {
    /// RFC 8460 result type.
    pub result_type: ResultType,
    /// Our address on the connection.
    pub sending_mta_ip: Option<IpAddr>,
    /// The MX host name (absent for policy fetch failures).
    pub receiving_mx_hostname: Option<String>,
    /// The MX's greeting/EHLO name.
    pub receiving_mx_helo: Option<String>,
    /// The MX's address.
    pub receiving_ip: Option<IpAddr>,
    /// `failure-reason-code`.
    pub failure_reason_code: Option<String>,
}

/// What one counter counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    /// The UTC day of the sessions.
    pub day: Day,
    /// The policy domain (A-label, lower case).
    pub policy_domain: String,
    /// The applied policy.
    pub policy: PolicyKey,
    /// `None` counts successful sessions.
    pub failure: Option<FailureDetail>,
}

impl CounterKey {
    /// The counter a session result adds to.
    ///
    /// ```
    /// use stsrelay::tlsrpt::{CounterKey, PolicyType, SessionResult};
    /// let r = SessionResult {
    ///     at: 1_795_737_600 + 60,
    ///     policy_domain: "Example.TEST".into(),
    ///     policy_type: PolicyType::NoPolicyFound,
    ///     policy_strings: vec![],
    ///     mx_host_patterns: vec![],
    ///     receiving_mx_hostname: "mx.example.test".into(),
    ///     receiving_ip: None,
    ///     receiving_mx_helo: None,
    ///     sending_ip: None,
    ///     failure: None,
    /// };
    /// let k = CounterKey::of(&r);
    /// assert_eq!(k.day.to_string(), "2026-11-27");
    /// assert_eq!(k.policy_domain, "example.test");
    /// assert!(k.failure.is_none());
    /// ```
    pub fn of(r: &SessionResult) -> CounterKey {
        CounterKey {
            day: Day::of(r.at),
            policy_domain: r.policy_domain.trim_end_matches('.').to_ascii_lowercase(),
            policy: PolicyKey {
                policy_type: r.policy_type,
                policy_strings: r.policy_strings.clone(),
                mx_host: r.mx_host_patterns.clone(),
            },
            failure: r.failure.as_ref().map(|f| FailureDetail {
                result_type: f.result_type,
                sending_mta_ip: r.sending_ip,
                receiving_mx_hostname: Some(r.receiving_mx_hostname.clone())
                    .filter(|h| !h.is_empty()),
                receiving_mx_helo: r.receiving_mx_helo.clone(),
                receiving_ip: r.receiving_ip,
                failure_reason_code: Some(f.reason_code.clone()).filter(|c| !c.is_empty()),
            }),
        }
    }

    /// The policy as stored (canonical JSON).
    pub fn policy_json(&self) -> String {
        serde_json::to_string(&self.policy).unwrap_or_default()
    }

    /// The outcome as stored: `""` for success, else canonical JSON.
    pub fn failure_json(&self) -> String {
        self.failure
            .as_ref()
            .and_then(|f| serde_json::to_string(f).ok())
            .unwrap_or_default()
    }

    /// Rebuild a key from its stored parts; `None` if they do not parse.
    pub fn from_stored(day: Day, domain: String, policy: &str, failure: &str) -> Option<Self> {
        Some(CounterKey {
            day,
            policy_domain: domain,
            policy: serde_json::from_str(policy).ok()?,
            failure: if failure.is_empty() {
                None
            } else {
                Some(serde_json::from_str(failure).ok()?)
            },
        })
    }
}

/// Sum a batch of session results into counters (one store update per distinct key).
pub fn count(results: &[SessionResult]) -> Vec<(CounterKey, u64)> {
    let mut map: HashMap<CounterKey, u64> = HashMap::new();
    for r in results {
        *map.entry(CounterKey::of(r)).or_default() += 1;
    }
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlsrpt::SessionFailure;

    fn session(at: i64, failure: Option<(ResultType, &str)>) -> SessionResult {
        SessionResult {
            at,
            policy_domain: "example.test".into(),
            policy_type: PolicyType::Sts,
            policy_strings: vec!["version: STSv1".into(), "mode: testing".into()],
            mx_host_patterns: vec!["mx.example.test".into()],
            receiving_mx_hostname: "mx.example.test".into(),
            receiving_ip: Some("192.0.2.1".parse().unwrap()),
            receiving_mx_helo: Some("mx.example.test".into()),
            sending_ip: Some("192.0.2.9".parse().unwrap()),
            failure: failure.map(|(t, c)| SessionFailure {
                result_type: t,
                reason_code: c.into(),
            }),
        }
    }

    #[test]
    fn sessions_are_summed_per_day_and_outcome() {
        let day = 1_795_737_600;
        let batch = vec![
            session(day + 1, None),
            session(day + 2, None),
            session(day - 1, None),
            session(day + 3, Some((ResultType::CertificateExpired, "expired"))),
            session(day + 4, Some((ResultType::CertificateExpired, "expired"))),
            session(day + 5, Some((ResultType::StarttlsNotSupported, ""))),
        ];
        let counts = count(&batch);
        assert_eq!(counts.len(), 4);
        let get = |d: i64, t: Option<ResultType>| {
            counts
                .iter()
                .find(|(k, _)| {
                    k.day == Day::of(d) && k.failure.as_ref().map(|f| f.result_type) == t
                })
                .map(|(_, n)| *n)
        };
        assert_eq!(get(day, None), Some(2));
        assert_eq!(get(day - 1, None), Some(1));
        assert_eq!(get(day, Some(ResultType::CertificateExpired)), Some(2));
        assert_eq!(get(day, Some(ResultType::StarttlsNotSupported)), Some(1));
        for (k, _) in &counts {
            let back = CounterKey::from_stored(
                k.day,
                k.policy_domain.clone(),
                &k.policy_json(),
                &k.failure_json(),
            );
            assert_eq!(back.as_ref(), Some(k));
        }
        let f = counts
            .iter()
            .find_map(|(k, _)| {
                k.failure
                    .clone()
                    .filter(|f| f.result_type == ResultType::StarttlsNotSupported)
            })
            .unwrap();
        assert_eq!(
            f.failure_reason_code, None,
            "an empty reason code is left out"
        );
    }
}
