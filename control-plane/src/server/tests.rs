use nebula_proto::v1::{
    FindProvidersRequest, ListPeersRequest, RegisterRequest, admin_client::AdminClient,
    control_plane_client::ControlPlaneClient,
};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::*;

async fn start(config: Config) -> (ControlPlane, Channel) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp = ControlPlane::spawn(listener, config).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", cp.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (cp, channel)
}

#[tokio::test]
async fn serves_health_auth_and_shuts_down() {
    let config = Config {
        join_token: Some("join".into()),
        admin_token: Some("adm".into()),
        ..Config::default()
    };
    let (cp, channel) = start(config).await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "nebula.v1.ControlPlane", "nebula.v1.Admin"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            resp.get_ref().status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
    }
    let mut client = ControlPlaneClient::new(channel.clone());
    let reg = || RegisterRequest {
        peer_id: "p".into(),
        address: "127.0.0.1:9".into(),
        ..Default::default()
    };
    let err = client.register(reg()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("join token"), "{}", err.message());
    let mut req = Request::new(reg());
    req.metadata_mut()
        .insert("authorization", "Bearer join".parse().unwrap());
    client.register(req).await.unwrap();
    let mut find = Request::new(FindProvidersRequest {
        blob: "0".repeat(64),
        ..Default::default()
    });
    find.metadata_mut()
        .insert("authorization", "Bearer join".parse().unwrap());
    client.find_providers(find).await.unwrap();

    let mut admin = AdminClient::new(channel);
    let mut wrong = Request::new(ListPeersRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer join".parse().unwrap());
    assert_eq!(
        admin.list_peers(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut right = Request::new(ListPeersRequest {});
    right
        .metadata_mut()
        .insert("authorization", "Bearer adm".parse().unwrap());
    assert_eq!(
        admin
            .list_peers(right)
            .await
            .unwrap()
            .into_inner()
            .peers
            .len(),
        1
    );

    let addr = cp.local_addr();
    cp.shutdown().await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn without_a_token_admin_answers_only_on_its_socket() {
    let (mut cp, channel) = start(Config::default()).await;
    let dir = std::env::temp_dir().join(format!("nebula-cp-{:08x}", rand::random::<u32>()));
    let path = dir.join("admin.sock");
    let (listener, socket) = nebula_proto::unix::bind_private(&path).await.unwrap();
    cp.serve_admin_socket(listener, socket);

    let status = AdminClient::new(channel)
        .list_peers(ListPeersRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("--admin-socket"), "{status:?}");

    let unix = nebula_proto::unix::connect(nebula_proto::unix::endpoint(), path.clone())
        .await
        .unwrap();
    let peers = AdminClient::new(unix)
        .list_peers(ListPeersRequest {})
        .await
        .unwrap();
    assert!(peers.into_inner().peers.is_empty());
    cp.shutdown().await.unwrap();
    assert!(!path.exists(), "the socket is removed on shutdown");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn reflection_lists_every_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let (cp, channel) = start(Config::default()).await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected answer {answer:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for want in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "nebula.v1.Admin",
        "nebula.v1.ControlPlane",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    assert_eq!(names.len(), 4, "only the services served here: {names:?}");
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn refuses_a_bad_config() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        unhealthy_after: 0,
        ..Config::default()
    };
    assert!(matches!(
        ControlPlane::spawn(listener, config).await,
        Err(ServeError::Config(ConfigError::ZeroCount { .. }))
    ));
}

#[tokio::test]
async fn serve_returns_when_shutdown_resolves() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, Config::default(), async {
        let _ = rx.await;
    }));
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
