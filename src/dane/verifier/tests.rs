use super::*;
use crate::dane::testpki::{self, Ca, ServerCert, Validity};
use std::time::Duration;

const MATCHINGS: [MatchingType; 3] = [
    MatchingType::Full,
    MatchingType::Sha256,
    MatchingType::Sha512,
];
const SELECTORS: [Selector; 2] = [Selector::Cert, Selector::Spki];

fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

fn names(mx: &str, base: &str) -> ReferenceNames {
    ReferenceNames::new(mx, base).unwrap()
}

fn record(usage: CertUsage, s: Selector, m: MatchingType, cert: &CertificateDer<'_>) -> TlsaRecord {
    matching::record_for(usage, s, m, cert).unwrap()
}

fn check(
    set: &TlsaSet,
    chain: &[CertificateDer<'_>],
    n: &ReferenceNames,
) -> Result<Match, DaneError> {
    verify_chain(set, chain, n, UnixTime::now(), &provider())
}

fn flipped(mut r: TlsaRecord) -> TlsaRecord {
    let i = r.data.len() / 2;
    r.data[i] ^= 0x80;
    r
}

/// A root CA, an intermediate, and a leaf for `leaf_names` issued by the intermediate.
struct Pki {
    root: Ca,
    int: Ca,
    leaf: ServerCert,
}

impl Pki {
    fn new(tag: &str, leaf_names: &[&str], validity: Validity) -> Pki {
        let root = Ca::root(&format!("DANE test root {tag}"));
        let int = root.intermediate(&format!("DANE test intermediate {tag}"));
        let leaf = int.leaf(leaf_names, validity);
        Pki { root, int, leaf }
    }

    /// leaf, intermediate, root: what a well-configured DANE-TA server sends.
    fn full_chain(&self) -> Vec<CertificateDer<'static>> {
        let mut c = self.leaf.chain.clone();
        c.extend(self.int.chain.iter().cloned());
        c
    }
}

#[test]
fn dane_ee_every_selector_and_matching_type() {
    let ee = testpki::self_signed("mx.ee.test", Validity::Current);
    let n = names("mx.ee.test", "mx.ee.test");
    for s in SELECTORS {
        for m in MATCHINGS {
            let r = record(CertUsage::DaneEe, s, m, &ee.chain[0]);
            let got = check(&TlsaSet::new(vec![r.clone()]), &ee.chain, &n).unwrap();
            assert_eq!(
                got,
                Match {
                    record: r.clone(),
                    kind: MatchKind::EndEntity
                }
            );
            let bad = flipped(r);
            assert_eq!(
                check(&TlsaSet::new(vec![bad.clone()]), &ee.chain, &n),
                Err(DaneError::NoMatch {
                    usable: 1,
                    presented: 1
                }),
                "{bad}"
            );
        }
    }
}

#[test]
fn dane_ee_ignores_name_and_expiry() {
    let ee = testpki::self_signed("wrong-name.invalid", Validity::Expired);
    let r = record(
        CertUsage::DaneEe,
        Selector::Spki,
        MatchingType::Sha256,
        &ee.chain[0],
    );
    let m = check(
        &TlsaSet::new(vec![r]),
        &ee.chain,
        &names("mx.example.test", "mx.example.test"),
    )
    .unwrap();
    assert_eq!(m.kind, MatchKind::EndEntity);
    assert!(m.to_string().contains("DANE-EE"), "{m}");
}

#[test]
fn dane_ee_looks_only_at_the_server_certificate() {
    // A 3 x x record for an issuer's certificate does not authenticate the leaf.
    let p = Pki::new("ee-issuer", &["mx.ee-issuer.test"], Validity::Current);
    let r = record(
        CertUsage::DaneEe,
        Selector::Cert,
        MatchingType::Sha256,
        &p.int.cert,
    );
    assert_eq!(
        check(
            &TlsaSet::new(vec![r]),
            &p.full_chain(),
            &names("mx.ee-issuer.test", "mx.ee-issuer.test")
        ),
        Err(DaneError::NoMatch {
            usable: 1,
            presented: 3
        })
    );
}

