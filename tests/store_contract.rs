//! One behaviour suite, two backends: every test below runs against the embedded
//! [`SqliteStore`] (in a temporary directory), the shared [`RedisStore`] (against a
//! real `redis-server` on a loopback port, see `common/redis.rs`), and the
//! [`FleetStore`] the relay uses with `storage.backend = "redis"` (that Redis, with a
//! local SQLite per node).
//!
//! Each test gets two handles on the same data: two opens of one SQLite file, or two
//! Redis connections with one prefix, or two fleet nodes — two relay nodes.

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use redis_server::RedisServer;
use std::collections::BTreeSet;
use std::sync::Arc;
use stsrelay::store::{FleetStore, PolicyStore, RedisStore, RedisTarget, ReportStore, SqliteStore};
use stsrelay::sts::{CachedPolicy, Policy};
use stsrelay::tlsrpt::{
    CounterKey, Day, FailureDetail, LedgerEntry, LedgerState, PolicyKey, PolicyType, ResultType,
};

/// What the suite needs of a store.
trait Store: PolicyStore + ReportStore + Clone + 'static {}
impl<T: PolicyStore + ReportStore + Clone + 'static> Store for T {}

fn policy(domain: &str, id: &str, mode: &str, at: i64) -> CachedPolicy {
    CachedPolicy {
        domain: domain.into(),
        id: id.into(),
        policy: Policy::parse(&format!(
            "version: STSv1\nmode: {mode}\nmx: mx1.{domain}\nmx: *.{domain}\nmax_age: 86400\n"
        ))
        .expect("test policy parses"),
        fetched_at: at,
    }
}

fn day(s: &str) -> Day {
    s.parse().expect("test day")
}

fn key(d: &str, domain: &str, failure: Option<ResultType>) -> CounterKey {
    CounterKey {
        day: day(d),
        policy_domain: domain.into(),
        policy: PolicyKey {
            policy_type: PolicyType::Sts,
            policy_strings: vec!["version: STSv1".into(), "mode: enforce".into()],
            mx_host: vec![format!("*.{domain}")],
        },
        failure: failure.map(|result_type| FailureDetail {
            result_type,
            sending_mta_ip: Some("192.0.2.1".parse().unwrap()),
            receiving_mx_hostname: Some(format!("mx.{domain}")),
            receiving_mx_helo: None,
            receiving_ip: Some("192.0.2.25".parse().unwrap()),
            failure_reason_code: Some("reason".into()),
        }),
    }
}

fn row(d: &str, domain: &str, rua: &str, id: &str, next_try: i64) -> LedgerEntry {
    LedgerEntry {
        policy_domain: domain.into(),
        day: day(d),
        rua: rua.into(),
        report_id: id.into(),
        file_name: format!("{id}.json.gz"),
        // Binary, with a NUL and invalid UTF-8: the body must round-trip byte for byte.
        gzip: [&[0x1f, 0x8b, 0x00, 0xff][..], id.as_bytes()].concat(),
        state: LedgerState::Pending,
        attempts: 0,
        created_at: 100,
        first_try: None,
        next_try,
        last_result: None,
        lease: None,
    }
}

fn sorted(mut v: Vec<(CounterKey, u64)>) -> Vec<(CounterKey, u64)> {
    v.sort();
    v
}

// ---------------------------------------------------------------------------------
// The behaviour tests, written once.

async fn policies_round_trip<S: Store>(a: S, b: S) {
    assert_eq!(a.get_policy("a.test").await.unwrap(), None);
    assert!(a.all_policies().await.unwrap().is_empty());
    let pa = policy("a.test", "one", "enforce", 1_000);
    let pb = policy("b.test", "x", "testing", 2_000);
    a.put_policy(&pb).await.unwrap();
    a.put_policy(&pa).await.unwrap();
    // The other node sees them, sorted by domain.
    assert_eq!(b.get_policy("a.test").await.unwrap(), Some(pa.clone()));
    assert_eq!(b.all_policies().await.unwrap(), vec![pa, pb.clone()]);
    // Replace.
    let pa2 = policy("a.test", "two", "testing", 3_000);
    b.put_policy(&pa2).await.unwrap();
    assert_eq!(a.get_policy("a.test").await.unwrap(), Some(pa2.clone()));
    // Delete (twice: deleting a missing policy is fine).
    a.delete_policy("b.test").await.unwrap();
    a.delete_policy("b.test").await.unwrap();
    assert_eq!(b.get_policy("b.test").await.unwrap(), None);
    assert_eq!(b.all_policies().await.unwrap(), vec![pa2]);
}

