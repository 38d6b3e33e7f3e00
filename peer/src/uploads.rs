//! [`Uploads`]: what this peer sends to others — the upload slots, the
//! upload rate limit, which chunk went to which stream lately, and the bytes
//! sent. Owned by the serving side; membership and the status readers only
//! read its counts.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use nebula_common::{Blob, BlobId};
use tokio::time::Instant;

use crate::{Config, limit::RateLimiter};

/// The longest a rate-limited peer withholds a second copy of a chunk.
const MAX_WITHHOLD: Duration = Duration::from_secs(10);

/// Sends remembered before the old ones are swept.
const MAX_RECENT_SENDS: usize = 65_536;

/// The upload side of a node.
#[derive(Debug)]
pub(crate) struct Uploads {
    /// Upload slots of the node.
    slots: u32,
    /// Upload slots one stream may hold (at most `slots`).
    stream_slots: u32,
    /// The configured upload rate, bytes per second.
    rate: Option<u64>,
    limiter: Option<RateLimiter>,
    /// Upload slots in use (chunk requests admitted and not yet answered).
    active: AtomicU32,
    /// When each chunk was last sent, and on which stream: a rate-limited
    /// peer does not spend its upload on a second copy while the first is
    /// fresh (the receiver will pass it on).
    recent_sends: dashmap::DashMap<(BlobId, u32), (Instant, u64)>,
    /// Numbers serving streams, for `recent_sends`.
    next_stream: AtomicU64,
    uploaded: AtomicU64,
}

impl Uploads {
    /// The uploads of a node configured by `config`.
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            slots: config.upload_slots,
            stream_slots: config.stream_upload_slots.min(config.upload_slots),
            rate: config.upload_limit.filter(|&r| r > 0),
            limiter: RateLimiter::optional(config.upload_limit),
            active: AtomicU32::new(0),
            recent_sends: dashmap::DashMap::new(),
            next_stream: AtomicU64::new(1),
            uploaded: AtomicU64::new(0),
        }
    }

    /// A number for a new serving stream.
    pub(crate) fn new_stream(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes a slot unless the node's or the stream's are all in use: one
    /// stream never holds more than its share, so a receiver that stops
    /// reading cannot starve the others.
    pub(crate) fn take_slot(self: &Arc<Self>, stream: &Arc<AtomicU32>) -> Option<Slot> {
        if stream.fetch_add(1, Ordering::AcqRel) >= self.stream_slots {
            stream.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.slots {
            self.active.fetch_sub(1, Ordering::AcqRel);
            stream.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot {
            uploads: Arc::clone(self),
            stream: Arc::clone(stream),
        })
    }

    /// Whether a rate-limited peer may send `chunk` on `stream` now; records
    /// the send when it may. It declines when the chunk went to another
    /// stream lately, so that receiver can pass it on while this upload
    /// carries chunks nobody else has yet (BitTorrent's super-seeding,
    /// bounded in time). "Lately" is half the time this peer needs to send
    /// the whole blob once, at least four chunk-times and at most
    /// [`MAX_WITHHOLD`], so a chunk whose first receiver vanished is sent
    /// again soon enough. Unlimited peers always send.
    pub(crate) fn claim_send(&self, stream: u64, blob: &Blob, chunk: u32) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        if !blob.has_chunk(chunk) {
            // The read answers not-found.
            return true;
        }
        let rate = rate as f64;
        let chunk_time = blob.geometry().chunk_len(chunk) as f64 / rate;
        let whole_time = blob.outboard().size() as f64 / rate;
        let window =
            Duration::from_secs_f64((4.0 * chunk_time).max(whole_time / 2.0)).min(MAX_WITHHOLD);
        let now = Instant::now();
        if self.recent_sends.len() > MAX_RECENT_SENDS {
            self.recent_sends
                .retain(|_, (at, _)| now.duration_since(*at) < MAX_WITHHOLD);
        }
        let key = (blob.id(), chunk);
        if let Some(last) = self.recent_sends.get(&key)
            && last.1 != stream
            && now.duration_since(last.0) < window
        {
            return false;
        }
        self.recent_sends.insert(key, (now, stream));
        true
    }

    /// Waits until `bytes` more fit the upload limit.
    pub(crate) async fn pace(&self, bytes: u64) {
        if let Some(limiter) = &self.limiter {
            limiter.acquire(bytes).await;
        }
    }

    /// Counts `bytes` sent.
    pub(crate) fn sent(&self, bytes: u64) {
        self.uploaded.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Upload slots in use.
    pub(crate) fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Bytes sent since the node started.
    pub(crate) fn uploaded(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }

    /// Pretends `n` slots are in use (tests of what membership reports).
    #[cfg(test)]
    pub(crate) fn set_active(&self, n: u32) {
        self.active.store(n, Ordering::Relaxed);
    }
}

/// An upload slot, given back to the node and to its stream when the chunk
/// is served, dropped or the stream dies.
#[derive(Debug)]
pub(crate) struct Slot {
    uploads: Arc<Uploads>,
    stream: Arc<AtomicU32>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.uploads.active.fetch_sub(1, Ordering::AcqRel);
        self.stream.fetch_sub(1, Ordering::AcqRel);
    }
}
