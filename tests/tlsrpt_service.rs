//! The report service against real peers (in-process DNS and HTTPS servers, SQLite
//! store, spool) with a manual clock: the daily run waits for the UTC day to end, HTTPS
//! retries back off and stop after `give_up_secs`, and restarts keep counters and ledger.

mod common;

use common::dns::TestDns;
use common::https::{Behaviour, PolicyHost};
use common::pki::TestCa;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;
use stsrelay::Config;
use stsrelay::clock::ManualClock;
use stsrelay::queue::spool::Spool;
use stsrelay::store::{ReportStore, SqliteStore};
use stsrelay::tls::TrustStore;
use stsrelay::tlsrpt::{Day, LedgerState, PolicyType, ReportService, SessionResult, count};

struct Setup {
    dns: TestDns,
    host: PolicyHost,
    dir: tempfile::TempDir,
    cfg: Config,
}

impl Setup {
    async fn new(extra: &str) -> Setup {
        let dns = TestDns::start().await;
        let host = PolicyHost::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
        let ca = TestCa::new("tlsrpt service test CA");
        let dir = tempfile::tempdir().unwrap();
        dns.add_a("reports.example.test", Ipv4Addr::LOCALHOST);
        host.set_cert("reports.example.test", &ca.leaf(&["reports.example.test"]));
        dns.set_txt(
            "_smtp._tls.example.test",
            &[&[&format!(
                "v=TLSRPTv1; rua=https://reports.example.test:{}/r",
                host.addr().port()
            )]],
        );
        let cfg = Config::from_toml(&format!(
            "[dns]\nnameservers = [\"{}\"]\n[tls]\nextra_roots = [\"{}\"]\n[storage]\ndata_dir = \"{}\"\n\
             [tlsrpt]\nenabled = true\norganization_name = \"Org\"\ncontact_info = \"r@sender.test\"\n{extra}",
            dns.addr(),
            ca.write_ca_pem(dir.path()).display(),
            dir.path().join("data").display()
        ))
        .unwrap();
        Setup {
            dns,
            host,
            dir,
            cfg,
        }
    }

    fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.cfg.storage.data_dir).unwrap()
    }

    fn service(&self, clock: &ManualClock) -> ReportService {
        let resolver = stsrelay::dns::Resolver::from_config(&self.cfg).unwrap();
        let trust = TrustStore::from_config(&self.cfg).unwrap();
        let spool = Spool::open(&self.cfg.storage.data_dir).unwrap();
        ReportService::new(&self.cfg, Arc::new(self.store()), resolver, &trust, spool)
            .unwrap()
            .clock(Arc::new(clock.clone()))
    }

    /// The report endpoint answers 200.
    fn accept_posts(&self) {
        self.host.serve(
            "reports.example.test",
            Behaviour::Respond {
                status: 200,
                headers: vec![],
                body: vec![],
            },
        );
    }

    fn posts(&self) -> usize {
        self.host
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count()
    }
}

