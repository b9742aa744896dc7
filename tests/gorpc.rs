//! gorpc's own test suite (`rpc_test.go` at 908281b), ported test by test: what a gorpc user
//! relies on, asked of towerpc over real sockets on 127.0.0.1. Each test names its original.
//! Where towerpc answers differently by design, the test checks towerpc's answer and says why:
//! a client with no server fails fast (`is_unavailable`) rather than waiting out its timeout;
//! starting or stopping twice, which gorpc makes a panic, is a compile error or harmless here.
//!
//! Not repeated here: `TestTCPTransport`, `TestUnixTransport` and `TestTLSTransport` run the
//! larger call suite of tests/transport.rs over each transport, and most of
//! `dispatcher_test.go`'s calls (functions and services by name, argument and result shapes,
//! unknown names, one-way messages and batches through the dispatcher) are in
//! tests/dispatch.rs; the few it does not hold are at the end of this file. Its tests of
//! functions Go can only refuse at run time (a channel argument, too many results) are type
//! errors in Rust.

mod support;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use towerpc::client::Overflow;
use towerpc::server::TcpIncoming;
use towerpc::transport::{ConnectInfo, Connected};
use towerpc::{Client, Request, Response, Server};

use support::{eventually, within, Svc, TestServer};

const BOUND: Duration = Duration::from_secs(10);

/// gorpc's `echoHandler` (every test here calls the method `Echo`; gorpc has no names).
async fn echo_server(server: Server) -> TestServer {
    support::serve(server, support::echo()).await
}

fn client() -> towerpc::client::Builder {
    Client::builder().timeout(BOUND)
}

/// gorpc's `testIntClient`: ten calls, each answered with its own number.
async fn int_client(client: &Client) {
    for i in 0..10i64 {
        let got: i64 = client.invoke("Echo", &i).await.expect("call");
        assert_eq!(got, i);
    }
}

/// A call with a timeout of its own (gorpc's `CallTimeout`).
async fn call_timeout<T>(client: &Client, v: T, timeout: Duration) -> towerpc::Result<T>
where
    T: Serialize + serde::de::DeserializeOwned,
{
    client
        .method::<T, T>("Echo")
        .timeout(timeout)
        .oneshot(v)
        .await
}

/// Bytes from a xorshift generator: gorpc's `randomData`, repeatable.
fn random_data(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client() {
    let server = echo_server(Server::builder()).await;
    for i in 0..10u64 {
        // gorpc's first byte says whether the stream is compressed; towerpc's is the preface.
        for first in [0u8, 1] {
            let mut conn = TcpStream::connect(server.addr).await.unwrap();
            let mut data = random_data(65536, 2 * i + u64::from(first) + 1);
            data[0] = first;
            // The server may close as soon as it has seen the bad preface.
            let _ = conn.write_all(&data).await;
        }
    }
    // The server goes on serving.
    let client = client().connect(server.addr).await.unwrap();
    int_client(&client).await;
    eventually("the bad connections refused", BOUND, || {
        server.stats().accept_errors == 20
    })
    .await;
}

/// A server that answers whatever it reads with 64 KiB of noise and hangs up.
async fn noisy_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut seed = 7;
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            seed += 1;
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::io::AsyncReadExt::read(&mut conn, &mut buf),
                )
                .await;
                let _ = conn.write_all(&random_data(65536, seed)).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_server() {
    let (addr, noise) = noisy_server().await;
    let mut builders = vec![client()];
    #[cfg(feature = "compression-zstd")]
    builders.push(client().compression(towerpc::codec::Compression::Zstd));
    for builder in builders {
        let client = builder.connect_lazy(addr);
        for _ in 0..10 {
            let res: towerpc::Result<String> =
                within(BOUND, client.invoke("Echo", "foobarbaz")).await;
            let err = res.expect_err("noise is no reply");
            assert!(
                err.is_unavailable() || err.is_handshake() || err.is_protocol(),
                "{err:#}"
            );
        }
        within(BOUND, client.close()).await;
    }
    noise.abort();
}