#[test]
fn dane_ta_every_selector_and_matching_type_for_intermediate_and_root() {
    let p = Pki::new("ta", &["mx.ta.test"], Validity::Current);
    let chain = p.full_chain();
    let n = names("mx.ta.test", "mx.ta.test");
    for (depth, ta) in [(1, &p.int.cert), (2, &p.root.cert)] {
        for s in SELECTORS {
            for m in MATCHINGS {
                let r = record(CertUsage::DaneTa, s, m, ta);
                let got = check(&TlsaSet::new(vec![r.clone()]), &chain, &n).unwrap();
                assert_eq!(
                    got.kind,
                    MatchKind::TrustAnchor {
                        depth: Some(depth),
                        name: "mx.ta.test".into()
                    },
                    "{r}"
                );
                assert_eq!(got.record, r);
                let bad = flipped(r);
                assert_eq!(
                    check(&TlsaSet::new(vec![bad.clone()]), &chain, &n),
                    Err(DaneError::NoMatch {
                        usable: 1,
                        presented: 3
                    }),
                    "{bad}"
                );
            }
        }
    }
}

#[test]
fn dane_ta_checks_the_name() {
    let p = Pki::new("ta-name", &["mx.other.test"], Validity::Current);
    let r = record(
        CertUsage::DaneTa,
        Selector::Spki,
        MatchingType::Sha256,
        &p.root.cert,
    );
    let e = check(
        &TlsaSet::new(vec![r]),
        &p.full_chain(),
        &names("mx.example.test", "mx.example.test"),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            DaneError::TrustAnchor {
                failure: ChainFailure::NameMismatch,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.result_type(), ResultType::CertificateHostMismatch);
    assert!(e.to_string().contains("mx.example.test"), "{e}");
}

#[test]
fn dane_ta_accepts_the_mx_name_or_the_tlsa_base_domain() {
    // MX mx.example.test is a CNAME for mx7.hosting.test, where the TLSA records live.
    let n = names("mx.example.test", "mx7.hosting.test");
    for leaf_name in ["mx.example.test", "mx7.hosting.test"] {
        let p = Pki::new(leaf_name, &[leaf_name], Validity::Current);
        let r = record(
            CertUsage::DaneTa,
            Selector::Cert,
            MatchingType::Sha256,
            &p.int.cert,
        );
        let m = check(&TlsaSet::new(vec![r]), &p.full_chain(), &n).unwrap();
        assert_eq!(
            m.kind,
            MatchKind::TrustAnchor {
                depth: Some(1),
                name: leaf_name.into()
            }
        );
    }
}

#[test]
fn dane_ta_wildcard_certificate() {
    let p = Pki::new("wild", &["*.wild.test"], Validity::Current);
    let r = record(
        CertUsage::DaneTa,
        Selector::Spki,
        MatchingType::Sha512,
        &p.int.cert,
    );
    let m = check(
        &TlsaSet::new(vec![r]),
        &p.full_chain(),
        &names("mx1.wild.test", "mx1.wild.test"),
    )
    .unwrap();
    assert_eq!(
        m.kind,
        MatchKind::TrustAnchor {
            depth: Some(1),
            name: "mx1.wild.test".into()
        }
    );
}

#[test]
fn dane_ta_checks_expiry() {
    let p = Pki::new("ta-expired", &["mx.expired.test"], Validity::Expired);
    let r = record(
        CertUsage::DaneTa,
        Selector::Spki,
        MatchingType::Sha256,
        &p.int.cert,
    );
    let e = check(
        &TlsaSet::new(vec![r]),
        &p.full_chain(),
        &names("mx.expired.test", "mx.expired.test"),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            DaneError::TrustAnchor {
                failure: ChainFailure::Expired,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.result_type(), ResultType::CertificateExpired);
}

#[test]
fn dane_ta_anchor_sent_but_leaf_not_issued_under_it() {
    let p = Pki::new("ta-real", &["mx.mixed.test"], Validity::Current);
    let stranger = Ca::root("DANE test stranger root").leaf(&["mx.mixed.test"], Validity::Current);
    let mut chain = stranger.chain.clone();
    chain.push(p.root.cert.clone());
    let r = record(
        CertUsage::DaneTa,
        Selector::Cert,
        MatchingType::Sha256,
        &p.root.cert,
    );
    let e = check(
        &TlsaSet::new(vec![r]),
        &chain,
        &names("mx.mixed.test", "mx.mixed.test"),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            DaneError::TrustAnchor {
                failure: ChainFailure::NotTrusted,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.result_type(), ResultType::CertificateNotTrusted);
}

#[test]
fn dane_ta_does_not_treat_the_server_certificate_as_its_own_anchor() {
    let ee = testpki::self_signed("mx.self.test", Validity::Current);
    let r = record(
        CertUsage::DaneTa,
        Selector::Spki,
        MatchingType::Sha256,
        &ee.chain[0],
    );
    assert_eq!(
        check(
            &TlsaSet::new(vec![r]),
            &ee.chain,
            &names("mx.self.test", "mx.self.test")
        ),
        Err(DaneError::NoMatch {
            usable: 1,
            presented: 1
        })
    );
}

#[test]
fn dane_ta_anchor_not_sent_only_full_spki_works() {
    // The server sends leaf + intermediate but not the root the records name.
    let p = Pki::new("ta-absent", &["mx.absent.test"], Validity::Current);
    let mut chain = p.leaf.chain.clone();
    chain.push(p.int.cert.clone());
    let n = names("mx.absent.test", "mx.absent.test");
    for (s, m) in [
        (Selector::Cert, MatchingType::Full),
        (Selector::Cert, MatchingType::Sha256),
        (Selector::Spki, MatchingType::Sha256),
        (Selector::Spki, MatchingType::Sha512),
    ] {
        let r = record(CertUsage::DaneTa, s, m, &p.root.cert);
        assert_eq!(
            check(&TlsaSet::new(vec![r.clone()]), &chain, &n),
            Err(DaneError::NoMatch {
                usable: 1,
                presented: 2
            }),
            "{r}"
        );
    }
    // "2 1 0": the record carries the whole key; it anchors the chain by itself.
    let full = TlsaRecord::from_raw(2, 1, 0, p.root.spki.clone());
    let m = check(&TlsaSet::new(vec![full.clone()]), &chain, &n).unwrap();
    assert_eq!(
        m.kind,
        MatchKind::TrustAnchor {
            depth: None,
            name: "mx.absent.test".into()
        }
    );
    assert!(m.to_string().contains("not sent"), "{m}");
    // Without the intermediate there is no path from the server certificate to the key.
    assert_eq!(
        check(&TlsaSet::new(vec![full.clone()]), &p.leaf.chain, &n),
        Err(DaneError::NoMatch {
            usable: 1,
            presented: 1
        })
    );
    // A 2 1 0 key that signed none of the presented certificates matches nothing.
    let other = Ca::root("DANE test other key");
    let wrong = TlsaRecord::from_raw(2, 1, 0, other.spki.clone());
    assert_eq!(
        check(&TlsaSet::new(vec![wrong]), &chain, &n),
        Err(DaneError::NoMatch {
            usable: 1,
            presented: 2
        })
    );
    // But a 2 1 0 key that does anchor the chain still needs the right name.
    let e = check(
        &TlsaSet::new(vec![full]),
        &chain,
        &names("mx.elsewhere.test", "mx.elsewhere.test"),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            DaneError::TrustAnchor {
                failure: ChainFailure::NameMismatch,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn any_record_passing_is_enough_and_unusable_ones_are_ignored() {
    let p = Pki::new("mixed-set", &["mx.set.test"], Validity::Current);
    let chain = p.full_chain();
    let good = record(
        CertUsage::DaneTa,
        Selector::Spki,
        MatchingType::Sha256,
        &p.root.cert,
    );
    let mut pkix = good.clone();
    pkix.usage = CertUsage::PkixTa;
    let set = TlsaSet::new(vec![
        flipped(record(
            CertUsage::DaneEe,
            Selector::Spki,
            MatchingType::Sha256,
            &p.leaf.chain[0],
        )),
        pkix.clone(),
        good.clone(),
    ]);
    let m = check(&set, &chain, &names("mx.set.test", "mx.set.test")).unwrap();
    assert_eq!(m.record, good);
    // PKIX-TA alone would have matched the root, but PKIX usages are unusable for SMTP.
    assert_eq!(
        check(
            &TlsaSet::new(vec![pkix]),
            &chain,
            &names("mx.set.test", "mx.set.test")
        ),
        Err(DaneError::NoUsableRecords)
    );
}

#[test]
fn empty_inputs() {
    let ee = testpki::self_signed("mx.empty.test", Validity::Current);
    let n = names("mx.empty.test", "mx.empty.test");
    assert_eq!(
        check(&TlsaSet::default(), &ee.chain, &n),
        Err(DaneError::NoUsableRecords)
    );
    let r = record(
        CertUsage::DaneEe,
        Selector::Spki,
        MatchingType::Sha256,
        &ee.chain[0],
    );
    assert_eq!(
        check(&TlsaSet::new(vec![r]), &[], &n),
        Err(DaneError::NoCertificate)
    );
    assert_eq!(
        DaneVerifier::new(
            &TlsaSet::from_raw([(1, 1, 1, vec![0; 32])]),
            n,
            Arc::new(provider())
        )
        .unwrap_err(),
        DaneSetupError::NoUsableRecords
    );
}

#[test]
fn reference_names_are_validated() {
    assert!(matches!(
        ReferenceNames::new("not a name", "mx.example.test"),
        Err(DaneSetupError::InvalidName { .. })
    ));
    assert!(matches!(
        ReferenceNames::new("192.0.2.1", "192.0.2.1"),
        Err(DaneSetupError::InvalidName { .. })
    ));
    assert_eq!(
        ReferenceNames::from_names(Vec::<String>::new()),
        Err(DaneSetupError::NoNames)
    );
}

#[test]
fn dane_error_survives_rustls_and_io_wrapping() {
    let e = DaneError::NoMatch {
        usable: 2,
        presented: 1,
    };
    let rustls_err: rustls::Error = e.clone().into();
    assert_eq!(dane_failure(&rustls_err), Some(&e));
    let f = TlsFailure::from(&rustls_err);
    assert_eq!(f.result_type, ResultType::TlsaInvalid);
    assert_eq!(f.reason_code, "dane-tlsa-no-match");
    let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_err);
    assert_eq!(find_dane_failure(&io), Some(&e));
    // Other rustls errors are not DANE failures and keep their usual mapping.
    let other = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
    assert_eq!(dane_failure(&other), None);
    assert_eq!(
        TlsFailure::from(&other).result_type,
        ResultType::CertificateNotTrusted
    );
}

mod handshake {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// One TLS handshake over loopback: `server` presents its chain with `version`, the
    /// client authenticates it by DANE with `tlsa`. The greeting read proves the session.
    async fn handshake(
        server: &ServerCert,
        version: &'static rustls::SupportedProtocolVersion,
        tlsa: &TlsaSet,
    ) -> std::io::Result<rustls::ProtocolVersion> {
        let provider = Arc::new(provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(server.chain.clone(), server.key.clone_key())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            tls.write_all(b"220 dane.test ready\r\n").await?;
            tls.shutdown().await
        });
        let client_config =
            DaneVerifier::new(tlsa, names("mx.dane.test", "mx.dane.test"), provider)
                .unwrap()
                .client_config()
                .unwrap();
        let tcp = TcpStream::connect(addr).await?;
        let sni = ServerName::try_from("mx.dane.test").unwrap();
        let result = tokio_rustls::TlsConnector::from(client_config)
            .connect(sni, tcp)
            .await;
        let outcome = match result {
            Ok(mut tls) => {
                let mut buf = Vec::new();
                tls.read_to_end(&mut buf).await?;
                assert_eq!(buf, b"220 dane.test ready\r\n");
                Ok(tls.get_ref().1.protocol_version().unwrap())
            }
            Err(e) => Err(e),
        };
        // The server side fails too when the client rejects it; only its end matters.
        let _ = server_task.await;
        outcome
    }

    async fn bounded(
        server: &ServerCert,
        version: &'static rustls::SupportedProtocolVersion,
        tlsa: &TlsaSet,
    ) -> std::io::Result<rustls::ProtocolVersion> {
        // A guard against a hang, not a timing assertion.
        tokio::time::timeout(Duration::from_secs(60), handshake(server, version, tlsa))
            .await
            .expect("handshake did not finish")
    }

    #[tokio::test]
    async fn matching_3_1_1_connects_and_mismatch_fails_with_dane_error() {
        let server = testpki::self_signed("not-the-mx-name.invalid", Validity::Current);
        let good = record(
            CertUsage::DaneEe,
            Selector::Spki,
            MatchingType::Sha256,
            &server.chain[0],
        );
        let bad = flipped(good.clone());
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let v = bounded(&server, version, &TlsaSet::new(vec![good.clone()]))
                .await
                .unwrap_or_else(|e| panic!("{:?}: {e}", version.version));
            assert_eq!(v, version.version);

            let err = bounded(&server, version, &TlsaSet::new(vec![bad.clone()]))
                .await
                .expect_err("mismatching TLSA record must fail the handshake");
            let dane = find_dane_failure(&err).unwrap_or_else(|| panic!("no DaneError in {err:?}"));
            assert_eq!(
                dane,
                &DaneError::NoMatch {
                    usable: 1,
                    presented: 1
                }
            );
            assert_eq!(dane.result_type(), ResultType::TlsaInvalid);
        }
    }

    #[tokio::test]
    async fn dane_ta_chain_connects() {
        let p = Pki::new("handshake", &["mx.dane.test"], Validity::Current);
        let server = ServerCert {
            chain: p.full_chain(),
            key: p.leaf.key.clone_key(),
            spki: p.leaf.spki.clone(),
        };
        let r = record(
            CertUsage::DaneTa,
            Selector::Spki,
            MatchingType::Sha256,
            &p.root.cert,
        );
        bounded(&server, &rustls::version::TLS13, &TlsaSet::new(vec![r]))
            .await
            .unwrap();
    }
}