async fn counters_sum_across_batches_and_nodes<S: Store>(a: S, b: S) {
    let ok = key("2026-11-27", "a.test", None);
    let bad = key("2026-11-27", "a.test", Some(ResultType::CertificateExpired));
    // One batch with the same counter twice, and two counters.
    a.add_counts(vec![(ok.clone(), 2), (ok.clone(), 3), (bad.clone(), 1)])
        .await
        .unwrap();
    b.add_counts(vec![(ok.clone(), 5)]).await.unwrap();
    a.add_counts(vec![]).await.unwrap();
    assert_eq!(
        sorted(b.counts(None, None).await.unwrap()),
        sorted(vec![(ok.clone(), 10), (bad.clone(), 1)])
    );

    // Two nodes, concurrently, 1,000 increments each.
    const N: u64 = 1_000;
    let task = |s: S, k: CounterKey| {
        tokio::spawn(async move {
            for _ in 0..N {
                s.add_counts(vec![(k.clone(), 1)]).await.unwrap();
            }
        })
    };
    let (ta, tb) = (task(a.clone(), ok.clone()), task(b.clone(), ok.clone()));
    ta.await.unwrap();
    tb.await.unwrap();
    assert_eq!(
        sorted(a.counts(None, None).await.unwrap()),
        sorted(vec![(ok, 10 + 2 * N), (bad, 1)])
    );
}

