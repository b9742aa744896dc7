//! The client's background task: dial, exchange prefaces, run the reader (here) and the writer
//! (its own task, so that encoding replies and writing requests use both cores), detect stalls,
//! and redial with backoff when the connection ends.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::task::AbortOnDropHandle;

use super::builder::DEFAULT_STALL_TIMEOUT;
use super::pending::{ConnSource, Gen, Phase, Reply, Shared};
use tower::{Service, ServiceExt};

use crate::codec::{code, CodecError, Compression, FrameCodec, Message, Preface, Role};
use crate::conn::{
    exchange_preface, wire, write_loop, FrameReader, Spin, WriteOptions, MESSAGE_CHUNK,
};
use crate::error::{Code, Error, Kind, Result, Status};
use crate::protocol::{self, PerSecond};
use crate::stats::{with_dial_counters, Counters, MaybeCounted};
use crate::transport::Connected;
use crate::BoxError;
use crate::Response;

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// The client was dropped.
    Closed,
    /// The server finished draining us (GOAWAY 0, nothing left in flight) or closed cleanly.
    Drained,
    Eof,
    Io(io::Error),
    /// We saw the server break the protocol.
    Protocol(CodecError),
    /// The server closed with a reason.
    GoAway(Status),
    Stalled,
    /// The server sent control messages past their budget (PROTOCOL.md §11).
    Flood(&'static str),
}

/// The client's own PINGs: one per silence (none while one is unanswered), and never two
/// within [`MIN_PING_GAP`].
#[derive(Debug, Default)]
struct Pinging {
    /// A PING went out and nothing has been received since.
    outstanding: bool,
    last: Option<Instant>,
}

/// The least time between two of the client's PINGs: at most 50 a second, half the budget a
/// server gives its client (PROTOCOL.md §11), since the two sides' one-second windows need not
/// line up. Only a stall bound under 40 ms or a keepalive interval under 20 ms would ping
/// faster; before, such a client had its connection closed with GOAWAY RESOURCE_EXHAUSTED
/// "too many pings".
const MIN_PING_GAP: Duration = Duration::from_millis(2000 / protocol::MAX_PINGS_PER_SEC as u64);

impl Pinging {
    /// Whether a PING may go now; if so, it is counted as sent.
    fn may_ping(&mut self) -> bool {
        let now = Instant::now();
        if self.outstanding || self.last.is_some_and(|at| now - at < MIN_PING_GAP) {
            return false;
        }
        self.outstanding = true;
        self.last = Some(now);
        true
    }
}

/// Connections that lived shorter than this are followed by a backoff wait, not an immediate
/// redial, and do not start the backoff schedule over, so a server that accepts and drops at
/// once is not hammered.
const MIN_HEALTHY: Duration = Duration::from_secs(1);

