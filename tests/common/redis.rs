//! A throw-away `redis-server` (the Debian package) on a free loopback port, in a
//! temporary directory, with persistence off; killed when dropped.
//!
//! `REDIS_SERVER` names the binary (default `redis-server` on `PATH`). When it is not
//! installed, [`skip`] lets `cargo test` on a fresh machine skip the Redis tests with a
//! notice, unless `STSRELAY_REQUIRE_REDIS=1` (set by `.ci/run`, which installs the
//! package): then they run and fail with a message saying what is missing. A server
//! that is installed but cannot start always fails the test.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Should a Redis test be skipped? Only when `redis-server` is not installed and
/// `STSRELAY_REQUIRE_REDIS` is not set; says so on stderr.
pub fn skip() -> bool {
    let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let installed = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let required = std::env::var_os("STSRELAY_REQUIRE_REDIS").is_some_and(|v| v == "1");
    if !installed && !required {
        eprintln!(
            "SKIPPED: {bin:?} is not installed (Debian package `redis-server`); \
             .ci/run installs it and sets STSRELAY_REQUIRE_REDIS=1"
        );
    }
    !installed && !required
}

/// A running `redis-server`.
pub struct RedisServer {
    child: Child,
    addr: SocketAddr,
    tls_port: Option<u16>,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Start a server and wait (bounded) until it answers PING.
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// Like [`RedisServer::start`], with a TLS port too (server certificate and key
    /// files in PEM; clients need no certificate). PING is checked on the plain port.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> RedisServer {
        Self::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&std::path::Path, &std::path::Path)>) -> RedisServer {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut last = String::new();
        // A few attempts: the free port found may be taken before redis binds it.
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir for redis-server");
            let free = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("free loopback port");
            let (l1, l2) = (free(), free());
            let port = l1.local_addr().expect("port").port();
            let tls_port = l2.local_addr().expect("port").port();
            drop((l1, l2));
            let mut cmd = Command::new(&bin);
            cmd.args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path());
            if let Some((cert, key)) = tls {
                cmd.args(["--tls-port", &tls_port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .args(["--tls-auth-clients", "no"]);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(e) => panic!(
                    "cannot run {bin:?} ({e}): the Redis store tests need redis-server \
                     (Debian package `redis-server`, or set REDIS_SERVER)"
                ),
            };
            let mut server = RedisServer {
                child,
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                tls_port: tls.map(|_| tls_port),
                _dir: dir,
            };
            for _ in 0..100 {
                if server.pings() {
                    return server;
                }
                if let Ok(Some(status)) = server.child.try_wait() {
                    last = format!("redis-server exited: {status}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if last.is_empty() {
                last = "redis-server did not answer PING within 5 s".into();
            }
        }
        panic!("could not start redis-server: {last}");
    }

    /// Kill the server and start a new, empty one on the same port (as after a crash
    /// of a server without persistence; plain port only); waits (bounded) until it
    /// answers PING.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Kill the server (its port refuses connections until [`RedisServer::start_again`]).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freeze the server (SIGSTOP): connections are accepted by the kernel but nothing
    /// is answered, like a hung or unreachable server, until [`RedisServer::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Undo [`RedisServer::pause`] (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} redis-server");
    }

    /// After [`RedisServer::stop`]: a new, empty server on the same port.
    pub fn start_again(&mut self) {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let port = self.addr.port().to_string();
        for _ in 0..20 {
            self.child = Command::new(&bin)
                .args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(self._dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("restart redis-server");
            for _ in 0..100 {
                if self.pings() {
                    return;
                }
                if let Ok(Some(_)) = self.child.try_wait() {
                    break; // port not free yet: try again
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart redis-server on port {port}");
    }

    fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    /// `rediss://127.0.0.1:TLS_PORT/` (only for [`RedisServer::start_tls`]).
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("started with start_tls");
        format!("rediss://127.0.0.1:{port}/")
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused server must be woken to die cleanly.
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
