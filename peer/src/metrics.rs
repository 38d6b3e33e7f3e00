//! The daemon's Prometheus metrics, in the OpenMetrics text format (served
//! by `crate::endpoint`).
//!
//! Every label has a small fixed set of values: no blob or peer id is ever a
//! label, so a daemon that lives for months exports the same few series.
//! Figures that are states rather than events (store size, active uploads,
//! open streams) are read when scraped.

use std::time::Duration;

use nebula_common::Store;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// A label set of one `(name, value)` pair from a fixed list.
type Label = [(&'static str, &'static str); 1];

/// Where received chunk bytes came from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source {
    /// Another peer of the fleet.
    Peer,
    /// An HTTP origin or registry (back-to-source).
    Origin,
}

/// An answer that turns a chunk request away.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// Every upload slot is taken.
    Busy,
    /// The chunk was just sent to another receiver, who will pass it on.
    TryElsewhere,
}

/// How a fetch ended, for `nebula_fetches_total{result}`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FetchResult {
    /// The blob is complete.
    Ok,
    /// No provider could be found or reached in time.
    NoProviders,
    /// Every outboard failed verification, or the control plane misbehaved.
    Integrity,
    /// The control plane could not answer.
    Control,
    /// The store failed (full disk, I/O).
    Store,
    /// The origin of a fetch by URL failed.
    Origin,
    /// The daemon stopped first.
    Cancelled,
}

impl FetchResult {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NoProviders => "no_providers",
            Self::Integrity => "integrity",
            Self::Control => "control",
            Self::Store => "store",
            Self::Origin => "origin",
            Self::Cancelled => "cancelled",
        }
    }
}

/// What a registry-mirror request asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MirrorKind {
    /// `/v2/`.
    Ping,
    /// A manifest.
    Manifest,
    /// A blob.
    Blob,
}

/// How a registry-mirror request was answered.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MirrorResult {
    /// Answered (a blob answer may still abort midway: see `aborted`).
    Ok,
    /// The registry does not know it.
    NotFound,
    /// A malformed name, digest or range.
    BadRequest,
    /// The registry refused the mirror's credentials.
    Denied,
    /// The registry failed, or could not be reached.
    Upstream,
}

