//! Socketmap replies and how a policy becomes one (pure functions, no I/O).
//!
//! # How MX patterns are rendered for Postfix
//!
//! Postfix's `secure` level accepts a server certificate that is trusted and carries a
//! DNS name matching one of the `match=` patterns: a plain name matches that name (or a
//! wildcard certificate covering it), and a name starting with `.` matches **any
//! depth** of subdomain (`.example.com` accepts a certificate for `a.b.example.com`).
//! RFC 8461 §4.1 lets `*.example.com` match exactly one extra label, and requires the
//! certificate to be valid for the MX host name, which must match the policy.
//!
//! PMSR renders `*.example.com` as `.example.com`, which accepts certificates for names
//! the policy does not allow (`a.b.example.com`, `other.example.com` presented by
//! `mx1.example.com`). stsrelay instead renders:
//! - an exact pattern (`mx1.example.com`) as itself;
//! - a wildcard pattern as the domain's MX hosts (from DNS, at query time) that it
//!   matches under RFC 8461 (one label); for a `[host]` next-hop, the host itself.
//!
//! So Postfix only accepts a certificate for an MX host that the policy permits. If no
//! MX host is permitted, the reply is `TEMP` and Postfix defers the mail (RFC 8461 §5:
//! no delivery to MX hosts outside an enforced policy). Residual difference to the RFC:
//! an in-policy MX presenting a certificate for *another* in-policy MX name is accepted
//! (Postfix has no "certificate names this MX and the MX matches the policy" test).

use super::zones::ZoneConfig;
use crate::sts::{CachedPolicy, Lookup, Mode, Policy};
use std::sync::Arc;

/// Postfix's default `socketmap_max_reply`: longer replies are refused by Postfix.
pub const MAX_REPLY: usize = 100_000;

/// A socketmap reply (socketmap_table(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OK data`.
    Ok(String),
    /// `NOTFOUND ` (with its trailing space, as Postfix and PMSR send it).
    NotFound,
    /// `TEMP reason`: Postfix defers the delivery.
    Temp(String),
}

impl Reply {
    /// The payload, before netstring framing.
    ///
    /// ```
    /// use stsrelay::socketmap::Reply;
    /// assert_eq!(Reply::NotFound.text(), "NOTFOUND ");
    /// assert_eq!(Reply::Ok("secure".into()).text(), "OK secure");
    /// ```
    pub fn text(&self) -> String {
        match self {
            Reply::Ok(data) => format!("OK {data}"),
            Reply::NotFound => "NOTFOUND ".to_string(),
            Reply::Temp(reason) => format!("TEMP {reason}"),
        }
    }

    /// Append the netstring-framed reply to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::NotFound => out.extend_from_slice(b"9:NOTFOUND ,"),
            other => super::netstring::encode(other.text().as_bytes(), out),
        }
    }
}

/// What the policy engine's answer means for Postfix, before MX names are known.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Deliver as without MTA-STS: `NOTFOUND `.
    NotFound,
    /// Require verified TLS under this policy (`enforce`, or `testing` in a
    /// `strict_testing` zone).
    Secure(Arc<CachedPolicy>),
}

/// Decide from the engine's lookup: no policy, `mode: none` or (unless
/// `strict_testing`) `testing` → `NOTFOUND `; otherwise secure. A failed fetch without a
/// cached policy has no policy (RFC 8461 §3.3, R19).
pub fn decide(lookup: &Lookup, zone: &ZoneConfig) -> Decision {
    match &lookup.policy {
        Some(p) => match p.policy.mode {
            Mode::Enforce => Decision::Secure(p.clone()),
            Mode::Testing if zone.strict_testing => Decision::Secure(p.clone()),
            Mode::Testing | Mode::None => Decision::NotFound,
        },
        None => Decision::NotFound,
    }
}

/// Does rendering this policy need the domain's MX hosts (has it a wildcard pattern)?
pub fn needs_mx_hosts(policy: &Policy) -> bool {
    policy.mx.iter().any(|p| p.is_wildcard())
}

