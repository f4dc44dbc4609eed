//! The `Received:` trace header (RFC 5321 §4.4, R108) and RFC 5322 dates.

use super::*;

pub(super) fn address_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

/// The `Received:` header for `envelope` as received by `by` at `at`, CRLF-terminated:
///
/// ```text
/// Received: from client.example ([192.0.2.10])
///         by relay.example (stsrelay) with ESMTPS
///         for <bob@dest.example>; Tue, 1 Jul 2025 12:00:00 +0000
/// ```
///
/// `for` is given only for a single recipient (privacy); a HELO name that is not a
/// domain or address literal is shown as a comment after the client's address.
pub fn received_header(envelope: &InboundEnvelope, by: &str, at: SystemTime) -> String {
    let ip = address_literal(envelope.peer_ip);
    let from = if is_domain(&envelope.helo) || is_address_literal(&envelope.helo) {
        format!("{} ({ip})", envelope.helo)
    } else {
        let helo: String = envelope
            .helo
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && !"()\\".contains(c) {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        format!("{ip} (HELO {helo})")
    };
    let unix = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let date = rfc5322_date(unix);
    let proto = envelope.protocol();
    match &envelope.recipients[..] {
        [one] => format!(
            "Received: from {from}\r\n\tby {by} (stsrelay) with {proto}\r\n\tfor <{}>; {date}\r\n",
            one.address
        ),
        _ => format!("Received: from {from}\r\n\tby {by} (stsrelay) with {proto};\r\n\t{date}\r\n"),
    }
}

/// RFC 5322 §3.3 date-time in UTC with a numeric zone (as RFC 3464 §2.1.2 requires of
/// DSN dates), for Unix time `unix`.
///
/// ```
/// use stsrelay::smtp::inbound::rfc5322_date;
/// assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
/// ```
pub fn rfc5322_date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let (year, month, day) = crate::clock::civil_from_days(days);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}
