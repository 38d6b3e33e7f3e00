//! Active health checks: every registered peer is probed with the standard
//! `grpc.health.v1.Health/Check` for the service `nebula.peer.<peer id>` on a
//! timer, so only the registered peer itself passes (not another peer, the
//! control plane's own port, or any other gRPC server at that address).
//! `unhealthy_after` consecutive failures take it out of discovery,
//! `healthy_after` consecutive passes bring it back.
//!
//! The prober is generic over [`HealthCheck`] so tests can drive it with
//! paused time and no sockets; [`GrpcHealthCheck`] is the real one.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use nebula_proto::tls::{self, TlsConfig};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    config::Config,
    registry::Registry,
    store::{Health, PeerId, StateStore},
};

/// One probe of one peer.
pub trait HealthCheck: Send + Sync + 'static {
    /// Whether the peer at `address` (`host:port`) answers that it is
    /// serving as `peer`, within the checker's own deadline.
    fn check(&self, peer: &PeerId, address: &str) -> impl Future<Output = bool> + Send;

    /// Forgets cached state (connections) of every address not in `live`.
    fn retain(&self, live: &HashSet<Arc<str>>) {
        let _ = live;
    }
}

/// Probes over gRPC, with one cached, lazily connected channel per address.
#[derive(Debug)]
pub struct GrpcHealthCheck {
    timeout: Duration,
    /// With TLS, peers are dialed with `https://` and their certificates checked.
    tls: Option<TlsConfig>,
    channels: Mutex<HashMap<Arc<str>, Channel>>,
}

impl GrpcHealthCheck {
    /// A checker whose connect and answer deadline is `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            tls: None,
            channels: Mutex::default(),
        }
    }

    /// Probes over TLS when `tls` is given (a fleet that serves with TLS).
    pub fn with_tls(mut self, tls: Option<TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    fn channel(&self, address: &str) -> Option<Channel> {
        // A poisoned map only holds channels, each usable on its own.
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = channels.get(address) {
            return Some(ch.clone());
        }
        let tls = self.tls.as_ref();
        let endpoint = tls::endpoint(&format!("{}://{address}", tls::scheme(tls)), tls)
            .map_err(|e| tracing::debug!(%address, error = %e, "cannot probe this address"))
            .ok()?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true);
        let ch = endpoint.connect_lazy();
        channels.insert(Arc::from(address), ch.clone());
        Some(ch)
    }
}

impl HealthCheck for GrpcHealthCheck {
    async fn check(&self, peer: &PeerId, address: &str) -> bool {
        let Some(channel) = self.channel(address) else {
            return false;
        };
        // Only the registered peer answers SERVING for its own id: another
        // peer, the control plane itself or any other gRPC server answers
        // NOT_FOUND for it.
        let request = HealthCheckRequest {
            service: format!("nebula.peer.{peer}"),
        };
        let answer =
            tokio::time::timeout(self.timeout, HealthClient::new(channel).check(request)).await;
        match answer {
            Ok(Ok(resp)) => resp.get_ref().status() == ServingStatus::Serving,
            Ok(Err(status)) => {
                tracing::debug!(%address, %status, "health probe failed");
                false
            }
            Err(_) => {
                tracing::debug!(%address, "health probe timed out");
                false
            }
        }
    }

    fn retain(&self, live: &HashSet<Arc<str>>) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.retain(|addr, _| live.contains(addr));
    }
}

/// Consecutive probe outcomes of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTracker {
    health: Health,
    failures: u32,
    passes: u32,
}

impl Default for HealthTracker {
    fn default() -> Self {
        Self::new(Health::Healthy)
    }
}

impl HealthTracker {
    /// A tracker starting from `health`.
    pub fn new(health: Health) -> Self {
        Self {
            health,
            failures: 0,
            passes: 0,
        }
    }

    /// The current verdict.
    pub fn health(&self) -> Health {
        self.health
    }

    /// Takes the store's verdict as current (it resets when a peer registers
    /// again), keeping the streak counts.
    pub fn sync(&mut self, health: Health) {
        self.health = health;
    }

