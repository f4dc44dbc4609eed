//! The fleet store: Redis shared by every node, with this node's SQLite as the
//! fallback, so that a Redis outage never holds a message back (issue 6).
//!
//! - **Policies** are written to both. A read asks both and keeps the newer fetch, so
//!   a node that joins or restarts gets what the fleet holds, and a Redis that lost its
//!   data (or is down) cannot open a downgrade window on a node that had the policy.
//!   The older side is repaired on the way.
//! - **TLS-RPT counters** go to Redis in batches that are applied exactly once
//!   ([`RedisStore::add_counts_once`]). A batch Redis does not take is *spilled* to the
//!   local SQLite; later batches are spilled behind it to keep the order (merged into
//!   one, since none of them was sent), and the spilled batches are sent again, oldest
//!   first, when Redis answers. A batch whose answer was lost is therefore never
//!   counted twice nor lost, and a long outage keeps a few rows, not one per batch.
//! - **The report ledger** and the "day done" marks live in Redis only: every node sees
//!   the same claims, so each report is sent by one node. While Redis is down reports
//!   wait; nothing is sent twice.
//!
//! Every Redis command is bounded by `storage.redis_timeout_ms`. After a failure the
//! node stays on its fallback for `storage.redis_retry_secs` without asking Redis, then
//! one caller tries again (the others keep using the fallback meanwhile).

use super::{PolicyStore, RedisStore, ReportStore, SqliteStore, StoreError};
use crate::ops::metrics;
use crate::sts::CachedPolicy;
use crate::tlsrpt::{CounterKey, Day, LedgerEntry};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// How many spilled batches one drain sends at most (the next one goes on).
const DRAIN_MAX: usize = 10_000;

/// How to reach Redis, and how long to wait for it.
#[derive(Clone)]
pub struct RedisTarget {
    /// `redis://…` or `rediss://…`.
    pub url: String,
    /// Key prefix.
    pub prefix: String,
    /// PEM of the CA of a `rediss://` server (system roots if `None`).
    pub ca_pem: Option<Vec<u8>>,
    /// Longest wait for one command.
    pub timeout: Duration,
    /// How long to stay on the fallback after a failure.
    pub retry: Duration,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("RedisTarget")
            .field("url", &redact(&self.url))
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

/// `url` without a password (`redis://user:***@host`), for logs and the status page.
///
/// ```
/// use stsrelay::store::redact;
/// assert_eq!(redact("redis://:s3cret@db:6379/0"), "redis://:***@db:6379/0");
/// assert_eq!(redact("rediss://db:6380"), "rediss://db:6380");
/// ```
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(parts) => parts,
        None => return url.to_string(),
    };
    let user = auth.split_once(':').map(|(u, _)| u).unwrap_or(auth);
    format!("{scheme}://{user}:***@{host}")
}

#[derive(Debug, Default)]
struct LinkState {
    /// Redis answered the last command.
    up: bool,
    /// No command is sent before this.
    down_until: Option<Instant>,
    /// A caller is trying Redis after a failure.
    probing: bool,
    /// The last failure, for the status page.
    last_error: Option<String>,
    /// When Redis answered again after a failure.
    recovered_at: Option<Instant>,
}

/// What [`Link::may_try`] allows.
#[derive(PartialEq, Eq)]
enum Try {
    Up,
    Probe,
    No,
}

/// Ends a probe however its call ends: a caller dropped mid-call (a status page request
/// whose client went away) must not leave `probing` set, or no call would ever try
/// Redis again.
struct ProbeGuard<'a>(&'a Link);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        s.probing = false;
    }
}

/// The connection to Redis, with its health.
struct Link {
    target: RedisTarget,
    redis: OnceLock<RedisStore>,
    connecting: AtomicBool,
    state: Mutex<LinkState>,
}

