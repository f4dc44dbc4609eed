//! DANE (RFC 7672) in socketmap replies: when a next hop's MX hosts have DNSSEC-secure,
//! usable TLSA records, the reply hands the decision to Postfix's own DANE
//! (`dane-only` or `dane`) instead of an MTA-STS `secure` answer, which would skip the
//! DANE check and so let a WebPKI-valid certificate override a TLSA mismatch — what
//! RFC 8461 §2 forbids.
//!
//! [`dane_decision`] is the rule (pure); [`DaneLookup`] gathers the DNSSEC facts
//! ([`DnssecLookup`] with stsrelay's validating resolver).
//!
//! Postfix applies its `dane` and `dane-only` levels per MX host
//! (`smtp_tls_policy.c`, `dane_init`): a host from an insecure MX RRset, without TLSA
//! records, or with only unusable ones is "not DANE"; `dane` then uses opportunistic
//! TLS for it (`encrypt` for unusable records), `dane-only` does not use it at all. A
//! failed TLSA lookup defers that host under both. So:
//!
//! | next hop | MTA-STS policy applies | no MTA-STS policy |
//! |---|---|---|
//! | every MX host DANE (or DNSSEC-bogus) | `OK dane-only` | `OK dane-only` |
//! | some MX hosts DANE, others not | `OK dane-only` (the others get no mail) | `OK dane` (the others: opportunistic TLS, as RFC 7672 says) |
//! | MX RRset bogus | `OK dane-only` (Postfix defers) | `OK dane-only` |
//! | no DANE host, insecure MX RRset, DNSSEC off | the MTA-STS reply | the MTA-STS reply |

use crate::dane::{MxDnssec, MxPolicy, TlsaRecord, TlsaSet, mx_policy};
use crate::dns::{DnsError, MxAnswer, Resolver, Security};
use crate::sts::MxDecision;

/// Most MX hosts of one next hop examined; hosts past it count as not DANE (which can
/// only make the reply `dane` instead of `dane-only` without MTA-STS).
pub const MAX_DANE_HOSTS: usize = 10;

/// How DANE bears on one MX host (for Postfix's per-host DANE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostDane {
    /// Secure address and secure, usable TLSA records: authenticated by DANE.
    Dane,
    /// Its address or TLSA records failed DNSSEC validation: a DANE client skips it.
    Bogus,
    /// No DANE: insecure address or TLSA, no TLSA records, or none usable.
    NotDane,
}

impl HostDane {
    /// Classify from the DNSSEC facts of a host on a secure MX RRset ([`mx_policy`]).
    ///
    /// ```
    /// use stsrelay::dane::TlsaSet;
    /// use stsrelay::dns::Security;
    /// use stsrelay::socketmap::dane::HostDane;
    /// let usable = TlsaSet::from_raw([(3, 1, 1, vec![1; 32])]);
    /// assert_eq!(HostDane::classify(Security::Secure, Security::Secure, usable.clone()), HostDane::Dane);
    /// assert_eq!(HostDane::classify(Security::Insecure, Security::Secure, usable), HostDane::NotDane);
    /// ```
    pub fn classify(address: Security, tlsa: Security, records: TlsaSet) -> HostDane {
        let facts = MxDnssec {
            mx_rrset: Security::Secure,
            address,
            tlsa,
            records,
        };
        match mx_policy(&facts, MxDecision::NoPolicy) {
            MxPolicy::Dane(_) => HostDane::Dane,
            MxPolicy::Skip(_) => HostDane::Bogus,
            MxPolicy::Sts { .. } => HostDane::NotDane,
        }
    }

    fn protected(self) -> bool {
        self != HostDane::NotDane
    }
}

/// The DNSSEC facts of one next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHopDane {
    /// DNSSEC is off, or the MX RRset is insecure: Postfix's DANE does not apply
    /// ("non DNSSEC destination").
    NotApplicable,
    /// The MX RRset failed DNSSEC validation (RFC 7672 §2.2.1: defer).
    MxBogus(String),
    /// A secure MX RRset (or a `[host]` next hop): its hosts in preference order.
    Hosts {
        /// Host name and its DANE status.
        hosts: Vec<(String, HostDane)>,
        /// False when there were more than [`MAX_DANE_HOSTS`] (the rest not examined).
        complete: bool,
    },
}

