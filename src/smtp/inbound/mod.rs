//! SMTP server side: the session that accepts mail from Postfix (or any authorised
//! client) for relaying.
//!
//! The protocol logic is a sans-I/O state machine, [`Session`]: it is fed the bytes the
//! client sent and answers with [`Event`]s (replies to write, a message to store, a TLS
//! upgrade to perform, the connection to close). [`serve`] is the thin async driver that
//! runs a session over a socket, with an idle timeout, STARTTLS and a [`MessageSink`].
//!
//! ```
//! use stsrelay::smtp::inbound::{Event, Session, SessionConfig};
//!
//! let mut cfg = SessionConfig::new("relay.example");
//! cfg.client_allowed = true; // the client's IP is in server.allow
//! let mut session = Session::new(cfg, "192.0.2.10".parse().unwrap());
//! assert_eq!(session.greeting().to_string(), "220 relay.example ESMTP\r\n");
//!
//! // PIPELINING: several commands in one read, the replies in order.
//! let events = session.feed(
//!     b"EHLO client.example\r\n\
//!       MAIL FROM:<alice@client.example> SIZE=100 ENVID=QQ+2B1\r\n\
//!       RCPT TO:<bob@dest.example> NOTIFY=FAILURE,DELAY\r\n\
//!       DATA\r\n",
//! );
//! let codes: Vec<u16> = events
//!     .iter()
//!     .filter_map(|e| match e {
//!         Event::Reply(r) => Some(r.code),
//!         _ => None,
//!     })
//!     .collect();
//! assert_eq!(codes, [250, 250, 250, 354]);
//!
//! // The body, dot-stuffed on the wire, ends with CRLF.CRLF.
//! let events = session.feed(b"Subject: hi\r\n\r\n..a line with a leading dot\r\n.\r\n");
//! let [Event::Message { envelope, body }] = &events[..] else { panic!("{events:?}") };
//! assert_eq!(envelope.mail_from, "alice@client.example");
//! assert_eq!(envelope.envid.as_deref(), Some("QQ+1"));
//! assert_eq!(envelope.recipients[0].address, "bob@dest.example");
//! // A `Received:` trace header is prepended (RFC 5321 §4.4), the rest is unstuffed.
//! assert!(body.starts_with(b"Received: from client.example ([192.0.2.10])\r\n"));
//! assert!(body.ends_with(b"\r\nSubject: hi\r\n\r\n.a line with a leading dot\r\n"));
//!
//! // "250 queued" only once the message is stored durably.
//! let events = session.message_stored(Ok("4F2A9C"));
//! let [Event::Reply(reply)] = &events[..] else { panic!("{events:?}") };
//! assert_eq!(reply.to_string(), "250 2.0.0 Ok: queued as 4F2A9C\r\n");
//!
//! let events = session.feed(b"QUIT\r\n");
//! assert!(matches!(&events[..], [Event::Reply(r), Event::Close] if r.code == 221));
//! ```
//!
//! # Reply codes
//!
//! Every 2xx/4xx/5xx reply carries an RFC 3463 enhanced status code (RFC 2034), except
//! the greeting and the HELO/EHLO replies, as Postfix does; 3xx replies (354, 334) carry
//! none because RFC 3463 classes are 2, 4 and 5 only.
//!
//! | situation | reply |
//! |---|---|
//! | greeting | `220 <host> ESMTP` |
//! | MAIL / RCPT / RSET / NOOP ok | `250 2.1.0` / `250 2.1.5` / `250 2.0.0` / `250 2.0.0` |
//! | DATA accepted | `354 End data with <CR><LF>.<CR><LF>` |
//! | message stored | `250 2.0.0 Ok: queued as <id>` |
//! | message not stored (sink failed) | `451 4.3.0 Error: queue file write error` |
//! | QUIT | `221 2.0.0 Bye` |
//! | VRFY | `252 2.0.0` (RFC 5321 §3.5.3) |
//! | STARTTLS | `220 2.0.0 Ready to start TLS` |
//! | AUTH ok / bad credentials | `235 2.7.0` / `535 5.7.8` (RFC 4954) |
//! | AUTH before TLS | `538 5.7.11 Encryption required …` (RFC 4954 §4) |
//! | AUTH mechanism other than PLAIN | `504 5.5.4` |
//! | AUTH cancelled (`*`) / undecodable base64 | `501 5.0.0` / `501 5.5.2` |
//! | AUTH response line too long | `500 5.5.6` (RFC 4954) |
//! | unknown command, empty line | `500 5.5.2` |
//! | command line too long (RFC 5321 §4.2.2: 500 covers it) | `500 5.5.2 Error: line too long` |
//! | NUL, other control byte or invalid UTF-8 in a command | `500 5.5.2` |
//! | HTTP verbs (GET, POST, CONNECT, …): cross-protocol | `521 5.7.0` and close |
//! | recognised but not implemented (EXPN, HELP, BDAT, ETRN, TURN) | `502 5.5.1` |
//! | STARTTLS/AUTH not offered | `502 5.5.1` |
//! | syntax error in arguments | `501 5.5.4` |
//! | bad sender / recipient address | `501 5.1.7` / `501 5.1.3` |
//! | non-ASCII address without SMTPUTF8 | `553 5.6.7` (RFC 6531) |
//! | unknown MAIL/RCPT parameter | `555 5.5.4` (RFC 5321 §4.1.1.11) |
//! | bad sequence (RCPT before MAIL, DATA before RCPT, nested MAIL, no EHLO) | `503 5.5.1` |
//! | DATA after every RCPT was rejected | `554 5.5.1 Error: no valid recipients` (RFC 5321 §3.3) |
//! | STARTTLS when TLS is already on | `554 5.5.1` |
//! | relaying denied (R105) | `550 5.7.1 <addr>: Relay access denied` (RFC 5321 §3.6.2) |
//! | too many recipients | `452 4.5.3` (RFC 5321 §4.5.3.1.10) |
//! | declared SIZE too large, message too large | `552 5.3.4` (RFC 1870) |
//! | a body line longer than `max_data_line_length` | `554 5.6.0` |
//! | idle timeout | `421 4.4.2 <host> Error: timeout exceeded` and close |
//! | too many errors / AUTH failures | `421 4.7.0` and close |
//! | server shutting down | `421 4.3.2` and close |
//!
//! # Choices
//!
//! * **Line ends.** Command lines may end in CRLF or a bare LF (as Postfix accepts). In
//!   DATA the end of the message is recognised only as CRLF `.` CRLF, and a leading dot
//!   is removed only at the start of a line that follows a CRLF, so bare-LF "smuggling"
//!   (`\n.\r\n`) never ends a message. Bare LF in the body is normalised to CRLF
//!   (Postfix's `smtpd_forbid_bare_newline = normalize`); a bare CR is kept verbatim.
//! * **No local domains.** This relay delivers nowhere locally, so every recipient is a
//!   relay recipient and the right to relay depends on the client only (R105): an
//!   address in `server.allow` or a successful AUTH. `%`-hacks, quoted local parts,
//!   source routes and bang paths (R106) therefore cannot buy anything: the route of a
//!   source-routed path is stripped (RFC 5321 §3.6.1) and the final mailbox judged, and
//!   for an unauthorised client every syntactically valid recipient gets 550 5.7.1.
//!   `<postmaster>` without a domain is rejected like any other domain-less address.
//! * **Addresses are kept as written** (quotes included, route removed), because the
//!   next hop and the DSN's `Final-Recipient` need the exact address (R96). This is why
//!   commands are parsed here rather than with `smtp-proto`, whose parser drops the
//!   quotes of a quoted local part, maps `<postmaster>` to the empty address and keeps
//!   only `rfc822` ORCPTs.
//! * **HELO vs EHLO.** After HELO no ESMTP parameters are accepted (555); MAIL needs a
//!   HELO or EHLO first; STARTTLS and AUTH need EHLO.
//! * **AUTH** is offered (`AUTH PLAIN`) only under TLS and when `auth_available` (R107);
//!   the credential check belongs to the driver (an [`Authenticator`]). After
//!   `max_auth_failures` failed attempts the session is closed.
//! * **Limits.** The body buffer never exceeds the `Received:` header plus
//!   `max_message_size`; a larger message is read to its end, discarded and answered
//!   552 5.3.4. Command lines are bounded by `max_line_length`, body lines by
//!   `max_data_line_length`. After `max_errors` 4xx/5xx replies the session is closed
//!   (Postfix's `smtpd_hard_error_limit`).
//! * **Trace.** Unless `add_received_header` is off, a `Received:` header (RFC 5321
//!   §4.4, with RFC 3848/6531 protocol names) is prepended to the body (R108); no other
//!   change is made to the content.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

