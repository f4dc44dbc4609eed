//! The DKIM key that signs report e-mails (RFC 8460 §3: reports sent by e-mail MUST carry a
//! valid DKIM signature by the reporting domain; R84).
//!
//! Keys are read from PEM as `openssl` writes them: PKCS#8 (`BEGIN PRIVATE KEY`, what
//! `openssl genpkey` writes for RSA and Ed25519) and PKCS#1 RSA (`BEGIN RSA PRIVATE KEY`).
//! Signing itself is done by mail-auth 0.13 (see [`super::build_report_email`]).

use std::fmt;
use std::path::{Path, PathBuf};

use mail_auth::common::crypto::{Algorithm, Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::Writable;
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer};

/// DER of the OID rsaEncryption (1.2.840.113549.1.1.1).
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// DER of the OID id-Ed25519 (1.3.101.112).
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
/// DER of the OID id-Ed448 (1.3.101.113).
const OID_ED448: &[u8] = &[0x2b, 0x65, 0x71];
/// DER of the OID id-ecPublicKey (1.2.840.10045.2.1).
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// DER of the OID secp256r1 / P-256 (1.2.840.10045.3.1.7).
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the OID rsassa-pss (1.2.840.113549.1.1.10).
const OID_RSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];

/// A DKIM signing key loaded from PEM: PKCS#8 (`BEGIN PRIVATE KEY`, as `openssl genpkey`
/// writes for RSA and Ed25519) and PKCS#1 RSA (`BEGIN RSA PRIVATE KEY`).
///
/// RSA keys sign with `rsa-sha256`, Ed25519 keys with `ed25519-sha256` (RFC 8463).
/// `Debug` shows the algorithm and the public key's DNS value, never private key material.
///
/// ```
/// use stsrelay::tlsrpt::DkimKey;
///
/// let pem = include_str!("../../tests/fixtures/dkim/ed25519-pkcs8.pem");
/// let key = DkimKey::from_pem(pem)?;
/// assert_eq!(key.algorithm(), "ed25519-sha256");
/// // The TXT record to publish at <selector>._domainkey.<domain>:
/// assert!(key.dns_txt_record().starts_with("v=DKIM1; k=ed25519; s=email:tlsrpt; p="));
///
/// // An EC key is refused with a message that says so.
/// let err = DkimKey::from_pem(include_str!("../../tests/fixtures/dkim/ec-p256-pkcs8.pem")).unwrap_err();
/// assert!(err.to_string().contains("EC"), "{err}");
/// # Ok::<(), stsrelay::tlsrpt::DkimKeyError>(())
/// ```
pub struct DkimKey {
    inner: KeyInner,
}

enum KeyInner {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

/// Who signs report e-mails: `d=` ([`domain`](Self::domain)), `s=`
/// ([`selector`](Self::selector)) and the key. RFC 8460 wants the signature "by the
/// reporting domain"; we use the submitter domain as `d=` (R84).
#[derive(Debug)]
pub struct DkimSigning {
    /// The signing domain (`d=`), e.g. `sender.test`.
    pub domain: String,
    /// The selector (`s=`); the public key is at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// The private key.
    pub key: DkimKey,
}

/// Why a DKIM key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DkimKeyError {
    /// The key file could not be read.
    #[error("cannot read DKIM key file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key loaded from a file failed; names the file.
    #[error("DKIM key file {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with its contents.
        source: Box<DkimKeyError>,
    },
    /// The text holds no PEM section at all, or a malformed one.
    #[error(
        "not a PEM private key ({0}); expected \"-----BEGIN PRIVATE KEY-----\" or \"-----BEGIN RSA PRIVATE KEY-----\""
    )]
    NotPem(String),
    /// The PEM holds something other than an unencrypted private key.
    #[error(
        "PEM holds {0}, not an unencrypted private key; expected \"-----BEGIN PRIVATE KEY-----\" (PKCS#8) or \"-----BEGIN RSA PRIVATE KEY-----\" (PKCS#1)"
    )]
    NotPrivateKey(String),
    /// A private key of a type DKIM signing here does not support.
    #[error(
        "unsupported key type: {0}; DKIM keys must be RSA (rsa-sha256) or Ed25519 (ed25519-sha256)"
    )]
    UnsupportedKeyType(String),
    /// The key is of a supported type but was rejected by the crypto library.
    #[error("bad {kind} key: {reason}")]
    BadKey {
        /// "RSA" or "Ed25519".
        kind: &'static str,
        /// The library's reason (for RSA for example a size outside 2048..=8192 bits).
        reason: String,
    },
}

impl fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DkimKey")
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

