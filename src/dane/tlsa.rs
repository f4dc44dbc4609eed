//! TLSA records (RFC 6698 §2) and the RRset of one SMTP server, with the usability rules
//! of RFC 7672 §3.1.3 and RFC 7671 §4–5.

use std::fmt;
use std::str::FromStr;

/// Certificate usage field (RFC 6698 §2.1.1, acronyms of RFC 7218).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CertUsage {
    /// `PKIX-TA(0)`: not used for SMTP (RFC 7672 §3.1.3).
    PkixTa,
    /// `PKIX-EE(1)`: not used for SMTP (RFC 7672 §3.1.3).
    PkixEe,
    /// `DANE-TA(2)`: a trust anchor that issued the server certificate (RFC 7672 §3.1.2).
    DaneTa,
    /// `DANE-EE(3)`: the server certificate or its key itself (RFC 7672 §3.1.1).
    DaneEe,
    /// Any other value: unusable.
    Unknown(u8),
}

/// Selector field (RFC 6698 §2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    /// `Cert(0)`: the whole certificate (DER).
    Cert,
    /// `SPKI(1)`: the SubjectPublicKeyInfo (DER).
    Spki,
    /// Any other value: unusable.
    Unknown(u8),
}

/// Matching type field (RFC 6698 §2.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MatchingType {
    /// `Full(0)`: the selected bytes themselves.
    Full,
    /// `SHA2-256(1)`: their SHA-256 digest (32 bytes).
    Sha256,
    /// `SHA2-512(2)`: their SHA-512 digest (64 bytes).
    Sha512,
    /// Any other value: unusable.
    Unknown(u8),
}

macro_rules! numeric_field {
    ($ty:ident, $( $variant:ident = $n:literal, $acronym:literal ),+ ) => {
        impl From<u8> for $ty {
            fn from(n: u8) -> $ty {
                match n {
                    $( $n => $ty::$variant, )+
                    other => $ty::Unknown(other),
                }
            }
        }

        impl From<$ty> for u8 {
            fn from(v: $ty) -> u8 {
                match v {
                    $( $ty::$variant => $n, )+
                    $ty::Unknown(n) => n,
                }
            }
        }

        impl $ty {
            /// The RFC 7218 acronym, e.g. `DANE-EE`, or `None` for an unknown value.
            pub const fn acronym(self) -> Option<&'static str> {
                match self {
                    $( $ty::$variant => Some($acronym), )+
                    $ty::Unknown(_) => None,
                }
            }

            /// Parse a presentation-format field: decimal, or an RFC 7218 acronym
            /// (case-insensitive).
            fn parse_field(s: &str) -> Option<$ty> {
                if let Ok(n) = s.parse::<u8>() {
                    return Some($ty::from(n));
                }
                $( if s.eq_ignore_ascii_case($acronym) { return Some($ty::$variant); } )+
                None
            }
        }

        impl fmt::Display for $ty {
            /// The decimal value, as in zone files.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", u8::from(*self))
            }
        }
    };
}

numeric_field!(
    CertUsage,
    PkixTa = 0,
    "PKIX-TA",
    PkixEe = 1,
    "PKIX-EE",
    DaneTa = 2,
    "DANE-TA",
    DaneEe = 3,
    "DANE-EE"
);
numeric_field!(Selector, Cert = 0, "Cert", Spki = 1, "SPKI");
numeric_field!(
    MatchingType,
    Full = 0,
    "Full",
    Sha256 = 1,
    "SHA2-256",
    Sha512 = 2,
    "SHA2-512"
);

impl MatchingType {
    /// The digest length this matching type requires, `None` for `Full` and unknown.
    pub const fn digest_len(self) -> Option<usize> {
        match self {
            MatchingType::Sha256 => Some(32),
            MatchingType::Sha512 => Some(64),
            MatchingType::Full | MatchingType::Unknown(_) => None,
        }
    }
}

