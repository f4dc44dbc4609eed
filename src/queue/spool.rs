//! The durable message spool: one body file per message plus metadata in SQLite.
//!
//! A message is acknowledged (`250` after DATA) only once [`Incoming::commit`] has
//! returned `Ok`; at that point the body and its metadata are on stable storage, so a
//! crash may repeat a delivery but never lose one (RFC 5321 §6.1, checklist R92).
//!
//! # Layout
//!
//! ```text
//! <data_dir>/spool/
//!     incoming/<id>.tmp    bodies being received (never acknowledged)
//!     messages/<id>        committed bodies, one file per message
//!     corrupt/             orphan bodies moved aside by recovery
//!     queue.sqlite3        metadata (WAL, synchronous=FULL, busy_timeout 5 s)
//!     lock                 advisory lock file (see "Several processes")
//! ```
//!
//! # Commit order
//!
//! [`Incoming::commit`] (1) flushes and fsyncs the body file, (2) moves it to
//! `messages/<id>` without replacing an existing file (hard link, or rename where
//! hard links are unsupported), (3) fsyncs `messages/`, (4) inserts the message row and
//! one row per recipient in one SQLite transaction (`synchronous=FULL` fsyncs the WAL),
//! and only then (5) unlinks the temporary name. A crash before (4) leaves at most an
//! unacknowledged body, which recovery removes or moves to `corrupt/`.
//!
//! # Recovery
//!
//! [`Spool::open`] deletes leftovers in `incoming/`, moves bodies in `messages/` that
//! have no metadata row to `corrupt/` (with a `tracing::warn!`), and marks rows whose
//! body file is missing, unreadable or of the wrong size as corrupt. Corrupt messages
//! stay in the database, are reported by [`Spool::list`] and [`Spool::counts`], and are
//! never returned by [`Spool::due`].
//!
//! # Several processes
//!
//! The relay and a CLI (`stsrelay queue list`) may open the same spool at once: SQLite
//! arbitrates the database, and every open [`Spool`] holds a *shared* `flock` on
//! `spool/lock`. Recovery is destructive (it deletes in-flight `incoming/` files), so it
//! runs only when `open` can take the lock *exclusively*, i.e. when no other `Spool` is
//! open on that directory; otherwise it is skipped (see [`Spool::recovery`]).
//!
//! # Blocking
//!
//! Every method here does blocking file and SQLite I/O (including fsync). Async code
//! calls them inside [`tokio::task::spawn_blocking`]; [`Spool`] is cheap to clone and
//! [`Incoming`] is `Send + 'static`, so both can be moved into the closure. For the DATA
//! phase, buffer the body in memory (or in chunks of up to a few hundred KiB) and call
//! [`Incoming::write`] from `spawn_blocking`; always call [`Incoming::commit`] there.
//!
//! # Example
//!
//! ```
//! use stsrelay::queue::spool::{Envelope, RcptState, RecipientSpec, Spool};
//!
//! let dir = tempfile::tempdir()?;
//! let spool = Spool::open(dir.path())?;
//!
//! let mut msg = spool.incoming()?;
//! msg.write(b"Subject: hello\r\n\r\nHi!\r\n")?;
//! let envelope = Envelope {
//!     mail_from: "alice@example.org".into(),
//!     recipients: vec![RecipientSpec::new("bob@Example.COM")],
//!     received_at: 1_700_000_000,
//!     ..Default::default()
//! };
//! let id = msg.commit(&envelope)?; // only now may the server answer 250
//!
//! let listed = spool.list()?;
//! assert_eq!(listed.len(), 1);
//! assert_eq!(listed[0].id, id);
//! assert_eq!(listed[0].recipients[0].domain, "example.com");
//! assert_eq!(listed[0].recipients[0].state, RcptState::Queued);
//! assert_eq!(spool.read_body(&id)?, b"Subject: hello\r\n\r\nHi!\r\n");
//! assert_eq!(spool.due(1_700_000_000, 10)?.len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Name of the spool directory inside the data directory.
pub const SPOOL_DIR: &str = "spool";
/// Name of the SQLite metadata file inside the spool directory.
pub const DB_FILE: &str = "queue.sqlite3";

