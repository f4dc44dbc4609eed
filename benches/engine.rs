//! Benchmark of cached policy decisions and of memory with many cached policies.
//!
//! `cargo bench --bench engine` prints decisions/s on one core (a current-thread
//! runtime) and the process RSS with 100,000 policies cached. Policies are written to
//! the SQLite store first and then loaded by the engine through its normal
//! restart path (store -> memory), so no network is involved in the timed loop.

use std::sync::Arc;
use std::time::{Duration, Instant};
use stsrelay::dns::Resolver;
use stsrelay::store::{PolicyStore, SqliteStore};
use stsrelay::sts::{CachedPolicy, Engine, EngineOptions, FetchError, Policy, PolicyFetcher};

const DOMAINS: usize = 100_000;
const DECISIONS: usize = 5_000_000;

/// The timed loop never fetches; a fetch would be a bug in the benchmark.
struct NoFetch;

#[async_trait::async_trait]
impl PolicyFetcher for NoFetch {
    async fn fetch(&self, domain: &str) -> Result<Policy, FetchError> {
        panic!("benchmark fetched {domain}: the cache was not used");
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let domains: Vec<String> = (0..DOMAINS).map(|i| format!("domain{i}.example")).collect();
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            let t = Instant::now();
            for d in &domains {
                let body = format!(
                    "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 604800\n"
                );
                store
                    .put_policy(&CachedPolicy {
                        domain: d.clone(),
                        id: "20261128".into(),
                        policy: Policy::parse(&body).unwrap(),
                        fetched_at: now,
                    })
                    .await
                    .unwrap();
            }
            println!("store: wrote {DOMAINS} policies in {:.1?}", t.elapsed());
        }
        let rss_before = rss_kib();
        // 127.0.0.1:9 is never queried: every domain is answered from the cache.
        let resolver = Resolver::new(&["127.0.0.1:9".parse().unwrap()], Duration::from_secs(1)).unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let engine = Engine::builder(Arc::new(resolver), Arc::new(NoFetch), Arc::new(store))
            .options(EngineOptions {
                txt_recheck: Duration::from_secs(86_400),
                ..EngineOptions::default()
            })
            .build();
        let t = Instant::now();
        for d in &domains {
            let l = engine.policy(d).await.unwrap();
            assert!(l.policy.is_some());
        }
        println!("load: {DOMAINS} policies from the store into memory in {:.1?}", t.elapsed());
        let rss_loaded = rss_kib();

        let mut allowed = 0usize;
        let t = Instant::now();
        for i in 0..DECISIONS {
            let d = &domains[(i.wrapping_mul(7919)) % DOMAINS];
            let l = engine.policy(d).await.unwrap();
            // Half the decisions are for an allowed MX, half for a foreign one.
            let mx = if i % 2 == 0 { "a.mx.example.net" } else { "mx1.domain1.example" };
            if l.check_mx(mx).may_deliver() {
                allowed += 1;
            }
        }
        let el = t.elapsed();
        std::hint::black_box(allowed);
        println!(
            "cached decisions: {DECISIONS} in {:.2?} = {:.0} decisions/s on one core ({:.0} ns each)",
            el,
            DECISIONS as f64 / el.as_secs_f64(),
            el.as_nanos() as f64 / DECISIONS as f64
        );
        // The same with a hot set of 1,000 domains (typical relay traffic is skewed).
        let t = Instant::now();
        for i in 0..DECISIONS {
            let d = &domains[(i.wrapping_mul(7919)) % 1_000];
            let l = engine.policy(d).await.unwrap();
            if l.check_mx("a.mx.example.net").may_deliver() {
                allowed += 1;
            }
        }
        let el = t.elapsed();
        std::hint::black_box(allowed);
        println!(
            "cached decisions, hot set of 1,000 domains: {:.0} decisions/s on one core ({:.0} ns each)",
            DECISIONS as f64 / el.as_secs_f64(),
            el.as_nanos() as f64 / DECISIONS as f64
        );
        println!(
            "memory: RSS {:.1} MiB with {DOMAINS} policies cached ({:.1} MiB before the engine; +{:.1} MiB)",
            rss_loaded as f64 / 1024.0,
            rss_before as f64 / 1024.0,
            (rss_loaded.saturating_sub(rss_before)) as f64 / 1024.0
        );
        println!("fetches during the run: {}", engine.stats().fetches.load(std::sync::atomic::Ordering::Relaxed));
    });
}
