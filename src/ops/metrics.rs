//! The relay's metrics, recorded through the [`metrics`] facade.
//!
//! The library only calls `metrics::counter!` / `gauge!` through the helpers below;
//! nothing is recorded until a recorder is installed. The `stsrelay` binary installs
//! the Prometheus exporter and serves it on `/metrics`; a program that embeds the
//! library can install any other recorder (or none).
//!
//! Every metric name is a constant in [`names`], and each event has one helper, so a
//! new metric is one constant, one `describe_*` line in [`describe`] and one helper.
//!
//! ```
//! use stsrelay::ops::metrics;
//! // Without a recorder these are no-ops; with one they count.
//! metrics::message_received();
//! metrics::smtp_reply(250);
//! assert_eq!(metrics::reply_class(451), "4xx");
//! assert_eq!(metrics::names::MESSAGES_RECEIVED, "stsrelay_messages_received_total");
//! ```

use crate::queue::spool::QueueCounts;
use crate::sts::Mode;
use crate::tlsrpt::ResultType;

/// Metric names (Prometheus style: `snake_case`, counters end in `_total`).
pub mod names {
    /// Counter: messages accepted from clients (acknowledged with 250, durable).
    pub const MESSAGES_RECEIVED: &str = "stsrelay_messages_received_total";
    /// Counter: recipient outcomes, labels `outcome` (`delivered`, `deferred`,
    /// `bounced`) and `mode` (`enforce`, `testing`, `none`).
    pub const DELIVERIES: &str = "stsrelay_deliveries_total";
    /// Counter: TLS sessions with MX hosts (and MX hosts skipped by policy), labels
    /// `mode` and `result` (`success` or the RFC 8460 result type).
    pub const TLS_SESSIONS: &str = "stsrelay_tls_sessions_total";
    /// Counter: MTA-STS policy fetches, label `outcome` (`ok` or the RFC 8460 result
    /// type of the failure: `sts-policy-fetch-error`, `sts-policy-invalid`,
    /// `sts-webpki-invalid`).
    pub const POLICY_FETCHES: &str = "stsrelay_policy_fetches_total";
    /// Counter: policy lookups, label `result` (`hit`: answered from memory or the
    /// store; `miss`: needed DNS and possibly a fetch).
    pub const POLICY_CACHE: &str = "stsrelay_policy_cache_lookups_total";
    /// Counter: inbound SMTP connections accepted.
    pub const INBOUND_SESSIONS: &str = "stsrelay_inbound_sessions_total";
    /// Gauge: inbound SMTP sessions open now.
    pub const INBOUND_ACTIVE: &str = "stsrelay_inbound_sessions_active";
    /// Counter: replies of MX hosts to MAIL, RCPT, DATA and the end of data, label
    /// `class` (`2xx`, `3xx`, `4xx`, `5xx`).
    pub const SMTP_REPLIES: &str = "stsrelay_smtp_replies_total";
    /// Gauge: messages in the spool.
    pub const QUEUE_MESSAGES: &str = "stsrelay_queue_messages";
    /// Gauge: pending recipients in the spool, label `state` (`queued`, `deferred`).
    pub const QUEUE_RECIPIENTS: &str = "stsrelay_queue_recipients";
    /// Gauge: age of the oldest message with a pending recipient, seconds (0: none).
    pub const QUEUE_OLDEST_AGE: &str = "stsrelay_queue_oldest_age_seconds";
    /// Gauge: corrupt messages kept aside in the spool.
    pub const QUEUE_CORRUPT: &str = "stsrelay_queue_corrupt_messages";
    /// Counter: SIGHUP reloads, label `outcome` (`ok`, `failed`).
    pub const CONFIG_RELOADS: &str = "stsrelay_config_reloads_total";
    /// TLS-RPT report deliveries, by `transport` (`mailto`, `https`) and `outcome`
    /// (`sent`, `retry`, `dropped`).
    pub const TLSRPT_REPORTS: &str = "stsrelay_tlsrpt_reports_total";
    /// Gauge: with `storage.backend = "redis"`, 1 while Redis answers, 0 while the
    /// node works from its local fallback.
    pub const STORE_REDIS_UP: &str = "stsrelay_store_redis_up";
    /// Counter: store operations answered by the local fallback because Redis did not
    /// answer, label `op`.
    pub const STORE_FALLBACKS: &str = "stsrelay_store_fallbacks_total";
    /// Gauge: batches of TLS-RPT counters kept locally until Redis takes them.
    pub const STORE_SPILLED: &str = "stsrelay_store_spilled_batches";
    /// Histogram: seconds from receipt to delivery, per delivered recipient, label
    /// `mode` (buckets: [`DELAY_BUCKETS`](super::DELAY_BUCKETS)).
    pub const DELIVERY_DELAY: &str = "stsrelay_delivery_delay_seconds";
    /// Gauge: always 1, label `version`.
    pub const BUILD_INFO: &str = "stsrelay_build_info";
}

