//! The embedded store: SQLite (bundled) in `storage.data_dir`.

use super::{PolicyStore, StoreError};
use crate::sts::{CachedPolicy, Policy};
use crate::tlsrpt::SessionResult;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// SQLite-backed [`PolicyStore`]. Calls run on tokio's blocking pool.
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
             CREATE TABLE IF NOT EXISTS tls_session (
                 id INTEGER PRIMARY KEY,
                 at INTEGER NOT NULL,
                 policy_domain TEXT NOT NULL,
                 result TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS tls_session_domain_at ON tls_session (policy_domain, at);",
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

impl SqliteStore {
    /// Append session results (one transaction for the batch).
    pub async fn insert_sessions(&self, batch: Vec<SessionResult>) -> Result<(), StoreError> {
        self.with("insert sessions", move |c| {
            let tx = c.unchecked_transaction().map_err(err("insert sessions"))?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO tls_session (at, policy_domain, result) VALUES (?1, ?2, ?3)",
                    )
                    .map_err(err("insert sessions"))?;
                for r in &batch {
                    let json = serde_json::to_string(r).map_err(|e| StoreError {
                        op: "insert sessions",
                        reason: e.to_string(),
                    })?;
                    stmt.execute(params![r.at, r.policy_domain, json])
                        .map_err(err("insert sessions"))?;
                }
            }
            tx.commit().map_err(err("insert sessions"))
        })
        .await
    }

    /// Session results with `from <= at < to` (Unix seconds), oldest first.
    pub async fn sessions_between(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<SessionResult>, StoreError> {
        self.with("list sessions", move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT result FROM tls_session WHERE at >= ?1 AND at < ?2 ORDER BY at, id",
                )
                .map_err(err("list sessions"))?;
            let rows = stmt
                .query_map(params![from, to], |r| r.get::<_, String>(0))
                .map_err(err("list sessions"))?;
            let mut out = Vec::new();
            for row in rows {
                let json = row.map_err(err("list sessions"))?;
                match serde_json::from_str(&json) {
                    Ok(r) => out.push(r),
                    Err(e) => tracing::error!(error = %e, "unreadable session result skipped"),
                }
            }
            Ok(out)
        })
        .await
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
}
