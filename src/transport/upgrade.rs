//! The towerpc protocol over an HTTP/1.1 `Upgrade` (PROTOCOL.md §15): the client's connector,
//! and the stream both ends speak once the upgrade is done.
//!
//! The client sends `GET <path>` with `Connection: Upgrade` and `Upgrade: towerpc`; the server
//! answers `101 Switching Protocols`, and from the next byte on the connection is a towerpc
//! connection exactly as over TCP, starting with the client's preface. The server side is
//! [`server::Upgrade`](crate::server::Upgrade), a tower service for a route of an axum (hyper)
//! app.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::Uri;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tower::Service;

use super::{ConnectInfo, Connected, TcpConnector};
use crate::BoxError;

/// The protocol token of the `Upgrade` header: `Upgrade: towerpc`.
pub const UPGRADE_TOKEN: &str = "towerpc";

/// The path towerpc's upgrade route is usually mounted at (any path works; both ends must
/// agree).
pub const DEFAULT_PATH: &str = "/towerpc";

/// Bound on the HTTP response head the client reads before the upgrade (16 KiB).
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Dials a URL, upgrades the HTTP/1.1 connection to towerpc, and hands the stream to the
/// client: a tower `Service` from a [`Uri`] to an [`Upgraded`] stream.
///
/// The connection beneath is dialed by the inner connector, [`TcpConnector`] by default; wrap a
/// [`TlsConnector`](crate::transport::tls::TlsConnector) to upgrade over TLS (an `https` URL).
/// The URL's host is resolved again at every reconnect.
///
/// # Examples
///
/// ```no_run
/// use towerpc::transport::UpgradeConnector;
///
/// # async fn f() -> towerpc::Result<()> {
/// let url: http::Uri = "http://127.0.0.1:8080/towerpc".parse().unwrap();
/// let client = towerpc::Client::builder()
///     .connect_with(url, UpgradeConnector::new())
///     .await?;
/// let n: u64 = client.invoke("Counter.Next", &()).await?;
/// # let _ = n; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct UpgradeConnector<C = TcpConnector> {
    inner: C,
}

impl UpgradeConnector {
    /// Upgrades over plain TCP.
    pub fn new() -> Self {
        UpgradeConnector {
            inner: TcpConnector::new(),
        }
    }
}

impl Default for UpgradeConnector {
    fn default() -> Self {
        UpgradeConnector::new()
    }
}

impl<C> UpgradeConnector<C> {
    /// Upgrades over the streams `inner` dials (for example TLS over TCP).
    pub fn with_connector(inner: C) -> Self {
        UpgradeConnector { inner }
    }
}

impl<C> Service<Uri> for UpgradeConnector<C>
where
    C: Service<SocketAddr> + Clone + Send + 'static,
    C::Response: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = Upgraded<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let (host, port) = authority(&uri)?;
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .next()
                .ok_or_else(|| format!("{host} resolved to no address"))?;
            std::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let io = inner.call(addr).await.map_err(Into::into)?;
            upgrade(io, &uri).await
        })
    }
}

/// The host and port to dial for `uri` (port 80 for `http`, 443 for `https` unless given).
fn authority(uri: &Uri) -> Result<(String, u16), BoxError> {
    let host = uri
        .host()
        .ok_or_else(|| format!("URL {uri} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = match (uri.port_u16(), uri.scheme_str()) {
        (Some(port), _) => port,
        (None, Some("https")) => 443,
        (None, Some("http") | None) => 80,
        (None, Some(other)) => return Err(format!("URL scheme {other:?} is not http(s)").into()),
    };
    Ok((host, port))
}

/// Performs the client's half of the upgrade over `io`: the request, then the response head.
///
/// Bytes the server sent after the head (none, with towerpc servers: they wait for the
/// client's preface) are kept and read first.
pub async fn upgrade<IO>(mut io: IO, uri: &Uri) -> Result<Upgraded<IO>, BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let host = uri
        .authority()
        .ok_or_else(|| format!("URL {uri} has no host"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_TOKEN}\r\n\r\n"
    );
    io.write_all(request.as_bytes()).await?;
    io.flush().await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Err(Box::new(UpgradeError::new(
                None,
                "the server closed the connection before answering the upgrade",
            )));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(Box::new(UpgradeError::new(
                    None,
                    "the HTTP response head is too long",
                )))
            }
            Err(e) => {
                return Err(Box::new(UpgradeError::new(
                    None,
                    format!("malformed HTTP response: {e}"),
                )))
            }
        };
        let status = resp.code.unwrap_or(0);
        if status != 101 {
            let reason = resp.reason.unwrap_or("").to_string();
            return Err(Box::new(UpgradeError::new(
                http::StatusCode::from_u16(status).ok(),
                format!("the server answered {status} {reason} instead of switching protocols"),
            )));
        }
        let upgraded_to_towerpc = resp
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade") && has_token(h.value, UPGRADE_TOKEN));
        if !upgraded_to_towerpc {
            return Err(Box::new(UpgradeError::new(
                http::StatusCode::from_u16(status).ok(),
                "the server switched to a protocol other than towerpc",
            )));
        }
        buf.advance(head);
        return Ok(Upgraded::new(io, buf.freeze()));
    }
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|part| {
        let part = part.trim_ascii();
        // `Upgrade: towerpc/1` names a version of the same protocol.
        let name = part.split(|&b| b == b'/').next().unwrap_or(part);
        name.eq_ignore_ascii_case(token.as_bytes())
    })
}

