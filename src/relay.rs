//! `stsrelay run`: the relay's parts wired together — the SMTP listener (inbound),
//! the spool, the scheduler and delivery under the MTA-STS engine.

use crate::Config;
use crate::delivery::Deliverer;
use crate::dns::Resolver;
use crate::queue::scheduler::Scheduler;
use crate::queue::spool::{Envelope, Notify, RecipientSpec, Ret, Spool};
use crate::smtp::auth::UserFile;
use crate::smtp::inbound::{self, InboundEnvelope, MessageSink, SessionConfig};
use crate::store::SqliteStore;
use crate::sts::{Engine, EngineOptions, FetchOptions, HttpsFetcher};
use crate::tls::TrustStore;
use crate::tlsrpt::{ReportService, SessionRecorder, StoreRecorder};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Most inbound connections served at once; more wait in the listen backlog.
const MAX_INBOUND: usize = 10_000;

/// Why the relay could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A part could not be set up (message names the part and the config key).
    #[error("{0}")]
    Setup(String),
    /// The listener failed.
    #[error("cannot listen on {addr} (server.listen): {source}")]
    Listen {
        /// Address.
        addr: std::net::SocketAddr,
        /// Error.
        source: std::io::Error,
    },
    /// The `[socketmap]` listeners could not be set up.
    #[error("{0}")]
    Socketmap(String),
}

impl RelayError {
    /// Is this a configuration problem (exit 78) rather than a temporary one (75)?
    pub fn is_config(&self) -> bool {
        matches!(self, RelayError::Setup(_))
    }
}

/// The running relay's shared parts.
pub struct Relay {
    cfg: Config,
    spool: Spool,
    scheduler: Scheduler,
    engine: Engine,
    tls: Option<tokio_rustls::TlsAcceptor>,
    users: Option<UserFile>,
    socketmap: Option<crate::socketmap::Server>,
    reports: Option<Arc<ReportService>>,
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> RelayError + '_ {
    move |e| RelayError::Setup(format!("{what}: {e}"))
}

impl Relay {
    /// Open the spool and the policy store under `storage.data_dir` and build every
    /// part from `cfg`. Nothing listens yet.
    pub async fn new(cfg: Config, recorder: Arc<dyn SessionRecorder>) -> Result<Relay, RelayError> {
        let data_dir = cfg.storage.data_dir.clone();
        let spool = tokio::task::spawn_blocking(move || Spool::open(&data_dir))
            .await
            .map_err(setup("spool"))?
            .map_err(setup("spool (storage.data_dir)"))?;
        let resolver = Resolver::from_config(&cfg).map_err(setup("DNS (dns.nameservers)"))?;
        let trust = TrustStore::from_config(&cfg).map_err(setup("trust store"))?;
        let fetcher = HttpsFetcher::new(resolver.clone(), &trust, FetchOptions::from_config(&cfg))
            .map_err(setup("policy fetcher"))?;
        let store = SqliteStore::open(&cfg.storage.data_dir)
            .map_err(setup("policy store (storage.data_dir)"))?;
        let store = Arc::new(store);
        let engine = Engine::builder(Arc::new(resolver.clone()), Arc::new(fetcher), store.clone())
            .options(EngineOptions::from_config(&cfg))
            .build();
        let reports = if cfg.tlsrpt.enabled {
            Some(
                ReportService::new(&cfg, store, resolver.clone(), &trust, spool.clone())
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
        let tls = match (&cfg.server.tls_cert, &cfg.server.tls_key) {
            (Some(cert), Some(key)) => Some(acceptor(cert, key)?),
            _ => None,
        };
        let users = match &cfg.server.auth_users_file {
            Some(path) => Some(UserFile::load(path).map_err(setup("SMTP AUTH"))?),
            None => None,
        };
        Ok(Relay {
            cfg,
            spool,
            scheduler,
            engine,
            tls,
            users,
            socketmap,
            reports,
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

    /// Bind `server.listen` (and the `[socketmap]` listeners, if configured) and serve
    /// until the returned future is dropped: accepts clients, spools their mail and
    /// delivers it; answers Postfix's TLS-policy queries.
    pub async fn run(self) -> Result<(), RelayError> {
        let listener = TcpListener::bind(self.cfg.server.listen)
            .await
            .map_err(|source| RelayError::Listen {
                addr: self.cfg.server.listen,
                source,
            })?;
        let _socketmap = match &self.socketmap {
            Some(server) => {
                let listeners = server.bind().await.map_err(|e| match e {
                    crate::socketmap::SocketmapError::Setup(m) => RelayError::Setup(m),
                    other => RelayError::Socketmap(other.to_string()),
                })?;
                Some(AbortOnDrop(tokio::spawn(server.clone().serve(listeners))))
            }
            None => None,
        };
        self.serve(listener).await
    }

    /// Serve on an already bound listener.
    pub async fn serve(self, listener: TcpListener) -> Result<(), RelayError> {
        let addr = listener.local_addr().map_err(|source| RelayError::Listen {
            addr: self.cfg.server.listen,
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
        let sink = Arc::new(SpoolSink {
            spool: self.spool.clone(),
            scheduler: self.scheduler.clone(),
        });
        let limit = Arc::new(Semaphore::new(MAX_INBOUND));
        let idle = Duration::from_secs(self.cfg.server.idle_timeout_secs);
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return Ok(());
            };
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Replies go out as soon as they are written (one write per pipelined batch).
            let _ = stream.set_nodelay(true);
            let cfg = self.session_config(peer.ip());
            let (sink, tls, users) = (sink.clone(), self.tls.clone(), self.users.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let served = match &users {
                    Some(u) => {
                        inbound::serve_with_auth(stream, cfg, peer, sink.as_ref(), u, tls, idle)
                            .await
                    }
                    None => inbound::serve(stream, cfg, peer, sink.as_ref(), tls, idle).await,
                };
                match served {
                    Ok(s) => tracing::debug!(%peer, queued = ?s.queue_ids, "session closed"),
                    Err(e) => tracing::debug!(%peer, error = %e, "session ended with an error"),
                }
            });
        }
    }

    fn session_config(&self, peer: std::net::IpAddr) -> SessionConfig {
        let mut c = SessionConfig::new(self.cfg.server_hostname());
        c.max_message_size = self.cfg.server.max_message_size;
        c.max_recipients = self.cfg.server.max_recipients;
        c.starttls_available = self.tls.is_some();
        c.auth_available = self.users.is_some();
        c.client_allowed = self.cfg.relay_allowed(peer);
        c
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
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
        .map_err(|e| e.to_string())?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot spool a message");
            e.to_string()
        })?;
        tracing::info!(queue_id = %id, from = %envelope.mail_from, rcpts = envelope.recipients.len(), "queued");
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move { scheduler.submit(id).await });
        Ok(id.to_string())
    }
}

/// Run the relay; TLS session results are stored in `storage.data_dir` for TLS-RPT.
pub async fn run(cfg: Config) -> Result<(), RelayError> {
    let store = SqliteStore::open(&cfg.storage.data_dir)
        .map_err(setup("session store (storage.data_dir)"))?;
    let recorder = Arc::new(StoreRecorder::spawn(Arc::new(store)));
    Relay::new(cfg, recorder).await?.run().await
}
