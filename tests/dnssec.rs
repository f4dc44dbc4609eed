//! DNSSEC-validated lookups for DANE (RFC 7672) against signed zones served in-process
//! (`common::dnssec`): a signed `test.` (the trust anchor) with secure, insecure and
//! three kinds of bogus children.

mod common;

use common::dns::TestDns;
use common::dnssec::{SignedDns, Signing};
use hickory_proto::rr::RecordType;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use stsrelay::Config;
use stsrelay::dns::{Mx, MxAnswer, Resolver, Security, TlsaAnswer};

const SHA256: [u8; 32] = [0xab; 32];

struct World {
    dns: SignedDns,
    dir: tempfile::TempDir,
}

impl World {
    async fn new() -> World {
        let dns = SignedDns::start().await;
        dns.add_zone("test", Signing::Secure);
        dns.add_zone("secure.test", Signing::Secure);
        dns.add_zone("insecure.test", Signing::Unsigned);
        dns.add_zone("wrongkey.test", Signing::WrongKey);
        dns.add_zone("expired.test", Signing::Expired);
        dns.add_zone("corrupt.test", Signing::Corrupted);

        dns.add_mx("secure.test", 20, "mx2.secure.test");
        dns.add_mx("secure.test", 10, "mx.secure.test");
        dns.add_a("mx.secure.test", Ipv4Addr::new(127, 0, 0, 25));
        dns.add_aaaa("mx.secure.test", Ipv6Addr::LOCALHOST);
        dns.add_tlsa("_25._tcp.mx.secure.test", 3, 1, 1, &SHA256);
        dns.add_a("mx2.secure.test", Ipv4Addr::new(127, 0, 0, 26)); // no TLSA
        dns.add_txt("_25._tcp.mx3.secure.test", "not a TLSA"); // NODATA for TLSA
        dns.add_tlsa("_465._tcp.mx4.secure.test", 3, 1, 1, &SHA256); // _tcp.mx4: an empty non-terminal
        dns.set_cname("alias.secure.test", "mx.secure.test");
        dns.set_cname("alias2.secure.test", "mx2.secure.test");
        dns.add_tlsa("_25._tcp.alias2.secure.test", 2, 0, 1, &SHA256);
        dns.set_cname("alias.insecure.test", "mx.secure.test");

        dns.add_mx("insecure.test", 10, "mx.insecure.test");
        dns.add_a("mx.insecure.test", Ipv4Addr::new(127, 0, 0, 27));
        dns.add_tlsa("_25._tcp.mx.insecure.test", 3, 1, 1, &SHA256);

        for zone in ["wrongkey.test", "expired.test", "corrupt.test"] {
            dns.add_mx(zone, 10, &format!("mx.{zone}"));
            dns.add_a(&format!("mx.{zone}"), Ipv4Addr::new(127, 0, 0, 28));
            dns.add_tlsa(&format!("_25._tcp.mx.{zone}"), 3, 1, 1, &SHA256);
        }
        World {
            dns,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self, extra: &str) -> Config {
        let anchor = self.dns.write_trust_anchor(self.dir.path());
        Config::from_toml(&format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout_secs = 2\ntrust_anchor = \"{}\"\n{extra}",
            self.dns.addr(),
            anchor.display()
        ))
        .unwrap()
    }

    fn resolver(&self) -> Resolver {
        Resolver::from_config(&self.config("")).unwrap()
    }
}

fn mx(preference: u16, host: &str) -> Mx {
    Mx {
        preference,
        host: host.into(),
    }
}

fn assert_bogus(s: &Security, what: &str) {
    assert!(matches!(s, Security::Bogus(_)), "{what}: {s:?}");
}

