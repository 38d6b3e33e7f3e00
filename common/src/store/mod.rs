//! The content-addressed store of one daemon: a directory of blobs, complete
//! or partial, that survives crashes and never hands out unverified bytes.
//!
//! A blob directory appears by `rename` from `tmp/`, so it is either whole or
//! absent. A partial blob's chunk is written at its offset *before* its index is
//! appended to `verified`, so after a kill the log never names bytes that were
//! not written; at open every logged chunk is verified again (a cheap hash pass
//! over partial data) to survive power loss too. A blob becomes complete by
//! syncing its data, then atomically rewriting `meta.json`.
//!
//! # Layout
//!
//! - this module: [`Store`] (open, add, adopt, begin, remove, export) and
//!   [`Scratch`];
//! - `blob`: one [`Blob`], its chunk reads and verified writes;
//! - `format`: the files on disk (listed there) and the checks on the
//!   store's directories.

mod blob;
mod format;
#[cfg(test)]
mod tests;

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use dashmap::DashMap;

use self::format::{
    LoadError, copy_with_writeback, create_data_file, load_blob, load_or_create_peer_id,
    private_dir, write_outboard_and_meta,
};
pub use self::{
    blob::{Blob, BlobInfo, WriteOutcome},
    format::{Insecurity, start_writeback},
};
use crate::{BlobId, ChunkSet, Outboard, Sha256Digest, VerifyError, outboard::digest_file};

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
    #[error("store {path} is unsafe: {reason}{}", .reason.remedy(.path))]
    Insecure {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: Insecurity,
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
    pub(super) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
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

pub(super) type Result<T, E = StoreError> = std::result::Result<T, E>;

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
            match load_blob(id, &path) {
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
                let blob = Arc::new(blob.moved_to(dest));
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
            write_outboard_and_meta(&staged, &digest.outboard, true, digest.sha256)?;
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
            let filled = existing.fill_from(&data);
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
            existing.fill_from(&data)?;
            return Ok(existing);
        }
        let data_path = scratch.dir.join("data");
        let place = || -> io::Result<()> {
            fs::rename(&scratch.path, &data_path)?;
            data.set_permissions(fs::Permissions::from_mode(0o644))?;
            data.sync_all()
        };
        place().map_err(|e| StoreError::io("adding", &data_path, e))?;
        write_outboard_and_meta(&scratch.dir, &outboard, true, None)?;
        self.publish(
            &scratch.dir,
            Blob::complete(outboard, scratch.dir.clone(), data, None),
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
            write_outboard_and_meta(&staged, outboard, false, None)?;
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
            copy_with_writeback(&blob.data, &out, blob.outboard().size())
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
