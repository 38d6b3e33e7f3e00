//! Attacks on what a fetch returns (issue 10): each test plays the attacker
//! with a raw gRPC client or relay in this process against real daemons, and
//! checks that the attack fails while honest traffic is unaffected.

use std::{net::SocketAddr, time::Duration};

use nebula_proto::v1::{
    self as pb,
    control_plane_client::ControlPlaneClient,
    control_plane_server::{ControlPlane, ControlPlaneServer},
};
use sha2::Digest as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, transport::Channel};

use crate::{
    daemon::fetch_report,
    support::{BIN, Daemon, RawPeer, TestCluster, file_id, random_file, wait_output},
};

const MIB: usize = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client(url: &str) -> ControlPlaneClient<Channel> {
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    ControlPlaneClient::new(channel)
}

fn sha256_hex(path: &std::path::Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// The made-up peer `mallory`, registered (the join token is all it needs).
async fn mallory(url: &str) -> RawPeer {
    RawPeer::register(url, "mallory", "127.0.0.1:9")
        .await
        .unwrap()
}

/// A made-up peer registers and claims `id` under `sha256` (it holds nothing).
async fn claim_alias(url: &str, id: &str, size: u64, sha256: &str) {
    let mut c = mallory(url).await.client;
    c.announce(pb::AnnounceRequest {
        peer_id: "mallory".into(),
        blobs: vec![pb::BlobAnnouncement {
            id: id.into(),
            size,
            sha256: sha256.into(),
            complete: true,
            chunks: Default::default(),
        }],
        removed: Vec::new(),
        full_inventory: true,
    })
    .await
    .unwrap();
}

/// Row 1: a join-token holder claims another blob under a real blob's
/// SHA-256. The alias is not overwritten, and where a false alias is all
/// there is, the fetch checks the SHA-256 and fails instead of returning
/// other bytes.
#[test]
fn trust_a_false_sha256_alias_never_yields_other_bytes() {
    let rt = runtime();
    let c = TestCluster::start(BIN, 3);
    let (real, other) = (c.path("real.bin"), c.path("other.bin"));
    let real_id = random_file(&real, 3 * MIB, 41).to_string();
    let other_id = random_file(&other, 2 * MIB, 42).to_string();
    let (real_sha, other_sha) = (sha256_hex(&real), sha256_hex(&other));

    // The honest blob is announced first; the claim comes after it.
    c.daemons[0].add(&real);
    c.daemons[1].add(&other);
    assert!(c.wait_providers(&real_id, 1) && c.wait_providers(&other_id, 1));
    rt.block_on(claim_alias(
        &c.control.url(),
        &other_id,
        2 * MIB as u64,
        &real_sha,
    ));
    let out = c.path("by-digest.bin");
    let report = fetch_report(&wait_output(
        c.daemons[2].spawn_fetch(&format!("sha256:{real_sha}"), &out),
        Duration::from_secs(60),
    ));
    assert_eq!(report["id"], real_id.as_str());
    assert_eq!(
        file_id(&out).to_string(),
        real_id,
        "other bytes under the digest"
    );
    assert!(
        c.control
            .proc
            .log_text()
            .contains("conflicting sha256 alias refused"),
        "the refused claim was not recorded"
    );

    // A digest nobody honest claimed yet: the liar's claim comes first, then
    // a real holder of that blob announces it. The fetch gets the bytes,
    // checks their SHA-256 and fails: exit 1, nothing at the output.
    let third = c.path("third.bin");
    let third_id = random_file(&third, MIB, 43).to_string();
    let unheld_sha = hex::encode(sha2::Sha256::digest(b"a blob nobody has"));
    rt.block_on(claim_alias(
        &c.control.url(),
        &third_id,
        MIB as u64,
        &unheld_sha,
    ));
    c.daemons[1].add(&third);
    assert!(c.wait_providers(&third_id, 2));
    let out = c.path("false-digest.bin");
    let done = wait_output(
        c.daemons[2].spawn_fetch(&format!("sha256:{unheld_sha}"), &out),
        Duration::from_secs(60),
    );
    assert_eq!(done.status.code(), Some(1), "a false alias was accepted");
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(
        err.starts_with("error:") && err.contains("alias is false"),
        "{err}"
    );
    assert!(!out.exists(), "something was left at the output");
    // Honest digests still work from the same daemon.
    let ok = c.path("other-by-digest.bin");
    fetch_report(&wait_output(
        c.daemons[2].spawn_fetch(&format!("sha256:{other_sha}"), &ok),
        Duration::from_secs(60),
    ));
    assert_eq!(file_id(&ok).to_string(), other_id);
}

/// A call passed on with its metadata (the caller's credential).
fn forward<T>(r: Request<T>) -> Request<T> {
    let (metadata, _, message) = r.into_parts();
    Request::from_parts(metadata, Default::default(), message)
}

/// A relay between a daemon and its control plane that forwards every call
/// but asks FindProviders about `swap_to` instead (a tampering middlebox).
struct SwappingRelay {
    upstream: ControlPlaneClient<Channel>,
    swap_to: String,
}

#[tonic::async_trait]
impl ControlPlane for SwappingRelay {
    async fn register(
        &self,
        r: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.upstream.clone().register(forward(r)).await
    }
    async fn heartbeat(
        &self,
        r: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.upstream.clone().heartbeat(forward(r)).await
    }
    async fn announce(
        &self,
        r: Request<pb::AnnounceRequest>,
    ) -> Result<Response<pb::AnnounceResponse>, Status> {
        self.upstream.clone().announce(forward(r)).await
    }
    async fn find_providers(
        &self,
        r: Request<pb::FindProvidersRequest>,
    ) -> Result<Response<pb::FindProvidersResponse>, Status> {
        let mut req = forward(r);
        req.get_mut().blob = self.swap_to.clone();
        self.upstream.clone().find_providers(req).await
    }
    async fn report_peer(
        &self,
        r: Request<pb::ReportPeerRequest>,
    ) -> Result<Response<pb::ReportPeerResponse>, Status> {
        self.upstream.clone().report_peer(forward(r)).await
    }
    async fn deregister(
        &self,
        r: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.upstream.clone().deregister(forward(r)).await
    }
    async fn resolve_url(
        &self,
        r: Request<pb::ResolveUrlRequest>,
    ) -> Result<Response<pb::ResolveUrlResponse>, Status> {
        self.upstream.clone().resolve_url(forward(r)).await
    }
    async fn record_url(
        &self,
        r: Request<pb::RecordUrlRequest>,
    ) -> Result<Response<pb::RecordUrlResponse>, Status> {
        self.upstream.clone().record_url(forward(r)).await
    }
}

/// Row 2: a relay rewrites discovery to name another blob. The downloader
/// works only on the id it was asked for: the fetch fails, no other bytes
/// reach the output, and the same fetch through the real control plane works.
#[test]
fn trust_a_discovery_answer_about_another_blob_is_refused() {
    let rt = runtime();
    let c = TestCluster::start(BIN, 2);
    let (wanted, decoy) = (c.path("wanted.bin"), c.path("decoy.bin"));
    let wanted_id = random_file(&wanted, 2 * MIB, 44).to_string();
    let decoy_id = random_file(&decoy, 2 * MIB, 45).to_string();
    c.daemons[0].add(&wanted);
    c.daemons[1].add(&decoy);
    assert!(c.wait_providers(&wanted_id, 1) && c.wait_providers(&decoy_id, 1));

    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let relay_addr: SocketAddr = listener.local_addr().unwrap();
    let relay = SwappingRelay {
        upstream: rt.block_on(async { client(&c.control.url()) }),
        swap_to: decoy_id.clone(),
    };
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(ControlPlaneServer::new(relay))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let victim = Daemon::start(
        BIN,
        c.dir.path(),
        "victim",
        &format!("http://{relay_addr}"),
        &[],
        &[],
    );
    victim.wait_registered();
    let out = c.path("out.bin");
    let done = wait_output(
        victim.spawn_fetch(&wanted_id, &out),
        Duration::from_secs(60),
    );
    assert_eq!(done.status.code(), Some(1), "the swapped answer was used");
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(err.contains("answered about blob"), "{err}");
    assert!(!out.exists(), "bytes reached the output");
    let held = victim.cli(&["ls", "--json"]);
    assert!(
        !String::from_utf8_lossy(&held.stdout).contains(&decoy_id),
        "the decoy was downloaded"
    );
    // Honest traffic: the same fetch on a daemon of the real control plane.
    let ok = c.path("ok.bin");
    fetch_report(&wait_output(
        c.daemons[1].spawn_fetch(&wanted_id, &ok),
        Duration::from_secs(60),
    ));
    assert_eq!(file_id(&ok).to_string(), wanted_id);
}

/// Sends and receives raw message bytes: an attacker's codec.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = Status;

    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, Status> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len)))
    }
}

