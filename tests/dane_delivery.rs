//! Delivery under DANE (RFC 7672) and its precedence over MTA-STS (RFC 8461 §2),
//! against real in-process peers: a DNSSEC-signing DNS server (`common/dnssec.rs`)
//! with a trust anchor file, SMTP sinks speaking STARTTLS with real certificates, and
//! an HTTPS policy host. Each case checks the delivery outcome and the TLS-RPT session
//! result the deliverer records (policy type `tlsa`, the TLSA records as policy
//! strings, the TLSA base domain as policy domain).

mod common;

use common::dnssec::{SignedDns, Signing};
use common::https::{Behaviour, PolicyHost};
use common::pki::{TestCa, self_signed};
use common::smtp::{SinkOptions, SmtpSink, free_port_on};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stsrelay::dane::matching::record_for;
use stsrelay::dane::{CertUsage, MatchingType, Selector};
use stsrelay::delivery::{Deliverer, Rcpt, RcptResult, Transaction};
use stsrelay::dns::Resolver;
use stsrelay::store::SqliteStore;
use stsrelay::sts::{Engine, EngineOptions, FetchOptions, HttpsFetcher};
use stsrelay::tls::TrustStore;
use stsrelay::tlsrpt::{PolicyType, ResultType, SessionRecorder, SessionResult};

/// Collects what the deliverer records (the TLS-RPT side of each session).
#[derive(Default)]
struct Collected(Mutex<Vec<SessionResult>>);

impl SessionRecorder for Collected {
    fn record(&self, result: SessionResult) {
        self.0.lock().unwrap().push(result);
    }
}

impl Collected {
    fn take(&self) -> Vec<SessionResult> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

const IPS: [Ipv4Addr; 7] = [
    Ipv4Addr::new(127, 0, 0, 61),
    Ipv4Addr::new(127, 0, 0, 62),
    Ipv4Addr::new(127, 0, 0, 63),
    Ipv4Addr::new(127, 0, 0, 64),
    Ipv4Addr::new(127, 0, 0, 65),
    Ipv4Addr::new(127, 0, 0, 66),
    Ipv4Addr::new(127, 0, 0, 67),
];

struct World {
    deliverer: Deliverer,
    recorded: Arc<Collected>,
    sinks: Vec<(&'static str, SmtpSink)>,
    _dns: SignedDns,
    _host: PolicyHost,
    _dir: tempfile::TempDir,
}

fn tlsa_of(
    usage: CertUsage,
    selector: Selector,
    cert: &rustls_pki_types::CertificateDer<'_>,
) -> Vec<u8> {
    record_for(usage, selector, MatchingType::Sha256, cert)
        .expect("TLSA data")
        .data
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port_on(&IPS);
        let dns = SignedDns::start().await;
        dns.add_zone("test", Signing::Secure);
        dns.add_zone("dane.test", Signing::Secure);
        dns.add_zone("insec.test", Signing::Unsigned);
        dns.add_zone("bogus.test", Signing::WrongKey);
        let ca = TestCa::new("DANE test CA");
        let tlsa = |host: &str| format!("_{port}._tcp.{host}");
        let mut sinks = Vec::new();
        let mut sink = async |name: &'static str, ip: Ipv4Addr, opts: SinkOptions| {
            let s = SmtpSink::start(SocketAddr::new(IpAddr::V4(ip), port), opts)
                .await
                .unwrap();
            sinks.push((name, s));
        };

        // DANE-EE: a self-signed certificate for another name, pinned by its key.
        let ee = self_signed(&["not-the-mx.example"]);
        dns.add_a("ee.dane.test", IPS[0]);
        dns.add_tlsa(
            &tlsa("ee.dane.test"),
            3,
            1,
            1,
            &tlsa_of(CertUsage::DaneEe, Selector::Spki, &ee.chain[0]),
        );
        sink(
            "ee",
            IPS[0],
            SinkOptions::tls("ee.dane.test", ee.server_config()),
        )
        .await;

