//! Where the Redis store lives: a `--state` URL and the TLS material for it,
//! turned into clients of the primary, given directly or found through
//! Sentinel.
//!
//! - `redis://[user:password@]HOST:PORT[/DB]`: one server, plain TCP.
//! - `rediss://…`: the same over TLS (rustls with ring), trusting the
//!   system's roots or, when given, [`RedisTls::ca`] instead (as
//!   `redis-cli --cacert` does).
//! - `redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT…]/SERVICE[/DB]`:
//!   the sentinels are asked in turn (`SENTINEL get-master-addr-by-name`)
//!   which server is `SERVICE`'s primary; the credentials and the database
//!   are the primary's, the sentinels are asked without them.
//!   `rediss+sentinel://` speaks TLS to the sentinels and the primary alike.

use std::{fmt, time::Duration};

use redis::{AsyncConnectionConfig, Client, ClientTlsConfig, TlsCertificates};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// The port sentinels listen on when a `redis+sentinel://` URL names none.
const SENTINEL_PORT: u16 = 26379;

/// Trust and identity for TLS to Redis.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// PEM certificates trusted to sign Redis's certificate. `None`: the
    /// system's roots (rustls-native-certs). Given: these only, not the
    /// system's roots as well (the redis crate takes one set or the other).
    pub ca: Option<Vec<u8>>,
    /// A client certificate for a Redis that asks for one (`tls-auth-clients yes`).
    pub client: Option<RedisClientCert>,
}

/// A PEM certificate chain and its PEM private key.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisClientCert {
    /// The certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
}

// Neither certificates nor keys are printed.
impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.as_ref().map(|_| "<PEM>"))
            .field("client", &self.client.as_ref().map(|_| "<PEM>"))
            .finish()
    }
}

impl fmt::Debug for RedisClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisClientCert(<PEM>)")
    }
}

/// Why a `--state` value (with its TLS material) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisUrlError {
    /// Not a Redis URL at all.
    #[error(
        "{url:?} is not a Redis URL (expected redis://HOST:PORT[/DB], rediss://… or redis+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB])"
    )]
    NotRedis {
        /// What was given (password redacted).
        url: String,
    },
    /// A Redis URL the client cannot use (bad port, bad database number…).
    #[error("{url:?} is not a valid Redis URL: {reason}")]
    Invalid {
        /// What was given (password redacted).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS material given for a URL that does not use TLS.
    #[error("a CA or client certificate was given, but {url:?} does not use TLS (rediss://)")]
    TlsWithoutRediss {
        /// What was given (password redacted).
        url: String,
    },
    /// The CA bundle or the client certificate cannot be used.
    #[error("TLS to Redis: {reason}")]
    Tls {
        /// What is wrong with it.
        reason: String,
    },
}

/// The URL with any password replaced.
pub(super) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://<redacted>@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Where the primary is found.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// `redis://` or `rediss://`: this server.
    Direct(Client),
    /// `redis+sentinel://`: whichever server the sentinels name.
    Sentinel(Sentinels),
}

/// The sentinels watching one service, and how to reach the primary they name.
#[derive(Clone)]
pub(super) struct Sentinels {
    /// `HOST:PORT` of each sentinel, asked in this order.
    addrs: Vec<String>,
    /// The name the sentinels know the service by (`sentinel monitor NAME …`).
    service: String,
    /// `user:password` as written in the URL (still percent-encoded), for the primary.
    userinfo: Option<String>,
    /// The primary's database number.
    db: i64,
    tls: bool,
    material: RedisTls,
}

