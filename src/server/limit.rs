//! The server's concurrency limits, per connection and server-wide, as one tower service.
//!
//! Each limit is a count of calls in flight against a maximum, on atomics: a call takes a slot
//! with a compare-and-swap in `poll_ready` and gives it back with a decrement when its response
//! future completes or is dropped; a waker is involved only while somebody waits. tower's
//! `ConcurrencyLimit`, which this replaces, holds a tokio semaphore permit per call instead,
//! and giving one back takes the semaphore's waiters lock every time: with both limits that
//! was ~10 % of the server's CPU samples at 1,000 callers (docs/benchmarks.md, session 18).
//!
//! A per-connection limit that is not tighter than the server-wide one can never be the one
//! that stops a call, so it is not counted at all (the default: both are 8,192).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tower::Service;

/// Calls in flight against a maximum, shared by every holder of the `Arc`.
#[derive(Debug)]
pub(crate) struct Limit {
    max: usize,
    used: AtomicUsize,
    /// Services waiting for a slot: a give wakes one only when this is not zero.
    waiting: AtomicUsize,
    freed: Arc<Notify>,
}

impl Limit {
    pub(crate) fn new(max: usize) -> Arc<Limit> {
        Arc::new(Limit {
            max: max.max(1),
            used: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: Arc::new(Notify::new()),
        })
    }

    fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let mut used = self.used.load(SeqCst);
        while used < self.max {
            match self
                .used
                .compare_exchange_weak(used, used + 1, SeqCst, SeqCst)
            {
                Ok(_) => return Some(Slot(self.clone())),
                Err(now) => used = now,
            }
        }
        None
    }

    /// Slots in use now.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(SeqCst)
    }
}

/// A slot taken of a limit, given back when dropped.
struct Slot(Arc<Limit>);

impl Drop for Slot {
    fn drop(&mut self) {
        let limit = &self.0;
        limit.used.fetch_sub(1, SeqCst);
        // A waiter counts itself before its last try: either it sees this slot free, or this
        // sees it waiting (both sides SeqCst). `notify_one` with nobody registered yet keeps
        // the wake-up for the next `notified` poll, so a waiter between the two is not missed.
        if limit.waiting.load(SeqCst) != 0 {
            limit.freed.notify_one();
        }
    }
}

/// One service's wait for a slot of `limit`: counted in `waiting` for as long as it lives.
struct Waiter {
    limit: Arc<Limit>,
    notified: Pin<Box<OwnedNotified>>,
}