        // DANE-TA: a private CA (sent in the chain) for the MX name.
        let ta_leaf = ca.leaf(&["ta.dane.test"]);
        let ta_cfg = Arc::new(
            rustls::ServerConfig::builder_with_provider(common::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![ta_leaf.chain[0].clone(), ca.ca_der()],
                    ta_leaf.key.clone_key(),
                )
                .unwrap(),
        );
        dns.add_a("ta.dane.test", IPS[1]);
        dns.add_tlsa(
            &tlsa("ta.dane.test"),
            2,
            0,
            1,
            &tlsa_of(CertUsage::DaneTa, Selector::Cert, &ca.ca_der()),
        );
        sink("ta", IPS[1], SinkOptions::tls("ta.dane.test", ta_cfg)).await;

        // A TLSA mismatch: the records pin another key.
        let other = self_signed(&["other.example"]);
        let bad = self_signed(&["bad.dane.test"]);
        dns.add_a("bad.dane.test", IPS[2]);
        dns.add_tlsa(
            &tlsa("bad.dane.test"),
            3,
            1,
            1,
            &tlsa_of(CertUsage::DaneEe, Selector::Spki, &other.chain[0]),
        );
        sink(
            "bad",
            IPS[2],
            SinkOptions::tls("bad.dane.test", bad.server_config()),
        )
        .await;

        // TLSA published, no STARTTLS offered.
        dns.add_a("plain.dane.test", IPS[3]);
        dns.add_tlsa(
            &tlsa("plain.dane.test"),
            3,
            1,
            1,
            &tlsa_of(CertUsage::DaneEe, Selector::Spki, &other.chain[0]),
        );
        sink("plain", IPS[3], SinkOptions::plain("plain.dane.test")).await;

        // An insecure zone: its (mismatching) TLSA records do not count.
        let insec = self_signed(&["mx.insec.test"]);
        dns.add_a("mx.insec.test", IPS[4]);
        dns.add_tlsa(
            &tlsa("mx.insec.test"),
            3,
            1,
            1,
            &tlsa_of(CertUsage::DaneEe, Selector::Spki, &other.chain[0]),
        );
        sink(
            "insec",
            IPS[4],
            SinkOptions::tls("mx.insec.test", insec.server_config()),
        )
        .await;

        // A WebPKI-valid certificate (test CA) with mismatching TLSA: MTA-STS enforce
        // would accept it, DANE does not.
        let stsbad = ca.leaf(&["stsbad.dane.test"]);
        dns.add_a("stsbad.dane.test", IPS[5]);
        dns.add_tlsa(
            &tlsa("stsbad.dane.test"),
            3,
            1,
            1,
            &tlsa_of(CertUsage::DaneEe, Selector::Spki, &other.chain[0]),
        );
        sink(
            "stsbad",
            IPS[5],
            SinkOptions::tls("stsbad.dane.test", stsbad.server_config()),
        )
        .await;

        // WebPKI-valid and matching TLSA.
        let stsgood = ca.leaf(&["stsgood.dane.test"]);
        dns.add_a("stsgood.dane.test", IPS[6]);
        dns.add_tlsa(
            &tlsa("stsgood.dane.test"),
            3,
            1,
            1,
            &tlsa_of(CertUsage::DaneEe, Selector::Spki, &stsgood.chain[0]),
        );
        sink(
            "stsgood",
            IPS[6],
            SinkOptions::tls("stsgood.dane.test", stsgood.server_config()),
        )
        .await;

        for (domain, mx) in [
            ("ee.example.dane.test", "ee.dane.test"),
            ("ta.example.dane.test", "ta.dane.test"),
            ("bad.example.dane.test", "bad.dane.test"),
            ("plain.example.dane.test", "plain.dane.test"),
            ("example.insec.test", "mx.insec.test"),
            ("example.bogus.test", "mx.bogus.test"),
            ("stsbad.example.dane.test", "stsbad.dane.test"),
            ("stsgood.example.dane.test", "stsgood.dane.test"),
        ] {
            dns.add_mx(domain, 10, mx);
        }
        dns.add_a("mx.bogus.test", IPS[0]);

