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
/// rmp-serde counts arrays and maps but not an enum's variants, so the bytes are checked first
/// (every array and map counts, an enum variant is a one-entry map): a recursive enum in a
/// request type is bounded too. (A type that recurses without reading anything, such as
/// `struct L(Option<Box<L>>)`, is not a payload this or any limit can bound.)
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
    encode_msgpack(value).map_err(|e| Error::new(Kind::Encode).with(e))
}

/// [`to_msgpack`] with rmp-serde's own error, for callers that report it their own way (the
/// dispatcher's replies).
pub(crate) fn encode_msgpack<T: Serialize + ?Sized>(
    value: &T,
) -> std::result::Result<Bytes, rmp_serde::encode::Error> {
    SCRATCH.with(|scratch| {
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
    })
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
    decode_msgpack(bytes).map_err(|e| Error::new(Kind::Decode).with(e))
}

/// Decodes msgpack into `T` as [`from_msgpack`] does, with the error untyped for callers that
/// report it their own way (the dispatcher answers INVALID_ARGUMENT).
pub(crate) fn decode_msgpack<T: DeserializeOwned>(
    bytes: &[u8],
) -> std::result::Result<T, DecodeError> {
    check_depth(bytes).map_err(DecodeError::Depth)?;
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DECODE_DEPTH);
    T::deserialize(&mut de).map_err(DecodeError::Msgpack)
}

/// Why msgpack did not decode.
#[derive(Debug)]
pub(crate) enum DecodeError {
    Depth(TooDeep),
    Msgpack(rmp_serde::decode::Error),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Depth(e) => e.fmt(f),
            DecodeError::Msgpack(e) => e.fmt(f),
        }
    }
}

/// Transparent: it shows, and chains to, what it wraps.
impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecodeError::Depth(e) => e.source(),
            DecodeError::Msgpack(e) => e.source(),
        }
    }
}

/// Why [`check_depth`] refused a payload.
#[derive(Debug)]
pub(crate) struct TooDeep;

impl std::fmt::Display for TooDeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "msgpack nested past the depth limit ({MAX_DECODE_DEPTH} levels)"
        )
    }
}

impl std::error::Error for TooDeep {}

