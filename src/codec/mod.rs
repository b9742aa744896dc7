//! The frame codec: connection preface, batched frames and the messages inside them.
//!
//! The byte layout is specified in `PROTOCOL.md`; this module is its implementation. A frame is an
//! 8-byte header followed by a batch of messages:
//!
//! ```text
//! +----------------+--------+----------+-------------+---------------------------+
//! | len: u32 (BE)  | flags  | reserved | count: u16  | count messages (len bytes) |
//! +----------------+--------+----------+-------------+---------------------------+
//! ```
//!
//! [`FrameCodec`] is a [`tokio_util::codec::Decoder`] that yields one [`Frame`] (a whole batch)
//! at a time and an [`Encoder`] for single messages and whole batches. The decoder also
//! reassembles messages sent in fragments (PROTOCOL.md §4.1): a fragment is never a [`Message`];
//! the message it completes appears in the frame of its last piece, and a frame that held only
//! pieces decodes to a [`Frame`] with no messages.
//! The decoder checks the announced length against `max_frame_len` from the header alone, before
//! it reserves memory or waits for the body, so a lying length prefix costs nothing. Bodies are
//! [`Bytes`](bytes::Bytes) slices of the read buffer: decoding copies no payload, but for a
//! message in fragments, whose pieces are copied into one buffer (kept for the next such message
//! once the message's bytes are dropped: `spare`). A frame is
//! checked whole (every message well formed, its fragments in order) before any of its messages
//! is handed out; the engines then take the messages out a few at a time rather than as one
//! `Vec` per frame, so a frame of 65,535 tiny messages costs what came on the wire.

mod compression;
mod decode;
mod encode;
mod error;
mod frame;
mod preface;
mod spare;

pub use self::compression::{Compression, ZSTD_WINDOW_LOG_MAX};
pub use self::error::CodecError;
pub use self::frame::{Frame, Message};
pub use self::preface::{Preface, Role, PREFACE_LEN};

#[cfg(feature = "compression-zstd")]
pub(crate) use self::compression::zstd_memory;
pub(crate) use self::decode::Incoming;
pub(crate) use self::encode::{Batch, Outbox, FRAGMENTS_PER_TAKE, MAX_IO_SLICES};
pub(crate) use self::frame::code;
pub(crate) use self::spare::Limit;

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder, Framed};

/// Version of the wire protocol this crate speaks, sent in the preface.
pub const PROTOCOL_VERSION: u8 = 1;

/// Default largest frame body accepted, in bytes (16 MiB), announced in the preface.
///
/// It also bounds the largest single message, whether it arrives whole or in fragments.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Smallest `max_frame_len` a peer may announce (4 KiB).
pub const MIN_MAX_FRAME_LEN: usize = 4096;

/// Size of the frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 8;

/// Largest number of messages in one frame (the `count` field is a `u16`).
pub const MAX_MESSAGES_PER_FRAME: usize = u16::MAX as usize;

/// Most fragment data a sender may have unacknowledged, per direction (PROTOCOL.md §4.1: 1 MiB).
pub(crate) const FRAGMENT_WINDOW: usize = 1024 * 1024;

/// Fragment data a receiver reads before it acknowledges it: 64 KiB, each of towerpc's pieces
/// (PROTOCOL.md §4.1 allows up to 256 KiB). The sender's window comes back in smaller steps
/// than it goes out (up to 256 KiB of pieces a write), so it stalls less. Every 256 KiB → 192
/// KiB (session 13): 200 KiB calls beside 1,000 small callers moved 10–18 % more bytes a
/// second. 192 → 64 KiB, with [`spare::SPARES`] 2 → 8 (session 15, docs/benchmarks.md): the
/// big calls' MB/s ÷ the build before fragments went from 0.84–0.91 to 0.92–0.99 in six paired
/// rounds, at a small-call p99 within a bucket of what it was.
pub(crate) const ACK_EVERY: usize = 64 * 1024;

/// Largest method name, in bytes.
pub const MAX_METHOD_LEN: usize = 255;

/// Largest request metadata block, in bytes (16 KiB).
pub const MAX_METADATA_LEN: usize = 16 * 1024;

/// A tokio-util codec for towerpc frames.
///
/// # Examples
///
/// ```
/// use bytes::BytesMut;
/// use tokio_util::codec::{Decoder, Encoder};
/// use towerpc::codec::{FrameCodec, Message};
///
/// let mut codec = FrameCodec::new();
/// let mut buf = BytesMut::new();
/// let ping = Message::Ping { data: 7 };
/// codec.encode(ping.clone(), &mut buf).unwrap();
/// let frame = codec.decode(&mut buf).unwrap().unwrap();
/// assert_eq!(frame.messages(), &[ping]);
/// ```
#[derive(Debug, Clone)]
pub struct FrameCodec {
    decoder: decode::FrameDecoder,
    /// Largest frame body the peer accepts: what the encoder may send.
    max_send_len: usize,
}

