//! An ESMTP sink: a real SMTP server (RFC 5321 replies, CRLF) with optional
//! STARTTLS (RFC 3207), recording every accepted message.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;

use super::TaskGuard;

/// Per-read (and per-write) timeout.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum message size accepted (advertised with SIZE).
pub const MAX_MESSAGE: usize = 10 * 1024 * 1024;
/// Hard cap on bytes read during DATA before the connection is dropped.
const MAX_DATA_READ: usize = 4 * MAX_MESSAGE;
/// Maximum command line length accepted (RFC 5321 says 512; be lenient).
const MAX_LINE: u64 = 4096;
/// Maximum data line length read at once (longer lines are read in pieces).
const MAX_DATA_LINE: u64 = 64 * 1024;
/// Maximum number of commands per connection (per TLS / plain phase).
const MAX_COMMANDS: usize = 10_000;
/// Maximum number of connections accepted.
const MAX_CONNECTIONS: usize = 100_000;
/// How long a stalled connection is kept open at most.
const STALL_MAX: Duration = Duration::from_secs(120);

/// Configuration of a sink.
#[derive(Clone)]
pub struct SinkOptions {
    /// Used in the greeting and EHLO reply.
    pub hostname: String,
    /// TLS config used for STARTTLS.
    pub tls: Option<Arc<ServerConfig>>,
    /// Advertise (and accept) STARTTLS; only effective with `tls: Some`.
    pub advertise_starttls: bool,
    /// After answering `220` to STARTTLS, read the ClientHello (its SNI is
    /// recorded in `handshakes`) and then close the connection without
    /// completing the handshake.
    pub close_after_starttls: bool,
    /// Send the greeting, then never answer anything (until the client goes
    /// away, at most 120 s).
    pub stall_after_greeting: bool,
    /// Reply line (without CRLF) sent to every RCPT, e.g.
    /// `"550 5.1.1 no such user"`.
    pub reject_rcpt: Option<String>,
}

impl std::fmt::Debug for SinkOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkOptions")
            .field("hostname", &self.hostname)
            .field("tls", &self.tls.is_some())
            .field("advertise_starttls", &self.advertise_starttls)
            .field("close_after_starttls", &self.close_after_starttls)
            .field("stall_after_greeting", &self.stall_after_greeting)
            .field("reject_rcpt", &self.reject_rcpt)
            .finish()
    }
}

impl SinkOptions {
    /// No TLS at all.
    pub fn plain(hostname: &str) -> Self {
        SinkOptions {
            hostname: hostname.to_string(),
            tls: None,
            advertise_starttls: false,
            close_after_starttls: false,
            stall_after_greeting: false,
            reject_rcpt: None,
        }
    }

    /// STARTTLS advertised and served with `cfg`.
    pub fn tls(hostname: &str, cfg: Arc<ServerConfig>) -> Self {
        SinkOptions {
            tls: Some(cfg),
            advertise_starttls: true,
            ..Self::plain(hostname)
        }
    }
}

/// A message accepted by the sink.
#[derive(Clone, Debug)]
pub struct ReceivedMessage {
    /// Reverse path without angle brackets (empty for the null sender).
    pub mail_from: String,
    /// Forward paths without angle brackets.
    pub rcpt_to: Vec<String>,
    /// Message content after dot-unstuffing, CRLF line endings as sent,
    /// without the terminating `.CRLF`.
    pub data: Vec<u8>,
    pub tls: bool,
    pub sni: Option<String>,
    /// `"TLSv1.2"` / `"TLSv1.3"`.
    pub tls_version: Option<String>,
    /// Argument of the last HELO/EHLO.
    pub helo: String,
}

#[derive(Debug, Default)]
struct Shared {
    messages: Vec<ReceivedMessage>,
    connections: usize,
    handshakes: Vec<Option<String>>,
    completed_handshakes: usize,
    commands: Vec<String>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    _tasks: TaskGuard,
}

/// Handle to a running sink. Cloning is cheap; the accept loop is aborted
/// when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct SmtpSink {
    inner: Arc<Inner>,
}

