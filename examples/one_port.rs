//! One port for everything: an axum app (`/health`, `/metrics`), a tonic gRPC service and
//! towerpc (through an HTTP/1.1 upgrade), served by one listener with one shutdown signal.
//!
//! ```text
//! cargo run --example one_port --features http-upgrade,metrics
//! ```
//!
//! It binds `127.0.0.1:0` (or the address given as the first argument), calls all three over
//! sockets, drains, and ends with one line scripts can read:
//!
//! ```text
//! one_port: http 200, grpc ok, towerpc 1000 calls ok, drain refused 10
//! ```

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus as GrpcStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use towerpc::dispatch::Dispatcher;
use towerpc::server::health::{HealthReporter, ServingStatus};
use towerpc::stats::RpcStatsLayer;
use towerpc::transport::upgrade::DEFAULT_PATH;
use towerpc::transport::{ConnectInfo, UpgradeConnector};
use towerpc::{BoxError, Client, Server};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()?;
    let summary = run(addr).await?;
    println!("{summary}");
    Ok(())
}

/// What the run saw; its `Display` is the summary line.
#[derive(Debug)]
pub struct Summary {
    /// The status of `GET /health` while serving.
    pub http: u16,
    /// Whether gRPC's health check answered SERVING.
    pub grpc_ok: bool,
    /// towerpc calls answered correctly (of 1,000).
    pub calls_ok: usize,
    /// towerpc calls refused (safe to retry) during the drain (of 10).
    pub drain_refused: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let grpc = if self.grpc_ok { "ok" } else { "failed" };
        write!(
            f,
            "one_port: http {}, grpc {grpc}, towerpc {} calls ok, drain refused {}",
            self.http, self.calls_ok, self.drain_refused
        )
    }
}

/// Serves everything on `addr`, calls it over sockets, drains it.
pub async fn run(addr: SocketAddr) -> Result<Summary, BoxError> {
    // Every figure the `metrics` feature records, as Prometheus text for /metrics.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    // towerpc: a dispatcher under the stats layer, served through the upgrade route.
    let methods = Dispatcher::new()
        .route("Echo.Upper", |s: String| async move { s.to_uppercase() })
        .route("Echo.Slow", |ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ms
        });
    let rpc = Server::builder()
        .layer(RpcStatsLayer::named("echo"))
        .into_upgrade(methods);
    // axum knows the peer's address; towerpc handlers see it as their ConnectInfo.
    let rpc_route = tower::ServiceBuilder::new()
        .map_request(|mut req: axum::http::Request<axum::body::Body>| {
            let peer = req
                .extensions()
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0);
            req.extensions_mut().insert(ConnectInfo::new(peer, None));
            req
        })
        .service(rpc.clone());

    // gRPC: tonic's health service, on the same port through tonic's axum routes.
    let (grpc_health, grpc_service) = tonic_health::server::health_reporter();
    grpc_health
        .set_service_status("echo", tonic_health::ServingStatus::Serving)
        .await;
    let grpc = tonic::service::Routes::new(grpc_service).into_axum_router();

    // HTTP: /health reflects towerpc's health method, /metrics renders Prometheus text.
    let app = Router::new()
        .route("/health", get(health).with_state(rpc.handle().health()))
        .route("/metrics", get(metrics).with_state(prometheus))
        .route_service(DEFAULT_PATH, rpc_route)
        .merge(grpc);

    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    // As towerpc's own listener does (PROTOCOL.md §15): batches are large already, and Nagle's
    // algorithm would only delay the last one of a burst.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    println!("listening on {addr}: HTTP, gRPC and towerpc (upgrade at {DEFAULT_PATH})");
    let stop = CancellationToken::new();
    let http = tokio::spawn(
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .into_future(),
    );
    // The one signal stops the HTTP server and drains towerpc's connections.
    let drained = tokio::spawn({
        let (stop, rpc) = (stop.clone(), rpc.clone());
        async move {
            stop.cancelled().await;
            rpc.shutdown().await;
        }
    });

    // HTTP.
    let (status, body) = http_get(addr, "/health").await?;
    assert_eq!(body.trim(), "SERVING");

    // gRPC, over HTTP/2 on the same port.
    let grpc_ok = {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "echo".into(),
            })
            .await?;
        reply.into_inner().status == GrpcStatus::Serving as i32
    };

    // towerpc, pipelined over one upgraded connection.
    let client = Client::builder()
        .connect_with(
            format!("http://{addr}{DEFAULT_PATH}").parse::<http::Uri>()?,
            UpgradeConnector::new(),
        )
        .await?;
    let calls = (0..1000).map(|i| {
        let client = client.clone();
        async move {
            let word = format!("call {i}");
            client.invoke::<_, String>("Echo.Upper", &word).await.ok() == Some(word.to_uppercase())
        }
    });
    let ok = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
    let (_, metrics_text) = http_get(addr, "/metrics").await?;
    assert!(
        metrics_text.contains("towerpc_calls_total"),
        "/metrics shows the calls"
    );

    // Drain: a call in flight finishes; calls made once the drain has reached the connection
    // are refused (safe to retry elsewhere), and health turned NOT_SERVING before the first.
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.invoke::<_, u64>("Echo.Slow", &300u64).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.cancel();
    // The drain reaches the connection a moment after the signal: wait for the first refusal.
    let waiting = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match client.invoke::<_, String>("Echo.Upper", "late").await {
            Err(e) if e.is_retry_safe() => break,
            Ok(_) if tokio::time::Instant::now() < waiting => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            other => return Err(format!("no refusal once draining: {other:?}").into()),
        }
    }
    assert_eq!(
        rpc.handle().health().status(""),
        Some(ServingStatus::NotServing)
    );
    let mut refused = 0;
    for _ in 0..10 {
        match client.invoke::<_, String>("Echo.Upper", "late").await {
            Err(e) if e.is_retry_safe() => refused += 1,
            other => println!("unexpected during the drain: {other:?}"),
        }
    }
    assert_eq!(slow.await??, 300, "the call in flight finished");
    drop(client);
    drained.await?;
    http.await??;

    Ok(Summary {
        http: status,
        grpc_ok,
        calls_ok: ok,
        drain_refused: refused,
    })
}

/// `/health`: 200 SERVING while towerpc serves, 503 NOT_SERVING once it drains.
async fn health(State(health): State<HealthReporter>) -> (StatusCode, &'static str) {
    match health.status("") {
        Some(ServingStatus::Serving) => (StatusCode::OK, "SERVING"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING"),
    }
}

/// `/metrics`: the recorder's figures as Prometheus text.
async fn metrics(State(prometheus): State<PrometheusHandle>) -> String {
    prometheus.render()
}

/// A bare HTTP/1.1 GET: the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), BoxError> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no HTTP status line")?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}
