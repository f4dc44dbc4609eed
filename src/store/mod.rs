//! Persistence behind traits, so the embedded SQLite store and a shared store for
//! several nodes can be swapped: MTA-STS policies ([`PolicyStore`]: SQLite, Redis, or
//! memory for library users) and TLS-RPT counters and the report ledger
//! ([`ReportStore`]: SQLite or Redis); [`Store`] is both.
//!
//! The relay opens what `[storage]` names with [`Backend::open`]: SQLite in
//! `storage.data_dir`, or, with `backend = "redis"`, a [`FleetStore`]: Redis shared
//! by every node, with the node's SQLite as the fallback when Redis is down.

mod fleet;
mod memory;
mod redis;
mod sqlite;

pub use fleet::{FleetHealth, FleetStore, RedisTarget, redact};
pub use memory::MemoryStore;
pub use redis::RedisStore;
pub use sqlite::SqliteStore;

use crate::config::StorageBackend;
use std::sync::Arc;
use std::time::Duration;

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
    /// Are all of `day`'s counters in, so its reports can be made? `false` while
    /// another node of a fleet still holds some of them (kept while Redis was down).
    /// A single store is always complete.
    async fn counts_complete(&self, _day: Day) -> Result<bool, StoreError> {
        Ok(true)
    }
}

#[async_trait::async_trait]
impl<T: PolicyStore + ?Sized> PolicyStore for Arc<T> {
    async fn get_policy(&self, domain: &str) -> Result<Option<CachedPolicy>, StoreError> {
        (**self).get_policy(domain).await
    }
    async fn put_policy(&self, policy: &CachedPolicy) -> Result<(), StoreError> {
        (**self).put_policy(policy).await
    }
    async fn delete_policy(&self, domain: &str) -> Result<(), StoreError> {
        (**self).delete_policy(domain).await
    }
    async fn all_policies(&self) -> Result<Vec<CachedPolicy>, StoreError> {
        (**self).all_policies().await
    }
}

#[async_trait::async_trait]
impl<T: ReportStore + ?Sized> ReportStore for Arc<T> {
    async fn add_counts(&self, counts: Vec<(CounterKey, u64)>) -> Result<(), StoreError> {
        (**self).add_counts(counts).await
    }
    async fn counts(
        &self,
        day: Option<Day>,
        domain: Option<String>,
    ) -> Result<Vec<(CounterKey, u64)>, StoreError> {
        (**self).counts(day, domain).await
    }
    async fn ledger_insert(&self, rows: Vec<LedgerEntry>) -> Result<usize, StoreError> {
        (**self).ledger_insert(rows).await
    }
    async fn ledger_claim_due(
        &self,
        now: i64,
        lease_secs: i64,
    ) -> Result<Option<LedgerEntry>, StoreError> {
        (**self).ledger_claim_due(now, lease_secs).await
    }
    async fn ledger_update(&self, row: &LedgerEntry) -> Result<bool, StoreError> {
        (**self).ledger_update(row).await
    }
    async fn ledger_list(&self, day: Option<Day>) -> Result<Vec<LedgerEntry>, StoreError> {
        (**self).ledger_list(day).await
    }
    async fn day_done(&self, day: Day) -> Result<bool, StoreError> {
        (**self).day_done(day).await
    }
    async fn mark_day_done(&self, day: Day, at: i64) -> Result<(), StoreError> {
        (**self).mark_day_done(day, at).await
    }
    async fn prune_before(&self, day: Day) -> Result<(), StoreError> {
        (**self).prune_before(day).await
    }
    async fn counts_complete(&self, day: Day) -> Result<bool, StoreError> {
        (**self).counts_complete(day).await
    }
}

/// A store of policies and of TLS-RPT state: what the relay needs.
pub trait Store: PolicyStore + ReportStore {}

impl<T: PolicyStore + ReportStore + ?Sized> Store for T {}

/// The store `[storage]` names, opened.
///
/// ```
/// # tokio_test_block_on(async {
/// let dir = tempfile_dir();
/// let mut cfg = stsrelay::Config::default();
/// cfg.storage.data_dir = dir.clone();
/// let backend = stsrelay::store::Backend::open(&cfg).unwrap();
/// assert!(backend.fleet().is_none()); // SQLite: one node
/// assert!(backend.policies().get_policy("example.com").await.unwrap().is_none());
/// # std::fs::remove_dir_all(dir).unwrap();
/// # });
/// # fn tempfile_dir() -> std::path::PathBuf {
/// #     let d = std::env::temp_dir().join(format!("stsrelay-doc-{}", std::process::id()));
/// #     std::fs::create_dir_all(&d).unwrap();
/// #     d
/// # }
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Clone)]
pub enum Backend {
    /// SQLite in `storage.data_dir`.
    Sqlite(Arc<SqliteStore>),
    /// Redis at `storage.redis_url`, SQLite as the fallback.
    Redis(Arc<FleetStore>),
}

impl Backend {
    /// Open the store of `cfg.storage`. Redis is not contacted yet
    /// ([`Backend::connect`]); the local SQLite file is opened (and created).
    pub fn open(cfg: &crate::Config) -> Result<Backend, StoreError> {
        let st = &cfg.storage;
        let local = SqliteStore::open(&st.data_dir)?;
        match st.backend {
            StorageBackend::Sqlite => Ok(Backend::Sqlite(Arc::new(local))),
            StorageBackend::Redis => {
                let ca_pem = match &st.redis_ca_file {
                    Some(path) => Some(std::fs::read(path).map_err(|e| StoreError {
                        op: "read storage.redis_ca_file",
                        reason: format!("{}: {e}", path.display()),
                    })?),
                    None => None,
                };
                let target = RedisTarget {
                    url: st.redis_url.clone().unwrap_or_default(),
                    prefix: st.redis_prefix.clone(),
                    ca_pem,
                    timeout: Duration::from_millis(st.redis_timeout_ms),
                    retry: Duration::from_secs(st.redis_retry_secs),
                };
                Ok(Backend::Redis(Arc::new(FleetStore::new(target, local))))
            }
        }
    }

    /// With Redis, connect now (bounded); on failure log it and go on from the
    /// fallback (a connection is retried in the background). Nothing to do for SQLite.
    pub async fn connect(&self) {
        if let Backend::Redis(f) = self {
            match f.connect().await {
                Ok(()) => {
                    tracing::info!(url = %f.health().url, "connected to Redis (storage.backend = redis)")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Redis unreachable at start; running from the local fallback until it answers")
                }
            }
        }
    }

    /// The policy store.
    pub fn policies(&self) -> Arc<dyn PolicyStore> {
        match self {
            Backend::Sqlite(s) => s.clone(),
            Backend::Redis(f) => f.clone(),
        }
    }

    /// The TLS-RPT store.
    pub fn reports(&self) -> Arc<dyn ReportStore> {
        match self {
            Backend::Sqlite(s) => s.clone(),
            Backend::Redis(f) => f.clone(),
        }
    }

    /// The fleet store, with `backend = "redis"`.
    pub fn fleet(&self) -> Option<&Arc<FleetStore>> {
        match self {
            Backend::Sqlite(_) => None,
            Backend::Redis(f) => Some(f),
        }
    }

    /// `sqlite` or `redis`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Redis(_) => "redis",
        }
    }
}
