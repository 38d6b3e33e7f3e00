//! `nebula daemon` and the client commands that talk to it over its socket.
//!
//! # Layout
//!
//! - `serve`: `nebula daemon`, its flags turned into the peer's `Config`.
//! - `local`: `add`, `ls`, `rm` and `status`, asked of the daemon over its socket.
//! - `fetch`: `nebula fetch`, through the daemon or, with `--control` or a
//!   URL and no daemon, in one shot (`fetch/one_shot`).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use nebula_peer::connect_local;
use nebula_proto::v1 as pb;
use tonic::Code;

use crate::output::bad_input;

mod fetch;
mod local;
mod serve;

pub(crate) use fetch::{FetchArgs, run_fetch};
pub(crate) use local::{AddArgs, LsArgs, RmArgs, StatusArgs, run_add, run_ls, run_rm, run_status};
pub(crate) use serve::{DaemonArgs, run_daemon};

/// The default store: `$XDG_DATA_HOME/nebula`, else `~/.local/share/nebula`.
fn default_store() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("nebula");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/nebula")
}

/// Where to find the local daemon.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DaemonLocation {
    /// The daemon's Unix socket [default: <store>/nebula.sock].
    #[arg(long, env = "NEBULA_SOCKET")]
    socket: Option<PathBuf>,
    /// The daemon's store directory [default: $XDG_DATA_HOME/nebula or ~/.local/share/nebula].
    #[arg(long, env = "NEBULA_STORE")]
    store: Option<PathBuf>,
}

impl DaemonLocation {
    fn store(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(default_store)
    }

    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.store().join("nebula.sock"))
    }

    async fn connect(
        &self,
    ) -> anyhow::Result<pb::local_api_client::LocalApiClient<tonic::transport::Channel>> {
        let socket = self.socket();
        if let Err(e) = tokio::net::UnixStream::connect(&socket).await
            && e.kind() == std::io::ErrorKind::PermissionDenied
        {
            return Err(permission_denied(&socket, &e));
        }
        connect_local(socket.clone()).await.map_err(|e| {
            anyhow!(
                "no daemon at {} ({e}); start one with `nebula daemon`, pass --socket, or give `fetch` --control URL to fetch without a daemon",
                socket.display()
            )
        })
    }
}

/// The socket exists but this user may not use it.
fn permission_denied(socket: &Path, e: &std::io::Error) -> anyhow::Error {
    anyhow!(
        "permission denied on the daemon's socket {} ({e}); run as the daemon's user, or ask for access to the socket",
        socket.display()
    )
}

/// Turns a status from the daemon into a one-line error.
fn status_error(status: tonic::Status) -> anyhow::Error {
    let msg = status.message().to_owned();
    match status.code() {
        Code::InvalidArgument => bad_input(msg),
        Code::Unavailable if msg.is_empty() => anyhow!("the daemon is unavailable"),
        _ => anyhow!(msg),
    }
}
