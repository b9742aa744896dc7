//! TLS and mutual TLS over any transport, with tokio-rustls.
//!
//! On the client, [`TlsConnector`] wraps another connector (TCP by default) and completes a TLS
//! handshake on every stream it dials. On the server, [`Server::tls`](crate::Server::tls) makes
//! every accepted connection do the handshake on its own task, within the handshake timeout. The
//! [`config`] helpers build rustls configurations from PEM (bytes or files), with or without
//! client certificates. Handlers see the client's certificate chain in
//! [`ConnectInfo::peer_certificates`](super::ConnectInfo::peer_certificates).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
pub use tokio_rustls::rustls;
use tower::Service;

use super::{ConnectInfo, Connected};
use crate::stats::CountingIo;
use crate::BoxError;

/// Dials through `inner`, then runs a TLS handshake as a client.
///
/// # Examples
///
/// ```no_run
/// use towerpc::transport::{tls, TcpConnector};
///
/// # async fn f(ca_pem: &[u8]) -> Result<(), towerpc::BoxError> {
/// let config = tls::config::client(ca_pem)?;
/// let connector = tls::TlsConnector::new(TcpConnector::new(), config, "localhost")?;
/// let addr: std::net::SocketAddr = "127.0.0.1:7443".parse()?;
/// let client = towerpc::Client::builder().connect_with(addr, connector).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsConnector<C> {
    inner: C,
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl<C: fmt::Debug> fmt::Debug for TlsConnector<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("inner", &self.inner)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl<C> TlsConnector<C> {
    /// A connector that dials with `inner` and verifies the server as `server_name` (a DNS
    /// name or an IP address) under `config`.
    pub fn new(
        inner: C,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Self, BoxError> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("invalid TLS server name {server_name:?}: {e}"))?;
        Ok(TlsConnector {
            inner,
            tls: tokio_rustls::TlsConnector::from(config),
            server_name,
        })
    }
}

impl<C, T> Service<T> for TlsConnector<C>
where
    C: Service<T>,
    C::Response: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = TlsStream<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, target: T) -> Self::Future {
        let dial = self.inner.call(target);
        let tls = self.tls.clone();
        let name = self.server_name.clone();
        Box::pin(async move {
            // Count the socket beneath TLS, into the dialing client's stats.
            let io = CountingIo::for_dial(dial.await.map_err(Into::into)?);
            let inner = tls
                .connect(name, io)
                .await
                .map_err(|e| Box::new(TlsHandshakeError(e)) as BoxError)?;
            Ok(TlsStream { inner })
        })
    }
}

pin_project_lite::pin_project! {
    /// A client's TLS stream, from [`TlsConnector`]: the dialed stream beneath, counted into
    /// the client's stats as it crosses the wire.
    #[derive(Debug)]
    pub struct TlsStream<IO> {
        #[pin]
        inner: tokio_rustls::client::TlsStream<CountingIo<IO>>,
    }
}

impl<IO> TlsStream<IO> {
    /// The dialed stream beneath TLS.
    pub fn get_ref(&self) -> &IO {
        self.inner.get_ref().0.get_ref()
    }

    /// The TLS session: the negotiated protocol, the server's certificates.
    pub fn session(&self) -> &rustls::ClientConnection {
        self.inner.get_ref().1
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for TlsStream<IO> {
    fn connect_info(&self) -> ConnectInfo {
        let certs = self
            .session()
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
        self.get_ref().connect_info().with_peer_certificates(certs)
    }
}

/// A TLS handshake failed (bad certificate, unknown CA, wrong name, a peer that does not speak
/// TLS...). The source is rustls' own error where there is one.
#[derive(Debug)]
pub struct TlsHandshakeError(io::Error);

impl fmt::Display for TlsHandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS handshake failed: {}", self.0)
    }
}

impl std::error::Error for TlsHandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .get_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl<IO: Connected> Connected for tokio_rustls::client::TlsStream<IO> {
    fn connect_info(&self) -> ConnectInfo {
        let (io, session) = self.get_ref();
        let certs = session
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
        io.connect_info().with_peer_certificates(certs)
    }
}

/// Builds rustls configurations from PEM, with ring as the crypto provider.
pub mod config {
    use std::path::Path;
    use std::sync::Arc;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{self, server::WebPkiClientVerifier, RootCertStore};

    use crate::BoxError;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, BoxError> {
        let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()?;
        if certs.is_empty() {
            return Err("no certificate in PEM".into());
        }
        Ok(certs)
    }

    fn roots(pem: &[u8]) -> Result<RootCertStore, BoxError> {
        let mut roots = RootCertStore::empty();
        for cert in certs(pem)? {
            roots.add(cert)?;
        }
        Ok(roots)
    }

    /// A client configuration that trusts the CA certificates in `ca_pem`.
    pub fn client(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, BoxError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(ca_pem)?)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// A client configuration for mutual TLS: trusts `ca_pem` and presents `cert_pem` (chain,
    /// leaf first) with its private key `key_pem`.
    pub fn client_with_identity(
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Arc<rustls::ClientConfig>, BoxError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(ca_pem)?)
            .with_client_auth_cert(certs(cert_pem)?, PrivateKeyDer::from_pem_slice(key_pem)?)?;
        Ok(Arc::new(config))
    }

    /// A server configuration presenting `cert_pem` (chain, leaf first) with `key_pem`,
    /// without client certificates.
    pub fn server(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, BoxError> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs(cert_pem)?, PrivateKeyDer::from_pem_slice(key_pem)?)?;
        Ok(Arc::new(config))
    }

    /// A server configuration for mutual TLS: presents `cert_pem`/`key_pem` and requires every
    /// client to present a certificate issued by a CA in `client_ca_pem`.
    pub fn server_mutual(
        cert_pem: &[u8],
        key_pem: &[u8],
        client_ca_pem: &[u8],
    ) -> Result<Arc<rustls::ServerConfig>, BoxError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(client_ca_pem)?),
            provider(),
        )
        .build()?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(cert_pem)?, PrivateKeyDer::from_pem_slice(key_pem)?)?;
        Ok(Arc::new(config))
    }

    /// Reads a PEM file, for the functions above.
    pub fn read_pem(path: impl AsRef<Path>) -> Result<Vec<u8>, BoxError> {
        let path = path.as_ref();
        std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()).into())
    }
}
