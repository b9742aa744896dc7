//! A handler's deadline, armed lazily.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

pin_project! {
    /// Runs a handler under its deadline, but arms the timer only if the handler does not finish
    /// on its first poll: most handlers answer at once, and a timer per request is a measurable
    /// share of a fast call's cost. The deadline still counts from when the request was read,
    /// give or take the first poll. The timer is boxed so that the (common) fast path does not
    /// carry its hundred-odd bytes through every spawned task.
    pub(super) struct LazyDeadline<F> {
        #[pin]
        fut: F,
        deadline: Option<tokio::time::Instant>,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F> LazyDeadline<F> {
    pub(super) fn new(fut: F, deadline: Option<tokio::time::Instant>) -> Self {
        LazyDeadline {
            fut,
            deadline,
            sleep: None,
        }
    }
}

impl<F: Future> Future for LazyDeadline<F> {
    /// `None` when the deadline passed first.
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Some(out));
        }
        if let Some(d) = this.deadline.take() {
            *this.sleep = Some(Box::pin(tokio::time::sleep_until(d)));
        }
        match this.sleep {
            Some(sleep) => sleep.as_mut().poll(cx).map(|()| None),
            None => Poll::Pending,
        }
    }
}
