//! The socketmap server: listeners (TCP, unix), one task per connection, requests
//! answered in order from the shared policy engine.

use super::SocketmapError;
use super::dane::{DaneDecision, DaneLookup, DnssecLookup, NextHopDane, dane_decision};
use super::netstring::{self, MAX_REQUEST};
use super::reply::{Decision, Reply, decide, match_names, needs_mx_hosts, secure_reply};
use super::request::{Key, Request, normalize_key};
use super::zones::SocketmapConfig;
use crate::dns::{DnsError, MxAnswer, Resolver};
use crate::sts::Engine;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Bytes read from a connection at a time.
const CHUNK: usize = 4096;

/// How long a domain's MX host list is reused. Short DNS TTLs would otherwise put a
/// DNS round trip on Postfix's path. Safe: only names the policy permits are ever
/// rendered, so a stale list can only leave out a new MX (Postfix defers to it) or
/// keep a removed one that the policy still permits.
const MX_CACHE: Duration = Duration::from_secs(60);
/// Most MX lists kept; past it the cache starts over.
const MX_CACHE_ENTRIES: usize = 100_000;

/// Domain -> (when looked up, MX host names).
type MxCache = std::sync::RwLock<std::collections::HashMap<String, (Instant, Arc<[String]>)>>;
/// (domain, bracketed) -> (when looked up, DNSSEC facts); reused for [`MX_CACHE`] like
/// the MX hosts. A stale entry errs towards DANE for at most that long (a host that
/// dropped its TLSA records is deferred by Postfix's own lookups, never downgraded).
type DaneCache =
    std::sync::RwLock<std::collections::HashMap<(String, bool), (Instant, Arc<NextHopDane>)>>;

/// MX lookups, the one DNS query the socketmap makes itself (to render wildcard
/// patterns). [`Resolver`] implements it; tests and embedders may supply their own.
#[async_trait::async_trait]
pub trait MxLookup: Send + Sync {
    /// The MX records of `domain`.
    async fn mx(&self, domain: &str) -> Result<MxAnswer, DnsError>;
}

#[async_trait::async_trait]
impl MxLookup for Resolver {
    async fn mx(&self, domain: &str) -> Result<MxAnswer, DnsError> {
        Resolver::mx(self, domain).await
    }
}

/// Counters for operators and tests.
#[derive(Debug, Default)]
pub struct SocketmapStats {
    /// Requests answered.
    pub requests: AtomicU64,
    /// `OK secure` replies.
    pub secure: AtomicU64,
    /// `TEMP` replies.
    pub temp: AtomicU64,
    /// `OK dane-only` and `OK dane` replies.
    pub dane: AtomicU64,
    /// Connections closed for bad framing or oversize requests.
    pub bad_frames: AtomicU64,
}

/// The Postfix TLS-policy server. Cheap to clone.
///
/// ```
/// use std::sync::Arc;
/// use stsrelay::dns::{DnsError, MxAnswer, Mx, TxtLookup};
/// use stsrelay::socketmap::{MxLookup, Reply, Server, SocketmapConfig};
/// use stsrelay::store::MemoryStore;
/// use stsrelay::sts::{Engine, FetchError, Policy, PolicyFetcher};
///
/// struct Dns;
/// #[async_trait::async_trait]
/// impl TxtLookup for Dns {
///     async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
///         Ok(if name == "_mta-sts.example.com" { vec!["v=STSv1; id=1".into()] } else { vec![] })
///     }
/// }
/// #[async_trait::async_trait]
/// impl MxLookup for Dns {
///     async fn mx(&self, _domain: &str) -> Result<MxAnswer, DnsError> {
///         Ok(MxAnswer::Hosts(vec![Mx { preference: 10, host: "mx1.example.com".into() },
///                                 Mx { preference: 20, host: "a.b.example.com".into() }]))
///     }
/// }
/// struct Web;
/// #[async_trait::async_trait]
/// impl PolicyFetcher for Web {
///     async fn fetch(&self, _d: &str) -> Result<Policy, FetchError> {
///         Ok(Policy::parse("version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 86400\n").unwrap())
///     }
/// }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let engine = Engine::builder(Arc::new(Dns), Arc::new(Web), Arc::new(MemoryStore::default())).build();
/// let server = Server::new(engine, Arc::new(Dns), SocketmapConfig::default());
/// assert_eq!(server.answer(b"postfix Example.COM.").await.text(),
///            "OK secure match=mx1.example.com servername=hostname");
/// assert_eq!(server.answer(b"postfix example.org").await, Reply::NotFound);
/// assert_eq!(server.answer(b"postfix .example.com").await, Reply::NotFound);
/// # });
/// ```
#[derive(Clone)]
pub struct Server {
    inner: Arc<Shared>,
}

