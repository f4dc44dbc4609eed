//! Socketmap latency and throughput: stsrelay against postfix-mta-sts-resolver (PMSR),
//! same client, same machine, one run, cached domains.
//!
//! (a) one query at a time on one connection, as Postfix asks: queries/s, p50, p99;
//! (b) many connections, each writing a batch of pipelined queries and reading the
//!     replies: queries/s.
//!
//! Two ways to run it:
//! - `cargo bench --bench socketmap -- --target NAME=ADDR… --domains a.test,b.test`
//!   loads servers that are already running. `SOCKETMAP_BENCH=1 bash
//!   integration/run.sh` (as root) does this against release `stsrelay socketmap` and
//!   PMSR, both on the suite's Knot DNS and nginx policy hosts.
//! - `cargo bench --bench socketmap` with no target starts the release `stsrelay
//!   socketmap` on an in-process DNS server and HTTPS policy host with 100 domains
//!   and measures it alone.
//!
//! Every reply must be `OK …` (the domains must have enforced policies) or the run fails.
//! Counts are fixed (`BENCH_SEQUENTIAL`, default 20000; `BENCH_PIPELINED`, default
//! 200000) and each phase also stops after 60 s.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use stsrelay::socketmap::netstring;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 32;
const DEPTH: usize = 64;
const PHASE_LIMIT: Duration = Duration::from_secs(60);

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    chunk: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            buf: Vec::with_capacity(1 << 16),
            chunk: vec![0; 1 << 16],
        }
    }

    /// Read `n` replies; panics on anything but `OK …`.
    async fn replies(&mut self, mut n: usize) {
        while n > 0 {
            let mut pos = 0;
            while n > 0 {
                match netstring::decode(&self.buf[pos..], 1 << 20).expect("reply framing") {
                    Some(f) => {
                        let payload = &self.buf[pos + f.payload.start..pos + f.payload.end];
                        assert!(
                            payload.starts_with(b"OK "),
                            "not an OK reply: {}",
                            String::from_utf8_lossy(payload)
                        );
                        pos += f.consumed;
                        n -= 1;
                    }
                    None => break,
                }
            }
            self.buf.drain(..pos);
            if n == 0 {
                break;
            }
            let r =
                tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut self.chunk))
                    .await
                    .expect("reply within 30 s")
                    .expect("read");
            assert!(r > 0, "server closed the connection");
            self.buf.extend_from_slice(&self.chunk[..r]);
        }
    }
}

fn requests(domains: &[String]) -> Vec<Vec<u8>> {
    domains
        .iter()
        .map(|d| {
            let mut out = vec![];
            netstring::encode(format!("postfix {d}").as_bytes(), &mut out);
            out
        })
        .collect()
}

struct Figures {
    seq_qps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    pipelined_qps: f64,
}

