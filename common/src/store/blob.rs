//! One blob in the store: its verified chunks, reads and verified writes,
//! and what completes it.

use std::{
    fs::{self, File},
    io::Write,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::{Bytes, BytesMut};

use super::{
    Result, StoreError,
    format::{Meta, start_writeback, write_meta},
};
use crate::{BlobId, ChunkSet, Geometry, Outboard, Sha256Digest, outboard::sha256_file};

/// What the store says of one blob.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlobInfo {
    /// The blob.
    pub id: BlobId,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, when known (always for added blobs; for fetched ones once computed).
    pub sha256: Option<String>,
    /// Every chunk is held.
    pub complete: bool,
    /// Chunks in the blob.
    pub chunks: u32,
    /// Chunks held and verified.
    pub chunks_verified: u32,
    /// Bytes per chunk.
    pub chunk_size: u64,
}

/// What writing a chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Stored; the blob still misses chunks.
    Stored,
    /// Already held: nothing written.
    AlreadyHad,
    /// Stored, and the blob is now complete.
    Completed,
}

/// One blob in the store, complete or partial. Shared by readers and writers.
#[derive(Debug)]
pub struct Blob {
    outboard: Outboard,
    /// Its directory (in staging until published).
    pub(super) dir: PathBuf,
    /// Opened read-write; positional I/O only, so sharing is safe.
    pub(super) data: File,
    /// Verified chunks; the log is appended under this lock, so the log and
    /// the set agree.
    state: Mutex<PartialState>,
    complete: AtomicBool,
    sha256: Mutex<Option<Sha256Digest>>,
}

#[derive(Debug)]
struct PartialState {
    have: ChunkSet,
    /// Open while partial.
    log: Option<File>,
}

impl Blob {
    /// A blob holding every chunk.
    pub(super) fn complete(
        outboard: Outboard,
        dir: PathBuf,
        data: File,
        sha256: Option<Sha256Digest>,
    ) -> Self {
        let count = outboard.geometry().chunk_count();
        Self {
            outboard,
            dir,
            data,
            state: Mutex::new(PartialState {
                have: ChunkSet::full(count),
                log: None,
            }),
            complete: AtomicBool::new(true),
            sha256: Mutex::new(sha256),
        }
    }

    /// A partial blob holding `have`, logging new chunks to `log`.
    pub(super) fn partial(
        outboard: Outboard,
        dir: PathBuf,
        data: File,
        have: ChunkSet,
        log: File,
    ) -> Self {
        Self {
            outboard,
            dir,
            data,
            state: Mutex::new(PartialState {
                have,
                log: Some(log),
            }),
            complete: AtomicBool::new(false),
            sha256: Mutex::new(None),
        }
    }

    /// The same blob, its directory moved to `dir`.
    pub(super) fn moved_to(self, dir: PathBuf) -> Self {
        Self { dir, ..self }
    }

    /// The blob's id.
    pub fn id(&self) -> BlobId {
        self.outboard.id()
    }

    /// The verified outboard.
    pub fn outboard(&self) -> &Outboard {
        &self.outboard
    }

    /// The blob's geometry.
    pub fn geometry(&self) -> &Geometry {
        self.outboard.geometry()
    }

    /// Every chunk is held.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// A snapshot of the verified chunks.
    pub fn chunks(&self) -> ChunkSet {
        if self.is_complete() {
            return ChunkSet::full(self.geometry().chunk_count());
        }
        self.lock_state().have.clone()
    }

    /// Whether chunk `index` is held and verified.
    pub fn has_chunk(&self, index: u32) -> bool {
        self.is_complete() || self.lock_state().have.contains(index)
    }

