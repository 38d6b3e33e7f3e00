//! The daemon's typed, validated configuration.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use nebula_proto::{
    client::{ControlUrlError, parse_control_urls, split_urls},
    tls::{self, EndpointError, TlsConfig},
};

/// Why a [`Config`] was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A count or size is below its minimum.
    #[error("{field} must be at least {min}")]
    TooSmall {
        /// The setting, as a flag would name it.
        field: &'static str,
        /// Its least value.
        min: u64,
    },
    /// A duration is zero.
    #[error("{field} must be above zero")]
    Zero {
        /// The setting, as a flag would name it.
        field: &'static str,
    },
    /// A control plane was asked for with an empty URL list.
    #[error("no control plane URL given")]
    NoControlUrl,
    /// A control plane URL is neither `http://` nor `https://`.
    #[error("control plane URL {url:?} must start with http:// or https://")]
    ControlScheme {
        /// The URL.
        url: String,
    },
    /// A control plane URL does not parse, or names no host.
    #[error("control plane URL {url:?}")]
    ControlUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        #[source]
        source: ControlUrlError,
    },
    /// A control plane URL does not fit the TLS settings.
    #[error("control plane URL {url:?}")]
    ControlTls {
        /// The URL.
        url: String,
        /// What does not fit.
        #[source]
        source: EndpointError,
    },
    /// TLS is on, but this peer has no certificate to show.
    #[error("TLS needs this peer's certificate and private key")]
    TlsIdentity,
}

/// How other peers are dialed.
#[derive(Debug, Clone)]
pub struct DialConfig {
    /// Dialing a peer fails after this long.
    pub connect_timeout: Duration,
    /// HTTP/2 pings on a dialed stream this often: a provider that goes
    /// silent (stopped, its host gone) stops answering them.
    pub keepalive_interval: Duration,
    /// A ping unanswered this long closes the stream, and its requests move
    /// to other providers at once.
    pub keepalive_timeout: Duration,
    /// Streams the remote may reset for errors before the connection is closed.
    pub max_local_resets: usize,
}

impl Default for DialConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(5),
            max_local_resets: 1024,
        }
    }
}

/// How a download finds providers and treats those that fail.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Providers asked of the control plane at once.
    pub limit: u32,
    /// The first pause of a provider that failed; doubled per failure in a row.
    pub backoff: Duration,
    /// The longest pause of a provider that keeps failing.
    pub max_backoff: Duration,
    /// Failures in a row (errors, busy answers past patience) before a
    /// provider's worker gives up.
    pub max_failures: u32,
    /// The least time with no data before a provider counts as stalled (its
    /// usual latency may raise it).
    pub stall_floor: Duration,
    /// How long a provider has to answer for a blob's outboard.
    pub outboard_timeout: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            limit: 50,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_failures: 3,
            stall_floor: Duration::from_secs(2),
            outboard_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything a [`Node`](crate::Node) needs besides its listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// The store directory.
    pub store: PathBuf,
    /// Control plane URLs (`http://host:port`, several replicas separated by
    /// commas, tried in turn); `None` runs without one.
    pub control: Option<String>,
    /// Join token sent to the control plane.
    pub join_token: Option<String>,
    /// Address other peers dial; `None`: the listener's own address.
    pub advertise: Option<SocketAddr>,
    /// Locality label announced to the control plane.
    pub zone: String,
    /// Upload slots: chunk requests served or queued at once across all streams;
    /// past it, requests are answered busy.
    pub upload_slots: u32,
    /// Upload byte rate, `None` for unlimited.
    pub upload_limit: Option<u64>,
    /// Download byte rate, `None` for unlimited.
    pub download_limit: Option<u64>,
    /// Providers a download uses at once (K).
    pub max_providers: usize,
    /// A fetch fails after this long with no usable provider.
    pub no_provider_timeout: Duration,
    /// How often a download asks the control plane again for providers.
    pub rediscover_interval: Duration,
    /// Partial progress is announced to the control plane at most this often.
    pub announce_interval: Duration,
    /// A serving stream whose receiver takes this long to accept one message
    /// is dropped, giving back its upload slots at once.
    pub idle_stream_timeout: Duration,
    /// Upload slots one serving stream may hold at once; past it that stream
    /// is answered busy while others are still served.
    pub stream_upload_slots: u32,
    /// Chunk indexes one `GetChunks` request may name.
    pub max_chunks_per_request: usize,
    /// Requests one serving stream queues before it stops reading (the
    /// dialing side then waits on HTTP/2 flow control).
    pub stream_queue: usize,
    /// Chunk bytes asked of other peers and not yet stored, across every
    /// download, at most. What arrives waits in memory until it is verified
    /// and written, so this bounds that memory however many downloads and
    /// providers there are; a download with nothing in flight waits its turn
    /// for a share. At least one chunk (1 MiB); a larger chunk takes it all.
    pub download_buffer: u64,
    /// Timeout of one control-plane call.
    pub control_timeout: Duration,
    /// Range requests one origin download makes at once.
    pub origin_connections: usize,
    /// An origin that takes longer than this to connect, or to send the next
    /// bytes, fails the request (a broken range is then resumed).
    pub origin_timeout: Duration,
    /// Extra CA certificates (PEM) trusted for https origins, beside the
    /// system's roots.
    pub origin_ca: Option<Vec<u8>>,
    /// A connection to the peer server that has not sent its greeting (TLS
    /// or HTTP/2) within this long is closed. Default 10 s.
    pub handshake_timeout: Duration,
    /// A connection to the peer server with no call open for this long is
    /// closed. Default 2 min.
    pub idle_timeout: Duration,
    /// Connections one IP address may hold to the peer server at once; more
    /// are closed as they are accepted. Default 256.
    pub connections_per_address: usize,
    /// TLS for everything over TCP: the peer server serves with this
    /// certificate (requiring client certificates when asked), other peers
    /// are dialed with `https://`, and every control-plane URL must be
    /// `https://`. `None`: plaintext everywhere (the local API, a private
    /// Unix socket, is plaintext either way).
    pub tls: Option<TlsConfig>,
    /// HTTP/2 streams one connection to the peer server may open at once.
    pub max_concurrent_streams: u32,
    /// Streams the peer server may reset for errors before it closes the
    /// connection.
    pub max_local_resets: usize,
    /// HTTP/2 pings from the peer server this often.
    pub server_keepalive_interval: Duration,
    /// A ping unanswered this long closes the connection to the peer server.
    pub server_keepalive_timeout: Duration,
    /// TCP keepalive interval of sockets the peer server accepts.
    pub tcp_keepalive: Duration,
    /// How long a busy answer asks the requester to stay away.
    pub busy_retry: Duration,
    /// Blobs one serving stream sends have-updates for, at most.
    pub max_watched: usize,
    /// How often pending have-updates are flushed to a serving stream.
    pub have_flush: Duration,
    /// How other peers are dialed.
    pub dial: DialConfig,
    /// How downloads find providers and treat those that fail.
    pub discovery: DiscoveryConfig,
    /// The first pause after a failed registration; doubled per failure.
    pub register_backoff: Duration,
    /// The longest pause between registration attempts.
    pub max_register_backoff: Duration,
    /// At shutdown, how long streams and tasks have to finish before they
    /// are dropped.
    pub shutdown_grace: Duration,
}

