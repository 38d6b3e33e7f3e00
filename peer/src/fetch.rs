//! The multi-source downloader: one blob from up to K providers at once.
//!
//! A fetch resolves the blob through the control plane, takes a verified
//! outboard from the first provider that has a good one, then runs one worker
//! per provider. Workers pull chunks from the shared [`Scheduler`] (rarest
//! first), keep a bandwidth-delay window of requests in flight, verify every
//! chunk before it is stored, and give their requests back the moment their
//! provider fails, stalls, answers busy or lies. The coordinator re-asks the
//! control plane as providers come and go, with a per-provider back-off that
//! acts as a circuit breaker (a provider back from back-off gets one trial
//! request before a full window).
//!
//! # Layout
//!
//! - `coordinator`: one download's providers, workers and progress.
//! - `worker`: one provider's window of requests.
//! - `breaker`: when a provider that failed is tried again.
//! - `discovery`: providers from the control plane, and the outboard.
//! - `sched`: which chunk to ask of whom (rarest first, endgame).

mod breaker;
mod coordinator;
mod discovery;
mod sched;
mod worker;

pub(crate) use coordinator::download;
pub(crate) use discovery::discover;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nebula_common::{Blob, BlobId, BlobRef, Store, StoreError};
use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    Config,
    control::ControlClient,
    events::Events,
    exchange::dial::{ConnectError, Connection, Dialer},
    limit::RateLimiter,
    metrics::{FetchResult, Metrics},
    tasks::Tasks,
};

/// Why a fetch failed. Verified chunks stay in the store for a later resume.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No provider could be found or reached in time.
    #[error("no providers for blob {blob} after {waited:?}{shortfall}")]
    NoProviders {
        /// What was asked for.
        blob: BlobRef,
        /// How long the fetch waited.
        waited: Duration,
        /// What is known of the missing data.
        shortfall: Shortfall,
    },
    /// The control plane could not answer (and no provider was known yet).
    #[error("control plane: {}", .0.message())]
    Control(tonic::Status),
    /// The control plane did not answer within its deadline.
    #[error("control plane: timed out")]
    ControlTimedOut,
    /// The control plane answered with a blob id that does not parse.
    #[error("control plane answered a malformed blob id {answered:?}")]
    MalformedId {
        /// What it answered.
        answered: String,
    },
    /// No control plane is configured and the blob is not local.
    #[error("blob {0} is not in the store and no control plane is configured")]
    NoControlPlane(BlobRef),
    /// Every provider's outboard failed verification.
    #[error("no provider sent a valid outboard for blob {0}")]
    BadOutboard(BlobId),
    /// The control plane answered about another blob than the one asked for.
    #[error("the control plane answered about blob {answered:?} when asked for {asked}")]
    WrongBlob {
        /// What was asked for.
        asked: BlobId,
        /// The id the answer named.
        answered: String,
    },
    /// The blob a `sha256:` digest resolved to has another SHA-256: the
    /// alias was false. The blob stays in the store under its own id only.
    #[error("sha256:{digest} resolved to blob {id}, whose SHA-256 is {actual}: the alias is false")]
    DigestMismatch {
        /// The digest asked for.
        digest: nebula_common::Sha256Digest,
        /// The blob it resolved to.
        id: BlobId,
        /// That blob's real SHA-256.
        actual: nebula_common::Sha256Digest,
    },
    /// The store failed (a full disk, an I/O error).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The origin of a fetch by URL failed.
    #[error(transparent)]
    Origin(#[from] crate::origin_error::OriginError),
    /// The content at a URL is not what `--digest` names; nothing was kept.
    #[error(
        "the content at {url} is blob {got}, which does not match --digest {expected}; nothing was kept"
    )]
    ContentMismatch {
        /// The URL, without credentials or query values.
        url: String,
        /// The digest asked for.
        expected: BlobRef,
        /// The blob the content hashed to.
        got: BlobId,
    },
    /// The daemon is shutting down.
    #[error("fetch cancelled: the daemon is shutting down")]
    Cancelled,
    /// The blob was removed from the store (`nebula rm`) while it was being
    /// fetched: the fetch stops rather than write into a removed blob.
    #[error("fetch cancelled: blob {blob} was removed from the store")]
    Removed {
        /// The blob.
        blob: BlobId,
    },
}

