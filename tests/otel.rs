//! OpenTelemetry context across a towerpc hop: the caller's span is the parent of what the
//! handler sees, through the global W3C propagator, the client's InjectLayer and the server's
//! ExtractLayer.
#![cfg(feature = "opentelemetry")]

use opentelemetry::trace::{FutureExt, Span as _, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::net::TcpListener;
use tower::ServiceExt;
use towerpc::server::TcpIncoming;
use towerpc::trace::otel::{self, ExtractLayer, InjectLayer, MetadataMap};
use towerpc::{BoxError, Client, Request, Response, Server};

/// Answers the trace id and the remote parent span id of the context the handler runs in.
async fn handler(_req: Request) -> Result<Response, BoxError> {
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    let seen = format!("{}/{}/{}", sc.trace_id(), sc.span_id(), sc.is_remote());
    Ok(Response::new(towerpc::payload::to_msgpack(&seen)?))
}

#[tokio::test]
async fn the_callers_span_is_the_handlers_parent() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = SdkTracerProvider::builder().build();
    let tracer = provider.tracer("test");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder().layer(ExtractLayer::new());
    tokio::spawn(
        server.serve_with_incoming(TcpIncoming::from(listener), tower::service_fn(handler)),
    );
    let client = Client::builder().connect(addr).await.unwrap();
    let traced = tower::ServiceBuilder::new()
        .layer(InjectLayer::new())
        .service(client.clone());

    // A call made inside the caller's span carries it.
    let span = tracer.start("caller");
    let (trace_id, span_id) = (
        span.span_context().trace_id(),
        span.span_context().span_id(),
    );
    let cx = Context::current_with_span(span);
    let resp = traced
        .clone()
        .oneshot(Request::new("who", Vec::<u8>::new()))
        .with_context(cx)
        .await
        .unwrap();
    let seen: String = towerpc::payload::from_msgpack(resp.body()).unwrap();
    assert_eq!(seen, format!("{trace_id}/{span_id}/true"));

    // Without a span there is nothing to carry: the handler runs in no trace.
    let resp = traced
        .oneshot(Request::new("who", Vec::<u8>::new()))
        .await
        .unwrap();
    let seen: String = towerpc::payload::from_msgpack(resp.body()).unwrap();
    assert!(
        seen.starts_with("00000000000000000000000000000000/"),
        "{seen}"
    );
}

#[test]
fn inject_keeps_other_metadata_and_extract_reads_it_back() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = SdkTracerProvider::builder().build();
    let span = provider.tracer("test").start("caller");
    let trace_id = span.span_context().trace_id();
    let cx = Context::current_with_span(span);

    let mut other = MetadataMap::default();
    opentelemetry::propagation::Injector::set(&mut other, "tenant", "acme".into());
    let mut req = Request::new("m", Vec::<u8>::new()).with_metadata(other.to_metadata());
    otel::inject(&cx, &mut req);
    let map = MetadataMap::from_metadata(req.metadata());
    use opentelemetry::propagation::Extractor;
    assert_eq!(map.get("tenant"), Some("acme"));
    assert!(map.get("traceparent").is_some());
    assert_eq!(
        otel::extract(&req).span().span_context().trace_id(),
        trace_id
    );
}
