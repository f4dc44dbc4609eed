//! `stsrelay check DOMAIN`: a domain's MTA-STS, DANE and TLS-RPT set-up as a sender
//! sees it. The JSON form ([`Report`]) is a stable interface for scripts.

pub mod dane;

use crate::Config;
use crate::dns::{MxAnswer, Resolver, Security};
use crate::smtp::outbound;
use crate::sts::{
    FetchOptions, HttpsFetcher, Mode, MxDecision, Policy, PolicyFetcher, RecordError,
    normalize_host, select_record,
};
use crate::tls::TrustStore;
use crate::tlsrpt::{ResultType, TlsRptRecordError, select_tlsrpt_record};
use dane::DaneReport;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;

/// The whole check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The policy domain (A-label).
    pub domain: String,
    /// Every MX passes under the policy that governs it (DANE where it applies, else
    /// MTA-STS), and the domain is protected: a valid MTA-STS policy, or DANE on every MX.
    pub ok: bool,
    /// `_mta-sts` TXT, or null when there is none.
    pub sts_record: Option<RecordReport>,
    /// The policy, or null when there is no (valid) record to fetch it for.
    pub policy: Option<PolicyReport>,
    /// `_smtp._tls` TXT, or null when there is none.
    pub tlsrpt_record: Option<TlsRptReport>,
    /// One entry per MX host, in preference order.
    pub mx: Vec<MxReport>,
    /// A problem with the domain as a whole (DNS failure, null MX).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `sts_record`
#[derive(Debug, Clone, Serialize)]
pub struct RecordReport {
    /// Exactly one valid record.
    pub ok: bool,
    /// Its id.
    pub id: Option<String>,
    /// Why not ok.
    pub error: Option<String>,
}

/// `policy`
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PolicyReport {
    /// Fetched and valid.
    Valid {
        /// Always true.
        ok: bool,
        /// Mode.
        mode: Mode,
        /// max_age (clamped).
        max_age: u32,
        /// mx patterns.
        mx: Vec<String>,
    },
    /// Fetch failed.
    Failed {
        /// Always false.
        ok: bool,
        /// RFC 8460 result type.
        result_type: ResultType,
        /// Why.
        error: String,
    },
}

/// `tlsrpt_record`
#[derive(Debug, Clone, Serialize)]
pub struct TlsRptReport {
    /// Exactly one valid record with a usable rua.
    pub ok: bool,
    /// Usable destinations.
    pub rua: Vec<String>,
    /// Why not ok (or which URIs were skipped).
    pub error: Option<String>,
}

/// One MX.
#[derive(Debug, Clone, Serialize)]
pub struct MxReport {
    /// Host name.
    pub host: String,
    /// MX preference (0 for the implicit MX).
    pub preference: u16,
    /// Matches the policy's patterns; null without an active policy.
    pub policy_match: Option<bool>,
    /// The address probed.
    pub address: Option<String>,
    /// STARTTLS offered.
    pub starttls: bool,
    /// Negotiated version, e.g. `TLSv1.3`.
    pub tls_version: Option<String>,
    /// Certificate verdict for the MX name (WebPKI, as MTA-STS checks it).
    pub certificate: CertificateReport,
    /// DANE (RFC 7672): DNSSEC status, TLSA records, whether DANE governs this MX and
    /// whether the certificate matches; null when DNSSEC is off (`dns.dnssec = false`).
    pub dane: Option<DaneReport>,
}

/// Certificate verdict.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateReport {
    /// Valid for the MX name, trusted, not expired.
    pub ok: bool,
    /// RFC 8460 result type when not ok (`starttls-not-supported` without STARTTLS).
    pub result_type: Option<ResultType>,
    /// Why not ok.
    pub error: Option<String>,
}

impl MxReport {
    /// Where DANE governs the MX it alone decides (RFC 8461 §2: MTA-STS never rescues
    /// a DANE failure, and a DANE success needs no WebPKI); a DNSSEC failure means the
    /// MX is not used; otherwise the MTA-STS checks as without DANE.
    fn passes(&self) -> bool {
        match &self.dane {
            Some(d) if d.applies || d.skip.is_some() => d.passes() && self.starttls,
            _ => self.policy_match != Some(false) && self.starttls && self.certificate.ok,
        }
    }

    fn dane_applies(&self) -> bool {
        self.dane.as_ref().is_some_and(|d| d.applies)
    }
}

