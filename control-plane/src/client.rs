//! Clients of a control plane: the admin client, and what every client
//! shares, re-exported from `nebula_proto::client` so the peer (which does
//! not depend on this crate) uses the same code: the `--control` list, the
//! bearer token, and dialing the first replica that answers.

use std::{path::PathBuf, time::Duration};

pub use nebula_proto::client::{
    Bearer, BearerToken, CONNECT_TIMEOUT, ConnectError, ControlUrlError, InvalidToken,
    connect_first, control_endpoint, parse_control_urls,
};
use nebula_proto::v1::admin_client;
use tonic::{service::interceptor::InterceptedService, transport::Channel};

/// An `Admin` client sending its bearer token, when it has one, with every call.
pub type AdminClient = admin_client::AdminClient<InterceptedService<Channel, Bearer>>;

/// The `Admin` API over `channel`, sending `token` with every call.
pub fn admin(channel: Channel, token: Option<BearerToken>) -> AdminClient {
    admin_client::AdminClient::with_interceptor(channel, Bearer(token))
}

/// The `Admin` API over the control plane's admin socket at `path`, whose
/// mode is what admits callers (a token, when given, is sent all the same).
/// Calls time out after `timeout`.
pub async fn admin_over_socket(
    path: PathBuf,
    token: Option<BearerToken>,
    timeout: Duration,
) -> Result<AdminClient, tonic::transport::Error> {
    let endpoint = nebula_proto::unix::endpoint()
        .connect_timeout(CONNECT_TIMEOUT.min(timeout))
        .timeout(timeout);
    let channel = nebula_proto::unix::connect(endpoint, path).await?;
    Ok(admin(channel, token))
}
