//! In-process protocol peers for integration tests.
//!
//! Every peer listens on a loopback address only (127.0.0.0/8) and speaks the
//! real wire protocol:
//!
//! * [`pki`]   – a throw-away CA (rcgen) issuing leaf certificates.
//! * [`dns`]   – an authoritative+recursive-looking DNS server (UDP and TCP).
//! * [`dnssec`] – the same for a tree of DNSSEC-signed zones (secure, insecure, bogus).
//! * [`https`] – an HTTPS/1.1 host serving MTA-STS policies per SNI/Host.
//! * [`smtp`]  – an ESMTP sink with optional STARTTLS.
//!
//! Server tasks are spawned on the current tokio runtime and are aborted when
//! the last handle of the peer is dropped (or when the runtime shuts down).
//! Every per-connection loop is bounded and every read has a timeout.
#![allow(dead_code)]

pub mod dns;
pub mod dnssec;
pub mod https;
pub mod pki;
pub mod relay;
pub mod smtp;

use std::sync::Arc;

/// Human readable TLS version name as used in logs of the peers:
/// `"TLSv1.2"`, `"TLSv1.3"`, or the rustls debug name for anything else.
pub fn tls_version_name(v: rustls::ProtocolVersion) -> String {
    match v {
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
        other => format!("{other:?}"),
    }
}

/// The crypto provider used by all peers (aws-lc-rs, explicitly, so that no
/// process-wide default provider has to be installed).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Holds the abort handles of spawned server tasks and aborts them on drop.
#[derive(Debug, Default)]
pub(crate) struct TaskGuard {
    handles: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl TaskGuard {
    pub(crate) fn push(&self, h: tokio::task::AbortHandle) {
        self.handles.lock().unwrap().push(h);
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Ok(v) = self.handles.get_mut() {
            for h in v.drain(..) {
                h.abort();
            }
        }
    }
}
