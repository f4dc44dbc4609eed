//! The MTA-STS policy file (RFC 8461 §3.2) and MX host matching (§4.1).

use crate::dns::is_ldh_domain;
use std::fmt;

/// The largest `max_age` RFC 8461 §3.2 allows (365.25 days); larger values are clamped (R25).
pub const MAX_AGE_LIMIT: u32 = 31_557_600;

/// Policy mode (RFC 8461 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to MX hosts that match and present a valid certificate.
    Enforce,
    /// Deliver as usual, but report failures.
    Testing,
    /// The domain has withdrawn its policy.
    None,
}

impl Mode {
    /// The policy-file spelling: `enforce`, `testing` or `none`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `mx:` pattern: an exact host name or `*.` plus a domain (one leftmost label).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MxPattern {
    wildcard: bool,
    /// Lowercase A-label domain without trailing dot (without the `*.`).
    domain: String,
}

impl MxPattern {
    /// Parse a pattern as written in a policy (`mail.example.com`, `*.example.net`).
    /// A trailing dot is accepted and dropped; case is folded. U-labels are rejected:
    /// RFC 8461 §3.2 requires A-labels in policies (R26).
    pub fn parse(s: &str) -> Result<MxPattern, PolicyError> {
        let bad = || PolicyError::InvalidMx(s.to_string());
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let rest = rest.strip_suffix('.').unwrap_or(rest);
        if !is_ldh_domain(rest) {
            return Err(bad());
        }
        Ok(MxPattern {
            wildcard,
            domain: rest.to_ascii_lowercase(),
        })
    }

    /// Whether the pattern starts with `*.`.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The domain part (after `*.` for a wildcard), lowercase, no trailing dot.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Does this pattern match an MX host name (R40)? Case-insensitive, trailing dot
    /// ignored; `*.example.com` matches exactly one extra leftmost label.
    ///
    /// The host must already be an A-label (see [`normalize_host`] for U-labels).
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        if self.wildcard {
            match host.split_once('.') {
                Some((first, rest)) => !first.is_empty() && rest.eq_ignore_ascii_case(&self.domain),
                None => false,
            }
        } else {
            host.eq_ignore_ascii_case(&self.domain)
        }
    }
}

impl fmt::Display for MxPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.domain)
    }
}

/// Normalise a host or domain name for comparison and cache keys: lowercase A-labels,
/// no trailing dot (R38, R40). U-labels are converted with IDNA (UTS #46).
///
/// ```
/// use stsrelay::sts::normalize_host;
/// assert_eq!(normalize_host("MAIL.Example.COM.").unwrap(), "mail.example.com");
/// assert_eq!(normalize_host("bücher.example").unwrap(), "xn--bcher-kva.example");
/// assert!(normalize_host("").is_err());
/// ```
pub fn normalize_host(host: &str) -> Result<String, PolicyError> {
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    let out = if trimmed.is_ascii() {
        trimmed.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(trimmed).map_err(|_| PolicyError::InvalidDomain(host.to_string()))?
    };
    if !is_ldh_domain(&out) {
        return Err(PolicyError::InvalidDomain(host.to_string()));
    }
    Ok(out)
}

/// A parsed MTA-STS policy.
///
/// ```
/// use stsrelay::sts::{Mode, Policy};
/// let p = Policy::parse("version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 86400\n").unwrap();
/// assert_eq!(p.mode, Mode::Enforce);
/// assert!(p.matches_mx("mx1.example.com"));
/// assert!(!p.matches_mx("a.b.example.com"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `mode:`
    pub mode: Mode,
    /// `max_age:` in seconds, clamped to [`MAX_AGE_LIMIT`].
    pub max_age: u32,
    /// Every `mx:` line, in order.
    pub mx: Vec<MxPattern>,
    /// The policy's lines exactly as served (for TLS-RPT `policy-string`, R29).
    pub lines: Vec<String>,
}

