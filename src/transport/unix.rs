//! Unix domain sockets.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::net::UnixStream;
use tower::Service;

use super::{ConnectInfo, Connected};

/// Dials unix domain sockets: a tower `Service` from a path to a [`UnixStream`].
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> towerpc::Result<()> {
/// let client = towerpc::Client::builder()
///     .connect_with(std::path::PathBuf::from("/run/app.sock"), towerpc::transport::UnixConnector)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct UnixConnector;

impl Service<PathBuf> for UnixConnector {
    type Response = UnixStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<UnixStream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, path: PathBuf) -> Self::Future {
        Box::pin(UnixStream::connect(path))
    }
}

impl Connected for UnixStream {
    /// Unix sockets have no IP addresses; handlers see an empty [`ConnectInfo`].
    fn connect_info(&self) -> ConnectInfo {
        ConnectInfo::default()
    }
}