const INCOMING_DIR: &str = "incoming";
const MESSAGES_DIR: &str = "messages";
const CORRUPT_DIR: &str = "corrupt";
const LOCK_FILE: &str = "lock";
const SCHEMA_VERSION: i64 = 1;
/// How many fresh ids `incoming`/`commit` try before giving up.
const MAX_ID_TRIES: usize = 16;
/// Buffer of an [`Incoming`] body writer.
const WRITE_BUFFER: usize = 64 * 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS message (
    id             TEXT PRIMARY KEY,
    envelope       TEXT NOT NULL,
    received_at    INTEGER NOT NULL,
    body_size      INTEGER NOT NULL,
    corrupt        INTEGER NOT NULL DEFAULT 0,
    corrupt_reason TEXT
);
CREATE INDEX IF NOT EXISTS message_received ON message (received_at, id);
CREATE TABLE IF NOT EXISTS recipient (
    message_id   TEXT NOT NULL REFERENCES message (id),
    idx          INTEGER NOT NULL,
    address      TEXT NOT NULL,
    domain       TEXT NOT NULL,
    state        TEXT NOT NULL
                 CHECK (state IN ('queued', 'deferred', 'delivered', 'bounced')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_reason  TEXT,
    next_attempt INTEGER NOT NULL,
    PRIMARY KEY (message_id, idx)
);
CREATE INDEX IF NOT EXISTS recipient_due ON recipient (state, next_attempt);
";

/// SQL condition "recipient `r` still needs delivery".
const PENDING: &str = "r.state IN ('queued', 'deferred')";

// ---------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------

/// Why a spool operation failed. Every variant names the operation and, where there
/// is one, the file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// A file-system operation failed (disk full, permissions, missing directory…).
    #[error("spool: cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. `"fsync"`.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An SQLite operation on the metadata database failed.
    #[error("spool database {}: cannot {op}: {source}", path.display())]
    Db {
        /// What was being done, e.g. `"insert message"`.
        op: &'static str,
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
    /// The metadata database failed its integrity check at open.
    #[error("spool database {} is damaged: {detail}", path.display())]
    DbCorrupt {
        /// The database file.
        path: PathBuf,
        /// What `PRAGMA quick_check` reported.
        detail: String,
    },
    /// The database was written by a newer version of stsrelay.
    #[error(
        "spool database {} has schema version {found}; this build supports {supported}",
        path.display()
    )]
    SchemaVersion {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// The newest version this build understands.
        supported: i64,
    },
    /// The envelope cannot be spooled (for example it has no recipients).
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(String),
    /// The envelope could not be encoded as JSON.
    #[error("cannot encode the envelope as JSON: {0}")]
    Encode(#[source] serde_json::Error),
    /// An earlier write to this [`Incoming`] failed, so it can only be dropped.
    #[error("incoming message {} is unusable after an earlier error", path.display())]
    Abandoned {
        /// The temporary body file.
        path: PathBuf,
    },
    /// No unique queue id could be allocated (should never happen).
    #[error("no unused queue id found after {MAX_ID_TRIES} tries")]
    IdExhausted,
    /// No message with this id is in the spool.
    #[error("no message {0} in the spool")]
    NotFound(QueueId),
    /// The message exists but has no recipient with this index.
    #[error("message {id} has no recipient #{index}")]
    NoSuchRecipient {
        /// The message.
        id: QueueId,
        /// The index passed by the caller.
        index: usize,
    },
    /// The recipient is already `Delivered` or `Bounced`; its state is final.
    #[error("recipient #{index} of message {id} is already {state}")]
    AlreadyFinal {
        /// The message.
        id: QueueId,
        /// The recipient index.
        index: usize,
        /// Its (final) state.
        state: RcptState,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn db_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(rusqlite::Error) -> SpoolError + 'a {
    move |source| SpoolError::Db {
        op,
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------
// Queue ids
// ---------------------------------------------------------------------------------

/// A queue id: 16 upper-case hex digits, unique within a spool and sortable by
/// creation time.
///
/// The 64 bits are 44 bits of milliseconds since the Unix epoch, a 12-bit per-process
/// sequence number and the low 8 bits of the process id. Ids made by one process are
/// strictly increasing. Parsing accepts exactly 16 characters from `[0-9A-F]`, so a
/// parsed id is always safe to use as a file name.
///
/// ```
/// use stsrelay::queue::spool::QueueId;
///
/// let id: QueueId = "018F3A2B4C5D6E7F".parse()?;
/// assert_eq!(id.to_string(), "018F3A2B4C5D6E7F");
/// assert!("../etc/passwd".parse::<QueueId>().is_err());
/// assert!("018f3a2b4c5d6e7f".parse::<QueueId>().is_err()); // lower case
/// # Ok::<(), stsrelay::queue::spool::ParseQueueIdError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(u64);

/// Why a string is not a [`QueueId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue id {input:?}: expected {len} characters from 0-9 and A-F", len = QueueId::LEN)]
pub struct ParseQueueIdError {
    /// The rejected input (cut to 40 characters).
    pub input: String,
}

const MS_BITS: u32 = 44;
const SEQ_BITS: u32 = 12;
const PID_BITS: u32 = 8;
const MS_MASK: u64 = (1 << MS_BITS) - 1;
const SEQ_MAX: u64 = (1 << SEQ_BITS) - 1;
const PID_MASK: u64 = (1 << PID_BITS) - 1;

/// (last millisecond used, last sequence number used) of this process.
static ID_STATE: Mutex<(u64, u64)> = Mutex::new((0, 0));

impl QueueId {
    /// Length of the textual form.
    pub const LEN: usize = 16;

    /// A new id, larger than every id this process made before.
    fn generate() -> QueueId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let now = u64::try_from(now).unwrap_or(u64::MAX) & MS_MASK;
        let mut state = ID_STATE.lock().unwrap_or_else(PoisonError::into_inner);
        let (last_ms, last_seq) = *state;
        // Never go backwards (clock steps) and never reuse (ms, seq) in this process.
        let (ms, seq) = if now > last_ms {
            (now, 0)
        } else if last_seq < SEQ_MAX {
            (last_ms, last_seq + 1)
        } else {
            ((last_ms + 1) & MS_MASK, 0)
        };
        *state = (ms, seq);
        let pid = u64::from(std::process::id()) & PID_MASK;
        QueueId((ms << (SEQ_BITS + PID_BITS)) | (seq << PID_BITS) | pid)
    }

    /// Milliseconds since the Unix epoch at which the id was made.
    pub fn created_at_millis(&self) -> u64 {
        self.0 >> (SEQ_BITS + PID_BITS)
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl fmt::Debug for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QueueId({self})")
    }
}

impl FromStr for QueueId {
    type Err = ParseQueueIdError;

    fn from_str(s: &str) -> Result<QueueId, ParseQueueIdError> {
        let valid = s.len() == QueueId::LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
        let parsed = if valid {
            u64::from_str_radix(s, 16).ok()
        } else {
            None
        };
        parsed.map(QueueId).ok_or_else(|| ParseQueueIdError {
            input: s.chars().take(40).collect(),
        })
    }
}

impl Serialize for QueueId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for QueueId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<QueueId, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------
// Envelope
// ---------------------------------------------------------------------------------

/// `RET=` of MAIL FROM (RFC 3461 §4.3): how much of the message a DSN returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    /// `RET=FULL`: the whole message.
    Full,
    /// `RET=HDRS`: the headers only.
    Hdrs,
}

/// `NOTIFY=` of RCPT TO (RFC 3461 §4.1): which DSNs the sender wants.
///
/// All three flags false means `NOTIFY=NEVER`. [`Notify::default()`] is what applies
/// when the client sent no NOTIFY: FAILURE and DELAY, with `explicit == false`, so that
/// the relay never adds a NOTIFY parameter that did not arrive (R99).
///
/// ```
/// use stsrelay::queue::spool::Notify;
///
/// let n = Notify::parse("success,FAILURE").unwrap();
/// assert!(n.success && n.failure && !n.delay);
/// assert_eq!(n.to_param().as_deref(), Some("SUCCESS,FAILURE"));
/// assert!(Notify::parse("NEVER").unwrap().is_never());
/// assert!(Notify::parse("NEVER,SUCCESS").is_none());
/// assert_eq!(Notify::default().to_param(), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Notify {
    /// Send a DSN on successful delivery (or relay to a non-DSN hop).
    pub success: bool,
    /// Send a DSN on failure.
    pub failure: bool,
    /// Send a DSN when delivery is delayed.
    pub delay: bool,
    /// Whether the client sent a NOTIFY parameter; `false` means the flags are the
    /// default and the parameter is not relayed.
    pub explicit: bool,
}

impl Default for Notify {
    fn default() -> Notify {
        Notify {
            success: false,
            failure: true,
            delay: true,
            explicit: false,
        }
    }
}

impl Notify {
    /// `NOTIFY=NEVER`.
    pub const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
        explicit: true,
    };

    /// Parse the value of an ESMTP `NOTIFY=` parameter (case-insensitive): `NEVER`, or
    /// a comma-separated list of `SUCCESS`, `FAILURE` and `DELAY`. `None` if invalid.
    pub fn parse(value: &str) -> Option<Notify> {
        if value.eq_ignore_ascii_case("NEVER") {
            return Some(Notify::NEVER);
        }
        let mut n = Notify {
            explicit: true,
            ..Notify::NEVER
        };
        for word in value.split(',') {
            if word.eq_ignore_ascii_case("SUCCESS") {
                n.success = true;
            } else if word.eq_ignore_ascii_case("FAILURE") {
                n.failure = true;
            } else if word.eq_ignore_ascii_case("DELAY") {
                n.delay = true;
            } else {
                return None;
            }
        }
        Some(n)
    }

    /// True for `NOTIFY=NEVER`: no DSN at all.
    pub fn is_never(&self) -> bool {
        !self.success && !self.failure && !self.delay
    }

    /// The parameter value to relay to a DSN-capable next hop, or `None` when the
    /// client sent no NOTIFY.
    pub fn to_param(&self) -> Option<String> {
        if !self.explicit {
            return None;
        }
        if self.is_never() {
            return Some("NEVER".into());
        }
        let words: Vec<&str> = [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ]
        .into_iter()
        .filter_map(|(on, w)| on.then_some(w))
        .collect();
        Some(words.join(","))
    }
}