/// Opens an exchange stream to `addr`, sends `messages` as they are, and
/// returns how the stream ended.
async fn raw_exchange(
    addr: SocketAddr,
    peer: &RawPeer,
    messages: Vec<bytes::Bytes>,
) -> Result<(), Status> {
    use prost::Message as _;
    let channel = dial(addr).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/nebula.v1.PeerExchange/Exchange");
    // Keep the request stream open: the answer must come from the server.
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    tx.send(peer.hello().encode_to_vec().into()).await.unwrap();
    for m in messages {
        tx.send(m).await.unwrap();
    }
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("nebula-credential", peer.credential.parse().unwrap());
    let mut answers = grpc.streaming(request, path, RawCodec).await?.into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        // Bounded: the server answers nothing to these but the final status.
        for _ in 0..100 {
            match answers.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(status) => return Err(status),
            }
        }
        Ok(())
    })
    .await
    .expect("the stream neither answered nor ended");
    drop(tx);
    ended
}

/// Row 14: input the exchange cannot read ends the stream with an error
/// status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED), never a clean end, and the
/// daemon goes on serving.
#[test]
fn trust_unreadable_exchange_input_gets_an_error_status() {
    use prost::Message as _;
    let rt = runtime();
    let c = TestCluster::start(BIN, 2);
    let id = seed(&c, 2 * MIB, 46);
    let target = c.daemons[0].addr;
    let m = rt.block_on(mallory(&c.control.url()));

    // A truncated varint: not a protobuf message.
    let garbage = bytes::Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff]);
    let ended = rt.block_on(raw_exchange(target, &m, vec![garbage]));
    let status = ended.expect_err("undecodable input ended the stream with OK");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // Over the message size limit: 2 million chunk indexes (~6 MB).
    let huge = pb::ExchangeRequest {
        request_id: 1,
        kind: Some(pb::exchange_request::Kind::GetChunks(pb::GetChunks {
            blob: id.clone(),
            chunks: (0..2_000_000).collect(),
            ..pb::GetChunks::default()
        })),
    };
    let ended = rt.block_on(raw_exchange(target, &m, vec![huge.encode_to_vec().into()]));
    let status = ended.expect_err("oversized input ended the stream with OK");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // Honest traffic is unaffected.
    let out = c.path("out.bin");
    fetch_report(&wait_output(
        c.daemons[1].spawn_fetch(&id, &out),
        Duration::from_secs(60),
    ));
    assert_eq!(file_id(&out).to_string(), id);
}