impl Link {
    async fn connect_once(&self) -> Result<(), StoreError> {
        if self.redis.get().is_some() {
            return Ok(());
        }
        let t = &self.target;
        let wait = t.timeout.max(Duration::from_secs(3));
        let r = tokio::time::timeout(
            wait,
            RedisStore::connect_with_root_ca(&t.url, &t.prefix, t.ca_pem.as_deref()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(StoreError {
                op: "redis connect",
                reason: format!("no connection within {} ms", wait.as_millis()),
            })
        });
        match r {
            Ok(store) => {
                let _ = self.redis.set(store);
                self.mark_up();
                Ok(())
            }
            Err(e) => {
                self.mark_down(&e);
                Err(e)
            }
        }
    }

    /// Keep trying to connect in the background, every `retry`, until connected or
    /// the store is dropped.
    fn ensure_connecting(self: &Arc<Self>) {
        if self.redis.get().is_some() || self.connecting.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak: Weak<Link> = Arc::downgrade(self);
        let retry = self.target.retry;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(retry).await;
                let Some(link) = weak.upgrade() else { return };
                if link.connect_once().await.is_ok() {
                    link.connecting.store(false, Ordering::SeqCst);
                    return;
                }
            }
        });
    }

    /// May a command be sent now? While down, only one caller at a time (the probe),
    /// and only after `retry`.
    fn may_try(&self) -> Try {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.up {
            return Try::Up;
        }
        if s.probing || s.down_until.is_some_and(|t| Instant::now() < t) {
            return Try::No;
        }
        s.probing = true;
        Try::Probe
    }

    fn mark_up(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !s.up {
            tracing::info!(url = %redact(&self.target.url), "Redis answers; the fleet store is shared again");
            if s.last_error.is_some() {
                s.recovered_at = Some(Instant::now());
            }
        }
        s.up = true;
        s.probing = false;
        s.down_until = None;
        metrics::store_redis_up(true);
    }

    fn mark_down(&self, e: &StoreError) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.up || s.last_error.is_none() {
            tracing::warn!(url = %redact(&self.target.url), error = %e,
                retry_secs = self.target.retry.as_secs(),
                "Redis unavailable; using the local fallback (policies from the local copy, TLS-RPT counters kept locally, reports wait)");
        }
        s.up = false;
        s.probing = false;
        s.down_until = Some(Instant::now() + self.target.retry);
        s.last_error = Some(e.to_string());
        metrics::store_redis_up(false);
    }

    fn unavailable(&self, op: &'static str) -> StoreError {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        StoreError {
            op,
            reason: format!(
                "Redis unavailable{}",
                s.last_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
        }
    }

    /// Run `f` against Redis, bounded by the timeout; failures mark Redis down.
    async fn call<T, F, Fut>(self: &Arc<Self>, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(RedisStore) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let Some(redis) = self.redis.get().cloned() else {
            self.ensure_connecting();
            return Err(self.unavailable(op));
        };
        let _probe = match self.may_try() {
            Try::No => return Err(self.unavailable(op)),
            Try::Probe => Some(ProbeGuard(self)),
            Try::Up => None,
        };
        let timeout = self.target.timeout;
        let result = tokio::time::timeout(timeout, f(redis))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError {
                    op,
                    reason: format!("Redis did not answer within {} ms", timeout.as_millis()),
                })
            });
        match &result {
            Ok(_) => self.mark_up(),
            Err(e) => self.mark_down(e),
        }
        result
    }
}

/// What [`FleetStore::health`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetHealth {
    /// The Redis URL, without password.
    pub url: String,
    /// Redis answered the last command.
    pub up: bool,
    /// The last Redis failure.
    pub last_error: Option<String>,
    /// Batches of counters waiting locally.
    pub spilled_batches: u64,
}

/// Redis shared by the fleet, with this node's SQLite as the fallback (see the module
/// documentation). Cheap to share behind an `Arc`.
pub struct FleetStore {
    link: Arc<Link>,
    local: SqliteStore,
    /// This process's name for its counter batches (random per start).
    writer: String,
    seq: AtomicU64,
    /// Serialises counter batches: they reach Redis in `seq` order.
    adding: tokio::sync::Mutex<()>,
    /// Spilled batches (an upper bound until the first drain).
    spilled: AtomicU64,
}

impl std::fmt::Debug for FleetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetStore")
            .field("redis", &self.link.target)
            .field("local", &self.local)
            .finish()
    }
}

