//! The policy engine: discovery, fetch, cache (memory + store), id re-checks, back-off
//! and proactive refresh (RFC 8461 §3.3, §5.1, §10.2; R30–R38).

use super::cache::PolicyCache;
use super::fetch::{FetchError, PolicyFetcher};
use super::policy::{Mode, Policy, normalize_host};
use super::record::{RecordError, select_record};
use crate::clock::{Clock, SystemClock};
use crate::dns::{Resolver, TxtLookup};
use crate::store::PolicyStore;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// A policy as cached: what was fetched, under which TXT id, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedPolicy {
    /// Policy domain (lowercase A-label, no trailing dot).
    pub domain: String,
    /// The `_mta-sts` TXT id seen when it was fetched.
    pub id: String,
    /// The policy.
    pub policy: Policy,
    /// Unix seconds of the successful fetch.
    pub fetched_at: i64,
}

impl CachedPolicy {
    /// Unix seconds at which the policy stops applying (`fetched_at + max_age`).
    pub fn expires_at(&self) -> i64 {
        self.fetched_at + i64::from(self.policy.max_age)
    }

    /// Usable at `now` (R30)?
    pub fn is_valid_at(&self, now: i64) -> bool {
        now < self.expires_at()
    }
}

/// How an MX host fares under the policy that governs its domain (R40, R42, R49, R52).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MxDecision {
    /// No active policy (none at all, or `mode: none`): opportunistic TLS.
    NoPolicy,
    /// The MX matches a pattern; `Enforce` requires STARTTLS and a WebPKI-valid
    /// certificate for the MX name, `Testing` only reports failures.
    Allowed(Mode),
    /// The MX matches no pattern: under `Enforce` it gets no mail (not even a
    /// connection); under `Testing` delivery proceeds and the failure is reported.
    NotInPolicy(Mode),
}

impl MxDecision {
    /// May mail be sent to this MX at all?
    pub fn may_deliver(self) -> bool {
        !matches!(self, MxDecision::NotInPolicy(Mode::Enforce))
    }

    /// Must the session use STARTTLS with a certificate valid for the MX name?
    pub fn requires_verified_tls(self) -> bool {
        matches!(self, MxDecision::Allowed(Mode::Enforce))
    }
}

/// Where the governing policy came from in this lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Memory or the persistent store, without network.
    Cache,
    /// Fetched during this lookup.
    Fetched,
}

/// The engine's answer for one policy domain.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The policy that governs the domain now, if any (possibly `mode: none`).
    pub policy: Option<Arc<CachedPolicy>>,
    /// Where it came from.
    pub source: Source,
    /// A fetch failure met in this lookup (or still backed off from): report it as
    /// its result type (R55), even when a cached policy still applies.
    pub fetch_error: Option<FetchError>,
    /// Why discovery found no usable TXT record, if it did not (informational).
    pub record_error: Option<RecordError>,
    /// This lookup fetched the policy over HTTPS (successfully or not), as opposed to
    /// answering from the cache or from a back-off. TLS-RPT counts a fetch failure once
    /// per fetch made, not once per delivery during the back-off.
    pub fetched: bool,
}

impl Lookup {
    fn none() -> Lookup {
        Lookup {
            policy: None,
            source: Source::Cache,
            fetch_error: None,
            record_error: None,
            fetched: false,
        }
    }

    /// The answer for a domain treated as having no policy: opportunistic TLS. For
    /// messages that say `TLS-Required: No` (RFC 8689), such as TLS-RPT reports.
    pub fn without_policy() -> Lookup {
        Lookup::none()
    }

    fn cached(p: Arc<CachedPolicy>) -> Lookup {
        Lookup {
            policy: Some(p),
            ..Lookup::none()
        }
    }

    /// The active mode: `None` when there is no policy or the policy is `mode: none`.
    pub fn mode(&self) -> Option<Mode> {
        self.policy
            .as_ref()
            .map(|p| p.policy.mode)
            .filter(|m| *m != Mode::None)
    }

    /// Decide for one MX host name (pure; no I/O).
    pub fn check_mx(&self, mx_host: &str) -> MxDecision {
        match &self.policy {
            Some(p) if p.policy.mode != Mode::None => {
                if p.policy.matches_mx(mx_host) {
                    MxDecision::Allowed(p.policy.mode)
                } else {
                    MxDecision::NotInPolicy(p.policy.mode)
                }
            }
            _ => MxDecision::NoPolicy,
        }
    }
}

