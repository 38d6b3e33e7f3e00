//! [`ControlClient`]: the peer's client of the control plane, over one or
//! more replicas (`--control URL[,URL…]`).
//!
//! The replicas are the URLs given, a URL whose host is a DNS name counting
//! once per address it resolves to (see [`nebula_proto::client::expand`]); names are
//! resolved before the first call. Every call goes to the current replica;
//! when that one does not answer (unavailable, timed out, connection lost)
//! the same request is tried on the next, and the first that answers becomes
//! current for every later call of this peer (heartbeats, announcements,
//! discovery alike). When none answers, the names are resolved again and,
//! if that gives other addresses, the call tries those too. Requests are
//! small protobuf messages, so retrying one is a clone. A call tries each
//! replica at most once per resolution, and resolves at most twice.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use nebula_proto::{
    client::{BearerToken, Replica, Resolver, SystemResolver, control_endpoint, split_urls},
    tls::{self, EndpointError, TlsConfig},
    v1::{self as pb, control_plane_client::ControlPlaneClient},
};
use tonic::{Code, Response, Status, service::interceptor::InterceptedService, transport::Channel};

use crate::identity::{self, Identity};

/// Adds `authorization: Bearer <token>` and this peer's credential (once it
/// has one) to every control-plane call.
#[derive(Debug, Clone)]
pub(crate) struct BearerAuth {
    token: Option<BearerToken>,
    identity: Arc<Identity>,
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.token {
            token.authorize(&mut req);
        }
        identity::present(&self.identity, &mut req);
        Ok(req)
    }
}

type Client = ControlPlaneClient<InterceptedService<Channel, BearerAuth>>;

/// A replica of the list, with its client.
#[derive(Debug)]
struct Dialed {
    address: Replica,
    client: Client,
}

/// A control-plane client that fails over between replicas. Cloning is cheap
/// and clones share the replicas and which one is current.
#[derive(Debug, Clone)]
pub(crate) struct ControlClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// The `--control` list as given (checked: at least one URL, each valid).
    list: String,
    token: Option<BearerToken>,
    identity: Arc<Identity>,
    timeout: Duration,
    /// TLS to every replica (then every URL is `https://`).
    tls: Option<TlsConfig>,
    resolver: Resolver,
    /// The replicas of the last resolution; `None` before the first call.
    replicas: RwLock<Option<Arc<[Dialed]>>>,
    current: AtomicUsize,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("list", &self.list)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why a control-plane URL list cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlListError {
    /// The list is empty.
    #[error("no control plane URL given")]
    Empty,
    /// One URL is malformed, or its scheme disagrees with the TLS settings.
    #[error("control plane URL: {0}")]
    Invalid(#[from] EndpointError),
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
            let mut replicas = self.replicas().await;
            let mut last = None;
            // At most two rounds: the second over a new resolution.
            for round in 0..2 {
                let n = replicas.len();
                if n == 0 {
                    break;
                }
                let start = self.inner.current.load(Ordering::Relaxed) % n;
                for step in 0..n {
                    let i = (start + step) % n;
                    let mut client = replicas[i].client.clone();
                    match client.$name(request.clone()).await {
                        Ok(answer) => {
                            if step > 0 || round > 0 {
                                self.inner.current.store(i, Ordering::Relaxed);
                                tracing::info!(replica = %replicas[i].address, "control plane: moved to another replica");
                            }
                            return Ok(answer);
                        }
                        Err(status) if fails_over(&status) => {
                            tracing::debug!(replica = %replicas[i].address, code = ?status.code(), message = status.message(), "control-plane replica did not answer; trying the next");
                            last = Some(status);
                        }
                        Err(status) => return Err(status),
                    }
                }
                match self.resolve_again(&replicas).await {
                    Some(fresh) if round == 0 => replicas = fresh,
                    _ => break,
                }
            }
            // Every failure stored here means a replica did not answer (a
            // refused connection, one closed under the call, a deadline):
            // together, the control plane is unavailable.
            Err(Status::unavailable(match last {
                Some(status) => format!(
                    "no control plane replica answered (the last: {})",
                    status.message()
                ),
                None => "no control plane replica answered".to_owned(),
            }))
        }
    )*};
}

