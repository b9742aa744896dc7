//! The floor: the smallest pipelined echo we know how to write by hand on tokio, used as the
//! yardstick towerpc is measured against in `benches/e2e.rs`.
//!
//! Wire format: `LengthDelimitedCodec` frames (4-byte big-endian length), each holding a `u64`
//! request id followed by the payload. There is no preface, no batching of several calls into
//! one frame, no deadlines and no error replies: only what a pipelined echo cannot do without.
//!
//! Server: accept; per connection a reader task decodes frames and hands each one, unchanged,
//! to a writer task over an unbounded channel. Client: one connection; callers register a
//! oneshot in a `Mutex<HashMap>` keyed by id and push the encoded frame to a writer task; a
//! reader task removes the id and completes the oneshot.
//!
//! Both writer tasks wait for one frame, then feed every frame already queued and flush once,
//! so under load one write syscall carries many replies. The write halves are wrapped in
//! [`CountingWrite`] so the bench can report write syscalls per call, as towerpc's stats do.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWrite;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// Bytes of the request id at the start of every frame.
const ID_LEN: usize = 8;

/// Bytes a writer buffers before `feed` writes to the socket by itself (see `write_loop`).
const DRAIN_BOUNDARY: usize = 4 << 20;

// ===== CountingWrite =====

/// An `AsyncWrite` that counts the `poll_write` calls that completed (`Ready`, with data or an
/// error). On a `TcpStream` half each of those is one `write` syscall; `Pending` ones are
/// not counted because the would-block attempt is what towerpc's counters skip too.
#[derive(Debug)]
pub(crate) struct CountingWrite<W> {
    inner: W,
    writes: Arc<AtomicU64>,
}

impl<W> CountingWrite<W> {
    fn new(inner: W, writes: Arc<AtomicU64>) -> Self {
        CountingWrite { inner, writes }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CountingWrite<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if res.is_ready() {
            self.writes.fetch_add(1, Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    // `poll_write_vectored` keeps its default (one `poll_write` of the first buffer), and
    // `is_write_vectored` stays false, so every write goes through `poll_write` above.
}

/// Waits for one frame, feeds it and every frame already queued, then flushes once.
async fn write_loop<W>(mut rx: mpsc::UnboundedReceiver<Bytes>, io: W)
where
    W: AsyncWrite + Unpin,
{
    let mut sink = FramedWrite::new(io, LengthDelimitedCodec::new());
    // `feed` writes to the socket on its own once 8 KiB (the default boundary) are buffered,
    // i.e. every ~7 replies of 1 KiB. Raise it so that a drain of 1,000 callers' 1 KiB frames
    // is still one flush, as the design says; the buffer is bounded by callers × frame size.
    sink.set_backpressure_boundary(DRAIN_BOUNDARY);
    while let Some(first) = rx.recv().await {
        if sink.feed(first).await.is_err() {
            return;
        }
        while let Ok(next) = rx.try_recv() {
            if sink.feed(next).await.is_err() {
                return;
            }
        }
        if SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
            return;
        }
    }
}

// ===== Server =====

/// A running floor echo server. Dropping it stops accepting; open connections end when their
/// client closes.
#[derive(Debug)]
pub(crate) struct Server {
    addr: SocketAddr,
    writes: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Server {
    /// Starts serving on `listener`.
    pub(crate) fn start(listener: TcpListener) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let writes = Arc::new(AtomicU64::new(0));
        let counter = writes.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                serve_conn(stream, counter.clone());
            }
        });
        Ok(Server {
            addr,
            writes,
            accept,
        })
    }

    /// The address it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Write syscalls on all accepted connections so far.
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn serve_conn(stream: TcpStream, writes: Arc<AtomicU64>) {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(write_loop(rx, CountingWrite::new(wr, writes)));
    tokio::spawn(async move {
        let mut frames = FramedRead::new(rd, LengthDelimitedCodec::new());
        while let Some(Ok(frame)) = frames.next().await {
            // The reply is the request frame itself: same id, same payload.
            if tx.send(frame.freeze()).is_err() {
                return;
            }
        }
    });
}

// ===== Client =====

type PendingMap = Mutex<HashMap<u64, oneshot::Sender<Bytes>>>;

/// A floor client: one connection shared by every caller.
#[derive(Debug)]
pub(crate) struct Client {
    tx: mpsc::UnboundedSender<Bytes>,
    pending: Arc<PendingMap>,
    next_id: AtomicU64,
    writes: Arc<AtomicU64>,
}

impl Client {
    /// Connects to a floor server.
    pub(crate) async fn connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let writes = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(PendingMap::default());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(rx, CountingWrite::new(wr, writes.clone())));
        let map = pending.clone();
        tokio::spawn(async move {
            let mut frames = FramedRead::new(rd, LengthDelimitedCodec::new());
            while let Some(Ok(mut frame)) = frames.next().await {
                if frame.len() < ID_LEN {
                    break;
                }
                let id = frame.get_u64();
                let waiter = map.lock().unwrap().remove(&id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(frame.freeze());
                }
            }
            // Connection gone: fail every caller still waiting.
            map.lock().unwrap().clear();
        });
        Ok(Client {
            tx,
            pending,
            next_id: AtomicU64::new(1),
            writes,
        })
    }

    /// Sends `payload` and waits for the echoed reply.
    pub(crate) async fn call(&self, payload: &[u8]) -> io::Result<Bytes> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut frame = BytesMut::with_capacity(ID_LEN + payload.len());
        frame.put_u64(id);
        frame.put_slice(payload);
        let (reply_tx, reply_rx) = oneshot::channel();
        // Register before sending, or a fast reply could find no one waiting.
        self.pending.lock().unwrap().insert(id, reply_tx);
        if self.tx.send(frame.freeze()).is_err() {
            self.pending.lock().unwrap().remove(&id);
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        reply_rx
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionReset))
    }

    /// Write syscalls on this client's connection so far.
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Relaxed)
    }
}
