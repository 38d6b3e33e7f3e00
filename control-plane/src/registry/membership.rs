//! Peers joining, renewing, leaving, reported and sanctioned.

use std::sync::atomic::Ordering;

use nebula_common::BlobId;

use super::{
    MAX_LABEL_VALUE_LEN, MAX_LABELS, MAX_REASON_LEN, MAX_ZONE_LEN, RegisterReply, Registry, Stats,
    check_address, shorten,
};
use crate::{
    error::RegistryError,
    store::{
        Health, Load, PeerId, PeerRegistration, PeerSnapshot, Registered, ReportOutcome, Standing,
        StateStore,
    },
};

impl<S: StateStore> Registry<S> {
    /// Registers (or re-registers) a peer and starts its lease.
    pub async fn register(&self, reg: PeerRegistration) -> Result<RegisterReply, RegistryError> {
        check_address(&reg.address)?;
        if reg.zone.len() > MAX_ZONE_LEN {
            return Err(RegistryError::Field {
                field: "zone",
                reason: format!("longer than {MAX_ZONE_LEN} bytes"),
            });
        }
        if reg.labels.len() > MAX_LABELS {
            return Err(RegistryError::Field {
                field: "labels",
                reason: format!("{} labels, at most {MAX_LABELS}", reg.labels.len()),
            });
        }
        if let Some((k, _)) = reg
            .labels
            .iter()
            .find(|(k, v)| k.is_empty() || k.len() > MAX_ZONE_LEN || v.len() > MAX_LABEL_VALUE_LEN)
        {
            return Err(RegistryError::Field {
                field: "labels",
                reason: format!(
                    "label {:?}: keys are 1 to {MAX_ZONE_LEN} bytes, values at most {MAX_LABEL_VALUE_LEN}",
                    shorten(k, 80)
                ),
            });
        }
        let id = reg.id.clone();
        let registered = self.store.register(reg, self.lease_ttl).await?;
        match registered {
            Registered::New => tracing::info!(peer = %id, "peer registered"),
            Registered::Renewed => tracing::debug!(peer = %id, "peer registered again"),
        }
        Ok(RegisterReply {
            registered,
            lease_ttl: self.lease_ttl,
            heartbeat_interval: self.heartbeat_interval,
        })
    }

    /// Renews a lease; `Ok(false)` tells the peer to register and re-announce.
    pub async fn heartbeat(&self, id: &PeerId, load: Load) -> Result<bool, RegistryError> {
        Ok(self.store.renew(id, load, self.lease_ttl).await?)
    }

    /// Removes a peer at once; `Ok(false)` if it was not registered.
    pub async fn deregister(&self, id: &PeerId) -> Result<bool, RegistryError> {
        let known = self.store.deregister(id).await?;
        if known {
            tracing::info!(peer = %id, "peer deregistered");
        }
        Ok(known)
    }

    /// Records that `reporter` received bad data from `provider`.
    pub async fn report(
        &self,
        reporter: &PeerId,
        provider: &PeerId,
        blob: Option<BlobId>,
        reason: &str,
    ) -> Result<ReportOutcome, RegistryError> {
        if reporter == provider {
            return Err(RegistryError::SelfReport);
        }
        if self.store.peer(reporter).await?.is_none() {
            return Err(RegistryError::UnknownPeer {
                id: reporter.clone(),
            });
        }
        let reason = match (reason.trim(), blob) {
            ("", Some(b)) => format!("sent bad data for blob {b}"),
            ("", None) => "sent bad data".to_owned(),
            (r, _) => shorten(r, MAX_REASON_LEN),
        };
        let outcome = self
            .store
            .report(
                provider,
                reporter,
                &reason,
                self.quarantine_after,
                self.quarantine_ttl,
            )
            .await?
            .ok_or_else(|| RegistryError::UnknownPeer {
                id: provider.clone(),
            })?;
        self.metrics.reported(outcome.quarantined);
        let blob = blob.map(|b| b.short()).unwrap_or_default();
        if outcome.quarantined {
            tracing::warn!(peer = %provider, %reporter, %blob, reports = outcome.reports, %reason, "peer quarantined");
        } else {
            tracing::info!(peer = %provider, %reporter, %blob, reports = outcome.reports, %reason, "peer reported");
        }
        Ok(outcome)
    }

    /// Every live peer, sorted by id.
    pub async fn peers(&self) -> Result<Vec<PeerSnapshot>, RegistryError> {
        let mut peers = self.store.peers().await?;
        peers.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(peers)
    }

    /// Drains, bans or (with [`Standing::Active`]) unbans a live peer.
    pub async fn set_standing(
        &self,
        id: &PeerId,
        standing: Standing,
        reason: &str,
    ) -> Result<PeerSnapshot, RegistryError> {
        let reason = shorten(reason.trim(), MAX_REASON_LEN);
        let peer = self
            .store
            .set_standing(id, standing, &reason)
            .await?
            .ok_or_else(|| RegistryError::UnknownPeer { id: id.clone() })?;
        tracing::info!(peer = %id, ?standing, %reason, "standing changed by an operator");
        Ok(peer)
    }

    /// Records the verdict of the health prober.
    pub async fn set_health(&self, id: &PeerId, health: Health) -> Result<bool, RegistryError> {
        Ok(self.store.set_health(id, health).await?)
    }

    /// Sweeps lapsed leases; returns the peers removed.
    pub async fn expire(&self) -> Result<Vec<PeerId>, RegistryError> {
        let gone = self.store.expire().await?;
        self.metrics.leases_expired(gone.len());
        for id in &gone {
            tracing::info!(peer = %id, "lease lapsed; peer removed");
        }
        Ok(gone)
    }

    /// Cluster-wide figures.
    pub async fn stats(&self) -> Result<Stats, RegistryError> {
        Ok(Stats {
            store: self.store.stats().await?,
            find_providers_served: self.served.load(Ordering::Relaxed),
            uptime: self.started.elapsed(),
        })
    }
}
