//! Operating the relay, through the real binary: `/metrics` counts after deliveries,
//! health, readiness and the status page (with a headless-Chromium screenshot when
//! Chromium is installed), SIGHUP reload, SIGTERM during a load run, systemd
//! notifications, exit codes.

mod common;

use common::relay::{Lab, Relay, connect, eventually, queue_json, submit};
use common::smtp::SinkOptions;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const MSG: &str = "Subject: ops\r\nFrom: alice@sender.test\r\n\r\nHello.\r\n";

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    common::relay::http_get(addr, path).await
}

/// The value of the sample `name{labels}` (labels in any order, all of them given);
/// 0 when absent (a counter not yet incremented).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let got: BTreeMap<&str, &str> = l
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if got == want {
            return value.parse().unwrap();
        }
    }
    0.0
}

fn kill(relay: &Relay, sig: &str) {
    let pid = relay.child.id().expect("relay running");
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

/// A stand-in for systemd's notification socket.
struct NotifySocket {
    sock: UnixDatagram,
    path: String,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        NotifySocket {
            sock,
            path: path.display().to_string(),
            seen: vec![],
        }
    }

    /// Every message received so far (one per `sd_notify` call).
    fn messages(&mut self) -> &[String] {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            self.seen
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        &self.seen
    }

    fn count(&mut self, line: &str) -> usize {
        self.messages()
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_deliveries_and_status_page_shows_them() {
    let mut lab = Lab::new(&[50, 51, 52, 53, 54]).await;
    lab.policy(
        "good.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.good.test\nmax_age: 86400\n",
    );
    let good = lab
        .tls_mx("good.test", "mx.good.test", 50, &["mx.good.test"])
        .await;
    let plain = lab
        .mx(
            "plain.test",
            "mx.plain.test",
            51,
            SinkOptions::plain("mx.plain.test"),
        )
        .await;
    let mut reject = SinkOptions::plain("mx.reject.test");
    reject.reject_rcpt = Some("550 5.1.1 no such user".into());
    lab.mx("reject.test", "mx.reject.test", 52, reject).await;
    lab.policy(
        "wrongname.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.wrongname.test\nmax_age: 86400\n",
    );
    let wrong = lab.ca.leaf(&["other.wrongname.test"]);
    lab.mx(
        "wrongname.test",
        "mx.wrongname.test",
        53,
        SinkOptions::tls("mx.wrongname.test", wrong.server_config()),
    )
    .await;
    lab.policy(
        "testing.test",
        "7",
        "version: STSv1\nmode: testing\nmx: mx.testing.test\nmax_age: 86400\n",
    );
    let expired = lab.ca.leaf_expired(&["mx.testing.test"]);
    let testing = lab
        .mx(
            "testing.test",
            "mx.testing.test",
            54,
            SinkOptions::tls("mx.testing.test", expired.server_config()),
        )
        .await;
    let relay = lab.start_relay("").await;
    for i in 0..3 {
        let r = submit(
            &relay,
            "alice@sender.test",
            &[&format!("u{i}@good.test")],
            MSG,
        )
        .await;
        assert!(r.starts_with("250"), "{r}");
    }
    for i in 0..2 {
        let r = submit(
            &relay,
            "alice@sender.test",
            &[&format!("u{i}@plain.test")],
            MSG,
        )
        .await;
        assert!(r.starts_with("250"), "{r}");
    }
    // The null sender: the bounce makes no DSN (which would be one more bounce).
    assert!(
        submit(&relay, "", &["x@reject.test"], MSG)
            .await
            .starts_with("250")
    );
    assert!(
        submit(&relay, "alice@sender.test", &["x@wrongname.test"], MSG)
            .await
            .starts_with("250")
    );
    assert!(
        submit(&relay, "alice@sender.test", &["x@testing.test"], MSG)
            .await
            .starts_with("250")
    );
    eventually("every outcome", &lab, async || {
        let (_, m) = get(relay.admin, "/metrics").await;
        metric(
            &m,
            "stsrelay_deliveries_total",
            &[("outcome", "delivered"), ("mode", "enforce")],
        ) == 3.0
            && metric(
                &m,
                "stsrelay_deliveries_total",
                &[("outcome", "delivered"), ("mode", "none")],
            ) == 2.0
            && metric(
                &m,
                "stsrelay_deliveries_total",
                &[("outcome", "delivered"), ("mode", "testing")],
            ) == 1.0
            && metric(
                &m,
                "stsrelay_deliveries_total",
                &[("outcome", "bounced"), ("mode", "none")],
            ) == 1.0
            && metric(
                &m,
                "stsrelay_deliveries_total",
                &[("outcome", "deferred"), ("mode", "enforce")],
            ) == 1.0
    })
    .await;
    assert_eq!(lab.sinks[good].message_count(), 3);
    assert_eq!(lab.sinks[plain].message_count(), 2);
    assert_eq!(lab.sinks[testing].message_count(), 1);

    let (status, m) = get(relay.admin, "/metrics").await;
    assert_eq!(status, 200);
    let c = |name, labels: &[(&str, &str)]| metric(&m, name, labels);
    assert_eq!(c("stsrelay_messages_received_total", &[]), 8.0, "{m}");
    // The eight clients and the harness's one probe connection.
    assert_eq!(c("stsrelay_inbound_sessions_total", &[]), 9.0, "{m}");
    assert_eq!(c("stsrelay_inbound_sessions_active", &[]), 0.0, "{m}");
    // MAIL, RCPT, end of data: 2xx; DATA: 354 — for 6 delivered messages; the rejected
    // one got 250 to MAIL and 550 to RCPT; the TLS failure never got as far as MAIL.
    assert_eq!(
        c("stsrelay_smtp_replies_total", &[("class", "2xx")]),
        19.0,
        "{m}"
    );
    assert_eq!(
        c("stsrelay_smtp_replies_total", &[("class", "3xx")]),
        6.0,
        "{m}"
    );
    assert_eq!(
        c("stsrelay_smtp_replies_total", &[("class", "5xx")]),
        1.0,
        "{m}"
    );
    assert_eq!(
        c("stsrelay_smtp_replies_total", &[("class", "4xx")]),
        0.0,
        "{m}"
    );
    // Three published policies fetched once each.
    assert_eq!(
        c("stsrelay_policy_fetches_total", &[("outcome", "ok")]),
        3.0,
        "{m}"
    );
    // One lookup per attempt (8): good.test hits twice; the domains without a policy
    // (plain twice, reject once) and the first lookup of each policy domain miss.
    assert_eq!(
        c("stsrelay_policy_cache_lookups_total", &[("result", "hit")]),
        2.0,
        "{m}"
    );
    assert_eq!(
        c("stsrelay_policy_cache_lookups_total", &[("result", "miss")]),
        6.0,
        "{m}"
    );
    // TLS results by mode (connections to good.test and plain.test may be reused).
    assert!(
        c(
            "stsrelay_tls_sessions_total",
            &[("mode", "enforce"), ("result", "success")]
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        c(
            "stsrelay_tls_sessions_total",
            &[("mode", "enforce"), ("result", "certificate-host-mismatch")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        c(
            "stsrelay_tls_sessions_total",
            &[("mode", "testing"), ("result", "certificate-expired")]
        ),
        1.0,
        "{m}"
    );
    assert!(
        c(
            "stsrelay_tls_sessions_total",
            &[("mode", "none"), ("result", "starttls-not-supported")]
        ) >= 2.0,
        "plain.test and reject.test: {m}"
    );
    // The queue: the deferred wrongname.test message.
    assert_eq!(c("stsrelay_queue_messages", &[]), 1.0, "{m}");
    assert_eq!(
        c("stsrelay_queue_recipients", &[("state", "deferred")]),
        1.0,
        "{m}"
    );
    assert_eq!(
        c("stsrelay_queue_recipients", &[("state", "queued")]),
        0.0,
        "{m}"
    );
    assert!(c("stsrelay_queue_oldest_age_seconds", &[]) >= 0.0);
    assert!(m.contains("# HELP stsrelay_deliveries_total"), "{m}");
    // Receipt-to-delivery delay of the six delivered recipients (a few seconds at most).
    let delay = |mode| c("stsrelay_delivery_delay_seconds_count", &[("mode", mode)]);
    assert_eq!(
        (delay("enforce"), delay("testing"), delay("none")),
        (3.0, 1.0, 2.0),
        "{m}"
    );
    assert_eq!(
        c(
            "stsrelay_delivery_delay_seconds_bucket",
            &[("mode", "enforce"), ("le", "432000")]
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        c(
            "stsrelay_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0,
        "{m}"
    );

    assert_eq!(
        get(relay.admin, "/healthz").await,
        (200, "ok\n".to_string())
    );
    assert_eq!(
        get(relay.admin, "/readyz").await,
        (200, "ready\n".to_string())
    );
    assert_eq!(get(relay.admin, "/nope").await.0, 404);
    let (status, page) = get(relay.admin, "/").await;
    assert_eq!(status, 200);
    for want in [
        "relay.sender.test",
        "Ready",
        "good.test",
        "wrongname.test",
        "testing.test",
        "mx.good.test",
        "certificate-host-mismatch",
        "certificate-expired",
        "starttls-not-supported",
        "recipients deferred",
    ] {
        assert!(
            page.contains(want),
            "{want} missing from the status page:\n{page}"
        );
    }
    // The log: one line per attempt with queue id, domain, MX, mode, TLS result, reply.
    let log = lab.log();
    assert!(
        log.lines().any(|l| l.contains("delivery attempt")
            && l.contains("queue_id=")
            && l.contains("domain=testing.test")
            && l.contains("mx=mx.testing.test")
            && l.contains("mode=\"testing\"")
            && l.contains("unverified (certificate-expired)")
            && l.contains("delivered: mx.testing.test")),
        "{log}"
    );
    // Also for an attempt that failed before the transaction (enforce, wrong name).
    assert!(
        log.lines().any(|l| l.contains("delivery attempt")
            && l.contains("queue_id=")
            && l.contains("domain=wrongname.test")
            && l.contains("mx=mx.wrongname.test")
            && l.contains("mode=\"enforce\"")
            && l.contains("tls=failed (certificate-host-mismatch)")
            && l.contains("outcome=failed: 451 4.7.5")),
        "{log}"
    );
    screenshot(relay.admin, lab.dir.path()).await;
}

/// A PNG of the status page by headless Chromium, at `$STSRELAY_SCREENSHOT` (or in
/// `dir`). Skipped, with a note, when Chromium is not installed; the integration suite
/// installs it and runs this test.
async fn screenshot(admin: std::net::SocketAddr, dir: &Path) {
    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    else {
        eprintln!("status page screenshot skipped: chromium is not installed");
        return;
    };
    let out = std::env::var("STSRELAY_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| dir.join("status.png"));
    let profile = dir.join("chromium-profile");
    let run = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,860",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", out.display()))
        .arg(format!("http://{admin}/"))
        .kill_on_drop(true)
        .output();
    let o = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("chromium finishes")
        .unwrap();
    assert!(
        o.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let png = std::fs::read(&out).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 860));
    eprintln!("status page screenshot: {}", out.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_server_keys_and_certificate_without_dropping_sessions() {
    let lab = Lab::new(&[55]).await;
    let leaf1 = lab.ca.leaf(&["relay.sender.test"]);
    let (cert, key) = leaf1.write_pem(lab.dir.path(), "relay");
    let mut notify = NotifySocket::bind(lab.dir.path());
    let relay = lab
        .start_relay_with(
            &format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                cert.display(),
                key.display()
            ),
            |c| c,
            &[("NOTIFY_SOCKET", &notify.path.clone())],
        )
        .await;
    eventually("READY=1", &lab, async || notify.count("READY=1") == 1).await;
    let trust = stsrelay::tls::TrustStore::new(&[lab.ca.write_ca_pem(lab.dir.path())]).unwrap();
    let presented = async || {
        let mut c = connect(&relay).await;
        c.ehlo("client.test").await.unwrap();
        let (mut c, info) = c
            .starttls(trust.strict_config(), "relay.sender.test")
            .await
            .unwrap();
        let size = c.ehlo("client.test").await.unwrap().text();
        c.quit().await;
        (info.chain[0].to_vec(), size)
    };
    let (der, ehlo) = presented().await;
    assert_eq!(der, leaf1.chain[0].to_vec());
    assert!(ehlo.contains("SIZE 52428800"), "{ehlo}");

    // A session open across the reload.
    let mut open = connect(&relay).await;
    assert!(
        open.ehlo("client.test")
            .await
            .unwrap()
            .text()
            .contains("SIZE 52428800")
    );

    // New certificate in the same files; a smaller size limit; a queue change (restart).
    let leaf2 = lab.ca.leaf(&["relay.sender.test"]);
    leaf2.write_pem(lab.dir.path(), "relay");
    let text = std::fs::read_to_string(&relay.config).unwrap();
    std::fs::write(
        &relay.config,
        format!("{text}max_message_size = 12345\n[queue]\nretry_secs = [60]\n"),
    )
    .unwrap();
    kill(&relay, "HUP");
    eventually("reloaded", &lab, async || {
        lab.log().contains("configuration reloaded")
    })
    .await;
    let (der, ehlo) = presented().await;
    assert_eq!(der, leaf2.chain[0].to_vec(), "new certificate after SIGHUP");
    assert!(ehlo.contains("SIZE 12345"), "{ehlo}");
    let log = lab.log();
    assert!(
        log.lines().any(|l| l.contains("configuration reloaded")
            && l.contains("needs_restart=queue")
            && l.contains("server.tls_cert")),
        "{log}"
    );
    assert_eq!(notify.count("RELOADING=1"), 1);
    eventually("READY=1 after reload", &lab, async || {
        notify.count("READY=1") == 2
    })
    .await;

    // The session opened before the reload still works, under its old settings.
    assert!(
        open.command("MAIL FROM:<a@sender.test>")
            .await
            .unwrap()
            .is_positive()
    );
    assert!(open.command("RSET").await.unwrap().is_positive());
    assert!(
        open.ehlo("client.test")
            .await
            .unwrap()
            .text()
            .contains("SIZE 52428800")
    );

    // A broken config is refused; the running one stays.
    std::fs::write(&relay.config, format!("{text}max_message_size = \"big\"\n")).unwrap();
    kill(&relay, "HUP");
    eventually("reload refused", &lab, async || {
        lab.log().contains("configuration reload failed")
    })
    .await;
    assert!(
        lab.log().contains("max_message_size"),
        "the error names the key: {}",
        lab.log()
    );
    let (der, ehlo) = presented().await;
    assert_eq!(der, leaf2.chain[0].to_vec());
    assert!(ehlo.contains("SIZE 12345"), "{ehlo}");
    let (_, m) = get(relay.admin, "/metrics").await;
    assert_eq!(
        metric(&m, "stsrelay_config_reloads_total", &[("outcome", "ok")]),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "stsrelay_config_reloads_total",
            &[("outcome", "failed")]
        ),
        1.0
    );
    open.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_load_run_loses_nothing() {
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 60;
    let mut lab = Lab::new(&[56]).await;
    lab.policy(
        "load.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.load.test\nmax_age: 86400\n",
    );
    let sink = lab
        .tls_mx("load.test", "mx.load.test", 56, &["mx.load.test"])
        .await;
    let mut notify = NotifySocket::bind(lab.dir.path());
    let mut relay = lab
        .start_relay_with("", |c| c, &[("NOTIFY_SOCKET", &notify.path.clone())])
        .await;
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (acked, count, listen) = (acked.clone(), count.clone(), relay.listen);
        clients.push(tokio::spawn(async move {
            let Ok((mut c, _)) = stsrelay::smtp::outbound::Client::connect(
                listen,
                Duration::from_secs(5),
                Duration::from_secs(30),
            )
            .await
            else {
                return;
            };
            if c.ehlo("client.test").await.is_err() {
                return;
            }
            for i in 0..PER_CLIENT {
                let rcpt = format!("c{client}m{i}@load.test");
                let ok = async {
                    let r = c.command("MAIL FROM:<alice@sender.test>").await.ok()?;
                    r.is_positive().then_some(())?;
                    let r = c.command(&format!("RCPT TO:<{rcpt}>")).await.ok()?;
                    r.is_positive().then_some(())?;
                    (c.command("DATA").await.ok()?.code == 354).then_some(())?;
                    c.send_data(MSG.as_bytes())
                        .await
                        .ok()?
                        .is_positive()
                        .then_some(())
                }
                .await;
                if ok.is_none() {
                    return; // refused or cut off: not acknowledged
                }
                acked.lock().unwrap().insert(rcpt);
                count.fetch_add(1, Ordering::SeqCst);
            }
            c.quit().await;
        }));
    }
    eventually("some messages acknowledged", &lab, async || {
        count.load(Ordering::SeqCst) >= 40
    })
    .await;
    kill(&relay, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(90), relay.child.wait())
        .await
        .expect("the relay exits within its grace period")
        .unwrap();
    assert!(status.success(), "exit {status:?}\n{}", lab.log());
    for c in clients {
        c.await.unwrap();
    }
    let first_log = lab.log();
    assert!(
        first_log.contains("stopping: no longer accepting"),
        "{first_log}"
    );
    assert!(
        first_log.contains("stopped: all work finished"),
        "{first_log}"
    );
    assert!(notify.count("STOPPING=1") == 1, "{:?}", notify.messages());
    // Every TLS session of the run was written for TLS-RPT before the exit.
    let store = stsrelay::store::SqliteStore::open(&lab.dir.path().join("data")).unwrap();
    let recorded: u64 = stsrelay::store::ReportStore::counts(&store, None, None)
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum();
    let recorded = recorded as usize;
    assert_eq!(
        recorded,
        lab.sinks[sink].completed_handshakes(),
        "{first_log}"
    );
    let acked: BTreeSet<String> = acked.lock().unwrap().clone();
    assert!(acked.len() >= 40);
    assert!(
        acked.len() < CLIENTS * PER_CLIENT,
        "SIGTERM came during the run"
    );

    // Every acknowledged message is delivered or still in the spool…
    let delivered = |lab: &Lab| -> BTreeSet<String> {
        lab.sinks[sink]
            .messages()
            .iter()
            .flat_map(|m| m.rcpt_to.clone())
            .collect()
    };
    let relay = lab.start_relay("").await;
    let queued: BTreeSet<String> = queue_json(&relay)
        .await
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["recipients"].as_array().unwrap().clone())
        .filter(|r| r["state"] == "queued" || r["state"] == "deferred")
        .map(|r| r["address"].as_str().unwrap().to_string())
        .collect();
    let before = delivered(&lab);
    let missing: Vec<&String> = acked
        .iter()
        .filter(|a| !before.contains(*a) && !queued.contains(*a))
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}\n{first_log}");
    // …and after the restart, delivered.
    eventually("everything delivered after the restart", &lab, async || {
        acked.is_subset(&delivered(&lab))
    })
    .await;
    let copies = lab.sinks[sink].message_count();
    eprintln!(
        "acknowledged {}, delivered before the stop {}, queued at the stop {}, copies received {}",
        acked.len(),
        before.len(),
        queued.len(),
        copies
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_follow_sysexits_and_config_errors_name_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = |config: &str| {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
            .arg("--config")
            .arg(&path)
            .arg("run")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let file = dir.path().join("bad.toml").display().to_string();
    // Config errors: 78, naming the key and the file.
    let (code, err) = run("[admin]\nlisten = \"0.0.0.0:9725\"\n");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("admin.listen") && err.contains(&file), "{err}");
    let (code, err) = run("[log]\nformat = \"xml\"\n");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("format") && err.contains(&file), "{err}");
    let data = dir.path().join("data");
    let (code, err) = run(&format!(
        "[storage]\ndata_dir = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n[admin]\nenabled = false\n",
        data.display()
    ));
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("server.tls_cert") && err.contains(&file),
        "{err}"
    );
    // The spool cannot be opened (data_dir is a file): temporary, 75.
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let (code, err) = run(&format!(
        "[storage]\ndata_dir = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nenabled = false\n",
        not_a_dir.display()
    ));
    assert_eq!(code, Some(75), "{err}");
    assert!(err.contains("storage.data_dir"), "{err}");
    // The admin port is taken: temporary, 75, naming the key.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (code, err) = run(&format!(
        "[storage]\ndata_dir = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"{}\"\n",
        data.display(),
        taken.local_addr().unwrap()
    ));
    assert_eq!(code, Some(75), "{err}");
    assert!(err.contains("admin.listen"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_delivery_attempt_fields() {
    let mut lab = Lab::new(&[57]).await;
    lab.mx(
        "json.test",
        "mx.json.test",
        57,
        SinkOptions::plain("mx.json.test"),
    )
    .await;
    let relay = lab
        .start_relay_edited("", |c| format!("{c}[log]\nformat = \"json\"\n"))
        .await;
    assert!(
        submit(&relay, "alice@sender.test", &["bob@json.test"], MSG)
            .await
            .starts_with("250")
    );
    eventually("attempt logged", &lab, async || {
        lab.log().contains("delivery attempt")
    })
    .await;
    let log = lab.log();
    let line = log
        .lines()
        .find(|l| l.contains("delivery attempt"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["message"], "delivery attempt");
    assert_eq!(v["domain"], "json.test");
    assert_eq!(v["mx"], "mx.json.test");
    assert_eq!(v["mode"], "none");
    assert_eq!(v["tls"], "none");
    assert!(v["queue_id"].as_str().is_some_and(|q| !q.is_empty()), "{v}");
    assert!(
        v["outcome"]
            .as_str()
            .unwrap()
            .starts_with("delivered: mx.json.test"),
        "{v}"
    );
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "every line is JSON:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_grace_over_leaves_stuck_deliveries_queued() {
    let mut lab = Lab::new(&[58]).await;
    let mut stall = SinkOptions::plain("mx.stall.test");
    stall.stall_after_greeting = true;
    let s = lab.mx("stall.test", "mx.stall.test", 58, stall).await;
    let mut relay = lab
        .start_relay_edited("", |c| format!("{c}[queue]\nshutdown_grace_secs = 1\n"))
        .await;
    for i in 0..3 {
        let r = submit(
            &relay,
            "alice@sender.test",
            &[&format!("u{i}@stall.test")],
            MSG,
        )
        .await;
        assert!(r.starts_with("250"), "{r}");
    }
    eventually("three deliveries stuck at the MX", &lab, async || {
        lab.sinks[s].connections() == 3
    })
    .await;
    kill(&relay, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(60), relay.child.wait())
        .await
        .expect("the relay exits after its grace period")
        .unwrap();
    assert!(status.success(), "exit {status:?}\n{}", lab.log());
    let log = lab.log();
    assert!(
        log.contains("stopped: grace period over; unfinished deliveries stay queued"),
        "{log}"
    );
    assert!(log.contains("deliveries=3"), "{log}");
    // Nothing was recorded for the cut-off attempts: all three are still due.
    let q = queue_json(&relay).await;
    let states: Vec<&str> = q
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["recipients"].as_array().unwrap())
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "queued", "queued"], "{q}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_sessions_with_421_and_lets_a_message_finish() {
    let mut lab = Lab::new(&[59]).await;
    let s = lab
        .mx(
            "fin.test",
            "mx.fin.test",
            59,
            SinkOptions::plain("mx.fin.test"),
        )
        .await;
    let mut relay = lab.start_relay("").await;
    let mut idle = connect(&relay).await;
    idle.ehlo("client.test").await.unwrap();
    let mut sending = connect(&relay).await;
    sending.ehlo("client.test").await.unwrap();
    assert!(
        sending
            .command("MAIL FROM:<alice@sender.test>")
            .await
            .unwrap()
            .is_positive()
    );
    assert!(
        sending
            .command("RCPT TO:<bob@fin.test>")
            .await
            .unwrap()
            .is_positive()
    );
    assert_eq!(sending.command("DATA").await.unwrap().code, 354);
    kill(&relay, "TERM");
    eventually("shutdown started", &lab, async || {
        lab.log().contains("stopping: no longer accepting")
    })
    .await;
    // The idle client is told at once, unasked.
    let r = idle.read_reply().await.unwrap();
    assert_eq!(r.code, 421, "{}", r.text());
    assert!(r.text().contains("4.3.2"), "{}", r.text());
    // The message being sent is taken and acknowledged, then the session is closed.
    let r = sending.send_data(MSG.as_bytes()).await.unwrap();
    assert_eq!(r.code, 250, "{}", r.text());
    let r = sending.read_reply().await.unwrap();
    assert_eq!(r.code, 421, "{}", r.text());
    let status = tokio::time::timeout(Duration::from_secs(60), relay.child.wait())
        .await
        .expect("the relay exits")
        .unwrap();
    assert!(status.success(), "{}", lab.log());
    // Acknowledged, so delivered before the exit or queued for the next start.
    let queued = queue_json(&relay).await.as_array().unwrap().len();
    assert_eq!(lab.sinks[s].message_count() + queued, 1, "{}", lab.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_spool_cannot_store_and_recovers() {
    let mut lab = Lab::new(&[60]).await;
    lab.mx(
        "ready.test",
        "mx.ready.test",
        60,
        SinkOptions::plain("mx.ready.test"),
    )
    .await;
    let relay = lab.start_relay("").await;
    assert_eq!(get(relay.admin, "/readyz").await.0, 200);
    // incoming/ replaced by a file: bodies cannot be created (root ignores modes).
    let incoming = lab.dir.path().join("data/spool/incoming");
    std::fs::remove_dir(&incoming).unwrap();
    std::fs::write(&incoming, b"not a directory").unwrap();
    let r = submit(&relay, "alice@sender.test", &["a@ready.test"], MSG).await;
    assert!(r.starts_with("451"), "{r}");
    let (code, body) = get(relay.admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("spool failing"), "{body}");
    let (_, page) = get(relay.admin, "/").await;
    assert!(page.contains("Not ready"), "{page}");
    // Repaired: the next message is stored and the relay is ready again.
    std::fs::remove_file(&incoming).unwrap();
    std::fs::create_dir(&incoming).unwrap();
    let r = submit(&relay, "alice@sender.test", &["b@ready.test"], MSG).await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(
        get(relay.admin, "/readyz").await,
        (200, "ready\n".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_without_waiting_for_the_grace_period() {
    let mut lab = Lab::new(&[61]).await;
    let mut stall = SinkOptions::plain("mx.stall2.test");
    stall.stall_after_greeting = true;
    let s = lab.mx("stall2.test", "mx.stall2.test", 61, stall).await;
    let mut relay = lab
        .start_relay_edited("", |c| format!("{c}[queue]\nshutdown_grace_secs = 3600\n"))
        .await;
    assert!(
        submit(&relay, "alice@sender.test", &["u@stall2.test"], MSG)
            .await
            .starts_with("250")
    );
    eventually("delivery stuck at the MX", &lab, async || {
        lab.sinks[s].connections() == 1
    })
    .await;
    kill(&relay, "TERM");
    eventually("draining", &lab, async || {
        lab.log().contains("stopping: no longer accepting")
    })
    .await;
    kill(&relay, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(60), relay.child.wait())
        .await
        .expect("the second SIGTERM ends the wait")
        .unwrap();
    assert!(status.success(), "{}", lab.log());
    assert!(
        lab.log().contains("stopped at once (second stop signal)"),
        "{}",
        lab.log()
    );
    assert_eq!(queue_json(&relay).await.as_array().unwrap().len(), 1);
}
