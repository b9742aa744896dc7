//! Transports: what a connection runs over, and what a handler learns about its peer.
//!
//! The engine runs over any `AsyncRead + AsyncWrite + Send + Unpin` stream. A server learns the
//! peer's address through [`Connected`], and hands it to every handler as a [`ConnectInfo`] in the
//! request's extensions.

mod tcp;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub mod tls;
#[cfg(all(unix, feature = "unix"))]
#[cfg_attr(docsrs, doc(cfg(feature = "unix")))]
mod unix;

#[cfg(feature = "http-upgrade")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-upgrade")))]
pub mod upgrade;

#[cfg(all(unix, feature = "unix"))]
pub use self::unix::UnixConnector;
#[cfg(feature = "http-upgrade")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-upgrade")))]
pub use self::upgrade::UpgradeConnector;

pub(crate) use self::tcp::configure as configure_tcp;
pub use self::tcp::TcpConnector;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::BoxError;

/// An `on_connect` hook, shared by every connection: it sees the new connection's
/// [`ConnectInfo`] and may refuse it.
pub(crate) type ConnectHook = Arc<
    dyn Fn(ConnectInfo) -> Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>> + Send + Sync,
>;

/// Whether a connector's error is a refused handshake (TLS) rather than an unreachable server.
pub(crate) fn is_handshake_error(e: &(dyn std::error::Error + 'static)) -> bool {
    #[cfg(feature = "tls")]
    {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if err.is::<tokio_rustls::rustls::Error>() || err.is::<tls::TlsHandshakeError>() {
                return true;
            }
            cur = err.source();
        }
    }
    let _ = e;
    false
}

pub(crate) fn hook<F, Fut>(f: F) -> ConnectHook
where
    F: Fn(ConnectInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    Arc::new(move |info| Box::pin(f(info)))
}

/// Facts about a connection, available to handlers via
/// [`Request::extensions`](crate::Request::extensions).
///
/// # Examples
///
/// ```
/// use towerpc::{transport::ConnectInfo, Request, Response};
///
/// async fn handler(req: Request) -> Result<Response, towerpc::BoxError> {
///     let peer = req.extensions().get::<ConnectInfo>().and_then(|c| c.remote_addr());
///     Ok(Response::new(format!("hello {peer:?}").into()))
/// }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectInfo {
    remote_addr: Option<SocketAddr>,
    local_addr: Option<SocketAddr>,
    #[cfg(feature = "tls")]
    peer_certificates: Option<Arc<[rustls_pki_types::CertificateDer<'static>]>>,
}

impl ConnectInfo {
    /// Info with the given addresses.
    pub fn new(remote_addr: Option<SocketAddr>, local_addr: Option<SocketAddr>) -> Self {
        ConnectInfo {
            remote_addr,
            local_addr,
            #[cfg(feature = "tls")]
            peer_certificates: None,
        }
    }

    /// The certificate chain the peer presented over TLS (its own certificate first), if any:
    /// with mutual TLS, a server learns here who the client is.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        self.peer_certificates.as_deref()
    }

    #[cfg(feature = "tls")]
    pub(crate) fn with_peer_certificates(
        mut self,
        certs: Option<Arc<[rustls_pki_types::CertificateDer<'static>]>>,
    ) -> Self {
        self.peer_certificates = certs;
        self
    }

    /// The peer's address, if the transport has one.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// Our own address on this connection, if the transport has one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

/// A stream that can say who is on the other end.
///
/// Implement it for a custom transport to give handlers the peer's address.
pub trait Connected {
    /// The connection's [`ConnectInfo`].
    fn connect_info(&self) -> ConnectInfo;
}

impl Connected for TcpStream {
    fn connect_info(&self) -> ConnectInfo {
        ConnectInfo::new(self.peer_addr().ok(), self.local_addr().ok())
    }
}

impl Connected for tokio::io::DuplexStream {
    fn connect_info(&self) -> ConnectInfo {
        ConnectInfo::default()
    }
}
