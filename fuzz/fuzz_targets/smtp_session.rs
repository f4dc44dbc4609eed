#![no_main]
//! The sans-I/O SMTP server session (`smtp::inbound::Session`) driven like a driver
//! would: the input is fed in chunks, every `Message` / `Authenticate` / `StartTls` is
//! answered, and the session's contract is checked on every event.
//!
//! Input layout (so that seeds stay readable SMTP text after a 4-byte header):
//!
//! * byte 0, flags: bit0 `client_allowed`, bit1 `starttls_available`, bit2
//!   `auth_available`, bit3 *no* `Received:` header, bit4 defer answers (a pending
//!   `Message`/`Authenticate` is answered only after the next chunk was fed, and one
//!   chunk is fed while STARTTLS is pending), bit5 flood (the first chunk fed while an
//!   answer is pending is repeated past the session's 256 KiB pause buffer), bits6-7
//!   peer address (IPv4, IPv6, IPv4-mapped IPv6, IPv4).
//! * byte 1, limits: bits0-1 `max_message_size` (1000, 64, 0, 100000), bits2-3
//!   `max_recipients` (3, 1, 2, 100), bits4-5 command/body line limits ((4096, 65536),
//!   (512, 998), (64, 100), (0, 1)), bits6-7 `max_errors` (20, 3, 1, 0).
//! * byte 2, chunking: bits0-2 largest chunk (all at once, 1, 2, 3, 7, 16, 64, 300),
//!   bit3 `max_auth_failures` 3 or 1, bits4-7 seed of the chunk-size PRNG.
//! * byte 3, answers, used cyclically: bit clear = success (message stored / credentials
//!   valid), bit set = failure.
//! * the rest: the bytes the client sends.

use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};
use stsrelay::smtp::inbound::{
    Event, InboundEnvelope, Reply, Session, SessionConfig, received_header, rfc5322_date,
};

const HOST: &str = "relay.example";
/// The session's pause buffer (`PAUSED_INPUT_LIMIT` in src/smtp/inbound.rs).
const PAUSED_INPUT_LIMIT: usize = 256 * 1024;

/// What the session is waiting for, from the driver's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    Store,
    Auth,
    Tls,
}

struct Harness {
    session: Session,
    cfg: SessionConfig,
    peer: IpAddr,
    answers: u8,
    answer_no: u32,
    /// TLS as the driver knows it (set by `tls_established`).
    tls: bool,
    /// The user whose credentials the driver accepted.
    auth_user: Option<String>,
    /// The user of the outstanding `Authenticate`.
    asked_user: Option<String>,
    pending: Pending,
    closed: bool,
    /// 4xx/5xx replies that count towards `max_errors`.
    errors: usize,
    auth_failures: usize,
    messages: usize,
    stored: usize,
    /// `250 2.1.5` replies since the last `250 2.1.0` (MAIL accepted).
    rcpt_ok: usize,
    /// A `354` was sent and no message has come of it yet.
    in_data: bool,
}

impl Harness {
    fn next_answer_ok(&mut self) -> bool {
        let bit = (self.answers >> (self.answer_no % 8)) & 1;
        self.answer_no += 1;
        bit == 0
    }

