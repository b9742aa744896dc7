//! [`ResponseFuture`]: a call in flight.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::pending::{Gen, Refusal, Reply, Shared};
use super::{Handle, Permit};
use crate::error::{Error, Kind, Result};
use crate::stats::Counters;
use crate::{Request, Response};

pin_project! {
    /// The future of a call made through the [`Client`](super::Client) service.
    ///
    /// Dropping it before it completes frees the caller's slot at once and sends the server a
    /// best-effort cancel; the request id stays reserved until the server's reply (now
    /// discarded) arrives, so a late reply can never reach another caller. A cancellation
    /// token set with [`Request::with_cancel`] does the same and resolves the call with an
    /// `is_cancelled()` error.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture {
        state: State,
        // Boxed, and only for calls that need one of them: calls with the client's default
        // timeout are timed out by their connection's deadline queue, most carry no token,
        // and most are not traced.
        extras: Option<Pin<Box<Extras>>>,
    }

    impl PinnedDrop for ResponseFuture {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let State::Waiting { call, .. } = this.state {
                call.shared.abandon(call.id, call.gen, true);
            }
        }
    }
}

pin_project! {
    /// What only some calls carry: a timer (a deadline of their own, or a parked call's), a
    /// cancellation token's waiter, a span.
    struct Extras {
        #[pin]
        sleep: Option<Sleep>,
        #[pin]
        cancel: Option<WaitForCancellationFutureOwned>,
        trace: Option<Trace>,
    }
}

impl Extras {
    /// `None` when the call needs none of them.
    fn boxed(
        deadline: Option<Instant>,
        cancel: Option<CancellationToken>,
        trace: Option<Trace>,
    ) -> Option<Pin<Box<Extras>>> {
        if deadline.is_none() && cancel.is_none() && trace.is_none() {
            return None;
        }
        Some(Box::pin(Extras {
            sleep: deadline.map(tokio::time::sleep_until),
            cancel: cancel.map(CancellationToken::cancelled_owned),
            trace,
        }))
    }
}

/// Whether the call's token was cancelled (`Some(true)`) or its timer fired (`Some(false)`).
fn poll_extras(extras: &mut Option<Pin<Box<Extras>>>, cx: &mut Context<'_>) -> Option<bool> {
    let extras = extras.as_mut()?.as_mut().project();
    if extras
        .cancel
        .as_pin_mut()
        .is_some_and(|c| c.poll(cx).is_ready())
    {
        return Some(true);
    }
    if extras
        .sleep
        .as_pin_mut()
        .is_some_and(|s| s.poll(cx).is_ready())
    {
        return Some(false);
    }
    None
}

/// A call's span (`towerpc.client`: method, id, server, code, latency) and start.
#[derive(Debug)]
pub(crate) struct Trace {
    span: tracing::Span,
    started: std::time::Instant,
}

impl Trace {
    /// A span for a call of `req` to `shared`'s server, or `None` when no subscriber wants it.
    pub(crate) fn start(req: &Request, shared: &Shared) -> Option<Trace> {
        let span = tracing::debug_span!(
            "towerpc.client",
            method = tracing::field::Empty,
            id = tracing::field::Empty,
            server = tracing::field::Empty,
            code = tracing::field::Empty,
            latency_us = tracing::field::Empty,
        );
        if span.is_disabled() {
            return None;
        }
        span.record("method", req.method());
        if let Some(server) = &shared.config.target {
            span.record("server", server.as_ref());
        }
        Some(Trace {
            span,
            started: std::time::Instant::now(),
        })
    }

    pub(crate) fn id(&self, id: u32) {
        self.span.record("id", id);
    }

    fn end(&self, reply: &Reply) {
        let code = match reply {
            Ok(_) => "ok".to_string(),
            Err(e) => match e.code() {
                Some(code) => code.to_string(),
                None => e.to_string(),
            },
        };
        self.span.record("code", code.as_str());
        self.span
            .record("latency_us", self.started.elapsed().as_micros() as u64);
    }
}

#[derive(Debug)]
struct Call {
    shared: Arc<Shared>,
    id: u32,
    gen: Gen,
}

