//! Integration tests of the durable spool (`stsrelay::queue::spool`), on real files.

use std::fs;
use std::path::{Path, PathBuf};

use stsrelay::queue::spool::{
    Envelope, Notify, Outcome, QueueId, RcptState, RecipientSpec, Ret, Spool, SpoolError,
};

const T0: i64 = 1_700_000_000;

fn envelope(rcpts: &[&str], received_at: i64) -> Envelope {
    Envelope {
        mail_from: "sender@client.test".into(),
        recipients: rcpts.iter().map(|r| RecipientSpec::new(*r)).collect(),
        received_at,
        ..Envelope::default()
    }
}

fn spool_msg(spool: &Spool, body: &[u8], env: &Envelope) -> QueueId {
    let mut inc = spool.incoming().expect("incoming");
    inc.write(body).expect("write");
    inc.commit(env).expect("commit")
}

/// Open the spool as the only user, so recovery runs. Another test in this binary
/// forks a child process; between fork and exec the child shares every open file
/// description, including a spool's lock, so an exclusive lock can be refused for a
/// moment. Retry (bounded) instead of failing on that window.
fn open_alone(dir: &Path) -> Spool {
    for _ in 0..200 {
        let spool = Spool::open(dir).unwrap();
        if spool.recovery().performed {
            return spool;
        }
        drop(spool);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the spool lock stayed shared");
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn incoming_dir(spool: &Spool) -> PathBuf {
    spool.root().join("incoming")
}

fn messages_dir(spool: &Spool) -> PathBuf {
    spool.root().join("messages")
}

#[test]
fn commit_then_reopen_keeps_message_and_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let env = Envelope {
        mail_from: "".into(),
        recipients: vec![
            RecipientSpec {
                address: "Bob@Example.COM".into(),
                notify: Notify::parse("SUCCESS,FAILURE").unwrap(),
                orcpt: Some("rfc822;bob@example.com".into()),
            },
            RecipientSpec::new("carol@other.test"),
        ],
        ret: Some(Ret::Hdrs),
        envid: Some("QQ314159".into()),
        smtputf8: true,
        eight_bit: true,
        client_ip: Some("192.0.2.7".parse().unwrap()),
        helo: Some("client.test".into()),
        received_at: T0,
        tls_optional: true,
        tlsrpt_exempt: true,
    };
    let body = b"From: <>\r\nSubject: x\r\n\r\nbody\r\n".repeat(5000);
    let id = {
        let spool = Spool::open(dir.path()).unwrap();
        let mut inc = spool.incoming().unwrap();
        for chunk in body.chunks(1000) {
            inc.write(chunk).unwrap();
        }
        assert_eq!(inc.len(), body.len() as u64);
        inc.commit(&env).unwrap()
    };

    let spool = open_alone(dir.path());
    let rec = spool.recovery();
    assert!(rec.performed);
    assert_eq!(
        (rec.incoming_removed, rec.orphans_moved, rec.marked_corrupt),
        (0, 0, 0)
    );
    let list = spool.list().unwrap();
    assert_eq!(list.len(), 1);
    let m = &list[0];
    assert_eq!(m.id, id);
    assert_eq!(m.envelope, env);
    assert_eq!(m.received_at, T0);
    assert_eq!(m.body_size, body.len() as u64);
    assert!(!m.corrupt);
    assert_eq!(m.recipients.len(), 2);
    assert_eq!(m.recipients[0].index, 0);
    assert_eq!(m.recipients[0].address, "Bob@Example.COM");
    assert_eq!(m.recipients[0].domain, "example.com");
    assert_eq!(m.recipients[1].domain, "other.test");
    for r in &m.recipients {
        assert_eq!(r.state, RcptState::Queued);
        assert_eq!(r.attempts, 0);
        assert_eq!(r.last_reason, None);
        assert_eq!(r.next_attempt, T0);
    }
    assert_eq!(spool.read_body(&id).unwrap(), body);
    assert_eq!(spool.get(&id).unwrap().as_ref(), Some(m));
    assert!(entries(&incoming_dir(&spool)).is_empty());
    assert_eq!(entries(&messages_dir(&spool)), vec![spool.body_path(&id)]);

    // The CLI's --json output.
    let json = serde_json::to_value(m).unwrap();
    assert_eq!(json["id"], id.to_string());
    assert_eq!(json["recipients"][0]["state"], "queued");
    assert_eq!(json["envelope"]["ret"], "hdrs");
}

#[test]
fn uncommitted_incoming_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path()).unwrap();
        let mut inc = spool.incoming().unwrap();
        inc.write(b"partial message").unwrap();
        let tmp = inc.path().to_path_buf();
        assert!(tmp.starts_with(incoming_dir(&spool)));
        assert!(tmp.exists());
        drop(inc);
        assert!(!tmp.exists());
        assert!(entries(&incoming_dir(&spool)).is_empty());
        assert!(spool.list().unwrap().is_empty());
    }
    let spool = Spool::open(dir.path()).unwrap();
    assert!(spool.list().unwrap().is_empty());
    assert!(entries(&incoming_dir(&spool)).is_empty());
    assert!(entries(&messages_dir(&spool)).is_empty());
    assert!(entries(spool.corrupt_dir()).is_empty());
    assert_eq!(spool.counts().unwrap().messages, 0);
}