impl FleetStore {
    /// A fleet store over `target`, falling back to `local`. Nothing is connected
    /// yet: call [`FleetStore::connect`] (or the first command connects in the
    /// background).
    pub fn new(target: RedisTarget, local: SqliteStore) -> FleetStore {
        FleetStore {
            link: Arc::new(Link {
                target,
                redis: OnceLock::new(),
                connecting: AtomicBool::new(false),
                state: Mutex::new(LinkState::default()),
            }),
            local,
            writer: format!("{:016x}", rand::random::<u64>()),
            seq: AtomicU64::new(0),
            adding: tokio::sync::Mutex::new(()),
            // Unknown until the first drain looks.
            spilled: AtomicU64::new(1),
        }
    }

    /// Connect now (bounded by the larger of the timeout and 3 s). On failure the
    /// node works from its fallback and keeps trying in the background.
    pub async fn connect(&self) -> Result<(), StoreError> {
        let r = self.link.connect_once().await;
        if r.is_err() {
            self.link.ensure_connecting();
        }
        r
    }

    /// The local fallback.
    pub fn local(&self) -> &SqliteStore {
        &self.local
    }

    /// Redis's state and the spilled counters.
    pub fn health(&self) -> FleetHealth {
        let s = self.link.state.lock().unwrap_or_else(|p| p.into_inner());
        FleetHealth {
            url: redact(&self.link.target.url),
            up: s.up,
            last_error: s.last_error.clone(),
            spilled_batches: self.spilled.load(Ordering::SeqCst),
        }
    }

    /// Send the spilled counter batches to Redis, oldest first; how many were sent.
    /// Stops at the first batch Redis does not take.
    pub async fn drain(&self) -> Result<u64, StoreError> {
        let _order = self.adding.lock().await;
        self.drain_locked().await
    }

    async fn drain_locked(&self) -> Result<u64, StoreError> {
        let mut sent = 0;
        let result = async {
            for _ in 0..DRAIN_MAX {
                let Some((writer, seq, counts)) = self.local.first_spilled().await? else {
                    break;
                };
                let w = writer.clone();
                self.link
                    .call("add counts", |r| async move {
                        r.add_counts_once(&w, seq, &counts).await
                    })
                    .await?;
                self.local.unspill(writer, seq).await?;
                sent += 1;
            }
            Ok(())
        }
        .await;
        if let Ok(n) = self.local.spilled_batches().await {
            self.spilled.store(n, Ordering::SeqCst);
            metrics::store_spilled(n);
        }
        if sent > 0 {
            tracing::info!(
                batches = sent,
                left = self.spilled.load(Ordering::SeqCst),
                "spilled TLS-RPT counters sent to Redis"
            );
        }
        result.map(|()| sent)
    }

    /// Run inside the relay: every second, check Redis (after a failure, once
    /// `redis_retry_secs` have passed) and send spilled counters when it answers.
    pub async fn maintain(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.tick().await;
        }
    }

    /// One round of [`FleetStore::maintain`]: check Redis; when it answers, announce
    /// this node (and the oldest day of the counters it keeps locally, so that no
    /// node makes that day's reports without them), send the kept counters, and
    /// announce again.
    pub async fn tick(&self) {
        let pinged = self
            .link
            .call("ping", |r| async move { r.ping().await })
            .await;
        if pinged.is_err() {
            return;
        }
        self.announce().await;
        if self.spilled.load(Ordering::SeqCst) > 0 {
            match self.drain().await {
                Ok(_) => self.announce().await,
                Err(e) => tracing::debug!(error = %e, "spilled counters not sent yet"),
            }
        }
    }

    async fn announce(&self) {
        let oldest = match self.local.oldest_spilled_day().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the locally kept counters");
                return;
            }
        };
        let (w, now) = (self.writer.clone(), unix_now());
        let _ = self
            .link
            .call("announce node", |r| async move {
                r.announce(&w, now, oldest).await
            })
            .await;
    }
}

fn unix_now() -> i64 {
    crate::clock::Clock::now(&crate::clock::SystemClock)
}