mod data;
mod driver;
mod parse;
mod trace;

use data::*;
use parse::*;

pub use driver::{
    Authenticator, MessageSink, NoAuth, ServeError, SessionEnd, SessionSummary, Shutdown, serve,
    serve_until, serve_with_auth,
};
pub use parse::{xtext_decode, xtext_encode};
pub use trace::{received_header, rfc5322_date};
/// Input kept while the session waits for the driver (store, AUTH check); a client
/// that pipelines more than this before getting an answer is disconnected.
const PAUSED_INPUT_LIMIT: usize = 256 * 1024;
/// Longest ENVID value (RFC 3461 §4.4).
const MAX_ENVID: usize = 100;
/// Longest ORCPT value (RFC 3461 §4.2).
const MAX_ORCPT: usize = 500;
/// Longest reverse- or forward-path including the angle brackets (RFC 5321 §4.5.3.1.3).
const MAX_PATH: usize = 256;
/// Longest HELO/EHLO argument.
const MAX_HELO: usize = 255;
/// Read buffer of the async driver.
const READ_CHUNK: usize = 16 * 1024;

/// Settings of one SMTP server session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Our host name: greeting, EHLO reply, `Received:` header.
    pub hostname: String,
    /// Largest message accepted, in octets after dot-unstuffing (advertised as `SIZE`).
    pub max_message_size: usize,
    /// Most accepted recipients per transaction (default 100).
    pub max_recipients: usize,
    /// Longest command line, CRLF included (default 4096; RFC 5321 asks for ≥ 512).
    pub max_line_length: usize,
    /// Longest line of message content, CRLF excluded (default 65536; RFC 5321 §4.5.3.1.6
    /// allows 998, but long lines are common and tolerated up to this bound).
    pub max_data_line_length: usize,
    /// Offer STARTTLS (the driver also needs a TLS acceptor).
    pub starttls_available: bool,
    /// Offer `AUTH PLAIN` (only ever after STARTTLS).
    pub auth_available: bool,
    /// The client's address is in `server.allow`: it may relay without AUTH.
    pub client_allowed: bool,
    /// 4xx/5xx replies after which the session is closed with 421 (default 20).
    pub max_errors: usize,
    /// Failed AUTH attempts after which the session is closed with 421 (default 3).
    pub max_auth_failures: usize,
    /// Prepend a `Received:` trace header to each message (default true; R108).
    pub add_received_header: bool,
}

impl SessionConfig {
    /// Defaults for host name `hostname`: 10 MiB messages, 100 recipients, 4096-octet
    /// command lines, no STARTTLS, no AUTH, client not allowed to relay.
    pub fn new(hostname: impl Into<String>) -> SessionConfig {
        SessionConfig {
            hostname: hostname.into(),
            max_message_size: 10 * 1024 * 1024,
            max_recipients: 100,
            max_line_length: 4096,
            max_data_line_length: 65536,
            starttls_available: false,
            auth_available: false,
            client_allowed: false,
            max_errors: 20,
            max_auth_failures: 3,
            add_received_header: true,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig::new("localhost")
    }
}

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedStatus {
    /// 2, 4 or 5.
    pub class: u8,
    /// Subject (0–7 in RFC 3463).
    pub subject: u16,
    /// Detail.
    pub detail: u16,
}

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// A reply to the client. `Display` gives the exact wire form, CRLFs included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code, repeated on every line when present.
    pub enhanced: Option<EnhancedStatus>,
    /// Text lines (at least one).
    pub lines: Vec<String>,
}

impl Reply {
    fn new(code: u16, enhanced: Option<(u8, u16, u16)>, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: enhanced.map(|(class, subject, detail)| EnhancedStatus {
                class,
                subject,
                detail,
            }),
            lines: vec![text.into()],
        }
    }

    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The enhanced code as text (`"5.7.1"`), or `""`.
    pub fn enhanced_code(&self) -> String {
        self.enhanced.map(|e| e.to_string()).unwrap_or_default()
    }

    /// Appends the wire form to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.to_string().as_bytes());
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            // Reply text never carries CR or LF, whatever was echoed into it.
            let text: String = text
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            match self.enhanced {
                Some(e) => write!(f, "{}{sep}{e} {text}\r\n", self.code)?,
                None => write!(f, "{}{sep}{text}\r\n", self.code)?,
            }
        }
        Ok(())
    }
}

/// `RET=` of MAIL FROM (RFC 3461 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    /// `RET=FULL`: return the full message in a DSN.
    Full,
    /// `RET=HDRS`: return the headers only.
    Hdrs,
}

/// `BODY=` of MAIL FROM (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyType {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// `NOTIFY=` of RCPT TO (RFC 3461 §4.1). All false means `NOTIFY=NEVER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Notify {
    /// `SUCCESS`.
    pub success: bool,
    /// `FAILURE`.
    pub failure: bool,
    /// `DELAY`.
    pub delay: bool,
}

impl Notify {
    /// `NOTIFY=NEVER`.
    pub const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
    };

    /// Is this `NOTIFY=NEVER`?
    pub fn is_never(&self) -> bool {
        *self == Notify::NEVER
    }
}

/// `ORCPT=addr-type;xtext` of RCPT TO (RFC 3461 §4.2), xtext-decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orcpt {
    /// Address type as sent, e.g. `rfc822`.
    pub addr_type: String,
    /// The original recipient, xtext-decoded (re-encode with [`xtext_encode`]). For the
    /// `utf-8` type (RFC 6533) the `\x{…}` escapes are left as they came.
    pub address: String,
}