struct Shared {
    engine: Engine,
    mx: Arc<dyn MxLookup>,
    mx_cache: MxCache,
    dane: Option<Arc<dyn DaneLookup>>,
    dane_cache: DaneCache,
    cfg: SocketmapConfig,
    stats: SocketmapStats,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

/// Bound listeners, ready to [`Server::serve`].
#[derive(Debug)]
pub struct Listeners {
    tcp: Vec<TcpListener>,
    unix: Option<UnixListener>,
}

impl Listeners {
    /// The bound TCP addresses (useful with port 0).
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
}

impl Server {
    /// A server answering from `engine` (shared with the relay when run inside
    /// `stsrelay run`), resolving MX hosts with `mx`; no DANE (see
    /// [`Server::with_dane`]).
    pub fn new(engine: Engine, mx: Arc<dyn MxLookup>, cfg: SocketmapConfig) -> Server {
        Self::build(engine, mx, None, cfg)
    }

    /// Like [`Server::new`], with DANE replies (`dane-only`, `dane`) from the DNSSEC
    /// facts `dane` gathers, in zones with `dane = true`.
    pub fn with_dane(
        engine: Engine,
        mx: Arc<dyn MxLookup>,
        dane: Arc<dyn DaneLookup>,
        cfg: SocketmapConfig,
    ) -> Server {
        Self::build(engine, mx, Some(dane), cfg)
    }

    fn build(
        engine: Engine,
        mx: Arc<dyn MxLookup>,
        dane: Option<Arc<dyn DaneLookup>>,
        cfg: SocketmapConfig,
    ) -> Server {
        Server {
            inner: Arc::new(Shared {
                engine,
                mx,
                mx_cache: Default::default(),
                dane,
                dane_cache: Default::default(),
                cfg,
                stats: SocketmapStats::default(),
            }),
        }
    }

    /// The engine (cache in memory, the store `[storage]` names) and resolver the
    /// relay would build from `cfg`, and `cfg.socketmap` (or its defaults).
    pub fn from_config(cfg: &crate::Config) -> Result<Server, SocketmapError> {
        let store = crate::store::Backend::open(cfg)
            .map_err(|e| SocketmapError::Unavailable(format!("policy store ([storage]): {e}")))?;
        Self::with_store(cfg, store.policies())
    }

    /// Like [`Server::from_config`], with the policy store given.
    pub fn with_store(
        cfg: &crate::Config,
        store: Arc<dyn crate::store::PolicyStore>,
    ) -> Result<Server, SocketmapError> {
        let setup =
            |what: &str, e: &dyn std::fmt::Display| SocketmapError::Setup(format!("{what}: {e}"));
        let resolver =
            Resolver::from_config(cfg).map_err(|e| setup("DNS (dns.nameservers)", &e))?;
        let trust =
            crate::tls::TrustStore::from_config(cfg).map_err(|e| setup("trust store", &e))?;
        let fetcher = crate::sts::HttpsFetcher::new(
            resolver.clone(),
            &trust,
            crate::sts::FetchOptions::from_config(cfg),
        )
        .map_err(|e| setup("policy fetcher", &e))?;
        let engine = Engine::builder(Arc::new(resolver.clone()), Arc::new(fetcher), store)
            .options(crate::sts::EngineOptions::from_config(cfg))
            .build();
        let dane = DnssecLookup::new(resolver.clone(), cfg.delivery.port);
        Ok(Server::with_dane(
            engine,
            Arc::new(resolver),
            Arc::new(dane),
            cfg.socketmap.clone().unwrap_or_default(),
        ))
    }

