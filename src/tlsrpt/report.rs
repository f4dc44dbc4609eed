//! The RFC 8460 §4.4 JSON report, built from a day's counters: our own serde structs, so
//! every member name, array and number is exactly as the RFC says (R70–R77), optional
//! members are left out rather than written as `null`.

use super::PolicyType;
use super::counter::{CounterKey, FailureDetail};
use super::day::{Day, rfc3339};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;

/// An aggregate report (RFC 8460 §4.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Report {
    /// `organization-name`.
    pub organization_name: String,
    /// `date-range`.
    pub date_range: DateRange,
    /// `contact-info`.
    pub contact_info: String,
    /// `report-id`.
    pub report_id: String,
    /// `policies`: one element per distinct applied policy.
    pub policies: Vec<PolicyResult>,
}

/// `date-range`: RFC 3339 date-times in UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DateRange {
    /// `start-datetime`.
    pub start_datetime: String,
    /// `end-datetime`.
    pub end_datetime: String,
}

/// One `policies[]` element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PolicyResult {
    /// `policy`.
    pub policy: PolicyDescription,
    /// `summary`.
    pub summary: Summary,
    /// `failure-details` (left out when there were no failures).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failure_details: Vec<FailureDetails>,
}

/// The applied policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PolicyDescription {
    /// `policy-type`: `sts`, `tlsa` or `no-policy-found`.
    pub policy_type: PolicyType,
    /// `policy-string`: the policy's lines (left out when none was fetched).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_string: Vec<String>,
    /// `policy-domain`.
    pub policy_domain: String,
    /// `mx-host`: the policy's MX patterns, an array (left out when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mx_host: Vec<String>,
}

/// `summary`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Summary {
    /// `total-successful-session-count`.
    pub total_successful_session_count: u64,
    /// `total-failure-session-count`.
    pub total_failure_session_count: u64,
}

/// One `failure-details[]` element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FailureDetails {
    /// `result-type`.
    pub result_type: super::ResultType,
    /// `sending-mta-ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sending_mta_ip: Option<String>,
    /// `receiving-mx-hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving_mx_hostname: Option<String>,
    /// `receiving-mx-helo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving_mx_helo: Option<String>,
    /// `receiving-ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving_ip: Option<String>,
    /// `failed-session-count`.
    pub failed_session_count: u64,
    /// `additional-information`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_information: Option<String>,
    /// `failure-reason-code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason_code: Option<String>,
}

/// Who reports: from `[tlsrpt]`.
#[derive(Debug, Clone)]
pub struct Reporter {
    /// `organization-name`.
    pub organization_name: String,
    /// `contact-info`.
    pub contact_info: String,
    /// The submitter domain.
    pub submitter: String,
}

/// A report ready to send: its JSON, gzipped, and the names that go with it.
#[derive(Debug, Clone)]
pub struct BuiltReport {
    /// The report.
    pub report: Report,
    /// `submitter!policy-domain!begin!end!unique.json.gz` (R79).
    pub file_name: String,
    /// The gzipped JSON (R80).
    pub gzip: Vec<u8>,
}