async fn measure(addr: SocketAddr, domains: &[String]) -> Figures {
    let reqs = requests(domains);
    // Warm: every domain's policy fetched and cached (a first fetch may take a while).
    let mut c = Conn::open(addr).await;
    for r in reqs.iter().cycle().take(reqs.len() * 3) {
        c.stream.write_all(r).await.expect("write");
        c.replies(1).await;
    }
    // (a) one at a time.
    let n = env_count("BENCH_SEQUENTIAL", 20_000);
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for r in reqs.iter().cycle().take(n) {
        let t = Instant::now();
        c.stream.write_all(r).await.expect("write");
        c.replies(1).await;
        lat.push(t.elapsed());
        if start.elapsed() > PHASE_LIMIT {
            break;
        }
    }
    let seq_qps = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    let (p50_us, p99_us, p999_us, max_us) = (pct(0.50), pct(0.99), pct(0.999), pct(1.0));
    // (b) pipelined, many connections.
    let total = env_count("BENCH_PIPELINED", 200_000);
    let rounds = total.div_ceil(CONNECTIONS * DEPTH);
    let batch: Vec<u8> = reqs.iter().cycle().take(DEPTH).flatten().copied().collect();
    let mut conns = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        conns.push(Conn::open(addr).await);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in conns {
        let batch = batch.clone();
        tasks.spawn(async move {
            let mut done = 0usize;
            for _ in 0..rounds {
                c.stream.write_all(&batch).await.expect("write");
                c.replies(DEPTH).await;
                done += DEPTH;
                if start.elapsed() > PHASE_LIMIT {
                    break;
                }
            }
            done
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        done += r.expect("client task");
    }
    let pipelined_qps = done as f64 / start.elapsed().as_secs_f64();
    Figures {
        seq_qps,
        p50_us,
        p99_us,
        p999_us,
        max_us,
        pipelined_qps,
    }
}

fn report(results: &[(String, Figures)], domains: usize) {
    println!(
        "socketmap benchmark: {domains} cached domains; (a) 1 connection, one query at a time; \
         (b) {CONNECTIONS} connections x {DEPTH} pipelined queries per write"
    );
    println!(
        "{:<10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "target", "(a) q/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "(b) q/s"
    );
    for (name, f) in results {
        println!(
            "{name:<10} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>12.0}",
            f.seq_qps, f.p50_us, f.p99_us, f.p999_us, f.max_us, f.pipelined_qps
        );
    }
    if let (Some((a, fa)), Some((b, fb))) = (results.first(), results.get(1)) {
        println!(
            "{a} vs {b}: (a) p99 {:.1}x lower, {:.1}x the queries/s; (b) {:.1}x the queries/s",
            fb.p99_us / fa.p99_us,
            fa.seq_qps / fb.seq_qps,
            fa.pipelined_qps / fb.pipelined_qps
        );
    }
}

/// No targets: `stsrelay socketmap` (this build's binary) on in-process peers.
async fn self_contained() -> (String, Figures, usize) {
    use common::dns::TestDns;
    use common::https::{Behaviour, PolicyHost};
    use common::pki::TestCa;
    let dns = TestDns::start().await;
    dns.set_ttl(env_count("BENCH_DNS_TTL", 3600) as u32);
    let host = PolicyHost::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let ca = TestCa::new("socketmap bench CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut domains = vec![];
    for i in 0..100 {
        let d = format!("d{i}.bench.test");
        let ph = format!("mta-sts.{d}");
        dns.add_a(&ph, Ipv4Addr::LOCALHOST);
        host.set_cert(&ph, &ca.leaf(&[&ph]));
        host.serve(
            &ph,
            Behaviour::policy(&format!(
                "version: STSv1\nmode: enforce\nmx: *.{d}\nmax_age: 86400\n"
            )),
        );
        dns.set_txt(&format!("_mta-sts.{d}"), &[&["v=STSv1; id=1"]]);
        dns.add_mx(&d, 10, &format!("mx1.{d}"));
        dns.add_mx(&d, 20, &format!("mx2.{d}"));
        domains.push(d);
    }
    let addr = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        common::smtp::free_port_on(&[Ipv4Addr::LOCALHOST]),
    );
    let cfg = dir.path().join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dns]\nnameservers = [\"{}\"]\n[tls]\nextra_roots = [\"{}\"]\n[storage]\ndata_dir = \"{}\"\n\
             [sts]\npolicy_port = {}\n[socketmap]\nlisten = [\"{addr}\"]\n",
            dns.addr(),
            ca.write_ca_pem(dir.path()).display(),
            dir.path().join("data").display(),
            host.addr().port()
        ),
    )
    .expect("config");
    let _child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
        .arg("--config")
        .arg(&cfg)
        .arg("socketmap")
        .kill_on_drop(true)
        .spawn()
        .expect("start stsrelay socketmap");
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let f = measure(addr, &domains).await;
    ("stsrelay".into(), f, domains.len())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut targets: Vec<(String, SocketAddr)> = vec![];
    let mut domains: Vec<String> = vec![];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--target" => {
                let v = args.next().expect("--target NAME=ADDR");
                let (name, addr) = v.split_once('=').expect("--target NAME=ADDR");
                targets.push((name.to_string(), addr.parse().expect("ADDR is ip:port")));
            }
            "--domains" => {
                domains = args
                    .next()
                    .expect("--domains a,b")
                    .split(',')
                    .map(String::from)
                    .collect();
            }
            _ => {} // cargo bench passes --bench
        }
    }
    if targets.is_empty() {
        let (name, f, n) = self_contained().await;
        report(&[(name, f)], n);
        return;
    }
    assert!(!domains.is_empty(), "--domains is required with --target");
    let mut results = vec![];
    for (name, addr) in targets {
        results.push((name, measure(addr, &domains).await));
    }
    report(&results, domains.len());
}
