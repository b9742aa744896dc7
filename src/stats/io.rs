//! An I/O wrapper that counts bytes and read/write calls.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Counters;

pin_project! {
    /// Counts every read and write that reaches the wrapped stream and completes. A poll that
    /// returns `Pending` is not counted: tokio only issues the syscall once the socket is ready.
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

impl<T: AsyncWrite> AsyncWrite for CountingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = ready!(this.io.poll_write(cx, buf));
        Counters::inc(&this.counters.write_calls);
        match &res {
            Ok(n) => Counters::add(&this.counters.bytes_written, *n as u64),
            Err(_) => Counters::inc(&this.counters.write_errors),
        }
        Poll::Ready(res)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
