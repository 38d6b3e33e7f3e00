//! Membership under paused time against a fake control plane: a minimal
//! `ControlPlane` service in the test that records each call and its
//! (virtual) time, and answers as the test says. It is reached over a Unix
//! socket in a temporary directory: writes land in the other end at once,
//! so auto-advancing time never runs ahead of an answer in flight.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use nebula_proto::v1::control_plane_server::{ControlPlane as Service, ControlPlaneServer};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{Member, eventually, member_with, stop};
use crate::{Config, control::ControlClient};
use nebula_proto::v1 as pb;

/// The heartbeat interval the fake hands out.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A call the fake control plane answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Register,
    Heartbeat,
    Announce,
    Deregister,
}

/// How the fake answers, as the test sets it.
#[derive(Debug, Default)]
struct Script {
    /// Registrations fail with this code while set.
    refuse_register: Option<tonic::Code>,
    /// This many registrations, from now on, fail with `NotFound`.
    refused_registers: u32,
    /// This many heartbeats, from now on, hear "unknown peer".
    unknown_peer: u32,
    /// Heartbeats fail with this code while set.
    fail_heartbeat: Option<tonic::Code>,
}

/// A fake control plane: records calls, answers as scripted.
#[derive(Debug, Clone, Default)]
struct Fake {
    calls: Arc<Mutex<Vec<(Instant, Call)>>>,
    /// Every announcement, as sent.
    announced: Arc<Mutex<Vec<pb::AnnounceRequest>>>,
    script: Arc<Mutex<Script>>,
}

impl Fake {
    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push((Instant::now(), call));
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().iter().map(|c| c.1).collect()
    }

    /// When each `call` came.
    fn times(&self, call: Call) -> Vec<Instant> {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|c| c.1 == call).map(|c| c.0).collect()
    }

    fn count(&self, call: Call) -> usize {
        self.times(call).len()
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap()
    }
}

#[tonic::async_trait]
impl Service for Fake {
    async fn register(
        &self,
        _: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.record(Call::Register);
        {
            let mut script = self.script();
            if let Some(code) = script.refuse_register {
                return Err(Status::new(code, "refused by the test"));
            }
            if script.refused_registers > 0 {
                script.refused_registers -= 1;
                return Err(Status::not_found("refused once by the test"));
            }
        }
        Ok(Response::new(pb::RegisterResponse {
            lease_ttl_ms: 30_000,
            heartbeat_interval_ms: HEARTBEAT.as_millis() as u64,
            ..pb::RegisterResponse::default()
        }))
    }

    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.record(Call::Heartbeat);
        let mut script = self.script();
        if let Some(code) = script.fail_heartbeat {
            return Err(Status::new(code, "failed by the test"));
        }
        let unknown_peer = script.unknown_peer > 0;
        script.unknown_peer = script.unknown_peer.saturating_sub(1);
        Ok(Response::new(pb::HeartbeatResponse {
            unknown_peer,
            ..pb::HeartbeatResponse::default()
        }))
    }

    async fn announce(
        &self,
        request: Request<pb::AnnounceRequest>,
    ) -> Result<Response<pb::AnnounceResponse>, Status> {
        self.record(Call::Announce);
        self.announced.lock().unwrap().push(request.into_inner());
        Ok(Response::new(pb::AnnounceResponse::default()))
    }

    async fn deregister(
        &self,
        _: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.record(Call::Deregister);
        Ok(Response::new(pb::DeregisterResponse::default()))
    }

    async fn find_providers(
        &self,
        _: Request<pb::FindProvidersRequest>,
    ) -> Result<Response<pb::FindProvidersResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn report_peer(
        &self,
        _: Request<pb::ReportPeerRequest>,
    ) -> Result<Response<pb::ReportPeerResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn resolve_url(
        &self,
        _: Request<pb::ResolveUrlRequest>,
    ) -> Result<Response<pb::ResolveUrlResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn record_url(
        &self,
        _: Request<pb::RecordUrlRequest>,
    ) -> Result<Response<pb::RecordUrlResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }
}

