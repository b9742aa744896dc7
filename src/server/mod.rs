//! The server: accepts connections and runs any tower [`Service`] of [`Request`]s on them.
//!
//! Per connection, one reader decodes whole batches and runs each request's handler: its first
//! poll on the reader (most handlers answer there, at no task's cost), then on a task of its own
//! if it waits, so a slow handler never blocks the others; handlers whose first polls compute
//! for long (100 µs, twice in a few requests: once may be the thread's preemption) send the
//! next requests straight to tasks, so CPU-bound handlers use every core. One writer sends the
//! replies back in batches. A handler limit stops the reader (and so the socket) when reached,
//! which keeps memory bounded. Handler panics become `INTERNAL` errors for that call only.

mod budget;
mod connection;
mod flood;
mod handler;
mod handshake;
pub mod health;
mod keepalive;
mod limit;
mod recover;
#[cfg(feature = "http-upgrade")]
mod upgrade;

#[cfg(feature = "http-upgrade")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-upgrade")))]
pub use self::upgrade::Upgrade;

pub use self::limit::{Limited, LimitedFuture};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::any::Any;

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service};

use self::health::HealthReporter;
use crate::codec::{Compression, DEFAULT_MAX_FRAME_LEN, MIN_MAX_FRAME_LEN};
use crate::error::{Error, Kind, Result};
use crate::stats::{Counters, Stats};
use crate::transport::{ConnectHook, ConnectInfo, Connected};
use crate::{BoxError, Request, Response};

/// Default limit on handlers running at once, server-wide (8,192, as gorpc's
/// `DefaultConcurrency`).
pub const DEFAULT_MAX_CONCURRENCY: usize = 8192;

/// Default time in-flight calls get to finish after a graceful shutdown starts (5 s).
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(5);

/// Default bound on the connection preface exchange (10 s).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default bound on a write that makes no progress, to a peer that stopped reading (30 s).
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default bound on reading one frame once its first byte has arrived (30 s).
pub const DEFAULT_FRAME_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time a connection may sit with no call in flight and no request before the server
/// closes it gracefully (15 min): abandoned connections do not pile up, and a client's pool
/// reconnects on its next call.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Default quiet time after which the server PINGs a client (2 h, gRPC's keepalive time).
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2 * 60 * 60);

/// Default time a keepalive PING may go unanswered before the connection is closed (20 s,
/// gRPC's keepalive timeout).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Default server-wide cap on reply bytes queued and request bytes held, all connections
/// together (256 MiB).
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 256 * 1024 * 1024;

/// Default cap on the memory all connections' stream compression may take (256 MiB): room for
/// about 100 zstd connections at the window towerpc's encoder uses, 25 at the largest. See
/// [`Server::max_compression_bytes`].
pub const DEFAULT_MAX_COMPRESSION_BYTES: usize = 256 * 1024 * 1024;

/// Default cap on reply bytes queued for one connection (64 MiB) before its reader slows down
/// (see [`Server::max_queued_bytes`]): room for a few of the largest replies (16 MiB) going out
/// in fragments at the pace the client reads them. At 8 MiB, and with the reader pausing at
/// the cap, ten callers downloading 4 MiB replies beside 1,000 small callers made the small
/// calls wait for the large replies to drain: 41–48k calls/s at a p50 of 21–24 ms, against
/// 487–504k at 1.9 ms with 64 MiB (three paired rounds, docs/benchmarks.md, session 21).
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// Default cap on request bytes held by one connection's running handlers (64 MiB).
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;

/// Default read spin: 50 µs. See [`Server::read_spin`].
pub const DEFAULT_READ_SPIN: Duration = Duration::from_micros(50);