/// A call waiting for a free slot (`max_pending` calls are pending) before it starts. Its
/// deadline and token (in the future's extras) hold while it waits.
struct Acquiring {
    client: super::Client,
    req: Request,
    slots: tokio_util::sync::PollSemaphore,
    deadline: Option<Instant>,
    cancel: Option<CancellationToken>,
}

/// A wait-for-ready call waiting for a connection.
struct Parked {
    handle: Arc<Handle>,
    req: Request,
    permit: Permit,
    deadline: Option<Instant>,
    changes: WatchStream<usize>,
}

impl Drop for Parked {
    fn drop(&mut self) {
        // Given up before it started (its deadline, its token, its drop): the slot goes back.
        std::mem::replace(&mut self.permit, Permit::Uncounted).give_back(&self.handle);
    }
}

enum State {
    Waiting {
        call: Call,
        rx: oneshot::Receiver<Reply>,
    },
    Parked(Box<Parked>),
    // Boxed: only calls made while every slot is taken wait here.
    Acquiring(Box<Acquiring>),
    Ready {
        reply: Option<Reply>,
    },
}

impl ResponseFuture {
    pub(crate) fn waiting(
        (shared, id, gen, rx): Started,
        deadline: Option<Instant>,
        cancel: Option<CancellationToken>,
        trace: Option<Trace>,
    ) -> Self {
        if let Some(trace) = &trace {
            trace.id(id);
        }
        ResponseFuture {
            state: State::Waiting {
                call: Call { shared, id, gen },
                rx,
            },
            extras: Extras::boxed(deadline, cancel, trace),
        }
    }

    pub(crate) fn parked(
        handle: Arc<Handle>,
        req: Request,
        permit: Permit,
        deadline: Option<Instant>,
        cancel: Option<CancellationToken>,
    ) -> Self {
        let changes = handle.changes();
        let trace = Trace::start(&req, &handle.conns[0]);
        ResponseFuture {
            state: State::Parked(Box::new(Parked {
                handle,
                req,
                permit,
                deadline,
                changes,
            })),
            extras: Extras::boxed(deadline, cancel, trace),
        }
    }

    pub(crate) fn acquiring(
        client: super::Client,
        req: Request,
        slots: Arc<tokio::sync::Semaphore>,
        deadline: Option<Instant>,
        cancel: Option<CancellationToken>,
    ) -> Self {
        ResponseFuture {
            extras: Extras::boxed(deadline, cancel.clone(), None),
            state: State::Acquiring(Box::new(Acquiring {
                client,
                req,
                slots: tokio_util::sync::PollSemaphore::new(slots),
                deadline,
                cancel,
            })),
        }
    }

