//! TLS-RPT (RFC 8460). So far: the result types every other part classifies into.

mod result_type;

pub use result_type::{ResultType, UnknownResultType};
