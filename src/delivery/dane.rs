//! DANE per MX host (RFC 7672): the DNSSEC facts of one MX (its MX RRset, its
//! addresses, its TLSA RRset) and what they decide with the MTA-STS verdict
//! ([`crate::dane::mx_policy`]): DANE, MTA-STS as without DANE, or skip the MX.

use crate::dane::{
    DanePolicy, DaneVerifier, MxDnssec, MxPolicy, ReferenceNames, Security, SkipReason, TlsaSet,
    mx_policy,
};
use crate::dns::Resolver;
use crate::sts::MxDecision;
use crate::tls::TrustStore;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// At most this many DANE client configs are kept (then the cache starts over).
const CONFIGS_KEPT: usize = 1024;

/// (MX host, TLSA base domain, the usable records in presentation form).
type ConfigKey = (String, String, Vec<String>);

/// rustls configs for DANE hosts, by [`ConfigKey`]: built once per RRset rather than
/// per attempt, and each keeps its TLS session cache, so later sessions with the same
/// host can resume.
#[derive(Default)]
pub(super) struct ConfigCache(Mutex<HashMap<ConfigKey, Arc<rustls::ClientConfig>>>);

impl ConfigCache {
    fn get_or_build(
        &self,
        host: &str,
        base: &str,
        set: &TlsaSet,
        trust: &TrustStore,
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let key = (host.to_string(), base.to_string(), set.presentation());
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let config = ReferenceNames::new(host, base)
            .and_then(|names| DaneVerifier::new(set, names, trust.provider().clone()))
            .map_err(|e| e.to_string())
            .and_then(|v| v.client_config().map_err(|e| e.to_string()))?;
        if map.len() >= CONFIGS_KEPT {
            map.clear();
        }
        map.insert(key, config.clone());
        Ok(config)
    }
}

/// An MX host authenticated by DANE: what the session needs.
pub(super) struct DaneHop {
    /// The TLSA base domain: SNI and the DANE-TA reference name, and the TLS-RPT
    /// policy domain of the session.
    pub base: String,
    /// TLS-RPT policy fields (`tlsa`, the records).
    pub policy: DanePolicy,
    /// A rustls config whose verifier accepts only what the usable records match.
    pub config: Arc<rustls::ClientConfig>,
}

/// What to do with one MX host.
pub(super) enum Plan {
    /// DANE decides; STARTTLS is mandatory.
    Dane { hop: DaneHop, ips: Vec<IpAddr> },
    /// No DANE: the MTA-STS decision applies (with STARTTLS mandatory when the
    /// TLSA RRset is secure but has no usable record). `ips` when already looked up.
    Sts {
        decision: MxDecision,
        require_starttls: bool,
        ips: Option<Vec<IpAddr>>,
    },
    /// DNSSEC failed for this host: do not use it.
    Skip {
        reason: SkipReason,
        /// The TLSA base domain (the host), for the TLS-RPT record.
        base: String,
    },
}

/// Look up the DNSSEC facts of `host` (from an MX RRset of status `mx_rrset`) and
/// decide. `Err` is a temporary DNS failure of the address lookup (try the next MX).
pub(super) async fn plan(
    dns: &Resolver,
    trust: &TrustStore,
    configs: &ConfigCache,
    port: u16,
    mx_rrset: &Security,
    host: &str,
    decision: MxDecision,
) -> Result<Plan, String> {
    let (address, ips) = dns
        .ips_validated(host)
        .await
        .map_err(|e| format!("451 4.4.3 {e}"))?;
    // RFC 7672 §2.2.2: TLSA records only for hosts whose addresses are secure.
    let (tlsa, records, base) = if address.is_secure() {
        match dns.tlsa(port, host).await {
            Ok(t) => (
                t.security,
                TlsaSet::from_raw(t.records),
                t.base_domain.trim_end_matches('.').to_ascii_lowercase(),
            ),
            // A failed lookup in a signed zone is indeterminate: the MX is not used.
            Err(e) => (
                Security::Bogus(format!("TLSA lookup failed: {e}")),
                TlsaSet::default(),
                host.to_string(),
            ),
        }
    } else {
        (Security::Insecure, TlsaSet::default(), host.to_string())
    };
    let facts = MxDnssec {
        mx_rrset: mx_rrset.clone(),
        address,
        tlsa,
        records,
    };
    Ok(match mx_policy(&facts, decision) {
        MxPolicy::Skip(reason) => Plan::Skip { reason, base },
        MxPolicy::Sts {
            decision,
            require_starttls,
        } => Plan::Sts {
            decision,
            require_starttls,
            ips: Some(ips),
        },
        MxPolicy::Dane(set) => {
            let policy = DanePolicy::new(&base, &facts.records);
            match configs.get_or_build(host, &base, &set, trust) {
                Ok(config) => Plan::Dane {
                    hop: DaneHop {
                        base,
                        policy,
                        config,
                    },
                    ips,
                },
                // Usable records that cannot be turned into a verifier (a name that is
                // not a DNS name): the MX cannot be authenticated, so it is not used.
                Err(e) => Plan::Skip {
                    reason: SkipReason::TlsaBogus(format!("cannot use the TLSA records: {e}")),
                    base,
                },
            }
        }
    })
}
