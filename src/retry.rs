//! An RPC-aware retry [`Policy`] for tower's `Retry` layer: it retries only calls that cannot
//! have run, plus the methods you mark idempotent, within a budget, with jittered exponential
//! backoff.
//!
//! What is retried:
//!
//! - always, since the server cannot have run it: a call refused unprocessed (`REFUSED`, what
//!   a draining or overloaded server answers), a call that never reached the wire (no
//!   connection, or the connection broke before the request was written), and a call a layer
//!   below the retry turned away (tower's `Overloaded`). These are the errors for which
//!   [`Error::is_retry_safe`] is true (encode errors aside: they would fail again);
//! - only for methods marked [`idempotent`](Policy::idempotent): calls that may have run —
//!   the connection was lost after the request was written, the server stalled, the attempt
//!   timed out (a `timeout` layer *below* the retry), or the server answered `UNAVAILABLE`.
//!
//! Nothing else is retried: an application error, a deadline the server hit, a bad argument.
//! One-way messages are never retried (their "reply" is that they were queued).
//!
//! Every call deposits into a shared [`TpsBudget`] and every retry withdraws from it, so
//! retries add at most a fixed share of extra load (20 % by default, plus a floor of 10
//! retries a second) however badly the servers fail: a retry storm cannot multiply the load
//! on a struggling server. Each retry first waits a jittered exponential backoff.
//!
//! # Examples
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use towerpc::retry::Policy;
//!
//! # async fn f(client: towerpc::Client) {
//! let policy = Policy::new().idempotent("Users.Get").idempotent("Users.List");
//! let svc = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(2)) // the whole call, retries included
//!     .retry(policy)
//!     .service(client);
//! # }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

use crate::error::{Code, Error};
use crate::{BoxError, Request, Response};

/// The default share of extra load retries may add (20 %).
pub const DEFAULT_RETRY_PERCENT: f32 = 0.2;

/// The default floor of retries a second allowed whatever the load (10).
pub const DEFAULT_MIN_RETRIES_PER_SEC: u32 = 10;

/// The most retries `Policy::max_retries` allows (4, so at most 5 attempts: gRPC's cap on
/// `maxAttempts`, gRFC A6).
pub const MAX_RETRIES: u32 = 4;

/// The default most retries of one call (3, so at most 4 attempts).
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// The default first backoff (20 ms); it doubles up to [`DEFAULT_MAX_BACKOFF`].
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(20);

/// The default longest backoff (1 s).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The retry policy: give it to tower's `ServiceBuilder::retry` or `RetryLayer::new`, around a
/// [`Client`](crate::Client) (errors are [`Error`]) or a stack that returns `BoxError`.
///
/// Clones share the budget: build one policy per client (or per set of servers) and clone it.
/// tower clones the policy for every call, so a clone is one reference count and a counter.
#[derive(Clone)]
pub struct Policy {
    config: Arc<Config>,
    /// Retries of this call so far (tower clones the policy for each request).
    attempts: u32,
}

#[derive(Clone)]
struct Config {
    budget: Arc<TpsBudget>,
    /// Retries made through this policy and its clones.
    retried: Arc<AtomicU64>,
    idempotent: HashSet<String>,
    all_idempotent: bool,
    max_retries: u32,
    min_backoff: Duration,
    max_backoff: Duration,
}

