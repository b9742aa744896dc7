//! Wire conformance (docs/reliability.md W1, PROTOCOL.md §3–§12): a real server on 127.0.0.1:0,
//! driven by a raw `TcpStream` that writes hand-built bytes and checks the server's bytes.
//!
//! Every verdict is bounded ([`VERDICT`]); nothing here trusts the library's own encoder.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use towerpc::{BoxError, Client, Request, Response, Server};

/// Upper bound on any single verdict.
const VERDICT: Duration = Duration::from_secs(2);

const PROTOCOL_ERROR: u16 = 11;
const FRAME_TOO_LARGE: u16 = 12;
const DEADLINE_EXCEEDED: u16 = 4;
const REFUSED: u16 = 6;

/// The client preface of PROTOCOL.md §14: no compression, 16 MiB.
const CLIENT_PREFACE: [u8; 12] = [
    0x54, 0x52, 0x50, 0x43, 0x01, 0x43, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
];

/// The server preface with the default 16 MiB limit.
const SERVER_PREFACE: [u8; 12] = [
    0x54, 0x52, 0x50, 0x43, 0x01, 0x53, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
];

// ===== server =====

/// Methods: `echo` replies with the body; `slow` sleeps 1 s, `sleep` 5 s, then echo.
async fn handler(req: Request) -> Result<Response, BoxError> {
    match req.method() {
        "slow" => tokio::time::sleep(Duration::from_secs(1)).await,
        "sleep" => tokio::time::sleep(Duration::from_secs(5)).await,
        _ => {}
    }
    Ok(Response::new(req.into_body()))
}

struct TestServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<towerpc::Result<()>>,
}

async fn start(server: Server) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let svc = tower::service_fn(handler);
    let task = tokio::spawn(server.serve_with_incoming_shutdown(
        towerpc::server::TcpIncoming::from(listener),
        svc,
        async {
            let _ = stopped.await;
        },
    ));
    TestServer {
        addr,
        stop: Some(stop),
        task,
    }
}

async fn start_default() -> TestServer {
    start(Server::builder()).await
}

// ===== hand-built bytes =====

/// A frame header: len u32, flags u8, reserved u8, count u16, big-endian.
fn header(len: u32, flags: u8, reserved: u8, count: u16) -> Vec<u8> {
    let mut h = len.to_be_bytes().to_vec();
    h.push(flags);
    h.push(reserved);
    h.extend_from_slice(&count.to_be_bytes());
    h
}

/// A well-formed frame around `msgs`.
fn frame(msgs: &[Vec<u8>]) -> Vec<u8> {
    let len: usize = msgs.iter().map(Vec::len).sum();
    let mut f = header(len as u32, 0, 0, msgs.len() as u16);
    for m in msgs {
        f.extend_from_slice(m);
    }
    f
}

/// REQUEST (kind 1) or ONEWAY (kind 2) with any id, so that bad ids can be sent too.
fn call_msg(kind: u8, id: u32, timeout_ms: u32, method: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&timeout_ms.to_be_bytes());
    m.push(method.len() as u8);
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(method);
    m.extend_from_slice(body);
    m
}

fn request(id: u32, timeout_ms: u32, method: &str, body: &[u8]) -> Vec<u8> {
    call_msg(0x01, id, timeout_ms, method.as_bytes(), body)
}

fn oneway(method: &str, body: &[u8]) -> Vec<u8> {
    call_msg(0x02, 0, 0, method.as_bytes(), body)
}

fn cancel(id: u32) -> Vec<u8> {
    let mut m = vec![0x05];
    m.extend_from_slice(&id.to_be_bytes());
    m
}

fn ping(data: u64) -> Vec<u8> {
    let mut m = vec![0x06];
    m.extend_from_slice(&data.to_be_bytes());
    m
}

/// The exact frame a server must send in reply to `ping(data)`.
fn pong_frame(data: u64) -> Vec<u8> {
    let mut m = vec![0x07];
    m.extend_from_slice(&data.to_be_bytes());
    frame(&[m])
}

// ===== reading the server =====

/// A message from the server, parsed by hand with every length checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Response {
        id: u32,
        body: Vec<u8>,
    },
    Error {
        id: u32,
        code: u16,
        message: String,
    },
    Ping(u64),
    Pong(u64),
    GoAway {
        code: u16,
        reason: String,
    },
    /// A piece of a larger message (§5.7); [`Peer::next_msg`] reassembles them.
    Fragment {
        more: bool,
        data: Vec<u8>,
    },
    /// Window back for our fragments (§5.8).
    Ack(u32),
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Parses `count` messages that must fill `body` exactly.
fn parse_messages(mut body: &[u8], count: u16) -> Vec<Msg> {
    let mut out = Vec::new();
    for i in 0..count {
        assert!(!body.is_empty(), "message {i} missing: frame too short");
        let (msg, used) = match body[0] {
            0x03 => {
                assert!(body.len() >= 9, "short RESPONSE");
                let n = be_u32(&body[5..]) as usize;
                assert!(body.len() >= 9 + n, "RESPONSE body overruns the frame");
                let msg = Msg::Response {
                    id: be_u32(&body[1..]),
                    body: body[9..9 + n].to_vec(),
                };
                (msg, 9 + n)
            }
            0x04 => {
                assert!(body.len() >= 13, "short ERROR");
                let code = be_u16(&body[5..]);
                let n = be_u16(&body[7..]) as usize;
                let d = be_u32(&body[9..]) as usize;
                assert!(body.len() >= 13 + n + d, "ERROR overruns the frame");
                assert_ne!(code, 0, "ERROR with code 0 (§10)");
                let message =
                    String::from_utf8(body[13..13 + n].to_vec()).expect("ERROR msg is not UTF-8");
                let msg = Msg::Error {
                    id: be_u32(&body[1..]),
                    code,
                    message,
                };
                (msg, 13 + n + d)
            }
            k @ (0x06 | 0x07) => {
                assert!(body.len() >= 9, "short PING/PONG");
                let data = u64::from_be_bytes(body[1..9].try_into().unwrap());
                (
                    if k == 0x06 {
                        Msg::Ping(data)
                    } else {
                        Msg::Pong(data)
                    },
                    9,
                )
            }
            0x08 => {
                assert!(body.len() >= 5, "short GOAWAY");
                let code = be_u16(&body[1..]);
                let n = be_u16(&body[3..]) as usize;
                assert!(body.len() >= 5 + n, "GOAWAY reason overruns the frame");
                let reason =
                    String::from_utf8(body[5..5 + n].to_vec()).expect("reason is not UTF-8");
                (Msg::GoAway { code, reason }, 5 + n)
            }
            0x09 => {
                assert!(body.len() >= 6, "short FRAGMENT");
                assert!(body[1] <= 1, "FRAGMENT more flag {}", body[1]);
                let n = be_u32(&body[2..]) as usize;
                assert!(n >= 1, "empty FRAGMENT");
                assert!(body.len() >= 6 + n, "FRAGMENT overruns the frame");
                let msg = Msg::Fragment {
                    more: body[1] == 1,
                    data: body[6..6 + n].to_vec(),
                };
                (msg, 6 + n)
            }
            0x0A => {
                assert!(body.len() >= 5, "short ACK");
                let n = be_u32(&body[1..]);
                assert!(n >= 1, "ACK of 0 bytes");
                (Msg::Ack(n), 5)
            }
            k => panic!("server sent message kind {k:#04x}, not valid server to client"),
        };
        out.push(msg);
        body = &body[used..];
    }
    assert!(body.is_empty(), "{} bytes left over in frame", body.len());
    out
}

/// A raw client connection.
struct Peer {
    stream: TcpStream,
    queued: VecDeque<Msg>,
    /// The message arriving in fragments, and how many pieces it came in so far.
    partial: Option<(Vec<u8>, usize)>,
    /// Pieces of the last message that arrived in fragments.
    last_pieces: usize,
}

