//! Self-tests of the in-process protocol peers in `tests/common/`, each driven
//! by a minimal real client over loopback.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::dns::TestDns;
use common::https::{Behaviour, PolicyHost};
use common::pki::{self, TestCa};
use common::smtp::{SinkOptions, SmtpSink, free_port_on};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;

const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- DNS

fn resolver(addr: SocketAddr) -> TokioResolver {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
    let cfg = ResolverConfig::from_parts(None, vec![], vec![ns]);
    let mut b = TokioResolver::builder_with_config(cfg, TokioRuntimeProvider::default());
    b.options_mut().timeout = Duration::from_secs(2);
    b.options_mut().attempts = 1;
    b.build().expect("build resolver")
}

fn txt_strings(l: &hickory_resolver::lookup::Lookup) -> Vec<Vec<String>> {
    l.answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

async fn raw_udp(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    sock.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
        .await
        .expect("udp answer timeout")
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

async fn raw_tcp(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let b = q.to_vec().unwrap();
    s.write_all(&(b.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(&b).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(T, s.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

#[tokio::test]
async fn dns_answers_via_resolver() {
    let dns = TestDns::start().await;
    dns.set_txt(
        "_mta-sts.example.test",
        &[&["v=STSv1; ", "id=20240101;"], &["unrelated"]],
    );
    dns.add_mx("Example.Test", 10, "mx1.example.test");
    dns.add_mx("example.test", 20, "mx2.example.test");
    dns.add_a("mx1.example.test", Ipv4Addr::new(127, 0, 0, 5));
    dns.add_aaaa("mx1.example.test", "::1".parse().unwrap());
    dns.set_cname("alias.example.test", "alias2.example.test");
    dns.set_cname("alias2.example.test", "mx1.example.test");
    dns.set_servfail("broken.example.test", true);

    let r = resolver(dns.addr());

    let txt = r.txt_lookup("_mta-sts.example.test.").await.unwrap();
    let mut got = txt_strings(&txt);
    got.sort();
    assert_eq!(
        got,
        vec![
            vec!["unrelated".to_string()],
            vec!["v=STSv1; ".to_string(), "id=20240101;".to_string()],
        ]
    );

    let mx = r.mx_lookup("example.test.").await.unwrap();
    let mut mxs: Vec<(u16, String)> = mx
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    mxs.sort();
    assert_eq!(
        mxs,
        vec![
            (10, "mx1.example.test.".to_string()),
            (20, "mx2.example.test.".to_string())
        ]
    );

    let a = r.ipv4_lookup("MX1.example.test.").await.unwrap();
    assert!(
        a.answers()
            .iter()
            .any(|r| matches!(&r.data, RData::A(a) if a.0 == Ipv4Addr::new(127, 0, 0, 5)))
    );

    // CNAME chain: alias -> alias2 -> mx1 (A)
    let c = r.ipv4_lookup("alias.example.test.").await.unwrap();
    let types: Vec<RecordType> = c.answers().iter().map(|r| r.record_type()).collect();
    assert_eq!(
        types,
        vec![RecordType::CNAME, RecordType::CNAME, RecordType::A],
        "{:?}",
        c.answers()
    );

    // NXDOMAIN
    let e = r.txt_lookup("nothing.example.test.").await.unwrap_err();
    assert!(e.is_nx_domain(), "{e:?}");

    // NODATA: known name, no TXT
    let e = r.txt_lookup("mx1.example.test.").await.unwrap_err();
    assert!(e.is_no_records_found() && !e.is_nx_domain(), "{e:?}");

    // SERVFAIL
    let e = r.txt_lookup("broken.example.test.").await.unwrap_err();
    assert!(!e.is_nx_domain(), "{e:?}");

    // Changes are visible immediately (TTL 0).
    dns.set_txt("_mta-sts.example.test", &[&["v=STSv1; id=2;"]]);
    let txt = r.txt_lookup("_mta-sts.example.test.").await.unwrap();
    assert_eq!(txt_strings(&txt), vec![vec!["v=STSv1; id=2;".to_string()]]);
    dns.remove("_mta-sts.example.test");
    let e = r.txt_lookup("_mta-sts.example.test.").await.unwrap_err();
    assert!(e.is_nx_domain(), "{e:?}");

    assert!(dns.count_queries("_mta-sts.example.test", RecordType::TXT) >= 3);
    assert!(
        dns.queries()
            .contains(&("mx1.example.test".to_string(), RecordType::A))
    );
}

#[tokio::test]
async fn dns_raw_udp_and_tcp() {
    let dns = TestDns::start().await;
    dns.set_ttl(300);
    dns.set_txt("t.example.test", &[&["a", "b"]]);
    dns.add_a("h.example.test", Ipv4Addr::LOCALHOST);
    dns.set_servfail("sf.example.test", true);

    let m = raw_udp(dns.addr(), "T.Example.Test.", RecordType::TXT).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative && m.metadata.recursion_available);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].ttl, 300);
    // the owner name keeps the case of the question (0x20 case randomisation)
    assert_eq!(m.answers[0].name.to_ascii(), "T.Example.Test.");

    let m = raw_tcp(dns.addr(), "h.example.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(&m.answers[0].data, RData::A(a) if a.0 == Ipv4Addr::LOCALHOST));

    let m = raw_udp(dns.addr(), "sf.example.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    dns.set_servfail("sf.example.test", false);
    let m = raw_udp(dns.addr(), "sf.example.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities.len(), 1);

    // Large answer over UDP without EDNS is truncated; TCP gets it all.
    let big: Vec<String> = (0..20)
        .map(|i| format!("{i:02}{}", "x".repeat(200)))
        .collect();
    let refs: Vec<&str> = big.iter().map(|s| s.as_str()).collect();
    dns.set_txt("big.example.test", &[&refs]);
    let m = raw_udp(dns.addr(), "big.example.test.", RecordType::TXT).await;
    assert!(m.metadata.truncation);
    let m = raw_tcp(dns.addr(), "big.example.test.", RecordType::TXT).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 1);

    // remove_type keeps the name (NODATA, not NXDOMAIN)
    dns.remove_type("h.example.test", RecordType::A);
    let m = raw_udp(dns.addr(), "h.example.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
}

// ---------------------------------------------------------------- HTTPS

async fn https_get(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(host.to_string()).unwrap();
    let mut tls = TlsConnector::from(cfg).connect(name, tcp).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: selftest\r\n\r\n");
    tls.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

const POLICY: &str =
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmax_age: 86400\r\n";

#[tokio::test]
async fn https_policy_host() {
    let ca = TestCa::new("selftest https CA");
    let host = "mta-sts.example.test";
    let ph = PolicyHost::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))).await;
    ph.set_cert(host, &ca.leaf(&[host]));
    ph.serve(host, Behaviour::policy(POLICY));

    let (status, body) = tokio::time::timeout(
        T,
        https_get(
            ph.addr(),
            ca.client_config(),
            host,
            "/.well-known/mta-sts.txt",
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, POLICY);
    let reqs = ph.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].sni.as_deref(), Some(host));
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].path, "/.well-known/mta-sts.txt");
    assert_eq!(reqs[0].host.as_deref(), Some(host));
    assert_eq!(reqs[0].tls_version.as_deref(), Some("TLSv1.3"));
    assert_eq!(ph.count(host), 1);

    // Unknown host (served by the default cert) -> 404.
    ph.set_default_cert(&ca.leaf(&["other.example.test"]));
    let (status, _) = https_get(ph.addr(), ca.client_config(), "other.example.test", "/")
        .await
        .unwrap();
    assert_eq!(status, 404);

    // An expired / self-signed / CN-only certificate is rejected by the client.
    let bad = "bad.example.test";
    ph.serve(bad, Behaviour::policy(POLICY));
    for leaf in [
        ca.leaf_expired(&[bad]),
        pki::self_signed(&[bad]),
        ca.leaf_cn_only(bad),
    ] {
        ph.set_cert(bad, &leaf);
        let r = https_get(ph.addr(), ca.client_config(), bad, "/").await;
        assert!(r.is_err(), "{r:?}");
    }
    // No cert for the SNI and no default: handshake fails.
    let ph2 = PolicyHost::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    assert!(
        https_get(ph2.addr(), ca.client_config(), host, "/")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn https_tls13_only_hang_and_trickle() {
    let ca = TestCa::new("selftest https CA 2");
    let host = "mta-sts.t13.test";
    let ph = PolicyHost::start_with_versions(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        &[&rustls::version::TLS13],
    )
    .await;
    assert_eq!(ph.addr().ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    ph.set_cert(host, &ca.leaf(&[host]));
    ph.serve(host, Behaviour::policy(POLICY));

    let tls12_only = Arc::new(
        rustls::ClientConfig::builder_with_provider(common::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(ca.root_store())
            .with_no_client_auth(),
    );
    assert!(https_get(ph.addr(), tls12_only, host, "/").await.is_err());
    let (status, _) = https_get(ph.addr(), ca.client_config(), host, "/")
        .await
        .unwrap();
    assert_eq!(status, 200);

    ph.serve(host, Behaviour::Hang);
    let r = tokio::time::timeout(
        Duration::from_millis(500),
        https_get(ph.addr(), ca.client_config(), host, "/"),
    )
    .await;
    assert!(r.is_err(), "hang must not answer");

    ph.serve(
        host,
        Behaviour::Trickle {
            chunk: b"abc".to_vec(),
            interval: Duration::from_millis(20),
            chunks: 5,
        },
    );
    let (status, body) = https_get(ph.addr(), ca.client_config(), host, "/")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "abc".repeat(5));
    // 200 + hang + trickle; the failed TLS 1.2 handshake sent no request
    assert_eq!(ph.count(host), 3);
    assert_eq!(ph.failed_handshakes(), 1);
}

// ---------------------------------------------------------------- SMTP

struct SmtpClient<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpClient<S> {
    fn new(s: S) -> Self {
        SmtpClient {
            io: BufReader::new(s),
        }
    }

    async fn reply(&mut self) -> (u16, Vec<String>) {
        let mut lines = Vec::new();
        for _ in 0..100 {
            let mut l = String::new();
            let n = tokio::time::timeout(T, self.io.read_line(&mut l))
                .await
                .expect("reply timeout")
                .unwrap();
            assert!(n > 0, "EOF while reading reply");
            assert!(l.ends_with("\r\n"), "reply line without CRLF: {l:?}");
            let l = l.trim_end().to_string();
            let more = l.as_bytes().get(3) == Some(&b'-');
            lines.push(l);
            if !more {
                break;
            }
        }
        let code = lines[0][..3].parse().unwrap();
        (code, lines)
    }

    async fn cmd(&mut self, c: &str) -> (u16, Vec<String>) {
        self.io
            .write_all(format!("{c}\r\n").as_bytes())
            .await
            .unwrap();
        self.reply().await
    }

    async fn send_message(&mut self, from: &str, to: &str, body: &str) {
        assert_eq!(self.cmd(&format!("MAIL FROM:<{from}>")).await.0, 250);
        assert_eq!(self.cmd(&format!("RCPT TO:<{to}>")).await.0, 250);
        assert_eq!(self.cmd("DATA").await.0, 354);
        // dot-stuff
        let mut data = String::new();
        for line in body.split_inclusive("\r\n") {
            if line.starts_with('.') {
                data.push('.');
            }
            data.push_str(line);
        }
        data.push_str(".\r\n");
        self.io.write_all(data.as_bytes()).await.unwrap();
        assert_eq!(self.reply().await.0, 250);
    }
}

const BODY: &str = "Subject: hi\r\n\r\n.leading dot\r\nline\r\n";

#[tokio::test]
async fn smtp_sink_plain() {
    let ip = Ipv4Addr::new(127, 0, 0, 5);
    let port = free_port_on(&[ip, Ipv4Addr::new(127, 0, 0, 6)]);
    let sink = SmtpSink::start(
        SocketAddr::new(ip.into(), port),
        SinkOptions::plain("mx.plain.test"),
    )
    .await
    .unwrap();
    assert_eq!(sink.addr(), SocketAddr::new(ip.into(), port));

    let mut c = SmtpClient::new(TcpStream::connect(sink.addr()).await.unwrap());
    let (code, lines) = c.reply().await;
    assert_eq!(
        (code, lines[0].as_str()),
        (220, "220 mx.plain.test ESMTP sink")
    );
    let (code, lines) = c.cmd("EHLO client.test").await;
    assert_eq!(code, 250);
    assert!(lines.iter().any(|l| l.ends_with("PIPELINING")));
    assert!(lines.iter().any(|l| l.contains("SIZE")));
    assert!(!lines.iter().any(|l| l.ends_with("STARTTLS")));
    assert_eq!(c.cmd("STARTTLS").await.0, 454);
    assert_eq!(c.cmd("NOOP").await.0, 250);
    assert_eq!(c.cmd("BOGUS").await.0, 500);
    assert_eq!(c.cmd("RCPT TO:<x@y>").await.0, 503);
    c.send_message("a@client.test", "b@plain.test", BODY).await;
    assert_eq!(c.cmd("RSET").await.0, 250);
    assert_eq!(c.cmd("QUIT").await.0, 221);

    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].mail_from, "a@client.test");
    assert_eq!(msgs[0].rcpt_to, vec!["b@plain.test".to_string()]);
    assert_eq!(msgs[0].data, BODY.as_bytes());
    assert!(!msgs[0].tls);
    assert_eq!(msgs[0].helo, "client.test");
    assert_eq!(sink.connections(), 1);
    assert!(sink.handshakes().is_empty());
}

#[tokio::test]
async fn smtp_sink_starttls() {
    let ca = TestCa::new("selftest smtp CA");
    let mx = "mx.tls.test";
    let leaf = ca.leaf(&[mx]);
    let ip = Ipv4Addr::new(127, 0, 0, 7);
    let port = free_port_on(&[ip]);
    let sink = SmtpSink::start(
        SocketAddr::new(ip.into(), port),
        SinkOptions::tls(mx, leaf.server_config()),
    )
    .await
    .unwrap();

    let mut c = SmtpClient::new(TcpStream::connect(sink.addr()).await.unwrap());
    assert_eq!(c.reply().await.0, 220);
    let (_, lines) = c.cmd("EHLO client.test").await;
    assert!(lines.iter().any(|l| l.ends_with("STARTTLS")), "{lines:?}");
    assert_eq!(c.cmd("STARTTLS").await.0, 220);
    let tcp = c.io.into_inner();
    let tls = TlsConnector::from(ca.client_config())
        .connect(ServerName::try_from(mx).unwrap(), tcp)
        .await
        .unwrap();
    let mut c = SmtpClient::new(tls);
    // session reset after STARTTLS: MAIL before EHLO is refused
    assert_eq!(c.cmd("MAIL FROM:<a@client.test>").await.0, 503);
    let (_, lines) = c.cmd("EHLO client.test").await;
    assert!(!lines.iter().any(|l| l.ends_with("STARTTLS")), "{lines:?}");
    c.send_message("", "b@tls.test", "x\r\n").await;
    assert_eq!(c.cmd("QUIT").await.0, 221);

    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].tls);
    assert_eq!(msgs[0].mail_from, "");
    assert_eq!(msgs[0].sni.as_deref(), Some(mx));
    assert_eq!(msgs[0].tls_version.as_deref(), Some("TLSv1.3"));
    assert_eq!(sink.handshakes(), vec![Some(mx.to_string())]);
    assert_eq!(sink.completed_handshakes(), 1);
}

