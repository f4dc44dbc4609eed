//! The `_mta-sts.<domain>` TXT record (RFC 8461 §3.1): selection and parsing.

/// A parsed MTA-STS TXT record: `v=STSv1; id=…`.
///
/// ```
/// use stsrelay::sts::StsRecord;
/// let r: StsRecord = "v=STSv1; id=20240101T000000".parse().unwrap();
/// assert_eq!(r.id, "20240101T000000");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsRecord {
    /// The policy id (1–32 ASCII letters or digits).
    pub id: String,
}

/// Why the `_mta-sts` TXT RRset yields no usable record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// No TXT record begins with `v=STSv1;` (R5).
    #[error("no TXT record starting with \"v=STSv1;\"")]
    NoRecord,
    /// More than one TXT record begins with `v=STSv1;`: RFC 8461 §3.1 says to act as if
    /// there were no policy (R5).
    #[error("{0} TXT records start with \"v=STSv1;\" (exactly one is allowed)")]
    MultipleRecords(usize),
    /// The record is not US-ASCII (R6).
    #[error("record contains non-ASCII or control characters")]
    NotAscii,
    /// The record has no `id` field (R6).
    #[error("record has no id field")]
    MissingId,
    /// The `id` is not 1–32 letters and digits (R6).
    #[error("invalid id {0:?}: must be 1-32 ASCII letters or digits")]
    InvalidId(String),
    /// A field does not follow the RFC 8461 §3.1 grammar (R6).
    #[error("malformed field {0:?}")]
    MalformedField(String),
    /// The record does not start with `v=STSv1` (only from [`StsRecord::from_str`](std::str::FromStr)).
    #[error("record does not start with \"v=STSv1;\"")]
    NotSts,
}

const VERSION: &str = "v=STSv1";