/// One accepted recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The mailbox as written by the client (source route removed, quotes kept).
    pub address: String,
    /// DSN `NOTIFY`, if given.
    pub notify: Option<Notify>,
    /// DSN `ORCPT`, if given.
    pub orcpt: Option<Orcpt>,
}

/// The envelope of one accepted message and what is known about its client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundEnvelope {
    /// Reverse path; `""` for `<>`.
    pub mail_from: String,
    /// Accepted recipients, in RCPT order.
    pub recipients: Vec<Recipient>,
    /// DSN `RET`, if given.
    pub ret: Option<Ret>,
    /// DSN `ENVID`, xtext-decoded, if given.
    pub envid: Option<String>,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
    /// `BODY=` as given.
    pub body_type: Option<BodyType>,
    /// `SIZE=` as given.
    pub declared_size: Option<u64>,
    /// The HELO/EHLO argument.
    pub helo: String,
    /// The client said EHLO (not HELO).
    pub esmtp: bool,
    /// The client's IP address.
    pub peer_ip: IpAddr,
    /// The message came over TLS (STARTTLS).
    pub tls: bool,
    /// The AUTH identity, if the client authenticated.
    pub authenticated_user: Option<String>,
}

impl InboundEnvelope {
    /// Was the body declared 8-bit (`BODY=8BITMIME`)?
    pub fn is_8bit(&self) -> bool {
        self.body_type == Some(BodyType::EightBitMime)
    }

    /// The `with` protocol name of the `Received:` header (RFC 3848, RFC 6531).
    pub fn protocol(&self) -> &'static str {
        match (
            self.esmtp,
            self.smtputf8,
            self.tls,
            self.authenticated_user.is_some(),
        ) {
            (false, ..) => "SMTP",
            (true, false, false, false) => "ESMTP",
            (true, false, true, false) => "ESMTPS",
            (true, false, false, true) => "ESMTPA",
            (true, false, true, true) => "ESMTPSA",
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
        }
    }
}

/// AUTH PLAIN credentials for the driver to check. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Authorization identity (empty, or equal to `username`).
    pub authzid: String,
    /// Authentication identity.
    pub username: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("authzid", &self.authzid)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What the session asks of its driver. `Message`, `Authenticate`, `StartTls` and
/// `Close` are always the last event of a batch: the session waits for the matching
/// call ([`Session::message_stored`], [`Session::auth_result`],
/// [`Session::tls_established`]) or is finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Write this reply (flush once per batch).
    Reply(Reply),
    /// Flush the replies so far (the last is `220 2.0.0 Ready to start TLS`), run the TLS
    /// handshake, then call [`Session::tls_established`]. Plaintext the client sent after
    /// STARTTLS has been discarded (CVE-2011-0411) and must not be fed.
    StartTls,
    /// Check these credentials and call [`Session::auth_result`].
    Authenticate(Credentials),
    /// A complete message: store it durably, then call [`Session::message_stored`]. The
    /// body is dot-unstuffed, has CRLF line ends and starts with our `Received:` header.
    Message {
        /// The envelope.
        envelope: Box<InboundEnvelope>,
        /// The body.
        body: Vec<u8>,
    },
    /// Write the replies so far and close the connection.
    Close,
}

/// Why the session closed itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent QUIT.
    Quit,
    /// The driver reported an idle timeout.
    Timeout,
    /// Too many 4xx/5xx replies.
    TooManyErrors,
    /// Too many failed AUTH attempts.
    TooManyAuthFailures,
    /// A non-SMTP (HTTP) command.
    ForeignProtocol,
    /// The client pipelined too much while the session waited.
    InputOverflow,
    /// [`Session::shutdown`].
    Shutdown,
}

#[derive(Debug)]
enum Phase {
    Command,
    AuthResponse,
    Data(Box<DataReceiver>),
    AwaitStore,
    AwaitAuth,
    AwaitTls,
    Closed(CloseReason),
}

#[derive(Debug, Clone)]
struct Helo {
    name: String,
    esmtp: bool,
}

#[derive(Debug, Clone)]
struct Transaction {
    mail_from: String,
    body_type: Option<BodyType>,
    declared_size: Option<u64>,
    smtputf8: bool,
    ret: Option<Ret>,
    envid: Option<String>,
    recipients: Vec<Recipient>,
    rcpt_attempts: usize,
}

/// The sans-I/O SMTP server session. See the [module docs](self) for an example.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    peer: IpAddr,
    phase: Phase,
    /// Bytes received and not yet processed.
    input: Vec<u8>,
    /// Discarding the rest of an over-long command line.
    skip_line: bool,
    helo: Option<Helo>,
    tls: bool,
    auth_user: Option<String>,
    txn: Option<Transaction>,
    /// Envelope of the message being received.
    pending: Option<Box<InboundEnvelope>>,
    /// AUTH identity being checked by the driver.
    pending_user: Option<String>,
    errors: usize,
    auth_failures: usize,
    overflow: bool,
    accepted: Vec<String>,
}

/// `501` for a bad MAIL (`5.1.7`, sender) or RCPT (`5.1.3`, recipient) path.
fn path_error(e: AddrError, detail: u16, what: &str) -> Reply {
    match e {
        AddrError::TooLong => reply(501, (5, 1, detail), "Error: path too long"),
        AddrError::Syntax => reply(501, (5, 1, detail), format!("Bad {what} address syntax")),
    }
}

/// A client-supplied word as echoed in a reply: at most 64 characters, so replies stay
/// within RFC 5321's 512-octet line limit.
fn clip(word: &str) -> String {
    word.chars().take(64).collect()
}

fn reply(code: u16, esc: (u8, u16, u16), text: impl Into<String>) -> Reply {
    Reply::new(code, Some(esc), text)
}

impl Session {
    /// A new session for a client at `peer` (IPv4-mapped IPv6 is shown as IPv4).
    pub fn new(cfg: SessionConfig, peer: IpAddr) -> Session {
        Session {
            cfg,
            peer: peer.to_canonical(),
            phase: Phase::Command,
            input: Vec::new(),
            skip_line: false,
            helo: None,
            tls: false,
            auth_user: None,
            txn: None,
            pending: None,
            pending_user: None,
            errors: 0,
            auth_failures: 0,
            overflow: false,
            accepted: Vec::new(),
        }
    }

    /// The 220 greeting, to be sent first.
    pub fn greeting(&self) -> Reply {
        Reply::new(220, None, format!("{} ESMTP", self.cfg.hostname))
    }

    /// The settings.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Is TLS active?
    pub fn tls_active(&self) -> bool {
        self.tls
    }