impl DkimKey {
    /// Loads a key from PEM text. The first private key section is used (a file may hold
    /// other sections, e.g. parameters, before it). RSA keys must have 2048 to 8192 bits
    /// (what mail-auth's aws-lc-rs backend signs with).
    ///
    /// # Errors
    /// [`DkimKeyError::NotPem`] for text without PEM, [`DkimKeyError::NotPrivateKey`] for a
    /// public key, certificate or encrypted key, [`DkimKeyError::UnsupportedKeyType`] for EC,
    /// Ed448 or RSA-PSS keys, and [`DkimKeyError::BadKey`] for a key the crypto library
    /// rejects.
    pub fn from_pem(pem: &str) -> Result<DkimKey, DkimKeyError> {
        let mut found_other = None;
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()) {
            let (kind, der) = section.map_err(|e| DkimKeyError::NotPem(e.to_string()))?;
            match kind {
                SectionKind::PrivateKey => return Self::from_pkcs8_der(&der),
                SectionKind::RsaPrivateKey => {
                    return Self::rsa(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)));
                }
                SectionKind::EcPrivateKey => {
                    let curve = if contains(&der, OID_P256) {
                        " P-256"
                    } else {
                        ""
                    };
                    return Err(DkimKeyError::UnsupportedKeyType(format!(
                        "EC{curve} (\"BEGIN EC PRIVATE KEY\")"
                    )));
                }
                SectionKind::PublicKey => found_other.get_or_insert("a public key"),
                SectionKind::Certificate => found_other.get_or_insert("a certificate"),
                _ => found_other.get_or_insert("no private key"),
            };
        }
        if let Some(what) = found_other {
            return Err(DkimKeyError::NotPrivateKey(what.to_string()));
        }
        // Sections rustls-pki-types does not know are skipped silently; name them.
        match pem
            .lines()
            .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
            .filter_map(|l| l.strip_suffix("-----"))
            .next()
        {
            Some(label) if label.contains("ENCRYPTED") => Err(DkimKeyError::NotPrivateKey(
                format!("an encrypted key (\"BEGIN {label}\"); decrypt it with `openssl pkey`"),
            )),
            Some(label) if label.contains("OPENSSH") => Err(DkimKeyError::NotPrivateKey(format!(
                "an OpenSSH key (\"BEGIN {label}\"); convert it to PKCS#8"
            ))),
            Some(label) => Err(DkimKeyError::NotPrivateKey(format!("\"BEGIN {label}\""))),
            None => Err(DkimKeyError::NotPem("no \"-----BEGIN\" line".to_string())),
        }
    }

    /// Loads a key from a PEM file; errors name the file.
    ///
    /// # Errors
    /// [`DkimKeyError::Read`] if the file cannot be read, [`DkimKeyError::File`] wrapping
    /// the [`from_pem`](Self::from_pem) error otherwise.
    pub fn from_pem_file(path: &Path) -> Result<DkimKey, DkimKeyError> {
        let text = std::fs::read(path).map_err(|source| DkimKeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8_lossy(&text);
        Self::from_pem(&text).map_err(|e| DkimKeyError::File {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// The DKIM `a=` value: `"rsa-sha256"` or `"ed25519-sha256"`.
    pub fn algorithm(&self) -> &'static str {
        match &self.inner {
            KeyInner::Rsa(_) => "rsa-sha256",
            KeyInner::Ed25519(_) => "ed25519-sha256",
        }
    }

    /// The TXT record to publish at `<selector>._domainkey.<domain>` for this key:
    /// `v=DKIM1; k=rsa|ed25519; s=email:tlsrpt; p=<base64>` (for RSA `p=` is the
    /// SubjectPublicKeyInfo, as `openssl pkey -pubout` writes it; for Ed25519 the raw 32
    /// bytes, RFC 8463). `s=email:tlsrpt` keeps ordinary verifiers working (R84) — but
    /// note that dkimpy 1.1.8 mis-parses that colon list and then fails the signature; it
    /// verifies with no `s=` (or `s=*`).
    pub fn dns_txt_record(&self) -> String {
        let (k, p) = match &self.inner {
            KeyInner::Rsa(key) => ("rsa", rsa_spki(&key.public_key())),
            KeyInner::Ed25519(key) => ("ed25519", key.public_key()),
        };
        format!("v=DKIM1; k={k}; s=email:tlsrpt; p={}", base64(&p))
    }

    /// A borrowing adapter that mail-auth's `DkimSigner` can own.
    pub(crate) fn signer(&self) -> KeyRef<'_> {
        KeyRef(self)
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<DkimKey, DkimKeyError> {
        let Some(oid) = pkcs8_algorithm_oid(der) else {
            return Err(DkimKeyError::BadKey {
                kind: "PKCS#8",
                reason: "malformed PKCS#8 structure".to_string(),
            });
        };
        if oid == OID_RSA {
            Self::rsa(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec())))
        } else if oid == OID_ED25519 {
            let key = Ed25519Key::from_pkcs8_der(der).map_err(|e| DkimKeyError::BadKey {
                kind: "Ed25519",
                reason: e.to_string(),
            })?;
            Ok(DkimKey {
                inner: KeyInner::Ed25519(key),
            })
        } else if oid == OID_EC {
            let curve = if contains(der, OID_P256) {
                " P-256"
            } else {
                ""
            };
            Err(DkimKeyError::UnsupportedKeyType(format!(
                "EC{curve} (ECDSA)"
            )))
        } else if oid == OID_ED448 {
            Err(DkimKeyError::UnsupportedKeyType("Ed448".to_string()))
        } else if oid == OID_RSA_PSS {
            Err(DkimKeyError::UnsupportedKeyType(
                "RSA-PSS (use a plain rsaEncryption key: openssl genpkey -algorithm RSA)"
                    .to_string(),
            ))
        } else {
            Err(DkimKeyError::UnsupportedKeyType(format!(
                "PKCS#8 algorithm OID {}",
                oid_to_string(oid)
            )))
        }
    }

    fn rsa(der: PrivateKeyDer<'_>) -> Result<DkimKey, DkimKeyError> {
        let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| {
            let reason = e.to_string();
            // aws-lc-rs signs with 2048..=8192-bit RSA keys only.
            let reason = if reason.ends_with("TooSmall") {
                "too small: RSA keys need at least 2048 bits".to_string()
            } else if reason.ends_with("TooLarge") {
                "too large: RSA keys can have at most 8192 bits".to_string()
            } else {
                reason
            };
            DkimKeyError::BadKey {
                kind: "RSA",
                reason,
            }
        })?;
        Ok(DkimKey {
            inner: KeyInner::Rsa(key),
        })
    }
}

