//! Preface parsing: never panics, and a preface that parses writes back as the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use towerpc::codec::{Preface, PREFACE_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(bytes) = <[u8; PREFACE_LEN]>::try_from(data) else {
        return;
    };
    if let Ok(preface) = Preface::parse(&bytes) {
        assert_eq!(preface.to_bytes(), bytes);
    }
});