/// Histogram buckets for [`names::DELIVERY_DELAY`], seconds: from "at once" to the
/// default queue lifetime (the spool keeps whole seconds).
pub const DELAY_BUCKETS: &[f64] = &[
    1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0, 432_000.0,
];

/// The label value of a policy mode; no policy and `mode: none` are both `none`.
pub fn mode_label(mode: Option<Mode>) -> &'static str {
    match mode {
        Some(Mode::Enforce) => "enforce",
        Some(Mode::Testing) => "testing",
        Some(Mode::None) | None => "none",
    }
}

/// The `result` label of a TLS session: `success` or the RFC 8460 result type.
pub fn result_label(failure: Option<ResultType>) -> &'static str {
    failure.map(ResultType::as_str).unwrap_or("success")
}

/// `2xx` … `5xx` for an SMTP reply code (`other` outside 200..=599).
pub fn reply_class(code: u16) -> &'static str {
    match code / 100 {
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

/// Register help texts with the installed recorder and set [`names::BUILD_INFO`]
/// (call once after installing it).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        names::MESSAGES_RECEIVED,
        "Messages accepted from clients and spooled"
    );
    describe_counter!(
        names::DELIVERIES,
        "Recipient delivery outcomes by outcome and MTA-STS mode"
    );
    describe_counter!(
        names::TLS_SESSIONS,
        "MX sessions by MTA-STS mode and TLS result (success or RFC 8460 result type)"
    );
    describe_counter!(names::POLICY_FETCHES, "MTA-STS policy fetches by outcome");
    describe_counter!(
        names::POLICY_CACHE,
        "MTA-STS policy lookups: cache hit or miss"
    );
    describe_counter!(names::INBOUND_SESSIONS, "Inbound SMTP connections accepted");
    describe_gauge!(names::INBOUND_ACTIVE, "Inbound SMTP sessions open");
    describe_counter!(
        names::SMTP_REPLIES,
        "MX replies to MAIL, RCPT, DATA and end of data, by class"
    );
    describe_gauge!(names::QUEUE_MESSAGES, "Messages in the spool");
    describe_gauge!(
        names::QUEUE_RECIPIENTS,
        "Pending recipients in the spool by state"
    );
    describe_gauge!(
        names::QUEUE_OLDEST_AGE,
        "Age of the oldest message with a pending recipient, seconds"
    );
    describe_gauge!(
        names::QUEUE_CORRUPT,
        "Corrupt messages set aside in the spool"
    );
    describe_counter!(names::CONFIG_RELOADS, "Configuration reloads (SIGHUP)");
    describe_counter!(
        names::TLSRPT_REPORTS,
        "TLS-RPT report delivery attempts by transport and outcome"
    );
    describe_gauge!(
        names::STORE_REDIS_UP,
        "1 while Redis (storage.backend = redis) answers, 0 while the local fallback is used"
    );
    describe_counter!(
        names::STORE_FALLBACKS,
        "Store operations answered by the local fallback because Redis did not answer"
    );
    describe_gauge!(
        names::STORE_SPILLED,
        "Batches of TLS-RPT counters kept locally until Redis takes them"
    );
    describe_histogram!(
        names::DELIVERY_DELAY,
        metrics::Unit::Seconds,
        "Time from receipt to delivery per delivered recipient"
    );
    describe_gauge!(names::BUILD_INFO, "Always 1; the version in a label");
    metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    zero_counters();
}

/// Show the counters' usual series from the start (at 0), so `rate()` and alerts see
/// the first event.
fn zero_counters() {
    use metrics::counter;
    let modes = [Some(Mode::Enforce), Some(Mode::Testing), None];
    counter!(names::MESSAGES_RECEIVED).increment(0);
    counter!(names::INBOUND_SESSIONS).increment(0);
    for mode in modes {
        for outcome in ["delivered", "deferred", "bounced"] {
            counter!(names::DELIVERIES, "outcome" => outcome, "mode" => mode_label(mode))
                .increment(0);
        }
        for failure in [
            None,
            Some(ResultType::StarttlsNotSupported),
            Some(ResultType::CertificateHostMismatch),
            Some(ResultType::CertificateExpired),
            Some(ResultType::CertificateNotTrusted),
            Some(ResultType::ValidationFailure),
        ] {
            counter!(names::TLS_SESSIONS, "mode" => mode_label(mode), "result" => result_label(failure))
                .increment(0);
        }
    }
    for outcome in [
        "ok",
        ResultType::StsPolicyFetchError.as_str(),
        ResultType::StsPolicyInvalid.as_str(),
        ResultType::StsWebpkiInvalid.as_str(),
    ] {
        counter!(names::POLICY_FETCHES, "outcome" => outcome).increment(0);
    }
    for result in ["hit", "miss"] {
        counter!(names::POLICY_CACHE, "result" => result).increment(0);
    }
    for class in ["2xx", "3xx", "4xx", "5xx"] {
        counter!(names::SMTP_REPLIES, "class" => class).increment(0);
    }
    for outcome in ["ok", "failed"] {
        counter!(names::CONFIG_RELOADS, "outcome" => outcome).increment(0);
    }
    metrics::gauge!(names::INBOUND_ACTIVE).increment(0.0);
}

