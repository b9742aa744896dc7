#![doc = include_str!("lib.md")]
#![doc(test(
    no_crate_inject,
    attr(deny(warnings, rust_2018_idioms), allow(dead_code, unused_variables))
))]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod balance;
pub mod client;
pub mod codec;
mod conn;
pub mod deadline;
pub mod dispatch;
mod error;
pub mod into_error;
pub mod payload;
mod protocol;
mod request;
pub mod retry;
mod scope;
pub mod server;
pub mod stats;
pub mod trace;
pub mod transport;

pub use crate::client::Client;
pub use crate::error::{Code, Error, Result, Status};
pub use crate::into_error::{IntoError, IntoErrorLayer};
pub use crate::request::{Method, Request, Response, Timeout};
pub use crate::server::Server;
pub use crate::stats::Stats;

/// The boxed error type that flows between tower layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

// The README's examples are compiled as doctests, so they cannot drift from the API.
#[cfg(all(doctest, feature = "tls", feature = "compression-zstd"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
