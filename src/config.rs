//! Typed configuration (TOML). Every key has a working default, so the relay runs with
//! no file at all; unknown keys are errors that name the key.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config file that could not be read or is invalid. The message names the file and,
/// for unknown or mistyped keys, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said (names the key and line).
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config{}: {key}: {message}", .path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Invalid {
        /// The file, if any.
        path: Option<PathBuf>,
        /// The dotted key, e.g. `sts.fetch_backoff_secs`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[dns]`
    pub dns: DnsConfig,
    /// `[tls]`
    pub tls: TlsConfig,
    /// `[storage]`
    pub storage: StorageConfig,
    /// `[delivery]`
    pub delivery: DeliveryConfig,
    /// `[sts]`
    pub sts: StsConfig,
    /// `[server]`
    pub server: ServerConfig,
    /// `[queue]`
    pub queue: QueueConfig,
    /// `[socketmap]`: the Postfix TLS-policy server; present = run it inside
    /// `stsrelay run`.
    pub socketmap: Option<crate::socketmap::SocketmapConfig>,
    /// `[tlsrpt]`
    pub tlsrpt: TlsRptConfig,
    /// `[admin]`
    pub admin: AdminConfig,
    /// `[log]`
    pub log: LogConfig,
    #[serde(skip)]
    source: Option<PathBuf>,
}

/// `[dns]`: how names are resolved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers as `ip:port`; empty means the system resolver (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Per-query timeout in seconds (default 5).
    pub timeout_secs: Option<u64>,
    /// Validate DNSSEC for the DANE lookups (MX, A/AAAA, TLSA; RFC 7672). Default true.
    /// Off: every DANE lookup is insecure, so DANE never applies. MTA-STS and plain
    /// delivery never validate.
    pub dnssec: bool,
    /// File of DNSKEY records to trust instead of the root's keys built into hickory
    /// (`zone. 3600 IN DNSKEY 257 3 13 …`, every key of each anchored zone).
    pub trust_anchor: Option<PathBuf>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: vec![],
            timeout_secs: None,
            dnssec: true,
            trust_anchor: None,
        }
    }
}

/// `[tls]`: trust store shared by policy fetches and MX connections.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM files whose certificates are trusted in addition to webpki-roots.
    pub extra_roots: Vec<PathBuf>,
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory for the spool and the local store (`store.sqlite3`). Default `./data`.
    pub data_dir: PathBuf,
    /// Where policies, TLS-RPT counters and the report ledger live: `sqlite` (default,
    /// in `data_dir`) or `redis` (shared by a fleet of nodes; `redis_url`).
    pub backend: StorageBackend,
    /// With `backend = "redis"`: `redis://[user:password@]host:port/db`, or
    /// `rediss://…` for TLS.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (several fleets can share one server). Default
    /// `stsrelay:`.
    pub redis_prefix: String,
    /// PEM file of the CA that signed a `rediss://` server's certificate (default: the
    /// system's roots).
    pub redis_ca_file: Option<PathBuf>,
    /// Longest wait for one Redis command, in milliseconds (default 500); past it the
    /// node uses its local fallback.
    pub redis_timeout_ms: u64,
    /// After a Redis failure, how long the node uses its fallback before it tries
    /// Redis again, in seconds (default 5).
    pub redis_retry_secs: u64,
}

/// `storage.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// SQLite in `storage.data_dir` (one node).
    #[default]
    Sqlite,
    /// Redis at `storage.redis_url`, shared by several nodes.
    Redis,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./data"),
            backend: StorageBackend::Sqlite,
            redis_url: None,
            redis_prefix: "stsrelay:".into(),
            redis_ca_file: None,
            redis_timeout_ms: 500,
            redis_retry_secs: 5,
        }
    }
}

