//! [`Builder`]: client configuration.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tower::Service;

use crate::codec::Compression;
use crate::transport::{ConnectHook, ConnectInfo, Connected, TcpConnector};
use crate::BoxError;

use crate::codec::{DEFAULT_MAX_FRAME_LEN, MIN_MAX_FRAME_LEN};
use crate::error::{Error, Kind, Result};

use super::Client;

/// Default per-call timeout (20 s, as gorpc's `DefaultRequestTimeout`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Default bound on calls awaiting replies (32,768, as gorpc's `DefaultPendingMessages`).
pub const DEFAULT_PENDING_MESSAGES: usize = 32 * 1024;

/// Default delay before the writer takes a batch: none. Batches still form under load, because
/// every caller that arrives while a write is in progress goes into the next one.
pub const DEFAULT_FLUSH_DELAY: Option<Duration> = None;

/// Default bound on how long a dial plus the preface exchange may take (10 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default stall bound (10 s): with calls pending and nothing received for half of it, the
/// client pings; with nothing for all of it, the server is declared stalled.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Default reply spin (50 µs): see [`Builder::reply_spin`].
pub const DEFAULT_REPLY_SPIN: Duration = Duration::from_micros(50);

/// What a client does when `max_pending` calls are already awaiting replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Overflow {
    /// `poll_ready` waits for a free slot (tower backpressure); `Client::invoke` awaits one.
    #[default]
    Backpressure,
    /// The oldest pending call fails with an `is_overloaded()` error so the new one can go
    /// (gorpc's behaviour: recent calls are the ones still worth answering).
    FailOldest,
}

#[derive(Clone)]
pub(crate) struct Config {
    /// The server as dialed, for error messages.
    pub(crate) target: Option<Arc<str>>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_pending: usize,
    pub(crate) fail_oldest: bool,
    pub(crate) flush_delay: Option<Duration>,
    pub(crate) connect_timeout: Duration,
    pub(crate) stall_timeout: Option<Duration>,
    pub(crate) keepalive: Option<Duration>,
    pub(crate) max_frame_len: usize,
    pub(crate) tcp_nodelay: bool,
    pub(crate) backoff: super::backoff::Backoff,
    /// Preface bitmask of the compression algorithms offered.
    pub(crate) compression: u8,
    pub(crate) on_connect: Option<ConnectHook>,
    /// Connections kept to the server.
    pub(crate) connections: usize,
    /// Calls wait for a connection (up to their deadline) instead of failing at once.
    pub(crate) wait_for_ready: bool,
    pub(crate) reply_spin: Duration,
    /// Shared by the client's connections: how many of them spin at once.
    pub(crate) spin_slots: Arc<crate::conn::SpinSlots>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("target", &self.target)
            .field("timeout", &self.timeout)
            .field("max_pending", &self.max_pending)
            .field("fail_oldest", &self.fail_oldest)
            .field("flush_delay", &self.flush_delay)
            .field("compression", &self.compression)
            .field("on_connect", &self.on_connect.is_some())
            .field("connections", &self.connections)
            .field("wait_for_ready", &self.wait_for_ready)
            .field("reply_spin", &self.reply_spin)
            .finish_non_exhaustive()
    }
}

/// Configures and connects a [`Client`].
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// # async fn f() -> towerpc::Result<()> {
/// let client = towerpc::Client::builder()
///     .timeout(Duration::from_secs(2))
///     .max_pending(10_000)
///     .connect("127.0.0.1:7000")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    config: Config,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

impl Builder {
    /// A builder with the defaults.
    pub fn new() -> Builder {
        Builder {
            config: Config {
                target: None,
                timeout: Some(DEFAULT_REQUEST_TIMEOUT),
                max_pending: DEFAULT_PENDING_MESSAGES,
                fail_oldest: false,
                flush_delay: DEFAULT_FLUSH_DELAY,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                stall_timeout: Some(DEFAULT_STALL_TIMEOUT),
                keepalive: None,
                max_frame_len: DEFAULT_MAX_FRAME_LEN,
                tcp_nodelay: true,
                backoff: super::backoff::Backoff::default(),
                compression: 0,
                on_connect: None,
                connections: 1,
                wait_for_ready: false,
                reply_spin: DEFAULT_REPLY_SPIN,
                spin_slots: crate::conn::SpinSlots::half_the_cpus(),
            },
        }
    }