fn session(at: i64) -> SessionResult {
    SessionResult {
        at,
        policy_domain: "example.test".into(),
        policy_type: PolicyType::NoPolicyFound,
        policy_strings: vec![],
        mx_host_patterns: vec![],
        receiving_mx_hostname: "mx.example.test".into(),
        receiving_ip: None,
        receiving_mx_helo: None,
        sending_ip: None,
        failure: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_run_waits_for_the_day_to_end_and_sends_once() {
    let s = Setup::new("send_delay_max_secs = 0\nallow_private_rua = true\n").await;
    s.accept_posts();
    let day: Day = "2026-11-27".parse().unwrap();
    s.store()
        .add_counts(count(&[session(day.start() + 5), session(day.end() - 5)]))
        .await
        .unwrap();
    // Ten seconds before midnight UTC: nothing is made.
    let clock = ManualClock::new(day.end() - 10);
    let task = tokio::spawn(Arc::new(s.service(&clock)).run());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(s.store().ledger_list(None).await.unwrap().is_empty());
    assert!(!s.store().day_done(day).await.unwrap());
    // Past midnight (and the 30 s the last sessions get to be written): the day's
    // report is made and posted, once.
    clock.advance(50);
    let mut sent = false;
    for _ in 0..100 {
        let rows = s.store().ledger_list(Some(day)).await.unwrap();
        if rows.iter().any(|r| r.state == LedgerState::Sent) {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sent, "the report of {day} was not sent");
    assert!(s.store().day_done(day).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(s.posts(), 1);
    task.abort();
    // A restart (new service, same data) sends nothing again.
    let again = s.service(&clock);
    assert_eq!(again.generate(day, None).await.unwrap()[0].new_rows, 0);
    assert!(again.deliver_due().await.unwrap().is_empty());
    assert_eq!(s.posts(), 1);
    let _ = &s.dns;
    let _ = &s.dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_retries_back_off_and_stop_after_a_day() {
    let s = Setup::new("https_retry_secs = 300\ngive_up_secs = 86400\nallow_private_rua = true\n")
        .await;
    s.host
        .serve("reports.example.test", Behaviour::status(503, "down"));
    let day: Day = "2026-11-27".parse().unwrap();
    s.store()
        .add_counts(count(&[session(day.start() + 5)]))
        .await
        .unwrap();
    let clock = ManualClock::new(day.end() + 3600);
    let svc = s.service(&clock);
    let first = clock_now(&clock);
    assert_eq!(svc.generate(day, None).await.unwrap()[0].new_rows, 1);
    let mut attempts = Vec::new();
    // Bounded: at most 40 passes, each moving the clock to the next retry time.
    for _ in 0..40 {
        let rows = svc.deliver_due().await.unwrap();
        let Some(row) = rows.first() else { break };
        attempts.push(clock_now(&clock) - first);
        if row.state == LedgerState::Dropped {
            break;
        }
        assert_eq!(row.state, LedgerState::Pending);
        clock.advance(row.next_try - clock_now(&clock));
    }
    let rows = s.store().ledger_list(Some(day)).await.unwrap();
    assert_eq!(rows[0].state, LedgerState::Dropped);
    assert!(
        rows[0]
            .last_result
            .as_deref()
            .unwrap_or_default()
            .contains("503")
    );
    // Growing intervals, all within a day of the first attempt, then no more.
    let gaps: Vec<i64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] > g[0]), "{gaps:?}");
    assert_eq!(gaps[0], 300);
    assert!(*attempts.last().unwrap() <= 86_400, "{attempts:?}");
    assert_eq!(s.posts(), attempts.len());
    clock.advance(7 * 86_400);
    assert!(svc.deliver_due().await.unwrap().is_empty());
    assert_eq!(s.posts(), attempts.len());
}

fn clock_now(c: &ManualClock) -> i64 {
    stsrelay::clock::Clock::now(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_to_internal_addresses_are_refused_by_default() {
    // reports.example.test resolves to 127.0.0.1: without tlsrpt.allow_private_rua the
    // relay does not connect (the name may move to a public address: it is retried).
    let s = Setup::new("").await;
    s.accept_posts();
    let day: Day = "2026-11-27".parse().unwrap();
    s.store()
        .add_counts(count(&[session(day.start() + 5)]))
        .await
        .unwrap();
    let clock = ManualClock::new(day.end() + 3600);
    let svc = s.service(&clock);
    assert_eq!(svc.generate(day, None).await.unwrap()[0].new_rows, 1);
    let rows = svc.deliver_due().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].state,
        LedgerState::Pending,
        "{:?}",
        rows[0].last_result
    );
    assert!(
        rows[0]
            .last_result
            .as_deref()
            .unwrap_or_default()
            .contains("allow_private_rua"),
        "{:?}",
        rows[0].last_result
    );
    assert_eq!(s.posts(), 0);
}
