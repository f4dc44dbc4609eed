//! The policy engine against real in-process peers: a DNS server, an HTTPS policy host
//! with a test CA, and a persistent SQLite store. Checklist items are cited per test.

mod common;

use common::dns::TestDns;
use common::https::{Behaviour, PolicyHost};
use common::pki::{TestCa, self_signed};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use stsrelay::ResultType;
use stsrelay::clock::{Clock, ManualClock};
use stsrelay::dns::Resolver;
use stsrelay::store::SqliteStore;
use stsrelay::sts::{Engine, EngineOptions, FetchOptions, HttpsFetcher, Mode, MxDecision, Source};
use stsrelay::tls::TrustStore;

const ENFORCE: &str = "version: STSv1\nmode: enforce\nmx: *.example.test\nmax_age: 86400\n";

struct World {
    dns: TestDns,
    host: PolicyHost,
    ca: TestCa,
    dir: tempfile::TempDir,
    clock: ManualClock,
    total_timeout: Duration,
}

impl World {
    async fn new() -> World {
        let dns = TestDns::start().await;
        let host = PolicyHost::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
        let ca = TestCa::new("stsrelay engine test CA");
        World {
            dns,
            host,
            ca,
            dir: tempfile::tempdir().unwrap(),
            clock: ManualClock::new(1_800_000_000),
            total_timeout: Duration::from_secs(5),
        }
    }

    /// DNS for the policy host, a good certificate, and TXT `id`.
    fn publish(&self, domain: &str, id: &str, body: &str) {
        let ph = format!("mta-sts.{domain}");
        self.dns.add_a(&ph, Ipv4Addr::LOCALHOST);
        self.host.set_cert(&ph, &self.ca.leaf(&[&ph]));
        self.host.serve(&ph, Behaviour::policy(body));
        self.set_id(domain, id);
    }

    fn set_id(&self, domain: &str, id: &str) {
        let rec = format!("v=STSv1; id={id}");
        self.dns.set_txt(&format!("_mta-sts.{domain}"), &[&[&rec]]);
    }

    fn gets(&self, domain: &str) -> usize {
        self.host.count(&format!("mta-sts.{domain}"))
    }

    /// A new engine on the same data dir (a restart).
    fn engine(&self) -> Engine {
        let resolver = Resolver::new(&[self.dns.addr()], Duration::from_secs(2)).unwrap();
        let ca_path = self.ca.write_ca_pem(self.dir.path());
        let trust = TrustStore::new(&[ca_path]).unwrap();
        let fetcher = HttpsFetcher::new(
            resolver.clone(),
            &trust,
            FetchOptions {
                connect_timeout: Duration::from_secs(2),
                total_timeout: self.total_timeout,
                port: self.host.addr().port(),
            },
        )
        .unwrap();
        let store = SqliteStore::open(&self.dir.path().join("data")).unwrap();
        Engine::builder(Arc::new(resolver), Arc::new(fetcher), Arc::new(store))
            .clock(Arc::new(self.clock.clone()))
            .options(EngineOptions::default())
            .build()
    }
}

#[tokio::test]
async fn r2_r9_r11_valid_policy_is_fetched_and_cached() {
    let w = World::new().await;
    w.publish("example.test", "1", ENFORCE);
    let e = w.engine();
    let l = e.policy("example.test").await.unwrap();
    assert_eq!(l.source, Source::Fetched);
    assert_eq!(l.mode(), Some(Mode::Enforce));
    assert_eq!(
        l.check_mx("mx1.example.test"),
        MxDecision::Allowed(Mode::Enforce)
    );
    assert_eq!(
        l.check_mx("mx1.evil.test"),
        MxDecision::NotInPolicy(Mode::Enforce)
    );
    let reqs = w.host.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].path, "/.well-known/mta-sts.txt");
    assert_eq!(reqs[0].sni.as_deref(), Some("mta-sts.example.test"));
    assert!(
        reqs[0]
            .host
            .as_deref()
            .unwrap()
            .starts_with("mta-sts.example.test")
    );
    // R15: no conditional requests.
    assert!(
        !reqs[0]
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("if-none-match")
                || k.eq_ignore_ascii_case("if-modified-since"))
    );
    // R31: the same id is served from the cache: no second GET.
    for _ in 0..20 {
        let again = e.policy("example.test").await.unwrap();
        assert_eq!(again.source, Source::Cache);
    }
    assert_eq!(w.gets("example.test"), 1);
    // R38: case and trailing dot share the entry.
    assert_eq!(
        e.policy("EXAMPLE.test.").await.unwrap().source,
        Source::Cache
    );
    assert_eq!(w.gets("example.test"), 1);
}