/// The connection's task: dials, serves and redials, with the deadline queue's timer beside it
/// all the while (a call queued while dialing has its deadline too).
pub(super) async fn run<C, T>(
    shared: Arc<Shared>,
    mut connector: C,
    target: T,
    first: oneshot::Sender<Result<()>>,
) where
    C: Service<T>,
    C::Response: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static,
    C::Error: Into<BoxError>,
    T: Clone,
{
    let _deadlines = AbortOnDropHandle::new(tokio::spawn(expire(shared.clone())));

    let mut first = Some(first);
    let mut backoff = shared.config.backoff.clone();
    let mut rng = fastrand::Rng::new();
    let server = shared.config.target.clone();
    let server = server.as_ref();
    loop {
        Counters::inc(&shared.counters.dials);
        let attempt = tokio::time::timeout(
            shared.config.connect_timeout,
            connect(&shared, &mut connector, target.clone()),
        );
        let res = tokio::select! {
            r = attempt => r.unwrap_or_else(|_| Err(Error::new(Kind::Unavailable)
                .target(server)
                .with("connect timed out".to_string()))),
            _ = shared.closed.cancelled() => break,
        };
        let (io, peer, compression) = match res {
            Ok(ok) => ok,
            Err(e) => {
                Counters::inc(&shared.counters.dial_errors);
                tracing::debug!(?server, error = %e, "dial failed");
                let cause: Arc<str> = error_chain(&e).into();
                if let Some(first) = first.take() {
                    let _ = first.send(Err(e));
                }
                shared.reset(Phase::Backoff(cause.clone()), || {
                    Error::new(Kind::Unavailable)
                        .target(server)
                        .with(cause.to_string())
                });
                if !wait(&shared, backoff.next(&mut rng)).await {
                    break;
                }
                shared.set_phase(Phase::Connecting);
                continue;
            }
        };
        // Connected before the first caller hears of it, so `is_connected()` right after
        // `connect` is true.
        let mut refused = Vec::new();
        let gen = {
            let mut inner = shared.lock();
            let max = peer.max_frame_len as usize;
            // Calls made while dialling were queued before the server's limit was known: any
            // too large for it fail as they would have had it been known (PROTOCOL.md §3).
            for (id, len) in inner.outbox.set_max_frame_len(max) {
                let e = Error::new(Kind::Encode).with(CodecError::FrameTooLarge { len, max });
                let _ = inner.complete(id, Err(e), &mut refused);
            }
            if inner.phase == Phase::Connecting {
                shared.enter(&mut inner, Phase::Connected);
            }
            inner.gen
        };
        for (tx, reply) in refused {
            let _ = tx.send(reply);
        }
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
        let started = Instant::now();
        let end = serve(&shared, io, gen, compression).await;
        tracing::debug!(?server, ?end, "connection ended");
        // What every call still pending on this connection fails with.
        type MakeError = Box<dyn Fn() -> Error + Send>;
        let server = server.cloned();
        let lost = |kind: Kind, cause: String| -> MakeError {
            let server = server.clone();
            Box::new(move || Error::new(kind).target(server.as_ref()).with(cause.clone()))
        };
        let (err, phase): (MakeError, Phase) = match &end {
            End::Closed => (Box::new(|| Error::new(Kind::Closed)), Phase::Closed),
            End::Stalled => {
                let server = server.clone();
                (
                    Box::new(move || Error::new(Kind::Stalled).target(server.as_ref())),
                    Phase::Connecting,
                )
            }
            End::GoAway(status) => {
                // Keep the server's status as the source, typed, not as text.
                let (server, status) = (server.clone(), status.clone());
                (
                    Box::new(move || {
                        Error::new(Kind::ConnectionLost)
                            .target(server.as_ref())
                            .with(status.clone())
                    }),
                    Phase::Connecting,
                )
            }
            End::Protocol(e) => (lost(Kind::Protocol, e.to_string()), Phase::Connecting),
            End::Flood(why) => (lost(Kind::Protocol, why.to_string()), Phase::Connecting),
            End::Io(e) => (lost(Kind::ConnectionLost, e.to_string()), Phase::Connecting),
            End::Eof | End::Drained => (
                lost(Kind::ConnectionLost, "server closed the connection".into()),
                Phase::Connecting,
            ),
        };
        if matches!(end, End::Protocol(_) | End::Flood(_)) {
            Counters::inc(&shared.counters.protocol_errors);
        }
        shared.reset(phase, err);
        if matches!(end, End::Closed) {
            break;
        }
        if started.elapsed() >= MIN_HEALTHY {
            // Only a connection that lasted starts the schedule over: one the server drops at
            // once is a failed dial, and the waits keep growing (gorpc redialed such a server
            // every second forever).
            backoff.reset();
        } else {
            shared.set_phase(Phase::Backoff(
                "connection closed right after it opened".into(),
            ));
            if !wait(&shared, backoff.next(&mut rng)).await {
                break;
            }
            shared.set_phase(Phase::Connecting);
        }
    }
    shared.set_phase(Phase::Closed);
    shared.reset(Phase::Closed, || Error::new(Kind::Closed));
    shared.finished.cancel();
}

/// Times out the calls of the deadline queue as their deadlines pass: one timer for the
/// connection. It wakes for the queue's first deadline, or, with the queue empty, one default
/// timeout from now, since a call queued after that has a later deadline. Woken early (the
/// first call ended), it looks and sleeps again.
async fn expire(shared: Arc<Shared>) -> std::convert::Infallible {
    let Some(timeout) = shared.config.timeout else {
        return std::future::pending().await;
    };
    loop {
        let now = Instant::now();
        let next = shared.expire(now).unwrap_or(now + timeout);
        tokio::time::sleep_until(next).await;
    }
}

