//! Test PKI built with rcgen 0.14: a self-signed CA and leaf certificates.
//!
//! Every certificate gets its own subject CN (rcgen's default DN is the same
//! "rcgen self signed cert" for every certificate, which makes a leaf look
//! self-issued by the CA and confuses chain building / error reporting).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A self-signed certificate authority.
pub struct TestCa {
    cn: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").field("cn", &self.cn).finish()
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "stsrelay tests");
    dn
}

fn san_list(names: &[&str]) -> Vec<SanType> {
    names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                (*n).try_into()
                    .unwrap_or_else(|e| panic!("bad SAN dNSName {n:?}: {e}")),
            ),
        })
        .collect()
}

/// Parameters for a TLS server leaf certificate.
fn leaf_params(
    cn: &str,
    sans: Vec<SanType>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    // rcgen's `time::OffsetDateTime` implements `From<SystemTime>`.
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    p
}

fn new_key() -> KeyPair {
    KeyPair::generate().expect("rcgen: generate key pair")
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

impl TestCa {
    /// A new self-signed CA whose subject CN is `cn` (make it unique per test).
    pub fn new(cn: &str) -> TestCa {
        let now = SystemTime::now();
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = (now - DAY).into();
        p.not_after = (now + 3650 * DAY).into();
        let key = new_key();
        let cert = p.self_signed(&key).expect("rcgen: self-sign CA");
        TestCa {
            cn: cn.to_string(),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    pub fn cn(&self) -> &str {
        &self.cn
    }

    pub fn ca_pem(&self) -> String {
        self.cert_pem.clone()
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// Writes the CA certificate to `<dir>/<cn>.pem` and returns the path.
    pub fn write_ca_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("{}.pem", self.cn));
        std::fs::write(&path, self.cert_pem.as_bytes()).expect("write CA pem");
        path
    }

    /// A root store containing only this CA.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .expect("add CA to root store");
        roots
    }

    /// A rustls client config trusting only this CA (TLS 1.2 and 1.3).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let cfg = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .expect("protocol versions")
            .with_root_certificates(self.root_store())
            .with_no_client_auth();
        Arc::new(cfg)
    }

    fn issue(&self, cn: &str, sans: Vec<SanType>, nb: SystemTime, na: SystemTime) -> Leaf {
        let p = leaf_params(cn, sans, nb, na);
        let key = new_key();
        let cert = p.signed_by(&key, &self.issuer).expect("rcgen: sign leaf");
        Leaf {
            chain: vec![cert.der().clone()],
            key: key_der(&key),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A leaf with SAN dNSNames `names` (IP literals become iPAddress SANs),
    /// CN = `names[0]`, valid from now-1day to now+30days.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        assert!(!names.is_empty(), "leaf needs at least one name");
        let now = SystemTime::now();
        self.issue(names[0], san_list(names), now - DAY, now + 30 * DAY)
    }

    /// Like [`TestCa::leaf`] but valid from now-2days to now-1day (expired).
    pub fn leaf_expired(&self, names: &[&str]) -> Leaf {
        assert!(!names.is_empty(), "leaf needs at least one name");
        let now = SystemTime::now();
        self.issue(names[0], san_list(names), now - 2 * DAY, now - DAY)
    }

    /// Like [`TestCa::leaf`] but not yet valid (now+1day .. now+30days).
    pub fn leaf_not_yet_valid(&self, names: &[&str]) -> Leaf {
        assert!(!names.is_empty(), "leaf needs at least one name");
        let now = SystemTime::now();
        self.issue(names[0], san_list(names), now + DAY, now + 30 * DAY)
    }

    /// A leaf without subjectAltName, only a subject CN (rejected by webpki).
    pub fn leaf_cn_only(&self, cn: &str) -> Leaf {
        let now = SystemTime::now();
        self.issue(cn, Vec::new(), now - DAY, now + 30 * DAY)
    }
}

/// A self-signed leaf (not issued by any CA), SANs `names`, CN = `names[0]`.
pub fn self_signed(names: &[&str]) -> Leaf {
    assert!(!names.is_empty(), "self_signed needs at least one name");
    let now = SystemTime::now();
    let p = leaf_params(names[0], san_list(names), now - DAY, now + 30 * DAY);
    let key = new_key();
    let cert = p.self_signed(&key).expect("rcgen: self-sign leaf");
    Leaf {
        chain: vec![cert.der().clone()],
        key: key_der(&key),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A server certificate chain (leaf first; the CA itself is not included)
/// and its private key, in DER and PEM.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Clone for Leaf {
    fn clone(&self) -> Self {
        Leaf {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Leaf {
    /// A rustls server config presenting this leaf, TLS 1.2 and 1.3.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
    }

    /// A rustls server config presenting this leaf with the given versions.
    pub fn server_config_versions(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ServerConfig> {
        let cfg = rustls::ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .expect("server cert");
        Arc::new(cfg)
    }

    /// The chain and key as a rustls `CertifiedKey` (for SNI resolvers).
    pub fn certified_key(&self) -> Arc<rustls::sign::CertifiedKey> {
        let ck = rustls::sign::CertifiedKey::from_der(
            self.chain.clone(),
            self.key.clone_key(),
            &super::provider(),
        )
        .expect("certified key");
        Arc::new(ck)
    }

    /// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key` (PEM) and returns both paths.
    pub fn write_pem(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{stem}.crt"));
        let k = dir.join(format!("{stem}.key"));
        std::fs::write(&c, self.cert_pem.as_bytes()).expect("write cert pem");
        std::fs::write(&k, self.key_pem.as_bytes()).expect("write key pem");
        (c, k)
    }
}