#[test]
fn crash_before_commit_leftover_incoming_is_deleted_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path()).unwrap();
        let mut inc = spool.incoming().unwrap();
        inc.write(b"never acknowledged").unwrap();
        // What a crashed process leaves behind: the temp file, never committed.
        fs::copy(
            inc.path(),
            incoming_dir(&spool).join("1A2B3C4D5E6F7A8B.tmp"),
        )
        .unwrap();
    }
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.recovery().incoming_removed, 1);
    assert!(entries(&incoming_dir(&spool)).is_empty());
    assert!(spool.list().unwrap().is_empty());
}

#[test]
fn orphan_body_is_moved_to_corrupt_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let keep = {
        let spool = Spool::open(dir.path()).unwrap();
        spool_msg(&spool, b"kept", &envelope(&["a@x.test"], T0))
    };
    // A crash between rename and the metadata insert leaves a body without a row;
    // also a stray non-id file.
    let messages = dir.path().join("spool/messages");
    fs::write(messages.join("0000000000000001"), b"orphan").unwrap();
    fs::write(messages.join("not-an-id"), b"stray").unwrap();
    // A name already taken in corrupt/ is not overwritten.
    fs::write(dir.path().join("spool/corrupt/not-an-id"), b"older").unwrap();

    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.recovery().orphans_moved, 2);
    assert_eq!(entries(&messages_dir(&spool)), vec![spool.body_path(&keep)]);
    let corrupt = spool.corrupt_dir();
    assert_eq!(
        fs::read(corrupt.join("0000000000000001")).unwrap(),
        b"orphan"
    );
    assert_eq!(fs::read(corrupt.join("not-an-id")).unwrap(), b"older");
    assert_eq!(fs::read(corrupt.join("not-an-id.1")).unwrap(), b"stray");
    let list = spool.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, keep);
    assert!(!list[0].corrupt);
}

