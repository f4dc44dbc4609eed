//! The async driver: reads and writes a stream for a [`Session`], with timeouts,
//! STARTTLS and AUTH, and hands finished messages to a [`MessageSink`].

use super::*;

/// Where accepted messages go: the spool. `store` returns only once the message is
/// durable (the client gets `250` only then), with the queue id, or a reason for the
/// client's `451 4.3.0`.
#[async_trait::async_trait]
pub trait MessageSink: Send + Sync {
    /// Stores one message durably.
    async fn store(&self, envelope: &InboundEnvelope, body: &[u8]) -> Result<String, String>;
}

/// Checks AUTH PLAIN credentials (R107). Only asked under TLS.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync {
    /// Are these credentials valid?
    async fn authenticate(&self, credentials: &Credentials) -> bool;
}

/// An authenticator that accepts nobody.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoAuth;

#[async_trait::async_trait]
impl Authenticator for NoAuth {
    async fn authenticate(&self, _: &Credentials) -> bool {
        false
    }
}

/// How a served connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The session closed the connection (QUIT, idle timeout, errors, …).
    Closed(CloseReason),
    /// The client closed the connection (nothing of an unfinished message is stored).
    ClientDisconnected,
}

/// What happened on one served connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    /// The client.
    pub peer: SocketAddr,
    /// Its last HELO/EHLO argument.
    pub helo: Option<String>,
    /// STARTTLS was completed.
    pub tls: bool,
    /// The AUTH identity.
    pub authenticated_user: Option<String>,
    /// Queue ids of the accepted messages.
    pub queue_ids: Vec<String>,
    /// How it ended.
    pub end: SessionEnd,
}

/// Why serving a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reading from or writing to the client failed.
    #[error("I/O error on SMTP connection from {peer}: {source}")]
    Io {
        /// The client.
        peer: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The client did not read our replies in time.
    #[error("SMTP client {peer} did not read replies within {timeout:?}")]
    WriteTimeout {
        /// The client.
        peer: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The TLS handshake after STARTTLS failed or timed out.
    #[error("TLS handshake with SMTP client {peer} failed: {reason}")]
    TlsHandshake {
        /// The client.
        peer: SocketAddr,
        /// Why.
        reason: String,
    },
}

pub(super) enum Step {
    StartTls,
    End(SessionEnd),
}

/// Serves one SMTP connection without AUTH (`cfg.auth_available` is ignored): see
/// [`serve_with_auth`].
pub async fn serve<S, M>(
    stream: S,
    cfg: SessionConfig,
    peer: SocketAddr,
    store: &M,
    tls: Option<TlsAcceptor>,
    idle_timeout: Duration,
) -> Result<SessionSummary, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    M: MessageSink + ?Sized,
{
    let mut cfg = cfg;
    cfg.auth_available = false;
    serve_with_auth(stream, cfg, peer, store, &NoAuth, tls, idle_timeout).await
}

/// Serves one SMTP connection: greeting, commands, STARTTLS (when `tls` is given and
/// `cfg.starttls_available`), AUTH through `auth`, messages into `store`.
///
/// Every read waits at most `idle_timeout` (then `421 4.4.2` and close), and so do
/// every write and the TLS handshake. RFC 5321 §4.5.3.2.7 asks servers to wait at
/// least 5 minutes for a command; use less only for clients you control. Replies are flushed once per batch of pipelined
/// commands. A message is stored only when its final `.` arrived; a client that
/// disconnects or stalls mid-DATA leaves nothing behind.
pub async fn serve_with_auth<S, M, A>(
    stream: S,
    cfg: SessionConfig,
    peer: SocketAddr,
    store: &M,
    auth: &A,
    tls: Option<TlsAcceptor>,
    idle_timeout: Duration,
) -> Result<SessionSummary, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    M: MessageSink + ?Sized,
    A: Authenticator + ?Sized,
{
    serve_until(
        stream,
        cfg,
        peer,
        store,
        auth,
        tls,
        idle_timeout,
        Shutdown::never(),
    )
    .await
}

/// A server-wide "closing down" signal for sessions: once raised, a session that is
/// waiting for a command answers `421 4.3.2` and closes; one receiving a message
/// finishes it (stored and acknowledged) first.
///
/// ```
/// use stsrelay::smtp::inbound::Shutdown;
/// let (raise, signal) = tokio::sync::watch::channel(false);
/// let shutdown = Shutdown::from_watch(signal);
/// assert!(!shutdown.is_raised());
/// raise.send_replace(true);
/// assert!(shutdown.is_raised());
/// assert!(!Shutdown::never().is_raised());
/// ```
#[derive(Debug, Clone)]
pub struct Shutdown(Option<tokio::sync::watch::Receiver<bool>>);

impl Shutdown {
    /// A signal that is never raised.
    pub fn never() -> Shutdown {
        Shutdown(None)
    }

    /// Raised when the watched value becomes `true` (or its sender is dropped).
    pub fn from_watch(rx: tokio::sync::watch::Receiver<bool>) -> Shutdown {
        Shutdown(Some(rx))
    }

    /// Has it been raised?
    pub fn is_raised(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|rx| *rx.borrow() || rx.has_changed().is_err())
    }

    /// Wait until raised (forever for [`Shutdown::never`]).
    async fn raised(&self) {
        match &self.0 {
            Some(rx) => {
                let mut rx = rx.clone();
                let _ = rx.wait_for(|s| *s).await;
            }
            None => std::future::pending().await,
        }
    }
}

