//! W3C trace context carried across a towerpc hop, as HTTP carries it in `traceparent`.
//!
//! A request's metadata is, by convention, a msgpack map of string keys to string values; the
//! trace context travels in it under the key `traceparent`, in the W3C format
//! (`00-<trace id>-<parent id>-<flags>`). So a trace continues from client to server:
//!
//! - a server reads `traceparent` from each request's metadata, puts the [`TraceContext`] in
//!   the request's extensions, and runs the handler in its scope;
//! - a client call made in such a scope (a handler's nested call, or any code wrapped in
//!   [`scope`], such as an HTTP handler that read a `traceparent` header) sends a child of it:
//!   the same trace id, a fresh parent id.
//!
//! With the `opentelemetry` feature, [`otel`] carries an OpenTelemetry context instead (through
//! the app's own propagator), with a layer for each end.
//!
//! # Examples
//!
//! ```
//! use towerpc::trace::TraceContext;
//!
//! let ctx: TraceContext = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap();
//! assert!(ctx.is_sampled());
//! let child = ctx.child();
//! assert_eq!(child.trace_id(), ctx.trace_id());
//! assert_ne!(child.parent_id(), ctx.parent_id());
//! assert_eq!(ctx.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
//! ```

#[cfg(feature = "opentelemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
pub mod otel;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use bytes::Bytes;
use pin_project_lite::pin_project;

/// The metadata key the trace context travels under.
pub const TRACEPARENT: &str = "traceparent";

/// A W3C trace context: trace id, parent (span) id and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: u128,
    parent_id: u64,
    flags: u8,
}

/// A `traceparent` value that is not W3C's version 00 format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTraceparent {
    _priv: (),
}

impl fmt::Display for InvalidTraceparent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid traceparent")
    }
}

impl std::error::Error for InvalidTraceparent {}

impl TraceContext {
    /// A new trace (random ids), sampled.
    pub fn new_root() -> Self {
        TraceContext {
            trace_id: nonzero_u128(),
            parent_id: nonzero_u64(),
            flags: 0x01,
        }
    }

    /// The context a call made within this one sends: same trace, new parent id.
    pub fn child(&self) -> Self {
        TraceContext {
            parent_id: nonzero_u64(),
            ..*self
        }
    }

    /// The 16-byte trace id.
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// The 8-byte id of the caller's span.
    pub fn parent_id(&self) -> u64 {
        self.parent_id
    }

    /// Whether the caller sampled the trace (flag `01`).
    pub fn is_sampled(&self) -> bool {
        self.flags & 0x01 != 0
    }

    /// The context in `metadata` (a msgpack map with a `traceparent` string), if any.
    pub fn from_metadata(metadata: &[u8]) -> Option<TraceContext> {
        if metadata.is_empty() {
            return None;
        }
        let map: BTreeMap<String, String> = crate::payload::from_msgpack(metadata).ok()?;
        map.get(TRACEPARENT)?.parse().ok()
    }

    /// `metadata` with this context as its `traceparent` (other keys kept). Metadata that is
    /// not a map of strings is left as it is.
    pub fn inject(&self, metadata: &Bytes) -> Bytes {
        let mut map: BTreeMap<String, String> = if metadata.is_empty() {
            BTreeMap::new()
        } else {
            match crate::payload::from_msgpack(metadata) {
                Ok(map) => map,
                Err(_) => return metadata.clone(),
            }
        };
        map.insert(TRACEPARENT.to_owned(), self.to_string());
        crate::payload::to_msgpack(&map).unwrap_or_else(|_| metadata.clone())
    }
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

fn nonzero_u128() -> u128 {
    fastrand::u128(1..)
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl FromStr for TraceContext {
    type Err = InvalidTraceparent;

    fn from_str(s: &str) -> Result<Self, InvalidTraceparent> {
        let bad = InvalidTraceparent { _priv: () };
        let parts: Vec<&str> = s.trim().split('-').collect();
        let [version, trace, parent, flags] = parts[..] else {
            return Err(bad);
        };
        let hex = |p: &str, len: usize| {
            (p.len() == len && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .then_some(())
                .ok_or(InvalidTraceparent { _priv: () })
        };
        hex(version, 2)?;
        hex(trace, 32)?;
        hex(parent, 16)?;
        hex(flags, 2)?;
        if version != "00" {
            return Err(bad);
        }
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| bad.clone())?;
        let parent_id = u64::from_str_radix(parent, 16).map_err(|_| bad.clone())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| bad.clone())?;
        if trace_id == 0 || parent_id == 0 {
            return Err(bad);
        }
        Ok(TraceContext {
            trace_id,
            parent_id,
            flags,
        })
    }
}

thread_local! {
    /// The trace context of the scope being polled on this thread (see `crate::scope`).
    static CURRENT: std::cell::Cell<Option<TraceContext>> = const { std::cell::Cell::new(None) };
}

/// The trace context of the scope this code runs in: on a server, the caller's.
pub fn current() -> Option<TraceContext> {
    crate::scope::current(&CURRENT)
}

/// Runs `fut` with `ctx` as its [`current`] trace context: towerpc calls made while polling it
/// send a child of it.
pub fn scope<F: Future>(ctx: Option<TraceContext>, fut: F) -> Scoped<F> {
    Scoped {
        inner: crate::scope::Scoped::new(&CURRENT, ctx, fut),
    }
}

/// Runs `f` with `ctx` as the [`current`] trace context: a scope for one poll of a future.
pub(crate) fn sync_scope<R>(ctx: Option<TraceContext>, f: impl FnOnce() -> R) -> R {
    crate::scope::sync_scope(&CURRENT, ctx, f)
}

pin_project! {
    /// A future run inside a trace [`scope`].
    #[must_use = "futures do nothing unless polled"]
    pub struct Scoped<F> {
        #[pin]
        inner: crate::scope::Scoped<TraceContext, F>,
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

impl<F> fmt::Debug for Scoped<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scoped").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_per_w3c() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx: TraceContext = ok.parse().unwrap();
        assert_eq!(ctx.to_string(), ok);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceContext>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_round_trip_keeps_other_keys() {
        let ctx = TraceContext::new_root();
        let mut other = BTreeMap::new();
        other.insert("tenant".to_string(), "7".to_string());
        let md = crate::payload::to_msgpack(&other).unwrap();
        let md = ctx.inject(&md);
        assert_eq!(TraceContext::from_metadata(&md), Some(ctx));
        let map: BTreeMap<String, String> = crate::payload::from_msgpack(&md).unwrap();
        assert_eq!(map["tenant"], "7");
        assert_eq!(TraceContext::from_metadata(b"\xc1"), None);
    }
}