#[test]
fn missing_or_wrong_size_body_is_listed_corrupt_and_never_due() {
    let dir = tempfile::tempdir().unwrap();
    let (missing, truncated, good) = {
        let spool = Spool::open(dir.path()).unwrap();
        let a = spool_msg(&spool, b"body a", &envelope(&["a@x.test"], T0));
        let b = spool_msg(&spool, b"body b", &envelope(&["b@x.test"], T0 + 1));
        let c = spool_msg(&spool, b"body c", &envelope(&["c@x.test"], T0 + 2));
        fs::remove_file(spool.body_path(&a)).unwrap();
        fs::write(spool.body_path(&b), b"bo").unwrap();
        (a, b, c)
    };
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.recovery().marked_corrupt, 2);
    let list = spool.list().unwrap();
    assert_eq!(list.len(), 3);
    let by_id = |id: &QueueId| list.iter().find(|m| m.id == *id).unwrap();
    assert!(by_id(&missing).corrupt);
    assert!(
        by_id(&missing)
            .corrupt_reason
            .as_deref()
            .unwrap()
            .contains("missing")
    );
    assert!(by_id(&truncated).corrupt);
    assert!(!by_id(&good).corrupt);

    let due = spool.due(T0 + 100, 10).unwrap();
    assert_eq!(due.iter().map(|m| m.id).collect::<Vec<_>>(), vec![good]);
    assert_eq!(spool.flush_all(T0).unwrap(), 1);
    let counts = spool.counts().unwrap();
    assert_eq!(counts.messages, 3);
    assert_eq!(counts.corrupt, 2);
    assert_eq!(counts.queued, 1);
    assert_eq!(counts.oldest_received_at, Some(T0 + 2));
    assert!(spool.read_body(&missing).is_err());

    // Corrupt messages can be deleted, and the damage survives another reopen.
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.recovery().marked_corrupt, 0);
    assert!(spool.get(&missing).unwrap().unwrap().corrupt);
    assert!(spool.delete(&missing).unwrap());
    assert!(spool.delete(&truncated).unwrap());
    assert_eq!(spool.counts().unwrap().corrupt, 0);
}

#[test]
fn body_vanishing_at_runtime_marks_message_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let id = spool_msg(&spool, b"x", &envelope(&["a@x.test"], T0));
    fs::remove_file(spool.body_path(&id)).unwrap();
    let err = spool.read_body(&id).unwrap_err();
    assert!(matches!(err, SpoolError::Io { .. }), "{err}");
    assert!(spool.get(&id).unwrap().unwrap().corrupt);
    assert!(spool.due(T0, 10).unwrap().is_empty());
}

#[test]
fn garbage_or_truncated_database_is_an_error_not_a_panic() {
    // Garbage.
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("spool")).unwrap();
    let db = dir.path().join("spool/queue.sqlite3");
    fs::write(
        &db,
        b"this is not an SQLite database, just some text".repeat(200),
    )
    .unwrap();
    let err = Spool::open(dir.path()).unwrap_err();
    eprintln!("garbage: {err}");
    assert!(
        err.to_string().contains("queue.sqlite3"),
        "error names the file: {err}"
    );

    // A real database, truncated in the middle.
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path()).unwrap();
        for i in 0..200 {
            let rcpts: Vec<String> = (0..5).map(|j| format!("user{i}.{j}@d{j}.test")).collect();
            let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
            spool_msg(&spool, b"body", &envelope(&rcpts, T0 + i));
        }
    }
    let db = dir.path().join("spool/queue.sqlite3");
    let len = fs::metadata(&db).unwrap().len();
    assert!(len > 3 * 4096, "database unexpectedly small: {len}");
    for cut in [len / 2, 4096 + 100, 1000] {
        let f = fs::OpenOptions::new().write(true).open(&db).unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        let _ = fs::remove_file(dir.path().join("spool/queue.sqlite3-wal"));
        let _ = fs::remove_file(dir.path().join("spool/queue.sqlite3-shm"));
        match Spool::open(dir.path()) {
            Err(e) => eprintln!("truncated to {cut} bytes: {e}"),
            Ok(_) => panic!("truncated to {cut} bytes, open succeeded"),
        }
    }
}

#[test]
fn damaged_page_in_database_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path()).unwrap();
        for i in 0..200 {
            spool_msg(
                &spool,
                b"body",
                &envelope(&["a@b.test", "c@d.test"], T0 + i),
            );
        }
    }
    let db = dir.path().join("spool/queue.sqlite3");
    let mut bytes = fs::read(&db).unwrap();
    assert!(bytes.len() > 8 * 4096);
    // Scribble over a page in the middle; the size and header stay valid.
    bytes[4 * 4096..5 * 4096].fill(0xA5);
    fs::write(&db, &bytes).unwrap();
    match Spool::open(dir.path()) {
        Err(e) => eprintln!("damaged page: {e}"),
        Ok(_) => panic!("open succeeded on a damaged database"),
    }
}