impl Policy {
    /// A policy with the defaults: 20 % budget with a floor of 10 retries a second (over a
    /// 10 s window), at most 3 retries a call, backoff from 20 ms doubling to 1 s, jittered.
    pub fn new() -> Policy {
        Policy {
            config: Arc::new(Config {
                budget: Arc::new(TpsBudget::new(
                    Duration::from_secs(10),
                    DEFAULT_MIN_RETRIES_PER_SEC,
                    DEFAULT_RETRY_PERCENT,
                )),
                retried: Arc::new(AtomicU64::new(0)),
                idempotent: HashSet::new(),
                all_idempotent: false,
                max_retries: DEFAULT_MAX_RETRIES,
                min_backoff: DEFAULT_MIN_BACKOFF,
                max_backoff: DEFAULT_MAX_BACKOFF,
            }),
            attempts: 0,
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Marks `method` idempotent: running it twice does no harm, so a call that may have run
    /// is retried too.
    #[must_use]
    pub fn idempotent(mut self, method: impl Into<String>) -> Policy {
        self.config_mut().idempotent.insert(method.into());
        self
    }

    /// Treats every method as idempotent.
    #[must_use]
    pub fn all_idempotent(mut self) -> Policy {
        self.config_mut().all_idempotent = true;
        self
    }

    /// The most retries of one call. Default 3; at most [`MAX_RETRIES`] (5 attempts in all,
    /// gRPC's cap): a larger `n` is taken as that.
    ///
    /// # Examples
    ///
    /// ```
    /// use towerpc::retry::{Policy, MAX_RETRIES};
    ///
    /// let policy = Policy::new().max_retries(10); // retries at most MAX_RETRIES (4) times
    /// # let _ = (policy, MAX_RETRIES);
    /// ```
    #[must_use]
    pub fn max_retries(mut self, n: u32) -> Policy {
        self.config_mut().max_retries = n.min(MAX_RETRIES);
        self
    }

    /// The budget: within any `ttl` window (1 to 60 s) retries may add `percent` (0.0 to
    /// 1000.0) of the calls made, plus `min_per_sec` a second. Default 10 s, 10, 0.2.
    #[must_use]
    pub fn budget(mut self, ttl: Duration, min_per_sec: u32, percent: f32) -> Policy {
        self.config_mut().budget = Arc::new(TpsBudget::new(ttl, min_per_sec, percent));
        self
    }

    /// The backoff before each retry: from `min`, doubling up to `max`, each plus a random
    /// part of up to the same again (never above `max`). Default 20 ms to 1 s.
    #[must_use]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Policy {
        let config = self.config_mut();
        config.min_backoff = min;
        config.max_backoff = max.max(min);
        self
    }

    /// Retries made so far through this policy and its clones (each retry is one extra
    /// attempt).
    pub fn retries(&self) -> u64 {
        self.config.retried.load(Ordering::Relaxed)
    }

    /// Whether a failed call of `method` with `err` may be sent again.
    pub fn should_retry(&self, method: &str, err: &Error) -> bool {
        if err.is_retry_safe() && !err.is_encode() {
            return true;
        }
        let config = &self.config;
        let idempotent = config.all_idempotent || config.idempotent.contains(method);
        idempotent
            && (err.is_closed()
                || err.is_stalled()
                || (err.is_timeout() && !err.is_remote())
                || err.code() == Some(Code::Unavailable))
    }

    fn decide(&mut self, req: &Request, err: Option<&Error>) -> Option<tokio::time::Sleep> {
        let config = &self.config;
        if self.attempts == 0 {
            // The first answer of a call: its deposit, whatever it says.
            config.budget.deposit();
        }
        let err = err?;
        if req.one_way || self.attempts >= config.max_retries {
            return None;
        }
        if !self.should_retry(req.method(), err) || !config.budget.withdraw() {
            return None;
        }
        config.retried.fetch_add(1, Ordering::Relaxed);
        let wait = backoff(config.min_backoff, config.max_backoff, self.attempts);
        self.attempts += 1;
        Some(tokio::time::sleep(wait))
    }
}

/// The wait before retry number `attempt` (from 0): `min` doubled `attempt` times, capped at
/// `max`, plus a uniformly random part of up to as much again, the sum capped at `max` (full
/// jitter on top of the exponential base, so that calls failed together spread out).
fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let base = min
        .checked_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    (base + base.mul_f64(fastrand::f64())).min(max.max(base))
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new()
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("Policy")
            .field("idempotent", &c.idempotent)
            .field("all_idempotent", &c.all_idempotent)
            .field("max_retries", &c.max_retries)
            .field("backoff", &(c.min_backoff, c.max_backoff))
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl tower::retry::Policy<Request, Response, Error> for Policy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut Request,
        result: &mut Result<Response, Error>,
    ) -> Option<Self::Future> {
        self.decide(req, result.as_ref().err())
    }

    fn clone_request(&mut self, req: &Request) -> Option<Request> {
        (!req.one_way).then(|| req.clone())
    }
}

impl tower::retry::Policy<Request, Response, BoxError> for Policy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut Request,
        result: &mut Result<Response, BoxError>,
    ) -> Option<Self::Future> {
        match result {
            Ok(_) => self.decide(req, None),
            // Classified as one `Error`; the caller still gets the original box.
            Err(e) => self.decide(req, Some(&Error::peek(e))),
        }
    }

    fn clone_request(&mut self, req: &Request) -> Option<Request> {
        (!req.one_way).then(|| req.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn no_policy_makes_more_than_five_attempts() {
        let req = Request::new("M", "x");
        let err = Error::new(crate::error::Kind::Unavailable);
        assert!(err.is_retry_safe());
        for asked in [1, 4, 10, u32::MAX] {
            let mut policy = Policy::new().max_retries(asked);
            let mut retries = 0;
            while policy.decide(&req, Some(&err)).is_some() {
                retries += 1;
                assert!(retries <= MAX_RETRIES, "asked {asked}");
            }
            assert_eq!(retries, asked.min(MAX_RETRIES), "asked {asked}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stays_under_the_cap() {
        let (min, max) = (Duration::from_millis(20), Duration::from_secs(1));
        for attempt in 0..40 {
            let base = (min * 2u32.saturating_pow(attempt.min(20))).min(max);
            for _ in 0..50 {
                let d = backoff(min, max, attempt);
                assert!(d >= base && d <= max && d <= base * 2, "{attempt}: {d:?}");
            }
        }
    }
}
