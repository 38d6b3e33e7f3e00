//! The control plane's Prometheus metrics, and [`RpcMetricsLayer`], the
//! tower layer that counts and times every gRPC call.
//!
//! Labels come from fixed lists: the method label is one of the services'
//! own method names (anything else is `other`), the code one of gRPC's 17.
//! Peer and blob counts are read from the state store when scraped, so
//! replicas sharing one store report the same fleet.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use axum::http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use nebula_proto::v1::PeerState;

use crate::store::{PeerSnapshot, StoreStats};

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// The methods of the services this server hosts, by gRPC path.
const METHODS: &[&str] = &[
    "/nebula.v1.ControlPlane/Register",
    "/nebula.v1.ControlPlane/Heartbeat",
    "/nebula.v1.ControlPlane/Announce",
    "/nebula.v1.ControlPlane/FindProviders",
    "/nebula.v1.ControlPlane/ReportPeer",
    "/nebula.v1.ControlPlane/Deregister",
    "/nebula.v1.Admin/ListPeers",
    "/nebula.v1.Admin/GetSwarm",
    "/nebula.v1.Admin/DrainPeer",
    "/nebula.v1.Admin/BanPeer",
    "/nebula.v1.Admin/UnbanPeer",
    "/nebula.v1.Admin/Stats",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

/// gRPC status codes by number, as label values.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The method label of a request path: `Service/Method` for ours, else `other`.
fn method_label(path: &str) -> &'static str {
    METHODS.iter().find(|m| **m == path).map_or("other", |m| {
        // "/pkg.Service/Method" -> "Service/Method"
        let service_start = m
            .rfind('/')
            .map_or(0, |slash| m[..slash].rfind('.').map_or(1, |dot| dot + 1));
        &m[service_start..]
    })
}

/// The code label of a `grpc-status` value.
fn code_label(headers: &HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(
        value
            .parse::<usize>()
            .ok()
            .and_then(|n| CODES.get(n).copied())
            .unwrap_or("UNKNOWN"),
    )
}

/// Every metric the control plane exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpcs: Family<Labels2, Counter>,
    rpc_duration: Family<Labels1, Histogram>,
    lease_expiries: Counter,
    probe_failures: Counter,
    reports: Counter,
    reports_refused: Counter,
    quarantines: Counter,
    peers: Family<Labels1, Gauge>,
    blobs: Gauge,
    provider_entries: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nebula_control");
        let rpcs = Family::<Labels2, Counter>::default();
        registry.register(
            "rpcs",
            "gRPC calls answered, by method and status code",
            rpcs.clone(),
        );
        let rpc_duration = Family::<Labels1, Histogram>::new_with_constructor(|| {
            // 0.1 ms .. ~3.3 s, doubling.
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        registry.register_with_unit(
            "rpc_duration",
            "Time to answer a gRPC call, by method",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let lease_expiries = Counter::default();
        registry.register(
            "lease_expiries",
            "Peers removed because their lease lapsed",
            lease_expiries.clone(),
        );
        let probe_failures = Counter::default();
        registry.register(
            "probe_failures",
            "Active health probes that failed or timed out",
            probe_failures.clone(),
        );
        let reports = Counter::default();
        registry.register(
            "reports",
            "Reports of providers that sent bad data",
            reports.clone(),
        );
        let reports_refused = Counter::default();
        registry.register(
            "reports_refused",
            "Reports not counted: the reporter was not sent to the provider by discovery",
            reports_refused.clone(),
        );
        let quarantines = Counter::default();
        registry.register(
            "quarantines",
            "Providers quarantined after reports from distinct peers",
            quarantines.clone(),
        );
        let peers = Family::<Labels1, Gauge>::default();
        registry.register(
            "peers",
            "Registered peers with a live lease, by state (healthy, unhealthy, draining, banned, quarantined)",
            peers.clone(),
        );
        let blobs = Gauge::default();
        registry.register("blobs", "Blobs with at least one provider", blobs.clone());
        let provider_entries = Gauge::default();
        registry.register(
            "provider_entries",
            "(blob, provider) pairs held",
            provider_entries.clone(),
        );
        Self {
            registry,
            rpcs,
            rpc_duration,
            lease_expiries,
            probe_failures,
            reports,
            reports_refused,
            quarantines,
            peers,
            blobs,
            provider_entries,
        }
    }
}

/// The state label of a peer: the state the admin API shows, in lower case.
pub fn peer_state(peer: &PeerSnapshot) -> &'static str {
    match crate::admin::peer_state(peer) {
        PeerState::Banned => "banned",
        PeerState::Quarantined => "quarantined",
        PeerState::Draining => "draining",
        PeerState::Unhealthy => "unhealthy",
        PeerState::Healthy | PeerState::Unspecified => "healthy",
    }
}

