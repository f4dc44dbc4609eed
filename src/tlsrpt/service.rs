//! Making and delivering reports: for a day, every policy domain with counted sessions
//! that publishes a TLS-RPT record gets one report, entered in the ledger once per rua;
//! due ledger rows are then delivered — `mailto:` as a DKIM-signed e-mail through the
//! relay's own spool, `https:` as a POST — and retried until `tlsrpt.give_up_secs`.
//!
//! The relay runs [`ReportService::run`]; `stsrelay report send` in another process
//! calls [`ReportService::generate`] and [`ReportService::deliver_due`] once, and the
//! relay picks up what it spooled (its scheduler scans the spool every second).

use super::email::{ReportEmail, build_report_email};
use super::{
    BuiltReport, Day, DkimKey, DkimSigning, HttpsUploader, LedgerEntry, LedgerState, Report,
    Reporter, Rua, TlsRptRecord, build_report, select_tlsrpt_record, unique_id,
};
use crate::Config;
use crate::clock::{Clock, SystemClock};
use crate::config::TlsRptConfig;
use crate::dns::{Resolver, TxtLookup};
use crate::queue::spool::{Envelope, QueueId, RecipientSpec, Spool};
use crate::store::{ReportStore, StoreError};
use crate::tls::TrustStore;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Ledger rows delivered per pass.
const BATCH: usize = 64;
/// Never make a day's reports sooner than this after midnight UTC, so the last
/// sessions of the day are written (the recorder batches every few milliseconds).
const MIN_DELAY_SECS: u64 = 30;
/// Wait before making a day's reports again after a temporary failure (DNS, store).
const REGENERATE_SECS: i64 = 300;
/// Most rua destinations used per record; the rest are ignored (logged).
const MAX_RUA: usize = 10;
/// How often the relay looks for due reports.
const TICK: Duration = Duration::from_secs(2);

/// The report service could not be set up, or a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Bad or unreadable configuration (names the key).
    #[error("{0}")]
    Setup(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The day asked for has not begun.
    #[error("{0} is in the future")]
    FutureDay(Day),
}

/// Why a domain has no usable TLS-RPT record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoverError {
    /// The domain publishes no usable record: no report for it.
    #[error("_smtp._tls.{domain}: {reason}")]
    NoRecord {
        /// The policy domain.
        domain: String,
        /// Why (e.g. no record, two records, no usable rua).
        reason: super::TlsRptRecordError,
    },
    /// DNS failed (SERVFAIL, time-out): try again later.
    #[error("_smtp._tls.{domain}: {reason}")]
    Temporary {
        /// The policy domain.
        domain: String,
        /// The DNS error.
        reason: String,
    },
}

/// How one delivery attempt of a ledger row ended.
enum Outcome {
    Delivered(String),
    Retry(String),
    Permanent(String),
}

/// What [`ReportService::generate`] did for one policy domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The policy domain.
    pub domain: String,
    /// The report id, when a report was made.
    pub report_id: Option<String>,
    /// Destinations newly entered in the ledger.
    pub new_rows: usize,
    /// Why nothing (more) was entered, if so.
    pub note: Option<String>,
    /// A temporary failure (DNS): making the report should be tried again.
    pub temporary: bool,
}

/// Called with the queue id of each spooled report e-mail (the relay hands it to its
/// scheduler at once).
pub type OnSpooled = Arc<dyn Fn(QueueId) + Send + Sync>;

/// Makes and delivers TLS-RPT reports.
pub struct ReportService {
    cfg: TlsRptConfig,
    store: Arc<dyn ReportStore>,
    dns: Arc<dyn TxtLookup>,
    spool: Spool,
    uploader: HttpsUploader,
    dkim: Option<Arc<DkimSigning>>,
    clock: Arc<dyn Clock>,
    on_spooled: Option<OnSpooled>,
}