/// `[delivery]`: outbound SMTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// TCP port used to reach MX hosts (default 25).
    pub port: u16,
    /// Name sent in EHLO (default: this machine's host name).
    pub helo_name: Option<String>,
    /// TCP connect timeout in seconds (default 30).
    pub connect_timeout_secs: u64,
    /// Timeout for each SMTP reply, in seconds (default 300, RFC 5321 §4.5.3.2).
    pub command_timeout_secs: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            port: 25,
            helo_name: None,
            connect_timeout_secs: 30,
            command_timeout_secs: 300,
        }
    }
}

/// `[sts]`: MTA-STS policy discovery, fetch and cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StsConfig {
    /// Connect timeout for the policy host, seconds (default 10).
    pub fetch_connect_timeout_secs: u64,
    /// Whole-fetch deadline (DNS, TCP, TLS, HTTP, body), seconds (default 60, RFC 8461 §3.3).
    pub fetch_timeout_secs: u64,
    /// HTTPS port of policy hosts (default 443; only tests change it).
    pub policy_port: u16,
    /// How often a cached policy's `_mta-sts` TXT id is re-checked on use, seconds (default 300).
    pub txt_recheck_secs: u64,
    /// Wait after a failed fetch before trying the same id again, seconds (default 300, minimum 300; RFC 8461 §3.3).
    pub fetch_backoff_secs: u64,
    /// Proactive refresh interval for cached policies, seconds (default 86400; at most daily).
    pub refresh_secs: u64,
    /// Policies kept in memory (the on-disk cache keeps all). Default 1,000,000.
    pub cache_capacity: u64,
}

impl Default for StsConfig {
    fn default() -> Self {
        StsConfig {
            fetch_connect_timeout_secs: 10,
            fetch_timeout_secs: 60,
            policy_port: 443,
            txt_recheck_secs: 300,
            fetch_backoff_secs: 300,
            refresh_secs: 86_400,
            cache_capacity: 1_000_000,
        }
    }
}

/// `[server]`: the SMTP listener that Postfix (or another client) relays through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (default `127.0.0.1:2525`).
    pub listen: SocketAddr,
    /// Networks allowed to relay (default loopback only). Everyone else gets
    /// `554 5.7.1` at RCPT.
    pub allow: Vec<ipnet::IpNet>,
    /// Name in the greeting and `Received:` (default: `delivery.helo_name` or host name).
    pub hostname: Option<String>,
    /// Largest message accepted, bytes (SIZE; default 50 MiB).
    pub max_message_size: usize,
    /// Most recipients per message (default 1000).
    pub max_recipients: usize,
    /// Close a client that sends nothing for this long, seconds (default 300).
    pub idle_timeout_secs: u64,
    /// PEM certificate chain for STARTTLS (optional; with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for STARTTLS.
    pub tls_key: Option<PathBuf>,
    /// Users (one `user:argon2-hash` per line) who may relay after `AUTH PLAIN` over
    /// STARTTLS from outside `allow`. Needs `tls_cert`.
    pub auth_users_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 2525)),
            allow: vec![
                "127.0.0.0/8".parse().expect("valid literal"),
                "::1/128".parse().expect("valid literal"),
            ],
            hostname: None,
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 1000,
            idle_timeout_secs: 300,
            tls_cert: None,
            tls_key: None,
            auth_users_file: None,
        }
    }
}

/// `[queue]`: retries, lifetime and concurrency.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Waits between attempts, seconds; the last repeats (default
    /// 5m, 10m, 20m, 40m, 1h20m, then every 2h — RFC 5321 §4.5.4.1: at least 30 min
    /// apart after the first tries, give up after 4-5 days).
    pub retry_secs: Vec<u64>,
    /// Bounce what is still undelivered after this long, seconds (default 5 days).
    pub lifetime_secs: u64,
    /// Deliveries in flight at once (default 64).
    pub max_concurrency: usize,
    /// Deliveries in flight per destination domain (default 20, as Postfix).
    pub max_per_domain: usize,
    /// On SIGTERM, wait at most this long for deliveries and client sessions in
    /// progress to finish before exiting, seconds (default 30). What is cut off stays
    /// queued (delivered again later, never lost).
    pub shutdown_grace_secs: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            retry_secs: vec![300, 600, 1200, 2400, 4800, 7200],
            lifetime_secs: 5 * 86_400,
            max_concurrency: 64,
            max_per_domain: 20,
            shutdown_grace_secs: 30,
        }
    }
}

