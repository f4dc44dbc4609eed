//! `stsrelay run`: the relay's parts wired together — the SMTP listener (inbound),
//! the spool, the scheduler and delivery under the MTA-STS engine — and its life
//! cycle: readiness, SIGHUP reload, graceful SIGTERM shutdown, the admin endpoint.

use crate::Config;
use crate::delivery::Deliverer;
use crate::dns::Resolver;
use crate::ops::admin::{AdminSource, MetricsRender};
use crate::ops::signals::Control;
use crate::ops::status::{PolicyRow, Status};
use crate::queue::scheduler::Scheduler;
use crate::queue::spool::{Envelope, Notify, RecipientSpec, Ret, Spool};
use crate::smtp::auth::UserFile;
use crate::smtp::inbound::{self, InboundEnvelope, MessageSink, SessionConfig, Shutdown};
use crate::store::Backend;
use crate::sts::{Engine, EngineOptions, FetchOptions, HttpsFetcher};
use crate::tls::TrustStore;
use crate::tlsrpt::{ReportService, SessionRecorder, StoreRecorder};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

/// Most inbound connections served at once; more wait in the listen backlog.
const MAX_INBOUND: usize = 10_000;

/// Keys a SIGHUP applies to new SMTP sessions at once; every other key needs a restart.
pub const LIVE_KEYS: &[&str] = &[
    "server.allow",
    "server.hostname",
    "server.max_message_size",
    "server.max_recipients",
    "server.idle_timeout_secs",
    "server.tls_cert",
    "server.tls_key",
    "server.auth_users_file",
];

/// Why the relay could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A configured part is unusable (message names the config key): exit 78.
    #[error("{0}")]
    Setup(String),
    /// A resource is unavailable now (spool, store, a port in use): exit 75.
    #[error("{0}")]
    Unavailable(String),
    /// The listener failed.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Listen {
        /// Address.
        addr: std::net::SocketAddr,
        /// The config key of the address.
        key: &'static str,
        /// Error.
        source: std::io::Error,
    },
}

impl RelayError {
    /// Is this a configuration problem (exit 78) rather than a temporary one (75)?
    pub fn is_config(&self) -> bool {
        matches!(self, RelayError::Setup(_))
    }
}

/// What a SIGHUP can change while running: the config as last loaded and what is
/// built from its `[server]` section.
struct Live {
    cfg: Config,
    tls: Option<tokio_rustls::TlsAcceptor>,
    users: Option<UserFile>,
}

impl Live {
    fn build(cfg: Config) -> Result<Live, RelayError> {
        let tls = match (&cfg.server.tls_cert, &cfg.server.tls_key) {
            (Some(cert), Some(key)) => Some(acceptor(cert, key)?),
            _ => None,
        };
        let users = match &cfg.server.auth_users_file {
            Some(path) => {
                Some(UserFile::load(path).map_err(setup("SMTP AUTH (server.auth_users_file)"))?)
            }
            None => None,
        };
        Ok(Live { cfg, tls, users })
    }
}

/// Readiness as `/readyz` reports it.
#[derive(Debug, Default)]
struct Readiness {
    /// The SMTP listener is bound and accepting.
    listening: AtomicBool,
    /// The spool is open and the last message could be stored.
    spool: AtomicBool,
    /// The policy store is open.
    store: AtomicBool,
}

/// The running relay's shared parts.
pub struct Relay {
    /// The config the relay started with (keys that need a restart).
    cfg: Config,
    live: Arc<RwLock<Arc<Live>>>,
    spool: Spool,
    scheduler: Scheduler,
    engine: Engine,
    ready: Arc<Readiness>,
    started: i64,
    socketmap: Option<crate::socketmap::Server>,
    reports: Option<Arc<ReportService>>,
    store: Backend,
}

