//! The embedded store: SQLite (bundled) in `storage.data_dir`.

use super::{PolicyStore, ReportStore, StoreError};
use crate::sts::{CachedPolicy, Policy};
use crate::tlsrpt::{CounterKey, Day, LedgerEntry, LedgerState};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// SQLite-backed [`PolicyStore`] and [`ReportStore`] (`store.sqlite3`). Calls run on
/// tokio's blocking pool.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn err(op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError {
        op,
        reason: e.to_string(),
    }
}

impl SqliteStore {
    /// The database file name inside the data directory.
    pub const FILE: &'static str = "store.sqlite3";

    /// Open (creating if needed) `<data_dir>/store.sqlite3`.
    pub fn open(data_dir: &Path) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError {
            op: "create data_dir",
            reason: format!("{}: {e}", data_dir.display()),
        })?;
        let path = data_dir.join(Self::FILE);
        let conn = Connection::open(&path).map_err(|e| StoreError {
            op: "open",
            reason: format!("{}: {e}", path.display()),
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err("busy_timeout"))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS sts_policy (
                 domain TEXT PRIMARY KEY,
                 id TEXT NOT NULL,
                 body TEXT NOT NULL,
                 fetched_at INTEGER NOT NULL
             );
             DROP TABLE IF EXISTS tls_session;
             CREATE TABLE IF NOT EXISTS tlsrpt_counter (
                 day TEXT NOT NULL,
                 policy_domain TEXT NOT NULL,
                 policy TEXT NOT NULL,
                 failure TEXT NOT NULL,
                 count INTEGER NOT NULL,
                 PRIMARY KEY (day, policy_domain, policy, failure)
             );
             CREATE TABLE IF NOT EXISTS tlsrpt_report (
                 policy_domain TEXT NOT NULL,
                 day TEXT NOT NULL,
                 rua TEXT NOT NULL,
                 report_id TEXT NOT NULL,
                 file_name TEXT NOT NULL,
                 gzip BLOB NOT NULL,
                 state TEXT NOT NULL,
                 attempts INTEGER NOT NULL,
                 created_at INTEGER NOT NULL,
                 first_try INTEGER,
                 next_try INTEGER NOT NULL,
                 lease_until INTEGER NOT NULL DEFAULT 0,
                 lease_token TEXT,
                 last_result TEXT,
                 PRIMARY KEY (policy_domain, day, rua)
             );
             CREATE INDEX IF NOT EXISTS tlsrpt_report_due ON tlsrpt_report (state, next_try);
             CREATE TABLE IF NOT EXISTS tlsrpt_day (
                 day TEXT PRIMARY KEY,
                 done_at INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS tlsrpt_spill (
                 writer TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 day TEXT NOT NULL,
                 policy_domain TEXT NOT NULL,
                 policy TEXT NOT NULL,
                 failure TEXT NOT NULL,
                 count INTEGER NOT NULL
             );
             CREATE UNIQUE INDEX IF NOT EXISTS tlsrpt_spill_key
                 ON tlsrpt_spill (writer, seq, day, policy_domain, policy, failure);",
        )
        .map_err(err("create schema"))?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let guard = conn.lock().map_err(|_| StoreError {
                op,
                reason: "connection mutex poisoned".into(),
            })?;
            f(&guard)
        })
        .await
        .map_err(|e| StoreError {
            op,
            reason: e.to_string(),
        })?
    }
}