/// A fake control plane being served; stop it after the peer.
struct Served {
    stop: CancellationToken,
    /// The fake server's end: an error (or a panic, which drops the sender)
    /// fails the test in [`Served::stop`] instead of showing up as a timeout.
    ended: tokio::sync::oneshot::Receiver<Result<(), tonic::transport::Error>>,
}

impl Served {
    async fn stop(self) {
        self.stop.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), self.ended)
            .await
            .expect("the fake control plane stops");
        ended
            .expect("the fake control plane's task ended without panicking")
            .expect("the fake control plane served without failing");
    }
}

/// `fake` served on a Unix socket in `dir`, and a peer's membership calling
/// it, configured by `tune`. The fake runs under its own token: the peer
/// deregisters on the way out, and the fake must still answer.
async fn member_of(
    dir: &tempfile::TempDir,
    fake: &Fake,
    tune: impl FnOnce(&mut Config),
) -> (Member, Served) {
    let mut config = Config::new(
        dir.path().join("store"),
        Some("http://127.0.0.1:1".to_owned()),
    );
    config.register_backoff = Duration::from_secs(1);
    config.max_register_backoff = Duration::from_secs(8);
    tune(&mut config);
    let path = dir.path().join("control.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    let served = Served {
        stop: CancellationToken::new(),
        ended,
    };
    let service = ControlPlaneServer::new(fake.clone());
    let stopping = served.stop.clone();
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                stopping.cancelled_owned(),
            )
            .await;
        let _ = ended_tx.send(result);
    });
    let timeout = config.control_timeout;
    let channel =
        nebula_proto::unix::connect(nebula_proto::unix::endpoint().timeout(timeout), path)
            .await
            .unwrap();
    let (shutdown, tasks) = (CancellationToken::new(), crate::tasks::Tasks::new());
    let member = member_with(config, shutdown, tasks, |identity| {
        ControlClient::over(channel, identity, timeout)
    });
    (member, served)
}

/// Whole seconds, to the nearest.
fn secs(d: Duration) -> u64 {
    (d.as_millis() as u64 + 500) / 1000
}

#[tokio::test(start_paused = true)]
async fn registers_announces_everything_and_deregisters_on_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    // A blob already in the store when the node starts.
    let held = {
        let store = nebula_common::Store::open(dir.path().join("store")).unwrap();
        let file = dir.path().join("held");
        std::fs::write(&file, b"held before the start").unwrap();
        store.add_file(&file).unwrap().id()
    };
    let fake = Fake::default();
    let (peer, served) = member_of(&dir, &fake, |_| {}).await;
    assert!(eventually(|| peer.status.is_registered()).await);
    assert_eq!(fake.calls()[..2], [Call::Register, Call::Announce]);
    let first = fake.announced.lock().unwrap()[0].clone();
    assert!(
        first.full_inventory,
        "the first announcement is the whole inventory"
    );
    let ids: Vec<&str> = first.blobs.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, [held.to_string()]);
    stop(&peer).await;
    assert_eq!(fake.calls().last(), Some(&Call::Deregister));
    served.stop().await;
}

#[tokio::test(start_paused = true)]
async fn heartbeats_come_at_the_interval_the_control_plane_sets() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let (peer, served) = member_of(&dir, &fake, |_| {}).await;
    assert!(eventually(|| peer.status.is_registered()).await);
    let before = fake.count(Call::Heartbeat);
    tokio::time::sleep(HEARTBEAT * 10).await;
    let beats = fake.count(Call::Heartbeat) - before;
    assert!(
        (9..=11).contains(&beats),
        "{beats} heartbeats in 10 intervals"
    );
    let times = fake.times(Call::Heartbeat);
    for pair in times.windows(2) {
        assert_eq!(secs(pair[1] - pair[0]), 1, "heartbeats at {times:?}");
    }
    stop(&peer).await;
    served.stop().await;
}

