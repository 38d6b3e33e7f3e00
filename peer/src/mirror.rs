//! The registry mirror (`--registry-mirror`): containerd and Docker pull
//! images through the swarm.
//!
//! It answers the pull side of the OCI distribution API over plain HTTP:
//! - `/v2/`: the API version check;
//! - `/v2/<name>/manifests/<tag|digest>`: from the upstream registry each
//!   time (a tag may be cached for `--mirror-tag-ttl`), the exact bytes with
//!   their `Content-Type` and digest; a manifest asked for by digest is
//!   checked against it;
//! - `/v2/<name>/blobs/<digest>`: through the swarm by `sha256:` digest,
//!   back to the registry when the fleet lacks it (one download for the
//!   fleet: a registry blob is an origin URL whose digest is known), streamed
//!   to the client as it arrives, with byte ranges.
//!
//! The registry is containerd's `?ns=<host>` when given, else
//! `--mirror-upstream`. Its token flow is answered here
//! ([`upstream`]); tokens never leave the daemon except to that registry.
//!
//! # Layout
//!
//! - this file: the router, manifests, errors;
//! - [`upstream`]: picking the registry, tokens and credentials;
//! - `blob`: blobs, streamed from the store, the swarm or the registry.

mod blob;
pub mod upstream;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use nebula_common::{Sha256Digest, Store};
use sha2::Digest as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::{
    Config, Fetcher,
    metrics::{Metrics, MirrorKind, MirrorResult},
    tasks::Tasks,
};
pub use upstream::Credentials;

/// The largest manifest passed on (the distribution registry's own limit).
const MAX_MANIFEST: usize = 4 << 20;
/// Manifests by tag kept at most when `--mirror-tag-ttl` is set.
const MAX_CACHED_TAGS: usize = 1024;
/// Bytes of manifests kept at most by that cache.
const MAX_CACHED_TAG_BYTES: usize = 64 << 20;
/// What a client that sends no `Accept` gets: every manifest type.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
const DIGEST_HEADER: &str = "docker-content-digest";

/// How the mirror reaches registries.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// The registry asked when the client does not name one (`?ns=`).
    pub upstream: Url,
    /// Manifests by tag are reused this long (zero: asked for each time).
    pub tag_ttl: Duration,
    /// Registry credentials (`--mirror-auth`).
    pub credentials: Credentials,
}

impl MirrorConfig {
    /// Docker Hub as the default upstream, no tag cache, no credentials.
    pub fn new() -> Self {
        Self {
            upstream: Url::parse(upstream::DOCKER_HUB).expect("a valid constant URL"),
            tag_ttl: Duration::ZERO,
            credentials: Credentials::default(),
        }
    }