/// Errors of the engine itself (not of the domain's policy, which are in [`Lookup`]).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The domain is not a valid DNS name (address literals have no MTA-STS, R1).
    #[error("{0:?} is not a domain name that can have an MTA-STS policy")]
    InvalidDomain(String),
}

/// Intervals that govern the engine (see `[sts]` in the config).
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Re-check a cached policy's TXT id at most this often per domain.
    pub txt_recheck: Duration,
    /// After a failed fetch, wait this long before fetching the same id again (≥ 5 min).
    pub fetch_backoff: Duration,
    /// Refresh a cached policy this long after its fetch (at most daily).
    pub refresh_interval: Duration,
    /// Policies held in memory.
    pub cache_capacity: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            txt_recheck: Duration::from_secs(300),
            fetch_backoff: Duration::from_secs(300),
            refresh_interval: Duration::from_secs(86_400),
            cache_capacity: 1_000_000,
        }
    }
}

impl EngineOptions {
    /// From the `[sts]` section of a config.
    pub fn from_config(cfg: &crate::Config) -> EngineOptions {
        EngineOptions {
            txt_recheck: Duration::from_secs(cfg.sts.txt_recheck_secs),
            fetch_backoff: Duration::from_secs(cfg.sts.fetch_backoff_secs),
            refresh_interval: Duration::from_secs(cfg.sts.refresh_secs),
            cache_capacity: cfg.sts.cache_capacity,
        }
    }
}

/// Counters for operators and tests.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// HTTPS fetches started.
    pub fetches: AtomicU64,
    /// Fetches that failed.
    pub fetch_failures: AtomicU64,
    /// `_mta-sts` TXT lookups made.
    pub txt_lookups: AtomicU64,
}

struct Backoff {
    id: String,
    until: i64,
    error: FetchError,
}

/// The MTA-STS policy engine. Cheap to clone; no global state.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use stsrelay::{Config, sts::Engine};
/// let engine = Engine::from_config(&Config::default())?;
/// let lookup = engine.policy("example.com").await?;
/// let decision = lookup.check_mx("mx1.example.com");
/// println!("may deliver: {}, must verify TLS: {}", decision.may_deliver(), decision.requires_verified_tls());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    dns: Arc<dyn TxtLookup>,
    fetcher: Arc<dyn PolicyFetcher>,
    store: Arc<dyn PolicyStore>,
    clock: Arc<dyn Clock>,
    opts: EngineOptions,
    cache: PolicyCache,
    backoff: Mutex<HashMap<String, Backoff>>,
    inflight: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    stats: EngineStats,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("opts", &self.inner.opts)
            .finish()
    }
}

/// Builder-style construction of an [`Engine`] from its parts.
pub struct EngineBuilder {
    dns: Arc<dyn TxtLookup>,
    fetcher: Arc<dyn PolicyFetcher>,
    store: Arc<dyn PolicyStore>,
    clock: Arc<dyn Clock>,
    opts: EngineOptions,
}

