//! Membership: register with the control plane, renew the lease, announce
//! the inventory (whole at registration, changes as they happen, partial
//! progress at a bounded rate), and start over when the control plane has
//! forgotten this peer. Serving goes on whether or not the control plane is up.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use nebula_common::{BlobId, Store, store::BlobInfo};
use nebula_proto::v1 as pb;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Config, control::ControlClient, events::Events, identity::Identity, uploads::Uploads};

/// Where membership stands, for `nebula status` and `/readyz`. Cloning is
/// cheap; clones share the state, which only membership changes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Status(Arc<StatusState>);

#[derive(Debug, Default)]
struct StatusState {
    registered: AtomicBool,
    /// Why the last registration attempt failed (empty once registered).
    error: Mutex<String>,
}

impl Status {
    /// Whether the control plane has accepted this peer's registration.
    pub(crate) fn is_registered(&self) -> bool {
        self.0.registered.load(Ordering::Acquire)
    }

    /// Why the last registration attempt failed; empty once registered.
    pub(crate) fn error(&self) -> String {
        self.error_slot().clone()
    }

    fn set_registered(&self, registered: bool) {
        self.0.registered.store(registered, Ordering::Release);
    }

    fn error_slot(&self) -> std::sync::MutexGuard<'_, String> {
        self.0.error.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A peer's membership with the control plane, built from the parts it
/// reads: the store (announced), the uploads (the load heartbeats carry),
/// the store's events (when to announce), and the identity it keeps current.
#[derive(Debug)]
pub(crate) struct Membership {
    pub(crate) config: Arc<Config>,
    pub(crate) store: Arc<Store>,
    pub(crate) peer_id: String,
    /// The address other peers dial.
    pub(crate) address: String,
    pub(crate) control: ControlClient,
    /// Updated with each credential the control plane hands out.
    pub(crate) identity: Arc<Identity>,
    pub(crate) uploads: Arc<Uploads>,
    pub(crate) events: Arc<Events>,
    /// What `nebula status` reads.
    pub(crate) status: Status,
    /// Cancelled when the node stops: membership deregisters and ends.
    pub(crate) shutdown: CancellationToken,
}

/// What the control plane was last told of one blob: enough to see that
/// it changed, read off the store's listing.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Announced {
    complete: bool,
    chunks: u32,
    sha256: bool,
}

impl From<&BlobInfo> for Announced {
    fn from(info: &BlobInfo) -> Self {
        Self {
            complete: info.complete,
            chunks: info.chunks_verified,
            sha256: info.sha256.is_some(),
        }
    }
}

/// The announcement of one blob; only the bitmap of a partial blob is read
/// from the store again.
fn announcement(store: &Store, info: &BlobInfo) -> pb::BlobAnnouncement {
    let chunks = match store.get(&info.id) {
        Some(blob) if !info.complete => Bytes::from(blob.chunks().to_bitmap()),
        _ => Bytes::new(),
    };
    pb::BlobAnnouncement {
        id: info.id.to_string(),
        size: info.size,
        sha256: info.sha256.clone().unwrap_or_default(),
        complete: info.complete,
        chunks,
    }
}

/// Records why registering failed, in words for `nebula status`: a server
/// that is not a control plane answers `unimplemented` with no message; a
/// plaintext call to a control plane serving TLS fails with an HTTP/2
/// protocol error, and says so.
async fn set_registration_error(m: &Membership, status: &tonic::Status) {
    let urls = m.config.control.as_deref().unwrap_or_default();
    let mut why = match status.code() {
        tonic::Code::Unimplemented => {
            format!("{urls} does not serve the control-plane API: not a Nebula control plane")
        }
        code if status.message().is_empty() => format!("{code:?}"),
        code => format!("{} ({code:?})", status.message()),
    };
    let transport = matches!(
        status.code(),
        tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Unavailable
    );
    if m.config.tls.is_none()
        && transport
        && let Some(url) = m.control.serving_tls().await
    {
        why.push_str(&format!(
            "; {url} answers with TLS: dial it with https:// and the fleet CA"
        ));
    }
    *m.status.error_slot() = why;
}

