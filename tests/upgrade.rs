//! The towerpc protocol on an axum port through an HTTP/1.1 upgrade: calls, the peer's address,
//! refusals of requests that are not upgrades, and a drain.
#![cfg(feature = "http-upgrade")]

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use towerpc::server::health::ServingStatus;
use towerpc::server::Upgrade;
use towerpc::transport::upgrade::{UpgradeError, DEFAULT_PATH};
use towerpc::transport::{ConnectInfo, UpgradeConnector};
use towerpc::{BoxError, Client, Request, Response, Server};

/// Echoes the body; `peer` answers the caller's address as the server saw it; `slow` takes
/// 200 ms.
fn service() -> tower::util::BoxCloneService<Request, Response, BoxError> {
    tower::util::BoxCloneService::new(tower::service_fn(|req: Request| async move {
        match req.method() {
            "peer" => {
                let peer = req
                    .extensions()
                    .get::<ConnectInfo>()
                    .and_then(|c| c.remote_addr())
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                Ok(Response::new(towerpc::payload::to_msgpack(&peer)?))
            }
            "slow" => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(Response::new(req.into_body()))
            }
            _ => Ok(Response::new(req.into_body())),
        }
    }))
}

struct App {
    addr: SocketAddr,
    rpc: Upgrade,
    stop: Option<oneshot::Sender<()>>,
    http: tokio::task::JoinHandle<()>,
}

async fn app() -> App {
    let rpc = Server::builder()
        .grace_period(Duration::from_secs(5))
        .into_upgrade(service());
    // axum knows the peer's address; the route hands it on as towerpc's ConnectInfo.
    let route = tower::ServiceBuilder::new()
        .map_request(|mut req: http::Request<axum::body::Body>| {
            let peer = req
                .extensions()
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0);
            req.extensions_mut().insert(ConnectInfo::new(peer, None));
            req
        })
        .service(rpc.clone());
    let router = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route_service(DEFAULT_PATH, route);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    App {
        addr,
        rpc,
        stop: Some(stop),
        http,
    }
}

impl App {
    /// Stops the HTTP server and drains towerpc's connections.
    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.rpc.shutdown().await;
        self.http.await.unwrap();
    }
}

fn url(addr: SocketAddr, path: &str) -> http::Uri {
    format!("http://{addr}{path}").parse().unwrap()
}

async fn client(addr: SocketAddr) -> Client {
    Client::builder()
        .connect_with(url(addr, DEFAULT_PATH), UpgradeConnector::new())
        .await
        .unwrap()
}

/// Sends raw HTTP and returns the response head.
async fn raw_http(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).to_string()
}

