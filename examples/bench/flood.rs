//! A resource flood, for the `fleet_memory` case: an attacker that registers with
//! the control plane like any peer, then opens exchange streams to one daemon and asks for far
//! more than the daemon serves at once.
//!
//! Every round on a stream is [`REQUESTS`] `GetChunks` naming as many chunk indexes as a daemon
//! allows (`max_chunks_per_request` of the default `nebula_peer::Config`), then one naming one
//! more and one naming [`HUGE`], which the daemon must refuse. One stream reads (and discards)
//! every answer and starts the next round as soon as one is answered; [`STALLED`] others never
//! read, so their answers pile up behind HTTP/2 flow control, and each is replaced by a fresh one
//! after [`HOLD`], past the daemon's stall timeout, so some stream always sits on upload slots.
//! Each stream has a connection of its own with the windows a real peer advertises, so the daemon
//! can push as much as a peer could make it buffer.
//!
//! Every loop stops at the `stop` token, at the time limit, or after a fixed count.

use std::{
    ops::AddAssign,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nebula_proto::v1::{
    self as pb, control_plane_client::ControlPlaneClient, exchange_request::Kind as Req,
    exchange_response::Kind as Resp, peer_exchange_client::PeerExchangeClient,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// `GetChunks` at the limit in one round.
const REQUESTS: usize = 20;
/// Chunk indexes of the request far over the limit.
const HUGE: u32 = 100_000;
/// Streams that never read.
const STALLED: usize = 4;
/// How long a stream that never reads is kept before a fresh one replaces it: past the
/// daemon's default stall timeout (5 s), after which it drops the stream and frees its slots.
const HOLD: Duration = Duration::from_secs(6);
/// How long opening a connection and a stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Silence after which the reading stream stops waiting for the rest of a round.
const SILENCE: Duration = Duration::from_secs(10);
/// Rounds (or stream replacements) per stream at most.
const MAX_ROUNDS: u64 = 10_000;
/// The windows and message size a daemon's own client uses (`nebula_peer::connection`).
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
const MAX_MESSAGE: usize = 4 << 20;

/// What the attacker did and got back.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FloodReport {
    /// Exchange streams opened.
    pub(crate) streams: u64,
    /// Streams or connections that could not be opened.
    pub(crate) open_failures: u64,
    /// `GetChunks` requests sent.
    pub(crate) requests: u64,
    /// Chunk indexes those requests named.
    pub(crate) chunks_asked: u64,
    /// Chunks the reading stream received whole.
    pub(crate) chunks_received: u64,
    /// Chunk bytes it received.
    pub(crate) bytes_received: u64,
    /// Busy answers it received (one per chunk refused).
    pub(crate) busy: u64,
    /// Error answers it received (the requests over the limit among them).
    pub(crate) errors: u64,
    /// Error answers that said the request named too many chunks.
    pub(crate) over_limit_refused: u64,
}

impl AddAssign for FloodReport {
    fn add_assign(&mut self, other: Self) {
        self.streams += other.streams;
        self.open_failures += other.open_failures;
        self.requests += other.requests;
        self.chunks_asked += other.chunks_asked;
        self.chunks_received += other.chunks_received;
        self.bytes_received += other.bytes_received;
        self.busy += other.busy;
        self.errors += other.errors;
        self.over_limit_refused += other.over_limit_refused;
    }
}

/// A peer identity obtained the ordinary way: `Register` with the control plane.
#[derive(Debug, Clone)]
pub(crate) struct Attacker {
    peer_id: String,
    /// The control plane's answer to `Register`: the peer credential.
    registered: pb::RegisterResponse,
}

impl Attacker {
    /// Registers as a peer named `peer_id` that serves nothing (its address refuses
    /// connections, as a peer behind a firewall would).
    pub(crate) async fn register(control_url: &str, peer_id: &str) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(control_url.to_owned())?
            .connect_timeout(OPEN_TIMEOUT)
            .timeout(OPEN_TIMEOUT)
            .connect()
            .await
            .with_context(|| {
                format!("the attacker cannot reach the control plane {control_url}")
            })?;
        let registered = ControlPlaneClient::new(channel)
            .register(pb::RegisterRequest {
                peer_id: peer_id.to_owned(),
                address: "127.0.0.1:9".to_owned(),
                zone: String::new(),
                labels: Default::default(),
            })
            .await
            .context("the attacker's registration was refused")?
            .into_inner();
        Ok(Self {
            peer_id: peer_id.to_owned(),
            registered,
        })
    }

    /// Wraps a stream of exchange requests as a daemon's own client sends it: with the peer
    /// credential the control plane signed at registration.
    fn exchange_request<S>(&self, requests: S) -> anyhow::Result<tonic::Request<S>> {
        let mut request = tonic::Request::new(requests);
        request.metadata_mut().insert(
            "nebula-credential",
            self.registered
                .credential
                .parse()
                .context("the control plane sent an unusable credential")?,
        );
        Ok(request)
    }

    /// Dials `target` on a connection of its own and opens an exchange stream, saying hello as
    /// this peer. Requests go into the returned sender (room for a whole round, so sending
    /// never waits on the daemon).
    async fn open(&self, target: &str) -> anyhow::Result<Stream> {
        let open = async {
            let channel: Channel = Endpoint::from_shared(format!("http://{target}"))?
                .connect_timeout(OPEN_TIMEOUT)
                .tcp_nodelay(true)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .connect()
                .await?;
            let mut client =
                PeerExchangeClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
            let (tx, rx) = mpsc::channel(REQUESTS + 8);
            tx.send(pb::ExchangeRequest {
                request_id: 0,
                kind: Some(Req::Hello(pb::Hello {
                    peer_id: self.peer_id.clone(),
                    address: String::new(),
                })),
            })
            .await?;
            let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
            let answers = client
                .exchange(self.exchange_request(requests)?)
                .await?
                .into_inner();
            anyhow::Ok((tx, answers))
        };
        tokio::time::timeout(OPEN_TIMEOUT, open)
            .await
            .context("opening an exchange stream timed out")?
    }
}

