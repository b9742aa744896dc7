//! Deadlines that flow from the call a server is handling into the calls its handler makes.
//!
//! A server runs every handler inside a scope that holds the deadline of the call it serves
//! (the caller's timeout, counted from the request's arrival). A [`Client`](crate::Client) call
//! made while that handler runs is bounded by it: its timeout is the smaller of its own (or the
//! client's default) and what is left of the scope's deadline, and that is what the next server
//! learns. So a chain A → B → C started with 100 ms gives C what A and B left of it, and work
//! nobody waits for any more is not started. Cancels flow the same way: when A's caller
//! cancels, A's handler is stopped, which drops its call to B and so sends B a cancel, and so
//! on down the chain.
//!
//! The scope belongs to the handler's task: work the handler hands to a task of its own
//! (`tokio::spawn`) does not inherit it, unless wrapped in [`scope`] too. The same [`scope`]
//! lets any code (an HTTP handler, a job runner) give the towerpc calls it makes a deadline.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use tokio::time::Instant;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let deadline = Instant::now() + Duration::from_millis(100);
//! towerpc::deadline::scope(Some(deadline), async {
//!     // Every towerpc call made here gets at most what is left of the 100 ms.
//!     assert_eq!(towerpc::deadline::current(), Some(deadline));
//! })
//! .await;
//! assert_eq!(towerpc::deadline::current(), None);
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;

thread_local! {
    /// The deadline of the scope being polled on this thread (see `crate::scope`).
    static DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The deadline of the scope this code runs in: on a server, the deadline of the call being
/// handled. `None` outside any scope, or in a scope without a deadline.
pub fn current() -> Option<Instant> {
    crate::scope::current(&DEADLINE)
}

/// What is left of [`current`] now (zero once it has passed); `None` without a deadline.
pub fn remaining() -> Option<Duration> {
    current().map(|d| d.saturating_duration_since(Instant::now()))
}

/// Runs `fut` with `deadline` as its [`current`] deadline, which towerpc calls made while
/// polling it inherit. `None` runs it without one (a call made there is bounded by its own
/// timeout only, even inside a handler).
pub fn scope<F: Future>(deadline: Option<Instant>, fut: F) -> Scoped<F> {
    Scoped {
        inner: crate::scope::Scoped::new(&DEADLINE, deadline, fut),
    }
}

/// Runs `f` with `deadline` as the [`current`] deadline: a scope for one poll of a future.
pub(crate) fn sync_scope<R>(deadline: Option<Instant>, f: impl FnOnce() -> R) -> R {
    crate::scope::sync_scope(&DEADLINE, deadline, f)
}

pin_project! {
    /// A future run inside a deadline [`scope`].
    #[must_use = "futures do nothing unless polled"]
    pub struct Scoped<F> {
        #[pin]
        inner: crate::scope::Scoped<Instant, F>,
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

impl<F> std::fmt::Debug for Scoped<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scoped").finish_non_exhaustive()
    }
}

/// The longest a timer of this crate waits (30 years): a longer duration (`Duration::MAX` for
/// "never") is taken as this, so that adding it to an instant cannot overflow and panic.
pub(crate) const NEVER: Duration = Duration::from_secs(30 * 365 * 86_400);

/// `d`, at most [`NEVER`].
pub(crate) fn clamp(d: Duration) -> Duration {
    d.min(NEVER)
}
