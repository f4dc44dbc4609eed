//! TLS-RPT (RFC 8460). So far: the result types every other part classifies into, and
//! the `_smtp._tls` record.

mod record;
mod result_type;

pub use record::{Rua, TlsRptRecord, TlsRptRecordError, select_tlsrpt_record};
pub use result_type::{ResultType, UnknownResultType};
