//! The DANE part of `stsrelay check` (RFC 7672): for one MX host, the DNSSEC status of
//! its MX RRset, addresses and TLSA records, the records themselves, whether DANE
//! governs the host ([`mx_policy`]) and whether the certificate it presented matches
//! ([`verify_chain`]).
//!
//! [`assess`] turns the DNS facts into a [`DaneReport`] without I/O; [`DaneReport::judge`]
//! adds what the server presented.

use crate::dane::{
    MatchKind, MxDnssec, MxPolicy, ReferenceNames, TlsaRecord, TlsaSet, mx_policy, verify_chain,
};
use crate::dns::{Security, TlsaAnswer};
use crate::sts::MxDecision;
use crate::tlsrpt::ResultType;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;

/// DNSSEC status as JSON shows it; the reason for `bogus` is in the report's `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dnssec {
    /// Validated from the trust anchor.
    Secure,
    /// Provably unsigned (or DNSSEC off).
    Insecure,
    /// Failed validation.
    Bogus,
}

impl From<&Security> for Dnssec {
    fn from(s: &Security) -> Dnssec {
        match s {
            Security::Secure => Dnssec::Secure,
            Security::Insecure => Dnssec::Insecure,
            Security::Bogus(_) => Dnssec::Bogus,
        }
    }
}

impl std::fmt::Display for Dnssec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dnssec::Secure => "secure",
            Dnssec::Insecure => "insecure",
            Dnssec::Bogus => "bogus",
        })
    }
}

/// The record that authenticated the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatchReport {
    /// The record, presentation form (`3 1 1 ab…`, full data).
    pub record: String,
    /// `end-entity` (DANE-EE) or `trust-anchor` (DANE-TA).
    pub kind: &'static str,
    /// DANE-TA: the reference name the server certificate is valid for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `mx[].dane` of `stsrelay check --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DaneReport {
    /// The domain's MX RRset (or the denial behind an implicit MX); null if the lookup
    /// failed.
    pub mx_dnssec: Option<Dnssec>,
    /// The host's A/AAAA records; null if the lookup failed.
    pub address_dnssec: Option<Dnssec>,
    /// The TLSA RRset (or its denial); null if the lookup failed.
    pub tlsa_dnssec: Option<Dnssec>,
    /// The TLSA base domain (`_PORT._tcp.<base>`; the CNAME-expanded host when secure).
    pub tlsa_base: Option<String>,
    /// Every TLSA record found, presentation form, sorted.
    pub tlsa: Vec<String>,
    /// At least one record is usable for SMTP (DANE-TA/DANE-EE, RFC 7672 §3.1.3).
    pub usable: bool,
    /// DANE governs this MX: STARTTLS required and the certificate must match.
    pub applies: bool,
    /// Why this MX is not used at all (a DNSSEC failure), or null.
    pub skip: Option<String>,
    /// The record the presented certificate matched (only when `applies`).
    #[serde(rename = "match")]
    pub matched: Option<MatchReport>,
    /// RFC 8460 result type of a DANE failure: `tlsa-invalid`, `dnssec-invalid`,
    /// `starttls-not-supported`, or a certificate type for a DANE-TA chain.
    pub result_type: Option<ResultType>,
    /// What went wrong, or why DANE does not apply.
    pub error: Option<String>,
    /// The usable records, kept for [`DaneReport::judge`].
    #[serde(skip)]
    usable_set: TlsaSet,
}

/// What DNS said about one MX host; each lookup `Err` with its message if it failed.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The domain's MX RRset.
    pub mx_rrset: Result<Security, String>,
    /// The host's addresses.
    pub address: Result<Security, String>,
    /// The host's TLSA RRset.
    pub tlsa: Result<TlsaAnswer, String>,
}