/// One `RCPT TO` as received.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientSpec {
    /// The forward path without angle brackets, exactly as received (case preserved).
    pub address: String,
    /// DSN notification request.
    #[serde(default)]
    pub notify: Notify,
    /// `ORCPT=` value (`addr-type;xtext`), if supplied.
    #[serde(default)]
    pub orcpt: Option<String>,
}

impl RecipientSpec {
    /// A recipient with default NOTIFY and no ORCPT.
    pub fn new(address: impl Into<String>) -> RecipientSpec {
        RecipientSpec {
            address: address.into(),
            ..RecipientSpec::default()
        }
    }
}

/// The SMTP envelope of a spooled message, stored as JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Envelope {
    /// The reverse path without angle brackets; `""` is the null reverse path `<>`.
    pub mail_from: String,
    /// The accepted recipients, in RCPT order; [`RecipientStatus::index`] points here.
    pub recipients: Vec<RecipientSpec>,
    /// `RET=` of MAIL FROM, if supplied.
    pub ret: Option<Ret>,
    /// `ENVID=` of MAIL FROM, if supplied (kept verbatim, R95).
    pub envid: Option<String>,
    /// The client used `SMTPUTF8`.
    pub smtputf8: bool,
    /// The client declared `BODY=8BITMIME`.
    pub eight_bit: bool,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// The client's HELO/EHLO name.
    pub helo: Option<String>,
    /// When the message was received, in Unix seconds.
    pub received_at: i64,
    /// The message says `TLS-Required: No` (RFC 8689): TLS policies do not stop it.
    pub tls_optional: bool,
    /// A TLS-RPT report made by this relay: its sessions are not counted (R67).
    pub tlsrpt_exempt: bool,
}

/// The lower-cased part after the last `@`, or `""` if there is none.
fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.to_lowercase())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// Per-recipient state
// ---------------------------------------------------------------------------------

/// Delivery state of one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptState {
    /// Not yet attempted.
    Queued,
    /// Attempted, failed temporarily; retried at `next_attempt`.
    Deferred,
    /// Delivered (final).
    Delivered,
    /// Failed permanently or given up (final); a DSN is due per R92.
    Bounced,
}

impl RcptState {
    /// The lower-case name stored in the database.
    pub fn as_str(&self) -> &'static str {
        match self {
            RcptState::Queued => "queued",
            RcptState::Deferred => "deferred",
            RcptState::Delivered => "delivered",
            RcptState::Bounced => "bounced",
        }
    }

    /// `Delivered` or `Bounced`: nothing more will happen to this recipient.
    pub fn is_final(&self) -> bool {
        matches!(self, RcptState::Delivered | RcptState::Bounced)
    }

    fn from_db(s: &str) -> Option<RcptState> {
        Some(match s {
            "queued" => RcptState::Queued,
            "deferred" => RcptState::Deferred,
            "delivered" => RcptState::Delivered,
            "bounced" => RcptState::Bounced,
            _ => return None,
        })
    }
}

impl fmt::Display for RcptState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of one delivery attempt for one recipient, for [`Spool::record_attempt`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the next hop.
    Delivered,
    /// Temporary failure; try again at `next_attempt` (Unix seconds).
    Deferred {
        /// Why, e.g. the MX reply or an MTA-STS failure.
        reason: String,
        /// When to retry, in Unix seconds.
        next_attempt: i64,
    },
    /// Permanent failure or give-up.
    Bounced {
        /// Why, e.g. the MX reply.
        reason: String,
    },
}

/// Status of one recipient of a spooled message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientStatus {
    /// Position in [`Envelope::recipients`]; pass it to [`Spool::record_attempt`].
    pub index: usize,
    /// The address as received.
    pub address: String,
    /// Lower-cased domain (part after the last `@`).
    pub domain: String,
    /// Delivery state.
    pub state: RcptState,
    /// Delivery attempts recorded so far.
    pub attempts: u32,
    /// Reason given with the last deferral or bounce.
    pub last_reason: Option<String>,
    /// Earliest time of the next attempt, in Unix seconds.
    pub next_attempt: i64,
}

impl RecipientStatus {
    /// Queued or deferred.
    pub fn is_pending(&self) -> bool {
        !self.state.is_final()
    }
}

/// A spooled message with its recipients' status. Serialises to JSON for
/// `stsrelay queue list --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageInfo {
    /// Queue id.
    pub id: QueueId,
    /// The envelope as received (reconstructed from the recipient rows if the stored
    /// JSON is damaged, in which case `corrupt` is set).
    pub envelope: Envelope,
    /// When it was received, in Unix seconds.
    pub received_at: i64,
    /// Size of the body file in bytes.
    pub body_size: u64,
    /// Per-recipient status, in RCPT order.
    pub recipients: Vec<RecipientStatus>,
    /// The body or metadata is damaged; the message is never delivered.
    pub corrupt: bool,
    /// Why it is corrupt.
    pub corrupt_reason: Option<String>,
}

impl MessageInfo {
    /// Recipients that are pending and due at `now`.
    pub fn due_recipients(&self, now: i64) -> impl Iterator<Item = &RecipientStatus> {
        self.recipients
            .iter()
            .filter(move |r| r.is_pending() && r.next_attempt <= now)
    }

    /// True when no recipient is queued or deferred.
    pub fn is_done(&self) -> bool {
        self.recipients.iter().all(|r| !r.is_pending())
    }
}

/// Totals for monitoring and `stsrelay queue status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Messages in the spool, corrupt ones included.
    pub messages: u64,
    /// Recipients in state `Queued` (of messages that are not corrupt).
    pub queued: u64,
    /// Recipients in state `Deferred` (of messages that are not corrupt).
    pub deferred: u64,
    /// Recipients in state `Delivered` whose message is still spooled.
    pub delivered: u64,
    /// Recipients in state `Bounced` whose message is still spooled.
    pub bounced: u64,
    /// Corrupt messages.
    pub corrupt: u64,
    /// `received_at` of the oldest message that still has a pending recipient.
    pub oldest_received_at: Option<i64>,
}

/// What recovery did when the spool was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// False when recovery was skipped because another [`Spool`] (in this or another
    /// process) had the directory open.
    pub performed: bool,
    /// Unacknowledged bodies deleted from `incoming/`.
    pub incoming_removed: usize,
    /// Bodies without metadata moved from `messages/` to `corrupt/`.
    pub orphans_moved: usize,
    /// Metadata rows newly marked corrupt (body missing, unreadable or wrong size).
    pub marked_corrupt: usize,
}

