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
pub use self::typed::{Invoke, TypedFuture, TypedMethod};

pub use self::builder::{
    Builder, Overflow, DEFAULT_CONNECT_TIMEOUT, DEFAULT_FLUSH_DELAY, DEFAULT_PENDING_MESSAGES,
    DEFAULT_REPLY_SPIN, DEFAULT_REQUEST_TIMEOUT, DEFAULT_STALL_TIMEOUT,
};

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::{CancellationToken, PollSemaphore};
use tower::Service;

use self::future::ResponseFuture;
use self::pending::{timeout_ms, Phase, Refusal, Shared};
use crate::codec::Message;
use crate::error::{Error, Kind, Result};
use crate::stats::{Counters, Stats};
use crate::{Method, Request, Response};

/// A handle to a towerpc server: cheap to clone, safe to share among any number of tasks.
///
/// All clones share the client's connection (or its `connections(k)` connections) and its
/// pending-call table. `Client` is a `Service<Request, Response = Response>`, so tower layers
/// (timeouts, retries, concurrency limits, load shedding, balancing) stack on it, and it
/// implements [`tower::load::Load`] (its live calls) for balancers. [`Client::invoke`] is the
/// typed shortcut.
///
/// # Calling: `invoke` or `Service::call`
///
/// The typed shortcut is named `invoke`, not `call`, so that with `use tower::Service` in scope
/// `client.call(request)` on an owned client is tower's `Service::call`, as on any service.
///
/// # Fail-fast or wait-for-ready
///
/// By default a call made while there is no connection (dialing failed and the client is
/// backing off, or the server is draining this connection) fails at once with an
/// [`is_unavailable()`](Error::is_unavailable) error that names the server, and `poll_ready`
/// does not wait for a connection. With [`Builder::wait_for_ready`] such a call waits for a
/// connection instead, up to its own deadline, and `poll_ready` is pending until one is up.
/// Either way, [`Load`](tower::load::Load) reports a client with no connection as the worst
/// endpoint there is.
///
/// When the last clone is dropped the connection is closed and pending calls fail;
/// [`Client::close`] closes gracefully.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> towerpc::Result<()> {
/// let client = towerpc::Client::builder().connect("127.0.0.1:7000").await?;
/// let sum: i64 = client.invoke("Calc.Add", &(2, 3)).await?;
/// # Ok(()) }
/// ```
pub struct Client {
    handle: Arc<Handle>,
    /// The slot `poll_ready` reserved for the next `call` (backpressure mode).
    permit: Option<OwnedSemaphorePermit>,
    /// What a `poll_ready` that had to wait polls; boxed, as most clones never wait (and
    /// callers often hold a clone each).
    waiting: Option<Box<Waiting>>,
}

/// A clone's state while its `poll_ready` waits.
#[derive(Default)]
struct Waiting {
    /// For a free slot (backpressure mode).
    permits: Option<PollSemaphore>,
    /// For a connection to come up (wait-for-ready).
    up: Option<WatchStream<usize>>,
}

/// Closes the client when the last clone goes.
///
/// Aligned to 128 bytes so that, in its `Arc`, the reference counts (written by every clone
/// and drop of a `Client`, often one per call, on any thread) are not on the lines of the
/// fields that every call reads.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Handle {
    /// One engine per connection; almost always one.
    conns: Box<[Arc<Shared>]>,
    /// Slots of the pending table, under backpressure.
    permits: Option<Arc<Semaphore>>,
    /// How many connections are up.
    health: Arc<watch::Sender<usize>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        for shared in self.conns.iter() {
            shared.closed.cancel();
        }
    }
}

impl Clone for Client {
    fn clone(&self) -> Self {
        // A clone starts without a reserved slot: readiness belongs to the handle that polled
        // for it (tower's `Service` contract).
        Client {
            handle: self.handle.clone(),
            permit: None,
            waiting: None,
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.handle.config().target)
            .field("connections", &self.handle.conns.len())
            .finish_non_exhaustive()
    }
}