/// Why a policy body is invalid (reported as `sts-policy-invalid`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The body is not UTF-8.
    #[error("policy is not UTF-8")]
    NotUtf8,
    /// A line does not follow `key ":" *WSP value` (R22), or contains control characters (R23).
    #[error("malformed policy line {line_no}: {line:?}")]
    MalformedLine {
        /// 1-based line number.
        line_no: usize,
        /// The offending line.
        line: String,
    },
    /// A required field is missing (R21).
    #[error("policy has no {0} field")]
    Missing(&'static str),
    /// `version` is not exactly `STSv1`.
    #[error("unsupported version {0:?}")]
    BadVersion(String),
    /// `mode` is not `enforce`, `testing` or `none` (R24).
    #[error("invalid mode {0:?} (expected enforce, testing or none)")]
    BadMode(String),
    /// `max_age` is not 1–10 digits (R25).
    #[error("invalid max_age {0:?}")]
    BadMaxAge(String),
    /// An `mx` value is not `["*."] Domain` (R26).
    #[error("invalid mx pattern {0:?}")]
    InvalidMx(String),
    /// A host or domain name that cannot be normalised.
    #[error("invalid domain name {0:?}")]
    InvalidDomain(String),
}

fn is_wsp(c: char) -> bool {
    c == ' ' || c == '\t'
}

