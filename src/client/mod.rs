//! The client: one pipelined connection shared by every clone, as a tower [`Service`].
//!
//! Every call from every clone goes into one outbox; a background writer drains it into one
//! write per batch, and a background reader matches replies to callers by request id, in any
//! order. The connection is dialed, watched for stalls and redialed (with backoff) in the
//! background; a call made while there is no connection fails at once with an error that names
//! the server's address.

mod backoff;
mod batch;
mod builder;
mod connection;
pub mod future;
mod pending;
mod typed;

pub use self::batch::{Batch, FromReply, Replies, Slot};
pub use self::typed::{TypedFuture, TypedMethod};

pub use self::builder::{
    Builder, Overflow, DEFAULT_CONNECT_TIMEOUT, DEFAULT_FLUSH_DELAY, DEFAULT_PENDING_MESSAGES,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_STALL_TIMEOUT,
};

use std::sync::Arc;
use std::task::{Context, Poll};

use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;
use tower::Service;

use self::future::ResponseFuture;
use self::pending::Shared;
use crate::codec::Message;
use crate::error::{Error, Kind, Result};
use crate::stats::Stats;
use crate::{Method, Request, Response};

/// A handle to a towerpc server: cheap to clone, safe to share among any number of tasks.
///
/// All clones share one connection and one pending-call table. `Client` is a
/// `Service<Request, Response = Response>`, so tower layers (timeouts, retries, concurrency
/// limits, load shedding) stack on it; [`Client::call`] is the typed shortcut.
///
/// When the last clone is dropped the connection is closed and pending calls fail.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> towerpc::Result<()> {
/// let client = towerpc::Client::builder().connect("127.0.0.1:7000").await?;
/// let sum: i64 = client.call("Calc.Add", &(2, 3)).await?;
/// # Ok(()) }
/// ```
pub struct Client {
    handle: Arc<Handle>,
    /// Per-clone readiness for `poll_ready` (backpressure mode).
    poll_permits: Option<PollSemaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

/// Closes the client when the last clone goes.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    /// Slots of the pending table, under backpressure.
    permits: Option<Arc<Semaphore>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.closed.cancel();
    }
}

impl Clone for Client {
    fn clone(&self) -> Self {
        // A clone starts without a reserved slot: readiness belongs to the handle that polled
        // for it (tower's `Service` contract).
        Client {
            handle: self.handle.clone(),
            poll_permits: None,
            permit: None,
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.handle.shared.config.target)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// Connects to `addr` with the defaults; see [`Builder::connect`].
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> Result<Client> {
        Builder::new().connect(addr).await
    }

    fn spawn<C, T>(
        config: builder::Config,
        connector: C,
        target: T,
    ) -> (Client, oneshot::Receiver<Result<()>>)
    where
        C: Service<T> + Send + 'static,
        C::Response: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + crate::transport::Connected
            + Send
            + Unpin
            + 'static,
        C::Error: Into<crate::BoxError>,
        C::Future: Send,
        T: Clone + std::fmt::Debug + Send + Sync + 'static,
    {
        let permits = (!config.fail_oldest).then(|| Arc::new(Semaphore::new(config.max_pending)));
        let shared = Arc::new(Shared::new(config));
        let (tx, rx) = oneshot::channel();
        tokio::spawn(connection::run(shared.clone(), connector, target, tx));
        let client = Client {
            handle: Arc::new(Handle { shared, permits }),
            poll_permits: None,
            permit: None,
        };
        (client, rx)
    }

    /// Calls `method` with `req` encoded as msgpack (named fields) and decodes the reply.
    /// The name is a `&'static str` (used without copying) or a `String` known only at run
    /// time; [`Client::method`] makes a reusable typed handle instead.
    ///
    /// Waits for a free slot if `max_pending` calls are pending (see [`Overflow`]).
    pub async fn call<Req, Resp>(&self, method: impl Into<Method>, req: &Req) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let body = crate::codec::to_msgpack(req)?;
        let resp = self.request(Request::new(method, body)).await?;
        crate::codec::from_msgpack(resp.body())
    }

    /// Sends a raw [`Request`] and waits for its reply, without `poll_ready`.
    pub async fn request(&self, req: Request) -> Result<Response> {
        let permit = match &self.handle.permits {
            // A free slot is the common case: take it without building an acquire future.
            Some(sem) => Some(match sem.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => sem
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::new(Kind::Closed))?,
            }),
            None => None,
        };
        self.start(req, permit).await
    }

    /// Sends a one-way message: returns once it is queued for the wire. The server runs the
    /// handler and replies nothing, so errors on the server side are not reported.
    pub fn send<Req>(&self, method: impl Into<Method>, req: &Req) -> Result<()>
    where
        Req: Serialize + ?Sized,
    {
        let body = crate::codec::to_msgpack(req)?;
        self.send_raw(Request::new(method, body))
    }

    fn send_raw(&self, req: Request) -> Result<()> {
        let shared = &self.handle.shared;
        let timeout = req.timeout.unwrap_or(shared.config.timeout);
        shared.send_one_way(Message::OneWay {
            timeout_ms: timeout_ms(timeout),
            method: req.method,
            metadata: req.metadata,
            body: req.body,
        })
    }

    fn start(&self, req: Request, permit: Option<OwnedSemaphorePermit>) -> ResponseFuture {
        if req.one_way {
            return ResponseFuture::ready(self.send_raw(req).map(|()| Response::default()));
        }
        let shared = &self.handle.shared;
        let timeout = req.timeout.unwrap_or(shared.config.timeout);
        let (tx, rx) = oneshot::channel();
        let Request {
            method,
            body,
            metadata,
            ..
        } = req;
        let started = shared.start(
            |id| Message::Request {
                id,
                timeout_ms: timeout_ms(timeout),
                method,
                metadata,
                body,
            },
            tx,
        );
        match started {
            Ok((id, gen)) => ResponseFuture::waiting(shared.clone(), id, gen, rx, permit, timeout),
            Err(e) => ResponseFuture::ready(Err(e)),
        }
    }

    /// A snapshot of this client's counters.
    pub fn stats(&self) -> Stats {
        self.handle.shared.counters.snapshot()
    }

    /// Calls awaiting replies right now, including abandoned ones whose ids are still reserved.
    pub fn pending(&self) -> usize {
        self.handle.shared.in_flight()
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        matches!(self.handle.shared.lock().phase, pending::Phase::Connected)
    }
}

fn timeout_ms(timeout: Option<std::time::Duration>) -> u32 {
    match timeout {
        // Round up so a short deadline never reaches the server as "none" (0).
        Some(t) => t.as_micros().div_ceil(1000).clamp(1, u32::MAX as u128) as u32,
        None => 0,
    }
}

impl Service<Request> for Client {
    type Response = Response;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let Some(sem) = &self.handle.permits else {
            return Poll::Ready(Ok(()));
        };
        if self.permit.is_some() {
            return Poll::Ready(Ok(()));
        }
        let poll = self
            .poll_permits
            .get_or_insert_with(|| PollSemaphore::new(sem.clone()));
        match poll.poll_acquire(cx) {
            Poll::Ready(Some(permit)) => {
                self.permit = Some(permit);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(None) => Poll::Ready(Err(Error::new(Kind::Closed))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request) -> ResponseFuture {
        let permit = match self.handle.permits {
            Some(_) => Some(
                self.permit
                    .take()
                    .expect("Client::call called before poll_ready returned Ready"),
            ),
            None => None,
        };
        self.start(req, permit)
    }
}