    /// Parses `--mirror-upstream`: an http(s) URL with a host and no path.
    pub fn parse_upstream(s: &str) -> Result<Url, String> {
        let url = Url::parse(s.trim()).map_err(|e| format!("not a valid URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none()
            || url.path() != "/"
            || url.query().is_some()
            || !url.username().is_empty()
        {
            return Err(
                "give the registry as http(s)://HOST[:PORT], without a path or credentials".into(),
            );
        }
        Ok(url)
    }
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// A manifest as the registry sent it.
#[derive(Debug, Clone)]
struct Manifest {
    bytes: bytes::Bytes,
    content_type: HeaderValue,
    digest: String,
}

/// The mirror's state, shared by its handlers.
#[derive(Debug)]
pub(crate) struct Mirror {
    /// Blob downloads go through the node's fetcher, like any other fetch.
    fetcher: Fetcher,
    store: Arc<Store>,
    /// The node's configuration: its origin and fetch timeouts, its TLS.
    node: Arc<Config>,
    metrics: Arc<Metrics>,
    tasks: Tasks,
    config: MirrorConfig,
    upstream: upstream::Upstream,
    /// Manifests by tag, when cached: by registry, name, tag and `Accept`.
    tags: Mutex<HashMap<String, (Instant, Manifest)>>,
    /// Blob downloads under way, by blob URL (registry, repository and
    /// digest): every client of one blob there streams from the same
    /// download, and a client naming another repository or registry does
    /// not share (or spoil) its answer.
    inflight: Mutex<HashMap<String, Arc<blob::Inflight>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is one insert or remove; a panic cannot leave one half-done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mirror {
    /// The mirror of the node whose `fetcher`, `store`, configuration
    /// (`node`), `metrics` and `tasks` it works with.
    pub(crate) fn new(
        fetcher: Fetcher,
        store: Arc<Store>,
        node: Arc<Config>,
        metrics: Arc<Metrics>,
        tasks: Tasks,
        config: MirrorConfig,
    ) -> std::io::Result<Self> {
        let upstream = upstream::Upstream::new(
            node.origin_timeout,
            node.origin_ca.as_deref(),
            config.credentials.clone(),
        )
        .map_err(std::io::Error::other)?;
        Ok(Self {
            fetcher,
            store,
            node,
            metrics,
            tasks,
            config,
            upstream,
            tags: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        })
    }
}

/// Serves `mirror` on `listener` until `stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    mirror: Mirror,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let tls = mirror.node.tls.clone();
    nebula_proto::https::serve(
        listener,
        router(Arc::new(mirror)),
        tls.as_ref(),
        stop.cancelled_owned(),
    )
    .await
}

/// The distribution API's pull side. `HEAD` is routed on its own: axum
/// would otherwise run the `GET` handler, which may start a download.
fn router(mirror: Arc<Mirror>) -> Router {
    Router::new()
        .route("/v2", get(ping).head(ping))
        .route("/v2/", get(ping).head(ping))
        .route("/v2/{*rest}", get(resource).head(resource))
        .layer(axum::middleware::map_response(api_version))
        .with_state(mirror)
}

async fn api_version(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

async fn ping(State(m): State<Arc<Mirror>>) -> Response {
    m.metrics.mirror_request(MirrorKind::Ping, MirrorResult::Ok);
    Json(serde_json::json!({})).into_response()
}

/// `axum::Json` without the feature's extractor needs.
struct Json(serde_json::Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "application/json")],
            self.0.to_string(),
        )
            .into_response()
    }
}

/// What a path under `/v2/` names.
#[derive(Debug, PartialEq, Eq)]
enum Resource<'a> {
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, digest: &'a str },
}

fn parse_resource(rest: &str) -> Option<Resource<'_>> {
    // The split whose last part is one path segment: a repository may have
    // a component named `manifests` or `blobs`.
    let split = |kind, sep| {
        rest.rsplit_once(sep)
            .filter(|(_, last)| !last.contains('/'))
            .map(|(n, last)| (n, kind, last))
    };
    let (name, kind, last) = split("m", "/manifests/").or_else(|| split("b", "/blobs/"))?;
    // Repository names: lowercase components of [a-z0-9._-], split by '/'.
    let valid_name = !name.is_empty()
        && name.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars().all(|ch| {
                    ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-')
                })
        });
    let valid_last = !last.is_empty()
        && last.len() <= 200
        && last
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '+'));
    if !valid_name || !valid_last {
        return None;
    }
    Some(match kind {
        "m" => Resource::Manifest {
            name,
            reference: last,
        },
        _ => Resource::Blob { name, digest: last },
    })
}

/// `sha256:<hex>`, the only digest the mirror fetches by.
fn parse_digest(s: &str) -> Option<Sha256Digest> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 || hex.chars().any(|c| c.is_ascii_uppercase()) {
        return None;
    }
    hex.parse().ok()
}

/// The `ns` query parameter (containerd's name for the registry asked).
fn ns_of(uri: &Uri) -> Option<String> {
    url::form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned())
}