async fn counts_filtered_by_day_and_domain<S: Store>(a: S, b: S) {
    let a1 = key("2026-11-26", "a.test", None);
    let a1f = key(
        "2026-11-26",
        "a.test",
        Some(ResultType::StarttlsNotSupported),
    );
    let b1 = key("2026-11-26", "b.test", None);
    let a2 = key("2026-11-27", "a.test", None);
    let b2f = key("2026-11-27", "b.test", Some(ResultType::ValidationFailure));
    a.add_counts(vec![
        (a1.clone(), 1),
        (a1f.clone(), 2),
        (b1.clone(), 3),
        (a2.clone(), 4),
        (b2f.clone(), 5),
    ])
    .await
    .unwrap();
    let d1 = Some(day("2026-11-26"));
    let d2 = Some(day("2026-11-27"));
    let dom = |s: &str| Some(s.to_string());
    assert_eq!(
        sorted(b.counts(d1, None).await.unwrap()),
        sorted(vec![(a1.clone(), 1), (a1f.clone(), 2), (b1.clone(), 3)])
    );
    assert_eq!(
        sorted(b.counts(d1, dom("a.test")).await.unwrap()),
        sorted(vec![(a1.clone(), 1), (a1f.clone(), 2)])
    );
    assert_eq!(
        b.counts(d2, dom("b.test")).await.unwrap(),
        vec![(b2f.clone(), 5)]
    );
    assert_eq!(
        sorted(b.counts(None, dom("a.test")).await.unwrap()),
        sorted(vec![(a1.clone(), 1), (a1f.clone(), 2), (a2.clone(), 4)])
    );
    let all = b.counts(None, None).await.unwrap();
    assert_eq!(all.len(), 5);
    // Ordered by day, then domain (as SQLite's ORDER BY).
    let order: Vec<(Day, String)> = all
        .iter()
        .map(|(k, _)| (k.day, k.policy_domain.clone()))
        .collect();
    let mut want = order.clone();
    want.sort();
    assert_eq!(order, want);
    assert!(
        b.counts(Some(day("2026-11-25")), None)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(b.counts(d1, dom("c.test")).await.unwrap().is_empty());
}

async fn ledger_keeps_one_report_per_domain_and_day<S: Store>(a: S, b: S) {
    let d = "2026-11-27";
    assert_eq!(
        a.ledger_insert(vec![row(d, "a.test", "mailto:r@a.test", "first", 100)])
            .await
            .unwrap(),
        1
    );
    // Made again on the other node (and with a rua added): the existing row stays, the
    // new rua gets the same report; another domain and another day get their own.
    let n = b
        .ledger_insert(vec![
            row(d, "a.test", "mailto:r@a.test", "second", 100),
            row(d, "a.test", "https://r.a.test/", "second", 100),
            row(d, "b.test", "mailto:r@b.test", "bee", 100),
            row("2026-11-26", "a.test", "mailto:r@a.test", "older", 100),
        ])
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(a.ledger_insert(vec![]).await.unwrap(), 0);
    // The same batch again: nothing new.
    assert_eq!(
        a.ledger_insert(vec![
            row(d, "a.test", "https://r.a.test/", "third", 100),
            row(d, "b.test", "mailto:r@b.test", "bee2", 100),
        ])
        .await
        .unwrap(),
        0
    );
    let all = a.ledger_list(None).await.unwrap();
    let ids: Vec<(String, String, String, String)> = all
        .iter()
        .map(|r| {
            (
                r.day.to_string(),
                r.policy_domain.clone(),
                r.rua.clone(),
                r.report_id.clone(),
            )
        })
        .collect();
    let s = |x: &str| x.to_string();
    assert_eq!(
        ids,
        vec![
            (
                s("2026-11-26"),
                s("a.test"),
                s("mailto:r@a.test"),
                s("older")
            ),
            (s(d), s("a.test"), s("https://r.a.test/"), s("first")),
            (s(d), s("a.test"), s("mailto:r@a.test"), s("first")),
            (s(d), s("b.test"), s("mailto:r@b.test"), s("bee")),
        ]
    );
    let first = row(d, "a.test", "x", "first", 100);
    for r in all.iter().filter(|r| r.report_id == "first") {
        assert_eq!(r.gzip, first.gzip);
        assert_eq!(r.file_name, "first.json.gz");
        assert_eq!(r.state, LedgerState::Pending);
        assert_eq!((r.attempts, r.created_at, r.next_try), (0, 100, 100));
        assert_eq!(
            (r.first_try, &r.last_result, &r.lease),
            (None, &None, &None)
        );
    }
    assert_eq!(b.ledger_list(Some(day(d))).await.unwrap().len(), 3);
    assert!(
        b.ledger_list(Some(day("2026-11-20")))
            .await
            .unwrap()
            .is_empty()
    );

    // A row that was sent is not reset by a later insert of the same destination.
    let mut c = a.ledger_claim_due(100, 60).await.unwrap().expect("due");
    c.state = LedgerState::Sent;
    c.attempts = 1;
    c.first_try = Some(100);
    c.last_result = Some("250 ok".into());
    assert!(a.ledger_update(&c).await.unwrap());
    let again = row(&c.day.to_string(), &c.policy_domain, &c.rua, "new", 100);
    assert_eq!(b.ledger_insert(vec![again]).await.unwrap(), 0);
    let now = b.ledger_list(Some(c.day)).await.unwrap();
    let back = now
        .iter()
        .find(|r| r.rua == c.rua && r.policy_domain == c.policy_domain);
    let back = back.expect("row still there");
    assert_eq!(back.state, LedgerState::Sent);
    assert_eq!(back.report_id, c.report_id);
    assert_eq!(back.first_try, Some(100));
    assert_eq!(back.last_result.as_deref(), Some("250 ok"));
    assert_eq!(back.lease, None);
}

async fn concurrent_claims_never_share_a_row<S: Store>(a: S, b: S) {
    const ROWS: usize = 30;
    let rows: Vec<LedgerEntry> = (0..ROWS)
        .map(|i| {
            row(
                "2026-11-27",
                &format!("d{i:02}.test"),
                "mailto:r@x.test",
                &format!("r{i}"),
                100 + i as i64,
            )
        })
        .collect();
    a.ledger_insert(rows).await.unwrap();
    // Not yet due.
    assert!(a.ledger_claim_due(99, 60).await.unwrap().is_none());
    let claimer = |s: S| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..ROWS + 5 {
                match s.ledger_claim_due(1_000, 600).await.unwrap() {
                    Some(r) => got.push(r),
                    None => break,
                }
            }
            got
        })
    };
    let (ta, tb) = (claimer(a.clone()), claimer(b.clone()));
    let (ga, gb) = (ta.await.unwrap(), tb.await.unwrap());
    let names = |g: &[LedgerEntry]| -> BTreeSet<String> {
        g.iter().map(|r| r.policy_domain.clone()).collect()
    };
    let (na, nb) = (names(&ga), names(&gb));
    assert_eq!(na.len(), ga.len(), "a claimed a row twice");
    assert_eq!(nb.len(), gb.len(), "b claimed a row twice");
    assert!(
        na.is_disjoint(&nb),
        "both claimed {:?}",
        na.intersection(&nb)
    );
    assert_eq!(na.len() + nb.len(), ROWS, "every row claimed once");
    // Leased: nothing more to claim until the leases run out.
    assert!(a.ledger_claim_due(1_000, 600).await.unwrap().is_none());
    for (s, g) in [(&a, ga), (&b, gb)] {
        for mut r in g {
            assert!(r.lease.is_some());
            r.state = LedgerState::Sent;
            assert!(s.ledger_update(&r).await.unwrap());
        }
    }
    assert!(b.ledger_claim_due(100_000, 60).await.unwrap().is_none());
    assert!(
        a.ledger_list(None)
            .await
            .unwrap()
            .iter()
            .all(|r| r.state == LedgerState::Sent && r.lease.is_none())
    );
}