#[tokio::test]
async fn secure_mx_addresses_and_tlsa_are_found() {
    let w = World::new().await;
    let r = w.resolver();
    assert!(r.dnssec_enabled());
    let (sec, answer) = r.mx_validated("secure.test").await.unwrap();
    assert_eq!(sec, Security::Secure);
    assert_eq!(
        answer,
        MxAnswer::Hosts(vec![mx(10, "mx.secure.test"), mx(20, "mx2.secure.test")])
    );
    let (sec, mut ips) = r.ips_validated("mx.secure.test").await.unwrap();
    ips.sort();
    assert_eq!(sec, Security::Secure);
    assert_eq!(
        ips,
        vec![
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 25)),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        ]
    );
    // Only an A record: the AAAA NODATA is a secure denial.
    let (sec, ips) = r.ips_validated("mx2.secure.test").await.unwrap();
    assert_eq!((sec, ips.len()), (Security::Secure, 1));
    let t = r.tlsa(25, "MX.secure.test.").await.unwrap();
    assert_eq!(
        t,
        TlsaAnswer {
            security: Security::Secure,
            records: vec![(3, 1, 1, SHA256.to_vec())],
            base_domain: "mx.secure.test".into(),
        }
    );
}

#[tokio::test]
async fn secure_denials_are_secure_and_empty() {
    let w = World::new().await;
    let r = w.resolver();
    for (host, case) in [
        ("mx2.secure.test", "NXDOMAIN below an existing host"),
        ("mx3.secure.test", "NODATA: a TXT at the TLSA name"),
        ("mx4.secure.test", "NODATA: _tcp is an empty non-terminal"),
        (
            "nohost.secure.test",
            "NXDOMAIN, the host does not exist either",
        ),
    ] {
        let t = r.tlsa(25, host).await.unwrap();
        assert_eq!(t.security, Security::Secure, "{case}: {t:?}");
        assert!(t.records.is_empty(), "{case}: {t:?}");
        assert_eq!(t.base_domain, host, "{case}");
    }
    let (sec, answer) = r.mx_validated("nx.secure.test").await.unwrap();
    assert_eq!((sec, answer), (Security::Secure, MxAnswer::NxDomain));
    let (sec, answer) = r.mx_validated("mx.secure.test").await.unwrap();
    assert_eq!((sec, answer), (Security::Secure, MxAnswer::Implicit));
}

#[tokio::test]
async fn insecure_child_is_insecure() {
    let w = World::new().await;
    let r = w.resolver();
    let (sec, answer) = r.mx_validated("insecure.test").await.unwrap();
    assert_eq!(sec, Security::Insecure);
    assert_eq!(answer, MxAnswer::Hosts(vec![mx(10, "mx.insecure.test")]));
    let (sec, ips) = r.ips_validated("mx.insecure.test").await.unwrap();
    assert_eq!((sec, ips.len()), (Security::Insecure, 1));
    let t = r.tlsa(25, "mx.insecure.test").await.unwrap();
    assert_eq!(t.security, Security::Insecure, "{t:?}");
    let (sec, answer) = r.mx_validated("nx.insecure.test").await.unwrap();
    assert_eq!((sec, answer), (Security::Insecure, MxAnswer::NxDomain));
    let t = r.tlsa(25, "nohost.insecure.test").await.unwrap();
    assert_eq!((t.security, t.records.len()), (Security::Insecure, 0));
}

#[tokio::test]
async fn bogus_children_are_bogus_for_dane_only() {
    let w = World::new().await;
    let r = w.resolver();
    for zone in ["wrongkey.test", "expired.test", "corrupt.test"] {
        let (sec, answer) = r.mx_validated(zone).await.unwrap();
        assert_bogus(&sec, &format!("MX {zone}"));
        assert_eq!(answer, MxAnswer::Hosts(vec![]), "never an implicit MX");
        let (sec, ips) = r.ips_validated(&format!("mx.{zone}")).await.unwrap();
        assert_bogus(&sec, &format!("A mx.{zone}"));
        assert!(ips.is_empty(), "no addresses from a bogus answer");
        let t = r.tlsa(25, &format!("mx.{zone}")).await.unwrap();
        assert_bogus(&t.security, &format!("TLSA mx.{zone}"));
        assert!(t.records.is_empty(), "no records from a bogus answer");
        // The lookups MTA-STS and plain delivery use never validate.
        assert_eq!(
            r.mx(zone).await.unwrap(),
            MxAnswer::Hosts(vec![mx(10, &format!("mx.{zone}"))])
        );
        assert_eq!(r.ips(&format!("mx.{zone}")).await.unwrap().len(), 1);
    }
}

