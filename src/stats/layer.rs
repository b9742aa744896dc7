//! [`RpcStatsLayer`]: per-method calls, errors by code, calls in flight and a latency
//! histogram, on any tower service.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::classify::{ErrorCode, MethodName};

/// Histograms per method, each written by one shard at a time: callers on different threads
/// rarely share a lock.
const SHARDS: usize = 8;

/// Latencies are recorded in microseconds, up to an hour, to 3 significant figures (a few
/// KiB per histogram).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Counts calls per method on any tower service: a towerpc [`Client`](crate::Client) or
/// [`Server`](crate::Server) stack, a [`Dispatcher`](crate::dispatch::Dispatcher), or an axum
/// route (counted under its path). Clones share the counts; [`RpcStatsLayer::snapshot`] reads
/// them at any time, cheaply (one lock per method and shard, no allocation per call after a
/// method's first).
///
/// Per method: calls ended, errors by code, calls in flight, and a latency histogram
/// (hdrhistogram, microseconds, 3 significant figures).
///
/// # Examples
///
/// ```
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use towerpc::stats::RpcStatsLayer;
/// use towerpc::{BoxError, Request, Response};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let stats = RpcStatsLayer::new();
/// let mut svc = ServiceBuilder::new().layer(stats.clone()).service(tower::service_fn(
///     |req: Request| async move { Ok::<_, BoxError>(Response::new(req.into_body())) },
/// ));
/// svc.ready().await?.call(Request::new("Echo", "hi")).await?;
///
/// let snap = stats.snapshot();
/// let echo = &snap.methods["Echo"];
/// assert_eq!((echo.calls, echo.errors(), echo.in_flight), (1, 0, 0));
/// println!("p99 {:?}", echo.latency_quantile(0.99));
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct RpcStatsLayer {
    registry: Arc<Registry>,
}

impl RpcStatsLayer {
    /// A layer with no calls counted yet.
    pub fn new() -> Self {
        RpcStatsLayer::default()
    }

    /// A layer whose figures carry `service` as their `service` label when recorded through
    /// the `metrics` facade (feature `metrics`): name the client, server or route it counts.
    ///
    /// With the `metrics` feature every call is also recorded as
    /// `towerpc_calls_total{service, method}`, `towerpc_errors_total{service, method, code}`,
    /// `towerpc_in_flight{service, method}` (a gauge) and
    /// `towerpc_call_duration_seconds{service, method}` (a histogram), for whatever exporter
    /// the program installed (Prometheus, StatsD...).
    pub fn named(service: impl Into<String>) -> Self {
        RpcStatsLayer {
            registry: Arc::new(Registry {
                methods: RwLock::default(),
                service: service.into(),
            }),
        }
    }

    /// What has been counted so far, per method.
    pub fn snapshot(&self) -> Snapshot {
        self.registry.snapshot()
    }
}

impl fmt::Debug for RpcStatsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcStatsLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RpcStatsLayer {
    type Service = RpcStats<S>;

    fn layer(&self, inner: S) -> RpcStats<S> {
        RpcStats {
            inner,
            registry: self.registry.clone(),
        }
    }
}

/// The service of [`RpcStatsLayer`].
#[derive(Clone)]
pub struct RpcStats<S> {
    inner: S,
    registry: Arc<Registry>,
}

impl<S: fmt::Debug> fmt::Debug for RpcStats<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcStats")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, R> Service<R> for RpcStats<S>
where
    S: Service<R>,
    R: MethodName,
    Result<S::Response, S::Error>: ErrorCode,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let method = self.registry.method(&req.method_name());
        method.in_flight.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        method.metrics.in_flight.increment(1.0);
        ResponseFuture {
            inner: self.inner.call(req),
            call: Some(InFlight {
                method,
                started: Instant::now(),
                ended: false,
            }),
        }
    }
}

pin_project! {
    /// The future of an [`RpcStats`] call.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<InFlight>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    Result<T, E>: ErrorCode,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx));
        if let Some(mut call) = this.call.take() {
            call.end(res.error_code());
        }
        Poll::Ready(res)
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// A call counted in flight; dropped unfinished (cancelled), it counts as `"cancelled"`.
struct InFlight {
    method: Arc<MethodCounters>,
    started: Instant,
    ended: bool,
}

impl InFlight {
    fn end(&mut self, code: Option<Cow<'static, str>>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let m = &self.method;
        let elapsed = self.started.elapsed();
        let micros = elapsed.as_micros().min(MAX_LATENCY_US as u128) as u64;
        #[cfg(feature = "metrics")]
        m.metrics.end(elapsed, code.as_deref());
        m.shards[shard()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(micros.max(1));
        m.calls.fetch_add(1, Relaxed);
        if let Some(code) = code {
            *m.errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(code.into_owned())
                .or_default() += 1;
        }
        // Last, so a snapshot never sees a call neither in flight nor counted.
        m.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.end(Some(Cow::Borrowed("cancelled")));
    }
}

/// The shard this thread records into.
fn shard() -> usize {
    thread_local! {
        static SHARD: usize = {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            NEXT.fetch_add(1, Relaxed) % SHARDS
        };
    }
    SHARD.with(|s| *s)
}

#[derive(Default)]
struct Registry {
    methods: RwLock<HashMap<String, Arc<MethodCounters>>>,
    /// The `service` label of the metrics.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    service: String,
}

impl Registry {
    fn method(&self, name: &str) -> Arc<MethodCounters> {
        if let Some(m) = self
            .methods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return m.clone();
        }
        self.methods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(MethodCounters::new(&self.service, name)))
            .clone()
    }

    fn snapshot(&self) -> Snapshot {
        let methods = self.methods.read().unwrap_or_else(|e| e.into_inner());
        Snapshot {
            methods: methods
                .iter()
                .map(|(name, m)| (name.clone(), m.snapshot()))
                .collect(),
        }
    }
}

