//! The serving side on its own: a store in a temporary directory, the
//! exchange service behind its credential check on a loopback port, and a
//! raw client speaking the protocol.

use std::{collections::BTreeMap, time::Duration};

use nebula_common::credential::{METADATA_KEY, SigningKey};
use nebula_proto::v1::peer_exchange_client::PeerExchangeClient;
use tokio::net::TcpListener;
use tonic::{service::interceptor::InterceptedService, transport::Server};

use super::*;
use crate::{
    Config,
    identity::{ExchangeAuth, Identity},
};

/// A serving node part and what its tests need.
struct Served {
    addr: std::net::SocketAddr,
    store: Arc<Store>,
    uploads: Arc<Uploads>,
    shutdown: CancellationToken,
    tasks: Tasks,
    fleet: SigningKey,
    dir: tempfile::TempDir,
}

impl Served {
    async fn start(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path().join("store"), None);
        tune(&mut config);
        config.validate().unwrap();
        let fleet = SigningKey::generate();
        let identity = Arc::new(Identity::new(None));
        identity.update(
            "",
            &[bytes::Bytes::copy_from_slice(fleet.public().as_bytes())],
        );
        let store = Arc::new(Store::open(&config.store).unwrap());
        let uploads = Arc::new(Uploads::new(&config));
        let (shutdown, tasks) = (CancellationToken::new(), Tasks::new());
        let serving = Serving {
            config: Arc::new(config),
            store: Arc::clone(&store),
            uploads: Arc::clone(&uploads),
            events: Arc::default(),
            sessions: Sessions::default(),
            metrics: Arc::default(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = InterceptedService::new(
            pb::peer_exchange_server::PeerExchangeServer::new(ExchangeService::new(serving)),
            ExchangeAuth(identity),
        );
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            addr,
            store,
            uploads,
            shutdown,
            tasks,
            fleet,
            dir,
        }
    }

    /// Adds `chunks` MiB of patterned bytes to the store.
    fn add(&self, chunks: usize) -> BlobId {
        let path = self.dir.path().join(format!("blob{chunks}"));
        let data: Vec<u8> = (0..chunks << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        self.store.add_file(&path).unwrap().id()
    }

    /// Opens a stream as `peer`; the first message, its `Hello`, is sent
    /// only when `greet`.
    async fn open(&self, peer: &str, greet: bool) -> Peer {
        let mut client = PeerExchangeClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(64);
        if greet {
            tx.send(ExchangeRequest {
                request_id: 0,
                kind: Some(Req::Hello(pb::Hello {
                    peer_id: peer.into(),
                    address: String::new(),
                })),
            })
            .await
            .unwrap();
        }
        let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let credential = self
            .fleet
            .issue(peer, "127.0.0.1:1", Duration::from_secs(60));
        request
            .metadata_mut()
            .insert(METADATA_KEY, credential.parse().unwrap());
        let inbound = client.exchange(request).await.unwrap().into_inner();
        Peer { tx, inbound }
    }

    async fn shutdown(self) {
        self.shutdown.cancel();
        assert_eq!(self.tasks.wait(Duration::from_secs(5)).await, 0);
    }
}

/// The dialing side of one stream, by hand.
struct Peer {
    tx: mpsc::Sender<ExchangeRequest>,
    inbound: Streaming<ExchangeResponse>,
}

impl Peer {
    async fn send(&self, request_id: u64, kind: Req) {
        self.tx
            .send(ExchangeRequest {
                request_id,
                kind: Some(kind),
            })
            .await
            .unwrap();
    }

    async fn get_chunks(&self, request_id: u64, blob: BlobId, chunks: Vec<u32>) {
        let get = pb::GetChunks {
            blob: blob.to_string(),
            chunks,
            ..pb::GetChunks::default()
        };
        self.send(request_id, Req::GetChunks(get)).await;
    }

    /// The next answer, within a bound.
    async fn next(&mut self) -> Result<ExchangeResponse, Status> {
        tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
            .await
            .expect("an answer in time")
            .map(|m| m.expect("the stream is open"))
    }