    /// Records one probe; returns the new verdict when it changed.
    pub fn record(
        &mut self,
        passed: bool,
        unhealthy_after: u32,
        healthy_after: u32,
    ) -> Option<Health> {
        if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            if self.health == Health::Unhealthy && self.passes >= healthy_after {
                self.health = Health::Healthy;
                return Some(Health::Healthy);
            }
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.health == Health::Healthy && self.failures >= unhealthy_after {
                self.health = Health::Unhealthy;
                return Some(Health::Unhealthy);
            }
        }
        None
    }
}

/// Probes every live peer once per `probe_interval`.
#[derive(Debug)]
pub(crate) struct Prober<S, C> {
    registry: Arc<Registry<S>>,
    checker: Arc<C>,
    interval: Duration,
    unhealthy_after: u32,
    healthy_after: u32,
    concurrency: usize,
    /// Per peer: the address probed and the streaks seen there.
    trackers: HashMap<PeerId, (Arc<str>, HealthTracker)>,
    /// This control-plane replica's name among the replicas sharing the store.
    replica: Arc<str>,
    /// How long this replica counts as alive after each round announces it.
    replica_ttl: Duration,
}

/// The replica that probes `peer`: the peer id hashed (FNV-1a, the same on
/// every build) over the sorted list of live replicas. When a replica dies,
/// its peers move to the others as soon as it drops out of the list.
pub fn prober_of<'a>(peer: &PeerId, replicas: &'a [String]) -> Option<&'a str> {
    if replicas.is_empty() {
        return None;
    }
    let hash = peer
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    Some(&replicas[(hash % replicas.len() as u64) as usize])
}

impl<S: StateStore, C: HealthCheck> Prober<S, C> {
    pub(crate) fn new(registry: Arc<Registry<S>>, checker: C, config: &Config) -> Self {
        Self {
            registry,
            checker: Arc::new(checker),
            interval: config.probe_interval,
            unhealthy_after: config.unhealthy_after,
            healthy_after: config.healthy_after,
            concurrency: config.max_concurrent_probes,
            trackers: HashMap::new(),
            replica: Arc::from("local"),
            // A replica is dropped from the list a little over one interval
            // after its last round: its peers are then probed by others.
            replica_ttl: config.probe_interval + config.probe_timeout,
        }
    }

    /// Names this replica (unique among the replicas sharing the store).
    pub(crate) fn with_replica(mut self, name: Arc<str>) -> Self {
        self.replica = name;
        self
    }

