//! Writing an origin's answers into the scratch file: one body streamed to
//! its offset, and the range requests after the first, each resumed where it
//! broke.

use std::{
    fs::File,
    os::unix::fs::FileExt,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use url::Url;

use super::{
    Counters, MAX_SIZE, OriginClient, OriginError, Target, Validators, WRITE_BUFFER, content_range,
    describe, redacted, status_line, validators_of,
};

/// The range requests after the first, run `connections` at once.
pub(super) struct Piece<'a> {
    pub(super) client: &'a OriginClient,
    pub(super) target: &'a Target,
    pub(super) url: &'a Url,
    pub(super) validators: &'a Validators,
    pub(super) file: &'a Arc<File>,
    pub(super) counters: &'a Counters,
}

impl Piece<'_> {
    pub(super) async fn run_all(
        &self,
        pieces: Vec<(u64, u64)>,
        connections: usize,
    ) -> Result<(), OriginError> {
        let queue = Mutex::new(pieces.into_iter());
        let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).next();
        let workers = (0..connections).map(|_| async {
            while let Some((start, end)) = next() {
                self.fetch(start, end).await?;
            }
            Ok::<(), OriginError>(())
        });
        futures::future::try_join_all(workers).await?;
        Ok(())
    }

    /// Fetches bytes `start..=end`, resuming where a broken answer stopped.
    async fn fetch(&self, start: u64, end: u64) -> Result<(), OriginError> {
        let mut at = start;
        let mut last = None;
        for attempt in 0..self.client.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            let shown = redacted(self.url);
            // From where the first request ended up, with the user's headers
            // only while that is still the origin they named.
            let resp = match self
                .client
                .get(self.target, self.url, Some((at, Some(end))), None)
                .await
            {
                Ok((_, r)) => r,
                Err(e @ OriginError::Transport { .. }) => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match resp.status() {
                StatusCode::PARTIAL_CONTENT => {}
                s if s.is_server_error() => {
                    last = Some(OriginError::Status {
                        status: status_line(s),
                        url: shown,
                    });
                    continue;
                }
                // A full answer to a range request, or another version.
                StatusCode::OK | StatusCode::PRECONDITION_FAILED => {
                    return Err(OriginError::Changed { url: shown });
                }
                s => {
                    return Err(OriginError::Status {
                        status: status_line(s),
                        url: shown,
                    });
                }
            }
            let same = validators_of(resp.headers());
            let range = content_range(resp.headers());
            if same.etag != self.validators.etag
                || same.last_modified != self.validators.last_modified
                || range.map(|r| r.2) != Some(self.validators.size)
            {
                return Err(OriginError::Changed { url: shown });
            }
            if range.map(|r| r.0) != Some(at) {
                return Err(OriginError::Transport {
                    url: shown,
                    reason: format!("asked for bytes from {at}, got another range"),
                });
            }
            match stream_into(resp, self.file, at, Some(end + 1), self.counters).await {
                Ok(reached) if reached == end + 1 => return Ok(()),
                Ok(reached) => {
                    at = reached;
                    last = Some(OriginError::Transport {
                        url: shown,
                        reason: "the answer ended early".into(),
                    });
                }
                Err((reached, e)) => {
                    let e = e.at(&shown);
                    tracing::debug!(error = %e, at = reached, "origin piece broke; resuming");
                    at = reached;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| OriginError::Transport {
            url: redacted(self.url),
            reason: "no answer".into(),
        }))
    }
}

/// A failure while streaming a body, before the URL is attached.
#[derive(Debug)]
pub(super) enum BodyError {
    Transport(String),
    TooLong,
    Io(String),
}

impl BodyError {
    pub(super) fn at(self, url: &str) -> OriginError {
        match self {
            Self::Transport(reason) => OriginError::Transport {
                url: url.to_owned(),
                reason,
            },
            Self::TooLong => OriginError::Transport {
                url: url.to_owned(),
                reason: "the answer is longer than announced".into(),
            },
            Self::Io(e) => OriginError::Io(e),
        }
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transport(r) | Self::Io(r) => f.write_str(r),
            Self::TooLong => f.write_str("the answer is longer than announced"),
        }
    }
}

/// Writes `resp`'s body to `file` from `offset`, up to `end` (exclusive) when
/// known; answers the offset reached, or it and the failure.
pub(super) async fn stream_into(
    mut resp: reqwest::Response,
    file: &Arc<File>,
    offset: u64,
    end: Option<u64>,
    counters: &Counters,
) -> Result<u64, (u64, BodyError)> {
    let mut at = offset;
    let mut buf = BytesMut::with_capacity(WRITE_BUFFER);
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                let reached = flush(file, &mut buf, at, counters)
                    .await
                    .map_err(|e| (at, e))?;
                return Err((reached, BodyError::Transport(describe(&e))));
            }
        };
        counters
            .received
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if at + (buf.len() + chunk.len()) as u64 > end.unwrap_or(MAX_SIZE) {
            return Err((at, BodyError::TooLong));
        }
        buf.extend_from_slice(&chunk);
        if buf.len() >= WRITE_BUFFER {
            at = flush(file, &mut buf, at, counters)
                .await
                .map_err(|e| (at, e))?;
        }
    }
    flush(file, &mut buf, at, counters)
        .await
        .map_err(|e| (at, e))
}

/// Writes `buf` at `at`; answers the new offset.
async fn flush(
    file: &Arc<File>,
    buf: &mut BytesMut,
    at: u64,
    counters: &Counters,
) -> Result<u64, BodyError> {
    if buf.is_empty() {
        return Ok(at);
    }
    let data: Bytes = buf.split().freeze();
    let len = data.len() as u64;
    let file = Arc::clone(file);
    let session = counters.session.clone();
    let guard = Arc::clone(&counters.epoch);
    let epoch = *guard.read().unwrap_or_else(|e| e.into_inner());
    tokio::task::spawn_blocking(move || {
        let now = guard.read().unwrap_or_else(|e| e.into_inner());
        if *now != epoch {
            // The download started over meanwhile: these bytes are stale.
            return Ok(());
        }
        file.write_all_at(&data, at)?;
        nebula_common::store::start_writeback(&file, at, len);
        if let Some(s) = session {
            s.wrote(at, len);
        }
        drop(now);
        Ok::<(), std::io::Error>(())
    })
    .await
    .map_err(|_| BodyError::Io("the writing task failed".into()))?
    .map_err(|e| BodyError::Io(e.to_string()))?;
    counters.written.fetch_add(len, Ordering::Relaxed);
    Ok(at + len)
}
