//! The client and server through a fault-injecting proxy (`support::proxy`): streams split into
//! single bytes and delayed still carry every call; a stalled, half-closed, reset or corrupted
//! connection fails its calls with typed errors within the stall bound, never with another
//! call's reply, and the client carries on over a new connection.

mod support;

use std::time::Duration;

use support::proxy::{Faults, Proxy};
use tokio::time::Instant;
use towerpc::{Client, Error, Server};

const S: Duration = Duration::from_secs(1);

/// Echo server, and a client through a proxy applying `to_server` and `to_client` to its
/// first connection.
async fn through(to_server: Faults, to_client: Faults) -> (support::TestServer, Proxy, Client) {
    let server = support::serve(Server::builder(), support::echo()).await;
    let proxy = Proxy::start(server.addr, to_server, to_client, 1).await;
    let client = Client::builder()
        .stall_timeout(2 * S)
        .timeout(10 * S)
        .connect(proxy.addr)
        .await
        .unwrap();
    (server, proxy, client)
}

/// One call on the faulty connection fails, typed and within the stall bound; the next one,
/// on a new connection, works.
async fn fails_then_recovers(client: &Client, proxy: &Proxy, what: fn(&Error) -> bool) {
    let start = Instant::now();
    let err = client.invoke::<_, u64>("echo", &1u64).await.unwrap_err();
    let took = Instant::now() - start;
    assert!(what(&err), "unexpected error: {err:#}");
    assert!(took < 3 * S, "failed after {took:?}");
    // The client dials again (at once, or after a short backoff) and calls work.
    let deadline = Instant::now() + 10 * S;
    loop {
        match client.invoke::<_, u64>("echo", &2u64).await {
            Ok(got) => {
                assert_eq!(got, 2);
                break;
            }
            Err(e) if e.is_retry_safe() && Instant::now() < deadline => {
                tokio::time::sleep(S / 10).await
            }
            Err(e) => panic!("no recovery: {e:#}"),
        }
    }
    assert!(proxy.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2);
}

fn lost(e: &Error) -> bool {
    e.is_unavailable() || e.is_stalled() || e.is_protocol() || e.to_string().contains("lost")
}

// Real time: with the clock paused, tokio would jump it forward whenever every task waits for
// the proxy's bytes, and the stall rule would see seconds pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_split_into_single_bytes_and_delayed_carry_every_call() {
    let bytes = Faults {
        chunk: Some(1),
        ..Faults::default()
    };
    let delayed = Faults {
        chunk: Some(64),
        delay: Some(Duration::from_millis(1)),
        ..Faults::default()
    };
    let (_server, _proxy, client) = through(bytes, delayed).await;
    let calls = (0..200u64).map(|n| {
        let client = client.clone();
        async move {
            client
                .invoke::<_, u64>("echo", &n)
                .await
                .map(|got| (n, got))
        }
    });
    for res in futures_util::future::join_all(calls).await {
        let (n, got) = res.expect("every call goes through");
        assert_eq!(got, n, "call {n} got another call's reply");
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_stream_that_stalls_fails_calls_as_stalled() {
    // The server's preface goes through, then nothing.
    let stall = Faults {
        stall_after: Some(12),
        ..Faults::default()
    };
    let (_server, proxy, client) = through(Faults::default(), stall).await;
    fails_then_recovers(&client, &proxy, Error::is_stalled).await;
}

#[tokio::test(start_paused = true)]
async fn a_request_stream_half_closed_ends_the_connection() {
    // The client's preface and half of its first frame, then a FIN: the server sees a
    // truncated frame and closes.
    let half = Faults {
        half_close_after: Some(12 + 10),
        ..Faults::default()
    };
    let (_server, proxy, client) = through(half, Faults::default()).await;
    fails_then_recovers(&client, &proxy, lost).await;
}

#[tokio::test(start_paused = true)]
async fn a_reset_connection_fails_its_calls_typed() {
    let reset = Faults {
        reset_after: Some(12 + 5),
        ..Faults::default()
    };
    let (_server, proxy, client) = through(Faults::default(), reset).await;
    fails_then_recovers(&client, &proxy, lost).await;
}

#[tokio::test(start_paused = true)]
async fn a_corrupted_reply_header_is_a_protocol_error_not_a_wrong_reply() {
    // The first byte after the server's preface is the top byte of the first frame's length:
    // flipped, the frame announces more than the client's limit.
    let corrupt = Faults {
        corrupt_at: Some(12),
        ..Faults::default()
    };
    let (_server, proxy, client) = through(Faults::default(), corrupt).await;
    fails_then_recovers(&client, &proxy, lost).await;
    assert!(client.stats().protocol_errors >= 1);
}
