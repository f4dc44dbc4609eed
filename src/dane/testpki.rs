//! Test certificates made with rcgen: self-signed end entities and CA chains. Every
//! certificate gets its own CN (rcgen's default DN is shared, which confuses chain
//! building).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::time::{Duration, SystemTime};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Clone, Copy)]
pub(crate) enum Validity {
    /// now-1d .. now+30d
    Current,
    /// now-2d .. now-1d
    Expired,
}

impl Validity {
    fn range(self) -> (SystemTime, SystemTime) {
        let now = SystemTime::now();
        match self {
            Validity::Current => (now - DAY, now + 30 * DAY),
            Validity::Expired => (now - 2 * DAY, now - DAY),
        }
    }
}

/// A server's chain (leaf first) and key.
pub(crate) struct ServerCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The leaf's SubjectPublicKeyInfo DER, as rcgen encodes it.
    pub spki: Vec<u8>,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "stsrelay dane tests");
    dn
}

fn leaf_params(names: &[&str], validity: Validity) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(names[0]);
    p.subject_alt_names = names
        .iter()
        .map(|n| SanType::DnsName((*n).try_into().expect("SAN")))
        .collect();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (nb, na) = validity.range();
    p.not_before = nb.into();
    p.not_after = na.into();
    p
}

fn key() -> KeyPair {
    KeyPair::generate().expect("rcgen key")
}

fn key_der(k: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der()))
}

/// A self-signed server certificate for `name` (SAN and CN).
pub(crate) fn self_signed(name: &str, validity: Validity) -> ServerCert {
    let k = key();
    let cert = leaf_params(&[name], validity)
        .self_signed(&k)
        .expect("self-sign");
    ServerCert {
        chain: vec![cert.der().clone()],
        key: key_der(&k),
        spki: k.subject_public_key_info(),
    }
}

/// A certificate authority (root or intermediate).
pub(crate) struct Ca {
    pub cert: CertificateDer<'static>,
    /// Its chain up to (and including) the root, itself first.
    pub chain: Vec<CertificateDer<'static>>,
    pub spki: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let (nb, na) = Validity::Current.range();
    p.not_before = nb.into();
    p.not_after = (na + 3650 * DAY).into();
    p
}

impl Ca {
    pub(crate) fn root(cn: &str) -> Ca {
        let p = ca_params(cn);
        let k = key();
        let cert = p.self_signed(&k).expect("self-sign CA").der().clone();
        Ca {
            chain: vec![cert.clone()],
            cert,
            spki: k.subject_public_key_info(),
            issuer: Issuer::new(p, k),
        }
    }

    pub(crate) fn intermediate(&self, cn: &str) -> Ca {
        let p = ca_params(cn);
        let k = key();
        let cert = p
            .signed_by(&k, &self.issuer)
            .expect("sign CA")
            .der()
            .clone();
        let mut chain = vec![cert.clone()];
        chain.extend(self.chain.iter().cloned());
        Ca {
            chain,
            cert,
            spki: k.subject_public_key_info(),
            issuer: Issuer::new(p, k),
        }
    }

    /// A leaf for `names`; the chain holds only the leaf (add CA certs as a test needs).
    pub(crate) fn leaf(&self, names: &[&str], validity: Validity) -> ServerCert {
        let k = key();
        let cert = leaf_params(names, validity)
            .signed_by(&k, &self.issuer)
            .expect("sign leaf");
        ServerCert {
            chain: vec![cert.der().clone()],
            key: key_der(&k),
            spki: k.subject_public_key_info(),
        }
    }
}
