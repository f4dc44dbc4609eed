//! TLS-RPT (RFC 8460): the result types every other part classifies into, the
//! `_smtp._tls` record, per-session results and their durable counters, the daily JSON
//! report, its ledger, and sending it by DKIM-signed e-mail and HTTPS.

mod counter;
mod day;
mod dkim;
mod email;
mod ledger;
mod record;
mod recorder;
mod report;
mod result_type;
mod send;
mod service;
mod session;

pub use counter::{CounterKey, FailureDetail, PolicyKey, count};
pub use day::{BadDay, Day, rfc3339};
pub use dkim::{DkimKey, DkimKeyError, DkimSigning};
pub use email::{ReportEmail, ReportEmailError, SIGNED_HEADERS, build_report_email};
pub use ledger::{LedgerEntry, LedgerState};
pub use record::{Rua, TlsRptRecord, TlsRptRecordError, select_tlsrpt_record};
pub use recorder::StoreRecorder;
pub use report::{
    BuiltReport, DateRange, FailureDetails, PolicyDescription, PolicyResult, Report, Reporter,
    Summary, build_report, gzip, unique_id,
};
pub use result_type::{ResultType, UnknownResultType};
pub use send::{HttpsUploader, TLSRPT_GZIP, UploadError, UploaderSetupError, is_public};
pub use service::{DiscoverError, Generated, OnSpooled, ReportError, ReportService};
pub use session::{LogRecorder, PolicyType, SessionFailure, SessionRecorder, SessionResult};