impl Peer {
    /// Connects without sending anything.
    async fn raw(addr: SocketAddr) -> Peer {
        let stream = tokio::time::timeout(VERDICT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        Peer {
            stream,
            queued: VecDeque::new(),
            partial: None,
            last_pieces: 0,
        }
    }

    /// Connects, sends the standard client preface and checks the server's, byte for byte.
    async fn handshake(addr: SocketAddr, server_preface: [u8; 12]) -> Peer {
        let mut p = Peer::raw(addr).await;
        p.send(&CLIENT_PREFACE).await;
        let got = p.read_exact(12).await;
        assert_eq!(got, server_preface, "server preface");
        p
    }

    async fn connect(addr: SocketAddr) -> Peer {
        Peer::handshake(addr, SERVER_PREFACE).await
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(VERDICT, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write");
    }

    /// Exactly `n` bytes, within [`VERDICT`].
    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        match tokio::time::timeout(VERDICT, self.stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => buf,
            Ok(Err(e)) => panic!("reading {n} bytes: {e}"),
            Err(_) => panic!("no {n} bytes from the server within {VERDICT:?}"),
        }
    }

    /// The next frame's header and body, or `None` at a clean EOF before a header.
    async fn read_frame(&mut self) -> Option<([u8; 8], Vec<u8>)> {
        let mut head = [0u8; 8];
        let mut got = 0;
        while got < head.len() {
            let n = match tokio::time::timeout(VERDICT, self.stream.read(&mut head[got..])).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) if got == 0 && is_reset(&e) => return None,
                Ok(Err(e)) => panic!("reading a frame header: {e}"),
                Err(_) => panic!("no frame from the server within {VERDICT:?}"),
            };
            if n == 0 {
                assert_eq!(got, 0, "EOF inside a frame header");
                return None;
            }
            got += n;
        }
        let len = be_u32(&head) as usize;
        assert_eq!(&head[4..6], &[0, 0], "server frame flags/reserved");
        assert_ne!(be_u16(&head[6..]), 0, "server frame with count 0");
        assert!(len >= 1, "server frame with len 0");
        assert!(len <= 16 << 20, "server frame above our 16 MiB limit");
        let body = self.read_exact(len).await;
        Some((head, body))
    }

    /// The next message from the server, or `None` once it closed. A message sent in
    /// fragments is returned whole when its last piece arrives, checked against §4.1.
    async fn next_msg(&mut self) -> Option<Msg> {
        loop {
            while let Some(m) = self.queued.pop_front() {
                let Msg::Fragment { more, data } = m else {
                    return Some(m);
                };
                let (buf, pieces) = self.partial.get_or_insert_with(|| (Vec::new(), 0));
                buf.extend_from_slice(&data);
                *pieces += 1;
                if more {
                    continue;
                }
                let (whole, pieces) = self.partial.take().unwrap();
                self.last_pieces = pieces;
                let mut msgs = parse_messages(&whole, 1);
                assert!(
                    matches!(msgs[0], Msg::Response { .. } | Msg::Error { .. }),
                    "server sent {:?} in fragments",
                    msgs[0]
                );
                return msgs.pop();
            }
            let (head, body) = self.read_frame().await?;
            self.queued
                .extend(parse_messages(&body, be_u16(&head[6..])));
        }
    }

    async fn expect_msg(&mut self) -> Msg {
        self.next_msg().await.expect("server closed the connection")
    }

    /// The next message other than an ACK; the ACKs' bytes are added to `acked`.
    async fn expect_msg_counting_acks(&mut self, acked: &mut u32) -> Msg {
        loop {
            match self.expect_msg().await {
                Msg::Ack(n) => *acked += n,
                m => return m,
            }
        }
    }

    /// Asserts that the server closes without sending another byte.
    async fn expect_closed(&mut self) {
        assert!(self.queued.is_empty(), "unread messages: {:?}", self.queued);
        let mut buf = [0u8; 64];
        match tokio::time::timeout(VERDICT, self.stream.read(&mut buf)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => panic!("expected close, got {:02x?}", &buf[..n]),
            Ok(Err(e)) if is_reset(&e) => {}
            Ok(Err(e)) => panic!("expected close, got error {e}"),
            Err(_) => panic!("connection still open after {VERDICT:?}"),
        }
    }

    /// The verdict on a duplicate id (§6): GOAWAY PROTOCOL_ERROR and a close, before which
    /// the server may answer the call already running under `id`, but only with an ERROR, and
    /// at most once; it never runs the duplicate.
    async fn expect_duplicate_refused(&mut self, id: u32) {
        let before = self.expect_goaway_then_close(PROTOCOL_ERROR).await;
        assert!(before.len() <= 1, "{before:?}");
        for m in before {
            assert!(matches!(m, Msg::Error { id: i, .. } if i == id), "{m:?}");
        }
    }

    /// Reads until a GOAWAY, asserts its code and that the connection closes right after.
    /// Returns the messages that came before it.
    async fn expect_goaway_then_close(&mut self, code: u16) -> Vec<Msg> {
        let mut before = Vec::new();
        for _ in 0..64 {
            match self.next_msg().await {
                Some(Msg::GoAway { code: c, reason }) => {
                    assert_eq!(c, code, "GOAWAY code (reason {reason:?})");
                    self.expect_closed().await;
                    return before;
                }
                Some(m) => before.push(m),
                None => panic!("closed without GOAWAY {code}; got {before:?}"),
            }
        }
        panic!("no GOAWAY among {before:?}");
    }

    /// PING with `data` and check the next frame is exactly its PONG.
    /// The next message is GOAWAY DRAINING (code 0): the server has begun to shut down.
    async fn expect_draining(&mut self) {
        match self.expect_msg().await {
            Msg::GoAway { code, .. } => assert_eq!(code, 0, "GOAWAY DRAINING"),
            m => panic!("expected GOAWAY 0, got {m:?}"),
        }
    }

    /// Fragments, and nothing else, until the server has sent a whole window (1 MiB) of them
    /// unacknowledged; returns their data bytes.
    async fn read_a_window_of_fragments(&mut self) -> usize {
        let mut unacked = 0usize;
        while unacked < 1 << 20 {
            let (head, body) = self.read_frame().await.expect("server closed");
            for m in parse_messages(&body, be_u16(&head[6..])) {
                match m {
                    Msg::Fragment { data, .. } => unacked += data.len(),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        unacked
    }

    async fn assert_alive(&mut self, data: u64) {
        self.send(&frame(&[ping(data)])).await;
        let got = self.read_exact(17).await;
        assert_eq!(got, pong_frame(data), "PONG for {data:#x}");
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Sends `bytes` after a good handshake and expects GOAWAY `code` with nothing before it, then
/// a close.
async fn assert_goaway(server: Server, bytes: &[u8], code: u16) {
    let srv = start(server).await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(bytes).await;
    let before = p.expect_goaway_then_close(code).await;
    assert!(
        before.is_empty(),
        "unexpected messages before GOAWAY: {before:?}"
    );
}

// ===== §3 prefaces =====

#[tokio::test]
async fn good_preface_gets_the_server_preface() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    p.assert_alive(1).await;
}

#[tokio::test]
async fn server_preface_announces_the_configured_limit() {
    let srv = start(Server::builder().max_frame_len(4096)).await;
    let mut expected = SERVER_PREFACE;
    expected[8..].copy_from_slice(&4096u32.to_be_bytes());
    let mut p = Peer::handshake(srv.addr, expected).await;
    p.assert_alive(2).await;
}

#[tokio::test]
async fn bad_magic_is_closed_without_a_byte() {
    let srv = start_default().await;
    let mut p = Peer::raw(srv.addr).await;
    let mut bad = CLIENT_PREFACE;
    bad[..4].copy_from_slice(b"XRPC");
    p.send(&bad).await;
    p.expect_closed().await;
}

#[tokio::test]
async fn http_request_is_closed_without_a_byte() {
    let srv = start_default().await;
    let mut p = Peer::raw(srv.addr).await;
    // Exactly 12 bytes, so the server has read everything we sent when it closes.
    p.send(b"GET / HTTP/1").await;
    p.expect_closed().await;
}

#[tokio::test]
async fn version_2_gets_the_v1_preface_then_close() {
    let srv = start_default().await;
    let mut p = Peer::raw(srv.addr).await;
    let mut v2 = CLIENT_PREFACE;
    v2[4] = 0x02;
    p.send(&v2).await;
    assert_eq!(p.read_exact(12).await, SERVER_PREFACE);
    p.expect_closed().await;
}

#[tokio::test]
async fn bad_preface_flags_role_or_limit_are_closed() {
    let srv = start_default().await;
    let mut flags = CLIENT_PREFACE;
    flags[7] = 0x01;
    let mut role = CLIENT_PREFACE;
    role[5] = b'X';
    let mut small = CLIENT_PREFACE;
    small[8..].copy_from_slice(&4095u32.to_be_bytes());
    for (why, bytes) in [("flags", flags), ("role X", role), ("limit 4095", small)] {
        let mut p = Peer::raw(srv.addr).await;
        p.send(&bytes).await;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(VERDICT, p.stream.read(&mut buf)).await {
            Ok(Ok(0)) => {}
            Ok(Err(e)) if is_reset(&e) => {}
            other => panic!("{why}: expected a close, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn server_role_in_client_preface_is_closed() {
    // §3.2: wrong role -> close without sending anything.
    let srv = start_default().await;
    let mut p = Peer::raw(srv.addr).await;
    let mut role = CLIENT_PREFACE;
    role[5] = b'S';
    p.send(&role).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + VERDICT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, p.stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if is_reset(&e) => break,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("connection still open after {VERDICT:?}"),
        }
    }
    assert!(got.is_empty(), "unexpected bytes {got:02x?}");
}

#[tokio::test]
async fn silent_or_partial_preface_is_closed_after_handshake_timeout() {
    let srv = start(Server::builder().handshake_timeout(Duration::from_millis(200))).await;
    for sent in [&[][..], &CLIENT_PREFACE[..5]] {
        let mut p = Peer::raw(srv.addr).await;
        p.send(sent).await;
        let started = Instant::now();
        p.expect_closed().await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(150),
            "closed early: {elapsed:?}"
        );
    }
}

// ===== §5, §8, §9: good traffic =====

#[tokio::test]
async fn request_echo_gets_the_exact_response_bytes() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    // PROTOCOL.md §14, byte for byte.
    #[rustfmt::skip]
    let req = [
        0x00, 0x00, 0x00, 0x15, 0x00, 0x00, 0x00, 0x01,
        0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x4E, 0x20, 0x04, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x01, 0x65, 0x63, 0x68, 0x6F, 0x07,
    ];
    assert_eq!(&req[..], &frame(&[request(1, 20_000, "echo", &[7])])[..]);
    p.send(&req).await;
    #[rustfmt::skip]
    let resp = [
        0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x01,
        0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x07,
    ];
    assert_eq!(p.read_exact(resp.len()).await, resp);
    p.assert_alive(3).await;
}

#[tokio::test]
async fn batched_requests_are_each_answered_once() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    let msgs: Vec<Vec<u8>> = (1..=20u32)
        .map(|id| request(id, 0, "echo", &id.to_be_bytes()))
        .collect();
    p.send(&frame(&msgs)).await;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..20 {
        match p.expect_msg().await {
            Msg::Response { id, body } => {
                assert_eq!(body, id.to_be_bytes(), "body of {id}");
                assert!(seen.insert(id, ()).is_none(), "two replies for {id}");
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    assert_eq!(seen.len(), 20);
    p.assert_alive(4).await;
}

#[tokio::test]
async fn oneway_gets_no_reply() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(&frame(&[oneway("echo", &[1, 2, 3])])).await;
    // Give a wrong reply time to arrive; the next bytes must be the PONG.
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.assert_alive(0xAB).await;
    // And a ONEWAY batched before a PING in one frame.
    p.send(&frame(&[oneway("echo", &[4]), ping(0xCD)])).await;
    assert_eq!(p.read_exact(17).await, pong_frame(0xCD));
}

#[tokio::test]
async fn ping_gets_pong_with_the_same_data() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    for data in [0, 1, 0x0102_0304_0506_0708, u64::MAX] {
        p.send(&frame(&[ping(data)])).await;
        #[rustfmt::skip]
        let mut want = vec![0x00, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x01, 0x07];
        want.extend_from_slice(&data.to_be_bytes());
        assert_eq!(p.read_exact(17).await, want);
    }
}

#[tokio::test]
async fn unsolicited_pong_is_ignored() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    let mut pong = vec![0x07];
    pong.extend_from_slice(&5u64.to_be_bytes());
    p.send(&frame(&[pong])).await;
    p.assert_alive(6).await;
}

#[tokio::test]
async fn cancel_for_unknown_id_is_ignored() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(&frame(&[cancel(999)])).await;
    p.send(&frame(&[request(1, 0, "echo", &[9])])).await;
    assert_eq!(
        p.expect_msg().await,
        Msg::Response {
            id: 1,
            body: vec![9]
        }
    );
    p.assert_alive(7).await;
}

