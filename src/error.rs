//! The crate [`Error`], the wire [`Code`]s and the remote [`Status`].
//!
//! `Error` is opaque: ask it what happened through its predicates (`is_timeout`, `is_remote`,
//! ...), [`Error::code`] and [`Error::status`]. Its message text and the concrete types behind
//! `source()` are not part of the stable API.

use std::{fmt, net::SocketAddr, sync::Arc};

use bytes::Bytes;

use crate::codec::code;
use crate::BoxError;

/// A `Result` with the crate [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with a call, a client or a server.
///
/// # Examples
///
/// ```
/// # async fn f(client: towerpc::Client) {
/// match client.invoke::<u64, u64>("Calc.Double", &21).await {
///     Ok(n) => println!("{n}"),
///     Err(e) if e.is_timeout() => println!("too slow"),
///     Err(e) if e.is_remote() => println!("server said {:?}: {e}", e.code()),
///     Err(e) => println!("failed: {e}"),
/// }
/// # }
/// ```
pub struct Error {
    inner: Box<ErrorImpl>,
}

struct ErrorImpl {
    kind: Kind,
    /// The server as it was dialed: an address, a path, whatever the connector targets.
    target: Option<Arc<str>>,
    source: Option<BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The call's deadline passed before its reply arrived.
    Timeout,
    /// The server answered with an error (the source is a [`Status`]).
    Remote,
    /// No connection to the server right now (dial failed, or backing off between dials).
    Unavailable,
    /// The connection broke while the call was in flight; it may or may not have run.
    ConnectionLost,
    /// The server stopped answering (no reply nor pong within the stall bound).
    Stalled,
    /// The client's pending-call table was full and this call was the oldest queued one
    /// (or, with backpressure off, the new one).
    Overloaded,
    /// The client was closed, or the call was abandoned.
    Closed,
    /// The client is closing (`Client::close`) and refused the call before sending it.
    Closing,
    /// The call was cancelled before it completed.
    Cancelled,
    /// The request could not be encoded (serde, or over a wire limit).
    Encode,
    /// The response could not be decoded into the expected type.
    Decode,
    /// The peer broke the protocol; the connection was closed.
    Protocol,
    /// The connection preface exchange failed.
    Handshake,
    /// Binding, accepting or another local I/O failure.
    Io,
    /// A tower layer around the client failed in a way of its own (see `From<BoxError>`).
    Service,
}

impl Error {
    pub(crate) fn new(kind: Kind) -> Error {
        Error {
            inner: Box::new(ErrorImpl {
                kind,
                target: None,
                source: None,
            }),
        }
    }

    pub(crate) fn with(mut self, source: impl Into<BoxError>) -> Error {
        self.inner.source = Some(source.into());
        self
    }

    pub(crate) fn target(mut self, target: Option<&Arc<str>>) -> Error {
        self.inner.target = target.cloned();
        self
    }

    pub(crate) fn remote(status: Status) -> Error {
        Error::new(Kind::Remote).with(status)
    }