async fn resource(
    State(m): State<Arc<Mirror>>,
    Path(rest): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some(resource) = parse_resource(&rest) else {
        return error(
            StatusCode::NOT_FOUND,
            "NAME_INVALID",
            "not a manifest or blob path",
        );
    };
    let kind = match resource {
        Resource::Manifest { .. } => MirrorKind::Manifest,
        Resource::Blob { .. } => MirrorKind::Blob,
    };
    let base = match upstream::base_for(ns_of(&uri).as_deref(), &m.config.upstream) {
        Ok(b) => b,
        Err(why) => {
            m.metrics.mirror_request(kind, MirrorResult::BadRequest);
            return error(StatusCode::BAD_REQUEST, "NAME_INVALID", &why);
        }
    };
    let head = method == Method::HEAD;
    let (resp, result) = match resource {
        Resource::Manifest { name, reference } => {
            manifest(&m, &base, name, reference, head, &headers).await
        }
        Resource::Blob { name, digest } => match parse_digest(digest) {
            Some(d) if head => blob::head(&m, &base, name, d).await,
            Some(d) => blob::get(&m, &base, name, d, &headers).await,
            None => (
                error(
                    StatusCode::BAD_REQUEST,
                    "DIGEST_INVALID",
                    "blobs are fetched by sha256:<64 lowercase hex digits>",
                ),
                MirrorResult::BadRequest,
            ),
        },
    };
    m.metrics.mirror_request(kind, result);
    resp
}

/// The distribution API's error body.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "errors": [{ "code": code, "message": message, "detail": null }]
    });
    (status, Json(body)).into_response()
}

/// An upstream answer that is not a success, as the client should see it.
fn upstream_failure(status: reqwest::StatusCode, unknown: &str) -> (Response, MirrorResult) {
    match status.as_u16() {
        404 => (
            error(StatusCode::NOT_FOUND, unknown, "unknown to the registry"),
            MirrorResult::NotFound,
        ),
        401 => (
            error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "the registry refused the mirror's credentials",
            ),
            MirrorResult::Denied,
        ),
        403 => (
            error(
                StatusCode::FORBIDDEN,
                "DENIED",
                "the registry denied access",
            ),
            MirrorResult::Denied,
        ),
        429 => (
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                "the registry is rate limiting the mirror",
            ),
            MirrorResult::Upstream,
        ),
        _ => bad_gateway(&format!("the registry answered {status}")),
    }
}

/// A request to the registry that succeeded, or the answer to give instead
/// (`unknown`: the error code of a 404).
async fn ask_upstream(
    m: &Mirror,
    base: &Url,
    name: &str,
    method: Method,
    url: Url,
    headers: reqwest::header::HeaderMap,
    unknown: &str,
) -> Result<reqwest::Response, (Response, MirrorResult)> {
    let resp = m
        .upstream
        .send(base, name, method, url, headers)
        .await
        .map_err(|why| bad_gateway(&why))?;
    if !resp.status().is_success() {
        return Err(upstream_failure(resp.status(), unknown));
    }
    Ok(resp)
}

fn bad_gateway(why: &str) -> (Response, MirrorResult) {
    (
        error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", why),
        MirrorResult::Upstream,
    )
}