// ===== §12 malformed input =====

#[tokio::test]
async fn oversize_header_gets_frame_too_large_before_the_body() {
    for len in [4097, u32::MAX] {
        let srv = start(Server::builder().max_frame_len(4096)).await;
        let mut expected = SERVER_PREFACE;
        expected[8..].copy_from_slice(&4096u32.to_be_bytes());
        let mut p = Peer::handshake(srv.addr, expected).await;
        // The header alone; the body never comes and the socket stays open.
        p.send(&header(len, 0, 0, 1)).await;
        let before = p.expect_goaway_then_close(FRAME_TOO_LARGE).await;
        assert!(before.is_empty(), "{before:?}");
    }
}

#[tokio::test]
async fn frame_of_exactly_max_len_is_accepted() {
    let srv = start(Server::builder().max_frame_len(4096)).await;
    let mut expected = SERVER_PREFACE;
    expected[8..].copy_from_slice(&4096u32.to_be_bytes());
    let mut p = Peer::handshake(srv.addr, expected).await;
    // REQUEST is 16 + 4 ("echo") + body: a body of 4076 makes exactly 4096.
    let body = vec![0x5A; 4096 - 20];
    let f = frame(&[request(1, 0, "echo", &body)]);
    assert_eq!(f.len(), 8 + 4096);
    p.send(&f).await;
    assert_eq!(p.expect_msg().await, Msg::Response { id: 1, body });
}

macro_rules! protocol_error {
    ($($name:ident: $bytes:expr;)*) => {$(
        #[tokio::test]
        async fn $name() {
            assert_goaway(Server::builder(), &$bytes, PROTOCOL_ERROR).await;
        }
    )*};
}

protocol_error! {
    frame_flags_nonzero_is_a_protocol_error: [header(5, 0x01, 0, 1), cancel(1)].concat();
    frame_reserved_nonzero_is_a_protocol_error: [header(5, 0, 0x01, 1), cancel(1)].concat();
    frame_count_zero_is_a_protocol_error: [header(5, 0, 0, 0), cancel(1)].concat();
    frame_len_zero_is_a_protocol_error: header(0, 0, 0, 1);
    unknown_message_kind_is_a_protocol_error: [header(5, 0, 0, 1), vec![0x7F, 0, 0, 0, 1]].concat();
    message_overrunning_its_frame_is_a_protocol_error:
        [header(5, 0, 0, 1), vec![0x06, 0, 0, 0, 1]].concat();
    request_overrunning_its_frame_is_a_protocol_error: {
        let mut m = request(1, 0, "echo", &[1, 2, 3]);
        m.truncate(m.len() - 1);
        frame(&[m])
    };
    bytes_left_over_is_a_protocol_error: [header(7, 0, 0, 1), cancel(1), vec![0, 0]].concat();
    count_larger_than_messages_is_a_protocol_error:
        [header(9, 0, 0, 2), cancel(1), vec![0x05, 0, 0, 0]].concat();
    empty_method_is_a_protocol_error: frame(&[request(1, 0, "", &[])]);
    method_not_utf8_is_a_protocol_error: frame(&[call_msg(0x01, 1, 0, &[0xFF, 0xFE], &[])]);
    request_id_zero_is_a_protocol_error: frame(&[request(0, 0, "echo", &[])]);
    oneway_with_id_is_a_protocol_error: frame(&[call_msg(0x02, 1, 0, b"echo", &[])]);
    response_from_client_is_a_protocol_error:
        frame(&[vec![0x03, 0, 0, 0, 1, 0, 0, 0, 0]]);
    error_from_client_is_a_protocol_error:
        frame(&[vec![0x04, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0]]);
}

