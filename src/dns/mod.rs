//! DNS through hickory-resolver, with the nameservers from `[dns]` or the system's.
//!
//! Two hickory resolvers share the nameservers and timeout:
//!
//! * the plain one answers [`Resolver::txt`], [`Resolver::mx`] and [`Resolver::ips`]
//!   (MTA-STS, TLS-RPT, delivery) without DNSSEC, so a broken signature chain never
//!   affects them;
//! * the validating one (DNSSEC, trust anchor per [`TrustAnchor`]) answers only the DANE lookups
//!   ([`Resolver::mx_validated`], [`Resolver::ips_validated`], [`Resolver::tlsa`]),
//!   each labelled [`Security::Secure`], [`Security::Insecure`] or [`Security::Bogus`].

mod dnssec;
mod tlsa;

pub use dnssec::{Security, TrustAnchor, TrustAnchorError};
pub use tlsa::{TlsaAnswer, TlsaRecord};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// RFC 5321 §4.1.2 `Domain` syntax: dot-separated LDH labels (1-63 octets, starting and
/// ending with a letter or digit), at most 253 octets; no trailing dot.
///
/// ```
/// assert!(stsrelay::dns::is_ldh_domain("mx1.example.com"));
/// assert!(!stsrelay::dns::is_ldh_domain("-mx.example.com"));
/// assert!(!stsrelay::dns::is_ldh_domain("a..b"));
/// ```
pub fn is_ldh_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

/// A DNS failure that is not "no such record": SERVFAIL, timeout, refused, bad name.
#[derive(Debug, Clone, thiserror::Error)]
#[error("DNS lookup of {name} ({rtype}) failed: {reason}")]
pub struct DnsError {
    /// The queried name.
    pub name: String,
    /// The queried type.
    pub rtype: &'static str,
    /// What went wrong.
    pub reason: String,
}

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mx {
    /// Preference (lower first).
    pub preference: u16,
    /// Exchange host, lowercase, no trailing dot.
    pub host: String,
}

/// The answer to an MX query (RFC 5321 §5.1, RFC 7505).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxAnswer {
    /// MX records, sorted by preference.
    Hosts(Vec<Mx>),
    /// No MX records: the domain itself is the implicit MX.
    Implicit,
    /// A null MX (`0 .`): the domain accepts no mail.
    Null,
    /// The domain does not exist.
    NxDomain,
}

impl MxAnswer {
    /// The answer made of the MX records among `records` (others are ignored).
    fn from_records(records: &[Record]) -> MxAnswer {
        let mut mxs: Vec<Mx> = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some(Mx {
                    preference: mx.preference,
                    host: mx
                        .exchange
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                }),
                _ => None,
            })
            .collect();
        if mxs.is_empty() {
            return MxAnswer::Implicit;
        }
        if mxs.len() == 1 && mxs[0].host.is_empty() {
            return MxAnswer::Null;
        }
        mxs.retain(|m| !m.host.is_empty());
        mxs.sort_by_key(|m| m.preference);
        MxAnswer::Hosts(mxs)
    }
}

/// The resolver every part uses. Cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<TokioResolver>,
    /// The DNSSEC-validating resolver for the DANE lookups; `None` when DNSSEC is off
    /// (`dns.dnssec = false`), and every validated lookup is then [`Security::Insecure`].
    validating: Option<Arc<TokioResolver>>,
    /// A zone of the trust anchor, whose DNSKEY must validate ([`Resolver::dnssec_selfcheck`]).
    anchor_zone: Option<String>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("dnssec", &self.validating.is_some())
            .finish()
    }
}

/// A hickory resolver on `nameservers` (the system's when empty), validating DNSSEC
/// against `anchor` when given.
fn build(
    nameservers: &[SocketAddr],
    timeout: Duration,
    anchor: Option<&TrustAnchor>,
) -> Result<TokioResolver, DnsError> {
    let err = |e: NetError| DnsError {
        name: "<resolver configuration>".into(),
        rtype: "-",
        reason: e.to_string(),
    };
    let provider = TokioRuntimeProvider::default();
    let mut builder = if nameservers.is_empty() {
        TokioResolver::builder(provider).map_err(err)?
    } else {
        let servers = nameservers
            .iter()
            .map(|sa| {
                let mut udp = ConnectionConfig::udp();
                udp.port = sa.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = sa.port();
                NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], servers),
            provider,
        )
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = timeout;
    opts.attempts = 2;
    opts.ndots = 0;
    if let Some(anchor) = anchor {
        // The builder's trust anchor (not `ResolverOpts::trust_anchor`, which hickory
        // 0.26 ignores here) also switches validation on.
        opts.validate = true;
        // CNAMEs stay in the answer, so their proofs count (RFC 7672 §2.2.3).
        opts.preserve_intermediates = true;
        builder = builder.with_trust_anchor(anchor.anchors());
    }
    builder.build().map_err(err)
}

