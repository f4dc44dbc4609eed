//! Session results to durable counters without slowing delivery: `record` only queues
//! (never blocks; drops and counts when the queue is full), a background task sums each
//! batch and adds it to the store's counters in one transaction.

use super::{SessionRecorder, SessionResult, count};
use crate::store::ReportStore;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Results waiting to be written; beyond this, new results are dropped (and counted).
const QUEUE: usize = 65_536;
/// Most results written in one transaction.
const BATCH: usize = 1024;

/// A [`SessionRecorder`] that adds results to a [`ReportStore`]'s counters.
pub struct StoreRecorder {
    tx: mpsc::Sender<SessionResult>,
    dropped: Arc<AtomicU64>,
}

impl StoreRecorder {
    /// Start the writer task on the current runtime.
    pub fn spawn(store: Arc<dyn ReportStore>) -> StoreRecorder {
        let (tx, mut rx) = mpsc::channel::<SessionResult>(QUEUE);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let n = batch.len();
                let counts = count(&std::mem::take(&mut batch));
                if let Err(e) = store.add_counts(counts).await {
                    tracing::error!(error = %e, lost = n, "cannot store TLS session results");
                }
                // Let a burst accumulate into one transaction.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        StoreRecorder {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Results dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl SessionRecorder for StoreRecorder {
    fn record(&self, result: SessionResult) {
        super::LogRecorder.record(result.clone());
        if self.tx.try_send(result).is_err() {
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
