//! Writing a fetched blob to `fetch -o PATH`, as the user who runs `nebula`:
//! the file's owner, mode and umask are the caller's, never the daemon's.
//!
//! - A new path, or an existing regular file: the bytes go to a temporary
//!   file beside it, unnamed (O_TMPFILE) until complete so that a killed
//!   process leaves nothing, then linked as `.NAME.nebula-XXXXXXXX.tmp`,
//!   fsynced and renamed over it: the destination holds the old or the new
//!   content, never a part. A new file gets mode 0666 less the umask; a replaced one
//!   keeps its mode. The temporary file is removed on any failure.
//! - A read-only regular file is refused (the rename would replace what its
//!   owner protected): remove it or make it writable first.
//! - A symbolic link is followed: its target is replaced as above, the link
//!   stays.
//! - Anything else that exists (a character device such as `/dev/null`, a
//!   FIFO, a block device) is opened for writing and written into, in order:
//!   no rename, the node itself is never replaced.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};

use crate::output::bad_input;

/// Most symbolic links followed before giving up, as the kernel does.
const MAX_LINKS: usize = 40;

/// Where `-o` writes, decided before the fetch starts.
#[derive(Debug, Clone)]
pub(crate) enum Destination {
    /// Replace (or create) a regular file atomically.
    Replace {
        /// The file itself (symbolic links resolved).
        path: PathBuf,
        /// The mode of the file it replaces; `None` for a new file.
        mode: Option<u32>,
    },
    /// Write into an existing non-regular file (a device, a FIFO).
    Stream(PathBuf),
}

impl Destination {
    /// Checks `path` (absolute) and decides how to write it. Refuses a
    /// directory and a read-only file before any network call.
    pub(crate) fn plan(path: &Path) -> anyhow::Result<Self> {
        let shown = path.display().to_string();
        let mut path = path.to_owned();
        for _ in 0..MAX_LINKS {
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let parent = path.parent().unwrap_or(Path::new("/"));
                    if !parent.is_dir() {
                        return Err(anyhow!(
                            "cannot write {shown}: directory {} does not exist",
                            parent.display()
                        ));
                    }
                    return Ok(Self::Replace { path, mode: None });
                }
                Err(e) => return Err(anyhow!("cannot write {shown}: {e}")),
            };
            let kind = meta.file_type();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path)
                    .with_context(|| format!("cannot read the link {}", path.display()))?;
                path = match path.parent() {
                    Some(dir) => dir.join(target),
                    None => target,
                };
                continue;
            }
            if kind.is_dir() {
                return Err(bad_input(format!("output {shown} is a directory")));
            }
            if !kind.is_file() {
                return Ok(Self::Stream(path));
            }
            if meta.permissions().readonly() {
                return Err(anyhow!(
                    "cannot write {shown}: the file is read-only (make it writable or remove it first)"
                ));
            }
            let mode = meta.permissions().mode() & 0o7777;
            return Ok(Self::Replace {
                path,
                mode: Some(mode),
            });
        }
        Err(anyhow!(
            "cannot write {shown}: too many levels of symbolic links"
        ))
    }

    /// Opens the destination for writing the blob.
    pub(crate) fn open(&self) -> anyhow::Result<Sink> {
        match self {
            Self::Replace { path, mode } => {
                let dir = path.parent().unwrap_or(Path::new("/"));
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let temp = dir.join(format!(
                    ".{name}.nebula-{:x}{nanos:08x}.tmp",
                    std::process::id()
                ));
                // An unnamed file first (O_TMPFILE): if this process dies
                // mid-write, nothing is left in the directory. Where the
                // filesystem lacks it, a named temporary file.
                let unnamed = Path::new("/proc/self/fd").is_dir().then(|| {
                    OpenOptions::new()
                        .write(true)
                        .mode(0o666)
                        .custom_flags(libc::O_TMPFILE)
                        .open(dir)
                });
                let (file, temp) = match unnamed {
                    Some(Ok(file)) => (file, Temp::Unnamed(temp)),
                    _ => {
                        let file = OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            // Less the caller's umask, like any file they create.
                            .mode(0o666)
                            .open(&temp)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        (file, Temp::Named(temp))
                    }
                };
                let sink = Sink {
                    file,
                    path: path.clone(),
                    temp: Some(temp),
                };
                if let Some(mode) = mode {
                    sink.file
                        .set_permissions(std::fs::Permissions::from_mode(*mode))
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                Ok(sink)
            }
            Self::Stream(path) => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Ok(Sink {
                    file,
                    path: path.clone(),
                    temp: None,
                })
            }
        }
    }
}

/// An open destination. Dropped before [`Sink::finish`], it removes its
/// temporary file: nothing partial is left behind.
#[derive(Debug)]
pub(crate) struct Sink {
    file: File,
    /// The destination as the user sees it (symbolic links resolved).
    path: PathBuf,
    /// The temporary file to rename over `path`; `None` when streaming.
    temp: Option<Temp>,
}

/// Where the bytes go before they replace the destination.
#[derive(Debug)]
enum Temp {
    /// An unnamed file (O_TMPFILE), linked at this name when complete.
    Unnamed(PathBuf),
    /// A file at this name from the start.
    Named(PathBuf),
}

impl Temp {
    fn path(&self) -> &Path {
        match self {
            Self::Unnamed(p) | Self::Named(p) => p,
        }
    }
}

impl Sink {
    /// Appends bytes.
    pub(crate) fn append(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.file
            .write_all(data)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Flushes to disk and, for a regular file, renames it into place.
    pub(crate) fn finish(mut self) -> anyhow::Result<()> {
        let shown = self.path.display().to_string();
        let Some(temp) = self.temp.take() else {
            // A device or a FIFO: nothing to sync or rename.
            return self
                .file
                .flush()
                .with_context(|| format!("writing {shown}"));
        };
        let result = self
            .file
            .sync_all()
            .and_then(|()| match &temp {
                Temp::Unnamed(name) => link_unnamed(&self.file, name),
                Temp::Named(_) => Ok(()),
            })
            .and_then(|()| std::fs::rename(temp.path(), &self.path))
            .with_context(|| format!("writing {shown}"));
        if result.is_err() {
            let _ = std::fs::remove_file(temp.path());
            return result;
        }
        // The rename is durable once the directory is synced; a failure here
        // leaves the complete file in place, so it is not reported.
        if let Some(dir) = self.path.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // An unnamed file vanishes with its descriptor.
        if let Some(Temp::Named(temp)) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// Gives an O_TMPFILE file a name (through its `/proc/self/fd` link, which
/// needs no privilege, unlike `AT_EMPTY_PATH`).
fn link_unnamed(file: &File, name: &Path) -> std::io::Result<()> {
    use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(std::io::Error::other)?;
    let to = std::ffi::CString::new(name.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: two valid NUL-terminated paths; the descriptor is open.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