    /// Answers until `n` requests ended, by request id.
    async fn answers(&mut self, n: usize) -> BTreeMap<u64, Vec<Resp>> {
        let mut by_id: BTreeMap<u64, Vec<Resp>> = BTreeMap::new();
        let mut ended = 0;
        while ended < n {
            let msg = self.next().await.unwrap();
            let Some(kind) = msg.kind else { continue };
            if matches!(kind, Resp::Have(_)) {
                continue;
            }
            if !matches!(&kind, Resp::Piece(p) if !p.last) {
                ended += 1;
            }
            by_id.entry(msg.request_id).or_default().push(kind);
        }
        by_id
    }
}

fn error_code(resp: &Resp) -> Option<pb::error::Code> {
    match resp {
        Resp::Error(e) => pb::error::Code::try_from(e.code).ok(),
        _ => None,
    }
}

#[tokio::test]
async fn serves_an_outboard_and_verified_chunks() {
    let served = Served::start(|_| {}).await;
    let blob = served.add(3);
    let mut peer = served.open("p1", true).await;
    peer.send(
        1,
        Req::GetOutboard(pb::GetOutboard {
            blob: blob.to_string(),
        }),
    )
    .await;
    match peer.next().await.unwrap().kind {
        Some(Resp::Outboard(o)) => {
            assert_eq!(o.size, 3 << 20);
            assert!(o.complete);
        }
        other => panic!("expected an outboard, got {other:?}"),
    }
    peer.get_chunks(2, blob, vec![0, 2]).await;
    let answers = peer.answers(2).await;
    let pieces: Vec<&pb::ChunkPiece> = answers[&2]
        .iter()
        .map(|r| match r {
            Resp::Piece(p) => p,
            other => panic!("expected pieces, got {other:?}"),
        })
        .collect();
    // Each chunk arrives whole, in pieces of at most `MAX_PIECE` at their
    // offsets, the last one marked.
    let local = served.store.get(&blob).unwrap();
    for chunk in [0, 2] {
        let whole = local.read_verified_chunk(chunk).unwrap();
        let mut assembled = Vec::new();
        let of_chunk: Vec<_> = pieces.iter().filter(|p| p.chunk == chunk).collect();
        for (i, p) in of_chunk.iter().enumerate() {
            assert_eq!(p.offset as usize, assembled.len());
            assert!(p.data.len() <= MAX_PIECE);
            assert_eq!(p.last, i + 1 == of_chunk.len());
            assembled.extend_from_slice(&p.data);
        }
        assert_eq!(assembled, whole);
    }
    assert_eq!(served.uploads.uploaded(), 2 << 20);
    served.shutdown().await;
}

/// Asks for `chunks` chunks in one request of a server with these slots;
/// returns how many were served and how many answered busy.
async fn slots(upload_slots: u32, stream_upload_slots: u32, chunks: u32) -> (usize, usize) {
    let served = Served::start(|c| {
        c.upload_slots = upload_slots;
        c.stream_upload_slots = stream_upload_slots;
    })
    .await;
    let blob = served.add(chunks as usize);
    let mut peer = served.open("p1", true).await;
    peer.get_chunks(1, blob, (0..chunks).collect()).await;
    let answers = peer.answers(chunks as usize).await;
    let count = |f: fn(&Resp) -> bool| answers[&1].iter().filter(|r| f(r)).count();
    let sent = count(|r| matches!(r, Resp::Piece(p) if p.last));
    let busy = count(|r| matches!(r, Resp::Busy(b) if b.retry_after_ms == 100));
    // Every slot is given back once the chunks are sent.
    assert_eq!(served.uploads.active(), 0);
    served.shutdown().await;
    (sent, busy)
}

#[tokio::test]
async fn answers_busy_past_the_upload_slots() {
    assert_eq!(slots(2, 2, 8).await, (2, 6));
}

#[tokio::test]
async fn one_stream_holds_at_most_its_share_of_the_slots() {
    assert_eq!(slots(8, 3, 5).await, (3, 2));
}

#[tokio::test]
async fn a_cancelled_request_is_not_served() {
    // Slow enough that the later requests still wait when the cancels come.
    let served = Served::start(|c| c.upload_limit = Some(8 << 20)).await;
    let blob = served.add(4);
    let mut peer = served.open("p1", true).await;
    for chunk in 0..4 {
        peer.get_chunks(u64::from(chunk) + 1, blob, vec![chunk])
            .await;
    }
    for id in [3, 4] {
        peer.send(0, Req::Cancel(pb::Cancel { request_id: id }))
            .await;
    }
    // A last request, answered after whatever was not cancelled.
    peer.send(
        9,
        Req::GetOutboard(pb::GetOutboard {
            blob: blob.to_string(),
        }),
    )
    .await;
    let answers = peer.answers(3).await;
    assert_eq!(answers.keys().copied().collect::<Vec<_>>(), [1, 2, 9]);
    served.shutdown().await;
}

#[tokio::test]
async fn a_rate_limited_peer_sends_a_fresh_chunk_once() {
    let served = Served::start(|c| c.upload_limit = Some(64 << 20)).await;
    let blob = served.add(2);
    let mut first = served.open("p1", true).await;
    first.get_chunks(1, blob, vec![0]).await;
    let answers = first.answers(1).await;
    assert!(answers[&1].iter().all(|a| matches!(a, Resp::Piece(_))));
    // The second asker is sent to the first, which holds it now.
    let mut second = served.open("p2", true).await;
    second.get_chunks(1, blob, vec![0, 1]).await;
    let answers = second.answers(2).await;
    // Chunk 0: try elsewhere; chunk 1, never sent yet: its pieces.
    let codes: Vec<Option<pb::error::Code>> = answers[&1].iter().map(error_code).collect();
    assert_eq!(codes[0], Some(pb::error::Code::TryElsewhere));
    assert!(
        answers[&1][1..]
            .iter()
            .all(|a| matches!(a, Resp::Piece(p) if p.chunk == 1))
    );
    served.shutdown().await;
}

#[tokio::test]
async fn requests_over_the_limits_are_refused() {
    let served = Served::start(|c| c.max_chunks_per_request = 4).await;
    let blob = served.add(1);
    let mut peer = served.open("p1", true).await;
    peer.get_chunks(1, blob, (0..5).collect()).await;
    peer.get_chunks(2, blob, vec![7]).await;
    let unknown = "00".repeat(32).parse::<BlobId>().unwrap();
    peer.get_chunks(3, unknown, vec![0]).await;
    let answers = peer.answers(3).await;
    assert_eq!(
        error_code(&answers[&1][0]),
        Some(pb::error::Code::Invalid),
        "too many chunks in one request"
    );
    assert_eq!(
        error_code(&answers[&2][0]),
        Some(pb::error::Code::NotFound),
        "a chunk past the end"
    );
    assert_eq!(
        error_code(&answers[&3][0]),
        Some(pb::error::Code::NotFound),
        "a blob not here"
    );
    served.shutdown().await;
}

#[tokio::test]
async fn a_malformed_blob_id_is_answered_invalid() {
    let served = Served::start(|_| {}).await;
    let mut peer = served.open("p1", true).await;
    let get = pb::GetChunks {
        blob: "not-a-blob".into(),
        chunks: vec![0],
        ..pb::GetChunks::default()
    };
    peer.send(1, Req::GetChunks(get)).await;
    let answers = peer.answers(1).await;
    assert_eq!(error_code(&answers[&1][0]), Some(pb::error::Code::Invalid));
    served.shutdown().await;
}

#[tokio::test]
async fn a_stream_must_begin_with_one_hello_naming_the_credential() {
    let served = Served::start(|_| {}).await;
    let blob = served.add(1);
    // No Hello first.
    let mut peer = served.open("p1", false).await;
    peer.get_chunks(1, blob, vec![0]).await;
    assert_eq!(
        peer.next().await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    // A Hello naming another peer.
    let mut peer = served.open("p1", false).await;
    let hello = pb::Hello {
        peer_id: "p2".into(),
        address: String::new(),
    };
    peer.send(0, Req::Hello(hello.clone())).await;
    assert_eq!(
        peer.next().await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    // Two Hellos.
    let mut peer = served.open("p2", true).await;
    peer.send(0, Req::Hello(hello)).await;
    assert_eq!(
        peer.next().await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    served.shutdown().await;
}

#[tokio::test]
async fn streams_end_when_the_node_stops() {
    let served = Served::start(|_| {}).await;
    let mut peer = served.open("p1", true).await;
    served.shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), peer.inbound.message())
        .await
        .expect("the stream ends");
    assert!(!matches!(ended, Ok(Some(_))));
    served.shutdown().await;
}