/// `&DkimKey` as a mail-auth [`SigningKey`], so that one loaded key signs many messages
/// (mail-auth's `DkimSigner::from_key` takes its key by value, and its key types are not
/// `Clone`).
pub(crate) struct KeyRef<'a>(&'a DkimKey);

impl SigningKey for KeyRef<'_> {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        match &self.0.inner {
            KeyInner::Rsa(k) => k.sign(input),
            KeyInner::Ed25519(k) => k.sign(input),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match &self.0.inner {
            KeyInner::Rsa(_) => Algorithm::RsaSha256,
            KeyInner::Ed25519(_) => Algorithm::Ed25519Sha256,
        }
    }
}

/// Reads a DER tag-length header; returns (tag, content, rest).
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The algorithm OID of a PKCS#8 PrivateKeyInfo:
/// `SEQUENCE { INTEGER version, SEQUENCE { OID algorithm, .. }, OCTET STRING, .. }`.
fn pkcs8_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    let (0x30, info, _) = der_item(der)? else {
        return None;
    };
    let (0x02, _version, rest) = der_item(info)? else {
        return None;
    };
    let (0x30, alg, _) = der_item(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der_item(alg)? else {
        return None;
    };
    Some(oid)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Dotted form of a DER OID body, for error messages.
fn oid_to_string(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for &b in oid {
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// DER length bytes.
fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption, NULL }
    let mut alg = vec![0x30, 0x0d, 0x06, 0x09];
    alg.extend_from_slice(OID_RSA);
    alg.extend_from_slice(&[0x05, 0x00]);
    let mut bits = vec![0x03];
    der_len(pkcs1.len() + 1, &mut bits);
    bits.push(0x00);
    bits.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_len(alg.len() + bits.len(), &mut out);
    out.extend_from_slice(&alg);
    out.extend_from_slice(&bits);
    out
}

/// Standard base64 with padding, no line breaks.
pub(crate) fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dkim/");

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIX}{name}")).unwrap()
    }

    #[test]
    fn loads_rsa_pkcs8_and_pkcs1_and_ed25519() {
        for (file, alg) in [
            ("rsa2048-pkcs8", "rsa-sha256"),
            ("rsa2048-pkcs1", "rsa-sha256"),
            ("ed25519-pkcs8", "ed25519-sha256"),
        ] {
            let key = DkimKey::from_pem(&fixture(&format!("{file}.pem")))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(key.algorithm(), alg, "{file}");
            // The DNS value computed from the private key equals what openssl derived.
            assert_eq!(
                key.dns_txt_record(),
                fixture(&format!("{file}.txt")).trim(),
                "{file}"
            );
        }
    }

    #[test]
    fn from_pem_file_names_the_file() {
        let path = Path::new(FIX).join("ed25519-pkcs8.pem");
        assert_eq!(
            DkimKey::from_pem_file(&path).unwrap().algorithm(),
            "ed25519-sha256"
        );

        let missing = Path::new(FIX).join("no-such-key.pem");
        let err = DkimKey::from_pem_file(&missing).unwrap_err();
        assert!(matches!(err, DkimKeyError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-key.pem"), "{err}");

        let ec = Path::new(FIX).join("ec-p256-pkcs8.pem");
        let err = DkimKey::from_pem_file(&ec).unwrap_err();
        assert!(err.to_string().contains("ec-p256-pkcs8.pem"), "{err}");
        assert!(
            matches!(&err, DkimKeyError::File { source, .. }
                if matches!(**source, DkimKeyError::UnsupportedKeyType(_))),
            "{err:?}"
        );
    }

    #[test]
    fn ec_keys_are_refused_clearly() {
        for file in ["ec-p256-pkcs8.pem", "ec-p256-sec1.pem"] {
            let err = DkimKey::from_pem(&fixture(file)).unwrap_err();
            assert!(
                matches!(&err, DkimKeyError::UnsupportedKeyType(t) if t.contains("EC P-256")),
                "{file}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains("EC P-256") && msg.contains("RSA"), "{msg}");
        }
    }

    #[test]
    fn garbage_is_not_pem() {
        for text in ["", "hello world", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"] {
            let err = DkimKey::from_pem(text).unwrap_err();
            assert!(matches!(err, DkimKeyError::NotPem(_)), "{text:?}: {err:?}");
        }
        // Broken base64 inside a PEM frame.
        let err =
            DkimKey::from_pem("-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n")
                .unwrap_err();
        assert!(matches!(err, DkimKeyError::NotPem(_)), "{err:?}");
        // Valid base64 but not a PKCS#8 structure.
        let err =
            DkimKey::from_pem("-----BEGIN PRIVATE KEY-----\naGVsbG8=\n-----END PRIVATE KEY-----\n")
                .unwrap_err();
        assert!(matches!(err, DkimKeyError::BadKey { .. }), "{err:?}");
    }

    #[test]
    fn public_keys_and_encrypted_keys_are_not_private_keys() {
        let err = DkimKey::from_pem(
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAhg1q2WaFjSJA+2iqcuqYjRUzNNI6If/drL2gmSEEClE=\n-----END PUBLIC KEY-----\n",
        )
        .unwrap_err();
        assert!(
            matches!(&err, DkimKeyError::NotPrivateKey(w) if w.contains("public key")),
            "{err:?}"
        );
        let err = DkimKey::from_pem(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\naGVsbG8=\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap_err();
        assert!(
            matches!(&err, DkimKeyError::NotPrivateKey(w) if w.contains("encrypted")),
            "{err:?}"
        );
    }

    #[test]
    fn corrupted_rsa_key_is_a_bad_key() {
        // A valid PKCS#1 frame whose modulus is damaged: the library rejects it.
        let pem = fixture("rsa2048-pkcs1.pem");
        let mut lines: Vec<String> = pem.lines().map(str::to_string).collect();
        lines[3] = "A".repeat(lines[3].len());
        let err = DkimKey::from_pem(&lines.join("\n")).unwrap_err();
        assert!(
            matches!(err, DkimKeyError::BadKey { kind: "RSA", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn small_rsa_key_is_refused_clearly() {
        // The aws-lc-rs backend of mail-auth refuses RSA keys under 2048 bits.
        let err = DkimKey::from_pem(&fixture("rsa1024-pkcs1.pem")).unwrap_err();
        assert!(
            matches!(&err, DkimKeyError::BadKey { kind: "RSA", reason } if reason.contains("2048")),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "bad RSA key: too small: RSA keys need at least 2048 bits"
        );
    }

    #[test]
    fn debug_shows_no_key_material() {
        let pem = fixture("rsa2048-pkcs1.pem");
        let key = DkimKey::from_pem(&pem).unwrap();
        let dbg = format!(
            "{:?}",
            DkimSigning {
                domain: "sender.test".into(),
                selector: "s1".into(),
                key
            }
        );
        assert!(
            dbg.contains("rsa-sha256") && dbg.contains("sender.test"),
            "{dbg}"
        );
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!dbg.contains(&line[..16]), "{dbg}");
        }
        assert!(dbg.len() < 200, "{dbg}");
    }

    #[test]
    fn key_can_be_shared_between_tasks() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<DkimKey>();
        assert_send_sync::<DkimSigning>();
    }

    #[test]
    fn oid_and_base64_helpers() {
        assert_eq!(oid_to_string(OID_EC), "1.2.840.10045.2.1");
        assert_eq!(oid_to_string(OID_ED25519), "1.3.101.112");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