// ---------------------------------------------------------------------------------
// The spool
// ---------------------------------------------------------------------------------

/// Handle on an open spool. Cheap to clone; all clones share one SQLite connection
/// behind a mutex. All methods block (see the [module docs](self)).
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    incoming: PathBuf,
    messages: PathBuf,
    corrupt: PathBuf,
    db_path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    writes: super::group_commit::GroupCommit,
    recovery: Recovery,
    /// Holds the shared `flock` for as long as the spool is open.
    _lock: File,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

/// One row of `message`.
struct MessageRow {
    id: String,
    envelope: String,
    received_at: i64,
    body_size: i64,
    corrupt: bool,
    corrupt_reason: Option<String>,
}

const MESSAGE_COLUMNS: &str =
    "m.id, m.envelope, m.received_at, m.body_size, m.corrupt, m.corrupt_reason";

fn message_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        id: r.get(0)?,
        envelope: r.get(1)?,
        received_at: r.get(2)?,
        body_size: r.get(3)?,
        corrupt: r.get(4)?,
        corrupt_reason: r.get(5)?,
    })
}

impl Spool {
    /// Open the spool under `<data_dir>/spool`, creating directories and database as
    /// needed, and run recovery if no other [`Spool`] has it open (see module docs).
    ///
    /// Fails if a directory cannot be created (e.g. `data_dir` is a file), the database
    /// is not an SQLite file or fails `PRAGMA quick_check`, or its schema is newer.
    pub fn open(data_dir: &Path) -> Result<Spool, SpoolError> {
        let root = data_dir.join(SPOOL_DIR);
        let incoming = root.join(INCOMING_DIR);
        let messages = root.join(MESSAGES_DIR);
        let corrupt = root.join(CORRUPT_DIR);
        let db_path = root.join(DB_FILE);
        for dir in [&root, &incoming, &messages, &corrupt] {
            create_private_dir(dir)?;
        }

        let lock_path = root.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err("open lock file", &lock_path))?;
        let exclusive = match lock.try_lock() {
            Ok(()) => true,
            Err(fs::TryLockError::WouldBlock) => {
                // Someone else has the spool open (or is recovering it: wait for that).
                lock.lock_shared()
                    .map_err(io_err("take shared lock on", &lock_path))?;
                false
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(io_err("lock", &lock_path)(e));
            }
        };

        let mut conn = open_db(&db_path, exclusive)?;
        let mut recovery = Recovery::default();
        if exclusive {
            recovery = recover(&mut conn, &db_path, &incoming, &messages, &corrupt)?;
            // Downgrade so that other processes (the CLI) can open the spool too.
            lock.lock_shared()
                .map_err(io_err("take shared lock on", &lock_path))?;
        } else {
            tracing::debug!(spool = %root.display(), "spool open elsewhere; recovery skipped");
        }