/// A connection's load for [`Handle::pick`]: its live calls while it is up; above
/// [`CONNECTING`] while it dials (it still queues calls); the most otherwise (it refuses them).
fn load(shared: &Shared) -> usize {
    let inner = shared.lock();
    match inner.phase {
        Phase::Connected => inner.live,
        Phase::Connecting => CONNECTING + inner.live,
        _ => usize::MAX - 1,
    }
}

/// Loads from this value up are connections that are not up.
const CONNECTING: usize = usize::MAX / 2;

impl Handle {
    fn config(&self) -> &builder::Config {
        &self.conns[0].config
    }

    /// The connection a new call goes on: of two chosen at random, the one with fewer live
    /// calls (the power of two choices, as tower's balancer; with two connections, both). Only
    /// when neither is up does it look at every connection. Each look takes a connection's
    /// lock; comparing all K cost every call K locks. With 8 connections on one core a side
    /// (`bench/pinned.sh`, paired): 1.46–1.47M → 1.52–1.55M calls/s, p99 7.4–7.9 → 4.0–4.3 ms;
    /// what is left of the gap to one connection (2.05–2.10M) is 8 writers' smaller batches.
    fn pick(&self) -> &Arc<Shared> {
        let n = self.conns.len();
        if n == 1 {
            return &self.conns[0];
        }
        let (a, b) = if n == 2 {
            (0, 1)
        } else {
            let a = fastrand::usize(..n);
            (a, (a + 1 + fastrand::usize(..n - 1)) % n)
        };
        let (la, lb) = (load(&self.conns[a]), load(&self.conns[b]));
        let (best, best_load) = if lb < la { (b, lb) } else { (a, la) };
        if best_load < CONNECTING || n == 2 {
            return &self.conns[best];
        }
        let mut best = &self.conns[best];
        let mut best_load = best_load;
        for shared in self.conns.iter() {
            let load = load(shared);
            if load < best_load {
                best = shared;
                best_load = load;
            }
        }
        best
    }

    /// Queues a call on a connection, or says it must wait for one (wait-for-ready). With
    /// `queue`, a default deadline goes in the connection's deadline queue, and the returned
    /// flag says the caller needs no timer of its own.
    pub(crate) fn try_start(
        &self,
        req: &mut Request,
        deadline: Option<Instant>,
        now: Instant,
        queue: bool,
    ) -> std::result::Result<(future::Started, bool), Refusal> {
        let shared = self.pick();
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(now);
                if left.is_zero() {
                    return Err(Refusal::Fail(timed_out(shared)));
                }
                Some(left)
            }
            None => None,
        };
        let queue = deadline.filter(|_| queue);
        let (id, gen, rx, queued) =
            shared.start(req, timeout, queue, shared.config.wait_for_ready)?;
        Ok(((shared.clone(), id, gen, rx), queued))
    }

    /// A receiver of connection-count changes, marked as having seen the current count.
    pub(crate) fn changes(&self) -> WatchStream<usize> {
        WatchStream::from_changes(self.health.subscribe())
    }

    pub(crate) fn is_up(&self) -> bool {
        *self.health.borrow() > 0
    }

    /// Closed, or closing: waiting for a connection is over, calls fail with `is_closed()`.
    pub(crate) fn is_closed(&self) -> bool {
        self.conns
            .iter()
            .all(|s| s.closed.is_cancelled() || s.lock().closing)
    }
}

/// A call's `max_pending` slot under backpressure, from when it is taken until the call is in
/// the in-flight table, which then holds it (see `Shared::permits`).
pub(crate) enum Permit {
    /// No slots are counted: overflow fails the oldest call.
    Uncounted,
    /// Taken by `poll_ready`, or by a call that waited for one.
    Owned(OwnedSemaphorePermit),
    /// Taken at once by a call that found one free, as a count only: whoever holds it gives
    /// it back with [`Permit::give_back`] if the call does not start.
    Taken,
}

impl Permit {
    /// The call is in the in-flight table, which holds its slot now.
    pub(crate) fn give_to_table(self) {
        if let Permit::Owned(permit) = self {
            permit.forget();
        }
    }

