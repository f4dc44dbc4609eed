//! The SMTP server session: the sans-I/O state machine driven with scripted input, and
//! the async driver over real loopback TCP (and STARTTLS). Checklist items: R105 and
//! R106 (never an open relay), R107 (AUTH only under TLS), R108 (trace header), R99
//! (DSN parameters carried into the envelope).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use stsrelay::smtp::inbound::{
    Authenticator, CloseReason, Credentials, Event, InboundEnvelope, MessageSink, Notify, Orcpt,
    Reply, Ret, ServeError, Session, SessionConfig, SessionEnd, SessionSummary, serve,
    serve_with_auth,
};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const PEER: &str = "192.0.2.10";

// ---------------------------------------------------------------------------------------
// Sans-I/O helpers
// ---------------------------------------------------------------------------------------

fn cfg(allowed: bool) -> SessionConfig {
    let mut c = SessionConfig::new("relay.test");
    c.client_allowed = allowed;
    c
}

fn session(c: SessionConfig) -> Session {
    Session::new(c, PEER.parse().unwrap())
}

fn replies(events: &[Event]) -> Vec<&Reply> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Reply(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// `"250 2.1.0"`-style heads of the replies (code and enhanced code).
fn heads(events: &[Event]) -> Vec<String> {
    replies(events)
        .iter()
        .map(|r| match r.enhanced {
            Some(e) => format!("{} {e}", r.code),
            None => r.code.to_string(),
        })
        .collect()
}

fn messages(events: &[Event]) -> Vec<(&InboundEnvelope, &Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { envelope, body } => Some((&**envelope, body)),
            _ => None,
        })
        .collect()
}

/// The body without our `Received:` header (first line plus its folded continuations).
fn strip_received(body: &[u8]) -> &[u8] {
    assert!(body.starts_with(b"Received: "), "no trace header");
    let mut i = 0;
    loop {
        let eol = body[i..].windows(2).position(|w| w == b"\r\n").unwrap() + i + 2;
        if body.get(eol) != Some(&b'\t') {
            return &body[eol..];
        }
        i = eol;
    }
}

fn ehlo(s: &mut Session) {
    let ev = s.feed(b"EHLO client.test\r\n");
    assert_eq!(heads(&ev), ["250"]);
}

// ---------------------------------------------------------------------------------------
// Sans-I/O: the conversation
// ---------------------------------------------------------------------------------------

#[test]
fn happy_path_with_pipelining() {
    let mut s = session(cfg(true));
    assert_eq!(s.greeting().to_string(), "220 relay.test ESMTP\r\n");
    let ev = s.feed(
        b"EHLO client.test\r\nMAIL FROM:<alice@client.test>\r\n\
          RCPT TO:<bob@one.example>\r\nRCPT TO:<carol@two.example>\r\nDATA\r\n",
    );
    assert_eq!(
        heads(&ev),
        ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "354"]
    );
    assert_eq!(
        replies(&ev)[4].to_string(),
        "354 End data with <CR><LF>.<CR><LF>\r\n"
    );
    let ev = s.feed(b"Subject: test\r\n\r\nHello\r\n.\r\n");
    assert!(matches!(ev.last(), Some(Event::Message { .. })));
    let msgs = messages(&ev);
    let (env, body) = msgs[0];
    assert_eq!(env.mail_from, "alice@client.test");
    let rcpts: Vec<&str> = env.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, ["bob@one.example", "carol@two.example"]);
    assert_eq!(env.helo, "client.test");
    assert!(env.esmtp && !env.tls && env.authenticated_user.is_none());
    assert_eq!(env.peer_ip, PEER.parse::<IpAddr>().unwrap());
    assert_eq!(strip_received(body), b"Subject: test\r\n\r\nHello\r\n");
    // R108: one trace header naming us and the client.
    let text = String::from_utf8_lossy(body);
    assert!(text.starts_with(
        "Received: from client.test ([192.0.2.10])\r\n\tby relay.test (stsrelay) with ESMTP;\r\n\t"
    ));
    assert_eq!(text.matches("Received:").count(), 1);

    // Nothing is acknowledged before the store says so; input meanwhile is buffered.
    assert!(s.feed(b"QUIT\r\n").is_empty());
    let ev = s.message_stored(Ok("Q1"));
    assert_eq!(
        replies(&ev)[0].to_string(),
        "250 2.0.0 Ok: queued as Q1\r\n"
    );
    assert_eq!(heads(&ev), ["250 2.0.0", "221 2.0.0"]);
    assert!(matches!(ev.last(), Some(Event::Close)));
    assert_eq!(s.close_reason(), Some(CloseReason::Quit));
    assert_eq!(s.accepted(), ["Q1"]);
    assert!(s.feed(b"NOOP\r\n").is_empty());
}

#[test]
fn store_failure_is_a_temporary_error_and_the_session_goes_on() {
    let mut s = session(cfg(true));
    s.feed(b"EHLO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n");
    let ev = s.feed(b"x\r\n.\r\n");
    assert_eq!(messages(&ev)[0].0.mail_from, "");
    let ev = s.message_stored(Err("disk full"));
    assert_eq!(heads(&ev), ["451 4.3.0"]);
    assert!(s.accepted().is_empty());
    // The transaction is over; a new one may start.
    let ev = s.feed(b"RCPT TO:<b@x.example>\r\nMAIL FROM:<a@c.test>\r\n");
    assert_eq!(heads(&ev), ["503 5.5.1", "250 2.1.0"]);
}

#[test]
fn dot_stuffing_and_line_ends() {
    let mut c = cfg(true);
    c.add_received_header = false;
    let mut s = session(c);
    s.feed(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n");
    // Stuffed dots, a lone stuffed dot, bare LF (normalised) and the bare-LF
    // smuggling sequence, which must not end the message.
    let ev = s.feed(
        b"..leading\r\n...two\r\n..\r\nbare\nlf\r\n\n.\r\nMAIL FROM:<evil@x.example>\r\nmid.dot\r\n.\r\n",
    );
    let msgs = messages(&ev);
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        msgs[0].1.as_slice(),
        &b".leading\r\n..two\r\n.\r\nbare\r\nlf\r\n\r\n.\r\nMAIL FROM:<evil@x.example>\r\nmid.dot\r\n"[..]
    );
    // Every LF in the body is part of a CRLF.
    let body = msgs[0].1;
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, &b)| b != b'\n' || (i > 0 && body[i - 1] == b'\r'))
    );
}