        let conn = Arc::new(Mutex::new(conn));
        let writes = super::group_commit::GroupCommit::start(
            conn.clone(),
            db_path.clone(),
            messages.clone(),
        )
        .map_err(io_err("start the spool writer for", &db_path))?;
        Ok(Spool {
            inner: Arc::new(Inner {
                root,
                incoming,
                messages,
                corrupt,
                db_path,
                conn,
                writes,
                recovery,
                _lock: lock,
            }),
        })
    }

    /// The spool directory, `<data_dir>/spool`.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The metadata database, `<data_dir>/spool/queue.sqlite3`.
    pub fn db_path(&self) -> &Path {
        &self.inner.db_path
    }

    /// The directory where recovery puts orphan bodies, `<data_dir>/spool/corrupt`.
    pub fn corrupt_dir(&self) -> &Path {
        &self.inner.corrupt
    }

    /// What recovery did when this spool was opened.
    pub fn recovery(&self) -> Recovery {
        self.inner.recovery
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no half-done transaction behind
        // (rusqlite rolls back on drop), so the connection is still usable.
        self.inner
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Start receiving a message body: a new temporary file in `incoming/`.
    pub fn incoming(&self) -> Result<Incoming, SpoolError> {
        for _ in 0..MAX_ID_TRIES {
            let path = self
                .inner
                .incoming
                .join(format!("{}.tmp", QueueId::generate()));
            match create_new_private(&path) {
                Ok(file) => {
                    return Ok(Incoming {
                        spool: self.clone(),
                        file: Some(BufWriter::with_capacity(WRITE_BUFFER, file)),
                        path,
                        len: 0,
                        done: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create", &path)(e)),
            }
        }
        Err(SpoolError::IdExhausted)
    }

    /// The path of a message's body file, `messages/<id>` (it may not exist).
    pub fn body_path(&self, id: &QueueId) -> PathBuf {
        self.inner.messages.join(id.to_string())
    }

    /// Open a message's body for streaming. If the file is missing although the
    /// message is spooled, the message is marked corrupt.
    pub fn open_body(&self, id: &QueueId) -> Result<File, SpoolError> {
        let path = self.body_path(id);
        File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                let reason = format!("body file {} is missing", path.display());
                match self.mark_corrupt(id, &reason) {
                    Ok(true) => tracing::warn!(%id, %reason, "spooled message marked corrupt"),
                    Ok(false) => {}
                    Err(err) => tracing::warn!(%id, error = %err, "cannot mark message corrupt"),
                }
            }
            io_err("open body", &path)(e)
        })
    }

    /// Read a message's whole body (see [`Spool::open_body`]).
    pub fn read_body(&self, id: &QueueId) -> Result<Vec<u8>, SpoolError> {
        let mut file = self.open_body(id)?;
        let mut body = Vec::new();
        file.read_to_end(&mut body)
            .map_err(io_err("read body", &self.body_path(id)))?;
        Ok(body)
    }

    /// Every message with its recipients, corrupt ones included, oldest first.
    pub fn list(&self) -> Result<Vec<MessageInfo>, SpoolError> {
        let conn = self.conn();
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM message m ORDER BY m.received_at, m.id");
        let rows = query_messages(&conn, &self.inner.db_path, &sql, [])?;
        self.build_all(&conn, rows)
    }

    /// One message, or `None` if it is not spooled.
    pub fn get(&self, id: &QueueId) -> Result<Option<MessageInfo>, SpoolError> {
        let conn = self.conn();
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM message m WHERE m.id = ?1");
        let rows = query_messages(&conn, &self.inner.db_path, &sql, [id.to_string()])?;
        Ok(self.build_all(&conn, rows)?.into_iter().next())
    }

    /// Up to `limit` messages that are not corrupt and have a Queued or Deferred
    /// recipient with `next_attempt <= now`, oldest `received_at` first. Each comes
    /// with all its recipients; use [`MessageInfo::due_recipients`] to pick.
    pub fn due(&self, now: i64, limit: usize) -> Result<Vec<MessageInfo>, SpoolError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM message m
             WHERE m.corrupt = 0 AND EXISTS (
                 SELECT 1 FROM recipient r
                 WHERE r.message_id = m.id AND {PENDING} AND r.next_attempt <= ?1)
             ORDER BY m.received_at, m.id
             LIMIT ?2"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = query_messages(&conn, &self.inner.db_path, &sql, params![now, limit])?;
        let mut out = self.build_all(&conn, rows)?;
        // build_all may just have found damage the database did not know about.
        out.retain(|m| !m.corrupt);
        Ok(out)
    }

    /// Record one delivery attempt for recipient `recipient_index` of message `id`:
    /// sets its state, increments `attempts`, and stores the reason (cleared on
    /// delivery) and, for a deferral, `next_attempt`.
    ///
    /// Fails with [`SpoolError::AlreadyFinal`] if the recipient was already delivered
    /// or bounced, so a final state is never overwritten.
    pub fn record_attempt(
        &self,
        id: &QueueId,
        recipient_index: usize,
        outcome: Outcome,
    ) -> Result<(), SpoolError> {
        self.record_attempts(id, vec![(recipient_index, outcome)], false)
            .map(|_| ())
    }

    /// Record the outcomes of one delivery attempt for several recipients in one
    /// transaction (one fsync); with `remove_if_done`, the message is also removed in
    /// that transaction when no recipient is left pending. Returns whether it was
    /// removed. Errors as [`Spool::record_attempt`]; on error nothing is recorded.
    pub fn record_attempts(
        &self,
        id: &QueueId,
        outcomes: Vec<(usize, Outcome)>,
        remove_if_done: bool,
    ) -> Result<bool, SpoolError> {
        let removed_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, path, id_owned) = (removed_flag.clone(), self.inner.db_path.clone(), *id);
        let work: super::group_commit::Work = Box::new(move |tx| {
            let (path, id) = (&path, &id_owned);
            for (recipient_index, outcome) in outcomes {
                let (state, reason, next) = match outcome {
                    Outcome::Delivered => (RcptState::Delivered, None, None),
                    Outcome::Deferred {
                        reason,
                        next_attempt,
                    } => (RcptState::Deferred, Some(reason), Some(next_attempt)),
                    Outcome::Bounced { reason } => (RcptState::Bounced, Some(reason), None),
                };
                let idx = i64::try_from(recipient_index).unwrap_or(i64::MAX);
                let changed = tx
                    .execute(
                        "UPDATE recipient
                         SET state = ?1, attempts = MIN(attempts + 1, 4294967295),
                             last_reason = ?2, next_attempt = COALESCE(?3, next_attempt)
                         WHERE message_id = ?4 AND idx = ?5 AND state IN ('queued', 'deferred')",
                        params![state.as_str(), reason, next, id.to_string(), idx],
                    )
                    .map_err(db_err("update recipient", path))?;
                if changed == 0 {
                    let current: Option<String> = tx
                        .query_row(
                            "SELECT state FROM recipient WHERE message_id = ?1 AND idx = ?2",
                            params![id.to_string(), idx],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(db_err("read recipient", path))?;
                    return Err(match current {
                        Some(s) => SpoolError::AlreadyFinal {
                            id: *id,
                            index: recipient_index,
                            state: RcptState::from_db(&s).unwrap_or(RcptState::Bounced),
                        },
                        None if message_exists(tx, path, id)? => SpoolError::NoSuchRecipient {
                            id: *id,
                            index: recipient_index,
                        },
                        None => SpoolError::NotFound(*id),
                    });
                }
            }
            if remove_if_done {
                let pending: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM recipient WHERE message_id = ?1 AND state IN ('queued', 'deferred')",
                        [id.to_string()],
                        |r| r.get(0),
                    )
                    .map_err(db_err("count pending", path))?;
                if pending == 0 {
                    tx.execute(
                        "DELETE FROM recipient WHERE message_id = ?1",
                        [id.to_string()],
                    )
                    .map_err(db_err("remove delivered message", path))?;
                    tx.execute("DELETE FROM message WHERE id = ?1", [id.to_string()])
                        .map_err(db_err("remove delivered message", path))?;
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Ok(())
        });
        self.inner.writes.run(false, work)?;
        let removed = removed_flag.load(std::sync::atomic::Ordering::Relaxed);
        if removed {
            self.remove_body(id);
        }
        Ok(removed)
    }

    /// Make every Queued or Deferred recipient of every non-corrupt message due now
    /// (`next_attempt = now`). Returns how many recipients were changed.
    pub fn flush_all(&self, now: i64) -> Result<usize, SpoolError> {
        self.conn()
            .execute(
                &format!(
                    "UPDATE recipient AS r SET next_attempt = ?1
                     WHERE {PENDING} AND r.message_id IN
                         (SELECT id FROM message WHERE corrupt = 0)"
                ),
                [now],
            )
            .map_err(db_err("flush queue", &self.inner.db_path))
    }

    /// Like [`Spool::flush_all`] for one message. Returns how many recipients changed.
    pub fn flush(&self, id: &QueueId, now: i64) -> Result<usize, SpoolError> {
        self.conn()
            .execute(
                &format!(
                    "UPDATE recipient AS r SET next_attempt = ?1
                     WHERE {PENDING} AND r.message_id = ?2 AND r.message_id IN
                         (SELECT id FROM message WHERE corrupt = 0)"
                ),
                params![now, id.to_string()],
            )
            .map_err(db_err("flush message", &self.inner.db_path))
    }

    /// Mark a message corrupt so it is never delivered. Returns false if it is not
    /// spooled or was already corrupt.
    pub fn mark_corrupt(&self, id: &QueueId, reason: &str) -> Result<bool, SpoolError> {
        let n = self
            .conn()
            .execute(
                "UPDATE message SET corrupt = 1, corrupt_reason = ?2
                 WHERE id = ?1 AND corrupt = 0",
                params![id.to_string(), reason],
            )
            .map_err(db_err("mark message corrupt", &self.inner.db_path))?;
        Ok(n > 0)
    }

    /// Remove a message (metadata first, then the body). Returns false if it was not
    /// spooled. If the body cannot be removed the message is still gone from the
    /// queue; the leftover file is logged and moved to `corrupt/` at the next recovery.
    pub fn delete(&self, id: &QueueId) -> Result<bool, SpoolError> {
        self.delete_where(id, "", "delete message")
    }

    /// Remove a message if none of its recipients is Queued or Deferred (all are
    /// delivered or bounced, DSNs having been queued by the caller). Returns whether
    /// it was removed.
    pub fn remove_if_done(&self, id: &QueueId) -> Result<bool, SpoolError> {
        let cond = format!(
            "AND NOT EXISTS (SELECT 1 FROM recipient r WHERE r.message_id = ?1 AND {PENDING})"
        );
        self.delete_where(id, &cond, "remove finished message")
    }

    fn delete_where(&self, id: &QueueId, cond: &str, op: &'static str) -> Result<bool, SpoolError> {
        let path = &self.inner.db_path;
        {
            let mut conn = self.conn();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err("begin transaction", path))?;
            let found: i64 = tx
                .query_row(
                    &format!("SELECT COUNT(*) FROM message WHERE id = ?1 {cond}"),
                    [id.to_string()],
                    |r| r.get(0),
                )
                .map_err(db_err(op, path))?;
            if found == 0 {
                return Ok(false);
            }
            // Recipients first: they reference the message (foreign key).
            tx.execute(
                "DELETE FROM recipient WHERE message_id = ?1",
                [id.to_string()],
            )
            .map_err(db_err(op, path))?;
            tx.execute("DELETE FROM message WHERE id = ?1", [id.to_string()])
                .map_err(db_err(op, path))?;
            tx.commit().map_err(db_err(op, path))?;
        }
        self.remove_body(id);
        Ok(true)
    }

    /// Unlink a removed message's body (its metadata is already gone; a body left
    /// behind by a crash is set aside as an orphan at the next start).
    fn remove_body(&self, id: &QueueId) {
        let body = self.body_path(id);
        // No directory fsync: if a power loss undoes the unlink, the body comes back
        // without metadata and recovery sets it aside; no message can reappear.
        match fs::remove_file(&body) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(%id, path = %body.display(), error = %e, "cannot remove body of deleted message");
            }
        }
    }

    /// Queue totals; see [`QueueCounts`].
    pub fn counts(&self) -> Result<QueueCounts, SpoolError> {
        let path = &self.inner.db_path;
        let mut conn = self.conn();
        // One read transaction, so the numbers are consistent with each other.
        let tx = conn
            .transaction()
            .map_err(db_err("begin transaction", path))?;
        let mut counts = QueueCounts::default();
        {
            let mut stmt = tx
                .prepare(
                    "SELECT r.state, COUNT(*) FROM recipient r JOIN message m ON m.id = r.message_id
                     WHERE m.corrupt = 0 GROUP BY r.state",
                )
                .map_err(db_err("count recipients", path))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db_err("count recipients", path))?;
            for row in rows {
                let (state, n) = row.map_err(db_err("count recipients", path))?;
                let n = u64::try_from(n).unwrap_or(0);
                match RcptState::from_db(&state) {
                    Some(RcptState::Queued) => counts.queued = n,
                    Some(RcptState::Deferred) => counts.deferred = n,
                    Some(RcptState::Delivered) => counts.delivered = n,
                    Some(RcptState::Bounced) => counts.bounced = n,
                    None => {}
                }
            }
        }
        let (messages, corrupt): (i64, Option<i64>) = tx
            .query_row("SELECT COUNT(*), SUM(corrupt != 0) FROM message", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(db_err("count messages", path))?;
        counts.messages = u64::try_from(messages).unwrap_or(0);
        counts.corrupt = u64::try_from(corrupt.unwrap_or(0)).unwrap_or(0);
        counts.oldest_received_at = tx
            .query_row(
                &format!(
                    "SELECT MIN(m.received_at) FROM message m WHERE m.corrupt = 0 AND EXISTS
                     (SELECT 1 FROM recipient r WHERE r.message_id = m.id AND {PENDING})"
                ),
                [],
                |r| r.get(0),
            )
            .map_err(db_err("find oldest message", path))?;
        tx.finish().map_err(db_err("end transaction", path))?;
        Ok(counts)
    }

    /// Turn rows into [`MessageInfo`]s, flagging (and persisting) damage.
    fn build_all(
        &self,
        conn: &Connection,
        rows: Vec<MessageRow>,
    ) -> Result<Vec<MessageInfo>, SpoolError> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let Ok(id) = row.id.parse::<QueueId>() else {
                tracing::warn!(id = %row.id, "spool row with an invalid id ignored");
                continue;
            };
            let info = build_info(conn, &self.inner.db_path, id, row)?;
            out.push(info);
        }
        Ok(out)
    }
}