impl SmtpSink {
    /// Binds exactly `addr` (e.g. `127.0.0.5:PORT`) and starts serving.
    pub async fn start(addr: SocketAddr, opts: SinkOptions) -> std::io::Result<SmtpSink> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let tasks = TaskGuard::default();
        tasks.push(
            tokio::spawn(accept_loop(listener, Arc::new(opts), shared.clone())).abort_handle(),
        );
        Ok(SmtpSink {
            inner: Arc::new(Inner {
                addr,
                shared,
                _tasks: tasks,
            }),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.inner.shared.lock().unwrap()
    }

    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.shared().messages.clone()
    }

    /// Messages received so far (cheap; for load tests).
    pub fn message_count(&self) -> usize {
        self.shared().messages.len()
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.shared().connections
    }

    /// SNI of each attempted TLS handshake (recorded when the ClientHello
    /// arrives, so failed handshakes are included).
    pub fn handshakes(&self) -> Vec<Option<String>> {
        self.shared().handshakes.clone()
    }

    /// Number of TLS handshakes that completed successfully.
    pub fn completed_handshakes(&self) -> usize {
        self.shared().completed_handshakes
    }

    /// Every command line received (verbatim, without CRLF; DATA content excluded).
    pub fn commands(&self) -> Vec<String> {
        self.shared().commands.clone()
    }
}