impl ReportService {
    /// From the config: `[tlsrpt]`, the resolver, the trust store (for HTTPS rua), the
    /// spool (for e-mail reports) and the store. Loads the DKIM key, if configured.
    pub fn new(
        cfg: &Config,
        store: Arc<dyn ReportStore>,
        resolver: Resolver,
        trust: &TrustStore,
        spool: Spool,
    ) -> Result<ReportService, ReportError> {
        let r = &cfg.tlsrpt;
        let dkim = match &r.dkim_key_file {
            Some(path) => {
                let key = DkimKey::from_pem_file(path)
                    .map_err(|e| ReportError::Setup(format!("tlsrpt.dkim_key_file: {e}")))?;
                Some(Arc::new(DkimSigning {
                    domain: r.dkim_signing_domain(),
                    selector: r.dkim_selector.clone(),
                    key,
                }))
            }
            None => None,
        };
        let uploader = HttpsUploader::new(
            resolver.clone(),
            trust,
            Duration::from_secs(r.https_timeout_secs),
            r.allow_private_rua,
        )
        .map_err(|e| ReportError::Setup(e.to_string()))?;
        Ok(ReportService {
            cfg: r.clone(),
            store,
            dns: Arc::new(resolver),
            spool,
            uploader,
            dkim,
            clock: Arc::new(SystemClock),
            on_spooled: None,
        })
    }

    /// Call `f` with each spooled report e-mail's queue id.
    pub fn on_spooled(mut self, f: OnSpooled) -> Self {
        self.on_spooled = Some(f);
        self
    }