const PEER_STATES: [&str; 5] = ["healthy", "unhealthy", "draining", "banned", "quarantined"];

impl Metrics {
    /// `n` leases lapsed.
    pub fn leases_expired(&self, n: usize) {
        self.lease_expiries.inc_by(n as u64);
    }

    /// A health probe failed.
    pub fn probe_failed(&self) {
        self.probe_failures.inc();
    }

    /// A report was recorded; `quarantined` when it tipped the provider over.
    pub fn reported(&self, quarantined: bool) {
        self.reports.inc();
        if quarantined {
            self.quarantines.inc();
        }
    }

    /// A report was refused (see [`crate::Registry::admit_report`]).
    pub fn report_refused(&self) {
        self.reports_refused.inc();
    }

    /// The text exposition, with the fleet gauges set from `peers` and `stats`.
    pub fn render(&self, peers: &[PeerSnapshot], stats: &StoreStats) -> String {
        let mut counts = [0i64; PEER_STATES.len()];
        for p in peers {
            let state = peer_state(p);
            if let Some(i) = PEER_STATES.iter().position(|s| *s == state) {
                counts[i] += 1;
            }
        }
        for (state, n) in PEER_STATES.into_iter().zip(counts) {
            self.peers.get_or_create(&[("state", state)]).set(n);
        }
        self.blobs
            .set(i64::try_from(stats.blobs).unwrap_or(i64::MAX));
        self.provider_entries
            .set(i64::try_from(stats.provider_entries).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    fn record(&self, method: &'static str, code: &'static str, started: Instant) {
        self.rpcs
            .get_or_create(&[("method", method), ("code", code)])
            .inc();
        self.rpc_duration
            .get_or_create(&[("method", method)])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Counts and times every gRPC call of the server it wraps.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            metrics: Arc::clone(&self.0),
        }
    }
}

/// The service [`RpcMetricsLayer`] builds.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for RpcMetrics<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = Response<Recorded<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let method = method_label(req.uri().path());
        let started = Instant::now();
        let metrics = Arc::clone(&self.metrics);
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            let mut pending = Some(Pending {
                metrics,
                method,
                started,
            });
            // A trailers-only answer (every error) carries its status here.
            if let Some(code) = code_label(response.headers())
                && let Some(p) = pending.take()
            {
                p.finish(code);
            }
            Ok(response.map(|inner| Recorded { inner, pending }))
        })
    }
}

/// A call whose status is not known yet.
#[derive(Debug)]
struct Pending {
    metrics: Arc<Metrics>,
    method: &'static str,
    started: Instant,
}

impl Pending {
    fn finish(self, code: &'static str) {
        self.metrics.record(self.method, code, self.started);
    }
}

/// A response body that records its call's status from the trailers; a body
/// dropped before them (the client went away) counts as `CANCELLED`.
#[derive(Debug)]
pub struct Recorded<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish("CANCELLED");
        }
    }
}

impl<B: Body + Unpin> Body for Recorded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(code_label)
                    && let Some(p) = self.pending.take()
                {
                    p.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = self.pending.take() {
                    p.finish("INTERNAL");
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = self.pending.take() {
                    p.finish("UNKNOWN");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            method_label("/nebula.v1.ControlPlane/FindProviders"),
            "ControlPlane/FindProviders"
        );
        assert_eq!(method_label("/nebula.v1.Admin/Stats"), "Admin/Stats");
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "Health/Check");
        assert_eq!(method_label("/nebula.v1.ControlPlane/Made-Up"), "other");
        assert_eq!(method_label("/x"), "other");
    }

    #[test]
    fn codes_from_grpc_status() {
        let mut h = HeaderMap::new();
        assert_eq!(code_label(&h), None);
        h.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(code_label(&h), Some("NOT_FOUND"));
        h.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(code_label(&h), Some("UNKNOWN"));
    }

    #[test]
    fn render_names_units_and_states() {
        let m = Metrics::default();
        m.reported(true);
        m.leases_expired(2);
        m.record("ControlPlane/Register", "OK", Instant::now());
        let text = m.render(&[], &StoreStats::default());
        for needle in [
            "nebula_control_reports_total 1",
            "nebula_control_quarantines_total 1",
            "nebula_control_lease_expiries_total 2",
            "nebula_control_peers{state=\"healthy\"} 0",
            "nebula_control_rpcs_total{method=\"ControlPlane/Register\",code=\"OK\"} 1",
            "nebula_control_rpc_duration_seconds_count{method=\"ControlPlane/Register\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
