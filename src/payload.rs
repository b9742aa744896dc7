//! Payload encoding, apart from the frame codec: serde values as msgpack, the way
//! [`Client::invoke`](crate::Client::invoke) and the [`dispatch`](crate::dispatch) module do it.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, Kind, Result};

/// Deepest nesting a decoded payload may have (32 levels).
///
/// rmp-serde's own default (1,024) overflows a 2 MiB thread stack in debug builds before it is
/// reached, so a hostile peer could abort the process with `[[[[...]]]]`. 32 levels keep the
/// decoder within 256 KiB of stack even unoptimised; real payloads are rarely half as deep.
pub const MAX_DECODE_DEPTH: usize = 32;

/// Encodes `value` as msgpack with field names (structs become maps), so that adding an
/// optional field later stays compatible with peers that do not know it.
///
/// # Examples
///
/// ```
/// let bytes = towerpc::payload::to_msgpack(&7u8).unwrap();
/// assert_eq!(&bytes[..], &[0x07]);
/// ```
pub fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Bytes> {
    let encoded = SCRATCH.with(|scratch| {
        // A `Serialize` impl that encodes msgpack itself finds the scratch buffer in use.
        let Ok(mut buf) = scratch.try_borrow_mut() else {
            return rmp_serde::to_vec_named(value).map(Bytes::from);
        };
        buf.clear();
        let written = rmp_serde::encode::write_named(&mut *buf, value);
        let out = match written {
            // One allocation of the exact size: a `Vec` grown while encoding would cost two or
            // three (its growth, and the `Bytes` header for a length short of the capacity).
            Ok(()) if buf.len() <= SCRATCH_KEEP => Ok(Bytes::copy_from_slice(&buf)),
            // Large values are not copied: the buffer goes with them.
            Ok(()) => Ok(Bytes::from(std::mem::take(&mut *buf))),
            Err(e) => Err(e),
        };
        if buf.capacity() > 2 * SCRATCH_KEEP {
            *buf = Vec::new();
        }
        out
    });
    encoded.map_err(|e| Error::new(Kind::Encode).with(e))
}

/// Encoded values up to this size are copied out of the thread's scratch buffer, which keeps
/// its memory; larger ones take the buffer with them.
const SCRATCH_KEEP: usize = 16 * 1024;

thread_local! {
    /// Where [`to_msgpack`] encodes, so that a small value costs one allocation.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Decodes msgpack into `T`, with nesting limited to [`MAX_DECODE_DEPTH`]. Lying lengths
/// (a string announcing 4 GiB in five bytes) fail without allocating what they announce.
///
/// # Examples
///
/// ```
/// let n: u8 = towerpc::payload::from_msgpack(&[0x07]).unwrap();
/// assert_eq!(n, 7);
/// assert!(towerpc::payload::from_msgpack::<String>(&[0xdb, 0xd5, 0xfb, 0xd5, 0xc3]).is_err());
/// ```
pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DECODE_DEPTH);
    T::deserialize(&mut de).map_err(|e| Error::new(Kind::Decode).with(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes msgpack of its own inside `serialize`, while the outer call holds the scratch.
    struct Nested(u64);

    impl Serialize for Nested {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            let inner = to_msgpack(&self.0).map_err(serde::ser::Error::custom)?;
            s.serialize_bytes(&inner)
        }
    }

    struct Refuses;

    impl Serialize for Refuses {
        fn serialize<S: serde::Serializer>(&self, _: S) -> std::result::Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no"))
        }
    }

    #[test]
    fn values_of_every_size_round_trip_through_the_scratch_buffer() {
        for len in [
            0,
            1,
            100,
            SCRATCH_KEEP - 5,
            SCRATCH_KEEP,
            3 * SCRATCH_KEEP,
            5,
        ] {
            let v = serde_bytes::ByteBuf::from(vec![7u8; len]);
            let a = to_msgpack(&v).unwrap();
            // A second value encoded after it leaves the first as it was.
            let b = to_msgpack(&u64::MAX).unwrap();
            let back: serde_bytes::ByteBuf = from_msgpack(&a).unwrap();
            assert_eq!(back, v);
            assert_eq!(from_msgpack::<u64>(&b).unwrap(), u64::MAX);
            assert_eq!(a, rmp_serde::to_vec_named(&v).unwrap());
        }
        SCRATCH.with(|s| assert!(s.borrow().capacity() <= 2 * SCRATCH_KEEP));
    }

    #[test]
    fn nested_encoding_and_errors_leave_the_scratch_usable() {
        let bytes = to_msgpack(&Nested(300)).unwrap();
        let inner: serde_bytes::ByteBuf = from_msgpack(&bytes).unwrap();
        assert_eq!(from_msgpack::<u64>(&inner).unwrap(), 300);
        assert!(to_msgpack(&Refuses).is_err());
        assert_eq!(&to_msgpack(&7u8).unwrap()[..], &[0x07]);
    }
}