    /// The call's deadline passed, locally or on the server (`DEADLINE_EXCEEDED`).
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == Kind::Timeout || self.code() == Some(Code::DeadlineExceeded)
    }

    /// The server answered with an error; see [`Error::status`].
    pub fn is_remote(&self) -> bool {
        self.inner.kind == Kind::Remote
    }

    /// The client is closed, or the connection is gone and the call cannot complete.
    pub fn is_closed(&self) -> bool {
        matches!(
            self.inner.kind,
            Kind::Closed | Kind::Closing | Kind::ConnectionLost
        )
    }

    /// There is no connection to the server now; the call was not sent.
    pub fn is_unavailable(&self) -> bool {
        self.inner.kind == Kind::Unavailable
    }

    /// The server stopped answering while calls were pending.
    pub fn is_stalled(&self) -> bool {
        self.inner.kind == Kind::Stalled
    }

    /// The call was not made because of load: the client had too many pending calls, or a
    /// load-shedding layer (tower's `Overloaded`) turned it away.
    pub fn is_overloaded(&self) -> bool {
        self.inner.kind == Kind::Overloaded
    }

    /// The call was cancelled (locally, or by the server with `CANCELLED`).
    pub fn is_cancelled(&self) -> bool {
        self.inner.kind == Kind::Cancelled || self.code() == Some(Code::Cancelled)
    }

    /// The request could not be encoded.
    pub fn is_encode(&self) -> bool {
        self.inner.kind == Kind::Encode
    }

    /// The response could not be decoded.
    pub fn is_decode(&self) -> bool {
        self.inner.kind == Kind::Decode
    }

    /// The peer broke the wire protocol (or the preface exchange failed).
    pub fn is_protocol(&self) -> bool {
        matches!(self.inner.kind, Kind::Protocol | Kind::Handshake)
    }

    /// The call certainly did not run on the server, so sending it again is safe even if it is
    /// not idempotent: it was never sent (no connection, the connection broke before the
    /// request was written, or a layer turned it away), or the server refused it unprocessed
    /// (`REFUSED`).
    pub fn is_retry_safe(&self) -> bool {
        matches!(
            self.inner.kind,
            Kind::Unavailable | Kind::Overloaded | Kind::Encode | Kind::Closing
        ) || self.code() == Some(Code::Refused)
    }

    /// A copy for a second owner: same kind, server and status; other sources are kept as
    /// text.
    fn duplicate(&self) -> Error {
        let mut e = Error::new(self.inner.kind).target(self.inner.target.as_ref());
        if let Some(source) = &self.inner.source {
            e = match source.downcast_ref::<Status>() {
                Some(status) => e.with(status.clone()),
                None => e.with(source.to_string()),
            };
        }
        e
    }

    /// The typed error a handler sent (see [`Status::typed`]), decoded as `E`: `None` if the
    /// error is not remote, carries no details, or they do not decode as `E`.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn f(client: towerpc::Client) {
    /// #[derive(serde::Deserialize)]
    /// enum CacheError {
    ///     Missing { key: String },
    ///     Full,
    /// }
    ///
    /// if let Err(e) = client.invoke::<String, String>("Cache.Get", &"k".to_string()).await {
    ///     match e.details::<CacheError>() {
    ///         Some(CacheError::Missing { key }) => println!("no {key}"),
    ///         Some(CacheError::Full) => println!("full"),
    ///         None => println!("failed: {e}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn details<E: serde::de::DeserializeOwned>(&self) -> Option<E> {
        self.status()?.details_as()
    }

    /// The server's error code, for remote errors.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }

    /// The server's [`Status`], for remote errors.
    pub fn status(&self) -> Option<&Status> {
        if self.inner.kind != Kind::Remote {
            return None;
        }
        self.inner.source.as_ref()?.downcast_ref::<Status>()
    }

    /// The server the error concerns, as it was dialed (an address, a socket path, ...).
    pub fn server(&self) -> Option<&str> {
        self.inner.target.as_deref()
    }

    /// The server's socket address, when it was dialed by address.
    pub fn server_addr(&self) -> Option<SocketAddr> {
        self.server()?.parse().ok()
    }

    /// The connection could not be set up: TLS, the preface exchange, or an `on_connect` hook
    /// refused it.
    pub fn is_handshake(&self) -> bool {
        self.inner.kind == Kind::Handshake
    }

    fn description(&self) -> &'static str {
        match self.inner.kind {
            Kind::Timeout => "call timed out",
            Kind::Remote => "server returned an error",
            Kind::Unavailable => "server unavailable",
            Kind::ConnectionLost => "connection lost while the call was in flight",
            Kind::Stalled => "server stopped answering",
            Kind::Overloaded => "too many pending calls",
            Kind::Closed | Kind::Closing => "client closed",
            Kind::Cancelled => "call cancelled",
            Kind::Encode => "failed to encode request",
            Kind::Decode => "failed to decode response",
            Kind::Protocol => "protocol error",
            Kind::Handshake => "connection handshake failed",
            Kind::Io => "i/o error",
            Kind::Service => "service error",
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_tuple("towerpc::Error");
        d.field(&self.inner.kind);
        if let Some(target) = &self.inner.target {
            d.field(target);
        }
        if let Some(source) = &self.inner.source {
            d.field(source);
        }
        d.finish()
    }
}

