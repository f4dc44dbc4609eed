//! `stsrelay check` through the real binary against in-process DNS, HTTPS policy host
//! and STARTTLS SMTP sinks on loopback addresses.

mod common;

use common::dns::TestDns;
use common::https::{Behaviour, PolicyHost};
use common::pki::{TestCa, self_signed};
use common::smtp::{SinkOptions, SmtpSink, free_port_on};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

struct Lab {
    dns: TestDns,
    host: PolicyHost,
    ca: TestCa,
    dir: tempfile::TempDir,
    port: u16,
    sinks: Vec<SmtpSink>,
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

// Sinks live on 127.0.0.20..=127.0.0.29, all on one port (delivery.port).
const SINK_IPS: std::ops::RangeInclusive<u8> = 20..=29;

impl Lab {
    async fn new() -> Lab {
        let ips: Vec<Ipv4Addr> = SINK_IPS.map(ip).collect();
        Lab {
            dns: TestDns::start().await,
            host: PolicyHost::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await,
            ca: TestCa::new("stsrelay check test CA"),
            dir: tempfile::tempdir().unwrap(),
            port: free_port_on(&ips),
            sinks: vec![],
        }
    }

    fn policy(&self, domain: &str, id: &str, b: Behaviour) {
        let ph = format!("mta-sts.{domain}");
        self.dns.add_a(&ph, Ipv4Addr::LOCALHOST);
        self.host.set_cert(&ph, &self.ca.leaf(&[&ph]));
        self.host.serve(&ph, b);
        self.dns.set_txt(
            &format!("_mta-sts.{domain}"),
            &[&[&format!("v=STSv1; id={id}")]],
        );
    }

    async fn mx(&mut self, domain: &str, pref: u16, host: &str, last: u8, opts: SinkOptions) {
        self.dns.add_mx(domain, pref, host);
        self.dns.add_a(host, ip(last));
        let sink = SmtpSink::start(SocketAddr::new(IpAddr::V4(ip(last)), self.port), opts)
            .await
            .unwrap();
        self.sinks.push(sink);
    }

    /// The MTA-STS tests run on an unsigned DNS without a root: DNSSEC is off (the DANE
    /// tests below have their own signed zones and trust anchor).
    fn config(&self) -> PathBuf {
        let dns = format!("nameservers = [\"{}\"]\ndnssec = false", self.dns.addr());
        write_config(
            &self.dir,
            &self.ca,
            &dns,
            self.port,
            self.host.addr().port(),
        )
    }

    async fn run(&self, args: &[&str]) -> (i32, String, String) {
        run_with(&self.config(), args).await
    }

