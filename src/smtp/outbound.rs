//! SMTP client side (RFC 5321, RFC 3207 STARTTLS): enough to greet an MX, negotiate
//! STARTTLS and tell what TLS it offers. Every read has a timeout and a size limit.

use crate::tls::{TlsFailure, TrustStore};
use crate::tlsrpt::ResultType;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest reply line accepted (RFC 5321 §4.5.3.1.5 says 512; be lenient).
const MAX_LINE: usize = 4096;
/// Most lines in one multi-line reply.
const MAX_LINES: usize = 128;

/// An SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// Text of each line (after the code and separator).
    pub lines: Vec<String>,
}

impl Reply {
    /// 2xx?
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// One-line rendering, e.g. `250 ok`.
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }

    /// Does an EHLO reply advertise `keyword` (case-insensitive)?
    pub fn has_extension(&self, keyword: &str) -> bool {
        self.lines.iter().skip(1).any(|l| {
            l.split_ascii_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }
}

/// What went wrong talking to an SMTP server.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    /// TCP connect failed or timed out.
    #[error("connect to {addr} failed: {reason}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// No (complete) reply in time.
    #[error("timed out waiting for the server's reply")]
    Timeout,
    /// Connection closed or I/O error.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not an SMTP reply.
    #[error("malformed reply: {0:?}")]
    Protocol(String),
    /// The server answered with an unexpected code.
    #[error("unexpected reply to {command}: {reply}")]
    Rejected {
        /// The command sent.
        command: String,
        /// The reply.
        reply: String,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(TlsFailure),
}

impl SmtpError {
    /// The RFC 8460 result type, for errors that are TLS failures.
    pub fn result_type(&self) -> Option<ResultType> {
        match self {
            SmtpError::Tls(f) => Some(f.result_type),
            _ => None,
        }
    }
}

/// A plaintext or TLS stream.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An SMTP client connection.
pub struct Client<S> {
    io: BufReader<S>,
    timeout: Duration,
}

/// Facts about an established TLS session.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`.
    pub version: String,
    /// The certificate chain the server presented.
    pub chain: Vec<CertificateDer<'static>>,
}

impl Client<TcpStream> {
    /// Connect and read the greeting; a non-220 greeting is an error.
    pub async fn connect(
        addr: SocketAddr,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<(Self, Reply), SmtpError> {
        let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| SmtpError::Connect {
                addr,
                reason: format!("no answer within {connect_timeout:?}"),
            })?
            .map_err(|e| SmtpError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        // Commands are small writes answered by the peer; without this, Nagle holds a write
        // back until the previous one is acknowledged, and delayed ACK makes that 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%addr, error = %e, "TCP_NODELAY not set");
        }
        let mut c = Client {
            io: BufReader::new(tcp),
            timeout,
        };
        let greeting = c.read_reply().await?;
        if greeting.code != 220 {
            return Err(SmtpError::Rejected {
                command: "(greeting)".into(),
                reply: greeting.text(),
            });
        }
        Ok((c, greeting))
    }

    /// Our address on this connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.io.get_ref().local_addr().ok()
    }

    /// Send STARTTLS and perform the handshake with SNI = `server_name`. With
    /// `config` strict, a certificate invalid for the name fails the handshake.
    pub async fn starttls(
        mut self,
        config: std::sync::Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<(Client<tokio_rustls::client::TlsStream<TcpStream>>, TlsInfo), SmtpError> {
        let reply = self.command("STARTTLS").await?;
        if reply.code != 220 {
            return Err(SmtpError::Rejected {
                command: "STARTTLS".into(),
                reply: reply.text(),
            });
        }
        if !self.io.buffer().is_empty() {
            // RFC 3207 §4.2 / CVE-2011-0411: nothing may be pipelined before the handshake.
            return Err(SmtpError::Protocol(
                "data sent before the TLS handshake".into(),
            ));
        }
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| {
            SmtpError::Tls(TlsFailure {
                result_type: ResultType::ValidationFailure,
                reason_code: "invalid-server-name",
                reason: e.to_string(),
            })
        })?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let tcp = self.io.into_inner();
        let tls = tokio::time::timeout(self.timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| SmtpError::Timeout)?
            .map_err(|e| match crate::tls::find_rustls_error(&e) {
                Some(r) => SmtpError::Tls(TlsFailure::from(r)),
                None => SmtpError::Tls(TlsFailure {
                    result_type: ResultType::ValidationFailure,
                    reason_code: "tls-handshake-failure",
                    reason: e.to_string(),
                }),
            })?;
        let (_, conn) = tls.get_ref();
        let info = TlsInfo {
            version: match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            },
            chain: conn
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
        };
        Ok((
            Client {
                io: BufReader::new(tls),
                timeout: self.timeout,
            },
            info,
        ))
    }
}

