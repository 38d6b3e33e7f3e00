//! Small private files (keys, credentials, ids): written whole with mode
//! 0600 through a temporary name, and read and written without following a
//! symbolic link, so that a link planted where one belongs is refused
//! (`ELOOP`) rather than followed.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

/// The largest private file read (they are a few hundred bytes).
const MAX_LEN: u64 = 64 << 10;

/// The text of `path`, not following a symbolic link; anything but a
/// regular file (a planted FIFO would block the open) is refused.
pub fn read(path: &Path) -> io::Result<String> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut text = String::new();
    file.take(MAX_LEN).read_to_string(&mut text)?;
    Ok(text)
}

/// Makes the entries of `path`'s directory durable (a new name survives a
/// crash only once its directory is synced).
fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// Writes `text` to `path`, replacing what was there at once (a reader sees
/// the old text or the new, never part of it).
pub fn replace(path: &Path, text: &str) -> io::Result<()> {
    let aside = write_aside(path, text)?;
    if let Err(e) = fs::rename(&aside, path) {
        let _ = fs::remove_file(&aside);
        return Err(e);
    }
    sync_dir(path)
}

/// Writes `text` to `path` unless something is already there: true if this
/// call created it. Of processes racing to create one file, exactly one wins
/// and the others read the winner's text.
pub fn create(path: &Path, text: &str) -> io::Result<bool> {
    let aside = write_aside(path, text)?;
    let linked = fs::hard_link(&aside, path);
    let _ = fs::remove_file(&aside);
    match linked {
        Ok(()) => sync_dir(path).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// A new file beside `path` (a random name, mode 0600) holding `text`,
/// flushed to disk.
fn write_aside(path: &Path, text: &str) -> io::Result<PathBuf> {
    let aside = path.with_extension(format!("new-{:08x}", rand::random::<u32>()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&aside)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        });
    match written {
        Ok(()) => Ok(aside),
        Err(e) => {
            let _ = fs::remove_file(&aside);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn files_are_private_replaced_whole_and_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        assert!(create(&path, "first").unwrap());
        assert!(!create(&path, "second").unwrap());
        assert_eq!(read(&path).unwrap(), "first");
        replace(&path, "third").unwrap();
        assert_eq!(read(&path).unwrap(), "third");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing is left beside it.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_planted_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("peer-id");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let err = read(&fifo).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_planted_link_is_neither_read_nor_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, "secret").unwrap();
        let link = dir.path().join("credential");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read(&link).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        // Replacing swaps the link itself for a file; the target is untouched.
        replace(&link, "mine").unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "secret");
        assert_eq!(read(&link).unwrap(), "mine");
    }
}
