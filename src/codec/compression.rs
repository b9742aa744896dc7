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

/// A zstd connection's compression state but the decoder's window (2 MiB): our level-1
/// encoder (its 512 KiB window, tables and buffers), the decoder's tables and two 128 KiB
/// blocks, and the reader's and writer's own buffers.
#[cfg(feature = "compression-zstd")]
pub(crate) const ZSTD_STATE: usize = 2 << 20;

/// The window towerpc's zstd encoder uses (level 1: 512 KiB).
#[cfg(feature = "compression-zstd")]
pub(crate) const ZSTD_TOWERPC_WINDOW: usize = 512 << 10;

/// A zstd connection's compression state when its peer's frames use a `window`-byte window.
#[cfg(feature = "compression-zstd")]
pub(crate) fn zstd_memory(window: usize) -> usize {
    ZSTD_STATE + window.min(1 << ZSTD_WINDOW_LOG_MAX)
}

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
    /// buffers around them.
    ///
    /// - zstd: [`ZSTD_STATE`] and a window of up to 8 MiB ([`ZSTD_WINDOW_LOG_MAX`], the
    ///   peer's choice, which a few hundred bytes of a compressed stream fill); 10 MiB.
    /// - lz4: blocks of up to 4 MiB (the peer's choice), an input and an output one, and our
    ///   encoder's 64 KiB blocks; 9 MiB.
    /// - deflate: a 32 KiB window each way, the encoder's tables and the 64 KiB buffers on
    ///   either side; 1 MiB.
    #[allow(dead_code)] // With zstd alone, only the tests ask for its bound.
    pub(crate) fn memory_bound(self) -> usize {
        match self {
            #[cfg(feature = "compression-zstd")]
            Compression::Zstd => zstd_memory(1 << ZSTD_WINDOW_LOG_MAX),
            #[cfg(feature = "compression-deflate")]
            Compression::Deflate => 1 << 20,
            #[cfg(feature = "compression-lz4")]
            Compression::Lz4 => 9 << 20,
        }
    }

    /// What a server reserves for a connection's compression state when it is negotiated
    /// (`Server::max_compression_bytes`): the bound, but for zstd, whose window the server
    /// learns from each frame's header and reserves then, the state with the 512 KiB window
    /// towerpc's own encoder uses.
    pub(crate) fn memory_at_start(self) -> usize {
        match self {
            #[cfg(feature = "compression-zstd")]
            Compression::Zstd => zstd_memory(ZSTD_TOWERPC_WINDOW),
            #[allow(unreachable_patterns)]
            other => other.memory_bound(),
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

#[cfg(all(test, feature = "compression-zstd"))]
mod tests {
    use super::*;

    #[test]
    fn a_zstd_connection_reserves_its_state_at_towerpcs_window_and_at_most_the_cap() {
        assert_eq!(Compression::Zstd.memory_at_start(), (2 << 20) + (512 << 10));
        assert_eq!(Compression::Zstd.memory_bound(), 10 << 20);
        assert_eq!(
            zstd_memory(usize::MAX),
            10 << 20,
            "a declared window past the cap"
        );
    }
}