#[tokio::test]
async fn metadata_above_16_kib_is_a_protocol_error() {
    // With the default 16 MiB limit the frame itself is fine: only meta_len is wrong.
    let mut m = request(1, 0, "echo", &[]);
    m[10..12].copy_from_slice(&16_385u16.to_be_bytes());
    m.splice(20..20, std::iter::repeat_n(0x80, 16_385));
    assert_eq!(m.len(), 16 + 4 + 16_385);
    assert_goaway(Server::builder(), &frame(&[m]), PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn duplicate_in_flight_id_is_a_protocol_error() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(&frame(&[request(5, 0, "sleep", &[1])])).await;
    // Make sure the first one was read (and is sleeping) before the duplicate arrives.
    p.assert_alive(8).await;
    p.send(&frame(&[request(5, 0, "echo", &[2])])).await;
    let started = Instant::now();
    p.expect_duplicate_refused(5).await;
    assert!(started.elapsed() < VERDICT);
}

#[tokio::test]
async fn duplicate_id_in_one_frame_is_a_protocol_error() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(&frame(&[
        request(6, 0, "sleep", &[1]),
        request(6, 0, "sleep", &[2]),
    ]))
    .await;
    p.expect_duplicate_refused(6).await;
}

#[tokio::test]
async fn garbage_closes_one_connection_and_spares_the_others() {
    let srv = start_default().await;
    let client = tokio::time::timeout(VERDICT, Client::builder().connect(srv.addr))
        .await
        .expect("client connect timed out")
        .expect("client connect");
    let call = |n: u32| {
        let client = client.clone();
        async move {
            tokio::time::timeout(VERDICT, client.invoke::<u32, u32>("echo", &n))
                .await
                .expect("call timed out")
        }
    };
    assert_eq!(call(1).await.unwrap(), 1);

    // Garbage instead of a preface.
    let mut rng = fastrand::Rng::with_seed(0x9a7b);
    let mut junk = vec![0u8; 12];
    rng.fill(&mut junk);
    junk[0] = b'X';
    let mut a = Peer::raw(srv.addr).await;
    a.send(&junk).await;
    a.expect_closed().await;
    assert_eq!(call(2).await.unwrap(), 2);

    // Garbage after a good preface: whatever the server makes of it, it closes.
    let mut b = Peer::connect(srv.addr).await;
    let mut junk = vec![0u8; 256];
    rng.fill(&mut junk);
    junk[0] = 0xEE; // a header announcing ~4 GB: refused from the header
    b.send(&junk).await;
    let deadline = Instant::now() + VERDICT;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, b.stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) if is_reset(&e) => break,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("garbage connection still open after {VERDICT:?}"),
        }
    }
    assert_eq!(call(3).await.unwrap(), 3);
    assert!(client.is_connected());
}

// ===== §7 deadlines =====

#[tokio::test]
async fn expired_deadline_gets_deadline_exceeded() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    let started = Instant::now();
    p.send(&frame(&[request(9, 50, "sleep", &[])])).await;
    match p.expect_msg().await {
        Msg::Error { id, code, .. } => {
            assert_eq!((id, code), (9, DEADLINE_EXCEEDED));
        }
        m => panic!("expected ERROR DEADLINE_EXCEEDED, got {m:?}"),
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(45), "{elapsed:?}");
    assert!(elapsed < VERDICT, "{elapsed:?}");
    p.assert_alive(10).await;
}

// ===== §10.1 graceful shutdown =====

#[tokio::test]
async fn shutdown_sends_goaway_draining_and_refuses_new_requests() {
    let mut srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    // One call in flight (1 s handler), confirmed read by the PONG behind it.
    p.send(&frame(&[request(1, 0, "slow", &[1])])).await;
    p.assert_alive(11).await;

    srv.stop.take().unwrap().send(()).unwrap();
    p.expect_draining().await;

    p.send(&frame(&[request(2, 0, "echo", &[2])])).await;
    let mut rest = Vec::new();
    for _ in 0..8 {
        match p.next_msg().await {
            Some(m) => rest.push(m),
            None => break,
        }
    }
    let refused = rest
        .iter()
        .filter(|m| {
            matches!(
                m,
                Msg::Error {
                    id: 2,
                    code: REFUSED,
                    ..
                }
            )
        })
        .count();
    assert_eq!(refused, 1, "request 2 after GOAWAY: {rest:?}");
    let answered = rest
        .iter()
        .filter(|m| matches!(m, Msg::Response { id: 1, body } if body == &[1]))
        .count();
    assert_eq!(
        answered, 1,
        "request 1 read before GOAWAY finishes: {rest:?}"
    );
    assert_eq!(rest.len(), 2, "{rest:?}");

    let res = tokio::time::timeout(VERDICT, &mut srv.task)
        .await
        .expect("server did not stop")
        .expect("server task panicked");
    assert!(res.is_ok(), "{res:?}");
}

// ===== §4.1 fragments =====

/// A FRAGMENT message, by hand: kind 09, more, len u32, data.
fn fragment(more: u8, data: &[u8]) -> Vec<u8> {
    let mut m = vec![0x09, more];
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

#[tokio::test]
async fn a_request_in_fragments_is_answered_after_the_messages_sent_between_its_pieces() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let big = request(1, 0, "echo", &body);
    let (a, rest) = big.split_at(70_000);
    let (b, c) = rest.split_at(70_000);
    p.send(&frame(&[fragment(1, a)])).await;
    p.send(&frame(&[
        ping(5),
        fragment(1, b),
        request(2, 0, "echo", b"small"),
    ]))
    .await;
    // The server acknowledges the pieces as it reads them (towerpc every 64 KiB): ACKs come
    // between the other messages, and only their sum is fixed.
    let mut acked = 0;
    assert_eq!(p.expect_msg_counting_acks(&mut acked).await, Msg::Pong(5));
    assert_eq!(
        p.expect_msg_counting_acks(&mut acked).await,
        Msg::Response {
            id: 2,
            body: b"small".to_vec()
        },
        "the small request between the pieces is answered first"
    );
    p.send(&frame(&[fragment(0, c)])).await;
    // The 200 KB reply comes back in fragments too (the server cuts above 64 KiB). The first
    // two pieces were acknowledged as they were read, ahead of the reply; the last, under
    // 64 KiB, waits for more.
    assert_eq!(
        p.expect_msg_counting_acks(&mut acked).await,
        Msg::Response { id: 1, body }
    );
    assert_eq!(acked as usize, a.len() + b.len());
    assert!(p.last_pieces >= 4, "reply in {} pieces", p.last_pieces);
    p.assert_alive(6).await;
}

#[tokio::test]
async fn a_small_message_in_one_fragment_is_answered() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(&frame(&[fragment(0, &request(3, 0, "echo", b"x"))]))
        .await;
    assert_eq!(
        p.expect_msg().await,
        Msg::Response {
            id: 3,
            body: b"x".to_vec()
        }
    );
}

