//! TCP: the default transport.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tower::Service;

/// Dials TCP connections: a tower `Service` from a [`SocketAddr`] to a [`TcpStream`], the
/// default connector of [`Client`](crate::Client).
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use towerpc::transport::TcpConnector;
///
/// # async fn f() -> towerpc::Result<()> {
/// let connector = TcpConnector::new().keepalive(Duration::from_secs(30));
/// let addr: std::net::SocketAddr = "127.0.0.1:7000".parse().unwrap();
/// let client = towerpc::Client::builder().connect_with(addr, connector).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TcpConnector {
    nodelay: bool,
    keepalive: Option<Duration>,
}

impl Default for TcpConnector {
    fn default() -> Self {
        TcpConnector::new()
    }
}

impl TcpConnector {
    /// A connector with `TCP_NODELAY` on and keepalive off.
    pub fn new() -> Self {
        TcpConnector {
            nodelay: true,
            keepalive: None,
        }
    }

    /// Sets `TCP_NODELAY`. Default `true`: batching already makes writes large, and Nagle's
    /// algorithm would only add latency to the last batch of a burst.
    #[must_use]
    pub fn nodelay(mut self, nodelay: bool) -> Self {
        self.nodelay = nodelay;
        self
    }

    /// Turns on TCP keepalive probes after `idle` without traffic. Default off: the client's
    /// own stall detection covers connections with calls pending; keepalive also finds dead
    /// idle ones (and keeps NAT entries alive).
    #[must_use]
    pub fn keepalive(mut self, idle: impl Into<Option<Duration>>) -> Self {
        self.keepalive = idle.into();
        self
    }
}

impl Service<SocketAddr> for TcpConnector {
    type Response = TcpStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, addr: SocketAddr) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if addr.ip().is_unspecified() {
                // gorpc #18: dialing ":port" hung every call until its timeout on some systems.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "cannot dial an unspecified address; use 127.0.0.1 or a real host",
                ));
            }
            let stream = TcpStream::connect(addr).await?;
            configure(&stream, this.nodelay, this.keepalive)?;
            Ok(stream)
        })
    }
}

/// Applies the socket options both ends use.
pub(crate) fn configure(
    stream: &TcpStream,
    nodelay: bool,
    keepalive: Option<Duration>,
) -> io::Result<()> {
    stream.set_nodelay(nodelay)?;
    if let Some(idle) = keepalive {
        let ka = socket2::TcpKeepalive::new().with_time(idle);
        socket2::SockRef::from(stream).set_tcp_keepalive(&ka)?;
    }
    Ok(())
}