        // MTA-STS enforce policies for the last two, from a real HTTPS host.
        let host = PolicyHost::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 60))).await;
        for (domain, mx) in [
            ("stsbad.example.dane.test", "stsbad.dane.test"),
            ("stsgood.example.dane.test", "stsgood.dane.test"),
        ] {
            dns.add_txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=1");
            dns.add_a(&format!("mta-sts.{domain}"), Ipv4Addr::new(127, 0, 0, 60));
            let name = format!("mta-sts.{domain}");
            host.set_cert(&name, &ca.leaf(&[&name]));
            host.serve(
                &name,
                Behaviour::policy(&format!(
                    "version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n"
                )),
            );
        }

        let anchor = dns.write_trust_anchor(dir.path());
        let ca_path = ca.write_ca_pem(dir.path());
        let cfg = stsrelay::Config::from_toml(&format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout_secs = 2\ntrust_anchor = \"{}\"\n\
             [delivery]\nport = {port}\nhelo_name = \"relay.sender.test\"\nconnect_timeout_secs = 5\ncommand_timeout_secs = 10\n",
            dns.addr(),
            anchor.display()
        ))
        .unwrap();
        let resolver = Resolver::from_config(&cfg).unwrap();
        assert!(resolver.dnssec_enabled());
        let trust = TrustStore::new(&[ca_path]).unwrap();
        let fetcher = HttpsFetcher::new(
            resolver.clone(),
            &trust,
            FetchOptions {
                connect_timeout: Duration::from_secs(2),
                total_timeout: Duration::from_secs(5),
                port: host.addr().port(),
            },
        )
        .unwrap();
        let store = SqliteStore::open(&dir.path().join("data")).unwrap();
        let engine = Engine::builder(
            Arc::new(resolver.clone()),
            Arc::new(fetcher),
            Arc::new(store),
        )
        .options(EngineOptions::default())
        .build();
        let recorded = Arc::new(Collected::default());
        let deliverer = Deliverer::new(&cfg, engine, resolver, trust, recorded.clone());
        World {
            deliverer,
            recorded,
            sinks,
            _dns: dns,
            _host: host,
            _dir: dir,
        }
    }

    fn sink(&self, name: &str) -> &SmtpSink {
        &self.sinks.iter().find(|(n, _)| *n == name).unwrap().1
    }

    /// Deliver one message to bob@`domain`; the outcome and what was recorded.
    async fn deliver(&self, domain: &str) -> (RcptResult, Vec<SessionResult>) {
        self.deliver_with(domain, false).await
    }

    /// Like [`World::deliver`]; `tls_optional` as for a `TLS-Required: No` message.
    async fn deliver_with(
        &self,
        domain: &str,
        tls_optional: bool,
    ) -> (RcptResult, Vec<SessionResult>) {
        let tx = Transaction {
            queue_id: "T1".into(),
            mail_from: "alice@sender.test".into(),
            recipients: vec![Rcpt {
                address: format!("bob@{domain}"),
                notify: None,
                orcpt: None,
            }],
            body: Arc::new(b"Subject: dane\r\n\r\nhello\r\n".to_vec()),
            eight_bit: false,
            smtputf8: false,
            ret: None,
            envid: None,
            tls_optional,
            tlsrpt_exempt: false,
        };
        let attempt =
            tokio::time::timeout(Duration::from_secs(60), self.deliverer.attempt(domain, &tx))
                .await
                .expect("delivery attempt ended");
        (attempt.results[0].clone(), self.recorded.take())
    }
}

fn delivered(r: &RcptResult) -> bool {
    matches!(r, RcptResult::Delivered { .. })
}