/// Why a TLSA record cannot be used to authenticate an SMTP server (RFC 7672 §3.1.3,
/// RFC 7671 §4). Unusable records are ignored, never an error in themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// PKIX-TA(0) / PKIX-EE(1): RFC 7672 §3.1.3 says SMTP clients treat them as unusable.
    #[error("certificate usage {0} (PKIX) is unusable for SMTP (RFC 7672 §3.1.3)")]
    PkixUsage(u8),
    /// A certificate usage this implementation does not know.
    #[error("unknown certificate usage {0}")]
    UnknownUsage(u8),
    /// A selector this implementation does not know.
    #[error("unknown selector {0}")]
    UnknownSelector(u8),
    /// A matching type this implementation does not know.
    #[error("unknown matching type {0}")]
    UnknownMatching(u8),
    /// The digest has the wrong length for its matching type.
    #[error("matching type {matching} needs {expected} bytes of data, the record has {got}")]
    DigestLength {
        /// The matching type (1 or 2).
        matching: u8,
        /// 32 or 64.
        expected: usize,
        /// The record's data length.
        got: usize,
    },
    /// A `Full(0)` record with no data.
    #[error("empty certificate association data")]
    EmptyData,
}

/// One TLSA record: `usage selector matching data`.
///
/// Parse and display use the zone-file presentation format (RFC 6698 §2.2); hex is
/// case-insensitive and may contain whitespace, fields may be RFC 7218 acronyms:
///
/// ```
/// use stsrelay::dane::{CertUsage, MatchingType, Selector, TlsaRecord};
///
/// let r: TlsaRecord = "3 1 1 AB12cd34 ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34".parse()?;
/// assert_eq!((r.usage, r.selector, r.matching), (CertUsage::DaneEe, Selector::Spki, MatchingType::Sha256));
/// assert!(r.usable());
/// assert_eq!(r.to_string(), "3 1 1 ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34");
///
/// let pkix: TlsaRecord = "PKIX-EE SPKI SHA2-256 ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34ab12cd34".parse()?;
/// assert_eq!(pkix.usage, CertUsage::PkixEe);
/// assert!(!pkix.usable()); // RFC 7672 §3.1.3
/// # Ok::<(), stsrelay::dane::TlsaParseError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TlsaRecord {
    /// Certificate usage.
    pub usage: CertUsage,
    /// Selector.
    pub selector: Selector,
    /// Matching type.
    pub matching: MatchingType,
    /// Certificate association data.
    pub data: Vec<u8>,
}

impl TlsaRecord {
    /// A record from its wire fields (as a DNS library hands them over).
    pub fn from_raw(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> TlsaRecord {
        TlsaRecord {
            usage: usage.into(),
            selector: selector.into(),
            matching: matching.into(),
            data,
        }
    }

    /// `Ok` if the record can authenticate an SMTP server (RFC 7672 §3.1.3): usage
    /// DANE-TA(2) or DANE-EE(3), selector Cert(0) or SPKI(1), matching Full(0) with data,
    /// SHA2-256(1) with 32 bytes or SHA2-512(2) with 64 bytes.
    pub fn check_usable(&self) -> Result<(), Unusable> {
        match self.usage {
            CertUsage::DaneTa | CertUsage::DaneEe => {}
            CertUsage::PkixTa | CertUsage::PkixEe => {
                return Err(Unusable::PkixUsage(self.usage.into()));
            }
            CertUsage::Unknown(n) => return Err(Unusable::UnknownUsage(n)),
        }
        if let Selector::Unknown(n) = self.selector {
            return Err(Unusable::UnknownSelector(n));
        }
        match self.matching {
            MatchingType::Unknown(n) => Err(Unusable::UnknownMatching(n)),
            MatchingType::Full if self.data.is_empty() => Err(Unusable::EmptyData),
            MatchingType::Full => Ok(()),
            m @ (MatchingType::Sha256 | MatchingType::Sha512) => {
                let expected = m.digest_len().unwrap_or_default();
                if self.data.len() == expected {
                    Ok(())
                } else {
                    Err(Unusable::DigestLength {
                        matching: m.into(),
                        expected,
                        got: self.data.len(),
                    })
                }
            }
        }
    }

    /// Whether [`TlsaRecord::check_usable`] passes.
    pub fn usable(&self) -> bool {
        self.check_usable().is_ok()
    }

    /// The record with its data cut to 8 bytes (`3 1 1 ab12cd34…`), for logs and errors.
    pub fn abbreviated(&self) -> String {
        const KEEP: usize = 8;
        let data = self.data.get(..KEEP).unwrap_or(&self.data);
        let more = if self.data.len() > KEEP { "…" } else { "" };
        format!(
            "{} {} {} {}{more}",
            self.usage,
            self.selector,
            self.matching,
            to_hex(data)
        )
    }
}

impl fmt::Display for TlsaRecord {
    /// Presentation format with lower-case hex: `3 1 1 ab12…`. (A record with empty
    /// data shows as `3 1 1 ` and does not parse back: zone files cannot hold it.)
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.usage,
            self.selector,
            self.matching,
            to_hex(&self.data)
        )
    }
}

