//! The report e-mail (RFC 8460 §5.3, RFC 6522 `multipart/report`), DKIM-signed (§3).
//!
//! Checklist items: R81 (MIME structure), R82 (TLS-Report-* headers), R83 (Subject),
//! R84 (DKIM, no `l=`), R89 (From), R90 (part order), R115 (`TLS-Required: No`).

use mail_auth::dkim::{Canonicalization, DkimSigner};
use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};

use super::dkim::DkimSigning;

/// The headers the DKIM signature covers (`h=`), R82/R84. All of them are always present
/// in the message, so each is signed exactly once.
pub const SIGNED_HEADERS: [&str; 11] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "TLS-Report-Domain",
    "TLS-Report-Submitter",
    "Auto-Submitted",
    "TLS-Required",
];

/// Longest line the human-readable part is wrapped to (so that it stays 7bit).
const TEXT_WIDTH: usize = 72;

/// Everything the report e-mail says.
#[derive(Debug, Clone, Copy)]
pub struct ReportEmail<'a> {
    /// Header `From:` and (the caller's) envelope sender, e.g. `tlsrpt-noreply@sender.test`
    /// (R89: non-null, in the submitter domain).
    pub from: &'a str,
    /// The rua `mailto:` addresses (already percent-decoded); all go into one `To:`.
    pub to: &'a [String],
    /// The JSON's `organization-name`, shown in the human-readable part.
    pub organization_name: &'a str,
    /// The submitter domain (domain of `contact-info`), as an A-label.
    pub submitter: &'a str,
    /// The policy domain, as an A-label.
    pub policy_domain: &'a str,
    /// The JSON's `report-id`: RFC 5322 dot-atom-text (atext and inner dots). The Subject
    /// and Message-ID carry `<report_id@submitter>`.
    pub report_id: &'a str,
    /// `submitter!policy-domain!begin!end!unique.json.gz` (R79).
    pub file_name: &'a str,
    /// The gzipped JSON report (starts with `1f 8b`).
    pub gzip_json: &'a [u8],
    /// Unix seconds for the `Date:` header.
    pub date: i64,
}

/// Why a report e-mail could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ReportEmailError {
    /// A field does not have the syntax it needs in a header.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidField {
        /// Which field (`from`, `to`, `submitter`, `policy_domain`, `report_id`,
        /// `file_name`, `organization_name`, `dkim domain`, `dkim selector`).
        field: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `to` is empty.
    #[error("report e-mail has no recipients")]
    NoRecipients,
    /// The attachment is not gzip data.
    #[error("report attachment is not gzip data (must start with 1f 8b)")]
    NotGzip,
    /// mail-builder could not write the message.
    #[error("building the MIME message failed: {0}")]
    Build(std::io::Error),
    /// mail-auth could not sign.
    #[error("DKIM signing failed: {0}")]
    Dkim(String),
}