/// What the socketmap replies on DANE's account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaneDecision {
    /// DANE plays no part: reply from MTA-STS as without DANE.
    Sts,
    /// `OK dane-only`: Postfix uses only MX hosts it authenticates by DANE.
    DaneOnly,
    /// `OK dane`: DANE for the hosts with TLSA records, opportunistic TLS for the rest.
    Dane,
}

/// The reply rule (see the module table). `sts_applies`: an MTA-STS policy requires
/// verified TLS for the domain (`enforce`, or `testing` in a `strict_testing` zone).
///
/// Why `dane-only` in the mixed case under MTA-STS: `secure` would make Postfix skip
/// DANE on the DANE hosts (a TLSA mismatch with a WebPKI-valid certificate would be
/// delivered: MTA-STS overriding a DANE failure, RFC 8461 §2), and `dane` would send to
/// the other hosts with opportunistic TLS (losing the policy's enforcement). `dane-only`
/// weakens neither; the cost is that the non-DANE hosts get no mail from Postfix.
///
/// ```
/// use stsrelay::socketmap::dane::{dane_decision, DaneDecision, HostDane, NextHopDane};
/// let mixed = NextHopDane::Hosts {
///     hosts: vec![("mx1.example".into(), HostDane::Dane), ("mx2.example".into(), HostDane::NotDane)],
///     complete: true,
/// };
/// assert_eq!(dane_decision(&mixed, true), DaneDecision::DaneOnly);
/// assert_eq!(dane_decision(&mixed, false), DaneDecision::Dane);
/// assert_eq!(dane_decision(&NextHopDane::NotApplicable, true), DaneDecision::Sts);
/// ```
pub fn dane_decision(dane: &NextHopDane, sts_applies: bool) -> DaneDecision {
    match dane {
        NextHopDane::NotApplicable => DaneDecision::Sts,
        NextHopDane::MxBogus(_) => DaneDecision::DaneOnly,
        NextHopDane::Hosts { hosts, complete } => {
            let protected = hosts.iter().filter(|(_, d)| d.protected()).count();
            if protected == 0 {
                DaneDecision::Sts
            } else if (protected == hosts.len() && *complete) || sts_applies {
                DaneDecision::DaneOnly
            } else {
                DaneDecision::Dane
            }
        }
    }
}

/// The DNSSEC facts of a next hop. [`DnssecLookup`] implements it with the validating
/// resolver; embedders and tests may supply their own.
#[async_trait::async_trait]
pub trait DaneLookup: Send + Sync {
    /// Facts for `domain` (a `[host]` next hop when `bracketed`: the host itself, no
    /// MX lookup). An error is a DNS failure (not a validation failure).
    async fn next_hop(&self, domain: &str, bracketed: bool) -> Result<NextHopDane, DnsError>;
}

/// [`DaneLookup`] through stsrelay's [`Resolver`]: the MX RRset, each host's addresses
/// and its TLSA records at `_PORT._tcp.<host>` (CNAME-expanded), all validated.
#[derive(Debug, Clone)]
pub struct DnssecLookup {
    resolver: Resolver,
    port: u16,
}

impl DnssecLookup {
    /// Lookups with `resolver` for MX hosts on `port` (`delivery.port`, 25).
    pub fn new(resolver: Resolver, port: u16) -> DnssecLookup {
        DnssecLookup { resolver, port }
    }

    /// One host: its addresses, then (RFC 7672 §2.2.2: only when they are secure; the
    /// servers of unsigned zones often mishandle TLSA queries) its TLSA records. A
    /// failed TLSA lookup makes the host bogus (a DANE client skips it), not the next
    /// hop's answer `TEMP`.
    async fn host(&self, host: String) -> Result<(String, HostDane), DnsError> {
        let (address, _) = self.resolver.ips_validated(&host).await?;
        if !address.is_secure() {
            let dane = HostDane::classify(address, Security::Insecure, TlsaSet::default());
            return Ok((host, dane));
        }
        let (tlsa, records) = match self.resolver.tlsa(self.port, &host).await {
            Ok(t) => (
                t.security,
                t.records
                    .into_iter()
                    .map(|(u, s, m, d)| TlsaRecord::from_raw(u, s, m, d))
                    .collect(),
            ),
            Err(e) => (
                Security::Bogus(format!("TLSA lookup failed: {e}")),
                TlsaSet::default(),
            ),
        };
        Ok((host, HostDane::classify(address, tlsa, records)))
    }
}