/// Configures a [`FrameCodec`].
///
/// Built by [`FrameCodec::builder`]. Setters take `&mut self`, as tokio-util's
/// `length_delimited::Builder` does.
#[derive(Debug, Clone)]
pub struct Builder {
    max_frame_len: usize,
    max_send_len: usize,
}

// ===== impl FrameCodec =====

impl FrameCodec {
    /// A codec with the default limits ([`DEFAULT_MAX_FRAME_LEN`] in both directions).
    pub fn new() -> Self {
        Builder::new().new_codec()
    }

    /// Starts a [`Builder`].
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The largest frame body this codec decodes.
    pub fn max_frame_len(&self) -> usize {
        self.decoder.max_frame_len
    }

    /// Whether a frame's header has been decoded and its body not yet.
    pub(crate) fn in_frame(&self) -> bool {
        self.decoder.in_frame()
    }

    /// Whether a message is partly reassembled from its fragments (PROTOCOL.md §4.1).
    pub(crate) fn in_message(&self) -> bool {
        self.decoder.in_message()
    }

    /// FRAGMENTs taken in since the codec began.
    pub(crate) fn fragments_read(&self) -> u64 {
        self.decoder.fragments
    }

    /// Memory held by the message being reassembled, if any.
    pub(crate) fn partial_capacity(&self) -> usize {
        self.decoder.partial_capacity()
    }

    /// Memory kept for messages to come in fragments (see `spare`).
    #[cfg(test)]
    pub(crate) fn spare_capacity(&self) -> usize {
        self.decoder.spare_capacity()
    }

    /// Frees the memory kept for messages to come; returns whether there was any.
    pub(crate) fn release_spares(&self) -> bool {
        self.decoder.release_spares()
    }

    /// The next frame, whole and checked (PROTOCOL.md §12) before any of its messages is
    /// taken out with [`next_message`](Self::next_message): the engines' path, which builds no
    /// collection of a frame's messages.
    pub(crate) fn decode_frame(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<Incoming>, CodecError> {
        self.decoder.decode_frame(src)
    }

    /// The next message of `frame`; `None` once it has no more.
    pub(crate) fn next_message(
        &mut self,
        frame: &mut Incoming,
    ) -> Result<Option<Message>, CodecError> {
        self.decoder.next_message(frame)
    }

    /// The ACK to send now, if enough fragment data has been read since the last one.
    pub(crate) fn take_ack(&mut self) -> Option<Message> {
        self.decoder.take_ack().map(|bytes| Message::Ack { bytes })
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        self.decoder.decode(src)
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = CodecError;

    /// Encodes one message as a frame of one.
    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode::encode_frame(std::slice::from_ref(&item), self.max_send_len, dst)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    /// Encodes a whole batch as one frame. Refuses (and writes nothing) if the batch is empty,
    /// holds more than [`MAX_MESSAGES_PER_FRAME`] messages or exceeds the peer's limit.
    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode::encode_frame(item.messages(), self.max_send_len, dst)
    }
}

// ===== impl Builder =====

impl Builder {
    /// A builder with the defaults.
    pub fn new() -> Self {
        Builder {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_send_len: DEFAULT_MAX_FRAME_LEN,
        }
    }

    /// Largest frame body to decode, in bytes. Default [`DEFAULT_MAX_FRAME_LEN`] (16 MiB).
    ///
    /// A frame above it is rejected from its header with [`CodecError::FrameTooLarge`]. Choose it
    /// as the largest batch you expect plus headroom: it bounds the memory one connection may make
    /// this side buffer. Values below [`MIN_MAX_FRAME_LEN`] are raised to it.
    pub fn max_frame_len(&mut self, len: usize) -> &mut Self {
        self.max_frame_len = len.clamp(MIN_MAX_FRAME_LEN, u32::MAX as usize);
        self
    }

    /// Largest frame body to encode (the peer's `max_frame_len`). Default 16 MiB.
    pub fn max_send_len(&mut self, len: usize) -> &mut Self {
        self.max_send_len = len.clamp(MIN_MAX_FRAME_LEN, u32::MAX as usize);
        self
    }

    /// Builds the codec.
    pub fn new_codec(&self) -> FrameCodec {
        FrameCodec {
            decoder: decode::FrameDecoder::new(self.max_frame_len),
            max_send_len: self.max_send_len,
        }
    }

    /// Wraps `io` in a [`Framed`] with the configured codec.
    pub fn new_framed<T>(&self, io: T) -> Framed<T, FrameCodec>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    {
        Framed::new(io, self.new_codec())
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}
