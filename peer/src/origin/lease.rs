//! The control plane's side of a fetch by URL: the origin lease kept alive,
//! the URL's blob recorded, a peer that sent bad data reported.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use nebula_common::BlobId;
use nebula_proto::v1 as pb;
use tokio::time::Instant;

use super::Origins;
use super::{Counters, Validators};

/// Tells the control plane a peer sent bad data.
pub(super) async fn report(origins: &Origins, peer_id: &str, why: &str) {
    let Some(control) = origins.downloads.control().clone() else {
        return;
    };
    let request = pb::ReportPeerRequest {
        reporter_id: origins.downloads.peer_id().to_owned(),
        peer_id: peer_id.to_owned(),
        blob: String::new(),
        reason: format!("origin download: {why}"),
    };
    if let Err(e) = control.report_peer(request).await {
        tracing::debug!(error = %e.message(), "report failed");
    }
}

/// While the holder makes progress, keeps its origin lease alive by asking
/// again; a holder whose origin has sent nothing for the origin timeout
/// stops renewing, so a waiting peer takes over.
pub(super) fn renew_lease(
    origins: &Arc<Origins>,
    key: &str,
    ttl_ms: u64,
    counters: &Arc<Counters>,
) -> tokio_util::sync::DropGuard {
    let stop = tokio_util::sync::CancellationToken::new();
    let guard = stop.clone().drop_guard();
    let tasks = origins.downloads.tasks().clone();
    let origins = Arc::clone(origins);
    let counters = Arc::clone(counters);
    let key = key.to_owned();
    let every = Duration::from_millis((ttl_ms / 3).max(100));
    tasks.spawn(async move {
        let Some(control) = origins.downloads.control().clone() else {
            return;
        };
        let mut last = (0, Instant::now());
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let received = counters.received.load(Ordering::Relaxed);
            if received != last.0 {
                last = (received, Instant::now());
            } else if last.1.elapsed() > origins.downloads.config().origin_timeout {
                tracing::warn!("the origin has sent nothing for a while; letting the lease go");
                continue;
            }
            let ask = pb::ResolveUrlRequest {
                peer_id: origins.downloads.peer_id().to_owned(),
                url: key.clone(),
                refresh: true,
            };
            if let Err(e) = control.resolve_url(ask).await {
                tracing::debug!(error = %e.message(), "renewing the origin lease failed");
            }
        }
    });
    guard
}

/// Tells the control plane what the URL resolved to; a failure only costs
/// the next fetch of the URL an origin request.
pub(super) async fn record(origins: &Origins, key: &str, blob: BlobId, v: &Validators) {
    let Some(control) = origins.downloads.control().clone() else {
        return;
    };
    let request = pb::RecordUrlRequest {
        peer_id: origins.downloads.peer_id().to_owned(),
        url: key.to_owned(),
        blob: blob.to_string(),
        validators: Some(pb::UrlValidators {
            size: v.size,
            etag: v.etag.clone(),
            last_modified: v.last_modified.clone(),
        }),
    };
    if let Err(e) = control.record_url(request).await {
        tracing::warn!(error = %e.message(), "cannot record the URL's blob with the control plane");
    }
}