/// Every metric a daemon exports. Cloning a metric handle is cheap; the
/// registry keeps the other end.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    received_bytes: Family<Label, Counter>,
    served_bytes: Counter,
    chunks_verified: Counter,
    chunks_rejected: Counter,
    providers_banned: Counter,
    refusals: Family<Label, Counter>,
    fetches: Family<Label, Counter>,
    fetch_duration: Histogram,
    chunk_latency: Histogram,
    uploads_active: Gauge,
    streams: Family<Label, Gauge>,
    store_bytes: Family<Label, Gauge>,
    store_blobs: Family<Label, Gauge>,
    mirror_requests: Family<[(&'static str, &'static str); 2], Counter>,
    mirror_aborted: Counter,
    mirror_fetched: Family<Label, Counter>,
    mirror_served: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nebula");
        let received_bytes = Family::<Label, Counter>::default();
        registry.register_with_unit(
            "received",
            "Verified chunk bytes stored, by where they came from (peer, origin)",
            Unit::Bytes,
            received_bytes.clone(),
        );
        let served_bytes = Counter::default();
        registry.register_with_unit(
            "served",
            "Chunk bytes sent to other peers",
            Unit::Bytes,
            served_bytes.clone(),
        );
        let chunks_verified = Counter::default();
        registry.register(
            "chunks_verified",
            "Received chunks that passed verification and were stored",
            chunks_verified.clone(),
        );
        let chunks_rejected = Counter::default();
        registry.register(
            "chunks_rejected",
            "Received chunks that failed verification and were dropped",
            chunks_rejected.clone(),
        );
        let providers_banned = Counter::default();
        registry.register(
            "providers_banned",
            "Providers banned from a download for sending bad chunks",
            providers_banned.clone(),
        );
        let refusals = Family::<Label, Counter>::default();
        registry.register(
            "exchange_refusals",
            "Chunk requests turned away, by answer (busy, try_elsewhere)",
            refusals.clone(),
        );
        let fetches = Family::<Label, Counter>::default();
        registry.register(
            "fetches",
            "Fetches ended, by result (ok, no_providers, integrity, control, store, cancelled)",
            fetches.clone(),
        );
        // 10 ms .. ~11 min, doubling.
        let fetch_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 17),
        );
        registry.register_with_unit(
            "fetch_duration",
            "Time from the start of a fetch to its end, whatever the result",
            Unit::Seconds,
            fetch_duration.clone(),
        );
        // 0.5 ms .. ~16 s, doubling.
        let chunk_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16),
        );
        registry.register_with_unit(
            "chunk_latency",
            "Time from requesting a chunk to holding it verified",
            Unit::Seconds,
            chunk_latency.clone(),
        );
        let uploads_active = Gauge::default();
        registry.register(
            "uploads_active",
            "Upload slots in use (chunk requests admitted and not yet answered)",
            uploads_active.clone(),
        );
        let streams = Family::<Label, Gauge>::default();
        registry.register(
            "exchange_streams",
            "Open peer-exchange streams, by direction (serving, dialed)",
            streams.clone(),
        );
        let store_bytes = Family::<Label, Gauge>::default();
        registry.register_with_unit(
            "store",
            "Bytes held in the store, by blob state (complete, partial)",
            Unit::Bytes,
            store_bytes.clone(),
        );
        let store_blobs = Family::<Label, Gauge>::default();
        registry.register(
            "store_blobs",
            "Blobs in the store, by state (complete, partial)",
            store_blobs.clone(),
        );
        let mirror_requests = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "mirror_requests",
            "Registry-mirror requests, by kind (ping, manifest, blob) and result (ok, not_found, bad_request, denied, upstream)",
            mirror_requests.clone(),
        );
        let mirror_aborted = Counter::default();
        registry.register(
            "mirror_aborted",
            "Registry-mirror blob answers aborted midway (the download failed or its bytes were not the digest's)",
            mirror_aborted.clone(),
        );
        let mirror_fetched = Family::<Label, Counter>::default();
        registry.register_with_unit(
            "mirror_fetched",
            "Blob bytes the registry mirror downloaded, by source (peer, upstream)",
            Unit::Bytes,
            mirror_fetched.clone(),
        );
        let mirror_served = Counter::default();
        registry.register_with_unit(
            "mirror_served",
            "Blob bytes the registry mirror sent to its clients",
            Unit::Bytes,
            mirror_served.clone(),
        );
        for source in ["peer", "upstream"] {
            drop(mirror_fetched.get_or_create(&[("source", source)]));
        }
        // Series that exist from the start, so dashboards and rate() see zeros.
        for source in ["peer", "origin"] {
            drop(received_bytes.get_or_create(&[("source", source)]));
        }
        for answer in ["busy", "try_elsewhere"] {
            drop(refusals.get_or_create(&[("answer", answer)]));
        }
        drop(fetches.get_or_create(&[("result", FetchResult::Ok.label())]));
        Self {
            registry,
            received_bytes,
            served_bytes,
            chunks_verified,
            chunks_rejected,
            providers_banned,
            refusals,
            fetches,
            fetch_duration,
            chunk_latency,
            uploads_active,
            streams,
            store_bytes,
            store_blobs,
            mirror_requests,
            mirror_aborted,
            mirror_fetched,
            mirror_served,
        }
    }
}

impl Metrics {
    /// A verified chunk of `len` bytes was stored, `latency` after it was asked for.
    pub(crate) fn chunk_received(&self, source: Source, len: u64, latency: Duration) {
        self.received_bytes
            .get_or_create(&[("source", Self::source_label(source))])
            .inc_by(len);
        self.chunks_verified.inc();
        self.chunk_latency.observe(latency.as_secs_f64());
    }

    /// `len` body bytes came from an origin (they are verified when the
    /// download is added to the store as a whole).
    pub(crate) fn origin_received(&self, len: u64) {
        self.received_bytes
            .get_or_create(&[("source", Self::source_label(Source::Origin))])
            .inc_by(len);
    }

