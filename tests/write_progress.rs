//! The server's write timeout bounds progress, not the size of a batch: a client that reads
//! slowly but steadily behind a large reply keeps its connection (issue 10, item 3).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use towerpc::transport::{ConnectInfo, Connected};
use towerpc::{BoxError, Client, Request, Response, Server};

/// Reads at most `CHUNK` bytes, then waits `PAUSE`, and so on: about 400 KiB/s.
const CHUNK: usize = 4 * 1024;
const PAUSE: Duration = Duration::from_millis(10);

struct SlowReader {
    io: DuplexStream,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for SlowReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(pause) = self.pause.as_mut() {
            ready!(pause.as_mut().poll(cx));
            self.pause = None;
        }
        let room = buf.remaining().min(CHUNK);
        let mut limited = ReadBuf::new(&mut buf.initialize_unfilled()[..room]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.advance(n);
        self.pause = Some(Box::pin(tokio::time::sleep(PAUSE)));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SlowReader {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for SlowReader {
    fn connect_info(&self) -> ConnectInfo {
        ConnectInfo::default()
    }
}

/// A server with a 1 s write timeout that answers every call with 2 MiB, on one in-memory
/// connection (a 16 KiB pipe); returns the client's end and the server's handle.
fn serve_big_replies() -> (DuplexStream, towerpc::server::ServerHandle) {
    let (client_end, server_end) = tokio::io::duplex(16 * 1024);
    let server = Server::builder().write_timeout(Duration::from_secs(1));
    let handle = server.handle();
    let big = tower::service_fn(|_req: Request| async move {
        Ok::<_, BoxError>(Response::new(vec![7u8; 2 << 20].into()))
    });
    let incoming = futures_util::stream::iter([Ok::<_, std::io::Error>(server_end)])
        .chain(futures_util::stream::pending());
    tokio::spawn(server.serve_with_incoming(incoming, big));
    (client_end, handle)
}

/// A 2 MiB reply read at ~400 KiB/s takes about 5 s, five times the write timeout; every
/// write still makes progress well within it.
#[tokio::test(start_paused = true)]
async fn slow_steady_reader_keeps_its_connection() {
    let (client_end, handle) = serve_big_replies();

    let slot = Arc::new(Mutex::new(Some(client_end)));
    let connector = tower::service_fn(move |_: ()| {
        let io = slot.lock().unwrap().take();
        async move {
            let io = io.ok_or("only one connection")?;
            Ok::<_, BoxError>(SlowReader { io, pause: None })
        }
    });
    let client = Client::builder()
        .timeout(Duration::from_secs(60))
        .connect_with((), connector)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let resp = client.request(Request::new("Big", "")).await.unwrap();
    assert_eq!(resp.body().len(), 2 << 20);
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(2),
        "read too fast to test anything: {took:?}"
    );
    assert_eq!(handle.stats().write_errors, 0);
}

/// RELIABILITY.md A2: a client that stops reading altogether is cut off once a write has made
/// no progress for the write timeout, and the failure is counted.
#[tokio::test(start_paused = true)]
async fn a_reader_that_stops_is_cut_off_by_the_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::Encoder;
    use towerpc::codec::{Frame, FrameCodec, Message, PREFACE_LEN};

    let (mut client_end, handle) = serve_big_replies();

    client_end
        .write_all(b"TRPC\x01C\x00\x00\x01\x00\x00\x00")
        .await
        .unwrap();
    let mut preface = [0u8; PREFACE_LEN];
    client_end.read_exact(&mut preface).await.unwrap();
    let mut out = bytes::BytesMut::new();
    let request = Message::Request {
        id: 1,
        timeout_ms: 0,
        method: "Big".into(),
        metadata: bytes::Bytes::new(),
        body: bytes::Bytes::new(),
    };
    FrameCodec::new()
        .encode(Frame::new(vec![request]), &mut out)
        .unwrap();
    client_end.write_all(&out).await.unwrap();
    let started = tokio::time::Instant::now();
    // Never reads again: the 2 MiB reply fills the 16 KiB pipe at once.
    while handle.stats().write_errors == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(1100),
        "{took:?}"
    );
    assert_eq!(handle.stats().write_errors, 1);
    drop(client_end);
}
