//! `examples/one_port.rs` end to end: HTTP, gRPC and towerpc on one port of 127.0.0.1, then a
//! drain, through the example's own code.
#![cfg(all(feature = "http-upgrade", feature = "metrics"))]

#[path = "../examples/one_port.rs"]
#[allow(dead_code, unreachable_pub)]
mod one_port;

#[tokio::test]
async fn one_port_serves_http_grpc_and_towerpc_then_drains() {
    let summary = one_port::run("127.0.0.1:0".parse().unwrap()).await.unwrap();
    assert_eq!(summary.http, 200, "{summary}");
    assert!(summary.grpc_ok, "{summary}");
    assert_eq!(summary.calls_ok, 1000, "{summary}");
    assert_eq!(summary.drain_refused, 10, "{summary}");
    assert_eq!(
        summary.to_string(),
        "one_port: http 200, grpc ok, towerpc 1000 calls ok, drain refused 10"
    );
}