    /// The call did not start: its slot goes back (an owned permit's as it drops here).
    pub(crate) fn give_back(self, handle: &Handle) {
        if let (Permit::Taken, Some(sem)) = (self, &handle.permits) {
            sem.add_permits(1);
        }
    }
}

/// A call's deadline passed: counted, and said with the server's name.
fn timed_out(shared: &Shared) -> Error {
    Counters::inc(&shared.counters.timeouts);
    Error::new(Kind::Timeout).target(shared.config.target.as_ref())
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
    ) -> (Client, Vec<oneshot::Receiver<Result<()>>>)
    where
        C: Service<T> + Clone + Send + 'static,
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
        let health = Arc::new(watch::Sender::new(0));
        let counters = Arc::new(Counters::default());
        let k = config.connections;
        let mut conns = Vec::with_capacity(k);
        let mut firsts = Vec::with_capacity(k);
        for _ in 0..k {
            let shared = Arc::new(Shared::new(
                config.clone(),
                health.clone(),
                counters.clone(),
                permits.clone(),
            ));
            let (tx, rx) = oneshot::channel();
            tokio::spawn(connection::run(
                shared.clone(),
                connector.clone(),
                target.clone(),
                tx,
            ));
            conns.push(shared);
            firsts.push(rx);
        }
        let client = Client {
            handle: Arc::new(Handle {
                conns: conns.into_boxed_slice(),
                permits,
                health,
            }),
            permit: None,
            waiting: None,
        };
        (client, firsts)
    }

    /// Calls `method` with `req` encoded as msgpack (named fields) and decodes the reply: the
    /// typed shortcut, as gorpc's `Client.Call`. The name is a `&'static str` (used without
    /// copying) or a `String` known only at run time; [`Client::method`] makes a reusable
    /// typed handle (a tower `Service<Req>`) instead.
    ///
    /// Waits for a free slot if `max_pending` calls are pending (see [`Overflow`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(client: towerpc::Client) -> towerpc::Result<()> {
    /// let sum: i64 = client.invoke("Calc.Add", &(2, 3)).await?;
    /// # Ok(()) }
    /// ```
    pub fn invoke<'a, Req, Resp>(
        &'a self,
        method: impl Into<Method>,
        req: &'a Req,
    ) -> Invoke<'a, Req, Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        Invoke::new(self, method.into(), req)
    }

    /// Sends a raw [`Request`] and waits for its reply, without `poll_ready`.
    ///
    /// Nothing happens until the future is first polled: the call starts then, in the deadline
    /// and trace scopes the poll runs in. When `max_pending` calls are pending it waits for a
    /// free slot first (see [`Overflow`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(client: towerpc::Client) -> towerpc::Result<()> {
    /// use towerpc::Request;
    ///
    /// let reply = client.request(Request::new("Echo", "raw bytes")).await?;
    /// assert_eq!(reply.body().as_ref(), b"raw bytes");
    /// # Ok(()) }
    /// ```
    pub async fn request(&self, req: Request) -> Result<Response> {
        self.start_call(req).await
    }

    /// Starts a call now (waiting for a slot in the returned future if none is free). The
    /// future carries no request and no acquire future beside the call, so the futures of
    /// `request` and `invoke` stay small.
    fn start_call(&self, req: Request) -> ResponseFuture {
        let permit = match &self.handle.permits {
            // A free slot is the common case: take it without building an acquire future (or
            // cloning the semaphore's `Arc`, as an owned permit would).
            Some(sem) => match sem.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    Permit::Taken
                }
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    return self.wait_for_slot(req, sem.clone())
                }
                Err(tokio::sync::TryAcquireError::Closed) => {
                    return ResponseFuture::ready(Err(Error::new(Kind::Closed)))
                }
            },
            None => Permit::Uncounted,
        };
        self.start(req, permit)
    }

    /// Sends a one-way message: returns once it is queued for the wire. The server runs the
    /// handler and replies nothing, so errors on the server side are not reported.
    /// [`Client::close`] waits until queued messages are written.
    pub fn send<Req>(&self, method: impl Into<Method>, req: &Req) -> Result<()>
    where
        Req: Serialize + ?Sized,
    {
        let body = crate::payload::to_msgpack(req)?;
        self.send_raw(Request::new(method, body))
    }

    fn send_raw(&self, mut req: Request) -> Result<()> {
        continue_trace(&mut req);
        let shared = self.handle.pick();
        let now = Instant::now();
        let timeout = resolve_deadline(&req, shared.config.timeout, now)
            .map(|d| d.saturating_duration_since(now).max(MIN_WIRE_TIMEOUT));
        shared.send_one_way(Message::OneWay {
            timeout_ms: timeout_ms(timeout),
            method: req.method,
            metadata: req.metadata,
            body: req.body,
        })
    }

    /// A call that found every slot taken (`max_pending` calls pending, `Overflow::Backpressure`):
    /// its deadline runs, and its token may cancel it, from now on, while it waits for a slot.
    fn wait_for_slot(&self, mut req: Request, slots: Arc<Semaphore>) -> ResponseFuture {
        let (deadline, cancel) = self.made_at(&mut req, Instant::now());
        ResponseFuture::acquiring(self.clone(), req, slots, deadline, cancel)
    }

    pub(crate) fn start(&self, mut req: Request, permit: Permit) -> ResponseFuture {
        // One clock read per call: its deadline counts from the same instant it starts at.
        let now = Instant::now();
        let (deadline, cancel) = self.made_at(&mut req, now);
        self.start_by(req, permit, deadline, cancel, now)
    }

    /// What a call made at `now` must end by, and its cancellation token, taken out of `req`.
    fn made_at(
        &self,
        req: &mut Request,
        now: Instant,
    ) -> (Option<Instant>, Option<CancellationToken>) {
        let deadline = resolve_deadline(req, self.handle.config().timeout, now);
        (deadline, req.cancel.take())
    }

    /// Starts a call, at `now`, that must be over by `deadline` (resolved when it was made,
    /// which for a call that waited for a slot was before the wait).
    pub(crate) fn start_by(
        &self,
        mut req: Request,
        permit: Permit,
        deadline: Option<Instant>,
        cancel: Option<CancellationToken>,
        now: Instant,
    ) -> ResponseFuture {
        if req.one_way {
            permit.give_back(&self.handle);
            return ResponseFuture::ready(self.send_raw(req).map(|()| Response::default()));
        }
        continue_trace(&mut req);
        if cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            permit.give_back(&self.handle);
            return ResponseFuture::ready(Err(Error::new(Kind::Cancelled)));
        }
        // Before the start, which takes the method out of the request.
        let trace = future::Trace::start(&req, &self.handle.conns[0]);
        match self.handle.try_start(&mut req, deadline, now, true) {
            Ok((started, queued)) => {
                permit.give_to_table();
                // A deadline in the connection's queue needs no timer here.
                let timer = deadline.filter(|_| !queued);
                ResponseFuture::waiting(started, timer, cancel, trace)
            }
            Err(Refusal::Fail(e)) => {
                permit.give_back(&self.handle);
                ResponseFuture::ready(Err(e))
            }
            Err(Refusal::Park) => {
                ResponseFuture::parked(self.handle.clone(), req, permit, deadline, cancel)
            }
        }
    }

    /// Closes the client gracefully: new calls fail at once with an `is_closed()` error, calls
    /// already made finish (each within its own deadline), queued one-way messages are
    /// written, and then the connection is closed. Resolves when all of that is done.
    ///
    /// Every clone is closed. Without a connection (dialing or backing off) the client closes
    /// at once and what is queued is dropped.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(client: towerpc::Client) -> towerpc::Result<()> {
    /// client.send("Log.Append", "shutting down")?;
    /// client.close().await; // the message is on the wire before this returns
    /// # Ok(()) }
    /// ```
    pub async fn close(&self) {
        for shared in self.handle.conns.iter() {
            shared.close();
        }
        for shared in self.handle.conns.iter() {
            shared.finished.cancelled().await;
        }
    }

    /// A snapshot of this client's counters (summed over its connections).
    pub fn stats(&self) -> Stats {
        self.handle.conns[0].counters.snapshot()
    }

    /// Calls awaiting replies right now, including abandoned ones whose ids are still reserved.
    pub fn pending(&self) -> usize {
        self.handle.conns.iter().map(|s| s.in_flight()).sum()
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.handle.is_up()
    }
}

