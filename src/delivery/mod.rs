//! One delivery attempt: the recipients of one message at one domain. Resolve the MX
//! hosts, decide each under the domain's MTA-STS policy, connect, secure, transmit,
//! record the session's TLS outcome (RFC 8461 §5, RFC 5321 §5.1).

mod dane;
mod pool;

use crate::dns::{MxAnswer, Resolver, Security};
use crate::smtp::outbound::{Client, Reply, SmtpError, Stream};
use crate::sts::{Engine, Lookup, Mode, MxDecision};
use crate::tls::{TlsFailure, TrustStore};
use crate::tlsrpt::{PolicyType, ResultType, SessionFailure, SessionRecorder, SessionResult};
use dane::{DaneHop, Plan};
use pool::{Idle, Key, Pool};
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// One recipient of a transaction.
#[derive(Debug, Clone)]
pub struct Rcpt {
    /// The address.
    pub address: String,
    /// `NOTIFY=` value to pass on (only when the client gave one).
    pub notify: Option<String>,
    /// `ORCPT=` value to pass on, already xtext-encoded (`rfc822;…`).
    pub orcpt: Option<String>,
}

/// What to send in one SMTP transaction.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// The spool's queue id, for logs (empty when there is none).
    pub queue_id: String,
    /// Reverse-path ("" for the null sender).
    pub mail_from: String,
    /// Recipients, all at one domain.
    pub recipients: Vec<Rcpt>,
    /// The message, CRLF line ends, not dot-stuffed.
    pub body: Arc<Vec<u8>>,
    /// The body has 8-bit content (`BODY=8BITMIME`).
    pub eight_bit: bool,
    /// Needs `SMTPUTF8`.
    pub smtputf8: bool,
    /// `RET=` to pass on.
    pub ret: Option<String>,
    /// `ENVID=` to pass on (xtext-encoded).
    pub envid: Option<String>,
    /// The message says `TLS-Required: No` (RFC 8689): deliver it whatever the recipient
    /// domain's MTA-STS policy says, with opportunistic STARTTLS (R85, R115).
    pub tls_optional: bool,
    /// The message is a TLS-RPT report: its sessions are not counted (R67).
    pub tlsrpt_exempt: bool,
}

impl Transaction {
    /// Are this transaction's sessions counted for TLS-RPT? Not for reports (R67), and
    /// not when the message set the domain's policy aside (`TLS-Required: No`): such a
    /// session says nothing about the policy.
    pub fn counts_for_tlsrpt(&self) -> bool {
        !self.tlsrpt_exempt && !self.tls_optional
    }
}

/// The result for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// Accepted by an MX.
    Delivered {
        /// MX host and reply.
        reply: String,
    },
    /// Try again later.
    Deferred {
        /// Why (with enhanced status code).
        reason: String,
    },
    /// Permanent failure.
    Bounced {
        /// Why.
        reason: String,
    },
}

/// The outcome of one attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// One result per recipient, in order.
    pub results: Vec<RcptResult>,
    /// Delivery was held back by the MTA-STS policy (every candidate failed its checks).
    pub policy_blocked: bool,
    /// The policy mode that applied, for logs.
    pub mode: Option<Mode>,
}

/// Delivers transactions. Cheap to share behind an `Arc`.
pub struct Deliverer {
    engine: Engine,
    dns: Resolver,
    trust: TrustStore,
    recorder: Arc<dyn SessionRecorder>,
    port: u16,
    helo: String,
    connect_timeout: Duration,
    timeout: Duration,
    pool: Arc<Pool>,
    activity: Arc<crate::ops::activity::Activity>,
    /// rustls configs for DANE hosts.
    dane_configs: dane::ConfigCache,
}

/// The MX a transaction runs on: for logs and for putting the connection back.
struct Hop<'a> {
    domain: &'a str,
    host: &'a str,
    ip: IpAddr,
    mode: Option<Mode>,
    /// `none`, `TLSv1.3 verified`, `TLSv1.3 unverified (certificate-not-trusted)`…
    tls: String,
    key: Key,
    /// Transactions this connection has carried before this one.
    uses: u32,
}