/// `TestClientDoubleStart` and `TestStopStoppedClient`: a client starts when it is built, so it
/// cannot start twice; closing twice is harmless, and calls after it fail as closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_stopped_client() {
    let server = echo_server(Server::builder()).await;
    let client = client().connect(server.addr).await.unwrap();
    int_client(&client).await;
    within(BOUND, client.close()).await;
    within(BOUND, client.close()).await;
    let err = client.invoke::<_, i64>("Echo", &1i64).await.unwrap_err();
    assert!(err.is_closed(), "{err:#}");
    // A clone shares the closed connection.
    let err = client
        .clone()
        .invoke::<_, i64>("Echo", &1i64)
        .await
        .unwrap_err();
    assert!(err.is_closed(), "{err:#}");
}

/// `TestServerDoubleStart`: serving a second time on a taken address fails with an error (not a
/// panic), and the first server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_double_start() {
    let server = echo_server(Server::builder()).await;
    let err = within(BOUND, Server::builder().serve(server.addr, support::echo()))
        .await
        .expect_err("the address is taken");
    assert!(
        format!("{err:#}")
            .to_lowercase()
            .contains("address already in use"),
        "{err:#}"
    );
    let client = client().connect(server.addr).await.unwrap();
    int_client(&client).await;
}

/// `TestServerServe` and `TestStopStoppedServer`: serve returns `Ok` once told to stop; a
/// second stop signal finds nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_serve() {
    let mut server = echo_server(Server::builder()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.trigger_shutdown();
    server.trigger_shutdown();
    server.join(BOUND).await;
}

/// `TestServerStartStop`: five servers in turn on one address, each serving a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_start_stop() {
    let addr = support::free_addr();
    for _ in 0..5 {
        let server = support::serve_on(
            support::rebind(addr).await,
            Server::builder(),
            support::echo(),
        );
        let client = client().connect(addr).await.unwrap();
        int_client(&client).await;
        client.close().await;
        server.shutdown(BOUND).await;
    }
}

/// `TestClientStartStop`: a client of three connections, made and closed five times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_start_stop() {
    let server = echo_server(Server::builder()).await;
    for round in 1..=5u64 {
        let client = client().connections(3).connect(server.addr).await.unwrap();
        int_client(&client).await;
        within(BOUND, client.close()).await;
        assert_eq!(server.stats().accepts, 3 * round);
    }
}