impl Config {
    /// Defaults for a store at `store` talking to `control`.
    pub fn new(store: impl Into<PathBuf>, control: Option<String>) -> Self {
        Self {
            store: store.into(),
            control,
            join_token: None,
            advertise: None,
            zone: String::new(),
            upload_slots: 64,
            upload_limit: None,
            download_limit: None,
            max_providers: 8,
            no_provider_timeout: Duration::from_secs(30),
            rediscover_interval: Duration::from_secs(1),
            announce_interval: Duration::from_millis(250),
            idle_stream_timeout: Duration::from_secs(5),
            stream_upload_slots: 32,
            max_chunks_per_request: 64,
            stream_queue: 256,
            download_buffer: 16 << 20,
            control_timeout: Duration::from_secs(5),
            origin_connections: 4,
            origin_timeout: Duration::from_secs(30),
            origin_ca: None,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            connections_per_address: 256,
            tls: None,
            max_concurrent_streams: 256,
            max_local_resets: 1024,
            server_keepalive_interval: Duration::from_secs(20),
            server_keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(30),
            busy_retry: Duration::from_millis(100),
            max_watched: 1024,
            have_flush: Duration::from_millis(100),
            dial: DialConfig::default(),
            discovery: DiscoveryConfig::default(),
            register_backoff: Duration::from_millis(200),
            max_register_backoff: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
        }
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at_least = |field: &'static str, value: u64, min: u64| {
            if value < min {
                Err(ConfigError::TooSmall { field, min })
            } else {
                Ok(())
            }
        };
        at_least("upload slots", self.upload_slots.into(), 1)?;
        at_least("stream upload slots", self.stream_upload_slots.into(), 1)?;
        at_least("chunks per request", self.max_chunks_per_request as u64, 1)?;
        at_least("stream queue", self.stream_queue as u64, 1)?;
        at_least("download buffer", self.download_buffer, 1 << 20)?;
        at_least("origin connections", self.origin_connections as u64, 1)?;
        at_least("max providers", self.max_providers as u64, 1)?;
        at_least(
            "connections per address",
            self.connections_per_address as u64,
            1,
        )?;
        at_least(
            "max concurrent streams",
            self.max_concurrent_streams.into(),
            1,
        )?;
        at_least("discovery limit", self.discovery.limit.into(), 1)?;
        at_least("max failures", self.discovery.max_failures.into(), 1)?;
        let durations = [
            ("origin timeout", self.origin_timeout),
            ("handshake timeout", self.handshake_timeout),
            ("idle timeout", self.idle_timeout),
            ("idle stream timeout", self.idle_stream_timeout),
            ("control timeout", self.control_timeout),
            ("server keepalive interval", self.server_keepalive_interval),
            ("server keepalive timeout", self.server_keepalive_timeout),
            ("TCP keepalive", self.tcp_keepalive),
            ("have flush", self.have_flush),
            ("connect timeout", self.dial.connect_timeout),
            ("dial keepalive interval", self.dial.keepalive_interval),
            ("dial keepalive timeout", self.dial.keepalive_timeout),
            ("provider back-off", self.discovery.backoff),
            ("outboard timeout", self.discovery.outboard_timeout),
            ("registration back-off", self.register_backoff),
        ];
        if let Some((field, _)) = durations.into_iter().find(|(_, d)| d.is_zero()) {
            return Err(ConfigError::Zero { field });
        }
        if let Some(urls) = &self.control {
            if split_urls(urls).next().is_none() {
                return Err(ConfigError::NoControlUrl);
            }
            for url in split_urls(urls) {
                match parse_control_urls(url) {
                    Ok(parsed) if parsed == url => {}
                    // The `host:port` shorthand is the CLI's; a `Config`
                    // holds URLs as they are dialed.
                    Ok(_)
                    | Err(ControlUrlError::Scheme { .. } | ControlUrlError::NotAUrl { .. }) => {
                        return Err(ConfigError::ControlScheme { url: url.into() });
                    }
                    Err(source) => {
                        return Err(ConfigError::ControlUrl {
                            url: url.into(),
                            source,
                        });
                    }
                }
                // Refused here, before any call: the scheme must match the TLS settings.
                tls::endpoint(url, self.tls.as_ref()).map_err(|source| {
                    ConfigError::ControlTls {
                        url: url.into(),
                        source,
                    }
                })?;
            }
        }
        if self.tls.as_ref().is_some_and(|t| !t.has_identity()) {
            return Err(ConfigError::TlsIdentity);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new("/tmp/store", None)
    }

