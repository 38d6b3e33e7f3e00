//! The one way into the downloader: [`Fetcher`] sends a fetch of a blob to
//! the swarm ([`crate::fetch`]) and a fetch by URL to its origin
//! ([`crate::origin`]). It sits above both so that neither knows the other
//! through it: `origin` builds on `fetch`, and `fetch` knows nothing of
//! origins.

use std::{sync::Arc, time::Duration};

use nebula_common::{Blob, BlobRef};
use tokio::sync::{oneshot, watch};

use crate::{
    fetch::{Downloads, FetchError, FetchOutcome, Progress, fetch},
    origin::Origins,
};

/// What to fetch.
#[derive(Debug, Clone)]
pub enum Wanted {
    /// A blob by BLAKE3 id or `sha256:` digest, from the swarm.
    Blob(BlobRef),
    /// A URL, through the swarm when the fleet has it (see [`crate::origin`]).
    Url(Box<crate::UrlFetch>),
}

impl Wanted {
    /// Fetches with the same key are the same fetch.
    pub(crate) fn key(&self) -> String {
        match self {
            Self::Blob(b) => b.to_string(),
            Self::Url(u) => format!(
                "{} {}",
                u.key(),
                u.digest.map(|d| d.to_string()).unwrap_or_default()
            ),
        }
    }
}

/// The one way into the downloader, for the local API, the registry mirror,
/// the one-shot CLI fetch and tests: every fetch goes through [`Fetcher::run`],
/// which also tells the rest of the node when a blob completes.
#[derive(Debug, Clone)]
pub struct Fetcher {
    downloads: Arc<Downloads>,
    origins: Arc<Origins>,
}

impl Fetcher {
    /// Fetches blobs through `downloads` and URLs through `origins`.
    pub(crate) fn new(downloads: Arc<Downloads>, origins: Arc<Origins>) -> Self {
        Self { downloads, origins }
    }

    /// Verified bytes received from other peers so far.
    pub(crate) fn downloaded(&self) -> u64 {
        self.downloads.downloaded()
    }

    /// Tells the node a blob completed outside a fetch (an import).
    pub(crate) fn completed(&self, blob: &Arc<Blob>) {
        self.downloads.completed(blob);
    }

    /// Starts fetching `what` in the background, among the node's tasks; it
    /// runs to its end even if the handle is dropped. `no_provider_timeout`
    /// overrides [`crate::Config::no_provider_timeout`].
    pub fn start(&self, what: Wanted, no_provider_timeout: Option<Duration>) -> FetchHandle {
        let (progress_tx, progress) = watch::channel(Progress::default());
        let (result_tx, result) = oneshot::channel();
        let fetcher = self.clone();
        self.downloads.tasks().spawn(async move {
            let outcome = fetcher.run(what, progress_tx, no_provider_timeout).await;
            // A handle dropped meanwhile no longer wants the outcome.
            let _ = result_tx.send(outcome);
        });
        FetchHandle { progress, result }
    }

    /// Fetches `what` in the calling task, reporting to `progress`.
    pub(crate) async fn run(
        &self,
        what: Wanted,
        progress: watch::Sender<Progress>,
        no_provider_timeout: Option<Duration>,
    ) -> Result<FetchOutcome, FetchError> {
        let downloads = Arc::clone(&self.downloads);
        let outcome = match what {
            Wanted::Blob(blob) => {
                let timeout = no_provider_timeout.unwrap_or(downloads.config().no_provider_timeout);
                fetch(downloads, blob, progress, timeout).await
            }
            Wanted::Url(request) => {
                Arc::clone(&self.origins)
                    .fetch_url(*request, progress)
                    .await
            }
        }?;
        self.downloads.completed(&outcome.blob);
        Ok(outcome)
    }
}

/// A fetch under way (see [`Fetcher::start`]).
#[derive(Debug)]
pub struct FetchHandle {
    progress: watch::Receiver<Progress>,
    result: oneshot::Receiver<Result<FetchOutcome, FetchError>>,
}

impl FetchHandle {
    /// Where the fetch stands, as it changes; closed when it ends.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Waits for the fetch to end.
    pub async fn result(self) -> Result<FetchOutcome, FetchError> {
        // The task ends without sending only when the node dropped it at shutdown.
        self.result.await.unwrap_or(Err(FetchError::Cancelled))
    }
}
