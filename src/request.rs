//! The raw request and response that client and server services exchange.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::Extensions;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::transport::ConnectInfo;

/// A raw call: a method name, an opaque body and call options.
///
/// This is the request type of both the client [`Service`](tower::Service) and the services a
/// server runs. Bodies are opaque bytes (msgpack when made by [`Client::invoke`](crate::Client::invoke)),
/// so the engine copies nothing, and cloning a request (as a retry layer does) copies no bytes
/// either: every part is a [`Bytes`] or a handle.
///
/// Accessors follow `http::Request` and tonic: `body()` / `body_mut()`, `metadata()` /
/// `metadata_mut()`, `set_timeout()` for a layer that holds `&mut Request`, and `with_*`
/// for building one.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use towerpc::{Request, Timeout};
///
/// let mut req = Request::new("Echo", "hi").with_timeout(Duration::from_millis(250));
/// assert_eq!(req.method(), "Echo");
/// assert_eq!(&req.body()[..], b"hi");
/// assert_eq!(req.timeout(), Timeout::After(Duration::from_millis(250)));
///
/// // A layer holding `&mut Request` can change it in place.
/// req.set_timeout(Timeout::Default);
/// assert_eq!(req.timeout(), Timeout::Default);
/// let retry = req.clone();
/// ```
#[derive(Clone)]
pub struct Request {
    pub(crate) method: Bytes,
    pub(crate) body: Bytes,
    pub(crate) metadata: Bytes,
    pub(crate) timeout: Timeout,
    /// On a server: when the caller stops waiting (the request's timeout counted from its
    /// arrival).
    pub(crate) deadline: Option<Instant>,
    pub(crate) one_way: bool,
    pub(crate) cancel: Option<CancellationToken>,
    pub(crate) extensions: LazyExtensions,
}

/// How long a call may take: the client's default, no bound, or a given duration.
///
/// On a client "use the client's default" and "no deadline" are different requests, so a layer
/// that reads a request's timeout and writes it back changes nothing. Converts from a
/// [`Duration`] (`After`) and from an `Option<Duration>` (`None` is [`Timeout::Never`]).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use towerpc::Timeout;
///
/// assert_eq!(Timeout::from(Duration::from_secs(1)), Timeout::After(Duration::from_secs(1)));
/// assert_eq!(Timeout::from(None::<Duration>), Timeout::Never);
/// assert_eq!(Timeout::default(), Timeout::Default);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Timeout {
    /// The client's default ([`client::Builder::timeout`](crate::client::Builder::timeout)).
    #[default]
    Default,
    /// No bound: the call waits for its reply, however long it takes.
    Never,
    /// This long, counted from when the call is made.
    After(Duration),
}

impl Timeout {
    /// The duration, resolving [`Timeout::Default`] to `default`; `None` means no bound.
    pub fn or(self, default: Option<Duration>) -> Option<Duration> {
        match self {
            Timeout::Default => default,
            Timeout::Never => None,
            Timeout::After(d) => Some(d),
        }
    }
}

impl From<Duration> for Timeout {
    fn from(d: Duration) -> Self {
        Timeout::After(d)
    }
}

impl From<Option<Duration>> for Timeout {
    fn from(d: Option<Duration>) -> Self {
        d.map_or(Timeout::Never, Timeout::After)
    }
}

impl Request {
    /// A request for `method` carrying `body`.
    ///
    /// # Panics
    ///
    /// Never; a method name that breaks the wire limits (empty, over 255 bytes) makes the call
    /// fail with an encode error instead.
    pub fn new(method: impl Into<Method>, body: impl Into<Bytes>) -> Self {
        Request {
            method: method.into().0,
            body: body.into(),
            metadata: Bytes::new(),
            timeout: Timeout::Default,
            deadline: None,
            one_way: false,
            cancel: None,
            extensions: LazyExtensions::default(),
        }
    }

    /// Sets this call's timeout (its deadline, counted from when it is made), overriding the
    /// client's default; see [`Timeout`]. A call made while a server handler runs is also
    /// bounded by what is left of the deadline of the call being served (see
    /// [`deadline`](crate::deadline)).
    #[must_use]
    pub fn with_timeout(mut self, timeout: impl Into<Timeout>) -> Self {
        self.timeout = timeout.into();
        self
    }

    /// Sets the timeout in place, for a layer that holds `&mut Request`.
    pub fn set_timeout(&mut self, timeout: impl Into<Timeout>) {
        self.timeout = timeout.into();
    }

    /// The timeout: on a client, the one set on this request ([`Timeout::Default`] if the
    /// client's default applies); on a server, what remained of the caller's deadline when
    /// the request arrived ([`Timeout::Never`] if it has none).
    pub fn timeout(&self) -> Timeout {
        self.timeout
    }

    /// On a server, when the caller stops waiting (the deadline it sent, counted from the
    /// request's arrival); `None` without one, and on requests a client has not sent yet.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Marks the request as one-way: the server runs it and sends nothing back, and the call
    /// completes with an empty response once the message is queued for the wire.
    #[must_use]
    pub fn one_way(mut self) -> Self {
        self.one_way = true;
        self
    }

