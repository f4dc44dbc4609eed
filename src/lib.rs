//! # stsrelay
//!
//! An outbound SMTP relay, and a library for custom MTAs, that makes mail obey its
//! recipients' MTA-STS policies (RFC 8461) and reports with TLS-RPT (RFC 8460).
//!
//! The policy engine answers "what policy governs domain D now, and may MX host H get
//! mail, and must its TLS be verified?":
//!
//! ```
//! use stsrelay::sts::{Mode, MxDecision, Policy};
//!
//! // A policy as fetched from https://mta-sts.example.com/.well-known/mta-sts.txt
//! let policy = Policy::parse("version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 604800\n")?;
//! assert_eq!(policy.mode, Mode::Enforce);
//! assert!(policy.matches_mx("mx1.example.com"));
//! assert!(!policy.matches_mx("mx1.attacker.test"));
//! # Ok::<(), stsrelay::sts::PolicyError>(())
//! ```
//!
//! With the network, [`sts::Engine`] discovers, fetches, caches (in memory and on disk)
//! and refreshes policies; [`tls::TrustStore`] verifies MX certificates; see
//! `examples/custom_mta.rs` for a custom MTA's delivery loop.

pub mod check;
pub mod clock;
pub mod config;
pub mod dane;
pub mod delivery;
pub mod dns;
pub mod ops;
pub mod queue;
pub mod relay;
pub mod smtp;
pub mod socketmap;
pub mod store;
pub mod sts;
pub mod tls;
pub mod tlsrpt;

pub use config::Config;
pub use tlsrpt::ResultType;
