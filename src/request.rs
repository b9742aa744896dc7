//! The raw request and response that client and server services exchange.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::Extensions;

use crate::transport::ConnectInfo;

/// A raw call: a method name, an opaque body and call options.
///
/// This is the request type of both the client [`Service`](tower::Service) and the services a
/// server runs. Bodies are opaque bytes (msgpack when made by [`Client::call`](crate::Client::call)),
/// so the engine copies nothing.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use towerpc::Request;
///
/// let req = Request::new("Echo", "hi").timeout(Duration::from_millis(250));
/// assert_eq!(req.method(), "Echo");
/// assert_eq!(&req.body()[..], b"hi");
/// ```
pub struct Request {
    pub(crate) method: Bytes,
    pub(crate) body: Bytes,
    pub(crate) metadata: Bytes,
    pub(crate) timeout: Option<Option<Duration>>,
    pub(crate) one_way: bool,
    pub(crate) extensions: LazyExtensions,
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
            timeout: None,
            one_way: false,
            extensions: LazyExtensions::default(),
        }
    }

    /// Sets this call's timeout (its deadline, counted from when it is made), overriding the
    /// client's default. `None` waits for the reply without a bound.
    #[must_use]
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.timeout = Some(timeout.into());
        self
    }

    /// Marks the request as one-way: the server runs it and sends nothing back, and the call
    /// completes with an empty response once the message is queued for the wire.
    #[must_use]
    pub fn one_way(mut self) -> Self {
        self.one_way = true;
        self
    }

    /// Attaches opaque metadata (at most 16 KiB; msgpack map by convention).
    #[must_use]
    pub fn metadata(mut self, metadata: Bytes) -> Self {
        self.metadata = metadata;
        self
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

    /// Takes the body out.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// The metadata bytes (empty if none).
    pub fn get_metadata(&self) -> &Bytes {
        &self.metadata
    }

    /// Whether the request is one-way.
    pub fn is_one_way(&self) -> bool {
        self.one_way
    }

    /// The timeout: on a client, the one set on this request (`None` if the client default
    /// applies); on a server, what remained of the caller's deadline when the request arrived.
    pub fn get_timeout(&self) -> Option<Duration> {
        self.timeout.flatten()
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
#[derive(Default)]
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
