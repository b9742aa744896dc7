//! One server connection after its handshake: a reader that runs each request's handler (on
//! the reader itself while handlers answer at once, else on a task of its own), and a writer
//! that batches the replies.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

use super::budget::{Account, Budget, RECHECK};
use super::flood::{Flood, RAPID_CANCEL};
use super::handler::{HandlerTask, Spawned, TaskBox};
use super::keepalive::{Due, Keepalive};
use super::recover::status_from_error;
use super::Config;
use crate::codec::{code, Batch, CodecError, Compression, FrameCodec, Message, Outbox, Preface};
use crate::conn::{
    wire, write_loop, FrameReader, Padded, ReadGate, Source, Spin, WindowGate, WriteOptions,
    MAX_BATCH_YIELDS, MESSAGE_CHUNK,
};
use crate::error::{Code, Status};
use crate::protocol::{self, error_message};
use crate::request::LazyExtensions;
use crate::stats::Counters;
use crate::transport::ConnectInfo;
use crate::{BoxError, Request, Response};

/// A request whose handler runs.
#[derive(Debug)]
struct InFlight {
    /// The handler's task; `None` while the reader runs the handler's first poll itself.
    handle: Option<AbortHandle>,
    /// When its frame was read: a cancel soon after costs the server a spawn for nothing.
    arrived: tokio::time::Instant,
}

