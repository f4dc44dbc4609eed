//! Command argument parsing (RFC 5321 §4.1.2, RFC 3461, RFC 6531): paths, mailboxes,
//! ESMTP parameters, xtext and base64.

use super::*;

pub(super) fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Splits `<path> params` into the text between the brackets and the parameters.
pub(super) fn split_path(s: &str) -> Option<(&str, &str)> {
    let bytes = s.as_bytes();
    if bytes.first() != Some(&b'<') {
        return None;
    }
    let mut in_quote = false;
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_quote => i += 1,
            b'"' => in_quote = !in_quote,
            b'>' if !in_quote => {
                let after = &s[i + 1..];
                return if after.is_empty() {
                    Some((&s[1..i], ""))
                } else if let Some(params) = after.strip_prefix(' ') {
                    Some((&s[1..i], params.trim_start_matches(' ')))
                } else {
                    None
                };
            }
            _ => {}
        }
        i += 1;
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AddrError {
    Syntax,
    TooLong,
}

/// Parses a non-null path (without the brackets): an optional source route, which is
/// dropped (RFC 5321 §3.6.1), and a mailbox, returned as written. Non-ASCII is allowed
/// here (RFC 6531); the caller checks SMTPUTF8.
pub(super) fn parse_path(inner: &str) -> Result<String, AddrError> {
    if inner.len() + 2 > MAX_PATH {
        return Err(AddrError::TooLong);
    }
    let mailbox = if inner.starts_with('@') {
        let (route, mailbox) = inner.split_once(':').ok_or(AddrError::Syntax)?;
        for hop in route.split(',') {
            let domain = hop.strip_prefix('@').ok_or(AddrError::Syntax)?;
            if !is_domain(domain) {
                return Err(AddrError::Syntax);
            }
        }
        mailbox
    } else {
        inner
    };
    if is_mailbox(mailbox) {
        Ok(mailbox.to_string())
    } else {
        Err(AddrError::Syntax)
    }
}

/// `Mailbox = Local-part "@" ( Domain / address-literal )`.
pub(super) fn is_mailbox(s: &str) -> bool {
    let (local, domain) = if let Some(quoted) = s.strip_prefix('"') {
        // Quoted-string: qtextSMTP / quoted-pairSMTP, then DQUOTE "@".
        let mut chars = quoted.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, e)) if (' '..='~').contains(&e) => {}
                    _ => return false,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                ' ' | '!' | '#'..='[' | ']'..='~' => {}
                c if !c.is_ascii() && !c.is_control() => {}
                _ => return false,
            }
        }
        let Some(end) = end else { return false };
        let Some(domain) = quoted[end + 1..].strip_prefix('@') else {
            return false;
        };
        (&s[..end + 2], domain)
    } else {
        let Some((local, domain)) = s.split_once('@') else {
            return false;
        };
        if !local.split('.').all(is_atom) {
            return false;
        }
        (local, domain)
    };
    !local.is_empty() && (is_domain(domain) || is_address_literal(domain))
}

/// `Atom = 1*atext` (RFC 5322 atext, plus UTF8-non-ascii per RFC 6531).
pub(super) fn is_atom(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || "!#$%&'*+-/=?^_`{|}~".contains(c)
                || (!c.is_ascii() && !c.is_control())
        })
}

/// `Domain = sub-domain *("." sub-domain)`, LDH labels of 1–63 octets, ≤ 255 octets;
/// U-labels are checked through their A-label form (RFC 6531).
pub(super) fn is_domain(d: &str) -> bool {
    if !d.is_ascii() {
        return match idna::domain_to_ascii_strict(d) {
            Ok(ascii) => ascii.is_ascii() && is_domain(&ascii),
            Err(_) => false,
        };
    }
    crate::dns::is_ldh_domain(d)
}

/// `[IPv4]` or `[IPv6:…]` (general address literals are not accepted).
pub(super) fn is_address_literal(d: &str) -> bool {
    let Some(inner) = d.strip_prefix('[').and_then(|s| s.strip_suffix(']')) else {
        return false;
    };
    match strip_prefix_ci(inner, "IPv6:") {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => inner.parse::<Ipv4Addr>().is_ok(),
    }
}

/// `esmtp-param *(SP esmtp-param)`; keywords upper-cased.
pub(super) fn parse_params(s: &str) -> Result<Vec<(String, Option<&str>)>, ()> {
    let mut params = Vec::new();
    for word in s.split(' ').filter(|w| !w.is_empty()) {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let kb = key.as_bytes();
        if kb.is_empty()
            || !kb[0].is_ascii_alphanumeric()
            || !kb.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
        {
            return Err(());
        }
        if let Some(v) = value
            && (v.is_empty() || v.chars().any(|c| c == '=' || c.is_control() || c == ' '))
        {
            return Err(());
        }
        params.push((key.to_ascii_uppercase(), value));
    }
    Ok(params)
}

pub(super) fn is_size(v: &str) -> bool {
    (1..=20).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit())
}

/// `NOTIFY=NEVER` or a list of `SUCCESS`, `FAILURE`, `DELAY` (RFC 3461 §4.1).
pub(super) fn parse_notify(v: &str) -> Option<Notify> {
    if v.eq_ignore_ascii_case("NEVER") {
        return Some(Notify::NEVER);
    }
    let mut n = Notify::NEVER;
    for item in v.split(',') {
        match item.to_ascii_uppercase().as_str() {
            "SUCCESS" => n.success = true,
            "FAILURE" => n.failure = true,
            "DELAY" => n.delay = true,
            _ => return None,
        }
    }
    Some(n)
}

/// `ORCPT=addr-type ";" xtext` (RFC 3461 §4.2).
pub(super) fn parse_orcpt(v: &str) -> Option<Orcpt> {
    if v.len() > MAX_ORCPT {
        return None;
    }
    let (addr_type, xtext) = v.split_once(';')?;
    if addr_type.is_empty()
        || !addr_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    let address = xtext_decode(xtext)?;
    if address.is_empty() || address.chars().any(char::is_control) {
        return None;
    }
    Some(Orcpt {
        addr_type: addr_type.to_string(),
        address,
    })
}

/// Decodes RFC 3461 xtext (`+HH` escapes; hex digits in either case). `None` if the text
/// is not xtext or does not decode to UTF-8.
pub fn xtext_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = s.get(i + 1..i + 3)?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c @ b'!'..=b'~' if c != b'=' => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes text as RFC 3461 xtext (for relaying ENVID and ORCPT to the next hop).
///
/// ```
/// use stsrelay::smtp::inbound::{xtext_decode, xtext_encode};
/// assert_eq!(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d");
/// assert_eq!(xtext_decode("a+2Bb+3Dc+20d").as_deref(), Some("a+b=c d"));
/// ```
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Strict base64 (RFC 4648 §4, padding required) for SASL responses.
pub(super) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (n, chunk) in b.chunks(4).enumerate() {
        let last = (n + 1) * 4 == b.len();
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut acc = 0u32;
        for &c in &chunk[..4 - pad] {
            acc = (acc << 6) | val(c)?;
        }
        acc <<= 6 * pad as u32;
        let bytes = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}
