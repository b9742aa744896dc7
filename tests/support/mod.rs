//! Helpers shared by the end-to-end tests: servers on `127.0.0.1:0` with a shutdown switch,
//! scripted raw-byte peers, and bounded waiting.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code, unreachable_pub)]

pub mod proxy;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::codec::{Decoder, Encoder};
use tower::util::BoxCloneService;
use towerpc::codec::{Frame, FrameCodec, Message, DEFAULT_MAX_FRAME_LEN, PREFACE_LEN};
use towerpc::server::{Limited, ServerHandle};
use towerpc::{BoxError, Request, Response, Server, Stats};

/// The service type every test server runs.
pub type Svc = BoxCloneService<Request, Response, BoxError>;

/// A raw service from an async closure.
pub fn service<F, Fut>(f: F) -> Svc
where
    F: Fn(Request) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    BoxCloneService::new(tower::service_fn(f))
}

/// A service that decodes the body as msgpack `Req`, runs `f` and encodes its `Resp`.
pub fn typed<Req, Resp, F, Fut>(f: F) -> Svc
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, BoxError>> + Send + 'static,
{
    service(move |req: Request| {
        let f = f.clone();
        async move {
            let arg: Req = rmp_serde::from_slice(req.body())?;
            let out = f(arg).await?;
            Ok(Response::new(rmp_serde::to_vec_named(&out)?.into()))
        }
    })
}

/// Echoes the request body.
pub fn echo() -> Svc {
    service(|req: Request| async move { Ok(Response::new(req.into_body())) })
}

/// Sleeps `d`, then echoes.
pub fn sleepy(d: Duration) -> Svc {
    service(move |req: Request| async move {
        tokio::time::sleep(d).await;
        Ok(Response::new(req.into_body()))
    })
}

/// Echoes a msgpack `u64` back; panics (inside the handler's future) when it is a multiple of
/// `every`.
pub fn panicky(every: u64) -> Svc {
    typed(move |n: u64| async move {
        if n.is_multiple_of(every) {
            panic!("injected panic for request {n}");
        }
        Ok(n)
    })
}

/// A server running on its own task, with a switch for graceful shutdown.
///
/// Dropping it without joining aborts the serve task.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    /// The running server's stats and health.
    pub server: ServerHandle,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<towerpc::Result<()>>>,
}

impl TestServer {
    pub fn stats(&self) -> Stats {
        self.server.stats()
    }

    /// Fires the shutdown signal; returns at once.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the serve future to return, at most `bound`; panics if it does not, or if it
    /// returned an error.
    pub async fn join(&mut self, bound: Duration) {
        let handle = self.handle.as_mut().expect("already joined");
        let res = tokio::time::timeout(bound, handle)
            .await
            .unwrap_or_else(|_| panic!("serve did not return within {bound:?}"));
        self.handle = None;
        res.expect("serve task panicked").expect("serve failed");
    }

    /// Triggers shutdown and waits (at most `bound`) for serve to return.
    pub async fn shutdown(mut self, bound: Duration) {
        self.trigger_shutdown();
        self.join(bound).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

/// Starts `server` running `svc` on `127.0.0.1:0`.
pub async fn serve(server: Server, svc: Svc) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    serve_on(listener, server, svc)
}

/// Starts `server` (with layers of its own) running `svc` on `127.0.0.1:0`.
pub async fn serve_layered<L>(server: Server<L>, svc: Svc) -> TestServer
where
    L: tower::Layer<Limited<Svc>> + Send + 'static,
    L::Service: tower::Service<Request, Response = Response> + Send + 'static,
    <L::Service as tower::Service<Request>>::Error: Into<BoxError>,
    <L::Service as tower::Service<Request>>::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    serve_on(listener, server, svc)
}