#[test]
fn record_attempt_transitions_and_due_ordering() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    // Committed in this order, but received in a different order.
    let late = spool_msg(&spool, b"late", &envelope(&["a@x.test"], T0 + 20));
    let early = spool_msg(
        &spool,
        b"early",
        &envelope(&["b@x.test", "c@y.test", "d@z.test"], T0),
    );
    let mid = spool_msg(&spool, b"mid", &envelope(&["e@x.test"], T0 + 10));

    let ids = |v: Vec<stsrelay::queue::spool::MessageInfo>| {
        v.into_iter().map(|m| m.id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(spool.due(T0 + 100, 10).unwrap()),
        vec![early, mid, late]
    );
    assert_eq!(ids(spool.due(T0 + 100, 2).unwrap()), vec![early, mid]);
    assert_eq!(ids(spool.due(T0 + 10, 10).unwrap()), vec![early, mid]);
    assert!(spool.due(T0 - 1, 10).unwrap().is_empty());
    assert!(spool.due(T0 + 100, 0).unwrap().is_empty());

    // early: rcpt 0 delivered, rcpt 1 deferred to T0+500, rcpt 2 bounced.
    spool.record_attempt(&early, 0, Outcome::Delivered).unwrap();
    spool
        .record_attempt(
            &early,
            1,
            Outcome::Deferred {
                reason: "4.7.5 MTA-STS: certificate does not match".into(),
                next_attempt: T0 + 500,
            },
        )
        .unwrap();
    spool
        .record_attempt(
            &early,
            2,
            Outcome::Bounced {
                reason: "550 5.1.1 no such user".into(),
            },
        )
        .unwrap();
    let m = spool.get(&early).unwrap().unwrap();
    let states: Vec<_> = m.recipients.iter().map(|r| r.state).collect();
    assert_eq!(
        states,
        vec![
            RcptState::Delivered,
            RcptState::Deferred,
            RcptState::Bounced
        ]
    );
    assert!(m.recipients.iter().all(|r| r.attempts == 1));
    assert_eq!(m.recipients[0].last_reason, None);
    assert_eq!(
        m.recipients[1].last_reason.as_deref(),
        Some("4.7.5 MTA-STS: certificate does not match")
    );
    assert_eq!(m.recipients[1].next_attempt, T0 + 500);
    assert_eq!(
        m.recipients[2].last_reason.as_deref(),
        Some("550 5.1.1 no such user")
    );
    assert!(!m.is_done());
    assert_eq!(m.due_recipients(T0 + 500).count(), 1);
    assert_eq!(m.due_recipients(T0 + 499).count(), 0);

    // Now early is not due until T0+500.
    assert_eq!(ids(spool.due(T0 + 100, 10).unwrap()), vec![mid, late]);
    assert_eq!(
        ids(spool.due(T0 + 500, 10).unwrap()),
        vec![early, mid, late]
    );

    // Deferred again: attempts increments.
    spool
        .record_attempt(
            &early,
            1,
            Outcome::Deferred {
                reason: "timeout".into(),
                next_attempt: T0 + 2000,
            },
        )
        .unwrap();
    let r1 = &spool.get(&early).unwrap().unwrap().recipients[1];
    assert_eq!(
        (r1.state, r1.attempts, r1.next_attempt),
        (RcptState::Deferred, 2, T0 + 2000)
    );

    // Final states are final; bad indexes and ids are errors.
    assert!(matches!(
        spool.record_attempt(&early, 0, Outcome::Bounced { reason: "x".into() }),
        Err(SpoolError::AlreadyFinal {
            index: 0,
            state: RcptState::Delivered,
            ..
        })
    ));
    assert!(matches!(
        spool.record_attempt(&early, 3, Outcome::Delivered),
        Err(SpoolError::NoSuchRecipient { index: 3, .. })
    ));
    let unknown: QueueId = "0000000000000042".parse().unwrap();
    assert!(matches!(
        spool.record_attempt(&unknown, 0, Outcome::Delivered),
        Err(SpoolError::NotFound(_))
    ));

    let c = spool.counts().unwrap();
    assert_eq!(
        (
            c.messages,
            c.queued,
            c.deferred,
            c.delivered,
            c.bounced,
            c.corrupt
        ),
        (3, 2, 1, 1, 1, 0)
    );
    assert_eq!(c.oldest_received_at, Some(T0));

    // State survives a reopen.
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.counts().unwrap(), c);
}