async fn claims_are_due_first_and_retries_wait<S: Store>(a: S, b: S) {
    a.ledger_insert(vec![
        row("2026-11-27", "late.test", "mailto:r@x.test", "l", 300),
        row("2026-11-27", "early.test", "mailto:r@x.test", "e", 200),
    ])
    .await
    .unwrap();
    let mut first = a.ledger_claim_due(1_000, 60).await.unwrap().expect("due");
    assert_eq!(first.policy_domain, "early.test");
    // The claimed row lists with its lease.
    let listed = b.ledger_list(None).await.unwrap();
    let l = listed.iter().find(|r| r.policy_domain == "early.test");
    assert_eq!(l.unwrap().lease, first.lease);
    // No lease, no update.
    let mut anon = first.clone();
    anon.lease = None;
    assert!(!b.ledger_update(&anon).await.unwrap());
    // Retry later: pending again, due at 5,000.
    first.attempts = 1;
    first.first_try = Some(1_000);
    first.next_try = 5_000;
    first.last_result = Some("451 try later".into());
    assert!(a.ledger_update(&first).await.unwrap());
    // The same claim cannot write twice (it was released).
    assert!(!a.ledger_update(&first).await.unwrap());
    let second = b
        .ledger_claim_due(1_000, 10_000)
        .await
        .unwrap()
        .expect("due");
    assert_eq!(second.policy_domain, "late.test");
    assert!(b.ledger_claim_due(4_999, 60).await.unwrap().is_none());
    let again = a.ledger_claim_due(5_000, 60).await.unwrap().expect("due");
    assert_eq!(again.policy_domain, "early.test");
    assert_eq!(again.attempts, 1);
    assert_eq!(again.first_try, Some(1_000));
    assert_eq!(again.last_result.as_deref(), Some("451 try later"));
    assert_ne!(again.lease, first.lease);
    // Dropped rows are never claimed again.
    let mut dropped = again.clone();
    dropped.state = LedgerState::Dropped;
    dropped.last_result = None;
    assert!(a.ledger_update(&dropped).await.unwrap());
    let rows = b.ledger_list(None).await.unwrap();
    let e = rows
        .iter()
        .find(|r| r.policy_domain == "early.test")
        .unwrap();
    assert_eq!(e.state, LedgerState::Dropped);
    assert_eq!(e.last_result, None);
    assert!(
        b.ledger_claim_due(100_000, 60)
            .await
            .unwrap()
            .is_some_and(|r| r.policy_domain == "late.test")
    );
}

