//! Stream compression, negotiated in the connection preface.
//!
//! The whole byte stream after the prefaces is compressed, not each message: the compressor's
//! context lives as long as the connection and is flushed once per batch, so a message that
//! repeats across batches costs a few bytes. The frame decoder runs on the decompressed bytes
//! with its usual limits, which is what bounds a decompression bomb; the zstd window is capped
//! as well so a frame cannot make the decoder reserve a huge window before it produces output.

use std::fmt;

/// A compression algorithm both ends can agree on.
///
/// Each algorithm is behind its own feature (`compression-zstd`, `compression-deflate`,
/// `compression-lz4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    /// zstd at its fastest level (a streaming context, flushed per batch). Batches that do not
    /// compress go out as raw blocks, and compressing is not tried again for a while, so
    /// incompressible payloads cost little more than no compression.
    #[cfg(feature = "compression-zstd")]
    Zstd,
    /// Raw deflate (RFC 1951) at its fastest level, sync-flushed per batch.
    #[cfg(feature = "compression-deflate")]
    Deflate,
    /// lz4 frames with linked blocks at the fastest level, flushed per batch: the cheapest on
    /// CPU, compresses less than the others.
    #[cfg(feature = "compression-lz4")]
    Lz4,
}

/// Largest zstd window a peer may make us use, as a power of two (8 MiB). A frame that declares
/// a larger window is refused before the decoder allocates it.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

impl Compression {
    /// Every algorithm compiled in, in the server's default order of preference.
    pub const ALL: &'static [Compression] = &[
        #[cfg(feature = "compression-zstd")]
        Compression::Zstd,
        #[cfg(feature = "compression-deflate")]
        Compression::Deflate,
        #[cfg(feature = "compression-lz4")]
        Compression::Lz4,
    ];

    /// The bit this algorithm has in the preface's compression byte.
    pub(crate) fn bit(self) -> u8 {
        match self {
            #[cfg(feature = "compression-zstd")]
            Compression::Zstd => 0x01,
            #[cfg(feature = "compression-deflate")]
            Compression::Deflate => 0x02,
            #[cfg(feature = "compression-lz4")]
            Compression::Lz4 => 0x04,
        }
    }

    /// The algorithm with preface bit `bit`, if it is compiled in.
    pub(crate) fn from_bit(bit: u8) -> Option<Compression> {
        Compression::ALL.iter().copied().find(|c| c.bit() == bit)
    }

    /// The most memory one connection's compression state can come to (both directions):
    /// what the peer may make the decoder hold, whatever it sends, plus our encoder and the
    /// buffers around them. A server reserves it for each compressed connection in its
    /// compression budget (`Server::max_compression_bytes`).
    ///
    /// - zstd: a window of up to 8 MiB ([`ZSTD_WINDOW_LOG_MAX`], the peer's choice), filled by
    ///   a few hundred bytes of a compressed stream, and two 128 KiB blocks; our encoder at
    ///   level 1 (a 512 KiB window and its tables); 10 MiB in all.
    /// - lz4: blocks of up to 4 MiB (the peer's choice), an input and an output one; our
    ///   encoder's 64 KiB blocks; 9 MiB.
    /// - deflate: a 32 KiB window each way, the encoder's tables and the 64 KiB buffers on
    ///   either side; 1 MiB.
    pub(crate) fn memory_bound(self) -> usize {
        match self {
            #[cfg(feature = "compression-zstd")]
            Compression::Zstd => 10 << 20,
            #[cfg(feature = "compression-deflate")]
            Compression::Deflate => 1 << 20,
            #[cfg(feature = "compression-lz4")]
            Compression::Lz4 => 9 << 20,
        }
    }

    /// What a server that accepts `accepted` (in order of preference) picks from a client's
    /// `offer` bitmask: the first accepted one offered, or none.
    pub(crate) fn choose(accepted: &[Compression], offer: u8) -> Option<Compression> {
        accepted.iter().copied().find(|c| offer & c.bit() != 0)
    }
}

impl fmt::Display for Compression {
    // With no algorithm compiled in the enum is empty and `f` goes unused.
    #[allow(unused_variables)]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            #[cfg(feature = "compression-zstd")]
            Compression::Zstd => f.write_str("zstd"),
            #[cfg(feature = "compression-deflate")]
            Compression::Deflate => f.write_str("deflate"),
            #[cfg(feature = "compression-lz4")]
            Compression::Lz4 => f.write_str("lz4"),
        }
    }
}