/// A message was accepted and spooled.
pub fn message_received() {
    metrics::counter!(names::MESSAGES_RECEIVED).increment(1);
}

/// The outcome of one recipient's delivery attempt: `delivered`, `deferred` or `bounced`.
pub fn delivery(outcome: &'static str, mode: Option<Mode>) {
    metrics::counter!(names::DELIVERIES, "outcome" => outcome, "mode" => mode_label(mode))
        .increment(1);
}

/// A recipient was delivered `secs` seconds after the message was received.
pub fn delivery_delay(mode: Option<Mode>, secs: i64) {
    metrics::histogram!(names::DELIVERY_DELAY, "mode" => mode_label(mode))
        .record(secs.max(0) as f64);
}

/// One session with an MX (or an MX skipped under policy), with its TLS result.
pub fn tls_session(mode: Option<Mode>, failure: Option<ResultType>) {
    metrics::counter!(names::TLS_SESSIONS, "mode" => mode_label(mode), "result" => result_label(failure))
        .increment(1);
}

/// A policy fetch ended: `Ok` or the failure's result type.
pub fn policy_fetch(outcome: Result<(), ResultType>) {
    let label = match outcome {
        Ok(()) => "ok",
        Err(rt) => rt.as_str(),
    };
    metrics::counter!(names::POLICY_FETCHES, "outcome" => label).increment(1);
}

/// A policy lookup was answered from the cache (`true`) or needed discovery.
pub fn policy_cache(hit: bool) {
    metrics::counter!(names::POLICY_CACHE, "result" => if hit { "hit" } else { "miss" })
        .increment(1);
}

/// A reply from an MX to MAIL, RCPT, DATA or the end of data.
pub fn smtp_reply(code: u16) {
    metrics::counter!(names::SMTP_REPLIES, "class" => reply_class(code)).increment(1);
}

/// A TLS-RPT report delivery attempt ended: `https` or `mailto` (handed to the spool),
/// `sent`, `retry` or `dropped`.
pub fn tlsrpt_report(transport: &'static str, outcome: &'static str) {
    metrics::counter!(names::TLSRPT_REPORTS, "transport" => transport, "outcome" => outcome)
        .increment(1);
}

/// Redis answered (`true`) or failed (`false`).
pub fn store_redis_up(up: bool) {
    metrics::gauge!(names::STORE_REDIS_UP).set(if up { 1.0 } else { 0.0 });
}

/// A store operation `op` was answered by the local fallback.
pub fn store_fallback(op: &'static str) {
    metrics::counter!(names::STORE_FALLBACKS, "op" => op).increment(1);
}

/// `n` batches of TLS-RPT counters wait locally for Redis.
pub fn store_spilled(n: u64) {
    metrics::gauge!(names::STORE_SPILLED).set(n as f64);
}

/// A configuration reload finished.
pub fn config_reload(ok: bool) {
    metrics::counter!(names::CONFIG_RELOADS, "outcome" => if ok { "ok" } else { "failed" })
        .increment(1);
}

/// An inbound connection was accepted; the session counts as active until the guard
/// is dropped.
pub fn inbound_session() -> InboundSession {
    metrics::counter!(names::INBOUND_SESSIONS).increment(1);
    metrics::gauge!(names::INBOUND_ACTIVE).increment(1.0);
    InboundSession(())
}

/// Keeps an inbound session counted in [`names::INBOUND_ACTIVE`].
#[derive(Debug)]
pub struct InboundSession(());

impl Drop for InboundSession {
    fn drop(&mut self) {
        metrics::gauge!(names::INBOUND_ACTIVE).decrement(1.0);
    }
}

/// Set the queue gauges from the spool's totals at `now` (Unix seconds).
pub fn queue(counts: &QueueCounts, now: i64) {
    metrics::gauge!(names::QUEUE_MESSAGES).set(counts.messages as f64);
    metrics::gauge!(names::QUEUE_RECIPIENTS, "state" => "queued").set(counts.queued as f64);
    metrics::gauge!(names::QUEUE_RECIPIENTS, "state" => "deferred").set(counts.deferred as f64);
    metrics::gauge!(names::QUEUE_CORRUPT).set(counts.corrupt as f64);
    let age = counts
        .oldest_received_at
        .map(|t| (now - t).max(0))
        .unwrap_or(0);
    metrics::gauge!(names::QUEUE_OLDEST_AGE).set(age as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(mode_label(Some(Mode::Enforce)), "enforce");
        assert_eq!(mode_label(Some(Mode::None)), "none");
        assert_eq!(mode_label(None), "none");
        assert_eq!(result_label(None), "success");
        assert_eq!(
            result_label(Some(ResultType::CertificateExpired)),
            "certificate-expired"
        );
        assert_eq!(reply_class(250), "2xx");
        assert_eq!(reply_class(354), "3xx");
        assert_eq!(reply_class(550), "5xx");
        assert_eq!(reply_class(99), "other");
    }
}