struct MethodCounters {
    calls: AtomicU64,
    in_flight: AtomicU64,
    errors: Mutex<HashMap<String, u64>>,
    shards: [Mutex<Histogram<u64>>; SHARDS],
    #[cfg(feature = "metrics")]
    metrics: Metrics,
}

impl MethodCounters {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn new(service: &str, method: &str) -> Self {
        MethodCounters {
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            errors: Mutex::new(HashMap::new()),
            shards: std::array::from_fn(|_| Mutex::new(new_histogram())),
            #[cfg(feature = "metrics")]
            metrics: Metrics::new(service, method),
        }
    }

    fn snapshot(&self) -> MethodSnapshot {
        let mut latency = new_histogram();
        for shard in &self.shards {
            // Same bounds on every shard, so adding never fails.
            let _ = latency.add(&*shard.lock().unwrap_or_else(|e| e.into_inner()));
        }
        MethodSnapshot {
            calls: self.calls.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            errors_by_code: self
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            latency,
        }
    }
}

/// One method's handles in the `metrics` facade, registered once with the recorder installed
/// then, so a call costs no label allocation.
#[cfg(feature = "metrics")]
struct Metrics {
    labels: [(&'static str, String); 2],
    calls: metrics::Counter,
    in_flight: metrics::Gauge,
    duration: metrics::Histogram,
}

#[cfg(feature = "metrics")]
impl Metrics {
    fn new(service: &str, method: &str) -> Self {
        let labels = [
            ("service", service.to_owned()),
            ("method", method.to_owned()),
        ];
        Metrics {
            calls: metrics::counter!("towerpc_calls_total", &labels),
            in_flight: metrics::gauge!("towerpc_in_flight", &labels),
            duration: metrics::histogram!("towerpc_call_duration_seconds", &labels),
            labels,
        }
    }

    fn end(&self, elapsed: Duration, code: Option<&str>) {
        self.calls.increment(1);
        self.duration.record(elapsed.as_secs_f64());
        self.in_flight.decrement(1.0);
        if let Some(code) = code {
            let [service, method] = self.labels.clone();
            metrics::counter!(
                "towerpc_errors_total",
                &[service, method, ("code", code.to_owned())]
            )
            .increment(1);
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Per-method counts at one moment; from [`RpcStatsLayer::snapshot`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Snapshot {
    /// By method name (an HTTP route's path).
    pub methods: BTreeMap<String, MethodSnapshot>,
}

/// One method's counts; see [`Snapshot`].
#[derive(Clone)]
#[non_exhaustive]
pub struct MethodSnapshot {
    /// Calls ended (succeeded, failed or cancelled).
    pub calls: u64,
    /// Calls started and not ended.
    pub in_flight: u64,
    /// Failed calls by error code (`"deadline exceeded"`, `"refused"`, `"cancelled"` for a
    /// call dropped before it ended, an HTTP status such as `"503"`...).
    pub errors_by_code: BTreeMap<String, u64>,
    latency: Histogram<u64>,
}

impl MethodSnapshot {
    /// Failed calls, all codes together.
    pub fn errors(&self) -> u64 {
        self.errors_by_code.values().sum()
    }

    /// The latency below which a share `q` (0.0 to 1.0) of the calls ended; zero before any.
    pub fn latency_quantile(&self, q: f64) -> Duration {
        if self.latency.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_micros(self.latency.value_at_quantile(q.clamp(0.0, 1.0)))
    }

    /// The mean latency; zero before any call.
    pub fn latency_mean(&self) -> Duration {
        Duration::from_secs_f64(self.latency.mean() / 1e6)
    }

    /// The longest latency seen.
    pub fn latency_max(&self) -> Duration {
        Duration::from_micros(self.latency.max())
    }
}

impl fmt::Debug for MethodSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MethodSnapshot")
            .field("calls", &self.calls)
            .field("in_flight", &self.in_flight)
            .field("errors_by_code", &self.errors_by_code)
            .field("p50", &self.latency_quantile(0.5))
            .field("p99", &self.latency_quantile(0.99))
            .field("max", &self.latency_max())
            .finish()
    }
}
