//! Session results to durable storage without slowing delivery: `record` only queues
//! (never blocks; drops and counts when the queue is full), a background task writes
//! batches to the store.

use super::{SessionRecorder, SessionResult};
use crate::store::SqliteStore;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Results waiting to be written; beyond this, new results are dropped (and counted).
const QUEUE: usize = 65_536;
/// Most results written in one transaction.
const BATCH: usize = 1024;

/// A [`SessionRecorder`] that stores results in the SQLite store.
pub struct StoreRecorder {
    tx: mpsc::Sender<SessionResult>,
    dropped: Arc<AtomicU64>,
    /// Results queued but not yet written (or given up on).
    pending: Arc<AtomicU64>,
}

impl StoreRecorder {
    /// Start the writer task on the current runtime.
    pub fn spawn(store: SqliteStore) -> StoreRecorder {
        let (tx, mut rx) = mpsc::channel::<SessionResult>(QUEUE);
        let pending = Arc::new(AtomicU64::new(0));
        let written = pending.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let n = batch.len();
                if let Err(e) = store.insert_sessions(std::mem::take(&mut batch)).await {
                    tracing::error!(error = %e, lost = n, "cannot store TLS session results");
                }
                written.fetch_sub(n as u64, Ordering::SeqCst);
                // Let a burst accumulate into one transaction.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        StoreRecorder {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
            pending,
        }
    }

    /// Wait until every result recorded so far is written, at most `within` (for a
    /// clean shutdown). True when nothing is left.
    pub async fn flush(&self, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.pending.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Results dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl SessionRecorder for StoreRecorder {
    fn record(&self, result: SessionResult) {
        super::LogRecorder.record(result.clone());
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.try_send(result).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "TLS session results dropped: the store cannot keep up"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(i: i64) -> SessionResult {
        SessionResult {
            at: i,
            policy_domain: "example.com".into(),
            policy_type: super::super::PolicyType::Sts,
            policy_strings: vec![],
            mx_host_patterns: vec![],
            receiving_mx_hostname: "mx.example.com".into(),
            receiving_ip: None,
            receiving_mx_helo: None,
            sending_ip: None,
            failure: None,
        }
    }

    #[tokio::test]
    async fn flush_waits_until_everything_recorded_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let rec = StoreRecorder::spawn(store.clone());
        for i in 0..3000 {
            rec.record(result(i));
        }
        assert!(rec.flush(Duration::from_secs(30)).await);
        assert_eq!(
            store.sessions_between(0, i64::MAX).await.unwrap().len(),
            3000
        );
        assert_eq!(rec.dropped(), 0);
        // Nothing pending: returns at once.
        assert!(rec.flush(Duration::ZERO).await);
    }
}