fn deferred_with(r: &RcptResult, text: &str) -> bool {
    matches!(r, RcptResult::Deferred { reason } if reason.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_decides_delivery_and_is_reported_as_tlsa() {
    let w = World::new().await;

    // DANE-EE: delivered although the certificate is self-signed for another name.
    let (r, rec) = w.deliver("ee.example.dane.test").await;
    assert!(delivered(&r), "{r:?}");
    assert_eq!(w.sink("ee").message_count(), 1);
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(rec[0].policy_type, PolicyType::Tlsa);
    assert_eq!(rec[0].policy_domain, "ee.dane.test");
    assert!(rec[0].policy_strings[0].starts_with("3 1 1 "), "{rec:?}");
    assert!(rec[0].failure.is_none());
    assert_eq!(
        w.sink("ee").messages()[0].sni.as_deref(),
        Some("ee.dane.test")
    );

    // DANE-TA: the chain reaches the pinned CA, for the MX name.
    let (r, rec) = w.deliver("ta.example.dane.test").await;
    assert!(delivered(&r), "{r:?}");
    assert_eq!(rec[0].policy_type, PolicyType::Tlsa);
    assert!(rec[0].failure.is_none(), "{rec:?}");

    // A TLSA mismatch: deferred, tlsa-invalid; nothing reached the MX.
    let (r, rec) = w.deliver("bad.example.dane.test").await;
    assert!(deferred_with(&r, "DANE"), "{r:?}");
    assert_eq!(w.sink("bad").message_count(), 0);
    assert_eq!(rec[0].policy_type, PolicyType::Tlsa);
    assert_eq!(
        rec[0].failure.as_ref().unwrap().result_type,
        ResultType::TlsaInvalid
    );

    // TLSA but no STARTTLS: deferred, starttls-not-supported; never plain text.
    let (r, rec) = w.deliver("plain.example.dane.test").await;
    assert!(deferred_with(&r, "STARTTLS"), "{r:?}");
    assert_eq!(w.sink("plain").message_count(), 0);
    assert_eq!(rec[0].policy_type, PolicyType::Tlsa);
    assert_eq!(
        rec[0].failure.as_ref().unwrap().result_type,
        ResultType::StarttlsNotSupported
    );

    // `TLS-Required: No` (RFC 8689) skips DANE: delivered in plain text. The connection
    // it leaves idle must not carry the next, ordinary message past DANE.
    let (r, _) = w.deliver_with("plain.example.dane.test", true).await;
    assert!(delivered(&r), "{r:?}");
    assert_eq!(w.sink("plain").message_count(), 1);
    let (r, _) = w.deliver("plain.example.dane.test").await;
    assert!(deferred_with(&r, "STARTTLS"), "{r:?}");
    assert_eq!(
        w.sink("plain").message_count(),
        1,
        "reused a plain-text connection"
    );

    // An insecure zone: its TLSA records are ignored; delivered opportunistically.
    let (r, rec) = w.deliver("example.insec.test").await;
    assert!(delivered(&r), "{r:?}");
    assert_eq!(w.sink("insec").message_count(), 1);
    assert!(
        rec.iter().all(|s| s.policy_type != PolicyType::Tlsa),
        "{rec:?}"
    );

    // A bogus zone: the MX records cannot be trusted; deferred, dnssec-invalid.
    let (r, rec) = w.deliver("example.bogus.test").await;
    assert!(deferred_with(&r, "DNSSEC"), "{r:?}");
    assert_eq!(
        rec[0].failure.as_ref().unwrap().result_type,
        ResultType::DnssecInvalid
    );
    assert_eq!(
        w.sink("ee").message_count(),
        1,
        "the bogus zone's MX address got nothing"
    );

    // TLSA mismatch while a valid MTA-STS enforce policy accepts the certificate:
    // MTA-STS never turns a DANE failure into a delivery.
    let (r, rec) = w.deliver("stsbad.example.dane.test").await;
    assert!(deferred_with(&r, "DANE"), "{r:?}");
    assert_eq!(w.sink("stsbad").message_count(), 0);
    assert_eq!(rec[0].policy_type, PolicyType::Tlsa);
    assert_eq!(
        rec[0].failure.as_ref().unwrap().result_type,
        ResultType::TlsaInvalid
    );

    // Both valid: delivered, reported under DANE.
    let (r, rec) = w.deliver("stsgood.example.dane.test").await;
    assert!(delivered(&r), "{r:?}");
    assert_eq!(w.sink("stsgood").message_count(), 1);
    assert_eq!(rec[0].policy_type, PolicyType::Tlsa);
    assert!(rec[0].failure.is_none());
}