/// Default cap on connections served at once (10,000). See [`Server::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// A towerpc server: configuration plus the counters of everything it serves.
///
/// Setters consume and return the server, tonic style; `serve*` methods run it. Clone it first
/// to keep a handle for [`Server::stats`].
///
/// # Examples
///
/// ```no_run
/// use towerpc::{Request, Response, Server};
///
/// # async fn f() -> towerpc::Result<()> {
/// let echo = tower::service_fn(|req: Request| async move {
///     Ok::<_, towerpc::BoxError>(Response::new(req.into_body()))
/// });
/// Server::builder()
///     .max_concurrency(1024)
///     .serve("127.0.0.1:7000".parse().unwrap(), echo)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Server<L = Identity> {
    config: Config,
    counters: Arc<Counters>,
    layer: L,
}

/// Reads a running server's stats and sets its health; from [`Server::handle`].
#[derive(Debug, Clone)]
pub struct ServerHandle {
    counters: Arc<Counters>,
    health: HealthReporter,
}

impl ServerHandle {
    /// A snapshot of the counters of every connection the server has served.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// The server's [`HealthReporter`].
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }
}

/// Reports a connection refused during its handshake.
pub(crate) type ErrorHook = Arc<dyn Fn(&ConnectInfo, &Error) + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) max_concurrency: usize,
    pub(crate) max_concurrency_per_connection: usize,
    pub(crate) max_connections: usize,
    pub(crate) grace_period: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) write_timeout: Option<Duration>,
    pub(crate) frame_read_timeout: Option<Duration>,
    pub(crate) read_spin: Duration,
    /// Shared by every connection: how many of them spin at once.
    pub(crate) spin_slots: Arc<crate::conn::SpinSlots>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) keepalive_interval: Option<Duration>,
    pub(crate) keepalive_timeout: Duration,
    pub(crate) max_frame_len: usize,
    pub(crate) max_queued_bytes: usize,
    pub(crate) max_in_flight_bytes: usize,
    /// The server-wide byte budget, shared by every connection (and every clone of the
    /// builder, as the counters are).
    pub(crate) budget: Arc<budget::Budget>,
    /// The memory compressed connections may take, all together (see
    /// [`Server::max_compression_bytes`]).
    pub(crate) compression_budget: Arc<budget::CompressionBudget>,
    pub(crate) tcp_nodelay: bool,
    pub(crate) tcp_keepalive: Option<Duration>,
    /// Accepted compression algorithms, in order of preference.
    pub(crate) compression: Vec<Compression>,
    pub(crate) on_connect: Option<ConnectHook>,
    pub(crate) on_connection_error: Option<ErrorHook>,
    /// What the built-in health method answers; shared with every handle.
    pub(crate) health: HealthReporter,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("max_concurrency", &self.max_concurrency)
            .field("grace_period", &self.grace_period)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_frame_len", &self.max_frame_len)
            .field("compression", &self.compression)
            .field("on_connect", &self.on_connect.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Server {
    fn default() -> Self {
        Server::builder()
    }
}

impl Server {
    /// A server with the defaults.
    pub fn builder() -> Server {
        Server {
            config: Config {
                max_concurrency: DEFAULT_MAX_CONCURRENCY,
                max_concurrency_per_connection: DEFAULT_MAX_CONCURRENCY,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                grace_period: DEFAULT_GRACE_PERIOD,
                handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
                write_timeout: Some(DEFAULT_WRITE_TIMEOUT),
                frame_read_timeout: Some(DEFAULT_FRAME_READ_TIMEOUT),
                read_spin: DEFAULT_READ_SPIN,
                spin_slots: crate::conn::SpinSlots::half_the_cpus(),
                idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
                keepalive_interval: Some(DEFAULT_KEEPALIVE_INTERVAL),
                keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
                max_frame_len: DEFAULT_MAX_FRAME_LEN,
                max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
                max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
                budget: Arc::new(budget::Budget::new(DEFAULT_MAX_BUFFERED_BYTES)),
                compression_budget: Arc::new(budget::CompressionBudget::new(
                    DEFAULT_MAX_COMPRESSION_BYTES,
                )),
                tcp_nodelay: true,
                tcp_keepalive: None,
                compression: Vec::new(),
                on_connect: None,
                on_connection_error: None,
                health: HealthReporter::default(),
                #[cfg(feature = "tls")]
                tls: None,
            },
            counters: Arc::new(Counters::default()),
            layer: Identity::new(),
        }
    }
}

impl<L> Server<L> {
    /// Adds a tower layer around the service, for every connection, as tonic's
    /// `Server::builder().layer(..)` does: each connection gets its own stack, so per-connection
    /// middleware (rate limits, timeouts, auth) keeps per-connection state. Layers added first
    /// are outermost. The built-in concurrency limits sit beneath them, next to the service:
    /// [`Limited`] ([`Server::max_concurrency_per_connection`] and [`Server::max_concurrency`]).
    ///
    /// The reader of a connection waits for the stack to be ready before it reads the next
    /// request, so a layer that is not ready (a full limit) stops reading the socket, which is
    /// how clients feel backpressure; a `load_shed` layer turns that into refusals
    /// (`REFUSED`, safe to retry) instead. A layer's errors reach the client typed: tower's
    /// `Elapsed` as `DEADLINE_EXCEEDED`, `Overloaded` as `REFUSED`, a [`Status`] as it is.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use towerpc::{Request, Response, Server};
    ///
    /// # async fn f() -> towerpc::Result<()> {
    /// let echo = tower::service_fn(|req: Request| async move {
    ///     Ok::<_, towerpc::BoxError>(Response::new(req.into_body()))
    /// });
    /// Server::builder()
    ///     .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(1)))
    ///     .layer(tower::load_shed::LoadShedLayer::new())
    ///     .max_concurrency_per_connection(64)
    ///     .serve("127.0.0.1:7000".parse().unwrap(), echo)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// [`Status`]: crate::Status
    pub fn layer<NewL>(self, layer: NewL) -> Server<Stack<NewL, L>> {
        Server {
            config: self.config,
            counters: self.counters,
            layer: Stack::new(layer, self.layer),
        }
    }

    /// Handlers running at once across all connections. Default 8,192. When reached, readers
    /// stop reading their sockets until a handler finishes, so clients feel backpressure
    /// instead of the server queueing without bound. Values past what a semaphore holds
    /// (`usize::MAX` for "no limit") are lowered to it, as 0 is raised to 1.
    #[must_use]
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.config.max_concurrency = crate::conn::permits(n);
        self
    }

    /// Handlers running at once for one connection. Default 8,192 (no tighter than the server
    /// limit). Lower it so that one busy client cannot take every slot.
    #[must_use]
    pub fn max_concurrency_per_connection(mut self, n: usize) -> Self {
        self.config.max_concurrency_per_connection = crate::conn::permits(n);
        self
    }

    /// Connections served at once. Default 10,000 ([`DEFAULT_MAX_CONNECTIONS`]). Past it, a
    /// connection the server accepts is closed at once, before TLS or the preface: what a
    /// flood of connections can hold (each costs a task, buffers and a file descriptor) is
    /// bounded, and the server keeps serving those it has. Counted in
    /// [`Stats::refused_connections`](crate::stats::Stats::refused_connections). Connections
    /// handed over by an HTTP server (`server::upgrade`) are that server's to bound.
    ///
    /// # Examples
    ///
    /// ```
    /// let server = towerpc::Server::builder().max_connections(1_000);
    /// ```
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = crate::conn::permits(n);
        self
    }

    /// How long in-flight calls may run after a graceful shutdown starts. Default 5 s. Calls
    /// still running then end with `CANCELLED`.
    #[must_use]
    pub fn grace_period(mut self, d: Duration) -> Self {
        self.config.grace_period = crate::deadline::clamp(d);
        self
    }

    /// Bound on reading the client's preface. Default 10 s. It is what a connection that sends
    /// nothing can cost; it runs on the connection's own task, never on the accept loop.
    #[must_use]
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.config.handshake_timeout = crate::deadline::clamp(d);
        self
    }

    /// Bound on a write making no progress: a client that reads nothing for this long while
    /// replies wait is disconnected. Default 30 s. It bounds progress, not the size of a batch,
    /// so a client reading slowly but steadily behind a large backlog keeps its connection.
    /// `None` disables it.
    #[must_use]
    pub fn write_timeout(mut self, d: impl Into<Option<Duration>>) -> Self {
        self.config.write_timeout = d.into().map(crate::deadline::clamp);
        self
    }

    /// Bound on the time spent waiting for one frame (or all the fragments of one message)
    /// once its first byte has arrived. Default 30 s. A client that announces a frame and then
    /// sends it a byte at a time (slowloris) is disconnected; one that sends nothing between
    /// frames is not affected, nor one whose frame was half in when the server stopped
    /// reading for a while to wait for a handler slot: only the time the server waits to read
    /// counts, and the time its memory budget holds a read in the middle of a frame back (so
    /// that under memory pressure a frame half in is not held for good). It also bounds a
    /// large request's upload: 16 MiB in 30 s asks for 0.56 MB/s, so raise it where clients
    /// send large requests over slow links. `None` disables it.
    #[must_use]
    pub fn frame_read_timeout(mut self, d: impl Into<Option<Duration>>) -> Self {
        self.config.frame_read_timeout = d.into().map(crate::deadline::clamp);
        self
    }

    /// How long a connection's reader, finding nothing more to read, keeps looking for the
    /// client's next frame (yielding to the runtime's other tasks between looks) before it
    /// lets its thread sleep. Default 50 µs ([`DEFAULT_READ_SPIN`]); `Duration::ZERO` turns it
    /// off.
    ///
    /// A sleeping thread costs its wake-up on every frame: on loopback, with one client of 1 to 300
    /// callers on a plain connection, that was a large part of each round trip. With the client's
    /// reader spinning too (`Builder::reply_spin`, on by default), neither side sleeps between
    /// round trips: on two shared cores 1 caller made 2.3× the calls a second it made with the
    /// client's spin alone, 10 callers 4×, 100 callers 1.8–2.1×, at 30–40 % less CPU per call
    /// (docs/benchmarks.md, session 14). The price is CPU between frames: at most the window per
    /// wait, only on a connection whose waits have been shorter than twice the window (one at rest,
    /// or behind a slow network, sleeps at once) and whose last frame held few messages (at most
    /// 64: a frame of hundreds shares its wake-up among them) and no fragments of a large message
    /// (bulk transfers do not wait on round trips), and on at most half the machine's CPUs' worth
    /// of connections at once. Where the server's CPU is metered (a container's quota) or idle CPU
    /// matters more than latency, turn it off: with each process on eight cores of its own, where
    /// threads wake quickly, both sides' spins bought one caller 10–19 % more calls a second at
    /// 2.5 times the CPU per call (docs/benchmarks.md, session 22).
    ///
    /// ```
    /// use std::time::Duration;
    /// // CPU first: sleep as soon as there is nothing to read.
    /// let server = towerpc::Server::builder().read_spin(Duration::ZERO);
    /// # drop(server);
    /// ```
    #[must_use]
    pub fn read_spin(mut self, window: Duration) -> Self {
        self.config.read_spin = crate::deadline::clamp(window);
        self
    }

    /// Closes a connection gracefully (GOAWAY OK, as a drain does) once it has had no call in
    /// flight and received no request for `d`; PINGs do not count. It is checked lazily: a
    /// connection whose last call ran long closes within `2 × d` of its last request. Default
    /// 15 minutes. towerpc's client dials again at once, so an idle client costs one reconnect
    /// per `d`; what the timeout ends is connections nobody uses any more. `None` keeps idle
    /// connections for ever.
    #[must_use]
    pub fn idle_timeout(mut self, d: impl Into<Option<Duration>>) -> Self {
        self.config.idle_timeout = d.into().map(crate::deadline::clamp);
        self
    }

    /// Sends a PING on a connection from which nothing has arrived for `interval`, and closes
    /// it if nothing arrives within [`Server::keepalive_timeout`] after: it finds clients that
    /// vanished without a FIN (a crash, a cable, a NAT that forgot the flow). Default 2 hours,
    /// as gRPC's; `None` sends none.
    #[must_use]
    pub fn keepalive_interval(mut self, interval: impl Into<Option<Duration>>) -> Self {
        self.config.keepalive_interval = interval.into().map(crate::deadline::clamp);
        self
    }

    /// How long a keepalive PING may go unanswered. Default 20 seconds, as gRPC's.
    #[must_use]
    pub fn keepalive_timeout(mut self, timeout: Duration) -> Self {
        self.config.keepalive_timeout = crate::deadline::clamp(timeout);
        self
    }

    /// Largest frame body accepted from clients. Default 16 MiB. It bounds the largest request,
    /// whether it arrives in one frame or in fragments (PROTOCOL.md §4.1), and the memory one
    /// connection can make the server buffer.
    #[must_use]
    pub fn max_frame_len(mut self, len: usize) -> Self {
        self.config.max_frame_len = len.clamp(MIN_MAX_FRAME_LEN, u32::MAX as usize);
        self
    }

    /// Reply bytes queued for one connection before its reader slows down. Default 64 MiB
    /// ([`DEFAULT_MAX_QUEUED_BYTES`]). Past it, the reader reads a frame of requests for each
    /// batch of replies written, and reads on while the writer waits for the client's ACKs
    /// (large replies go out in fragments at the pace the client reads them, PROTOCOL.md
    /// §4.1): a client that reads its replies keeps making small calls beside its large
    /// ones. At four times this the reader stops until the queue is back under it: with a
    /// client that does not read its replies, that (plus one write in progress) is what the
    /// connection can hold. All connections together are held to
    /// [`max_buffered_bytes`](Self::max_buffered_bytes).
    #[must_use]
    pub fn max_queued_bytes(mut self, n: usize) -> Self {
        self.config.max_queued_bytes = n.max(1);
        self
    }

    /// Request bytes (method, metadata and body) that one connection's running handlers may
    /// hold at once before its reader pauses (counted from when a handler goes on to a task
    /// of its own: one that answers on its first poll, on the reader, is done with them
    /// before the next request is read). Default 64 MiB. Without it, memory per connection
    /// would be bounded only by `max_concurrency_per_connection × max_frame_len`, and with
    /// compression a few wire bytes can decompress into a mebibyte-sized request. A single
    /// request larger than the cap still runs, alone.
    #[must_use]
    pub fn max_in_flight_bytes(mut self, n: usize) -> Self {
        self.config.max_in_flight_bytes = n.max(1);
        self
    }

    /// Server-wide cap on the bytes all connections together hold: replies queued or being
    /// written, and requests whose handlers run. Default 256 MiB. While the total is over it,
    /// the connections holding more than an even share of it stop reading (their clients feel
    /// backpressure), even in the middle of a frame, and lighter connections carry on. If the
    /// replies of calls already running push the total to half as much again, those heavy
    /// connections are closed (GOAWAY RESOURCE_EXHAUSTED). A connection can pass its share by
    /// about one read buffer's growth; meanwhile every connection's reads between frames take
    /// 4 KiB at most (64 KiB otherwise), so that many connections each sending most of a
    /// frame cannot pass the cap together (9,000 such connections made a server with the
    /// default cap hold 702 MiB; now 374 MiB, of which about 16 KiB a connection is what any
    /// connection costs, idle or not: see [`max_connections`](Self::max_connections)). Not
    /// counted: the buffers of requests reassembled from
    /// fragments, kept for the next ones once their handlers are done with them (at most two a
    /// connection and 32 MiB in the whole process); a connection over its share frees its own.
    #[must_use]
    pub fn max_buffered_bytes(mut self, n: usize) -> Self {
        self.config.budget = Arc::new(budget::Budget::new(n.max(1)));
        self
    }

    /// Sets `TCP_NODELAY` on accepted TCP connections. Default `true`.
    #[must_use]
    pub fn tcp_nodelay(mut self, nodelay: bool) -> Self {
        self.config.tcp_nodelay = nodelay;
        self
    }

    /// Serves over TLS with `config` (see [`crate::transport::tls::config`]); with a client
    /// verifier in it, over mutual TLS. The handshake runs on each connection's own task within
    /// the handshake timeout.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    #[must_use]
    pub fn tls(mut self, config: Arc<tokio_rustls::rustls::ServerConfig>) -> Self {
        self.config.tls = Some(tokio_rustls::TlsAcceptor::from(config));
        self
    }

    /// Turns on TCP keepalive probes on accepted connections after `idle` without traffic.
    /// Default off.
    #[must_use]
    pub fn tcp_keepalive(mut self, idle: impl Into<Option<Duration>>) -> Self {
        self.config.tcp_keepalive = idle.into();
        self
    }

    /// Accepts `compression` when a client offers it. Call it once per algorithm, most
    /// preferred first; the server picks the first accepted one the client offered, while
    /// [`max_compression_bytes`](Self::max_compression_bytes) has room for it. Default: none
    /// accepted, so connections are uncompressed.
    #[must_use]
    pub fn accept_compression(mut self, compression: Compression) -> Self {
        if !self.config.compression.contains(&compression) {
            self.config.compression.push(compression);
        }
        self
    }

    /// Server-wide cap on the memory of compressed connections' compression state. Default
    /// 256 MiB ([`DEFAULT_MAX_COMPRESSION_BYTES`]).
    ///
    /// A compressed connection's state is what its peer makes it: a zstd stream may use an
    /// 8 MiB window (PROTOCOL.md §3.3), and a few hundred bytes of it fill the window; lz4
    /// blocks may be 4 MiB. So each compressed connection reserves its state for its whole life
    /// at what the peer can make it hold: lz4 9 MiB and deflate 1 MiB at once, zstd 2.5 MiB
    /// (the 512 KiB window towerpc's own encoder uses) grown to each frame's declared window
    /// (up to 10 MiB) before the decoder takes it on. A client whose reservation does not fit
    /// is served uncompressed (the server answers no compression, which every client
    /// accepts); a zstd window that does not fit closes its connection (GOAWAY
    /// RESOURCE_EXHAUSTED). Without the cap, sixty connections sending 387 bytes of zstd each
    /// made a server hold 1,090 MiB.
    ///
    /// ```
    /// use towerpc::codec::Compression;
    /// // About 400 zstd connections compressed at once (100 at the largest window).
    /// let server = towerpc::Server::builder()
    ///     .accept_compression(Compression::Zstd)
    ///     .max_compression_bytes(1 << 30);
    /// # drop(server);
    /// ```
    #[must_use]
    pub fn max_compression_bytes(mut self, n: usize) -> Self {
        self.config.compression_budget = Arc::new(budget::CompressionBudget::new(n));
        self
    }

    /// Runs `hook` on every accepted connection, after TLS and before the preface exchange;
    /// an `Err` refuses the connection (it is closed without a word). The hook runs on the
    /// connection's own task, within the handshake timeout, so a slow one holds up nobody else.
    #[must_use]
    pub fn on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(ConnectInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), BoxError>> + Send + 'static,
    {
        self.config.on_connect = Some(crate::transport::hook(hook));
        self
    }

    /// Calls `report` for every connection refused during its handshake (TLS failure,
    /// handshake timeout, bad preface, `on_connect` refusal), with the typed error
    /// (`is_handshake()`). Use it for logs and alerts; it must not block.
    #[must_use]
    pub fn on_connection_error<F>(mut self, report: F) -> Self
    where
        F: Fn(&ConnectInfo, &Error) + Send + Sync + 'static,
    {
        self.config.on_connection_error = Some(Arc::new(report));
        self
    }

    /// A snapshot of the counters of every connection this server has served.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// What the built-in health method ([`health::HEALTH_METHOD`]) answers: set per service
    /// name, SERVING for the whole server while it serves, NOT_SERVING for everything once a
    /// graceful shutdown starts.
    pub fn health(&self) -> HealthReporter {
        self.config.health.clone()
    }

    /// A handle to this server's stats and health that stays valid once `serve` has taken
    /// the server.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(svc: towerpc::dispatch::Dispatcher) -> towerpc::Result<()> {
    /// let server = towerpc::Server::builder();
    /// let handle = server.handle();
    /// tokio::spawn(server.serve("127.0.0.1:7000".parse().unwrap(), svc));
    /// println!("{} calls", handle.stats().calls);
    /// handle.health().set_serving("Users");
    /// # Ok(()) }
    /// ```
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            counters: self.counters.clone(),
            health: self.config.health.clone(),
        }
    }

    /// Binds `addr` and serves `svc` on it until an error stops the listener.
    pub async fn serve<S>(self, addr: SocketAddr, svc: S) -> Result<()>
    where
        S: Service<Request, Response = Response> + Clone + Send + 'static,
        L: Layer<Limited<S>>,
        L::Service: Service<Request, Response = Response> + Send + 'static,
        <L::Service as Service<Request>>::Error: Into<BoxError>,
        <L::Service as Service<Request>>::Future: Send + 'static,
    {
        self.serve_with_shutdown(addr, svc, std::future::pending())
            .await
    }

    /// Binds `addr` and serves `svc` until `signal` completes, then shuts down gracefully:
    /// stops accepting, turns the health method to NOT_SERVING, sends every client a GOAWAY,
    /// lets in-flight calls finish within the grace period, and returns when every connection
    /// is closed.
    pub async fn serve_with_shutdown<S, F>(self, addr: SocketAddr, svc: S, signal: F) -> Result<()>
    where
        S: Service<Request, Response = Response> + Clone + Send + 'static,
        L: Layer<Limited<S>>,
        L::Service: Service<Request, Response = Response> + Send + 'static,
        <L::Service as Service<Request>>::Error: Into<BoxError>,
        <L::Service as Service<Request>>::Future: Send + 'static,
        F: Future<Output = ()>,
    {
        let incoming = TcpIncoming::bind(addr).await?;
        self.serve_with_incoming_shutdown(incoming, svc, signal)
            .await
    }

    /// Serves `svc` on every connection `incoming` yields, until it ends: a [`TcpIncoming`]
    /// (bound first to learn its port), a unix listener stream, any stream of connections.
    pub async fn serve_with_incoming<S, I, IO, E>(self, incoming: I, svc: S) -> Result<()>
    where
        S: Service<Request, Response = Response> + Clone + Send + 'static,
        L: Layer<Limited<S>>,
        L::Service: Service<Request, Response = Response> + Send + 'static,
        <L::Service as Service<Request>>::Error: Into<BoxError>,
        <L::Service as Service<Request>>::Future: Send + 'static,
        I: Stream<Item = std::result::Result<IO, E>>,
        IO: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static,
        E: Into<BoxError>,
    {
        self.serve_with_incoming_shutdown(incoming, svc, std::future::pending())
            .await
    }

    /// Serves `svc` on every connection `incoming` yields, until it ends or `signal`
    /// completes; then shuts down gracefully as [`Server::serve_with_shutdown`] does.
    ///
    /// The server's TCP options ([`Server::tcp_nodelay`], [`Server::tcp_keepalive`]) apply to
    /// every connection that is a [`TcpStream`], whichever entry point accepted it.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use towerpc::server::TcpIncoming;
    /// use towerpc::{Request, Response, Server};
    ///
    /// # async fn f() -> towerpc::Result<()> {
    /// let echo = tower::service_fn(|req: Request| async move {
    ///     Ok::<_, towerpc::BoxError>(Response::new(req.into_body()))
    /// });
    /// let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).await?;
    /// let addr = incoming.local_addr()?; // the port the system chose
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// let serving = tokio::spawn(Server::builder().serve_with_incoming_shutdown(
    ///     incoming,
    ///     echo,
    ///     async { let _ = stopped.await; },
    /// ));
    /// // ... call `addr` ...
    /// let _ = stop.send(());
    /// serving.await.unwrap()?;
    /// # Ok(()) }
    /// ```
    pub async fn serve_with_incoming_shutdown<S, I, IO, E, F>(
        self,
        incoming: I,
        svc: S,
        signal: F,
    ) -> Result<()>
    where
        S: Service<Request, Response = Response> + Clone + Send + 'static,
        L: Layer<Limited<S>>,
        L::Service: Service<Request, Response = Response> + Send + 'static,
        <L::Service as Service<Request>>::Error: Into<BoxError>,
        <L::Service as Service<Request>>::Future: Send + 'static,
        I: Stream<Item = std::result::Result<IO, E>>,
        IO: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static,
        E: Into<BoxError>,
        F: Future<Output = ()>,
    {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let global = limit::Limit::new(self.config.max_concurrency);
        let per_connection = self.config.max_concurrency_per_connection;
        self.config.health.draining(false);
        let config = Arc::new(self.config);
        tokio::pin!(signal);
        {
            // The listener lives only as long as this loop: once a shutdown starts it is
            // dropped, so new dials are refused at once instead of waiting in the backlog.
            let incoming = incoming;
            tokio::pin!(incoming);
            // A permit per connection served (at most as many as a semaphore holds).
            let slots = Arc::new(Semaphore::new(config.max_connections));
            loop {
                let conn = tokio::select! {
                    conn = incoming.next() => conn,
                    _ = &mut signal => break,
                };
                match conn {
                    Some(Ok(io)) => {
                        Counters::inc(&self.counters.accepts);
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            // Closed at once: the connections already open keep being served.
                            Counters::inc(&self.counters.refused_connections);
                            tracing::debug!("max_connections reached: connection closed");
                            drop(io);
                            continue;
                        };
                        if let Some(tcp) = (&io as &dyn Any).downcast_ref::<TcpStream>() {
                            let (nodelay, keepalive) = (config.tcp_nodelay, config.tcp_keepalive);
                            if let Err(e) = crate::transport::configure_tcp(tcp, nodelay, keepalive)
                            {
                                tracing::debug!(error = %e, "setting TCP options failed");
                            }
                        }
                        // This connection's own stack: the user's layers around the limits
                        // around the service.
                        let svc = self.layer.layer(Limited::new(
                            svc.clone(),
                            per_connection,
                            global.clone(),
                        ));
                        let conn = handshake::run(
                            io,
                            svc,
                            config.clone(),
                            self.counters.clone(),
                            shutdown.child_token(),
                        );
                        tracker.spawn(async move {
                            conn.await;
                            drop(slot);
                        });
                    }
                    Some(Err(e)) => {
                        Counters::inc(&self.counters.accept_errors);
                        let e: BoxError = e.into();
                        tracing::debug!(error = %e, "accept failed");
                        // Out of file descriptors and similar: wait a little instead of
                        // spinning.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    None => break,
                }
            }
        }
        // Health checks say NOT_SERVING before any connection hears of the drain, so balancers
        // that poll them stop sending calls before calls are refused.
        config.health.draining(true);
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

/// A bound TCP listener as the stream of connections a [`Server`] serves, as tonic's
/// `TcpIncoming`: bind it first to learn the address (port 0 picks a free one), then hand it to
/// [`Server::serve_with_incoming`] or [`Server::serve_with_incoming_shutdown`].
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> towerpc::Result<()> {
/// let incoming = towerpc::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).await?;
/// assert_ne!(incoming.local_addr()?.port(), 0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TcpIncoming {
    inner: tokio_stream::wrappers::TcpListenerStream,
}

impl TcpIncoming {
    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr) -> Result<TcpIncoming> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::new(Kind::Io).with(e))?;
        Ok(TcpIncoming::from(listener))
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.inner
            .as_ref()
            .local_addr()
            .map_err(|e| Error::new(Kind::Io).with(e))
    }
}

impl From<TcpListener> for TcpIncoming {
    fn from(listener: TcpListener) -> Self {
        TcpIncoming {
            inner: tokio_stream::wrappers::TcpListenerStream::new(listener),
        }
    }
}

impl Stream for TcpIncoming {
    type Item = std::io::Result<TcpStream>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}