fn message_exists(conn: &Connection, path: &Path, id: &QueueId) -> Result<bool, SpoolError> {
    conn.query_row(
        "SELECT 1 FROM message WHERE id = ?1",
        [id.to_string()],
        |_| Ok(()),
    )
    .optional()
    .map(|r| r.is_some())
    .map_err(db_err("look up message", path))
}

fn query_messages(
    conn: &Connection,
    path: &Path,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<MessageRow>, SpoolError> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(db_err("query messages", path))?;
    let rows = stmt
        .query_map(params, message_row)
        .map_err(db_err("query messages", path))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(db_err("read messages", path))
}

fn build_info(
    conn: &Connection,
    path: &Path,
    id: QueueId,
    row: MessageRow,
) -> Result<MessageInfo, SpoolError> {
    let mut problems: Vec<String> = Vec::new();
    let mut recipients = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT idx, address, domain, state, attempts, last_reason, next_attempt
                 FROM recipient WHERE message_id = ?1 ORDER BY idx",
            )
            .map_err(db_err("query recipients", path))?;
        let rows = stmt
            .query_map([&row.id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })
            .map_err(db_err("query recipients", path))?;
        for r in rows {
            let (idx, address, domain, state, attempts, last_reason, next_attempt) =
                r.map_err(db_err("read recipients", path))?;
            let state = RcptState::from_db(&state).unwrap_or_else(|| {
                problems.push(format!("recipient #{idx} has unknown state {state:?}"));
                RcptState::Queued
            });
            let index = usize::try_from(idx).unwrap_or_else(|_| {
                problems.push(format!("recipient index {idx} is invalid"));
                0
            });
            if index != recipients.len() {
                problems.push(format!("recipient #{idx} is out of sequence"));
            }
            recipients.push(RecipientStatus {
                index,
                address,
                domain,
                state,
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                last_reason,
                next_attempt,
            });
        }
    }
    if recipients.is_empty() {
        problems.push("message has no recipient rows".into());
    }
    let envelope = match serde_json::from_str::<Envelope>(&row.envelope) {
        Ok(env) => {
            if env.recipients.len() != recipients.len() {
                problems.push(format!(
                    "envelope has {} recipients but {} recipient rows exist",
                    env.recipients.len(),
                    recipients.len()
                ));
            }
            env
        }
        Err(e) => {
            problems.push(format!("stored envelope does not parse: {e}"));
            Envelope {
                recipients: recipients
                    .iter()
                    .map(|r| RecipientSpec::new(r.address.clone()))
                    .collect(),
                received_at: row.received_at,
                ..Envelope::default()
            }
        }
    };
    let mut corrupt = row.corrupt;
    let mut corrupt_reason = row.corrupt_reason;
    if !corrupt && !problems.is_empty() {
        let reason = problems.join("; ");
        tracing::warn!(%id, %reason, "spooled message metadata is damaged; marking it corrupt");
        if let Err(e) = conn.execute(
            "UPDATE message SET corrupt = 1, corrupt_reason = ?2 WHERE id = ?1",
            params![row.id, reason],
        ) {
            tracing::warn!(%id, error = %e, "cannot mark message corrupt");
        }
        corrupt = true;
        corrupt_reason = Some(reason);
    }
    Ok(MessageInfo {
        id,
        envelope,
        received_at: row.received_at,
        body_size: u64::try_from(row.body_size).unwrap_or(0),
        recipients,
        corrupt,
        corrupt_reason,
    })
}

