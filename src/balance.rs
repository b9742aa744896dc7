//! One client over many servers: tower's power-of-two-choices balancer ([`tower::balance::p2c`])
//! over a [`Client`] per server, fed by [`tower::discover`].
//!
//! Each server gets its own [`Client`], built from one [`client::Builder`](crate::client::Builder)
//! in wait-for-ready mode, so a server with no connection (dead, restarting, draining) is not
//! ready and the balancer routes around it; when its client reconnects, it is ready again and
//! rejoins. Between two ready servers picked at random the balancer prefers the one with fewer
//! calls awaiting replies ([`Client`]'s [`Load`](tower::load::Load)), so a slow server, which
//! accumulates them, gets fewer calls.
//!
//! The set of servers is:
//! - a fixed list: [`Balanced::fixed`];
//! - changed at run time through an [`Endpoints`] handle: [`Balanced::dynamic`];
//! - a DNS name re-resolved on an interval, which is how Kubernetes headless services and
//!   Consul publish endpoints: [`Balanced::dns`].
//!
//! Calls that die with their server fail as a call on one [`Client`] does; put the
//! [`retry::Policy`](crate::retry::Policy) layer on top to send the ones that cannot have run
//! (refused, or never written) to another server:
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use towerpc::{balance::Balanced, retry::Policy, Client};
//!
//! # async fn f() -> Result<(), towerpc::BoxError> {
//! let servers = ["10.0.0.1:7000".parse()?, "10.0.0.2:7000".parse()?];
//! let balanced = Balanced::fixed(Client::builder(), servers);
//! let svc = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(2))
//!     .retry(Policy::new())
//!     .service(balanced);
//! # Ok(()) }
//! ```
//!
//! A `Balanced` is cheap to clone: clones share the balancer, which runs on a task of its own
//! behind tower's `Buffer` (the balancer itself needs `&mut` for every call).
//!
//! A server that went away rejoins when its client's next dial succeeds, so the builder's
//! [`reconnect_backoff`](crate::client::Builder::reconnect_backoff) cap (default 120 s) bounds
//! how long a restarted server waits to be used again; a balanced set usually wants a cap of a
//! few seconds.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use pin_project_lite::pin_project;
use tokio::sync::mpsc;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change;
use tower::Service;

use crate::client::Builder;
use crate::error::Result;
use crate::{BoxError, Client, Error, Request, Response};

/// The default bound of calls queued for the balancer task (4,096); see
/// [`Balanced::dynamic_with_buffer`].
pub const DEFAULT_BUFFER: usize = 4096;

type Inner = Buffer<Request, <Balance<Discovered, Request> as Service<Request>>::Future>;

/// A client over a set of servers, balanced by tower's p2c on each server's pending calls.
///
/// It is a `Service<Request, Response = Response, Error = towerpc::Error>` and has the typed
/// shortcut [`Balanced::invoke`], like [`Client`]. See the [module docs](self).
#[derive(Clone)]
pub struct Balanced {
    inner: Inner,
}

/// Adds and removes servers of a [`Balanced`] made by [`Balanced::dynamic`].
///
/// Dropping every handle freezes the set as it is. The handle keeps a clone of each server's
/// client, so that a removed server can be closed gracefully; while it lives, so do the
/// connections of servers still in the set.
#[derive(Clone)]
pub struct Endpoints {
    tx: mpsc::UnboundedSender<Change<SocketAddr, Client>>,
    builder: Builder,
    clients: Arc<Mutex<HashMap<SocketAddr, Client>>>,
}

/// The stream of endpoint changes the balancer discovers services from.
pub struct Discovered {
    rx: mpsc::UnboundedReceiver<Change<SocketAddr, Client>>,
}

impl Stream for Discovered {
    type Item = std::result::Result<Change<SocketAddr, Client>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl fmt::Debug for Discovered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovered").finish_non_exhaustive()
    }
}

impl Balanced {
    /// A balanced client over a fixed list of servers. Each is dialed in the background;
    /// calls wait (up to their deadline) until one is up.
    ///
    /// Must be called within a tokio runtime.
    pub fn fixed(builder: Builder, servers: impl IntoIterator<Item = SocketAddr>) -> Balanced {
        let (balanced, endpoints) = Balanced::dynamic(builder);
        for addr in servers {
            endpoints.insert(addr);
        }
        balanced
    }

