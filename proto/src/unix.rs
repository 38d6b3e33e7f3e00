//! gRPC over Unix sockets that only the owner can reach: the daemon's local
//! API (`--socket`) and the control plane's admin socket (`--admin-socket`)
//! are bound with [`bind_private`] and dialed with [`connect`].
//!
//! The file's mode is the access control: nothing checks a token on these
//! sockets, so a socket must never be reachable by another user, not even
//! for a moment between `bind` and `chmod`. Rather than narrowing the
//! process-wide umask (which races with every other thread creating files),
//! the socket is bound inside a fresh directory of mode 0700, made 0600, and
//! only then renamed into place.

use std::{
    io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};

/// The socket file [`bind_private`] made; [`SocketFile::remove`] deletes it
/// on shutdown unless something else has replaced it since.
#[derive(Debug)]
#[must_use = "remove the socket file when the server stops"]
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time of the socket as bound: a path another
    /// process has since taken over is left alone (an inode number alone may
    /// be reused at once).
    identity: (u64, u64, i64, i64),
}

impl SocketFile {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the socket file if it is still the one bound.
    pub fn remove(self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if identity(&meta) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::debug!(path = %self.path.display(), error = %e, "cannot remove the socket");
                }
            }
            _ => {}
        }
    }
}

fn identity(meta: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
}

/// Binds a Unix socket at `path` that only this user can connect to (mode
/// 0600 from the moment it is reachable), creating missing parent
/// directories with mode 0700.
///
/// Refuses a path that exists and is not a socket (`AlreadyExists`), and a
/// socket that another process still answers on (`AddrInUse`); a stale
/// socket (nobody listening) is replaced.
pub async fn bind_private(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Ok(_) => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another process is listening on {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)?;
    let staging = parent.join(format!(".nebula-socket-{:016x}", rand::random::<u64>()));
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let bound = (|| {
        let inner = staging.join("socket");
        let listener = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok((
            listener,
            SocketFile {
                path: path.to_owned(),
                identity: identity(&meta),
            },
        ))
    })();
    let _ = std::fs::remove_dir_all(&staging);
    bound
}

/// An endpoint for [`connect`]: its URI is required by the HTTP/2 layer and
/// never dialed. Set timeouts on it before connecting.
pub fn endpoint() -> Endpoint {
    Endpoint::from_static("http://localhost")
}

/// A gRPC channel to the server on the Unix socket at `path`, set up as
/// `endpoint` says (see [`endpoint`]).
pub async fn connect(
    endpoint: Endpoint,
    path: PathBuf,
) -> Result<Channel, tonic::transport::Error> {
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(
                    UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_0600_refuses_files_and_live_sockets_replaces_stale_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("sub/admin.sock");
        let (listener, file) = bind_private(&path).await.unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(dir.join("sub"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        // No staging directory is left behind.
        assert_eq!(std::fs::read_dir(dir.join("sub")).unwrap().count(), 1);
        let err = bind_private(&path).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(listener);
        // Stale now: replaced, and the old handle no longer removes it.
        let (_again, file2) = bind_private(&path).await.unwrap();
        file.remove();
        assert!(
            path.exists(),
            "a replaced socket is not the old one's to remove"
        );
        file2.remove();
        assert!(!path.exists());

        let plain = dir.join("plain");
        std::fs::write(&plain, b"keep me").unwrap();
        let err = bind_private(&plain).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
    }
}
