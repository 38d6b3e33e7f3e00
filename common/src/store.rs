//! The content-addressed store of one daemon: a directory of blobs, complete
//! or partial, that survives crashes and never hands out unverified bytes.
//!
//! # On disk
//!
//! ```text
//! <root>/lock                  flock'ed by the daemon that owns the store
//! <root>/peer-id               the daemon's stable peer id
//! <root>/blobs/<id>/data       the blob's bytes (sparse while partial)
//! <root>/blobs/<id>/outboard   u64 size (LE) + the chaining values
//! <root>/blobs/<id>/meta.json  {"complete": bool, "sha256": hex?}
//! <root>/blobs/<id>/verified   partial only: append-only log of verified chunk indexes (u32 LE)
//! <root>/tmp/                  staging; emptied at open
//! ```
//!
//! A blob directory appears by `rename` from `tmp/`, so it is either whole or
//! absent. A partial blob's chunk is written at its offset *before* its index is
//! appended to `verified`, so after a kill the log never names bytes that were
//! not written; at open every logged chunk is verified again (a cheap hash pass
//! over partial data) to survive power loss too. A blob becomes complete by
//! syncing its data, then atomically rewriting `meta.json`.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;

use crate::{
    BlobId, ChunkSet, Geometry, Outboard, Sha256Digest, VerifyError,
    outboard::{digest_file, sha256_file},
};

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store holds no such blob.
    #[error("blob {id} is not in the store")]
    NotFound {
        /// The blob.
        id: BlobId,
    },
    /// The chunk is not (yet) verified in the store.
    #[error("chunk {index} of blob {id} is not in the store")]
    ChunkMissing {
        /// The blob.
        id: BlobId,
        /// The chunk.
        index: u32,
    },
    /// The blob is still partial.
    #[error("blob {id} is incomplete ({have} of {total} chunks)")]
    Incomplete {
        /// The blob.
        id: BlobId,
        /// Chunks held.
        have: u32,
        /// Chunks in the blob.
        total: u32,
    },
    /// Data failed verification and was not stored.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The file system is full (or a file-size limit was hit).
    #[error("no space left for the store at {path}")]
    DiskFull {
        /// Where the write failed.
        path: PathBuf,
    },
    /// Another process owns the store directory.
    #[error("store {path} is in use by another nebula process")]
    Locked {
        /// The store root.
        path: PathBuf,
    },
    /// The store directory could be changed by other users, or holds a
    /// symbolic link where the store keeps its own files.
    #[error("store {path} is unsafe: {reason}")]
    Insecure {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// What an export copied does not hash to the blob's id (the data file
    /// was changed behind the store's back); nothing was left at `path`.
    #[error("the stored data of blob {id} does not hash to its id; nothing was written to {path}")]
    ExportMismatch {
        /// The blob.
        id: BlobId,
        /// The destination.
        path: PathBuf,
    },
    /// Any other I/O failure.
    #[error("{action} {path}: {source}")]
    Io {
        /// What the store was doing.
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl StoreError {
    fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        // ENOSPC is a full disk; EFBIG/EDQUOT are what a size limit or quota give.
        match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EFBIG | libc::EDQUOT) => Self::DiskFull { path },
            _ => Self::Io {
                action,
                path,
                source,
            },
        }
    }

    /// Whether the failure is a full disk.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::DiskFull { .. })
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

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

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Meta {
    complete: bool,
    #[serde(default)]
    sha256: Option<String>,
}