/// Runs until the node shuts down, then deregisters.
pub(crate) async fn run(m: Membership) {
    let control = m.control.clone();
    let mut events = m.events.subscribe();
    let first_backoff = m.config.register_backoff;
    let mut backoff = first_backoff;
    'register: loop {
        m.status.set_registered(false);
        let request = pb::RegisterRequest {
            peer_id: m.peer_id.clone(),
            address: m.address.clone(),
            zone: m.config.zone.clone(),
            labels: HashMap::new(),
        };
        let registered = tokio::select! {
            _ = m.shutdown.cancelled() => return,
            r = control.register(request) => r,
        };
        let interval = match registered {
            Ok(r) => {
                let r = r.into_inner();
                m.identity.update(&r.credential, &r.verify_keys);
                Duration::from_millis(r.heartbeat_interval_ms.clamp(100, 60_000))
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "cannot register with the control plane; retrying");
                set_registration_error(&m, &status).await;
                tokio::select! {
                    _ = m.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(m.config.max_register_backoff);
                continue 'register;
            }
        };
        backoff = first_backoff;
        // The whole inventory, replacing whatever the control plane held.
        let mut announced: HashMap<BlobId, Announced> = HashMap::new();
        let mut blobs = Vec::new();
        for info in m.store.list() {
            blobs.push(announcement(&m.store, &info));
            announced.insert(info.id, Announced::from(&info));
        }
        let full = pb::AnnounceRequest {
            peer_id: m.peer_id.clone(),
            blobs,
            removed: Vec::new(),
            full_inventory: true,
        };
        match control.announce(full).await {
            Ok(r) if r.get_ref().unknown_peer => continue 'register,
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::ResourceExhausted => refused(&status),
            Err(status) => {
                tracing::warn!(
                    message = status.message(),
                    "inventory announcement failed; registering again"
                );
                tokio::time::sleep(backoff).await;
                continue 'register;
            }
        }
        m.status.set_registered(true);
        m.status.error_slot().clear();
        tracing::info!(peer = %m.peer_id, "registered with the control plane");
        let mut heartbeat = tokio::time::interval(interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ok = Instant::now();
        let mut dirty = false;
        let mut next_announce = Instant::now();
        let mut last_uploaded = m.uploads.uploaded();
        let mut last_beat = Instant::now();
        loop {
            let announce_at = if dirty {
                next_announce
            } else {
                Instant::now() + Duration::from_secs(3600)
            };
            tokio::select! {
                _ = m.shutdown.cancelled() => {
                    let bye = pb::DeregisterRequest { peer_id: m.peer_id.clone() };
                    let _ = tokio::time::timeout(Duration::from_secs(2), control.deregister(bye)).await;
                    return;
                }
                _ = heartbeat.tick() => {
                    let now = Instant::now();
                    let uploaded = m.uploads.uploaded();
                    let secs = now.duration_since(last_beat).as_secs_f64().max(0.001);
                    let load = pb::Load {
                        active_uploads: m.uploads.active(),
                        upload_bytes_per_sec: ((uploaded - last_uploaded) as f64 / secs) as u64,
                        upload_slots: m.config.upload_slots,
                    };
                    last_uploaded = uploaded;
                    last_beat = now;
                    let beat = pb::HeartbeatRequest { peer_id: m.peer_id.clone(), load: Some(load) };
                    match control.heartbeat(beat).await {
                        Ok(r) if r.get_ref().unknown_peer => {
                            tracing::info!("control plane does not know this peer; registering again");
                            continue 'register;
                        }
                        Ok(r) => {
                            let r = r.into_inner();
                            m.identity.update(&r.credential, &r.verify_keys);
                            last_ok = now;
                            m.status.set_registered(true);
                        }
                        Err(status) if status.code() == tonic::Code::Unauthenticated => {
                            tracing::info!(message = status.message(), "the control plane refused this peer's credential; registering again");
                            m.identity.forget();
                            continue 'register;
                        }
                        Err(status) => {
                            tracing::debug!(message = status.message(), "heartbeat failed");
                            if now.duration_since(last_ok) > interval * 3 {
                                m.status.set_registered(false);
                            }
                        }
                    }
                }
                () = m.events.changed() => dirty = true,
                event = events.recv() => {
                    if !matches!(event, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        dirty = true;
                    }
                }
                _ = tokio::time::sleep_until(announce_at), if dirty => {
                    dirty = false;
                    next_announce = Instant::now() + m.config.announce_interval;
                    let mut changed = Vec::new();
                    let mut current = HashMap::new();
                    for info in m.store.list() {
                        let state = Announced::from(&info);
                        if announced.get(&info.id) != Some(&state) {
                            changed.push(announcement(&m.store, &info));
                        }
                        current.insert(info.id, state);
                    }
                    let removed: Vec<String> = announced.keys().filter(|id| !current.contains_key(id)).map(ToString::to_string).collect();
                    if changed.is_empty() && removed.is_empty() {
                        continue;
                    }
                    let request = pb::AnnounceRequest {
                        peer_id: m.peer_id.clone(),
                        blobs: changed,
                        removed,
                        full_inventory: false,
                    };
                    match control.announce(request).await {
                        Ok(r) if r.get_ref().unknown_peer => continue 'register,
                        Ok(_) => announced = current,
                        Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                            // Not sent again: the next change is tried on its own.
                            refused(&status);
                            announced = current;
                        }
                        Err(status) if status.code() == tonic::Code::Unauthenticated => continue 'register,
                        Err(status) => {
                            tracing::debug!(message = status.message(), "announcement failed; will retry");
                            dirty = true;
                        }
                    }
                }
            }
        }
    }
}

/// The control plane's inventory caps refused an announce: the peer stays
/// registered (it fetches and serves as before), and what it announced is
/// not discoverable until a later announce or registration is taken.
fn refused(status: &tonic::Status) {
    tracing::warn!(
        message = status.message(),
        "the control plane refused this peer's inventory; its blobs are not all discoverable"
    );
}

#[cfg(test)]
mod tests;