#[tokio::test]
async fn a_fragmented_request_over_the_limit_gets_frame_too_large_from_its_first_piece() {
    let srv = start(Server::builder().max_frame_len(4096)).await;
    let mut expected = SERVER_PREFACE;
    expected[8..].copy_from_slice(&4096u32.to_be_bytes());
    let mut p = Peer::handshake(srv.addr, expected).await;
    // Announces a body that makes the REQUEST 4097 bytes; only 100 of them are sent.
    let mut first = request(1, 0, "echo", &[]);
    first[12..16].copy_from_slice(&(4097u32 - 20).to_be_bytes());
    first.extend_from_slice(&[0u8; 80]);
    p.send(&frame(&[fragment(1, &first)])).await;
    let before = p.expect_goaway_then_close(FRAME_TOO_LARGE).await;
    assert!(before.is_empty(), "{before:?}");
}

#[tokio::test]
async fn a_message_left_unfinished_by_a_closing_client_never_runs() {
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counted = ran.clone();
    let svc = tower::service_fn(move |req: Request| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move { Ok::<_, BoxError>(Response::new(req.into_body())) }
    });
    tokio::spawn(
        Server::builder().serve_with_incoming(towerpc::server::TcpIncoming::from(listener), svc),
    );
    let mut p = Peer::connect(addr).await;
    let whole = oneway("echo", &[1u8; 1000]);
    p.send(&frame(&[fragment(1, &whole[..500])])).await;
    p.assert_alive(1).await;
    p.stream.shutdown().await.unwrap();
    p.expect_closed().await;
    // A whole one on a fresh connection does run: the count can move.
    let mut q = Peer::connect(addr).await;
    q.send(&frame(&[whole])).await;
    q.assert_alive(2).await;
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
}

protocol_error! {
    fragment_more_flag_2_is_a_protocol_error: frame(&[fragment(2, &request(1, 0, "echo", b""))]);
    empty_fragment_is_a_protocol_error: frame(&[fragment(1, &[])]);
    first_fragment_short_of_the_fixed_part_is_a_protocol_error:
        frame(&[fragment(1, &request(1, 0, "echo", b"")[..10])]);
    cancel_in_a_fragment_is_a_protocol_error: frame(&[fragment(0, &cancel(1))]);
    fragment_past_its_message_is_a_protocol_error: {
        let whole = request(1, 0, "echo", &[9u8; 100]);
        frame(&[fragment(1, &whole[..60]), fragment(0, &[&whole[60..], &[0u8][..]].concat())])
    };
    fragment_ending_its_message_early_is_a_protocol_error: {
        let whole = request(1, 0, "echo", &[9u8; 100]);
        frame(&[fragment(1, &whole[..60]), fragment(0, &whole[60..100])])
    };
    fragment_saying_more_after_its_message_is_a_protocol_error: {
        let whole = request(1, 0, "echo", &[9u8; 100]);
        frame(&[fragment(1, &whole[..60]), fragment(1, &whole[60..])])
    };
    response_in_fragments_from_a_client_is_a_protocol_error: {
        let mut m = vec![0x03, 0, 0, 0, 1];
        m.extend_from_slice(&100u32.to_be_bytes());
        m.extend_from_slice(&[0u8; 100]);
        frame(&[fragment(1, &m[..50]), fragment(0, &m[50..])])
    };
}

fn ack(bytes: u32) -> Vec<u8> {
    let mut m = vec![0x0A];
    m.extend_from_slice(&bytes.to_be_bytes());
    m
}

/// A REQUEST for `echo` of `len` bytes cut into 64 KiB FRAGMENTs, a frame each.
fn request_in_pieces(id: u32, len: usize) -> Vec<Vec<u8>> {
    let whole = request(id, 0, "echo", &vec![0x33; len]);
    let n = whole.chunks(64 * 1024).count();
    whole
        .chunks(64 * 1024)
        .enumerate()
        .map(|(i, piece)| frame(&[fragment(u8::from(i + 1 < n), piece)]))
        .collect()
}

/// Sends a REQUEST for `echo` of `len` bytes in pieces, keeping to the 1 MiB window: it gets
/// through only because the server acknowledges what it reads (towerpc every 64 KiB; the
/// protocol's bound is 256 KiB), long before the message is complete. Checks each ACK.
async fn send_in_pieces(p: &mut Peer, id: u32, len: usize) {
    let mut outstanding = 0usize;
    for piece in request_in_pieces(id, len) {
        let data = piece.len() - 8 - 6;
        while outstanding + data > 1 << 20 {
            let (head, body) = p.read_frame().await.expect("server closed");
            for m in parse_messages(&body, be_u16(&head[6..])) {
                let Msg::Ack(n) = m else {
                    panic!("unexpected {m:?}")
                };
                // An ACK every 64 KiB read; several due before the server's writer took the
                // first leave as one.
                assert!(
                    n > 0 && n % (64 * 1024) == 0,
                    "an ACK every 64 KiB read, got {n}"
                );
                outstanding -= n as usize;
            }
        }
        p.send(&piece).await;
        outstanding += data;
    }
}

#[tokio::test]
async fn the_server_acknowledges_fragments_as_it_reads_them_and_its_reply_waits_for_acks() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    // 3 MiB in, three times the window.
    let len = 3 << 20;
    send_in_pieces(&mut p, 1, len).await;
    // The 3 MiB reply comes in pieces; 1 MiB of them unacknowledged, and the server waits.
    let mut got = 0usize;
    let mut unacked = 0usize;
    let mut more = true;
    let mut waited = false;
    while more {
        let (head, body) = p.read_frame().await.expect("server closed");
        for m in parse_messages(&body, be_u16(&head[6..])) {
            let Msg::Fragment { more: m_more, data } = m else {
                // What is left of the server's ACKs for our request.
                assert!(matches!(m, Msg::Ack(_)), "unexpected {m:?}");
                continue;
            };
            got += data.len();
            unacked += data.len();
            more = m_more;
        }
        assert!(unacked <= 1 << 20, "the server sent past its window");
        if unacked == 1 << 20 && !waited {
            // Nothing more comes until we acknowledge.
            let mut byte = [0u8; 1];
            let quiet =
                tokio::time::timeout(Duration::from_millis(300), p.stream.read(&mut byte)).await;
            assert!(quiet.is_err(), "the server went on past its window");
            waited = true;
        }
        // No ACK until the window is full once; then one every 256 KiB.
        if waited && (unacked >= 256 * 1024 || !more) {
            p.send(&frame(&[ack(unacked as u32)])).await;
            unacked = 0;
        }
    }
    assert!(waited, "the window was never full");
    assert_eq!(got, 9 + len, "the whole RESPONSE");
    p.assert_alive(9).await;
}

/// A CANCEL for a call whose large reply waits to go out in fragments, none of it sent yet
/// (behind another large reply, which waits for our ACKs), takes the reply back: the call is
/// answered ERROR CANCELLED at once instead, and its megabytes never come.
#[tokio::test]
async fn a_cancel_takes_back_a_large_reply_none_of_which_has_left() {
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    // Two requests whole (a frame may hold a large message whole: no window applies), each
    // echoed: 3 MiB, then 200 KiB.
    p.send(&frame(&[request(1, 0, "echo", &vec![0x11; 3 << 20])]))
        .await;
    p.send(&frame(&[request(2, 0, "echo", &vec![0x22; 200 << 10])]))
        .await;
    // The first reply's pieces up to the window, unacknowledged.
    let unacked = p.read_a_window_of_fragments().await;
    p.send(&frame(&[cancel(2)])).await;
    let (head, body) = p.read_frame().await.expect("server closed");
    let msgs = parse_messages(&body, be_u16(&head[6..]));
    assert!(
        matches!(&msgs[..], [Msg::Error { id: 2, code: 1, .. }]),
        "not ERROR CANCELLED for the second call: {msgs:?}"
    );
    // The rest of the first reply, and nothing after it.
    p.send(&frame(&[ack(unacked as u32)])).await;
    let mut got = unacked;
    let mut more = true;
    while more {
        let (head, body) = p.read_frame().await.expect("server closed");
        for m in parse_messages(&body, be_u16(&head[6..])) {
            let Msg::Fragment { more: m_more, data } = m else {
                panic!("unexpected {m:?}")
            };
            got += data.len();
            more = m_more;
            p.send(&frame(&[ack(data.len() as u32)])).await;
        }
    }
    assert_eq!(got, 9 + (3 << 20), "the whole first RESPONSE");
    let mut byte = [0u8; 1];
    let quiet = tokio::time::timeout(Duration::from_millis(300), p.stream.read(&mut byte)).await;
    assert!(quiet.is_err(), "more came after the first reply");
    p.assert_alive(9).await;
}

