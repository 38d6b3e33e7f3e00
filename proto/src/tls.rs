//! Transport security shared by every gRPC server and client of a fleet:
//! [`TlsConfig`] holds the fleet CA, this member's certificate and key, and
//! whether servers require client certificates (mutual TLS).
//!
//! TLS is a fleet-wide setting. A member with a `TlsConfig` serves with TLS,
//! dials every other member with `https://` and checks the certificate it is
//! shown against the fleet CA only (never the system's roots: a fleet CA is
//! private, and trusting every public CA would let anyone holding a public
//! certificate for the name pass as a member). The name checked is the host
//! of the URL dialed, so a peer's certificate must carry its advertised
//! address (an IP SAN for `IP:PORT`), unless [`TlsConfig::with_domain`] names
//! one name that every certificate of the fleet carries.
//!
//! Everything is checked when the config is built (the PEM parses, the CA is
//! usable as a trust anchor, the key matches the certificate), so a process
//! refuses bad files at start rather than at its first connection. The crypto
//! provider is rustls's `ring`, the only one in the tree.

use std::{fmt, sync::Arc, time::Duration};

use rustls::{
    CipherSuite, RootCertStore, ServerConfig,
    crypto::{CryptoProvider, ring::default_provider},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig, Uri};

/// The crypto provider of every TLS connection of the process: rustls's
/// `ring`, preferring AES-128-GCM. Its default prefers AES-256-GCM, which
/// takes 14 AES rounds per block where AES-128 takes 10; for chunk transfers,
/// where both ends encrypt every byte, the shorter key is the measurable
/// difference (both are far beyond brute force).
pub fn provider() -> CryptoProvider {
    let mut provider = default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// Makes [`provider`] the process's default (which tonic's TLS and every
/// other rustls user here take), unless a default is already set.
pub fn install_provider() {
    let _ = provider().install_default();
}

/// A TLS handshake that has not finished after this long is abandoned, on
/// either side: a client that opens a connection and says nothing holds no
/// server task for longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which PEM input an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemKind {
    /// The fleet CA certificate(s).
    Ca,
    /// This member's certificate chain.
    Certificate,
    /// This member's private key.
    Key,
}

impl fmt::Display for PemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ca => "CA certificate",
            Self::Certificate => "certificate",
            Self::Key => "private key",
        })
    }
}

/// Why TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The input holds no PEM block of the expected kind.
    #[error("no PEM-encoded {kind} found")]
    Missing {
        /// What was looked for.
        kind: PemKind,
    },
    /// A PEM block is malformed.
    #[error("malformed PEM {kind}: {reason}")]
    Malformed {
        /// What was being read.
        kind: PemKind,
        /// What is wrong with it.
        reason: String,
    },
    /// A CA certificate cannot be used to verify others.
    #[error("unusable CA certificate: {reason}")]
    BadCa {
        /// What is wrong with it.
        reason: String,
    },
    /// The key cannot be used, or does not belong to the certificate.
    #[error("the private key does not match the certificate: {reason}")]
    KeyMismatch {
        /// Why.
        reason: String,
    },
    /// `with_domain` got something that is not a DNS name or an IP address.
    #[error("{name:?} is not a valid TLS server name")]
    BadDomain {
        /// The name.
        name: String,
    },
    /// A server needs a certificate and key.
    #[error("a TLS server needs a certificate and its private key")]
    NoIdentity,
}

impl TlsError {
    /// The PEM input the error is about, when it is about one.
    pub fn pem_kind(&self) -> Option<PemKind> {
        match self {
            Self::Missing { kind } | Self::Malformed { kind, .. } => Some(*kind),
            Self::BadCa { .. } => Some(PemKind::Ca),
            Self::KeyMismatch { .. } => Some(PemKind::Key),
            Self::BadDomain { .. } | Self::NoIdentity => None,
        }
    }
}

/// A fleet member's TLS settings: checked PEM inputs, turned into tonic's
/// server and client configs on demand.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The fleet CA(s), PEM: verifies servers, and clients under client auth.
    ca: Vec<u8>,
    /// This member's certificate chain and private key, PEM.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Servers refuse clients without a certificate signed by `ca`.
    client_auth: bool,
    /// The name every certificate is checked against instead of the host dialed.
    domain: Option<String>,
}

// The private key stays out of logs and panics.
impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("identity", &self.identity.as_ref().map(|_| "<set>"))
            .field("client_auth", &self.client_auth)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

fn malformed(kind: PemKind) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError {
    move |e| TlsError::Malformed {
        kind,
        reason: e.to_string(),
    }
}

/// Every certificate of a PEM input; at least one.
fn certificates(pem: &[u8], kind: PemKind) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(malformed(kind))?;
    if certs.is_empty() {
        return Err(TlsError::Missing { kind });
    }
    Ok(certs)
}