/// The server refused the upgrade, or answered something that is not HTTP.
#[derive(Debug)]
pub struct UpgradeError {
    status: Option<http::StatusCode>,
    message: String,
}

impl UpgradeError {
    fn new(status: Option<http::StatusCode>, message: impl Into<String>) -> Self {
        UpgradeError {
            status,
            message: message.into(),
        }
    }

    /// The HTTP status the server answered with, if it answered one: `404` for a wrong path,
    /// `426` for a route that wants another protocol, `503` for a server that is draining.
    pub fn status(&self) -> Option<http::StatusCode> {
        self.status
    }
}

impl fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP upgrade to towerpc failed: {}", self.message)
    }
}

impl std::error::Error for UpgradeError {}

pin_project_lite::pin_project! {
    /// A connection upgraded to towerpc: the stream beneath, with any bytes that arrived
    /// together with the HTTP head read first.
    #[derive(Debug)]
    pub struct Upgraded<IO> {
        #[pin]
        io: IO,
        leftover: Bytes,
    }
}

impl<IO> Upgraded<IO> {
    pub(crate) fn new(io: IO, leftover: Bytes) -> Self {
        Upgraded { io, leftover }
    }

    /// The stream beneath.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead> AsyncRead for Upgraded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.leftover.is_empty() {
            let n = this.leftover.len().min(buf.remaining());
            buf.put_slice(&this.leftover[..n]);
            this.leftover.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite> AsyncWrite for Upgraded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Upgraded<IO> {
    fn connect_info(&self) -> ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_in_lists_case_insensitively() {
        assert!(has_token(b"towerpc", "towerpc"));
        assert!(has_token(b"h2c, TowerPC", "towerpc"));
        assert!(has_token(b"towerpc/1", "towerpc"));
        assert!(!has_token(b"websocket", "towerpc"));
        assert!(!has_token(b"towerpcx", "towerpc"));
        assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
    }

    #[test]
    fn authority_defaults_ports_by_scheme() {
        let a = |s: &str| authority(&s.parse().unwrap()).map_err(|e| e.to_string());
        assert_eq!(
            a("http://example.com/x").unwrap(),
            ("example.com".into(), 80)
        );
        assert_eq!(
            a("https://example.com/x").unwrap(),
            ("example.com".into(), 443)
        );
        assert_eq!(a("http://[::1]:9/x").unwrap(), ("::1".into(), 9));
        assert!(a("ftp://example.com/").is_err());
    }

    #[tokio::test]
    async fn refusal_reports_the_status() {
        let (client, mut server) = tokio::io::duplex(4096);
        let answer = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let n = server.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            server
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            req
        });
        let uri: Uri = "http://localhost:1/rpc".parse().unwrap();
        let err = upgrade(client, &uri).await.unwrap_err();
        let err = err.downcast::<UpgradeError>().unwrap();
        assert_eq!(err.status(), Some(http::StatusCode::NOT_FOUND));
        let req = answer.await.unwrap();
        assert!(req.starts_with("GET /rpc HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Upgrade: towerpc\r\n"), "{req}");
        assert!(req.contains("Host: localhost:1\r\n"), "{req}");
    }

    #[tokio::test]
    async fn bytes_after_the_head_are_read_first() {
        let (client, mut server) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let _ = server.read(&mut buf).await.unwrap();
            server
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: towerpc\r\n\r\nabc")
                .await
                .unwrap();
            server.write_all(b"def").await.unwrap();
        });
        let uri: Uri = "http://localhost/".parse().unwrap();
        let mut up = upgrade(client, &uri).await.unwrap();
        let mut got = [0u8; 6];
        up.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcdef");
    }

    #[tokio::test]
    async fn the_connection_is_handed_over_only_once_the_whole_101_head_is_in() {
        // PROTOCOL.md §15: no towerpc byte before the whole 101 response head.
        let (client, mut server) = tokio::io::duplex(4096);
        let uri: Uri = "http://localhost/".parse().unwrap();
        let mut up = tokio::spawn(async move { upgrade(client, &uri).await.map(|_| ()) });
        let mut buf = vec![0u8; 1024];
        let _ = server.read(&mut buf).await.unwrap();
        server
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: towerpc\r\n")
            .await
            .unwrap();
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), &mut up).await;
        assert!(
            early.is_err(),
            "handed over before the head ended: {early:?}"
        );
        server
            .write_all(b"Connection: Upgrade\r\n\r\n")
            .await
            .unwrap();
        up.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn switching_to_another_protocol_is_refused() {
        let (client, mut server) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let _ = server.read(&mut buf).await.unwrap();
            server
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
                .await
                .unwrap();
        });
        let uri: Uri = "http://localhost/".parse().unwrap();
        let err = upgrade(client, &uri).await.unwrap_err();
        assert!(err.to_string().contains("other than towerpc"), "{err}");
    }
}
