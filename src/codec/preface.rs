//! The 12-byte connection preface each side sends first.

use super::{CodecError, MIN_MAX_FRAME_LEN, PROTOCOL_VERSION};

/// Length of the preface in bytes.
pub const PREFACE_LEN: usize = 12;

const MAGIC: &[u8; 4] = b"TRPC";

/// Which side sent a preface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that dialed (`'C'`).
    Client,
    /// The side that accepted (`'S'`).
    Server,
}

/// The options a side announces at connection start.
///
/// # Examples
///
/// ```
/// use towerpc::codec::{Preface, Role};
///
/// let p = Preface::new(Role::Client, 16 << 20);
/// let bytes = p.to_bytes();
/// assert_eq!(&bytes[..4], b"TRPC");
/// assert_eq!(Preface::parse(&bytes).unwrap(), p);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preface {
    pub(crate) version: u8,
    pub(crate) role: Role,
    pub(crate) compression: u8,
    pub(crate) max_frame_len: u32,
}

impl Preface {
    /// A preface for `role` with no compression.
    pub fn new(role: Role, max_frame_len: usize) -> Self {
        Preface {
            version: PROTOCOL_VERSION,
            role,
            compression: 0,
            max_frame_len: max_frame_len.min(u32::MAX as usize) as u32,
        }
    }

    /// The protocol version; this crate speaks [`PROTOCOL_VERSION`].
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Who sent it.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The compression byte: from a client, the bitmask of algorithms offered; from a server,
    /// the one chosen, or 0 for none (PROTOCOL.md §3.3).
    pub fn compression_bits(&self) -> u8 {
        self.compression
    }

    /// The largest frame body the sender accepts.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// The wire bytes.
    pub fn to_bytes(&self) -> [u8; PREFACE_LEN] {
        let mut b = [0u8; PREFACE_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4] = self.version;
        b[5] = match self.role {
            Role::Client => b'C',
            Role::Server => b'S',
        };
        b[6] = self.compression;
        b[7] = 0;
        b[8..12].copy_from_slice(&self.max_frame_len.to_be_bytes());
        b
    }

    /// Checks the start of a preface still arriving: a peer whose first bytes are not the
    /// magic is no towerpc peer, and is refused without waiting for the rest (PROTOCOL.md
    /// §3.2).
    pub(crate) fn check_start(b: &[u8]) -> Result<(), CodecError> {
        let n = b.len().min(MAGIC.len());
        if b[..n] != MAGIC[..n] {
            return Err(CodecError::InvalidFrame(
                "bad preface magic (not a towerpc peer)",
            ));
        }
        Ok(())
    }

    /// Parses and checks a preface. A version other than ours parses (so that the caller can
    /// report it); everything else that is off is an error.
    pub fn parse(b: &[u8; PREFACE_LEN]) -> Result<Preface, CodecError> {
        Preface::check_start(b)?;
        let role = match b[5] {
            b'C' => Role::Client,
            b'S' => Role::Server,
            _ => return Err(CodecError::InvalidFrame("bad preface role")),
        };
        if b[7] != 0 {
            return Err(CodecError::InvalidFrame("unknown preface flags"));
        }
        let max_frame_len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        if (max_frame_len as usize) < MIN_MAX_FRAME_LEN {
            return Err(CodecError::InvalidFrame("preface max_frame_len below 4096"));
        }
        Ok(Preface {
            version: b[4],
            role,
            compression: b[6],
            max_frame_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preface_bytes() {
        let p = Preface::new(Role::Server, 16 << 20);
        assert_eq!(
            p.to_bytes(),
            [b'T', b'R', b'P', b'C', 1, b'S', 0, 0, 0x01, 0, 0, 0]
        );
    }

    #[test]
    fn preface_rejects() {
        let good = Preface::new(Role::Client, 4096).to_bytes();
        let mut bad = good;
        bad[0] = b'X';
        assert!(Preface::parse(&bad).is_err());
        let mut bad = good;
        bad[5] = b'Z';
        assert!(Preface::parse(&bad).is_err());
        let mut bad = good;
        bad[7] = 1;
        assert!(Preface::parse(&bad).is_err());
        let mut bad = good;
        bad[10] = 0;
        bad[11] = 1;
        assert!(Preface::parse(&bad).is_err());
    }
}