#[async_trait::async_trait]
impl DaneLookup for DnssecLookup {
    async fn next_hop(&self, domain: &str, bracketed: bool) -> Result<NextHopDane, DnsError> {
        if !self.resolver.dnssec_enabled() {
            return Ok(NextHopDane::NotApplicable);
        }
        let hosts: Vec<String> = if bracketed {
            vec![domain.to_string()]
        } else {
            let (security, answer) = self.resolver.mx_validated(domain).await?;
            match security {
                Security::Bogus(why) => return Ok(NextHopDane::MxBogus(why)),
                Security::Insecure => return Ok(NextHopDane::NotApplicable),
                Security::Secure => {}
            }
            match answer {
                MxAnswer::Hosts(v) => v.into_iter().map(|m| m.host).collect(),
                MxAnswer::Implicit => vec![domain.to_string()],
                MxAnswer::Null | MxAnswer::NxDomain => vec![],
            }
        };
        let complete = hosts.len() <= MAX_DANE_HOSTS;
        let lookups = hosts.into_iter().take(MAX_DANE_HOSTS).map(|h| self.host(h));
        let hosts = futures_util::future::join_all(lookups)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NextHopDane::Hosts { hosts, complete })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[HostDane], complete: bool) -> NextHopDane {
        NextHopDane::Hosts {
            hosts: list
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("mx{i}.example"), *d))
                .collect(),
            complete,
        }
    }

    #[test]
    fn the_reply_table() {
        use DaneDecision::{DaneOnly, Sts};
        use HostDane::{Bogus, Dane, NotDane};
        const DANE: DaneDecision = DaneDecision::Dane;
        let cases: &[(NextHopDane, bool, DaneDecision)] = &[
            (NextHopDane::NotApplicable, true, Sts),
            (NextHopDane::NotApplicable, false, Sts),
            (NextHopDane::MxBogus("x".into()), false, DaneOnly),
            (NextHopDane::MxBogus("x".into()), true, DaneOnly),
            (hosts(&[], true), true, Sts),
            (hosts(&[NotDane, NotDane], true), true, Sts),
            (hosts(&[NotDane], true), false, Sts),
            (hosts(&[Dane, Dane], true), false, DaneOnly),
            (hosts(&[Dane, Bogus], true), true, DaneOnly),
            (hosts(&[Bogus], true), false, DaneOnly),
            (hosts(&[Dane, NotDane], true), true, DaneOnly),
            (hosts(&[NotDane, Dane], true), false, DANE),
            (hosts(&[Bogus, NotDane], true), false, DANE),
            // Hosts past the limit were not examined: not known to be DANE.
            (hosts(&[Dane, Dane], false), false, DANE),
            (hosts(&[Dane, Dane], false), true, DaneOnly),
        ];
        for (facts, sts, want) in cases {
            assert_eq!(dane_decision(facts, *sts), *want, "{facts:?} sts={sts}");
        }
    }

    #[test]
    fn hosts_classify_like_the_relay() {
        let usable = TlsaSet::from_raw([(2, 0, 1, vec![9; 32])]);
        let unusable = TlsaSet::from_raw([(1, 1, 1, vec![9; 32])]);
        let bogus = || Security::Bogus("bad".into());
        use HostDane::*;
        let c = HostDane::classify;
        assert_eq!(c(Security::Secure, Security::Secure, usable.clone()), Dane);
        assert_eq!(c(Security::Secure, Security::Secure, unusable), NotDane);
        assert_eq!(
            c(Security::Secure, Security::Secure, TlsaSet::default()),
            NotDane
        );
        assert_eq!(
            c(Security::Secure, Security::Insecure, usable.clone()),
            NotDane
        );
        assert_eq!(c(Security::Insecure, bogus(), usable.clone()), NotDane);
        assert_eq!(c(bogus(), Security::Secure, usable.clone()), Bogus);
        assert_eq!(c(Security::Secure, bogus(), TlsaSet::default()), Bogus);
    }
}
