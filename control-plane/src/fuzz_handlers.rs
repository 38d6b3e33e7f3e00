//! Fuzzing the control plane's handlers: the `ControlPlane` and
//! `Admin` services, called directly on the in-memory store with arbitrary
//! sequences of arbitrary requests, must never panic, must answer every
//! refusal with a typed status (never `INTERNAL` or `UNKNOWN`) in one line,
//! and must keep their invariants: discovery never names the asker, a banned
//! or drained peer, or a peer that is not registered; answers respect their
//! limit; the admin figures agree with the peer listing.
//!
//! `PROPTEST_CASES` sets the sequences per property (64 by default here);
//! see the README's testing section for running long.

use std::{collections::HashMap, sync::Arc, time::Duration};

use nebula_control::{
    Config, MemoryStore, Registry, admin::AdminService, service::ControlPlaneService,
};
use nebula_proto::v1::{self as pb, admin_server::Admin, control_plane_server::ControlPlane};
use proptest::prelude::*;
use tonic::{Code, Request, Status};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
fn config(cases: u32) -> ProptestConfig {
    match std::env::var("PROPTEST_CASES") {
        Ok(_) => ProptestConfig::default(),
        Err(_) => ProptestConfig::with_cases(cases),
    }
}

const BLOBS: [&str; 3] = [
    "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
];
const SHAS: [&str; 2] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "0101010101010101010101010101010101010101010101010101010101010101",
];

fn peer_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["p0", "p1", "p2", "p3"]).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["", "bad id", "p\n1", "ä", "-", "."]).prop_map(str::to_owned),
        1 => "[a-zA-Z0-9._-]{1,80}",
        1 => any::<String>(),
    ]
}

fn blob() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(BLOBS.to_vec()).prop_map(str::to_owned),
        1 => prop::sample::select(BLOBS.to_vec()).prop_map(|b| format!("blake3:{b}")),
        1 => prop::sample::select(SHAS.to_vec()).prop_map(|s| format!("sha256:{s}")),
        1 => "[0-9a-fA-Fgx:]{0,70}",
        1 => prop::sample::select(BLOBS.to_vec()).prop_map(|b| format!("\n {b}\t")),
        1 => any::<String>(),
    ]
}

fn sha() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        prop::sample::select(SHAS.to_vec()).prop_map(str::to_owned),
        prop::sample::select(SHAS.to_vec()).prop_map(|s| format!("sha256:{s}")),
        "[0-9a-z:]{0,70}",
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        1u64..(64 << 20),
        Just((8192u64 << 20) + 1),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1u16..).prop_map(|p| format!("127.0.0.1:{p}")),
        1 => prop::sample::select(vec!["", "0.0.0.0:5", "[::1]:7", "[::]:1", "x", "h:0", "host.example:7701"])
            .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn url() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "https://origin.example/a.bin",
            "http://origin.example/a.bin?sig=1#x",
            "https://u:p@origin.example/",
            "ftp://origin.example/x",
        ])
        .prop_map(str::to_owned),
        1 => "(http|https)://[a-z.]{1,10}/[ -~]{0,20}",
        1 => any::<String>(),
    ]
}

/// Sizes of [`BLOBS`] in well-formed announcements (1, 5 and 100 chunks).
const SIZES: [u64; 3] = [0, 5 << 20, 100 << 20];

/// Mostly well-formed (so that sequences reach states with providers),
/// sometimes anything.
fn announcement() -> impl Strategy<Value = pb::BlobAnnouncement> {
    prop_oneof![
        3 => (0..3usize, any::<bool>(), prop::collection::vec(any::<u8>(), 0..14), any::<bool>()).prop_map(
            |(i, complete, mut chunks, alias)| {
                chunks.truncate(nebula_common::Geometry::new(SIZES[i]).chunk_count().div_ceil(8) as usize);
                pb::BlobAnnouncement {
                    id: BLOBS[i].to_owned(),
                    size: SIZES[i],
                    sha256: if alias && i < 2 { SHAS[i].to_owned() } else { String::new() },
                    complete,
                    chunks: chunks.into(),
                }
            }
        ),
        1 => any_announcement(),
    ]
}