    /// The policy engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Counters.
    pub fn stats(&self) -> &SocketmapStats {
        &self.inner.stats
    }

    /// Answer one request payload (`NAME KEY`, without netstring framing).
    pub async fn answer(&self, payload: &[u8]) -> Reply {
        let s = &self.inner;
        s.stats.requests.fetch_add(1, Ordering::Relaxed);
        let Some(req) = Request::parse(payload) else {
            tracing::debug!("socketmap request is not UTF-8");
            return Reply::NotFound;
        };
        let zone = s.cfg.zone(req.name);
        let (domain, bracketed) = match normalize_key(req.key) {
            Key::Domain { domain, bracketed } => (domain, bracketed),
            Key::NotADomain => {
                tracing::debug!(key = %req.key, "socketmap key is not a policy domain");
                return Reply::NotFound;
            }
        };
        let dane_lookup = async {
            match &s.dane {
                Some(_) if zone.dane => Some(self.next_hop_dane(&domain, bracketed).await),
                _ => None,
            }
        };
        let (lookup, dane) = tokio::join!(s.engine.policy(&domain), dane_lookup);
        let decision = match &lookup {
            Ok(l) => decide(l, zone),
            Err(e) => {
                tracing::debug!(%domain, error = %e, "no policy lookup");
                Decision::NotFound
            }
        };
        let sts_applies = matches!(decision, Decision::Secure(_));
        match dane {
            None => {}
            Some(Ok(facts)) => match dane_decision(&facts, sts_applies) {
                DaneDecision::Sts => {}
                d => {
                    s.stats.dane.fetch_add(1, Ordering::Relaxed);
                    let reply = Reply::Ok(
                        if d == DaneDecision::DaneOnly {
                            "dane-only"
                        } else {
                            "dane"
                        }
                        .into(),
                    );
                    tracing::debug!(%domain, dane = ?facts, sts_applies, reply = %reply.text(),
                        "socketmap: DANE applies; Postfix's DANE decides");
                    return reply;
                }
            },
            // Without knowing the DANE facts, an MTA-STS `secure` answer might override
            // Postfix's DANE (RFC 8461 §2): defer. With no MTA-STS policy Postfix keeps
            // its own default (and its own DANE, if configured).
            Some(Err(e)) if sts_applies => {
                s.stats.temp.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%domain, error = %e, "socketmap: DNSSEC lookups failed; deferring");
                return Reply::Temp(format!("DNSSEC lookups for {domain} failed"));
            }
            Some(Err(e)) => {
                tracing::warn!(%domain, error = %e, "socketmap: DNSSEC lookups failed");
            }
        }
        let cached = match decision {
            Decision::NotFound => {
                tracing::debug!(%domain, mode = ?lookup.ok().and_then(|l| l.mode()), "socketmap: NOTFOUND");
                return Reply::NotFound;
            }
            Decision::Secure(p) => p,
        };
        let policy = &cached.policy;
        let (hosts, dns_error) = if !needs_mx_hosts(policy) {
            (None, None)
        } else if bracketed {
            (Some(Arc::from(vec![domain.clone()])), None)
        } else {
            match self.mx_hosts(&domain).await {
                Ok(hosts) => (Some(hosts), None),
                Err(e) => (None, Some(e)),
            }
        };
        let names = match_names(policy, hosts.as_deref());
        if names.is_empty() {
            s.stats.temp.fetch_add(1, Ordering::Relaxed);
            let reason = match dns_error {
                Some(e) => {
                    tracing::warn!(%domain, error = %e, "socketmap: MX lookup failed; deferring");
                    format!("MX lookup of {domain} failed")
                }
                None => {
                    let patterns: Vec<String> = policy.mx.iter().map(|p| p.to_string()).collect();
                    tracing::warn!(%domain, allowed = %patterns.join(", "),
                        "socketmap: no MX host is permitted by the MTA-STS policy; deferring");
                    format!("no MX host of {domain} is permitted by its MTA-STS policy")
                }
            };
            return Reply::Temp(reason);
        }
        s.stats.secure.fetch_add(1, Ordering::Relaxed);
        let reply = secure_reply(&domain, policy, &names, zone);
        tracing::debug!(%domain, reply = %reply.text(), "socketmap: secure");
        reply
    }

