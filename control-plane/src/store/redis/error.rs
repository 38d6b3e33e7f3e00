//! The errors of the Redis store, and how they reach callers.

use std::{error::Error as StdError, sync::Arc, time::Duration};

use redis::RedisError;

use crate::store::StoreError;

/// What went wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// The client or the server reported an error.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// No answer within the operation deadline.
    #[error("Redis did not answer within {timeout:?}")]
    Timeout {
        /// The deadline.
        timeout: Duration,
    },
    /// No sentinel named the primary.
    #[error("Sentinel: {reason}")]
    NoPrimary {
        /// What each sentinel answered.
        reason: String,
    },
    /// An answer of an unexpected shape (another program writing our keys?).
    #[error("unexpected reply from Redis to {op}")]
    Reply {
        /// The operation.
        op: &'static str,
    },
    /// Redis answered, and the answer is a refusal (an inventory cap).
    #[error(transparent)]
    Refused(#[from] StoreError),
}

/// Why Redis, reached at start-up, can never serve as configured.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// The TLS handshake failed: Redis's certificate is not signed by a
    /// trusted CA or not for this host, or Redis refused ours.
    #[error("TLS to Redis at {url} failed: {reason}")]
    Tls {
        /// Where (password redacted).
        url: String,
        /// What rustls said.
        reason: String,
    },
    /// Redis refused the URL's user name or password.
    #[error("Redis at {url} refused the credentials: {reason}")]
    Credentials {
        /// Where (password redacted).
        url: String,
        /// What Redis said.
        reason: String,
    },
}

/// The TLS error behind `err`, if a failed handshake is what it is. The
/// redis crate keeps it as an `io::Error` inside an `Arc`.
pub(super) fn tls_failure(err: &RedisError) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    // Bounded: error chains are short, and this stops after 16 links.
    for _ in 0..16 {
        let e = next?;
        let inner: &(dyn StdError + 'static) =
            match e.downcast_ref::<Arc<dyn StdError + Send + Sync>>() {
                Some(shared) => &**shared,
                None => e,
            };
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = inner
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = e.source();
    }
    None
}

impl From<RedisStoreError> for StoreError {
    fn from(err: RedisStoreError) -> Self {
        if let RedisStoreError::Refused(refusal) = err {
            return refusal;
        }
        StoreError::Unavailable {
            source: Box::new(err) as Box<dyn StdError + Send + Sync>,
        }
    }
}

pub(super) type R<T> = Result<T, RedisStoreError>;
