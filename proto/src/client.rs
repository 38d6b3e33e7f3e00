//! What every client of a control plane shares, whichever service it calls
//! (the peer's `ControlPlane` calls, the CLI's `Admin` calls): the
//! `--control` URL list, the bearer token, and how a channel to one replica
//! is set up and dialed, and the replicas a list names (a DNS name once per
//! address).
//!
//! This lives here rather than in the control plane's crate so that the peer,
//! which depends on this crate but not on the control plane's (and its Redis
//! and HTTP dependencies), uses the same code; `nebula_control::client`
//! re-exports it beside the admin client.

use std::{
    collections::HashMap,
    fmt, io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Channel, Endpoint, Uri},
};

use crate::tls::{EndpointError, TlsConfig};

/// Why a `--control` URL list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlUrlError {
    /// An entry of the list is blank.
    #[error("empty URL (expected http://HOST:PORT)")]
    Empty,
    /// A `HOST:PORT` shorthand without a valid port (a bare word is a typo,
    /// not a host).
    #[error("{given:?} is not a URL (expected http://HOST:PORT or HOST:PORT)")]
    NotAUrl {
        /// The entry as given.
        given: String,
    },
    /// The entry does not parse as a URI.
    #[error("{given:?} is not a URL: {reason}")]
    Unparsable {
        /// The entry as given.
        given: String,
        /// What the URI parser said.
        reason: String,
    },
    /// A scheme other than `http://` or `https://`.
    #[error("{given:?}: the scheme must be http:// or https://")]
    Scheme {
        /// The entry as given.
        given: String,
    },
    /// No host.
    #[error("{given:?} names no host")]
    NoHost {
        /// The entry as given.
        given: String,
    },
}

/// Parses a `--control` list: one control-plane URL or several replicas' as
/// `URL,URL,…`, each `http://host[:port]`, `https://…`, or the shorthand
/// `host:port` (made `http://host:port`). Anything else (no host, another
/// scheme, a bare word, an unparsable URI) is refused at once, before any
/// network call, rather than retried as a host name. The answer is the list
/// normalized (the shorthand spelled out, schemes in lower case, as a
/// [`crate::tls`] endpoint and a peer's `Config` expect them): parsing it
/// again gives it back.
pub fn parse_control_urls(list: &str) -> Result<String, ControlUrlError> {
    let urls = list
        .split(',')
        .map(parse_control_url)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(urls.join(","))
}

/// One entry of a `--control` list.
fn parse_control_url(entry: &str) -> Result<String, ControlUrlError> {
    let given = entry.trim();
    if given.is_empty() {
        return Err(ControlUrlError::Empty);
    }
    let url = if given.contains("://") {
        given.to_owned()
    } else {
        let port = given.rsplit_once(':').map(|(_, p)| p);
        if port.is_none_or(|p| p.parse::<u16>().is_err()) {
            return Err(ControlUrlError::NotAUrl {
                given: given.to_owned(),
            });
        }
        format!("http://{given}")
    };
    let uri: Uri = url.parse().map_err(|e| ControlUrlError::Unparsable {
        given: given.to_owned(),
        reason: format!("{e}"),
    })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(ControlUrlError::Scheme {
            given: given.to_owned(),
        });
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ControlUrlError::NoHost {
            given: given.to_owned(),
        });
    }
    // The URI parser reads `HTTP://` as `http://`; what is handed on is
    // spelled the way the rest of the workspace compares it.
    Ok(match url.split_once("://") {
        Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
        None => url,
    })
}

/// A token that cannot be sent as gRPC metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the token must be visible ASCII")]
pub struct InvalidToken;

/// A token ready to send as `authorization: Bearer <token>`. Its `Debug`
/// does not show the token.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl BearerToken {
    /// The `authorization` value for `token`.
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        format!("Bearer {token}")
            .parse()
            .map(Self)
            .map_err(|_| InvalidToken)
    }

    /// [`BearerToken::new`] of a token that may be absent.
    pub fn optional(token: Option<&str>) -> Result<Option<Self>, InvalidToken> {
        token.map(Self::new).transpose()
    }

    /// Adds the token to `request`.
    pub fn authorize<T>(&self, request: &mut Request<T>) {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

/// An interceptor adding the token, when there is one, to every call.
#[derive(Debug, Clone, Default)]
pub struct Bearer(pub Option<BearerToken>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            token.authorize(&mut request);
        }
        Ok(request)
    }
}

/// The longest a client waits for one replica to accept a connection: a
/// replica that does not is skipped for the next well before a call's own
/// deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `endpoint` set up as every control-plane client dials: calls time out
/// after `timeout`, connecting after [`CONNECT_TIMEOUT`] at most, and small
/// requests are not delayed by Nagle's algorithm.
pub fn control_endpoint(endpoint: Endpoint, timeout: Duration) -> Endpoint {
    endpoint
        .connect_timeout(CONNECT_TIMEOUT.min(timeout))
        .timeout(timeout)
        .tcp_nodelay(true)
}