#[tokio::test]
async fn r1_no_parent_zone_fallback_and_no_literal_lookup() {
    let w = World::new().await;
    w.publish("example.test", "1", ENFORCE);
    let e = w.engine();
    let l = e.policy("sub.example.test").await.unwrap();
    assert!(l.policy.is_none());
    assert_eq!(w.gets("example.test"), 0);
    assert_eq!(
        w.dns
            .count_queries("_mta-sts.example.test", hickory_proto::rr::RecordType::TXT),
        0
    );
    assert!(e.policy("[192.0.2.10]").await.is_err());
}

#[tokio::test]
async fn r3_cname_is_followed_but_policy_host_stays() {
    let w = World::new().await;
    w.publish(
        "user.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.user.test\nmax_age: 600\n",
    );
    w.dns
        .remove_type("_mta-sts.user.test", hickory_proto::rr::RecordType::TXT);
    w.dns
        .set_cname("_mta-sts.user.test", "_mta-sts.provider.test");
    w.dns
        .set_txt("_mta-sts.provider.test", &[&["v=STSv1; id=7"]]);
    let e = w.engine();
    let l = e.policy("user.test").await.unwrap();
    assert_eq!(l.policy.as_ref().unwrap().id, "7");
    assert_eq!(w.gets("user.test"), 1);
    assert_eq!(w.gets("provider.test"), 0);
}

#[tokio::test]
async fn r4_multi_string_txt_is_joined() {
    let w = World::new().await;
    w.publish("example.test", "x", ENFORCE);
    w.dns
        .set_txt("_mta-sts.example.test", &[&["v=STSv1; id=ab", "c123"]]);
    let l = w.engine().policy("example.test").await.unwrap();
    assert_eq!(l.policy.unwrap().id, "abc123");
}

#[tokio::test]
async fn r5_multiple_or_invalid_records_mean_no_fetch() {
    let w = World::new().await;
    w.publish("example.test", "a", ENFORCE);
    w.dns.set_txt(
        "_mta-sts.example.test",
        &[&["v=STSv1; id=a"], &["v=STSv1; id=b"]],
    );
    let e = w.engine();
    let l = e.policy("example.test").await.unwrap();
    assert!(l.policy.is_none());
    assert!(l.record_error.is_some());
    w.dns
        .set_txt("_mta-sts.example.test", &[&["v=STSv1; id=2024-01-01"]]);
    assert!(e.policy("example.test").await.unwrap().policy.is_none());
    assert_eq!(w.gets("example.test"), 0);
}

async fn fetch_error_of(w: &World, domain: &str) -> stsrelay::sts::FetchError {
    let l = w.engine().policy(domain).await.unwrap();
    assert!(l.policy.is_none(), "no policy may result");
    l.fetch_error.expect("a classified fetch error")
}

#[tokio::test]
async fn r13_r14_r16_r17_bad_answers_are_classified() {
    let w = World::new().await;
    let cases: Vec<(&str, Behaviour, ResultType)> = vec![
        (
            "notfound.test",
            Behaviour::status(404, "no"),
            ResultType::StsPolicyFetchError,
        ),
        (
            "error.test",
            Behaviour::status(500, ENFORCE),
            ResultType::StsPolicyFetchError,
        ),
        (
            "nocontent.test",
            Behaviour::status(204, ""),
            ResultType::StsPolicyFetchError,
        ),
        (
            "redirect.test",
            Behaviour::redirect(301, "https://mta-sts.redirect.test/other"),
            ResultType::StsPolicyFetchError,
        ),
        (
            "html.test",
            Behaviour::Respond {
                status: 200,
                headers: vec![("Content-Type".into(), "text/html".into())],
                body: ENFORCE.as_bytes().to_vec(),
            },
            ResultType::StsPolicyInvalid,
        ),
        (
            "big.test",
            Behaviour::policy(&format!("{ENFORCE}{}", "x: y\n".repeat(65_537 / 5 + 1))),
            ResultType::StsPolicyFetchError,
        ),
        (
            "invalid.test",
            Behaviour::policy("version: STSv1\nmode: report\nmx: a.test\nmax_age: 5\n"),
            ResultType::StsPolicyInvalid,
        ),
    ];
    for (domain, behaviour, expected) in cases {
        w.publish(domain, "1", ENFORCE);
        w.host.serve(&format!("mta-sts.{domain}"), behaviour);
        let err = fetch_error_of(&w, domain).await;
        assert_eq!(err.result_type, expected, "{domain}: {err}");
    }
    // R14: the redirect was not followed.
    assert_eq!(
        w.host
            .requests()
            .iter()
            .filter(|r| r.path == "/other")
            .count(),
        0
    );
    assert_eq!(w.gets("redirect.test"), 1);
}