impl InFlight {
    fn abort(&self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// State shared by the reader, the writer and the handlers of one connection.
#[derive(Debug)]
pub(super) struct Conn {
    inner: Padded<Mutex<Inner>>,
    notify_writer: Padded<Notify>,
    /// Replies answered on the reader's first poll queued while the writer may be asleep: the
    /// reader wakes it once it is done with the frame (or is about to wait), so that a frame's
    /// replies leave together and the writer's thread is woken once, not per reply.
    wake_deferred: AtomicBool,
    /// The writer took the outbox: a reader paused on `max_queued_bytes` may go on.
    notify_taken: Notify,
    /// Request bytes held by running handlers (see `Server::max_in_flight_bytes`).
    pub(super) in_flight_bytes: AtomicUsize,
    /// Reply bytes the writer took and is writing.
    writing: AtomicUsize,
    /// Request bytes the reader holds of a frame it is still reading.
    reading: AtomicUsize,
    /// The server-wide budget, and what this connection holds of it.
    budget: Arc<Budget>,
    account: Account,
    /// `Server::max_queued_bytes`, and the client's frame limit.
    max_queued_bytes: usize,
    max_frame_len: usize,
    /// Closed by the budget (see `condemn`); the reader stops.
    condemned: AtomicBool,
    /// The connection went quiet (`keepalive::QUIET`): the writer lets go of its buffers
    /// before it sleeps again.
    quiet: AtomicBool,
    /// The reader is paused: fragments go out past the client's window (see `pace`).
    unpaced: AtomicBool,
    /// A handler finished and released its request bytes.
    pub(super) notify_freed: Notify,
    /// Calls answered by their handlers: what earns a client its cancels (see `Flood`).
    answered: AtomicU64,
    pub(super) counters: Arc<Counters>,
}

#[derive(Debug)]
struct Inner {
    outbox: Outbox,
    /// Requests awaiting a reply. Whoever removes an id (the handler finishing, a cancel, the
    /// grace deadline) is the one that sends its single reply.
    in_flight: HashMap<u32, InFlight>,
    /// No more requests will be read; the writer stops once the outbox is empty.
    closing: bool,
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accounts what the connection holds now (`queued` reply bytes in the outbox) into the
    /// server-wide budget; returns it.
    fn account(&self, queued: usize) -> usize {
        let held = queued
            + self.writing.load(Ordering::Relaxed)
            + self.reading.load(Ordering::Relaxed)
            + self.in_flight_bytes.load(Ordering::Relaxed);
        self.account.set(&self.budget, held);
        held
    }

    /// Reply bytes queued now, and what the connection holds in all (accounted into the
    /// server-wide budget).
    fn held_now(&self) -> (usize, usize) {
        let queued = self.lock().outbox.len();
        (queued, self.account(queued))
    }

    /// Whether the writer has nothing it may send until the client's ACKs give its fragments
    /// window back (or nothing at all).
    fn waits_for_window(&self) -> bool {
        self.lock().outbox.is_empty()
    }

    /// Queues `msg`; wakes the writer if it may be asleep.
    fn push(&self, inner: &mut Inner, msg: &Message) -> bool {
        let was_empty = inner.outbox.is_empty();
        match inner.outbox.push(msg) {
            Ok(()) => was_empty,
            Err(e) => {
                tracing::debug!(error = %e, "reply refused by the encoder");
                false
            }
        }
    }

    fn push_now(&self, msg: &Message) {
        let mut inner = self.lock();
        let wake = self.push(&mut inner, msg);
        drop(inner);
        if wake {
            self.notify_writer.notify_one();
        }
    }

    /// Keeps our fragments to the client's window (`true`), or stops while the reader does not
    /// read (PROTOCOL.md §4.1).
    fn pace(&self, paced: bool) {
        if self.unpaced.load(Ordering::Relaxed) != paced {
            return;
        }
        self.unpaced.store(!paced, Ordering::Relaxed);
        if self.lock().outbox.pace(paced) {
            self.notify_writer.notify_one();
        }
    }

    /// The client read `bytes` of our fragments: the writer may send more.
    fn ack(&self, bytes: u32) -> Option<Stop> {
        let wake = match self.lock().outbox.ack(bytes) {
            Ok(wake) => wake,
            Err(e) => return Some(Stop::Protocol(e)),
        };
        if wake {
            self.notify_writer.notify_one();
        }
        None
    }

    /// Answers request `id` without running it; an id already in flight is a protocol error.
    fn answer_at_once(&self, id: u32, msg: &Message) -> Option<Stop> {
        let mut inner = self.lock();
        if inner.in_flight.contains_key(&id) {
            return Some(Stop::Protocol(DUPLICATE));
        }
        let wake = self.push(&mut inner, msg);
        drop(inner);
        if wake {
            self.notify_writer.notify_one();
        }
        None
    }

    /// Sends the one reply for `id`, unless someone else (a cancel) already did. `entered`: the
    /// call is in flight (see `Ctx::spawn`); one answered on the reader's first poll is not.
    pub(super) fn reply(&self, id: u32, reply: std::result::Result<Bytes, Status>, entered: bool) {
        let mut inner = self.lock();
        let answered_by_someone = if entered {
            inner.in_flight.remove(&id).is_none()
        } else {
            self.condemned.load(Ordering::Acquire)
        };
        if answered_by_someone {
            return;
        }
        self.answered.fetch_add(1, Ordering::Relaxed);
        let msg = match reply {
            Ok(body) => Message::Response { id, body },
            Err(status) => error_message(id, &status),
        };
        let was_empty = inner.outbox.is_empty();
        let wake = match inner.outbox.push(&msg) {
            Ok(()) => was_empty,
            Err(e) => {
                // Too big for the client's frame limit: say so instead of leaving it hanging.
                let status = Status::new(Code::ResourceExhausted, e.to_string());
                self.push(&mut inner, &error_message(id, &status))
            }
        };
        // The reader checks the budget before each frame, but the replies of calls already
        // running keep coming while it waits: a backlog past the cap is checked here too.
        let queued = inner.outbox.len();
        if queued > self.max_queued_bytes && self.budget.must_close(self.account(queued)) {
            self.condemn(&mut inner);
            drop(inner);
            self.notify_writer.notify_one();
            return;
        }
        drop(inner);
        if wake && !entered {
            // On the reader, which wakes the writer when it is done with the frame.
            self.wake_deferred.store(true, Ordering::Relaxed);
        } else if wake {
            self.notify_writer.notify_one();
        }
    }

    /// Wakes the writer for the replies the reader queued, if it deferred a wake-up.
    fn wake_writer_now(&self) {
        if self.wake_deferred.load(Ordering::Relaxed)
            && self.wake_deferred.swap(false, Ordering::AcqRel)
        {
            self.notify_writer.notify_one();
        }
    }

    /// Closes a connection whose client does not read its replies while the server is out of
    /// budget: its running calls are stopped, its queued replies dropped (nobody reads them)
    /// for a GOAWAY RESOURCE_EXHAUSTED, and its reader stops at its next look.
    fn condemn(&self, inner: &mut Inner) {
        if self.condemned.swap(true, Ordering::AcqRel) {
            return;
        }
        Counters::inc(&self.counters.protocol_errors);
        for (_, call) in inner.in_flight.drain() {
            call.abort();
        }
        inner.outbox = Outbox::new(self.max_frame_len, 0);
        let goaway = protocol::goaway(code::RESOURCE_EXHAUSTED, CONDEMNED);
        let _ = inner.outbox.push_last(&goaway);
        inner.closing = true;
        self.account(0);
    }
}

/// Most messages in the last frame for which the reader spins (`Server::read_spin`), when
/// that frame carried no fragments either. A frame of hundreds of requests shares its wake-up
/// among them, and the CPU a spin would take is what the client's callers need: on two shared
/// cores, spinning after any frame made 1,000 callers 36 % faster but their p99 3.9 ms against
/// 2.2, the client's worker threads preempted by the spinning one; after frames of at most 64
/// messages, 1,000 callers ran as without the spin, and 100 or 300 callers 13–24 % faster
/// (docs/benchmarks.md, session 12). A connection moving a large message moves bytes and does
/// not wait on round trips: spinning there took 6–25 % of the big calls' throughput in the
/// mixed cell.
const SPIN_MAX_MESSAGES: usize = 64;

/// How far past `max_queued_bytes` a connection's replies may queue while its client reads them:
/// from the cap up to this many times it, the reader reads a frame of requests for each batch
/// the writer sends (frames of control messages cost nothing), and any frame while the writer
/// waits for the client's ACKs, instead of pausing until the queue is back under the cap.
/// Paused, ten callers downloading 4 MiB replies beside 1,000 small callers made the small
/// calls wait for the large replies to drain (docs/benchmarks.md, session 21); throttled, they
/// go on.
const THROTTLE_UP_TO: usize = 4;

/// Why a connection was closed by the server-wide budget.
const CONDEMNED: &str = "server memory budget exceeded: replies are not read";

struct ConnSource(Arc<Conn>);

impl Source for ConnSource {
    fn take(&self, spare: Batch) -> Option<Batch> {
        let mut inner = self.0.lock();
        if inner.closing && inner.outbox.is_drained() {
            return None;
        }
        let buf = inner.outbox.take(spare);
        let queued = inner.outbox.len();
        drop(inner);
        // The batch taken before this one has been written.
        self.0.writing.store(buf.len(), Ordering::Relaxed);
        self.0.account(queued);
        self.0.notify_taken.notify_one();
        Some(buf)
    }

    fn pending_len(&self) -> usize {
        self.0.lock().outbox.len()
    }

    fn quiet(&self) -> bool {
        if !self.0.quiet.load(Ordering::Relaxed) || !self.0.quiet.swap(false, Ordering::Relaxed) {
            return false;
        }
        self.0.lock().outbox.release_buffer();
        true
    }

    fn batch_yields(&self) -> usize {
        // A handler still running will reply; with none left, every reply is already queued.
        if self.0.lock().in_flight.is_empty() {
            0
        } else {
            MAX_BATCH_YIELDS
        }
    }
}

/// Why the reader stopped.
#[derive(Debug)]
enum Stop {
    /// End of stream from the client, or it said goodbye.
    Eof,
    Io,
    Protocol(CodecError),
    /// Graceful shutdown finished (or its grace period ran out).
    Drained,
    /// The writer failed or finished.
    Writer,
    /// The peer sent control messages past their budget (see `Flood`).
    Flood(&'static str),
    /// Our keepalive PING went unanswered: the peer is gone.
    Dead,
    /// The server-wide budget closed the connection (see `Conn::condemn`).
    Condemned,
}

/// Serves one connection once its handshake is done. `svc` is this connection's own stack:
/// the user's layers around the concurrency limits around the user's service.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve<S, IO>(
    io: IO,
    info: ConnectInfo,
    peer: Preface,
    compression: Option<Compression>,
    window_gate: Option<WindowGate>,
    svc: S,
    config: Arc<Config>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) where
    S: Service<Request, Response = Response> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let conn = Arc::new(Conn {
        inner: Padded(Mutex::new(Inner {
            outbox: Outbox::new(peer.max_frame_len as usize, 0),
            in_flight: HashMap::new(),
            closing: false,
        })),
        notify_writer: Padded(Notify::new()),
        wake_deferred: AtomicBool::new(false),
        notify_taken: Notify::new(),
        in_flight_bytes: AtomicUsize::new(0),
        writing: AtomicUsize::new(0),
        reading: AtomicUsize::new(0),
        budget: config.budget.clone(),
        account: Account::open(&config.budget),
        max_queued_bytes: config.max_queued_bytes,
        max_frame_len: peer.max_frame_len as usize,
        condemned: AtomicBool::new(false),
        quiet: AtomicBool::new(false),
        unpaced: AtomicBool::new(false),
        notify_freed: Notify::new(),
        answered: AtomicU64::new(0),
        counters: counters.clone(),
    });
    let (r, w) = crate::conn::split::split(io);
    let (r, w) = match wire(r, w, compression, window_gate) {
        Ok(halves) => halves,
        Err(e) => {
            tracing::debug!(error = %e, "compression could not start");
            conn.account.close(&conn.budget);
            return;
        }
    };
    let writer_conn = conn.clone();
    let opts = WriteOptions {
        flush_delay: None,
        write_timeout: config.write_timeout,
        // Large replies leave from the handlers' own buffers (see `Batch`).
        gather: true,
    };
    let mut writer = tokio::spawn(async move {
        let source = ConnSource(writer_conn.clone());
        write_loop(
            w,
            &source,
            &writer_conn.notify_writer,
            opts,
            &writer_conn.counters,
        )
        .await
    });
    let codec = FrameCodec::builder()
        .max_frame_len(config.max_frame_len)
        .new_codec();
    let mut reader = FrameReader::new(r, codec)
        .frame_timeout(config.frame_read_timeout)
        .gate(BudgetGate(conn.clone()));
    let tasks = TaskTracker::new();
    let info = Arc::new(info);
    let mut ctx = Ctx {
        conn: &conn,
        svc,
        config: &config,
        tasks: &tasks,
        info: &info,
        shutdown: &shutdown,
        grace_deadline: None,
        drain_reason: "server shutting down",
        flood: Flood::new(tokio::time::Instant::now()),
        keepalive: Keepalive::new(
            config.idle_timeout,
            config.keepalive_interval,
            config.keepalive_timeout,
            tokio::time::Instant::now(),
        ),
        timer: None,
        inline_off: 0,
        since_slow: u32::MAX,
        clock: std::time::Instant::now(),
        unclocked: 0,
        spare: None,
    };

    let stop = tokio::select! {
        stop = ctx.read_loop(&mut reader) => stop,
        _ = &mut writer => Stop::Writer,
    };
    tracing::debug!(peer = ?info.remote_addr(), ?stop, "connection reader stopped");
    let goaway = match &stop {
        Stop::Protocol(e) => {
            Counters::inc(&counters.protocol_errors);
            Some(protocol::goaway_protocol(e))
        }
        Stop::Flood(why) => {
            Counters::inc(&counters.protocol_errors);
            Some(protocol::goaway(code::RESOURCE_EXHAUSTED, why))
        }
        _ => None,
    };
    // A drain has already waited for its handlers (up to the grace period). After an EOF or
    // an error nobody can receive their replies, so handlers still running are stopped: a
    // vanished client must not keep work (and the tasks' memory) alive.
    // Whatever is still running is stopped and answered CANCELLED (when a peer is still there
    // to read it).
    cancel_all(&conn, goaway.as_ref());
    conn.notify_writer.notify_one();
    if !writer.is_finished()
        && tokio::time::timeout(Duration::from_millis(500), &mut writer)
            .await
            .is_err()
    {
        writer.abort();
    } else if goaway.is_some() {
        // The GOAWAY is written and our side shut: read what the client still sends until it
        // closes too, so that the close is not a reset that destroys the GOAWAY unread.
        reader.linger(crate::conn::LINGER).await;
    }
    conn.account.close(&conn.budget);
}

/// The server's byte budget, as its connection's reader asks it ([`ReadGate`]): while the
/// server is over the budget, a connection holding more than an even share stops reading even
/// in the middle of a frame (what its peer sends waits in its socket, not here), and every
/// read between frames takes a little only.
struct BudgetGate(Arc<Conn>);

impl ReadGate for BudgetGate {
    fn may_read(&self, held: usize) -> bool {
        let conn = &self.0;
        conn.reading.store(held, Ordering::Relaxed);
        let (_, held) = conn.held_now();
        let go = !conn.budget.over(held);
        conn.pace(go);
        go
    }

