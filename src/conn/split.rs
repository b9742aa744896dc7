//! A connection's stream in two halves, one for its reader and one for its writer.
//!
//! `tokio::io::split` works for any stream, but both halves share the stream behind a mutex
//! that is held for the whole of each poll, syscall included: while the reader's `recv` runs,
//! the writer's `send` waits for it, and a writer on another worker thread waits asleep on the
//! mutex (a futex sleep and wake-up each time). With 100 callers on two shared cores that was a
//! third of the client's futex calls (`perf trace`, docs/benchmarks.md, session 14). A TCP or
//! Unix socket can be read and written at once from two tasks, so those are split with
//! `into_split`, without a lock; every other stream (TLS, an upgraded HTTP connection, a
//! user's transport) falls back to `tokio::io::split`.
//!
//! Which stream a connection has is known only as a type parameter; the sockets are found by
//! their type (`Any`), counted as the rest are: beneath the split, each half counting into
//! the same counters.

use std::any::Any;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{tcp, TcpStream};
use tokio_util::either::Either;

use crate::stats::{CountingIo, MaybeCounted};

/// Splits `io` into a read half and a write half, without a lock between them where `io` is a
/// TCP or Unix socket (counted or not).
pub(crate) fn split<T>(io: T) -> (ReadHalf<T>, WriteHalf<T>)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    match socket(io) {
        Ok((r, w)) => (Either::Left(r), Either::Left(w)),
        Err(io) => {
            let (r, w) = tokio::io::split(io);
            (Either::Right(r), Either::Right(w))
        }
    }
}

/// The read half of a connection's stream (see [`split`]): a socket's own, or one of
/// `tokio::io::split`'s.
pub(crate) type ReadHalf<T> = Either<CountingIo<SocketRead>, tokio::io::ReadHalf<T>>;

/// The write half of a connection's stream (see [`split`]).
pub(crate) type WriteHalf<T> = Either<CountingIo<SocketWrite>, tokio::io::WriteHalf<T>>;

/// A socket's read half.
#[derive(Debug)]
pub(crate) enum SocketRead {
    Tcp(tcp::OwnedReadHalf),
    #[cfg(all(unix, feature = "unix"))]
    Unix(tokio::net::unix::OwnedReadHalf),
}

/// A socket's write half. Dropped, it leaves the socket open until the read half goes too, as
/// a half of `tokio::io::split` does: only an explicit shutdown sends the peer a FIN.
#[derive(Debug)]
pub(crate) struct SocketWrite(Option<SocketWriteInner>);

#[derive(Debug)]
enum SocketWriteInner {
    Tcp(tcp::OwnedWriteHalf),
    #[cfg(all(unix, feature = "unix"))]
    Unix(tokio::net::unix::OwnedWriteHalf),
}

impl Drop for SocketWrite {
    fn drop(&mut self) {
        match self.0.take() {
            Some(SocketWriteInner::Tcp(w)) => w.forget(),
            #[cfg(all(unix, feature = "unix"))]
            Some(SocketWriteInner::Unix(w)) => w.forget(),
            None => {}
        }
    }
}

/// A socket's two counted halves.
type Halves = (CountingIo<SocketRead>, CountingIo<SocketWrite>);

/// `io` as the two counted halves of a socket, or `io` back when it is no socket.
fn socket<T: 'static>(io: T) -> Result<Halves, T> {
    let mut slot = Some(io);
    if let Some(halves) = halves_of(&mut slot, tcp_halves) {
        return Ok(halves);
    }
    #[cfg(all(unix, feature = "unix"))]
    if let Some(halves) = halves_of(&mut slot, unix_halves) {
        return Ok(halves);
    }
    Err(slot.expect("still here"))
}

/// Splits what `slot` holds when it is a counted `S`. The server counts every stream beneath
/// everything else; the client wraps what it dialed unless the connector counted beneath its
/// own layer (which is then no socket, and stays in `slot`).
fn halves_of<S>(slot: &mut dyn Any, split: fn(CountingIo<S>) -> Halves) -> Option<Halves>
where
    S: crate::transport::Connected + 'static,
{
    if let Some(io) = slot.downcast_mut::<Option<CountingIo<S>>>() {
        return io.take().map(split);
    }
    let io = slot.downcast_mut::<Option<MaybeCounted<S>>>()?;
    match io.take()?.into_counting() {
        Ok(counted) => Some(split(counted)),
        Err(back) => {
            *io = Some(back);
            None
        }
    }
}

