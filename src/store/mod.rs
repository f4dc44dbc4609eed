//! Persistence behind traits, so the embedded SQLite store and a shared store for
//! several nodes can be swapped: MTA-STS policies ([`PolicyStore`]: SQLite, Redis, or
//! memory for library users) and TLS-RPT counters and the report ledger
//! ([`ReportStore`]: SQLite or Redis). The relay uses SQLite so far; wiring Redis in
//! (`storage.backend`) is issue 6.

mod memory;
mod redis;
mod sqlite;

pub use memory::MemoryStore;
pub use redis::RedisStore;
pub use sqlite::SqliteStore;

use crate::sts::CachedPolicy;
use crate::tlsrpt::{CounterKey, Day, LedgerEntry};

/// A storage operation failed.
#[derive(Debug, thiserror::Error)]
#[error("store: {op}: {reason}")]
pub struct StoreError {
    /// What was being done.
    pub op: &'static str,
    /// Why it failed.
    pub reason: String,
}

/// Durable policy storage: what survives a restart so it cannot open a downgrade
/// window (R37).
#[async_trait::async_trait]
pub trait PolicyStore: Send + Sync {
    /// The stored policy of `domain`, expired or not.
    async fn get_policy(&self, domain: &str) -> Result<Option<CachedPolicy>, StoreError>;
    /// Insert or replace the policy of `policy.domain`.
    async fn put_policy(&self, policy: &CachedPolicy) -> Result<(), StoreError>;
    /// Remove a domain's policy.
    async fn delete_policy(&self, domain: &str) -> Result<(), StoreError>;
    /// Every stored policy (for proactive refresh and status).
    async fn all_policies(&self) -> Result<Vec<CachedPolicy>, StoreError>;
}

/// Durable TLS-RPT state: session counters and the ledger of reports (RFC 8460).
#[async_trait::async_trait]
pub trait ReportStore: Send + Sync {
    /// Add `n` to each counter (atomically per batch).
    async fn add_counts(&self, counts: Vec<(CounterKey, u64)>) -> Result<(), StoreError>;
    /// The counters of `day` (every day if `None`), of `domain` (every domain if `None`).
    async fn counts(
        &self,
        day: Option<Day>,
        domain: Option<String>,
    ) -> Result<Vec<(CounterKey, u64)>, StoreError>;
    /// Insert ledger rows whose (policy domain, day, rua) is new; returns how many were
    /// new. Rows that exist are left as they are: each destination gets one report. A
    /// new rua of a (domain, day) that already has a report gets that same report (id,
    /// file name, body), so every destination sees one report per domain and day.
    async fn ledger_insert(&self, rows: Vec<LedgerEntry>) -> Result<usize, StoreError>;
    /// Claim the pending row due first at `now`, if any, for `lease_secs`: until then no
    /// other claim (in any process) gets it, and only this claim's
    /// [`LedgerEntry::lease`] can update it.
    async fn ledger_claim_due(
        &self,
        now: i64,
        lease_secs: i64,
    ) -> Result<Option<LedgerEntry>, StoreError>;
    /// Store a claimed row's new state, attempts, times and result, and release the
    /// claim. `false` (nothing written) when the claim was lost: it expired and the row
    /// was claimed again, or is no longer pending.
    async fn ledger_update(&self, row: &LedgerEntry) -> Result<bool, StoreError>;
    /// Ledger rows (with their reports) of `day`, or of every day if `None`.
    async fn ledger_list(&self, day: Option<Day>) -> Result<Vec<LedgerEntry>, StoreError>;
    /// Have the reports of `day` been made?
    async fn day_done(&self, day: Day) -> Result<bool, StoreError>;
    /// Note that the reports of `day` have been made.
    async fn mark_day_done(&self, day: Day, at: i64) -> Result<(), StoreError>;
    /// Forget counters and ledger rows of days before `day`.
    async fn prune_before(&self, day: Day) -> Result<(), StoreError>;
}