    /// Use another clock (tests).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn reporter(&self) -> Reporter {
        Reporter {
            organization_name: self.cfg.organization_name.clone(),
            contact_info: self.cfg.contact_info.clone(),
            submitter: self.cfg.submitter_domain(),
        }
    }

    /// The last second a report of `day` covers: the whole day, or up to now for the
    /// current day.
    fn end_of(&self, day: Day) -> Result<i64, ReportError> {
        let now = self.clock.now();
        if day.start() > now {
            return Err(ReportError::FutureDay(day));
        }
        Ok((day.end() - 1).min(now))
    }

    /// Domains with counted sessions on `day` (or just `domain`).
    async fn domains(&self, day: Day, domain: Option<&str>) -> Result<Vec<String>, ReportError> {
        let counts = self
            .store
            .counts(Some(day), domain.map(str::to_ascii_lowercase))
            .await?;
        Ok(counts
            .into_iter()
            .map(|(k, _)| k.policy_domain)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect())
    }

    /// The reports `day` would produce (whether or not the domains publish TLS-RPT),
    /// for `stsrelay report preview`.
    pub async fn preview(
        &self,
        day: Day,
        domain: Option<&str>,
    ) -> Result<Vec<(Report, Option<TlsRptRecord>)>, ReportError> {
        let end = self.end_of(day)?;
        let mut out = Vec::new();
        for d in self.domains(day, domain).await? {
            let counts = self.store.counts(Some(day), Some(d.clone())).await?;
            if let Some(b) = build_report(&self.reporter(), &d, day, end, &counts, &unique_id()) {
                out.push((b.report, self.discover(&d).await.ok()));
            }
        }
        Ok(out)
    }

    /// The domain's TLS-RPT record (R57–R61), with at most 10 destinations.
    pub async fn discover(&self, domain: &str) -> Result<TlsRptRecord, DiscoverError> {
        let txt = self
            .dns
            .txt(&format!("_smtp._tls.{domain}"))
            .await
            .map_err(|e| DiscoverError::Temporary {
                domain: domain.to_string(),
                reason: e.to_string(),
            })?;
        let mut rec = select_tlsrpt_record(&txt).map_err(|reason| DiscoverError::NoRecord {
            domain: domain.to_string(),
            reason,
        })?;
        for (uri, why) in &rec.skipped {
            tracing::info!(%domain, %uri, reason = %why, "TLS-RPT rua ignored");
        }
        if rec.rua.len() > MAX_RUA {
            tracing::warn!(%domain, listed = rec.rua.len(), used = MAX_RUA, "TLS-RPT record lists too many rua; the rest are ignored");
            rec.rua.truncate(MAX_RUA);
        }
        Ok(rec)
    }

    /// Make the reports of `day` (all domains, or `domain`) and enter each rua in the
    /// ledger; a (domain, day, rua) already there is left alone, so nobody gets a day's
    /// report twice. Nothing is delivered here; see [`Self::deliver_due`].
    pub async fn generate(
        &self,
        day: Day,
        domain: Option<&str>,
    ) -> Result<Vec<Generated>, ReportError> {
        let end = self.end_of(day)?;
        let now = self.clock.now();
        let mut out = Vec::new();
        for d in self.domains(day, domain).await? {
            let mut g = Generated {
                domain: d.clone(),
                report_id: None,
                new_rows: 0,
                note: None,
                temporary: false,
            };
            let rec = match self.discover(&d).await {
                Ok(r) => r,
                Err(e) => {
                    g.temporary = matches!(e, DiscoverError::Temporary { .. });
                    if g.temporary {
                        tracing::warn!(domain = %d, error = %e, "TLS-RPT record lookup failed; will try again");
                    } else {
                        tracing::debug!(domain = %d, reason = %e, "no TLS-RPT record: no report");
                    }
                    g.note = Some(format!("no report: {e}"));
                    out.push(g);
                    continue;
                }
            };
            let counts = self.store.counts(Some(day), Some(d.clone())).await?;
            let Some(built) = build_report(&self.reporter(), &d, day, end, &counts, &unique_id())
            else {
                out.push(g);
                continue;
            };
            let mut rows = Vec::new();
            for rua in &rec.rua {
                if matches!(rua, Rua::Mailto(_)) && self.dkim.is_none() {
                    tracing::warn!(domain = %d, %rua, "no DKIM key (tlsrpt.dkim_key_file): e-mail report not sent");
                    g.note = Some(format!("{rua} skipped: no DKIM key (tlsrpt.dkim_key_file)"));
                    continue;
                }
                rows.push(ledger_row(&built, &d, day, rua, now));
            }
            g.report_id = Some(built.report.report_id.clone());
            g.new_rows = self.store.ledger_insert(rows).await?;
            if g.new_rows == 0 && g.note.is_none() {
                g.note = Some("already in the ledger: not sent again".into());
            }
            tracing::info!(domain = %d, %day, report_id = %built.report.report_id, new = g.new_rows, "TLS-RPT report made");
            out.push(g);
        }
        Ok(out)
    }

    /// The newest ledger rows of each policy domain (its latest reported day), newest
    /// day first, for the status page.
    pub async fn latest_reports(&self) -> Result<Vec<LedgerEntry>, ReportError> {
        let mut rows = self.store.ledger_list(None).await?;
        rows.sort_by(|a, b| {
            b.day
                .cmp(&a.day)
                .then(a.policy_domain.cmp(&b.policy_domain))
                .then(a.rua.cmp(&b.rua))
        });
        let mut latest: std::collections::HashMap<String, Day> = Default::default();
        rows.retain(|r| *latest.entry(r.policy_domain.clone()).or_insert(r.day) == r.day);
        for r in &mut rows {
            r.gzip = Vec::new();
        }
        Ok(rows)
    }

    /// Deliver the ledger rows that are due, one claim at a time (so no other process
    /// sends a row meanwhile, and a claim cannot run out while it waits its turn).
    /// Returns the rows as they ended this pass.
    pub async fn deliver_due(&self) -> Result<Vec<LedgerEntry>, ReportError> {
        let lease =
            (self.cfg.claim_lease_secs as i64).max(2 * self.cfg.https_timeout_secs as i64 + 5);
        let mut done = Vec::new();
        for _ in 0..BATCH {
            let now = self.clock.now();
            let Some(mut row) = self.store.ledger_claim_due(now, lease).await? else {
                break;
            };
            let first = *row.first_try.get_or_insert(now);
            row.attempts += 1;
            let outcome = if let Some(addr) = row.rua.strip_prefix("mailto:") {
                self.spool_email(&row, addr).await
            } else {
                match self.uploader.post(&row.rua, &row.gzip).await {
                    Ok(status) => Outcome::Delivered(format!("HTTP {status}")),
                    Err(e @ super::UploadError::Refused { .. }) => {
                        Outcome::Permanent(e.to_string())
                    }
                    Err(e) => Outcome::Retry(e.to_string()),
                }
            };
            let ctx = (&row.policy_domain, row.day, &row.rua);
            let transport = if row.rua.starts_with("mailto:") {
                "mailto"
            } else {
                "https"
            };
            crate::ops::metrics::tlsrpt_report(
                transport,
                match &outcome {
                    Outcome::Delivered(_) => "sent",
                    Outcome::Retry(_) => "retry",
                    Outcome::Permanent(_) => "dropped",
                },
            );
            match outcome {
                Outcome::Delivered(how) => {
                    tracing::info!(domain = %ctx.0, day = %ctx.1, rua = %ctx.2, report_id = %row.report_id, result = %how, "TLS-RPT report sent");
                    row.state = LedgerState::Sent;
                    row.last_result = Some(how);
                }
                Outcome::Permanent(e) => {
                    tracing::warn!(domain = %ctx.0, day = %ctx.1, rua = %ctx.2, error = %e, "TLS-RPT report dropped: it cannot be delivered");
                    row.state = LedgerState::Dropped;
                    row.last_result = Some(e);
                }
                Outcome::Retry(e) => {
                    let wait = i64::try_from(
                        self.cfg
                            .https_retry_secs
                            .saturating_mul(1 << (row.attempts - 1).min(30)),
                    )
                    .unwrap_or(i64::MAX)
                    .min(self.cfg.give_up_secs as i64 + 1);
                    if now.saturating_add(wait) - first > self.cfg.give_up_secs as i64 {
                        tracing::warn!(domain = %ctx.0, day = %ctx.1, rua = %ctx.2, attempts = row.attempts, error = %e, "TLS-RPT report dropped: no success within tlsrpt.give_up_secs");
                        row.state = LedgerState::Dropped;
                    } else {
                        tracing::info!(domain = %ctx.0, rua = %ctx.2, error = %e, retry_in = wait, "TLS-RPT report not delivered; will retry");
                        row.next_try = now + wait;
                    }
                    row.last_result = Some(e);
                }
            }
            if !self.store.ledger_update(&row).await? {
                tracing::warn!(domain = %row.policy_domain, day = %row.day, rua = %row.rua, "TLS-RPT ledger row was claimed by another process meanwhile; its outcome is not recorded here");
            }
            done.push(row);
        }
        Ok(done)
    }

    /// Build, sign and spool the e-mail for `row` to `addr` ("queued as ID").
    async fn spool_email(&self, row: &LedgerEntry, addr: &str) -> Outcome {
        let Some(dkim) = self.dkim.clone() else {
            return Outcome::Permanent("no DKIM key (tlsrpt.dkim_key_file)".into());
        };
        let sender = self.cfg.sender();
        let to = vec![addr.to_string()];
        let msg = match build_report_email(
            &ReportEmail {
                from: &sender,
                to: &to,
                organization_name: &self.cfg.organization_name,
                submitter: &self.cfg.submitter_domain(),
                policy_domain: &row.policy_domain,
                report_id: &row.report_id,
                file_name: &row.file_name,
                gzip_json: &row.gzip,
                date: self.clock.now(),
            },
            &dkim,
        ) {
            Ok(m) => m,
            // Bad address or field: the same input fails every time.
            Err(e) => return Outcome::Permanent(e.to_string()),
        };
        let envelope = Envelope {
            mail_from: sender,
            recipients: vec![RecipientSpec::new(addr)],
            received_at: self.clock.now(),
            tls_optional: true,
            tlsrpt_exempt: true,
            ..Envelope::default()
        };
        let spool = self.spool.clone();
        let id = tokio::task::spawn_blocking(move || {
            let mut inc = spool.incoming()?;
            inc.write(&msg)?;
            inc.commit(&envelope)
        })
        .await;
        match id {
            Ok(Ok(id)) => {
                if let Some(f) = &self.on_spooled {
                    f(id);
                }
                Outcome::Delivered(format!("queued as {id}"))
            }
            Ok(Err(e)) => Outcome::Retry(e.to_string()),
            Err(e) => Outcome::Retry(e.to_string()),
        }
    }

    /// Run inside the relay: every couple of seconds deliver due reports; once a day,
    /// after 00:00 UTC plus a random delay up to `tlsrpt.send_delay_max_secs`, make the
    /// previous day's reports (R78) and forget data older than `tlsrpt.keep_days`.
    pub async fn run(self: Arc<Self>) {
        // (day, when to make its reports)
        let mut plan: Option<(Day, i64)> = None;
        let mut failing: Option<String> = None;
        loop {
            let now = self.clock.now();
            let yesterday = Day::of(now).prev();
            if plan.map(|(d, _)| d) != Some(yesterday) {
                let max = self.cfg.send_delay_max_secs.max(MIN_DELAY_SECS);
                let delay = rand::random_range(MIN_DELAY_SECS..=max) as i64;
                plan = Some((yesterday, yesterday.end() + delay));
            }
            if let Some((day, at)) = plan
                && now >= at
            {
                match self.daily(day).await {
                    Ok(true) => {}
                    Ok(false) => plan = Some((day, now + REGENERATE_SECS)),
                    Err(e) => {
                        tracing::error!(%day, error = %e, "TLS-RPT reports not made; will try again");
                        plan = Some((day, now + REGENERATE_SECS));
                    }
                }
            }
            // Said once per distinct failure (a store outage would say it every tick).
            match self.deliver_due().await {
                Ok(_) => failing = None,
                Err(e) => {
                    let text = e.to_string();
                    if failing.as_deref() != Some(text.as_str()) {
                        tracing::error!(error = %text, "TLS-RPT report delivery failed; retrying every few seconds");
                        failing = Some(text);
                    }
                }
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// Make `day`'s reports unless done; `Ok(false)` when a domain's record could not
    /// be looked up (try again later; reports already entered are not made twice).
    async fn daily(&self, day: Day) -> Result<bool, ReportError> {
        if self.store.day_done(day).await? {
            return Ok(true);
        }
        if !self.store.counts_complete(day).await? {
            tracing::info!(%day, "another node still keeps TLS-RPT counters of this day (Redis was down); reports wait for them");
            return Ok(false);
        }
        let made = self.generate(day, None).await?;
        let retry = made.iter().filter(|g| g.temporary).count();
        if retry > 0 {
            tracing::warn!(%day, domains = retry, "some TLS-RPT records could not be looked up; trying again later");
            return Ok(false);
        }
        self.store.mark_day_done(day, self.clock.now()).await?;
        let keep = Day::of(self.clock.now() - i64::from(self.cfg.keep_days) * 86_400);
        self.store.prune_before(keep).await?;
        tracing::info!(%day, domains = made.len(), "daily TLS-RPT reports made");
        Ok(true)
    }
}

fn ledger_row(b: &BuiltReport, domain: &str, day: Day, rua: &Rua, now: i64) -> LedgerEntry {
    LedgerEntry {
        policy_domain: domain.to_string(),
        day,
        rua: rua.to_string(),
        report_id: b.report.report_id.clone(),
        file_name: b.file_name.clone(),
        gzip: b.gzip.clone(),
        state: LedgerState::Pending,
        attempts: 0,
        created_at: now,
        first_try: None,
        next_try: now,
        last_result: None,
        lease: None,
    }
}
