//! The zstd side of a connection's write half: one streaming context for the connection's life,
//! flushed once per batch, that stops trying to compress what does not compress.
//!
//! Compressing incompressible bytes costs nearly as much CPU as compressing anything else and
//! saves nothing: with random 1 KiB payloads the attempt halved calls/s. So each batch is
//! measured: when compressing it saved less than [`MIN_SAVING`], the next batches go out as
//! *raw blocks* (the stored form zstd itself falls back to, RFC 8878 §3.1.1.2.2), each in a zstd
//! frame of its own, for a number of bytes that doubles with each failed try (from [`MIN_SKIP`]
//! up to [`MAX_SKIP`]); then compressing is tried again. A raw batch is written straight from the
//! caller's buffer, frame headers and blocks in one vectored write, where the socket takes
//! vectored writes: sent raw, a payload costs no more copies than it does uncompressed. (A frame
//! that is one raw block is also what the reader passes through without the decoder.)
//! Compressible traffic stays in one frame, so the context keeps its history across batches (a
//! repeated message costs a few bytes).
//!
//! The output is an ordinary zstd stream (a sequence of frames) that any decoder reads; PROTOCOL.md
//! §3.3 requires receivers to accept a new frame after any frame ends.
//!
//! The read half, [`ZstdReader`], reads any zstd stream, and passes a frame that is one raw
//! block (the writer's raw batches) through without the decoder: one copy, from its own
//! buffer, or none when the caller's buffer ends within the block. Every other frame goes to
//! zstd's decoder, whose window is capped at [`ZSTD_WINDOW_LOG_MAX`].

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use zstd::stream::raw::{DParameter, Decoder, Encoder, InBuffer, Operation, OutBuffer};

use crate::codec::ZSTD_WINDOW_LOG_MAX;

/// Compress at zstd's fastest level (1), as the other algorithms run at theirs.
const LEVEL: i32 = 1;

/// A batch whose compressed size is above this fraction of its size (in 1/16ths: 15/16, a
/// saving under 6.25 %) was not worth compressing.
const MIN_SAVING: usize = 15;

/// Bytes sent raw after the first try at compressing that saved too little; each further such
/// try doubles it, up to [`MAX_SKIP`].
const MIN_SKIP: u64 = 64 * 1024;

/// Most bytes sent raw between two tries at compressing. Counted in bytes, not batches: a try
/// compresses a whole batch (tens of KiB of noise take 50-150 µs at level 1) while every call
/// in it waits, and at 100 callers, counted as 64 batches, tries came every 2 ms or so and
/// each stall sent both ends' readers from spinning back to sleeping: zstd made 0.62-0.75×
/// the uncompressed calls/s, 0.90-0.98× without the tries (docs/benchmarks.md, session 14).
/// At 32 MiB, a connection moving 500 MB/s of noise tries every 64 ms.
const MAX_SKIP: u64 = 32 * 1024 * 1024;

/// Batches smaller than this are always compressed, and say nothing about the payloads: the
/// fixed costs of a block dominate them.
const MIN_PROBE: usize = 512;

/// Output held before a write goes to the socket in the middle of a batch, so that a large
/// batch makes progress (and a peer that stops reading is noticed) before its flush.
const HIGH_WATER: usize = 64 * 1024;

/// The zstd frame magic number, little-endian.
const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Frame header descriptor: no content size, not single-segment, no checksum, no dictionary.
const DESCRIPTOR: u8 = 0x00;

/// Window descriptor: exponent 7, mantissa 0, a 128 KiB window (2^(10 + 7)), so blocks may be
/// up to 128 KiB.
const WINDOW: u8 = 7 << 3;

/// Largest raw block: the block maximum for a 128 KiB window.
const MAX_BLOCK: usize = 128 * 1024;

/// A raw frame's header: magic, frame header descriptor, window descriptor, block header.
const RAW_HEADER: usize = 9;

/// Most blocks (and so raw frames) in one vectored write: 4 MiB, 64 buffers.
const MAX_VECTORED_BLOCKS: usize = 32;