    fn check_reply(&mut self, r: &Reply) {
        assert!((200..=599).contains(&r.code), "reply code {r:?}");
        assert!(!r.lines.is_empty(), "reply without text {r:?}");
        if let Some(e) = r.enhanced {
            assert_eq!(u16::from(e.class), r.code / 100, "enhanced class {r:?}");
        }
        if (300..400).contains(&r.code) {
            assert!(r.enhanced.is_none(), "3xx with enhanced code {r:?}");
        }
        // The wire form: one CRLF-terminated line per text line, each starting with the
        // code; no CR or LF anywhere else (no reply injection).
        let wire = r.to_string();
        let lines: Vec<&str> = wire.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), r.lines.len().max(1), "{wire:?}");
        let code = r.code.to_string();
        for (i, line) in lines.iter().enumerate() {
            assert!(!line.contains(['\r', '\n']), "{wire:?}");
            assert!(line.starts_with(&code), "{wire:?}");
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            assert_eq!(line[3..].chars().next(), Some(sep), "{wire:?}");
        }
        if r.code >= 400 && !matches!(r.code, 421 | 451 | 452 | 521) {
            self.errors += 1;
        }
        if r.code == 535 {
            self.auth_failures += 1;
        }
        let esc = r.enhanced.map(|e| (e.class, e.subject, e.detail));
        match (r.code, esc) {
            (250, Some((2, 1, 0))) => {
                self.rcpt_ok = 0;
                self.in_data = false;
            }
            (250, Some((2, 1, 5))) => self.rcpt_ok += 1,
            (354, _) => {
                assert!(self.rcpt_ok > 0, "354 without an accepted recipient");
                self.in_data = true;
            }
            _ => {}
        }
    }

    fn check_message(&mut self, envelope: &InboundEnvelope, body: &[u8]) {
        // Relaying needs an allowed client or a successful AUTH (R105).
        assert!(
            self.cfg.client_allowed || self.auth_user.is_some(),
            "message from a client that may not relay: {envelope:?}"
        );
        assert_eq!(envelope.authenticated_user, self.auth_user, "AUTH identity");
        assert!(!envelope.recipients.is_empty(), "message without recipients");
        assert!(self.in_data, "message without a 354");
        self.in_data = false;
        assert_eq!(
            envelope.recipients.len(),
            self.rcpt_ok,
            "recipients in the envelope vs 250 2.1.5 replies"
        );
        assert!(
            envelope.recipients.len() <= self.cfg.max_recipients,
            "{} recipients > max {}",
            envelope.recipients.len(),
            self.cfg.max_recipients
        );
        assert_eq!(envelope.tls, self.tls, "envelope TLS flag");
        assert_eq!(envelope.peer_ip, self.peer.to_canonical());
        assert!(!envelope.helo.is_empty());
        if let Some(size) = envelope.declared_size {
            assert!(size <= self.cfg.max_message_size as u64, "declared SIZE {size}");
        }
        if !envelope.smtputf8 {
            assert!(envelope.mail_from.is_ascii(), "{envelope:?}");
            assert!(envelope.recipients.iter().all(|r| r.address.is_ascii()));
        }
        if let Some(envid) = &envelope.envid {
            assert!(envid.bytes().all(|b| (0x20..0x7f).contains(&b)), "{envid:?}");
        }

        // The Received: header, with the date of "now" in place of a fixed one.
        let header_len = if self.cfg.add_received_header {
            let fixed = received_header(envelope, HOST, UNIX_EPOCH + Duration::ZERO);
            let suffix = format!("{}\r\n", rfc5322_date(0));
            let prefix = fixed.strip_suffix(&suffix).expect("header ends with the date");
            assert!(
                body.starts_with(prefix.as_bytes()),
                "body does not start with the Received: header {prefix:?}: {:?}",
                String::from_utf8_lossy(&body[..body.len().min(400)])
            );
            let rest = &body[prefix.len()..];
            let end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("Received: header ends with CRLF");
            let date = &rest[..end];
            assert!((29..=31).contains(&date.len()), "date {date:?}");
            assert!(date.ends_with(b" +0000"), "date {date:?}");
            prefix.len() + end + 2
        } else {
            0
        };
        // The content is counted after unstuffing, with CRLF line ends, without our
        // header; it never exceeds max_message_size.
        let content = &body[header_len..];
        assert!(
            content.len() <= self.cfg.max_message_size,
            "content of {} octets > max_message_size {}",
            content.len(),
            self.cfg.max_message_size
        );
        // CRLF line ends only (a bare LF is normalised), and the message ends on a line
        // end (the CRLF before the final dot belongs to the content).
        for (i, &b) in body.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && body[i - 1] == b'\r', "bare LF at {i} in {body:?}");
            }
        }
        assert!(content.is_empty() || content.ends_with(b"\r\n"), "{content:?}");
        // No line longer than the body line limit.
        for line in content.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(line.len() <= self.cfg.max_data_line_length, "line of {}", line.len());
        }
    }

    /// Checks a batch of events and records what the driver has to answer.
    fn handle(&mut self, events: Vec<Event>, origin: &str) {
        if self.closed {
            assert!(events.is_empty(), "events after Close ({origin}): {events:?}");
            return;
        }
        if self.pending != Pending::None {
            assert!(events.is_empty(), "events while paused ({origin}): {events:?}");
            return;
        }
        let n = events.len();
        for (i, event) in events.into_iter().enumerate() {
            let last = i + 1 == n;
            assert!(!self.closed, "event after Close ({origin})");
            match event {
                Event::Reply(r) => {
                    self.check_reply(&r);
                    if r.code == 235 {
                        assert_eq!(origin, "auth_result(true)", "235 without valid credentials");
                    }
                    if r.code == 250 && r.lines[0].starts_with("Ok: queued as") {
                        assert_eq!(origin, "message_stored(Ok)", "queued without a store");
                    }
                }
                Event::Message { envelope, body } => {
                    assert!(last, "Message not last in its batch ({origin})");
                    self.check_message(&envelope, &body);
                    self.messages += 1;
                    self.pending = Pending::Store;
                }
                Event::Authenticate(creds) => {
                    assert!(last, "Authenticate not last in its batch ({origin})");
                    assert!(self.cfg.auth_available && self.tls, "AUTH not offered");
                    assert!(self.auth_user.is_none(), "second AUTH");
                    assert!(!creds.username.is_empty());
                    assert!(creds.authzid.is_empty() || creds.authzid == creds.username);
                    self.asked_user = Some(creds.username);
                    self.pending = Pending::Auth;
                }
                Event::StartTls => {
                    assert!(last, "StartTls not last in its batch ({origin})");
                    assert!(self.cfg.starttls_available && !self.tls, "STARTTLS not offered");
                    self.pending = Pending::Tls;
                }
                Event::Close => {
                    assert!(last, "Close not last in its batch ({origin})");
                    assert!(self.session.close_reason().is_some());
                    self.closed = true;
                }
            }
        }
        assert!(self.errors <= self.cfg.max_errors.max(1), "{} errors", self.errors);
        assert!(self.auth_failures <= self.cfg.max_auth_failures.max(1));
    }

    /// Answers what the session waits for.
    fn answer(&mut self) {
        match self.pending {
            Pending::None => {}
            Pending::Store => {
                self.pending = Pending::None;
                let (events, origin) = if self.next_answer_ok() {
                    self.stored += 1;
                    let id = format!("Q{:05X}", self.stored);
                    (self.session.message_stored(Ok(&id)), "message_stored(Ok)")
                } else {
                    (self.session.message_stored(Err("disk full")), "message_stored(Err)")
                };
                self.handle(events, origin);
            }
            Pending::Auth => {
                self.pending = Pending::None;
                let ok = self.next_answer_ok();
                let user = self.asked_user.take();
                if ok {
                    self.auth_user = user;
                }
                let events = self.session.auth_result(ok);
                self.handle(
                    events,
                    if ok { "auth_result(true)" } else { "auth_result(false)" },
                );
                if ok && !self.closed {
                    assert_eq!(self.session.authenticated_user(), self.auth_user.as_deref());
                }
            }
            Pending::Tls => {
                self.pending = Pending::None;
                self.session.tls_established();
                self.tls = true;
                assert!(self.session.tls_active());
                assert_eq!(self.session.helo(), None, "EHLO forgotten after STARTTLS");
            }
        }
    }

    /// Answers until the session no longer waits (a resumed session may pause again).
    fn drain(&mut self) {
        while self.pending != Pending::None && !self.closed {
            self.answer();
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        let events = self.session.feed(chunk);
        self.handle(events, "feed");
    }
}

struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        // xorshift32
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[flags, limits, chunking, answers], input)) = data.split_first_chunk::<4>() else {
        return;
    };
    let mut cfg = SessionConfig::new(HOST);
    cfg.client_allowed = flags & 1 != 0;
    cfg.starttls_available = flags & 2 != 0;
    cfg.auth_available = flags & 4 != 0;
    cfg.add_received_header = flags & 8 == 0;
    let defer = flags & 16 != 0;
    let mut flood = flags & 32 != 0;
    let peer: IpAddr = match flags >> 6 {
        1 => "2001:db8::5".parse().unwrap(),
        2 => "::ffff:192.0.2.10".parse().unwrap(),
        _ => "192.0.2.10".parse().unwrap(),
    };
    cfg.max_message_size = [1000, 64, 0, 100_000][usize::from(limits & 3)];
    cfg.max_recipients = [3, 1, 2, 100][usize::from((limits >> 2) & 3)];
    (cfg.max_line_length, cfg.max_data_line_length) =
        [(4096, 65536), (512, 998), (64, 100), (0, 1)][usize::from((limits >> 4) & 3)];
    cfg.max_errors = [20, 3, 1, 0][usize::from(limits >> 6)];
    cfg.max_auth_failures = if chunking & 8 == 0 { 3 } else { 1 };
    let max_chunk = [usize::MAX, 1, 2, 3, 7, 16, 64, 300][usize::from(chunking & 7)];
    let mut rng = Rng(0x9E37_79B9 ^ (u32::from(chunking >> 4) << 8) ^ u32::from(flags));

    let session = Session::new(cfg.clone(), peer);
    let greeting = session.greeting();
    assert_eq!(greeting.code, 220);
    assert_eq!(greeting.to_string(), format!("220 {HOST} ESMTP\r\n"));
    let mut h = Harness {
        session,
        cfg,
        peer,
        answers,
        answer_no: 0,
        tls: false,
        auth_user: None,
        asked_user: None,
        pending: Pending::None,
        closed: false,
        errors: 0,
        auth_failures: 0,
        messages: 0,
        stored: 0,
        rcpt_ok: 0,
        in_data: false,
    };

    let mut rest = input;
    while !rest.is_empty() && !h.closed {
        let size = if max_chunk == usize::MAX {
            rest.len()
        } else {
            1 + (rng.next() as usize) % max_chunk
        };
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        if !defer {
            h.feed(chunk);
            h.drain();
        } else if h.pending == Pending::None {
            h.feed(chunk);
        } else if flood && h.pending != Pending::Tls {
            // A driver that keeps reading while the store or AUTH check runs, and a
            // client that pipelines far too much meanwhile.
            flood = false;
            let mut big = Vec::with_capacity(PAUSED_INPUT_LIMIT + 2 * chunk.len());
            while big.len() <= PAUSED_INPUT_LIMIT {
                big.extend_from_slice(chunk);
            }
            h.feed(&big);
            h.answer();
        } else {
            // The chunk arrives while the session waits: buffered (or, after STARTTLS,
            // discarded), then the answer resumes the session.
            h.feed(chunk);
            h.answer();
        }
    }
    h.drain();
    assert!(h.stored <= h.messages);
    assert_eq!(h.session.accepted().len(), h.stored);

    // After Close nothing more happens, whatever the driver does.
    if h.closed {
        assert!(h.session.close_reason().is_some());
        let events = h.session.feed(b"NOOP\r\nQUIT\r\n");
        h.handle(events, "feed after close");
        let events = h.session.message_stored(Ok("X"));
        h.handle(events, "message_stored after close");
        let events = h.session.auth_result(true);
        h.handle(events, "auth_result after close");
        h.session.tls_established();
        assert!(h.session.close_reason().is_some());
        let events = h.session.timeout();
        h.handle(events, "timeout after close");
        let events = h.session.shutdown();
        h.handle(events, "shutdown after close");
        assert_eq!(h.session.accepted().len(), h.stored);
    } else {
        // A session still open closes on an idle timeout.
        let events = h.session.timeout();
        assert!(
            matches!(&events[..], [Event::Reply(r), Event::Close] if r.code == 421),
            "{events:?}"
        );
    }
});