impl ControlClient {
    /// Clients of every URL in `list` (comma-separated), over TLS when `tls`
    /// is given (then every URL must be `https://`); names are resolved by
    /// the system's resolver before the first call.
    pub(crate) fn new(
        list: &str,
        token: Option<BearerToken>,
        identity: Arc<Identity>,
        timeout: Duration,
        tls: Option<&TlsConfig>,
    ) -> Result<Self, ControlListError> {
        Self::with_resolver(
            list,
            token,
            identity,
            timeout,
            tls,
            Arc::new(SystemResolver),
        )
    }

    /// [`ControlClient::new`] resolving names through `resolver`.
    pub(crate) fn with_resolver(
        list: &str,
        token: Option<BearerToken>,
        identity: Arc<Identity>,
        timeout: Duration,
        tls: Option<&TlsConfig>,
        resolver: Resolver,
    ) -> Result<Self, ControlListError> {
        let mut any = false;
        for url in split_urls(list) {
            tls::endpoint(url, tls)?;
            any = true;
        }
        if !any {
            return Err(ControlListError::Empty);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                list: list.to_owned(),
                token,
                identity,
                timeout,
                tls: tls.cloned(),
                resolver,
                replicas: RwLock::new(None),
                current: AtomicUsize::new(0),
            }),
        })
    }

    /// A client of one control plane reached over `channel`, never dialed
    /// or resolved (tests: a fake control plane in process).
    #[cfg(test)]
    pub(crate) fn over(channel: Channel, identity: Arc<Identity>, timeout: Duration) -> Self {
        let given = "http://127.0.0.1:1".to_owned();
        let this = Self::with_resolver(
            &given,
            None,
            Arc::clone(&identity),
            timeout,
            None,
            Arc::new(SystemResolver),
        )
        .expect("an address URL");
        let replica = Dialed {
            address: Replica {
                url: given.clone(),
                given,
            },
            client: ControlPlaneClient::with_interceptor(
                channel,
                BearerAuth {
                    token: None,
                    identity,
                },
            ),
        };
        *this
            .inner
            .replicas
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::from([replica]));
        this
    }

    /// The first `http://` replica that answers with TLS: a plaintext call
    /// to it fails with an HTTP/2 protocol error that does not say why.
    pub(crate) async fn serving_tls(&self) -> Option<String> {
        let wait = self.inner.timeout.min(Duration::from_secs(2));
        for replica in self.replicas().await.iter() {
            if tls::speaks_tls(&replica.address.url, wait).await {
                return Some(replica.address.url.clone());
            }
        }
        None
    }

    /// The longest one call may take: each replica tried once, twice when
    /// a second resolution found others.
    pub(crate) fn deadline(&self) -> Duration {
        let known = self.known().map_or(0, |r| r.len());
        let n = known.max(split_urls(&self.inner.list).count()) as u32;
        self.inner.timeout * n * 2
    }

    fn known(&self) -> Option<Arc<[Dialed]>> {
        // Whole values only are stored under the lock: a poisoned one is usable.
        let replicas = self
            .inner
            .replicas
            .read()
            .unwrap_or_else(|p| p.into_inner());
        replicas.clone()
    }

    /// The replicas, resolving the list on the first call.
    async fn replicas(&self) -> Arc<[Dialed]> {
        match self.known() {
            Some(replicas) => replicas,
            None => self.resolve().await,
        }
    }

    /// Resolves the list again after every replica in `tried` failed; the
    /// new replicas when they differ from those.
    async fn resolve_again(&self, tried: &[Dialed]) -> Option<Arc<[Dialed]>> {
        if !tried.iter().any(|r| r.address.resolved()) {
            return None;
        }
        let fresh = self.resolve().await;
        let same = fresh.len() == tried.len()
            && fresh.iter().zip(tried).all(|(a, b)| a.address == b.address);
        (!same).then_some(fresh)
    }

    /// Resolves the list and makes lazily connecting clients of its replicas.
    async fn resolve(&self) -> Arc<[Dialed]> {
        let addresses = nebula_proto::client::expand(&self.inner.list, &*self.inner.resolver).await;
        let replicas: Arc<[Dialed]> = addresses
            .into_iter()
            .filter_map(|address| {
                let client = self.client(&address)?;
                Some(Dialed { address, client })
            })
            .collect();
        *self
            .inner
            .replicas
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(replicas.clone());
        replicas
    }

    fn client(&self, address: &Replica) -> Option<Client> {
        // Every URL of the list was checked by `with_resolver`, and one with
        // its host replaced by an address parses as well.
        let endpoint = address.endpoint(self.inner.tls.as_ref()).ok()?;
        let endpoint = control_endpoint(endpoint, self.inner.timeout);
        Some(ControlPlaneClient::with_interceptor(
            endpoint.connect_lazy(),
            BearerAuth {
                token: self.inner.token.clone(),
                identity: Arc::clone(&self.inner.identity),
            },
        ))
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
        /// `ControlPlane/ResolveUrl`.
        resolve_url(pb::ResolveUrlRequest) -> pb::ResolveUrlResponse;
        /// `ControlPlane/RecordUrl`.
        record_url(pb::RecordUrlRequest) -> pb::RecordUrlResponse;
    }
}