/// One blob in the store, complete or partial. Shared by readers and writers.
#[derive(Debug)]
pub struct Blob {
    outboard: Outboard,
    dir: PathBuf,
    /// Opened read-write; positional I/O only, so sharing is safe.
    data: File,
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
    fn complete(
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
    fn partial(outboard: Outboard, dir: PathBuf, data: File, have: ChunkSet, log: File) -> Self {
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
    fn set_sha256(&self, sha: Sha256Digest) -> Result<()> {
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

    fn ensure_complete(&self) -> Result<()> {
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
}

fn write_meta(dir: &Path, meta: &Meta) -> Result<()> {
    let tmp = dir.join("meta.json.tmp");
    let path = dir.join("meta.json");
    // Cannot fail: Meta serializes to JSON infallibly.
    let body = serde_json::to_vec(meta).expect("meta serializes");
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| StoreError::io("writing", &path, e))
}

/// Why a blob directory could not be loaded.
#[derive(Debug)]
enum LoadError {
    /// Its files are damaged or missing: it is dropped.
    Corrupt(String),
    /// The system refused (descriptors, permissions): the blob is kept.
    Io(io::Error),
}

impl LoadError {
    /// A missing file means a damaged blob; any other I/O error is the system's.
    fn from_io(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::NotFound {
            Self::Corrupt(e.to_string())
        } else {
            Self::Io(e)
        }
    }
}

fn read_outboard(dir: &Path, id: BlobId) -> Result<Outboard, LoadError> {
    let raw = fs::read(dir.join("outboard")).map_err(LoadError::from_io)?;
    if raw.len() < 8 {
        return Err(LoadError::Corrupt("outboard too short".into()));
    }
    // Cannot fail: the length was checked above.
    let size = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
    Outboard::verified(id, size, &raw[8..]).map_err(|e| LoadError::Corrupt(e.to_string()))
}

/// A daemon's store. Cheap to share behind an `Arc`; methods block on disk I/O.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    blobs: DashMap<BlobId, Arc<Blob>>,
    peer_id: String,
    /// Held for the store's lifetime: the flock that keeps other processes out.
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the store at `root`: takes its lock, empties
    /// staging, loads every blob and re-verifies the chunks of partial ones.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        private_dir(&root, true)?;
        for sub in ["blobs", "tmp"] {
            private_dir(&root.join(sub), false)?;
        }
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| StoreError::io("opening", &lock_path, e))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(StoreError::Locked { path: root });
        }
        let tmp = root.join("tmp");
        if let Ok(entries) = fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let p = entry.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
        let peer_id = load_or_create_peer_id(&root)?;
        let store = Self {
            root,
            blobs: DashMap::new(),
            peer_id,
            _lock: lock,
        };
        store.load_blobs()?;
        Ok(store)
    }

    fn load_blobs(&self) -> Result<()> {
        let dir = self.root.join("blobs");
        let entries = fs::read_dir(&dir).map_err(|e| StoreError::io("listing", &dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<BlobId>().ok())
            else {
                continue;
            };
            match self.load_blob(id, &path) {
                Ok(blob) => {
                    self.blobs.insert(id, Arc::new(blob));
                }
                Err(LoadError::Corrupt(why)) => {
                    tracing::warn!(blob = %id, %why, "dropping a corrupt blob from the store");
                    let _ = fs::remove_dir_all(&path);
                }
                Err(LoadError::Io(e)) => {
                    // Out of descriptors, a permission problem: the blob may
                    // be fine, so keep it on disk and fail loudly instead.
                    return Err(StoreError::io("loading", &path, e));
                }
            }
        }
        Ok(())
    }

    fn load_blob(&self, id: BlobId, dir: &Path) -> Result<Blob, LoadError> {
        let outboard = read_outboard(dir, id)?;
        let meta: Meta =
            serde_json::from_slice(&fs::read(dir.join("meta.json")).map_err(LoadError::from_io)?)
                .map_err(|e| LoadError::Corrupt(e.to_string()))?;
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("data"))
            .map_err(LoadError::from_io)?;
        if data.metadata().map_err(LoadError::Io)?.len() != outboard.size() {
            return Err(LoadError::Corrupt("data file has the wrong size".into()));
        }
        let count = outboard.geometry().chunk_count();
        let sha256 = meta.sha256.as_deref().and_then(|s| s.parse().ok());
        if meta.complete {
            return Ok(Blob::complete(outboard, dir.to_owned(), data, sha256));
        }
        // Partial: trust nothing the log says without hashing it again.
        let mut logged = Vec::new();
        if let Ok(mut f) = File::open(dir.join("verified")) {
            f.read_to_end(&mut logged).map_err(LoadError::Io)?;
        }
        let mut have = ChunkSet::new(count);
        let mut buf = Vec::new();
        for idx in logged.chunks_exact(4) {
            // Cannot fail: chunks_exact yields 4-byte slices.
            let i = u32::from_le_bytes(idx.try_into().expect("4 bytes"));
            if i >= count || have.contains(i) {
                continue;
            }
            let r = outboard.geometry().chunk_range(i);
            buf.resize((r.end - r.start) as usize, 0);
            if data.read_exact_at(&mut buf, r.start).is_ok()
                && outboard.verify_chunk(i, &buf).is_ok()
            {
                have.insert(i);
            }
        }
        let log_path = dir.join("verified");
        if have.is_full() {
            // Crashed between the last chunk and the meta rewrite: finish the job.
            data.sync_all().map_err(LoadError::Io)?;
            write_meta(
                dir,
                &Meta {
                    complete: true,
                    sha256: None,
                },
            )
            .map_err(|e| LoadError::Corrupt(e.to_string()))?;
            let _ = fs::remove_file(&log_path);
            return Ok(Blob::complete(outboard, dir.to_owned(), data, None));
        }
        // Rewrite the log from what verified, dropping torn or bad entries.
        let body: Vec<u8> = have.iter().flat_map(u32::to_le_bytes).collect();
        let tmp = dir.join("verified.tmp");
        fs::write(&tmp, &body)
            .and_then(|()| fs::rename(&tmp, &log_path))
            .map_err(LoadError::Io)?;
        let log = OpenOptions::new()
            .append(true)
            .open(&log_path)
            .map_err(LoadError::Io)?;
        Ok(Blob::partial(outboard, dir.to_owned(), data, have, log))
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The daemon's stable peer id (created at first open).
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// The blob, complete or partial, if held.
    pub fn get(&self, id: &BlobId) -> Option<Arc<Blob>> {
        self.blobs.get(id).map(|b| Arc::clone(&b))
    }

    /// A complete blob whose SHA-256 is `digest`.
    pub fn find_sha256(&self, digest: &Sha256Digest) -> Option<Arc<Blob>> {
        self.blobs
            .iter()
            .find(|b| b.is_complete() && b.sha256().as_ref() == Some(digest))
            .map(|b| Arc::clone(&b))
    }

    /// Every blob, sorted by id.
    pub fn list(&self) -> Vec<BlobInfo> {
        let mut out: Vec<BlobInfo> = self.blobs.iter().map(|b| b.info()).collect();
        out.sort_by_key(|b| b.id);
        out
    }

    fn staging_dir(&self) -> Result<PathBuf> {
        let dir = self
            .root
            .join("tmp")
            .join(format!("stage-{:016x}", rand::random::<u64>()));
        fs::create_dir(&dir).map_err(|e| StoreError::io("creating", &dir, e))?;
        Ok(dir)
    }

    /// A file for bytes that are not a blob yet (an origin download), in the
    /// staging area: removed when the [`Scratch`] is dropped, and at the next
    /// open if the daemon dies first. Hand it to [`Store::adopt`] (or
    /// [`Store::add_file`]) when complete. Blocking.
    pub fn scratch(&self) -> Result<Scratch> {
        let dir = self.staging_dir()?;
        let path = dir.join("download");
        match File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => Ok(Scratch {
                dir,
                path,
                file: Arc::new(file),
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(StoreError::io("creating", &path, e))
            }
        }
    }

    /// Moves a staged blob directory into place, unless another writer won.
    fn publish(&self, staged: &Path, blob: Blob) -> Result<Arc<Blob>> {
        let id = blob.id();
        let dest = self.root.join("blobs").join(id.to_string());
        match self.blobs.entry(id) {
            dashmap::Entry::Occupied(existing) => {
                let _ = fs::remove_dir_all(staged);
                Ok(Arc::clone(existing.get()))
            }
            dashmap::Entry::Vacant(slot) => {
                let sync = || -> io::Result<()> {
                    fs::rename(staged, &dest)?;
                    File::open(self.root.join("blobs"))?.sync_all()
                };
                if let Err(e) = sync() {
                    let _ = fs::remove_dir_all(staged);
                    return Err(StoreError::io("publishing", &dest, e));
                }
                let blob = Arc::new(Blob { dir: dest, ..blob });
                slot.insert(Arc::clone(&blob));
                Ok(blob)
            }
        }
    }

    /// Adds a regular file. Blocking; memory stays flat in file size.
    ///
    /// The kernel copies the file into staging (`copy_file_range`) and starts
    /// writing it back to disk block by block, while the hashers read the
    /// source from the page cache in parallel; so the final sync waits for
    /// little. If the source's size or modification time changed meanwhile,
    /// the add fails rather than store bytes under the wrong id. The blob is
    /// synced before it is published.
    pub fn add_file(&self, path: &Path) -> Result<Arc<Blob>> {
        let src = File::open(path).map_err(|e| StoreError::io("opening", path, e))?;
        let before = src
            .metadata()
            .map_err(|e| StoreError::io("reading", path, e))?;
        if !before.is_file() {
            return Err(StoreError::io(
                "adding",
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        let size = before.len();
        let staged = self.staging_dir()?;
        let result = (|| {
            let (data_path, data) = create_data_file(&staged)?;
            let (copied, digest) = std::thread::scope(|s| {
                let hashing = s.spawn(|| digest_file(&src, size, true));
                let copied = copy_with_writeback(&src, &data, size);
                (copied, hashing.join())
            });
            copied.map_err(|e| StoreError::io("copying into", &data_path, e))?;
            let digest = digest
                .map_err(|_| {
                    StoreError::io("hashing", path, io::Error::other("hashing thread failed"))
                })?
                .map_err(|e| StoreError::io("hashing", path, e))?;
            let after = src
                .metadata()
                .map_err(|e| StoreError::io("reading", path, e))?;
            if after.len() != size || after.modified().ok() != before.modified().ok() {
                return Err(StoreError::io(
                    "adding",
                    path,
                    io::Error::other("the file changed while it was being added; try again"),
                ));
            }
            data.sync_all()
                .map_err(|e| StoreError::io("syncing", &data_path, e))?;
            self.stage_files(&staged, &digest.outboard, true, digest.sha256)?;
            Ok((data, digest))
        })();
        let (data, digest) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_dir_all(&staged);
                return Err(e);
            }
        };
        // Already here, perhaps partly (a download in progress): complete
        // that blob from the staged bytes instead of replacing it.
        if let Some(existing) = self.get(&digest.outboard.id()) {
            let filled = fill_from(&existing, &data);
            let _ = fs::remove_dir_all(&staged);
            filled?;
            if let Some(sha) = digest.sha256 {
                let _ = existing.set_sha256(sha);
            }
            return Ok(existing);
        }
        self.publish(
            &staged,
            Blob::complete(digest.outboard, staged.clone(), data, digest.sha256),
        )
    }

    /// Publishes a finished [`Scratch`] whose chunks were hashed as they were
    /// written, under `outboard` (made from those chaining values): the file
    /// moves into the store instead of being copied and hashed again. Its
    /// SHA-256 is computed when first asked for. The scratch's open file
    /// stays readable. Blocking.
    pub fn adopt(&self, scratch: &Scratch, outboard: Outboard) -> Result<Arc<Blob>> {
        let data = scratch
            .file
            .try_clone()
            .map_err(|e| StoreError::io("opening", &scratch.path, e))?;
        if data
            .metadata()
            .map_err(|e| StoreError::io("reading", &scratch.path, e))?
            .len()
            != outboard.size()
        {
            return Err(StoreError::io(
                "adding",
                &scratch.path,
                io::Error::other("the download's size is not its outboard's"),
            ));
        }
        if let Some(existing) = self.get(&outboard.id()) {
            fill_from(&existing, &data)?;
            return Ok(existing);
        }
        let data_path = scratch.dir.join("data");
        let place = || -> io::Result<()> {
            fs::rename(&scratch.path, &data_path)?;
            data.set_permissions(fs::Permissions::from_mode(0o644))?;
            data.sync_all()
        };
        place().map_err(|e| StoreError::io("adding", &data_path, e))?;
        self.stage_files(&scratch.dir, &outboard, true, None)?;
        self.publish(
            &scratch.dir,
            Blob::complete(outboard, scratch.dir.clone(), data, None),
        )
    }

    fn stage_files(
        &self,
        dir: &Path,
        outboard: &Outboard,
        complete: bool,
        sha256: Option<Sha256Digest>,
    ) -> Result<()> {
        let ob_path = dir.join("outboard");
        let mut body = outboard.size().to_le_bytes().to_vec();
        body.extend_from_slice(&outboard.chaining_values());
        let write = || -> io::Result<()> {
            let mut f = File::create(&ob_path)?;
            f.write_all(&body)?;
            f.sync_all()
        };
        write().map_err(|e| StoreError::io("writing", &ob_path, e))?;
        write_meta(
            dir,
            &Meta {
                complete,
                sha256: sha256.map(|d| d.to_string()),
            },
        )
    }

    /// The blob to download into: the existing one (complete or partial, with
    /// its verified chunks: this is resume) or a new partial blob. Space for
    /// the whole blob is reserved up front, so a full disk fails here rather
    /// than midway. Blocking.
    pub fn begin(&self, outboard: &Outboard) -> Result<Arc<Blob>> {
        if let Some(blob) = self.get(&outboard.id()) {
            return Ok(blob);
        }
        let staged = self.staging_dir()?;
        let result = (|| {
            let (data_path, data) = create_data_file(&staged)?;
            let size = outboard.size();
            if size > 0 {
                // SAFETY: plain syscall on a descriptor we own.
                let rc = unsafe {
                    libc::posix_fallocate(
                        std::os::fd::AsRawFd::as_raw_fd(&data),
                        0,
                        size as libc::off_t,
                    )
                };
                if rc != 0 {
                    let err = io::Error::from_raw_os_error(rc);
                    // File systems without fallocate get a sparse file instead.
                    if rc != libc::EOPNOTSUPP && rc != libc::EINVAL {
                        return Err(StoreError::io("reserving space for", &data_path, err));
                    }
                    data.set_len(size)
                        .map_err(|e| StoreError::io("sizing", &data_path, e))?;
                }
            }
            self.stage_files(&staged, outboard, false, None)?;
            let log_path = staged.join("verified");
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| StoreError::io("creating", &log_path, e))?;
            Ok((data, log))
        })();
        let (data, log) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_dir_all(&staged);
                return Err(e);
            }
        };
        let have = ChunkSet::new(outboard.geometry().chunk_count());
        self.publish(
            &staged,
            Blob::partial(outboard.clone(), staged.clone(), data, have, log),
        )
    }

    /// Removes a blob. Readers holding it keep reading the unlinked file.
    pub fn remove(&self, id: &BlobId) -> Result<()> {
        let Some((_, blob)) = self.blobs.remove(id) else {
            return Err(StoreError::NotFound { id: *id });
        };
        let trash = self
            .root
            .join("tmp")
            .join(format!("trash-{:016x}", rand::random::<u64>()));
        fs::rename(&blob.dir, &trash).map_err(|e| StoreError::io("removing", &blob.dir, e))?;
        let _ = fs::remove_dir_all(&trash);
        Ok(())
    }

    /// Exports a complete blob to `dest` atomically: written to a temporary
    /// file beside it, synced, then renamed. On any failure nothing is left at
    /// `dest` (an existing file there is untouched). Blocking.
    pub fn export(&self, id: &BlobId, dest: &Path) -> Result<()> {
        let blob = self.get(id).ok_or(StoreError::NotFound { id: *id })?;
        blob.ensure_complete()?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.nebula-{:08x}.tmp", rand::random::<u32>()));
        let result = (|| {
            let out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)
                .map_err(|e| StoreError::io("creating", &tmp, e))?;
            // Kernel copy with early writeback: the sync below has little left to do.
            copy_with_writeback(&blob.data, &out, blob.outboard.size())
                .map_err(|e| StoreError::io("writing", &tmp, e))?;
            out.sync_all()
                .map_err(|e| StoreError::io("syncing", &tmp, e))?;
            // What lands at the destination is what its id names: the copy is
            // hashed before the rename, so a data file changed behind the
            // store's back is caught here (the page cache makes this cheap).
            let mut hasher = blake3::Hasher::new();
            hasher
                .update_mmap_rayon(&tmp)
                .map_err(|e| StoreError::io("verifying", &tmp, e))?;
            if hasher.finalize() != blob.id().to_hash() {
                return Err(StoreError::ExportMismatch {
                    id: blob.id(),
                    path: dest.to_owned(),
                });
            }
            fs::rename(&tmp, dest).map_err(|e| StoreError::io("renaming to", dest, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// Creates the data file of a staged blob, readable and writable.
fn create_data_file(staged: &Path) -> Result<(PathBuf, File)> {
    let path = staged.join("data");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .map_err(|e| StoreError::io("creating", &path, e))?;
    Ok((path, file))
}

/// Writes every chunk `blob` misses, read from `data` (a verified copy).
fn fill_from(blob: &Blob, data: &File) -> Result<()> {
    let mut buf = Vec::new();
    for i in 0..blob.geometry().chunk_count() {
        if blob.has_chunk(i) {
            continue;
        }
        let r = blob.geometry().chunk_range(i);
        buf.resize((r.end - r.start) as usize, 0);
        data.read_exact_at(&mut buf, r.start)
            .map_err(|e| StoreError::io("reading", "staged data", e))?;
        blob.write_chunk(i, &buf)?;
    }
    Ok(())
}

/// Copies `size` bytes from `src` to `dst` in the kernel, asking it to start
/// writing each block back to disk at once, so a later `fsync` is short.
fn copy_with_writeback(src: &File, dst: &File, size: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const BLOCK: u64 = 16 << 20;
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut done = 0u64;
    let mut kernel_copy = true;
    let mut buf = Vec::new();
    while done < size {
        let want = (size - done).min(BLOCK);
        let n = if kernel_copy {
            let mut off_in = done as libc::loff_t;
            let mut off_out = done as libc::loff_t;
            // SAFETY: both descriptors are open for the duration; the kernel
            // reads and writes through them at the offsets given.
            let rc =
                unsafe { libc::copy_file_range(s, &mut off_in, d, &mut off_out, want as usize, 0) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    // Not supported across these file systems: copy by hand.
                    Some(libc::ENOSYS | libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP) => {
                        kernel_copy = false;
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => return Err(err),
                }
            }
            rc as u64
        } else {
            buf.resize(want as usize, 0);
            let n = src.read_at(&mut buf, done)?;
            dst.write_all_at(&buf[..n], done)?;
            n as u64
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being added",
            ));
        }
        start_writeback(dst, done, n as u64);
        done += n;
    }
    Ok(())
}

/// Asks the kernel to start writing `len` bytes at `at` of `file` to disk,
/// without waiting: bytes written as they arrive are mostly on disk by the
/// time the whole file is synced.
pub fn start_writeback(file: &File, at: u64, len: u64) {
    // SAFETY: a hint about our own descriptor; no memory is involved.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            at as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Creates `dir` (mode 0700) if missing and checks that no other user can
/// change it: not writable by group or others and, below the root (`root`
/// false), a real directory rather than a symbolic link. The root itself may
/// be a link to where the operator keeps the store.
fn private_dir(dir: &Path, root: bool) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let insecure = |reason: String| StoreError::Insecure {
        path: dir.to_owned(),
        reason,
    };
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StoreError::io("creating", dir, e))?,
        Err(e) => return Err(StoreError::io("reading", dir, e)),
        Ok(meta) if meta.file_type().is_symlink() && !root => {
            return Err(insecure("a symbolic link where a directory belongs".into()));
        }
        Ok(_) => {}
    }
    let meta = fs::metadata(dir).map_err(|e| StoreError::io("reading", dir, e))?;
    if !meta.is_dir() {
        return Err(insecure("not a directory".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(insecure(format!(
            "writable by other users (mode {mode:o}); run `chmod go-w {}`",
            dir.display()
        )));
    }
    Ok(())
}

fn load_or_create_peer_id(root: &Path) -> Result<String> {
    let path = root.join("peer-id");
    let read = || -> io::Result<String> {
        let mut text = String::new();
        File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?
            .read_to_string(&mut text)?;
        Ok(text)
    };
    match read() {
        Ok(s) => {
            let s = s.trim();
            if s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit()) {
                return Ok(s.to_owned());
            }
        }
        // A planted link is refused, not followed nor replaced silently.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(StoreError::Insecure {
                path,
                reason: "a symbolic link where the peer id belongs".into(),
            });
        }
        Err(_) => {}
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    let tmp = root.join("peer-id.tmp");
    let write = || -> io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(id.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| StoreError::io("writing", &path, e))?;
    Ok(id)
}

