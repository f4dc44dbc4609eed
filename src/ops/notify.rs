//! systemd service notification (`Type=notify`, see `contrib/stsrelay.service`):
//! `READY=1` once the relay listens, `RELOADING=1` … `READY=1` around a SIGHUP reload,
//! `STOPPING=1` when shutdown starts. Without `$NOTIFY_SOCKET` (not run by systemd)
//! every call does nothing.

use sd_notify::NotifyState;

fn send(what: &str, states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd ({what})");
    }
}

/// The relay listens and delivers: `READY=1` and a status line.
pub fn ready(status: &str) {
    send("ready", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts: `RELOADING=1` with the monotonic time systemd's `notify-reload`
/// expects. Follow with [`ready`].
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("reloading", &[NotifyState::Reloading, now]),
        Err(_) => send("reloading", &[NotifyState::Reloading]),
    }
}

/// Shutdown starts: `STOPPING=1`.
pub fn stopping() {
    send(
        "stopping",
        &[NotifyState::Stopping, NotifyState::Status("stopping")],
    );
}
