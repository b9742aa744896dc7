//! Transports: what a connection runs over, and what a handler learns about its peer.
//!
//! The engine runs over any `AsyncRead + AsyncWrite + Send + Unpin` stream. A server learns the
//! peer's address through [`Connected`], and hands it to every handler as a [`ConnectInfo`] in the
//! request's extensions.

use std::net::SocketAddr;

use tokio::net::TcpStream;

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
}

impl ConnectInfo {
    /// Info with the given addresses.
    pub fn new(remote_addr: Option<SocketAddr>, local_addr: Option<SocketAddr>) -> Self {
        ConnectInfo {
            remote_addr,
            local_addr,
        }
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
