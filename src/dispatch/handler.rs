//! [`Handler`]: which async functions and closures can serve a method, and their type erasure.

use std::any::type_name;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use super::context::CallContext;
use super::future::ResponseFuture;
use crate::error::{Code, Status};
use crate::{BoxError, Request};

/// An async function or closure that can serve a method of a
/// [`Dispatcher`](super::Dispatcher).
///
/// A handler is called with what its arguments ask for, and its output becomes the reply:
///
/// | arguments | |
/// |---|---|
/// | `()` | the request body is ignored |
/// | `(Req)` | the request, decoded from msgpack (`Req: DeserializeOwned`) |
/// | `(CallContext, Req)` | the call's [`CallContext`], then the request |
///
/// | output | reply |
/// |---|---|
/// | `()` | msgpack nil, which the client reads as `()` |
/// | `T: Serialize` | `T` as msgpack |
/// | `Result<T, E>`, `E: Into<BoxError>` | `T`, or an error response made from `E` |
///
/// With [`Dispatcher::route_with`](super::Dispatcher::route_with) the same shapes take an
/// `Arc<S>` first (`async fn get(self: Arc<Self>, key: String)` fits).
///
/// The trait is implemented for every such `Fn` and sealed. `M` is a marker the compiler infers
/// from the signature; users never name it, and no macro is needed. The one case inference
/// cannot settle is a `Result<T, E>` whose `E` is itself `Serialize` (`String`, `&str`, a
/// `#[derive(Serialize)]` error type): that `Result` is both a plain value and a fallible
/// output, and the compiler asks for type annotations. Return `Result<T, Status>` instead (see
/// [`Status::typed`](crate::Status::typed) for errors the client decodes back into their own
/// type), or `Result<T, BoxError>`.
///
/// # Examples
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use towerpc::dispatch::{CallContext, Dispatcher};
/// use towerpc::{BoxError, Code, Status};
///
/// #[derive(Serialize, Deserialize)]
/// struct Add {
///     a: i64,
///     b: i64,
/// }
///
/// async fn add(req: Add) -> i64 {
///     req.a + req.b
/// }
///
/// async fn div(req: (i64, i64)) -> Result<i64, Status> {
///     match req.0.checked_div(req.1) {
///         Some(q) => Ok(q),
///         None => Err(Status::new(Code::InvalidArgument, "division by zero")),
///     }
/// }
///
/// let d = Dispatcher::new()
///     .route("Calc.Add", add)
///     .route("Calc.Div", div)
///     .route("Ping", || async {})
///     .route("Parse", |s: String| async move { s.parse::<i64>().map_err(BoxError::from) })
///     .route("Deadline", |ctx: CallContext, (): ()| async move {
///         ctx.remaining().map(|d| d.as_millis() as u64)
///     });
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot serve a dispatcher method",
    note = "a handler is an async fn or closure taking (), (Req) or (CallContext, Req), \
            with Req: DeserializeOwned, and returning a Serialize value or Result<T, E> with \
            E: Into<BoxError>; with `route_with` an Arc<S> comes first"
)]
pub trait Handler<M>: private::Erase<M> + Send + Sync + 'static {}

impl<M, H> Handler<M> for H where H: private::Erase<M> + Send + Sync + 'static {}

/// A handler bound to shared state: what [`Dispatcher::route_with`](super::Dispatcher::route_with)
/// registers. Each call gets a clone of the `Arc`.
pub struct WithState<S, F> {
    state: Arc<S>,
    f: F,
}

impl<S, F> WithState<S, F> {
    pub(crate) fn new(state: Arc<S>, f: F) -> Self {
        WithState { state, f }
    }
}

impl<S, F> std::fmt::Debug for WithState<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithState")
            .field("state", &type_name::<S>())
            .field("handler", &type_name::<F>())
            .finish()
    }
}

pub(crate) mod private {
    use super::*;

    /// Type erasure: a handler becomes a shared [`Endpoint`] the route table can hold.
    // Sealed: public only so that `Handler` can name it as a supertrait.
    #[allow(unreachable_pub)]
    pub trait Erase<M> {
        fn erase(self) -> Arc<dyn Endpoint>;
        /// Type names of the request and the response, for `towerpc.methods`.
        fn types() -> (&'static str, &'static str);
    }

