//! A DNS server for DNSSEC-signed zones, for validating-resolver tests (loopback only).
//!
//! Like [`super::dns::TestDns`] it looks like a recursive resolver that knows every
//! answer, but it holds a tree of zones, each with its own ECDSA P-256 (algorithm 13)
//! key generated at start, and signs on the fly:
//!
//! * records go to the deepest zone containing their owner; each zone apex gets an
//!   SOA, an NS and (signed zones) its DNSKEY; the parent zone gets the delegation's
//!   NS and, for signed children, a DS (SHA-256) of the child's key;
//! * with the DO bit every RRset in the answer or authority section carries an RRSIG
//!   from its zone's key; DS queries are answered from the parent side of the cut;
//! * NODATA gets the SOA and the NSEC at the name; NXDOMAIN gets the SOA, the NSEC
//!   covering the name and the NSEC covering the wildcard at the closest encloser
//!   (RFC 4035 §3.1.3); an empty non-terminal is NODATA with the covering NSEC;
//! * [`Signing`] makes a zone unsigned (insecure delegation: NS and NSEC, no DS) or
//!   bogus in one of three ways.
//!
//! [`SignedDns::trust_anchor`] gives the DNSKEY lines of the top zones, the format of
//! `dns.trust_anchor`. TTLs default to 0 so no cache hides a test's change.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use hickory_proto::dnssec::crypto::EcdsaSigningKey;
use hickory_proto::dnssec::rdata::{DNSKEY, DNSSECRData, DS, NSEC, RRSIG, SigInput};
use hickory_proto::dnssec::{Algorithm, DigestType, SigningKey, TBS};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, SOA, TLSA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, SerialNumber};

use super::TaskGuard;
use super::dns::serve;

/// Longest CNAME chain that is followed.
const MAX_CNAME_HOPS: usize = 8;

/// How a zone is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signing {
    /// Signed; the parent holds its DS (a secure delegation).
    Secure,
    /// Not signed; the parent has an NS and, signed, an NSEC proving there is no DS
    /// (an insecure delegation).
    Unsigned,
    /// Bogus: the parent's DS is for one key, the zone publishes and signs with another.
    WrongKey,
    /// Bogus: every signature expired yesterday.
    Expired,
    /// Bogus: every signature except the DNSKEY RRset's has a flipped byte.
    Corrupted,
}

/// A generated zone key (flags 257: zone key, SEP; one key signs everything).
struct ZoneKey {
    signing: EcdsaSigningKey,
    dnskey: DNSKEY,
    tag: u16,
}

impl ZoneKey {
    fn generate() -> ZoneKey {
        let alg = Algorithm::ECDSAP256SHA256;
        let pkcs8 = EcdsaSigningKey::generate_pkcs8(alg).expect("generate P-256 key");
        let signing = EcdsaSigningKey::from_pkcs8(&pkcs8, alg).expect("load P-256 key");
        let dnskey = DNSKEY::new(
            true,
            true,
            false,
            signing.to_public_key().expect("public key"),
        );
        let tag = dnskey.calculate_key_tag().expect("key tag");
        ZoneKey {
            signing,
            dnskey,
            tag,
        }
    }
}

struct Zone {
    apex: Name,
    signing: Signing,
    /// The key the parent's DS is made from.
    key: Arc<ZoneKey>,
    /// The key published in the DNSKEY RRset and used to sign (`key` unless `WrongKey`).
    signer: Arc<ZoneKey>,
}

impl Zone {
    fn signed(&self) -> bool {
        self.signing != Signing::Unsigned
    }
}

#[derive(Default)]
struct State {
    zones: Vec<Zone>,
    /// owner (lowercase, fully qualified) -> records added by the test
    records: BTreeMap<Name, Vec<RData>>,
    ttl: u32,
    log: Vec<(String, RecordType)>,
}

/// One zone's contents (user and synthesised records), in canonical name order.
type ZoneData = BTreeMap<Name, BTreeMap<RecordType, Vec<RData>>>;

/// Handle to a running signed-zone DNS server; the server stops when the last clone
/// is dropped.
#[derive(Clone)]
pub struct SignedDns {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _tasks: Arc<TaskGuard>,
}

impl std::fmt::Debug for SignedDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedDns({})", self.addr)
    }
}

/// `name` as a lowercase fully qualified [`Name`]; panics on a bad name (test input).
pub fn fqdn(name: &str) -> Name {
    let mut n = Name::from_ascii(name)
        .unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"))
        .to_lowercase();
    n.set_fqdn(true);
    n
}