fn sleep_10s() -> Svc {
    support::sleepy(Duration::from_secs(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout() {
    let server = support::serve(Server::builder(), sleep_10s()).await;
    let client = Client::builder()
        .timeout(Duration::from_millis(1))
        .connect(server.addr)
        .await
        .unwrap();
    for _ in 0..10 {
        let err = within(BOUND, client.invoke::<_, i64>("Echo", &123i64))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_timeout_test() {
    let server = support::serve(Server::builder(), sleep_10s()).await;
    let client = client().connect(server.addr).await.unwrap();
    for _ in 0..10 {
        let err = within(
            BOUND,
            call_timeout(&client, 123i64, Duration::from_millis(1)),
        )
        .await
        .unwrap_err();
        assert!(err.is_timeout(), "{err:#}");
    }
}

/// `TestNoServer`: gorpc's call waits out its timeout; towerpc's fails fast while no connection
/// is up (`is_unavailable`, safe to retry), as gRPC's does; with `wait_for_ready` it waits for
/// its deadline and times out, as gorpc's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server() {
    let addr = support::free_addr();
    let client = Client::builder()
        .timeout(Duration::from_millis(100))
        .connect_lazy(addr);
    let err = within(BOUND, client.invoke::<_, String>("Echo", "foobar"))
        .await
        .unwrap_err();
    assert!(err.is_unavailable() && err.is_retry_safe(), "{err:#}");

    let client = Client::builder()
        .timeout(Duration::from_millis(100))
        .wait_for_ready(true)
        .connect_lazy(addr);
    let err = within(BOUND, client.invoke::<_, String>("Echo", "foobar"))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_panic() {
    let handler = support::typed(|s: String| async move {
        if s == "foobar" {
            panic!("server panic");
        }
        Ok(s)
    });
    let server = support::serve(Server::builder(), handler).await;
    let client = client().connect(server.addr).await.unwrap();
    for _ in 0..3 {
        let err = client
            .invoke::<_, String>("Echo", "foobar")
            .await
            .unwrap_err();
        assert!(err.is_remote(), "{err:#}");
    }
    for _ in 0..3 {
        let got: String = client.invoke("Echo", "aaaaa").await.unwrap();
        assert_eq!(got, "aaaaa");
    }
    assert_eq!(server.stats().panics, 3);
}

/// `TestServerStuck`: a server whose handlers take ten seconds, a client that allows 100 pending
/// calls and has a stall bound of 200 ms. Of 1,500 calls made in rounds of 100, none is
/// answered: each fails as overflowing (the oldest make way for new ones, gorpc's rule) or as
/// stalled, and some as stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stuck() {
    let handler = support::service(|_req: Request| async move {
        // gorpc's handler sleeps a second; ten here, so that no reply can come while a
        // loaded machine is still making the 1,500 calls.
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok(Response::new(support::msgpack(&"aaa")))
    });
    let server = support::serve(Server::builder(), handler).await;
    let client = client()
        .max_pending(100)
        .overflow(Overflow::FailOldest)
        .stall_timeout(Duration::from_millis(200))
        .connect(server.addr)
        .await
        .unwrap();
    let mut calls = JoinSet::new();
    for _ in 0..15 {
        for _ in 0..100 {
            let client = client.clone();
            calls.spawn(async move { client.invoke::<_, String>("Echo", "abc").await });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut stalled, mut overflowed) = (0, 0);
    while let Some(res) = within(BOUND, calls.join_next()).await {
        let err = res.unwrap().expect_err("a stuck server answered");
        if err.is_stalled() {
            stalled += 1;
        } else if err.is_overloaded() {
            overflowed += 1;
        } else {
            panic!("unexpected error: {err:#}");
        }
    }
    assert_eq!(stalled + overflowed, 1500);
    assert!(stalled > 0, "the stall detector never fired");
}

/// A stream wrapper for the custom transports below: it says who the peer is, and XORs every
/// byte both ways with `key` (gorpc's `sillyEncrypt`; 0 leaves them as they are).
struct Wrapped<S> {
    io: S,
    key: u8,
    peer: ConnectInfo,
}

impl<S: AsyncRead + Unpin> AsyncRead for Wrapped<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        for b in &mut buf.filled_mut()[before..] {
            *b ^= this.key;
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wrapped<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let scrambled: Vec<u8> = buf.iter().map(|b| b ^ this.key).collect();
        Pin::new(&mut this.io).poll_write(cx, &scrambled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S> Connected for Wrapped<S> {
    fn connect_info(&self) -> ConnectInfo {
        self.peer.clone()
    }
}

/// `TestCustomTransport`: one in-memory pipe, served from a custom listener that names the
/// client ("foobar" in gorpc, an address here, since handlers learn a `SocketAddr`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_transport() {
    let foobar: SocketAddr = "192.0.2.1:4242".parse().unwrap();
    let (client_end, server_end) = tokio::io::duplex(64 << 10);
    // The listener hands out its one connection, then waits (an incoming stream that ends
    // ends the server).
    let incoming = tokio_stream::StreamExt::chain(
        tokio_stream::iter([Ok::<_, io::Error>(Wrapped {
            io: server_end,
            key: 0,
            peer: ConnectInfo::new(Some(foobar), None),
        })]),
        tokio_stream::pending(),
    );
    let handler = support::service(move |req: Request| async move {
        let peer = req.connect_info().and_then(ConnectInfo::remote_addr);
        assert_eq!(
            peer,
            Some(foobar),
            "the handler sees the listener's name for the client"
        );
        Ok(Response::new(req.into_body()))
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(Server::builder().serve_with_incoming_shutdown(
        incoming,
        handler,
        async move {
            let _ = stopped.await;
        },
    ));
    let client = client()
        .connect_with((), support::one_connection(client_end))
        .await
        .unwrap();
    int_client(&client).await;
    drop(client);
    let _ = stop.send(());
    within(BOUND, serving).await.unwrap().unwrap();
}

/// `TestOnConnect`: both ends scramble the stream the same way (gorpc's `OnConnect` returns a
/// wrapped connection; here the client's connector and the server's incoming stream wrap it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_connect() {
    use tokio_stream::StreamExt;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.map(|io| Wrapped {
            peer: io.connect_info(),
            io,
            key: 42,
        })
    });
    let serving = tokio::spawn(Server::builder().serve_with_incoming(incoming, support::echo()));
    let connector = tower::service_fn(|addr: SocketAddr| async move {
        let io = TcpStream::connect(addr).await?;
        Ok::<_, io::Error>(Wrapped {
            peer: io.connect_info(),
            io,
            key: 42,
        })
    });
    let client = client().connect_with(addr, connector).await.unwrap();
    int_client(&client).await;

    // A client that does not scramble is refused at the preface.
    let plain = Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .connect(addr)
        .await;
    let err = plain.expect_err("an unscrambled client");
    assert!(err.is_handshake() || err.is_unavailable(), "{err:#}");
    serving.abort();
}

/// A handler that sleeps its request's number of milliseconds, times `scale`.
fn sleeps(scale: u32) -> Svc {
    support::typed(move |ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms) * scale).await;
        Ok(ms)
    })
}

/// `TestConcurrency`: two handlers at a time. Two one-way messages take both for a while (gorpc:
/// 100 ms; here 400, for a loaded machine's sake); a call that allows less than that times out,
/// queued; one that allows more is served once they are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency() {
    let server = support::serve(Server::builder().max_concurrency(2), sleeps(4)).await;
    let client = client().connect(server.addr).await.unwrap();
    client.send("Echo", &100u64).unwrap();
    client.send("Echo", &100u64).unwrap();
    let err = call_timeout(&client, 5u64, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:#}");
    let got = call_timeout(&client, 34u64, BOUND).await.unwrap();
    assert_eq!(got, 34);
}

/// `TestNoRequestBufferring`, `TestNoResponseBufferring` and `TestNoBufferring`: ten callers,
/// with the client's writer delaying its batches or not (a towerpc server never delays them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_buffering() {
    let server = echo_server(Server::builder()).await;
    for delay in [None, Some(Duration::from_millis(1))] {
        let client = client()
            .flush_delay(delay)
            .connect(server.addr)
            .await
            .unwrap();
        let mut callers = JoinSet::new();
        for _ in 0..10 {
            let client = client.clone();
            callers.spawn(async move { int_client(&client).await });
        }
        while let Some(done) = within(BOUND, callers.join_next()).await {
            done.unwrap();
        }
    }
}

/// gorpc's `testSend`: 100 one-way messages of `value`, each seen by the handler as sent.
async fn send<T>(value: T)
where
    T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + Clone + Send + Sync,
    T: 'static,
{
    let seen = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (seen, value) = (seen.clone(), value.clone());
        support::typed(move |got: T| {
            let (seen, value) = (seen.clone(), value.clone());
            async move {
                assert_eq!(got, value);
                seen.fetch_add(1, SeqCst);
                Ok("foobar_ignored")
            }
        })
    };
    let server = support::serve(Server::builder(), handler).await;
    let client = client().connect(server.addr).await.unwrap();
    for _ in 0..100 {
        client.send("Echo", &value).unwrap();
    }
    eventually("100 one-way messages handled", BOUND, || {
        seen.load(SeqCst) == 100
    })
    .await;
    assert_eq!(client.stats().calls, 0, "one-way messages are not calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_nil() {
    send(()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_int() {
    send(12345i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_string() {
    send("foobar".to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_call_send() {
    let server = echo_server(Server::builder()).await;
    let client = client().connect(server.addr).await.unwrap();
    for _ in 0..2 {
        for _ in 0..1000 {
            client.send("Echo", "123211").unwrap();
        }
        int_client(&client).await;
    }
    eventually("2,000 one-way messages handled", BOUND, || {
        server.stats().one_way == 2000
    })
    .await;
}

/// `TestCallAsync`: ten calls started before any is awaited (a spawned call runs on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_async() {
    let server = echo_server(Server::builder()).await;
    let client = client().connect(server.addr).await.unwrap();
    let calls: Vec<_> = (0..10i64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.invoke::<_, i64>("Echo", &i).await })
        })
        .collect();
    for (i, call) in (0..10i64).zip(calls) {
        assert_eq!(within(BOUND, call).await.unwrap().unwrap(), i);
    }
}

/// `TestClientPendingRequestsCount`: `Client::pending` counts the calls awaiting replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pending_requests_count() {
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<()>();
    let gate = CancellationToken::new();
    let handler = {
        let gate = gate.clone();
        support::service(move |req: Request| {
            let (arrived, gate) = (arrived.clone(), gate.clone());
            async move {
                let _ = arrived.send(());
                gate.cancelled().await;
                Ok(Response::new(req.into_body()))
            }
        })
    };
    let server = support::serve(Server::builder(), handler).await;
    let client = client().connect(server.addr).await.unwrap();
    assert_eq!(client.pending(), 0);
    let mut calls = Vec::new();
    for i in 0..10 {
        let c = client.clone();
        calls.push(tokio::spawn(
            async move { c.invoke::<_, ()>("Echo", &()).await },
        ));
        within(Duration::from_secs(1), arrivals.recv())
            .await
            .expect("the server is stuck");
        assert_eq!(client.pending(), i + 1);
    }
    gate.cancel();
    for call in calls {
        within(Duration::from_secs(1), call).await.unwrap().unwrap();
    }
    assert_eq!(client.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nil_handler() {
    let server = support::serve(
        Server::builder(),
        support::typed(|(): ()| async move { Ok(()) }),
    )
    .await;
    let client = client().connect(server.addr).await.unwrap();
    for _ in 0..10 {
        let () = client.invoke("Echo", &()).await.unwrap();
    }
}

/// `TestAsyncResultCancel`: one handler at a time, a slow call, then ten calls cancelled as
/// soon as they are made; the slow one is answered and every cancelled one ends cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_result_cancel() {
    let server = support::serve(
        Server::builder().max_concurrency(1),
        support::sleepy(Duration::from_millis(100)),
    )
    .await;
    let client = client().connect(server.addr).await.unwrap();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.invoke::<_, i64>("Echo", &123i64).await })
    };
    let mut cancelled = Vec::new();
    for _ in 0..10 {
        let token = CancellationToken::new();
        let req = Request::new("Echo", support::msgpack(&456i64)).with_cancel(token.clone());
        let client = client.clone();
        let call = tokio::spawn(async move { client.request(req).await });
        token.cancel();
        cancelled.push(call);
    }
    assert_eq!(within(BOUND, slow).await.unwrap().unwrap(), 123);
    for call in cancelled {
        let err = within(BOUND, call).await.unwrap().unwrap_err();
        assert!(err.is_cancelled(), "{err:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int_handler() {
    let handler = support::typed(|n: i64| async move { Ok(n + 234) });
    let server = support::serve(Server::builder(), handler).await;
    let client = client().connect(server.addr).await.unwrap();
    for i in 0..10i64 {
        let got: i64 = client.invoke("Echo", &i).await.unwrap();
        assert_eq!(got, i + 234);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_handler() {
    let handler = support::typed(|s: String| async move { Ok(s + " world") });
    let server = support::serve(Server::builder(), handler).await;
    let client = client().connect(server.addr).await.unwrap();
    for i in 0..10 {
        let got: String = client.invoke("Echo", &format!("hello {i},")).await.unwrap();
        assert_eq!(got, format!("hello {i}, world"));
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct S {
    a: i64,
    b: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn struct_handler() {
    let handler = support::typed(|s: S| async move { Ok(s) });
    let server = support::serve(Server::builder(), handler).await;
    let client = client().connect(server.addr).await.unwrap();
    for i in 0..10 {
        let sent = S {
            a: i,
            b: format!("aaa {i}"),
        };
        let got: S = client.invoke("Echo", &sent).await.unwrap();
        assert_eq!(got, sent);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SS {
    a: i64,
    b: String,
    t: chrono::DateTime<chrono::Utc>,
}

/// `TestEchoHandler`: one echo for values of every kind (gorpc registers the types with gob;
/// msgpack needs nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_handler() {
    let server = echo_server(Server::builder()).await;
    let client = client().connect(server.addr).await.unwrap();
    let n: i64 = client.invoke("Echo", &1234i64).await.unwrap();
    assert_eq!(n, 1234);
    let s: String = client.invoke("Echo", "abc").await.unwrap();
    assert_eq!(s, "abc");
    let now = chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now());
    let t: chrono::DateTime<chrono::Utc> = client.invoke("Echo", &now).await.unwrap();
    assert_eq!(t, now);
    let sent = SS {
        a: 432,
        b: "ssd".into(),
        t: now,
    };
    let got: SS = client.invoke("Echo", &sent).await.unwrap();
    assert_eq!(got, sent);
}

/// `TestConcurrentCall`: 100 callers of 100 calls each over two connections, the writer
/// delaying batches by 1 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_call() {
    let server = echo_server(Server::builder()).await;
    let client = client()
        .connections(2)
        .flush_delay(Duration::from_millis(1))
        .connect(server.addr)
        .await
        .unwrap();
    let mut callers = JoinSet::new();
    for _ in 0..100 {
        let client = client.clone();
        callers.spawn(async move {
            for j in 0..100i64 {
                let got: i64 = client.invoke("Echo", &j).await.unwrap();
                assert_eq!(got, j);
            }
        });
    }
    while let Some(done) = within(BOUND, callers.join_next()).await {
        done.unwrap();
    }
    assert_eq!(client.stats().calls, 10_000);
}

/// `TestCompress`: a compressed and an uncompressed client of one server, side by side.
#[cfg(feature = "compression-zstd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compress() {
    use towerpc::codec::Compression;

    let server = echo_server(Server::builder().accept_compression(Compression::Zstd)).await;
    let plain = client()
        .connections(2)
        .flush_delay(Duration::from_millis(1))
        .connect(server.addr)
        .await
        .unwrap();
    let zstd = client()
        .flush_delay(Duration::from_millis(1))
        .compression(Compression::Zstd)
        .connect(server.addr)
        .await
        .unwrap();
    let mut callers = JoinSet::new();
    for i in 0..100i64 {
        let (plain, zstd) = (plain.clone(), zstd.clone());
        callers.spawn(async move {
            for j in 0..50i64 {
                let s = format!("foo bar baz {j} aaabbb");
                let got: String = plain.invoke("Echo", &s).await.unwrap();
                assert_eq!(got, s);
                let got: i64 = zstd.invoke("Echo", &(i + j)).await.unwrap();
                assert_eq!(got, i + j);
            }
        });
    }
    while let Some(done) = within(BOUND, callers.join_next()).await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_call() {
    let server = echo_server(Server::builder()).await;
    let client = client().connect(server.addr).await.unwrap();
    let mut batch = client.batch();
    let slots: Vec<_> = (0..100i64)
        .map(|i| batch.call::<_, i64>("Echo", &i).unwrap())
        .collect();
    let mut replies = within(BOUND, batch.run()).await.unwrap();
    for (i, slot) in (0..100i64).zip(slots) {
        assert_eq!(replies.take(slot).unwrap(), i);
    }
}

/// `TestBatchCallTimeout`: a batch whose timeout passes before the server answers; every call
/// in it ends timed out (towerpc's `run` reports per call, so it returns the replies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_call_timeout() {
    let handler = support::service(|_req: Request| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Response::new(support::msgpack(&123i64)))
    });
    let server = support::serve(Server::builder(), handler).await;
    let client = client().connect(server.addr).await.unwrap();
    let mut batch = client.batch();
    batch.timeout(Duration::from_millis(10));
    let slots: Vec<_> = (0..100i64)
        .map(|i| batch.call::<_, i64>("Echo", &i).unwrap())
        .collect();
    let mut replies = within(BOUND, batch.run()).await.unwrap();
    for slot in slots {
        let err = replies.take(slot).unwrap_err();
        assert!(err.is_timeout(), "{err:#}");
    }
}

/// A server that counts what it handles and echoes it.
async fn counting_server() -> (TestServer, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let handler = {
        let seen = seen.clone();
        support::service(move |req: Request| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, SeqCst);
                Ok(Response::new(req.into_body()))
            }
        })
    };
    (support::serve(Server::builder(), handler).await, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_call_skip_response() {
    let (server, seen) = counting_server().await;
    let client = client().connect(server.addr).await.unwrap();
    let mut batch = client.batch();
    for i in 0..100i64 {
        batch.send("Echo", &i).unwrap();
    }
    within(BOUND, batch.run()).await.unwrap();
    eventually("100 one-way messages handled", BOUND, || {
        seen.load(SeqCst) == 100
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_call_mixed() {
    let (server, seen) = counting_server().await;
    let client = client().connect(server.addr).await.unwrap();
    let mut batch = client.batch();
    let mut slots = Vec::new();
    for i in 0..100i64 {
        slots.push(batch.call::<_, i64>("Echo", &i).unwrap());
        batch.send("Echo", &(i + 100)).unwrap();
    }
    let mut replies = within(BOUND, batch.run()).await.unwrap();
    for (i, slot) in (0..100i64).zip(slots) {
        assert_eq!(replies.take(slot).unwrap(), i);
    }
    eventually("200 requests handled", BOUND, || seen.load(SeqCst) == 200).await;
}

/// `TestGetRealListenerAddr`: a listener bound to a given address reports it; one bound to
/// port 0 reports the port the system chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_real_listener_addr() {
    let addr = support::free_addr();
    let incoming = TcpIncoming::bind(addr).await.unwrap();
    assert_eq!(incoming.local_addr().unwrap(), addr);

    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let real = incoming.local_addr().unwrap();
    assert_eq!(real.ip().to_string(), "127.0.0.1");
    assert_ne!(real.port(), 0);
}

// ===== dispatcher_test.go =====

async fn dispatch(d: towerpc::dispatch::Dispatcher) -> (TestServer, Client) {
    let server = support::serve(Server::builder(), support::dispatcher(d)).await;
    let client = client().connect(server.addr).await.unwrap();
    (server, client)
}

/// `TestDispatcherRecursiveStructArg`: a struct that holds another of its type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_recursive_struct_arg() {
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Node {
        name: String,
        next: Option<Box<Node>>,
    }
    let d = towerpc::dispatch::Dispatcher::new().route("Depth", |mut n: Node| async move {
        let mut depth = 1u32;
        while let Some(next) = n.next {
            n = *next;
            depth += 1;
        }
        (depth, n.name)
    });
    let (_server, client) = dispatch(d).await;
    let list = (0..10).fold(None, |next, i| {
        Some(Box::new(Node {
            name: format!("n{i}"),
            next,
        }))
    });
    let (depth, last): (u32, String) = client.invoke("Depth", &*list.unwrap()).await.unwrap();
    assert_eq!((depth, last.as_str()), (10, "n0"));
}

/// `TestDispatcherMapArgCall`, `TestDispatcherArrayArgCall`, `TestDispatcherSliceArgCall`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_map_array_slice_args() {
    use std::collections::HashMap;

    let d = towerpc::dispatch::Dispatcher::new()
        .route("Map", |m: HashMap<String, i64>| async move {
            m.into_iter()
                .map(|(k, v)| (v, k))
                .collect::<HashMap<i64, String>>()
        })
        .route("Array", |a: [u8; 5]| async move {
            a.iter().map(|&b| u32::from(b)).sum::<u32>()
        })
        .route("Slice", |v: Vec<String>| async move { v.concat() });
    let (_server, client) = dispatch(d).await;
    let m: HashMap<String, i64> = [("a".into(), 1), ("b".into(), 2)].into();
    let back: HashMap<i64, String> = client.invoke("Map", &m).await.unwrap();
    assert_eq!(back, [(1, "a".into()), (2, "b".into())].into());
    let sum: u32 = client.invoke("Array", &[1u8, 2, 3, 4, 5]).await.unwrap();
    assert_eq!(sum, 15);
    let s: String = client.invoke("Slice", &["foo", "bar"]).await.unwrap();
    assert_eq!(s, "foobar");
}

/// `TestDispatcherSendWrongFunc`: a one-way message to a name nobody serves is sent without
/// error (no reply says otherwise), and the connection carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_send_wrong_func() {
    let d = towerpc::dispatch::Dispatcher::new().route("Echo", |n: i64| async move { n });
    let (server, client) = dispatch(d).await;
    for _ in 0..10 {
        client.send("Nobody", &1i64).unwrap();
    }
    int_client(&client).await;
    assert_eq!(client.stats().dials, 1);
    assert_eq!(server.stats().protocol_errors, 0);
}
