//! `[socketmap]` configuration: listeners, limits, and zones (per-map-name settings, as
//! PMSR's `default_zone` and `zones`).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// `[socketmap]`: the Postfix TLS-policy server. Its presence in the config runs the
/// server inside `stsrelay run`; `stsrelay socketmap` runs it alone (with these
/// defaults when the section is absent).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketmapConfig {
    /// TCP addresses to listen on (default `["127.0.0.1:8461"]`; `[]` for none).
    pub listen: Vec<SocketAddr>,
    /// Also (or only) listen on this unix socket path.
    pub unix_path: Option<PathBuf>,
    /// Permissions of the unix socket (default `0o660`).
    pub unix_mode: u32,
    /// Owner of the unix socket: `user` or `user:group`, names or numeric ids (default:
    /// unchanged). Postfix's `smtp` processes must be able to connect.
    pub unix_owner: Option<String>,
    /// Close a connection idle for this long between requests, seconds (default 60;
    /// Postfix closes its own idle socketmap connections after `ipc_idle`, 5 s).
    pub idle_timeout_secs: u64,
    /// A request, once its first byte arrived, and every reply write must complete
    /// within this many seconds (default 10).
    pub io_timeout_secs: u64,
    /// Connections served at once; more wait in the listen backlog (default 10000).
    pub max_connections: usize,
    /// Settings of map names not listed in `zones` (PMSR's `default_zone`).
    pub default_zone: ZoneConfig,
    /// Settings per socketmap name (`socketmap:inet:127.0.0.1:8461:NAME`).
    pub zones: BTreeMap<String, ZoneConfig>,
}

impl Default for SocketmapConfig {
    fn default() -> Self {
        SocketmapConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8461))],
            unix_path: None,
            unix_mode: 0o660,
            unix_owner: None,
            idle_timeout_secs: 60,
            io_timeout_secs: 10,
            max_connections: 10_000,
            default_zone: ZoneConfig::default(),
            zones: BTreeMap::new(),
        }
    }
}

/// How one socketmap name answers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZoneConfig {
    /// Answer `testing` policies like `enforce` ones (default false: `NOTFOUND `, as
    /// RFC 8461 §5 asks senders not to refuse delivery under `testing`).
    pub strict_testing: bool,
    /// Add `servername=hostname` (SNI = the MX host name, RFC 8461 §4.2). Default true.
    pub require_sni: bool,
    /// Add Postfix 3.10 TLSRPT attributes (`policy_type`, `policy_domain`,
    /// `mx_host_pattern`, `policy_string`). Default false: Postfix before 3.10
    /// rejects them.
    pub tlsrpt: bool,
    /// Reply `dane-only` / `dane` for next hops whose MX hosts have DNSSEC-secure,
    /// usable TLSA records, so that Postfix's own DANE decides (RFC 8461 §2; see
    /// [`super::dane`]). Default true; needs `smtp_dns_support_level = dnssec` in
    /// Postfix (without it Postfix defers `dane-only` destinations). False: MTA-STS
    /// replies only, as before DANE.
    pub dane: bool,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        ZoneConfig {
            strict_testing: false,
            require_sni: true,
            tlsrpt: false,
            dane: true,
        }
    }
}

impl SocketmapConfig {
    /// The zone for a map name: its own entry, or `default_zone`.
    ///
    /// ```
    /// let cfg = stsrelay::Config::from_toml(
    ///     "[socketmap.zones.strict]\nstrict_testing = true\n").unwrap();
    /// let sm = cfg.socketmap.unwrap();
    /// assert!(sm.zone("strict").strict_testing);
    /// assert!(!sm.zone("postfix").strict_testing);
    /// ```
    pub fn zone(&self, name: &str) -> &ZoneConfig {
        self.zones.get(name).unwrap_or(&self.default_zone)
    }

    /// Check ranges; `Err((key, message))`.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.listen.is_empty() && self.unix_path.is_none() {
            return Err((
                "socketmap.listen",
                "no listener: give a TCP address or socketmap.unix_path".into(),
            ));
        }
        if self.idle_timeout_secs == 0 || self.io_timeout_secs == 0 {
            return Err((
                "socketmap.idle_timeout_secs",
                "timeouts must be positive".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(("socketmap.max_connections", "must be positive".into()));
        }
        if self.unix_mode > 0o777 {
            return Err((
                "socketmap.unix_mode",
                format!(
                    "{:#o} is not a permission mode (0o000..=0o777)",
                    self.unix_mode
                ),
            ));
        }
        if let Some(owner) = &self.unix_owner {
            if self.unix_path.is_none() {
                return Err(("socketmap.unix_owner", "needs socketmap.unix_path".into()));
            }
            if owner.is_empty() || owner.split(':').count() > 2 {
                return Err((
                    "socketmap.unix_owner",
                    format!("{owner:?} is not user[:group]"),
                ));
            }
        }
        Ok(())
    }
}
