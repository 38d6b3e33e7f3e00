use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Layer, Service, ServiceExt};

use super::*;

fn options(handshake_ms: u64, idle_ms: u64, per_address: usize) -> IncomingOptions {
    IncomingOptions {
        handshake_timeout: Duration::from_millis(handshake_ms),
        idle_timeout: Duration::from_millis(idle_ms),
        per_address,
        keepalive: Duration::from_secs(30),
    }
}

/// Writes the greeting on `client` and reads it on `server`.
async fn greet(client: &mut TcpStream, server: &mut Guarded) {
    client.write_all(&[7; GREETING]).await.unwrap();
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < GREETING {
        got += server.read(&mut buf).await.unwrap();
    }
}

#[tokio::test]
async fn a_silent_connection_is_closed_and_a_greeting_one_is_kept() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, _calls) = incoming(listener, options(200, 60_000, 16));
    let mut accepted = Box::pin(accepted);

    let _silent = TcpStream::connect(addr).await.unwrap();
    let mut server = accepted.next().await.unwrap().unwrap();
    let mut buf = [0u8; 64];
    let err = server.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);

    let mut talker = TcpStream::connect(addr).await.unwrap();
    let mut server = accepted.next().await.unwrap().unwrap();
    greet(&mut talker, &mut server).await;
    // Past the greeting, silence is no longer cut short.
    tokio::time::sleep(Duration::from_millis(300)).await;
    talker.write_all(b"x").await.unwrap();
    assert_eq!(server.read(&mut buf).await.unwrap(), 1);
}

#[tokio::test]
async fn one_address_holds_at_most_its_limit_and_gets_slots_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, _calls) = incoming(listener, options(10_000, 60_000, 2));
    let mut accepted = Box::pin(accepted);

    let _a = TcpStream::connect(addr).await.unwrap();
    let first = accepted.next().await.unwrap().unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    let _second = accepted.next().await.unwrap().unwrap();
    // The third is closed as it is accepted: its client reads the end.
    let mut third = TcpStream::connect(addr).await.unwrap();
    let next = accepted.next();
    tokio::pin!(next);
    let mut buf = [0u8; 8];
    let read = tokio::select! {
        read = third.read(&mut buf) => read,
        _ = &mut next => panic!("a third connection from one address was accepted"),
    };
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // One closes; the next from that address is accepted.
    drop(first);
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    let mut server = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("a connection within the limit is accepted")
        .unwrap()
        .unwrap();
    greet(&mut fourth, &mut server).await;
}

#[test]
fn one_ipv6_64_counts_as_one_address_and_mapped_ipv4_as_ipv4() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(address(ip("2001:db8::1")), address(ip("2001:db8::ffff:2")));
    assert_ne!(address(ip("2001:db8::1")), address(ip("2001:db8:0:1::1")));
    assert_eq!(address(ip("::ffff:127.0.0.9")), ip("127.0.0.9"));
    assert_eq!(address(ip("127.0.0.9")), ip("127.0.0.9"));
}

#[tokio::test]
async fn bytes_just_in_get_one_grace_and_no_more() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, _calls) = incoming(listener, options(10_000, 300, 16));
    let mut accepted = Box::pin(accepted);
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut server = accepted.next().await.unwrap().unwrap();
    greet(&mut client, &mut server).await;
    let mut buf = [0u8; 8];
    // Bytes come in as the idle time runs out: kept past it, once.
    tokio::time::sleep(Duration::from_millis(250)).await;
    client.write_all(b"x").await.unwrap();
    assert_eq!(server.read(&mut buf).await.unwrap(), 1);
    let read = tokio::time::timeout(Duration::from_millis(400), server.read(&mut buf)).await;
    assert!(read.is_err(), "closed within its grace: {read:?}");
    // More bytes do not buy a second grace.
    client.write_all(b"y").await.unwrap();
    assert_eq!(server.read(&mut buf).await.unwrap(), 1);
    let read = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
        .await
        .expect("closed after its grace");
    assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
}

/// Calls open and close through the layer the way tonic's server makes
/// them: the request carries the connection's address, the call stays
/// open until the answer's body is dropped.
#[tokio::test]
async fn a_connection_without_a_call_is_closed_after_the_idle_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, calls) = incoming(listener, options(10_000, 300, 16));
    let mut accepted = Box::pin(accepted);
    let mut service = calls.layer(tower::service_fn(|_req: Request<()>| async {
        Ok::<_, std::convert::Infallible>(Response::new(tonic::body::Body::empty()))
    }));

    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut server = accepted.next().await.unwrap().unwrap();
    greet(&mut client, &mut server).await;

    // A call opens and stays open for well past the idle timeout.
    let mut req = Request::new(());
    req.extensions_mut().insert(server.connect_info());
    let answer = service.ready().await.unwrap().call(req).await.unwrap();
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_millis(900), server.read(&mut buf)).await;
    assert!(
        read.is_err(),
        "a connection with a call open was closed: {read:?}"
    );

    // Once it closes, the connection is cut after the idle timeout.
    drop(answer);
    let read = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
        .await
        .expect("an idle connection is closed within its timeout");
    assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
}
