//! Relay throughput, stsrelay against Postfix on the same path, in one run, and
//! stsrelay's memory with 5,000 concurrent inbound sessions.
//!
//! `cargo bench --bench relay_load` (as root, with Debian's `postfix` installed for the
//! comparison; without them only stsrelay is measured). Path: Postfix's `smtp-source`
//! (20 sessions) -> relay -> STARTTLS sink (in this process). stsrelay resolves the MX
//! through an in-process DNS server and enforces an MTA-STS policy served by an
//! in-process HTTPS host; Postfix relays with `relayhost = [127.0.0.1]:PORT` and
//! `smtp_tls_security_level = may`. Both spool durably (fsync) on the same disk.
//! `BENCH_MESSAGES` (default 10000) sets the count.

#[path = "../tests/common/mod.rs"]
mod common;

use common::dns::TestDns;
use common::https::{Behaviour, PolicyHost};
use common::pki::TestCa;
use common::smtp::{SinkOptions, SmtpSink, free_port_on};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SESSIONS: usize = 20;
const SIZE: usize = 2000;
const CONCURRENT: usize = 5000;

fn free_port() -> u16 {
    free_port_on(&[Ipv4Addr::LOCALHOST])
}

/// Inject `n` messages with smtp-source and wait until the sink has `target` messages;
/// returns the wall time from the first connection to the last delivery.
async fn run_load(port: u16, n: usize, sink: &SmtpSink, target: usize) -> Option<Duration> {
    let start = Instant::now();
    let status = tokio::process::Command::new("smtp-source")
        .args([
            "-c",
            "-s",
            &SESSIONS.to_string(),
            "-m",
            &n.to_string(),
            "-l",
            &SIZE.to_string(),
        ])
        .args([
            "-f",
            "sender@client.test",
            "-t",
            "bob@bench.test",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .ok()?;
    if !status.success() {
        eprintln!("smtp-source failed: {status}");
        return None;
    }
    let injected = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while sink.message_count() < target {
        if Instant::now() > deadline {
            eprintln!("timed out: {} of {target} delivered", sink.message_count());
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = start.elapsed();
    println!("  injected in {injected:.1?}, all delivered after {total:.1?}");
    Some(total)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn postfix_config(dir: &Path, listen: u16, sink_port: u16) -> std::io::Result<()> {
    for d in ["etc", "queue", "data"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let master = std::fs::read_to_string("/etc/postfix/master.cf")?
        .lines()
        .map(|l| {
            if l.starts_with("smtp      inet") {
                format!("127.0.0.1:{listen} inet n - n - - smtpd")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("etc/master.cf"), master + "\n")?;
    std::fs::write(
        dir.join("etc/main.cf"),
        format!(
            "compatibility_level = 3.6\nqueue_directory = {q}\ndata_directory = {d}\ninet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\nmyhostname = relay.bench.test\nmydestination =\nmynetworks = 127.0.0.0/8\n\
             relayhost = [127.0.0.1]:{sink_port}\nsmtp_tls_security_level = may\nalias_maps =\nalias_database =\n\
             maillog_file_prefixes = {root}\nmaillog_file = {root}/maillog\n",
            q = dir.join("queue").display(),
            d = dir.join("data").display(),
            root = dir.display()
        ),
    )?;
    Command::new("chmod").arg("755").arg(dir).status()?;
    Command::new("chown")
        .arg("postfix")
        .arg(dir.join("data"))
        .status()?;
    Ok(())
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::Builder::new()
        .prefix("stsrelay-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    let ca = TestCa::new("stsrelay bench CA");
    let dns = TestDns::start().await;
    let host = PolicyHost::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let sink_port = free_port();
    let leaf = ca.leaf(&["mx.bench.test"]);
    let sink = SmtpSink::start(
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), sink_port),
        SinkOptions::tls("mx.bench.test", leaf.server_config()),
    )
    .await
    .unwrap();
    dns.set_ttl(300);
    dns.add_mx("bench.test", 10, "mx.bench.test");
    dns.add_a("mx.bench.test", Ipv4Addr::LOCALHOST);
    dns.add_a("mta-sts.bench.test", Ipv4Addr::LOCALHOST);
    dns.set_txt("_mta-sts.bench.test", &[&["v=STSv1; id=1"]]);
    host.set_cert("mta-sts.bench.test", &ca.leaf(&["mta-sts.bench.test"]));
    host.serve(
        "mta-sts.bench.test",
        Behaviour::policy("version: STSv1\nmode: enforce\nmx: mx.bench.test\nmax_age: 86400\n"),
    );

    // stsrelay
    let listen = free_port();
    let admin = free_port();
    let cfg = dir.path().join("stsrelay.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dns]\nnameservers = [\"{}\"]\ndnssec = false\n[tls]\nextra_roots = [\"{}\"]\n[storage]\ndata_dir = \"{}\"\n\
             [delivery]\nport = {sink_port}\nhelo_name = \"relay.bench.test\"\n[sts]\npolicy_port = {}\n\
             [server]\nlisten = \"127.0.0.1:{listen}\"\nmax_recipients = 10\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n[log]\nlevel = \"warn\"\n",
            dns.addr(),
            ca.write_ca_pem(dir.path()).display(),
            dir.path().join("data").display(),
            host.addr().port()
        ),
    )
    .unwrap();
    let mut relay = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = relay.id().unwrap_or(0);
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", listen))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "stsrelay: {n} messages of {SIZE} bytes, {SESSIONS} sessions, to a STARTTLS sink under an enforce policy"
    );
    let ours = run_load(listen, n, &sink, n).await;
    let ours_rate = ours.map(|t| n as f64 / t.as_secs_f64());
    if let Some(r) = ours_rate {
        println!(
            "  stsrelay: {r:.0} msgs/s; peak RSS {:.1} MiB",
            rss_kib(pid, "VmHWM:") as f64 / 1024.0
        );
    }

    // Postfix on the same path
    let pf_dir = dir.path().join("postfix");
    let pf_port = free_port();
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    if root
        && Path::new("/usr/sbin/postfix").exists()
        && postfix_config(&pf_dir, pf_port, sink_port).is_ok()
    {
        let etc = pf_dir.join("etc");
        let started = Command::new("postfix")
            .arg("-c")
            .arg(&etc)
            .arg("start")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if started {
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", pf_port))
                    .await
                    .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!(
                "Postfix {}: the same load",
                String::from_utf8_lossy(
                    &Command::new("postconf")
                        .args(["-d", "-h", "mail_version"])
                        .output()
                        .map(|o| o.stdout)
                        .unwrap_or_default()
                )
                .trim()
            );
            let theirs = run_load(pf_port, n, &sink, 2 * n).await;
            let _ = Command::new("postfix")
                .arg("-c")
                .arg(&etc)
                .arg("stop")
                .status();
            if let (Some(a), Some(t)) = (ours_rate, theirs) {
                let b = n as f64 / t.as_secs_f64();
                println!("  Postfix: {b:.0} msgs/s");
                println!("ratio stsrelay/Postfix: {:.2}x", a / b);
            }
        } else {
            println!(
                "Postfix did not start; see {}",
                pf_dir.join("maillog").display()
            );
        }
    } else {
        println!("Postfix comparison skipped (needs root and Debian's postfix package)");
    }

    // Memory with many concurrent inbound sessions.
    let mut conns = Vec::with_capacity(CONCURRENT);
    for _ in 0..CONCURRENT {
        match tokio::net::TcpStream::connect(("127.0.0.1", listen)).await {
            Ok(s) => conns.push(s),
            Err(e) => {
                eprintln!("connect failed after {} sessions: {e}", conns.len());
                break;
            }
        }
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 512];
    let mut live = 0;
    for c in &mut conns {
        if c.read(&mut buf).await.is_ok() && c.write_all(b"EHLO load.test\r\n").await.is_ok() {
            live += 1;
        }
    }
    for c in &mut conns {
        let _ = c.read(&mut buf).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "stsrelay with {live} concurrent inbound sessions: RSS {:.1} MiB (peak {:.1} MiB)",
        rss_kib(pid, "VmRSS:") as f64 / 1024.0,
        rss_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    drop(conns);
    let _ = relay.start_kill();
}
