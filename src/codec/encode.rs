//! Encoding: single messages, whole frames, and the [`Outbox`] that batches messages from many
//! callers into as few frames (and writes) as possible.

use std::collections::VecDeque;
use std::io;

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{kind, Message, FRAGMENT_FIXED};
use super::{
    CodecError, FRAGMENT_WINDOW, FRAME_HEADER_LEN, MAX_MESSAGES_PER_FRAME, MAX_METADATA_LEN,
    MAX_METHOD_LEN, MIN_MAX_FRAME_LEN,
};

/// Checks the per-field limits that the wire format can express, so that an encoder never writes
/// something the decoder must refuse.
fn check(msg: &Message) -> Result<(), CodecError> {
    match msg {
        Message::Request { id: 0, .. } => Err(CodecError::InvalidFrame("request id 0")),
        Message::Request {
            method, metadata, ..
        }
        | Message::OneWay {
            method, metadata, ..
        } => {
            if method.is_empty() || method.len() > MAX_METHOD_LEN {
                return Err(CodecError::InvalidFrame(
                    "method name must be 1 to 255 bytes",
                ));
            }
            if std::str::from_utf8(method).is_err() {
                return Err(CodecError::InvalidFrame("method name is not UTF-8"));
            }
            if metadata.len() > MAX_METADATA_LEN {
                return Err(CodecError::InvalidFrame("metadata above 16 KiB"));
            }
            Ok(())
        }
        Message::Error { message: text, .. } | Message::GoAway { reason: text, .. } => {
            if text.len() > u16::MAX as usize {
                return Err(CodecError::InvalidFrame("message text above 65535 bytes"));
            }
            if std::str::from_utf8(text).is_err() {
                return Err(CodecError::InvalidFrame("message text is not UTF-8"));
            }
            Ok(())
        }
        Message::Ack { bytes: 0 } => Err(CodecError::InvalidFrame("ack of 0 bytes")),
        _ => Ok(()),
    }
}

/// Writes one message, which must have passed [`check`].
fn put_message(msg: &Message, dst: &mut impl BufMut) {
    match msg {
        Message::Request {
            id,
            timeout_ms,
            method,
            metadata,
            body,
        } => put_request(kind::REQUEST, *id, *timeout_ms, method, metadata, body, dst),
        Message::OneWay {
            timeout_ms,
            method,
            metadata,
            body,
        } => put_request(kind::ONEWAY, 0, *timeout_ms, method, metadata, body, dst),
        Message::Response { id, body } => {
            dst.put_u8(kind::RESPONSE);
            dst.put_u32(*id);
            dst.put_u32(body.len() as u32);
            dst.put_slice(body);
        }
        Message::Error {
            id,
            code,
            message,
            details,
        } => {
            dst.put_u8(kind::ERROR);
            dst.put_u32(*id);
            dst.put_u16(*code);
            dst.put_u16(message.len() as u16);
            dst.put_u32(details.len() as u32);
            dst.put_slice(message);
            dst.put_slice(details);
        }
        Message::Cancel { id } => {
            dst.put_u8(kind::CANCEL);
            dst.put_u32(*id);
        }
        Message::Ping { data } => {
            dst.put_u8(kind::PING);
            dst.put_u64(*data);
        }
        Message::Pong { data } => {
            dst.put_u8(kind::PONG);
            dst.put_u64(*data);
        }
        Message::Ack { bytes } => {
            dst.put_u8(kind::ACK);
            dst.put_u32(*bytes);
        }
        Message::GoAway { code, reason } => {
            dst.put_u8(kind::GOAWAY);
            dst.put_u16(*code);
            dst.put_u16(reason.len() as u16);
            dst.put_slice(reason);
        }
    }
}

fn put_request(
    kind: u8,
    id: u32,
    timeout_ms: u32,
    method: &[u8],
    metadata: &[u8],
    body: &[u8],
    dst: &mut impl BufMut,
) {
    dst.put_u8(kind);
    dst.put_u32(id);
    dst.put_u32(timeout_ms);
    dst.put_u8(method.len() as u8);
    dst.put_u16(metadata.len() as u16);
    dst.put_u32(body.len() as u32);
    dst.put_slice(method);
    dst.put_slice(metadata);
    dst.put_slice(body);
}

fn put_header(dst: &mut [u8], len: usize, count: u16) {
    dst[0..4].copy_from_slice(&(len as u32).to_be_bytes());
    dst[4] = 0;
    dst[5] = 0;
    dst[6..8].copy_from_slice(&count.to_be_bytes());
}

/// Encodes `messages` as one frame, or refuses and writes nothing.
pub(super) fn encode_frame(
    messages: &[Message],
    max_len: usize,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    if messages.is_empty() {
        return Err(CodecError::InvalidFrame("empty frame"));
    }
    if messages.len() > MAX_MESSAGES_PER_FRAME {
        return Err(CodecError::InvalidFrame(
            "more than 65535 messages in a frame",
        ));
    }
    let mut len = 0usize;
    for m in messages {
        check(m)?;
        len = len.saturating_add(m.encoded_len());
    }
    if len > max_len {
        return Err(CodecError::FrameTooLarge { len, max: max_len });
    }
    dst.reserve(FRAME_HEADER_LEN + len);
    let start = dst.len();
    dst.put_bytes(0, FRAME_HEADER_LEN);
    for m in messages {
        put_message(m, dst);
    }
    put_header(&mut dst[start..], len, messages.len() as u16);
    Ok(())
}

/// Messages larger than this go out in fragments (PROTOCOL.md §4.1), this size each at most.
pub(crate) const FRAGMENT_SIZE: usize = 64 * 1024;

/// Largest frame body the outbox packs small messages into (or the peer's limit, if lower): a
/// take of many messages leaves as several frames in one write. The peer then never needs a
/// read buffer much larger than one read to hold a frame, and what the messages' bodies
/// (slices of that buffer) pin is a frame, not a whole take: with 1 KiB payloads at 10,000
/// callers, frames of up to a take (megabytes) left the server at 44–54 MiB RSS, frames of
/// 64 KiB at 31–42, at the same calls/s (docs/benchmarks.md, session 9).
pub(crate) const FRAME_TARGET: usize = 64 * 1024;