// The user information may carry a password.
impl fmt::Debug for Sentinels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sentinels")
            .field("addrs", &self.addrs)
            .field("service", &self.service)
            .field("db", &self.db)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Checks `url` and `tls` and builds what connecting needs; no network.
    pub(super) fn parse(url: &str, tls: &RedisTls) -> Result<Self, RedisUrlError> {
        let invalid = |reason: String| RedisUrlError::Invalid {
            url: redact_url(url),
            reason,
        };
        let (scheme, rest) = url.split_once("://").unwrap_or_default();
        let secure = match scheme {
            "redis" | "redis+sentinel" => false,
            "rediss" | "rediss+sentinel" => true,
            _ => {
                return Err(RedisUrlError::NotRedis {
                    url: redact_url(url),
                });
            }
        };
        if rest.is_empty() {
            return Err(invalid("no host".into()));
        }
        if !secure && (tls.ca.is_some() || tls.client.is_some()) {
            return Err(RedisUrlError::TlsWithoutRediss {
                url: redact_url(url),
            });
        }
        if secure {
            check_material(tls)?;
        }
        if !scheme.ends_with("+sentinel") {
            // The client's message does not repeat the password.
            return client(url, secure, tls)
                .map(Target::Direct)
                .map_err(|e| invalid(e.to_string()));
        }
        let sentinels = Sentinels::parse(rest, secure, tls).map_err(invalid)?;
        // Each sentinel address must make a client, and so must a primary.
        for addr in &sentinels.addrs {
            client(&sentinels.sentinel_url(addr), secure, tls)
                .map_err(|e| invalid(e.to_string()))?;
        }
        sentinels
            .primary_client("127.0.0.1", 6379)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Target::Sentinel(sentinels))
    }
}

/// A client of `url`, over TLS with `material` when `secure`.
fn client(url: &str, secure: bool, material: &RedisTls) -> redis::RedisResult<Client> {
    if !secure {
        return Client::open(url);
    }
    nebula_proto::tls::install_provider();
    Client::build_with_tls(
        url,
        TlsCertificates {
            client_tls: material.client.as_ref().map(|c| ClientTlsConfig {
                client_cert: c.cert.clone(),
                client_key: c.key.clone(),
            }),
            root_cert: material.ca.clone(),
        },
    )
}

/// Checks that the CA bundle holds certificates and the client key fits a
/// client certificate, so a mistake is told at start-up in our words.
fn check_material(tls: &RedisTls) -> Result<(), RedisUrlError> {
    let bad = |reason: String| RedisUrlError::Tls { reason };
    if let Some(ca) = &tls.ca {
        let certs = CertificateDer::pem_slice_iter(ca)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("the CA bundle is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad("the CA bundle holds no PEM certificate".into()));
        }
    }
    if let Some(c) = &tls.client {
        let certs = CertificateDer::pem_slice_iter(&c.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("the client certificate is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad(
                "the client certificate file holds no PEM certificate".into()
            ));
        }
        PrivateKeyDer::from_pem_slice(&c.key).map_err(|e| {
            bad(format!(
                "the client key holds no usable PEM private key: {e}"
            ))
        })?;
    }
    Ok(())
}