/// No replica of a list accepted a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The list named no replica.
    #[error("no control plane replica to dial")]
    NoReplica,
    /// The last replica tried refused; the others did too.
    #[error("cannot reach the control plane at {replica}")]
    Unreachable {
        /// The last replica tried, as its caller names it.
        replica: String,
        /// Why it could not be reached.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A channel to the first of `replicas` that accepts a connection, each
/// given with the name errors use and its endpoint (see
/// [`control_endpoint`]), tried in order.
pub async fn connect_first<N: fmt::Display>(
    replicas: impl IntoIterator<Item = (N, Endpoint)>,
) -> Result<Channel, ConnectError> {
    let mut last = ConnectError::NoReplica;
    for (replica, endpoint) in replicas {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(source) => {
                tracing::debug!(%replica, error = %source, "control-plane replica unreachable; trying the next");
                last = ConnectError::Unreachable {
                    replica: replica.to_string(),
                    source,
                };
            }
        }
    }
    Err(last)
}

// The replicas a `--control` list names: each URL, and, when its host is a
// DNS name with several addresses, each address, so one name in front of
// several replicas fails over as a list would. `expand` resolves through a
// `Resolve` (`SystemResolver` outside tests and simulators).

/// Turns a host name into addresses.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host`, in the order to try them.
    fn resolve(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>>;
}

/// The system's resolver (`getaddrinfo`, through Tokio): its order is the
/// system's preference (RFC 6724), which is the order replicas are tried in.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }
}

/// A shared resolver.
pub type Resolver = Arc<dyn Resolve>;

/// One replica to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// What to dial: the URL given, its host replaced by one address when it
    /// was a name.
    pub url: String,
    /// The URL as given (its authority is what requests carry).
    pub given: String,
}

impl Replica {
    /// Whether it came from a name (dialled by address).
    pub fn resolved(&self) -> bool {
        self.url != self.given
    }

    /// A client endpoint dialing it, over TLS exactly when `tls` is given.
    /// A replica found through a name is dialed by address, but its requests
    /// name the host as given and its certificate is checked against that
    /// name (unless the TLS settings name one for every certificate).
    pub fn endpoint(&self, tls: Option<&TlsConfig>) -> Result<Endpoint, EndpointError> {
        let mut endpoint = crate::tls::endpoint(&self.url, tls)?;
        if !self.resolved() {
            return Ok(endpoint);
        }
        let invalid = |source| EndpointError::Invalid {
            url: self.given.clone(),
            source,
        };
        let given = Endpoint::from_shared(self.given.clone()).map_err(invalid)?;
        if let (Some(tls), Some(host)) = (tls.filter(|t| t.domain().is_none()), given.uri().host())
        {
            endpoint = endpoint
                .tls_config(tls.client_config().domain_name(host.to_owned()))
                .map_err(|source| EndpointError::Tls {
                    url: self.given.clone(),
                    source,
                })?;
        }
        Ok(endpoint.origin(given.uri().clone()))
    }
}

impl fmt::Display for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.resolved() {
            write!(f, "{} ({})", self.given, self.url)
        } else {
            f.write_str(&self.given)
        }
    }
}

/// The URLs of a comma-separated `--control` list, blanks skipped.
pub fn split_urls(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty())
}

/// Every replica `list` names, in order: a URL whose host is an address as
/// it is; one whose host is a name once per address the name resolves to,
/// in the resolver's order. An address named twice is tried once. A name
/// that does not resolve (or a URL this cannot read) stays as given, so
/// dialling it reports why.
pub async fn expand(list: &str, resolver: &dyn Resolve) -> Vec<Replica> {
    let mut out: Vec<Replica> = Vec::new();
    for given in split_urls(list) {
        for url in expand_one(given, resolver).await {
            if !out.iter().any(|r| r.url == url) {
                out.push(Replica {
                    url,
                    given: given.to_owned(),
                });
            }
        }
    }
    out
}

/// The URLs to dial for one given URL.
async fn expand_one(given: &str, resolver: &dyn Resolve) -> Vec<String> {
    let Ok(uri) = given.parse::<Uri>() else {
        return vec![given.to_owned()];
    };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return vec![given.to_owned()];
    };
    if host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
    {
        return vec![given.to_owned()];
    }
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| *p != "/")
        .unwrap_or("");
    match resolver.resolve(host.to_owned(), port).await {
        Ok(addrs) if !addrs.is_empty() => addrs
            .into_iter()
            .map(|a| format!("{scheme}://{a}{path}"))
            .collect(),
        Ok(_) => vec![given.to_owned()],
        Err(e) => {
            tracing::debug!(url = given, error = %e, "control-plane name did not resolve");
            vec![given.to_owned()]
        }
    }
}

