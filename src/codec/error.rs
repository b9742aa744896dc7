//! Codec errors.

use std::{fmt, io};

/// Why the codec refused bytes or a message.
///
/// Every variant other than [`CodecError::Io`] is a protocol violation: the connection that
/// produced it is closed.
#[derive(Debug)]
#[non_exhaustive]
pub enum CodecError {
    /// A frame announced (or an encoder was asked to send) a body above the limit.
    FrameTooLarge {
        /// The announced or attempted length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The bytes do not follow the wire format; the text says how.
    InvalidFrame(&'static str),
    /// The peer asked for more memory than this side will give it (a zstd window past the
    /// server's compression budget); the text says what.
    ResourceExhausted(&'static str),
    /// The underlying I/O failed.
    Io(io::Error),
}

impl CodecError {
    /// The wire error code a GOAWAY should carry for this error.
    pub(crate) fn wire_code(&self) -> u16 {
        use super::code;
        match self {
            CodecError::FrameTooLarge { .. } => code::FRAME_TOO_LARGE,
            CodecError::InvalidFrame(_) => code::PROTOCOL_ERROR,
            CodecError::ResourceExhausted(_) => code::RESOURCE_EXHAUSTED,
            CodecError::Io(_) => code::UNAVAILABLE,
        }
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecError::FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max} bytes")
            }
            CodecError::InvalidFrame(why) => write!(f, "invalid frame: {why}"),
            CodecError::ResourceExhausted(why) => write!(f, "resource exhausted: {why}"),
            CodecError::Io(_) => f.write_str("i/o error"),
        }
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CodecError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for CodecError {
    fn from(e: io::Error) -> Self {
        CodecError::Io(e)
    }
}