/// Opens a typed exchange stream to `addr`; returns the sender for requests
/// and the stream of answers.
async fn exchange_stream(
    addr: SocketAddr,
    peer: &RawPeer,
) -> (
    tokio::sync::mpsc::Sender<pb::ExchangeRequest>,
    tonic::Streaming<pb::ExchangeResponse>,
) {
    let channel = dial(addr).await;
    let mut client = pb::peer_exchange_client::PeerExchangeClient::new(channel)
        .max_decoding_message_size(8 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tx.send(peer.hello()).await.unwrap();
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("nebula-credential", peer.credential.parse().unwrap());
    let answers = client.exchange(request).await.unwrap().into_inner();
    (tx, answers)
}

fn get_chunks(request_id: u64, blob: &str, chunks: Vec<u32>) -> pb::ExchangeRequest {
    pb::ExchangeRequest {
        request_id,
        kind: Some(pb::exchange_request::Kind::GetChunks(pb::GetChunks {
            blob: blob.into(),
            chunks,
            ..pb::GetChunks::default()
        })),
    }
}

/// Rows 6 and 7: a client that asks for 64 chunks and never reads holds at
/// most its stream's share of the upload slots, and only until its stream is
/// found stalled; an honest fetch from the same daemon meanwhile completes.
/// A request naming 100,000 chunks is refused, not queued.
#[test]
fn trust_a_receiver_that_never_reads_cannot_hold_every_upload_slot() {
    let rt = runtime();
    let c = TestCluster::start(BIN, 2);
    let id = seed(&c, 8 * MIB, 47);
    let target = c.daemons[0].addr;

    // The hog: 64 one-chunk requests on one stream, and it never reads.
    let attacker = rt.block_on(mallory(&c.control.url()));
    let (hog, _unread) = rt.block_on(exchange_stream(target, &attacker));
    for n in 0..64u64 {
        rt.block_on(hog.send(get_chunks(n + 1, &id, vec![(n % 8) as u32])))
            .unwrap();
    }
    // Past its share the stream's requests are refused busy at once: of 64,
    // at most 32 hold a slot at a time, and only the few chunks that fit in
    // the HTTP/2 buffers before the stream stalls finish and free theirs.
    let busy = r#"nebula_exchange_refusals_total{answer="busy"}"#;
    let answered = crate::support::wait_until(Duration::from_secs(10), || {
        c.daemons[0].proc.metrics().get(busy) >= 24.0
    });
    let m = c.daemons[0].proc.metrics();
    assert!(answered, "{} busy refusals", m.get(busy));
    assert!(
        m.get("nebula_uploads_active") <= 32.0,
        "one stream holds {} upload slots",
        m.get("nebula_uploads_active")
    );

    // Honest traffic gets through while the hog sits there (bounded wait).
    let out = c.path("out.bin");
    let done = wait_output(c.daemons[1].spawn_fetch(&id, &out), Duration::from_secs(30));
    fetch_report(&done);
    assert_eq!(file_id(&out).to_string(), id);

    // A flood of indexes in one request is answered with an error at once.
    let (tx, mut answers) = rt.block_on(exchange_stream(target, &attacker));
    rt.block_on(tx.send(get_chunks(7, &id, (0..100_000).collect())))
        .unwrap();
    let first = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), answers.message()).await })
        .expect("no answer to the flood")
        .expect("the stream failed")
        .expect("the stream ended");
    match first.kind {
        Some(pb::exchange_response::Kind::Error(e)) => {
            assert_eq!(e.code, pb::error::Code::Invalid as i32, "{e:?}");
            assert!(e.message.contains("at most"), "{e:?}");
        }
        other => panic!("the flood was served: {other:?}"),
    }
    // The stalled hog is dropped within the stall timeout: its slots come back.
    let mut active = f64::MAX;
    let freed = crate::support::wait_until(Duration::from_secs(15), || {
        active = c.daemons[0].proc.metrics().get("nebula_uploads_active");
        active == 0.0
    });
    assert!(freed, "a stalled stream still holds {active} slots");
    drop(hog);
}

/// Starts `nebula daemon` on `store` expecting it to refuse; returns stderr.
fn daemon_refuses(store: &std::path::Path) -> String {
    let mut cmd = crate::support::nebula();
    cmd.args([
        "daemon",
        "--control",
        "http://127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
    ])
    .arg("--store")
    .arg(store);
    let out = crate::support::run_bounded(cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "the daemon started: {err}");
    err
}

