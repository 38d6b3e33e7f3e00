//! Fuzzing the peer's servers: a real node in this process, on a
//! loopback port and a temporary store holding two blobs, fed arbitrary
//! sequences of requests on its `PeerExchange` stream and its local API.
//!
//! What must hold: no panic (the node answers after every sequence), every
//! refusal typed and in one line, every chunk byte served is the blob's own
//! at that place, an exchange stream ends once the asker stops sending, and
//! the seeded blobs survive whatever was asked (unless removed by the local
//! API, which the harness then re-adds).
//!
//! `PROPTEST_CASES` sets the sequences per property (48 by default here);
//! see the README's testing section for running long.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use nebula_peer::{Config, Node};
use nebula_proto::v1::{
    self as pb, exchange_request::Kind as Req, exchange_response::Kind as Resp,
    local_api_client::LocalApiClient, peer_exchange_client::PeerExchangeClient,
};
use proptest::{prelude::*, test_runner::TestRunner};
use tonic::{Code, transport::Channel};

fn config(cases: u32) -> ProptestConfig {
    match std::env::var("PROPTEST_CASES") {
        Ok(_) => ProptestConfig::default(),
        Err(_) => ProptestConfig::with_cases(cases),
    }
}

/// A seeded blob: its id, its bytes and its file.
struct Seed {
    id: String,
    bytes: Vec<u8>,
    path: PathBuf,
}

/// A node with two blobs (one of 4 chunks, one empty) and its local API.
struct Fixture {
    rt: tokio::runtime::Runtime,
    node: Option<Node>,
    addr: SocketAddr,
    socket: PathBuf,
    seeds: Vec<Seed>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut seeds = Vec::new();
        for (name, len) in [("four-chunks", (3 << 20) + 5), ("empty", 0usize)] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            seeds.push(Seed {
                id: blake3::hash(&bytes).to_hex().to_string(),
                bytes,
                path,
            });
        }
        let socket = dir.path().join("store/nebula.sock");
        let (node, addr) = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut config = Config::new(dir.path().join("store"), None);
            config.idle_stream_timeout = Duration::from_secs(2);
            let mut node = Node::start(listener, config).await.unwrap();
            node.trust(&fleet().0.public());
            let (local, _) = nebula_proto::unix::bind_private(&socket).await.unwrap();
            node.serve_local(local);
            (node, addr)
        });
        let fixture = Self {
            rt,
            node: Some(node),
            addr,
            socket,
            seeds,
            dir,
        };
        fixture.reseed();
        fixture
    }

    async fn local(&self) -> LocalApiClient<Channel> {
        nebula_peer::connect_local(self.socket.clone())
            .await
            .unwrap()
    }

    /// Adds every seed (again): a sequence may have removed them.
    fn reseed(&self) {
        self.rt.block_on(async {
            let mut local = self.local().await;
            for s in &self.seeds {
                let added = local
                    .add(pb::AddRequest {
                        path: s.path.display().to_string(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(added.id, s.id);
            }
        });
    }

    /// The node still answers on both servers.
    fn alive(&self) -> Result<(), TestCaseError> {
        self.rt.block_on(async {
            let status = tokio::time::timeout(Duration::from_secs(10), async {
                self.local().await.status(pb::StatusRequest {}).await
            })
            .await;
            prop_assert!(matches!(status, Ok(Ok(_))), "local API: {:?}", status);
            let first = &self.seeds[0].id;
            let answers = exchange(
                self.addr,
                vec![request(
                    1,
                    Req::GetOutboard(pb::GetOutboard {
                        blob: first.clone(),
                    }),
                )],
            )
            .await;
            prop_assert!(
                matches!(
                    answers.first().and_then(|a| a.kind.as_ref()),
                    Some(Resp::Outboard(_))
                ),
                "exchange: {:?}",
                answers
            );
            Ok(())
        })
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            self.rt.block_on(node.shutdown()).unwrap();
        }
    }
}

fn request(request_id: u64, kind: Req) -> pb::ExchangeRequest {
    pb::ExchangeRequest {
        request_id,
        kind: Some(kind),
    }
}

/// The key the node trusts, and the credential of the fuzzing peer it signed.
fn fleet() -> &'static (nebula_common::credential::SigningKey, String) {
    static FLEET: std::sync::OnceLock<(nebula_common::credential::SigningKey, String)> =
        std::sync::OnceLock::new();
    FLEET.get_or_init(|| {
        let key = nebula_common::credential::SigningKey::generate();
        let credential = key.issue("fuzzer", "", Duration::from_secs(3600));
        (key, credential)
    })
}