/// `[admin]`: the operator's HTTP endpoint (`/metrics`, `/healthz`, `/readyz`, status page).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin HTTP endpoint at all (default true).
    pub enabled: bool,
    /// Address to listen on (default `127.0.0.1:9725`). Loopback only, unless
    /// `allow_non_loopback` is set: the endpoint has no authentication.
    pub listen: SocketAddr,
    /// Permit a `listen` address that is not loopback (default false).
    pub allow_non_loopback: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9725)),
            allow_non_loopback: false,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable `key=value` lines (default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`: where and how the relay logs (standard error; journald picks it up).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json` (default `text`).
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax (default `stsrelay=info,warn`); the `RUST_LOG`
    /// environment variable, when set, wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "stsrelay=info,warn".to_string(),
        }
    }
}

/// `[tlsrpt]`: daily TLS-RPT reports (RFC 8460). Sessions are always counted; reports
/// are generated and sent only when `enabled`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsRptConfig {
    /// Send daily reports (default false: they need an identity and a DKIM key).
    pub enabled: bool,
    /// `organization-name` in every report.
    pub organization_name: String,
    /// `contact-info` in every report: an e-mail address (RFC 5322 addr-spec).
    pub contact_info: String,
    /// The submitter domain (file names, `TLS-Report-Submitter`, Subject). Default: the
    /// domain of `contact_info`.
    pub submitter: Option<String>,
    /// Sender of report e-mails (envelope and `From:`); never null. Default:
    /// `tlsrpt-noreply@<submitter>`.
    pub mail_from: Option<String>,
    /// DKIM `d=`. Default: the submitter domain.
    pub dkim_domain: Option<String>,
    /// DKIM `s=` (default `tlsrpt`).
    pub dkim_selector: String,
    /// DKIM private key, PEM: PKCS#8 (`openssl genpkey`, RSA or Ed25519) or PKCS#1 RSA.
    /// Without it no e-mail reports are sent (RFC 8460 §3 requires a signature); HTTPS
    /// reports still are.
    pub dkim_key_file: Option<PathBuf>,
    /// Reports for a day are made after 00:00 UTC plus a random delay of up to this many
    /// seconds (default 4 h, as RFC 8460 §4.1 suggests).
    pub send_delay_max_secs: u64,
    /// Time limit of one HTTPS report upload, seconds (default 10).
    pub https_timeout_secs: u64,
    /// First wait before retrying a failed HTTPS upload, seconds; doubles each time
    /// (default 300).
    pub https_retry_secs: u64,
    /// Give up on a report this long after its first attempt, seconds (default 24 h,
    /// RFC 8460 §5.5).
    pub give_up_secs: u64,
    /// A node that takes a report to send holds it this long, seconds (default 120,
    /// raised to twice `https_timeout_secs` + 5 if that is longer): no other node
    /// sends it meanwhile; if the node dies, another sends it after this.
    pub claim_lease_secs: u64,
    /// Keep session counters and sent reports this many days (default 14).
    pub keep_days: u32,
    /// Allow `https:` rua endpoints on loopback, private, link-local and other
    /// non-public addresses (default false: a domain's DNS must not make the relay talk
    /// to internal services). For tests and closed networks.
    pub allow_private_rua: bool,
}

impl Default for TlsRptConfig {
    fn default() -> Self {
        TlsRptConfig {
            enabled: false,
            organization_name: String::new(),
            contact_info: String::new(),
            submitter: None,
            mail_from: None,
            dkim_domain: None,
            dkim_selector: "tlsrpt".to_string(),
            dkim_key_file: None,
            send_delay_max_secs: 4 * 3600,
            https_timeout_secs: 10,
            https_retry_secs: 300,
            give_up_secs: 86_400,
            claim_lease_secs: 120,
            keep_days: 14,
            allow_private_rua: false,
        }
    }
}