#[test]
fn bare_lf_commands_are_accepted() {
    let mut s = session(cfg(true));
    let ev = s.feed(b"EHLO c.test\nMAIL FROM:<a@c.test>\nRCPT TO:<b@x.example>\nNOOP\n");
    assert_eq!(heads(&ev), ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0"]);
}

#[test]
fn rset_clears_the_transaction() {
    let mut s = session(cfg(true));
    let ev = s.feed(
        b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nRSET\r\n\
          RCPT TO:<b@x.example>\r\nDATA\r\nRSET extra\r\nMAIL FROM:<a@c.test>\r\n",
    );
    assert_eq!(
        heads(&ev),
        [
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.0.0",
            "503 5.5.1",
            "503 5.5.1",
            "501 5.5.4",
            "250 2.1.0"
        ]
    );
}

#[test]
fn helo_versus_ehlo() {
    let mut c = cfg(true);
    c.max_message_size = 12345;
    c.starttls_available = true;
    c.auth_available = true;
    let mut s = session(c);
    let ev = s.feed(b"HELO c.test\r\n");
    assert_eq!(replies(&ev)[0].to_string(), "250 relay.test\r\n");
    // No ESMTP parameters after HELO; plain MAIL is fine.
    let ev = s.feed(b"MAIL FROM:<a@c.test> BODY=8BITMIME\r\nMAIL FROM:<a@c.test>\r\n");
    assert_eq!(heads(&ev), ["555 5.5.4", "250 2.1.0"]);
    let ev = s.feed(b"RCPT TO:<b@x.example> NOTIFY=NEVER\r\nSTARTTLS\r\nAUTH PLAIN\r\n");
    assert_eq!(heads(&ev), ["555 5.5.4", "503 5.5.1", "538 5.7.11"]);

    // EHLO: the capabilities; it also resets the transaction.
    let ev = s.feed(b"EHLO c.test\r\n");
    assert_eq!(
        replies(&ev)[0].to_string(),
        "250-relay.test\r\n250-PIPELINING\r\n250-SIZE 12345\r\n250-STARTTLS\r\n\
         250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n"
    );
    let ev = s.feed(b"RCPT TO:<b@x.example>\r\n");
    assert_eq!(heads(&ev), ["503 5.5.1"]);
    let ev = s.feed(b"EHLO\r\nHELO\r\n");
    assert_eq!(heads(&ev), ["501 5.5.4", "501 5.5.4"]);
}

#[test]
fn mail_before_helo_and_other_sequence_errors() {
    let mut s = session(cfg(true));
    let ev = s.feed(
        b"MAIL FROM:<a@c.test>\r\nEHLO c.test\r\nRCPT TO:<b@x.example>\r\nDATA\r\n\
          MAIL FROM:<a@c.test>\r\nMAIL FROM:<a@c.test>\r\nDATA\r\n",
    );
    assert_eq!(
        heads(&ev),
        [
            "503 5.5.1", // MAIL before HELO/EHLO
            "250",
            "503 5.5.1", // RCPT before MAIL
            "503 5.5.1", // DATA before MAIL
            "250 2.1.0",
            "503 5.5.1", // nested MAIL
            "503 5.5.1", // DATA before RCPT
        ]
    );
    assert!(replies(&ev)[6].lines[0].contains("need RCPT"));
}

#[test]
fn size_declared_too_large_at_mail() {
    let mut c = cfg(true);
    c.max_message_size = 1000;
    let mut s = session(c);
    ehlo(&mut s);
    let ev = s.feed(
        b"MAIL FROM:<a@c.test> SIZE=1001\r\nMAIL FROM:<a@c.test> SIZE=99999999999999999999\r\n\
          MAIL FROM:<a@c.test> SIZE=12x\r\nMAIL FROM:<a@c.test> SIZE=1000\r\n",
    );
    assert_eq!(
        heads(&ev),
        ["552 5.3.4", "552 5.3.4", "501 5.5.4", "250 2.1.0"]
    );
}

#[test]
fn size_exceeded_during_data_stores_nothing() {
    let mut c = cfg(true);
    c.max_message_size = 100;
    let mut s = session(c);
    s.feed(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n");
    let line = [b'x'; 40];
    let mut ev = Vec::new();
    for _ in 0..10 {
        ev.extend(s.feed(&line));
        ev.extend(s.feed(b"\r\n"));
    }
    ev.extend(s.feed(b".\r\nNOOP\r\n"));
    assert!(messages(&ev).is_empty());
    assert_eq!(heads(&ev), ["552 5.3.4", "250 2.0.0"]);
    // The transaction is gone.
    let ev = s.feed(b"RCPT TO:<b@x.example>\r\n");
    assert_eq!(heads(&ev), ["503 5.5.1"]);
    // Exactly at the limit is fine (100 octets after unstuffing).
    s.feed(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n");
    let body = [&[b'y'; 98][..], b"\r\n.\r\n"].concat();
    let ev = s.feed(&body);
    assert_eq!(messages(&ev).len(), 1);
    // Dot-stuffing does not count: ".." + 97 octets is 98 + CRLF = 100.
    s.message_stored(Ok("Q"));
    s.feed(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n");
    let body = [&b".."[..], &[b'y'; 97], b"\r\n.\r\n"].concat();
    assert_eq!(messages(&s.feed(&body)).len(), 1);
}

#[test]
fn over_long_body_line_is_rejected() {
    let mut c = cfg(true);
    c.max_data_line_length = 1000;
    let mut s = session(c);
    s.feed(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n");
    let mut ev = s.feed(&[b'z'; 998]);
    ev.extend(s.feed(b"\r\n"));
    ev.extend(s.feed(&[b'z'; 1001]));
    ev.extend(s.feed(b"\r\n.\r\n"));
    assert!(messages(&ev).is_empty());
    assert_eq!(heads(&ev), ["554 5.6.0"]);
}

#[test]
fn too_many_recipients() {
    let mut c = cfg(true);
    c.max_recipients = 2;
    c.max_errors = 2;
    let mut s = session(c);
    let ev = s.feed(
        b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b1@x.example>\r\n\
          RCPT TO:<b2@x.example>\r\nRCPT TO:<b3@x.example>\r\nDATA\r\n",
    );
    assert_eq!(
        heads(&ev),
        [
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "452 4.5.3",
            "354"
        ]
    );
    let ev = s.feed(b".\r\n");
    assert_eq!(messages(&ev)[0].0.recipients.len(), 2);
    // 452 is not a client error: many of them do not end the session.
    s.message_stored(Ok("Q"));
    let mut script = b"MAIL FROM:<a@c.test>\r\n".to_vec();
    for i in 0..10 {
        script.extend_from_slice(format!("RCPT TO:<b{i}@x.example>\r\n").as_bytes());
    }
    let ev = s.feed(&script);
    assert_eq!(heads(&ev).iter().filter(|h| *h == "452 4.5.3").count(), 8);
    assert!(s.close_reason().is_none());
}

#[test]
fn garbage_unknown_and_unimplemented_commands() {
    let mut s = session(cfg(true));
    let ev = s.feed(
        b"EHLO c.test\r\nFOO bar\r\n\r\n   \r\nEXPN list\r\nHELP\r\nBDAT 10 LAST\r\nVRFY bob\r\nVRFY\r\nNOOP hi\r\n\
          \xff\xfe\r\nDATA\x01\r\nMAIL TO:<a@b.example>\r\n",
    );
    assert_eq!(
        heads(&ev),
        [
            "250",
            "500 5.5.2",
            "500 5.5.2",
            "500 5.5.2",
            "502 5.5.1",
            "502 5.5.1",
            "502 5.5.1",
            "252 2.0.0",
            "501 5.5.4",
            "250 2.0.0",
            "500 5.5.2",
            "500 5.5.2",
            "501 5.5.4",
        ]
    );
}

#[test]
fn http_on_the_smtp_port_is_cut_off() {
    let mut s = session(cfg(true));
    let ev = s.feed(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n");
    assert_eq!(heads(&ev), ["521 5.7.0"]);
    assert!(matches!(ev.last(), Some(Event::Close)));
}

#[test]
fn nul_bytes_in_commands_are_rejected() {
    let mut s = session(cfg(true));
    let ev = s.feed(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\0\r\nNO\0OP\r\nMAIL FROM:<a@c.test>\r\n");
    assert_eq!(heads(&ev), ["250", "500 5.5.2", "500 5.5.2", "250 2.1.0"]);
    assert!(replies(&ev)[1].lines[0].contains("NUL"));
}

#[test]
fn over_long_command_line() {
    let mut c = cfg(true);
    c.max_line_length = 512;
    let mut s = session(c);
    ehlo(&mut s);
    // Too long with its LF in the same read.
    let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(600));
    let ev = s.feed(long.as_bytes());
    assert_eq!(heads(&ev), ["500 5.5.2", "250 2.0.0"]);
    assert!(replies(&ev)[0].lines[0].contains("too long"));
    // Too long, arriving in pieces: one reply, the rest of the line is skipped.
    let mut ev = s.feed(b"MAIL FROM:<");
    for _ in 0..100 {
        ev.extend(s.feed(&[b'a'; 100]));
    }
    ev.extend(s.feed(b"@x.example>\r\nNOOP\r\n"));
    assert_eq!(heads(&ev), ["500 5.5.2", "250 2.0.0"]);
    // 512 octets including CRLF is fine.
    let ok = format!("NOOP {}\r\n", "y".repeat(505));
    assert_eq!(ok.len(), 512);
    assert_eq!(heads(&s.feed(ok.as_bytes())), ["250 2.0.0"]);
}

#[test]
fn too_many_errors_close_the_session() {
    let mut c = cfg(true);
    c.max_errors = 3;
    let mut s = session(c);
    let ev = s.feed(b"x\r\ny\r\nz\r\nNOOP\r\n");
    assert_eq!(
        heads(&ev),
        ["500 5.5.2", "500 5.5.2", "500 5.5.2", "421 4.7.0"]
    );
    assert!(matches!(ev.last(), Some(Event::Close)));
    assert_eq!(s.close_reason(), Some(CloseReason::TooManyErrors));
}

#[test]
fn data_after_every_recipient_was_rejected() {
    let mut s = session(cfg(false));
    let ev = s.feed(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n");
    assert_eq!(heads(&ev), ["250", "250 2.1.0", "550 5.7.1", "554 5.5.1"]);
    // The "message" the client may send anyway is just bad commands.
    assert!(messages(&ev).is_empty());
}

// ---------------------------------------------------------------------------------------
// R105/R106: never an open relay
// ---------------------------------------------------------------------------------------

const RELAY_VECTORS: &[&str] = &[
    "u@external.test",
    "u%external.test@relay.local",
    "\"u@external.test\"@relay.local",
    "@relay.local:u@external.test",
    "@relay.local,@relay.test:u@external.test",
    "external.test!u@relay.local",
    "u@EXTERNAL.test",
    "u@[192.0.2.99]",
    "postmaster@relay.test",
];

#[test]
fn unauthorised_client_gets_550_5_7_1_for_every_address_form() {
    let mut s = session(cfg(false));
    ehlo(&mut s);
    assert_eq!(heads(&s.feed(b"MAIL FROM:<a@c.test>\r\n")), ["250 2.1.0"]);
    for addr in RELAY_VECTORS {
        let ev = s.feed(format!("RCPT TO:<{addr}>\r\n").as_bytes());
        assert_eq!(heads(&ev), ["550 5.7.1"], "{addr}");
        assert!(replies(&ev)[0].lines[0].ends_with("Relay access denied"));
    }
    // Source routes are judged on the final mailbox.
    let ev = s.feed(b"RCPT TO:<@relay.local:u@external.test>\r\n");
    assert_eq!(
        replies(&ev)[0].to_string(),
        "550 5.7.1 <u@external.test>: Relay access denied\r\n"
    );
    // Malformed forms are syntax errors, never accepted.
    for bad in ["external.test!u", "postmaster", "u@external.test.", "u@"] {
        let ev = s.feed(format!("RCPT TO:<{bad}>\r\n").as_bytes());
        assert_eq!(heads(&ev), ["501 5.1.3"], "{bad}");
    }
    let ev = s.feed(b"DATA\r\n");
    assert_eq!(heads(&ev), ["554 5.5.1"]);
}

#[test]
fn allowed_client_relays_to_any_domain() {
    let mut s = session(cfg(true));
    ehlo(&mut s);
    s.feed(b"MAIL FROM:<a@c.test>\r\n");
    for addr in RELAY_VECTORS {
        let ev = s.feed(format!("RCPT TO:<{addr}>\r\n").as_bytes());
        assert_eq!(heads(&ev), ["250 2.1.5"], "{addr}");
    }
    let ev = s.feed(b"DATA\r\n.\r\n");
    let msgs = messages(&ev);
    let got: Vec<&str> = msgs[0]
        .0
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    // Kept as written, the source route removed.
    assert_eq!(
        got,
        [
            "u@external.test",
            "u%external.test@relay.local",
            "\"u@external.test\"@relay.local",
            "u@external.test",
            "u@external.test",
            "external.test!u@relay.local",
            "u@EXTERNAL.test",
            "u@[192.0.2.99]",
            "postmaster@relay.test",
        ]
    );
}

#[test]
fn non_ascii_addresses_need_smtputf8() {
    let mut s = session(cfg(true));
    ehlo(&mut s);
    let ev = s.feed(
        "MAIL FROM:<josé@c.test>\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<用户@例子.测试>\r\nRSET\r\n"
            .as_bytes(),
    );
    assert_eq!(
        heads(&ev),
        ["553 5.6.7", "250 2.1.0", "553 5.6.7", "250 2.0.0"]
    );
    let ev = s.feed(
        "MAIL FROM:<josé@c.test> SMTPUTF8\r\nRCPT TO:<用户@例子.测试>\r\nDATA\r\n.\r\n".as_bytes(),
    );
    assert_eq!(heads(&ev), ["250 2.1.0", "250 2.1.5", "354"]);
    let (env, body) = messages(&ev)[0];
    assert!(env.smtputf8);
    assert_eq!(env.recipients[0].address, "用户@例子.测试");
    assert!(String::from_utf8_lossy(body).contains("with UTF8SMTP"));
}

// ---------------------------------------------------------------------------------------
// R99: DSN parameters
// ---------------------------------------------------------------------------------------

#[test]
fn dsn_parameters_are_carried_into_the_envelope() {
    let mut s = session(cfg(true));
    ehlo(&mut s);
    let ev = s.feed(
        b"MAIL FROM:<a@c.test> RET=HDRS ENVID=QQ314159+2Bx BODY=8BITMIME SIZE=10\r\n\
          RCPT TO:<b@x.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+40x.example\r\n\
          RCPT TO:<c@x.example> NOTIFY=NEVER\r\n\
          RCPT TO:<d@x.example>\r\n\
          RCPT TO:<e@x.example> NOTIFY=NEVER,DELAY\r\n\
          RCPT TO:<e@x.example> ORCPT=rfc822\r\n\
          RCPT TO:<e@x.example> NOTIFY=DELAY NOTIFY=DELAY\r\n\
          RCPT TO:<e@x.example> XFOO=1\r\n\
          DATA\r\nbody\r\n.\r\n",
    );
    assert_eq!(
        heads(&ev),
        [
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "501 5.5.4",
            "501 5.5.4",
            "501 5.5.4",
            "555 5.5.4",
            "354"
        ]
    );
    let (env, _) = messages(&ev)[0];
    assert_eq!(env.ret, Some(Ret::Hdrs));
    assert_eq!(env.envid.as_deref(), Some("QQ314159+x"));
    assert!(env.is_8bit());
    assert_eq!(env.declared_size, Some(10));
    let r = &env.recipients;
    assert_eq!(
        r[0].notify,
        Some(Notify {
            success: true,
            failure: true,
            delay: false
        })
    );
    assert_eq!(
        r[0].orcpt,
        Some(Orcpt {
            addr_type: "rfc822".into(),
            address: "B@x.example".into()
        })
    );
    assert!(r[1].notify.unwrap().is_never());
    assert_eq!((r[2].notify, &r[2].orcpt), (None, &None));
    // The envelope serialises (for the spool's metadata).
    let json = serde_json::to_string(env).unwrap();
    let back: InboundEnvelope = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, env);
}

#[test]
fn bad_mail_parameters() {
    let mut s = session(cfg(true));
    ehlo(&mut s);
    let ev = s.feed(
        b"MAIL FROM:<a@c.test> RET=ALL\r\nMAIL FROM:<a@c.test> ENVID=a=b\r\n\
          MAIL FROM:<a@c.test> BODY=BINARYMIME\r\nMAIL FROM:<a@c.test> XYZ\r\n\
          MAIL FROM:<a@c.test> SMTPUTF8=yes\r\nMAIL FROM:<a@c.test> SIZE=1 SIZE=2\r\n\
          MAIL FROM:<a@c.test> AUTH=<>\r\nMAIL FROM:<bad@@c.test>\r\nMAIL FROM:a@c.test\r\n\
          MAIL FROM: <a@c.test>\r\n",
    );
    assert_eq!(
        heads(&ev),
        [
            "501 5.5.4",
            "501 5.5.4",
            "555 5.5.4",
            "555 5.5.4",
            "501 5.5.4",
            "501 5.5.4",
            "555 5.5.4", // AUTH= only when AUTH is offered
            "501 5.1.7",
            "501 5.5.4",
            "250 2.1.0", // a space after the colon is tolerated
        ]
    );
}

// ---------------------------------------------------------------------------------------
// STARTTLS and AUTH in the state machine (R107)
// ---------------------------------------------------------------------------------------

fn tls_cfg(allowed: bool) -> SessionConfig {
    let mut c = cfg(allowed);
    c.starttls_available = true;
    c.auth_available = true;
    c
}

#[test]
fn starttls_discards_pipelined_plaintext() {
    let mut s = session(tls_cfg(false));
    ehlo(&mut s);
    let ev = s.feed(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@x.example>\r\n");
    assert_eq!(
        ev,
        vec![
            Event::Reply(Reply {
                code: 220,
                enhanced: replies(&ev)[0].enhanced,
                lines: vec!["Ready to start TLS".into()],
            }),
            Event::StartTls
        ]
    );
    assert_eq!(
        replies(&ev)[0].to_string(),
        "220 2.0.0 Ready to start TLS\r\n"
    );
    // Bytes before the handshake completes are ignored too.
    assert!(s.feed(b"NOOP\r\n").is_empty());
    s.tls_established();
    assert!(s.tls_active());
    // Fresh state: EHLO required again, nothing of the injected commands survived.
    let ev = s.feed(b"NOOP\r\nMAIL FROM:<a@c.test>\r\nEHLO c.test\r\nRCPT TO:<b@x.example>\r\n");
    assert_eq!(heads(&ev), ["250 2.0.0", "503 5.5.1", "250", "503 5.5.1"]);
    let caps = &replies(&ev)[2].lines;
    assert!(caps.contains(&"AUTH PLAIN".to_string()));
    assert!(!caps.contains(&"STARTTLS".to_string()));
    assert_eq!(heads(&s.feed(b"STARTTLS\r\n")), ["554 5.5.1"]);
}

#[test]
fn auth_is_neither_offered_nor_accepted_before_tls() {
    let mut s = session(tls_cfg(false));
    let ev = s.feed(b"EHLO c.test\r\n");
    let caps = &replies(&ev)[0].lines;
    assert!(caps.contains(&"STARTTLS".to_string()));
    assert!(!caps.iter().any(|l| l.starts_with("AUTH")));
    let ev = s.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nAUTH PLAIN\r\n");
    assert_eq!(heads(&ev), ["538 5.7.11", "538 5.7.11"]);
    assert!(!ev.iter().any(|e| matches!(e, Event::Authenticate(_))));
    // Without auth_available: never offered, 502.
    let mut s = session(cfg(false));
    ehlo(&mut s);
    assert_eq!(heads(&s.feed(b"AUTH PLAIN\r\n")), ["502 5.5.1"]);
}

fn after_tls(c: SessionConfig) -> Session {
    let mut s = session(c);
    ehlo(&mut s);
    let ev = s.feed(b"STARTTLS\r\n");
    assert!(matches!(ev.last(), Some(Event::StartTls)));
    s.tls_established();
    ehlo(&mut s);
    s
}

#[test]
fn auth_plain_under_tls_allows_relaying() {
    let mut s = after_tls(tls_cfg(false));
    // Not yet authenticated: relaying denied.
    let ev = s.feed(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nRSET\r\n");
    assert_eq!(heads(&ev), ["250 2.1.0", "550 5.7.1", "250 2.0.0"]);
    // Initial response: "\0alice\0secret".
    let ev = s.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@c.test>\r\n");
    let [Event::Authenticate(creds)] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!(
        (creds.username.as_str(), creds.password.as_str()),
        ("alice", "secret")
    );
    assert!(!format!("{creds:?}").contains("secret"));
    let ev = s.auth_result(true);
    assert_eq!(heads(&ev), ["235 2.7.0", "250 2.1.0"]);
    assert_eq!(s.authenticated_user(), Some("alice"));
    let ev = s.feed(b"RCPT TO:<b@x.example>\r\nDATA\r\n.\r\n");
    assert_eq!(heads(&ev), ["250 2.1.5", "354"]);
    let (env, body) = messages(&ev)[0];
    assert_eq!(env.authenticated_user.as_deref(), Some("alice"));
    assert!(env.tls);
    assert!(String::from_utf8_lossy(body).contains("with ESMTPSA"));
    s.message_stored(Ok("A1"));
    assert_eq!(heads(&s.feed(b"AUTH PLAIN\r\n")), ["503 5.5.1"]);
}

#[test]
fn auth_plain_challenge_cancel_and_failures() {
    let mut c = tls_cfg(false);
    c.max_auth_failures = 3;
    let mut s = after_tls(c);
    let ev = s.feed(b"AUTH PLAIN\r\n");
    assert_eq!(replies(&ev)[0].to_string(), "334 \r\n");
    assert_eq!(heads(&s.feed(b"*\r\n")), ["501 5.0.0"]);
    assert_eq!(heads(&s.feed(b"AUTH LOGIN\r\n")), ["504 5.5.4"]);
    assert_eq!(heads(&s.feed(b"AUTH PLAIN !!!!\r\n")), ["501 5.5.2"]);
    // Two bad attempts and one malformed: closed after the third.
    let ev = s.feed(b"AUTH PLAIN\r\nAGFsaWNlAHdyb25n\r\n");
    assert!(matches!(ev.last(), Some(Event::Authenticate(_))));
    assert_eq!(heads(&s.auth_result(false)), ["535 5.7.8"]);
    let ev = s.feed(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n");
    assert!(matches!(ev.last(), Some(Event::Authenticate(_))));
    assert_eq!(heads(&s.auth_result(false)), ["535 5.7.8"]);
    // authzid different from authcid ("bob\0alice\0pw") is refused outright.
    let ev = s.feed(b"AUTH PLAIN Ym9iAGFsaWNlAHB3\r\n");
    assert_eq!(heads(&ev), ["535 5.7.8", "421 4.7.0"]);
    assert_eq!(s.close_reason(), Some(CloseReason::TooManyAuthFailures));
    assert!(s.authenticated_user().is_none());
}

#[test]
fn timeout_and_shutdown_replies() {
    let mut s = session(cfg(true));
    s.feed(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\npartial");
    let ev = s.timeout();
    assert_eq!(
        replies(&ev)[0].to_string(),
        "421 4.4.2 relay.test Error: timeout exceeded\r\n"
    );
    assert!(matches!(ev.last(), Some(Event::Close)));
    assert!(s.feed(b"\r\n.\r\n").is_empty());
    let mut s = session(cfg(true));
    assert_eq!(heads(&s.shutdown()), ["421 4.3.2"]);
    assert!(s.timeout().is_empty());
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

/// Feeds `chunks`, answering every pause the way a driver would; returns all events.
fn drive(s: &mut Session, chunks: &[Vec<u8>]) -> Vec<Event> {
    let mut all = Vec::new();
    for chunk in chunks {
        let mut ev = s.feed(chunk);
        loop {
            let next = match ev.last() {
                Some(Event::Message { .. }) => Some(s.message_stored(Ok("ID"))),
                Some(Event::Authenticate(c)) => Some(s.auth_result(c.password == "pw")),
                Some(Event::StartTls) => {
                    s.tls_established();
                    None
                }
                _ => None,
            };
            all.append(&mut ev);
            match next {
                Some(n) => ev = n,
                None => break,
            }
        }
    }
    all
}

fn fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::sample::select(vec![
            &b"EHLO c.test\r\n"[..],
            b"HELO c.test\r\n",
            b"MAIL FROM:<a@c.test> SIZE=10 RET=FULL ENVID=x+2B\r\n",
            b"MAIL FROM:<>\r\n",
            b"RCPT TO:<b@x.example> NOTIFY=SUCCESS ORCPT=rfc822;b+40x\r\n",
            b"RCPT TO:<\"q@x\"@y.example>\r\n",
            b"DATA\r\n",
            b"\r\n.\r\n",
            b".\r\n",
            b"..\r\n",
            b"\n.\n",
            b"RSET\r\n",
            b"STARTTLS\r\n",
            b"AUTH PLAIN AHUAcHc=\r\n",
            b"AUTH PLAIN\r\n",
            b"AHUAcHc=\r\n",
            b"\0",
            b"\r",
            b"\n",
            b"QUIT\r\n",
        ])
        .prop_map(|f| f.to_vec()),
    ]
}

fn small_cfg() -> SessionConfig {
    let mut c = tls_cfg(false);
    c.max_line_length = 48;
    c.max_data_line_length = 40;
    c.max_message_size = 200;
    c.max_recipients = 3;
    c.max_errors = 1000;
    c.max_auth_failures = 1000;
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Malformed input never panics, and replies always have valid codes and one
    /// terminating line; buffers stay bounded.
    #[test]
    fn arbitrary_input_never_panics(chunks in prop::collection::vec(fragment(), 0..40)) {
        for c in [small_cfg(), cfg(true)] {
            let mut s = session(c);
            let events = drive(&mut s, &chunks);
            for r in replies(&events) {
                prop_assert!((200..600).contains(&r.code));
                let wire = r.to_string();
                prop_assert!(wire.ends_with("\r\n"));
                prop_assert_eq!(wire.matches("\r\n").count(), r.lines.len());
            }
            let max = s.config().max_message_size + 1024; // plus our trace header
            for (_, body) in messages(&events) {
                prop_assert!(body.len() <= max);
            }
        }
    }

    /// The replies do not depend on how the input is split into reads.
    #[test]
    fn replies_do_not_depend_on_read_boundaries(cuts in prop::collection::vec(0usize..400, 0..12)) {
        let script: &[u8] = b"EHLO c.test\r\nMAIL FROM:<a@c.test> ENVID=e1\r\n\
            RCPT TO:<b@x.example> NOTIFY=NEVER\r\nRCPT TO:<bad>\r\nDATA\r\n\
            Subject: x\r\n\r\n..dot\r\nline\n.\r\n\r\n.\r\nNOOP\r\nMAIL FROM:<>\r\n\
            RCPT TO:<c@x.example>\r\nDATA\r\n.\r\nQUIT\r\n";
        let mut c = cfg(true);
        c.add_received_header = false;
        let whole = drive(&mut session(c.clone()), &[script.to_vec()]);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % script.len()).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut prev = 0;
        for cut in cuts.into_iter().chain([script.len()]) {
            chunks.push(script[prev..cut].to_vec());
            prev = cut;
        }
        let split = drive(&mut session(c), &chunks);
        prop_assert_eq!(&whole, &split);
        prop_assert_eq!(messages(&whole).len(), 2);
    }
}

// ---------------------------------------------------------------------------------------
// The async driver over loopback TCP
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct RecordingSink {
    messages: Mutex<Vec<(InboundEnvelope, Vec<u8>)>>,
    fail: bool,
}

#[async_trait::async_trait]
impl MessageSink for RecordingSink {
    async fn store(&self, envelope: &InboundEnvelope, body: &[u8]) -> Result<String, String> {
        if self.fail {
            return Err("spool unavailable".into());
        }
        let mut m = self.messages.lock().unwrap();
        m.push((envelope.clone(), body.to_vec()));
        Ok(format!("QID{}", m.len()))
    }
}

impl RecordingSink {
    fn count(&self) -> usize {
        self.messages.lock().unwrap().len()
    }
}

struct TestAuth;

#[async_trait::async_trait]
impl Authenticator for TestAuth {
    async fn authenticate(&self, c: &Credentials) -> bool {
        c.username == "alice" && c.password == "secret"
    }
}

type Served = tokio::task::JoinHandle<Result<SessionSummary, ServeError>>;

/// Listens on 127.0.0.1, serves one connection, returns the client's stream.
async fn start(
    c: SessionConfig,
    sink: Arc<RecordingSink>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    idle: Duration,
) -> (BufReader<TcpStream>, Served) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (sock, peer) = listener.accept().await.unwrap();
        serve_with_auth(sock, c, peer, &*sink, &TestAuth, tls, idle).await
    });
    let client = TcpStream::connect(addr).await.unwrap();
    (BufReader::new(client), served)
}

/// Reads one (possibly multi-line) reply; returns its lines joined with '\n'.
async fn read_reply<R: AsyncBufRead + Unpin>(r: &mut R) -> String {
    let mut all = Vec::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
            .await
            .expect("reply in time")
            .unwrap();
        assert!(n > 0, "connection closed; got {all:?}");
        assert!(line.ends_with("\r\n"), "{line:?}");
        let line = line.trim_end().to_string();
        let last = line.as_bytes().get(3) != Some(&b'-');
        all.push(line);
        if last {
            return all.join("\n");
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) {
    w.write_all(data).await.unwrap();
    w.flush().await.unwrap();
}

async fn expect_eof<R: AsyncBufRead + Unpin>(r: &mut R) {
    let mut rest = String::new();
    let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut rest))
        .await
        .expect("close in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "unexpected {rest:?}");
}

const IDLE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn driver_happy_path_pipelined_in_one_write() {
    let sink = Arc::new(RecordingSink::default());
    let (mut c, served) = start(cfg(true), sink.clone(), None, IDLE).await;
    assert_eq!(read_reply(&mut c).await, "220 relay.test ESMTP");
    send(
        &mut c,
        b"EHLO client.test\r\nMAIL FROM:<alice@client.test> BODY=8BITMIME\r\n\
          RCPT TO:<bob@one.example>\r\nRCPT TO:<carol@two.example> NOTIFY=DELAY\r\nDATA\r\n",
    )
    .await;
    let ehlo = read_reply(&mut c).await;
    assert!(ehlo.starts_with("250-relay.test\n250-PIPELINING\n250-SIZE "));
    assert!(!ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"));
    assert_eq!(read_reply(&mut c).await, "250 2.1.0 Ok");
    assert_eq!(read_reply(&mut c).await, "250 2.1.5 Ok");
    assert_eq!(read_reply(&mut c).await, "250 2.1.5 Ok");
    assert_eq!(
        read_reply(&mut c).await,
        "354 End data with <CR><LF>.<CR><LF>"
    );
    send(&mut c, b"Subject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n").await;
    assert_eq!(read_reply(&mut c).await, "250 2.0.0 Ok: queued as QID1");
    assert_eq!(read_reply(&mut c).await, "221 2.0.0 Bye");
    expect_eof(&mut c).await;

    let summary = served.await.unwrap().unwrap();
    assert_eq!(summary.queue_ids, ["QID1"]);
    assert_eq!(summary.end, SessionEnd::Closed(CloseReason::Quit));
    assert_eq!(summary.helo.as_deref(), Some("client.test"));
    let m = sink.messages.lock().unwrap();
    let (env, body) = &m[0];
    assert_eq!(env.recipients.len(), 2);
    assert!(env.is_8bit());
    assert!(env.recipients[1].notify.unwrap().delay);
    assert_eq!(env.peer_ip, "127.0.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(strip_received(body), b"Subject: hi\r\n\r\n.dot\r\n");
}

#[tokio::test]
async fn driver_disconnect_mid_data_stores_nothing() {
    let sink = Arc::new(RecordingSink::default());
    let (mut c, served) = start(cfg(true), sink.clone(), None, IDLE).await;
    read_reply(&mut c).await;
    send(
        &mut c,
        b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n",
    )
    .await;
    for _ in 0..4 {
        read_reply(&mut c).await;
    }
    send(&mut c, b"Subject: cut\r\n\r\nhalf a message\r\n.").await;
    drop(c);
    let summary = served.await.unwrap().unwrap();
    assert_eq!(summary.end, SessionEnd::ClientDisconnected);
    assert!(summary.queue_ids.is_empty());
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn driver_idle_timeout_mid_data_gives_421_and_stores_nothing() {
    let sink = Arc::new(RecordingSink::default());
    let idle = Duration::from_millis(300);
    let (mut c, served) = start(cfg(true), sink.clone(), None, idle).await;
    read_reply(&mut c).await;
    send(
        &mut c,
        b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\nstalled body",
    )
    .await;
    for _ in 0..4 {
        read_reply(&mut c).await;
    }
    let started = std::time::Instant::now();
    assert_eq!(
        read_reply(&mut c).await,
        "421 4.4.2 relay.test Error: timeout exceeded"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    expect_eof(&mut c).await;
    let summary = served.await.unwrap().unwrap();
    assert_eq!(summary.end, SessionEnd::Closed(CloseReason::Timeout));
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn driver_idle_timeout_after_greeting() {
    let sink = Arc::new(RecordingSink::default());
    let (mut c, served) = start(cfg(true), sink, None, Duration::from_millis(200)).await;
    read_reply(&mut c).await;
    assert!(read_reply(&mut c).await.starts_with("421 4.4.2 "));
    expect_eof(&mut c).await;
    assert_eq!(
        served.await.unwrap().unwrap().end,
        SessionEnd::Closed(CloseReason::Timeout)
    );
}

#[tokio::test]
async fn driver_size_exceeded_and_store_failure() {
    let mut c0 = cfg(true);
    c0.max_message_size = 1024;
    let sink = Arc::new(RecordingSink::default());
    let (mut c, served) = start(c0.clone(), sink.clone(), None, IDLE).await;
    read_reply(&mut c).await;
    send(
        &mut c,
        b"EHLO c.test\r\nMAIL FROM:<a@c.test> SIZE=2048\r\nMAIL FROM:<a@c.test>\r\n\
          RCPT TO:<b@x.example>\r\nDATA\r\n",
    )
    .await;
    read_reply(&mut c).await;
    assert!(read_reply(&mut c).await.starts_with("552 5.3.4 "));
    for _ in 0..3 {
        read_reply(&mut c).await;
    }
    let line = [b'x'; 78];
    for _ in 0..40 {
        send(&mut c, &line).await;
        send(&mut c, b"\r\n").await;
    }
    send(&mut c, b".\r\nQUIT\r\n").await;
    assert!(read_reply(&mut c).await.starts_with("552 5.3.4 "));
    assert_eq!(read_reply(&mut c).await, "221 2.0.0 Bye");
    assert!(served.await.unwrap().unwrap().queue_ids.is_empty());
    assert_eq!(sink.count(), 0);

    // A sink that cannot store: 451, no 250.
    let failing = Arc::new(RecordingSink {
        fail: true,
        ..RecordingSink::default()
    });
    let (mut c, served) = start(c0, failing, None, IDLE).await;
    read_reply(&mut c).await;
    send(
        &mut c,
        b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n",
    )
    .await;
    for _ in 0..4 {
        read_reply(&mut c).await;
    }
    send(&mut c, b"hello\r\n.\r\nQUIT\r\n").await;
    assert_eq!(
        read_reply(&mut c).await,
        "451 4.3.0 Error: queue file write error"
    );
    assert_eq!(read_reply(&mut c).await, "221 2.0.0 Bye");
    assert!(served.await.unwrap().unwrap().queue_ids.is_empty());
}

#[tokio::test]
async fn driver_unauthorised_client_cannot_relay() {
    let sink = Arc::new(RecordingSink::default());
    let (mut c, served) = start(cfg(false), sink.clone(), None, IDLE).await;
    read_reply(&mut c).await;
    let mut script = b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n".to_vec();
    for addr in RELAY_VECTORS {
        script.extend_from_slice(format!("RCPT TO:<{addr}>\r\n").as_bytes());
    }
    script.extend_from_slice(b"DATA\r\nx\r\n.\r\nQUIT\r\n");
    send(&mut c, &script).await;
    read_reply(&mut c).await;
    read_reply(&mut c).await;
    for addr in RELAY_VECTORS {
        let r = read_reply(&mut c).await;
        assert!(r.starts_with("550 5.7.1 "), "{addr}: {r}");
    }
    assert!(read_reply(&mut c).await.starts_with("554 5.5.1"));
    // "x" and "." are then just bad commands.
    assert!(read_reply(&mut c).await.starts_with("500 5.5.2"));
    assert!(read_reply(&mut c).await.starts_with("500 5.5.2"));
    assert_eq!(read_reply(&mut c).await, "221 2.0.0 Bye");
    served.await.unwrap().unwrap();
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn plain_serve_never_offers_auth() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut c0 = tls_cfg(false);
    c0.starttls_available = false;
    let served = tokio::spawn(async move {
        let (sock, peer) = listener.accept().await.unwrap();
        serve(sock, c0, peer, &*sink, None, IDLE).await
    });
    let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
    read_reply(&mut c).await;
    send(&mut c, b"EHLO c.test\r\nSTARTTLS\r\nAUTH PLAIN\r\nQUIT\r\n").await;
    let ehlo = read_reply(&mut c).await;
    assert!(!ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"));
    assert!(read_reply(&mut c).await.starts_with("502 5.5.1"));
    assert!(read_reply(&mut c).await.starts_with("502 5.5.1"));
    assert_eq!(read_reply(&mut c).await, "221 2.0.0 Bye");
    served.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------
// STARTTLS over the wire
// ---------------------------------------------------------------------------------------

fn tls_pair() -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let ck = rcgen::generate_simple_self_signed(vec!["relay.test".to_string()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        tokio_rustls::TlsConnector::from(Arc::new(client)),
    )
}

#[tokio::test]
async fn driver_starttls_discards_injected_plaintext_then_auth_and_relay() {
    let (acceptor, connector) = tls_pair();
    let sink = Arc::new(RecordingSink::default());
    let (mut c, served) = start(tls_cfg(false), sink.clone(), Some(acceptor), IDLE).await;
    read_reply(&mut c).await;
    send(
        &mut c,
        b"EHLO c.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    )
    .await;
    let ehlo = read_reply(&mut c).await;
    assert!(ehlo.contains("\n250-STARTTLS\n"));
    assert!(!ehlo.contains("AUTH"));
    assert!(read_reply(&mut c).await.starts_with("538 5.7.11 "));

    // CVE-2011-0411: commands injected after STARTTLS in the same packet.
    send(
        &mut c,
        b"STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@x.example>\r\n",
    )
    .await;
    assert_eq!(read_reply(&mut c).await, "220 2.0.0 Ready to start TLS");
    assert!(c.buffer().is_empty(), "plaintext after the 220");
    let tcp = c.into_inner();
    let name = rustls_pki_types::ServerName::try_from("relay.test").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let mut c = BufReader::new(tls);

    // The first reply under TLS answers our NOOP: the injected EHLO/MAIL/RCPT are gone.
    send(&mut c, b"NOOP\r\nRCPT TO:<b@x.example>\r\nEHLO c.test\r\n").await;
    assert_eq!(read_reply(&mut c).await, "250 2.0.0 Ok");
    assert!(read_reply(&mut c).await.starts_with("503 5.5.1"));
    let ehlo = read_reply(&mut c).await;
    assert!(ehlo.contains("\n250-AUTH PLAIN\n") && !ehlo.contains("STARTTLS"));

    // Not authenticated yet: no relaying. Wrong password: 535. Right one: 235.
    send(
        &mut c,
        b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nRSET\r\nAUTH PLAIN AGFsaWNlAHdyb25n\r\n",
    )
    .await;
    assert_eq!(read_reply(&mut c).await, "250 2.1.0 Ok");
    assert!(read_reply(&mut c).await.starts_with("550 5.7.1 "));
    assert_eq!(read_reply(&mut c).await, "250 2.0.0 Ok");
    assert!(read_reply(&mut c).await.starts_with("535 5.7.8 "));
    send(&mut c, b"AUTH PLAIN\r\n").await;
    assert_eq!(read_reply(&mut c).await, "334");
    send(
        &mut c,
        b"AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n",
    )
    .await;
    assert_eq!(
        read_reply(&mut c).await,
        "235 2.7.0 Authentication successful"
    );
    assert_eq!(read_reply(&mut c).await, "250 2.1.0 Ok");
    assert_eq!(read_reply(&mut c).await, "250 2.1.5 Ok");
    assert!(read_reply(&mut c).await.starts_with("354 "));
    send(&mut c, b"secret mail\r\n.\r\nQUIT\r\n").await;
    assert_eq!(read_reply(&mut c).await, "250 2.0.0 Ok: queued as QID1");
    assert_eq!(read_reply(&mut c).await, "221 2.0.0 Bye");
    expect_eof(&mut c).await;

    let summary = served.await.unwrap().unwrap();
    assert!(summary.tls);
    assert_eq!(summary.authenticated_user.as_deref(), Some("alice"));
    assert_eq!(summary.helo.as_deref(), Some("c.test"));
    let m = sink.messages.lock().unwrap();
    let (env, body) = &m[0];
    assert!(env.tls);
    assert_eq!(env.authenticated_user.as_deref(), Some("alice"));
    assert_eq!(env.helo, "c.test");
    assert!(String::from_utf8_lossy(body).contains("with ESMTPSA"));
    assert_eq!(strip_received(body), b"secret mail\r\n");
}

#[tokio::test]
async fn driver_failed_tls_handshake_is_an_error() {
    let (acceptor, _) = tls_pair();
    let sink = Arc::new(RecordingSink::default());
    let (mut c, served) = start(tls_cfg(true), sink, Some(acceptor), IDLE).await;
    read_reply(&mut c).await;
    send(&mut c, b"EHLO c.test\r\nSTARTTLS\r\n").await;
    read_reply(&mut c).await;
    assert!(read_reply(&mut c).await.starts_with("220 2.0.0"));
    send(&mut c, b"this is not a ClientHello\r\n").await;
    let err = served.await.unwrap().unwrap_err();
    assert!(matches!(err, ServeError::TlsHandshake { .. }), "{err}");
}

/// Regression (found by the smtp_session fuzz target): input that overflows the pause
/// buffer while a message is being stored closes the session only after the stored
/// message is acknowledged, and never puts events behind a `Message` in one batch.
#[test]
fn overflow_during_store_acknowledges_then_closes() {
    use stsrelay::smtp::inbound::{Event, Session, SessionConfig};
    let mut cfg = SessionConfig::new("relay.test");
    cfg.client_allowed = true;
    let mut s = Session::new(cfg, "127.0.0.1".parse().unwrap());
    let ev =
        s.feed(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\n");
    assert!(matches!(ev.last(), Some(Event::Message { .. })), "{ev:?}");
    // A second complete transaction, then more than the pause buffer holds.
    let ev = s.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\ny\r\n.\r\n");
    assert!(ev.is_empty(), "nothing while the store is pending: {ev:?}");
    let flood = "NOOP\r\n".repeat(300 * 1024 / 6);
    let ev = s.feed(flood.as_bytes());
    assert!(ev.is_empty(), "nothing while the store is pending: {ev:?}");
    let ev = s.message_stored(Ok("Q1"));
    let text: Vec<String> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Reply(r) => Some(r.to_string()),
            _ => None,
        })
        .collect();
    assert!(text[0].starts_with("250 2.0.0"), "{text:?}");
    assert!(text.last().unwrap().starts_with("421 4.7.0"), "{text:?}");
    assert!(matches!(ev.last(), Some(Event::Close)));
    assert!(!ev.iter().any(|e| matches!(e, Event::Message { .. })));
}