impl Policy {
    /// Parse a policy body (R21–R28). Accepts LF, CRLF and mixed line ends; a missing
    /// final line end and blank lines are tolerated; a leading UTF-8 BOM is stripped
    /// (CHOICE R23); control characters other than TAB are rejected.
    pub fn parse(body: &str) -> Result<Policy, PolicyError> {
        let body = body.strip_prefix('\u{feff}').unwrap_or(body);
        let mut version: Option<String> = None;
        let mut mode: Option<String> = None;
        let mut max_age: Option<String> = None;
        let mut mx = Vec::new();
        let mut lines = Vec::new();
        for (i, raw) in body.split('\n').enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let malformed = || PolicyError::MalformedLine {
                line_no: i + 1,
                line: line.to_string(),
            };
            if line.trim_matches(is_wsp).is_empty() {
                if line.is_empty() {
                    continue;
                }
                return Err(malformed());
            }
            if line.chars().any(|c| c.is_control() && c != '\t') {
                return Err(malformed());
            }
            let (key, value) = line.split_once(':').ok_or_else(malformed)?;
            // Field names: the four known ones or `sts-policy-ext-name`.
            if !super::record::is_ext_name(key) {
                return Err(malformed());
            }
            let value = value.trim_matches(is_wsp);
            if value.is_empty() {
                return Err(malformed());
            }
            lines.push(line.to_string());
            let slot = match key {
                "version" => &mut version,
                "mode" => &mut mode,
                "max_age" => &mut max_age,
                "mx" => {
                    mx.push(MxPattern::parse(value)?);
                    continue;
                }
                _ => continue, // unknown keys are ignored (R27)
            };
            if slot.is_none() {
                *slot = Some(value.to_string()); // first one wins (R7, R27)
            }
        }
        let version = version.ok_or(PolicyError::Missing("version"))?;
        if version != "STSv1" {
            return Err(PolicyError::BadVersion(version));
        }
        let mode = match mode.ok_or(PolicyError::Missing("mode"))?.as_str() {
            "enforce" => Mode::Enforce,
            "testing" => Mode::Testing,
            "none" => Mode::None,
            other => return Err(PolicyError::BadMode(other.to_string())),
        };
        let max_age = max_age.ok_or(PolicyError::Missing("max_age"))?;
        if max_age.is_empty() || max_age.len() > 10 || !max_age.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(PolicyError::BadMaxAge(max_age));
        }
        let max_age = max_age
            .parse::<u64>()
            .map_err(|_| PolicyError::BadMaxAge(max_age.clone()))?
            .min(u64::from(MAX_AGE_LIMIT)) as u32;
        if mx.is_empty() && mode != Mode::None {
            return Err(PolicyError::Missing("mx"));
        }
        Ok(Policy {
            mode,
            max_age,
            mx,
            lines,
        })
    }

    /// Does the MX host name match any `mx` pattern (R40)? The host is compared
    /// case-insensitively without a trailing dot; a U-label host is converted first.
    pub fn matches_mx(&self, host: &str) -> bool {
        if host.is_ascii() {
            self.mx.iter().any(|p| p.matches(host))
        } else {
            normalize_host(host)
                .map(|h| self.mx.iter().any(|p| p.matches(&h)))
                .unwrap_or(false)
        }
    }

    /// The policy text as served, one line per entry joined by CRLF.
    pub fn to_text(&self) -> String {
        let mut s = self.lines.join("\r\n");
        s.push_str("\r\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 86400\n";

    fn p(s: &str) -> Result<Policy, PolicyError> {
        Policy::parse(s)
    }

    #[test]
    fn r21_required_fields() {
        let ok = p(GOOD).unwrap();
        assert_eq!(ok.mode, Mode::Enforce);
        assert_eq!(ok.max_age, 86400);
        assert_eq!(ok.mx.len(), 2);
        for (field, name) in [
            ("version", "version"),
            ("mode", "mode"),
            ("max_age", "max_age"),
        ] {
            let without: String = GOOD
                .lines()
                .filter(|l| !l.starts_with(field))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(p(&without), Err(PolicyError::Missing(name)), "{field}");
        }
        assert_eq!(
            p("version: STSv1\nmode: enforce\nmax_age: 1\n"),
            Err(PolicyError::Missing("mx"))
        );
        let none = p("version: STSv1\nmode: none\nmax_age: 1\n").unwrap();
        assert_eq!(none.mode, Mode::None);
        assert!(none.mx.is_empty());
        assert_eq!(p(""), Err(PolicyError::Missing("version")));
    }

    #[test]
    fn r22_line_endings_and_case() {
        let crlf = GOOD.replace('\n', "\r\n");
        assert_eq!(p(&crlf).unwrap().mx.len(), 2);
        let mixed = "version: STSv1\r\nmode: testing\nmx: a.example\r\nmax_age: 5";
        assert_eq!(p(mixed).unwrap().mode, Mode::Testing);
        // `Mode:` is an unknown key, so mode is missing.
        assert_eq!(
            p("version: STSv1\nMode: enforce\nmx: a.example\nmax_age: 5\n"),
            Err(PolicyError::Missing("mode"))
        );
        assert_eq!(
            p("version: STSv1\nmode: ENFORCE\nmx: a.example\nmax_age: 5\n"),
            Err(PolicyError::BadMode("ENFORCE".into()))
        );
        assert!(matches!(
            p("version: STSv1\nmode : enforce\nmx: a.example\nmax_age: 5\n"),
            Err(PolicyError::MalformedLine { line_no: 2, .. })
        ));
        assert!(matches!(
            p(" version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\n"),
            Err(PolicyError::MalformedLine { line_no: 1, .. })
        ));
        assert_eq!(
            p("version: stsv1\nmode: enforce\nmx: a.example\nmax_age: 5\n"),
            Err(PolicyError::BadVersion("stsv1".into()))
        );
        // No space after ':' and trailing WSP are fine.
        assert_eq!(
            p("version:STSv1\nmode:none \t\nmax_age:5").unwrap().mode,
            Mode::None
        );
    }

    #[test]
    fn r23_robustness() {
        assert!(p(&format!("{GOOD}\n\n")).is_ok());
        assert!(
            p(&format!("\u{feff}{GOOD}")).is_ok(),
            "BOM is stripped (CHOICE)"
        );
        assert!(matches!(
            p("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\nfoo: b\0r\n"),
            Err(PolicyError::MalformedLine { line_no: 5, .. })
        ));
        assert!(matches!(
            p("version: STSv1\nmode: enforce\n   \nmx: a.example\nmax_age: 5\n"),
            Err(PolicyError::MalformedLine { line_no: 3, .. })
        ));
        assert!(p("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\nnovalue:\n").is_err());
    }

    #[test]
    fn r24_mode_values() {
        for bad in ["report", "Enforce", "enforce2", "none enforce"] {
            assert_eq!(
                p(&format!(
                    "version: STSv1\nmode: {bad}\nmx: a.example\nmax_age: 5\n"
                )),
                Err(PolicyError::BadMode(bad.into()))
            );
        }
    }

    #[test]
    fn r25_max_age() {
        let with = |v: &str| {
            p(&format!(
                "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: {v}\n"
            ))
        };
        assert_eq!(with("31557601").unwrap().max_age, MAX_AGE_LIMIT);
        assert_eq!(with("9999999999").unwrap().max_age, MAX_AGE_LIMIT);
        assert_eq!(with("0").unwrap().max_age, 0);
        assert_eq!(with("0086400").unwrap().max_age, 86400);
        for bad in ["-5", "1e6", "12345678901", "+5", "5 s", "0x10"] {
            assert_eq!(with(bad), Err(PolicyError::BadMaxAge(bad.into())), "{bad}");
        }
    }

    #[test]
    fn r26_mx_values() {
        assert!(MxPattern::parse("*.example.com").is_ok());
        assert_eq!(
            MxPattern::parse("Mail.Example.COM.").unwrap().to_string(),
            "mail.example.com"
        );
        for bad in [
            "*example.com",
            "mail*.example.com",
            "mail.*.example.com",
            "*.*.example.com",
            ".example.com",
            "bücher.example",
            "-a.example",
            "a..example",
            "*.",
            "*",
            "exa_mple.com",
        ] {
            assert_eq!(
                MxPattern::parse(bad),
                Err(PolicyError::InvalidMx(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            p("version: STSv1\nmode: enforce\nmx: ok.example\nmx: *bad.example\nmax_age: 5\n"),
            Err(PolicyError::InvalidMx("*bad.example".into()))
        );
    }

    #[test]
    fn r27_r28_unknown_keys_duplicates_order() {
        let pol = p("mx: b.example\nfoo: bar\nmode: testing\nmode: enforce\nversion: STSv1\nmax_age: 10\nmax_age: 20\nmx: c.example\n").unwrap();
        assert_eq!(pol.mode, Mode::Testing);
        assert_eq!(pol.max_age, 10);
        assert_eq!(pol.mx.len(), 2);
        // Later duplicates are ignored even when their values would be invalid.
        assert_eq!(
            p("version: STSv1\nmode: enforce\nmode: bogus\nmx: a.example\nmax_age: 5\n")
                .unwrap()
                .mode,
            Mode::Enforce
        );
        // Extension values may carry UTF-8.
        assert!(p("version: STSv1\nmode: none\nmax_age: 5\nnote: grüße\n").is_ok());
    }

    #[test]
    fn r29_lines_kept_as_served() {
        let pol =
            p("version: STSv1\r\nmode: enforce\r\nfoo: bar\r\nmx: a.example\r\nmax_age: 5\r\n")
                .unwrap();
        assert_eq!(
            pol.lines,
            [
                "version: STSv1",
                "mode: enforce",
                "foo: bar",
                "mx: a.example",
                "max_age: 5"
            ]
        );
        assert_eq!(Policy::parse(&pol.to_text()).unwrap(), pol);
    }

    #[test]
    fn r40_mx_matching() {
        let w = MxPattern::parse("*.example.com").unwrap();
        assert!(w.matches("mail.example.com"));
        assert!(w.matches("MAIL.EXAMPLE.COM."));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("foo.bar.example.com"));
        assert!(!w.matches(".example.com"));
        assert!(!w.matches("mailexample.com"));
        let e = MxPattern::parse("mail.example.com").unwrap();
        assert!(e.matches("MAIL.EXAMPLE.COM."));
        assert!(!e.matches("mail.example.com.evil"));
        assert!(!e.matches("x.mail.example.com"));
        // IDN hosts compare as A-labels.
        let pol =
            p("version: STSv1\nmode: enforce\nmx: *.xn--bcher-kva.example\nmax_age: 5\n").unwrap();
        assert!(pol.matches_mx("mx.bücher.example"));
        assert!(pol.matches_mx("MX.xn--bcher-kva.example."));
        assert!(!pol.matches_mx("mx.bucher.example"));
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC{0,200}") {
            let _ = Policy::parse(&s);
        }

        #[test]
        fn wildcard_matches_exactly_one_label(
            label in "[a-z0-9]{1,10}",
            extra in "[a-z0-9]{1,10}",
            dom in "[a-z]{1,8}\\.[a-z]{2,5}",
        ) {
            let pat = MxPattern::parse(&format!("*.{dom}")).unwrap();
            let one_label = format!("{label}.{dom}");
            let two_labels = format!("{extra}.{label}.{dom}");
            proptest::prop_assert!(pat.matches(&one_label));
            proptest::prop_assert!(pat.matches(&one_label.to_ascii_uppercase()));
            proptest::prop_assert!(!pat.matches(&two_labels));
            proptest::prop_assert!(!pat.matches(&dom));
        }

        #[test]
        fn serialised_policy_reparses(
            mode in proptest::sample::select(vec!["enforce", "testing", "none"]),
            age in 0u64..10_000_000_000u64,
            hosts in proptest::collection::vec("(\\*\\.)?[a-z0-9]{1,8}\\.[a-z]{2,4}", 1..5),
        ) {
            let mut body = format!("version: STSv1\nmode: {mode}\nmax_age: {age}\n");
            for h in &hosts { body.push_str(&format!("mx: {h}\n")); }
            let pol = Policy::parse(&body).unwrap();
            proptest::prop_assert_eq!(pol.max_age as u64, age.min(MAX_AGE_LIMIT as u64));
            proptest::prop_assert_eq!(pol.mx.len(), hosts.len());
            proptest::prop_assert_eq!(Policy::parse(&pol.to_text()).unwrap(), pol);
        }
    }
}