    /// The MX host names of `domain` (the domain itself without MX records, none for a
    /// null MX or NXDOMAIN), reused for [`MX_CACHE`].
    async fn mx_hosts(&self, domain: &str) -> Result<Arc<[String]>, DnsError> {
        let s = &self.inner;
        let now = Instant::now();
        if let Some((at, hosts)) = s
            .mx_cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(domain)
            && now.duration_since(*at) < MX_CACHE
        {
            return Ok(hosts.clone());
        }
        let hosts: Arc<[String]> = match s.mx.mx(domain).await? {
            MxAnswer::Hosts(v) => v.into_iter().map(|m| m.host).collect(),
            MxAnswer::Implicit => Arc::from(vec![domain.to_string()]),
            MxAnswer::Null | MxAnswer::NxDomain => Arc::from(Vec::new()),
        };
        let mut cache = s.mx_cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MX_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(domain.to_string(), (now, hosts.clone()));
        Ok(hosts)
    }

    /// The DNSSEC facts of a next hop, reused for [`MX_CACHE`].
    async fn next_hop_dane(
        &self,
        domain: &str,
        bracketed: bool,
    ) -> Result<Arc<NextHopDane>, DnsError> {
        let s = &self.inner;
        let Some(lookup) = &s.dane else {
            return Ok(Arc::new(NextHopDane::NotApplicable));
        };
        let key = (domain.to_string(), bracketed);
        let now = Instant::now();
        if let Some((at, facts)) = s
            .dane_cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            && now.duration_since(*at) < MX_CACHE
        {
            return Ok(facts.clone());
        }
        let facts = Arc::new(lookup.next_hop(domain, bracketed).await?);
        let mut cache = s.dane_cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MX_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, (now, facts.clone()));
        Ok(facts)
    }

    /// Bind the configured TCP addresses and unix socket.
    pub async fn bind(&self) -> Result<Listeners, SocketmapError> {
        let cfg = &self.inner.cfg;
        let mut tcp = Vec::new();
        for addr in &cfg.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| SocketmapError::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
            tcp.push(l);
        }
        let unix = match &cfg.unix_path {
            Some(path) => Some(bind_unix(path, cfg.unix_mode, cfg.unix_owner.as_deref())?),
            None => None,
        };
        Ok(Listeners { tcp, unix })
    }

    /// Serve on bound listeners until the future is dropped.
    pub async fn serve(self, listeners: Listeners) {
        let limit = Arc::new(Semaphore::new(self.inner.cfg.max_connections));
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners.tcp {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "socketmap listening");
            }
            tasks.spawn(self.clone().accept_loop(l, limit.clone()));
        }
        if let Some(l) = listeners.unix {
            tracing::info!(path = ?self.inner.cfg.unix_path, "socketmap listening");
            tasks.spawn(self.clone().accept_loop(l, limit.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Accept connections while a connection slot is free; one task per connection.
    async fn accept_loop<L: Accept>(self, listener: L, limit: Arc<Semaphore>) {
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            match listener.accept_one().await {
                Ok((stream, peer)) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.connection(stream, &peer).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "socketmap: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Serve one connection: requests are answered in order; several may be in one
    /// read (pipelined) and their replies go out in one write. Bad framing or an
    /// oversize request ends this connection only, after the replies before it.
    pub async fn connection<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S, peer: &str) {
        let cfg = &self.inner.cfg;
        let idle = Duration::from_secs(cfg.idle_timeout_secs);
        let io = Duration::from_secs(cfg.io_timeout_secs);
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
        let mut chunk = vec![0u8; CHUNK];
        let mut out: Vec<u8> = Vec::with_capacity(256);
        // Deadline of the request whose first bytes are in `buf`.
        let mut request_deadline: Option<Instant> = None;
        loop {
            let mut pos = 0;
            let broken = loop {
                match netstring::decode(&buf[pos..], MAX_REQUEST) {
                    Ok(Some(f)) => {
                        let payload = &buf[pos + f.payload.start..pos + f.payload.end];
                        self.answer(payload).await.encode(&mut out);
                        pos += f.consumed;
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            buf.drain(..pos);
            if pos > 0 {
                request_deadline = None;
            }
            if !out.is_empty() {
                match tokio::time::timeout(io, stream.write_all(&out)).await {
                    Ok(Ok(())) => out.clear(),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "socketmap: write failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "socketmap: write timed out");
                        return;
                    }
                }
            }
            if let Some(e) = broken {
                self.inner.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, error = %e, "socketmap: bad request framing; closing the connection");
                let _ = stream.shutdown().await;
                return;
            }
            let deadline = if buf.is_empty() {
                Instant::now() + idle
            } else {
                *request_deadline.get_or_insert_with(|| Instant::now() + io)
            };
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(0)) => return,
                Ok(Ok(n)) => {
                    if buf.is_empty() {
                        request_deadline = Some(Instant::now() + io);
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "socketmap: read failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, partial = !buf.is_empty(), "socketmap: connection timed out");
                    return;
                }
            }
        }
    }
}

/// A listener the server accepts from: TCP (with `TCP_NODELAY`, so each reply goes out
/// at once) or a unix socket.
trait Accept: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection and a name of its peer for logs.
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Accept for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, peer) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer.to_string()))
    }
}

