//! One SMTP session's TLS outcome, as TLS-RPT (RFC 8460 §4) counts it, and the recorder
//! interface delivery hands it to.

use super::ResultType;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// The policy a session was judged under (RFC 8460 §4.4 `policy-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyType {
    /// An MTA-STS policy (testing or enforce).
    Sts,
    /// DANE TLSA records (RFC 7672); the policy strings are the records.
    Tlsa,
    /// No policy applied.
    NoPolicyFound,
}

/// A failed session: the result type and a short reason code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFailure {
    /// RFC 8460 result type.
    pub result_type: ResultType,
    /// `failure-reason-code`.
    pub reason_code: String,
}

/// One session to one MX of a policy domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionResult {
    /// Unix seconds.
    pub at: i64,
    /// The recipient (policy) domain.
    pub policy_domain: String,
    /// `sts`, `tlsa` or `no-policy-found`.
    pub policy_type: PolicyType,
    /// The policy lines as served (empty without a policy).
    pub policy_strings: Vec<String>,
    /// The policy's `mx` patterns.
    pub mx_host_patterns: Vec<String>,
    /// The MX host name.
    pub receiving_mx_hostname: String,
    /// The MX address, when a connection was made.
    pub receiving_ip: Option<IpAddr>,
    /// The MX's EHLO/greeting name, when seen.
    pub receiving_mx_helo: Option<String>,
    /// Our address on the connection.
    pub sending_ip: Option<IpAddr>,
    /// `None` for a successful session.
    pub failure: Option<SessionFailure>,
}

/// Receives every session result. Implementations must return quickly (queue the
/// result); delivery calls it on its hot path.
pub trait SessionRecorder: Send + Sync {
    /// Record one session.
    fn record(&self, result: SessionResult);
}

/// A recorder that only logs (for tools and library users who do not report).
#[derive(Debug, Default, Clone, Copy)]
pub struct LogRecorder;

impl SessionRecorder for LogRecorder {
    fn record(&self, r: SessionResult) {
        match &r.failure {
            None => {
                tracing::debug!(domain = %r.policy_domain, mx = %r.receiving_mx_hostname, "TLS session ok")
            }
            Some(f) => tracing::info!(domain = %r.policy_domain, mx = %r.receiving_mx_hostname,
                result_type = %f.result_type, reason = %f.reason_code, "TLS session failure"),
        }
    }
}