/// [`serve_with_auth`] that also closes the session politely when `shutdown` is
/// raised: at once if the client is between commands (`421 4.3.2`), after the
/// message if it is sending one.
#[allow(clippy::too_many_arguments)]
pub async fn serve_until<S, M, A>(
    stream: S,
    cfg: SessionConfig,
    peer: SocketAddr,
    store: &M,
    auth: &A,
    tls: Option<TlsAcceptor>,
    idle_timeout: Duration,
    shutdown: Shutdown,
) -> Result<SessionSummary, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    M: MessageSink + ?Sized,
    A: Authenticator + ?Sized,
{
    let mut cfg = cfg;
    cfg.starttls_available &= tls.is_some();
    let mut session = Session::new(cfg, peer.ip());
    let mut stream = stream;
    let mut out = Vec::with_capacity(512);
    session.greeting().write_to(&mut out);
    tracing::debug!(%peer, "SMTP session start");
    let io = Io {
        peer,
        idle: idle_timeout,
        shutdown: &shutdown,
    };
    let step = io
        .converse(&mut stream, &mut session, store, auth, out)
        .await?;
    let end = match (step, tls) {
        (Step::StartTls, Some(acceptor)) => {
            let mut tls_stream =
                match tokio::time::timeout(idle_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        return Err(ServeError::TlsHandshake {
                            peer,
                            reason: e.to_string(),
                        });
                    }
                    Err(_) => {
                        return Err(ServeError::TlsHandshake {
                            peer,
                            reason: format!("timed out after {idle_timeout:?}"),
                        });
                    }
                };
            session.tls_established();
            let step = io
                .converse(&mut tls_stream, &mut session, store, auth, Vec::new())
                .await?;
            let _ = tokio::time::timeout(idle_timeout, tls_stream.shutdown()).await;
            match step {
                Step::End(end) => end,
                Step::StartTls => SessionEnd::Closed(CloseReason::Shutdown),
            }
        }
        (Step::StartTls, None) => SessionEnd::Closed(CloseReason::Shutdown),
        (Step::End(end), _) => {
            let _ = tokio::time::timeout(idle_timeout, stream.shutdown()).await;
            end
        }
    };
    tracing::debug!(%peer, ?end, accepted = session.accepted().len(), "SMTP session end");
    Ok(SessionSummary {
        peer,
        helo: session.helo().map(str::to_string),
        tls: session.tls_active(),
        authenticated_user: session.authenticated_user().map(str::to_string),
        queue_ids: session.accepted().to_vec(),
        end,
    })
}

#[derive(Clone, Copy)]
pub(super) struct Io<'a> {
    peer: SocketAddr,
    idle: Duration,
    shutdown: &'a Shutdown,
}

impl Io<'_> {
    async fn flush<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        out: &mut Vec<u8>,
    ) -> Result<(), ServeError> {
        if out.is_empty() {
            return Ok(());
        }
        let write = async {
            w.write_all(out).await?;
            w.flush().await
        };
        match tokio::time::timeout(self.idle, write).await {
            Ok(Ok(())) => {
                out.clear();
                Ok(())
            }
            Ok(Err(source)) => Err(ServeError::Io {
                peer: self.peer,
                source,
            }),
            Err(_) => Err(ServeError::WriteTimeout {
                peer: self.peer,
                timeout: self.idle,
            }),
        }
    }

    async fn converse<IO, M, A>(
        &self,
        io: &mut IO,
        session: &mut Session,
        store: &M,
        auth: &A,
        mut out: Vec<u8>,
    ) -> Result<Step, ServeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
        M: MessageSink + ?Sized,
        A: Authenticator + ?Sized,
    {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut events: VecDeque<Event> = VecDeque::new();
        loop {
            while let Some(event) = events.pop_front() {
                match event {
                    Event::Reply(r) => r.write_to(&mut out),
                    Event::Message { envelope, body } => {
                        let result = store.store(&envelope, &body).await;
                        drop(body);
                        events.extend(
                            session.message_stored(result.as_deref().map_err(String::as_str)),
                        );
                    }
                    Event::Authenticate(credentials) => {
                        let ok = auth.authenticate(&credentials).await;
                        events.extend(session.auth_result(ok));
                    }
                    Event::StartTls => {
                        self.flush(io, &mut out).await?;
                        return Ok(Step::StartTls);
                    }
                    Event::Close => {
                        self.flush(io, &mut out).await?;
                        let reason = session.close_reason().unwrap_or(CloseReason::Quit);
                        return Ok(Step::End(SessionEnd::Closed(reason)));
                    }
                }
            }
            // One flush per batch of pipelined replies.
            self.flush(io, &mut out).await?;
            // Closing down: between commands, say so and close; a message being
            // received is finished first (its client gets the 250).
            let receiving = session.receiving_data();
            let closing = async {
                if receiving {
                    std::future::pending::<()>().await;
                }
                self.shutdown.raised().await;
            };
            let read = tokio::select! {
                r = tokio::time::timeout(self.idle, io.read(&mut buf)) => r,
                () = closing => {
                    let close = session.shutdown();
                    if close.is_empty() {
                        // Already closed: nothing left to say.
                        return Ok(Step::End(SessionEnd::Closed(CloseReason::Shutdown)));
                    }
                    events.extend(close);
                    continue;
                }
            };
            match read {
                Err(_) => events.extend(session.timeout()),
                Ok(Ok(0)) => return Ok(Step::End(SessionEnd::ClientDisconnected)),
                Ok(Ok(n)) => events.extend(session.feed(&buf[..n])),
                Ok(Err(source)) => {
                    return Err(ServeError::Io {
                        peer: self.peer,
                        source,
                    });
                }
            }
        }
    }
}