/// Row 13: a store other users can write to is refused; a link planted where
/// the store keeps its own files is refused, never followed; a data file
/// changed behind the store's back is caught by the export, which leaves
/// nothing at the output; the socket is private from the moment it exists.
#[test]
fn trust_store_plants_and_swaps_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();

    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = daemon_refuses(&open);
    assert!(
        err.starts_with("error:") && err.contains("writable by other users"),
        "{err}"
    );

    let planted = dir.path().join("planted");
    std::fs::create_dir(&planted).unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, planted.join("peer-id")).unwrap();
    let err = daemon_refuses(&planted);
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    std::fs::remove_file(planted.join("peer-id")).unwrap();
    std::fs::remove_dir(planted.join("blobs")).unwrap();
    std::os::unix::fs::symlink(dir.path(), planted.join("blobs")).unwrap();
    let err = daemon_refuses(&planted);
    assert!(err.contains("symbolic link"), "{err}");

    // A healthy daemon: its store is private, its socket 0600.
    let c = TestCluster::start(BIN, 1);
    let d = &c.daemons[0];
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.socket), 0o600);
    assert_eq!(mode(&d.store.join("blobs")), 0o700);
    let src = c.path("src.bin");
    let id = random_file(&src, 3 * MIB, 48).to_string();
    d.add(&src);
    let out = c.path("good.bin");
    let ok = d.cli(&["fetch", &id, "-o", out.to_str().unwrap()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(file_id(&out).to_string(), id);
    // Flip a byte of the stored data in place.
    let data = d.store.join("blobs").join(&id).join("data");
    let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"\x00\x01\x02\x03", MIB as u64 + 7).unwrap();
    drop(file);
    let out = c.path("swapped.bin");
    let bad = d.cli(&["fetch", &id, "-o", out.to_str().unwrap()]);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "a changed data file was exported"
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("fails verification"), "{err}");
    assert!(!out.exists(), "something was left at the output");
    let leftovers: Vec<_> = std::fs::read_dir(c.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".nebula-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Row 11: a join-token holder floods the control plane with made-up
/// announcements, partly held ones with full chunk bitmaps and whole ones.
/// Past the per-peer caps every announce is refused whole with
/// `RESOURCE_EXHAUSTED` naming the flag, the control plane's memory stays
/// within a small budget (uncapped, this flood is some 300 MiB), and honest
/// peers announce and fetch as before.
#[test]
fn trust_an_inventory_flood_is_capped() {
    let rt = runtime();
    let c = TestCluster::start(BIN, 2);
    let url = c.control.url();
    let pid = c.control.proc.pid();
    let before = rss_kib(pid);
    let made_up = |round: u32, i: u32| {
        hex::encode(blake3::hash(&[round, i].map(u32::to_le_bytes).concat()).as_bytes())
    };
    let (accepted, refusals) = rt.block_on(async {
        let mut m = mallory(&url).await.client;
        let started = std::time::Instant::now();
        let (mut accepted, mut refusals) = (0u32, Vec::new());
        // 40 rounds of 500 partly held 8 GiB blobs (1 KiB bitmaps each),
        // then 20 rounds of 20,000 whole ones; bounded in time too.
        for round in 0..60u32 {
            if started.elapsed() > Duration::from_secs(90) {
                break;
            }
            let partial = round < 40;
            let n = if partial { 500 } else { 20_000 };
            let blobs = (0..n)
                .map(|i| pb::BlobAnnouncement {
                    id: made_up(round, i),
                    size: if partial { 8 << 30 } else { 1 << 20 },
                    sha256: String::new(),
                    complete: !partial,
                    chunks: if partial {
                        bytes::Bytes::from(vec![0x55; 1024])
                    } else {
                        Default::default()
                    },
                })
                .collect();
            let ann = pb::AnnounceRequest {
                peer_id: "mallory".into(),
                blobs,
                removed: Vec::new(),
                full_inventory: false,
            };
            match m.announce(ann).await {
                Ok(_) => accepted += 1,
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                    refusals.push(s.message().to_owned());
                }
            }
        }
        (accepted, refusals)
    });
    // 2 partial rounds (1,000 of at most 1,024) and 4 whole rounds (81,000
    // blobs in all, of at most 100,000) were taken; the rest refused by the
    // cap its message names.
    assert_eq!(accepted, 6, "{refusals:?}");
    assert_eq!(refusals.len(), 54);
    assert!(
        refusals[..38]
            .iter()
            .all(|m| m.contains("--max-peer-partial")),
        "{refusals:?}"
    );
    assert!(
        refusals[38..]
            .iter()
            .all(|m| m.contains("--max-peer-blobs")),
        "{refusals:?}"
    );
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 96 * 1024, "the control plane grew by {grown} KiB");

    // Honest peers are unaffected.
    let id = seed(&c, 4 * MIB, 53);
    let out = c.path("out.bin");
    let done = wait_output(c.daemons[1].spawn_fetch(&id, &out), Duration::from_secs(30));
    fetch_report(&done);
    assert_eq!(file_id(&out).to_string(), id);
}

/// CPU time a process has used, in clock ticks (user and system).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which may hold spaces: state is the first.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Row 10: silent TCP connections by the hundred, past the daemon's file
/// descriptor limit. While it is out of descriptors the daemon does not spin
/// (accept backs off), every silent connection is closed after the handshake
/// timeout, and the daemon answers its CLI and serves fetches as before.
#[test]
fn trust_silent_connections_are_closed_and_accept_backs_off() {
    use std::io::Read;
    let c = TestCluster::start_with(BIN, 2, |i| {
        let flags = if i == 0 {
            vec!["--handshake-timeout", "2s"]
        } else {
            Vec::new()
        };
        (flags, Vec::new())
    });
    let id = seed(&c, 4 * MIB, 59);
    let (pid, addr) = (c.daemons[0].proc.pid(), c.daemons[0].addr);
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=200:200"])
        .status()
        .unwrap();
    assert!(limited.success(), "prlimit failed");

    // 400 silent connections: more than the daemon has descriptors for.
    let conns: Vec<std::net::TcpStream> = (0..400)
        .map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop burns a whole core: 100 ticks a second.
    assert!(
        used < 40,
        "the daemon used {used} ticks in 1 s while out of descriptors"
    );

    // Each is closed by the daemon: accepted as descriptors free up, then
    // dropped at the handshake timeout (after the server's own greeting).
    let mut closed = 0;
    for mut conn in conns {
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 256];
        for _ in 0..64 {
            match conn.read(&mut buf) {
                Ok(0) => {}
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("a silent connection was not closed: {e}"),
            }
            closed += 1;
            break;
        }
    }
    assert_eq!(closed, 400);

    // Honest traffic is unaffected.
    let status = c.daemons[0].status();
    assert_eq!(status["registered"], true, "{status}");
    let out = c.path("out.bin");
    let done = wait_output(c.daemons[1].spawn_fetch(&id, &out), Duration::from_secs(30));
    fetch_report(&done);
    assert_eq!(file_id(&out).to_string(), id);
}

