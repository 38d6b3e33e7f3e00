//! The store's on-disk format: the files of a blob directory, how they are
//! written and read back, and the checks on the directories themselves.
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

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use super::{Result, StoreError, blob::Blob};
use crate::{BlobId, ChunkSet, Outboard, Sha256Digest, VerifyError, private_file};

/// `meta.json`: whether the blob is complete, and its SHA-256 once known.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Meta {
    pub(super) complete: bool,
    #[serde(default)]
    pub(super) sha256: Option<String>,
}
/// Rewrites `meta.json` atomically (a synced temporary file, renamed).
pub(super) fn write_meta(dir: &Path, meta: &Meta) -> Result<()> {
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
pub(super) enum LoadError {
    /// Its files are damaged or missing: it is dropped.
    Corrupt(Corruption),
    /// The system refused (descriptors, permissions): the blob is kept.
    Io(io::Error),
}

/// What is damaged in a blob directory.
#[derive(Debug, thiserror::Error)]
pub(super) enum Corruption {
    /// One of its files is missing.
    #[error("{0}")]
    Missing(io::Error),
    /// The outboard file is shorter than its size field.
    #[error("outboard too short")]
    OutboardTooShort,
    /// The outboard's chaining values do not give the blob's id.
    #[error(transparent)]
    Outboard(#[from] VerifyError),
    /// `meta.json` does not parse.
    #[error("meta.json: {0}")]
    Meta(#[from] serde_json::Error),
    /// The data file's length is not the blob's size.
    #[error("data file has the wrong size")]
    DataSize,
    /// Every chunk was logged but marking the blob complete failed.
    #[error("cannot mark it complete: {0}")]
    Unfinished(Box<StoreError>),
}

impl From<Corruption> for LoadError {
    fn from(e: Corruption) -> Self {
        Self::Corrupt(e)
    }
}

impl LoadError {
    /// A missing file means a damaged blob; any other I/O error is the system's.
    fn from_io(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::NotFound {
            Self::Corrupt(Corruption::Missing(e))
        } else {
            Self::Io(e)
        }
    }
}

/// Reads a blob's `outboard` file and checks it against `id`.
fn read_outboard(dir: &Path, id: BlobId) -> Result<Outboard, LoadError> {
    let raw = fs::read(dir.join("outboard")).map_err(LoadError::from_io)?;
    if raw.len() < 8 {
        return Err(Corruption::OutboardTooShort.into());
    }
    // Cannot fail: the length was checked above.
    let size = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
    Ok(Outboard::verified(id, size, &raw[8..]).map_err(Corruption::from)?)
}

/// Loads the blob directory `dir` of `id`: a complete blob as it is, a
/// partial one with every chunk its log names verified again.
pub(super) fn load_blob(id: BlobId, dir: &Path) -> Result<Blob, LoadError> {
    let outboard = read_outboard(dir, id)?;
    let meta: Meta =
        serde_json::from_slice(&fs::read(dir.join("meta.json")).map_err(LoadError::from_io)?)
            .map_err(Corruption::from)?;
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("data"))
        .map_err(LoadError::from_io)?;
    if data.metadata().map_err(LoadError::Io)?.len() != outboard.size() {
        return Err(Corruption::DataSize.into());
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
        if data.read_exact_at(&mut buf, r.start).is_ok() && outboard.verify_chunk(i, &buf).is_ok() {
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
        .map_err(|e| Corruption::Unfinished(Box::new(e)))?;
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

/// Writes the outboard and `meta.json` of a blob staged in `dir`.
pub(super) fn write_outboard_and_meta(
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

/// Creates the data file of a staged blob, readable and writable.
pub(super) fn create_data_file(staged: &Path) -> Result<(PathBuf, File)> {
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

/// Copies `size` bytes from `src` to `dst` in the kernel, asking it to start
/// writing each block back to disk at once, so a later `fsync` is short.
pub(super) fn copy_with_writeback(src: &File, dst: &File, size: u64) -> io::Result<()> {
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

/// What makes a store directory or file unsafe to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Insecurity {
    /// A symbolic link where the store keeps a directory of its own.
    #[error("a symbolic link where a directory belongs")]
    LinkForDirectory,
    /// A symbolic link where the store keeps its peer id.
    #[error("a symbolic link where the peer id belongs")]
    LinkForPeerId,
    /// Not a directory where one belongs.
    #[error("not a directory")]
    NotADirectory,
    /// Group or others may write to it.
    #[error("writable by other users (mode {mode:o})")]
    WritableByOthers {
        /// Its permission bits.
        mode: u32,
    },
}

impl Insecurity {
    /// What the operator can run to fix `path`, as the tail of a message.
    pub(super) fn remedy(&self, path: &Path) -> String {
        match self {
            Self::WritableByOthers { .. } => format!("; run `chmod go-w {}`", path.display()),
            _ => String::new(),
        }
    }
}

/// Creates `dir` (mode 0700) if missing and checks that no other user can
/// change it: not writable by group or others and, below the root (`root`
/// false), a real directory rather than a symbolic link. The root itself may
/// be a link to where the operator keeps the store.
pub(super) fn private_dir(dir: &Path, root: bool) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let insecure = |reason: Insecurity| StoreError::Insecure {
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
            return Err(insecure(Insecurity::LinkForDirectory));
        }
        Ok(_) => {}
    }
    let meta = fs::metadata(dir).map_err(|e| StoreError::io("reading", dir, e))?;
    if !meta.is_dir() {
        return Err(insecure(Insecurity::NotADirectory));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(insecure(Insecurity::WritableByOthers { mode }));
    }
    Ok(())
}

/// The peer id in `<root>/peer-id`, made there at first open.
pub(super) fn load_or_create_peer_id(root: &Path) -> Result<String> {
    let path = root.join("peer-id");
    match private_file::read(&path) {
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
                reason: Insecurity::LinkForPeerId,
            });
        }
        Err(_) => {}
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    private_file::replace(&path, &id).map_err(|e| StoreError::io("writing", &path, e))?;
    Ok(id)
}
