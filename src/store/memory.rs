//! A store that keeps nothing across restarts: for library users who persist policies
//! elsewhere, and for examples. A relay must not use it (a restart would reopen the
//! first-contact downgrade window, R37).

use super::{PolicyStore, StoreError};
use crate::sts::CachedPolicy;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// In-memory [`PolicyStore`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    policies: Mutex<BTreeMap<String, CachedPolicy>>,
}

impl MemoryStore {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, CachedPolicy>> {
        self.policies.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl PolicyStore for MemoryStore {
    async fn get_policy(&self, domain: &str) -> Result<Option<CachedPolicy>, StoreError> {
        Ok(self.map().get(domain).cloned())
    }

    async fn put_policy(&self, policy: &CachedPolicy) -> Result<(), StoreError> {
        self.map().insert(policy.domain.clone(), policy.clone());
        Ok(())
    }

    async fn delete_policy(&self, domain: &str) -> Result<(), StoreError> {
        self.map().remove(domain);
        Ok(())
    }

    async fn all_policies(&self) -> Result<Vec<CachedPolicy>, StoreError> {
        Ok(self.map().values().cloned().collect())
    }
}
