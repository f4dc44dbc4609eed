//! Delivery status notifications (RFC 3464, in a RFC 6522 multipart/report) for
//! recipients that failed permanently or ran out of queue lifetime.

use super::spool::{Envelope, Ret};
use std::fmt::Write;

/// One failed recipient.
#[derive(Debug, Clone)]
pub struct Failed {
    /// The address as given in RCPT TO.
    pub address: String,
    /// `ORCPT` as given (`rfc822;…`, xtext-decoded), if any.
    pub orcpt: Option<String>,
    /// The last reason (SMTP reply or our own diagnosis).
    pub reason: String,
}

/// The enhanced status code in a reason like `550 5.1.1 …` or `host said: 550 5.1.1 …`;
/// `5.0.0` when there is none. Queue-lifetime bounces of temporary errors keep the
/// temporary detail but report class 5 (`Action: failed`).
pub fn status_of(reason: &str) -> String {
    let code = reason.split_whitespace().find(|w| {
        let parts: Vec<&str> = w.split('.').collect();
        parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    });
    match code {
        Some(c) => format!("5{}", &c[1..]),
        None => "5.0.0".into(),
    }
}

/// Build the DSN message for `failed` recipients of a message from `envelope`.
/// `original` is the original message (headers and body, CRLF); with `RET=HDRS` (or
/// no RET) only its header is returned (RFC 3461 §4.3 leaves the default to us).
pub fn build_dsn(
    hostname: &str,
    envelope: &Envelope,
    original: &[u8],
    failed: &[Failed],
    now: i64,
    unique: &str,
) -> Vec<u8> {
    let boundary = format!("=_dsn_{unique}");
    let date = crate::smtp::rfc5322_date(now.max(0) as u64);
    let mut m = String::new();
    let _ = write!(
        m,
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{to}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Date: {date}\r\n\
         Message-ID: <{unique}.dsn@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\r\n\
         This is a MIME-encapsulated message.\r\n\r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n\
         This is the mail system at {hostname}.\r\n\r\n\
         Your message could not be delivered to one or more recipients.\r\n\r\n",
        to = envelope.mail_from,
    );
    for f in failed {
        let _ = write!(m, "<{}>: {}\r\n", f.address, one_line(&f.reason));
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; {hostname}\r\n"
    );
    if let Some(envid) = &envelope.envid {
        let _ = write!(m, "Original-Envelope-Id: {}\r\n", one_line(envid));
    }
    let _ = write!(
        m,
        "Arrival-Date: {}\r\n",
        crate::smtp::rfc5322_date(envelope.received_at.max(0) as u64)
    );
    for f in failed {
        let _ = write!(m, "\r\nFinal-Recipient: rfc822; {}\r\n", f.address);
        if let Some(o) = &f.orcpt {
            let _ = write!(m, "Original-Recipient: {}\r\n", one_line(o));
        }
        let _ = write!(
            m,
            "Action: failed\r\nStatus: {}\r\nDiagnostic-Code: smtp; {}\r\nLast-Attempt-Date: {date}\r\n",
            status_of(&f.reason),
            one_line(&f.reason)
        );
    }
    let full = matches!(envelope.ret, Some(Ret::Full));
    let _ = write!(
        m,
        "\r\n--{boundary}\r\nContent-Type: {}\r\n\r\n",
        if full {
            "message/rfc822"
        } else {
            "message/rfc822-headers"
        }
    );
    let mut out = m.into_bytes();
    if full {
        out.extend_from_slice(original);
        if !original.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    } else {
        out.extend_from_slice(header_of(original));
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The header section of a message, through its terminating empty line.
fn header_of(msg: &[u8]) -> &[u8] {
    match msg.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &msg[..i + 4],
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        assert_eq!(
            status_of("mx[1.2.3.4] said: 550 5.1.1 no such user"),
            "5.1.1"
        );
        assert_eq!(status_of("451 4.7.5 MX not permitted"), "5.7.5");
        assert_eq!(status_of("connection refused"), "5.0.0");
        assert_eq!(status_of("version 1.2.3 of x"), "5.0.0");
    }

    #[test]
    fn dsn_has_rfc3464_parts() {
        let env = Envelope {
            mail_from: "alice@sender.test".into(),
            envid: Some("ENV1".into()),
            received_at: 1_700_000_000,
            ..Envelope::default()
        };
        let original = b"Subject: hi\r\nFrom: alice@sender.test\r\n\r\nsecret body\r\n";
        let failed = [Failed {
            address: "bob@dest.test".into(),
            orcpt: Some("rfc822;bob@dest.test".into()),
            reason: "mx.dest.test[192.0.2.1] said: 550 5.1.1 no such user".into(),
        }];
        let dsn = String::from_utf8(build_dsn(
            "relay.test",
            &env,
            original,
            &failed,
            1_700_000_100,
            "X1",
        ))
        .unwrap();
        assert!(dsn.contains("To: <alice@sender.test>\r\n"));
        assert!(dsn.contains("multipart/report; report-type=delivery-status;"));
        assert!(dsn.contains(
            "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay.test\r\n"
        ));
        assert!(dsn.contains("Original-Envelope-Id: ENV1\r\n"));
        assert!(dsn.contains("Final-Recipient: rfc822; bob@dest.test\r\nOriginal-Recipient: rfc822;bob@dest.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"));
        assert!(dsn.contains("Content-Type: message/rfc822-headers\r\n\r\nSubject: hi\r\n"));
        assert!(!dsn.contains("secret body"), "RET=HDRS by default: no body");
        assert!(dsn.ends_with("--=_dsn_X1--\r\n"));
        let full = Envelope {
            ret: Some(Ret::Full),
            ..env
        };
        let dsn =
            String::from_utf8(build_dsn("relay.test", &full, original, &failed, 0, "X2")).unwrap();
        assert!(
            dsn.contains("Content-Type: message/rfc822\r\n\r\nSubject: hi")
                && dsn.contains("secret body")
        );
    }
}