fn is_wsp(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Does this TXT string count as an MTA-STS record? `v=STSv1` followed by `*WSP ";"`.
///
/// CHOICE (R5, erratum 6285): `v=STSv1 ;` counts, since the ABNF delimiter allows WSP
/// before `;`.
pub fn is_sts_record(txt: &str) -> bool {
    txt.strip_prefix(VERSION)
        .map(|rest| rest.trim_start_matches(is_wsp).starts_with(';'))
        .unwrap_or(false)
}

/// Select the one MTA-STS record from a TXT RRset whose multi-string records have
/// already been joined (R4), and parse it (R5–R7).
///
/// ```
/// use stsrelay::sts::{select_record, RecordError};
/// let txt = vec!["v=spf1 -all".to_string(), "v=STSv1; id=abc".to_string()];
/// assert_eq!(select_record(&txt).unwrap().id, "abc");
/// let two = vec!["v=STSv1; id=a".to_string(), "v=STSv1; id=b".to_string()];
/// assert_eq!(select_record(&two), Err(RecordError::MultipleRecords(2)));
/// ```
pub fn select_record<S: AsRef<str>>(txt: &[S]) -> Result<StsRecord, RecordError> {
    let mut found = txt.iter().map(AsRef::as_ref).filter(|t| is_sts_record(t));
    let first = found.next().ok_or(RecordError::NoRecord)?;
    let more = found.count();
    if more > 0 {
        return Err(RecordError::MultipleRecords(more + 1));
    }
    first.parse()
}

fn valid_id(v: &str) -> bool {
    (1..=32).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `sts-ext-name = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")`, the extension
/// name grammar shared by MTA-STS records and policies and TLS-RPT records.
pub(crate) fn is_ext_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

/// `sts-ext-value = 1*(%x21-3A / %x3C / %x3E-7E)`
fn valid_ext_value(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|c| matches!(c, 0x21..=0x3A | 0x3C | 0x3E..=0x7E))
}

impl std::str::FromStr for StsRecord {
    type Err = RecordError;

    fn from_str(txt: &str) -> Result<Self, Self::Err> {
        if !txt.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) {
            return Err(RecordError::NotAscii);
        }
        let rest = txt.strip_prefix(VERSION).ok_or(RecordError::NotSts)?;
        // Split on ';' and trim the WSP of `sts-field-delim = *WSP ";" *WSP`.
        let mut parts = rest.split(';');
        if !parts.next().unwrap_or("").trim_matches(is_wsp).is_empty() {
            return Err(RecordError::NotSts);
        }
        let parts: Vec<&str> = parts.map(|p| p.trim_matches(is_wsp)).collect();
        let mut id = None;
        for (i, field) in parts.iter().enumerate() {
            if field.is_empty() {
                // Only one trailing delimiter is allowed: `[sts-field-delim]` at the end.
                if i + 1 == parts.len() && i > 0 {
                    continue;
                }
                return Err(RecordError::MalformedField(String::new()));
            }
            let (name, value) = field
                .split_once('=')
                .ok_or_else(|| RecordError::MalformedField(field.to_string()))?;
            if name == "id" && id.is_none() {
                if !valid_id(value) {
                    return Err(RecordError::InvalidId(value.to_string()));
                }
                id = Some(value.to_string());
            } else if !is_ext_name(name) || !valid_ext_value(value) {
                // Unknown fields and later duplicates are ignored (R7) but must still be
                // well-formed extensions.
                return Err(RecordError::MalformedField(field.to_string()));
            }
        }
        id.map(|id| StsRecord { id }).ok_or(RecordError::MissingId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(v: &[&str]) -> Result<StsRecord, RecordError> {
        select_record(v)
    }

    #[test]
    fn r5_selection_vectors() {
        assert_eq!(sel(&["v=spf1 -all", "v=STSv1; id=a"]).unwrap().id, "a");
        assert_eq!(
            sel(&["v=STSv1; id=a", "v=STSv1; id=b"]),
            Err(RecordError::MultipleRecords(2))
        );
        // "v=STSv1" with no ';' does not begin with "v=STSv1;" and is discarded.
        assert_eq!(sel(&["v=STSv1"]), Err(RecordError::NoRecord));
        assert_eq!(sel(&["id=a; v=STSv1"]), Err(RecordError::NoRecord));
        assert_eq!(sel(&[]), Err(RecordError::NoRecord));
        // CHOICE (erratum 6285): WSP before ';' counts.
        assert_eq!(sel(&["v=STSv1 ; id=a"]).unwrap().id, "a");
        // One valid and one invalid STS record is still two records: no policy.
        assert_eq!(
            sel(&["v=STSv1; id=a", "v=STSv1; id="]),
            Err(RecordError::MultipleRecords(2))
        );
        // One record that is invalid: no policy.
        assert_eq!(
            sel(&["v=STSv1;"]),
            Err(RecordError::MalformedField(String::new()))
        );
    }

    #[test]
    fn r6_grammar_vectors() {
        let id32 = "a".repeat(32);
        assert_eq!(sel(&[&format!("v=STSv1; id={id32}")]).unwrap().id, id32);
        let id33 = "a".repeat(33);
        assert_eq!(
            sel(&[&format!("v=STSv1; id={id33}")]),
            Err(RecordError::InvalidId(id33))
        );
        assert_eq!(
            sel(&["v=STSv1; id=2024-01-01"]),
            Err(RecordError::InvalidId("2024-01-01".into()))
        );
        assert_eq!(
            sel(&["v=STSv1; id="]),
            Err(RecordError::InvalidId("".into()))
        );
        // Case-sensitive version: not an STS record at all.
        assert_eq!(sel(&["V=STSv1; id=1"]), Err(RecordError::NoRecord));
        assert_eq!(sel(&["v=stsv1; id=1"]), Err(RecordError::NoRecord));
        assert_eq!(sel(&["v=STSv1;id=abc;"]).unwrap().id, "abc");
        assert_eq!(sel(&["v=STSv1; id=abc; ext_1=x"]).unwrap().id, "abc");
        assert_eq!(sel(&["v=STSv1;\tid=abc\t;"]).unwrap().id, "abc");
        assert_eq!(sel(&["v=STSv1; ext=1"]), Err(RecordError::MissingId));
        assert_eq!(
            sel(&["v=STSv1; id=a;; x=1"]),
            Err(RecordError::MalformedField(String::new()))
        );
        assert_eq!(
            sel(&["v=STSv1; id=a; junk"]),
            Err(RecordError::MalformedField("junk".into()))
        );
        assert_eq!(
            sel(&["v=STSv1; id=a; x=a b"]),
            Err(RecordError::MalformedField("x=a b".into()))
        );
        assert_eq!(sel(&["v=STSv1; id=a; x=ü"]), Err(RecordError::NotAscii));
        assert_eq!(sel(&["v=STSv1; id=a\0"]), Err(RecordError::NotAscii));
    }

    #[test]
    fn r7_unknown_fields_ignored_first_duplicate_wins() {
        assert_eq!(sel(&["v=STSv1; id=aaa; id=bbb"]).unwrap().id, "aaa");
        assert_eq!(sel(&["v=STSv1; id=a1; future=x"]).unwrap().id, "a1");
        assert_eq!(sel(&["v=STSv1; future=x; id=a1"]).unwrap().id, "a1");
    }

    #[test]
    fn r4_joined_strings_are_read_as_one() {
        // The DNS layer joins ["v=STSv1; id=ab", "c123"] with no separator.
        let joined = ["v=STSv1; id=ab", "c123"].concat();
        assert_eq!(sel(&[&joined]).unwrap().id, "abc123");
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<StsRecord>();
            let _ = select_record(&[s]);
        }

        #[test]
        fn valid_ids_round_trip(id in "[A-Za-z0-9]{1,32}", ext in "x[a-z0-9_.-]{0,10}=[!-:<>-~]{1,10}") {
            let txt = format!("v=STSv1; {ext}; id={id};");
            let r = select_record(&[txt]).unwrap();
            proptest::prop_assert_eq!(r.id, id);
        }
    }
}
