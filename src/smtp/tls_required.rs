//! RFC 8689 §5: a message's `TLS-Required: No` header field asks that TLS policies
//! (MTA-STS, DANE) not stop its delivery. TLS-RPT reports carry it (R85, R115).

/// Does the message's header section contain `TLS-Required: No`? Field names and the
/// value are case-insensitive; folded values and surrounding whitespace are allowed.
/// Only the header section (up to the first empty line) is looked at.
///
/// ```
/// use stsrelay::smtp::says_tls_not_required;
/// assert!(says_tls_not_required(b"From: a@b\r\nTLS-Required: No\r\n\r\nbody\r\n"));
/// assert!(says_tls_not_required(b"tls-required:\r\n  no \r\n\r\n"));
/// assert!(!says_tls_not_required(b"From: a@b\r\n\r\nTLS-Required: No\r\n"));
/// assert!(!says_tls_not_required(b"TLS-Required: Yes\r\n\r\n"));
/// ```
pub fn says_tls_not_required(message: &[u8]) -> bool {
    let mut field: Option<Vec<u8>> = None;
    let mut found = false;
    let mut check = |f: &Option<Vec<u8>>| {
        if let Some(f) = f
            && let Some(colon) = f.iter().position(|&b| b == b':')
            && f[..colon]
                .trim_ascii()
                .eq_ignore_ascii_case(b"tls-required")
            && f[colon + 1..].trim_ascii().eq_ignore_ascii_case(b"no")
        {
            found = true;
        }
    };
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            // Folded continuation (RFC 5322 §2.2.3): unfold.
            if let Some(f) = field.as_mut() {
                f.push(b' ');
                f.extend_from_slice(line);
            }
            continue;
        }
        check(&field);
        field = Some(line.to_vec());
    }
    check(&field);
    found
}
