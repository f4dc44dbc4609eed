//! `stsrelay run` under bad input and faults, through the real binary: garbage and
//! protocol abuse on the inbound port, clients that vanish or stall mid-DATA, oversize
//! messages, an unwritable spool, MX hosts that stall or drop STARTTLS, `kill -9`
//! during and right after submissions, damaged spool entries, and the `queue`
//! commands. Every peer is on loopback (127.0.0.50–.59 here); every wait is bounded.

mod common;

use common::relay::{Lab, Relay, eventually, ip, queue_json, submit};
use common::smtp::{SinkOptions, SmtpSink};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stsrelay::smtp::outbound::Client;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest wait for one reply line from the relay.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn msg(subject: &str) -> String {
    format!("Subject: {subject}\r\nFrom: alice@sender.test\r\n\r\nHello.\r\n")
}

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// A raw TCP client: writes bytes as given, reads reply lines.
struct Raw {
    io: BufReader<TcpStream>,
}

impl Raw {
    /// Connect and read the `220` greeting.
    async fn connect(relay: &Relay) -> Raw {
        let tcp = tokio::time::timeout(READ_TIMEOUT, TcpStream::connect(relay.listen))
            .await
            .expect("connect timed out")
            .expect("connect");
        let mut raw = Raw {
            io: BufReader::new(tcp),
        };
        let greeting = raw.line().await.expect("greeting");
        assert!(greeting.starts_with("220 "), "{greeting}");
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(READ_TIMEOUT, async {
            self.io.get_mut().write_all(bytes).await?;
            self.io.get_mut().flush().await
        })
        .await
        .expect("write timed out")
        .expect("write");
    }

    /// One line without CRLF; `None` at EOF (or a reset). Panics after `READ_TIMEOUT`.
    async fn line(&mut self) -> Option<String> {
        let mut buf = Vec::new();
        let mut limited = (&mut self.io).take(64 * 1024);
        let read = limited.read_until(b'\n', &mut buf);
        match tokio::time::timeout(READ_TIMEOUT, read).await {
            Err(_) => panic!("no reply within {READ_TIMEOUT:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => None,
            Ok(Ok(_)) => {
                assert!(buf.ends_with(b"\r\n"), "reply line without CRLF: {buf:?}");
                Some(
                    String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                )
            }
        }
    }

    /// A whole (multi-line) reply; returns every line. Panics at EOF.
    async fn reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        for _ in 0..100 {
            let l = self
                .line()
                .await
                .unwrap_or_else(|| panic!("connection closed; reply so far: {lines:?}"));
            let last = l.len() == 3 || l.as_bytes().get(3) == Some(&b' ');
            lines.push(l);
            if last {
                return lines;
            }
        }
        panic!("endless reply: {lines:?}");
    }

    /// The last line of the next reply.
    async fn last(&mut self) -> String {
        self.reply().await.pop().unwrap()
    }

    /// Send one command line and return the last line of its reply.
    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.last().await
    }

    /// Send one command line and return every line of its reply.
    async fn reply_to(&mut self, line: &str) -> Vec<String> {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// The relay closes the connection without sending anything more.
    async fn expect_eof(&mut self) {
        if let Some(l) = self.line().await {
            panic!("expected the connection to be closed, got {l:?}");
        }
    }

    /// Nothing arrives for `d` (neither data nor EOF).
    async fn quiet_for(&mut self, d: Duration) -> bool {
        let mut b = [0u8; 1];
        tokio::time::timeout(d, self.io.read(&mut b)).await.is_err()
    }
}

/// EHLO; its reply (no enhanced codes, as Postfix) must be 250.
async fn ehlo(c: &mut Raw) {
    let lines = c.reply_to("EHLO client.test").await;
    assert!(lines.iter().all(|l| l.starts_with("250")), "{lines:?}");
}

/// Asserts `line` is `<code> <class>.x.y …`: the given code with an RFC 3463
/// enhanced status code of the matching class (and, if given, exactly `enhanced`).
fn assert_reply(line: &str, code: u16, enhanced: Option<&str>) {
    let ok_code = line.len() > 4 && line[..3] == code.to_string() && &line[3..4] == " ";
    assert!(ok_code, "expected {code}, got {line:?}");
    let esc = line[4..].split(' ').next().unwrap_or("");
    let parts: Vec<&str> = esc.split('.').collect();
    let well_formed = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        && parts[0] == &line[..1];
    assert!(well_formed, "no enhanced status code in {line:?}");
    if let Some(e) = enhanced {
        assert_eq!(esc, e, "{line:?}");
    }
}

/// Run `stsrelay --config <relay's config> ARGS` (bounded).
async fn cli(relay: &Relay, args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
        .arg("--config")
        .arg(&relay.config)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .unwrap_or_else(|_| panic!("stsrelay {args:?} hung"))
        .unwrap()
}

fn messages(q: &Value) -> &Vec<Value> {
    q.as_array().expect("queue list --json is an array")
}

/// Bounded poll with an explicit limit (for waits that `eventually` bounds too tightly
/// or too loosely).
async fn poll_until(what: &str, lab: &Lab, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "timed out after {limit:?} waiting for: {what}\n--- relay log ---\n{}",
        lab.log()
    );
}