impl Sentinels {
    /// Parses what follows `redis+sentinel://`.
    fn parse(rest: &str, tls: bool, material: &RedisTls) -> Result<Self, String> {
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((user, hosts)) => (Some(user.to_owned()), hosts),
            None => (None, authority),
        };
        let addrs = hosts
            .split(',')
            .map(|h| sentinel_addr(h.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut segments = path.split('/');
        let service = segments.next().unwrap_or_default();
        if service.is_empty() {
            return Err(
                "no service name: expected redis+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]"
                    .into(),
            );
        }
        if !service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "service name {service:?}: letters, digits, '-', '_' and '.' only"
            ));
        }
        let db = match segments.next() {
            None | Some("") => 0,
            Some(db) => db
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| format!("database {db:?} is not a number"))?,
        };
        if segments.next().is_some() {
            return Err("too many path segments: expected /SERVICE[/DB]".into());
        }
        Ok(Self {
            addrs,
            service: service.to_owned(),
            userinfo,
            db,
            tls,
            material: material.clone(),
        })
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "rediss" } else { "redis" }
    }

    fn sentinel_url(&self, addr: &str) -> String {
        format!("{}://{addr}", self.scheme())
    }

    /// The service's name, for logs.
    pub(super) fn service(&self) -> &str {
        &self.service
    }

    /// A client of the primary at `host:port`, with the URL's credentials and database.
    pub(super) fn primary_client(&self, host: &str, port: u16) -> redis::RedisResult<Client> {
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let user = self
            .userinfo
            .as_deref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let url = format!("{}://{user}{host}:{port}/{}", self.scheme(), self.db);
        client(&url, self.tls, &self.material)
    }

    /// Asks each sentinel in turn for the primary's `(host, port)`; the first
    /// that knows answers. Each sentinel gets at most `timeout`.
    pub(super) async fn primary(&self, timeout: Duration) -> Result<(String, u16), String> {
        let mut errors = Vec::new();
        for addr in &self.addrs {
            match self.ask(addr, timeout).await {
                Ok(Some(primary)) => return Ok(primary),
                Ok(None) => errors.push(format!("{addr}: does not know {:?}", self.service)),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(format!(
            "no sentinel named the primary of {:?} ({})",
            self.service,
            errors.join("; ")
        ))
    }

    async fn ask(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> redis::RedisResult<Option<(String, u16)>> {
        let client = client(&self.sentinel_url(addr), self.tls, &self.material)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.service)
            .query_async(&mut conn)
            .await
    }
}

/// One `HOST[:PORT]` of a sentinel list, as `HOST:PORT`.
fn sentinel_addr(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("an empty sentinel address".into());
    }
    // `[v6]:port`, `[v6]`, `host:port` or `host`.
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("sentinel address {s:?}: unclosed '['"))?;
        (host, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    if host.is_empty() || host.contains(['@', '/', '?', '#', ' ']) {
        return Err(format!("sentinel address {s:?}: no usable host"));
    }
    let port = match port {
        None => SENTINEL_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("sentinel address {s:?}: bad port"))?,
    };
    Ok(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinels(url: &str) -> Sentinels {
        match Target::parse(url, &RedisTls::default()).unwrap() {
            Target::Sentinel(s) => s,
            Target::Direct(_) => panic!("{url} is not a sentinel URL"),
        }
    }

    #[test]
    fn sentinel_urls() {
        let s = sentinels("redis+sentinel://a:1,b,[::1]:3/mymaster/2");
        assert_eq!(s.addrs, ["a:1", "b:26379", "[::1]:3"]);
        assert_eq!((s.service.as_str(), s.db, s.tls), ("mymaster", 2, false));
        let s = sentinels("redis+sentinel://:pw@127.0.0.1:26379/main");
        assert_eq!(s.userinfo.as_deref(), Some(":pw"));
        assert!(!format!("{s:?}").contains("pw"));
        for bad in [
            "redis+sentinel://h:1",
            "redis+sentinel://h:1/",
            "redis+sentinel://h:0/main",
            "redis+sentinel://h:x/main",
            "redis+sentinel://h:1,,h:2/main",
            "redis+sentinel://h:1/main/x",
            "redis+sentinel://h:1/main/0/1",
            "redis+sentinel://h:1/ma in",
            "redis+sentinel://",
        ] {
            assert!(
                matches!(
                    Target::parse(bad, &RedisTls::default()),
                    Err(RedisUrlError::Invalid { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn tls_material_is_checked_and_wants_rediss() {
        let ca = RedisTls {
            ca: Some(b"not a certificate".to_vec()),
            client: None,
        };
        assert!(matches!(
            Target::parse("rediss://127.0.0.1:6380", &ca),
            Err(RedisUrlError::Tls { .. })
        ));
        assert!(matches!(
            Target::parse("redis://127.0.0.1:6380", &ca),
            Err(RedisUrlError::TlsWithoutRediss { .. })
        ));
        assert!(matches!(
            Target::parse("rediss://127.0.0.1:6380", &RedisTls::default()),
            Ok(Target::Direct(_))
        ));
        assert!(matches!(
            Target::parse("http://h", &RedisTls::default()),
            Err(RedisUrlError::NotRedis { .. })
        ));
    }
}