/// Counters from a query selecting (day, policy domain, policy, failure, count);
/// unreadable rows are logged and skipped.
fn counter_rows(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
    op: &'static str,
) -> Result<Vec<(CounterKey, u64)>, StoreError> {
    let rows = stmt
        .query_map(params, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .map_err(err(op))?;
    let mut out = Vec::new();
    for row in rows {
        let (day, domain, policy, failure, n) = row.map_err(err(op))?;
        let key = day
            .parse::<Day>()
            .ok()
            .and_then(|d| CounterKey::from_stored(d, domain, &policy, &failure));
        match key {
            Some(k) => out.push((k, n.max(0) as u64)),
            None => tracing::error!(%day, %op, "unreadable TLS-RPT counter skipped"),
        }
    }
    Ok(out)
}

/// A batch of counters kept locally while the shared store is unreachable
/// ([`super::FleetStore`]): its writer, sequence number and counts.
pub(crate) type SpilledBatch = (String, u64, Vec<(CounterKey, u64)>);

impl SqliteStore {
    /// Keep a batch of counters until it can be written to the shared store.
    ///
    /// Only the first spilled batch may have reached the shared store already (it is
    /// the one that was sent when the store stopped answering, or the one a drain
    /// sends); every later one is unsent. So a new batch is merged into this writer's
    /// last batch when that one is not the first: it takes the new `seq` and the
    /// counts are summed. A long outage then keeps at most two batches per writer,
    /// with one row per distinct counter.
    pub(crate) async fn spill(
        &self,
        writer: String,
        seq: u64,
        counts: Vec<(CounterKey, u64)>,
    ) -> Result<(), StoreError> {
        self.with("spill counts", move |c| {
            let tx = c.unchecked_transaction().map_err(err("spill counts"))?;
            {
                let head: Option<(String, i64)> = tx
                    .query_row(
                        "SELECT writer, seq FROM tlsrpt_spill ORDER BY rowid LIMIT 1",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(err("spill counts"))?;
                let tail: Option<i64> = tx
                    .query_row(
                        "SELECT seq FROM tlsrpt_spill WHERE writer = ?1 ORDER BY rowid DESC LIMIT 1",
                        params![writer],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(err("spill counts"))?;
                if let Some(tail) = tail
                    && head.as_ref() != Some(&(writer.clone(), tail))
                {
                    tx.execute(
                        "UPDATE tlsrpt_spill SET seq = ?3 WHERE writer = ?1 AND seq = ?2",
                        params![writer, tail, seq as i64],
                    )
                    .map_err(err("spill counts"))?;
                }
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO tlsrpt_spill
                         (writer, seq, day, policy_domain, policy, failure, count)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                         ON CONFLICT (writer, seq, day, policy_domain, policy, failure)
                         DO UPDATE SET count = count + excluded.count",
                    )
                    .map_err(err("spill counts"))?;
                for (k, n) in &counts {
                    stmt.execute(params![
                        writer,
                        seq as i64,
                        k.day.to_string(),
                        k.policy_domain,
                        k.policy_json(),
                        k.failure_json(),
                        *n as i64
                    ])
                    .map_err(err("spill counts"))?;
                }
            }
            tx.commit().map_err(err("spill counts"))
        })
        .await
    }

    /// The batch spilled first, if any.
    pub(crate) async fn first_spilled(&self) -> Result<Option<SpilledBatch>, StoreError> {
        self.with("read spilled counts", |c| {
            let first: Option<(String, i64)> = c
                .query_row(
                    "SELECT writer, seq FROM tlsrpt_spill ORDER BY rowid LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(err("read spilled counts"))?;
            let Some((writer, seq)) = first else {
                return Ok(None);
            };
            let mut stmt = c
                .prepare(
                    "SELECT day, policy_domain, policy, failure, count FROM tlsrpt_spill
                     WHERE writer = ?1 AND seq = ?2 ORDER BY rowid",
                )
                .map_err(err("read spilled counts"))?;
            let counts = counter_rows(&mut stmt, params![writer, seq], "read spilled counts")?;
            Ok(Some((writer, seq.max(0) as u64, counts)))
        })
        .await
    }

    /// Forget a spilled batch (it is in the shared store now).
    pub(crate) async fn unspill(&self, writer: String, seq: u64) -> Result<(), StoreError> {
        self.with("drop spilled counts", move |c| {
            c.execute(
                "DELETE FROM tlsrpt_spill WHERE writer = ?1 AND seq = ?2",
                params![writer, seq as i64],
            )
            .map(|_| ())
            .map_err(err("drop spilled counts"))
        })
        .await
    }

    /// The oldest day of the spilled counters.
    pub(crate) async fn oldest_spilled_day(&self) -> Result<Option<Day>, StoreError> {
        self.with("read spilled counts", |c| {
            let day: Option<String> = c
                .query_row("SELECT MIN(day) FROM tlsrpt_spill", [], |r| r.get(0))
                .map_err(err("read spilled counts"))?;
            Ok(day.and_then(|d| d.parse().ok()))
        })
        .await
    }

    /// How many batches are spilled.
    pub(crate) async fn spilled_batches(&self) -> Result<u64, StoreError> {
        self.with("count spilled counts", |c| {
            c.query_row(
                "SELECT COUNT(*) FROM (SELECT DISTINCT writer, seq FROM tlsrpt_spill)",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(err("count spilled counts"))
        })
        .await
    }
}

fn row_to_policy(
    domain: String,
    id: String,
    body: String,
    fetched_at: i64,
) -> Option<CachedPolicy> {
    match Policy::parse(&body) {
        Ok(policy) => Some(CachedPolicy {
            domain,
            id,
            policy,
            fetched_at,
        }),
        Err(e) => {
            tracing::error!(%domain, error = %e, "stored MTA-STS policy does not parse; ignoring it");
            None
        }
    }
}

#[async_trait::async_trait]
impl PolicyStore for SqliteStore {
    async fn get_policy(&self, domain: &str) -> Result<Option<CachedPolicy>, StoreError> {
        let domain = domain.to_string();
        self.with("get policy", move |c| {
            let row = c
                .query_row(
                    "SELECT id, body, fetched_at FROM sts_policy WHERE domain = ?1",
                    params![domain],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                        ))
                    },
                )
                .optional()
                .map_err(err("get policy"))?;
            Ok(row.and_then(|(id, body, at)| row_to_policy(domain, id, body, at)))
        })
        .await
    }

    async fn put_policy(&self, p: &CachedPolicy) -> Result<(), StoreError> {
        let (domain, id, body, at) = (
            p.domain.clone(),
            p.id.clone(),
            p.policy.to_text(),
            p.fetched_at,
        );
        self.with("put policy", move |c| {
            c.execute(
                "INSERT INTO sts_policy (domain, id, body, fetched_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(domain) DO UPDATE SET id = ?2, body = ?3, fetched_at = ?4",
                params![domain, id, body, at],
            )
            .map_err(err("put policy"))?;
            Ok(())
        })
        .await
    }

    async fn delete_policy(&self, domain: &str) -> Result<(), StoreError> {
        let domain = domain.to_string();
        self.with("delete policy", move |c| {
            c.execute("DELETE FROM sts_policy WHERE domain = ?1", params![domain])
                .map_err(err("delete policy"))?;
            Ok(())
        })
        .await
    }

    async fn all_policies(&self) -> Result<Vec<CachedPolicy>, StoreError> {
        self.with("list policies", |c| {
            let mut stmt = c
                .prepare("SELECT domain, id, body, fetched_at FROM sts_policy ORDER BY domain")
                .map_err(err("list policies"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .map_err(err("list policies"))?;
            let mut out = Vec::new();
            for row in rows {
                let (d, id, body, at) = row.map_err(err("list policies"))?;
                out.extend(row_to_policy(d, id, body, at));
            }
            Ok(out)
        })
        .await
    }
}

const LEDGER_COLUMNS: &str = "policy_domain, day, rua, report_id, file_name, gzip, state, \
     attempts, created_at, first_try, next_try, last_result, lease_token";

fn row_to_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<LedgerEntry>> {
    let day: String = r.get(1)?;
    let state: String = r.get(6)?;
    let (Ok(day), Some(state)) = (day.parse::<Day>(), LedgerState::parse(&state)) else {
        tracing::error!(%day, %state, "unreadable TLS-RPT ledger row skipped");
        return Ok(None);
    };
    Ok(Some(LedgerEntry {
        policy_domain: r.get(0)?,
        day,
        rua: r.get(2)?,
        report_id: r.get(3)?,
        file_name: r.get(4)?,
        gzip: r.get(5)?,
        state,
        attempts: r.get(7)?,
        created_at: r.get(8)?,
        first_try: r.get(9)?,
        next_try: r.get(10)?,
        last_result: r.get(11)?,
        lease: r.get(12)?,
    }))
}

#[async_trait::async_trait]
impl ReportStore for SqliteStore {
    async fn add_counts(&self, counts: Vec<(CounterKey, u64)>) -> Result<(), StoreError> {
        self.with("add counts", move |c| {
            let tx = c.unchecked_transaction().map_err(err("add counts"))?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO tlsrpt_counter (day, policy_domain, policy, failure, count)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (day, policy_domain, policy, failure)
                         DO UPDATE SET count = count + excluded.count",
                    )
                    .map_err(err("add counts"))?;
                for (k, n) in &counts {
                    stmt.execute(params![
                        k.day.to_string(),
                        k.policy_domain,
                        k.policy_json(),
                        k.failure_json(),
                        *n as i64
                    ])
                    .map_err(err("add counts"))?;
                }
            }
            tx.commit().map_err(err("add counts"))
        })
        .await
    }

    async fn counts(
        &self,
        day: Option<Day>,
        domain: Option<String>,
    ) -> Result<Vec<(CounterKey, u64)>, StoreError> {
        self.with("read counts", move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT day, policy_domain, policy, failure, count FROM tlsrpt_counter
                     WHERE (?1 IS NULL OR day = ?1) AND (?2 IS NULL OR policy_domain = ?2)
                     ORDER BY day, policy_domain, policy, failure",
                )
                .map_err(err("read counts"))?;
            counter_rows(
                &mut stmt,
                params![day.map(|d| d.to_string()), domain],
                "read counts",
            )
        })
        .await
    }

    async fn ledger_insert(&self, rows: Vec<LedgerEntry>) -> Result<usize, StoreError> {
        self.with("ledger insert", move |c| {
            // IMMEDIATE: a concurrent maker of the same day's report (relay and CLI)
            // waits, then finds this one's report and reuses it.
            let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)
                .map_err(err("ledger insert"))?;
            let mut n = 0;
            {
                let mut existing = tx
                    .prepare_cached(
                        "SELECT report_id, file_name, gzip FROM tlsrpt_report
                         WHERE policy_domain = ?1 AND day = ?2 LIMIT 1",
                    )
                    .map_err(err("ledger insert"))?;
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "INSERT OR IGNORE INTO tlsrpt_report ({LEDGER_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, NULL)"
                    ))
                    .map_err(err("ledger insert"))?;
                for mut e in rows {
                    let made: Option<(String, String, Vec<u8>)> = existing
                        .query_row(params![e.policy_domain, e.day.to_string()], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })
                        .optional()
                        .map_err(err("ledger insert"))?;
                    if let Some((id, file, gzip)) = made {
                        (e.report_id, e.file_name, e.gzip) = (id, file, gzip);
                    }
                    n += stmt
                        .execute(params![
                            e.policy_domain,
                            e.day.to_string(),
                            e.rua,
                            e.report_id,
                            e.file_name,
                            e.gzip,
                            e.state.as_str(),
                            e.attempts,
                            e.created_at,
                            e.first_try,
                            e.next_try,
                            e.last_result
                        ])
                        .map_err(err("ledger insert"))?;
                }
            }
            tx.commit().map_err(err("ledger insert"))?;
            Ok(n)
        })
        .await
    }

    async fn ledger_claim_due(
        &self,
        now: i64,
        lease_secs: i64,
    ) -> Result<Option<LedgerEntry>, StoreError> {
        self.with("ledger claim", move |c| {
            // IMMEDIATE: the write lock is taken before reading, so two processes
            // cannot claim the same row.
            let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)
                .map_err(err("ledger claim"))?;
            let row = tx
                .query_row(
                    &format!(
                        "SELECT {LEDGER_COLUMNS} FROM tlsrpt_report
                         WHERE state = 'pending' AND next_try <= ?1 AND lease_until <= ?1
                         ORDER BY next_try LIMIT 1"
                    ),
                    params![now],
                    row_to_entry,
                )
                .optional()
                .map_err(err("ledger claim"))?
                .flatten();
            let Some(mut row) = row else {
                return Ok(None);
            };
            let token = format!("{:016x}", rand::random::<u64>());
            tx.execute(
                "UPDATE tlsrpt_report SET lease_until = ?4, lease_token = ?5
                 WHERE policy_domain = ?1 AND day = ?2 AND rua = ?3",
                params![
                    row.policy_domain,
                    row.day.to_string(),
                    row.rua,
                    now + lease_secs,
                    token
                ],
            )
            .map_err(err("ledger claim"))?;
            tx.commit().map_err(err("ledger claim"))?;
            row.lease = Some(token);
            Ok(Some(row))
        })
        .await
    }

    async fn ledger_update(&self, e: &LedgerEntry) -> Result<bool, StoreError> {
        let e = e.clone();
        self.with("ledger update", move |c| {
            let n = c
                .execute(
                    "UPDATE tlsrpt_report SET state = ?4, attempts = ?5, first_try = ?6,
                         next_try = ?7, last_result = ?8, lease_until = 0, lease_token = NULL
                     WHERE policy_domain = ?1 AND day = ?2 AND rua = ?3
                       AND state = 'pending' AND lease_token = ?9",
                    params![
                        e.policy_domain,
                        e.day.to_string(),
                        e.rua,
                        e.state.as_str(),
                        e.attempts,
                        e.first_try,
                        e.next_try,
                        e.last_result,
                        e.lease
                    ],
                )
                .map_err(err("ledger update"))?;
            Ok(n == 1)
        })
        .await
    }

    async fn ledger_list(&self, day: Option<Day>) -> Result<Vec<LedgerEntry>, StoreError> {
        self.with("ledger list", move |c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {LEDGER_COLUMNS} FROM tlsrpt_report WHERE (?1 IS NULL OR day = ?1)
                     ORDER BY day, policy_domain, rua"
                ))
                .map_err(err("ledger list"))?;
            let rows = stmt
                .query_map(params![day.map(|d| d.to_string())], row_to_entry)
                .map_err(err("ledger list"))?;
            let mut out = Vec::new();
            for r in rows {
                out.extend(r.map_err(err("ledger list"))?);
            }
            Ok(out)
        })
        .await
    }

    async fn day_done(&self, day: Day) -> Result<bool, StoreError> {
        self.with("report day", move |c| {
            c.query_row(
                "SELECT 1 FROM tlsrpt_day WHERE day = ?1",
                params![day.to_string()],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(err("report day"))
        })
        .await
    }

    async fn mark_day_done(&self, day: Day, at: i64) -> Result<(), StoreError> {
        self.with("report day", move |c| {
            c.execute(
                "INSERT OR IGNORE INTO tlsrpt_day (day, done_at) VALUES (?1, ?2)",
                params![day.to_string(), at],
            )
            .map_err(err("report day"))?;
            Ok(())
        })
        .await
    }

    async fn prune_before(&self, day: Day) -> Result<(), StoreError> {
        self.with("prune", move |c| {
            let d = day.to_string();
            c.execute("DELETE FROM tlsrpt_counter WHERE day < ?1", params![d])
                .map_err(err("prune"))?;
            c.execute(
                "DELETE FROM tlsrpt_report WHERE day < ?1 AND state != 'pending'",
                params![d],
            )
            .map_err(err("prune"))?;
            c.execute("DELETE FROM tlsrpt_day WHERE day < ?1", params![d])
                .map_err(err("prune"))?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn policies_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = CachedPolicy {
            domain: "example.test".into(),
            id: "abc".into(),
            policy: Policy::parse(
                "version: STSv1\nmode: enforce\nmx: *.example.test\nmax_age: 600\nx: y\n",
            )
            .unwrap(),
            fetched_at: 1_000,
        };
        {
            let s = SqliteStore::open(dir.path()).unwrap();
            s.put_policy(&p).await.unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.get_policy("example.test").await.unwrap(), Some(p.clone()));
        assert_eq!(s.all_policies().await.unwrap(), vec![p]);
        s.delete_policy("example.test").await.unwrap();
        assert_eq!(s.get_policy("example.test").await.unwrap(), None);
    }
    // The ledger and counters are covered for both stores by tests/store_contract.rs.
}