/// What to ask for: a blob the target holds.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The daemon's `host:port`.
    pub(crate) address: String,
    /// The blob id.
    pub(crate) blob: String,
    /// Its chunk count.
    pub(crate) chunks: u32,
}

impl Target {
    /// One round of requests with ids from `first_id`: [`REQUESTS`] at the limit, cycling
    /// through the blob's chunks, then one over it by one and one by far. Returns them and the
    /// number of answers that end them (one per chunk named at the limit, one per refusal).
    fn round(&self, first_id: u64) -> (Vec<pb::ExchangeRequest>, u64) {
        let limit = nebula_peer::Config::new("", None).max_chunks_per_request as u32;
        let get = |n: u64, count: u32| pb::ExchangeRequest {
            request_id: first_id + n,
            kind: Some(Req::GetChunks(pb::GetChunks {
                blob: self.blob.clone(),
                chunks: (0..count)
                    .map(|k| (n as u32 * limit + k) % self.chunks.max(1))
                    .collect(),
                ..pb::GetChunks::default()
            })),
        };
        let mut requests: Vec<_> = (0..REQUESTS as u64).map(|n| get(n, limit)).collect();
        requests.push(get(REQUESTS as u64, limit + 1));
        requests.push(get(REQUESTS as u64 + 1, HUGE));
        (requests, REQUESTS as u64 * u64::from(limit) + 2)
    }
}

/// Floods `target` as `attacker` until `stop` or `limit`.
pub(crate) async fn run(
    attacker: &Attacker,
    target: &Target,
    stop: &CancellationToken,
    limit: Duration,
) -> FloodReport {
    let flood = Flood {
        attacker,
        target,
        stop,
        deadline: Instant::now() + limit,
    };
    let stalled = (0..STALLED).map(|_| flood.never_read());
    let (reading, stalled) =
        tokio::join!(flood.read_everything(), futures::future::join_all(stalled));
    let mut report = reading;
    for s in stalled {
        report += s;
    }
    report
}

