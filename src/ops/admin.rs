//! The admin HTTP endpoint (`admin.listen`, loopback by default; axum over HTTP/1):
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | Prometheus text format (404 when no exporter was given) |
//! | `/healthz` | `200 ok`: the process serves requests |
//! | `/readyz` | `200 ready` when the SMTP listener is bound, the spool and store are open and the spool stored the last message, else `503` naming what is not |
//! | `/` | the HTML [status page](super::status) |
//!
//! What the endpoint reports comes from an [`AdminSource`] (the relay implements it);
//! how metrics are rendered is a closure, so a program that embeds the library can use
//! its own recorder.

use super::status::{self, Status};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;

/// Renders the current metrics in the Prometheus text format.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// What the admin endpoint asks the relay.
#[async_trait::async_trait]
pub trait AdminSource: Send + Sync + 'static {
    /// What keeps the relay from being ready (empty: ready).
    fn not_ready(&self) -> Vec<&'static str>;
    /// Bring gauges up to date before a scrape (queue depth and age).
    async fn update_gauges(&self);
    /// A snapshot for the status page.
    async fn status(&self) -> Status;
}

#[derive(Clone)]
struct App {
    source: Arc<dyn AdminSource>,
    metrics: Option<MetricsRender>,
}

/// The admin routes over `source`, with `metrics` rendering `/metrics`.
///
/// ```
/// use std::sync::Arc;
/// use stsrelay::ops::admin::{router, AdminSource};
/// use stsrelay::ops::status::Status;
///
/// struct Always;
/// #[async_trait::async_trait]
/// impl AdminSource for Always {
///     fn not_ready(&self) -> Vec<&'static str> { vec![] }
///     async fn update_gauges(&self) {}
///     async fn status(&self) -> Status { Status::default() }
/// }
/// let app = router(Arc::new(Always), Some(Arc::new(|| "up 1\n".to_string())));
/// # let _ = app;
/// ```
pub fn router(source: Arc<dyn AdminSource>, metrics: Option<MetricsRender>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(App { source, metrics })
}

/// Serve `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_text(State(app): State<App>) -> Response {
    let Some(render) = app.metrics.clone() else {
        return (StatusCode::NOT_FOUND, "no metrics exporter installed\n").into_response();
    };
    app.source.update_gauges().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<App>) -> Response {
    let missing = app.source.not_ready();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join(", ")),
        )
            .into_response()
    }
}

async fn status_page(State(app): State<App>) -> Response {
    let s = app.source.status().await;
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(status::render(&s)),
    )
        .into_response()
}
