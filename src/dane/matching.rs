//! Matching one certificate against one TLSA record (RFC 6698 §2.1.2–2.1.3): select the
//! whole certificate or its SubjectPublicKeyInfo, then compare it in full or by digest.

use super::tlsa::{CertUsage, MatchingType, Selector, TlsaRecord};
use aws_lc_rs::digest;
use rustls_pki_types::CertificateDer;

/// The SubjectPublicKeyInfo of a certificate, DER with its outer `SEQUENCE`.
///
/// Parsed leniently (unknown critical extensions ignored, v1 certificates accepted), as
/// DANE cares only about the key; `None` if the certificate is not DER X.509.
pub fn spki_der(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let anchor = webpki::anchor_from_trusted_cert(cert).ok()?;
    Some(webpki::spki_for_anchor(&anchor).as_ref().to_vec())
}

/// The bytes a selector picks from a certificate: the DER certificate or its SPKI.
/// `None` for an unknown selector or an unparsable certificate.
pub fn selected(selector: Selector, cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    match selector {
        Selector::Cert => Some(cert.as_ref().to_vec()),
        Selector::Spki => spki_der(cert),
        Selector::Unknown(_) => None,
    }
}

/// The certificate association data a record with this selector and matching type would
/// carry for `cert` (the digest, or the selected bytes for `Full`).
pub fn association_data(
    selector: Selector,
    matching: MatchingType,
    cert: &CertificateDer<'_>,
) -> Option<Vec<u8>> {
    let bytes = selected(selector, cert)?;
    match matching {
        MatchingType::Full => Some(bytes),
        MatchingType::Sha256 => Some(digest::digest(&digest::SHA256, &bytes).as_ref().to_vec()),
        MatchingType::Sha512 => Some(digest::digest(&digest::SHA512, &bytes).as_ref().to_vec()),
        MatchingType::Unknown(_) => None,
    }
}

/// The TLSA record that would match `cert` (e.g. what to publish: `3 1 1 …`).
///
/// ```
/// use stsrelay::dane::{matching, CertUsage, MatchingType, Selector};
/// # let cert = rcgen::generate_simple_self_signed(vec!["mx.example.test".into()]).unwrap().cert;
/// # let cert = cert.der().clone();
/// let r = matching::record_for(CertUsage::DaneEe, Selector::Spki, MatchingType::Sha256, &cert).unwrap();
/// assert_eq!(r.data.len(), 32);
/// assert!(matching::matches(&r, &cert));
/// ```
pub fn record_for(
    usage: CertUsage,
    selector: Selector,
    matching: MatchingType,
    cert: &CertificateDer<'_>,
) -> Option<TlsaRecord> {
    Some(TlsaRecord {
        usage,
        selector,
        matching,
        data: association_data(selector, matching, cert)?,
    })
}

/// Does `cert` match the record's selector, matching type and data? The usage is not
/// looked at (which certificate of a chain to try is the caller's business); records
/// with unknown selector or matching type match nothing.
pub fn matches(record: &TlsaRecord, cert: &CertificateDer<'_>) -> bool {
    if let Some(len) = record.matching.digest_len()
        && record.data.len() != len
    {
        return false;
    }
    // Public data: no need for a constant-time comparison.
    association_data(record.selector, record.matching, cert).is_some_and(|d| d == record.data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dane::testpki;

    #[test]
    fn spki_is_the_key_rcgen_generated() {
        let ee = testpki::self_signed("mx.spki.test", testpki::Validity::Current);
        assert_eq!(spki_der(&ee.chain[0]).unwrap(), ee.spki);
        assert_eq!(spki_der(&CertificateDer::from(vec![0x30, 0x00])), None);
    }

    #[test]
    fn every_selector_and_matching_type_matches_and_a_flipped_byte_does_not() {
        let ee = testpki::self_signed("mx.match.test", testpki::Validity::Current);
        let cert = &ee.chain[0];
        for s in [Selector::Cert, Selector::Spki] {
            for m in [
                MatchingType::Full,
                MatchingType::Sha256,
                MatchingType::Sha512,
            ] {
                let r = record_for(CertUsage::DaneEe, s, m, cert).unwrap();
                assert!(r.usable(), "{r}");
                assert!(matches(&r, cert), "{r}");
                let mut wrong = r.clone();
                let last = wrong.data.len() - 1;
                wrong.data[last] ^= 0x01;
                assert!(!matches(&wrong, cert), "{wrong}");
                let mut short = r.clone();
                short.data.pop();
                assert!(!matches(&short, cert), "{short}");
            }
        }
        let sha256 = record_for(
            CertUsage::DaneEe,
            Selector::Cert,
            MatchingType::Sha256,
            cert,
        )
        .unwrap();
        assert_eq!(
            sha256.data,
            digest::digest(&digest::SHA256, cert.as_ref()).as_ref()
        );
    }

    #[test]
    fn unknown_selector_or_matching_matches_nothing() {
        let ee = testpki::self_signed("mx.unknown.test", testpki::Validity::Current);
        let cert = &ee.chain[0];
        let good = record_for(
            CertUsage::DaneEe,
            Selector::Spki,
            MatchingType::Sha256,
            cert,
        )
        .unwrap();
        let mut r = good.clone();
        r.selector = Selector::Unknown(7);
        assert!(!matches(&r, cert));
        let mut r = good;
        r.matching = MatchingType::Unknown(9);
        assert!(!matches(&r, cert));
        assert_eq!(
            record_for(
                CertUsage::DaneEe,
                Selector::Unknown(2),
                MatchingType::Full,
                cert
            ),
            None
        );
    }
}
