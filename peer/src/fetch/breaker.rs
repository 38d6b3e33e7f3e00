//! The per-provider circuit breaker of one download: a provider that failed
//! waits a back-off that doubles with each failure in a row before it is
//! tried again, and comes back on trial (one request until one succeeds).

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

use super::sched::ProviderIx;
use crate::config::DiscoveryConfig;

/// When each provider of a download may be tried again.
#[derive(Debug)]
pub(crate) struct Breaker {
    /// The first back-off; doubled per failure in a row, six times at most.
    backoff: Duration,
    max_backoff: Duration,
    /// Per provider: failures in a row, and when it may be tried again.
    state: HashMap<ProviderIx, (u32, Instant)>,
}

/// What the breaker says of a provider now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not yet: it is backing off.
    Wait,
    /// Go ahead, with a full window.
    Closed,
    /// Go ahead, one request at a time: it failed last time.
    Trial,
}

impl Breaker {
    pub(crate) fn new(config: &DiscoveryConfig) -> Self {
        Self {
            backoff: config.backoff,
            max_backoff: config.max_backoff,
            state: HashMap::new(),
        }
    }

    /// Whether provider `p` may be tried at `now`.
    pub(crate) fn verdict(&self, p: ProviderIx, now: Instant) -> Verdict {
        match self.state.get(&p) {
            None => Verdict::Closed,
            Some(&(_, until)) if now < until => Verdict::Wait,
            Some(&(0, _)) => Verdict::Closed,
            Some(_) => Verdict::Trial,
        }
    }

    /// Provider `p` failed at `now`: it backs off. Returns its failures in a row.
    pub(crate) fn failed(&mut self, p: ProviderIx, now: Instant) -> u32 {
        let failures = self.state.get(&p).map_or(0, |s| s.0) + 1;
        let backoff = (self.backoff * (1 << failures.min(6))).min(self.max_backoff);
        self.state.insert(p, (failures, now + backoff));
        failures
    }

    /// Provider `p` had nothing to offer at `now`: it is asked again after
    /// one back-off, not as a failure.
    pub(crate) fn idle(&mut self, p: ProviderIx, now: Instant) {
        self.state.insert(p, (0, now + self.backoff));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(&DiscoveryConfig::default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_provider_is_tried_at_once() {
        let b = breaker();
        assert_eq!(b.verdict(0, Instant::now()), Verdict::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_doubling_up_to_the_cap() {
        let mut b = breaker();
        let mut waits = Vec::new();
        for failures in 1..=8 {
            let now = Instant::now();
            assert_eq!(b.failed(3, now), failures);
            assert_eq!(b.verdict(3, now), Verdict::Wait);
            let started = Instant::now();
            while b.verdict(3, Instant::now()) == Verdict::Wait {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            waits.push(started.elapsed().as_millis());
        }
        // 500 ms doubled per failure, capped at 30 s.
        assert_eq!(
            waits,
            [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_back_from_a_failure_is_on_trial() {
        let mut b = breaker();
        b.failed(1, Instant::now());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(b.verdict(1, Instant::now()), Verdict::Wait);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.verdict(1, Instant::now()), Verdict::Trial);
        // Other providers are unaffected.
        assert_eq!(b.verdict(2, Instant::now()), Verdict::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_provider_waits_one_backoff_and_is_not_on_trial() {
        let mut b = breaker();
        b.failed(1, Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        b.idle(1, Instant::now());
        assert_eq!(b.verdict(1, Instant::now()), Verdict::Wait);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(b.verdict(1, Instant::now()), Verdict::Closed);
        // Its failures in a row start over.
        assert_eq!(b.failed(1, Instant::now()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_comes_from_the_config() {
        let config = DiscoveryConfig {
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(30),
            ..DiscoveryConfig::default()
        };
        let mut b = Breaker::new(&config);
        let now = Instant::now();
        b.failed(0, now);
        assert_eq!(b.verdict(0, now + Duration::from_millis(19)), Verdict::Wait);
        assert_eq!(
            b.verdict(0, now + Duration::from_millis(20)),
            Verdict::Trial
        );
        b.failed(0, now);
        b.failed(0, now);
        assert_eq!(
            b.verdict(0, now + Duration::from_millis(30)),
            Verdict::Trial
        );
    }
}
