//! [`Config`]: every limit and timer of the control plane, validated once.
//!
//! The listen address is not here: [`crate::serve`] takes an already-bound
//! listener, so tests bind `127.0.0.1:0` and the CLI binds what the operator asked.

use std::{sync::Arc, time::Duration};

use crate::store::InventoryCaps;
use nebula_common::credential::{PublicKey, SigningKey};
use nebula_proto::tls::TlsConfig;

/// The largest `limit` a `FindProviders` call may ask for, whatever the config says.
pub const HARD_MAX_DISCOVERY_LIMIT: u32 = 10_000;

/// Everything the control plane needs besides its listener.
///
/// Build it with struct update syntax over [`Config::default`]; [`crate::serve`]
/// and [`crate::ControlPlane::spawn`] call [`Config::validate`] before binding
/// anything to it.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// A peer's lease lapses this long after its last heartbeat (or registration).
    /// Must be longer than `heartbeat_interval`. Default 6 s.
    pub lease_ttl: Duration,
    /// How often peers are told to heartbeat. Default 2 s.
    pub heartbeat_interval: Duration,
    /// How often every registered peer is probed with `grpc.health.v1.Health/Check`.
    /// Default 2 s.
    pub probe_interval: Duration,
    /// Connect and answer deadline of one probe. Default 1 s.
    pub probe_timeout: Duration,
    /// Consecutive failed probes that mark a peer unhealthy. Default 3.
    pub unhealthy_after: u32,
    /// Consecutive passed probes that bring an unhealthy peer back. Default 2.
    pub healthy_after: u32,
    /// Probes in flight at once. Default 64.
    pub max_concurrent_probes: usize,
    /// Providers returned when a request asks for 0. Default 20.
    pub default_discovery_limit: u32,
    /// Cap on the providers one request may ask for. Default 200.
    pub max_discovery_limit: u32,
    /// Distinct reporters that quarantine a provider. Default 2.
    pub quarantine_after: u32,
    /// Bearer token every `ControlPlane` call must carry; `None`: open.
    pub join_token: Option<String>,
    /// Bearer token every `Admin` call over TCP (and every request for the
    /// live page's JSON) must carry; `None`: `Admin` is off on TCP and
    /// answers only on the admin socket ([`crate::ControlPlane::serve_admin_socket`]).
    pub admin_token: Option<String>,
    /// Deadline of one RPC on the server side. Default 10 s.
    pub request_timeout: Duration,
    /// Largest request or response message, in bytes. Default 32 MiB (an announce
    /// of 100,000 blobs with their SHA-256 aliases is about 14 MiB).
    pub max_message_size: usize,
    /// Blobs (added plus removed) one announce may carry. Default 100,000.
    pub max_announce_blobs: usize,
    /// How much inventory the state store takes, per peer and in all (see
    /// [`InventoryCaps`]); an announce past a cap is refused whole with
    /// `RESOURCE_EXHAUSTED`.
    pub inventory_caps: InventoryCaps,
    /// A connection that has not sent its greeting (TLS or HTTP/2) within
    /// this long is closed. Default 10 s.
    pub handshake_timeout: Duration,
    /// A connection with no call open for this long is closed. Default 2 min.
    pub idle_timeout: Duration,
    /// Connections one IP address may hold at once; more are closed as they
    /// are accepted. Default 256.
    pub connections_per_address: usize,
    /// HTTP/2 streams one connection may open at once. Default 1,024.
    pub max_concurrent_streams: u32,
    /// Streams a connection may make the server reset before it is closed
    /// (the "MadeYouReset" guard; tonic leaves it unlimited). Default 1,024.
    pub max_local_error_reset_streams: usize,
    /// HTTP/2 keepalive ping interval (and TCP keepalive). Default 30 s.
    pub keepalive_interval: Duration,
    /// An unanswered keepalive ping closes the connection after this long. Default 10 s.
    pub keepalive_timeout: Duration,
    /// How often the state store is checked, to report NOT_SERVING on the
    /// gRPC health service while it does not answer. Default 1 s.
    pub store_check_interval: Duration,
    /// A URL's record is used without asking the origin for this long after
    /// the origin last confirmed it; later it is revalidated. Default 10 min.
    pub url_ttl: Duration,
    /// Query parameters left out of a URL's key (e.g. the signature of a
    /// signed URL, which differs per request). Default none.
    pub url_ignore_query: Vec<String>,
    /// An origin lease lapses this long after its holder last renewed it;
    /// then the next asker takes over. Default 6 s.
    pub origin_lease_ttl: Duration,
    /// TLS on the gRPC server (which then needs a certificate and key) and on
    /// the health probes, which dial peers with `https://` and check their
    /// certificates against the fleet CA (showing this certificate when the
    /// peers require client certificates). `None`: plaintext. Default `None`.
    pub tls: Option<TlsConfig>,
    /// Signs peer credentials. Replicas share one (`--signing-key`); `None`:
    /// a key made at start, so credentials lapse with the process.
    pub signing_key: Option<Arc<SigningKey>>,
    /// Further public keys whose credentials are still accepted (and handed to
    /// peers), during a key rotation. Default none.
    pub verify_keys: Vec<PublicKey>,
    /// A credential is valid this long; heartbeats renew it past half its
    /// life. Default 15 min.
    pub credential_ttl: Duration,
    /// Accept registrations whose address is not the caller's source IP
    /// (peers behind a NAT or a proxy). Default false.
    pub allow_foreign_addresses: bool,
    /// Registrations one source IP may make per minute (as a burst, then
    /// refilled evenly). Default 600.
    pub registrations_per_minute: u32,
    /// Reports one peer may file per minute. Default 60.
    pub reports_per_minute: u32,
    /// A report counts only from a peer that discovery gave the reported
    /// provider to within this long. Default 10 min.
    pub report_window: Duration,
    /// A quarantine (and the reports that led to it) lapses this long after
    /// the last report, unless renewed by another. Bans and drains do not
    /// lapse. Default 1 h.
    pub quarantine_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(6),
            heartbeat_interval: Duration::from_secs(2),
            probe_interval: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(1),
            unhealthy_after: 3,
            healthy_after: 2,
            max_concurrent_probes: 64,
            default_discovery_limit: 20,
            max_discovery_limit: 200,
            quarantine_after: 2,
            join_token: None,
            admin_token: None,
            request_timeout: Duration::from_secs(10),
            max_message_size: 32 << 20,
            max_announce_blobs: 100_000,
            inventory_caps: InventoryCaps::default(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            connections_per_address: 256,
            max_concurrent_streams: 1024,
            max_local_error_reset_streams: 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            store_check_interval: Duration::from_secs(1),
            url_ttl: Duration::from_secs(600),
            url_ignore_query: Vec::new(),
            origin_lease_ttl: Duration::from_secs(6),
            tls: None,
            signing_key: None,
            verify_keys: Vec::new(),
            credential_ttl: Duration::from_secs(15 * 60),
            allow_foreign_addresses: false,
            registrations_per_minute: 600,
            reports_per_minute: 60,
            report_window: Duration::from_secs(600),
            quarantine_ttl: Duration::from_secs(3600),
        }
    }
}