/// Builds the complete, DKIM-signed RFC 5322 message (CRLF line ends), ready to spool.
///
/// Structure (R81, R90): top-level `multipart/report; report-type="tlsrpt"` with
/// (1) a `text/plain` part ("This is an aggregate TLS report from <organization_name>",
/// `charset="us-ascii"`, 7bit; `utf-8` if the name is not ASCII) and (2) the
/// `application/tlsrpt+gzip` attachment, base64, named `file_name`. Headers: `From`,
/// `To`, `Date`, `Subject` (`Report Domain: D Submitter: S Report-ID: <id@S>`),
/// `Message-ID: <id@S>`, `MIME-Version`, `TLS-Report-Domain`, `TLS-Report-Submitter`,
/// `Auto-Submitted: auto-generated`, `TLS-Required: No`. The `DKIM-Signature` comes
/// first: `a=rsa-sha256` or `ed25519-sha256`, `c=relaxed/relaxed`, no `l=`, `h=` the
/// [`SIGNED_HEADERS`], `t=` the current time.
///
/// ```
/// use stsrelay::tlsrpt::{build_report_email, DkimKey, DkimSigning, ReportEmail};
///
/// let dkim = DkimSigning {
///     domain: "sender.test".into(),
///     selector: "tlsrpt".into(),
///     key: DkimKey::from_pem(include_str!("../../tests/fixtures/dkim/ed25519-pkcs8.pem"))?,
/// };
/// let to = vec!["tlsrpt@example.net".to_string()];
/// let msg = build_report_email(
///     &ReportEmail {
///         from: "tlsrpt-noreply@sender.test",
///         to: &to,
///         organization_name: "Sender Org",
///         submitter: "sender.test",
///         policy_domain: "example.net",
///         report_id: "20261127.example.net.1",
///         file_name: "sender.test!example.net!1795737600!1795823999!1.json.gz",
///         gzip_json: &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0],
///         date: 1_795_824_000,
///     },
///     &dkim,
/// )?;
/// let text = String::from_utf8(msg)?;
/// assert!(text.starts_with("DKIM-Signature: v=1; a=ed25519-sha256; s=tlsrpt; d=sender.test;"));
/// // Long headers are folded (CRLF + space); unfolded, the Subject reads:
/// let unfolded = text.replace("\r\n ", " ");
/// assert!(unfolded.contains(
///     "\r\nSubject: Report Domain: example.net Submitter: sender.test \
///      Report-ID: <20261127.example.net.1@sender.test>\r\n"
/// ));
/// assert!(text.contains("\r\nTLS-Required: No\r\n"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`ReportEmailError::InvalidField`] if a value would break or inject a header (CR/LF,
/// a report ID that is not dot-atom-text, a domain that is not an A-label, …),
/// [`ReportEmailError::NoRecipients`], [`ReportEmailError::NotGzip`], or
/// [`ReportEmailError::Dkim`] if signing fails.
pub fn build_report_email(
    r: &ReportEmail<'_>,
    dkim: &DkimSigning,
) -> Result<Vec<u8>, ReportEmailError> {
    validate(r, dkim)?;

    let id = format!("{}@{}", r.report_id, r.submitter);
    let subject = format!(
        "Report Domain: {} Submitter: {} Report-ID: <{id}>",
        r.policy_domain, r.submitter
    );
    let (text, charset) = human_text(r);

    let to: Vec<Address<'_>> = r.to.iter().map(|a| Address::from(a.as_str())).collect();
    let body = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "tlsrpt"),
        BodyPart::Multipart(vec![
            MimePart::new(
                ContentType::new("text/plain").attribute("charset", charset),
                BodyPart::Text(text.into()),
            ),
            MimePart::new(
                ContentType::new("application/tlsrpt+gzip"),
                BodyPart::Binary(r.gzip_json.into()),
            )
            .attachment(r.file_name),
        ]),
    );
    let unsigned = MessageBuilder::new()
        .from(Address::from(r.from))
        .to(Address::new_list(to))
        .date(Date::new(r.date))
        .header("Subject", Raw::new(subject))
        .message_id(MessageId::new(id))
        .header("MIME-Version", Raw::new("1.0"))
        .header("TLS-Report-Domain", Raw::new(r.policy_domain))
        .header("TLS-Report-Submitter", Raw::new(r.submitter))
        .header("Auto-Submitted", Raw::new("auto-generated"))
        .header("TLS-Required", Raw::new("No"))
        .body(body)
        .write_to_vec()
        .map_err(ReportEmailError::Build)?;

    let signature = DkimSigner::from_key(dkim.key.signer())
        .domain(dkim.domain.as_str())
        .selector(dkim.selector.as_str())
        .headers(SIGNED_HEADERS)
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
        .body_length(false)
        .sign(&unsigned)
        .map_err(|e| ReportEmailError::Dkim(e.to_string()))?;

    let mut out = Vec::with_capacity(unsigned.len() + 1024);
    signature.write(&mut out, true);
    out.extend_from_slice(&unsigned);
    Ok(out)
}

/// The human-readable part and its charset, wrapped so that every line stays short.
fn human_text(r: &ReportEmail<'_>) -> (String, &'static str) {
    let org: String = r
        .organization_name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut text = wrap(&format!("This is an aggregate TLS report from {org}"));
    text.push_str("\r\n");
    text.push_str(&wrap(&format!(
        "It covers the TLS connections made to the mail servers of {} and is attached \
         as an RFC 8460 JSON report (application/tlsrpt+gzip).",
        r.policy_domain
    )));
    let charset = if text.is_ascii() { "us-ascii" } else { "utf-8" };
    (text, charset)
}