/// The pool key of `domain` under `lookup`'s policy, for `tx`: connections made for
/// `TLS-Required: No` messages (no MTA-STS, no DANE) are never reused for others.
fn pool_key(domain: &str, lookup: &Lookup, tx: &Transaction) -> Key {
    Key {
        domain: domain.to_string(),
        policy: lookup.policy.as_ref().map(|p| (p.id.clone(), p.fetched_at)),
        relaxed: tx.tls_optional,
    }
}

/// One MX address to try, and how.
struct Mx<'a> {
    host: &'a str,
    ip: IpAddr,
    /// The MTA-STS verdict for the host.
    decision: MxDecision,
    /// STARTTLS is mandatory (DANE, or a secure TLSA RRset without usable records).
    require_starttls: bool,
    /// DANE authenticates the host.
    dane: Option<&'a DaneHop>,
}

/// The TLS-RPT policy of a session under DANE (or with a DNSSEC failure on the way).
#[derive(Clone, Copy)]
struct DaneRecord<'a> {
    /// The TLSA base domain.
    base: &'a str,
    /// The TLSA records in presentation form.
    policy_strings: &'a [String],
}

/// How a session with one MX address ended.
enum SessionEnd {
    /// The transaction ran: per-recipient results.
    Done(Vec<RcptResult>),
    /// Try the next address or MX; `policy` when the policy's checks failed; `tls`
    /// (the TLS state reached) when the failure came before the transaction, whose own
    /// log line is then still to be written.
    Next {
        reason: String,
        policy: bool,
        tls: Option<String>,
    },
}

impl Deliverer {
    /// From the config's `[delivery]` section, with the relay's engine, resolver,
    /// trust store and session recorder.
    pub fn new(
        cfg: &crate::Config,
        engine: Engine,
        dns: Resolver,
        trust: TrustStore,
        recorder: Arc<dyn SessionRecorder>,
    ) -> Deliverer {
        Deliverer {
            engine,
            dns,
            trust,
            recorder,
            port: cfg.delivery.port,
            helo: cfg.helo_name(),
            connect_timeout: Duration::from_secs(cfg.delivery.connect_timeout_secs),
            timeout: Duration::from_secs(cfg.delivery.command_timeout_secs),
            pool: Arc::new(Pool::default()),
            dane_configs: dane::ConfigCache::default(),
            activity: Arc::new(crate::ops::activity::Activity::new(
                crate::clock::Clock::now(&crate::clock::SystemClock),
            )),
        }
    }

    /// Recent outcomes and TLS results (last 24 h), for the status page.
    pub fn activity(&self) -> &crate::ops::activity::Activity {
        &self.activity
    }

    /// Count one MX session (or one MX skipped by policy) with its TLS result.
    fn note_session(&self, mode: Option<Mode>, failure: Option<ResultType>) {
        crate::ops::metrics::tls_session(mode, failure);
        self.activity.session(
            crate::clock::Clock::now(&crate::clock::SystemClock),
            crate::ops::metrics::mode_label(mode),
            crate::ops::metrics::result_label(failure),
        );
    }

    /// The policy engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Idle MX connections kept for reuse.
    pub fn idle_connections(&self) -> usize {
        self.pool.len()
    }

    /// Run `tx` on an idle connection to `domain` established under the same policy,
    /// after an `RSET` shows it is still alive. `None`: no usable connection.
    async fn try_reuse(&self, domain: &str, lookup: &Lookup, tx: &Transaction) -> Option<Attempt> {
        let key = pool_key(domain, lookup, tx);
        // Bounded: a few stale connections are discarded, then a fresh one is made.
        for _ in 0..4 {
            let Idle {
                mut client,
                ehlo,
                host,
                ip,
                tls,
                uses,
                ..
            } = self.pool.take(&key)?;
            if !client.command("RSET").await.is_ok_and(|r| r.is_positive()) {
                continue;
            }
            let hop = Hop {
                domain,
                host: &host,
                ip,
                mode: lookup.mode(),
                tls,
                key: key.clone(),
                uses,
            };
            if let SessionEnd::Done(results) = self.transact(client, &ehlo, &hop, tx).await {
                return Some(Attempt {
                    results,
                    policy_blocked: false,
                    mode: lookup.mode(),
                });
            }
        }
        None
    }

