//! Which security policy governs a connection to one MX host when DANE (RFC 7672) and
//! MTA-STS (RFC 8461) may both apply — a pure decision over DNSSEC facts and the MTA-STS
//! verdict for the host.
//!
//! See [`mx_policy`] for the rules.

use super::tlsa::{SetStatus, TlsaSet};
use crate::sts::MxDecision;
use crate::tlsrpt::ResultType;

pub use crate::dns::Security;

/// What DNS said, with DNSSEC status, about one MX host of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxDnssec {
    /// The domain's MX RRset (and any CNAME leading to it); for a domain without MX
    /// records (implicit MX, RFC 5321 §5.1), the status of that denial.
    pub mx_rrset: Security,
    /// The host's A/AAAA records (after CNAME expansion).
    pub address: Security,
    /// The `_25._tcp.<TLSA base domain>` TLSA lookup; ignored unless `address` is secure.
    pub tlsa: Security,
    /// The TLSA RRset (empty for a denial); used only when `tlsa` is secure.
    pub records: TlsaSet,
}

/// Why an MX host is not used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    /// The domain's MX RRset is bogus: defer the whole domain (RFC 7672 §2.2.1).
    #[error("MX RRset failed DNSSEC validation: {0}")]
    MxRrsetBogus(String),
    /// The host's address records are bogus (RFC 7672 §2.2.3).
    #[error("address records failed DNSSEC validation: {0}")]
    AddressBogus(String),
    /// The host's TLSA records are bogus or could not be looked up (RFC 7672 §2.2).
    #[error("TLSA records failed DNSSEC validation: {0}")]
    TlsaBogus(String),
}

impl SkipReason {
    /// Does this skip every MX of the domain (defer the domain)?
    pub fn is_domain_wide(&self) -> bool {
        matches!(self, SkipReason::MxRrsetBogus(_))
    }

    /// RFC 8460 result type to report: `dnssec-invalid` (§4.3.2).
    pub fn result_type(&self) -> ResultType {
        ResultType::DnssecInvalid
    }

    /// Short `failure-reason-code`.
    pub fn reason_code(&self) -> &'static str {
        match self {
            SkipReason::MxRrsetBogus(_) => "dnssec-mx-bogus",
            SkipReason::AddressBogus(_) => "dnssec-address-bogus",
            SkipReason::TlsaBogus(_) => "dnssec-tlsa-bogus",
        }
    }
}

/// The policy for one connection to one MX host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxPolicy {
    /// DANE: STARTTLS mandatory, the DANE verifier built from these usable records
    /// decides; MTA-STS is not consulted. Report the session with policy type `tlsa`.
    Dane(TlsaSet),
    /// No DANE: behave as without DANE under this MTA-STS decision (the input, passed
    /// through); with `require_starttls`, a server without STARTTLS gets no mail even
    /// when MTA-STS would allow plain text (a secure TLSA RRset with no usable record).
    Sts {
        /// The MTA-STS verdict for this MX.
        decision: MxDecision,
        /// STARTTLS is mandatory regardless of `decision`.
        require_starttls: bool,
    },
    /// Do not use this MX (DNSSEC failure).
    Skip(SkipReason),
}