    fn short(&self) -> bool {
        self.0.budget.is_over()
    }
}

/// Stops every handler still running, answers each CANCELLED, queues `last` and marks the
/// connection closing so the writer ends after flushing.
fn cancel_all(conn: &Conn, last: Option<&Message>) {
    let mut inner = conn.lock();
    let status = Status::new(Code::Cancelled, "server closed the connection");
    let ids: Vec<(u32, InFlight)> = inner.in_flight.drain().collect();
    for (id, call) in ids {
        call.abort();
        conn.push(&mut inner, &error_message(id, &status));
    }
    if let Some(msg) = last {
        // The GOAWAY is the last thing sent: fragments still to go are dropped (§5.6).
        if let Err(e) = inner.outbox.push_last(msg) {
            tracing::debug!(error = %e, "goaway refused by the encoder");
        }
    }
    inner.closing = true;
}

struct Ctx<'a, S: Service<Request>> {
    conn: &'a Arc<Conn>,
    svc: S,
    config: &'a Config,
    tasks: &'a TaskTracker,
    info: &'a Arc<ConnectInfo>,
    shutdown: &'a CancellationToken,
    /// Set when a graceful shutdown reaches this connection: in-flight calls have until then.
    grace_deadline: Option<tokio::time::Instant>,
    /// Why the drain started: what refused requests are told.
    drain_reason: &'static str,
    flood: Flood,
    keepalive: Keepalive,
    /// The idle, keepalive and quiet timer (`keepalive::QUIET`), armed on the first read.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Requests still to spawn before the reader tries running handlers itself again (after
    /// two took [`INLINE_SLOW`] on their first polls, see [`SLOW_AGAIN`]).
    inline_off: u32,
    /// First polls on the reader since the last reading that took [`INLINE_SLOW`] (`u32::MAX`:
    /// none since the last backoff).
    since_slow: u32,
    /// The reader's last clock read (real time, for [`INLINE_SLOW`]): at a frame's start, after
    /// every [`CLOCK_EVERY`] handlers' first polls on the reader and after a frame's last, and
    /// after waiting for readiness. What it measures from there is the reader's own work on
    /// the requests since.
    clock: std::time::Instant,
    /// First polls on the reader since `clock` was read.
    unclocked: u32,
    /// An empty box for the next handler (see `Ctx::spawn`).
    spare: Option<TaskBox<S::Future>>,
}

