//! Which chunk to ask which provider for next: rarest first (random among the
//! rarest, and fully random for the first few picks so that peers starting
//! together spread out), and endgame duplicates once every missing chunk is
//! requested. Pure bookkeeping, no I/O: the workers call it under a lock.

use std::time::Duration;

use tokio::time::Instant;

use nebula_common::ChunkSet;
use rand::Rng;

/// Index of a provider within one download.
pub(crate) type ProviderIx = usize;

/// Picks made at random before rarest-first takes over.
const RANDOM_FIRST_PICKS: u32 = 4;

/// Most providers racing for one chunk in endgame.
const MAX_COPIES: usize = 2;

/// A provider's latency figures: Peak EWMA (a slow sample counts at once, a
/// fast one pulls the average down slowly) and the best latency seen.
#[derive(Debug, Clone)]
pub(crate) struct Score {
    peak_ewma: f64,
    last: Instant,
    min_latency: f64,
    /// Bytes per second, smoothed.
    rate: f64,
}

/// How fast old latency samples fade.
const DECAY: Duration = Duration::from_secs(5);

impl Score {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            peak_ewma: 0.0,
            last: now,
            min_latency: f64::INFINITY,
            rate: 0.0,
        }
    }

    /// Records that a chunk of `bytes` took `latency` from request to last piece.
    pub(crate) fn observe(&mut self, now: Instant, latency: Duration, bytes: u64) {
        let s = latency.as_secs_f64().max(1e-6);
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        if s > self.peak_ewma {
            self.peak_ewma = s;
        } else {
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            self.peak_ewma = self.peak_ewma * w + s * (1.0 - w);
        }
        self.min_latency = self.min_latency.min(s);
        let sample_rate = bytes as f64 / s;
        self.rate = if self.rate == 0.0 {
            sample_rate
        } else {
            self.rate * 0.8 + sample_rate * 0.2
        };
    }

    /// Records a failure as a latency peak, so the provider looks slow at once.
    pub(crate) fn penalize(&mut self, now: Instant, penalty: Duration) {
        self.last = now;
        self.peak_ewma = self.peak_ewma.max(penalty.as_secs_f64());
    }

    /// Peak-EWMA latency in seconds (0 before any sample).
    pub(crate) fn latency(&self) -> f64 {
        self.peak_ewma
    }

    /// Requests to keep in flight so the link stays busy: the
    /// bandwidth-delay product in chunks plus slack, at least 2.
    pub(crate) fn window(&self, chunk_size: u64) -> usize {
        if self.rate == 0.0 || !self.min_latency.is_finite() {
            return 2;
        }
        // One spare request beyond the product: enough to keep a fast link
        // busy, few enough that a slow provider does not sit on chunks that
        // faster ones could deliver first.
        let bdp = self.rate * self.min_latency / chunk_size as f64;
        (bdp.ceil() as usize + 1).clamp(2, 16)
    }

    /// How long with no data before the provider counts as stalled: a
    /// multiple of its usual latency, within bounds.
    pub(crate) fn stall_timeout(&self, floor: Duration) -> Duration {
        if self.peak_ewma == 0.0 {
            return floor.max(Duration::from_secs(5));
        }
        Duration::from_secs_f64((self.peak_ewma * 8.0).clamp(floor.as_secs_f64(), 30.0))
    }
}

#[derive(Debug)]
struct Provider {
    /// Chunks it holds, as far as we know.
    has: ChunkSet,
    /// It takes part: not banned, not gone.
    active: bool,
}

/// The chunk bookkeeping of one download.
#[derive(Debug)]
pub(crate) struct Scheduler {
    have: ChunkSet,
    /// Providers currently asked for each chunk.
    asked: Vec<Vec<ProviderIx>>,
    /// Active providers known to hold each chunk.
    avail: Vec<u32>,
    providers: Vec<Provider>,
    random_picks: u32,
}

impl Scheduler {
    /// A download that already holds `have`.
    pub(crate) fn new(have: ChunkSet) -> Self {
        let n = have.len() as usize;
        Self {
            have,
            asked: vec![Vec::new(); n],
            avail: vec![0; n],
            providers: Vec::new(),
            random_picks: RANDOM_FIRST_PICKS,
        }
    }

    /// Adds a provider holding `has`; returns its index.
    pub(crate) fn add_provider(&mut self, has: ChunkSet) -> ProviderIx {
        for i in has.iter() {
            self.avail[i as usize] += 1;
        }
        self.providers.push(Provider { has, active: true });
        self.providers.len() - 1
    }

    /// Replaces what a provider is known to hold (a have-update or a fresh
    /// discovery answer); returns whether it gained chunks we miss.
    pub(crate) fn update_provider(&mut self, p: ProviderIx, has: ChunkSet) -> bool {
        let prov = &mut self.providers[p];
        let mut gained = false;
        if prov.active {
            for i in 0..has.len() {
                match (prov.has.contains(i), has.contains(i)) {
                    (false, true) => {
                        self.avail[i as usize] += 1;
                        gained |= !self.have.contains(i);
                    }
                    (true, false) => self.avail[i as usize] -= 1,
                    _ => {}
                }
            }
        }
        prov.has = has;
        gained
    }