/// Build the report of `domain` for `day` from that day's counters (others are
/// ignored). `end` is the last second covered: `day.end() - 1` for a whole day, or the
/// time of sending for the current day. `unique` (letters and digits) makes the id and
/// file name unique. `None` when there were no sessions.
///
/// ```
/// use stsrelay::tlsrpt::{build_report, count, Day, PolicyType, Reporter, SessionResult};
/// let day: Day = "2026-11-27".parse().unwrap();
/// let s = SessionResult {
///     at: day.start() + 10, policy_domain: "example.test".into(),
///     policy_type: PolicyType::NoPolicyFound, policy_strings: vec![], mx_host_patterns: vec![],
///     receiving_mx_hostname: "mx.example.test".into(), receiving_ip: None,
///     receiving_mx_helo: None, sending_ip: None, failure: None,
/// };
/// let who = Reporter { organization_name: "Example Org".into(),
///     contact_info: "tlsrpt@sender.test".into(), submitter: "sender.test".into() };
/// let built = build_report(&who, "example.test", day, day.end() - 1, &count(&[s]), "a1").unwrap();
/// assert_eq!(built.file_name, "sender.test!example.test!1795737600!1795823999!a1.json.gz");
/// assert_eq!(built.report.policies[0].summary.total_successful_session_count, 1);
/// assert_eq!(&built.gzip[..2], &[0x1f, 0x8b]);
/// ```
pub fn build_report(
    who: &Reporter,
    domain: &str,
    day: Day,
    end: i64,
    counts: &[(CounterKey, u64)],
    unique: &str,
) -> Option<BuiltReport> {
    let mut by_policy: BTreeMap<_, (u64, BTreeMap<FailureDetail, u64>)> = BTreeMap::new();
    for (k, n) in counts {
        if k.day != day || k.policy_domain != domain {
            continue;
        }
        let e = by_policy.entry(k.policy.clone()).or_default();
        match &k.failure {
            None => e.0 += n,
            Some(f) => *e.1.entry(f.clone()).or_default() += n,
        }
    }
    if by_policy.is_empty() {
        return None;
    }
    let policies = by_policy
        .into_iter()
        .map(|(p, (ok, failures))| PolicyResult {
            policy: PolicyDescription {
                policy_type: p.policy_type,
                policy_string: p.policy_strings,
                policy_domain: domain.to_string(),
                mx_host: p.mx_host,
            },
            summary: Summary {
                total_successful_session_count: ok,
                total_failure_session_count: failures.values().sum(),
            },
            failure_details: failures
                .into_iter()
                .map(|(f, n)| FailureDetails {
                    result_type: f.result_type,
                    sending_mta_ip: f.sending_mta_ip.map(|ip| ip.to_string()),
                    receiving_mx_hostname: f.receiving_mx_hostname,
                    receiving_mx_helo: f.receiving_mx_helo,
                    receiving_ip: f.receiving_ip.map(|ip| ip.to_string()),
                    failed_session_count: n,
                    additional_information: None,
                    failure_reason_code: f.failure_reason_code,
                })
                .collect(),
        })
        .collect();
    let report = Report {
        organization_name: who.organization_name.clone(),
        date_range: DateRange {
            start_datetime: rfc3339(day.start()),
            end_datetime: rfc3339(end),
        },
        contact_info: who.contact_info.clone(),
        report_id: format!("{day}_{domain}_{unique}"),
        policies,
    };
    let file_name = format!(
        "{}!{domain}!{}!{end}!{unique}.json.gz",
        who.submitter,
        day.start()
    );
    let gzip = gzip(&serde_json::to_vec(&report).ok()?);
    Some(BuiltReport {
        report,
        file_name,
        gzip,
    })
}