/// Say at start whether DNSSEC validation works through `dns.nameservers`: if it does
/// not, every MX comes back bogus and all mail is deferred (fail closed, never a
/// silent loss of DANE).
pub(crate) async fn dnssec_selfcheck(resolver: &Resolver) {
    let check = tokio::time::timeout(Duration::from_secs(15), resolver.dnssec_selfcheck()).await;
    match check {
        Ok(None) => tracing::info!("DNSSEC off (dns.dnssec = false): no DANE"),
        Ok(Some(Ok(crate::dns::Security::Secure))) => {
            tracing::info!("DNSSEC validation works: DANE is on")
        }
        Ok(Some(Ok(s))) => tracing::error!(status = %s,
            "DNSSEC validation does not work through dns.nameservers (they must return DNSSEC records, or dns.trust_anchor is wrong): every domain will be deferred as dnssec-invalid; fix the resolver or set dns.dnssec = false"),
        Ok(Some(Err(e))) => tracing::warn!(error = %e, "cannot check DNSSEC validation at start"),
        Err(_) => tracing::warn!("cannot check DNSSEC validation at start: no answer within 15 s"),
    }
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> RelayError + '_ {
    move |e| RelayError::Setup(format!("{what}: {e}"))
}

fn unavailable<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> RelayError + '_ {
    move |e| RelayError::Unavailable(format!("{what}: {e}"))
}

impl Relay {
    /// Open the spool under `storage.data_dir` and build every part from `cfg`, with
    /// `store` (opened from `cfg` by [`Backend::open`]) for policies and TLS-RPT.
    /// Nothing listens yet.
    pub async fn new(
        cfg: Config,
        store: Backend,
        recorder: Arc<dyn SessionRecorder>,
    ) -> Result<Relay, RelayError> {
        let data_dir = cfg.storage.data_dir.clone();
        let spool = tokio::task::spawn_blocking(move || Spool::open(&data_dir))
            .await
            .map_err(unavailable("spool"))?
            .map_err(unavailable("spool (storage.data_dir)"))?;
        let resolver = Resolver::from_config(&cfg).map_err(setup("DNS (dns.nameservers)"))?;
        dnssec_selfcheck(&resolver).await;
        let trust =
            TrustStore::from_config(&cfg).map_err(setup("trust store (tls.extra_roots)"))?;
        let fetcher = HttpsFetcher::new(resolver.clone(), &trust, FetchOptions::from_config(&cfg))
            .map_err(setup("policy fetcher"))?;
        let engine = Engine::builder(
            Arc::new(resolver.clone()),
            Arc::new(fetcher),
            store.policies(),
        )
        .options(EngineOptions::from_config(&cfg))
        .build();
        let reports = if cfg.tlsrpt.enabled {
            Some(
                ReportService::new(
                    &cfg,
                    store.reports(),
                    resolver.clone(),
                    &trust,
                    spool.clone(),
                )
                .map_err(setup("TLS-RPT reports"))?,
            )
        } else {
            None
        };
        // The socketmap server answers from the same engine (cache and store).
        let socketmap = cfg.socketmap.clone().map(|sm| {
            crate::socketmap::Server::new(engine.clone(), Arc::new(resolver.clone()), sm)
        });
        let deliverer = Arc::new(Deliverer::new(
            &cfg,
            engine.clone(),
            resolver,
            trust,
            recorder,
        ));
        let scheduler = Scheduler::new(spool.clone(), deliverer, &cfg.queue, cfg.server_hostname());
        let reports = reports.map(|r| {
            let s = scheduler.clone();
            Arc::new(r.on_spooled(Arc::new(move |id| {
                let s = s.clone();
                tokio::spawn(async move { s.submit(id).await });
            })))
        });
        let live = Live::build(cfg.clone())?;
        let ready = Arc::new(Readiness::default());
        ready.spool.store(true, Ordering::SeqCst);
        ready.store.store(true, Ordering::SeqCst);
        Ok(Relay {
            cfg,
            live: Arc::new(RwLock::new(Arc::new(live))),
            spool,
            scheduler,
            engine,
            ready,
            started: crate::clock::Clock::now(&crate::clock::SystemClock),
            socketmap,
            reports,
            store,
        })
    }

    /// The spool.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What the admin endpoint shows of this relay.
    pub fn admin_source(&self) -> Arc<dyn AdminSource> {
        Arc::new(RelayStatus {
            live: self.live.clone(),
            spool: self.spool.clone(),
            scheduler: self.scheduler.clone(),
            engine: self.engine.clone(),
            ready: self.ready.clone(),
            started: self.started,
            reports: self.reports.clone(),
            store: self.store.clone(),
        })
    }

