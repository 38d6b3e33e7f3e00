//! [`RegistryError`], what a control-plane operation can fail with, and its one
//! mapping to gRPC status codes (shared by the `ControlPlane` and `Admin` services).

use nebula_common::{ParseIdError, Sha256Digest};
use tonic::{Code, Status};

use crate::store::{PeerId, PeerIdError, StoreError};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A peer id field is malformed.
    #[error("{field}: {source}")]
    PeerId {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        source: PeerIdError,
    },
    /// A blob id or digest field is malformed.
    #[error("{field}: {source}")]
    BlobId {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        source: ParseIdError,
    },
    /// The advertised address cannot be dialed.
    #[error("address {address:?}: {reason}")]
    Address {
        /// What the peer sent (shortened when long).
        address: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Another field is out of bounds.
    #[error("{field}: {reason}")]
    Field {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// One announce carries more blobs than the control plane accepts.
    #[error("announce carries {count} blobs, more than the limit of {max}; split it into batches")]
    AnnounceTooLarge {
        /// Blobs added plus removed.
        count: usize,
        /// The configured limit.
        max: usize,
    },
    /// A peer reported itself.
    #[error("a peer cannot report itself")]
    SelfReport,
    /// The peer is not registered (never was, deregistered, or its lease lapsed).
    #[error("peer {id} is not registered")]
    UnknownPeer {
        /// The peer.
        id: PeerId,
    },
    /// No blob was announced with this SHA-256.
    #[error("no blob is known by sha256:{digest}")]
    UnknownAlias {
        /// The digest asked for.
        digest: Sha256Digest,
    },
    /// An origin URL cannot be used.
    #[error("url: {0}")]
    Url(#[from] crate::urls::UrlError),
    /// The caller may not do this as the peer it is (or is not).
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RegistryError> for Status {
    fn from(err: RegistryError) -> Self {
        let code = match &err {
            RegistryError::Identity(err) => return err.clone().into(),
            RegistryError::PeerId { .. }
            | RegistryError::BlobId { .. }
            | RegistryError::Address { .. }
            | RegistryError::Field { .. }
            | RegistryError::AnnounceTooLarge { .. }
            | RegistryError::SelfReport
            | RegistryError::Url(_) => Code::InvalidArgument,
            RegistryError::UnknownPeer { .. } | RegistryError::UnknownAlias { .. } => {
                Code::NotFound
            }
            RegistryError::Store(StoreError::Full(_) | StoreError::Cap { .. }) => {
                Code::ResourceExhausted
            }
            RegistryError::Store(StoreError::Unavailable { .. }) => Code::Unavailable,
        };
        if code == Code::Unavailable {
            // The store logs the start and the end of an outage once each.
            tracing::debug!(error = %err, "state store failed");
        }
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let id: PeerId = "p".parse().unwrap();
        assert_eq!(
            Status::from(RegistryError::UnknownPeer { id }).code(),
            Code::NotFound
        );
        assert_eq!(
            Status::from(RegistryError::SelfReport).code(),
            Code::InvalidArgument
        );
        let s = Status::from(RegistryError::AnnounceTooLarge { count: 9, max: 1 });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("batches"));
    }
}
