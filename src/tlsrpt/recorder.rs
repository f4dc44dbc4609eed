//! Session results to durable counters without slowing delivery: `record` only queues
//! (never blocks; drops and counts when the queue is full), a background task sums each
//! batch and adds it to the store's counters in one transaction.

use super::{CounterKey, SessionRecorder, SessionResult, count};
use crate::store::ReportStore;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Results waiting to be written; beyond this, new results are dropped (and counted).
const QUEUE: usize = 65_536;
/// Most results written in one transaction.
const BATCH: usize = 1024;
/// Distinct counters kept for a retry while the store fails; beyond this the oldest
/// unwritten counts are given up (and logged).
const CARRY: usize = 100_000;

/// A [`SessionRecorder`] that adds results to a [`ReportStore`]'s counters.
pub struct StoreRecorder {
    tx: mpsc::Sender<SessionResult>,
    dropped: Arc<AtomicU64>,
    /// Results queued but not yet written (or given up on).
    pending: Arc<AtomicU64>,
}

impl StoreRecorder {
    /// Start the writer task on the current runtime.
    pub fn spawn(store: Arc<dyn ReportStore>) -> StoreRecorder {
        let (tx, mut rx) = mpsc::channel::<SessionResult>(QUEUE);
        let pending = Arc::new(AtomicU64::new(0));
        let written = pending.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            // Counts the store refused, retried with the next batch.
            let mut carry: HashMap<CounterKey, u64> = HashMap::new();
            let mut carried = 0u64;
            loop {
                // With counts waiting for a retry, do not wait for new results longer
                // than a second.
                let received = if carry.is_empty() {
                    rx.recv_many(&mut batch, BATCH).await
                } else {
                    tokio::time::timeout(Duration::from_secs(1), rx.recv_many(&mut batch, BATCH))
                        .await
                        .unwrap_or(usize::MAX)
                };
                if received == 0 && carry.is_empty() {
                    break; // every recorder handle is gone and everything is written
                }
                let n = batch.len() as u64;
                for (k, c) in count(&std::mem::take(&mut batch)) {
                    *carry.entry(k).or_default() += c;
                }
                carried += n;
                let counts: Vec<_> = carry.iter().map(|(k, c)| (k.clone(), *c)).collect();
                let stored = store.add_counts(counts).await;
                if let Err(e) = &stored {
                    tracing::error!(error = %e, results = carried, "cannot store TLS session results; will retry");
                }
                let give_up = stored.is_err() && (carry.len() > CARRY || received == 0);
                if give_up {
                    tracing::error!(
                        lost = carried,
                        "TLS session results given up: the store has failed too long"
                    );
                }
                if stored.is_ok() || give_up {
                    carry.clear();
                    written.fetch_sub(carried, Ordering::SeqCst);
                    carried = 0;
                }
                if received == 0 {
                    break;
                }
                // After a success, let a burst accumulate into one transaction; after a
                // failure, give the store a moment.
                let pause = if stored.is_ok() { 20 } else { 1000 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
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
        let store = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let rec = StoreRecorder::spawn(store.clone());
        for i in 0..3000 {
            rec.record(result(i));
        }
        assert!(rec.flush(Duration::from_secs(30)).await);
        let stored: u64 = store
            .counts(None, None)
            .await
            .unwrap()
            .iter()
            .map(|(_, n)| n)
            .sum();
        assert_eq!(stored, 3000);
        assert_eq!(rec.dropped(), 0);
        // Nothing pending: returns at once.
        assert!(rec.flush(Duration::ZERO).await);
    }

    /// A store whose first `fail` writes fail (disk full, lock timeout).
    struct Failing {
        inner: crate::store::SqliteStore,
        fail: AtomicU64,
    }

    #[async_trait::async_trait]
    impl ReportStore for Failing {
        async fn add_counts(
            &self,
            c: Vec<(CounterKey, u64)>,
        ) -> Result<(), crate::store::StoreError> {
            if self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(crate::store::StoreError {
                    op: "add counts",
                    reason: "disk full".into(),
                });
            }
            self.inner.add_counts(c).await
        }
        async fn counts(
            &self,
            d: Option<crate::tlsrpt::Day>,
            x: Option<String>,
        ) -> Result<Vec<(CounterKey, u64)>, crate::store::StoreError> {
            self.inner.counts(d, x).await
        }
        async fn ledger_insert(
            &self,
            r: Vec<crate::tlsrpt::LedgerEntry>,
        ) -> Result<usize, crate::store::StoreError> {
            self.inner.ledger_insert(r).await
        }
        async fn ledger_claim_due(
            &self,
            now: i64,
            lease: i64,
        ) -> Result<Option<crate::tlsrpt::LedgerEntry>, crate::store::StoreError> {
            self.inner.ledger_claim_due(now, lease).await
        }
        async fn ledger_update(
            &self,
            r: &crate::tlsrpt::LedgerEntry,
        ) -> Result<bool, crate::store::StoreError> {
            self.inner.ledger_update(r).await
        }
        async fn ledger_list(
            &self,
            d: Option<crate::tlsrpt::Day>,
        ) -> Result<Vec<crate::tlsrpt::LedgerEntry>, crate::store::StoreError> {
            self.inner.ledger_list(d).await
        }
        async fn day_done(&self, d: crate::tlsrpt::Day) -> Result<bool, crate::store::StoreError> {
            self.inner.day_done(d).await
        }
        async fn mark_day_done(
            &self,
            d: crate::tlsrpt::Day,
            at: i64,
        ) -> Result<(), crate::store::StoreError> {
            self.inner.mark_day_done(d, at).await
        }
        async fn prune_before(
            &self,
            d: crate::tlsrpt::Day,
        ) -> Result<(), crate::store::StoreError> {
            self.inner.prune_before(d).await
        }
    }

    #[tokio::test]
    async fn counts_the_store_refused_are_retried_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Failing {
            inner: crate::store::SqliteStore::open(dir.path()).unwrap(),
            fail: AtomicU64::new(2),
        });
        let rec = StoreRecorder::spawn(store.clone());
        for i in 0..500 {
            rec.record(result(i));
        }
        assert!(rec.flush(Duration::from_secs(30)).await);
        assert_eq!(
            store.fail.load(Ordering::SeqCst),
            0,
            "the failures happened"
        );
        let stored: u64 = store
            .counts(None, None)
            .await
            .unwrap()
            .iter()
            .map(|(_, n)| n)
            .sum();
        assert_eq!(stored, 500);
    }
}