impl SignedDns {
    /// Starts the server on 127.0.0.1 (random port, UDP and TCP) with no zones.
    pub async fn start() -> SignedDns {
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let (addr, tasks) = serve(Arc::new(move |q: &Query, dnssec_ok, resp: &mut Message| {
            let mut st = s.lock().unwrap();
            st.log
                .push((q.name.to_ascii().to_ascii_lowercase(), q.query_type));
            answer(&st, q, dnssec_ok, resp);
        }))
        .await;
        SignedDns {
            addr,
            state,
            _tasks: Arc::new(tasks),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds the zone `apex` with a new key. A zone under another zone is delegated
    /// from it (NS, plus DS unless `Unsigned`); a zone under no other is a top zone,
    /// whose key goes into [`SignedDns::trust_anchor`].
    pub fn add_zone(&self, apex: &str, signing: Signing) {
        let key = Arc::new(ZoneKey::generate());
        let signer = if signing == Signing::WrongKey {
            Arc::new(ZoneKey::generate())
        } else {
            key.clone()
        };
        let mut st = self.state();
        let apex = fqdn(apex);
        assert!(
            !st.zones.iter().any(|z| z.apex == apex),
            "zone {apex} added twice"
        );
        st.zones.push(Zone {
            apex,
            signing,
            key,
            signer,
        });
    }

    /// TTL of every record (and the negative TTL).
    pub fn set_ttl(&self, ttl: u32) {
        self.state().ttl = ttl;
    }

    fn add(&self, name: &str, rdata: RData) {
        let mut st = self.state();
        let list = st.records.entry(fqdn(name)).or_default();
        if !list.contains(&rdata) {
            list.push(rdata);
        }
    }

    pub fn add_a(&self, name: &str, ip: Ipv4Addr) {
        self.add(name, RData::A(A(ip)));
    }

    pub fn add_aaaa(&self, name: &str, ip: Ipv6Addr) {
        self.add(name, RData::AAAA(AAAA(ip)));
    }

    pub fn add_mx(&self, name: &str, preference: u16, exchange: &str) {
        self.add(name, RData::MX(MX::new(preference, fqdn(exchange))));
    }

    pub fn add_txt(&self, name: &str, text: &str) {
        self.add(name, RData::TXT(TXT::new(vec![text.to_string()])));
    }

    /// Adds a TLSA record (usage, selector, matching type, data) at `name`
    /// (e.g. `_25._tcp.mx.example.test`).
    pub fn add_tlsa(&self, name: &str, usage: u8, selector: u8, matching: u8, data: &[u8]) {
        self.add(
            name,
            RData::TLSA(TLSA::new(
                usage.into(),
                selector.into(),
                matching.into(),
                data.to_vec(),
            )),
        );
    }

    /// Makes `name` an alias of `target`.
    pub fn set_cname(&self, name: &str, target: &str) {
        let mut st = self.state();
        let list = st.records.entry(fqdn(name)).or_default();
        list.clear();
        list.push(RData::CNAME(CNAME(fqdn(target))));
    }

    /// The DNSKEY records of the top zones, one per line
    /// (`test. 3600 IN DNSKEY 257 3 13 …`): a `dns.trust_anchor` file.
    pub fn trust_anchor(&self) -> String {
        let st = self.state();
        st.zones
            .iter()
            .filter(|z| parent_zone(&st, z).is_none())
            .map(|z| {
                let r = Record::from_rdata(
                    z.apex.clone(),
                    3600,
                    RData::DNSSEC(DNSSECRData::DNSKEY(z.signer.dnskey.clone())),
                );
                format!("{r}\n")
            })
            .collect()
    }

    /// Writes [`SignedDns::trust_anchor`] to `dir/trust-anchor.keys`.
    pub fn write_trust_anchor(&self, dir: &Path) -> PathBuf {
        let path = dir.join("trust-anchor.keys");
        std::fs::write(&path, self.trust_anchor()).expect("write trust anchor");
        path
    }

    /// All queries received so far: (lowercase name with trailing dot, type).
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.state().log.clone()
    }

    pub fn clear_queries(&self) {
        self.state().log.clear();
    }
}

/// The deepest zone containing `name`.
fn zone_of<'a>(st: &'a State, name: &Name) -> Option<&'a Zone> {
    st.zones
        .iter()
        .filter(|z| z.apex.zone_of(name))
        .max_by_key(|z| z.apex.num_labels())
}

