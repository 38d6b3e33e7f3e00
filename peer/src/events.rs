//! [`Events`]: what the node's parts tell each other as the store changes —
//! a blob gained chunks (have-updates to the peers watching it, partial
//! announcements), the inventory changed (announcements).

use nebula_common::BlobId;
use tokio::sync::{Notify, broadcast};

/// Chunk events a lagging listener can miss before it is told it lagged.
const CHUNK_EVENTS: usize = 1024;

/// The node's store events. Downloads and the local API (adds, removals)
/// raise them; the serving side and membership listen.
#[derive(Debug)]
pub(crate) struct Events {
    chunks: broadcast::Sender<BlobId>,
    inventory: Notify,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            chunks: broadcast::channel(CHUNK_EVENTS).0,
            inventory: Notify::new(),
        }
    }
}

impl Events {
    /// `blob` gained chunks.
    pub(crate) fn chunk_added(&self, blob: BlobId) {
        // Nobody listening is fine: no stream watches the blob.
        let _ = self.chunks.send(blob);
    }

    /// The blobs that gain chunks from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<BlobId> {
        self.chunks.subscribe()
    }

    /// A blob was added, removed or completed.
    pub(crate) fn inventory_changed(&self) {
        self.inventory.notify_one();
    }

    /// Resolves once the inventory changed (at once if it changed since the
    /// last call).
    pub(crate) async fn changed(&self) {
        self.inventory.notified().await;
    }
}
