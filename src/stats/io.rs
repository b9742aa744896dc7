//! An I/O wrapper that counts bytes and read/write calls.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Counters;

tokio::task_local! {
    /// The counters of the client dialing on this task. A connector that layers something over
    /// the socket (TLS) puts a [`CountingIo`] beneath it, so stats count what crosses the wire,
    /// and says so here, so that the client does not count the layer above once more.
    static DIAL_COUNTERS: Dial;
}

struct Dial {
    counters: Arc<Counters>,
    claimed: AtomicBool,
}

/// Runs `dial` with `counters` as the dialing client's counters. Also returns whether a
/// connector counted the dialed stream itself (beneath its own layer).
pub(crate) async fn with_dial_counters<F: std::future::Future>(
    counters: Arc<Counters>,
    dial: F,
) -> (F::Output, bool) {
    let scope = Dial {
        counters,
        claimed: AtomicBool::new(false),
    };
    let (out, scope) = {
        let mut fut = std::pin::pin!(DIAL_COUNTERS.scope(scope, dial));
        let out = (&mut fut).await;
        (out, fut.as_mut().take_value())
    };
    let claimed = scope.is_some_and(|d| d.claimed.load(Ordering::Acquire));
    (out, claimed)
}

/// The counters of the client dialing on this task, if any, which the caller now counts into.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
fn claim_dial_counters() -> Option<Arc<Counters>> {
    DIAL_COUNTERS
        .try_with(|d| {
            d.claimed.store(true, Ordering::Release);
            d.counters.clone()
        })
        .ok()
}

pin_project! {
    /// A stream that counts every read and write reaching it into a client's or server's
    /// [`Stats`](super::Stats). A poll that returns `Pending` is not counted: tokio only issues
    /// the syscall once the socket is ready, so the counts are syscalls.
    ///
    /// Connectors that layer TLS over a socket (`transport::tls::TlsConnector`) put it beneath
    /// the TLS stream, so the stats count bytes on the wire.
    #[derive(Debug)]
    pub(crate) struct CountingIo<T> {
        #[pin]
        io: T,
        counters: Arc<Counters>,
    }
}

impl<T> CountingIo<T> {
    pub(crate) fn new(io: T, counters: Arc<Counters>) -> Self {
        CountingIo { io, counters }
    }

    /// Counts into the dialing client's stats (or into nothing, outside a client's dial).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn for_dial(io: T) -> Self {
        CountingIo::new(io, claim_dial_counters().unwrap_or_default())
    }

    /// The wrapped stream.
    pub(crate) fn get_ref(&self) -> &T {
        &self.io
    }

    /// The wrapped stream and the counters it counts into.
    pub(crate) fn into_parts(self) -> (T, Arc<Counters>) {
        (self.io, self.counters)
    }
}

pin_project! {
    /// A dialed stream, counted by the client: either it counts itself already (a connector put
    /// a [`CountingIo`] beneath its TLS), or the client wraps it here.
    #[project = MaybeCountedProj]
    #[derive(Debug)]
    pub(crate) enum MaybeCounted<T> {
        Counted { #[pin] io: T },
        Wrapped { #[pin] io: CountingIo<T> },
    }
}

impl<T: crate::transport::Connected> MaybeCounted<T> {
    /// `counted`: the connector counted the stream itself (see [`with_dial_counters`]).
    pub(crate) fn new(io: T, counters: Arc<Counters>, counted: bool) -> Self {
        if counted {
            MaybeCounted::Counted { io }
        } else {
            MaybeCounted::Wrapped {
                io: CountingIo::new(io, counters),
            }
        }
    }

    /// The client's own counting wrapper, when it put one around the stream.
    pub(crate) fn into_counting(self) -> Result<CountingIo<T>, Self> {
        match self {
            MaybeCounted::Wrapped { io } => Ok(io),
            counted => Err(counted),
        }
    }

    pub(crate) fn connect_info(&self) -> crate::transport::ConnectInfo {
        match self {
            MaybeCounted::Counted { io } => io.connect_info(),
            MaybeCounted::Wrapped { io } => io.get_ref().connect_info(),
        }
    }
}

impl<T: AsyncRead> AsyncRead for MaybeCounted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.project() {
            MaybeCountedProj::Counted { io } => io.poll_read(cx, buf),
            MaybeCountedProj::Wrapped { io } => io.poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for MaybeCounted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.project() {
            MaybeCountedProj::Counted { io } => io.poll_write(cx, buf),
            MaybeCountedProj::Wrapped { io } => io.poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.project() {
            MaybeCountedProj::Counted { io } => io.poll_write_vectored(cx, bufs),
            MaybeCountedProj::Wrapped { io } => io.poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeCounted::Counted { io } => io.is_write_vectored(),
            MaybeCounted::Wrapped { io } => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.project() {
            MaybeCountedProj::Counted { io } => io.poll_flush(cx),
            MaybeCountedProj::Wrapped { io } => io.poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.project() {
            MaybeCountedProj::Counted { io } => io.poll_shutdown(cx),
            MaybeCountedProj::Wrapped { io } => io.poll_shutdown(cx),
        }
    }
}

impl<T: AsyncRead> AsyncRead for CountingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = ready!(this.io.poll_read(cx, buf));
        Counters::inc(&this.counters.read_calls);
        match &res {
            Ok(()) => Counters::add(
                &this.counters.bytes_read,
                (buf.filled().len() - before) as u64,
            ),
            Err(_) => Counters::inc(&this.counters.read_errors),
        }
        Poll::Ready(res)
    }
}

impl Counters {
    /// Counts one write syscall and what it wrote.
    fn wrote(&self, res: &io::Result<usize>) {
        Counters::inc(&self.write_calls);
        match res {
            Ok(n) => Counters::add(&self.bytes_written, *n as u64),
            Err(_) => Counters::inc(&self.write_errors),
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for CountingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = ready!(this.io.poll_write(cx, buf));
        this.counters.wrote(&res);
        Poll::Ready(res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = ready!(this.io.poll_write_vectored(cx, bufs));
        this.counters.wrote(&res);
        Poll::Ready(res)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
