//! [`ControlClient`]: the peer's client of the control plane, over one or
//! more replicas (`--control URL[,URL…]`).
//!
//! Every call goes to the current replica; when that one does not answer
//! (unavailable, timed out, connection lost) the same request is tried on the
//! next, and the first that answers becomes current for every later call of
//! this peer (heartbeats, announcements, discovery alike). Requests are
//! small protobuf messages, so retrying one is a clone. A call tries each
//! replica at most once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use nebula_proto::{
    tls::{self, EndpointError, TlsConfig},
    v1::{self as pb, control_plane_client::ControlPlaneClient},
};
use tonic::{
    Code, Response, Status,
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::Channel,
};

/// Adds `authorization: Bearer <token>` to every control-plane call.
#[derive(Debug, Clone)]
pub(crate) struct BearerAuth(pub(crate) Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            req.metadata_mut().insert("authorization", token.clone());
        }
        Ok(req)
    }
}

type Client = ControlPlaneClient<InterceptedService<Channel, BearerAuth>>;

#[derive(Debug)]
struct Replica {
    url: String,
    client: Client,
}

/// A control-plane client that fails over between replicas. Cloning is cheap
/// and clones share which replica is current.
#[derive(Debug, Clone)]
pub(crate) struct ControlClient {
    /// At least one.
    replicas: Arc<[Replica]>,
    current: Arc<AtomicUsize>,
    timeout: Duration,
}

/// Why a control-plane URL list cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlUrlError {
    /// The list is empty.
    #[error("no control plane URL given")]
    Empty,
    /// One URL is malformed, or its scheme disagrees with the TLS settings.
    #[error("control plane URL: {0}")]
    Invalid(#[from] EndpointError),
}

/// The URLs of a comma-separated `--control` list, blanks skipped.
pub(crate) fn split_urls(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty())
}

/// Whether another replica might answer where this one did not.
fn fails_over(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

macro_rules! failover {
    ($(#[$doc:meta] $name:ident($req:ty) -> $resp:ty;)*) => {$(
        #[$doc]
        pub(crate) async fn $name(&self, request: $req) -> Result<Response<$resp>, Status> {
            let n = self.replicas.len();
            let start = self.current.load(Ordering::Relaxed) % n;
            let mut last = None;
            for step in 0..n {
                let i = (start + step) % n;
                let mut client = self.replicas[i].client.clone();
                match client.$name(request.clone()).await {
                    Ok(answer) => {
                        if step > 0 {
                            self.current.store(i, Ordering::Relaxed);
                            tracing::info!(replica = %self.replicas[i].url, "control plane: moved to another replica");
                        }
                        return Ok(answer);
                    }
                    Err(status) if n > 1 && fails_over(&status) => {
                        tracing::debug!(replica = %self.replicas[i].url, code = ?status.code(), message = status.message(), "control-plane replica did not answer; trying the next");
                        last = Some(status);
                    }
                    Err(status) => return Err(status),
                }
            }
            // The loop ran at least once (n >= 1) and stored each failure.
            Err(last.unwrap_or_else(|| Status::unavailable("no control plane replica answered")))
        }
    )*};
}

impl ControlClient {
    /// Lazily connecting clients of every URL in `list` (comma-separated),
    /// over TLS when `tls` is given (then every URL must be `https://`).
    pub(crate) fn new(
        list: &str,
        token: Option<MetadataValue<Ascii>>,
        timeout: Duration,
        tls: Option<&TlsConfig>,
    ) -> Result<Self, ControlUrlError> {
        let replicas = split_urls(list)
            .map(|url| {
                let endpoint = tls::endpoint(url, tls)?
                    .connect_timeout(Duration::from_secs(2).min(timeout))
                    .timeout(timeout)
                    .tcp_nodelay(true);
                Ok(Replica {
                    url: url.to_owned(),
                    client: ControlPlaneClient::with_interceptor(
                        endpoint.connect_lazy(),
                        BearerAuth(token.clone()),
                    ),
                })
            })
            .collect::<Result<Vec<_>, ControlUrlError>>()?;
        if replicas.is_empty() {
            return Err(ControlUrlError::Empty);
        }
        Ok(Self {
            replicas: replicas.into(),
            current: Arc::default(),
            timeout,
        })
    }

    /// The first `http://` replica that answers with TLS: a plaintext call
    /// to it fails with an HTTP/2 protocol error that does not say why.
    pub(crate) async fn serving_tls(&self) -> Option<&str> {
        for replica in self.replicas.iter() {
            if tls::speaks_tls(&replica.url, self.timeout.min(Duration::from_secs(2))).await {
                return Some(&replica.url);
            }
        }
        None
    }

    /// The longest one call may take: each replica tried once.
    pub(crate) fn deadline(&self) -> Duration {
        self.timeout * self.replicas.len() as u32
    }

    failover! {
        /// `ControlPlane/Register`.
        register(pb::RegisterRequest) -> pb::RegisterResponse;
        /// `ControlPlane/Heartbeat`.
        heartbeat(pb::HeartbeatRequest) -> pb::HeartbeatResponse;
        /// `ControlPlane/Announce`.
        announce(pb::AnnounceRequest) -> pb::AnnounceResponse;
        /// `ControlPlane/Deregister`.
        deregister(pb::DeregisterRequest) -> pb::DeregisterResponse;
        /// `ControlPlane/FindProviders`.
        find_providers(pb::FindProvidersRequest) -> pb::FindProvidersResponse;
        /// `ControlPlane/ReportPeer`.
        report_peer(pb::ReportPeerRequest) -> pb::ReportPeerResponse;
    }
}