/// Sends `requests` on one exchange stream, as the fleet member `fuzzer`
/// (its credential, then its Hello first), then half-closes it; returns
/// every answer. The stream must end within the bound.
async fn exchange(
    addr: SocketAddr,
    requests: Vec<pb::ExchangeRequest>,
) -> Vec<pb::ExchangeResponse> {
    let run = async {
        let mut client = PeerExchangeClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .max_decoding_message_size(8 << 20);
        let mut answers = Vec::new();
        let hello = request(
            0,
            Req::Hello(pb::Hello {
                peer_id: "fuzzer".into(),
                address: String::new(),
            }),
        );
        let mut call =
            tonic::Request::new(tokio_stream::iter(std::iter::once(hello).chain(requests)));
        call.metadata_mut().insert(
            nebula_common::credential::METADATA_KEY,
            fleet().1.parse().unwrap(),
        );
        match client.exchange(call).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => answers.push(m),
                        Ok(None) => break,
                        Err(status) => {
                            assert!(
                                matches!(
                                    status.code(),
                                    Code::InvalidArgument
                                        | Code::ResourceExhausted
                                        | Code::Cancelled
                                ),
                                "stream ended with {status:?}"
                            );
                            break;
                        }
                    }
                }
            }
            Err(status) => panic!("exchange refused: {status:?}"),
        }
        answers
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the exchange stream did not end after the asker stopped sending")
}

fn blob_text(seeds: Vec<String>) -> impl Strategy<Value = String> {
    let upper: Vec<String> = seeds.iter().map(|s| s.to_uppercase()).collect();
    prop_oneof![
        4 => prop::sample::select(seeds.clone()),
        1 => prop::sample::select(upper),
        1 => prop::sample::select(seeds).prop_map(|s| format!("blake3:{s}")),
        1 => "[0-9a-f]{64}",
        1 => "[ \t\n]{0,2}[0-9a-f]{64}[ \t\n]{0,2}",
        1 => "(sha256:|)[0-9a-fx]{0,66}",
        1 => any::<String>(),
    ]
}

/// Mostly a few chunks (answered with pieces), sometimes more than a
/// stream's upload slots or a request's cap (answered busy or refused).
fn chunk_list(chunk: impl Strategy<Value = u32> + Clone) -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        4 => prop::collection::vec(chunk.clone(), 0..6),
        1 => prop::collection::vec(chunk, 0..70),
    ]
}

fn exchange_request(seeds: Vec<String>) -> impl Strategy<Value = pb::ExchangeRequest> {
    let chunk = prop_oneof![4 => 0u32..6, 1 => Just(u32::MAX), 1 => any::<u32>()];
    let kind = prop_oneof![
        1 => ("[ -~]{0,20}", "[ -~]{0,20}").prop_map(|(peer_id, address)| Req::Hello(pb::Hello { peer_id, address })),
        3 => blob_text(seeds.clone()).prop_map(|blob| Req::GetOutboard(pb::GetOutboard { blob })),
        5 => (blob_text(seeds.clone()), chunk_list(chunk), prop_oneof![4 => Just(String::new()), 1 => "[ -~]{1,20}"])
            .prop_map(|(blob, chunks, session)| Req::GetChunks(pb::GetChunks { blob, chunks, session })),
        1 => any::<u64>().prop_map(|request_id| Req::Cancel(pb::Cancel { request_id })),
        1 => (blob_text(seeds), prop::collection::vec(any::<u8>(), 0..20), any::<bool>())
            .prop_map(|(blob, chunks, complete)| Req::Have(pb::HaveUpdate { blob, chunks: chunks.into(), complete })),
        1 => any::<String>().prop_map(|key| Req::GetSession(pb::GetSession { key })),
    ];
    (
        prop_oneof![3 => 0u64..8, 1 => any::<u64>()],
        proptest::option::weighted(0.95, kind),
    )
        .prop_map(|(request_id, kind)| pb::ExchangeRequest { request_id, kind })
}