fn any_announcement() -> impl Strategy<Value = pb::BlobAnnouncement> {
    (
        blob(),
        size(),
        sha(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(
            |(id, size, sha256, complete, chunks)| pb::BlobAnnouncement {
                id,
                size,
                sha256,
                complete,
                chunks: chunks.into(),
            },
        )
}

fn load() -> impl Strategy<Value = Option<pb::Load>> {
    proptest::option::of(
        (any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(a, b, c)| pb::Load {
            active_uploads: a,
            upload_bytes_per_sec: b,
            upload_slots: c,
        }),
    )
}

fn peer_request() -> impl Strategy<Value = pb::PeerRequest> {
    (peer_id(), "[ -~]{0,20}").prop_map(|(peer_id, reason)| pb::PeerRequest { peer_id, reason })
}

/// One call to either service, or time passing.
#[derive(Debug, Clone)]
enum Call {
    Register(pb::RegisterRequest),
    Heartbeat(pb::HeartbeatRequest),
    Announce(pb::AnnounceRequest),
    Find(pb::FindProvidersRequest),
    Report(pb::ReportPeerRequest),
    Deregister(pb::DeregisterRequest),
    ResolveUrl(pb::ResolveUrlRequest),
    RecordUrl(pb::RecordUrlRequest),
    ListPeers,
    Swarm(pb::GetSwarmRequest),
    Drain(pb::PeerRequest),
    Ban(pb::PeerRequest),
    Unban(pb::PeerRequest),
    Stats,
    /// Time passes (leases lapse), then the sweeper runs.
    Tick(u64),
}

fn call() -> impl Strategy<Value = Call> {
    let labels = prop::collection::hash_map("[a-z]{0,8}", "[ -~]{0,12}", 0..3);
    prop_oneof![
        4 => (peer_id(), address(), "[a-z]{0,3}", labels).prop_map(|(peer_id, address, zone, labels)| {
            Call::Register(pb::RegisterRequest { peer_id, address, zone, labels })
        }),
        2 => (peer_id(), load()).prop_map(|(peer_id, load)| Call::Heartbeat(pb::HeartbeatRequest { peer_id, load })),
        4 => (peer_id(), prop::collection::vec(announcement(), 0..4), prop::collection::vec(blob(), 0..3), any::<bool>())
            .prop_map(|(peer_id, blobs, removed, full_inventory)| {
                Call::Announce(pb::AnnounceRequest { peer_id, blobs, removed, full_inventory })
            }),
        4 => (prop_oneof![Just(String::new()), peer_id()], blob(), prop_oneof![Just(0u32), 1u32..5, any::<u32>()], "[a-z]{0,3}")
            .prop_map(|(peer_id, blob, limit, zone)| Call::Find(pb::FindProvidersRequest { peer_id, blob, limit, zone })),
        2 => (peer_id(), peer_id(), prop_oneof![Just(String::new()), blob()], "[ -~]{0,20}")
            .prop_map(|(reporter_id, peer_id, blob, reason)| Call::Report(pb::ReportPeerRequest { reporter_id, peer_id, blob, reason })),
        1 => peer_id().prop_map(|peer_id| Call::Deregister(pb::DeregisterRequest { peer_id })),
        2 => (peer_id(), url(), any::<bool>()).prop_map(|(peer_id, url, refresh)| Call::ResolveUrl(pb::ResolveUrlRequest { peer_id, url, refresh })),
        2 => (peer_id(), url(), blob(), proptest::option::of((size(), "[ -~]{0,10}", "[ -~]{0,10}")))
            .prop_map(|(peer_id, url, blob, v)| Call::RecordUrl(pb::RecordUrlRequest {
                peer_id,
                url,
                blob,
                validators: v.map(|(size, etag, last_modified)| pb::UrlValidators { size, etag, last_modified }),
            })),
        1 => Just(Call::ListPeers),
        1 => blob().prop_map(|blob| Call::Swarm(pb::GetSwarmRequest { blob })),
        1 => peer_request().prop_map(Call::Drain),
        1 => peer_request().prop_map(Call::Ban),
        1 => peer_request().prop_map(Call::Unban),
        1 => Just(Call::Stats),
        1 => prop_oneof![0u64..3000, 5000u64..20_000].prop_map(Call::Tick),
    ]
}

/// The services under test, over one registry.
struct Harness {
    config: Config,
    registry: Arc<Registry<MemoryStore>>,
    control: ControlPlaneService<MemoryStore>,
    admin: AdminService<MemoryStore>,
}

impl Harness {
    fn new() -> Self {
        let config = Config {
            // Small, so that the caps are reached too.
            max_announce_blobs: 5,
            ..Config::default()
        };
        let registry = Arc::new(Registry::new(
            MemoryStore::with_caps(config.inventory_caps),
            &config,
        ));
        Self {
            control: ControlPlaneService::new(Arc::clone(&registry)),
            admin: AdminService::new(Arc::clone(&registry)),
            registry,
            config,
        }
    }
}

/// Every ControlPlane request is built here: as the peer it names, with a
/// credential the harness's control plane signed (through the interceptor),
/// when that id is well formed; without one otherwise.
fn request<T: Named>(h: &Harness, message: T) -> Request<T> {
    let who = message.who().to_owned();
    if who.parse::<nebula_control::PeerId>().is_ok() {
        crate::identity::signed(h.registry.identity(), &who, message)
    } else {
        Request::new(message)
    }
}

/// The peer a request speaks for.
trait Named {
    fn who(&self) -> &str;
}

macro_rules! named {
    ($($t:ty => $field:ident),* $(,)?) => {$(
        impl Named for $t {
            fn who(&self) -> &str {
                &self.$field
            }
        }
    )*};
}

named!(
    pb::RegisterRequest => peer_id,
    pb::HeartbeatRequest => peer_id,
    pb::AnnounceRequest => peer_id,
    pb::FindProvidersRequest => peer_id,
    pb::ReportPeerRequest => reporter_id,
    pb::DeregisterRequest => peer_id,
    pb::ResolveUrlRequest => peer_id,
    pb::RecordUrlRequest => peer_id,
);

/// Codes a refusal may carry. UNAUTHENTICATED and PERMISSION_DENIED are for
/// calls that will need a credential and are made without one.
const REFUSALS: [Code; 6] = [
    Code::InvalidArgument,
    Code::NotFound,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Unauthenticated,
    Code::PermissionDenied,
];

fn check_refusal(call: &Call, status: &Status) -> Result<(), TestCaseError> {
    prop_assert!(
        REFUSALS.contains(&status.code()),
        "{:?} answered {:?}: {}",
        call,
        status.code(),
        status.message()
    );
    prop_assert!(!status.message().is_empty(), "{:?}: empty message", call);
    prop_assert!(
        !status.message().contains('\n') && status.message().len() < 4096,
        "{:?}: message not one short line: {:?}",
        call,
        status.message()
    );
    Ok(())
}

/// What the harness expects of the registry between calls.
#[derive(Default)]
struct Model {
    /// Peers an operator took out of discovery (ban or drain), by id.
    sanctioned: HashMap<String, bool>,
    /// When each peer last made a call that may have renewed its lease (any
    /// call naming it that succeeded: the model is generous, the check
    /// strict): past the lease TTL since then, it is out of discovery.
    renewed: HashMap<String, tokio::time::Instant>,
}

/// The peer a ControlPlane call is made as, if any.
fn caller(call: &Call) -> Option<&str> {
    match call {
        Call::Register(r) => Some(&r.peer_id),
        Call::Heartbeat(r) => Some(&r.peer_id),
        Call::Announce(r) => Some(&r.peer_id),
        Call::Find(r) => Some(&r.peer_id),
        Call::Report(r) => Some(&r.reporter_id),
        Call::ResolveUrl(r) => Some(&r.peer_id),
        Call::RecordUrl(r) => Some(&r.peer_id),
        _ => None,
    }
}

async fn run(h: &Harness, model: &mut Model, call: &Call) -> Result<(), TestCaseError> {
    let refused = |s: Status| (call.clone(), s);
    let outcome: Result<(), (Call, Status)> = match call.clone() {
        Call::Register(r) => {
            let id = r.peer_id.clone();
            h.control
                .register(request(h, r))
                .await
                .map(|_| {
                    // A ban outlives re-registration; nothing else to note.
                    let _ = id;
                })
                .map_err(refused)
        }
        Call::Heartbeat(r) => h
            .control
            .heartbeat(request(h, r))
            .await
            .map(drop)
            .map_err(refused),
        Call::Announce(r) => h
            .control
            .announce(request(h, r))
            .await
            .map(drop)
            .map_err(refused),
        Call::Find(r) => {
            let asker = r.peer_id.clone();
            let limit = r.limit;
            match h.control.find_providers(request(h, r)).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    let cap = match limit {
                        0 => h.config.default_discovery_limit,
                        n => n.min(h.config.max_discovery_limit),
                    } as usize;
                    prop_assert!(
                        answer.providers.len() <= cap,
                        "{} providers, limit {}",
                        answer.providers.len(),
                        limit
                    );
                    let listed: Vec<String> = h
                        .registry
                        .peers()
                        .await
                        .unwrap()
                        .iter()
                        .map(|p| p.id.to_string())
                        .collect();
                    let mut seen = std::collections::HashSet::new();
                    for p in &answer.providers {
                        prop_assert!(
                            asker.is_empty() || p.peer_id != asker,
                            "the asker {} was named",
                            asker
                        );
                        prop_assert!(seen.insert(p.peer_id.clone()), "{} named twice", p.peer_id);
                        prop_assert!(
                            listed.contains(&p.peer_id),
                            "{} is not registered",
                            p.peer_id
                        );
                        let lapsed = model
                            .renewed
                            .get(&p.peer_id)
                            .is_none_or(|at| at.elapsed() > h.config.lease_ttl);
                        prop_assert!(!lapsed, "{} is named past its lease", p.peer_id);
                        prop_assert!(
                            !model.sanctioned.get(&p.peer_id).copied().unwrap_or(false),
                            "{} is banned or drained",
                            p.peer_id
                        );
                    }
                    Ok(())
                }
                Err(s) => Err(refused(s)),
            }
        }
        Call::Report(r) => h
            .control
            .report_peer(request(h, r))
            .await
            .map(drop)
            .map_err(refused),
        Call::Deregister(r) => h
            .control
            .deregister(request(h, r))
            .await
            .map(drop)
            .map_err(refused),
        Call::ResolveUrl(r) => h
            .control
            .resolve_url(request(h, r))
            .await
            .map(drop)
            .map_err(refused),
        Call::RecordUrl(r) => h
            .control
            .record_url(request(h, r))
            .await
            .map(drop)
            .map_err(refused),
        Call::ListPeers => {
            let peers = h
                .admin
                .list_peers(Request::new(pb::ListPeersRequest {}))
                .await
                .map_err(refused);
            if let Ok(peers) = &peers {
                let stats = h
                    .admin
                    .stats(Request::new(pb::StatsRequest {}))
                    .await
                    .unwrap()
                    .into_inner();
                let n = peers.get_ref().peers.len() as u64;
                prop_assert_eq!(stats.peers, n);
                prop_assert!(stats.healthy_peers <= n);
            }
            peers.map(drop)
        }
        Call::Swarm(r) => h
            .admin
            .get_swarm(Request::new(r))
            .await
            .map(drop)
            .map_err(refused),
        Call::Drain(r) | Call::Ban(r) => {
            let id = r.peer_id.clone();
            let answer = if matches!(call, Call::Drain(_)) {
                h.admin.drain_peer(Request::new(r)).await
            } else {
                h.admin.ban_peer(Request::new(r)).await
            };
            if answer.is_ok() {
                model.sanctioned.insert(id, true);
            }
            answer.map(drop).map_err(refused)
        }
        Call::Unban(r) => {
            let id = r.peer_id.clone();
            let answer = h.admin.unban_peer(Request::new(r)).await;
            if answer.is_ok() {
                model.sanctioned.insert(id, false);
            }
            answer.map(drop).map_err(refused)
        }
        Call::Stats => {
            let stats = h
                .admin
                .stats(Request::new(pb::StatsRequest {}))
                .await
                .map_err(refused);
            if let Ok(s) = &stats {
                prop_assert!(s.get_ref().healthy_peers <= s.get_ref().peers);
            }
            stats.map(drop)
        }
        Call::Tick(ms) => {
            tokio::time::advance(Duration::from_millis(ms)).await;
            h.registry.expire().await.unwrap();
            Ok(())
        }
    };
    match outcome {
        Ok(()) => {
            if let Some(id) = caller(call) {
                model
                    .renewed
                    .insert(id.to_owned(), tokio::time::Instant::now());
            }
            if let Call::Deregister(r) = call {
                model.renewed.remove(&r.peer_id);
            }
        }
        Err((call, status)) => check_refusal(&call, &status)?,
    }
    Ok(())
}

