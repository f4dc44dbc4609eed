//! The in-memory policy cache: a sharded read-mostly map.
//!
//! Reads take one uncontended shard read-lock and one hash lookup, so a cached decision
//! costs well under a microsecond even with 100,000 domains spread uniformly (see
//! `benches/engine.rs`). Expiry is checked on every read against the engine's clock;
//! [`PolicyCache::purge_expired`] frees expired entries. The cache is bounded: past
//! its capacity an insert evicts an arbitrary entry of the same shard, which is safe
//! because every policy is also in the persistent store and is reloaded on next use.

use super::engine::CachedPolicy;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

const SHARDS: usize = 64;

/// A cached policy plus when its TXT id was last checked.
#[derive(Debug)]
struct Entry {
    policy: Arc<CachedPolicy>,
    last_txt_check: AtomicI64,
}

/// A valid cached policy, and whether this caller should re-check its TXT id.
pub(crate) struct Hit {
    pub(crate) policy: Arc<CachedPolicy>,
    pub(crate) recheck: bool,
}

type Shard = RwLock<HashMap<Box<str>, Entry>>;

pub(crate) struct PolicyCache {
    shards: Box<[Shard]>,
    hasher: RandomState,
    per_shard: usize,
}

impl PolicyCache {
    pub(crate) fn new(capacity: u64) -> PolicyCache {
        let per_shard = (capacity as usize).div_ceil(SHARDS).max(1);
        PolicyCache {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard,
        }
    }

    fn shard(&self, key: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// The entry of `key` whatever its validity.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<CachedPolicy>> {
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        shard.get(key).map(|e| e.policy.clone())
    }

    /// The hot path: a policy valid at `now`. If its TXT id was last checked
    /// `recheck_secs` or more ago, exactly one caller gets `recheck: true` per interval.
    pub(crate) fn lookup(&self, key: &str, now: i64, recheck_secs: i64) -> Option<Hit> {
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        let e = shard.get(key)?;
        if !e.policy.is_valid_at(now) {
            return None;
        }
        let last = e.last_txt_check.load(Ordering::Relaxed);
        let recheck = now - last >= recheck_secs
            && e.last_txt_check
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok();
        Some(Hit {
            policy: e.policy.clone(),
            recheck,
        })
    }

    /// Note that the TXT id of `key` was checked at `now`.
    pub(crate) fn touch(&self, key: &str, now: i64) {
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = shard.get(key) {
            e.last_txt_check.store(now, Ordering::Relaxed);
        }
    }

    pub(crate) fn insert(&self, policy: Arc<CachedPolicy>, last_txt_check: i64) {
        let mut shard = self
            .shard(&policy.domain)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if shard.len() >= self.per_shard && !shard.contains_key(policy.domain.as_str()) {
            // Evict one entry; it stays in the persistent store.
            if let Some(victim) = shard.keys().next().cloned() {
                shard.remove(&victim);
            }
        }
        shard.insert(
            policy.domain.as_str().into(),
            Entry {
                policy,
                last_txt_check: AtomicI64::new(last_txt_check),
            },
        );
    }

    pub(crate) fn remove(&self, key: &str) {
        self.shard(key)
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Drop entries that have expired at `now`; returns how many.
    pub(crate) fn purge_expired(&self, now: i64) -> usize {
        let mut n = 0;
        for shard in self.shards.iter() {
            let mut s = shard.write().unwrap_or_else(|p| p.into_inner());
            let before = s.len();
            s.retain(|_, e| e.policy.is_valid_at(now));
            n += before - s.len();
        }
        n
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sts::Policy;

    fn pol(domain: &str, fetched_at: i64, max_age: u32) -> Arc<CachedPolicy> {
        Arc::new(CachedPolicy {
            domain: domain.into(),
            id: "1".into(),
            policy: Policy::parse(&format!("version: STSv1\nmode: none\nmax_age: {max_age}\n"))
                .unwrap(),
            fetched_at,
        })
    }

    #[test]
    fn insert_get_remove_purge() {
        let c = PolicyCache::new(1000);
        c.insert(pol("a.test", 0, 10), 0);
        c.insert(pol("b.test", 0, 100), 0);
        assert_eq!(c.get("a.test").unwrap().domain, "a.test");
        let hit = c.lookup("a.test", 5, 300).unwrap();
        assert!(!hit.recheck, "checked at 0, interval 300");
        assert!(c.lookup("a.test", 10, 300).is_none(), "expired at 10");
        c.touch("b.test", -1000);
        assert!(c.lookup("b.test", 0, 300).unwrap().recheck);
        assert!(
            !c.lookup("b.test", 0, 300).unwrap().recheck,
            "only one caller re-checks"
        );
        assert!(c.get("c.test").is_none());
        assert_eq!(c.purge_expired(50), 1);
        assert!(c.get("a.test").is_none());
        c.remove("b.test");
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn capacity_is_bounded() {
        let c = PolicyCache::new(SHARDS as u64); // one entry per shard
        for i in 0..10_000 {
            c.insert(pol(&format!("d{i}.test"), 0, 100), 0);
        }
        assert!(c.len() <= SHARDS, "{}", c.len());
        // Replacing an existing key never evicts another.
        let before = c.len();
        let k = c
            .shards
            .iter()
            .find_map(|s| s.read().unwrap().keys().next().cloned())
            .unwrap();
        c.insert(pol(&k, 1, 100), 0);
        assert_eq!(c.len(), before);
    }
}