    /// Re-read the config file and rebuild what [`LIVE_KEYS`] cover (re-reading the
    /// TLS certificate and the AUTH users file even when their paths are unchanged).
    /// New SMTP sessions use the result; open ones keep theirs. Returns the sections
    /// whose changes need a restart. On error the running config stays.
    pub fn reload(&self) -> Result<Vec<&'static str>, RelayError> {
        let Some(path) = self.cfg.source() else {
            return Err(RelayError::Setup(
                "started without --config: nothing to reload".into(),
            ));
        };
        let new = Config::load(path).map_err(|e| RelayError::Setup(e.to_string()))?;
        let restart = needs_restart(&self.cfg, &new);
        let live = Live::build(new)
            .map_err(|e| RelayError::Setup(format!("config file {}: {e}", path.display())))?;
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
        Ok(restart)
    }

    fn apply_reload(&self) {
        crate::ops::notify::reloading();
        match self.reload() {
            Ok(restart) if restart.is_empty() => {
                crate::ops::metrics::config_reload(true);
                tracing::info!(live = %LIVE_KEYS.join(", "), "configuration reloaded");
            }
            Ok(restart) => {
                crate::ops::metrics::config_reload(true);
                tracing::warn!(live = %LIVE_KEYS.join(", "), needs_restart = %restart.join(", "),
                    "configuration reloaded; changes to these sections take effect after a restart");
            }
            Err(e) => {
                crate::ops::metrics::config_reload(false);
                tracing::error!(error = %e, "configuration reload failed; the running configuration stays");
            }
        }
        crate::ops::notify::ready("reloaded");
    }

    /// `[socketmap]`, if configured: bind its listeners and answer from this relay's
    /// engine until the returned guard is dropped (keep it past the graceful shutdown).
    /// Called before the SMTP listener is bound, so the socketmap is ready once SMTP is.
    async fn start_socketmap(&self) -> Result<Option<AbortOnDrop<()>>, RelayError> {
        let Some(server) = &self.socketmap else {
            return Ok(None);
        };
        let listeners = server.bind().await.map_err(|e| match e {
            crate::socketmap::SocketmapError::Setup(m) => RelayError::Setup(m),
            other => RelayError::Unavailable(other.to_string()),
        })?;
        Ok(Some(AbortOnDrop(tokio::spawn(
            server.clone().serve(listeners),
        ))))
    }

    /// Bind `server.listen` (and the `[socketmap]` listeners, if configured) and serve,
    /// with SIGHUP reloading and SIGTERM/SIGINT stopping (see [`Relay::serve`]).
    pub async fn run(self) -> Result<(), RelayError> {
        let _socketmap = self.start_socketmap().await?;
        let listener = bind_smtp(&self.cfg).await?;
        let controls = crate::ops::signals::listen().map_err(unavailable("signal handlers"))?;
        self.serve(listener, controls).await
    }

    /// Serve on an already bound listener: accept clients, spool their mail and
    /// deliver it, until a [`Control::Stop`] arrives on `controls` (a
    /// [`Control::Reload`] reloads). Then shut down gracefully: stop accepting, close
    /// idle client sessions with `421`, let sessions finish the message they are
    /// sending, start no new deliveries, and wait for deliveries in flight, at most
    /// `queue.shutdown_grace_secs` (a second `Stop` cuts the wait short). What is cut
    /// off was not acknowledged or not recorded, so it is received again or delivered
    /// again: nothing acknowledged is lost.
    pub async fn serve(
        self,
        listener: TcpListener,
        mut controls: mpsc::Receiver<Control>,
    ) -> Result<(), RelayError> {
        let addr = listener.local_addr().map_err(|source| RelayError::Listen {
            addr: self.cfg.server.listen,
            key: "server.listen",
            source,
        })?;
        tracing::info!(%addr, data_dir = %self.cfg.storage.data_dir.display(), "stsrelay listening");
        let _delivery = AbortOnDrop(tokio::spawn(
            self.scheduler.clone().run(Duration::from_secs(1)),
        ));
        let _refresh = AbortOnDrop(self.engine.spawn_refresher(Duration::from_secs(3600)));
        let _reports = self
            .reports
            .clone()
            .map(|r| AbortOnDrop(tokio::spawn(r.run())));
        let _fleet = self
            .store
            .fleet()
            .map(|f| AbortOnDrop(tokio::spawn(f.clone().maintain())));
        let sink = Arc::new(SpoolSink {
            spool: self.spool.clone(),
            scheduler: self.scheduler.clone(),
            ready: self.ready.clone(),
        });
        let limit = Arc::new(Semaphore::new(MAX_INBOUND));
        let (stop, stopped) = watch::channel(false);
        let shutdown = Shutdown::from_watch(stopped);
        self.ready.listening.store(true, Ordering::SeqCst);
        crate::ops::notify::ready("accepting mail");
        let mut controls_open = true;
        loop {
            let accepted = tokio::select! {
                c = controls.recv(), if controls_open => match c {
                    Some(Control::Reload) => {
                        self.apply_reload();
                        continue;
                    }
                    Some(Control::Stop) => break,
                    None => {
                        controls_open = false;
                        continue;
                    }
                },
                a = accept(&listener, &limit) => a,
            };
            let Some((stream, peer, permit)) = accepted else {
                continue;
            };
            // Replies go out as soon as they are written (one write per pipelined batch).
            let _ = stream.set_nodelay(true);
            let live = self.live();
            let cfg = session_config(&live, peer.ip());
            let idle = Duration::from_secs(live.cfg.server.idle_timeout_secs);
            let (sink, shutdown) = (sink.clone(), shutdown.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let _counted = crate::ops::metrics::inbound_session();
                let tls = live.tls.clone();
                let served = match &live.users {
                    Some(u) => {
                        inbound::serve_until(
                            stream,
                            cfg,
                            peer,
                            sink.as_ref(),
                            u,
                            tls,
                            idle,
                            shutdown,
                        )
                        .await
                    }
                    None => {
                        inbound::serve_until(
                            stream,
                            cfg,
                            peer,
                            sink.as_ref(),
                            &inbound::NoAuth,
                            tls,
                            idle,
                            shutdown,
                        )
                        .await
                    }
                };
                match served {
                    Ok(s) => tracing::debug!(%peer, queued = ?s.queue_ids, "session closed"),
                    Err(e) => tracing::debug!(%peer, error = %e, "session ended with an error"),
                }
            });
        }
        drop(listener);
        self.drain(&limit, &stop, &mut controls, controls_open)
            .await;
        Ok(())
    }

    /// Graceful shutdown after the listener is closed: `421` to idle sessions, no new
    /// deliveries, then wait (bounded by `queue.shutdown_grace_secs`, or a second
    /// `Stop`) until no delivery and no client session is left.
    async fn drain(
        &self,
        limit: &Semaphore,
        stop: &watch::Sender<bool>,
        controls: &mut mpsc::Receiver<Control>,
        mut controls_open: bool,
    ) {
        self.ready.listening.store(false, Ordering::SeqCst);
        crate::ops::notify::stopping();
        stop.send_replace(true);
        self.scheduler.stop();
        let sessions = || MAX_INBOUND - limit.available_permits();
        let grace = Duration::from_secs(self.cfg.queue.shutdown_grace_secs);
        tracing::info!(
            grace_secs = grace.as_secs(),
            deliveries = self.scheduler.in_flight(),
            sessions = sessions(),
            "stopping: no longer accepting; waiting for work in progress"
        );
        let deadline = Instant::now() + grace;
        loop {
            let (deliveries, sessions) = (self.scheduler.in_flight(), sessions());
            if deliveries == 0 && sessions == 0 {
                tracing::info!("stopped: all work finished");
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    deliveries,
                    sessions,
                    "stopped: grace period over; unfinished deliveries stay queued"
                );
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                c = controls.recv(), if controls_open => match c {
                    Some(Control::Stop) => {
                        tracing::warn!(deliveries, sessions, "stopped at once (second stop signal); unfinished deliveries stay queued");
                        return;
                    }
                    Some(Control::Reload) => {}
                    None => controls_open = false,
                },
            }
        }
    }
}

