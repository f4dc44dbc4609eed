//! A relay under test: `stsrelay run` started as a child process against in-process
//! DNS, HTTPS policy host and SMTP sinks, plus helpers to submit mail and read the queue.
#![allow(dead_code)]

use super::dns::TestDns;
use super::https::{Behaviour, PolicyHost};
use super::pki::TestCa;
use super::smtp::{SinkOptions, SmtpSink, free_port_on};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use stsrelay::smtp::outbound::Client;

pub fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

pub struct Relay {
    pub child: tokio::process::Child,
    pub listen: SocketAddr,
    pub config: PathBuf,
    /// The admin HTTP endpoint (`[admin] listen`).
    pub admin: SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub struct Lab {
    pub dns: TestDns,
    pub host: PolicyHost,
    pub ca: TestCa,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub sinks: Vec<SmtpSink>,
}

impl Lab {
    pub async fn new(ips: &[u8]) -> Lab {
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

    pub fn policy(&self, domain: &str, id: &str, body: &str) {
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
    pub async fn mx(&mut self, domain: &str, host: &str, last: u8, opts: SinkOptions) -> usize {
        self.dns.add_mx(domain, 10, host);
        self.dns.add_a(host, ip(last));
        let sink = SmtpSink::start(SocketAddr::new(IpAddr::V4(ip(last)), self.port), opts)
            .await
            .unwrap();
        self.sinks.push(sink);
        self.sinks.len() - 1
    }

    /// An MX sink for `domain` at 127.0.0.`last` offering STARTTLS with a certificate
    /// from the test CA for `names`; returns its index in `sinks`.
    pub async fn tls_mx(&mut self, domain: &str, host: &str, last: u8, names: &[&str]) -> usize {
        let leaf = self.ca.leaf(names);
        self.mx(
            domain,
            host,
            last,
            SinkOptions::tls(host, leaf.server_config()),
        )
        .await
    }

    pub async fn start_relay(&self, extra: &str) -> Relay {
        self.start_relay_edited(extra, |c| c).await
    }

    /// Like [`Lab::start_relay`], but `edit` may rewrite the generated config text
    /// before it is written (e.g. to change a key of a section other than `[server]`).
    pub async fn start_relay_edited(
        &self,
        extra: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Relay {
        self.start_relay_with(extra, edit, &[]).await
    }

    /// Like [`Lab::start_relay_edited`], with extra environment variables for the child.
    pub async fn start_relay_with(
        &self,
        extra: &str,
        edit: impl FnOnce(String) -> String,
        envs: &[(&str, &str)],
    ) -> Relay {
        let listen = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            free_port_on(&[Ipv4Addr::LOCALHOST]),
        );
        let admin = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            free_port_on(&[Ipv4Addr::LOCALHOST]),
        );
        let ca = self.ca.write_ca_pem(self.dir.path());
        let config = self.dir.path().join("stsrelay.toml");
        std::fs::write(
            &config,
            edit(format!(
                "[dns]\nnameservers = [\"{}\"]\ndnssec = false\n[tls]\nextra_roots = [\"{}\"]\n[storage]\ndata_dir = \"{}\"\n\
                 [delivery]\nport = {}\nhelo_name = \"relay.sender.test\"\nconnect_timeout_secs = 5\ncommand_timeout_secs = 10\n\
                 [sts]\npolicy_port = {}\nfetch_timeout_secs = 5\n\
                 [admin]\nlisten = \"{admin}\"\n\
                 [server]\nlisten = \"{listen}\"\nhostname = \"relay.sender.test\"\n{extra}",
                self.dns.addr(),
                ca.display(),
                self.dir.path().join("data").display(),
                self.port,
                self.host.addr().port(),
            )),
        )
        .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RUST_LOG", "stsrelay=debug")
            .envs(envs.iter().copied())
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
                    admin,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "relay did not start: {}",
            std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }
}

/// A plaintext SMTP client connection to the relay (greeting read).
pub async fn connect(relay: &Relay) -> Client<tokio::net::TcpStream> {
    let (c, _) = Client::connect(
        relay.listen,
        Duration::from_secs(5),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    c
}

/// Submit one message; returns the final reply to DATA.
pub async fn submit(relay: &Relay, from: &str, to: &[&str], body: &str) -> String {
    let mut c = connect(relay).await;
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

pub async fn queue_json(relay: &Relay) -> Value {
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
pub async fn eventually(what: &str, lab: &Lab, mut f: impl AsyncFnMut() -> bool) {
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

/// GET `http://ADDR/PATH` (the admin endpoint): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}
