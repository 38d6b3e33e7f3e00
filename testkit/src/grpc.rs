//! Raw gRPC clients of a control plane, for tests that play a peer by hand
//! (an attacker or a bystander) instead of running a daemon.

use std::time::Duration;

/// Adds a peer credential (`nebula-credential`) to every call, as a daemon does.
#[derive(Debug, Clone)]
pub struct Credential(
    /// The credential, if any.
    pub Option<tonic::metadata::AsciiMetadataValue>,
);

impl tonic::service::Interceptor for Credential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(c) = &self.0 {
            req.metadata_mut().insert("nebula-credential", c.clone());
        }
        Ok(req)
    }
}

/// A control-plane client whose calls carry `credential`.
pub type SignedClient = nebula_proto::v1::control_plane_client::ControlPlaneClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credential>,
>;

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
    pub client: SignedClient,
}

impl RawPeer {
    /// Registers `id` at `address` with the control plane at `url`.
    pub async fn register(url: &str, id: &str, address: &str) -> Result<Self, tonic::Status> {
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
    pub fn client(url: &str, credential: Option<&str>) -> SignedClient {
        let channel = tonic::transport::Channel::from_shared(url.to_owned())
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        nebula_proto::v1::control_plane_client::ControlPlaneClient::with_interceptor(
            channel,
            Credential(credential.map(|c| c.parse().unwrap())),
        )
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
