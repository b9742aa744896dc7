//! [`IntoError`]: a layer that gives a tower stack around a client towerpc's one error type.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::{BoxError, Error};

/// Converts the errors of the service it wraps (a `BoxError` out of tower layers, or any error
/// that converts into one) into a [`towerpc::Error`](Error), as `Error::from` does: tower's
/// `Elapsed` becomes `is_timeout()`, `Overloaded` becomes `is_overloaded()`, a towerpc error
/// comes back as it was. Put it outermost, so that callers check one set of predicates.
///
/// It does what `ServiceBuilder::map_err(Error::from)` does, as a named type: a closure or
/// function item there can make a future spawned on a multi-thread runtime fail to compile
/// ("implementation of `FnOnce` is not general enough", a rustc limitation).
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use tower::{ServiceBuilder, ServiceExt};
/// use towerpc::{retry::Policy, Client, IntoErrorLayer, Request};
///
/// # async fn f(client: Client) {
/// let svc = ServiceBuilder::new()
///     .layer(IntoErrorLayer::new())
///     .timeout(Duration::from_secs(2))
///     .retry(Policy::new())
///     .load_shed()
///     .concurrency_limit(256)
///     .service(client);
/// let call = tokio::spawn(svc.oneshot(Request::new("Echo", "hi")));
/// match call.await.unwrap() {
///     Ok(resp) => println!("{:?}", resp.body()),
///     Err(e) if e.is_timeout() => println!("too slow"),
///     Err(e) if e.is_overloaded() => println!("shed"),
///     Err(e) => println!("failed: {e}"),
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct IntoError<S> {
    inner: S,
}

/// The [`Layer`] of [`IntoError`].
#[derive(Clone, Copy, Debug, Default)]
pub struct IntoErrorLayer {
    _priv: (),
}

impl IntoErrorLayer {
    /// The layer.
    pub const fn new() -> Self {
        IntoErrorLayer { _priv: () }
    }
}

impl<S> Layer<S> for IntoErrorLayer {
    type Service = IntoError<S>;

    fn layer(&self, inner: S) -> IntoError<S> {
        IntoError { inner }
    }
}

impl<S> IntoError<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        IntoError { inner }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, R> Service<R> for IntoError<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(|e| Error::from(e.into()))
    }

    fn call(&mut self, req: R) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            _error: PhantomData,
        }
    }
}

pin_project! {
    /// The future of an [`IntoError`] service.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F, E> {
        #[pin]
        inner: F,
        _error: PhantomData<fn() -> E>,
    }
}

impl<F, T, E> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = ready!(self.project().inner.poll(cx));
        Poll::Ready(res.map_err(|e| Error::from(e.into())))
    }
}

impl<F, E> fmt::Debug for ResponseFuture<F, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
