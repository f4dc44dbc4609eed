//! The shared store: Redis, for several relay nodes acting as one sender (issue 6).
//!
//! Every key starts with a configurable prefix (default `stsrelay:`):
//!
//! | key | type | holds |
//! |-----|------|-------|
//! | `sts:policy` | hash | domain → JSON `{id, body, fetched_at}` |
//! | `tlsrpt:count:days` | zset | days with counters (score: days since 1970) |
//! | `tlsrpt:count:{day}` | set | policy domains with counters that day |
//! | `tlsrpt:count:{day}:{domain}` | hash | JSON `[policy, failure]` → count (HINCRBY) |
//! | `tlsrpt:ledger:days` | zset | days with ledger rows |
//! | `tlsrpt:ledger:day:{day}` | set | row ids of that day |
//! | `tlsrpt:ledger:row:{id}` | hash | one ledger row; id is JSON `[day, domain, rua]` |
//! | `tlsrpt:ledger:report:{day}:{domain}` | hash | the one report of (domain, day) |
//! | `tlsrpt:ledger:due` | zset | pending row ids by `next_try` |
//! | `tlsrpt:count:applied` | hash | writer → last batch applied ([`RedisStore::add_counts_once`]) |
//! | `tlsrpt:nodes` | hash | writer → `"<unix time> <oldest day kept locally or ->"` |
//! | `tlsrpt:done` | hash | day → when its reports were made |
//!
//! Counter increments are one MULTI/EXEC per batch; the ledger's insert, claim, update
//! and prune are Lua scripts, so each runs atomically on the server whatever the number
//! of nodes. Lease expiry is judged by the caller's `now` (as with SQLite), not by
//! Redis key expiry. Scripts touch keys they compute from the prefix, so a Redis Cluster
//! is not supported (a single server, or Sentinel's primary, is).

use super::{PolicyStore, ReportStore, StoreError};
use crate::sts::{CachedPolicy, Policy};
use crate::tlsrpt::{CounterKey, Day, LedgerEntry, LedgerState};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::time::Duration;

/// Counters live at least this long after their last increment (15 days: the default
/// `tlsrpt.keep_days` of 14 plus the day being reported), even if nobody prunes.
const DEFAULT_COUNTER_TTL_SECS: u64 = 15 * 86_400;