async fn an_expired_lease_is_reclaimed_and_the_stale_holder_cannot_write<S: Store>(a: S, b: S) {
    a.ledger_insert(vec![row(
        "2026-11-27",
        "a.test",
        "mailto:r@a.test",
        "x",
        100,
    )])
    .await
    .unwrap();
    let mine = a.ledger_claim_due(100, 60).await.unwrap().expect("due");
    assert!(
        b.ledger_claim_due(100, 60).await.unwrap().is_none(),
        "leased"
    );
    assert!(
        b.ledger_claim_due(159, 60).await.unwrap().is_none(),
        "leased"
    );
    // The lease runs out; b claims the row and sends it.
    let mut theirs = b
        .ledger_claim_due(160, 60)
        .await
        .unwrap()
        .expect("lease expired");
    assert_ne!(theirs.lease, mine.lease);
    // The stale holder's "sent" must not count either: the row is b's now.
    let mut stale_sent = mine.clone();
    stale_sent.state = LedgerState::Sent;
    stale_sent.last_result = Some("stale".into());
    assert!(!a.ledger_update(&stale_sent).await.unwrap());
    theirs.state = LedgerState::Sent;
    theirs.attempts = 1;
    assert!(b.ledger_update(&theirs).await.unwrap());
    // The first claimer's late "retry later" must not undo that.
    let mut late = mine.clone();
    late.next_try = 500;
    assert!(!a.ledger_update(&late).await.unwrap());
    let rows = a.ledger_list(None).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, LedgerState::Sent);
    assert_eq!(rows[0].attempts, 1);
    assert_eq!(rows[0].last_result, None);
    assert!(a.ledger_claim_due(10_000, 60).await.unwrap().is_none());
    // Even b's own claim cannot write twice.
    assert!(!b.ledger_update(&theirs).await.unwrap());
}

async fn report_days_are_marked_once<S: Store>(a: S, b: S) {
    let d = day("2026-11-27");
    assert!(!a.day_done(d).await.unwrap());
    a.mark_day_done(d, 1_000).await.unwrap();
    assert!(b.day_done(d).await.unwrap());
    b.mark_day_done(d, 2_000).await.unwrap();
    assert!(a.day_done(d).await.unwrap());
    assert!(!a.day_done(d.next()).await.unwrap());
    assert!(!a.day_done(d.prev()).await.unwrap());
}

async fn prune_forgets_old_days_but_not_pending_reports<S: Store>(a: S, b: S) {
    let (old, cut, new) = ("2026-11-20", "2026-11-25", "2026-11-26");
    a.add_counts(vec![
        (key(old, "a.test", None), 1),
        (key("2026-11-24", "b.test", None), 2),
        (key(cut, "a.test", None), 3),
        (key(new, "a.test", None), 4),
    ])
    .await
    .unwrap();
    a.ledger_insert(vec![
        row(old, "sent.test", "mailto:r@s.test", "s", 100),
        row(old, "dropped.test", "mailto:r@d.test", "d", 100),
        row(old, "pending.test", "mailto:r@p.test", "p", 200),
        row(cut, "a.test", "mailto:r@a.test", "c", 300),
        row(new, "a.test", "mailto:r@a.test", "n", 300),
    ])
    .await
    .unwrap();
    // The two rows due at 100: one is sent, the other dropped.
    let mut gone = BTreeSet::new();
    for state in [LedgerState::Sent, LedgerState::Dropped] {
        let mut r = a.ledger_claim_due(100, 60).await.unwrap().expect("due");
        gone.insert(r.policy_domain.clone());
        r.state = state;
        assert!(a.ledger_update(&r).await.unwrap());
    }
    assert_eq!(
        gone,
        BTreeSet::from(["dropped.test".into(), "sent.test".into()])
    );
    for d in [old, "2026-11-24", cut, new] {
        a.mark_day_done(day(d), 1).await.unwrap();
    }

    b.prune_before(day(cut)).await.unwrap();

    let counts = a.counts(None, None).await.unwrap();
    let days: Vec<String> = counts.iter().map(|(k, _)| k.day.to_string()).collect();
    assert_eq!(days, vec![cut.to_string(), new.to_string()]);
    let rows = a.ledger_list(None).await.unwrap();
    let left: Vec<(String, String, LedgerState)> = rows
        .iter()
        .map(|r| (r.day.to_string(), r.policy_domain.clone(), r.state))
        .collect();
    assert_eq!(
        left,
        vec![
            (old.into(), "pending.test".into(), LedgerState::Pending),
            (cut.into(), "a.test".into(), LedgerState::Pending),
            (new.into(), "a.test".into(), LedgerState::Pending),
        ]
    );
    assert!(!a.day_done(day(old)).await.unwrap());
    assert!(!a.day_done(day("2026-11-24")).await.unwrap());
    assert!(a.day_done(day(cut)).await.unwrap());
    assert!(a.day_done(day(new)).await.unwrap());
    // The old pending report is still the (domain, day)'s report for a new rua, and
    // can still be sent.
    assert_eq!(
        a.ledger_insert(vec![row(old, "pending.test", "https://p.test/", "p2", 200)])
            .await
            .unwrap(),
        1
    );
    let rows = a.ledger_list(Some(day(old))).await.unwrap();
    assert!(rows.iter().all(|r| r.report_id == "p"), "{rows:?}");
    let r = b
        .ledger_claim_due(250, 60)
        .await
        .unwrap()
        .expect("old pending row");
    assert_eq!(
        (r.day, r.policy_domain.as_str()),
        (day(old), "pending.test")
    );
    // A pruned (domain, day) whose rows all went gets a new report if made again.
    assert_eq!(
        a.ledger_insert(vec![row(old, "sent.test", "mailto:r@s.test", "s2", 100)])
            .await
            .unwrap(),
        1
    );
    let rows = a.ledger_list(Some(day(old))).await.unwrap();
    let s2 = rows
        .iter()
        .find(|r| r.policy_domain == "sent.test")
        .unwrap();
    assert_eq!(s2.report_id, "s2");
    // Pruning again changes nothing.
    b.prune_before(day(cut)).await.unwrap();
    assert_eq!(a.ledger_list(None).await.unwrap().len(), 5);
}