/// `{}` says what happened and to which server; the cause is [`source`], so error reporters
/// that walk the chain (anyhow, eyre, tracing) print each cause once. `{:#}` appends the whole
/// chain on one line, for a quick log line.
///
/// [`source`]: std::error::Error::source
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())?;
        if let Some(target) = &self.inner.target {
            write!(f, " ({target})")?;
        }
        if f.alternate() {
            let mut cur = std::error::Error::source(self);
            while let Some(cause) = cur {
                write!(f, ": {cause}")?;
                cur = cause.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|e| &**e as &(dyn std::error::Error + 'static))
    }
}

/// One error type after any tower stack: converts the `BoxError` that a `ServiceBuilder` stack
/// around a [`Client`](crate::Client) returns back into an [`Error`], so that one set of
/// predicates answers every question.
///
/// - a towerpc `Error` (also one wrapped by tower's `Buffer`) comes back as it was;
/// - tower's `Elapsed` (the `timeout` layer) is [`is_timeout()`](Error::is_timeout);
/// - tower's `Overloaded` (the `load_shed` layer) is [`is_overloaded()`](Error::is_overloaded)
///   and [`is_retry_safe()`](Error::is_retry_safe): the call was never made;
/// - tower's buffer `Closed` is [`is_closed()`](Error::is_closed);
/// - a [`Status`] is a remote error with that status (what a server, or a layer or mock
///   speaking for one, said);
/// - anything else is kept as the [`source`](std::error::Error::source) of a service error.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use towerpc::{Client, Error, Request};
///
/// # async fn f(client: Client) {
/// let mut svc = ServiceBuilder::new()
///     .timeout(Duration::from_secs(1))
///     .load_shed()
///     .concurrency_limit(64)
///     .service(client);
/// let res = match svc.ready().await {
///     Ok(svc) => svc.call(Request::new("Echo", "hi")).await,
///     Err(e) => Err(e),
/// };
/// if let Err(e) = res.map_err(Error::from) {
///     if e.is_timeout() {
///         println!("too slow");
///     } else if e.is_overloaded() {
///         println!("shed");
///     }
/// }
/// # }
/// ```
impl From<BoxError> for Error {
    fn from(e: BoxError) -> Error {
        let e = match e.downcast::<Error>() {
            Ok(e) => return *e,
            Err(e) => e,
        };
        match classify(&*e) {
            Ok(ours) => ours,
            Err(kind) => Error::new(kind).with(e),
        }
    }
}

impl Error {
    /// What `Error::from(e)` would say, without taking `e` (the source is left out).
    pub(crate) fn peek(e: &BoxError) -> Error {
        match classify(&**e) {
            Ok(ours) => ours,
            Err(kind) => Error::new(kind),
        }
    }
}

/// Finds what a layer's error means: a towerpc `Error` in its chain (copied), or the kind of a
/// known tower error. Tower's `Buffer` shares its inner service's error behind its own, so
/// the whole chain is searched.
fn classify(e: &(dyn std::error::Error + 'static)) -> std::result::Result<Error, Kind> {
    match known_errors(e).next() {
        Some(Known::Ours(ours)) => Ok(ours.duplicate()),
        // The wire's own error: what a server (or a layer speaking for one) said.
        Some(Known::Status(status)) => Ok(Error::remote(status.clone())),
        Some(Known::Elapsed) => Err(Kind::Timeout),
        Some(Known::Overloaded) => Err(Kind::Overloaded),
        Some(Known::Closed) => Err(Kind::Closed),
        None => Err(Kind::Service),
    }
}

/// An error in a `source()` chain that towerpc reads: its own, a wire status, or one of
/// tower's well-known errors.
pub(crate) enum Known<'a> {
    Ours(&'a Error),
    Status(&'a Status),
    /// `tower::timeout`'s.
    Elapsed,
    /// `tower::load_shed`'s.
    Overloaded,
    /// `tower::buffer`'s, its worker gone.
    Closed,
}

/// The errors of `e`'s chain that towerpc reads, `e` first: what the client makes of a layer's
/// error (`Error::from`) and the server of a handler's (`server::recover`) both come from here.
pub(crate) fn known_errors<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = Known<'a>> {
    std::iter::successors(Some(e), |e| e.source()).filter_map(|e| {
        if let Some(ours) = e.downcast_ref::<Error>() {
            Some(Known::Ours(ours))
        } else if let Some(status) = e.downcast_ref::<Status>() {
            Some(Known::Status(status))
        } else if e.is::<tower::timeout::error::Elapsed>() {
            Some(Known::Elapsed)
        } else if e.is::<tower::load_shed::error::Overloaded>() {
            Some(Known::Overloaded)
        } else if e.is::<tower::buffer::error::Closed>() {
            Some(Known::Closed)
        } else {
            None
        }
    })
}

/// Error codes carried on the wire in `ERROR` and `GOAWAY` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// The call was cancelled.
    Cancelled,
    /// An error with no better code (also any code this version does not know).
    Unknown,
    /// The request did not decode into the handler's type.
    InvalidArgument,
    /// The deadline passed before the handler finished.
    DeadlineExceeded,
    /// No handler for the method.
    NotFound,
    /// Not processed, safe to retry: the server is draining or overloaded.
    Refused,
    /// A limit was hit.
    ResourceExhausted,
    /// The handler panicked (no panic text is sent).
    Internal,
    /// The service is unavailable.
    Unavailable,
    /// The handler returned an error.
    Application,
    /// The peer broke the protocol.
    ProtocolError,
    /// A frame above the limit.
    FrameTooLarge,
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// The peer stopped making progress.
    Stalled,
}

impl Code {
    /// The code for a wire value; unknown values read as [`Code::Unknown`].
    pub fn from_u16(v: u16) -> Code {
        match v {
            code::CANCELLED => Code::Cancelled,
            code::INVALID_ARGUMENT => Code::InvalidArgument,
            code::DEADLINE_EXCEEDED => Code::DeadlineExceeded,
            code::NOT_FOUND => Code::NotFound,
            code::REFUSED => Code::Refused,
            code::RESOURCE_EXHAUSTED => Code::ResourceExhausted,
            code::INTERNAL => Code::Internal,
            code::UNAVAILABLE => Code::Unavailable,
            code::APPLICATION => Code::Application,
            code::PROTOCOL_ERROR => Code::ProtocolError,
            code::FRAME_TOO_LARGE => Code::FrameTooLarge,
            code::UNSUPPORTED_VERSION => Code::UnsupportedVersion,
            code::STALLED => Code::Stalled,
            _ => Code::Unknown,
        }
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        match self {
            Code::Cancelled => code::CANCELLED,
            Code::Unknown => code::UNKNOWN,
            Code::InvalidArgument => code::INVALID_ARGUMENT,
            Code::DeadlineExceeded => code::DEADLINE_EXCEEDED,
            Code::NotFound => code::NOT_FOUND,
            Code::Refused => code::REFUSED,
            Code::ResourceExhausted => code::RESOURCE_EXHAUSTED,
            Code::Internal => code::INTERNAL,
            Code::Unavailable => code::UNAVAILABLE,
            Code::Application => code::APPLICATION,
            Code::ProtocolError => code::PROTOCOL_ERROR,
            Code::FrameTooLarge => code::FRAME_TOO_LARGE,
            Code::UnsupportedVersion => code::UNSUPPORTED_VERSION,
            Code::Stalled => code::STALLED,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Code::Cancelled => "cancelled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid argument",
            Code::DeadlineExceeded => "deadline exceeded",
            Code::NotFound => "not found",
            Code::Refused => "refused",
            Code::ResourceExhausted => "resource exhausted",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Application => "application error",
            Code::ProtocolError => "protocol error",
            Code::FrameTooLarge => "frame too large",
            Code::UnsupportedVersion => "unsupported version",
            Code::Stalled => "stalled",
        })
    }
}

