//! [`TypedMethod`]: one remote method as a typed tower `Service<Req>`; [`Invoke`]: the future
//! of [`Client::invoke`].

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use serde::{de::DeserializeOwned, Serialize};
use tower::Service;

use super::future::ResponseFuture;
use super::Client;
use crate::error::{Error, Result};
use crate::{Method, Request, Timeout};

impl Client {
    /// A typed handle for one method: a `Service<Req, Response = Resp>` that encodes each
    /// request as msgpack and decodes the reply, so tower layers (timeouts, retries, rate
    /// limits) stack on a single method.
    ///
    /// It shares this client's connection; readiness (a pending-table slot) is per handle,
    /// as with the [`Client`] service.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use tower::{Service, ServiceExt};
    ///
    /// # async fn f(client: towerpc::Client) -> towerpc::Result<()> {
    /// let mut add = client.method::<(i64, i64), i64>("Calc.Add");
    /// let sum = add.ready().await?.call((2, 3)).await?;
    /// assert_eq!(sum, 5);
    ///
    /// // Layers work on one method as on the whole client.
    /// let slow = tower::ServiceBuilder::new()
    ///     .timeout(std::time::Duration::from_secs(1))
    ///     .service(client.method::<String, String>("Report.Build"));
    /// # Ok(()) }
    /// ```
    pub fn method<Req, Resp>(&self, name: impl Into<Method>) -> TypedMethod<Req, Resp> {
        TypedMethod {
            client: self.clone(),
            method: name.into(),
            timeout: Timeout::Default,
            _types: PhantomData,
        }
    }
}

/// One remote method with its request and response types; made by [`Client::method`].
pub struct TypedMethod<Req, Resp> {
    client: Client,
    method: Method,
    timeout: Timeout,
    // `fn(Req) -> Resp`: the handle holds neither, so it is Send and Sync whatever they are.
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> TypedMethod<Req, Resp> {
    /// Sets the timeout of every call through this handle, overriding the client's default
    /// (see [`Request::with_timeout`]).
    #[must_use]
    pub fn timeout(mut self, timeout: impl Into<Timeout>) -> Self {
        self.timeout = timeout.into();
        self
    }

    /// The method's name.
    pub fn name(&self) -> &str {
        // Made from a `&str` or a `String`.
        std::str::from_utf8(&self.method.0).unwrap_or_default()
    }

    /// The client this handle calls through.
    pub fn get_ref(&self) -> &Client {
        &self.client
    }
}

impl<Req, Resp> Clone for TypedMethod<Req, Resp> {
    fn clone(&self) -> Self {
        // `Client::clone` drops the reserved slot: readiness belongs to the polled handle.
        TypedMethod {
            client: self.client.clone(),
            method: self.method.clone(),
            timeout: self.timeout,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> fmt::Debug for TypedMethod<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedMethod")
            .field("method", &self.name())
            .field("request", &std::any::type_name::<Req>())
            .field("response", &std::any::type_name::<Resp>())
            .finish()
    }
}

impl<Req, Resp> Service<Req> for TypedMethod<Req, Resp>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    type Response = Resp;
    type Error = Error;
    type Future = TypedFuture<Resp>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.client.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> TypedFuture<Resp> {
        let body = match crate::payload::to_msgpack(&req) {
            Ok(body) => body,
            Err(e) => {
                // Nothing goes out: give back the slot `poll_ready` reserved.
                self.client.permit = None;
                return TypedFuture::new(ResponseFuture::ready(Err(e)));
            }
        };
        let request = Request::new(self.method.clone(), body).with_timeout(self.timeout);
        TypedFuture::new(Service::call(&mut self.client, request))
    }
}

pin_project! {
    /// The future of a call through a [`TypedMethod`]: the reply decoded as `T`.
    ///
    /// Dropping it behaves as dropping the client's
    /// [`ResponseFuture`](super::future::ResponseFuture): the slot is freed and the server is
    /// told to cancel.
    #[must_use = "futures do nothing unless polled"]
    pub struct TypedFuture<T> {
        #[pin]
        inner: ResponseFuture,
        _t: PhantomData<fn() -> T>,
    }
}

impl<T> TypedFuture<T> {
    fn new(inner: ResponseFuture) -> Self {
        TypedFuture {
            inner,
            _t: PhantomData,
        }
    }
}

impl<T: DeserializeOwned> Future for TypedFuture<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let resp = ready!(self.project().inner.poll(cx))?;
        Poll::Ready(crate::payload::from_msgpack(resp.body()))
    }
}

impl<T> fmt::Debug for TypedFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedFuture")
            .field("inner", &self.inner)
            .finish()
    }
}

/// The future of [`Client::invoke`]: encodes the request and starts the call when first polled
/// (so in the deadline and trace scopes of that poll), then decodes the reply as `Resp`.
///
/// Dropping it behaves as dropping the client's
/// [`ResponseFuture`](super::future::ResponseFuture): the slot is freed and the server is told
/// to cancel. It holds the request by reference until the call starts, and the call itself
/// after: no larger than the call's own future, so many concurrent callers stay small.
#[must_use = "futures do nothing unless polled"]
pub struct Invoke<'a, Req: ?Sized, Resp> {
    state: InvokeState<'a, Req, Resp>,
}

enum InvokeState<'a, Req: ?Sized, Resp> {
    Unstarted {
        client: &'a Client,
        method: Method,
        req: &'a Req,
    },
    Started(TypedFuture<Resp>),
}

impl<'a, Req: ?Sized, Resp> Invoke<'a, Req, Resp> {
    pub(super) fn new(client: &'a Client, method: Method, req: &'a Req) -> Self {
        Invoke {
            state: InvokeState::Unstarted {
                client,
                method,
                req,
            },
        }
    }
}

impl<Req, Resp> Future for Invoke<'_, Req, Resp>
where
    Req: Serialize + ?Sized,
    Resp: DeserializeOwned,
{
    type Output = Result<Resp>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Resp>> {
        // Every field is `Unpin`: the call's future keeps its pinned parts in a box.
        let this = self.get_mut();
        if let InvokeState::Unstarted {
            client,
            method,
            req,
        } = &mut this.state
        {
            let call = match crate::payload::to_msgpack(*req) {
                Ok(body) => {
                    let method = std::mem::replace(method, Method(bytes::Bytes::new()));
                    client.start_call(Request::new(method, body))
                }
                // Nothing goes out; the error is the reply, as in `TypedMethod::call`.
                Err(e) => ResponseFuture::ready(Err(e)),
            };
            this.state = InvokeState::Started(TypedFuture::new(call));
        }
        match &mut this.state {
            InvokeState::Started(call) => Pin::new(call).poll(cx),
            InvokeState::Unstarted { .. } => unreachable!("started just above"),
        }
    }
}

impl<Req: ?Sized, Resp> fmt::Debug for Invoke<'_, Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            InvokeState::Unstarted { .. } => "unstarted",
            InvokeState::Started(_) => "started",
        };
        f.debug_struct("Invoke").field("state", &state).finish()
    }
}
