//! `LocalApi`: what the CLI asks of its own daemon, over a Unix socket.

use std::{
    collections::HashMap,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::Stream;
use nebula_common::{BlobId, BlobRef, Store, StoreError};
use nebula_proto::v1::{
    self as pb,
    local_api_client::LocalApiClient,
    local_api_server::{LocalApi, LocalApiServer},
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tonic::{Request, Response, Status, transport::Channel};

use crate::{
    Config, FetchError, Fetcher, Progress, SourceBytes, UrlFetch, Wanted,
    events::Events,
    exchange::{MAX_MESSAGE, MAX_PIECE},
    membership,
    tasks::Tasks,
    uploads::Uploads,
};

/// The service behind the daemon's socket.
#[derive(Debug, Clone)]
pub(crate) struct LocalService {
    /// Fetches by blob and by URL.
    fetcher: Fetcher,
    store: Arc<Store>,
    /// Imports and removals change the inventory membership announces.
    events: Arc<Events>,
    /// Where fetches and streams run, joined at shutdown.
    tasks: Tasks,
    config: Arc<Config>,
    /// The address other peers dial, as `nebula status` shows it.
    address: String,
    /// Membership's status (never registered without a control plane).
    membership: membership::Status,
    /// The upload counts `nebula status` shows.
    uploads: Arc<Uploads>,
    /// When the node started.
    started: Instant,
    /// Fetches under way, by the blob reference asked for: a second client
    /// asking for the same blob joins the running fetch instead of starting
    /// a second download of it.
    running: Arc<Mutex<HashMap<String, Running>>>,
}

/// A fetch under way that clients can join.
#[derive(Debug, Clone)]
struct Running {
    progress: watch::Receiver<Progress>,
    /// `None` until the fetch ends.
    result: watch::Receiver<Option<Result<(), Status>>>,
}

impl LocalService {
    /// The API of the node whose parts these are.
    #[expect(
        clippy::too_many_arguments,
        reason = "each argument is a part the composition root hands over"
    )]
    pub(crate) fn new(
        fetcher: Fetcher,
        store: Arc<Store>,
        events: Arc<Events>,
        tasks: Tasks,
        config: Arc<Config>,
        address: String,
        membership: membership::Status,
        uploads: Arc<Uploads>,
        started: Instant,
    ) -> Self {
        Self {
            fetcher,
            store,
            events,
            tasks,
            config,
            address,
            membership,
            uploads,
            started,
            running: Arc::default(),
        }
    }

    /// Joins the fetch of `what` under way, or starts it. The fetch runs on
    /// even if every client goes away: its chunks are kept and the blob is
    /// completed for the next asker.
    fn join_or_start(&self, what: Wanted, timeout: Duration) -> Running {
        let key = what.key();
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = running.get(&key) {
            return r.clone();
        }
        let (progress_tx, progress) = watch::channel(Progress::default());
        let (result_tx, result) = watch::channel(None);
        let joined = Running { progress, result };
        running.insert(key.clone(), joined.clone());
        let fetcher = self.fetcher.clone();
        let table = Arc::clone(&self.running);
        self.tasks.spawn(async move {
            let result = fetcher
                .run(what, progress_tx, Some(timeout))
                .await
                .map(drop)
                .map_err(|e| Status::from(LocalError::from(e)));
            // Out of the table first: a later asker starts afresh.
            table.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            let _ = result_tx.send(Some(result));
        });
        joined
    }

    pub(crate) fn into_server(self) -> LocalApiServer<Self> {
        LocalApiServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

/// Why a call of the local API failed.
#[derive(Debug, thiserror::Error)]
enum LocalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    BadId(#[from] nebula_common::ParseIdError),
    #[error(transparent)]
    BadUrl(#[from] crate::UrlFetchError),
    #[error("the path to add must be absolute")]
    AddPathRelative,
    #[error("the output path must be absolute")]
    OutputPathRelative,
    #[error("cannot add {}: not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file to add went away before it was read.
    #[error(transparent)]
    AddGone(StoreError),
    #[error("blob {0} is not in the store")]
    Absent(BlobRef),
    #[error("blob {0} is incomplete")]
    Incomplete(BlobId),
    /// A blocking task of the call panicked.
    #[error("{0} task failed")]
    Task(&'static str),
}

/// The one place the local API's errors become statuses for the CLI.
impl From<LocalError> for Status {
    fn from(e: LocalError) -> Self {
        let message = e.to_string();
        match e {
            LocalError::Store(e) => store_status(e),
            LocalError::Fetch(e) => fetch_status(e),
            LocalError::BadId(_)
            | LocalError::BadUrl(_)
            | LocalError::AddPathRelative
            | LocalError::OutputPathRelative
            | LocalError::NotAFile(_)
            | LocalError::Unreadable { .. }
            | LocalError::AddGone(_) => Status::invalid_argument(message),
            LocalError::Absent(_) => Status::not_found(message),
            LocalError::Incomplete(_) => Status::failed_precondition(message),
            LocalError::Task(_) => Status::internal(message),
        }
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound { .. } | StoreError::ChunkMissing { .. } => {
            Status::not_found(e.to_string())
        }
        StoreError::Incomplete { .. } => Status::failed_precondition(e.to_string()),
        StoreError::DiskFull { .. } => Status::resource_exhausted(e.to_string()),
        StoreError::Verify(_) | StoreError::ExportMismatch { .. } => {
            Status::data_loss(e.to_string())
        }
        StoreError::Locked { .. } | StoreError::Insecure { .. } | StoreError::Io { .. } => {
            Status::internal(e.to_string())
        }
    }
}

fn fetch_status(e: FetchError) -> Status {
    match e {
        FetchError::NoProviders { .. } | FetchError::NoControlPlane(_) => {
            Status::not_found(e.to_string())
        }
        FetchError::Control(_) | FetchError::ControlTimedOut | FetchError::MalformedId { .. } => {
            Status::unavailable(e.to_string())
        }
        FetchError::BadOutboard(_)
        | FetchError::WrongBlob { .. }
        | FetchError::DigestMismatch { .. } => Status::data_loss(e.to_string()),
        FetchError::Store(e) => store_status(e),
        // Not UNAVAILABLE: the CLI reads that as "the daemon went away".
        FetchError::Origin(_) => Status::failed_precondition(e.to_string()),
        FetchError::ContentMismatch { .. } => Status::data_loss(e.to_string()),
        FetchError::Cancelled => Status::cancelled(e.to_string()),
        FetchError::Removed { .. } => Status::aborted(e.to_string()),
    }
}

fn parse_ref(s: &str) -> Result<BlobRef, LocalError> {
    Ok(s.parse()?)
}

fn parse_id(s: &str) -> Result<BlobId, LocalError> {
    Ok(s.parse()?)
}

impl From<&SourceBytes> for pb::ProviderBytes {
    fn from(s: &SourceBytes) -> Self {
        Self {
            peer_id: s.peer_id.clone(),
            address: s.address.clone(),
            bytes: s.bytes,
        }
    }
}

fn to_progress(p: &Progress) -> pb::FetchProgress {
    pb::FetchProgress {
        id: p.id.map(|i| i.to_string()).unwrap_or_default(),
        bytes_done: p.bytes_done,
        total: p.total,
        providers: p.providers,
        rate: p.rate,
        done: p.done,
        sources: p.sources.iter().map(pb::ProviderBytes::from).collect(),
        resumed_bytes: p.resumed_bytes,
        origin_bytes: p.origin_bytes,
        notice: p.notice.clone().unwrap_or_default(),
    }
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl LocalApi for LocalService {
    async fn add(
        &self,
        request: Request<pb::AddRequest>,
    ) -> Result<Response<pb::AddResponse>, Status> {
        let path = PathBuf::from(request.into_inner().path);
        if !path.is_absolute() {
            return Err(LocalError::AddPathRelative.into());
        }
        // stat, not open: opening a FIFO would block this daemon until a writer
        // comes, and reading it would never end.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(LocalError::NotAFile(path).into());
            }
            Err(e) => {
                return Err(LocalError::Unreadable { path, source: e }.into());
            }
        }
        let store = Arc::clone(&self.store);
        let blob = tokio::task::spawn_blocking(move || store.add_file(&path))
            .await
            .map_err(|_| LocalError::Task("add"))?
            .map_err(|e| match e {
                StoreError::Io { ref source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    LocalError::AddGone(e)
                }
                e => LocalError::Store(e),
            })?;
        self.fetcher.completed(&blob);
        let g = blob.geometry();
        Ok(Response::new(pb::AddResponse {
            id: blob.id().to_string(),
            size: g.size(),
            sha256: blob.sha256().map(|d| d.to_string()).unwrap_or_default(),
            chunk_size: g.chunk_size(),
            chunks: u64::from(g.chunk_count()),
        }))
    }

    type FetchStream = Streamed<pb::FetchProgress>;

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let req = request.into_inner();
        let what = if req.url.is_empty() {
            Wanted::Blob(parse_ref(&req.blob)?)
        } else {
            let fetch =
                UrlFetch::parse(&req.url, &req.headers, &req.digest).map_err(LocalError::from)?;
            Wanted::Url(Box::new(fetch))
        };
        let output = (!req.output.is_empty()).then(|| PathBuf::from(&req.output));
        if output.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(LocalError::OutputPathRelative.into());
        }
        let timeout = match req.no_provider_timeout_ms {
            0 => self.config.no_provider_timeout,
            ms => Duration::from_millis(ms),
        };
        let Running {
            progress: mut progress_rx,
            result: mut result_rx,
        } = self.join_or_start(what, timeout);
        let (out_tx, out_rx) = mpsc::channel(16);
        let store = Arc::clone(&self.store);
        self.tasks.spawn(async move {
            let mut progress_open = true;
            loop {
                tokio::select! {
                    changed = progress_rx.changed(), if progress_open => {
                        if changed.is_err() {
                            // The fetch ended; its result follows.
                            progress_open = false;
                            continue;
                        }
                        let p = progress_rx.borrow_and_update().clone();
                        if p.done {
                            // Sent after the export, below.
                            continue;
                        }
                        if out_tx.send(Ok(to_progress(&p))).await.is_err() {
                            return;
                        }
                    }
                    // Its first change is the result: the fetch leaves the
                    // table before sending it, so no joiner has seen it yet.
                    changed = result_rx.changed() => {
                        let result = match changed {
                            Ok(()) => result_rx.borrow().clone(),
                            Err(_) => None,
                        };
                        let last = progress_rx.borrow().clone();
                        let msg = match result {
                            Some(Ok(())) => match (output, last.id) {
                                (Some(dest), Some(id)) => {
                                    tokio::task::spawn_blocking(move || store.export(&id, &dest))
                                        .await
                                        .map_err(|_| LocalError::Task("export"))
                                        .and_then(|r| r.map_err(LocalError::from))
                                        .map_err(Status::from)
                                        .map(|()| to_progress(&last))
                                }
                                _ => Ok(to_progress(&last)),
                            },
                            Some(Err(status)) => Err(status),
                            None => Err(LocalError::Task("fetch").into()),
                        };
                        let _ = out_tx.send(msg).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }

    type ReadStream = Streamed<pb::ReadResponse>;

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let req = request.into_inner();
        let wanted = parse_ref(&req.blob)?;
        let blob = match wanted {
            BlobRef::Blake3(id) => self.store.get(&id),
            BlobRef::Sha256(d) => self.store.find_sha256(&d),
        }
        // The parsed form, not the request's text: that may hold white space
        // and line breaks around the id.
        .ok_or(LocalError::Absent(wanted))?;
        if !blob.is_complete() {
            return Err(LocalError::Incomplete(blob.id()).into());
        }
        let (tx, rx) = mpsc::channel(4);
        self.tasks.spawn(async move {
            for i in 0..blob.geometry().chunk_count() {
                let b = Arc::clone(&blob);
                // Nothing unverified reaches the user's output.
                let data = match tokio::task::spawn_blocking(move || b.read_verified_chunk(i)).await
                {
                    Ok(Ok(d)) => d,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(LocalError::from(e).into())).await;
                        return;
                    }
                    Err(_) => return,
                };
                let mut offset = 0;
                while offset < data.len() {
                    let end = (offset + MAX_PIECE).min(data.len());
                    let piece: Bytes = data.slice(offset..end);
                    if tx.send(Ok(pb::ReadResponse { data: piece })).await.is_err() {
                        return;
                    }
                    offset = end;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let blobs = self
            .store
            .list()
            .into_iter()
            .map(|b| pb::BlobInfo {
                id: b.id.to_string(),
                size: b.size,
                sha256: b.sha256.unwrap_or_default(),
                complete: b.complete,
                chunks: u64::from(b.chunks),
                chunks_verified: u64::from(b.chunks_verified),
            })
            .collect();
        Ok(Response::new(pb::ListResponse { blobs }))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        let id = parse_id(&request.into_inner().blob)?;
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.remove(&id))
            .await
            .map_err(|_| LocalError::Task("remove"))?
            .map_err(LocalError::from)?;
        self.events.inventory_changed();
        Ok(Response::new(pb::RemoveResponse {}))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(pb::StatusResponse {
            peer_id: self.store.peer_id().to_owned(),
            address: self.address.clone(),
            control: self.config.control.clone().unwrap_or_default(),
            registered: self.membership.is_registered(),
            blobs: self.store.list().len() as u64,
            active_uploads: self.uploads.active(),
            uploaded_bytes: self.uploads.uploaded(),
            downloaded_bytes: self.fetcher.downloaded(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            store: self.store.root().display().to_string(),
            registration_error: self.membership.error(),
        }))
    }
}

/// Connects to a daemon's local API on the Unix socket at `path`.
pub async fn connect_local(path: PathBuf) -> Result<LocalApiClient<Channel>, std::io::Error> {
    let channel = nebula_proto::unix::connect(nebula_proto::unix::endpoint(), path)
        .await
        .map_err(std::io::Error::other)?;
    Ok(LocalApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}
