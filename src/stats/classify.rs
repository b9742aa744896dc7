//! What the stats layer asks of requests and results: a method name, and an error code.

use std::borrow::Cow;
use std::convert::Infallible;

use crate::{BoxError, Error, Request, Response};

/// A request the [`RpcStatsLayer`](super::RpcStatsLayer) can name: towerpc's [`Request`]
/// (its method) and `http::Request` (its path, so an axum route counts under its path).
pub trait MethodName {
    /// The name the calls are counted under.
    fn method_name(&self) -> Cow<'_, str>;
}

impl MethodName for Request {
    fn method_name(&self) -> Cow<'_, str> {
        Cow::Borrowed(self.method())
    }
}

impl<B> MethodName for http::Request<B> {
    fn method_name(&self) -> Cow<'_, str> {
        Cow::Borrowed(self.uri().path())
    }
}

/// A call's result as the [`RpcStatsLayer`](super::RpcStatsLayer) counts it: `None` for a
/// success, or the error's code (`"deadline exceeded"`, `"refused"`, `"500"`...).
pub trait ErrorCode {
    /// The code of this result's error, if it failed.
    fn error_code(&self) -> Option<Cow<'static, str>>;
}

impl ErrorCode for Result<Response, Error> {
    fn error_code(&self) -> Option<Cow<'static, str>> {
        self.as_ref().err().map(code_of)
    }
}

impl ErrorCode for Result<Response, BoxError> {
    fn error_code(&self) -> Option<Cow<'static, str>> {
        self.as_ref().err().map(|e| code_of(&Error::peek(e)))
    }
}

impl<B, E: std::fmt::Display> ErrorCode for Result<http::Response<B>, E> {
    fn error_code(&self) -> Option<Cow<'static, str>> {
        match self {
            // HTTP counts its own failures: 5xx are errors, as tower-http's classifier has it.
            Ok(resp) if resp.status().is_server_error() => {
                Some(Cow::Owned(resp.status().as_u16().to_string()))
            }
            Ok(_) => None,
            Err(_) => Some(Cow::Borrowed("service error")),
        }
    }
}

impl ErrorCode for Result<Response, Infallible> {
    fn error_code(&self) -> Option<Cow<'static, str>> {
        None
    }
}

/// The code an error is counted under: the server's code for remote errors, else what went
/// wrong locally.
fn code_of(e: &Error) -> Cow<'static, str> {
    if let Some(code) = e.code() {
        return Cow::Owned(code.to_string());
    }
    let local = if e.is_timeout() {
        "deadline exceeded"
    } else if e.is_cancelled() {
        "cancelled"
    } else if e.is_overloaded() {
        "overloaded"
    } else if e.is_unavailable() {
        "unavailable"
    } else if e.is_stalled() {
        "stalled"
    } else if e.is_closed() {
        "closed"
    } else if e.is_protocol() {
        "protocol error"
    } else if e.is_encode() || e.is_decode() {
        "codec error"
    } else {
        "error"
    };
    Cow::Borrowed(local)
}