fn data_dir(lab: &Lab) -> PathBuf {
    lab.dir.path().join("data")
}

fn spool_dir(lab: &Lab, sub: &str) -> PathBuf {
    data_dir(lab).join("spool").join(sub)
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Publish MX + A for `domain` without starting its sink (connections are refused,
/// so deliveries are deferred until [`start_sink`]).
fn mx_later(lab: &Lab, domain: &str, host: &str, last: u8) {
    lab.dns.add_mx(domain, 10, host);
    lab.dns.add_a(host, ip(last));
}

async fn start_sink(lab: &mut Lab, host: &str, last: u8) -> usize {
    let sink = SmtpSink::start(
        SocketAddr::new(IpAddr::V4(ip(last)), lab.port),
        SinkOptions::plain(host),
    )
    .await
    .unwrap();
    lab.sinks.push(sink);
    lab.sinks.len() - 1
}

fn subjects_seen(sink: &SmtpSink) -> Vec<String> {
    sink.messages()
        .iter()
        .filter_map(|m| {
            let d = String::from_utf8_lossy(&m.data).into_owned();
            d.split("\r\n")
                .find_map(|l| l.strip_prefix("Subject: "))
                .map(str::to_string)
        })
        .collect()
}

/// Submit through the real SMTP client without panicking; `Ok(final DATA reply)`.
/// No QUIT: the connection is dropped right after the reply.
async fn try_submit(relay: SocketAddr, to: &str, subject: &str) -> Result<String, String> {
    let (mut c, _) = Client::connect(relay, Duration::from_secs(5), Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    c.ehlo("client.test").await.map_err(|e| e.to_string())?;
    for cmd in [
        "MAIL FROM:<alice@sender.test>".to_string(),
        format!("RCPT TO:<{to}>"),
    ] {
        let r = c.command(&cmd).await.map_err(|e| e.to_string())?;
        if !r.is_positive() {
            return Err(format!("{cmd}: {}", r.text()));
        }
    }
    let r = c.command("DATA").await.map_err(|e| e.to_string())?;
    if r.code != 354 {
        return Err(format!("DATA: {}", r.text()));
    }
    let r = c
        .send_data(msg(subject).as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    Ok(r.text())
}

/// The queue id from `250 2.0.0 Ok: queued as ID`.
fn queued_id(reply: &str) -> String {
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    reply
        .rsplit(' ')
        .next()
        .filter(|id| id.len() == 16)
        .unwrap_or_else(|| panic!("no queue id in {reply:?}"))
        .to_string()
}

/// SIGKILL the relay and wait for it; asserts it really died of signal 9.
async fn kill9(relay: &mut Relay) {
    relay.child.start_kill().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), relay.child.wait())
        .await
        .expect("relay did not die")
        .unwrap();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
}

/// Keep the log of a relay run before the next start truncates it.
fn keep_log(lab: &Lab, n: usize) {
    let _ = std::fs::copy(
        lab.dir.path().join("relay.log"),
        lab.dir.path().join(format!("relay.{n}.log")),
    );
}

fn all_logs(lab: &Lab) -> String {
    let mut s = String::new();
    for n in 1..=3 {
        if let Ok(t) = std::fs::read_to_string(lab.dir.path().join(format!("relay.{n}.log"))) {
            s.push_str(&format!("--- run {n} ---\n{t}"));
        }
    }
    s.push_str(&format!("--- current ---\n{}", lab.log()));
    s
}

fn alive(relay: &mut Relay) -> bool {
    matches!(relay.child.try_wait(), Ok(None))
}

// ---------------------------------------------------------------------------------
// 1. Inbound garbage
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_garbage_is_answered_and_the_relay_keeps_serving() {
    let mut lab = Lab::new(&[50]).await;
    let s = lab
        .mx(
            "garbage.test",
            "mx.garbage.test",
            50,
            SinkOptions::plain("mx.garbage.test"),
        )
        .await;
    let mut relay = lab.start_relay("").await;

    // Unknown and unimplemented commands, NUL and control bytes: 500/502 with an
    // enhanced code; the session goes on.
    let mut c = Raw::connect(&relay).await;
    ehlo(&mut c).await;
    assert_reply(&c.cmd("XYZZY plugh").await, 500, Some("5.5.2"));
    assert_reply(&c.cmd("EXPN staff").await, 502, Some("5.5.1"));
    c.send(b"NO\0OP\r\n").await;
    assert_reply(&c.last().await, 500, Some("5.5.2"));
    c.send(b"MAIL FROM:<a\0b@sender.test>\r\n").await;
    assert_reply(&c.last().await, 500, Some("5.5.2"));
    c.send(b"NOOP\x07\r\n").await;
    assert_reply(&c.last().await, 500, Some("5.5.2"));
    assert_reply(&c.cmd("").await, 500, Some("5.5.2"));
    assert_reply(&c.cmd("NOOP").await, 250, Some("2.0.0"));

    // An over-long command line (10 000 bytes, arriving in pieces): exactly one 500,
    // the rest of the line is skipped, and the session either continues or closes
    // cleanly.
    for _ in 0..10 {
        c.send(&[b'X'; 1000]).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c.send(b"\r\nNOOP\r\n").await;
    assert_reply(&c.last().await, 500, Some("5.5.2"));
    match c.line().await {
        None => {}
        Some(l) => assert_reply(&l, 250, Some("2.0.0")),
    }
    // The bound is 4096 bytes including CRLF: exactly that is fine, one more is not.
    let at_limit = format!("NOOP {}\r\n", "a".repeat(4096 - 7));
    assert_eq!(at_limit.len(), 4096);
    c.send(at_limit.as_bytes()).await;
    assert_reply(&c.last().await, 250, Some("2.0.0"));
    let over = format!("NOOP {}\r\n", "a".repeat(4096 - 6));
    c.send(over.as_bytes()).await;
    assert_reply(&c.last().await, 500, Some("5.5.2"));
    // A long line that still has its end in the same write.
    let mut long = b"NOOP ".to_vec();
    long.extend(std::iter::repeat_n(b'y', 5000));
    long.extend_from_slice(b"\r\nNOOP\r\n");
    c.send(&long).await;
    assert_reply(&c.last().await, 500, Some("5.5.2"));
    assert_reply(&c.last().await, 250, Some("2.0.0"));
    assert_reply(&c.cmd("QUIT").await, 221, Some("2.0.0"));
    c.expect_eof().await;

    // Commands out of order: 503 5.5.1.
    let mut c = Raw::connect(&relay).await;
    assert_reply(
        &c.cmd("MAIL FROM:<a@sender.test>").await,
        503,
        Some("5.5.1"),
    );
    ehlo(&mut c).await;
    assert_reply(
        &c.cmd("RCPT TO:<bob@garbage.test>").await,
        503,
        Some("5.5.1"),
    );
    assert_reply(&c.cmd("DATA").await, 503, Some("5.5.1"));
    assert_reply(
        &c.cmd("MAIL FROM:<a@sender.test>").await,
        250,
        Some("2.1.0"),
    );
    assert_reply(&c.cmd("DATA").await, 503, Some("5.5.1"));
    assert_reply(
        &c.cmd("MAIL FROM:<a@sender.test>").await,
        503,
        Some("5.5.1"),
    );
    assert_reply(&c.cmd("RSET").await, 250, Some("2.0.0"));
    c.send(b"QUIT\r\n").await;
    drop(c);

    // Bare-LF-terminated commands are accepted (Postfix-compatible): a whole
    // transaction with LF-only command lines is queued and delivered.
    let mut c = Raw::connect(&relay).await;
    c.send(b"EHLO client.test\n").await;
    let lines = c.reply().await;
    assert!(lines.iter().all(|l| l.starts_with("250")), "{lines:?}");
    c.send(b"MAIL FROM:<alice@sender.test>\n").await;
    assert_reply(&c.last().await, 250, Some("2.1.0"));
    c.send(b"RCPT TO:<bob@garbage.test>\n").await;
    assert_reply(&c.last().await, 250, Some("2.1.5"));
    c.send(b"DATA\n").await;
    assert_eq!(&c.last().await[..4], "354 ");
    c.send(msg("bare-lf").as_bytes()).await;
    c.send(b".\r\n").await;
    let r = c.last().await;
    assert_reply(&r, 250, Some("2.0.0"));
    c.send(b"QUIT\n").await;
    assert_reply(&c.last().await, 221, Some("2.0.0"));
    c.expect_eof().await;

    // SMTP smuggling: bare-LF "end of data" look-alikes inside DATA do not end the
    // message, so the commands after them are content, not a second transaction.
    let mut c = Raw::connect(&relay).await;
    ehlo(&mut c).await;
    c.send(b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@garbage.test>\r\nDATA\r\n")
        .await;
    assert_reply(&c.last().await, 250, Some("2.1.0"));
    assert_reply(&c.last().await, 250, Some("2.1.5"));
    assert_eq!(&c.last().await[..4], "354 ");
    for fake_end in ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n"] {
        c.send(b"Subject: smuggle\r\n\r\nhello").await;
        c.send(fake_end.as_bytes()).await;
        c.send(
            b"MAIL FROM:<mallory@evil.test>\r\nRCPT TO:<victim@garbage.test>\r\nDATA\r\n\
              Subject: smuggled\r\n\r\nevil\r\n",
        )
        .await;
    }
    assert!(
        c.quiet_for(Duration::from_millis(300)).await,
        "no reply: the message has not ended"
    );
    c.send(b".\r\n").await;
    assert_reply(&c.last().await, 250, Some("2.0.0"));
    assert_reply(&c.cmd("QUIT").await, 221, Some("2.0.0"));
    c.expect_eof().await;

    // Too many errors: after 20 the session is closed with 421 4.7.0.
    let mut c = Raw::connect(&relay).await;
    c.send("BOGUS\r\n".repeat(25).as_bytes()).await;
    for i in 0..20 {
        let l = c.last().await;
        assert!(l.starts_with("500 "), "error #{i}: {l}");
    }
    assert_reply(&c.last().await, 421, Some("4.7.0"));
    c.expect_eof().await;

    // HTTP (cross-protocol): 521 5.7.0 and close, nothing said to the header lines.
    for req in [
        "GET / HTTP/1.1\r\nHost: relay.sender.test\r\nUser-Agent: x\r\n\r\n",
        "POST /submit HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\n\r\n",
        "CONNECT mx.garbage.test:25 HTTP/1.1\r\n\r\n",
    ] {
        let mut c = Raw::connect(&relay).await;
        c.send(req.as_bytes()).await;
        assert_reply(&c.last().await, 521, Some("5.7.0"));
        c.expect_eof().await;
    }

    // After all of it, a normal client is served.
    let reply = submit(
        &relay,
        "alice@sender.test",
        &["bob@garbage.test"],
        &msg("normal"),
    )
    .await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    eventually("three messages delivered", &lab, async || {
        lab.sinks[s].messages().len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = subjects_seen(&lab.sinks[s]);
    seen.sort();
    assert_eq!(seen, ["bare-lf", "normal", "smuggle"]);
    let all = lab.sinks[s].messages();
    let smuggle = all
        .iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains("Subject: smuggle\r\n"))
        .unwrap();
    assert_eq!(smuggle.mail_from, "alice@sender.test");
    assert_eq!(smuggle.rcpt_to, ["bob@garbage.test"]);
    assert!(
        all.iter().all(|m| m.mail_from != "mallory@evil.test"),
        "no smuggled transaction"
    );
    assert!(alive(&mut relay));
}

// ---------------------------------------------------------------------------------
// 2. Clients that vanish or stall mid-DATA
// ---------------------------------------------------------------------------------

/// EHLO, MAIL, RCPT, DATA and part of a body.
async fn half_message(relay: &Relay, tail: &[u8]) -> Raw {
    let mut c = Raw::connect(relay).await;
    ehlo(&mut c).await;
    assert_reply(&c.cmd("MAIL FROM:<alice@sender.test>").await, 250, None);
    assert_reply(&c.cmd("RCPT TO:<bob@middata.test>").await, 250, None);
    assert_eq!(&c.cmd("DATA").await[..4], "354 ");
    c.send(b"Subject: half\r\n\r\nfirst line\r\nsecond line\r\n")
        .await;
    c.send(tail).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_disconnect_or_stall_mid_data_leave_nothing_queued() {
    let lab = Lab::new(&[51]).await;
    // No DNS for middata.test: a message that got queued by mistake would show up in
    // the queue (and then bounce), never silently vanish.
    let mut relay = lab.start_relay("idle_timeout_secs = 1\n").await;

    // Disconnect (FIN) mid-DATA, with and without a half-sent terminator.
    for tail in [&b"no end"[..], b"", b".", b"\r\n.\r"] {
        let mut c = half_message(&relay, tail).await;
        c.io.get_mut().shutdown().await.unwrap();
        // The relay just closes; it must not answer (let alone 250) a cut-off message.
        c.expect_eof().await;
    }

    // Stall mid-DATA past server.idle_timeout_secs = 1: 421 4.4.2, then close.
    let started = Instant::now();
    let mut c = half_message(&relay, b"third line, and then nothing").await;
    let l = c.line().await.expect("a reply before the close");
    let waited = started.elapsed();
    assert_reply(&l, 421, Some("4.4.2"));
    assert!(l.contains("timeout"), "{l}");
    c.expect_eof().await;
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "421 after {waited:?}, idle timeout is 1 s"
    );

    // Nothing was queued, no body left in the spool.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = queue_json(&relay).await;
    assert!(messages(&q).is_empty(), "{q:#}");
    assert!(dir_entries(&spool_dir(&lab, "messages")).is_empty());
    assert!(dir_entries(&spool_dir(&lab, "incoming")).is_empty());
    assert!(alive(&mut relay));
    let mut c = Raw::connect(&relay).await;
    assert_reply(&c.cmd("NOOP").await, 250, None);
}

// ---------------------------------------------------------------------------------
// 3. Oversize messages
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_messages_get_552_and_nothing_is_queued() {
    let mut lab = Lab::new(&[52]).await;
    let s = lab
        .mx(
            "big.test",
            "mx.big.test",
            52,
            SinkOptions::plain("mx.big.test"),
        )
        .await;
    let mut relay = lab.start_relay("max_message_size = 2000\n").await;

    let mut c = Raw::connect(&relay).await;
    c.send(b"EHLO client.test\r\n").await;
    let ehlo = c.reply().await;
    assert!(
        ehlo.iter().any(|l| &l[4..] == "SIZE 2000"),
        "SIZE advertised: {ehlo:?}"
    );
    // Declared too large.
    assert_reply(
        &c.cmd("MAIL FROM:<alice@sender.test> SIZE=5000").await,
        552,
        Some("5.3.4"),
    );
    // Declared small, but 5 KB of DATA: 552 only after the final dot.
    assert_reply(
        &c.cmd("MAIL FROM:<alice@sender.test> SIZE=1000").await,
        250,
        Some("2.1.0"),
    );
    assert_reply(&c.cmd("RCPT TO:<bob@big.test>").await, 250, Some("2.1.5"));
    assert_eq!(&c.cmd("DATA").await[..4], "354 ");
    let mut body = String::from("Subject: too big\r\n\r\n");
    let line = format!("{}\r\n", "x".repeat(78));
    for _ in 0..64 {
        body.push_str(&line);
    }
    assert!(body.len() > 5000);
    c.send(body.as_bytes()).await;
    assert!(
        c.quiet_for(Duration::from_millis(300)).await,
        "no reply before the final dot"
    );
    c.send(b".\r\n").await;
    assert_reply(&c.last().await, 552, Some("5.3.4"));
    // The session goes on, and the transaction is over.
    assert_reply(&c.cmd("RCPT TO:<bob@big.test>").await, 503, Some("5.5.1"));
    assert_reply(&c.cmd("RSET").await, 250, Some("2.0.0"));
    // Undeclared and without a SIZE parameter at all.
    assert_reply(&c.cmd("MAIL FROM:<alice@sender.test>").await, 250, None);
    assert_reply(&c.cmd("RCPT TO:<bob@big.test>").await, 250, None);
    assert_eq!(&c.cmd("DATA").await[..4], "354 ");
    c.send(body.as_bytes()).await;
    c.send(b".\r\n").await;
    assert_reply(&c.last().await, 552, Some("5.3.4"));
    assert_reply(&c.cmd("QUIT").await, 221, None);

    let q = queue_json(&relay).await;
    assert!(messages(&q).is_empty(), "{q:#}");
    assert!(dir_entries(&spool_dir(&lab, "messages")).is_empty());

    // Still alive. The limit counts the message after dot-unstuffing, without the
    // added Received: header: exactly 2000 bytes pass (although every line is
    // dot-stuffed on the wire), 2001 do not.
    assert!(alive(&mut relay));
    let over = sized_body("over", 2001);
    let reply = submit(&relay, "alice@sender.test", &["bob@big.test"], &over).await;
    assert!(reply.starts_with("552 5.3.4"), "{reply}");
    let exact = sized_body("exact", 2000);
    let reply = submit(&relay, "alice@sender.test", &["bob@big.test"], &exact).await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    eventually("delivery", &lab, async || {
        !lab.sinks[s].messages().is_empty()
    })
    .await;
    let m = &lab.sinks[s].messages()[0];
    assert!(m.data.starts_with(b"Received: "));
    assert!(m.data.ends_with(exact.as_bytes()), "delivered intact");
    assert_eq!(subjects_seen(&lab.sinks[s]), ["exact"]);
}

/// A message of exactly `size` bytes (CRLF line ends) whose body lines all start
/// with a dot.
fn sized_body(subject: &str, size: usize) -> String {
    let mut b = format!("Subject: {subject}\r\n\r\n");
    assert!(size >= b.len() + 6);
    let line = |n: usize| format!(".{}\r\n", "d".repeat(n - 3));
    while size - b.len() > 160 {
        b.push_str(&line(80));
    }
    let room = size - b.len();
    b.push_str(&line(room / 2));
    b.push_str(&line(room - room / 2));
    assert_eq!(b.len(), size);
    b
}

// ---------------------------------------------------------------------------------
// 4. Unwritable spool
// ---------------------------------------------------------------------------------

/// Replace directory `dir` (empty) with a regular file: creating a file in it then
/// fails with ENOTDIR, even for root.
fn break_dir(dir: &Path) {
    std::fs::remove_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    std::fs::write(dir, b"not a directory").unwrap();
}

fn restore_dir(dir: &Path) {
    std::fs::remove_file(dir).unwrap();
    std::fs::create_dir(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_spool_gives_451_and_nothing_is_acknowledged() {
    let mut lab = Lab::new(&[53]).await;
    let s = lab
        .mx(
            "spool.test",
            "mx.spool.test",
            53,
            SinkOptions::plain("mx.spool.test"),
        )
        .await;
    let mut relay = lab.start_relay("").await;
    let incoming = spool_dir(&lab, "incoming");
    let messages_dir = spool_dir(&lab, "messages");

    // incoming/ unusable: the body file cannot be created.
    break_dir(&incoming);
    let reply = submit(
        &relay,
        "alice@sender.test",
        &["bob@spool.test"],
        &msg("lost-1"),
    )
    .await;
    assert!(reply.starts_with("451 4.3.0"), "{reply}");
    restore_dir(&incoming);

    // messages/ unusable: the body is written and fsynced, but cannot be committed.
    break_dir(&messages_dir);
    let reply = submit(
        &relay,
        "alice@sender.test",
        &["bob@spool.test"],
        &msg("lost-2"),
    )
    .await;
    assert!(reply.starts_with("451 4.3.0"), "{reply}");
    restore_dir(&messages_dir);
    assert!(
        dir_entries(&incoming).is_empty(),
        "the unacknowledged body is removed"
    );

    let q = queue_json(&relay).await;
    assert!(
        messages(&q).is_empty(),
        "nothing acknowledged, nothing queued: {q:#}"
    );
    assert!(alive(&mut relay));

    // Restored: the next message is accepted and delivered; the refused ones never.
    let reply = submit(
        &relay,
        "alice@sender.test",
        &["bob@spool.test"],
        &msg("kept"),
    )
    .await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    eventually("delivery", &lab, async || {
        !lab.sinks[s].messages().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(subjects_seen(&lab.sinks[s]), ["kept"]);
}

// ---------------------------------------------------------------------------------
// 5. An MX that stalls
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_mx_is_deferred_after_the_command_timeout() {
    let mut lab = Lab::new(&[54, 55]).await;
    let mut stall = SinkOptions::plain("mx.stall.test");
    stall.stall_after_greeting = true;
    let s_stall = lab.mx("stall.test", "mx.stall.test", 54, stall).await;
    let s_ok = lab
        .mx(
            "fine.test",
            "mx.fine.test",
            55,
            SinkOptions::plain("mx.fine.test"),
        )
        .await;
    let mut relay = lab
        .start_relay_edited("", |c| {
            assert!(c.contains("command_timeout_secs = 10\n"), "{c}");
            c.replace("command_timeout_secs = 10\n", "command_timeout_secs = 2\n")
        })
        .await;

    let started = Instant::now();
    let reply = submit(
        &relay,
        "alice@sender.test",
        &["bob@stall.test"],
        &msg("stalled"),
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    let mut deferred = None;
    poll_until("deferral", &lab, Duration::from_secs(15), async || {
        let q = queue_json(&relay).await;
        let r = &messages(&q)[0]["recipients"][0];
        if r["state"] == "deferred" {
            deferred = Some(r.clone());
            true
        } else {
            false
        }
    })
    .await;
    let waited = started.elapsed();
    let r = deferred.unwrap();
    let reason = r["last_reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("4") && reason.contains("timed out"),
        "timeout reason: {r:#}"
    );
    assert!(reason.contains("mx.stall.test"), "{reason}");
    assert_eq!(r["attempts"], 1, "{r:#}");
    // command_timeout_secs = 2 was honoured (not the 10 s of the base config).
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(8),
        "deferred after {waited:?}"
    );
    assert!(lab.sinks[s_stall].connections() >= 1);
    assert!(lab.sinks[s_stall].messages().is_empty());

    // The relay keeps running and delivering.
    assert!(alive(&mut relay));
    let reply = submit(
        &relay,
        "alice@sender.test",
        &["bob@fine.test"],
        &msg("fine"),
    )
    .await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    eventually("delivery elsewhere", &lab, async || {
        !lab.sinks[s_ok].messages().is_empty()
    })
    .await;
    let q = queue_json(&relay).await;
    let m = messages(&q);
    assert_eq!(m.len(), 1, "only the stalled message is left: {q:#}");
    assert_eq!(m[0]["recipients"][0]["state"], "deferred");
}

// ---------------------------------------------------------------------------------
// 6. An MX that drops the connection after 220 to STARTTLS
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_that_drops_starttls_under_enforce_is_deferred_never_plaintext() {
    let mut lab = Lab::new(&[56]).await;
    lab.policy(
        "dropper.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.dropper.test\nmax_age: 86400\n",
    );
    let leaf = lab.ca.leaf(&["mx.dropper.test"]);
    let mut opts = SinkOptions::tls("mx.dropper.test", leaf.server_config());
    opts.close_after_starttls = true;
    let s = lab.mx("dropper.test", "mx.dropper.test", 56, opts).await;
    let relay = lab.start_relay("[queue]\nretry_secs = [1]\n").await;

    let reply = submit(
        &relay,
        "alice@sender.test",
        &["bob@dropper.test"],
        &msg("secret"),
    )
    .await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    let mut last = Value::Null;
    poll_until(
        "two deferred attempts",
        &lab,
        Duration::from_secs(20),
        async || {
            let q = queue_json(&relay).await;
            last = messages(&q)[0]["recipients"][0].clone();
            last["state"] == "deferred" && last["attempts"].as_u64().unwrap_or(0) >= 2
        },
    )
    .await;
    let reason = last["last_reason"].as_str().unwrap_or_default();
    assert!(reason.contains(" 4.7."), "4.7.x reason: {last:#}");
    // STARTTLS really was attempted (with SNI = MX name), never completed, and no
    // transaction was ever started in plaintext.
    let sink = &lab.sinks[s];
    assert!(sink.handshakes().len() >= 2, "{:?}", sink.handshakes());
    assert!(
        sink.handshakes()
            .iter()
            .all(|h| h.as_deref() == Some("mx.dropper.test"))
    );
    assert_eq!(sink.completed_handshakes(), 0);
    assert!(sink.messages().is_empty(), "never delivered in plaintext");
    let cmds = sink.commands();
    assert!(
        cmds.iter().all(|c| {
            let v = c.to_ascii_uppercase();
            v.starts_with("EHLO") || v == "STARTTLS"
        }),
        "only EHLO/STARTTLS in plaintext: {cmds:?}"
    );
}

// ---------------------------------------------------------------------------------
// 7. kill -9
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_loses_an_acknowledged_message() {
    const N: usize = 20;
    let mut lab = Lab::new(&[57]).await;
    // MX published, but nothing listens there yet: deliveries are deferred.
    mx_later(&lab, "later.test", "mx.later.test", 57);
    let mut relay = lab.start_relay("").await;

    // Run 1: a client submits back to back; SIGKILL lands in the middle of the stream.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let submitter = {
        let (acked, listen) = (acked.clone(), relay.listen);
        tokio::spawn(async move {
            for i in 0..200 {
                let subject = format!("crash-a{i}");
                match try_submit(listen, "bob@later.test", &subject).await {
                    Ok(r) if r.starts_with("250") => acked.lock().unwrap().push(subject),
                    Ok(r) => return format!("refused: {r}"),
                    Err(e) => return e,
                }
            }
            "never interrupted".to_string()
        })
    };
    // A tight poll, so that the kill lands while the stream is still going.
    for _ in 0..6000 {
        if acked.lock().unwrap().len() >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(acked.lock().unwrap().len() >= 8, "{}", lab.log());
    kill9(&mut relay).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), submitter)
        .await
        .expect("submitter hung")
        .unwrap();
    assert_ne!(ended, "never interrupted");
    let mut acked: Vec<String> = acked.lock().unwrap().clone();
    let run1 = acked.len();
    keep_log(&lab, 1);

    // Run 2 on the same data dir: submit until N are acknowledged, SIGKILL right
    // after the last 250.
    let mut relay = lab.start_relay("").await;
    let mut i = 0;
    while acked.len() < N.max(run1 + 3) {
        let subject = format!("crash-b{i}");
        i += 1;
        let r = try_submit(relay.listen, "bob@later.test", &subject)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", all_logs(&lab)));
        assert!(r.starts_with("250"), "{r}");
        acked.push(subject);
    }
    kill9(&mut relay).await;
    keep_log(&lab, 2);

    // Run 3: every acknowledged message is in the queue; once the MX is up and the
    // queue flushed, every one is delivered (duplicates allowed, losses not).
    let relay = lab.start_relay("").await;
    poll_until(
        "every message attempted once",
        &lab,
        Duration::from_secs(20),
        async || {
            let q = queue_json(&relay).await;
            messages(&q).iter().all(|m| {
                m["recipients"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["state"] == "deferred")
            })
        },
    )
    .await;
    let q = queue_json(&relay).await;
    assert!(
        messages(&q).len() >= N,
        "{} queued, {N} acknowledged\n{}",
        messages(&q).len(),
        all_logs(&lab)
    );
    assert!(messages(&q).iter().all(|m| m["corrupt"] == false), "{q:#}");
    let s = start_sink(&mut lab, "mx.later.test", 57).await;
    let out = cli(&relay, &["queue", "flush"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll_until(
        "every acknowledged message delivered",
        &lab,
        Duration::from_secs(30),
        async || {
            let seen = subjects_seen(&lab.sinks[s]);
            acked.iter().all(|a| seen.contains(a))
        },
    )
    .await;
    assert!(lab.sinks[s].messages().len() >= N);
    eventually("queue empty", &lab, async || {
        messages(&queue_json(&relay).await).is_empty()
    })
    .await;
}

// ---------------------------------------------------------------------------------
// 8. Damaged spool entries
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_spool_entries_are_set_aside_and_the_rest_is_delivered() {
    let mut lab = Lab::new(&[58]).await;
    mx_later(&lab, "damaged.test", "mx.damaged.test", 58);
    let mut relay = lab.start_relay("").await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let reply = submit(
            &relay,
            "alice@sender.test",
            &["bob@damaged.test"],
            &msg(&format!("d{i}")),
        )
        .await;
        ids.push(queued_id(&reply));
    }
    eventually("all deferred", &lab, async || {
        let q = queue_json(&relay).await;
        messages(&q).len() == 4
            && messages(&q)
                .iter()
                .all(|m| m["recipients"][0]["state"] == "deferred")
    })
    .await;
    kill9(&mut relay).await;
    keep_log(&lab, 1);

    // Damage the stopped relay's spool: two bodies without metadata (one not even
    // named like a queue id), one body deleted, one truncated.
    let msgs = spool_dir(&lab, "messages");
    std::fs::write(msgs.join("garbage.bin"), b"\x00\xffnot a message").unwrap();
    std::fs::write(msgs.join("0000000000000ABC"), b"orphan body").unwrap();
    std::fs::remove_file(msgs.join(&ids[1])).unwrap();
    std::fs::write(msgs.join(&ids[2]), b"Subj").unwrap();

    let mut relay = lab.start_relay("").await;
    assert!(alive(&mut relay));
    // Orphans moved aside, untouched.
    let corrupt = spool_dir(&lab, "corrupt");
    assert_eq!(
        dir_entries(&corrupt),
        ["0000000000000ABC", "garbage.bin"],
        "{}",
        all_logs(&lab)
    );
    assert_eq!(
        std::fs::read(corrupt.join("garbage.bin")).unwrap(),
        b"\x00\xffnot a message"
    );
    let mut left = dir_entries(&msgs);
    left.sort();
    let mut want = vec![ids[0].clone(), ids[2].clone(), ids[3].clone()];
    want.sort();
    assert_eq!(left, want, "only the spooled bodies remain in messages/");

    // The listing reports the damaged messages as corrupt.
    let q = queue_json(&relay).await;
    let by_id = |id: &str| -> Value {
        messages(&q)
            .iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {q:#}"))
            .clone()
    };
    assert_eq!(messages(&q).len(), 4, "{q:#}");
    for (i, id) in ids.iter().enumerate() {
        let m = by_id(id);
        let damaged = i == 1 || i == 2;
        assert_eq!(m["corrupt"], damaged, "{m:#}");
        if damaged {
            assert!(
                m["corrupt_reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{m:#}"
            );
        }
    }
    assert!(
        by_id(&ids[1])["corrupt_reason"]
            .as_str()
            .unwrap()
            .contains("missing")
    );
    // The text listing says so too.
    let out = cli(&relay, &["queue", "list"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(text.matches("CORRUPT").count(), 2, "{text}");

    // The others are delivered; the damaged ones never are.
    let s = start_sink(&mut lab, "mx.damaged.test", 58).await;
    let out = cli(&relay, &["queue", "flush"]).await;
    assert!(out.status.success());
    eventually("intact messages delivered", &lab, async || {
        lab.sinks[s].messages().len() >= 2
    })
    .await;
    eventually("only the corrupt messages left", &lab, async || {
        messages(&queue_json(&relay).await).len() == 2
    })
    .await;
    let mut seen = subjects_seen(&lab.sinks[s]);
    seen.sort();
    assert_eq!(seen, ["d0", "d3"]);
    let q = queue_json(&relay).await;
    assert!(messages(&q).iter().all(|m| m["corrupt"] == true), "{q:#}");
}

// ---------------------------------------------------------------------------------
// 9. queue show / delete / flush
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_show_delete_and_flush_through_the_binary() {
    let mut lab = Lab::new(&[59]).await;
    mx_later(&lab, "held.test", "mx.held.test", 59);
    let relay = lab.start_relay("").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let reply = submit(
            &relay,
            "alice@sender.test",
            &["bob@held.test", "carol@held.test"],
            &msg(&format!("h{i}")),
        )
        .await;
        ids.push(queued_id(&reply));
    }
    eventually("all deferred", &lab, async || {
        let q = queue_json(&relay).await;
        messages(&q).len() == 3
            && messages(&q).iter().all(|m| {
                m["recipients"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["state"] == "deferred")
            })
    })
    .await;

    // show: the message JSON with per-recipient state.
    let out = cli(&relay, &["queue", "show", &ids[0]]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["id"], ids[0].as_str());
    assert_eq!(m["envelope"]["mail_from"], "alice@sender.test");
    assert_eq!(m["corrupt"], false);
    let rcpts = m["recipients"].as_array().unwrap();
    assert_eq!(rcpts.len(), 2, "{m:#}");
    assert_eq!(rcpts[0]["address"], "bob@held.test");
    assert_eq!(rcpts[1]["address"], "carol@held.test");
    for r in rcpts {
        assert_eq!(r["state"], "deferred", "{m:#}");
        assert_eq!(r["attempts"], 1, "{m:#}");
        assert!(
            r["last_reason"]
                .as_str()
                .unwrap_or_default()
                .contains("4.4.1"),
            "{m:#}"
        );
    }

    // delete: gone from the list and from the disk.
    let body = spool_dir(&lab, "messages").join(&ids[1]);
    assert!(body.exists());
    let out = cli(&relay, &["queue", "delete", &ids[1]]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = queue_json(&relay).await;
    let listed: Vec<&str> = messages(&q)
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[0].as_str(), ids[2].as_str()]);
    assert!(!body.exists(), "body removed");
    for args in [
        ["queue", "show", ids[1].as_str()],
        ["queue", "delete", ids[1].as_str()],
    ] {
        let out = cli(&relay, &args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no message") && err.contains(&ids[1]), "{err}");
    }

    // Invalid ids: non-zero exit, a clear error, and nothing touched.
    let lower = ids[0].to_ascii_lowercase();
    let longer = format!("{}0", ids[0]);
    for bad in [
        "../etc",
        "../../../../etc/passwd",
        "",
        lower.as_str(),
        longer.as_str(),
        "0123456789ABCDEG",
    ] {
        for verb in ["show", "delete"] {
            let out = cli(&relay, &["queue", verb, bad]).await;
            assert!(!out.status.success(), "queue {verb} {bad:?} must fail");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("invalid queue id"), "{verb} {bad:?}: {err}");
            assert!(out.stdout.is_empty(), "{verb} {bad:?}");
        }
    }
    assert_eq!(messages(&queue_json(&relay).await).len(), 2);

    // flush: the MX comes up; without a flush nothing moves (next retry is minutes
    // away); after it, the two remaining messages are delivered at once.
    let s = start_sink(&mut lab, "mx.held.test", 59).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        lab.sinks[s].messages().is_empty(),
        "not retried before flush"
    );
    let out = cli(&relay, &["queue", "flush"]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("4 recipient(s) due now"), "{text}");
    eventually("flushed messages delivered", &lab, async || {
        lab.sinks[s].messages().len() >= 2
    })
    .await;
    eventually("queue empty", &lab, async || {
        messages(&queue_json(&relay).await).is_empty()
    })
    .await;
    let mut seen = subjects_seen(&lab.sinks[s]);
    seen.sort();
    assert_eq!(seen, ["h0", "h2"], "the deleted message is never delivered");
    assert!(
        lab.sinks[s]
            .messages()
            .iter()
            .all(|m| m.rcpt_to == ["bob@held.test", "carol@held.test"])
    );
}