impl TlsRptConfig {
    /// The submitter domain: `submitter`, or the domain of `contact_info`.
    pub fn submitter_domain(&self) -> String {
        self.submitter
            .clone()
            .or_else(|| {
                self.contact_info
                    .rsplit_once('@')
                    .map(|(_, d)| d.to_string())
            })
            .unwrap_or_default()
            .trim_end_matches('.')
            .to_ascii_lowercase()
    }

    /// The reverse path and `From:` of report e-mails.
    pub fn sender(&self) -> String {
        self.mail_from
            .clone()
            .unwrap_or_else(|| format!("tlsrpt-noreply@{}", self.submitter_domain()))
    }

    /// DKIM `d=`.
    pub fn dkim_signing_domain(&self) -> String {
        self.dkim_domain
            .clone()
            .unwrap_or_else(|| self.submitter_domain())
    }
}

impl Config {
    /// Read and validate a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            ConfigError::Invalid { key, message, .. } => ConfigError::Invalid {
                path: Some(path.to_path_buf()),
                key,
                message,
            },
            other => other,
        })?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parse and validate TOML text.
    ///
    /// ```
    /// let cfg = stsrelay::Config::from_toml("[delivery]\nport = 2525\n").unwrap();
    /// assert_eq!(cfg.delivery.port, 2525);
    /// let err = stsrelay::Config::from_toml("[delivery]\nprot = 1\n").unwrap_err();
    /// assert!(err.to_string().contains("prot"));
    /// ```
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let message = e.to_string().trim_end().to_string();
            ConfigError::Parse {
                path: PathBuf::from("<string>"),
                message: match key_of_error(text) {
                    Some(key) => format!("key {key}: {message}"),
                    None => message,
                },
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The file this config came from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                path: self.source.clone(),
                key,
                message: message.to_string(),
            })
        };
        // Read here, so a bad file stops `stsrelay` at start-up, not at the first DANE lookup.
        if let Some(path) = &self.dns.trust_anchor
            && let Err(e) = crate::dns::TrustAnchor::from_file(path)
        {
            return invalid("dns.trust_anchor", &e.to_string());
        }
        if self.sts.fetch_backoff_secs < 300 {
            return invalid(
                "sts.fetch_backoff_secs",
                "must be at least 300 (RFC 8461 §3.3)",
            );
        }
        if self.sts.fetch_timeout_secs == 0 || self.sts.fetch_connect_timeout_secs == 0 {
            return invalid("sts.fetch_timeout_secs", "timeouts must be positive");
        }
        if self.sts.refresh_secs == 0 || self.sts.refresh_secs > 86_400 {
            return invalid(
                "sts.refresh_secs",
                "must be between 1 and 86400 (refresh at least daily)",
            );
        }
        if self.queue.retry_secs.is_empty() || self.queue.retry_secs.contains(&0) {
            return invalid("queue.retry_secs", "needs at least one positive interval");
        }
        if self.queue.max_concurrency == 0 || self.queue.max_per_domain == 0 {
            return invalid(
                "queue.max_concurrency",
                "concurrency limits must be positive",
            );
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return invalid("server.tls_cert", "tls_cert and tls_key go together");
        }
        if self.server.auth_users_file.is_some() && self.server.tls_cert.is_none() {
            return invalid(
                "server.auth_users_file",
                "AUTH is offered over TLS only: set server.tls_cert and tls_key",
            );
        }
        if self.server.max_message_size == 0 || self.server.max_recipients == 0 {
            return invalid("server.max_message_size", "limits must be positive");
        }
        if self.queue.shutdown_grace_secs > 3600 {
            return invalid("queue.shutdown_grace_secs", "must be at most 3600");
        }
        if self.admin.enabled
            && !self.admin.listen.ip().is_loopback()
            && !self.admin.allow_non_loopback
        {
            return invalid(
                "admin.listen",
                "not a loopback address; the admin endpoint has no authentication: set admin.allow_non_loopback = true to expose it",
            );
        }
        if self.log.level.trim().is_empty() {
            return invalid("log.level", "must not be empty");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid("log.level", &format!("not a RUST_LOG-style filter: {e}"));
        }
        let st = &self.storage;
        if st.backend == StorageBackend::Redis {
            match st.redis_url.as_deref() {
                None | Some("") => {
                    return invalid("storage.redis_url", "required with backend = \"redis\"");
                }
                Some(u) if !(u.starts_with("redis://") || u.starts_with("rediss://")) => {
                    return invalid(
                        "storage.redis_url",
                        "must start with redis:// or rediss:// (TLS)",
                    );
                }
                Some(u) if st.redis_ca_file.is_some() && !u.starts_with("rediss://") => {
                    return invalid("storage.redis_ca_file", "needs a rediss:// URL");
                }
                Some(_) => {}
            }
        }
        if st.redis_timeout_ms == 0 || st.redis_timeout_ms > 60_000 {
            return invalid("storage.redis_timeout_ms", "must be between 1 and 60000");
        }
        if st.redis_retry_secs == 0 || st.redis_retry_secs > 3600 {
            return invalid("storage.redis_retry_secs", "must be between 1 and 3600");
        }
        if self.delivery.port == 0 {
            return invalid("delivery.port", "must not be 0");
        }
        if self.delivery.connect_timeout_secs == 0 || self.delivery.command_timeout_secs == 0 {
            return invalid("delivery.connect_timeout_secs", "timeouts must be positive");
        }
        if let Some(sm) = &self.socketmap
            && let Err((key, message)) = sm.validate()
        {
            return invalid(key, &message);
        }
        let r = &self.tlsrpt;
        let is_addr = |a: &str| {
            a.rsplit_once('@').is_some_and(|(l, d)| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_graphic() && !b"<>()[]\\,;:@\"".contains(&b))
                    && crate::dns::is_ldh_domain(d)
            })
        };
        if r.enabled {
            if r.organization_name.trim().is_empty() {
                return invalid(
                    "tlsrpt.organization_name",
                    "required when reports are enabled",
                );
            }
            if !is_addr(&r.contact_info) {
                return invalid(
                    "tlsrpt.contact_info",
                    "must be an e-mail address such as tlsrpt@example.com",
                );
            }
            let contact_domain = r
                .contact_info
                .rsplit_once('@')
                .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
                .unwrap_or_default();
            if r.submitter_domain() != contact_domain {
                return invalid(
                    "tlsrpt.submitter",
                    "must be the domain of tlsrpt.contact_info (RFC 8460 §5.3)",
                );
            }
            if !is_addr(&r.sender()) {
                return invalid("tlsrpt.mail_from", "must be an e-mail address");
            }
            if !crate::dns::is_ldh_domain(&r.dkim_signing_domain()) {
                return invalid("tlsrpt.dkim_domain", "must be a domain name");
            }
            if !crate::dns::is_ldh_domain(&r.dkim_selector) {
                return invalid("tlsrpt.dkim_selector", "must be a DNS label such as tlsrpt");
            }
        }
        if r.https_timeout_secs == 0 || r.https_timeout_secs > 600 {
            return invalid("tlsrpt.https_timeout_secs", "must be between 1 and 600");
        }
        if r.claim_lease_secs < 5 || r.claim_lease_secs > 86_400 {
            return invalid("tlsrpt.claim_lease_secs", "must be between 5 and 86400");
        }
        if r.https_retry_secs == 0 || r.https_retry_secs > 86_400 {
            return invalid("tlsrpt.https_retry_secs", "must be between 1 and 86400");
        }
        if r.give_up_secs == 0 || r.give_up_secs > 7 * 86_400 {
            return invalid("tlsrpt.give_up_secs", "must be between 1 and 604800");
        }
        if r.keep_days == 0 {
            return invalid("tlsrpt.keep_days", "must be positive");
        }
        if r.send_delay_max_secs > 86_400 {
            return invalid("tlsrpt.send_delay_max_secs", "must be at most 86400");
        }
        Ok(())
    }

    /// The EHLO name: `delivery.helo_name` or the machine's host name.
    pub fn helo_name(&self) -> String {
        self.delivery.helo_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "localhost".to_string())
        })
    }

    /// The server's name: `server.hostname` or the EHLO name.
    pub fn server_hostname(&self) -> String {
        self.server
            .hostname
            .clone()
            .unwrap_or_else(|| self.helo_name())
    }

    /// Is `ip` allowed to relay (`server.allow`)?
    pub fn relay_allowed(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.server.allow.iter().any(|n| n.contains(&ip))
    }

    /// DNS per-query timeout.
    pub fn dns_timeout(&self) -> Duration {
        Duration::from_secs(self.dns.timeout_secs.unwrap_or(5))
    }
}