/// Large replies queued past `max_queued_bytes` while the client reads them (they wait only
/// for its ACKs) do not stop the server reading its requests: a small call made behind them is
/// answered within the first window of their fragments, before any ACK, and the large replies
/// keep to the window meanwhile.
#[tokio::test]
async fn small_calls_are_read_and_answered_while_large_replies_past_the_cap_wait_for_acks() {
    let srv = start(Server::builder().max_queued_bytes(1 << 20)).await;
    let mut p = Peer::connect(srv.addr).await;
    // Three 1 MiB echoes, whole: 3 MiB of replies queued, three times the cap.
    for id in 1..=3 {
        p.send(&frame(&[request(id, 0, "echo", &vec![0x44; 1 << 20])]))
            .await;
    }
    // The first window of their fragments, unacknowledged.
    let unacked = p.read_a_window_of_fragments().await;
    assert_eq!(unacked, 1 << 20, "past the window");
    // A small call now: read, run and answered before another byte of the large replies.
    p.send(&frame(&[request(4, 0, "echo", b"\xa1x")])).await;
    let (head, body) = p.read_frame().await.expect("server closed");
    let msgs = parse_messages(&body, be_u16(&head[6..]));
    assert_eq!(
        msgs,
        vec![Msg::Response {
            id: 4,
            body: b"\xa1x".to_vec()
        }],
        "the small call's reply, not more fragments"
    );
    p.assert_alive(9).await;
}

protocol_error! {
    ack_for_more_than_outstanding_is_a_protocol_error: frame(&[ack(1)]);
    ack_of_zero_bytes_is_a_protocol_error: frame(&[ack(0)]);
}

#[tokio::test]
async fn nothing_follows_a_goaway_that_closes_the_connection() {
    // §5.6: after a GOAWAY other than DRAINING the sender closes; a reply still going out in
    // fragments is abandoned (§4.1: closing is the one way to).
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    send_in_pieces(&mut p, 1, 3 << 20).await;
    // Every piece of the reply is acknowledged at once, so the server never waits for window;
    // with the second, a frame with flags set.
    let mut bad = frame(&[ping(7)]);
    bad[4] = 1;
    let mut pieces = 0;
    let mut goaway = None;
    let mut after = Vec::new();
    while let Some((head, body)) = p.read_frame().await {
        for m in parse_messages(&body, be_u16(&head[6..])) {
            match m {
                Msg::GoAway { code, .. } if goaway.is_none() => goaway = Some(code),
                m if goaway.is_some() => after.push(m),
                Msg::Fragment { data, .. } => {
                    pieces += 1;
                    let mut out = frame(&[ack(data.len() as u32)]);
                    if pieces == 2 {
                        out.extend_from_slice(&bad);
                    }
                    p.send(&out).await;
                }
                Msg::Ack(_) => {}
                m => panic!("unexpected {m:?}"),
            }
        }
    }
    assert_eq!(goaway, Some(PROTOCOL_ERROR), "after {pieces} pieces");
    assert!(
        after.is_empty(),
        "{} messages after the GOAWAY: {:?}",
        after.len(),
        after.first()
    );
    assert!(pieces < 48, "the whole reply went out: {pieces} pieces");
}

#[tokio::test]
async fn bad_magic_is_closed_at_once_not_at_the_handshake_timeout() {
    // §3.2: "close at once"; the rest of the preface is never waited for.
    let srv = start(Server::builder().handshake_timeout(Duration::from_secs(60))).await;
    let mut p = Peer::raw(srv.addr).await;
    p.send(b"XRPC").await;
    p.expect_closed().await;
    let mut p = Peer::raw(srv.addr).await;
    p.send(b"T").await;
    p.send(b"Z").await;
    p.expect_closed().await;
}

fn goaway(code: u16, reason: &str) -> Vec<u8> {
    let mut m = vec![0x08];
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    m.extend_from_slice(reason.as_bytes());
    m
}

#[tokio::test]
async fn a_client_goaway_ends_the_connection_whatever_its_code() {
    // §10.2: the server reads nothing more, stops the handlers still running and closes; a
    // GOAWAY 0 from a client is no drain.
    for code in [0, PROTOCOL_ERROR] {
        let srv = start_default().await;
        let mut p = Peer::connect(srv.addr).await;
        p.send(&frame(&[request(1, 0, "sleep", b"x")])).await;
        p.assert_alive(1).await;
        let started = Instant::now();
        p.send(&frame(&[goaway(code, "bye"), request(2, 0, "echo", b"y")]))
            .await;
        // Closed within the verdict, long before `sleep`'s 5 s: the handler was not waited
        // for; the request behind the GOAWAY never ran.
        let mut said = Vec::new();
        while let Some(m) = p.next_msg().await {
            said.push(m);
        }
        assert!(started.elapsed() < Duration::from_secs(4), "code {code}");
        assert!(
            said.iter().all(|m| matches!(m, Msg::Error { id: 1, .. })),
            "code {code}: {said:?}"
        );
    }
}

#[tokio::test]
async fn the_server_keeps_its_frames_and_replies_to_the_limit_the_client_announced() {
    // §3: no frame over the max_frame_len the peer announced; a reply too large for it is
    // answered with an ERROR instead (it could not be received, whole or in fragments).
    let srv = start_default().await;
    let mut p = Peer::raw(srv.addr).await;
    let mut preface = CLIENT_PREFACE;
    preface[8..].copy_from_slice(&4096u32.to_be_bytes());
    p.send(&preface).await;
    assert_eq!(p.read_exact(12).await, SERVER_PREFACE);
    // Ten replies of 1 KiB each, and one of 4,090 bytes of body (4,099 in all).
    let mut reqs: Vec<Vec<u8>> = (1..=10)
        .map(|id| request(id, 0, "echo", &[id as u8; 1024]))
        .collect();
    reqs.push(request(11, 0, "echo", &[0x77; 4090]));
    p.send(&frame(&reqs)).await;
    let mut replies = Vec::new();
    while replies.len() < 11 {
        let (head, body) = p.read_frame().await.expect("server closed");
        assert!(be_u32(&head) <= 4096, "a frame of {} bytes", be_u32(&head));
        replies.extend(parse_messages(&body, be_u16(&head[6..])));
    }
    for id in 1..=10u32 {
        assert!(
            replies.iter().any(
                |m| matches!(m, Msg::Response { id: i, body } if *i == id && body.len() == 1024)
            ),
            "no reply to {id}: {replies:?}"
        );
    }
    assert!(
        replies.iter().any(|m| matches!(
            m,
            Msg::Error {
                id: 11,
                code: 7,
                ..
            }
        )),
        "the reply over the limit: {:?}",
        replies.last()
    );
    p.assert_alive(3).await;
}

// ===== hostile peers: what §4.1, §6, §7 and §3.3 leave no room for =====

/// `whole` cut in two FRAGMENTs, each in a frame of its own.
fn in_two_frames(whole: &[u8], at: usize) -> Vec<u8> {
    [
        frame(&[fragment(1, &whole[..at])]),
        frame(&[fragment(0, &whole[at..])]),
    ]
    .concat()
}

