//! One request's handler: the service's future run in the call's deadline and trace
//! scopes, under a lazily armed deadline, with panics isolated, ending in the one reply.
//!
//! The reader polls it once itself, in a box kept from one request to the next, and spawns it
//! in that box (with its connection and request bytes, [`Spawned`]) only if it waits. It is
//! written out by hand rather than as nested wrappers in an `async` block because it is made
//! for every request: each wrapper and each `await` state grows it, and every byte is moved
//! into its box.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::connection::Conn;
use super::recover::status_from_error;
use crate::error::{Code, Status};
use crate::stats::Counters;
use crate::trace::TraceContext;
use crate::{BoxError, Response};

pin_project! {
    /// Runs a handler and sends its reply.
    ///
    /// The deadline's timer is armed only if the handler does not finish on its first poll:
    /// most handlers answer at once, and a timer per request is a measurable share of a fast
    /// call's cost. The deadline still counts from when the request was read. The timer is
    /// boxed so that the common fast path does not carry it.
    pub(super) struct HandlerTask<F> {
        #[pin]
        fut: F,
        deadline: Option<Instant>,
        sleep: Option<Pin<Box<Sleep>>>,
        // The caller's trace context, which calls the handler makes continue.
        trace: Option<TraceContext>,
        // The call's span and start, only when a subscriber wants them.
        span: Option<Box<(tracing::Span, std::time::Instant)>>,
        // `None` for a one-way message.
        id: Option<u32>,
        // The call is entered in flight (not so while the reader runs its first poll with
        // nothing else in flight).
        entered: bool,
        // Request bytes (method, metadata, body) the handler holds: accounted only once it
        // runs on a task of its own (see `Spawned`).
        size: usize,
        done: bool,
    }
}

impl<F> HandlerTask<F> {
    pub(super) fn new(
        fut: F,
        id: Option<u32>,
        deadline: Option<Instant>,
        trace: Option<TraceContext>,
        span: Option<tracing::Span>,
        size: usize,
    ) -> Self {
        HandlerTask {
            fut,
            deadline,
            sleep: None,
            trace,
            span: span.map(|s| Box::new((s, std::time::Instant::now()))),
            id,
            entered: true,
            size,
            done: false,
        }
    }

    /// Whether the call is entered in flight, so that its reply must find it there.
    pub(super) fn entered(self: Pin<&mut Self>, entered: bool) {
        *self.project().entered = entered;
    }
}

impl<F, E> HandlerTask<F>
where
    F: Future<Output = Result<Response, E>>,
    E: Into<BoxError>,
{
    /// Polls the handler; once it ends, its reply goes to `conn`. The connection is lent by
    /// whoever polls: the reader for the first poll, [`Spawned`] after that, so a handler that
    /// answers at once costs no reference count of its own.
    pub(super) fn poll_on(self: Pin<&mut Self>, cx: &mut Context<'_>, conn: &Conn) -> Poll<()> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(());
        }
        let _entered = this.span.as_ref().map(|s| s.0.enter());
        let fut = this.fut;
        // The scopes are entered for each poll only: what the handler calls while it runs
        // inherits the deadline and the trace, and nothing else on this thread does.
        let poll = || catch_unwind(AssertUnwindSafe(|| fut.poll(cx)));
        let polled = match (*this.deadline, *this.trace) {
            (None, None) => poll(),
            (deadline, None) => crate::deadline::sync_scope(deadline, poll),
            (None, trace) => crate::trace::sync_scope(trace, poll),
            (deadline, trace) => {
                crate::deadline::sync_scope(deadline, || crate::trace::sync_scope(trace, poll))
            }
        };
        let reply = match polled {
            Ok(Poll::Ready(Ok(resp))) => Ok(resp.into_body()),
            Ok(Poll::Ready(Err(e))) => Err(status_from_error(e.into())),
            Err(_panic) => {
                // The panic payload may hold paths or secrets: it stays in this process.
                Counters::inc(&conn.counters.panics);
                Err(Status::new(Code::Internal, "handler panicked"))
            }
            Ok(Poll::Pending) => {
                let Some(deadline) = *this.deadline else {
                    return Poll::Pending;
                };
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Err(Status::new(Code::DeadlineExceeded, "deadline exceeded"))
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        };
        *this.done = true;
        Counters::inc(&conn.counters.calls);
        if reply.is_err() {
            Counters::inc(&conn.counters.errors);
        }
        if let Some(span) = this.span.as_deref() {
            let code = match &reply {
                Ok(_) => "ok".to_string(),
                Err(status) => status.code().to_string(),
            };
            span.0.record("code", code.as_str());
            span.0
                .record("latency_us", span.1.elapsed().as_micros() as u64);
        }
        match *this.id {
            Some(id) => conn.reply(id, reply, *this.entered),
            None => Counters::inc(&conn.counters.one_way),
        }
        Poll::Ready(())
    }
}

/// The box a handler is polled in: empty between handlers, kept by the reader for the next
/// one while handlers answer on their first poll.
pub(super) type TaskBox<F> = Pin<Box<Option<HandlerTask<F>>>>;

/// A handler that did not answer on its first poll (or was not polled on the reader), run on
/// a task of its own: still in the box it was first polled in, with its connection and the
/// request bytes it holds accounted into that connection's `in_flight_bytes` until it ends,
/// however it ends.
pub(super) struct Spawned<F> {
    // Dropped first: the bytes are given back once the handler no longer holds them.
    task: TaskBox<F>,
    held: HeldBytes,
}

impl<F> Spawned<F> {
    /// `task` holds a handler (its slot is never empty here).
    pub(super) fn new(task: TaskBox<F>, conn: &Arc<Conn>) -> Self {
        let size = task.as_ref().as_pin_ref().map_or(0, |t| t.size);
        conn.in_flight_bytes.fetch_add(size, Ordering::AcqRel);
        Spawned {
            task,
            held: HeldBytes {
                conn: conn.clone(),
                size,
            },
        }
    }
}

impl<F, E> Future for Spawned<F>
where
    F: Future<Output = Result<Response, E>>,
    E: Into<BoxError>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        match this.task.as_mut().as_pin_mut() {
            Some(task) => task.poll_on(cx, &this.held.conn),
            None => Poll::Ready(()),
        }
    }
}

/// Request bytes a spawned handler holds; released when its task ends, however it ends.
#[derive(Debug)]
struct HeldBytes {
    conn: Arc<Conn>,
    size: usize,
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.conn
            .in_flight_bytes
            .fetch_sub(self.size, Ordering::AcqRel);
        self.conn.notify_freed.notify_one();
    }
}