#[tokio::test(start_paused = true)]
async fn registers_again_when_a_heartbeat_hears_unknown_peer() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let (peer, served) = member_of(&dir, &fake, |_| {}).await;
    assert!(eventually(|| peer.status.is_registered()).await);
    assert_eq!(fake.count(Call::Register), 1);
    fake.script().unknown_peer = 1;
    tokio::time::sleep(HEARTBEAT * 3).await;
    assert_eq!(fake.count(Call::Register), 2);
    // With the whole inventory again: the control plane had forgotten it.
    assert_eq!(fake.count(Call::Announce), 2);
    assert!(peer.status.is_registered());
    stop(&peer).await;
    served.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_registrations_back_off_doubling_up_to_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.script().refuse_register = Some(tonic::Code::NotFound);
    let (peer, served) = member_of(&dir, &fake, |c| {
        c.register_backoff = Duration::from_secs(1);
        c.max_register_backoff = Duration::from_secs(8);
    })
    .await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    let gaps: Vec<u64> = fake
        .times(Call::Register)
        .windows(2)
        .map(|pair| secs(pair[1] - pair[0]))
        .collect();
    assert!(gaps.len() >= 6, "registrations {gaps:?}");
    assert_eq!(gaps[..6], [1, 2, 4, 8, 8, 8]);
    assert!(!peer.status.is_registered());
    assert!(
        !peer.status.error().is_empty(),
        "the failure is kept for `nebula status`"
    );
    // Accepted at the next attempt, within the cap; the back-off starts over.
    fake.script().refuse_register = None;
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(peer.status.is_registered());
    assert!(peer.status.error().is_empty());
    stop(&peer).await;
    served.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_back_off_starts_over_after_a_successful_registration() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    // Three refusals first, so that a back-off carried over would be 8 s.
    fake.script().refused_registers = 3;
    let (peer, served) = member_of(&dir, &fake, |c| {
        c.register_backoff = Duration::from_secs(1);
        c.max_register_backoff = Duration::from_secs(8);
    })
    .await;
    assert!(eventually(|| peer.status.is_registered()).await);
    assert_eq!(fake.count(Call::Register), 4);
    // Forgotten by the control plane, and refused once on the way back.
    {
        let mut script = fake.script();
        script.unknown_peer = 1;
        script.refused_registers = 1;
    }
    tokio::time::sleep(HEARTBEAT * 12).await;
    let times = fake.times(Call::Register);
    assert_eq!(times.len(), 6, "registrations at {times:?}");
    assert_eq!(
        secs(times[5] - times[4]),
        1,
        "the first back-off again, not the 8 s the earlier refusals reached"
    );
    assert!(peer.status.is_registered());
    stop(&peer).await;
    served.stop().await;
}

#[tokio::test(start_paused = true)]
async fn registered_drops_after_three_failed_heartbeat_intervals_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let (peer, served) = member_of(&dir, &fake, |_| {}).await;
    assert!(eventually(|| peer.status.is_registered()).await);
    // Right after a heartbeat that succeeded: the last good one.
    let before = fake.count(Call::Heartbeat);
    assert!(eventually(|| fake.count(Call::Heartbeat) > before).await);
    let last_ok = *fake.times(Call::Heartbeat).last().unwrap();
    fake.script().fail_heartbeat = Some(tonic::Code::Internal);
    // Three failed heartbeats, three intervals since the last good one:
    // still registered.
    tokio::time::sleep_until(last_ok + HEARTBEAT * 3 + HEARTBEAT / 2).await;
    assert_eq!(fake.count(Call::Heartbeat), before + 4);
    assert!(peer.status.is_registered(), "after three failed heartbeats");
    // The fourth comes more than three intervals after the last good one.
    tokio::time::sleep_until(last_ok + HEARTBEAT * 4 + HEARTBEAT / 2).await;
    assert_eq!(fake.count(Call::Heartbeat), before + 5);
    assert!(!peer.status.is_registered(), "after four failed heartbeats");
    // No registration meanwhile: the peer kept heartbeating.
    assert_eq!(fake.count(Call::Register), 1);
    // The next heartbeat that succeeds makes it registered again.
    fake.script().fail_heartbeat = None;
    tokio::time::sleep(HEARTBEAT).await;
    assert!(peer.status.is_registered(), "after a good heartbeat");
    assert_eq!(fake.count(Call::Register), 1);
    stop(&peer).await;
    served.stop().await;
}