/// A manifest from the registry (or the tag cache), exact bytes and type.
async fn manifest(
    m: &Mirror,
    base: &Url,
    name: &str,
    reference: &str,
    head: bool,
    headers: &HeaderMap,
) -> (Response, MirrorResult) {
    let by_digest = reference.contains(':');
    if by_digest && parse_digest(reference).is_none() {
        return (
            error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                "manifests are named by tag or sha256:<64 lowercase hex digits>",
            ),
            MirrorResult::BadRequest,
        );
    }
    // Clients send one Accept line per media type: all of them go on (the
    // registry answers a multi-platform index only to a client that takes one).
    let accepted: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let accept = match accepted.as_slice() {
        [] => HeaderValue::from_static(MANIFEST_TYPES),
        many => HeaderValue::try_from(many.join(", "))
            .unwrap_or_else(|_| HeaderValue::from_static(MANIFEST_TYPES)),
    };
    let cache_key = format!(
        "{base}{name}:{reference}|{}",
        accept.to_str().unwrap_or_default()
    );
    let cached = (!by_digest && !m.config.tag_ttl.is_zero())
        .then(|| lock(&m.tags).get(&cache_key).cloned())
        .flatten()
        .filter(|(at, _)| at.elapsed() < m.config.tag_ttl);
    if let Some((_, manifest)) = cached {
        return (manifest_response(&manifest, head), MirrorResult::Ok);
    }
    let Ok(url) = base.join(&format!("v2/{name}/manifests/{reference}")) else {
        return bad_gateway("cannot form the registry URL");
    };
    let mut ask = reqwest::header::HeaderMap::new();
    ask.insert(header::ACCEPT, accept);
    let method = if head { Method::HEAD } else { Method::GET };
    let resp = match ask_upstream(m, base, name, method, url, ask, "MANIFEST_UNKNOWN").await {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    let upstream_digest = resp
        .headers()
        .get(DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if head {
        let mut out = Response::new(Body::empty());
        for h in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
            if let Some(v) = resp.headers().get(&h) {
                out.headers_mut().insert(h, v.clone());
            }
        }
        let digest = upstream_digest.or(by_digest.then(|| reference.to_owned()));
        if let Some(d) = digest.and_then(|d| HeaderValue::try_from(d).ok()) {
            out.headers_mut().insert(DIGEST_HEADER, d);
        }
        return (out, MirrorResult::Ok);
    }
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_MANIFEST as u64)
    {
        return bad_gateway("the registry's manifest is larger than 4 MiB");
    }
    let mut body = Vec::new();
    let mut resp = resp;
    loop {
        match resp.chunk().await {
            Ok(None) => break,
            Ok(Some(p)) if body.len() + p.len() <= MAX_MANIFEST => body.extend_from_slice(&p),
            Ok(Some(_)) => return bad_gateway("the registry's manifest is larger than 4 MiB"),
            Err(e) => return bad_gateway(&crate::origin::http::describe(&e)),
        }
    }
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
    if by_digest && digest != reference {
        tracing::warn!(%name, %reference, got = %digest, "the registry sent a manifest that does not match its digest");
        return bad_gateway("the registry sent a manifest that does not match its digest");
    }
    if let Some(d) = upstream_digest.filter(|d| d.starts_with("sha256:") && *d != digest) {
        tracing::warn!(%name, %reference, said = %d, got = %digest, "the registry's Docker-Content-Digest does not match its manifest");
    }
    let manifest = Manifest {
        bytes: body.into(),
        content_type,
        digest,
    };
    if !by_digest && !m.config.tag_ttl.is_zero() {
        let mut tags = lock(&m.tags);
        let bytes = |tags: &HashMap<String, (Instant, Manifest)>| -> usize {
            tags.values().map(|(_, m)| m.bytes.len()).sum()
        };
        let full = |tags: &HashMap<String, (Instant, Manifest)>| {
            tags.len() >= MAX_CACHED_TAGS
                || bytes(tags) + manifest.bytes.len() > MAX_CACHED_TAG_BYTES
        };
        if full(&tags) {
            let ttl = m.config.tag_ttl;
            tags.retain(|_, (at, _)| at.elapsed() < ttl);
            if full(&tags) {
                tags.clear();
            }
        }
        tags.insert(cache_key, (Instant::now(), manifest.clone()));
    }
    (manifest_response(&manifest, false), MirrorResult::Ok)
}

fn manifest_response(manifest: &Manifest, head: bool) -> Response {
    let body = if head {
        Body::empty()
    } else {
        Body::from(manifest.bytes.clone())
    };
    let mut out = Response::new(body);
    let h = out.headers_mut();
    h.insert(header::CONTENT_TYPE, manifest.content_type.clone());
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(manifest.bytes.len()),
    );
    if let Ok(d) = HeaderValue::try_from(manifest.digest.as_str()) {
        h.insert(DIGEST_HEADER, d);
    }
    out
}

#[cfg(test)]
mod tests;
