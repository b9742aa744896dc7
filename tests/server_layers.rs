//! The server as a tower citizen: layers per connection, the built-in limits as tower's, a
//! shutdown that does not wait for a saturated stack, and `TcpIncoming`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::ServiceBuilder;
use towerpc::server::TcpIncoming;
use towerpc::{Client, Code, Request, Server};

use support::{eventually, within};

const BOUND: Duration = Duration::from_secs(10);

/// A layer's errors reach the client typed: tower's `Elapsed` as `DEADLINE_EXCEEDED`.
#[tokio::test(flavor = "current_thread")]
async fn a_timeout_layer_answers_deadline_exceeded() {
    let server =
        Server::builder().layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(50)));
    let running = support::serve_layered(server, support::sleepy(Duration::from_secs(5))).await;
    let client = Client::connect(running.addr).await.unwrap();
    let err = within(BOUND, client.invoke::<_, u64>("Sleep", &1u64))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(err.code(), Some(Code::DeadlineExceeded));
}

/// The per-connection limit is tower's: with `load_shed` above it a full limit refuses
/// (`REFUSED`, safe to retry) instead of pausing the socket.
#[tokio::test(flavor = "current_thread")]
async fn load_shed_over_the_connection_limit_refuses() {
    let server = Server::builder()
        .layer(tower::load_shed::LoadShedLayer::new())
        .max_concurrency_per_connection(1);
    let running = support::serve_layered(server, support::sleepy(Duration::from_millis(300))).await;
    let client = Client::connect(running.addr).await.unwrap();
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.invoke::<_, u64>("Sleep", &1u64).await }
    });
    eventually("the first call runs", BOUND, || client.pending() == 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let err = within(BOUND, client.invoke::<_, u64>("Sleep", &2u64))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Refused), "{err:?}");
    assert!(err.is_retry_safe());
    assert_eq!(within(BOUND, first).await.unwrap().unwrap(), 1);
}

/// Each connection gets its own stack: a layer's state is per connection.
#[tokio::test(flavor = "current_thread")]
async fn layers_are_built_per_connection() {
    let built = Arc::new(AtomicUsize::new(0));
    let counter = built.clone();
    let server = Server::builder().layer(tower::layer::layer_fn(move |svc| {
        counter.fetch_add(1, Ordering::SeqCst);
        ServiceBuilder::new()
            .map_request(|req: Request| req)
            .service(svc)
    }));
    let running = support::serve_layered(server, support::echo()).await;
    for n in 0..3u64 {
        let client = Client::connect(running.addr).await.unwrap();
        assert_eq!(client.invoke::<_, u64>("Echo", &n).await.unwrap(), n);
    }
    assert_eq!(built.load(Ordering::SeqCst), 3);
}

/// A request waiting for a saturated stack does not hold up a shutdown: it is refused, and
/// serve returns once the running call is done.
#[tokio::test(flavor = "current_thread")]
async fn shutdown_does_not_wait_for_a_saturated_stack() {
    let server = Server::builder()
        .max_concurrency(1)
        .grace_period(Duration::from_secs(5));
    let mut running = support::serve(server, support::sleepy(Duration::from_millis(300))).await;
    let client = Client::connect(running.addr).await.unwrap();
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.invoke::<_, u64>("Sleep", &1u64).await }
    });
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.invoke::<_, u64>("Sleep", &2u64).await }
    });
    eventually("both calls are sent", BOUND, || client.pending() == 2).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    running.trigger_shutdown();
    let err = within(Duration::from_millis(200), second)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Refused), "{err:?}");
    assert_eq!(within(BOUND, first).await.unwrap().unwrap(), 1);
    running.join(BOUND).await;
}

/// `TcpIncoming` tells the port it bound, and TCP options apply to its connections.
#[tokio::test(flavor = "current_thread")]
async fn tcp_incoming_reports_its_address() {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = incoming.local_addr().unwrap();
    assert_ne!(addr.port(), 0);
    let server = Server::builder();
    let handle = server.handle();
    let serving = tokio::spawn(server.serve_with_incoming(incoming, support::echo()));
    let client = Client::connect(addr).await.unwrap();
    assert_eq!(client.invoke::<_, u64>("Echo", &5u64).await.unwrap(), 5);
    assert_eq!(handle.stats().accepts, 1);
    serving.abort();
}