/// Redis-backed [`PolicyStore`] and [`ReportStore`], shared by every node that uses the
/// same server and prefix. Cloning is cheap (one multiplexed, reconnecting connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    counter_ttl_secs: u64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn err(op: &'static str) -> impl Fn(redis::RedisError) -> StoreError {
    move |e| StoreError {
        op,
        reason: e.to_string(),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredPolicy {
    id: String,
    body: String,
    fetched_at: i64,
}

/// Days since 1970-01-01 (the score of day sets).
fn day_num(day: Day) -> i64 {
    day.start().div_euclid(86_400)
}

fn row_id(day: Day, domain: &str, rua: &str) -> String {
    serde_json::to_string(&(day.to_string(), domain, rua)).unwrap_or_default()
}

impl RedisStore {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "stsrelay:";

    /// Connect to `url` (`redis://[user:pass@]host:port/db`, or `rediss://` for TLS,
    /// verified against the system's trusted roots). Fails if the server cannot be
    /// reached now; afterwards the connection is re-established on its own when it
    /// breaks.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        Self::connect_with_root_ca(url, prefix, None).await
    }

    /// Like [`RedisStore::connect`], but a `rediss://` server's certificate is verified
    /// against `ca_pem` (PEM, one or more certificates) instead of the system roots.
    pub async fn connect_with_root_ca(
        url: &str,
        prefix: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<RedisStore, StoreError> {
        let client = match ca_pem {
            None => redis::Client::open(url),
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                },
            ),
        }
        .map_err(err("redis url"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(err("redis connect"))?;
        Ok(RedisStore {
            conn,
            prefix: prefix.to_string(),
            counter_ttl_secs: DEFAULT_COUNTER_TTL_SECS,
        })
    }

    /// How long a day's counters live after their last increment (a safety net;
    /// [`ReportStore::prune_before`] removes them first). At least one day.
    pub fn with_counter_ttl(mut self, ttl: Duration) -> RedisStore {
        self.counter_ttl_secs = ttl.as_secs().max(86_400);
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    async fn counts_of(
        &self,
        day: &str,
        domain: &str,
        out: &mut Vec<(String, String, String, String, u64)>,
    ) -> Result<(), StoreError> {
        let fields: HashMap<Vec<u8>, Vec<u8>> = redis::cmd("HGETALL")
            .arg(self.key(&format!("tlsrpt:count:{day}:{domain}")))
            .query_async(&mut self.conn())
            .await
            .map_err(err("read counts"))?;
        for (field, n) in fields {
            let parts = serde_json::from_slice::<(String, String)>(&field).ok();
            let n = std::str::from_utf8(&n)
                .ok()
                .and_then(|n| n.parse::<i64>().ok());
            match (parts, n) {
                (Some((policy, failure)), Some(n)) => out.push((
                    day.to_string(),
                    domain.to_string(),
                    policy,
                    failure,
                    n.max(0) as u64,
                )),
                _ => tracing::error!(%day, %domain, "unreadable TLS-RPT counter skipped"),
            }
        }
        Ok(())
    }
}

fn text(v: &[u8]) -> Option<String> {
    String::from_utf8(v.to_vec()).ok()
}

fn int<T: std::str::FromStr>(v: &[u8]) -> Option<T> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A ledger row from its hash; `None` (logged) if it does not read back.
fn entry_from_hash(h: &HashMap<Vec<u8>, Vec<u8>>) -> Option<LedgerEntry> {
    let get = |k: &str| h.get(k.as_bytes()).map(Vec::as_slice);
    let parsed = (|| {
        Some(LedgerEntry {
            policy_domain: text(get("policy_domain")?)?,
            day: text(get("day")?)?.parse().ok()?,
            rua: text(get("rua")?)?,
            report_id: text(get("report_id")?)?,
            file_name: text(get("file_name")?)?,
            gzip: get("gzip")?.to_vec(),
            state: LedgerState::parse(&text(get("state")?)?)?,
            attempts: int(get("attempts")?)?,
            created_at: int(get("created_at")?)?,
            first_try: match get("first_try") {
                Some(v) => Some(int(v)?),
                None => None,
            },
            next_try: int(get("next_try")?)?,
            last_result: match get("last_result") {
                Some(v) => Some(text(v)?),
                None => None,
            },
            lease: match get("lease_token") {
                Some(v) => Some(text(v)?),
                None => None,
            },
        })
    })();
    if parsed.is_none() {
        let domain = get("policy_domain").map(String::from_utf8_lossy);
        let day = get("day").map(String::from_utf8_lossy);
        tracing::error!(?domain, ?day, "unreadable TLS-RPT ledger row skipped");
    }
    parsed
}

/// A flat `[field, value, …]` reply as a map.
fn pairs(flat: Vec<Vec<u8>>) -> HashMap<Vec<u8>, Vec<u8>> {
    let mut it = flat.into_iter();
    let mut out = HashMap::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.insert(k, v);
    }
    out
}

fn opt_arg<T: ToString>(v: &Option<T>) -> (&'static str, String) {
    match v {
        Some(v) => ("1", v.to_string()),
        None => ("0", String::new()),
    }
}

/// ARGV: prefix, then per row 16 values (see `ledger_insert`). Returns the number of
/// new rows.
const INSERT_LUA: &str = r#"
local p = ARGV[1]
local n = 0
local i = 2
while i + 15 <= #ARGV do
  local id, domain, day, daynum, rua = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  local rid, file, gz, state = ARGV[i+5], ARGV[i+6], ARGV[i+7], ARGV[i+8]
  local attempts, created, hasft, ft = ARGV[i+9], ARGV[i+10], ARGV[i+11], ARGV[i+12]
  local nt, haslr, lr = ARGV[i+13], ARGV[i+14], ARGV[i+15]
  i = i + 16
  local rowk = p .. 'tlsrpt:ledger:row:' .. id
  if redis.call('EXISTS', rowk) == 0 then
    local repk = p .. 'tlsrpt:ledger:report:' .. day .. ':' .. domain
    local made = redis.call('HMGET', repk, 'report_id', 'file_name', 'gzip')
    if made[1] and made[2] and made[3] then
      rid, file, gz = made[1], made[2], made[3]
    else
      redis.call('HSET', repk, 'report_id', rid, 'file_name', file, 'gzip', gz)
    end
    redis.call('HSET', rowk, 'policy_domain', domain, 'day', day, 'rua', rua,
      'report_id', rid, 'file_name', file, 'gzip', gz, 'state', state,
      'attempts', attempts, 'created_at', created, 'next_try', nt, 'lease_until', '0')
    if hasft == '1' then redis.call('HSET', rowk, 'first_try', ft) end
    if haslr == '1' then redis.call('HSET', rowk, 'last_result', lr) end
    redis.call('SADD', p .. 'tlsrpt:ledger:day:' .. day, id)
    redis.call('ZADD', p .. 'tlsrpt:ledger:days', daynum, day)
    if state == 'pending' then
      redis.call('ZADD', p .. 'tlsrpt:ledger:due', nt, id)
    end
    n = n + 1
  end
end
return n
"#;

/// ARGV: prefix, now, lease_until, token. Returns the claimed row (HGETALL) or nil.
const CLAIM_LUA: &str = r#"
local p = ARGV[1]
local now = tonumber(ARGV[2])
local due = p .. 'tlsrpt:ledger:due'
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', ARGV[2])
for _, id in ipairs(ids) do
  local rowk = p .. 'tlsrpt:ledger:row:' .. id
  local f = redis.call('HMGET', rowk, 'state', 'lease_until')
  if f[1] ~= 'pending' then
    redis.call('ZREM', due, id)
  elseif (tonumber(f[2]) or 0) <= now then
    redis.call('HSET', rowk, 'lease_until', ARGV[3], 'lease_token', ARGV[4])
    return redis.call('HGETALL', rowk)
  end
end
return false
"#;

/// ARGV: prefix, id, token, state, attempts, hasft, ft, next_try, haslr, lr.
/// Returns 1 if written, 0 if the claim was lost or the row is not pending.
const UPDATE_LUA: &str = r#"
local p = ARGV[1]
local id = ARGV[2]
local rowk = p .. 'tlsrpt:ledger:row:' .. id
local f = redis.call('HMGET', rowk, 'state', 'lease_token')
if f[1] ~= 'pending' or f[2] ~= ARGV[3] then
  return 0
end
redis.call('HSET', rowk, 'state', ARGV[4], 'attempts', ARGV[5], 'next_try', ARGV[8],
  'lease_until', '0')
redis.call('HDEL', rowk, 'lease_token')
if ARGV[6] == '1' then
  redis.call('HSET', rowk, 'first_try', ARGV[7])
else
  redis.call('HDEL', rowk, 'first_try')
end
if ARGV[9] == '1' then
  redis.call('HSET', rowk, 'last_result', ARGV[10])
else
  redis.call('HDEL', rowk, 'last_result')
end
local due = p .. 'tlsrpt:ledger:due'
if ARGV[4] == 'pending' then
  redis.call('ZADD', due, ARGV[8], id)
else
  redis.call('ZREM', due, id)
end
return 1
"#;

/// ARGV: prefix, day number of the cut, day string of the cut. Removes counters of
/// earlier days, ledger rows of earlier days that are not pending (and a report once
/// no row of its (domain, day) is left), and earlier "day done" marks.
const PRUNE_LUA: &str = r#"
local p = ARGV[1]
local before = '(' .. ARGV[2]
local cdays = p .. 'tlsrpt:count:days'
for _, day in ipairs(redis.call('ZRANGEBYSCORE', cdays, '-inf', before)) do
  local dk = p .. 'tlsrpt:count:' .. day
  for _, dom in ipairs(redis.call('SMEMBERS', dk)) do
    redis.call('DEL', dk .. ':' .. dom)
  end
  redis.call('DEL', dk)
  redis.call('ZREM', cdays, day)
end
local ldays = p .. 'tlsrpt:ledger:days'
local due = p .. 'tlsrpt:ledger:due'
for _, day in ipairs(redis.call('ZRANGEBYSCORE', ldays, '-inf', before)) do
  local dk = p .. 'tlsrpt:ledger:day:' .. day
  local kept, removed = {}, {}
  for _, id in ipairs(redis.call('SMEMBERS', dk)) do
    local rowk = p .. 'tlsrpt:ledger:row:' .. id
    local f = redis.call('HMGET', rowk, 'state', 'policy_domain')
    if f[1] == 'pending' then
      if f[2] then kept[f[2]] = true end
    else
      redis.call('DEL', rowk)
      redis.call('SREM', dk, id)
      redis.call('ZREM', due, id)
      if f[2] then removed[f[2]] = true end
    end
  end
  for dom, _ in pairs(removed) do
    if not kept[dom] then
      redis.call('DEL', p .. 'tlsrpt:ledger:report:' .. day .. ':' .. dom)
    end
  end
  if redis.call('SCARD', dk) == 0 then
    redis.call('ZREM', ldays, day)
  end
end
local done = p .. 'tlsrpt:done'
for _, day in ipairs(redis.call('HKEYS', done)) do
  if day < ARGV[3] then
    redis.call('HDEL', done, day)
  end
end
return 1
"#;

/// ARGV: prefix, ttl, writer, seq, then per counter 5 values: day, day number,
/// policy domain, field, n. Applies the batch unless the writer's high-water mark
/// (`tlsrpt:count:applied`, writer → last seq applied) already covers `seq`, so a batch
/// that is sent again after an unanswered attempt counts once. Returns 1 if applied.
const ADD_ONCE_LUA: &str = r#"
local p = ARGV[1]
local ttl = ARGV[2]
local hwm = p .. 'tlsrpt:count:applied'
local last = tonumber(redis.call('HGET', hwm, ARGV[3]) or '-1')
if tonumber(ARGV[4]) <= last then
  return 0
end
redis.call('HSET', hwm, ARGV[3], ARGV[4])
redis.call('EXPIRE', hwm, ttl)
local i = 5
while i + 4 <= #ARGV do
  local day, daynum, domain, field, n = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  i = i + 5
  local h = p .. 'tlsrpt:count:' .. day .. ':' .. domain
  local s = p .. 'tlsrpt:count:' .. day
  redis.call('HINCRBY', h, field, n)
  redis.call('EXPIRE', h, ttl)
  redis.call('SADD', s, domain)
  redis.call('EXPIRE', s, ttl)
  redis.call('ZADD', p .. 'tlsrpt:count:days', daynum, day)
end
return 1
"#;

impl RedisStore {
    /// Add counters exactly once per (`writer`, `seq`): like
    /// [`ReportStore::add_counts`], but a batch whose `seq` is not above the last one
    /// applied for `writer` is skipped (`Ok(false)`). A writer must send its batches
    /// in increasing `seq` order; then one that is sent again, because the answer to an
    /// earlier attempt was lost, is not counted twice.
    pub async fn add_counts_once(
        &self,
        writer: &str,
        seq: u64,
        counts: &[(CounterKey, u64)],
    ) -> Result<bool, StoreError> {
        let script = redis::Script::new(ADD_ONCE_LUA);
        let mut inv = script.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(self.counter_ttl_secs)
            .arg(writer)
            .arg(seq);
        for (k, n) in counts {
            let field =
                serde_json::to_string(&(k.policy_json(), k.failure_json())).map_err(|e| {
                    StoreError {
                        op: "add counts",
                        reason: e.to_string(),
                    }
                })?;
            let n = i64::try_from(*n).map_err(|_| StoreError {
                op: "add counts",
                reason: format!("count {n} out of range"),
            })?;
            inv.arg(k.day.to_string())
                .arg(day_num(k.day))
                .arg(&k.policy_domain)
                .arg(field)
                .arg(n);
        }
        let applied: i64 = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("add counts"))?;
        Ok(applied == 1)
    }

    /// Announce node `writer` at `now`, with the oldest day of the counters it still
    /// keeps locally (`None`: nothing kept). Read by [`RedisStore::nodes`].
    pub async fn announce(
        &self,
        writer: &str,
        now: i64,
        oldest_kept: Option<Day>,
    ) -> Result<(), StoreError> {
        let value = format!(
            "{now} {}",
            oldest_kept
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into())
        );
        let key = self.key("tlsrpt:nodes");
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(&key)
            .arg(writer)
            .arg(value)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(86_400)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(err("announce node"))
    }

    /// Every announced node: (writer, when, oldest day it keeps locally).
    pub async fn nodes(&self) -> Result<Vec<(String, i64, Option<Day>)>, StoreError> {
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.key("tlsrpt:nodes"))
            .query_async(&mut self.conn())
            .await
            .map_err(err("read nodes"))?;
        Ok(all
            .into_iter()
            .filter_map(|(w, v)| {
                let (at, day) = v.split_once(' ')?;
                Some((w, at.parse().ok()?, day.parse().ok()))
            })
            .collect())
    }

    /// Answer PING (a health check).
    pub async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn())
            .await
            .map(|_| ())
            .map_err(err("ping"))
    }
}