#[tokio::test]
async fn calls_run_over_the_upgraded_connection_beside_http_routes() {
    let app = app().await;
    let client = client(app.addr).await;
    for i in 0..100u32 {
        let got: u32 = client.invoke("echo", &i).await.unwrap();
        assert_eq!(got, i);
    }
    // Pipelined: many calls at once on the one upgraded connection.
    let calls = (0..500u32).map(|i| {
        let c = client.clone();
        async move { c.invoke::<u32, u32>("echo", &i).await.unwrap() == i }
    });
    assert!(futures_util::future::join_all(calls)
        .await
        .into_iter()
        .all(|ok| ok));
    // The handler sees the caller's own address.
    let peer: String = client.invoke("peer", &()).await.unwrap();
    let local = {
        let stats = client.stats();
        assert!(stats.bytes_written > 0);
        peer.parse::<SocketAddr>().unwrap()
    };
    assert_eq!(local.ip(), app.addr.ip());
    assert_ne!(local.port(), app.addr.port());
    // The HTTP route still answers on the same port.
    let head = raw_http(app.addr, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let stats = app.rpc.handle().stats();
    assert_eq!(stats.accepts, 1);
    assert!(stats.calls >= 601, "{stats:?}");
    app.stop().await;
}

#[tokio::test]
async fn requests_that_are_not_towerpc_upgrades_are_refused() {
    let app = app().await;
    // A plain GET of the route: 426, naming the protocol to upgrade to.
    let head = raw_http(app.addr, "GET /towerpc HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: towerpc"),
        "{head}"
    );
    // Another protocol's upgrade: 426 too.
    let head = raw_http(
        app.addr,
        "GET /towerpc HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    // The right upgrade by the wrong method: 405.
    let head = raw_http(
        app.addr,
        "POST /towerpc HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: towerpc\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    // A client dialing the wrong path learns the status, typed.
    let err = Client::builder()
        .connect_with(url(app.addr, "/nope"), UpgradeConnector::new())
        .await
        .unwrap_err();
    let status = std::error::Error::source(&err)
        .and_then(|e| e.downcast_ref::<UpgradeError>())
        .and_then(|e| e.status());
    assert_eq!(status, Some(http::StatusCode::NOT_FOUND), "{err:#}");
    assert_eq!(app.rpc.handle().stats().accepts, 0);
    app.stop().await;
}

#[tokio::test]
async fn shutdown_drains_upgraded_connections() {
    let app = app().await;
    let client = client(app.addr).await;
    let health = app.rpc.handle().health();
    assert_eq!(health.status(""), Some(ServingStatus::Serving));
    // A call in flight when the drain starts finishes.
    let slow = {
        let c = client.clone();
        tokio::spawn(async move { c.invoke::<u32, u32>("slow", &7).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rpc = app.rpc.clone();
    let drained = tokio::spawn(async move { rpc.shutdown().await });
    // New calls are refused, safe to retry, once the drain reaches the connection; health
    // said NOT_SERVING before that.
    let waiting = tokio::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        match client.invoke::<u32, u32>("echo", &1).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(tokio::time::Instant::now() < waiting, "no refusal");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    assert!(refused.is_retry_safe(), "{refused:#}");
    assert_eq!(health.status(""), Some(ServingStatus::NotServing));
    assert_eq!(slow.await.unwrap().unwrap(), 7);
    drained.await.unwrap();
    // New upgrades are answered 503 once the drain has begun.
    let head = raw_http(
        app.addr,
        "GET /towerpc HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: towerpc\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    // (Shutting towerpc down again returns at once.)
    app.stop().await;
}

/// Serves one HTTP/1.1 connection, `io`, with hyper (upgrades on) and `route` as its service.
async fn serve_with_hyper<IO>(io: IO, route: Upgrade)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let svc = hyper_util::service::TowerToHyperService::new(route);
    hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .with_upgrades()
        .await
        .unwrap();
}

#[tokio::test]
async fn over_plain_hyper_the_socket_is_taken_back() {
    // A hyper HTTP/1.1 server straight on TCP: towerpc gets the socket itself back.
    let rpc = Server::builder().into_upgrade(service());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let route = rpc.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        serve_with_hyper(tcp, route).await;
    });
    let client = client(addr).await;
    let got: String = client.invoke("echo", "over hyper").await.unwrap();
    assert_eq!(got, "over hyper");
    // No layer said who the peer is: the address comes from the socket.
    let peer: String = client.invoke("peer", &()).await.unwrap();
    let peer: SocketAddr = peer.parse().unwrap();
    assert_eq!(peer.ip(), addr.ip());
    rpc.shutdown().await;
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn the_upgrade_runs_over_tls_through_the_tls_connector() {
    use towerpc::transport::tls::{config, TlsConnector};
    use towerpc::transport::TcpConnector;

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    let server_tls = config::server(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap();
    let client_tls = config::client(cert_pem.as_bytes()).unwrap();

    // An HTTPS server: TLS, then hyper's HTTP/1.1 with upgrades, the towerpc route inside.
    let rpc = Server::builder().into_upgrade(service());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let route = rpc.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(server_tls)
            .accept(tcp)
            .await
            .unwrap();
        serve_with_hyper(tls, route).await;
    });

    let tls = TlsConnector::new(TcpConnector::new(), client_tls, "localhost").unwrap();
    let client = Client::builder()
        .connect_with(
            url(addr, DEFAULT_PATH)
                .to_string()
                .replace("http:", "https:")
                .parse::<http::Uri>()
                .unwrap(),
            UpgradeConnector::with_connector(tls),
        )
        .await
        .unwrap();
    for i in 0..50u32 {
        let got: u32 = client.invoke("echo", &i).await.unwrap();
        assert_eq!(got, i);
    }
    assert_eq!(rpc.handle().stats().accepts, 1);
    rpc.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_named_in_lists_and_any_case_is_answered_101_and_speaks_towerpc() {
    // §15: `Upgrade` and `Connection` are comma-separated lists compared without regard to
    // case, and `towerpc/1` names the protocol; the 101 carries `Connection: Upgrade` and
    // `Upgrade: towerpc`, and the bytes after it are a towerpc connection (§3).
    let app = app().await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let req = format!(
        "GET {DEFAULT_PATH} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, UPGRADE\r\n\
         Upgrade: h2c, TowerPC/1\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing past the head is read here.
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("no response head")
            .unwrap();
        assert_eq!(n, 1, "closed before a response head: {got:?}");
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(head.contains("upgrade: towerpc"), "{head}");
    // A towerpc connection now: prefaces, then a PING answered.
    let mut preface = *b"TRPC\x01C\x00\x00\x01\x00\x00\x00";
    s.write_all(&preface).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut preface))
        .await
        .expect("no server preface")
        .unwrap();
    assert_eq!(&preface[..6], b"TRPC\x01S");
    let ping = [0, 0, 0, 9, 0, 0, 0, 1, 0x06, 1, 2, 3, 4, 5, 6, 7, 8];
    s.write_all(&ping).await.unwrap();
    let mut pong = [0u8; 17];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut pong))
        .await
        .expect("no PONG")
        .unwrap();
    assert_eq!(pong[8], 0x07);
    assert_eq!(&pong[9..], &ping[9..]);
    drop(s);
    app.stop().await;
}

#[tokio::test]
async fn an_http2_request_at_the_path_is_answered_426_even_with_upgrade_headers() {
    // §15: HTTP/2 has no `Upgrade`; a request over it is answered 426 naming towerpc.
    use tower::ServiceExt;
    let rpc = Server::builder().into_upgrade(service());
    let req = http::Request::builder()
        .version(http::Version::HTTP_2)
        .method("GET")
        .uri(DEFAULT_PATH)
        .header("connection", "Upgrade")
        .header("upgrade", "towerpc")
        .body(())
        .unwrap();
    let resp = rpc.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), http::StatusCode::UPGRADE_REQUIRED);
    assert_eq!(resp.headers()["upgrade"], "towerpc");
    rpc.shutdown().await;
}

#[tokio::test]
async fn a_refused_upgrade_fails_calls_as_never_sent() {
    // §15: any status but 101 is a failed connection attempt, as a refused TCP connection:
    // nothing was sent, so the calls may be retried elsewhere.
    let app = app().await;
    let client = Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy_with(url(app.addr, "/nope"), UpgradeConnector::new());
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        client.invoke::<_, u64>("echo", &1u64),
    )
    .await
    .expect("the call hung")
    .unwrap_err();
    assert!(err.is_retry_safe(), "{err:#}");
    assert_eq!(app.rpc.handle().stats().accepts, 0);
    app.stop().await;
}
