//! SMTP: the client side used to reach MX hosts, and the server side that accepts mail.

pub mod auth;
pub mod inbound;
pub mod outbound;
mod tls_required;

pub use inbound::rfc5322_date;
pub use tls_required::says_tls_not_required;
