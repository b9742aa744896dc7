//! [`CallContext`]: what a handler may learn about the call besides its request.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Extensions;
use tokio::time::Instant;

use crate::request::LazyExtensions;
use crate::transport::ConnectInfo;
use crate::Request;

/// Facts about one call: the method, the caller's address, the deadline and the metadata.
///
/// A handler that takes two arguments gets it first and its decoded request second. It is built
/// when the request arrives, so [`deadline`](CallContext::deadline) is the caller's remaining
/// time counted from then.
///
/// # Examples
///
/// ```
/// use towerpc::dispatch::{CallContext, Dispatcher};
///
/// async fn whoami(ctx: CallContext, _req: ()) -> String {
///     match ctx.remote_addr() {
///         Some(addr) => format!("{} called by {addr}", ctx.method()),
///         None => format!("{} called by a peer without an address", ctx.method()),
///     }
/// }
///
/// let d = Dispatcher::new().route("WhoAmI", whoami);
/// ```
pub struct CallContext {
    method: Bytes,
    remote_addr: Option<SocketAddr>,
    deadline: Option<Instant>,
    metadata: Bytes,
    one_way: bool,
    extensions: LazyExtensions,
}

impl CallContext {
    /// The method the client called, as registered.
    pub fn method(&self) -> &str {
        // Method names are checked for UTF-8 when they are decoded off the wire.
        std::str::from_utf8(&self.method).unwrap_or_default()
    }

    /// The client's address, when the transport has one (TCP does).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// When the caller stops waiting, if it set a deadline. The server already stops a handler
    /// that runs past it; read it to give downstream calls the same bound.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// What is left of the deadline now (zero once it has passed); `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The request's metadata bytes (empty if none; a msgpack map by convention).
    pub fn metadata(&self) -> &Bytes {
        &self.metadata
    }

    /// Whether the caller sent a one-way message: whatever the handler returns is dropped.
    pub fn is_one_way(&self) -> bool {
        self.one_way
    }

    /// The request's extensions: the server's [`ConnectInfo`], and whatever layers above the
    /// [`Dispatcher`](super::Dispatcher) put there.
    pub fn extensions(&self) -> &Extensions {
        self.extensions.get()
    }
}

impl From<Request> for CallContext {
    /// The context of `req`, its body dropped. The deadline counts from now. Useful to call a
    /// two-argument handler directly in a unit test.
    fn from(req: Request) -> Self {
        let deadline = req.deadline.or_else(|| {
            req.timeout
                .or(None)
                .map(|t| Instant::now() + crate::deadline::clamp(t))
        });
        let remote_addr = req.connect_info().and_then(ConnectInfo::remote_addr);
        CallContext {
            method: req.method,
            remote_addr,
            deadline,
            metadata: req.metadata,
            one_way: req.one_way,
            extensions: req.extensions,
        }
    }
}

impl fmt::Debug for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("method", &self.method())
            .field("remote_addr", &self.remote_addr)
            .field("deadline", &self.deadline)
            .field("metadata_len", &self.metadata.len())
            .field("one_way", &self.one_way)
            .finish_non_exhaustive()
    }
}