#[tokio::test]
async fn r17_exactly_64k_is_accepted() {
    let w = World::new().await;
    let mut body = ENFORCE.to_string();
    while body.len() + 7 <= 65_536 {
        body.push_str("x: yyy\n");
    }
    while body.len() < 65_536 {
        body.push('\n');
    }
    assert_eq!(body.len(), 65_536);
    w.publish("edge.test", "1", &body);
    assert!(
        w.engine()
            .policy("edge.test")
            .await
            .unwrap()
            .policy
            .is_some()
    );
}

#[tokio::test]
async fn r17_hanging_and_trickling_hosts_time_out() {
    let mut w = World::new().await;
    w.total_timeout = Duration::from_secs(2);
    w.publish("hang.test", "1", ENFORCE);
    w.host.serve("mta-sts.hang.test", Behaviour::Hang);
    let started = std::time::Instant::now();
    let err = fetch_error_of(&w, "hang.test").await;
    assert_eq!(err.result_type, ResultType::StsPolicyFetchError);
    assert!(started.elapsed() < Duration::from_secs(10));
    w.publish("trickle.test", "1", ENFORCE);
    w.host.serve(
        "mta-sts.trickle.test",
        Behaviour::Trickle {
            chunk: b"x".to_vec(),
            interval: Duration::from_millis(500),
            chunks: 100,
        },
    );
    let err = fetch_error_of(&w, "trickle.test").await;
    assert_eq!(err.result_type, ResultType::StsPolicyFetchError);
}

#[tokio::test]
async fn r10_bad_policy_host_certificates_are_webpki_invalid() {
    let w = World::new().await;
    let cases = [
        ("expired.test", w.ca.leaf_expired(&["mta-sts.expired.test"])),
        ("wrongname.test", w.ca.leaf(&["mta-sts.other.test"])),
        ("untrusted.test", self_signed(&["mta-sts.untrusted.test"])),
        ("cnonly.test", w.ca.leaf_cn_only("mta-sts.cnonly.test")),
    ];
    for (domain, leaf) in cases {
        w.publish(domain, "1", ENFORCE);
        w.host.set_cert(&format!("mta-sts.{domain}"), &leaf);
        let err = fetch_error_of(&w, domain).await;
        assert_eq!(
            err.result_type,
            ResultType::StsWebpkiInvalid,
            "{domain}: {err}"
        );
    }
    // A wildcard certificate for the policy host is fine.
    w.publish("wild.test", "1", ENFORCE);
    w.host
        .set_cert("mta-sts.wild.test", &w.ca.leaf(&["*.wild.test"]));
    assert!(
        w.engine()
            .policy("wild.test")
            .await
            .unwrap()
            .policy
            .is_some()
    );
}

#[tokio::test]
async fn r12_tls13_only_policy_host_works() {
    let w = World::new().await;
    let host13 = PolicyHost::start_with_versions(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &[&rustls::version::TLS13],
    )
    .await;
    let w = World { host: host13, ..w };
    w.publish("tls13.test", "1", ENFORCE);
    let l = w.engine().policy("tls13.test").await.unwrap();
    assert!(l.policy.is_some(), "{:?}", l.fetch_error);
    assert_eq!(w.host.requests()[0].tls_version.as_deref(), Some("TLSv1.3"));
}

