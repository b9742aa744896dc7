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

/// A long reply arriving in fragments (PROTOCOL.md §4.1) is a reply making progress: a server
/// that spends three stall bounds sending one reply, piece by piece, is neither closed as
/// silent nor taken for stuck, and the call gets its whole reply.
#[tokio::test(start_paused = true)]
async fn a_reply_arriving_in_slow_fragments_is_progress() {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    let (client_end, server_end) = tokio::io::duplex(1 << 20);
    let slot: Arc<Mutex<Option<DuplexStream>>> = Arc::new(Mutex::new(Some(client_end)));
    let connector = tower::service_fn(move |_: ()| {
        let io = slot.lock().unwrap().take();
        async move { io.ok_or_else(|| std::io::Error::other("one connection only")) }
    });
    let client = Client::builder()
        .stall_timeout(4 * S)
        .connect_lazy_with((), connector);
    let body: Vec<u8> = (0..120_000u32).map(|i| i as u8).collect();
    let expected = body.clone();
    let server = async move {
        let (mut r, mut w) = tokio::io::split(server_end);
        let mut preface = [0u8; 12];
        r.read_exact(&mut preface).await.unwrap();
        w.write_all(&support::server_preface(16 << 20))
            .await
            .unwrap();
        // The request: a frame of one REQUEST, whose id is at bytes 9..13 of the frame.
        let mut head = [0u8; 8];
        r.read_exact(&mut head).await.unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(head[..4].try_into().unwrap()) as usize];
        r.read_exact(&mut frame).await.unwrap();
        assert_eq!(frame[0], 0x01, "a REQUEST");
        let id = u32::from_be_bytes(frame[1..5].try_into().unwrap());
        let mut whole = vec![0x03];
        whole.extend_from_slice(&id.to_be_bytes());
        whole.extend_from_slice(&(body.len() as u32).to_be_bytes());
        whole.extend_from_slice(&body);
        // Twelve pieces, one a second: three times the stall bound. Whatever the client sends
        // meanwhile (PINGs) goes unread and unanswered.
        let pieces: Vec<&[u8]> = whole.chunks(whole.len() / 12 + 1).collect();
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(S).await;
            }
            let more = u8::from(i + 1 < pieces.len());
            let mut f = ((6 + piece.len()) as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&[0, 0, 0, 1, 0x09, more]);
            f.extend_from_slice(&(piece.len() as u32).to_be_bytes());
            f.extend_from_slice(piece);
            w.write_all(&f).await.unwrap();
        }
        (r, w)
    };
    let start = Instant::now();
    let (reply, _server) = tokio::join!(client.request(Request::new("big", vec![0u8])), server);
    let reply = reply.expect("the call gets its reply");
    assert_eq!(&reply.body()[..], &expected[..]);
    assert!(start.elapsed() >= 11 * S, "{:?}", start.elapsed());
}

/// A server that stops reading while it sends PINGs (within the client's budget of 100 a
/// second, which a flood would blow: `client::a_server_pinging_past_its_budget_gets_goaway_*`):
/// each is answered, and the answers queue behind a write that cannot finish. The write's lack
/// of progress for the stall bound closes the connection, instead of the queue growing for as
/// long as the server keeps it open.
#[tokio::test(start_paused = true)]
async fn a_server_that_stops_reading_is_stalled_by_the_blocked_write() {
    use tokio::io::AsyncWriteExt;
    let (client_end, mut server_end) = tokio::io::duplex(512);
    let connector = support::one_connection(client_end);
    let server = tokio::spawn(async move {
        support::answer_preface(&mut server_end).await;
        // 100 PINGs in one frame: 908 bytes of PONGs, more than the pipe holds.
        let mut ping = vec![0x06];
        ping.extend_from_slice(&7u64.to_be_bytes());
        let mut frame = (100 * 9u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0, 0, 0, 100]);
        for _ in 0..100 {
            frame.extend_from_slice(&ping);
        }
        server_end.write_all(&frame).await.unwrap();
        // Never reads; keeps the connection open.
        std::future::pending::<()>().await;
    });
    let client = Client::builder()
        .stall_timeout(Duration::from_secs(1))
        .connect_with((), connector)
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    while client.stats().write_errors == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "still connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert!(!client.is_connected());
    server.abort();
}

/// RELIABILITY.md P6: with a keepalive, an idle connection is pinged after the interval, kept
/// while the server answers, and closed when nothing comes back within the stall bound.
#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_pinged_and_closed_when_the_server_is_gone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client_end, mut server_end) = tokio::io::duplex(16 * 1024);
    let connector = support::one_connection(client_end);
    // The server answers the first two PINGs, then goes silent.
    let server = tokio::spawn(async move {
        support::answer_preface(&mut server_end).await;
        let mut pings = Vec::new();
        loop {
            let mut head = [0u8; 8];
            if server_end.read_exact(&mut head).await.is_err() {
                return pings;
            }
            let mut body = vec![0u8; u32::from_be_bytes(head[..4].try_into().unwrap()) as usize];
            server_end.read_exact(&mut body).await.unwrap();
            match body[0] {
                // The client's GOAWAY STALLED, before it closes.
                0x08 => {
                    assert_eq!(&body[1..3], &14u16.to_be_bytes());
                    return pings;
                }
                0x06 => {}
                k => panic!("kind {k:#04x}"),
            }
            pings.push(tokio::time::Instant::now());
            if pings.len() <= 2 {
                body[0] = 0x07;
                server_end.write_all(&head).await.unwrap();
                server_end.write_all(&body).await.unwrap();
            }
        }
    });
    let start = tokio::time::Instant::now();
    let client = Client::builder()
        .keepalive(Duration::from_secs(5))
        .stall_timeout(Duration::from_secs(2))
        .connect_with((), connector)
        .await
        .unwrap();
    while client.is_connected() {
        assert!(start.elapsed() < Duration::from_secs(60), "never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = start.elapsed();
    drop(client);
    let pings: Vec<Duration> = server
        .await
        .unwrap()
        .iter()
        .map(|t| t.duration_since(start))
        .collect();
    // A PING every 5 s of silence (give or take the checks' tick of 0.5 s); the third goes
    // unanswered and the connection is closed 2 s later.
    assert_eq!(pings.len(), 3, "{pings:?}");
    for (i, at) in pings.iter().enumerate() {
        let due = Duration::from_secs(5 * (i as u64 + 1));
        assert!(
            *at >= due && *at <= due + Duration::from_secs(1),
            "{pings:?}"
        );
    }
    let due = pings[2] + Duration::from_secs(2);
    assert!(
        closed >= due && closed <= due + Duration::from_secs(1),
        "{closed:?} {pings:?}"
    );
}
