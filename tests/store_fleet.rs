//! The fleet store (`storage.backend = "redis"`) when Redis fails: a real
//! `redis-server` on a loopback port is stopped, frozen (SIGSTOP) and started again
//! under two nodes, each with its own local SQLite. What must hold: lookups are
//! answered from the local copy, counters are kept locally and reach Redis exactly
//! once, reports wait, and a node that joins gets what the fleet holds.

#[path = "common/redis.rs"]
mod redis_server;

use redis_server::RedisServer;
use std::sync::Arc;
use std::time::Duration;
use stsrelay::store::{FleetStore, PolicyStore, RedisStore, RedisTarget, ReportStore, SqliteStore};
use stsrelay::sts::{CachedPolicy, Policy};
use stsrelay::tlsrpt::{CounterKey, Day, PolicyKey, PolicyType};

/// Every wait on a store call is cut here: a call that does not come back is a
/// failure (the fallback must answer long before).
const BOUND: Duration = Duration::from_secs(30);

fn node(url: &str, dir: &std::path::Path) -> Arc<FleetStore> {
    let target = RedisTarget {
        url: url.into(),
        prefix: "fleet:".into(),
        ca_pem: None,
        timeout: Duration::from_millis(300),
        retry: Duration::from_secs(1),
    };
    Arc::new(FleetStore::new(target, SqliteStore::open(dir).unwrap()))
}

/// A node connected to Redis now.
async fn connected(url: &str, dir: &std::path::Path) -> Arc<FleetStore> {
    let n = node(url, dir);
    n.connect().await.unwrap();
    n
}