impl Accept for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, "unix".to_string()))
    }
}

/// Bind a unix socket at `path` (replacing a stale socket, never another file), with
/// `mode` and optionally `owner` (`user[:group]`).
fn bind_unix(path: &Path, mode: u32, owner: Option<&str>) -> Result<UnixListener, SocketmapError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |message: String| SocketmapError::Unix {
        path: path.to_path_buf(),
        message,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| err(format!("cannot remove the old socket: {e}")))?,
        Ok(_) => return Err(err("exists and is not a socket".into())),
        Err(_) => {}
    }
    let l = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err(format!("cannot set mode {mode:#o}: {e}")))?;
    if let Some(owner) = owner {
        let (uid, gid) = resolve_owner(owner).map_err(err)?;
        std::os::unix::fs::chown(path, uid, gid)
            .map_err(|e| err(format!("cannot chown to {owner}: {e}")))?;
    }
    Ok(l)
}

/// `user[:group]` (names from /etc/passwd and /etc/group, or numeric ids).
fn resolve_owner(owner: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let (user, group) = match owner.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (owner, None),
    };
    let id = |name: &str, file: &str, col: usize| -> Result<Option<u32>, String> {
        if name.is_empty() {
            return Ok(None);
        }
        if let Ok(n) = name.parse::<u32>() {
            return Ok(Some(n));
        }
        let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
        text.lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .and_then(|f| f.get(col).and_then(|v| v.parse().ok()))
            .map(Some)
            .ok_or_else(|| format!("no {name:?} in {file}"))
    };
    Ok((
        id(user, "/etc/passwd", 2)?,
        match group {
            Some(g) => id(g, "/etc/group", 2)?,
            None => None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_resolve_from_ids_and_names() {
        assert_eq!(resolve_owner("0").unwrap(), (Some(0), None));
        assert_eq!(resolve_owner("0:0").unwrap(), (Some(0), Some(0)));
        assert_eq!(resolve_owner("root:root").unwrap(), (Some(0), Some(0)));
        assert_eq!(resolve_owner(":0").unwrap(), (None, Some(0)));
        assert!(resolve_owner("no-such-user-here").is_err());
    }
}
