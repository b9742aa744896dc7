//! Idle connections and vanished peers (issue 10, item 4): the server closes a connection that
//! has had nothing to do for its idle timeout (gracefully, GOAWAY OK), and PINGs a quiet one,
//! closing it when the PING goes unanswered. All on paused time over in-memory streams.

mod support;

use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};
use towerpc::codec::{Frame, FrameCodec, Message, DEFAULT_MAX_FRAME_LEN, PREFACE_LEN};
use towerpc::Server;

const S: Duration = Duration::from_secs(1);

/// A client's end of a connection to `server` serving `svc`, past the prefaces.
struct Peer {
    io: DuplexStream,
    buf: BytesMut,
    codec: FrameCodec,
}

impl Peer {
    async fn connect(server: Server, svc: support::Svc) -> Peer {
        let (mut io, server_end) = tokio::io::duplex(64 * 1024);
        let incoming = futures_util::stream::iter([Ok::<_, std::io::Error>(server_end)])
            .chain(futures_util::stream::pending());
        tokio::spawn(server.serve_with_incoming(incoming, svc));
        io.write_all(&support::client_preface(DEFAULT_MAX_FRAME_LEN as u32))
            .await
            .unwrap();
        let mut preface = [0u8; PREFACE_LEN];
        io.read_exact(&mut preface).await.unwrap();
        Peer {
            io,
            buf: BytesMut::new(),
            codec: FrameCodec::new(),
        }
    }

    async fn send(&mut self, msg: Message) {
        let mut out = BytesMut::new();
        self.codec.encode(Frame::new(vec![msg]), &mut out).unwrap();
        self.io.write_all(&out).await.unwrap();
    }

    /// The next message, or `None` once the server has closed.
    async fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).unwrap() {
                let mut msgs = frame.into_messages();
                // The tests' servers send one message per frame.
                assert_eq!(msgs.len(), 1, "{msgs:?}");
                return msgs.pop();
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Messages until the server closes, bounded by `limit`.
    async fn until_closed(&mut self, limit: Duration) -> Vec<Message> {
        let mut seen = Vec::new();
        let closed = tokio::time::timeout(limit, async {
            while let Some(msg) = self.next().await {
                seen.push(msg);
            }
        })
        .await;
        assert!(closed.is_ok(), "still open after {limit:?}: {seen:?}");
        seen
    }
}

fn request(id: u32) -> Message {
    Message::Request {
        id,
        timeout_ms: 0,
        method: "echo".into(),
        metadata: Default::default(),
        body: support::msgpack(&id),
    }
}

fn is_goaway_ok(msg: &Message, why: &str) -> bool {
    matches!(msg, Message::GoAway { code: 0, reason } if reason == why.as_bytes())
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_gracefully_and_pings_do_not_keep_it() {
    let server = Server::builder()
        .idle_timeout(60 * S)
        .keepalive_interval(None);
    let mut peer = Peer::connect(server, support::echo()).await;
    peer.send(request(1)).await;
    assert!(matches!(
        peer.next().await,
        Some(Message::Response { id: 1, .. })
    ));
    let last_request = Instant::now();
    // PINGs every 10 s are answered, but are not work.
    for _ in 0..5 {
        tokio::time::sleep(10 * S).await;
        peer.send(Message::Ping { data: 7 }).await;
        assert!(matches!(peer.next().await, Some(Message::Pong { data: 7 })));
    }
    let seen = peer.until_closed(30 * S).await;
    let took = Instant::now() - last_request;
    assert!(is_goaway_ok(&seen[0], "idle connection"), "{seen:?}");
    assert!(
        took >= 60 * S && took < 62 * S,
        "closed {took:?} after the last request"
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_in_flight_keeps_the_connection() {
    let server = Server::builder()
        .idle_timeout(60 * S)
        .keepalive_interval(None);
    let mut peer = Peer::connect(server, support::sleepy(100 * S)).await;
    let start = Instant::now();
    peer.send(request(1)).await;
    assert!(matches!(
        peer.next().await,
        Some(Message::Response { id: 1, .. })
    ));
    assert!(Instant::now() - start >= 100 * S);
    // Closed once idle, no later than two idle timeouts after the request.
    let seen = peer.until_closed(60 * S).await;
    assert!(is_goaway_ok(&seen[0], "idle connection"), "{seen:?}");
    let took = Instant::now() - start;
    assert!(took <= 121 * S, "closed {took:?} after the request");
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_pinged_then_closed() {
    let server = Server::builder()
        .idle_timeout(None)
        .keepalive_interval(30 * S)
        .keepalive_timeout(5 * S);
    let mut peer = Peer::connect(server, support::echo()).await;
    let start = Instant::now();
    assert!(matches!(peer.next().await, Some(Message::Ping { .. })));
    let pinged = Instant::now() - start;
    assert!(
        pinged >= 30 * S && pinged < 31 * S,
        "pinged after {pinged:?}"
    );
    // No PONG: closed the keepalive timeout later.
    let seen = peer.until_closed(10 * S).await;
    assert!(seen.is_empty(), "{seen:?}");
    let took = Instant::now() - start;
    assert!(took >= 35 * S && took < 36 * S, "closed after {took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_answers_pings_stays() {
    let server = Server::builder()
        .idle_timeout(None)
        .keepalive_interval(30 * S)
        .keepalive_timeout(5 * S);
    let mut peer = Peer::connect(server, support::echo()).await;
    for _ in 0..4 {
        let Some(Message::Ping { data }) = peer.next().await else {
            panic!("expected a PING");
        };
        peer.send(Message::Pong { data }).await;
    }
    // Two hours of pings later, calls still work.
    peer.send(request(5)).await;
    assert!(matches!(
        peer.next().await,
        Some(Message::Response { id: 5, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_client_whose_idle_connection_was_closed_dials_again() {
    let server = support::serve(Server::builder().idle_timeout(60 * S), support::echo()).await;
    let client = towerpc::Client::builder()
        .connect(server.addr)
        .await
        .unwrap();
    let one: u32 = client.invoke("echo", &1u32).await.unwrap();
    assert_eq!(one, 1);
    // Ten idle timeouts: the server closes the idle connection gracefully each time, and the
    // client dials again at once, so a call finds a connection up.
    // (Half-way between two idle closes: a call that arrives as one starts is refused, safe
    // to retry, which is not what this test is about.)
    tokio::time::sleep(630 * S).await;
    let accepts = server.stats().accepts;
    assert!((2..=11).contains(&accepts), "{accepts} connections");
    let two: u32 = client.invoke("echo", &2u32).await.unwrap();
    assert_eq!(two, 2);
}