/// `e` and its sources, as one line: the cause a fail-fast call reports.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}

/// Sleeps `d` unless the client closes first (then false).
async fn wait(shared: &Shared, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shared.closed.cancelled() => false,
    }
}

async fn connect<C, T>(
    shared: &Shared,
    connector: &mut C,
    target: T,
) -> Result<(MaybeCounted<C::Response>, Preface, Option<Compression>)>
where
    C: Service<T>,
    C::Response: AsyncRead + AsyncWrite + Connected + Unpin,
    C::Error: Into<BoxError>,
{
    let server = shared.config.target.as_ref();
    let dial = async {
        // Errors become `BoxError` before any await so the future stays `Send` whatever the
        // connector's error type is.
        let ready: std::result::Result<&mut C, BoxError> =
            connector.ready().await.map_err(Into::into);
        let fut = ready?.call(target);
        fut.await.map_err(Into::into)
    };
    let (io, counted) = with_dial_counters(shared.counters.clone(), dial).await;
    let io = io.map_err(|e: BoxError| {
        // A TLS handshake that fails is a refusal, not an absence: say so.
        let kind = if crate::transport::is_handshake_error(&*e) {
            Kind::Handshake
        } else {
            Kind::Unavailable
        };
        Error::new(kind).target(server).with(e)
    })?;
    // Counted from here on (beneath TLS when the connector says it counts itself), so the
    // stats include the preface, as the server's do.
    let mut io = MaybeCounted::new(io, shared.counters.clone(), counted);
    if let Some(hook) = &shared.config.on_connect {
        hook(io.connect_info())
            .await
            .map_err(|e| Error::new(Kind::Handshake).target(server).with(e))?;
    }
    let mut ours = Preface::new(Role::Client, shared.config.max_frame_len);
    ours.compression = shared.config.compression;
    let peer = exchange_preface(&mut io, ours)
        .await
        .map_err(|e| Error::new(Kind::Handshake).target(server).with(e))?;
    let compression = protocol::check_server(&ours, &peer).map_err(|why| {
        let e = Error::new(Kind::Handshake).target(server);
        match why {
            // PROTOCOL.md §3.2: reported as UNSUPPORTED_VERSION.
            protocol::PrefaceRefusal::Version(_) => {
                e.with(Status::new(Code::UnsupportedVersion, why.to_string()))
            }
            _ => e.with(why.to_string()),
        }
    })?;
    Ok((io, peer, compression))
}