/// A port number that is currently free (TCP) on all `ips` (bounded attempts).
pub fn free_port_on(ips: &[Ipv4Addr]) -> u16 {
    assert!(!ips.is_empty(), "free_port_on needs at least one IP");
    for _ in 0..200 {
        let Ok(first) = std::net::TcpListener::bind((ips[0], 0)) else {
            continue;
        };
        let Ok(port) = first.local_addr().map(|a| a.port()) else {
            continue;
        };
        let mut held = vec![first];
        let mut ok = true;
        for ip in &ips[1..] {
            match std::net::TcpListener::bind((*ip, port)) {
                Ok(l) => held.push(l),
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        drop(held);
        if ok {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

async fn accept_loop(listener: TcpListener, opts: Arc<SinkOptions>, shared: Arc<Mutex<Shared>>) {
    for _ in 0..MAX_CONNECTIONS {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.lock().unwrap().connections += 1;
        // Replies go out as soon as they are written (no Nagle delay behind a
        // delayed ACK when the client pipelines).
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(tcp, opts.clone(), shared.clone()));
    }
}

/// Per-session state (reset by STARTTLS).
#[derive(Debug, Default)]
struct Session {
    helo: Option<String>,
    mail_from: Option<String>,
    rcpts: Vec<String>,
    tls: bool,
    sni: Option<String>,
    tls_version: Option<String>,
}

impl Session {
    fn reset_txn(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
    }
}

enum Next {
    Close,
    StartTls,
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, text: &str) -> std::io::Result<()> {
    let fut = async {
        s.write_all(text.as_bytes()).await?;
        s.flush().await
    };
    match tokio::time::timeout(READ_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Reads one line (up to `cap` bytes, including the LF). `Ok(None)` on EOF.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    cap: u64,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let mut limited = (&mut *r).take(cap);
    let fut = limited.read_until(b'\n', &mut buf);
    match tokio::time::timeout(READ_TIMEOUT, fut).await {
        Ok(Ok(0)) => Ok(None),
        Ok(Ok(_)) => Ok(Some(buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn connection(tcp: TcpStream, opts: Arc<SinkOptions>, shared: Arc<Mutex<Shared>>) {
    let mut reader = BufReader::new(tcp);
    if send(
        &mut reader,
        &format!("220 {} ESMTP sink\r\n", opts.hostname),
    )
    .await
    .is_err()
    {
        return;
    }
    if opts.stall_after_greeting {
        let _ = tokio::time::timeout(STALL_MAX, async {
            let mut sink = [0u8; 1024];
            loop {
                match reader.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        return;
    }

    let mut session = Session::default();
    let next = run_session(&mut reader, &mut session, &opts, &shared).await;
    if !matches!(next, Next::StartTls) {
        return;
    }
    let Some(cfg) = opts.tls.clone() else {
        return;
    };
    // Anything the client pipelined after STARTTLS is discarded (RFC 3207 §4.2).
    let tcp = reader.into_inner();
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let start = match tokio::time::timeout(READ_TIMEOUT, acceptor).await {
        Ok(Ok(s)) => s,
        _ => return,
    };
    let sni = start.client_hello().server_name().map(|s| s.to_string());
    shared.lock().unwrap().handshakes.push(sni.clone());
    if opts.close_after_starttls {
        return;
    }
    let tls = match tokio::time::timeout(READ_TIMEOUT, start.into_stream(cfg)).await {
        Ok(Ok(s)) => s,
        _ => return,
    };
    shared.lock().unwrap().completed_handshakes += 1;
    let version = tls
        .get_ref()
        .1
        .protocol_version()
        .map(super::tls_version_name);
    let mut session = Session {
        tls: true,
        sni,
        tls_version: version,
        ..Session::default()
    };
    let mut reader = BufReader::new(tls);
    let _ = run_session(&mut reader, &mut session, &opts, &shared).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), reader.get_mut().shutdown()).await;
}

fn angle_addr(arg: &str) -> Option<String> {
    let arg = arg.trim_start();
    if let Some(rest) = arg.strip_prefix('<') {
        let end = rest.find('>')?;
        Some(rest[..end].to_string())
    } else {
        // lenient: bare address up to the first space
        arg.split_whitespace().next().map(|s| s.to_string())
    }
}

/// Case-insensitive prefix strip.
fn strip_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

async fn run_session<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    st: &mut Session,
    opts: &SinkOptions,
    shared: &Mutex<Shared>,
) -> Next {
    let starttls_available = opts.tls.is_some() && opts.advertise_starttls && !st.tls;
    for _ in 0..MAX_COMMANDS {
        let line = match read_line(io, MAX_LINE).await {
            Ok(Some(l)) => l,
            _ => return Next::Close,
        };
        if !line.ends_with(b"\n") {
            // over-long line: report and drop the connection
            let _ = send(io, "500 5.5.2 line too long\r\n").await;
            return Next::Close;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']).to_string();
        shared.lock().unwrap().commands.push(text.clone());
        let (verb, arg) = match text.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
            None => (text.to_ascii_uppercase(), String::new()),
        };
        let reply: String = match verb.as_str() {
            "HELO" | "EHLO" if arg.is_empty() => "501 5.5.4 domain required\r\n".into(),
            "HELO" => {
                st.helo = Some(arg.clone());
                st.reset_txn();
                format!("250 {}\r\n", opts.hostname)
            }
            "EHLO" => {
                st.helo = Some(arg.clone());
                st.reset_txn();
                let mut lines = vec![
                    format!("{} greets {}", opts.hostname, arg),
                    "PIPELINING".to_string(),
                    "8BITMIME".to_string(),
                    format!("SIZE {MAX_MESSAGE}"),
                ];
                if starttls_available {
                    lines.push("STARTTLS".to_string());
                }
                let last = lines.len() - 1;
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{}\r\n", if i == last { ' ' } else { '-' }, l))
                    .collect()
            }
            "STARTTLS" => {
                if st.tls {
                    "503 5.5.1 TLS already active\r\n".into()
                } else if !starttls_available {
                    "454 4.7.0 TLS not available\r\n".into()
                } else if !arg.is_empty() {
                    "501 5.5.4 no parameters allowed\r\n".into()
                } else {
                    if send(io, "220 2.0.0 Ready to start TLS\r\n").await.is_err() {
                        return Next::Close;
                    }
                    return Next::StartTls;
                }
            }
            "MAIL" => match strip_ci(&arg, "FROM:") {
                _ if st.helo.is_none() => "503 5.5.1 EHLO/HELO first\r\n".into(),
                _ if st.mail_from.is_some() => "503 5.5.1 nested MAIL command\r\n".into(),
                None => "501 5.5.4 syntax: MAIL FROM:<address>\r\n".into(),
                Some(rest) => match angle_addr(rest) {
                    None => "501 5.1.7 bad sender address syntax\r\n".into(),
                    Some(a) => {
                        st.mail_from = Some(a);
                        st.rcpts.clear();
                        "250 2.1.0 OK\r\n".into()
                    }
                },
            },
            "RCPT" => match strip_ci(&arg, "TO:") {
                _ if st.mail_from.is_none() => "503 5.5.1 need MAIL first\r\n".into(),
                None => "501 5.5.4 syntax: RCPT TO:<address>\r\n".into(),
                Some(rest) => match angle_addr(rest) {
                    None => "501 5.1.3 bad recipient address syntax\r\n".into(),
                    Some(_) if opts.reject_rcpt.is_some() => {
                        let r = opts.reject_rcpt.clone().unwrap_or_default();
                        format!("{}\r\n", r.trim_end_matches(['\r', '\n']))
                    }
                    Some(a) => {
                        st.rcpts.push(a);
                        "250 2.1.5 OK\r\n".into()
                    }
                },
            },
            "DATA" => {
                if !arg.is_empty() {
                    "501 5.5.4 no parameters allowed\r\n".into()
                } else if st.mail_from.is_none() {
                    "503 5.5.1 need MAIL first\r\n".into()
                } else if st.rcpts.is_empty() {
                    "554 5.5.1 no valid recipients\r\n".into()
                } else {
                    if send(io, "354 End data with <CR><LF>.<CR><LF>\r\n")
                        .await
                        .is_err()
                    {
                        return Next::Close;
                    }
                    match read_data(io).await {
                        None => return Next::Close,
                        Some(None) => {
                            st.reset_txn();
                            "552 5.3.4 message size exceeds fixed limit\r\n".into()
                        }
                        Some(Some(data)) => {
                            let msg = ReceivedMessage {
                                mail_from: st.mail_from.take().unwrap_or_default(),
                                rcpt_to: std::mem::take(&mut st.rcpts),
                                data,
                                tls: st.tls,
                                sni: st.sni.clone(),
                                tls_version: st.tls_version.clone(),
                                helo: st.helo.clone().unwrap_or_default(),
                            };
                            let n = {
                                let mut sh = shared.lock().unwrap();
                                sh.messages.push(msg);
                                sh.messages.len()
                            };
                            format!("250 2.0.0 OK queued as SINK{n}\r\n")
                        }
                    }
                }
            }
            "RSET" => {
                st.reset_txn();
                "250 2.0.0 OK\r\n".into()
            }
            "NOOP" => "250 2.0.0 OK\r\n".into(),
            "QUIT" => {
                let _ = send(io, "221 2.0.0 Bye\r\n").await;
                return Next::Close;
            }
            _ => "500 5.5.2 command not recognized\r\n".into(),
        };
        if send(io, &reply).await.is_err() {
            return Next::Close;
        }
    }
    let _ = send(io, "421 4.7.0 too many commands\r\n").await;
    Next::Close
}

/// Reads DATA content up to `CRLF.CRLF`, dot-unstuffing lines.
/// `None`: connection problem; `Some(None)`: too big; `Some(Some(data))`: ok.
async fn read_data<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<Option<Vec<u8>>> {
    let mut data = Vec::new();
    let mut too_big = false;
    let mut total = 0usize;
    let mut at_line_start = true;
    // bounded: each iteration consumes at least one byte, capped by MAX_DATA_READ
    while total <= MAX_DATA_READ {
        let line = read_line(r, MAX_DATA_LINE).await.ok()??;
        total += line.len();
        let complete = line.ends_with(b"\n");
        let mut piece: &[u8] = &line;
        if at_line_start {
            if piece == b".\r\n" || piece == b".\n" {
                return Some(if too_big { None } else { Some(data) });
            }
            if piece.first() == Some(&b'.') {
                piece = &piece[1..];
            }
        }
        at_line_start = complete;
        if !too_big {
            if data.len() + piece.len() > MAX_MESSAGE {
                too_big = true;
                data = Vec::new();
            } else {
                data.extend_from_slice(piece);
            }
        }
    }
    None
}