/// The DANE verdict for one MX host from its DNS facts and the MTA-STS decision for it
/// (RFC 7672 §2.2 via [`mx_policy`]), before anything is known about the server.
///
/// ```
/// use stsrelay::check::dane::{assess, Facts};
/// use stsrelay::dns::{Security, TlsaAnswer};
/// use stsrelay::sts::MxDecision;
/// let facts = Facts {
///     mx_rrset: Ok(Security::Secure),
///     address: Ok(Security::Secure),
///     tlsa: Ok(TlsaAnswer { security: Security::Secure, records: vec![(3, 1, 1, vec![7; 32])],
///                           base_domain: "mx.example".into() }),
/// };
/// let r = assess("mx.example", &facts, MxDecision::NoPolicy);
/// assert!(r.applies && r.usable);
/// assert_eq!(r.tlsa, ["3 1 1 0707070707070707070707070707070707070707070707070707070707070707"]);
/// ```
pub fn assess(host: &str, facts: &Facts, sts: MxDecision) -> DaneReport {
    let (records, tlsa_base) = match &facts.tlsa {
        Ok(a) => (
            a.records
                .iter()
                .map(|(u, s, m, d)| TlsaRecord::from_raw(*u, *s, *m, d.clone()))
                .collect::<TlsaSet>(),
            Some(a.base_domain.clone()),
        ),
        Err(_) => (TlsaSet::default(), None),
    };
    let mut report = DaneReport {
        mx_dnssec: facts.mx_rrset.as_ref().ok().map(Dnssec::from),
        address_dnssec: facts.address.as_ref().ok().map(Dnssec::from),
        tlsa_dnssec: facts.tlsa.as_ref().ok().map(|a| Dnssec::from(&a.security)),
        tlsa_base,
        tlsa: records.presentation(),
        usable: records.dane_required(),
        applies: false,
        skip: None,
        matched: None,
        result_type: None,
        error: None,
        usable_set: TlsaSet::default(),
    };
    // A failed lookup: under DANE the MX could not be used now (delivery defers).
    let failed = [
        ("MX", facts.mx_rrset.as_ref().err()),
        ("address", facts.address.as_ref().err()),
        ("TLSA", facts.tlsa.as_ref().err()),
    ];
    if let Some((what, Some(e))) = failed.into_iter().find(|(_, e)| e.is_some()) {
        report.skip = Some(format!("{what} lookup failed: {e}"));
        report.error = report.skip.clone();
        return report;
    }
    let (Ok(mx_rrset), Ok(address), Ok(tlsa)) = (&facts.mx_rrset, &facts.address, &facts.tlsa)
    else {
        unreachable!("failed lookups returned above");
    };
    let dns = MxDnssec {
        mx_rrset: mx_rrset.clone(),
        address: address.clone(),
        tlsa: tlsa.security.clone(),
        records,
    };
    match mx_policy(&dns, sts) {
        MxPolicy::Dane(set) => {
            report.applies = true;
            report.usable_set = set;
        }
        MxPolicy::Skip(why) => {
            report.result_type = Some(why.result_type());
            report.error = Some(why.to_string());
            report.skip = Some(why.to_string());
        }
        MxPolicy::Sts {
            require_starttls, ..
        } => report.error = Some(why_not(host, &dns, require_starttls)),
    }
    report
}

/// Why DANE does not govern a host that is not skipped.
fn why_not(host: &str, dns: &MxDnssec, require_starttls: bool) -> String {
    if !dns.address.is_secure() {
        format!("DANE does not apply: the addresses of {host} are not DNSSEC-signed")
    } else if !dns.tlsa.is_secure() {
        "DANE does not apply: the TLSA records are not DNSSEC-signed (ignored)".into()
    } else if dns.records.is_empty() {
        "DANE does not apply: no TLSA records".into()
    } else if require_starttls && !dns.records.dane_required() {
        "DANE does not apply: no usable TLSA record (STARTTLS is still required)".into()
    } else {
        "DANE does not apply: the MX RRset is not DNSSEC-signed and the MTA-STS policy \
         does not permit this host"
            .into()
    }
}

impl DaneReport {
    /// Does DANE let mail go to this MX: not skipped, and where DANE applies, the
    /// certificate matched?
    pub fn passes(&self) -> bool {
        self.skip.is_none() && (!self.applies || self.matched.is_some())
    }

