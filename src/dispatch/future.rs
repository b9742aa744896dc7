//! [`ResponseFuture`]: a dispatched call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::handler::private::Reply;
use crate::{BoxError, Response};

type BoxFuture = Pin<Box<dyn Future<Output = Result<Bytes, BoxError>> + Send>>;

/// The future of a call made through the [`Dispatcher`](super::Dispatcher) service.
///
/// Routes hold handlers of different types, so a running handler's future is boxed (one
/// allocation per call, as in any router over heterogeneous handlers); an unknown method, a
/// request that does not decode and the built-in method answer without one.
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture {
    // Both states are `Unpin` (the handler's future is already pinned in its box), so this
    // future needs no pin projection.
    state: State,
}

enum State {
    Ready(Option<Result<Bytes, BoxError>>),
    Running(BoxFuture),
}

impl ResponseFuture {
    pub(crate) fn ready(reply: Result<Bytes, BoxError>) -> Self {
        ResponseFuture {
            state: State::Ready(Some(reply)),
        }
    }

    pub(crate) fn error(err: BoxError) -> Self {
        ResponseFuture::ready(Err(err))
    }

    /// Runs a handler's future and turns its output into a reply body.
    pub(crate) fn handler<Fut, K>(fut: Fut) -> Self
    where
        Fut: Future + Send + 'static,
        Fut::Output: Reply<K>,
    {
        ResponseFuture {
            state: State::Running(Box::pin(async move { fut.await.into_reply() })),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let reply = match &mut self.get_mut().state {
            State::Ready(reply) => reply
                .take()
                .expect("dispatch::ResponseFuture polled after completion"),
            State::Running(fut) => match fut.as_mut().poll(cx) {
                Poll::Ready(reply) => reply,
                Poll::Pending => return Poll::Pending,
            },
        };
        Poll::Ready(reply.map(Response::new))
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Ready(_) => "ready",
            State::Running(_) => "running",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
