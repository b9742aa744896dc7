//! [`ResponseFuture`]: a call in flight.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Sleep;

use super::pending::{Reply, Shared};
use crate::error::{Error, Kind, Result};
use crate::stats::Counters;
use crate::Response;

pin_project! {
    /// The future of a call made through the [`Client`](super::Client) service.
    ///
    /// Dropping it before it completes frees the caller's slot at once and sends the server a
    /// best-effort cancel; the request id stays reserved until the server's reply (now
    /// discarded) arrives, so a late reply can never reach another caller.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture {
        state: State,
        #[pin]
        sleep: Option<Sleep>,
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

#[derive(Debug)]
struct Call {
    shared: Arc<Shared>,
    id: u32,
    gen: u64,
}

#[derive(Debug)]
enum State {
    Waiting {
        call: Call,
        rx: oneshot::Receiver<Reply>,
        // Held until the call ends: it is the caller's slot under backpressure.
        _permit: Option<OwnedSemaphorePermit>,
    },
    Ready {
        reply: Option<Reply>,
    },
}

impl ResponseFuture {
    pub(crate) fn waiting(
        shared: Arc<Shared>,
        id: u32,
        gen: u64,
        rx: oneshot::Receiver<Reply>,
        permit: Option<OwnedSemaphorePermit>,
        timeout: Option<std::time::Duration>,
    ) -> Self {
        ResponseFuture {
            state: State::Waiting {
                call: Call { shared, id, gen },
                rx,
                _permit: permit,
            },
            sleep: timeout.map(tokio::time::sleep),
        }
    }

    pub(crate) fn ready(reply: Reply) -> Self {
        ResponseFuture {
            state: State::Ready { reply: Some(reply) },
            sleep: None,
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let reply = match this.state {
            State::Ready { reply } => {
                return Poll::Ready(
                    reply
                        .take()
                        .expect("ResponseFuture polled after completion"),
                )
            }
            State::Waiting { call, rx, .. } => match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(reply)) => reply,
                // The sender only goes away without a reply if the client's state was torn
                // down, which the reset path normally reports; say so rather than hang.
                Poll::Ready(Err(_)) => {
                    Err(Error::new(Kind::ConnectionLost).target(call.shared.config.target.as_ref()))
                }
                Poll::Pending => match this.sleep.as_pin_mut().map(|s| s.poll(cx)) {
                    Some(Poll::Ready(())) => {
                        // Keep the id reserved (the reply may still come) but tell the server
                        // nothing: it knows the same deadline and stops the handler itself.
                        call.shared.abandon(call.id, call.gen, false);
                        Counters::inc(&call.shared.counters.timeouts);
                        Err(Error::new(Kind::Timeout).target(call.shared.config.target.as_ref()))
                    }
                    _ => return Poll::Pending,
                },
            },
        };
        if let State::Waiting { call, .. } = this.state {
            let c = &call.shared.counters;
            Counters::inc(&c.calls);
            if reply.is_err() {
                Counters::inc(&c.errors);
            }
        }
        // Completed: release the slot now and make drop a no-op.
        *this.state = State::Ready { reply: None };
        Poll::Ready(reply)
    }
}