    /// The provider does not hold `chunk` after all (it answered not-found).
    pub(crate) fn forget_chunk(&mut self, p: ProviderIx, chunk: u32) {
        let prov = &mut self.providers[p];
        if prov.has.remove(chunk) && prov.active {
            self.avail[chunk as usize] -= 1;
        }
    }

    /// Takes a provider out (gone, stalled for good, or banned): its chunks
    /// no longer count as available. The caller re-queues its requests.
    pub(crate) fn deactivate(&mut self, p: ProviderIx) {
        let prov = &mut self.providers[p];
        if !prov.active {
            return;
        }
        prov.active = false;
        for i in prov.has.iter() {
            self.avail[i as usize] -= 1;
        }
    }

    /// Puts a provider back in (tried again after a failure).
    pub(crate) fn activate(&mut self, p: ProviderIx) {
        let prov = &mut self.providers[p];
        if prov.active {
            return;
        }
        prov.active = true;
        for i in prov.has.iter() {
            self.avail[i as usize] += 1;
        }
    }

    /// Whether every chunk is held.
    pub(crate) fn is_done(&self) -> bool {
        self.have.is_full()
    }

    /// Chunks held.
    pub(crate) fn have(&self) -> &ChunkSet {
        &self.have
    }

    /// Missing chunks no active provider holds.
    pub(crate) fn unavailable(&self) -> u32 {
        (0..self.have.len())
            .filter(|&i| !self.have.contains(i) && self.avail[i as usize] == 0)
            .count() as u32
    }

    /// The next chunk to ask `p` for, or `None` if it has nothing useful.
    /// `endgame_ok` lets it duplicate a chunk already asked of another
    /// provider, once no unrequested chunk is left for it.
    pub(crate) fn pick(
        &mut self,
        p: ProviderIx,
        endgame_ok: bool,
        rng: &mut impl Rng,
    ) -> Option<u32> {
        let prov = &self.providers[p];
        if !prov.active {
            return None;
        }
        let mut best: Option<u32> = None;
        let mut best_avail = u32::MAX;
        let mut ties = 0u32;
        let random = self.random_picks > 0;
        for i in prov.has.iter() {
            let ix = i as usize;
            if self.have.contains(i) || !self.asked[ix].is_empty() {
                continue;
            }
            let a = if random { 0 } else { self.avail[ix] };
            if a < best_avail {
                best = Some(i);
                best_avail = a;
                ties = 1;
            } else if a == best_avail {
                // Reservoir sampling: uniform among equally rare chunks.
                ties += 1;
                if rng.random_range(0..ties) == 0 {
                    best = Some(i);
                }
            }
        }
        if let Some(i) = best {
            self.random_picks = self.random_picks.saturating_sub(1);
            self.asked[i as usize].push(p);
            return Some(i);
        }
        if !endgame_ok {
            return None;
        }
        // Endgame: every missing chunk this provider holds is asked of someone.
        let mut best: Option<u32> = None;
        let mut fewest = usize::MAX;
        for i in prov.has.iter() {
            let asked = &self.asked[i as usize];
            if self.have.contains(i) || asked.contains(&p) || asked.len() >= MAX_COPIES {
                continue;
            }
            if asked.len() < fewest {
                fewest = asked.len();
                best = Some(i);
            }
        }
        let i = best?;
        self.asked[i as usize].push(p);
        Some(i)
    }

    /// `p`'s request for `chunk` ended without the chunk: it can be asked again.
    pub(crate) fn unask(&mut self, p: ProviderIx, chunk: u32) {
        self.asked[chunk as usize].retain(|&q| q != p);
    }

    /// `chunk` arrived from `p` and is stored. Returns the other providers still
    /// asked for it (the endgame losers, to cancel).
    pub(crate) fn complete(&mut self, p: ProviderIx, chunk: u32) -> Vec<ProviderIx> {
        self.have.insert(chunk);
        let mut others = std::mem::take(&mut self.asked[chunk as usize]);
        others.retain(|&q| q != p);
        others
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn set(len: u32, items: &[u32]) -> ChunkSet {
        let mut s = ChunkSet::new(len);
        for &i in items {
            s.insert(i);
        }
        s
    }

    fn past_random(s: &mut Scheduler) {
        s.random_picks = 0;
    }

    #[test]
    fn rarest_chunk_first() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut s = Scheduler::new(ChunkSet::new(4));
        past_random(&mut s);
        let a = s.add_provider(ChunkSet::full(4));
        s.add_provider(set(4, &[0, 1, 3]));
        s.add_provider(set(4, &[0, 1]));
        // Chunk 2 is held by `a` alone, chunk 3 by two, 0 and 1 by three.
        assert_eq!(s.pick(a, false, &mut rng), Some(2));
        assert_eq!(s.pick(a, false, &mut rng), Some(3));
        let next = s.pick(a, false, &mut rng).unwrap();
        assert!(next == 0 || next == 1);
    }