/// A scratch file in the store's staging area; see [`Store::scratch`].
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
    path: PathBuf,
    file: Arc<File>,
}

impl Scratch {
    /// The open file (read and write, positioned writes welcome).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn sample(len: usize, seed: u64) -> Vec<u8> {
        (0..len)
            .map(|i| ((i as u64 ^ seed << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect()
    }

    fn add_bytes(store: &Store, dir: &Path, bytes: &[u8]) -> Arc<Blob> {
        let src = dir.join(format!("src-{}", rand::random::<u32>()));
        fs::write(&src, bytes).unwrap();
        store.add_file(&src).unwrap()
    }

    #[test]
    fn add_list_export_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("store")).unwrap();
        let bytes = sample(3 * MIB + 17, 1);
        let blob = add_bytes(&store, tmp.path(), &bytes);
        assert_eq!(blob.id().to_hash(), blake3::hash(&bytes));
        assert!(blob.is_complete());
        let info = &store.list()[0];
        assert_eq!(
            (info.size, info.chunks, info.chunks_verified),
            (bytes.len() as u64, 4, 4)
        );
        let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&bytes).into();
        assert_eq!(info.sha256.as_deref(), Some(hex::encode(sha).as_str()));
        assert_eq!(
            store.find_sha256(&Sha256Digest(sha)).unwrap().id(),
            blob.id()
        );
        let out = tmp.path().join("out.bin");
        store.export(&blob.id(), &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), bytes);
        let mut streamed = Vec::new();
        blob.copy_to(&mut streamed).unwrap();
        assert_eq!(streamed, bytes);
        assert_eq!(&blob.read_chunk(3).unwrap()[..], &bytes[3 * MIB..]);
        store.remove(&blob.id()).unwrap();
        assert!(store.list().is_empty());
        assert!(matches!(
            store.remove(&blob.id()),
            Err(StoreError::NotFound { .. })
        ));
        // Reopened, the removal holds and the peer id is stable.
        let peer = store.peer_id().to_owned();
        drop(store);
        let store = Store::open(tmp.path().join("store")).unwrap();
        assert!(store.list().is_empty());
        assert_eq!(store.peer_id(), peer);
    }

    #[test]
    fn a_second_open_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _a = Store::open(tmp.path()).unwrap();
        assert!(matches!(
            Store::open(tmp.path()),
            Err(StoreError::Locked { .. })
        ));
    }

    #[test]
    fn partial_blobs_keep_verified_chunks_and_refuse_bad_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = sample(5 * MIB + 123, 2);
        let ob = Outboard::compute(&bytes);
        let chunk = |i: u32| {
            let r = ob.geometry().chunk_range(i);
            &bytes[r.start as usize..r.end as usize]
        };
        {
            let store = Store::open(tmp.path()).unwrap();
            let blob = store.begin(&ob).unwrap();
            assert_eq!(blob.write_chunk(1, chunk(1)).unwrap(), WriteOutcome::Stored);
            assert_eq!(
                blob.write_chunk(1, chunk(1)).unwrap(),
                WriteOutcome::AlreadyHad
            );
            let mut bad = chunk(3).to_vec();
            bad[10] ^= 1;
            assert!(matches!(
                blob.write_chunk(3, &bad),
                Err(StoreError::Verify(_))
            ));
            assert_eq!(blob.write_chunk(5, chunk(5)).unwrap(), WriteOutcome::Stored);
            assert!(matches!(
                blob.read_chunk(3),
                Err(StoreError::ChunkMissing { .. })
            ));
            assert!(matches!(
                store.export(&ob.id(), &tmp.path().join("x")),
                Err(StoreError::Incomplete { .. })
            ));
            assert!(!tmp.path().join("x").exists());
        }
        // Corrupt a logged chunk behind the store's back: reopening drops it.
        let data = tmp
            .path()
            .join("blobs")
            .join(ob.id().to_string())
            .join("data");
        let f = OpenOptions::new().write(true).open(&data).unwrap();
        f.write_all_at(b"garbage", 5 * MIB as u64).unwrap();
        drop(f);
        let store = Store::open(tmp.path()).unwrap();
        let blob = store.get(&ob.id()).unwrap();
        assert_eq!(blob.chunks().iter().collect::<Vec<_>>(), vec![1]);
        for i in 0..6 {
            if i != 1 {
                let expect = if i == 5 {
                    WriteOutcome::Completed
                } else {
                    WriteOutcome::Stored
                };
                assert_eq!(blob.write_chunk(i, chunk(i)).unwrap(), expect);
            }
        }
        assert!(blob.is_complete());
        assert_eq!(
            blob.compute_sha256().unwrap().0,
            <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
        );
        drop(store);
        let store = Store::open(tmp.path()).unwrap();
        let info = &store.list()[0];
        assert!(info.complete && info.sha256.is_some());
        let out = tmp.path().join("out");
        store.export(&ob.id(), &out).unwrap();
        assert_eq!(blake3::hash(&fs::read(&out).unwrap()), ob.id().to_hash());
    }

    #[test]
    fn empty_and_single_chunk_blobs() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("s")).unwrap();
        let empty = add_bytes(&store, tmp.path(), b"");
        assert_eq!(empty.id().to_string(), blake3::hash(b"").to_hex().as_str());
        let one = sample(1000, 3);
        let ob = Outboard::single_chunk(BlobId::of(&one), 1000).unwrap();
        let blob = store.begin(&ob).unwrap();
        assert!(blob.write_chunk(0, &one[..999]).is_err());
        assert_eq!(blob.write_chunk(0, &one).unwrap(), WriteOutcome::Completed);
        let out = tmp.path().join("e");
        store.export(&empty.id(), &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"");
    }

    #[test]
    fn export_failure_leaves_nothing_at_the_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("s")).unwrap();
        let blob = add_bytes(&store, tmp.path(), &sample(MIB + 5, 4));
        let missing_dir = tmp.path().join("no-such-dir").join("out");
        assert!(store.export(&blob.id(), &missing_dir).is_err());
        assert!(!missing_dir.exists());
        // An existing destination survives a failed export untouched.
        let dest = tmp.path().join("keep");
        fs::write(&dest, b"old").unwrap();
        let unknown = BlobId::of(b"unknown");
        assert!(store.export(&unknown, &dest).is_err());
        assert_eq!(fs::read(&dest).unwrap(), b"old");
        let leftovers: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("nebula-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn adding_a_partly_fetched_blob_completes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("s")).unwrap();
        let bytes = sample(3 * MIB, 8);
        let ob = Outboard::compute(&bytes);
        let partial = store.begin(&ob).unwrap();
        partial.write_chunk(0, &bytes[..MIB]).unwrap();
        let added = add_bytes(&store, tmp.path(), &bytes);
        assert!(added.is_complete() && partial.is_complete());
        assert!(added.sha256().is_some());
        let out = tmp.path().join("out");
        store.export(&ob.id(), &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), bytes);
        assert!(
            fs::read_dir(tmp.path().join("s/tmp"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn only_regular_files_are_added() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("s")).unwrap();
        assert!(store.add_file(tmp.path()).is_err());
        assert!(store.list().is_empty());
    }

    #[test]
    fn concurrent_writers_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let bytes = sample(8 * MIB, 6);
        let ob = Outboard::compute(&bytes);
        let blob = store.begin(&ob).unwrap();
        let completed = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (blob, bytes, completed) = (&blob, &bytes, &completed);
                s.spawn(move || {
                    for k in 0..8u32 {
                        let i = (k + t * 3) % 8;
                        let r = blob.geometry().chunk_range(i);
                        if blob
                            .write_chunk(i, &bytes[r.start as usize..r.end as usize])
                            .unwrap()
                            == WriteOutcome::Completed
                        {
                            completed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(completed.load(Ordering::SeqCst), 1);
        assert!(blob.is_complete());
    }
}