    /// A registered method, its types erased.
    #[allow(unreachable_pub)]
    pub trait Endpoint: Send + Sync + 'static {
        fn call(&self, req: Request) -> ResponseFuture;
    }

    /// How a handler's output becomes a reply body. `K` tells a plain value from a `Result`.
    #[allow(unreachable_pub)]
    pub trait Reply<K>: Send + 'static {
        /// The type that travels on success.
        type Value;
        fn into_reply(self) -> Result<Bytes, BoxError>;
    }

    /// Marker: the output is the value itself.
    #[allow(unreachable_pub, missing_debug_implementations)]
    pub enum Value {}

    /// Marker: the output is a `Result`.
    #[allow(unreachable_pub, missing_debug_implementations)]
    pub enum Fallible {}

    impl<T: Serialize + Send + 'static> Reply<Value> for T {
        type Value = T;

        fn into_reply(self) -> Result<Bytes, BoxError> {
            encode(&self)
        }
    }

    impl<T, E> Reply<Fallible> for Result<T, E>
    where
        T: Serialize + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        type Value = T;

        fn into_reply(self) -> Result<Bytes, BoxError> {
            // Left boxed: the server's error boundary (or a layer above the dispatcher) turns
            // it into a wire status, keeping a `Status` found in its `source()` chain.
            encode(&self.map_err(Into::into)?)
        }
    }
}

use self::private::{Endpoint, Erase, Reply};

fn encode<T: Serialize>(value: &T) -> Result<Bytes, BoxError> {
    crate::payload::encode_msgpack(value).map_err(|e| -> BoxError {
        Box::new(Status::new(
            Code::Internal,
            format!("response does not encode as {}: {e}", type_name::<T>()),
        ))
    })
}

/// Decodes the request body as `T` (msgpack, depth-capped like
/// [`from_msgpack`](crate::payload::from_msgpack)); the error names the method and the type.
fn decode<T: DeserializeOwned>(req: &Request) -> Result<T, BoxError> {
    crate::payload::decode_msgpack(req.body()).map_err(|e| {
        let msg = format!(
            "method {:?}: request does not decode as {}: {e}",
            req.method(),
            type_name::<T>()
        );
        // Coerced, not `.into()`: that would box the `Box<Status>` again and hide the
        // status from the server's downcast.
        let e: BoxError = Box::new(Status::new(Code::InvalidArgument, msg));
        e
    })
}

// Requests decode in `Endpoint::call`, that is on the connection's reader before the handler's
// task is spawned. That keeps the handler's future free of the route (no reference count
// bumped per call on a table that every worker thread shares) and answers a bad request
// without spawning anything. The price is that a large payload is decoded before the next
// request on the same connection is read; with payloads in the kilobytes this is far below the
// cost of the read itself.

// ===== plain functions =====

struct Fn0<F, K> {
    f: F,
    _k: PhantomData<fn() -> K>,
}

impl<F, Fut, K> Erase<(K,)> for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    K: 'static,
{
    fn erase(self) -> Arc<dyn Endpoint> {
        Arc::new(Fn0 {
            f: self,
            _k: PhantomData,
        })
    }

    fn types() -> (&'static str, &'static str) {
        ("()", type_name::<<Fut::Output as Reply<K>>::Value>())
    }
}

impl<F, Fut, K> Endpoint for Fn0<F, K>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    K: 'static,
{
    fn call(&self, _req: Request) -> ResponseFuture {
        ResponseFuture::handler((self.f)())
    }
}

struct Fn1<F, Req, K> {
    f: F,
    _k: PhantomData<fn(Req) -> K>,
}

impl<F, Fut, Req, K> Erase<(K, Req)> for F
where
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    Req: DeserializeOwned + 'static,
    K: 'static,
{
    fn erase(self) -> Arc<dyn Endpoint> {
        Arc::new(Fn1 {
            f: self,
            _k: PhantomData,
        })
    }

    fn types() -> (&'static str, &'static str) {
        (
            type_name::<Req>(),
            type_name::<<Fut::Output as Reply<K>>::Value>(),
        )
    }
}

impl<F, Fut, Req, K> Endpoint for Fn1<F, Req, K>
where
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    Req: DeserializeOwned + 'static,
    K: 'static,
{
    fn call(&self, req: Request) -> ResponseFuture {
        match decode::<Req>(&req) {
            Ok(arg) => ResponseFuture::handler((self.f)(arg)),
            Err(e) => ResponseFuture::error(e),
        }
    }
}

