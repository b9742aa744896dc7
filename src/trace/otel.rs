//! OpenTelemetry context propagation across a towerpc hop (feature `opentelemetry`).
//!
//! The app's global text-map propagator (W3C trace context, baggage, B3, Jaeger: whatever it
//! installed with `opentelemetry::global::set_text_map_propagator`) writes into and reads from
//! the request metadata, a msgpack map of string keys to string values, exactly as it does with
//! HTTP headers. Two tower layers do it on every call:
//!
//! - [`InjectLayer`] on a client: each request carries the caller's current context;
//! - [`ExtractLayer`] on a server ([`Server::layer`](crate::Server::layer)): each handler runs
//!   with the caller's context attached, so spans it starts are children of the caller's.
//!
//! # Examples
//!
//! ```no_run
//! use towerpc::trace::otel::{ExtractLayer, InjectLayer};
//! use towerpc::{Client, Request, Response, Server};
//!
//! # async fn f() -> Result<(), towerpc::BoxError> {
//! // The app installs its propagator once, e.g. opentelemetry_sdk's TraceContextPropagator.
//! let handler = tower::service_fn(|req: Request| async move {
//!     Ok::<_, towerpc::BoxError>(Response::new(req.into_body()))
//! });
//! let server = Server::builder().layer(ExtractLayer::new());
//! tokio::spawn(server.serve("127.0.0.1:7000".parse()?, handler));
//!
//! let client = Client::builder().connect("127.0.0.1:7000").await?;
//! let traced = tower::ServiceBuilder::new()
//!     .layer(InjectLayer::new())
//!     .service(client);
//! # let _ = traced; Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::task::{Context, Poll};

use bytes::Bytes;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{FutureExt, WithContext};
use tower::{Layer, Service};

use crate::Request;

/// Request metadata as a text map: what a propagator injects into and extracts from.
///
/// Metadata that is not a msgpack map of strings reads as empty, and is replaced when written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataMap(BTreeMap<String, String>);

impl MetadataMap {
    /// The map in `metadata`.
    pub fn from_metadata(metadata: &[u8]) -> Self {
        if metadata.is_empty() {
            return MetadataMap::default();
        }
        MetadataMap(crate::payload::from_msgpack(metadata).unwrap_or_default())
    }

    /// The map as request metadata.
    pub fn to_metadata(&self) -> Bytes {
        // A map of strings always encodes.
        crate::payload::to_msgpack(&self.0).unwrap_or_default()
    }
}

impl Injector for MetadataMap {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_ascii_lowercase(), value);
    }
}

impl Extractor for MetadataMap {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(&key.to_ascii_lowercase()).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes `cx` into `req`'s metadata with the global propagator (other keys kept).
pub fn inject(cx: &opentelemetry::Context, req: &mut Request) {
    let mut map = MetadataMap::from_metadata(req.metadata());
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(cx, &mut map));
    *req.metadata_mut() = map.to_metadata();
}

/// The context the global propagator reads from `req`'s metadata.
pub fn extract(req: &Request) -> opentelemetry::Context {
    let map = MetadataMap::from_metadata(req.metadata());
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&map))
}

/// A client layer that injects the caller's current OpenTelemetry context into every
/// request's metadata; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectLayer {
    _priv: (),
}

impl InjectLayer {
    /// The layer.
    pub fn new() -> Self {
        InjectLayer { _priv: () }
    }
}

impl<S> Layer<S> for InjectLayer {
    type Service = Inject<S>;

    fn layer(&self, inner: S) -> Inject<S> {
        Inject { inner }
    }
}

/// The service of [`InjectLayer`].
#[derive(Debug, Clone)]
pub struct Inject<S> {
    inner: S,
}

impl<S: Service<Request>> Service<Request> for Inject<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> S::Future {
        inject(&opentelemetry::Context::current(), &mut req);
        self.inner.call(req)
    }
}

/// A server layer that runs each handler with the caller's OpenTelemetry context (read from the
/// request's metadata) attached; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtractLayer {
    _priv: (),
}

impl ExtractLayer {
    /// The layer.
    pub fn new() -> Self {
        ExtractLayer { _priv: () }
    }
}

impl<S> Layer<S> for ExtractLayer {
    type Service = Extract<S>;

    fn layer(&self, inner: S) -> Extract<S> {
        Extract { inner }
    }
}

/// The service of [`ExtractLayer`].
#[derive(Debug, Clone)]
pub struct Extract<S> {
    inner: S,
}

impl<S: Service<Request>> Service<Request> for Extract<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = WithContext<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let cx = extract(&req);
        // Attached for the call as well, for services that start work in `call` itself.
        let fut = {
            let _guard = cx.clone().attach();
            self.inner.call(req)
        };
        fut.with_context(cx)
    }
}