protocol_error! {
    a_reassembled_request_with_a_method_not_utf8_is_a_protocol_error:
        in_two_frames(&call_msg(0x01, 1, 0, &[0xFF, 0xFE], &[7u8; 100]), 40);
    a_reassembled_request_with_an_empty_method_is_a_protocol_error:
        in_two_frames(&request(1, 0, "", &[7u8; 100]), 40);
    a_reassembled_request_with_id_0_is_a_protocol_error:
        in_two_frames(&request(0, 0, "echo", &[7u8; 100]), 40);
    a_reassembled_oneway_with_an_id_is_a_protocol_error:
        in_two_frames(&call_msg(0x02, 7, 0, b"echo", &[7u8; 100]), 40);
    a_reassembled_request_with_metadata_above_16_kib_is_a_protocol_error: {
        let mut m = request(1, 0, "echo", &[]);
        m[10..12].copy_from_slice(&16_385u16.to_be_bytes());
        m.splice(20..20, std::iter::repeat_n(0x80, 16_385));
        in_two_frames(&m, 8_000)
    };
    an_ack_of_u32_max_is_a_protocol_error: frame(&[ack(u32::MAX)]);
}

#[tokio::test]
async fn a_request_in_fragments_reusing_an_id_in_flight_is_a_protocol_error() {
    // §4.1: the reassembled message is checked as any other, ids included (§6).
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(&frame(&[request(5, 0, "sleep", &[1])])).await;
    p.assert_alive(1).await;
    p.send(&in_two_frames(&request(5, 0, "echo", &[2u8; 300]), 100))
        .await;
    p.expect_duplicate_refused(5).await;
}

#[tokio::test]
async fn an_ack_for_one_byte_more_than_the_server_sent_is_a_protocol_error() {
    // §4.1, §12: an ACK for exactly what is outstanding is fine; one byte more is not. The
    // reply (300,009 bytes) fits the 1 MiB window: all of it is outstanding once it is in.
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    let body = vec![0x42; 300_000];
    let sent = 9 + body.len() as u32;
    p.send(&frame(&[request(1, 0, "echo", &body)])).await;
    assert_eq!(
        p.expect_msg().await,
        Msg::Response {
            id: 1,
            body: body.clone()
        }
    );
    assert!(p.last_pieces >= 2, "the reply came whole");
    p.send(&frame(&[ack(sent - 1)])).await;
    p.assert_alive(2).await;
    // One byte is outstanding now; two are acknowledged.
    p.send(&frame(&[ack(2)])).await;
    let before = p.expect_goaway_then_close(PROTOCOL_ERROR).await;
    assert!(before.is_empty(), "{before:?}");
}

#[tokio::test]
async fn a_deadline_of_0_is_none_and_one_of_u32_max_ms_does_not_expire() {
    // §7: 0 = no deadline; the largest is 49.7 days away, not an overflow nor a past instant.
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(&frame(&[
        request(1, 0, "slow", &[1]),
        request(2, u32::MAX, "slow", &[2]),
        request(3, u32::MAX, "echo", &[3]),
    ]))
    .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(p.expect_msg().await);
    }
    got.sort_by_key(|m| match m {
        Msg::Response { id, .. } | Msg::Error { id, .. } => *id,
        _ => 0,
    });
    assert_eq!(
        got,
        (1..=3u8)
            .map(|id| Msg::Response {
                id: id as u32,
                body: vec![id]
            })
            .collect::<Vec<_>>()
    );
    p.assert_alive(4).await;
}

#[tokio::test]
async fn a_health_check_reusing_an_id_in_flight_is_a_protocol_error() {
    // §6: the health check is a REQUEST as any other, its id included.
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(&frame(&[request(5, 0, "sleep", &[1])])).await;
    p.assert_alive(1).await;
    p.send(&frame(&[request(5, 0, "towerpc.health.Check", &[])]))
        .await;
    p.expect_duplicate_refused(5).await;
}

#[tokio::test]
async fn a_duplicate_id_while_draining_is_a_protocol_error_not_refused() {
    // §6 and §10.1: REFUSED says the request never ran; for a duplicate of a call that is
    // running it would be one reply too many, and a lie about the first.
    let mut srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(&frame(&[request(1, 0, "slow", &[1])])).await;
    p.assert_alive(1).await;
    srv.stop.take().unwrap().send(()).unwrap();
    p.expect_draining().await;
    p.send(&frame(&[request(1, 0, "echo", &[2])])).await;
    let before = p.expect_goaway_then_close(PROTOCOL_ERROR).await;
    assert!(before.len() <= 1, "{before:?}");
    for m in before {
        assert!(
            matches!(m, Msg::Error { id: 1, code, .. } if code != REFUSED),
            "{m:?}"
        );
    }
}

#[tokio::test]
async fn a_duplicate_id_behind_a_full_limit_is_a_protocol_error_and_never_runs() {
    // §6: a REQUEST whose id is in flight when it is read is a protocol error, also when the
    // reader must wait (for a handler slot, or for the request bytes handlers hold to go
    // down) before it could run it: the duplicate is never run nor answered, however long
    // the first takes.
    let limits = [
        (
            "one handler a connection",
            Server::builder().max_concurrency_per_connection(1),
        ),
        (
            "1000 request bytes held",
            Server::builder().max_in_flight_bytes(1000),
        ),
    ];
    for (what, server) in limits {
        let srv = start(server).await;
        let mut p = Peer::connect(srv.addr).await;
        p.send(&frame(&[request(5, 0, "slow", &[1; 2000])])).await;
        p.assert_alive(1).await;
        let started = Instant::now();
        p.send(&frame(&[request(5, 0, "echo", &[2])])).await;
        let before = p.expect_goaway_then_close(PROTOCOL_ERROR).await;
        // The server PINGs while its reader waits (§9); those aside, at most the first call's
        // ERROR comes before the GOAWAY, and never the duplicate's reply.
        let replies: Vec<_> = before
            .into_iter()
            .filter(|m| !matches!(m, Msg::Ping(_)))
            .collect();
        assert!(replies.len() <= 1, "{what}: {replies:?}");
        for m in replies {
            assert!(matches!(m, Msg::Error { id: 5, .. }), "{what}: {m:?}");
        }
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{what}: judged only once the first call ended: {:?}",
            started.elapsed()
        );
    }
}

#[cfg(feature = "compression-zstd")]
#[tokio::test]
async fn reserved_compression_bits_are_never_chosen() {
    // §3.3: a v1 server never chooses a reserved bit, and chooses exactly one algorithm.
    let server = Server::builder().accept_compression(towerpc::codec::Compression::Zstd);
    let srv = start(server).await;
    for (offer, chosen) in [(0xF8, 0x00), (0xFF, 0x01), (0x09, 0x01)] {
        let mut p = Peer::raw(srv.addr).await;
        let mut preface = CLIENT_PREFACE;
        preface[6] = offer;
        p.send(&preface).await;
        let mut want = SERVER_PREFACE;
        want[6] = chosen;
        assert_eq!(p.read_exact(12).await, want, "offer {offer:#04x}");
        if chosen == 0 {
            p.assert_alive(offer as u64).await;
        }
    }
}

#[tokio::test]
async fn a_cancel_overtaking_the_last_piece_of_its_request_is_ignored() {
    // §4.1 Order: a CANCEL may arrive before the last piece of the REQUEST it cancels; it is
    // ignored as for any id not in flight (§8), and the request runs when its last piece comes.
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    let whole = request(7, 0, "echo", &[7u8; 500]);
    p.send(&frame(&[fragment(1, &whole[..100]), cancel(7)]))
        .await;
    p.assert_alive(1).await;
    p.send(&frame(&[fragment(0, &whole[100..])])).await;
    assert_eq!(
        p.expect_msg().await,
        Msg::Response {
            id: 7,
            body: vec![7u8; 500]
        }
    );
    p.assert_alive(2).await;
}

#[tokio::test]
async fn a_request_whose_last_piece_comes_after_the_drain_began_is_refused() {
    // §4.1: a reassembled message is handled as if it arrived whole where its last piece is;
    // §10.1: a REQUEST read after GOAWAY DRAINING is answered REFUSED and never run.
    let mut srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    let whole = request(2, 0, "echo", &[2u8; 500]);
    p.send(&frame(&[
        request(1, 0, "slow", &[1]),
        fragment(1, &whole[..100]),
    ]))
    .await;
    p.assert_alive(1).await;
    srv.stop.take().unwrap().send(()).unwrap();
    p.expect_draining().await;
    p.send(&frame(&[fragment(0, &whole[100..])])).await;
    let mut rest = Vec::new();
    while let Some(m) = p.next_msg().await {
        rest.push(m);
    }
    assert!(
        rest.iter().any(|m| matches!(
            m,
            Msg::Error {
                id: 2,
                code: REFUSED,
                ..
            }
        )),
        "{rest:?}"
    );
    assert!(
        rest.iter()
            .any(|m| matches!(m, Msg::Response { id: 1, body } if body == &[1])),
        "{rest:?}"
    );
    assert_eq!(rest.len(), 2, "{rest:?}");
}