    fn source_label(source: Source) -> &'static str {
        match source {
            Source::Peer => "peer",
            Source::Origin => "origin",
        }
    }

    /// A received chunk failed verification.
    pub(crate) fn chunk_rejected(&self) {
        self.chunks_rejected.inc();
    }

    /// A provider was banned from a download.
    pub(crate) fn provider_banned(&self) {
        self.providers_banned.inc();
    }

    /// `len` chunk bytes were sent to a peer.
    pub(crate) fn served(&self, len: u64) {
        self.served_bytes.inc_by(len);
    }

    /// A chunk request was turned away.
    pub(crate) fn refused(&self, why: Refusal) {
        let answer = match why {
            Refusal::Busy => "busy",
            Refusal::TryElsewhere => "try_elsewhere",
        };
        self.refusals.get_or_create(&[("answer", answer)]).inc();
    }

    /// A fetch ended after `elapsed`.
    pub(crate) fn fetch_ended(&self, result: FetchResult, elapsed: Duration) {
        self.fetches
            .get_or_create(&[("result", result.label())])
            .inc();
        self.fetch_duration.observe(elapsed.as_secs_f64());
    }

    /// A registry-mirror request was answered.
    pub(crate) fn mirror_request(&self, kind: MirrorKind, result: MirrorResult) {
        let kind = match kind {
            MirrorKind::Ping => "ping",
            MirrorKind::Manifest => "manifest",
            MirrorKind::Blob => "blob",
        };
        let result = match result {
            MirrorResult::Ok => "ok",
            MirrorResult::NotFound => "not_found",
            MirrorResult::BadRequest => "bad_request",
            MirrorResult::Denied => "denied",
            MirrorResult::Upstream => "upstream",
        };
        self.mirror_requests
            .get_or_create(&[("kind", kind), ("result", result)])
            .inc();
    }

    /// A registry-mirror blob answer was aborted midway.
    pub(crate) fn mirror_aborted(&self) {
        self.mirror_aborted.inc();
    }

    /// The registry mirror downloaded a blob: `peers` bytes from the fleet,
    /// `upstream` from the registry.
    pub(crate) fn mirror_fetched(&self, peers: u64, upstream: u64) {
        self.mirror_fetched
            .get_or_create(&[("source", "peer")])
            .inc_by(peers);
        self.mirror_fetched
            .get_or_create(&[("source", "upstream")])
            .inc_by(upstream);
    }

    /// The registry mirror sent `len` blob bytes to a client.
    pub(crate) fn mirror_served(&self, len: u64) {
        self.mirror_served.inc_by(len);
    }

    /// A serving stream opened; the guard closes it.
    pub(crate) fn serving_stream(&self) -> StreamGuard {
        StreamGuard::open(&self.streams, "serving")
    }

    /// The text exposition, with the state gauges set first: the blobs of
    /// `store`, the upload slots in use (`active_uploads`) and the streams
    /// this daemon opened to others (`dialed`).
    pub(crate) fn render(
        &self,
        store: &Store,
        active_uploads: u32,
        dialed: usize,
    ) -> Result<String, std::fmt::Error> {
        self.streams
            .get_or_create(&[("direction", "dialed")])
            .set(i64::try_from(dialed).unwrap_or(i64::MAX));
        self.uploads_active.set(i64::from(active_uploads));
        let (mut bytes, mut blobs) = ([0i64; 2], [0i64; 2]);
        for info in store.list() {
            let state = usize::from(!info.complete);
            let held = if info.complete {
                info.size
            } else {
                (u64::from(info.chunks_verified) * info.chunk_size).min(info.size)
            };
            bytes[state] += i64::try_from(held).unwrap_or(i64::MAX);
            blobs[state] += 1;
        }
        for (i, state) in ["complete", "partial"].into_iter().enumerate() {
            self.store_bytes
                .get_or_create(&[("state", state)])
                .set(bytes[i]);
            self.store_blobs
                .get_or_create(&[("state", state)])
                .set(blobs[i]);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Counts one open stream in `nebula_exchange_streams` while it lives.
#[derive(Debug)]
pub(crate) struct StreamGuard(Gauge);

impl StreamGuard {
    fn open(family: &Family<Label, Gauge>, direction: &'static str) -> Self {
        let gauge = family.get_or_create(&[("direction", direction)]).clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