fn run_sequence(calls: Vec<Call>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let h = Harness::new();
        let mut model = Model::default();
        for call in &calls {
            run(&h, &mut model, call).await?;
        }
        // The listing and the figures agree at the end too.
        run(&h, &mut model, &Call::ListPeers).await
    })
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn fuzz_control_plane_and_admin_handlers_keep_their_invariants(
        calls in prop::collection::vec(call(), 1..48),
    ) {
        run_sequence(calls)?;
    }

    /// A registered fleet holding every blob first (p0..p2 complete, p3 in
    /// part), so that later calls reach deeper states: bans, drains, reports
    /// and lapses among providers.
    #[test]
    fn fuzz_handlers_on_a_registered_fleet(
        calls in prop::collection::vec(call(), 1..32),
    ) {
        let mut all: Vec<Call> = (0..4)
            .map(|i| Call::Register(pb::RegisterRequest {
                peer_id: format!("p{i}"),
                address: format!("127.0.0.1:{}", 9000 + i),
                zone: String::new(),
                labels: Default::default(),
            }))
            .collect();
        for i in 0..4 {
            all.push(Call::Announce(pb::AnnounceRequest {
                peer_id: format!("p{i}"),
                blobs: (0..3)
                    .map(|b| pb::BlobAnnouncement {
                        id: BLOBS[b].to_owned(),
                        size: SIZES[b],
                        sha256: if b < 2 { SHAS[b].to_owned() } else { String::new() },
                        complete: i < 3,
                        chunks: vec![0b101; 13].into(),
                    })
                    .collect(),
                removed: Vec::new(),
                full_inventory: true,
            }));
        }
        all.extend(calls);
        run_sequence(all)?;
    }
}