/// The zone `z` is delegated from, if it is not a top zone.
fn parent_zone<'a>(st: &'a State, z: &Zone) -> Option<&'a Zone> {
    if z.apex.is_root() {
        return None;
    }
    zone_of(st, &z.apex.base_name())
}

/// The zone that answers `qtype` at `name`: DS at a delegation comes from the parent,
/// so a DS query for a top zone is refused, as for any name outside the zones. (Knot
/// answers it from the zone itself. With our TTL of 0 nothing is cached, and under a
/// trust anchor that does not match, that answer makes hickory chase the zone's DS and
/// DNSKEY thousands of times.)
fn answering_zone<'a>(st: &'a State, name: &Name, qtype: RecordType) -> Option<&'a Zone> {
    let z = zone_of(st, name)?;
    if qtype == RecordType::DS && z.apex == *name {
        return parent_zone(st, z);
    }
    Some(z)
}

/// Everything in zone `z`: the test's records below it (not below a child zone), the
/// apex SOA/NS/DNSKEY, and the delegations (NS, DS) to its child zones.
fn zone_data(st: &State, z: &Zone) -> ZoneData {
    let mut data = ZoneData::new();
    let mut put = |name: &Name, rdata: RData| {
        data.entry(name.clone())
            .or_default()
            .entry(rdata.record_type())
            .or_default()
            .push(rdata);
    };
    for (name, rdatas) in &st.records {
        if zone_of(st, name).is_some_and(|owner| owner.apex == z.apex) {
            for r in rdatas {
                put(name, r.clone());
            }
        }
    }
    let ns = |apex: &Name| apex.prepend_label("ns").expect("ns name");
    let soa = SOA::new(
        ns(&z.apex),
        z.apex.prepend_label("hostmaster").expect("rname"),
        1,
        3600,
        600,
        86400,
        st.ttl,
    );
    put(&z.apex, RData::SOA(soa));
    put(&z.apex, RData::NS(NS(ns(&z.apex))));
    if z.signed() {
        put(
            &z.apex,
            RData::DNSSEC(DNSSECRData::DNSKEY(z.signer.dnskey.clone())),
        );
    }
    for child in st
        .zones
        .iter()
        .filter(|c| parent_zone(st, c).is_some_and(|p| p.apex == z.apex))
    {
        put(&child.apex, RData::NS(NS(ns(&child.apex))));
        if child.signed() {
            let digest = child
                .key
                .dnskey
                .to_digest(&child.apex, DigestType::SHA256)
                .expect("DS digest");
            let ds = DS::new(
                child.key.tag,
                Algorithm::ECDSAP256SHA256,
                DigestType::SHA256,
                digest.as_ref().to_vec(),
            );
            put(&child.apex, RData::DNSSEC(DNSSECRData::DS(ds)));
        }
    }
    data
}

/// The records of one RRset, owned by `name`.
fn rrset(name: &Name, ttl: u32, rdatas: &[RData]) -> Vec<Record> {
    rdatas
        .iter()
        .map(|r| Record::from_rdata(name.clone(), ttl, r.clone()))
        .collect()
}

/// The RRSIG over `records` (one RRset) by zone `z`'s signing key.
fn rrsig(z: &Zone, records: &[Record], ttl: u32) -> Record {
    let first = &records[0];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as u32;
    let (inception, expiration) = match z.signing {
        Signing::Expired => (now - 2 * 86_400, now - 86_400),
        _ => (now - 3600, now + 86_400),
    };
    let input = SigInput {
        type_covered: first.record_type(),
        algorithm: Algorithm::ECDSAP256SHA256,
        num_labels: first.name.num_labels(),
        original_ttl: ttl,
        sig_expiration: SerialNumber::new(expiration),
        sig_inception: SerialNumber::new(inception),
        key_tag: z.signer.tag,
        signer_name: z.apex.clone(),
    };
    let tbs = TBS::from_input(&first.name, DNSClass::IN, &input, records.iter()).expect("TBS");
    let mut sig = z.signer.signing.sign(&tbs).expect("sign");
    if z.signing == Signing::Corrupted && first.record_type() != RecordType::DNSKEY {
        sig[0] ^= 0xff;
    }
    Record::from_rdata(
        first.name.clone(),
        ttl,
        RData::DNSSEC(DNSSECRData::RRSIG(RRSIG::from_sig(input, sig))),
    )
}