/// A resolver answering from a table set by hand, changed as it goes (tests
/// and simulators: names resolving to several loopback addresses without the
/// system's resolver).
#[derive(Debug, Default)]
pub struct FixedResolver(Mutex<HashMap<String, Vec<IpAddr>>>);

impl FixedResolver {
    /// Makes `host` resolve to `ips`.
    ///
    /// # Panics
    ///
    /// If an entry of `ips` is not an IP address.
    pub fn set(&self, host: &str, ips: &[&str]) {
        let ips = ips
            .iter()
            .map(|ip| ip.parse().expect("an IP address"))
            .collect();
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(host.to_owned(), ips);
    }
}

impl Resolve for FixedResolver {
    fn resolve(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        let answer = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&host)
            .cloned();
        Box::pin(async move {
            let ips = answer.ok_or_else(|| io::Error::other(format!("{host}: unknown")))?;
            Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_url_lists_are_normalized_or_refused() {
        assert_eq!(parse_control_urls("h:7700").unwrap(), "http://h:7700");
        assert_eq!(parse_control_urls(" https://h ").unwrap(), "https://h");
        assert_eq!(
            parse_control_urls("HTTP://cp:7700,Https://h").unwrap(),
            "http://cp:7700,https://h"
        );
        let again = parse_control_urls("HTTP://cp:7700").unwrap();
        assert_eq!(parse_control_urls(&again).unwrap(), again);
        assert_eq!(
            parse_control_urls("a:1, http://b:2").unwrap(),
            "http://a:1,http://b:2"
        );
        for bad in [
            "",
            "a:1,",
            "a:1,notaurl",
            "notaurl",
            "http://[::1",
            "ftp://x",
            "http://",
            "h:port",
        ] {
            assert!(parse_control_urls(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bearer_token_is_sent_and_not_shown() {
        let token = BearerToken::new("s3cret").unwrap();
        assert!(!format!("{token:?}").contains("s3cret"));
        let request = Bearer(Some(token)).call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        let request = Bearer::default().call(Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
        assert_eq!(BearerToken::new("new\nline").unwrap_err(), InvalidToken);
        assert!(BearerToken::optional(None).unwrap().is_none());
    }

    #[tokio::test]
    async fn connect_first_skips_replicas_that_refuse() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_addr = open.local_addr().unwrap();
        let endpoint = |addr| {
            control_endpoint(
                Endpoint::from_shared(format!("http://{addr}")).unwrap(),
                Duration::from_secs(1),
            )
        };
        let err = connect_first([("closed", endpoint(closed_addr))])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
        // A listener accepts the TCP connection, which is all `connect` waits for.
        let accept = tokio::spawn(async move { open.accept().await.map(|_| ()) });
        connect_first([
            ("closed", endpoint(closed_addr)),
            ("open", endpoint(open_addr)),
        ])
        .await
        .unwrap();
        accept.await.unwrap().unwrap();
        assert!(matches!(
            connect_first(Vec::<(&str, Endpoint)>::new()).await,
            Err(ConnectError::NoReplica)
        ));
    }

    #[tokio::test]
    async fn names_become_one_replica_per_address_in_order() {
        let table = FixedResolver::default();
        table.set("cp.test", &["127.0.0.2", "127.0.0.3", "::1"]);
        table.set("again.test", &["127.0.0.3", "127.0.0.4"]);
        let urls: Vec<String> = expand(
            "http://cp.test:7700, http://127.0.0.9:7700,http://again.test:7700,http://nowhere.test",
            &table,
        )
        .await
        .into_iter()
        .map(|r| r.url)
        .collect();
        assert_eq!(
            urls,
            [
                "http://127.0.0.2:7700",
                "http://127.0.0.3:7700",
                "http://[::1]:7700",
                "http://127.0.0.9:7700",
                // 127.0.0.3:7700 came first from cp.test: tried once.
                "http://127.0.0.4:7700",
                // Unresolved: as given, so dialling it says why.
                "http://nowhere.test",
            ]
        );
        let r = &expand("http://cp.test:7700", &table).await[0];
        assert_eq!(r.to_string(), "http://cp.test:7700 (http://127.0.0.2:7700)");
    }

    #[tokio::test]
    async fn localhost_resolves_through_the_system() {
        // `localhost` is a name: expanded through getaddrinfo to at least one
        // loopback address (127.0.0.1 here; ::1 too where the system says so).
        let replicas = expand("http://localhost:7700", &SystemResolver).await;
        assert!(!replicas.is_empty());
        for r in &replicas {
            let uri: Uri = r.url.parse().unwrap();
            let ip: IpAddr = uri
                .host()
                .unwrap()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .unwrap();
            assert!(ip.is_loopback(), "{r}");
            assert_eq!(uri.port_u16(), Some(7700));
        }
    }
}