// ---------------------------------------------------------------------------------
// The two stores.

fn sqlite_pair() -> (SqliteStore, SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let a = SqliteStore::open(dir.path()).unwrap();
    let b = SqliteStore::open(dir.path()).unwrap(); // another process
    (a, b, dir)
}

async fn redis_pair() -> (RedisStore, RedisStore, RedisServer) {
    let server = RedisServer::start();
    let a = RedisStore::connect(&server.url(), "stsrelay:")
        .await
        .unwrap();
    let b = RedisStore::connect(&server.url(), "stsrelay:")
        .await
        .unwrap(); // another node
    (a, b, server)
}

/// A fleet node: Redis at `url`, its own SQLite in `dir`.
fn fleet_node(url: &str, dir: &std::path::Path) -> Arc<FleetStore> {
    let target = RedisTarget {
        url: url.into(),
        prefix: "stsrelay:".into(),
        ca_pem: None,
        timeout: std::time::Duration::from_secs(5),
        retry: std::time::Duration::from_secs(1),
    };
    Arc::new(FleetStore::new(target, SqliteStore::open(dir).unwrap()))
}

async fn fleet_pair() -> (
    Arc<FleetStore>,
    Arc<FleetStore>,
    RedisServer,
    tempfile::TempDir,
    tempfile::TempDir,
) {
    let server = RedisServer::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = fleet_node(&server.url(), da.path());
    let b = fleet_node(&server.url(), db.path());
    a.connect().await.unwrap();
    b.connect().await.unwrap();
    (a, b, server, da, db)
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (a, b, _dir) = super::sqlite_pair();
                    super::$name(a, b).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if super::redis_server::skip() {
                        return;
                    }
                    let (a, b, _server) = super::redis_pair().await;
                    super::$name(a, b).await;
                }
            )*
        }
        mod fleet {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if super::redis_server::skip() {
                        return;
                    }
                    let (a, b, _server, _da, _db) = super::fleet_pair().await;
                    super::$name(a, b).await;
                }
            )*
        }
    };
}

contract!(
    policies_round_trip,
    counters_sum_across_batches_and_nodes,
    counts_filtered_by_day_and_domain,
    ledger_keeps_one_report_per_domain_and_day,
    concurrent_claims_never_share_a_row,
    claims_are_due_first_and_retries_wait,
    an_expired_lease_is_reclaimed_and_the_stale_holder_cannot_write,
    report_days_are_marked_once,
    prune_forgets_old_days_but_not_pending_reports,
);