/// Runs checks with one resolver, trust store and set of timeouts.
pub struct Checker {
    resolver: Resolver,
    trust: TrustStore,
    fetcher: HttpsFetcher,
    port: u16,
    helo: String,
    connect_timeout: Duration,
    timeout: Duration,
}

/// Setting up the checker failed (a config problem).
#[derive(Debug, thiserror::Error)]
pub enum CheckSetupError {
    /// DNS.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// Trust store.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    /// HTTP client.
    #[error(transparent)]
    Fetcher(#[from] crate::sts::FetcherSetupError),
}

impl Checker {
    /// From a config: `[dns]`, `tls.extra_roots`, `delivery.port` and timeouts. The
    /// SMTP reply timeout is capped at 30 s: this is an interactive tool.
    pub fn from_config(cfg: &Config) -> Result<Checker, CheckSetupError> {
        let resolver = Resolver::from_config(cfg)?;
        let trust = TrustStore::from_config(cfg)?;
        let fetcher = HttpsFetcher::new(resolver.clone(), &trust, FetchOptions::from_config(cfg))?;
        Ok(Checker {
            resolver,
            trust,
            fetcher,
            port: cfg.delivery.port,
            helo: cfg.helo_name(),
            connect_timeout: Duration::from_secs(cfg.delivery.connect_timeout_secs.min(30)),
            timeout: Duration::from_secs(cfg.delivery.command_timeout_secs.min(30)),
        })
    }