impl<S> Ctx<'_, S>
where
    S: Service<Request, Response = Response> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    async fn read_loop<R: AsyncRead + Unpin>(&mut self, reader: &mut FrameReader<R>) -> Stop {
        let mut spin = Spin::new(self.config.read_spin, self.config.spin_slots.clone());
        // Whether the writer has taken a batch since the last frame of requests was read while
        // the queue was over `max_queued_bytes` (see `THROTTLE_UP_TO`).
        let mut took = false;
        'frames: loop {
            // A client that does not read its replies must not make us queue them without
            // bound, nor may all clients together exceed the server's budget: pause reading
            // (and so dispatching) until the writers catch up.
            // A whole frame was dispatched: its bytes are the handlers' now, but for a message
            // still arriving in fragments, which the reader holds.
            self.conn
                .reading
                .store(reader.held_between_frames(), Ordering::Relaxed);
            loop {
                let (queued, held) = self.conn.held_now();
                if self.conn.condemned.load(Ordering::Acquire) {
                    return Stop::Condemned;
                }
                if self.conn.budget.must_close(held) {
                    self.conn.condemn(&mut self.conn.lock());
                    self.conn.notify_writer.notify_one();
                    return Stop::Condemned;
                }
                let over_budget = self.conn.budget.over(held);
                if queued <= self.config.max_queued_bytes && !over_budget {
                    self.conn.pace(true);
                    break;
                }
                let throttle_cap = THROTTLE_UP_TO.saturating_mul(self.config.max_queued_bytes);
                if queued <= throttle_cap && !over_budget {
                    // Throttled: the client reads its replies (the writer sends them, at the
                    // pace of its ACKs), so one more frame of requests is read for each batch
                    // written (frames of ACKs and other control messages cost nothing), and
                    // any frame while the writer waits for ACKs. Its small calls go on while
                    // its large replies drain, and its queue grows only as fast as it reads.
                    // Fragments keep to the window: we read.
                    self.conn.pace(true);
                    if took || self.conn.waits_for_window() {
                        break;
                    }
                } else {
                    if over_budget {
                        // Buffers kept for messages to come in fragments are not counted, but
                        // the server is short of memory: they go.
                        reader.release_spares();
                    }
                    // Paused. The client's ACKs wait unread behind what we do not read:
                    // fragments go out unpaced meanwhile, or a reply waiting for them would
                    // wait for good.
                    self.conn.pace(false);
                }
                // Throttled or paused, look again at the next batch written, or now and then:
                // the replies of running calls keep arriving, and the budget is shared with
                // every other connection.
                tokio::select! {
                    _ = self.conn.notify_taken.notified() => took = true,
                    _ = self.conn.budget.freed.notified(), if over_budget => {}
                    _ = tokio::time::sleep(RECHECK) => {}
                    _ = self.shutdown.cancelled(), if self.grace_deadline.is_none() => {
                        self.start_drain("server shutting down")
                    }
                }
            }
            let timer = match &mut self.timer {
                Some(timer) => timer,
                None => {
                    let next = self.keepalive.next();
                    self.timer.insert(Box::pin(tokio::time::sleep_until(next)))
                }
            };
            let frame = loop {
                let look_again = spin.again();
                tokio::select! {
                    f = reader.next() => break f,
                    // Nothing buffered yet: yield (the worker polls the socket's readiness
                    // without sleeping, and runs other tasks) and look again
                    // (`Server::read_spin`).
                    _ = tokio::task::yield_now(), if look_again => {}
                    _ = self.shutdown.cancelled(), if self.grace_deadline.is_none() => {
                        self.start_drain("server shutting down");
                        continue 'frames;
                    }
                    _ = drained(self.tasks, self.grace_deadline), if self.grace_deadline.is_some() => {
                        return Stop::Drained
                    }
                    _ = timer.as_mut() => {
                        let now = tokio::time::Instant::now();
                        match self.keepalive.fire(now, !self.tasks.is_empty()) {
                            Due::Nothing => {}
                            Due::Quiet => {
                                reader.release_buffers();
                                self.conn.quiet.store(true, Ordering::Relaxed);
                                self.conn.notify_writer.notify_one();
                            }
                            Due::Ping => self.conn.push_now(&Message::Ping { data: 0 }),
                            Due::Dead => return Stop::Dead,
                            Due::Idle if self.grace_deadline.is_none() => {
                                self.start_drain("idle connection")
                            }
                            Due::Idle => {}
                        }
                        let next = self.keepalive.next();
                        if let Some(timer) = &mut self.timer {
                            timer.as_mut().reset(next);
                        }
                        continue 'frames;
                    }
                }
            };
            spin.arrived();
            let fragments = reader.fragments_read();
            let mut frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => return Stop::Eof,
                Err(CodecError::Io(e)) => {
                    tracing::debug!(error = %e, "read failed");
                    return Stop::Io;
                }
                Err(e) => return Stop::Protocol(e),
            };
            Counters::inc(&self.conn.counters.frames_read);
            // One clock read per frame: its requests arrived together, and their deadlines
            // count from then.
            let arrived = tokio::time::Instant::now();
            self.restart_clock();
            let mut request = false;
            let in_frame = frame.left();
            let mut batch = Vec::with_capacity(frame.left().min(MESSAGE_CHUNK));
            loop {
                if let Err(e) = reader.messages(&mut frame, &mut batch) {
                    self.conn.wake_writer_now();
                    return Stop::Protocol(e);
                }
                if batch.is_empty() {
                    break;
                }
                for msg in batch.drain(..) {
                    request |= matches!(msg, Message::Request { .. } | Message::OneWay { .. });
                    if let Some(stop) = self.handle(msg, arrived).await {
                        self.conn.wake_writer_now();
                        return stop;
                    }
                }
            }
            self.judge_first_polls();
            self.conn.wake_writer_now();
            took &= !request;
            // A request arriving in fragments is activity from its first piece on.
            self.keepalive.read(arrived, request || reader.in_message());
            if let Some(ack) = reader.take_ack() {
                self.conn.push_now(&ack);
            }
            // Spin only for a connection that waits on round trips (see `SPIN_MAX_MESSAGES`).
            spin.allow(
                in_frame <= SPIN_MAX_MESSAGES
                    && !reader.in_message()
                    && reader.fragments_read() == fragments,
            );
        }
    }

    /// Starts a graceful close: GOAWAY OK with `reason`, no new requests, in-flight calls get
    /// the grace period.
    fn start_drain(&mut self, reason: &'static str) {
        self.drain_reason = reason;
        self.grace_deadline = Some(tokio::time::Instant::now() + self.config.grace_period);
        self.conn.push_now(&protocol::goaway(code::OK, reason));
    }

    async fn handle(&mut self, msg: Message, arrived: tokio::time::Instant) -> Option<Stop> {
        match msg {
            Message::Request {
                id,
                timeout_ms,
                method,
                metadata,
                body,
            } => {
                if &method[..] == super::health::HEALTH_METHOD.as_bytes() {
                    // Answered here, also while draining: it is how balancers learn of it.
                    let msg = match self.config.health.answer(&body) {
                        Ok(body) => Message::Response { id, body },
                        Err(status) => error_message(id, &status),
                    };
                    return self.conn.answer_at_once(id, &msg);
                }
                if self.grace_deadline.is_some() {
                    let status = Status::new(Code::Refused, self.drain_reason);
                    return self.conn.answer_at_once(id, &error_message(id, &status));
                }
                self.dispatch(Some(id), arrived, timeout_ms, method, metadata, body)
                    .await
            }
            Message::OneWay {
                timeout_ms,
                method,
                metadata,
                body,
            } => {
                if self.grace_deadline.is_some() {
                    return None;
                }
                self.dispatch(None, arrived, timeout_ms, method, metadata, body)
                    .await
            }
            Message::Cancel { id } => {
                let mut inner = self.conn.lock();
                // Only cancels that did no good count against the budget: one for an id not in
                // flight, or one right behind its request (the "rapid reset" pattern). A caller
                // giving up on a call that ran a while is what cancels are for.
                let rapid = inner
                    .in_flight
                    .get(&id)
                    .is_none_or(|call| arrived.duration_since(call.arrived) < RAPID_CANCEL);
                if rapid {
                    let answered = self.conn.answered.load(Ordering::Relaxed);
                    if let Some(why) = self.flood.cancel(arrived, answered) {
                        return Some(Stop::Flood(why));
                    }
                }
                let running = inner.in_flight.remove(&id);
                // A reply waiting to go out in fragments, none of it sent yet, is not sent
                // either: the caller gave up on it.
                let unsent = running.is_none() && inner.outbox.withdraw(id);
                if let Some(call) = &running {
                    call.abort();
                }
                if running.is_some() || unsent {
                    let status = Status::new(Code::Cancelled, "cancelled by the client");
                    let wake = self.conn.push(&mut inner, &error_message(id, &status));
                    drop(inner);
                    if wake {
                        self.conn.notify_writer.notify_one();
                    }
                }
                None
            }
            Message::Ping { data } => {
                if let Some(why) = self.flood.ping(arrived) {
                    return Some(Stop::Flood(why));
                }
                self.conn.push_now(&Message::Pong { data });
                None
            }
            Message::Pong { .. } => None,
            Message::Ack { bytes } => self.conn.ack(bytes),
            Message::GoAway { code, reason } => {
                tracing::debug!(code, reason = %String::from_utf8_lossy(&reason), "client goaway");
                Some(Stop::Eof)
            }
            Message::Response { .. } | Message::Error { .. } => Some(Stop::Protocol(
                CodecError::InvalidFrame("client sent a server-only message"),
            )),
        }
    }

    async fn dispatch(
        &mut self,
        id: Option<u32>,
        arrived: tokio::time::Instant,
        timeout_ms: u32,
        method: Bytes,
        metadata: Bytes,
        body: Bytes,
    ) -> Option<Stop> {
        // Bound what running handlers hold: decompression makes big requests cheap to send.
        let size = method.len() + metadata.len() + body.len();
        let max = self.config.max_in_flight_bytes;
        let mut judged = false;
        loop {
            let held = self.conn.in_flight_bytes.load(Ordering::Acquire);
            if held == 0 || held + size <= max {
                break;
            }
            // About to wait: a duplicate is judged now, as it was read (see `DUPLICATE`).
            if !std::mem::replace(&mut judged, true) && self.in_flight(id) {
                return Some(Stop::Protocol(DUPLICATE));
            }
            self.conn.wake_writer_now();
            tokio::select! {
                _ = self.conn.notify_freed.notified() => {}
                _ = ping_while_busy(self.conn) => {}
                _ = self.shutdown.cancelled(), if self.grace_deadline.is_none() => {
                    self.start_drain("server shutting down");
                    if let Some(id) = id {
                        let status = Status::new(Code::Refused, "server is shutting down");
                        self.conn.push_now(&error_message(id, &status));
                    }
                    return None;
                }
            }
        }
        let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms as u64));
        let deadline = timeout.map(|t| arrived + t);
        // One span per call; with no subscriber interested it is a no-op and nothing below is
        // recorded or timed.
        let span = tracing::debug_span!(
            "towerpc.server",
            method = tracing::field::Empty,
            id = tracing::field::Empty,
            peer = tracing::field::Empty,
            code = tracing::field::Empty,
            latency_us = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        // The caller's trace context, when its metadata carries one.
        let trace = if metadata.is_empty() {
            None
        } else {
            crate::trace::TraceContext::from_metadata(&metadata)
        };
        let span = (!span.is_disabled()).then(|| {
            if let Some(t) = &trace {
                span.record(
                    "trace_id",
                    tracing::field::display(format!("{:032x}", t.trace_id())),
                );
            }
            span.record("method", String::from_utf8_lossy(&method).as_ref());
            if let Some(id) = id {
                span.record("id", id);
            }
            if let Some(peer) = self.info.remote_addr() {
                span.record("peer", tracing::field::display(peer));
            }
            span
        });
        let mut req = Request {
            method,
            body,
            metadata,
            timeout: timeout.into(),
            deadline,
            cancel: None,
            one_way: id.is_none(),
            extensions: LazyExtensions::with_connect_info(self.info.clone()),
        };
        if let Some(t) = trace {
            req.extensions_mut().insert(t);
        }

        // Readiness is awaited here, on the reader: while the stack is not ready (its concurrency
        // limits are full, or a layer of the user's pushes back) the socket is not read. A
        // shutdown does not wait for it.
        let mut waited = false;
        let (tasks, conn) = (self.tasks, self.conn);
        let ready = tokio::select! {
            // Readiness first: a ready stack (the common case) never polls the others.
            biased;
            r = std::future::poll_fn(|cx| {
                let poll = self.svc.poll_ready(cx);
                if poll.is_pending() && !waited {
                    waited = true;
                    // About to wait: a duplicate is judged now, as it was read (see
                    // `DUPLICATE`).
                    if in_flight(tasks, conn, id) {
                        return std::task::Poll::Ready(None);
                    }
                    conn.wake_writer_now();
                }
                poll.map(Some)
            }) => match r {
                Some(r) => Some(r),
                None => return Some(Stop::Protocol(DUPLICATE)),
            },
            _ = self.shutdown.cancelled(), if self.grace_deadline.is_none() => None,
            _ = ping_while_busy(self.conn) => unreachable!("pings for ever"),
        };
        if waited {
            // Time spent waiting is not the reader's work on the requests before it: they go
            // unjudged.
            self.restart_clock();
        }
        let status = match ready {
            Some(Ok(())) => {
                let svc = &mut self.svc;
                match std::panic::catch_unwind(AssertUnwindSafe(|| svc.call(req))) {
                    Ok(fut) => {
                        let task = HandlerTask::new(fut, id, deadline, trace, span, size);
                        return self.spawn(id, arrived, task);
                    }
                    Err(_panic) => {
                        Counters::inc(&self.conn.counters.panics);
                        Counters::inc(&self.conn.counters.calls);
                        Counters::inc(&self.conn.counters.errors);
                        Status::new(Code::Internal, "handler panicked")
                    }
                }
            }
            Some(Err(e)) => status_from_error(e.into()),
            None => {
                self.start_drain("server shutting down");
                Status::new(Code::Refused, "server is shutting down")
            }
        };
        match id {
            Some(id) => self.conn.answer_at_once(id, &error_message(id, &status)),
            None => None,
        }
    }

    /// Whether request `id` is in flight (read and not yet answered).
    fn in_flight(&self, id: Option<u32>) -> bool {
        in_flight(self.tasks, self.conn, id)
    }

    /// Starts the reader's clock afresh: what it did before (waiting for a frame, or for the
    /// stack to be ready, or spawning during a backoff) is not judged.
    fn restart_clock(&mut self) {
        self.clock = std::time::Instant::now();
        self.unclocked = 0;
    }

    /// Reads the clock to judge the first polls run on the reader since it was last read (see
    /// [`Ctx::spawn`]): their requests' decoding, routing, `call` and first poll, all of it
    /// time the reader spent on them and not reading.
    fn judge_first_polls(&mut self) {
        if self.unclocked == 0 {
            return;
        }
        let now = std::time::Instant::now();
        if now - self.clock < INLINE_SLOW {
            self.since_slow = self.since_slow.saturating_add(self.unclocked);
        } else if self.since_slow < SLOW_AGAIN {
            self.inline_off = INLINE_BACKOFF;
            self.since_slow = u32::MAX;
        } else {
            // Once is no pattern: the reader's thread may just have been preempted.
            self.since_slow = 0;
        }
        self.clock = now;
        self.unclocked = 0;
    }

    /// Runs a handler: first on the reader, and on a task of its own if it does not answer at
    /// once. A request is entered in flight before its handler can reply.
    ///
    /// Most handlers answer on their first poll; run there, such a call costs no task, no
    /// spawn, no wake-up of another thread and no hop from that thread back to the writer, and
    /// its reply joins the batch the reader's other requests make. Handlers that do wait (for
    /// I/O, a lock, a timer) move to a task of their own, still boxed where they were polled.
    /// A handler that computes for long on its first poll would hold up the reader, and the
    /// other requests' handlers would no longer run side by side: the reader's time on first
    /// polls is read every [`CLOCK_EVERY`] of them and at a frame's end, and after two readings
    /// of [`INLINE_SLOW`] or more, [`SLOW_AGAIN`] or fewer first polls apart, the next
    /// [`INLINE_BACKOFF`] requests are spawned unpolled.
    fn spawn(
        &mut self,
        id: Option<u32>,
        arrived: tokio::time::Instant,
        task: HandlerTask<S::Future>,
    ) -> Option<Stop> {
        let inline = self.inline_off == 0;
        // With no handler running on a task of its own nothing is in flight (an entry never
        // outlives its task, and only this reader enters calls), so no id can be a duplicate:
        // a handler that answers on its first poll here is then never entered at all, which
        // spares the connection's lock (contended by the writer) a round per request.
        let enter_first = id.is_some() && !(inline && self.tasks.is_empty());
        if let (Some(id), true) = (id, enter_first) {
            match self.conn.lock().in_flight.entry(id) {
                // The handler's future is dropped unpolled: it never ran.
                Entry::Occupied(_) => return Some(Stop::Protocol(DUPLICATE)),
                Entry::Vacant(slot) => {
                    slot.insert(InFlight {
                        handle: None,
                        arrived,
                    });
                }
            }
        }
        // The box of the last handler that answered on the reader, if it did: a handler that
        // answers at once costs no allocation.
        let mut slot = self.spare.take().unwrap_or_else(|| Box::pin(None));
        slot.as_mut().set(Some(task));
        if inline {
            let mut task = slot
                .as_mut()
                .as_pin_mut()
                .expect("a handler was just put there");
            task.as_mut().entered(enter_first);
            // The handler's wakers are the task's from its next poll on: a future polled again
            // with a new waker must use that one.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let polled = task.as_mut().poll_on(&mut cx, self.conn);
            self.unclocked += 1;
            if self.unclocked >= CLOCK_EVERY {
                self.judge_first_polls();
            }
            if polled.is_ready() {
                // Dropped in place (with what it held: the request, its concurrency slots), the
                // box kept for the next handler.
                slot.as_mut().set(None);
                self.spare = Some(slot);
                return None;
            }
            if let (Some(id), false) = (id, enter_first) {
                // It waits: entered now, before its task can answer (and still the only call
                // in flight).
                self.conn.lock().in_flight.insert(
                    id,
                    InFlight {
                        handle: None,
                        arrived,
                    },
                );
                task.as_mut().entered(true);
            }
        } else {
            self.inline_off -= 1;
            if self.inline_off == 0 {
                // The next first poll is timed from here, not from before the requests spawned.
                self.restart_clock();
            }
        }
        let handle = self
            .tasks
            .spawn(Spawned::new(slot, self.conn))
            .abort_handle();
        if let Some(id) = id {
            match self.conn.lock().in_flight.get_mut(&id) {
                Some(call) => call.handle = Some(handle),
                // Answered meanwhile, or stopped with the connection's other calls: nothing of
                // it runs on (aborting a task that has finished does nothing).
                None => handle.abort(),
            }
        }
        None
    }
}

