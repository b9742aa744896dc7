//! Pieces both ends of a connection share: the preface exchange, the batching writer loop and
//! the buffered reader.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::codec::{
    Batch, CodecError, FrameCodec, Incoming, Message, Preface, FRAGMENTS_PER_TAKE, MAX_IO_SLICES,
    PREFACE_LEN,
};
use crate::stats::Counters;

/// Default size of the read buffer reserved before each socket read (64 KiB): one read pulls
/// up to this much, so under load one `recv` carries many batches.
pub(crate) const DEFAULT_BUFFER_SIZE: usize = 64 * 1024;

/// How long a side that closes a connection after its GOAWAY reads on (and drops what it
/// reads), for the peer to read the GOAWAY before the close (PROTOCOL.md §5.6): see
/// [`FrameReader::linger`].
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// Largest batch buffer a writer keeps for its next batch (more while large messages go out in
/// fragments copied into the batches: see `write_loop`); a larger one is a one-off and goes,
/// so it does not pin memory for the connection's life.
const KEEP_BATCH: usize = 4 * DEFAULT_BUFFER_SIZE;

/// Messages a reader takes out of a frame at a time ([`FrameReader::messages`]) and handles
/// together (the client: one critical section, then the callers woken). What it holds decoded
/// is this many, never a whole frame's worth: up to 65,535 messages, 112 bytes each decoded
/// against 5 on the wire for the smallest. Small chunks also keep the tail short: at 1,000
/// callers, chunks of 32 gave a p99 of 2.8–3.1 ms where chunks of 128 or more gave 3.4–3.8
/// (docs/benchmarks.md, session 9).
pub(crate) const MESSAGE_CHUNK: usize = 32;

/// A limit that a tokio semaphore will hold as permits: at least 1, at most
/// `Semaphore::MAX_PERMITS` (`Semaphore::new` panics past it), so "no limit" may be spelled
/// `usize::MAX`. The client's `max_pending` and the server's connection limit are semaphores;
/// the server's concurrency limits (`server::Limited`) keep to the same range.
pub(crate) fn permits(n: usize) -> usize {
    n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS)
}

/// Writes our preface and reads the peer's.
pub(crate) async fn exchange_preface<T>(io: &mut T, ours: Preface) -> io::Result<Preface>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(&ours.to_bytes()).await?;
    io.flush().await?;
    read_preface(io).await
}

pub(crate) async fn read_preface<T>(io: &mut T) -> io::Result<Preface>
where
    T: AsyncRead + Unpin,
{
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut b = [0u8; PREFACE_LEN];
    let mut filled = 0;
    while filled < PREFACE_LEN {
        match io.read(&mut b[filled..]).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
        // Bytes that cannot start a preface end the handshake at once, not at its timeout.
        Preface::check_start(&b[..filled]).map_err(invalid)?;
    }
    Preface::parse(&b).map_err(invalid)
}

/// Where a writer takes its bytes from: a take hands over everything pending (possibly several
/// frames) and leaves the source empty.
pub(crate) trait Source {
    /// Swaps the pending bytes with `spare` (an empty, reusable batch). `None` means the
    /// connection is over and nothing is left to write: the writer shuts the stream down.
    fn take(&self, spare: Batch) -> Option<Batch>;

    /// Bytes waiting to be taken.
    fn pending_len(&self) -> usize;

    /// Whether the writer, with nothing to write, should let go of its spare batch buffer
    /// before it sleeps (the connection has gone quiet); the source lets go of its own.
    fn quiet(&self) -> bool {
        false
    }

    /// How many times the writer may yield, waiting for the batch to stop growing, before it
    /// writes: 0 when no caller or handler that could append is still running (one caller,
    /// whose request is already queued), since waiting would only add latency; at most
    /// [`MAX_BATCH_YIELDS`].
    fn batch_yields(&self) -> usize;
}

/// Most times the writer yields, waiting for a batch to stop growing, before it writes.
pub(crate) const MAX_BATCH_YIELDS: usize = 4;