// ---------------------------------------------------------------------------------
// Incoming
// ---------------------------------------------------------------------------------

/// A message body being received into `incoming/`. Dropping it without
/// [`Incoming::commit`] deletes the temporary file.
///
/// Methods block (buffered writes, fsync); from async code run them in
/// [`tokio::task::spawn_blocking`] — see the [module docs](self).
pub struct Incoming {
    spool: Spool,
    path: PathBuf,
    /// `None` after a failed write.
    file: Option<BufWriter<File>>,
    len: u64,
    /// Committed: the temporary name is no longer ours to delete.
    done: bool,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// Append `data` to the body. After an error the message is unusable: further
    /// calls and `commit` fail with [`SpoolError::Abandoned`]; drop it and answer 4xx.
    pub fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        let Some(w) = self.file.as_mut() else {
            return Err(SpoolError::Abandoned {
                path: self.path.clone(),
            });
        };
        if let Err(e) = w.write_all(data) {
            self.file = None;
            return Err(io_err("write", &self.path)(e));
        }
        self.len += data.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The temporary file in `incoming/`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Make the message durable and queue it for every recipient of `envelope`.
    ///
    /// Order: fsync the body, move it to `messages/<id>` (never replacing a file),
    /// fsync `messages/`, insert the metadata in one transaction. Only after `Ok` may
    /// the server answer `250`. On `Err` nothing is queued and no file is left behind.
    pub fn commit(mut self, envelope: &Envelope) -> Result<QueueId, SpoolError> {
        if envelope.recipients.is_empty() {
            return Err(SpoolError::InvalidEnvelope("no recipients".into()));
        }
        let json = serde_json::to_string(envelope).map_err(SpoolError::Encode)?;
        let Some(writer) = self.file.take() else {
            return Err(SpoolError::Abandoned {
                path: self.path.clone(),
            });
        };
        let file = writer
            .into_inner()
            .map_err(|e| io_err("write", &self.path)(e.into_error()))?;
        file.sync_all().map_err(io_err("fsync", &self.path))?;
        drop(file);

        let spool = self.spool.clone();
        let inner = &spool.inner;
        for _ in 0..MAX_ID_TRIES {
            let id = QueueId::generate();
            {
                let conn = spool.conn();
                if message_exists(&conn, &inner.db_path, &id)? {
                    continue;
                }
            }
            let dest = spool.body_path(&id);
            let placed = match place_body(&self.path, &dest) {
                Ok(p) => p,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("move body to", &dest)(e)),
            };
            // The directory fsync and the metadata insert are shared with every
            // message committed at the same moment (group commit).
            let (path, env, json, size) = (
                inner.db_path.clone(),
                envelope.clone(),
                json.clone(),
                self.len,
            );
            let work: super::group_commit::Work =
                Box::new(move |c| insert_rows(c, &path, &id, &env, &json, size));
            if let Err(e) = inner.writes.run(true, work) {
                discard(&dest);
                return Err(e);
            }
            self.done = true;
            if placed == Placed::Linked
                && let Err(e) = fs::remove_file(&self.path)
            {
                // Harmless: recovery deletes incoming/ leftovers.
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove spooled temp file");
            }
            tracing::debug!(%id, size = self.len, rcpts = envelope.recipients.len(), "message spooled");
            return Ok(id);
        }
        Err(SpoolError::IdExhausted)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.file = None;
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove abandoned incoming message");
            }
        }
    }
}

/// Insert a message and its recipients (inside the group commit's transaction).
fn insert_rows(
    tx: &Connection,
    path: &Path,
    id: &QueueId,
    envelope: &Envelope,
    json: &str,
    size: u64,
) -> Result<(), SpoolError> {
    let id = id.to_string();
    tx.execute(
        "INSERT INTO message (id, envelope, received_at, body_size, corrupt)
         VALUES (?1, ?2, ?3, ?4, 0)",
        params![
            id,
            json,
            envelope.received_at,
            i64::try_from(size).unwrap_or(i64::MAX)
        ],
    )
    .map_err(db_err("insert message", path))?;
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO recipient (message_id, idx, address, domain, state, attempts, next_attempt)
                 VALUES (?1, ?2, ?3, ?4, 'queued', 0, ?5)",
            )
            .map_err(db_err("insert recipient", path))?;
        for (idx, rcpt) in envelope.recipients.iter().enumerate() {
            stmt.execute(params![
                id,
                i64::try_from(idx).unwrap_or(i64::MAX),
                rcpt.address,
                domain_of(&rcpt.address),
                envelope.received_at
            ])
            .map_err(db_err("insert recipient", path))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// File helpers
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Placed {
    /// Hard-linked: the temporary name still exists.
    Linked,
    /// Renamed: the temporary name is gone.
    Renamed,
}

/// Give `src` the name `dest`, failing with `AlreadyExists` instead of replacing a
/// file. A hard link is atomic and never replaces; where the file system has no hard
/// links, fall back to check-then-rename.
fn place_body(src: &Path, dest: &Path) -> io::Result<Placed> {
    match fs::hard_link(src, dest) {
        Ok(()) => Ok(Placed::Linked),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied
            ) =>
        {
            if fs::symlink_metadata(dest).is_ok() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            fs::rename(src, dest)?;
            Ok(Placed::Renamed)
        }
        Err(e) => Err(e),
    }
}

/// Best-effort removal of a body that will not be acknowledged.
fn discard(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove unacknowledged body; recovery will move it to corrupt/");
    }
}

fn create_private_dir(dir: &Path) -> Result<(), SpoolError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err("create directory", dir))
}

fn create_new_private(path: &Path) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// fsync a directory so that names created in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Database and recovery
// ---------------------------------------------------------------------------------