/// Rows 7 and 10: connections that hold a place and make no call. One
/// address holds at most `--connections-per-address` connections to a daemon
/// (more are closed as they are accepted), and an HTTP/2 connection with no
/// call open is closed after `--idle-timeout`, however often it pings; the
/// same client stays connected to a daemon with the default timeout. A call
/// kept open past the idle timeout is not cut, places come back as
/// connections close, and peers from other addresses fetch as before.
#[test]
fn trust_idle_and_excess_connections_are_closed() {
    let rt = runtime();
    let c = TestCluster::start_with(BIN, 2, |i| {
        let flags = if i == 0 {
            vec!["--idle-timeout", "2s", "--connections-per-address", "8"]
        } else {
            Vec::new()
        };
        (flags, Vec::new())
    });
    let id = seed(&c, 2 * MIB, 61);
    let (target, other) = (c.daemons[0].addr, c.daemons[1].addr);
    let m = rt.block_on(mallory(&c.control.url()));
    rt.block_on(async {
        // 20 HTTP/2 connections from 127.0.0.9: 8 are kept, 12 closed at once.
        let mut kept = Vec::new();
        let mut refused = 0;
        for _ in 0..20 {
            let mut conn = h2_from("127.0.0.9", target).await;
            if server_speaks(&mut conn).await {
                kept.push(conn);
            } else {
                refused += 1;
            }
        }
        assert_eq!((kept.len(), refused), (8, 12));

        // A call opened now and kept open past the idle timeout still works.
        let call = tokio::spawn(late_chunk(target, m.credential.clone(), id.clone()));

        // Pinging, the 8 are closed by the idle timeout; the same client at
        // the daemon with the default timeout stays connected.
        let mut control = h2_from("127.0.0.9", other).await;
        assert!(server_speaks(&mut control).await);
        let mut open = kept;
        for _ in 0..60 {
            let mut still = Vec::new();
            for mut conn in open {
                if still_open(&mut conn).await {
                    still.push(conn);
                }
            }
            open = still;
            if open.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(open.len(), 0, "idle connections were kept past 15 s");
        assert!(
            still_open(&mut control).await,
            "a daemon with the default idle timeout closed a pinging connection"
        );

        // The places came back: the same address connects again.
        let mut again = h2_from("127.0.0.9", target).await;
        assert!(server_speaks(&mut again).await);

        let piece = call.await.unwrap();
        assert_eq!(piece.chunk, 0);
    });
    honest_fetch_works(&c, 1, &id);
}

/// A TCP connection from `source` to `target` that has sent the HTTP/2
/// preface and its (empty) settings.
async fn h2_from(source: &str, target: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut conn = socket.connect(target).await.unwrap();
    let mut greeting = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // A SETTINGS frame with no settings: length 0, type 4, stream 0.
    greeting.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // The server may already have closed it; reading tells.
    let _ = conn.write_all(&greeting).await;
    conn
}

/// Whether the server answers `conn`'s greeting (true) or closes it (false).
/// A server that speaks gets its settings acknowledged.
async fn server_speaks(conn: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("the server neither answered nor closed within 5 s");
    match read {
        Ok(n) if n > 0 => {
            // SETTINGS with the ACK flag.
            conn.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.is_ok()
        }
        _ => false,
    }
}

/// Sends `conn` a PING and reads what the server sends for 100 ms: false
/// once the server has closed it.
async fn still_open(conn: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PING: [u8; 17] = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    if conn.write_all(&PING).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(100), conn.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return false,
            Ok(Ok(_)) => {}
            Err(_) => return true,
        }
    }
    true
}

/// Opens an exchange stream to `target` as a member, says Hello, waits 3 s
/// (past a 2 s idle timeout) and asks for chunk 0 of `id`: its first piece.
async fn late_chunk(target: SocketAddr, credential: String, id: String) -> pb::ChunkPiece {
    let mut client = pb::peer_exchange_client::PeerExchangeClient::new(dial(target).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello_as("mallory")).await.unwrap();
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("nebula-credential", credential.parse().unwrap());
    let mut answers = client.exchange(request).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tx.send(get_chunks(1, &id, vec![0])).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("no answer within 10 s")
        .expect("the stream kept open past the idle timeout failed");
    match answer.and_then(|a| a.kind) {
        Some(pb::exchange_response::Kind::Piece(piece)) => piece,
        other => panic!("expected a piece, got {other:?}"),
    }
}

/// A connection to the daemon serving at `addr`.
async fn dial(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap()
}

/// Adds a random blob of `size` bytes to `c`'s first daemon and waits until
/// the control plane offers it; its id.
fn seed(c: &TestCluster, size: usize, seed: u64) -> String {
    let src = c.path("src.bin");
    let id = random_file(&src, size, seed).to_string();
    c.daemons[0].add(&src);
    assert!(c.wait_providers(&id, 1));
    id
}

/// The providers the control plane at `url` offers for `id` (none on error).
fn offered(rt: &tokio::runtime::Runtime, url: &str, id: &str) -> Vec<pb::Provider> {
    rt.block_on(async {
        RawPeer::client(url, None)
            .find_providers(pb::FindProvidersRequest {
                blob: id.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().providers)
            .unwrap_or_default()
    })
}

/// Daemon `i` of `c` still fetches `id`, byte for byte.
fn honest_fetch_works(c: &TestCluster, i: usize, id: &str) {
    let out = c.path(&format!("honest-{i}.bin"));
    fetch_report(&wait_output(
        c.daemons[i].spawn_fetch(id, &out),
        Duration::from_secs(60),
    ));
    assert_eq!(file_id(&out).to_string(), id);
}

/// An exchange stream opened with `credential` (if any) that sends
/// `messages` as they are: what its answers end with.
async fn exchange_as(
    addr: SocketAddr,
    credential: Option<&str>,
    messages: Vec<pb::ExchangeRequest>,
) -> Result<Vec<pb::ExchangeResponse>, Status> {
    let channel = dial(addr).await;
    let mut client = pb::peer_exchange_client::PeerExchangeClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for m in messages {
        tx.send(m).await.unwrap();
    }
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(c) = credential {
        request
            .metadata_mut()
            .insert("nebula-credential", c.parse().unwrap());
    }
    let mut answers = client.exchange(request).await?.into_inner();
    let mut got = Vec::new();
    // Bounded: a few answers, or the stream's end, within 10 s.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while got.len() < 4 {
            match answers.message().await? {
                Some(m) => got.push(m),
                None => break,
            }
        }
        Ok::<_, Status>(())
    })
    .await;
    drop(tx);
    match end {
        Ok(result) => result.map(|()| got),
        Err(_) => Ok(got),
    }
}