    /// Judge what the server presented (when DANE applies): no STARTTLS, no completed
    /// handshake (`chain` empty, with `handshake_error`), or the chain against the
    /// usable records with `host` and the TLSA base domain as reference names.
    pub fn judge(
        &mut self,
        host: &str,
        starttls: bool,
        chain: &[CertificateDer<'_>],
        handshake_error: Option<&str>,
    ) {
        if !self.applies {
            return;
        }
        if !starttls {
            self.result_type = Some(ResultType::StarttlsNotSupported);
            self.error = Some("DANE requires STARTTLS; the server does not offer it".into());
            return;
        }
        if chain.is_empty() {
            self.result_type = Some(ResultType::ValidationFailure);
            self.error = Some(format!(
                "no TLS session: {}",
                handshake_error.unwrap_or("the handshake did not complete")
            ));
            return;
        }
        let base = self.tlsa_base.as_deref().unwrap_or(host);
        let names = match ReferenceNames::new(host, base) {
            Ok(n) => n,
            Err(e) => {
                self.result_type = Some(ResultType::ValidationFailure);
                self.error = Some(e.to_string());
                return;
            }
        };
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        match verify_chain(&self.usable_set, chain, &names, UnixTime::now(), &provider) {
            Ok(m) => {
                let (kind, name) = match m.kind {
                    MatchKind::EndEntity => ("end-entity", None),
                    MatchKind::TrustAnchor { name, .. } => ("trust-anchor", Some(name)),
                };
                self.matched = Some(MatchReport {
                    record: m.record.to_string(),
                    kind,
                    name,
                });
            }
            Err(e) => {
                self.result_type = Some(e.result_type());
                self.error = Some(e.to_string());
            }
        }
    }

    /// Lines for the human-readable output (indented, with `[ok  ]`-style marks).
    pub(super) fn text_lines(&self) -> Vec<String> {
        let show = |d: Option<Dnssec>| d.map_or("lookup failed".to_string(), |d| d.to_string());
        let mut lines = vec![format!(
            "    [info] DNSSEC: MX {}, address {}, TLSA {}{}",
            show(self.mx_dnssec),
            show(self.address_dnssec),
            show(self.tlsa_dnssec),
            self.tlsa_base
                .as_deref()
                .map(|b| format!(" (TLSA base {b})"))
                .unwrap_or_default()
        )];
        for r in &self.tlsa {
            lines.push(format!("    [info] TLSA {r}"));
        }
        let detail = |rt: Option<ResultType>, e: Option<&str>| match (rt, e) {
            (Some(rt), Some(e)) => format!("{rt}: {e}"),
            (None, Some(e)) => e.to_string(),
            (Some(rt), None) => rt.to_string(),
            (None, None) => String::new(),
        };
        if let Some(skip) = &self.skip {
            lines.push(format!("    [FAIL] DANE: MX not used: {skip}"));
        } else if !self.applies {
            lines.push(format!(
                "    [info] {}",
                self.error.as_deref().unwrap_or("DANE does not apply")
            ));
        } else {
            match &self.matched {
                Some(m) => lines.push(format!(
                    "    [ok  ] DANE: certificate matches {} ({}{})",
                    m.record,
                    m.kind,
                    m.name
                        .as_deref()
                        .map(|n| format!(", valid for {n}"))
                        .unwrap_or_default()
                )),
                None => lines.push(format!(
                    "    [FAIL] DANE: {}",
                    detail(self.result_type, self.error.as_deref())
                )),
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sts::Mode;

    fn answer(security: Security, records: Vec<(u8, u8, u8, Vec<u8>)>) -> TlsaAnswer {
        TlsaAnswer {
            security,
            records,
            base_domain: "mx.example".into(),
        }
    }

    fn facts(mx: Security, addr: Security, tlsa: TlsaAnswer) -> Facts {
        Facts {
            mx_rrset: Ok(mx),
            address: Ok(addr),
            tlsa: Ok(tlsa),
        }
    }

    fn self_signed() -> (CertificateDer<'static>, TlsaRecord) {
        let cert = rcgen::generate_simple_self_signed(vec!["anything.invalid".into()])
            .unwrap()
            .cert;
        let der = cert.der().clone();
        let r = crate::dane::matching::record_for(
            crate::dane::CertUsage::DaneEe,
            crate::dane::Selector::Spki,
            crate::dane::MatchingType::Sha256,
            &der,
        )
        .unwrap();
        (der, r)
    }

    fn raw(r: &TlsaRecord) -> (u8, u8, u8, Vec<u8>) {
        (
            r.usage.into(),
            r.selector.into(),
            r.matching.into(),
            r.data.clone(),
        )
    }

    #[test]
    fn dane_ee_match_passes_and_mismatch_fails() {
        let (cert, rec) = self_signed();
        let f = facts(
            Security::Secure,
            Security::Secure,
            answer(Security::Secure, vec![raw(&rec)]),
        );
        let mut r = assess("mx.example", &f, MxDecision::Allowed(Mode::Enforce));
        assert!(r.applies && r.usable && r.skip.is_none());
        r.judge("mx.example", true, std::slice::from_ref(&cert), None);
        assert_eq!(
            r.matched,
            Some(MatchReport {
                record: rec.to_string(),
                kind: "end-entity",
                name: None
            })
        );
        assert!(r.passes());

        let (other, _) = self_signed();
        let mut r = assess("mx.example", &f, MxDecision::NoPolicy);
        r.judge("mx.example", true, &[other], None);
        assert_eq!(r.matched, None);
        assert_eq!(r.result_type, Some(ResultType::TlsaInvalid));
        assert!(!r.passes());

        let mut r = assess("mx.example", &f, MxDecision::NoPolicy);
        r.judge("mx.example", false, &[], None);
        assert_eq!(r.result_type, Some(ResultType::StarttlsNotSupported));
        assert!(!r.passes());
    }

    #[test]
    fn insecure_and_bogus_facts() {
        let tlsa = answer(Security::Insecure, vec![(3, 1, 1, vec![1; 32])]);
        let r = assess(
            "mx.example",
            &facts(Security::Insecure, Security::Insecure, tlsa),
            MxDecision::NoPolicy,
        );
        assert!(!r.applies && r.skip.is_none() && r.passes());
        assert_eq!(r.address_dnssec, Some(Dnssec::Insecure));
        assert!(r.error.as_deref().unwrap().contains("not DNSSEC-signed"));
        // Judging a host DANE does not govern changes nothing.
        let mut same = r.clone();
        same.judge("mx.example", false, &[], None);
        assert_eq!(same, r);

        let bogus = answer(Security::Bogus("bad RRSIG".into()), vec![]);
        let r = assess(
            "mx.example",
            &facts(Security::Secure, Security::Secure, bogus),
            MxDecision::Allowed(Mode::Enforce),
        );
        assert!(!r.applies && !r.passes());
        assert_eq!(r.tlsa_dnssec, Some(Dnssec::Bogus));
        assert_eq!(r.result_type, Some(ResultType::DnssecInvalid));
        assert!(r.skip.as_deref().unwrap().contains("bad RRSIG"));

        let failed = Facts {
            mx_rrset: Ok(Security::Secure),
            address: Err("timed out".into()),
            tlsa: Ok(answer(Security::Secure, vec![])),
        };
        let r = assess("mx.example", &failed, MxDecision::NoPolicy);
        assert_eq!(r.address_dnssec, None);
        assert_eq!(r.skip.as_deref(), Some("address lookup failed: timed out"));
    }

    #[test]
    fn json_shape() {
        let tlsa = answer(Security::Secure, vec![(3, 1, 1, vec![0xab; 32])]);
        let r = assess(
            "mx.example",
            &facts(Security::Secure, Security::Secure, tlsa),
            MxDecision::NoPolicy,
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "mx_dnssec": "secure", "address_dnssec": "secure", "tlsa_dnssec": "secure",
                "tlsa_base": "mx.example", "tlsa": [format!("3 1 1 {}", "ab".repeat(32))],
                "usable": true, "applies": true, "skip": null, "match": null,
                "result_type": null, "error": null
            })
        );
        let lines = r.text_lines().join("\n");
        assert!(
            lines.contains("DNSSEC: MX secure, address secure, TLSA secure"),
            "{lines}"
        );
    }
}
