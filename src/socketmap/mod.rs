//! The Postfix socketmap TLS-policy server: a drop-in for postfix-mta-sts-resolver
//! (PMSR) that answers from stsrelay's MTA-STS engine (same cache and store as the
//! relay).
//!
//! Postfix (`main.cf`):
//!
//! ```text
//! smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix
//! ```
//!
//! Each request is a netstring `NAME KEY`; the reply is a netstring:
//! - `OK secure match=NAME[:NAME…] servername=hostname` when an `enforce` policy (or a
//!   `testing` one in a `strict_testing` zone) governs the key's domain; see
//!   [`reply`] for how wildcard patterns become names;
//! - `NOTFOUND ` for no policy, `mode: none`, `testing`, a failed fetch without a cached
//!   policy, keys starting with `.`, IP literals and other non-domains;
//! - `TEMP reason` when an enforced policy permits none of the domain's MX hosts (or
//!   they cannot be resolved for a wildcard pattern): Postfix defers;
//! - `OK dane-only` or `OK dane` when the key's MX hosts have DNSSEC-secure, usable
//!   TLSA records (RFC 7672), whatever MTA-STS says: Postfix's own DANE then decides,
//!   and no MTA-STS answer can override a DANE failure (RFC 8461 §2); see [`dane`].
//!
//! Parts: [`netstring`] (framing), [`request`] (`NAME KEY`, key normalisation),
//! [`reply`] (decisions and rendering), [`dane`] (when DANE replaces the MTA-STS
//! answer), [`server`] (listeners and connections), [`zones`] (the `[socketmap]` config).

pub mod dane;
pub mod netstring;
pub mod reply;
pub mod request;
pub mod server;
pub mod zones;

pub use reply::{Decision, MAX_REPLY, Reply, decide, match_names, needs_mx_hosts, secure_reply};
pub use request::{Key, Request, normalize_key};
pub use server::{Listeners, MxLookup, Server, SocketmapStats};
pub use zones::{SocketmapConfig, ZoneConfig};

use std::path::PathBuf;
use std::time::Duration;

/// Why the socketmap server could not start.
#[derive(Debug, thiserror::Error)]
pub enum SocketmapError {
    /// A part could not be set up (the message names the part and config key).
    #[error("{0}")]
    Setup(String),
    /// A TCP address could not be bound.
    #[error("cannot listen on {addr} (socketmap.listen): {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Error.
        source: std::io::Error,
    },
    /// A resource is unavailable (signal handlers).
    #[error("{0}")]
    Unavailable(String),
    /// The unix socket could not be set up.
    #[error("socketmap.unix_path {}: {message}", .path.display())]
    Unix {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl SocketmapError {
    /// Is this a configuration problem (exit 78) rather than a temporary one (75)?
    pub fn is_config(&self) -> bool {
        matches!(self, SocketmapError::Setup(_))
    }
}

/// `stsrelay socketmap`: the server alone, with its own engine on `storage.data_dir`
/// (the relay's store, so both share fetched policies on disk) and proactive refresh,
/// until SIGTERM or SIGINT. SIGHUP changes nothing (the socketmap's settings need a
/// restart) and says so in the log.
pub async fn run(cfg: &crate::Config) -> Result<(), SocketmapError> {
    use crate::ops::signals::{Control, listen};
    let store = crate::store::Backend::open(cfg)
        .map_err(|e| SocketmapError::Unavailable(format!("policy store ([storage]): {e}")))?;
    store.connect().await;
    // Broken validation makes every next hop bogus, so every reply `dane-only` (Postfix
    // defers): say so at start, as the relay does.
    if let Ok(resolver) = crate::dns::Resolver::from_config(cfg) {
        crate::relay::dnssec_selfcheck(&resolver).await;
    }
    let server = Server::with_store(cfg, store.policies())?;
    let listeners = server.bind().await?;
    let mut controls =
        listen().map_err(|e| SocketmapError::Unavailable(format!("signal handlers: {e}")))?;
    let refresher = server.engine().spawn_refresher(Duration::from_secs(3600));
    crate::ops::notify::ready("socketmap listening");
    let stop = async {
        while let Some(c) = controls.recv().await {
            match c {
                Control::Stop => break,
                Control::Reload => tracing::warn!(
                    "SIGHUP: stsrelay socketmap does not reload; restart it to apply a new config"
                ),
            }
        }
    };
    tokio::select! {
        _ = server.serve(listeners) => {}
        _ = stop => {
            crate::ops::notify::stopping();
            tracing::info!("stopping");
        }
    }
    refresher.abort();
    Ok(())
}