#[async_trait::async_trait]
impl PolicyStore for RedisStore {
    async fn get_policy(&self, domain: &str) -> Result<Option<CachedPolicy>, StoreError> {
        let v: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.key("sts:policy"))
            .arg(domain)
            .query_async(&mut self.conn())
            .await
            .map_err(err("get policy"))?;
        Ok(v.and_then(|v| policy_from_stored(domain.to_string(), &v)))
    }

    async fn put_policy(&self, p: &CachedPolicy) -> Result<(), StoreError> {
        let v = serde_json::to_string(&StoredPolicy {
            id: p.id.clone(),
            body: p.policy.to_text(),
            fetched_at: p.fetched_at,
        })
        .map_err(|e| StoreError {
            op: "put policy",
            reason: e.to_string(),
        })?;
        redis::cmd("HSET")
            .arg(self.key("sts:policy"))
            .arg(&p.domain)
            .arg(v)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(err("put policy"))
    }

    async fn delete_policy(&self, domain: &str) -> Result<(), StoreError> {
        redis::cmd("HDEL")
            .arg(self.key("sts:policy"))
            .arg(domain)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(err("delete policy"))
    }

    async fn all_policies(&self) -> Result<Vec<CachedPolicy>, StoreError> {
        let all: HashMap<Vec<u8>, Vec<u8>> = redis::cmd("HGETALL")
            .arg(self.key("sts:policy"))
            .query_async(&mut self.conn())
            .await
            .map_err(err("list policies"))?;
        let mut out: Vec<CachedPolicy> = all
            .into_iter()
            .filter_map(|(d, v)| match String::from_utf8(d) {
                Ok(d) => policy_from_stored(d, &v),
                Err(_) => {
                    tracing::error!("stored MTA-STS policy with a non-UTF-8 domain; ignoring it");
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| a.domain.cmp(&b.domain));
        Ok(out)
    }
}

fn policy_from_stored(domain: String, v: &[u8]) -> Option<CachedPolicy> {
    let stored: StoredPolicy = match serde_json::from_slice(v) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%domain, error = %e, "stored MTA-STS policy does not read back; ignoring it");
            return None;
        }
    };
    match Policy::parse(&stored.body) {
        Ok(policy) => Some(CachedPolicy {
            domain,
            id: stored.id,
            policy,
            fetched_at: stored.fetched_at,
        }),
        Err(e) => {
            tracing::error!(%domain, error = %e, "stored MTA-STS policy does not parse; ignoring it");
            None
        }
    }
}