/// Bind `server.listen`.
async fn bind_smtp(cfg: &Config) -> Result<TcpListener, RelayError> {
    TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|source| RelayError::Listen {
            addr: cfg.server.listen,
            key: "server.listen",
            source,
        })
}

/// One accepted connection with its concurrency permit; `None` after a failed accept
/// (logged, and paced so a persistent error does not spin).
async fn accept(
    listener: &TcpListener,
    limit: &Arc<Semaphore>,
) -> Option<(
    tokio::net::TcpStream,
    std::net::SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let permit = limit.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, peer)) => Some((stream, peer, permit)),
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

fn session_config(live: &Live, peer: std::net::IpAddr) -> SessionConfig {
    let mut c = SessionConfig::new(live.cfg.server_hostname());
    c.max_message_size = live.cfg.server.max_message_size;
    c.max_recipients = live.cfg.server.max_recipients;
    c.starttls_available = live.tls.is_some();
    c.auth_available = live.users.is_some();
    c.client_allowed = live.cfg.relay_allowed(peer);
    c
}

/// The config sections (and keys) that differ between `old` and `new` and are not
/// applied by a reload.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let d = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut out = Vec::new();
    if old.server.listen != new.server.listen {
        out.push("server.listen");
    }
    for (name, changed) in [
        ("dns", d(&old.dns, &new.dns)),
        ("tls", d(&old.tls, &new.tls)),
        ("storage", d(&old.storage, &new.storage)),
        ("delivery", d(&old.delivery, &new.delivery)),
        ("sts", d(&old.sts, &new.sts)),
        ("queue", d(&old.queue, &new.queue)),
        ("admin", d(&old.admin, &new.admin)),
        ("log", d(&old.log, &new.log)),
        ("socketmap", d(&old.socketmap, &new.socketmap)),
        ("tlsrpt", d(&old.tlsrpt, &new.tlsrpt)),
    ] {
        if changed {
            out.push(name);
        }
    }
    out
}

