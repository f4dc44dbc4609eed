//! The delivery scheduler: finds due recipients in the spool, groups them per message
//! and destination domain (one SMTP transaction each), delivers within the global and
//! per-domain concurrency limits, and files the outcome: delivered, deferred with the
//! next retry time, or bounced (with a DSN to the sender).

use super::bounce::{Failed, build_dsn};
use super::spool::{Envelope, MessageInfo, Outcome, QueueId, RecipientSpec, Ret, Spool};
use crate::clock::{Clock, SystemClock};
use crate::config::QueueConfig;
use crate::delivery::{Deliverer, Rcpt, RcptResult, Transaction};
use crate::sts::Source;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// Runs deliveries for a spool. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    spool: Spool,
    deliverer: Arc<Deliverer>,
    cfg: QueueConfig,
    hostname: String,
    wake: Notify,
    global: Arc<Semaphore>,
    per_domain: Mutex<HashMap<String, Arc<Semaphore>>>,
    in_flight: Mutex<HashSet<(QueueId, String)>>,
    stopping: AtomicBool,
}

/// Run blocking spool work off the async workers; failures are logged and `None`.
async fn spool_task<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, super::spool::SpoolError> + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "spool operation failed");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "spool task failed");
            None
        }
    }
}

impl Scheduler {
    /// A scheduler for `spool` using `deliverer`, with `[queue]` settings.
    pub fn new(
        spool: Spool,
        deliverer: Arc<Deliverer>,
        cfg: &QueueConfig,
        hostname: String,
    ) -> Scheduler {
        Scheduler {
            inner: Arc::new(Inner {
                spool,
                deliverer,
                global: Arc::new(Semaphore::new(cfg.max_concurrency)),
                cfg: cfg.clone(),
                hostname,
                wake: Notify::new(),
                per_domain: Mutex::new(HashMap::new()),
                in_flight: Mutex::new(HashSet::new()),
                stopping: AtomicBool::new(false),
            }),
        }
    }

    /// Look at the spool now (a message was queued or flushed).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Deliveries running now.
    pub fn in_flight(&self) -> usize {
        self.inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The deliverer.
    pub fn deliverer(&self) -> &Arc<Deliverer> {
        &self.inner.deliverer
    }

    /// Start no more deliveries (for shutdown): [`Scheduler::run`] returns, deliveries
    /// still waiting for a concurrency slot give up (their recipients stay due), and
    /// those already talking to an MX run to their end. Watch [`Scheduler::in_flight`].
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// Run until the task is aborted or [`Scheduler::stop`]: dispatch due work whenever
    /// woken, and at least every `poll` (so `stsrelay queue flush` from another process
    /// is seen).
    pub async fn run(self, poll: Duration) {
        while !self.stopping() {
            self.dispatch_due().await;
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// Start a delivery for every due (message, domain) group not already in flight.
    pub async fn dispatch_due(&self) -> usize {
        let now = SystemClock.now();
        let spool = self.inner.spool.clone();
        let Some(due) = spool_task(move || spool.due(now, 1000)).await else {
            return 0;
        };
        due.into_iter().map(|msg| self.start(msg, now)).sum()
    }

    /// Deliver a message just queued, without waiting for the next scan.
    pub async fn submit(&self, id: QueueId) {
        let spool = self.inner.spool.clone();
        if let Some(Some(msg)) = spool_task(move || spool.get(&id)).await {
            self.start(msg, SystemClock.now());
        }
    }

    /// Start one delivery per destination domain of `msg` with due recipients,
    /// unless that (message, domain) is already in flight.
    fn start(&self, msg: MessageInfo, now: i64) -> usize {
        if self.stopping() {
            return 0;
        }
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for r in msg.due_recipients(now) {
            groups.entry(r.domain.clone()).or_default().push(r.index);
        }
        let msg = Arc::new(msg);
        let mut started = 0;
        for (domain, indices) in groups {
            let key = (msg.id, domain.clone());
            if !self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone())
            {
                continue;
            }
            started += 1;
            let this = self.clone();
            let msg = msg.clone();
            tokio::spawn(async move {
                this.deliver_group(&msg, &domain, &indices).await;
                this.inner
                    .in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
            });
        }
        started
    }

    fn domain_semaphore(&self, domain: &str) -> Arc<Semaphore> {
        let mut map = self
            .inner
            .per_domain
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        map.entry(domain.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.inner.cfg.max_per_domain)))
            .clone()
    }