/// Refuses msgpack whose arrays and maps nest deeper than [`MAX_DECODE_DEPTH`], before any
/// `Deserialize` runs. rmp-serde's own limit counts arrays and maps but not an enum's variant
/// (a one-entry map, `0x81 0x01` a level), so a request type with a recursive enum would
/// recurse once per two bytes of a hostile body until the stack overflowed, which aborts the
/// process. One pass over the bytes with a stack of at most that many counts; bytes that are
/// not msgpack, or stop short, end the walk, and the decoder reports them.
pub(crate) fn check_depth(bytes: &[u8]) -> std::result::Result<(), TooDeep> {
    // Elements still to come in each open array or map, innermost last.
    let mut open = [0u64; MAX_DECODE_DEPTH];
    let mut depth = 0;
    let mut at = 0;
    let be = |at: usize, n: usize| -> Option<u64> {
        let b = bytes.get(at..at + n)?;
        Some(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    };
    while let Some(&m) = bytes.get(at) {
        at += 1;
        // What follows the marker: bytes to skip, or a container of `items` elements.
        let (skip, items): (u64, Option<u64>) = match m {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (0, None),
            0x80..=0x8f => (0, Some(2 * u64::from(m & 0x0f))),
            0x90..=0x9f => (0, Some(u64::from(m & 0x0f))),
            0xa0..=0xbf => (u64::from(m & 0x1f), None),
            // A length that is not all there reads as past the end.
            0xc4 | 0xd9 => (be(at, 1).map_or(u64::MAX, |n| 1 + n), None),
            0xc5 | 0xda => (be(at, 2).map_or(u64::MAX, |n| 2 + n), None),
            0xc6 | 0xdb => (be(at, 4).map_or(u64::MAX, |n| 4 + n), None),
            0xc7 => (be(at, 1).map_or(u64::MAX, |n| 2 + n), None),
            0xc8 => (be(at, 2).map_or(u64::MAX, |n| 3 + n), None),
            0xc9 => (be(at, 4).map_or(u64::MAX, |n| 5 + n), None),
            0xca => (4, None),
            0xcb => (8, None),
            0xcc | 0xd0 => (1, None),
            0xcd | 0xd1 => (2, None),
            0xce | 0xd2 => (4, None),
            0xcf | 0xd3 => (8, None),
            0xd4 => (2, None),
            0xd5 => (3, None),
            0xd6 => (5, None),
            0xd7 => (9, None),
            0xd8 => (17, None),
            0xdc => (2, be(at, 2)),
            0xdd => (4, be(at, 4)),
            0xde => (2, be(at, 2).map(|n| 2 * n)),
            0xdf => (4, be(at, 4).map(|n| 2 * n)),
            // 0xc1, never used: the decoder refuses it.
            _ => return Ok(()),
        };
        let Some(next) = usize::try_from(skip).ok().and_then(|n| at.checked_add(n)) else {
            return Ok(());
        };
        at = next;
        // This element is one of its container's.
        if depth > 0 {
            open[depth - 1] -= 1;
        }
        match items {
            Some(n) if n > 0 => {
                if depth == MAX_DECODE_DEPTH {
                    return Err(TooDeep);
                }
                open[depth] = n;
                depth += 1;
            }
            // An array or map announcing more than the bytes hold.
            None if matches!(m, 0xdc..=0xdf) => return Ok(()),
            _ => {}
        }
        // Close what this element completed.
        while depth > 0 && open[depth - 1] == 0 {
            depth -= 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request type a peer can nest: each `Neg` level is a one-entry map.
    #[derive(Debug, PartialEq, serde::Deserialize, Serialize)]
    enum Expr {
        N(i64),
        Neg(Box<Expr>),
    }

    fn negs(levels: usize) -> Vec<u8> {
        let mut b = [0x81, 0x01].repeat(levels);
        b.extend_from_slice(&[0x81, 0x00, 0x05]);
        b
    }

    #[test]
    fn a_recursive_enum_nested_past_the_limit_is_refused_not_overflowed() {
        // 100,000 levels in 200 KB: without the check, rmp-serde recursed once per level.
        let err = from_msgpack::<Expr>(&negs(100_000)).unwrap_err();
        assert!(err.is_decode(), "{err:?}");
        assert!(
            format!("{err:#}").contains("nested past the depth limit"),
            "{err:#}"
        );
        // Within the limit it decodes as before.
        let mut want = Expr::N(5);
        for _ in 0..20 {
            want = Expr::Neg(Box::new(want));
        }
        assert_eq!(from_msgpack::<Expr>(&negs(20)).unwrap(), want);
    }

    #[test]
    fn the_depth_check_counts_arrays_and_maps_and_skips_everything_else() {
        let nested = |n: usize| {
            let mut b = vec![0x91; n];
            b.push(0x01);
            b
        };
        assert!(check_depth(&nested(MAX_DECODE_DEPTH)).is_ok());
        assert!(check_depth(&nested(MAX_DECODE_DEPTH + 1)).is_err());
        // Siblings are not nesting: 1,000 arrays of one level, in a map of one entry.
        let mut wide = vec![0x81, 0xa1, b'k', 0xdc, 0x03, 0xe8];
        wide.extend([0x91, 0x07].repeat(1000));
        assert!(check_depth(&wide).is_ok());
        // Strings, binaries and extensions are skipped whole, whatever their bytes look like.
        let value = (
            "\u{91}".repeat(100),
            serde_bytes::ByteBuf::from(vec![0x91; 1000]),
            vec![vec![1u8; 3]; 4],
            std::collections::BTreeMap::from([(1u8, 2.5f64), (3, -1.0)]),
            (u64::MAX, i64::MIN, None::<u8>, true),
        );
        let bytes = to_msgpack(&value).unwrap();
        assert!(check_depth(&bytes).is_ok());
        assert!(check_depth(&[0xd7, 0x01, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91]).is_ok());
        // Truncated or invalid: left to the decoder.
        for bad in [
            &[0xdd, 0xff][..],
            &[0xc6, 0xff, 0xff, 0xff, 0xff],
            &[0xc1],
            &[],
        ] {
            assert!(check_depth(bad).is_ok());
        }
        // Every marker alone, its length or contents missing (the fuzzer's first find: 0xc5).
        for m in 0..=255u8 {
            assert!(check_depth(&[m]).is_ok(), "{m:#04x}");
            assert!(check_depth(&[0x91, m, 0xff]).is_ok(), "{m:#04x}");
        }
    }

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