/// The batching writer: take *everything* pending, write it with one `write` (one syscall
/// unless the socket buffer is full; vectored when fragments of large messages go out from
/// their own buffers), and repeat; sleep only when a take comes back empty.
///
/// Callers append to the source and wake `notify` only when they found it empty, so a busy
/// connection makes one write per round of this loop, however many callers there are: the
/// callers that arrive while a write is in progress all go out in the next one.
pub(crate) async fn write_loop<W, S>(
    mut io: W,
    source: &S,
    notify: &Notify,
    opts: WriteOptions,
    counters: &Counters,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    S: Source + ?Sized,
{
    let gather = opts.gather && io.is_write_vectored();
    let mut spare = Batch::new(gather);
    loop {
        let Some(buf) = source.take(spare) else {
            let _ = io.shutdown().await;
            return Ok(());
        };
        if buf.is_empty() {
            spare = buf;
            if source.quiet() {
                spare = Batch::new(gather);
            }
            notify.notified().await;
            if let Some(delay) = opts.flush_delay {
                // Trade latency for bigger batches: let more callers append before we take.
                tokio::time::sleep(delay).await;
            } else if let yields @ 1.. = source.batch_yields() {
                // The task that woke us is usually one of many made runnable by the same batch
                // of replies, and tokio runs a freshly woken task next (its LIFO slot). Taking
                // now would send one message per write; yielding lets the rest of the runnable
                // callers append first. We yield while the batch keeps growing (a few times at
                // most), so it forms at no latency cost: nothing here waits on a timer.
                let mut last = source.pending_len();
                for _ in 0..yields {
                    tokio::task::yield_now().await;
                    let now = source.pending_len();
                    if now == last {
                        break;
                    }
                    last = now;
                }
            }
            continue;
        }
        let batch_len = buf.len();
        if let Err(e) = write_batch(&mut io, &buf, opts.write_timeout).await {
            if e.kind() == io::ErrorKind::TimedOut {
                // No syscall failed (those are counted where they happen): the peer stopped
                // reading.
                Counters::inc(&counters.write_errors);
            }
            return Err(e);
        }
        io.flush().await?;
        Counters::inc(&counters.frames_written);
        spare = buf;
        // Keep a large one-off buffer from pinning memory for the connection's life. While
        // large messages go out in fragments copied into the batches, a buffer of up to
        // FRAGMENTS_PER_TAKE of them besides the frames is not a one-off but every such
        // batch's (the two buffers alternate). Dropped, the next take grew a fresh one from
        // nothing, copying it at each step (`realloc` was 6 % of the client's CPU beside
        // 200 KiB calls).
        let keep = if spare.copying_fragments() {
            KEEP_BATCH + FRAGMENTS_PER_TAKE
        } else {
            KEEP_BATCH
        };
        // Let go of the fragments' payloads now, not at the next take.
        spare.clear();
        if spare.capacity() > keep {
            spare = Batch::new(gather);
        }
        // What arrived during the write goes out next without a wake-up, so nothing above
        // lets it grow: when it is still a fraction of the batch just written and more
        // callers are on their way, yield once for them. At 1,000 callers this cuts the
        // socket writes per call from 0.028 to 0.012 (both processes) for 0-3 % of the calls
        // per second.
        if opts.flush_delay.is_none() {
            let pending = source.pending_len();
            if pending > 0 && pending < batch_len / 2 && source.batch_yields() > 0 {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Writes `batch` whole. The timeout bounds each write's *progress*, not the batch: a peer that
/// reads slowly but steadily behind a large backlog keeps its connection, one that stops
/// reading for `timeout` loses it.
async fn write_batch<W>(io: &mut W, batch: &Batch, timeout: Option<Duration>) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let total = batch.len();
    let mut written = 0;
    while written < total {
        let n = match batch.as_contiguous() {
            Some(buf) => with_timeout(timeout, io.write(&buf[written..])).await?,
            None => {
                let mut iov = [io::IoSlice::new(&[]); MAX_IO_SLICES];
                let k = batch.io_slices(written, &mut iov);
                with_timeout(timeout, io.write_vectored(&iov[..k])).await?
            }
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    Ok(())
}

/// One write, failed if it makes no progress within `timeout`.
async fn with_timeout<F>(timeout: Option<Duration>, write: F) -> io::Result<usize>
where
    F: std::future::Future<Output = io::Result<usize>>,
{
    match timeout {
        Some(t) => tokio::time::timeout(t, write).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stopped reading (no write progress within the write timeout)",
            )
        })?,
        None => write.await,
    }
}

/// Options of [`write_loop`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WriteOptions {
    pub(crate) flush_delay: Option<Duration>,
    pub(crate) write_timeout: Option<Duration>,
    /// Whether fragments of large messages go out from their own buffers in a vectored write
    /// (where the stream writes vectored) rather than copied into the batch.
    pub(crate) gather: bool,
}

/// Whether a connection's reader, finding nothing to read, looks again at once (yielding)
/// instead of letting its worker thread sleep until the socket wakes it: the client's
/// `Builder::reply_spin` and the server's `Server::read_spin`.
///
/// A sleeping thread costs a wake-up for every frame that arrives, and on an idle CPU that is most
/// of a loopback round trip (docs/benchmarks.md, sessions 11, 12 and 14). The reader looks again
/// for up to the window since it began waiting, and only while the wait before was shorter than
/// twice the window (behind a slow network, handler or peer every wait outlasts it, and the reader
/// sleeps at once), its owner allows it (see [`Spin::allow`]) and it holds one of the [`SpinSlots`]
/// its server's (or client's) connections share. The looks are yields, so other tasks on the worker
/// run between them. The std clock bounds it: paused tokio time must not make a spin endless.
#[derive(Debug)]
pub(crate) struct Spin {
    window: Duration,
    /// When the reader began waiting for the next frame.
    since: Option<std::time::Instant>,
    /// How long the wait before this one lasted, spun or slept.
    last_wait: Duration,
    /// Whether the owner allows spinning for the next frame.
    allowed: bool,
    slots: std::sync::Arc<SpinSlots>,
    /// Whether this reader holds one of `slots` (while it spins).
    holding: bool,
}

impl Spin {
    /// A spin of `window` per wait, while one of `slots` is free; `Duration::ZERO` never
    /// spins.
    pub(crate) fn new(window: Duration, slots: std::sync::Arc<SpinSlots>) -> Self {
        Spin {
            window,
            since: None,
            last_wait: Duration::ZERO,
            allowed: true,
            slots,
            holding: false,
        }
    }

    /// Allows (or forbids) spinning while waiting for the next frame, as what the last one
    /// showed says (the server: a few requests and no fragments).
    pub(crate) fn allow(&mut self, allowed: bool) {
        self.allowed = allowed;
    }

    /// Whether to look again instead of sleeping; the first call of a wait starts its clock.
    pub(crate) fn again(&mut self) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let now = std::time::Instant::now();
        let since = *self.since.get_or_insert(now);
        if self.allowed && self.last_wait <= 2 * self.window && now - since < self.window {
            if !self.holding {
                self.holding = self.slots.take();
            }
            self.holding
        } else {
            self.release();
            false
        }
    }

    /// A frame arrived: the wait is over.
    pub(crate) fn arrived(&mut self) {
        self.release();
        if let Some(since) = self.since.take() {
            self.last_wait = since.elapsed();
        }
    }

    fn release(&mut self) {
        if std::mem::take(&mut self.holding) {
            self.slots.give_back();
        }
    }
}

impl Drop for Spin {
    fn drop(&mut self) {
        self.release();
    }
}

/// How many of a server's (or a client's) connections may spin at once: half the machine's
/// CPUs, at least one.
///
/// A spin is per connection; without a bound, a server with many connections whose requests
/// come a little apart would keep every worker busy looking at sockets. Bounded, the CPU spun
/// away is at most half the machine's, and a reader that finds every slot taken sleeps as it
/// would with no spin at all.
#[derive(Debug)]
pub(crate) struct SpinSlots {
    busy: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl SpinSlots {
    /// At most `max` spinning at once.
    pub(crate) fn new(max: usize) -> Self {
        SpinSlots {
            busy: std::sync::atomic::AtomicUsize::new(0),
            max,
        }
    }

    /// Half this machine's CPUs, at least one.
    pub(crate) fn half_the_cpus() -> std::sync::Arc<SpinSlots> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::sync::Arc::new(SpinSlots::new((cpus / 2).max(1)))
    }

    /// Takes a slot, if one is free.
    fn take(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.busy
            .fetch_update(Relaxed, Relaxed, |busy| {
                (busy < self.max).then_some(busy + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.busy.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a server's memory budget tells its connection's reader ([`FrameReader::gate`]).
pub(crate) trait ReadGate: Send + Sync {
    /// Asked before each read in the middle of a frame, with the memory the reader holds (its
    /// buffer's capacity and a message partly reassembled): `false` holds the read back, and
    /// it asks again a little later.
    fn may_read(&self, held: usize) -> bool;

    /// Asked before each read between frames: whether memory is short, so that the read takes
    /// [`SHORT_READ`] bytes at most. Such a read is never held back (a reader between frames
    /// holds nothing, so is under any share), and what it takes is counted only at the next
    /// read, in the middle of the frame it began: unbounded, 9,000 connections each sending
    /// 60 KB of a frame made a server with a 256 MiB budget hold 702 MiB, one 64 KiB read each.
    fn short(&self) -> bool;
}

/// Most a read between frames takes while memory is short ([`ReadGate::short`]): a frame of a
/// few small requests, little next to the 64 KiB a read takes otherwise.
const SHORT_READ: usize = 4096;

/// The error of a frame that took longer than the frame read timeout to arrive.
fn frame_timed_out() -> CodecError {
    CodecError::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        "a frame took longer than the frame read timeout to arrive",
    ))
}

/// How long a read held back by its [`ReadGate`] waits before asking again.
const GATE_RECHECK: Duration = Duration::from_millis(10);

/// A value on cache lines of its own (128 bytes: the CPU fetches lines in pairs), for a
/// connection's lock and `Notify`s: written at every call or batch by whichever thread holds
/// them, while the fields beside them (the counters, the configuration) are read at every call
/// and written almost never. On a client, unpadded, loading `counters` to count a call that
/// ended was the hottest instruction of the response future's poll at 1,000 callers.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// Buffered frame reader: each read pulls as much as the socket has (up to the buffer's free
/// space), then every whole frame in the buffer is decoded.
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    codec: FrameCodec,
    /// Bound on the time spent waiting for one frame's bytes once its first byte has arrived.
    frame_timeout: Option<Duration>,
    /// Time spent waiting in reads for the frame (or the message in fragments) being read,
    /// and held back by the gate meanwhile. Only the waits count: while the reader's owner
    /// does not read (a server waiting for a handler slot) the peer cannot send either, so a
    /// frame half in when the reader stopped has not been slow to arrive.
    frame_waited: Duration,
    /// When the read now waiting (or the last one, dropped before it completed) began to wait,
    /// in the middle of a frame with a frame timeout.
    waiting_since: Option<tokio::time::Instant>,
    /// Bytes the last read took.
    last_read: usize,
    gate: Option<Box<dyn ReadGate>>,
}

impl<R> std::fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffered", &self.buf.len())
            .field("frame_timeout", &self.frame_timeout)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(io: R, codec: FrameCodec) -> Self {
        FrameReader {
            io,
            // Taken at the first read, small (see `next`).
            buf: BytesMut::new(),
            codec,
            frame_timeout: None,
            frame_waited: Duration::ZERO,
            waiting_since: None,
            last_read: 0,
            gate: None,
        }
    }

    /// Asks `gate` before each read in the middle of a frame (the server's memory budget).
    pub(crate) fn gate(mut self, gate: impl ReadGate + 'static) -> Self {
        self.gate = Some(Box::new(gate));
        self
    }

    /// Bounds how long this side may wait for one frame to arrive once its first byte has
    /// (time it spends not reading does not count): a peer that announces a frame and then
    /// sends its body a byte a second is cut off.
    pub(crate) fn frame_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.frame_timeout = timeout;
        self
    }

    /// Reads and drops what the peer still sends, until it closes its side or `limit` passes.
    /// A socket closed with unread input sends a reset, and a reset can destroy what the peer
    /// has not read yet: the GOAWAY that says why the connection is closing.
    pub(crate) async fn linger(&mut self, limit: Duration) {
        let drain = async {
            loop {
                self.buf.clear();
                if self.buf.capacity() < DEFAULT_BUFFER_SIZE {
                    self.buf.reserve(DEFAULT_BUFFER_SIZE);
                }
                match self.io.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(limit, drain).await;
    }

    /// Takes up to [`MESSAGE_CHUNK`] messages of `frame` (from [`next`](Self::next)) into
    /// `out`, none once the frame has no more. Only a message reassembled from fragments can
    /// be refused here: its last piece is what shows it whole.
    pub(crate) fn messages(
        &mut self,
        frame: &mut Incoming,
        out: &mut Vec<Message>,
    ) -> Result<(), CodecError> {
        while out.len() < MESSAGE_CHUNK {
            match self.codec.next_message(frame)? {
                Some(msg) => out.push(msg),
                None => break,
            }
        }
        // The next frame's clock starts with its first byte (maybe already here). A message in
        // fragments keeps the clock of its first piece: the waits for all of them count
        // against the bound, as for a whole frame's bytes. Only now, with this frame's pieces
        // taken in, is it known whether one is still on its way.
        if frame.left() == 0 && !self.codec.in_message() {
            self.frame_waited = Duration::ZERO;
        }
        Ok(())
    }

    /// Whether a message is partly reassembled from its fragments.
    pub(crate) fn in_message(&self) -> bool {
        self.codec.in_message()
    }

    /// FRAGMENTs taken in since the connection began.
    pub(crate) fn fragments_read(&self) -> u64 {
        self.codec.fragments_read()
    }

    /// The ACK to send for the fragment data read, when one is due (PROTOCOL.md §4.1).
    pub(crate) fn take_ack(&mut self) -> Option<crate::codec::Message> {
        self.codec.take_ack()
    }

    /// Memory held between frames: that of a message partly reassembled from its fragments.
    /// (Not the buffers kept for the next ones: see `codec::spare`.)
    pub(crate) fn held_between_frames(&self) -> usize {
        self.codec.partial_capacity()
    }

    /// Frees the buffers kept for messages to come in fragments; returns whether there were
    /// any.
    pub(crate) fn release_spares(&self) -> bool {
        self.codec.release_spares()
    }

    /// Lets go of the read buffer, between frames and with nothing buffered, and of the
    /// buffers kept for messages to come in fragments: a quiet connection holds none (the
    /// next read takes a fresh buffer).
    pub(crate) fn release_buffers(&mut self) {
        if self.buf.is_empty() && !self.codec.in_frame() && !self.codec.in_message() {
            self.buf = BytesMut::new();
        }
        self.codec.release_spares();
    }

    /// The next frame, checked whole; its messages come out with [`messages`](Self::messages).
    /// `Ok(None)` at a clean end of stream (between frames).
    ///
    /// Cancel safe: a read that is dropped loses no bytes (they stay in the buffer).
    pub(crate) async fn next(&mut self) -> Result<Option<Incoming>, CodecError> {
        loop {
            if let Some(frame) = self.codec.decode_frame(&mut self.buf)? {
                return Ok(Some(frame));
            }
            let partial = !self.buf.is_empty() || self.codec.in_frame() || self.codec.in_message();
            // Between frames, memory short (a server over its budget): a small read into a
            // small buffer. What it takes is counted at the next read, in the middle of the
            // frame it began, which the gate may hold back.
            let short = !partial && self.gate.as_ref().is_some_and(|gate| gate.short());
            // Between frames after a small read (a new connection, a quiet or light one): a
            // small buffer will do, and many idle connections then hold 4 KiB each, not 64. A
            // read that fills it, or a frame larger than it, grows it.
            let light = !partial && self.last_read < SHORT_READ;
            // While a message arrives in fragments, read several of them at once: a large
            // message then costs as few reads as it did in one frame.
            let want = if self.codec.in_message() {
                4 * DEFAULT_BUFFER_SIZE
            } else if short || light {
                SHORT_READ
            } else {
                DEFAULT_BUFFER_SIZE
            };
            // A light read gets all of its small buffer; others grow theirs once less than a
            // quarter of what they want is free (fewer, larger reallocations).
            let grow = self.buf.capacity() - self.buf.len() < if light { want } else { want / 4 };
            // A timer only while a frame is partly read: the common case, a read between
            // frames, arms none (and reads no clock).
            let deadline = self.frame_timeout.filter(|_| partial).map(|t| {
                // Kept across a dropped read (a spinning reader drops many), so no wait is
                // lost; cleared when a read completes.
                let since = *self
                    .waiting_since
                    .get_or_insert_with(tokio::time::Instant::now);
                since + t.saturating_sub(self.frame_waited)
            });
            if let Some(gate) = self.gate.as_ref().filter(|_| partial) {
                // Asked with the buffer it is about to grow to, before it grows.
                let capacity = if grow {
                    self.buf.len() + want
                } else {
                    self.buf.capacity()
                };
                while !gate.may_read(capacity + self.held_between_frames()) {
                    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                        return Err(frame_timed_out());
                    }
                    // Held back (a server over its memory budget): what is kept for messages
                    // to come is freed first.
                    if !self.release_spares() {
                        tokio::time::sleep(GATE_RECHECK).await;
                    }
                }
            }
            if grow {
                self.buf.reserve(want);
            }
            let most = if short { SHORT_READ } else { usize::MAX };
            let mut into = (&mut self.buf).limit(most);
            let read = self.io.read_buf(&mut into);
            let res = match deadline {
                Some(deadline) => {
                    let res = tokio::time::timeout_at(deadline, read).await;
                    if let Some(since) = self.waiting_since.take() {
                        self.frame_waited += since.elapsed();
                    }
                    match res {
                        Ok(res) => res,
                        Err(_) => return Err(frame_timed_out()),
                    }
                }
                None => read.await,
            };
            let n = match res {
                Ok(n) => n,
                // Beneath us a decompressor (or TLS) found the stream corrupt or over its
                // limits (a zstd window above the cap): the peer broke the protocol.
                // A zstd window past the server's compression budget (`WindowGate`).
                Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
                    return Err(CodecError::ResourceExhausted(
                        "the compression window asked for is past the server's budget",
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::debug!(error = %e, "invalid data on the stream");
                    return Err(CodecError::InvalidFrame(
                        "stream data is invalid (corrupt or over the limits of its compression)",
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            self.last_read = n;
            if n == 0 {
                // A message partly reassembled is dropped with the connection.
                return if self.buf.is_empty() && !self.codec.in_message() {
                    Ok(None)
                } else {
                    Err(CodecError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of a frame or a fragmented message",
                    )))
                };
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The read side of a connection after the prefaces: the socket itself, or a decompressor
    /// over it (boxed: one indirect call per read is nothing next to decompressing). The frame
    /// reader above it never knows which.
    #[project = WireReaderProj]
    pub(crate) enum WireReader<R> {
        Plain { #[pin] io: R },
        Compressed { io: Pin<Box<dyn AsyncRead + Send>> },
    }
}

pin_project_lite::pin_project! {
    /// The write side of a connection after the prefaces: the socket, or a compressor over it.
    /// A flush ends the compressor's block, so every batch is decodable on arrival.
    #[project = WireWriterProj]
    pub(crate) enum WireWriter<W> {
        Plain { #[pin] io: W },
        Compressed { io: Pin<Box<dyn AsyncWrite + Send>> },
    }
}

#[cfg(any(feature = "compression-deflate", feature = "compression-lz4"))]
use self::buffered::compressed_reader;
#[cfg(any(feature = "compression-deflate", feature = "compression-lz4"))]
use self::buffered::compressed_writer;

/// Buffers between a compressor and the socket, and between the socket and a decompressor.
///
/// The deflate and lz4 compressors write their output in pieces as they produce it; buffered,
/// a batch's compressed bytes leave in one `write` at the flush that ends the batch (as plain
/// batches do), instead of several small ones. (The zstd reader and writer buffer their own.)
/// A compressor's own state is far larger.
#[cfg(any(feature = "compression-deflate", feature = "compression-lz4"))]
mod buffered {
    use tokio::io::{AsyncRead, BufReader};

    const COMPRESSED_BUFFER: usize = 64 * 1024;

    pub(super) fn compressed_writer<W: tokio::io::AsyncWrite>(w: W) -> tokio::io::BufWriter<W> {
        tokio::io::BufWriter::with_capacity(COMPRESSED_BUFFER, w)
    }

    pub(super) fn compressed_reader<R: AsyncRead>(r: R) -> BufReader<R> {
        BufReader::with_capacity(COMPRESSED_BUFFER, r)
    }
}

pub(crate) mod split;
#[cfg(feature = "compression-zstd")]
mod zstd;

/// Asked with the window (bytes) each zstd frame read declares, before the decoder takes it
/// on: `false` fails the read with `OutOfMemory` (see `Server::max_compression_bytes`).
pub(crate) type WindowGate = Box<dyn FnMut(usize) -> bool + Send>;

/// Wraps both halves of a connection in the negotiated compression; a zstd reader asks `gate`
/// (when there is one) before each frame's window.
pub(crate) fn wire<R, W>(
    r: R,
    w: W,
    compression: Option<crate::codec::Compression>,
    gate: Option<WindowGate>,
) -> io::Result<(WireReader<R>, WireWriter<W>)>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    #[cfg(not(feature = "compression-zstd"))]
    drop(gate);
    Ok(match compression {
        None => (WireReader::Plain { io: r }, WireWriter::Plain { io: w }),
        #[cfg(feature = "compression-zstd")]
        Some(crate::codec::Compression::Zstd) => (
            WireReader::Compressed {
                io: Box::pin(self::zstd::ZstdReader::new(r)?.gate(gate)),
            },
            WireWriter::Compressed {
                io: Box::pin(self::zstd::ZstdWriter::new(w)?),
            },
        ),
        #[cfg(feature = "compression-lz4")]
        Some(crate::codec::Compression::Lz4) => {
            use async_compression::{tokio::bufread::Lz4Decoder, tokio::write::Lz4Encoder};
            let mut dec = Lz4Decoder::new(compressed_reader(r));
            dec.multiple_members(true);
            (
                WireReader::Compressed { io: Box::pin(dec) },
                WireWriter::Compressed {
                    io: Box::pin(Lz4Encoder::with_quality(
                        compressed_writer(w),
                        async_compression::Level::Fastest,
                    )),
                },
            )
        }
        #[cfg(feature = "compression-deflate")]
        Some(crate::codec::Compression::Deflate) => {
            use async_compression::{tokio::bufread::DeflateDecoder, tokio::write::DeflateEncoder};
            (
                WireReader::Compressed {
                    io: Box::pin(DeflateDecoder::new(compressed_reader(r))),
                },
                WireWriter::Compressed {
                    io: Box::pin(DeflateEncoder::with_quality(
                        compressed_writer(w),
                        async_compression::Level::Fastest,
                    )),
                },
            )
        }
    })
}

impl<R: AsyncRead> AsyncRead for WireReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.project() {
            WireReaderProj::Plain { io } => io.poll_read(cx, buf),
            WireReaderProj::Compressed { io } => match io.as_mut().poll_read(cx, buf) {
                // The decompressors report a corrupt stream (or a zstd window over the cap) as
                // `Other` or `InvalidData`; make it `InvalidData` so the frame reader treats
                // it as the protocol violation it is. Socket errors pass through unchanged.
                Poll::Ready(Err(e))
                    if !is_socket_error(&e) && e.kind() != io::ErrorKind::OutOfMemory =>
                {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
                }
                other => other,
            },
        }
    }
}

fn is_socket_error(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset
            | ConnectionAborted
            | BrokenPipe
            | NotConnected
            | TimedOut
            | UnexpectedEof
            | Interrupted
            | WouldBlock
    )
}

impl<W: AsyncWrite> AsyncWrite for WireWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.project() {
            WireWriterProj::Plain { io } => io.poll_write(cx, buf),
            WireWriterProj::Compressed { io } => io.as_mut().poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.project() {
            WireWriterProj::Plain { io } => io.poll_write_vectored(cx, bufs),
            WireWriterProj::Compressed { io } => io.as_mut().poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WireWriter::Plain { io } => io.is_write_vectored(),
            WireWriter::Compressed { io } => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.project() {
            WireWriterProj::Plain { io } => io.poll_flush(cx),
            WireWriterProj::Compressed { io } => io.as_mut().poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.project() {
            WireWriterProj::Plain { io } => io.poll_shutdown(cx),
            WireWriterProj::Compressed { io } => io.as_mut().poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::codec::{Message, Outbox};

    #[test]
    fn a_reader_spins_only_while_it_holds_a_slot() {
        let slots = std::sync::Arc::new(SpinSlots::new(1));
        let window = Duration::from_secs(60);
        let mut first = Spin::new(window, slots.clone());
        let mut second = Spin::new(window, slots.clone());
        assert!(first.again());
        assert!(first.again(), "a reader keeps its slot through its wait");
        assert!(
            !second.again(),
            "every slot is taken: the second reader sleeps"
        );
        first.arrived();
        assert!(
            second.again(),
            "the first reader's frame came: its slot is free"
        );
        drop(second);
        assert!(first.again(), "a dropped reader gives its slot back");
    }

    #[test]
    fn a_reader_whose_last_wait_was_long_does_not_spin() {
        let slots = std::sync::Arc::new(SpinSlots::new(1));
        let mut spin = Spin::new(Duration::from_micros(1), slots.clone());
        assert!(spin.again());
        std::thread::sleep(Duration::from_millis(1));
        assert!(!spin.again(), "past the window");
        assert_eq!(
            slots.busy.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "slot freed"
        );
        spin.arrived();
        // The wait that just ended outlasted twice the window: the next one is slept.
        assert!(!spin.again());
        let mut off = Spin::new(Duration::ZERO, slots);
        assert!(!off.again(), "a zero window never spins");
    }

    /// An outbox that callers push pings into, as a connection's callers push requests.
    struct Pings {
        outbox: Mutex<Outbox>,
        closed: AtomicBool,
    }

    impl Pings {
        fn push(&self, n: usize) {
            let mut outbox = self.outbox.lock().unwrap();
            for _ in 0..n {
                outbox.push(&Message::Ping { data: 1 }).unwrap();
            }
        }
    }

    impl Source for Pings {
        fn take(&self, spare: Batch) -> Option<Batch> {
            let mut outbox = self.outbox.lock().unwrap();
            if self.closed.load(Ordering::Relaxed) && outbox.is_drained() {
                return None;
            }
            Some(outbox.take(spare))
        }

        fn pending_len(&self) -> usize {
            self.outbox.lock().unwrap().len()
        }

        fn batch_yields(&self) -> usize {
            1
        }
    }

    /// Records how many messages each write carried. During the first one, a caller appends
    /// one message and another caller is about to append three more.
    struct Wire {
        source: Arc<Pings>,
        writes: Arc<Mutex<Vec<u16>>>,
    }

    impl AsyncWrite for Wire {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut writes = self.writes.lock().unwrap();
            writes.push(u16::from_be_bytes([buf[6], buf[7]]));
            if writes.len() == 1 {
                self.source.push(1);
                let source = self.source.clone();
                tokio::spawn(async move { source.push(3) });
            }
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn what_trickles_in_during_a_write_waits_a_yield_for_the_rest() {
        let source = Arc::new(Pings {
            outbox: Mutex::new(Outbox::new(1 << 20, 0)),
            closed: AtomicBool::new(false),
        });
        source.push(10);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let wire = Wire {
            source: source.clone(),
            writes: writes.clone(),
        };
        let writer = tokio::spawn({
            let (source, notify) = (source.clone(), notify.clone());
            async move {
                let counters = Counters::default();
                write_loop(wire, &*source, &notify, WriteOptions::default(), &counters).await
            }
        });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        source.closed.store(true, Ordering::Relaxed);
        notify.notify_one();
        writer.await.unwrap().unwrap();
        // The one message that arrived during the first write did not go out alone: the
        // writer yielded once and the other three joined it.
        assert_eq!(*writes.lock().unwrap(), vec![10, 4]);
    }

    /// An outbox whose takes record the capacity of the buffer handed back to them. With
    /// `one_more`, a caller queues one more message right after the first take, so the writer
    /// takes a second batch with the buffer of the first handed back.
    struct Recorded {
        outbox: Mutex<Outbox>,
        spares: Mutex<Vec<usize>>,
        one_more: AtomicBool,
    }

    impl Source for Recorded {
        fn take(&self, spare: Batch) -> Option<Batch> {
            let mut outbox = self.outbox.lock().unwrap();
            if outbox.is_drained() {
                return None;
            }
            self.spares.lock().unwrap().push(spare.capacity());
            let batch = outbox.take(spare);
            if self.one_more.swap(false, Ordering::Relaxed) {
                outbox.push(&Message::Ping { data: 1 }).unwrap();
            }
            Some(batch)
        }

        fn pending_len(&self) -> usize {
            self.outbox.lock().unwrap().len()
        }

        fn batch_yields(&self) -> usize {
            0
        }
    }

    /// Writes `outbox` out with a writer that copies fragments into its batches; returns the
    /// capacity of the buffer handed back to each take (see [`Recorded`]).
    async fn spares_handed_back(outbox: Outbox, one_more: bool) -> Vec<usize> {
        let source = Recorded {
            outbox: Mutex::new(outbox),
            spares: Mutex::new(Vec::new()),
            one_more: AtomicBool::new(one_more),
        };
        let opts = WriteOptions {
            gather: false,
            ..WriteOptions::default()
        };
        let counters = Counters::default();
        write_loop(tokio::io::sink(), &source, &Notify::new(), opts, &counters)
            .await
            .unwrap();
        source.spares.into_inner().unwrap()
    }

    #[tokio::test]
    async fn a_writer_that_copies_fragments_keeps_its_buffer_for_the_next_batch() {
        let mut outbox = Outbox::new(16 << 20, 0);
        // Within the window, so no ACK is needed: four takes of 256 KiB of pieces.
        let body = bytes::Bytes::from(vec![7u8; 1000 * 1024]);
        outbox.push(&Message::Response { id: 1, body }).unwrap();
        let spares = spares_handed_back(outbox, false).await;
        assert_eq!(spares.len(), 4, "{spares:?}");
        // Each batch held 256 KiB of copied pieces; from the third take on, both buffers
        // that alternate have held one, and come back with room for the next.
        assert!(
            spares[2..].iter().all(|&c| c >= FRAGMENTS_PER_TAKE),
            "{spares:?}"
        );
    }

    #[tokio::test]
    async fn a_writer_lets_a_one_off_batch_of_whole_frames_go() {
        // 400 KiB of whole messages in one batch, no fragments: a one-off, over what a writer
        // keeps (KEEP_BATCH), copying or not.
        let mut outbox = Outbox::new(16 << 20, 0);
        for id in 0..400 {
            let body = bytes::Bytes::from(vec![7u8; 1000]);
            outbox.push(&Message::Response { id, body }).unwrap();
        }
        let spares = spares_handed_back(outbox, true).await;
        assert_eq!(spares.len(), 2, "{spares:?}");
        assert_eq!(spares[1], 0, "the 400 KiB buffer was not kept: {spares:?}");
    }

    /// The bytes of a `len`-byte response as a peer sends it: in fragments.
    fn response_in_fragments(id: u32, len: usize) -> Vec<u8> {
        let mut outbox = Outbox::new(16 << 20, 0);
        let body = bytes::Bytes::from(vec![id as u8; len]);
        outbox.push(&Message::Response { id, body }).unwrap();
        let mut wire = Vec::new();
        while !outbox.is_drained() {
            wire.extend_from_slice(&outbox.take(Batch::new(false)).into_contiguous());
        }
        wire
    }

    /// Reads until a whole message is out; returns it.
    async fn next_message<R: AsyncRead + Unpin>(reader: &mut FrameReader<R>) -> Message {
        let mut out = Vec::new();
        loop {
            let mut frame = reader.next().await.unwrap().expect("a frame");
            reader.messages(&mut frame, &mut out).unwrap();
            if let Some(msg) = out.pop() {
                return msg;
            }
        }
    }

    /// A gate that asks `f` in the middle of frames and never says memory is short.
    struct TestGate<F>(F);

    impl<F: Fn() -> bool + Send + Sync> ReadGate for TestGate<F> {
        fn may_read(&self, _held: usize) -> bool {
            (self.0)()
        }

        fn short(&self) -> bool {
            false
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_held_back_by_its_gate_gives_up_its_spare_buffers_first() {
        let (mut peer, io) = tokio::io::duplex(1 << 20);
        let refuse = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (refused, times) = (refuse.clone(), asked.clone());
        let gate = TestGate(move || {
            times.lock().unwrap().push(tokio::time::Instant::now());
            !refused.swap(false, Ordering::Relaxed)
        });
        let mut reader = FrameReader::new(io, FrameCodec::new()).gate(gate);
        peer.write_all(&response_in_fragments(1, 250_000))
            .await
            .unwrap();
        let first = next_message(&mut reader).await;
        assert_eq!(reader.held_between_frames(), 0);
        drop(first);
        assert!(
            reader.codec.spare_capacity() >= 250_000,
            "its buffer is kept"
        );
        // The next message (under half the size, so not copied into it) arrives in two parts;
        // the gate refuses the read in between once.
        let second = response_in_fragments(2, 100_000);
        peer.write_all(&second[..70_000]).await.unwrap();
        asked.lock().unwrap().clear();
        refuse.store(true, Ordering::Relaxed);
        let rest = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            peer.write_all(&second[70_000..]).await.unwrap();
            peer
        });
        let Message::Response { id: 2, body } = next_message(&mut reader).await else {
            panic!("not the second response");
        };
        assert_eq!(body.len(), 100_000);
        let _peer = rest.await.unwrap();
        // Refused, the reader freed the kept buffer and asked again at once: nothing waited.
        let asked = asked.lock().unwrap();
        assert!(asked.len() >= 2, "{asked:?}");
        assert_eq!(asked[0], asked[1], "the reader waited before asking again");
        assert_eq!(reader.codec.spare_capacity(), 0);
    }

    #[tokio::test]
    async fn a_quiet_reader_lets_go_of_its_buffer_only_between_frames() {
        let mut outbox = Outbox::new(1 << 20, 0);
        outbox.push(&Message::Ping { data: 1 }).unwrap();
        let whole = outbox.take(Batch::new(false)).into_contiguous();
        // One frame, then one frame and the first bytes of the next.
        let mut partial = whole.to_vec();
        partial.extend_from_slice(&whole[..5]);
        for (wire, left) in [(&whole[..], 0), (&partial[..], 5)] {
            let mut reader = FrameReader::new(wire, FrameCodec::new());
            let mut frame = reader.next().await.unwrap().expect("a frame");
            let mut msgs = Vec::new();
            reader.messages(&mut frame, &mut msgs).unwrap();
            assert_eq!(msgs, vec![Message::Ping { data: 1 }]);
            assert!(reader.buf.capacity() > 0);
            reader.release_buffers();
            assert_eq!(reader.buf.len(), left);
            if left == 0 {
                assert_eq!(
                    reader.buf.capacity(),
                    0,
                    "nothing buffered: the buffer goes"
                );
                assert!(
                    reader.next().await.unwrap().is_none(),
                    "a fresh one reads on"
                );
            } else {
                assert!(reader.buf.capacity() >= left, "a frame's start stays");
            }
        }
    }

    /// A source with nothing to write that records the capacity of each spare the writer hands
    /// it, and says once that the connection went quiet.
    struct Idle {
        quiet: AtomicBool,
        spares: Mutex<Vec<usize>>,
        outbox: Mutex<Outbox>,
    }

    impl Source for Idle {
        fn take(&self, spare: Batch) -> Option<Batch> {
            self.spares.lock().unwrap().push(spare.capacity());
            Some(self.outbox.lock().unwrap().take(spare))
        }

        fn pending_len(&self) -> usize {
            self.outbox.lock().unwrap().len()
        }

        fn quiet(&self) -> bool {
            self.quiet.swap(false, Ordering::Relaxed)
        }

        fn batch_yields(&self) -> usize {
            0
        }
    }

    #[tokio::test]
    async fn a_quiet_writer_lets_go_of_its_spare_buffer() {
        let source = Arc::new(Idle {
            quiet: AtomicBool::new(false),
            spares: Mutex::new(Vec::new()),
            outbox: Mutex::new(Outbox::new(1 << 20, 0)),
        });
        let notify = Arc::new(Notify::new());
        let writer = tokio::spawn({
            let (source, notify) = (source.clone(), notify.clone());
            async move {
                let counters = Counters::default();
                let opts = WriteOptions::default();
                write_loop(tokio::io::sink(), &*source, &notify, opts, &counters).await
            }
        });
        let wake = |quiet: bool| {
            source.quiet.store(quiet, Ordering::Relaxed);
            notify.notify_one();
        };
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        // A batch of 10 KB: the writer's spare holds that much afterwards.
        source
            .outbox
            .lock()
            .unwrap()
            .push(&Message::GoAway {
                code: 0,
                reason: bytes::Bytes::from(vec![b'x'; 10_000]),
            })
            .unwrap();
        wake(false);
        settle().await;
        wake(false);
        settle().await;
        wake(true);
        settle().await;
        wake(false);
        settle().await;
        let spares = source.spares.lock().unwrap().clone();
        let kept = spares.iter().filter(|&&c| c >= 10_000).count();
        assert!(
            kept >= 2,
            "the spare kept its capacity while busy: {spares:?}"
        );
        assert_eq!(spares.last(), Some(&0), "let go once quiet: {spares:?}");
        writer.abort();
    }

    #[tokio::test]
    async fn a_reader_hands_out_a_frame_a_chunk_at_a_time() {
        let mut outbox = Outbox::new(1 << 20, 0);
        for data in 0..100 {
            outbox.push(&Message::Ping { data }).unwrap();
        }
        let wire = outbox.take(Batch::new(false)).into_contiguous();
        let mut reader = FrameReader::new(&wire[..], FrameCodec::new());
        let mut frame = reader.next().await.unwrap().expect("a frame");
        let mut chunk = Vec::new();
        let mut sizes = Vec::new();
        let mut data = 0;
        loop {
            reader.messages(&mut frame, &mut chunk).unwrap();
            if chunk.is_empty() {
                break;
            }
            sizes.push(chunk.len());
            for msg in chunk.drain(..) {
                assert_eq!(msg, Message::Ping { data });
                data += 1;
            }
        }
        assert_eq!(data, 100);
        assert!(sizes.iter().all(|&n| n <= MESSAGE_CHUNK), "{sizes:?}");
        assert_eq!(sizes[0], MESSAGE_CHUNK.min(100));
        assert!(reader.next().await.unwrap().is_none());
    }
}
