//! The durable spool and the delivery scheduler.

pub mod bounce;
pub mod scheduler;
pub mod spool;
