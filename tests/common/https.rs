//! An HTTPS/1.1 "policy host" on tokio-rustls with a hand-written HTTP/1.1
//! server: one request per connection, `Connection: close` on every response.
//!
//! The certificate is chosen by SNI (map name -> CertifiedKey, with an
//! optional default; without a match and without default the handshake
//! fails). The response is chosen per host name (the `Host` header without
//! port, falling back to the SNI); unknown hosts get 404.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::TaskGuard;
use super::pki::Leaf;

/// Maximum size of a request head (request line + headers).
const MAX_HEAD: usize = 16 * 1024;
/// Timeout for the TLS handshake and for reading the request head.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `Hang` connection is kept open at most.
const HANG_MAX: Duration = Duration::from_secs(120);
/// Maximum number of connections accepted.
const MAX_CONNECTIONS: usize = 100_000;

/// What the host does for a request.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// A complete response. `Content-Length` is added unless present in
    /// `headers`; `Connection: close` is always added.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Complete the TLS handshake, read the request, never answer (until the
    /// client goes away, at most 120 s).
    Hang,
    /// `200`, `Content-Type: text/plain`, `Content-Length: chunk.len() * chunks`,
    /// then the body one `chunk` every `interval` (the first chunk after the
    /// first interval).
    Trickle {
        chunk: Vec<u8>,
        interval: Duration,
        chunks: usize,
    },
}

impl Behaviour {
    /// `200 OK`, `Content-Type: text/plain`, with `body`.
    pub fn policy(body: &str) -> Behaviour {
        Behaviour::Respond {
            status: 200,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// A response with the given status, `Content-Type: text/plain` and body.
    pub fn status(status: u16, body: &str) -> Behaviour {
        Behaviour::Respond {
            status,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// A redirect (`Location: location`).
    pub fn redirect(status: u16, location: &str) -> Behaviour {
        Behaviour::Respond {
            status,
            headers: vec![("Location".into(), location.into())],
            body: Vec::new(),
        }
    }
}

/// One request as seen by the host.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub sni: Option<String>,
    pub method: String,
    pub path: String,
    /// `Host` header value (as sent, including any port).
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
    /// `"TLSv1.2"` / `"TLSv1.3"`.
    pub tls_version: Option<String>,
    /// The request body (`Content-Length` bytes, at most `MAX_BODY`).
    pub body: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    certs: HashMap<String, Arc<CertifiedKey>>,
    default_cert: Option<Arc<CertifiedKey>>,
    behaviours: HashMap<String, Behaviour>,
    requests: Vec<SeenRequest>,
    connections: usize,
    failed_handshakes: usize,
}

#[derive(Debug)]
struct SniResolver {
    state: Arc<Mutex<State>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let st = self.state.lock().unwrap();
        hello
            .server_name()
            .and_then(|n| st.certs.get(&n.to_ascii_lowercase()).cloned())
            .or_else(|| st.default_cert.clone())
    }
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _tasks: TaskGuard,
}

/// Handle to a running HTTPS policy host. Cloning is cheap; the accept loop
/// is aborted when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct PolicyHost {
    inner: Arc<Inner>,
}

fn host_key(s: &str) -> String {
    let s = s.trim();
    // strip a port, keeping IPv6 literals in brackets intact
    let h = if let Some(rest) = s.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        s.rsplit_once(':').map(|(h, _)| h).unwrap_or(s)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

impl PolicyHost {
    /// Starts on `ip:0` with TLS 1.2 and 1.3.
    pub async fn start(ip: IpAddr) -> PolicyHost {
        Self::start_with_versions(ip, &[&rustls::version::TLS12, &rustls::version::TLS13]).await
    }

    /// Starts on `ip:0` offering only the given TLS versions.
    pub async fn start_with_versions(
        ip: IpAddr,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> PolicyHost {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .expect("bind policy host");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver {
                state: state.clone(),
            }));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let tasks = TaskGuard::default();
        tasks.push(tokio::spawn(accept_loop(listener, acceptor, state.clone())).abort_handle());
        PolicyHost {
            inner: Arc::new(Inner {
                addr,
                state,
                _tasks: tasks,
            }),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap()
    }

    /// Presents `leaf` to clients sending SNI `sni`.
    pub fn set_cert(&self, sni: &str, leaf: &Leaf) {
        let ck = leaf.certified_key();
        self.state().certs.insert(host_key(sni), ck);
    }

    /// Presents `leaf` to clients whose SNI has no certificate (or no SNI).
    pub fn set_default_cert(&self, leaf: &Leaf) {
        self.state().default_cert = Some(leaf.certified_key());
    }

    pub fn remove_cert(&self, sni: &str) {
        self.state().certs.remove(&host_key(sni));
    }

    /// Sets the behaviour for requests to `host`.
    pub fn serve(&self, host: &str, b: Behaviour) {
        self.state().behaviours.insert(host_key(host), b);
    }

    /// Removes the behaviour for `host` (it answers 404 again).
    pub fn unserve(&self, host: &str) {
        self.state().behaviours.remove(&host_key(host));
    }

    /// All requests seen so far (recorded once the head was read).
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state().requests.clone()
    }

    /// Number of requests for `host` (matched against `Host`, else SNI).
    pub fn count(&self, host: &str) -> usize {
        let k = host_key(host);
        self.state()
            .requests
            .iter()
            .filter(|r| request_host(r).as_deref() == Some(k.as_str()))
            .count()
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.state().connections
    }

    /// TLS handshakes that failed or timed out.
    pub fn failed_handshakes(&self) -> usize {
        self.state().failed_handshakes
    }
}

fn request_host(r: &SeenRequest) -> Option<String> {
    r.host
        .as_deref()
        .map(host_key)
        .or_else(|| r.sni.as_deref().map(host_key))
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, state: Arc<Mutex<State>>) {
    for _ in 0..MAX_CONNECTIONS {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        state.lock().unwrap().connections += 1;
        tokio::spawn(handle(tcp, acceptor.clone(), state.clone()));
    }
}

/// Largest request body read.
const MAX_BODY: usize = 1 << 20;

/// Reads `Content-Length` bytes of body (`start` already read), bounded by `MAX_BODY`.
async fn read_body<R: AsyncRead + Unpin>(r: &mut R, mut body: Vec<u8>, len: usize) -> Vec<u8> {
    let len = len.min(MAX_BODY);
    let mut tmp = [0u8; 4096];
    // bounded: every iteration adds at least one byte, up to `len`
    while body.len() < len {
        match r.read(&mut tmp).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&tmp[..n]),
        }
    }
    body.truncate(len);
    body
}

