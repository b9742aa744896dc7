//! Control-message floods (issue 10, item 5): pings, cancels for ids not in flight, and
//! (request, cancel) pairs cost a peer its connection once past their budget, while an honest
//! client on another connection is served as before.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use towerpc::codec::Message;
use towerpc::{Client, Code, Server};

const BOUND: Duration = Duration::from_secs(10);

fn request(id: u32) -> Message {
    Message::Request {
        id,
        timeout_ms: 0,
        method: Bytes::from_static(b"Sleep"),
        metadata: Bytes::new(),
        body: Bytes::from_static(b"x"),
    }
}

/// Sends `frames`, then reads until the server hangs up; returns the GOAWAY it sent.
async fn flood_until_closed(
    addr: std::net::SocketAddr,
    frames: Vec<Vec<Message>>,
) -> (u16, String) {
    let mut raw = support::raw_client(addr).await;
    for frame in frames {
        raw.write_frame(frame).await;
    }
    let msgs = raw.read_to_end_within(BOUND).await;
    msgs.iter()
        .find_map(|m| match m {
            Message::GoAway { code, reason } => {
                Some((*code, String::from_utf8_lossy(reason).into_owned()))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("closed without a GOAWAY after {} messages", msgs.len()))
}

async fn honest_call(client: &Client) {
    let started = std::time::Instant::now();
    let n: u64 = support::within(BOUND, client.invoke("Echo", &3u64))
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_is_closed() {
    let server = support::serve(Server::builder(), support::echo()).await;
    let honest = Client::connect(server.addr).await.unwrap();
    let pings = (0..500).map(|i| Message::Ping { data: i }).collect();
    let (code, reason) = flood_until_closed(server.addr, vec![pings]).await;
    assert_eq!(Code::from_u16(code), Code::ResourceExhausted, "{reason}");
    assert!(reason.contains("ping"), "{reason}");
    honest_call(&honest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_for_ids_not_in_flight_are_closed() {
    let server = support::serve(Server::builder(), support::echo()).await;
    let honest = Client::connect(server.addr).await.unwrap();
    let cancels = (1..=5000).map(|id| Message::Cancel { id }).collect();
    let (code, reason) = flood_until_closed(server.addr, vec![cancels]).await;
    assert_eq!(Code::from_u16(code), Code::ResourceExhausted, "{reason}");
    assert!(reason.contains("cancel"), "{reason}");
    honest_call(&honest).await;
}

/// The "rapid reset" pattern: each request cancelled right behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_request_cancel_pairs_are_closed() {
    let svc = support::service(|req: towerpc::Request| async move {
        if req.method() == "Sleep" {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        Ok(towerpc::Response::new(req.into_body()))
    });
    let server = support::serve(Server::builder(), svc).await;
    let honest = Client::connect(server.addr).await.unwrap();
    let frames = (0..10)
        .map(|f| {
            (1..=500)
                .flat_map(|i| {
                    let id = f * 500 + i;
                    [request(id), Message::Cancel { id }]
                })
                .collect()
        })
        .collect();
    let (code, reason) = flood_until_closed(server.addr, frames).await;
    assert_eq!(Code::from_u16(code), Code::ResourceExhausted, "{reason}");
    assert!(reason.contains("cancel"), "{reason}");
    // The flood's handlers were stopped with its connection: the honest client is served.
    honest_call(&honest).await;
}

/// Cancelling calls that have run a while is what cancels are for: never counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_calls_that_ran_is_not_a_flood() {
    let server = support::serve(Server::builder(), support::sleepy(Duration::from_secs(10))).await;
    let mut raw = support::raw_client(server.addr).await;
    raw.write_frame((1..=1500).map(request).collect()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw.write_frame((1..=1500).map(|id| Message::Cancel { id }).collect())
        .await;
    let mut cancelled = 0;
    while cancelled < 1500 {
        for m in raw.read_frame_within(BOUND).await.expect("connection open") {
            match m {
                Message::Error { code, .. } if Code::from_u16(code) == Code::Cancelled => {
                    cancelled += 1
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// A towerpc client that gives up thousands of calls at once (callers dropped right after
/// their requests left, the pattern of "rapid reset") keeps within the server's cancel
/// budget: it leaves out the CANCELs past its own (PROTOCOL.md §8, §11), so the connection,
/// and every other call on it, lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_giving_up_calls_in_bulk_keeps_its_connection() {
    let arrived = Arc::new(AtomicUsize::new(0));
    let svc = {
        let arrived = arrived.clone();
        support::service(move |req: towerpc::Request| {
            let arrived = arrived.clone();
            async move {
                if req.method() == "Sleep" {
                    arrived.fetch_add(1, SeqCst);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                Ok(towerpc::Response::new(req.into_body()))
            }
        })
    };
    let server = support::serve(Server::builder(), svc).await;
    let client = Client::builder()
        .max_pending(10_000)
        .connect(server.addr)
        .await
        .unwrap();
    for round in 1..=2 {
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..3000u64 {
            let client = client.clone();
            callers.spawn(async move { client.invoke::<_, u64>("Sleep", &i).await });
        }
        support::eventually("3,000 requests running", BOUND, || {
            arrived.load(SeqCst) == 3000 * round
        })
        .await;
        callers.shutdown().await;
        // Whatever CANCELs went, the server has read them by the time it answers this.
        honest_call(&client).await;
        assert_eq!(client.stats().dials, 1, "the connection was closed");
        assert_eq!(server.stats().protocol_errors, 0);
    }
}

/// A towerpc client whose keepalive interval is shorter than the server's PING budget allows
/// (1 ms, against 100 PINGs a second) sends at most 50 a second, so it keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_tiny_keepalive_keeps_within_the_ping_budget() {
    let server = support::serve(Server::builder(), support::echo()).await;
    let client = Client::builder()
        .keepalive(Duration::from_millis(1))
        .connect(server.addr)
        .await
        .unwrap();
    // Idle for over a second of PINGs and PONGs (a server window or two).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    honest_call(&client).await;
    assert_eq!(client.stats().dials, 1, "the connection was closed");
    assert_eq!(server.stats().protocol_errors, 0);
    let frames = server.stats().frames_read;
    assert!(
        frames <= 2 * 50 + 10,
        "{frames} frames: PINGs past 50 a second"
    );
}