/// Pushes one RRset (and, signed with DO, its RRSIG) into a section.
fn push_rrset(
    out: &mut Vec<Record>,
    z: &Zone,
    dnssec_ok: bool,
    name: &Name,
    ttl: u32,
    rdatas: &[RData],
) {
    let records = rrset(name, ttl, rdatas);
    if records.is_empty() {
        return;
    }
    let sig = (dnssec_ok && z.signed()).then(|| rrsig(z, &records, ttl));
    out.extend(records);
    out.extend(sig);
}

/// The NSEC RRset owned by `owner` (which must be in `data`).
fn nsec_at(z: &Zone, data: &ZoneData, owner: &Name) -> RData {
    let next = data
        .range((Bound::Excluded(owner), Bound::Unbounded))
        .next()
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| z.apex.clone());
    let types: Vec<RecordType> = data[owner].keys().copied().collect();
    RData::DNSSEC(DNSSECRData::NSEC(NSEC::new_cover_self(next, types)))
}

/// The owner of the NSEC covering `name` (the last owner before it).
fn covering_owner(data: &ZoneData, name: &Name) -> Name {
    data.range(..name.clone())
        .next_back()
        .map(|(n, _)| n.clone())
        .expect("the apex sorts before every name in the zone")
}

/// Does `name` exist in `data`, with records or as an empty non-terminal?
fn exists(data: &ZoneData, name: &Name) -> bool {
    data.contains_key(name)
        || data
            .range((Bound::Excluded(name), Bound::Unbounded))
            .next()
            .is_some_and(|(n, _)| name.zone_of(n))
}

/// Adds the SOA and the NSECs proving a denial to the authority section.
fn deny(
    z: &Zone,
    data: &ZoneData,
    name: &Name,
    ttl: u32,
    dnssec_ok: bool,
    auth: &mut Vec<Record>,
) -> ResponseCode {
    let soa = &data[&z.apex][&RecordType::SOA];
    push_rrset(auth, z, dnssec_ok, &z.apex, ttl, soa);
    let mut owners = Vec::new();
    let rcode = if data.contains_key(name) {
        owners.push(name.clone()); // NODATA: the NSEC at the name
        ResponseCode::NoError
    } else if exists(data, name) {
        owners.push(covering_owner(data, name)); // empty non-terminal
        ResponseCode::NoError
    } else {
        owners.push(covering_owner(data, name));
        let mut encloser = name.base_name();
        while !exists(data, &encloser) && encloser != z.apex {
            encloser = encloser.base_name();
        }
        let wildcard = encloser.prepend_label("*").expect("wildcard name");
        let w = covering_owner(data, &wildcard);
        if !owners.contains(&w) {
            owners.push(w);
        }
        ResponseCode::NXDomain
    };
    if dnssec_ok && z.signed() {
        for owner in owners {
            push_rrset(auth, z, true, &owner, ttl, &[nsec_at(z, data, &owner)]);
        }
    }
    rcode
}

/// Fills `resp` for `q`.
fn answer(st: &State, q: &Query, dnssec_ok: bool, resp: &mut Message) {
    let qtype = q.query_type;
    let ttl = st.ttl;
    let mut name = q.name.to_lowercase();
    let mut answers = Vec::new();
    let mut authority = Vec::new();
    let mut rcode = ResponseCode::NoError;
    let mut hops = 0;
    loop {
        let Some(z) = answering_zone(st, &name, qtype) else {
            if answers.is_empty() {
                rcode = ResponseCode::Refused;
            }
            break;
        };
        let data = zone_data(st, z);
        let at = data.get(&name);
        let cname = at.and_then(|types| types.get(&RecordType::CNAME));
        if let Some(cname) = cname
            && qtype != RecordType::CNAME
        {
            push_rrset(&mut answers, z, dnssec_ok, &name, ttl, cname);
            let RData::CNAME(CNAME(target)) = &cname[0] else {
                unreachable!("CNAME RRset")
            };
            name = target.to_lowercase();
            hops += 1;
            if hops > MAX_CNAME_HOPS {
                rcode = ResponseCode::ServFail;
                break;
            }
            continue;
        }
        match at.and_then(|types| types.get(&qtype)) {
            Some(rdatas) => push_rrset(&mut answers, z, dnssec_ok, &name, ttl, rdatas),
            None => rcode = deny(z, &data, &name, ttl, dnssec_ok, &mut authority),
        }
        break;
    }
    resp.metadata.response_code = rcode;
    for r in answers {
        resp.add_answer(r);
    }
    for r in authority {
        resp.add_authority(r);
    }
}
