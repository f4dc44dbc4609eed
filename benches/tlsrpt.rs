//! TLS-RPT recording cost: what delivery pays per session (`SessionRecorder::record`,
//! which only queues) and how fast the background writer turns results into durable
//! counters in SQLite. `cargo bench --bench tlsrpt` (`BENCH_SESSIONS`, default 200000).
//! The relay benchmark (`relay_load`) runs with recording on.

use std::sync::Arc;
use std::time::{Duration, Instant};
use stsrelay::store::{ReportStore, SqliteStore};
use stsrelay::tlsrpt::{
    PolicyType, ResultType, SessionFailure, SessionRecorder, SessionResult, StoreRecorder,
};

fn result(i: usize, at: i64) -> SessionResult {
    let domain = i % 1000;
    SessionResult {
        at,
        policy_domain: format!("d{domain}.example"),
        policy_type: PolicyType::Sts,
        policy_strings: vec![
            "version: STSv1".into(),
            "mode: enforce".into(),
            format!("mx: mx.d{domain}.example"),
            "max_age: 86400".into(),
        ],
        mx_host_patterns: vec![format!("mx.d{domain}.example")],
        receiving_mx_hostname: format!("mx.d{domain}.example"),
        receiving_ip: Some(format!("192.0.2.{}", domain % 250).parse().unwrap()),
        receiving_mx_helo: Some(format!("mx.d{domain}.example")),
        sending_ip: Some("198.51.100.1".parse().unwrap()),
        failure: (i / 1000).is_multiple_of(10).then(|| SessionFailure {
            result_type: ResultType::CertificateExpired,
            reason_code: "certificate-expired".into(),
        }),
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let recorder = StoreRecorder::spawn(store.clone());
    let at = 1_795_737_600;
    let results: Vec<SessionResult> = (0..n).map(|i| result(i, at)).collect();

    // Delivery's side: record() in bursts below the queue's capacity.
    let mut spent = Duration::ZERO;
    let start = Instant::now();
    let mut sent = 0usize;
    for chunk in results.chunks(50_000) {
        let t = Instant::now();
        for r in chunk {
            recorder.record(r.clone());
        }
        spent += t.elapsed();
        sent += chunk.len();
        // Let the writer catch up before the next burst (bounded wait).
        for _ in 0..6000 {
            let stored: u64 = store
                .counts(None, None)
                .await
                .unwrap()
                .iter()
                .map(|(_, c)| c)
                .sum();
            if stored as usize >= sent {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let total = start.elapsed();
    let stored: u64 = store
        .counts(None, None)
        .await
        .unwrap()
        .iter()
        .map(|(_, c)| c)
        .sum();
    let rows = store.counts(None, None).await.unwrap().len();
    println!(
        "{n} session results (1,000 domains, 10% failures): record() {:.0} ns per call on the delivery path; \
         stored as {rows} counters at {:.0} results/s (all {stored} durable after {total:.2?}); dropped {}",
        spent.as_nanos() as f64 / n as f64,
        stored as f64 / total.as_secs_f64(),
        recorder.dropped()
    );
}