fn hello_as(peer_id: &str) -> pb::ExchangeRequest {
    pb::ExchangeRequest {
        request_id: 0,
        kind: Some(pb::exchange_request::Kind::Hello(pb::Hello {
            peer_id: peer_id.into(),
            address: String::new(),
        })),
    }
}

/// Row 3: PeerExchange serves only fleet members. A stream with no
/// credential, a credential signed by another key, no Hello first, a Hello
/// naming another peer, or a second Hello gets no chunk, only an error
/// status; a member (even a made-up one, holding the join token) is served,
/// and honest fetches go on.
#[test]
fn trust_only_fleet_members_get_chunks() {
    let rt = runtime();
    let c = TestCluster::start(BIN, 2);
    let id = seed(&c, 2 * MIB, 48);
    let target = c.daemons[0].addr;
    let m = rt.block_on(mallory(&c.control.url()));
    let forged = nebula_common::credential::SigningKey::generate().issue(
        "mallory",
        "127.0.0.1:9",
        Duration::from_secs(600),
    );
    let ask = get_chunks(1, &id, vec![0]);
    let refused = |credential: Option<&str>, messages: Vec<pb::ExchangeRequest>| {
        let answer = rt.block_on(exchange_as(target, credential, messages));
        match answer {
            Err(status) => status,
            Ok(got) => panic!("served: {got:?}"),
        }
    };
    for (what, status) in [
        (
            "no credential",
            refused(None, vec![hello_as("mallory"), ask.clone()]),
        ),
        (
            "a credential of another key",
            refused(Some(&forged), vec![hello_as("mallory"), ask.clone()]),
        ),
        (
            "no Hello first",
            refused(Some(&m.credential), vec![ask.clone()]),
        ),
        (
            "a Hello naming another peer",
            refused(Some(&m.credential), vec![hello_as("d1"), ask.clone()]),
        ),
    ] {
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{what}: {status:?}"
        );
    }
    let twice = refused(
        Some(&m.credential),
        vec![hello_as("mallory"), hello_as("mallory"), ask.clone()],
    );
    assert_eq!(twice.code(), tonic::Code::InvalidArgument, "{twice:?}");

    // A member is served: the first answer is a piece of chunk 0.
    let served = rt
        .block_on(exchange_as(
            target,
            Some(&m.credential),
            vec![hello_as("mallory"), ask],
        ))
        .unwrap();
    assert!(
        matches!(
            served.first().and_then(|a| a.kind.as_ref()),
            Some(pb::exchange_response::Kind::Piece(p)) if p.chunk == 0
        ),
        "{served:?}"
    );
    honest_fetch_works(&c, 1, &id);
}

/// Row 4: a join-token holder cannot act as another peer. Heartbeats,
/// announcements, deregistration and URL calls for the victim's id are
/// refused (with its own credential, another's, or none); registering the
/// victim's id at another address is refused, and so is an address that is
/// not the caller's own. The victim stays where it is and serves.
#[test]
fn trust_a_peer_id_is_bound_to_its_credential() {
    let rt = runtime();
    let c = TestCluster::start(BIN, 2);
    let url = c.control.url();
    let victim = c.daemons[0].status()["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let victim_addr = c.daemons[0].addr.to_string();
    let id = seed(&c, 2 * MIB, 49);

    let codes = rt.block_on(async {
        let mut m = mallory(&url).await.client;
        let mut anonymous = RawPeer::client(&url, None);
        let mut codes = Vec::new();
        let load = pb::Load {
            active_uploads: 0,
            upload_bytes_per_sec: u64::MAX,
            upload_slots: u32::MAX,
        };
        for client in [&mut m, &mut anonymous] {
            let beat = pb::HeartbeatRequest {
                peer_id: victim.clone(),
                load: Some(load),
            };
            codes.push((
                "heartbeat",
                client.heartbeat(beat).await.unwrap_err().code(),
            ));
            let ann = pb::AnnounceRequest {
                peer_id: victim.clone(),
                full_inventory: true,
                ..Default::default()
            };
            codes.push(("announce", client.announce(ann).await.unwrap_err().code()));
            let bye = pb::DeregisterRequest {
                peer_id: victim.clone(),
            };
            codes.push((
                "deregister",
                client.deregister(bye).await.unwrap_err().code(),
            ));
            let url_call = pb::ResolveUrlRequest {
                peer_id: victim.clone(),
                url: "http://127.0.0.1:1/x".into(),
                refresh: false,
            };
            codes.push((
                "resolve_url",
                client.resolve_url(url_call).await.unwrap_err().code(),
            ));
            // Moving the victim's id to the attacker's address.
            let steal = pb::RegisterRequest {
                peer_id: victim.clone(),
                address: "127.0.0.1:9".into(),
                ..Default::default()
            };
            codes.push(("register", client.register(steal).await.unwrap_err().code()));
        }
        // An address that is not the caller's own.
        let foreign = pb::RegisterRequest {
            peer_id: "elsewhere".into(),
            address: "127.0.0.2:9".into(),
            ..Default::default()
        };
        codes.push(("foreign", m.register(foreign).await.unwrap_err().code()));
        codes
    });
    for (call, code) in codes {
        assert!(
            matches!(
                code,
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ),
            "{call}: {code:?}"
        );
    }
    // The victim is still registered at its own address and serves.
    let peers = c.control.swarm_members(&id);
    assert_eq!(peers, 1);
    let listed = offered(&rt, &url, &id);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].peer_id, victim);
    assert_eq!(listed[0].address, victim_addr);
    honest_fetch_works(&c, 1, &id);
}

