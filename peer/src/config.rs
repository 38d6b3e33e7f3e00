//! The daemon's typed, validated configuration.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use nebula_proto::tls::{self, TlsConfig};

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
        }
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.upload_slots == 0 {
            return Err("upload slots must be at least 1".into());
        }
        if self.stream_upload_slots == 0
            || self.max_chunks_per_request == 0
            || self.stream_queue == 0
        {
            return Err(
                "stream upload slots, chunks per request and stream queue must be at least 1"
                    .into(),
            );
        }
        if self.download_buffer < 1 << 20 {
            return Err("the download buffer must hold at least one chunk (1 MiB)".into());
        }
        if self.origin_connections == 0 || self.origin_timeout.is_zero() {
            return Err("origin connections and the origin timeout must be above zero".into());
        }
        if self.handshake_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err("the handshake and idle timeouts must be above zero".into());
        }
        if self.connections_per_address == 0 {
            return Err("connections per address must be above zero".into());
        }
        if self.max_providers == 0 {
            return Err("max providers must be at least 1".into());
        }
        if let Some(urls) = &self.control {
            if crate::replicas::split_urls(urls).next().is_none() {
                return Err("no control plane URL given".into());
            }
            if let Some(url) = crate::replicas::split_urls(urls)
                .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
            {
                return Err(format!("control plane URL {url:?} must start with http://"));
            }
            // Refused here, before any call: the scheme must match the TLS settings.
            for url in crate::replicas::split_urls(urls) {
                tls::endpoint(url, self.tls.as_ref()).map_err(|e| e.to_string())?;
            }
        }
        if self.tls.as_ref().is_some_and(|t| !t.has_identity()) {
            return Err("TLS needs this peer's certificate and private key".into());
        }
        Ok(())
    }
}