    /// A balanced client with no servers yet, and the handle that adds and removes them.
    ///
    /// Must be called within a tokio runtime.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use towerpc::{balance::Balanced, Client};
    ///
    /// # async fn f() -> Result<(), towerpc::BoxError> {
    /// let (client, endpoints) = Balanced::dynamic(Client::builder());
    /// endpoints.insert("10.0.0.1:7000".parse()?);
    /// endpoints.insert("10.0.0.2:7000".parse()?);
    /// endpoints.remove("10.0.0.1:7000".parse()?); // its calls in flight still complete
    /// # Ok(()) }
    /// ```
    pub fn dynamic(builder: Builder) -> (Balanced, Endpoints) {
        Balanced::dynamic_with_buffer(builder, DEFAULT_BUFFER)
    }

    /// Like [`Balanced::dynamic`], with `bound` calls queued for the balancer at most.
    ///
    /// Every call passes through the balancer's task (tower's `Buffer`), whose queue holds at
    /// most `bound` calls; a caller finding it full waits in `poll_ready`. Choose it at least as
    /// large as the number of callers that call at once, or they queue for the queue.
    pub fn dynamic_with_buffer(builder: Builder, bound: usize) -> (Balanced, Endpoints) {
        let (tx, rx) = mpsc::unbounded_channel();
        let balance = Balance::new(Discovered { rx });
        let balanced = Balanced {
            inner: Buffer::new(balance, bound.max(1)),
        };
        let builder = builder.wait_for_ready(true);
        let endpoints = Endpoints {
            tx,
            builder,
            clients: Arc::default(),
        };
        (balanced, endpoints)
    }

    /// A balanced client over the addresses `name` (`host:port`) resolves to, resolved again
    /// every `every`: addresses that appear are added, those that disappear are removed. A
    /// failed lookup keeps the set as it was.
    ///
    /// Must be called within a tokio runtime; the resolving task ends when the client and all
    /// its clones are gone.
    pub fn dns(builder: Builder, name: impl Into<String>, every: Duration) -> Balanced {
        let (balanced, endpoints) = Balanced::dynamic(builder);
        let name = name.into();
        tokio::spawn(async move {
            let mut known = HashSet::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if endpoints.tx.is_closed() {
                    return;
                }
                let found: HashSet<SocketAddr> = match tokio::net::lookup_host(&name).await {
                    Ok(addrs) => addrs.collect(),
                    Err(e) => {
                        tracing::debug!(%name, error = %e, "resolve failed; keeping the endpoints");
                        continue;
                    }
                };
                for gone in known.difference(&found) {
                    endpoints.remove(*gone);
                }
                for new in found.difference(&known) {
                    endpoints.insert(*new);
                }
                known = found;
            }
        });
        balanced
    }

    /// The typed shortcut, as [`Client::invoke`]: encodes `req` as msgpack, calls `method` on
    /// one of the servers and decodes the reply.
    pub async fn invoke<Req, Resp>(
        &self,
        method: impl Into<crate::Method>,
        req: &Req,
    ) -> Result<Resp>
    where
        Req: serde::Serialize + ?Sized,
        Resp: serde::de::DeserializeOwned,
    {
        use tower::ServiceExt;
        let body = crate::payload::to_msgpack(req)?;
        let resp = self.clone().oneshot(Request::new(method, body)).await?;
        crate::payload::from_msgpack(resp.body())
    }
}

impl Endpoints {
    /// Adds a server (dialed in the background); a server already there is replaced by a
    /// fresh client, and the old one is closed as [`Endpoints::remove`] does.
    pub fn insert(&self, addr: SocketAddr) {
        let client = self.builder.clone().connect_lazy(addr);
        let old = self.lock().insert(addr, client.clone());
        let _ = self.tx.send(Change::Insert(addr, client));
        if let Some(old) = old {
            retire(old);
        }
    }

    /// Removes a server: it gets no new calls; its calls in flight complete, and then its
    /// connection is closed ([`Client::close`]).
    pub fn remove(&self, addr: SocketAddr) {
        let old = self.lock().remove(&addr);
        let _ = self.tx.send(Change::Remove(addr));
        if let Some(old) = old {
            retire(old);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Client>> {
        // The map holds no invariant a panic could break.
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes a server's client once its calls in flight are answered.
fn retire(client: Client) {
    tokio::spawn(async move { client.close().await });
}

impl fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoints").finish_non_exhaustive()
    }
}

impl fmt::Debug for Balanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balanced").finish_non_exhaustive()
    }
}

impl Service<Request> for Balanced {
    type Response = Response;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.inner.poll_ready(cx).map_err(Error::from)
    }

    fn call(&mut self, req: Request) -> ResponseFuture {
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The future of a call through a [`Balanced`] client.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture {
        #[pin]
        inner: <Inner as Service<Request>>::Future,
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res: std::result::Result<Response, BoxError> = ready!(self.project().inner.poll(cx));
        Poll::Ready(res.map_err(Error::from))
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