/// Carries the trace context of the scope the call is made in (a handler's caller's), as a
/// child, in the request's metadata, unless the request already has one.
fn continue_trace(req: &mut Request) {
    let Some(ctx) = crate::trace::current() else {
        return;
    };
    if crate::trace::TraceContext::from_metadata(&req.metadata).is_none() {
        req.metadata = ctx.child().inject(&req.metadata);
    }
}

/// The shortest timeout sent for a call whose deadline has nearly passed (zero would mean
/// "none" on the wire).
const MIN_WIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1);

/// When a call must be over: its own timeout (or the client's default), and no later than the
/// deadline of the server call being handled by this task, if any.
fn resolve_deadline(
    req: &Request,
    default: Option<std::time::Duration>,
    now: Instant,
) -> Option<Instant> {
    deadline_for(req.timeout.or(default), now)
}

/// When a call made at `now` with timeout `own` must be over, given the deadline it inherits,
/// if any.
pub(crate) fn deadline_for(own: Option<std::time::Duration>, now: Instant) -> Option<Instant> {
    let inherited = crate::deadline::current();
    let own = own.map(|t| now + crate::deadline::clamp(t));
    match (own, inherited) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Service<Request> for Client {
    type Response = Response;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.handle.config().wait_for_ready && !self.handle.is_up() {
            let waiting = self.waiting.get_or_insert_with(Box::default);
            let changes = waiting.up.get_or_insert_with(|| self.handle.changes());
            loop {
                // Checked after the stream exists, so a change in between is not missed. A
                // closed client is "ready": its calls fail at once with `is_closed()`.
                if self.handle.is_up() || self.handle.is_closed() {
                    break;
                }
                match std::pin::Pin::new(&mut *changes).poll_next(cx) {
                    Poll::Ready(Some(_)) => continue,
                    Poll::Ready(None) => return Poll::Ready(Err(Error::new(Kind::Closed))),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        let Some(sem) = &self.handle.permits else {
            return Poll::Ready(Ok(()));
        };
        if self.permit.is_some() {
            return Poll::Ready(Ok(()));
        }
        if self.waiting.as_ref().is_none_or(|w| w.permits.is_none()) {
            // A free slot is the common case, and tower stacks often clone the service for
            // every call (`svc.clone().oneshot(req)`): take it without building the (boxed)
            // acquire future a waiting poll needs.
            if let Ok(permit) = sem.clone().try_acquire_owned() {
                self.permit = Some(permit);
                return Poll::Ready(Ok(()));
            }
        }
        let poll = self
            .waiting
            .get_or_insert_with(Box::default)
            .permits
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
            Some(_) => Permit::Owned(
                self.permit
                    .take()
                    .expect("Client::call called before poll_ready returned Ready"),
            ),
            None => Permit::Uncounted,
        };
        self.start(req, permit)
    }
}

impl tower::load::Load for Client {
    /// Live calls on the client's connections; `usize::MAX` while none is up.
    type Metric = usize;

    /// Calls awaiting replies: a slow or stuck server accumulates them, so a balancer that
    /// prefers the lower load sends it less. (Wrap clients in tower's `PeakEwma` for a
    /// latency-based signal instead; pending calls need no clock and react at once.) A client
    /// with no connection up reports `usize::MAX`, so it is chosen only when nothing else is.
    fn load(&self) -> usize {
        if !self.handle.is_up() {
            return usize::MAX;
        }
        self.handle.conns.iter().map(|s| s.live()).sum()
    }
}
