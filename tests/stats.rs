//! The per-method stats layer on a client, on a server and on an axum route.

mod support;

use std::time::Duration;

use tower::{Service, ServiceBuilder, ServiceExt};
use towerpc::dispatch::Dispatcher;
use towerpc::stats::RpcStatsLayer;
use towerpc::{Client, Code, Request, Server, Status};

const BOUND: Duration = Duration::from_secs(10);

fn dispatcher() -> Dispatcher {
    Dispatcher::new()
        .route("Calc.Double", |n: u64| async move { n * 2 })
        .route("Calc.Fail", |_: u64| async move {
            Err::<u64, Status>(Status::new(Code::Application, "no"))
        })
        .route("Calc.Slow", |ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ms
        })
}

#[tokio::test(flavor = "current_thread")]
async fn stats_layer_on_a_client() {
    let server = support::serve(Server::builder(), support::dispatcher(dispatcher())).await;
    let client = Client::connect(server.addr).await.unwrap();
    let stats = RpcStatsLayer::new();
    let mut svc = ServiceBuilder::new()
        .layer(stats.clone())
        .service(client.clone());
    let call = |m: &'static str, n: u64| Request::new(m, support::msgpack(&n));
    for n in 0..3 {
        svc.ready()
            .await
            .unwrap()
            .call(call("Calc.Double", n))
            .await
            .unwrap();
    }
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(call("Calc.Fail", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Application));
    let timed_out = call("Calc.Slow", 5_000).with_timeout(Duration::from_millis(20));
    assert!(svc
        .ready()
        .await
        .unwrap()
        .call(timed_out)
        .await
        .unwrap_err()
        .is_timeout());
    // A call dropped before it ends counts as cancelled, and leaves nothing in flight.
    let dropped = svc.ready().await.unwrap().call(call("Calc.Slow", 5_000));
    assert_eq!(stats.snapshot().methods["Calc.Slow"].in_flight, 1);
    drop(dropped);

    let snap = stats.snapshot();
    let double = &snap.methods["Calc.Double"];
    assert_eq!((double.calls, double.errors(), double.in_flight), (3, 0, 0));
    assert!(double.latency_quantile(0.5) > Duration::ZERO);
    assert!(double.latency_max() >= double.latency_quantile(0.99));
    let fail = &snap.methods["Calc.Fail"];
    assert_eq!(fail.errors_by_code.get("application error"), Some(&1));
    let slow = &snap.methods["Calc.Slow"];
    assert_eq!(slow.calls, 2);
    assert_eq!(slow.in_flight, 0);
    assert_eq!(slow.errors_by_code.get("deadline exceeded"), Some(&1));
    assert_eq!(slow.errors_by_code.get("cancelled"), Some(&1));
    assert!(slow.latency_quantile(1.0) >= Duration::from_millis(20));
}

#[tokio::test(flavor = "current_thread")]
async fn stats_layer_on_a_server() {
    let stats = RpcStatsLayer::new();
    let server = Server::builder().layer(stats.clone());
    let running = support::serve_layered(server, support::dispatcher(dispatcher())).await;
    let client = Client::connect(running.addr).await.unwrap();
    for n in 0..5u64 {
        assert_eq!(
            client.invoke::<_, u64>("Calc.Double", &n).await.unwrap(),
            n * 2
        );
    }
    assert!(client.invoke::<_, u64>("Calc.Fail", &1u64).await.is_err());
    assert!(client.invoke::<_, u64>("Calc.Nope", &1u64).await.is_err());
    let snap = stats.snapshot();
    assert_eq!(snap.methods["Calc.Double"].calls, 5);
    assert_eq!(
        snap.methods["Calc.Fail"]
            .errors_by_code
            .get("application error"),
        Some(&1)
    );
    assert_eq!(
        snap.methods["Calc.Nope"].errors_by_code.get("not found"),
        Some(&1)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn stats_layer_on_an_axum_route() {
    use axum::http::StatusCode;
    use axum::routing::get;

    let stats = RpcStatsLayer::new();
    let app = axum::Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route("/boom", get(|| async { StatusCode::SERVICE_UNAVAILABLE }))
        .layer(stats.clone());
    for path in ["/ok", "/ok", "/boom"] {
        let req = http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = tokio::time::timeout(BOUND, app.clone().oneshot(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status().is_success(), path == "/ok");
    }
    let snap = stats.snapshot();
    assert_eq!(snap.methods["/ok"].calls, 2);
    assert_eq!(snap.methods["/ok"].errors(), 0);
    assert_eq!(snap.methods["/boom"].errors_by_code.get("503"), Some(&1));
}

/// With the `metrics` feature the same figures reach whatever recorder is installed.
#[cfg(feature = "metrics")]
#[test]
fn stats_layer_records_through_the_metrics_facade() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = support::current_thread();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let server = support::serve(Server::builder(), support::dispatcher(dispatcher())).await;
            let client = Client::connect(server.addr).await.unwrap();
            let mut svc = ServiceBuilder::new()
                .layer(RpcStatsLayer::named("calc-client"))
                .service(client);
            for n in 0..4u64 {
                let req = Request::new("Calc.Double", support::msgpack(&n));
                svc.ready().await.unwrap().call(req).await.unwrap();
            }
            let req = Request::new("Calc.Fail", support::msgpack(&1u64));
            assert!(svc.ready().await.unwrap().call(req).await.is_err());
        })
    });
    let mut found = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        found.insert(format!("{}{{{}}}", key.name(), labels.join(",")), value);
    }
    let get = |k: &str| {
        found
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in {:?}", found.keys()))
    };
    assert!(matches!(
        get("towerpc_calls_total{service=calc-client,method=Calc.Double}"),
        DebugValue::Counter(4)
    ));
    assert!(matches!(
        get("towerpc_errors_total{service=calc-client,method=Calc.Fail,code=application error}"),
        DebugValue::Counter(1)
    ));
    assert!(matches!(
        get("towerpc_call_duration_seconds{service=calc-client,method=Calc.Double}"),
        DebugValue::Histogram(h) if h.len() == 4
    ));
    assert!(matches!(
        get("towerpc_in_flight{service=calc-client,method=Calc.Double}"),
        DebugValue::Gauge(g) if g.into_inner() == 0.0
    ));
}