    /// The SHA-256 of a complete blob, when known.
    pub fn sha256(&self) -> Option<Sha256Digest> {
        // The lock is never held across a panic-prone call.
        *self.sha256.lock().expect("sha256 lock")
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, PartialState> {
        // Poisoning needs a panic while holding the lock; none of the code under
        // it panics, so recover the data rather than propagate.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads a verified chunk. Blocking: call from a blocking thread.
    pub fn read_chunk(&self, index: u32) -> Result<Bytes> {
        if index >= self.geometry().chunk_count() || !self.has_chunk(index) {
            return Err(StoreError::ChunkMissing {
                id: self.id(),
                index,
            });
        }
        let range = self.geometry().chunk_range(index);
        let mut buf = BytesMut::zeroed((range.end - range.start) as usize);
        self.data
            .read_exact_at(&mut buf, range.start)
            .map_err(|e| StoreError::io("reading", self.dir.join("data"), e))?;
        Ok(buf.freeze())
    }

    /// Reads a chunk and checks it against the outboard again, for bytes that
    /// leave the daemon for a user (the data file could have been changed
    /// behind the store's back since the chunk was verified). Blocking.
    pub fn read_verified_chunk(&self, index: u32) -> Result<Bytes> {
        let data = self.read_chunk(index)?;
        self.outboard.verify_chunk(index, &data)?;
        Ok(data)
    }

    /// Verifies chunk `index` and stores it. Blocking.
    ///
    /// Nothing that fails verification touches the disk. The bytes are written
    /// before the chunk is logged as verified, so a crash in between loses the
    /// chunk, never the store's word.
    pub fn write_chunk(&self, index: u32, data: &[u8]) -> Result<WriteOutcome> {
        self.outboard.verify_chunk(index, data)?;
        if self.has_chunk(index) {
            return Ok(WriteOutcome::AlreadyHad);
        }
        let start = self.geometry().chunk_range(index).start;
        self.data
            .write_all_at(data, start)
            .map_err(|e| StoreError::io("writing", self.dir.join("data"), e))?;
        // Start writeback now, so the sync at completion has little left to do.
        start_writeback(&self.data, start, data.len() as u64);
        let mut state = self.lock_state();
        if state.have.contains(index) {
            return Ok(WriteOutcome::AlreadyHad);
        }
        if let Some(log) = state.log.as_mut() {
            log.write_all(&index.to_le_bytes())
                .map_err(|e| StoreError::io("logging", self.dir.join("verified"), e))?;
        }
        state.have.insert(index);
        if !state.have.is_full() {
            return Ok(WriteOutcome::Stored);
        }
        let finish = || -> Result<()> {
            self.data
                .sync_all()
                .map_err(|e| StoreError::io("syncing", self.dir.join("data"), e))?;
            write_meta(
                &self.dir,
                &Meta {
                    complete: true,
                    sha256: None,
                },
            )
        };
        if let Err(e) = finish() {
            // Not complete after all: a retry of this chunk must try again
            // (its log entry is harmless; it is re-verified at open).
            state.have.remove(index);
            return Err(e);
        }
        state.log = None;
        let _ = fs::remove_file(self.dir.join("verified"));
        self.complete.store(true, Ordering::Release);
        Ok(WriteOutcome::Completed)
    }

    /// Computes and records the SHA-256 of a complete blob (one sequential
    /// read), for the `sha256:` alias. Blocking.
    pub fn compute_sha256(&self) -> Result<Sha256Digest> {
        if let Some(d) = self.sha256() {
            return Ok(d);
        }
        self.ensure_complete()?;
        // SHA-256 only: the BLAKE3 outboard is already known.
        let sha = sha256_file(&self.data, self.outboard.size())
            .map_err(|e| StoreError::io("reading", self.dir.join("data"), e))?;
        self.set_sha256(sha)?;
        Ok(sha)
    }

    /// Records a SHA-256 learned elsewhere (an add of the same bytes).
    pub(super) fn set_sha256(&self, sha: Sha256Digest) -> Result<()> {
        if !self.is_complete() || self.sha256().is_some() {
            return Ok(());
        }
        write_meta(
            &self.dir,
            &Meta {
                complete: true,
                sha256: Some(sha.to_string()),
            },
        )?;
        *self.sha256.lock().expect("sha256 lock") = Some(sha);
        Ok(())
    }

    /// Describes the blob.
    pub fn info(&self) -> BlobInfo {
        let have = self.chunks();
        BlobInfo {
            id: self.id(),
            size: self.outboard.size(),
            sha256: self.sha256().map(|d| d.to_string()),
            complete: self.is_complete(),
            chunks: have.len(),
            chunks_verified: have.count(),
            chunk_size: self.geometry().chunk_size(),
        }
    }

    /// Copies a complete blob into `out`. Blocking.
    pub fn copy_to(&self, out: &mut impl Write) -> Result<()> {
        self.ensure_complete()?;
        let mut reader = &self.data;
        let mut remaining = self.outboard.size();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while remaining > 0 {
            let n = (remaining as usize).min(buf.len());
            reader
                .read_exact_at(&mut buf[..n], offset)
                .map_err(|e| StoreError::io("reading", self.dir.join("data"), e))?;
            out.write_all(&buf[..n])
                .map_err(|e| StoreError::io("writing", "output", e))?;
            offset += n as u64;
            remaining -= n as u64;
        }
        let _ = &mut reader;
        Ok(())
    }

    pub(super) fn ensure_complete(&self) -> Result<()> {
        if self.is_complete() {
            return Ok(());
        }
        let have = self.chunks();
        Err(StoreError::Incomplete {
            id: self.id(),
            have: have.count(),
            total: have.len(),
        })
    }

    /// Writes every chunk this blob misses, read from `data` (a verified copy).
    pub(super) fn fill_from(&self, data: &File) -> Result<()> {
        let mut buf = Vec::new();
        for i in 0..self.geometry().chunk_count() {
            if self.has_chunk(i) {
                continue;
            }
            let r = self.geometry().chunk_range(i);
            buf.resize((r.end - r.start) as usize, 0);
            data.read_exact_at(&mut buf, r.start)
                .map_err(|e| StoreError::io("reading", "staged data", e))?;
            self.write_chunk(i, &buf)?;
        }
        Ok(())
    }
}
