//! TLS-RPT (RFC 8460). So far: the result types every other part classifies into, the
//! `_smtp._tls` record, and the per-session results delivery records.

mod dkim;
mod email;
mod record;
mod recorder;
mod result_type;
mod session;

pub use dkim::{DkimKey, DkimKeyError, DkimSigning};
pub use email::{ReportEmail, ReportEmailError, SIGNED_HEADERS, build_report_email};
pub use record::{Rua, TlsRptRecord, TlsRptRecordError, select_tlsrpt_record};
pub use recorder::StoreRecorder;
pub use result_type::{ResultType, UnknownResultType};
pub use session::{LogRecorder, PolicyType, SessionFailure, SessionRecorder, SessionResult};
