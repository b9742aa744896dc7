//! msgpack payloads and request metadata: decoding arbitrary bytes into the shapes handlers and
//! the trace context use never panics, never exhausts the stack or memory, and what decodes
//! encodes back to a value that decodes the same.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};
use towerpc::payload::{from_msgpack, to_msgpack};
use towerpc::trace::TraceContext;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    id: u64,
    name: String,
    #[serde(with = "serde_bytes")]
    blob: Vec<u8>,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
    next: Option<Box<Record>>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Shape {
    Unit,
    Pair(i32, i64),
    Named { x: f64, y: Option<u8> },
}

fn round_trip<T>(data: &[u8])
where
    T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    if let Ok(value) = from_msgpack::<T>(data) {
        let bytes = to_msgpack(&value).expect("a decoded value encodes");
        let again: T = from_msgpack(&bytes).expect("and decodes");
        // NaN is the one value not equal to itself.
        if format!("{value:?}").contains("NaN") {
            return;
        }
        assert_eq!(again, value);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Record>(data);
    round_trip::<Vec<Shape>>(data);
    round_trip::<BTreeMap<String, String>>(data);
    round_trip::<(u64, Option<String>, bool)>(data);
    let _ = TraceContext::from_metadata(data);
});
