//! The durable spool and the delivery scheduler.

pub mod bounce;
mod group_commit;
pub mod scheduler;
pub mod spool;
