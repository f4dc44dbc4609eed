//! Idle SMTP connections kept open for the next transaction to the same domain under
//! the same policy (ARCHITECTURE "Where the time goes": a verified session is reused
//! instead of paying for a new TCP and TLS handshake per message).

use crate::smtp::outbound::{Client, Reply, Stream};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// An idle connection is closed after this long (Postfix: 2 s by default; an MX
/// usually keeps a quiet session for minutes).
pub(super) const IDLE: Duration = Duration::from_secs(5);
/// Transactions per connection before it is closed.
pub(super) const MAX_USES: u32 = 100;
/// Idle connections kept per key.
const MAX_IDLE: usize = 32;

/// What a connection may be reused for: the domain and the exact policy it was
/// established under (id and fetch time), so a new policy never rides an old session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub(super) domain: String,
    pub(super) policy: Option<(String, i64)>,
    /// Made for a message with `TLS-Required: No` (no MTA-STS, no DANE): such a
    /// connection may be plain text or unverified, so only such messages reuse it.
    pub(super) relaxed: bool,
}

/// A connection waiting for its next transaction.
pub(super) struct Idle {
    pub(super) client: Client<Box<dyn Stream>>,
    pub(super) ehlo: Reply,
    pub(super) host: String,
    pub(super) ip: IpAddr,
    pub(super) tls: String,
    pub(super) uses: u32,
    since: Instant,
}

impl Idle {
    pub(super) fn new(
        client: Client<Box<dyn Stream>>,
        ehlo: Reply,
        host: &str,
        ip: IpAddr,
        tls: &str,
        uses: u32,
    ) -> Idle {
        Idle {
            client,
            ehlo,
            host: host.to_string(),
            ip,
            tls: tls.to_string(),
            uses,
            since: Instant::now(),
        }
    }
}

#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    reaper: std::sync::OnceLock<()>,
}

impl Pool {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used fresh connection for `key`, if any.
    pub(super) fn take(&self, key: &Key) -> Option<Idle> {
        let mut map = self.map();
        let list = map.get_mut(key)?;
        list.retain(|i| i.since.elapsed() < IDLE);
        let got = list.pop();
        if list.is_empty() {
            map.remove(key);
        }
        got
    }

    /// Keep `idle` for the next transaction (dropped, and so closed, when the pool is
    /// full or the connection has served `MAX_USES` transactions).
    pub(super) fn put(self: &Arc<Self>, key: Key, idle: Idle) {
        if idle.uses >= MAX_USES {
            return;
        }
        self.reaper.get_or_init(|| {
            let weak = Arc::downgrade(self);
            tokio::spawn(reap(weak));
        });
        let mut map = self.map();
        let list = map.entry(key).or_default();
        if list.len() < MAX_IDLE {
            list.push(idle);
        }
    }

    /// Idle connections now held.
    pub(super) fn len(&self) -> usize {
        self.map().values().map(Vec::len).sum()
    }
}

/// Close connections idle for longer than [`IDLE`], until the pool is gone.
async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(IDLE / 2).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut map = pool.map();
        map.retain(|_, list| {
            list.retain(|i| i.since.elapsed() < IDLE);
            !list.is_empty()
        });
    }
}