#[tokio::test]
async fn r31_new_id_refetches_and_r33_failed_refetch_keeps_old_policy() {
    let w = World::new().await;
    w.publish("example.test", "1", ENFORCE);
    let e = w.engine();
    e.policy("example.test").await.unwrap();
    // New id, but the host fails: the old policy stays in force (R32, R33).
    w.set_id("example.test", "2");
    w.host
        .serve("mta-sts.example.test", Behaviour::status(500, "oops"));
    let l = e.recheck("example.test").await.unwrap();
    assert_eq!(l.policy.as_ref().unwrap().id, "1");
    assert_eq!(l.mode(), Some(Mode::Enforce));
    assert_eq!(
        l.fetch_error.as_ref().unwrap().result_type,
        ResultType::StsPolicyFetchError
    );
    assert_eq!(w.gets("example.test"), 2);
    // R18: within five minutes, the same id is not fetched again.
    w.host.serve(
        "mta-sts.example.test",
        Behaviour::policy(&ENFORCE.replace("enforce", "testing")),
    );
    w.clock.advance(299);
    let l = e.recheck("example.test").await.unwrap();
    assert_eq!(l.policy.as_ref().unwrap().id, "1");
    assert_eq!(w.gets("example.test"), 2);
    // R18: a different id may be tried at once.
    w.set_id("example.test", "3");
    let l = e.recheck("example.test").await.unwrap();
    assert_eq!(l.policy.as_ref().unwrap().id, "3");
    assert_eq!(l.mode(), Some(Mode::Testing));
    assert_eq!(l.source, Source::Fetched);
    assert_eq!(w.gets("example.test"), 3);
}

#[tokio::test]
async fn r18_backoff_expires_after_five_minutes() {
    let w = World::new().await;
    w.publish("example.test", "1", ENFORCE);
    w.host
        .serve("mta-sts.example.test", Behaviour::status(500, "down"));
    let e = w.engine();
    for _ in 0..10 {
        assert!(e.policy("example.test").await.unwrap().policy.is_none());
    }
    assert_eq!(w.gets("example.test"), 1);
    w.host
        .serve("mta-sts.example.test", Behaviour::policy(ENFORCE));
    w.clock.advance(300);
    assert_eq!(
        e.policy("example.test").await.unwrap().mode(),
        Some(Mode::Enforce)
    );
    assert_eq!(w.gets("example.test"), 2);
}

