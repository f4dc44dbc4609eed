//! TLS-RPT end to end through the real binary: mail goes through `stsrelay run` to MX
//! sinks with good and bad certificates; `stsrelay report send` (a second process) then
//! makes the day's reports, which the running relay delivers — by DKIM-signed e-mail
//! through its own spool and by HTTPS POST, retrying a 500 — and the ledger keeps each
//! (domain, day, rua) to one report.

mod common;

use common::https::Behaviour;
use common::relay::{Lab, Relay, eventually, queue_json, submit};
use common::smtp::SinkOptions;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters};
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use stsrelay::store::ReportStore;

const MSG: &str = "Subject: hello\r\nFrom: alice@sender.test\r\n\r\nHello.\r\n";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dkim")
        .join(name)
}

async fn cli(relay: &Relay, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
        .arg("--config")
        .arg(&relay.config)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn counts(lab: &Lab, domain: &str) -> Vec<(stsrelay::tlsrpt::CounterKey, u64)> {
    let store = stsrelay::store::SqliteStore::open(&lab.dir.path().join("data")).unwrap();
    store.counts(None, Some(domain.into())).await.unwrap()
}

/// The report JSON inside a report e-mail (base64 attachment, gzip).
fn report_of(mail: &[u8]) -> serde_json::Value {
    let msg = mail_parser::MessageParser::default().parse(mail).unwrap();
    let part = msg
        .attachments()
        .find(|p| {
            mail_parser::MimeHeaders::content_type(*p)
                .is_some_and(|c| c.ctype() == "application" && c.subtype() == Some("tlsrpt+gzip"))
        })
        .expect("an application/tlsrpt+gzip part");
    gunzip_json(part.contents())
}

fn gunzip_json(gz: &[u8]) -> serde_json::Value {
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
    let mut json = String::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_string(&mut json)
        .unwrap();
    serde_json::from_str(&json).unwrap()
}

/// A header field's value, unfolded (RFC 5322 §2.2.3: CRLF removed, WSP kept).
fn header(mail: &str, name: &str) -> Option<String> {
    let head = mail.split("\r\n\r\n").next().unwrap_or_default();
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", "\t");
    unfolded
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
}

/// DKIM verification with mail-auth against the key published in the test DNS.
async fn dkim(lab: &Lab, mail: &[u8]) -> Vec<DkimResult> {
    let addr = lab.dns.addr();
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    let cfg = ResolverConfig::from_parts(
        None,
        vec![],
        vec![NameServerConfig::new(addr.ip(), true, vec![udp, tcp])],
    );
    let auth = MessageAuthenticator::new(cfg, ResolverOpts::default()).unwrap();
    let msg = AuthenticatedMessage::parse(mail).unwrap();
    auth.verify_dkim(Parameters::new(&msg))
        .await
        .iter()
        .map(|o| o.result().clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_go_out_by_signed_email_and_https_once_per_destination() {
    let mut lab = Lab::new(&[60, 61, 62]).await;
    // good.test: enforce, a valid MX; asks for reports by e-mail and HTTPS.
    lab.policy(
        "good.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.good.test\nmax_age: 86400\n",
    );
    let good = lab
        .tls_mx("good.test", "mx.good.test", 60, &["mx.good.test"])
        .await;
    let https = format!(
        "https://reports.rua.test:{}/v1/tlsrpt",
        lab.host.addr().port()
    );
    lab.dns.set_txt(
        "_smtp._tls.good.test",
        &[&[&format!("v=TLSRPTv1; rua=mailto:tlsrpt@rua.test,{https}")]],
    );
    // testing.test: testing mode, an MX whose certificate is for another name.
    lab.policy(
        "testing.test",
        "1",
        "version: STSv1\nmode: testing\nmx: mx.testing.test\nmax_age: 86400\n",
    );
    let testing = lab
        .tls_mx("testing.test", "mx.testing.test", 61, &["other.test"])
        .await;
    lab.dns.set_txt(
        "_smtp._tls.testing.test",
        &[&["v=TLSRPTv1;", "rua=mailto:tlsrpt@rua.test"]],
    );
    // rua.test: its own enforce policy cannot be met (no STARTTLS), yet reports must
    // reach it (TLS-Required: No, R85) and those sessions are not counted (R67).
    lab.policy(
        "rua.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.rua.test\nmax_age: 86400\n",
    );
    // STARTTLS with a certificate for another name: the enforce policy fails, and a
    // session that were counted would show up under rua.test.
    let rua = lab
        .tls_mx("rua.test", "mx.rua.test", 62, &["not-mx.rua.test"])
        .await;
    lab.dns.set_txt(
        "_smtp._tls.rua.test",
        &[&["v=TLSRPTv1; rua=mailto:tlsrpt@rua.test"]],
    );
    // The HTTPS endpoint fails first.
    lab.dns.add_a("reports.rua.test", Ipv4Addr::LOCALHOST);
    lab.host
        .set_cert("reports.rua.test", &lab.ca.leaf(&["reports.rua.test"]));
    lab.host
        .serve("reports.rua.test", Behaviour::status(500, "busy"));
    // The DKIM key record (s=email:tlsrpt).
    let txt = std::fs::read_to_string(fixture("ed25519-pkcs8.txt")).unwrap();
    lab.dns
        .set_txt("tlsrpt._domainkey.sender.test", &[&[txt.trim()]]);

    let relay = lab
        .start_relay(&format!(
            "[tlsrpt]\nenabled = true\norganization_name = \"Sender Org\"\n\
             contact_info = \"tlsrpt@sender.test\"\ndkim_key_file = \"{}\"\n\
             https_retry_secs = 1\nsend_delay_max_secs = 0\nallow_private_rua = true\n",
            fixture("ed25519-pkcs8.pem").display()
        ))
        .await;
    submit(&relay, "alice@sender.test", &["bob@good.test"], MSG).await;
    submit(&relay, "alice@sender.test", &["carol@testing.test"], MSG).await;
    eventually("both delivered", &lab, async || {
        lab.sinks[good].messages().len() == 1 && lab.sinks[testing].messages().len() == 1
    })
    .await;
    eventually("sessions counted", &lab, async || {
        !counts(&lab, "good.test").await.is_empty()
            && !counts(&lab, "testing.test").await.is_empty()
    })
    .await;

    // Preview: the JSON that would be sent (for the UTC day the sessions fell on,
    // which is today unless the test ran across midnight).
    let day = counts(&lab, "good.test").await[0].0.day.to_string();
    let (ok, out, err) = cli(
        &relay,
        &[
            "report",
            "preview",
            "--day",
            &day,
            "--domain",
            "testing.test",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let preview: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(preview.as_array().map(Vec::len), Some(1), "{preview}");
    assert_eq!(
        preview[0]["policies"][0]["policy"]["policy-domain"],
        "testing.test"
    );
    assert!(err.contains("mailto:tlsrpt@rua.test"), "{err}");

    // A second process makes today's reports; the running relay delivers them.
    let (ok, out, err) = cli(&relay, &["report", "send", "--day", &day]).await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("good.test: report"), "{out}");
    eventually("two report e-mails at rua.test", &lab, async || {
        lab.sinks[rua].messages().len() == 2
    })
    .await;
    let mails = lab.sinks[rua].messages();
    let mut reports = std::collections::HashMap::new();
    for m in &mails {
        assert_eq!(
            m.mail_from, "tlsrpt-noreply@sender.test",
            "non-null sender (R89)"
        );
        assert_eq!(m.rcpt_to, vec!["tlsrpt@rua.test".to_string()]);
        let text = String::from_utf8_lossy(&m.data).into_owned();
        let domain = header(&text, "TLS-Report-Domain").unwrap();
        assert_eq!(
            header(&text, "TLS-Report-Submitter").as_deref(),
            Some("sender.test")
        );
        assert_eq!(header(&text, "TLS-Required").as_deref(), Some("No"));
        assert!(
            header(&text, "Content-Type")
                .unwrap()
                .contains("multipart/report")
        );
        let json = report_of(&m.data);
        assert_eq!(
            json["policies"][0]["policy"]["policy-domain"],
            domain.as_str()
        );
        let id = json["report-id"].as_str().unwrap().to_string();
        assert_eq!(
            header(&text, "Subject").unwrap(),
            format!("Report Domain: {domain} Submitter: sender.test Report-ID: <{id}@sender.test>")
        );
        let results = dkim(&lab, &m.data).await;
        assert_eq!(results, vec![DkimResult::Pass], "{domain}: {results:?}");
        reports.insert(domain, json);
    }
    let good_report = &reports["good.test"];
    let p = &good_report["policies"][0];
    assert_eq!(p["policy"]["policy-type"], "sts");
    assert_eq!(p["policy"]["mx-host"], serde_json::json!(["mx.good.test"]));
    assert_eq!(p["summary"]["total-successful-session-count"], 1);
    assert_eq!(p["summary"]["total-failure-session-count"], 0);
    let t = &reports["testing.test"]["policies"][0];
    assert_eq!(t["summary"]["total-successful-session-count"], 0);
    assert_eq!(
        t["summary"]["total-failure-session-count"], 1,
        "testing-mode delivery over a failed check"
    );
    assert_eq!(
        t["failure-details"][0]["result-type"],
        "certificate-host-mismatch"
    );
    assert_eq!(
        t["failure-details"][0]["receiving-mx-hostname"],
        "mx.testing.test"
    );
    assert_eq!(t["failure-details"][0]["receiving-ip"], "127.0.0.61");
    assert_eq!(good_report["organization-name"], "Sender Org");
    assert_eq!(good_report["contact-info"], "tlsrpt@sender.test");

    // HTTPS: the 500 is retried by the relay; once the endpoint answers 2xx it stops.
    let posts = || {
        lab.host
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .collect::<Vec<_>>()
    };
    eventually("a first POST", &lab, async || !posts().is_empty()).await;
    lab.host.serve(
        "reports.rua.test",
        Behaviour::Respond {
            status: 201,
            headers: vec![],
            body: vec![],
        },
    );
    eventually("the HTTPS report accepted", &lab, async || {
        stsrelay::store::SqliteStore::open(&lab.dir.path().join("data"))
            .unwrap()
            .ledger_list(None)
            .await
            .unwrap()
            .iter()
            .any(|r| r.rua.starts_with("https:") && r.state == stsrelay::tlsrpt::LedgerState::Sent)
    })
    .await;
    let seen = posts();
    assert!(seen.len() >= 2, "a retry after the 500");
    for r in &seen {
        assert_eq!(r.path, "/v1/tlsrpt");
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("content-type")
                    && v == "application/tlsrpt+gzip")
        );
        let json = gunzip_json(&r.body);
        assert_eq!(
            json["report-id"], good_report["report-id"],
            "same report, same id on retry"
        );
    }
    let after = seen.len();

    // The report deliveries to rua.test were not counted (R67), and nothing was
    // delivered there but the reports although its policy could not be met.
    assert!(
        counts(&lab, "rua.test").await.is_empty(),
        "{:?}",
        counts(&lab, "rua.test").await
    );

    // The ledger: asking again sends nothing new.
    let (ok, out, _) = cli(&relay, &["report", "send", "--day", &day]).await;
    assert!(ok);
    assert!(out.contains("already in the ledger"), "{out}");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(lab.sinks[rua].messages().len(), 2);
    assert_eq!(posts().len(), after);
    assert!(queue_json(&relay).await.as_array().unwrap().is_empty());

    // Operators see it: the relay's own HTTPS retry in /metrics, and the latest report
    // per domain and destination on the status page.
    let metrics = admin_get(&relay, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("stsrelay_tlsrpt_reports_total")
                && l.contains("transport=\"https\"")
                && l.contains("outcome=\"sent\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    let page = admin_get(&relay, "/").await;
    assert!(page.contains("TLS-RPT reports"), "{page}");
    assert!(
        page.contains(&format!(
            "https://reports.rua.test:{}/v1/tlsrpt",
            lab.host.addr().port()
        )),
        "{page}"
    );
    assert!(page.contains("mailto:tlsrpt@rua.test"), "{page}");
}

async fn admin_get(relay: &Relay, path: &str) -> String {
    common::relay::http_get(relay.admin, path).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_commands_refuse_bad_input() {
    let lab = Lab::new(&[63]).await;
    let relay = lab.start_relay("").await;
    let (ok, _, err) = cli(&relay, &["report", "send", "--day", "2026-01-01"]).await;
    assert!(!ok);
    assert!(err.contains("tlsrpt.enabled"), "{err}");
    let (ok, _, err) = cli(&relay, &["report", "preview", "--day", "2026-02-30"]).await;
    assert!(!ok);
    assert!(err.contains("YYYY-MM-DD"), "{err}");
    let (ok, _, err) = cli(&relay, &["report", "preview", "--day", "2999-01-01"]).await;
    assert!(!ok);
    assert!(err.contains("future"), "{err}");
    // A DKIM key that does not load stops the relay with a config error naming the key.
    let bad = lab.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[storage]\ndata_dir = \"{}\"\n[tlsrpt]\nenabled = true\norganization_name = \"X\"\n\
             contact_info = \"r@sender.test\"\ndkim_key_file = \"{}\"\n",
            lab.dir.path().join("d2").display(),
            fixture("ec-p256-pkcs8.pem").display()
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stsrelay"))
        .arg("--config")
        .arg(&bad)
        .arg("run")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tlsrpt.dkim_key_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_no_overrides_an_unmet_enforce_policy_only_for_that_message() {
    let mut lab = Lab::new(&[64]).await;
    lab.policy(
        "strict.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.strict.test\nmax_age: 86400\n",
    );
    // The MX offers no STARTTLS: enforce defers, unless the message says TLS-Required: No.
    let s = lab
        .mx(
            "strict.test",
            "mx.strict.test",
            64,
            SinkOptions::plain("mx.strict.test"),
        )
        .await;
    let relay = lab.start_relay("").await;
    submit(&relay, "alice@sender.test", &["bob@strict.test"], MSG).await;
    submit(
        &relay,
        "alice@sender.test",
        &["carol@strict.test"],
        "Subject: urgent\r\nTLS-Required:\r\n No\r\n\r\nPlease deliver anyway.\r\n",
    )
    .await;
    eventually("the TLS-Required: No message delivered", &lab, async || {
        lab.sinks[s].messages().len() == 1
    })
    .await;
    let m = &lab.sinks[s].messages()[0];
    assert_eq!(m.rcpt_to, vec!["carol@strict.test".to_string()]);
    assert!(!m.tls);
    // The other message is held back by the policy.
    eventually("the other message deferred", &lab, async || {
        let q = queue_json(&relay).await;
        let q = q.as_array().unwrap();
        q.len() == 1
            && q[0]["recipients"][0]["address"] == "bob@strict.test"
            && q[0]["recipients"][0]["state"] == "deferred"
    })
    .await;
    assert_eq!(lab.sinks[s].messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_policy_fetch_is_counted_with_its_result_type() {
    let mut lab = Lab::new(&[65]).await;
    // A TXT record, but the policy host answers 404: no policy applies (nothing cached),
    // the mail goes out opportunistically, and the fetch failure is counted (R55).
    lab.policy(
        "nofetch.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.nofetch.test\nmax_age: 86400\n",
    );
    lab.host
        .serve("mta-sts.nofetch.test", Behaviour::status(404, "gone"));
    let s = lab
        .tls_mx("nofetch.test", "mx.nofetch.test", 65, &["mx.nofetch.test"])
        .await;
    let relay = lab.start_relay("").await;
    submit(&relay, "alice@sender.test", &["bob@nofetch.test"], MSG).await;
    eventually("delivered", &lab, async || {
        lab.sinks[s].messages().len() == 1
    })
    .await;
    eventually("the fetch failure counted", &lab, async || {
        counts(&lab, "nofetch.test").await.iter().any(|(k, n)| {
            *n == 1
                && k.policy.policy_type == stsrelay::tlsrpt::PolicyType::Sts
                && k.policy.policy_strings.is_empty()
                && k.failure.as_ref().is_some_and(|f| {
                    f.result_type == stsrelay::ResultType::StsPolicyFetchError
                        && f.receiving_mx_hostname.is_none()
                        && f.failure_reason_code
                            .as_deref()
                            .is_some_and(|c| c.contains("404"))
                })
        })
    })
    .await;
    // The TLS session itself counts as a success under no policy (R69).
    eventually("the session counted under no policy", &lab, async || {
        counts(&lab, "nofetch.test").await.iter().any(|(k, _)| {
            k.policy.policy_type == stsrelay::tlsrpt::PolicyType::NoPolicyFound
                && k.failure.is_none()
        })
    })
    .await;
}