#[tokio::test]
async fn plain_lookups_send_no_dnssec_queries() {
    let w = World::new().await;
    let r = w.resolver();
    r.mx("secure.test").await.unwrap();
    r.ips("mx.secure.test").await.unwrap();
    r.txt("_25._tcp.mx3.secure.test").await.unwrap();
    let q = w.dns.queries();
    assert!(!q.is_empty());
    assert!(
        q.iter()
            .all(|(_, t)| !matches!(t, RecordType::DNSKEY | RecordType::DS | RecordType::NS)),
        "{q:?}"
    );
    w.dns.clear_queries();
    r.mx_validated("secure.test").await.unwrap();
    assert!(
        w.dns
            .queries()
            .iter()
            .any(|(_, t)| *t == RecordType::DNSKEY),
        "the validating resolver fetches keys"
    );
}

#[tokio::test]
async fn dnssec_off_is_insecure_without_asking() {
    let w = World::new().await;
    let r = Resolver::from_config(&w.config("dnssec = false\n")).unwrap();
    assert!(!r.dnssec_enabled());
    let (sec, answer) = r.mx_validated("secure.test").await.unwrap();
    assert_eq!(sec, Security::Insecure);
    assert!(matches!(answer, MxAnswer::Hosts(h) if h.len() == 2));
    let (sec, ips) = r.ips_validated("mx.secure.test").await.unwrap();
    assert_eq!((sec, ips.len()), (Security::Insecure, 2));
    w.dns.clear_queries();
    let t = r.tlsa(25, "mx.secure.test").await.unwrap();
    assert_eq!(
        (t.security, t.records.len(), t.base_domain.as_str()),
        (Security::Insecure, 0, "mx.secure.test")
    );
    assert!(w.dns.queries().is_empty(), "{:?}", w.dns.queries());
    // The wrong key does not matter either.
    let (sec, _) = r.mx_validated("wrongkey.test").await.unwrap();
    assert_eq!(sec, Security::Insecure);
}

#[tokio::test]
async fn trust_anchor_file_errors_name_the_key_and_file() {
    let w = World::new().await;
    let load = |path: &Path| {
        Config::from_toml(&format!(
            "[dns]\nnameservers = [\"{}\"]\ntrust_anchor = \"{}\"\n",
            w.dns.addr(),
            path.display()
        ))
    };
    let missing = w.dir.path().join("nothing-here.keys");
    let e = load(&missing).unwrap_err().to_string();
    assert!(
        e.contains("dns.trust_anchor") && e.contains("nothing-here.keys"),
        "{e}"
    );
    let ds = w.dir.path().join("ds.keys");
    std::fs::write(&ds, "test. 3600 IN DS 12345 13 2 0123456789ABCDEF\n").unwrap();
    let e = load(&ds).unwrap_err().to_string();
    assert!(
        e.contains("dns.trust_anchor") && e.contains("ds.keys") && e.contains("DNSKEY"),
        "{e}"
    );
    let empty = w.dir.path().join("empty.keys");
    std::fs::write(&empty, "; nothing\n").unwrap();
    let e = load(&empty).unwrap_err().to_string();
    assert!(e.contains("no DNSKEY records"), "{e}");
}

#[tokio::test]
async fn a_trust_anchor_for_another_key_makes_everything_bogus() {
    let w = World::new().await;
    let other = SignedDns::start().await;
    other.add_zone("test", Signing::Secure);
    let anchor = w.dir.path().join("other.keys");
    std::fs::write(&anchor, other.trust_anchor()).unwrap();
    let cfg = Config::from_toml(&format!(
        "[dns]\nnameservers = [\"{}\"]\ntimeout_secs = 2\ntrust_anchor = \"{}\"\n",
        w.dns.addr(),
        anchor.display()
    ))
    .unwrap();
    let r = Resolver::from_config(&cfg).unwrap();
    let (sec, _) = r.mx_validated("secure.test").await.unwrap();
    assert_bogus(&sec, "MX secure.test under the wrong anchor");
    let t = r.tlsa(25, "mx.secure.test").await.unwrap();
    assert_bogus(&t.security, "TLSA under the wrong anchor");
}

