//! A token bucket for byte rates (`--upload-limit`, `--download-limit`).

use std::time::Duration;

use tokio::{sync::Mutex, time::Instant};

/// Limits a byte rate shared by every stream of a daemon.
///
/// Callers take tokens for a payload before sending it; the bucket may go into
/// debt by one payload (a 1 MiB piece may exceed the burst), and the caller
/// then sleeps until the debt is repaid. The mutex is held while sleeping, so
/// waiters are served in arrival order and the rate holds across streams.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` with a burst of 50 ms worth of bytes
    /// (at least 64 KiB), starting full.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate * 0.05).max(64.0 * 1024.0);
        Self {
            rate,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// An optional limiter: `None` or `Some(0)` means unlimited.
    pub fn optional(bytes_per_sec: Option<u64>) -> Option<Self> {
        bytes_per_sec.filter(|&r| r > 0).map(Self::new)
    }

    /// Waits until `bytes` may pass.
    pub async fn acquire(&self, bytes: u64) {
        let mut b = self.state.lock().await;
        let now = Instant::now();
        b.tokens =
            (b.tokens + now.duration_since(b.last).as_secs_f64() * self.rate).min(self.burst);
        b.last = now;
        b.tokens -= bytes as f64;
        if b.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-b.tokens / self.rate);
            tokio::time::sleep(wait).await;
            b.tokens = 0.0;
            b.last = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_over_many_payloads() {
        let limiter = RateLimiter::new(1 << 20);
        let start = Instant::now();
        for _ in 0..10 {
            limiter.acquire(256 << 10).await;
        }
        // 2.5 MiB at 1 MiB/s, less the initial burst.
        let took = start.elapsed().as_secs_f64();
        assert!((2.3..2.6).contains(&took), "took {took}");
    }
}
