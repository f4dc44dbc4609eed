//! A small DNS server over UDP and TCP (same port on 127.0.0.1) answering
//! from a mutable in-memory zone, built on hickory-proto 0.26 `Message`.
//!
//! Behaves like a recursive resolver that is authoritative for everything:
//! answers have AA and RA set, CNAME chains are followed (≤ 8 hops), unknown
//! names get NXDOMAIN (with a synthetic SOA in the authority section), known
//! names without the queried type get NOERROR/NODATA (also with the SOA).
//! The answer TTL (and the SOA negative TTL) defaults to 0 so that a
//! client-side cache never hides a change made by a test.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::TaskGuard;

/// Longest CNAME chain that is followed.
const MAX_CNAME_HOPS: usize = 8;
/// Idle timeout of a TCP connection.
const TCP_IDLE: Duration = Duration::from_secs(30);
/// Maximum number of messages served on one TCP connection.
const TCP_MAX_MESSAGES: usize = 1000;
/// Maximum number of datagrams served by the UDP task.
const UDP_MAX_DATAGRAMS: usize = 1_000_000;
/// Maximum number of TCP connections accepted.
const TCP_MAX_CONNECTIONS: usize = 100_000;

#[derive(Debug, Default)]
struct Zone {
    ttl: u32,
    /// lowercase name without trailing dot -> records (RData only; owner is the key)
    records: HashMap<String, Vec<RData>>,
    servfail: HashSet<String>,
    log: Vec<(String, RecordType)>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    _tasks: TaskGuard,
}

/// Handle to a running test DNS server. Cloning is cheap; the server tasks are
/// aborted when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct TestDns {
    inner: Arc<Inner>,
}

/// Normalises a name given by a test (or from the wire) to the zone key.
pub fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    let mut n = Name::from_ascii(name).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    n.set_fqdn(true);
    n
}

fn name_key(name: &Name) -> String {
    key(&name.to_ascii())
}

