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