/// Runs one established connection until it ends.
async fn serve<T>(shared: &Arc<Shared>, io: T, gen: Gen, compression: Option<Compression>) -> End
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (r, w) = crate::conn::split::split(io);
    let (r, w) = match wire(r, w, compression, None) {
        Ok(halves) => halves,
        Err(e) => return End::Io(e),
    };
    let source = ConnSource {
        shared: shared.clone(),
        gen,
    };
    let opts = WriteOptions {
        flush_delay: shared.config.flush_delay,
        // A server that reads nothing for the stall bound is stalled too: without this, one
        // that stopped reading but sent PINGs (each answered, each queued behind the blocked
        // write) would grow the outbox for as long as the connection lasted.
        write_timeout: shared.config.stall_timeout,
        // Measured (docs/benchmarks.md, session 7): with large requests beside many small
        // calls, a client that copies its fragments into the batch makes 15-30 % more big
        // and small calls per second than one that gathers them, although gathering costs less
        // CPU. Why is not settled; a likely cause: the copy happens in the take, under the
        // connection's lock, and the callers held back meanwhile join the next batch
        // together. The server gathers: there it saves CPU at no cost in speed.
        gather: false,
    };
    let writer_shared = shared.clone();
    let mut writer = tokio::spawn(async move {
        write_loop(
            w,
            &source,
            &writer_shared.notify_writer,
            opts,
            &writer_shared.counters,
        )
        .await
    });
    // Calls queued while dialing are waiting in the outbox.
    shared.notify_writer.notify_one();

    let codec = FrameCodec::builder()
        .max_frame_len(shared.config.max_frame_len)
        .new_codec();
    let mut reader = FrameReader::new(r, codec);
    let end = tokio::select! {
        end = read_loop(shared, &mut reader) => end,
        res = &mut writer => match res {
            Ok(Ok(())) => End::Eof,
            Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => End::Stalled,
            Ok(Err(e)) => End::Io(e),
            Err(_) => End::Io(io::Error::other("writer task failed")),
        },
        _ = shared.closed.cancelled() => End::Closed,
    };
    // Tell the server why, when it is our decision and it can help.
    let goaway = match &end {
        End::Protocol(e) => Some(protocol::goaway_protocol(e)),
        End::Stalled => Some(protocol::goaway(
            code::STALLED,
            "no reply or pong within the stall timeout",
        )),
        End::Flood(why) => Some(protocol::goaway(code::RESOURCE_EXHAUSTED, why)),
        _ => None,
    };
    if !writer.is_finished() {
        let graceful = {
            let mut inner = shared.lock();
            if let Some(msg) = &goaway {
                // The last thing sent: requests still going out in fragments are dropped.
                let _ = inner.outbox.push_last(msg);
            }
            if inner.gen == gen && inner.phase != Phase::Closed {
                shared.enter(&mut inner, Phase::Closing);
            }
            inner.closing
        };
        shared.notify_writer.notify_one();
        // Give the writer a moment to flush what is queued (the GOAWAY), then drop the socket;
        // `Client::close` waits longer, as it promised to write what was queued.
        let linger = if graceful {
            shared.config.stall_timeout.unwrap_or(DEFAULT_STALL_TIMEOUT)
        } else {
            Duration::from_millis(100)
        };
        match tokio::time::timeout(linger, &mut writer).await {
            Err(_) => writer.abort(),
            Ok(Ok(Ok(()))) if goaway.is_some() => {
                // The GOAWAY is written and our side shut: read on a while, so that the close
                // is no reset that destroys it unread. Apart: the calls fail now.
                tokio::spawn(async move { reader.linger(crate::conn::LINGER).await });
            }
            Ok(_) => {}
        }
    }
    end
}