#[cfg(test)]
mod tests {
    use nebula_control::{Config, ControlPlane};
    use tokio::net::TcpListener;

    use super::*;
    use nebula_proto::client::FixedResolver;

    /// Listeners on one port, free on every address of `ips`.
    async fn same_port(ips: &[&str]) -> Vec<TcpListener> {
        for _attempt in 0..20 {
            let first = TcpListener::bind((ips[0], 0)).await.unwrap();
            let port = first.local_addr().unwrap().port();
            let mut all = vec![first];
            for ip in &ips[1..] {
                match TcpListener::bind((*ip, port)).await {
                    Ok(l) => all.push(l),
                    Err(_) => break,
                }
            }
            if all.len() == ips.len() {
                return all;
            }
        }
        panic!("no port free on every one of {ips:?}");
    }

    fn register(id: &str) -> pb::RegisterRequest {
        pb::RegisterRequest {
            peer_id: id.into(),
            address: "127.0.0.1:9".into(),
            ..Default::default()
        }
    }

    /// Registers `id` through `client`, keeping its credential as membership does.
    async fn join(client: &ControlClient, identity: &Identity, id: &str) {
        let answer = client.register(register(id)).await.unwrap().into_inner();
        identity.update(&answer.credential, &answer.verify_keys);
    }

    /// Whether the replica at `addr` knows `id` (asked directly, no failover,
    /// with the credential `identity` got last: another replica's is refused).
    async fn knows(addr: std::net::SocketAddr, identity: &Identity, id: &str) -> bool {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut beat = tonic::Request::new(pb::HeartbeatRequest {
            peer_id: id.into(),
            load: None,
        });
        identity::present(identity, &mut beat);
        match ControlPlaneClient::new(channel).heartbeat(beat).await {
            Ok(answer) => !answer.into_inner().unknown_peer,
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                false
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_name_with_several_addresses_fails_over_among_them_and_is_resolved_again() {
        let mut listeners = same_port(&["127.0.0.2", "127.0.0.3", "127.0.0.4"]).await;
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let later = listeners.pop().unwrap();
        let mut running = Vec::new();
        for l in listeners {
            running.push(ControlPlane::spawn(l, Config::default()).await.unwrap());
        }
        let table = Arc::new(FixedResolver::default());
        table.set("cp.nebula.test", &["127.0.0.2", "127.0.0.3"]);
        let url = format!("http://cp.nebula.test:{}", addrs[0].port());
        let identity = Arc::new(Identity::default());
        let client = ControlClient::with_resolver(
            &url,
            None,
            Arc::clone(&identity),
            Duration::from_secs(2),
            None,
            table.clone(),
        )
        .unwrap();

        // The first address answers while it is up.
        join(&client, &identity, "p1").await;
        assert!(knows(addrs[0], &identity, "p1").await);
        assert!(!knows(addrs[1], &identity, "p1").await);

        // It dies: calls move to the name's second address and stay there.
        running.remove(0).shutdown().await.unwrap();
        join(&client, &identity, "p2").await;
        assert!(knows(addrs[1], &identity, "p2").await);
        join(&client, &identity, "p3").await;
        assert!(knows(addrs[1], &identity, "p3").await);

        // Both known addresses dead and the name now resolving elsewhere: the
        // call that found none answering resolves again and reaches it.
        table.set("cp.nebula.test", &["127.0.0.4"]);
        running.push(ControlPlane::spawn(later, Config::default()).await.unwrap());
        running.remove(0).shutdown().await.unwrap();
        join(&client, &identity, "p4").await;
        assert!(knows(addrs[2], &identity, "p4").await);

        // Nothing answers at all: UNAVAILABLE within the client's deadline.
        running.remove(0).shutdown().await.unwrap();
        let start = tokio::time::Instant::now();
        let err = client.register(register("p5")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(start.elapsed() < client.deadline(), "{:?}", start.elapsed());
    }
}
