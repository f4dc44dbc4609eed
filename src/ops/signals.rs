//! Unix signals as relay controls: SIGHUP reloads the configuration, SIGTERM and
//! SIGINT stop the relay gracefully (a second one stops it at once).

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// What an operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the config file and the TLS certificate (SIGHUP).
    Reload,
    /// Stop accepting, finish what is in flight, exit (SIGTERM, SIGINT).
    Stop,
}

/// Listen for SIGHUP, SIGTERM and SIGINT on the current tokio runtime; each arrives as
/// one [`Control`] on the returned channel. Fails only if a handler cannot be installed.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use stsrelay::ops::signals::{listen, Control};
/// let mut controls = listen()?;
/// while let Some(c) = controls.recv().await {
///     if c == Control::Stop { break; }
/// }
/// # Ok(()) }
/// ```
pub fn listen() -> std::io::Result<mpsc::Receiver<Control>> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                Some(()) = hup.recv() => Control::Reload,
                Some(()) = term.recv() => Control::Stop,
                Some(()) = int.recv() => Control::Stop,
                else => return,
            };
            if tx.send(c).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