/// A TLSA record in presentation format could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsaParseError {
    /// A field is missing.
    #[error("TLSA record: missing {0} (expected \"usage selector matching hex-data\")")]
    Missing(&'static str),
    /// A numeric field is neither 0–255 nor a known acronym.
    #[error("TLSA record: bad {field} {value:?} (0-255 or an RFC 7218 acronym)")]
    Field {
        /// `usage`, `selector` or `matching type`.
        field: &'static str,
        /// What was found.
        value: String,
    },
    /// The association data is not hex.
    #[error("TLSA record: certificate association data is not hex: {0}")]
    Hex(String),
}

impl FromStr for TlsaRecord {
    type Err = TlsaParseError;
    fn from_str(s: &str) -> Result<TlsaRecord, TlsaParseError> {
        let mut tokens = s.split_whitespace();
        let mut field = |name: &'static str| tokens.next().ok_or(TlsaParseError::Missing(name));
        let (u, sel, m) = (field("usage")?, field("selector")?, field("matching type")?);
        let bad = |field: &'static str, value: &str| TlsaParseError::Field {
            field,
            value: value.to_string(),
        };
        let usage = CertUsage::parse_field(u).ok_or_else(|| bad("usage", u))?;
        let selector = Selector::parse_field(sel).ok_or_else(|| bad("selector", sel))?;
        let matching = MatchingType::parse_field(m).ok_or_else(|| bad("matching type", m))?;
        let hex: String = tokens.collect();
        if hex.is_empty() {
            return Err(TlsaParseError::Missing("certificate association data"));
        }
        let data = from_hex(&hex).map_err(TlsaParseError::Hex)?;
        Ok(TlsaRecord {
            usage,
            selector,
            matching,
            data,
        })
    }
}

fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", s.len()));
    }
    let digit = |c: u8| -> Result<u8, String> {
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| format!("{:?} is not a hex digit", c as char))
    };
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// How a TLSA RRset bears on an SMTP connection (RFC 7672 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetStatus {
    /// No records (e.g. a secure NXDOMAIN/NODATA): no DANE for this host.
    Empty,
    /// Records exist but none is usable: DANE cannot authenticate the server, but the
    /// records still say it offers TLS, so STARTTLS is mandatory (RFC 7672 §2.2; Postfix's
    /// `dane` level uses "encrypt" here).
    NoneUsable,
    /// At least one usable record: DANE is required; the server must authenticate
    /// against the usable records (RFC 7672 §2.2).
    Usable,
}

/// The TLSA RRset of one SMTP server (`_25._tcp.<TLSA base domain>`), as validated by
/// DNSSEC.
///
/// DANE is required for the server iff at least one record is usable (RFC 7672 §2.2).
/// A secure RRset whose records are all unusable authenticates nothing; the client then
/// uses TLS without authentication (mandatory STARTTLS, see [`SetStatus::NoneUsable`]).
///
/// ```
/// use stsrelay::dane::{SetStatus, TlsaSet};
///
/// // As converted from a DNS library's TLSA rdata: (usage, selector, matching, data).
/// let set = TlsaSet::from_raw([(3, 1, 1, vec![0xab; 32]), (1, 1, 1, vec![0xcd; 32])]);
/// assert!(set.dane_required());
/// assert_eq!(set.usable().count(), 1);
///
/// let pkix_only = TlsaSet::from_raw([(0, 0, 1, vec![0xab; 32])]);
/// assert!(!pkix_only.dane_required());
/// assert_eq!(pkix_only.status(), SetStatus::NoneUsable);
/// assert_eq!(TlsaSet::default().status(), SetStatus::Empty);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsaSet {
    records: Vec<TlsaRecord>,
}