/// Wraps at spaces to [`TEXT_WIDTH`]; every line ends with CRLF.
fn wrap(s: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in s.split(' ').filter(|w| !w.is_empty()) {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > TEXT_WIDTH {
            out.push_str(&line);
            out.push_str("\r\n");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out.push_str("\r\n");
    out
}

fn invalid(field: &'static str, value: &str, reason: &'static str) -> ReportEmailError {
    ReportEmailError::InvalidField {
        field,
        value: value.to_string(),
        reason,
    }
}

/// RFC 5322 atext.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c)
}

/// RFC 5322 dot-atom-text.
fn is_dot_atom(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|p| !p.is_empty() && p.chars().all(is_atext))
}

/// An A-label domain name (LDH labels, 1..=63 octets each, at most 253 in all).
fn is_domain(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// A mailbox usable in a header without quoting surprises: `local@domain`, the local part
/// free of whitespace, controls and the specials that would end the address.
fn is_mailbox(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && local
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !"<>()[],;:\\\"@".contains(c))
        && !domain.is_empty()
        && domain
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !"<>()[],;:\\\"@".contains(c))
}

fn validate(r: &ReportEmail<'_>, dkim: &DkimSigning) -> Result<(), ReportEmailError> {
    if !is_mailbox(r.from) {
        return Err(invalid("from", r.from, "not a plain local@domain address"));
    }
    if r.to.is_empty() {
        return Err(ReportEmailError::NoRecipients);
    }
    if let Some(bad) = r.to.iter().find(|a| !is_mailbox(a)) {
        return Err(invalid("to", bad, "not a plain local@domain address"));
    }
    if !is_domain(r.submitter) {
        return Err(invalid("submitter", r.submitter, "not an A-label domain"));
    }
    if !is_domain(r.policy_domain) {
        return Err(invalid(
            "policy_domain",
            r.policy_domain,
            "not an A-label domain",
        ));
    }
    if !is_dot_atom(r.report_id) {
        return Err(invalid(
            "report_id",
            r.report_id,
            "not RFC 5322 dot-atom-text (atext characters and inner dots only)",
        ));
    }
    if !r.file_name.ends_with(".json.gz")
        || !r
            .file_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!.-_".contains(c))
    {
        return Err(invalid(
            "file_name",
            r.file_name,
            "must be letters, digits, '!', '.', '-', '_' and end in .json.gz (R79)",
        ));
    }
    if !r.gzip_json.starts_with(&[0x1f, 0x8b]) {
        return Err(ReportEmailError::NotGzip);
    }
    if !is_domain(&dkim.domain) {
        return Err(invalid(
            "dkim domain",
            &dkim.domain,
            "not an A-label domain",
        ));
    }
    if !is_domain(&dkim.selector) {
        return Err(invalid(
            "dkim selector",
            &dkim.selector,
            "not a valid selector (DNS labels)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlsrpt::DkimKey;
    use mail_auth::common::parse::TxtRecordParser;
    use mail_auth::common::verify::DomainKey;
    use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
    use mail_auth::{
        AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt,
    };
    use mail_parser::{MessageParser, MimeHeaders, PartType};
    use std::borrow::Borrow;
    use std::collections::HashMap;
    use std::hash::Hash;
    use std::io::Read;
    use std::sync::Mutex;
    use std::time::Instant;

    const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dkim/");
    const SELECTOR: &str = "tlsrpt2026";
    const DOMAIN: &str = "sender.test";

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIX}{name}")).unwrap()
    }

    fn signing(key_file: &str) -> DkimSigning {
        DkimSigning {
            domain: DOMAIN.into(),
            selector: SELECTOR.into(),
            key: DkimKey::from_pem(&fixture(&format!("{key_file}.pem"))).unwrap(),
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    const JSON: &str = r#"{"organization-name":"Sender Org","date-range":{"start-datetime":"2026-11-27T00:00:00Z","end-datetime":"2026-11-27T23:59:59Z"},"contact-info":"tlsrpt@sender.test","report-id":"20261127T000000Z.example.net.a1b2","policies":[]}"#;

    struct Fixture {
        to: Vec<String>,
        gz: Vec<u8>,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                to: vec![
                    "tlsrpt@example.net".to_string(),
                    "reports+tls@rua.example.org".to_string(),
                ],
                gz: gzip(JSON.as_bytes()),
            }
        }
        fn email(&self) -> ReportEmail<'_> {
            ReportEmail {
                from: "tlsrpt-noreply@sender.test",
                to: &self.to,
                organization_name: "Sender Org",
                submitter: "sender.test",
                policy_domain: "example.net",
                report_id: "20261127T000000Z.example.net.a1b2",
                file_name: "sender.test!example.net!1795737600!1795823999!a1b2.json.gz",
                gzip_json: &self.gz,
                date: 1_795_824_123,
            }
        }
    }

    /// A TXT cache pre-filled with the key record, so mail-auth never goes to DNS.
    #[derive(Default)]
    struct TxtCache(Mutex<HashMap<Box<str>, Txt>>);

    impl ResolverCache<Box<str>, Txt> for TxtCache {
        fn get<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().get(name).cloned()
        }
        fn remove<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().remove(name)
        }
        fn insert(&self, key: Box<str>, value: Txt, _valid_until: Instant) {
            self.0.lock().unwrap().insert(key, value);
        }
    }

    /// Verifies with mail-auth against `txt` published at SELECTOR._domainkey.DOMAIN.
    async fn verify(message: &[u8], txt: &str) -> Vec<DkimResult> {
        // No name servers: a cache miss is an error, never a network query.
        let auth = MessageAuthenticator::new(
            ResolverConfig::from_name_servers(vec![]),
            ResolverOpts::default(),
        )
        .unwrap();
        let cache = TxtCache::default();
        cache.insert(
            format!("{SELECTOR}._domainkey.{DOMAIN}.").into_boxed_str(),
            Txt::from(DomainKey::parse(txt.as_bytes()).unwrap()),
            Instant::now(),
        );
        let msg = AuthenticatedMessage::parse(message).unwrap();
        auth.verify_dkim(Parameters::new(&msg).with_txt_cache(&cache))
            .await
            .iter()
            .map(|o| o.result().clone())
            .collect()
    }

    /// The DKIM-Signature header's tags (unfolded, whitespace removed from values).
    fn dkim_tags(message: &str) -> HashMap<String, String> {
        let start = message.find("DKIM-Signature:").unwrap();
        let mut value = String::new();
        for (i, line) in message[start..].split("\r\n").enumerate() {
            if i > 0 && !line.starts_with([' ', '\t']) {
                break;
            }
            value.push_str(line.strip_prefix("DKIM-Signature:").unwrap_or(line));
        }
        value
            .split(';')
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| {
                (
                    k.trim().to_string(),
                    v.chars().filter(|c| !c.is_whitespace()).collect(),
                )
            })
            .collect()
    }

    /// Unfolded value of the first top-level header `name`.
    fn header(message: &str, name: &str) -> Option<String> {
        let head = &message[..message.find("\r\n\r\n").unwrap() + 2];
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", "\t");
        unfolded.split("\r\n").find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    #[test]
    fn mime_structure_parts_and_attachment() {
        let f = Fixture::new();
        let raw = build_report_email(&f.email(), &signing("ed25519-pkcs8")).unwrap();
        let text = std::str::from_utf8(&raw).unwrap();
        assert!(
            text.split("\r\n")
                .all(|l| !l.contains('\n') && !l.contains('\r')),
            "bare LF or CR"
        );
        assert!(text.split("\r\n").all(|l| l.len() <= 998), "line over 998");
        // mail-auth writes the first DKIM-Signature line a little longer; all else <= 78.
        let after_sig = text.find("\r\nFrom:").unwrap();
        assert!(
            text[after_sig..].split("\r\n").all(|l| l.len() <= 78),
            "line too long"
        );

        let msg = MessageParser::new().parse(&raw).unwrap();
        let ct = msg.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("tlsrpt"));
        assert!(ct.attribute("boundary").is_some_and(|b| !b.is_empty()));
        assert_eq!(msg.header_raw("MIME-Version").map(str::trim), Some("1.0"));

        let root = msg.root_part();
        let PartType::Multipart(ids) = &root.body else {
            panic!("root is not multipart: {:?}", root.body)
        };
        assert_eq!(ids.len(), 2, "exactly two parts");

        let human = &msg.parts[ids[0] as usize];
        let ct = human.content_type().unwrap();
        assert_eq!(
            (ct.ctype(), ct.subtype(), ct.attribute("charset")),
            ("text", Some("plain"), Some("us-ascii"))
        );
        assert_eq!(human.content_transfer_encoding(), Some("7bit"));
        assert!(human.content_disposition().is_none());
        let PartType::Text(body) = &human.body else {
            panic!("part 1 is not text")
        };
        assert!(
            body.starts_with("This is an aggregate TLS report from Sender Org"),
            "{body}"
        );

        let report = &msg.parts[ids[1] as usize];
        let ct = report.content_type().unwrap();
        assert_eq!(
            (ct.ctype(), ct.subtype()),
            ("application", Some("tlsrpt+gzip"))
        );
        assert_eq!(report.content_transfer_encoding(), Some("base64"));
        let cd = report.content_disposition().unwrap();
        assert_eq!(cd.ctype(), "attachment");
        assert_eq!(
            cd.attribute("filename"),
            Some("sender.test!example.net!1795737600!1795823999!a1b2.json.gz")
        );
        // Quoted, as R81 shows it.
        assert!(
            text.contains(
                "filename=\"sender.test!example.net!1795737600!1795823999!a1b2.json.gz\""
            )
        );
        let PartType::Binary(bytes) = &report.body else {
            panic!("part 2 is not binary: {:?}", report.body)
        };
        assert_eq!(bytes.as_ref(), f.gz.as_slice(), "attachment bytes");
        let mut json = String::new();
        flate2::read::GzDecoder::new(bytes.as_ref())
            .read_to_string(&mut json)
            .unwrap();
        assert_eq!(json, JSON);
        // The report-type parameter is quoted too.
        let ct = header(text, "Content-Type").unwrap();
        assert!(
            ct.starts_with("multipart/report; report-type=\"tlsrpt\"; boundary=\""),
            "{ct}"
        );
    }

    #[test]
    fn headers_and_subject() {
        let f = Fixture::new();
        let raw = build_report_email(&f.email(), &signing("rsa2048-pkcs8")).unwrap();
        let text = String::from_utf8(raw).unwrap();
        assert!(text.starts_with("DKIM-Signature: "), "signature first");

        let subject = header(&text, "Subject").unwrap();
        assert_eq!(
            subject,
            "Report Domain: example.net Submitter: sender.test Report-ID: <20261127T000000Z.example.net.a1b2@sender.test>"
        );
        // R83's test: unfold by removing CRLF only, then match the regex.
        let start = text.find("\r\nSubject:").unwrap() + 2;
        let end = start + text[start..].find("\r\n").unwrap();
        let mut end = end;
        while text[end + 2..].starts_with([' ', '\t']) {
            end += 2 + text[end + 2..].find("\r\n").unwrap();
        }
        let unfolded = text[start + "Subject:".len()..end].replace("\r\n", "");
        let r83 = regex_r83(unfolded.trim_start());
        assert!(r83, "R83: {unfolded:?}");

        for (name, value) in [
            ("From", "tlsrpt-noreply@sender.test"),
            ("To", "tlsrpt@example.net, reports+tls@rua.example.org"),
            (
                "Message-ID",
                "<20261127T000000Z.example.net.a1b2@sender.test>",
            ),
            ("MIME-Version", "1.0"),
            ("TLS-Report-Domain", "example.net"),
            ("TLS-Report-Submitter", "sender.test"),
            ("Auto-Submitted", "auto-generated"),
            ("TLS-Required", "No"),
        ] {
            let got = header(&text, name).unwrap_or_else(|| panic!("{name} missing"));
            // mail-builder may write `<addr>` for a bare address.
            let got = if name == "From" || name == "To" {
                got.replace(['<', '>'], "")
            } else {
                got
            };
            assert_eq!(got, value, "{name}");
        }
        let date = header(&text, "Date").unwrap();
        let parsed = MessageParser::new().parse(text.as_bytes()).unwrap();
        assert_eq!(
            parsed.date().unwrap().to_timestamp(),
            1_795_824_123,
            "{date}"
        );
        // Each top-level header appears once.
        for name in SIGNED_HEADERS {
            let n = text[..text.find("\r\n\r\n").unwrap()]
                .split("\r\n")
                .filter(|l| {
                    l.split_once(':')
                        .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
                })
                .count();
            assert_eq!(n, 1, "{name}");
        }
    }

    /// `^Report[ \t]+Domain:[ \t]+\S+[ \t]+Submitter:[ \t]+\S+[ \t]+Report-ID:[ \t]+<[^@>\s]+@[^>\s]+>[ \t]*$`
    /// by hand (the crate has no regex dependency).
    fn regex_r83(s: &str) -> bool {
        let words: Vec<&str> = s.split([' ', '\t']).filter(|w| !w.is_empty()).collect();
        let [report, domain_kw, d, submitter_kw, sub, id_kw, id] = words[..] else {
            return false;
        };
        let id_ok = id
            .strip_prefix('<')
            .and_then(|i| i.strip_suffix('>'))
            .and_then(|i| i.split_once('@'))
            .is_some_and(|(l, r)| {
                !l.is_empty()
                    && !r.is_empty()
                    && !l.contains(['@', '>', '<'])
                    && !r.contains(['>', '<'])
            });
        report == "Report"
            && domain_kw == "Domain:"
            && !d.is_empty()
            && submitter_kw == "Submitter:"
            && !sub.is_empty()
            && id_kw == "Report-ID:"
            && id_ok
            && !s.contains(['\r', '\n'])
    }

    #[test]
    fn dkim_tags_no_l_and_h_covers_tls_report_headers() {
        let f = Fixture::new();
        for key in ["rsa2048-pkcs8", "rsa2048-pkcs1", "ed25519-pkcs8"] {
            let raw = build_report_email(&f.email(), &signing(key)).unwrap();
            let tags = dkim_tags(std::str::from_utf8(&raw).unwrap());
            assert!(!tags.contains_key("l"), "{key}: l= present: {tags:?}");
            assert_eq!(tags["d"], DOMAIN);
            assert_eq!(tags["s"], SELECTOR);
            assert_eq!(tags["c"], "relaxed/relaxed");
            assert_eq!(
                tags["a"],
                if key.starts_with("rsa") {
                    "rsa-sha256"
                } else {
                    "ed25519-sha256"
                }
            );
            let h: Vec<String> = tags["h"].split(':').map(str::to_ascii_lowercase).collect();
            for name in SIGNED_HEADERS {
                assert!(
                    h.contains(&name.to_ascii_lowercase()),
                    "{key}: {name} not in h={}",
                    tags["h"]
                );
            }
            assert!(h.contains(&"tls-report-domain".to_string()));
            assert!(h.contains(&"tls-report-submitter".to_string()));
        }
    }

    #[tokio::test]
    async fn signature_verifies_with_mail_auth_rsa_and_ed25519() {
        let f = Fixture::new();
        for key in ["rsa2048-pkcs8", "rsa2048-pkcs1", "ed25519-pkcs8"] {
            let raw = build_report_email(&f.email(), &signing(key)).unwrap();
            let txt = fixture(&format!("{key}.txt"));
            assert_eq!(
                verify(&raw, txt.trim()).await,
                vec![DkimResult::Pass],
                "{key}"
            );
        }
    }

    #[tokio::test]
    async fn tampering_and_wrong_keys_fail_verification() {
        let f = Fixture::new();
        for key in ["rsa2048-pkcs8", "ed25519-pkcs8"] {
            let raw = build_report_email(&f.email(), &signing(key)).unwrap();
            let txt = fixture(&format!("{key}.txt"));
            let txt = txt.trim();
            let text = String::from_utf8(raw).unwrap();

            // A changed TLS-Report-Domain header.
            let tampered = text.replacen(
                "TLS-Report-Domain: example.net",
                "TLS-Report-Domain: evil.example",
                1,
            );
            assert_ne!(tampered, text);
            let r = verify(tampered.as_bytes(), txt).await;
            assert!(
                matches!(r[..], [DkimResult::Fail(_)]),
                "{key}: header: {r:?}"
            );

            // A changed TLS-Report-Submitter header.
            let tampered = text.replacen(
                "TLS-Report-Submitter: sender.test",
                "TLS-Report-Submitter: sender.evil",
                1,
            );
            assert_ne!(tampered, text);
            let r = verify(tampered.as_bytes(), txt).await;
            assert!(matches!(r[..], [DkimResult::Fail(_)]), "{key}: {r:?}");

            // A changed body (one base64 character of the attachment). mail-auth 0.13
            // reports a body hash mismatch as Neutral, not Fail; either way not Pass.
            let body_at = text.find("\r\n\r\n").unwrap();
            let b64_at = body_at + text[body_at..].find("base64\r\n\r\n").unwrap() + 10;
            let mut bytes = text.clone().into_bytes();
            bytes[b64_at + 5] = if bytes[b64_at + 5] == b'A' {
                b'B'
            } else {
                b'A'
            };
            let r = verify(&bytes, txt).await;
            assert_eq!(r.len(), 1, "{key}: {r:?}");
            assert_ne!(r[0], DkimResult::Pass, "{key}: body");

            // A body that only gained a line at the end (what l= would have allowed).
            let mut longer = text.clone();
            longer.push_str("appended\r\n");
            let r = verify(longer.as_bytes(), txt).await;
            assert_ne!(r[0], DkimResult::Pass, "{key}: appended");

            // The right message against another key.
            let other = if key.starts_with("rsa") {
                fixture("rsa2048-pkcs1.txt")
            } else {
                "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=".to_string()
            };
            let r = verify(text.as_bytes(), other.trim()).await;
            assert!(matches!(r[..], [DkimResult::Fail(_)]), "{key}: {r:?}");

            // And the untouched message still passes (the checks above are not vacuous).
            assert_eq!(verify(text.as_bytes(), txt).await, vec![DkimResult::Pass]);
        }
    }

    #[test]
    fn non_ascii_organization_switches_charset() {
        let f = Fixture::new();
        let mut e = f.email();
        e.organization_name = "Größe GmbH";
        let raw = build_report_email(&e, &signing("ed25519-pkcs8")).unwrap();
        let msg = MessageParser::new().parse(&raw).unwrap();
        let PartType::Multipart(ids) = &msg.root_part().body else {
            panic!()
        };
        let human = &msg.parts[ids[0] as usize];
        assert_eq!(
            human.content_type().unwrap().attribute("charset"),
            Some("utf-8")
        );
        assert!(
            human
                .text_contents()
                .unwrap()
                .contains("report from Größe GmbH")
        );
        assert!(raw.is_ascii(), "8bit data in the message");
    }

    #[test]
    fn invalid_inputs_are_refused() {
        let f = Fixture::new();
        let dkim = signing("ed25519-pkcs8");
        let check = |e: ReportEmail<'_>, field: &str| {
            let err = build_report_email(&e, &dkim).unwrap_err();
            assert!(
                matches!(&err, ReportEmailError::InvalidField { field: f, .. } if *f == field),
                "{field}: {err:?}"
            );
        };
        let mut e = f.email();
        e.report_id = "2026-11-27T00:00:00Z_x";
        check(e, "report_id");
        let mut e = f.email();
        e.report_id = "a\r\nBcc: x@evil.test";
        check(e, "report_id");
        let mut e = f.email();
        e.policy_domain = "example.net\r\nX: y";
        check(e, "policy_domain");
        let mut e = f.email();
        e.submitter = "";
        check(e, "submitter");
        let mut e = f.email();
        e.from = "no at sign";
        check(e, "from");
        let mut e = f.email();
        e.file_name = "x\".json.gz";
        check(e, "file_name");
        let mut e = f.email();
        e.file_name = "sender.test!example.net!1!2!a.json";
        check(e, "file_name");
        let bad_to = vec!["a@b.test>, evil@x.test".to_string()];
        let mut e = f.email();
        e.to = &bad_to;
        check(e, "to");

        let mut e = f.email();
        e.to = &[];
        assert!(matches!(
            build_report_email(&e, &dkim),
            Err(ReportEmailError::NoRecipients)
        ));
        let mut e = f.email();
        e.gzip_json = JSON.as_bytes();
        assert!(matches!(
            build_report_email(&e, &dkim),
            Err(ReportEmailError::NotGzip)
        ));
        let bad_sel = DkimSigning {
            domain: DOMAIN.into(),
            selector: "bad selector".into(),
            key: DkimKey::from_pem(&fixture("ed25519-pkcs8.pem")).unwrap(),
        };
        let err = build_report_email(&f.email(), &bad_sel).unwrap_err();
        assert!(
            matches!(
                err,
                ReportEmailError::InvalidField {
                    field: "dkim selector",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn wrap_keeps_lines_short() {
        let long = "word ".repeat(60);
        let w = wrap(&long);
        assert!(w.split("\r\n").all(|l| l.len() <= TEXT_WIDTH), "{w}");
        assert_eq!(w.split_whitespace().count(), 60);
    }
}