// Tokens stay out of logs and panics.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |t: &Option<String>| t.as_ref().map(|_| "<redacted>");
        f.debug_struct("Config")
            .field("lease_ttl", &self.lease_ttl)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("probe_interval", &self.probe_interval)
            .field("probe_timeout", &self.probe_timeout)
            .field("unhealthy_after", &self.unhealthy_after)
            .field("healthy_after", &self.healthy_after)
            .field("max_concurrent_probes", &self.max_concurrent_probes)
            .field("default_discovery_limit", &self.default_discovery_limit)
            .field("max_discovery_limit", &self.max_discovery_limit)
            .field("quarantine_after", &self.quarantine_after)
            .field("join_token", &redact(&self.join_token))
            .field("admin_token", &redact(&self.admin_token))
            .field("request_timeout", &self.request_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("max_announce_blobs", &self.max_announce_blobs)
            .field("inventory_caps", &self.inventory_caps)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("connections_per_address", &self.connections_per_address)
            .field("max_concurrent_streams", &self.max_concurrent_streams)
            .field(
                "max_local_error_reset_streams",
                &self.max_local_error_reset_streams,
            )
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("store_check_interval", &self.store_check_interval)
            .field("url_ttl", &self.url_ttl)
            .field("url_ignore_query", &self.url_ignore_query)
            .field("origin_lease_ttl", &self.origin_lease_ttl)
            .field("tls", &self.tls)
            .field("signing_key", &self.signing_key)
            .field("verify_keys", &self.verify_keys)
            .field("credential_ttl", &self.credential_ttl)
            .field("allow_foreign_addresses", &self.allow_foreign_addresses)
            .field("registrations_per_minute", &self.registrations_per_minute)
            .field("reports_per_minute", &self.reports_per_minute)
            .field("report_window", &self.report_window)
            .field("quarantine_ttl", &self.quarantine_ttl)
            .finish()
    }
}

