//! The control-plane replicas a `--control URL[,URL…]` list names: each URL,
//! and, when its host is a DNS name with several addresses, each address, so
//! one name in front of several replicas fails over as a list would.
//!
//! [`expand`] resolves through a [`Resolve`] ([`SystemResolver`] outside
//! tests): tests hand it names that resolve to several loopback addresses
//! without touching the system's resolver.

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use futures::future::BoxFuture;
use nebula_proto::tls::{EndpointError, TlsConfig};
use tonic::{codegen::http::Uri, transport::Endpoint};

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
        let mut endpoint = nebula_proto::tls::endpoint(&self.url, tls)?;
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

#[cfg(test)]
pub(crate) mod tests {
    use std::{collections::HashMap, sync::Mutex};

    use super::*;

    /// A resolver answering from a table the test changes as it goes.
    #[derive(Debug, Default)]
    pub(crate) struct Table(pub(crate) Mutex<HashMap<String, Vec<IpAddr>>>);

    impl Table {
        pub(crate) fn set(&self, host: &str, ips: &[&str]) {
            let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
            self.0.lock().unwrap().insert(host.to_owned(), ips);
        }
    }

    impl Resolve for Table {
        fn resolve(
            &self,
            host: String,
            port: u16,
        ) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
            let answer = self.0.lock().unwrap().get(&host).cloned();
            Box::pin(async move {
                let ips = answer.ok_or_else(|| io::Error::other(format!("{host}: unknown")))?;
                Ok(ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect())
            })
        }
    }

    #[tokio::test]
    async fn names_become_one_replica_per_address_in_order() {
        let table = Table::default();
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
