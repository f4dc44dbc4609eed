//! What the relay did recently, for the status page: delivery outcomes and TLS session
//! results per policy mode, in hourly buckets over the last 24 hours.
//!
//! Prometheus counters answer "how many since start"; the status page answers "how did
//! the last day go" without a Prometheus server. Kept in memory: a restart starts the
//! window afresh (the page says since when it counts).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

/// Hours kept.
const HOURS: i64 = 24;

#[derive(Debug, Default)]
struct Bucket {
    hour: i64,
    deliveries: BTreeMap<(&'static str, &'static str), u64>,
    sessions: BTreeMap<(&'static str, &'static str), u64>,
}

/// Recent counts, keyed by (mode, outcome) and (mode, TLS result).
///
/// ```
/// use stsrelay::ops::activity::Activity;
/// let a = Activity::new(1_000_000);
/// a.delivery(1_000_010, "enforce", "delivered");
/// a.session(1_000_010, "enforce", "success");
/// a.delivery(1_000_000 + 30 * 3600, "none", "deferred");
/// let last = a.last_24h(1_000_000 + 30 * 3600);
/// assert_eq!(last.deliveries.get(&("enforce", "delivered")), None, "older than 24 h");
/// assert_eq!(last.deliveries[&("none", "deferred")], 1);
/// ```
#[derive(Debug)]
pub struct Activity {
    started: i64,
    buckets: Mutex<VecDeque<Bucket>>,
}

/// Counts of the last 24 hours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recent {
    /// Unix seconds from which the counts run (24 h ago, or the start if later).
    pub since: i64,
    /// Recipient outcomes by (mode, outcome).
    pub deliveries: BTreeMap<(&'static str, &'static str), u64>,
    /// MX sessions by (mode, TLS result).
    pub sessions: BTreeMap<(&'static str, &'static str), u64>,
}

impl Activity {
    /// An empty record, counting from `now` (Unix seconds).
    pub fn new(now: i64) -> Activity {
        Activity {
            started: now,
            buckets: Mutex::new(VecDeque::new()),
        }
    }

    fn with_bucket(&self, now: i64, f: impl FnOnce(&mut Bucket)) {
        let hour = now.div_euclid(3600);
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.back().is_none_or(|last| last.hour < hour) {
            b.push_back(Bucket {
                hour,
                ..Bucket::default()
            });
        }
        while b.front().is_some_and(|first| first.hour <= hour - HOURS) {
            b.pop_front();
        }
        // A clock step backwards lands in the newest bucket.
        if let Some(last) = b.back_mut() {
            f(last);
        }
    }

    /// One recipient's outcome (`delivered`, `deferred`, `bounced`) under `mode`.
    pub fn delivery(&self, now: i64, mode: &'static str, outcome: &'static str) {
        self.with_bucket(now, |b| {
            *b.deliveries.entry((mode, outcome)).or_default() += 1
        });
    }

    /// One MX session's TLS result (`success` or an RFC 8460 result type) under `mode`.
    pub fn session(&self, now: i64, mode: &'static str, result: &'static str) {
        self.with_bucket(now, |b| *b.sessions.entry((mode, result)).or_default() += 1);
    }

    /// Totals over the 24 hours before `now` (whole hours).
    pub fn last_24h(&self, now: i64) -> Recent {
        let hour = now.div_euclid(3600);
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Recent {
            since: self.started.max((hour - HOURS + 1) * 3600),
            ..Recent::default()
        };
        for bucket in b.iter().filter(|x| x.hour > hour - HOURS) {
            for (k, n) in &bucket.deliveries {
                *out.deliveries.entry(*k).or_default() += n;
            }
            for (k, n) in &bucket.sessions {
                *out.sessions.entry(*k).or_default() += n;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_slides_by_hour() {
        let t0 = 100 * 3600;
        let a = Activity::new(t0);
        a.delivery(t0, "enforce", "delivered");
        a.delivery(t0 + 10, "enforce", "delivered");
        a.session(t0 + 3600, "testing", "certificate-expired");
        let r = a.last_24h(t0 + 3600);
        assert_eq!(r.deliveries[&("enforce", "delivered")], 2);
        assert_eq!(r.sessions[&("testing", "certificate-expired")], 1);
        assert_eq!(r.since, t0);
        // 24 hours after the first bucket it has left the window; the second stays.
        let r = a.last_24h(t0 + 24 * 3600);
        assert!(r.deliveries.is_empty());
        assert_eq!(r.sessions.len(), 1);
        // Old buckets are dropped on the next write.
        a.delivery(t0 + 48 * 3600, "none", "bounced");
        assert_eq!(a.buckets.lock().unwrap().len(), 1);
    }
}
