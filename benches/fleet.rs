//! The fleet store (`storage.backend = "redis"`) against a real `redis-server` on
//! loopback: what a policy lookup and a counter batch cost with Redis up, what a lookup
//! costs while Redis hangs (the first call waits `redis_timeout_ms`, the next ones go
//! straight to the local copy), and how fast counters kept during an outage reach Redis.
//! `cargo bench --bench fleet` (needs `redis-server`; `BENCH_N`, default 5000).

#[path = "../tests/common/redis.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};
use stsrelay::store::{FleetStore, PolicyStore, RedisTarget, ReportStore, SqliteStore};
use stsrelay::sts::{CachedPolicy, Policy};
use stsrelay::tlsrpt::{CounterKey, PolicyKey, PolicyType};

fn policy(i: usize) -> CachedPolicy {
    CachedPolicy {
        domain: format!("d{i}.example"),
        id: "1".into(),
        policy: Policy::parse(&format!(
            "version: STSv1\nmode: enforce\nmx: mx.d{i}.example\nmax_age: 604800\n"
        ))
        .unwrap(),
        fetched_at: 1_000,
    }
}

fn key(i: usize) -> CounterKey {
    CounterKey {
        day: "2026-11-28".parse().unwrap(),
        policy_domain: format!("d{}.example", i % 100),
        policy: PolicyKey {
            policy_type: PolicyType::NoPolicyFound,
            policy_strings: vec![],
            mx_host: vec![],
        },
        failure: None,
    }
}

fn micros(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let server = redis_server::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(500);
    let fleet = Arc::new(FleetStore::new(
        RedisTarget {
            url: server.url(),
            prefix: "bench:".into(),
            ca_pem: None,
            timeout,
            retry: Duration::from_secs(5),
        },
        SqliteStore::open(dir.path()).unwrap(),
    ));
    fleet.connect().await.unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("alone")).unwrap();

    for i in 0..n {
        fleet.put_policy(&policy(i)).await.unwrap();
        sqlite.put_policy(&policy(i)).await.unwrap();
    }
    let t = Instant::now();
    for i in 0..n {
        assert!(
            fleet
                .get_policy(&format!("d{i}.example"))
                .await
                .unwrap()
                .is_some()
        );
    }
    let fleet_get = micros(t.elapsed(), n);
    let t = Instant::now();
    for i in 0..n {
        assert!(
            sqlite
                .get_policy(&format!("d{i}.example"))
                .await
                .unwrap()
                .is_some()
        );
    }
    let sqlite_get = micros(t.elapsed(), n);
    println!(
        "policy read (memory-cache miss), Redis up: fleet {fleet_get:.0} µs, SQLite alone {sqlite_get:.0} µs"
    );

    let batch: Vec<(CounterKey, u64)> = (0..10).map(|i| (key(i), 1)).collect();
    let t = Instant::now();
    for _ in 0..n {
        fleet.add_counts(batch.clone()).await.unwrap();
    }
    println!(
        "counter batch (10 counters), Redis up: fleet {:.0} µs",
        micros(t.elapsed(), n)
    );

    // Redis hangs: the first call waits for the timeout, the next ones do not ask it.
    server.pause();
    let t = Instant::now();
    assert!(fleet.get_policy("d0.example").await.unwrap().is_some());
    let first = t.elapsed();
    let t = Instant::now();
    for i in 0..n {
        assert!(
            fleet
                .get_policy(&format!("d{i}.example"))
                .await
                .unwrap()
                .is_some()
        );
    }
    let after = micros(t.elapsed(), n);
    println!(
        "Redis hung: first policy read {:.0} ms (timeout {} ms), then {after:.0} µs per read from the local copy",
        first.as_secs_f64() * 1e3,
        timeout.as_millis()
    );
    let t = Instant::now();
    for _ in 0..n {
        fleet.add_counts(batch.clone()).await.unwrap();
    }
    println!(
        "Redis hung: counter batch kept locally in {:.0} µs; {} batches kept for {n} sent",
        micros(t.elapsed(), n),
        fleet.health().spilled_batches
    );
    server.resume();
    tokio::time::sleep(Duration::from_secs(6)).await; // past redis_retry_secs
    let t = Instant::now();
    let mut sent = 0;
    for _ in 0..100 {
        if let Ok(k) = fleet.drain().await {
            sent += k;
            if fleet.health().spilled_batches == 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total: u64 = fleet
        .counts(None, None)
        .await
        .unwrap()
        .iter()
        .map(|(_, c)| c)
        .sum();
    println!(
        "after Redis returns: {sent} kept batches sent in {:.1} ms; Redis holds {total} counts (expected {})",
        t.elapsed().as_secs_f64() * 1e3,
        2 * n * 10
    );
    assert_eq!(total, (2 * n * 10) as u64);
}