/// The header of a frame holding `len` bytes (at most [`MAX_BLOCK`]) as its one raw block.
fn raw_header(len: usize) -> [u8; RAW_HEADER] {
    debug_assert!(len <= MAX_BLOCK);
    // Block header, 3 bytes little-endian: size << 3 | type (0, raw) << 1 | last (1).
    let block = ((len as u32) << 3) | 1;
    let [b0, b1, b2, _] = block.to_le_bytes();
    let [m0, m1, m2, m3] = MAGIC;
    [m0, m1, m2, m3, DESCRIPTOR, WINDOW, b0, b1, b2]
}

/// What the batch being written is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// Nothing written since the last flush.
    Idle,
    /// Compressed into the open frame; `input` bytes so far, and the output counter when it
    /// began.
    Compressed { input: usize, out_start: u64 },
    /// Sent as raw blocks.
    Raw,
}

/// An [`AsyncWrite`] that zstd-compresses into `io`, a batch per flush.
pub(crate) struct ZstdWriter<W> {
    io: W,
    encoder: Encoder<'static>,
    /// Output not yet written to `io`, from `pos` on.
    out: Vec<u8>,
    pos: usize,
    /// Bytes ever appended to `out`: what a batch produced is the difference.
    produced: u64,
    batch: Batch,
    /// A compressed frame is open: it must be ended before raw blocks go out.
    frame_open: bool,
    /// Bytes still to send raw before compressing is tried again.
    skip: u64,
    /// Bytes to send raw after the next try that saves too little.
    backoff: u64,
    /// The most `backoff` grows to: [`MAX_SKIP`] (less in tests).
    max_skip: u64,
}

