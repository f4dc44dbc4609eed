//! `stsrelay run` end to end through the real binary: an SMTP client hands mail to the
//! relay, which delivers it to in-process MX sinks under MTA-STS policies served by an
//! in-process DNS server and HTTPS policy host. What happened is read from the sinks
//! and from `stsrelay queue list --json`.

mod common;

use common::relay::{Lab, connect, eventually, ip, queue_json, submit};
use common::smtp::SinkOptions;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// TLS-RPT session counters the relay stored, read from its data dir.
async fn sessions(lab: &Lab) -> Vec<(stsrelay::tlsrpt::CounterKey, u64)> {
    use stsrelay::store::ReportStore;
    let store = stsrelay::store::SqliteStore::open(&lab.dir.path().join("data")).unwrap();
    store.counts(None, None).await.unwrap()
}

async fn failure_of(lab: &Lab, mx: &str) -> Option<(String, String)> {
    sessions(lab).await.into_iter().find_map(|(k, _)| {
        k.failure
            .filter(|f| f.receiving_mx_hostname.as_deref() == Some(mx))
            .map(|f| {
                (
                    f.result_type.as_str().to_string(),
                    f.failure_reason_code.unwrap_or_default(),
                )
            })
    })
}

const MSG: &str = "Subject: test\r\nFrom: alice@sender.test\r\n\r\nHello.\r\n.leading dot\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_good_mx_gets_the_message_over_verified_tls() {
    let mut lab = Lab::new(&[40]).await;
    lab.policy(
        "good.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.good.test\nmax_age: 86400\n",
    );
    let leaf = lab.ca.leaf(&["mx.good.test"]);
    let s = lab
        .mx(
            "good.test",
            "mx.good.test",
            40,
            SinkOptions::tls("mx.good.test", leaf.server_config()),
        )
        .await;
    let relay = lab.start_relay("").await;
    let reply = submit(
        &relay,
        "alice@sender.test",
        &["bob@good.test", "carol@good.test"],
        MSG,
    )
    .await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    eventually("delivery", &lab, async || {
        !lab.sinks[s].messages().is_empty()
    })
    .await;
    let m = &lab.sinks[s].messages()[0];
    assert!(m.tls, "delivered over TLS");
    assert_eq!(m.sni.as_deref(), Some("mx.good.test"));
    assert_eq!(m.mail_from, "alice@sender.test");
    assert_eq!(
        m.rcpt_to,
        vec!["bob@good.test", "carol@good.test"],
        "one transaction per domain"
    );
    let data = String::from_utf8_lossy(&m.data);
    assert!(data.starts_with("Received: "), "trace header added: {data}");
    assert!(
        data.contains("\r\n.leading dot\r\n"),
        "dot-stuffing round-trips: {data}"
    );
    eventually("queue empty", &lab, async || {
        queue_json(&relay).await.as_array().unwrap().is_empty()
    })
    .await;
    // One successful STS session recorded for TLS-RPT.
    eventually("session recorded", &lab, async || {
        !sessions(&lab).await.is_empty()
    })
    .await;
    let counts = sessions(&lab).await;
    assert_eq!(counts.len(), 1, "{counts:?}");
    let (k, n) = &counts[0];
    assert_eq!(*n, 1);
    assert_eq!(k.policy_domain, "good.test");
    assert_eq!(k.policy.policy_type, stsrelay::tlsrpt::PolicyType::Sts);
    assert_eq!(k.policy.mx_host, vec!["mx.good.test"]);
    assert!(
        k.policy
            .policy_strings
            .contains(&"mode: enforce".to_string())
    );
    assert!(k.failure.is_none());
    let log = lab.log();
    assert!(
        log.lines().any(|l| l.contains("delivery attempt")
            && l.contains("mx.good.test")
            && l.contains("mode=\"enforce\"")
            && l.contains("tls=TLSv1.3 verified")
            && l.contains("delivered")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_failures_defer_and_a_fixed_policy_delivers() {
    let mut lab = Lab::new(&[41, 42, 43]).await;
    // Wrong-name certificate, and no STARTTLS: both must be deferred, nothing delivered.
    lab.policy(
        "wrongname.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.wrongname.test\nmax_age: 86400\n",
    );
    let wrong = lab.ca.leaf(&["other.wrongname.test"]);
    let s_wrong = lab
        .mx(
            "wrongname.test",
            "mx.wrongname.test",
            41,
            SinkOptions::tls("mx.wrongname.test", wrong.server_config()),
        )
        .await;
    lab.policy(
        "plain.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.plain.test\nmax_age: 86400\n",
    );
    let s_plain = lab
        .mx(
            "plain.test",
            "mx.plain.test",
            42,
            SinkOptions::plain("mx.plain.test"),
        )
        .await;
    // MX not in the policy: deferred without a connection; fixed by a new policy id.
    lab.policy(
        "moved.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.old.moved.test\nmax_age: 86400\n",
    );
    let leaf = lab.ca.leaf(&["mx.moved.test"]);
    let s_moved = lab
        .mx(
            "moved.test",
            "mx.moved.test",
            43,
            SinkOptions::tls("mx.moved.test", leaf.server_config()),
        )
        .await;
    let relay = lab.start_relay("[queue]\nretry_secs = [1]\n").await;
    for d in ["wrongname.test", "plain.test", "moved.test"] {
        let reply = submit(&relay, "alice@sender.test", &[&format!("bob@{d}")], MSG).await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    eventually("three deferrals", &lab, async || {
        let q = queue_json(&relay).await;
        q.as_array()
            .unwrap()
            .iter()
            .filter(|m| m["recipients"][0]["state"] == "deferred")
            .count()
            == 3
    })
    .await;
    let q = queue_json(&relay).await;
    let reason = |d: &str| {
        q.as_array()
            .unwrap()
            .iter()
            .find(|m| m["recipients"][0]["address"] == format!("bob@{d}"))
            .unwrap()["recipients"][0]["last_reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        reason("wrongname.test").contains("4.7.5"),
        "{}",
        reason("wrongname.test")
    );
    assert!(
        reason("plain.test").contains("4.7.4"),
        "{}",
        reason("plain.test")
    );
    assert!(
        reason("moved.test").contains("not permitted by the MTA-STS policy"),
        "{}",
        reason("moved.test")
    );
    assert!(lab.sinks[s_wrong].messages().is_empty());
    assert!(
        lab.sinks[s_plain].messages().is_empty(),
        "never plaintext under enforce"
    );
    assert_eq!(
        lab.sinks[s_moved].connections(),
        0,
        "an MX outside the policy is not even connected to"
    );
    // Each failure is recorded with its RFC 8460 result type.
    eventually("failures recorded", &lab, async || {
        failure_of(&lab, "mx.moved.test").await.is_some()
    })
    .await;
    let ft = |a: &str, b: &str| Some((a.to_string(), b.to_string()));
    assert_eq!(
        failure_of(&lab, "mx.wrongname.test").await,
        ft("certificate-host-mismatch", "certificate-host-mismatch")
    );
    assert_eq!(
        failure_of(&lab, "mx.plain.test").await,
        ft("starttls-not-supported", "starttls-not-offered")
    );
    assert_eq!(
        failure_of(&lab, "mx.moved.test").await,
        ft("validation-failure", "mx-not-in-policy")
    );
    // The domain fixes its policy (new id): the next try delivers.
    lab.policy(
        "moved.test",
        "2",
        "version: STSv1\nmode: enforce\nmx: mx.moved.test\nmax_age: 86400\n",
    );
    eventually("delivery after the policy fix", &lab, async || {
        !lab.sinks[s_moved].messages().is_empty()
    })
    .await;
    assert!(lab.sinks[s_moved].messages()[0].tls);
    assert!(lab.sinks[s_wrong].messages().is_empty());
    assert!(lab.sinks[s_plain].messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testing_mode_and_no_policy_deliver_and_bounces_reach_the_sender() {
    let mut lab = Lab::new(&[44, 45, 46, 47]).await;
    lab.policy(
        "testing.test",
        "1",
        "version: STSv1\nmode: testing\nmx: mx.testing.test\nmax_age: 86400\n",
    );
    let untrusted = common::pki::self_signed(&["mx.testing.test"]);
    let s_testing = lab
        .mx(
            "testing.test",
            "mx.testing.test",
            44,
            SinkOptions::tls("mx.testing.test", untrusted.server_config()),
        )
        .await;
    let s_none = lab
        .mx(
            "nopolicy.test",
            "mx.nopolicy.test",
            45,
            SinkOptions::plain("mx.nopolicy.test"),
        )
        .await;
    let mut reject = SinkOptions::plain("mx.reject.test");
    reject.reject_rcpt = Some("550 5.1.1 no such user".into());
    lab.mx("reject.test", "mx.reject.test", 46, reject).await;
    let s_sender = lab
        .mx(
            "sender.test",
            "mx.sender.test",
            47,
            SinkOptions::plain("mx.sender.test"),
        )
        .await;
    let relay = lab.start_relay("").await;
    submit(&relay, "alice@sender.test", &["bob@testing.test"], MSG).await;
    submit(&relay, "alice@sender.test", &["bob@nopolicy.test"], MSG).await;
    submit(&relay, "alice@sender.test", &["nobody@reject.test"], MSG).await;
    eventually("testing-mode delivery", &lab, async || {
        !lab.sinks[s_testing].messages().is_empty()
    })
    .await;
    assert!(
        lab.sinks[s_testing].messages()[0].tls,
        "unauthenticated TLS in testing mode"
    );
    eventually("testing failure recorded", &lab, async || {
        failure_of(&lab, "mx.testing.test").await.is_some()
    })
    .await;
    assert_eq!(
        failure_of(&lab, "mx.testing.test").await.unwrap().0,
        "certificate-not-trusted"
    );
    eventually("no-policy delivery", &lab, async || {
        !lab.sinks[s_none].messages().is_empty()
    })
    .await;
    eventually("bounce at the sender's MX", &lab, async || {
        !lab.sinks[s_sender].messages().is_empty()
    })
    .await;
    let dsn = &lab.sinks[s_sender].messages()[0];
    assert_eq!(dsn.mail_from, "", "bounces have a null reverse-path");
    assert_eq!(dsn.rcpt_to, vec!["alice@sender.test"]);
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(text.contains("report-type=delivery-status"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@reject.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    eventually("queue empty", &lab, async || {
        queue_json(&relay).await.as_array().unwrap().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_server_allow_cannot_relay() {
    let lab = Lab::new(&[48]).await;
    let relay = lab.start_relay("allow = [\"127.0.0.48/32\"]\n").await;
    // From 127.0.0.1 (not allowed): every recipient form is refused.
    let mut c = connect(&relay).await;
    c.ehlo("client.test").await.unwrap();
    assert!(
        c.command("MAIL FROM:<a@sender.test>")
            .await
            .unwrap()
            .is_positive()
    );
    for rcpt in [
        "u@external.test",
        "u%external.test@relay.sender.test",
        "\"u@external.test\"@relay.sender.test",
        "@relay.sender.test:u@external.test",
    ] {
        let r = c.command(&format!("RCPT TO:<{rcpt}>")).await.unwrap();
        assert_eq!(r.code, 550, "{rcpt}: {}", r.text());
        assert!(r.text().contains("5.7.1"), "{}", r.text());
    }
    c.quit().await;
    // From the allowed address: accepted.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(ip(48)), 0)).unwrap();
    let stream = sock.connect(relay.listen).await.unwrap();
    let mut lines = tokio::io::BufReader::new(stream);
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut buf = String::new();
    lines.read_line(&mut buf).await.unwrap();
    lines.get_mut().write_all(b"HELO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<u@external.test>\r\nQUIT\r\n").await.unwrap();
    let mut replies = Vec::new();
    for _ in 0..4 {
        buf.clear();
        lines.read_line(&mut buf).await.unwrap();
        replies.push(buf.trim_end().to_string());
    }
    assert!(replies[2].starts_with("250"), "{replies:?}");
    assert!(queue_json(&relay).await.as_array().unwrap().is_empty());
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_plain_over_starttls_lets_an_outside_client_relay() {
    let mut lab = Lab::new(&[49]).await;
    let s = lab
        .mx(
            "authdest.test",
            "mx.authdest.test",
            49,
            SinkOptions::plain("mx.authdest.test"),
        )
        .await;
    let server_leaf = lab.ca.leaf(&["relay.sender.test"]);
    let (cert, key) = server_leaf.write_pem(lab.dir.path(), "relay");
    let hash = stsrelay::smtp::auth::hash_password("correct horse").unwrap();
    let users = lab.dir.path().join("users");
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    let relay = lab
        .start_relay(&format!(
            "allow = [\"127.0.0.250/32\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\nauth_users_file = \"{}\"\n",
            cert.display(),
            key.display(),
            users.display()
        ))
        .await;
    let trust = stsrelay::tls::TrustStore::new(&[lab.ca.write_ca_pem(lab.dir.path())]).unwrap();
    let mut c = connect(&relay).await;
    let ehlo = c.ehlo("client.test").await.unwrap();
    assert!(!ehlo.has_extension("AUTH"), "no AUTH before TLS");
    assert!(ehlo.has_extension("STARTTLS"));
    let (mut c, _) = c
        .starttls(trust.strict_config(), "relay.sender.test")
        .await
        .unwrap();
    let ehlo = c.ehlo("client.test").await.unwrap();
    assert!(ehlo.has_extension("AUTH"), "{}", ehlo.text());
    // Unauthenticated and outside `allow`: refused.
    assert!(
        c.command("MAIL FROM:<alice@sender.test>")
            .await
            .unwrap()
            .is_positive()
    );
    assert_eq!(
        c.command("RCPT TO:<bob@authdest.test>").await.unwrap().code,
        550
    );
    assert!(c.command("RSET").await.unwrap().is_positive());
    let bad = base64(b"\0alice\0wrong");
    assert_eq!(
        c.command(&format!("AUTH PLAIN {bad}")).await.unwrap().code,
        535
    );
    let good = base64(b"\0alice\0correct horse");
    assert_eq!(
        c.command(&format!("AUTH PLAIN {good}")).await.unwrap().code,
        235
    );
    assert!(
        c.command("MAIL FROM:<alice@sender.test>")
            .await
            .unwrap()
            .is_positive()
    );
    assert!(
        c.command("RCPT TO:<bob@authdest.test>")
            .await
            .unwrap()
            .is_positive()
    );
    assert_eq!(c.command("DATA").await.unwrap().code, 354);
    assert!(c.send_data(MSG.as_bytes()).await.unwrap().is_positive());
    c.quit().await;
    eventually("delivery of the authenticated message", &lab, async || {
        !lab.sinks[s].messages().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_lifetime_ends_in_a_bounce_to_the_sender() {
    let mut lab = Lab::new(&[39]).await;
    // The MX has no address: every attempt defers until the lifetime runs out.
    lab.dns
        .add_mx("unreachable.test", 10, "mx.unreachable.test");
    let s_sender = lab
        .mx(
            "sender.test",
            "mx.sender.test",
            39,
            SinkOptions::plain("mx.sender.test"),
        )
        .await;
    let relay = lab
        .start_relay("[queue]\nretry_secs = [1]\nlifetime_secs = 3\n")
        .await;
    let started = std::time::Instant::now();
    submit(&relay, "alice@sender.test", &["bob@unreachable.test"], MSG).await;
    eventually("a deferral", &lab, async || {
        queue_json(&relay)
            .await
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["recipients"][0]["state"] == "deferred")
    })
    .await;
    eventually("the expiry bounce", &lab, async || {
        !lab.sinks[s_sender].messages().is_empty()
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "not before the lifetime"
    );
    let dsn = String::from_utf8_lossy(&lab.sinks[s_sender].messages()[0].data).into_owned();
    assert!(
        dsn.contains("Final-Recipient: rfc822; bob@unreachable.test"),
        "{dsn}"
    );
    assert!(dsn.contains("queue lifetime expired"), "{dsn}");
    assert!(dsn.contains("Status: 5.4.4"), "{dsn}");
    // Every attempt is logged with domain, MX, mode, TLS outcome and result.
    assert!(lab.log().contains("delivery attempt"), "{}", lab.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_messages_reuse_one_verified_connection() {
    let mut lab = Lab::new(&[38]).await;
    lab.policy(
        "reuse.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.reuse.test\nmax_age: 86400\n",
    );
    let leaf = lab.ca.leaf(&["mx.reuse.test"]);
    let s = lab
        .mx(
            "reuse.test",
            "mx.reuse.test",
            38,
            SinkOptions::tls("mx.reuse.test", leaf.server_config()),
        )
        .await;
    let relay = lab.start_relay("").await;
    for i in 0..5 {
        let body = format!("Subject: reuse {i}\r\n\r\nbody {i}\r\n");
        submit(&relay, "alice@sender.test", &["bob@reuse.test"], &body).await;
        eventually("delivery", &lab, async || {
            lab.sinks[s].messages().len() == i + 1
        })
        .await;
    }
    let msgs = lab.sinks[s].messages();
    assert!(
        msgs.iter()
            .all(|m| m.tls && m.sni.as_deref() == Some("mx.reuse.test"))
    );
    assert_eq!(
        lab.sinks[s].connections(),
        1,
        "one TCP+TLS session carried all five"
    );
    // Only the new session counts for TLS-RPT (RFC 8460 counts sessions).
    eventually("session recorded", &lab, async || {
        !sessions(&lab).await.is_empty()
    })
    .await;
    let counted: u64 = sessions(&lab).await.iter().map(|(_, n)| n).sum();
    assert_eq!(counted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_mx_bounces_at_once_and_bounces_are_never_bounced() {
    let mut lab = Lab::new(&[37]).await;
    // RFC 7505 null MX: the domain accepts no mail.
    lab.dns.add_mx("nullmx.test", 0, ".");
    let s_sender = lab
        .mx(
            "sender.test",
            "mx.sender.test",
            37,
            SinkOptions::plain("mx.sender.test"),
        )
        .await;
    let relay = lab.start_relay("").await;
    submit(&relay, "alice@sender.test", &["bob@nullmx.test"], MSG).await;
    eventually("the bounce", &lab, async || {
        !lab.sinks[s_sender].messages().is_empty()
    })
    .await;
    let dsn = String::from_utf8_lossy(&lab.sinks[s_sender].messages()[0].data).into_owned();
    assert!(dsn.contains("Status: 5.1.10"), "{dsn}");
    // A message from the null sender (a bounce itself) that fails gets no bounce.
    submit(&relay, "", &["bob@nullmx.test"], MSG).await;
    eventually("the null-sender message is gone", &lab, async || {
        queue_json(&relay).await.as_array().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lab.sinks[s_sender].messages().len(),
        1,
        "no bounce of a bounce"
    );
    assert!(lab.log().contains("bounced"), "{}", lab.log());
}
