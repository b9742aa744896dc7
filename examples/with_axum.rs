//! A towerpc server and an axum HTTP app on one tokio runtime, with one shutdown signal.
//!
//! The HTTP side serves `/health` and `/stats` (the RPC server's counters as JSON); both
//! servers stop gracefully when the signal fires. The example runs a few RPC calls and HTTP
//! requests against itself, prints what it saw and exits.
//!
//! ```text
//! cargo run --example with_axum
//! ```

use std::future::IntoFuture;
use std::time::Duration;

use axum::{routing::get, Json, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use towerpc::dispatch::Dispatcher;
use towerpc::{BoxError, Client, Server};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // One signal for both servers: a watch channel every task can wait on.
    let (stop_tx, stop_rx) = watch::channel(false);
    let signal = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    // The RPC side: a dispatcher with one method, under a tower layer from the same stack an
    // HTTP service would use.
    let rpc = Server::builder();
    let rpc_stats = rpc.clone();
    let dispatcher = Dispatcher::new().route("Greeter.Hello", |name: String| async move {
        format!("hello, {name}")
    });
    let svc = tower::ServiceBuilder::new()
        .concurrency_limit(1024)
        .service(dispatcher);
    let rpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let rpc_addr = rpc_listener.local_addr()?;
    let rpc_task = tokio::spawn(rpc.serve_with_incoming_shutdown(
        towerpc::server::TcpIncoming::from(rpc_listener),
        svc,
        signal(stop_rx.clone()),
    ));

    // The HTTP side: health and the RPC server's stats.
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/stats",
            get(move || {
                let s = rpc_stats.stats();
                async move {
                    Json(serde_json_like(&[
                        ("accepts", s.accepts),
                        ("calls", s.calls),
                        ("errors", s.errors),
                        ("bytes_read", s.bytes_read),
                        ("bytes_written", s.bytes_written),
                    ]))
                }
            }),
        );
    let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_addr = http_listener.local_addr()?;
    let http_task = tokio::spawn(
        axum::serve(http_listener, app)
            .with_graceful_shutdown(signal(stop_rx.clone()))
            .into_future(),
    );
    println!("with_axum: RPC on {rpc_addr}, HTTP on {http_addr}, one runtime");

    // Use both.
    let client = Client::builder().connect(rpc_addr).await?;
    for name in ["axum", "tonic", "tower"] {
        let greeting: String = client.invoke("Greeter.Hello", name).await?;
        println!("rpc: {greeting}");
    }
    println!("http /health: {}", http_get(http_addr, "/health").await?);
    println!("http /stats: {}", http_get(http_addr, "/stats").await?);

    // One signal stops both, gracefully.
    drop(client);
    stop_tx.send(true)?;
    tokio::time::timeout(Duration::from_secs(10), async {
        rpc_task.await??;
        http_task.await??;
        Ok::<_, BoxError>(())
    })
    .await??;
    println!("with_axum: both servers stopped");
    Ok(())
}

/// A tiny JSON object of counters (keeps the example free of serde_json).
fn serde_json_like(
    fields: &[(&'static str, u64)],
) -> std::collections::BTreeMap<&'static str, u64> {
    fields.iter().copied().collect()
}

/// A minimal HTTP/1.1 GET over a raw socket, so the example needs no HTTP client crate.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, BoxError> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    stream.read_to_string(&mut resp).await?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.trim().to_string())
}
