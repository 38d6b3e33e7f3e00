//! Finding a blob's providers through the control plane, and taking its
//! outboard from the first provider whose outboard verifies.

use std::{sync::Arc, time::Duration};

use nebula_common::{Blob, BlobId, BlobRef, ChunkSet, Outboard};
use nebula_proto::v1::{
    self as pb, exchange_request::Kind as Req, exchange_response::Kind as Resp,
};
use tokio::sync::mpsc;

use super::{FetchError, Shortfall};
use crate::{exchange::dial::Reply, fetch::Downloads};

/// Asks the control plane who holds `blob`.
pub(crate) async fn discover(
    downloads: &Downloads,
    blob: &BlobRef,
) -> Result<pb::FindProvidersResponse, FetchError> {
    let Some(control) = downloads.control.clone() else {
        return Err(FetchError::NoControlPlane(*blob));
    };
    let request = pb::FindProvidersRequest {
        peer_id: downloads.peer_id.clone(),
        blob: blob.to_string(),
        limit: downloads.config.discovery.limit,
        zone: downloads.config.zone.clone(),
    };
    match tokio::time::timeout(control.deadline(), control.find_providers(request)).await {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            // The downloader works only on the id it was asked for: an answer
            // about another blob (a confused or tampered-with relay) is refused.
            if let BlobRef::Blake3(asked) = blob
                && !(r.providers.is_empty() && r.id.is_empty())
                && r.id.parse::<BlobId>().ok() != Some(*asked)
            {
                return Err(FetchError::WrongBlob {
                    asked: *asked,
                    answered: r.id,
                });
            }
            Ok(r)
        }
        Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
            Ok(pb::FindProvidersResponse::default())
        }
        Ok(Err(status)) => Err(FetchError::Control(status)),
        Err(_) => Err(FetchError::ControlTimedOut),
    }
}

/// The chunks a peer holds, from the wire's (complete, bitmap) pair.
pub(super) fn held(count: u32, complete: bool, bitmap: &[u8]) -> ChunkSet {
    if complete {
        ChunkSet::full(count)
    } else {
        ChunkSet::from_bitmap(bitmap, count)
    }
}

/// Checks that a blob fetched by `sha256:` digest has that SHA-256 (its
/// BLAKE3 chunks were verified; the alias that led to it was only a claim).
pub(super) async fn check_sha256(
    blob: &Arc<Blob>,
    digest: nebula_common::Sha256Digest,
) -> Result<(), FetchError> {
    let hashing = Arc::clone(blob);
    let actual = tokio::task::spawn_blocking(move || hashing.compute_sha256())
        .await
        .map_err(|_| FetchError::Cancelled)??;
    if actual == digest {
        Ok(())
    } else {
        Err(FetchError::DigestMismatch {
            digest,
            id: blob.id(),
            actual,
        })
    }
}

/// Gets the outboard from the first provider whose outboard verifies.
pub(super) async fn fetch_outboard(
    downloads: &Arc<Downloads>,
    id: BlobId,
    providers: &[pb::Provider],
) -> Result<Outboard, FetchError> {
    let mut any_reached = false;
    for p in providers.iter().filter(|p| p.peer_id != downloads.peer_id) {
        let Ok(conn) = downloads.connect(&p.address).await else {
            continue;
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let Some(req) = conn
            .request(
                Req::GetOutboard(pb::GetOutboard {
                    blob: id.to_string(),
                }),
                &tx,
            )
            .await
        else {
            continue;
        };
        let answer =
            tokio::time::timeout(downloads.config.discovery.outboard_timeout, rx.recv()).await;
        conn.finish(req);
        any_reached = true;
        match answer {
            Ok(Some(Reply::Answer(_, Resp::Outboard(o)))) => {
                let verified = if o.chaining_values.is_empty() {
                    Outboard::single_chunk(id, o.size).ok_or(())
                } else {
                    Outboard::verified(id, o.size, &o.chaining_values).map_err(|_| ())
                };
                match verified {
                    Ok(ob) => return Ok(ob),
                    Err(()) => {
                        tracing::warn!(peer = %p.address, blob = %id.short(), "outboard failed verification");
                        report(downloads, &p.peer_id, id).await;
                    }
                }
            }
            other => tracing::debug!(peer = %p.address, ?other, "no outboard"),
        }
    }
    if any_reached {
        Err(FetchError::BadOutboard(id))
    } else {
        Err(FetchError::NoProviders {
            blob: BlobRef::Blake3(id),
            waited: Duration::ZERO,
            shortfall: Shortfall::Unreachable,
        })
    }
}

pub(super) async fn report(downloads: &Downloads, peer_id: &str, blob: BlobId) {
    let Some(control) = downloads.control.clone() else {
        return;
    };
    let request = pb::ReportPeerRequest {
        reporter_id: downloads.peer_id.clone(),
        peer_id: peer_id.to_owned(),
        blob: blob.to_string(),
        reason: "sent chunks that failed verification".into(),
    };
    match tokio::time::timeout(control.deadline(), control.report_peer(request)).await {
        Ok(Ok(_)) => {
            tracing::warn!(peer = peer_id, blob = %blob.short(), "reported a provider for corrupt chunks")
        }
        other => tracing::debug!(?other, "report failed"),
    }
}
