//! Values that a future's code reads while it is polled (the deadline, the trace context): a
//! thread-local cell, set for each poll of the future that holds the value and put back after.
//!
//! What tokio's `task_local!` does, for `Copy` values and without its `RefCell` and lazy
//! initialization: the server enters one or two such scopes for every handler's poll, and the
//! client reads the deadline at every call.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::thread::LocalKey;

use pin_project_lite::pin_project;

/// The cell behind a scoped value: `None` outside any scope.
pub(crate) type Key<T> = LocalKey<Cell<Option<T>>>;

/// The value in `key` for the code running now.
pub(crate) fn current<T: Copy + 'static>(key: &'static Key<T>) -> Option<T> {
    key.try_with(Cell::get).ok().flatten()
}

/// Runs `f` with `value` in `key`, and puts back what was there however `f` ends (a panic
/// included).
pub(crate) fn sync_scope<T: Copy + 'static, R>(
    key: &'static Key<T>,
    value: Option<T>,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static> {
        key: &'static Key<T>,
        prev: Option<T>,
    }
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            let _ = self.key.try_with(|c| c.set(self.prev));
        }
    }
    // A thread being torn down has no cell left: the code runs without the value.
    let Ok(prev) = key.try_with(|c| c.replace(value)) else {
        return f();
    };
    let _restore = Restore { key, prev };
    f()
}

pin_project! {
    /// A future polled, and dropped, with a value in `key`.
    pub(crate) struct Scoped<T, F>
    where
        T: Copy,
        T: 'static,
    {
        key: &'static Key<T>,
        value: Option<T>,
        // `None` only while it is dropped.
        #[pin]
        fut: Option<F>,
    }

    impl<T, F> PinnedDrop for Scoped<T, F>
    where
        T: Copy,
        T: 'static,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let mut fut = this.fut;
            // What the future's fields do as they drop (a call's cancel) sees the value too.
            sync_scope(this.key, *this.value, || fut.set(None));
        }
    }
}

impl<T: Copy + 'static, F> Scoped<T, F> {
    pub(crate) fn new(key: &'static Key<T>, value: Option<T>, fut: F) -> Self {
        Scoped {
            key,
            value,
            fut: Some(fut),
        }
    }
}

impl<T: Copy + 'static, F: Future> Future for Scoped<T, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let fut = this.fut;
        sync_scope(this.key, *this.value, || match fut.as_pin_mut() {
            Some(fut) => fut.poll(cx),
            None => unreachable!("a scoped future is polled only while it lives"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static VALUE: Cell<Option<u32>> = const { Cell::new(None) };
    }

    #[test]
    fn scopes_nest_and_put_back_what_was_there() {
        assert_eq!(current(&VALUE), None);
        sync_scope(&VALUE, Some(1), || {
            assert_eq!(current(&VALUE), Some(1));
            sync_scope(&VALUE, None, || assert_eq!(current(&VALUE), None));
            sync_scope(&VALUE, Some(2), || assert_eq!(current(&VALUE), Some(2)));
            assert_eq!(current(&VALUE), Some(1));
        });
        assert_eq!(current(&VALUE), None);
    }

    #[test]
    fn a_panic_in_a_scope_puts_back_what_was_there() {
        let caught = std::panic::catch_unwind(|| sync_scope(&VALUE, Some(3), || panic!("boom")));
        assert!(caught.is_err());
        assert_eq!(current(&VALUE), None);
    }

    #[test]
    fn a_scoped_future_sees_its_value_in_every_poll_and_as_it_drops() {
        struct SeesOnDrop(std::rc::Rc<Cell<Option<u32>>>);
        impl Drop for SeesOnDrop {
            fn drop(&mut self) {
                self.0.set(current(&VALUE));
            }
        }
        let seen = std::rc::Rc::new(Cell::new(None));
        let guard = SeesOnDrop(seen.clone());
        let mut polls = 0;
        let fut = Scoped::new(
            &VALUE,
            Some(7),
            std::future::poll_fn(move |cx| {
                let _keep = &guard;
                assert_eq!(current(&VALUE), Some(7));
                polls += 1;
                if polls < 3 {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                } else {
                    Poll::Ready(polls)
                }
            }),
        );
        let mut fut = Box::pin(fut);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(current(&VALUE), None);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(3));
        drop(fut);
        assert_eq!(seen.get(), Some(7));
        assert_eq!(current(&VALUE), None);
    }
}
