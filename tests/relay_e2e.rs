//! `stsrelay run` end to end through the real binary: an SMTP client hands mail to the
//! relay, which delivers it to in-process MX sinks under MTA-STS policies served by an
//! in-process DNS server and HTTPS policy host. What happened is read from the sinks
//! and from `stsrelay queue list --json`.

mod common;

use common::dns::TestDns;
use common::https::{Behaviour, PolicyHost};
use common::pki::TestCa;
use common::smtp::{SinkOptions, SmtpSink, free_port_on};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use stsrelay::smtp::outbound::Client;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

struct Relay {
    child: tokio::process::Child,
    listen: SocketAddr,
    config: PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

struct Lab {
    dns: TestDns,
    host: PolicyHost,
    ca: TestCa,
    dir: tempfile::TempDir,
    port: u16,
    sinks: Vec<SmtpSink>,
}

impl Lab {
    async fn new(ips: &[u8]) -> Lab {
        let ips: Vec<Ipv4Addr> = ips.iter().map(|&l| ip(l)).collect();
        Lab {
            dns: TestDns::start().await,
            host: PolicyHost::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await,
            ca: TestCa::new("stsrelay relay test CA"),
            dir: tempfile::tempdir().unwrap(),
            port: free_port_on(&ips),
            sinks: vec![],
        }
    }

    fn policy(&self, domain: &str, id: &str, body: &str) {
        let ph = format!("mta-sts.{domain}");
        self.dns.add_a(&ph, Ipv4Addr::LOCALHOST);
        self.host.set_cert(&ph, &self.ca.leaf(&[&ph]));
        self.host.serve(&ph, Behaviour::policy(body));
        self.dns.set_txt(
            &format!("_mta-sts.{domain}"),
            &[&[&format!("v=STSv1; id={id}")]],
        );
    }

    /// An MX sink for `domain` at 127.0.0.`last`; returns its index in `sinks`.
    async fn mx(&mut self, domain: &str, host: &str, last: u8, opts: SinkOptions) -> usize {
        self.dns.add_mx(domain, 10, host);
        self.dns.add_a(host, ip(last));
        let sink = SmtpSink::start(SocketAddr::new(IpAddr::V4(ip(last)), self.port), opts)
            .await
            .unwrap();
        self.sinks.push(sink);
        self.sinks.len() - 1
    }

    async fn start_relay(&self, extra: &str) -> Relay {
        let listen = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            free_port_on(&[Ipv4Addr::LOCALHOST]),
        );
        let ca = self.ca.write_ca_pem(self.dir.path());
        let config = self.dir.path().join("stsrelay.toml");
        std::fs::write(
            &config,
            format!(
                "[dns]\nnameservers = [\"{}\"]\n[tls]\nextra_roots = [\"{}\"]\n[storage]\ndata_dir = \"{}\"\n\
                 [delivery]\nport = {}\nhelo_name = \"relay.sender.test\"\nconnect_timeout_secs = 5\ncommand_timeout_secs = 10\n\
                 [sts]\npolicy_port = {}\nfetch_timeout_secs = 5\n\
                 [server]\nlisten = \"{listen}\"\nhostname = \"relay.sender.test\"\n{extra}",
                self.dns.addr(),
                ca.display(),
                self.dir.path().join("data").display(),
                self.port,
                self.host.addr().port(),
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RUST_LOG", "stsrelay=debug")
            .stderr(std::fs::File::create(self.dir.path().join("relay.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(listen).await.is_ok() {
                return Relay {
                    child,
                    listen,
                    config,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "relay did not start: {}",
            std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }
}

/// Submit one message; returns the final reply to DATA.
async fn submit(relay: &Relay, from: &str, to: &[&str], body: &str) -> String {
    let (mut c, _) = Client::connect(
        relay.listen,
        Duration::from_secs(5),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    c.ehlo("client.test").await.unwrap();
    assert!(
        c.command(&format!("MAIL FROM:<{from}>"))
            .await
            .unwrap()
            .is_positive()
    );
    for t in to {
        let r = c.command(&format!("RCPT TO:<{t}>")).await.unwrap();
        assert!(r.is_positive(), "{}", r.text());
    }
    assert_eq!(c.command("DATA").await.unwrap().code, 354);
    let r = c.send_data(body.as_bytes()).await.unwrap();
    c.quit().await;
    r.text()
}

async fn queue_json(relay: &Relay) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
        .arg("--config")
        .arg(&relay.config)
        .args(["queue", "list", "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Wait (bounded) until `f` holds.
async fn eventually(what: &str, lab: &Lab, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "timed out waiting for: {what}\n--- relay log ---\n{}",
        lab.log()
    );
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
    let (mut c, _) = Client::connect(
        relay.listen,
        Duration::from_secs(5),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
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