/// Checks one answer against what was asked and what the store holds.
fn check_answer(
    seeds: &[Seed],
    sent: &[pb::ExchangeRequest],
    answer: &pb::ExchangeResponse,
) -> Result<(), TestCaseError> {
    prop_assert!(
        answer.request_id == 0 || sent.iter().any(|r| r.request_id == answer.request_id),
        "an answer to request {} that was never made",
        answer.request_id
    );
    match &answer.kind {
        Some(Resp::Piece(piece)) => {
            prop_assert!(
                piece.data.len() <= 1 << 20,
                "a piece of {} bytes",
                piece.data.len()
            );
            // Some seeded blob holds exactly these bytes at this place.
            let matches = seeds.iter().any(|s| {
                let g = nebula_common::Geometry::new(s.bytes.len() as u64);
                piece.chunk < g.chunk_count() && {
                    let range = g.chunk_range(piece.chunk);
                    let start = range.start + piece.offset;
                    let end = start + piece.data.len() as u64;
                    end <= range.end && s.bytes[start as usize..end as usize] == piece.data[..]
                }
            });
            prop_assert!(
                matches,
                "chunk {} at {}: bytes no seeded blob holds there",
                piece.chunk,
                piece.offset
            );
        }
        Some(Resp::Outboard(o)) => {
            prop_assert!(
                seeds.iter().any(|s| s.bytes.len() as u64 == o.size),
                "an outboard of size {}",
                o.size
            );
        }
        Some(Resp::Error(e)) => {
            prop_assert!(
                !e.message.is_empty() && !e.message.contains('\n'),
                "{:?}",
                e.message
            );
        }
        Some(Resp::Busy(_)) | Some(Resp::Have(_)) | Some(Resp::Session(_)) => {}
        None => prop_assert!(false, "an answer with no kind"),
    }
    Ok(())
}

#[test]
fn fuzz_exchange_streams_of_arbitrary_requests() {
    let fixture = Fixture::start();
    let ids: Vec<String> = fixture.seeds.iter().map(|s| s.id.clone()).collect();
    let mut runner = TestRunner::new(config(48));
    runner
        .run(
            &prop::collection::vec(exchange_request(ids), 0..24),
            |requests| {
                let answers = fixture
                    .rt
                    .block_on(exchange(fixture.addr, requests.clone()));
                for a in &answers {
                    check_answer(&fixture.seeds, &requests, a)?;
                }
                fixture.alive()
            },
        )
        .unwrap();
}

/// One local API call.
#[derive(Debug, Clone)]
enum Local {
    Add(String),
    Fetch(pb::FetchRequest),
    Read(String),
    List,
    Remove(String),
    Status,
}

fn local_call(seeds: Vec<String>, dir: PathBuf) -> impl Strategy<Value = Local> {
    let paths = {
        let d = dir.display().to_string();
        prop_oneof![
            2 => prop::sample::select(vec![
                format!("{d}/four-chunks"),
                format!("{d}/empty"),
                format!("{d}/missing"),
                d.clone(),
                format!("{d}/store"),
                "/dev/null".to_owned(),
                "relative/path".to_owned(),
                String::new(),
            ]),
            1 => "[ -~]{0,30}".prop_filter("relative", |p| !p.starts_with('/')),
        ]
    };
    let outputs = {
        let d = dir.display().to_string();
        prop_oneof![
            3 => Just(String::new()),
            1 => (0..3u8).prop_map(move |i| format!("{d}/out{i}")),
            1 => Just("relative-out".to_owned()),
        ]
    };
    // Only loopback or malformed URLs: a fuzzed fetch never leaves this host.
    let urls = prop_oneof![
        4 => Just(String::new()),
        1 => prop::sample::select(vec![
            "http://127.0.0.1:1/blob",
            "https://127.0.0.1:1/x?sig=1#f",
            "ftp://127.0.0.1/x",
            "http://[::1",
            "not a url",
        ])
        .prop_map(str::to_owned),
    ];
    let fetch = (
        blob_text(seeds.clone()),
        outputs,
        0u64..300,
        urls,
        prop::collection::vec("[ -~]{0,20}", 0..2),
        "[ -~]{0,12}",
    )
        .prop_map(|(blob, output, ms, url, headers, digest)| {
            Local::Fetch(pb::FetchRequest {
                blob,
                output,
                // Short: no control plane is there to find providers.
                no_provider_timeout_ms: ms,
                url,
                headers,
                digest,
            })
        });
    prop_oneof![
        2 => paths.prop_map(Local::Add),
        3 => fetch,
        2 => blob_text(seeds.clone()).prop_map(Local::Read),
        1 => Just(Local::List),
        1 => blob_text(seeds).prop_map(Local::Remove),
        1 => Just(Local::Status),
    ]
}