/// Starts `server` running `svc` on `listener`.
pub fn serve_on<L>(listener: TcpListener, server: Server<L>, svc: Svc) -> TestServer
where
    L: tower::Layer<Limited<Svc>> + Send + 'static,
    L::Service: tower::Service<Request, Response = Response> + Send + 'static,
    <L::Service as tower::Service<Request>>::Error: Into<BoxError>,
    <L::Service as tower::Service<Request>>::Future: Send + 'static,
{
    let addr = listener.local_addr().expect("local_addr");
    let (tx, rx) = oneshot::channel::<()>();
    let stats = server.handle();
    let handle = tokio::spawn(server.serve_with_incoming_shutdown(
        towerpc::server::TcpIncoming::from(listener),
        svc,
        async move {
            let _ = rx.await;
        },
    ));
    TestServer {
        addr,
        server: stats,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

/// A server "process": its own multi-threaded runtime, so that killing it drops the serve
/// task, every connection task, every handler and every socket at once.
pub struct ServerProcess {
    rt: Option<tokio::runtime::Runtime>,
    pub server: Server,
}

impl ServerProcess {
    /// Binds `addr` (retrying while the old socket goes away) and serves `svc`.
    pub async fn start(addr: SocketAddr, server: Server, svc: Svc) -> ServerProcess {
        let listener = rebind(addr).await.into_std().expect("listener into_std");
        // One thread: with the callers' two, that already oversubscribes the two cores; a
        // second server thread only makes every timer later.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-server")
            .enable_all()
            .build()
            .expect("server runtime");
        let serving = server.clone();
        rt.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("listener from_std");
            serving
                .serve_with_incoming_shutdown(
                    towerpc::server::TcpIncoming::from(listener),
                    svc,
                    std::future::pending::<()>(),
                )
                .await
        });
        ServerProcess {
            rt: Some(rt),
            server,
        }
    }

    /// How many times the server runtime's one worker has parked (slept waiting for work).
    pub fn parks(&self) -> u64 {
        self.rt
            .as_ref()
            .map_or(0, |rt| rt.metrics().worker_park_count(0))
    }

    /// SIGKILL, in-process: no drain, no GOAWAY; every task and socket is dropped. Returns once
    /// the server's threads have stopped, so that nothing of it runs afterwards (a handler's
    /// poll in progress at the kill finishes before, not after), as after a real SIGKILL.
    pub fn kill(mut self) -> Stats {
        if let Some(rt) = self.rt.take() {
            // From a plain thread: async code may not wait for a runtime to stop.
            std::thread::spawn(move || rt.shutdown_timeout(Duration::from_secs(5)))
                .join()
                .expect("server runtime shut down");
        }
        self.server.stats()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Dropping a runtime inside an async context panics; this never blocks.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Checks a reader's spin by its runtime's parks over `calls` calls made one at a time: with
/// the spin off (`asleep`) about one a call, with a window far longer than a loopback round
/// trip (`awake`) hardly any.
pub fn assert_spin_parks(asleep: u64, awake: u64, calls: u64) {
    assert!(
        asleep >= calls * 3 / 4,
        "spin off: {asleep} parks in {calls} calls"
    );
    assert!(
        awake <= calls / 4,
        "spin on: {awake} parks in {calls} calls"
    );
}

/// A current-thread runtime with IO and time, for a test that must own its runtime (to read
/// its metrics, or to run inside a scope of its own).
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Binds `addr` again, retrying briefly (a port just released may take a moment).
pub async fn rebind(addr: SocketAddr) -> TcpListener {
    let mut last = None;
    for _ in 0..100 {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not bind {addr} again: {last:?}");
}

/// A loopback port with nothing listening on it (bound, then released).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local_addr")
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    let max_polls = limit.as_millis() / 10 + 2;
    for _ in 0..max_polls {
        if cond() {
            return;
        }
        if start.elapsed() >= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cond(), "gave up after {limit:?} waiting for {what}");
}

/// Increments its counter when dropped: put one in a handler to observe that the handler's
/// future was dropped (finished, cancelled or aborted).
#[derive(Debug)]
pub struct DropCounter(pub Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Encodes a value as msgpack (named), the way `Client::call` does.
pub fn msgpack<T: Serialize>(v: &T) -> bytes::Bytes {
    rmp_serde::to_vec_named(v).expect("encode").into()
}

/// The preface a server sends, written out by hand: magic, version 1, role 'S', no
/// compression, flags 0, `max_frame_len` big-endian.
pub fn server_preface(max_frame_len: u32) -> [u8; PREFACE_LEN] {
    let mut b = [0u8; PREFACE_LEN];
    b[..4].copy_from_slice(b"TRPC");
    b[4] = 1;
    b[5] = b'S';
    b[6] = 0;
    b[7] = 0;
    b[8..].copy_from_slice(&max_frame_len.to_be_bytes());
    b
}

/// The preface a client sends, by hand (role 'C', no compression offered).
pub fn client_preface(max_frame_len: u32) -> [u8; PREFACE_LEN] {
    let mut b = server_preface(max_frame_len);
    b[5] = b'C';
    b
}

/// A raw TCP connection to a towerpc server at `addr`, past the preface exchange (a client
/// preface with the default frame limit, the server's read and dropped).
pub async fn raw_connect(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&client_preface(DEFAULT_MAX_FRAME_LEN as u32))
        .await
        .expect("write the preface");
    let mut preface = [0u8; PREFACE_LEN];
    s.read_exact(&mut preface)
        .await
        .expect("read the server's preface");
    s
}

/// One side of a connection after the prefaces, speaking whole frames.
#[derive(Debug)]
pub struct RawConn {
    pub stream: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
}

impl RawConn {
    pub fn new(stream: TcpStream) -> Self {
        RawConn {
            stream,
            buf: BytesMut::new(),
            codec: FrameCodec::new(),
        }
    }

    /// The next frame's messages; `None` at end of stream or on a read error (a reset).
    pub async fn read_frame(&mut self) -> Option<Vec<Message>> {
        loop {
            if let Some(frame) = self
                .codec
                .decode(&mut self.buf)
                .expect("peer sent a bad frame")
            {
                return Some(frame.into_messages());
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next frame, at most `bound` away; panics on timeout.
    pub async fn read_frame_within(&mut self, bound: Duration) -> Option<Vec<Message>> {
        tokio::time::timeout(bound, self.read_frame())
            .await
            .unwrap_or_else(|_| panic!("no frame within {bound:?}"))
    }

    /// The id of the REQUEST that the next frame (within 5 s) begins with; panics on anything
    /// else.
    pub async fn read_request_id(&mut self) -> u32 {
        let msgs = self
            .read_frame_within(Duration::from_secs(5))
            .await
            .expect("a request");
        match msgs.first() {
            Some(Message::Request { id, .. }) => *id,
            _ => panic!("expected a request, got {msgs:?}"),
        }
    }

    /// Every message until end of stream, at most `bound` in all; panics on timeout.
    pub async fn read_to_end_within(&mut self, bound: Duration) -> Vec<Message> {
        let mut all = Vec::new();
        let res = tokio::time::timeout(bound, async {
            while let Some(msgs) = self.read_frame().await {
                all.extend(msgs);
            }
        })
        .await;
        assert!(
            res.is_ok(),
            "peer did not close within {bound:?}; got {all:?}"
        );
        all
    }

    /// Writes `msgs` as one frame.
    pub async fn write_frame(&mut self, msgs: Vec<Message>) {
        let mut out = BytesMut::new();
        self.codec
            .encode(Frame::new(msgs), &mut out)
            .expect("encode frame");
        self.stream.write_all(&out).await.expect("write frame");
    }
}

/// A hand-driven server on `127.0.0.1:0`: it accepts one connection, checks the client's
/// preface, answers with a preface written byte by byte, stops listening, and hands the
/// connection to `script`. Returns the address and the script's task.
pub async fn raw_server<F, Fut>(script: F) -> (SocketAddr, JoinHandle<Fut::Output>)
where
    F: FnOnce(RawConn) -> Fut + Send + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        drop(listener);
        let mut preface = [0u8; PREFACE_LEN];
        stream
            .read_exact(&mut preface)
            .await
            .expect("read client preface");
        assert_eq!(&preface[..4], b"TRPC", "client preface magic");
        assert_eq!(preface[4], 1, "client preface version");
        assert_eq!(preface[5], b'C', "client preface role");
        stream
            .write_all(&server_preface(DEFAULT_MAX_FRAME_LEN as u32))
            .await
            .expect("write server preface");
        script(RawConn::new(stream)).await
    });
    (addr, task)
}

/// A hand-driven client: dials `addr`, sends a client preface, checks the server's.
pub async fn raw_client(addr: SocketAddr) -> RawConn {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&client_preface(DEFAULT_MAX_FRAME_LEN as u32))
        .await
        .expect("write client preface");
    let mut preface = [0u8; PREFACE_LEN];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut preface))
        .await
        .expect("server preface in time")
        .expect("read server preface");
    assert_eq!(&preface[..6], b"TRPC\x01S", "server preface");
    RawConn::new(stream)
}