    /// Check `domain`.
    pub async fn check(&self, domain: &str) -> Report {
        let domain = match normalize_host(domain) {
            Ok(d) => d,
            Err(e) => {
                return Report {
                    domain: domain.to_string(),
                    ok: false,
                    sts_record: None,
                    policy: None,
                    tlsrpt_record: None,
                    mx: vec![],
                    error: Some(e.to_string()),
                };
            }
        };
        let (sts_name, tlsrpt_name) =
            (format!("_mta-sts.{domain}"), format!("_smtp._tls.{domain}"));
        let (sts, tlsrpt, mx, mx_security) = tokio::join!(
            self.resolver.txt(&sts_name),
            self.resolver.txt(&tlsrpt_name),
            self.resolver.mx(&domain),
            self.mx_security(&domain),
        );
        let mut error = None;
        let (sts_record, id) = match sts.map(|t| select_record(&t)) {
            Err(e) => (
                Some(RecordReport {
                    ok: false,
                    id: None,
                    error: Some(e.to_string()),
                }),
                None,
            ),
            Ok(Err(RecordError::NoRecord)) => (None, None),
            Ok(Err(e)) => (
                Some(RecordReport {
                    ok: false,
                    id: None,
                    error: Some(e.to_string()),
                }),
                None,
            ),
            Ok(Ok(r)) => (
                Some(RecordReport {
                    ok: true,
                    id: Some(r.id.clone()),
                    error: None,
                }),
                Some(r.id),
            ),
        };
        let policy = match id {
            None => None,
            Some(_) => Some(self.fetcher.fetch(&domain).await),
        };
        let tlsrpt_record = match tlsrpt.map(|t| select_tlsrpt_record(&t)) {
            Ok(Err(TlsRptRecordError::NoRecord)) => None,
            Ok(Ok(r)) => Some(TlsRptReport {
                ok: true,
                rua: r.rua.iter().map(|u| u.to_string()).collect(),
                error: (!r.skipped.is_empty()).then(|| {
                    r.skipped
                        .iter()
                        .map(|(u, why)| format!("ignored {u}: {why}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                }),
            }),
            Ok(Err(e)) => Some(TlsRptReport {
                ok: false,
                rua: vec![],
                error: Some(e.to_string()),
            }),
            Err(e) => Some(TlsRptReport {
                ok: false,
                rua: vec![],
                error: Some(e.to_string()),
            }),
        };
        let hosts: Vec<(String, u16)> = match mx {
            Ok(MxAnswer::Hosts(h)) => h.into_iter().map(|m| (m.host, m.preference)).collect(),
            Ok(MxAnswer::Implicit) => vec![(domain.clone(), 0)],
            Ok(MxAnswer::Null) => {
                error = Some("null MX: the domain accepts no mail (RFC 7505)".into());
                vec![]
            }
            Ok(MxAnswer::NxDomain) => {
                error = Some("the domain does not exist".into());
                vec![]
            }
            Err(e) => {
                error = Some(e.to_string());
                vec![]
            }
        };
        let active = match &policy {
            Some(Ok(p)) if p.mode != Mode::None => Some(p),
            _ => None,
        };
        let mx_security = &mx_security;
        let probes = hosts.iter().map(|(host, pref)| async move {
            self.check_mx(host, *pref, active, mx_security.as_ref())
                .await
        });
        let mx = futures_util::future::join_all(probes).await;
        let policy = policy.map(|p| match p {
            Ok(p) => PolicyReport::Valid {
                ok: true,
                mode: p.mode,
                max_age: p.max_age,
                mx: p.mx.iter().map(|m| m.to_string()).collect(),
            },
            Err(e) => PolicyReport::Failed {
                ok: false,
                result_type: e.result_type,
                error: e.reason,
            },
        });
        let policy_ok = matches!(policy, Some(PolicyReport::Valid { .. }));
        let protected = policy_ok || (!mx.is_empty() && mx.iter().all(MxReport::dane_applies));
        let ok = protected && !mx.is_empty() && mx.iter().all(MxReport::passes);
        Report {
            domain,
            ok,
            sts_record,
            policy,
            tlsrpt_record,
            mx,
            error,
        }
    }

    /// The DNSSEC status of `domain`'s MX RRset (`None` with DNSSEC off).
    async fn mx_security(&self, domain: &str) -> Option<Result<Security, String>> {
        if !self.resolver.dnssec_enabled() {
            return None;
        }
        Some(
            self.resolver
                .mx_validated(domain)
                .await
                .map(|(s, _)| s)
                .map_err(|e| e.to_string()),
        )
    }

    /// DNSSEC facts for `host` (`None` with DNSSEC off).
    async fn dane_facts(
        &self,
        host: &str,
        mx_rrset: Option<&Result<Security, String>>,
    ) -> Option<dane::Facts> {
        let mx_rrset = mx_rrset?.clone();
        let (address, tlsa) = tokio::join!(
            self.resolver.ips_validated(host),
            self.resolver.tlsa(self.port, host)
        );
        // TLSA records of a host whose addresses are not secure are shown but ignored
        // (RFC 7672 §2.2.2), and a failed lookup of them (the servers of unsigned zones
        // often mishandle TLSA queries) does not fail the MX, as in delivery.
        let secure = matches!(&address, Ok((s, _)) if s.is_secure());
        let tlsa = match tlsa {
            Ok(t) => Ok(t),
            Err(_) if !secure => Ok(crate::dns::TlsaAnswer {
                security: Security::Insecure,
                records: vec![],
                base_domain: host.to_string(),
            }),
            Err(e) => Err(e.to_string()),
        };
        Some(dane::Facts {
            mx_rrset,
            address: address.map(|(s, _)| s).map_err(|e| e.to_string()),
            tlsa,
        })
    }

    async fn check_mx(
        &self,
        host: &str,
        preference: u16,
        active: Option<&Policy>,
        mx_rrset: Option<&Result<Security, String>>,
    ) -> MxReport {
        let policy_match = active.map(|p| p.matches_mx(host));
        let decision = match active {
            Some(p) if p.matches_mx(host) => MxDecision::Allowed(p.mode),
            Some(p) => MxDecision::NotInPolicy(p.mode),
            None => MxDecision::NoPolicy,
        };
        let (facts, mut report) = tokio::join!(
            self.dane_facts(host, mx_rrset),
            self.probe_mx(host, preference, policy_match)
        );
        if let Some(facts) = facts {
            let mut d = dane::assess(host, &facts, decision);
            d.judge(
                host,
                report.0.starttls,
                &report.1,
                report.0.certificate.error.as_deref(),
            );
            report.0.dane = Some(d);
        }
        report.0
    }

    /// Connect and look at STARTTLS and the certificate; the report (without `dane`)
    /// and the presented chain.
    async fn probe_mx(
        &self,
        host: &str,
        preference: u16,
        policy_match: Option<bool>,
    ) -> (MxReport, Vec<rustls_pki_types::CertificateDer<'static>>) {
        let mut report = MxReport {
            host: host.to_string(),
            preference,
            policy_match,
            address: None,
            starttls: false,
            tls_version: None,
            certificate: CertificateReport {
                ok: false,
                result_type: None,
                error: None,
            },
            dane: None,
        };
        let ips = match self.resolver.ips(host).await {
            Ok(ips) if !ips.is_empty() => ips,
            Ok(_) => {
                report.certificate.error = Some(format!("{host} has no address records"));
                return (report, vec![]);
            }
            Err(e) => {
                report.certificate.error = Some(e.to_string());
                return (report, vec![]);
            }
        };
        let mut last_err = None;
        for ip in ips {
            let addr = SocketAddr::new(ip, self.port);
            match outbound::probe(
                addr,
                host,
                &self.helo,
                &self.trust,
                self.connect_timeout,
                self.timeout,
            )
            .await
            {
                Ok(p) => {
                    report.address = Some(addr.to_string());
                    report.starttls = p.starttls;
                    report.tls_version = p.tls_version;
                    match p.certificate {
                        Some(Ok(())) => report.certificate.ok = true,
                        Some(Err(f)) => {
                            report.certificate.result_type = Some(f.result_type);
                            report.certificate.error = Some(f.reason);
                        }
                        None if !p.starttls => {
                            report.certificate.result_type = Some(ResultType::StarttlsNotSupported);
                            report.certificate.error = Some("STARTTLS not offered".into());
                        }
                        None => report.certificate.error = p.error,
                    }
                    return (report, p.chain);
                }
                Err(e) => last_err = Some(format!("{addr}: {e}")),
            }
        }
        report.certificate.error = last_err;
        (report, vec![])
    }
}

impl Report {
    /// Human-readable rendering.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mark = |b: bool| if b { "ok  " } else { "FAIL" };
        let mut s = String::new();
        let _ = writeln!(s, "MTA-STS and DANE check for {}", self.domain);
        match &self.sts_record {
            None => {
                let _ = writeln!(
                    s,
                    "  [FAIL] _mta-sts.{} TXT: none (no MTA-STS)",
                    self.domain
                );
            }
            Some(r) => {
                let _ = writeln!(
                    s,
                    "  [{}] _mta-sts.{} TXT: {}",
                    mark(r.ok),
                    self.domain,
                    r.id.as_deref()
                        .map(|i| format!("id={i}"))
                        .or(r.error.clone())
                        .unwrap_or_default()
                );
            }
        }
        match &self.policy {
            None => {}
            Some(PolicyReport::Valid {
                mode, max_age, mx, ..
            }) => {
                let _ = writeln!(
                    s,
                    "  [ok  ] policy: mode={mode} max_age={max_age} mx={}",
                    mx.join(", ")
                );
            }
            Some(PolicyReport::Failed {
                result_type, error, ..
            }) => {
                let _ = writeln!(s, "  [FAIL] policy: {result_type}: {error}");
            }
        }
        match &self.tlsrpt_record {
            None => {
                let _ = writeln!(
                    s,
                    "  [info] _smtp._tls.{} TXT: none (no TLS reports requested)",
                    self.domain
                );
            }
            Some(r) => {
                let _ = writeln!(
                    s,
                    "  [{}] _smtp._tls.{} TXT: {}{}",
                    mark(r.ok),
                    self.domain,
                    r.rua.join(", "),
                    r.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                );
            }
        }
        if let Some(e) = &self.error {
            let _ = writeln!(s, "  [FAIL] {e}");
        }
        for m in &self.mx {
            let _ = writeln!(
                s,
                "  MX {} {}{}",
                m.preference,
                m.host,
                m.address
                    .as_deref()
                    .map(|a| format!(" ({a})"))
                    .unwrap_or_default()
            );
            match m.policy_match {
                Some(b) => {
                    let _ = writeln!(s, "    [{}] matches policy", mark(b));
                }
                None => {
                    let _ = writeln!(s, "    [info] no active policy to match");
                }
            }
            let _ = writeln!(s, "    [{}] STARTTLS offered", mark(m.starttls));
            if let Some(v) = &m.tls_version {
                let _ = writeln!(s, "    [ok  ] {v}");
            }
            // Where DANE governs the MX, the WebPKI verdict is information only.
            let cert_mark = if m.dane_applies() {
                "info"
            } else {
                mark(m.certificate.ok)
            };
            let _ = writeln!(
                s,
                "    [{}] certificate valid for {}{}",
                cert_mark,
                m.host,
                match (&m.certificate.result_type, &m.certificate.error) {
                    (Some(rt), Some(e)) => format!(": {rt}: {e}"),
                    (None, Some(e)) => format!(": {e}"),
                    (Some(rt), None) => format!(": {rt}"),
                    _ => String::new(),
                }
            );
            for line in m.dane.iter().flat_map(DaneReport::text_lines) {
                let _ = writeln!(s, "{line}");
            }
        }
        let _ = writeln!(
            s,
            "{}",
            if self.ok {
                "RESULT: ok"
            } else {
                "RESULT: FAIL"
            }
        );
        s
    }
}