/// Row 4, the honest side: a daemon killed and started again on another port
/// while its lease is alive moves its own peer id there at once, with the
/// credential it keeps in its store, and serves from the new address.
#[test]
fn trust_a_restarted_daemon_moves_its_own_id_with_its_credential() {
    let rt = runtime();
    let mut c = TestCluster::start(BIN, 2);
    let id = seed(&c, 2 * MIB, 52);
    let peer = c.daemons[0].status()["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let old = c.daemons[0].addr;
    c.daemons[0].restart_on("127.0.0.1:0".parse().unwrap());
    assert_ne!(c.daemons[0].addr, old);
    c.daemons[0].wait_registered();
    let url = c.control.url();
    let moved = crate::support::wait_until(Duration::from_secs(10), || {
        offered(&rt, &url, &id)
            .iter()
            .any(|p| p.peer_id == peer && p.address == c.daemons[0].addr.to_string())
    });
    assert!(moved, "{:?}", offered(&rt, &url, &id));
    let log = c.daemons[0].proc.log_text();
    assert!(!log.contains("cannot register"), "{log}");
    honest_fetch_works(&c, 1, &id);
}

/// Row 5: made-up peers cannot quarantine an honest one. Their reports are
/// refused until discovery has sent them to it; one reporter's flood is
/// rate-limited; and the quarantine two colluders can then cause lapses
/// on its own (here after 3 s), so the honest peer serves again.
#[test]
fn trust_made_up_reports_neither_count_nor_last() {
    let rt = runtime();
    let c = TestCluster::start_flagged(
        BIN,
        2,
        &["--quarantine-ttl", "3s", "--reports-per-minute", "5"],
        |_| (Vec::new(), Vec::new()),
    );
    let url = c.control.url();
    let honest = c.daemons[0].status()["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = seed(&c, 2 * MIB, 50);
    let report = |reporter: &str| pb::ReportPeerRequest {
        reporter_id: reporter.into(),
        peer_id: honest.clone(),
        blob: id.clone(),
        reason: "made up".into(),
    };
    let find = |asker: &str| pb::FindProvidersRequest {
        peer_id: asker.into(),
        blob: id.clone(),
        ..Default::default()
    };
    rt.block_on(async {
        let mut a = RawPeer::register(&url, "liar-a", "127.0.0.1:9")
            .await
            .unwrap();
        let mut b = RawPeer::register(&url, "liar-b", "127.0.0.1:10")
            .await
            .unwrap();
        // Not sent to the honest peer by discovery: the reports do not count.
        for p in [&mut a, &mut b] {
            let status = p.client.report_peer(report(&p.id)).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        }
        // One reporter cannot report as another.
        let status = a.client.report_peer(report("liar-b")).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        // A flood from one reporter is cut at its rate (5 a minute).
        let mut limited = 0;
        for _ in 0..20 {
            if let Err(s) = a.client.report_peer(report("liar-a")).await
                && s.code() == tonic::Code::ResourceExhausted
            {
                limited += 1;
            }
        }
        assert!(limited >= 15, "{limited} of 20 reports were rate-limited");

        // Colluders that asked discovery can quarantine it (two reports)…
        b.client.find_providers(find("liar-b")).await.unwrap();
        let c2 = RawPeer::register(&url, "liar-c", "127.0.0.1:11")
            .await
            .unwrap();
        let mut c2 = c2;
        c2.client.find_providers(find("liar-c")).await.unwrap();
        b.client.report_peer(report("liar-b")).await.unwrap();
        let q = c2.client.report_peer(report("liar-c")).await.unwrap();
        assert!(q.into_inner().quarantined);
    });
    assert_eq!(c.control.swarm_members(&id), 1);
    let providers = |url: &str| offered(&rt, url, &id).len();
    assert_eq!(providers(&url), 0, "a quarantined peer is still offered");
    // …but not for long: without more reports the sanction lapses.
    assert!(
        crate::support::wait_until(Duration::from_secs(15), || providers(&url) == 1),
        "the quarantine did not lapse"
    );
    honest_fetch_works(&c, 1, &id);
}

/// Row 9: the health probe checks that the peer answering is the one
/// registered. Registrations pointing at the control plane's own port or at
/// another peer's address never pass as healthy (and are not offered);
/// hostnames and other hosts' addresses are refused at registration, and
/// registrations from one source are rate-limited. Honest peers stay healthy.
#[test]
fn trust_probes_check_the_peer_and_registrations_their_source() {
    let rt = runtime();
    let c = TestCluster::start_flagged(BIN, 2, &["--registrations-per-minute", "30"], |_| {
        (Vec::new(), Vec::new())
    });
    let url = c.control.url();
    let id = seed(&c, 2 * MIB, 51);
    let own_port = c.control.addr.to_string();
    let other_peer = c.daemons[1].addr.to_string();

    let (fakes, refusals) = rt.block_on(async {
        let mut fakes = Vec::new();
        for (name, address) in [("at-control", &own_port), ("at-d1", &other_peer)] {
            let mut p = RawPeer::register(&url, name, address).await.unwrap();
            p.client
                .announce(pb::AnnounceRequest {
                    peer_id: name.into(),
                    blobs: vec![pb::BlobAnnouncement {
                        id: id.clone(),
                        size: 2 * MIB as u64,
                        complete: true,
                        ..Default::default()
                    }],
                    full_inventory: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            fakes.push(p);
        }
        let mut refusals = Vec::new();
        for address in ["localhost:22", "127.0.0.2:22", "example.com:22"] {
            let status = RawPeer::register(&url, "pointer", address)
                .await
                .unwrap_err();
            refusals.push((address, status.code()));
        }
        (fakes, refusals)
    });
    for (address, code) in refusals {
        assert_eq!(code, tonic::Code::PermissionDenied, "{address}");
    }

    // Keep the fakes' leases alive while the probes judge them.
    let alive = |fakes: &mut Vec<RawPeer>| {
        rt.block_on(async {
            for p in fakes.iter_mut() {
                let beat = pb::HeartbeatRequest {
                    peer_id: p.id.clone(),
                    load: None,
                };
                p.client.heartbeat(beat).await.unwrap();
            }
        })
    };
    let mut fakes = fakes;
    let state = |peer: &str| {
        let listed = c.control.admin_output(&["peers", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap_or_default();
        v["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["peer_id"] == peer)
            .map(|p| p["state"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    let judged = crate::support::wait_until(Duration::from_secs(15), || {
        alive(&mut fakes);
        state("at-control") == "UNHEALTHY" && state("at-d1") == "UNHEALTHY"
    });
    assert!(
        judged,
        "fakes: {} and {}",
        state("at-control"),
        state("at-d1")
    );
    let offered = offered(&rt, &url, &id);
    let ids: Vec<&str> = offered.iter().map(|p| p.peer_id.as_str()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(!ids.contains(&"at-control") && !ids.contains(&"at-d1"));
    for d in &c.daemons {
        let me = d.status()["peer_id"].as_str().unwrap().to_owned();
        assert_eq!(state(&me), "HEALTHY");
    }

    // A registration flood from one source is cut at its rate (30 a minute).
    let limited = rt.block_on(async {
        let mut limited = 0;
        for i in 0..60 {
            let id = format!("flood-{i}");
            if let Err(s) = RawPeer::register(&url, &id, "127.0.0.1:9").await
                && s.code() == tonic::Code::ResourceExhausted
            {
                limited += 1;
            }
        }
        limited
    });
    assert!(
        limited >= 25,
        "{limited} of 60 registrations were rate-limited"
    );
    honest_fetch_works(&c, 1, &id);
}

/// An Admin client over TCP whose connections come from `from` (any
/// 127.x.y.z address is this host's: any local user can pick one).
fn raw_admin(control: SocketAddr, from: &str) -> pb::admin_client::AdminClient<Channel> {
    let channel = Channel::from_shared(format!("http://{control}"))
        .unwrap()
        .local_address(Some(from.parse().unwrap()))
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    pb::admin_client::AdminClient::new(channel)
}

/// `message` with `authorization: Bearer <token>` when a token is given.
fn bearer<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut req = Request::new(message);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// Issue 10 row 12: without `--admin-token`, any local user could ban any
/// peer by calling Admin from a 127.x.y.z address. Now the admin API answers
/// on TCP only with a token; without one, only on the 0600 admin socket.
#[test]
fn trust_admin_without_a_token_answers_only_on_its_socket() {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};

    let mut c = TestCluster::start(BIN, 1);
    let victim = c.daemons[0].status()["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let state = || {
        let out = c.control.admin_output(&["peers", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["peers"][0]["state"].as_str().unwrap().to_owned()
    };
    assert_eq!(state(), "HEALTHY");

    // The attack: raw gRPC over TCP from loopback addresses, with and
    // without a made-up token.
    let rt = runtime();
    rt.block_on(async {
        for from in ["127.0.0.2", "127.0.0.1"] {
            for token in [None, Some("guess")] {
                let mut admin = raw_admin(c.control.addr, from);
                let ban = pb::PeerRequest {
                    peer_id: victim.clone(),
                    reason: "pwned".into(),
                };
                let refused = [
                    admin
                        .ban_peer(bearer(ban, token))
                        .await
                        .map(drop)
                        .unwrap_err(),
                    admin
                        .list_peers(bearer(pb::ListPeersRequest {}, token))
                        .await
                        .map(drop)
                        .unwrap_err(),
                ];
                for status in refused {
                    assert_eq!(
                        status.code(),
                        tonic::Code::PermissionDenied,
                        "{from}: {status:?}"
                    );
                    assert!(
                        status.message().contains("--admin-socket")
                            && status.message().contains("--admin-token")
                            && !status.message().contains('\n'),
                        "{status:?}"
                    );
                }
            }
        }
    });
    assert_eq!(state(), "HEALTHY", "the ban over TCP did nothing");

    // The CLI over TCP is refused the same way, in one line.
    let mut cmd = crate::support::nebula();
    cmd.args(["admin", "peers", "--control", &c.control.url()])
        .env_remove("NEBULA_ADMIN_TOKEN")
        .env_remove("NEBULA_ADMIN_SOCKET");
    let out = crate::support::run_bounded(cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error:") && err.contains("--admin-socket"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // The socket: a socket, mode 0600, and the operator's way in.
    let meta = std::fs::symlink_metadata(&c.control.admin_socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let out = c
        .control
        .admin_output(&["ban", &victim, "--reason", "operator"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(state(), "BANNED");
    let out = c.control.admin_output(&["unban", &victim]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(state(), "HEALTHY");

    // With a token, TCP admin answers from anywhere with it, and only with it.
    let dir = tempfile::tempdir().unwrap();
    let guarded = crate::support::Control::start_with(
        BIN,
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        &["--admin-token", "ops-token"],
    );
    rt.block_on(async {
        let peers = raw_admin(guarded.addr, "127.0.0.2")
            .list_peers(bearer(pb::ListPeersRequest {}, Some("ops-token")))
            .await
            .unwrap();
        assert!(peers.into_inner().peers.is_empty());
        for token in [None, Some("wrong")] {
            let ban = pb::PeerRequest {
                peer_id: "anyone".into(),
                reason: String::new(),
            };
            let status = raw_admin(guarded.addr, "127.0.0.2")
                .ban_peer(bearer(ban, token))
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        }
    });
    let mut cmd = crate::support::nebula();
    cmd.args(["admin", "stats", "--json", "--control", &guarded.url()])
        .env("NEBULA_ADMIN_TOKEN", "ops-token");
    let out = crate::support::run_bounded(cmd, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stopped cleanly, the control plane removes its socket.
    let socket = c.control.admin_socket.clone();
    c.daemons.clear();
    assert!(c.control.proc.terminate().is_some_and(|s| s.success()));
    assert!(
        !socket.exists(),
        "the admin socket outlived the control plane"
    );
}