/// A REQUEST whose id is in flight (PROTOCOL.md §6). `spawn` refuses it when the reader goes
/// straight on to its handler; when the reader must wait first (for a handler slot, or for the
/// request bytes handlers hold to go down) it is judged before the wait, as it was read: by
/// the time it could run, the first might have been answered and the duplicate would run.
const DUPLICATE: CodecError = CodecError::InvalidFrame("request id already in flight");

/// A reading of the reader's time on first polls (one handler's, or a run of up to
/// [`CLOCK_EVERY`]) this long, twice close together, sends the next requests to tasks of
/// their own (see `Ctx::spawn`).
const INLINE_SLOW: Duration = Duration::from_micros(100);

/// A first poll on the reader that takes [`INLINE_SLOW`] within this many first polls of the
/// one before that did starts a backoff. One slow reading alone says little: a thread
/// preempted for a time slice (milliseconds, on a busy machine) reads the same as a handler
/// that computes, and on two shared cores, where the reader was preempted a few hundred times
/// a second, backing off at each sent thousands of quick handlers a second to tasks of their
/// own: 1,000 callers made 8–10 % fewer calls/s than with the backoff disabled. A handler
/// that computes is slow again soon (one in ten slow is slow again within 16 with odds 4 in 5);
/// a preemption is not. The price: where one request in a hundred computes, it is caught with
/// odds 15 in 100, so such handlers run on the reader more often than they did. A longer
/// window catches them sooner but not preemptions less: on that host, with about 750 slow
/// readings a second, 16 left 14 backoffs a second (2 % of requests spawned), 64 would leave
/// about 56 (9 %).
const SLOW_AGAIN: u32 = 16;