/// An error as it travels on the wire: a [`Code`], a message and optional details.
///
/// A handler returns a `Status` (boxed as its error) to choose the code the client sees; any other
/// error becomes [`Code::Application`] with the error's `Display` text. On the client,
/// [`Error::status`] gives it back.
///
/// # Examples
///
/// ```
/// use towerpc::{Code, Status};
///
/// let s = Status::new(Code::NotFound, "no such user");
/// assert_eq!(s.code(), Code::NotFound);
/// assert_eq!(s.to_string(), "not found: no such user");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    code: Code,
    message: String,
    details: Bytes,
}

impl Status {
    /// A status with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
            details: Bytes::new(),
        }
    }

    /// Attaches opaque details (msgpack by convention) for the client to decode.
    #[must_use]
    pub fn with_details(mut self, details: Bytes) -> Status {
        self.details = details;
        self
    }

    /// The code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The details bytes (empty if none).
    pub fn details(&self) -> &Bytes {
        &self.details
    }

    /// A status for a typed error: `code`, the error's `Display` text as the message, and the
    /// error itself as msgpack details, which the client decodes back with
    /// [`Error::details`]. A handler returns it (for instance through a
    /// `From<MyError> for Status` impl and `?`) when the caller should be able to match on the
    /// error rather than parse its text. Should `error` fail to encode, the details stay empty.
    ///
    /// # Examples
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use towerpc::{Code, Status};
    ///
    /// #[derive(Debug, PartialEq, Serialize, Deserialize)]
    /// enum CacheError {
    ///     Missing { key: String },
    /// }
    ///
    /// impl std::fmt::Display for CacheError {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         match self {
    ///             CacheError::Missing { key } => write!(f, "no entry for {key:?}"),
    ///         }
    ///     }
    /// }
    ///
    /// impl From<CacheError> for Status {
    ///     fn from(e: CacheError) -> Status {
    ///         Status::typed(Code::NotFound, &e)
    ///     }
    /// }
    ///
    /// let s = Status::from(CacheError::Missing { key: "k".into() });
    /// assert_eq!(s.message(), "no entry for \"k\"");
    /// assert_eq!(s.details_as(), Some(CacheError::Missing { key: "k".into() }));
    /// ```
    pub fn typed<E: serde::Serialize + fmt::Display + ?Sized>(code: Code, error: &E) -> Status {
        let details = crate::payload::to_msgpack(error).unwrap_or_default();
        Status::new(code, error.to_string()).with_details(details)
    }

    /// The details decoded (msgpack) as `E`; `None` if there are none or they do not decode.
    pub fn details_as<E: serde::de::DeserializeOwned>(&self) -> Option<E> {
        if self.details.is_empty() {
            return None;
        }
        crate::payload::from_msgpack(&self.details).ok()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

impl std::error::Error for Status {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_one_pointer_and_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Error>();
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn codes_round_trip() {
        for v in 1..=14u16 {
            assert_eq!(Code::from_u16(v).as_u16(), v);
        }
        assert_eq!(Code::from_u16(999), Code::Unknown);
    }

    #[test]
    fn layer_errors_convert_to_one_type() {
        let e = Error::from(BoxError::from(tower::timeout::error::Elapsed::new()));
        assert!(e.is_timeout() && !e.is_retry_safe());
        let e = Error::from(BoxError::from(tower::load_shed::error::Overloaded::new()));
        assert!(e.is_overloaded() && e.is_retry_safe());
        let remote = Error::remote(Status::new(Code::Refused, "draining"));
        let e = Error::from(BoxError::from(remote));
        assert_eq!(e.code(), Some(Code::Refused));
        let e = Error::from(BoxError::from("something else"));
        assert!(!e.is_timeout() && !e.is_remote() && !e.is_closed());
        assert_eq!(e.to_string(), "service error");
        assert_eq!(format!("{e:#}"), "service error: something else");
    }

    #[test]
    fn remote_refused_is_retry_safe() {
        let e = Error::remote(Status::new(Code::Refused, "draining"));
        assert!(e.is_remote() && e.is_retry_safe());
        let e = Error::remote(Status::new(Code::Internal, ""));
        assert!(!e.is_retry_safe());
    }
}