/// Most fragment bytes one take carries, after the small messages queued at that moment: what
/// a small call may wait behind, besides the small calls ahead of it.
pub(crate) const FRAGMENTS_PER_TAKE: usize = 256 * 1024;

/// Most queued large messages [`Outbox::withdraw`] looks through.
const WITHDRAW_SCAN: usize = 256;

/// The write side of a connection: messages from any number of tasks are appended here, packed
/// into frames as they come, and the writer task takes everything at once for one `write`.
///
/// A new frame starts when the current one would pass [`FRAME_TARGET`] (or the peer's
/// `max_frame_len`, if lower) or 65,535 messages, so one take may hold several frames; they
/// still go out in one write.
///
/// Messages above [`FRAGMENT_SIZE`] wait in a lane of their own and leave in fragments, up to
/// [`FRAGMENTS_PER_TAKE`] bytes of them at the end of each take: a 4 MiB reply does not hold
/// up the small replies queued after it, which go out in the next take.
#[derive(Debug)]
pub(crate) struct Outbox {
    buf: BytesMut,
    /// Offset of the open frame's header in `buf`, if a frame is open.
    open: Option<usize>,
    count: u16,
    max_frame_len: usize,
    /// Messages pushed since the last take.
    queued: usize,
    /// Large messages, the first one maybe partly sent.
    big: VecDeque<Big>,
    /// Bytes of `big` not sent yet.
    big_len: usize,
    /// Fragment data sent and not acknowledged yet (PROTOCOL.md §4.1).
    outstanding: usize,
    /// Fragment data of the peer's to acknowledge in the next take, ahead of everything else:
    /// the ACKs pushed since the last take, merged.
    ack: u64,
    /// Whether fragments keep to the window: not while this side has stopped reading, when
    /// the ACKs that open it cannot arrive.
    paced: bool,
    /// Whether the peer's frame limit is still unknown (a client's calls made before the
    /// server's preface): see [`Outbox::provisional`].
    provisional: bool,
    /// Whether the last message (a GOAWAY that closes the connection) is queued: nothing
    /// goes after it.
    ended: bool,
}

/// A message waiting to go out in fragments: its encoding is `head` then `tail`, and the
/// payload is not copied until its fragments are.
#[derive(Debug)]
struct Big {
    /// The fixed part and the small fields (method and metadata, or an error's text).
    head: Bytes,
    /// The body, or an error's details.
    tail: Bytes,
    /// Bytes already sent in fragments.
    sent: usize,
}

impl Big {
    /// `msg` (one of the four kinds with a payload; see `Outbox::push`) split into its
    /// encoding without the payload, whose length field is patched in, and the payload.
    fn new(msg: &Message) -> Big {
        // A clone shares the payload (`Bytes`); taking it out leaves the rest to encode.
        let mut bare = msg.clone();
        let (tail, len_at) = match &mut bare {
            Message::Request { body, .. } | Message::OneWay { body, .. } => {
                (std::mem::take(body), 12)
            }
            Message::Response { body, .. } => (std::mem::take(body), 5),
            Message::Error { details, .. } => (std::mem::take(details), 9),
            // Control messages are a few bytes and never come here; sent whole if they did.
            _ => (Bytes::new(), 0),
        };
        let mut head = BytesMut::with_capacity(bare.encoded_len());
        put_message(&bare, &mut head);
        if !tail.is_empty() {
            head[len_at..len_at + 4].copy_from_slice(&(tail.len() as u32).to_be_bytes());
        }
        Big {
            head: head.freeze(),
            tail,
            sent: 0,
        }
    }

    fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether none of it has been taken yet and it is a call's: a REQUEST, RESPONSE or ERROR
    /// (not a ONEWAY, whose id is 0).
    fn is_unsent_call(&self) -> bool {
        let call = matches!(
            self.head.first(),
            Some(&(kind::REQUEST | kind::RESPONSE | kind::ERROR))
        );
        self.sent == 0 && call
    }

    /// The message's id (every kind with a payload has it right after its kind byte).
    fn id(&self) -> u32 {
        self.head
            .get(1..5)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next `n` bytes of the encoding, as slices of the message's own buffers (no copy):
    /// the end of the head, then the start of the tail; either may be empty.
    fn next(&mut self, n: usize) -> [Bytes; 2] {
        let from = self.sent;
        let end = from + n;
        let h = self.head.len();
        let head = if from < h {
            self.head.slice(from..end.min(h))
        } else {
            Bytes::new()
        };
        let tail = if end > h {
            self.tail.slice(from.max(h) - h..end - h)
        } else {
            Bytes::new()
        };
        self.sent = end;
        [head, tail]
    }
}

/// Bytes of an ACK message: its kind and its count (PROTOCOL.md §5.8).
const ACK_LEN: usize = 5;

/// Bytes of a frame holding one ACK.
const ACK_FRAME: usize = FRAME_HEADER_LEN + ACK_LEN;

/// Bytes of one fragment's frame header and fragment header together.
const PIECE_HEAD: usize = FRAME_HEADER_LEN + FRAGMENT_FIXED;

/// What one [`Outbox::take`] hands the writer: whole frames in one buffer, then the fragments
/// of large messages. Gathered, a fragment's data stays in the message's own buffer and goes
/// out in the same vectored write as the buffer, with no copy; otherwise (a writer without
/// vectored writes: a compressor) it is copied into the buffer.
///
/// The writer hands its last batch back to the next take, so the buffers are reused.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// An ACK to send ahead of everything else, in a frame of its own, when the batch is
    /// gathered (otherwise it heads `buf`).
    lead: Option<[u8; ACK_FRAME]>,
    buf: BytesMut,
    pieces: Vec<Piece>,
    /// Whether fragments stay in `pieces` (`true`) or are copied into `buf`.
    gather: bool,
    /// Whether the batch was taken while large messages were going out, their fragments
    /// copied into `buf` (not gathered).
    copying: bool,
}