impl TlsConfig {
    /// Settings that trust the CA certificate(s) in `ca_pem` (one or more
    /// PEM `CERTIFICATE` blocks), with no certificate of its own: enough for
    /// a client of a server that does not require client certificates.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Result<Self, TlsError> {
        let ca = ca_pem.into();
        let mut roots = RootCertStore::empty();
        for cert in certificates(&ca, PemKind::Ca)? {
            roots.add(cert).map_err(|e| TlsError::BadCa {
                reason: e.to_string(),
            })?;
        }
        Ok(Self {
            ca,
            identity: None,
            client_auth: false,
            domain: None,
        })
    }

    /// Adds this member's certificate chain (leaf first) and its private key
    /// (PKCS#8, PKCS#1 or SEC1), both PEM: served by servers, shown by
    /// clients when a server asks for one.
    pub fn with_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let (cert, key) = (cert_pem.into(), key_pem.into());
        let chain = certificates(&cert, PemKind::Certificate)?;
        let der = PrivateKeyDer::from_pem_slice(&key).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing { kind: PemKind::Key },
            other => malformed(PemKind::Key)(other),
        })?;
        CertifiedKey::from_der(chain, der, &default_provider()).map_err(|e| {
            TlsError::KeyMismatch {
                reason: e.to_string(),
            }
        })?;
        self.identity = Some((cert, key));
        Ok(self)
    }

    /// Servers built from these settings refuse clients that do not show a
    /// certificate signed by the fleet CA (mutual TLS).
    pub fn with_client_auth(mut self, required: bool) -> Self {
        self.client_auth = required;
        self
    }

    /// Checks every server certificate against `name` instead of the host of
    /// the URL dialed (peers are dialed by `IP:PORT`; a fleet may rather give
    /// every member a certificate for one shared name).
    pub fn with_domain(mut self, name: impl Into<String>) -> Result<Self, TlsError> {
        let name = name.into();
        if ServerName::try_from(name.as_str()).is_err() {
            return Err(TlsError::BadDomain { name });
        }
        self.domain = Some(name);
        Ok(self)
    }

    /// The name certificates are checked against instead of the host
    /// dialed, when one was given.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// Whether a certificate and key are set (a server needs them).
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// Whether servers require client certificates.
    pub fn client_auth(&self) -> bool {
        self.client_auth
    }

    fn tonic_identity(&self) -> Option<Identity> {
        self.identity
            .as_ref()
            .map(|(cert, key)| Identity::from_pem(cert, key))
    }

    /// tonic's server settings: this member's certificate, and under client
    /// auth the fleet CA that client certificates must chain to.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        install_provider();
        let identity = self.tonic_identity().ok_or(TlsError::NoIdentity)?;
        let config = ServerTlsConfig::new()
            .identity(identity)
            .timeout(HANDSHAKE_TIMEOUT);
        Ok(if self.client_auth {
            config.client_ca_root(Certificate::from_pem(&self.ca))
        } else {
            config
        })
    }

    /// rustls server settings for the HTTP endpoints (metrics, the live
    /// page, the registry mirror): the same certificate, and under client
    /// auth the same CA, as the gRPC server; HTTP/2 and HTTP/1.1 offered.
    pub fn http_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let (cert, key) = self.identity.as_ref().ok_or(TlsError::NoIdentity)?;
        let chain = certificates(cert, PemKind::Certificate)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(malformed(PemKind::Key))?;
        let provider = Arc::new(provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::KeyMismatch {
                reason: e.to_string(),
            })?;
        let builder = if self.client_auth {
            let mut roots = RootCertStore::empty();
            for ca in certificates(&self.ca, PemKind::Ca)? {
                roots.add(ca).map_err(|e| TlsError::BadCa {
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::BadCa {
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config =
            builder
                .with_single_cert(chain, key)
                .map_err(|e| TlsError::KeyMismatch {
                    reason: e.to_string(),
                })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// tonic's client settings: the fleet CA as the only root, this member's
    /// certificate when it has one.
    pub fn client_config(&self) -> ClientTlsConfig {
        install_provider();
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(identity) = self.tonic_identity() {
            config = config.identity(identity);
        }
        match &self.domain {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        }
    }
}

/// The scheme a member uses to dial others: `https` with TLS, else `http`.
pub fn scheme(tls: Option<&TlsConfig>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

/// Why a client endpoint cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The URL does not parse.
    #[error("{url:?} is not a valid URL: {source}")]
    Invalid {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// An `https://` URL with no TLS settings: tonic would refuse at the
    /// first call; refused here, before any.
    #[error("{url} is https:// but TLS is not configured (no CA to verify its certificate)")]
    HttpsWithoutTls {
        /// The URL.
        url: String,
    },
    /// An `http://` URL while TLS is configured: tokens would cross in clear.
    #[error("{url} is plaintext http:// but TLS is configured: use https://")]
    PlaintextWithTls {
        /// The URL.
        url: String,
    },
    /// tonic refused the TLS settings for this URL.
    #[error("TLS settings for {url}: {source}")]
    Tls {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// A client endpoint for `url`, with TLS exactly when `tls` is given: the
/// scheme must agree (`https://` with TLS, `http://` without), so a process
/// never speaks plaintext where the operator asked for TLS, nor the reverse.
pub fn endpoint(url: &str, tls: Option<&TlsConfig>) -> Result<Endpoint, EndpointError> {
    let invalid = |source| EndpointError::Invalid {
        url: url.to_owned(),
        source,
    };
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(invalid)?;
    let https = endpoint.uri().scheme_str() == Some("https");
    match (https, tls) {
        (true, Some(tls)) => {
            endpoint
                .tls_config(tls.client_config())
                .map_err(|source| EndpointError::Tls {
                    url: url.to_owned(),
                    source,
                })
        }
        (false, None) => Ok(endpoint),
        (true, None) => Err(EndpointError::HttpsWithoutTls {
            url: url.to_owned(),
        }),
        (false, Some(_)) => Err(EndpointError::PlaintextWithTls {
            url: url.to_owned(),
        }),
    }
}

/// Whether `url` names the `https` scheme.
pub fn is_https(url: &str) -> bool {
    url.parse::<Uri>()
        .is_ok_and(|u| u.scheme_str() == Some("https"))
}

/// Whether the server of a plaintext `http://` URL answers with TLS: sent
/// the HTTP/2 client preface, a TLS server answers with a TLS record (an
/// alert, content type 21, or a handshake, 22, version 3.x) where an HTTP/2
/// server answers with a SETTINGS frame. Asked after a plaintext call failed,
/// to tell the user to use `https://`; any doubt (no answer within
/// `timeout`, not a URL) is `false`.
pub async fn speaks_tls(url: &str, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(uri) = url.parse::<Uri>() else {
        return false;
    };
    let (Some(host), port) = (uri.host(), uri.port_u16().unwrap_or(80)) else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let probe = async {
        let mut conn = tokio::net::TcpStream::connect((host, port)).await?;
        conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut head = [0u8; 2];
        conn.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(matches!(head, [21 | 22, 3]))
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(true)))
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose,
    };

    use super::*;

    #[test]
    fn the_provider_prefers_aes_128_gcm() {
        let provider = provider();
        assert_eq!(
            provider.cipher_suites[0].suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(
            provider.cipher_suites.len(),
            default_provider().cipher_suites.len()
        );
    }

    fn ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    fn leaf(ca: &CertifiedIssuer<'static, KeyPair>) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn accepts_a_ca_and_a_matching_identity() {
        let ca = ca();
        let (cert, key) = leaf(&ca);
        let tls = TlsConfig::new(ca.pem())
            .unwrap()
            .with_identity(cert, key)
            .unwrap()
            .with_client_auth(true);
        assert!(tls.has_identity() && tls.client_auth());
        tls.server_config().unwrap();
        let shown = format!("{tls:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }

    #[test]
    fn refuses_bad_inputs_naming_which() {
        let ca = ca();
        let (cert, key) = leaf(&ca);
        let (_, other_key) = leaf(&ca);
        let kind = |r: Result<TlsConfig, TlsError>| r.unwrap_err().pem_kind();
        assert_eq!(kind(TlsConfig::new("hello")), Some(PemKind::Ca));
        assert_eq!(kind(TlsConfig::new(key.clone())), Some(PemKind::Ca));
        let truncated = &ca.pem()[..ca.pem().len() / 2];
        assert_eq!(kind(TlsConfig::new(truncated)), Some(PemKind::Ca));
        let base = TlsConfig::new(ca.pem()).unwrap();
        assert_eq!(
            kind(base.clone().with_identity(key.clone(), key.clone())),
            Some(PemKind::Certificate)
        );
        assert_eq!(
            kind(base.clone().with_identity(cert.clone(), cert.clone())),
            Some(PemKind::Key)
        );
        assert!(matches!(
            base.clone().with_identity(cert, other_key),
            Err(TlsError::KeyMismatch { .. })
        ));
        assert!(matches!(
            base.clone().with_domain("not a name"),
            Err(TlsError::BadDomain { .. })
        ));
        assert!(matches!(base.server_config(), Err(TlsError::NoIdentity)));
    }

    #[test]
    fn scheme_and_tls_must_agree() {
        let tls = TlsConfig::new(ca().pem()).unwrap();
        endpoint("https://127.0.0.1:1", Some(&tls)).unwrap();
        endpoint("http://127.0.0.1:1", None).unwrap();
        assert!(matches!(
            endpoint("https://127.0.0.1:1", None),
            Err(EndpointError::HttpsWithoutTls { .. })
        ));
        assert!(matches!(
            endpoint("http://127.0.0.1:1", Some(&tls)),
            Err(EndpointError::PlaintextWithTls { .. })
        ));
        assert_eq!(scheme(Some(&tls)), "https");
        assert!(is_https("https://h:1") && !is_https("http://h:1"));
    }
}