// ---------------------------------------------------------------------------------
// Redis only: key prefixes, what the server may hold that we did not write, errors.

async fn raw(server: &RedisServer) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn redis_prefixes_keep_fleets_apart() {
    if redis_server::skip() {
        return;
    }
    let server = RedisServer::start();
    let a = RedisStore::connect(&server.url(), "fleet-a:")
        .await
        .unwrap();
    let b = RedisStore::connect(&server.url(), "fleet-b:")
        .await
        .unwrap();
    a.put_policy(&policy("a.test", "1", "enforce", 1))
        .await
        .unwrap();
    a.add_counts(vec![(key("2026-11-27", "a.test", None), 1)])
        .await
        .unwrap();
    a.ledger_insert(vec![row("2026-11-27", "a.test", "mailto:r@a.test", "x", 1)])
        .await
        .unwrap();
    a.mark_day_done(day("2026-11-27"), 1).await.unwrap();
    assert!(b.all_policies().await.unwrap().is_empty());
    assert!(b.counts(None, None).await.unwrap().is_empty());
    assert!(b.ledger_list(None).await.unwrap().is_empty());
    assert!(b.ledger_claim_due(100, 60).await.unwrap().is_none());
    assert!(!b.day_done(day("2026-11-27")).await.unwrap());
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| k.starts_with("fleet-a:")), "{keys:?}");
    // Counters expire on their own if nobody prunes them (15 days by default).
    let ttl: i64 = ::redis::cmd("TTL")
        .arg("fleet-a:tlsrpt:count:2026-11-27:a.test")
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    assert!((86_400..=15 * 86_400).contains(&ttl), "{ttl}");
}

#[tokio::test]
async fn redis_store_reconnects_after_a_server_restart() {
    if redis_server::skip() {
        return;
    }
    let mut server = RedisServer::start();
    let s = RedisStore::connect(&server.url(), "stsrelay:")
        .await
        .unwrap();
    let p = policy("a.test", "1", "enforce", 1);
    s.put_policy(&p).await.unwrap();
    server.restart();
    let size: i64 = ::redis::cmd("DBSIZE")
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    assert_eq!(size, 0, "a new, empty server");
    // The first calls may fail while the connection is re-established; then the same
    // handle works again (the restarted server is empty: no persistence).
    let mut ok = false;
    for _ in 0..50 {
        if s.put_policy(&p).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "the store did not reconnect");
    assert_eq!(s.get_policy("a.test").await.unwrap(), Some(p));
}