/// Poke the node until it sees Redis answer (bounded: 100 times, 100 ms apart).
async fn until_up(n: &FleetStore, mut poke: impl AsyncFnMut()) {
    for _ in 0..100 {
        poke().await;
        if n.health().up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the node did not see Redis answer: {:?}", n.health());
}

fn policy(domain: &str, id: &str, at: i64) -> CachedPolicy {
    CachedPolicy {
        domain: domain.into(),
        id: id.into(),
        policy: Policy::parse(&format!(
            "version: STSv1\nmode: enforce\nmx: mx.{domain}\nmax_age: 604800\n"
        ))
        .unwrap(),
        fetched_at: at,
    }
}

fn key(domain: &str) -> CounterKey {
    CounterKey {
        day: "2026-11-27".parse::<Day>().unwrap(),
        policy_domain: domain.into(),
        policy: PolicyKey {
            policy_type: PolicyType::NoPolicyFound,
            policy_strings: vec![],
            mx_host: vec![],
        },
        failure: None,
    }
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("a fleet store call did not come back")
}

/// Total of `domain`'s counters as Redis holds them (read by a fresh connection).
async fn total_in_redis(server: &RedisServer, domain: &str) -> u64 {
    let r = RedisStore::connect(&server.url(), "fleet:").await.unwrap();
    r.counts(None, Some(domain.into()))
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum()
}

/// Call `drain` until it succeeds with nothing left (bounded: 100 tries, 100 ms
/// apart; the node waits `retry` = 1 s after a failure).
async fn drained(n: &FleetStore) {
    for _ in 0..100 {
        if bounded(n.drain()).await.is_ok() && n.health().spilled_batches == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("spilled counters were not sent: {:?}", n.health());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_gets_the_fleets_policies_and_keeps_them_without_redis() {
    if redis_server::skip() {
        return;
    }
    let mut server = RedisServer::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = connected(&server.url(), da.path()).await;
    let p = policy("shared.test", "1", 1_000);
    a.put_policy(&p).await.unwrap();

    // A node that joins has an empty local store; it gets the policy from Redis…
    let b = connected(&server.url(), db.path()).await;
    assert_eq!(b.get_policy("shared.test").await.unwrap(), Some(p.clone()));
    // …and keeps a copy, so that a restart while Redis is down is no downgrade window.
    assert_eq!(
        b.local().get_policy("shared.test").await.unwrap(),
        Some(p.clone())
    );
    drop(b);
    server.stop();
    let b = node(&server.url(), db.path());
    assert!(b.connect().await.is_err());
    assert_eq!(bounded(b.get_policy("shared.test")).await.unwrap(), Some(p));
    assert!(!b.health().up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_come_from_the_local_copy_while_redis_is_down_and_are_given_back() {
    if redis_server::skip() {
        return;
    }
    let mut server = RedisServer::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = connected(&server.url(), da.path()).await;
    let p1 = policy("down.test", "1", 1_000);
    a.put_policy(&p1).await.unwrap();

    server.stop();
    assert_eq!(bounded(a.get_policy("down.test")).await.unwrap(), Some(p1));
    let health = a.health();
    assert!(!health.up);
    assert!(health.last_error.is_some());
    // A newer fetch while Redis is down is kept locally (the write does not fail).
    let p2 = policy("down.test", "2", 2_000);
    bounded(a.put_policy(&p2)).await.unwrap();
    assert_eq!(
        bounded(a.get_policy("down.test")).await.unwrap(),
        Some(p2.clone())
    );
    assert_eq!(bounded(a.all_policies()).await.unwrap(), vec![p2.clone()]);

    // Redis comes back empty (no persistence): the node's copy is given back to it on
    // the next read, so a node that joins gets it.
    server.start_again();
    until_up(&a, async || {
        assert_eq!(
            bounded(a.get_policy("down.test")).await.unwrap(),
            Some(p2.clone())
        );
    })
    .await;
    // The copy is given back in the background: wait for it (bounded).
    let r = RedisStore::connect(&server.url(), "fleet:").await.unwrap();
    for _ in 0..100 {
        if r.get_policy("down.test").await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = connected(&server.url(), db.path()).await;
    assert_eq!(b.get_policy("down.test").await.unwrap(), Some(p2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_dropped_while_it_tries_redis_again_does_not_lock_the_node_out() {
    if redis_server::skip() {
        return;
    }
    let server = RedisServer::start();
    let da = tempfile::tempdir().unwrap();
    let a = connected(&server.url(), da.path()).await;
    let p = policy("probe.test", "1", 1_000);
    a.put_policy(&p).await.unwrap();
    server.pause();
    assert_eq!(
        bounded(a.get_policy("probe.test")).await.unwrap(),
        Some(p.clone())
    );
    assert!(!a.health().up);
    // After `retry` (1 s) the next call tries Redis again; its caller gives up on it
    // before Redis answers (a status page request whose client went away).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cut = tokio::time::timeout(Duration::from_millis(50), a.get_policy("probe.test")).await;
    assert!(
        cut.is_err(),
        "the call was to be cut off while it waited for Redis"
    );
    server.resume();
    // Without the probe being released, the node would never try Redis again.
    until_up(&a, async || {
        assert_eq!(
            bounded(a.get_policy("probe.test")).await.unwrap(),
            Some(p.clone())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_does_not_hold_lookups_or_counters() {
    if redis_server::skip() {
        return;
    }
    let server = RedisServer::start();
    let da = tempfile::tempdir().unwrap();
    let a = connected(&server.url(), da.path()).await;
    let p = policy("hung.test", "1", 1_000);
    a.put_policy(&p).await.unwrap();
    a.add_counts(vec![(key("hung.test"), 1)]).await.unwrap();

    // Redis accepts connections but answers nothing.
    server.pause();
    // The first batch is sent and not answered: Redis will apply it when it wakes,
    // and the node, not knowing, keeps it locally to send again. It must count once.
    bounded(a.add_counts(vec![(key("hung.test"), 10)]))
        .await
        .unwrap();
    assert!(!a.health().up);
    assert_eq!(a.health().spilled_batches, 1);
    assert_eq!(bounded(a.get_policy("hung.test")).await.unwrap(), Some(p));
    // Later batches are not sent (Redis is known down): kept locally behind it, merged
    // into one (none of them was sent, so they can be summed safely).
    for _ in 0..4 {
        bounded(a.add_counts(vec![(key("hung.test"), 10)]))
            .await
            .unwrap();
    }
    assert_eq!(a.health().spilled_batches, 2);
    // Reports are not made or claimed from a local copy: they wait for Redis.
    assert!(bounded(a.ledger_claim_due(i64::MAX, 60)).await.is_err());
    assert!(
        bounded(a.day_done("2026-11-27".parse().unwrap()))
            .await
            .is_err()
    );

    server.resume();
    drained(&a).await;
    assert_eq!(total_in_redis(&server, "hung.test").await, 51);
    // Draining again sends nothing more.
    assert_eq!(bounded(a.drain()).await.unwrap(), 0);
    assert_eq!(total_in_redis(&server, "hung.test").await, 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_kept_while_redis_is_down_reach_it_from_both_nodes_and_across_a_node_restart() {
    if redis_server::skip() {
        return;
    }
    let mut server = RedisServer::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = connected(&server.url(), da.path()).await;
    let b = connected(&server.url(), db.path()).await;

    server.stop();
    for i in 0..20u64 {
        let (n, add) = if i % 2 == 0 { (&a, 1) } else { (&b, 100) };
        bounded(n.add_counts(vec![(key("sum.test"), add)]))
            .await
            .unwrap();
    }
    // Ten batches each, kept as two: the first (which was sent) and the rest merged.
    assert_eq!(a.health().spilled_batches, 2);
    assert_eq!(b.health().spilled_batches, 2);
    // Node a restarts while Redis is still down: its spilled counters are on disk.
    drop(a);
    let a = node(&server.url(), da.path());
    assert!(a.connect().await.is_err());

    server.start_again();
    drained(&a).await;
    drained(&b).await;
    assert_eq!(total_in_redis(&server, "sum.test").await, 10 + 1000);
    // Either node reads the fleet's sum.
    let sum = |v: Vec<(CounterKey, u64)>| v.iter().map(|(_, n)| n).sum::<u64>();
    assert_eq!(sum(bounded(b.counts(None, None)).await.unwrap()), 1010);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_redis_is_down_connects_when_it_comes_back() {
    if redis_server::skip() {
        return;
    }
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let da = tempfile::tempdir().unwrap();
    let a = node(&url, da.path());
    assert!(a.connect().await.is_err());
    // It works from its local store meanwhile.
    let p = policy("late.test", "1", 1_000);
    bounded(a.put_policy(&p)).await.unwrap();
    bounded(a.add_counts(vec![(key("late.test"), 7)]))
        .await
        .unwrap();

    server.start_again();
    // The background connection attempt (every second) finds it.
    drained(&a).await;
    assert!(a.health().up);
    assert_eq!(total_in_redis(&server, "late.test").await, 7);
    assert_eq!(a.get_policy("late.test").await.unwrap(), Some(p.clone()));
    let r = RedisStore::connect(&url, "fleet:").await.unwrap();
    assert_eq!(r.get_policy("late.test").await.unwrap(), Some(p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_counts_once() {
    if redis_server::skip() {
        return;
    }
    let server = RedisServer::start();
    let r = RedisStore::connect(&server.url(), "fleet:").await.unwrap();
    let batch = vec![(key("once.test"), 3)];
    assert!(r.add_counts_once("w1", 5, &batch).await.unwrap());
    assert!(!r.add_counts_once("w1", 5, &batch).await.unwrap());
    assert!(!r.add_counts_once("w1", 4, &batch).await.unwrap());
    // Another writer has its own sequence.
    assert!(r.add_counts_once("w2", 0, &batch).await.unwrap());
    assert!(r.add_counts_once("w1", 6, &batch).await.unwrap());
    assert_eq!(total_in_redis(&server, "once.test").await, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_wait_for_counters_another_node_still_keeps() {
    if redis_server::skip() {
        return;
    }
    let mut server = RedisServer::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = connected(&server.url(), da.path()).await;
    let b = connected(&server.url(), db.path()).await;
    let day: Day = "2026-11-27".parse().unwrap();
    assert!(a.counts_complete(day).await.unwrap());

    // Redis goes; node b keeps a count of that day; node a notices the outage.
    server.stop();
    bounded(b.add_counts(vec![(key("late.test"), 1)]))
        .await
        .unwrap();
    bounded(a.tick()).await;
    assert!(
        bounded(a.counts_complete(day)).await.is_err(),
        "reports wait while Redis is down"
    );

    server.start_again();
    until_up(&a, async || bounded(a.tick()).await).await;
    // Just back: the other nodes have not had time to say what they kept.
    assert!(!a.counts_complete(day).await.unwrap());
    // A node that says it keeps counts of the day holds the reports back (here a
    // third node, which has not sent them yet)…
    let raw = RedisStore::connect(&server.url(), "fleet:").await.unwrap();
    let now = stsrelay::clock::Clock::now(&stsrelay::clock::SystemClock);
    raw.announce("node-c", now, Some(day)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await; // past retry (1 s) + 5 s
    assert!(!a.counts_complete(day).await.unwrap());
    // …and not a later day's.
    raw.announce("node-c", now, Some(day.next())).await.unwrap();
    // Node b sends what it kept and says so.
    bounded(b.tick()).await;
    assert_eq!(b.health().spilled_batches, 0);
    assert!(a.counts_complete(day).await.unwrap());
    assert_eq!(total_in_redis(&server, "late.test").await, 1);
}
