//! Raw gRPC clients of a control plane, for tests that play a peer or an
//! operator by hand instead of running a daemon: an interceptor adding a
//! bearer token and a peer credential, and [`RawPeer`], a registered peer.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use nebula_proto::{
    client::BearerToken,
    v1::{admin_client::AdminClient, control_plane_client::ControlPlaneClient},
};
use tonic::{
    Request, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

/// The credential a peer got at registration, shared with its client.
pub type Slot = Arc<Mutex<Option<AsciiMetadataValue>>>;

/// Adds `authorization: Bearer <token>` when a token is given, and the
/// peer's credential (`nebula-credential`) once it has one, as a daemon does.
#[derive(Debug, Clone)]
pub struct Bearer(Option<BearerToken>, Slot);

impl Bearer {
    /// With `token` (none when `None`) and an empty credential slot.
    pub fn new(token: Option<&str>) -> Self {
        Self(BearerToken::optional(token).unwrap(), Slot::default())
    }

    /// The slot its credential is read from.
    pub fn slot(&self) -> Slot {
        Arc::clone(&self.1)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            token.authorize(&mut req);
        }
        if let Some(c) = self.1.lock().unwrap().clone() {
            req.metadata_mut().insert("nebula-credential", c);
        }
        Ok(req)
    }
}

/// A control-plane client whose calls go through [`Bearer`].
pub type ControlClient = ControlPlaneClient<InterceptedService<Channel, Bearer>>;
/// An admin client whose calls go through [`Bearer`].
pub type AdminApi = AdminClient<InterceptedService<Channel, Bearer>>;

/// A channel to `url`, connected on first use; connects in 2 s, calls in 10 s.
pub fn lazy_channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// A control-plane client of `url` with `token`.
pub fn cp_client(url: &str, token: Option<&str>) -> ControlClient {
    cp_client_with_slot(url, token).0
}

/// A control-plane client of `url` with `token`, and the slot its credential goes in.
pub fn cp_client_with_slot(url: &str, token: Option<&str>) -> (ControlClient, Slot) {
    let bearer = Bearer::new(token);
    let slot = bearer.slot();
    let client = ControlPlaneClient::with_interceptor(lazy_channel(url), bearer)
        .max_decoding_message_size(64 << 20);
    (client, slot)
}

/// An admin client of `url` with `token`.
pub fn admin_client(url: &str, token: Option<&str>) -> AdminApi {
    AdminClient::with_interceptor(lazy_channel(url), Bearer::new(token))
}

/// A made-up peer playing the attacker (or a bystander) with a raw gRPC
/// client: registered with the control plane like any join-token holder,
/// its later calls carry the credential Register returned.
#[derive(Debug)]
pub struct RawPeer {
    /// Its peer id.
    pub id: String,
    /// The credential Register returned.
    pub credential: String,
    /// A client presenting `credential`.
    pub client: ControlClient,
}

impl RawPeer {
    /// Registers `id` at `address` with the control plane at `url`.
    pub async fn register(url: &str, id: &str, address: &str) -> Result<Self, Status> {
        let answer = Self::client(url, None)
            .register(nebula_proto::v1::RegisterRequest {
                peer_id: id.into(),
                address: address.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(Self {
            id: id.into(),
            client: Self::client(url, Some(&answer.credential)),
            credential: answer.credential,
        })
    }

    /// A client of `url` presenting `credential`.
    pub fn client(url: &str, credential: Option<&str>) -> ControlClient {
        let bearer = Bearer::new(None);
        *bearer.1.lock().unwrap() = credential.map(|c| c.parse().unwrap());
        ControlPlaneClient::with_interceptor(lazy_channel(url), bearer)
    }

    /// The Hello that must open its exchange streams.
    pub fn hello(&self) -> nebula_proto::v1::ExchangeRequest {
        nebula_proto::v1::ExchangeRequest {
            request_id: 0,
            kind: Some(nebula_proto::v1::exchange_request::Kind::Hello(
                nebula_proto::v1::Hello {
                    peer_id: self.id.clone(),
                    address: String::new(),
                },
            )),
        }
    }
}