    /// While waiting for a slot: once one is free, the call itself (which starts then, to
    /// end by the deadline it had from the start); before that, the call's end if its token
    /// is cancelled or its deadline passes.
    fn poll_slot(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ResponseFuture> {
        let this = self.project();
        let State::Acquiring(acquiring) = this.state else {
            unreachable!("only called in the Acquiring state")
        };
        let permit = match acquiring.slots.poll_acquire(cx) {
            Poll::Ready(Some(permit)) => permit,
            Poll::Ready(None) => {
                return Poll::Ready(ResponseFuture::ready(Err(Error::new(Kind::Closed))))
            }
            Poll::Pending => {
                return match poll_extras(this.extras, cx) {
                    Some(true) => {
                        Poll::Ready(ResponseFuture::ready(Err(Error::new(Kind::Cancelled))))
                    }
                    Some(false) => {
                        let e = super::timed_out(&acquiring.client.handle.conns[0]).with(
                            "every call slot stayed taken until the deadline (max_pending)"
                                .to_string(),
                        );
                        Poll::Ready(ResponseFuture::ready(Err(e)))
                    }
                    None => Poll::Pending,
                }
            }
        };
        let State::Acquiring(acquiring) =
            std::mem::replace(this.state, State::Ready { reply: None })
        else {
            unreachable!("matched just above")
        };
        let Acquiring {
            client,
            req,
            deadline,
            cancel,
            ..
        } = *acquiring;
        Poll::Ready(client.start_by(
            req,
            Permit::Owned(permit),
            deadline,
            cancel,
            tokio::time::Instant::now(),
        ))
    }

    pub(crate) fn ready(reply: Reply) -> Self {
        ResponseFuture {
            state: State::Ready { reply: Some(reply) },
            extras: None,
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if matches!(self.state, State::Acquiring(_)) {
            match self.as_mut().poll_slot(cx) {
                Poll::Ready(call) => self.set(call),
                Poll::Pending => return Poll::Pending,
            }
        }
        let this = self.project();
        loop {
            let reply = match this.state {
                State::Ready { reply } => {
                    return Poll::Ready(
                        reply
                            .take()
                            .expect("ResponseFuture polled after completion"),
                    )
                }
                State::Acquiring(_) => unreachable!("left above, before the loop"),
                State::Parked(parked) => match poll_parked(parked, cx) {
                    Poll::Ready(Ok((shared, id, gen, rx))) => {
                        if let Some(trace) = this.extras.as_ref().and_then(|e| e.trace.as_ref()) {
                            trace.id(id);
                        }
                        let State::Parked(mut parked) =
                            std::mem::replace(this.state, State::Ready { reply: None })
                        else {
                            unreachable!("matched just above")
                        };
                        std::mem::replace(&mut parked.permit, Permit::Uncounted).give_to_table();
                        *this.state = State::Waiting {
                            call: Call { shared, id, gen },
                            rx,
                        };
                        continue;
                    }
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => match poll_extras(this.extras, cx) {
                        Some(true) => Err(Error::new(Kind::Cancelled)),
                        Some(false) => Err(super::timed_out(&parked.handle.conns[0])
                            .with("no connection came up before the deadline".to_string())),
                        None => return Poll::Pending,
                    },
                },
                State::Waiting { call, rx, .. } => {
                    match Pin::new(rx).poll(cx) {
                        Poll::Ready(Ok(reply)) => reply,
                        // The sender only goes away without a reply if the client's state was torn
                        // down, which the reset path normally reports; say so rather than hang.
                        Poll::Ready(Err(_)) => Err(Error::new(Kind::ConnectionLost)
                            .target(call.shared.config.target.as_ref())),
                        Poll::Pending => match poll_extras(this.extras, cx) {
                            Some(true) => {
                                // Tell the server, as a drop would.
                                call.shared.abandon(call.id, call.gen, true);
                                Err(Error::new(Kind::Cancelled)
                                    .target(call.shared.config.target.as_ref()))
                            }
                            Some(false) => {
                                // Keep the id reserved (the reply may still come) but tell the
                                // server nothing: it knows the same deadline and stops the
                                // handler itself.
                                call.shared.abandon(call.id, call.gen, false);
                                Err(super::timed_out(&call.shared))
                            }
                            None => return Poll::Pending,
                        },
                    }
                }
            };
            if let State::Waiting { call, .. } = this.state {
                let c = &call.shared.counters;
                Counters::inc(&c.calls);
                if reply.is_err() {
                    Counters::inc(&c.errors);
                }
            }
            // The span closes with the call.
            if let Some(trace) = this
                .extras
                .as_mut()
                .and_then(|e| e.as_mut().project().trace.take())
            {
                trace.end(&reply);
            }
            // Completed: release the slot now and make drop a no-op.
            *this.state = State::Ready { reply: None };
            return Poll::Ready(reply);
        }
    }
}

/// A call queued on a connection: the connection, the id, its generation, the reply.
pub(crate) type Started = (Arc<Shared>, u32, Gen, oneshot::Receiver<Reply>);

/// Tries again each time the number of live connections changes.
fn poll_parked(parked: &mut Parked, cx: &mut Context<'_>) -> Poll<Result<Started>> {
    loop {
        if parked.handle.is_up() || parked.handle.is_closed() {
            match parked
                .handle
                .try_start(&mut parked.req, parked.deadline, Instant::now(), false)
            {
                // Its own timer, armed while it waited, keeps the deadline.
                Ok((started, _)) => return Poll::Ready(Ok(started)),
                Err(Refusal::Fail(e)) => return Poll::Ready(Err(e)),
                Err(Refusal::Park) => {}
            }
        }
        match Pin::new(&mut parked.changes).poll_next(cx) {
            Poll::Ready(Some(_)) => continue,
            Poll::Ready(None) => return Poll::Ready(Err(Error::new(Kind::Closed))),
            Poll::Pending => return Poll::Pending,
        }
    }
}