    /// Whether the request is one-way.
    pub fn is_one_way(&self) -> bool {
        self.one_way
    }

    /// Attaches opaque metadata (at most 16 KiB; msgpack map by convention).
    #[must_use]
    pub fn with_metadata(mut self, metadata: Bytes) -> Self {
        self.metadata = metadata;
        self
    }

    /// The metadata bytes (empty if none).
    pub fn metadata(&self) -> &Bytes {
        &self.metadata
    }

    /// The metadata bytes, for a layer to replace or extend.
    pub fn metadata_mut(&mut self) -> &mut Bytes {
        &mut self.metadata
    }

    /// Cancels the call when `token` is cancelled: the call then resolves at once with an
    /// [`is_cancelled()`](crate::Error::is_cancelled) error and the server is told to stop its
    /// handler, as when the call's future is dropped. One token may cancel many calls.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use tokio_util::sync::CancellationToken;
    /// use towerpc::Request;
    ///
    /// # async fn f(client: towerpc::Client) {
    /// let stop = CancellationToken::new();
    /// let call = client.request(Request::new("Report.Build", "q3").with_cancel(stop.clone()));
    /// stop.cancel(); // from anywhere: another task, a signal handler, a UI
    /// assert!(call.await.unwrap_err().is_cancelled());
    /// # }
    /// ```
    #[must_use]
    pub fn with_cancel(mut self, token: CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Sets the cancellation token in place; see [`Request::with_cancel`].
    pub fn set_cancel(&mut self, token: impl Into<Option<CancellationToken>>) {
        self.cancel = token.into();
    }

    /// The method name.
    pub fn method(&self) -> &str {
        // Names are checked for UTF-8 when they are made or decoded.
        std::str::from_utf8(&self.method).unwrap_or_default()
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The body, for a layer to replace.
    pub fn body_mut(&mut self) -> &mut Bytes {
        &mut self.body
    }

    /// Takes the body out.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// Extensions: on a server they hold the connection's
    /// [`ConnectInfo`](crate::transport::ConnectInfo).
    ///
    /// The map is built the first time it is asked for, so a request whose handler never looks
    /// costs no allocation for it.
    pub fn extensions(&self) -> &Extensions {
        self.extensions.get()
    }

    /// Mutable extensions, for layers that add their own.
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        self.extensions.get_mut()
    }

    /// On a server, the connection's [`ConnectInfo`] (also in the extensions), without
    /// building the extensions map.
    pub fn connect_info(&self) -> Option<&ConnectInfo> {
        self.extensions.connect_info.as_deref()
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("body_len", &self.body.len())
            .field("timeout", &self.timeout)
            .field("one_way", &self.one_way)
            .finish()
    }
}

/// A method name, made from a `&'static str` without copying or from a `String`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method(pub(crate) Bytes);

impl From<&'static str> for Method {
    fn from(s: &'static str) -> Self {
        Method(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for Method {
    fn from(s: String) -> Self {
        Method(Bytes::from(s))
    }
}

impl From<&String> for Method {
    fn from(s: &String) -> Self {
        Method(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// A raw reply: an opaque body.
///
/// # Examples
///
/// ```
/// let resp = towerpc::Response::new("ok".into());
/// assert_eq!(&resp.body()[..], b"ok");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    body: Bytes,
}

impl Response {
    /// A response carrying `body`.
    pub fn new(body: Bytes) -> Self {
        Response { body }
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Takes the body out.
    pub fn into_body(self) -> Bytes {
        self.body
    }
}

/// Request extensions built on first use: the server seeds them with the connection's
/// [`ConnectInfo`], but only a handler or layer that looks pays for the map (three allocations
/// per request otherwise, a tenth of a small call's cost on the server).
#[derive(Default, Clone)]
pub(crate) struct LazyExtensions {
    map: OnceLock<Extensions>,
    pub(crate) connect_info: Option<Arc<ConnectInfo>>,
}

impl LazyExtensions {
    pub(crate) fn with_connect_info(info: Arc<ConnectInfo>) -> Self {
        LazyExtensions {
            map: OnceLock::new(),
            connect_info: Some(info),
        }
    }

    fn seed(&self) -> Extensions {
        let mut ext = Extensions::new();
        if let Some(info) = &self.connect_info {
            ext.insert(ConnectInfo::clone(info));
        }
        ext
    }

    pub(crate) fn get(&self) -> &Extensions {
        self.map.get_or_init(|| self.seed())
    }

    pub(crate) fn get_mut(&mut self) -> &mut Extensions {
        if self.map.get().is_none() {
            let seeded = self.seed();
            self.map = OnceLock::from(seeded);
        }
        match self.map.get_mut() {
            Some(ext) => ext,
            None => unreachable!("extensions were initialised just above"),
        }
    }
}

impl fmt::Debug for LazyExtensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("connect_info", &self.connect_info)
            .finish_non_exhaustive()
    }
}
