//! The daemon's HTTP endpoint (`--http-listen`): `/metrics` in the
//! OpenMetrics text format, `/healthz` and `/readyz`.

use std::{io, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use nebula_common::Store;
use nebula_proto::tls::TlsConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{exchange::dial::Dialer, membership, metrics::Metrics, uploads::Uploads};

/// The content type Prometheus and OpenMetrics scrapers expect.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the endpoint reads: the metrics, and the states scraped with them.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) store: Arc<Store>,
    pub(crate) uploads: Arc<Uploads>,
    pub(crate) dialer: Dialer,
    /// Membership's status; `None` without a control plane (always ready).
    pub(crate) membership: Option<membership::Status>,
    pub(crate) tls: Option<TlsConfig>,
}

/// The daemon's HTTP router: `/metrics`, `/healthz` (the process answers)
/// and `/readyz` (registered with the control plane, or running without one).
fn router(endpoint: Arc<Endpoint>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(endpoint)
}

async fn scrape(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    let dialed = endpoint.dialer.open_count().await;
    let rendered = {
        let e = Arc::clone(&endpoint);
        // Listing the store touches every blob's metadata: off the reactor.
        tokio::task::spawn_blocking(move || e.metrics.render(&e.store, e.uploads.active(), dialed))
            .await
    };
    match rendered {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, OPENMETRICS)],
            text,
        )
            .into_response(),
        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn ready(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    if endpoint
        .membership
        .as_ref()
        .is_none_or(membership::Status::is_registered)
    {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not registered with the control plane\n",
        )
    }
}

/// Serves the daemon's HTTP endpoints on `listener` until `stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    stop: CancellationToken,
) -> io::Result<()> {
    let tls = endpoint.tls.clone();
    nebula_proto::https::serve(
        listener,
        router(Arc::new(endpoint)),
        tls.as_ref(),
        stop.cancelled_owned(),
    )
    .await
}
