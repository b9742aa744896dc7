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
    rmp_serde::to_vec_named(value)
        .map(Bytes::from)
        .map_err(|e| Error::new(Kind::Encode).with(e))
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