fn tcp_halves(io: CountingIo<TcpStream>) -> Halves {
    let (io, counters) = io.into_parts();
    let (r, w) = io.into_split();
    (
        CountingIo::new(SocketRead::Tcp(r), counters.clone()),
        CountingIo::new(SocketWrite(Some(SocketWriteInner::Tcp(w))), counters),
    )
}

#[cfg(all(unix, feature = "unix"))]
fn unix_halves(io: CountingIo<tokio::net::UnixStream>) -> Halves {
    let (io, counters) = io.into_parts();
    let (r, w) = io.into_split();
    (
        CountingIo::new(SocketRead::Unix(r), counters.clone()),
        CountingIo::new(SocketWrite(Some(SocketWriteInner::Unix(w))), counters),
    )
}

impl AsyncRead for SocketRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketRead::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            #[cfg(all(unix, feature = "unix"))]
            SocketRead::Unix(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl SocketWrite {
    fn io(&mut self) -> Pin<&mut (dyn AsyncWrite + Send + Unpin)> {
        match self.0.as_mut().expect("taken only on drop") {
            SocketWriteInner::Tcp(w) => Pin::new(w),
            #[cfg(all(unix, feature = "unix"))]
            SocketWriteInner::Unix(w) => Pin::new(w),
        }
    }
}

impl AsyncWrite for SocketWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        match self.0.as_ref() {
            Some(SocketWriteInner::Tcp(w)) => w.is_write_vectored(),
            #[cfg(all(unix, feature = "unix"))]
            Some(SocketWriteInner::Unix(w)) => w.is_write_vectored(),
            None => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::stats::Counters;

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (dialed.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn sockets_split_without_a_lock_and_other_streams_with_one() {
        let counters = Arc::new(Counters::default());
        let (ours, _peer) = tcp_pair().await;
        let (r, w) = split(CountingIo::new(ours, counters.clone()));
        assert!(matches!((r, w), (Either::Left(_), Either::Left(_))));

        let (ours, _peer) = tcp_pair().await;
        let (r, w) = split(MaybeCounted::new(ours, counters.clone(), false));
        assert!(matches!((r, w), (Either::Left(_), Either::Left(_))));

        // Counted by its connector beneath a layer of its own: not a bare socket to us.
        let (ours, _peer) = tcp_pair().await;
        let (r, w) = split(MaybeCounted::new(ours, counters.clone(), true));
        assert!(matches!((r, w), (Either::Right(_), Either::Right(_))));

        let (ours, _peer) = tokio::io::duplex(64);
        let (r, w) = split(CountingIo::new(ours, counters));
        assert!(matches!((r, w), (Either::Right(_), Either::Right(_))));
    }

    #[tokio::test]
    async fn both_halves_of_a_socket_count_into_the_same_counters() {
        let counters = Arc::new(Counters::default());
        let (ours, mut peer) = tcp_pair().await;
        let (mut r, mut w) = split(CountingIo::new(ours, counters.clone()));
        w.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        peer.write_all(b"pong!").await.unwrap();
        let mut got = [0u8; 5];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong!");
        let stats = counters.snapshot();
        assert_eq!((stats.bytes_written, stats.write_calls), (4, 1));
        assert_eq!(stats.bytes_read, 5);
        assert!(stats.read_calls >= 1);
    }

    #[tokio::test]
    async fn a_dropped_write_half_leaves_the_socket_open_until_the_read_half_goes() {
        let (ours, mut peer) = tcp_pair().await;
        let (mut r, w) = split(CountingIo::new(ours, Arc::new(Counters::default())));
        drop(w);
        // A round trip after the drop: a FIN sent by it would be at the peer by now.
        peer.write_all(b"x").await.unwrap();
        let mut got = [0u8; 1];
        r.read_exact(&mut got).await.unwrap();
        let mut buf = [0u8; 8];
        match peer.try_read(&mut buf) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            Ok(n) => panic!("the peer read {n} bytes (0: end of stream) with the read half alive"),
        }
        drop(r);
        assert_eq!(peer.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_write_half_shut_down_sends_the_end_of_stream() {
        let (ours, mut peer) = tcp_pair().await;
        let (_r, mut w) = split(CountingIo::new(ours, Arc::new(Counters::default())));
        w.write_all(b"last").await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last");
    }

    #[cfg(all(unix, feature = "unix"))]
    #[tokio::test]
    async fn a_unix_socket_splits_without_a_lock() {
        let (ours, mut peer) = tokio::net::UnixStream::pair().unwrap();
        let (mut r, mut w) = split(CountingIo::new(ours, Arc::new(Counters::default())));
        assert!(matches!(r, Either::Left(_)));
        w.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        peer.write_all(&got).await.unwrap();
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }
}