#[tokio::test]
async fn redis_skips_values_it_cannot_read() {
    if redis_server::skip() {
        return;
    }
    let server = RedisServer::start();
    let s = RedisStore::connect(&server.url(), "stsrelay:")
        .await
        .unwrap();
    let good = policy("a.test", "1", "enforce", 1);
    s.put_policy(&good).await.unwrap();
    let k = key("2026-11-27", "a.test", None);
    s.add_counts(vec![(k.clone(), 7)]).await.unwrap();
    s.ledger_insert(vec![row("2026-11-27", "a.test", "mailto:r@a.test", "x", 1)])
        .await
        .unwrap();
    let mut c = raw(&server).await;
    let bad_row = r#"["2026-11-27","b.test","mailto:r@b.test"]"#;
    let _: () = ::redis::pipe()
        .cmd("HSET")
        .arg("stsrelay:sts:policy")
        .arg("bad.test")
        .arg("not json")
        .ignore()
        .cmd("HSET")
        .arg("stsrelay:sts:policy")
        .arg("worse.test")
        .arg(r#"{"id":"1","body":"not a policy","fetched_at":1}"#)
        .ignore()
        .cmd("HSET")
        .arg("stsrelay:tlsrpt:count:2026-11-27:a.test")
        .arg("garbage")
        .arg(1)
        .ignore()
        .cmd("HSET")
        .arg("stsrelay:tlsrpt:count:2026-11-27:a.test")
        .arg(r#"["{}",""]"#)
        .arg("x")
        .ignore()
        .cmd("SADD")
        .arg("stsrelay:tlsrpt:ledger:day:2026-11-27")
        .arg(bad_row)
        .ignore()
        .cmd("HSET")
        .arg(format!("stsrelay:tlsrpt:ledger:row:{bad_row}"))
        .arg("state")
        .arg("weird")
        .arg("day")
        .arg("2026-11-27")
        .ignore()
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(s.get_policy("bad.test").await.unwrap(), None);
    assert_eq!(s.get_policy("worse.test").await.unwrap(), None);
    assert_eq!(s.all_policies().await.unwrap(), vec![good]);
    assert_eq!(s.counts(None, None).await.unwrap(), vec![(k, 7)]);
    let rows = s.ledger_list(None).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].policy_domain, "a.test");
    // The unreadable row is not pending, so pruning removes it like SQLite would.
    s.prune_before(day("2026-11-28")).await.unwrap();
    let exists: bool = ::redis::cmd("EXISTS")
        .arg(format!("stsrelay:tlsrpt:ledger:row:{bad_row}"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!exists);
    assert_eq!(s.ledger_list(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn redis_errors_name_the_operation() {
    if redis_server::skip() {
        return;
    }
    let e = RedisStore::connect("nonsense://x", "p:").await.unwrap_err();
    assert_eq!(e.op, "redis url", "{e}");
    // A port nobody listens on (port 1 of an address no test binds: a freed ephemeral
    // port could be taken by a parallel test's server).
    let e = RedisStore::connect("redis://127.0.0.253:1/", "p:")
        .await
        .unwrap_err();
    assert_eq!(e.op, "redis connect", "{e}");
    // rediss://: the TLS client is set up (no panic over a missing crypto provider)
    // and the failed handshake is an error. The peer accepts and hangs up at once.
    let closer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closer_addr = closer.local_addr().unwrap();
    let closing = tokio::spawn(async move {
        for _ in 0..20 {
            match closer.accept().await {
                Ok((conn, _)) => drop(conn),
                Err(_) => break,
            }
        }
    });
    let e = RedisStore::connect(&format!("rediss://{closer_addr}/"), "p:")
        .await
        .unwrap_err();
    assert_eq!(e.op, "redis connect", "{e}");
    closing.abort();
    let server = RedisServer::start();
    // A store whose server went away reports which operation failed.
    let s = RedisStore::connect(&server.url(), "p:").await.unwrap();
    drop(server);
    let e = s.get_policy("a.test").await.unwrap_err();
    assert_eq!(e.op, "get policy", "{e}");
    let e = s
        .add_counts(vec![(key("2026-11-27", "a.test", None), 1)])
        .await
        .unwrap_err();
    assert_eq!(e.op, "add counts", "{e}");
}

#[tokio::test]
async fn redis_over_tls_with_a_private_ca() {
    if redis_server::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = common::pki::TestCa::new("Test Redis CA");
    let (cert, key) = ca.leaf(&["127.0.0.1"]).write_pem(dir.path(), "redis");
    let server = RedisServer::start_tls(&cert, &key);
    let ca_pem = ca.ca_pem();
    let s =
        RedisStore::connect_with_root_ca(&server.tls_url(), "stsrelay:", Some(ca_pem.as_bytes()))
            .await
            .unwrap();
    let p = policy("a.test", "1", "enforce", 1);
    s.put_policy(&p).await.unwrap();
    // Over the plain port: the same data.
    let plain = RedisStore::connect(&server.url(), "stsrelay:")
        .await
        .unwrap();
    assert_eq!(plain.get_policy("a.test").await.unwrap(), Some(p));
    // Without that CA (system roots only) the certificate is not trusted.
    let e = RedisStore::connect(&server.tls_url(), "stsrelay:")
        .await
        .unwrap_err();
    assert_eq!(e.op, "redis connect", "{e}");
    // Another CA is not trusted either.
    let other = common::pki::TestCa::new("Other CA").ca_pem();
    let e =
        RedisStore::connect_with_root_ca(&server.tls_url(), "stsrelay:", Some(other.as_bytes()))
            .await
            .unwrap_err();
    assert_eq!(e.op, "redis connect", "{e}");
}
