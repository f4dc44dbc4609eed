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

/// How long a claimed ledger row is reserved for the claiming process.
const LEASE_SECS: i64 = 120;
/// Ledger rows delivered per pass.
const BATCH: usize = 64;
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

    /// The domain's TLS-RPT record (R57–R61).
    pub async fn discover(&self, domain: &str) -> Result<TlsRptRecord, String> {
        let txt = self
            .dns
            .txt(&format!("_smtp._tls.{domain}"))
            .await
            .map_err(|e| e.to_string())?;
        let rec = select_tlsrpt_record(&txt).map_err(|e| e.to_string())?;
        for (uri, why) in &rec.skipped {
            tracing::info!(%domain, %uri, reason = %why, "TLS-RPT rua ignored");
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
            };
            let rec = match self.discover(&d).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(domain = %d, reason = %e, "no TLS-RPT record: no report");
                    g.note = Some(format!("no report: _smtp._tls.{d}: {e}"));
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

    /// Deliver the ledger rows that are due (claimed, so no other process sends them
    /// meanwhile). Returns the rows as they ended this pass.
    pub async fn deliver_due(&self) -> Result<Vec<LedgerEntry>, ReportError> {
        let now = self.clock.now();
        let rows = self.store.ledger_claim_due(now, LEASE_SECS, BATCH).await?;
        let mut done = Vec::with_capacity(rows.len());
        for mut row in rows {
            let first = *row.first_try.get_or_insert(now);
            row.attempts += 1;
            let result = if let Some(addr) = row.rua.strip_prefix("mailto:") {
                self.spool_email(&row, addr).await
            } else {
                self.uploader
                    .post(&row.rua, &row.gzip)
                    .await
                    .map(|status| format!("HTTP {status}"))
                    .map_err(|e| e.to_string())
            };
            match result {
                Ok(how) => {
                    tracing::info!(domain = %row.policy_domain, day = %row.day, rua = %row.rua, report_id = %row.report_id, result = %how, "TLS-RPT report sent");
                    row.state = LedgerState::Sent;
                    row.last_result = Some(how);
                }
                Err(e) => {
                    let wait = self
                        .cfg
                        .https_retry_secs
                        .saturating_mul(1 << (row.attempts - 1).min(16))
                        as i64;
                    if now + wait - first > self.cfg.give_up_secs as i64 {
                        tracing::warn!(domain = %row.policy_domain, day = %row.day, rua = %row.rua, attempts = row.attempts, error = %e, "TLS-RPT report dropped: no success within tlsrpt.give_up_secs");
                        row.state = LedgerState::Dropped;
                    } else {
                        tracing::info!(domain = %row.policy_domain, rua = %row.rua, error = %e, retry_in = wait, "TLS-RPT report not delivered; will retry");
                        row.next_try = now + wait;
                    }
                    row.last_result = Some(e);
                }
            }
            self.store.ledger_update(&row).await?;
            done.push(row);
        }
        Ok(done)
    }

    /// Build, sign and spool the e-mail for `row` to `addr`; returns "queued as ID".
    async fn spool_email(&self, row: &LedgerEntry, addr: &str) -> Result<String, String> {
        let dkim = self
            .dkim
            .clone()
            .ok_or("no DKIM key (tlsrpt.dkim_key_file)")?;
        let sender = self.cfg.sender();
        let to = vec![addr.to_string()];
        let msg = build_report_email(
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
        )
        .map_err(|e| e.to_string())?;
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
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if let Some(f) = &self.on_spooled {
            f(id);
        }
        Ok(format!("queued as {id}"))
    }

    /// Run inside the relay: every couple of seconds deliver due reports; once a day,
    /// after 00:00 UTC plus a random delay up to `tlsrpt.send_delay_max_secs`, make the
    /// previous day's reports (R78) and forget data older than `tlsrpt.keep_days`.
    pub async fn run(self: Arc<Self>) {
        let mut delay_for: Option<(Day, i64)> = None;
        loop {
            let now = self.clock.now();
            let yesterday = Day::of(now).prev();
            if delay_for.map(|(d, _)| d) != Some(yesterday) {
                let max = self.cfg.send_delay_max_secs;
                let delay = if max == 0 {
                    0
                } else {
                    rand::random_range(0..=max) as i64
                };
                delay_for = Some((yesterday, delay));
            }
            let delay = delay_for.map(|(_, s)| s).unwrap_or(0);
            if now >= yesterday.end() + delay
                && let Err(e) = self.daily(yesterday).await
            {
                tracing::error!(day = %yesterday, error = %e, "TLS-RPT reports not made");
            }
            if let Err(e) = self.deliver_due().await {
                tracing::error!(error = %e, "TLS-RPT report delivery failed");
            }
            tokio::time::sleep(TICK).await;
        }
    }

    async fn daily(&self, day: Day) -> Result<(), ReportError> {
        if self.store.day_done(day).await? {
            return Ok(());
        }
        let made = self.generate(day, None).await?;
        self.store.mark_day_done(day, self.clock.now()).await?;
        let keep = Day::of(self.clock.now() - i64::from(self.cfg.keep_days) * 86_400);
        self.store.prune_before(keep).await?;
        tracing::info!(%day, domains = made.len(), "daily TLS-RPT reports made");
        Ok(())
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
    }
}