const LOCAL_REFUSALS: [Code; 8] = [
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
    Code::Aborted,
    Code::Cancelled,
    Code::AlreadyExists,
    Code::DataLoss,
];

fn check_local(call: &Local, result: Result<(), tonic::Status>) -> Result<(), TestCaseError> {
    if let Err(status) = result {
        prop_assert!(
            LOCAL_REFUSALS.contains(&status.code()),
            "{:?}: {:?}",
            call,
            status
        );
        prop_assert!(
            !status.message().is_empty() && !status.message().contains('\n'),
            "{:?}: {:?}",
            call,
            status.message()
        );
    }
    Ok(())
}

async fn run_local(
    local: &mut LocalApiClient<Channel>,
    seeds: &[Seed],
    call: &Local,
) -> Result<(), TestCaseError> {
    let result: Result<(), tonic::Status> = match call.clone() {
        Local::Add(path) => local.add(pb::AddRequest { path }).await.map(drop),
        Local::Fetch(req) => match local.fetch(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut last = Ok(());
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            last = Err(e);
                            break;
                        }
                    }
                }
                last
            }
            Err(e) => Err(e),
        },
        Local::Read(blob) => match local.read(pb::ReadRequest { blob: blob.clone() }).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut bytes = Vec::new();
                let mut last = Ok(());
                loop {
                    match stream.message().await {
                        Ok(Some(r)) => bytes.extend_from_slice(&r.data),
                        Ok(None) => break,
                        Err(e) => {
                            last = Err(e);
                            break;
                        }
                    }
                }
                if last.is_ok() {
                    // What a read gives is exactly some seeded blob's bytes.
                    prop_assert!(
                        seeds.iter().any(|s| s.bytes == bytes),
                        "read {} bytes no blob holds",
                        bytes.len()
                    );
                }
                last
            }
            Err(e) => Err(e),
        },
        Local::List => {
            let list = local.list(pb::ListRequest {}).await.map(|l| l.into_inner());
            if let Ok(list) = &list {
                for b in &list.blobs {
                    prop_assert!(b.chunks_verified <= b.chunks);
                }
            }
            list.map(drop)
        }
        Local::Remove(blob) => local.remove(pb::RemoveRequest { blob }).await.map(drop),
        Local::Status => local.status(pb::StatusRequest {}).await.map(drop),
    };
    check_local(call, result)
}

#[test]
fn fuzz_local_api_sequences() {
    let fixture = Fixture::start();
    let ids: Vec<String> = fixture.seeds.iter().map(|s| s.id.clone()).collect();
    let dir = fixture.dir.path().to_owned();
    let mut runner = TestRunner::new(config(48));
    runner
        .run(
            &prop::collection::vec(local_call(ids, dir), 1..10),
            |calls| {
                fixture.rt.block_on(async {
                    let mut local = fixture.local().await;
                    for call in &calls {
                        tokio::time::timeout(
                            Duration::from_secs(30),
                            run_local(&mut local, &fixture.seeds, call),
                        )
                        .await
                        .map_err(|_| {
                            TestCaseError::fail(format!("{call:?} did not answer in 30 s"))
                        })??;
                    }
                    Ok::<_, TestCaseError>(())
                })?;
                fixture.reseed();
                fixture.alive()
            },
        )
        .unwrap();
}

/// Found by `fuzz_local_api_sequences`: a read of an id with a line break
/// around it (the id parses: white space is trimmed) answered NOT_FOUND with
/// the request's text, line break and all, in its message.
#[test]
fn issue10_fuzz_a_read_of_a_padded_id_answers_in_one_line() {
    let fixture = Fixture::start();
    let status = fixture.rt.block_on(async {
        let mut local = fixture.local().await;
        let padded = format!("\n{}\n", "0a".repeat(32));
        match local.read(pb::ReadRequest { blob: padded }).await {
            Ok(stream) => stream.into_inner().message().await.unwrap_err(),
            Err(status) => status,
        }
    });
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        status.message(),
        format!("blob {} is not in the store", "0a".repeat(32))
    );
}
