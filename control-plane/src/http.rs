//! The control plane's HTTP side (`--http-listen`): `/metrics` for
//! Prometheus, `/healthz` and `/readyz` for probes, and the live page at `/`
//! with the JSON it polls (`/api/peers`, `/api/swarm/{blob}`), which scripts
//! can read too.
//!
//! The page itself is static (no data, no external assets) and served to
//! anyone; the JSON answers under the admin API's rule on TCP: only with the
//! admin token as `authorization: Bearer <token>`, and not at all when no
//! admin token is set (403, naming the flag), since any local user can reach
//! a loopback port. `/metrics` carries no ids and no secrets and is open, as
//! scrapers expect.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use nebula_common::{BlobRef, Geometry};
use nebula_proto::tls::TlsConfig;
use serde::Serialize;
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{AdminAuth, AuthError},
    error::RegistryError,
    metrics::peer_state,
    registry::Registry,
    store::{PeerSnapshot, StateStore},
};

/// The live page: one file, inline script and style, nothing fetched from
/// elsewhere, so it works offline.
const PAGE: &str = include_str!("page.html");

/// The content type Prometheus and OpenMetrics scrapers expect.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

struct AppState<S> {
    registry: Arc<Registry<S>>,
    auth: AdminAuth,
}

/// Builds the router over `registry`; `auth` guards the JSON.
pub fn router<S: StateStore>(registry: Arc<Registry<S>>, auth: AdminAuth) -> Router {
    let state = Arc::new(AppState { registry, auth });
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready::<S>))
        .route("/api/peers", get(peers::<S>))
        .route("/api/swarm/{blob}", get(swarm::<S>))
        .with_state(state)
}

/// Serves `router` on `listener` until `stop` fires, with TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<&TlsConfig>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    nebula_proto::https::serve(listener, router, tls, stop.cancelled_owned()).await
}

/// An error answer: a status and one line of JSON saying why.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        let code = match err {
            AuthError::NoAdminToken => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        Self(code, err.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        // The gRPC mapping decides; HTTP follows it.
        let status = tonic::Status::from(err);
        let code = match status.code() {
            tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(code, status.message().to_owned())
    }
}

impl<S> AppState<S> {
    fn admit(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        Ok(self.auth.check_http(authorization)?)
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn metrics<S: StateStore>(State(state): State<Arc<AppState<S>>>) -> Response {
    let registry = &state.registry;
    match (registry.peers().await, registry.store().stats().await) {
        (Ok(peers), Ok(stats)) => (
            [(header::CONTENT_TYPE, OPENMETRICS)],
            registry.metrics().render(&peers, &stats),
        )
            .into_response(),
        (Err(e), _) => ApiError::from(e).into_response(),
        (_, Err(e)) => ApiError::from(RegistryError::from(e)).into_response(),
    }
}

async fn ready<S: StateStore>(State(state): State<Arc<AppState<S>>>) -> Response {
    match state.registry.store().stats().await {
        Ok(_) => "ready\n".into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// One peer as the page lists it.
#[derive(Debug, Serialize)]
struct PeerRow {
    peer_id: String,
    address: String,
    zone: String,
    state: &'static str,
    active_uploads: u32,
    upload_slots: u32,
    blob_count: u64,
    last_seen_ms_ago: u64,
}

impl PeerRow {
    fn new(peer: &PeerSnapshot, now: Instant) -> Self {
        Self {
            peer_id: peer.id.to_string(),
            address: peer.address.to_string(),
            zone: peer.zone.to_string(),
            state: peer_state(peer),
            active_uploads: peer.load.active_uploads,
            upload_slots: peer.load.upload_slots,
            blob_count: peer.blob_count,
            last_seen_ms_ago: now.saturating_duration_since(peer.last_seen).as_millis() as u64,
        }
    }
}

#[derive(Debug, Serialize)]
struct PeersBody {
    peers: Vec<PeerRow>,
}

async fn peers<S: StateStore>(
    State(state): State<Arc<AppState<S>>>,
    headers: HeaderMap,
) -> Result<Json<PeersBody>, ApiError> {
    state.admit(&headers)?;
    let now = Instant::now();
    let peers = state.registry.peers().await?;
    Ok(Json(PeersBody {
        peers: peers.iter().map(|p| PeerRow::new(p, now)).collect(),
    }))
}

/// One live peer and what it holds of the blob.
#[derive(Debug, Serialize)]
struct SwarmRow {
    #[serde(flatten)]
    peer: PeerRow,
    /// Holds every chunk.
    complete: bool,
    /// Chunks held.
    chunks_held: u32,
    /// The held chunks as a hex bitmap (chunk `i` is bit `i % 8` of byte
    /// `i / 8`); empty when complete or holding none.
    bitmap: String,
}

#[derive(Debug, Serialize)]
struct SwarmBody {
    id: String,
    size: u64,
    chunk_size: u64,
    chunk_count: u32,
    /// Every live peer, holders first: a peer still waiting for its first
    /// chunk is a row with nothing filled.
    peers: Vec<SwarmRow>,
}

async fn swarm<S: StateStore>(
    State(state): State<Arc<AppState<S>>>,
    headers: HeaderMap,
    Path(blob): Path<String>,
) -> Result<Json<SwarmBody>, ApiError> {
    state.admit(&headers)?;
    let blob: BlobRef = blob
        .parse()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("blob {blob:?}: {e}")))?;
    let swarm = state.registry.swarm(blob).await?;
    if swarm.holders.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no live peer holds blob {}", swarm.meta.id),
        ));
    }
    let geometry = Geometry::new(swarm.meta.size);
    let count = geometry.chunk_count();
    let now = Instant::now();
    let mut rows: Vec<SwarmRow> = swarm
        .holders
        .iter()
        .map(|h| {
            let (complete, chunks_held, bitmap) = match &h.chunks {
                None => (true, count, String::new()),
                Some(bits) => {
                    let set = nebula_common::ChunkSet::from_bitmap(bits, count);
                    (false, set.count(), hex::encode(set.as_bitmap()))
                }
            };
            SwarmRow {
                peer: PeerRow::new(&h.peer, now),
                complete,
                chunks_held,
                bitmap,
            }
        })
        .collect();
    for p in state.registry.peers().await? {
        if !rows.iter().any(|r| r.peer.peer_id == p.id.as_str()) {
            rows.push(SwarmRow {
                peer: PeerRow::new(&p, now),
                complete: false,
                chunks_held: 0,
                bitmap: String::new(),
            });
        }
    }
    rows.sort_by(|a, b| {
        (b.complete, b.chunks_held > 0)
            .cmp(&(a.complete, a.chunks_held > 0))
            .then_with(|| a.peer.peer_id.cmp(&b.peer.peer_id))
    });
    Ok(Json(SwarmBody {
        id: swarm.meta.id.to_string(),
        size: swarm.meta.size,
        chunk_size: geometry.chunk_size(),
        chunk_count: count,
        peers: rows,
    }))
}