/// Why a [`Config`] cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A duration that must be positive is zero.
    #[error("{field} must be longer than zero")]
    ZeroDuration {
        /// The offending field.
        field: &'static str,
    },
    /// A count that must be positive is zero.
    #[error("{field} must be at least 1")]
    ZeroCount {
        /// The offending field.
        field: &'static str,
    },
    /// Peers would lose their lease between two heartbeats.
    #[error(
        "lease TTL ({lease_ttl:?}) must be longer than the heartbeat interval ({heartbeat_interval:?})"
    )]
    LeaseShorterThanHeartbeat {
        /// The configured lease TTL.
        lease_ttl: Duration,
        /// The configured heartbeat interval.
        heartbeat_interval: Duration,
    },
    /// Credentials would lapse before a heartbeat could renew them.
    #[error(
        "credential TTL ({credential_ttl:?}) must be at least four heartbeat intervals ({heartbeat_interval:?})"
    )]
    CredentialTtl {
        /// The configured credential TTL.
        credential_ttl: Duration,
        /// The configured heartbeat interval.
        heartbeat_interval: Duration,
    },
    /// The default discovery limit exceeds the cap.
    #[error("default discovery limit {default} exceeds the maximum {max}")]
    DiscoveryLimits {
        /// The default limit.
        default: u32,
        /// The cap.
        max: u32,
    },
    /// The cap on discovery answers is beyond [`HARD_MAX_DISCOVERY_LIMIT`].
    #[error("maximum discovery limit {max} exceeds {HARD_MAX_DISCOVERY_LIMIT}")]
    DiscoveryCap {
        /// The configured cap.
        max: u32,
    },
    /// A token is empty or cannot travel in an HTTP header.
    #[error("{field} must be non-empty visible ASCII without spaces")]
    BadToken {
        /// `join_token` or `admin_token`.
        field: &'static str,
    },
    /// TLS is on but no certificate and key are set for the server.
    #[error("TLS needs the server's certificate and private key")]
    TlsWithoutIdentity,
    /// The message size cannot hold even a small request.
    #[error("max message size {size} is below the minimum of {min} bytes")]
    MessageTooSmall {
        /// The configured size.
        size: usize,
        /// The smallest size accepted.
        min: usize,
    },
}