async fn read_loop<R>(shared: &Shared, reader: &mut FrameReader<R>) -> End
where
    R: AsyncRead + Unpin,
{
    let stall = shared.config.stall_timeout;
    let keepalive = shared.config.keepalive;
    let tick = [stall, keepalive]
        .into_iter()
        .flatten()
        .min()
        .map_or(Duration::from_secs(3600), |t| t / 4);
    let mut last_recv = Instant::now();
    let mut pings = PerSecond::new(last_recv);
    // When a reply last arrived: a server that answers pings but no calls is stuck.
    let mut last_reply = last_recv;
    let mut pinging = Pinging::default();
    let mut out: Vec<(oneshot::Sender<Reply>, Reply)> = Vec::new();
    let lone = LoneWorker::new();
    // The reader spins (`Builder::reply_spin`, `Spin`) however many calls are out. With one
    // caller on loopback, most of a 70-75 µs round trip was waking each side's sleeping thread
    // (in a VM, an exit to the hypervisor and back): looking again for up to 50 µs made 33-35k
    // calls/s instead of 13-15k (docs/benchmarks.md, session 11). With more calls out the
    // spin paid only once the server's reader spun too (session 14): each side's sleep and
    // wake-up is on the round trip, so sparing one of them left the other.
    let mut spin = Spin::new(shared.config.reply_spin, shared.config.spin_slots.clone());
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let look_again = spin.again();
        let frame = tokio::select! {
            biased;
            f = reader.next() => f,
            // Nothing buffered yet: yield (the worker polls the socket's readiness without
            // sleeping, and runs other tasks) and look again.
            _ = tokio::task::yield_now(), if look_again => continue,
            _ = interval.tick() => {
                if let Some(stall) = stall {
                    let times = Silence { last_recv, last_reply };
                    let check = Check { stall, keepalive };
                    if let Some(end) = check_stall(shared, times, check, &mut pinging, &mut out) {
                        return end;
                    }
                    for (tx, reply) in out.drain(..) {
                        let _ = tx.send(reply);
                    }
                }
                continue;
            }
        };
        spin.arrived();
        let mut frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return End::Eof,
            Err(CodecError::Io(e)) => return End::Io(e),
            Err(e) => return End::Protocol(e),
        };
        last_recv = Instant::now();
        pinging.outstanding = false;
        let mut replied = false;
        Counters::inc(&shared.counters.frames_read);
        let mut wake = false;
        let mut end = None;
        // The frame's messages are taken out a chunk at a time, outside the lock; each chunk
        // is then handled in one critical section. No collection of a whole frame's messages is
        // built: a frame of thousands of replies costs a chunk's worth, not thousands.
        let mut batch = Vec::with_capacity(frame.left().min(MESSAGE_CHUNK));
        let mut yield_first = false;
        loop {
            if std::mem::take(&mut yield_first) {
                tokio::task::yield_now().await;
            }
            if let Err(e) = reader.messages(&mut frame, &mut batch) {
                end = Some(End::Protocol(e));
            }
            let mut inner = shared.lock();
            for msg in batch.drain(..) {
                replied |= matches!(msg, Message::Response { .. } | Message::Error { .. });
                let res = match msg {
                    Message::Response { id, body } => {
                        inner.answer(id, Ok(Response::new(body)), &mut out)
                    }
                    Message::Error {
                        id,
                        code,
                        message,
                        details,
                    } => {
                        let status = protocol::error_status(code, &message, details);
                        inner.answer(id, Err(Error::remote(status)), &mut out)
                    }
                    Message::Ping { data } => {
                        // Each PING costs a PONG, queued even while the server reads
                        // nothing: a server that floods PINGs and never reads made a client
                        // queue 90 MB of PONGs before its write timeout. So a server gets the
                        // budget a client gets (PROTOCOL.md §11); an honest one pings a few
                        // times a second at most (every 250 ms while it waits for a handler
                        // slot, §9).
                        if !pings.admit(last_recv, protocol::MAX_PINGS_PER_SEC) {
                            end = Some(End::Flood("too many pings"));
                            break;
                        }
                        wake |= inner.push_control(&Message::Pong { data });
                        Ok(())
                    }
                    Message::Pong { .. } => Ok(()),
                    Message::Ack { bytes } => match inner.outbox.ack(bytes) {
                        Ok(ready) => {
                            wake |= ready;
                            Ok(())
                        }
                        Err(_) => Err("ack for more fragment data than was sent"),
                    },
                    Message::GoAway { code: 0, .. } => {
                        shared.enter(&mut inner, Phase::Draining);
                        Ok(())
                    }
                    Message::GoAway { code, reason } => {
                        end = Some(End::GoAway(protocol::goaway_status(code, &reason)));
                        break;
                    }
                    Message::Request { .. } | Message::OneWay { .. } | Message::Cancel { .. } => {
                        Err("server sent a client-only message")
                    }
                };
                if let Err(why) = res {
                    end = Some(End::Protocol(CodecError::InvalidFrame(why)));
                    break;
                }
            }
            if end.is_none() && frame.left() > 0 {
                drop(inner);
                for (tx, reply) in out.drain(..) {
                    let _ = tx.send(reply);
                }
                yield_first = lone.backlog();
                continue;
            }
            // A piece of a reply in fragments is a reply making progress, as a whole one is.
            replied |= reader.in_message();
            if let Some(ack) = reader.take_ack() {
                wake |= inner.push_control(&ack);
            }
            if end.is_none()
                && inner.phase == Phase::Draining
                && inner.live == 0
                && inner.abandoned == 0
            {
                end = Some(End::Drained);
            }
            if end.is_none() && inner.closing && inner.live == 0 {
                // `Client::close`: the last live call is answered.
                end = Some(End::Closed);
            }
            break;
        }
        if replied {
            last_reply = last_recv;
        }
        if wake {
            shared.notify_writer.notify_one();
        }
        for (tx, reply) in out.drain(..) {
            let _ = tx.send(reply);
        }
        if let Some(end) = end {
            return end;
        }
        if lone.backlog() {
            tokio::task::yield_now().await;
        }
    }
}