/// A [`towerpc::dispatch::Dispatcher`] as the service type test servers run.
pub fn dispatcher(d: towerpc::dispatch::Dispatcher) -> Svc {
    BoxCloneService::new(d)
}

/// Runs `fut`, failing the test if it takes longer than `bound`.
pub async fn within<F: Future>(bound: Duration, fut: F) -> F::Output {
    tokio::time::timeout(bound, fut)
        .await
        .unwrap_or_else(|_| panic!("did not finish within {bound:?}"))
}

/// A connector for `Builder::connect_with((), ..)` that hands out `io` on the first dial and
/// never finishes another: one in-memory connection (on paused time, if the test likes).
pub fn one_connection(
    io: tokio::io::DuplexStream,
) -> tower::util::BoxCloneService<(), tokio::io::DuplexStream, std::io::Error> {
    let slot = Arc::new(std::sync::Mutex::new(Some(io)));
    tower::util::BoxCloneService::new(tower::service_fn(move |_: ()| {
        let io = slot.lock().unwrap().take();
        async move {
            match io {
                Some(io) => Ok(io),
                None => std::future::pending().await,
            }
        }
    }))
}

/// The server's side of a handshake on `io`, by hand: reads the client's preface and answers
/// with a server preface announcing 16 MiB and no compression.
pub async fn answer_preface<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(io: &mut S) {
    let mut preface = [0u8; PREFACE_LEN];
    io.read_exact(&mut preface).await.unwrap();
    io.write_all(&server_preface(16 << 20)).await.unwrap();
}
