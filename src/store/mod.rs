//! Persistence behind one trait, so the embedded SQLite store and a shared store for
//! several nodes are interchangeable. So far it holds MTA-STS policies.

mod memory;
mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

use crate::sts::CachedPolicy;

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