    async fn deliver_group(&self, msg: &MessageInfo, domain: &str, indices: &[usize]) {
        let Ok(_global) = self.inner.global.clone().acquire_owned().await else {
            return;
        };
        let Ok(_local) = self.domain_semaphore(domain).acquire_owned().await else {
            return;
        };
        if self.stopping() {
            return;
        }
        // The due list may be stale: another task can have finished this message
        // between the query and now. Re-read its state, so a delivered recipient is
        // never sent twice and a removed message is not touched.
        let (spool, id) = (self.inner.spool.clone(), msg.id);
        let Some(Some(current)) = spool_task(move || spool.get(&id)).await else {
            return;
        };
        let now = SystemClock.now();
        let indices: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| {
                current
                    .recipients
                    .get(i)
                    .is_some_and(|r| r.is_pending() && r.next_attempt <= now)
            })
            .collect();
        if indices.is_empty() || current.corrupt {
            return;
        }
        let msg = &current;
        let indices = &indices[..];
        let (spool, id) = (self.inner.spool.clone(), msg.id);
        let Some(body) = spool_task(move || spool.read_body(&id)).await else {
            return;
        };
        let env = &msg.envelope;
        let tx = Transaction {
            queue_id: msg.id.to_string(),
            mail_from: env.mail_from.clone(),
            recipients: indices
                .iter()
                .map(|&i| {
                    let spec = &env.recipients[i];
                    Rcpt {
                        address: spec.address.clone(),
                        notify: spec.notify.to_param(),
                        orcpt: spec.orcpt.as_deref().map(encode_orcpt),
                    }
                })
                .collect(),
            body: Arc::new(body),
            eight_bit: env.eight_bit,
            smtputf8: env.smtputf8,
            ret: env.ret.map(|r| match r {
                Ret::Full => "FULL".to_string(),
                Ret::Hdrs => "HDRS".to_string(),
            }),
            envid: env.envid.as_deref().map(crate::smtp::inbound::xtext_encode),
            tls_optional: env.tls_optional,
            tlsrpt_exempt: env.tlsrpt_exempt,
        };
        let attempt = self.inner.deliverer.attempt(domain, &tx).await;
        let now = SystemClock.now();
        // Whole seconds on both sides: `>` makes sure a full lifetime has passed.
        let expired = now - msg.received_at > self.inner.cfg.lifetime_secs as i64;
        let mut retry_now = false;
        if attempt.policy_blocked {
            // R50/R51: enforce failures are temporary; look for a new policy before the
            // next attempt, and before giving up.
            if let Ok(l) = self.inner.deliverer.engine().recheck(domain).await
                && l.source == Source::Fetched
            {
                retry_now = true;
            }
        }
        let mut outcomes = Vec::new();
        let mut failed = Vec::new();
        for (&i, result) in indices.iter().zip(&attempt.results) {
            let status = &msg.recipients[i];
            let outcome = match result {
                RcptResult::Delivered { reply } => {
                    tracing::info!(queue_id = %msg.id, rcpt = %status.address, %domain, mode = ?attempt.mode, %reply, "delivered");
                    self.count(attempt.mode, "delivered", now);
                    crate::ops::metrics::delivery_delay(attempt.mode, now - msg.received_at);
                    Outcome::Delivered
                }
                RcptResult::Bounced { reason } => {
                    tracing::warn!(queue_id = %msg.id, rcpt = %status.address, %domain, %reason, "bounced");
                    self.count(attempt.mode, "bounced", now);
                    failed.push((i, reason.clone()));
                    Outcome::Bounced {
                        reason: reason.clone(),
                    }
                }
                RcptResult::Deferred { reason } if expired && !retry_now => {
                    let reason = format!("queue lifetime expired; last error: {reason}");
                    tracing::warn!(queue_id = %msg.id, rcpt = %status.address, %domain, %reason, "bounced");
                    self.count(attempt.mode, "bounced", now);
                    failed.push((i, reason.clone()));
                    Outcome::Bounced { reason }
                }
                RcptResult::Deferred { reason } => {
                    let wait = if retry_now {
                        0
                    } else {
                        self.retry_after(status.attempts + 1)
                    };
                    tracing::info!(queue_id = %msg.id, rcpt = %status.address, %domain, mode = ?attempt.mode, %reason, retry_in_secs = wait, "deferred");
                    self.count(attempt.mode, "deferred", now);
                    Outcome::Deferred {
                        reason: reason.clone(),
                        next_attempt: now + wait as i64,
                    }
                }
            };
            outcomes.push((i, outcome));
        }
        let spool = self.inner.spool.clone();
        let id = msg.id;
        let dsn = self.dsn_for(msg, &failed, now);
        let (hostname, original) = (self.inner.hostname.clone(), msg.envelope.clone());
        let queued_dsn = spool_task(move || {
            let dsn_id = match dsn {
                // The common case: record and, when nothing is pending, remove the
                // message in one transaction.
                None => {
                    spool.record_attempts(&id, outcomes, true)?;
                    None
                }
                // A bounce needs the body: record, queue the DSN, then remove.
                Some((env, failed)) => {
                    spool.record_attempts(&id, outcomes, false)?;
                    let body = spool.read_body(&id)?;
                    let bytes = build_dsn(
                        &hostname,
                        &original,
                        &body,
                        &failed,
                        now,
                        &format!("{id}.{now}"),
                    );
                    let mut inc = spool.incoming()?;
                    inc.write(&bytes)?;
                    let dsn_id = inc.commit(&env)?;
                    spool.remove_if_done(&id)?;
                    Some(dsn_id)
                }
            };
            Ok(dsn_id)
        })
        .await
        .flatten();
        if let Some(dsn_id) = queued_dsn {
            tracing::info!(queue_id = %msg.id, dsn = %dsn_id, "bounce queued for the sender");
            let this = self.clone();
            tokio::spawn(async move { this.submit(dsn_id).await });
        }
    }

    /// One recipient outcome, for metrics and the status page.
    fn count(&self, mode: Option<crate::sts::Mode>, outcome: &'static str, now: i64) {
        crate::ops::metrics::delivery(outcome, mode);
        self.inner.deliverer.activity().delivery(
            now,
            crate::ops::metrics::mode_label(mode),
            outcome,
        );
    }

    /// Seconds to wait before attempt number `attempts + 1`.
    fn retry_after(&self, attempts: u32) -> u64 {
        let s = &self.inner.cfg.retry_secs;
        s[(attempts.saturating_sub(1) as usize).min(s.len() - 1)]
    }

    /// A DSN for the failed recipients that asked for one; never for the null sender
    /// (no bounce of a bounce).
    fn dsn_for(
        &self,
        msg: &MessageInfo,
        failed: &[(usize, String)],
        now: i64,
    ) -> Option<(Envelope, Vec<Failed>)> {
        let env = &msg.envelope;
        if env.mail_from.is_empty() {
            return None;
        }
        let failed: Vec<Failed> = failed
            .iter()
            .filter(|(i, _)| env.recipients[*i].notify.failure)
            .map(|(i, reason)| Failed {
                address: env.recipients[*i].address.clone(),
                orcpt: env.recipients[*i].orcpt.clone(),
                reason: reason.clone(),
            })
            .collect();
        if failed.is_empty() {
            return None;
        }
        let dsn_env = Envelope {
            mail_from: String::new(),
            recipients: vec![RecipientSpec::new(env.mail_from.clone())],
            received_at: now,
            eight_bit: env.eight_bit,
            smtputf8: env.smtputf8,
            ..Envelope::default()
        };
        Some((dsn_env, failed))
    }
}

/// `ORCPT=` as passed on: `addr-type;xtext` (RFC 3461 §4.2).
fn encode_orcpt(orcpt: &str) -> String {
    match orcpt.split_once(';') {
        Some((kind, addr)) => format!("{kind};{}", crate::smtp::inbound::xtext_encode(addr)),
        None => format!("rfc822;{}", crate::smtp::inbound::xtext_encode(orcpt)),
    }
}
