//! [`Registry`]: the control plane's operations over a [`StateStore`], with
//! the checks that keep bad input out of the store.
//!
//! # Layout
//!
//! - `input`: checks and parsing of what requests carry.
//! - `membership`: peers registering, renewing, leaving, reported and sanctioned.
//! - `content`: announcements, discovery, and origin URLs.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use nebula_common::{BlobRef, credential::Claims};
use tokio::time::Instant;

use crate::{
    config::Config,
    error::RegistryError,
    identity::{Admission, Grants, Identity, IdentityError},
    metrics::Metrics,
    store::{
        BlobMeta, Holding, OriginLease, PeerId, PeerRegistration, Registered, StateStore,
        StoreStats, UrlRecord,
    },
};

mod content;
mod input;
mod membership;
#[cfg(test)]
mod tests;

use input::shorten;
pub use input::{check_address, parse_blob_id, parse_blob_ref, parse_peer_id};

/// Longest zone label, label key and label value, in bytes.
pub const MAX_ZONE_LEN: usize = 64;
/// Most labels one peer may register.
pub const MAX_LABELS: usize = 32;
/// Longest label value in bytes (keys: [`MAX_ZONE_LEN`]).
pub const MAX_LABEL_VALUE_LEN: usize = 256;
/// Longest address in bytes.
pub const MAX_ADDRESS_LEN: usize = 255;
/// Reasons (reports, bans) are cut to this many bytes.
pub const MAX_REASON_LEN: usize = 512;

/// What a registering peer is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterReply {
    /// Whether the peer was new to the registry.
    pub registered: Registered,
    /// The lease lapses this long after the last heartbeat.
    pub lease_ttl: Duration,
    /// How often to heartbeat.
    pub heartbeat_interval: Duration,
}

/// A `FindProviders` question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderQuery {
    /// The blob, by BLAKE3 id or SHA-256 alias.
    pub blob: BlobRef,
    /// The asking peer, never returned.
    pub asker: Option<PeerId>,
    /// The asker's zone; empty: the zone the asker registered with.
    pub zone: String,
    /// At most this many (0: the default; capped by the config).
    pub limit: u32,
}

/// The answer to a [`ProviderQuery`].
#[derive(Debug, Clone)]
pub struct Providers {
    /// The blob the query resolved to (size 0 when nobody announced it).
    pub meta: BlobMeta,
    /// Best first.
    pub providers: Vec<Holding>,
}

/// Cluster-wide figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// From the store.
    pub store: StoreStats,
    /// `FindProviders` answers served since start.
    pub find_providers_served: u64,
    /// Time since the registry started.
    pub uptime: Duration,
}

/// The registry: leases, inventories, discovery, reports and standings.
#[derive(Debug)]
pub struct Registry<S> {
    store: S,
    lease_ttl: Duration,
    heartbeat_interval: Duration,
    default_limit: u32,
    max_limit: u32,
    quarantine_after: u32,
    quarantine_ttl: Duration,
    identity: Arc<Identity>,
    admission: Admission,
    grants: Grants,
    max_announce_blobs: usize,
    url_ttl: Duration,
    url_ignore_query: Vec<String>,
    origin_lease_ttl: Duration,
    served: AtomicU64,
    started: Instant,
    metrics: Arc<Metrics>,
}

/// What [`Registry::resolve_url`] found.
#[derive(Debug, Clone)]
pub struct UrlAnswer {
    /// The URL's record, fresh or not.
    pub record: Option<UrlRecord>,
    /// The record is younger than the URL TTL: no need to ask the origin.
    pub fresh: bool,
    /// Who holds the origin lease; `None` when the record is fresh.
    pub lease: Option<OriginLease>,
    /// Where the holder serves, when another live peer holds the lease.
    pub holder_address: Option<String>,
    /// The name of the URL's origin download among peers.
    pub session: String,
    /// How long a lease lasts unless renewed.
    pub lease_ttl: Duration,
}

impl<S: StateStore> Registry<S> {
    /// A registry over `store`, with the limits and timers of `config`.
    pub fn new(store: S, config: &Config) -> Self {
        Self {
            store,
            lease_ttl: config.lease_ttl,
            heartbeat_interval: config.heartbeat_interval,
            default_limit: config.default_discovery_limit,
            max_limit: config.max_discovery_limit,
            quarantine_after: config.quarantine_after,
            quarantine_ttl: config.quarantine_ttl,
            identity: Arc::new(Identity::new(config)),
            admission: Admission::new(config),
            grants: Grants::new(config.report_window),
            max_announce_blobs: config.max_announce_blobs,
            url_ttl: config.url_ttl,
            url_ignore_query: config.url_ignore_query.clone(),
            origin_lease_ttl: config.origin_lease_ttl,
            served: AtomicU64::new(0),
            started: Instant::now(),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The metrics its operations feed.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Signs and checks peer credentials.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// Admits a registration of `reg` from `caller` (its source IP; `None`
    /// in process), presenting `credential`: the address must be the
    /// caller's own (unless allowed otherwise), registrations from one source
    /// are rate-limited, and a live peer id moves to another address only
    /// with that peer's credential.
    pub async fn admit_registration(
        &self,
        reg: &PeerRegistration,
        caller: Option<std::net::IpAddr>,
        credential: Option<&Claims>,
    ) -> Result<(), RegistryError> {
        check_address(&reg.address)?;
        self.admission.register(caller, &reg.address)?;
        let own = credential.is_some_and(|c| c.sub == reg.id.as_str());
        if !own
            && let Some(live) = self.store.peer(&reg.id).await?
            && *live.address != *reg.address
        {
            tracing::warn!(peer = %reg.id, address = %live.address, claimed = %shorten(&reg.address, 80), ?caller, "refused to move a peer id without its credential");
            return Err(IdentityError::Taken { id: reg.id.clone() }.into());
        }
        Ok(())
    }

    /// Records that discovery gave `providers` to `asker`.
    pub fn granted<'a>(&self, asker: &PeerId, providers: impl IntoIterator<Item = &'a PeerId>) {
        self.grants.give(asker, providers);
    }

    /// Admits a report: `reporter` may file it (rate) and was recently sent
    /// to `provider` by discovery.
    pub fn admit_report(&self, reporter: &PeerId, provider: &PeerId) -> Result<(), RegistryError> {
        self.admission.report(reporter)?;
        if !self.grants.given(reporter, provider) {
            self.metrics.report_refused();
            tracing::warn!(peer = %provider, %reporter, "report refused: discovery did not send the reporter to this peer");
            return Err(IdentityError::NotGranted {
                reporter: reporter.clone(),
                provider: provider.clone(),
            }
            .into());
        }
        Ok(())
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Blobs (added plus removed) one announce may carry.
    pub fn max_announce_blobs(&self) -> usize {
        self.max_announce_blobs
    }
}