    #[test]
    fn the_defaults_are_valid() {
        config().validate().unwrap();
        Config::new("/tmp/store", Some("http://127.0.0.1:7700".into()))
            .validate()
            .unwrap();
    }

    #[test]
    fn counts_below_their_minimum_are_refused() {
        let mut c = config();
        c.upload_slots = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TooSmall {
                field: "upload slots",
                min: 1
            })
        ));
        let mut c = config();
        c.download_buffer = 1 << 19;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TooSmall {
                field: "download buffer",
                ..
            })
        ));
        let mut c = config();
        c.discovery.limit = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TooSmall {
                field: "discovery limit",
                ..
            })
        ));
    }

    #[test]
    fn zero_durations_are_refused() {
        let mut c = config();
        c.dial.keepalive_timeout = Duration::ZERO;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Zero {
                field: "dial keepalive timeout"
            })
        ));
        let mut c = config();
        c.handshake_timeout = Duration::ZERO;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Zero {
                field: "handshake timeout"
            })
        ));
    }

    #[test]
    fn control_urls_are_checked() {
        let c = Config::new("/tmp/store", Some(" , ".into()));
        assert!(matches!(c.validate(), Err(ConfigError::NoControlUrl)));
        let c = Config::new("/tmp/store", Some("http://a:1,ftp://b:2".into()));
        match c.validate() {
            Err(ConfigError::ControlScheme { url }) => assert_eq!(url, "ftp://b:2"),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A `Config` holds URLs as they are dialed: the CLI's `host:port`
    /// shorthand and an upper-case scheme are refused as before the check
    /// went through `parse_control_urls` (which the CLI normalizes
    /// `--control` with, so `HTTP://cp:7700` on the command line still works).
    #[test]
    fn control_urls_are_refused_unless_spelled_as_dialed() {
        for url in ["HTTP://cp:7700", "Https://cp:7700", "cp:7700", "notaurl"] {
            let c = Config::new("/tmp/store", Some(url.into()));
            match c.validate() {
                Err(e @ ConfigError::ControlScheme { .. }) => assert_eq!(
                    e.to_string(),
                    format!("control plane URL {url:?} must start with http:// or https://")
                ),
                other => panic!("{url}: unexpected {other:?}"),
            }
        }
        let c = Config::new("/tmp/store", Some("http://cp:7700".into()));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn control_urls_without_a_host_or_unparsable_are_refused_with_why() {
        // With no host at all the URI parser already refuses it.
        let cases = [
            ("http://", "is not a URL: empty string"),
            ("http://[::1", "is not a URL"),
        ];
        for (url, why) in cases {
            let c = Config::new("/tmp/store", Some(url.into()));
            let e = c.validate().unwrap_err();
            assert!(
                matches!(&e, ConfigError::ControlUrl { url: u, .. } if u == url),
                "{url}: unexpected {e:?}"
            );
            assert_eq!(e.to_string(), format!("control plane URL {url:?}"));
            let source = std::error::Error::source(&e)
                .expect("the reason")
                .to_string();
            assert!(source.contains(why), "{url}: {source}");
        }
    }
}