const RESOURCE_EXHAUSTED: u16 = 7;

#[tokio::test]
async fn a_hundred_pings_in_a_second_are_answered_and_one_more_closes() {
    // §11: at most 100 PINGs a second from a client; more closes with GOAWAY
    // RESOURCE_EXHAUSTED. One frame's messages arrive at one instant, inside one second.
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    let pings: Vec<Vec<u8>> = (0..100).map(ping).collect();
    p.send(&frame(&pings)).await;
    for data in 0..100 {
        assert_eq!(p.expect_msg().await, Msg::Pong(data));
    }
    p.send(&frame(&[request(1, 0, "echo", &[1])])).await;
    assert_eq!(
        p.expect_msg().await,
        Msg::Response {
            id: 1,
            body: vec![1]
        }
    );

    let mut p = Peer::connect(srv.addr).await;
    let pings: Vec<Vec<u8>> = (0..101).map(ping).collect();
    p.send(&frame(&pings)).await;
    // Up to 100 PONGs may come first (more than `expect_goaway_then_close` reads past).
    let mut pongs = 0;
    loop {
        match p.expect_msg().await {
            Msg::Pong(_) => pongs += 1,
            Msg::GoAway { code, .. } => {
                assert_eq!(code, RESOURCE_EXHAUSTED);
                break;
            }
            m => panic!("unexpected {m:?}"),
        }
        assert!(pongs <= 100, "the 101st PING was answered");
    }
    p.expect_closed().await;
}

#[tokio::test]
async fn a_thousand_cancels_for_ids_not_in_flight_are_ignored_and_one_more_closes() {
    // §11: useless CANCELs, at most 1,000 a second (plus the calls answered in it).
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    let cancels: Vec<Vec<u8>> = (1..=1000).map(cancel).collect();
    p.send(&frame(&cancels)).await;
    p.assert_alive(1).await;

    let mut p = Peer::connect(srv.addr).await;
    let cancels: Vec<Vec<u8>> = (1..=1001).map(cancel).collect();
    p.send(&frame(&cancels)).await;
    let before = p.expect_goaway_then_close(RESOURCE_EXHAUSTED).await;
    assert!(before.is_empty(), "{before:?}");
}

#[tokio::test]
async fn a_oneway_read_after_goaway_draining_never_runs() {
    // §10.1: ONEWAYs read after the server's GOAWAY DRAINING are not run.
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let ran = std::sync::Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counted = ran.clone();
    let svc = tower::service_fn(move |req: Request| {
        let counted = counted.clone();
        async move {
            match req.method() {
                "count" => {
                    counted.fetch_add(1, SeqCst);
                }
                _ => tokio::time::sleep(Duration::from_secs(1)).await,
            }
            Ok::<_, BoxError>(Response::new(req.into_body()))
        }
    });
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(Server::builder().serve_with_incoming_shutdown(
        towerpc::server::TcpIncoming::from(listener),
        svc,
        async {
            let _ = stopped.await;
        },
    ));
    let mut p = Peer::connect(addr).await;
    // The control: a ONEWAY before the drain runs.
    p.send(&frame(&[
        oneway("count", &[1]),
        request(1, 0, "hold", &[1]),
    ]))
    .await;
    p.assert_alive(1).await;
    let deadline = Instant::now() + VERDICT;
    while ran.load(SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        ran.load(SeqCst),
        1,
        "the ONEWAY before the drain did not run"
    );
    stop.send(()).unwrap();
    p.expect_draining().await;
    p.send(&frame(&[oneway("count", &[2]), ping(2)])).await;
    assert_eq!(p.expect_msg().await, Msg::Pong(2));
    assert_eq!(
        p.expect_msg().await,
        Msg::Response {
            id: 1,
            body: vec![1]
        }
    );
    p.expect_closed().await;
    assert_eq!(ran.load(SeqCst), 1, "the ONEWAY after the GOAWAY ran");
}

#[tokio::test]
async fn a_protocol_error_stops_the_handlers_still_running() {
    // §6: a server that closes a connection itself stops the handlers still running and,
    // best effort, answers their requests ERROR CANCELLED before its GOAWAY.
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    struct Dropped(std::sync::Arc<AtomicUsize>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }
    let dropped = std::sync::Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counted = dropped.clone();
    let svc = tower::service_fn(move |_req: Request| {
        let guard = Dropped(counted.clone());
        async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok::<_, BoxError>(Response::default())
        }
    });
    tokio::spawn(
        Server::builder().serve_with_incoming(towerpc::server::TcpIncoming::from(listener), svc),
    );
    let mut p = Peer::connect(addr).await;
    p.send(&frame(&[
        request(1, 0, "hold", &[1]),
        request(2, 0, "hold", &[2]),
    ]))
    .await;
    p.assert_alive(1).await;
    let mut bad = frame(&[ping(2)]);
    bad[4] = 1;
    p.send(&bad).await;
    let before = p.expect_goaway_then_close(PROTOCOL_ERROR).await;
    for m in &before {
        assert!(
            matches!(
                m,
                Msg::Error {
                    id: 1 | 2,
                    code: 1,
                    ..
                }
            ),
            "not ERROR CANCELLED: {m:?}"
        );
    }
    let deadline = Instant::now() + VERDICT;
    while dropped.load(SeqCst) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(dropped.load(SeqCst), 2, "handlers still running");
}

#[tokio::test]
async fn a_server_waiting_for_a_handler_slot_pings_every_250_ms() {
    // §9: a server whose reader waits for its handlers reads no PINGs, and MUST show it is
    // alive with a PING of its own at least every 250 ms while it waits.
    let srv = start(Server::builder().max_concurrency_per_connection(1)).await;
    let mut p = Peer::connect(srv.addr).await;
    p.send(&frame(&[request(1, 0, "sleep", &[1])])).await;
    p.assert_alive(1).await;
    p.send(&frame(&[request(2, 0, "echo", &[2]), ping(3)]))
        .await;
    let mut last = Instant::now();
    for n in 0..6 {
        match p.expect_msg().await {
            Msg::Ping(data) => {
                let gap = last.elapsed();
                // 250 ms, with room for a loaded machine's timers.
                assert!(gap < Duration::from_millis(450), "PING {n} after {gap:?}");
                last = Instant::now();
                p.send(&frame(&[{
                    let mut m = vec![0x07];
                    m.extend_from_slice(&data.to_be_bytes());
                    m
                }]))
                .await;
            }
            m => panic!("expected the server's PING, got {m:?}"),
        }
    }
}

#[tokio::test]
async fn a_request_at_the_field_limits_is_answered() {
    // §5.1, §11: a 255-byte method and 16,384 bytes of metadata are within the limits; only
    // one more is a protocol error (`metadata_above_16_kib_is_a_protocol_error`).
    let srv = start_default().await;
    let mut p = Peer::connect(srv.addr).await;
    let method = "é".repeat(127) + "x";
    assert_eq!(method.len(), 255);
    let mut m = request(1, 0, &method, &[5]);
    m[10..12].copy_from_slice(&16_384u16.to_be_bytes());
    m.splice(16 + 255..16 + 255, std::iter::repeat_n(0x80, 16_384));
    assert_eq!(m.len(), 16 + 255 + 16_384 + 1);
    p.send(&frame(&[m])).await;
    assert_eq!(
        p.expect_msg().await,
        Msg::Response {
            id: 1,
            body: vec![5]
        }
    );
}