/// The names for `match=`: exact patterns as they are, each wildcard pattern replaced
/// by the `mx_hosts` it matches (RFC 8461 §4.1: one label). `mx_hosts` is `None` when
/// they could not be resolved: wildcard patterns then contribute nothing. Order is
/// kept, duplicates dropped.
///
/// ```
/// use stsrelay::socketmap::match_names;
/// use stsrelay::sts::Policy;
/// let p = Policy::parse("version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 86400\n").unwrap();
/// let mx = ["mx1.example.net".to_string(), "a.b.example.net".to_string(), "mail.example.com".to_string()];
/// assert_eq!(match_names(&p, Some(&mx)), ["mail.example.com", "mx1.example.net"]);
/// assert_eq!(match_names(&p, None), ["mail.example.com"]);
/// ```
pub fn match_names(policy: &Policy, mx_hosts: Option<&[String]>) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(policy.mx.len());
    let mut push = |n: &str| {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    };
    for pattern in &policy.mx {
        if !pattern.is_wildcard() {
            push(pattern.domain());
        } else if let Some(hosts) = mx_hosts {
            for h in hosts.iter().filter(|h| pattern.matches(h)) {
                push(&h.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    names
}

/// The `OK secure …` reply for `domain` under `policy`, requiring a certificate for one
/// of `names` (non-empty; see [`match_names`]).
///
/// ```
/// use stsrelay::socketmap::{secure_reply, ZoneConfig};
/// use stsrelay::sts::Policy;
/// let p = Policy::parse("version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 86400\n").unwrap();
/// let names = vec!["mx1.example.com".to_string(), "mx2.example.com".to_string()];
/// assert_eq!(secure_reply("example.com", &p, &names, &ZoneConfig::default()).text(),
///            "OK secure match=mx1.example.com:mx2.example.com servername=hostname");
/// ```
pub fn secure_reply(domain: &str, policy: &Policy, names: &[String], zone: &ZoneConfig) -> Reply {
    let mut data = String::with_capacity(64);
    data.push_str("secure match=");
    data.push_str(&names.join(":"));
    if zone.require_sni {
        data.push_str(" servername=hostname");
    }
    if zone.tlsrpt {
        let base = data.len();
        data.push_str(" policy_type=sts policy_domain=");
        data.push_str(domain);
        for p in &policy.mx {
            data.push_str(" mx_host_pattern=");
            data.push_str(&p.to_string());
        }
        let attrs_end = data.len();
        for line in &policy.lines {
            match policy_string(line) {
                Some(s) => data.push_str(&s),
                None => tracing::debug!(%domain, line = %line,
                    "policy line left out of the TLSRPT attributes (unbalanced braces)"),
            }
        }
        if data.len() + 3 > MAX_REPLY {
            data.truncate(if attrs_end + 3 > MAX_REPLY {
                base
            } else {
                attrs_end
            });
        }
    }
    Reply::Ok(data)
}

/// ` { policy_string = LINE }`, or `None` when the line cannot be carried inside
/// Postfix's `{ }` quoting (unbalanced braces; no escape exists there).
fn policy_string(line: &str) -> Option<String> {
    let mut depth = 0i32;
    for c in line.chars() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth < 0 {
                    return None;
                }
            }
            '\r' | '\n' => return None,
            _ => {}
        }
    }
    (depth == 0).then(|| format!(" {{ policy_string = {} }}", line.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sts::Source;

    fn policy(body: &str) -> Policy {
        Policy::parse(body).unwrap()
    }

    fn lookup(body: Option<&str>) -> Lookup {
        Lookup {
            policy: body.map(|b| {
                Arc::new(CachedPolicy {
                    domain: "example.com".into(),
                    id: "1".into(),
                    policy: policy(b),
                    fetched_at: 0,
                })
            }),
            source: Source::Cache,
            fetch_error: None,
            record_error: None,
            fetched: false,
        }
    }

    const ENFORCE: &str =
        "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 604800\n";
    const TESTING: &str = "version: STSv1\nmode: testing\nmx: mx1.example.com\nmax_age: 604800\n";
    const NONE: &str = "version: STSv1\nmode: none\nmax_age: 604800\n";

    fn strict() -> ZoneConfig {
        ZoneConfig {
            strict_testing: true,
            ..ZoneConfig::default()
        }
    }

    #[test]
    fn decisions_by_mode_and_zone() {
        let z = ZoneConfig::default();
        assert!(matches!(
            decide(&lookup(Some(ENFORCE)), &z),
            Decision::Secure(_)
        ));
        assert!(matches!(
            decide(&lookup(Some(TESTING)), &z),
            Decision::NotFound
        ));
        assert!(matches!(
            decide(&lookup(Some(TESTING)), &strict()),
            Decision::Secure(_)
        ));
        assert!(matches!(
            decide(&lookup(Some(NONE)), &strict()),
            Decision::NotFound
        ));
        assert!(matches!(
            decide(&lookup(None), &strict()),
            Decision::NotFound
        ));
    }

    #[test]
    fn wildcards_match_one_label_of_the_mx_hosts() {
        let p = policy(ENFORCE);
        assert!(needs_mx_hosts(&p));
        let hosts: Vec<String> = [
            "mx1.example.net",
            "MX2.example.net",
            "a.b.example.net",
            "example.net",
            "mx.example.org",
            "mx1.example.net",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            match_names(&p, Some(&hosts)),
            ["mx1.example.com", "mx1.example.net", "mx2.example.net"]
        );
        let exact =
            policy("version: STSv1\nmode: enforce\nmx: a.example\nmx: A.example.\nmax_age: 1\n");
        assert!(!needs_mx_hosts(&exact));
        assert_eq!(match_names(&exact, None), ["a.example"]);
        let only_wild = policy("version: STSv1\nmode: enforce\nmx: *.example\nmax_age: 1\n");
        assert!(match_names(&only_wild, None).is_empty());
        assert!(match_names(&only_wild, Some(&["x.y.example".into()])).is_empty());
    }

    #[test]
    fn replies_render_exactly() {
        let p = policy(ENFORCE);
        let names = vec!["mx1.example.com".to_string(), "mx1.example.net".to_string()];
        assert_eq!(
            secure_reply("example.com", &p, &names, &ZoneConfig::default()).text(),
            "OK secure match=mx1.example.com:mx1.example.net servername=hostname"
        );
        let no_sni = ZoneConfig {
            require_sni: false,
            ..ZoneConfig::default()
        };
        assert_eq!(
            secure_reply("example.com", &p, &names, &no_sni).text(),
            "OK secure match=mx1.example.com:mx1.example.net"
        );
        let mut out = vec![];
        Reply::NotFound.encode(&mut out);
        Reply::Temp("no MX".into()).encode(&mut out);
        assert_eq!(out, b"9:NOTFOUND ,10:TEMP no MX,");
    }

    #[test]
    fn tlsrpt_attributes_follow_postfix_3_10() {
        let p = policy(
            "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 604800\next: a{b}c\nbad: x}y{\n",
        );
        let z = ZoneConfig {
            tlsrpt: true,
            ..ZoneConfig::default()
        };
        let r = secure_reply("example.com", &p, &["mx1.example.com".into()], &z).text();
        assert_eq!(
            r,
            "OK secure match=mx1.example.com servername=hostname policy_type=sts \
             policy_domain=example.com mx_host_pattern=mx1.example.com mx_host_pattern=*.example.net \
             { policy_string = version: STSv1 } { policy_string = mode: enforce } \
             { policy_string = mx: mx1.example.com } { policy_string = mx: *.example.net } \
             { policy_string = max_age: 604800 } { policy_string = ext: a{b}c }"
        );
    }

    #[test]
    fn oversize_tlsrpt_policy_strings_are_dropped_to_fit_postfix() {
        let mut body =
            String::from("version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 1\n");
        for i in 0..3000 {
            body.push_str(&format!("ext{i}: {}\n", "v".repeat(40)));
        }
        let z = ZoneConfig {
            tlsrpt: true,
            ..ZoneConfig::default()
        };
        let r = secure_reply(
            "example.com",
            &policy(&body),
            &["mx1.example.com".into()],
            &z,
        )
        .text();
        assert!(r.len() <= MAX_REPLY, "{}", r.len());
        assert!(r.ends_with("mx_host_pattern=mx1.example.com"), "{r}");
    }
}