impl<S: Stream + 'static> Client<S> {
    /// The same connection behind a trait object, for pooling plaintext and TLS
    /// sessions together; `None` if the server sent anything unread (such a
    /// connection is not reused).
    pub fn boxed(self) -> Option<Client<Box<dyn Stream>>> {
        if !self.io.buffer().is_empty() {
            return None;
        }
        Some(Client {
            io: BufReader::new(Box::new(self.io.into_inner()) as Box<dyn Stream>),
            timeout: self.timeout,
        })
    }
}

impl<S: Stream> Client<S> {
    /// Read one (possibly multi-line) reply.
    pub async fn read_reply(&mut self) -> Result<Reply, SmtpError> {
        tokio::time::timeout(self.timeout, read_reply(&mut self.io))
            .await
            .map_err(|_| SmtpError::Timeout)?
    }

    /// Send a command line (CRLF added) and read the reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, SmtpError> {
        tokio::time::timeout(self.timeout, async {
            self.io
                .get_mut()
                .write_all(format!("{line}\r\n").as_bytes())
                .await?;
            self.io.get_mut().flush().await?;
            Ok::<_, SmtpError>(())
        })
        .await
        .map_err(|_| SmtpError::Timeout)??;
        self.read_reply().await
    }

    /// EHLO; a non-250 reply is an error.
    pub async fn ehlo(&mut self, name: &str) -> Result<Reply, SmtpError> {
        let r = self.command(&format!("EHLO {name}")).await?;
        if r.code != 250 {
            return Err(SmtpError::Rejected {
                command: "EHLO".into(),
                reply: r.text(),
            });
        }
        Ok(r)
    }

    /// Send the message after a `354` to DATA: lines end in CRLF, lines starting with
    /// `.` are dot-stuffed (RFC 5321 §4.5.2), then `CRLF.CRLF`; returns the final reply.
    pub async fn send_data(&mut self, body: &[u8]) -> Result<Reply, SmtpError> {
        let mut stuffed = dot_stuff(body);
        stuffed.extend_from_slice(b".\r\n");
        tokio::time::timeout(self.timeout, async {
            for chunk in stuffed.chunks(64 * 1024) {
                self.io.get_mut().write_all(chunk).await?;
            }
            self.io.get_mut().flush().await?;
            Ok::<_, SmtpError>(())
        })
        .await
        .map_err(|_| SmtpError::Timeout)??;
        self.read_reply().await
    }

    /// QUIT, ignoring the answer.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT").await;
    }
}