impl Waiter {
    fn new(limit: &Arc<Limit>) -> Waiter {
        limit.waiting.fetch_add(1, SeqCst);
        Waiter {
            limit: limit.clone(),
            notified: Box::pin(limit.freed.clone().notified_owned()),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // A wake-up this waiter received but did not use goes on to the next waiter
        // (`OwnedNotified`'s drop forwards a `notify_one`).
        self.limit.waiting.fetch_sub(1, SeqCst);
    }
}

/// The stack beneath the user's layers on every connection: the per-connection and the
/// server-wide concurrency limits ([`Server::max_concurrency_per_connection`] and
/// [`Server::max_concurrency`]) around the service.
///
/// `poll_ready` is pending while either limit is full, so the connection's reader stops
/// reading; the slot taken there goes with the call and comes back when its response future
/// completes or is dropped. Clones share the limits (not a slot taken for a call not yet made).
///
/// It is the service a layer added with [`Server::layer`] wraps, so a layer written for any
/// towerpc server is a `Layer<Limited<S>>`:
///
/// ```
/// use std::time::Duration;
/// use tower::Layer;
/// use towerpc::server::Limited;
///
/// fn fits<L: Layer<Limited<S>>, S>(_: &L) {}
/// let timeout = tower::timeout::TimeoutLayer::new(Duration::from_secs(1));
/// fits::<_, towerpc::dispatch::Dispatcher>(&timeout);
/// ```
///
/// [`Server::max_concurrency_per_connection`]: super::Server::max_concurrency_per_connection
/// [`Server::max_concurrency`]: super::Server::max_concurrency
/// [`Server::layer`]: super::Server::layer
pub struct Limited<S> {
    inner: S,
    /// `None` when it is not tighter than `global`.
    connection: Option<Arc<Limit>>,
    global: Arc<Limit>,
    /// Slots taken by `poll_ready` for the next call (the connection's first, so a global
    /// slot held means the connection's is too, where there is that limit).
    held_connection: Option<Slot>,
    held_global: Option<Slot>,
    waiter: Option<Waiter>,
}

impl<S> Limited<S> {
    pub(crate) fn new(inner: S, per_connection: usize, global: Arc<Limit>) -> Limited<S> {
        let connection = (per_connection < global.max).then(|| Limit::new(per_connection));
        Limited {
            inner,
            connection,
            global,
            held_connection: None,
            held_global: None,
            waiter: None,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Takes a slot of `limit`, or registers `waiter` for a wake-up when one is given back.
fn poll_take(limit: &Arc<Limit>, waiter: &mut Option<Waiter>, cx: &mut Context<'_>) -> Poll<Slot> {
    loop {
        if let Some(slot) = limit.try_take() {
            *waiter = None;
            return Poll::Ready(slot);
        }
        match waiter {
            // Count ourselves waiting, then try once more before sleeping.
            None => *waiter = Some(Waiter::new(limit)),
            Some(w) => {
                ready!(w.notified.as_mut().poll(cx));
                // Woken (or a stale wake-up): try again with a fresh registration.
                w.notified.set(limit.freed.clone().notified_owned());
            }
        }
    }
}

impl<S, R> Service<R> for Limited<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = LimitedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let (Some(limit), None) = (&self.connection, &self.held_connection) {
            self.held_connection = Some(ready!(poll_take(limit, &mut self.waiter, cx)));
        }
        if self.held_global.is_none() {
            self.held_global = Some(ready!(poll_take(&self.global, &mut self.waiter, cx)));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let global = self
            .held_global
            .take()
            .expect("Limited::call without a successful poll_ready");
        LimitedFuture {
            inner: self.inner.call(req),
            _slots: (self.held_connection.take(), global),
        }
    }
}

impl<S: Clone> Clone for Limited<S> {
    fn clone(&self) -> Self {
        Limited {
            inner: self.inner.clone(),
            connection: self.connection.clone(),
            global: self.global.clone(),
            held_connection: None,
            held_global: None,
            waiter: None,
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Limited<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limited")
            .field("inner", &self.inner)
            .field("per_connection", &self.connection.as_ref().map(|l| l.max))
            .field("global", &self.global.max)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The response future of [`Limited`]: the service's own, holding the call's slots until
    /// it completes or is dropped.
    pub struct LimitedFuture<F> {
        #[pin]
        inner: F,
        // The connection's (where it has a limit of its own) and the server-wide one.
        _slots: (Option<Slot>, Slot),
    }
}

impl<F: Future> Future for LimitedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

impl<F> std::fmt::Debug for LimitedFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitedFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_test::{assert_pending, assert_ready_ok, task};
    use tower::ServiceExt;

    fn echo() -> tower::util::ServiceFn<
        impl FnMut(u32) -> std::future::Ready<Result<u32, std::convert::Infallible>> + Clone,
    > {
        tower::service_fn(|x: u32| std::future::ready(Ok(x)))
    }

    #[test]
    fn a_full_limit_is_pending_until_a_call_finishes() {
        let global = Limit::new(2);
        let mut a = Limited::new(echo(), 8, global.clone());
        let mut b = a.clone();
        let mut c = a.clone();
        assert!(
            a.connection.is_none(),
            "8 is not tighter than 2: not counted"
        );

        let mut ready = task::spawn(a.ready());
        let first = assert_ready_ok!(ready.poll()).call(1);
        drop(ready);
        let mut ready = task::spawn(b.ready());
        let second = assert_ready_ok!(ready.poll()).call(2);
        drop(ready);
        assert_eq!(global.used(), 2);

        let mut third = task::spawn(c.ready());
        assert_pending!(third.poll());
        assert_pending!(third.poll());
        drop(first);
        assert!(third.is_woken(), "a slot given back wakes the waiter");
        let fut = assert_ready_ok!(third.poll()).call(3);
        drop(third);
        assert_eq!(global.used(), 2);
        drop((second, fut));
        assert_eq!(global.used(), 0);
        assert_eq!(global.waiting.load(SeqCst), 0);
    }

    #[test]
    fn the_tighter_per_connection_limit_stops_its_connection_only() {
        let global = Limit::new(10);
        let mut one = Limited::new(echo(), 1, global.clone());
        let mut other = Limited::new(echo(), 1, global.clone());

        let mut ready = task::spawn(one.ready());
        let held = assert_ready_ok!(ready.poll()).call(1);
        drop(ready);
        let mut again = task::spawn(one.ready());
        assert_pending!(again.poll());
        // Another connection has its own per-connection slot.
        let mut ready = task::spawn(other.ready());
        let _theirs = assert_ready_ok!(ready.poll()).call(2);
        drop(ready);
        drop(held);
        assert!(again.is_woken());
        assert_ready_ok!(again.poll());
    }

    #[test]
    fn slots_taken_for_a_call_never_made_come_back() {
        let global = Limit::new(1);
        let mut svc = Limited::new(echo(), 1, global.clone());
        assert_ready_ok!(task::spawn(svc.ready()).poll());
        assert_eq!(global.used(), 1);
        drop(svc);
        assert_eq!(global.used(), 0);
    }

    #[test]
    fn a_waiter_dropped_after_its_wake_up_passes_it_on() {
        let global = Limit::new(1);
        let mut a = Limited::new(echo(), 4, global.clone());
        let mut b = a.clone();
        let mut c = a.clone();
        let mut ready = task::spawn(a.ready());
        let held = assert_ready_ok!(ready.poll()).call(1);
        drop(ready);

        let mut second = task::spawn(b.ready());
        let mut third = task::spawn(c.ready());
        assert_pending!(second.poll());
        assert_pending!(third.poll());
        drop(held);
        assert!(
            second.is_woken() && !third.is_woken(),
            "one slot, one wake-up"
        );
        // `b` goes away without taking the slot: the wake-up goes to `c`.
        drop(second);
        drop(b);
        assert!(third.is_woken());
        assert_ready_ok!(third.poll());
        assert_eq!(global.waiting.load(SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost_across_threads() {
        // 16 services on 2 threads share 3 slots for 2,000 calls each, every call on a task
        // of its own: a lost wake-up leaves a service pending for ever, and the test hangs.
        let global = Limit::new(3);
        let svc = Limited::new(
            tower::service_fn(|()| async {
                tokio::task::yield_now().await;
                Ok::<_, std::convert::Infallible>(())
            }),
            2,
            global.clone(),
        );
        let all = async {
            let runs: Vec<_> = (0..16)
                .map(|_| {
                    let mut svc = svc.clone();
                    tokio::spawn(async move {
                        for _ in 0..2_000 {
                            let call = svc.ready().await.unwrap().call(());
                            tokio::spawn(call);
                        }
                    })
                })
                .collect();
            for run in runs {
                run.await.unwrap();
            }
            drop(svc);
            while global.used() != 0 {
                tokio::task::yield_now().await;
            }
        };
        // Wall-clock bound only to turn a hang into a failure.
        tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .expect("a service waited for ever: a wake-up was lost");
        assert_eq!(global.waiting.load(SeqCst), 0);
    }
}