/// The admin endpoint's view of a relay.
struct RelayStatus {
    live: Arc<RwLock<Arc<Live>>>,
    spool: Spool,
    scheduler: Scheduler,
    engine: Engine,
    ready: Arc<Readiness>,
    started: i64,
    reports: Option<Arc<ReportService>>,
    store: Backend,
}

impl RelayStatus {
    async fn counts(&self) -> Result<crate::queue::spool::QueueCounts, String> {
        let spool = self.spool.clone();
        match tokio::task::spawn_blocking(move || spool.counts()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[async_trait::async_trait]
impl AdminSource for RelayStatus {
    fn not_ready(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.ready.listening.load(Ordering::SeqCst) {
            out.push("SMTP listener not bound");
        }
        if !self.ready.spool.load(Ordering::SeqCst) {
            out.push("spool failing (the last message could not be stored)");
        }
        if !self.ready.store.load(Ordering::SeqCst) {
            out.push("policy store not open");
        }
        out
    }

    async fn update_gauges(&self) {
        match self.counts().await {
            Ok(c) => {
                crate::ops::metrics::queue(&c, crate::clock::Clock::now(&crate::clock::SystemClock))
            }
            Err(e) => tracing::warn!(error = %e, "cannot read queue totals for metrics"),
        }
    }

    async fn status(&self) -> Status {
        let now = crate::clock::Clock::now(&crate::clock::SystemClock);
        let hostname = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .cfg
            .server_hostname();
        let (policies, policies_total) = match self.engine.stored_policies().await {
            Ok(mut all) => {
                all.sort_by(|a, b| {
                    a.expires_at()
                        .cmp(&b.expires_at())
                        .then(a.domain.cmp(&b.domain))
                });
                let total = all.len();
                let rows = all
                    .into_iter()
                    .take(crate::ops::status::MAX_POLICIES_SHOWN)
                    .map(|p| PolicyRow {
                        mode: p.policy.mode.to_string(),
                        mx: p.policy.mx.iter().map(|m| m.to_string()).collect(),
                        expires_at: p.expires_at(),
                        fetched_at: p.fetched_at,
                        id: p.id,
                        domain: p.domain,
                    })
                    .collect();
                (rows, Some(total))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list cached policies for the status page");
                (Vec::new(), None)
            }
        };
        let reports = match &self.reports {
            None => None,
            Some(r) => Some(
                r.latest_reports()
                    .await
                    .map(|rows| {
                        rows.into_iter()
                            .map(|e| crate::ops::status::ReportRow {
                                domain: e.policy_domain,
                                day: e.day.to_string(),
                                rua: e.rua,
                                state: e.state.as_str().to_string(),
                                attempts: e.attempts,
                                last_result: e.last_result.unwrap_or_default(),
                            })
                            .collect()
                    })
                    .map_err(|e| e.to_string()),
            ),
        };
        Status {
            reports,
            now,
            started: self.started,
            hostname,
            ready: self.not_ready().is_empty(),
            queue: self.counts().await,
            in_flight: self.scheduler.in_flight(),
            recent: self.scheduler.deliverer().activity().last_24h(now),
            policies,
            policies_total,
            store: crate::ops::status::StoreRow {
                backend: self.store.name(),
                redis: self.store.fleet().map(|f| f.health()),
            },
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, RelayError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| RelayError::Setup(format!("server.tls_cert {}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| RelayError::Setup(format!("server.tls_key {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| RelayError::Setup(format!("server.tls_cert/tls_key: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Stores accepted messages durably in the spool and wakes the scheduler.
struct SpoolSink {
    spool: Spool,
    scheduler: Scheduler,
    ready: Arc<Readiness>,
}

/// The spool's envelope for an accepted message.
fn spool_envelope(e: &InboundEnvelope, body: &[u8]) -> Envelope {
    Envelope {
        mail_from: e.mail_from.clone(),
        recipients: e
            .recipients
            .iter()
            .map(|r| RecipientSpec {
                address: r.address.clone(),
                notify: match &r.notify {
                    Some(n) => Notify {
                        success: n.success,
                        failure: n.failure,
                        delay: n.delay,
                        explicit: true,
                    },
                    None => Notify::default(),
                },
                orcpt: r
                    .orcpt
                    .as_ref()
                    .map(|o| format!("{};{}", o.addr_type, o.address)),
            })
            .collect(),
        ret: e.ret.map(|r| match r {
            inbound::Ret::Full => Ret::Full,
            inbound::Ret::Hdrs => Ret::Hdrs,
        }),
        envid: e.envid.clone(),
        smtputf8: e.smtputf8,
        eight_bit: e.is_8bit(),
        client_ip: Some(e.peer_ip),
        helo: Some(e.helo.clone()),
        received_at: crate::clock::Clock::now(&crate::clock::SystemClock),
        tls_optional: crate::smtp::says_tls_not_required(body),
        tlsrpt_exempt: false,
    }
}

#[async_trait::async_trait]
impl MessageSink for SpoolSink {
    async fn store(&self, envelope: &InboundEnvelope, body: &[u8]) -> Result<String, String> {
        let env = spool_envelope(envelope, body);
        let body = body.to_vec();
        let spool = self.spool.clone();
        let id = tokio::task::spawn_blocking(move || {
            let mut inc = spool.incoming()?;
            inc.write(&body)?;
            inc.commit(&env)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        // Readiness follows the last attempt: failing while the spool fails.
        self.ready.spool.store(id.is_ok(), Ordering::SeqCst);
        let id = id.map_err(|e| {
            tracing::error!(error = %e, "cannot spool a message");
            e
        })?;
        tracing::info!(queue_id = %id, from = %envelope.mail_from, rcpts = envelope.recipients.len(), "queued");
        crate::ops::metrics::message_received();
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move { scheduler.submit(id).await });
        Ok(id.to_string())
    }
}

/// Run the relay until SIGTERM or SIGINT: TLS session results are stored in
/// `storage.data_dir` for TLS-RPT; the admin endpoint (`[admin]`) serves `metrics`
/// (when given), health, readiness and the status page; systemd is notified.
pub async fn run(cfg: Config, metrics: Option<MetricsRender>) -> Result<(), RelayError> {
    let store = Backend::open(&cfg).map_err(unavailable("store (storage.data_dir)"))?;
    store.connect().await;
    let recorder = Arc::new(StoreRecorder::spawn(store.reports()));
    let relay = Relay::new(cfg.clone(), store, recorder.clone()).await?;
    let _socketmap = relay.start_socketmap().await?;
    let listener = bind_smtp(&cfg).await?;
    let _admin = if cfg.admin.enabled {
        let admin = TcpListener::bind(cfg.admin.listen)
            .await
            .map_err(|source| RelayError::Listen {
                addr: cfg.admin.listen,
                key: "admin.listen",
                source,
            })?;
        tracing::info!(addr = %cfg.admin.listen, "admin endpoint listening");
        let router = crate::ops::admin::router(relay.admin_source(), metrics);
        Some(AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = crate::ops::admin::serve(admin, router, std::future::pending()).await {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        })))
    } else {
        None
    };
    let controls = crate::ops::signals::listen().map_err(unavailable("signal handlers"))?;
    relay.serve(listener, controls).await?;
    // The TLS session results of the last deliveries, for TLS-RPT.
    if !recorder.flush(Duration::from_secs(5)).await {
        tracing::warn!("some TLS session results were not written before exit");
    }
    Ok(())
}