/// A node's announcement counts this long: a node gone longer (stopped, or cut off
/// from Redis) is not waited for; its kept counters arrive late, or with it.
const NODE_FRESH_SECS: i64 = 120;

/// The newer of two copies of a policy (by fetch time; the Redis copy on a tie).
fn newer(remote: Option<CachedPolicy>, local: Option<CachedPolicy>) -> Option<CachedPolicy> {
    match (remote, local) {
        (Some(r), Some(l)) => Some(if l.fetched_at > r.fetched_at { l } else { r }),
        (r, l) => r.or(l),
    }
}

#[async_trait::async_trait]
impl PolicyStore for FleetStore {
    async fn get_policy(&self, domain: &str) -> Result<Option<CachedPolicy>, StoreError> {
        let local = self.local.get_policy(domain).await;
        let d = domain.to_string();
        let remote = self
            .link
            .call("get policy", |r| async move { r.get_policy(&d).await })
            .await;
        match (remote, local) {
            (Ok(remote), Ok(local)) => {
                let best = newer(remote.clone(), local.clone());
                if let Some(best) = &best {
                    let stale = |p: &Option<CachedPolicy>| {
                        p.as_ref().is_none_or(|p| p.fetched_at < best.fetched_at)
                    };
                    if stale(&local)
                        && let Err(e) = self.local.put_policy(best).await
                    {
                        tracing::warn!(%domain, error = %e, "cannot copy a shared policy to the local store");
                    }
                    if stale(&remote) {
                        // The fleet lost it (or has an older one): give it back, without
                        // making this lookup wait for a second Redis command.
                        let (b, link) = (best.clone(), self.link.clone());
                        tokio::spawn(async move {
                            let _ = link
                                .call("put policy", |r| async move { r.put_policy(&b).await })
                                .await;
                        });
                    }
                }
                Ok(best)
            }
            (Err(_), Ok(local)) => {
                metrics::store_fallback("get policy");
                Ok(local)
            }
            (Ok(remote), Err(e)) => {
                tracing::warn!(%domain, error = %e, "cannot read the local policy store");
                Ok(remote)
            }
            (Err(_), Err(e)) => Err(e),
        }
    }