/// RFC 7672 §2.2.3: with a secure CNAME chain the expanded name is tried first,
/// then the MX host name; with an insecure chain only the MX host name.
#[tokio::test]
async fn cname_mx_hosts_use_the_expanded_name_when_the_chain_is_secure() {
    let w = World::new().await;
    let r = w.resolver();
    let t = r.tlsa(25, "alias.secure.test").await.unwrap();
    assert_eq!(
        t,
        TlsaAnswer {
            security: Security::Secure,
            records: vec![(3, 1, 1, SHA256.to_vec())],
            base_domain: "mx.secure.test".into(),
        }
    );
    // No TLSA at the target: the records at the alias itself.
    let t = r.tlsa(25, "alias2.secure.test").await.unwrap();
    assert_eq!(
        t,
        TlsaAnswer {
            security: Security::Secure,
            records: vec![(2, 0, 1, SHA256.to_vec())],
            base_domain: "alias2.secure.test".into(),
        }
    );
    // An alias in an insecure zone: the chain is insecure, the target is not tried.
    let t = r.tlsa(25, "alias.insecure.test").await.unwrap();
    assert_eq!(
        (t.security, t.records.len(), t.base_domain.as_str()),
        (Security::Insecure, 0, "alias.insecure.test")
    );
    // Addresses through a secure alias are secure.
    let (sec, ips) = r.ips_validated("alias.secure.test").await.unwrap();
    assert_eq!((sec, ips.len()), (Security::Secure, 2));
}

#[tokio::test]
async fn a_server_failure_or_timeout_is_an_error_not_a_verdict() {
    let w = World::new().await;
    let anchor = w.dns.write_trust_anchor(w.dir.path());
    let resolver = |ns: String| {
        let cfg = Config::from_toml(&format!(
            "[dns]\nnameservers = [\"{ns}\"]\ntimeout_secs = 1\ntrust_anchor = \"{}\"\n",
            anchor.display()
        ))
        .unwrap();
        Resolver::from_config(&cfg).unwrap()
    };
    // SERVFAIL from the nameserver.
    let failing = TestDns::start().await;
    for name in ["secure.test", "mx.secure.test"] {
        failing.set_servfail(name, true);
    }
    let r = resolver(failing.addr().to_string());
    let e = r.tlsa(25, "mx.secure.test").await.unwrap_err();
    assert!(e.to_string().contains("mx.secure.test"), "{e}");
    assert!(r.mx_validated("secure.test").await.is_err());
    assert!(r.ips_validated("mx.secure.test").await.is_err());
    // No answer at all: a port nothing listens on (bound, noted, released).
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = resolver(format!("127.0.0.1:{port}"));
    assert!(r.tlsa(25, "mx.secure.test").await.is_err());
}

#[tokio::test]
async fn the_start_self_check_says_whether_validation_works() {
    let w = World::new().await;
    // Through a signing server with its anchor: the anchor's DNSKEY validates.
    let ok = w.resolver().dnssec_selfcheck().await.unwrap().unwrap();
    assert_eq!(ok, Security::Secure);
    // The same anchor through a nameserver that returns no DNSSEC records: bogus (the
    // relay logs that every domain would be deferred).
    let plain = TestDns::start().await;
    let anchor = w.dns.write_trust_anchor(w.dir.path());
    let cfg = Config::from_toml(&format!(
        "[dns]\nnameservers = [\"{}\"]\ntimeout_secs = 2\ntrust_anchor = \"{}\"\n",
        plain.addr(),
        anchor.display()
    ))
    .unwrap();
    let r = Resolver::from_config(&cfg).unwrap();
    let broken = r.dnssec_selfcheck().await.unwrap();
    assert!(!matches!(broken, Ok(Security::Secure)), "{broken:?}");
    // DNSSEC off: nothing to check.
    assert!(
        Resolver::from_config(&w.config("dnssec = false"))
            .unwrap()
            .dnssec_selfcheck()
            .await
            .is_none()
    );
}
