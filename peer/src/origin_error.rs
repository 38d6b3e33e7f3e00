//! [`OriginError`]: why a download from an HTTP origin failed. A leaf
//! module, so that the fetch's errors can carry it while fetches by URL
//! (`origin`) build on the fetch and not the other way round.

/// Why an origin download failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    /// The origin answered with an error status.
    #[error("origin answered {status} for {url}")]
    Status {
        /// Code and reason, e.g. `404 Not Found`.
        status: String,
        /// The URL, without credentials or query values.
        url: String,
    },
    /// The origin could not be reached, or stopped answering.
    #[error("origin {url}: {reason}")]
    Transport {
        /// The URL, without credentials or query values.
        url: String,
        /// What went wrong, e.g. `timed out`.
        reason: String,
    },
    /// More than [`MAX_REDIRECTS`](crate::origin::http::MAX_REDIRECTS) redirects, or one without a usable `Location`.
    #[error("origin {url}: {reason}")]
    Redirect {
        /// The URL, without credentials or query values.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The content changed during the download, and again after starting over.
    #[error(
        "the content at {url} changed during the download (its ETag or Last-Modified differs between ranges); try again"
    )]
    Changed {
        /// The URL, without credentials or query values.
        url: String,
    },
    /// The scratch file could not be written.
    #[error("writing the download: {0}")]
    Io(String),
}