impl EngineBuilder {
    /// Use this clock instead of the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Use these intervals.
    pub fn options(mut self, opts: EngineOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Build the engine.
    pub fn build(self) -> Engine {
        let cache = PolicyCache::new(self.opts.cache_capacity);
        Engine {
            inner: Arc::new(Inner {
                dns: self.dns,
                fetcher: self.fetcher,
                store: self.store,
                clock: self.clock,
                opts: self.opts,
                cache,
                backoff: Mutex::new(HashMap::new()),
                inflight: Mutex::new(HashMap::new()),
                stats: EngineStats::default(),
            }),
        }
    }
}

/// Setting up the engine from a config failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineSetupError {
    /// DNS configuration.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// Trust store.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    /// HTTP client.
    #[error(transparent)]
    Fetcher(#[from] super::fetch::FetcherSetupError),
    /// Persistent store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl Engine {
    /// Start building an engine from its parts: `_mta-sts` TXT lookups (usually a
    /// [`Resolver`]), a policy fetcher (usually an [`HttpsFetcher`](super::HttpsFetcher))
    /// and a persistent store.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use stsrelay::dns::{DnsError, TxtLookup};
    /// use stsrelay::store::MemoryStore;
    /// use stsrelay::sts::{Engine, FetchError, Mode, MxDecision, Policy, PolicyFetcher};
    ///
    /// // Stand-ins for DNS and HTTPS, as a custom MTA might wire its own.
    /// struct Dns;
    /// #[async_trait::async_trait]
    /// impl TxtLookup for Dns {
    ///     async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
    ///         Ok(if name == "_mta-sts.example.com" { vec!["v=STSv1; id=2026".into()] } else { vec![] })
    ///     }
    /// }
    /// struct Web;
    /// #[async_trait::async_trait]
    /// impl PolicyFetcher for Web {
    ///     async fn fetch(&self, _domain: &str) -> Result<Policy, FetchError> {
    ///         Ok(Policy::parse("version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 86400\n").unwrap())
    ///     }
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let engine = Engine::builder(Arc::new(Dns), Arc::new(Web), Arc::new(MemoryStore::default())).build();
    /// let lookup = engine.policy("Example.COM").await.unwrap();
    /// assert_eq!(lookup.mode(), Some(Mode::Enforce));
    /// assert_eq!(lookup.check_mx("mx1.example.com"), MxDecision::Allowed(Mode::Enforce));
    /// assert!(!lookup.check_mx("mx.attacker.test").may_deliver());
    /// // No policy published: opportunistic TLS.
    /// assert_eq!(engine.policy("example.org").await.unwrap().check_mx("mx.example.org"), MxDecision::NoPolicy);
    /// # });
    /// ```
    pub fn builder(
        dns: Arc<dyn TxtLookup>,
        fetcher: Arc<dyn PolicyFetcher>,
        store: Arc<dyn PolicyStore>,
    ) -> EngineBuilder {
        EngineBuilder {
            dns,
            fetcher,
            store,
            clock: Arc::new(SystemClock),
            opts: EngineOptions::default(),
        }
    }

    /// The engine the relay uses: resolver from `[dns]`, HTTPS fetcher trusting
    /// webpki-roots + `tls.extra_roots`, the store `[storage]` names (SQLite in
    /// `storage.data_dir`, or Redis with the local fallback, connected on first use).
    pub fn from_config(cfg: &crate::Config) -> Result<Engine, EngineSetupError> {
        let resolver = Resolver::from_config(cfg)?;
        let trust = crate::tls::TrustStore::from_config(cfg)?;
        let fetcher = super::fetch::HttpsFetcher::new(
            resolver.clone(),
            &trust,
            super::fetch::FetchOptions::from_config(cfg),
        )?;
        let store = crate::store::Backend::open(cfg)?.policies();
        Ok(
            Engine::builder(Arc::new(resolver), Arc::new(fetcher), store)
                .options(EngineOptions::from_config(cfg))
                .build(),
        )
    }

    /// Counters.
    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    /// Every policy in the persistent store (valid or expired), for the status page.
    pub async fn stored_policies(&self) -> Result<Vec<CachedPolicy>, crate::store::StoreError> {
        self.inner.store.all_policies().await
    }

    /// Policies currently held in memory.
    pub fn memory_entries(&self) -> usize {
        self.inner.cache.len()
    }

    /// What policy governs `domain` now?
    ///
    /// Cached policies are answered from memory (or the store after a restart) with no
    /// network; their TXT id is re-checked in the background at most every
    /// `txt_recheck`. Without a valid cached policy the TXT record is looked up and the
    /// policy fetched before answering; concurrent callers for one domain share that
    /// one fetch.
    pub async fn policy(&self, domain: &str) -> Result<Lookup, EngineError> {
        let now = self.inner.clock.now();
        if let Some(hit) = self.cached_fast(domain, now) {
            crate::ops::metrics::policy_cache(true);
            return Ok(hit);
        }
        let domain = normalize_domain(domain)?;
        let _guard = self.lock_domain(&domain).await;
        if let Some(p) = self.cached_slow(&domain, now).await {
            crate::ops::metrics::policy_cache(true);
            return Ok(Lookup::cached(p));
        }
        crate::ops::metrics::policy_cache(false);
        Ok(self.discover(&domain, None).await)
    }

    /// Check the `_mta-sts` TXT id now (no rate limit) and fetch a new policy if it
    /// changed; for the relay before the next attempt after an enforce failure and
    /// before giving up on a message (R51). Back-off still applies (R18).
    pub async fn recheck(&self, domain: &str) -> Result<Lookup, EngineError> {
        let domain = normalize_domain(domain)?;
        let _guard = self.lock_domain(&domain).await;
        let now = self.inner.clock.now();
        let cached = self.cached_slow(&domain, now).await;
        Ok(self.discover(&domain, cached).await)
    }

    /// The cached policy of `domain` without any network access (valid or not).
    pub async fn cached(&self, domain: &str) -> Option<Arc<CachedPolicy>> {
        let domain = normalize_domain(domain).ok()?;
        if let Some(p) = self.inner.cache.get(&domain) {
            return Some(p);
        }
        match self.inner.store.get_policy(&domain).await {
            Ok(p) => p.map(Arc::new),
            Err(e) => {
                tracing::warn!(%domain, error = %e, "cannot read the policy store");
                None
            }
        }
    }

    /// Fast path: a valid policy in memory, key already normalised.
    fn cached_fast(&self, domain: &str, now: i64) -> Option<Lookup> {
        let hit =
            self.inner
                .cache
                .lookup(domain, now, self.inner.opts.txt_recheck.as_secs() as i64)?;
        if hit.recheck {
            self.recheck_in_background(domain);
        }
        Some(Lookup::cached(hit.policy))
    }

    /// Memory, then the persistent store; only valid policies.
    async fn cached_slow(&self, domain: &str, now: i64) -> Option<Arc<CachedPolicy>> {
        if let Some(p) = self.inner.cache.get(domain)
            && p.is_valid_at(now)
        {
            return Some(p);
        }
        match self.inner.store.get_policy(domain).await {
            Ok(Some(p)) if p.is_valid_at(now) => {
                let p = Arc::new(p);
                // Loaded after a restart (or eviction): its id is re-checked within one
                // `txt_recheck` interval, like any other entry.
                self.insert_memory(p.clone(), now);
                Some(p)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!(%domain, error = %e, "cannot read the policy store");
                None
            }
        }
    }

    fn recheck_in_background(&self, domain: &str) {
        let this = self.clone();
        let domain = domain.to_string();
        tokio::spawn(async move {
            if let Err(e) = this.recheck(&domain).await {
                tracing::debug!(%domain, error = %e, "background re-check failed");
            }
        });
    }

    async fn lock_domain(&self, domain: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match map.get(domain).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    map.retain(|_, w| w.strong_count() > 0);
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(domain.to_string(), Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }

    fn insert_memory(&self, p: Arc<CachedPolicy>, last_txt_check: i64) {
        self.inner.cache.insert(p, last_txt_check);
    }

    /// The RFC 8461 §3.3/§5.1 discovery step, with `cached` the valid cached policy.
    async fn discover(&self, domain: &str, cached: Option<Arc<CachedPolicy>>) -> Lookup {
        let now = self.inner.clock.now();
        self.inner.cache.touch(domain, now);
        let keep = |record_error: Option<RecordError>, fetch_error: Option<FetchError>| Lookup {
            policy: cached.clone(),
            source: Source::Cache,
            fetch_error,
            record_error,
            fetched: false,
        };
        self.inner.stats.txt_lookups.fetch_add(1, Ordering::Relaxed);
        let txt = match self.inner.dns.txt(&format!("_mta-sts.{domain}")).await {
            Ok(txt) => txt,
            Err(e) => {
                // R8: a DNS error is "no live policy"; the cache keeps applying.
                tracing::debug!(%domain, error = %e, "_mta-sts TXT lookup failed");
                return keep(None, None);
            }
        };
        let record = match select_record(&txt) {
            Ok(r) => r,
            // R5, R32: no usable record; a valid cached policy still applies.
            Err(e) => return keep(Some(e), None),
        };
        if let Some(c) = &cached
            && c.id == record.id
        {
            return keep(None, None); // R31: same id, no fetch
        }
        if let Some(err) = self.backed_off(domain, &record.id, now) {
            return keep(None, Some(err));
        }
        match self.fetch(domain).await {
            Ok(policy) => {
                let fresh = Arc::new(CachedPolicy {
                    domain: domain.to_string(),
                    id: record.id,
                    policy,
                    fetched_at: now,
                });
                self.remember(fresh.clone(), now).await;
                Lookup {
                    policy: Some(fresh),
                    source: Source::Fetched,
                    fetch_error: None,
                    record_error: None,
                    fetched: true,
                }
            }
            Err(e) => {
                self.note_failure(domain, &record.id, now, &e, cached.as_deref());
                Lookup {
                    fetched: true,
                    ..keep(None, Some(e))
                }
            }
        }
    }

    async fn fetch(&self, domain: &str) -> Result<Policy, FetchError> {
        self.inner.stats.fetches.fetch_add(1, Ordering::Relaxed);
        let r = self.inner.fetcher.fetch(domain).await;
        crate::ops::metrics::policy_fetch(r.as_ref().map(|_| ()).map_err(|e| e.result_type));
        if r.is_err() {
            self.inner
                .stats
                .fetch_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// A successful fetch replaces whatever was cached (also with `mode: none`, R35)
    /// and is persisted (R37). `max_age: 0` applies to this decision only.
    async fn remember(&self, fresh: Arc<CachedPolicy>, now: i64) {
        self.inner
            .backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fresh.domain);
        if !fresh.is_valid_at(now) {
            self.inner.cache.remove(&fresh.domain);
            if let Err(e) = self.inner.store.delete_policy(&fresh.domain).await {
                tracing::error!(domain = %fresh.domain, error = %e, "cannot update the policy store");
            }
            return;
        }
        tracing::info!(domain = %fresh.domain, id = %fresh.id, mode = %fresh.policy.mode,
            max_age = fresh.policy.max_age, "MTA-STS policy fetched");
        if let Err(e) = self.inner.store.put_policy(&fresh).await {
            tracing::error!(domain = %fresh.domain, error = %e, "cannot persist the MTA-STS policy");
        }
        self.insert_memory(fresh, now);
    }

    fn backed_off(&self, domain: &str, id: &str, now: i64) -> Option<FetchError> {
        let map = self.inner.backoff.lock().unwrap_or_else(|p| p.into_inner());
        map.get(domain)
            .filter(|b| b.id == id && now < b.until)
            .map(|b| b.error.clone())
    }

    /// R18: no new fetch for this id for `fetch_backoff`; R36: alert unless mode none.
    fn note_failure(
        &self,
        domain: &str,
        id: &str,
        now: i64,
        e: &FetchError,
        cached: Option<&CachedPolicy>,
    ) {
        let until = now + self.inner.opts.fetch_backoff.as_secs() as i64;
        self.inner
            .backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                domain.to_string(),
                Backoff {
                    id: id.to_string(),
                    until,
                    error: e.clone(),
                },
            );
        match cached {
            Some(c) if c.policy.mode == Mode::None => {
                tracing::debug!(%domain, error = %e, "policy fetch failed; cached mode is none")
            }
            Some(c) => tracing::warn!(%domain, error = %e, cached_mode = %c.policy.mode,
                expires_in_secs = c.expires_at() - now, "MTA-STS policy refresh failed; keeping the cached policy"),
            None => tracing::warn!(%domain, error = %e, "MTA-STS policy fetch failed"),
        }
    }

    /// Proactive refresh (R36): fetch again every stored policy fetched at least
    /// `refresh_interval` ago (or past half its `max_age`), whatever its TXT record says,
    /// extending its lifetime on success; expired entries are dropped. Returns how many
    /// policies were refreshed successfully.
    pub async fn refresh_due(&self) -> usize {
        let now = self.inner.clock.now();
        self.inner.cache.purge_expired(now);
        let all = match self.inner.store.all_policies().await {
            Ok(all) => all,
            Err(e) => {
                tracing::error!(error = %e, "cannot list stored policies for refresh");
                return 0;
            }
        };
        let mut refreshed = 0;
        for stored in all {
            if !stored.is_valid_at(now) {
                self.inner.cache.remove(&stored.domain);
                if let Err(e) = self.inner.store.delete_policy(&stored.domain).await {
                    tracing::error!(domain = %stored.domain, error = %e, "cannot drop an expired policy");
                }
                continue;
            }
            let interval = (self.inner.opts.refresh_interval.as_secs() as i64)
                .min(i64::from(stored.policy.max_age) / 2)
                .max(1);
            if now - stored.fetched_at < interval {
                continue;
            }
            if self.refresh_one(stored, now).await {
                refreshed += 1;
            }
        }
        refreshed
    }

    async fn refresh_one(&self, stored: CachedPolicy, now: i64) -> bool {
        let domain = stored.domain.clone();
        let _guard = self.lock_domain(&domain).await;
        // The id to file the new policy under: the live one if there is a valid record.
        let id = match self.inner.dns.txt(&format!("_mta-sts.{domain}")).await {
            Ok(txt) => select_record(&txt)
                .map(|r| r.id)
                .unwrap_or_else(|_| stored.id.clone()),
            Err(_) => stored.id.clone(),
        };
        if self.backed_off(&domain, &id, now).is_some() {
            return false;
        }
        match self.fetch(&domain).await {
            Ok(policy) => {
                let fresh = Arc::new(CachedPolicy {
                    domain,
                    id,
                    policy,
                    fetched_at: now,
                });
                self.remember(fresh, now).await;
                true
            }
            Err(e) => {
                self.note_failure(&domain, &id, now, &e, Some(&stored));
                false
            }
        }
    }

    /// Run [`Engine::refresh_due`] every `every` until the returned handle is dropped
    /// or aborted.
    pub fn spawn_refresher(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let n = this.refresh_due().await;
                if n > 0 {
                    tracing::info!(refreshed = n, "proactive MTA-STS refresh");
                }
            }
        })
    }
}

