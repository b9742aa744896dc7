//! The request and response types that `dispatch_server` and `dispatch_client` share, and
//! nothing else: the client never sees the server's code. A program in another repository
//! would copy this file, or publish it as a small crate of its own.
//!
//! Fields travel by name, so either side may gain a `#[serde(default)]` field before the other
//! is upgraded.

// Each example uses part of these types, and `pub` marks what would be the API of a shared
// crate.
#![allow(dead_code, unreachable_pub)]

use serde::{Deserialize, Serialize};

/// `Calc.Add` request; the reply is an `i64`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Add {
    pub a: i64,
    pub b: i64,
}

/// `Calc.Div` request; the reply is a [`Quotient`] or a [`CalcError`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Div {
    pub dividend: i64,
    pub divisor: i64,
}

/// `Calc.Div` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quotient {
    pub quotient: i64,
    pub remainder: i64,
}

/// Errors of `Calc.*` that a client can match on: they travel as the error's details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CalcError {
    Overflow,
    DivisionByZero { dividend: i64 },
}

impl std::fmt::Display for CalcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CalcError::Overflow => f.write_str("overflow"),
            CalcError::DivisionByZero { dividend } => write!(f, "{dividend} / 0"),
        }
    }
}

/// `UsersCache.Set` and `PostsCache.Set` request; the reply is the previous value, if any.
/// `*.Get` takes the key (a `String`) and replies `Option<String>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Set {
    pub key: String,
    pub value: String,
    /// Added after the first release: older clients leave it out and get the default.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// `Log.Write` one-way message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub level: String,
    pub text: String,
}
