//! A socketmap request (`NAME KEY`) and the normalisation of its key into the policy
//! domain to look up, the way postfix-mta-sts-resolver does it.

use crate::sts::normalize_host;

/// One request: the map name Postfix was configured with and the lookup key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The socketmap name (`postfix` in `socketmap:inet:127.0.0.1:8461:postfix`); it
    /// selects the zone.
    pub name: &'a str,
    /// The key as sent (a next-hop: `example.com`, `[mx.example.com]:25`, …).
    pub key: &'a str,
}

impl<'a> Request<'a> {
    /// Split a request payload at its first space. Without a space the whole payload is
    /// the name and the key is empty (PMSR does the same). `None` if it is not UTF-8.
    ///
    /// ```
    /// use stsrelay::socketmap::Request;
    /// let r = Request::parse(b"postfix example.com").unwrap();
    /// assert_eq!((r.name, r.key), ("postfix", "example.com"));
    /// assert!(Request::parse(b"postfix \xff").is_none());
    /// ```
    pub fn parse(payload: &'a [u8]) -> Option<Request<'a>> {
        let text = std::str::from_utf8(payload).ok()?;
        let (name, key) = text.split_once(' ').unwrap_or((text, ""));
        Some(Request { name, key })
    }
}

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A domain to look the policy up for: lowercase A-label, no trailing dot.
    Domain {
        /// The policy domain.
        domain: String,
        /// The key was `[host]` (Postfix connects to that host, no MX lookup).
        bracketed: bool,
    },
    /// Not a policy domain: empty, a parent-domain key (`.example.com`), an IP
    /// literal, or not a valid host name. Always answered `NOTFOUND `.
    NotADomain,
}

/// Normalise a lookup key as PMSR does: `[host]` and `[host]:port` give `host`,
/// `host:port` gives `host`; lowercase; surrounding whitespace and one trailing dot are
/// dropped. Keys that start with `.` (Postfix's parent-domain lookups; RFC 8461 §4.1
/// never applies a parent's policy) and IP literals are not domains. U-labels become
/// A-labels (RFC 8461 §4.1 compares A-labels).
///
/// ```
/// use stsrelay::socketmap::{normalize_key, Key};
/// assert_eq!(normalize_key("[MX.Example.COM.]:25"),
///            Key::Domain { domain: "mx.example.com".into(), bracketed: true });
/// assert_eq!(normalize_key("example.com:587"),
///            Key::Domain { domain: "example.com".into(), bracketed: false });
/// assert_eq!(normalize_key(".example.com"), Key::NotADomain);
/// assert_eq!(normalize_key("[192.0.2.1]"), Key::NotADomain);
/// ```
pub fn normalize_key(key: &str) -> Key {
    let (host, bracketed) = match key.split_once(']') {
        Some((inner, _port)) => (inner.trim_start_matches('['), true),
        // `host:port`; an IPv6 literal without brackets is cut here too, and its
        // remains are not a host name either.
        None => (key.rsplit_once(':').map_or(key, |(h, _)| h), false),
    };
    let host = host.trim();
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.starts_with('.') || is_ip_literal(host) {
        return Key::NotADomain;
    }
    match normalize_host(host) {
        Ok(domain) => Key::Domain { domain, bracketed },
        Err(_) => Key::NotADomain,
    }
}

fn is_ip_literal(host: &str) -> bool {
    let host = host.strip_prefix("IPv6:").unwrap_or(host);
    host.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(d: &str, bracketed: bool) -> Key {
        Key::Domain {
            domain: d.into(),
            bracketed,
        }
    }

    #[test]
    fn keys_are_normalised_like_pmsr() {
        assert_eq!(normalize_key("example.com"), domain("example.com", false));
        assert_eq!(normalize_key("Example.COM."), domain("example.com", false));
        assert_eq!(normalize_key(" example.com "), domain("example.com", false));
        assert_eq!(
            normalize_key("example.com:25"),
            domain("example.com", false)
        );
        assert_eq!(
            normalize_key("[mx.example.com]"),
            domain("mx.example.com", true)
        );
        assert_eq!(
            normalize_key("[mx.example.com]:2525"),
            domain("mx.example.com", true)
        );
        assert_eq!(
            normalize_key("bücher.example"),
            domain("xn--bcher-kva.example", false)
        );
    }

    #[test]
    fn non_domains_are_not_looked_up() {
        for k in [
            "",
            ".",
            ".example.com",
            "[.example.com]",
            "192.0.2.1",
            "[192.0.2.1]",
            "[192.0.2.1]:25",
            "[IPv6:2001:db8::1]",
            "[2001:db8::1]",
            "2001:db8::1",
            "exa mple.com",
            "-bad-.example",
            "a..b",
            "under_score.example",
            "[",
            "]",
            ":",
        ] {
            assert_eq!(normalize_key(k), Key::NotADomain, "{k:?}");
        }
    }

    #[test]
    fn request_split() {
        let r = Request::parse(b"strict a.example").unwrap();
        assert_eq!((r.name, r.key), ("strict", "a.example"));
        let r = Request::parse(b"postfix").unwrap();
        assert_eq!((r.name, r.key), ("postfix", ""));
        let r = Request::parse(b"postfix  a.example").unwrap();
        assert_eq!((r.name, r.key), ("postfix", " a.example"));
        assert!(Request::parse(&[0xc3, 0x28]).is_none());
    }
}