impl TlsaSet {
    /// The RRset as returned by DNS (order kept, duplicates dropped).
    pub fn new(records: Vec<TlsaRecord>) -> TlsaSet {
        records.into_iter().collect()
    }

    /// From wire fields `(usage, selector, matching, data)`, so the DNS layer can convert
    /// without this module knowing its types.
    pub fn from_raw<I>(records: I) -> TlsaSet
    where
        I: IntoIterator<Item = (u8, u8, u8, Vec<u8>)>,
    {
        records
            .into_iter()
            .map(|(u, s, m, d)| TlsaRecord::from_raw(u, s, m, d))
            .collect()
    }

    /// All records.
    pub fn records(&self) -> &[TlsaRecord] {
        &self.records
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// No records at all.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The usable records (RFC 7672 §3.1.3).
    pub fn usable(&self) -> impl Iterator<Item = &TlsaRecord> {
        self.records.iter().filter(|r| r.usable())
    }

    /// A set of only the usable records.
    pub fn usable_set(&self) -> TlsaSet {
        self.usable().cloned().collect()
    }

    /// DANE authentication is required: at least one usable record (RFC 7672 §2.2).
    pub fn dane_required(&self) -> bool {
        self.usable().next().is_some()
    }

    /// Empty, none usable, or usable.
    pub fn status(&self) -> SetStatus {
        if self.is_empty() {
            SetStatus::Empty
        } else if self.dane_required() {
            SetStatus::Usable
        } else {
            SetStatus::NoneUsable
        }
    }

    /// The records in presentation format, sorted so that one RRset always gives the
    /// same strings whatever order DNS returned it in (TLS-RPT `policy-string`).
    pub fn presentation(&self) -> Vec<String> {
        let mut v: Vec<String> = self.records.iter().map(|r| r.to_string()).collect();
        v.sort();
        v
    }
}

impl FromIterator<TlsaRecord> for TlsaSet {
    fn from_iter<T: IntoIterator<Item = TlsaRecord>>(iter: T) -> TlsaSet {
        let mut records: Vec<TlsaRecord> = Vec::new();
        for r in iter {
            if !records.contains(&r) {
                records.push(r);
            }
        }
        TlsaSet { records }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(u: u8, s: u8, m: u8, len: usize) -> TlsaRecord {
        TlsaRecord::from_raw(u, s, m, vec![0x5a; len])
    }

    #[test]
    fn usable_combinations() {
        for u in [2, 3] {
            for s in [0, 1] {
                assert!(rec(u, s, 0, 1).usable(), "{u} {s} 0");
                assert!(rec(u, s, 1, 32).usable(), "{u} {s} 1");
                assert!(rec(u, s, 2, 64).usable(), "{u} {s} 2");
            }
        }
    }

    #[test]
    fn unusable_records_say_why() {
        let cases = [
            (rec(0, 0, 1, 32), Unusable::PkixUsage(0)),
            (rec(1, 1, 1, 32), Unusable::PkixUsage(1)),
            (rec(4, 1, 1, 32), Unusable::UnknownUsage(4)),
            (rec(255, 1, 1, 32), Unusable::UnknownUsage(255)),
            (rec(3, 2, 1, 32), Unusable::UnknownSelector(2)),
            (rec(3, 1, 3, 32), Unusable::UnknownMatching(3)),
            (rec(3, 1, 0, 0), Unusable::EmptyData),
            (
                rec(3, 1, 1, 31),
                Unusable::DigestLength {
                    matching: 1,
                    expected: 32,
                    got: 31,
                },
            ),
            (
                rec(2, 0, 1, 64),
                Unusable::DigestLength {
                    matching: 1,
                    expected: 32,
                    got: 64,
                },
            ),
            (
                rec(3, 0, 2, 32),
                Unusable::DigestLength {
                    matching: 2,
                    expected: 64,
                    got: 32,
                },
            ),
            (
                rec(2, 1, 2, 0),
                Unusable::DigestLength {
                    matching: 2,
                    expected: 64,
                    got: 0,
                },
            ),
        ];
        for (r, why) in cases {
            assert_eq!(r.check_usable(), Err(why), "{r}");
            assert!(!r.usable());
        }
    }

    #[test]
    fn presentation_round_trips() {
        for s in [
            "3 1 1 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            "2 0 0 3082",
            "0 0 1 ab",
            "255 9 7 ff",
        ] {
            let r: TlsaRecord = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
            assert_eq!(r.to_string().parse::<TlsaRecord>().unwrap(), r);
        }
    }

    #[test]
    fn parse_accepts_zone_file_spelling() {
        let r: TlsaRecord = "  3\t1 1 AABB ccDD\n  EEff  ".parse().unwrap();
        assert_eq!(
            r,
            TlsaRecord::from_raw(3, 1, 1, vec![0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])
        );
        let r: TlsaRecord = "dane-ta spki sha2-512 00".parse().unwrap();
        assert_eq!(
            (r.usage, r.selector, r.matching),
            (CertUsage::DaneTa, Selector::Spki, MatchingType::Sha512)
        );
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            "".parse::<TlsaRecord>(),
            Err(TlsaParseError::Missing("usage"))
        );
        assert_eq!(
            "3 1".parse::<TlsaRecord>(),
            Err(TlsaParseError::Missing("matching type"))
        );
        assert_eq!(
            "3 1 1".parse::<TlsaRecord>(),
            Err(TlsaParseError::Missing("certificate association data"))
        );
        assert!(matches!(
            "256 1 1 ab".parse::<TlsaRecord>(),
            Err(TlsaParseError::Field { field: "usage", .. })
        ));
        assert!(matches!(
            "3 x 1 ab".parse::<TlsaRecord>(),
            Err(TlsaParseError::Field {
                field: "selector",
                ..
            })
        ));
        assert!(matches!(
            "3 1 1 abc".parse::<TlsaRecord>(),
            Err(TlsaParseError::Hex(_))
        ));
        assert!(matches!(
            "3 1 1 zz".parse::<TlsaRecord>(),
            Err(TlsaParseError::Hex(_))
        ));
        // Non-ASCII must not panic the hex decoder.
        assert!(matches!(
            "3 1 1 éé".parse::<TlsaRecord>(),
            Err(TlsaParseError::Hex(_))
        ));
    }