impl<W> std::fmt::Debug for ZstdWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZstdWriter")
            .field("pending", &(self.out.len() - self.pos))
            .field("batch", &self.batch)
            .field("skip", &self.skip)
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> ZstdWriter<W> {
    pub(crate) fn new(io: W) -> io::Result<Self> {
        Ok(ZstdWriter {
            io,
            encoder: Encoder::new(LEVEL)?,
            out: Vec::new(),
            pos: 0,
            produced: 0,
            batch: Batch::Idle,
            frame_open: false,
            skip: 0,
            backoff: MIN_SKIP,
            max_skip: MAX_SKIP,
        })
    }

    /// Writes pending output to `io` until fewer than `keep` bytes are left.
    fn poll_drain(&mut self, cx: &mut Context<'_>, keep: usize) -> Poll<io::Result<()>> {
        while self.out.len() - self.pos > keep {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        if self.pos == self.out.len() {
            self.out.clear();
            self.pos = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Runs `step` (a compressor call writing into `out`) until it says it is done.
    fn drive(
        &mut self,
        mut step: impl FnMut(&mut Encoder<'static>, &mut OutBuffer<'_, Vec<u8>>) -> io::Result<usize>,
    ) -> io::Result<()> {
        loop {
            self.out.reserve(16 * 1024);
            let before = self.out.len();
            let mut buf = OutBuffer::around_pos(&mut self.out, before);
            let left = step(&mut self.encoder, &mut buf)?;
            let after = buf.pos();
            self.produced += (after - before) as u64;
            if left == 0 {
                return Ok(());
            }
        }
    }

    /// Compresses `input` into the open frame.
    fn compress(&mut self, input: &[u8]) -> io::Result<()> {
        let mut input = InBuffer::around(input);
        while input.pos() < input.src.len() {
            self.out
                .reserve((input.src.len() - input.pos()).min(128 * 1024) + 1024);
            let before = self.out.len();
            let mut buf = OutBuffer::around_pos(&mut self.out, before);
            self.encoder.run(&mut input, &mut buf)?;
            self.produced += (buf.pos() - before) as u64;
        }
        Ok(())
    }

    /// Ends the open compressed frame, if one is.
    fn end_frame(&mut self) -> io::Result<()> {
        if self.frame_open {
            self.drive(|e, out| e.finish(out, false))?;
            self.encoder.reinit()?;
            self.frame_open = false;
        }
        Ok(())
    }

    /// Appends `input` as raw frames, one per block.
    fn put_raw(&mut self, input: &[u8]) {
        let blocks = input.len().div_ceil(MAX_BLOCK);
        self.out.reserve(input.len() + RAW_HEADER * blocks);
        for block in input.chunks(MAX_BLOCK) {
            self.out.extend_from_slice(&raw_header(block.len()));
            self.out.extend_from_slice(block);
        }
        self.produced += (input.len() + RAW_HEADER * blocks) as u64;
    }

    /// Writes (a prefix of) `input` as raw frames straight from the caller's buffer, headers
    /// and blocks in one vectored write: no copy of the payload on the common path. What the
    /// socket took only part of is kept in `out`, which must be empty on entry.
    fn poll_put_raw_vectored(
        &mut self,
        cx: &mut Context<'_>,
        input: &[u8],
    ) -> Poll<io::Result<usize>> {
        debug_assert!(self.out.is_empty());
        let mut headers = [[0u8; RAW_HEADER]; MAX_VECTORED_BLOCKS];
        let mut k = 0;
        for (h, block) in headers.iter_mut().zip(input.chunks(MAX_BLOCK)) {
            *h = raw_header(block.len());
            k += 1;
        }
        let mut iov = [io::IoSlice::new(&[]); 2 * MAX_VECTORED_BLOCKS];
        for (i, block) in input.chunks(MAX_BLOCK).take(k).enumerate() {
            iov[2 * i] = io::IoSlice::new(&headers[i]);
            iov[2 * i + 1] = io::IoSlice::new(block);
        }
        let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &iov[..2 * k]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        let mut written = n;
        let mut consumed = 0;
        for (h, block) in headers[..k].iter().zip(input.chunks(MAX_BLOCK)) {
            consumed += block.len();
            self.produced += (RAW_HEADER + block.len()) as u64;
            if written >= RAW_HEADER + block.len() {
                written -= RAW_HEADER + block.len();
                continue;
            }
            // The socket took part of this frame: the rest goes out with the next write.
            if written < RAW_HEADER {
                self.out.extend_from_slice(&h[written..]);
                self.out.extend_from_slice(block);
            } else {
                self.out.extend_from_slice(&block[written - RAW_HEADER..]);
            }
            break;
        }
        Poll::Ready(Ok(consumed))
    }

    /// The batch is whole: flushes the compressor and judges what compressing saved.
    fn end_batch(&mut self) -> io::Result<()> {
        if let Batch::Compressed { input, out_start } = self.batch {
            self.drive(|e, out| e.flush(out))?;
            if input >= MIN_PROBE {
                let output = (self.produced - out_start) as usize;
                if output * 16 > input * MIN_SAVING {
                    self.skip = self.backoff;
                    self.backoff = (self.backoff * 2).min(self.max_skip);
                } else {
                    self.backoff = MIN_SKIP;
                }
            }
        }
        self.batch = Batch::Idle;
        Ok(())
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ZstdWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        input: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx, HIGH_WATER))?;
        if input.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.batch == Batch::Idle {
            this.batch = if this.skip > 0 && input.len() >= MIN_PROBE {
                this.skip = this.skip.saturating_sub(input.len() as u64);
                Batch::Raw
            } else {
                Batch::Compressed {
                    input: 0,
                    out_start: this.produced,
                }
            };
        }
        match &mut this.batch {
            Batch::Compressed { input: n, .. } => {
                *n += input.len();
                this.frame_open = true;
                this.compress(input)?;
            }
            Batch::Raw => {
                this.end_frame()?;
                if this.io.is_write_vectored() {
                    ready!(this.poll_drain(cx, 0))?;
                    return this.poll_put_raw_vectored(cx, input);
                }
                this.put_raw(input);
            }
            Batch::Idle => unreachable!("a batch was just started"),
        }
        Poll::Ready(Ok(input.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.end_batch()?;
        ready!(this.poll_drain(cx, 0))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.end_batch()?;
        this.end_frame()?;
        ready!(this.poll_drain(cx, 0))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Bytes the reader buffers from the socket.
const INPUT_BUFFER: usize = 64 * 1024;

/// Most output the decoder writes per read: the caller's buffer is zeroed before it is handed
/// to the decoder (no `unsafe` here), so not more of it than one call may use.
const DECODE_CHUNK: usize = 32 * 1024;

/// What the reader is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Between frames: the next bytes start one.
    Frame,
    /// In a frame that is one raw block: `left` bytes of it still pass through.
    Raw { left: usize },
    /// In any other frame: the decoder reads it to its end.
    Decode,
}

/// What the start of a frame says about it.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// Too few bytes yet to tell.
    More,
    /// A frame whose only block is raw, of this many bytes, after [`RAW_HEADER`] bytes.
    Raw(usize),
    /// Anything else (compressed, several blocks, a checksum, a skippable frame, garbage):
    /// the decoder's to read, or to refuse.
    Other,
}

/// Classifies the frame that starts `b`. Only a frame the decoder would read to exactly its
/// one raw block is [`Start::Raw`]: descriptor 0 (no content size, no checksum, no
/// dictionary, not single-segment), a window within our cap, one last raw block no larger
/// than the window's block maximum.
fn frame_start(b: &[u8]) -> Start {
    if b.len() < MAGIC.len() + 1 {
        return if MAGIC.starts_with(b) {
            Start::More
        } else {
            Start::Other
        };
    }
    if b[..4] != MAGIC || b[4] != DESCRIPTOR {
        return Start::Other;
    }
    if b.len() < RAW_HEADER {
        return Start::More;
    }
    let window = descriptor_window(b[5]);
    if window >= 1 << (ZSTD_WINDOW_LOG_MAX + 1) {
        // A window log past our cap.
        return Start::Other;
    }
    let block = u32::from_le_bytes([b[6], b[7], b[8], 0]);
    let (last, kind, size) = (block & 1, (block >> 1) & 3, (block >> 3) as usize);
    if last == 1 && kind == 0 && size <= window.min(MAX_BLOCK) {
        Start::Raw(size)
    } else {
        Start::Other
    }
}

/// The window a frame's window descriptor asks for (RFC 8878 §3.1.1.1.2), its log taken at
/// most one past our cap: such a frame the decoder refuses, so no more than the cap is ever
/// held, and any window at or past `1 << (ZSTD_WINDOW_LOG_MAX + 1)` says the cap is passed.
fn descriptor_window(descriptor: u8) -> usize {
    let (exponent, mantissa) = (u32::from(descriptor >> 3), usize::from(descriptor & 7));
    let base = 1usize << (10 + exponent).min(ZSTD_WINDOW_LOG_MAX + 1);
    base + base / 8 * mantissa
}

/// What a zstd frame's header says of the window its decoder needs.
#[derive(Debug, PartialEq, Eq)]
enum Declared {
    /// Too few bytes yet to tell.
    More,
    /// A window of this many bytes (a single-segment frame's content size).
    Window(usize),
    /// Not a zstd frame (a skippable one, or garbage): the decoder's to read or refuse.
    Nothing,
}

/// The window the frame starting `b` declares (RFC 8878 §3.1.1.1).
fn declared_window(b: &[u8]) -> Declared {
    if b.len() < MAGIC.len() + 1 {
        return Declared::More;
    }
    if b[..4] != MAGIC {
        return Declared::Nothing;
    }
    let fhd = b[4];
    let single_segment = fhd & 0x20 != 0;
    if !single_segment {
        let Some(&descriptor) = b.get(5) else {
            return Declared::More;
        };
        return Declared::Window(descriptor_window(descriptor));
    }
    let dictionary = [0, 1, 2, 4][usize::from(fhd & 3)];
    let size = [1, 2, 4, 8][usize::from(fhd >> 6)];
    let at = 5 + dictionary;
    let Some(field) = b.get(at..at + size) else {
        return Declared::More;
    };
    let mut le = [0u8; 8];
    le[..size].copy_from_slice(field);
    let content = u64::from_le_bytes(le) + if size == 2 { 256 } else { 0 };
    Declared::Window(usize::try_from(content).unwrap_or(usize::MAX))
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the stream ended inside a zstd frame",
    )
}

/// An [`AsyncRead`] that decompresses the zstd stream read from `io`.
pub(crate) struct ZstdReader<R> {
    io: R,
    decoder: Decoder<'static>,
    /// Input read from `io` and not yet used: `buf[pos..end]`.
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    eof: bool,
    reading: Reading,
    /// The decoder's last call filled all the room it was given: it may hold more output,
    /// which a call without new input hands out.
    full: bool,
    /// Asked with each decoded frame's window before the decoder allocates it (a server's
    /// compression budget); `false` fails the read.
    gate: Option<crate::conn::WindowGate>,
}

impl<R> std::fmt::Debug for ZstdReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZstdReader")
            .field("buffered", &(self.end - self.pos))
            .field("reading", &self.reading)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> ZstdReader<R> {
    pub(crate) fn new(io: R) -> io::Result<Self> {
        let mut decoder = Decoder::new()?;
        decoder.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))?;
        Ok(ZstdReader {
            io,
            decoder,
            buf: vec![0; INPUT_BUFFER].into_boxed_slice(),
            pos: 0,
            end: 0,
            eof: false,
            reading: Reading::Frame,
            full: false,
            gate: None,
        })
    }

    /// Asks `gate` with each frame's window before the decoder takes it on.
    pub(crate) fn gate(mut self, gate: Option<crate::conn::WindowGate>) -> Self {
        self.gate = gate;
        self
    }

    /// Reads more input after what is buffered (moved to the front first).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        match rb.filled().len() {
            0 => self.eof = true,
            n => self.end += n,
        }
        Poll::Ready(Ok(()))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ZstdReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let buffered = this.end - this.pos;
            match this.reading {
                Reading::Frame => match frame_start(&this.buf[this.pos..this.end]) {
                    Start::More if this.eof && buffered == 0 => return Poll::Ready(Ok(())),
                    Start::More if this.eof => return Poll::Ready(Err(truncated())),
                    Start::More => ready!(this.poll_fill(cx))?,
                    Start::Raw(len) => {
                        this.pos += RAW_HEADER;
                        this.reading = Reading::Raw { left: len };
                    }
                    Start::Other => {
                        if let Some(gate) = &mut this.gate {
                            match declared_window(&this.buf[this.pos..this.end]) {
                                Declared::More if !this.eof => {
                                    ready!(this.poll_fill(cx))?;
                                    continue;
                                }
                                Declared::Window(window) if !gate(window) => {
                                    return Poll::Ready(Err(io::Error::new(
                                        io::ErrorKind::OutOfMemory,
                                        "a zstd window past the compression budget",
                                    )));
                                }
                                _ => {}
                            }
                        }
                        this.reading = Reading::Decode;
                    }
                },
                Reading::Raw { left: 0 } => this.reading = Reading::Frame,
                Reading::Raw { left } if buffered > 0 => {
                    let n = left.min(buffered).min(out.remaining());
                    out.put_slice(&this.buf[this.pos..this.pos + n]);
                    this.pos += n;
                    this.reading = Reading::Raw { left: left - n };
                    return Poll::Ready(Ok(()));
                }
                Reading::Raw { .. } if this.eof => return Poll::Ready(Err(truncated())),
                Reading::Raw { left } if out.remaining() <= left => {
                    // The caller's buffer ends within the block: the socket fills it directly.
                    let before = out.filled().len();
                    ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
                    match out.filled().len() - before {
                        0 => this.eof = true,
                        n => {
                            this.reading = Reading::Raw { left: left - n };
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
                Reading::Raw { .. } => ready!(this.poll_fill(cx))?,
                Reading::Decode if buffered == 0 && !this.full => {
                    // Nothing for the decoder to take or give: wait for input. (Called with none
                    // again and again, as a reader polled more often than its socket has data
                    // would, zstd gives up with "no forward progress" after 16 calls.)
                    if this.eof {
                        return Poll::Ready(Err(truncated()));
                    }
                    ready!(this.poll_fill(cx))?;
                }
                Reading::Decode => {
                    let mut input = InBuffer::around(&this.buf[this.pos..this.end]);
                    let room = out.remaining().min(DECODE_CHUNK);
                    let dst = out.initialize_unfilled_to(room);
                    let mut output = OutBuffer::around(dst);
                    let hint = this.decoder.run(&mut input, &mut output)?;
                    let (used, made) = (input.pos(), output.pos());
                    this.pos += used;
                    this.full = made == room;
                    out.advance(made);
                    if hint == 0 {
                        // The frame is whole and all of it handed out.
                        this.decoder.reinit()?;
                        this.reading = Reading::Frame;
                        this.full = false;
                    }
                    if made > 0 {
                        return Poll::Ready(Ok(()));
                    }
                    if hint == 0 {
                        continue;
                    }
                    if used == 0 && buffered > 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the zstd decoder made no progress",
                        )));
                    }
                    if this.pos == this.end {
                        if this.eof {
                            return Poll::Ready(Err(truncated()));
                        }
                        ready!(this.poll_fill(cx))?;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn our_encoder_declares_the_window_a_server_reserves_at_start() {
        // A server reserves a zstd connection's state at this window; a peer using ours never
        // has to grow it (see `Server::max_compression_bytes`).
        // (A raw frame would declare 128 KiB.)
        let (stream, _) = stream_of(&[b"compressible ".repeat(1000)]).await;
        assert_eq!(declared_window(&stream), Declared::Window(512 << 10));
    }

    #[test]
    fn a_frame_header_says_its_window() {
        // Not single-segment: the window descriptor (exponent 9, mantissa 1: 512 KiB + 64 KiB).
        let mut b = MAGIC.to_vec();
        assert_eq!(declared_window(&b), Declared::More);
        b.push(0x00);
        assert_eq!(declared_window(&b), Declared::More);
        b.push((9 << 3) | 1);
        assert_eq!(
            declared_window(&b),
            Declared::Window((512 << 10) + (64 << 10))
        );
        // Past the cap: no more than twice the cap is ever asked for (the decoder refuses it).
        let huge = [MAGIC.as_slice(), &[0x00, 31 << 3]].concat();
        assert_eq!(
            declared_window(&huge),
            Declared::Window(2 << ZSTD_WINDOW_LOG_MAX)
        );
        // Single-segment, a 2-byte content size (+256) after a 1-byte dictionary id.
        let single = [MAGIC.as_slice(), &[0x20 | 0x40 | 0x01, 7, 0x00, 0x01]].concat();
        assert_eq!(declared_window(&single[..7]), Declared::More);
        assert_eq!(declared_window(&single), Declared::Window(256 + 256));
        // Not a zstd frame.
        assert_eq!(
            declared_window(&[0x50, 0x2A, 0x4D, 0x18, 0]),
            Declared::Nothing
        );
    }
    use tokio::io::AsyncWriteExt;

    /// Writes `batches` through a [`ZstdWriter`], a flush after each; returns the stream and
    /// the bytes each batch added to it.
    async fn stream_of(batches: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        stream_with(ZstdWriter::new(Vec::new()).unwrap(), batches).await
    }

    async fn stream_with(mut w: ZstdWriter<Vec<u8>>, batches: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut sizes = Vec::new();
        for b in batches {
            let before = w.io.len();
            w.write_all(b).await.unwrap();
            w.flush().await.unwrap();
            sizes.push(w.io.len() - before);
        }
        w.shutdown().await.unwrap();
        (w.io, sizes)
    }

    fn decode(stream: &[u8]) -> Vec<u8> {
        // The reference decoder reads a sequence of frames.
        zstd::stream::decode_all(stream).unwrap()
    }

    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| rng.u8(..)).collect()
    }

    #[tokio::test]
    async fn repetitive_batches_stay_compressed_with_their_history() {
        let msg = b"a message that repeats from batch to batch, call after call".repeat(20);
        let batches: Vec<Vec<u8>> = (0..50).map(|_| msg.clone()).collect();
        let (stream, sizes) = stream_of(&batches).await;
        assert_eq!(decode(&stream), batches.concat());
        // After the first, each batch is a back-reference: a few bytes.
        assert!(sizes[1..].iter().all(|&n| n < 32), "{sizes:?}");
    }

    #[tokio::test]
    async fn incompressible_batches_go_raw_and_compression_is_tried_again() {
        let mut batches: Vec<Vec<u8>> = (0..40).map(|i| noise(i, 4096)).collect();
        let text = b"compressible again ".repeat(200);
        batches.extend((0..80).map(|_| text.clone()));
        let (stream, sizes) = stream_of(&batches).await;
        assert_eq!(decode(&stream), batches.concat());
        // Raw batches cost their size plus a frame and block header (9 bytes).
        let raw = sizes[..40].iter().filter(|&&n| n == 4096 + 9).count();
        assert!(
            raw >= 30,
            "only {raw} of 40 noise batches went raw: {sizes:?}"
        );
        // Tries continue (backing off) and find the text compressible within 64 batches.
        assert!(sizes[110..].iter().all(|&n| n < 64), "{sizes:?}");
    }

    #[tokio::test]
    async fn tries_at_compressing_noise_back_off_in_bytes_up_to_the_most() {
        // Batches of 16 KiB of noise: tries (batches that do not come out raw-sized) at batch
        // 0, then after 64 KiB, 128 KiB, ... of raw batches, up to the most (here 512 KiB, 32
        // batches; MAX_SKIP is 32 MiB).
        const LEN: usize = 16 * 1024;
        let mut w = ZstdWriter::new(Vec::new()).unwrap();
        w.max_skip = 512 * 1024;
        let batches: Vec<Vec<u8>> = (0..200).map(|i| noise(i, LEN)).collect();
        let (stream, sizes) = stream_with(w, &batches).await;
        assert_eq!(decode(&stream), batches.concat());
        let tries: Vec<usize> = (0..sizes.len()).filter(|&i| sizes[i] != LEN + 9).collect();
        let gaps: Vec<usize> = tries.windows(2).map(|w| w[1] - w[0]).collect();
        // Raw batches between tries, plus the try itself.
        let expected: Vec<usize> = (0..gaps.len())
            .map(|k| ((MIN_SKIP << k).min(512 * 1024) as usize / LEN) + 1)
            .collect();
        assert_eq!(gaps, expected, "tries at batches {tries:?}");
        assert!(
            gaps.ends_with(&[33, 33]),
            "the spacing stops growing: {gaps:?}"
        );
    }

    /// A socket that takes at most `max` bytes per write, vectored or not.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
        vectored: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.max - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn raw_batches_survive_short_writes_vectored_or_not() {
        // Noise goes raw after the first batch; writes cut frames at every possible place.
        let batches: Vec<Vec<u8>> = (0..30)
            .map(|i| noise(i, 5000 + 10_007 * i as usize))
            .collect();
        for vectored in [true, false] {
            for max in [7, 9, 10, 4096, 131_081, 1 << 20] {
                let mut w = ZstdWriter::new(Trickle {
                    out: Vec::new(),
                    max,
                    vectored,
                })
                .unwrap();
                for b in &batches {
                    w.write_all(b).await.unwrap();
                    w.flush().await.unwrap();
                }
                w.shutdown().await.unwrap();
                assert_eq!(decode(&w.io.out), batches.concat(), "max {max}");
            }
        }
    }

    /// A socket that hands out at most `chunk` bytes per read, and nothing past `open` (it is
    /// then pending, as a socket whose peer has sent no more yet).
    struct Drip {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
        open: usize,
    }

    impl AsyncRead for Drip {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.pos == self.open && self.open < self.data.len() {
                return Poll::Pending;
            }
            let n = self.chunk.min(buf.remaining()).min(self.open - self.pos);
            let pos = self.pos;
            buf.put_slice(&self.data[pos..pos + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    /// Reads `stream` through a [`ZstdReader`], `chunk` bytes per socket read, into caller
    /// buffers of `cap` bytes.
    async fn read_through(stream: &[u8], chunk: usize, cap: usize) -> io::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut r = ZstdReader::new(Drip {
            data: stream.to_vec(),
            pos: 0,
            chunk,
            open: stream.len(),
        })?;
        let mut all = Vec::new();
        let mut buf = vec![0; cap];
        loop {
            match r.read(&mut buf).await? {
                0 => return Ok(all),
                n => all.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// A reader polled far more often than its socket has data (a reader in a `select!`
    /// whose other branches fire, or one that spins) waits for the rest of a compressed frame
    /// however often it is asked: zstd, called with no input again and again, gives up.
    #[tokio::test]
    async fn polls_without_new_input_only_wait() {
        use tokio::io::AsyncReadExt;
        let text = b"compressible text, polled and polled ".repeat(200);
        let (stream, _) = stream_of(std::slice::from_ref(&text)).await;
        assert!(stream.len() < text.len() / 4, "a compressed frame");
        let half = stream.len() / 2;
        let mut r = ZstdReader::new(Drip {
            data: stream.clone(),
            pos: 0,
            chunk: usize::MAX,
            open: half,
        })
        .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for poll in 0..100 {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut r).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => panic!("poll {poll}: {e}"),
                Poll::Pending => {}
            }
        }
        r.io.open = stream.len();
        while got.len() < text.len() {
            match r.read(&mut buf).await.unwrap() {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        assert!(got == text, "{} of {} bytes", got.len(), text.len());
    }

    #[tokio::test]
    async fn the_reader_reads_what_the_writer_wrote_however_it_arrives() {
        let text = b"compressible text, batch after batch ".repeat(100);
        let mut batches: Vec<Vec<u8>> = (0..12)
            .map(|i| noise(i, 3000 + 50_000 * i as usize))
            .collect();
        batches.extend((0..10).map(|_| text.clone()));
        batches.extend((20..30).map(|i| noise(i, 4096)));
        let (stream, _) = stream_of(&batches).await;
        let want = batches.concat();
        for (chunk, cap) in [
            (1, 1 << 20),
            (7, 100),
            (9, 4096),
            (4096, 3),
            (1 << 20, 1 << 20),
            (65_536, 200_000),
        ] {
            let got = read_through(&stream, chunk, cap).await.unwrap();
            assert!(
                got == want,
                "chunk {chunk} cap {cap}: {} of {} bytes",
                got.len(),
                want.len()
            );
        }
    }

    #[tokio::test]
    async fn the_reader_reads_any_zstd_stream() {
        // The reference encoder's frames: content size, checksum, compressed and raw blocks.
        let text = b"zstd from elsewhere ".repeat(500);
        let mut stream = zstd::stream::encode_all(&text[..], 3).unwrap();
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_checksum(true).unwrap();
        std::io::Write::write_all(&mut enc, &noise(3, 70_000)).unwrap();
        stream.extend(enc.finish().unwrap());
        // A skippable frame: magic 0x184D2A50, length, bytes any decoder skips.
        stream.extend([0x50, 0x2A, 0x4D, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        // Descriptor 0, but a raw block that is not the last: the next (RLE) block is the
        // decoder's, and it must have seen the first.
        stream.extend(MAGIC);
        stream.extend([DESCRIPTOR, WINDOW, (3 << 3) as u8, 0, 0]);
        stream.extend(b"abc");
        stream.extend([(5 << 3) | (1 << 1) | 1, 0, 0, b'x']);
        let mut want = text.clone();
        want.extend(noise(3, 70_000));
        want.extend(b"abcxxxxx");
        for (chunk, cap) in [(1, 1 << 16), (5, 7), (1 << 20, 1 << 20)] {
            assert!(read_through(&stream, chunk, cap).await.unwrap() == want);
        }
    }

    #[tokio::test]
    async fn the_reader_refuses_what_a_decoder_would() {
        let raw = |wd: u8, len: u32| {
            let mut f = MAGIC.to_vec();
            f.extend([DESCRIPTOR, wd]);
            f.extend(&((len << 3) | 1).to_le_bytes()[..3]);
            f.extend(vec![7u8; len as usize]);
            f
        };
        // A clean end between frames is the end of the stream.
        assert_eq!(
            read_through(&raw(WINDOW, 5), 3, 64).await.unwrap(),
            vec![7; 5]
        );
        // A raw block larger than its window (1 KiB) allows.
        assert!(read_through(&raw(0, 2000), 1 << 20, 1 << 20).await.is_err());
        // A window over our cap (2^24 > 2^23).
        assert!(read_through(&raw(14 << 3, 10), 1 << 20, 1 << 20)
            .await
            .is_err());
        // Streams that end inside a frame, in its header or in its block.
        let whole = raw(WINDOW, 1000);
        for cut in [3, 5, 8, 9, 500] {
            let err = read_through(&whole[..cut], 1 << 20, 1 << 20)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
        // Garbage is not a frame.
        assert!(read_through(b"not zstd at all", 1 << 20, 1 << 20)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn large_batches_are_cut_into_blocks_and_decode() {
        let big = noise(7, 300 * 1024);
        let batches = vec![noise(1, 2048), noise(2, 2048), big.clone(), big];
        let (stream, _) = stream_of(&batches).await;
        assert_eq!(decode(&stream), batches.concat());
    }

    #[tokio::test]
    async fn the_writer_keeps_to_the_window_every_receiver_takes() {
        // PROTOCOL.md §3.3: senders MUST NOT use a window above 8 MiB. A reference decoder
        // capped at that reads 24 MiB of batches that repeat from far back.
        let block = noise(9, 1 << 20);
        let batches: Vec<Vec<u8>> = (0..24).map(|i| block[..(1 << 20) - i].to_vec()).collect();
        let (stream, _) = stream_of(&batches).await;
        let mut d = zstd::stream::read::Decoder::new(&stream[..]).unwrap();
        d.window_log_max(ZSTD_WINDOW_LOG_MAX).unwrap();
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut out).unwrap();
        assert!(out == batches.concat(), "the stream did not round-trip");
    }
}