    #[test]
    fn random_among_equals_and_first_picks() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..40 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut s = Scheduler::new(ChunkSet::new(16));
            let a = s.add_provider(ChunkSet::full(16));
            seen.insert(s.pick(a, false, &mut rng).unwrap());
        }
        assert!(seen.len() > 5, "first picks should spread, got {seen:?}");
    }

    #[test]
    fn never_asks_for_held_or_unheld_chunks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut s = Scheduler::new(set(4, &[0]));
        let a = s.add_provider(set(4, &[0, 1]));
        assert_eq!(s.pick(a, true, &mut rng), Some(1));
        assert_eq!(s.pick(a, true, &mut rng), None);
    }

    #[test]
    fn endgame_duplicates_and_names_losers() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut s = Scheduler::new(ChunkSet::new(2));
        let a = s.add_provider(ChunkSet::full(2));
        let b = s.add_provider(ChunkSet::full(2));
        let c = s.add_provider(ChunkSet::full(2));
        let x = s.pick(a, true, &mut rng).unwrap();
        let y = s.pick(a, true, &mut rng).unwrap();
        assert_ne!(x, y);
        assert_eq!(
            s.pick(b, false, &mut rng),
            None,
            "no duplicates outside endgame"
        );
        let dup = s.pick(b, true, &mut rng).unwrap();
        let dup2 = s.pick(c, true, &mut rng).unwrap();
        assert_ne!(
            dup, dup2,
            "endgame spreads duplicates over the least-asked chunks"
        );
        assert_eq!(
            s.pick(c, true, &mut rng),
            None,
            "at most two copies of a chunk"
        );
        assert_eq!(s.complete(b, dup), vec![a]);
        assert!(!s.is_done());
    }

    #[test]
    fn requeue_and_deactivation() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut s = Scheduler::new(ChunkSet::new(1));
        let a = s.add_provider(ChunkSet::full(1));
        let b = s.add_provider(ChunkSet::full(1));
        assert_eq!(s.pick(a, false, &mut rng), Some(0));
        s.unask(a, 0);
        s.deactivate(a);
        assert_eq!(s.pick(a, true, &mut rng), None);
        assert_eq!(s.pick(b, false, &mut rng), Some(0));
        s.deactivate(b);
        assert_eq!(s.unavailable(), 1);
        // An inactive provider's news counts for nothing until it is back.
        assert!(!s.update_provider(b, ChunkSet::full(1)));
        assert_eq!(s.unavailable(), 1);
        s.activate(b);
        assert_eq!(s.unavailable(), 0);
    }

    #[test]
    fn peak_ewma_penalizes_at_once_and_decays_slowly() {
        let t0 = Instant::now();
        let mut sc = Score::new(t0);
        sc.observe(t0, Duration::from_millis(10), 1 << 20);
        sc.observe(
            t0 + Duration::from_millis(100),
            Duration::from_millis(500),
            1 << 20,
        );
        assert!((sc.latency() - 0.5).abs() < 1e-9, "a peak counts at once");
        sc.observe(
            t0 + Duration::from_millis(200),
            Duration::from_millis(10),
            1 << 20,
        );
        assert!(sc.latency() > 0.45, "and fades slowly: {}", sc.latency());
        sc.observe(
            t0 + Duration::from_secs(60),
            Duration::from_millis(10),
            1 << 20,
        );
        assert!(sc.latency() < 0.02, "but it fades: {}", sc.latency());
        // About 87 MiB/s over a 10 ms round trip: under one chunk per round
        // trip, so the least window.
        assert_eq!(sc.window(1 << 20), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_stall_timeout_follows_the_latency_within_bounds() {
        let floor = Duration::from_secs(2);
        let mut sc = Score::new(Instant::now());
        // Nothing known: at least 5 s, or the floor if higher.
        assert_eq!(sc.stall_timeout(floor), Duration::from_secs(5));
        assert_eq!(
            sc.stall_timeout(Duration::from_secs(7)),
            Duration::from_secs(7)
        );
        // Eight times a 500 ms latency.
        sc.observe(Instant::now(), Duration::from_millis(500), 1 << 20);
        assert_eq!(sc.stall_timeout(floor), Duration::from_secs(4));
        // A fast provider is still given the floor.
        tokio::time::advance(Duration::from_secs(120)).await;
        sc.observe(Instant::now(), Duration::from_millis(10), 1 << 20);
        assert_eq!(sc.stall_timeout(floor), floor);
        // A failure counts as a peak at once, capped at 30 s.
        sc.penalize(Instant::now(), Duration::from_secs(10));
        assert_eq!(sc.stall_timeout(floor), Duration::from_secs(30));
    }

    #[test]
    fn the_window_is_the_bandwidth_delay_product_plus_one() {
        let t0 = Instant::now();
        let mut sc = Score::new(t0);
        assert_eq!(sc.window(1 << 20), 2, "nothing known yet");
        // 10 MiB in 125 ms: 80 MiB/s, 10 chunks per round trip.
        sc.observe(t0, Duration::from_millis(125), 10 << 20);
        assert_eq!(sc.window(1 << 20), 11);
        // A much faster link is capped.
        sc.observe(t0, Duration::from_millis(125), 1000 << 20);
        assert_eq!(sc.window(1 << 20), 16);
    }
}
