//! The report ledger: one row per (policy domain, day, rua), so each destination gets a
//! day's report once, across restarts and processes, and retries keep the same report.

use super::Day;

/// Where a ledger row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerState {
    /// Waiting for its (next) attempt.
    Pending,
    /// Delivered: accepted by the HTTPS endpoint, or handed to the spool (mailto).
    Sent,
    /// Given up after `tlsrpt.give_up_secs`, or undeliverable (logged).
    Dropped,
}

impl LedgerState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerState::Pending => "pending",
            LedgerState::Sent => "sent",
            LedgerState::Dropped => "dropped",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<LedgerState> {
        match s {
            "pending" => Some(LedgerState::Pending),
            "sent" => Some(LedgerState::Sent),
            "dropped" => Some(LedgerState::Dropped),
            _ => None,
        }
    }
}

/// One report to one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The policy domain.
    pub policy_domain: String,
    /// The day reported on.
    pub day: Day,
    /// The destination (`mailto:…` or `https://…`).
    pub rua: String,
    /// The report's `report-id` (the same for every rua and every retry).
    pub report_id: String,
    /// The report's file name.
    pub file_name: String,
    /// The gzipped JSON.
    pub gzip: Vec<u8>,
    /// State.
    pub state: LedgerState,
    /// Attempts made.
    pub attempts: u32,
    /// When the row was made (Unix seconds).
    pub created_at: i64,
    /// First attempt (Unix seconds), if any; retries end `give_up_secs` after it.
    pub first_try: Option<i64>,
    /// Next attempt not before (Unix seconds).
    pub next_try: i64,
    /// The last outcome (error, or where it went).
    pub last_result: Option<String>,
    /// The claim this copy of the row was handed out under: only its holder may update
    /// the row (see [`crate::store::ReportStore::ledger_claim_due`]).
    pub lease: Option<String>,
}