#[async_trait::async_trait]
impl ReportStore for RedisStore {
    async fn add_counts(&self, counts: Vec<(CounterKey, u64)>) -> Result<(), StoreError> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let ttl = self.counter_ttl_secs;
        let mut touched = std::collections::BTreeSet::new();
        for (k, n) in &counts {
            let day = k.day.to_string();
            let field =
                serde_json::to_string(&(k.policy_json(), k.failure_json())).map_err(|e| {
                    StoreError {
                        op: "add counts",
                        reason: e.to_string(),
                    }
                })?;
            let hash = self.key(&format!("tlsrpt:count:{day}:{}", k.policy_domain));
            let n = i64::try_from(*n).map_err(|_| StoreError {
                op: "add counts",
                reason: format!("count {n} out of range"),
            })?;
            pipe.cmd("HINCRBY").arg(&hash).arg(field).arg(n).ignore();
            if touched.insert((day.clone(), k.policy_domain.clone())) {
                let set = self.key(&format!("tlsrpt:count:{day}"));
                pipe.cmd("EXPIRE").arg(&hash).arg(ttl).ignore();
                pipe.cmd("SADD").arg(&set).arg(&k.policy_domain).ignore();
                pipe.cmd("EXPIRE").arg(&set).arg(ttl).ignore();
                pipe.cmd("ZADD")
                    .arg(self.key("tlsrpt:count:days"))
                    .arg(day_num(k.day))
                    .arg(&day)
                    .ignore();
            }
        }
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(err("add counts"))
    }

    async fn counts(
        &self,
        day: Option<Day>,
        domain: Option<String>,
    ) -> Result<Vec<(CounterKey, u64)>, StoreError> {
        let days: Vec<String> = match day {
            Some(d) => vec![d.to_string()],
            None => redis::cmd("ZRANGE")
                .arg(self.key("tlsrpt:count:days"))
                .arg(0)
                .arg(-1)
                .query_async(&mut self.conn())
                .await
                .map_err(err("read counts"))?,
        };
        let mut rows = Vec::new();
        for d in &days {
            let domains: Vec<String> = match &domain {
                Some(dom) => vec![dom.clone()],
                None => redis::cmd("SMEMBERS")
                    .arg(self.key(&format!("tlsrpt:count:{d}")))
                    .query_async(&mut self.conn())
                    .await
                    .map_err(err("read counts"))?,
            };
            for dom in &domains {
                self.counts_of(d, dom, &mut rows).await?;
            }
        }
        // The order of SQLite's `ORDER BY day, policy_domain, policy, failure`.
        rows.sort();
        let mut out = Vec::with_capacity(rows.len());
        for (day, domain, policy, failure, n) in rows {
            let key = day
                .parse::<Day>()
                .ok()
                .and_then(|d| CounterKey::from_stored(d, domain, &policy, &failure));
            match key {
                Some(k) => out.push((k, n)),
                None => tracing::error!(%day, "unreadable TLS-RPT counter skipped"),
            }
        }
        Ok(out)
    }

    async fn ledger_insert(&self, rows: Vec<LedgerEntry>) -> Result<usize, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let script = redis::Script::new(INSERT_LUA);
        let mut inv = script.prepare_invoke();
        inv.arg(&self.prefix);
        for e in &rows {
            let (hasft, ft) = opt_arg(&e.first_try);
            let (haslr, lr) = opt_arg(&e.last_result);
            inv.arg(row_id(e.day, &e.policy_domain, &e.rua))
                .arg(&e.policy_domain)
                .arg(e.day.to_string())
                .arg(day_num(e.day))
                .arg(&e.rua)
                .arg(&e.report_id)
                .arg(&e.file_name)
                .arg(e.gzip.as_slice())
                .arg(e.state.as_str())
                .arg(e.attempts)
                .arg(e.created_at)
                .arg(hasft)
                .arg(ft)
                .arg(e.next_try)
                .arg(haslr)
                .arg(lr);
        }
        let n: i64 = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("ledger insert"))?;
        Ok(n.max(0) as usize)
    }

    async fn ledger_claim_due(
        &self,
        now: i64,
        lease_secs: i64,
    ) -> Result<Option<LedgerEntry>, StoreError> {
        let token = format!("{:016x}", rand::random::<u64>());
        let row: Option<Vec<Vec<u8>>> = redis::Script::new(CLAIM_LUA)
            .arg(&self.prefix)
            .arg(now)
            .arg(now.saturating_add(lease_secs))
            .arg(&token)
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("ledger claim"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        // A row that does not read back stays leased until its lease runs out, and
        // nothing is claimed this time (as with SQLite).
        Ok(entry_from_hash(&pairs(row)).map(|mut e| {
            e.lease = Some(token);
            e
        }))
    }

    async fn ledger_update(&self, e: &LedgerEntry) -> Result<bool, StoreError> {
        let Some(token) = &e.lease else {
            return Ok(false);
        };
        let (hasft, ft) = opt_arg(&e.first_try);
        let (haslr, lr) = opt_arg(&e.last_result);
        let n: i64 = redis::Script::new(UPDATE_LUA)
            .arg(&self.prefix)
            .arg(row_id(e.day, &e.policy_domain, &e.rua))
            .arg(token)
            .arg(e.state.as_str())
            .arg(e.attempts)
            .arg(hasft)
            .arg(ft)
            .arg(e.next_try)
            .arg(haslr)
            .arg(lr)
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("ledger update"))?;
        Ok(n == 1)
    }

    async fn ledger_list(&self, day: Option<Day>) -> Result<Vec<LedgerEntry>, StoreError> {
        let days: Vec<String> = match day {
            Some(d) => vec![d.to_string()],
            None => redis::cmd("ZRANGE")
                .arg(self.key("tlsrpt:ledger:days"))
                .arg(0)
                .arg(-1)
                .query_async(&mut self.conn())
                .await
                .map_err(err("ledger list"))?,
        };
        let mut out = Vec::new();
        for d in &days {
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.key(&format!("tlsrpt:ledger:day:{d}")))
                .query_async(&mut self.conn())
                .await
                .map_err(err("ledger list"))?;
            if ids.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGETALL")
                    .arg(self.key(&format!("tlsrpt:ledger:row:{id}")));
            }
            let rows: Vec<HashMap<Vec<u8>, Vec<u8>>> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(err("ledger list"))?;
            // An empty hash: removed since the set was read.
            out.extend(
                rows.iter()
                    .filter(|h| !h.is_empty())
                    .filter_map(entry_from_hash),
            );
        }
        out.sort_by(|a, b| {
            (a.day, &a.policy_domain, &a.rua).cmp(&(b.day, &b.policy_domain, &b.rua))
        });
        Ok(out)
    }

    async fn day_done(&self, day: Day) -> Result<bool, StoreError> {
        redis::cmd("HEXISTS")
            .arg(self.key("tlsrpt:done"))
            .arg(day.to_string())
            .query_async(&mut self.conn())
            .await
            .map_err(err("report day"))
    }

    async fn mark_day_done(&self, day: Day, at: i64) -> Result<(), StoreError> {
        redis::cmd("HSETNX")
            .arg(self.key("tlsrpt:done"))
            .arg(day.to_string())
            .arg(at)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(err("report day"))
    }

    async fn prune_before(&self, day: Day) -> Result<(), StoreError> {
        redis::Script::new(PRUNE_LUA)
            .arg(&self.prefix)
            .arg(day_num(day))
            .arg(day.to_string())
            .invoke_async::<()>(&mut self.conn())
            .await
            .map_err(err("prune"))
    }
}