/// One fragment kept out of the buffer: its headers, then its data.
#[derive(Debug)]
struct Piece {
    head: [u8; PIECE_HEAD],
    data: [Bytes; 2],
}

impl Piece {
    fn len(&self) -> usize {
        PIECE_HEAD + self.data[0].len() + self.data[1].len()
    }
}

/// Most slices [`Batch::io_slices`] fills in: an ACK, a buffer and ten fragments.
pub(crate) const MAX_IO_SLICES: usize = 32;

impl Batch {
    /// An empty batch; `gather`: whether fragments may stay out of the buffer (the writer
    /// writes vectored).
    pub(crate) fn new(gather: bool) -> Self {
        Batch {
            gather,
            ..Batch::default()
        }
    }

    /// Bytes in the batch.
    pub(crate) fn len(&self) -> usize {
        self.lead.map_or(0, |l| l.len())
            + self.buf.len()
            + self.pieces.iter().map(Piece::len).sum::<usize>()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lead.is_none() && self.buf.is_empty() && self.pieces.is_empty()
    }

    /// Empties the batch, keeping the buffer's memory and letting go of the fragments'.
    pub(crate) fn clear(&mut self) {
        self.lead = None;
        self.buf.clear();
        self.pieces.clear();
        self.copying = false;
    }

    /// The memory the batch keeps for reuse.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Whether the batch was taken while large messages were going out in fragments copied
    /// into its buffer (a writer that does not gather): with or without fragments of its own
    /// (they may be waiting for the peer's window), more such batches are coming.
    pub(crate) fn copying_fragments(&self) -> bool {
        self.copying
    }

    /// The whole batch, when it is one buffer (no ACK or fragments kept apart).
    pub(crate) fn as_contiguous(&self) -> Option<&[u8]> {
        (self.lead.is_none() && self.pieces.is_empty()).then_some(&self.buf[..])
    }

    /// Fills `out` with the batch's bytes from offset `skip` on, in order, as far as `out`
    /// holds; returns how many slices it filled.
    pub(crate) fn io_slices<'a>(&'a self, skip: usize, out: &mut [io::IoSlice<'a>]) -> usize {
        let mut skip = skip;
        let mut n = 0;
        let lead = self.lead.as_ref().map_or(&[][..], |l| &l[..]);
        let segments = [lead, &self.buf[..]].into_iter().chain(
            self.pieces
                .iter()
                .flat_map(|p| [&p.head[..], &p.data[0][..], &p.data[1][..]]),
        );
        for seg in segments {
            if n == out.len() {
                break;
            }
            if skip >= seg.len() {
                skip -= seg.len();
                continue;
            }
            out[n] = io::IoSlice::new(&seg[skip..]);
            skip = 0;
            n += 1;
        }
        n
    }

    /// The batch as one buffer, fragments copied in.
    #[cfg(test)]
    pub(crate) fn into_contiguous(self) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_slice(self.lead.as_ref().map_or(&[][..], |l| &l[..]));
        out.put_slice(&self.buf);
        for p in self.pieces {
            out.put_slice(&p.head);
            out.put_slice(&p.data[0]);
            out.put_slice(&p.data[1]);
        }
        out
    }
}

impl Outbox {
    pub(crate) fn new(max_frame_len: usize, capacity: usize) -> Self {
        Outbox {
            buf: BytesMut::with_capacity(capacity),
            open: None,
            count: 0,
            max_frame_len,
            queued: 0,
            big: VecDeque::new(),
            big_len: 0,
            outstanding: 0,
            ack: 0,
            paced: true,
            provisional: false,
            ended: false,
        }
    }

    /// An outbox for a peer whose frame limit is not known yet (a client dialling: PROTOCOL.md
    /// §3 forbids frames over the limit the server's preface will announce). Until
    /// [`set_max_frame_len`](Self::set_max_frame_len) gives it, frames are kept to
    /// [`MIN_MAX_FRAME_LEN`], which every peer accepts, and a message too large for one waits
    /// to go out in fragments, sized then; `max_frame_len` bounds messages meanwhile.
    pub(crate) fn provisional(max_frame_len: usize) -> Self {
        Outbox {
            provisional: true,
            ..Outbox::new(max_frame_len, 0)
        }
    }

    /// Sets the peer's frame limit, learnt from its preface, for frames opened from now on.
    /// Messages queued for fragments that the limit no longer admits (only a provisional
    /// outbox holds such) are taken out unsent and returned, as (id, encoded size), for their
    /// callers to be told.
    pub(crate) fn set_max_frame_len(&mut self, len: usize) -> Vec<(u32, usize)> {
        self.max_frame_len = len;
        self.provisional = false;
        // A frame opened under the old limit must not grow past the new one.
        self.open = None;
        let mut refused = Vec::new();
        if self.big.iter().any(|big| big.sent == 0 && big.len() > len) {
            let mut kept = VecDeque::with_capacity(self.big.len());
            for big in self.big.drain(..) {
                if big.sent == 0 && big.len() > len {
                    self.big_len -= big.len();
                    self.queued = self.queued.saturating_sub(1);
                    refused.push((big.id(), big.len()));
                } else {
                    kept.push_back(big);
                }
            }
            self.big = kept;
        }
        refused
    }

    /// Queues `msg` (a GOAWAY with a code other than DRAINING) as the last message of the
    /// connection: the sender closes right after it (PROTOCOL.md §5.6). The fragments of
    /// large messages not yet sent are dropped, a message partly sent in fragments included
    /// (closing the connection is the one way to abandon it, §4.1), and later pushes are
    /// refused. Messages already queued go out before it.
    pub(crate) fn push_last(&mut self, msg: &Message) -> Result<(), CodecError> {
        self.push(msg)?;
        self.big.clear();
        self.big_len = 0;
        self.ended = true;
        Ok(())
    }

