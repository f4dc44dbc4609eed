//! The report e-mail's DKIM signature checked through real DNS (the in-process test DNS
//! server, the key record split into 255-byte strings as it is published) with mail-auth,
//! and, when `STSRELAY_DKIMPY` names a Python with `dkimpy` (and `pynacl`) installed, with
//! dkimpy too:
//!
//! ```text
//! python3 -m venv /tmp/dkimvenv && /tmp/dkimvenv/bin/pip install dkimpy pynacl
//! STSRELAY_DKIMPY=/tmp/dkimvenv/bin/python cargo test --test report_email
//! ```
//!
//! dkimpy 1.1.8 does not understand a colon list in the key record's `s=` tag: with R84's
//! `s=email:tlsrpt` it ignores the key and fails. It passes with no `s=` or `s=*` (ordinary
//! and `tlsrpt=True` verification) and with `s=tlsrpt` (only when told the message is a
//! TLS report).

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use common::dns::TestDns;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use stsrelay::tlsrpt::{DkimKey, DkimSigning, ReportEmail, build_report_email};

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dkim/");
const DOMAIN: &str = "sender.test";
const SELECTOR: &str = "tlsrpt";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(Path::new(FIX).join(name)).unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn report(key_file: &str) -> Vec<u8> {
    let dkim = DkimSigning {
        domain: DOMAIN.into(),
        selector: SELECTOR.into(),
        key: DkimKey::from_pem_file(&Path::new(FIX).join(key_file)).unwrap(),
    };
    let to = vec!["tlsrpt@example.net".to_string()];
    let gz = gzip(br#"{"organization-name":"Sender Org","report-id":"r1","policies":[]}"#);
    build_report_email(
        &ReportEmail {
            from: "tlsrpt-noreply@sender.test",
            to: &to,
            organization_name: "Sender Org",
            submitter: DOMAIN,
            policy_domain: "example.net",
            report_id: "r1.example.net",
            file_name: "sender.test!example.net!1795737600!1795823999!r1.json.gz",
            gzip_json: &gz,
            date: 1_795_824_000,
        },
        &dkim,
    )
    .unwrap()
}

/// Splits a TXT value into character-strings of at most 255 bytes.
fn chunks(s: &str) -> Vec<&str> {
    s.as_bytes()
        .chunks(255)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect()
}

fn authenticator(addr: SocketAddr) -> MessageAuthenticator {
    let mut udp = ConnectionConfig::new(ProtocolConfig::Udp);
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::new(ProtocolConfig::Tcp);
    tcp.port = addr.port();
    let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![ns]), opts).unwrap()
}

async fn mail_auth_verify(auth: &MessageAuthenticator, message: &[u8]) -> Vec<DkimResult> {
    let msg = AuthenticatedMessage::parse(message).unwrap();
    auth.verify_dkim(&msg)
        .await
        .iter()
        .map(|o| o.result().clone())
        .collect()
}

#[tokio::test]
async fn mail_auth_verifies_through_dns_rsa_and_ed25519() {
    let dns = TestDns::start().await;
    let auth = authenticator(dns.addr());
    let name = format!("{SELECTOR}._domainkey.{DOMAIN}");
    for key in ["rsa2048-pkcs8", "rsa2048-pkcs1", "ed25519-pkcs8"] {
        let record = fixture(&format!("{key}.txt"));
        let record = record.trim();
        dns.set_txt(&name, &[&chunks(record)]);
        let msg = report(&format!("{key}.pem"));
        assert_eq!(
            mail_auth_verify(&auth, &msg).await,
            vec![DkimResult::Pass],
            "{key}"
        );

        let text = String::from_utf8(msg).unwrap();
        let tampered = text.replacen(
            "TLS-Report-Domain: example.net",
            "TLS-Report-Domain: example.org",
            1,
        );
        let r = mail_auth_verify(&auth, tampered.as_bytes()).await;
        assert!(matches!(r[..], [DkimResult::Fail(_)]), "{key}: {r:?}");

        // No key published: not a pass either.
        dns.remove(&name);
        let r = mail_auth_verify(&auth, text.as_bytes()).await;
        assert!(
            r.len() == 1 && r[0] != DkimResult::Pass,
            "{key}: without key: {r:?}"
        );
    }
}

/// Runs dkimpy's `dkim.verify` on `message` with `record` as the only DNS answer;
/// returns its printed verdict.
fn dkimpy(python: &str, message: &[u8], record: &str, tlsrpt: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("msg.eml");
    std::fs::write(&path, message).unwrap();
    let script = r#"
import sys, dkim
msg = open(sys.argv[1], 'rb').read()
rec = sys.argv[2].encode()
mode = {'false': False, 'true': True, 'strict': 'strict'}[sys.argv[3]]
try:
    ok = dkim.verify(msg, dnsfunc=lambda name, timeout=5: rec, tlsrpt=mode)
    print('pass' if ok else 'fail')
except Exception as e:
    print('error', type(e).__name__, e)
"#;
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&path)
        .arg(record)
        .arg(tlsrpt)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn dkimpy_verifies_when_available() {
    let Ok(python) = std::env::var("STSRELAY_DKIMPY") else {
        eprintln!("STSRELAY_DKIMPY not set: dkimpy check skipped");
        return;
    };
    for key in ["rsa2048-pkcs8", "rsa2048-pkcs1", "ed25519-pkcs8"] {
        let msg = report(&format!("{key}.pem"));
        let record = fixture(&format!("{key}.txt"));
        let record = record.trim();
        for mode in ["false", "true"] {
            for rec in [
                record.replace(" s=email:tlsrpt;", ""),
                record.replace("s=email:tlsrpt", "s=*"),
            ] {
                assert_eq!(
                    dkimpy(&python, &msg, &rec, mode),
                    "pass",
                    "{key} tlsrpt={mode}: {rec}"
                );
            }
        }
        assert_eq!(
            dkimpy(
                &python,
                &msg,
                &record.replace("s=email:tlsrpt", "s=tlsrpt"),
                "strict"
            ),
            "pass",
            "{key} s=tlsrpt strict"
        );
        let text = String::from_utf8(msg).unwrap();
        let tampered = text.replacen(
            "TLS-Report-Submitter: sender.test",
            "TLS-Report-Submitter: sender.evil",
            1,
        );
        assert_eq!(
            dkimpy(
                &python,
                tampered.as_bytes(),
                &record.replace(" s=email:tlsrpt;", ""),
                "true"
            ),
            "fail",
            "{key} tampered"
        );
        // dkimpy 1.1.8 compares the whole s= value with "*", "email" and "tlsrpt", so a
        // colon list (RFC 6376 §3.6.1) such as R84's s=email:tlsrpt drops the key: it
        // fails there although the signature is good. Shown, not asserted.
        eprintln!(
            "{key}: dkimpy with s=email:tlsrpt: tlsrpt=false {:?}, true {:?}",
            dkimpy(&python, text.as_bytes(), record, "false"),
            dkimpy(&python, text.as_bytes(), record, "true")
        );
    }
}
