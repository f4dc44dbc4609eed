//! Operating the relay: metrics, the admin HTTP endpoint with its status page, signals
//! (reload and graceful shutdown) and systemd notification.
//!
//! - [`metrics`]: metric names and the helpers the relay records through (the
//!   `metrics` facade; the binary installs the Prometheus exporter);
//! - [`activity`]: the last 24 hours of outcomes, for the status page;
//! - [`status`]: the HTML status page;
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz` and `/` over HTTP;
//! - [`signals`]: SIGHUP (reload) and SIGTERM/SIGINT (shutdown) as [`signals::Control`];
//! - [`notify`]: `READY=1`, `RELOADING=1`, `STOPPING=1` for systemd `Type=notify`.

pub mod activity;
pub mod admin;
pub mod metrics;
pub mod notify;
pub mod signals;
pub mod status;