impl Resolver {
    /// Build a resolver: `nameservers` as `ip:port` (UDP and TCP), or the system's
    /// configuration when empty. DNSSEC is off: the validated lookups answer
    /// [`Security::Insecure`] (see [`Resolver::with_dnssec`]).
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Resolver, DnsError> {
        Ok(Resolver {
            inner: Arc::new(build(nameservers, timeout, None)?),
            validating: None,
            anchor_zone: None,
        })
    }

    /// Like [`Resolver::new`], plus a DNSSEC-validating resolver (same nameservers)
    /// for the DANE lookups, trusting `anchor`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use stsrelay::dns::{Resolver, TrustAnchor};
    /// let ns = ["127.0.0.1:53".parse().unwrap()];
    /// let r = Resolver::with_dnssec(&ns, std::time::Duration::from_secs(1), &TrustAnchor::builtin())
    ///     .unwrap();
    /// assert!(r.dnssec_enabled());
    /// assert!(!Resolver::new(&ns, std::time::Duration::from_secs(1)).unwrap().dnssec_enabled());
    /// # }
    /// ```
    pub fn with_dnssec(
        nameservers: &[SocketAddr],
        timeout: Duration,
        anchor: &TrustAnchor,
    ) -> Result<Resolver, DnsError> {
        Ok(Resolver {
            inner: Arc::new(build(nameservers, timeout, None)?),
            validating: Some(Arc::new(build(nameservers, timeout, Some(anchor))?)),
            anchor_zone: anchor.zones().first().cloned(),
        })
    }

    /// Does this resolver validate DNSSEC for the DANE lookups?
    pub fn dnssec_enabled(&self) -> bool {
        self.validating.is_some()
    }

    /// From the `[dns]` section of a config: `dns.nameservers`, `dns.timeout_secs`,
    /// and DNSSEC per `dns.dnssec` with `dns.trust_anchor` (default: the root's keys
    /// built into hickory).
    pub fn from_config(cfg: &crate::Config) -> Result<Resolver, DnsError> {
        let (ns, timeout) = (&cfg.dns.nameservers, cfg.dns_timeout());
        if !cfg.dns.dnssec {
            tracing::debug!("DNSSEC off (dns.dnssec = false): DANE lookups are insecure");
            return Resolver::new(ns, timeout);
        }
        let anchor = match &cfg.dns.trust_anchor {
            Some(path) => TrustAnchor::from_file(path).map_err(|e| DnsError {
                name: "<resolver configuration>".into(),
                rtype: "-",
                reason: format!("dns.trust_anchor: {e}"),
            })?,
            None => TrustAnchor::builtin(),
        };
        tracing::debug!(trust_anchor = %anchor, "DNSSEC validation for DANE lookups");
        Resolver::with_dnssec(ns, timeout, &anchor)
    }

    fn fqdn(name: &str) -> String {
        if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        }
    }

    fn failure(name: &str, rtype: &'static str, e: &NetError) -> DnsError {
        DnsError {
            name: name.to_string(),
            rtype,
            reason: e.to_string(),
        }
    }

    /// TXT records at `name`, each with its character-strings joined without a separator
    /// (RFC 8461 §3.1, R4). CNAMEs are followed. No records (or NXDOMAIN) is `Ok(vec![])`.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        match self.inner.lookup(Self::fqdn(name), RecordType::TXT).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() => Ok(vec![]),
            Err(e) => Err(Self::failure(name, "TXT", &e)),
        }
    }

    /// MX records of `domain` in preference order (equal preferences keep DNS order).
    pub async fn mx(&self, domain: &str) -> Result<MxAnswer, DnsError> {
        match self.inner.lookup(Self::fqdn(domain), RecordType::MX).await {
            Ok(lookup) => Ok(MxAnswer::from_records(lookup.answers())),
            Err(e) if e.is_nx_domain() => Ok(MxAnswer::NxDomain),
            Err(e) if e.is_no_records_found() => Ok(MxAnswer::Implicit),
            Err(e) => Err(Self::failure(domain, "MX", &e)),
        }
    }

    /// IPv4 and IPv6 addresses of `host`. No addresses is `Ok(vec![])`.
    pub async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        match self.inner.lookup_ip(Self::fqdn(host)).await {
            Ok(l) => Ok(l.iter().collect()),
            Err(e) if e.is_no_records_found() => Ok(vec![]),
            Err(e) => Err(Self::failure(host, "A/AAAA", &e)),
        }
    }
}

/// TXT lookups, the one DNS query the policy engine makes. [`Resolver`] implements
/// it; a custom MTA may supply its own.
#[async_trait::async_trait]
pub trait TxtLookup: Send + Sync {
    /// TXT records at `name`, each record's strings joined without separator;
    /// `Ok(vec![])` when there are none.
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError>;
}

#[async_trait::async_trait]
impl TxtLookup for Resolver {
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        Resolver::txt(self, name).await
    }
}

/// Lets reqwest resolve the policy host through the same resolver (and nameservers).
impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let ips = this.ips(&host).await?;
            if ips.is_empty() {
                return Err(format!("{host} has no A or AAAA records").into());
            }
            let addrs: reqwest::dns::Addrs =
                Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}