#[tokio::test]
async fn r31_id_is_rechecked_in_the_background_on_use() {
    let w = World::new().await;
    w.publish("example.test", "1", ENFORCE);
    let e = w.engine();
    e.policy("example.test").await.unwrap();
    w.set_id("example.test", "2");
    w.host.serve(
        "mta-sts.example.test",
        Behaviour::policy(&ENFORCE.replace("*.example.test", "mx.other.test")),
    );
    // Within the re-check interval nothing is looked up.
    w.clock.advance(100);
    e.policy("example.test").await.unwrap();
    assert_eq!(w.gets("example.test"), 1);
    // After it, a use answers from the cache at once and triggers a background check.
    w.clock.advance(300);
    let l = e.policy("example.test").await.unwrap();
    assert_eq!(l.policy.unwrap().id, "1");
    let mut fetched = false;
    for _ in 0..100 {
        if e.cached("example.test").await.is_some_and(|p| p.id == "2") {
            fetched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fetched, "background re-check fetched the new policy");
    let l = e.policy("example.test").await.unwrap();
    assert_eq!(
        l.check_mx("mx.other.test"),
        MxDecision::Allowed(Mode::Enforce)
    );
}

#[tokio::test]
async fn r8_r32_dns_failure_or_missing_record_keeps_cached_policy() {
    let w = World::new().await;
    w.publish("example.test", "1", ENFORCE);
    let e = w.engine();
    e.policy("example.test").await.unwrap();
    w.dns.set_servfail("_mta-sts.example.test", true);
    let l = e.recheck("example.test").await.unwrap();
    assert_eq!(
        l.check_mx("evil.test"),
        MxDecision::NotInPolicy(Mode::Enforce)
    );
    w.dns.set_servfail("_mta-sts.example.test", false);
    w.dns.remove("_mta-sts.example.test");
    w.host
        .serve("mta-sts.example.test", Behaviour::status(500, ""));
    let l = e.recheck("example.test").await.unwrap();
    assert_eq!(
        l.check_mx("evil.test"),
        MxDecision::NotInPolicy(Mode::Enforce)
    );
}

#[tokio::test]
async fn r34_expired_policy_no_longer_applies() {
    let w = World::new().await;
    w.publish(
        "example.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 5\n",
    );
    let e = w.engine();
    e.policy("example.test").await.unwrap();
    w.dns.remove("_mta-sts.example.test");
    w.host
        .serve("mta-sts.example.test", Behaviour::status(500, ""));
    w.clock.advance(4);
    assert_eq!(
        e.policy("example.test").await.unwrap().mode(),
        Some(Mode::Enforce)
    );
    w.clock.advance(2);
    let l = e.policy("example.test").await.unwrap();
    assert!(l.policy.is_none());
    assert_eq!(l.check_mx("anything.test"), MxDecision::NoPolicy);
}

#[tokio::test]
async fn r35_mode_none_replaces_an_enforce_policy() {
    let w = World::new().await;
    w.publish("example.test", "1", ENFORCE);
    let e = w.engine();
    e.policy("example.test").await.unwrap();
    w.set_id("example.test", "2");
    w.host.serve(
        "mta-sts.example.test",
        Behaviour::policy("version: STSv1\nmode: none\nmax_age: 86400\n"),
    );
    let l = e.recheck("example.test").await.unwrap();
    assert_eq!(l.check_mx("evil.test"), MxDecision::NoPolicy);
    // It is cached like any other (and survives a restart).
    let l = w.engine().policy("example.test").await.unwrap();
    assert_eq!(l.policy.unwrap().policy.mode, Mode::None);
    assert_eq!(w.gets("example.test"), 2);
}

#[tokio::test]
async fn r37_restart_keeps_the_cache_with_dns_and_host_down() {
    let w = World::new().await;
    w.publish("example.test", "1", ENFORCE);
    w.engine().policy("example.test").await.unwrap();
    w.dns.set_servfail("_mta-sts.example.test", true);
    w.host
        .serve("mta-sts.example.test", Behaviour::status(500, ""));
    let fresh = w.engine();
    let l = fresh.policy("example.test").await.unwrap();
    assert_eq!(l.source, Source::Cache);
    assert_eq!(
        l.check_mx("evil.test"),
        MxDecision::NotInPolicy(Mode::Enforce)
    );
    assert_eq!(w.gets("example.test"), 1);
}

#[tokio::test]
async fn r36_proactive_refresh_works_without_txt_and_extends_lifetime() {
    let w = World::new().await;
    w.publish(
        "example.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 172800\n",
    );
    let e = w.engine();
    e.policy("example.test").await.unwrap();
    let first = e.cached("example.test").await.unwrap().fetched_at;
    assert_eq!(e.refresh_due().await, 0, "nothing due yet");
    w.dns.remove("_mta-sts.example.test");
    w.clock.advance(86_400);
    assert_eq!(e.refresh_due().await, 1);
    assert_eq!(w.gets("example.test"), 2);
    let p = e.cached("example.test").await.unwrap();
    assert_eq!(p.fetched_at, first + 86_400);
    assert_eq!(p.id, "1", "without a TXT record the old id is kept");
    // A failing refresh keeps the policy.
    w.host
        .serve("mta-sts.example.test", Behaviour::status(503, ""));
    w.clock.advance(86_400);
    assert_eq!(e.refresh_due().await, 0);
    assert_eq!(
        e.cached("example.test").await.unwrap().fetched_at,
        first + 86_400
    );
    assert_eq!(
        e.policy("example.test").await.unwrap().mode(),
        Some(Mode::Enforce)
    );
}

#[tokio::test]
async fn max_age_zero_applies_to_one_decision_only() {
    let w = World::new().await;
    w.publish(
        "zero.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: mx.zero.test\nmax_age: 0\n",
    );
    let e = w.engine();
    let l = e.policy("zero.test").await.unwrap();
    assert_eq!(l.mode(), Some(Mode::Enforce));
    assert!(e.cached("zero.test").await.is_none());
    e.policy("zero.test").await.unwrap();
    assert_eq!(w.gets("zero.test"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_of_one_domain_make_one_fetch() {
    let w = World::new().await;
    w.publish("example.test", "1", ENFORCE);
    let e = w.engine();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            e.policy("example.test").await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().mode(), Some(Mode::Enforce));
    }
    assert_eq!(w.gets("example.test"), 1);
    assert_eq!(e.stats().fetches.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn clock_is_the_engines_only_time_source() {
    // Guard for the tests above: the manual clock really drives expiry.
    let w = World::new().await;
    assert_eq!(w.clock.now(), 1_800_000_000);
}