#[test]
fn flush_all_makes_everything_pending_due() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let a = spool_msg(&spool, b"a", &envelope(&["a@x.test", "b@x.test"], T0));
    let b = spool_msg(&spool, b"b", &envelope(&["c@x.test"], T0));
    let deferred = |next| Outcome::Deferred {
        reason: "busy".into(),
        next_attempt: next,
    };
    spool.record_attempt(&a, 0, deferred(T0 + 3600)).unwrap();
    spool.record_attempt(&a, 1, Outcome::Delivered).unwrap();
    spool.record_attempt(&b, 0, deferred(T0 + 7200)).unwrap();
    assert!(spool.due(T0 + 60, 10).unwrap().is_empty());

    assert_eq!(spool.flush_all(T0 + 60).unwrap(), 2);
    let due = spool.due(T0 + 60, 10).unwrap();
    assert_eq!(due.len(), 2);
    let m = spool.get(&a).unwrap().unwrap();
    assert_eq!(m.recipients[0].next_attempt, T0 + 60);
    assert_eq!(m.recipients[1].state, RcptState::Delivered);

    spool.record_attempt(&b, 0, deferred(T0 + 9000)).unwrap();
    assert_eq!(spool.flush(&b, T0 + 61).unwrap(), 1);
    assert_eq!(
        spool.get(&b).unwrap().unwrap().recipients[0].next_attempt,
        T0 + 61
    );
}

#[test]
fn delete_removes_metadata_and_body() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let a = spool_msg(&spool, b"a", &envelope(&["a@x.test"], T0));
    let b = spool_msg(&spool, b"b", &envelope(&["b@x.test"], T0));
    let body = spool.body_path(&a);
    assert!(body.exists());
    assert!(spool.delete(&a).unwrap());
    assert!(!body.exists());
    assert!(spool.get(&a).unwrap().is_none());
    assert!(!spool.delete(&a).unwrap());
    assert_eq!(spool.list().unwrap().len(), 1);
    assert!(spool.read_body(&b).is_ok());
    drop(spool);
    // Nothing left for recovery to find.
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.recovery().orphans_moved, 0);
    assert_eq!(spool.list().unwrap().len(), 1);
}

#[test]
fn remove_if_done_only_when_no_recipient_pending() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let id = spool_msg(&spool, b"m", &envelope(&["a@x.test", "b@y.test"], T0));
    assert!(!spool.remove_if_done(&id).unwrap());
    spool.record_attempt(&id, 0, Outcome::Delivered).unwrap();
    assert!(!spool.remove_if_done(&id).unwrap());
    spool
        .record_attempt(
            &id,
            1,
            Outcome::Deferred {
                reason: "later".into(),
                next_attempt: T0 + 1,
            },
        )
        .unwrap();
    assert!(!spool.remove_if_done(&id).unwrap());
    assert!(spool.get(&id).unwrap().is_some());
    spool
        .record_attempt(
            &id,
            1,
            Outcome::Bounced {
                reason: "gave up".into(),
            },
        )
        .unwrap();
    assert!(spool.get(&id).unwrap().unwrap().is_done());
    assert!(spool.remove_if_done(&id).unwrap());
    assert!(spool.get(&id).unwrap().is_none());
    assert!(!spool.body_path(&id).exists());
    assert!(!spool.remove_if_done(&id).unwrap());
}

#[test]
fn queue_id_parse_rejects_paths_lowercase_and_wrong_length() {
    for bad in [
        "../x",
        "../../../etc/pwd",
        "0123456789abcdef",
        "0123456789ABCDE",
        "0123456789ABCDEF0",
        "",
        "0123456789ABCD/F",
        " 123456789ABCDEF",
    ] {
        assert!(bad.parse::<QueueId>().is_err(), "{bad:?} was accepted");
    }
    let id: QueueId = "0123456789ABCDEF".parse().unwrap();
    assert_eq!(id.to_string(), "0123456789ABCDEF");

    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let a = spool_msg(&spool, b"a", &envelope(&["a@x.test"], T0));
    let b = spool_msg(&spool, b"b", &envelope(&["a@x.test"], T0));
    assert!(a < b, "ids sort by creation");
    assert!(a.to_string() < b.to_string());
    assert_eq!(a.to_string().parse::<QueueId>().unwrap(), a);
}