/// The policy for one MX host, from its DNSSEC facts and the MTA-STS verdict for it.
///
/// The rules, in the order [`mx_policy`] applies them:
///
/// 1. **Bogus MX RRset** (RFC 7672 §2.2.1): the MX hosts cannot be trusted, so the
///    domain is undeliverable for now — every MX is skipped and delivery is deferred
///    (a temporary failure; never a bounce, never a fallback to the address records).
/// 2. **Bogus address records** of the MX host (RFC 7672 §2.2.3): skip this MX.
/// 3. **Insecure address records**: DANE does not apply to this host (its TLSA records
///    are not even looked up, §2.2.3); MTA-STS decides as without DANE.
/// 4. **Bogus TLSA lookup** (validation failure, or a failed lookup in a signed zone,
///    §2.2): skip this MX — it may be one an attacker is keeping us from authenticating.
/// 5. **Insecure TLSA RRset** or a **secure denial** (no records): no DANE; MTA-STS
///    decides.
/// 6. **Secure TLSA RRset with no usable record** (§2.2, §3.1.3): DANE cannot
///    authenticate the server but says it does TLS, so STARTTLS becomes mandatory;
///    MTA-STS decides about the certificate.
/// 7. **Secure, usable TLSA records**: DANE governs the connection — STARTTLS is
///    mandatory and the [`DaneVerifier`](super::DaneVerifier) alone decides whether the
///    server is authentic; MTA-STS is not consulted for it. A DANE failure is never
///    rescued by MTA-STS (RFC 8461 §2: "senders who implement MTA-STS validation MUST
///    NOT allow MTA-STS Policy validation to override a failing DANE validation").
///
///    **CHOICE (DANE decides):** under an `enforce` MTA-STS policy, a server that passes
///    DANE but whose certificate is not WebPKI-valid for its name (self-signed, a private
///    CA, a `3 1 1` key with any name) gets the mail. DANE's DNSSEC-signed statement is
///    the stronger one; this is what Postfix's `dane` security level does, and what
///    RFC 8461 §2 intends: it forbids only the opposite direction (MTA-STS rescuing a
///    DANE failure), and a DANE success needs no WebPKI.
///
///    **CHOICE (MX names):** DANE also governs an MX that an `enforce` policy does not
///    list, provided the MX RRset itself was DNSSEC-secure: the domain's signed MX
///    records then authenticate the host name as well as the policy patterns would. When
///    the MX RRset was *insecure* (RFC 7672 §2.2.1 allows DANE for such hosts), the
///    host name is attacker-controllable, so the MTA-STS pattern check stands: such an
///    MX outside an `enforce` policy gets no mail.
///
/// ```
/// use stsrelay::dane::{mx_policy, MxDnssec, MxPolicy, Security, TlsaSet};
/// use stsrelay::sts::{Mode, MxDecision};
///
/// let tlsa = TlsaSet::from_raw([(3, 1, 1, vec![0xab; 32])]);
/// let facts = MxDnssec {
///     mx_rrset: Security::Secure,
///     address: Security::Secure,
///     tlsa: Security::Secure,
///     records: tlsa.clone(),
/// };
/// // DANE wins over an enforce policy, even for an MX the policy does not list.
/// assert_eq!(mx_policy(&facts, MxDecision::NotInPolicy(Mode::Enforce)), MxPolicy::Dane(tlsa));
///
/// // Insecure address records: no DANE, today's MTA-STS behaviour.
/// let insecure = MxDnssec { address: Security::Insecure, ..facts };
/// assert_eq!(
///     mx_policy(&insecure, MxDecision::Allowed(Mode::Enforce)),
///     MxPolicy::Sts { decision: MxDecision::Allowed(Mode::Enforce), require_starttls: false }
/// );
/// ```
pub fn mx_policy(dns: &MxDnssec, sts: MxDecision) -> MxPolicy {
    let no_dane = |require_starttls| MxPolicy::Sts {
        decision: sts,
        require_starttls,
    };
    if let Security::Bogus(why) = &dns.mx_rrset {
        return MxPolicy::Skip(SkipReason::MxRrsetBogus(why.clone()));
    }
    match &dns.address {
        Security::Bogus(why) => return MxPolicy::Skip(SkipReason::AddressBogus(why.clone())),
        Security::Insecure => return no_dane(false),
        Security::Secure => {}
    }
    match &dns.tlsa {
        Security::Bogus(why) => return MxPolicy::Skip(SkipReason::TlsaBogus(why.clone())),
        Security::Insecure => return no_dane(false),
        Security::Secure => {}
    }
    match dns.records.status() {
        SetStatus::Empty => no_dane(false),
        SetStatus::NoneUsable => no_dane(true),
        // An insecure MX RRset does not authenticate the host name: the policy's MX
        // patterns still decide whether this host may have the mail at all.
        SetStatus::Usable if !dns.mx_rrset.is_secure() && !sts.may_deliver() => no_dane(true),
        SetStatus::Usable => MxPolicy::Dane(dns.records.usable_set()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sts::Mode;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum S {
        Sec,
        Ins,
        Bog,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Content {
        Empty,
        NoneUsable,
        Usable,
    }

    /// What a decision-table row expects.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Want {
        SkipMx,
        SkipAddr,
        SkipTlsa,
        /// Sts { decision: input, require_starttls }
        Sts(bool),
        Dane,
    }

    fn sec(s: S, what: &str) -> Security {
        match s {
            S::Sec => Security::Secure,
            S::Ins => Security::Insecure,
            S::Bog => Security::Bogus(format!("{what} SERVFAIL")),
        }
    }

    fn usable_record() -> crate::dane::TlsaRecord {
        crate::dane::TlsaRecord::from_raw(3, 1, 1, vec![0x11; 32])
    }

    fn records(c: Content) -> TlsaSet {
        let unusable = crate::dane::TlsaRecord::from_raw(1, 1, 1, vec![0x22; 32]);
        match c {
            Content::Empty => TlsaSet::default(),
            Content::NoneUsable => TlsaSet::new(vec![unusable]),
            Content::Usable => TlsaSet::new(vec![unusable, usable_record()]),
        }
    }

    const STS: [MxDecision; 5] = [
        MxDecision::NoPolicy,
        MxDecision::Allowed(Mode::Testing),
        MxDecision::NotInPolicy(Mode::Testing),
        MxDecision::Allowed(Mode::Enforce),
        MxDecision::NotInPolicy(Mode::Enforce),
    ];

    /// The decision table, first matching row wins; `None` matches anything. Columns:
    /// MX RRset, address, TLSA, TLSA content, MTA-STS decision → expected.
    type Row = (
        Option<S>,
        Option<S>,
        Option<S>,
        Option<Content>,
        Option<MxDecision>,
        Want,
    );
    const TABLE: &[Row] = &[
        // RFC 7672 §2.2.1: bogus MX RRset → defer the domain.
        (Some(S::Bog), None, None, None, None, Want::SkipMx),
        // §2.2.3: bogus addresses → skip; insecure addresses → no DANE.
        (None, Some(S::Bog), None, None, None, Want::SkipAddr),
        (None, Some(S::Ins), None, None, None, Want::Sts(false)),
        // §2.2: bogus TLSA → skip; insecure TLSA or secure denial → no DANE.
        (None, None, Some(S::Bog), None, None, Want::SkipTlsa),
        (None, None, Some(S::Ins), None, None, Want::Sts(false)),
        (
            None,
            None,
            None,
            Some(Content::Empty),
            None,
            Want::Sts(false),
        ),
        // §2.2 / §3.1.3: only unusable records → STARTTLS mandatory, MTA-STS decides.
        (
            None,
            None,
            None,
            Some(Content::NoneUsable),
            None,
            Want::Sts(true),
        ),
        // Usable records, insecure MX RRset, MX outside an enforce policy → MTA-STS skips.
        (
            Some(S::Ins),
            None,
            None,
            Some(Content::Usable),
            Some(MxDecision::NotInPolicy(Mode::Enforce)),
            Want::Sts(true),
        ),
        // Usable records → DANE, whatever MTA-STS says.
        (None, None, None, Some(Content::Usable), None, Want::Dane),
    ];

    fn expected((mx, addr, tlsa, content, sts): (S, S, S, Content, MxDecision)) -> (usize, Want) {
        TABLE
            .iter()
            .enumerate()
            .find(|(_, (m, a, t, c, d, _))| {
                m.is_none_or(|m| m == mx)
                    && a.is_none_or(|a| a == addr)
                    && t.is_none_or(|t| t == tlsa)
                    && c.is_none_or(|c| c == content)
                    && d.is_none_or(|d| d == sts)
            })
            .map(|(i, row)| (i, row.5))
            .expect("the decision table covers every combination")
    }

    #[test]
    fn every_combination_follows_the_decision_table() {
        let levels = [S::Sec, S::Ins, S::Bog];
        let contents = [Content::Empty, Content::NoneUsable, Content::Usable];
        let mut rows_used = vec![0usize; TABLE.len()];
        let mut cases = 0;
        for mx in levels {
            for addr in levels {
                for tlsa in levels {
                    for content in contents {
                        for sts in STS {
                            let (row, want) = expected((mx, addr, tlsa, content, sts));
                            rows_used[row] += 1;
                            cases += 1;
                            let dns = MxDnssec {
                                mx_rrset: sec(mx, "MX"),
                                address: sec(addr, "A"),
                                tlsa: sec(tlsa, "TLSA"),
                                records: records(content),
                            };
                            let want = match want {
                                Want::SkipMx => {
                                    MxPolicy::Skip(SkipReason::MxRrsetBogus("MX SERVFAIL".into()))
                                }
                                Want::SkipAddr => {
                                    MxPolicy::Skip(SkipReason::AddressBogus("A SERVFAIL".into()))
                                }
                                Want::SkipTlsa => {
                                    MxPolicy::Skip(SkipReason::TlsaBogus("TLSA SERVFAIL".into()))
                                }
                                Want::Sts(require_starttls) => MxPolicy::Sts {
                                    decision: sts,
                                    require_starttls,
                                },
                                Want::Dane => MxPolicy::Dane(TlsaSet::new(vec![usable_record()])),
                            };
                            assert_eq!(
                                mx_policy(&dns, sts),
                                want,
                                "MX {mx:?}, address {addr:?}, TLSA {tlsa:?} {content:?}, STS {sts:?} (table row {row})"
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 3 * 3 * 3 * 3 * 5);
        assert!(
            rows_used.iter().all(|n| *n > 0),
            "dead table rows: {rows_used:?}"
        );
    }

    #[test]
    fn dane_is_never_downgraded_by_sts() {
        // RFC 8461 §2: whenever DANE applies, the outcome is DANE for every MTA-STS
        // verdict that may deliver — never an STS or opportunistic fallback.
        for mx in [Security::Secure, Security::Insecure] {
            for sts in STS.into_iter().filter(|d| d.may_deliver()) {
                let dns = MxDnssec {
                    mx_rrset: mx.clone(),
                    address: Security::Secure,
                    tlsa: Security::Secure,
                    records: records(Content::Usable),
                };
                assert!(
                    matches!(mx_policy(&dns, sts), MxPolicy::Dane(_)),
                    "{mx} {sts:?}"
                );
            }
        }
    }

    #[test]
    fn skip_reasons_report_dnssec_invalid() {
        let r = SkipReason::MxRrsetBogus("x".into());
        assert!(r.is_domain_wide());
        assert_eq!(r.result_type(), ResultType::DnssecInvalid);
        assert!(!SkipReason::TlsaBogus("y".into()).is_domain_wide());
        assert_eq!(
            SkipReason::AddressBogus("no RRSIG".into()).to_string(),
            "address records failed DNSSEC validation: no RRSIG"
        );
    }
}