/// Cache key: lowercase A-label without trailing dot (R38); address literals and
/// invalid names are refused (R1).
fn normalize_domain(domain: &str) -> Result<String, EngineError> {
    if domain.starts_with('[') || domain.parse::<std::net::IpAddr>().is_ok() {
        return Err(EngineError::InvalidDomain(domain.to_string()));
    }
    normalize_host(domain).map_err(|_| EngineError::InvalidDomain(domain.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(body: Option<&str>) -> Lookup {
        Lookup {
            policy: body.map(|b| {
                Arc::new(CachedPolicy {
                    domain: "example.com".into(),
                    id: "1".into(),
                    policy: Policy::parse(b).unwrap(),
                    fetched_at: 0,
                })
            }),
            ..Lookup::none()
        }
    }

    #[test]
    fn r42_r49_r52_r53_mx_decisions_are_pure() {
        let enforce = lookup(Some(
            "version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 60\n",
        ));
        assert_eq!(
            enforce.check_mx("mx.example.com"),
            MxDecision::Allowed(Mode::Enforce)
        );
        assert_eq!(
            enforce.check_mx("evil.test"),
            MxDecision::NotInPolicy(Mode::Enforce)
        );
        assert!(!enforce.check_mx("evil.test").may_deliver());
        assert!(enforce.check_mx("mx.example.com").requires_verified_tls());
        let testing = lookup(Some(
            "version: STSv1\nmode: testing\nmx: *.example.com\nmax_age: 60\n",
        ));
        assert_eq!(
            testing.check_mx("evil.test"),
            MxDecision::NotInPolicy(Mode::Testing)
        );
        assert!(testing.check_mx("evil.test").may_deliver());
        assert!(!testing.check_mx("mx.example.com").requires_verified_tls());
        let none = lookup(Some("version: STSv1\nmode: none\nmax_age: 60\n"));
        assert_eq!(none.check_mx("anything.test"), MxDecision::NoPolicy);
        assert_eq!(none.mode(), None);
        assert_eq!(lookup(None).check_mx("x.test"), MxDecision::NoPolicy);
    }

    #[test]
    fn r1_r38_domain_normalisation() {
        assert_eq!(normalize_domain("Example.TEST.").unwrap(), "example.test");
        assert_eq!(
            normalize_domain("bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert!(normalize_domain("[192.0.2.10]").is_err());
        assert!(normalize_domain("192.0.2.10").is_err());
        assert!(normalize_domain("").is_err());
    }

    #[test]
    fn r30_validity_window() {
        let p = CachedPolicy {
            domain: "d".into(),
            id: "1".into(),
            policy: Policy::parse("version: STSv1\nmode: enforce\nmx: a.d\nmax_age: 100\n")
                .unwrap(),
            fetched_at: 1000,
        };
        assert!(p.is_valid_at(1099));
        assert!(!p.is_valid_at(1100));
    }
}