    /// Takes the REQUEST, RESPONSE or ERROR of call `id` back out, if it waits to go out in
    /// fragments and none of it has left yet (a request whose caller gave up before it was
    /// sent, a reply to a call the client cancelled): it never leaves. Returns whether it was
    /// taken out. A message partly sent stays: closing the connection is the one way to
    /// abandon a message in fragments (PROTOCOL.md §4.1).
    ///
    /// Looks through at most [`WITHDRAW_SCAN`] queued large messages, so that thousands of
    /// calls given up at once do not each walk a long queue under the connection's lock; one
    /// further back is sent, and cancelled, as a small one is.
    pub(crate) fn withdraw(&mut self, id: u32) -> bool {
        let found = self.unsent_call(id);
        let Some(big) = found.and_then(|i| self.big.remove(i)) else {
            return false;
        };
        self.big_len -= big.len();
        true
    }

    /// Appends one message, or refuses it (writing nothing) if it breaks a limit.
    ///
    /// An ACK is not appended: it leaves at the head of the next take, merged with any other
    /// pushed since the last one. Behind the messages already queued it would reach the peer
    /// only once the peer had read them all, and the peer's fragments wait for it.
    pub(crate) fn push(&mut self, msg: &Message) -> Result<(), CodecError> {
        if self.ended {
            return Err(CodecError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection is closing: nothing goes out after its GOAWAY",
            )));
        }
        check(msg)?;
        if let Message::Ack { bytes } = msg {
            self.queued += 1;
            self.ack += u64::from(*bytes);
            return Ok(());
        }
        let n = msg.encoded_len();
        if n > self.max_frame_len {
            return Err(CodecError::FrameTooLarge {
                len: n,
                max: self.max_frame_len,
            });
        }
        self.queued += 1;
        if n > FRAGMENT_SIZE || (self.provisional && n > MIN_MAX_FRAME_LEN) {
            self.big.push_back(Big::new(msg));
            self.big_len += n;
            return Ok(());
        }
        let start = self.frame_for(n);
        put_message(msg, &mut self.buf);
        self.close_message(start);
        Ok(())
    }

    /// The offset of a frame with room for `n` more bytes: the open one, or a new one.
    fn frame_for(&mut self, n: usize) -> usize {
        match self.open {
            Some(start)
                if (self.count as usize) < MAX_MESSAGES_PER_FRAME
                    && self.buf.len() - start - FRAME_HEADER_LEN + n <= self.frame_limit() =>
            {
                start
            }
            _ => {
                let start = self.buf.len();
                self.buf.put_bytes(0, FRAME_HEADER_LEN);
                self.open = Some(start);
                self.count = 0;
                start
            }
        }
    }

    /// The most a frame's body may hold here: [`FRAME_TARGET`], or less if the peer accepts
    /// less ([`MIN_MAX_FRAME_LEN`] while its limit is unknown). A message that `push` does not
    /// send in fragments fits a new frame.
    fn frame_limit(&self) -> usize {
        if self.provisional {
            return MIN_MAX_FRAME_LEN;
        }
        self.max_frame_len.min(FRAME_TARGET)
    }

    /// Counts the message just written into the frame at `start`.
    fn close_message(&mut self, start: usize) {
        self.count += 1;
        let len = self.buf.len() - start - FRAME_HEADER_LEN;
        put_header(&mut self.buf[start..], len, self.count);
    }

    /// Whether the message with `id` waits in the lane of large messages with none of it
    /// taken yet: a request not one byte of which has left, which no reply can answer. Looks
    /// through at most [`WITHDRAW_SCAN`] of them, as [`withdraw`](Self::withdraw) does: it is
    /// asked at every reply.
    pub(crate) fn unsent(&self, id: u32) -> bool {
        self.unsent_call(id).is_some()
    }

    /// The ids of the calls whose large REQUEST, RESPONSE or ERROR waits with none of it taken
    /// yet, ascending (a connection's end: those never left, and are safe to send again).
    pub(crate) fn unsent_calls(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .big
            .iter()
            .filter(|big| big.is_unsent_call())
            .map(|big| big.id())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Where the REQUEST, RESPONSE or ERROR of call `id` waits among the first
    /// [`WITHDRAW_SCAN`] large messages with none of it taken yet, if it does.
    fn unsent_call(&self, id: u32) -> Option<usize> {
        self.big
            .iter()
            .take(WITHDRAW_SCAN)
            .position(|big| big.is_unsent_call() && big.id() == id)
    }

    /// Lets go of the buffer messages are encoded into, when nothing waits in it (a quiet
    /// connection: the next push takes a fresh one).
    pub(crate) fn release_buffer(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Bytes waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.buf.len() + self.big_len + self.ack_len()
    }

    /// Bytes of the ACK frames the next takes begin with (one a take).
    fn ack_len(&self) -> usize {
        let acks = self.ack.div_ceil(u64::from(u32::MAX)) as usize;
        acks * ACK_FRAME
    }

    /// Whether a take now would come back empty: nothing queued but fragments waiting for
    /// window. A writer that found it so sleeps until a push or an ACK changes it, so whoever
    /// finds it so before they push must wake the writer.
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.ack == 0 && !self.fragment_ready()
    }

    /// Whether nothing at all is queued, fragments waiting for window included.
    pub(crate) fn is_drained(&self) -> bool {
        self.buf.is_empty() && self.ack == 0 && self.big.is_empty()
    }

    /// Whether the next fragment fits the window.
    fn fragment_ready(&self) -> bool {
        self.big
            .front()
            .is_some_and(|big| self.fits_window((big.len() - big.sent).min(self.piece_max())))
    }

    /// Whether `n` more bytes of fragments fit the peer's window.
    fn fits_window(&self, n: usize) -> bool {
        !self.paced || self.outstanding + n <= FRAGMENT_WINDOW
    }

    /// Stops (`false`) or resumes keeping fragments to the window; returns whether the writer
    /// must be woken. A side that stops reading stops pacing: the ACKs would wait unread.
    pub(crate) fn pace(&mut self, paced: bool) -> bool {
        let was_empty = self.is_empty();
        self.paced = paced;
        was_empty && !self.is_empty()
    }

    fn piece_max(&self) -> usize {
        FRAGMENT_SIZE.min(self.max_frame_len.saturating_sub(FRAGMENT_FIXED).max(1))
    }

    /// The peer acknowledged `bytes` of fragment data: its window takes that much more.
    /// Returns whether the writer must be woken (fragments were waiting for it), or refuses an
    /// ACK for more than is outstanding.
    pub(crate) fn ack(&mut self, bytes: u32) -> Result<bool, CodecError> {
        let bytes = bytes as usize;
        if bytes > self.outstanding {
            return Err(CodecError::InvalidFrame(
                "ack for more fragment data than was sent",
            ));
        }
        let was_empty = self.is_empty();
        self.outstanding -= bytes;
        Ok(was_empty && !self.is_empty())
    }

    /// Messages pushed since the last take.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Takes the ACK due, every finished frame and the next fragments of the large messages
    /// (as many as [`FRAGMENTS_PER_TAKE`] and the peer's window allow), in that order, leaving
    /// the outbox empty unless large messages have more to send. The next push opens a new
    /// frame.
    ///
    /// `spare` is the writer's previous (already written) batch: handing it back lets the two
    /// buffers alternate, so steady-state batching allocates nothing. Whether fragments are
    /// gathered or copied follows `spare`.
    pub(crate) fn take(&mut self, spare: Batch) -> Batch {
        self.open = None;
        self.count = 0;
        self.queued = 0;
        let mut spare = spare;
        spare.clear();
        let mut buf = spare.buf;
        let lead = match (self.ack > 0).then(|| self.take_ack_frame()) {
            // The writer wants one buffer (it may not write vectored: a compressor, which
            // judges a batch by its first write): the frames are copied behind the ACK, once
            // per 64 KiB of the peer's fragments, little next to them.
            Some(ack) if !spare.gather => {
                buf.reserve(ACK_FRAME + self.buf.len());
                buf.put_slice(&ack);
                buf.put_slice(&self.buf);
                self.buf.clear();
                None
            }
            lead => {
                std::mem::swap(&mut buf, &mut self.buf);
                lead
            }
        };
        let mut out = Batch {
            lead,
            buf,
            pieces: spare.pieces,
            gather: spare.gather,
            copying: !spare.gather && !self.big.is_empty(),
        };
        if !self.big.is_empty() {
            self.put_fragments(&mut out);
        }
        out
    }

    /// The ACK frame that leads a take: as much of the merged ACK as one can say.
    fn take_ack_frame(&mut self) -> [u8; ACK_FRAME] {
        let bytes = self.ack.min(u64::from(u32::MAX));
        self.ack -= bytes;
        let mut frame = [0u8; ACK_FRAME];
        put_header(&mut frame, ACK_LEN, 1);
        let ack = Message::Ack {
            bytes: bytes as u32,
        };
        put_message(&ack, &mut &mut frame[FRAME_HEADER_LEN..]);
        frame
    }

    /// Adds up to [`FRAGMENTS_PER_TAKE`] bytes of fragments, each in a frame of its own.
    fn put_fragments(&mut self, out: &mut Batch) {
        let piece_max = self.piece_max();
        let mut budget = FRAGMENTS_PER_TAKE;
        while budget > 0 {
            let Some(left) = self.big.front().map(|big| big.len() - big.sent) else {
                break;
            };
            let n = left.min(piece_max);
            let more = n < left;
            if !self.fits_window(n) {
                // The peer has not read what went before: wait for its ACK.
                break;
            }
            let Some(big) = self.big.front_mut() else {
                break;
            };
            self.outstanding += n;
            let mut head = [0u8; PIECE_HEAD];
            put_header(&mut head, FRAGMENT_FIXED + n, 1);
            head[FRAME_HEADER_LEN] = kind::FRAGMENT;
            head[FRAME_HEADER_LEN + 1] = u8::from(more);
            head[FRAME_HEADER_LEN + 2..].copy_from_slice(&(n as u32).to_be_bytes());
            let data = big.next(n);
            if out.gather {
                out.pieces.push(Piece { head, data });
            } else {
                out.buf.reserve(PIECE_HEAD + n);
                out.buf.put_slice(&head);
                out.buf.put_slice(&data[0]);
                out.buf.put_slice(&data[1]);
            }
            self.big_len -= n;
            budget = budget.saturating_sub(n);
            if !more {
                self.big.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn req(id: u32, body: &'static [u8]) -> Message {
        Message::Request {
            id,
            timeout_ms: 0,
            method: Bytes::from_static(b"m"),
            metadata: Bytes::new(),
            body: Bytes::from_static(body),
        }
    }

    /// One take, fragments gathered, as the bytes a writer would send.
    fn take(o: &mut Outbox) -> BytesMut {
        o.take(Batch::new(true)).into_contiguous()
    }

    fn big_req(id: u32, len: usize, fill: u8) -> Message {
        Message::Request {
            id,
            timeout_ms: 0,
            method: Bytes::from_static(b"m"),
            metadata: Bytes::new(),
            body: Bytes::from(vec![fill; len]),
        }
    }

    fn big_oneway(len: usize) -> Message {
        Message::OneWay {
            timeout_ms: 0,
            method: Bytes::from_static(b"m"),
            metadata: Bytes::new(),
            body: Bytes::from(vec![9u8; len]),
        }
    }

    #[test]
    fn a_large_call_is_withdrawn_only_while_none_of_it_has_left() {
        let mut o = Outbox::new(16 << 20, 0);
        o.push(&big_req(1, 2 * FRAGMENT_WINDOW, 1)).unwrap();
        o.push(&big_req(2, 3 * FRAGMENT_SIZE, 0xee)).unwrap();
        o.push(&big_response(3, 3 * FRAGMENT_SIZE)).unwrap();
        o.push(&req(4, b"small")).unwrap();
        o.push(&big_oneway(5 * FRAGMENT_SIZE)).unwrap();
        let before = o.len();
        // The first is on its way once a take has sent its first pieces; a small request is
        // in a frame already; a one-way message is no call; an unknown id is nothing.
        let first = take(&mut o);
        assert!(first.len() > FRAGMENT_SIZE);
        assert!(!o.withdraw(1), "partly sent");
        assert!(!o.withdraw(4), "small: already in a frame");
        assert!(!o.withdraw(0), "a one-way message");
        assert!(!o.withdraw(9), "unknown");
        let left = o.len();
        assert!(left < before);
        assert!(o.withdraw(2), "a request");
        assert!(!o.withdraw(2), "only once");
        let request = big_req(2, 3 * FRAGMENT_SIZE, 0xee).encoded_len();
        assert_eq!(o.len(), left - request);
        assert!(o.withdraw(3), "a response");
        // What is left is the rest of the first request and the one-way message: request 2's
        // and response 3's bytes never appear.
        let mut rest = BytesMut::new();
        while !o.is_drained() {
            o.ack(o.outstanding as u32).unwrap();
            rest.extend_from_slice(&take(&mut o));
        }
        assert!(rest.len() > FRAGMENT_WINDOW + 5 * FRAGMENT_SIZE);
        assert!(
            !rest.windows(8).any(|w| w == [0xee; 8]),
            "request 2 went out"
        );
        let response: Vec<u8> = (0..8).collect();
        assert!(
            !rest.windows(8).any(|w| w == response),
            "response 3 went out"
        );
    }

    #[test]
    fn gathered_fragments_are_the_bytes_copied_ones_would_be() {
        let msgs = [
            big_response(1, 300 * 1024 + 7),
            req(2, b"x"),
            Message::Ack { bytes: 70_000 },
            Message::Request {
                id: 3,
                timeout_ms: 1,
                method: Bytes::from_static(b"put"),
                metadata: Bytes::from_static(b"meta"),
                body: Bytes::from(vec![5u8; 2 * FRAGMENT_SIZE]),
            },
        ];
        let mut gathered = Outbox::new(16 << 20, 0);
        let mut copied = Outbox::new(16 << 20, 0);
        for m in &msgs {
            gathered.push(m).unwrap();
            copied.push(m).unwrap();
        }
        let (mut g, mut c) = (Batch::new(true), Batch::new(false));
        let mut takes = 0;
        while !copied.is_drained() {
            g = gathered.take(g);
            c = copied.take(c);
            assert!(c.as_contiguous().is_some(), "copied: one buffer");
            assert_eq!(
                g.as_contiguous().is_some(),
                g.pieces.is_empty() && g.lead.is_none()
            );
            assert_eq!(g.len(), c.len());
            // Every starting offset gives the same bytes, with room for few slices or many.
            let mut iov = [io::IoSlice::new(&[]); MAX_IO_SLICES];
            let n = c.io_slices(0, &mut iov);
            let want: Vec<u8> = iov[..n].iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(want.len(), c.len());
            if takes == 0 {
                assert_eq!(
                    &want[..8],
                    &[0, 0, 0, 5, 0, 0, 0, 1],
                    "the ACK's frame first"
                );
            }
            for skip in (0..want.len()).step_by(997).chain([want.len() - 1]) {
                for room in [1, 2, MAX_IO_SLICES] {
                    let mut iov = [io::IoSlice::new(&[]); MAX_IO_SLICES];
                    let n = g.io_slices(skip, &mut iov[..room]);
                    assert!(n >= 1 && n <= room);
                    let got: Vec<u8> = iov[..n].iter().flat_map(|s| s.iter().copied()).collect();
                    assert_eq!(got[..], want[skip..skip + got.len()]);
                    if room == MAX_IO_SLICES && g.pieces.len() * 3 + 2 <= MAX_IO_SLICES {
                        assert_eq!(got.len(), want.len() - skip, "all of it");
                    }
                }
            }
            takes += 1;
            let _ = gathered.ack(gathered.outstanding as u32);
            let _ = copied.ack(copied.outstanding as u32);
        }
        assert!(gathered.is_drained());
        assert!(takes >= 2, "the fragments took several takes");
        g.clear();
        assert!(
            g.is_empty() && g.pieces.is_empty(),
            "a cleared batch holds no payload"
        );
    }

    #[test]
    fn outbox_packs_messages_into_one_frame() {
        let mut o = Outbox::new(4096, 64);
        o.push(&req(1, b"a")).unwrap();
        o.push(&req(2, b"b")).unwrap();
        let buf = take(&mut o);
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert_eq!(len, buf.len() - FRAME_HEADER_LEN);
        assert_eq!(u16::from_be_bytes([buf[6], buf[7]]), 2);
        assert!(o.is_empty());
    }

    #[test]
    fn outbox_opens_a_new_frame_at_the_limit() {
        let mut o = Outbox::new(4096, 64);
        let big = Message::Response {
            id: 1,
            body: Bytes::from(vec![0u8; 3000]),
        };
        o.push(&big).unwrap();
        o.push(&big).unwrap();
        let buf = take(&mut o);
        assert_eq!(buf.len(), 2 * (FRAME_HEADER_LEN + 3009));
    }

    #[test]
    fn a_large_take_leaves_in_frames_of_the_target_size() {
        let mut o = Outbox::new(16 << 20, 64);
        let msg = Message::Response {
            id: 1,
            body: Bytes::from(vec![1u8; 1000]),
        };
        for _ in 0..1000 {
            o.push(&msg).unwrap();
        }
        let mut buf = take(&mut o);
        let mut d = super::super::FrameCodec::new();
        let (mut frames, mut messages) = (0, 0);
        while let Some(f) = tokio_util::codec::Decoder::decode(&mut d, &mut buf).unwrap() {
            assert!(f.messages().iter().map(Message::encoded_len).sum::<usize>() <= FRAME_TARGET);
            frames += 1;
            messages += f.messages().len();
        }
        assert!(buf.is_empty());
        assert_eq!(messages, 1000);
        // 1,009 bytes a message: 64 to a frame.
        assert_eq!(frames, 1000usize.div_ceil(FRAME_TARGET / 1009));
    }

    #[test]
    fn acks_leave_first_merged() {
        let mut o = Outbox::new(1 << 20, 64);
        o.push(&req(1, b"a")).unwrap();
        o.push(&Message::Ack { bytes: 100 }).unwrap();
        o.push(&req(2, b"b")).unwrap();
        o.push(&Message::Ack { bytes: 28 }).unwrap();
        assert_eq!(o.queued(), 4);
        let len = o.len();
        let mut buf = take(&mut o);
        assert_eq!(buf.len(), len);
        let mut d = super::super::FrameCodec::new();
        let mut got = Vec::new();
        while let Some(f) = tokio_util::codec::Decoder::decode(&mut d, &mut buf).unwrap() {
            got.push(f.messages().to_vec());
        }
        assert!(buf.is_empty());
        assert_eq!(
            got,
            [
                vec![Message::Ack { bytes: 128 }],
                vec![req(1, b"a"), req(2, b"b")]
            ]
        );
        assert!(o.is_drained());

        // More than one ACK can say: the rest leads the next take.
        o.push(&req(3, b"c")).unwrap();
        o.push(&Message::Ack { bytes: u32::MAX }).unwrap();
        o.push(&Message::Ack { bytes: 2 }).unwrap();
        let mut got = Vec::new();
        while !o.is_empty() {
            let mut buf = take(&mut o);
            while let Some(f) = tokio_util::codec::Decoder::decode(&mut d, &mut buf).unwrap() {
                got.extend(f.messages().to_vec());
            }
        }
        assert_eq!(
            got,
            [
                Message::Ack { bytes: u32::MAX },
                req(3, b"c"),
                Message::Ack { bytes: 2 },
            ]
        );
        assert!(o.is_drained());

        // A batch for a writer that wants one buffer (a compressor) has the ACK at its head.
        o.push(&req(4, b"d")).unwrap();
        o.push(&Message::Ack { bytes: 9 }).unwrap();
        let batch = o.take(Batch::new(false));
        let mut buf = BytesMut::from(batch.as_contiguous().expect("one buffer"));
        let mut got = Vec::new();
        while let Some(f) = tokio_util::codec::Decoder::decode(&mut d, &mut buf).unwrap() {
            got.extend(f.messages().to_vec());
        }
        assert_eq!(got, [Message::Ack { bytes: 9 }, req(4, b"d")]);
    }

    #[test]
    fn outbox_refuses_an_oversize_message_and_writes_nothing() {
        let mut o = Outbox::new(4096, 64);
        let big = Message::Response {
            id: 1,
            body: Bytes::from(vec![0u8; 4096]),
        };
        assert!(matches!(
            o.push(&big),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert!(o.is_empty());
    }

    /// Decodes everything in `buf` with a fresh decoder limited to `max`.
    fn decode_all(buf: &mut BytesMut, max: usize) -> Vec<Message> {
        let mut d = super::super::FrameCodec::builder()
            .max_frame_len(max)
            .new_codec();
        let mut out = Vec::new();
        while let Some(f) = tokio_util::codec::Decoder::decode(&mut d, buf).unwrap() {
            out.extend(f.into_messages());
        }
        assert!(buf.is_empty());
        out
    }

    fn big_response(id: u32, len: usize) -> Message {
        Message::Response {
            id,
            body: Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
        }
    }

    #[test]
    fn a_large_message_leaves_in_fragments_behind_the_small_ones() {
        let mut o = Outbox::new(16 << 20, 64);
        let big = big_response(1, 600 * 1024);
        o.push(&big).unwrap();
        o.push(&req(2, b"a")).unwrap();
        assert_eq!(o.len(), big.encoded_len() + FRAME_HEADER_LEN + 18);
        let mut first = take(&mut o);
        // The small message, then 256 KiB of fragments in frames of their own.
        assert_eq!(
            first.len(),
            FRAME_HEADER_LEN + 18 + 4 * (FRAME_HEADER_LEN + FRAGMENT_FIXED + FRAGMENT_SIZE)
        );
        assert!(!o.is_empty(), "more fragments to send");
        o.push(&req(3, b"b")).unwrap();
        let mut second = take(&mut o);
        let mut third = take(&mut o);
        assert!(o.is_empty());
        assert_eq!(o.len(), 0);
        let mut wire = BytesMut::new();
        for b in [&mut first, &mut second, &mut third] {
            wire.extend_from_slice(b);
        }
        let got = decode_all(&mut wire, 16 << 20);
        assert_eq!(got, vec![req(2, b"a"), req(3, b"b"), big]);
    }

    #[test]
    fn fragments_fit_a_small_peer_limit_and_every_kind_survives() {
        let mut o = Outbox::new(4096 * 64, 0);
        let msgs = vec![
            Message::Request {
                id: 5,
                timeout_ms: 9,
                method: Bytes::from_static(b"put"),
                metadata: Bytes::from_static(b"meta"),
                body: Bytes::from(vec![7u8; 100_000]),
            },
            Message::OneWay {
                timeout_ms: 0,
                method: Bytes::from_static(b"log"),
                metadata: Bytes::new(),
                body: Bytes::from(vec![8u8; 70_000]),
            },
            Message::Error {
                id: 6,
                code: 10,
                message: Bytes::from_static(b"too much"),
                details: Bytes::from(vec![9u8; 80_000]),
            },
            big_response(7, FRAGMENT_SIZE + 1),
        ];
        o.set_max_frame_len(4096 * 64);
        for m in &msgs {
            o.push(m).unwrap();
        }
        let mut o_small = Outbox::new(4096, 0);
        assert!(o_small.push(&msgs[0]).is_err(), "above the peer's limit");
        let mut wire = BytesMut::new();
        while !o.is_empty() {
            let t = take(&mut o);
            wire.extend_from_slice(&t);
        }
        assert_eq!(decode_all(&mut wire, 4096 * 64), msgs);
    }

    #[test]
    fn fragments_stop_at_the_window_and_an_ack_resumes_them() {
        let mut o = Outbox::new(16 << 20, 0);
        let big = big_response(1, 3 << 20);
        o.push(&big).unwrap();
        let mut wire = BytesMut::new();
        let mut sent = 0;
        loop {
            let t = take(&mut o);
            if t.is_empty() {
                break;
            }
            sent += t.len();
            wire.extend_from_slice(&t);
        }
        // 1 MiB of data went out (16 pieces), and then nothing until the peer acknowledges.
        assert_eq!(
            sent,
            16 * (FRAME_HEADER_LEN + FRAGMENT_FIXED + FRAGMENT_SIZE)
        );
        assert!(o.is_empty(), "nothing to take now");
        assert!(!o.is_drained(), "but fragments wait");
        // Small messages still go.
        o.push(&req(9, b"s")).unwrap();
        assert!(!o.is_empty());
        let t = take(&mut o);
        assert_eq!(t.len(), FRAME_HEADER_LEN + 18);
        wire.extend_from_slice(&t);
        assert!(o.ack(0x10_0001).is_err(), "more than outstanding");
        let mut d = super::super::FrameCodec::builder()
            .max_frame_len(16 << 20)
            .new_codec();
        let mut got = Vec::new();
        let mut acks = 0;
        loop {
            // The receiver reads a frame at a time, acknowledging every ACK_EVERY bytes.
            while let Some(f) = tokio_util::codec::Decoder::decode(&mut d, &mut wire).unwrap() {
                got.extend(f.into_messages());
                if let Some(Message::Ack { bytes }) = d.take_ack() {
                    assert_eq!(bytes as usize, super::super::ACK_EVERY);
                    let wake = o.ack(bytes).unwrap();
                    assert_eq!(
                        wake,
                        acks == 0,
                        "only the first ACK finds the writer asleep"
                    );
                    acks += 1;
                }
            }
            let t = take(&mut o);
            if t.is_empty() {
                break;
            }
            wire.extend_from_slice(&t);
        }
        assert_eq!(got, vec![req(9, b"s"), big]);
        assert!(o.is_drained());
    }

    #[test]
    fn pieces_shrink_to_the_peer_frame_limit() {
        // A peer limit just above the fragment size: a piece and its 6-byte header must still
        // fit one frame.
        let limit = FRAGMENT_SIZE + 4;
        let mut o = Outbox::new(limit, 0);
        let big = big_response(1, limit - 9);
        o.push(&big).unwrap();
        let mut t = take(&mut o);
        let first = u32::from_be_bytes([t[0], t[1], t[2], t[3]]) as usize;
        assert_eq!(first, limit, "frame body at the peer's limit");
        assert_eq!(decode_all(&mut t, limit), vec![big]);
    }

    fn request_of(id: u32, len: usize) -> Message {
        Message::Request {
            id,
            timeout_ms: 0,
            method: Bytes::from_static(b"m"),
            metadata: Bytes::new(),
            body: Bytes::from(vec![7u8; len]),
        }
    }

    /// Frame bodies in `wire`, from their headers.
    fn frame_lens(wire: &[u8]) -> Vec<usize> {
        let mut lens = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let len = u32::from_be_bytes([wire[at], wire[at + 1], wire[at + 2], wire[at + 3]]);
            lens.push(len as usize);
            at += FRAME_HEADER_LEN + len as usize;
        }
        lens
    }

    #[test]
    fn messages_queued_before_the_peer_limit_is_known_keep_to_the_limit_it_announces() {
        let mut o = Outbox::provisional(16 << 20);
        let small: Vec<Message> = (1..=3).map(|id| request_of(id, 2048)).collect();
        for m in &small {
            o.push(m).unwrap();
        }
        o.push(&request_of(4, 10 * 1024)).unwrap();
        o.push(&request_of(5, 3 << 20)).unwrap();
        o.push(&Message::OneWay {
            timeout_ms: 0,
            method: Bytes::from_static(b"m"),
            metadata: Bytes::new(),
            body: Bytes::from(vec![1u8; 5000]),
        })
        .unwrap();
        let refused = o.set_max_frame_len(MIN_MAX_FRAME_LEN);
        let ids: Vec<u32> = refused.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [4, 5, 0], "{refused:?}");
        assert_eq!(refused[0].1, request_of(4, 10 * 1024).encoded_len());
        assert_eq!(o.queued(), 3);
        let mut wire = take(&mut o);
        assert!(o.is_drained());
        let lens = frame_lens(&wire);
        assert!(lens.iter().all(|&n| n <= MIN_MAX_FRAME_LEN), "{lens:?}");
        assert_eq!(decode_all(&mut wire, MIN_MAX_FRAME_LEN), small);
    }

    #[test]
    fn a_peer_with_room_takes_what_was_queued_before_its_limit_was_known() {
        let mut o = Outbox::provisional(16 << 20);
        let msgs = [
            request_of(1, 100),
            request_of(2, 10 * 1024),
            request_of(3, 200),
        ];
        for m in &msgs {
            o.push(m).unwrap();
        }
        assert!(o.set_max_frame_len(16 << 20).is_empty());
        let mut wire = take(&mut o);
        // The 10 KiB one went whole into no frame: one piece, after the frame of the others.
        let got = decode_all(&mut wire, 16 << 20);
        assert_eq!(got, [msgs[0].clone(), msgs[2].clone(), msgs[1].clone()]);
        // Once the limit is known, such a message goes in a frame as usual.
        o.push(&request_of(4, 10 * 1024)).unwrap();
        let wire = take(&mut o);
        assert_eq!(frame_lens(&wire), [request_of(4, 10 * 1024).encoded_len()]);
    }

    #[test]
    fn encoder_refuses_oversize_frame_and_writes_nothing() {
        let mut dst = BytesMut::new();
        let msgs = vec![Message::Response {
            id: 1,
            body: Bytes::from(vec![0u8; 4096 - 9 + 1]),
        }];
        assert!(encode_frame(&msgs, 4096, &mut dst).is_err());
        assert!(dst.is_empty());
        let msgs = vec![Message::Response {
            id: 1,
            body: Bytes::from(vec![0u8; 4096 - 9]),
        }];
        encode_frame(&msgs, 4096, &mut dst).unwrap();
        assert_eq!(dst.len(), 4096 + FRAME_HEADER_LEN);
    }
}