    /// Probes until `cancel` fires.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.round() => {}
            }
        }
    }

    /// Probes once every live peer whose prober this replica is, at most
    /// `concurrency` at a time.
    pub(crate) async fn round(&mut self) {
        let store = self.registry.store();
        let replicas = match store.replicas(&self.replica, self.replica_ttl).await {
            Ok(replicas) => replicas,
            Err(err) => {
                tracing::debug!(error = %err, "cannot list the live replicas; not probing");
                return;
            }
        };
        let mut peers = match store.peers().await {
            Ok(peers) => peers,
            Err(err) => {
                tracing::debug!(error = %err, "cannot list peers to probe");
                return;
            }
        };
        peers.retain(|p| prober_of(&p.id, &replicas) == Some(&*self.replica));
        let live: HashSet<Arc<str>> = peers.iter().map(|p| p.address.clone()).collect();
        self.checker.retain(&live);
        let ids: HashSet<&PeerId> = peers.iter().map(|p| &p.id).collect();
        self.trackers.retain(|id, _| ids.contains(id));

        let checker = &self.checker;
        let outcomes: Vec<_> = futures::stream::iter(peers)
            .map(|p| async move {
                let passed = checker.check(&p.id, &p.address).await;
                (p, passed)
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;

        for (peer, passed) in outcomes {
            if !passed {
                self.registry.metrics().probe_failed();
            }
            let (address, tracker) = self
                .trackers
                .entry(peer.id.clone())
                .or_insert_with(|| (peer.address.clone(), HealthTracker::new(peer.health)));
            if *address != peer.address {
                // A new address is a new server: its old streaks say nothing.
                *address = peer.address.clone();
                *tracker = HealthTracker::new(peer.health);
            }
            tracker.sync(peer.health);
            let Some(health) = tracker.record(passed, self.unhealthy_after, self.healthy_after)
            else {
                continue;
            };
            match health {
                Health::Unhealthy => {
                    tracing::warn!(peer = %peer.id, address = %peer.address, "peer failed its health checks; out of discovery")
                }
                Health::Healthy => {
                    tracing::info!(peer = %peer.id, address = %peer.address, "peer passes its health checks again")
                }
            }
            if let Err(err) = self.registry.set_health(&peer.id, health).await {
                tracing::warn!(peer = %peer.id, error = %err, "cannot record health");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nebula_common::{BlobId, BlobRef};

    use super::*;
    use crate::{
        registry::ProviderQuery,
        store::{Announcement, BlobAnnouncement, Load, MemoryStore, PeerRegistration},
    };

    #[test]
    fn probing_is_split_among_replicas_and_moves_when_one_dies() {
        let three: Vec<String> = ["r1", "r2", "r3"].map(String::from).to_vec();
        let ids: Vec<PeerId> = (0..300)
            .map(|i| format!("peer-{i}").parse().unwrap())
            .collect();
        let mut counts = HashMap::new();
        for id in &ids {
            *counts.entry(prober_of(id, &three).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3, "{counts:?}");
        assert!(counts.values().all(|&n| n > 60), "{counts:?}");
        // r2 dies: its peers move, the others' stay.
        let two: Vec<String> = ["r1", "r3"].map(String::from).to_vec();
        for id in &ids {
            let before = prober_of(id, &three).unwrap();
            let after = prober_of(id, &two).unwrap();
            assert_ne!(after, "r2");
            if before != "r2" && two.len() == 2 {
                // Modulo hashing may move some of the survivors' peers too;
                // what matters is that every peer has exactly one prober.
                assert!(after == "r1" || after == "r3");
            }
        }
        assert_eq!(prober_of(&ids[0], &[]), None);
    }

    #[test]
    fn three_failures_make_unhealthy_two_passes_heal() {
        let mut t = HealthTracker::default();
        assert_eq!(t.record(false, 3, 2), None);
        assert_eq!(t.record(false, 3, 2), None);
        assert_eq!(t.record(false, 3, 2), Some(Health::Unhealthy));
        assert_eq!(t.record(false, 3, 2), None, "no repeated transition");
        assert_eq!(t.record(true, 3, 2), None);
        assert_eq!(t.record(true, 3, 2), Some(Health::Healthy));
        assert_eq!(t.health(), Health::Healthy);
    }

    #[test]
    fn streaks_must_be_consecutive() {
        let mut t = HealthTracker::default();
        for _ in 0..10 {
            assert_eq!(t.record(false, 3, 2), None);
            assert_eq!(t.record(false, 3, 2), None);
            assert_eq!(
                t.record(true, 3, 2),
                None,
                "a pass resets the failure streak"
            );
        }
        let mut t = HealthTracker::new(Health::Unhealthy);
        for _ in 0..10 {
            assert_eq!(t.record(true, 3, 2), None);
            assert_eq!(
                t.record(false, 3, 2),
                None,
                "a failure resets the pass streak"
            );
        }
        assert_eq!(t.health(), Health::Unhealthy);
    }

    /// Addresses that answer probes; the rest fail.
    #[derive(Debug, Default)]
    struct FakeCheck {
        up: Mutex<HashSet<String>>,
    }

    impl FakeCheck {
        fn set(&self, address: &str, up: bool) {
            let mut set = self.up.lock().unwrap();
            if up {
                set.insert(address.to_owned());
            } else {
                set.remove(address);
            }
        }
    }

    impl HealthCheck for Arc<FakeCheck> {
        async fn check(&self, _peer: &PeerId, address: &str) -> bool {
            self.up.lock().unwrap().contains(address)
        }
    }

    const ADDR: &str = "127.0.0.1:7701";

    async fn discoverable(r: &Registry<MemoryStore>) -> bool {
        let q = ProviderQuery {
            blob: BlobRef::Blake3(BlobId::from_bytes([1; 32])),
            asker: None,
            zone: String::new(),
            limit: 0,
        };
        !r.find_providers(&q).await.unwrap().providers.is_empty()
    }

    /// Registers one peer holding one blob and starts a prober with `config`.
    async fn setup(
        config: &Config,
    ) -> (
        Arc<Registry<MemoryStore>>,
        Arc<FakeCheck>,
        CancellationToken,
    ) {
        let registry = Arc::new(Registry::new(MemoryStore::new(), config));
        let id: PeerId = "p".parse().unwrap();
        registry
            .register(PeerRegistration {
                id: id.clone(),
                address: ADDR.into(),
                zone: String::new(),
                labels: BTreeMap::new(),
            })
            .await
            .unwrap();
        let ann = Announcement {
            blobs: vec![BlobAnnouncement {
                id: BlobId::from_bytes([1; 32]),
                size: 1,
                sha256: None,
                chunks: None,
            }],
            ..Announcement::default()
        };
        registry.announce(&id, ann).await.unwrap();
        let check = Arc::new(FakeCheck::default());
        check.set(ADDR, true);
        let cancel = CancellationToken::new();
        let prober = Prober::new(registry.clone(), check.clone(), config);
        tokio::spawn(prober.run(cancel.clone()));
        (registry, check, cancel)
    }

    /// Advances paused time in 100 ms steps, heartbeating every 2 s so only the
    /// health checks can change the answer; returns the time it took for
    /// discovery to say `want`, if within `limit`.
    async fn time_until(
        r: &Registry<MemoryStore>,
        want: bool,
        limit: Duration,
    ) -> Option<Duration> {
        let start = Instant::now();
        let id: PeerId = "p".parse().unwrap();
        let mut last_beat = start;
        while start.elapsed() <= limit {
            if last_beat.elapsed() >= Duration::from_secs(2) {
                assert!(r.heartbeat(&id, Load::default()).await.unwrap());
                last_beat = Instant::now();
            }
            if discoverable(r).await == want {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    #[tokio::test(start_paused = true)]
    async fn killed_peer_leaves_discovery_within_10s_with_defaults() {
        let config = Config::default();
        let (registry, check, cancel) = setup(&config).await;
        // Several probe rounds pass: it stays in.
        assert_eq!(
            time_until(&registry, false, Duration::from_secs(7)).await,
            None
        );
        check.set(ADDR, false);
        let took = time_until(&registry, false, Duration::from_secs(10)).await;
        let took = took.expect("a dead peer must leave discovery within 10 s");
        // Three failed rounds are needed, two are not enough.
        assert!(
            took > config.probe_interval * 2,
            "left after {took:?}: too early"
        );
        // Two passing rounds bring it back.
        check.set(ADDR, true);
        let back = time_until(&registry, true, Duration::from_secs(10))
            .await
            .expect("back");
        assert!(
            back > config.probe_interval,
            "back after {back:?}: one pass is not enough"
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn thresholds_come_from_the_config() {
        let config = Config {
            probe_interval: Duration::from_secs(1),
            unhealthy_after: 5,
            healthy_after: 4,
            ..Config::default()
        };
        let (registry, check, cancel) = setup(&config).await;
        check.set(ADDR, false);
        let took = time_until(&registry, false, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(
            (Duration::from_secs(4)..=Duration::from_millis(5_300)).contains(&took),
            "{took:?}"
        );
        check.set(ADDR, true);
        let back = time_until(&registry, true, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(
            (Duration::from_secs(3)..=Duration::from_millis(4_300)).contains(&back),
            "{back:?}"
        );
        cancel.cancel();
    }
}