    /// The AUTH identity, once authenticated.
    pub fn authenticated_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    /// The last HELO/EHLO argument.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_ref().map(|h| h.name.as_str())
    }

    /// Queue ids of the messages accepted so far.
    pub fn accepted(&self) -> &[String] {
        &self.accepted
    }

    /// Has the session ended (and why)?
    pub fn close_reason(&self) -> Option<CloseReason> {
        match self.phase {
            Phase::Closed(r) => Some(r),
            _ => None,
        }
    }

    /// Feeds bytes read from the client; returns what to do, in order.
    ///
    /// While a `Message`/`Authenticate` answer is outstanding the input is only
    /// buffered; after `StartTls` and after `Close` it is ignored.
    pub fn feed(&mut self, input: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        match self.phase {
            Phase::Closed(_) | Phase::AwaitTls => return out,
            Phase::AwaitStore | Phase::AwaitAuth => {
                let room = PAUSED_INPUT_LIMIT.saturating_sub(self.input.len());
                if input.len() > room {
                    self.overflow = true;
                }
                self.input
                    .extend_from_slice(&input[..input.len().min(room)]);
                return out;
            }
            _ => {}
        }
        self.input.extend_from_slice(input);
        self.run(&mut out);
        out
    }

    /// The driver's answer to [`Event::Message`]: `Ok(queue id)` once the message is
    /// durable (→ `250 2.0.0 Ok: queued as <id>`), or `Err(reason)` (→ `451 4.3.0`).
    pub fn message_stored(&mut self, result: Result<&str, &str>) -> Vec<Event> {
        let mut out = Vec::new();
        if !matches!(self.phase, Phase::AwaitStore) {
            return out;
        }
        match result {
            Ok(id) => {
                let id: String = id.chars().filter(|c| c.is_ascii_graphic()).collect();
                tracing::info!(peer = %self.peer, queue_id = %id, "message accepted");
                out.push(Event::Reply(reply(
                    250,
                    (2, 0, 0),
                    format!("Ok: queued as {id}"),
                )));
                self.accepted.push(id);
            }
            Err(reason) => {
                tracing::warn!(peer = %self.peer, %reason, "message not stored");
                out.push(Event::Reply(reply(
                    451,
                    (4, 3, 0),
                    "Error: queue file write error",
                )));
            }
        }
        self.phase = Phase::Command;
        self.resume(&mut out);
        out
    }

    /// The driver's answer to [`Event::Authenticate`]: were the credentials valid?
    pub fn auth_result(&mut self, ok: bool) -> Vec<Event> {
        let mut out = Vec::new();
        let Phase::AwaitAuth = self.phase else {
            return out;
        };
        self.phase = Phase::Command;
        let user = self.pending_user.take();
        if ok {
            tracing::info!(peer = %self.peer, user = user.as_deref().unwrap_or(""), "AUTH ok");
            self.auth_user = user;
            out.push(Event::Reply(reply(
                235,
                (2, 7, 0),
                "Authentication successful",
            )));
        } else {
            tracing::warn!(peer = %self.peer, user = user.as_deref().unwrap_or(""), "AUTH failed");
            self.auth_failed(&mut out);
        }
        self.resume(&mut out);
        out
    }

    /// The driver completed the TLS handshake after [`Event::StartTls`]. The session
    /// starts afresh (RFC 3207 §4.2): the client must EHLO again.
    pub fn tls_established(&mut self) {
        if !matches!(self.phase, Phase::AwaitTls) {
            return;
        }
        self.tls = true;
        self.helo = None;
        self.txn = None;
        self.input.clear();
        self.skip_line = false;
        self.phase = Phase::Command;
    }

    /// The client was idle too long: `421 4.4.2` and close. A message being received
    /// is dropped.
    pub fn timeout(&mut self) -> Vec<Event> {
        self.close_with(
            reply(
                421,
                (4, 4, 2),
                format!("{} Error: timeout exceeded", self.cfg.hostname),
            ),
            CloseReason::Timeout,
        )
    }

    /// Is a message being received (between `354` and its end, or being stored)?
    pub fn receiving_data(&self) -> bool {
        matches!(self.phase, Phase::Data(_) | Phase::AwaitStore)
    }

    /// The server is going down: `421 4.3.2` and close.
    pub fn shutdown(&mut self) -> Vec<Event> {
        self.close_with(
            reply(
                421,
                (4, 3, 2),
                format!("{} Service shutting down", self.cfg.hostname),
            ),
            CloseReason::Shutdown,
        )
    }

    fn close_with(&mut self, r: Reply, reason: CloseReason) -> Vec<Event> {
        let mut out = Vec::new();
        if !matches!(self.phase, Phase::Closed(_)) {
            self.close(&mut out, r, reason);
        }
        out
    }

    fn close(&mut self, out: &mut Vec<Event>, r: Reply, reason: CloseReason) {
        out.push(Event::Reply(r));
        out.push(Event::Close);
        self.phase = Phase::Closed(reason);
        self.txn = None;
        self.pending = None;
        self.input = Vec::new();
    }

    /// After a pause: process what was pipelined meanwhile.
    fn resume(&mut self, out: &mut Vec<Event>) {
        if matches!(self.phase, Phase::Closed(_)) {
            return;
        }
        // Too much was pipelined during the pause: close now, before processing it, so a
        // `Message`/`Authenticate` event is never followed by more events in its batch
        // (found by the smtp_session fuzz target).
        if self.overflow {
            self.close(
                out,
                reply(
                    421,
                    (4, 7, 0),
                    format!("{} Error: too much pipelined input", self.cfg.hostname),
                ),
                CloseReason::InputOverflow,
            );
            return;
        }
        self.run(out);
    }

    /// Parameters of MAIL and RCPT need EHLO, and each may appear once.
    fn check_param<'k>(&self, seen: &mut Vec<&'k str>, key: &'k str) -> Result<(), Reply> {
        if !self.esmtp() {
            return Err(reply(
                555,
                (5, 5, 4),
                "Error: parameters need EHLO, not HELO",
            ));
        }
        if seen.contains(&key) {
            return Err(reply(
                501,
                (5, 5, 4),
                format!("Error: duplicate {} parameter", clip(key)),
            ));
        }
        seen.push(key);
        Ok(())
    }

    /// A 4xx/5xx reply to the client's input; counts towards `max_errors`.
    fn error(&mut self, out: &mut Vec<Event>, r: Reply) {
        out.push(Event::Reply(r));
        self.errors += 1;
        if self.errors >= self.cfg.max_errors {
            self.close(
                out,
                reply(
                    421,
                    (4, 7, 0),
                    format!("{} Error: too many errors", self.cfg.hostname),
                ),
                CloseReason::TooManyErrors,
            );
        }
    }

    /// A reply that does not count as a client error.
    fn ok(out: &mut Vec<Event>, r: Reply) {
        out.push(Event::Reply(r));
    }

    /// Processes buffered input until it runs out or the session pauses.
    fn run(&mut self, out: &mut Vec<Event>) {
        let input = std::mem::take(&mut self.input);
        let mut pos = 0;
        loop {
            match &mut self.phase {
                Phase::Command | Phase::AuthResponse => {
                    let rest = &input[pos..];
                    if self.skip_line {
                        match rest.iter().position(|&b| b == b'\n') {
                            Some(i) => {
                                pos += i + 1;
                                self.skip_line = false;
                                continue;
                            }
                            None => {
                                pos = input.len();
                                break;
                            }
                        }
                    }
                    let limit = self.cfg.max_line_length.max(3);
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(i) if i < limit => {
                            pos += i + 1;
                            self.line(&rest[..i], out);
                        }
                        Some(i) => {
                            pos += i + 1;
                            self.line_too_long(out);
                        }
                        None if rest.len() >= limit => {
                            pos = input.len();
                            self.skip_line = true;
                            self.line_too_long(out);
                            break;
                        }
                        None => break,
                    }
                }
                Phase::Data(rx) => {
                    let (used, done) = rx.ingest(&input[pos..]);
                    pos += used;
                    if !done {
                        break;
                    }
                    let Phase::Data(rx) = std::mem::replace(&mut self.phase, Phase::Command) else {
                        unreachable!("phase was Data")
                    };
                    self.data_done(*rx, out);
                }
                Phase::AwaitStore | Phase::AwaitAuth => break,
                Phase::AwaitTls | Phase::Closed(_) => {
                    // Anything after STARTTLS is discarded (CVE-2011-0411).
                    pos = input.len();
                    break;
                }
            }
        }
        let mut input = input;
        input.drain(..pos);
        self.input = input;
    }

    fn line_too_long(&mut self, out: &mut Vec<Event>) {
        if let Phase::AuthResponse = self.phase {
            self.phase = Phase::Command;
            self.error(
                out,
                reply(500, (5, 5, 6), "Authentication exchange line is too long"),
            );
        } else {
            self.error(out, reply(500, (5, 5, 2), "Error: line too long"));
        }
    }

    /// One input line (LF removed) in the Command or AuthResponse phase.
    fn line(&mut self, raw: &[u8], out: &mut Vec<Event>) {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let auth = matches!(self.phase, Phase::AuthResponse);
        if auth {
            self.phase = Phase::Command;
        }
        if raw.contains(&0) {
            return self.error(
                out,
                reply(500, (5, 5, 2), "Error: NUL character in command"),
            );
        }
        if raw.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return self.error(
                out,
                reply(500, (5, 5, 2), "Error: control character in command"),
            );
        }
        let Ok(line) = std::str::from_utf8(raw) else {
            return self.error(
                out,
                reply(500, (5, 5, 2), "Error: invalid UTF-8 in command"),
            );
        };
        let line = line.trim_end_matches([' ', '\t']);
        if auth {
            return self.auth_response(line, out);
        }
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v, a.trim_start_matches(' ')),
            None => (line, ""),
        };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => self.cmd_helo(arg, true, out),
            "HELO" => self.cmd_helo(arg, false, out),
            "MAIL" => self.cmd_mail(arg, out),
            "RCPT" => self.cmd_rcpt(arg, out),
            "DATA" => self.cmd_data(arg, out),
            "RSET" => {
                if arg.is_empty() {
                    self.txn = None;
                    Self::ok(out, reply(250, (2, 0, 0), "Ok"));
                } else {
                    self.error(out, reply(501, (5, 5, 4), "Syntax: RSET"));
                }
            }
            "NOOP" => Self::ok(out, reply(250, (2, 0, 0), "Ok")),
            "QUIT" => self.close(out, reply(221, (2, 0, 0), "Bye"), CloseReason::Quit),
            "VRFY" => {
                if arg.is_empty() {
                    self.error(out, reply(501, (5, 5, 4), "Syntax: VRFY address"));
                } else {
                    Self::ok(
                        out,
                        reply(
                            252,
                            (2, 0, 0),
                            "Cannot VRFY user, but will accept message and attempt delivery",
                        ),
                    );
                }
            }
            "STARTTLS" => self.cmd_starttls(arg, out),
            "AUTH" => self.cmd_auth(arg, out),
            "EXPN" | "HELP" | "BDAT" | "ETRN" | "TURN" | "ATRN" => {
                self.error(out, reply(502, (5, 5, 1), "Error: command not implemented"))
            }
            "GET" | "POST" | "HEAD" | "PUT" | "CONNECT" | "OPTIONS" => {
                tracing::info!(peer = %self.peer, verb, "non-SMTP command, disconnecting");
                self.close(
                    out,
                    reply(521, (5, 7, 0), "Error: this is an SMTP server"),
                    CloseReason::ForeignProtocol,
                );
            }
            "" => self.error(out, reply(500, (5, 5, 2), "Error: bad syntax")),
            _ => self.error(out, reply(500, (5, 5, 2), "Error: command not recognized")),
        }
    }

    fn cmd_helo(&mut self, arg: &str, esmtp: bool, out: &mut Vec<Event>) {
        if arg.is_empty() || arg.len() > MAX_HELO {
            let verb = if esmtp { "EHLO" } else { "HELO" };
            return self.error(
                out,
                reply(501, (5, 5, 4), format!("Syntax: {verb} hostname")),
            );
        }
        self.helo = Some(Helo {
            name: arg.to_string(),
            esmtp,
        });
        self.txn = None;
        let host = self.cfg.hostname.clone();
        if !esmtp {
            return Self::ok(out, Reply::new(250, None, host));
        }
        let mut lines = vec![
            host,
            "PIPELINING".to_string(),
            format!("SIZE {}", self.cfg.max_message_size),
        ];
        if self.cfg.starttls_available && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.cfg.auth_available && self.tls {
            lines.push("AUTH PLAIN".into());
        }
        for ext in ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"] {
            lines.push(ext.into());
        }
        Self::ok(
            out,
            Reply {
                code: 250,
                enhanced: None,
                lines,
            },
        );
    }

    fn esmtp(&self) -> bool {
        self.helo.as_ref().is_some_and(|h| h.esmtp)
    }

    fn auth_offered(&self) -> bool {
        self.cfg.auth_available && self.tls
    }

    fn cmd_mail(&mut self, arg: &str, out: &mut Vec<Event>) {
        if self.helo.is_none() {
            return self.error(out, reply(503, (5, 5, 1), "Error: send HELO/EHLO first"));
        }
        if self.txn.is_some() {
            return self.error(out, reply(503, (5, 5, 1), "Error: nested MAIL command"));
        }
        let syntax = || reply(501, (5, 5, 4), "Syntax: MAIL FROM:<address>");
        let Some(rest) = strip_prefix_ci(arg, "FROM:") else {
            return self.error(out, syntax());
        };
        let Some((inner, params)) = split_path(rest.trim_start_matches(' ')) else {
            return self.error(out, syntax());
        };
        let mail_from = if inner.is_empty() {
            String::new()
        } else {
            match parse_path(inner) {
                Ok(m) => m,
                Err(e) => return self.error(out, path_error(e, 7, "sender")),
            }
        };
        let Ok(params) = parse_params(params) else {
            return self.error(out, reply(501, (5, 5, 4), "Error: bad parameter syntax"));
        };
        let mut txn = Transaction {
            mail_from,
            body_type: None,
            declared_size: None,
            smtputf8: false,
            ret: None,
            envid: None,
            recipients: Vec::new(),
            rcpt_attempts: 0,
        };
        let mut seen: Vec<&str> = Vec::new();
        for (key, value) in &params {
            let key = key.as_str();
            if let Err(r) = self.check_param(&mut seen, key) {
                return self.error(out, r);
            }
            let bad = || reply(501, (5, 5, 4), format!("Error: bad {key} parameter"));
            match (key, value) {
                ("SIZE", Some(v)) if is_size(v) => {
                    txn.declared_size = Some(v.parse().unwrap_or(u64::MAX));
                }
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => {
                    txn.body_type = Some(BodyType::SevenBit);
                }
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                    txn.body_type = Some(BodyType::EightBitMime);
                }
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("BINARYMIME") => {
                    return self.error(
                        out,
                        reply(555, (5, 5, 4), "Error: BODY=BINARYMIME is not supported"),
                    );
                }
                ("SMTPUTF8", None) => txn.smtputf8 = true,
                ("RET", Some(v)) if v.eq_ignore_ascii_case("FULL") => txn.ret = Some(Ret::Full),
                ("RET", Some(v)) if v.eq_ignore_ascii_case("HDRS") => txn.ret = Some(Ret::Hdrs),
                ("ENVID", Some(v)) if v.len() <= MAX_ENVID => match xtext_decode(v) {
                    Some(id) if id.bytes().all(|b| (0x20..0x7f).contains(&b)) => {
                        txn.envid = Some(id)
                    }
                    _ => return self.error(out, bad()),
                },
                // RFC 4954 §5: accepted (and not trusted) when AUTH is offered.
                ("AUTH", Some(v)) if self.auth_offered() => {
                    if xtext_decode(v).is_none() {
                        return self.error(out, bad());
                    }
                }
                ("SIZE" | "BODY" | "SMTPUTF8" | "RET" | "ENVID", _) => {
                    return self.error(out, bad());
                }
                _ => {
                    return self.error(
                        out,
                        reply(
                            555,
                            (5, 5, 4),
                            format!("Error: unsupported parameter {}", clip(key)),
                        ),
                    );
                }
            }
        }
        if txn
            .declared_size
            .is_some_and(|s| s > self.cfg.max_message_size as u64)
        {
            return self.error(
                out,
                reply(552, (5, 3, 4), "Error: message size exceeds fixed limit"),
            );
        }
        if !txn.smtputf8 && !txn.mail_from.is_ascii() {
            return self.error(
                out,
                reply(
                    553,
                    (5, 6, 7),
                    "Error: non-ASCII sender address needs SMTPUTF8",
                ),
            );
        }
        self.txn = Some(txn);
        Self::ok(out, reply(250, (2, 1, 0), "Ok"));
    }

    fn cmd_rcpt(&mut self, arg: &str, out: &mut Vec<Event>) {
        let Some(txn) = self.txn.as_mut() else {
            return self.error(out, reply(503, (5, 5, 1), "Error: need MAIL command"));
        };
        txn.rcpt_attempts += 1;
        let smtputf8 = txn.smtputf8;
        let syntax = || reply(501, (5, 5, 4), "Syntax: RCPT TO:<address>");
        let Some(rest) = strip_prefix_ci(arg, "TO:") else {
            return self.error(out, syntax());
        };
        let Some((inner, params)) = split_path(rest.trim_start_matches(' ')) else {
            return self.error(out, syntax());
        };
        let address = match parse_path(inner) {
            Ok(m) => m,
            Err(e) => return self.error(out, path_error(e, 3, "recipient")),
        };
        let Ok(params) = parse_params(params) else {
            return self.error(out, reply(501, (5, 5, 4), "Error: bad parameter syntax"));
        };
        let mut rcpt = Recipient {
            address,
            notify: None,
            orcpt: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        for (key, value) in &params {
            let key = key.as_str();
            if let Err(r) = self.check_param(&mut seen, key) {
                return self.error(out, r);
            }
            let bad = || reply(501, (5, 5, 4), format!("Error: bad {key} parameter"));
            match (key, value) {
                ("NOTIFY", Some(v)) => match parse_notify(v) {
                    Some(n) => rcpt.notify = Some(n),
                    None => return self.error(out, bad()),
                },
                ("ORCPT", Some(v)) => match parse_orcpt(v) {
                    Some(o) => rcpt.orcpt = Some(o),
                    None => return self.error(out, bad()),
                },
                ("NOTIFY" | "ORCPT", None) => return self.error(out, bad()),
                _ => {
                    return self.error(
                        out,
                        reply(
                            555,
                            (5, 5, 4),
                            format!("Error: unsupported parameter {}", clip(key)),
                        ),
                    );
                }
            }
        }
        if !smtputf8 && !rcpt.address.is_ascii() {
            return self.error(
                out,
                reply(
                    553,
                    (5, 6, 7),
                    "Error: non-ASCII recipient address needs SMTPUTF8",
                ),
            );
        }
        // R105/R106: this relay has no local domains, so every recipient is relayed and
        // only the client decides; the address form (%-hack, quotes, route, bang path)
        // cannot change that.
        if !self.may_relay() {
            tracing::info!(peer = %self.peer, rcpt = %rcpt.address, "relay access denied");
            let text = format!("<{}>: Relay access denied", rcpt.address);
            return self.error(out, reply(550, (5, 7, 1), text));
        }
        let Some(txn) = self.txn.as_mut() else {
            return;
        };
        if txn.recipients.len() >= self.cfg.max_recipients {
            // Not counted as an error: the client is expected to go on with the
            // accepted recipients and send the rest in another transaction.
            return Self::ok(out, reply(452, (4, 5, 3), "Error: too many recipients"));
        }
        txn.recipients.push(rcpt);
        Self::ok(out, reply(250, (2, 1, 5), "Ok"));
    }

    /// R105: may this client relay? (There are no local recipients.)
    fn may_relay(&self) -> bool {
        self.cfg.client_allowed || self.auth_user.is_some()
    }

    fn cmd_data(&mut self, arg: &str, out: &mut Vec<Event>) {
        if !arg.is_empty() {
            return self.error(out, reply(501, (5, 5, 4), "Syntax: DATA"));
        }
        let Some(txn) = self.txn.as_ref() else {
            return self.error(out, reply(503, (5, 5, 1), "Error: need MAIL command"));
        };
        if txn.recipients.is_empty() {
            return if txn.rcpt_attempts == 0 {
                self.error(out, reply(503, (5, 5, 1), "Error: need RCPT command"))
            } else {
                self.error(out, reply(554, (5, 5, 1), "Error: no valid recipients"))
            };
        }
        let Some(txn) = self.txn.take() else {
            return;
        };
        let envelope = Box::new(InboundEnvelope {
            mail_from: txn.mail_from,
            recipients: txn.recipients,
            ret: txn.ret,
            envid: txn.envid,
            smtputf8: txn.smtputf8,
            body_type: txn.body_type,
            declared_size: txn.declared_size,
            helo: self
                .helo
                .as_ref()
                .map(|h| h.name.clone())
                .unwrap_or_default(),
            esmtp: self.esmtp(),
            peer_ip: self.peer,
            tls: self.tls,
            authenticated_user: self.auth_user.clone(),
        });
        let header = if self.cfg.add_received_header {
            received_header(&envelope, &self.cfg.hostname, SystemTime::now())
        } else {
            String::new()
        };
        self.pending = Some(envelope);
        self.phase = Phase::Data(Box::new(DataReceiver::new(
            header.into_bytes(),
            self.cfg.max_message_size,
            self.cfg.max_data_line_length,
        )));
        out.push(Event::Reply(Reply::new(
            354,
            None,
            "End data with <CR><LF>.<CR><LF>",
        )));
    }

    fn data_done(&mut self, rx: DataReceiver, out: &mut Vec<Event>) {
        let Some(envelope) = self.pending.take() else {
            return;
        };
        if rx.too_big {
            tracing::info!(peer = %self.peer, size = rx.size, "message too big, discarded");
            return self.error(out, reply(552, (5, 3, 4), "Error: message file too big"));
        }
        if rx.line_too_long {
            tracing::info!(peer = %self.peer, "message line too long, discarded");
            return self.error(
                out,
                reply(
                    554,
                    (5, 6, 0),
                    format!(
                        "Error: message line longer than {} octets",
                        self.cfg.max_data_line_length
                    ),
                ),
            );
        }
        self.phase = Phase::AwaitStore;
        out.push(Event::Message {
            envelope,
            body: rx.body,
        });
    }

    fn cmd_starttls(&mut self, arg: &str, out: &mut Vec<Event>) {
        if !arg.is_empty() {
            return self.error(out, reply(501, (5, 5, 4), "Syntax: STARTTLS"));
        }
        if self.tls {
            return self.error(out, reply(554, (5, 5, 1), "Error: TLS already active"));
        }
        if !self.cfg.starttls_available {
            return self.error(out, reply(502, (5, 5, 1), "Error: command not implemented"));
        }
        if !self.esmtp() {
            return self.error(out, reply(503, (5, 5, 1), "Error: send EHLO first"));
        }
        if self.txn.is_some() {
            return self.error(
                out,
                reply(503, (5, 5, 1), "Error: MAIL transaction in progress"),
            );
        }
        out.push(Event::Reply(reply(220, (2, 0, 0), "Ready to start TLS")));
        out.push(Event::StartTls);
        self.phase = Phase::AwaitTls;
    }

    fn cmd_auth(&mut self, arg: &str, out: &mut Vec<Event>) {
        if !self.cfg.auth_available {
            return self.error(
                out,
                reply(502, (5, 5, 1), "Error: authentication not enabled"),
            );
        }
        if !self.tls {
            return self.error(
                out,
                reply(
                    538,
                    (5, 7, 11),
                    "Encryption required for requested authentication mechanism",
                ),
            );
        }
        if self.auth_user.is_some() {
            return self.error(out, reply(503, (5, 5, 1), "Error: already authenticated"));
        }
        if !self.esmtp() {
            return self.error(out, reply(503, (5, 5, 1), "Error: send EHLO first"));
        }
        if self.txn.is_some() {
            return self.error(
                out,
                reply(503, (5, 5, 1), "Error: MAIL transaction in progress"),
            );
        }
        let (mechanism, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m, Some(i.trim_start_matches(' '))),
            None => (arg, None),
        };
        if mechanism.is_empty() {
            return self.error(out, reply(501, (5, 5, 4), "Syntax: AUTH mechanism"));
        }
        if !mechanism.eq_ignore_ascii_case("PLAIN") {
            return self.error(
                out,
                reply(504, (5, 5, 4), "Unrecognized authentication type"),
            );
        }
        match initial {
            None => {
                self.phase = Phase::AuthResponse;
                out.push(Event::Reply(Reply::new(334, None, "")));
            }
            Some("=") => self.auth_plain(b"", out),
            Some(ir) => match base64_decode(ir) {
                Some(bytes) => self.auth_plain(&bytes, out),
                None => self.error(
                    out,
                    reply(501, (5, 5, 2), "Error: cannot decode AUTH response"),
                ),
            },
        }
    }

    fn auth_response(&mut self, line: &str, out: &mut Vec<Event>) {
        if line == "*" {
            return self.error(out, reply(501, (5, 0, 0), "Authentication cancelled"));
        }
        match base64_decode(line) {
            Some(bytes) => self.auth_plain(&bytes, out),
            None => self.error(
                out,
                reply(501, (5, 5, 2), "Error: cannot decode AUTH response"),
            ),
        }
    }

    /// RFC 4616: `[authzid] NUL authcid NUL passwd`.
    fn auth_plain(&mut self, msg: &[u8], out: &mut Vec<Event>) {
        let parts: Vec<&[u8]> = msg.split(|&b| b == 0).collect();
        let creds = match parts[..] {
            [z, c, p] => match (
                std::str::from_utf8(z),
                std::str::from_utf8(c),
                std::str::from_utf8(p),
            ) {
                (Ok(z), Ok(c), Ok(p)) if !c.is_empty() && (z.is_empty() || z == c) => {
                    Some(Credentials {
                        authzid: z.to_string(),
                        username: c.to_string(),
                        password: p.to_string(),
                    })
                }
                _ => None,
            },
            _ => None,
        };
        let Some(creds) = creds else {
            return self.auth_failed(out);
        };
        self.pending_user = Some(creds.username.clone());
        self.phase = Phase::AwaitAuth;
        out.push(Event::Authenticate(creds));
    }

    /// `535 5.7.8`; after `max_auth_failures` of them, `421 4.7.0` and close (R107).
    fn auth_failed(&mut self, out: &mut Vec<Event>) {
        self.auth_failures += 1;
        self.error(out, reply(535, (5, 7, 8), "Error: authentication failed"));
        if self.auth_failures >= self.cfg.max_auth_failures
            && !matches!(self.phase, Phase::Closed(_))
        {
            let text = format!(
                "{} Error: too many authentication failures",
                self.cfg.hostname
            );
            self.close(
                out,
                reply(421, (4, 7, 0), text),
                CloseReason::TooManyAuthFailures,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_keep_the_address_as_written_and_strip_routes() {
        assert_eq!(split_path("<a@b.example>"), Some(("a@b.example", "")));
        assert_eq!(
            split_path("<a@b.example>  SIZE=1 BODY=8BITMIME"),
            Some(("a@b.example", "SIZE=1 BODY=8BITMIME"))
        );
        assert_eq!(
            split_path("<\"a>b\"@c.example>"),
            Some(("\"a>b\"@c.example", ""))
        );
        assert_eq!(split_path("<a@b.example>SIZE=1"), None);
        assert_eq!(split_path("a@b.example"), None);
        assert_eq!(split_path("<a@b.example"), None);

        assert_eq!(parse_path("u@example.com").as_deref(), Ok("u@example.com"));
        assert_eq!(
            parse_path("@relay.local,@hop.test:u@external.test").as_deref(),
            Ok("u@external.test")
        );
        assert_eq!(
            parse_path("\"u@external.test\"@relay.local").as_deref(),
            Ok("\"u@external.test\"@relay.local")
        );
        assert_eq!(
            parse_path("\"a\\\"b c\"@x.example").as_deref(),
            Ok("\"a\\\"b c\"@x.example")
        );
        assert!(parse_path("u%external.test@relay.local").is_ok());
        assert!(parse_path("external.test!u@relay.local").is_ok());
        assert!(parse_path("u@[192.0.2.1]").is_ok());
        assert!(parse_path("u@[IPv6:2001:db8::1]").is_ok());
        assert!(parse_path("用户@例子.测试").is_ok());
        for bad in [
            "postmaster",
            "external.test!u",
            "u@",
            "@x.example",
            "u@x..example",
            "u@x.example.",
            "u@-x.example",
            "u@x_y.example",
            "u..v@x.example",
            ".u@x.example",
            "u@x.example@y.example",
            "\"unterminated@x.example",
            "\"a\"b@x.example",
            "u@[300.1.1.1]",
            "u@[tag:whatever]",
            "@relay.local u@x.example",
            "@relay..local:u@x.example",
            "u v@x.example",
        ] {
            assert_eq!(parse_path(bad), Err(AddrError::Syntax), "{bad}");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(parse_path(&long), Err(AddrError::TooLong));
    }

    #[test]
    fn params_and_dsn_values() {
        assert_eq!(
            parse_params("SIZE=10 smtputf8").unwrap(),
            vec![
                ("SIZE".to_string(), Some("10")),
                ("SMTPUTF8".to_string(), None)
            ]
        );
        assert!(parse_params("SIZE=").is_err());
        assert!(parse_params("=1").is_err());
        assert!(parse_params("A=b=c").is_err());
        assert_eq!(parse_notify("never"), Some(Notify::NEVER));
        assert_eq!(
            parse_notify("SUCCESS,DELAY"),
            Some(Notify {
                success: true,
                failure: false,
                delay: true
            })
        );
        assert_eq!(parse_notify("NEVER,SUCCESS"), None);
        assert_eq!(parse_notify("SUCCESS,"), None);
        assert_eq!(
            parse_orcpt("rfc822;bob+40example.com"),
            Some(Orcpt {
                addr_type: "rfc822".into(),
                address: "bob@example.com".into()
            })
        );
        assert_eq!(parse_orcpt("rfc822"), None);
        assert_eq!(parse_orcpt("rfc 822;x"), None);
        assert_eq!(xtext_decode("a+2b+2B"), Some("a++".into()));
        assert_eq!(xtext_decode("a+2"), None);
        assert_eq!(xtext_decode("a=b"), None);
        assert_eq!(xtext_decode("+C3+A9"), Some("é".into()));
        assert_eq!(xtext_decode(&xtext_encode("é x+=")), Some("é x+=".into()));
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("AHUAcA==").unwrap(), b"\0u\0p");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert!(base64_decode("YWI").is_none());
        assert!(base64_decode("YW=j").is_none());
        assert!(base64_decode("Y===").is_none());
        assert!(base64_decode("YW==YWJj").is_none());
        assert!(base64_decode("YW!j").is_none());
    }

    fn data(chunks: &[&[u8]], limit: usize) -> (DataReceiver, Option<usize>) {
        let mut rx = DataReceiver::new(Vec::new(), limit, 1000);
        for (n, chunk) in chunks.iter().enumerate() {
            let (used, done) = rx.ingest(chunk);
            if done {
                assert!(n + 1 == chunks.len(), "ended early");
                return (rx, Some(used));
            }
            assert_eq!(used, chunk.len());
        }
        (rx, None)
    }

    #[test]
    fn data_unstuffing_and_end() {
        let (rx, end) = data(&[b"a\r\n..b\r\n.\r\nQUIT\r\n"], 100);
        assert_eq!(rx.body, b"a\r\n.b\r\n");
        assert_eq!(end, Some(11));
        // Split anywhere.
        let (rx, end) = data(&[b"a\r", b"\n.", b".", b"b\r\n", b".", b"\r", b"\n"], 100);
        assert_eq!(rx.body, b"a\r\n.b\r\n");
        assert_eq!(end, Some(1));
        // Empty message.
        let (rx, end) = data(&[b".\r\n"], 100);
        assert_eq!(rx.body, b"");
        assert_eq!(end, Some(3));
        // A first line with a stuffed dot.
        let (rx, _) = data(&[b"..x\r\n.\r\n"], 100);
        assert_eq!(rx.body, b".x\r\n");
    }

    #[test]
    fn data_smuggling_sequences_do_not_end_the_message() {
        for seq in [
            &b"x\n.\r\n"[..],
            b"x\r\n.\n",
            b"x\r.\r\n",
            b"x\n.\n",
            b"x\r\n.\rQ\r\n",
        ] {
            let (rx, end) = data(&[seq], 100);
            assert_eq!(end, None, "{seq:?}");
            let b = &rx.body;
            assert!((0..b.len()).all(|i| b[i] != b'\n' || (i > 0 && b[i - 1] == b'\r')));
        }
        // Bare LF becomes CRLF; a dot after it is content.
        let (rx, _) = data(&[b"x\n.\r\n"], 100);
        assert_eq!(rx.body, b"x\r\n.\r\n");
        // ".\rQ" at a line start: the dot was stuffing, the CR is kept.
        let (rx, _) = data(&[b"x\r\n.\rQ\r\n"], 100);
        assert_eq!(rx.body, b"x\r\n\rQ\r\n");
    }

    #[test]
    fn data_limits() {
        let (rx, end) = data(&[b"0123456789\r\n", b"abc\r\n.\r\n"], 12);
        assert!(rx.too_big && end.is_some());
        assert!(rx.body.is_empty());
        let (rx, _) = data(&[b"0123456789\r\n.\r\n"], 12);
        assert!(!rx.too_big);
        assert!(rx.body.capacity() <= 12);
        let long = vec![b'x'; 1001];
        let (rx, end) = data(&[&long, b"\r\n.\r\n"], 1 << 20);
        assert!(rx.line_too_long && end.is_some());
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_751_371_200),
            "Tue, 1 Jul 2025 12:00:00 +0000"
        );
        assert_eq!(
            rfc5322_date(4_102_444_799),
            "Thu, 31 Dec 2099 23:59:59 +0000"
        );
    }

    #[test]
    fn received_header_forms() {
        let mut env = InboundEnvelope {
            mail_from: "a@b.example".into(),
            recipients: vec![Recipient {
                address: "c@d.example".into(),
                notify: None,
                orcpt: None,
            }],
            ret: None,
            envid: None,
            smtputf8: false,
            body_type: None,
            declared_size: None,
            helo: "client.example".into(),
            esmtp: true,
            peer_ip: "2001:db8::5".parse().unwrap(),
            tls: true,
            authenticated_user: Some("u".into()),
        };
        let at = UNIX_EPOCH + Duration::from_secs(1_751_371_200);
        assert_eq!(
            received_header(&env, "relay.example", at),
            "Received: from client.example ([IPv6:2001:db8::5])\r\n\
             \tby relay.example (stsrelay) with ESMTPSA\r\n\
             \tfor <c@d.example>; Tue, 1 Jul 2025 12:00:00 +0000\r\n"
        );
        env.helo = "bad (helo)".into();
        env.recipients.push(env.recipients[0].clone());
        env.tls = false;
        env.authenticated_user = None;
        assert_eq!(
            received_header(&env, "relay.example", at),
            "Received: from [IPv6:2001:db8::5] (HELO bad??helo?)\r\n\
             \tby relay.example (stsrelay) with ESMTP;\r\n\
             \tTue, 1 Jul 2025 12:00:00 +0000\r\n"
        );
    }

    #[test]
    fn reply_wire_form() {
        let r = reply(550, (5, 7, 1), "no\r\ninjection");
        assert_eq!(r.to_string(), "550 5.7.1 no??injection\r\n");
        let r = Reply {
            code: 250,
            enhanced: None,
            lines: vec!["a".into(), "b".into()],
        };
        assert_eq!(r.to_string(), "250-a\r\n250 b\r\n");
    }
}