    /// Deliver `tx` to `domain`: MX hosts in preference order (equal preferences in
    /// random order), each address in turn, until one takes the transaction.
    pub async fn attempt(&self, domain: &str, tx: &Transaction) -> Attempt {
        let all = |r: RcptResult| vec![r; tx.recipients.len()];
        // DANE (RFC 7672) unless the message says TLS is optional (RFC 8689).
        let dnssec = self.dns.dnssec_enabled() && !tx.tls_optional;
        let mx = if dnssec {
            self.dns.mx_validated(domain).await
        } else {
            self.dns.mx(domain).await.map(|a| (Security::Insecure, a))
        };
        let (mx_security, mx) = match mx {
            Ok((s, a)) => (s, Ok(a)),
            Err(e) => (Security::Insecure, Err(e)),
        };
        let hosts = match mx {
            Ok(MxAnswer::Hosts(h)) => {
                shuffle_equal_preferences(h.into_iter().map(|m| (m.preference, m.host)).collect())
            }
            Ok(MxAnswer::Implicit) => vec![domain.to_string()],
            Ok(MxAnswer::Null) => {
                return self.finished(all(RcptResult::Bounced {
                    reason: format!("556 5.1.10 {domain} accepts no mail (null MX)"),
                }));
            }
            Ok(MxAnswer::NxDomain) => {
                return self.finished(all(RcptResult::Bounced {
                    reason: format!("550 5.1.2 domain {domain} does not exist"),
                }));
            }
            Err(e) => {
                return self.finished(all(RcptResult::Deferred {
                    reason: format!("451 4.4.3 {e}"),
                }));
            }
        };
        let lookup = if tx.tls_optional {
            Lookup::without_policy()
        } else {
            match self.engine.policy(domain).await {
                Ok(l) => l,
                Err(e) => {
                    return self.finished(all(RcptResult::Bounced {
                        reason: format!("550 5.1.2 {e}"),
                    }));
                }
            }
        };
        if let Some(e) = &lookup.fetch_error
            && lookup.fetched
            && tx.counts_for_tlsrpt()
        {
            // R55: a failed policy fetch is reported as its own failure, under the
            // cached policy if one still applies.
            self.record_fetch_failure(domain, &lookup, e);
        }
        if let Security::Bogus(why) = &mx_security {
            // RFC 7672 §2.2.1: MX hosts from a bogus RRset cannot be trusted: defer.
            self.record_unless(
                !tx.counts_for_tlsrpt(),
                domain,
                &lookup,
                "",
                None,
                None,
                None,
                Some(fail(ResultType::DnssecInvalid, "dnssec-mx-bogus")),
                None,
            );
            tracing::warn!(queue_id = %tx.queue_id, %domain, %why, "MX records fail DNSSEC validation; deferred");
            return Attempt {
                results: all(RcptResult::Deferred {
                    reason: format!(
                        "451 4.7.5 the MX records of {domain} fail DNSSEC validation ({why})"
                    ),
                }),
                policy_blocked: true,
                mode: lookup.mode(),
            };
        }
        if let Some(done) = self.try_reuse(domain, &lookup, tx).await {
            return done;
        }
        let mut last = format!("451 4.4.1 no MX host of {domain} could be reached");
        let mut policy_blocked = false;
        for host in &hosts {
            let decision = lookup.check_mx(host);
            let plan = if dnssec {
                match dane::plan(
                    &self.dns,
                    &self.trust,
                    &self.dane_configs,
                    self.port,
                    &mx_security,
                    host,
                    decision,
                )
                .await
                {
                    Ok(p) => p,
                    Err(reason) => {
                        last = reason;
                        continue;
                    }
                }
            } else {
                Plan::Sts {
                    decision,
                    require_starttls: false,
                    ips: None,
                }
            };
            let (decision, require_starttls, dane, known_ips) = match plan {
                Plan::Skip { reason, base } => {
                    self.record_unless(
                        !tx.counts_for_tlsrpt(),
                        domain,
                        &lookup,
                        host,
                        None,
                        None,
                        None,
                        Some(fail(reason.result_type(), reason.reason_code())),
                        Some(DaneRecord {
                            base: &base,
                            policy_strings: &[],
                        }),
                    );
                    tracing::warn!(queue_id = %tx.queue_id, %domain, mx = %host, tls = "none (not connected)",
                        rcpts = tx.recipients.len(), outcome = %format!("skipped: {reason}"), "delivery attempt");
                    last = format!("451 4.7.5 MX {host} of {domain} is not used: {reason}");
                    policy_blocked = true;
                    continue;
                }
                Plan::Dane { hop, ips } => (decision, true, Some(hop), Some(ips)),
                Plan::Sts {
                    decision,
                    require_starttls,
                    ips,
                } => (decision, require_starttls, None, ips),
            };
            if dane.is_none() && !decision.may_deliver() {
                // R42: not even a connection to an MX outside an enforce policy.
                self.record_unless(
                    !tx.counts_for_tlsrpt(),
                    domain,
                    &lookup,
                    host,
                    None,
                    None,
                    None,
                    Some(fail(ResultType::ValidationFailure, "mx-not-in-policy")),
                    None,
                );
                tracing::warn!(queue_id = %tx.queue_id, %domain, mx = %host, mode = crate::ops::metrics::mode_label(lookup.mode()),
                    tls = "none (not connected)", rcpts = tx.recipients.len(),
                    outcome = "skipped: MX not in the MTA-STS policy", "delivery attempt");
                last = format!(
                    "451 4.7.5 MX {host} is not permitted by the MTA-STS policy of {domain} (allowed: {})",
                    patterns(&lookup).join(", ")
                );
                policy_blocked = true;
                continue;
            }
            let ips = match known_ips {
                Some(ips) => Ok(ips),
                None => self.dns.ips(host).await,
            };
            let ips = match ips {
                Ok(ips) if !ips.is_empty() => ips,
                Ok(_) => {
                    last = format!("451 4.4.4 MX {host} has no address");
                    continue;
                }
                Err(e) => {
                    last = format!("451 4.4.3 {e}");
                    continue;
                }
            };
            for ip in ips {
                let mx = Mx {
                    host,
                    ip,
                    decision,
                    require_starttls,
                    dane: dane.as_ref(),
                };
                match self.session(domain, &mx, &lookup, tx).await {
                    SessionEnd::Done(results) => {
                        return Attempt {
                            results,
                            policy_blocked: false,
                            mode: lookup.mode(),
                        };
                    }
                    SessionEnd::Next {
                        reason,
                        policy,
                        tls,
                    } => {
                        if let Some(tls) = tls {
                            tracing::info!(queue_id = %tx.queue_id, %domain, mx = %host, %ip,
                                mode = crate::ops::metrics::mode_label(lookup.mode()), %tls,
                                rcpts = tx.recipients.len(), outcome = %format!("failed: {reason}"), "delivery attempt");
                        }
                        last = reason;
                        policy_blocked |= policy;
                    }
                }
            }
        }
        Attempt {
            results: all(RcptResult::Deferred { reason: last }),
            policy_blocked,
            mode: lookup.mode(),
        }
    }

