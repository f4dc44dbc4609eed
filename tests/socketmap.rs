//! The Postfix socketmap TLS-policy server through the real binary (`stsrelay
//! socketmap`, and `[socketmap]` inside `stsrelay run`) against the in-process DNS
//! server and HTTPS policy host, on loopback addresses.

mod common;

use common::https::Behaviour;
use common::relay::{Lab, eventually, ip, submit};
use common::smtp::SinkOptions;
use hickory_proto::rr::RecordType;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use stsrelay::socketmap::netstring;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const WILD: &str = "version: STSv1\nmode: enforce\nmx: *.wild.test\nmax_age: 86400\n";
const EXACT: &str = "version: STSv1\nmode: enforce\nmx: mail.exact.test\nmax_age: 86400\n";
const TESTING: &str = "version: STSv1\nmode: testing\nmx: mx.testing.test\nmax_age: 86400\n";
const NONE: &str = "version: STSv1\nmode: none\nmax_age: 86400\n";
const DEEP: &str = "version: STSv1\nmode: enforce\nmx: *.deep.test\nmax_age: 86400\n";

/// The scenario domains: policies, MX records, a broken policy host.
fn scenarios(lab: &Lab) {
    lab.policy("wild.test", "1", WILD);
    lab.dns.add_mx("wild.test", 10, "mx1.wild.test");
    lab.dns.add_mx("wild.test", 20, "mx2.wild.test");
    lab.dns.add_mx("wild.test", 30, "a.b.wild.test"); // two labels: not in the policy
    lab.dns.add_mx("wild.test", 40, "mx.elsewhere.test");
    lab.policy("exact.test", "1", EXACT);
    lab.dns.add_mx("exact.test", 10, "mail.exact.test");
    lab.policy("testing.test", "1", TESTING);
    lab.policy("none.test", "1", NONE);
    lab.policy("deep.test", "1", DEEP);
    lab.dns.add_mx("deep.test", 10, "a.b.deep.test");
    lab.policy("broken.test", "1", WILD);
    lab.host
        .serve("mta-sts.broken.test", Behaviour::status(404, "gone"));
    lab.dns.add_mx("nopolicy.test", 10, "mx.nopolicy.test");
    lab.policy("sfail.test", "1", WILD);
    lab.dns.set_servfail("sfail.test", true); // its MX lookup fails
}

/// (request, expected reply) in the order sent.
fn expectations() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "postfix wild.test",
            "OK secure match=mx1.wild.test:mx2.wild.test servername=hostname",
        ),
        (
            "postfix WILD.Test.",
            "OK secure match=mx1.wild.test:mx2.wild.test servername=hostname",
        ),
        (
            "postfix exact.test",
            "OK secure match=mail.exact.test servername=hostname",
        ),
        ("postfix testing.test", "NOTFOUND "),
        (
            "strict testing.test",
            "OK secure match=mx.testing.test servername=hostname",
        ),
        ("postfix none.test", "NOTFOUND "),
        ("strict none.test", "NOTFOUND "),
        ("postfix nopolicy.test", "NOTFOUND "),
        ("postfix broken.test", "NOTFOUND "),
        (
            "postfix deep.test",
            "TEMP no MX host of deep.test is permitted by its MTA-STS policy",
        ),
        ("postfix sfail.test", "TEMP MX lookup of sfail.test failed"),
        ("postfix .wild.test", "NOTFOUND "),
        ("postfix [127.0.0.1]", "NOTFOUND "),
        ("postfix 127.0.0.1", "NOTFOUND "),
        ("postfix [mx1.wild.test]:25", "NOTFOUND "), // policy domain mx1.wild.test: none
        ("postfix", "NOTFOUND "),
        (
            "tlsrpt exact.test",
            "OK secure match=mail.exact.test servername=hostname policy_type=sts \
             policy_domain=exact.test mx_host_pattern=mail.exact.test \
             { policy_string = version: STSv1 } { policy_string = mode: enforce } \
             { policy_string = mx: mail.exact.test } { policy_string = max_age: 86400 }",
        ),
        (
            "nosni wild.test",
            "OK secure match=mx1.wild.test:mx2.wild.test",
        ),
    ]
}

const ZONES: &str = "[socketmap.zones.strict]\nstrict_testing = true\n\
                     [socketmap.zones.tlsrpt]\ntlsrpt = true\n\
                     [socketmap.zones.nosni]\nrequire_sni = false\n";