impl Config {
    /// Checks every field; [`crate::serve`] refuses a config that fails this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, d) in [
            ("lease_ttl", self.lease_ttl),
            ("heartbeat_interval", self.heartbeat_interval),
            ("probe_interval", self.probe_interval),
            ("probe_timeout", self.probe_timeout),
            ("request_timeout", self.request_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
            ("store_check_interval", self.store_check_interval),
            ("url_ttl", self.url_ttl),
            ("origin_lease_ttl", self.origin_lease_ttl),
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("report_window", self.report_window),
            ("quarantine_ttl", self.quarantine_ttl),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroDuration { field });
            }
        }
        for (field, n) in [
            ("unhealthy_after", u64::from(self.unhealthy_after)),
            ("healthy_after", u64::from(self.healthy_after)),
            ("max_concurrent_probes", self.max_concurrent_probes as u64),
            (
                "default_discovery_limit",
                u64::from(self.default_discovery_limit),
            ),
            ("max_discovery_limit", u64::from(self.max_discovery_limit)),
            ("quarantine_after", u64::from(self.quarantine_after)),
            ("max_announce_blobs", self.max_announce_blobs as u64),
            (
                "connections_per_address",
                self.connections_per_address as u64,
            ),
            ("inventory_caps.peer_blobs", self.inventory_caps.peer_blobs),
            (
                "inventory_caps.peer_partial",
                self.inventory_caps.peer_partial,
            ),
            ("inventory_caps.entries", self.inventory_caps.entries),
            (
                "max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
            (
                "max_local_error_reset_streams",
                self.max_local_error_reset_streams as u64,
            ),
            (
                "registrations_per_minute",
                u64::from(self.registrations_per_minute),
            ),
            ("reports_per_minute", u64::from(self.reports_per_minute)),
        ] {
            if n == 0 {
                return Err(ConfigError::ZeroCount { field });
            }
        }
        if self.lease_ttl <= self.heartbeat_interval {
            return Err(ConfigError::LeaseShorterThanHeartbeat {
                lease_ttl: self.lease_ttl,
                heartbeat_interval: self.heartbeat_interval,
            });
        }
        if self.credential_ttl < self.heartbeat_interval * 4 {
            return Err(ConfigError::CredentialTtl {
                credential_ttl: self.credential_ttl,
                heartbeat_interval: self.heartbeat_interval,
            });
        }
        if self.default_discovery_limit > self.max_discovery_limit {
            return Err(ConfigError::DiscoveryLimits {
                default: self.default_discovery_limit,
                max: self.max_discovery_limit,
            });
        }
        if self.max_discovery_limit > HARD_MAX_DISCOVERY_LIMIT {
            return Err(ConfigError::DiscoveryCap {
                max: self.max_discovery_limit,
            });
        }
        for (field, token) in [
            ("join_token", &self.join_token),
            ("admin_token", &self.admin_token),
        ] {
            if let Some(t) = token
                && (t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(ConfigError::BadToken { field });
            }
        }
        if self.tls.as_ref().is_some_and(|t| !t.has_identity()) {
            return Err(ConfigError::TlsWithoutIdentity);
        }
        const MIN_MESSAGE: usize = 64 << 10;
        if self.max_message_size < MIN_MESSAGE {
            return Err(ConfigError::MessageTooSmall {
                size: self.max_message_size,
                min: MIN_MESSAGE,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_contract() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(6));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(2));
        assert_eq!((c.unhealthy_after, c.healthy_after), (3, 2));
        assert_eq!(
            (c.default_discovery_limit, c.max_discovery_limit),
            (20, 200)
        );
    }

    #[test]
    fn refuses_inconsistent_configs() {
        let bad = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(matches!(
            bad(|c| c.lease_ttl = Duration::from_secs(1)),
            ConfigError::LeaseShorterThanHeartbeat { .. }
        ));
        assert!(matches!(
            bad(|c| c.probe_timeout = Duration::ZERO),
            ConfigError::ZeroDuration {
                field: "probe_timeout"
            }
        ));
        assert!(matches!(
            bad(|c| c.unhealthy_after = 0),
            ConfigError::ZeroCount { .. }
        ));
        assert!(matches!(
            bad(|c| c.default_discovery_limit = 500),
            ConfigError::DiscoveryLimits { .. }
        ));
        assert!(matches!(
            bad(|c| c.join_token = Some(String::new())),
            ConfigError::BadToken { .. }
        ));
        assert!(matches!(
            bad(|c| c.admin_token = Some("two words".into())),
            ConfigError::BadToken {
                field: "admin_token"
            }
        ));
        assert!(matches!(
            bad(|c| c.max_message_size = 10),
            ConfigError::MessageTooSmall { .. }
        ));
    }

    #[test]
    fn debug_redacts_tokens() {
        let c = Config {
            join_token: Some("s3cret".into()),
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
