//! towerpc echo server, written the way a user would: `Server::builder().serve(addr, svc)` with
//! every default, plus zstd and lz4 accepted when a client offers them.
//!
//! `towerpc_server ADDR [small|1k|raw]`
//!   small (default): a `Dispatcher` with the route "echo": i64 -> i64.
//!   1k:              a `Dispatcher` with the route "echo": byte string (serde_bytes) -> the same.
//!   raw:             a plain `tower::service_fn` that returns the request body unchanged
//!                    (no msgpack decode/encode on the server; label "towerpc-raw"), and
//!                    for the mixed workload's `--big-dir`: "bigup" answers one byte, "bigdown"
//!                    as many bytes as its 8-byte body says.
//! Every mode also answers "stats" with the server's socket write count (a u64), which the
//! client reads at both ends of its window to count writes per call without strace.
//! `SPIN_US=N` sets `Server::read_spin` to N µs (0: off) instead of the default.
use serde_bytes::ByteBuf;
use towerpc::codec::Compression;
use towerpc::dispatch::Dispatcher;
use towerpc::{BoxError, Request, Response, Server};

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or("127.0.0.1:7004".into())
        .parse()
        .unwrap();
    let mode = std::env::args().nth(2).unwrap_or("small".into());
    #[cfg_attr(feature = "before-spin", allow(unused_mut))]
    let mut server = Server::builder()
        .accept_compression(Compression::Zstd)
        .accept_compression(Compression::Lz4);
    #[cfg(not(feature = "before-spin"))]
    if let Some(us) = harness::spin_us() {
        server = server.read_spin(std::time::Duration::from_micros(us));
    }
    let handle = server.clone();
    let writes = move || handle.stats().write_calls;
    let r = match mode.as_str() {
        "small" => {
            let d = Dispatcher::new()
                .route("echo", |v: i64| async move { v })
                .route("stats", move || {
                    let n = writes();
                    async move { n }
                });
            server.serve(addr, d).await
        }
        "1k" => {
            let d = Dispatcher::new()
                .route("echo", |v: ByteBuf| async move { v })
                .route("stats", move || {
                    let n = writes();
                    async move { n }
                });
            server.serve(addr, d).await
        }
        "raw" => {
            let echo = tower::service_fn(move |req: Request| {
                let stats = (req.method() == "stats").then(|| writes());
                async move {
                    Ok::<_, BoxError>(match stats {
                        Some(n) => Response::new(towerpc::payload::to_msgpack(&n)?),
                        // The mixed workload's other directions (`--big-dir`): the big
                        // bytes one way only.
                        None if req.method() == "bigup" => {
                            Response::new(bytes::Bytes::from_static(b"\x01"))
                        }
                        None if req.method() == "bigdown" => {
                            let n = req.body().get(..8).and_then(|b| b.try_into().ok());
                            let n = u64::from_be_bytes(n.ok_or("an 8-byte size")?);
                            Response::new(bytes::Bytes::from(vec![7u8; usize::try_from(n)?]))
                        }
                        None => Response::new(req.into_body()),
                    })
                }
            });
            server.serve(addr, echo).await
        }
        m => panic!("unknown mode {m} (small | 1k | raw)"),
    };
    r.unwrap();
}
