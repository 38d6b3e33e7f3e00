//! What every client of a control plane shares, whichever service it calls
//! (the peer's `ControlPlane` calls, the CLI's `Admin` calls): the
//! `--control` URL list, the bearer token, and how a channel to one replica
//! is set up and dialed.
//!
//! This lives here rather than in the control plane's crate so that the peer,
//! which depends on this crate but not on the control plane's (and its Redis
//! and HTTP dependencies), uses the same code; `nebula_control::client`
//! re-exports it beside the admin client.

use std::{fmt, time::Duration};

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Channel, Endpoint, Uri},
};

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
/// normalized: parsing it again gives it back.
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
    Ok(url)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_url_lists_are_normalized_or_refused() {
        assert_eq!(parse_control_urls("h:7700").unwrap(), "http://h:7700");
        assert_eq!(parse_control_urls(" https://h ").unwrap(), "https://h");
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
}
