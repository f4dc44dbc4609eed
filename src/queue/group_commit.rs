//! Group commit for the spool: write transactions that arrive together share one
//! SQLite transaction (one fsync of the WAL) and one fsync of the `messages/`
//! directory. Each caller still returns only after its own work is durable; a failing
//! piece of work is rolled back alone (a savepoint each).

use super::spool::SpoolError;
use rusqlite::{Connection, TransactionBehavior};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

/// Most pieces of work in one transaction.
const MAX_BATCH: usize = 256;

/// One piece of work: runs inside the batch's transaction (in its own savepoint).
pub(crate) type Work = Box<dyn FnOnce(&Connection) -> Result<(), SpoolError> + Send>;

struct Job {
    work: Work,
    /// The work published a new file in `messages/`: fsync the directory first.
    sync_messages_dir: bool,
    done: SyncSender<Result<(), SpoolError>>,
}

/// Handle to the writer thread (which ends when every handle is dropped).
pub(crate) struct GroupCommit {
    jobs: Option<Sender<Job>>,
    db_path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for GroupCommit {
    /// Stop the writer and wait for it, so the connection is closed (and the WAL
    /// checkpointed) when the spool is dropped.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn failed(op: &'static str, path: &Path, e: &dyn std::fmt::Display) -> SpoolError {
    SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    }
}

impl GroupCommit {
    /// Start the writer. It shares the spool's connection (taking its lock for each
    /// batch), so readers never see a half-applied batch between two of their queries.
    pub(crate) fn start(
        conn: Arc<Mutex<Connection>>,
        db_path: PathBuf,
        messages: PathBuf,
    ) -> io::Result<GroupCommit> {
        let (jobs, rx) = std::sync::mpsc::channel();
        let path = db_path.clone();
        let thread = std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || writer(&conn, &path, &messages, &rx))?;
        Ok(GroupCommit {
            jobs: Some(jobs),
            db_path,
            thread: Some(thread),
        })
    }

    /// Run `work` in the next group transaction and wait until it is committed.
    pub(crate) fn run(&self, sync_messages_dir: bool, work: Work) -> Result<(), SpoolError> {
        let (done, wait) = sync_channel(1);
        self.jobs
            .as_ref()
            .ok_or_else(|| {
                failed(
                    "commit (writer stopped)",
                    &self.db_path,
                    &"spool is closing",
                )
            })?
            .send(Job {
                work,
                sync_messages_dir,
                done,
            })
            .map_err(|_| {
                failed(
                    "commit (writer stopped)",
                    &self.db_path,
                    &"spool writer thread is gone",
                )
            })?;
        wait.recv().unwrap_or_else(|_| {
            Err(failed(
                "commit (writer stopped)",
                &self.db_path,
                &"spool writer thread is gone",
            ))
        })
    }
}

fn writer(conn: &Mutex<Connection>, db_path: &Path, messages: &Path, rx: &Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if jobs.iter().any(|j| j.sync_messages_dir)
            && let Err(e) = super::spool::sync_dir(messages)
        {
            for j in jobs {
                let _ = j.done.send(Err(failed("fsync directory", messages, &e)));
            }
            continue;
        }
        let mut guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
        let mut tx = match guard.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                for j in jobs {
                    let _ = j.done.send(Err(failed("begin transaction", db_path, &e)));
                }
                continue;
            }
        };
        let mut results = Vec::with_capacity(jobs.len());
        for j in jobs {
            let r = match tx.savepoint() {
                Ok(sp) => match (j.work)(&sp) {
                    Ok(()) => sp
                        .commit()
                        .map_err(|e| failed("commit savepoint", db_path, &e)),
                    Err(e) => Err(e), // the savepoint rolls back when dropped
                },
                Err(e) => Err(failed("begin savepoint", db_path, &e)),
            };
            results.push((j.done, r));
        }
        match tx.commit() {
            Ok(()) => {
                for (done, r) in results {
                    let _ = done.send(r);
                }
            }
            Err(e) => {
                for (done, _) in results {
                    let _ = done.send(Err(failed("commit", db_path, &e)));
                }
            }
        }
    }
}