/// How many first polls on the reader one clock read judges at most (see `Ctx::spawn`): a
/// clock read per request was 4–5 % of the server's samples at 1,000 callers. A run of them
/// that holds the reader for [`INLINE_SLOW`] holds it up as one handler that long would, and
/// is judged the same.
const CLOCK_EVERY: u32 = 8;

/// How many requests are spawned unpolled after a slow first poll on the reader.
const INLINE_BACKOFF: u32 = 1024;

/// How often a server whose reader waits for its handlers (a full concurrency limit, a layer
/// that is not ready, request bytes over the cap) PINGs the client. The reader reads no PINGs
/// then, and a client's stall rule (PROTOCOL.md §9) must see that the server is busy, not gone.
const BUSY_PING: Duration = Duration::from_millis(250);

/// PINGs the client every [`BUSY_PING`] while the reader waits; never resolves.
async fn ping_while_busy(conn: &Conn) {
    loop {
        tokio::time::sleep(BUSY_PING).await;
        conn.push_now(&Message::Ping { data: 0 });
    }
}

/// Resolves once nothing is in flight (after a short linger that lets requests already on
/// the wire arrive and be refused) or the grace period is over.
/// Whether request `id` is in flight on `conn` (read and not yet answered). With no task
/// running nothing is (see [`Ctx::spawn`]), which spares the lock.
fn in_flight(tasks: &TaskTracker, conn: &Conn, id: Option<u32>) -> bool {
    id.is_some_and(|id| !tasks.is_empty() && conn.lock().in_flight.contains_key(&id))
}

async fn drained(tasks: &TaskTracker, deadline: Option<tokio::time::Instant>) {
    let Some(deadline) = deadline else {
        return std::future::pending().await;
    };
    let grace = tokio::time::sleep_until(deadline);
    tokio::pin!(grace);
    loop {
        if tasks.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if tasks.is_empty() {
                return;
            }
        }
        tokio::select! {
            _ = &mut grace => return,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
}
