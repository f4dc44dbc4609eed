//! The `_smtp._tls.<domain>` TXT record (RFC 8460 §3): selection and parsing.

/// One report destination from `rua=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rua {
    /// `mailto:` with the percent-decoded address.
    Mailto(String),
    /// An `https:` URL.
    Https(String),
}

impl std::fmt::Display for Rua {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rua::Mailto(a) => write!(f, "mailto:{a}"),
            Rua::Https(u) => f.write_str(u),
        }
    }
}

/// A parsed TLS-RPT record.
///
/// ```
/// use stsrelay::tlsrpt::{select_tlsrpt_record, Rua};
/// let r = select_tlsrpt_record(&["v=TLSRPTv1; rua=mailto:tls@example.com, https://r.example.com/t"]).unwrap();
/// assert_eq!(r.rua, vec![Rua::Mailto("tls@example.com".into()), Rua::Https("https://r.example.com/t".into())]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsRptRecord {
    /// The usable destinations (unsupported or malformed URIs are dropped and listed in
    /// `skipped`).
    pub rua: Vec<Rua>,
    /// URIs that were ignored, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// Why a TLS-RPT TXT RRset yields no usable record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsRptRecordError {
    /// No record begins with `v=TLSRPTv1;`.
    #[error("no TXT record starting with \"v=TLSRPTv1;\"")]
    NoRecord,
    /// More than one does (R58).
    #[error("{0} TXT records start with \"v=TLSRPTv1;\" (exactly one is allowed)")]
    MultipleRecords(usize),
    /// Malformed field (R59).
    #[error("malformed field {0:?}")]
    MalformedField(String),
    /// No `rua` field (R59).
    #[error("record has no rua field")]
    MissingRua,
    /// `rua` lists no supported URI (R60, R61).
    #[error("rua lists no usable mailto: or https: URI")]
    NoUsableRua,
}

const VERSION: &str = "v=TLSRPTv1";

fn is_wsp(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_tlsrpt_record(txt: &str) -> bool {
    txt.strip_prefix(VERSION)
        .map(|r| r.trim_start_matches(is_wsp).starts_with(';'))
        .unwrap_or(false)
}

/// Select and parse the one TLS-RPT record of a TXT RRset (strings already joined).
pub fn select_tlsrpt_record<S: AsRef<str>>(txt: &[S]) -> Result<TlsRptRecord, TlsRptRecordError> {
    let found: Vec<&str> = txt
        .iter()
        .map(AsRef::as_ref)
        .filter(|t| is_tlsrpt_record(t))
        .collect();
    match found.as_slice() {
        [] => Err(TlsRptRecordError::NoRecord),
        [one] => parse(one),
        many => Err(TlsRptRecordError::MultipleRecords(many.len())),
    }
}

fn parse(txt: &str) -> Result<TlsRptRecord, TlsRptRecordError> {
    let rest = &txt[VERSION.len()..];
    let fields: Vec<&str> = rest
        .split(';')
        .skip(1)
        .map(|f| f.trim_matches(is_wsp))
        .collect();
    let mut rua = None;
    for (i, f) in fields.iter().enumerate() {
        if f.is_empty() && i + 1 == fields.len() {
            continue;
        }
        let (name, value) = f
            .split_once('=')
            .ok_or_else(|| TlsRptRecordError::MalformedField(f.to_string()))?;
        if name == "rua" {
            if rua.is_none() {
                rua = Some(value);
            }
        } else if value.is_empty() || !crate::sts::is_ext_name(name) {
            return Err(TlsRptRecordError::MalformedField(f.to_string()));
        }
    }
    let rua = rua.ok_or(TlsRptRecordError::MissingRua)?;
    let mut out = TlsRptRecord {
        rua: vec![],
        skipped: vec![],
    };
    for uri in rua.split(',').map(|u| u.trim_matches(is_wsp)) {
        match parse_uri(uri) {
            Ok(r) => out.rua.push(r),
            Err(why) => out.skipped.push((uri.to_string(), why.to_string())),
        }
    }
    if out.rua.is_empty() {
        return Err(TlsRptRecordError::NoUsableRua);
    }
    Ok(out)
}

fn parse_uri(uri: &str) -> Result<Rua, &'static str> {
    if uri.contains('!') {
        return Err("raw '!' is not allowed (no DMARC-style size limits in TLS-RPT)");
    }
    if uri.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err("URI contains spaces or non-ASCII");
    }
    let lower = uri.to_ascii_lowercase();
    if lower.starts_with("mailto:") {
        let addr = percent_decode(&uri[7..]).ok_or("bad percent-encoding")?;
        let addr = addr.split('?').next().unwrap_or("").to_string();
        match addr.rsplit_once('@') {
            Some((l, d)) if !l.is_empty() && !d.is_empty() => Ok(Rua::Mailto(addr)),
            _ => Err("mailto: without an address"),
        }
    } else if lower.starts_with("https://") && uri.len() > 8 {
        Ok(Rua::Https(uri.to_string()))
    } else {
        Err("unsupported scheme (only mailto: and https:)")
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r58_selection() {
        assert_eq!(
            select_tlsrpt_record(&[
                "v=TLSRPTv1; rua=mailto:a@x.test",
                "v=TLSRPTv1; rua=mailto:b@x.test"
            ]),
            Err(TlsRptRecordError::MultipleRecords(2))
        );
        let joined = ["v=TLSRPTv1; rua=mai", "lto:r@x.test"].concat();
        assert_eq!(
            select_tlsrpt_record(&[joined]).unwrap().rua,
            vec![Rua::Mailto("r@x.test".into())]
        );
        assert_eq!(
            select_tlsrpt_record(&["v=tlsrptv1; rua=mailto:a@x.test"]),
            Err(TlsRptRecordError::NoRecord)
        );
    }

    #[test]
    fn r59_r61_grammar_and_schemes() {
        let r = select_tlsrpt_record(&["v=TLSRPTv1; foo=1; rua=mailto:a@x.test"]).unwrap();
        assert_eq!(r.rua, vec![Rua::Mailto("a@x.test".into())]);
        assert_eq!(
            select_tlsrpt_record(&["v=TLSRPTv1;"]),
            Err(TlsRptRecordError::MissingRua)
        );
        assert_eq!(
            select_tlsrpt_record(&["v=TLSRPTv1; rua=http://r.x.test/"]),
            Err(TlsRptRecordError::NoUsableRua)
        );
        let r =
            select_tlsrpt_record(&["v=TLSRPTv1;rua=mailto:a%2Cb@x.test ,  https://r.x.test/t;"])
                .unwrap();
        assert_eq!(
            r.rua,
            vec![
                Rua::Mailto("a,b@x.test".into()),
                Rua::Https("https://r.x.test/t".into())
            ]
        );
    }

    #[test]
    fn r60_raw_bang_skips_only_that_uri() {
        let r =
            select_tlsrpt_record(&["v=TLSRPTv1; rua=mailto:a@x.test!10m,mailto:b@x.test"]).unwrap();
        assert_eq!(r.rua, vec![Rua::Mailto("b@x.test".into())]);
        assert_eq!(r.skipped.len(), 1);
    }
}