#[test]
fn data_dir_that_is_a_file_fails_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    fs::write(&file, b"not a directory").unwrap();
    let err = Spool::open(&file).unwrap_err();
    assert!(matches!(err, SpoolError::Io { .. }), "{err}");

    // `incoming` is a regular file.
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("spool")).unwrap();
    fs::write(dir.path().join("spool/incoming"), b"").unwrap();
    let err = Spool::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("incoming"), "{err}");
}

#[test]
fn unwritable_incoming_fails_incoming() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let incoming = incoming_dir(&spool);
    fs::remove_dir(&incoming).unwrap();
    fs::write(&incoming, b"").unwrap(); // now a regular file: nothing can be created in it
    let err = spool.incoming().unwrap_err();
    assert!(matches!(err, SpoolError::Io { .. }), "{err}");
    assert!(spool.list().unwrap().is_empty());
}

#[test]
fn commit_failure_leaves_nothing_half_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let mut inc = spool.incoming().unwrap();
    inc.write(b"Subject: doomed\r\n\r\n").unwrap();
    let tmp = inc.path().to_path_buf();
    let messages = messages_dir(&spool);
    fs::remove_dir(&messages).unwrap();
    fs::write(&messages, b"").unwrap(); // messages/ is unusable
    let err = inc.commit(&envelope(&["a@x.test"], T0)).unwrap_err();
    assert!(matches!(err, SpoolError::Io { .. }), "{err}");
    assert!(err.to_string().contains("messages"), "{err}");
    assert!(!tmp.exists(), "temporary file removed");
    assert!(spool.list().unwrap().is_empty());
    assert_eq!(spool.counts().unwrap().messages, 0);

    // An envelope without recipients is refused before anything is moved.
    fs::remove_file(&messages).unwrap();
    fs::create_dir(&messages).unwrap();
    let mut inc = spool.incoming().unwrap();
    inc.write(b"x").unwrap();
    let err = inc.commit(&envelope(&[], T0)).unwrap_err();
    assert!(matches!(err, SpoolError::InvalidEnvelope(_)), "{err}");
    assert!(entries(&incoming_dir(&spool)).is_empty());
    assert!(entries(&messages).is_empty());
}