    fn finished(&self, results: Vec<RcptResult>) -> Attempt {
        Attempt {
            results,
            policy_blocked: false,
            mode: None,
        }
    }

    async fn session(
        &self,
        domain: &str,
        mx: &Mx<'_>,
        lookup: &Lookup,
        tx: &Transaction,
    ) -> SessionEnd {
        let (host, ip, decision, dane) = (mx.host, mx.ip, mx.decision, mx.dane);
        let addr = SocketAddr::new(ip, self.port);
        let next = |reason: String| SessionEnd::Next {
            reason,
            policy: false,
            tls: Some("none".into()),
        };
        let (mut c, greeting) =
            match Client::connect(addr, self.connect_timeout, self.timeout).await {
                Ok(x) => x,
                Err(e) => return next(format!("451 4.4.1 {host}[{ip}]: {e}")),
            };
        let sending_ip = c.local_addr().map(|a| a.ip());
        let mx_helo = greeting
            .lines
            .first()
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string);
        let ehlo = match c.ehlo(&self.helo).await {
            Ok(r) => r,
            Err(e) => return next(format!("451 4.4.2 {host}[{ip}] EHLO: {e}")),
        };
        let record = |failure: Option<SessionFailure>| {
            self.record_unless(
                !tx.counts_for_tlsrpt(),
                domain,
                lookup,
                host,
                Some(ip),
                mx_helo.clone(),
                sending_ip,
                failure,
                dane.map(|d| DaneRecord {
                    base: &d.base,
                    policy_strings: &d.policy.policy_strings,
                }),
            )
        };
        if !ehlo.has_extension("STARTTLS") {
            if decision.requires_verified_tls() || mx.require_starttls {
                record(Some(fail(
                    ResultType::StarttlsNotSupported,
                    "starttls-not-offered",
                )));
                c.quit().await;
                let why = if dane.is_some() {
                    format!("by DANE (TLSA records of {host})")
                } else if decision.requires_verified_tls() {
                    format!("by the MTA-STS policy of {domain}")
                } else {
                    format!("by the DNSSEC-signed TLSA records of {host}")
                };
                return SessionEnd::Next {
                    reason: format!(
                        "451 4.7.4 TLS is required {why}, but {host}[{ip}] does not offer STARTTLS"
                    ),
                    policy: true,
                    tls: Some("none (starttls-not-supported)".into()),
                };
            }
            if lookup.mode() == Some(Mode::Testing) {
                record(Some(fail(
                    ResultType::StarttlsNotSupported,
                    "starttls-not-offered",
                )));
            } else {
                // No policy: nothing to report, but the operator sees plaintext hops.
                self.note_session(lookup.mode(), Some(ResultType::StarttlsNotSupported));
            }
            let hop = Hop {
                domain,
                host,
                ip,
                mode: lookup.mode(),
                tls: "none".into(),
                key: pool_key(domain, lookup, tx),
                uses: 0,
            };
            return self.transact(c, &ehlo, &hop, tx).await;
        }
        // DANE or an enforce policy: verified TLS or nothing.
        let strict = decision.requires_verified_tls() || dane.is_some();
        let (config, server_name) = match dane {
            Some(d) => (d.config.clone(), d.base.as_str()),
            None if strict => (self.trust.strict_config(), host),
            None => (self.trust.opportunistic_config(), host),
        };
        match c.starttls(config, server_name).await {
            Ok((mut tls, info)) => {
                let failure = match decision {
                    _ if dane.is_some() => None, // authenticated in the handshake
                    MxDecision::NotInPolicy(_) => {
                        Some(fail(ResultType::ValidationFailure, "mx-not-in-policy"))
                    }
                    MxDecision::Allowed(Mode::Testing) => self
                        .trust
                        .verify(&info.chain, host)
                        .err()
                        .map(|f| tls_fail(&f)),
                    _ => None, // enforce: verified in the handshake; no policy: nothing to validate
                };
                let tls_state = if dane.is_some() {
                    format!("{} verified (DANE)", info.version)
                } else if strict {
                    format!("{} verified", info.version)
                } else {
                    match self.trust.verify(&info.chain, host) {
                        Ok(()) => format!("{} verified", info.version),
                        Err(f) => format!("{} unverified ({})", info.version, f.result_type),
                    }
                };
                record(failure);
                let ehlo = match tls.ehlo(&self.helo).await {
                    Ok(r) => r,
                    Err(e) => {
                        return SessionEnd::Next {
                            reason: format!("451 4.4.2 {host}[{ip}] EHLO after STARTTLS: {e}"),
                            policy: false,
                            tls: Some(tls_state),
                        };
                    }
                };
                let hop = Hop {
                    domain,
                    host,
                    ip,
                    mode: lookup.mode(),
                    tls: tls_state,
                    key: pool_key(domain, lookup, tx),
                    uses: 0,
                };
                self.transact(tls, &ehlo, &hop, tx).await
            }
            Err(SmtpError::Tls(f)) => {
                if lookup.mode().is_some() || dane.is_some() {
                    record(Some(tls_fail(&f)));
                } else {
                    self.note_session(None, Some(f.result_type));
                }
                if let Some(d) = dane {
                    return SessionEnd::Next {
                        reason: format!(
                            "451 4.7.5 {host}[{ip}] failed DANE authentication (TLSA records of {}): {f}",
                            d.base
                        ),
                        policy: true,
                        tls: Some(format!("failed ({})", f.result_type)),
                    };
                }
                if mx.require_starttls && !strict {
                    return SessionEnd::Next {
                        reason: format!(
                            "451 4.7.5 TLS with {host}[{ip}] failed and the DNSSEC-signed TLSA records of {host} require it: {f}"
                        ),
                        policy: true,
                        tls: Some(format!("failed ({})", f.result_type)),
                    };
                }
                if strict {
                    return SessionEnd::Next {
                        reason: format!(
                            "451 4.7.5 TLS with {host}[{ip}] failed under the MTA-STS policy of {domain}: {f}"
                        ),
                        policy: true,
                        tls: Some(format!("failed ({})", f.result_type)),
                    };
                }
                // Opportunistic: the handshake itself failed; deliver in plaintext (RFC 8461 §5 testing, no policy).
                let hop = Hop {
                    domain,
                    host,
                    ip,
                    mode: lookup.mode(),
                    tls: format!("none (handshake failed: {})", f.result_type),
                    key: pool_key(domain, lookup, tx),
                    uses: 0,
                };
                self.plaintext_retry(addr, &hop, tx).await
            }
            Err(e) => next(format!("451 4.4.2 {host}[{ip}] STARTTLS: {e}")),
        }
    }

    async fn plaintext_retry(
        &self,
        addr: SocketAddr,
        hop: &Hop<'_>,
        tx: &Transaction,
    ) -> SessionEnd {
        let (host, ip) = (hop.host, hop.ip);
        let (mut c, _) = match Client::connect(addr, self.connect_timeout, self.timeout).await {
            Ok(x) => x,
            Err(e) => {
                return SessionEnd::Next {
                    reason: format!("451 4.4.1 {host}[{ip}]: {e}"),
                    policy: false,
                    tls: Some(hop.tls.clone()),
                };
            }
        };
        match c.ehlo(&self.helo).await {
            Ok(ehlo) => self.transact(c, &ehlo, hop, tx).await,
            Err(e) => SessionEnd::Next {
                reason: format!("451 4.4.2 {host}[{ip}] EHLO: {e}"),
                policy: false,
                tls: Some(hop.tls.clone()),
            },
        }
    }

    /// MAIL, RCPT…, DATA on an established (and, where required, verified) session.
    async fn transact<S: Stream + 'static>(
        &self,
        c: Client<S>,
        ehlo: &Reply,
        hop: &Hop<'_>,
        tx: &Transaction,
    ) -> SessionEnd {
        let (end, client) = self.transact_inner(c, ehlo, hop.host, hop.ip, tx).await;
        if let (SessionEnd::Done(_), Some(c)) = (&end, client.and_then(Client::boxed)) {
            let idle = Idle::new(c, ehlo.clone(), hop.host, hop.ip, &hop.tls, hop.uses + 1);
            self.pool.put(hop.key.clone(), idle);
        }
        // One line per attempt: domain, MX, policy mode, TLS outcome, reply.
        let outcome = match &end {
            SessionEnd::Done(results) => results
                .iter()
                .map(|r| match r {
                    RcptResult::Delivered { reply } => format!("delivered: {reply}"),
                    RcptResult::Deferred { reason } => format!("deferred: {reason}"),
                    RcptResult::Bounced { reason } => format!("bounced: {reason}"),
                })
                .collect::<Vec<_>>()
                .join("; "),
            SessionEnd::Next { reason, .. } => format!("failed: {reason}"),
        };
        tracing::info!(queue_id = %tx.queue_id, domain = %hop.domain, mx = %hop.host, ip = %hop.ip, mode = hop.mode.map(|m| m.as_str()).unwrap_or("none"),
            tls = %hop.tls, reuse = hop.uses, rcpts = tx.recipients.len(), %outcome, "delivery attempt");
        end
    }

    /// The transaction; returns the connection when it is still in a known state
    /// (every command answered), so it can be reused.
    async fn transact_inner<S: Stream>(
        &self,
        mut c: Client<S>,
        ehlo: &Reply,
        host: &str,
        ip: IpAddr,
        tx: &Transaction,
    ) -> (SessionEnd, Option<Client<S>>) {
        let said = |r: &Reply| format!("{host}[{ip}] said: {}", r.text());
        if tx.smtputf8 && !ehlo.has_extension("SMTPUTF8") {
            c.quit().await;
            return (
                SessionEnd::Done(vec![
                    RcptResult::Bounced {
                        reason: format!("550 5.6.7 {host} does not support SMTPUTF8")
                    };
                    tx.recipients.len()
                ]),
                None,
            );
        }
        let dsn = ehlo.has_extension("DSN");
        let mut mail = format!("MAIL FROM:<{}>", tx.mail_from);
        if ehlo.has_extension("SIZE") {
            mail.push_str(&format!(" SIZE={}", tx.body.len()));
        }
        if tx.eight_bit && ehlo.has_extension("8BITMIME") {
            mail.push_str(" BODY=8BITMIME");
        }
        if tx.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if dsn {
            if let Some(ret) = &tx.ret {
                mail.push_str(&format!(" RET={ret}"));
            }
            if let Some(envid) = &tx.envid {
                mail.push_str(&format!(" ENVID={envid}"));
            }
        }
        let r = match c.command(&mail).await {
            Ok(r) => {
                crate::ops::metrics::smtp_reply(r.code);
                r
            }
            Err(e) => {
                return (
                    SessionEnd::Next {
                        reason: format!("451 4.4.2 {host}[{ip}] MAIL: {e}"),
                        policy: false,
                        tls: None,
                    },
                    None,
                );
            }
        };
        if !r.is_positive() {
            c.quit().await;
            return (classify_all(&r, said(&r), tx.recipients.len()), None);
        }
        let mut results: Vec<Option<RcptResult>> = vec![None; tx.recipients.len()];
        let mut accepted = Vec::new();
        for (i, rcpt) in tx.recipients.iter().enumerate() {
            let mut cmd = format!("RCPT TO:<{}>", rcpt.address);
            if dsn {
                if let Some(n) = &rcpt.notify {
                    cmd.push_str(&format!(" NOTIFY={n}"));
                }
                if let Some(o) = &rcpt.orcpt {
                    cmd.push_str(&format!(" ORCPT={o}"));
                }
            }
            let reply = c.command(&cmd).await;
            if let Ok(r) = &reply {
                crate::ops::metrics::smtp_reply(r.code);
            }
            match reply {
                Ok(r) if r.is_positive() => accepted.push(i),
                Ok(r) if r.code >= 500 => {
                    results[i] = Some(RcptResult::Bounced { reason: said(&r) })
                }
                Ok(r) => results[i] = Some(RcptResult::Deferred { reason: said(&r) }),
                Err(e) => {
                    return (
                        SessionEnd::Next {
                            reason: format!("451 4.4.2 {host}[{ip}] RCPT: {e}"),
                            policy: false,
                            tls: None,
                        },
                        None,
                    );
                }
            }
        }
        let mut clean = true;
        if !accepted.is_empty() {
            let data = c.command("DATA").await;
            if let Ok(r) = &data {
                crate::ops::metrics::smtp_reply(r.code);
            }
            let outcome = match data {
                Ok(r) if r.code == 354 => match c.send_data(&tx.body).await.inspect(|r| {
                    crate::ops::metrics::smtp_reply(r.code);
                }) {
                    Ok(r) if r.is_positive() => RcptResult::Delivered { reply: said(&r) },
                    Ok(r) if r.code >= 500 => RcptResult::Bounced { reason: said(&r) },
                    Ok(r) => RcptResult::Deferred { reason: said(&r) },
                    // The message may or may not have arrived: defer (a delivery may repeat, never vanish).
                    Err(e) => {
                        clean = false;
                        RcptResult::Deferred {
                            reason: format!("451 4.4.2 {host}[{ip}] lost during DATA: {e}"),
                        }
                    }
                },
                Ok(r) if r.code >= 500 => RcptResult::Bounced { reason: said(&r) },
                Ok(r) => RcptResult::Deferred { reason: said(&r) },
                Err(e) => {
                    clean = false;
                    RcptResult::Deferred {
                        reason: format!("451 4.4.2 {host}[{ip}] DATA: {e}"),
                    }
                }
            };
            for i in accepted {
                results[i] = Some(outcome.clone());
            }
        }
        let end = SessionEnd::Done(
            results
                .into_iter()
                .map(|r| {
                    r.unwrap_or(RcptResult::Deferred {
                        reason: "451 4.3.0 internal: no result".into(),
                    })
                })
                .collect(),
        );
        (end, clean.then_some(c))
    }

    /// Record a failed policy fetch (no MX, no connection).
    fn record_fetch_failure(&self, domain: &str, lookup: &Lookup, e: &crate::sts::FetchError) {
        let (policy_strings, mx_host_patterns) = match &lookup.policy {
            Some(p) => (p.policy.lines.clone(), patterns(lookup)),
            None => (vec![], vec![]),
        };
        self.recorder.record(SessionResult {
            at: crate::clock::Clock::now(&crate::clock::SystemClock),
            policy_domain: domain.to_string(),
            policy_type: PolicyType::Sts,
            policy_strings,
            mx_host_patterns,
            receiving_mx_hostname: String::new(),
            receiving_ip: None,
            receiving_mx_helo: None,
            sending_ip: None,
            failure: Some(SessionFailure {
                result_type: e.result_type,
                // `failure-reason-code` is short text: the start of the reason.
                reason_code: e.reason.chars().take(120).collect(),
            }),
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn record_unless(
        &self,
        exempt: bool,
        domain: &str,
        lookup: &Lookup,
        host: &str,
        ip: Option<IpAddr>,
        helo: Option<String>,
        sending_ip: Option<IpAddr>,
        failure: Option<SessionFailure>,
        dane: Option<DaneRecord<'_>>,
    ) {
        self.note_session(lookup.mode(), failure.as_ref().map(|f| f.result_type));
        if exempt {
            return;
        }
        let (policy_domain, policy_type, policy_strings, mx_host_patterns) =
            match (dane, &lookup.policy, lookup.mode()) {
                // RFC 8460 §4.4: for DANE the policy domain is the TLSA base domain,
                // and its `_smtp._tls` record says where the report goes.
                (Some(d), _, _) => (
                    d.base.to_string(),
                    PolicyType::Tlsa,
                    d.policy_strings.to_vec(),
                    vec![],
                ),
                (None, Some(p), Some(_)) => (
                    domain.to_string(),
                    PolicyType::Sts,
                    p.policy.lines.clone(),
                    patterns(lookup),
                ),
                _ => (
                    domain.to_string(),
                    PolicyType::NoPolicyFound,
                    vec![],
                    vec![],
                ),
            };
        self.recorder.record(SessionResult {
            at: crate::clock::Clock::now(&crate::clock::SystemClock),
            policy_domain,
            policy_type,
            policy_strings,
            mx_host_patterns,
            receiving_mx_hostname: host.to_string(),
            receiving_ip: ip,
            receiving_mx_helo: helo,
            sending_ip,
            failure,
        });
    }
}

fn fail(result_type: ResultType, code: &str) -> SessionFailure {
    SessionFailure {
        result_type,
        reason_code: code.to_string(),
    }
}

fn tls_fail(f: &TlsFailure) -> SessionFailure {
    fail(f.result_type, f.reason_code)
}

fn patterns(lookup: &Lookup) -> Vec<String> {
    lookup
        .policy
        .as_ref()
        .map(|p| p.policy.mx.iter().map(|m| m.to_string()).collect())
        .unwrap_or_default()
}

fn classify_all(r: &Reply, text: String, n: usize) -> SessionEnd {
    if r.code >= 500 {
        SessionEnd::Done(vec![RcptResult::Bounced { reason: text }; n])
    } else {
        SessionEnd::Next {
            reason: text,
            policy: false,
            tls: None,
        }
    }
}

/// RFC 5321 §5.1: MX hosts of equal preference in random order; input sorted by
/// preference.
fn shuffle_equal_preferences(mut hosts: Vec<(u16, String)>) -> Vec<String> {
    let seed = RandomState::new();
    hosts.sort_by_key(|(pref, host)| (*pref, seed.hash_one(host)));
    hosts.into_iter().map(|(_, h)| h).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_preferences_are_shuffled_but_order_kept() {
        let hosts = vec![
            (10, "a".to_string()),
            (10, "b".to_string()),
            (20, "c".to_string()),
            (5, "z".to_string()),
        ];
        let mut seen_first = std::collections::HashSet::new();
        for _ in 0..64 {
            let order = shuffle_equal_preferences(hosts.clone());
            assert_eq!(order[0], "z");
            assert_eq!(order[3], "c");
            seen_first.insert(order[1].clone());
        }
        assert_eq!(
            seen_first.len(),
            2,
            "both equal-preference hosts come first sometimes"
        );
    }
}