/// gzip (RFC 1952) of `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// A fresh unique id part: 16 lowercase hex digits.
pub fn unique_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlsrpt::{ResultType, SessionFailure, SessionResult, count};
    use std::io::Read;

    fn who() -> Reporter {
        Reporter {
            organization_name: "Sender Org".into(),
            contact_info: "tlsrpt@sender.test".into(),
            submitter: "sender.test".into(),
        }
    }

    fn s(at: i64, policy: &[&str], failure: Option<(ResultType, &str)>) -> SessionResult {
        SessionResult {
            at,
            policy_domain: "example.test".into(),
            policy_type: if policy.is_empty() {
                PolicyType::NoPolicyFound
            } else {
                PolicyType::Sts
            },
            policy_strings: policy.iter().map(|l| l.to_string()).collect(),
            mx_host_patterns: if policy.is_empty() {
                vec![]
            } else {
                vec!["*.example.test".into()]
            },
            receiving_mx_hostname: "mx1.example.test".into(),
            receiving_ip: Some("2001:db8:abcd:0012::1".parse().unwrap()),
            receiving_mx_helo: Some("mx1.example.test".into()),
            sending_ip: Some("192.0.2.9".parse().unwrap()),
            failure: failure.map(|(t, c)| SessionFailure {
                result_type: t,
                reason_code: c.into(),
            }),
        }
    }

    const TESTING: &[&str] = &[
        "version: STSv1",
        "mode: testing",
        "mx: *.example.test",
        "max_age: 86400",
    ];
    const ENFORCE: &[&str] = &[
        "version: STSv1",
        "mode: enforce",
        "mx: *.example.test",
        "max_age: 86400",
    ];

    #[test]
    fn two_days_policies_and_failure_kinds() {
        let day: Day = "2026-11-27".parse().unwrap();
        let t = day.start();
        let sessions = vec![
            s(t - 30, TESTING, None), // 23:59:30 the day before: not in this report
            s(t + 30, TESTING, None),
            s(t + 40, TESTING, None),
            // testing-mode deliveries over failed checks count as failures
            s(
                t + 50,
                TESTING,
                Some((ResultType::CertificateExpired, "certificate-expired")),
            ),
            s(
                t + 60,
                TESTING,
                Some((ResultType::CertificateExpired, "certificate-expired")),
            ),
            s(
                t + 70,
                TESTING,
                Some((
                    ResultType::CertificateHostMismatch,
                    "certificate-host-mismatch",
                )),
            ),
            s(
                t + 80,
                TESTING,
                Some((ResultType::StarttlsNotSupported, "")),
            ),
            // the policy changed at noon: a second policies[] element (R68)
            s(t + 43_200, ENFORCE, None),
            s(
                t + 43_300,
                ENFORCE,
                Some((ResultType::ValidationFailure, "mx-not-in-policy")),
            ),
            s(t + 50_000, &[], None),
            s(day.end(), ENFORCE, None), // 00:00:00 next day: not in this report
        ];
        let counts = count(&sessions);
        let r = build_report(&who(), "example.test", day, day.end() - 1, &counts, "x1")
            .unwrap()
            .report;
        assert_eq!(r.policies.len(), 3);
        let find = |mode: Option<&str>| {
            r.policies
                .iter()
                .find(|p| match mode {
                    Some(m) => p.policy.policy_string.iter().any(|l| l == m),
                    None => p.policy.policy_type == PolicyType::NoPolicyFound,
                })
                .unwrap()
        };
        let testing = find(Some("mode: testing"));
        assert_eq!(testing.summary.total_successful_session_count, 2);
        assert_eq!(testing.summary.total_failure_session_count, 4);
        let expired = testing
            .failure_details
            .iter()
            .find(|f| f.result_type == ResultType::CertificateExpired)
            .unwrap();
        assert_eq!(expired.failed_session_count, 2);
        assert_eq!(
            expired.receiving_ip.as_deref(),
            Some("2001:db8:abcd:12::1"),
            "RFC 5952 form"
        );
        assert_eq!(expired.sending_mta_ip.as_deref(), Some("192.0.2.9"));
        assert_eq!(testing.failure_details.len(), 3);
        let enforce = find(Some("mode: enforce"));
        assert_eq!(enforce.summary.total_successful_session_count, 1);
        assert_eq!(enforce.summary.total_failure_session_count, 1);
        let none = find(None);
        assert_eq!(none.summary.total_successful_session_count, 1);
        assert!(none.failure_details.is_empty());
        assert!(none.policy.policy_string.is_empty() && none.policy.mx_host.is_empty());
        assert_eq!(r.date_range.start_datetime, "2026-11-27T00:00:00Z");
        assert_eq!(r.date_range.end_datetime, "2026-11-27T23:59:59Z");

        let prev = build_report(
            &who(),
            "example.test",
            day.prev(),
            day.start() - 1,
            &counts,
            "x2",
        )
        .unwrap()
        .report;
        assert_eq!(prev.policies.len(), 1);
        assert_eq!(prev.policies[0].summary.total_successful_session_count, 1);
        assert_ne!(prev.report_id, r.report_id);
        assert!(build_report(&who(), "other.test", day, day.end() - 1, &counts, "x3").is_none());
    }

    #[test]
    fn json_has_exactly_the_rfc_members_and_types() {
        let day: Day = "2026-11-27".parse().unwrap();
        let counts = count(&[
            s(day.start() + 1, ENFORCE, None),
            s(
                day.start() + 2,
                ENFORCE,
                Some((ResultType::CertificateNotTrusted, "self-signed")),
            ),
        ]);
        let built = build_report(
            &who(),
            "example.test",
            day,
            day.end() - 1,
            &counts,
            "abc123",
        )
        .unwrap();
        let mut json = String::new();
        flate2::read::GzDecoder::new(&built.gzip[..])
            .read_to_string(&mut json)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&v),
            [
                "contact-info",
                "date-range",
                "organization-name",
                "policies",
                "report-id"
            ]
        );
        assert_eq!(keys(&v["date-range"]), ["end-datetime", "start-datetime"]);
        let p = &v["policies"][0];
        assert_eq!(keys(p), ["failure-details", "policy", "summary"]);
        assert_eq!(
            keys(&p["policy"]),
            ["mx-host", "policy-domain", "policy-string", "policy-type"]
        );
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert!(p["policy"]["policy-string"].is_array());
        assert!(
            p["policy"]["mx-host"].is_array(),
            "mx-host is an array (R73)"
        );
        assert!(p["summary"]["total-successful-session-count"].is_u64());
        assert!(p["summary"]["total-failure-session-count"].is_u64());
        let f = &p["failure-details"][0];
        assert_eq!(
            keys(f),
            [
                "failed-session-count",
                "failure-reason-code",
                "receiving-ip",
                "receiving-mx-helo",
                "receiving-mx-hostname",
                "result-type",
                "sending-mta-ip"
            ]
        );
        assert_eq!(f["result-type"], "certificate-not-trusted");
        assert!(f["failed-session-count"].is_u64());
        assert!(!json.contains("null"));
        // The id is usable as a Message-ID left part (atext and dots only).
        let id = v["report-id"].as_str().unwrap();
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "{id}"
        );
        // File name: R79's pattern, timestamps matching the date-range.
        assert_eq!(
            built.file_name,
            format!(
                "sender.test!example.test!{}!{}!abc123.json.gz",
                day.start(),
                day.end() - 1
            )
        );
        // Our structs read back what they wrote.
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), built.report);
    }
}