#[tokio::test]
async fn smtp_sink_failure_modes() {
    let ca = TestCa::new("selftest smtp CA 2");
    let ip = Ipv4Addr::new(127, 0, 0, 8);

    // reject_rcpt
    let mut opts = SinkOptions::plain("mx.reject.test");
    opts.reject_rcpt = Some("550 5.1.1 no such user".into());
    let sink = SmtpSink::start(SocketAddr::new(ip.into(), free_port_on(&[ip])), opts)
        .await
        .unwrap();
    let mut c = SmtpClient::new(TcpStream::connect(sink.addr()).await.unwrap());
    c.reply().await;
    c.cmd("HELO c.test").await;
    assert_eq!(c.cmd("MAIL FROM:<a@c.test>").await.0, 250);
    let (code, lines) = c.cmd("RCPT TO:<b@reject.test>").await;
    assert_eq!((code, lines[0].as_str()), (550, "550 5.1.1 no such user"));
    assert_eq!(c.cmd("DATA").await.0, 554);

    // close_after_starttls: the client handshake fails, the SNI is recorded
    let mx = "mx.close.test";
    let mut opts = SinkOptions::tls(mx, ca.leaf(&[mx]).server_config());
    opts.close_after_starttls = true;
    let sink = SmtpSink::start(SocketAddr::new(ip.into(), free_port_on(&[ip])), opts)
        .await
        .unwrap();
    let mut c = SmtpClient::new(TcpStream::connect(sink.addr()).await.unwrap());
    c.reply().await;
    c.cmd("EHLO c.test").await;
    assert_eq!(c.cmd("STARTTLS").await.0, 220);
    let r = TlsConnector::from(ca.client_config())
        .connect(ServerName::try_from(mx).unwrap(), c.io.into_inner())
        .await;
    assert!(r.is_err());
    assert_eq!(sink.handshakes(), vec![Some(mx.to_string())]);
    assert_eq!(sink.completed_handshakes(), 0);

    // stall_after_greeting
    let mut opts = SinkOptions::plain("mx.stall.test");
    opts.stall_after_greeting = true;
    let sink = SmtpSink::start(SocketAddr::new(ip.into(), free_port_on(&[ip])), opts)
        .await
        .unwrap();
    let mut c = SmtpClient::new(TcpStream::connect(sink.addr()).await.unwrap());
    assert_eq!(c.reply().await.0, 220);
    c.io.write_all(b"EHLO c.test\r\n").await.unwrap();
    let mut l = String::new();
    let r = tokio::time::timeout(Duration::from_millis(300), c.io.read_line(&mut l)).await;
    assert!(r.is_err(), "stalled sink answered: {l:?}");
}