/// What a fetch that found no provider knows of the data it lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// Nothing: no provider was found at all.
    Unknown,
    /// Providers were found, but none could be reached.
    Unreachable,
    /// Some chunks are held by no provider that can be reached.
    Unheld {
        /// Chunks no reachable provider holds.
        unheld: u32,
        /// Chunks of the blob.
        count: u32,
    },
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown => Ok(()),
            Self::Unreachable => f.write_str(" (no provider reachable)"),
            Self::Unheld { unheld, count } => write!(
                f,
                ": {unheld} of {count} chunks are held by no reachable peer; verified chunks kept for a resume"
            ),
        }
    }
}

/// Bytes of one fetch received from one provider.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceBytes {
    /// The provider's peer id.
    pub peer_id: String,
    /// Its address.
    pub address: String,
    /// Chunk bytes received from it and stored.
    pub bytes: u64,
}

/// Where a fetch stands.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The blob, once resolved.
    pub id: Option<BlobId>,
    /// Bytes held (including resumed ones).
    pub bytes_done: u64,
    /// The blob's size, once known.
    pub total: u64,
    /// Providers in use.
    pub providers: u32,
    /// Bytes per second over the last second.
    pub rate: u64,
    /// Bytes already in the store when the fetch began.
    pub resumed_bytes: u64,
    /// Finished.
    pub done: bool,
    /// Bytes per provider.
    pub sources: Vec<SourceBytes>,
    /// Bytes received from an origin (a fetch by URL).
    pub origin_bytes: u64,
    /// Something the user should be told once, sent with `done`.
    pub notice: Option<String>,
    /// An origin download under way, readable as it grows (the registry
    /// mirror streams from it); its bytes are checked only at the end.
    pub(crate) scratch: Option<Arc<crate::sessions::Session>>,
}

/// A finished fetch.
#[derive(Debug, Clone)]
pub struct FetchOutcome {
    /// The blob.
    pub blob: Arc<Blob>,
    /// Bytes already in the store when the fetch began.
    pub resumed_bytes: u64,
    /// Bytes per provider.
    pub sources: Vec<SourceBytes>,
    /// Bytes received from an origin (a fetch by URL).
    pub origin_bytes: u64,
    /// Something the user should be told once (e.g. the control plane was
    /// down and the origin was asked directly).
    pub notice: Option<String>,
}

/// The downloading side of a node: the swarm downloads of blobs, which the
/// fetches by URL build on. It owns the
/// dialer, the download rate limit and buffer, and the count of bytes
/// received; the rest it is handed by [`Downloads::new`].
#[derive(Debug)]
pub(crate) struct Downloads {
    config: Arc<Config>,
    store: Arc<Store>,
    /// This peer's id: never a provider of its own downloads.
    peer_id: String,
    /// Where providers are discovered; `None` without a control plane.
    control: Option<ControlClient>,
    /// The exchange streams to other peers.
    dialer: Dialer,
    limiter: Option<RateLimiter>,
    /// Bytes of [`Config::download_buffer`] not held by a chunk request in
    /// flight.
    buffer: Arc<Semaphore>,
    /// Verified bytes received from other peers.
    downloaded: AtomicU64,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    /// Cancelled when the node stops: every download ends.
    shutdown: CancellationToken,
    tasks: Tasks,
}