fn open_db(path: &Path, check: bool) -> Result<Connection, SpoolError> {
    let mut conn = Connection::open(path).map_err(db_err("open", path))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(db_err("set busy_timeout", path))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(db_err("enable WAL", path))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(db = %path.display(), %mode, "spool database is not in WAL mode");
    }
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
        .map_err(db_err("set synchronous=FULL", path))?;
    if check {
        let mut stmt = conn
            .prepare("PRAGMA quick_check")
            .map_err(db_err("check integrity", path))?;
        let report = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db_err("check integrity", path))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_err("check integrity", path))?;
        if report != ["ok"] {
            return Err(SpoolError::DbCorrupt {
                path: path.to_path_buf(),
                detail: report.join("; "),
            });
        }
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err("begin transaction", path))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_err("read schema version", path))?;
    if version > SCHEMA_VERSION {
        return Err(SpoolError::SchemaVersion {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version < SCHEMA_VERSION {
        tx.execute_batch(SCHEMA)
            .map_err(db_err("create schema", path))?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(db_err("set schema version", path))?;
    }
    tx.commit().map_err(db_err("create schema", path))?;
    Ok(conn)
}

/// Bring files and metadata back in line after a crash. Only called with the
/// exclusive lock held, so no other `Spool` is writing.
fn recover(
    conn: &mut Connection,
    db_path: &Path,
    incoming: &Path,
    messages: &Path,
    corrupt: &Path,
) -> Result<Recovery, SpoolError> {
    let mut rec = Recovery {
        performed: true,
        ..Recovery::default()
    };

    // 1. Bodies that were never acknowledged.
    for entry in fs::read_dir(incoming).map_err(io_err("list", incoming))? {
        let entry = entry.map_err(io_err("list", incoming))?;
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => rec.incoming_removed += 1,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover incoming file")
            }
        }
    }
    if rec.incoming_removed > 0 {
        tracing::info!(
            count = rec.incoming_removed,
            "removed unacknowledged incoming message files"
        );
    }

    // 2. Metadata whose body is missing, unreadable or of the wrong size.
    let rows: Vec<(String, i64)> = {
        let mut stmt = conn
            .prepare("SELECT id, body_size FROM message WHERE corrupt = 0")
            .map_err(db_err("list messages", db_path))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db_err("list messages", db_path))?
            .collect::<Result<_, _>>()
            .map_err(db_err("list messages", db_path))?
    };
    let mut damaged = Vec::new();
    for (raw_id, size) in &rows {
        let problem = match raw_id.parse::<QueueId>() {
            Err(_) => Some(format!("invalid queue id {raw_id:?}")),
            Ok(id) => check_body(&messages.join(id.to_string()), *size),
        };
        if let Some(reason) = problem {
            tracing::warn!(id = %raw_id, %reason, "spooled message is corrupt; it will not be delivered");
            damaged.push((raw_id.clone(), reason));
        }
    }
    if !damaged.is_empty() {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err("begin transaction", db_path))?;
        for (raw_id, reason) in &damaged {
            tx.execute(
                "UPDATE message SET corrupt = 1, corrupt_reason = ?2 WHERE id = ?1",
                params![raw_id, reason],
            )
            .map_err(db_err("mark message corrupt", db_path))?;
        }
        tx.commit()
            .map_err(db_err("mark message corrupt", db_path))?;
        rec.marked_corrupt = damaged.len();
    }

    // 3. Bodies without metadata: committed to messages/ but never acknowledged.
    let known: HashSet<String> = {
        let mut stmt = conn
            .prepare("SELECT id FROM message")
            .map_err(db_err("list messages", db_path))?;
        stmt.query_map([], |r| r.get(0))
            .map_err(db_err("list messages", db_path))?
            .collect::<Result<_, _>>()
            .map_err(db_err("list messages", db_path))?
    };
    for entry in fs::read_dir(messages).map_err(io_err("list", messages))? {
        let entry = entry.map_err(io_err("list", messages))?;
        let name = entry.file_name();
        let known_id = name
            .to_str()
            .filter(|n| n.parse::<QueueId>().is_ok() && known.contains(*n));
        if known_id.is_some() {
            continue;
        }
        let src = entry.path();
        let dest = free_name(corrupt, &name);
        match fs::rename(&src, &dest) {
            Ok(()) => {
                rec.orphans_moved += 1;
                tracing::warn!(from = %src.display(), to = %dest.display(),
                    "spool body without metadata (never acknowledged) moved aside");
            }
            Err(e) => {
                tracing::warn!(path = %src.display(), error = %e, "cannot move orphan spool body")
            }
        }
    }
    for dir in [incoming, messages, corrupt] {
        if let Err(e) = sync_dir(dir) {
            tracing::debug!(dir = %dir.display(), error = %e, "fsync after recovery failed");
        }
    }
    Ok(rec)
}

/// `None` if the body looks intact, else why not.
fn check_body(path: &Path, expected: i64) -> Option<String> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Some("body file is missing".into());
        }
        Err(e) => return Some(format!("body file is unreadable: {e}")),
    };
    if !meta.is_file() {
        return Some("body is not a regular file".into());
    }
    if i64::try_from(meta.len()).ok() != Some(expected) {
        return Some(format!(
            "body file has {} bytes, {expected} were spooled",
            meta.len()
        ));
    }
    if let Err(e) = File::open(path) {
        return Some(format!("body file is unreadable: {e}"));
    }
    None
}

/// `dir/name`, or `dir/name.N` for the first N that does not exist yet.
fn free_name(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    let first = dir.join(name);
    if fs::symlink_metadata(&first).is_err() {
        return first;
    }
    (1u32..)
        .map(|n| {
            let mut s = name.to_os_string();
            s.push(format!(".{n}"));
            dir.join(s)
        })
        .find(|p| fs::symlink_metadata(p).is_err())
        .unwrap_or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_increasing_and_parse_back() {
        let ids: Vec<QueueId> = (0..10_000).map(|_| QueueId::generate()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
            assert!(pair[0].to_string() < pair[1].to_string());
        }
        for id in &ids {
            let s = id.to_string();
            assert_eq!(s.len(), QueueId::LEN);
            assert_eq!(s.parse::<QueueId>().unwrap(), *id);
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let created = ids[0].created_at_millis();
        assert!(created <= now_ms + 1 && now_ms - created < 60_000);
    }

    #[test]
    fn id_parse_rejects_unsafe_or_malformed_input() {
        for bad in [
            "",
            "../x",
            "0123456789abcdef",
            "0123456789ABCDE",
            "0123456789ABCDEF0",
            "+123456789ABCDEF",
            "0123456789ABCDE/",
            "0123456789ABCDEG",
            "０123456789ABCDE",
        ] {
            assert!(bad.parse::<QueueId>().is_err(), "{bad:?} accepted");
        }
        assert!("FFFFFFFFFFFFFFFF".parse::<QueueId>().is_ok());
    }

    #[test]
    fn domain_is_lowercased_part_after_last_at() {
        assert_eq!(domain_of("User@Example.COM"), "example.com");
        assert_eq!(domain_of("\"a@b\"@Mx.Test"), "mx.test");
        assert_eq!(domain_of("postmaster"), "");
    }

    #[test]
    fn notify_parse_and_param() {
        assert_eq!(Notify::parse("never"), Some(Notify::NEVER));
        assert_eq!(Notify::parse("DELAY").unwrap().to_param().unwrap(), "DELAY");
        assert!(Notify::parse("").is_none());
        assert!(Notify::parse("FAILURE,,DELAY").is_none());
        assert!(Notify::parse("SOMETIMES").is_none());
        let d = Notify::default();
        assert!(d.failure && d.delay && !d.success && !d.explicit);
        // Old JSON without the field deserialises to the default.
        let r: RecipientSpec = serde_json::from_str(r#"{"address":"a@b"}"#).unwrap();
        assert_eq!(r.notify, Notify::default());
    }

    #[test]
    fn queue_id_serde_is_a_string() {
        let id: QueueId = "00000000000000AB".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"00000000000000AB\"");
        assert_eq!(serde_json::from_str::<QueueId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<QueueId>("\"../../etc\"").is_err());
    }
}