    #[test]
    fn sets_classify_and_dedupe() {
        assert_eq!(TlsaSet::default().status(), SetStatus::Empty);
        assert!(!TlsaSet::default().dane_required());
        let all_unusable = TlsaSet::new(vec![rec(0, 0, 1, 32), rec(1, 1, 1, 32), rec(3, 1, 1, 20)]);
        assert_eq!(all_unusable.status(), SetStatus::NoneUsable);
        assert!(!all_unusable.dane_required());
        assert!(all_unusable.usable_set().is_empty());
        let mixed = TlsaSet::new(vec![rec(1, 1, 1, 32), rec(3, 1, 1, 32), rec(3, 1, 1, 32)]);
        assert_eq!(mixed.len(), 2);
        assert_eq!(mixed.status(), SetStatus::Usable);
        assert_eq!(mixed.usable_set().records(), &[rec(3, 1, 1, 32)]);
    }

    #[test]
    fn presentation_is_sorted_and_abbreviation_short() {
        let set = TlsaSet::from_raw([(3, 1, 1, vec![0xff; 32]), (2, 0, 1, vec![0x01; 32])]);
        let p = set.presentation();
        assert!(
            p[0].starts_with("2 0 1 0101") && p[1].starts_with("3 1 1 ffff"),
            "{p:?}"
        );
        assert_eq!(set.records()[0].abbreviated(), "3 1 1 ffffffffffffffff…");
        assert_eq!(rec(3, 1, 0, 2).abbreviated(), "3 1 0 5a5a");
    }
}