/// CRLF line ends and dot-stuffing for DATA; the result ends with CRLF.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 2);
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    if body.is_empty() {
        return out;
    }
    for line in body.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn read_reply<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Reply, SmtpError> {
    let mut lines = Vec::new();
    let mut code = None;
    for _ in 0..MAX_LINES {
        let mut buf = Vec::new();
        let n = tokio::io::AsyncReadExt::take(&mut *r, MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Err(SmtpError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if !buf.ends_with(b"\n") {
            return Err(SmtpError::Protocol("reply line too long".into()));
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\r', '\n']);
        let (c, rest) = (line.get(..3), line.get(3..).unwrap_or(""));
        let c: u16 = c
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| SmtpError::Protocol(line.to_string()))?;
        if code.is_some_and(|prev| prev != c) {
            return Err(SmtpError::Protocol(format!(
                "reply code changed mid-reply: {line}"
            )));
        }
        code = Some(c);
        let more = rest.starts_with('-');
        lines.push(rest.get(1..).unwrap_or("").to_string());
        if !more {
            return Ok(Reply { code: c, lines });
        }
    }
    Err(SmtpError::Protocol("reply has too many lines".into()))
}

/// What probing an MX found: used by `stsrelay check`.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The address reached.
    pub addr: SocketAddr,
    /// STARTTLS advertised after EHLO.
    pub starttls: bool,
    /// The negotiated TLS version, if the handshake completed.
    pub tls_version: Option<String>,
    /// WebPKI verdict on the certificate for the MX name (None if no handshake).
    pub certificate: Option<Result<(), TlsFailure>>,
    /// The certificate chain the server presented (empty if no handshake), for checks
    /// beyond WebPKI such as DANE.
    pub chain: Vec<CertificateDer<'static>>,
    /// A failure after connecting (handshake error etc.).
    pub error: Option<String>,
}

/// Connect to `addr`, EHLO, STARTTLS with SNI = `mx_host` (completing the handshake
/// whatever the certificate), then verify the certificate for `mx_host`.
pub async fn probe(
    addr: SocketAddr,
    mx_host: &str,
    helo: &str,
    trust: &TrustStore,
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<Probe, SmtpError> {
    let (mut c, _greeting) = Client::connect(addr, connect_timeout, timeout).await?;
    let ehlo = c.ehlo(helo).await?;
    let mut probe = Probe {
        addr,
        starttls: ehlo.has_extension("STARTTLS"),
        tls_version: None,
        certificate: None,
        chain: Vec::new(),
        error: None,
    };
    if !probe.starttls {
        c.quit().await;
        return Ok(probe);
    }
    match c.starttls(trust.opportunistic_config(), mx_host).await {
        Ok((mut tls, info)) => {
            probe.tls_version = Some(info.version);
            probe.certificate = Some(trust.verify(&info.chain, mx_host));
            probe.chain = info.chain;
            if let Err(e) = tls.ehlo(helo).await {
                probe.error = Some(format!("EHLO after STARTTLS: {e}"));
            }
            tls.quit().await;
        }
        Err(SmtpError::Tls(f)) => {
            probe.certificate = Some(Err(f.clone()));
            probe.error = Some(f.to_string());
        }
        Err(e) => probe.error = Some(e.to_string()),
    }
    Ok(probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_and_line_ends() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n..c\r\n"), b"a\r\n..b\r\n...c\r\n");
        assert_eq!(dot_stuff(b"bare\nlf"), b"bare\r\nlf\r\n");
        assert_eq!(dot_stuff(b"."), b"..\r\n");
        assert_eq!(dot_stuff(b""), b"");
    }

    #[tokio::test]
    async fn multiline_replies_parse() {
        let mut r =
            BufReader::new(&b"250-mx.example Hello\r\n250-PIPELINING\r\n250 STARTTLS\r\n"[..]);
        let reply = read_reply(&mut r).await.unwrap();
        assert_eq!(reply.code, 250);
        assert!(reply.has_extension("starttls"));
        assert!(!reply.has_extension("mx.example"));
    }

    #[tokio::test]
    async fn bad_replies_are_errors_not_panics() {
        for bad in [
            &b"25\r\n"[..],
            b"abc hello\r\n",
            b"250-a\r\n251 b\r\n",
            b"250-a\r\n",
            b"",
        ] {
            let mut r = BufReader::new(bad);
            assert!(
                read_reply(&mut r).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("250 {}\r\n", "x".repeat(MAX_LINE + 10));
        let mut r = BufReader::new(long.as_bytes());
        assert!(matches!(
            read_reply(&mut r).await,
            Err(SmtpError::Protocol(_))
        ));
    }
}