/// `stsrelay socketmap` alone, configured like the relay of [`Lab`].
struct Standalone {
    _child: tokio::process::Child,
    addr: SocketAddr,
}

/// `stsrelay socketmap` on the lab's unsigned DNS, DNSSEC off (no root to validate
/// from: every answer would be bogus). The DANE tests use [`start_socketmap_dns`].
async fn start_socketmap(lab: &Lab, extra: &str) -> Standalone {
    let dns = format!(
        "[dns]\nnameservers = [\"{}\"]\ndnssec = false\n",
        lab.dns.addr()
    );
    start_socketmap_dns(lab, &dns, extra).await
}

/// `stsrelay socketmap` with the `[dns]` section given.
async fn start_socketmap_dns(lab: &Lab, dns: &str, extra: &str) -> Standalone {
    let addr = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        common::smtp::free_port_on(&[Ipv4Addr::LOCALHOST]),
    );
    let ca = lab.ca.write_ca_pem(lab.dir.path());
    let config = lab.dir.path().join("socketmap.toml");
    std::fs::write(
        &config,
        format!(
            "{dns}[tls]\nextra_roots = [\"{}\"]\n[storage]\ndata_dir = \"{}\"\n\
             [sts]\npolicy_port = {}\nfetch_timeout_secs = 5\n\
             [socketmap]\nlisten = [\"{addr}\"]\n{extra}",
            ca.display(),
            lab.dir.path().join("data").display(),
            lab.host.addr().port(),
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
        .arg("--config")
        .arg(&config)
        .arg("socketmap")
        .env("RUST_LOG", "stsrelay=debug")
        .stderr(std::fs::File::create(lab.dir.path().join("relay.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return Standalone {
                _child: child,
                addr,
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("socketmap did not start: {}", lab.log());
}

/// A socketmap client connection.
struct Client<S> {
    stream: S,
    buf: Vec<u8>,
}

impl Client<TcpStream> {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        Client {
            stream,
            buf: vec![],
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn send(&mut self, requests: &[&str]) {
        let mut out = vec![];
        for r in requests {
            netstring::encode(r.as_bytes(), &mut out);
        }
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next reply, or `None` at end of stream (bounded: 10 s).
    async fn reply(&mut self) -> Option<String> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(f) = netstring::decode(&self.buf, 1 << 20).expect("valid reply framing") {
                let text = String::from_utf8(self.buf[f.payload.clone()].to_vec()).unwrap();
                self.buf.drain(..f.consumed);
                return Some(text);
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("a reply or end of stream within 10 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn query(&mut self, request: &str) -> String {
        self.send(&[request]).await;
        self.reply().await.expect("a reply")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_one_at_a_time_and_pipelined() {
    let lab = Lab::new(&[20]).await;
    scenarios(&lab);
    let sm = start_socketmap(&lab, ZONES).await;
    let want = expectations();
    let mut c = Client::connect(sm.addr).await;
    for (req, reply) in &want {
        assert_eq!(&c.query(req).await, reply, "request {req:?}\n{}", lab.log());
    }
    // Exact patterns need no MX lookup; wildcards do.
    assert_eq!(lab.dns.count_queries("exact.test", RecordType::MX), 0);
    assert_eq!(lab.dns.count_queries("wild.test", RecordType::MX), 1);
    // The same requests pipelined in one write, three times over, on a new connection:
    // answered in order (now from the cache).
    let mut c = Client::connect(sm.addr).await;
    let reqs: Vec<&str> = want.iter().map(|(r, _)| *r).collect();
    let all: Vec<&str> = [&reqs[..], &reqs[..], &reqs[..]].concat();
    c.send(&all).await;
    for (i, req) in all.iter().enumerate() {
        let (_, reply) = want[i % want.len()];
        assert_eq!(c.reply().await.as_deref(), Some(reply), "pipelined {req:?}");
    }
    // One fetch per domain in all of this (the cache answered the rest), and one MX
    // lookup (the test DNS gives TTL 0: the socketmap's own MX cache answered).
    assert_eq!(lab.host.count("mta-sts.wild.test"), 1);
    assert_eq!(lab.dns.count_queries("wild.test", RecordType::MX), 1);
    drop(sm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_framing_and_oversize_requests_close_only_their_connection() {
    let lab = Lab::new(&[20]).await;
    scenarios(&lab);
    let sm = start_socketmap(&lab, "").await;
    let mut good = Client::connect(sm.addr).await;
    assert_eq!(
        good.query("postfix exact.test").await,
        "OK secure match=mail.exact.test servername=hostname"
    );
    let bad_inputs: [&[u8]; 6] = [
        b"GET / HTTP/1.0\r\n\r\n",
        b"1025:",
        b"99999999999999999999:",
        b"5:abcde;",
        b":x,",
        b"-3:abc,",
    ];
    for bad in bad_inputs {
        let mut c = Client::connect(sm.addr).await;
        c.stream.write_all(bad).await.unwrap();
        assert_eq!(c.reply().await, None, "{:?}", String::from_utf8_lossy(bad));
    }
    // A 1024-byte request is still served (and is not a domain).
    let mut c = Client::connect(sm.addr).await;
    let long = format!("postfix {}", "a".repeat(1016));
    assert_eq!(long.len(), 1024);
    assert_eq!(c.query(&long).await, "NOTFOUND ");
    // Replies to the requests before the bad bytes are still sent, in order.
    let mut c = Client::connect(sm.addr).await;
    let mut bytes = vec![];
    netstring::encode(b"postfix exact.test", &mut bytes);
    netstring::encode(b"postfix none.test", &mut bytes);
    bytes.extend_from_slice(b"2000:");
    c.stream.write_all(&bytes).await.unwrap();
    assert_eq!(
        c.reply().await.as_deref(),
        Some("OK secure match=mail.exact.test servername=hostname")
    );
    assert_eq!(c.reply().await.as_deref(), Some("NOTFOUND "));
    assert_eq!(c.reply().await, None);
    // Non-UTF-8 is answered, not fatal.
    let mut c = Client::connect(sm.addr).await;
    c.stream.write_all(b"10:postfix \xff\xfe,").await.unwrap();
    assert_eq!(c.reply().await.as_deref(), Some("NOTFOUND "));
    // The first connection was never disturbed.
    assert_eq!(good.query("postfix none.test").await, "NOTFOUND ");
    assert!(lab.log().contains("bad request framing"), "{}", lab.log());
    drop(sm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_stalled_connections_are_closed() {
    let lab = Lab::new(&[20]).await;
    let sm = start_socketmap(&lab, "idle_timeout_secs = 1\nio_timeout_secs = 1\n").await;
    // Idle between requests.
    let mut c = Client::connect(sm.addr).await;
    assert_eq!(c.query("postfix nothing.test").await, "NOTFOUND ");
    assert_eq!(c.reply().await, None);
    // A request that never completes, trickled one byte at a time (bounded: 40 bytes,
    // all a valid beginning of a 1000-byte request).
    let mut c = Client::connect(sm.addr).await;
    let mut closed = false;
    let trickle: Vec<u8> = b"1000:postfix "
        .iter()
        .copied()
        .chain(std::iter::repeat(b'a'))
        .take(40)
        .collect();
    for b in trickle {
        if c.stream.write_all(&[b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !closed {
        assert_eq!(c.reply().await, None, "stalled request still open");
    }
    drop(sm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_survive_a_restart_in_the_store() {
    let lab = Lab::new(&[20]).await;
    scenarios(&lab);
    let sm = start_socketmap(&lab, "").await;
    let want = "OK secure match=mx1.wild.test:mx2.wild.test servername=hostname";
    assert_eq!(
        Client::connect(sm.addr)
            .await
            .query("postfix wild.test")
            .await,
        want
    );
    drop(sm);
    // The policy host is gone now; the stored policy still applies after a restart.
    lab.host
        .serve("mta-sts.wild.test", Behaviour::status(500, "down"));
    let sm = start_socketmap(&lab, "").await;
    assert_eq!(
        Client::connect(sm.addr)
            .await
            .query("postfix wild.test")
            .await,
        want
    );
    assert_eq!(lab.host.count("mta-sts.wild.test"), 1);
    drop(sm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_run_the_relay_and_the_socketmap_share_one_engine() {
    let mut lab = Lab::new(&[21]).await;
    lab.policy("wild.test", "1", WILD);
    let leaf = lab.ca.leaf(&["mx1.wild.test"]);
    lab.mx(
        "wild.test",
        "mx1.wild.test",
        21,
        SinkOptions::tls("mx1.wild.test", leaf.server_config()),
    )
    .await;
    let sm_addr = SocketAddr::new(
        IpAddr::V4(ip(1)),
        common::smtp::free_port_on(&[Ipv4Addr::LOCALHOST]),
    );
    let sock = lab.dir.path().join("sm.sock");
    // The lab's relay config has DNSSEC off (unsigned test DNS, see start_socketmap).
    let relay = lab
        .start_relay(&format!(
            "[socketmap]\nlisten = [\"{sm_addr}\"]\nunix_path = \"{}\"\nunix_mode = 0o600\n",
            sock.display()
        ))
        .await;
    let want = "OK secure match=mx1.wild.test servername=hostname";
    let mut c = Client::connect(sm_addr).await;
    assert_eq!(c.query("postfix wild.test").await, want, "{}", lab.log());
    assert_eq!(lab.host.count("mta-sts.wild.test"), 1);
    // The relay delivers under the policy the socketmap query fetched: no second fetch.
    let r = submit(
        &relay,
        "a@client.test",
        &["bob@wild.test"],
        "Subject: x\r\n\r\nhi\r\n",
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    let sink = lab.sinks[0].clone();
    eventually("delivery", &lab, async || sink.message_count() == 1).await;
    assert!(sink.messages()[0].tls);
    assert_eq!(lab.host.count("mta-sts.wild.test"), 1);
    // The unix socket answers too, with the configured mode.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut u = Client {
        stream: tokio::net::UnixStream::connect(&sock).await.unwrap(),
        buf: vec![],
    };
    assert_eq!(u.query("postfix wild.test").await, want);
    drop(relay);
}

/// `stsrelay socketmap` with a config that makes it exit at once.
async fn socketmap_exit(config: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
        .arg("--config")
        .arg(config)
        .arg("socketmap")
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_socketmap_config_is_a_config_error() {
    let lab = Lab::new(&[20]).await;
    let config = lab.dir.path().join("bad.toml");
    for (text, key) in [
        ("[socketmap]\nlisten = []\n", "socketmap.listen"),
        ("[socketmap]\nunix_mode = 0o1777\n", "socketmap.unix_mode"),
        ("[socketmap.zones.x]\nstrict = true\n", "strict"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = socketmap_exit(&config).await;
        assert_eq!(out.status.code(), Some(78), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{err}");
    }
    // A taken address is a temporary failure (75).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = \"{}\"\n[socketmap]\nlisten = [\"{}\"]\n",
            lab.dir.path().join("d").display(),
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let out = socketmap_exit(&config).await;
    assert_eq!(out.status.code(), Some(75));
    assert!(String::from_utf8_lossy(&out.stderr).contains("socketmap.listen"));
}

// --- DANE: replies that hand the decision to Postfix's own DANE ---------------------------

mod dane {
    use super::common::dnssec::{SignedDns, Signing};
    use super::common::https::Behaviour;
    use super::common::relay::Lab;
    use super::{Client, start_socketmap_dns};
    use hickory_proto::rr::RecordType;
    use std::net::Ipv4Addr;

    const TLSA: [u8; 32] = [0x5a; 32];

    /// Signed `test.` (trust anchor), unsigned `insecure.test.`, bogus `bogus.test.`;
    /// the policy host of the common lab (its own unsigned DNS is not used).
    struct DaneLab {
        lab: Lab,
        dns: SignedDns,
    }

    impl DaneLab {
        async fn new() -> DaneLab {
            let dns = SignedDns::start().await;
            dns.add_zone("test.", Signing::Secure);
            dns.add_zone("insecure.test.", Signing::Unsigned);
            dns.add_zone("bogus.test.", Signing::WrongKey);
            DaneLab {
                lab: Lab::new(&[20]).await,
                dns,
            }
        }

        fn policy(&self, domain: &str, mx: &str) {
            let ph = format!("mta-sts.{domain}");
            self.dns.add_a(&ph, Ipv4Addr::LOCALHOST);
            self.lab.host.set_cert(&ph, &self.lab.ca.leaf(&[&ph]));
            self.lab.host.serve(
                &ph,
                Behaviour::policy(&format!(
                    "version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n"
                )),
            );
            self.dns
                .add_txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=1");
        }

        /// An MX host with an address; `tlsa` = (usage, selector, matching) of a record.
        fn mx(&self, domain: &str, pref: u16, host: &str, tlsa: Option<(u8, u8, u8)>) {
            self.dns.add_mx(domain, pref, host);
            self.dns.add_a(host, Ipv4Addr::new(127, 0, 0, 20));
            if let Some((u, s, m)) = tlsa {
                self.dns
                    .add_tlsa(&format!("_25._tcp.{host}"), u, s, m, &TLSA);
            }
        }

        async fn socketmap(&self) -> super::Standalone {
            let anchor = self.dns.write_trust_anchor(self.lab.dir.path());
            let dns = format!(
                "[dns]\nnameservers = [\"{}\"]\ntrust_anchor = \"{}\"\n",
                self.dns.addr(),
                anchor.display()
            );
            start_socketmap_dns(&self.lab, &dns, "[socketmap.zones.nodane]\ndane = false\n").await
        }
    }

    const EE: Option<(u8, u8, u8)> = Some((3, 1, 1));
    const TA: Option<(u8, u8, u8)> = Some((2, 0, 1));

    /// Issue 8: DANE hosts get `dane-only` / `dane` (never an MTA-STS `secure` that would
    /// let Postfix skip DANE); the rest of the table in src/socketmap/dane.rs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dane_next_hops_get_dane_replies() {
        let l = DaneLab::new().await;
        // Every MX DANE, under an enforce policy.
        l.policy("all.test", "*.all.test");
        l.mx("all.test", 10, "mx1.all.test", EE);
        l.mx("all.test", 20, "mx2.all.test", TA);
        // Some MX DANE: with and without MTA-STS.
        l.policy("mixed.test", "*.mixed.test");
        l.mx("mixed.test", 10, "mx1.mixed.test", EE);
        l.mx("mixed.test", 20, "mx2.mixed.test", None);
        l.mx("mixednosts.test", 10, "mx1.mixednosts.test", EE);
        l.mx("mixednosts.test", 20, "mx2.mixednosts.test", None);
        // DANE and no MTA-STS at all.
        l.mx("daneonly.test", 10, "mx.daneonly.test", TA);
        // Enforce policy, no TLSA / unusable TLSA / TLSA in an unsigned zone.
        l.policy("nodane.test", "mx.nodane.test");
        l.mx("nodane.test", 10, "mx.nodane.test", None);
        l.policy("pkix.test", "mx.pkix.test");
        l.mx("pkix.test", 10, "mx.pkix.test", Some((1, 1, 1)));
        l.policy("insecure.test", "mx.insecure.test");
        l.mx("insecure.test", 10, "mx.insecure.test", EE);
        // A bogus zone, and a next hop without DANE and without a policy.
        l.mx("bogus.test", 10, "mx.bogus.test", EE);
        l.mx("plain.test", 10, "mx.plain.test", None);
        let sm = l.socketmap().await;
        let mut c = Client::connect(sm.addr).await;
        let cases = [
            ("postfix all.test", "OK dane-only"),
            ("postfix mixed.test", "OK dane-only"),
            ("postfix mixednosts.test", "OK dane"),
            ("postfix daneonly.test", "OK dane-only"),
            (
                "postfix nodane.test",
                "OK secure match=mx.nodane.test servername=hostname",
            ),
            (
                "postfix pkix.test",
                "OK secure match=mx.pkix.test servername=hostname",
            ),
            (
                "postfix insecure.test",
                "OK secure match=mx.insecure.test servername=hostname",
            ),
            ("postfix bogus.test", "OK dane-only"),
            ("postfix plain.test", "NOTFOUND "),
            // A [host] next hop: the host's own TLSA records.
            ("postfix [mx1.all.test]:25", "OK dane-only"),
            ("postfix [mx.plain.test]", "NOTFOUND "),
            // A zone with DANE replies off: MTA-STS as before.
            (
                "nodane all.test",
                "OK secure match=mx1.all.test:mx2.all.test servername=hostname",
            ),
            ("nodane daneonly.test", "NOTFOUND "),
        ];
        for (req, want) in cases {
            assert_eq!(c.query(req).await, want, "{req}\n{}", l.lab.log());
        }
        // The DNSSEC facts are reused (like the MX hosts): no new TLSA queries.
        l.dns.clear_queries();
        assert_eq!(c.query("postfix all.test").await, "OK dane-only");
        assert_eq!(c.query("postfix mixednosts.test").await, "OK dane");
        let tlsa = l
            .dns
            .queries()
            .into_iter()
            .filter(|(_, t)| *t == RecordType::TLSA)
            .count();
        assert_eq!(tlsa, 0, "{:?}", l.dns.queries());
        drop(sm);
    }
}