/// Reads until `\r\n\r\n`; returns the head (without the terminator) and any bytes
/// read after it.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 1024];
    // bounded: every iteration adds at least one byte, capped by MAX_HEAD
    while buf.len() <= MAX_HEAD {
        let n = r.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(pos + 4);
            buf.truncate(pos);
            return Some((buf, rest));
        }
    }
    None
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn handle(tcp: TcpStream, acceptor: TlsAcceptor, state: Arc<Mutex<State>>) {
    let mut tls = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        _ => {
            state.lock().unwrap().failed_handshakes += 1;
            return;
        }
    };
    let (sni, tls_version) = {
        let (_, conn) = tls.get_ref();
        (
            conn.server_name().map(|s| s.to_string()),
            conn.protocol_version().map(super::tls_version_name),
        )
    };
    let Ok(Some((head, rest))) = tokio::time::timeout(IO_TIMEOUT, read_head(&mut tls)).await else {
        return;
    };
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let host = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.clone());
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let body = tokio::time::timeout(IO_TIMEOUT, read_body(&mut tls, rest, len))
        .await
        .unwrap_or_default();
    let seen = SeenRequest {
        sni,
        method,
        path,
        host,
        headers,
        tls_version,
        body,
    };
    let behaviour = {
        let mut st = state.lock().unwrap();
        let b = request_host(&seen).and_then(|h| st.behaviours.get(&h).cloned());
        st.requests.push(seen);
        b
    };
    let behaviour = behaviour.unwrap_or_else(|| Behaviour::status(404, "no such host\n"));

    match behaviour {
        Behaviour::Respond {
            status,
            headers,
            body,
        } => {
            let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
            let mut has_len = false;
            for (k, v) in &headers {
                if k.eq_ignore_ascii_case("content-length") {
                    has_len = true;
                }
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            if !has_len {
                out.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            out.push_str("Connection: close\r\n\r\n");
            let mut bytes = out.into_bytes();
            bytes.extend_from_slice(&body);
            let _ = tokio::time::timeout(IO_TIMEOUT, async {
                tls.write_all(&bytes).await?;
                tls.flush().await?;
                tls.shutdown().await
            })
            .await;
        }
        Behaviour::Hang => {
            // Keep the connection open, discarding input, until EOF/error.
            let _ = tokio::time::timeout(HANG_MAX, async {
                let mut sink = [0u8; 1024];
                loop {
                    match tls.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
        Behaviour::Trickle {
            chunk,
            interval,
            chunks,
        } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                chunk.len() * chunks
            );
            if tls.write_all(head.as_bytes()).await.is_err() || tls.flush().await.is_err() {
                return;
            }
            for _ in 0..chunks {
                tokio::time::sleep(interval).await;
                let ok = matches!(
                    tokio::time::timeout(IO_TIMEOUT, async {
                        tls.write_all(&chunk).await?;
                        tls.flush().await
                    })
                    .await,
                    Ok(Ok(()))
                );
                if !ok {
                    return;
                }
            }
            let _ = tokio::time::timeout(IO_TIMEOUT, tls.shutdown()).await;
        }
    }
}
