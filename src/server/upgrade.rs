//! The towerpc protocol on an HTTP app's port: a route that answers `101 Switching Protocols`
//! and serves a towerpc connection over the upgraded stream (PROTOCOL.md §15).

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderValue, Method, StatusCode, Version};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};

use super::{Limited, Server, ServerHandle};
use crate::transport::upgrade::{has_token, Upgraded, UPGRADE_TOKEN};
use crate::transport::{ConnectInfo, Connected};
use crate::{BoxError, Request, Response};

/// A tower service for an HTTP route that upgrades HTTP/1.1 connections to towerpc and serves
/// them: mount it in an axum `Router` (or any hyper server that enables upgrades) to share the
/// app's port, and its TLS, between the HTTP API and towerpc. From [`Server::into_upgrade`].
///
/// Each upgraded connection is served exactly as an accepted TCP connection would be, with the
/// server's layers, limits, timeouts and counters. [`Upgrade::shutdown`] drains them.
///
/// Handlers learn the peer's address ([`ConnectInfo`]) when the HTTP request carries a
/// `towerpc::transport::ConnectInfo` extension (hyper itself does not record it): with axum,
/// map its `ConnectInfo<SocketAddr>` into one in a layer of the route, as
/// `examples/one_port.rs` does.
///
/// Answers:
/// - `101 Switching Protocols` to a `GET` over HTTP/1.1 with `Connection: Upgrade` and
///   `Upgrade: towerpc`; the towerpc connection starts with the next byte;
/// - `426 Upgrade Required` (naming `towerpc`) to other requests, and to HTTP/2 ones;
/// - `405 Method Not Allowed` to an upgrade by another method;
/// - `503 Service Unavailable` once [`Upgrade::shutdown`] has begun.
///
/// # Examples
///
/// ```no_run
/// use axum::{routing::get, serve::ListenerExt, Router};
/// use towerpc::{Request, Response, Server};
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let echo = tower::service_fn(|req: Request| async move {
///     Ok::<_, towerpc::BoxError>(Response::new(req.into_body()))
/// });
/// let rpc = Server::builder().into_upgrade(echo);
/// let app = Router::new()
///     .route("/hello", get(|| async { "hello" }))
///     .route_service(towerpc::transport::upgrade::DEFAULT_PATH, rpc.clone());
/// // TCP_NODELAY, as towerpc's own listener sets it: batches are large already.
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080")
///     .await?
///     .tap_io(|tcp| { let _ = tcp.set_nodelay(true); });
/// axum::serve(listener, app).await?;
/// rpc.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Upgrade {
    inner: Arc<Inner>,
}

struct Inner {
    /// Upgraded connections, to the accept loop of the server behind.
    conns: mpsc::UnboundedSender<UpgradedIo>,
    stop: CancellationToken,
    done: CancellationToken,
    handle: ServerHandle,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrade")
            .field("stopping", &self.inner.stop.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl<L> Server<L> {
    /// Serves `svc` over HTTP/1.1 upgrades instead of a listener of its own: the returned
    /// [`Upgrade`] is the service for the route (see its docs), and the server runs until
    /// [`Upgrade::shutdown`]. Must be called within a tokio runtime.
    ///
    /// TLS is the HTTP server's: a TLS configuration set on this server is not used.
    #[cfg_attr(docsrs, doc(cfg(feature = "http-upgrade")))]
    #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
    pub fn into_upgrade<S>(mut self, svc: S) -> Upgrade
    where
        S: Service<Request, Response = Response> + Clone + Send + 'static,
        L: Layer<Limited<S>> + Send + 'static,
        L::Service: Service<Request, Response = Response> + Send + 'static,
        <L::Service as Service<Request>>::Error: Into<BoxError>,
        <L::Service as Service<Request>>::Future: Send + 'static,
    {
        #[cfg(feature = "tls")]
        {
            self.config.tls = None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let done = CancellationToken::new();
        let handle = self.handle();
        let incoming = UnboundedReceiverStream::new(rx).map(Ok::<_, Infallible>);
        let signal = stop.clone().cancelled_owned();
        let finished = done.clone();
        tokio::spawn(async move {
            // Cannot fail: the incoming stream never yields an error.
            let _ = self
                .serve_with_incoming_shutdown(incoming, svc, signal)
                .await;
            finished.cancel();
        });
        Upgrade {
            inner: Arc::new(Inner {
                conns: tx,
                stop,
                done,
                handle,
            }),
        }
    }
}

impl Upgrade {
    /// Reads the server's stats and sets its health.
    pub fn handle(&self) -> ServerHandle {
        self.inner.handle.clone()
    }

    /// Shuts the server down gracefully, as `serve_with_shutdown` does when its signal fires:
    /// new upgrades are answered `503`, the health method turns NOT_SERVING, every connection
    /// gets a GOAWAY, in-flight calls finish within the grace period. Resolves when every
    /// upgraded connection is closed. Clones share the one server.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        self.inner.done.cancelled().await;
    }
}

fn answer(status: StatusCode) -> http::Response<Empty<Bytes>> {
    let mut resp = http::Response::new(Empty::new());
    *resp.status_mut() = status;
    resp
}

impl<B> Service<http::Request<B>> for Upgrade {
    type Response = http::Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if self.inner.stop.is_cancelled() {
            return ready(Ok(answer(StatusCode::SERVICE_UNAVAILABLE)));
        }
        let headers = req.headers();
        let wants_towerpc = req.version() == Version::HTTP_11
            && headers
                .get_all(CONNECTION)
                .iter()
                .any(|v| has_token(v.as_bytes(), "upgrade"))
            && headers
                .get_all(UPGRADE)
                .iter()
                .any(|v| has_token(v.as_bytes(), UPGRADE_TOKEN));
        if !wants_towerpc {
            let mut resp = answer(StatusCode::UPGRADE_REQUIRED);
            resp.headers_mut()
                .insert(UPGRADE, HeaderValue::from_static(UPGRADE_TOKEN));
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            return ready(Ok(resp));
        }
        if req.method() != Method::GET {
            let mut resp = answer(StatusCode::METHOD_NOT_ALLOWED);
            resp.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static("GET"));
            return ready(Ok(resp));
        }
        let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
            // Not served by hyper with upgrades enabled: nothing to take the stream from.
            return ready(Ok(answer(StatusCode::INTERNAL_SERVER_ERROR)));
        };
        // What an outer layer learned of the peer (hyper does not say).
        let info = req.extensions().get::<ConnectInfo>().cloned();
        let conns = self.inner.conns.clone();
        tokio::spawn(async move {
            match on_upgrade.await {
                // Once the server has stopped the send fails and the stream is dropped: closed.
                Ok(upgraded) => {
                    let _ = conns.send(UpgradedIo::new(upgraded, info));
                }
                Err(e) => tracing::debug!(error = %e, "HTTP upgrade to towerpc failed"),
            }
        });
        let mut resp = answer(StatusCode::SWITCHING_PROTOCOLS);
        resp.headers_mut()
            .insert(UPGRADE, HeaderValue::from_static(UPGRADE_TOKEN));
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        ready(Ok(resp))
    }
}