    async fn put_policy(&self, policy: &CachedPolicy) -> Result<(), StoreError> {
        let local = self.local.put_policy(policy).await;
        let p = policy.clone();
        let remote = self
            .link
            .call("put policy", |r| async move { r.put_policy(&p).await })
            .await;
        match (remote, local) {
            (Err(e), Err(_)) => Err(e),
            (Err(_), Ok(())) => {
                metrics::store_fallback("put policy");
                Ok(())
            }
            (Ok(()), Err(e)) => {
                tracing::warn!(domain = %policy.domain, error = %e, "cannot write the local policy store");
                Ok(())
            }
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    async fn delete_policy(&self, domain: &str) -> Result<(), StoreError> {
        let local = self.local.delete_policy(domain).await;
        let d = domain.to_string();
        let remote = self
            .link
            .call(
                "delete policy",
                |r| async move { r.delete_policy(&d).await },
            )
            .await;
        match (remote, local) {
            (Err(e), _) | (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    async fn all_policies(&self) -> Result<Vec<CachedPolicy>, StoreError> {
        let local = self.local.all_policies().await?;
        let remote = self
            .link
            .call("list policies", |r| async move { r.all_policies().await })
            .await;
        let remote = match remote {
            Ok(r) => r,
            Err(_) => {
                metrics::store_fallback("list policies");
                return Ok(local);
            }
        };
        let mut by_domain: std::collections::BTreeMap<String, CachedPolicy> =
            std::collections::BTreeMap::new();
        for p in remote.into_iter().chain(local) {
            let keep = by_domain
                .get(&p.domain)
                .is_none_or(|old| p.fetched_at > old.fetched_at);
            if keep {
                by_domain.insert(p.domain.clone(), p);
            }
        }
        Ok(by_domain.into_values().collect())
    }
}

#[async_trait::async_trait]
impl ReportStore for FleetStore {
    async fn add_counts(&self, counts: Vec<(CounterKey, u64)>) -> Result<(), StoreError> {
        if counts.is_empty() {
            return Ok(());
        }
        let _order = self.adding.lock().await;
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        if self.spilled.load(Ordering::SeqCst) > 0 {
            // Older batches first; if they cannot go, this one waits behind them.
            let _ = self.drain_locked().await;
        }
        if self.spilled.load(Ordering::SeqCst) == 0 {
            let (w, c) = (self.writer.clone(), &counts);
            let sent = self
                .link
                .call("add counts", |r| async move {
                    r.add_counts_once(&w, seq, c).await
                })
                .await;
            if sent.is_ok() {
                return Ok(());
            }
        }
        self.local.spill(self.writer.clone(), seq, counts).await?;
        // The batch is kept: from here on this must not fail (a retry of the same
        // counts would count them twice).
        let n = self.local.spilled_batches().await.unwrap_or(1).max(1);
        self.spilled.store(n, Ordering::SeqCst);
        metrics::store_fallback("add counts");
        metrics::store_spilled(n);
        Ok(())
    }

    async fn counts(
        &self,
        day: Option<Day>,
        domain: Option<String>,
    ) -> Result<Vec<(CounterKey, u64)>, StoreError> {
        // This node's own spilled counters belong in the answer.
        if self.spilled.load(Ordering::SeqCst) > 0 {
            self.drain().await?;
        }
        self.link
            .call(
                "read counts",
                |r| async move { r.counts(day, domain).await },
            )
            .await
    }

    async fn ledger_insert(&self, rows: Vec<LedgerEntry>) -> Result<usize, StoreError> {
        self.link
            .call(
                "ledger insert",
                |r| async move { r.ledger_insert(rows).await },
            )
            .await
    }

    async fn ledger_claim_due(
        &self,
        now: i64,
        lease_secs: i64,
    ) -> Result<Option<LedgerEntry>, StoreError> {
        self.link
            .call("ledger claim", |r| async move {
                r.ledger_claim_due(now, lease_secs).await
            })
            .await
    }

    async fn ledger_update(&self, row: &LedgerEntry) -> Result<bool, StoreError> {
        let row = row.clone();
        self.link
            .call(
                "ledger update",
                |r| async move { r.ledger_update(&row).await },
            )
            .await
    }

    async fn ledger_list(&self, day: Option<Day>) -> Result<Vec<LedgerEntry>, StoreError> {
        self.link
            .call("ledger list", |r| async move { r.ledger_list(day).await })
            .await
    }

    async fn day_done(&self, day: Day) -> Result<bool, StoreError> {
        self.link
            .call("day done", |r| async move { r.day_done(day).await })
            .await
    }

    async fn mark_day_done(&self, day: Day, at: i64) -> Result<(), StoreError> {
        self.link
            .call("mark day done", |r| async move {
                r.mark_day_done(day, at).await
            })
            .await
    }

    async fn prune_before(&self, day: Day) -> Result<(), StoreError> {
        self.link
            .call("prune", |r| async move { r.prune_before(day).await })
            .await
    }

    /// Not while this node's own kept counters of `day` (or earlier) cannot be sent,
    /// nor within `redis_retry_secs` + 5 s after Redis came back (the other nodes need
    /// that long to notice and announce what they kept), nor while a node that
    /// announced itself in the last two minutes keeps counters of `day` or earlier.
    async fn counts_complete(&self, day: Day) -> Result<bool, StoreError> {
        if self.spilled.load(Ordering::SeqCst) > 0 {
            let _ = self.drain().await;
            if self
                .local
                .oldest_spilled_day()
                .await?
                .is_some_and(|d| d <= day)
            {
                return Ok(false);
            }
        }
        let recovered = self
            .link
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recovered_at;
        let settle = self.link.target.retry + Duration::from_secs(5);
        if recovered.is_some_and(|t| t.elapsed() < settle) {
            return Ok(false);
        }
        let nodes = self
            .link
            .call("read nodes", |r| async move { r.nodes().await })
            .await?;
        let now = unix_now();
        Ok(!nodes.iter().any(|(w, at, oldest)| {
            *w != self.writer && now - at < NODE_FRESH_SECS && oldest.is_some_and(|d| d <= day)
        }))
    }
}