#[test]
fn two_spool_instances_on_one_dir_see_each_others_messages() {
    let dir = tempfile::tempdir().unwrap();
    let relay = open_alone(dir.path());
    assert!(relay.recovery().performed);

    // The relay is receiving a message when the CLI opens the spool.
    let mut in_flight = relay.incoming().unwrap();
    in_flight.write(b"in flight").unwrap();
    let tmp = in_flight.path().to_path_buf();

    let cli = Spool::open(dir.path()).unwrap();
    assert!(
        !cli.recovery().performed,
        "recovery must not run while the spool is open elsewhere"
    );
    assert!(tmp.exists(), "the relay's in-flight body was not touched");

    let a = in_flight.commit(&envelope(&["a@x.test"], T0)).unwrap();
    let b = spool_msg(&cli, b"from cli", &envelope(&["b@x.test"], T0 + 1));
    for s in [&relay, &cli] {
        let ids: Vec<_> = s.list().unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![a, b]);
    }
    cli.record_attempt(&a, 0, Outcome::Delivered).unwrap();
    assert_eq!(
        relay.get(&a).unwrap().unwrap().recipients[0].state,
        RcptState::Delivered
    );
    assert!(relay.remove_if_done(&a).unwrap());
    assert!(cli.get(&a).unwrap().is_none());
    assert_eq!(cli.read_body(&b).unwrap(), b"from cli");

    // Concurrent writers from threads.
    let handles: Vec<_> = [relay.clone(), cli.clone()]
        .into_iter()
        .map(|s| {
            std::thread::spawn(move || {
                (0..20)
                    .map(|i| spool_msg(&s, b"t", &envelope(&["t@x.test"], T0 + 100 + i)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut made: Vec<QueueId> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    made.sort();
    made.dedup();
    assert_eq!(made.len(), 40);
    assert_eq!(relay.list().unwrap().len(), 41);
    assert_eq!(cli.counts().unwrap().queued, 41);

    // Once both are closed, the next open recovers again.
    drop((relay, cli));
    let again = open_alone(dir.path());
    assert!(again.recovery().performed);
    assert_eq!(again.list().unwrap().len(), 41);
}

/// Child half of `crash_after_commit_keeps_message`: only acts when the parent set
/// the environment variable.
#[test]
fn crash_child_helper() {
    let Some(dir) = std::env::var_os("STSRELAY_SPOOL_CRASH_DIR") else {
        return;
    };
    let spool = Spool::open(Path::new(&dir)).unwrap();
    let id = spool_msg(&spool, b"survives", &envelope(&["a@x.test"], T0));
    let mut unacked = spool.incoming().unwrap();
    unacked.write(b"lost on crash").unwrap();
    println!("COMMITTED={id}");
    // Die without running destructors or any orderly shutdown.
    std::process::abort();
}

#[test]
fn crash_after_commit_keeps_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STSRELAY_SPOOL_CRASH_DIR", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "child should have aborted");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id: QueueId = stdout
        .lines()
        .find_map(|l| l.split_once("COMMITTED=").map(|(_, id)| id.trim()))
        .unwrap_or_else(|| panic!("no id in child output: {stdout}"))
        .parse()
        .unwrap();

    let spool = open_alone(dir.path());
    let rec = spool.recovery();
    assert!(rec.performed);
    assert_eq!(rec.incoming_removed, 1);
    let list = spool.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, id);
    assert!(!list[0].corrupt);
    assert_eq!(spool.read_body(&id).unwrap(), b"survives");
}

#[test]
fn spool_is_clone_send_sync_and_incoming_is_send() {
    fn assert_send_sync<T: Clone + Send + Sync + 'static>() {}
    fn assert_send<T: Send + 'static>() {}
    assert_send_sync::<Spool>();
    assert_send::<stsrelay::queue::spool::Incoming>();
}

#[tokio::test]
async fn async_callers_use_spawn_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let s = spool.clone();
    let id = tokio::task::spawn_blocking(move || {
        let mut inc = s.incoming()?;
        inc.write(b"async")?;
        inc.commit(&envelope(&["a@x.test"], T0))
    })
    .await
    .unwrap()
    .unwrap();
    let s = spool.clone();
    let due = tokio::task::spawn_blocking(move || s.due(T0, 10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(due[0].id, id);
}

#[test]
fn record_attempts_is_one_transaction_and_removes_when_done() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let env = envelope(&["a@x.test", "b@x.test"], 1_000);
    let id = spool_msg(&spool, b"Subject: t\r\n\r\nbody\r\n", &env);
    // One delivered, one deferred: nothing removed.
    let removed = spool
        .record_attempts(
            &id,
            vec![
                (0, Outcome::Delivered),
                (
                    1,
                    Outcome::Deferred {
                        reason: "451 later".into(),
                        next_attempt: 2_000,
                    },
                ),
            ],
            true,
        )
        .unwrap();
    assert!(!removed);
    assert!(spool.get(&id).unwrap().is_some());
    // A final state cannot be recorded again; the whole batch is refused.
    assert!(
        spool
            .record_attempts(
                &id,
                vec![(1, Outcome::Delivered), (0, Outcome::Delivered)],
                true
            )
            .is_err()
    );
    assert!(
        spool.get(&id).unwrap().unwrap().recipients[1].is_pending(),
        "nothing recorded on error"
    );
    // The last pending recipient delivered: message and body are gone.
    assert!(
        spool
            .record_attempts(&id, vec![(1, Outcome::Delivered)], true)
            .unwrap()
    );
    assert!(spool.get(&id).unwrap().is_none());
    assert!(!spool.body_path(&id).exists());
}