impl Downloads {
    /// The downloading side, from the handles it works with. Each argument is
    /// a separate part of the node, named here rather than bundled.
    #[expect(
        clippy::too_many_arguments,
        reason = "each argument is a part the composition root hands over"
    )]
    pub(crate) fn new(
        config: Arc<Config>,
        store: Arc<Store>,
        control: Option<ControlClient>,
        dialer: Dialer,
        events: Arc<Events>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tasks: Tasks,
    ) -> Self {
        // Validated: at least 1 MiB; capped at what a semaphore can count.
        let buffer = Arc::new(Semaphore::new(
            usize::try_from(config.download_buffer)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS),
        ));
        Self {
            peer_id: store.peer_id().to_owned(),
            limiter: RateLimiter::optional(config.download_limit),
            buffer,
            downloaded: AtomicU64::new(0),
            config,
            store,
            control,
            dialer,
            events,
            metrics,
            shutdown,
            tasks,
        }
    }

    /// The exchange stream to a peer, dialed if needed.
    pub(crate) async fn connect(&self, addr: &str) -> Result<Arc<Connection>, ConnectError> {
        self.dialer.connect(addr).await
    }

    /// Verified bytes received from other peers so far.
    pub(crate) fn downloaded(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }

    /// Counts `bytes` more verified bytes received from another peer.
    pub(crate) fn count_downloaded(&self, bytes: u64) {
        self.downloaded.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn peer_id(&self) -> &str {
        &self.peer_id
    }

    pub(crate) fn control(&self) -> &Option<ControlClient> {
        &self.control
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub(crate) fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// After a blob completes: tell membership, and compute its SHA-256 (for
    /// the `sha256:` alias) in the background, then tell it again.
    pub(crate) fn completed(&self, blob: &Arc<Blob>) {
        self.events.inventory_changed();
        if blob.sha256().is_some() {
            return;
        }
        let blob = Arc::clone(blob);
        let events = Arc::clone(&self.events);
        self.tasks.spawn(async move {
            match tokio::task::spawn_blocking(move || blob.compute_sha256()).await {
                Ok(Ok(_)) => events.inventory_changed(),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot compute the SHA-256 of a fetched blob")
                }
                Err(_) => {}
            }
        });
    }
}

/// Fetches `blob` into the store, reporting progress as it goes, in a
/// `fetch` span naming the blob; counted in the daemon's metrics.
pub(crate) async fn fetch(
    downloads: Arc<Downloads>,
    blob_ref: BlobRef,
    progress: watch::Sender<Progress>,
    no_provider_timeout: Duration,
) -> Result<FetchOutcome, FetchError> {
    let span = tracing::info_span!("fetch", blob = %blob_ref);
    let metrics = Arc::clone(downloads.metrics());
    observed(
        &metrics,
        span,
        download(downloads, blob_ref, progress, no_provider_timeout),
    )
    .await
}

/// Runs one fetch in `span`: counted by result and duration, logged when it fails.
pub(crate) async fn observed(
    metrics: &crate::metrics::Metrics,
    span: tracing::Span,
    fetch: impl Future<Output = Result<FetchOutcome, FetchError>>,
) -> Result<FetchOutcome, FetchError> {
    let started = Instant::now();
    let result = fetch.instrument(span.clone()).await;
    let kind = match &result {
        Ok(_) => FetchResult::Ok,
        Err(FetchError::NoProviders { .. } | FetchError::NoControlPlane(_)) => {
            FetchResult::NoProviders
        }
        Err(
            FetchError::BadOutboard(_)
            | FetchError::WrongBlob { .. }
            | FetchError::DigestMismatch { .. }
            | FetchError::ContentMismatch { .. },
        ) => FetchResult::Integrity,
        Err(
            FetchError::Control(_) | FetchError::ControlTimedOut | FetchError::MalformedId { .. },
        ) => FetchResult::Control,
        Err(FetchError::Store(_)) => FetchResult::Store,
        Err(FetchError::Origin(_)) => FetchResult::Origin,
        Err(FetchError::Cancelled | FetchError::Removed { .. }) => FetchResult::Cancelled,
    };
    metrics.fetch_ended(kind, started.elapsed());
    if let Err(e) = &result {
        span.in_scope(|| tracing::warn!(error = %e, "fetch failed"));
    }
    result
}