    async fn check_json(&self, domain: &str) -> (i32, Value) {
        check_json_with(&self.config(), domain).await
    }
}

/// Write `<dir>/stsrelay.toml` for `check`: `[dns]` lines, the test CA, MX port and
/// policy host port.
fn write_config(
    dir: &tempfile::TempDir,
    ca: &TestCa,
    dns: &str,
    port: u16,
    policy_port: u16,
) -> PathBuf {
    let ca = ca.write_ca_pem(dir.path());
    let path = dir.path().join("stsrelay.toml");
    std::fs::write(
        &path,
        format!(
            "[dns]\n{dns}\n[tls]\nextra_roots = [\"{}\"]\n[storage]\ndata_dir = \"{}\"\n[delivery]\nport = {port}\nhelo_name = \"relay.sender.test\"\n[sts]\npolicy_port = {policy_port}\nfetch_timeout_secs = 5\n",
            ca.display(),
            dir.path().join("data").display(),
        ),
    )
    .unwrap();
    path
}

/// Run the binary with `--config config`: exit code, stdout, stderr.
async fn run_with(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `check --json domain`: exit code and the parsed report.
async fn check_json_with(config: &std::path::Path, domain: &str) -> (i32, Value) {
    let (code, out, err) = run_with(config, &["check", "--json", domain]).await;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (code, v)
}

const ENFORCE_GOOD: &str = "version: STSv1\nmode: enforce\nmx: *.good.test\nmax_age: 86400\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_domain_passes_with_exit_0() {
    let mut lab = Lab::new().await;
    lab.policy("good.test", "20261128", Behaviour::policy(ENFORCE_GOOD));
    lab.dns.set_txt(
        "_smtp._tls.good.test",
        &[&["v=TLSRPTv1; rua=mailto:tlsrpt@good.test,https://r.good.test/x"]],
    );
    let leaf1 = lab.ca.leaf(&["mx1.good.test"]);
    let leaf2 = lab.ca.leaf(&["*.good.test"]);
    lab.mx(
        "good.test",
        10,
        "mx1.good.test",
        20,
        SinkOptions::tls("mx1.good.test", leaf1.server_config()),
    )
    .await;
    lab.mx(
        "good.test",
        20,
        "mx2.good.test",
        21,
        SinkOptions::tls("mx2.good.test", leaf2.server_config()),
    )
    .await;
    let (code, v) = lab.check_json("good.test").await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["domain"], "good.test");
    assert_eq!(v["ok"], true);
    assert_eq!(v["sts_record"]["ok"], true);
    assert_eq!(v["sts_record"]["id"], "20261128");
    assert_eq!(v["policy"]["ok"], true);
    assert_eq!(v["policy"]["mode"], "enforce");
    assert_eq!(v["policy"]["max_age"], 86400);
    assert_eq!(v["policy"]["mx"], serde_json::json!(["*.good.test"]));
    assert_eq!(v["tlsrpt_record"]["ok"], true);
    assert_eq!(
        v["tlsrpt_record"]["rua"],
        serde_json::json!(["mailto:tlsrpt@good.test", "https://r.good.test/x"])
    );
    let mx = v["mx"].as_array().unwrap();
    assert_eq!(mx.len(), 2);
    assert_eq!(mx[0]["host"], "mx1.good.test");
    assert_eq!(mx[0]["preference"], 10);
    assert_eq!(mx[1]["host"], "mx2.good.test");
    for m in mx {
        assert_eq!(m["policy_match"], true);
        assert_eq!(m["starttls"], true);
        assert_eq!(m["tls_version"], "TLSv1.3");
        assert_eq!(m["certificate"]["ok"], true);
        assert_eq!(m["certificate"]["result_type"], Value::Null);
        assert_eq!(m["dane"], Value::Null, "DNSSEC is off");
    }
    // R47: SNI was the MX host name.
    assert_eq!(
        lab.sinks[0].handshakes(),
        vec![Some("mx1.good.test".to_string())]
    );
    // Human output says the same.
    let (code, text, _) = lab.run(&["check", "good.test"]).await;
    assert_eq!(code, 0);
    assert!(
        text.contains("mode=enforce") && text.contains("RESULT: ok"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mx_failure_is_classified_and_exits_1() {
    let mut lab = Lab::new().await;
    lab.policy(
        "bad.test",
        "1",
        Behaviour::policy("version: STSv1\nmode: enforce\nmx: *.bad.test\nmax_age: 86400\n"),
    );
    let expired = lab.ca.leaf_expired(&["mx1.bad.test"]);
    let wrong = lab.ca.leaf(&["other.bad.test"]);
    let untrusted = self_signed(&["mx4.bad.test"]);
    let outside = lab.ca.leaf(&["mx.elsewhere.test"]);
    lab.mx(
        "bad.test",
        10,
        "mx1.bad.test",
        22,
        SinkOptions::tls("mx1.bad.test", expired.server_config()),
    )
    .await;
    lab.mx(
        "bad.test",
        20,
        "mx2.bad.test",
        23,
        SinkOptions::tls("mx2.bad.test", wrong.server_config()),
    )
    .await;
    lab.mx(
        "bad.test",
        30,
        "mx3.bad.test",
        24,
        SinkOptions::plain("mx3.bad.test"),
    )
    .await;
    lab.mx(
        "bad.test",
        40,
        "mx4.bad.test",
        25,
        SinkOptions::tls("mx4.bad.test", untrusted.server_config()),
    )
    .await;
    lab.mx(
        "bad.test",
        50,
        "mx.elsewhere.test",
        26,
        SinkOptions::tls("mx.elsewhere.test", outside.server_config()),
    )
    .await;
    let (code, v) = lab.check_json("bad.test").await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["ok"], false);
    let mx = v["mx"].as_array().unwrap();
    let by_host = |h: &str| mx.iter().find(|m| m["host"] == h).unwrap().clone();
    assert_eq!(
        by_host("mx1.bad.test")["certificate"]["result_type"],
        "certificate-expired"
    );
    assert_eq!(
        by_host("mx2.bad.test")["certificate"]["result_type"],
        "certificate-host-mismatch"
    );
    let m3 = by_host("mx3.bad.test");
    assert_eq!(m3["starttls"], false);
    assert_eq!(m3["tls_version"], Value::Null);
    assert_eq!(m3["certificate"]["result_type"], "starttls-not-supported");
    assert_eq!(
        by_host("mx4.bad.test")["certificate"]["result_type"],
        "certificate-not-trusted"
    );
    let out = by_host("mx.elsewhere.test");
    assert_eq!(out["policy_match"], false);
    assert_eq!(out["certificate"]["ok"], true);
    for h in [
        "mx1.bad.test",
        "mx2.bad.test",
        "mx3.bad.test",
        "mx4.bad.test",
    ] {
        assert_eq!(by_host(h)["policy_match"], true, "{h}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_record_and_failed_fetch_are_reported() {
    let mut lab = Lab::new().await;
    let leaf = lab.ca.leaf(&["mx.nosts.test"]);
    lab.mx(
        "nosts.test",
        10,
        "mx.nosts.test",
        27,
        SinkOptions::tls("mx.nosts.test", leaf.server_config()),
    )
    .await;
    let (code, v) = lab.check_json("nosts.test").await;
    assert_eq!(code, 1);
    assert_eq!(v["sts_record"], Value::Null);
    assert_eq!(v["policy"], Value::Null);
    assert_eq!(v["tlsrpt_record"], Value::Null);
    assert_eq!(v["mx"][0]["policy_match"], Value::Null);
    assert_eq!(v["mx"][0]["certificate"]["ok"], true);

    lab.policy("broken.test", "1", Behaviour::status(404, "not here"));
    lab.dns.set_txt(
        "_smtp._tls.broken.test",
        &[&["v=TLSRPTv1; rua=ftp://x.test/"]],
    );
    let (code, v) = lab.check_json("broken.test").await;
    assert_eq!(code, 1);
    assert_eq!(v["sts_record"]["ok"], true);
    assert_eq!(v["policy"]["ok"], false);
    assert_eq!(v["policy"]["result_type"], "sts-policy-fetch-error");
    assert!(v["policy"]["error"].as_str().unwrap().contains("404"));
    assert_eq!(v["tlsrpt_record"]["ok"], false);

    lab.dns.set_txt(
        "_mta-sts.two.test",
        &[&["v=STSv1; id=1"], &["v=STSv1; id=2"]],
    );
    let (code, v) = lab.check_json("two.test").await;
    assert_eq!(code, 1);
    assert_eq!(v["sts_record"]["ok"], false);
    assert!(
        v["sts_record"]["error"]
            .as_str()
            .unwrap()
            .contains("2 TXT records")
    );
    assert_eq!(v["policy"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r41_implicit_mx_is_the_domain_itself() {
    let mut lab = Lab::new().await;
    lab.policy(
        "implicit.test",
        "1",
        Behaviour::policy("version: STSv1\nmode: enforce\nmx: implicit.test\nmax_age: 600\n"),
    );
    // No MX records: only an address for the domain.
    lab.dns.add_a("implicit.test", ip(29));
    let leaf = lab.ca.leaf(&["implicit.test"]);
    let sink = SmtpSink::start(
        SocketAddr::new(IpAddr::V4(ip(29)), lab.port),
        SinkOptions::tls("implicit.test", leaf.server_config()),
    )
    .await
    .unwrap();
    lab.sinks.push(sink);
    let (code, v) = lab.check_json("implicit.test").await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["mx"].as_array().unwrap().len(), 1);
    assert_eq!(v["mx"][0]["host"], "implicit.test");
    assert_eq!(v["mx"][0]["preference"], 0);
    assert_eq!(v["mx"][0]["policy_match"], true);
    assert_eq!(v["mx"][0]["certificate"]["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_config_errors_exit_2() {
    let lab = Lab::new().await;
    let (code, _, err) = lab.run(&["check"]).await;
    assert_eq!(code, 2, "{err}");
    let bad = lab.dir.path().join("bad.toml");
    std::fs::write(&bad, "[dns]\nnameserver = []\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
        .arg("--config")
        .arg(&bad)
        .args(["check", "example.test"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nameserver") && err.contains("bad.toml"),
        "{err}"
    );
}

// --- DANE (RFC 7672): signed zones from SignedDns, trust anchor in the config -------------

mod dane {
    use super::common::dnssec::{SignedDns, Signing};
    use super::common::https::{Behaviour, PolicyHost};
    use super::common::pki::{Leaf, TestCa, self_signed};
    use super::common::smtp::{SinkOptions, SmtpSink, free_port_on};
    use serde_json::Value;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::path::PathBuf;
    use stsrelay::dane::{CertUsage, MatchingType, Selector, TlsaRecord, matching};

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, last)
    }

    // Sinks on 127.0.0.40..=127.0.0.49, one port (delivery.port; TLSA at _PORT._tcp).
    const SINK_IPS: std::ops::RangeInclusive<u8> = 40..=49;

    struct Lab {
        dns: SignedDns,
        host: PolicyHost,
        /// The CA `tls.extra_roots` trusts (WebPKI for MTA-STS).
        ca: TestCa,
        dir: tempfile::TempDir,
        port: u16,
        sinks: Vec<SmtpSink>,
    }

    fn record(
        usage: CertUsage,
        selector: Selector,
        cert: &rustls_pki_types::CertificateDer<'_>,
    ) -> TlsaRecord {
        matching::record_for(usage, selector, MatchingType::Sha256, cert).unwrap()
    }

    impl Lab {
        async fn new() -> Lab {
            let dns = SignedDns::start().await;
            dns.add_zone("test.", Signing::Secure);
            dns.add_zone("insecure.test.", Signing::Unsigned);
            dns.add_zone("bogus.test.", Signing::WrongKey);
            let ips: Vec<Ipv4Addr> = SINK_IPS.map(ip).collect();
            Lab {
                dns,
                host: PolicyHost::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await,
                ca: TestCa::new("stsrelay check DANE WebPKI CA"),
                dir: tempfile::tempdir().unwrap(),
                port: free_port_on(&ips),
                sinks: vec![],
            }
        }

        fn tlsa(&self, host: &str, r: &TlsaRecord) {
            self.dns.add_tlsa(
                &format!("_{}._tcp.{host}", self.port),
                r.usage.into(),
                r.selector.into(),
                r.matching.into(),
                &r.data,
            );
        }

        fn policy(&self, domain: &str, body: &str) {
            let ph = format!("mta-sts.{domain}");
            self.dns.add_a(&ph, Ipv4Addr::LOCALHOST);
            self.host.set_cert(&ph, &self.ca.leaf(&[&ph]));
            self.host.serve(&ph, Behaviour::policy(body));
            self.dns
                .add_txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=1");
        }

        async fn mx(&mut self, domain: &str, host: &str, last: u8, leaf: Option<&Leaf>) {
            self.dns.add_mx(domain, 10, host);
            self.dns.add_a(host, ip(last));
            let opts = match leaf {
                Some(l) => SinkOptions::tls(host, l.server_config()),
                None => SinkOptions::plain(host),
            };
            let sink = SmtpSink::start(SocketAddr::new(IpAddr::V4(ip(last)), self.port), opts)
                .await
                .unwrap();
            self.sinks.push(sink);
        }

        fn config(&self) -> PathBuf {
            let anchor = self.dns.write_trust_anchor(self.dir.path());
            let dns = format!(
                "nameservers = [\"{}\"]\ntrust_anchor = \"{}\"",
                self.dns.addr(),
                anchor.display()
            );
            super::write_config(
                &self.dir,
                &self.ca,
                &dns,
                self.port,
                self.host.addr().port(),
            )
        }

        /// Exit code, stdout, stderr.
        async fn run(&self, args: &[&str]) -> (i32, String, String) {
            super::run_with(&self.config(), args).await
        }

        async fn check_json(&self, domain: &str) -> (i32, Value) {
            super::check_json_with(&self.config(), domain).await
        }
    }

    const ENFORCE: &str = "version: STSv1\nmode: enforce\nmx: *.{D}\nmax_age: 86400\n";

    /// Issue 8: per MX, DNSSEC status, TLSA records and whether the certificate matches;
    /// a DANE host passes without WebPKI, a mismatch fails although MTA-STS is happy.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dane_ee_ta_and_a_mismatch_under_enforce() {
        let mut lab = Lab::new().await;
        // DANE-EE: a self-signed certificate for an unrelated name, "3 1 1" of its key.
        let ee = self_signed(&["not-the-mx.invalid"]);
        lab.mx("ee.test", "mx.ee.test", 40, Some(&ee)).await;
        lab.tlsa(
            "mx.ee.test",
            &record(CertUsage::DaneEe, Selector::Spki, &ee.chain[0]),
        );
        // DANE-TA: a private CA (not in extra_roots), "2 0 1" of it, chain sent.
        let private = TestCa::new("stsrelay check DANE-TA private CA");
        let mut ta = private.leaf(&["mx.ta.test"]);
        ta.chain.push(private.ca_der());
        lab.mx("ta.test", "mx.ta.test", 41, Some(&ta)).await;
        lab.tlsa(
            "mx.ta.test",
            &record(CertUsage::DaneTa, Selector::Cert, &private.ca_der()),
        );
        // Mismatch: WebPKI-valid under an enforce policy, TLSA for another key.
        let good = lab.ca.leaf(&["mx.mismatch.test"]);
        lab.mx("mismatch.test", "mx.mismatch.test", 42, Some(&good))
            .await;
        lab.policy("mismatch.test", &ENFORCE.replace("{D}", "mismatch.test"));
        let other = self_signed(&["other.invalid"]);
        lab.tlsa(
            "mx.mismatch.test",
            &record(CertUsage::DaneEe, Selector::Spki, &other.chain[0]),
        );

        let (code, v) = lab.check_json("ee.test").await;
        assert_eq!(code, 0, "{v:#}");
        let m = &v["mx"][0];
        assert_eq!(m["certificate"]["ok"], false, "{m:#}");
        let d = &m["dane"];
        assert_eq!(d["mx_dnssec"], "secure", "{d:#}");
        assert_eq!(d["address_dnssec"], "secure");
        assert_eq!(d["tlsa_dnssec"], "secure");
        assert_eq!(d["tlsa_base"], "mx.ee.test");
        assert_eq!(d["usable"], true);
        assert_eq!(d["applies"], true);
        assert_eq!(d["match"]["kind"], "end-entity");
        let want = record(CertUsage::DaneEe, Selector::Spki, &ee.chain[0]).to_string();
        assert_eq!(d["match"]["record"], want.as_str());
        assert_eq!(d["tlsa"], serde_json::json!([want]));
        assert_eq!(d["error"], Value::Null);
        let (code, text, _) = lab.run(&["check", "ee.test"]).await;
        assert_eq!(code, 0, "{text}");
        assert!(
            text.contains("[ok  ] DANE: certificate matches 3 1 1")
                && text.contains("DNSSEC: MX secure, address secure, TLSA secure")
                && text.contains("[info] certificate valid for mx.ee.test")
                && text.contains("RESULT: ok"),
            "{text}"
        );

        let (code, v) = lab.check_json("ta.test").await;
        assert_eq!(code, 0, "{v:#}");
        let d = &v["mx"][0]["dane"];
        assert_eq!(d["match"]["kind"], "trust-anchor", "{d:#}");
        assert_eq!(d["match"]["name"], "mx.ta.test");
        assert!(d["match"]["record"].as_str().unwrap().starts_with("2 0 1 "));
        assert_eq!(
            v["mx"][0]["certificate"]["result_type"],
            "certificate-not-trusted"
        );

        let (code, v) = lab.check_json("mismatch.test").await;
        assert_eq!(code, 1, "{v:#}");
        assert_eq!(v["ok"], false);
        assert_eq!(v["policy"]["mode"], "enforce");
        let m = &v["mx"][0];
        assert_eq!(m["certificate"]["ok"], true, "{m:#}");
        assert_eq!(m["policy_match"], true);
        assert_eq!(m["dane"]["applies"], true);
        assert_eq!(m["dane"]["match"], Value::Null);
        assert_eq!(m["dane"]["result_type"], "tlsa-invalid");
        let (code, text, _) = lab.run(&["check", "mismatch.test"]).await;
        assert_eq!(code, 1);
        assert!(text.contains("[FAIL] DANE: tlsa-invalid"), "{text}");
    }

    /// Bogus zone: the MX is not used (fail); insecure zone: its TLSA records are
    /// ignored and MTA-STS decides; DANE without STARTTLS fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bogus_insecure_and_no_starttls() {
        let mut lab = Lab::new().await;
        let unrelated = self_signed(&["unrelated.invalid"]);
        let unrelated_rec = record(CertUsage::DaneEe, Selector::Spki, &unrelated.chain[0]);
        let bogus_leaf = lab.ca.leaf(&["mx.bogus.test"]);
        lab.mx("bogus.test", "mx.bogus.test", 43, Some(&bogus_leaf))
            .await;
        lab.tlsa(
            "mx.bogus.test",
            &record(CertUsage::DaneEe, Selector::Spki, &bogus_leaf.chain[0]),
        );
        let insecure_leaf = lab.ca.leaf(&["mx.insecure.test"]);
        lab.mx(
            "insecure.test",
            "mx.insecure.test",
            44,
            Some(&insecure_leaf),
        )
        .await;
        lab.policy("insecure.test", &ENFORCE.replace("{D}", "insecure.test"));
        lab.tlsa("mx.insecure.test", &unrelated_rec);
        lab.mx("plain.test", "mx.plain.test", 45, None).await;
        lab.tlsa("mx.plain.test", &unrelated_rec);

        let (code, v) = lab.check_json("bogus.test").await;
        assert_eq!(code, 1, "{v:#}");
        let d = &v["mx"][0]["dane"];
        assert_eq!(d["mx_dnssec"], "bogus", "{d:#}");
        assert_eq!(d["applies"], false);
        assert_eq!(d["result_type"], "dnssec-invalid");
        assert!(d["skip"].as_str().unwrap().contains("MX RRset"), "{d:#}");

        let (code, v) = lab.check_json("insecure.test").await;
        assert_eq!(code, 0, "{v:#}");
        let d = &v["mx"][0]["dane"];
        assert_eq!(d["mx_dnssec"], "insecure", "{d:#}");
        assert_eq!(d["tlsa_dnssec"], "insecure");
        assert_eq!(d["tlsa"], serde_json::json!([unrelated_rec.to_string()]));
        assert_eq!(d["applies"], false);
        assert!(d["error"].as_str().unwrap().contains("not DNSSEC-signed"));

        let (code, v) = lab.check_json("plain.test").await;
        assert_eq!(code, 1, "{v:#}");
        let d = &v["mx"][0]["dane"];
        assert_eq!(d["applies"], true, "{d:#}");
        assert_eq!(d["result_type"], "starttls-not-supported");
        assert_eq!(v["mx"][0]["starttls"], false);
    }
}