    /// Default timeout of each call, the deadline the server also learns. Default 20 s
    /// ([`DEFAULT_REQUEST_TIMEOUT`]). `None` lets calls wait forever, which is rarely right: a
    /// lost reply then holds its caller until the connection breaks. A request can override it
    /// with [`Request::timeout`](crate::Request::timeout).
    #[must_use]
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.config.timeout = timeout.into().map(crate::deadline::clamp);
        self
    }

    /// Largest number of calls awaiting replies at once. Default 32,768
    /// ([`DEFAULT_PENDING_MESSAGES`]). It bounds the client's memory; pick it above the number
    /// of concurrent callers you expect, or calls wait (or fail, see [`Builder::overflow`]).
    /// Values past what a semaphore holds (`usize::MAX` for "no limit") are lowered to it.
    #[must_use]
    pub fn max_pending(mut self, n: usize) -> Self {
        self.config.max_pending = crate::conn::permits(n);
        self
    }

    /// What happens when `max_pending` calls are pending. Default [`Overflow::Backpressure`].
    #[must_use]
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.config.fail_oldest = overflow == Overflow::FailOldest;
        self
    }

    /// How long the writer waits after waking before it takes a batch. Default `None`.
    ///
    /// Without a delay, batching still happens whenever calls arrive faster than one write
    /// takes, which is exactly when it matters. A delay (say 100 µs to 1 ms) makes batches
    /// bigger, and packets and syscalls fewer, at low to moderate load, at the price of adding
    /// up to that much latency to every call. Choose it only when packets or syscalls cost more
    /// than latency (many clients sending to one busy server, for example).
    #[must_use]
    pub fn flush_delay(mut self, delay: impl Into<Option<Duration>>) -> Self {
        self.config.flush_delay = delay
            .into()
            .filter(|d| !d.is_zero())
            .map(crate::deadline::clamp);
        self
    }

    /// Bound on one dial plus the preface exchange. Default 10 s.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = crate::deadline::clamp(timeout);
        self
    }

    /// Stall bound, which tells a busy server from a stuck one (PROTOCOL.md §9). With calls
    /// pending:
    /// - nothing received for half of it: the client pings the server;
    /// - nothing at all for all of it (no reply, no pong, none of the pings a busy server
    ///   sends while it waits for its handlers): the server is gone or hung; the connection is
    ///   closed and its calls fail with `is_stalled()` at once;
    /// - pongs but no reply for all of it: the server's handlers are stuck; calls without a
    ///   deadline of their own (made with the client's default timeout) fail with
    ///   `is_stalled()` at once and the server is told to stop them, while calls with their own
    ///   timeout (or a deadline inherited from a handler) wait for it, on the same connection.
    ///
    /// A server whose replies keep coming is never stalled. Give a call that may legitimately
    /// run longer than the bound its own timeout. A server that reads nothing while a write
    /// waits on it for the bound is stalled as well (the connection is closed, its calls fail
    /// with `is_stalled()`). Default 10 s; `None` turns detection off.
    #[must_use]
    pub fn stall_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.config.stall_timeout = timeout.into().map(crate::deadline::clamp);
        self
    }

    /// Pings the server after `interval` with nothing received, also with no call pending, and
    /// closes the connection when nothing at all comes back within the stall bound
    /// ([`stall_timeout`](Self::stall_timeout)) after: a connection that died while idle (a
    /// server that vanished, a NAT that forgot the flow) is found before a call needs it, and
    /// the client redials. Default `None` (off, as in gRPC): with calls pending the stall bound
    /// finds a dead server anyway. Nothing happens with the stall bound off. Keep `interval`
    /// in seconds or longer: the client never pings more than 50 times a second (half the
    /// budget a server gives it, PROTOCOL.md §11), however short the interval.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let builder = towerpc::Client::builder().keepalive(Duration::from_secs(30));
    /// ```
    #[must_use]
    pub fn keepalive(mut self, interval: impl Into<Option<Duration>>) -> Self {
        self.config.keepalive = interval.into().map(crate::deadline::clamp);
        self
    }

    /// Largest frame body this client accepts from the server. Default 16 MiB. It bounds the
    /// largest response (whole or in fragments, PROTOCOL.md §4.1), and the memory a
    /// misbehaving server can make the client buffer.
    #[must_use]
    pub fn max_frame_len(mut self, len: usize) -> Self {
        self.config.max_frame_len = len.clamp(MIN_MAX_FRAME_LEN, u32::MAX as usize);
        self
    }

    /// Sets `TCP_NODELAY` on TCP connections. Default `true`: batching already makes writes
    /// large, and Nagle's algorithm would only add latency.
    #[must_use]
    pub fn tcp_nodelay(mut self, nodelay: bool) -> Self {
        self.config.tcp_nodelay = nodelay;
        self
    }

    /// The reconnect backoff: first wait, growth factor and cap. Default 1 s, ×1.6, 120 s,
    /// each wait jittered by ±20 % so that clients that failed together spread out.
    #[must_use]
    pub fn reconnect_backoff(mut self, initial: Duration, multiplier: f64, max: Duration) -> Self {
        self.config.backoff = super::backoff::Backoff::new(initial, multiplier, max);
        self
    }

    /// Offers `compression` to the server (in addition to any offered before). The server
    /// picks one algorithm it also accepts, or none; the choice holds for the connection.
    /// Default: none offered.
    ///
    /// Compression pays when payloads repeat (field names, ids, similar values) and the network
    /// costs more than CPU; on loopback or with incompressible payloads it only costs CPU.
    #[must_use]
    pub fn compression(mut self, compression: Compression) -> Self {
        self.config.compression |= compression.bit();
        self
    }

    /// Runs `hook` on every new connection, after the transport (and TLS) handshake and before
    /// the preface; an `Err` refuses the connection (the dial counts as failed and is retried
    /// with backoff). Bounded by the connect timeout.
    #[must_use]
    pub fn on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(ConnectInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), BoxError>> + Send + 'static,
    {
        self.config.on_connect = Some(crate::transport::hook(hook));
        self
    }

    /// How many connections to keep to the server (gorpc's `Client.Conns`). Default 1.
    ///
    /// Each call goes on the one of two connections chosen at random that has fewer calls
    /// awaiting replies (the power of two choices; with two connections, the less busy one),
    /// on a connection that is up whenever one is. One connection
    /// already carries hundreds of thousands of calls per second, since every message pending
    /// when its writer wakes leaves in one write; more connections pay when the client's
    /// callers run on many cores, or a server's, and one connection's reader or writer task
    /// becomes the bottleneck: with eight cores a side, 1,000 callers made 0.62M calls/s on one
    /// connection and 2.37M on eight (docs/benchmarks.md, session 22). All of them share
    /// `max_pending`, the stats and the readiness of the client.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f() -> towerpc::Result<()> {
    /// let client = towerpc::Client::builder()
    ///     .connections(4)
    ///     .connect("127.0.0.1:7000")
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn connections(mut self, k: usize) -> Self {
        self.config.connections = k.clamp(1, 1024);
        self
    }

    /// Wait-for-ready instead of fail-fast. Default `false`.
    ///
    /// Fail-fast (the default, as gorpc and gRPC): a call made while no connection is up
    /// (the client is backing off between dials, or the server is draining the connection)
    /// fails at once with an [`is_unavailable()`](crate::Error::is_unavailable) error, which is
    /// safe to retry. Wait-for-ready: such a call waits until a connection is up, at most until
    /// its own deadline (then it fails with `is_timeout()`), and the client's `poll_ready` is
    /// pending while no connection is up, which is how a balancer learns that this endpoint
    /// cannot take calls now.
    #[must_use]
    pub fn wait_for_ready(mut self, wait: bool) -> Self {
        self.config.wait_for_ready = wait;
        self
    }

    /// How long a connection's reader, with nothing to read, keeps looking for the next reply
    /// (yielding to the runtime's other tasks between looks) before it lets its thread sleep.
    /// Default 50 µs ([`DEFAULT_REPLY_SPIN`]); `Duration::ZERO` turns it off.
    ///
    /// A sleeping thread costs its wake-up on every reply: with one caller on loopback, that was
    /// most of a 70 µs round trip, and looking on for 50 µs more than doubled the calls a second
    /// (at less CPU per call, with fewer sleeps and wake-ups). With a towerpc server spinning too
    /// ([`Server::read_spin`](crate::Server::read_spin), on by default), 100 callers made 1.8–2.1×
    /// the calls a second they made with neither spinning for them (docs/benchmarks.md, session
    /// 14). The price is CPU while a reply is on its way: at most the window per wait, only where
    /// waits have been shorter than twice the window (behind a slower network or handler the reader
    /// sleeps at once), and for at most half the machine's CPUs' worth of the client's connections
    /// at once.
    ///
    /// Where threads wake quickly, the spin buys less and costs more: with each process on eight
    /// cores of its own, one caller made 10–19 % more calls a second than with neither side
    /// spinning, at 2.5 times the CPU per call (docs/benchmarks.md, session 22). Turn it off
    /// where idle CPU matters more than those microseconds.
    ///
    /// ```
    /// use std::time::Duration;
    /// // Where CPU time matters more than latency: never spin.
    /// let builder = towerpc::Client::builder().reply_spin(Duration::ZERO);
    /// # drop(builder);
    /// ```
    #[must_use]
    pub fn reply_spin(mut self, window: Duration) -> Self {
        self.config.reply_spin = crate::deadline::clamp(window);
        self
    }

    /// Resolves `addr`, dials it over TCP and completes the preface exchange. The client then
    /// keeps the connection up in the background, reconnecting with backoff when it breaks.
    ///
    /// Fails if the first connection cannot be made. Must be called within a tokio runtime.
    pub async fn connect(self, addr: impl tokio::net::ToSocketAddrs) -> Result<Client> {
        let addr = resolve(addr).await?;
        let connector = self.tcp_connector();
        self.connect_with(addr, connector).await
    }

    /// Returns at once and dials `addr` in the background. Calls made before the first
    /// connection is up wait for it; if it fails they fail with an `is_unavailable()` error.
    ///
    /// Must be called within a tokio runtime.
    pub fn connect_lazy(self, addr: SocketAddr) -> Client {
        let connector = self.tcp_connector();
        self.connect_lazy_with(addr, connector)
    }

    /// Like [`Builder::connect`], over any transport: `connector` is a tower `Service` that
    /// turns `target` into a stream (TCP, TLS, a unix socket, an in-memory pipe...), called
    /// again for every reconnect (and cloned for each of [`Builder::connections`]).
    ///
    /// With several connections it returns once every first dial has finished, and fails only
    /// when all of them failed.
    pub async fn connect_with<C, T>(self, target: T, connector: C) -> Result<Client>
    where
        C: Service<T> + Clone + Send + 'static,
        C::Response: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send,
        T: Clone + std::fmt::Debug + Send + Sync + 'static,
    {
        let (client, firsts) = self.start(target, connector);
        let mut err = None;
        let mut up = false;
        for first in firsts {
            match first
                .await
                .unwrap_or_else(|_| Err(Error::new(Kind::Closed)))
            {
                Ok(()) => up = true,
                Err(e) => err = err.or(Some(e)),
            }
        }
        match err {
            Some(e) if !up => Err(e),
            _ => Ok(client),
        }
    }

    /// Like [`Builder::connect_lazy`], over any transport (see [`Builder::connect_with`]).
    pub fn connect_lazy_with<C, T>(self, target: T, connector: C) -> Client
    where
        C: Service<T> + Clone + Send + 'static,
        C::Response: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send,
        T: Clone + std::fmt::Debug + Send + Sync + 'static,
    {
        self.start(target, connector).0
    }

    #[cfg(test)]
    pub(crate) fn into_config(self) -> Config {
        self.config
    }

    fn tcp_connector(&self) -> TcpConnector {
        TcpConnector::new().nodelay(self.config.tcp_nodelay)
    }

    fn start<C, T>(
        mut self,
        target: T,
        connector: C,
    ) -> (Client, Vec<tokio::sync::oneshot::Receiver<Result<()>>>)
    where
        C: Service<T> + Clone + Send + 'static,
        C::Response: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send,
        T: Clone + std::fmt::Debug + Send + Sync + 'static,
    {
        self.config.target = Some(format!("{target:?}").into());
        Client::spawn(self.config, connector, target)
    }
}

async fn resolve(addr: impl tokio::net::ToSocketAddrs) -> Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::new(Kind::Unavailable).with(e))?;
    addrs.next().ok_or_else(|| {
        Error::new(Kind::Unavailable).with("address resolved to nothing".to_string())
    })
}