/// An exchange stream of the attacker: where requests go, and the answers.
type Stream = (
    mpsc::Sender<pb::ExchangeRequest>,
    tonic::Streaming<pb::ExchangeResponse>,
);

/// One flood under way.
#[derive(Debug, Clone, Copy)]
struct Flood<'a> {
    attacker: &'a Attacker,
    target: &'a Target,
    stop: &'a CancellationToken,
    deadline: Instant,
}

impl Flood<'_> {
    fn over(&self) -> bool {
        self.stop.is_cancelled() || Instant::now() >= self.deadline
    }

    /// A new stream to the target, counted in `report`; `None` (after a pause, so a refusing
    /// daemon is not dialed in a tight loop) when it cannot be opened.
    async fn open(&self, report: &mut FloodReport) -> Option<Stream> {
        match self.attacker.open(&self.target.address).await {
            Ok(stream) => {
                report.streams += 1;
                Some(stream)
            }
            Err(_) => {
                report.open_failures += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                None
            }
        }
    }

    /// The greedy reader: asks, reads every answer, asks again.
    async fn read_everything(self) -> FloodReport {
        let mut report = FloodReport::default();
        let mut stream = None;
        let mut next_id = 1;
        for _ in 0..MAX_ROUNDS {
            if self.over() {
                break;
            }
            let open = match stream.take() {
                Some(open) => Some(open),
                None => self.open(&mut report).await,
            };
            let Some((tx, mut answers)) = open else {
                continue;
            };
            let (requests, expected) = self.target.round(next_id);
            next_id += requests.len() as u64;
            if !send_round(&tx, requests, &mut report) {
                continue;
            }
            let mut ended = 0;
            let mut alive = true;
            // Bounded by `expected` answers, each within `SILENCE`, and by `stop`.
            while ended < expected && alive {
                let message = tokio::select! {
                    () = self.stop.cancelled() => return report,
                    m = tokio::time::timeout(SILENCE, answers.message()) => m,
                };
                let Ok(Ok(Some(answer))) = message else {
                    alive = false;
                    break;
                };
                match answer.kind {
                    Some(Resp::Piece(piece)) => {
                        report.bytes_received += piece.data.len() as u64;
                        if piece.last {
                            report.chunks_received += 1;
                            ended += 1;
                        }
                    }
                    Some(Resp::Busy(_)) => {
                        report.busy += 1;
                        ended += 1;
                    }
                    Some(Resp::Error(e)) => {
                        report.errors += 1;
                        if e.message.contains("at most") {
                            report.over_limit_refused += 1;
                        }
                        ended += 1;
                    }
                    _ => {}
                }
            }
            if alive {
                stream = Some((tx, answers));
            }
        }
        report
    }

    /// One slot of streams that never read: each is held for [`HOLD`], then replaced.
    async fn never_read(self) -> FloodReport {
        let mut report = FloodReport::default();
        for _ in 0..MAX_ROUNDS {
            if self.over() {
                break;
            }
            let Some((tx, answers)) = self.open(&mut report).await else {
                continue;
            };
            let (requests, _) = self.target.round(1);
            send_round(&tx, requests, &mut report);
            tokio::select! {
                () = self.stop.cancelled() => {}
                () = tokio::time::sleep(HOLD) => {}
            }
            // Unread to the end; dropping both resets the stream.
            drop((tx, answers));
        }
        report
    }
}

/// Sends a round of requests; counts them in `report`. False if the stream is gone.
fn send_round(
    tx: &mpsc::Sender<pb::ExchangeRequest>,
    requests: Vec<pb::ExchangeRequest>,
    report: &mut FloodReport,
) -> bool {
    for request in requests {
        let chunks = match &request.kind {
            Some(Req::GetChunks(get)) => get.chunks.len() as u64,
            _ => 0,
        };
        if tx.try_send(request).is_err() {
            return false;
        }
        report.requests += 1;
        report.chunks_asked += chunks;
    }
    true
}
