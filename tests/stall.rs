//! The stall rule tells a busy server from a stuck one (issue 10, item 6; PROTOCOL.md §9): a
//! server whose reader waits at its handler limit PINGs its clients, so they keep it; one whose
//! handlers hang while it answers PINGs fails calls without a deadline of their own fast, with
//! `is_stalled()`, and honours calls that have one. (A server that answers nothing at all is
//! `client::silent_server_is_detected_as_stalled`.) Paused time.

mod support;

use std::time::Duration;

use tokio::time::Instant;
use towerpc::{Client, Request, Server};

const S: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn a_busy_server_is_not_taken_for_a_stuck_one() {
    // One handler at a time, each 30 s: the second and third calls wait behind the limit, and
    // the server reads nothing (no PONG) for a minute.
    let server = support::serve(
        Server::builder().max_concurrency_per_connection(1),
        support::sleepy(30 * S),
    )
    .await;
    let client = Client::builder()
        .stall_timeout(4 * S)
        .connect(server.addr)
        .await
        .unwrap();
    let start = Instant::now();
    let calls = (0..3u32).map(|i| {
        let client = client.clone();
        async move {
            let req = Request::new("slow", support::msgpack(&i)).with_timeout(120 * S);
            client.request(req).await
        }
    });
    for res in futures_util::future::join_all(calls).await {
        let resp = res.expect("a busy server's calls complete");
        assert!(!resp.body().is_empty());
    }
    let took = Instant::now() - start;
    assert!(took >= 90 * S && took < 92 * S, "took {took:?}");
    assert_eq!(
        server.stats().accepts,
        1,
        "the connection was never dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn stuck_handlers_fail_calls_without_a_deadline_fast_and_keep_the_connection() {
    // Handlers that never return, on a server whose reader works (it answers PINGs).
    let server = support::serve(Server::builder(), support::sleepy(1_000_000 * S)).await;
    let client = Client::builder()
        .stall_timeout(4 * S)
        .timeout(20 * S)
        .connect(server.addr)
        .await
        .unwrap();
    let start = Instant::now();
    let default_timeout = {
        let client = client.clone();
        tokio::spawn(async move { client.invoke::<_, u32>("hang", &1u32).await })
    };
    let own_deadline = {
        let client = client.clone();
        tokio::spawn(async move {
            let req = Request::new("hang", support::msgpack(&2u32)).with_timeout(10 * S);
            let res = client.request(req).await;
            (res, Instant::now())
        })
    };
    let err = default_timeout.await.unwrap().unwrap_err();
    let took = Instant::now() - start;
    assert!(err.is_stalled(), "{err:#}");
    assert!(
        took >= 4 * S && took < 6 * S,
        "failed after {took:?}, not at the stall bound"
    );
    // The call with its own deadline waited for it.
    let (res, at) = own_deadline.await.unwrap();
    let err = res.unwrap_err();
    assert!(err.is_timeout(), "{err:#}");
    assert!(at - start >= 10 * S, "ended after {:?}", at - start);
    // The connection stayed up all along.
    assert!(client.is_connected());
    assert_eq!(server.stats().accepts, 1);
}