/// Whether the callers the reader wakes are waiting in the runtime's global queue.
///
/// A worker keeps the tasks woken on it in a local queue of 256; beyond that they overflow,
/// half the queue at a time, into the global queue, which a busy worker looks at only once
/// every few dozen tasks. With several workers the others drain it; on a runtime of one worker
/// (one CPU, as in a container limited to one) the callers there wait while those in the local
/// queue call again and again: at 1,000 callers p99 was 26× p50 (8.2 ms against 0.32). So on
/// such a runtime the reader yields after waking a chunk while the global queue is not empty,
/// and the worker runs those callers before the reader wakes more (`bench/pinned.sh`, one core
/// a side): at 1,000 callers p99 0.6–0.7 ms at the same calls/s; at 10,000 p99 208 → 6.2 ms
/// (p50 5.6 ms, every caller served in turn) for 13 % fewer calls/s, which the hot few hundred
/// had made while the rest waited. With more workers it never yields: there the yields cost
/// calls/s and made writes smaller (socket writes per call 0.009 → 0.03 at 1,000 callers).
/// On a current-thread runtime the global queue holds only tasks woken from other threads.
struct LoneWorker(Option<tokio::runtime::RuntimeMetrics>);

impl LoneWorker {
    fn new() -> Self {
        let metrics = tokio::runtime::Handle::try_current()
            .ok()
            .map(|h| h.metrics())
            .filter(|m| m.num_workers() == 1);
        LoneWorker(metrics)
    }

    /// Woken tasks wait in the global queue of a one-worker runtime.
    fn backlog(&self) -> bool {
        self.0.as_ref().is_some_and(|m| m.global_queue_depth() > 0)
    }
}

/// The bounds [`check_stall`] applies: the stall bound, and the idle keepalive interval.
#[derive(Debug, Clone, Copy)]
struct Check {
    stall: Duration,
    keepalive: Option<Duration>,
}

/// When the server was last heard from, and when it last answered a call.
#[derive(Debug, Clone, Copy)]
struct Silence {
    last_recv: Instant,
    last_reply: Instant,
}

/// The stall rule (PROTOCOL.md §9), checked on a tick while calls are pending:
///
/// - nothing at all received for half the bound: PING the server;
/// - nothing at all for the whole bound (no reply, no PONG, none of the PINGs a busy server
///   sends while it cannot read): the server is gone or hung; close the connection, its calls
///   fail `is_stalled()`;
/// - replies still arriving: never stalled, however long single calls take;
/// - PONGs but no reply for the whole bound: the server's handlers are stuck; calls without a
///   deadline of their own fail `is_stalled()` at once (the server is told to stop them), calls
///   with one wait for it, and the connection stays.
fn check_stall(
    shared: &Shared,
    times: Silence,
    Check { stall, keepalive }: Check,
    pinging: &mut Pinging,
    out: &mut Vec<(oneshot::Sender<Reply>, Reply)>,
) -> Option<End> {
    let mut inner = shared.lock();
    let busy_since = match inner.busy_since {
        Some(b) if inner.live + inner.abandoned > 0 => b,
        _ => {
            // Idle: with a keepalive, ping after its interval of silence, and give up on a
            // server that answers nothing within the stall bound after.
            let interval = keepalive?;
            let silent = times.last_recv.elapsed();
            if silent >= interval + stall {
                return Some(End::Stalled);
            }
            if silent >= interval && pinging.may_ping() {
                let wake = inner.push_control(&Message::Ping { data: 0 });
                drop(inner);
                if wake {
                    shared.notify_writer.notify_one();
                }
            }
            return None;
        }
    };
    let silent = busy_since.max(times.last_recv).elapsed();
    if silent >= stall {
        return Some(End::Stalled);
    }
    let mut wake = false;
    if silent >= stall / 2 && pinging.may_ping() {
        wake |= inner.push_control(&Message::Ping { data: 0 });
    }
    let unanswered = busy_since.max(times.last_reply).elapsed();
    if unanswered >= stall && inner.live > 0 {
        wake |= inner.fail_stuck(shared, out);
    }
    drop(inner);
    if wake {
        shared.notify_writer.notify_one();
    }
    None
}