impl TestDns {
    /// Starts the server on 127.0.0.1 (random port, same for UDP and TCP).
    pub async fn start() -> TestDns {
        let zone = Arc::new(Mutex::new(Zone::default()));
        let z = zone.clone();
        let (addr, tasks) = serve(Arc::new(
            move |q: &Query, _dnssec_ok, resp: &mut Message| {
                let mut z = z.lock().unwrap();
                z.log.push((name_key(&q.name), q.query_type));
                answer(&z, q, resp);
            },
        ))
        .await;
        TestDns {
            inner: Arc::new(Inner {
                addr,
                zone,
                _tasks: tasks,
            }),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    fn zone(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.inner.zone.lock().unwrap()
    }

    /// TTL of all answer records (and of the SOA / negative TTL).
    pub fn set_ttl(&self, ttl: u32) {
        self.zone().ttl = ttl;
    }

    fn replace(&self, name: &str, rtype: RecordType, new: Vec<RData>) {
        let mut z = self.zone();
        let list = z.records.entry(key(name)).or_default();
        list.retain(|r| r.record_type() != rtype);
        list.extend(new);
    }

    fn add(&self, name: &str, rdata: RData) {
        let mut z = self.zone();
        let list = z.records.entry(key(name)).or_default();
        if !list.contains(&rdata) {
            list.push(rdata);
        }
    }

    /// Replaces all TXT RRs at `name`. Each inner slice is one TXT RR made of
    /// several character-strings (each at most 255 bytes).
    pub fn set_txt(&self, name: &str, records: &[&[&str]]) {
        let rdatas = records
            .iter()
            .map(|strings| {
                for s in strings.iter() {
                    assert!(
                        s.len() <= 255,
                        "TXT character-string longer than 255 bytes: split it"
                    );
                }
                RData::TXT(TXT::new(strings.iter().map(|s| s.to_string()).collect()))
            })
            .collect();
        self.replace(name, RecordType::TXT, rdatas);
    }

    /// Replaces all TXT RRs at `name` with raw byte character-strings.
    pub fn set_txt_bytes(&self, name: &str, records: &[&[&[u8]]]) {
        let rdatas = records
            .iter()
            .map(|strings| RData::TXT(TXT::from_bytes(strings.to_vec())))
            .collect();
        self.replace(name, RecordType::TXT, rdatas);
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

    /// Makes `name` an alias of `target` (replaces any previous CNAME).
    pub fn set_cname(&self, name: &str, target: &str) {
        self.replace(
            name,
            RecordType::CNAME,
            vec![RData::CNAME(CNAME(fqdn(target)))],
        );
    }

    /// Makes `name` exist without any records (NOERROR/NODATA for every type).
    pub fn add_empty(&self, name: &str) {
        self.zone().records.entry(key(name)).or_default();
    }

    /// Removes all records at `name` (it becomes NXDOMAIN).
    pub fn remove(&self, name: &str) {
        self.zone().records.remove(&key(name));
    }

    /// Removes the records of one type at `name` (the name stays known).
    pub fn remove_type(&self, name: &str, rtype: RecordType) {
        if let Some(list) = self.zone().records.get_mut(&key(name)) {
            list.retain(|r| r.record_type() != rtype);
        }
    }

    /// While `on`, every query for `name` (whatever the type) gets SERVFAIL.
    pub fn set_servfail(&self, name: &str, on: bool) {
        let mut z = self.zone();
        if on {
            z.servfail.insert(key(name));
        } else {
            z.servfail.remove(&key(name));
        }
    }

    /// All queries received so far: (lowercase name without dot, type).
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.zone().log.clone()
    }

    pub fn count_queries(&self, name: &str, rtype: RecordType) -> usize {
        let k = key(name);
        self.zone()
            .log
            .iter()
            .filter(|(n, t)| *n == k && *t == rtype)
            .count()
    }

    pub fn clear_queries(&self) {
        self.zone().log.clear();
    }
}

/// Fills the answer, authority and additional sections and the response code of
/// `resp` for the query `q`; `dnssec_ok` is the request's EDNS DO bit.
pub type Answerer = Arc<dyn Fn(&Query, bool, &mut Message) + Send + Sync>;

/// Serves `answerer` over UDP and TCP on one random port of 127.0.0.1; the tasks
/// stop when the returned guard is dropped.
pub(crate) async fn serve(answerer: Answerer) -> (SocketAddr, TaskGuard) {
    // Find a port free for both UDP and TCP (bounded attempts).
    let mut bound = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = udp.local_addr().expect("udp local addr");
        if let Ok(tcp) = TcpListener::bind(addr).await {
            bound = Some((udp, tcp, addr));
            break;
        }
    }
    let (udp, tcp, addr) = bound.expect("no port free for both UDP and TCP");
    let tasks = TaskGuard::default();
    tasks.push(tokio::spawn(udp_loop(udp, answerer.clone())).abort_handle());
    tasks.push(tokio::spawn(tcp_loop(tcp, answerer)).abort_handle());
    (addr, tasks)
}

/// Builds the wire answer for one request, or `None` when it should be ignored.
fn respond(answerer: &Answerer, req_bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
    let req = match Message::from_vec(req_bytes) {
        Ok(m) => m,
        Err(_) => {
            if req_bytes.len() < 12 {
                return None;
            }
            let id = u16::from_be_bytes([req_bytes[0], req_bytes[1]]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok();
        }
    };
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.checking_disabled = req.metadata.checking_disabled;
    resp.metadata.recursion_available = true;
    let dnssec_ok = req.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.set_dnssec_ok(dnssec_ok);
        resp.set_edns(e);
    }
    if req.metadata.op_code != OpCode::Query {
        resp.metadata.response_code = ResponseCode::NotImp;
        return resp.to_vec().ok();
    }
    if req.queries.len() != 1 {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp.to_vec().ok();
    }
    let q: Query = req.queries[0].clone();
    resp.add_query(q.clone());
    resp.metadata.authoritative = true;

    answerer(&q, dnssec_ok, &mut resp);

    let bytes = match resp.to_vec() {
        Ok(b) => b,
        Err(_) => {
            let mut fail = Message::response(req.metadata.id, req.metadata.op_code);
            fail.metadata.response_code = ResponseCode::ServFail;
            fail.add_query(q);
            return fail.to_vec().ok();
        }
    };
    if udp {
        let limit = req
            .edns
            .as_ref()
            .map(|e| e.max_payload())
            .unwrap_or(512)
            .max(512) as usize;
        if bytes.len() > limit {
            return resp.truncate().to_vec().ok();
        }
    }
    Some(bytes)
}

/// Fills answers / authority / rcode of `resp` for query `q`.
fn answer(z: &Zone, q: &Query, resp: &mut Message) {
    let qtype = q.query_type;
    let ttl = z.ttl;
    let mut owner = q.name.clone();
    let mut cur = name_key(&q.name);
    let mut seen = HashSet::new();
    for _hop in 0..=MAX_CNAME_HOPS {
        if z.servfail.contains(&cur) {
            resp.answers.clear();
            resp.metadata.response_code = ResponseCode::ServFail;
            resp.metadata.authoritative = false;
            return;
        }
        if !seen.insert(cur.clone()) {
            // CNAME loop
            resp.metadata.response_code = ResponseCode::ServFail;
            return;
        }
        let Some(list) = z.records.get(&cur) else {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.add_authority(soa_for(&cur, ttl));
            return;
        };
        let cname = list.iter().find_map(|r| match r {
            RData::CNAME(c) => Some(c.0.clone()),
            _ => None,
        });
        if let Some(target) = cname
            && qtype != RecordType::CNAME
            && qtype != RecordType::ANY
        {
            resp.add_answer(Record::from_rdata(
                owner.clone(),
                ttl,
                RData::CNAME(CNAME(target.clone())),
            ));
            cur = name_key(&target);
            owner = target;
            continue;
        }
        let mut any = false;
        for r in list {
            if qtype == RecordType::ANY || r.record_type() == qtype {
                resp.add_answer(Record::from_rdata(owner.clone(), ttl, r.clone()));
                any = true;
            }
        }
        if !any {
            resp.add_authority(soa_for(&cur, ttl));
        }
        return;
    }
    // Chain too long.
    resp.metadata.response_code = ResponseCode::ServFail;
}

/// A synthetic SOA for negative answers, owned by the last two labels of the
/// name (a guess at the zone apex); SOA TTL and MINIMUM are `ttl`.
fn soa_for(name: &str, ttl: u32) -> Record {
    let labels: Vec<&str> = name.split('.').filter(|l| !l.is_empty()).collect();
    let apex = if labels.len() <= 2 {
        labels.join(".")
    } else {
        labels[labels.len() - 2..].join(".")
    };
    let apex_name = if apex.is_empty() {
        Name::root()
    } else {
        fqdn(&apex)
    };
    let mname = fqdn(&format!(
        "ns.{}",
        if apex.is_empty() { "test" } else { &apex }
    ));
    let rname = fqdn(&format!(
        "hostmaster.{}",
        if apex.is_empty() { "test" } else { &apex }
    ));
    Record::from_rdata(
        apex_name,
        ttl,
        RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, ttl)),
    )
}

async fn udp_loop(sock: UdpSocket, answerer: Answerer) {
    let mut buf = vec![0u8; 65535];
    for _ in 0..UDP_MAX_DATAGRAMS {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(out) = respond(&answerer, &buf[..n], true) {
            let _ = sock.send_to(&out, peer).await;
        }
    }
}

async fn tcp_loop(listener: TcpListener, answerer: Answerer) {
    for _ in 0..TCP_MAX_CONNECTIONS {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(tcp_conn(stream, answerer.clone()));
    }
}

async fn tcp_conn(mut stream: TcpStream, answerer: Answerer) {
    for _ in 0..TCP_MAX_MESSAGES {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let n = u16::from_be_bytes(len) as usize;
        let mut msg = vec![0u8; n];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(out) = respond(&answerer, &msg, false) else {
            continue;
        };
        let Ok(olen) = u16::try_from(out.len()) else {
            return;
        };
        let mut frame = Vec::with_capacity(out.len() + 2);
        frame.extend_from_slice(&olen.to_be_bytes());
        frame.extend_from_slice(&out);
        match tokio::time::timeout(TCP_IDLE, stream.write_all(&frame)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}