/// An upgraded connection. When hyper served the HTTP/1.1 connection straight from a
/// `TcpStream`, the socket is taken back from it, so towerpc runs on it directly, as on its own
/// port; any other stream (axum's `serve`, which sniffs the HTTP version first; TLS) stays
/// behind hyper's upgrade handle, and the peer is what the request's extensions said.
enum UpgradedIo {
    Tcp(Upgraded<TcpStream>),
    Other(TokioIo<hyper::upgrade::Upgraded>, ConnectInfo),
}

impl UpgradedIo {
    fn new(upgraded: hyper::upgrade::Upgraded, info: Option<ConnectInfo>) -> Self {
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => UpgradedIo::Tcp(Upgraded::new(parts.io.into_inner(), parts.read_buf)),
            Err(upgraded) => UpgradedIo::Other(TokioIo::new(upgraded), info.unwrap_or_default()),
        }
    }
}

impl Connected for UpgradedIo {
    fn connect_info(&self) -> ConnectInfo {
        match self {
            UpgradedIo::Tcp(io) => io.connect_info(),
            UpgradedIo::Other(_, info) => info.clone(),
        }
    }
}

impl AsyncRead for UpgradedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpgradedIo::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            UpgradedIo::Other(io, _) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpgradedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpgradedIo::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            UpgradedIo::Other(io, _) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpgradedIo::Tcp(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            UpgradedIo::Other(io, _) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpgradedIo::Tcp(io) => io.is_write_vectored(),
            UpgradedIo::Other(io, _) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpgradedIo::Tcp(io) => Pin::new(io).poll_flush(cx),
            UpgradedIo::Other(io, _) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpgradedIo::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            UpgradedIo::Other(io, _) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