/// The dotted key (`delivery.port`) at which `text` fails to deserialise, if the
/// failure is at a key (not a TOML syntax error).
fn key_of_error(text: &str) -> Option<String> {
    let de = toml::Deserializer::parse(text).ok()?;
    let err = serde_path_to_error::deserialize::<_, Config>(de).err()?;
    let path = err.path().to_string();
    (!path.is_empty() && path != ".").then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_without_a_file() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.delivery.port, 25);
        assert_eq!(c.storage.data_dir, PathBuf::from("./data"));
        assert!(c.dns.nameservers.is_empty());
        assert!(c.tls.extra_roots.is_empty());
    }

    #[test]
    fn required_keys_parse() {
        let c = Config::from_toml(
            "[dns]\nnameservers = [\"127.0.0.1:5353\", \"[::1]:53\"]\n[tls]\nextra_roots = [\"/x/ca.pem\"]\n[storage]\ndata_dir = \"/var/lib/stsrelay\"\n[delivery]\nport = 2525\n",
        )
        .unwrap();
        assert_eq!(c.dns.nameservers.len(), 2);
        assert_eq!(c.tls.extra_roots, vec![PathBuf::from("/x/ca.pem")]);
        assert_eq!(c.storage.data_dir, PathBuf::from("/var/lib/stsrelay"));
        assert_eq!(c.delivery.port, 2525);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml("[dns]\nnameserver = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nameserver"), "{e}");
        let e = Config::from_toml("[bogus]\n").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::from_toml("[dns]\nnameservers = [\"1.2.3.4\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nameservers"), "{e}");
    }

    #[test]
    fn dnssec_defaults_on_with_the_builtin_anchor() {
        let c = Config::from_toml("").unwrap();
        assert!(c.dns.dnssec);
        assert_eq!(c.dns.trust_anchor, None);
        let c = Config::from_toml("[dns]\ndnssec = false\n").unwrap();
        assert!(!c.dns.dnssec);
    }

    #[test]
    fn trust_anchor_file_is_checked_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.keys");
        let toml = |p: &Path| format!("[dns]\ntrust_anchor = \"{}\"\n", p.display());
        let e = Config::from_toml(&toml(&missing)).unwrap_err().to_string();
        assert!(
            e.contains("dns.trust_anchor") && e.contains("missing.keys"),
            "{e}"
        );
        let ds = dir.path().join("ds.keys");
        std::fs::write(
            &ds,
            "test. 3600 IN DS 2371 13 2 1F987CC6583E92DF0890718C42\n",
        )
        .unwrap();
        let e = Config::from_toml(&toml(&ds)).unwrap_err().to_string();
        assert!(
            e.contains("dns.trust_anchor") && e.contains("ds.keys") && e.contains("DNSKEY"),
            "{e}"
        );
        let good = dir.path().join("good.keys");
        std::fs::write(
            &good,
            "test. 3600 IN DNSKEY 257 3 13 mdsswUyr3DPW132mOi8V9xESWE8jTo0dxCjjnopKl+GqJxpVXckHAeF+KkxLbxILfDLUT0rAK9iUzy1L53eKGQ==\n",
        )
        .unwrap();
        let c = Config::from_toml(&toml(&good)).unwrap();
        assert_eq!(c.dns.trust_anchor.as_deref(), Some(good.as_path()));
    }

    #[test]
    fn relay_allow_list() {
        let c = Config::default();
        assert!(c.relay_allowed("127.0.0.1".parse().unwrap()));
        assert!(c.relay_allowed("::1".parse().unwrap()));
        assert!(c.relay_allowed("::ffff:127.0.0.9".parse().unwrap()));
        assert!(!c.relay_allowed("192.0.2.7".parse().unwrap()));
        let c = Config::from_toml("[server]\nallow = [\"192.0.2.0/24\"]\n").unwrap();
        assert!(c.relay_allowed("192.0.2.7".parse().unwrap()));
        assert!(!c.relay_allowed("127.0.0.1".parse().unwrap()));
        assert!(Config::from_toml("[server]\nallow = [\"not-a-net\"]\n").is_err());
    }

    #[test]
    fn backoff_below_five_minutes_is_refused() {
        let e = Config::from_toml("[sts]\nfetch_backoff_secs = 10\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sts.fetch_backoff_secs"), "{e}");
    }

    #[test]
    fn redis_backend_needs_a_redis_url() {
        let err = |t: &str| Config::from_toml(t).unwrap_err().to_string();
        let e = err("[storage]\nbackend = \"redis\"\n");
        assert!(
            e.contains("storage.redis_url") && e.contains("required"),
            "{e}"
        );
        let e = err("[storage]\nbackend = \"redis\"\nredis_url = \"http://x\"\n");
        assert!(e.contains("redis:// or rediss://"), "{e}");
        let e = err(
            "[storage]\nbackend = \"redis\"\nredis_url = \"redis://x\"\nredis_ca_file = \"/ca.pem\"\n",
        );
        assert!(e.contains("storage.redis_ca_file"), "{e}");
        let e = err("[storage]\nbackend = \"mysql\"\n");
        assert!(
            e.contains("storage.backend") || e.contains("backend"),
            "{e}"
        );
        let e = err("[storage]\nredis_timeout_ms = 0\n");
        assert!(e.contains("storage.redis_timeout_ms"), "{e}");
        let c = Config::from_toml(
            "[storage]\nbackend = \"redis\"\nredis_url = \"rediss://:pw@db:6380/1\"\n",
        )
        .unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Redis);
        let e = err("[tlsrpt]\nclaim_lease_secs = 1\n");
        assert!(e.contains("tlsrpt.claim_lease_secs"), "{e}");
    }

    #[test]
    fn tlsrpt_needs_an_identity_when_enabled() {
        let e = Config::from_toml("[tlsrpt]\nenabled = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tlsrpt.organization_name"), "{e}");
        let e = Config::from_toml(
            "[tlsrpt]\nenabled = true\norganization_name = \"X\"\ncontact_info = \"nobody\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tlsrpt.contact_info"), "{e}");
        let c = Config::from_toml(
            "[tlsrpt]\nenabled = true\norganization_name = \"X\"\ncontact_info = \"r@Mail.Example.COM\"\n",
        )
        .unwrap();
        assert_eq!(c.tlsrpt.submitter_domain(), "mail.example.com");
        assert_eq!(c.tlsrpt.sender(), "tlsrpt-noreply@mail.example.com");
        assert_eq!(c.tlsrpt.dkim_signing_domain(), "mail.example.com");
        let e = Config::from_toml(
            "[tlsrpt]\nenabled = true\norganization_name = \"X\"\ncontact_info = \"r@a.example\"\nsubmitter = \"b.example\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tlsrpt.submitter"), "{e}");
        let e = Config::from_toml("[tlsrpt]\nkeep_days = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tlsrpt.keep_days"), "{e}");
        let e = Config::from_toml("[tlsrpt]\nhttps_retry_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tlsrpt.https_retry_secs"), "{e}");
    }

    #[test]
    fn admin_is_loopback_unless_allowed() {
        let c = Config::default();
        assert_eq!(c.admin.listen, "127.0.0.1:9725".parse().unwrap());
        let e = Config::from_toml("[admin]\nlisten = \"0.0.0.0:9725\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin.listen"), "{e}");
        let c =
            Config::from_toml("[admin]\nlisten = \"0.0.0.0:9725\"\nallow_non_loopback = true\n")
                .unwrap();
        assert!(!c.admin.listen.ip().is_loopback());
        let c = Config::from_toml("[admin]\nlisten = \"[::1]:9725\"\n").unwrap();
        assert!(c.admin.listen.ip().is_loopback());
    }

    #[test]
    fn log_format_is_text_or_json() {
        assert_eq!(Config::default().log.format, LogFormat::Text);
        let c = Config::from_toml("[log]\nformat = \"json\"\n").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let e = Config::from_toml("[log]\nformat = \"xml\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("xml"), "{e}");
        let e = Config::from_toml("[log]\nlevel = \"stsrelay=loud\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("log.level"), "{e}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[delivery]\nport = \"x\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("c.toml") && e.contains("key delivery.port"),
            "{e}"
        );
        std::fs::write(&p, "[server]\nlisten = \"1.2.3.4\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("c.toml") && e.contains("key server.listen"),
            "{e}"
        );
        std::fs::write(&p, "[dns]\nnameservers = [\"1.2.3.4:53\", \"x\"]\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("key dns.nameservers[1]"), "{e}");
    }
}

#[cfg(test)]
mod example_file {
    #[test]
    fn config_example_toml_parses_and_matches_the_defaults() {
        let text = include_str!("../config.example.toml");
        let c = super::Config::from_toml(text).unwrap();
        let d = super::Config::default();
        assert_eq!(format!("{:?}", c.sts), format!("{:?}", d.sts));
        assert_eq!(format!("{:?}", c.delivery), format!("{:?}", d.delivery));
        assert_eq!(format!("{:?}", c.storage), format!("{:?}", d.storage));
        assert_eq!(c.dns_timeout(), d.dns_timeout());
        assert_eq!(c.dns.nameservers, d.dns.nameservers);
        assert_eq!(c.dns.dnssec, d.dns.dnssec);
        assert_eq!(c.dns.trust_anchor, d.dns.trust_anchor);
        assert_eq!(format!("{:?}", c.server), format!("{:?}", d.server));
        assert_eq!(format!("{:?}", c.queue), format!("{:?}", d.queue));
        assert_eq!(format!("{:?}", c.tlsrpt), format!("{:?}", d.tlsrpt));
        assert_eq!(format!("{:?}", c.admin), format!("{:?}", d.admin));
        assert_eq!(format!("{:?}", c.log), format!("{:?}", d.log));
        assert_eq!(
            c.socketmap, None,
            "[socketmap] is commented out: present = enabled"
        );
    }

    /// The commented `[socketmap]` block, uncommented, is exactly the defaults.
    #[test]
    fn config_example_socketmap_block_is_the_defaults() {
        let text = include_str!("../config.example.toml");
        let start = text.find("# [socketmap]").expect("socketmap block");
        let block: String = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = super::Config::from_toml(&block).unwrap();
        let sm = c.socketmap.expect("section parsed");
        let mut d = crate::socketmap::SocketmapConfig::default();
        // The example also shows one zone.
        d.zones.insert(
            "strict".into(),
            crate::socketmap::ZoneConfig {
                strict_testing: true,
                ..Default::default()
            },
        );
        assert_eq!(sm, d, "{block}");
    }
}