struct Fn2<F, Req, K> {
    f: F,
    _k: PhantomData<fn(Req) -> K>,
}

impl<F, Fut, Req, K> Erase<(K, CallContext, Req)> for F
where
    F: Fn(CallContext, Req) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    Req: DeserializeOwned + 'static,
    K: 'static,
{
    fn erase(self) -> Arc<dyn Endpoint> {
        Arc::new(Fn2 {
            f: self,
            _k: PhantomData,
        })
    }

    fn types() -> (&'static str, &'static str) {
        (
            type_name::<Req>(),
            type_name::<<Fut::Output as Reply<K>>::Value>(),
        )
    }
}

impl<F, Fut, Req, K> Endpoint for Fn2<F, Req, K>
where
    F: Fn(CallContext, Req) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    Req: DeserializeOwned + 'static,
    K: 'static,
{
    fn call(&self, req: Request) -> ResponseFuture {
        match decode::<Req>(&req) {
            Ok(arg) => ResponseFuture::handler((self.f)(CallContext::from(req), arg)),
            Err(e) => ResponseFuture::error(e),
        }
    }
}

// ===== functions of shared state =====

struct St<S, F, M> {
    inner: WithState<S, F>,
    _m: PhantomData<fn() -> M>,
}

impl<S, F, Fut, K> Erase<(K, Arc<S>)> for WithState<S, F>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    K: 'static,
{
    fn erase(self) -> Arc<dyn Endpoint> {
        Arc::new(St::<S, F, (K,)> {
            inner: self,
            _m: PhantomData,
        })
    }

    fn types() -> (&'static str, &'static str) {
        ("()", type_name::<<Fut::Output as Reply<K>>::Value>())
    }
}

impl<S, F, Fut, K> Endpoint for St<S, F, (K,)>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    K: 'static,
{
    fn call(&self, _req: Request) -> ResponseFuture {
        ResponseFuture::handler((self.inner.f)(self.inner.state.clone()))
    }
}

impl<S, F, Fut, Req, K> Erase<(K, Arc<S>, Req)> for WithState<S, F>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Req) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    Req: DeserializeOwned + 'static,
    K: 'static,
{
    fn erase(self) -> Arc<dyn Endpoint> {
        Arc::new(St::<S, F, (K, Req)> {
            inner: self,
            _m: PhantomData,
        })
    }

    fn types() -> (&'static str, &'static str) {
        (
            type_name::<Req>(),
            type_name::<<Fut::Output as Reply<K>>::Value>(),
        )
    }
}

impl<S, F, Fut, Req, K> Endpoint for St<S, F, (K, Req)>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Req) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    Req: DeserializeOwned + 'static,
    K: 'static,
{
    fn call(&self, req: Request) -> ResponseFuture {
        match decode::<Req>(&req) {
            Ok(arg) => ResponseFuture::handler((self.inner.f)(self.inner.state.clone(), arg)),
            Err(e) => ResponseFuture::error(e),
        }
    }
}

impl<S, F, Fut, Req, K> Erase<(K, Arc<S>, CallContext, Req)> for WithState<S, F>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, CallContext, Req) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    Req: DeserializeOwned + 'static,
    K: 'static,
{
    fn erase(self) -> Arc<dyn Endpoint> {
        Arc::new(St::<S, F, (K, CallContext, Req)> {
            inner: self,
            _m: PhantomData,
        })
    }

    fn types() -> (&'static str, &'static str) {
        (
            type_name::<Req>(),
            type_name::<<Fut::Output as Reply<K>>::Value>(),
        )
    }
}

impl<S, F, Fut, Req, K> Endpoint for St<S, F, (K, CallContext, Req)>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, CallContext, Req) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Reply<K>,
    Req: DeserializeOwned + 'static,
    K: 'static,
{
    fn call(&self, req: Request) -> ResponseFuture {
        match decode::<Req>(&req) {
            Ok(arg) => {
                let state = self.inner.state.clone();
                ResponseFuture::handler((self.inner.f)(state, CallContext::from(req), arg))
            }
            Err(e) => ResponseFuture::error(e),
        }
    }
}
